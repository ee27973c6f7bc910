//! Per-core counters and service-latency histograms.
//!
//! Owned by one core and only touched by it; the control plane gets copies through the core's
//! mailbox ([`crate::Msg::Stats`]), so nothing here is shared or locked.
//!
//! Every counter and the histogram only grow (never reset): a snapshot is cumulative since the
//! core started, as Prometheus counters and histograms want them.

use hdrhistogram::Histogram;
use serde::Serialize;

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
    pub loops_busy: u64,
    /// Idle turns that spun (the polling policy expected work soon).
    pub spins: u64,
    pub sleeps: u64,
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
            loops_busy: 0,
            spins: 0,
            sleeps: 0,
        }
    }

    /// Records one finished request.
    pub fn record(&mut self, kind: OpKind, bytes: u64, latency_ns: u64, ok: bool) {
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
            loops_busy: self.loops_busy,
            spins: self.spins,
            sleeps: self.sleeps,
            tasks: 0,
            buffers: Default::default(),
            latency: self.latency_buckets(),
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
    pub loops_busy: u64,
    pub spins: u64,
    pub sleeps: u64,
    /// Tasks (connections, listeners, volume I/O) alive on the core.
    pub tasks: u64,
    /// The core's payload-memory budget and its use.
    #[serde(flatten)]
    pub buffers: crate::pool::BudgetSnapshot,
    /// The latency histogram as buckets (for the metrics endpoint; not in `ballast stats`).
    #[serde(skip)]
    pub latency: LatencyBuckets,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_cumulative_and_sum_exactly() {
        let mut s = CoreStats::new(0);
        // 5 µs, 20 µs, 20 µs, 3 ms, 2 min (clamped to the 60 s maximum).
        for ns in [5_000, 20_000, 20_000, 3_000_000, 120_000_000_000] {
            s.record(OpKind::Read, 4096, ns, true);
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
    fn an_empty_histogram_has_empty_buckets() {
        let b = CoreStats::new(3).snapshot().latency;
        assert_eq!(b, LatencyBuckets::default());
    }
}
