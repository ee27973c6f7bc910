//! `ballast`: the daemon (`ballast serve`) and the command-line client of its control API.

mod args;
mod cli_nvmf;
mod client;
mod control;
mod host_auth;
mod keyring;
mod listeners;
mod locate;
mod logging;
mod lvstore;
mod metrics;
mod metrics_http;
#[cfg(test)]
mod module_graph;
mod nbd_tls;
mod notify;
mod persist;
mod pool_config;
mod registry;
mod resv_store;
mod rpc;
mod rpc_bdev;
mod rpc_error;
mod rpc_export;
mod rpc_keyring;
mod rpc_log;
mod rpc_nvmf;
mod serve;
mod volumes;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use volumes::{LvolEntry, LvstoreEntry};

#[derive(Parser)]
#[command(
    name = "ballast",
    version,
    about = "Userspace block-storage target: thin volumes, snapshots and clones served over \
             NVMe/TCP and NBD",
    long_about = "Userspace block-storage target: thin volumes, snapshots and clones served over \
                  NVMe/TCP and NBD.\n\n`serve` runs the daemon; `pool create|check|dump` work \
                  offline on a pool's file or device; every other command asks a running daemon \
                  through its control socket: --rpc-socket PATH, --data-dir DIR or \
                  $BALLAST_RPC_SOCKET if given, else the first live one of \
                  ./ballast-data/ballast.sock, $XDG_RUNTIME_DIR/ballast/ctl.sock, \
                  /run/ballast/ctl.sock."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: serve a pool's volumes (or --export devices) over NVMe/TCP and NBD, and
    /// the control socket the other commands talk to.
    Serve(Box<serve::ServeArgs>),
    /// Exports of a running daemon: the devices served by name (volumes, and the RAM or file
    /// backed ones added here; NBD serves each, `nvmf add-ns` puts one in an NVMe subsystem).
    #[command(subcommand)]
    Export(ExportCommand),
    /// Manage NVMe-oF subsystems of a running daemon.
    #[command(subcommand)]
    Nvmf(cli_nvmf::NvmfCommand),
    /// Pools: create, check or dump one offline (on its file or device); `info` asks the
    /// running daemon.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Thin volumes of the running daemon's pool.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Snapshots (read-only, O(1)) of the running daemon's volumes.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Writable clones of the running daemon's snapshots.
    #[command(subcommand)]
    Clone(CloneCommand),
    /// Call any control method: `ballast rpc METHOD '{"param": 1}'`.
    Rpc {
        method: String,
        /// Parameters as a JSON object.
        #[arg(default_value = "{}")]
        params: String,
        #[command(flatten)]
        target: client::Target,
    },
    /// The running daemon's log level and debug flags: shows them; `--level` and `--debug`
    /// / `--no-debug COMPONENT` change them until it stops (SPDK's `log_set_level`,
    /// `log_set_flag`).
    Log {
        #[command(flatten)]
        target: client::Target,
        /// ERROR, WARNING, NOTICE, INFO or DEBUG.
        #[arg(long)]
        level: Option<String>,
        /// Show a component's debug messages whatever the level (repeatable; the daemon's
        /// `log_get_flags` lists them: nvmf, nvmf_auth, nbd, tls, lvol, ...).
        #[arg(long, value_name = "COMPONENT")]
        debug: Vec<String>,
        /// Stop showing them.
        #[arg(long, value_name = "COMPONENT")]
        no_debug: Vec<String>,
    },
    /// Per-core I/O counters and latency percentiles of a running daemon.
    Stats {
        #[command(flatten)]
        target: client::Target,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ExportCommand {
    /// List exports (volumes included).
    List {
        #[command(flatten)]
        target: client::Target,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add an export backed by memory or a file/block device (served over NBD; `nvmf add-ns`
    /// adds it to an NVMe subsystem).
    Add(client::AddArgs),
    /// Grow an export (NVMe hosts are told through an asynchronous event; NBD clients see the
    /// new size when they reconnect).
    Resize {
        name: String,
        /// New size, e.g. 2G.
        size: String,
        #[command(flatten)]
        target: client::Target,
    },
    /// Remove an export (open connections keep working until they close).
    Remove {
        name: String,
        #[command(flatten)]
        target: client::Target,
    },
    /// Limit an export's (or volume's) rate, on every core at once (SPDK's
    /// `bdev_set_qos_limit`): I/O beyond it waits. 0 lifts a limit; one not given is kept.
    Limit {
        name: String,
        /// I/Os per second, reads and writes together (a multiple of 1000).
        #[arg(long)]
        iops: Option<u64>,
        /// MiB per second, reads and writes together.
        #[arg(long)]
        mibs: Option<u64>,
        /// MiB per second of reads.
        #[arg(long)]
        read_mibs: Option<u64>,
        /// MiB per second of writes.
        #[arg(long)]
        write_mibs: Option<u64>,
        #[command(flatten)]
        target: client::Target,
    },
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Format a file or block device as a pool, offline (a missing file is created sparse).
    Create {
        path: PathBuf,
        /// Size of a new file, e.g. 10G.
        #[arg(long)]
        size: Option<String>,
        /// Cluster size in KiB: 16, 32 or 64.
        #[arg(long, default_value_t = 64)]
        cluster_kib: u32,
    },
    /// Verify a pool (stop the daemon first): superblocks, checkpoint, journal, every tree and
    /// reference count, free space. Exit status 0 only when everything is exact.
    Check { path: PathBuf },
    /// Print a pool's metadata, read offline from its file or device.
    Dump {
        path: PathBuf,
        /// Every mapped cluster of every volume, too.
        #[arg(long)]
        maps: bool,
    },
    /// Grow the running daemon's pool into its file or block device after it was grown from
    /// outside (`truncate -s`, `lvextend`): the new room takes writes at once.
    Grow {
        #[command(flatten)]
        target: client::Target,
    },
    /// The pace of the running daemon's decoupling and inflating (MiB/s, all of them
    /// together, those in progress included): shows it, or sets it until the daemon stops
    /// (`serve --copy-rate` sets it at start).
    CopyRate {
        /// MiB per second; 0: as fast as the cores and media go.
        mib_per_sec: Option<u64>,
        #[command(flatten)]
        target: client::Target,
    },
    /// The running daemon's pool: size, free space, volumes.
    Info {
        #[command(flatten)]
        target: client::Target,
        /// Print JSON (`bdev_lvol_get_lvstores`: a list with the one pool) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a thin volume (exported at once over NBD and NVMe/TCP under its name).
    Create {
        name: String,
        /// Size, e.g. 10G.
        size: String,
        /// Take every cluster now (refused when the pool lacks them), so that writes to it
        /// never find the pool full; trims keep its room. A snapshot makes it thin.
        #[arg(long)]
        thick: bool,
        #[command(flatten)]
        target: client::Target,
    },
    /// List volumes, snapshots and clones with size, allocated bytes and parent.
    List {
        #[command(flatten)]
        target: client::Target,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Grow (or, with --force when data would be dropped, shrink) a volume.
    Resize {
        name: String,
        size: String,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: client::Target,
    },
    /// Delete a volume, snapshot or clone; its space returns to the pool.
    Delete {
        name: String,
        #[command(flatten)]
        target: client::Target,
    },
    /// Make a volume read-only for good (as a snapshot: it may then be cloned); its exports
    /// refuse writes from now on.
    ReadOnly {
        name: String,
        #[command(flatten)]
        target: client::Target,
    },
    /// Give a volume a cluster of its own for each one it shares with its parent snapshot (or
    /// any volume of its family): a clone is no clone any more (SPDK's decouple_parent).
    /// With --inflate, every cluster it leaves unmapped is allocated too: it becomes thick.
    /// Its I/O goes on meanwhile.
    Decouple {
        /// The volume (name, alias LVS/NAME or UUID).
        name: String,
        /// Allocate every cluster it leaves unmapped as well (SPDK's bdev_lvol_inflate).
        #[arg(long)]
        inflate: bool,
        #[command(flatten)]
        target: client::Target,
    },
    /// Rename a volume, snapshot or clone; its NBD export and NVMe subsystem follow the name,
    /// with their settings (hosts connected to the old NQN are disconnected).
    Rename {
        name: String,
        new_name: String,
        #[command(flatten)]
        target: client::Target,
    },
    /// Give a volume the contents of one of its snapshots.
    Rollback {
        name: String,
        snapshot: String,
        #[command(flatten)]
        target: client::Target,
    },
    /// Where a volume (or snapshot) may read differently from another of its family — what
    /// an incremental backup from BASE's copy must take (the extents NBD's
    /// qemu:dirty-bitmap:BASE marks dirty); without --since, where it is written at all.
    Changes {
        name: String,
        /// The volume, snapshot or clone of the same family to compare with.
        #[arg(long)]
        since: Option<String>,
        #[command(flatten)]
        target: client::Target,
        /// Print JSON ({size, extents: [{offset, length}]}) instead of lines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Snapshot a volume (exported read-only under the snapshot's name).
    Create {
        volume: String,
        name: String,
        #[command(flatten)]
        target: client::Target,
    },
    /// List snapshots.
    List {
        #[command(flatten)]
        target: client::Target,
        /// Print JSON (the snapshots' `bdev_lvol_get_lvols` entries) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot (clones of it keep their data).
    Delete {
        name: String,
        #[command(flatten)]
        target: client::Target,
    },
}

#[derive(Subcommand)]
enum CloneCommand {
    /// A writable clone of a snapshot.
    Create {
        snapshot: String,
        name: String,
        #[command(flatten)]
        target: client::Target,
    },
}

/// Volumes (or only snapshots) as a table or JSON.
fn print_volumes(list: &[LvolEntry], only_snapshots: bool, as_json: bool) -> anyhow::Result<()> {
    let chosen: Vec<&LvolEntry> = list.iter().filter(|v| !only_snapshots || v.snapshot).collect();
    if as_json {
        return client::print_json(&chosen);
    }
    let rows = chosen
        .iter()
        .map(|v| {
            let kind = match (v.snapshot, v.parent.is_some()) {
                (true, _) => "snapshot",
                (false, true) => "clone",
                (false, false) if !v.is_thin_provisioned => "volume (thick)",
                (false, false) => "volume",
            };
            vec![
                v.name.clone(),
                v.size_bytes.to_string(),
                v.allocated_bytes.to_string(),
                kind.to_string(),
                v.parent.clone().unwrap_or_else(|| "-".into()),
                v.uuid.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    use client::Align::{Left, Right};
    let columns = [
        ("NAME", Left),
        ("SIZE", Right),
        ("ALLOCATED", Right),
        ("KIND", Left),
        ("PARENT", Left),
        ("UUID", Left),
    ];
    print!("{}", client::table(&columns, rows));
    Ok(())
}

/// The daemon's pool as a table or JSON.
fn print_pool(list: &[LvstoreEntry], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return client::print_json(&list);
    }
    let rows = list
        .iter()
        .map(|p| {
            let field = |k: &str| p.pool.get(k).map_or("-".into(), |v| v.to_string());
            vec![
                p.name.clone(),
                p.uuid.clone(),
                p.cluster_size.to_string(),
                field("data_bytes"),
                field("used_bytes"),
                field("free_bytes"),
                field("volumes"),
                p.base_bdev.clone(),
            ]
        })
        .collect();
    use client::Align::{Left, Right};
    let columns = [
        ("NAME", Left),
        ("UUID", Left),
        ("CLUSTER", Right),
        ("DATA_BYTES", Right),
        ("USED_BYTES", Right),
        ("FREE_BYTES", Right),
        ("VOLUMES", Right),
        ("PATH", Left),
    ];
    print!("{}", client::table(&columns, rows));
    Ok(())
}

/// Calls a method whose result is only success, and says what was done.
fn done<P: serde::Serialize>(
    target: &client::Target,
    method: &str,
    params: &P,
    what: String,
) -> anyhow::Result<()> {
    client::call(target, method, params).map(|_: serde_json::Value| println!("{what}"))
}

fn volumes_cli(cmd: Command) -> anyhow::Result<()> {
    use volumes::{LvolClone, LvolCreate, LvolName, LvolResize, LvolRollback, LvolSnapshot};
    use volumes::{LvolsSelect, LvstoreSelect, SizeParam};
    match cmd {
        Command::Pool(PoolCommand::Create { path, size, cluster_kib }) => {
            volumes::pool_create(&path, size.as_deref(), cluster_kib)
        }
        Command::Pool(PoolCommand::Check { path }) => {
            if volumes::pool_check(&path)? {
                Ok(())
            } else {
                anyhow::bail!("{}: check found problems", path.display())
            }
        }
        Command::Pool(PoolCommand::Dump { path, maps }) => volumes::pool_dump(&path, maps),
        Command::Pool(PoolCommand::Grow { target }) => {
            let before: Vec<LvstoreEntry> =
                client::call(&target, "bdev_lvol_get_lvstores", &LvstoreSelect::default())?;
            let pool =
                before.first().ok_or_else(|| anyhow::anyhow!("the daemon serves no pool"))?;
            let sel = LvstoreSelect { uuid: Some(pool.uuid.clone()), lvs_name: None };
            let _: bool = client::call(&target, "bdev_lvol_grow_lvstore", &sel)?;
            let after: Vec<LvstoreEntry> = client::call(&target, "bdev_lvol_get_lvstores", &sel)?;
            let cluster = pool.cluster_size.max(1);
            let (from, to) = (pool.total_data_clusters, after[0].total_data_clusters);
            if to == from {
                println!(
                    "pool {}: no larger ({} data bytes): nothing to grow into",
                    pool.name,
                    from * cluster
                );
            } else {
                println!(
                    "pool {} grown: {} -> {} data bytes",
                    pool.name,
                    from * cluster,
                    to * cluster
                );
            }
            Ok(())
        }
        Command::Pool(PoolCommand::CopyRate { mib_per_sec: Some(rate), target }) => done(
            &target,
            "bdev_lvol_set_copy_rate",
            &volumes::LvstoreCopyRate { mbytes_per_sec: rate, ..Default::default() },
            match rate {
                0 => "decoupling and inflating unpaced".into(),
                n => format!("decoupling and inflating copy at most {n} MiB/s"),
            },
        ),
        Command::Pool(PoolCommand::CopyRate { mib_per_sec: None, target }) => {
            let r: Vec<LvstoreEntry> =
                client::call(&target, "bdev_lvol_get_lvstores", &LvstoreSelect::default())?;
            let pool = r.first().ok_or_else(|| anyhow::anyhow!("the daemon serves no pool"))?;
            let rate = pool.pool.get("copy_rate_bytes_per_sec").and_then(|v| v.as_u64());
            match rate {
                Some(0) => println!("0 (unpaced)"),
                Some(n) => println!("{} MiB/s", n >> 20),
                None => anyhow::bail!("the daemon does not say its copy rate"),
            }
            Ok(())
        }
        Command::Pool(PoolCommand::Info { target, json }) => {
            let r: Vec<LvstoreEntry> =
                client::call(&target, "bdev_lvol_get_lvstores", &LvstoreSelect::default())?;
            print_pool(&r, json)
        }
        Command::Volume(VolumeCommand::Create { name, size, thick, target }) => done(
            &target,
            "bdev_lvol_create",
            &LvolCreate {
                lvol_name: name.clone(),
                size: Some(SizeParam::Text(size.clone())),
                thin_provision: !thick,
                ..Default::default()
            },
            format!("created {} volume {name} ({size})", if thick { "thick" } else { "thin" }),
        ),
        Command::Volume(VolumeCommand::List { target, json }) => {
            let r: Vec<LvolEntry> =
                client::call(&target, "bdev_lvol_get_lvols", &LvolsSelect::default())?;
            print_volumes(&r, false, json)
        }
        Command::Volume(VolumeCommand::Resize { name, size, force, target }) => done(
            &target,
            "bdev_lvol_resize",
            &LvolResize {
                name: name.clone(),
                size: Some(SizeParam::Text(size.clone())),
                force,
                ..Default::default()
            },
            format!("resized volume {name} to {size}"),
        ),
        Command::Volume(VolumeCommand::Delete { name, target })
        | Command::Snapshot(SnapshotCommand::Delete { name, target }) => done(
            &target,
            "bdev_lvol_delete",
            &LvolName { name: name.clone() },
            format!("deleted {name}"),
        ),
        Command::Volume(VolumeCommand::ReadOnly { name, target }) => done(
            &target,
            "bdev_lvol_set_read_only",
            &LvolName { name: name.clone() },
            format!("volume {name} is read-only"),
        ),
        Command::Volume(VolumeCommand::Decouple { name, inflate, target }) => done(
            &target,
            if inflate { "bdev_lvol_inflate" } else { "bdev_lvol_decouple_parent" },
            &LvolName { name: name.clone() },
            format!("{name} {}", if inflate { "inflated" } else { "decoupled from its parent" }),
        ),
        Command::Volume(VolumeCommand::Rename { name, new_name, target }) => done(
            &target,
            "bdev_lvol_rename",
            &volumes::LvolRename { old_name: name.clone(), new_name: new_name.clone() },
            format!("renamed {name} to {new_name}"),
        ),
        Command::Volume(VolumeCommand::Rollback { name, snapshot, target }) => done(
            &target,
            "bdev_lvol_rollback",
            &LvolRollback { name: name.clone(), snapshot_name: snapshot.clone() },
            format!("rolled {name} back to {snapshot}"),
        ),
        Command::Volume(VolumeCommand::Changes { name, since, target, json }) => {
            let mut all = volumes::ChangesReply { size: 0, extents: Vec::new(), next_offset: None };
            let mut offset = 0;
            loop {
                let page: volumes::ChangesReply = client::call(
                    &target,
                    "bdev_lvol_get_changes",
                    &volumes::LvolChanges {
                        name: name.clone(),
                        base: since.clone(),
                        offset,
                        ..Default::default()
                    },
                )?;
                all.size = page.size;
                all.extents.extend(page.extents);
                match page.next_offset {
                    Some(next) if next > offset => offset = next,
                    Some(next) => {
                        anyhow::bail!("the daemon's next page starts at {next}, not past {offset}")
                    }
                    None => break,
                }
            }
            if json {
                return client::print_json(
                    &serde_json::json!({"size": all.size, "extents": all.extents}),
                );
            }
            let bytes: u64 = all.extents.iter().map(|e| e.length).sum();
            for e in &all.extents {
                println!("{} {}", e.offset, e.length);
            }
            let what =
                since.map_or_else(|| "written".to_string(), |b| format!("changed since {b}"));
            eprintln!(
                "{name}: {} extents, {bytes} of {} bytes {what}",
                all.extents.len(),
                all.size
            );
            Ok(())
        }
        Command::Snapshot(SnapshotCommand::Create { volume, name, target }) => {
            let params = LvolSnapshot {
                lvol_name: volume.clone(),
                snapshot_name: name.clone(),
                report_micros: true,
            };
            let r: serde_json::Value = client::call(&target, "bdev_lvol_snapshot", &params)?;
            println!("created snapshot {name} of {volume} in {} us", r["micros"]);
            Ok(())
        }
        Command::Snapshot(SnapshotCommand::List { target, json }) => {
            let r: Vec<LvolEntry> =
                client::call(&target, "bdev_lvol_get_lvols", &LvolsSelect::default())?;
            print_volumes(&r, true, json)
        }
        Command::Clone(CloneCommand::Create { snapshot, name, target }) => done(
            &target,
            "bdev_lvol_clone",
            &LvolClone { snapshot_name: snapshot.clone(), clone_name: name.clone() },
            format!("created clone {name} of {snapshot}"),
        ),
        _ => unreachable!("not a volume command"),
    }
}

/// Counts each thread's heap allocations, so every data core reports what its turns allocate
/// (`ballast stats`: `allocations`; the per-I/O path allocates nothing).
#[global_allocator]
static ALLOCATOR: ballast_ffi::alloc::CountingAlloc = ballast_ffi::alloc::CountingAlloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Export(ExportCommand::List { target, json }) => client::export_list(&target, json),
        Command::Export(ExportCommand::Add(args)) => client::export_add(&args),
        Command::Export(ExportCommand::Resize { name, size, target }) => {
            let params = rpc_export::ExportResizeParams { name: name.clone(), size: size.clone() };
            client::call(&target, "export_resize", &params)
                .map(|_: serde_json::Value| println!("resized export {name} to {size}"))
        }
        Command::Export(ExportCommand::Remove { name, target }) => {
            client::export_remove(&target, &name)
        }
        Command::Export(ExportCommand::Limit {
            name,
            iops,
            mibs,
            read_mibs,
            write_mibs,
            target,
        }) => {
            let params = serde_json::json!({
                "name": name,
                "rw_ios_per_sec": iops,
                "rw_mbytes_per_sec": mibs,
                "r_mbytes_per_sec": read_mibs,
                "w_mbytes_per_sec": write_mibs,
            });
            let params: serde_json::Map<String, serde_json::Value> = params
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            client::call(&target, "bdev_set_qos_limit", &params)
                .map(|_: serde_json::Value| println!("limits of {name} set"))
        }
        Command::Stats { target, json } => client::stats(&target, json),
        Command::Log { target, level, debug, no_debug } => {
            client::log(&target, level.as_deref(), &debug, &no_debug)
        }
        Command::Rpc { method, params, target } => client::raw(&target, &method, &params),
        Command::Nvmf(cmd) => cli_nvmf::run(cmd),
        cmd
        @ (Command::Pool(_) | Command::Volume(_) | Command::Snapshot(_) | Command::Clone(_)) => {
            volumes_cli(cmd)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ballast: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
