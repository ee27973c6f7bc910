//! Which families a commit visits. A family is *touched* between two seals when it holds
//! something the next seal takes: pending data records, frees, clusters fresh or whose
//! references changed since the last seal (`Family::touched`). Each touched family is listed
//! once per epoch (its own `listed` flag, set under its lock by the decision that touched it),
//! so sealing a commit (its records gathered in the same visit) and ending it visit the
//! families that changed, not every family of the pool: a pool of thousands of idle volumes
//! pays nothing per commit for them. And a commit's end visits only the families whose frees
//! it made durable: the others end it themselves at their next decision (`Family::catch_up`).
//! Pruning looks only at the families a deletion left with no volume (one goes once idle and
//! no tree it retired waits to be released).
//!
//! Invariants (asserted by `PoolMeta::check`): a family that is not listed is not touched;
//! `listed` is set exactly for the families on the list, each there once; sealed state belongs
//! to the commit in flight (which ends every family it frees clusters of) or to a durable
//! commit that freed nothing of the family's, ended at its next decision. A
//! family the pool borrows exclusively (a control operation, loading) is listed whatever it
//! did: such borrows are rare, and a clean family listed costs one visit. A clean family's I/O
//! epoch stays where it is across a commit: it freed nothing that its older I/O could still
//! touch, and whatever its quarantine holds is released by the I/O it waits for (`end_io`), as
//! before.

use super::*;

/// The families a commit visits, by number.
#[derive(Default)]
pub(super) struct Touched {
    /// Families touched since the last seal, in the order they were listed (each once: its
    /// `listed` flag). A leaf lock: taken while a family's lock is held, never the other way.
    listed: Mutex<Vec<u32>>,
    /// The families the commit in flight ends when it is durable: those it frees clusters of
    /// (empty with none in flight; the others end it themselves, `Family::catch_up`).
    sealed: Vec<u32>,
    /// Families a deletion left with no volume, until they are idle and go.
    emptied: BTreeSet<u32>,
}

impl PoolMeta {
    /// Families the next commit visits now (touched since the last seal).
    pub fn touched_families(&self) -> usize {
        self.touched.listed.lock().len()
    }

    /// A decision (under a shared borrow, `fam`'s lock held) is done with family `f`: listed
    /// for the next seal if it touched it.
    #[inline]
    pub(super) fn list_decided(&self, f: u32, fam: &mut Family) {
        if !fam.listed && fam.touched() {
            fam.listed = true;
            self.touched.listed.lock().push(f);
        }
    }

    /// Family `f` is borrowed exclusively: caught up with the durable commits, and listed for
    /// the next seal, whatever the borrow does.
    pub(super) fn list_borrowed(&mut self, f: u32) {
        if let Some(fam) = self.fams.get_mut(f) {
            fam.catch_up(self.durable_seals);
            if !fam.listed {
                fam.listed = true;
                self.touched.listed.get_mut().push(f);
            }
        }
    }

    /// Moves every touched family's pending records to the journal, in the order the families
    /// were listed (data records of different families commute: `log`): the barrier before a
    /// control record. A seal gathers in its own visit to each family (`seal_families`).
    pub(super) fn gather_pending(&mut self) {
        for &f in self.touched.listed.get_mut().iter() {
            let fam = self.fams.get_mut(f).expect("a listed family lives");
            self.journal.append_map_sets(&mut fam.pending);
        }
        *self.family_pending.get_mut() = 0;
    }

    /// Every touched family's changes so far become the commit's, its pending records moved
    /// to the journal (in the order the families were listed, as `gather_pending` does) in
    /// the same visit; returns how many clusters it frees (every live free is a family's: the
    /// allocator holds none pending once loaded).
    /// The families that free clusters are the commit's to end when it is durable (`sealed`);
    /// the others end it themselves at their next decision after that (`Family::catch_up`), so
    /// a commit's end under the exclusive borrow visits only them.
    pub(super) fn seal_families(&mut self) -> usize {
        assert_eq!(self.alloc.get_mut().pending_count(), 0, "live frees are the families'");
        assert_eq!(self.durable_seals + 1, self.seals, "sealing beside a commit in flight");
        assert!(self.touched.sealed.is_empty(), "the last commit's end visited its families");
        let (seal, durable) = (self.seals, self.durable_seals);
        let t = &mut self.touched;
        self.journal.expect_runs(t.listed.get_mut().len());
        let mut freed = 0;
        for &f in t.listed.get_mut().iter() {
            let fam = self.fams.get_mut(f).expect("a listed family lives");
            self.journal.append_map_sets(&mut fam.pending);
            fam.catch_up(durable);
            let frees = fam.freed.len();
            freed += frees;
            fam.seal_epoch();
            fam.sealed_at = seal;
            fam.listed = false;
            if frees > 0 {
                t.sealed.push(f);
            }
        }
        t.listed.get_mut().clear();
        *self.family_pending.get_mut() = 0;
        freed
    }

    /// The commit in flight, which sealed `frees` frees, is durable: the families it left to
    /// the pool move on, requests waiting for it proceed, and families left empty and idle go.
    pub(super) fn end_families(&mut self, frees: usize) {
        let mut sealed = 0;
        for &f in &self.touched.sealed {
            let fam = self.fams.get_mut(f).expect("a sealed family lives until its commit ends");
            sealed += fam.sealed_freed.len();
            let surplus = fam.commit_ended();
            self.alloc.get_mut().take_back(surplus);
        }
        self.touched.sealed.clear();
        assert_eq!(sealed, frees, "the families' sealed frees are the commit's");
        self.commit_waiters.commit_ended();
        self.prune_families();
    }

    /// Volume `id`, just deleted, was the last of family `f`: the family goes once idle.
    pub(super) fn family_emptied(&mut self, f: u32) {
        self.touched.emptied.insert(f);
    }

    /// Removes the emptied families with nothing in flight, waiting, quarantined or listed
    /// (their stocks back to the allocator), and the names of deleted volumes that led to them.
    fn prune_families(&mut self) {
        let fams = &mut self.fams;
        let retired = self.retired.get_mut();
        let mut gone = Vec::new();
        self.touched.emptied.retain(|&f| {
            let Some(fam) = fams.get_mut(f) else { return false };
            if !fam.volumes.is_empty() {
                return false;
            }
            if fam.idle_empty() && !fam.listed && !retired.iter().any(|t| t.family == f) {
                gone.push(f);
                return false;
            }
            true
        });
        if gone.is_empty() {
            return;
        }
        for f in gone {
            let mut fam = self.fams.remove(f).expect("an emptied family lives");
            self.alloc.get_mut().take_back(fam.stock.drain());
        }
        let fams = &mut self.fams;
        self.family_of.retain(|_, f| fams.get_mut(*f).is_some());
    }

    /// Loading ended: every family is durable and clean (none listed), and those left with no
    /// volume go.
    pub(super) fn touched_loaded(&mut self) {
        assert!(self.touched.sealed.is_empty(), "no commit while loading");
        self.touched.listed.get_mut().clear();
        for (f, fam) in self.fams.iter_mut() {
            fam.loaded();
            fam.listed = false;
            if fam.volumes.is_empty() {
                self.touched.emptied.insert(f);
            }
        }
        self.prune_families();
    }

    /// The lists' invariants over `fams` (every family, locked, in number order).
    pub(super) fn check_touched(&self, fams: &[(u32, MutexGuard<'_, Family>)]) -> Vec<String> {
        let mut problems = Vec::new();
        let listed = self.touched.listed.lock().clone();
        let on_list: HashSet<u32> = listed.iter().copied().collect();
        if on_list.len() != listed.len() {
            problems.push(format!("a family listed twice for the next seal: {listed:?}"));
        }
        let sealed: HashSet<u32> = self.touched.sealed.iter().copied().collect();
        if !self.committing && !sealed.is_empty() {
            problems.push(format!("families {sealed:?} sealed with no commit in flight"));
        }
        let in_flight = if self.committing { self.seals } else { 0 };
        let live: HashSet<u32> = fams.iter().map(|(f, _)| *f).collect();
        for (f, fam) in fams {
            let f = *f;
            if sealed.contains(&f) && fam.sealed_at != in_flight {
                problems.push(format!(
                    "family {f} is for the commit in flight to end, but was sealed by seal {}",
                    fam.sealed_at
                ));
            }
            if fam.listed != on_list.contains(&f) {
                problems.push(format!(
                    "family {f}: listed flag {} but {} the list",
                    fam.listed,
                    if on_list.contains(&f) { "on" } else { "not on" }
                ));
            }
            if !fam.listed && fam.touched() {
                problems.push(format!(
                    "family {f} changed since the last seal but is not listed: the next commit \
                     would miss it"
                ));
            }
            // Sealed state belongs to the commit in flight (which the pool ends for the family
            // when it frees clusters), or to a durable commit that freed nothing of the
            // family's, which it ends at its next decision.
            let behind = fam.behind(self.durable_seals);
            let fits = match fam.sealed_at {
                0 => !fam.holds_sealed(),
                at if at == in_flight => sealed.contains(&f) || fam.sealed_freed.is_empty(),
                _ => behind && fam.sealed_freed.is_empty(),
            };
            if !fits {
                problems.push(format!(
                    "family {f}: sealed state of seal {} does not fit (commit in flight: {}, \
                     durable seals {}, ended by the pool: {})",
                    fam.sealed_at,
                    in_flight,
                    self.durable_seals,
                    sealed.contains(&f)
                ));
            }
        }
        for f in listed.iter().chain(&self.touched.sealed).chain(&self.touched.emptied) {
            if !live.contains(f) {
                problems.push(format!("family {f} is listed but gone"));
            }
        }
        problems
    }
}
