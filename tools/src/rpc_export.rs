//! Ballast's own `export_*` methods: RAM and file exports added, listed, resized and removed at
//! run time. Each export is a registered device (NBD export and bdev of its name).
//!
//! Depends on the shared state (`control`, `registry`) and no other method module.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::control::{Control, Method};
use crate::registry;
use crate::rpc_error::{invalid, params, DecodeStyle, RpcError};

const G: DecodeStyle = DecodeStyle::Generic;

/// The `export_*` methods, each in one place: name and handler.
pub const METHODS: &[Method] = &[
    Method { name: "export_list", call: list },
    Method { name: "export_add", call: add },
    Method { name: "export_remove", call: remove },
    Method { name: "export_resize", call: resize },
];

/// `export_list`'s parameters: none.
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExportListParams {}

/// One entry of `export_list`'s result.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    pub name: String,
    pub size_bytes: u64,
    pub backend: String,
    pub read_only: bool,
    pub description: String,
    /// Served to NBD clients that ask for the empty name.
    pub default: bool,
}

/// `export_add`: exactly one of `ram_size` and `file` (with an optional `size` to create it).
#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ExportAddParams {
    pub name: String,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
}

/// `export_remove`.
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct ExportNameParams {
    pub name: String,
}

/// `export_resize`: `size` as `parse_size` reads it ("2G", "4096").
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct ExportResizeParams {
    pub name: String,
    pub size: String,
}

fn list(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let _: ExportListParams = params(p, G)?;
    let default = control.registry.default_name();
    let list: Vec<ExportEntry> = control
        .registry
        .list()
        .iter()
        .map(|d| ExportEntry {
            name: d.name.clone(),
            size_bytes: d.size_bytes(),
            backend: d.dev.info().backend.clone(),
            read_only: d.read_only,
            description: d.description.clone(),
            default: default.as_deref() == Some(d.name.as_str()),
        })
        .collect();
    Ok(json!(list))
}

fn add(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let a: ExportAddParams = params(p, G)?;
    let spec = match (&a.ram_size, &a.file, &a.size) {
        (Some(size), None, None) => format!("ram:{size}"),
        (None, Some(file), None) => format!("file:{file}"),
        (None, Some(file), Some(size)) => format!("file:{file}:{size}"),
        (Some(_), None, Some(_)) => return Err(invalid("size goes with file, not ram_size")),
        _ => return Err(invalid("give exactly one of ram_size or file")),
    };
    registry::add_export(&control.registry, &a.name, &spec, a.read_only, a.description)
        .map_err(|e| invalid(format!("{e:#}")))?;
    tracing::info!(export = a.name, backend = %spec, "export added");
    Ok(json!(true))
}

fn remove(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let r: ExportNameParams = params(p, G)?;
    let name = r.name.as_str();
    let device = control.registry.remove(name).map_err(|e| invalid(e.to_string()))?;
    if let Err(e) = device.dev.flush_blocking() {
        tracing::warn!(export = name, error = %e, "flush on removal failed");
    }
    tracing::info!(export = name, "export removed");
    Ok(json!(true))
}

/// Grows an export's device; NVMe hosts learn the new size through an asynchronous event.
fn resize(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let r: ExportResizeParams = params(p, G)?;
    let name = r.name.as_str();
    let bytes = ballast_engine::size::parse_size(&r.size).map_err(|e| invalid(e.to_string()))?;
    let device = control.registry.get(name);
    let device = device.ok_or_else(|| invalid(format!("no export named {name:?}")))?;
    device.dev.grow(bytes).map_err(|e| invalid(format!("resize {name}: {e}")))?;
    control.registry.namespaces_changed(name);
    tracing::info!(export = name, size_bytes = bytes, "export resized");
    Ok(json!(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_params_refuse_unknown_fields_and_name_missing_ones() {
        let e = params::<ExportAddParams>(&json!({"name": "a", "ram": "1M"}), G).unwrap_err();
        assert!(e.message.contains("unknown field `ram`"), "{e:?}");
        let e = params::<ExportResizeParams>(&json!({"name": "a"}), G).unwrap_err();
        assert!(e.message.contains("missing field `size`"), "{e:?}");
        let a: ExportAddParams = params(&json!({"name": "a", "ram_size": "1M"}), G).unwrap();
        assert_eq!((a.name.as_str(), a.ram_size.as_deref(), a.read_only), ("a", Some("1M"), false));
    }
}
