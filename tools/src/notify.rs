//! Service-manager integration: the `sd_notify` protocol — `READY=1` once pools are open and
//! every listener is bound, `STOPPING=1` when a stop begins, `STATUS=` lines, and `WATCHDOG=1`
//! — as datagrams to the socket the manager names in `NOTIFY_SOCKET` (a path, or `@name` for
//! an abstract socket). Without `NOTIFY_SOCKET` every call does nothing.
//!
//! The watchdog proves the data path turns, not merely that a thread lives: each ping asks
//! every core for its statistics through its mailbox, and `WATCHDOG=1` goes out only when all
//! of them answered within the interval; a stuck core stops the pings and the manager restarts
//! the daemon. Its interval is half of `WATCHDOG_USEC` (when `WATCHDOG_PID`, if set, is ours).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ballast_engine::reactor::{CoreHandle, Msg};

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {0:?} is neither an absolute path nor an abstract @name")]
    BadAddress(String),
    #[error("NOTIFY_SOCKET {addr:?}: {source}")]
    Socket { addr: String, source: std::io::Error },
}

/// Where notifications go.
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The manager's socket from `NOTIFY_SOCKET`; `Ok(None)` when not run by one.
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        let Some(raw) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(None) };
        let raw = raw.to_string_lossy().into_owned();
        let err = |source| NotifyError::Socket { addr: raw.clone(), source };
        let addr = if let Some(name) = raw.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(err)?
        } else if raw.starts_with('/') {
            SocketAddr::from_pathname(&raw).map_err(err)?
        } else {
            return Err(NotifyError::BadAddress(raw));
        };
        let sock = UnixDatagram::unbound().map_err(err)?;
        Ok(Some(Notifier { sock, addr }))
    }

    /// Sends one notification (`KEY=VALUE` lines); a failure is logged, never fatal.
    pub fn send(&self, msg: &str) {
        if let Err(e) = self.sock.send_to_addr(msg.as_bytes(), &self.addr) {
            tracing::warn!(error = %e, "service manager notification failed");
        }
    }
}

/// The watchdog's ping interval: half of `WATCHDOG_USEC`, when it is meant for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// A running watchdog; stops (and is joined) when dropped.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Whether every core answered a statistics request within `within`.
pub fn cores_turning(cores: &[CoreHandle], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut replies = Vec::with_capacity(cores.len());
    for core in cores {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if core.send(Msg::Stats(tx)).is_err() {
            return false; // a full mailbox is a core not keeping up
        }
        replies.push(rx);
    }
    replies.iter().all(|rx| rx.recv_deadline(deadline).is_ok())
}

/// Pings the manager every `every` while all cores answer.
pub fn start_watchdog(
    notifier: Arc<Notifier>,
    cores: Arc<Vec<CoreHandle>>,
    every: Duration,
) -> std::io::Result<Watchdog> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new().name("ballast-watchdog".into()).spawn(move || {
        let mut missed = false;
        while !flag.load(Ordering::SeqCst) {
            let started = Instant::now();
            if cores_turning(&cores, every) {
                notifier.send("WATCHDOG=1");
                missed = false;
            } else if !missed {
                tracing::error!("a core did not answer within the watchdog interval; not pinging");
                missed = true;
            }
            let left = every.saturating_sub(started.elapsed());
            std::thread::park_timeout(left);
        }
    })?;
    Ok(Watchdog { stop, thread: Some(thread) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_a_path_socket_and_bad_addresses_are_refused() {
        let dir = std::env::temp_dir().join(format!("ballast-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        let addr = SocketAddr::from_pathname(&path).unwrap();
        let n = Notifier { sock: UnixDatagram::unbound().unwrap(), addr };
        n.send("READY=1\nSTATUS=serving");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
