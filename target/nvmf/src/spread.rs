//! I/O queues spread evenly over the cores.
//!
//! The listener hands each connection to the next core, round-robin, before it knows what the
//! connection is. A host opens an admin queue and then its I/O queues, so with one I/O queue per
//! controller (or any odd number of queues per controller and two cores) round-robin puts every
//! I/O queue on the same cores and the admin queues, which carry almost nothing, on the others:
//! measured, two `ballast-perf` processes against `--cores 2` had both I/O queues on core 1.
//! So once its Connect names it an I/O queue, a queue whose device names no home core of its
//! own ([`ballast_engine::BlockDev::home_core`]) takes a [`Slot`] on the core serving the
//! fewest I/O queues (its own core on a tie: no move for nothing) and moves there.
//!
//! Invariant: `counts[c]` is the number of live [`Slot`]s on core `c` — a slot is counted at
//! [`Spread::take`], moved with [`Slot::rehome`] when its queue ends up elsewhere after all, and
//! given back when it drops. Touched at Connect and at a queue's end only, never per command.

use parking_lot::Mutex;
use std::sync::Arc;

/// The I/O queues each core serves (shared by every core; one short lock per Connect).
#[derive(Debug, Default)]
pub struct Spread {
    counts: Mutex<Vec<usize>>,
}

/// One I/O queue's place in [`Spread`]: counted on its core while it lives.
#[derive(Debug)]
pub struct Slot {
    spread: Arc<Spread>,
    core: usize,
}

impl Spread {
    /// Places an I/O queue connected on core `here` of `cores`: the core with the fewest I/O
    /// queues, `here` when it is among them (then the lowest-numbered one).
    pub fn take(self: &Arc<Self>, here: usize, cores: usize) -> Slot {
        assert!(here < cores, "core {here} of {cores}");
        let mut counts = self.counts.lock();
        if counts.len() < cores {
            counts.resize(cores, 0);
        }
        let fewest = counts[..cores].iter().copied().min().expect("at least one core");
        let core = if counts[here] == fewest {
            here
        } else {
            counts[..cores].iter().position(|&n| n == fewest).expect("the minimum is there")
        };
        counts[core] += 1;
        Slot { spread: Arc::clone(self), core }
    }

    /// Places an I/O queue on `core`, chosen by something else: its device's home, or the core
    /// it connected on when it cannot move.
    pub fn take_on(self: &Arc<Self>, core: usize) -> Slot {
        *at(&mut self.counts.lock(), core) += 1;
        Slot { spread: Arc::clone(self), core }
    }

    /// The I/O queues each core serves now.
    pub fn counts(&self) -> Vec<usize> {
        self.counts.lock().clone()
    }
}

impl Slot {
    /// The core this slot is counted on.
    pub fn core(&self) -> usize {
        self.core
    }

    /// Counts the queue on `core` instead: it ended up there (a move it could not make).
    pub fn rehome(&mut self, core: usize) {
        if core == self.core {
            return;
        }
        let mut counts = self.spread.counts.lock();
        assert!(counts[self.core] > 0, "a slot on core {} not counted there", self.core);
        counts[self.core] -= 1;
        *at(&mut counts, core) += 1;
        self.core = core;
    }
}

/// Core `core`'s count, the table grown to hold it.
fn at(counts: &mut Vec<usize>, core: usize) -> &mut usize {
    if counts.len() <= core {
        counts.resize(core + 1, 0);
    }
    &mut counts[core]
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.spread.counts.lock();
        assert!(counts[self.core] > 0, "a slot on core {} not counted there", self.core);
        counts[self.core] -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_go_to_the_core_with_fewest_and_stay_on_a_tie() {
        let s = Arc::new(Spread::default());
        // Admin queues on even cores, I/O queues arriving on odd ones (round-robin of pairs).
        let a = s.take(1, 2);
        assert_eq!(a.core(), 1, "a tie keeps the queue where it is");
        let b = s.take(1, 2);
        assert_eq!(b.core(), 0, "the second goes to the idle core");
        let c = s.take(0, 4);
        assert_eq!(c.core(), 2, "grown to four cores: the lowest idle one");
        assert_eq!(s.counts(), vec![1, 1, 1, 0]);
        drop(a);
        let d = s.take(3, 4);
        assert_eq!(d.core(), 3);
        let e = s.take(2, 4);
        assert_eq!(e.core(), 1, "core 1 lost its queue");
        assert_eq!(s.counts(), vec![1, 1, 1, 1]);
    }

    #[test]
    fn rehome_and_drop_keep_the_counts_exact() {
        let s = Arc::new(Spread::default());
        let mut a = s.take(0, 3);
        let b = s.take_on(2);
        a.rehome(1);
        assert_eq!(s.counts(), vec![0, 1, 1]);
        drop(a);
        drop(b);
        assert_eq!(s.counts(), vec![0, 0, 0]);
    }
}
