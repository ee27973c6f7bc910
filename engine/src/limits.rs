//! Connection limits shared by every protocol: how many connections the daemon takes, how long
//! a handshake may last, how long a connection may hold memory without making progress; and
//! the counters that show them in `ballast stats`.
//!
//! Invariants:
//! - `open` counts live [`ConnGuard`]s exactly: one is made per admitted connection and its
//!   drop (when the connection's task is dropped) gives the place back;
//! - `open <= max_connections`: the acceptor refuses (closes at once) beyond it;
//! - these atomics are touched per connection event (accept, close, timeout), never per I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use std::os::fd::{AsFd, AsRawFd};

/// Drops a connection that broke a deadline: its receives and sends in flight fail now, and
/// when the socket is closed the kernel resets the connection (linger 0) instead of keeping
/// the unsent replies queued behind a FIN that a client which never reads would never let
/// through — the socket's memory returns at once and the client sees the reset.
pub fn abort_socket(fd: &impl AsFd) {
    use nix::sys::socket::{setsockopt, shutdown, sockopt, Shutdown};
    let hard = libc::linger { l_onoff: 1, l_linger: 0 };
    let _ = setsockopt(fd, sockopt::Linger, &hard);
    let _ = shutdown(fd.as_fd().as_raw_fd(), Shutdown::Both);
}

/// The limits every connection lives under.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnLimits {
    /// Connections served at once, all protocols together; more are refused.
    pub max_connections: u64,
    /// NBD option haggling, or NVMe/TCP ICReq + Fabrics Connect, must end within this.
    #[serde(serialize_with = "as_ms")]
    pub handshake_timeout: Duration,
    /// A connection that owes progress (a write payload still arriving, replies it does not
    /// read) and makes none for this long is dropped, and the memory it held returns.
    #[serde(serialize_with = "as_ms")]
    pub stall_timeout: Duration,
}

fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

impl Default for ConnLimits {
    fn default() -> ConnLimits {
        ConnLimits {
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
        }
    }
}

impl ConnLimits {
    /// How often a connection with a deadline checks it: a quarter of the shortest deadline,
    /// between 50 ms and 1 s.
    pub fn tick(&self) -> Duration {
        (self.handshake_timeout.min(self.stall_timeout) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1))
    }
}

/// Counters of what the limits did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ConnCounters {
    pub open: u64,
    pub refused: u64,
    pub handshake_timeouts: u64,
    pub stalled_dropped: u64,
}

/// Admission control for connections: the limits and their counters, shared by all listeners.
#[derive(Debug, Default)]
pub struct Admission {
    pub limits: ConnLimits,
    open: AtomicU64,
    refused: AtomicU64,
    handshake_timeouts: AtomicU64,
    stalled_dropped: AtomicU64,
    /// When the last refusal was logged, and refusals not logged since.
    refusal_log: Mutex<(Option<Instant>, u64)>,
}

impl Admission {
    pub fn new(limits: ConnLimits) -> Arc<Admission> {
        Arc::new(Admission { limits, ..Admission::default() })
    }

    /// Takes a place for a new connection, or refuses it (counted, logged at most once a
    /// second with the number refused since).
    pub fn admit(self: &Arc<Self>, protocol: &str, peer: &str) -> Option<ConnGuard> {
        let prev = self.open.fetch_add(1, Ordering::Relaxed);
        if prev < self.limits.max_connections {
            return Some(ConnGuard(self.clone()));
        }
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.refused.fetch_add(1, Ordering::Relaxed);
        let mut log = self.refusal_log.lock();
        log.1 += 1;
        if log.0.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            tracing::warn!(
                protocol,
                peer,
                refused = log.1,
                max_connections = self.limits.max_connections,
                "connection limit reached; refusing connections"
            );
            *log = (Some(Instant::now()), 0);
        }
        None
    }

    pub fn counters(&self) -> ConnCounters {
        ConnCounters {
            open: self.open.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            handshake_timeouts: self.handshake_timeouts.load(Ordering::Relaxed),
            stalled_dropped: self.stalled_dropped.load(Ordering::Relaxed),
        }
    }
}

/// One admitted connection's place; dropping it gives the place back.
#[derive(Debug)]
pub struct ConnGuard(Arc<Admission>);

impl ConnGuard {
    pub fn limits(&self) -> &ConnLimits {
        &self.0.limits
    }

    /// Counts a connection dropped for not finishing its handshake in time.
    pub fn handshake_timed_out(&self) {
        self.0.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection dropped for holding memory without progress.
    pub fn stalled(&self) {
        self.0.stalled_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let prev = self.0.open.fetch_sub(1, Ordering::Relaxed);
        assert!(prev > 0, "connection guard dropped with no connection open");
    }
}

/// What a connection needs to judge its own deadlines: when it started, and when it last
/// moved. Moving is counted, not timed: `moved` runs on every receive and send, and a clock
/// read there would be one per I/O. The connection's ticks look at the count (`stalled`, asked
/// while the connection owes progress), so progress is dated to the first look that sees it:
/// never earlier than it happened, so a connection is never dropped sooner than with exact
/// times, and at most about two ticks (`ConnLimits::tick`) after the deadline once it owes
/// progress and makes none.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub started: Instant,
    /// When progress was last seen: at the start, or at the tick that saw `moves` change.
    seen_at: Instant,
    /// Times bytes moved; and that count when a tick last looked.
    moves: u64,
    seen: u64,
}

impl Progress {
    pub fn new() -> Progress {
        let now = Instant::now();
        Progress { started: now, seen_at: now, moves: 0, seen: 0 }
    }

    /// Bytes moved: the clock of the stall deadline restarts (as of the next tick).
    #[inline]
    pub fn moved(&mut self) {
        self.moves = self.moves.wrapping_add(1);
    }

    /// How long until the handshake deadline (a connection still in its handshake sleeps this
    /// long rather than ticking: an idle crowd costs one wake-up each, not one a second).
    pub fn handshake_left(&self, limits: &ConnLimits, now: Instant) -> Duration {
        (self.started + limits.handshake_timeout)
            .saturating_duration_since(now)
            .max(Duration::from_millis(10))
    }

    /// Whether a handshake begun at `started` is past `limits`' deadline at `now`.
    pub fn handshake_expired(&self, limits: &ConnLimits, now: Instant) -> bool {
        now.duration_since(self.started) >= limits.handshake_timeout
    }

    /// At a tick (`now`): whether a connection that owes progress has made none for the stall
    /// deadline. Progress made since the last look is dated `now`.
    pub fn stalled(&mut self, limits: &ConnLimits, now: Instant) -> bool {
        if self.moves != self.seen {
            self.seen = self.moves;
            self.seen_at = now;
        }
        now.duration_since(self.seen_at) >= limits.stall_timeout
    }
}

impl Default for Progress {
    fn default() -> Progress {
        Progress::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_and_gives_places_back() {
        let adm = Admission::new(ConnLimits { max_connections: 2, ..ConnLimits::default() });
        let a = adm.admit("nbd", "p").expect("first");
        let b = adm.admit("nbd", "p").expect("second");
        assert!(adm.admit("nbd", "p").is_none());
        assert!(adm.admit("nvme-tcp", "p").is_none());
        assert_eq!(adm.counters().refused, 2);
        assert_eq!(adm.counters().open, 2);
        drop(a);
        let c = adm.admit("nbd", "p").expect("a place came back");
        drop((b, c));
        assert_eq!(adm.counters().open, 0);
    }

    #[test]
    fn deadlines() {
        let limits = ConnLimits {
            handshake_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            ..ConnLimits::default()
        };
        let mut p = Progress::new();
        let t0 = p.started;
        assert!(!p.handshake_expired(&limits, t0 + Duration::from_secs(9)));
        assert!(p.handshake_expired(&limits, t0 + Duration::from_secs(10)));
        assert_eq!(p.handshake_left(&limits, t0 + Duration::from_secs(4)), Duration::from_secs(6));
        assert_eq!(
            p.handshake_left(&limits, t0 + Duration::from_secs(11)),
            Duration::from_millis(10)
        );
        assert!(!p.stalled(&limits, t0 + Duration::from_secs(29)));
        assert!(p.stalled(&limits, t0 + Duration::from_secs(31)));
        // Progress is dated by the tick that sees it, and only once.
        p.moved();
        p.moved();
        let t1 = t0 + Duration::from_secs(32);
        assert!(!p.stalled(&limits, t1), "moved since the last tick");
        assert!(!p.stalled(&limits, t1 + Duration::from_secs(29)));
        assert!(p.stalled(&limits, t1 + Duration::from_secs(30)), "nothing since the tick at t1");
        p.moved();
        assert!(!p.stalled(&limits, t1 + Duration::from_secs(31)));
        assert!(p.stalled(&limits, t1 + Duration::from_secs(61)));
        assert_eq!(limits.tick(), Duration::from_secs(1));
        let short = ConnLimits { handshake_timeout: Duration::from_millis(100), ..limits };
        assert_eq!(short.tick(), Duration::from_millis(50));
    }
}
