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
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

use crate::buf::IoBuf;

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
}

/// A gather list for one `sendmsg`: small headers copied into an arena, payloads by ownership.
#[derive(Default)]
pub struct SendBatch {
    arena: Vec<u8>,
    bufs: Vec<IoBuf>,
    segs: Vec<Seg>,
    /// The iovec array handed to the kernel; rebuilt before each submission.
    iov: Vec<libc::iovec>,
    msg: Option<Box<libc::msghdr>>,
}

// SAFETY: the raw pointers in `iov`/`msg` point only into memory this batch owns (`arena`,
// `bufs`); moving the batch between threads moves that memory with it.
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

    /// Bytes still to send.
    pub fn remaining(&self) -> usize {
        self.segs
            .iter()
            .map(|s| match *s {
                Seg::Arena { len, .. } | Seg::Buf { len, .. } => len,
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
                Seg::Arena { off, len } | Seg::Buf { off, len, .. } => (off, len),
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
        self.arena.extend_from_slice(&other.arena);
        for seg in other.segs.drain(..) {
            self.segs.push(match seg {
                Seg::Arena { off, len } => Seg::Arena { off: off + arena_base, len },
                Seg::Buf { idx, off, len } => Seg::Buf { idx: idx + buf_base, off, len },
            });
        }
        self.bufs.append(&mut other.bufs);
        other.arena.clear();
        other.iov.clear();
    }

    /// Hands each queued segment's bytes to `f`, in order.
    pub fn for_each_segment(&self, mut f: impl FnMut(&[u8])) {
        for seg in &self.segs {
            match *seg {
                Seg::Arena { off, len } => f(&self.arena[off..off + len]),
                Seg::Buf { idx, off, len } => f(&self.bufs[idx].as_slice()[off..off + len]),
            }
        }
    }

    /// Empties the batch, handing each payload buffer to `recycle`.
    pub fn clear(&mut self, recycle: impl FnMut(IoBuf)) {
        self.arena.clear();
        self.segs.clear();
        self.iov.clear();
        self.msg = None;
        self.bufs.drain(..).for_each(recycle);
    }

    fn build_msghdr(&mut self) -> *const libc::msghdr {
        self.iov.clear();
        for seg in &self.segs {
            let (base, len) = match *seg {
                Seg::Arena { off, len } => (self.arena[off..].as_ptr() as *mut libc::c_void, len),
                Seg::Buf { idx, off, len } => (self.bufs[idx].raw_at(off).cast(), len),
            };
            self.iov.push(libc::iovec { iov_base: base, iov_len: len });
        }
        // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
        let mut msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        msg.msg_iov = self.iov.as_mut_ptr();
        msg.msg_iovlen = self.iov.len() as _;
        let ptr: *const libc::msghdr = &*msg;
        self.msg = Some(msg);
        ptr
    }
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
    /// pread of `buf.len()` bytes at `offset`.
    Read { fd: RawFd, buf: IoBuf, offset: u64 },
    /// pwrite of `buf[..len]` at `offset`, with RWF_DSYNC when `fua`.
    Write { fd: RawFd, buf: IoBuf, offset: u64, fua: bool },
    /// fdatasync(2).
    Fsync { fd: RawFd },
    /// fallocate(2) with `mode` (punch hole, zero range, …).
    Fallocate { fd: RawFd, mode: i32, offset: u64, len: u64 },
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
    /// The deadline a timer entry points at.
    _timespec: Option<Box<types::Timespec>>,
}

pub struct Ring {
    ring: IoUring,
    inflight: Slab<InFlight>,
    counters: RingCounters,
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
}

impl Ring {
    /// Creates a ring, explaining how to enable io_uring when the kernel refuses.
    pub fn new(entries: u32) -> Result<Ring, RingError> {
        // Cooperative task running and a single issuer (Linux 6.0+) save interrupts and
        // locking; older kernels refuse the flags and get a plain ring.
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
        Ok(Ring {
            ring,
            inflight: Slab::with_capacity(entries as usize * 2),
            counters: RingCounters::default(),
        })
    }

    pub fn counters(&self) -> RingCounters {
        self.counters
    }

    /// Number of operations submitted and not yet reaped.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
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
        // SAFETY: every pointer in `entry` refers to memory owned by the slab slot created by
        // `vacant_entry_for`, which stays in place (boxed/heap) until this entry is reaped.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.counters.enters += 1;
            self.ring.submit().map_err(RingError::Enter)?;
        }
        Ok(())
    }

    fn vacant_entry_for(&mut self, op: Op, token: u64) -> squeue::Entry {
        let cancel_key = match &op {
            Op::Cancel { token } => {
                self.inflight.iter().find(|(_, s)| s.token == *token).map(|(k, _)| k as u64)
            }
            _ => None,
        };
        let slot = self.inflight.vacant_entry();
        let key = slot.key() as u64;
        let is_accept = matches!(op, Op::Accept { .. });
        let mut timespec = None;
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
            Op::Read { fd, mut buf, offset } => {
                let len = buf.len() as u32;
                let e = opcode::Read::new(types::Fd(fd), buf.raw_at(0), len).offset(offset).build();
                (e, Owned::Buf(buf), None)
            }
            Op::Write { fd, mut buf, offset, fua } => {
                let len = buf.len() as u32;
                let flags = if fua { libc::RWF_DSYNC } else { 0 };
                let e = opcode::Write::new(types::Fd(fd), buf.raw_at(0), len)
                    .offset(offset)
                    .rw_flags(flags)
                    .build();
                (e, Owned::Buf(buf), None)
            }
            Op::Fsync { fd } => {
                let e =
                    opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build();
                (e, Owned::None, None)
            }
            Op::Fallocate { fd, mode, offset, len } => {
                let e =
                    opcode::Fallocate::new(types::Fd(fd), len).offset(offset).mode(mode).build();
                (e, Owned::None, None)
            }
            Op::Timer { after } => {
                let ts = Box::new(types::Timespec::from(after));
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
        slot.insert(InFlight { token, owned, recv_base, accept, _timespec: timespec });
        entry.user_data(key)
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

    /// Moves every available completion into `out`; returns how many.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut count = 0;
        for cqe in self.ring.completion() {
            let key = cqe.user_data() as usize;
            let Some(slot) = self.inflight.try_remove(key) else {
                panic!("completion for unknown user_data {key}");
            };
            let result = cqe.result();
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
