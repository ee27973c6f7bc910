//! The keyring: named secrets read from files, referenced by name elsewhere (a host's TLS PSK
//! in `nvmf_subsystem_add_host --psk NAME`). SPDK's method names and shapes:
//! `keyring_file_add_key`, `keyring_file_remove_key`, `keyring_get_keys`.
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
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::control::{Control, Method};
use crate::rpc_error::{invalid_parameters, params, DecodeStyle, RpcError, EEXIST, ENODEV};

/// Keys one daemon holds at most.
pub const KEYS_MAX: usize = 4096;
/// Longest key file read.
const KEY_FILE_MAX: u64 = 4096;

struct KeyFile {
    path: PathBuf,
    text: Zeroizing<String>,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddKey {
    name: String,
    path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveKey {
    name: String,
}

/// One key of `keyring_get_keys` (SPDK's fields; never the key).
#[derive(Serialize)]
struct KeyEntry {
    name: String,
    removed: bool,
    probed: bool,
    refcnt: u32,
    path: String,
    module: &'static str,
}

pub const METHODS: &[Method] = &[
    Method { name: "keyring_file_add_key", call: add_key },
    Method { name: "keyring_file_remove_key", call: remove_key },
    Method { name: "keyring_get_keys", call: get_keys },
];

fn add_key(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let a: AddKey = params(p, DecodeStyle::Generic)?;
    if a.name.is_empty() || a.name.len() > 256 {
        return Err(invalid_parameters("key name: 1 to 256 bytes"));
    }
    if !a.path.is_absolute() {
        return Err(invalid_parameters(format!(
            "Non-absolute paths are not allowed: {}",
            a.path.display()
        )));
    }
    let meta = std::fs::metadata(&a.path)
        .map_err(|e| invalid_parameters(format!("key file {}: {e}", a.path.display())))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(invalid_parameters(format!(
            "Invalid permissions for key file '{}': 0{mode:o} (chmod 600)",
            a.path.display()
        )));
    }
    if !meta.is_file() || meta.len() > KEY_FILE_MAX {
        return Err(invalid_parameters(format!(
            "key file {}: not a regular file of at most {KEY_FILE_MAX} bytes",
            a.path.display()
        )));
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(&a.path)
            .map_err(|e| invalid_parameters(format!("key file {}: {e}", a.path.display())))?,
    );
    let text = Zeroizing::new(text.trim().to_string());
    let mut keys = control.keyring.keys.write();
    if keys.contains_key(&a.name) {
        return Err(RpcError::new(EEXIST, "File exists"));
    }
    if keys.len() >= KEYS_MAX {
        return Err(invalid_parameters(format!("the keyring holds {KEYS_MAX} keys already")));
    }
    tracing::info!(name = a.name, path = %a.path.display(), "key added to the keyring");
    keys.insert(a.name, KeyFile { path: a.path, text });
    Ok(json!(true))
}

fn remove_key(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let r: RemoveKey = params(p, DecodeStyle::Generic)?;
    if control.keyring.keys.write().remove(&r.name).is_none() {
        return Err(RpcError::new(ENODEV, "No such device"));
    }
    tracing::info!(name = r.name, "key removed from the keyring");
    Ok(json!(true))
}

fn get_keys(control: &Control, _: &Value) -> Result<Value, RpcError> {
    let keys = control.keyring.keys.read();
    let out: Vec<KeyEntry> = keys
        .iter()
        .map(|(name, k)| KeyEntry {
            name: name.clone(),
            removed: false,
            probed: true,
            refcnt: 1,
            path: k.path.display().to_string(),
            module: "keyring_file",
        })
        .collect();
    Ok(json!(out))
}
