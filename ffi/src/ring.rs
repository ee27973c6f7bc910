//! One io_uring, with in-flight operations that own every byte the kernel may touch.
//!
//! Invariants:
//! - each submitted entry has exactly one slot in `inflight`, keyed by its `user_data`; the slot
//!   owns the buffers, iovecs and msghdr the kernel reads or writes until the completion is
//!   reaped, at which point ownership returns to the caller in a [`Completion`];
//! - slots are never reused while their entry is in flight (slab keys are freed on reap only);
//! - if the ring is dropped with entries still in flight, their resources are leaked, never
//!   freed, because the kernel may still touch them.

use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

use crate::buf::IoBuf;
use crate::fixed::{Returns, Tables};
use crate::region::Lent;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("io_uring_setup failed: {source}; {hint}")]
    Setup { source: std::io::Error, hint: String },
    #[error("io_uring_enter failed: {0}")]
    Enter(std::io::Error),
}

/// Where a segment of a [`SendBatch`] lives.
#[derive(Debug, Clone, Copy)]
enum Seg {
    /// `arena[off..off + len]`
    Arena { off: usize, len: usize },
    /// `bufs[idx][off..off + len]`
    Buf { idx: usize, off: usize, len: usize },
    /// `lent[idx]`'s bytes `off..off + len`, read only by the kernel
    Lent { idx: usize, off: usize, len: usize },
}

/// A gather list for one `sendmsg`: small headers copied into an arena, payloads by ownership
/// or lent from a region ([`crate::region::Lent`]; the kernel copies those when the send goes).
#[derive(Default)]
pub struct SendBatch {
    arena: Vec<u8>,
    bufs: Vec<IoBuf>,
    lent: Vec<Lent>,
    segs: Vec<Seg>,
    /// The iovec array handed to the kernel; rebuilt before each submission.
    iov: Vec<libc::iovec>,
    msg: Option<Box<libc::msghdr>>,
}

// SAFETY: the raw pointers in `iov`/`msg` point only into memory this batch owns (`arena`,
// `bufs`) or holds alive (`lent`: the mapping's `Arc`); moving the batch between threads moves
// that memory, or its keep-alive, with it.
unsafe impl Send for SendBatch {}

impl SendBatch {
    /// Queues bytes to send, copied into the arena.
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let off = self.arena.len();
        self.arena.extend_from_slice(bytes);
        match self.segs.last_mut() {
            Some(Seg::Arena { off: o, len }) if *o + *len == off => *len += bytes.len(),
            _ => self.segs.push(Seg::Arena { off, len: bytes.len() }),
        }
    }

    /// Queues the whole of `buf[..len]` to send, by ownership.
    pub fn push_buf(&mut self, buf: IoBuf) {
        let len = buf.len();
        if len == 0 {
            return;
        }
        self.segs.push(Seg::Buf { idx: self.bufs.len(), off: 0, len });
        self.bufs.push(buf);
    }

    /// Queues a lent range to send: the kernel copies it when the send goes. A batch holding
    /// one is only ever sent, never read by us ([`SendBatch::for_each_segment`] refuses it).
    pub fn push_lent(&mut self, lent: Lent) {
        let len = lent.len();
        if len == 0 {
            return;
        }
        self.segs.push(Seg::Lent { idx: self.lent.len(), off: 0, len });
        self.lent.push(lent);
    }

    /// Bytes still to send.
    pub fn remaining(&self) -> usize {
        self.segs
            .iter()
            .map(|s| match *s {
                Seg::Arena { len, .. } | Seg::Buf { len, .. } | Seg::Lent { len, .. } => len,
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Number of segments (iovecs) queued.
    pub fn segments(&self) -> usize {
        self.segs.len()
    }

    /// Marks `n` bytes as sent (after a short send).
    pub fn advance(&mut self, mut n: usize) {
        assert!(n <= self.remaining(), "advance past end of batch");
        let mut drop_count = 0;
        for seg in &mut self.segs {
            if n == 0 {
                break;
            }
            let (off, len) = match seg {
                Seg::Arena { off, len }
                | Seg::Buf { off, len, .. }
                | Seg::Lent { off, len, .. } => (off, len),
            };
            let step = n.min(*len);
            *off += step;
            *len -= step;
            n -= step;
            if *len == 0 {
                drop_count += 1;
            }
        }
        self.segs.drain(..drop_count);
    }

    /// Moves everything queued in `other` to the end of this batch, in order.
    pub fn append(&mut self, other: &mut SendBatch) {
        let arena_base = self.arena.len();
        let buf_base = self.bufs.len();
        let lent_base = self.lent.len();
        self.arena.extend_from_slice(&other.arena);
        for seg in other.segs.drain(..) {
            self.segs.push(match seg {
                Seg::Arena { off, len } => Seg::Arena { off: off + arena_base, len },
                Seg::Buf { idx, off, len } => Seg::Buf { idx: idx + buf_base, off, len },
                Seg::Lent { idx, off, len } => Seg::Lent { idx: idx + lent_base, off, len },
            });
        }
        self.bufs.append(&mut other.bufs);
        self.lent.append(&mut other.lent);
        other.arena.clear();
        other.iov.clear();
    }

    /// Hands each queued segment's bytes to `f`, in order.
    ///
    /// Panics if a lent range is queued: its bytes may be written by another core as we read
    /// them, so only the kernel reads them (protocols lend only to sends nothing transforms).
    pub fn for_each_segment(&self, mut f: impl FnMut(&[u8])) {
        for seg in &self.segs {
            match *seg {
                Seg::Arena { off, len } => f(&self.arena[off..off + len]),
                Seg::Buf { idx, off, len } => f(&self.bufs[idx].as_slice()[off..off + len]),
                Seg::Lent { .. } => panic!("a lent range read as bytes (only sends may carry one)"),
            }
        }
    }

    /// Empties the batch, handing each payload buffer to `recycle`.
    pub fn clear(&mut self, recycle: impl FnMut(IoBuf)) {
        self.arena.clear();
        self.segs.clear();
        self.iov.clear();
        self.lent.clear();
        self.bufs.drain(..).for_each(recycle);
    }

    fn build_msghdr(&mut self) -> *const libc::msghdr {
        self.iov.clear();
        for seg in &self.segs {
            let (base, len) = match *seg {
                Seg::Arena { off, len } => (self.arena[off..].as_ptr() as *mut libc::c_void, len),
                Seg::Buf { idx, off, len } => (self.bufs[idx].raw_at(off).cast(), len),
                Seg::Lent { idx, off, len } => (self.lent[idx].addr_at(off), len),
            };
            self.iov.push(libc::iovec { iov_base: base, iov_len: len });
        }
        // The header is boxed (its address survives the batch moving into the ring's slot)
        // and kept across the batch's reuses: a send allocates nothing.
        // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
        let msg = self.msg.get_or_insert_with(|| Box::new(unsafe { std::mem::zeroed() }));
        // SAFETY: as above; every field the last send set is reset.
        **msg = unsafe { std::mem::zeroed() };
        msg.msg_iov = self.iov.as_mut_ptr();
        msg.msg_iovlen = self.iov.len() as _;
        &**msg
    }
}

/// The file an operation works on: a descriptor, or a slot of the ring's registered files
/// ([`Ring::register_file`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRef {
    Raw(RawFd),
    Fixed(u32),
}

/// How many files and buffers a ring may hold registered (0: none).
#[derive(Debug, Clone, Copy, Default)]
pub struct FixedConfig {
    pub files: u32,
    pub bufs: u32,
}

/// One operation to submit. Buffers move into the ring and come back in the [`Completion`].
pub enum Op {
    /// accept(2) on a listening socket; the result is the new fd.
    Accept { fd: RawFd },
    /// recv(2) of at most `max` bytes into `buf[len..cap]`; on success `len` grows by the
    /// result.
    Recv { fd: RawFd, buf: IoBuf, max: usize },
    /// sendmsg(2) with MSG_NOSIGNAL; the result may be short: `advance` and resubmit.
    Send { fd: RawFd, batch: SendBatch },
    /// pread of `buf.len()` bytes at `offset`. A buffer this ring registered (or can register
    /// now) goes as a fixed buffer.
    Read { file: FileRef, buf: IoBuf, offset: u64 },
    /// pwrite of `buf[..len]` at `offset`, with RWF_DSYNC when `fua`; buffers as for `Read`.
    Write { file: FileRef, buf: IoBuf, offset: u64, fua: bool },
    /// fdatasync(2).
    Fsync { file: FileRef },
    /// fallocate(2) with `mode` (punch hole, zero range, …).
    Fallocate { file: FileRef, mode: i32, offset: u64, len: u64 },
    /// An 8-byte read (eventfd).
    ReadEventfd { fd: RawFd, buf: IoBuf },
    /// A timer: completes with `-ETIME` after `after`, or `-ECANCELED` if cancelled.
    Timer { after: Duration },
    /// Waits until `fd` is readable (or hung up); completes with the poll mask. A connection
    /// with nothing to say costs no receive buffer while it waits.
    PollIn { fd: RawFd },
    /// Cancels the operation(s) in flight with this token; completes with 0 or `-ENOENT`.
    Cancel { token: u64 },
}

/// What a completed operation hands back.
pub enum Owned {
    None,
    Buf(IoBuf),
    Batch(SendBatch),
    /// The connection an accept produced.
    Fd(OwnedFd),
}

impl Owned {
    pub fn into_buf(self) -> Option<IoBuf> {
        match self {
            Owned::Buf(b) => Some(b),
            _ => None,
        }
    }
}

pub struct Completion {
    /// The caller's token given at submission.
    pub token: u64,
    /// The kernel's result: >= 0 on success, `-errno` on failure.
    pub result: i32,
    pub owned: Owned,
}

struct InFlight {
    token: u64,
    owned: Owned,
    /// For Recv: the buffer's length before the receive, to which the result is added.
    recv_base: Option<usize>,
    accept: bool,
    /// The deadline a timer entry points at (back to `Ring::timespecs` when reaped).
    timespec: Option<Box<types::Timespec>>,
    /// For Read and Write: where the transfer stands (a short one goes on from there).
    transfer: Option<Transfer>,
}

/// A read or write of a whole buffer: what its entry is built from, and how much of it is
/// done. The kernel may move fewer bytes than asked (a write reaching a full filesystem or
/// the file size limit, a read interrupted): the rest is submitted again from where it stopped,
/// so the caller sees the whole length, or the error that stopped it (ENOSPC rather than a short
/// count it could only call EIO), or a short count only at the end of the file (a read of 0).
#[derive(Clone, Copy)]
struct Transfer {
    write: bool,
    file: FileRef,
    offset: u64,
    fua: bool,
    /// The buffer's index in this ring's registered buffers.
    fixed: Option<u16>,
    len: u32,
    done: u32,
}

impl Transfer {
    /// The entry moving what is left: `buf[done..len]` at `offset + done`.
    fn entry(&self, buf: &mut IoBuf) -> squeue::Entry {
        let ptr = buf.raw_at(self.done as usize);
        let len = self.len - self.done;
        let offset = self.offset + u64::from(self.done);
        let flags = if self.fua { libc::RWF_DSYNC } else { 0 };
        match (self.write, self.fixed, self.file) {
            (false, Some(i), FileRef::Fixed(f)) => {
                opcode::ReadFixed::new(types::Fixed(f), ptr, len, i).offset(offset).build()
            }
            (false, Some(i), FileRef::Raw(fd)) => {
                opcode::ReadFixed::new(types::Fd(fd), ptr, len, i).offset(offset).build()
            }
            (false, None, FileRef::Fixed(f)) => {
                opcode::Read::new(types::Fixed(f), ptr, len).offset(offset).build()
            }
            (false, None, FileRef::Raw(fd)) => {
                opcode::Read::new(types::Fd(fd), ptr, len).offset(offset).build()
            }
            (true, Some(i), FileRef::Fixed(f)) => {
                opcode::WriteFixed::new(types::Fixed(f), ptr, len, i)
                    .offset(offset)
                    .rw_flags(flags)
                    .build()
            }
            (true, Some(i), FileRef::Raw(fd)) => {
                opcode::WriteFixed::new(types::Fd(fd), ptr, len, i)
                    .offset(offset)
                    .rw_flags(flags)
                    .build()
            }
            (true, None, FileRef::Fixed(f)) => {
                opcode::Write::new(types::Fixed(f), ptr, len).offset(offset).rw_flags(flags).build()
            }
            (true, None, FileRef::Raw(fd)) => {
                opcode::Write::new(types::Fd(fd), ptr, len).offset(offset).rw_flags(flags).build()
            }
        }
    }
}

/// Most boxed deadlines a ring keeps for its next timers.
const TIMESPECS_KEPT: usize = 16;

pub struct Ring {
    ring: IoUring,
    inflight: Slab<InFlight>,
    counters: RingCounters,
    tables: Tables,
    /// Deadlines of reaped timers, boxed, for the next ones (up to `TIMESPECS_KEPT`): while
    /// no more timers than that are armed at once, arming one allocates nothing.
    /// Boxed because a timer's entry points at its deadline, which must not move with the
    /// slot holding it.
    #[allow(clippy::vec_box)]
    timespecs: Vec<Box<types::Timespec>>,
    /// Completions reaped while a push waited for room (the kernel refused a submission for
    /// completions not yet reaped): handed out first by the next `reap`.
    stash: Vec<Completion>,
    /// Short transfers reaped while a push waited for room: submitted again for their rest by
    /// the next `reap`, not inside that push — a Cancel being pushed names the slot key of its
    /// target, which a resubmission there could take once the target's completion freed it.
    deferred: Vec<InFlight>,
}

/// What a ring has done, cumulative: system calls and the socket operations among its work
/// (what "syscalls and sends per I/O" are computed from).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingCounters {
    /// io_uring_enter calls (submissions, waits).
    pub enters: u64,
    /// Operations queued.
    pub ops: u64,
    pub sends: u64,
    pub recvs: u64,
    /// Operations on a registered file, on a registered buffer.
    pub fixed_file_ops: u64,
    pub fixed_buf_ops: u64,
    /// Buffers registered (each once in its life), registrations the kernel refused (the table
    /// is then given up: what it held stays, nothing more is registered).
    pub buf_registrations: u64,
    pub registration_failures: u64,
    /// Files and buffers registered now.
    pub files_registered: u64,
    pub bufs_registered: u64,
    /// Short reads and writes submitted again for the rest of their bytes.
    pub resumed: u64,
}

impl Ring {
    /// Creates a ring, explaining how to enable io_uring when the kernel refuses.
    pub fn new(entries: u32) -> Result<Ring, RingError> {
        Ring::with_fixed(entries, FixedConfig::default())
    }

    /// Creates a ring with tables for up to `fixed.files` registered files and `fixed.bufs`
    /// registered buffers, empty at first. A kernel without sparse tables (before 5.19) gets
    /// a ring without them: everything then goes as plain descriptors and buffers.
    pub fn with_fixed(entries: u32, fixed: FixedConfig) -> Result<Ring, RingError> {
        // Cooperative task running and a single issuer (Linux 6.0+) save interrupts and
        // locking; older kernels refuse the flags and get a plain ring. (Deferred task running,
        // IORING_SETUP_DEFER_TASKRUN, was measured in its place and did not pay: perf/RESULTS.md
        // §8.2.)
        let tuned = IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_single_issuer()
            .build(entries);
        let ring = match tuned {
            Ok(r) => r,
            Err(_) => IoUring::builder().build(entries).map_err(|source| {
                let hint = crate::sys::io_uring_hint(&source);
                RingError::Setup { source, hint }
            })?,
        };
        let tables = Tables::open(&ring.submitter(), fixed.files, fixed.bufs);
        Ok(Ring {
            ring,
            inflight: Slab::with_capacity(entries as usize * 2),
            counters: RingCounters::default(),
            tables,
            timespecs: Vec::with_capacity(TIMESPECS_KEPT),
            stash: Vec::new(),
            deferred: Vec::new(),
        })
    }

    /// Caps the kernel's worker threads (io-wq) that run this thread's operations which cannot
    /// complete without blocking: `bounded` for files and block devices, `unbounded` for
    /// sockets and other files; 0 leaves one as it is. The workers are the thread's, shared
    /// by all its rings (the kernel makes their context when the thread sets up its first
    /// ring), so one call covers the device ring too. Returns the limits in force before.
    /// Linux 5.15 and later.
    pub fn limit_workers(&self, bounded: u32, unbounded: u32) -> std::io::Result<[u32; 2]> {
        let mut max = [bounded, unbounded];
        self.ring.submitter().register_iowq_max_workers(&mut max)?;
        Ok(max)
    }

    /// Where the owners of this ring's registrations hand their slots back.
    pub fn returns(&self) -> &Arc<Returns> {
        self.tables.home()
    }

    /// Registers `fd` in a free file slot: its slot, or None (no table, table full, or the
    /// kernel refused). The caller returns the slot through [`Ring::returns`] once nothing
    /// will submit on it, and must keep `fd` open until then or use the slot no more.
    pub fn register_file(&mut self, fd: RawFd) -> Option<u32> {
        self.tables.register_file(&self.ring.submitter(), fd)
    }

    /// Clears the slots returned since the last call and frees them; the file slots cleared,
    /// for the caller's own bookkeeping.
    pub fn reclaim(&mut self) -> Vec<u32> {
        // Entries still queued (a submission the kernel refused for now) may name a returned
        // file's slot: clear nothing before they are in the kernel (the returns stay pending).
        if !self.ring.submission().is_empty() {
            return Vec::new();
        }
        self.tables.reclaim(&self.ring.submitter())
    }

    /// The buffer slot `buf` goes in on this ring: its own registration here, or a fresh one
    /// if it has none and a slot is free. None: a plain buffer.
    fn fixed_slot(&mut self, buf: &mut IoBuf) -> Option<u16> {
        self.tables.buf_slot(&self.ring.submitter(), buf)
    }

    pub fn counters(&self) -> RingCounters {
        let t = self.tables.counters;
        RingCounters {
            buf_registrations: t.buf_registrations,
            registration_failures: t.registration_failures,
            files_registered: t.files_registered,
            bufs_registered: t.bufs_registered,
            ..self.counters
        }
    }

    /// Number of operations submitted and not yet reaped.
    pub fn inflight(&self) -> usize {
        self.inflight.len() + self.deferred.len()
    }

    /// Queues `op`; its completion will carry `token`.
    pub fn push(&mut self, op: Op, token: u64) -> Result<(), RingError> {
        self.counters.ops += 1;
        match op {
            Op::Send { .. } => self.counters.sends += 1,
            Op::Recv { .. } => self.counters.recvs += 1,
            _ => {}
        }
        let entry = self.vacant_entry_for(op, token);
        self.queue(entry)
    }

    /// Puts `entry`, whose slot `inflight` holds, on the submission queue, entering the kernel
    /// to make room if the queue is full.
    fn queue(&mut self, entry: squeue::Entry) -> Result<(), RingError> {
        // SAFETY: every pointer in `entry` refers to memory owned by its slab slot (made by
        // `vacant_entry_for` or kept by `go_on`), which stays in place (boxed/heap) until this
        // entry is reaped.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.counters.enters += 1;
            match self.ring.submit() {
                Ok(_) => {}
                // EBUSY: the kernel takes no entry while completions wait that nobody reaped
                // (its queue overflowed): reap them aside (the next `reap` hands them out) and
                // try again; EINTR/EAGAIN: again. A core is not brought down by either.
                Err(e) if is_transient(&e) => {
                    let mut stash = std::mem::take(&mut self.stash);
                    self.reap_ring(&mut stash, true);
                    self.stash = stash;
                }
                Err(e) => return Err(RingError::Enter(e)),
            }
        }
        Ok(())
    }

    /// Submits again the rest of a short transfer, in `slot`; if the kernel takes no entry,
    /// the transfer ends with an error (in `out`). Returns the completions it added.
    fn go_on(&mut self, mut slot: InFlight, out: &mut Vec<Completion>) -> usize {
        let (Some(t), Owned::Buf(buf)) = (slot.transfer, &mut slot.owned) else {
            unreachable!("only a transfer, which owns its buffer, goes on");
        };
        let entry = t.entry(buf);
        let token = slot.token;
        let key = self.inflight.insert(slot);
        self.counters.ops += 1;
        self.counters.resumed += 1;
        match self.queue(entry.user_data(key as u64)) {
            Ok(()) => 0,
            Err(_) => {
                let slot = self.inflight.remove(key);
                out.push(Completion { token, result: -libc::EIO, owned: slot.owned });
                1
            }
        }
    }

    fn vacant_entry_for(&mut self, op: Op, token: u64) -> squeue::Entry {
        let cancel_key = match &op {
            Op::Cancel { token } => {
                self.inflight.iter().find(|(_, s)| s.token == *token).map(|(k, _)| k as u64)
            }
            _ => None,
        };
        let key = self.inflight.vacant_key() as u64;
        let is_accept = matches!(op, Op::Accept { .. });
        let mut timespec = None;
        let mut transfer = None;
        let (entry, owned, recv_base) = match op {
            Op::Accept { fd } => {
                let e =
                    opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
                        .flags(libc::SOCK_CLOEXEC)
                        .build();
                (e, Owned::None, None)
            }
            Op::Recv { fd, mut buf, max } => {
                let base = buf.len();
                let room = (buf.capacity() - base).min(max);
                assert!(room > 0, "recv into a full buffer");
                let e = opcode::Recv::new(types::Fd(fd), buf.raw_at(base), room as u32).build();
                (e, Owned::Buf(buf), Some(base))
            }
            Op::Send { fd, mut batch } => {
                assert!(!batch.is_empty(), "send of an empty batch");
                let msg = batch.build_msghdr();
                let e = opcode::SendMsg::new(types::Fd(fd), msg)
                    .flags(libc::MSG_NOSIGNAL as u32)
                    .build();
                (e, Owned::Batch(batch), None)
            }
            Op::Read { file, mut buf, offset } => {
                let len = buf.len() as u32;
                let fixed = self.fixed_slot(&mut buf);
                let t = Transfer { write: false, file, offset, fua: false, fixed, len, done: 0 };
                let e = t.entry(&mut buf);
                let fixed_buf = self.is_fixed_here(&buf);
                self.count_fixed(file, fixed_buf);
                transfer = Some(t);
                (e, Owned::Buf(buf), None)
            }
            Op::Write { file, mut buf, offset, fua } => {
                let len = buf.len() as u32;
                let fixed = self.fixed_slot(&mut buf);
                let t = Transfer { write: true, file, offset, fua, fixed, len, done: 0 };
                let e = t.entry(&mut buf);
                let fixed_buf = self.is_fixed_here(&buf);
                self.count_fixed(file, fixed_buf);
                transfer = Some(t);
                (e, Owned::Buf(buf), None)
            }
            Op::Fsync { file } => {
                let e = match file {
                    FileRef::Fixed(f) => opcode::Fsync::new(types::Fixed(f)),
                    FileRef::Raw(fd) => opcode::Fsync::new(types::Fd(fd)),
                }
                .flags(types::FsyncFlags::DATASYNC)
                .build();
                self.count_fixed(file, false);
                (e, Owned::None, None)
            }
            Op::Fallocate { file, mode, offset, len } => {
                let e = match file {
                    FileRef::Fixed(f) => opcode::Fallocate::new(types::Fixed(f), len),
                    FileRef::Raw(fd) => opcode::Fallocate::new(types::Fd(fd), len),
                }
                .offset(offset)
                .mode(mode)
                .build();
                self.count_fixed(file, false);
                (e, Owned::None, None)
            }
            Op::Timer { after } => {
                let ts = match self.timespecs.pop() {
                    Some(mut ts) => {
                        *ts = types::Timespec::from(after);
                        ts
                    }
                    None => Box::new(types::Timespec::from(after)),
                };
                let e = opcode::Timeout::new(&*ts).build();
                timespec = Some(ts);
                (e, Owned::None, None)
            }
            Op::PollIn { fd } => {
                let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build();
                (e, Owned::None, None)
            }
            Op::Cancel { .. } => {
                // Nothing to cancel: cancelling an impossible key completes with -ENOENT.
                let builder = types::CancelBuilder::user_data(cancel_key.unwrap_or(u64::MAX));
                let e = opcode::AsyncCancel2::new(builder).build();
                (e, Owned::None, None)
            }
            Op::ReadEventfd { fd, mut buf } => {
                assert!(buf.capacity() >= 8);
                buf.set_len(8);
                let e = opcode::Read::new(types::Fd(fd), buf.raw_at(0), 8).build();
                (e, Owned::Buf(buf), None)
            }
        };
        let accept = matches!(owned, Owned::None) && is_accept;
        let at =
            self.inflight.insert(InFlight { token, owned, recv_base, accept, timespec, transfer });
        assert_eq!(at as u64, key, "the slab's vacant key moved while building the entry");
        entry.user_data(key)
    }

    fn is_fixed_here(&self, buf: &IoBuf) -> bool {
        self.tables.is_home_of(buf)
    }

    fn count_fixed(&mut self, file: FileRef, fixed_buf: bool) {
        self.counters.fixed_file_ops += u64::from(matches!(file, FileRef::Fixed(_)));
        self.counters.fixed_buf_ops += u64::from(fixed_buf);
    }

    /// Whether entering the kernel would do anything: entries to submit, deferred task work
    /// to run (completions waiting to be posted), or an overflowed completion queue.
    pub fn needs_enter(&mut self) -> bool {
        let sq = self.ring.submission();
        !sq.is_empty() || sq.taskrun() || sq.cq_overflow()
    }

    /// Whether completions are ready to reap, without entering the kernel.
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Submits queued entries without waiting.
    pub fn submit(&mut self) -> Result<usize, RingError> {
        self.counters.enters += 1;
        match self.ring.submit() {
            Ok(n) => Ok(n),
            Err(e) if is_transient(&e) => Ok(0),
            Err(e) => Err(RingError::Enter(e)),
        }
    }

    /// Submits and sleeps until at least one completion arrives or `timeout` passes.
    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> Result<(), RingError> {
        if !self.stash.is_empty() || !self.deferred.is_empty() {
            // Completions are waiting already, or transfers to go on (set aside by a push):
            // no sleep.
            return self.submit().map(|_| ());
        }
        self.counters.enters += 1;
        let result = match timeout {
            None => self.ring.submit_and_wait(1).map(|_| ()),
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args).map(|_| ())
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if is_transient(&e) || e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            Err(e) => Err(RingError::Enter(e)),
        }
    }

    /// Moves every available completion into `out` (those set aside by a push first); returns
    /// how many.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut count = 0;
        for slot in std::mem::take(&mut self.deferred) {
            count += self.go_on(slot, out);
        }
        let stashed = self.stash.len();
        out.append(&mut self.stash);
        count + stashed + self.reap_ring(out, false)
    }

    /// Moves the completions the kernel has posted into `out`; returns how many. Short
    /// transfers go on at once, or — `in_push`: while a push waits for room — at the next
    /// `reap` (`deferred`).
    fn reap_ring(&mut self, out: &mut Vec<Completion>, in_push: bool) -> usize {
        let mut count = 0;
        // Short transfers to go on (allocates only when there are some).
        let mut going_on = Vec::new();
        for cqe in self.ring.completion() {
            let key = cqe.user_data() as usize;
            let Some(mut slot) = self.inflight.try_remove(key) else {
                panic!("completion for unknown user_data {key}");
            };
            let mut result = cqe.result();
            if let Some(t) = &mut slot.transfer {
                if result > 0 {
                    assert!(result as u32 <= t.len - t.done, "the kernel moved more than asked");
                    t.done += result as u32;
                    if t.done < t.len {
                        going_on.push(slot);
                        continue;
                    }
                    result = t.len as i32;
                } else if result == 0 {
                    // The end of the file: what moved before it.
                    result = t.done as i32;
                }
                // An error ends the transfer, whatever moved before it.
            }
            if let Some(ts) = slot.timespec {
                if self.timespecs.len() < TIMESPECS_KEPT {
                    self.timespecs.push(ts);
                }
            }
            let mut owned = slot.owned;
            if slot.accept && result >= 0 {
                // SAFETY: a successful accept returns a new descriptor that nothing else owns;
                // wrapping it here makes it closed exactly once, when the OwnedFd drops.
                owned = Owned::Fd(unsafe { OwnedFd::from_raw_fd(result) });
            }
            if let (Some(base), Owned::Buf(buf)) = (slot.recv_base, &mut owned) {
                if result > 0 {
                    buf.set_len(base + result as usize);
                }
            }
            out.push(Completion { token: slot.token, result, owned });
            count += 1;
        }
        if in_push {
            self.deferred.append(&mut going_on);
        } else {
            for slot in going_on {
                count += self.go_on(slot, out);
            }
        }
        count
    }
}

/// An io_uring_enter failure worth retrying rather than reporting (every ring's submit).
pub(crate) fn is_transient(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN))
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still write into buffers of unreaped entries: leak them, never free.
        for slot in self.inflight.drain() {
            let _ = ManuallyDrop::new(slot.owned);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn run(ring: &mut Ring, op: Op, token: u64) -> Completion {
        ring.push(op, token).unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            ring.submit_and_wait(None).unwrap();
            ring.reap(&mut out);
        }
        out.pop().unwrap()
    }

    /// Many more operations than the ring has room for, none reaped meanwhile (the kernel's
    /// completion queue overflows): every push succeeds, and every completion is reaped
    /// once, none lost or doubled.
    #[test]
    fn pushes_past_an_overflowing_completion_queue_lose_nothing() {
        let mut ring = Ring::new(4).unwrap();
        let n = 2000u64;
        for t in 0..n {
            ring.push(Op::Timer { after: Duration::ZERO }, t).unwrap();
        }
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while (out.len() as u64) < n && std::time::Instant::now() < deadline {
            ring.submit_and_wait(Some(Duration::from_millis(10))).unwrap();
            ring.reap(&mut out);
        }
        let mut tokens: Vec<u64> = out.iter().map(|c| c.token).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, (0..n).collect::<Vec<_>>());
        assert_eq!(ring.inflight(), 0);
    }

    /// Reaped timers' deadlines are kept for the next timers, up to `TIMESPECS_KEPT`: more
    /// timers at once than that allocate their own, and the extra boxes go when reaped.
    #[test]
    fn timer_deadlines_are_reused_up_to_the_bound() {
        let mut ring = Ring::new(64).unwrap();
        let armed = TIMESPECS_KEPT + 4;
        for t in 0..armed {
            ring.push(Op::Timer { after: Duration::from_micros(50) }, t as u64).unwrap();
        }
        let mut out = Vec::new();
        while out.len() < armed {
            ring.submit_and_wait(None).unwrap();
            ring.reap(&mut out);
        }
        assert!(out.iter().all(|c| c.result == -libc::ETIME), "every timer expired");
        assert_eq!(ring.timespecs.len(), TIMESPECS_KEPT, "no more kept than the bound");
        let kept: Vec<*const types::Timespec> = ring.timespecs.iter().map(|b| &**b as _).collect();
        ring.push(Op::Timer { after: Duration::from_micros(10) }, 99).unwrap();
        assert_eq!(ring.timespecs.len(), TIMESPECS_KEPT - 1, "the timer took a kept deadline");
        let mut out = Vec::new();
        while out.is_empty() {
            ring.submit_and_wait(None).unwrap();
            ring.reap(&mut out);
        }
        assert_eq!(out[0].result, -libc::ETIME);
        assert_eq!(ring.timespecs.len(), TIMESPECS_KEPT, "the box came back");
        let reused = ring.timespecs.iter().map(|b| &**b as *const types::Timespec);
        assert!(reused.clone().all(|p| kept.contains(&p)), "a kept deadline was reused");
    }

    /// The worker cap is the kernel's and the thread's: the limits set on one ring are the ones
    /// it, and the thread's next ring, report back.
    #[test]
    fn worker_limits_are_the_kernels() {
        let ring = Ring::new(8).unwrap();
        let before = match ring.limit_workers(3, 5) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("skipped: this kernel has no worker limits ({e})");
                return;
            }
        };
        assert!(before[0] > 0 && before[1] > 0, "the kernel's defaults: {before:?}");
        assert_eq!(ring.limit_workers(0, 0).unwrap(), [3, 5], "the limits set are in force");
        assert_eq!(ring.limit_workers(0, 7).unwrap(), [3, 5]);
        assert_eq!(ring.limit_workers(0, 0).unwrap(), [3, 7], "0 leaves a limit as it is");
        // Another ring of the same thread sees the same workers' limits.
        assert_eq!(Ring::new(8).unwrap().limit_workers(0, 0).unwrap(), [3, 7]);
    }

    /// A lent range leaves the way a buffer does: between headers, in order, resumed at the
    /// right byte after a short send and after `append`; it is sent from the region's memory
    /// even once the region itself is gone (the range keeps the mapping alive).
    #[test]
    fn lent_ranges_are_sent_in_order_and_keep_their_mapping() {
        use crate::region::Region;
        use std::io::Read;
        const CHUNK: usize = 64 * 1024;
        let region = Region::new(4 * CHUNK, CHUNK).unwrap();
        let data: Vec<u8> = (0..2 * CHUNK as u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for (idx, piece) in data.chunks(CHUNK).enumerate() {
            region.write(idx, 0, piece);
        }
        // Only written chunks are lent; nothing past the end, nothing empty.
        assert!(region.lend(2 * CHUNK - 10, 20).is_none(), "chunk 2 is absent");
        assert!(region.lend(4 * CHUNK - 10, 20).is_none(), "past the end");
        assert!(region.lend(0, 0).is_none());
        let across = region.lend(CHUNK - 3000, 5000).expect("chunks 0 and 1 are written");
        let head = region.lend(10, 100).unwrap();
        let tail = region.lend(2 * CHUNK - 4096, 4096).unwrap();
        drop(region);

        let mut batch = SendBatch::default();
        batch.push_bytes(b"hdr1");
        batch.push_lent(across);
        batch.push_bytes(b"hdr2");
        batch.push_lent(head);
        let mut later = SendBatch::default();
        later.push_bytes(b"hdr3");
        later.push_lent(tail);
        let mut want = b"hdr1".to_vec();
        want.extend_from_slice(&data[CHUNK - 3000..CHUNK + 2000]);
        want.extend_from_slice(b"hdr2");
        want.extend_from_slice(&data[10..110]);
        want.extend_from_slice(b"hdr3");
        want.extend_from_slice(&data[2 * CHUNK - 4096..]);
        // As after a short send of 1000 bytes: the rest first, then what was queued since.
        batch.advance(1000);
        batch.append(&mut later);
        assert_eq!(batch.remaining(), want.len() - 1000);
        assert_eq!(batch.segments(), 5, "hdr1 went whole, the first range in part");

        let (mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut ring = Ring::new(8).unwrap();
        let mut got = Vec::new();
        while !batch.is_empty() {
            let c = run(&mut ring, Op::Send { fd: mine.as_raw_fd(), batch }, 1);
            assert!(c.result > 0, "send failed: {}", c.result);
            let Owned::Batch(mut b) = c.owned else { panic!("the batch comes back") };
            b.advance(c.result as usize);
            let mut part = vec![0u8; c.result as usize];
            (&theirs).read_exact(&mut part).unwrap();
            got.extend_from_slice(&part);
            batch = b;
        }
        assert!(got == want[1000..], "the bytes sent are the region's, in order");
        batch.clear(|_| {});
        assert_eq!(batch.remaining(), 0);
    }

    /// Nothing of ours reads a lent range: a layer that would (TLS) is refused loudly.
    #[test]
    #[should_panic(expected = "lent range")]
    fn lent_ranges_are_never_read_as_bytes() {
        let region = crate::region::Region::new(64 * 1024, 64 * 1024).unwrap();
        region.write(0, 0, &[1u8; 16]);
        let mut batch = SendBatch::default();
        batch.push_bytes(b"x");
        batch.push_lent(region.lend(0, 16).unwrap());
        batch.for_each_segment(|_| {});
    }

    fn filled(len: usize, byte: u8) -> IoBuf {
        let mut b = IoBuf::zeroed(len);
        b.as_mut_slice().fill(byte);
        b
    }

    /// A registered file and registered buffers carry the same bytes as plain ones; a buffer
    /// is registered once and reused without registering again; a dropped buffer's slot and a
    /// returned file's slot are cleared and given out again; a full table and another ring's
    /// buffer fall back to plain operations.
    #[test]
    fn registered_files_and_buffers_round_trip() {
        let dir = std::env::temp_dir().join(format!("ballast-fixed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        std::fs::write(dir.join("g"), vec![0xc3u8; 1 << 20]).unwrap();
        let (file, _) = crate::sys::open_direct(&path, false).unwrap();
        let (other, _) = crate::sys::open_direct(&dir.join("g"), false).unwrap();
        let mut ring = Ring::with_fixed(8, FixedConfig { files: 1, bufs: 2 }).unwrap();
        if ring.counters().registration_failures > 0 {
            // Before Linux 5.19 (no sparse tables), or no lockable memory.
            eprintln!("skipped: this kernel refused the registered tables");
            std::fs::remove_dir_all(&dir).unwrap();
            return;
        }
        let slot = ring.register_file(file.as_raw_fd()).expect("a file slot");
        assert_eq!(ring.register_file(other.as_raw_fd()), None, "a table of one is full");
        let f = FileRef::Fixed(slot);

        let c =
            run(&mut ring, Op::Write { file: f, buf: filled(8192, 0xa1), offset: 0, fua: true }, 1);
        assert_eq!(c.result, 8192);
        let written = c.owned.into_buf().unwrap();
        assert!(written.is_registered(), "a fresh buffer is registered as it is submitted");
        let c = run(&mut ring, Op::Read { file: f, buf: IoBuf::zeroed(8192), offset: 0 }, 2);
        assert_eq!(c.result, 8192);
        let read = c.owned.into_buf().unwrap();
        assert!(read.as_slice().iter().all(|&b| b == 0xa1), "fixed file and buffer read back");
        let n = ring.counters();
        assert_eq!((n.fixed_file_ops, n.fixed_buf_ops, n.buf_registrations), (2, 2, 2));
        assert_eq!(n.bufs_registered, 2);

        // Both buffer slots are taken: a third buffer goes plain, and still works.
        let c = run(
            &mut ring,
            Op::Read {
                file: FileRef::Raw(other.as_raw_fd()),
                buf: IoBuf::zeroed(4096),
                offset: 4096,
            },
            3,
        );
        assert_eq!(c.result, 4096);
        let plain = c.owned.into_buf().unwrap();
        assert!(!plain.is_registered());
        assert!(plain.as_slice().iter().all(|&b| b == 0xc3), "the other file's bytes");
        // An odd-sized buffer (never kept for reuse) is not registered.
        let c = run(&mut ring, Op::Read { file: f, buf: IoBuf::zeroed(3 * 4096), offset: 0 }, 33);
        assert_eq!(c.result, 3 * 4096);
        assert!(!c.owned.into_buf().unwrap().is_registered());
        // A registered buffer reused: no new registration.
        let mut again = read;
        again.as_mut_slice().fill(0xb2);
        let c = run(&mut ring, Op::Write { file: f, buf: again, offset: 8192, fua: false }, 4);
        assert_eq!(c.result, 8192);
        assert_eq!(ring.counters().buf_registrations, 2, "reused, not registered again");
        assert_eq!(ring.counters().fixed_buf_ops, 3);

        // A buffer registered here is a plain buffer on another ring.
        let mut second = Ring::with_fixed(8, FixedConfig { files: 0, bufs: 0 }).unwrap();
        let c = run(
            &mut second,
            Op::Read { file: FileRef::Raw(file.as_raw_fd()), buf: written, offset: 8192 },
            5,
        );
        assert_eq!(c.result, 8192);
        let from_second = c.owned.into_buf().unwrap();
        assert!(from_second.as_slice().iter().all(|&b| b == 0xb2));
        assert_eq!(second.counters().fixed_buf_ops, 0);

        // Dropping a registered buffer returns its slot; reclaiming frees it for a new buffer.
        drop(from_second);
        assert!(ring.returns().pending());
        assert_eq!(ring.reclaim(), Vec::<u32>::new());
        assert_eq!(ring.counters().bufs_registered, 1);
        let c = run(&mut ring, Op::Read { file: f, buf: IoBuf::zeroed(4096), offset: 0 }, 6);
        assert_eq!(c.result, 4096);
        let reused = c.owned.into_buf().unwrap();
        assert!(reused.is_registered(), "the freed slot is used again");
        assert!(reused.as_slice().iter().all(|&b| b == 0xa1), "into the new buffer's pages");
        assert_eq!(ring.counters().buf_registrations, 3);

        // A returned file slot is cleared and can hold another file.
        ring.returns().return_file(slot);
        assert_eq!(ring.reclaim(), vec![slot]);
        assert_eq!(ring.counters().files_registered, 0);
        let slot2 = ring.register_file(other.as_raw_fd()).expect("the slot is free again");
        let c = run(&mut ring, Op::Read { file: FileRef::Fixed(slot2), buf: reused, offset: 0 }, 7);
        assert_eq!(c.result, 4096);
        let b = c.owned.into_buf().unwrap();
        assert!(b.as_slice().iter().all(|&b| b == 0xc3), "the slot now names the other file");
        let c = run(&mut ring, Op::Fsync { file: FileRef::Fixed(slot2) }, 8);
        assert_eq!(c.result, 0);
        // Returns wait while entries are queued (they may name a returned slot).
        ring.push(Op::Fsync { file: FileRef::Fixed(slot2) }, 9).unwrap();
        ring.returns().return_file(slot2);
        assert_eq!(ring.reclaim(), Vec::<u32>::new(), "nothing cleared under a queued entry");
        assert!(ring.returns().pending());
        let mut out = Vec::new();
        while out.is_empty() {
            ring.submit_and_wait(None).unwrap();
            ring.reap(&mut out);
        }
        assert_eq!(out[0].result, 0);
        assert_eq!(ring.reclaim(), vec![slot2]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
