//! Per-core counters and service-latency histograms.
//!
//! Owned by one core and only touched by it; the control plane gets copies through the core's
//! mailbox ([`crate::Msg::Stats`]), so nothing here is shared or locked.

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

pub struct CoreStats {
    pub core: usize,
    ops: [u64; OP_KINDS],
    errors: u64,
    bytes_read: u64,
    bytes_written: u64,
    latency_ns: Histogram<u64>,
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
        let _ = self.latency_ns.record(latency_ns.clamp(1, LATENCY_NS_MAX));
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
        }
    }
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
}
