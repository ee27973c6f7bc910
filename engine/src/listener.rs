//! A TCP listener task: accepts connections on one core and hands each to a core, round-robin,
//! as the task its protocol's factory builds (an NBD connection, an NVMe/TCP queue pair).
//! Each connection first takes a place from the shared [`Admission`]; beyond
//! `max_connections` it is closed at once.

use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use ballast_ffi::{Op, Owned};
use nix::sys::socket::{getpeername, setsockopt, shutdown, sockopt, Shutdown, SockaddrStorage};

use crate::limits::{Admission, ConnGuard};
use crate::reactor::{Cx, Msg, Task};

/// Builds the task serving one accepted connection: `(socket, peer address, its place)`. The
/// task keeps the guard for as long as it lives.
pub type ConnFactory = Arc<dyn Fn(OwnedFd, String, ConnGuard) -> Box<dyn Task> + Send + Sync>;

const TAG_ACCEPT: u32 = 0;
const TAG_BACKOFF: u32 = 1;
/// The first wait after a failed accept; doubling with the failures in a row, up to 16x.
const BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(5);

pub struct Acceptor {
    listener: TcpListener,
    /// Protocol name for logs.
    protocol: &'static str,
    factory: ConnFactory,
    admission: Arc<Admission>,
    next_core: usize,
    inflight: bool,
    stopping: bool,
    errors_in_a_row: u32,
    /// A back-off timer after a failed accept is running (accepting again at once would spin).
    backoff: bool,
}

impl Acceptor {
    pub fn new(
        listener: TcpListener,
        protocol: &'static str,
        factory: ConnFactory,
        admission: Arc<Admission>,
    ) -> Acceptor {
        Acceptor {
            listener,
            protocol,
            factory,
            admission,
            next_core: 0,
            inflight: false,
            stopping: false,
            errors_in_a_row: 0,
            backoff: false,
        }
    }

    fn arm(&mut self, cx: &mut Cx<'_>) {
        if !self.inflight && !self.stopping {
            self.inflight = true;
            cx.submit(Op::Accept { fd: self.listener.as_raw_fd() }, TAG_ACCEPT);
        }
    }

    fn hand_off(&mut self, cx: &mut Cx<'_>, fd: OwnedFd) {
        let peer = getpeername::<SockaddrStorage>(fd.as_raw_fd())
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let Some(guard) = self.admission.admit(self.protocol, &peer) else {
            return; // closed as `fd` drops
        };
        if let Err(e) = setsockopt(&fd, sockopt::TcpNoDelay, &true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        let core = self.next_core % cx.cores();
        self.next_core = self.next_core.wrapping_add(1);
        let factory = self.factory.clone();
        if core == cx.core() {
            cx.spawn_local(factory(fd, peer, guard));
            return;
        }
        let msg = Msg::Spawn(Box::new(move |_cx: &mut Cx<'_>| factory(fd, peer, guard)));
        if let Err(Msg::Spawn(build)) = cx.peers()[core].send(msg) {
            // That core's mailbox is full: serve the connection here instead.
            let task = build(cx);
            cx.spawn_local(task);
        }
    }
}

impl Task for Acceptor {
    fn start(&mut self, cx: &mut Cx<'_>) {
        if let Ok(addr) = self.listener.local_addr() {
            tracing::info!(%addr, core = cx.core(), protocol = self.protocol, "listening");
        }
        self.arm(cx);
    }

    fn on_completion(&mut self, cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned) {
        if tag == TAG_BACKOFF {
            self.backoff = false;
            self.arm(cx);
            return;
        }
        self.inflight = false;
        match owned {
            Owned::Fd(fd) if !self.stopping => {
                self.errors_in_a_row = 0;
                self.hand_off(cx, fd);
            }
            Owned::Fd(_) => {}
            _ => {
                if !self.stopping {
                    self.errors_in_a_row += 1;
                    if self.errors_in_a_row.is_power_of_two() {
                        tracing::warn!(
                            errno = -result,
                            count = self.errors_in_a_row,
                            "accept failed"
                        );
                    }
                    if result != -libc::ECONNABORTED && result != -libc::EINTR {
                        // Out of descriptors or memory: accepting again at once would spin.
                        // A timer, not a sleep: the core goes on serving its connections.
                        let after = BACKOFF_MIN * (1 << self.errors_in_a_row.min(4));
                        self.backoff = true;
                        cx.timer(TAG_BACKOFF, after);
                        return;
                    }
                }
            }
        }
        self.arm(cx);
    }

    fn flush(&mut self, _cx: &mut Cx<'_>) {}

    fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {
        self.stopping = true;
        // Wakes the pending accept with an error.
        let _ = shutdown(self.listener.as_raw_fd(), Shutdown::Both);
    }

    fn is_done(&self) -> bool {
        self.stopping && !self.inflight && !self.backoff
    }
}
