//! Rate limits per device (SPDK's `bdev_set_qos_limit`): I/Os per second, and MiB per second
//! of reads and writes together, of reads, of writes — shared by every core that serves the
//! device, so a tenant's volume cannot take the media from the others however many
//! connections and queues it opens.
//!
//! Each limit is a GCRA (generic cell rate algorithm) on one atomic, its "theoretical arrival
//! time" (TAT) in ns since the device's epoch. An I/O costs `amount / rate` seconds of each
//! limit it falls under (1 I/O, or its bytes); it reserves its slot by moving the TAT forward
//! (one atomic update, no lock), and goes now if its slot begins within [`BURST`] of now,
//! else once it does. Nothing is refused or dropped, only delayed, in arrival order per limit:
//! a client keeping more I/O in flight waits longer; other devices are not touched.
//!
//! Invariants:
//! - with no limit set, an I/O reads one atomic and changes nothing ([`Throttled::submit`]);
//! - a delayed command is owned by one [`Delayed`] task on the submitting core until its time
//!   comes: it submits the command to the inner device then, and hands its completion to the
//!   submitter with the submitter's tag, once (a stop submits what waits at once);
//! - flushes are never delayed (they order nothing that has not completed), and while a limit
//!   is set no I/O bypasses it (lent reads, stores from the receive buffer and reads of holes
//!   answered without I/O are declined);
//! - what a delayed command's buffer holds counts, from its delay until it goes, as this
//!   device's waiting I/O on its core ([`crate::pool::BufPool`]'s `qos_waiting`, keyed by the
//!   `Qos`'s address, which the `Delayed` task keeps alive); while that reaches the core's
//!   limit, [`BlockDev::held_back`] tells connections to take no new request for the device,
//!   so a held-back tenant keeps at most its share of a core's payload memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_ffi::region::Lent;
use ballast_ffi::Owned;

use crate::blockdev::{BlockDev, ChangeBase, DevInfo, Extent, IoCmd};
use crate::gate::WriteGate;
use crate::reactor::{Cx, Task};

/// How far ahead of its slot an I/O may go: 1 ms of each limit's budget (SPDK's QoS
/// timeslice), so a device idle for a while takes a short burst at full speed.
pub const BURST: Duration = Duration::from_millis(1);

/// How often a command waiting for its slot looks whether the limits changed (a limit lifted
/// lets what waits go).
pub const RECHECK: Duration = Duration::from_millis(100);

/// I/O limits must be multiples of this (as SPDK's `SPDK_BDEV_QOS_MIN_IOS_PER_SEC`).
pub const IOS_STEP: u64 = 1000;

const MIB: u64 = 1 << 20;

/// A device's limits; 0: none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QosLimits {
    pub rw_ios_per_sec: u64,
    pub rw_mbytes_per_sec: u64,
    pub r_mbytes_per_sec: u64,
    pub w_mbytes_per_sec: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QosError {
    #[error("rw_ios_per_sec {0} is not a multiple of {IOS_STEP}")]
    IosStep(u64),
    #[error("{field} {value} is too large")]
    TooLarge { field: &'static str, value: u64 },
}

impl QosLimits {
    /// Whether [`Qos::set`] would take them.
    pub fn check(&self) -> Result<(), QosError> {
        self.rates().map(drop)
    }

    /// The limits' rates, in the order of [`Qos`]'s buckets: I/Os, read+write bytes, read
    /// bytes, write bytes per second.
    fn rates(&self) -> Result<[u64; 4], QosError> {
        if !self.rw_ios_per_sec.is_multiple_of(IOS_STEP) {
            return Err(QosError::IosStep(self.rw_ios_per_sec));
        }
        let bytes =
            |field, mib: u64| mib.checked_mul(MIB).ok_or(QosError::TooLarge { field, value: mib });
        Ok([
            self.rw_ios_per_sec,
            bytes("rw_mbytes_per_sec", self.rw_mbytes_per_sec)?,
            bytes("r_mbytes_per_sec", self.r_mbytes_per_sec)?,
            bytes("w_mbytes_per_sec", self.w_mbytes_per_sec)?,
        ])
    }
}

/// What kind of I/O a command is, for its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    Read(u64),
    Write(u64),
    /// Discard, write-zeroes: an I/O, no data bytes.
    Other,
}

/// One device's limits and their state, shared by every core.
#[derive(Debug)]
pub struct Qos {
    /// Per second: I/Os, read+write bytes, read bytes, write bytes (0: unlimited).
    rates: [AtomicU64; 4],
    /// Each limit's theoretical arrival time, ns since `epoch`.
    tat: [AtomicU64; 4],
    limited: AtomicBool,
    /// I/Os that waited for their slot, and the ns they waited in all.
    delayed: AtomicU64,
    delayed_ns: AtomicU64,
    /// Times a connection found this device's waiting I/O at its core's limit and stopped
    /// taking requests for it.
    paused: AtomicU64,
    /// Bumped by every change of the limits: waiting I/O looks again (`Delayed`).
    generation: AtomicU64,
    epoch: Instant,
}

impl Default for Qos {
    fn default() -> Self {
        Qos {
            rates: Default::default(),
            tat: Default::default(),
            limited: AtomicBool::new(false),
            delayed: AtomicU64::new(0),
            delayed_ns: AtomicU64::new(0),
            paused: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Qos {
    /// Sets the limits (0 lifts one): a limit whose rate changes starts afresh, the others
    /// keep their budget; I/O waiting for a slot goes at once (within [`RECHECK`]).
    pub fn set(&self, limits: QosLimits) -> Result<(), QosError> {
        let rates = limits.rates()?;
        for (i, rate) in rates.iter().enumerate() {
            if self.rates[i].swap(*rate, Ordering::Relaxed) != *rate {
                self.tat[i].store(0, Ordering::Relaxed);
            }
        }
        self.limited.store(rates.iter().any(|&r| r > 0), Ordering::Release);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Changes of the limits so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn limits(&self) -> QosLimits {
        let r = |i: usize| self.rates[i].load(Ordering::Relaxed);
        QosLimits {
            rw_ios_per_sec: r(0),
            rw_mbytes_per_sec: r(1) / MIB,
            r_mbytes_per_sec: r(2) / MIB,
            w_mbytes_per_sec: r(3) / MIB,
        }
    }

    /// Whether any limit is set.
    #[inline]
    pub fn limited(&self) -> bool {
        self.limited.load(Ordering::Relaxed)
    }

    /// I/Os delayed so far, and the time they waited in all.
    pub fn delayed(&self) -> (u64, Duration) {
        let ns = self.delayed_ns.load(Ordering::Relaxed);
        (self.delayed.load(Ordering::Relaxed), Duration::from_nanos(ns))
    }

    /// Times connections stopped taking requests because this device's waiting I/O held its
    /// core's share.
    pub fn paused(&self) -> u64 {
        self.paused.load(Ordering::Relaxed)
    }

    /// This device's key in its cores' counts of waiting I/O.
    fn key(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }

    /// Now, in this device's clock.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Reserves an I/O's slot in every limit it falls under at `now` (ns of this device's
    /// clock); returns how long it must wait (zero: it goes now). The I/O goes once every
    /// one of those limits has room, and its slot in each begins then: a limit it waits for
    /// leaves the others' budget unused meanwhile rather than booked early (a read held by a
    /// read limit does not let a read+write limit be exceeded later).
    pub fn reserve(&self, now: u64, charge: Charge) -> Duration {
        let (bytes, own) = match charge {
            Charge::Read(b) => (b, Some(2)),
            Charge::Write(b) => (b, Some(3)),
            Charge::Other => (0, None),
        };
        let mut costs = [(0usize, 0u64); 3];
        let mut n = 0;
        for (i, amount) in [(0, 1), (1, bytes)].into_iter().chain(own.map(|i| (i, bytes))) {
            let rate = self.rates[i].load(Ordering::Relaxed);
            if rate == 0 || amount == 0 {
                continue;
            }
            costs[n] = (i, (u128::from(amount) * 1_000_000_000 / u128::from(rate)) as u64);
            n += 1;
        }
        let costs = &costs[..n];
        let go =
            costs.iter().map(|&(i, _)| self.tat[i].load(Ordering::Relaxed)).fold(now, u64::max);
        // Each limit's slot begins at `go`, or later where another core booked meanwhile.
        let mut start = go;
        for &(i, cost) in costs {
            let before = self.tat[i]
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                    Some(t.max(go).saturating_add(cost))
                })
                .expect("the update always succeeds");
            start = start.max(before);
        }
        let wait = start.saturating_sub(now.saturating_add(BURST.as_nanos() as u64));
        if wait > 0 {
            self.delayed.fetch_add(1, Ordering::Relaxed);
            self.delayed_ns.fetch_add(wait, Ordering::Relaxed);
        }
        Duration::from_nanos(wait)
    }
}

/// A device as it is exported: under its [`Qos`] limits (every call goes to the inner device;
/// a submission waits for its slot first while a limit is set), with the write gate its
/// exports share ([`crate::gate`]).
pub struct Throttled {
    inner: Arc<dyn BlockDev>,
    qos: Arc<Qos>,
    gate: Arc<WriteGate>,
}

impl Throttled {
    pub fn new(inner: Arc<dyn BlockDev>, qos: Arc<Qos>) -> Throttled {
        Throttled { inner, qos, gate: WriteGate::new() }
    }
}

impl BlockDev for Throttled {
    fn info(&self) -> &DevInfo {
        self.inner.info()
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn grow(&self, new_size: u64) -> std::io::Result<()> {
        self.inner.grow(new_size)
    }
    fn rescan(&self) -> std::io::Result<(u64, u64)> {
        self.inner.rescan()
    }
    fn home_core(&self, here: usize) -> Option<usize> {
        self.inner.home_core(here)
    }

    fn submit(&self, cx: &mut Cx<'_>, cmd: IoCmd, tag: u32) {
        if !self.qos.limited() {
            return self.inner.submit(cx, cmd, tag);
        }
        let charge = match &cmd {
            IoCmd::Read { buf, .. } => Charge::Read(buf.len() as u64),
            IoCmd::Write { buf, .. } => Charge::Write(buf.len() as u64),
            // Zeros the device writes out (a volume's without unmapping) cost their bytes.
            IoCmd::WriteZeroes { len, may_unmap, .. }
                if !self.inner.zeroes_are_fast(*may_unmap) =>
            {
                Charge::Write(*len)
            }
            IoCmd::Discard { .. } | IoCmd::WriteZeroes { .. } => Charge::Other,
            IoCmd::Flush => return self.inner.submit(cx, cmd, tag),
        };
        let wait = self.qos.reserve(self.qos.now_ns(), charge);
        if wait.is_zero() {
            return self.inner.submit(cx, cmd, tag);
        }
        let held = match charge {
            Charge::Read(b) | Charge::Write(b) if cmd_holds_buffer(&cmd) => b,
            _ => 0,
        };
        // Zero-byte commands (discards, zeroes) hold no memory: not counted at all.
        if held > 0 {
            cx.qos_wait_add(self.qos.key(), held);
        }
        let delayed = Delayed {
            inner: Arc::clone(&self.inner),
            qos: Arc::clone(&self.qos),
            held,
            generation: self.qos.generation(),
            until: self.qos.now_ns().saturating_add(wait.as_nanos() as u64),
            cmd: Some(cmd),
            caller: cx.task(),
            tag,
            timer_pending: false,
            io_pending: false,
            cancel_pending: false,
        };
        cx.spawn_local(Box::new(delayed));
    }

    fn write_gate(&self) -> Option<&Arc<WriteGate>> {
        Some(&self.gate)
    }

    fn held_back(&self, cx: &Cx<'_>, again: bool) -> bool {
        // Unlimited: one atomic read. A limit lifted lets its waiting I/O go within RECHECK.
        if !self.qos.limited() || !cx.qos_wait_full(self.qos.key()) {
            return false;
        }
        if !again {
            self.qos.paused.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    fn extents(&self, offset: u64, len: u64, max: usize) -> std::io::Result<Vec<Extent>> {
        self.inner.extents(offset, len, max)
    }
    fn used_bytes(&self) -> u64 {
        self.inner.used_bytes()
    }
    fn change_bases(&self) -> Vec<ChangeBase> {
        self.inner.change_bases()
    }
    fn changes(
        &self,
        base: u64,
        offset: u64,
        len: u64,
        max: usize,
    ) -> std::io::Result<Vec<(u64, bool)>> {
        self.inner.changes(base, offset, len, max)
    }
    fn is_unallocated(&self, offset: u64, len: u64) -> bool {
        // A read of a hole is answered without I/O: under a limit, it is submitted instead.
        !self.qos.limited() && self.inner.is_unallocated(offset, len)
    }
    fn lend(&self, core: usize, offset: u64, len: u64) -> Option<Lent> {
        // A lent read has no completion to delay: under a limit, reads are submitted.
        if self.qos.limited() {
            return None;
        }
        self.inner.lend(core, offset, len)
    }
    fn write_now(&self, offset: u64, data: &[u8]) -> bool {
        !self.qos.limited() && self.inner.write_now(offset, data)
    }
    fn zeroes_supported(&self) -> bool {
        self.inner.zeroes_supported()
    }
    fn effect_piece_max(&self) -> u64 {
        self.inner.effect_piece_max()
    }
    fn zeroes_are_fast(&self, may_unmap: bool) -> bool {
        self.inner.zeroes_are_fast(may_unmap)
    }
    fn discard_zeroes(&self) -> bool {
        self.inner.discard_zeroes()
    }
    fn flush_blocking(&self) -> std::io::Result<()> {
        self.inner.flush_blocking()
    }
}

/// Whether a command carries a payload buffer its connection charged (reads and writes).
fn cmd_holds_buffer(cmd: &IoCmd) -> bool {
    matches!(cmd, IoCmd::Read { .. } | IoCmd::Write { .. })
}

/// A command waiting for its slot, on the core it was submitted on.
struct Delayed {
    inner: Arc<dyn BlockDev>,
    qos: Arc<Qos>,
    /// Payload bytes its buffer holds: counted as the device's waiting I/O on this core until
    /// it goes.
    held: u64,
    /// The limits' generation it was delayed under, and when its slot begins (the device's
    /// clock, less the burst allowance).
    generation: u64,
    until: u64,
    /// Until submitted.
    cmd: Option<IoCmd>,
    /// The submitting task and its tag: where the completion goes.
    caller: u32,
    tag: u32,
    timer_pending: bool,
    io_pending: bool,
    /// A stop cancelled the timer: the cancel's own completion is still to come.
    cancel_pending: bool,
}

const TIMER: u32 = 0;
const IO: u32 = 1;
const CANCEL: u32 = 2;

impl Delayed {
    /// Waits until its slot, looking every [`RECHECK`] whether the limits changed.
    fn arm(&mut self, cx: &mut Cx<'_>) {
        let left = Duration::from_nanos(self.until.saturating_sub(self.qos.now_ns()));
        self.timer_pending = true;
        cx.timer(TIMER, left.min(RECHECK));
    }

    /// Its time has come (or the core is stopping): the command goes to the inner device.
    fn go(&mut self, cx: &mut Cx<'_>) {
        if let Some(cmd) = self.cmd.take() {
            if self.held > 0 {
                cx.qos_wait_sub(self.qos.key(), self.held);
            }
            self.io_pending = true;
            self.inner.submit(cx, cmd, IO);
        }
    }
}

impl Task for Delayed {
    fn start(&mut self, cx: &mut Cx<'_>) {
        self.arm(cx);
    }

    fn on_completion(&mut self, cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned) {
        match tag {
            // Expired, or cancelled by a stop (which submitted the command already).
            TIMER => {
                self.timer_pending = false;
                let changed = self.qos.generation() != self.generation;
                if self.cmd.is_some() && !changed && self.qos.now_ns() < self.until {
                    return self.arm(cx);
                }
                self.go(cx);
            }
            CANCEL => self.cancel_pending = false,
            IO => {
                assert!(self.io_pending, "one completion for the one command");
                self.io_pending = false;
                cx.complete_to(self.caller, self.tag, result, owned);
            }
            other => unreachable!("a delayed command has no tag {other}"),
        }
    }

    fn flush(&mut self, _cx: &mut Cx<'_>) {}

    fn on_shutdown(&mut self, cx: &mut Cx<'_>) {
        // A stop does not wait out a limit: what waits goes now, and the timer goes.
        if self.timer_pending && !self.cancel_pending {
            self.cancel_pending = true;
            cx.cancel(TIMER, CANCEL);
        }
        self.go(cx);
    }

    fn is_done(&self) -> bool {
        self.cmd.is_none() && !self.timer_pending && !self.io_pending && !self.cancel_pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn qos(l: QosLimits) -> Qos {
        let q = Qos::default();
        q.set(l).unwrap();
        q
    }

    /// 1000 I/Os per second: after the burst (1 ms of budget: two I/Os at once), each I/O
    /// waits 1 ms more than the one before; time passing pays the debt back.
    #[test]
    fn an_iops_limit_spaces_ios_by_their_cost() {
        let q = qos(QosLimits { rw_ios_per_sec: 1000, ..Default::default() });
        let waits: Vec<u64> =
            (0..5).map(|_| q.reserve(10 * MS, Charge::Read(4096)).as_nanos() as u64).collect();
        assert_eq!(waits, [0, 0, MS, 2 * MS, 3 * MS]);
        // 100 ms later the debt (5 ms) is long paid: free again.
        assert_eq!(q.reserve(110 * MS, Charge::Other), Duration::ZERO);
        assert_eq!(q.delayed().0, 3);
    }

    /// Byte limits: reads count against rw and r, writes against rw and w; the larger wait
    /// wins; a flush-free discard counts as an I/O only.
    #[test]
    fn byte_limits_charge_reads_and_writes_apart() {
        let q = qos(QosLimits { r_mbytes_per_sec: 1, w_mbytes_per_sec: 4, ..Default::default() });
        let mib = 1 << 20;
        assert_eq!(q.reserve(0, Charge::Read(mib)), Duration::ZERO);
        // The second MiB read waits for the first one's second (less the 1 ms burst).
        assert_eq!(q.reserve(0, Charge::Read(mib)), Duration::from_millis(999));
        // Writes have their own budget: 1 MiB costs 250 ms of it.
        assert_eq!(q.reserve(0, Charge::Write(mib)), Duration::ZERO);
        assert_eq!(q.reserve(0, Charge::Write(mib)), Duration::from_millis(249));
        assert_eq!(q.reserve(0, Charge::Other), Duration::ZERO, "no bytes, no I/O limit");
        let both =
            qos(QosLimits { rw_mbytes_per_sec: 2, r_mbytes_per_sec: 1, ..Default::default() });
        both.reserve(0, Charge::Read(mib));
        // rw owes 500 ms, r 1000 ms: the read waits the longer, and its rw slot begins when it
        // goes (1 s), not at 500 ms: the rw budget between stays unused.
        assert_eq!(both.reserve(0, Charge::Read(mib)), Duration::from_millis(999));
        // A write waits for rw alone: booked by the reads until 1.5 s.
        assert_eq!(both.reserve(0, Charge::Write(mib)), Duration::from_millis(1499));
    }

    /// Reads held by a read limit do not book the read+write limit early: over any stretch
    /// of time, what goes (by its go time) stays within the read+write rate (plus the I/Os at
    /// the stretch's ends). Booked as each limit alone sees it, the reads' read+write slots
    /// would lie at 0-4.5 s while they go at 0-9 s, and the writes after them at 5-9.5 s: 15
    /// MiB in 5 s against 2 MiB/s.
    #[test]
    fn a_combined_limit_holds_while_a_narrower_one_delays() {
        let q = qos(QosLimits { rw_mbytes_per_sec: 2, r_mbytes_per_sec: 1, ..Default::default() });
        let mib = 1u64 << 20;
        // Ten reads queued at once (the read limit spaces them 1 s apart), then ten writes.
        let mut gone: Vec<u64> = (0..20)
            .map(|k| {
                let c = if k < 10 { Charge::Read(mib) } else { Charge::Write(mib) };
                q.reserve(0, c).as_nanos() as u64
            })
            .collect();
        gone.sort_unstable();
        for i in 0..gone.len() {
            for j in i..gone.len() {
                let bytes = (j - i + 1) as u64 * mib;
                // The rate over the stretch, plus the I/Os at its two ends.
                let allowed = 2 * mib * (gone[j] - gone[i]) / 1_000_000_000 + 2 * mib;
                assert!(
                    bytes <= allowed,
                    "{} MiB between {} and {} ns",
                    j - i + 1,
                    gone[i],
                    gone[j]
                );
            }
        }
    }

    /// Lifting every limit clears `limited`; setting them again starts afresh; SPDK's steps
    /// are enforced.
    #[test]
    fn limits_are_set_checked_and_lifted() {
        let q = Qos::default();
        assert!(!q.limited());
        assert_eq!(
            q.set(QosLimits { rw_ios_per_sec: 1500, ..Default::default() }),
            Err(QosError::IosStep(1500))
        );
        assert!(!q.limited(), "a refused setting changes nothing");
        let l = QosLimits { rw_ios_per_sec: 2000, w_mbytes_per_sec: 10, ..Default::default() };
        q.set(l).unwrap();
        assert!(q.limited());
        assert_eq!(q.limits(), l);
        let generation = q.generation();
        for _ in 0..10 {
            q.reserve(0, Charge::Other);
        }
        // 10 I/Os at 0.5 ms each booked 5 ms: the next waits 4 ms (after the 1 ms burst).
        q.set(l).unwrap();
        assert_eq!(q.reserve(0, Charge::Other), Duration::from_millis(4), "unchanged: kept");
        assert!(q.generation() > generation, "what waits looks again");
        q.set(QosLimits { rw_ios_per_sec: 3000, ..l }).unwrap();
        assert_eq!(q.reserve(0, Charge::Other), Duration::ZERO, "a changed limit starts afresh");
        q.set(QosLimits::default()).unwrap();
        assert!(!q.limited());
        assert!(matches!(
            q.set(QosLimits { r_mbytes_per_sec: u64::MAX, ..Default::default() }),
            Err(QosError::TooLarge { .. })
        ));
    }

    /// Cores reserving at once never get the same slot: every reservation moves the TAT by
    /// its cost, so N I/Os from four threads are spread over N × cost.
    #[test]
    fn concurrent_reservations_share_one_budget() {
        let q = Arc::new(qos(QosLimits { rw_ios_per_sec: 1_000_000, ..Default::default() }));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let q = Arc::clone(&q);
                std::thread::spawn(move || {
                    (0..10_000).map(|_| q.reserve(0, Charge::Other).as_nanos() as u64).max()
                })
            })
            .collect();
        let longest = threads.into_iter().filter_map(|t| t.join().unwrap()).max().unwrap();
        // 40,000 I/Os at 1 µs each: the last waits 40 ms less the 1 ms burst and its own µs.
        assert_eq!(longest, 40_000 * 1000 - MS - 1000);
    }
}
