//! `ballast`: the daemon (`ballast serve`) and the command-line client of its control API.

mod client;
mod control;
mod listeners;
mod locate;
mod lvstore;
mod metrics;
mod metrics_http;
#[cfg(test)]
mod module_graph;
mod notify;
mod registry;
mod rpc;
mod rpc_bdev;
mod rpc_error;
mod rpc_export;
mod rpc_nvmf;
mod serve;
mod volumes;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
    Nvmf(NvmfCommand),
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
}

#[derive(Subcommand)]
enum NvmfCommand {
    /// List subsystems with their namespaces, hosts and listeners (JSON).
    List {
        #[command(flatten)]
        target: client::Target,
    },
    /// Create a subsystem (NQN, or a short name made into nqn.2026-11.dev.ballast:NAME).
    Create {
        nqn: String,
        /// Let any host connect (otherwise only hosts added with add-host).
        #[arg(long)]
        allow_any_host: bool,
        #[command(flatten)]
        target: client::Target,
    },
    /// Delete a subsystem; its controllers are torn down.
    Delete {
        nqn: String,
        #[command(flatten)]
        target: client::Target,
    },
    /// Add an export's device as a namespace.
    AddNs {
        nqn: String,
        /// Export (bdev) name.
        bdev: String,
        #[arg(long, default_value_t = 0)]
        nsid: u32,
        /// LBA size: 512 or 4096.
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        #[command(flatten)]
        target: client::Target,
    },
    /// Allow a host NQN.
    AddHost {
        nqn: String,
        host: String,
        #[command(flatten)]
        target: client::Target,
    },
    /// Disallow a host NQN.
    RemoveHost {
        nqn: String,
        host: String,
        #[command(flatten)]
        target: client::Target,
    },
    /// Listen on another address (TCP).
    AddListener {
        nqn: String,
        /// ADDRESS:PORT
        address: std::net::SocketAddr,
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
    /// The running daemon's pool: size, free space, volumes.
    Info {
        #[command(flatten)]
        target: client::Target,
    },
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a thin volume (exported at once over NBD and NVMe/TCP under its name).
    Create {
        name: String,
        /// Size, e.g. 10G.
        size: String,
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
    /// Give a volume the contents of one of its snapshots.
    Rollback {
        name: String,
        snapshot: String,
        #[command(flatten)]
        target: client::Target,
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

fn print_volumes(list: &serde_json::Value, only_snapshots: bool) {
    println!("{:<24} {:>16} {:>16} {:<9} PARENT", "NAME", "SIZE", "ALLOCATED", "KIND");
    for v in list.as_array().into_iter().flatten() {
        let snap = v["snapshot"].as_bool().unwrap_or(false);
        if only_snapshots && !snap {
            continue;
        }
        let kind = match (snap, v["parent"].is_string()) {
            (true, _) => "snapshot",
            (false, true) => "clone",
            (false, false) => "volume",
        };
        println!(
            "{:<24} {:>16} {:>16} {:<9} {}",
            v["name"].as_str().unwrap_or("?"),
            v["size_bytes"].as_u64().unwrap_or(0),
            v["allocated_bytes"].as_u64().unwrap_or(0),
            kind,
            v["parent"].as_str().unwrap_or("-")
        );
    }
}

fn volumes_cli(cmd: Command) -> anyhow::Result<()> {
    use serde_json::json;
    let done = |target: &client::Target, method: &str, params: serde_json::Value, what: String| {
        client::call(target, method, params).map(|_| println!("{what}"))
    };
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
        Command::Pool(PoolCommand::Info { target }) => {
            let r = client::call(&target, "bdev_lvol_get_lvstores", json!({}))?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
        Command::Volume(VolumeCommand::Create { name, size, target }) => done(
            &target,
            "bdev_lvol_create",
            json!({"lvol_name": name, "size": size}),
            format!("created volume {name} ({size})"),
        ),
        Command::Volume(VolumeCommand::List { target, json }) => {
            let r = client::call(&target, "bdev_lvol_get_lvols", json!({}))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_volumes(&r, false);
            }
            Ok(())
        }
        Command::Volume(VolumeCommand::Resize { name, size, force, target }) => done(
            &target,
            "bdev_lvol_resize",
            json!({"name": name, "size": size, "force": force}),
            format!("resized volume {name} to {size}"),
        ),
        Command::Volume(VolumeCommand::Delete { name, target })
        | Command::Snapshot(SnapshotCommand::Delete { name, target }) => {
            done(&target, "bdev_lvol_delete", json!({"name": name}), format!("deleted {name}"))
        }
        Command::Volume(VolumeCommand::Rollback { name, snapshot, target }) => done(
            &target,
            "bdev_lvol_rollback",
            json!({"name": name, "snapshot_name": snapshot}),
            format!("rolled {name} back to {snapshot}"),
        ),
        Command::Snapshot(SnapshotCommand::Create { volume, name, target }) => {
            let r = client::call(
                &target,
                "bdev_lvol_snapshot",
                json!({"lvol_name": volume, "snapshot_name": name, "report_micros": true}),
            )?;
            println!("created snapshot {name} of {volume} in {} us", r["micros"]);
            Ok(())
        }
        Command::Snapshot(SnapshotCommand::List { target }) => {
            let r = client::call(&target, "bdev_lvol_get_lvols", json!({}))?;
            print_volumes(&r, true);
            Ok(())
        }
        Command::Clone(CloneCommand::Create { snapshot, name, target }) => done(
            &target,
            "bdev_lvol_clone",
            json!({"snapshot_name": snapshot, "clone_name": name}),
            format!("created clone {name} of {snapshot}"),
        ),
        _ => unreachable!("not a volume command"),
    }
}

fn full_nqn(nqn: &str) -> String {
    if nqn.starts_with("nqn.") {
        nqn.to_string()
    } else {
        format!("{}{nqn}", ballast_nvmf::NQN_PREFIX)
    }
}

fn nvmf(cmd: NvmfCommand) -> anyhow::Result<()> {
    use serde_json::json;
    let (target, method, params) = match cmd {
        NvmfCommand::List { target } => (target, "nvmf_get_subsystems", json!({})),
        NvmfCommand::Create { nqn, allow_any_host, target } => (
            target,
            "nvmf_create_subsystem",
            json!({"nqn": full_nqn(&nqn), "allow_any_host": allow_any_host}),
        ),
        NvmfCommand::Delete { nqn, target } => {
            (target, "nvmf_delete_subsystem", json!({"nqn": full_nqn(&nqn)}))
        }
        NvmfCommand::AddNs { nqn, bdev, nsid, block_size, target } => (
            target,
            "nvmf_subsystem_add_ns",
            json!({"nqn": full_nqn(&nqn), "namespace": {"bdev_name": bdev, "nsid": nsid, "block_size": block_size}}),
        ),
        NvmfCommand::AddHost { nqn, host, target } => {
            (target, "nvmf_subsystem_add_host", json!({"nqn": full_nqn(&nqn), "host": host}))
        }
        NvmfCommand::RemoveHost { nqn, host, target } => {
            (target, "nvmf_subsystem_remove_host", json!({"nqn": full_nqn(&nqn), "host": host}))
        }
        NvmfCommand::AddListener { nqn, address, target } => (
            target,
            "nvmf_subsystem_add_listener",
            json!({"nqn": full_nqn(&nqn), "listen_address": {"trtype": "tcp", "traddr": address.ip().to_string(), "trsvcid": address.port().to_string()}}),
        ),
    };
    let result = client::call(&target, method, params)?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Export(ExportCommand::List { target, json }) => client::export_list(&target, json),
        Command::Export(ExportCommand::Add(args)) => client::export_add(&args),
        Command::Export(ExportCommand::Resize { name, size, target }) => {
            client::call(&target, "export_resize", serde_json::json!({"name": name, "size": size}))
                .map(|_| println!("resized export {name} to {size}"))
        }
        Command::Export(ExportCommand::Remove { name, target }) => {
            client::export_remove(&target, &name)
        }
        Command::Stats { target, json } => client::stats(&target, json),
        Command::Rpc { method, params, target } => client::raw(&target, &method, &params),
        Command::Nvmf(cmd) => nvmf(cmd),
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
