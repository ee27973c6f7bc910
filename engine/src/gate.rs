//! A device's write gate: what makes an NVMe fused Compare and Write atomic with respect to
//! every other write to the device, from any queue on any core.
//!
//! Every write-group command (write, write zeroes, deallocate) counts itself on its core's
//! shard ([`WriteGate::enter`]) before it goes to the media and uncounts itself once it is done
//! ([`WriteGate::exit`]). A fused Compare and Write raises the gate's one fence
//! ([`WriteGate::try_fence`]), waits until no counted write is left ([`WriteGate::drained`]),
//! then reads, compares and writes alone; writes arriving meanwhile wait (they find the fence
//! and count nothing) until the fence is lifted ([`Fence`] dropped).
//!
//! Invariants:
//! - a writer counts itself and then looks at the fence; the fencer raises the fence and then
//!   sums the counters (all `SeqCst`): either the writer sees the fence and backs out, or the
//!   fencer sees its count and waits for it — no write reaches the media between a fenced
//!   compare and its write;
//! - at most one fence per gate at a time (fused commands on one device run one after another);
//!   a fence is lifted when its [`Fence`] is dropped, whatever became of its commands;
//! - a counter is never uncounted below zero (asserted); the data path costs one atomic add on
//!   a cache line of its core's own and one load while no fence is up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Shards of the counters (cores map onto them modulo this many): 1 KiB a device.
const SHARDS: usize = 16;

/// One core's count of write-group commands executing on the device, on a line of its own.
#[repr(align(64))]
#[derive(Default)]
struct Shard(AtomicU64);

/// The write gate of one device (shared by every namespace and export made from it).
#[derive(Default)]
pub struct WriteGate {
    shards: [Shard; SHARDS],
    fenced: AtomicBool,
}

/// A write counted by [`WriteGate::enter`]: handed back to [`WriteGate::exit`] when done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a counted write must be handed back to WriteGate::exit"]
pub struct GateTicket {
    shard: u16,
}

/// The gate's fence, held by one fused command: lifted when dropped.
pub struct Fence {
    gate: Arc<WriteGate>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fence")
    }
}

impl WriteGate {
    pub fn new() -> Arc<WriteGate> {
        Arc::new(WriteGate::default())
    }

    /// A write-group command about to go to the media from `core`: counted, unless a fence
    /// is up (`None`: nothing counted; try again once [`WriteGate::fenced`] says no).
    pub fn enter(&self, core: usize) -> Option<GateTicket> {
        let shard = core % SHARDS;
        let counter = &self.shards[shard].0;
        counter.fetch_add(1, Ordering::SeqCst);
        if self.fenced.load(Ordering::SeqCst) {
            counter.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(GateTicket { shard: shard as u16 })
    }

    /// The write counted by `enter` is done.
    pub fn exit(&self, t: GateTicket) {
        let before = self.shards[usize::from(t.shard)].0.fetch_sub(1, Ordering::SeqCst);
        assert!(before > 0, "a write left its device's gate twice");
    }

    /// Whether a fence is up now (writes wait).
    pub fn fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Raises the fence for one fused command; `None` while another holds it.
    pub fn try_fence(self: &Arc<Self>) -> Option<Fence> {
        self.fenced
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| Fence { gate: Arc::clone(self) })
    }

    /// Whether no counted write is executing (once fenced: none will start until lifted).
    pub fn drained(&self) -> bool {
        self.shards.iter().all(|s| s.0.load(Ordering::SeqCst) == 0)
    }

    /// Writes counted now, all cores together (for tests and statistics).
    pub fn executing(&self) -> u64 {
        self.shards.iter().map(|s| s.0.load(Ordering::SeqCst)).sum()
    }
}

impl Fence {
    /// Whether the writes that were executing when the fence went up are all done.
    pub fn drained(&self) -> bool {
        self.gate.drained()
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        let was = self.gate.fenced.swap(false, Ordering::SeqCst);
        assert!(was, "a fence lifted twice");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn a_fence_refuses_new_writes_and_waits_for_those_counted() {
        let g = WriteGate::new();
        let a = g.enter(3).expect("no fence: counted");
        let b = g.enter(19).expect("no fence: counted");
        assert_eq!(g.executing(), 2);
        let f = g.try_fence().expect("no other fence");
        assert!(g.try_fence().is_none(), "one fence at a time");
        assert!(g.enter(0).is_none(), "a fenced gate counts no new write");
        assert_eq!(g.executing(), 2, "the refused write left nothing counted");
        assert!(!f.drained());
        g.exit(a);
        assert!(!f.drained(), "one write still executes");
        g.exit(b);
        assert!(f.drained());
        drop(f);
        assert!(!g.fenced());
        let c = g.enter(0).expect("lifted: counted again");
        g.exit(c);
        assert_eq!(g.executing(), 0);
    }

    #[test]
    #[should_panic(expected = "left its device's gate twice")]
    fn a_write_uncounted_twice_is_caught() {
        let g = WriteGate::new();
        let t = g.enter(1).expect("counted");
        g.exit(t);
        g.exit(t);
    }

    /// Threads write a shared cell (read, then store two more) only as counted writers; a
    /// fencer, between rounds in which writers got in, reads the cell under its fence and
    /// looks again later. Had a counted writer reached the cell between the fencer's drain and
    /// its lift, the value would move under the fence.
    #[test]
    fn no_counted_write_overlaps_a_drained_fence() {
        let g = WriteGate::new();
        let cell = Arc::new(AtomicU32::new(0));
        let writes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for core in 0..3 {
            let (g, cell, writes, stop) =
                (Arc::clone(&g), Arc::clone(&cell), Arc::clone(&writes), Arc::clone(&stop));
            writers.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match g.enter(core) {
                        Some(t) => {
                            let v = cell.load(Ordering::SeqCst);
                            std::hint::spin_loop();
                            cell.store(v.wrapping_add(2), Ordering::SeqCst);
                            g.exit(t);
                            writes.fetch_add(1, Ordering::SeqCst);
                        }
                        None => std::thread::yield_now(),
                    }
                }
            }));
        }
        for _ in 0..500 {
            // Writers get in between fences.
            let before = writes.load(Ordering::SeqCst);
            while writes.load(Ordering::SeqCst) == before {
                std::thread::yield_now();
            }
            let f = g.try_fence().expect("the only fencer");
            while !f.drained() {
                std::hint::spin_loop();
            }
            let v = cell.load(Ordering::SeqCst);
            std::thread::yield_now();
            assert_eq!(cell.load(Ordering::SeqCst), v, "a write reached the cell under a fence");
            drop(f);
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().expect("writer");
        }
        assert_eq!(g.executing(), 0);
    }
}
