//! The keyring's control methods, SPDK's names and shapes: `keyring_file_add_key`,
//! `keyring_file_remove_key`, `keyring_get_keys` (names and paths; never key text).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::control::{Control, Method};
use crate::keyring::KeyringError;
use crate::rpc_error::{invalid_parameters, params, DecodeStyle, RpcError, EEXIST, ENODEV};

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

/// SPDK's codes: -EEXIST for a name in use, -ENODEV for no such key, else invalid params.
fn rpc_err(e: KeyringError) -> RpcError {
    match e {
        KeyringError::Exists => RpcError::new(EEXIST, e.to_string()),
        KeyringError::NoKey => RpcError::new(ENODEV, e.to_string()),
        e => invalid_parameters(e),
    }
}

fn add_key(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let a: AddKey = params(p, DecodeStyle::Generic)?;
    control.keyring.add(&a.name, a.path).map_err(rpc_err)?;
    Ok(json!(true))
}

fn remove_key(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let r: RemoveKey = params(p, DecodeStyle::Generic)?;
    control.keyring.remove(&r.name).map_err(rpc_err)?;
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
        })
        .collect();
    Ok(json!(out))
}
