//! The metrics endpoint: a small blocking HTTP/1.1 responder on its own threads (never a data
//! core) answering `GET /metrics` with [`crate::metrics`]' text and 404 for any other path.
//!
//! This module owns the endpoint's socket and its limits. Invariants:
//! - at most [`MetricsLimits::max_clients`] client threads exist at once (plus the one accept
//!   thread); a client beyond the bound gets `503` written non-blocking and is closed without a
//!   thread;
//! - a request head is at most [`MetricsLimits::max_request_bytes`] bytes; a bigger one gets
//!   `431` and is closed; a body is never read;
//! - a client gets [`MetricsLimits::timeout`] to send its request head (in all, not per read)
//!   and each write of the reply waits at most that long; then it is closed and frees its slot;
//! - one request per connection (`Connection: close`): nothing is kept between scrapes;
//! - refusals are logged rate-limited (the 1st, 2nd, 4th, 8th, ... of each kind).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::Control;
use crate::listeners::{RateLimitedLog, Slot};

/// The endpoint's resource limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsLimits {
    /// Most scrapers served at once (each has one thread).
    pub max_clients: usize,
    /// Largest request head (request line and headers), in bytes.
    pub max_request_bytes: usize,
    /// The time a client gets to send its request, and each write of the reply.
    pub timeout: Duration,
}

impl Default for MetricsLimits {
    fn default() -> Self {
        MetricsLimits {
            max_clients: 4,
            max_request_bytes: 8 << 10,
            timeout: Duration::from_secs(10),
        }
    }
}

/// The `ballast serve` flags of the metrics endpoint.
#[derive(clap::Args, Debug, Clone)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (off unless given).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// Most metrics clients served at once; more get 503.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    metrics_max_clients: u32,
    /// Largest metrics request head (e.g. 8K); a bigger one gets 431 and is closed.
    #[arg(long, value_name = "SIZE", default_value = "8K", value_parser = parse_head_limit)]
    metrics_max_request: u64,
    /// Seconds a metrics client may take to send its request (or to take each part of the
    /// reply) before it is closed.
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    metrics_timeout: u64,
}

impl MetricsArgs {
    pub fn limits(&self) -> MetricsLimits {
        MetricsLimits {
            max_clients: self.metrics_max_clients as usize,
            max_request_bytes: usize::try_from(self.metrics_max_request).unwrap_or(usize::MAX),
            timeout: Duration::from_secs(self.metrics_timeout),
        }
    }
}

/// Smallest and largest `--metrics-max-request`: Prometheus sends about 300 bytes.
const MIN_HEAD_LIMIT: u64 = 1 << 10;
const MAX_HEAD_LIMIT: u64 = 1 << 20;

fn parse_head_limit(s: &str) -> Result<u64, String> {
    crate::args::size_between(s, MIN_HEAD_LIMIT, MAX_HEAD_LIMIT, "1K to 1M")
}

/// Why the metrics endpoint could not be started.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("binding the metrics endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("starting the metrics thread: {0}")]
    Thread(#[source] io::Error),
}

/// Binds `addr` and serves the endpoint on background threads; returns the bound address.
pub fn start(
    addr: SocketAddr,
    control: Arc<Control>,
    limits: MetricsLimits,
) -> Result<SocketAddr, MetricsError> {
    let listener = crate::listeners::bind_retrying(addr)
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| MetricsError::Bind { addr, source })?;
    tracing::info!(
        %bound,
        max_clients = limits.max_clients,
        max_request_bytes = limits.max_request_bytes,
        timeout_s = limits.timeout.as_secs(),
        "metrics listening (GET /metrics)"
    );
    let node = crate::metrics::node_name();
    std::thread::Builder::new()
        .name("ballast-metrics".into())
        .spawn(move || accept_loop(&listener, &control, limits, &node))
        .map_err(MetricsError::Thread)?;
    Ok(bound)
}

fn accept_loop(listener: &TcpListener, control: &Arc<Control>, limits: MetricsLimits, node: &str) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut busy_log = RateLimitedLog::default();
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: do not spin.
                tracing::warn!(error = %e, "metrics accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.load(Ordering::Acquire) >= limits.max_clients {
            if let Some(n) = busy_log.should_log() {
                tracing::warn!(
                    limit = limits.max_clients,
                    refused_so_far = n,
                    "metrics client refused: too many metrics clients"
                );
            }
            let body = format!("too many metrics clients (limit {})\n", limits.max_clients);
            refuse(stream, &response("503 Service Unavailable", "text/plain", &body));
            continue;
        }
        // Only this thread increments, so the check above cannot be raced past the bound.
        active.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(active.clone());
        let control = control.clone();
        let node = node.to_string();
        let spawned =
            std::thread::Builder::new().name("ballast-metrics-client".into()).spawn(move || {
                let _slot = slot;
                serve_client(stream, &control, limits, &node);
            });
        if let Err(e) = spawned {
            // The closure (and its slot) was dropped: the count is already released.
            tracing::warn!(error = %e, "metrics client refused: cannot start a thread");
        }
    }
}

/// Writes one reply without ever blocking (a fresh socket's buffer holds it) and closes.
fn refuse(stream: TcpStream, reply: &[u8]) {
    let _ = stream.set_nonblocking(true);
    let _ = (&stream).write_all(reply);
    // Closing with unread input would reset the connection before the peer reads the reply.
    let mut sink = [0u8; 4096];
    for _ in 0..4 {
        if !matches!((&stream).read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// What a request head asked for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `GET /metrics` (or `HEAD`: `body` false).
    Metrics {
        body: bool,
    },
    NotFound,
    WrongMethod,
    Malformed,
}

/// Parses a request head's first line (HTTP/1.x; a query string is ignored).
fn parse_request(head: &[u8]) -> Request {
    let line_end = head.iter().position(|&b| b == b'\r' || b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Request::Malformed;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Malformed;
    };
    if !version.starts_with("HTTP/1.") {
        return Request::Malformed;
    }
    let body = match method {
        "GET" => true,
        "HEAD" => false,
        _ => return Request::WrongMethod,
    };
    let path = target.split('?').next().unwrap_or("");
    if path == "/metrics" {
        Request::Metrics { body }
    } else {
        Request::NotFound
    }
}

/// Where the request head ends (just past the blank line), if it has ended.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Why a client's request head could not be read.
enum HeadError {
    TooLarge,
    TimedOut,
    Closed,
}

/// Reads a request head: bounded in size and, in all, in time.
fn read_head(stream: &mut TcpStream, limits: MetricsLimits) -> Result<Vec<u8>, HeadError> {
    let deadline = Instant::now() + limits.timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::TimedOut);
        }
        let _ = stream.set_read_timeout(Some(left));
        let room = limits.max_request_bytes - buf.len();
        let want = chunk.len().min(room + 1);
        let n = match stream.read(&mut chunk[..want]) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(HeadError::TimedOut)
            }
            Err(_) => return Err(HeadError::Closed),
        };
        // Look for the end only across the new bytes (and the 3 before them).
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf[from..]) {
            buf.truncate(from + end);
            return Ok(buf);
        }
        if buf.len() > limits.max_request_bytes {
            return Err(HeadError::TooLarge);
        }
    }
}

fn serve_client(mut stream: TcpStream, control: &Control, limits: MetricsLimits, node: &str) {
    let _ = stream.set_write_timeout(Some(limits.timeout));
    let reply = match read_head(&mut stream, limits) {
        Ok(head) => match parse_request(&head) {
            Request::Metrics { body } => metrics_reply(control, node, body),
            Request::NotFound => {
                response("404 Not Found", "text/plain", "not found: try /metrics\n")
            }
            Request::WrongMethod => {
                response("405 Method Not Allowed", "text/plain", "only GET and HEAD\n")
            }
            Request::Malformed => response("400 Bad Request", "text/plain", "bad request\n"),
        },
        Err(HeadError::TooLarge) => {
            tracing::warn!(limit = limits.max_request_bytes, "metrics request too large");
            let body = format!("request too large (limit {} bytes)\n", limits.max_request_bytes);
            response("431 Request Header Fields Too Large", "text/plain", &body)
        }
        Err(HeadError::TimedOut) => response("408 Request Timeout", "text/plain", "too slow\n"),
        Err(HeadError::Closed) => return,
    };
    write_within(&mut stream, &reply, limits.timeout);
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Writes `reply` within `limit` in all: a client that reads a byte now and then does not
/// hold its slot past it (a write timeout alone restarts with every byte taken).
fn write_within(stream: &mut TcpStream, reply: &[u8], limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    let mut sent = 0;
    while sent < reply.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || stream.set_write_timeout(Some(left)).is_err() {
            return;
        }
        match stream.write(&reply[sent..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => sent += n,
        }
    }
}

fn metrics_reply(control: &Control, node: &str, body: bool) -> Vec<u8> {
    let scrape = crate::metrics::gather(control, node);
    match crate::metrics::encode(scrape) {
        Ok(text) if body => response("200 OK", crate::metrics::CONTENT_TYPE, &text),
        Ok(text) => {
            let mut head = response("200 OK", crate::metrics::CONTENT_TYPE, &text);
            head.truncate(head.len() - text.len());
            head
        }
        Err(_) => response("500 Internal Server Error", "text/plain", "encoding failed\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_get_and_head_of_metrics_only() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Metrics { body: true }
        );
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Request::Metrics { body: true }
        );
        assert_eq!(
            parse_request(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Request::Metrics { body: false }
        );
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(parse_request(b"GET /metricsx HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"), Request::WrongMethod);
        assert_eq!(parse_request(b"GET /metrics\r\n\r\n"), Request::Malformed);
        assert_eq!(parse_request(b"GET /metrics SPDY/3\r\n\r\n"), Request::Malformed);
        assert_eq!(parse_request(b"\xff\xfe /metrics HTTP/1.1\r\n\r\n"), Request::Malformed);
        assert_eq!(parse_request(b""), Request::Malformed);
    }

    #[test]
    fn head_end_finds_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (client, l.accept().unwrap().0)
    }

    #[test]
    fn a_head_over_the_limit_is_refused_and_one_at_it_passes() {
        let limits = MetricsLimits { max_request_bytes: 1024, ..Default::default() };
        let (mut client, mut server) = pair();
        let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(2000));
        client.write_all(big.as_bytes()).unwrap();
        assert!(matches!(read_head(&mut server, limits), Err(HeadError::TooLarge)));

        let (mut client, mut server) = pair();
        let prefix = "GET /metrics HTTP/1.1\r\nX: ";
        let exact = format!("{prefix}{}\r\n\r\n", "a".repeat(1024 - prefix.len() - 4));
        assert_eq!(exact.len(), 1024);
        client.write_all(exact.as_bytes()).unwrap();
        assert!(matches!(read_head(&mut server, limits), Ok(h) if h.len() == 1024));
    }

    #[test]
    fn a_dribbling_client_times_out_in_all_not_per_read() {
        let limits = MetricsLimits { timeout: Duration::from_millis(300), ..Default::default() };
        let (mut client, mut server) = pair();
        let writer = std::thread::spawn(move || {
            for b in b"GET /metrics HTTP/1.1\r\n" {
                if client.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let t = Instant::now();
        assert!(matches!(read_head(&mut server, limits), Err(HeadError::TimedOut)));
        assert!(t.elapsed() < Duration::from_millis(900));
        drop(server);
        writer.join().unwrap();
    }

    #[test]
    fn flag_defaults_are_the_default_limits() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            metrics: MetricsArgs,
        }
        let f = Flags::parse_from(["serve"]);
        assert_eq!(f.metrics.limits(), MetricsLimits::default());
        assert_eq!(f.metrics.metrics_listen, None);
        let f = Flags::parse_from([
            "serve",
            "--metrics-max-clients",
            "2",
            "--metrics-max-request",
            "2K",
        ]);
        assert_eq!(
            (f.metrics.limits().max_clients, f.metrics.limits().max_request_bytes),
            (2, 2048)
        );
        assert!(Flags::try_parse_from(["serve", "--metrics-max-clients", "0"]).is_err());
        assert!(Flags::try_parse_from(["serve", "--metrics-max-request", "10"]).is_err());
        assert!(Flags::try_parse_from(["serve", "--metrics-timeout", "0"]).is_err());
    }
}
