//! The keyring: named secrets read from files, referenced by name elsewhere (a host's TLS PSK
//! in `nvmf_subsystem_add_host --psk NAME`). A leaf: its methods (SPDK's
//! `keyring_file_add_key`, `keyring_file_remove_key`, `keyring_get_keys`) are in
//! `rpc_keyring`; the pool keeps each key's name and path (`persist`), never its text.
//!
//! Invariants:
//! - a key file must be given by an absolute path, be readable by its owner only (mode 0600
//!   or stricter) and be owned by the daemon's user (or root), as SPDK's keyring_file
//!   requires; it is opened once, checked on that descriptor and read without blocking, at
//!   most `KEY_FILE_MAX` bytes; its text is read once, when added (or restored at start-up);
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
    #[error("key file {0}: not a regular file of at most 4096 bytes of text")]
    NotAKeyFile(String),
    #[error("key file {path} is owned by uid {uid}, not by the daemon's user or root")]
    Owner { path: String, uid: u32 },
    #[error("a key's text was given where its file's path belongs (not shown): give the path")]
    KeyTextForPath,
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

/// Whether `s` looks like a key's text (an NVMe TLS PSK or a DH-HMAC-CHAP secret in their
/// interchange formats): given where a name or a path belongs, it is refused without being
/// repeated in the error or the log.
pub fn looks_like_key_text(s: &str) -> bool {
    let s = s.trim_start();
    s.starts_with("NVMeTLSkey-") || s.starts_with("DHHC-")
}

/// The text of key file `path` (absolute; a regular file of at most `KEY_FILE_MAX` bytes,
/// owned by the daemon's user or root, readable by its owner only), trimmed. Opened once and
/// checked on that descriptor (what is read is what was checked); never blocks (a FIFO or a
/// /proc file is refused, not waited on); reads at most one byte past the bound.
fn read_key_file(path: &Path) -> Result<Zeroizing<String>, KeyringError> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let shown = path.display().to_string();
    if looks_like_key_text(&shown) {
        return Err(KeyringError::KeyTextForPath);
    }
    if !path.is_absolute() {
        return Err(KeyringError::RelativePath(shown));
    }
    let read_err = |source| KeyringError::Read { path: shown.clone(), source };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOCTTY).bits())
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyringError::Permissions { path: shown, mode });
    }
    // As SPDK's keyring_file: a file another user owns could be changed under us.
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(KeyringError::Owner { path: shown, uid: meta.uid() });
    }
    if !meta.is_file() || meta.len() > KEY_FILE_MAX {
        return Err(KeyringError::NotAKeyFile(shown));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(KEY_FILE_MAX as usize + 1));
    file.take(KEY_FILE_MAX + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > KEY_FILE_MAX {
        return Err(KeyringError::NotAKeyFile(shown));
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| KeyringError::NotAKeyFile(shown))?;
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

    /// What is read is a bounded regular file, checked on the descriptor read from: a FIFO is
    /// refused at once (not waited on), a file over the bound refused, key text given as a
    /// path refused without being repeated.
    #[test]
    fn key_files_are_read_without_blocking_and_within_the_bound() {
        let dir = std::env::temp_dir().join(format!("ballast-keyring-b-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ring = Keyring::default();
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let t0 = std::time::Instant::now();
        assert!(matches!(ring.add("f", fifo.clone()), Err(KeyringError::NotAKeyFile(_))));
        assert!(t0.elapsed() < std::time::Duration::from_secs(2), "a FIFO was waited on");
        let big = dir.join("big");
        std::fs::write(&big, vec![b'a'; 4097]).unwrap();
        std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(ring.add("b", big), Err(KeyringError::NotAKeyFile(_))));
        let text = "NVMeTLSkey-1:01:c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0:";
        let e = ring.add("t", text.into()).unwrap_err();
        assert!(matches!(e, KeyringError::KeyTextForPath));
        assert!(!e.to_string().contains("c2Vj"), "{e}");
        // A file another user owns (as root we can make one): refused, as SPDK refuses it.
        if nix::unistd::geteuid().is_root() {
            let theirs = dir.join("theirs");
            std::fs::write(&theirs, "x").unwrap();
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::os::unix::fs::chown(&theirs, Some(12345), None).unwrap();
            let e = ring.add("o", theirs).unwrap_err();
            assert!(matches!(e, KeyringError::Owner { uid: 12345, .. }), "{e}");
        }
        assert!(ring.list().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
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
