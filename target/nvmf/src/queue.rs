//! One NVMe/TCP connection (one queue pair) on one core: ICReq/ICResp, Connect, then admin
//! or I/O commands, turning PDUs into device operations and completions into PDUs.
//!
//! Invariants:
//! - at most one receive and one send in flight; responses queue in `out` and leave together
//!   (coalescing); a short send is finished before anything queued after it;
//! - a command occupies one `cmds` slot from its capsule until its response is queued; the
//!   slot index is its R2T transfer tag and the tag of its device operations;
//! - at most `QUEUE_ENTRIES_MAX` commands are in flight (the host may not exceed SQSIZE);
//! - a fatal transport error queues one C2HTermReq, stops reading and closes once it is sent;
//! - payload memory is charged to the core's budget before it is used, PDU by PDU, before
//!   the PDU is taken: a read's buffer with its capsule, in-capsule data with its capsule, an
//!   R2T transfer's data with each H2CData PDU that brings it (an R2T itself costs nothing,
//!   so a host that never sends the data holds no memory; the transfer buffer is allocated at
//!   the first H2CData and filled as PDUs arrive; while the budget could not take its first
//!   H2CData PDU, a write capsule waits and no R2T goes out). Refused, the PDU stays
//!   buffered and parsing waits for `on_buffers`. `mem` is exactly what the queue holds:
//!   command charges (`Cmd::charged`) plus read data still in `out`; after a read or write
//!   to a device whose I/O waiting for its rate limits holds its share of the core
//!   (`BlockDev::held_back`), parsing waits too, until some of it goes (`held_back`);
//! - ICReq and Connect must arrive within the handshake deadline; a queue that owes progress
//!   (H2CData for an R2T, reading its responses) and makes none for the stall deadline is
//!   dropped;
//! - the task is done only with nothing in flight (receive, poll, send, device I/O, timer);
//! - the secure channel (`tls`): the first byte a host sends decides — a TLS handshake record
//!   starts TLS (where the listener offers it), anything else is plaintext (where the listener
//!   allows it); under TLS every byte after is TLS (`TlsLink`; payloads are received directly
//!   only once the kernel carries the records, `offload_to_kernel`), the handshake's steps and
//!   DH-HMAC-CHAP's run on offload threads (the task waits for them before it finishes), and
//!   Connect must name the host and subsystem the TLS identity named; a host with a key for a
//!   subsystem reaches it only that way;
//! - in-band authentication (`auth`): a queue whose host has a DH-HMAC-CHAP configuration for
//!   its subsystem gets ATR in its Connect response and, until its own handshake succeeded,
//!   answers every command but Authentication Send/Receive, Property Get and Disconnect with
//!   Authentication Required; the handshake deadline covers it too (each queue authenticates
//!   on its own, as the kernel host does);
//! - an I/O queue whose subsystem's first namespace names another home core
//!   (`BlockDev::home_core`: a volume's family owner), or else whose core serves more I/O
//!   queues than another core does (`crate::spread`: the listener's round-robin cannot tell
//!   admin queues from I/O queues), moves there right after its Connect,
//!   before it parses a command: it stops reading, sends the Connect response, cancels its
//!   timer, gives its core's memory back and travels whole (`ballast_engine::placed`); input
//!   already received (at most `RECV_MIN` bytes, else it stays) goes along and is parsed first
//!   on the new core. Admin queues, queues that must authenticate and userspace-TLS queues
//!   stay where they were accepted.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_engine::gate::{FencePoll, GateTicket, Waiting};
use ballast_engine::holder::Holder;
use ballast_engine::limits::{abort_socket, ConnGuard, Progress};
use ballast_engine::offload::Away;
use ballast_engine::placed::Movable;
use ballast_engine::recvbuf::{Posted, RecvBuf};
use ballast_engine::sendq::SendQueue;
use ballast_engine::stats::{OpKind, Proto};
use ballast_engine::{BlockDev, Cx, IoBuf, IoCmd, Owned, Task};
use ballast_ffi::region::Lent;
use ballast_tls::{offload_to_kernel, Pump, TlsLink, TlsSession};
use nix::sys::socket::{shutdown, Shutdown};
use slab::Slab;

use crate::admin::{AdminState, Reply};
use crate::ana::AnaView;
use crate::auth::command::{
    self as auth_command, AuthCommand, AUTH_REQUIRED, CONNECT_AUTHREQ_ATR, FCTYPE_AUTH_RECEIVE,
    FCTYPE_AUTH_SEND,
};
use crate::auth::machine::{Action, Event};
use crate::auth::{OsEntropy, QueueAuth};
use crate::error_log::ErrorEntry;
use crate::fused::{self, Pair, Pairing, Role, Step};
use crate::identify::{IN_CAPSULE_BYTES, MAX_TRANSFER_BYTES, QUEUE_ENTRIES_MAX};
use crate::nvme::{self, fctype, io, status, Sqe, Status, FABRICS_OPCODE};
use crate::pdu::{self, kind, CommonHeader, Fatal};
use crate::resv::{self, Access};
use crate::resv_cell::Executing;
use crate::spread::Slot;
use crate::subsys::{
    Controller, ListenAddr, Namespace, NsCache, QueueInfo, QueueNs, Target, DISCOVERY_NQN,
};
use crate::tls::{identity_names, SecureChannel, TLS_HANDSHAKE_RECORD};

/// Largest receive buffer: room for the largest PDU (an H2CData of `MAXH2CDATA`) and more.
const RECV_BUF_MAX: usize = 256 * 1024;
/// Largest H2CData payload we accept per PDU.
pub const MAXH2CDATA: u32 = 128 * 1024;
/// Response bytes queued or being sent past which we stop reading from the host.
const UNSENT_MAX: u64 = 16 << 20;
/// The same for an admin queue, whose response data (log pages, identify structures: up to
/// one maximum transfer each) is built for it and not charged to the core's budget: a host
/// that asks and does not read holds at most this and one response.
const ADMIN_UNSENT_MAX: u64 = 256 << 10;
/// A reservation command that answers once what it waits for is done: its table's save
/// (PTPL: the version that must be kept), and for a Preempt and Abort the write-group
/// commands executing on the namespace under the epoch before it (the preempted hosts'
/// among them).
struct ResvWait {
    sqe: Sqe,
    status: Status,
    ns: QueueNs,
    save: Option<u64>,
    drain: Drain,
}

/// A Preempt and Abort's wait for the writes before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// Nothing to wait for.
    Done,
    /// Its epoch has not begun yet (an earlier drain of the namespace is not over).
    Pending,
    /// Waiting for the writes counted under this epoch.
    Waiting(u64),
}

/// How often a reservation command looks whether what it waits for is done (a save takes a
/// pool commit; a drain, the writes' media latency).
const RESV_POLL: Duration = Duration::from_millis(1);

/// Reservation verdicts a queue keeps (namespaces with a reservation it sent I/O to lately).
const RESV_VERDICTS_MAX: usize = 16;

/// What a reservation lets this queue's host do on one namespace, as of a table version
/// (versions never repeat, across namespaces either: a verdict is found by its version; the
/// namespace's address only picks which entry a newer verdict replaces).
#[derive(Debug, Clone, Copy)]
struct ResvVerdict {
    ns: usize,
    version: u64,
    read: bool,
    write: bool,
}

const TAG_RECV: u32 = u32::MAX;
/// Reservation commands look whether their saves and drains are done.
const TAG_RESV_POLL: u32 = u32::MAX - 9;
/// Parked writes and fused pairs look whether their device's fence moved.
const TAG_FENCE_POLL: u32 = u32::MAX - 10;
const TAG_SEND: u32 = u32::MAX - 1;
/// The keep-alive timeout of a discovery controller whose host asked for none (Linux nvmet's
/// `NVMET_DISC_KATO_MS`).
const DISCOVERY_KATO_MS: u32 = 120_000;
const TAG_TICK: u32 = u32::MAX - 2;
const TAG_CANCEL: u32 = u32::MAX - 3;
const TAG_POLL: u32 = u32::MAX - 4;
const TAG_DIRECT: u32 = u32::MAX - 5;
const TAG_TLS_RECV: u32 = u32::MAX - 6;
/// A TLS handshake step run off the core came back.
const TAG_TLS_WORK: u32 = u32::MAX - 7;
/// A DH-HMAC-CHAP step run off the core came back.
const TAG_AUTH_WORK: u32 = u32::MAX - 8;

/// What answering an authentication command needs once its step is done.
struct AuthStep {
    sqe: Sqe,
    was_authenticated: bool,
    action: Action,
}
/// H2CData payloads at least this long are received straight into their command's buffer
/// once their header is in (no copy out of the receive buffer, no receive buffer that big).
const DIRECT_MIN: usize = 16 * 1024;
const ADMIN_TICK: Duration = Duration::from_millis(250);
const IO_TICK: Duration = Duration::from_millis(1000);

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for ICReq.
    Init,
    /// ICResp sent; only Fabrics Connect is allowed.
    AwaitConnect,
    /// Connected as queue `qid` of a controller.
    Ready,
}

/// An H2CData PDU whose header was parsed and whose data is being received straight into the
/// command's buffer: `left` bytes still to come; then the transfer has `received` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Direct {
    ttag: u16,
    left: usize,
    received: u32,
    last: bool,
    inflight: bool,
}

/// What a command is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmdState {
    /// Write data arriving through R2T/H2CData; `received` bytes so far.
    AwaitData { received: u32 },
    /// Device operations in flight: `pending` of them.
    Executing { pending: u32 },
    /// A write-group command whose device's write gate is fenced (a fused Compare and Write
    /// runs alone): its device operations wait in `parked` until the fence is lifted.
    Parked,
    /// Half of a fused pair with its data here: it waits for its pair's turn (`fused`).
    Held,
}

struct Cmd {
    sqe: Sqe,
    ns: Option<QueueNs>,
    state: CmdState,
    buf: Option<IoBuf>,
    status: Status,
    kind: OpKind,
    bytes: u32,
    started: Instant,
    /// Payload memory charged for it.
    charged: u64,
    /// A Write Zeroes with FUA: once it is done its device is flushed, then it is answered.
    then_flush: bool,
    /// Counted among its namespace's executing write-group commands (a reservation was held
    /// when it went to the media): handed back when it leaves.
    executing: Option<Executing>,
    /// Counted on its device's write gate (it went to the media): handed back when it leaves.
    gated: Option<GateTicket>,
    /// What its data (if any) is for.
    role: Role,
}

/// A write-group command waiting for its device's fence to be lifted: its device operations,
/// and its place among the gate's waiting writes (their turn comes before the next fence).
struct Parked {
    tag: u32,
    ops: Vec<IoCmd>,
    waiting: Waiting,
}

/// What [`Queue::admit`] counted for a write-group command: handed back when it leaves.
#[derive(Debug, Clone, Copy)]
struct Admission {
    executing: Option<Executing>,
    gated: Option<GateTicket>,
}

impl Cmd {
    /// The most payload memory it may hold: its transfer, and a Compare's read besides.
    fn charge_max(&self) -> u64 {
        match self.role {
            Role::Compare | Role::FusedCompare => 2 * u64::from(self.bytes),
            Role::Plain | Role::FusedWrite => u64::from(self.bytes),
        }
    }
}

/// The statistics id of a command's device (`u32::MAX`, counted per core only, for none).
fn stats_id(ns: Option<&QueueNs>) -> u32 {
    ns.map_or(u32::MAX, |ns| ns.dev.info().stats_id)
}

pub struct Queue {
    fd: OwnedFd,
    peer: String,
    /// The listener that accepted it: the subsystems listening there are the ones it may join.
    via: ListenAddr,
    /// This connection's place under the connection limit, and the limits it lives under.
    guard: ConnGuard,
    /// An H2CData payload arriving straight into its command's buffer (no data digest).
    direct: Option<Direct>,
    progress: Progress,
    target: Arc<Target>,
    phase: Phase,
    hdgst: bool,
    ddgst: bool,
    qid: u16,
    /// This I/O queue holds its id in the controller's `io_qids` (and its entry in `queues`):
    /// from its Connect, or — when it must authenticate — only once it has. A queue that
    /// never authenticates holds nothing another could want, and its close frees nothing it
    /// did not take (a stranger connecting with a live queue's id and then failing could
    /// otherwise have released that queue's id and entry).
    holds_qid: bool,
    sq_entries: u16,
    sqhd: u16,
    sqflow_disabled: bool,
    ctrl: Option<Arc<Controller>>,
    admin: Option<AdminState>,
    cmds: Slab<Cmd>,
    recv: RecvBuf,
    /// Payload memory held of the core's budget (besides the receive buffer's growth); a
    /// refused charge makes parsing wait for `on_buffers`.
    mem: Holder,
    /// The device whose I/O waiting for its rate limits stopped this queue's parsing
    /// (`hold_back_for`); parsing waits (`mem` waiting) until it no longer holds its share.
    held_back: Option<Arc<dyn BlockDev>>,
    /// Charged for the PDU being handled, not yet given to a command.
    charged_for_pdu: u64,
    out: SendQueue,
    scratch: Vec<u8>,
    tick_inflight: bool,
    cancel_inflight: bool,
    read_closed: bool,
    done: bool,
    /// The first byte arrived and chose TLS or plaintext.
    transport_chosen: bool,
    /// The TLS layer, when the host chose TLS.
    tls: Option<Box<TlsLink>>,
    /// The host and subsystem the TLS identity named, once the handshake proved the key.
    tls_names: Option<(String, String)>,
    /// DH-HMAC-CHAP for this queue, when its host must authenticate to its subsystem.
    auth: Option<Box<QueueAuth>>,
    /// An authentication step running off the core (its result comes back here).
    auth_away: Option<Away<(Box<QueueAuth>, AuthStep)>>,
    /// Reservation commands waiting for their table's save (PTPL) or a Preempt and Abort's
    /// drain.
    resv_waits: Vec<ResvWait>,
    /// The timer of `resv_waits` is armed.
    resv_timer: bool,
    /// Cached reservation verdicts (`reserved_for`).
    resv_verdicts: Vec<ResvVerdict>,
    /// Write-group commands waiting for their device's fence to be lifted, with their device
    /// operations (`CmdState::Parked`).
    parked: Vec<Parked>,
    /// The Compare that opened a fused pair, until the next capsule comes.
    fused_first: Option<u32>,
    /// Fused pairs, in arrival order: only the first one goes past `Step::Fencing`.
    fused: VecDeque<Pair>,
    /// The timer of `parked` (and of fused pairs: fences to be lifted, writes to drain).
    fence_poll: FencePoll,
    /// Its path's ANA states as last taken (`path_refusal`).
    ana_view: AnaView,
    /// When a queue that had authenticated began again (a host re-authenticates its live
    /// queues when its secrets change): that transaction's deadline counts from here, not
    /// from the connection's start.
    reauth_since: Option<Instant>,
    /// An I/O queue: its controller's resets when it connected (a later one deletes it).
    resets_seen: u32,
    /// The core this queue is moving to (its namespace's home), from its Connect until it
    /// leaves.
    moving: Option<usize>,
    /// On a queue that moved: input received before the move, parsed first on arrival.
    arrived: Option<Vec<u8>>,
    /// An I/O queue's place among the cores' I/O queues (counted on the core it serves from).
    spread: Option<Slot>,
    /// The namespaces its I/O commands name, found without the subsystem's lock.
    ns_cache: NsCache,
    /// Reads, bytes read, writes, bytes written since the controller's totals last took them
    /// (once per turn, in `post_io`): a controller's queues on many cores share those totals,
    /// so adding to them per I/O would move their cache line between cores at every command.
    done_counts: [u64; 4],
}

impl Queue {
    pub fn new(
        fd: OwnedFd,
        peer: String,
        guard: ConnGuard,
        target: Arc<Target>,
        via: ListenAddr,
    ) -> Queue {
        Queue {
            fd,
            peer,
            via,
            guard,
            progress: Progress::new(),
            direct: None,
            target,
            phase: Phase::Init,
            hdgst: false,
            ddgst: false,
            qid: 0,
            holds_qid: false,
            sq_entries: QUEUE_ENTRIES_MAX,
            sqhd: 0,
            sqflow_disabled: false,
            ctrl: None,
            admin: None,
            cmds: Slab::new(),
            recv: RecvBuf::new(RECV_BUF_MAX),
            mem: Holder::default(),
            charged_for_pdu: 0,
            out: SendQueue::default(),
            scratch: Vec::with_capacity(256),
            tick_inflight: false,
            cancel_inflight: false,
            read_closed: false,
            done: false,
            transport_chosen: false,
            tls: None,
            tls_names: None,
            auth: None,
            auth_away: None,
            resv_verdicts: Vec::new(),
            parked: Vec::new(),
            fused_first: None,
            fused: VecDeque::new(),
            fence_poll: FencePoll::default(),
            ana_view: AnaView::default(),
            resv_waits: Vec::new(),
            resv_timer: false,
            reauth_since: None,
            resets_seen: 0,
            moving: None,
            arrived: None,
            spread: None,
            ns_cache: NsCache::default(),
            done_counts: [0; 4],
            held_back: None,
        }
    }

    /// Takes the queue in on the core it moved to (or came back to): counts it, starts its
    /// ticks and parses the input that came along.
    fn arrive(&mut self, cx: &mut Cx<'_>, early: Vec<u8>) {
        cx.stats().connections_open += 1;
        if let Some(slot) = &mut self.spread {
            // Counted where it landed (the core it left, if the new one's mailbox refused it).
            slot.rehome(cx.core());
        }
        tracing::debug!(peer = %self.peer, qid = self.qid, core = cx.core(), input = early.len(), "NVMe/TCP queue placed on its namespace's core");
        self.arm_tick(cx);
        if !early.is_empty() {
            self.recv.attach(cx, &early);
            self.parse(cx);
        }
    }

    /// Whether the queue must still authenticate before it may do anything else (a step
    /// away on an offload thread counts as not yet).
    fn auth_pending(&self) -> bool {
        self.auth_away.is_some() || self.auth.as_ref().is_some_and(|a| !a.is_authenticated())
    }

    /// Queues the PDU bytes built in `scratch`.
    fn queue_scratch(&mut self) {
        self.out.push_bytes(&self.scratch);
    }

    /// Back-pressure: a host that does not read its responses stops being read.
    fn saturated(&self) -> bool {
        self.unsent() >= if self.qid == 0 { ADMIN_UNSENT_MAX } else { UNSENT_MAX }
    }

    /// Response bytes queued for the socket, encrypted or not, sent or not.
    fn unsent(&self) -> u64 {
        self.out.unsent() + self.tls.as_ref().map_or(0, |t| t.unsent())
    }

    fn send_inflight(&self) -> bool {
        self.out.inflight() || self.tls.as_ref().is_some_and(|t| t.send_inflight())
    }

    fn send_broken(&self) -> bool {
        self.out.broken() || self.tls.as_ref().is_some_and(|t| t.broken())
    }

    fn tls_recv_inflight(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.recv_inflight())
    }

    /// The first bytes of a connection decide its transport: a TLS handshake record starts
    /// TLS where the listener offers it, anything else is plaintext where it allows that.
    /// Returns false if the connection ends here.
    fn choose_transport(&mut self, cx: &mut Cx<'_>, buf: &mut IoBuf) -> bool {
        let Some(&first) = buf.as_slice().first() else { return true };
        self.transport_chosen = true;
        let secure = self.target.secure_channel(&self.via);
        if first != TLS_HANDSHAKE_RECORD {
            if secure == SecureChannel::Required {
                tracing::warn!(peer = %self.peer, via = %self.via, "plaintext connection refused: this listener requires TLS");
                self.read_closed = true;
                return false;
            }
            return true;
        }
        if secure == SecureChannel::None {
            tracing::warn!(peer = %self.peer, via = %self.via, "TLS connection refused: this listener has no secure channel");
            self.read_closed = true;
            return false;
        }
        match TlsSession::accept(self.target.tls.server()) {
            Ok(session) => {
                let early = buf.as_slice().to_vec();
                buf.consume_front(buf.len());
                self.tls = Some(Box::new(TlsLink::start(
                    cx,
                    session,
                    &mut self.out,
                    &early,
                    TAG_TLS_WORK,
                )));
                true
            }
            Err(e) => {
                tracing::warn!(peer = %self.peer, error = %e, "cannot start TLS");
                self.read_closed = true;
                false
            }
        }
    }

    /// Decrypts what the session can into the receive buffer and parses it, until it needs
    /// more ciphertext, the buffer is full or memory is short.
    fn pump_tls(&mut self, cx: &mut Cx<'_>) {
        while !self.read_closed && !self.mem.waiting() && !self.saturated() {
            let Some(tls) = self.tls.as_mut() else { return };
            let pump = tls.pump(cx, &mut self.recv, self.mem.held());
            if let Some(identity) = tls.opened() {
                let name = identity.name().unwrap_or_default().to_string();
                tracing::info!(peer = %self.peer, tls = %tls.describe(), identity = %name, "NVMe/TCP TLS established");
                self.tls_names = identity_names(&name);
            }
            match pump {
                Pump::Data => self.parse(cx),
                Pump::Idle => return,
                Pump::WaitingForMemory => {
                    self.mem.wait();
                    return;
                }
                Pump::Closed => self.close_read(),
                Pump::Failed(e) => {
                    tracing::info!(peer = %self.peer, error = %e, "NVMe/TCP TLS failed; closing");
                    self.close_read();
                }
            }
        }
    }

    /// Whether the connection's transport lets `hostnqn` reach `subnqn`: through TLS, the
    /// identity must have named exactly them (discovery: the host); without TLS, the host
    /// must have no key for the subsystem.
    fn secure_enough(&self, hostnqn: &str, subnqn: &str) -> bool {
        match &self.tls_names {
            Some((host, sub)) => host == hostnqn && (sub == subnqn || subnqn == DISCOVERY_NQN),
            None => !self.target.tls.has_key(hostnqn, subnqn),
        }
    }

    /// Largest PDU we accept: a capsule with full in-capsule data, or an H2CData PDU.
    fn max_plen(&self) -> u32 {
        let digests = 8;
        (pdu::CMD_HLEN as u32 + IN_CAPSULE_BYTES).max(pdu::DATA_HLEN as u32 + MAXH2CDATA) + digests
    }

    fn fatal(&mut self, f: Fatal, header: &[u8]) {
        tracing::warn!(peer = %self.peer, fes = f.fes, field = f.field, why = f.why, "NVMe/TCP protocol error; terminating connection");
        self.scratch.clear();
        pdu::encode_c2h_term_req(&mut self.scratch, &f, header);
        self.queue_scratch();
        self.read_closed = true;
    }

    /// Charges `bytes` of payload memory to the core's budget; on refusal parsing stops
    /// until `on_buffers`.
    fn charge(&mut self, cx: &mut Cx<'_>, bytes: u64) -> bool {
        self.mem.charge(cx, bytes, self.recv.charged())
    }

    /// Payload memory the PDU `p` needs before it is taken: a read's data, in-capsule write
    /// data, or the data an H2CData PDU brings to its transfer. Commands that will be refused
    /// (too long, no such transfer) need none.
    fn pdu_needs(&self, ch: &CommonHeader, p: &[u8], data_len: usize) -> u64 {
        if self.phase != Phase::Ready || self.qid == 0 {
            return 0;
        }
        match ch.kind {
            kind::CAPSULE_CMD if p.len() >= 8 + nvme::SQE_LEN => {
                // Only the opcode and the data pointer matter here (SQE bytes 0, 32..36, 39).
                let sqe = &p[8..8 + nvme::SQE_LEN];
                let sgl_len = u32::from_le_bytes([sqe[32], sqe[33], sqe[34], sqe[35]]);
                let sgl_type = sqe[39];
                match sqe[0] {
                    io::READ if sgl_len <= MAX_TRANSFER_BYTES => u64::from(sgl_len),
                    // An R2T is sent only while its first H2CData PDU could be taken: this
                    // charge is a probe, released once the capsule is handled.
                    io::WRITE
                        if data_len == 0
                            && sgl_type == nvme::SGL_TRANSPORT_DATA_BLOCK
                            && sgl_len <= MAX_TRANSFER_BYTES =>
                    {
                        u64::from(sgl_len.min(MAXH2CDATA))
                    }
                    io::WRITE if data_len <= IN_CAPSULE_BYTES as usize => data_len as u64,
                    // A Compare reads what it compares (kept), besides its data (as a write's).
                    io::COMPARE if sgl_len <= MAX_TRANSFER_BYTES => {
                        let data = if data_len == 0 && sgl_type == nvme::SGL_TRANSPORT_DATA_BLOCK {
                            sgl_len.min(MAXH2CDATA)
                        } else {
                            data_len.min(IN_CAPSULE_BYTES as usize) as u32
                        };
                        u64::from(sgl_len) + u64::from(data)
                    }
                    _ => 0,
                }
            }
            kind::H2C_DATA => match self
                .cmds
                .get(usize::from(pdu::decode_h2c_data(p).map_or(u16::MAX, |h| h.ttag)))
            {
                Some(c) if matches!(c.state, CmdState::AwaitData { .. }) => {
                    data_len.min(c.bytes as usize) as u64
                }
                _ => 0,
            },
            _ => 0,
        }
    }

    /// Hands the charge taken for the current PDU to the command it created.
    fn take_pdu_charge(&mut self) -> u64 {
        std::mem::take(&mut self.charged_for_pdu)
    }

    fn parse(&mut self, cx: &mut Cx<'_>) {
        if self.mem.waiting() {
            return;
        }
        let Some(mut buf) = self.recv.take() else { return };
        if !self.transport_chosen && self.tls.is_none() && !self.choose_transport(cx, &mut buf) {
            self.recv.put_back(buf);
            return;
        }
        let mut used = 0;
        while !self.read_closed && !self.saturated() && !self.mem.waiting() && self.moving.is_none()
        {
            let input = &buf.as_slice()[used..];
            let Some(ch) = CommonHeader::decode(input) else { break };
            let (data_start, data_len) =
                match pdu::check_host_header(&ch, self.hdgst, self.ddgst, self.max_plen()) {
                    Ok(v) => v,
                    Err(f) => {
                        let n = input.len().min(128);
                        let header = input[..n].to_vec();
                        self.fatal(f, &header);
                        break;
                    }
                };
            let plen = ch.plen as usize;
            if input.len() < plen {
                if ch.kind == kind::H2C_DATA
                    && !self.ddgst
                    && self.tls.is_none()
                    && data_len >= DIRECT_MIN
                    && input.len() >= data_start
                    && self.phase == Phase::Ready
                {
                    // The header is here and the data is large: take what arrived and receive
                    // the rest straight into the command's buffer.
                    let needs = self.pdu_needs(&ch, input, data_len);
                    if !self.charge(cx, needs) {
                        break;
                    }
                    self.charged_for_pdu = needs;
                    self.on_pdu(cx, &ch, input, data_start, data_len);
                    let unused = self.take_pdu_charge();
                    self.mem.release(cx, unused);
                    used += input.len();
                    break;
                }
                self.recv.need(plen);
                break;
            }
            let p = &input[..plen];
            let needs = self.pdu_needs(&ch, p, data_len);
            if !self.charge(cx, needs) {
                break;
            }
            self.charged_for_pdu = needs;
            self.on_pdu(cx, &ch, p, data_start, data_len);
            let unused = self.take_pdu_charge();
            self.mem.release(cx, unused);
            used += plen;
        }
        buf.consume_front(used);
        self.recv.put_back(buf);
    }

    fn on_pdu(
        &mut self,
        cx: &mut Cx<'_>,
        ch: &CommonHeader,
        p: &[u8],
        data_start: usize,
        data_len: usize,
    ) {
        let hlen = usize::from(ch.hlen);
        if self.hdgst
            && ch.kind != kind::IC_REQ
            && ch.kind != kind::H2C_TERM_REQ
            && !pdu::digest_ok(&p[..hlen], &p[hlen..hlen + 4])
        {
            self.fatal(
                Fatal {
                    fes: pdu::fes::HEADER_DIGEST_ERROR,
                    field: 0,
                    why: "header digest mismatch",
                },
                &p[..hlen],
            );
            return;
        }
        // A partial PDU (the direct path) carries the data that arrived with its header.
        let data = &p[data_start..(data_start + data_len).min(p.len())];
        let data_digest_ok = !self.ddgst
            || data_len == 0
            || pdu::digest_ok(data, &p[(data_start + data_len).min(p.len())..]);
        match (ch.kind, self.phase) {
            (kind::IC_REQ, Phase::Init) => self.on_icreq(p),
            (kind::IC_REQ, _) | (_, Phase::Init) => self.fatal(
                Fatal { fes: pdu::fes::PDU_SEQUENCE_ERROR, field: 0, why: "PDU out of sequence" },
                &p[..hlen],
            ),
            (kind::H2C_TERM_REQ, _) => {
                let fes = u16::from_le_bytes([p[8], p[9]]);
                tracing::warn!(peer = %self.peer, fes, "host terminated the connection (H2CTermReq)");
                self.read_closed = true;
            }
            (kind::CAPSULE_CMD, _) => {
                let mut raw = [0u8; nvme::SQE_LEN];
                raw.copy_from_slice(&p[8..72]);
                let sqe = Sqe::decode(&raw);
                self.sqhd = (self.sqhd + 1) % self.sq_entries.max(1);
                if !data_digest_ok {
                    self.abandon_first(cx, &sqe);
                    self.answer(&sqe, 0, 0, status::TRANSIENT_TRANSPORT_ERROR);
                    return;
                }
                if data_len > IN_CAPSULE_BYTES as usize {
                    self.abandon_first(cx, &sqe);
                    self.answer(&sqe, 0, 0, status::SGL_DATA_LENGTH_INVALID);
                    return;
                }
                self.on_capsule(cx, sqe, data);
            }
            (kind::H2C_DATA, _) => {
                let Some(h) = pdu::decode_h2c_data(p) else { return };
                let last = ch.flags & pdu::FLAG_LAST_PDU != 0;
                self.on_h2c_data(cx, &h, data, data_len, data_digest_ok, last, &p[..hlen]);
            }
            _ => self.fatal(Fatal::field(0, "unexpected PDU type"), &p[..hlen]),
        }
    }

    fn on_icreq(&mut self, p: &[u8]) {
        let Some(req) = pdu::decode_icreq(p) else { return };
        if req.pfv != pdu::PFV_1_0 {
            self.fatal(
                Fatal {
                    fes: pdu::fes::UNSUPPORTED_PARAMETER,
                    field: 8,
                    why: "unsupported PDU format version",
                },
                &p[..pdu::ICREQ_LEN],
            );
            return;
        }
        if req.hpda > 31 {
            self.fatal(Fatal::field(10, "HPDA out of range"), &p[..pdu::ICREQ_LEN]);
            return;
        }
        if req.hpda != 0 {
            self.fatal(
                Fatal {
                    fes: pdu::fes::UNSUPPORTED_PARAMETER,
                    field: 10,
                    why: "host PDU data alignment not supported",
                },
                &p[..pdu::ICREQ_LEN],
            );
            return;
        }
        self.hdgst = req.dgst & pdu::DGST_HEADER != 0;
        self.ddgst = req.dgst & pdu::DGST_DATA != 0;
        self.scratch.clear();
        pdu::encode_icresp(
            &mut self.scratch,
            req.dgst & (pdu::DGST_HEADER | pdu::DGST_DATA),
            MAXH2CDATA,
        );
        self.queue_scratch();
        self.phase = Phase::AwaitConnect;
    }

    /// Queues a CapsuleResp for command `sqe`; an error is recorded in its controller's Error
    /// Information log once the queue is the controller's: not for a refused Connect, nor on
    /// an I/O queue that has not authenticated yet (a stranger who knows the host's NQN and
    /// the controller's id writes nothing into the host's log).
    fn answer(&mut self, sqe: &Sqe, dw0: u32, dw1: u32, st: Status) {
        if st != status::SUCCESS && (self.qid == 0 || self.holds_qid) {
            if let Some(ctrl) = &self.ctrl {
                ctrl.errors.lock().record(ErrorEntry::of(self.qid, sqe, st));
            }
        }
        self.respond(sqe.cid, dw0, dw1, st);
    }

    /// Queues a CapsuleResp for `cid`: a success, or (through [`Self::answer`]) an error.
    fn respond(&mut self, cid: u16, dw0: u32, dw1: u32, st: Status) {
        let cqe = nvme::encode_cqe(dw0, dw1, self.sqhd, self.qid, cid, st);
        self.scratch.clear();
        pdu::encode_capsule_resp(&mut self.scratch, &cqe, self.hdgst);
        self.queue_scratch();
    }

    /// Queues data for the host, then the response (or the SUCCESS shortcut).
    fn respond_with_data(&mut self, cx: &mut Cx<'_>, cid: u16, data: IoBuf, dw0: u32) {
        let len = data.len() as u32;
        self.c2h_data_header(cid, len, dw0);
        let digest = self.ddgst.then(|| crc32c::crc32c(data.as_slice()));
        self.out.push_buf(cx, data);
        if let Some(d) = digest {
            self.out.push_bytes(&d.to_le_bytes());
        }
        self.c2h_data_done(cid, dw0);
    }

    /// Whether a read's data may be lent ([`ballast_engine::BlockDev::lend`]): only what goes
    /// to the socket as it is (no data digest to compute over it, no TLS layer to encrypt it).
    fn may_lend(&self) -> bool {
        !self.ddgst && self.tls.is_none()
    }

    /// A read answered from the device's lent memory: no I/O, no buffer, no copy of ours.
    fn respond_lent(&mut self, cx: &mut Cx<'_>, sqe: &Sqe, ns: &Namespace, data: Lent) {
        debug_assert!(self.may_lend());
        let len = data.len() as u32;
        self.done_at_once(cx, ns, OpKind::Read, len);
        cx.stats().reads_lent += 1;
        let charged = self.take_pdu_charge();
        if self.send_broken() {
            self.mem.release(cx, charged);
            return;
        }
        self.c2h_data_header(sqe.cid, len, 0);
        self.out.push_lent(data);
        self.c2h_data_done(sqe.cid, 0);
        // Charged like copied data until it is sent: a host that does not read holds its
        // budget, not more.
        self.mem.to_send(charged);
    }

    /// Queues the one C2HData header a read's `len` bytes go under.
    fn c2h_data_header(&mut self, cid: u16, len: u32, dw0: u32) {
        let shortcut = self.sqflow_disabled && dw0 == 0;
        self.scratch.clear();
        pdu::encode_c2h_data_header(
            &mut self.scratch,
            cid,
            0,
            len,
            true,
            shortcut,
            self.hdgst,
            self.ddgst,
        );
        self.queue_scratch();
    }

    /// After a read's data: its response, unless the data's SUCCESS flag was the response.
    fn c2h_data_done(&mut self, cid: u16, dw0: u32) {
        if !(self.sqflow_disabled && dw0 == 0) {
            self.respond(cid, dw0, 0, status::SUCCESS);
        }
    }

    fn on_capsule(&mut self, cx: &mut Cx<'_>, sqe: Sqe, data: &[u8]) {
        if sqe.opcode == FABRICS_OPCODE || self.phase != Phase::Ready || self.auth_pending() {
            // Not an I/O command: a Compare waiting for its second command waits no more.
            self.abandon_first(cx, &sqe);
        }
        if sqe.opcode == FABRICS_OPCODE {
            self.on_fabrics(cx, &sqe, data);
            return;
        }
        if self.phase != Phase::Ready {
            self.answer(&sqe, 0, 0, status::COMMAND_SEQUENCE);
            return;
        }
        if self.auth_pending() {
            self.answer(&sqe, 0, 0, AUTH_REQUIRED);
            return;
        }
        if self.qid == 0 {
            self.on_admin(cx, &sqe);
        } else {
            self.on_io(cx, sqe, data);
        }
    }

    fn on_fabrics(&mut self, cx: &mut Cx<'_>, sqe: &Sqe, data: &[u8]) {
        match (sqe.fctype, self.phase) {
            (fctype::CONNECT, Phase::AwaitConnect) => self.on_connect(cx, sqe, data),
            (fctype::CONNECT, _) => self.answer(sqe, 0, 0, status::COMMAND_SEQUENCE),
            (_, Phase::AwaitConnect) => self.answer(sqe, 0, 0, status::COMMAND_SEQUENCE),
            (FCTYPE_AUTH_SEND | FCTYPE_AUTH_RECEIVE, _) => self.on_auth(cx, sqe, data),
            (fctype::PROPERTY_SET, _) if self.auth_pending() => {
                self.answer(sqe, 0, 0, AUTH_REQUIRED)
            }
            (fctype::PROPERTY_GET, _) => {
                let Some(admin) = self.admin.as_ref() else {
                    return self.answer(sqe, 0, 0, status::INVALID_FIELD);
                };
                let (st, v) = admin.property_get(sqe.cdw11, sqe.cdw10 & 0x7 == 1);
                self.answer(sqe, v as u32, (v >> 32) as u32, st);
            }
            (fctype::PROPERTY_SET, _) => {
                let Some(admin) = self.admin.as_mut() else {
                    return self.answer(sqe, 0, 0, status::INVALID_FIELD);
                };
                let value = u64::from(sqe.cdw12) | (u64::from(sqe.cdw13) << 32);
                let st = admin.property_set(sqe.cdw11, value);
                self.answer(sqe, 0, 0, st);
            }
            (fctype::DISCONNECT, _) => {
                self.answer(sqe, 0, 0, status::SUCCESS);
                self.read_closed = true;
            }
            _ => self.answer(sqe, 0, 0, status::INVALID_OPCODE),
        }
    }

    fn on_connect(&mut self, cx: &mut Cx<'_>, sqe: &Sqe, data: &[u8]) {
        let recfmt = sqe.cdw10 & 0xffff;
        let qid = (sqe.cdw10 >> 16) as u16;
        let sqsize = (sqe.cdw11 & 0xffff) as u16;
        let cattr = (sqe.cdw11 >> 16) as u8;
        let kato_ms = sqe.cdw12;
        // Invalid-parameter completions name the field: dw0 = IPO << 16 | IATTR.
        let bad_sqe_field = |offset: u32| offset << 16;
        let bad_data_field = |offset: u32| (offset << 16) | 1;
        if recfmt != 0 {
            return self.answer(sqe, 0, 0, status::CONNECT_INCOMPATIBLE_FORMAT);
        }
        let Some(cd) = nvme::decode_connect_data(data) else {
            return self.answer(sqe, 0, 0, status::SGL_DATA_LENGTH_INVALID);
        };
        if sqsize == 0 || sqsize >= QUEUE_ENTRIES_MAX {
            return self.answer(sqe, bad_sqe_field(44), 0, status::CONNECT_INVALID_PARAMETERS);
        }
        if !self.secure_enough(&cd.hostnqn, &cd.subnqn) {
            tracing::warn!(peer = %self.peer, host = %cd.hostnqn, subsystem = %cd.subnqn, tls = ?self.tls_names, "connect refused: the secure channel does not match (a host with a key must use TLS with it)");
            return self.answer(sqe, 0, 0, status::CONNECT_INVALID_HOST);
        }
        // Looked up once: whether the queue must authenticate decides when it takes its id.
        let auth = match cd.subnqn.as_str() {
            DISCOVERY_NQN => None,
            subnqn => self.target.auth.get(&cd.hostnqn, subnqn),
        };
        let ctrl = if cd.subnqn == DISCOVERY_NQN {
            if qid != 0 {
                return self.answer(sqe, bad_sqe_field(42), 0, status::CONNECT_INVALID_PARAMETERS);
            }
            let via = self.via.clone();
            // A discovery controller that asks for no keep-alive (nvme-cli's `discover` does)
            // still ends when its host vanishes, as Linux nvmet's does.
            let kato_ms = if kato_ms == 0 { DISCOVERY_KATO_MS } else { kato_ms };
            self.target.new_controller(None, cd.hostnqn.clone(), cd.hostid, kato_ms, via)
        } else {
            let Some(subsys) = self.target.subsystem(&cd.subnqn) else {
                return self.answer(
                    sqe,
                    bad_data_field(256),
                    0,
                    status::CONNECT_INVALID_PARAMETERS,
                );
            };
            // Not listening here is not being here (Linux nvmet looks subsystems up per port).
            if !subsys.listens_on(&self.via) {
                tracing::warn!(peer = %self.peer, via = %self.via, subsystem = %cd.subnqn, "connect refused: the subsystem does not listen on this address");
                return self.answer(
                    sqe,
                    bad_data_field(256),
                    0,
                    status::CONNECT_INVALID_PARAMETERS,
                );
            }
            if !subsys.host_allowed(&cd.hostnqn) {
                tracing::warn!(peer = %self.peer, host = %cd.hostnqn, subsystem = %cd.subnqn, "connect refused: host not allowed");
                return self.answer(sqe, 0, 0, status::CONNECT_INVALID_HOST);
            }
            if qid == 0 {
                let (host, via) = (cd.hostnqn.clone(), self.via.clone());
                self.target.new_controller(Some(subsys), host, cd.hostid, kato_ms, via)
            } else {
                let ctrl = match self.target.controller(cd.cntlid) {
                    Some(c)
                        if !c.dead.load(Ordering::Relaxed)
                            && c.hostnqn == cd.hostnqn
                            && c.via == self.via
                            && c.subsys.as_ref().is_some_and(|s| s.nqn == cd.subnqn) =>
                    {
                        c
                    }
                    _ => {
                        let ipo = bad_data_field(16);
                        return self.answer(sqe, ipo, 0, status::CONNECT_INVALID_PARAMETERS);
                    }
                };
                // Read before CC.EN: a reset after this is one the queue sees.
                self.resets_seen = ctrl.resets.load(Ordering::Acquire);
                if !ctrl.enabled.load(Ordering::Acquire) {
                    return self.answer(sqe, 0, 0, status::COMMAND_SEQUENCE);
                }
                // Valid ids are 1..=granted+1 (the grant is 0's based), each connected once.
                // A queue that must authenticate takes its id once it has: until then anyone
                // knowing the host's NQN and the controller's id could hold the host's ids.
                let granted = ctrl.io_queues_granted.load(Ordering::Relaxed) + 1;
                let must_authenticate = auth.is_some();
                let taken = u32::from(qid) > granted || {
                    let mut ids = ctrl.io_qids.lock();
                    if must_authenticate {
                        ids.contains(&qid)
                    } else {
                        !ids.insert(qid)
                    }
                };
                if taken {
                    let ipo = bad_sqe_field(42);
                    return self.answer(sqe, ipo, 0, status::CONNECT_INVALID_PARAMETERS);
                }
                self.holds_qid = !must_authenticate;
                Some(ctrl)
            }
        };
        let Some(ctrl) = ctrl else {
            return self.answer(sqe, 0, 0, status::CONNECT_CONTROLLER_BUSY);
        };
        self.auth = auth.map(|config| Box::new(QueueAuth::new(config, Box::new(OsEntropy))));
        self.qid = qid;
        self.sq_entries = sqsize + 1;
        self.sqflow_disabled = cattr & 0x04 != 0;
        self.phase = Phase::Ready;
        if qid == 0 {
            self.admin = Some(AdminState::new(ctrl.clone()));
        }
        let authenticating = self.auth.is_some();
        if qid == 0 || self.holds_qid {
            ctrl.queues
                .lock()
                .insert(qid, QueueInfo { peer: self.peer.clone(), auth: None, authenticating });
        }
        tracing::info!(
            peer = %self.peer,
            subsystem = %cd.subnqn,
            host = %cd.hostnqn,
            cntlid = ctrl.cntlid,
            qid,
            core = cx.core(),
            authenticate = self.auth.is_some(),
            "NVMe/TCP queue connected"
        );
        if qid != 0 {
            // An I/O queue goes to its device's home core, or else to the core serving the
            // fewest I/O queues (`spread`); a TLS or authenticating queue stays where it is.
            let here = cx.core();
            let slot = match &ctrl.subsys {
                Some(subsys) if self.auth.is_none() && self.tls.is_none() => {
                    let first = subsys.namespaces().values().next().cloned();
                    match first.and_then(|ns| ns.dev.home_core(here)) {
                        Some(home) if home < cx.cores() => self.target.spread.take_on(home),
                        _ => self.target.spread.take(here, cx.cores()),
                    }
                }
                // Counted where it stays: its TLS or authentication state cannot travel.
                _ => self.target.spread.take_on(here),
            };
            self.moving = Some(slot.core()).filter(|&core| core != here);
            assert!(
                self.moving.is_none() || (self.auth.is_none() && self.tls.is_none()),
                "a TLS or authenticating queue never moves"
            );
            self.spread = Some(slot);
        }
        let cntlid = ctrl.cntlid;
        self.ctrl = Some(ctrl);
        let atr = if self.auth.is_some() { CONNECT_AUTHREQ_ATR } else { 0 };
        self.answer(sqe, u32::from(cntlid) | atr, 0, status::SUCCESS);
        if !self.auth_pending() {
            self.restart_tick(cx);
        }
    }

    /// Re-arms the tick for the phase the queue is now in: the handshake-deadline timer may be
    /// seconds away, so it is cut short and the keep-alive ticks start now (the cancelled
    /// timer's completion re-arms).
    fn restart_tick(&mut self, cx: &mut Cx<'_>) {
        if self.tick_inflight && !self.cancel_inflight {
            self.cancel_inflight = true;
            cx.cancel(TAG_TICK, TAG_CANCEL);
        }
        self.arm_tick(cx);
    }

    /// Fabrics Authentication Send / Receive: the payloads go through the queue's
    /// DH-HMAC-CHAP state machine (`auth::machine`), which answers protocol errors itself
    /// (a Failure1 on the next Receive); only malformed commands get an error status here.
    fn on_auth(&mut self, cx: &mut Cx<'_>, sqe: &Sqe, data: &[u8]) {
        let command = match auth_command::parse(sqe, data.len()) {
            Ok(command) => command,
            Err(refused) => {
                tracing::debug!(target: "ballast_nvmf::auth", peer = %self.peer, qid = self.qid, error = %refused, "authentication command refused");
                return self.answer(sqe, 0, 0, refused.status);
            }
        };
        let Some(mut auth) = self.auth.take() else {
            // Nothing to authenticate (ATR was not set: nvmet, no host key), or a step is
            // still away: the host sends one authentication command at a time.
            return self.answer(sqe, 0, 0, status::COMMAND_SEQUENCE);
        };
        // The step's modular exponentiation (DH) costs milliseconds: off the core with it;
        // the queue stays unauthenticated meanwhile (`auth_pending`).
        if matches!(command, AuthCommand::Send { .. }) {
            // The keys configured now, for the transaction a Negotiate would start (a rotated
            // key authenticates, a removed one no longer does).
            if let Some(ctrl) = &self.ctrl {
                let subnqn = ctrl.subsys.as_ref().map_or(DISCOVERY_NQN, |s| s.nqn.as_str());
                auth.rekey(self.target.auth.get(&ctrl.hostnqn, subnqn));
            }
        }
        if auth.is_authenticated() && self.reauth_since.is_none() {
            // A step on an authenticated queue may start a re-authentication: its deadline
            // counts from now (the step away makes the queue unauthenticated meanwhile).
            self.reauth_since = Some(Instant::now());
        }
        let (sqe, payload) = (*sqe, data.to_vec());
        self.auth_away = Some(cx.offload_with(TAG_AUTH_WORK, move || {
            let was_authenticated = auth.is_authenticated();
            let action = match command {
                AuthCommand::Send { .. } => auth.on_event(Event::Send(&payload)),
                AuthCommand::Receive { allocation_len } => {
                    auth.on_event(Event::Receive { allocation_len: allocation_len as usize })
                }
            };
            (auth, AuthStep { sqe, was_authenticated, action })
        }));
    }

    /// An authentication step came back from the offload thread: answer its command.
    fn on_auth_done(&mut self, cx: &mut Cx<'_>) {
        let back = self.auth_away.take().expect("authentication step completion without one away");
        let Some((auth, step)) = back.take() else {
            // The step died with the state machine (a panic on the offload thread).
            tracing::warn!(peer = %self.peer, qid = self.qid, "DH-HMAC-CHAP step lost; closing");
            self.close_read();
            return;
        };
        let (authenticated, negotiated) = (auth.is_authenticated(), auth.negotiated());
        let (failure, failed) = (auth.failure(), auth.is_failed());
        self.auth = Some(auth);
        let AuthStep { sqe, was_authenticated, action } = step;
        let cid = sqe.cid;
        match action {
            Action::Accepted => self.respond(cid, 0, 0, status::SUCCESS),
            Action::Data(bytes) => {
                let mut buf = IoBuf::with_capacity(bytes.len().max(1));
                buf.extend_from_slice(&bytes);
                self.respond_with_data(cx, cid, buf, 0);
            }
            Action::AllocationTooSmall { needed } => {
                tracing::debug!(target: "ballast_nvmf::auth", peer = %self.peer, qid = self.qid, needed, "AUTH_Receive allocation too small");
                self.answer(&sqe, 0, 0, status::INVALID_FIELD);
            }
        }
        let host = self.ctrl.as_ref().map(|c| c.hostnqn.clone()).unwrap_or_default();
        if authenticated {
            self.reauth_since = None;
        }
        if authenticated && !was_authenticated {
            let (hash, group) = negotiated.map_or(("?", "?"), |(h, g)| (h.name(), g.name()));
            tracing::info!(peer = %self.peer, host = %host, qid = self.qid, hash, dhgroup = group, "DH-HMAC-CHAP: queue authenticated");
            if let Some(c) = self.ctrl.clone() {
                if self.qid != 0 && !self.holds_qid {
                    // Authenticated: now the I/O queue takes its id — if the controller still
                    // lives, was not reset since the Connect, still grants that id, and no
                    // other queue of it took the id meanwhile.
                    let granted = c.io_queues_granted.load(Ordering::Relaxed) + 1;
                    let current = !c.dead.load(Ordering::Acquire)
                        && c.resets.load(Ordering::Acquire) == self.resets_seen
                        && u32::from(self.qid) <= granted;
                    if !current || !c.io_qids.lock().insert(self.qid) {
                        tracing::warn!(peer = %self.peer, host = %host, qid = self.qid, current, "I/O queue id no longer available; closing the queue");
                        self.close_read();
                        return;
                    }
                    self.holds_qid = true;
                    let info =
                        QueueInfo { peer: self.peer.clone(), auth: None, authenticating: false };
                    c.queues.lock().insert(self.qid, info);
                }
                if let Some(q) = c.queues.lock().get_mut(&self.qid) {
                    q.auth = Some((hash, group));
                    q.authenticating = false;
                }
            }
            self.restart_tick(cx);
        } else if failed {
            // The host was told (Failure1) or told us (Failure2): the association ends, as
            // nvmet (a fatal controller error) and SPDK end it; the response goes out first.
            let reason = failure.map(|r| format!("{r:?}")).unwrap_or_default();
            tracing::warn!(peer = %self.peer, host = %host, qid = self.qid, reason, "DH-HMAC-CHAP: authentication failed; closing the queue");
            self.close_read();
        }
    }

    fn on_admin(&mut self, cx: &mut Cx<'_>, sqe: &Sqe) {
        let Some(admin) = self.admin.as_mut() else { return };
        let reply: Reply = admin.execute(&self.target, sqe);
        if reply.held {
            return;
        }
        if let Some(kept) = reply.resv_save {
            // A host past its admin queue's size: the change stays to be kept by the
            // namespace's next reservation command.
            if self.resv_waits.len() >= usize::from(self.sq_entries) {
                return self.answer(sqe, 0, 0, status::INTERNAL);
            }
            let (ns, save) = (Arc::new(kept.ns), Some(kept.version));
            let w = ResvWait { sqe: *sqe, status: status::SUCCESS, ns, save, drain: Drain::Done };
            return self.wait_resv(cx, w);
        }
        match reply.data {
            Some(bytes) if reply.status == status::SUCCESS => {
                let want = (sqe.sgl_len as usize).min(bytes.len());
                let mut buf = IoBuf::with_capacity(want.max(1));
                buf.extend_from_slice(&bytes[..want]);
                if want == 0 {
                    self.answer(sqe, reply.dw0, reply.dw1, reply.status);
                } else {
                    self.respond_with_data(cx, sqe.cid, buf, reply.dw0);
                }
            }
            _ => self.answer(sqe, reply.dw0, reply.dw1, reply.status),
        }
        self.deliver_events();
    }

    fn deliver_events(&mut self) {
        while let Some((cid, event)) = self.admin.as_mut().and_then(AdminState::take_event) {
            self.respond(cid, event, 0, status::SUCCESS);
        }
    }

    /// The namespace an I/O command names, from this queue's cache of them.
    fn io_namespace(&mut self, nsid: u32) -> Option<QueueNs> {
        let subsys = self.ctrl.as_ref()?.subsys.as_ref()?;
        self.ns_cache.get(subsys, nsid)
    }

    /// Validates an I/O command; on success returns the namespace and byte range.
    fn check_io(&mut self, sqe: &Sqe) -> Result<(QueueNs, u64, u32), Status> {
        let ns = self.io_namespace(sqe.nsid).ok_or(status::INVALID_NAMESPACE)?;
        self.path_refusal(&ns)?;
        self.reserved_for(&ns, sqe.opcode)?;
        let nlb = u64::from(sqe.nlb());
        let end = sqe.slba().checked_add(nlb).ok_or(status::LBA_OUT_OF_RANGE)?;
        if end > ns.blocks() {
            return Err(status::LBA_OUT_OF_RANGE);
        }
        let bytes = nlb << ns.lba_shift;
        let offset = sqe.slba() << ns.lba_shift;
        Ok((ns, offset, bytes.min(u64::from(u32::MAX)) as u32))
    }

    /// Validates an I/O command that moves data (read, write, compare): [`Self::check_io`],
    /// within MDTS, and its data pointer as long as its blocks.
    fn check_transfer(&mut self, sqe: &Sqe) -> Result<(QueueNs, u64, u32), Status> {
        let (ns, offset, len) = self.check_io(sqe)?;
        if len > MAX_TRANSFER_BYTES {
            return Err(status::INVALID_FIELD);
        }
        if sqe.sgl_len != len {
            return Err(status::SGL_DATA_LENGTH_INVALID);
        }
        Ok((ns, offset, len))
    }

    /// The path related status an I/O command on `ns` gets through this queue's listener while
    /// the namespace's ANA group is inaccessible, lost or changing there (a host retries it on
    /// another path), as nvmet and SPDK check every I/O command. While no path of the
    /// subsystem refuses I/O: one load.
    fn path_refusal(&mut self, ns: &Namespace) -> Result<(), Status> {
        let Some(ctrl) = self.ctrl.as_ref() else { return Ok(()) };
        let Some(subsys) = ctrl.subsys.as_ref() else { return Ok(()) };
        match self.ana_view.refusal(&subsys.ana, &ctrl.via, ns.anagrpid) {
            Some(st) => Err(st),
            None => Ok(()),
        }
    }

    /// Reservation Conflict if a reservation on `ns` keeps this queue's host from I/O command
    /// `opcode`. While none is held: one load. While one is: the verdict this queue cached for
    /// the table's version (one more load), recomputed under the table's lock only after a
    /// reservation command changed it.
    fn reserved_for(&mut self, ns: &Namespace, opcode: u8) -> Result<(), Status> {
        let (Some(ctrl), Some(access)) = (self.ctrl.as_ref(), Access::of_opcode(opcode)) else {
            return Ok(());
        };
        if !ns.resv.held() {
            return Ok(());
        }
        let hostid = ctrl.hostid;
        let ns_key = ns as *const Namespace as usize;
        let version = ns.resv.version();
        let cached = self.resv_verdicts.iter().find(|v| v.ns == ns_key && v.version == version);
        let verdict = match cached {
            Some(v) => *v,
            None => {
                let (version, read, write) = ns.resv.verdicts(&hostid);
                let v = ResvVerdict { ns: ns_key, version, read, write };
                self.resv_verdicts.retain(|o| o.ns != ns_key);
                if self.resv_verdicts.len() >= RESV_VERDICTS_MAX {
                    self.resv_verdicts.remove(0);
                }
                self.resv_verdicts.push(v);
                v
            }
        };
        match (access, verdict.read, verdict.write) {
            (Access::Read, true, _) | (Access::Write, _, true) => Ok(()),
            _ => Err(resv::RESERVATION_CONFLICT),
        }
    }

    /// A write-group command about to go to the media: counted on its device's write gate
    /// (`Ok(None)`: a fused Compare and Write holds the gate's fence, nothing is counted and
    /// the command waits), then as [`Self::admit_resv`] does.
    fn admit(
        &mut self,
        cx: &Cx<'_>,
        ns: &Namespace,
        opcode: u8,
    ) -> Result<Option<Admission>, Status> {
        let gate = ns.dev.write_gate();
        let gated = match gate.map(|g| g.enter(cx.core())) {
            Some(None) => return Ok(None),
            Some(t) => t,
            None => None,
        };
        match self.admit_resv(cx, ns, opcode) {
            Ok(executing) => Ok(Some(Admission { executing, gated })),
            Err(st) => {
                if let (Some(g), Some(t)) = (gate, gated) {
                    g.exit(t);
                }
                Err(st)
            }
        }
    }

    /// Hands back what [`Self::admit`] counted, for a command that is done at once.
    fn release(ns: &Namespace, a: Admission) {
        if let Some(e) = a.executing {
            ns.resv.exit(e);
        }
        if let (Some(g), Some(t)) = (ns.dev.write_gate(), a.gated) {
            g.exit(t);
        }
    }

    /// Counted among the namespace's executing write-group commands while a reservation is
    /// held (Preempt and Abort waits for them), then checked again, so a preempt either waits
    /// for it or it sees the preempt.
    fn admit_resv(
        &mut self,
        cx: &Cx<'_>,
        ns: &Namespace,
        opcode: u8,
    ) -> Result<Option<Executing>, Status> {
        let Some(e) = ns.resv.enter(cx.core()) else { return Ok(None) };
        match self.reserved_for(ns, opcode) {
            Ok(()) => Ok(Some(e)),
            Err(st) => {
                ns.resv.exit(e);
                Err(st)
            }
        }
    }

    /// Reservation Register, Acquire, Release (data in the capsule: both keys) and Report
    /// (data to the host), decided by the namespace's [`crate::resv::Reservations`].
    fn on_reservation(&mut self, cx: &mut Cx<'_>, sqe: Sqe, data: &[u8]) {
        let Some(ns) = self.io_namespace(sqe.nsid) else {
            return self.answer(&sqe, 0, 0, status::INVALID_NAMESPACE);
        };
        let Some(host) = self.ctrl.as_ref().map(|c| c.hostid) else {
            return self.answer(&sqe, 0, 0, status::INVALID_NAMESPACE);
        };
        if let Err(st) = self.path_refusal(&ns) {
            return self.answer(&sqe, 0, 0, st);
        }
        if sqe.opcode == io::RESV_REPORT {
            if sqe.sgl_type != nvme::SGL_TRANSPORT_DATA_BLOCK {
                return self.answer(&sqe, 0, 0, status::SGL_TYPE_INVALID);
            }
            if sqe.sgl_len == 0 || sqe.cdw10 == u32::MAX {
                return self.answer(&sqe, 0, 0, status::INVALID_FIELD);
            }
            // NUMDs from the host, bounded by its buffer and by the largest report.
            let asked = (sqe.cdw10 as usize + 1) * 4;
            return match ns.resv.report(sqe.cdw11, asked.min(sqe.sgl_len as usize)) {
                Ok(report) => {
                    let mut buf = cx.buf_with_capacity(report.len());
                    buf.extend_from_slice(&report);
                    self.respond_with_data(cx, sqe.cid, buf, 0);
                }
                Err(st) => self.answer(&sqe, 0, 0, st),
            };
        }
        // The keys come in the capsule (16 bytes: Linux and SPDK hosts put them there).
        if sqe.sgl_type != nvme::SGL_DATA_BLOCK_OFFSET {
            return self.answer(&sqe, 0, 0, status::SGL_TYPE_INVALID);
        }
        if data.len() != sqe.sgl_len as usize || sqe.sgl_addr != 0 {
            return self.answer(&sqe, 0, 0, status::SGL_DATA_LENGTH_INVALID);
        }
        // The hosts it took something from hear of it (their admin queues send the event) as
        // soon as the table changed: a change not kept yet is already what governs access.
        let subsys = self.ctrl.as_ref().and_then(|c| c.subsys.clone());
        let target = &self.target;
        let (st, save) = ns.resv.command_then(
            |r| match sqe.opcode {
                io::RESV_REGISTER => r.register(&host, sqe.cdw10, data),
                io::RESV_ACQUIRE => r.acquire(&host, sqe.cdw10, data),
                _ => r.release(&host, sqe.cdw10, data),
            },
            |notices| {
                if let Some(s) = &subsys {
                    target.reservation_notices(&s.nqn, sqe.nsid, notices);
                }
            },
        );
        // Preempt and Abort: the preempted hosts' writes already on their way to the media
        // finish before it completes (every write counted under the epoch before it).
        let abort = sqe.opcode == io::RESV_ACQUIRE && sqe.cdw10 & 0x7 == 2;
        let drain = if abort && st == status::SUCCESS { Drain::Pending } else { Drain::Done };
        if save.is_none() && drain == Drain::Done {
            return self.answer(&sqe, 0, 0, st);
        }
        self.wait_resv(cx, ResvWait { sqe, status: st, ns, save, drain });
    }

    /// A reservation change (a Register, Acquire or Release; Set Features Reservation
    /// Persistence on the admin queue) answers once what it waits for is done. Persist Through
    /// Power Loss: the change is kept (by the target's saver thread, never here: the pool's
    /// write waits for a core) before the command completes. A save that cannot be queued or
    /// fails answers Internal Error; the table stays to be kept, so the host's retry saves it.
    fn wait_resv(&mut self, cx: &mut Cx<'_>, w: ResvWait) {
        if w.save.is_some() && !w.ns.resv.queue_save() {
            tracing::warn!(peer = %self.peer, "NVMe reservation change not kept: the saver's queue is full");
            return self.answer(&w.sqe, 0, 0, status::INTERNAL);
        }
        self.resv_waits.push(w);
        self.on_resv_waits(cx);
    }

    /// Reservation commands waiting for saves and drains: each answers once both are done;
    /// the poll timer stays armed while any still waits.
    fn on_resv_waits(&mut self, cx: &mut Cx<'_>) {
        let mut i = 0;
        while i < self.resv_waits.len() {
            let w = &mut self.resv_waits[i];
            if let Some(kept) = w.save.and_then(|v| w.ns.resv.save_outcome(v)) {
                w.save = None;
                if !kept {
                    w.status = status::INTERNAL;
                }
            }
            if w.drain == Drain::Pending {
                if let Some(old) = w.ns.resv.try_begin_drain() {
                    w.drain = Drain::Waiting(old);
                }
            }
            if let Drain::Waiting(old) = w.drain {
                if w.ns.resv.drained(old) {
                    w.drain = Drain::Done;
                }
            }
            if w.save.is_some() || w.drain != Drain::Done {
                i += 1;
                continue;
            }
            let ResvWait { sqe, status: st, .. } = self.resv_waits.swap_remove(i);
            if !self.send_broken() {
                self.answer(&sqe, 0, 0, st);
            }
        }
        if !self.resv_timer && !self.resv_waits.is_empty() {
            self.resv_timer = true;
            cx.timer(TAG_RESV_POLL, RESV_POLL);
        }
    }

    fn on_io(&mut self, cx: &mut Cx<'_>, sqe: Sqe, data: &[u8]) {
        if self.cmds.len() + self.resv_waits.len() >= usize::from(self.sq_entries) {
            // The host overran its submission queue.
            self.abandon_first(cx, &sqe);
            return self.answer(&sqe, 0, 0, status::COMMAND_SEQUENCE);
        }
        if self.fused_first.is_some() || sqe.fuse() != nvme::FUSE_NONE {
            let first = self.fused_first.map(|t| self.cmds[t as usize].sqe);
            let pairing = fused::pairing(&sqe, first.as_ref());
            if pairing == Pairing::Completes {
                return self.on_fused_write(cx, sqe, data);
            }
            self.abandon_first(cx, &sqe);
            match pairing {
                Pairing::Refused(st) => return self.answer(&sqe, 0, 0, st),
                Pairing::Opens => return self.on_compare(cx, sqe, data, Role::FusedCompare),
                Pairing::Alone | Pairing::Completes => {}
            }
        }
        match sqe.opcode {
            io::READ | io::WRITE => self.on_read_write(cx, sqe, data),
            io::COMPARE => self.on_compare(cx, sqe, data, Role::Compare),
            io::FLUSH => self.on_flush(cx, sqe),
            io::WRITE_ZEROES => match self.check_io(&sqe) {
                Ok((ns, ..)) if ns.read_only() => {
                    self.answer(&sqe, 0, 0, status::NS_WRITE_PROTECTED)
                }
                Ok((ns, offset, len)) => {
                    let may_unmap = sqe.cdw12 & (1 << 25) != 0;
                    let fua = sqe.fua();
                    let tag = self.track(cx, sqe, Some(ns), OpKind::WriteZeroes, 0, 1);
                    self.cmds[tag as usize].then_flush = fua;
                    let op = IoCmd::WriteZeroes { offset, len: u64::from(len), may_unmap };
                    self.start_writes(cx, tag, [op], None);
                }
                Err(st) => self.answer(&sqe, 0, 0, st),
            },
            io::DSM => self.on_dsm(cx, sqe, data),
            io::RESV_REGISTER | io::RESV_REPORT | io::RESV_ACQUIRE | io::RESV_RELEASE => {
                self.on_reservation(cx, sqe, data)
            }
            _ => self.answer(&sqe, 0, 0, status::INVALID_OPCODE),
        }
    }

    /// Takes a command in: it counts as in flight on its device until [`Self::untrack`].
    fn track(
        &mut self,
        cx: &mut Cx<'_>,
        sqe: Sqe,
        ns: Option<QueueNs>,
        kind: OpKind,
        bytes: u32,
        pending: u32,
    ) -> u32 {
        cx.stats().submitted(stats_id(ns.as_ref()), Proto::Nvmf);
        let key = self.cmds.insert(Cmd {
            sqe,
            ns,
            state: CmdState::Executing { pending },
            buf: None,
            status: status::SUCCESS,
            kind,
            bytes,
            started: Instant::now(),
            charged: 0,
            then_flush: false,
            executing: None,
            gated: None,
            role: Role::Plain,
        });
        key as u32
    }

    /// Lets a command go, whatever became of it (the one way out of `cmds`).
    fn untrack(&mut self, cx: &mut Cx<'_>, tag: usize) -> Cmd {
        let mut cmd = self.cmds.remove(tag);
        if let (Some(e), Some(ns)) = (cmd.executing.take(), cmd.ns.as_ref()) {
            ns.resv.exit(e);
        }
        if let (Some(t), Some(gate)) =
            (cmd.gated.take(), cmd.ns.as_ref().and_then(|ns| ns.dev.write_gate()))
        {
            gate.exit(t);
        }
        cx.stats().retired(stats_id(cmd.ns.as_ref()), Proto::Nvmf);
        cmd
    }

    fn on_read_write(&mut self, cx: &mut Cx<'_>, sqe: Sqe, data: &[u8]) {
        let write = sqe.opcode == io::WRITE;
        let (ns, offset, len) = match self.check_transfer(&sqe) {
            Ok(v) => v,
            Err(st) => return self.answer(&sqe, 0, 0, st),
        };
        if !write {
            if sqe.sgl_type != nvme::SGL_TRANSPORT_DATA_BLOCK {
                return self.answer(&sqe, 0, 0, status::SGL_TYPE_INVALID);
            }
            if self.may_lend() {
                if let Some(data) = ns.dev.lend(cx.core(), offset, u64::from(len)) {
                    return self.respond_lent(cx, &sqe, &ns, data);
                }
            }
            let tag = self.track(cx, sqe, Some(ns.clone()), OpKind::Read, len, 1);
            self.cmds[tag as usize].charged = self.take_pdu_charge();
            let buf = cx.buf(len as usize);
            ns.dev.submit(cx, IoCmd::Read { offset, buf }, tag);
            self.hold_back_for(cx, &ns.dev);
            return;
        }
        if ns.read_only() {
            return self.answer(&sqe, 0, 0, status::NS_WRITE_PROTECTED);
        }
        match sqe.sgl_type {
            nvme::SGL_DATA_BLOCK_OFFSET => {
                if data.len() != len as usize || sqe.sgl_addr != 0 {
                    return self.answer(&sqe, 0, 0, status::SGL_DATA_LENGTH_INVALID);
                }
                let admission = match self.admit(cx, &ns, sqe.opcode) {
                    Ok(a) => a,
                    Err(st) => return self.answer(&sqe, 0, 0, st),
                };
                if admission.is_some() && ns.dev.write_now(offset, data) {
                    if let Some(a) = admission {
                        Self::release(&ns, a);
                    }
                    // Stored from the receive buffer: no buffer, no I/O, no request slot.
                    self.done_at_once(cx, &ns, OpKind::Write, len);
                    cx.stats().writes_now += 1;
                    let charged = self.take_pdu_charge();
                    self.mem.release(cx, charged);
                    if !self.send_broken() {
                        self.answer(&sqe, 0, 0, status::SUCCESS);
                    }
                    return;
                }
                let mut buf = cx.buf_with_capacity(len as usize);
                buf.extend_from_slice(data);
                let fua = sqe.fua();
                let tag = self.track(cx, sqe, Some(ns), OpKind::Write, len, 1);
                self.cmds[tag as usize].charged = self.take_pdu_charge();
                let op = IoCmd::Write { offset, buf, fua };
                self.go_or_park(cx, tag, admission, [op], None);
            }
            nvme::SGL_TRANSPORT_DATA_BLOCK => {
                // No buffer yet: it is charged and allocated when the first H2CData arrives.
                let tag = self.track(cx, sqe, Some(ns), OpKind::Write, len, 0);
                let cmd = &mut self.cmds[tag as usize];
                cmd.state = CmdState::AwaitData { received: 0 };
                self.scratch.clear();
                pdu::encode_r2t(&mut self.scratch, sqe.cid, tag as u16, 0, len, self.hdgst);
                self.queue_scratch();
            }
            _ => self.answer(&sqe, 0, 0, status::SGL_TYPE_INVALID),
        }
    }

    /// An H2CData PDU: `data` is its payload, or the first part of it (`total` bytes in all)
    /// when the rest is to be received straight into the command's buffer.
    #[allow(clippy::too_many_arguments)]
    fn on_h2c_data(
        &mut self,
        cx: &mut Cx<'_>,
        h: &pdu::H2cData,
        data: &[u8],
        total: usize,
        digest_ok: bool,
        last: bool,
        header: &[u8],
    ) {
        let Some(cmd) = self.cmds.get_mut(usize::from(h.ttag)) else {
            return self.fatal(Fatal::field(10, "H2CData with an unknown transfer tag"), header);
        };
        let CmdState::AwaitData { received } = cmd.state else {
            return self
                .fatal(Fatal::field(10, "H2CData for a command not waiting for data"), header);
        };
        if cmd.sqe.cid != h.cid {
            return self
                .fatal(Fatal::field(8, "H2CData command id does not match its tag"), header);
        }
        let received = match pdu::check_h2c_data(h, total, received, cmd.bytes, MAXH2CDATA) {
            Ok(received) => received,
            Err(f) => return self.fatal(f, header),
        };
        // This PDU's data was charged before it was taken.
        cmd.charged += std::mem::take(&mut self.charged_for_pdu);
        assert!(cmd.charged <= cmd.charge_max(), "transfer charged beyond its length");
        if cmd.buf.is_none() {
            cmd.buf = Some(cx.buf_with_capacity(cmd.bytes as usize));
        }
        let Some(buf) = cmd.buf.as_mut() else { return };
        buf.extend_from_slice(data);
        if data.len() < total {
            self.direct = Some(Direct {
                ttag: h.ttag,
                left: total - data.len(),
                received,
                last,
                inflight: false,
            });
            return;
        }
        self.h2c_landed(cx, h.ttag, received, digest_ok, last);
    }

    /// An H2CData PDU's payload is all in its command's buffer: the transfer has `received`
    /// bytes; when complete, the write goes to the namespace.
    fn h2c_landed(
        &mut self,
        cx: &mut Cx<'_>,
        ttag: u16,
        received: u32,
        digest_ok: bool,
        last: bool,
    ) {
        let Some(cmd) = self.cmds.get_mut(usize::from(ttag)) else { return };
        if !digest_ok {
            // The data is damaged: take the rest of the transfer, then fail the command.
            cmd.status = status::TRANSIENT_TRANSPORT_ERROR;
        }
        if received < cmd.bytes {
            cmd.state = CmdState::AwaitData { received };
            return;
        }
        if !last {
            tracing::debug!(peer = %self.peer, "final H2CData without LAST_PDU");
        }
        if cmd.status != status::SUCCESS {
            let st = cmd.status;
            if let Some(partner) = self.unpair(u32::from(ttag)) {
                self.fail_half(cx, partner, status::ABORTED_FAILED_FUSED);
            }
            self.answer_cmd(cx, u32::from(ttag), st);
            // The pair that went may have been first: the next one's turn.
            return self.drive_fused(cx);
        }
        self.data_landed(cx, u32::from(ttag));
    }

    /// A command's data is all in its buffer: a write goes to its device (checked again and
    /// counted now, so a host preempted while it sent the data — for as long as it liked —
    /// writes nothing), a Compare reads what it compares, a fused half waits for its pair.
    fn data_landed(&mut self, cx: &mut Cx<'_>, tag: u32) {
        let cmd = &mut self.cmds[tag as usize];
        match cmd.role {
            Role::Plain => {
                let buf = cmd.buf.take().expect("write buffer present");
                let ns = cmd.ns.as_ref().expect("a write has its namespace");
                let offset = cmd.sqe.slba() << ns.lba_shift;
                let fua = cmd.sqe.fua();
                self.start_writes(cx, tag, [IoCmd::Write { offset, buf, fua }], None);
            }
            Role::Compare => {
                cmd.state = CmdState::Executing { pending: 1 };
                self.read_to_compare(cx, tag);
            }
            Role::FusedCompare | Role::FusedWrite => {
                cmd.state = CmdState::Held;
                self.drive_fused(cx);
            }
        }
    }

    /// Answers a tracked command with `st` (one that did not, or no longer may, go to its
    /// device; or a Compare or fused half that is done), giving back its buffer and memory.
    fn answer_cmd(&mut self, cx: &mut Cx<'_>, tag: u32, st: Status) {
        let cmd = self.untrack(cx, tag as usize);
        if let Some(b) = cmd.buf {
            cx.recycle(b);
        }
        self.mem.release(cx, cmd.charged);
        if !self.send_broken() {
            self.answer(&cmd.sqe, 0, 0, st);
        }
    }

    /// Sends a tracked write-group command's device operations, counted by [`Self::admit`];
    /// parks them while its device's gate is fenced (`waiting`: it was parked before); answers
    /// it instead when a reservation now refuses its host.
    fn start_writes<I: IntoIterator<Item = IoCmd>>(
        &mut self,
        cx: &mut Cx<'_>,
        tag: u32,
        ops: I,
        waiting: Option<Waiting>,
    ) {
        let cmd = &self.cmds[tag as usize];
        let ns = cmd.ns.clone().expect("a write-group command has its namespace");
        let opcode = cmd.sqe.opcode;
        match self.admit(cx, &ns, opcode) {
            Ok(admission) => self.go_or_park(cx, tag, admission, ops, waiting),
            Err(st) => {
                for op in ops {
                    recycle_op(cx, op);
                }
                self.answer_cmd(cx, tag, st);
            }
        }
    }

    /// Sends `ops` of an admitted command (its counts kept with it until it leaves), or parks
    /// them (`None`: its device's gate is fenced) until the fence is lifted, counted among the
    /// gate's waiting writes from its first refusal (`waiting`) until it goes.
    fn go_or_park<I: IntoIterator<Item = IoCmd>>(
        &mut self,
        cx: &mut Cx<'_>,
        tag: u32,
        admission: Option<Admission>,
        ops: I,
        waiting: Option<Waiting>,
    ) {
        let cmd = &mut self.cmds[tag as usize];
        let Some(a) = admission else {
            let waiting = waiting.unwrap_or_else(|| {
                cx.stats().writes_fenced += 1;
                let ns = cmd.ns.as_ref().expect("a write-group command has its namespace");
                ns.dev.write_gate().expect("only a gate fences").wait()
            });
            cmd.state = CmdState::Parked;
            self.parked.push(Parked { tag, ops: ops.into_iter().collect(), waiting });
            return self.fence_poll.arm(cx, TAG_FENCE_POLL);
        };
        drop(waiting);
        cmd.executing = a.executing;
        cmd.gated = a.gated;
        let ns = cmd.ns.clone().expect("a write-group command has its namespace");
        let mut pending = 0;
        for op in ops {
            ns.dev.submit(cx, op, tag);
            pending += 1;
        }
        self.cmds[tag as usize].state = CmdState::Executing { pending };
        self.hold_back_for(cx, &ns.dev);
    }

    /// The fence timer: parked writes try again, the first fused pair takes its next step.
    fn on_fence_poll(&mut self, cx: &mut Cx<'_>) {
        self.fence_poll.fired();
        if self.read_closed {
            // Closing: what waits never went to the media; `finish` lets it go. A pair still
            // waiting for the writes before it lifts its fence now (the host may take its
            // time reading its last responses: others' writes do not wait for that).
            if let Some(pair) = self.fused.front_mut().filter(|p| p.step == Step::Draining) {
                pair.fence = None;
                pair.step = Step::Fencing;
            }
            return;
        }
        for Parked { tag, ops, waiting } in std::mem::take(&mut self.parked) {
            self.start_writes(cx, tag, ops, Some(waiting));
        }
        self.drive_fused(cx);
    }

    /// A Compare (alone, or the first of a fused pair: `role`): its data arrives as a write's
    /// does (in the capsule, or through R2T); its charge covers that data and its read.
    fn on_compare(&mut self, cx: &mut Cx<'_>, sqe: Sqe, data: &[u8], role: Role) {
        let (ns, _, len) = match self.check_transfer(&sqe) {
            Ok(v) => v,
            Err(st) => return self.answer(&sqe, 0, 0, st),
        };
        if role == Role::FusedCompare && ns.dev.write_gate().is_none() {
            // A device served without a write gate cannot keep other writes out.
            return self.answer(&sqe, 0, 0, status::INVALID_FIELD);
        }
        let Some(tag) = self.take_data(cx, sqe, ns, data, OpKind::Read, len, role) else { return };
        if role == Role::FusedCompare {
            self.fused_first = Some(tag);
        }
        if self.cmds[tag as usize].buf.is_some() {
            self.data_landed(cx, tag);
        }
    }

    /// The second command of a fused pair (a Write of the Compare's blocks): the pair is
    /// queued; a refusal answers it and aborts the Compare.
    fn on_fused_write(&mut self, cx: &mut Cx<'_>, sqe: Sqe, data: &[u8]) {
        let first = self.fused_first.take().expect("a pair completes its waiting Compare");
        let first_ns = self.cmds[first as usize].ns.clone().expect("a Compare has its namespace");
        let checked = self.check_transfer(&sqe).and_then(|(ns, offset, len)| {
            if !Arc::ptr_eq(&*ns, &*first_ns) {
                // The namespace was replaced between the two capsules.
                Err(status::INVALID_FIELD)
            } else if ns.read_only() {
                Err(status::NS_WRITE_PROTECTED)
            } else {
                Ok((ns, offset, len))
            }
        });
        let (ns, _, len) = match checked {
            Ok(v) => v,
            Err(st) => {
                self.fail_half(cx, first, status::ABORTED_FAILED_FUSED);
                return self.answer(&sqe, 0, 0, st);
            }
        };
        let Some(tag) = self.take_data(cx, sqe, ns, data, OpKind::Write, len, Role::FusedWrite)
        else {
            return self.fail_half(cx, first, status::ABORTED_FAILED_FUSED);
        };
        self.fused.push_back(Pair {
            compare: first,
            write: tag,
            step: Step::AwaitData,
            fence: None,
        });
        if self.cmds[tag as usize].buf.is_some() {
            self.data_landed(cx, tag);
        }
    }

    /// Tracks a command whose data comes to the controller, for `role`: in-capsule data is
    /// copied into its buffer (the capsule's charge goes with it); otherwise an R2T asks for
    /// it (a Compare keeps its read's charge, the rest of the probe is let go). `None`: it was
    /// answered (a bad data pointer).
    #[allow(clippy::too_many_arguments)]
    fn take_data(
        &mut self,
        cx: &mut Cx<'_>,
        sqe: Sqe,
        ns: QueueNs,
        data: &[u8],
        kind: OpKind,
        len: u32,
        role: Role,
    ) -> Option<u32> {
        match sqe.sgl_type {
            nvme::SGL_DATA_BLOCK_OFFSET => {
                if data.len() != len as usize || sqe.sgl_addr != 0 {
                    self.answer(&sqe, 0, 0, status::SGL_DATA_LENGTH_INVALID);
                    return None;
                }
                let mut buf = cx.buf_with_capacity(len as usize);
                buf.extend_from_slice(data);
                let tag = self.track(cx, sqe, Some(ns), kind, len, 1);
                let charged = self.take_pdu_charge();
                let cmd = &mut self.cmds[tag as usize];
                cmd.charged = charged;
                cmd.buf = Some(buf);
                cmd.role = role;
                Some(tag)
            }
            nvme::SGL_TRANSPORT_DATA_BLOCK => {
                let tag = self.track(cx, sqe, Some(ns), kind, len, 0);
                let probe = self.take_pdu_charge();
                let keep = if role == Role::FusedWrite { 0 } else { probe.min(u64::from(len)) };
                self.charged_for_pdu = probe - keep;
                let cmd = &mut self.cmds[tag as usize];
                cmd.state = CmdState::AwaitData { received: 0 };
                cmd.charged = keep;
                cmd.role = role;
                self.scratch.clear();
                pdu::encode_r2t(&mut self.scratch, sqe.cid, tag as u16, 0, len, self.hdgst);
                self.queue_scratch();
                Some(tag)
            }
            _ => {
                self.answer(&sqe, 0, 0, status::SGL_TYPE_INVALID);
                None
            }
        }
    }

    /// Reads the range a Compare (its data here) compares, into a buffer of its own.
    fn read_to_compare(&mut self, cx: &mut Cx<'_>, tag: u32) {
        let cmd = &mut self.cmds[tag as usize];
        let ns = cmd.ns.clone().expect("a Compare has its namespace");
        let offset = cmd.sqe.slba() << ns.lba_shift;
        cmd.state = CmdState::Executing { pending: 1 };
        let buf = cx.buf(cmd.bytes as usize);
        ns.dev.submit(cx, IoCmd::Read { offset, buf }, tag);
        self.hold_back_for(cx, &ns.dev);
    }

    /// The capsule `next` came while a Compare waited for its second command and is not that
    /// command: the Compare is aborted — Failed Fused when `next` was its second command but
    /// refused, Missing Fused otherwise.
    fn abandon_first(&mut self, cx: &mut Cx<'_>, next: &Sqe) {
        if let Some(first) = self.fused_first.take() {
            let why = if next.fuse() == nvme::FUSE_SECOND {
                status::ABORTED_FAILED_FUSED
            } else {
                status::ABORTED_MISSING_FUSED
            };
            self.fail_half(cx, first, why);
        }
    }

    /// Takes a fused half out of its pair (or out of waiting for its second command): its
    /// partner, if it had one by now. The pair's fence, if any, is lifted.
    fn unpair(&mut self, tag: u32) -> Option<u32> {
        if self.fused_first == Some(tag) {
            self.fused_first = None;
            return None;
        }
        let at = self.fused.iter().position(|p| p.compare == tag || p.write == tag)?;
        let pair = self.fused.remove(at).expect("found");
        Some(if pair.compare == tag { pair.write } else { pair.compare })
    }

    /// Answers a fused half with `st`: at once when its data is here, else once it is (the
    /// host still sends it; its transfer stays open until then).
    fn fail_half(&mut self, cx: &mut Cx<'_>, tag: u32, st: Status) {
        let cmd = &mut self.cmds[tag as usize];
        assert!(!matches!(cmd.state, CmdState::Executing { .. }), "a fused half failed in flight");
        if matches!(cmd.state, CmdState::AwaitData { .. }) {
            if cmd.status == status::SUCCESS {
                cmd.status = st;
            }
            return;
        }
        self.answer_cmd(cx, tag, st);
    }

    /// Moves the first fused pair on as far as it can go now: once both commands' data is
    /// here, it takes its device's fence, waits for the writes before it, and reads what it
    /// compares; the timer looks again while it waits for a fence or a drain.
    fn drive_fused(&mut self, cx: &mut Cx<'_>) {
        loop {
            let Some(pair) = self.fused.front_mut() else { return };
            let held = |t: u32| matches!(self.cmds[t as usize].state, CmdState::Held);
            match pair.step {
                Step::AwaitData if held(pair.compare) && held(pair.write) => {
                    pair.step = Step::Fencing;
                }
                Step::AwaitData | Step::Reading | Step::Writing => return,
                // Closing: no pair takes a fence any more (`finish` lets them go).
                Step::Fencing if self.read_closed => return,
                Step::Fencing => {
                    let ns = self.cmds[pair.compare as usize].ns.clone().expect("namespace");
                    let gate = ns.dev.write_gate().expect("a fused Compare's device has a gate");
                    match gate.try_fence() {
                        Some(f) => {
                            pair.fence = Some(f);
                            pair.step = Step::Draining;
                        }
                        None => return self.fence_poll.arm(cx, TAG_FENCE_POLL),
                    }
                }
                Step::Draining if self.read_closed => {
                    pair.fence = None;
                    pair.step = Step::Fencing;
                    return;
                }
                Step::Draining => {
                    if !pair.fence.as_ref().is_some_and(|f| f.drained()) {
                        return self.fence_poll.arm(cx, TAG_FENCE_POLL);
                    }
                    let (compare, write) = (pair.compare, pair.write);
                    let ns = self.cmds[write as usize].ns.clone().expect("namespace");
                    // The Write is counted (and checked) as any write is, now that it will go.
                    match self.admit_resv(cx, &ns, io::WRITE) {
                        Ok(e) => self.cmds[write as usize].executing = e,
                        Err(st) => {
                            return self.end_pair(cx, status::ABORTED_FAILED_FUSED, st);
                        }
                    }
                    self.fused.front_mut().expect("the pair").step = Step::Reading;
                    self.read_to_compare(cx, compare);
                }
            }
        }
    }

    /// A fused half's device operation completed: the Compare's read (compared: on a match
    /// the Write goes) or the Write.
    fn on_fused_done(&mut self, cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned) {
        let pair = self.fused.front_mut().expect("a fused command completes with its pair");
        let cmd = &mut self.cmds[tag as usize];
        let ok = result == cmd.bytes as i32;
        match cmd.role {
            Role::FusedCompare => {
                assert!(pair.compare == tag && pair.step == Step::Reading);
                let st = match (&owned, &cmd.buf) {
                    (Owned::Buf(read), Some(expected)) if ok => {
                        fused::verdict(read.as_slice(), expected.as_slice())
                    }
                    _ => nvme::status_from_errno(-result.min(0), false),
                };
                if let Owned::Buf(b) = owned {
                    cx.recycle(b);
                }
                cmd.state = CmdState::Held;
                if st != status::SUCCESS {
                    return self.end_pair(cx, st, status::ABORTED_FAILED_FUSED);
                }
                pair.step = Step::Writing;
                let write = &mut self.cmds[pair.write as usize];
                let buf = write.buf.take().expect("the fused Write's data");
                let ns = write.ns.clone().expect("namespace");
                let offset = write.sqe.slba() << ns.lba_shift;
                let fua = write.sqe.fua();
                write.state = CmdState::Executing { pending: 1 };
                ns.dev.submit(cx, IoCmd::Write { offset, buf, fua }, pair.write);
                self.hold_back_for(cx, &ns.dev);
            }
            Role::FusedWrite => {
                assert!(pair.write == tag && pair.step == Step::Writing);
                if let Owned::Buf(b) = owned {
                    cx.recycle(b);
                }
                let st = if ok {
                    status::SUCCESS
                } else {
                    tracing::warn!(peer = %self.peer, cid = cmd.sqe.cid, result, "fused write failed");
                    nvme::status_from_errno(-result.min(0), true)
                };
                cmd.state = CmdState::Held;
                self.end_pair(cx, status::SUCCESS, st);
            }
            Role::Plain | Role::Compare => unreachable!("not a fused command"),
        }
    }

    /// The first pair is over: its commands answered `compare` and `write` (one that failed
    /// carries the failure, the other Command Aborted due to Failed Fused Command), its fence
    /// lifted, the next pair driven.
    fn end_pair(&mut self, cx: &mut Cx<'_>, compare: Status, write: Status) {
        let pair = self.fused.pop_front().expect("a pair to end");
        drop(pair.fence);
        for (tag, st, kind) in
            [(pair.compare, compare, OpKind::Read), (pair.write, write, OpKind::Write)]
        {
            self.record_compare(cx, tag, kind, st);
            self.answer_cmd(cx, tag, st);
        }
        self.drive_fused(cx);
    }

    /// Counts a Compare or fused half that is done, as `kind`: a miscompare is no I/O error;
    /// a half aborted for its partner did no I/O and is not counted.
    fn record_compare(&mut self, cx: &mut Cx<'_>, tag: u32, kind: OpKind, st: Status) {
        if matches!(st, status::ABORTED_FAILED_FUSED | status::ABORTED_MISSING_FUSED) {
            return;
        }
        let cmd = &self.cmds[tag as usize];
        let ok = st == status::SUCCESS || st == status::COMPARE_FAILURE;
        let (bytes, latency) = (cmd.bytes, cmd.started.elapsed().as_nanos() as u64);
        let id = stats_id(cmd.ns.as_ref());
        cx.stats().record(id, Proto::Nvmf, kind, u64::from(bytes), latency, ok);
        if ok {
            self.count_done(kind, bytes);
        }
    }

    /// A Compare's read completed: compared with the host's data, answered.
    fn on_compare_done(&mut self, cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned) {
        let cmd = &self.cmds[tag as usize];
        let st = match (&owned, &cmd.buf) {
            (Owned::Buf(read), Some(expected)) if result == cmd.bytes as i32 => {
                fused::verdict(read.as_slice(), expected.as_slice())
            }
            _ => {
                tracing::warn!(peer = %self.peer, cid = cmd.sqe.cid, result, "compare read failed");
                nvme::status_from_errno(-result.min(0), false)
            }
        };
        if let Owned::Buf(b) = owned {
            cx.recycle(b);
        }
        self.record_compare(cx, tag, OpKind::Read, st);
        self.answer_cmd(cx, tag, st);
    }

    /// After a read or write went to `dev`: if the device's I/O waiting for its rate limits
    /// now holds its share of this core's memory (`BlockDev::held_back`), the queue takes no
    /// more PDUs (the socket stays unread) until some of it goes; `on_buffers` looks again.
    fn hold_back_for(&mut self, cx: &mut Cx<'_>, dev: &Arc<dyn BlockDev>) {
        if dev.held_back(cx, false) {
            self.held_back = Some(Arc::clone(dev));
            self.mem.wait();
            cx.wait_for_memory();
        }
    }

    /// Posts the receive of a direct H2CData payload's rest into its command's buffer.
    fn post_direct(&mut self, cx: &mut Cx<'_>) {
        let Some(d) = self.direct.as_mut() else { return };
        if d.inflight {
            return;
        }
        let buf = self.cmds.get_mut(usize::from(d.ttag)).and_then(|c| c.buf.take());
        let Some(buf) = buf else { unreachable!("a direct receive's command holds its buffer") };
        assert!(buf.capacity() - buf.len() >= d.left, "direct receive beyond the transfer");
        d.inflight = true;
        let max = d.left;
        cx.submit(ballast_engine::Op::Recv { fd: self.fd.as_raw_fd(), buf, max }, TAG_DIRECT);
    }

    /// A direct receive completed: the bytes are in the command's buffer.
    fn on_direct(&mut self, cx: &mut Cx<'_>, result: i32, owned: Owned) {
        let mut d = self.direct.take().expect("a direct receive in flight");
        assert!(d.inflight);
        d.inflight = false;
        let buf = owned.into_buf().expect("receive completion without its buffer");
        if let Some(cmd) = self.cmds.get_mut(usize::from(d.ttag)) {
            cmd.buf = Some(buf);
        } else {
            cx.recycle(buf);
        }
        if result <= 0 {
            self.read_closed = true;
            return;
        }
        self.progress.moved();
        d.left -= (result as usize).min(d.left);
        if d.left > 0 {
            self.direct = Some(d);
            return;
        }
        self.h2c_landed(cx, d.ttag, d.received, true, d.last);
        if !self.read_closed {
            self.parse(cx);
        }
    }

    fn on_flush(&mut self, cx: &mut Cx<'_>, sqe: Sqe) {
        let Some(subsys) = self.ctrl.as_ref().and_then(|c| c.subsys.clone()) else {
            return self.answer(&sqe, 0, 0, status::INVALID_NAMESPACE);
        };
        let targets: Vec<Arc<Namespace>> = if sqe.nsid == u32::MAX {
            subsys.namespaces().values().cloned().collect()
        } else {
            match self.io_namespace(sqe.nsid) {
                Some(ns) => {
                    match self.path_refusal(&ns).and_then(|()| self.reserved_for(&ns, sqe.opcode)) {
                        Ok(()) => vec![Arc::clone(&ns)],
                        Err(st) => return self.answer(&sqe, 0, 0, st),
                    }
                }
                None => return self.answer(&sqe, 0, 0, status::INVALID_NAMESPACE),
            }
        };
        if targets.is_empty() {
            return self.answer(&sqe, 0, 0, status::SUCCESS);
        }
        let tag = self.track(cx, sqe, None, OpKind::Flush, 0, targets.len() as u32);
        for ns in targets {
            ns.dev.submit(cx, IoCmd::Flush, tag);
        }
    }

    fn on_dsm(&mut self, cx: &mut Cx<'_>, sqe: Sqe, data: &[u8]) {
        let ranges = (sqe.cdw10 & 0xff) as usize + 1;
        let deallocate = sqe.cdw11 & (1 << 2) != 0;
        let Some(ns) = self.io_namespace(sqe.nsid) else {
            return self.answer(&sqe, 0, 0, status::INVALID_NAMESPACE);
        };
        if let Err(st) = self.path_refusal(&ns) {
            return self.answer(&sqe, 0, 0, st);
        }
        if sqe.sgl_type != nvme::SGL_DATA_BLOCK_OFFSET || data.len() < ranges * 16 {
            return self.answer(&sqe, 0, 0, status::SGL_DATA_LENGTH_INVALID);
        }
        if let Err(st) = self.reserved_for(&ns, sqe.opcode) {
            return self.answer(&sqe, 0, 0, st);
        }
        let mut work = Vec::with_capacity(ranges);
        for r in data[..ranges * 16].chunks_exact(16) {
            let nlb = u64::from(u32::from_le_bytes([r[4], r[5], r[6], r[7]]));
            let slba = u64::from_le_bytes(r[8..16].try_into().expect("8 bytes"));
            if slba.checked_add(nlb).is_none_or(|end| end > ns.blocks()) {
                return self.answer(&sqe, 0, 0, status::LBA_OUT_OF_RANGE);
            }
            if nlb > 0 {
                work.push((slba << ns.lba_shift, nlb << ns.lba_shift));
            }
        }
        if deallocate && ns.read_only() {
            return self.answer(&sqe, 0, 0, status::NS_WRITE_PROTECTED);
        }
        if !deallocate || work.is_empty() {
            return self.answer(&sqe, 0, 0, status::SUCCESS);
        }
        let tag = self.track(cx, sqe, Some(ns), OpKind::Discard, 0, work.len() as u32);
        self.start_writes(
            cx,
            tag,
            work.into_iter().map(|(offset, len)| IoCmd::Discard { offset, len }),
            None,
        );
    }

    fn on_io_done(&mut self, cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned) {
        let Some(cmd) = self.cmds.get_mut(tag as usize) else {
            panic!("completion for unknown command slot {tag}");
        };
        let CmdState::Executing { pending } = cmd.state else {
            panic!("completion for a command not executing");
        };
        match cmd.role {
            Role::Plain => {}
            Role::Compare => return self.on_compare_done(cx, tag, result, owned),
            Role::FusedCompare | Role::FusedWrite => {
                return self.on_fused_done(cx, tag, result, owned)
            }
        }
        let write = cmd.kind != OpKind::Read;
        let ok = match cmd.kind {
            OpKind::Read | OpKind::Write => result == cmd.bytes as i32,
            // Deallocation is advisory: a device that cannot did nothing, which is allowed.
            OpKind::Discard => result >= 0 || result == -libc::EOPNOTSUPP,
            _ => result >= 0,
        };
        if !ok && cmd.status == status::SUCCESS {
            cmd.status = if result < 0 {
                nvme::status_from_errno(-result, write)
            } else {
                status::DATA_TRANSFER_ERROR
            };
            tracing::warn!(peer = %self.peer, cid = cmd.sqe.cid, result, "I/O failed");
        }
        if pending > 1 {
            cmd.state = CmdState::Executing { pending: pending - 1 };
            if let Owned::Buf(b) = owned {
                cx.recycle(b);
            }
            return;
        }
        if cmd.then_flush && cmd.status == status::SUCCESS {
            // Done: now make it durable (FUA), under the same tag.
            cmd.then_flush = false;
            let ns = cmd.ns.clone().expect("a Write Zeroes has its namespace");
            debug_assert!(matches!(owned, Owned::None));
            ns.dev.submit(cx, IoCmd::Flush, tag);
            return;
        }
        let cmd = self.untrack(cx, tag as usize);
        let latency_ns = cmd.started.elapsed().as_nanos() as u64;
        cx.stats().record(
            stats_id(cmd.ns.as_ref()),
            Proto::Nvmf,
            cmd.kind,
            u64::from(cmd.bytes),
            latency_ns,
            cmd.status == status::SUCCESS,
        );
        self.count_done(cmd.kind, cmd.bytes);
        match (cmd.kind, owned) {
            (OpKind::Read, Owned::Buf(data))
                if cmd.status == status::SUCCESS && !self.send_broken() =>
            {
                self.respond_with_data(cx, cmd.sqe.cid, data, 0);
                // The data's memory stays charged until it is sent.
                self.mem.to_send(cmd.charged);
            }
            (_, owned) => {
                if let Owned::Buf(b) = owned {
                    cx.recycle(b);
                }
                self.mem.release(cx, cmd.charged);
                if !self.send_broken() {
                    self.answer(&cmd.sqe, 0, 0, cmd.status);
                }
            }
        }
    }

    /// Counts a command answered as it was taken (no I/O): in the core's statistics, with no
    /// time in flight, and in the SMART log.
    fn done_at_once(&mut self, cx: &mut Cx<'_>, ns: &Namespace, kind: OpKind, len: u32) {
        cx.stats().record(ns.dev.info().stats_id, Proto::Nvmf, kind, u64::from(len), 0, true);
        self.count_done(kind, len);
    }

    /// Counts a finished command in its controller's SMART log (commands and data units).
    fn count_done(&mut self, kind: OpKind, bytes: u32) {
        let bytes = u64::from(bytes);
        let c = &mut self.done_counts;
        match kind {
            OpKind::Read => {
                c[0] += 1;
                c[1] += bytes;
            }
            OpKind::Write => {
                c[2] += 1;
                c[3] += bytes;
            }
            _ => {}
        }
    }

    /// Adds what this queue's commands moved since the last call to its controller's totals
    /// (the SMART log's). Called once per turn (`post_io`), before the turn's responses leave,
    /// so a host reading the log after a completion sees that command counted.
    fn publish_counts(&mut self) {
        let c = std::mem::take(&mut self.done_counts);
        if c == [0; 4] {
            return;
        }
        let Some(ctrl) = &self.ctrl else { return };
        for (total, n) in [
            (&ctrl.host_reads, c[0]),
            (&ctrl.bytes_read, c[1]),
            (&ctrl.host_writes, c[2]),
            (&ctrl.bytes_written, c[3]),
        ] {
            if n > 0 {
                total.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    fn arm_tick(&mut self, cx: &mut Cx<'_>) {
        // A moving queue's tick watches its last responses leave (the stall deadline); once
        // they are sent it is cancelled, and the queue's new core starts its own.
        let leaving = self.moving.is_some() && self.out.drained();
        if self.tick_inflight || leaving || (self.read_closed && self.output_done()) {
            return;
        }
        self.tick_inflight = true;
        let after = if self.read_closed {
            // Closing with responses unsent: the stall deadline watches them leave.
            IO_TICK.min(self.guard.limits().tick())
        } else if let (Some(since), true) = (self.reauth_since, self.auth_pending()) {
            // A re-authentication: one wake-up, at its own deadline.
            let limit = self.guard.limits().handshake_timeout;
            limit.saturating_sub(since.elapsed()).max(Duration::from_millis(10))
        } else if self.phase != Phase::Ready || self.auth_pending() {
            // Before Connect and authentication: one wake-up, at the handshake deadline.
            self.progress.handshake_left(self.guard.limits(), Instant::now())
        } else if self.qid == 0 {
            ADMIN_TICK.min(self.guard.limits().tick())
        } else {
            IO_TICK.min(self.guard.limits().tick())
        };
        cx.timer(TAG_TICK, after);
    }

    /// Whether the host owes us progress: H2CData for an R2T we sent, or reading responses
    /// we cannot send. (Not while we wait for memory: then we are the ones not reading —
    /// though a queue held back for its export's rate limits still owes the reading of its
    /// responses.)
    fn owes_progress(&self) -> bool {
        let replies_stuck = self.send_inflight() && self.unsent() > 0;
        if self.held_back.is_some() {
            return replies_stuck;
        }
        !self.mem.waiting()
            && (replies_stuck
                || self.cmds.iter().any(|(_, c)| matches!(c.state, CmdState::AwaitData { .. })))
    }

    /// Everything queued for the socket has left (or the socket broke).
    fn output_done(&self) -> bool {
        self.out.drained() && self.tls.as_ref().is_none_or(|t| t.drained())
    }

    /// Drops the connection at once (a deadline passed): in-flight receives and sends fail.
    fn abort(&mut self, why: &'static str) {
        tracing::info!(peer = %self.peer, qid = self.qid, why, "dropping NVMe/TCP connection");
        self.read_closed = true;
        abort_socket(&self.fd);
    }

    fn on_tick(&mut self, cx: &mut Cx<'_>) {
        self.tick_inflight = false;
        if self.read_closed {
            // Closing: a host that stops reading the last responses does not keep the
            // connection (and what it holds) past the stall deadline.
            if self.send_inflight()
                && self.unsent() > 0
                && self.progress.stalled(self.guard.limits(), Instant::now())
            {
                self.guard.stalled();
                tracing::info!(peer = %self.peer, qid = self.qid, "closing: the host did not read its last responses within the deadline");
                abort_socket(&self.fd);
                return;
            }
            self.arm_tick(cx);
            return;
        }
        let now = Instant::now();
        let handshaking = self.phase != Phase::Ready || self.auth_pending();
        let expired = match self.reauth_since {
            // A re-authentication has the handshake deadline from its own start.
            Some(since) => now.duration_since(since) >= self.guard.limits().handshake_timeout,
            None => self.progress.handshake_expired(self.guard.limits(), now),
        };
        if handshaking && expired {
            self.guard.handshake_timed_out();
            self.abort("ICReq, Connect and authentication not done within the handshake deadline");
            return;
        }
        if self.owes_progress() && self.progress.stalled(self.guard.limits(), now) {
            self.guard.stalled();
            self.abort("no progress on H2CData or on reading responses within the deadline");
            return;
        }
        let Some(ctrl) = self.ctrl.clone() else {
            self.arm_tick(cx);
            return;
        };
        if ctrl.dead.load(Ordering::Relaxed) {
            tracing::info!(peer = %self.peer, cntlid = ctrl.cntlid, qid = self.qid, "controller gone; closing queue");
            self.close_read();
            return;
        }
        if self.qid != 0 && ctrl.resets.load(Ordering::Acquire) != self.resets_seen {
            tracing::info!(peer = %self.peer, cntlid = ctrl.cntlid, qid = self.qid, "controller reset or shut down; deleting its I/O queue");
            self.close_read();
            return;
        }
        if self.qid == 0 {
            let kato = u64::from(ctrl.kato_ms.load(Ordering::Relaxed));
            let idle =
                self.target.now_ms().saturating_sub(ctrl.last_seen_ms.load(Ordering::Relaxed));
            if kato > 0 && idle > kato + kato / 2 {
                tracing::warn!(peer = %self.peer, cntlid = ctrl.cntlid, idle_ms = idle, kato_ms = kato, "keep-alive timeout; tearing the controller down");
                // Its I/O queues close at their next tick, not once this one has drained.
                self.target.remove_controller(ctrl.cntlid);
                self.close_read();
                self.arm_tick(cx);
                return;
            }
            self.deliver_events();
        }
        self.arm_tick(cx);
    }

    fn close_read(&mut self) {
        self.read_closed = true;
        if self.recv.inflight() || self.direct_inflight() || self.tls_recv_inflight() {
            let _ = shutdown(self.fd.as_raw_fd(), Shutdown::Read);
        }
    }

    fn on_send(&mut self, cx: &mut Cx<'_>, result: i32, owned: Owned) {
        if result > 0 {
            self.progress.moved();
        }
        let wire = match self.tls.as_mut() {
            Some(tls) => tls.wire(),
            None => &mut self.out,
        };
        if let Err(errno) = wire.on_complete(cx, result, owned) {
            tracing::debug!(peer = %self.peer, errno, "send failed");
            // Nothing more can be answered: stop reading too, so the queue ends.
            self.close_read();
        }
        // Read data that left (or never will) gives its memory back.
        let unsent = self.unsent();
        self.mem.sent(cx, unsent);
    }

    fn direct_inflight(&self) -> bool {
        self.direct.is_some_and(|d| d.inflight)
    }

    fn post_io(&mut self, cx: &mut Cx<'_>) {
        self.publish_counts();
        if self.moving.is_some() {
            // Leaving: the Connect response goes out, nothing more comes in here.
            self.out.start(cx, self.fd.as_raw_fd(), TAG_SEND);
            if self.out.drained() && self.tick_inflight && !self.cancel_inflight {
                self.cancel_inflight = true;
                cx.cancel(TAG_TICK, TAG_CANCEL);
            }
            return;
        }
        if self.tls.is_some() {
            // Parsing what TLS decrypted may complete commands at once (stored from the
            // receive buffer): counted before their responses leave too.
            self.pump_tls(cx);
            self.publish_counts();
        }
        let fd = self.fd.as_raw_fd();
        match offload_to_kernel(&mut self.tls, cx, fd) {
            Ok(true) => {
                tracing::info!(peer = %self.peer, "NVMe/TCP TLS records handed to the kernel (kTLS)")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(peer = %self.peer, error = %e, "kernel TLS failed halfway; closing");
                self.read_closed = true;
            }
        }
        match self.tls.as_mut() {
            None => self.out.start(cx, fd, TAG_SEND),
            Some(tls) => {
                if let Err(e) = tls.send(cx, &mut self.out, fd, TAG_SEND) {
                    tracing::info!(peer = %self.peer, error = %e, "NVMe/TCP TLS failed; closing");
                    self.read_closed = true;
                }
            }
        }
        if self.read_closed || self.send_broken() || self.saturated() || self.mem.waiting() {
            return;
        }
        if let Some(tls) = self.tls.as_mut() {
            tls.post_recv(cx, fd, TAG_TLS_RECV);
            return;
        }
        if self.direct.is_some() {
            // The stream's next bytes are the payload's rest: nothing else is read first.
            return self.post_direct(cx);
        }
        let fd = self.fd.as_raw_fd();
        let held = self.mem.held();
        if self.recv.post(cx, fd, TAG_RECV, TAG_POLL, held) == Posted::WaitingForMemory {
            self.mem.wait();
        }
    }

    fn finish(&mut self, cx: &mut Cx<'_>) {
        if self.tick_inflight && !self.cancel_inflight {
            self.cancel_inflight = true;
            cx.cancel(TAG_TICK, TAG_CANCEL);
        }
        let quiet = self.auth_away.is_none()
            && self.resv_waits.is_empty()
            && !self.resv_timer
            && !self.fence_poll.armed()
            && !self.recv.inflight()
            && !self.direct_inflight()
            && !self.tls_recv_inflight()
            && !self.send_inflight()
            && !self.tick_inflight
            && !self.cancel_inflight;
        let idle = |c: &Cmd| {
            matches!(c.state, CmdState::AwaitData { .. } | CmdState::Parked | CmdState::Held)
        };
        if quiet && self.cmds.iter().all(|(_, c)| idle(c)) {
            // Nothing of theirs went to the media: parked writes, fused pairs (their fences
            // lifted) and transfers never completed are let go.
            for parked in std::mem::take(&mut self.parked) {
                for op in parked.ops {
                    recycle_op(cx, op);
                }
            }
            self.fused.clear();
            self.fused_first = None;
            let tags: Vec<usize> = self.cmds.iter().map(|(tag, _)| tag).collect();
            for tag in tags {
                if let Some(buf) = self.untrack(cx, tag).buf {
                    cx.recycle(buf);
                }
            }
            self.recv.release(cx);
            if let Some(tls) = self.tls.as_mut() {
                tls.release(cx);
            }
            self.mem.release_all(cx);
            self.done = true;
            cx.stats().connections_open -= 1;
            match (&self.ctrl, self.qid) {
                (Some(ctrl), 0) => self.target.remove_controller(ctrl.cntlid),
                (Some(ctrl), qid) if self.holds_qid => {
                    ctrl.io_qids.lock().remove(&qid);
                    ctrl.queues.lock().remove(&qid);
                }
                _ => {}
            }
            tracing::info!(peer = %self.peer, qid = self.qid, cntlid = self.ctrl.as_ref().map(|c| c.cntlid), "NVMe/TCP connection closed");
        }
    }
}

impl Movable for Queue {
    fn ready_to_move(&self) -> Option<usize> {
        let quiet = self.auth_away.is_none()
            && self.resv_waits.is_empty()
            && !self.resv_timer
            && !self.fence_poll.armed()
            && !self.recv.inflight()
            && self.direct.is_none()
            && self.tls.is_none()
            && !self.send_inflight()
            && !self.tick_inflight
            && !self.cancel_inflight
            && self.cmds.is_empty();
        self.moving.filter(|_| quiet && self.out.drained() && !self.read_closed)
    }

    /// Gives back the receive buffer (keeping the bytes in it) and the memory charges. Stays
    /// when more input is buffered than a new core's first receive buffer holds, and parses
    /// it here (its flush follows: `Placed`).
    fn leave(&mut self, cx: &mut Cx<'_>) -> bool {
        self.moving = None;
        let Some(bytes) = self.recv.detach(cx) else {
            if let Some(slot) = &mut self.spread {
                slot.rehome(cx.core());
            }
            self.arm_tick(cx);
            self.parse(cx);
            return false;
        };
        self.arrived = Some(bytes);
        self.mem.release_all(cx);
        cx.stats().connections_open -= 1;
        true
    }
}

impl Task for Queue {
    fn start(&mut self, cx: &mut Cx<'_>) {
        if let Some(early) = self.arrived.take() {
            self.arrive(cx, early);
            return;
        }
        cx.stats().connections_open += 1;
        cx.stats().connections_total += 1;
        // The handshake deadline.
        self.arm_tick(cx);
    }

    fn on_completion(&mut self, cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned) {
        match tag {
            TAG_RECV => {
                let buf = owned.into_buf().expect("receive completion without its buffer");
                self.recv.on_recv(result, buf);
                if result <= 0 {
                    self.read_closed = true;
                } else {
                    self.progress.moved();
                    if !self.read_closed {
                        self.parse(cx);
                    }
                }
            }
            TAG_POLL => {
                self.recv.on_poll();
                if result < 0 {
                    self.read_closed = true;
                }
            }
            TAG_SEND => {
                self.on_send(cx, result, owned);
                if !self.read_closed {
                    self.parse(cx);
                }
            }
            TAG_DIRECT => self.on_direct(cx, result, owned),
            TAG_TLS_RECV => {
                let buf = owned.into_buf().expect("TLS receive completion without its buffer");
                let tls = self.tls.as_mut().expect("TLS receive without TLS");
                if tls.on_recv(result, buf) {
                    self.progress.moved();
                } else {
                    self.read_closed = true;
                }
            }
            TAG_RESV_POLL => {
                self.resv_timer = false;
                self.on_resv_waits(cx);
            }
            TAG_FENCE_POLL => self.on_fence_poll(cx),
            TAG_AUTH_WORK => {
                self.on_auth_done(cx);
                self.progress.moved();
            }
            TAG_TLS_WORK => {
                self.tls.as_mut().expect("TLS handshake step without TLS").on_work_done();
                self.progress.moved();
            }
            TAG_TICK => self.on_tick(cx),
            TAG_CANCEL => self.cancel_inflight = false,
            _ => self.on_io_done(cx, tag, result, owned),
        }
    }

    fn flush(&mut self, cx: &mut Cx<'_>) {
        if self.read_closed || self.send_broken() {
            // Ending instead (the host left, a deadline, shutdown): no move.
            self.moving = None;
        }
        self.post_io(cx);
        if !self.read_closed || self.done {
            return;
        }
        let output_done = self.output_done();
        let executing =
            self.cmds.iter().any(|(_, c)| matches!(c.state, CmdState::Executing { .. }));
        if !executing && output_done {
            if self.recv.inflight() || self.tls_recv_inflight() {
                self.close_read();
            }
            self.finish(cx);
        }
    }

    fn on_buffers(&mut self, cx: &mut Cx<'_>) {
        if let Some(dev) = &self.held_back {
            if dev.held_back(cx, true) && !self.read_closed {
                cx.wait_for_memory();
                return;
            }
            self.held_back = None;
        }
        self.mem.woken();
        if !self.read_closed {
            self.parse(cx);
        }
    }

    fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {
        self.close_read();
    }

    fn is_done(&self) -> bool {
        self.done
    }
}

/// Gives back the buffer a device operation that never went holds.
fn recycle_op(cx: &mut Cx<'_>, op: IoCmd) {
    if let IoCmd::Write { buf, .. } = op {
        cx.recycle(buf);
    }
}
