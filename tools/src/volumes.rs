//! Pools and volumes in the daemon and the CLI: exporting a pool's volumes (NBD export and
//! NVMe/TCP subsystem per volume, named after it), the `bdev_lvol_*` control methods, and the
//! offline `ballast pool create|check|dump` tools.
//!
//! Every volume of the pool is exported under its name: NBD export `NAME`, NVMe subsystem
//! `nqn.2026-11.dev.ballast:NAME` with namespace 1 (serial and NGUID derive from the NQN, so they
//! are the same after every restart). Snapshots are exported read-only. Allowed hosts of a
//! volume's subsystem are kept in the pool's configuration, so `ballast serve --pool DEV` alone
//! restores everything.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use ballast_engine::size::parse_size;
use ballast_engine::volume::dev::{FileDisk, PoolHandle};
use ballast_engine::volume::format::{choose_superblock, Superblock, BLOCK_SIZE};
use ballast_engine::volume::pool::{Pool, PoolGeometry, SyncDisk};
use ballast_engine::BlockDev;
use ballast_nbd::Export;
use serde_json::{json, Value};

use crate::rpc::{invalid, Control, RpcError};

/// Config key holding the access settings of volume `name`'s subsystem (JSON: allow_any_host,
/// hosts).
fn hosts_key(name: &str) -> String {
    format!("hosts:{name}")
}

pub fn nqn_of(name: &str) -> String {
    format!("{}{name}", ballast_nvmf::NQN_PREFIX)
}

/// A fresh random pool identity (getrandom(2): no /dev needed, as in an empty chroot).
pub fn new_uuid() -> anyhow::Result<[u8; 16]> {
    let mut uuid = [0u8; 16];
    ballast_ffi::sys::random_bytes(&mut uuid)?;
    Ok(uuid)
}

/// Exports volume `name` over NBD and NVMe/TCP.
pub fn export_volume(control: &Control, pool: &Arc<PoolHandle>, name: &str) -> anyhow::Result<()> {
    let dev = pool.device(name, false)?;
    let read_only = dev.info().read_only;
    let description = {
        let m = pool.meta();
        let v = m.volume(dev.id())?;
        match m.volumes().get(&v.parent) {
            Some(p) if v.read_only => format!("snapshot of {}", p.name),
            Some(p) => format!("clone of {}", p.name),
            None => "volume".to_string(),
        }
    };
    let dev: Arc<dyn BlockDev> = Arc::new(dev);
    control.exports.add(Export {
        name: name.to_string(),
        description,
        dev: dev.clone(),
        read_only,
    })?;
    let nqn = nqn_of(name);
    let stored: Option<Value> =
        pool.meta().config().get(&hosts_key(name)).and_then(|v| serde_json::from_str(v).ok());
    let (any, hosts): (bool, Vec<String>) = match &stored {
        Some(v) => (
            v["allow_any_host"].as_bool().unwrap_or(true),
            v["hosts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| h.as_str().map(String::from))
                .collect(),
        ),
        None => (control.allow_hosts.is_empty(), control.allow_hosts.clone()),
    };
    let subsys = control.target.create_subsystem(&nqn, any)?;
    subsys.hosts.write().extend(hosts);
    control.target.add_namespace(&nqn, 1, dev, 4096)?;
    Ok(())
}

/// Removes volume `name`'s exports (open connections keep their device until they close).
pub fn unexport_volume(control: &Control, name: &str) {
    let _ = control.exports.remove(name);
    let _ = control.target.delete_subsystem(&nqn_of(name));
}

/// Exports every volume of `pool`.
pub fn export_all(control: &Control, pool: &Arc<PoolHandle>) -> anyhow::Result<()> {
    for v in pool.list() {
        export_volume(control, pool, &v.name).with_context(|| format!("exporting {}", v.name))?;
    }
    Ok(())
}

/// Keeps a volume subsystem's access settings in the pool (after an `nvmf_subsystem_*_host`
/// or `nvmf_subsystem_allow_any_host` call).
pub fn persist_hosts(control: &Control, nqn: &str) {
    let Some(pool) = &control.pool else { return };
    let Some(name) = nqn.strip_prefix(ballast_nvmf::NQN_PREFIX) else { return };
    let Some(subsys) = control.target.subsystem(nqn) else { return };
    if pool.meta().find(name).is_err() {
        return;
    }
    let hosts: Vec<String> = subsys.hosts.read().iter().cloned().collect();
    let any = subsys.allow_any_host.load(std::sync::atomic::Ordering::Relaxed);
    let value = json!({"allow_any_host": any, "hosts": hosts}).to_string();
    if let Err(e) = pool.set_config(&hosts_key(name), &value) {
        tracing::warn!(volume = name, error = %e, "could not store the host list in the pool");
    }
}

fn pool(control: &Control) -> Result<&Arc<PoolHandle>, RpcError> {
    control
        .pool
        .as_ref()
        .ok_or_else(|| invalid("this daemon serves no pool (start it with --pool)"))
}

fn str_param<'a>(p: &'a Value, names: &[&str]) -> Result<&'a str, RpcError> {
    names
        .iter()
        .find_map(|n| p.get(*n).and_then(Value::as_str))
        .ok_or_else(|| invalid(format!("missing string param: {}", names[0])))
}

/// A size given as bytes (number), "10G" (string) or SPDK's `size_in_mib`.
fn size_param(p: &Value) -> Result<u64, RpcError> {
    if let Some(mib) = p.get("size_in_mib").and_then(Value::as_u64) {
        return Ok(mib << 20);
    }
    match p.get("size") {
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| invalid("size must be positive")),
        Some(Value::String(s)) => parse_size(s).map_err(|e| invalid(e.to_string())),
        _ => Err(invalid("missing param: size (bytes, or a string like \"10G\")")),
    }
}

fn pool_err(e: impl std::fmt::Display) -> RpcError {
    invalid(e.to_string())
}

pub fn handle(control: &Control, method: &str, p: &Value) -> Result<Value, RpcError> {
    let pool = pool(control)?;
    match method {
        "bdev_lvol_get_lvstores" => {
            Ok(json!([serde_json::to_value(pool.info()).unwrap_or_default()]))
        }
        "bdev_lvol_get_lvols" => Ok(serde_json::to_value(pool.list()).unwrap_or_default()),
        "bdev_lvol_create" => {
            let name = str_param(p, &["lvol_name", "name"])?;
            let size = size_param(p)?;
            pool.create_volume(name, size).map_err(pool_err)?;
            export_volume(control, pool, name).map_err(|e| invalid(format!("{e:#}")))?;
            tracing::info!(volume = name, size_bytes = size, "volume created");
            Ok(json!(name))
        }
        "bdev_lvol_snapshot" => {
            let of = str_param(p, &["lvol_name", "volume"])?;
            let name = str_param(p, &["snapshot_name", "name"])?;
            let t = std::time::Instant::now();
            pool.snapshot(of, name).map_err(pool_err)?;
            let us = t.elapsed().as_micros() as u64;
            export_volume(control, pool, name).map_err(|e| invalid(format!("{e:#}")))?;
            tracing::info!(volume = of, snapshot = name, micros = us, "snapshot created");
            Ok(json!({"name": name, "micros": us}))
        }
        "bdev_lvol_clone" => {
            let of = str_param(p, &["snapshot_name", "snapshot"])?;
            let name = str_param(p, &["clone_name", "name"])?;
            pool.clone_volume(of, name).map_err(pool_err)?;
            export_volume(control, pool, name).map_err(|e| invalid(format!("{e:#}")))?;
            tracing::info!(snapshot = of, clone = name, "clone created");
            Ok(json!(name))
        }
        "bdev_lvol_rollback" => {
            let name = str_param(p, &["name", "lvol_name"])?;
            let to = str_param(p, &["snapshot_name", "snapshot"])?;
            pool.rollback(name, to).map_err(pool_err)?;
            tracing::info!(volume = name, snapshot = to, "volume rolled back");
            Ok(json!(true))
        }
        "bdev_lvol_resize" => {
            let name = str_param(p, &["name", "lvol_name"])?;
            let size = size_param(p)?;
            let force = p.get("force").and_then(Value::as_bool).unwrap_or(false);
            pool.resize(name, size, force).map_err(pool_err)?;
            if let Some(subsys) = control.target.subsystem(&nqn_of(name)) {
                control.target.namespace_changed(&subsys, 1);
            }
            tracing::info!(volume = name, size_bytes = size, "volume resized");
            Ok(json!(true))
        }
        "bdev_lvol_delete" => {
            let name = str_param(p, &["name", "lvol_name"])?;
            pool.meta().find(name).map_err(pool_err)?;
            unexport_volume(control, name);
            if let Err(e) = pool.delete(name) {
                // Put the exports back: the volume is still there.
                let _ = export_volume(control, pool, name);
                return Err(pool_err(e));
            }
            let _ = pool.set_config(&hosts_key(name), "");
            tracing::info!(volume = name, "volume deleted");
            Ok(json!(true))
        }
        "bdev_lvol_check" => {
            let m = pool.meta();
            let problems = m.check();
            Ok(
                json!({"ok": problems.is_empty() && m.leaked() == 0, "problems": problems, "leaked_clusters": m.leaked()}),
            )
        }
        _ => Err(RpcError {
            code: crate::rpc::METHOD_NOT_FOUND,
            message: format!("Method not found: {method}"),
        }),
    }
}

pub const METHODS: &[&str] = &[
    "bdev_lvol_get_lvstores",
    "bdev_lvol_get_lvols",
    "bdev_lvol_create",
    "bdev_lvol_snapshot",
    "bdev_lvol_clone",
    "bdev_lvol_rollback",
    "bdev_lvol_resize",
    "bdev_lvol_delete",
    "bdev_lvol_check",
];

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
    if let Ok(mut disk) = FileDisk::open(path, false) {
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
    let mut disk = FileDisk::open(path, false)?;
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

/// `ballast pool dump PATH [--maps]`: the pool's metadata in words.
pub fn pool_dump(path: &Path, maps: bool) -> anyhow::Result<()> {
    let mut disk = FileDisk::open(path, false)?;
    let a = disk.read(0, BLOCK_SIZE)?;
    let b = disk.read(BLOCK_SIZE as u64, BLOCK_SIZE)?;
    println!("{}\n{}", describe_sb("A", &a), describe_sb("B", &b));
    let pool = Pool::open(disk)?;
    let m = pool.meta();
    let sb = m.superblock();
    println!("{sb:#?}");
    println!("config:");
    for (k, v) in m.config() {
        println!("  {k} = {v}");
    }
    println!("volumes:");
    for (id, v) in m.volumes() {
        let entries = ballast_engine::volume::meta::mapped_entries(m, *id);
        println!(
            "  #{id} {:?}: {} bytes, {} allocated, {}, parent {}, {} mapped clusters",
            v.name,
            v.size_bytes,
            m.allocated_bytes(*id),
            if v.read_only { "read-only" } else { "writable" },
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
