//! A core's device ring: a small io_uring with 128-byte submission and 32-byte completion
//! entries, the shape NVMe passthrough (`IORING_OP_URING_CMD` on `/dev/ngXnY`) needs, kept
//! apart from the socket/file ring so that ring keeps its small entries.
//!
//! Invariants:
//! - each [`NvmeIo`] has exactly one slot in `inflight`, keyed by the `user_data` of every
//!   command it became; the slot owns the data buffer and the Dataset Management range list
//!   the kernel reads or writes until the last of those commands is reaped;
//! - a slot completes once, when `parts_left` reaches 0, with the first failure among its
//!   commands (as a negative errno) or its success value;
//! - if the ring is dropped with commands in flight, their buffers are leaked, never freed;
//! - a push never fails: when the kernel takes no entry because completions wait that nobody
//!   reaped (EBUSY, its completion queue overflowed), they are reaped aside into `stash` and
//!   handed out by the next [`DevRing::reap`] (counted in [`DevRing::inflight`] until then);
//!   if entering the kernel fails otherwise, the commands not queued count as failed with that
//!   error, and the I/O completes once those queued have;
//! - data buffers are registered with this ring as they are first submitted (`fixed`'s
//!   invariants), so the kernel does not pin and unpin their pages per command.

use std::mem::ManuallyDrop;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;

use crate::buf::IoBuf;
use crate::fixed::{FixedCounters, Returns, Tables};
use crate::nvme::{self, NvmeIo, NvmeNs};
use crate::ring::{is_transient, Completion, Owned, RingError};

struct InFlight {
    token: u64,
    /// The caller's buffer (read, write), handed back at completion.
    buf: Option<IoBuf>,
    /// The Dataset Management range list, freed at completion.
    ranges: Option<IoBuf>,
    parts_left: u32,
    /// 0, or the first failure among the parts (negative errno).
    error: i32,
    /// The result on success: bytes transferred, or 0.
    success: i32,
}

/// How the device ring learns of completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevRingMode {
    /// Interrupts: completions are posted when the core enters the kernel (or is woken).
    Interrupt,
    /// IORING_SETUP_IOPOLL: the core polls the device's completion queue when it enters the
    /// ring (needs polled queues in the driver: `nvme.poll_queues=N`).
    Poll,
}

pub struct DevRing {
    ring: IoUring<squeue::Entry128, cqueue::Entry32>,
    inflight: Slab<InFlight>,
    mode: DevRingMode,
    /// The commands of the I/O being pushed (kept to spare an allocation per I/O).
    scratch: Vec<nvme::NvmeCmd>,
    /// Registered buffers (no files: namespaces go by descriptor).
    tables: Tables,
    /// Commands sent on a registered buffer.
    fixed_buf_ops: u64,
    /// I/Os that completed while a push made room (handed out by the next `reap`).
    stash: Vec<Completion>,
}

/// The first kernel passthrough commands go on registered buffers with: the one tested. On
/// Debian's 6.1 a 1 MiB read split into three commands at offsets inside one registered buffer
/// failed with EINVAL (6.1 also copies such buffers through a bounce buffer: direct bvec
/// mapping for passthrough came in 6.2); Debian trixie's 6.12 runs tests/vm's passthrough
/// suite on them (`--trixie`).
pub const PASSTHROUGH_FIXED_SINCE: (u32, u32) = (6, 12);

impl DevRing {
    /// Creates a device ring of `entries` submission entries, with room for `fixed_bufs`
    /// registered buffers on kernels from [`PASSTHROUGH_FIXED_SINCE`] on (none before).
    pub fn new(entries: u32, mode: DevRingMode, fixed_bufs: u32) -> Result<DevRing, RingError> {
        let tested = crate::sys::kernel_version().is_some_and(|v| v >= PASSTHROUGH_FIXED_SINCE);
        let fixed_bufs = if tested { fixed_bufs } else { 0 };
        let build = |tuned: bool| {
            let mut b = IoUring::<squeue::Entry128, cqueue::Entry32>::builder();
            if mode == DevRingMode::Poll {
                b.setup_iopoll();
            }
            if tuned {
                b.setup_coop_taskrun().setup_taskrun_flag().setup_single_issuer();
            }
            b.build(entries)
        };
        let ring = build(true).or_else(|_| build(false)).map_err(|source| {
            let hint = crate::sys::io_uring_hint(&source);
            RingError::Setup { source, hint }
        })?;
        let inflight = Slab::with_capacity(entries as usize);
        let tables = Tables::open(&ring.submitter(), 0, fixed_bufs);
        let scratch = Vec::new();
        Ok(DevRing { ring, inflight, mode, scratch, tables, fixed_buf_ops: 0, stash: Vec::new() })
    }

    /// Where this ring's registered buffers come back when they drop.
    pub fn returns(&self) -> &Arc<Returns> {
        self.tables.home()
    }

    /// Clears the buffer slots returned since the last call and frees them.
    pub fn reclaim(&mut self) {
        if !self.ring.submission().is_empty() {
            return; // queued commands may still name a returned slot: later
        }
        let files = self.tables.reclaim(&self.ring.submitter());
        debug_assert!(files.is_empty(), "the device ring registers no files");
    }

    /// What its registered buffers did, and commands sent on one.
    pub fn fixed_counters(&self) -> (FixedCounters, u64) {
        (self.tables.counters, self.fixed_buf_ops)
    }

    pub fn mode(&self) -> DevRingMode {
        self.mode
    }

    /// Logical I/Os submitted and not yet handed out by [`DevRing::reap`].
    pub fn inflight(&self) -> usize {
        self.inflight.len() + self.stash.len()
    }

    /// Has the kernel signal `fd` (an eventfd) when completions are posted, while enabled
    /// ([`DevRing::notify`]); starts disabled.
    pub fn register_eventfd(&mut self, fd: RawFd) -> std::io::Result<()> {
        self.ring.submitter().register_eventfd(fd)?;
        self.ring.completion().disable_eventfd();
        Ok(())
    }

    /// Turns eventfd notification on (before the core sleeps) or off (while it runs and reaps
    /// this ring itself). Turning it on is followed by [`DevRing::has_completions`] by the
    /// caller: a completion posted just before is not signalled.
    pub fn notify(&mut self, enabled: bool) {
        let cq = self.ring.completion();
        if enabled {
            cq.enable_eventfd();
        } else {
            cq.disable_eventfd();
        }
    }

    /// Queues the commands of `io` on namespace `ns`; one completion carrying `token` follows
    /// once all have completed (with the error, if the kernel could not be entered to queue
    /// them all).
    pub fn push(&mut self, ns: &NvmeNs, io: NvmeIo, token: u64) {
        let mut cmds = std::mem::take(&mut self.scratch);
        cmds.clear();
        nvme::plan(ns, &io, |cmd| cmds.push(cmd));
        let ranges = match &io {
            NvmeIo::Deallocate { slba, nlb } => Some(nvme::dsm_ranges(*slba, *nlb)),
            _ => None,
        };
        let (mut buf, success) = match io {
            NvmeIo::Read { buf, .. } | NvmeIo::Write { buf, .. } => {
                let len = i32::try_from(buf.len()).expect("an NVMe transfer fits an i32");
                (Some(buf), len)
            }
            _ => (None, 0),
        };
        // Every command of the I/O addresses inside the buffer: one registration covers them.
        let buf_index = buf.as_mut().and_then(|b| self.tables.buf_slot(&self.ring.submitter(), b));
        let parts_left = cmds.len() as u32;
        let key =
            self.inflight.insert(InFlight { token, buf, ranges, parts_left, error: 0, success });
        for (queued, cmd) in cmds.iter().enumerate() {
            let slot = &mut self.inflight[key];
            let (addr, len) = match cmd.data {
                None => (0, 0),
                Some((offset, len)) => {
                    let target = slot.buf.as_mut().or(slot.ranges.as_mut());
                    let target = target.expect("a data command has a buffer");
                    assert!(offset.checked_add(len).is_some_and(|end| end <= target.len()));
                    (target.raw_at(offset) as u64, len as u32)
                }
            };
            // The range list of a deallocate is never registered: only data goes fixed.
            let index = if cmd.data.is_some() && slot.buf.is_some() { buf_index } else { None };
            let sqe = opcode::UringCmd80::new(types::Fd(ns.fd), nvme::NVME_URING_CMD_IO)
                .cmd(cmd.encode(addr, len))
                .buf_index(index)
                .build()
                .user_data(key as u64);
            if let Err(e) = self.queue(&sqe) {
                // The commands not queued fail with the error; the I/O completes once those
                // queued have (at once if none was).
                let slot = &mut self.inflight[key];
                slot.parts_left -= (cmds.len() - queued) as u32;
                if slot.error == 0 {
                    slot.error = -e.raw_os_error().unwrap_or(libc::EIO);
                }
                if slot.parts_left == 0 {
                    self.stash.push(finished(self.inflight.remove(key)));
                }
                break;
            }
            self.fixed_buf_ops += u64::from(index.is_some());
        }
        self.scratch = cmds;
    }

    /// Puts `sqe` on the submission queue, entering the kernel to make room if it is full.
    /// EBUSY (completions wait that nobody reaped), EINTR, EAGAIN: reap aside and try again.
    fn queue(&mut self, sqe: &squeue::Entry128) -> Result<(), std::io::Error> {
        // SAFETY: every address in `sqe` points into the buffer or range list owned by its
        // slot in `inflight` (heap memory that does not move), checked by `push` to hold the
        // length given; the slot stays in the slab until the last of its entries is reaped.
        // Entries without data carry no address.
        while unsafe { self.ring.submission().push(sqe) }.is_err() {
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if is_transient(&e) => {
                    let mut stash = std::mem::take(&mut self.stash);
                    self.reap_ring(&mut stash);
                    self.stash = stash;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether entering the kernel would do anything: commands to submit, completions to
    /// run or flush, or (polled ring) commands in flight to poll for.
    pub fn needs_enter(&mut self) -> bool {
        if self.mode == DevRingMode::Poll && !self.inflight.is_empty() {
            return true;
        }
        let sq = self.ring.submission();
        !sq.is_empty() || sq.taskrun() || sq.cq_overflow()
    }

    /// Whether completions are ready to reap, without entering the kernel.
    pub fn has_completions(&mut self) -> bool {
        !self.stash.is_empty() || !self.ring.completion().is_empty()
    }

    /// Submits queued commands (and, for a polled ring, polls) without waiting.
    pub fn submit(&mut self) -> Result<usize, RingError> {
        match self.ring.submit() {
            Ok(n) => Ok(n),
            Err(e) if is_transient(&e) => Ok(0),
            Err(e) => Err(RingError::Enter(e)),
        }
    }

    /// Submits and waits until a completion arrives or `timeout` passes (tests, tools).
    pub fn submit_and_wait(&mut self, timeout: Duration) -> Result<(), RingError> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e) if is_transient(&e) || e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            Err(e) => Err(RingError::Enter(e)),
        }
    }

    /// Moves every finished I/O's completion into `out`; returns how many.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let stashed = self.stash.len();
        out.append(&mut self.stash);
        stashed + self.reap_ring(out)
    }

    /// Counts the kernel's completions against their I/Os; those whose last command it was go
    /// to `out`.
    fn reap_ring(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut count = 0;
        for cqe in self.ring.completion() {
            let key = cqe.user_data() as usize;
            let Some(slot) = self.inflight.get_mut(key) else {
                panic!("device ring: completion for unknown user_data {key}");
            };
            assert!(slot.parts_left > 0);
            slot.parts_left -= 1;
            let errno = nvme::status_to_errno(cqe.result());
            if errno != 0 && slot.error == 0 {
                slot.error = errno;
            }
            if slot.parts_left == 0 {
                out.push(finished(self.inflight.remove(key)));
                count += 1;
            }
        }
        count
    }
}

/// The completion of an I/O whose commands have all completed.
fn finished(slot: InFlight) -> Completion {
    debug_assert_eq!(slot.parts_left, 0);
    let result = if slot.error != 0 { slot.error } else { slot.success };
    let owned = slot.buf.map_or(Owned::None, Owned::Buf);
    Completion { token: slot.token, result, owned }
}

impl Drop for DevRing {
    fn drop(&mut self) {
        // The kernel may still write into buffers of unreaped commands: leak them, never free.
        for slot in self.inflight.drain() {
            let _ = ManuallyDrop::new(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn ns(fd: RawFd) -> NvmeNs {
        NvmeNs { fd, nsid: 1, lba_shift: 9, max_data_lbas: 8, max_zeroes_lbas: 8 }
    }

    /// Pushes a 3-command read (token 42) and a deallocate (token 43) on `fd`, reaps both.
    fn run_two(fd: RawFd) -> Option<Vec<Completion>> {
        let Ok(mut ring) = DevRing::new(8, DevRingMode::Interrupt, 4) else {
            eprintln!("skipped: this kernel has no SQE128/CQE32 rings");
            return None;
        };
        let ns = ns(fd);
        // 20 LBAs of 512 bytes at most 8 per command: 3 commands.
        ring.push(&ns, NvmeIo::Read { slba: 0, buf: IoBuf::zeroed(20 * 512) }, 42);
        ring.push(&ns, NvmeIo::Deallocate { slba: 0, nlb: 4 }, 43);
        assert_eq!(ring.inflight(), 2);
        let mut out = Vec::new();
        for _ in 0..100 {
            ring.submit_and_wait(Duration::from_millis(100)).unwrap();
            ring.reap(&mut out);
            if out.len() == 2 {
                break;
            }
        }
        assert_eq!(out.len(), 2, "one completion per I/O, not per command");
        assert_eq!(ring.inflight(), 0);
        Some(out)
    }

    fn by_token(out: &[Completion], token: u64) -> &Completion {
        out.iter().find(|c| c.token == token).unwrap()
    }

    /// Without an NVMe device at hand: a passthrough command on a regular file fails in the
    /// kernel; every part of a split I/O completes, and the caller gets one completion, with
    /// the error and its buffer back.
    #[test]
    fn split_io_completes_once_with_its_buffer_and_the_first_error() {
        let path = std::env::temp_dir().join(format!("ballast-devring-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 16384]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let out = run_two(file.as_raw_fd());
        std::fs::remove_file(&path).unwrap();
        let Some(out) = out else { return };
        let read = by_token(&out, 42);
        assert!(read.result < 0, "passthrough on a regular file fails: {}", read.result);
        let Owned::Buf(b) = &read.owned else { panic!("the read's buffer comes back") };
        assert_eq!(b.len(), 20 * 512);
        assert!(by_token(&out, 43).result < 0);
        assert!(matches!(by_token(&out, 43).owned, Owned::None));
    }

    /// Newer kernels complete any uring_cmd on /dev/null with 0 (for measuring the path): then
    /// a split read succeeds once, with its full length; older ones refuse it.
    #[test]
    fn split_io_success_reports_the_whole_transfer() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let Some(out) = run_two(file.as_raw_fd()) else { return };
        let read = by_token(&out, 42);
        assert!(read.result == 20 * 512 || read.result < 0, "{}", read.result);
        assert!(matches!(read.owned, Owned::Buf(_)));
        let dsm = by_token(&out, 43).result;
        assert!(dsm <= 0, "{dsm}");
    }

    /// Many more I/Os than the ring has room for, none reaped meanwhile (the kernel's
    /// completion queue overflows and entering it says EBUSY): every push is taken, and every
    /// I/O completes once, none lost or doubled.
    #[test]
    fn pushes_past_an_overflowing_completion_queue_lose_nothing() {
        let Ok(mut ring) = DevRing::new(4, DevRingMode::Interrupt, 0) else {
            eprintln!("skipped: this kernel has no SQE128/CQE32 rings");
            return;
        };
        let file = std::fs::File::open("/dev/null").unwrap();
        let ns = ns(file.as_raw_fd());
        let n = 2000u64;
        for t in 0..n {
            // Two commands each: a split read of 12 LBAs, 8 at most per command.
            ring.push(&ns, NvmeIo::Read { slba: 0, buf: IoBuf::zeroed(12 * 512) }, t);
        }
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while (out.len() as u64) < n && std::time::Instant::now() < deadline {
            ring.submit_and_wait(Duration::from_millis(10)).unwrap();
            ring.reap(&mut out);
        }
        let mut tokens: Vec<u64> = out.iter().map(|c| c.token).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, (0..n).collect::<Vec<_>>());
        assert!(out.iter().all(|c| matches!(&c.owned, Owned::Buf(b) if b.len() == 12 * 512)));
        let busy = [-libc::EBUSY, -libc::EAGAIN, -libc::EINTR];
        assert!(out.iter().all(|c| !busy.contains(&c.result)), "no I/O fails for want of room");
        assert_eq!(ring.inflight(), 0);
    }
}
