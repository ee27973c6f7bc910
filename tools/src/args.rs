//! Shared command-line value parsers.

/// A size (`4K`, `1M`, ...) within `[min, max]`; `range` names the bounds for the error.
pub fn size_between(s: &str, min: u64, max: u64, range: &str) -> Result<u64, String> {
    let bytes = ballast_engine::size::parse_size(s).map_err(|e| e.to_string())?;
    if !(min..=max).contains(&bytes) {
        return Err(format!("{s} is {bytes} bytes; give a size from {range}"));
    }
    Ok(bytes)
}
