//! The keyring: named secrets read from files, referenced by name elsewhere (a host's TLS PSK
//! in `nvmf_subsystem_add_host --psk NAME`). A leaf: its methods (SPDK's
//! `keyring_file_add_key`, `keyring_file_remove_key`, `keyring_get_keys`) are in
//! `rpc_keyring`; the pool keeps each key's name and path (`persist`), never its text.
//!
//! Invariants:
//! - a key file must be given by an absolute path and be readable by its owner only (mode
//!   0600 or stricter), as SPDK's keyring_file requires; its text is read once, when added
//!   (or restored at start-up);
//! - a key restored at start-up whose file cannot be read any more is held as *unavailable*:
//!   listed with the reason (which names the path, never the text), resolving to no text, and
//!   counted in [`KEYS_MAX`]; adding it again under its name replaces it;
//! - key text is never returned, logged or put in an error: listings show name and path;
//!   the text is wiped when the key is removed;
//! - at most [`KEYS_MAX`] keys.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use parking_lot::RwLock;
use zeroize::Zeroizing;

/// Keys one daemon holds at most.
pub const KEYS_MAX: usize = 4096;
/// Longest key name.
pub const NAME_MAX: usize = 256;
/// Longest key file read.
const KEY_FILE_MAX: u64 = 4096;

struct KeyFile {
    path: PathBuf,
    /// The key's text, or why its file could not be read when it was restored.
    text: Result<Zeroizing<String>, String>,
}

/// Why a key was not added (no key text in any of them).
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("key name: 1 to {NAME_MAX} bytes")]
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
    /// Why the key has no text (its file could not be read when it was restored).
    pub unavailable: Option<String>,
}

#[derive(Default)]
pub struct Keyring {
    keys: RwLock<BTreeMap<String, KeyFile>>,
}

/// The text of key file `path` (absolute, owner-only, a regular file of at most
/// `KEY_FILE_MAX` bytes), trimmed.
fn read_key_file(path: &Path) -> Result<Zeroizing<String>, KeyringError> {
    let shown = path.display().to_string();
    if !path.is_absolute() {
        return Err(KeyringError::RelativePath(shown));
    }
    let read_err = |source| KeyringError::Read { path: shown.clone(), source };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyringError::Permissions { path: shown, mode });
    }
    if !meta.is_file() || meta.len() > KEY_FILE_MAX {
        return Err(KeyringError::NotAKeyFile(shown));
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(read_err)?);
    Ok(Zeroizing::new(text.trim().to_string()))
}

impl Keyring {
    /// The text of key `name` (for the one consumer that parses it); `None` for no such key
    /// and for an unavailable one.
    pub fn text(&self, name: &str) -> Option<Zeroizing<String>> {
        self.keys.read().get(name).and_then(|k| k.text.as_ref().ok().cloned())
    }

    /// Reads key file `path` (absolute, owner-only) as key `name` (replacing an unavailable key
    /// of that name).
    pub fn add(&self, name: &str, path: PathBuf) -> Result<(), KeyringError> {
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(KeyringError::BadName);
        }
        let text = read_key_file(&path)?;
        let shown = path.display().to_string();
        self.insert(name, KeyFile { path, text: Ok(text) })?;
        tracing::info!(name, path = shown, "key added to the keyring");
        Ok(())
    }

    /// Holds key `name` as unavailable: it was restored from the pool and its file could not
    /// be read (`why` names the path and the reason, never key text).
    pub fn add_unavailable(
        &self,
        name: &str,
        path: PathBuf,
        why: String,
    ) -> Result<(), KeyringError> {
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(KeyringError::BadName);
        }
        self.insert(name, KeyFile { path, text: Err(why) })
    }

    fn insert(&self, name: &str, key: KeyFile) -> Result<(), KeyringError> {
        let mut keys = self.keys.write();
        match keys.get(name) {
            Some(k) if k.text.is_ok() => return Err(KeyringError::Exists),
            Some(_) => {}
            None if keys.len() >= KEYS_MAX => return Err(KeyringError::Full),
            None => {}
        }
        keys.insert(name.to_string(), key);
        Ok(())
    }

    /// The file key `name` was read from.
    pub fn path(&self, name: &str) -> Option<String> {
        self.keys.read().get(name).map(|k| k.path.display().to_string())
    }

    pub fn remove(&self, name: &str) -> Result<(), KeyringError> {
        self.keys.write().remove(name).ok_or(KeyringError::NoKey)?;
        tracing::info!(name, "key removed from the keyring");
        Ok(())
    }

    pub fn list(&self) -> Vec<KeyInfo> {
        let keys = self.keys.read();
        keys.iter()
            .map(|(name, k)| KeyInfo {
                name: name.clone(),
                path: k.path.display().to_string(),
                unavailable: k.text.as_ref().err().cloned(),
            })
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

    fn key_file(tag: &str) -> (PathBuf, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("ballast-keyring-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        std::fs::write(&path, "NVMeTLSkey-1:01:secretsecret:\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        (dir, path)
    }

    #[test]
    fn holds_at_most_keys_max_keys_and_says_so() {
        let (dir, path) = key_file("full");
        let ring = Keyring::default();
        for i in 0..KEYS_MAX - 1 {
            ring.add(&format!("k{i}"), path.clone()).unwrap();
        }
        // An unavailable key counts too.
        ring.add_unavailable("gone", "/nonexistent".into(), "missing".into()).unwrap();
        assert_eq!(ring.list().len(), KEYS_MAX);
        let e = ring.add("one-more", path.clone()).unwrap_err();
        assert!(matches!(e, KeyringError::Full), "{e:?}");
        assert_eq!(e.to_string(), "the keyring holds 4096 keys already");
        assert!(matches!(
            ring.add_unavailable("x", "/x".into(), "y".into()),
            Err(KeyringError::Full)
        ));
        assert!(ring.text("one-more").is_none());
        // Replacing the unavailable key is no new key; removing one makes room again.
        ring.add("gone", path.clone()).unwrap();
        ring.remove("k0").unwrap();
        ring.add("one-more", path.clone()).unwrap();
        assert_eq!(ring.list().len(), KEYS_MAX);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unavailable_key_is_listed_with_why_resolves_to_nothing_and_can_be_added_again() {
        let (dir, path) = key_file("unavailable");
        let ring = Keyring::default();
        let why = KeyringError::Read {
            path: "/gone/k".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        ring.add_unavailable("k", "/gone/k".into(), why.to_string()).unwrap();
        assert!(ring.text("k").is_none());
        let listed = ring.list();
        assert_eq!(listed[0].path, "/gone/k");
        assert!(listed[0].unavailable.as_deref().unwrap().contains("/gone/k"));
        ring.add("k", path.clone()).unwrap();
        assert!(ring.text("k").is_some());
        assert!(ring.list()[0].unavailable.is_none());
        assert!(matches!(ring.add("k", path), Err(KeyringError::Exists)), "an available key stays");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
