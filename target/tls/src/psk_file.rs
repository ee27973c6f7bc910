//! Pre-shared keys for TLS-PSK in nbdkit's and qemu's file format (GnuTLS's `psktool`
//! format): one `identity:hexkey` per line, the identity a user name.
//!
//! Invariants:
//! - keys never appear in errors, logs or `Debug` output (a short fingerprint at most), and
//!   their bytes are wiped when the table is dropped;
//! - identities are unique, non-empty, at most `IDENTITY_MAX` bytes of printable ASCII without
//!   `:`; keys are 1 to `KEY_MAX` bytes;
//! - a key file readable by group or others is refused.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use zeroize::{Zeroize, Zeroizing};

/// Longest identity accepted (TLS allows 2^16-1; nbdkit and libnbd use user names).
pub const IDENTITY_MAX: usize = 256;
/// Longest key accepted, in bytes (OpenSSL's PSK_MAX_PSK_LEN).
pub const KEY_MAX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum PskFileError {
    #[error("PSK file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error(
        "PSK file {path} is readable by group or others (mode {mode:o}); \
         it holds secrets: chmod 600 it"
    )]
    Permissions { path: String, mode: u32 },
    #[error("PSK file {path}, line {line}: {why}")]
    Syntax { path: String, line: usize, why: &'static str },
    #[error("PSK file {path}, line {line}: identity {identity:?} appears twice")]
    Duplicate { path: String, line: usize, identity: String },
    #[error("PSK file {path} holds no keys")]
    Empty { path: String },
}

/// A key, wiped on drop; `Debug` shows only its length.
#[derive(Clone)]
pub struct Key(Zeroizing<Vec<u8>>);

impl Key {
    pub fn new(bytes: Vec<u8>) -> Key {
        Key(Zeroizing::new(bytes))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({} bytes, redacted)", self.0.len())
    }
}

/// Identities and their keys.
#[derive(Clone, Default, Debug)]
pub struct PskTable {
    keys: BTreeMap<String, Key>,
}

impl PskTable {
    /// Reads a PSK file, refusing one that group or others may read.
    pub fn load(path: &Path) -> Result<PskTable, PskFileError> {
        let shown = path.display().to_string();
        let read_err = |source| PskFileError::Read { path: shown.clone(), source };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(PskFileError::Permissions { path: shown, mode });
        }
        let mut text = Zeroizing::new(std::fs::read(path).map_err(read_err)?);
        let table = PskTable::parse(&text, &shown);
        text.zeroize();
        table
    }

    /// Parses the file's bytes; `path` only names the file in errors.
    pub fn parse(text: &[u8], path: &str) -> Result<PskTable, PskFileError> {
        let mut keys = BTreeMap::new();
        for (n, raw) in text.split(|&b| b == b'\n').enumerate() {
            let line = n + 1;
            let syntax = |why| PskFileError::Syntax { path: path.into(), line, why };
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw.iter().all(u8::is_ascii_whitespace) || raw.first() == Some(&b'#') {
                continue;
            }
            let Some(colon) = raw.iter().position(|&b| b == b':') else {
                return Err(syntax("expected identity:hexkey"));
            };
            let (id, hex) = (&raw[..colon], &raw[colon + 1..]);
            if id.is_empty() || id.len() > IDENTITY_MAX {
                return Err(syntax("identity must be 1 to 256 bytes"));
            }
            if !id.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
                return Err(syntax("identity must be printable ASCII"));
            }
            let key =
                decode_hex(hex).ok_or_else(|| syntax("key is not an even number of hex digits"))?;
            if key.is_empty() || key.len() > KEY_MAX {
                return Err(syntax("key must be 1 to 256 bytes"));
            }
            let identity = String::from_utf8(id.to_vec()).expect("checked ASCII");
            if keys.contains_key(&identity) {
                return Err(PskFileError::Duplicate { path: path.into(), line, identity });
            }
            keys.insert(identity, Key::new(key));
        }
        if keys.is_empty() {
            return Err(PskFileError::Empty { path: path.into() });
        }
        Ok(PskTable { keys })
    }

    pub fn get(&self, identity: &str) -> Option<&Key> {
        self.keys.get(identity)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn identities(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

fn decode_hex(hex: &[u8]) -> Option<Vec<u8>> {
    let hex = hex.trim_ascii();
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    hex.chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_psktool_lines() {
        let t = PskTable::parse(b"alice:0011aAbB\n\n# c\r\nbob:ff\r\n", "f").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.get("alice").unwrap().bytes(), &[0x00, 0x11, 0xaa, 0xbb]);
        assert_eq!(t.get("bob").unwrap().bytes(), &[0xff]);
        assert!(t.get("carol").is_none());
    }

    #[test]
    fn errors_name_the_line_and_never_the_key() {
        for (text, line) in [
            (&b"alice:00\nbob:0g1234\n"[..], 2),
            (b"alice:123\n", 1),
            (b":00\n", 1),
            (b"nokey\n", 1),
            (b"a:00\na:11\n", 2),
        ] {
            let e = PskTable::parse(text, "keys.psk").unwrap_err().to_string();
            assert!(e.contains(&format!("line {line}")), "{e}");
            assert!(!e.contains("1234") && !e.contains("0g"), "{e}");
        }
        assert!(matches!(PskTable::parse(b"\n", "f"), Err(PskFileError::Empty { .. })));
        let dbg = format!("{:?}", PskTable::parse(b"alice:deadbeef\n", "f").unwrap());
        assert!(!dbg.contains("de") || !dbg.contains("beef"), "{dbg}");
    }

    #[test]
    fn refuses_a_file_others_can_read() {
        let path = std::env::temp_dir().join(format!("ballast-psk-{}", std::process::id()));
        std::fs::write(&path, "alice:00ff\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(PskTable::load(&path), Err(PskFileError::Permissions { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(PskTable::load(&path).unwrap().len(), 1);
        std::fs::remove_file(&path).unwrap();
    }
}
