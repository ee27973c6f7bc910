//! Ballast's own `export_*` methods: RAM and file exports added, listed, resized and removed at
//! run time. Each export is a registered device (NBD export and bdev of its name). SPDK's
//! `bdev_malloc_*`, `bdev_aio_*` and `bdev_uring_*` create and delete the same exports, with
//! SPDK's parameters, results and errors (SPDK's tutorials run unchanged).
//!
//! Depends on the shared state (`control`, `registry`) and no other method module.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use std::sync::atomic::Ordering;

use crate::control::{Control, Method};
use crate::registry::{self, Backend, BdevShape, DeviceKind, RegistryError};
use crate::rpc_error::{
    invalid, no_such_device, params, DecodeStyle, RpcError, EEXIST, EINVAL, ENOENT, ENOMEM,
    INTERNAL_ERROR,
};

const G: DecodeStyle = DecodeStyle::Generic;

/// The `export_*` methods, each in one place: name and handler.
pub const METHODS: &[Method] = &[
    Method { name: "export_list", call: list },
    Method { name: "export_add", call: add },
    Method { name: "export_remove", call: remove },
    Method { name: "export_resize", call: resize },
    Method { name: "bdev_malloc_create", call: malloc_create },
    Method { name: "bdev_malloc_delete", call: |c, p| bdev_delete(c, p, DeviceKind::Ram) },
    Method { name: "bdev_aio_create", call: aio_create },
    Method { name: "bdev_aio_delete", call: |c, p| bdev_delete(c, p, DeviceKind::File) },
    Method { name: "bdev_uring_create", call: uring_create },
    Method { name: "bdev_uring_delete", call: |c, p| bdev_delete(c, p, DeviceKind::File) },
    Method { name: "bdev_aio_rescan", call: rescan },
    Method { name: "bdev_uring_rescan", call: rescan },
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
            read_only: d.read_only || d.dev.read_only(),
            description: d.description.clone(),
            default: default.as_deref() == Some(d.name.as_str()),
        })
        .collect();
    Ok(json!(list))
}

fn add(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let a: ExportAddParams = params(p, G)?;
    let size = |s: &str| ballast_engine::size::parse_size(s).map_err(|e| invalid(e.to_string()));
    // The file's path as given (never parsed for a trailing ":SIZE").
    let backend = match (&a.ram_size, &a.file, &a.size) {
        (Some(bytes), None, None) => match size(bytes)? {
            0 => return Err(invalid("ram export of size 0")),
            bytes => Backend::Ram(bytes),
        },
        (None, Some(file), None) => Backend::File { path: file.into(), size: None },
        (None, Some(file), Some(s)) => Backend::File { path: file.into(), size: Some(size(s)?) },
        (Some(_), None, Some(_)) => return Err(invalid("size goes with file, not ram_size")),
        _ => return Err(invalid("give exactly one of ram_size or file")),
    };
    let shape = BdevShape::default();
    registry::add_bdev(&control.registry, &a.name, &backend, a.read_only, a.description, shape)
        .map_err(|e| invalid(format!("{e:#}")))?;
    tracing::info!(export = a.name, %backend, "export added");
    Ok(json!(true))
}

fn remove(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let r: ExportNameParams = params(p, G)?;
    remove_device(control, &r.name)?;
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

/// `bdev_malloc_create`: SPDK's parameters. Metadata and protection information are refused;
/// the layout hints (physical block size, optimal I/O boundary, NUMA node) are accepted.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct MallocCreate {
    num_blocks: u64,
    block_size: u32,
    name: Option<String>,
    uuid: Option<String>,
    /// Layout hints, accepted and not used (a RAM export has no physical blocks or nodes).
    #[allow(dead_code)]
    physical_block_size: Option<u32>,
    #[allow(dead_code)]
    optimal_io_boundary: Option<u32>,
    #[allow(dead_code)]
    numa_id: Option<i32>,
    #[serde(default)]
    md_size: u32,
    #[serde(default)]
    md_interleave: bool,
    #[serde(default)]
    dif_type: u32,
    #[serde(default)]
    dif_is_head_of_md: bool,
    /// Only meaningful with a `dif_type`, which is refused.
    #[allow(dead_code)]
    dif_pi_format: Option<u32>,
}

/// `bdev_aio_create` and `bdev_uring_create` (which sends no `readonly`, `fallocate`, `nowait`):
/// an existing file or block device, served as a file export.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct FileCreate {
    filename: String,
    name: String,
    block_size: Option<u32>,
    uuid: Option<String>,
    #[serde(default)]
    readonly: bool,
    /// SPDK's opt-in to unmap and write zeroes through fallocate: ballast always does.
    #[serde(default)]
    fallocate: bool,
    #[serde(default)]
    nowait: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BdevName {
    name: String,
}

/// SPDK's answer to a bad value: -22 "Invalid argument" (its `spdk_strerror`), then ours.
fn invalid_argument(detail: impl std::fmt::Display) -> RpcError {
    RpcError::new(EINVAL, format!("Invalid argument: {detail}"))
}

/// The LBA sizes ballast's namespaces serve.
fn check_block_size(block_size: u32) -> Result<(), RpcError> {
    match block_size {
        512 | 4096 => Ok(()),
        b => Err(invalid_argument(format!("block_size {b}: ballast serves 512 or 4096"))),
    }
}

fn check_uuid(uuid: Option<&str>) -> Result<Option<String>, RpcError> {
    uuid.map(|u| {
        crate::lvstore::canonical_uuid(u).ok_or_else(|| invalid_argument(format!("uuid {u:?}")))
    })
    .transpose()
}

/// Registers the bdev. Errors as SPDK's malloc and aio modules answer them (`-errno` and its
/// text, then what failed): a taken name or UUID -17, a limit -12 (`--max-exports`,
/// `--ram-export-memory`), anything else -22.
fn create(
    control: &Control,
    name: &str,
    backend: &Backend,
    read_only: bool,
    shape: BdevShape,
) -> Result<Value, RpcError> {
    match registry::add_bdev(&control.registry, name, backend, read_only, String::new(), shape) {
        Ok(device) => {
            tracing::info!(bdev = name, %backend, uuid = device.uuid, "bdev created");
            Ok(json!(name))
        }
        Err(e) => Err(match e.downcast_ref::<RegistryError>() {
            Some(RegistryError::Exists(_) | RegistryError::UuidTaken { .. }) => {
                RpcError::new(EEXIST, format!("File exists: {e}"))
            }
            Some(RegistryError::TooManyExports { .. } | RegistryError::RamBudget { .. }) => {
                RpcError::new(ENOMEM, format!("Cannot allocate memory: {e}"))
            }
            _ => invalid_argument(format!("{e:#}")),
        }),
    }
}

fn malloc_create(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let m: MallocCreate = params(p, G)?;
    if m.md_size != 0 || m.md_interleave || m.dif_type != 0 || m.dif_is_head_of_md {
        return Err(invalid_argument("metadata and protection information are not supported"));
    }
    check_block_size(m.block_size)?;
    let bytes = m.num_blocks.checked_mul(u64::from(m.block_size)).filter(|b| *b > 0);
    let bytes = bytes.ok_or_else(|| invalid_argument(format!("num_blocks {}", m.num_blocks)))?;
    let name = match m.name {
        Some(n) => n,
        // SPDK's counter: the next MallocN, whether or not that name is free.
        None => format!("Malloc{}", control.malloc_names.fetch_add(1, Ordering::Relaxed)),
    };
    let shape = BdevShape { block_size: Some(m.block_size), uuid: check_uuid(m.uuid.as_deref())? };
    create(control, &name, &Backend::Ram(bytes), false, shape)
}

/// An existing file or block device, by the path as given (never parsed for a `:SIZE`).
fn file_create(control: &Control, f: FileCreate) -> Result<Value, RpcError> {
    if f.nowait {
        return Err(invalid_argument("nowait is not supported by ballast"));
    }
    let block_size = f.block_size.filter(|b| *b != 0);
    if let Some(b) = block_size {
        check_block_size(b)?;
    }
    if !std::path::Path::new(&f.filename).exists() {
        // SPDK opens an existing file or device only.
        return Err(RpcError::new(ENOENT, "No such file or directory"));
    }
    let shape = BdevShape { block_size, uuid: check_uuid(f.uuid.as_deref())? };
    let backend = Backend::File { path: f.filename.into(), size: None };
    create(control, &f.name, &backend, f.readonly, shape)
}

fn aio_create(control: &Control, p: &Value) -> Result<Value, RpcError> {
    file_create(control, params(p, G)?)
}

/// SPDK's uring module answers every failure with -32603 (its decoder's and its create's).
fn uring_create(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let f: FileCreate = params(p, DecodeStyle::Lvol)?;
    let detail = |e: RpcError| {
        RpcError::new(INTERNAL_ERROR, format!("Unable to create URING bdev.: {}", e.message))
    };
    if f.readonly || f.fallocate || f.nowait {
        return Err(detail(invalid_argument(
            "bdev_uring_create takes no readonly/fallocate/nowait",
        )));
    }
    file_create(control, f).map_err(detail)
}

/// `bdev_malloc_delete`, `bdev_aio_delete`, `bdev_uring_delete`: a bdev of that kind (else
/// SPDK's -19 "No such device"), removed as `export_remove` removes it.
fn bdev_delete(control: &Control, p: &Value, kind: DeviceKind) -> Result<Value, RpcError> {
    let b: BdevName = params(p, G)?;
    let device = control.registry.get(&b.name).filter(|d| d.kind == kind);
    if device.is_none() {
        return Err(no_such_device());
    }
    remove_device(control, &b.name)?;
    Ok(json!(true))
}

/// `bdev_aio_rescan`, `bdev_uring_rescan`: a file or block device grown from outside (`truncate`,
/// `lvextend`) is served at its new size; NVMe hosts of its namespaces hear of it (an
/// asynchronous event). Not a file bdev: -19; a medium that shrank: -22, the size kept.
fn rescan(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let b: BdevName = params(p, G)?;
    let device = control.registry.get(&b.name).filter(|d| d.kind == DeviceKind::File);
    let device = device.ok_or_else(no_such_device)?;
    let (old, new) =
        device.dev.rescan().map_err(|e| invalid_argument(format!("{}: {e}", b.name)))?;
    if new != old {
        control.registry.namespaces_changed(&b.name);
        tracing::info!(bdev = b.name, old, new, "bdev rescanned: new size");
    }
    Ok(json!(true))
}

/// Unregisters export `name` as SPDK unregisters a bdev: its NVMe namespaces are removed
/// first (hot-removed: their hosts hear of it), then its data is flushed where it has a
/// medium. NBD connections already open keep the device until they close.
fn remove_device(control: &Control, name: &str) -> Result<(), RpcError> {
    let settings = control.settings.lock();
    match control.registry.get(name) {
        None => return Err(invalid(format!("no export named {name:?}"))),
        Some(d) if d.kind == DeviceKind::Volume => {
            return Err(invalid(format!("{name:?} is a pool volume: bdev_lvol_delete deletes it")))
        }
        Some(_) => {}
    }
    crate::rpc_nvmf::remove_namespaces_of(control, name, &settings)?;
    let device = control.registry.remove(name).map_err(|e| invalid(e.to_string()))?;
    // The flush may take a while: other settings wait no longer than the removal.
    drop(settings);
    if let Err(e) = device.dev.flush_blocking() {
        tracing::warn!(export = name, error = %e, "flush on removal failed");
    }
    tracing::info!(export = name, "export removed");
    Ok(())
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
