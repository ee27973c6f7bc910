//! The TLS layer of one connection on a core: what the NBD connection and the NVMe/TCP queue
//! both put between their parser and their socket once TLS starts. It owns the session, the
//! ciphertext send queue and the ciphertext receive; the protocol keeps its plaintext receive
//! buffer (`RecvBuf`, with its growth and charges) and its plaintext send queue (`out`).
//!
//! Invariants:
//! - what was queued in plaintext before TLS started leaves first and unencrypted (`out` moves
//!   whole into `wire`, a send in flight included), then everything leaves encrypted, in the
//!   order the protocol queued it: `out` is drained into the session just before each send;
//! - at most one ciphertext receive is in flight, and it is posted only once the session has
//!   consumed the last (ciphertext held: one receive's worth, `RECV_BYTES`);
//! - decrypted bytes go into the protocol's `RecvBuf` only as far as it has room, so a
//!   protocol that stops parsing stops the reading (back-pressure reaches the socket);
//! - a handshake step (key exchange, signatures: milliseconds of CPU) runs off the core
//!   ([`Cx::offload`]): the session is away meanwhile — nothing is received, encrypted or
//!   decrypted, and the connection waits for it before it finishes (`recv_inflight`);
//! - the link ends early when the kernel takes the session's records over
//!   ([`offload_to_kernel`]): only with no receive in flight, no ciphertext queued or in
//!   flight, and the session at a record boundary both ways; what `out` holds then was never
//!   encrypted and leaves through the kernel.

use std::os::fd::RawFd;

use ballast_engine::offload::Away;
use ballast_engine::recvbuf::{Posted, RecvBuf};
use ballast_engine::sendq::SendQueue;
use ballast_engine::{Cx, IoBuf};
use ballast_ffi::Op;

use crate::config::Identity;
use crate::ktls::Installed;
use crate::session::{Handoff, ReadOutcome, TlsError, TlsSession};

/// Ciphertext receive buffer: a few TLS records (at most 16 KiB + 256 bytes each).
pub const RECV_BYTES: usize = 48 * 1024;

/// What one step of [`TlsLink::pump`] did.
#[derive(Debug)]
pub enum Pump {
    /// Plaintext was added to the receive buffer: parse it, then pump again.
    Data,
    /// Nothing more without more ciphertext (post a receive), room or memory.
    Idle,
    /// The receive buffer needs memory the core refused: wait for `on_buffers`.
    WaitingForMemory,
    /// The peer closed the session (close_notify).
    Closed,
    /// The session failed (handshake or record): end the connection; what is queued (an
    /// alert) may still be sent.
    Failed(TlsError),
}

/// A handshake step's result coming back from an offload thread.
type Returning = Away<(Box<TlsSession>, Result<(), TlsError>)>;

pub struct TlsLink {
    /// None while a handshake step runs off the core (`away`).
    session: Option<Box<TlsSession>>,
    away: Option<Returning>,
    /// A handshake step that failed off the core, reported by the next `pump`.
    failed: Option<TlsError>,
    /// The tag the connection routes to `on_work_done`.
    work_tag: u32,
    /// The session may still go to the kernel (`offload_to_kernel`).
    kernel_wanted: bool,
    wire: SendQueue,
    recv_inflight: bool,
    /// The handshake's end was reported by `opened`.
    announced: bool,
    /// Plaintext gathered from `out` so that small messages share records.
    staging: Vec<u8>,
}

impl TlsLink {
    /// TLS starts now: `out` (what is queued in plaintext, a send in flight included) moves
    /// into the link and leaves first; `early` is input that already arrived after the
    /// plaintext part (the start of the client's handshake).
    /// `work_tag`: the connection's tag for handshake steps run off the core; its completion
    /// goes to [`TlsLink::on_work_done`].
    pub fn start(
        cx: &mut Cx<'_>,
        mut session: TlsSession,
        out: &mut SendQueue,
        early: &[u8],
        work_tag: u32,
    ) -> TlsLink {
        if !early.is_empty() {
            let mut buf = cx.buf_with_capacity(early.len());
            buf.extend_from_slice(early);
            session.feed(buf);
        }
        TlsLink {
            session: Some(Box::new(session)),
            away: None,
            failed: None,
            work_tag,
            kernel_wanted: true,
            wire: std::mem::take(out),
            recv_inflight: false,
            announced: false,
            staging: Vec::new(),
        }
    }

    /// Decrypts what it can into `recv` (`held`: what the connection holds besides it).
    pub fn pump(&mut self, cx: &mut Cx<'_>, recv: &mut RecvBuf, held: u64) -> Pump {
        if let Some(e) = self.failed.take() {
            return Pump::Failed(e);
        }
        let Some(session) = self.session.as_mut() else { return Pump::Idle };
        if !session.readable() {
            return Pump::Idle;
        }
        if session.is_handshaking() && !self.recv_inflight {
            // Key exchange and signatures cost milliseconds: off the core with them.
            let mut session = self.session.take().expect("session present");
            self.away = Some(cx.offload_with(self.work_tag, move || {
                let result = session.handshake();
                (session, result)
            }));
            return Pump::Idle;
        }
        let mut outcome = Ok(ReadOutcome::WantInput);
        let posted = recv.fill(cx, held, |room| {
            outcome = session.read(room);
            match outcome {
                Ok(ReadOutcome::Data(n)) => n,
                _ => 0,
            }
        });
        match posted {
            Posted::Yes => {}
            Posted::WaitingForMemory => return Pump::WaitingForMemory,
            Posted::No => return Pump::Idle,
        }
        match outcome {
            Ok(ReadOutcome::Data(_)) => Pump::Data,
            Ok(ReadOutcome::WantInput) => Pump::Idle,
            Ok(ReadOutcome::Closed) => Pump::Closed,
            Err(e) => Pump::Failed(e),
        }
    }

    /// A handshake step run off the core came back (the connection's `work_tag` completed).
    pub fn on_work_done(&mut self) {
        let back = self.away.take().expect("handshake step completion without one away");
        match back.take() {
            Some((session, result)) => {
                self.session = Some(session);
                if let Err(e) = result {
                    self.failed = Some(e);
                }
            }
            // The step died with the session (a panic on the offload thread): the
            // connection ends.
            None => self.failed = Some(TlsError::Setup("the handshake step was lost".into())),
        }
    }

    /// The handshake finished since the last call: who the peer is, once.
    pub fn opened(&mut self) -> Option<&Identity> {
        let session = self.session.as_ref()?;
        if self.announced || !session.is_open() {
            return None;
        }
        self.announced = true;
        session.identity()
    }

    /// Protocol and cipher, for logs.
    pub fn describe(&self) -> String {
        self.session.as_ref().map_or_else(|| "TLS handshake under way".into(), |s| s.describe())
    }

    /// Encrypts what `out` holds and starts a send of the ciphertext, unless one is in flight.
    pub fn send(
        &mut self,
        cx: &mut Cx<'_>,
        out: &mut SendQueue,
        fd: RawFd,
        tag: u32,
    ) -> Result<(), TlsError> {
        let mut result = Ok(());
        if let Some(session) = self.session.as_mut() {
            if out.queued() {
                let staging = &mut self.staging;
                staging.clear();
                out.drain(cx, |bytes| staging.extend_from_slice(bytes));
                result = session.write(&self.staging);
            }
            session.take_output(|ciphertext| self.wire.push_bytes(ciphertext));
        }
        self.wire.start(cx, fd, tag);
        result
    }

    /// Posts a ciphertext receive if none is in flight and the last was consumed.
    pub fn post_recv(&mut self, cx: &mut Cx<'_>, fd: RawFd, tag: u32) {
        let Some(session) = self.session.as_mut() else { return };
        if self.recv_inflight || !session.wants_input() || session.is_closed() {
            return;
        }
        let buf = match session.take_spent() {
            Some(buf) => buf,
            None => cx.buf_with_capacity(RECV_BYTES),
        };
        self.recv_inflight = true;
        cx.submit(Op::Recv { fd, buf, max: usize::MAX }, tag);
    }

    /// The ciphertext receive completed; false if the peer is gone (EOF or error).
    pub fn on_recv(&mut self, result: i32, buf: IoBuf) -> bool {
        assert!(self.recv_inflight, "TLS receive completion without a receive");
        self.recv_inflight = false;
        self.session.as_mut().expect("no receive is posted while the session is away").feed(buf);
        result > 0
    }

    /// A ciphertext receive, or a handshake step off the core, is in flight: the connection
    /// must wait for it before it finishes.
    pub fn recv_inflight(&self) -> bool {
        self.recv_inflight || self.away.is_some()
    }

    /// The queue the socket's sends belong to.
    pub fn wire(&mut self) -> &mut SendQueue {
        &mut self.wire
    }

    /// Ciphertext queued or in flight.
    pub fn unsent(&self) -> u64 {
        self.wire.unsent()
    }

    pub fn send_inflight(&self) -> bool {
        self.wire.inflight()
    }

    pub fn broken(&self) -> bool {
        self.wire.broken()
    }

    /// Nothing left to send (or nothing that ever will be).
    pub fn drained(&self) -> bool {
        self.wire.drained()
            && (self.wire.broken() || self.session.as_ref().is_some_and(|s| !s.has_output()))
    }

    /// The connection ends gracefully: close_notify is queued behind what `out` holds and
    /// leaves with the next [`TlsLink::send`]; nothing more is decrypted. True when it was
    /// queued now (send it before closing the socket); false when the session was already
    /// closed, or is away on a handshake step (the connection then simply closes).
    pub fn close(&mut self) -> bool {
        let Some(session) = self.session.as_mut() else { return false };
        if session.is_closed() {
            return false;
        }
        session.close();
        session.has_output()
    }

    /// The connection is finished: the receive buffer returns.
    pub fn release(&mut self, cx: &mut Cx<'_>) {
        assert!(!self.recv_inflight(), "TLS link released with a receive or handshake in flight");
        if let Some(buf) = self.session.as_mut().and_then(|s| s.take_spent()) {
            cx.recycle(buf);
        }
    }
}

/// Hands the connection's TLS records to the kernel when the session can go (see `ktls`):
/// returns true when it went, the link released and gone — from here the socket carries
/// plaintext and the connection's own receive and send paths serve it. An error: the kernel
/// took half of it and the socket serves neither way; the connection must end.
pub fn offload_to_kernel(
    link: &mut Option<Box<TlsLink>>,
    cx: &mut Cx<'_>,
    fd: RawFd,
) -> Result<bool, TlsError> {
    let Some(l) = link.as_mut() else { return Ok(false) };
    // `announced`: the connection has learnt who the peer is (`opened`) — after the link is
    // gone nobody could tell it.
    if !l.kernel_wanted || !l.announced || l.recv_inflight || !l.wire.drained() || l.wire.broken() {
        return Ok(false);
    }
    let Some(session) = l.session.as_ref() else { return Ok(false) };
    match session.handoff() {
        Handoff::NotYet => Ok(false),
        Handoff::Never(why) => {
            l.kernel_wanted = false;
            session.forget_secrets();
            tracing::debug!(%why, tls = %l.describe(), "TLS records stay in userspace");
            Ok(false)
        }
        Handoff::Ready(keys) => {
            // The keys are derived: the secrets they came from are no longer needed.
            session.forget_secrets();
            match keys.install(fd) {
                Installed::Yes => {
                    tracing::debug!(tls = %l.describe(), ?keys, "TLS records handed to the kernel");
                    l.release(cx);
                    *link = None;
                    Ok(true)
                }
                Installed::No(e) => {
                    tracing::debug!(error = %e, "TLS records stay in userspace");
                    l.kernel_wanted = false;
                    Ok(false)
                }
                Installed::Half(e) => {
                    l.kernel_wanted = false;
                    Err(TlsError::Setup(e.to_string()))
                }
            }
        }
    }
}
