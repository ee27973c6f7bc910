//! Human sizes: "1G", "512M", "4096", "1GiB" → bytes.

#[derive(Debug, thiserror::Error)]
#[error("invalid size {text:?}: expected a number with an optional K/M/G/T suffix")]
pub struct SizeError {
    text: String,
}

/// Parses a byte count with an optional binary suffix (K, M, G, T; `iB`/`B` tolerated).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let err = || SizeError { text: text.to_string() };
    let t = text.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2k").unwrap(), 2048);
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
