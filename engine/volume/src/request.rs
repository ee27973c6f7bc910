//! One request to a volume as a state machine free of I/O: `event -> device operations`.
//!
//! A driver creates a [`Request`] for a command, calls [`Request::start`], and from then on
//! feeds it what happens: [`Request::on_completion`] for each device operation it issued (by
//! tag), [`Request::on_wake`] when the pool state woke its [`Waiter`] (see
//! [`crate::locks`]). Each call returns the device operations to carry out next (appended to
//! `out`) and, finally, [`Outcome::Done`] with the result and the caller's buffer. The daemon's
//! reactor adapter and the simulator are such drivers: both run this code.
//!
//! States (one per line; `Parked` states resume by planning again):
//! - `Plan`: not started, or woken: decide what to do under the pool state;
//! - `Reading`: device reads of mapped pieces in flight (zero pieces filled in place);
//! - `ReadingEdges`: an unaligned write holds its clusters and reads its partial edge pieces;
//! - `Writing`: the write's spans in flight (a copy-on-write reads the old cluster first);
//! - `Parked`: waiting in a lock-table queue (busy cluster, frozen volume, commit in flight);
//! - `Committing`: this request runs the pool's group commit ([`crate::commit`]);
//! - `Done`: replied; nothing in flight.
//!
//! A control operation ([`Cmd::Control`], [`crate::ops`]) freezes the volume it changes,
//! waits `Parked` until that volume's writes drained (a driver may give up with
//! [`Request::expire`]), applies, thaws and commits like a flush: it replies once the change is
//! durable, with the new volume's id where it made one.
//!
//! Invariants (asserted): a request replies exactly once and only with nothing in flight; a
//! data I/O holds an epoch ticket from planning until its device I/O ended, so a cluster freed
//! meanwhile is not reused under it; a read-modify-write's hold is released before it replies;
//! a flush (or FUA write) completes only after a commit sealed after it arrived is durable.

use std::collections::VecDeque;

use crate::commit::{Commit, Finished};
use crate::locks::Waiter;
use crate::meta::{
    Blocked, Encode, Encoded, PoolError, PoolMeta, ReadPiece, Ticket, WritePlan, PIECE,
};
use crate::ops::ControlOp;

/// A buffer the driver owns the memory of.
pub trait Buf {
    fn as_slice(&self) -> &[u8];
    fn as_mut_slice(&mut self) -> &mut [u8];
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Buf for Vec<u8> {
    fn as_slice(&self) -> &[u8] {
        self
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        self
    }
}

/// Where a request gets scratch buffers (bounce, copy-on-write, journal blocks) and returns
/// them.
pub trait Bufs {
    type B: Buf;
    /// A buffer of exactly `len` bytes; its contents are unspecified.
    fn get(&mut self, len: usize) -> Self::B;
    fn put(&mut self, buf: Self::B);
}

/// The most a write-zeroes that keeps its range allocated writes in one step (its steps end on
/// multiples of it): one buffer of it at a time, however long the range.
pub const ZERO_STEP: u64 = 64 * 1024;

/// A command to a volume. Byte offsets and lengths need no alignment.
pub enum Cmd<B> {
    Read {
        offset: u64,
        buf: B,
    },
    Write {
        offset: u64,
        buf: B,
        fua: bool,
    },
    Flush,
    /// Advisory: whole 4 KiB pieces inside the range read zeros afterwards.
    Discard {
        offset: u64,
        len: u64,
    },
    /// Every byte of the range reads zero afterwards. With `unmap`, whole pieces inside it are
    /// released (the edges written with zeros); without, the whole range is written with zeros
    /// and stays allocated (NBD's NO_HOLE, NVMe Write Zeroes without Deallocate), in steps of
    /// at most [`ZERO_STEP`] bytes ending on its multiples.
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    /// Copy up: every cluster of the range (widened to whole clusters, clipped to the
    /// volume's end) that the volume shares with another (a snapshot, a clone, its origin) is
    /// copied into a fresh cluster of its own; what it reads does not change. The steps of
    /// `bdev_lvol_decouple_parent` and `bdev_lvol_inflate` ([`crate::ops::decouple`]). The
    /// result is the number of clusters copied.
    Own {
        offset: u64,
        len: u64,
        /// Also the clusters a write could not land in now (`WriteKind::Own`): inflating.
        in_place: bool,
    },
    /// Write a checkpoint of the whole state (clean stop; the next open replays nothing).
    Checkpoint,
    /// One step of what control operations left to do (`PoolMeta::settle`,
    /// [`crate::ops::SETTLE_STEP`] units): the clusters promised to thick volumes mapped,
    /// the trees of durable deletions and rollbacks released. The result is the units spent,
    /// 0 when nothing is left to do (a failed pool: refused, `Failed`). No device I/O; what
    /// it maps and frees is durable with the next commit ([`crate::ops::settle`] runs the
    /// steps and the commits).
    Settle,
    /// A control operation (request volume 0): done once durable; the result is the new
    /// volume's id for a create, snapshot or clone, else 0.
    Control(ControlOp),
}

/// A device operation on the pool's media.
pub enum DiskOp<B> {
    /// Read `buf.len()` bytes at `offset`.
    Read {
        offset: u64,
        buf: B,
    },
    Write {
        offset: u64,
        buf: B,
        fua: bool,
    },
    Flush,
    /// Not the device's: a checkpoint's frozen state or a commit's sealed records to encode
    /// ([`Encode::run`]: pure CPU work, run without the pool state borrowed — on another
    /// thread where [`Encode::off_core`] says it pays); its completion is
    /// [`Request::on_encoded`] with the result.
    Encode(Encode),
}

/// A device operation and the tag its completion must carry back.
pub struct Issue<B> {
    pub tag: u32,
    pub op: DiskOp<B>,
}

/// What an event left the request in.
pub enum Outcome<B> {
    /// Operations in flight or parked: more events will come.
    Pending,
    /// Finished: bytes transferred (or 0) or a negative errno, and the caller's buffer back.
    Done { result: i32, buf: Option<B> },
}

/// The errno a pool error becomes on the wire.
pub fn errno(e: &PoolError) -> i32 {
    -match e {
        PoolError::NoSpace => libc::ENOSPC,
        PoolError::ReadOnly(_) => libc::EPERM,
        PoolError::Range(_) | PoolError::Unaligned => libc::EINVAL,
        PoolError::NoVolume(_) => libc::ENODEV,
        PoolError::StillShared { .. }
        | PoolError::DecouplesBusy { .. }
        | PoolError::Decoupling(_) => libc::EBUSY,
        PoolError::NoParent(_) => libc::EINVAL,
        _ => libc::EIO,
    }
}

/// Tags of a request's own device operations: kind in the top byte, index below.
mod tag {
    pub const KIND: u32 = 0xff00_0000;
    pub const READ: u32 = 0x0100_0000;
    pub const WRITE: u32 = 0x0200_0000;
    pub const COPY: u32 = 0x0300_0000;
    pub const EDGE: u32 = 0x0400_0000;
    pub const COMMIT: u32 = 0x0500_0000;
}

/// What a parked request does when woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    Hold,
    Write,
    Own,
    Trim,
    Sync,
    /// A control operation waits for its volume's writes to drain.
    Drain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Plan,
    Reading,
    ReadingEdges,
    Writing,
    Parked(Resume),
    Committing,
    Done,
}

/// How a request reaches the pool state. The data path's decisions (plan, hold, map, trim,
/// I/O tickets) take a shared borrow: each locks the one family it decides for, so several
/// drivers may decide at once for different families. The pool's own steps (a commit's seal,
/// end or failure — its steps in between need a shared borrow at most —, control operations,
/// parking on the commit, freezing) take an exclusive borrow. A driver with the
/// state to itself hands `&mut PoolMeta`, which is both.
pub trait Access {
    fn shared(&mut self) -> &PoolMeta;
    fn exclusive(&mut self) -> &mut PoolMeta;
}

impl Access for PoolMeta {
    #[inline]
    fn shared(&mut self) -> &PoolMeta {
        self
    }
    #[inline]
    fn exclusive(&mut self) -> &mut PoolMeta {
        self
    }
}

/// What one event needs from the driver.
pub struct Ctx<'a, K: Bufs> {
    pub meta: &'a mut dyn Access,
    pub bufs: &'a mut K,
    pub out: &'a mut Vec<Issue<K::B>>,
}

/// One request; see the module header.
pub struct Request<B> {
    vol: u32,
    waiter: Waiter,
    state: State,
    cmd: Option<Cmd<B>>,
    /// The buffer the data moves through: the caller's (aligned), or a bounce buffer.
    buf: Option<B>,
    /// The 4 KiB-aligned range the current step covers.
    offset: u64,
    len: u64,
    fua: bool,
    /// `Cmd::Own`'s `in_place`.
    in_place: bool,
    outstanding: u32,
    /// First error (negative errno).
    error: i32,
    ticket: Option<Ticket>,
    /// Reads: where each device read lands in `buf` (`None`: straight into `buf`).
    parts: Vec<Option<u64>>,
    /// Scratch: the pieces a read plans (kept for reuse, see [`Request::reuse`]).
    pieces: Vec<ReadPiece>,
    plans: Vec<WritePlan>,
    /// A flush is satisfied once this many commits have been sealed and are durable.
    wait_seal: u64,
    /// Unaligned requests: the caller's buffer, where its bytes sit in the bounce buffer, and
    /// their length.
    user: Option<B>,
    user_at: usize,
    user_len: u64,
    /// A read-modify-write's exclusive hold on its clusters (token, clusters).
    hold: Option<(u64, Vec<u64>)>,
    /// Edge pieces a read-modify-write reads: position in the bounce buffer.
    edges: Vec<u64>,
    /// Further steps (an unaligned write-zeroes) and the result it reports.
    steps: VecDeque<Cmd<B>>,
    final_result: Option<i32>,
    commit: Option<Commit>,
    /// `Cmd::Checkpoint`, or a control operation that needs one (`ControlOp::Grow`): the
    /// commit it waits for must be a checkpoint of its own.
    checkpoint: bool,
    /// `Cmd::Control`: the operation until applied, the volume it keeps frozen until then,
    /// and its result once applied (until the driver takes it: `take_applied`).
    control: Option<ControlOp>,
    frozen: Option<u32>,
    applied: Option<u32>,
    result: Option<i32>,
    /// The pool's refusal behind a negative result, when it was one (not a device error).
    failure: Option<PoolError>,
}

/// The 4 KiB-aligned range enclosing `[offset, offset + len)`.
fn enclosing(offset: u64, len: u64) -> (u64, u64) {
    let start = offset / PIECE * PIECE;
    let end = offset.saturating_add(len).next_multiple_of(PIECE);
    (start, end)
}

impl<B: Buf> Request<B> {
    /// A request for `cmd` on volume `vol`; `waiter` names it in the lock table's queues.
    pub fn new(vol: u32, cmd: Cmd<B>, waiter: Waiter) -> Request<B> {
        Request {
            vol,
            waiter,
            state: State::Plan,
            cmd: Some(cmd),
            buf: None,
            offset: 0,
            len: 0,
            fua: false,
            in_place: false,
            outstanding: 0,
            error: 0,
            ticket: None,
            parts: Vec::new(),
            pieces: Vec::new(),
            plans: Vec::new(),
            wait_seal: 0,
            user: None,
            user_at: 0,
            user_len: 0,
            hold: None,
            edges: Vec::new(),
            steps: VecDeque::new(),
            final_result: None,
            commit: None,
            checkpoint: false,
            control: None,
            frozen: None,
            applied: None,
            result: None,
            failure: None,
        }
    }

    /// Makes a finished request the request for `cmd` on volume `vol`, keeping the memory of
    /// its vectors (a driver that runs many requests reuses them, allocating nothing per
    /// request once warm).
    pub fn reuse(&mut self, vol: u32, cmd: Cmd<B>, waiter: Waiter) {
        assert!(self.is_done() && self.outstanding == 0, "only a finished request is reused");
        let mut parts = std::mem::take(&mut self.parts);
        let mut pieces = std::mem::take(&mut self.pieces);
        let mut plans = std::mem::take(&mut self.plans);
        let mut edges = std::mem::take(&mut self.edges);
        parts.clear();
        pieces.clear();
        plans.clear();
        edges.clear();
        *self = Request { parts, pieces, plans, edges, ..Request::new(vol, cmd, waiter) };
    }

    /// Why the pool refused the request, when a negative result came from a refusal (range,
    /// read-only, no space, failed pool...) rather than from the device.
    pub fn take_failure(&mut self) -> Option<PoolError> {
        self.failure.take()
    }

    /// Whether the request waits in a lock-table queue.
    pub fn parked(&self) -> bool {
        matches!(self.state, State::Parked(_))
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    pub fn start<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>) -> Outcome<B> {
        assert_eq!(self.state, State::Plan, "a request starts once");
        self.plan(cx);
        self.outcome()
    }

    /// The request's waiter was woken: it plans again.
    pub fn on_wake<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>) -> Outcome<B> {
        let State::Parked(resume) = self.state else { panic!("woken while {:?}", self.state) };
        assert_eq!(self.outstanding, 0);
        match resume {
            Resume::Hold => self.start_hold(cx),
            Resume::Write => self.start_write(cx),
            Resume::Own => self.start_own(cx),
            Resume::Trim => self.trim(cx),
            Resume::Sync => self.start_commit(cx),
            Resume::Drain => self.drain(cx),
        }
        self.outcome()
    }

    /// Whether a control operation waits for its volume's writes to drain.
    pub fn draining(&self) -> bool {
        self.state == State::Parked(Resume::Drain)
    }

    /// The driver gives up waiting for a drain (its deadline passed): the operation is
    /// refused with `Busy` and the volume thawed, nothing changed. Does nothing when the
    /// request is not waiting, or when its wake-up is already on the way (it goes on then).
    pub fn expire<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>) -> Outcome<B> {
        if let (true, Some(v)) = (self.draining(), self.frozen) {
            if cx.meta.exclusive().unpark_drained(v, self.waiter) {
                self.thaw(cx);
                self.control = None;
                self.refuse(cx, PoolError::Busy(v.into()));
            }
        }
        self.outcome()
    }

    /// A control operation's result, once, right after it applied (its commit runs next): a
    /// driver with a model of the pool (the simulator) looks at the state at that moment.
    pub fn take_applied(&mut self) -> Option<u32> {
        self.applied.take()
    }

    /// A device operation this request issued with `tag` completed: `result` is the byte
    /// count or a negative errno; `buf` is the operation's buffer, handed back.
    pub fn on_completion<K: Bufs<B = B>>(
        &mut self,
        cx: &mut Ctx<'_, K>,
        t: u32,
        result: i32,
        buf: Option<B>,
    ) -> Outcome<B> {
        assert!(self.outstanding > 0, "completion {t:#x} with nothing in flight");
        let i = (t & !tag::KIND) as usize;
        match (t & tag::KIND, self.state) {
            (tag::READ, State::Reading) => self.on_read(cx, i, result, buf),
            (tag::COPY, State::Writing) => self.on_copy_read(cx, i, result, buf),
            (tag::WRITE, State::Writing) => self.on_write(cx, i, result, buf),
            (tag::EDGE, State::ReadingEdges) => self.on_edge(cx, i, result, buf),
            (tag::COMMIT, State::Committing) => self.on_commit(cx, result, buf),
            (kind, state) => panic!("completion kind {kind:#x} while {state:?}"),
        }
        self.outcome()
    }

    /// The [`DiskOp::Encode`] this request issued with `tag` ran: `encoded` is its result.
    pub fn on_encoded<K: Bufs<B = B>>(
        &mut self,
        cx: &mut Ctx<'_, K>,
        t: u32,
        encoded: Encoded,
    ) -> Outcome<B> {
        assert!(
            t & tag::KIND == tag::COMMIT && self.state == State::Committing,
            "encoding {t:#x} while {:?}",
            self.state
        );
        let c = self.commit.as_mut().expect("a commit in flight");
        let finished = c.on_encoded(&mut *cx.meta, cx.bufs, cx.out, encoded);
        self.on_commit_step(cx, finished);
        self.outcome()
    }

    fn outcome(&mut self) -> Outcome<B> {
        match self.result.take() {
            Some(result) => {
                assert_eq!(self.outstanding, 0, "replying with I/O in flight");
                Outcome::Done { result, buf: self.buf.take() }
            }
            None => Outcome::Pending,
        }
    }

    fn park(&mut self, resume: Resume) {
        self.state = State::Parked(resume);
    }

    fn reply<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>, result: i32) {
        assert_eq!(self.outstanding, 0, "replying with I/O in flight");
        assert!(self.frozen.is_none(), "replying with a volume frozen");
        if let Some((token, vcs)) = self.hold.take() {
            cx.meta.shared().release(self.vol, &vcs, token);
        }
        if let Some(t) = self.ticket.take() {
            cx.meta.shared().end_io(t);
        }
        if let Some(user) = self.user.take() {
            if let Some(bounce) = self.buf.take() {
                cx.bufs.put(bounce);
            }
            self.buf = Some(user);
        }
        if result >= 0 {
            if let Some(next) = self.steps.pop_front() {
                if let Some(b) = self.buf.take() {
                    cx.bufs.put(b);
                }
                self.reset();
                self.cmd = Some(next);
                return self.plan(cx);
            }
        }
        let result = match self.final_result {
            // A request of several steps: the buffers were ours.
            Some(r) => {
                if let Some(b) = self.buf.take() {
                    cx.bufs.put(b);
                }
                for step in self.steps.drain(..) {
                    if let Cmd::Write { buf, .. } = step {
                        cx.bufs.put(buf);
                    }
                }
                if result < 0 {
                    result
                } else {
                    r
                }
            }
            None => result,
        };
        self.state = State::Done;
        self.result = Some(result);
    }

    /// Replies with the errno of the pool's refusal `e`, keeping `e` for `take_failure`.
    fn refuse<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>, e: PoolError) {
        let result = errno(&e);
        self.failure = Some(e);
        self.reply(cx, result)
    }

    /// Forgets a finished step's state (the request's identity and remaining steps stay).
    fn reset(&mut self) {
        self.state = State::Plan;
        self.outstanding = 0;
        self.error = 0;
        self.parts.clear();
        self.plans.clear();
        self.edges.clear();
        self.offset = 0;
        self.len = 0;
        self.fua = false;
    }

    /// The byte count a successful read or write reports.
    fn done_len(&self) -> i32 {
        (if self.user.is_some() { self.user_len } else { self.len }) as i32
    }

    fn note_error(&mut self, result: i32) {
        if self.error == 0 {
            self.error = if result < 0 { result } else { -libc::EIO };
        }
    }

    fn plan<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>) {
        let cmd = self.cmd.take().expect("a command to plan");
        match cmd {
            Cmd::Read { offset, buf } => {
                let len = buf.len() as u64;
                let (start, end) = enclosing(offset, len);
                self.offset = start;
                self.len = end - start;
                if (start, end) == (offset, offset + len) {
                    self.buf = Some(buf);
                } else {
                    self.user_at = (offset - start) as usize;
                    self.user_len = len;
                    self.user = Some(buf);
                    self.buf = Some(cx.bufs.get(self.len as usize));
                }
                self.start_read(cx)
            }
            Cmd::Write { offset, buf, fua } => {
                let len = buf.len() as u64;
                let (start, end) = enclosing(offset, len);
                self.offset = start;
                self.len = end - start;
                self.fua = fua;
                if (start, end) == (offset, offset + len) {
                    self.buf = Some(buf);
                    self.start_write(cx)
                } else {
                    self.user_at = (offset - start) as usize;
                    self.user_len = len;
                    self.user = Some(buf);
                    self.start_hold(cx)
                }
            }
            Cmd::Own { offset, len, in_place } => {
                let cb = cx.meta.shared().cluster_bytes();
                self.offset = offset / cb * cb;
                self.len = offset.saturating_add(len).next_multiple_of(cb) - self.offset;
                self.in_place = in_place;
                self.start_own(cx)
            }
            Cmd::Flush => {
                self.wait_seal = cx.meta.shared().seals() + 1;
                self.start_commit(cx)
            }
            Cmd::Checkpoint => {
                self.checkpoint = true;
                self.start_commit(cx)
            }
            Cmd::Settle => match cx.meta.shared().settle(crate::ops::SETTLE_STEP) {
                Ok(spent) => self.reply(cx, i32::try_from(spent).expect("a step is bounded")),
                Err(e) => self.refuse(cx, e),
            },
            Cmd::Control(op) => {
                if let Some(v) = op.quiesce() {
                    cx.meta.exclusive().set_frozen(v, true);
                    self.frozen = Some(v);
                }
                self.control = Some(op);
                self.drain(cx)
            }
            Cmd::Discard { offset, len } => {
                // Advisory: only whole pieces are released.
                let start = offset.next_multiple_of(PIECE);
                let end = offset.saturating_add(len) / PIECE * PIECE;
                if end <= start {
                    return self.reply(cx, 0);
                }
                self.offset = start;
                self.len = end - start;
                self.trim(cx)
            }
            Cmd::WriteZeroes { len: 0, .. } => self.reply(cx, 0),
            Cmd::WriteZeroes { offset, len, unmap: false } => {
                // One step now, the rest after it (one buffer at a time).
                let step = (ZERO_STEP - offset % ZERO_STEP).min(len);
                if step < len {
                    let rest =
                        Cmd::WriteZeroes { offset: offset + step, len: len - step, unmap: false };
                    self.steps.push_front(rest);
                }
                let mut buf = cx.bufs.get(step as usize);
                buf.as_mut_slice().fill(0);
                self.final_result = Some(0);
                self.cmd = Some(Cmd::Write { offset, buf, fua: false });
                self.plan(cx)
            }
            Cmd::WriteZeroes { offset, len, unmap: true } => {
                let end = offset.saturating_add(len);
                if offset.is_multiple_of(PIECE) && end.is_multiple_of(PIECE) {
                    self.offset = offset;
                    self.len = len;
                    return self.trim(cx);
                }
                // Partial pieces at the edges are written with zeros (read-modify-write), the
                // whole pieces between them released.
                let inner = (offset.next_multiple_of(PIECE), end / PIECE * PIECE);
                let mut steps = VecDeque::new();
                let mut zeros = |from: u64, to: u64| {
                    let mut buf = cx.bufs.get((to - from) as usize);
                    buf.as_mut_slice().fill(0);
                    Cmd::Write { offset: from, buf, fua: false }
                };
                if inner.1 <= inner.0 {
                    steps.push_back(zeros(offset, end));
                } else {
                    if offset < inner.0 {
                        steps.push_back(zeros(offset, inner.0));
                    }
                    steps.push_back(Cmd::Discard { offset: inner.0, len: inner.1 - inner.0 });
                    if inner.1 < end {
                        steps.push_back(zeros(inner.1, end));
                    }
                }
                self.final_result = Some(0);
                self.cmd = steps.pop_front();
                self.steps = steps;
                self.plan(cx)
            }
        }
    }

    fn start_read<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>) {
        let mut pieces = std::mem::take(&mut self.pieces);
        match cx.meta.shared().plan_read_io(self.vol, self.offset, self.len, &mut pieces) {
            Ok(t) => self.ticket = Some(t),
            Err(e) => {
                self.pieces = pieces;
                return self.refuse(cx, e);
            }
        }
        self.state = State::Reading;
        if let [ReadPiece::Disk { offset, len }] = pieces[..] {
            if len == self.len {
                let buf = self.buf.take().expect("read buffer");
                self.parts.push(None);
                self.outstanding = 1;
                cx.out.push(Issue { tag: tag::READ, op: DiskOp::Read { offset, buf } });
                self.pieces = pieces;
                return;
            }
        }
        let mut pos = 0u64;
        for &p in &pieces {
            match p {
                ReadPiece::Zero { len } => {
                    let buf = self.buf.as_mut().expect("read buffer");
                    buf.as_mut_slice()[pos as usize..(pos + len) as usize].fill(0);
                    pos += len;
                }
                ReadPiece::Disk { offset, len } => {
                    let i = self.parts.len() as u32;
                    let sub = cx.bufs.get(len as usize);
                    self.parts.push(Some(pos));
                    self.outstanding += 1;
                    cx.out
                        .push(Issue { tag: tag::READ | i, op: DiskOp::Read { offset, buf: sub } });
                    pos += len;
                }
            }
        }
        self.pieces = pieces;
        if self.outstanding == 0 {
            self.finish_read(cx);
        }
    }

    fn on_read<K: Bufs<B = B>>(
        &mut self,
        cx: &mut Ctx<'_, K>,
        i: usize,
        result: i32,
        buf: Option<B>,
    ) {
        match self.parts[i] {
            None => {
                // The direct read into the caller's buffer.
                let buf = buf.expect("a read completion carries its buffer");
                if result < 0 || result as usize != buf.len() {
                    self.note_error(result);
                }
                self.buf = Some(buf);
                self.outstanding -= 1;
            }
            Some(pos) => {
                if !self.land(cx, pos as usize, result, buf) {
                    return;
                }
            }
        }
        if self.outstanding == 0 {
            self.finish_read(cx);
        }
    }

    /// A device read into a buffer of its own finished: its bytes go to `pos` in `buf`.
    /// Whether it was the last one outstanding.
    fn land<K: Bufs<B = B>>(
        &mut self,
        cx: &mut Ctx<'_, K>,
        pos: usize,
        result: i32,
        buf: Option<B>,
    ) -> bool {
        let sub = buf.expect("a read completion carries its buffer");
        if result < 0 || result as usize != sub.len() {
            self.note_error(result);
        } else if self.error == 0 {
            let dst = self.buf.as_mut().expect("the request's buffer");
            dst.as_mut_slice()[pos..pos + sub.len()].copy_from_slice(sub.as_slice());
        }
        cx.bufs.put(sub);
        self.outstanding -= 1;
        self.outstanding == 0
    }

    fn finish_read<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>) {
        if let (Some(user), Some(bounce), 0) = (self.user.as_mut(), self.buf.as_ref(), self.error) {
            let n = self.user_len as usize;
            user.as_mut_slice()[..n]
                .copy_from_slice(&bounce.as_slice()[self.user_at..self.user_at + n]);
        }
        let result = if self.error != 0 { self.error } else { self.done_len() };
        self.reply(cx, result);
    }

    /// An unaligned write: hold its clusters, read the partial edge pieces, lay the new bytes
    /// over them in a bounce buffer, then write the enclosing pieces.
    fn start_hold<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>) {
        let (start, end) = (self.offset, self.offset + self.len);
        let user_end = self.user_at as u64 + self.user_len;
        let mut edges = Vec::new();
        if self.user_at != 0 {
            edges.push(start);
        }
        if !user_end.is_multiple_of(PIECE) && edges.last() != Some(&(end - PIECE)) {
            edges.push(end - PIECE);
        }
        let cb = cx.meta.shared().cluster_bytes();
        let vcs: Vec<u64> = (start / cb..end.div_ceil(cb)).collect();
        // The range checked, the edges planned, the clusters held and the ticket taken in one
        // decision: nothing can change the edge pieces' mapping until released.
        let mut plans = Vec::new();
        match cx.meta.shared().hold_io(self.vol, &vcs, &edges, self.waiter, &mut plans) {
            Ok((token, t)) => {
                self.hold = Some((token, vcs));
                self.ticket = Some(t);
            }
            Err(Blocked::Wait) => return self.park(Resume::Hold),
            Err(Blocked::Fail(e)) => return self.refuse(cx, e),
        }
        self.state = State::ReadingEdges;
        self.buf = Some(cx.bufs.get(self.len as usize));
        for (k, (at, pieces)) in edges.iter().zip(plans).enumerate() {
            let pos = (at - start) as usize;
            self.edges.push(at - start);
            match pieces[..] {
                [ReadPiece::Disk { offset, .. }] => {
                    self.outstanding += 1;
                    let sub = cx.bufs.get(PIECE as usize);
                    cx.out.push(Issue {
                        tag: tag::EDGE | k as u32,
                        op: DiskOp::Read { offset, buf: sub },
                    });
                }
                _ => {
                    let bounce = self.buf.as_mut().expect("bounce buffer");
                    bounce.as_mut_slice()[pos..pos + PIECE as usize].fill(0);
                }
            }
        }
        if self.outstanding == 0 {
            self.edges_done(cx);
        }
    }

    fn on_edge<K: Bufs<B = B>>(
        &mut self,
        cx: &mut Ctx<'_, K>,
        k: usize,
        result: i32,
        buf: Option<B>,
    ) {
        if self.land(cx, self.edges[k] as usize, result, buf) {
            self.edges_done(cx);
        }
    }

    fn edges_done<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>) {
        if let Some(t) = self.ticket.take() {
            cx.meta.shared().end_io(t);
        }
        if self.error != 0 {
            return self.reply(cx, self.error);
        }
        let n = self.user_len as usize;
        let user = self.user.as_ref().expect("unaligned write buffer");
        let bounce = self.buf.as_mut().expect("bounce buffer");
        bounce.as_mut_slice()[self.user_at..self.user_at + n]
            .copy_from_slice(&user.as_slice()[..n]);
        self.start_write(cx);
    }

    fn start_write<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>) {
        let hold = self.hold.as_ref().map_or(0, |h| h.0);
        let (vol, offset, len, waiter) = (self.vol, self.offset, self.len, self.waiter);
        match cx.meta.shared().plan_write_io(vol, offset, len, hold, waiter, &mut self.plans) {
            Ok(t) => self.ticket = Some(t),
            Err(Blocked::Wait) => return self.park(Resume::Write),
            Err(Blocked::Fail(e)) => return self.refuse(cx, e),
        }
        let cb = cx.meta.shared().cluster_bytes();
        self.state = State::Writing;
        self.outstanding = self.plans.len() as u32;
        for i in 0..self.plans.len() {
            let p = self.plans[i];
            let t = i as u32;
            if let Some(old) = p.copy_from {
                let sub = cx.bufs.get(cb as usize);
                cx.out
                    .push(Issue { tag: tag::COPY | t, op: DiskOp::Read { offset: old, buf: sub } });
            } else if self.plans.len() == 1 && p.req_len == self.len {
                let buf = self.buf.take().expect("write buffer");
                cx.out.push(Issue {
                    tag: tag::WRITE | t,
                    op: DiskOp::Write { offset: p.offset, buf, fua: false },
                });
            } else {
                let mut sub = cx.bufs.get(p.req_len as usize);
                let src = self.buf.as_ref().expect("write buffer").as_slice();
                sub.as_mut_slice().copy_from_slice(
                    &src[p.req_start as usize..(p.req_start + p.req_len) as usize],
                );
                cx.out.push(Issue {
                    tag: tag::WRITE | t,
                    op: DiskOp::Write { offset: p.offset, buf: sub, fua: false },
                });
            }
        }
    }

    /// Copying clusters up ([`Cmd::Own`]): each cluster the volume shares is read whole and
    /// written whole into its fresh cluster; a shared cluster with nothing written in it only
    /// gets its fresh one mapped. Its spans end like a write's; the reply counts the clusters
    /// read and written (those only mapped count nothing: no I/O to pace or report).
    fn start_own<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>) {
        let (vol, offset, len, waiter) = (self.vol, self.offset, self.len, self.waiter);
        let in_place = self.in_place;
        match cx.meta.shared().plan_own_io(vol, offset, len, in_place, waiter, &mut self.plans) {
            Ok(t) => self.ticket = Some(t),
            Err(Blocked::Wait) => return self.park(Resume::Own),
            Err(Blocked::Fail(e)) => return self.refuse(cx, e),
        }
        let copies = self.plans.len() as u32;
        let with_data = self.plans.iter().filter(|p| p.copy_from.is_some()).count();
        self.final_result = Some(with_data as i32);
        if copies == 0 {
            return self.reply(cx, 0);
        }
        let cb = cx.meta.shared().cluster_bytes();
        self.state = State::Writing;
        self.outstanding = copies;
        let mut map_only = Vec::new();
        for (i, p) in self.plans.iter().enumerate() {
            match p.copy_from {
                Some(old) => {
                    let sub = cx.bufs.get(cb as usize);
                    let op = DiskOp::Read { offset: old, buf: sub };
                    cx.out.push(Issue { tag: tag::COPY | i as u32, op });
                }
                None => map_only.push(*p),
            }
        }
        for p in map_only {
            self.span_done(cx, p, true);
        }
    }

    fn on_copy_read<K: Bufs<B = B>>(
        &mut self,
        cx: &mut Ctx<'_, K>,
        i: usize,
        result: i32,
        buf: Option<B>,
    ) {
        let mut whole = buf.expect("a read completion carries its buffer");
        let p = self.plans[i];
        if result < 0 || result as usize != whole.len() {
            self.note_error(result);
            cx.bufs.put(whole);
            return self.span_done(cx, p, false);
        }
        let cb = whole.len() as u64;
        let base = p.offset - p.offset % cb;
        if p.req_len > 0 {
            let at = (p.offset - base) as usize;
            let src = self.buf.as_ref().expect("write buffer").as_slice();
            whole.as_mut_slice()[at..at + p.req_len as usize]
                .copy_from_slice(&src[p.req_start as usize..(p.req_start + p.req_len) as usize]);
        }
        cx.out.push(Issue {
            tag: tag::WRITE | i as u32,
            op: DiskOp::Write { offset: base, buf: whole, fua: false },
        });
    }

    fn on_write<K: Bufs<B = B>>(
        &mut self,
        cx: &mut Ctx<'_, K>,
        i: usize,
        result: i32,
        buf: Option<B>,
    ) {
        let p = self.plans[i];
        let expected = buf.as_ref().map_or(0, |b| b.len());
        if let Some(buf) = buf {
            if self.buf.is_none() && self.plans.len() == 1 && p.copy_from.is_none() {
                self.buf = Some(buf); // the caller's buffer comes back
            } else {
                cx.bufs.put(buf);
            }
        }
        let ok = result >= 0 && result as usize == expected;
        if !ok {
            self.note_error(result);
        }
        self.span_done(cx, p, ok);
    }

    /// Span `p` ended, its data on the media (`ok`) or not: mapped or aborted; the last one
    /// also ends the write and its I/O, in the same decision.
    fn span_done<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>, p: WritePlan, ok: bool) {
        self.outstanding -= 1;
        if self.outstanding > 0 {
            if ok {
                cx.meta.shared().finish_span(self.vol, &p);
            } else {
                cx.meta.shared().abort_span(self.vol, &p);
            }
            return;
        }
        let t = self.ticket.take().expect("a write in flight holds its ticket");
        cx.meta.shared().end_write_io(self.vol, t, &p, ok);
        if let Some((token, vcs)) = self.hold.take() {
            cx.meta.shared().release(self.vol, &vcs, token);
        }
        if self.error != 0 {
            return self.reply(cx, self.error);
        }
        if self.fua {
            self.wait_seal = cx.meta.shared().seals() + 1;
            return self.start_commit(cx);
        }
        let n = self.done_len();
        self.reply(cx, n);
    }

    fn trim<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>) {
        self.state = State::Plan;
        match cx.meta.shared().trim(self.vol, self.offset, self.len, self.waiter) {
            Ok(()) => self.reply(cx, 0),
            Err(Blocked::Wait) => self.park(Resume::Trim),
            Err(Blocked::Fail(e)) => self.refuse(cx, e),
        }
    }

    /// A control operation applies once its volume (if any) has no write in flight.
    fn drain<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>) {
        if let Some(why) = cx.meta.exclusive().failed() {
            let e = PoolError::Failed(why.to_string());
            self.thaw(cx);
            self.control = None;
            return self.refuse(cx, e);
        }
        // A mutant for the simulator's own test (tests/e2e/sim_mutants.sh): control operations
        // apply without waiting for their volume's writes to drain.
        if let (Some(v), false) = (self.frozen, cfg!(feature = "mutant-skip-drain")) {
            if !cx.meta.exclusive().quiet(v) {
                cx.meta.exclusive().park_drained(v, self.waiter);
                return self.park(Resume::Drain);
            }
        }
        let op = self.control.take().expect("a control operation to apply");
        let r = op.apply(cx.meta.exclusive());
        self.thaw(cx);
        match r {
            Err(e) => self.refuse(cx, e),
            Ok(id) => {
                self.checkpoint = op.needs_checkpoint(cx.meta.shared());
                self.applied = Some(id);
                self.final_result = Some(id as i32);
                self.wait_seal = cx.meta.shared().seals() + 1;
                self.start_commit(cx)
            }
        }
    }

    fn thaw<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>) {
        if let Some(v) = self.frozen.take() {
            cx.meta.exclusive().set_frozen(v, false);
        }
    }

    /// Flush: waits for a commit sealed after this request arrived (its own, or another's).
    fn start_commit<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>) {
        if let Some(why) = cx.meta.exclusive().failed() {
            tracing::debug!(why, "flush on a failed pool");
            let e = PoolError::Failed(why.to_string());
            return self.refuse(cx, e);
        }
        if !self.checkpoint && cx.meta.exclusive().durable_seals() >= self.wait_seal {
            return self.finish_commit(cx);
        }
        if cx.meta.exclusive().committing() {
            cx.meta.exclusive().park_commit(self.waiter);
            return self.park(Resume::Sync);
        }
        match Commit::begin(cx.meta.exclusive(), cx.bufs, cx.out, tag::COMMIT, self.checkpoint) {
            Ok(Some(c)) => {
                self.outstanding = 1;
                self.commit = Some(c);
                self.state = State::Committing;
            }
            Ok(None) => unreachable!("checked that no commit is in flight"),
            Err(e) => self.refuse(cx, e),
        }
    }

    fn on_commit<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>, result: i32, buf: Option<B>) {
        let c = self.commit.as_mut().expect("a commit in flight");
        let finished = c.on_completion(&mut *cx.meta, cx.bufs, cx.out, result, buf);
        self.on_commit_step(cx, finished)
    }

    /// A step of the commit in flight ended (`finished`: the commit too).
    fn on_commit_step<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>, finished: Option<Finished>) {
        match finished {
            None => {}
            Some(Finished::Durable) => {
                self.commit = None;
                self.outstanding = 0;
                if self.checkpoint {
                    return self.finish_commit(cx);
                }
                // A commit seals everything pending, so this flush's seal is durable now;
                // look again all the same (the invariant is checked where it is decided).
                self.start_commit(cx)
            }
            Some(Finished::Failed(e)) => {
                self.commit = None;
                self.outstanding = 0;
                self.refuse(cx, e)
            }
        }
    }

    fn finish_commit<K: Bufs<B = B>>(&mut self, cx: &mut Ctx<'_, K>) {
        let result = if self.buf.is_some() || self.len > 0 { self.done_len() } else { 0 };
        self.reply(cx, result);
    }
}
