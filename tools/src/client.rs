//! The CLI side of the control API: one JSON-RPC 2.0 call per command over the Unix socket.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde_json::{json, Value};

/// Where the daemon's control socket is (see `locate` for the search).
#[derive(Args, Clone)]
pub struct Target {
    /// Control socket of the daemon (or set BALLAST_RPC_SOCKET). Default: the first live one
    /// of ./ballast-data/ballast.sock, $XDG_RUNTIME_DIR/ballast/ctl.sock, /run/ballast/ctl.sock.
    #[arg(long)]
    pub rpc_socket: Option<PathBuf>,
    /// The daemon's data directory: use its ballast.sock (and look nowhere else).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
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
    pub target: Target,
}

/// Calls `method` and returns its `result`, or the server's error as an error.
pub fn call(target: &Target, method: &str, params: Value) -> anyhow::Result<Value> {
    let (mut stream, _path) =
        crate::locate::connect(target.rpc_socket.as_deref(), target.data_dir.as_deref())?;
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let mut line = serde_json::to_string(&request)?;
    line.push('\n');
    // A refusing daemon (permission, too many clients) may reply and close before it reads our
    // request: if the write fails, its reply still says why.
    let sent = stream.write_all(line.as_bytes());
    let mut responses = serde_json::Deserializer::from_reader(&stream).into_iter::<Value>();
    let response = match (responses.next(), sent) {
        (Some(Ok(response)), _) => response,
        (_, Err(e)) => return Err(e).context("sending the request to the daemon"),
        (Some(Err(e)), Ok(())) => return Err(e).context("reading the daemon's reply"),
        (None, Ok(())) => return Err(anyhow!("daemon closed the connection")),
    };
    if let Some(err) = response.get("error") {
        let msg = err.get("message").and_then(Value::as_str).unwrap_or("unknown error");
        bail!("{method}: {msg}");
    }
    Ok(response.get("result").cloned().unwrap_or(Value::Null))
}

/// `ballast rpc METHOD PARAMS`: prints the result as JSON.
pub fn raw(target: &Target, method: &str, params: &str) -> anyhow::Result<()> {
    let params: Value = serde_json::from_str(params).context("params must be a JSON object")?;
    let result = call(target, method, params)?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}

pub fn export_list(target: &Target, as_json: bool) -> anyhow::Result<()> {
    let result = call(target, "export_list", json!({}))?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    println!("{:<20} {:>14} {:<4} {:<3} BACKEND", "NAME", "SIZE_BYTES", "RO", "DEF");
    for e in result.as_array().into_iter().flatten() {
        println!(
            "{:<20} {:>14} {:<4} {:<3} {}",
            e["name"].as_str().unwrap_or(""),
            e["size_bytes"].as_u64().unwrap_or(0),
            if e["read_only"].as_bool() == Some(true) { "yes" } else { "no" },
            if e["default"].as_bool() == Some(true) { "*" } else { "" },
            e["backend"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

pub fn export_add(args: &AddArgs) -> anyhow::Result<()> {
    let mut params = json!({
        "name": args.name,
        "read_only": args.read_only,
        "description": args.description,
    });
    match (&args.ram, &args.file) {
        (Some(size), None) => params["ram_size"] = json!(size),
        (None, Some(path)) => {
            let abs = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            params["file"] = json!(abs);
            if let Some(size) = &args.size {
                params["size"] = json!(size);
            }
        }
        _ => bail!("give exactly one of --ram SIZE or --file PATH"),
    }
    call(&args.target, "export_add", params)?;
    println!("added export {}", args.name);
    Ok(())
}

pub fn export_remove(target: &Target, name: &str) -> anyhow::Result<()> {
    call(target, "export_remove", json!({"name": name}))?;
    println!("removed export {name}");
    Ok(())
}

pub fn stats(target: &Target, as_json: bool) -> anyhow::Result<()> {
    let result = call(target, "framework_get_reactors", json!({}))?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    println!(
        "{:>4} {:>10} {:>10} {:>8} {:>7} {:>9} {:>9} {:>9} {:>6} {:>10} {:>10}",
        "CORE",
        "READS",
        "WRITES",
        "FLUSHES",
        "ERRORS",
        "P50_US",
        "P99_US",
        "P999_US",
        "CONNS",
        "BUF_MIB",
        "BUF_PEAK"
    );
    let mib = |v: &Value| v.as_u64().unwrap_or(0) as f64 / (1u64 << 20) as f64;
    for c in result["reactors"].as_array().into_iter().flatten() {
        println!(
            "{:>4} {:>10} {:>10} {:>8} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>6} {:>10} {:>10.1}",
            c["core"],
            c["reads"],
            c["writes"],
            c["flushes"],
            c["errors"],
            c["latency_us_p50"].as_f64().unwrap_or(0.0),
            c["latency_us_p99"].as_f64().unwrap_or(0.0),
            c["latency_us_p999"].as_f64().unwrap_or(0.0),
            c["connections_open"],
            format!("{:.1}/{:.0}", mib(&c["buffer_charged"]), mib(&c["buffer_budget"])),
            mib(&c["buffer_peak"]),
        );
    }
    let sum = |key: &str| -> u64 {
        result["reactors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c[key].as_u64().unwrap_or(0))
            .sum()
    };
    let ops: u64 = ["reads", "writes", "flushes", "discards", "write_zeroes", "other"]
        .iter()
        .map(|k| sum(k))
        .sum();
    if ops > 0 {
        let per = |key: &str| sum(key) as f64 / ops as f64;
        println!(
            "per request (since start): {:.2} system calls into the rings, {:.2} sends, {:.2} receives, {:.2} ring operations",
            per("ring_enters"),
            per("sends"),
            per("recvs"),
            per("ring_ops")
        );
    }
    let (l, n) = (&result["limits"], &result["connections"]);
    println!(
        "limits: buffer memory {:.0} MiB, max connections {}, handshake timeout {} ms, stall timeout {} ms",
        mib(&l["buffer_memory"]),
        l["max_connections"],
        l["handshake_timeout"],
        l["stall_timeout"]
    );
    println!(
        "connections: {} open, {} refused, {} handshake timeouts, {} dropped for stalling",
        n["open"], n["refused"], n["handshake_timeouts"], n["stalled_dropped"]
    );
    Ok(())
}
