//! What control operations leave to do in steps, so that none does work proportional to a
//! volume's size under the exclusive borrow (every core's decisions wait for it): mapping
//! the clusters promised to thick volumes made or grown (`fill`), and releasing the trees
//! deletions and rollbacks retired (`release_retired`). A step ([`PoolMeta::settle`]) takes a
//! shared borrow, as the data path's decisions do, and locks one family at a time while it
//! spends its part of the budget: other families' decisions go on, the family's own wait
//! for one step at most.
//!
//! Invariants (asserted by `check`): every cluster promised is reserved in the allocator
//! (the volumes' `fill` sum to its reservation), so nobody else takes it; a thick volume
//! leaves unmapped no more clusters than it has promised; every volume with a promise is
//! queued (`filling`) until its promise is kept or given back; a retired tree is released
//! only once the record retiring it is durable.

use super::*;

/// Units a cluster mapped for a thick volume counts for in a step (looking at one counts
/// 1): a mapping (the tree set, a record, the fresh-cluster set) costs several times a
/// released reference (`ops::SETTLE_STEP`).
pub(super) const FILL_UNITS: usize = 8;

/// A volume with clusters promised and not yet mapped ([`Volume::fill`]): its family, and
/// the volume cluster a step looks from next (only a hint: whatever is mapped is skipped).
pub(super) struct Filling {
    pub(super) family: u32,
    pub(super) id: u32,
    pub(super) next: u64,
}

impl PoolMeta {
    /// Reserves `n` free clusters for thick volume `id`'s holes from volume cluster `from` on
    /// and queues it for [`Self::settle`] to map them (the caller made the room:
    /// `room_for`). Until then a write into one of them maps it first, from the same
    /// reservation (`fill_for_write`), so a thick volume's write never finds the pool full.
    pub(super) fn promise_holes(&mut self, id: u32, from: u64, n: u64) {
        if n == 0 {
            return;
        }
        assert!(self.alloc.get_mut().reserve(n), "room made for every promised cluster");
        let f = self.family_of[&id];
        let v = self.family_mut(id).and_then(|fam| fam.volumes.get_mut(&id));
        let v = v.expect("a volume promised clusters lives");
        let queued = v.fill > 0;
        v.fill += n;
        let queue = self.filling.get_mut();
        if queued {
            // Its walk looks from `from` again (a shrink and a growth may have made holes
            // behind it).
            for t in queue.iter_mut().filter(|t| t.family == f && t.id == id) {
                t.next = t.next.min(from);
            }
        } else {
            queue.push_back(Filling { family: f, id, next: from });
        }
    }

    /// Clusters promised to volume `id` and not yet mapped.
    pub(super) fn promised(&self, id: u32) -> u64 {
        self.family(id).and_then(|fam| fam.volumes.get(&id).map(|v| v.fill)).unwrap_or(0)
    }

    /// `n` of what was promised to volume `id` goes back to everyone (clusters it no longer
    /// has: a shrink's).
    pub(super) fn withdraw_promise(&mut self, id: u32, n: u64) {
        if let Some(v) = self.family_mut(id).and_then(|fam| fam.volumes.get_mut(&id)) {
            let n = n.min(v.fill);
            v.fill -= n;
            self.alloc.get_mut().unreserve(n);
        }
    }

    /// One step of what control operations left (`ops::settle` runs them until one finds
    /// nothing): about `budget` units of work in all — thick volumes' promised clusters
    /// mapped first (a cluster looked at 1, one mapped [`FILL_UNITS`]), then retired trees
    /// released (`Remains::release_some`: a node, an entry, a child each). What it maps is
    /// pending records, what it frees is freed, as a write's and a trim's are (durable with
    /// the next commit). Returns the units spent: 0 when nothing is left to do (retired
    /// trees whose records are not durable yet wait); a failed pool does nothing (`Failed`).
    pub fn settle(&self, budget: usize) -> Result<usize, PoolError> {
        self.ok()?;
        let mut spent = self.fill(budget);
        if spent < budget {
            spent += self.release_retired(budget - spent);
        }
        Ok(spent)
    }

    /// Trees retired and not yet released (durable or not).
    pub fn retired_trees(&self) -> usize {
        self.retired.lock().len()
    }

    /// Clusters promised to thick volumes and not yet mapped.
    pub fn promised_clusters(&self) -> u64 {
        self.alloc.lock().reserved()
    }

    /// Maps promised clusters, volume by volume in the order they were promised, each step a
    /// decision of the volume's family ([`Self::deciding_family`]).
    fn fill(&self, budget: usize) -> usize {
        let mut spent = 0;
        while spent < budget {
            let Some((f, id)) = self.filling.lock().front().map(|t| (t.family, t.id)) else {
                break;
            };
            let ours = |t: &Filling| t.family == f && t.id == id;
            // The units spent and whether the promise is over; `None` when another step took
            // the entry meanwhile. A family gone (or its slot another's since: ids are not
            // reused) finds no volume: over (its promise went back at its delete).
            let step = self.deciding_family(f, |fam, link| {
                // Read and moved under the family's lock: only a step holding it does.
                let from = self.filling.lock().front().filter(|t| ours(t)).map(|t| t.next)?;
                let take = |n| self.take_reserved(n);
                let (units, next, over) =
                    fam.fill_holes(id, from, None, budget - spent, take, link);
                match over {
                    Some(left) => self.alloc.lock().unreserve(left),
                    None => {
                        if let Some(t) = self.filling.lock().front_mut().filter(|t| ours(t)) {
                            t.next = next;
                        }
                    }
                }
                Some((units, over.is_some()))
            });
            let (units, over) = match step {
                Some(None) => continue,
                Some(Some(step)) => step,
                None => (1, true),
            };
            spent += units;
            if over {
                let mut queue = self.filling.lock();
                if queue.front().is_some_and(ours) {
                    queue.pop_front();
                }
            }
        }
        spent
    }

    /// `n` reserved clusters, allocated (a volume's promise holds them).
    fn take_reserved(&self, n: usize) -> Vec<u64> {
        let mut alloc = self.alloc.lock();
        (0..n).map(|_| alloc.alloc_reserved()).collect()
    }

    /// A write into volume `id` (its family locked by the caller's decision) maps the
    /// promised clusters of volume clusters `[from, to)` it lands in first, from the
    /// volume's reservation: a thick volume being mapped writes in place, never short of
    /// room. Its records are the family's pending ones, counted by the decision.
    pub(super) fn fill_for_write(
        &self,
        fam: &mut Family,
        link: &mut Link,
        id: u32,
        from: u64,
        to: u64,
    ) {
        // A write that will be refused (read-only) or parked (frozen) maps nothing.
        if fam.volumes.get(&id).is_none_or(|v| v.fill == 0 || v.read_only || v.frozen > 0) {
            return;
        }
        let take = |n| self.take_reserved(n);
        let (_, _, over) = fam.fill_holes(id, from, Some(to), usize::MAX, take, link);
        // Within a range, the promise is over only when nothing of it is left.
        debug_assert!(over.is_none_or(|left| left == 0), "a write's range gives nothing back");
    }

    /// Releases the trees deletions and rollbacks retired, once their records are durable
    /// (`Family::retire_tree`), oldest first: about `budget` units (`Remains::release_some`),
    /// each tree's family locked only while it spends its part. What it frees is freed as a
    /// trim's frees are (durable with the next commit, then quarantined behind the family's
    /// older I/O). Returns the units spent: 0 when nothing durable is left to release.
    fn release_retired(&self, budget: usize) -> usize {
        let durable = self.durable_seals;
        // A mutant for the simulator's own test (tests/e2e/sim_mutants.sh): retired trees
        // released before their records are durable.
        let ready = if cfg!(feature = "mutant-reclaim-early") { u64::MAX } else { durable };
        let mut spent = 0;
        let mut released = Vec::new();
        while spent < budget {
            let f = match self.retired.lock().front() {
                Some(t) if t.seal <= ready => t.family,
                _ => break,
            };
            let step = self.deciding_family(f, |fam, link| {
                {
                    // Looked at again under the family's lock: another step may have taken it.
                    let mut queue = self.retired.lock();
                    let t = queue.front_mut().filter(|t| t.family == f && t.seal <= ready)?;
                    spent +=
                        t.remains.release_some(budget - spent, |e| released.extend(e.cluster()));
                    if t.remains.is_empty() {
                        queue.pop_front();
                    }
                }
                for c in released.drain(..) {
                    fam.unref(c, link);
                }
                Some(())
            });
            assert!(step.is_some(), "a family lives while a tree it retired waits");
        }
        spent
    }
}
