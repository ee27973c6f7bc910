//! One NBD connection on one core: turns ring completions into handshake and transmission
//! events, and their results into ring operations.
//!
//! Invariants:
//! - at most one receive (or readiness poll) and one send are in flight; replies produced
//!   while a send is in flight accumulate in `out` and leave together in the next `sendmsg`
//!   (coalescing), and a short send is finished before anything queued after it, so reply
//!   bytes never interleave;
//! - at most `INFLIGHT_MAX` requests and `INFLIGHT_BYTES_MAX` payload bytes are in flight or
//!   unsent; past that the connection stops parsing (back-pressure), it never allocates more;
//!   in the handshake no option is taken while `HANDSHAKE_UNSENT_MAX` bytes of replies are
//!   unsent, and one step of it writes at most `REPLIES_PER_INPUT_MAX` plus one option's;
//! - payload memory is charged to the core's budget before it is used: a write's payload as
//!   its bytes arrive, in windows of at most `PAYLOAD_WINDOW` (never on the header's word
//!   alone: its buffer is a lazily-faulted mapping, so untouched pages cost nothing), a read's
//!   buffer when it is submitted; a refused charge stops parsing until `on_buffers`. `charged`
//!   is exactly what this connection holds (`mem`): request charges (`Inflight::charged`),
//!   the payload being received (`PendingWrite::charged`), and read data still in `out`;
//!   a request for an export whose I/O waiting for its rate limits holds its share of the
//!   core (`BlockDev::held_back`) is not taken either: parsing waits for `on_buffers` too;
//! - deadlines: the handshake must end within `handshake_timeout`; a connection that owes
//!   progress (a write payload still arriving, replies it does not read) and makes none for
//!   `stall_timeout` is dropped. A tick timer runs only while one of them applies;
//! - the task reports done only with no receive, poll, send, timer or request in flight, so
//!   every completion finds it alive; the socket closes (and its place in the connection
//!   limit returns) when the task drops;
//! - after NBD_OPT_STARTTLS is acknowledged every byte is TLS: the acknowledgement and what
//!   was queued before it leave in plaintext first (the queue moves whole into `wire`), then
//!   replies are encrypted from `out` into `wire` just before each send; receives carry
//!   ciphertext into the session, which decrypts into `recv` (the parser's buffer, with its
//!   growth and charges unchanged); a receive is posted only once the last is consumed, so
//!   ciphertext held is one receive's worth. Payloads are never received directly under TLS
//!   in userspace; once the kernel carries the records (`offload_to_kernel`) the link is gone
//!   and the connection is served as a plaintext one. Handshake steps run on offload threads;
//! - a client that ends the connection (NBD_CMD_DISC, NBD_OPT_ABORT) gets a graceful close:
//!   once its replies are out, our close_notify (TLS in userspace or the kernel's) and our FIN,
//!   then what it still sends is read and dropped until its FIN (`Closing`; under kTLS its
//!   alert records too, which a plain receive cannot take). Closing a socket with input
//!   unread makes the kernel answer with a reset, which the client can see as an error instead
//!   of the end (libnbd's TLS close_notify follows its NBD_CMD_DISC at once). The lingering is
//!   bounded: `LINGER_BYTES_MAX`, the stall deadline, the daemon's shutdown;
//! - a connection whose device names another home core (`BlockDev::home_core`: a volume's
//!   family owner) moves there when its handshake ends, before it parses a request: it stops
//!   reading, finishes its last send, cancels its timer, gives its core's memory back and
//!   travels as a whole (`ballast_engine::placed`); input already received (at most `RECV_MIN` bytes,
//!   else it stays) goes along and is parsed first on the new core. A userspace-TLS connection
//!   stays where it is (its session's handshake work is tied to this core's offload tag).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use ballast_engine::gate::{FencePoll, GateTicket, Waiting};
use ballast_engine::holder::Holder;
use ballast_engine::limits::{abort_socket, ConnGuard, Progress};
use ballast_engine::placed::Movable;
use ballast_engine::recvbuf::{Posted, RecvBuf};
use ballast_engine::sendq::SendQueue;
use ballast_engine::stats::{OpKind, Proto};
use ballast_engine::{BlockDev, Cx, IoBuf, IoCmd, Owned, Task};
use ballast_ffi::Op;
use ballast_tls::{offload_to_kernel, Pump, TlsLink, TlsSession};
use nix::sys::socket::{shutdown, Shutdown};
use slab::Slab;

use crate::codec::{self, Framing, ReplyTo, Request};
use crate::exports::ExportTable;
use crate::handshake::{
    Handshake, Negotiated, Step, META_ALLOCATION_ID, META_BITMAP_ID, PAYLOAD_ADVERTISED_MAX,
};
use crate::transmission::{classify, Action, Session};
use crate::NbdTls;

/// Largest receive buffer: a whole 64 KiB option (with its header) fits.
const RECV_BUF_MAX: usize = 256 * 1024;
const INFLIGHT_MAX: usize = 128;
/// Payload bytes in flight to the device plus reply bytes not yet sent; past this the
/// connection stops reading requests (a client that never reads its replies cannot make us
/// buffer more).
const INFLIGHT_BYTES_MAX: u64 = 16 << 20;
/// Handshake replies queued and not yet sent beyond which no further option is taken: a
/// client that asks and does not read holds at most this (and one input's replies).
const HANDSHAKE_UNSENT_MAX: u64 = 256 << 10;
/// The reply scratch buffer's room kept between uses (a large handshake reply's is let go).
const SCRATCH_KEPT: usize = 64 << 10;
/// Descriptors in one block-status reply (32 KiB of them): a client asking about a long,
/// finely fragmented range gets the first ones and asks again from where they end, as the
/// spec allows ("the server MAY return less descriptors").
const BLOCK_STATUS_MAX: usize = 4096;
/// A write payload still missing at least this much is received straight into its buffer.
const DIRECT_RECV_MIN: usize = 64 * 1024;
/// A write payload is charged ahead of its bytes by at most this much.
const PAYLOAD_WINDOW: u64 = 1 << 20;
/// After a disconnect, input read and dropped before the socket is closed regardless.
const LINGER_BYTES_MAX: u64 = 64 * 1024;
/// One receive of that input.
const LINGER_RECV_BYTES: usize = 4096;

const TAG_RECV: u32 = u32::MAX;
const TAG_SEND: u32 = u32::MAX - 1;
const TAG_RECV_PAYLOAD: u32 = u32::MAX - 2;
const TAG_POLL: u32 = u32::MAX - 3;
const TAG_TICK: u32 = u32::MAX - 4;
const TAG_CANCEL: u32 = u32::MAX - 5;
const TAG_TLS_RECV: u32 = u32::MAX - 6;
/// A TLS handshake step run off the core came back.
const TAG_TLS_WORK: u32 = u32::MAX - 7;
/// A receive of what the client sends after it disconnected (dropped).
const TAG_LINGER: u32 = u32::MAX - 8;
/// Parked requests look whether their device's fence was lifted.
const TAG_FENCE_POLL: u32 = u32::MAX - 9;

/// A request handed to the device, waiting for its completion.
struct Inflight {
    handle: u64,
    kind: OpKind,
    offset: u64,
    /// The request's length (a trim's or write-zeroes' may pass 32 bits: extended headers).
    len: u64,
    started: Instant,
    /// Payload memory charged for it (released when it completes, or moved to `out`).
    charged: u64,
    /// FUA on a trim or write-zeroes: once it is done, its device is flushed before it is
    /// answered (the write path's FUA is the backend's; these have none).
    then_flush: bool,
    /// A trim or write-zeroes longer than its device takes as one command
    /// (`BlockDev::effect_piece_max`): the rest, after the piece with the device.
    pieces: Option<Pieces>,
    /// Counted on its device's write gate (`ballast_engine::gate`) from its first command
    /// to its completion.
    gated: Option<GateTicket>,
}

/// What is left of a trim or write-zeroes sent to its device piece by piece, one after
/// another under the request's tag: a device that bounds one command
/// (`BlockDev::effect_piece_max`: a memory device's synchronous zeroing, an NVMe namespace's
/// commands per I/O) gets a long one — NBD's extended headers let it cover the whole export —
/// in pieces cut at multiples of its bound (so a request aligned at its ends stays aligned in
/// every piece, and one misaligned at an end is so only in its first or last piece).
#[derive(Debug, Clone, Copy)]
struct Pieces {
    /// Where the next piece starts.
    next: u64,
    /// Bytes from there still to do.
    left: u64,
    /// The device's longest command.
    piece: u64,
    /// `Some(may_unmap)` for write-zeroes, `None` for a trim.
    zeroes: Option<bool>,
}

impl Pieces {
    /// The command for `[offset, offset + len)` up to the next multiple of `piece`, and the
    /// pieces left after it.
    fn first(offset: u64, len: u64, piece: u64, zeroes: Option<bool>) -> (IoCmd, Option<Pieces>) {
        assert!(piece > 0, "a device's longest command is at least a byte");
        let n = len.min(piece - offset % piece);
        let rest = (len > n).then_some(Pieces { next: offset + n, left: len - n, piece, zeroes });
        let cmd = match zeroes {
            Some(may_unmap) => IoCmd::WriteZeroes { offset, len: n, may_unmap },
            None => IoCmd::Discard { offset, len: n },
        };
        (cmd, rest)
    }

    /// The next piece's command, and what is left after it.
    fn next(self) -> (IoCmd, Option<Pieces>) {
        Self::first(self.next, self.left, self.piece, self.zeroes)
    }
}

/// A write whose payload is still arriving.
struct PendingWrite {
    req: Request,
    fua: bool,
    /// The payload so far; `None` before its first bytes arrive (nothing allocated yet) and
    /// while a receive writes straight into it.
    buf: Option<IoBuf>,
    /// Bytes of it received so far.
    filled: u64,
    /// Bytes of it charged so far (`filled <= charged <= length`).
    charged: u64,
}

impl PendingWrite {
    fn missing(&self) -> usize {
        (self.req.length - self.filled) as usize
    }

    /// Charge needed before `n` more bytes can be taken: up to the next window boundary.
    fn charge_for(&self, n: u64) -> u64 {
        let want = self.filled + n;
        if want <= self.charged {
            return 0;
        }
        let step = want.div_ceil(PAYLOAD_WINDOW) * PAYLOAD_WINDOW;
        step.min(self.req.length) - self.charged
    }
}

/// How the connection ends once nothing is left to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// The socket closes at once (the client left, an error, a deadline, a protocol error).
    Now,
    /// The client disconnected (NBD_CMD_DISC, NBD_OPT_ABORT): close_notify and FIN go out
    /// behind the replies, then `Draining`.
    Graceful,
    /// Our FIN is out; input is read and dropped until the client's FIN, an error,
    /// `LINGER_BYTES_MAX` or the stall deadline. `inflight`: a receive of it is posted.
    Draining { dropped: u64, inflight: bool },
}

enum Phase {
    Handshake(Handshake),
    /// `bitmap`: the image (its `ChangeBase::id`) a selected `qemu:dirty-bitmap:NAME`
    /// context compares with.
    Transmission {
        dev: Arc<dyn BlockDev>,
        session: Session,
        bitmap: Option<u64>,
    },
}

pub struct Conn {
    fd: OwnedFd,
    peer: String,
    /// This connection's place under the connection limit, and the limits it lives under.
    guard: ConnGuard,
    progress: Progress,
    export_name: String,
    exports: Arc<ExportTable>,
    tls_config: NbdTls,
    /// The TLS layer, once NBD_OPT_STARTTLS was acknowledged.
    tls: Option<Box<TlsLink>>,
    phase: Phase,
    /// Largest read or write accepted (what the core's budget can grant one request).
    max_payload: u32,
    recv: RecvBuf,
    /// Payload memory held of the core's budget, besides the receive buffer's growth; a
    /// refused charge makes parsing wait for `on_buffers`.
    mem: Holder,
    /// Parsing stopped because the export's requests waiting for its rate limits hold its
    /// share of the core (`BlockDev::held_back`); cleared once a request is taken again.
    held_back: bool,
    tick_inflight: bool,
    cancel_inflight: bool,
    /// Replies waiting for the next send.
    out: SendQueue,
    scratch: Vec<u8>,
    reqs: Slab<Inflight>,
    bytes_inflight: u64,
    payload: Option<PendingWrite>,
    payload_recv_inflight: bool,
    /// Bytes of a rejected write's payload still to discard.
    skip: u64,
    /// The error reply of a rejected write, sent once its payload is discarded: a reply that
    /// overtook the payload would reach a client still sending it (libnbd cannot match it).
    skip_reply: Option<(ReplyTo, u32, &'static str)>,
    /// No more input will be read (EOF, error, NBD_CMD_DISC, shutdown, protocol error).
    read_closed: bool,
    /// The kernel carries the TLS records (kTLS): the socket's bytes are plaintext, but an
    /// alert is a record of its own, sent and received apart (`ballast_ffi::ktls`).
    ktls: bool,
    closing: Closing,
    done: bool,
    requests_total: u64,
    /// The core this connection is moving to (its device's home), from the handshake's end
    /// until it leaves.
    moving: Option<usize>,
    /// On a connection that moved: input received before the move, parsed first on arrival.
    arrived: Option<Vec<u8>>,
    /// Writes, trims and write-zeroes whose device's write gate is fenced (an NVMe fused
    /// Compare and Write runs alone): their first command, sent once the fence is lifted.
    parked: Vec<(u32, IoCmd, Waiting)>,
    /// The timer of `parked` (and of fused pairs: fences to be lifted, writes to drain).
    fence_poll: FencePoll,
}

impl Conn {
    pub fn new(
        fd: OwnedFd,
        peer: String,
        guard: ConnGuard,
        exports: Arc<ExportTable>,
        tls_config: NbdTls,
    ) -> Conn {
        Conn {
            fd,
            peer,
            guard,
            progress: Progress::new(),
            export_name: String::new(),
            exports,
            tls_config,
            tls: None,
            phase: Phase::Handshake(Handshake::new()),
            max_payload: PAYLOAD_ADVERTISED_MAX,
            recv: RecvBuf::new(RECV_BUF_MAX),
            mem: Holder::default(),
            held_back: false,
            tick_inflight: false,
            cancel_inflight: false,
            out: SendQueue::default(),
            scratch: Vec::new(),
            reqs: Slab::new(),
            bytes_inflight: 0,
            payload: None,
            payload_recv_inflight: false,
            skip: 0,
            skip_reply: None,
            read_closed: false,
            ktls: false,
            closing: Closing::Now,
            done: false,
            requests_total: 0,
            moving: None,
            arrived: None,
            parked: Vec::new(),
            fence_poll: FencePoll::default(),
        }
    }

    /// Takes the connection in on the core it moved to (or came back to): counts it, and
    /// parses the input that came along.
    fn arrive(&mut self, cx: &mut Cx<'_>, early: Vec<u8>) {
        cx.stats().connections_open += 1;
        tracing::debug!(peer = %self.peer, export = %self.export_name, core = cx.core(), input = early.len(), "connection placed on its volume's core");
        if !early.is_empty() {
            self.recv.attach(cx, &early);
            self.parse(cx);
        }
    }

    /// Stops reading; a pending receive returns at once.
    fn close_read(&mut self, why: &str) {
        if !self.read_closed {
            tracing::debug!(peer = %self.peer, why, "closing connection input");
            self.read_closed = true;
        }
        if self.recv.inflight() || self.payload_recv_inflight || self.tls_recv_inflight() {
            let _ = shutdown(self.fd.as_raw_fd(), Shutdown::Read);
        }
    }

    /// Drops the connection at once (a deadline passed): in-flight receives and sends fail,
    /// everything it held is released as they return.
    fn abort(&mut self, why: &'static str) {
        tracing::info!(peer = %self.peer, export = %self.export_name, why, "dropping connection");
        self.read_closed = true;
        if self.closing == Closing::Graceful {
            self.closing = Closing::Now;
        }
        abort_socket(&self.fd);
    }

    fn on_recv(&mut self, cx: &mut Cx<'_>, result: i32, buf: IoBuf) {
        self.recv.on_recv(result, buf);
        if result <= 0 {
            if result < 0 && result != -libc::ECONNRESET {
                tracing::debug!(peer = %self.peer, errno = -result, "receive failed");
            }
            self.read_closed = true;
            return;
        }
        self.progress.moved();
        if !self.read_closed {
            self.parse(cx);
        }
    }

    /// Consumes as much buffered input as the state allows.
    fn parse(&mut self, cx: &mut Cx<'_>) {
        if self.mem.waiting() {
            return;
        }
        let Some(mut buf) = self.recv.take() else {
            return;
        };
        let mut used = 0;
        while !self.read_closed && !self.mem.waiting() && self.moving.is_none() {
            let input = &buf.as_slice()[used..];
            if input.is_empty() {
                break;
            }
            if matches!(self.phase, Phase::Handshake(_)) && self.unsent() >= HANDSHAKE_UNSENT_MAX {
                // Options wait until their replies so far are sent (parsed again then).
                break;
            }
            let step = match &mut self.phase {
                Phase::Handshake(hs) => {
                    self.scratch.clear();
                    let (n, step) = hs.on_input(input, &mut self.scratch, &self.exports);
                    used += n;
                    self.out.push_bytes(&self.scratch);
                    if self.scratch.capacity() > SCRATCH_KEPT {
                        self.scratch = Vec::new();
                    }
                    match step {
                        Step::NeedMore => {
                            // An option's data must be buffered whole: ask for room for it.
                            if n == 0 {
                                self.recv.need(input.len() + 1);
                                break;
                            }
                            // Input is left when the replies reached their bound: go on
                            // (or wait above for them to be sent).
                            continue;
                        }
                        Step::Enter(neg) => {
                            self.enter(cx, neg);
                            continue;
                        }
                        Step::StartTls => {
                            self.start_tls(cx, &buf.as_slice()[used..]);
                            used = buf.len();
                            break;
                        }
                        Step::Close(why) => {
                            tracing::info!(peer = %self.peer, why, "handshake ended");
                            self.read_closed = true;
                            break;
                        }
                        Step::Abort => {
                            tracing::debug!(peer = %self.peer, "client sent NBD_OPT_ABORT");
                            self.read_closed = true;
                            self.closing = Closing::Graceful;
                            break;
                        }
                    }
                }
                Phase::Transmission { .. } => self.parse_transmission(cx, input),
            };
            match step {
                Some(n) if n > 0 => used += n,
                _ => break,
            }
        }
        buf.consume_front(used);
        self.recv.put_back(buf);
    }

    /// NBD_OPT_STARTTLS was acknowledged: from here on every byte is TLS. `early` is input
    /// that arrived after the option (the start of the client's TLS handshake).
    fn start_tls(&mut self, cx: &mut Cx<'_>, early: &[u8]) {
        let Some(server) = &self.tls_config.server else {
            unreachable!("STARTTLS acknowledged without a TLS configuration")
        };
        let session = match TlsSession::accept(server) {
            Ok(session) => session,
            Err(e) => {
                tracing::warn!(peer = %self.peer, error = %e, "cannot start TLS");
                self.read_closed = true;
                return;
            }
        };
        self.tls = Some(Box::new(TlsLink::start(cx, session, &mut self.out, early, TAG_TLS_WORK)));
    }

    fn tls_recv_inflight(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.recv_inflight())
    }

    /// Decrypts what the session can into the parser's buffer and parses it, until it needs
    /// more ciphertext, the buffer is full or memory is short.
    fn pump_tls(&mut self, cx: &mut Cx<'_>) {
        while !self.read_closed && !self.mem.waiting() {
            let Some(tls) = self.tls.as_mut() else { return };
            let pump = tls.pump(cx, &mut self.recv, self.mem.held());
            if let Some(identity) = tls.opened() {
                let identity = identity.name().map(String::from);
                tracing::info!(
                    peer = %self.peer,
                    tls = %tls.describe(),
                    identity = identity.as_deref().unwrap_or("-"),
                    "TLS established"
                );
                if let Phase::Handshake(hs) = &mut self.phase {
                    hs.on_tls_open(identity);
                }
            }
            match pump {
                Pump::Data => self.parse(cx),
                Pump::Idle => return,
                Pump::WaitingForMemory => {
                    self.mem.wait();
                    return;
                }
                Pump::Closed => self.close_read("TLS close_notify"),
                Pump::Failed(e) => {
                    tracing::info!(peer = %self.peer, error = %e, "TLS failed; closing");
                    self.close_read("TLS failed");
                }
            }
        }
    }

    fn on_tls_recv(&mut self, result: i32, buf: IoBuf) {
        let tls = self.tls.as_mut().expect("TLS receive without TLS");
        if tls.on_recv(result, buf) {
            self.progress.moved();
        } else {
            self.read_closed = true;
        }
    }

    /// Sends what is queued: plaintext, or under TLS what `out` holds encrypted into `wire`.
    fn start_send(&mut self, cx: &mut Cx<'_>) {
        let fd = self.fd.as_raw_fd();
        match offload_to_kernel(&mut self.tls, cx, fd) {
            Ok(true) => {
                self.ktls = true;
                tracing::info!(peer = %self.peer, "TLS records handed to the kernel (kTLS)")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(peer = %self.peer, error = %e, "kernel TLS failed halfway; closing");
                self.read_closed = true;
            }
        }
        let Some(tls) = self.tls.as_mut() else {
            self.out.start(cx, fd, TAG_SEND);
            return;
        };
        if let Err(e) = tls.send(cx, &mut self.out, fd, TAG_SEND) {
            tracing::info!(peer = %self.peer, error = %e, "TLS failed; closing");
            self.read_closed = true;
        }
    }

    /// The queue the socket's sends belong to.
    fn wire(&mut self) -> &mut SendQueue {
        match self.tls.as_mut() {
            Some(tls) => tls.wire(),
            None => &mut self.out,
        }
    }

    /// Bytes queued for the socket, encrypted or not, sent or not.
    fn unsent(&self) -> u64 {
        self.out.unsent() + self.tls.as_ref().map_or(0, |t| t.unsent())
    }

    fn send_inflight(&self) -> bool {
        self.out.inflight() || self.tls.as_ref().is_some_and(|t| t.send_inflight())
    }

    fn send_broken(&self) -> bool {
        self.out.broken() || self.tls.as_ref().is_some_and(|t| t.broken())
    }

    fn enter(&mut self, cx: &mut Cx<'_>, neg: Negotiated) {
        tracing::info!(
            peer = %self.peer,
            export = %neg.export.name,
            framing = ?neg.framing,
            "connection open"
        );
        self.export_name = neg.export.name.clone();
        let session = Session {
            size_bytes: neg.export.size_bytes(),
            read_only: neg.export.read_only(),
            framing: neg.framing,
            meta_allocation: neg.meta_allocation,
            meta_bitmap: neg.meta_bitmap.is_some(),
            max_payload: self.max_payload,
        };
        if self.tls.is_none() {
            // (Asked only by a connection that can move: asking places a new family.)
            let home = neg.export.dev.home_core(cx.core());
            self.moving = home.filter(|&core| core != cx.core() && core < cx.cores());
        }
        self.phase = Phase::Transmission {
            dev: neg.export.dev.clone(),
            session,
            bitmap: neg.meta_bitmap.map(|b| b.id),
        };
    }

    /// Charges `bytes` of payload memory to the core's budget; on refusal parsing stops
    /// until `on_buffers`.
    fn charge(&mut self, cx: &mut Cx<'_>, bytes: u64) -> bool {
        self.mem.charge(cx, bytes, self.recv.charged())
    }

    /// Charges the pending write's payload so that `n` more of its bytes can be taken (up to
    /// the next window boundary); false if refused (parsing then waits for `on_buffers`).
    fn charge_payload(&mut self, cx: &mut Cx<'_>, n: u64) -> bool {
        let more = self.payload.as_ref().expect("pending write").charge_for(n);
        if more > 0 && !self.charge(cx, more) {
            return false;
        }
        self.payload.as_mut().expect("pending write").charged += more;
        true
    }

    /// Handles some input in transmission; returns bytes consumed (None/0: wait for more).
    fn parse_transmission(&mut self, cx: &mut Cx<'_>, input: &[u8]) -> Option<usize> {
        if self.skip > 0 {
            let n = (self.skip.min(input.len() as u64)) as usize;
            self.skip -= n as u64;
            if self.skip == 0 {
                if let Some((to, error, why)) = self.skip_reply.take() {
                    self.reply_status(to, error, why);
                }
            }
            return Some(n);
        }
        if let Some(pw) = &self.payload {
            let untouched = pw.buf.is_none() && pw.filled == 0 && pw.charged == 0;
            if untouched && pw.req.length > 0 && input.len() as u64 >= pw.req.length {
                // The whole payload is here: a memory device stores it from the receive
                // buffer (no payload buffer, no charge, no I/O).
                let (offset, n) = (pw.req.offset, pw.req.length as usize);
                let Phase::Transmission { dev, .. } = &self.phase else { unreachable!() };
                let dev = dev.clone();
                // Counted on the device's gate for the store (a fenced gate: the write waits
                // as a buffered one does).
                let gate = dev.write_gate();
                let ticket = gate.map(|g| g.enter(cx.core()));
                let stored = ticket != Some(None) && dev.write_now(offset, &input[..n]);
                if let (Some(g), Some(Some(t))) = (gate, ticket) {
                    g.exit(t);
                }
                if stored {
                    let pw = self.payload.take().expect("pending write");
                    self.bytes_inflight -= pw.req.length;
                    cx.stats().record(
                        dev.info().stats_id,
                        Proto::Nbd,
                        OpKind::Write,
                        n as u64,
                        0,
                        true,
                    );
                    cx.stats().writes_now += 1;
                    if !self.send_broken() {
                        let to = self.reply_to(pw.req.handle, pw.req.offset);
                        self.reply_status(to, 0, "");
                    }
                    return Some(n);
                }
            }
            // Payload bytes are here: charge for them (a window ahead), then take them.
            let n = pw.missing().min(input.len());
            if !self.charge_payload(cx, n as u64) {
                return None;
            }
            let pw = self.payload.as_mut().expect("pending write");
            let buf = pw.buf.get_or_insert_with(|| cx.buf_with_capacity(pw.req.length as usize));
            buf.extend_from_slice(&input[..n]);
            pw.filled += n as u64;
            if pw.missing() == 0 {
                self.submit_write(cx);
            }
            return Some(n);
        }
        if self.saturated() {
            return None;
        }
        let Phase::Transmission { dev, .. } = &self.phase else { unreachable!() };
        if dev.held_back(cx, self.held_back) {
            // The export's I/O waiting for its rate limits holds its share of this core's
            // memory: the request stays buffered (and the socket unread) until some goes.
            self.held_back = true;
            self.mem.wait();
            cx.wait_for_memory();
            return None;
        }
        self.held_back = false;
        let Phase::Transmission { dev, session, .. } = &self.phase else { unreachable!() };
        let (dev, session) = (dev.clone(), *session);
        let header_len = session.framing.request_len();
        // The magic is checked as soon as it is here: a client that lost the framing (a
        // compact header on an extended connection) is not waited for.
        let req = match codec::decode_request(
            &input[..input.len().min(header_len)],
            session.framing,
        ) {
            Ok(req) => req,
            Err(codec::DecodeError::Truncated) => return None,
            Err(e) => {
                tracing::warn!(peer = %self.peer, framing = ?session.framing, error = %e, "bad request header; closing");
                self.read_closed = true;
                return None;
            }
        };
        let action = classify(&req, &session);
        // A read's buffer is charged before the request is taken; refused, the header stays
        // buffered until memory returns.
        let charge = match action {
            Action::Read { offset, len, df }
                if !self.reads_hole(&dev, &session, offset, len, df) =>
            {
                if !self.charge(cx, u64::from(len)) {
                    return None;
                }
                u64::from(len)
            }
            _ => 0,
        };
        self.requests_total += 1;
        self.on_request(cx, req, &dev, session, action, charge);
        Some(header_len)
    }

    /// Whether a read can be answered as a hole without I/O (structured replies, a device
    /// that reports allocation cheaply, and the whole range unallocated).
    fn reads_hole(
        &self,
        dev: &Arc<dyn BlockDev>,
        session: &Session,
        offset: u64,
        len: u32,
        df: bool,
    ) -> bool {
        if df || !session.framing.structured() || len == 0 || !dev.info().cheap_extents {
            return false;
        }
        dev.is_unallocated(offset, u64::from(len))
    }

    fn on_request(
        &mut self,
        cx: &mut Cx<'_>,
        req: Request,
        dev: &Arc<dyn BlockDev>,
        session: Session,
        action: Action,
        charge: u64,
    ) {
        let to = self.reply_to(req.handle, req.offset);
        match action {
            Action::Read { len: 0, .. } => {
                // Nothing to read: a structured reply may carry no zero-length content chunk.
                if session.framing.structured() {
                    codec::encode_done(self.scratch_reset(), to);
                    self.flush_scratch();
                } else {
                    self.reply_status(to, 0, "");
                }
                cx.stats().record(dev.info().stats_id, Proto::Nbd, OpKind::Read, 0, 0, true);
            }
            Action::Trim { len: 0, .. } | Action::WriteZeroes { len: 0, .. } => {
                // Nothing to change (fallocate would refuse an empty range).
                self.reply_status(to, 0, "");
            }
            Action::Read { offset, len, .. } if charge == 0 && len > 0 => {
                codec::encode_offset_hole(self.scratch_reset(), to, true, offset, len);
                self.flush_scratch();
                cx.stats().record(
                    dev.info().stats_id,
                    Proto::Nbd,
                    OpKind::Read,
                    u64::from(len),
                    0,
                    true,
                );
            }
            Action::Read { offset, len, .. } => {
                // Only on a plain socket: a TLS layer would have to read lent bytes.
                let lent = if self.tls.is_none() {
                    dev.lend(cx.core(), offset, u64::from(len))
                } else {
                    None
                };
                match lent {
                    // Answered from the device's memory: no I/O, no buffer, no copy of ours.
                    Some(data) => {
                        let id = dev.info().stats_id;
                        cx.stats().record(id, Proto::Nbd, OpKind::Read, u64::from(len), 0, true);
                        cx.stats().reads_lent += 1;
                        if self.send_broken() {
                            self.mem.release(cx, charge);
                            return;
                        }
                        self.read_reply_header(to, len);
                        self.out.push_lent(data);
                        // Charged like copied data until it is sent.
                        self.mem.to_send(charge);
                    }
                    None => {
                        let tag = self.track(cx, &req, OpKind::Read, charge);
                        let buf = cx.buf(len as usize);
                        dev.submit(cx, IoCmd::Read { offset, buf }, tag);
                    }
                }
            }
            Action::Write { len, fua, .. } => {
                self.bytes_inflight += u64::from(len);
                self.payload = Some(PendingWrite { req, fua, buf: None, filled: 0, charged: 0 });
                if len == 0 {
                    let pw = self.payload.as_mut().expect("pending write");
                    pw.buf = Some(cx.buf_with_capacity(0));
                    self.submit_write(cx);
                }
            }
            Action::Flush => {
                let tag = self.track(cx, &req, OpKind::Flush, 0);
                dev.submit(cx, IoCmd::Flush, tag);
            }
            Action::Trim { offset, len, fua } => {
                self.start_effect(cx, dev, &req, (offset, len), None, fua)
            }
            Action::WriteZeroes { may_unmap, fast: true, .. }
                if !dev.zeroes_are_fast(may_unmap) =>
            {
                // FAST_ZERO: fail at once rather than write zeros (the client writes its own).
                self.reply_status(to, codec::ENOTSUP, "zeroing this range would not be fast");
            }
            Action::WriteZeroes { offset, len, .. }
                if (offset | len) % u64::from(dev.info().min_block.max(1)) != 0 =>
            {
                // Devices refuse part of a block; refused here, before any piece of a long one
                // could have zeroed what precedes its misaligned end.
                self.reply_status(to, codec::EINVAL, "write-zeroes of part of a logical block");
            }
            Action::WriteZeroes { offset, len, may_unmap, fua, .. } => {
                self.start_effect(cx, dev, &req, (offset, len), Some(may_unmap), fua)
            }
            Action::Cache => self.reply_status(to, 0, ""),
            Action::BlockStatus { offset, len, req_one } => {
                self.block_status(dev, session, to, offset, len, req_one)
            }
            Action::Abandon { why } => {
                tracing::warn!(peer = %self.peer, why, kind = req.kind, len = req.length, "protocol violation; closing");
                self.read_closed = true;
            }
            Action::Disconnect => {
                tracing::debug!(peer = %self.peer, "client sent NBD_CMD_DISC");
                self.read_closed = true;
                self.closing = Closing::Graceful;
            }
            Action::Reject { error, discard, why } => {
                tracing::debug!(peer = %self.peer, why, kind = req.kind, offset = req.offset, len = req.length, "request rejected");
                self.skip = discard;
                if discard > 0 {
                    self.skip_reply = Some((to, error, why));
                } else {
                    self.reply_error(to, req.kind == codec::CMD_READ, error, why);
                }
            }
        }
    }

    /// Takes a request in: it counts as in flight on its device until its completion.
    fn track(&mut self, cx: &mut Cx<'_>, req: &Request, kind: OpKind, charged: u64) -> u32 {
        cx.stats().submitted(self.stats_id(), Proto::Nbd);
        if kind == OpKind::Read {
            self.bytes_inflight += req.length;
        }
        let key = self.reqs.insert(Inflight {
            handle: req.handle,
            kind,
            offset: req.offset,
            len: req.length,
            started: Instant::now(),
            charged,
            then_flush: false,
            pieces: None,
            gated: None,
        });
        assert!(key < INFLIGHT_MAX * 2, "request slab beyond its bound");
        key as u32
    }

    /// The statistics id of the export being served (`u32::MAX` before there is one).
    fn stats_id(&self) -> u32 {
        match &self.phase {
            Phase::Transmission { dev, .. } => dev.info().stats_id,
            _ => u32::MAX,
        }
    }

    fn submit_write(&mut self, cx: &mut Cx<'_>) {
        let Some(pw) = self.payload.take() else {
            return;
        };
        let buf = pw.buf.expect("write submitted while its payload is being received");
        assert_eq!(buf.len() as u64, pw.req.length);
        assert_eq!(pw.charged, pw.req.length, "a whole payload is charged");
        let Phase::Transmission { dev, .. } = &self.phase else { unreachable!() };
        let dev = dev.clone();
        let tag = self.track(cx, &pw.req, OpKind::Write, pw.req.length);
        if pw.req.length == 0 {
            cx.recycle(buf);
            cx.complete(tag, 0, Owned::None);
            return;
        }
        self.go(cx, &dev, tag, IoCmd::Write { offset: pw.req.offset, buf, fua: pw.fua }, None);
    }

    /// Sends a tracked write's, trim's or write-zeroes' first command, counted on its
    /// device's write gate; parks it while the gate is fenced, counted among the gate's
    /// waiting writes from its first refusal (`waiting`: it was parked before) until it goes.
    fn go(
        &mut self,
        cx: &mut Cx<'_>,
        dev: &Arc<dyn BlockDev>,
        tag: u32,
        cmd: IoCmd,
        waiting: Option<Waiting>,
    ) {
        match dev.write_gate().map(|g| (g, g.enter(cx.core()))) {
            Some((gate, None)) => {
                let waiting = waiting.unwrap_or_else(|| {
                    cx.stats().writes_fenced += 1;
                    gate.wait()
                });
                self.parked.push((tag, cmd, waiting));
                self.fence_poll.arm(cx, TAG_FENCE_POLL);
            }
            ticket => {
                drop(waiting);
                let ticket = ticket.and_then(|(_, t)| t);
                self.reqs[tag as usize].gated = ticket;
                dev.submit(cx, cmd, tag);
            }
        }
    }

    /// The fence timer: parked commands try again (they are tracked requests: the
    /// connection ends only once they went and completed).
    fn on_fence_poll(&mut self, cx: &mut Cx<'_>) {
        self.fence_poll.fired();
        let Phase::Transmission { dev, .. } = &self.phase else { unreachable!() };
        let dev = dev.clone();
        for (tag, cmd, waiting) in std::mem::take(&mut self.parked) {
            self.go(cx, &dev, tag, cmd, Some(waiting));
        }
    }

    /// One chunk per selected context — `base:allocation` from the device's extents, the
    /// dirty bitmap from its changes against the chosen image — the last one DONE; a context
    /// that fails ends the reply with an error chunk instead.
    fn block_status(
        &mut self,
        dev: &Arc<dyn BlockDev>,
        session: Session,
        to: ReplyTo,
        offset: u64,
        len: u64,
        req_one: bool,
    ) {
        let max = if req_one { 1 } else { BLOCK_STATUS_MAX };
        let Phase::Transmission { bitmap, .. } = &self.phase else { unreachable!() };
        let bitmap = *bitmap;
        self.scratch.clear();
        if session.meta_allocation {
            let descs = dev.extents(offset, len, max).map(|extents| {
                extents
                    .iter()
                    .map(|e| {
                        let flags = if e.hole { codec::STATE_HOLE } else { 0 }
                            | if e.zero { codec::STATE_ZERO } else { 0 };
                        (e.len, flags)
                    })
                    .collect()
            });
            if !self.status_chunk(to, META_ALLOCATION_ID, len, descs, bitmap.is_none()) {
                return self.flush_scratch();
            }
        }
        if let Some(base) = bitmap {
            let descs = dev.changes(base, offset, len, max).map(|runs| {
                runs.iter()
                    .map(|&(n, changed)| (n, if changed { codec::STATE_DIRTY } else { 0 }))
                    .collect()
            });
            self.status_chunk(to, META_BITMAP_ID, len, descs, true);
        }
        self.flush_scratch();
    }

    /// Appends one context's block-status chunk (`done`: the reply's last) to `scratch`, or,
    /// if the device could not say, an error chunk that ends the reply (false returned).
    fn status_chunk(
        &mut self,
        to: ReplyTo,
        context: u32,
        len: u64,
        descs: std::io::Result<Vec<(u64, u32)>>,
        done: bool,
    ) -> bool {
        match descs {
            Ok(mut descs) => {
                if descs.is_empty() {
                    // Nothing said about the range (the device shrank under the request): data
                    // for the allocation, dirty for a bitmap (a copy must not skip it).
                    let flags = if context == META_BITMAP_ID { codec::STATE_DIRTY } else { 0 };
                    descs.push((len, flags));
                }
                // Within the request's range (so within 32 bits unless the framing is
                // extended, whose chunk carries 64-bit lengths), as devices promise.
                clip_to(&mut descs, len);
                codec::encode_block_status_chunk(&mut self.scratch, to, context, &descs, done);
                true
            }
            Err(e) => {
                let (errno, what) = if context == META_BITMAP_ID {
                    (libc::EINVAL, "dirty bitmap: the image it compares with is gone")
                } else {
                    (libc::EIO, "block status failed")
                };
                let error = codec::nbd_error_from_errno(e.raw_os_error().unwrap_or(errno));
                codec::encode_error_chunk(&mut self.scratch, to, error, what);
                false
            }
        }
    }

    fn scratch_reset(&mut self) -> &mut Vec<u8> {
        self.scratch.clear();
        &mut self.scratch
    }

    fn flush_scratch(&mut self) {
        self.out.push_bytes(&self.scratch);
    }

    /// Queues the reply header a successful read's `len` bytes (from the request's offset)
    /// follow.
    fn read_reply_header(&mut self, to: ReplyTo, len: u32) {
        let scratch = self.scratch_reset();
        if to.framing.structured() {
            codec::encode_offset_data_header(scratch, to, true, to.offset, len);
        } else {
            codec::encode_simple_reply(scratch, 0, to.handle);
        }
        self.flush_scratch();
    }

    /// Queues the whole reply to a request that returns no data (`why`: an error's reason,
    /// for a human, where the framing carries one).
    fn reply_status(&mut self, to: ReplyTo, error: u32, why: &str) {
        codec::encode_status_reply(self.scratch_reset(), to, error, why);
        self.flush_scratch();
    }

    /// The framing negotiated (simple before transmission: nothing is answered then).
    fn framing(&self) -> Framing {
        match &self.phase {
            Phase::Transmission { session, .. } => session.framing,
            Phase::Handshake(_) => Framing::Simple,
        }
    }

    /// Where the reply to the request of cookie `handle` at `offset` goes.
    fn reply_to(&self, handle: u64, offset: u64) -> ReplyTo {
        ReplyTo { framing: self.framing(), handle, offset }
    }

    /// Queues the error reply to a request: an error chunk for a read under structured
    /// replies (which may not get a simple reply), else what [`Conn::reply_status`] sends.
    fn reply_error(&mut self, to: ReplyTo, read: bool, error: u32, why: &str) {
        if read && to.framing.structured() {
            codec::encode_error_chunk(self.scratch_reset(), to, error, why);
            self.flush_scratch();
        } else {
            self.reply_status(to, error, why);
        }
    }

    /// Starts a trim (`zeroes: None`) or write-zeroes (`Some(may_unmap)`): its first piece
    /// goes to the device, the rest follow from [`Conn::on_io_done`], then the flush of FUA.
    fn start_effect(
        &mut self,
        cx: &mut Cx<'_>,
        dev: &Arc<dyn BlockDev>,
        req: &Request,
        (offset, len): (u64, u64),
        zeroes: Option<bool>,
        fua: bool,
    ) {
        let kind = if zeroes.is_some() { OpKind::WriteZeroes } else { OpKind::Discard };
        let tag = self.track(cx, req, kind, 0);
        let (cmd, pieces) = Pieces::first(offset, len, dev.effect_piece_max(), zeroes);
        let inflight = &mut self.reqs[tag as usize];
        inflight.then_flush = fua;
        inflight.pieces = pieces;
        self.go(cx, dev, tag, cmd, None);
    }

    fn on_io_done(&mut self, cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned) {
        // (asked before the request is borrowed)
        let (shutting_down, send_broken) = (cx.shutting_down(), self.send_broken());
        let Some(req) = self.reqs.get_mut(tag as usize) else {
            panic!("completion for unknown request tag {tag}");
        };
        let mut result = result;
        if let Some(pieces) = req.pieces.take() {
            if let Owned::Buf(buf) = owned {
                cx.recycle(buf); // (none comes with a trim or write-zeroes)
            }
            let ends = if result == -libc::EOPNOTSUPP && req.kind == OpKind::Discard {
                // The device cannot trim: the rest would do nothing either. What pieces did
                // is still flushed for FUA below.
                result = 0;
                true
            } else if result >= 0 && (shutting_down || send_broken) {
                // Nobody waits for the rest (the daemon stops; the reply cannot be sent).
                result = if shutting_down { -libc::ESHUTDOWN } else { -libc::EIO };
                true
            } else {
                result < 0
            };
            if !ends {
                // A piece done: the next one, under the same tag.
                let (cmd, rest) = pieces.next();
                req.pieces = rest;
                let Phase::Transmission { dev, .. } = &self.phase else { unreachable!() };
                dev.clone().submit(cx, cmd, tag);
                return;
            }
            return self.on_io_done(cx, tag, result, Owned::None);
        }
        if req.then_flush && result >= 0 {
            // Done: now make it durable (FUA), under the same tag.
            req.then_flush = false;
            debug_assert!(matches!(owned, Owned::None));
            let Phase::Transmission { dev, .. } = &self.phase else { unreachable!() };
            dev.clone().submit(cx, IoCmd::Flush, tag);
            return;
        }
        let req = self.reqs.remove(tag as usize);
        if let Some(t) = req.gated {
            let Phase::Transmission { dev, .. } = &self.phase else { unreachable!() };
            dev.write_gate().expect("a request counted on its device's gate").exit(t);
        }
        if matches!(req.kind, OpKind::Read | OpKind::Write) {
            self.bytes_inflight -= req.len;
        }
        let full = match req.kind {
            OpKind::Read | OpKind::Write => i64::from(result) == req.len as i64,
            // A trim is a hint: a device that cannot did nothing, which is allowed.
            OpKind::Discard => result >= 0 || result == -libc::EOPNOTSUPP,
            _ => result >= 0,
        };
        let error = if full {
            0
        } else if result < 0 {
            codec::nbd_error_from_errno(-result)
        } else {
            codec::EIO
        };
        if error != 0 {
            tracing::warn!(peer = %self.peer, export = %self.export_name, offset = req.offset, len = req.len, result, "I/O failed");
        }
        let latency_ns = req.started.elapsed().as_nanos() as u64;
        let dev = self.stats_id();
        cx.stats().retired(dev, Proto::Nbd);
        cx.stats().record(dev, Proto::Nbd, req.kind, req.len, latency_ns, error == 0);
        let to = self.reply_to(req.handle, req.offset);
        match (req.kind, owned, error) {
            (OpKind::Read, Owned::Buf(data), 0) if !self.send_broken() => {
                let len = u32::try_from(req.len).expect("a read is at most the maximum payload");
                self.read_reply_header(to, len);
                self.out.push_buf(cx, data);
                // The data's memory stays charged until it is sent.
                self.mem.to_send(req.charged);
            }
            (_, owned, error) => {
                if let Owned::Buf(buf) = owned {
                    cx.recycle(buf);
                }
                self.mem.release(cx, req.charged);
                if self.send_broken() {
                    return;
                }
                match req.kind {
                    // (a short read is an error too)
                    OpKind::Read => {
                        let error = if error == 0 { codec::EIO } else { error };
                        self.reply_error(to, true, error, "read failed")
                    }
                    _ => self.reply_status(to, error, "I/O failed"),
                }
            }
        }
    }

    fn on_send(&mut self, cx: &mut Cx<'_>, result: i32, owned: Owned) {
        if result > 0 {
            self.progress.moved();
        }
        if let Err(errno) = self.wire().on_complete(cx, result, owned) {
            if errno != libc::EPIPE && errno != libc::ECONNRESET {
                tracing::debug!(peer = %self.peer, errno, "send failed");
            }
            // Nothing more can be answered: stop reading too, so the connection ends.
            self.close_read("send failed");
        }
        // Read data that left (or never will) gives its memory back.
        let unsent = self.unsent();
        self.mem.sent(cx, unsent);
    }

    /// Whether the client owes us progress: a write payload it is sending, or replies it
    /// must read before we can send more.
    fn owes_progress(&self) -> bool {
        (self.payload.is_some() && !self.mem.waiting())
            || (self.send_inflight() && self.unsent() > 0)
    }

    /// Waiting for a client that disconnected to read its last replies and close its end
    /// (`Closing`); requests still with the device are ours to finish, not a stall.
    fn lingering(&self) -> bool {
        match self.closing {
            Closing::Graceful => self.reqs.is_empty(),
            Closing::Draining { inflight, .. } => inflight,
            Closing::Now => false,
        }
    }

    fn needs_tick(&self) -> bool {
        self.lingering()
            || (self.read_closed && self.replies_stuck())
            || (!self.read_closed
                && (matches!(self.phase, Phase::Handshake(_)) || self.owes_progress()))
    }

    /// Replies are waiting for a client that does not read them.
    fn replies_stuck(&self) -> bool {
        self.send_inflight() && self.unsent() > 0
    }

    fn on_tick(&mut self) {
        self.tick_inflight = false;
        let now = Instant::now();
        let limits = self.guard.limits();
        if self.lingering() {
            // After a disconnect the client owes us its close (or the reading of our replies).
            if self.progress.stalled(limits, now) {
                self.guard.stalled();
                self.abort("the client kept the connection open after it disconnected");
            }
            return;
        }
        if self.read_closed {
            // Its input closed (FIN, a protocol error): replies still owed leave, or the
            // client is dropped at the stall deadline — it does not keep their memory and its
            // place in the connection limit by not reading.
            if self.replies_stuck() && self.progress.stalled(limits, now) {
                self.guard.stalled();
                self.abort("the client stopped reading its replies after its input closed");
            }
            return;
        }
        if matches!(self.phase, Phase::Handshake(_)) && self.progress.handshake_expired(limits, now)
        {
            self.guard.handshake_timed_out();
            self.abort("handshake not finished within the deadline");
        } else if self.owes_progress() && self.progress.stalled(limits, now) {
            self.guard.stalled();
            self.abort("no progress on a payload or on reading replies within the deadline");
        }
    }

    /// Starts the tick timer if a deadline applies and none is running.
    fn arm_tick(&mut self, cx: &mut Cx<'_>) {
        if !self.tick_inflight && self.needs_tick() {
            self.tick_inflight = true;
            let limits = self.guard.limits();
            let after = if matches!(self.phase, Phase::Handshake(_)) && !self.lingering() {
                self.progress.handshake_left(limits, Instant::now())
            } else {
                limits.tick()
            };
            cx.timer(TAG_TICK, after);
        }
    }

    fn post_io(&mut self, cx: &mut Cx<'_>) {
        if self.moving.is_some() {
            // Leaving: the handshake's replies go out, nothing more comes in here. The tick
            // keeps watching a client that does not read them (the stall deadline) and is
            // cancelled once they are all sent.
            self.start_send(cx);
            if !self.out.drained() {
                self.arm_tick(cx);
            } else if self.tick_inflight && !self.cancel_inflight {
                self.cancel_inflight = true;
                cx.cancel(TAG_TICK, TAG_CANCEL);
            }
            return;
        }
        if self.tls.is_some() {
            self.pump_tls(cx);
        }
        self.start_send(cx);
        self.arm_tick(cx);
        if self.read_closed
            || self.send_broken()
            || self.recv.inflight()
            || self.payload_recv_inflight
            || self.mem.waiting()
        {
            return;
        }
        if self.saturated() && self.payload.is_none() {
            // Back-pressure stops new requests; a payload under way is still received.
            return;
        }
        if let Some(tls) = self.tls.as_mut() {
            tls.post_recv(cx, self.fd.as_raw_fd(), TAG_TLS_RECV);
            return;
        }
        let buffered = self.recv.buffered();
        if let Some(pw) = self.payload.as_ref() {
            if buffered == 0 && pw.missing() >= DIRECT_RECV_MIN && pw.buf.is_some() {
                // Straight into the payload buffer, at most a window beyond what is charged.
                if !self.charge_payload(cx, PAYLOAD_WINDOW.min(pw.missing() as u64)) {
                    return;
                }
                let pw = self.payload.as_mut().expect("pending write");
                let max = (pw.charged - pw.filled) as usize;
                let Some(buf) = pw.buf.take() else { return };
                self.payload_recv_inflight = true;
                cx.submit(Op::Recv { fd: self.fd.as_raw_fd(), buf, max }, TAG_RECV_PAYLOAD);
                return;
            }
        }
        let fd = self.fd.as_raw_fd();
        if self.recv.post(cx, fd, TAG_RECV, TAG_POLL, self.mem.held()) == Posted::WaitingForMemory {
            self.mem.wait();
        }
    }

    fn on_payload_recv(&mut self, cx: &mut Cx<'_>, result: i32, buf: IoBuf) {
        self.payload_recv_inflight = false;
        let Some(pw) = self.payload.as_mut() else {
            unreachable!("payload receive without a pending write")
        };
        pw.buf = Some(buf);
        if result <= 0 {
            self.read_closed = true;
            return;
        }
        pw.filled += result as u64;
        self.progress.moved();
        if pw.missing() == 0 {
            self.submit_write(cx);
        }
    }

    /// Back-pressure: too many requests or bytes in flight or unsent.
    fn saturated(&self) -> bool {
        self.reqs.len() >= INFLIGHT_MAX || self.bytes_inflight + self.unsent() >= INFLIGHT_BYTES_MAX
    }

    fn quiet(&self) -> bool {
        !self.recv.inflight()
            && !self.payload_recv_inflight
            && !self.tls_recv_inflight()
            && !self.send_inflight()
            && !self.tick_inflight
            && !self.cancel_inflight
            && !self.fence_poll.armed()
            && !matches!(self.closing, Closing::Draining { inflight: true, .. })
            && self.reqs.is_empty()
    }

    /// The graceful end, once the replies are out (`Closing`): true while it goes on.
    fn linger(&mut self, cx: &mut Cx<'_>) -> bool {
        match self.closing {
            Closing::Now => false,
            Closing::Graceful => {
                if self.send_broken() {
                    return false;
                }
                if self.tls.as_mut().is_some_and(|tls| tls.close()) {
                    // close_notify goes first; the send's completion comes back here.
                    self.start_send(cx);
                    return true;
                }
                let fd = self.fd.as_raw_fd();
                if self.ktls {
                    // Behind the replies, which are all with the kernel by now.
                    if let Err(e) = ballast_ffi::ktls::send_close_notify(fd) {
                        tracing::debug!(peer = %self.peer, errno = %e, "kTLS close_notify not sent");
                    }
                }
                if shutdown(fd, Shutdown::Write).is_err() {
                    return false;
                }
                tracing::debug!(peer = %self.peer, "replies sent; waiting for the client to close");
                self.closing = Closing::Draining { dropped: 0, inflight: true };
                let buf = cx.buf_with_capacity(LINGER_RECV_BYTES);
                cx.submit(Op::Recv { fd, buf, max: usize::MAX }, TAG_LINGER);
                self.arm_tick(cx);
                true
            }
            Closing::Draining { inflight, .. } => inflight,
        }
    }

    /// What the client sent after it disconnected: dropped; another receive follows until
    /// its FIN (0), an error, or `LINGER_BYTES_MAX`.
    fn on_linger_recv(&mut self, cx: &mut Cx<'_>, result: i32, mut buf: IoBuf) {
        let Closing::Draining { dropped, inflight } = &mut self.closing else {
            unreachable!("linger receive while not draining")
        };
        *inflight = false;
        tracing::trace!(peer = %self.peer, result, "linger receive");
        let mut result = result;
        if result == -libc::EIO && self.ktls {
            // Under kTLS: the next record is no data (the client's close_notify): taken apart.
            buf.set_len(0);
            result = match ballast_ffi::ktls::recv_any_record(self.fd.as_raw_fd(), buf.spare_mut())
            {
                Ok((kind, len)) => {
                    tracing::debug!(peer = %self.peer, kind, len, "linger: a TLS record of its own (kTLS)");
                    // Counted as at least a byte: a stream of empty records is bounded too.
                    len.clamp(1, LINGER_BYTES_MAX as usize) as i32
                }
                Err(e) => -(e as i32),
            };
        }
        if result > 0 {
            *dropped += result as u64;
            if *dropped < LINGER_BYTES_MAX && !cx.shutting_down() {
                *inflight = true;
                buf.set_len(0);
                cx.submit(Op::Recv { fd: self.fd.as_raw_fd(), buf, max: usize::MAX }, TAG_LINGER);
                return;
            }
            tracing::debug!(peer = %self.peer, dropped = *dropped, "client kept sending after it disconnected");
        } else if result == 0 {
            tracing::debug!(peer = %self.peer, dropped = *dropped, "graceful close: the client closed its end");
        } else {
            tracing::debug!(peer = %self.peer, errno = -result, "graceful close: receive failed");
        }
        cx.recycle(buf);
    }

    /// Ends the connection once nothing is in flight: releases what it held.
    fn finish(&mut self, cx: &mut Cx<'_>) {
        if self.tick_inflight && !self.cancel_inflight {
            self.cancel_inflight = true;
            cx.cancel(TAG_TICK, TAG_CANCEL);
        }
        if !self.quiet() {
            return;
        }
        self.recv.release(cx);
        if let Some(tls) = self.tls.as_mut() {
            tls.release(cx);
        }
        if let Some(pw) = self.payload.take() {
            if let Some(buf) = pw.buf {
                cx.recycle(buf);
            }
        }
        self.mem.release_all(cx);
        self.done = true;
        cx.stats().connections_open -= 1;
        tracing::info!(peer = %self.peer, export = %self.export_name, requests = self.requests_total, "connection closed");
    }
}

/// Cuts descriptors to `len` bytes in all (dropping empty ones).
fn clip_to(descs: &mut Vec<(u64, u32)>, len: u64) {
    let mut left = len;
    descs.retain_mut(|d| {
        d.0 = d.0.min(left);
        left -= d.0;
        d.0 > 0
    });
}

impl Movable for Conn {
    fn ready_to_move(&self) -> Option<usize> {
        self.moving.filter(|_| self.quiet() && self.out.drained() && !self.read_closed)
    }

    /// Gives back the receive buffer (keeping the bytes in it) and the memory charges. Stays
    /// when more input is buffered than a new core's first receive buffer holds, and parses
    /// it here (its flush follows: `Placed`).
    fn leave(&mut self, cx: &mut Cx<'_>) -> bool {
        self.moving = None;
        let Some(bytes) = self.recv.detach(cx) else {
            self.parse(cx);
            return false;
        };
        self.arrived = Some(bytes);
        self.mem.release_all(cx);
        cx.stats().connections_open -= 1;
        true
    }
}

impl Task for Conn {
    fn start(&mut self, cx: &mut Cx<'_>) {
        if let Some(early) = self.arrived.take() {
            self.arrive(cx, early);
            return;
        }
        cx.stats().connections_open += 1;
        cx.stats().connections_total += 1;
        tracing::debug!(peer = %self.peer, core = cx.core(), "connection accepted");
        // Advertise only what the core's budget can always grant one request.
        let limit = cx.charge_limit().min(u64::from(PAYLOAD_ADVERTISED_MAX));
        self.max_payload = 1 << (63 - limit.leading_zeros());
        self.phase = Phase::Handshake(Handshake::with_tls(self.max_payload, self.tls_config.mode));
        let mut greeting = Vec::new();
        Handshake::greeting(&mut greeting);
        self.out.push_bytes(&greeting);
    }

    fn on_completion(&mut self, cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned) {
        match tag {
            TAG_RECV => {
                let buf = owned.into_buf().expect("receive completion without its buffer");
                self.on_recv(cx, result, buf);
            }
            TAG_POLL => {
                self.recv.on_poll();
                if result < 0 {
                    self.read_closed = true;
                }
            }
            TAG_TLS_RECV => {
                let buf = owned.into_buf().expect("TLS receive completion without its buffer");
                self.on_tls_recv(result, buf);
            }
            TAG_TLS_WORK => {
                self.tls.as_mut().expect("TLS handshake step without TLS").on_work_done();
                self.progress.moved();
            }
            TAG_TICK => self.on_tick(),
            TAG_LINGER => {
                let buf = owned.into_buf().expect("linger receive completion without its buffer");
                self.on_linger_recv(cx, result, buf);
            }
            TAG_CANCEL => self.cancel_inflight = false,
            TAG_FENCE_POLL => self.on_fence_poll(cx),
            TAG_RECV_PAYLOAD => {
                let buf = owned.into_buf().expect("payload receive completion without its buffer");
                self.on_payload_recv(cx, result, buf);
                if !self.read_closed {
                    self.parse(cx);
                }
            }
            TAG_SEND => {
                self.on_send(cx, result, owned);
                // Sent replies may lift back-pressure on buffered requests.
                if !self.read_closed {
                    self.parse(cx);
                }
            }
            _ => {
                self.on_io_done(cx, tag, result, owned);
                // Back-pressure may have stopped parsing buffered input.
                if !self.read_closed {
                    self.parse(cx);
                }
            }
        }
    }

    fn flush(&mut self, cx: &mut Cx<'_>) {
        if self.read_closed || self.send_broken() {
            // Ending instead (the client left, a deadline, shutdown): no move.
            self.moving = None;
        }
        self.post_io(cx);
        let output_done = self.out.drained() && self.tls.as_ref().is_none_or(|t| t.drained());
        if self.read_closed && self.reqs.is_empty() && output_done && !self.done {
            if self.recv.inflight() || self.payload_recv_inflight || self.tls_recv_inflight() {
                // A graceful end lets it complete (with what the client still sends, or its
                // FIN; the tick bounds the wait).
                if self.closing == Closing::Now {
                    self.close_read("finished");
                }
                return;
            }
            if self.linger(cx) {
                return;
            }
            self.finish(cx);
        }
    }

    fn on_buffers(&mut self, cx: &mut Cx<'_>) {
        self.mem.woken();
        if !self.read_closed {
            self.parse(cx);
        }
    }

    fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {
        self.close_read("daemon shutting down");
        match self.closing {
            Closing::Now => {}
            Closing::Graceful => self.closing = Closing::Now,
            // The receive returns at once.
            Closing::Draining { .. } => {
                let _ = shutdown(self.fd.as_raw_fd(), Shutdown::Read);
            }
        }
    }

    fn is_done(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pieces of a long trim or write-zeroes cover it exactly, in order, each within one
    /// multiple of the device's bound (so inner cuts fall on its multiples); a short one is one
    /// piece.
    #[test]
    fn long_effects_go_in_bounded_pieces() {
        const P: u64 = 256 << 20;
        for (offset, len, piece, zeroes) in [
            (0, 10 << 30, P, None),
            (4096, (6 << 30) - 4096, P, Some(false)),
            (7, 1, P, Some(true)),
            (P - 512, 3 * P + 1024, P, None),
            (123, 1 << 40, u64::MAX, Some(true)),
            (512 * 3, 512 * 1000, 512 * 64, Some(false)),
        ] {
            let (mut cmd, mut rest) = Pieces::first(offset, len, piece, zeroes);
            let mut at = offset;
            loop {
                let (o, n) = match cmd {
                    IoCmd::Discard { offset, len } if zeroes.is_none() => (offset, len),
                    IoCmd::WriteZeroes { offset, len, may_unmap } if zeroes == Some(may_unmap) => {
                        (offset, len)
                    }
                    _ => panic!("the wrong command for {zeroes:?}"),
                };
                assert_eq!(o, at, "pieces in order, without gaps");
                assert!(n > 0 && n <= piece);
                assert_eq!(o / piece, (o + n - 1) / piece, "a piece stays within one multiple");
                at += n;
                let Some(p) = rest else { break };
                assert_eq!(at % piece, 0, "inner cuts on the device's multiples");
                (cmd, rest) = p.next();
            }
            assert_eq!(at, offset + len, "the pieces cover the whole range");
        }
    }

    #[test]
    fn block_status_is_clipped_to_the_range() {
        let mut d = vec![(4096, 0), (8192, 1), (4096, 0)];
        clip_to(&mut d, 6000);
        assert_eq!(d, vec![(4096, 0), (1904, 1)]);
        let mut d = vec![(4096, 0)];
        clip_to(&mut d, 1 << 40);
        assert_eq!(d, vec![(4096, 0)]);
    }
}
