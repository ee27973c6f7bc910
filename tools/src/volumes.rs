//! Pools and volumes in the daemon and the CLI: exporting a pool's volumes (NBD export and
//! NVMe/TCP subsystem per volume, named after it), the `bdev_lvol_*` control methods, and the
//! offline `ballast pool create|check|dump` tools.
//!
//! Every volume of the pool is exported under its name: NBD export `NAME`, NVMe subsystem
//! `nqn.2026-11.dev.ballast:NAME` with namespace 1 (serial and NGUID derive from the NQN, so they
//! are the same after every restart). Snapshots are exported read-only. The settings of a
//! volume's subsystem (hosts and their keys, listeners) are kept in the pool's configuration
//! (`persist`), so `ballast serve --pool DEV` alone restores everything.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ballast_engine::size::parse_size;
use ballast_engine::volume::dev::{PoolDisk, PoolHandle, PoolLock};
use ballast_engine::volume::format::{choose_superblock, Superblock, BLOCK_SIZE};
use ballast_engine::volume::pool::{Pool, PoolGeometry, SyncDisk};
use ballast_engine::volume::pool::{PoolError, PIECE};
use ballast_engine::BlockDev;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::control::{Control, Method};
use crate::lvstore;
use crate::registry::{Device, DeviceKind};
use crate::rpc_error::{
    invalid_argument, invalid_parameters, no_such_device, params, DecodeStyle, NoParams, RpcError,
    EEXIST, ENODEV, INTERNAL_ERROR, INVALID_PARAMS,
};

pub fn nqn_of(name: &str) -> String {
    format!("{}{name}", ballast_nvmf::NQN_PREFIX)
}

/// A fresh random pool identity (getrandom(2): no /dev needed, as in an empty chroot).
pub fn new_uuid() -> anyhow::Result<[u8; 16]> {
    let mut uuid = [0u8; 16];
    ballast_ffi::sys::random_bytes(&mut uuid)?;
    Ok(uuid)
}

/// Exports volume `name` over NBD and NVMe/TCP. Its subsystem starts with the startup access
/// settings (`--allow-host`), or, when the pool keeps settings for it, admitting no host until
/// they are applied (`persist::restore` at start-up, `persist::reapply` later).
pub fn export_volume(control: &Control, pool: &Arc<PoolHandle>, name: &str) -> anyhow::Result<()> {
    let dev = pool.device(name, false)?;
    let read_only = dev.info().read_only;
    let description = describe(pool, dev.id())?;
    let uuid = lvstore::ensure_volume_uuid(pool, name).or_else(|e| {
        tracing::warn!(volume = name, error = %e, "volume UUID not stored: it changes at restart");
        lvstore::random_uuid()
    })?;
    let dev: Arc<dyn BlockDev> = Arc::new(dev);
    let device = Device::new(name, uuid, DeviceKind::Volume, description, dev, read_only);
    if let Err(e) = device.qos.set(lvstore::volume_limits(pool, name)) {
        tracing::warn!(volume = name, error = %e, "kept rate limits refused: none applied");
    }
    control.registry.add(device)?;
    export_subsystem(control, name)
}

/// Makes volume `name`'s subsystem, its device (registered) as namespace 1.
fn export_subsystem(control: &Control, name: &str) -> anyhow::Result<()> {
    let nqn = nqn_of(name);
    let kept = crate::persist::has_settings(control, &nqn);
    let any = !kept && control.allow_hosts.is_empty();
    let subsys = control.target.create_subsystem(&nqn, any)?;
    if !kept {
        subsys.hosts.write().extend(control.allow_hosts.iter().cloned());
    }
    control.registry.add_namespace(&nqn, 1, None, name, 4096)?;
    Ok(())
}

/// What `nbdinfo --list` says of volume `id`: a volume, or a snapshot or clone of its parent.
fn describe(pool: &PoolHandle, id: u32) -> Result<String, PoolError> {
    let m = pool.meta();
    let v = m.volume(id)?;
    Ok(match m.volume(v.parent) {
        Ok(p) if v.read_only => format!("snapshot of {}", p.name),
        Ok(p) => format!("clone of {}", p.name),
        Err(_) => "volume".to_string(),
    })
}

/// Brings the description of volume `id`'s export `name` up to date (its parent renamed, or
/// forgotten), if that export is the volume's (an export of another kind named like it is
/// not).
fn redescribe(control: &Control, pool: &PoolHandle, id: u32, name: &str) {
    let uuid = lvstore::volume_uuid(pool, name);
    let exported = control.registry.get(name).filter(|d| d.kind == DeviceKind::Volume);
    if exported.is_none_or(|d| Some(&d.uuid) != uuid.as_ref()) {
        return;
    }
    let description = describe(pool, id).unwrap_or_else(|_| "volume".into());
    if let Err(e) = control.registry.rename(name, name, description) {
        tracing::warn!(volume = name, error = %e, "description not updated");
    }
}

/// Removes volume `name`'s exports (open connections keep their device until they close).
pub fn unexport_volume(control: &Control, name: &str) {
    let _ = control.registry.remove(name);
    unexport_subsystem(control, name);
}

/// Deletes volume `name`'s subsystem (its hosts are disconnected).
fn unexport_subsystem(control: &Control, name: &str) {
    let nqn = nqn_of(name);
    let _ = control.registry.delete_subsystem(&nqn);
    control.host_keys.write().retain(|(n, _), _| *n != nqn);
}

/// Makes volume `name`'s subsystem again with the settings the pool keeps for it (logged,
/// not answered: the pool's state is already right, a restart would make it so).
fn reexport_subsystem(control: &Control, name: &str) {
    if let Err(e) = export_subsystem(control, name) {
        tracing::warn!(volume = name, error = %format!("{e:#}"), "volume's subsystem not made");
    }
    crate::persist::reapply(control, &nqn_of(name));
}

/// Exports every volume of `pool`.
pub fn export_all(control: &Control, pool: &Arc<PoolHandle>) -> anyhow::Result<()> {
    for v in pool.list() {
        export_volume(control, pool, &v.name).with_context(|| format!("exporting {}", v.name))?;
    }
    Ok(())
}

fn pool(control: &Control) -> Result<&Arc<PoolHandle>, RpcError> {
    // SPDK with no lvol store answers a lookup with -ENODEV.
    control.pool.as_ref().ok_or_else(|| {
        RpcError::new(ENODEV, "No such device: this daemon serves no pool (start it with --pool)")
    })
}

/// A size as bytes (number) or a string like "10G" (ballast's CLI); SPDK sends `size_in_mib`.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeParam {
    Bytes(u64),
    Text(String),
}

fn size_bytes(size_in_mib: Option<u64>, size: Option<&SizeParam>) -> Result<u64, RpcError> {
    match (size_in_mib, size) {
        (Some(mib), None) => {
            mib.checked_mul(1 << 20).ok_or_else(|| invalid_parameters("size_in_mib too large"))
        }
        (None, Some(SizeParam::Bytes(b))) => Ok(*b),
        (None, Some(SizeParam::Text(s))) => parse_size(s).map_err(invalid_parameters),
        (None, None) => Err(invalid_parameters("missing size_in_mib (or size)")),
        (Some(_), Some(_)) => Err(invalid_parameters("give size_in_mib or size, not both")),
    }
}

/// `bdev_lvol_get_lvstores`, `bdev_lvol_delete_lvstore`-style store selection.
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LvstoreSelect {
    pub uuid: Option<String>,
    pub lvs_name: Option<String>,
}

/// `bdev_lvol_set_copy_rate` (ballast's): the pace of decoupling and inflating, in MiB per
/// second (0: unpaced), for the store named (or the one store, named by neither).
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LvstoreCopyRate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lvs_name: Option<String>,
    pub mbytes_per_sec: u64,
}

/// The fastest pace `bdev_lvol_set_copy_rate` and `serve --copy-rate` take, MiB/s (16 TiB/s:
/// past any media; only 0 means unpaced).
pub const COPY_RATE_MAX_MIB: u64 = 1 << 24;

/// `bdev_lvol_get_lvols` (SPDK names the selectors differently here).
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LvolsSelect {
    pub lvs_uuid: Option<String>,
    pub lvs_name: Option<String>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LvolCreate {
    #[serde(alias = "name")]
    pub lvol_name: String,
    pub size_in_mib: Option<u64>,
    pub size: Option<SizeParam>,
    /// `false` (SPDK's default, what spdk-rpc sends without `-t`): thick, every cluster taken
    /// at once (-28 when the pool lacks them), so its writes never find the pool full; `true`:
    /// thin. The CLI makes thin volumes unless asked `--thick`.
    #[serde(default)]
    pub thin_provision: bool,
    /// Accepted and ignored: new clusters always read as zeroes.
    #[allow(dead_code)]
    pub clear_method: Option<String>,
    #[allow(dead_code)]
    pub lvol_priority_class: Option<i32>,
    pub uuid: Option<String>,
    pub lvs_name: Option<String>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LvolSnapshot {
    #[serde(alias = "volume")]
    pub lvol_name: String,
    #[serde(alias = "name")]
    pub snapshot_name: String,
    /// Ballast's CLI: answer `{name, uuid, micros}` instead of SPDK's bare UUID.
    #[serde(default)]
    pub report_micros: bool,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LvolClone {
    #[serde(alias = "snapshot")]
    pub snapshot_name: String,
    #[serde(alias = "name")]
    pub clone_name: String,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LvolRollback {
    #[serde(alias = "lvol_name")]
    pub name: String,
    #[serde(alias = "snapshot")]
    pub snapshot_name: String,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LvolResize {
    #[serde(alias = "lvol_name")]
    pub name: String,
    pub size_in_mib: Option<u64>,
    pub size: Option<SizeParam>,
    #[serde(default)]
    pub force: bool,
}

/// `bdev_lvol_rename`.
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LvolRename {
    pub old_name: String,
    pub new_name: String,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LvolName {
    #[serde(alias = "lvol_name")]
    pub name: String,
}

/// `bdev_lvol_get_changes` (ballast's): where volume `name` may read differently from `base`,
/// another volume of its family (a snapshot it came from, say), from `offset` on; without
/// `base`, where it is written at all (what a full copy must take: Kubernetes' CSI snapshot
/// metadata calls the two "delta" and "allocated").
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LvolChanges {
    #[serde(alias = "lvol_name")]
    pub name: String,
    pub base: Option<String>,
    #[serde(default)]
    pub offset: u64,
    /// Bytes to look at (default: to the end of the volume).
    pub length: Option<u64>,
    /// The most runs (changed or not) one call walks (default and cap: `CHANGES_MAX`); the
    /// reply's `next_offset` says where the next call goes on.
    pub max_extents: Option<u64>,
}

/// Runs (changed or not) at most one `bdev_lvol_get_changes` call walks (bounding its reply and
/// the time it borrows the pool state).
pub const CHANGES_MAX: u64 = 4096;

/// One `bdev_lvol_get_changes` reply.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct ChangesReply {
    /// The volume's size in bytes.
    pub size: u64,
    /// The changed extents, in order: (offset, length).
    pub extents: Vec<ChangedExtent>,
    /// Where the next call goes on (`offset`), if this one stopped at `max_extents` runs.
    pub next_offset: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct ChangedExtent {
    pub offset: u64,
    pub length: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenameLvstore {
    old_name: String,
    new_name: String,
}

/// SPDK's `vbdev_get_lvol_store_by_uuid_xor_name`: both given is -EINVAL, a store that is not
/// this pool is -ENODEV. Neither given selects the pool (SPDK requires one; ballast has one).
fn check_lvstore(
    pool: &PoolHandle,
    uuid: Option<&str>,
    lvs_name: Option<&str>,
) -> Result<(), RpcError> {
    match (uuid, lvs_name) {
        (Some(_), Some(_)) => Err(invalid_argument()),
        (Some(u), None) if !lvstore::is_lvs_uuid(pool, u) => Err(no_such_device()),
        (None, Some(n)) if n != lvstore::lvs_name(pool) => Err(no_such_device()),
        _ => Ok(()),
    }
}

/// The volume an SPDK bdev name (alias, UUID or plain name) names, or SPDK's -ENODEV.
fn lvol(control: &Control, name: &str) -> Result<String, RpcError> {
    control.registry.resolve_volume(name).map(|d| d.name.clone()).ok_or_else(no_such_device)
}

/// A pool refusal as SPDK words the errno behind it.
fn pool_err(e: PoolError) -> RpcError {
    match e {
        PoolError::NoName(_) | PoolError::NoVolume(_) => no_such_device(),
        PoolError::NameTaken(_) => RpcError::new(EEXIST, format!("File exists: {e}")),
        PoolError::NoSpace | PoolError::Overprovisioned { .. } => {
            RpcError::new(-28, format!("No space left on device: {e}"))
        }
        PoolError::Busy(_) | PoolError::Decoupling(_) | PoolError::DecouplesBusy { .. } => {
            RpcError::new(-16, format!("Device or resource busy: {e}"))
        }
        other => invalid_parameters(other),
    }
}

/// A refusal of the lvol methods SPDK answers from their completion callbacks (snapshot, clone,
/// resize): -32602 with the errno's text (`rpc_bdev_lvol_snapshot_cb` and its kind), where
/// `bdev_lvol_create` answers the errno itself.
fn pool_err_cb(e: PoolError) -> RpcError {
    let r = pool_err(e);
    if (-200..0).contains(&r.code) {
        RpcError::new(crate::rpc_error::INVALID_PARAMS, r.message)
    } else {
        r
    }
}

fn internal(e: impl std::fmt::Display) -> RpcError {
    RpcError::new(INTERNAL_ERROR, e.to_string())
}

/// Exports a new volume and gives it its UUID (which the SPDK methods answer with).
fn publish(control: &Control, pool: &Arc<PoolHandle>, name: &str) -> Result<String, RpcError> {
    let uuid = lvstore::assign_volume_uuid(pool, name).map_err(internal)?;
    let nqn = nqn_of(name);
    let _settings = control.settings.lock();
    if crate::persist::has_settings(control, &nqn) {
        // Left by an earlier volume of this name whose deletion could not forget them.
        crate::persist::forget_subsystem(control, &nqn).map_err(internal)?;
    }
    export_volume(control, pool, name).map_err(|e| internal(format!("{e:#}")))?;
    Ok(uuid)
}

/// One entry of `bdev_lvol_get_lvstores`: SPDK's fields, then ballast's own (`pool info` shows
/// them all).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LvstoreEntry {
    pub uuid: String,
    pub name: String,
    /// The pool's path.
    pub base_bdev: String,
    pub total_data_clusters: u64,
    pub free_clusters: u64,
    pub block_size: u64,
    pub cluster_size: u64,
    /// Ballast's `PoolInfo` fields (path, data_bytes, used_bytes, free_bytes, volumes, ...).
    #[serde(flatten)]
    pub pool: serde_json::Map<String, Value>,
}

fn lvstore_entry(pool: &PoolHandle) -> LvstoreEntry {
    let info = pool.info();
    let cluster = info.cluster_bytes.max(1);
    let mut entry = LvstoreEntry {
        uuid: lvstore::lvs_uuid(pool),
        name: lvstore::lvs_name(pool),
        base_bdev: info.path.clone(),
        total_data_clusters: info.data_bytes / cluster,
        free_clusters: info.free_bytes / cluster,
        block_size: PIECE,
        cluster_size: info.cluster_bytes,
        pool: serde_json::Map::new(),
    };
    if let Ok(Value::Object(ours)) = serde_json::to_value(&info) {
        // SPDK's names win where both have one (`uuid`: the same value).
        let spdk = ["uuid", "name", "base_bdev", "total_data_clusters", "free_clusters"];
        let spdk = [&spdk[..], &["block_size", "cluster_size"]].concat();
        entry.pool = ours.into_iter().filter(|(k, _)| !spdk.contains(&k.as_str())).collect();
    }
    entry
}

/// `{name, uuid}` of an lvol's store.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LvsRef {
    pub name: String,
    pub uuid: String,
}

/// One entry of `bdev_lvol_get_lvols`: SPDK's fields, then ballast's.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LvolEntry {
    pub alias: String,
    pub uuid: Option<String>,
    pub name: String,
    pub is_thin_provisioned: bool,
    pub is_snapshot: bool,
    pub is_clone: bool,
    pub is_esnap_clone: bool,
    pub is_degraded: bool,
    pub lvs: LvsRef,
    pub id: u32,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    pub read_only: bool,
    pub snapshot: bool,
    pub parent: Option<String>,
}

fn lvol_entries(pool: &PoolHandle) -> Vec<LvolEntry> {
    let lvs = LvsRef { name: lvstore::lvs_name(pool), uuid: lvstore::lvs_uuid(pool) };
    let all = pool.list();
    all.iter()
        .map(|v| {
            let parent_is_snapshot = v
                .parent
                .as_ref()
                .is_some_and(|p| all.iter().any(|o| &o.name == p && o.snapshot) && !v.snapshot);
            LvolEntry {
                alias: lvstore::alias(pool, &v.name),
                uuid: lvstore::volume_uuid(pool, &v.name),
                name: v.name.clone(),
                is_thin_provisioned: !v.thick,
                is_snapshot: v.snapshot,
                is_clone: parent_is_snapshot,
                is_esnap_clone: false,
                is_degraded: false,
                lvs: lvs.clone(),
                id: v.id,
                size_bytes: v.size_bytes,
                allocated_bytes: v.allocated_bytes,
                read_only: v.read_only,
                snapshot: v.snapshot,
                parent: v.parent.clone(),
            }
        })
        .collect()
}

const L: DecodeStyle = DecodeStyle::Lvol;

/// The `bdev_lvol_*` methods, each in one place: name and handler.
pub const METHODS: &[Method] = &[
    Method { name: "bdev_lvol_get_lvstores", call: get_lvstores },
    Method { name: "bdev_lvol_get_lvols", call: get_lvols },
    Method { name: "bdev_lvol_rename_lvstore", call: rename_lvstore },
    Method { name: "bdev_lvol_create", call: create },
    Method { name: "bdev_lvol_snapshot", call: snapshot },
    Method { name: "bdev_lvol_clone", call: clone },
    Method { name: "bdev_lvol_rollback", call: rollback },
    Method { name: "bdev_lvol_resize", call: resize },
    Method { name: "bdev_lvol_set_read_only", call: set_read_only },
    Method { name: "bdev_lvol_inflate", call: inflate },
    Method { name: "bdev_lvol_decouple_parent", call: decouple_parent },
    Method { name: "bdev_lvol_rename", call: rename },
    Method { name: "bdev_lvol_delete", call: delete },
    Method { name: "bdev_lvol_check", call: check },
    Method { name: "bdev_lvol_grow_lvstore", call: grow_lvstore },
    Method { name: "bdev_lvol_set_copy_rate", call: set_copy_rate },
    Method { name: "bdev_lvol_get_changes", call: get_changes },
];

fn get_lvstores(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let sel: LvstoreSelect = params(p, L)?;
    if control.pool.is_none() && sel.uuid.is_none() && sel.lvs_name.is_none() {
        return Ok(json!([])); // SPDK with no lvol store lists none
    }
    let pool = pool(control)?;
    check_lvstore(pool, sel.uuid.as_deref(), sel.lvs_name.as_deref())?;
    Ok(json!([lvstore_entry(pool)]))
}

fn get_lvols(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let sel: LvolsSelect = params(p, L)?;
    if control.pool.is_none() && sel.lvs_uuid.is_none() && sel.lvs_name.is_none() {
        return Ok(json!([]));
    }
    let pool = pool(control)?;
    check_lvstore(pool, sel.lvs_uuid.as_deref(), sel.lvs_name.as_deref())?;
    Ok(json!(lvol_entries(pool)))
}

fn rename_lvstore(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let pool = pool(control)?;
    let r: RenameLvstore = params(p, L)?;
    if r.old_name != lvstore::lvs_name(pool) {
        let msg = format!("Lvol store {} not found", r.old_name);
        return Err(RpcError::new(-2, msg));
    }
    if r.new_name.is_empty() || r.new_name.contains('/') || r.new_name.len() > 64 {
        return Err(invalid_parameters("lvol store name: 1 to 64 bytes, no '/'"));
    }
    lvstore::set_lvs_name(pool, &r.new_name).map_err(internal)?;
    tracing::info!(from = r.old_name, to = r.new_name, "lvol store renamed");
    Ok(json!(true))
}

fn create(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let pool = pool(control)?;
    let c: LvolCreate = params(p, L)?;
    check_lvstore(pool, c.uuid.as_deref(), c.lvs_name.as_deref())?;
    let size = size_bytes(c.size_in_mib, c.size.as_ref())?;
    let name = c.lvol_name.as_str();
    pool.create_volume_as(name, size, !c.thin_provision).map_err(pool_err)?;
    let uuid = publish(control, pool, name)?;
    let thin = c.thin_provision;
    tracing::info!(volume = name, uuid, size_bytes = size, thin, "volume created");
    Ok(json!(uuid))
}

fn snapshot(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let pool = pool(control)?;
    let s: LvolSnapshot = params(p, L)?;
    let of = lvol(control, &s.lvol_name)?;
    let name = s.snapshot_name.as_str();
    let t = std::time::Instant::now();
    pool.snapshot(&of, name).map_err(pool_err_cb)?;
    let us = t.elapsed().as_micros() as u64;
    let uuid = publish(control, pool, name)?;
    tracing::info!(volume = of, snapshot = name, uuid, micros = us, "snapshot created");
    if s.report_micros {
        return Ok(json!({"name": name, "uuid": uuid, "micros": us}));
    }
    Ok(json!(uuid))
}

fn clone(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let pool = pool(control)?;
    let c: LvolClone = params(p, L)?;
    let of = lvol(control, &c.snapshot_name)?;
    let name = c.clone_name.as_str();
    pool.clone_volume(&of, name).map_err(pool_err_cb)?;
    let uuid = publish(control, pool, name)?;
    tracing::info!(snapshot = of, clone = name, uuid, "clone created");
    Ok(json!(uuid))
}

fn rollback(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let pool = pool(control)?;
    let r: LvolRollback = params(p, L)?;
    let (name, to) = (lvol(control, &r.name)?, lvol(control, &r.snapshot_name)?);
    pool.rollback(&name, &to).map_err(pool_err)?;
    tracing::info!(volume = name, snapshot = to, "volume rolled back");
    Ok(json!(true))
}

fn resize(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let pool = pool(control)?;
    let r: LvolResize = params(p, L)?;
    let name = lvol(control, &r.name)?;
    let size = size_bytes(r.size_in_mib, r.size.as_ref())?;
    pool.resize(&name, size, r.force).map_err(pool_err_cb)?;
    control.registry.namespaces_changed(&name);
    tracing::info!(volume = name, size_bytes = size, "volume resized");
    Ok(json!(true))
}

/// `bdev_lvol_set_read_only`: volume `name` takes no more writes, for good (durable when this
/// answers); it may be cloned as a snapshot is. Its exports follow at once: NBD clients that
/// connect from now on see it read-only, those already connected have their writes refused
/// (EPERM), and NVMe hosts are told its namespaces changed (Identify then says write
/// protected, NSATTR bit 0; writes are refused as Namespace is Write Protected). As SPDK:
/// true; a volume already read-only is no error.
fn set_read_only(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let pool = pool(control)?;
    let r: LvolName = params(p, L)?;
    let name = lvol(control, &r.name)?;
    pool.set_read_only(&name).map_err(pool_err_cb)?;
    control.registry.namespaces_changed(&name);
    tracing::info!(volume = name, "volume made read-only");
    Ok(json!(true))
}

/// `bdev_lvol_inflate`: volume `name` (name, alias or UUID) gets a cluster of its own for
/// every one it shares with its parent snapshot (or any other volume of its family: a
/// snapshot of it, its origin), copied, and for every one it leaves unmapped (reading
/// zeros): thick, and no clone any more. Its I/O goes on meanwhile; durable when this
/// answers. As SPDK: true; -32602 with the reason otherwise (read-only, pool full — what was
/// copied stays copied, harmlessly —, still shared after `DECOUPLE_PASSES` snapshots taken
/// meanwhile).
fn inflate(control: &Control, p: &Value) -> Result<Value, RpcError> {
    decouple_volume(control, p, true)
}

/// `bdev_lvol_decouple_parent`: as `bdev_lvol_inflate`, but only shared clusters are copied
/// (what the volume leaves unmapped stays so: it stays thin). A volume with no parent that
/// shares nothing is refused, as SPDK refuses a blob with no parent (-32602).
fn decouple_parent(control: &Control, p: &Value) -> Result<Value, RpcError> {
    decouple_volume(control, p, false)
}

fn decouple_volume(control: &Control, p: &Value, inflate: bool) -> Result<Value, RpcError> {
    let pool = pool(control)?;
    let r: LvolName = params(p, L)?;
    let name = lvol(control, &r.name)?;
    let started = std::time::Instant::now();
    let (id, copied) = pool.decouple(&name, inflate).map_err(|e| match e {
        PoolError::StillShared { .. } => {
            RpcError::new(INVALID_PARAMS, format!("Device or resource busy: {e}"))
        }
        e => pool_err_cb(e),
    })?;
    // Its exports describe it as a volume now, not a clone — under the name it has now (a
    // rename may have come meanwhile). The state's shared borrow ends before `describe`
    // borrows it exclusively.
    let now = pool.meta_shared().volume(id).map(|v| v.name.clone());
    if let Ok(now) = now {
        redescribe(control, pool, id, &now);
    }
    tracing::info!(
        volume = name,
        inflate,
        clusters_copied = copied,
        ms = started.elapsed().as_millis() as u64,
        "volume decoupled from its parent"
    );
    Ok(json!(true))
}

/// `bdev_lvol_rename`: volume `old_name` (name, alias or UUID) is called `new_name` from now
/// on (durable when this answers), keeping its data, UUID, family and rate limits. Its
/// exports follow the name: the NBD export `new_name` (connections open on the old one serve
/// on), the subsystem `nqn...:new_name` with every setting the pool keeps for the old one
/// (hosts and their key names, listeners, ANA states, namespaces added to it); hosts
/// connected to the old subsystem are disconnected and connect to the new NQN. Namespaces of
/// other subsystems made from it serve on and are listed under the new name. The settings
/// move in the rename's own commit, so a crash keeps either name with its settings. As
/// SPDK: true; -32602 `File exists` for a name taken, -19 for no such volume. Refused while
/// its subsystem has reservation registrants (-32602 `Device or resource busy`).
fn rename(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let pool = pool(control)?;
    let r: LvolRename = params(p, L)?;
    let new = r.new_name.as_str();
    // Looked up under the lock: a rename or delete of the same volume finished meanwhile
    // leaves nothing to find.
    let _settings = control.settings.lock();
    let old = lvol(control, &r.old_name)?;
    if old == new {
        return Ok(json!(true));
    }
    let (old_nqn, new_nqn) = (nqn_of(&old), nqn_of(new));
    refuse_rename(control, &old, new, &new_nqn)?;
    let id = pool.meta().find(&old).map_err(pool_err)?;
    if let Some(why) = pool.meta().failed() {
        return Err(pool_err(PoolError::Failed(why.to_string())));
    }
    if let Some(taken) = name_in_use(control, pool, new, &new_nqn) {
        return Err(RpcError::new(INVALID_PARAMS, format!("File exists: {taken}")));
    }
    let gone = control.target.subsystem(&old_nqn);
    if let Some(busy) = gone.as_deref().and_then(reservations_held) {
        return Err(busy);
    }
    // Its subsystem goes first (its hosts disconnect, its reservation tables save no more),
    // so that nothing changes what it keeps while the entries to move are read. A host that
    // registered since the look above refuses the rename after all: the subsystem is made
    // again with what it keeps (a registration not kept, without PTPL, is lost then).
    unexport_subsystem(control, &old);
    // Made again on a refusal from here on (only if it was there: one deleted at runtime
    // stays deleted until the next start, as it would without the rename).
    let restore = |e: RpcError| {
        if gone.is_some() {
            reexport_subsystem(control, &old);
        }
        e
    };
    if let Some(busy) = gone.as_deref().and_then(reservations_held) {
        return Err(restore(busy));
    }
    let (moved, (mut before, mut after)) = {
        let m = pool.meta();
        let config = m.config();
        let uuid = config.get(&lvstore::uuid_key(&old)).map(String::as_str);
        (
            crate::pool_config::renaming(config, &old, new, uuid),
            lvstore::renaming(config, &old, new),
        )
    };
    let moved = moved.map_err(invalid_parameters).map_err(restore)?;
    before.extend(moved.before);
    after.extend(moved.after);
    pool.rename(&old, new, before, after).map_err(pool_err_cb).map_err(restore)?;
    // Durable: the exports follow. Failures from here on are the live state's alone (a
    // restart serves everything under the new name), so they are logged, not answered.
    let description = describe(pool, id).unwrap_or_else(|_| "volume".into());
    if let Err(e) = control.registry.rename(&old, new, description) {
        tracing::warn!(volume = new, was = old, error = %e, "renamed volume not re-registered");
    }
    // Its snapshots and clones are described by its name.
    let children: Vec<(u32, String)> = {
        let m = pool.meta();
        m.volumes()
            .iter()
            .filter(|(_, v)| v.parent == id)
            .map(|(c, v)| (*c, v.name.clone()))
            .collect()
    };
    for (child, name) in children {
        redescribe(control, pool, child, &name);
    }
    reexport_subsystem(control, new);
    tracing::info!(volume = new, was = old, nqn = new_nqn, "volume renamed");
    Ok(json!(true))
}

/// Why volume `old` may not be called `new`, before anything changes: not a name, an NQN too
/// long, NBD access or the default export set at startup by name.
fn refuse_rename(control: &Control, old: &str, new: &str, new_nqn: &str) -> Result<(), RpcError> {
    if !ballast_engine::volume::meta::valid_name(new) {
        return Err(pool_err_cb(PoolError::BadName(new.into())));
    }
    if new_nqn.len() > ballast_nvmf::subsys::NQN_MAX {
        return Err(invalid_parameters(format!(
            "{new:?} would name subsystem {new_nqn:?}, longer than an NQN may be ({} bytes)",
            ballast_nvmf::subsys::NQN_MAX
        )));
    }
    let nbd = control.registry.nbd_exports();
    if nbd.allowed(old) != nbd.allowed(new) {
        return Err(invalid_parameters(format!(
            "NBD access to {old:?} is set by --nbd-tls-allow at startup, differently for \
             {new:?}: give both names the same identities there (and restart) before renaming"
        )));
    }
    if control.default_export.as_deref() == Some(old) {
        return Err(invalid_parameters(format!(
            "{old:?} is the default NBD export (--default-export): the next start would find \
             no export of that name; start without it (or naming another) before renaming"
        )));
    }
    Ok(())
}

/// What already answers to name `new`: a volume, another device or its export, a subsystem
/// of its NQN live or made at runtime and kept.
fn name_in_use(control: &Control, pool: &PoolHandle, new: &str, new_nqn: &str) -> Option<String> {
    if pool.meta().find(new).is_ok() {
        return Some(format!("a volume named {new:?} already exists"));
    }
    if control.registry.get(new).is_some() {
        return Some(format!("an export named {new:?} already exists"));
    }
    if control.target.subsystem(new_nqn).is_some() {
        return Some(format!("subsystem {new_nqn:?} already exists"));
    }
    if crate::pool_config::anchor_of(pool.meta().config(), new_nqn).is_some_and(|a| a.created) {
        return Some(format!("subsystem {new_nqn:?} is kept in the pool"));
    }
    None
}

/// The refusal of a rename while volume's subsystem `subsys` holds NVMe reservations: a
/// reservation table is bound to its namespace's NGUID, which derives from the NQN.
fn reservations_held(subsys: &ballast_nvmf::subsys::Subsystem) -> Option<RpcError> {
    let held = subsys
        .namespaces()
        .iter()
        .find(|(_, ns)| !ns.resv.status().registrants.is_empty())
        .map(|(nsid, _)| *nsid);
    held.map(|nsid| {
        RpcError::new(
            INVALID_PARAMS,
            format!(
                "Device or resource busy: namespace {nsid} of {} has NVMe reservation \
                 registrants (they go with its NQN): unregister them before renaming",
                subsys.nqn
            ),
        )
    })
}

fn delete(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let pool = pool(control)?;
    let d: LvolName = params(p, L)?;
    let name = lvol(control, &d.name)?;
    let settings = control.settings.lock();
    unexport_volume(control, &name);
    if let Err(e) = pool.delete(&name) {
        // Put the exports back, with their kept settings: the volume is still there.
        if export_volume(control, pool, &name).is_ok() {
            crate::persist::reapply(control, &nqn_of(&name));
        }
        return Err(pool_err(e));
    }
    // Namespaces made from it in other subsystems go too (SPDK hot-removes them).
    if let Err(e) = crate::rpc_nvmf::remove_namespaces_of(control, &name, &settings) {
        tracing::warn!(volume = name, error = %e.message, "its namespaces elsewhere not all forgotten");
    }
    if let Err(e) = crate::persist::forget_subsystem(control, &nqn_of(&name)) {
        tracing::warn!(
            volume = name,
            error = %e,
            "the deleted volume's subsystem settings stay in the pool (a new volume of that \
             name starts without them)"
        );
    }
    lvstore::forget_volume(pool, &name);
    tracing::info!(volume = name, "volume deleted");
    Ok(json!(true))
}

/// `bdev_lvol_grow_lvstore`: the pool's file or block device was grown from outside
/// (`truncate`, `lvextend`); its data area takes the new room (durable when this answers).
/// As SPDK: the store by `uuid` or `lvs_name`, exactly one; true.
fn grow_lvstore(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let pool = pool(control)?;
    let sel: LvstoreSelect = params(p, L)?;
    if sel.uuid.is_none() && sel.lvs_name.is_none() {
        return Err(invalid_argument());
    }
    check_lvstore(pool, sel.uuid.as_deref(), sel.lvs_name.as_deref())?;
    let (before, after) = pool.grow().map_err(pool_err_cb)?;
    tracing::info!(before, after, "lvol store grown: data bytes");
    Ok(json!(true))
}

/// `bdev_lvol_set_copy_rate` (ballast's): every decoupling and inflation of the pool, those in
/// progress included, copies at most `mbytes_per_sec` MiB/s from now on (0: unpaced); until
/// the daemon stops (`serve --copy-rate` sets it at start). True; -32602 past
/// [`COPY_RATE_MAX_MIB`].
fn set_copy_rate(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let pool = pool(control)?;
    let r: LvstoreCopyRate = params(p, L)?;
    check_lvstore(pool, r.uuid.as_deref(), r.lvs_name.as_deref())?;
    if r.mbytes_per_sec > COPY_RATE_MAX_MIB {
        return Err(invalid_parameters(format!(
            "mbytes_per_sec {}: at most {COPY_RATE_MAX_MIB} (0: unpaced)",
            r.mbytes_per_sec
        )));
    }
    pool.set_copy_rate(r.mbytes_per_sec << 20);
    tracing::info!(mib_per_sec = r.mbytes_per_sec, "pace of decoupling and inflating set");
    Ok(json!(true))
}

/// What a volume changed since another of its family, in bounded pages: the same runs as
/// NBD's `qemu:dirty-bitmap:BASE` (`PoolMeta::changes`), only the changed ones listed.
fn get_changes(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let pool = pool(control)?;
    let c: LvolChanges = params(p, L)?;
    let name = lvol(control, &c.name)?;
    let base = c.base.as_deref().map(|b| lvol(control, b)).transpose()?;
    let max = c.max_extents.unwrap_or(CHANGES_MAX);
    if !(1..=CHANGES_MAX).contains(&max) {
        return Err(invalid_parameters(format!("max_extents {max}: 1 to {CHANGES_MAX}")));
    }
    // Read under the shared borrow: the cores' decisions go on meanwhile.
    let m = pool.meta_shared();
    let id = m.find(&name).map_err(pool_err)?;
    let base = base.map(|b| m.find(&b)).transpose().map_err(pool_err)?;
    let size = m.volume(id).map_err(pool_err)?.size_bytes;
    if c.offset > size {
        let beyond = format!("offset {} is beyond the volume ({size} bytes)", c.offset);
        return Err(invalid_parameters(beyond));
    }
    let len = c.length.unwrap_or(size - c.offset).min(size - c.offset);
    let runs = match base {
        None => m.allocation(id, c.offset, len, max as usize),
        Some(base) => m.changes(id, base, c.offset, len, max as usize).map_err(|e| match e {
            PoolError::OtherFamily { .. } => invalid_parameters(format!(
                "{} is not of {name}'s family (its snapshots, clones and origin)",
                c.base.as_deref().unwrap_or_default()
            )),
            e => pool_err(e),
        })?,
    };
    let walked: u64 = runs.iter().map(|r| r.1).sum();
    let reply = ChangesReply {
        size,
        extents: runs
            .iter()
            .filter(|r| r.2)
            .map(|&(offset, length, _)| ChangedExtent { offset, length })
            .collect(),
        next_offset: (walked < len).then_some(c.offset + walked),
    };
    Ok(serde_json::to_value(reply).expect("a reply encodes"))
}

fn check(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let pool = pool(control)?;
    let _: NoParams = params(p, L)?;
    let m = pool.meta();
    let problems = m.check();
    let ok = problems.is_empty() && m.leaked() == 0;
    Ok(json!({"ok": ok, "problems": problems, "leaked_clusters": m.leaked()}))
}

// ---- offline tools --------------------------------------------------------------------------

/// `ballast pool create PATH [--size S]`.
pub fn pool_create(path: &Path, size: Option<&str>, cluster_kib: u32) -> anyhow::Result<()> {
    let size = size.map(parse_size).transpose()?;
    if size.is_none() && !path.exists() {
        bail!("{} does not exist: give --size to create it as a sparse file", path.display());
    }
    let mut g = PoolGeometry::standard(new_uuid()?);
    g.cluster_shift = match cluster_kib {
        16 => 14,
        32 => 15,
        64 => 16,
        other => bail!("--cluster-kib {other}: must be 16, 32 or 64"),
    };
    if let Ok(mut disk) = PoolDisk::open(path, false) {
        let a = disk.read(0, BLOCK_SIZE)?;
        let b = disk.read(BLOCK_SIZE as u64, BLOCK_SIZE)?;
        if choose_superblock(&a, &b).is_ok() {
            bail!("{} already holds a ballast pool; refusing to overwrite it", path.display());
        }
    }
    PoolHandle::create(path, size, g)?;
    let pool = PoolHandle::open(path)?;
    let info = pool.info();
    println!(
        "created pool {} on {}: {} data bytes in {}-byte clusters, {} metadata, {} journal",
        info.uuid,
        info.path,
        info.data_bytes,
        info.cluster_bytes,
        info.metadata_bytes,
        info.journal_bytes
    );
    Ok(())
}

fn describe_sb(which: &str, bytes: &[u8]) -> String {
    match Superblock::decode(bytes) {
        Ok(sb) => format!("superblock {which}: valid, generation {}", sb.generation),
        Err(e) => format!("superblock {which}: DAMAGED: {e}"),
    }
}

/// `ballast pool check PATH`: opens the pool read-only (superblocks, checkpoint, journal),
/// recounts every reference from the trees and compares with the allocator. Exit status 0 only
/// when everything is exact.
pub fn pool_check(path: &Path) -> anyhow::Result<bool> {
    let _lock = PoolLock::take(path, false, Duration::ZERO)?;
    let mut disk = PoolDisk::open(path, false)?;
    let a = disk.read(0, BLOCK_SIZE)?;
    let b = disk.read(BLOCK_SIZE as u64, BLOCK_SIZE)?;
    let mut ok = true;
    let (da, db) = (describe_sb("A", &a), describe_sb("B", &b));
    println!("{da}\n{db}");
    // A damaged copy is survivable (the other one is used) but is still damage to report.
    let both_valid = Superblock::decode(&a).is_ok() && Superblock::decode(&b).is_ok();
    let pool = match Pool::open(disk) {
        Ok(p) => p,
        Err(e) => {
            println!("pool cannot be opened: {e}");
            return Ok(false);
        }
    };
    let m = pool.meta();
    if !both_valid {
        // Only generation 0 (never written since format) may be invalid legitimately.
        let gen = m.superblock().generation;
        if gen > 1 {
            ok = false;
        }
    }
    let problems = m.check();
    for p in &problems {
        println!("problem: {p}");
    }
    ok &= problems.is_empty();
    describe_thick_repairs(m);
    let leaked = m.leaked();
    if leaked > 0 {
        println!("problem: {leaked} clusters allocated but referenced by nothing");
        ok = false;
    }
    let referenced = m.used_clusters();
    println!(
        "{} volumes, {} of {} clusters in use, {} free; journal: {} blocks free of {}",
        m.volumes().len(),
        referenced,
        m.superblock().cluster_count - 1,
        m.free_clusters(),
        m.journal_blocks_free(),
        m.superblock().journal_blocks
    );
    println!("{}", if ok { "pool is consistent" } else { "pool has PROBLEMS" });
    Ok(ok)
}

/// What opening did to thick volumes a crash had cut short (`PoolMeta::thick_repairs`): done in
/// memory only here (the offline tools write nothing), again by the daemon's next open, which
/// keeps it. Not a problem: the pool is sound, the volumes as the last commit left them.
fn describe_thick_repairs(m: &ballast_engine::volume::meta::PoolMeta) {
    let (mapped, thinned) = m.thick_repairs();
    if mapped > 0 {
        println!(
            "note: {mapped} thick volume(s) were cut short by a crash; the daemon maps their \
             missing clusters when it opens the pool (shown here as mapped)"
        );
    }
    if thinned > 0 {
        println!(
            "note: {thinned} thick volume(s) were cut short by a crash and the pool lacks the \
             room to complete them: the daemon serves them thin"
        );
    }
}

/// `ballast pool dump PATH [--maps]`: the pool's metadata in words.
pub fn pool_dump(path: &Path, maps: bool) -> anyhow::Result<()> {
    let _lock = PoolLock::take(path, false, Duration::ZERO)?;
    let mut disk = PoolDisk::open(path, false)?;
    let a = disk.read(0, BLOCK_SIZE)?;
    let b = disk.read(BLOCK_SIZE as u64, BLOCK_SIZE)?;
    println!("{}\n{}", describe_sb("A", &a), describe_sb("B", &b));
    let pool = Pool::open(disk)?;
    let m = pool.meta();
    let sb = m.superblock();
    println!("{sb:#?}");
    describe_thick_repairs(m);
    println!("config:");
    for (k, v) in m.config() {
        println!("  {k} = {v}");
    }
    println!("volumes:");
    for (&id, v) in &m.volumes() {
        let entries = ballast_engine::volume::meta::mapped_entries(m, id);
        println!(
            "  #{id} {:?}: {} bytes, {} allocated, {}, {}, parent {}, {} mapped clusters",
            v.name,
            v.size_bytes,
            m.allocated_bytes(id),
            if v.read_only { "read-only" } else { "writable" },
            if v.thick { "thick" } else { "thin" },
            v.parent,
            entries.len()
        );
        if maps {
            for (vc, cluster, written) in entries {
                println!("    vcluster {vc} -> cluster {cluster} written {written:016b}");
            }
        }
    }
    Ok(())
}
