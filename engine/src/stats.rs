//! Per-core counters and service-latency histograms.
//!
//! Owned by one core and only touched by it; the control plane gets copies through the core's
//! mailbox ([`crate::Msg::Stats`]), so nothing here is shared or locked.
//!
//! Every counter and the histogram only grow (never reset): a snapshot is cumulative since the
//! core started, as Prometheus counters and histograms want them. The one gauge, `in_flight`
//! (requests handed to a device and not completed yet: the queue depth), goes up at
//! [`CoreStats::submitted`] and down at [`CoreStats::retired`], both on the core that owns the
//! request, so a core's count never goes below zero and the sum over cores is the device's depth.
//!
//! Besides the core's totals, each device (an export, a volume, whatever both protocols serve)
//! has its own counters per protocol ([`Proto`]), indexed by its [`device_id`]
//! (`DevInfo::stats_id`): a vector index per request, no hashing, no lock. At most
//! [`DEVICES_MAX`] ids are counted per device (beyond that, requests count in the core's totals
//! only).

use std::sync::atomic::{AtomicU32, Ordering};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Device ids counted per device; a core's vector of them is at most this long.
pub const DEVICES_MAX: usize = 65_536;

static NEXT_DEVICE: AtomicU32 = AtomicU32::new(0);

/// A fresh id for a device's counters (every device constructor takes one).
pub fn device_id() -> u32 {
    NEXT_DEVICE.fetch_add(1, Ordering::Relaxed)
}

/// One device's requests on one core.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DevCounters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub other: u64,
    pub errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Sum of the requests' latencies, in ns (with the op counts: the average).
    pub latency_ns_sum: u64,
    /// Requests submitted and not completed yet (a gauge: the device's queue depth here).
    pub in_flight: u64,
}

impl DevCounters {
    fn add(&mut self, kind: OpKind, bytes: u64, latency_ns: u64, ok: bool) {
        match kind {
            OpKind::Read => {
                self.reads += 1;
                self.bytes_read += bytes;
            }
            OpKind::Write => {
                self.writes += 1;
                self.bytes_written += bytes;
            }
            OpKind::Flush => self.flushes += 1,
            OpKind::Discard => self.discards += 1,
            OpKind::WriteZeroes => self.write_zeroes += 1,
            OpKind::Other => self.other += 1,
        }
        if !ok {
            self.errors += 1;
        }
        self.latency_ns_sum = self.latency_ns_sum.wrapping_add(latency_ns);
    }

    /// Adds another core's counters of the same device (sums at scrape time).
    pub fn merge(&mut self, o: &DevCounters) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.flushes += o.flushes;
        self.discards += o.discards;
        self.write_zeroes += o.write_zeroes;
        self.other += o.other;
        self.errors += o.errors;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
        self.latency_ns_sum = self.latency_ns_sum.wrapping_add(o.latency_ns_sum);
        self.in_flight += o.in_flight;
    }

    pub fn ops(&self) -> u64 {
        self.reads + self.writes + self.flushes + self.discards + self.write_zeroes + self.other
    }
}

/// The protocol a request came in by: a device's counters are kept per protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Nbd = 0,
    Nvmf = 1,
}

impl Proto {
    pub const ALL: [Proto; 2] = [Proto::Nbd, Proto::Nvmf];

    /// Its name in metrics (the `protocol` label).
    pub fn label(self) -> &'static str {
        match self {
            Proto::Nbd => "nbd",
            Proto::Nvmf => "nvmf",
        }
    }
}

/// Kinds of block request counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read = 0,
    Write = 1,
    Flush = 2,
    Discard = 3,
    WriteZeroes = 4,
    Other = 5,
}

const OP_KINDS: usize = 6;
const LATENCY_NS_MAX: u64 = 60_000_000_000;

/// Upper bounds (inclusive, in µs) of the latency buckets a snapshot reports, besides +Inf:
/// the Prometheus histogram buckets the metrics endpoint exports.
pub const LATENCY_BUCKET_BOUNDS_US: [u64; 16] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000, 10_000_000,
];
const _: () = assert!(LATENCY_BUCKET_BOUNDS_US[0] > 0);

pub struct CoreStats {
    pub core: usize,
    ops: [u64; OP_KINDS],
    errors: u64,
    bytes_read: u64,
    bytes_written: u64,
    latency_ns: Histogram<u64>,
    /// Exact sum of the recorded latencies (the histogram keeps 3 significant digits).
    latency_ns_sum: u64,
    pub connections_open: u64,
    pub connections_total: u64,
    /// Connections this core sent to another core: to the core their volume lives on
    /// (`--volume-placement owner`), or NVMe/TCP I/O queues to the core serving the fewest.
    pub connections_moved: u64,
    pub loops_busy: u64,
    /// Idle turns that spun (the polling policy expected work soon).
    pub spins: u64,
    pub sleeps: u64,
    /// Jobs this core handed to an offload thread ([`crate::Cx::offload`]).
    pub offloaded: u64,
    /// Jobs it ran in place because no offload thread could take them.
    pub offload_in_place: u64,
    /// Reads answered from a device's lent memory ([`crate::blockdev::BlockDev::lend`]): no
    /// I/O, no buffer, no copy of ours.
    pub reads_lent: u64,
    /// Writes stored at once from a receive buffer ([`crate::blockdev::BlockDev::write_now`]):
    /// no I/O, no buffer, no copy of ours but the one into the device's memory.
    pub writes_now: u64,
    /// Write-group commands that found their device's write gate fenced (an NVMe fused
    /// Compare and Write running alone) and waited for it ([`crate::gate`]).
    pub writes_fenced: u64,
    /// Times this core borrowed a pool's shared state on the data path (one per flush round
    /// with volume work, per pool), and the request events decided in those borrows.
    pub volume_rounds: u64,
    pub volume_events: u64,
    /// Volume requests this core forwarded to the core owning their family, and the
    /// wake-ups its mail posts needed (one per batch at most).
    pub volume_forwarded: u64,
    pub volume_mail_wakes: u64,
    /// Requests submitted on this core and not completed yet, all devices together.
    in_flight: u64,
    /// Per device, by `device_id`, per protocol.
    devices: Vec<[DevCounters; 2]>,
}

impl CoreStats {
    pub fn new(core: usize) -> CoreStats {
        CoreStats {
            core,
            ops: [0; OP_KINDS],
            errors: 0,
            bytes_read: 0,
            bytes_written: 0,
            latency_ns: Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("histogram bounds"),
            latency_ns_sum: 0,
            connections_open: 0,
            connections_total: 0,
            connections_moved: 0,
            loops_busy: 0,
            spins: 0,
            sleeps: 0,
            offloaded: 0,
            offload_in_place: 0,
            reads_lent: 0,
            writes_now: 0,
            writes_fenced: 0,
            volume_rounds: 0,
            volume_events: 0,
            volume_forwarded: 0,
            volume_mail_wakes: 0,
            in_flight: 0,
            devices: Vec::new(),
        }
    }

    /// Device `dev`'s counters (its `DevInfo::stats_id`) for protocol `proto`, `None` beyond
    /// [`DEVICES_MAX`].
    fn device(&mut self, dev: u32, proto: Proto) -> Option<&mut DevCounters> {
        let i = dev as usize;
        if i >= DEVICES_MAX {
            return None;
        }
        if i >= self.devices.len() {
            self.devices.resize(i + 1, Default::default());
        }
        Some(&mut self.devices[i][proto as usize])
    }

    /// A request was taken in for device `dev` over `proto`: one more in flight until
    /// [`Self::retired`].
    pub fn submitted(&mut self, dev: u32, proto: Proto) {
        self.in_flight += 1;
        if let Some(d) = self.device(dev, proto) {
            d.in_flight += 1;
        }
    }

    /// A request counted by [`Self::submitted`] on this core is finished (whatever its outcome).
    pub fn retired(&mut self, dev: u32, proto: Proto) {
        assert!(self.in_flight > 0, "a request retired that was not submitted");
        self.in_flight -= 1;
        if let Some(d) = self.device(dev, proto) {
            assert!(d.in_flight > 0, "device {dev}: a request retired that was not submitted");
            d.in_flight -= 1;
        }
    }

    /// Records one finished request on device `dev` (its `DevInfo::stats_id`) over `proto`.
    pub fn record(
        &mut self,
        dev: u32,
        proto: Proto,
        kind: OpKind,
        bytes: u64,
        latency_ns: u64,
        ok: bool,
    ) {
        if let Some(d) = self.device(dev, proto) {
            d.add(kind, bytes, latency_ns.clamp(1, LATENCY_NS_MAX), ok);
        }
        self.ops[kind as usize] += 1;
        if !ok {
            self.errors += 1;
        }
        match kind {
            OpKind::Read => self.bytes_read += bytes,
            OpKind::Write => self.bytes_written += bytes,
            _ => {}
        }
        let latency_ns = latency_ns.clamp(1, LATENCY_NS_MAX);
        let _ = self.latency_ns.record(latency_ns);
        self.latency_ns_sum = self.latency_ns_sum.wrapping_add(latency_ns);
    }

    /// Cumulative bucket counts at [`LATENCY_BUCKET_BOUNDS_US`]: one pass over the recorded
    /// values (only the histogram's non-empty buckets), at snapshot time, never per I/O.
    fn latency_buckets(&self) -> LatencyBuckets {
        let mut counts = [0u64; LATENCY_BUCKET_BOUNDS_US.len()];
        for v in self.latency_ns.iter_recorded() {
            // The histogram's value for a bucket is the highest it holds: a bucket that
            // straddles a bound counts above it (at most 0.1% off, the histogram's precision).
            let us = v.value_iterated_to().div_ceil(1000);
            let first = LATENCY_BUCKET_BOUNDS_US.partition_point(|&bound| bound < us);
            if let Some(slot) = counts.get_mut(first) {
                *slot += v.count_at_value();
            }
        }
        let mut running = 0;
        for c in &mut counts {
            running += *c;
            *c = running;
        }
        let count = self.latency_ns.len();
        assert!(running <= count);
        LatencyBuckets { cumulative: counts, count, sum_ns: self.latency_ns_sum }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let q = |p: f64| self.latency_ns.value_at_quantile(p) as f64 / 1000.0;
        StatsSnapshot {
            core: self.core,
            reads: self.ops[OpKind::Read as usize],
            writes: self.ops[OpKind::Write as usize],
            flushes: self.ops[OpKind::Flush as usize],
            discards: self.ops[OpKind::Discard as usize],
            write_zeroes: self.ops[OpKind::WriteZeroes as usize],
            other: self.ops[OpKind::Other as usize],
            errors: self.errors,
            bytes_read: self.bytes_read,
            bytes_written: self.bytes_written,
            latency_us_p50: q(0.5),
            latency_us_p99: q(0.99),
            latency_us_p999: q(0.999),
            latency_us_max: self.latency_ns.max() as f64 / 1000.0,
            connections_open: self.connections_open,
            connections_total: self.connections_total,
            connections_moved: self.connections_moved,
            loops_busy: self.loops_busy,
            spins: self.spins,
            sleeps: self.sleeps,
            offloaded: self.offloaded,
            offload_in_place: self.offload_in_place,
            reads_lent: self.reads_lent,
            writes_now: self.writes_now,
            writes_fenced: self.writes_fenced,
            volume_rounds: self.volume_rounds,
            volume_events: self.volume_events,
            volume_forwarded: self.volume_forwarded,
            volume_mail_wakes: self.volume_mail_wakes,
            in_flight: self.in_flight,
            tasks: 0,
            ring_enters: 0,
            ring_ops: 0,
            sends: 0,
            recvs: 0,
            allocations: 0,
            fixed_file_ops: 0,
            fixed_buf_ops: 0,
            buf_registrations: 0,
            registration_failures: 0,
            files_registered: 0,
            bufs_registered: 0,
            short_transfers: 0,
            buffers: Default::default(),
            latency: self.latency_buckets(),
            devices: self
                .devices
                .iter()
                .enumerate()
                .flat_map(|(i, d)| Proto::ALL.map(|p| (i as u32, p, d[p as usize])))
                .filter(|(_, _, d)| d.ops() > 0 || d.in_flight > 0)
                .collect(),
        }
    }
}

impl StatsSnapshot {
    /// The core's request counters, all devices together, in the per-device shape.
    pub fn totals(&self) -> DevCounters {
        DevCounters {
            reads: self.reads,
            writes: self.writes,
            flushes: self.flushes,
            discards: self.discards,
            write_zeroes: self.write_zeroes,
            other: self.other,
            errors: self.errors,
            bytes_read: self.bytes_read,
            bytes_written: self.bytes_written,
            latency_ns_sum: self.latency.sum_ns,
            in_flight: self.in_flight,
        }
    }
}

/// A core's latency histogram as Prometheus buckets (cumulative, like `le` buckets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencyBuckets {
    /// Requests that took at most `LATENCY_BUCKET_BOUNDS_US[i]` µs.
    pub cumulative: [u64; LATENCY_BUCKET_BOUNDS_US.len()],
    /// Every request recorded (the +Inf bucket).
    pub count: u64,
    /// Sum of their latencies, in ns.
    pub sum_ns: u64,
}

/// A copy of one core's statistics.
#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    pub core: usize,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub other: u64,
    pub errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub latency_us_p50: f64,
    pub latency_us_p99: f64,
    pub latency_us_p999: f64,
    pub latency_us_max: f64,
    pub connections_open: u64,
    pub connections_total: u64,
    /// Connections the core sent on to the core their volume lives on.
    pub connections_moved: u64,
    pub loops_busy: u64,
    pub spins: u64,
    pub sleeps: u64,
    pub offloaded: u64,
    pub offload_in_place: u64,
    /// Reads sent from a device's lent memory.
    pub reads_lent: u64,
    /// Writes stored at once from a receive buffer.
    pub writes_now: u64,
    /// Writes that waited for their device's fence (fused Compare and Write).
    pub writes_fenced: u64,
    /// Borrows of a pool's shared state on the data path, and the request events decided in
    /// them (events per round: how well a turn's volume work shares one borrow).
    pub volume_rounds: u64,
    pub volume_events: u64,
    /// Volume requests this core forwarded to the core owning their family, and the
    /// wake-ups its mail posts needed (one per batch at most).
    pub volume_forwarded: u64,
    pub volume_mail_wakes: u64,
    /// Requests submitted and not completed yet (the core's queue depth, all devices).
    pub in_flight: u64,
    /// Tasks (connections, listeners, volume I/O) alive on the core.
    pub tasks: u64,
    /// System calls into the core's ring (io_uring_enter), operations queued on it, and the
    /// socket sends and receives among them.
    pub ring_enters: u64,
    pub ring_ops: u64,
    pub sends: u64,
    pub recvs: u64,
    /// Heap allocations (and reallocations) made on the core's thread since it started: zero
    /// in a binary that does not count them (`ballast_ffi::alloc`).
    pub allocations: u64,
    /// Device operations naming a registered file, a registered buffer ([`crate::fixed`]);
    /// buffers registered over time and registrations refused; files and buffers registered
    /// now.
    pub fixed_file_ops: u64,
    pub fixed_buf_ops: u64,
    pub buf_registrations: u64,
    pub registration_failures: u64,
    pub files_registered: u64,
    pub bufs_registered: u64,
    /// Reads and writes the kernel did only in part, submitted again for their rest (a
    /// filesystem filling up, the file size limit, an interrupted transfer).
    pub short_transfers: u64,
    /// The core's payload-memory budget and its use.
    #[serde(flatten)]
    pub buffers: crate::pool::BudgetSnapshot,
    /// The latency histogram as buckets (for the metrics endpoint; not in `ballast stats`).
    #[serde(skip)]
    pub latency: LatencyBuckets,
    /// Per device (`DevInfo::stats_id`) and protocol: those with requests on this core.
    #[serde(skip)]
    pub devices: Vec<(u32, Proto, DevCounters)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_cumulative_and_sum_exactly() {
        let mut s = CoreStats::new(0);
        // 5 µs, 20 µs, 20 µs, 3 ms, 2 min (clamped to the 60 s maximum).
        for ns in [5_000, 20_000, 20_000, 3_000_000, 120_000_000_000] {
            s.record(0, Proto::Nbd, OpKind::Read, 4096, ns, true);
        }
        let b = s.snapshot().latency;
        assert_eq!(b.count, 5);
        assert_eq!(b.sum_ns, 5_000 + 40_000 + 3_000_000 + LATENCY_NS_MAX);
        let at = |bound: u64| {
            let i = LATENCY_BUCKET_BOUNDS_US.iter().position(|&x| x == bound).unwrap();
            b.cumulative[i]
        };
        assert_eq!(at(10), 1);
        assert_eq!(at(25), 3);
        assert_eq!(at(2_500), 3);
        assert_eq!(at(5_000), 4);
        assert_eq!(at(10_000_000), 4, "the 60 s request is only in +Inf");
        assert!(b.cumulative.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn devices_count_apart_and_only_those_with_requests_show() {
        let mut s = CoreStats::new(0);
        s.record(2, Proto::Nvmf, OpKind::Write, 8192, 1_000, true);
        s.record(2, Proto::Nvmf, OpKind::Read, 4096, 3_000, false);
        s.record(2, Proto::Nbd, OpKind::Read, 512, 7, true);
        s.record(5, Proto::Nbd, OpKind::Flush, 0, 10, true);
        s.record(DEVICES_MAX as u32 + 1, Proto::Nbd, OpKind::Read, 4096, 10, true);
        let snap = s.snapshot();
        assert_eq!(snap.reads, 3, "the core's totals count every device");
        let devs: Vec<(u32, Proto)> = snap.devices.iter().map(|(id, p, _)| (*id, *p)).collect();
        assert_eq!(
            devs,
            vec![(2, Proto::Nbd), (2, Proto::Nvmf), (5, Proto::Nbd)],
            "per protocol; ids beyond DEVICES_MAX are not counted apart"
        );
        let d2 = snap.devices[1].2;
        assert_eq!((d2.reads, d2.writes, d2.errors), (1, 1, 1));
        assert_eq!((d2.bytes_read, d2.bytes_written, d2.latency_ns_sum), (4096, 8192, 4_000));
        assert_eq!((snap.devices[0].2.reads, snap.devices[0].2.bytes_read), (1, 512));
        assert_eq!(snap.devices[2].2.flushes, 1);
    }

    #[test]
    fn in_flight_counts_submitted_requests_until_retired() {
        let mut s = CoreStats::new(0);
        for _ in 0..3 {
            s.submitted(4, Proto::Nvmf);
        }
        s.submitted(DEVICES_MAX as u32 + 1, Proto::Nbd);
        let snap = s.snapshot();
        assert_eq!(snap.in_flight, 4, "the core counts every device's requests");
        let three = DevCounters { in_flight: 3, ..Default::default() };
        assert_eq!(snap.devices, vec![(4, Proto::Nvmf, three)]);
        s.retired(4, Proto::Nvmf);
        s.record(4, Proto::Nvmf, OpKind::Read, 4096, 1_000, true);
        assert_eq!(s.snapshot().devices[0].2.in_flight, 2);
        s.retired(4, Proto::Nvmf);
        s.retired(4, Proto::Nvmf);
        s.retired(DEVICES_MAX as u32 + 1, Proto::Nbd);
        let snap = s.snapshot();
        assert_eq!((snap.in_flight, snap.totals().in_flight), (0, 0));
        assert_eq!(snap.devices[0].2.in_flight, 0, "the device still shows: it has a read");
    }

    #[test]
    #[should_panic(expected = "not submitted")]
    fn retiring_more_than_submitted_is_a_bug() {
        let mut s = CoreStats::new(0);
        s.submitted(1, Proto::Nbd);
        s.retired(2, Proto::Nbd);
    }

    #[test]
    #[should_panic(expected = "not submitted")]
    fn retiring_under_another_protocol_is_a_bug() {
        let mut s = CoreStats::new(0);
        s.submitted(1, Proto::Nbd);
        s.retired(1, Proto::Nvmf);
    }

    #[test]
    fn an_empty_histogram_has_empty_buckets() {
        let b = CoreStats::new(3).snapshot().latency;
        assert_eq!(b, LatencyBuckets::default());
    }
}
