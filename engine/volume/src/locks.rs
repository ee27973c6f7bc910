//! The per-cluster lock table and its waiter queues: which volume clusters have writes, a
//! copy-on-write or a read-modify-write hold in flight, and which requests wait — for a
//! cluster, for a frozen volume to thaw, for the commit in flight to end, or (a control
//! operation) for a frozen volume's writes to drain.
//!
//! A request that cannot proceed is *parked*: its [`Waiter`] joins exactly one queue, under the
//! same borrow of the pool state as the check that refused it, so no wake-up can be lost. When
//! what it waits for changes (a writer or hold leaves the cluster, the volume thaws, the commit
//! ends, the pool fails) the whole queue moves to the woken list, which the driver drains after
//! every event ([`LockTable::take_woken`]) and hands to the requests: they plan again, and may
//! park again. Nothing is polled and no timer is involved.
//!
//! Invariants (asserted):
//! - a slot exists while it has writers, a hold, or waiters; it has writers or a hold whenever
//!   it has waiters (a waiter on a free cluster would never be woken);
//! - a copy-on-write slot has exactly one writer; a held slot's writers all belong to the
//!   holder (checked by the callers in `meta`, which know the hold tokens).

use rustc_hash::FxHashMap as HashMap;

/// A parked request's name, chosen by the driver (the daemon: core and task; the simulator:
/// its request number). Woken at most once per parking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Waiter(pub u64);

/// What a volume cluster has in flight.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClusterState {
    /// Planned write spans not yet finished.
    pub writers: u32,
    /// One of them is a copy-on-write into a fresh cluster.
    pub cow: bool,
    /// Held exclusively by a read-modify-write (its token; 0 = not held).
    pub held: u64,
}

impl ClusterState {
    fn idle(&self) -> bool {
        self.writers == 0 && self.held == 0
    }
}

#[derive(Default)]
struct Slot {
    state: ClusterState,
    waiters: Vec<Waiter>,
}

/// See the module header.
#[derive(Default)]
pub struct LockTable {
    slots: HashMap<(u32, u64), Slot>,
    thaw: HashMap<u32, Vec<Waiter>>,
    drain: HashMap<u32, Vec<Waiter>>,
    commit: Vec<Waiter>,
    woken: Vec<Waiter>,
}

impl LockTable {
    /// What cluster `vc` of volume `vol` has in flight.
    pub fn state(&self, vol: u32, vc: u64) -> ClusterState {
        self.slots.get(&(vol, vc)).map_or_else(ClusterState::default, |s| s.state)
    }

    /// Whether anything is in flight on the cluster.
    pub fn busy(&self, vol: u32, vc: u64) -> bool {
        !self.state(vol, vc).idle()
    }

    /// A write span starts on the cluster (`cow`: into a fresh cluster).
    pub fn add_writer(&mut self, vol: u32, vc: u64, cow: bool) {
        let s = self.slots.entry((vol, vc)).or_default();
        assert!(
            !s.state.cow || cfg!(feature = "mutant-skip-lock"),
            "a cluster being copied takes no other writer"
        );
        assert!(!cow || s.state.writers == 0, "a copy-on-write needs the cluster to itself");
        s.state.writers += 1;
        s.state.cow = cow;
    }

    /// A write span ended (finished or aborted): the cluster's waiters may proceed.
    pub fn remove_writer(&mut self, vol: u32, vc: u64) {
        let s = self.slots.get_mut(&(vol, vc)).expect("a planned write holds its cluster");
        assert!(s.state.writers > 0, "writer count underflow on volume {vol} cluster {vc}");
        s.state.writers -= 1;
        s.state.cow = false;
        self.changed(vol, vc);
    }

    /// A read-modify-write takes the cluster exclusively.
    pub fn hold(&mut self, vol: u32, vc: u64, token: u64) {
        assert!(token != 0);
        let s = self.slots.entry((vol, vc)).or_default();
        assert!(s.state.idle(), "holding a busy cluster");
        s.state.held = token;
    }

    /// The read-modify-write with `token` lets the cluster go.
    pub fn unhold(&mut self, vol: u32, vc: u64, token: u64) {
        let s = self.slots.get_mut(&(vol, vc)).expect("a hold keeps its slot");
        assert_eq!(s.state.held, token, "releasing a hold we do not own");
        s.state.held = 0;
        self.changed(vol, vc);
    }

    /// Wakes the cluster's waiters (something left it) and drops an idle slot.
    fn changed(&mut self, vol: u32, vc: u64) {
        let s = self.slots.get_mut(&(vol, vc)).expect("slot");
        self.woken.append(&mut s.waiters);
        if s.state.idle() {
            self.slots.remove(&(vol, vc));
        }
    }

    /// Parks `w` until something leaves the (busy) cluster.
    pub fn park_cluster(&mut self, vol: u32, vc: u64, w: Waiter) {
        let s = self.slots.get_mut(&(vol, vc)).expect("parking on a busy cluster");
        assert!(!s.state.idle(), "parking on an idle cluster would never wake");
        s.waiters.push(w);
    }

    /// Parks `w` until volume `vol` thaws.
    pub fn park_frozen(&mut self, vol: u32, w: Waiter) {
        self.thaw.entry(vol).or_default().push(w);
    }

    /// Volume `vol` thawed (or was deleted): its waiters proceed.
    pub fn thawed(&mut self, vol: u32) {
        if let Some(mut q) = self.thaw.remove(&vol) {
            self.woken.append(&mut q);
        }
    }

    /// Parks `w` until volume `vol` has no write in flight.
    pub fn park_drained(&mut self, vol: u32, w: Waiter) {
        self.drain.entry(vol).or_default().push(w);
    }

    /// Takes `w` back out of volume `vol`'s drain queue (its wait was given up); false when it
    /// is not there (already woken: its wake-up is on its way).
    pub fn unpark_drained(&mut self, vol: u32, w: Waiter) -> bool {
        let Some(q) = self.drain.get_mut(&vol) else { return false };
        let Some(i) = q.iter().position(|&x| x == w) else { return false };
        q.remove(i);
        if q.is_empty() {
            self.drain.remove(&vol);
        }
        true
    }

    /// Volume `vol`'s last write in flight ended (or the volume went).
    pub fn drained(&mut self, vol: u32) {
        if let Some(mut q) = self.drain.remove(&vol) {
            self.woken.append(&mut q);
        }
    }

    /// Parks `w` until the commit (or checkpoint) in flight ends.
    pub fn park_commit(&mut self, w: Waiter) {
        self.commit.push(w);
    }

    /// The commit in flight ended: its waiters proceed.
    pub fn commit_ended(&mut self) {
        self.woken.append(&mut self.commit);
    }

    /// Everyone waiting, for anything, proceeds (the pool failed: they will see it).
    pub fn wake_all(&mut self) {
        for s in self.slots.values_mut() {
            self.woken.append(&mut s.waiters);
        }
        for (_, mut q) in self.thaw.drain().chain(self.drain.drain()) {
            self.woken.append(&mut q);
        }
        self.woken.append(&mut self.commit);
    }

    /// Moves the woken waiters into `out` (in the order they were woken).
    pub fn take_woken(&mut self, out: &mut Vec<Waiter>) {
        out.append(&mut self.woken);
    }

    /// Requests parked now (all queues).
    pub fn parked(&self) -> usize {
        self.slots.values().map(|s| s.waiters.len()).sum::<usize>()
            + self.thaw.values().chain(self.drain.values()).map(Vec::len).sum::<usize>()
            + self.commit.len()
    }

    /// Requests woken and not yet taken.
    pub fn woken(&self) -> usize {
        self.woken.len()
    }

    /// Slots in use (clusters with something in flight).
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Checks the invariants; every breach found.
    pub fn check(&self) -> Vec<String> {
        let mut out = Vec::new();
        for ((vol, vc), s) in &self.slots {
            if s.state.idle() {
                out.push(format!("volume {vol} cluster {vc}: idle lock slot kept"));
            }
            if s.state.cow && s.state.writers != 1 {
                out.push(format!("volume {vol} cluster {vc}: copy-on-write with other writers"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiter_is_woken_once_when_the_last_writer_leaves_and_the_slot_goes() {
        let mut t = LockTable::default();
        t.add_writer(1, 7, false);
        t.add_writer(1, 7, false);
        t.park_cluster(1, 7, Waiter(42));
        let mut w = Vec::new();
        t.remove_writer(1, 7);
        t.take_woken(&mut w);
        assert_eq!(w, vec![Waiter(42)], "any change wakes: the waiter re-plans");
        t.remove_writer(1, 7);
        t.take_woken(&mut w);
        assert_eq!(w, vec![Waiter(42)], "woken once");
        assert_eq!(t.slots(), 0);
        assert!(t.check().is_empty());
    }

    #[test]
    fn holds_commit_and_thaw_queues_wake_their_own() {
        let mut t = LockTable::default();
        t.hold(2, 0, 5);
        t.park_cluster(2, 0, Waiter(1));
        t.park_frozen(3, Waiter(2));
        t.park_commit(Waiter(3));
        assert_eq!(t.parked(), 3);
        let mut w = Vec::new();
        t.commit_ended();
        t.take_woken(&mut w);
        assert_eq!(w, vec![Waiter(3)]);
        w.clear();
        t.thawed(3);
        t.unhold(2, 0, 5);
        t.take_woken(&mut w);
        assert_eq!(w, vec![Waiter(2), Waiter(1)]);
        assert_eq!(t.parked(), 0);
        assert_eq!(t.slots(), 0);
    }

    #[test]
    fn wake_all_empties_every_queue() {
        let mut t = LockTable::default();
        t.add_writer(1, 1, true);
        t.park_cluster(1, 1, Waiter(1));
        t.park_frozen(1, Waiter(2));
        t.park_commit(Waiter(3));
        t.wake_all();
        let mut w = Vec::new();
        t.take_woken(&mut w);
        w.sort_by_key(|w| w.0);
        assert_eq!(w, vec![Waiter(1), Waiter(2), Waiter(3)]);
        assert_eq!(t.slots(), 1, "the writer still holds its cluster");
    }

    #[test]
    #[should_panic(expected = "copy-on-write needs the cluster")]
    fn a_copy_on_write_beside_another_writer_is_refused() {
        let mut t = LockTable::default();
        t.add_writer(1, 1, false);
        t.add_writer(1, 1, true);
    }
}
