//! The CLI side of the control API: one JSON-RPC 2.0 call per command over the Unix socket,
//! with the method's own parameter and result types (the ones the daemon decodes and encodes),
//! and the aligned tables the listing commands print unless given `--json`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::rpc_export::{ExportAddParams, ExportEntry, ExportListParams, ExportNameParams};

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

/// Calls `method` with `params` (the method's own parameter type) and decodes its `result` as
/// `R`, or returns the server's error as an error.
pub fn call<P: Serialize + ?Sized, R: DeserializeOwned>(
    target: &Target,
    method: &str,
    params: &P,
) -> anyhow::Result<R> {
    let (mut stream, _path) =
        crate::locate::connect(target.rpc_socket.as_deref(), target.data_dir.as_deref())?;
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let mut line = serde_json::to_string(&request)?;
    line.push('\n');
    // A refusing daemon (permission, too many clients) may reply and close before it reads our
    // request: if the write fails, its reply still says why.
    let sent = stream.write_all(line.as_bytes());
    let mut responses = serde_json::Deserializer::from_reader(&stream).into_iter::<Response>();
    let response = match (responses.next(), sent) {
        (Some(Ok(response)), _) => response,
        (_, Err(e)) => return Err(e).context("sending the request to the daemon"),
        (Some(Err(e)), Ok(())) => return Err(e).context("reading the daemon's reply"),
        (None, Ok(())) => return Err(anyhow!("daemon closed the connection")),
    };
    if let Some(err) = response.error {
        bail!("{method}: {}", err.message.as_deref().unwrap_or("unknown error"));
    }
    serde_json::from_value(response.result)
        .with_context(|| format!("{method}: decoding the result"))
}

/// A JSON-RPC 2.0 response, as the CLI reads it.
#[derive(Deserialize)]
struct Response {
    #[serde(default)]
    result: Value,
    error: Option<ResponseError>,
}

#[derive(Deserialize)]
struct ResponseError {
    message: Option<String>,
}

/// Prints `value` as indented JSON (every `--json`).
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// How a table column lines up.
#[derive(Clone, Copy)]
pub enum Align {
    Left,
    Right,
}

/// `rows` under `columns` headers, each column as wide as its widest cell, two spaces apart;
/// the last column is not padded. Rows shorter than the headers are padded with empty cells.
pub fn table(columns: &[(&str, Align)], rows: Vec<Vec<String>>) -> String {
    let header: Vec<String> = columns.iter().map(|(h, _)| h.to_string()).collect();
    let all: Vec<Vec<String>> = std::iter::once(header).chain(rows).collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| all.iter().map(|r| r.get(i).map_or(0, |c| c.chars().count())).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &all {
        let mut line = String::new();
        for (i, (_, align)) in columns.iter().enumerate() {
            let cell = row.get(i).map_or("", String::as_str);
            let last = i + 1 == columns.len();
            if i > 0 {
                line.push_str("  ");
            }
            match (align, last) {
                (Align::Left, true) => line.push_str(cell),
                (Align::Left, false) => line.push_str(&format!("{cell:<w$}", w = widths[i])),
                (Align::Right, _) => line.push_str(&format!("{cell:>w$}", w = widths[i])),
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
/// `ballast rpc METHOD PARAMS`: prints the result as JSON.
pub fn raw(target: &Target, method: &str, params: &str) -> anyhow::Result<()> {
    let params: Value = serde_json::from_str(params).context("params must be a JSON object")?;
    let result: Value = call(target, method, &params)?;
    print_json(&result)
}

pub fn export_list(target: &Target, as_json: bool) -> anyhow::Result<()> {
    let list: Vec<ExportEntry> = call(target, "export_list", &ExportListParams {})?;
    if as_json {
        return print_json(&list);
    }
    let rows = list
        .iter()
        .map(|e| {
            vec![
                e.name.clone(),
                e.size_bytes.to_string(),
                if e.read_only { "yes" } else { "no" }.to_string(),
                if e.default { "*" } else { "" }.to_string(),
                e.backend.clone(),
            ]
        })
        .collect();
    let columns = [
        ("NAME", Align::Left),
        ("SIZE_BYTES", Align::Right),
        ("RO", Align::Left),
        ("DEF", Align::Left),
        ("BACKEND", Align::Left),
    ];
    print!("{}", table(&columns, rows));
    Ok(())
}

pub fn export_add(args: &AddArgs) -> anyhow::Result<()> {
    let mut params = ExportAddParams {
        name: args.name.clone(),
        read_only: args.read_only,
        description: args.description.clone(),
        ..Default::default()
    };
    match (&args.ram, &args.file) {
        (Some(size), None) => params.ram_size = Some(size.clone()),
        (None, Some(path)) => {
            let abs = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            params.file = Some(abs.to_string_lossy().into_owned());
            params.size = args.size.clone();
        }
        _ => bail!("give exactly one of --ram SIZE or --file PATH"),
    }
    let _: Value = call(&args.target, "export_add", &params)?;
    println!("added export {}", args.name);
    Ok(())
}

pub fn export_remove(target: &Target, name: &str) -> anyhow::Result<()> {
    let _: Value = call(target, "export_remove", &ExportNameParams { name: name.to_string() })?;
    println!("removed export {name}");
    Ok(())
}

/// `ballast log`: changes what is asked (the level, then each flag), then prints the level and
/// the components shown at debug.
pub fn log(
    target: &Target,
    level: Option<&str>,
    debug: &[String],
    no_debug: &[String],
) -> anyhow::Result<()> {
    if let Some(level) = level {
        let _: Value = call(target, "log_set_level", &json!({ "level": level }))?;
    }
    for (flags, method) in [(debug, "log_set_flag"), (no_debug, "log_clear_flag")] {
        for flag in flags {
            let _: Value = call(target, method, &json!({ "flag": flag }))?;
        }
    }
    let level: String = call(target, "log_get_level", &json!({}))?;
    let flags: serde_json::Map<String, Value> = call(target, "log_get_flags", &json!({}))?;
    let on: Vec<&str> =
        flags.iter().filter(|(_, v)| v.as_bool() == Some(true)).map(|(k, _)| k.as_str()).collect();
    println!("level {level}");
    println!("debug {}", if on.is_empty() { "(none)".to_string() } else { on.join(" ") });
    Ok(())
}

pub fn stats(target: &Target, as_json: bool) -> anyhow::Result<()> {
    let result: Value = call(target, "framework_get_reactors", &json!({}))?;
    if as_json {
        return print_json(&result);
    }
    let mib = |v: &Value| v.as_u64().unwrap_or(0) as f64 / (1u64 << 20) as f64;
    let int = |v: &Value| v.as_u64().unwrap_or(0).to_string();
    let us = |v: &Value| format!("{:.1}", v.as_f64().unwrap_or(0.0));
    let rows = result["reactors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                int(&c["core"]),
                int(&c["reads"]),
                int(&c["writes"]),
                int(&c["flushes"]),
                int(&c["errors"]),
                int(&c["in_flight"]),
                us(&c["latency_us_p50"]),
                us(&c["latency_us_p99"]),
                us(&c["latency_us_p999"]),
                int(&c["connections_open"]),
                format!("{:.1}/{:.0}", mib(&c["buffer_charged"]), mib(&c["buffer_budget"])),
                format!("{:.1}", mib(&c["buffer_peak"])),
            ]
        })
        .collect();
    let headers = [
        "CORE", "READS", "WRITES", "FLUSHES", "ERRORS", "QD", "P50_US", "P99_US", "P999_US",
        "CONNS", "BUF_MIB", "BUF_PEAK",
    ];
    let columns: Vec<(&str, Align)> = headers.iter().map(|h| (*h, Align::Right)).collect();
    print!("{}", table(&columns, rows));
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
            "per request (since start): {:.2} system calls into the rings, {:.2} sends, {:.2} receives, {:.2} ring operations, {:.3} heap allocations on the cores",
            per("ring_enters"),
            per("sends"),
            per("recvs"),
            per("ring_ops"),
            per("allocations")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_to_their_widest_cell() {
        let columns = [("NAME", Align::Left), ("SIZE", Align::Right), ("KIND", Align::Left)];
        let rows = vec![
            vec!["a".to_string(), "1073741824".to_string(), "volume".to_string()],
            vec!["snapshot-1".to_string(), "4096".to_string(), "".to_string()],
        ];
        let t = table(&columns, rows);
        assert_eq!(
            t,
            "NAME              SIZE  KIND\n\
             a           1073741824  volume\n\
             snapshot-1        4096\n"
        );
    }
}
