//! The keyring: named secrets read from files, referenced by name elsewhere (a host's TLS PSK
//! in `nvmf_subsystem_add_host --psk NAME`). A leaf: its methods (SPDK's
//! `keyring_file_add_key`, `keyring_file_remove_key`, `keyring_get_keys`) are in
//! `rpc_keyring`.
//!
//! Invariants:
//! - a key file must be given by an absolute path and be readable by its owner only (mode
//!   0600 or stricter), as SPDK's keyring_file requires; its text is read once, when added;
//! - key text is never returned, logged or put in an error: listings show name and path;
//!   the text is wiped when the key is removed.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use parking_lot::RwLock;
use zeroize::Zeroizing;

/// Keys one daemon holds at most.
pub const KEYS_MAX: usize = 4096;
/// Longest key file read.
const KEY_FILE_MAX: u64 = 4096;

struct KeyFile {
    path: PathBuf,
    text: Zeroizing<String>,
}

/// Why a key was not added (no key text in any of them).
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("key name: 1 to 256 bytes")]
    BadName,
    #[error("Non-absolute paths are not allowed: {0}")]
    RelativePath(String),
    #[error("key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("Invalid permissions for key file '{path}': 0{mode:o} (chmod 600)")]
    Permissions { path: String, mode: u32 },
    #[error("key file {0}: not a regular file of at most 4096 bytes")]
    NotAKeyFile(String),
    #[error("File exists")]
    Exists,
    #[error("the keyring holds {KEYS_MAX} keys already")]
    Full,
    #[error("No such device")]
    NoKey,
}

/// One key as listed: its name and file, never its text.
pub struct KeyInfo {
    pub name: String,
    pub path: String,
}

#[derive(Default)]
pub struct Keyring {
    keys: RwLock<BTreeMap<String, KeyFile>>,
}

impl Keyring {
    /// The text of key `name` (for the one consumer that parses it).
    pub fn text(&self, name: &str) -> Option<Zeroizing<String>> {
        self.keys.read().get(name).map(|k| k.text.clone())
    }

    /// Reads key file `path` (absolute, owner-only) as key `name`.
    pub fn add(&self, name: &str, path: PathBuf) -> Result<(), KeyringError> {
        if name.is_empty() || name.len() > 256 {
            return Err(KeyringError::BadName);
        }
        let shown = path.display().to_string();
        if !path.is_absolute() {
            return Err(KeyringError::RelativePath(shown));
        }
        let read_err = |source| KeyringError::Read { path: shown.clone(), source };
        let meta = std::fs::metadata(&path).map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyringError::Permissions { path: shown, mode });
        }
        if !meta.is_file() || meta.len() > KEY_FILE_MAX {
            return Err(KeyringError::NotAKeyFile(shown));
        }
        let text = Zeroizing::new(std::fs::read_to_string(&path).map_err(read_err)?);
        let text = Zeroizing::new(text.trim().to_string());
        let mut keys = self.keys.write();
        if keys.contains_key(name) {
            return Err(KeyringError::Exists);
        }
        if keys.len() >= KEYS_MAX {
            return Err(KeyringError::Full);
        }
        tracing::info!(name, path = %path.display(), "key added to the keyring");
        keys.insert(name.to_string(), KeyFile { path, text });
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Result<(), KeyringError> {
        self.keys.write().remove(name).ok_or(KeyringError::NoKey)?;
        tracing::info!(name, "key removed from the keyring");
        Ok(())
    }

    pub fn list(&self) -> Vec<KeyInfo> {
        let keys = self.keys.read();
        keys.iter()
            .map(|(name, k)| KeyInfo { name: name.clone(), path: k.path.display().to_string() })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_owner_only_files_by_absolute_path_and_never_shows_the_text() {
        let dir = std::env::temp_dir().join(format!("ballast-keyring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k0");
        std::fs::write(&path, "NVMeTLSkey-1:01:secretsecret:\n").unwrap();
        let ring = Keyring::default();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = ring.add("k0", path.clone()).unwrap_err().to_string();
        assert!(e.contains("Invalid permissions") && !e.contains("secret"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(ring.add("k0", "k0".into()), Err(KeyringError::RelativePath(_))));
        ring.add("k0", path.clone()).unwrap();
        assert!(matches!(ring.add("k0", path.clone()), Err(KeyringError::Exists)));
        assert_eq!(ring.text("k0").unwrap().as_str(), "NVMeTLSkey-1:01:secretsecret:");
        let listed = ring.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].name.as_str(), listed[0].path.as_str()),
            ("k0", path.to_str().unwrap())
        );
        ring.remove("k0").unwrap();
        assert!(matches!(ring.remove("k0"), Err(KeyringError::NoKey)));
        assert!(ring.text("k0").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
