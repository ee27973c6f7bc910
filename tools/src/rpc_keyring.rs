//! The keyring's control methods, SPDK's names and shapes: `keyring_file_add_key`,
//! `keyring_file_remove_key`, `keyring_get_keys` (names and paths; never key text). A key's
//! name and path are kept in the pool (`persist`) before the method answers; adding a key
//! admits the hosts that were refused for want of it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::control::{Control, Method};
use crate::keyring::KeyringError;
use crate::persist::PersistError;
use crate::rpc_error::{
    invalid_parameters, params, DecodeStyle, RpcError, EEXIST, ENODEV, INTERNAL_ERROR,
};

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
    /// ballast's: why the key has no text (its file could not be read when the keyring was
    /// restored at start-up); hosts configured with it are refused until it is added again.
    #[serde(skip_serializing_if = "Option::is_none")]
    unavailable: Option<String>,
}

pub const METHODS: &[Method] = &[
    Method { name: "keyring_file_add_key", call: add_key },
    Method { name: "keyring_file_remove_key", call: remove_key },
    Method { name: "keyring_get_keys", call: get_keys },
];

/// SPDK's codes: -EEXIST for a name in use, -ENODEV for no such key, else invalid params.
fn rpc_err(e: KeyringError) -> RpcError {
    match e {
        KeyringError::Exists => RpcError::new(EEXIST, e.to_string()),
        KeyringError::NoKey => RpcError::new(ENODEV, e.to_string()),
        e => invalid_parameters(e),
    }
}

fn persist_err(e: PersistError) -> RpcError {
    match e {
        PersistError::Codec(e) => invalid_parameters(e),
        e => RpcError::new(INTERNAL_ERROR, e.to_string()),
    }
}

fn add_key(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let a: AddKey = params(p, DecodeStyle::Generic)?;
    let path = a.path.display().to_string();
    let _settings = control.settings.lock();
    control.keyring.add(&a.name, a.path).map_err(rpc_err)?;
    if let Err(e) = crate::persist::keep_key(control, &a.name, &path) {
        let _ = control.keyring.remove(&a.name);
        return Err(persist_err(e));
    }
    crate::host_auth::readmit_with(control, &a.name);
    Ok(json!(true))
}

fn remove_key(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let r: RemoveKey = params(p, DecodeStyle::Generic)?;
    let _settings = control.settings.lock();
    if control.keyring.path(&r.name).is_none() {
        return Err(rpc_err(KeyringError::NoKey));
    }
    crate::persist::forget_key(control, &r.name).map_err(persist_err)?;
    control.keyring.remove(&r.name).map_err(rpc_err)?;
    // Revoked at once, as SPDK's removed key is (ENOKEY to every later use): the hosts that
    // use it are refused (listed, keys cleared) and their live controllers end; adding a key
    // of that name again admits them with it (`readmit_with`).
    let users = crate::host_auth::users_of(control, &r.name);
    for ((nqn, host), names) in &users {
        if let Some(subsys) = control.target.subsystem(nqn) {
            crate::host_auth::refuse(control, &subsys, host, names);
            control.target.disconnect_host(nqn, host);
        }
    }
    if !users.is_empty() {
        let users: Vec<String> =
            users.iter().map(|((nqn, host), _)| format!("{host} on {nqn}")).collect();
        tracing::warn!(
            key = r.name,
            ?users,
            "key removed while hosts use it: they are refused (and disconnected) until a key of \
             that name is added again"
        );
        control.target.genctr.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(json!(true))
}

fn get_keys(control: &Control, _: &Value) -> Result<Value, RpcError> {
    let out: Vec<KeyEntry> = control
        .keyring
        .list()
        .into_iter()
        .map(|k| KeyEntry {
            name: k.name,
            removed: false,
            probed: true,
            refcnt: 1,
            path: k.path,
            module: "keyring_file",
            unavailable: k.unavailable,
        })
        .collect();
    Ok(json!(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_keyring_is_refused_with_spdk_invalid_params_saying_so() {
        let e = rpc_err(KeyringError::Full);
        assert_eq!(e.code, crate::rpc_error::INVALID_PARAMS);
        assert_eq!(e.message, "Invalid parameters: the keyring holds 4096 keys already");
        assert_eq!(rpc_err(KeyringError::Exists).code, EEXIST);
        assert_eq!(rpc_err(KeyringError::NoKey).code, ENODEV);
    }
}
