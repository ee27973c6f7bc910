//! `ballast`: the daemon (`ballast serve`) and the command-line client of its control API.

mod client;
mod rpc;
mod rpc_nvmf;
mod serve;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ballast",
    version,
    about = "Userspace block-storage target: NBD (and soon NVMe/TCP) over thin volumes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve(serve::ServeArgs),
    /// Manage NBD exports of a running daemon.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Manage NVMe-oF subsystems of a running daemon.
    #[command(subcommand)]
    Nvmf(NvmfCommand),
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
    /// List exports.
    List {
        #[command(flatten)]
        target: client::Target,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add an export backed by memory or a file/block device.
    Add(AddArgs),
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

#[derive(Args)]
pub struct AddArgs {
    /// Export name clients ask for.
    pub name: String,
    /// Back the export with memory of this size (e.g. 1G).
    #[arg(long, conflicts_with = "file")]
    pub ram: Option<String>,
    /// Back the export with this file or block device.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Create the file sparse with this size if it does not exist.
    #[arg(long, requires = "file")]
    pub size: Option<String>,
    /// Refuse writes.
    #[arg(long)]
    pub read_only: bool,
    /// Free text shown by `nbdinfo --list`.
    #[arg(long, default_value = "")]
    pub description: String,
    #[command(flatten)]
    pub target: client::Target,
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
        Command::Serve(args) => serve::run(args),
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
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ballast: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
