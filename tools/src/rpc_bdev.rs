//! SPDK's generic bdev and framework methods over the device registry: `bdev_get_bdevs`,
//! `bdev_get_iostat`, `spdk_get_version`, `framework_get_reactors`.
//!
//! Every registered device (pool volume, RAM or file export) is one bdev named as the device,
//! found by name, UUID or (a volume) SPDK alias `LVS/LVOL` through the registry. A volume is
//! described as SPDK describes an lvol (`product_name` "Logical Volume",
//! `driver_specific.lvol`). The module changes nothing; it depends on no other method module.

use std::sync::Arc;

use ballast_engine::limits::{ConnCounters, ConnLimits};
use ballast_engine::qos::QosLimits;
use ballast_engine::stats::{DevCounters, StatsSnapshot};
use ballast_engine::volume::dev::{PoolHandle, VolumeInfo};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::control::{Control, Method};
use crate::lvstore;
use crate::registry::{Device, DeviceKind, Registry};
use crate::rpc_error::{
    invalid_parameters, no_such_device, params, DecodeStyle, NoParams, RpcError, INTERNAL_ERROR,
};

/// The generic bdev and framework methods, each in one place: name and handler.
pub const METHODS: &[Method] = &[
    Method { name: "spdk_get_version", call: |_, p| spdk_get_version(p) },
    Method { name: "bdev_get_iostat", call: iostat },
    Method { name: "bdev_get_bdevs", call: |c, p| get_bdevs(&c.registry, c.pool.as_deref(), p) },
    Method { name: "bdev_set_qos_limit", call: set_qos_limit },
    Method { name: "framework_get_reactors", call: reactors },
    // SPDK's: true once the framework is up, which it is whenever a method runs.
    Method {
        name: "framework_wait_init",
        call: |_, p| {
            let _: NoParams = params(p, DecodeStyle::Generic)?;
            Ok(Value::Bool(true))
        },
    },
];

fn iostat(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let cores = crate::metrics::core_snapshots(&control.cores, true);
    let uptime_us = control.started.elapsed().as_micros() as u64;
    get_iostat(&control.registry, &cores, uptime_us, p)
}

/// `framework_get_reactors`' result.
#[derive(Serialize)]
struct Reactors<'a> {
    reactors: Vec<StatsSnapshot>,
    limits: ReactorLimits<'a>,
    connections: ConnCounters,
}

#[derive(Serialize)]
struct ReactorLimits<'a> {
    #[serde(flatten)]
    connections: &'a ConnLimits,
    buffer_memory: u64,
}

/// `framework_get_reactors`: every core's statistics, the limits and the connection counters.
fn reactors(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let _: NoParams = params(p, DecodeStyle::Generic)?;
    let out = Reactors {
        reactors: crate::metrics::core_snapshots(&control.cores, true),
        limits: ReactorLimits {
            connections: &control.admission.limits,
            buffer_memory: control.buffer_memory,
        },
        connections: control.admission.counters(),
    };
    to_result(&out)
}

/// A typed result as the JSON-RPC result value.
fn to_result<T: Serialize>(result: &T) -> Result<Value, RpcError> {
    serde_json::to_value(result).map_err(|e| RpcError::new(INTERNAL_ERROR, e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBdevs {
    name: Option<String>,
    /// Milliseconds to wait for the bdev to appear: ours appear synchronously, so none.
    #[allow(dead_code)]
    timeout: Option<u64>,
}

/// `bdev_get_bdevs [-b NAME]`; an unknown NAME is SPDK's -19 "No such device".
/// `bdev_set_qos_limit`: SPDK's parameters (a limit left out keeps its value, 0 lifts it;
/// I/Os per second in multiples of 1000, MiB per second).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetQosLimit {
    name: String,
    rw_ios_per_sec: Option<u64>,
    rw_mbytes_per_sec: Option<u64>,
    r_mbytes_per_sec: Option<u64>,
    w_mbytes_per_sec: Option<u64>,
}

/// Sets an export's rate limits, on every core serving it at once; `true`. As SPDK: an
/// unknown bdev -19, no limit given -22 ("No rate limits specified"), a refused value -32602
/// "Failed to configure rate limit: Invalid argument".
fn set_qos_limit(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let req: SetQosLimit = params(p, DecodeStyle::Generic)?;
    // One change of kept settings at a time (a volume's delete forgets its limits under it).
    let _settings = control.settings.lock();
    let device = control.registry.resolve(&req.name).ok_or_else(no_such_device)?;
    let given =
        [req.rw_ios_per_sec, req.rw_mbytes_per_sec, req.r_mbytes_per_sec, req.w_mbytes_per_sec];
    if given.iter().all(Option::is_none) {
        return Err(RpcError::new(crate::rpc_error::EINVAL, "No rate limits specified"));
    }
    let now = device.qos.limits();
    let limits = QosLimits {
        rw_ios_per_sec: req.rw_ios_per_sec.unwrap_or(now.rw_ios_per_sec),
        rw_mbytes_per_sec: req.rw_mbytes_per_sec.unwrap_or(now.rw_mbytes_per_sec),
        r_mbytes_per_sec: req.r_mbytes_per_sec.unwrap_or(now.r_mbytes_per_sec),
        w_mbytes_per_sec: req.w_mbytes_per_sec.unwrap_or(now.w_mbytes_per_sec),
    };
    if let Err(e) = limits.check() {
        tracing::warn!(bdev = device.name, error = %e, "rate limit refused");
        let msg = format!("Failed to configure rate limit: Invalid argument ({e})");
        return Err(RpcError::new(crate::rpc_error::INVALID_PARAMS, msg));
    }
    // A volume's limits are kept in its pool (applied again at every start), first: a limit
    // that could not be kept is not set either.
    if let (DeviceKind::Volume, Some(pool)) = (device.kind, &control.pool) {
        lvstore::store_volume_limits(pool, &device.name, limits)
            .map_err(|e| RpcError::new(crate::rpc_error::INTERNAL_ERROR, e.to_string()))?;
    }
    device.qos.set(limits).expect("checked above");
    tracing::info!(bdev = device.name, ?limits, "rate limits set");
    Ok(serde_json::json!(true))
}

fn get_bdevs(registry: &Registry, pool: Option<&PoolHandle>, p: &Value) -> Result<Value, RpcError> {
    let req: GetBdevs = params(p, DecodeStyle::Generic)?;
    let volumes = pool.map(|pool| pool.list()).unwrap_or_default();
    let chosen = match &req.name {
        Some(n) => vec![registry.resolve(n).ok_or_else(no_such_device)?],
        None => registry.list(),
    };
    let list: Vec<BdevEntry> =
        chosen.iter().map(|e| bdev_entry(registry, e, pool, &volumes)).collect();
    to_result(&list)
}

/// One bdev of `bdev_get_bdevs` (SPDK's shape).
#[derive(Serialize)]
struct BdevEntry {
    name: String,
    aliases: Vec<String>,
    uuid: String,
    product_name: &'static str,
    block_size: u64,
    num_blocks: u64,
    claimed: bool,
    zoned: bool,
    supported_io_types: IoTypes,
    /// SPDK's names; 0: no limit.
    assigned_rate_limits: QosLimits,
    driver_specific: DriverSpecific,
}

#[derive(Serialize)]
struct IoTypes {
    read: bool,
    write: bool,
    unmap: bool,
    flush: bool,
    reset: bool,
    write_zeroes: bool,
    compare: bool,
    compare_and_write: bool,
    abort: bool,
    nvme_admin: bool,
    nvme_io: bool,
}

#[derive(Serialize)]
struct DriverSpecific {
    ballast: BallastSpecific,
    #[serde(skip_serializing_if = "Option::is_none")]
    lvol: Option<LvolSpecific>,
}

#[derive(Serialize)]
struct BallastSpecific {
    backend: String,
    read_only: bool,
}

/// SPDK's `driver_specific.lvol` of one volume.
#[derive(Serialize)]
struct LvolSpecific {
    lvol_store_uuid: String,
    base_bdev: String,
    thin_provision: bool,
    num_allocated_clusters: u64,
    snapshot: bool,
    clone: bool,
    esnap_clone: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    base_snapshot: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    clones: Option<Vec<String>>,
}

fn bdev_entry(
    registry: &Registry,
    e: &Device,
    pool: Option<&PoolHandle>,
    volumes: &[VolumeInfo],
) -> BdevEntry {
    let info = e.dev.info();
    let block_size = u64::from(e.block_size.unwrap_or(info.block_size).max(1));
    let volume = match e.kind {
        DeviceKind::Volume => pool.zip(volumes.iter().find(|v| v.name == e.name)),
        DeviceKind::Ram | DeviceKind::File | DeviceKind::Nvme => None,
    };
    let product_name = match e.kind {
        DeviceKind::Volume => "Logical Volume",
        DeviceKind::Ram => "Malloc disk",
        DeviceKind::File => "AIO disk",
        DeviceKind::Nvme => "NVMe disk",
    };
    let writable = !e.read_only;
    BdevEntry {
        name: e.name.clone(),
        aliases: registry.alias(e).into_iter().collect(),
        uuid: e.uuid.clone(),
        product_name,
        block_size,
        num_blocks: e.dev.size_bytes() / block_size,
        claimed: false,
        zoned: false,
        supported_io_types: IoTypes {
            read: true,
            write: writable,
            unmap: writable,
            flush: true,
            reset: false,
            write_zeroes: writable,
            // NVMe Compare and fused Compare and Write, on every export (its write gate).
            compare: true,
            compare_and_write: writable,
            abort: false,
            nvme_admin: false,
            nvme_io: false,
        },
        assigned_rate_limits: e.qos.limits(),
        driver_specific: DriverSpecific {
            ballast: BallastSpecific { backend: info.backend.clone(), read_only: e.read_only },
            lvol: volume.map(|(pool, v)| lvol_specific(pool, v, volumes)),
        },
    }
}

fn lvol_specific(pool: &PoolHandle, v: &VolumeInfo, volumes: &[VolumeInfo]) -> LvolSpecific {
    let cluster_bytes = pool.meta().cluster_bytes().max(1);
    let parent = v.parent.as_ref().and_then(|p| volumes.iter().find(|o| &o.name == p));
    let clone = !v.snapshot && parent.is_some_and(|p| p.snapshot);
    let clones = v.snapshot.then(|| {
        volumes
            .iter()
            .filter(|o| !o.snapshot && o.parent.as_deref() == Some(v.name.as_str()))
            .map(|o| o.name.clone())
            .collect()
    });
    LvolSpecific {
        lvol_store_uuid: lvstore::lvs_uuid(pool),
        base_bdev: pool.info().path,
        thin_provision: !v.thick,
        // A thick volume holds every cluster (as SPDK counts a thick lvol's).
        num_allocated_clusters: if v.thick {
            v.size_bytes.div_ceil(cluster_bytes)
        } else {
            v.allocated_bytes.div_ceil(cluster_bytes)
        },
        snapshot: v.snapshot,
        clone,
        esnap_clone: false,
        base_snapshot: if clone { v.parent.clone() } else { None },
        clones,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetIostat {
    name: Option<String>,
    names: Option<Vec<String>>,
    #[serde(default)]
    per_channel: bool,
    reset_mode: Option<String>,
}

/// Ticks are microseconds.
const TICK_RATE_HZ: u64 = 1_000_000;

/// `bdev_get_iostat`: SPDK's shape. `bdevs` holds one entry per bdev (all, or the ones named),
/// from its device's counters summed over the cores (NBD and NVMe/TCP together); `cores` the
/// per-core totals of all bdevs (SPDK's `per_channel` view). Counters cannot be reset.
fn get_iostat(
    registry: &Registry,
    cores: &[StatsSnapshot],
    uptime_us: u64,
    p: &Value,
) -> Result<Value, RpcError> {
    let req: GetIostat = params(p, DecodeStyle::Generic)?;
    if req.reset_mode.as_deref().is_some_and(|m| m != "none") {
        return Err(invalid_parameters("reset_mode: the counters cannot be reset (use none)"));
    }
    let named: Vec<String> = req.name.into_iter().chain(req.names.into_iter().flatten()).collect();
    let chosen: Vec<Arc<Device>> = if named.is_empty() {
        registry.list()
    } else {
        named
            .iter()
            .map(|n| registry.resolve(n).ok_or_else(no_such_device))
            .collect::<Result<_, _>>()?
    };
    let bdevs: Vec<IostatEntry> = chosen
        .iter()
        .map(|e| {
            let id = e.stats_id;
            let mut one = DevCounters::default();
            for s in cores {
                // Both protocols' requests: SPDK's iostat has no protocol.
                for (_, _, d) in s.devices.iter().filter(|(i, ..)| *i == id) {
                    one.merge(d);
                }
            }
            IostatEntry::new(&e.name, &one, 0.0, None)
        })
        .collect();
    let per_core = cores
        .iter()
        .map(|s| IostatEntry::new("*", &s.totals(), s.latency_us_max, Some(s.core)))
        .collect();
    let cores = (req.per_channel || named.is_empty()).then_some(per_core);
    to_result(&Iostat { tick_rate: TICK_RATE_HZ, ticks: uptime_us, bdevs, cores })
}

/// `bdev_get_iostat`'s result (SPDK's shape).
#[derive(Serialize)]
struct Iostat {
    tick_rate: u64,
    ticks: u64,
    bdevs: Vec<IostatEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cores: Option<Vec<IostatEntry>>,
}

/// One entry of SPDK's iostat shape, from a device's (or a core's) counters.
#[derive(Serialize)]
struct IostatEntry {
    name: String,
    bytes_read: u64,
    num_read_ops: u64,
    bytes_written: u64,
    num_write_ops: u64,
    num_unmap_ops: u64,
    num_write_zeroes_ops: u64,
    num_flush_ops: u64,
    /// All kinds together: the cores keep one latency sum.
    latency_ticks: u64,
    max_latency_ticks: u64,
    io_error: IoErrors,
    /// Requests in flight now (ballast's; SPDK has no such field).
    queue_depth: u64,
    /// The core, in the per-core view.
    #[serde(skip_serializing_if = "Option::is_none")]
    core: Option<usize>,
}

#[derive(Serialize)]
struct IoErrors {
    count: u64,
}

impl IostatEntry {
    fn new(name: &str, d: &DevCounters, max_latency_us: f64, core: Option<usize>) -> Self {
        IostatEntry {
            name: name.to_string(),
            bytes_read: d.bytes_read,
            num_read_ops: d.reads,
            bytes_written: d.bytes_written,
            num_write_ops: d.writes,
            num_unmap_ops: d.discards,
            num_write_zeroes_ops: d.write_zeroes,
            num_flush_ops: d.flushes,
            latency_ticks: d.latency_ns_sum / 1000,
            max_latency_ticks: max_latency_us as u64,
            io_error: IoErrors { count: d.errors },
            queue_depth: d.in_flight,
            core,
        }
    }
}

/// `spdk_get_version`: SPDK's shape, naming ballast.
fn spdk_get_version(p: &Value) -> Result<Value, RpcError> {
    let _: NoParams = params(p, DecodeStyle::Generic)?;
    let version = env!("CARGO_PKG_VERSION");
    let mut parts = version.split(['.', '-']).map(|x| x.parse::<u64>().unwrap_or(0));
    let (major, minor, patch) = (parts.next(), parts.next(), parts.next());
    to_result(&Version {
        version: format!("ballast v{version} (SPDK-compatible control API)"),
        fields: VersionFields {
            major: major.unwrap_or(0),
            minor: minor.unwrap_or(0),
            patch: patch.unwrap_or(0),
            suffix: "-ballast",
        },
    })
}

/// `spdk_get_version`'s result.
#[derive(Serialize)]
struct Version {
    version: String,
    fields: VersionFields,
}

#[derive(Serialize)]
struct VersionFields {
    major: u64,
    minor: u64,
    patch: u64,
    suffix: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn version_has_spdks_fields() {
        let v = spdk_get_version(&Value::Null).unwrap();
        assert!(v["version"].as_str().unwrap().starts_with("ballast v"));
        assert!(v["fields"]["major"].is_u64());
        assert!(spdk_get_version(&json!({"x": 1})).is_err());
    }

    #[test]
    fn iostat_sums_cores_and_refuses_resets_and_unknown_bdevs() {
        let r = Registry::new(Arc::new(ballast_nvmf::Target::default()), None);
        let e = get_iostat(&r, &[], 5, &json!({"reset_mode": "all"})).unwrap_err();
        assert_eq!(e.code, crate::rpc_error::INVALID_PARAMS);
        let e = get_iostat(&r, &[], 5, &json!({"name": "nope"})).unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-19, "No such device"));
        let v = get_iostat(&r, &[], 5, &json!({"per_channel": false})).unwrap();
        assert_eq!(v["tick_rate"], json!(TICK_RATE_HZ));
        assert_eq!(v["bdevs"], json!([]), "no exports, no bdevs");
    }
}
