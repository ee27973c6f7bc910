//! `ballast-perf`: an NVMe/TCP and NBD load generator. Connects an admin queue and N I/O queues
//! to a subsystem (or, with `--nbd`, N connections to an NBD export), keeps QD commands in
//! flight on each for the runtime, and prints IOPS, bandwidth and completion-latency
//! percentiles (text, or fio-like JSON with `--json`).
#![forbid(unsafe_code)]

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ballast_engine::size::parse_size;
use ballast_perf::bench::{self, BenchConfig, Rw};
use ballast_perf::TlsClient;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "ballast-perf",
    version,
    about = "NVMe/TCP and NBD load generator (blocking initiator)"
)]
struct Args {
    /// Target address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:4420")]
    addr: String,
    /// Subsystem NQN, e.g. nqn.2026-11.dev.ballast:vol0.
    #[arg(long, required_unless_present = "nbd")]
    nqn: Option<String>,
    /// Drive an NBD server instead (ours, nbdkit, qemu-nbd): the export's name; --addr is
    /// then the server's (e.g. 127.0.0.1:10809) and --queues the number of connections.
    #[arg(long, value_name = "EXPORT", conflicts_with_all = ["tls_key", "handshakes", "header_digest", "data_digest"])]
    nbd: Option<String>,
    /// Host NQN sent in Connect.
    #[arg(
        long,
        default_value = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000ba11a570"
    )]
    hostnqn: String,
    /// Namespace id.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    rw: Rw,
    /// Block size (e.g. 4k, 128k, 1m).
    #[arg(long, default_value = "4k")]
    bs: String,
    /// Commands in flight per queue (1..=127).
    #[arg(long, default_value_t = 32)]
    qd: u16,
    /// I/O queues, one thread each.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Seconds to run (fractions allowed).
    #[arg(long, default_value_t = 10.0)]
    runtime: f64,
    /// Bytes of the namespace to use, from offset 0 (default: all of it).
    #[arg(long)]
    size: Option<String>,
    /// Percentage of reads for randrw.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    rwmixread: u8,
    /// Ask for header digests (CRC32C).
    #[arg(long)]
    header_digest: bool,
    /// Ask for data digests (CRC32C).
    #[arg(long)]
    data_digest: bool,
    /// Ask the target to disable SQ flow control (allows C2HData SUCCESS shortcuts).
    #[arg(long)]
    disable_sqflow: bool,
    /// Keep-alive timeout in milliseconds (keep-alives are sent every third of it).
    #[arg(long, default_value_t = 15000)]
    kato_ms: u32,
    /// Socket timeout in seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Stop each queue after this many I/Os (the runtime still bounds the run).
    #[arg(long)]
    number_ios: Option<u64>,
    /// Seed for random offsets.
    #[arg(long, default_value_t = 0x0ba1_1a57)]
    seed: u64,
    /// TLS 1.3 with the PSK in FILE (NVMe interchange format, `NVMeTLSkey-1:01:<base64>:`):
    /// derived for --hostnqn and --nqn as the Linux host derives it (identity NVMe0R0x).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Groups offered with --tls-key, the first with a key share (OpenSSL's list syntax); the
    /// default is tlshd's list, secp384r1 first.
    #[arg(long, value_name = "LIST", default_value = ballast_perf::tls::GROUPS)]
    tls_groups: String,
    /// Instead of I/O: connect an admin queue (TCP, TLS with --tls-key, ICReq, Connect) and
    /// disconnect it, N times in a row; prints handshakes per second.
    #[arg(long, value_name = "N")]
    handshakes: Option<u64>,
    /// Print a fio-like JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Poll each I/O queue's socket instead of sleeping in it (plaintext): each I/O thread
    /// spins on its CPU, as SPDK's perf tool does, so latency holds no wake-up of ours.
    #[arg(long, conflicts_with = "tls_key")]
    poll: bool,
}

fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to nothing"))
}

fn size_arg(name: &str, text: &str) -> anyhow::Result<u64> {
    parse_size(text).with_context(|| format!("--{name} {text:?}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ballast-perf: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let bs = size_arg("bs", &args.bs)?;
    let bs = u32::try_from(bs).context("--bs too large")?;
    let secs = |name: &str, v: f64| {
        if v.is_finite() && v > 0.0 {
            Ok(Duration::from_secs_f64(v))
        } else {
            anyhow::bail!("--{name} must be a positive number of seconds")
        }
    };
    let cfg_nqn = args.nqn.clone().unwrap_or_default();
    let cfg = BenchConfig {
        addr: resolve(&args.addr)?,
        nqn: cfg_nqn.clone(),
        hostnqn: args.hostnqn.clone(),
        nsid: args.nsid,
        rw: args.rw,
        bs,
        qd: args.qd,
        queues: args.queues,
        runtime: secs("runtime", args.runtime)?,
        size: args.size.as_deref().map(|s| size_arg("size", s)).transpose()?,
        rwmixread: args.rwmixread,
        header_digest: args.header_digest,
        data_digest: args.data_digest,
        disable_sqflow: args.disable_sqflow,
        kato_ms: args.kato_ms,
        timeout: secs("timeout", args.timeout)?,
        seed: args.seed,
        number_ios: args.number_ios,
        tls: args
            .tls_key
            .as_deref()
            .map(|path| {
                TlsClient::from_key_file(path, &args.hostnqn, &cfg_nqn, &args.tls_groups)
                    .map(Arc::new)
            })
            .transpose()?,
        poll: args.poll,
        nbd_export: args.nbd.clone(),
    };
    if let Some(count) = args.handshakes {
        let report = bench::handshakes(&cfg, count)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report.json())?);
        } else {
            print!("{}", report.text());
        }
        return Ok(());
    }
    let report = bench::run(&cfg)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}
