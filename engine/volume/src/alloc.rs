//! The data-cluster allocator of a pool.
//!
//! Invariants:
//! - a cluster is in exactly one state: free, allocated, or pending-free (freed by a journal
//!   record that is not yet durable);
//! - a pending-free cluster is never handed out: a crash before its free is durable would
//!   otherwise leave two owners; `commit` (after the journal write) makes them free;
//! - cluster 0 is never handed out (a mapping entry of 0 means "unmapped");
//! - `alloc` fails only when no cluster is free: the caller turns that into ENOSPC / Capacity
//!   Exceeded for new allocations; overwrites of owned clusters never allocate.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Allocated,
    PendingFree,
}

pub struct Allocator {
    state: Vec<State>,
    free_count: u64,
    pending: Vec<u64>,
    /// Where the next search starts (spreads allocations, keeps `alloc` O(1) amortised).
    hint: u64,
}

impl Allocator {
    /// `clusters` clusters, all free except cluster 0.
    pub fn new(clusters: u64) -> Allocator {
        assert!(clusters >= 2, "a pool needs at least one usable cluster");
        let mut state = vec![State::Free; clusters as usize];
        state[0] = State::Allocated;
        Allocator { state, free_count: clusters - 1, pending: Vec::new(), hint: 1 }
    }

    pub fn clusters(&self) -> u64 {
        self.state.len() as u64
    }

    pub fn free_count(&self) -> u64 {
        self.free_count
    }

    /// Clusters in use (allocated or pending-free), cluster 0 excluded.
    pub fn used_count(&self) -> u64 {
        self.clusters() - 1 - self.free_count
    }

    /// Clusters freed and not yet sealed by a commit.
    pub fn pending_count(&self) -> u64 {
        self.pending.len() as u64
    }

    pub fn is_allocated(&self, cluster: u64) -> bool {
        self.state.get(cluster as usize) == Some(&State::Allocated)
    }

    /// A free cluster, now allocated; `None` when the pool is full.
    pub fn alloc(&mut self) -> Option<u64> {
        if self.free_count == 0 {
            return None;
        }
        let n = self.clusters();
        for step in 0..n {
            let c = (self.hint + step) % n;
            if self.state[c as usize] == State::Free {
                self.state[c as usize] = State::Allocated;
                self.free_count -= 1;
                self.hint = (c + 1) % n;
                return Some(c);
            }
        }
        unreachable!("free_count {} but no free cluster", self.free_count)
    }

    /// Marks a cluster allocated while rebuilding from the media (open, replay, check).
    pub fn mark_allocated(&mut self, cluster: u64) {
        let s = &mut self.state[cluster as usize];
        match *s {
            State::Free => self.free_count -= 1,
            // Freed and named again within one loaded block: never written by a sound pool
            // (reuse waits for a durable free), but damaged-yet-checksummed metadata must not
            // crash the daemon.
            State::PendingFree => self.pending.retain(|&c| c != cluster),
            State::Allocated => panic!("cluster {cluster} claimed twice"),
        }
        *s = State::Allocated;
    }

    /// Frees a cluster once the record freeing it is durable (see `commit`).
    pub fn free(&mut self, cluster: u64) {
        assert!(cluster != 0, "cluster 0 is never allocated");
        let s = &mut self.state[cluster as usize];
        assert_eq!(*s, State::Allocated, "freeing cluster {cluster} that is not allocated");
        *s = State::PendingFree;
        self.pending.push(cluster);
    }

    /// The journal records freeing the pending clusters are durable: they become reusable.
    pub fn commit(&mut self) -> usize {
        let sealed = self.seal();
        let n = sealed.len();
        self.release(&sealed);
        n
    }

    /// Takes the clusters freed so far (still pending) for a commit now starting; frees made
    /// after this call belong to the next commit.
    pub fn seal(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.pending)
    }

    /// Sealed clusters whose frees are durable (and that no in-flight I/O can still name)
    /// become reusable.
    pub fn release(&mut self, clusters: &[u64]) {
        for &c in clusters {
            let s = &mut self.state[c as usize];
            assert_eq!(*s, State::PendingFree, "cluster {c} released twice");
            *s = State::Free;
            self.free_count += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn full_pool_fails_only_new_allocations() {
        let mut a = Allocator::new(4);
        let got: Vec<u64> = (0..3).map(|_| a.alloc().unwrap()).collect();
        assert!(!got.contains(&0));
        assert_eq!(a.alloc(), None);
        a.free(got[0]);
        assert_eq!(a.alloc(), None, "a free that is not durable must not be reused");
        assert_eq!(a.commit(), 1);
        assert_eq!(a.alloc(), Some(got[0]));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn never_two_owners(ops in proptest::collection::vec(0u8..3, 1..300)) {
            let mut a = Allocator::new(16);
            let mut owned: Vec<u64> = Vec::new();
            let mut pending: HashSet<u64> = HashSet::new();
            for op in ops {
                match op {
                    0 => match a.alloc() {
                        Some(c) => {
                            prop_assert!(c != 0 && !owned.contains(&c) && !pending.contains(&c));
                            owned.push(c);
                        }
                        None => prop_assert_eq!(owned.len() + pending.len(), 15),
                    },
                    1 if !owned.is_empty() => {
                        let c = owned.swap_remove(0);
                        a.free(c);
                        pending.insert(c);
                    }
                    _ => {
                        a.commit();
                        pending.clear();
                    }
                }
                prop_assert_eq!(a.used_count() as usize, owned.len() + pending.len());
            }
        }
    }
}
