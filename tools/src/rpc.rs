//! The control plane: JSON-RPC 2.0 over a Unix socket, on its own threads, never on a data
//! core. This module owns the socket and dispatches each request to the method module that owns
//! its method (`rpc_bdev`, `rpc_export`, `rpc_nvmf`, `volumes`: each lists its methods with
//! their handlers); it implements none but `rpc_get_methods`.
//!
//! Method names follow SPDK where the meaning matches (`bdev_get_bdevs`,
//! `framework_get_reactors`, `rpc_get_methods`); the rest are ours (`export_*`).
//!
//! This module owns the control socket and its limits. Invariants:
//! - The socket is never reachable by other users, not even for an instant: it is bound inside a
//!   fresh 0700 directory, made 0600, and only then renamed onto its final path.
//! - Every accepted peer is checked with SO_PEERCRED: only root and the daemon's own effective
//!   user are served; anyone else gets one JSON-RPC error reply and is closed.
//! - At most [`RpcLimits::max_clients`] client threads exist at once (plus the one accept
//!   thread); a client beyond the bound gets an error reply and is closed without a thread.
//! - One request is at most [`RpcLimits::max_request_bytes`] bytes; a bigger one gets an error
//!   reply and its connection is closed.
//! - A client that sends nothing (or does not read its replies) for
//!   [`RpcLimits::idle_timeout`], or takes longer than that for one request, loses its slot.
//! - Refusals are logged rate-limited (the 1st, 2nd, 4th, 8th, ... of each kind), so a flood of
//!   connections cannot flood the log.
//! - Replies to refused peers are written non-blocking: the accept thread never waits on a peer.

use std::cell::Cell;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::control::{Control, Method};
use crate::listeners::{RateLimitedLog, Slot};

/// The control socket's resource limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RpcLimits {
    /// Largest single request, in bytes.
    pub max_request_bytes: u64,
    /// Most clients served at once (each has one thread).
    pub max_clients: usize,
    /// A client silent this long (or this slow to send one request) is disconnected.
    pub idle_timeout: Duration,
}

impl Default for RpcLimits {
    fn default() -> Self {
        RpcLimits {
            max_request_bytes: 1 << 20,
            max_clients: 16,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// The `ballast serve` flags that set [`RpcLimits`].
#[derive(clap::Args, Debug, Clone)]
pub struct RpcLimitArgs {
    /// Most control-socket clients served at once; more are refused.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    rpc_max_clients: u32,
    /// Largest control request (e.g. 64K, 1M); a bigger one is refused and its client closed.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_request_limit)]
    rpc_max_request: u64,
    /// Seconds a control client may stay silent (or take for one request) before it is closed.
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    rpc_idle_timeout: u64,
}

impl RpcLimitArgs {
    pub fn limits(&self) -> RpcLimits {
        RpcLimits {
            max_request_bytes: self.rpc_max_request,
            max_clients: self.rpc_max_clients as usize,
            idle_timeout: Duration::from_secs(self.rpc_idle_timeout),
        }
    }
}

/// Smallest and largest `--rpc-max-request`: every ordinary request fits in 1 KiB, and one
/// request is held in memory whole.
const MIN_REQUEST_LIMIT: u64 = 1 << 10;
const MAX_REQUEST_LIMIT: u64 = 1 << 30;

fn parse_request_limit(s: &str) -> Result<u64, String> {
    crate::args::size_between(s, MIN_REQUEST_LIMIT, MAX_REQUEST_LIMIT, "1K to 1G")
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}: another daemon is already listening there")]
    InUse(PathBuf),
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> StartError {
    let path = path.to_path_buf();
    move |source| StartError::Io { path, what, source }
}

/// Every method, by the module that owns it (`rpc_get_methods` lists them in this order).
const TABLES: &[&[Method]] = &[
    &[Method { name: "rpc_get_methods", call: rpc_get_methods }],
    crate::rpc_bdev::METHODS,
    crate::rpc_export::METHODS,
    crate::rpc_nvmf::METHODS,
    crate::volumes::METHODS,
    crate::rpc_keyring::METHODS,
    crate::rpc_log::METHODS,
];

fn method(name: &str) -> Option<&'static Method> {
    TABLES.iter().flat_map(|t| t.iter()).find(|m| m.name == name)
}

use crate::rpc_error::{params, DecodeStyle, RpcError};

const PARSE_ERROR: i64 = -32700;

/// Our refusals of a peer (permission, too many clients): JSON-RPC's "server error" range.
const SERVER_REFUSED: i64 = -32000;
/// JSON-RPC "Invalid Request": a request over the size limit, or not a request object.
const INVALID_REQUEST: i64 = -32600;

/// Binds the socket (replacing a stale one) and serves it on a background thread.
pub fn start(path: &Path, control: Arc<Control>, limits: RpcLimits) -> Result<(), StartError> {
    if path.exists() && UnixStream::connect(path).is_ok() {
        return Err(StartError::InUse(path.to_path_buf()));
    }
    let listener = bind_private(path)?;
    tracing::info!(
        socket = %path.display(),
        max_clients = limits.max_clients,
        max_request_bytes = limits.max_request_bytes,
        idle_timeout_s = limits.idle_timeout.as_secs(),
        "control API listening (mode 0600)"
    );
    std::thread::Builder::new()
        .name("ballast-rpc".into())
        .spawn(move || accept_loop(&listener, &control, limits))
        .map_err(io_err(path, "starting the control thread"))?;
    Ok(())
}

/// Binds a listener at `path` that only its owner can connect to, with no window in which it
/// is reachable by others: bind inside a new 0700 directory next to `path`, chmod 0600, then
/// rename onto `path` (which also replaces a stale socket atomically).
fn bind_private(path: &Path) -> Result<UnixListener, StartError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let private = parent.join(format!(".ballast-rpc.{}", std::process::id()));
    if private.symlink_metadata().is_ok() {
        // Left by a crashed daemon that had our pid: it was ours, remove it.
        std::fs::remove_dir_all(&private).map_err(io_err(&private, "removing stale directory"))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io_err(&private, "creating private directory"))?;
    let temp = private.join("s");
    let result = (|| {
        let listener = UnixListener::bind(&temp).map_err(io_err(&temp, "binding"))?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(&temp, "chmod 0600"))?;
        std::fs::rename(&temp, path).map_err(io_err(path, "moving the socket into place"))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&temp);
    let _ = std::fs::remove_dir(&private);
    result
}

fn accept_loop(listener: &UnixListener, control: &Arc<Control>, limits: RpcLimits) {
    let own_uid = nix::unistd::geteuid().as_raw();
    let active = Arc::new(AtomicUsize::new(0));
    let mut denied_log = RateLimitedLog::default();
    let mut busy_log = RateLimitedLog::default();
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: do not spin.
                tracing::warn!(error = %e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let uid = match getsockopt(&stream, sockopt::PeerCredentials) {
            Ok(cred) => Some(cred.uid()),
            Err(e) => {
                tracing::warn!(error = %e, "control socket: SO_PEERCRED failed; refusing");
                None
            }
        };
        if uid != Some(0) && uid != Some(own_uid) {
            let who = uid.map_or("unknown".to_string(), |u| u.to_string());
            if let Some(n) = denied_log.should_log() {
                tracing::warn!(
                    uid = %who,
                    refused_so_far = n,
                    "control client refused: not root or the daemon's user"
                );
            }
            let message = format!("permission denied: uid {who} is not root or the daemon's user");
            refuse(stream, SERVER_REFUSED, &message);
            continue;
        }
        if active.load(Ordering::Acquire) >= limits.max_clients {
            if let Some(n) = busy_log.should_log() {
                tracing::warn!(
                    limit = limits.max_clients,
                    refused_so_far = n,
                    "control client refused: too many control clients"
                );
            }
            let message = format!("too many control clients (limit {})", limits.max_clients);
            refuse(stream, SERVER_REFUSED, &message);
            continue;
        }
        // Only this thread increments, so the check above cannot be raced past the bound.
        active.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(active.clone());
        let control = control.clone();
        let spawned =
            std::thread::Builder::new().name("ballast-rpc-client".into()).spawn(move || {
                let _slot = slot;
                serve_client(stream, &control, limits);
            });
        if let Err(e) = spawned {
            // The closure (and its slot) was dropped: the count is already released.
            tracing::warn!(error = %e, "control client refused: cannot start a thread");
        }
    }
}

fn error_reply(code: i64, message: &str) -> Vec<u8> {
    let reply = json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}});
    format!("{reply}\n").into_bytes()
}

/// Sends one error reply without ever blocking (a fresh socket's buffer holds it) and closes.
fn refuse(stream: UnixStream, code: i64, message: &str) {
    let _ = stream.set_nonblocking(true);
    let _ = (&stream).write_all(&error_reply(code, message));
    // Closing with unread input makes the peer's read after our reply fail with ECONNRESET
    // instead of EOF: take what it has sent so far (bounded, never waiting).
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        if !matches!((&stream).read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
}

/// Counts the bytes the JSON parser takes for the current request and fails the read once they
/// pass the limit, or once the request has taken longer than the idle timeout.
struct RequestReader<R> {
    inner: R,
    state: Rc<RequestState>,
}

struct RequestState {
    limit: u64,
    timeout: Duration,
    taken: Cell<u64>,
    started: Cell<Option<Instant>>,
    too_large: Cell<bool>,
}

impl RequestState {
    /// Called after each parsed request: the next one starts from zero.
    fn reset(&self) {
        self.taken.set(0);
        self.started.set(None);
    }
}

impl<R: Read> Read for RequestReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let s = &self.state;
        let left = s.limit - s.taken.get();
        if left == 0 {
            s.too_large.set(true);
            return Err(io::Error::other("request too large"));
        }
        if s.started.get().is_some_and(|t| t.elapsed() > s.timeout) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request too slow"));
        }
        let max = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        if n > 0 && s.started.get().is_none() {
            s.started.set(Some(Instant::now()));
        }
        s.taken.set(s.taken.get() + n as u64);
        Ok(n)
    }
}

fn serve_client(stream: UnixStream, control: &Control, limits: RpcLimits) {
    let _ = stream.set_read_timeout(Some(limits.idle_timeout));
    let _ = stream.set_write_timeout(Some(limits.idle_timeout));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let state = Rc::new(RequestState {
        limit: limits.max_request_bytes,
        timeout: limits.idle_timeout,
        taken: Cell::new(0),
        started: Cell::new(None),
        too_large: Cell::new(false),
    });
    // serde_json reads byte by byte: the BufReader keeps that off the socket. No framing is
    // needed: requests may or may not end in a newline (SPDK's Python client sends none).
    let reader = RequestReader { inner: BufReader::new(&stream), state: state.clone() };
    let requests = serde_json::Deserializer::from_reader(reader).into_iter::<Value>();
    for request in requests {
        let response = match request {
            Ok(req) => {
                state.reset();
                match handle(&req, control) {
                    Some(response) => response,
                    // A notification's success: no reply.
                    None => continue,
                }
            }
            Err(_) if state.too_large.get() => {
                tracing::warn!(limit = limits.max_request_bytes, "control request too large");
                let message =
                    format!("request too large (limit {} bytes)", limits.max_request_bytes);
                let _ = writer.write_all(&error_reply(INVALID_REQUEST, &message));
                return;
            }
            Err(e) if e.is_io() || e.is_eof() => return,
            Err(e) => {
                let _ = writer.write_all(&error_reply(PARSE_ERROR, &e.to_string()));
                return;
            }
        };
        if writer.write_all(format!("{response}\n").as_bytes()).is_err() {
            return;
        }
    }
}

/// A JSON-RPC 2.0 request, as SPDK's server takes it (lib/jsonrpc/jsonrpc_server.c): one object
/// (a batch array is not supported) with a string `method`, `jsonrpc` "2.0" if present,
/// `params` an object or array (or absent: an array is refused by the method, -32602, as
/// SPDK's object decoders refuse it) and an `id` that is a string, a number or null; anything
/// else is answered -32600 "Invalid request". Other members are ignored (callers pad
/// requests). Without an `id` it is a notification: it runs, and only an error is answered
/// (with `id` null, as SPDK does).
#[derive(serde::Deserialize)]
struct Request {
    #[serde(default)]
    jsonrpc: Option<String>,
    method: String,
    #[serde(default)]
    params: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    id: Option<Value>,
}

/// `id` present (null included) → `Some`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// The request `req` holds, or why it is not one.
fn parse_request(req: &Value) -> Result<Request, String> {
    if req.is_array() {
        return Err("batch requests are not supported".into());
    }
    if !req.is_object() {
        return Err("a request is a JSON object".into());
    }
    let r = Request::deserialize(req).map_err(|e| e.to_string())?;
    if r.jsonrpc.as_deref().is_some_and(|v| v != "2.0") {
        return Err("\"jsonrpc\" must be \"2.0\"".into());
    }
    if r.params.as_ref().is_some_and(|p| !p.is_object() && !p.is_array() && !p.is_null()) {
        return Err("\"params\" must be an object".into());
    }
    if r.id.as_ref().is_some_and(|id| !(id.is_string() || id.is_number() || id.is_null())) {
        return Err("\"id\" must be a string, a number or null".into());
    }
    Ok(r)
}

/// Runs one request; the reply, or `None` for a notification that succeeded.
pub(crate) fn handle(req: &Value, control: &Control) -> Option<Value> {
    let Request { method, params, id, .. } = match parse_request(req) {
        Ok(r) => r,
        Err(why) => {
            tracing::info!(why, "control request refused: not a JSON-RPC 2.0 request");
            let message = format!("Invalid request: {why}");
            return Some(json!({"jsonrpc": "2.0", "id": null,
                "error": {"code": INVALID_REQUEST, "message": message}}));
        }
    };
    let method = method.as_str();
    let params = params.unwrap_or_else(|| json!({}));
    let result = match self::method(method) {
        Some(m) => (m.call)(control, &params),
        None => Err(crate::rpc_error::method_not_found(method)),
    };
    match result {
        Ok(result) => id.map(|id| json!({"jsonrpc": "2.0", "id": id, "result": result})),
        Err(e) => {
            tracing::info!(method, error = %e.message, "control request refused");
            let id = id.unwrap_or(Value::Null);
            Some(
                json!({"jsonrpc": "2.0", "id": id, "error": {"code": e.code, "message": e.message}}),
            )
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GetMethods {
    /// SPDK: only methods allowed in the current state (all of ours always are).
    #[allow(dead_code)]
    current: Option<bool>,
    /// SPDK: also the deprecated names (we have none).
    #[allow(dead_code)]
    include_aliases: Option<bool>,
}

fn rpc_get_methods(_: &Control, p: &Value) -> Result<Value, RpcError> {
    let _: GetMethods = params(p, DecodeStyle::Generic)?;
    let names: Vec<&str> = TABLES.iter().flat_map(|t| t.iter()).map(|m| m.name).collect();
    Ok(json!(names))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(data: &[u8], limit: u64) -> (RequestReader<&[u8]>, Rc<RequestState>) {
        let state = Rc::new(RequestState {
            limit,
            timeout: Duration::from_secs(60),
            taken: Cell::new(0),
            started: Cell::new(None),
            too_large: Cell::new(false),
        });
        (RequestReader { inner: data, state: state.clone() }, state)
    }

    #[test]
    fn requests_up_to_the_limit_pass_and_the_count_resets_per_request() {
        // Two 40-byte requests, no newline between them (as SPDK's client sends), limit 40.
        let one = br#"{"jsonrpc":"2.0","id":1,"method":"x"}   "#;
        assert_eq!(one.len(), 40);
        let data = [&one[..], &one[..]].concat();
        let (r, state) = reader(&data, 40);
        let mut n = 0;
        for v in serde_json::Deserializer::from_reader(r).into_iter::<Value>() {
            if v.is_err() {
                break;
            }
            state.reset();
            n += 1;
        }
        assert_eq!(n, 2);
        assert!(!state.too_large.get());
    }

    #[test]
    fn a_request_over_the_limit_is_refused() {
        let big = format!(r#"{{"method":"x","params":"{}"}}"#, "a".repeat(100));
        let (r, state) = reader(big.as_bytes(), 64);
        let first = serde_json::Deserializer::from_reader(r).into_iter::<Value>().next();
        assert!(matches!(first, Some(Err(e)) if e.is_io()));
        assert!(state.too_large.get());
    }

    #[test]
    fn requests_are_taken_as_spdks_server_takes_them() {
        let ok = |v: Value| parse_request(&v).unwrap_or_else(|e| panic!("{v}: {e}"));
        let r = ok(json!({"jsonrpc": "2.0", "method": "m", "id": 1, "params": {"a": 1}}));
        assert_eq!((r.method.as_str(), r.id), ("m", Some(json!(1))));
        assert_eq!(ok(json!({"jsonrpc": "2.0", "method": "m", "id": "x"})).id, Some(json!("x")));
        assert_eq!(ok(json!({"jsonrpc": "2.0", "method": "m", "id": null})).id, Some(json!(null)));
        assert_eq!(ok(json!({"jsonrpc": "2.0", "method": "m"})).id, None, "a notification");
        ok(json!({"jsonrpc": "2.0", "method": "m", "id": 1, "pad": "x"}));
        ok(json!({"method": "m", "id": 1})); // no `jsonrpc`: taken (SPDK's newer servers do)
        ok(json!({"jsonrpc": "2.0", "method": "m", "id": 1, "params": ["v"]})); // the method refuses
        for (bad, why) in [
            (json!([{"jsonrpc": "2.0", "method": "m", "id": 1}]), "batch"),
            (json!("spdk_get_version"), "JSON object"),
            (json!({"jsonrpc": "1.0", "method": "m", "id": 1}), "must be \"2.0\""),
            (json!({"jsonrpc": "2.0", "id": 1}), "method"),
            (json!({"jsonrpc": "2.0", "method": 7, "id": 1}), "string"),
            (json!({"jsonrpc": "2.0", "method": "m", "id": 1, "params": 7}), "params"),
            (json!({"jsonrpc": "2.0", "method": "m", "id": {"a": 1}}), "id"),
        ] {
            match parse_request(&bad) {
                Ok(_) => panic!("{bad} taken"),
                Err(e) => assert!(e.contains(why), "{bad}: {e}"),
            }
        }
    }

    #[test]
    fn request_limit_flag_parses_sizes_and_refuses_silly_ones() {
        assert_eq!(parse_request_limit("1M"), Ok(1 << 20));
        assert_eq!(parse_request_limit("4096"), Ok(4096));
        assert!(parse_request_limit("0").unwrap_err().contains("from 1K to 1G"));
        assert!(parse_request_limit("2G").is_err());
        assert!(parse_request_limit("lots").is_err());
    }

    #[test]
    fn every_method_has_one_name_and_one_handler() {
        let names: Vec<&str> = TABLES.iter().flat_map(|t| t.iter()).map(|m| m.name).collect();
        let unique: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len(), "a method is listed twice");
        assert!(method("bdev_lvol_create").is_some());
        assert!(method("nvmf_subsystem_add_ns").is_some());
        assert!(method("export_resize").is_some());
        assert!(method("nope").is_none());
    }

    #[test]
    fn flag_defaults_are_the_default_limits() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            rpc: RpcLimitArgs,
        }
        let l = RpcLimits::default();
        assert_eq!((l.max_request_bytes, l.max_clients), (1 << 20, 16));
        assert_eq!(l.idle_timeout, Duration::from_secs(60));
        assert_eq!(Flags::parse_from(["serve"]).rpc.limits(), l);
        let set = Flags::parse_from(["serve", "--rpc-max-clients", "3", "--rpc-max-request", "4K"]);
        assert_eq!((set.rpc.limits().max_clients, set.rpc.limits().max_request_bytes), (3, 4096));
        assert!(Flags::try_parse_from(["serve", "--rpc-max-clients", "0"]).is_err());
        assert!(Flags::try_parse_from(["serve", "--rpc-idle-timeout", "0"]).is_err());
    }
}
