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
    /// Remove an export (open connections keep working until they close).
    Remove {
        name: String,
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Export(ExportCommand::List { target, json }) => client::export_list(&target, json),
        Command::Export(ExportCommand::Add(args)) => client::export_add(&args),
        Command::Export(ExportCommand::Remove { name, target }) => {
            client::export_remove(&target, &name)
        }
        Command::Stats { target, json } => client::stats(&target, json),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ballast: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
