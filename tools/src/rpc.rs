//! The control plane: JSON-RPC 2.0 over a Unix socket, on its own threads, never on a data
//! core. It changes the export table and asks cores for statistics through their mailboxes.
//!
//! Method names follow SPDK where the meaning matches (`bdev_get_bdevs`,
//! `framework_get_reactors`, `rpc_get_methods`); the rest are ours (`export_*`).

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ballast_engine::reactor::CoreHandle;
use ballast_engine::{BlockDev, Msg};
use ballast_nbd::{Export, ExportTable};
use serde_json::{json, Value};

use crate::serve::open_backend;

pub struct Control {
    pub exports: Arc<ExportTable>,
    pub target: Arc<ballast_nvmf::Target>,
    pub cores: Arc<Vec<CoreHandle>>,
    /// The pool whose volumes are exported, if the daemon serves one.
    pub pool: Option<Arc<ballast_engine::volume::dev::PoolHandle>>,
    /// Hosts allowed on subsystems created for new volumes (empty: any host).
    pub allow_hosts: Vec<String>,
    /// Connection limits and what they did.
    pub admission: Arc<ballast_engine::limits::Admission>,
    /// Payload memory of all cores together (each core has its share).
    pub buffer_memory: u64,
}

const METHODS: &[&str] = &[
    "rpc_get_methods",
    "export_list",
    "export_add",
    "export_remove",
    "export_resize",
    "bdev_get_bdevs",
    "framework_get_reactors",
    "nvmf_get_subsystems",
    "nvmf_create_subsystem",
    "nvmf_delete_subsystem",
    "nvmf_subsystem_add_ns",
    "nvmf_subsystem_remove_ns",
    "nvmf_subsystem_add_host",
    "nvmf_subsystem_remove_host",
    "nvmf_subsystem_allow_any_host",
    "nvmf_subsystem_add_listener",
];

/// JSON-RPC error codes.
const INVALID_PARAMS: i64 = -32602;
pub const METHOD_NOT_FOUND: i64 = -32601;
const PARSE_ERROR: i64 = -32700;

pub struct RpcError {
    pub code: i64,
    pub message: String,
}

pub fn invalid(message: impl Into<String>) -> RpcError {
    RpcError { code: INVALID_PARAMS, message: message.into() }
}

/// Binds the socket (replacing a stale one) and serves it on a background thread.
pub fn start(path: &Path, control: Arc<Control>) -> anyhow::Result<()> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!("{}: another daemon is already listening there", path.display());
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    tracing::info!(socket = %path.display(), "control API listening");
    std::thread::Builder::new().name("ballast-rpc".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let control = control.clone();
            let _ = std::thread::Builder::new()
                .name("ballast-rpc-client".into())
                .spawn(move || serve_client(stream, &control));
        }
    })?;
    Ok(())
}

fn serve_client(stream: UnixStream, control: &Control) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let requests = serde_json::Deserializer::from_reader(&stream).into_iter::<Value>();
    for request in requests {
        let response = match request {
            Ok(req) => handle(&req, control),
            Err(e) if e.is_io() || e.is_eof() => return,
            Err(e) => {
                let reply = json!({"jsonrpc": "2.0", "id": null, "error": {"code": PARSE_ERROR, "message": e.to_string()}});
                let _ = writer.write_all(format!("{reply}\n").as_bytes());
                return;
            }
        };
        if writer.write_all(format!("{response}\n").as_bytes()).is_err() {
            return;
        }
    }
}

fn handle(req: &Value, control: &Control) -> Value {
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let method = req.get("method").and_then(Value::as_str).unwrap_or("");
    let params = req.get("params").cloned().unwrap_or_else(|| json!({}));
    let result = match method {
        "rpc_get_methods" => {
            Ok(json!(METHODS.iter().chain(crate::volumes::METHODS).collect::<Vec<_>>()))
        }
        m if m.starts_with("bdev_lvol_") => crate::volumes::handle(control, m, &params),
        "export_list" => Ok(export_list(control)),
        "export_add" => export_add(control, &params),
        "export_remove" => export_remove(control, &params),
        "export_resize" => export_resize(control, &params),
        "bdev_get_bdevs" => Ok(bdev_get_bdevs(control)),
        "framework_get_reactors" => Ok(reactors(control)),
        m if m.starts_with("nvmf_") => crate::rpc_nvmf::handle(control, m, &params),
        _ => {
            Err(RpcError { code: METHOD_NOT_FOUND, message: format!("Method not found: {method}") })
        }
    };
    match result {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(e) => {
            tracing::info!(method, error = %e.message, "control request refused");
            json!({"jsonrpc": "2.0", "id": id, "error": {"code": e.code, "message": e.message}})
        }
    }
}

fn export_list(control: &Control) -> Value {
    let default = control.exports.default_name();
    let list: Vec<Value> = control
        .exports
        .list()
        .iter()
        .map(|e| {
            json!({
                "name": e.name,
                "size_bytes": e.size_bytes(),
                "backend": e.dev.info().backend,
                "read_only": e.read_only,
                "description": e.description,
                "default": default.as_deref() == Some(e.name.as_str()),
            })
        })
        .collect();
    Value::Array(list)
}

fn export_add(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let name = p
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("missing string param: name"))?;
    let read_only = p.get("read_only").and_then(Value::as_bool).unwrap_or(false);
    let description = p.get("description").and_then(Value::as_str).unwrap_or("").to_string();
    if control.exports.get(name).is_some() {
        return Err(invalid(format!("export {name:?} already exists")));
    }
    let spec =
        match (p.get("ram_size").and_then(Value::as_str), p.get("file").and_then(Value::as_str)) {
            (Some(size), None) => format!("ram:{size}"),
            (None, Some(file)) => match p.get("size").and_then(Value::as_str) {
                Some(size) => format!("file:{file}:{size}"),
                None => format!("file:{file}"),
            },
            _ => return Err(invalid("give exactly one of ram_size or file")),
        };
    let dev: Arc<dyn BlockDev> =
        open_backend(&spec, read_only).map_err(|e| invalid(format!("{e:#}")))?;
    control
        .exports
        .add(Export { name: name.to_string(), description, dev, read_only })
        .map_err(|e| invalid(e.to_string()))?;
    tracing::info!(export = name, backend = %spec, "export added");
    Ok(json!(true))
}

fn export_remove(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let name = p
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("missing string param: name"))?;
    let export = control.exports.remove(name).map_err(|e| invalid(e.to_string()))?;
    if let Err(e) = export.dev.flush_blocking() {
        tracing::warn!(export = name, error = %e, "flush on removal failed");
    }
    tracing::info!(export = name, "export removed");
    Ok(json!(true))
}

/// Grows an export's device; NVMe hosts learn the new size through an asynchronous event.
fn export_resize(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let name = p
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("missing string param: name"))?;
    let size = p
        .get("size")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("missing string param: size"))?;
    let bytes = ballast_engine::size::parse_size(size).map_err(|e| invalid(e.to_string()))?;
    let export = control.exports.get(name).filter(|_| !name.is_empty());
    let export = export.ok_or_else(|| invalid(format!("no export named {name:?}")))?;
    export.dev.grow(bytes).map_err(|e| invalid(format!("resize {name}: {e}")))?;
    for subsys in control.target.subsystems() {
        let changed: Vec<u32> = subsys
            .namespaces
            .read()
            .values()
            .filter(|ns| Arc::ptr_eq(&ns.dev, &export.dev))
            .map(|ns| ns.nsid)
            .collect();
        for nsid in changed {
            control.target.namespace_changed(&subsys, nsid);
        }
    }
    tracing::info!(export = name, size_bytes = bytes, "export resized");
    Ok(json!(true))
}

fn bdev_get_bdevs(control: &Control) -> Value {
    let list: Vec<Value> = control
        .exports
        .list()
        .iter()
        .map(|e| {
            let info = e.dev.info();
            json!({
                "name": e.name,
                "block_size": info.block_size,
                "num_blocks": e.dev.size_bytes() / u64::from(info.block_size),
                "product_name": info.backend,
                "claimed": true,
            })
        })
        .collect();
    Value::Array(list)
}

fn reactors(control: &Control) -> Value {
    let mut out = Vec::new();
    for core in control.cores.iter() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if core.send_blocking(Msg::Stats(tx)) {
            if let Ok(snap) = rx.recv_timeout(Duration::from_secs(2)) {
                out.push(serde_json::to_value(snap).unwrap_or(Value::Null));
            }
        }
    }
    let mut limits = serde_json::to_value(&control.admission.limits).unwrap_or(Value::Null);
    limits["buffer_memory"] = json!(control.buffer_memory);
    json!({
        "reactors": out,
        "limits": limits,
        "connections": control.admission.counters(),
    })
}
