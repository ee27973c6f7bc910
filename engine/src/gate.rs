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
//! - writers that wait get their turn: while any waits ([`Waiting`], held from a write's
//!   first refusal until it goes or is dropped), no fence is raised within [`WRITERS_TURN`] of
//!   the last one's lift, so back-to-back fused commands cannot keep a device's writes out;
//! - a counter is never uncounted below zero (asserted); the data path costs one atomic add on
//!   a cache line of its core's own and one load while no fence is up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Shards of the counters (cores map onto them modulo this many): 1 KiB a device.
const SHARDS: usize = 16;

/// How often a connection's waiting writes (and fused pairs) look whether a fence moved: a
/// fence is up for one read and one write of at most ACWU blocks.
pub const FENCE_POLL: Duration = Duration::from_micros(50);

/// How long after a fence is lifted no other is raised while writes wait: they look again
/// every [`FENCE_POLL`], so each gets in within this.
pub const WRITERS_TURN: Duration = Duration::from_micros(4 * FENCE_POLL.as_micros() as u64);

/// A connection's fence poll: one timer at a time, armed while something of it waits.
#[derive(Debug, Default)]
pub struct FencePoll {
    armed: bool,
}

impl FencePoll {
    /// Arms the timer (completion `tag` on the connection's task) unless it is armed.
    pub fn arm(&mut self, cx: &mut crate::reactor::Cx<'_>, tag: u32) {
        if !self.armed {
            self.armed = true;
            cx.timer(tag, FENCE_POLL);
        }
    }

    /// The timer fired: it is no longer armed.
    pub fn fired(&mut self) {
        assert!(self.armed, "a fence poll fired that was not armed");
        self.armed = false;
    }

    /// Whether the timer is armed (a connection ends only once it is not).
    pub fn armed(&self) -> bool {
        self.armed
    }
}

/// One core's count of write-group commands executing on the device, on a line of its own.
#[repr(align(64))]
#[derive(Default)]
struct Shard(AtomicU64);

/// The write gate of one device (shared by every namespace and export made from it).
pub struct WriteGate {
    shards: [Shard; SHARDS],
    fenced: AtomicBool,
    /// Writes refused by a fence that have not gone yet.
    waiting: AtomicU64,
    /// When the last fence was lifted, in ns since `born` (0: never raised).
    lifted_ns: AtomicU64,
    born: Instant,
}

impl Default for WriteGate {
    fn default() -> WriteGate {
        WriteGate {
            shards: Default::default(),
            fenced: AtomicBool::new(false),
            waiting: AtomicU64::new(0),
            lifted_ns: AtomicU64::new(0),
            born: Instant::now(),
        }
    }
}

/// A write that a fence refused and that waits to go: counted among the gate's waiting writes
/// until dropped (when it goes, or is let go).
pub struct Waiting {
    gate: Arc<WriteGate>,
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waiting")
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let before = self.gate.waiting.fetch_sub(1, Ordering::SeqCst);
        assert!(before > 0, "a waiting write counted out twice");
    }
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

    /// A write refused by the fence waits (the caller keeps it until the write goes).
    pub fn wait(self: &Arc<Self>) -> Waiting {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting { gate: Arc::clone(self) }
    }

    /// Raises the fence for one fused command; `None` while another holds it, or while writes
    /// wait and the last fence was lifted less than [`WRITERS_TURN`] ago (their turn).
    pub fn try_fence(self: &Arc<Self>) -> Option<Fence> {
        self.try_fence_at(Instant::now())
    }

    fn try_fence_at(self: &Arc<Self>, now: Instant) -> Option<Fence> {
        let lifted = self.lifted_ns.load(Ordering::SeqCst);
        let since =
            (now.saturating_duration_since(self.born).as_nanos() as u64).saturating_sub(lifted);
        if lifted > 0
            && self.waiting.load(Ordering::SeqCst) > 0
            && since < WRITERS_TURN.as_nanos() as u64
        {
            return None;
        }
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
        let at = (self.gate.born.elapsed().as_nanos() as u64).max(1);
        self.gate.lifted_ns.store(at, Ordering::SeqCst);
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

    /// While a refused write waits, a fence is not raised again within WRITERS_TURN of the
    /// last lift (the write's turn); without one waiting, or after the turn, it is.
    #[test]
    fn waiting_writes_get_their_turn_between_fences() {
        let g = WriteGate::new();
        drop(g.try_fence().expect("the first fence"));
        assert!(g.try_fence().map(drop).is_some(), "nobody waits: at once");
        let f = g.try_fence().expect("a fence");
        assert!(g.enter(2).is_none(), "fenced");
        let w = g.wait();
        let lifted = Instant::now();
        drop(f);
        assert!(g.try_fence_at(lifted).is_none(), "a waiting write's turn");
        let t = g.enter(2).expect("its turn: it goes");
        drop(w);
        g.exit(t);
        assert!(g.try_fence_at(lifted).map(drop).is_some(), "no write waits any more");
        let w = g.wait();
        let later = Instant::now() + WRITERS_TURN;
        assert!(g.try_fence_at(later).map(drop).is_some(), "after its turn: fenced again");
        drop(w);
        assert_eq!(g.waiting.load(Ordering::SeqCst), 0);
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
