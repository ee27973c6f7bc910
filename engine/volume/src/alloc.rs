//! The data-cluster allocator of a pool.
//!
//! Invariants:
//! - a cluster is in exactly one state: free, allocated, or pending-free (freed by a journal
//!   record that is not yet durable);
//! - a pending-free cluster is never handed out: a crash before its free is durable would
//!   otherwise leave two owners; `commit` (after the journal write) makes them free;
//! - cluster 0 is never handed out (a mapping entry of 0 means "unmapped");
//! - `alloc` fails only when no cluster is free: the caller turns that into ENOSPC / Capacity
//!   Exceeded for new allocations; overwrites of owned clusters never allocate;
//! - a cluster lent to an owner's [`Stock`] (`lend`) counts as allocated here until it comes
//!   back (`take_back`): while lent, only that owner decides what happens to it.

/// Clusters per bitmap word.
const WORD: u64 = 64;

/// A set of clusters as a two-level bitmap: a bit per cluster, and a summary bit per word that
/// has any bit set, so finding the next member from any point skips 4,096 empty clusters per
/// summary word looked at (a 1 TiB pool of 64 KiB clusters: at most 4,096 words to look at,
/// against 16 M entries for a flat scan).
struct Bits {
    words: Vec<u64>,
    summary: Vec<u64>,
}

impl Bits {
    fn new(clusters: u64) -> Bits {
        let words = clusters.div_ceil(WORD) as usize;
        Bits { words: vec![0; words], summary: vec![0; words.div_ceil(WORD as usize)] }
    }

    /// Every cluster in `[1, clusters)`.
    fn all_but_zero(clusters: u64) -> Bits {
        let mut b = Bits::new(clusters);
        b.words.fill(!0);
        if !clusters.is_multiple_of(WORD) {
            *b.words.last_mut().expect("a word") = (1 << (clusters % WORD)) - 1;
        }
        b.words[0] &= !1;
        let words = b.words.len();
        b.summary.fill(!0);
        if !(words as u64).is_multiple_of(WORD) {
            *b.summary.last_mut().expect("a word") = (1 << (words as u64 % WORD)) - 1;
        }
        if b.words[0] == 0 {
            b.summary[0] &= !1;
        }
        b
    }

    /// Room for `clusters` clusters; the new ones are not members.
    fn grow(&mut self, clusters: u64) {
        let words = clusters.div_ceil(WORD) as usize;
        assert!(words >= self.words.len(), "a set never shrinks");
        self.words.resize(words, 0);
        self.summary.resize(words.div_ceil(WORD as usize), 0);
    }

    /// Adds every cluster in `[from, to)`, a word at a time.
    fn insert_range(&mut self, from: u64, to: u64) {
        let mut c = from;
        while c < to {
            let w = (c / WORD) as usize;
            let lo = c % WORD;
            let hi = (to - w as u64 * WORD).min(WORD);
            let mask = if hi - lo == WORD { !0 } else { ((1u64 << (hi - lo)) - 1) << lo };
            self.words[w] |= mask;
            self.summary[w / WORD as usize] |= 1 << (w as u64 % WORD);
            c = w as u64 * WORD + hi;
        }
    }

    fn contains(&self, c: u64) -> bool {
        self.words.get((c / WORD) as usize).is_some_and(|w| w & (1 << (c % WORD)) != 0)
    }

    fn insert(&mut self, c: u64) {
        let w = (c / WORD) as usize;
        self.words[w] |= 1 << (c % WORD);
        self.summary[w / WORD as usize] |= 1 << (w as u64 % WORD);
    }

    fn remove(&mut self, c: u64) {
        let w = (c / WORD) as usize;
        self.words[w] &= !(1 << (c % WORD));
        if self.words[w] == 0 {
            self.summary[w / WORD as usize] &= !(1 << (w as u64 % WORD));
        }
    }

    /// The first member at or after `from`, not wrapping.
    fn next_from(&self, from: u64) -> Option<u64> {
        let w = (from / WORD) as usize;
        let here = *self.words.get(w)? & (!0u64 << (from % WORD));
        if here != 0 {
            return Some(w as u64 * WORD + u64::from(here.trailing_zeros()));
        }
        // The next word with a member, through the summary.
        let next = w + 1;
        let mut s = next / WORD as usize;
        let mut mask = if next.is_multiple_of(WORD as usize) {
            !0u64
        } else {
            !0u64 << (next % WORD as usize)
        };
        while s < self.summary.len() {
            let bits = self.summary[s] & mask;
            if bits != 0 {
                let word = s * WORD as usize + bits.trailing_zeros() as usize;
                let b = self.words[word];
                debug_assert!(b != 0, "summary names an empty word");
                return Some(word as u64 * WORD + u64::from(b.trailing_zeros()));
            }
            s += 1;
            mask = !0;
        }
        None
    }
}

pub struct Allocator {
    clusters: u64,
    /// Free clusters (reusable now).
    free: Bits,
    /// Pending-free clusters (freed by a record that is not yet durable); the rest are
    /// allocated.
    pending_set: Bits,
    free_count: u64,
    pending: Vec<u64>,
    /// Where the next search starts (spreads allocations over the pool).
    hint: u64,
    /// Free clusters promised to thick volumes whose clusters are being mapped in steps
    /// (`reserve`): nobody else gets them (`free_count` leaves them out); `alloc_reserved`
    /// hands them out. At most the free clusters.
    reserved: u64,
}

impl Allocator {
    /// `clusters` clusters, all free except cluster 0.
    pub fn new(clusters: u64) -> Allocator {
        assert!(clusters >= 2, "a pool needs at least one usable cluster");
        Allocator {
            clusters,
            free: Bits::all_but_zero(clusters),
            pending_set: Bits::new(clusters),
            free_count: clusters - 1,
            pending: Vec::new(),
            hint: 1,
            reserved: 0,
        }
    }

    pub fn clusters(&self) -> u64 {
        self.clusters
    }

    /// The pool grew to `clusters` clusters (its superblock says so, durably): the new ones
    /// are free.
    pub fn grow(&mut self, clusters: u64) {
        assert!(clusters >= self.clusters, "a pool never shrinks");
        self.free.grow(clusters);
        self.pending_set.grow(clusters);
        self.free.insert_range(self.clusters, clusters);
        self.free_count += clusters - self.clusters;
        self.clusters = clusters;
    }

    /// Free clusters anyone may have (the reserved ones left out).
    pub fn free_count(&self) -> u64 {
        self.free_count - self.reserved
    }

    /// Clusters in use (allocated, pending-free or reserved), cluster 0 excluded.
    pub fn used_count(&self) -> u64 {
        self.clusters() - 1 - self.free_count()
    }

    /// Free clusters reserved (`reserve`) and not yet handed out.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Keeps `n` free clusters for whoever reserved them (`alloc_reserved`): false, nothing
    /// reserved, when fewer are free.
    pub fn reserve(&mut self, n: u64) -> bool {
        if self.free_count() < n {
            return false;
        }
        self.reserved += n;
        true
    }

    /// Gives `n` reserved clusters back to everyone.
    pub fn unreserve(&mut self, n: u64) {
        assert!(n <= self.reserved, "unreserving {n} of {} reserved clusters", self.reserved);
        self.reserved -= n;
    }

    /// A reserved cluster, now allocated (the caller holds a reservation of it).
    pub fn alloc_reserved(&mut self) -> u64 {
        assert!(self.reserved > 0, "no cluster reserved");
        self.reserved -= 1;
        self.alloc().expect("a reserved cluster is free")
    }

    /// Clusters freed and not yet sealed by a commit.
    pub fn pending_count(&self) -> u64 {
        self.pending.len() as u64
    }

    pub fn is_allocated(&self, cluster: u64) -> bool {
        cluster < self.clusters
            && !self.free.contains(cluster)
            && !self.pending_set.contains(cluster)
    }

    /// The first free cluster at or after the hint (wrapping), now allocated; `None` when the
    /// pool is full.
    pub fn alloc(&mut self) -> Option<u64> {
        if self.free_count() == 0 {
            return None;
        }
        let c = self.free.next_from(self.hint).or_else(|| self.free.next_from(0));
        let c =
            c.unwrap_or_else(|| unreachable!("free_count {} but no free cluster", self.free_count));
        self.free.remove(c);
        self.free_count -= 1;
        self.hint = (c + 1) % self.clusters;
        Some(c)
    }

    /// Marks a cluster allocated while rebuilding from the media (open, replay, check).
    pub fn mark_allocated(&mut self, cluster: u64) {
        if self.free.contains(cluster) {
            self.free.remove(cluster);
            self.free_count -= 1;
        } else if self.pending_set.contains(cluster) {
            // Freed and named again within one loaded block: never written by a sound pool
            // (reuse waits for a durable free), but damaged-yet-checksummed metadata must not
            // crash the daemon.
            self.pending_set.remove(cluster);
            self.pending.retain(|&c| c != cluster);
        } else {
            panic!("cluster {cluster} claimed twice");
        }
    }

    /// Frees a cluster once the record freeing it is durable (see `commit`).
    pub fn free(&mut self, cluster: u64) {
        assert!(cluster != 0, "cluster 0 is never allocated");
        assert!(self.is_allocated(cluster), "freeing cluster {cluster} that is not allocated");
        self.pending_set.insert(cluster);
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

    /// Lends up to `n` free clusters to `stock` (fewer when fewer are free); returns how many.
    /// The stock hands them out in ascending order, as `alloc` would have.
    pub fn lend(&mut self, n: u64, stock: &mut Stock) -> u64 {
        let start = stock.clusters.len();
        for _ in 0..n {
            let Some(c) = self.alloc() else { break };
            stock.clusters.push(c);
        }
        stock.clusters[start..].reverse();
        (stock.clusters.len() - start) as u64
    }

    /// Clusters lent (or allocated) that are free again: reusable by anyone.
    pub fn take_back(&mut self, clusters: impl IntoIterator<Item = u64>) {
        for c in clusters {
            assert!(c != 0 && self.is_allocated(c), "taking back cluster {c}, which is not lent");
            self.free.insert(c);
            self.free_count += 1;
        }
    }

    /// Sealed clusters whose frees are durable (and that no in-flight I/O can still name)
    /// become reusable.
    pub fn release(&mut self, clusters: &[u64]) {
        for &c in clusters {
            assert!(self.pending_set.contains(c), "cluster {c} released twice");
            self.pending_set.remove(c);
            self.free.insert(c);
            self.free_count += 1;
        }
    }
}

/// Free clusters the pool's allocator lent one owner (a family): only that owner hands them
/// out, so taking a fresh cluster for a write needs no pool state. Refilled from the allocator
/// when short (`Allocator::lend`), topped up by what the owner itself frees once that is
/// reusable, and given back beyond [`Stock::MAX`] or when the pool runs short elsewhere.
#[derive(Default)]
pub struct Stock {
    /// Popped from the end.
    clusters: Vec<u64>,
}

impl Stock {
    /// Clusters a refill asks for at least: one pool visit per this many fresh clusters.
    pub const BATCH: u64 = 32;
    /// Clusters a stock keeps at most of those its owner freed; the rest go back to the pool.
    pub const MAX: usize = 2 * Self::BATCH as usize;

    pub fn len(&self) -> u64 {
        self.clusters.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }

    /// A cluster to use now.
    pub fn take(&mut self) -> Option<u64> {
        self.clusters.pop()
    }

    /// Keeps a reusable cluster of the owner's if there is room; otherwise returns it (for the
    /// pool).
    pub fn keep(&mut self, c: u64) -> Option<u64> {
        if self.clusters.len() >= Self::MAX {
            return Some(c);
        }
        self.clusters.push(c);
        None
    }

    /// Everything in it, for the pool to take back.
    pub fn drain(&mut self) -> impl Iterator<Item = u64> + '_ {
        self.clusters.drain(..)
    }

    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.clusters.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    /// The allocator's contract as the simplest code: one state per cluster, a linear scan
    /// from the hint (what the allocator was before its bitmaps).
    struct Naive {
        free: Vec<bool>,
        hint: u64,
    }

    impl Naive {
        fn alloc(&mut self) -> Option<u64> {
            let n = self.free.len() as u64;
            let c = (0..n).map(|k| (self.hint + k) % n).find(|&c| self.free[c as usize])?;
            self.free[c as usize] = false;
            self.hint = (c + 1) % n;
            Some(c)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// The same clusters in the same order as the linear scan, across word and summary
        /// boundaries (sizes around 64 and 4,096 clusters), with frees released in batches and
        /// the pool growing by up to 150 clusters at a time.
        #[test]
        fn bitmaps_pick_what_a_scan_picks(
            clusters in prop_oneof![2u64..200, 4000u64..4300, 8190u64..8200],
            ops in proptest::collection::vec((0u8..5, any::<u64>()), 1..400),
        ) {
            let mut a = Allocator::new(clusters);
            let mut naive = Naive { free: (0..clusters).map(|c| c != 0).collect(), hint: 1 };
            let mut owned: Vec<u64> = Vec::new();
            let mut sealed: Vec<u64> = Vec::new();
            for (op, r) in ops {
                match op {
                    0 | 1 => {
                        let got = a.alloc();
                        prop_assert_eq!(got, naive.alloc());
                        owned.extend(got);
                    }
                    2 if !owned.is_empty() => {
                        let c = owned.swap_remove((r % owned.len() as u64) as usize);
                        a.free(c);
                        prop_assert!(!a.is_allocated(c));
                    }
                    4 => {
                        let more = r % 150;
                        a.grow(a.clusters() + more);
                        naive.free.extend(std::iter::repeat_n(true, more as usize));
                        prop_assert_eq!(a.clusters(), naive.free.len() as u64);
                    }
                    _ => {
                        a.release(&sealed);
                        for &c in &sealed {
                            naive.free[c as usize] = true;
                        }
                        sealed = a.seal();
                    }
                }
                let free = naive.free.iter().filter(|&&f| f).count() as u64;
                prop_assert_eq!(a.free_count(), free);
            }
        }
    }

    #[test]
    fn a_grown_allocator_hands_out_each_new_cluster_once() {
        let mut a = Allocator::new(70);
        let first: Vec<u64> = std::iter::from_fn(|| a.alloc()).collect();
        assert_eq!(first.len(), 69);
        a.grow(5000);
        assert_eq!((a.free_count(), a.clusters()), (4930, 5000));
        let mut more: Vec<u64> = std::iter::from_fn(|| a.alloc()).collect();
        more.sort_unstable();
        assert_eq!(more, (70..5000).collect::<Vec<_>>(), "every new cluster, once");
        assert_eq!(a.used_count(), 4999);
    }

    #[test]
    fn full_scan_is_bounded_by_the_summary() {
        // 4 TiB of 64 KiB clusters, all allocated but the one just behind the hint: the search
        // looks at 16 K summary words, not at 64 M clusters (a flat scan takes tens of ms).
        let n = 1u64 << 26;
        let mut a = Allocator::new(n);
        a.free = Bits::new(n);
        a.free.insert(5);
        a.free_count = 1;
        a.hint = 6;
        let t = std::time::Instant::now();
        assert_eq!(a.alloc(), Some(5));
        assert_eq!(a.alloc(), None);
        // ~16 K summary words take microseconds; a flat scan of 64 M clusters, tens of ms.
        assert!(t.elapsed() < std::time::Duration::from_millis(20), "{:?}", t.elapsed());
    }

    /// Reserved clusters are nobody else's: not counted free, not allocated nor lent to
    /// anyone else, handed out only by `alloc_reserved`; a reservation past what is free is
    /// refused whole; what is unreserved is everyone's again.
    #[test]
    fn reserved_clusters_go_only_to_whoever_reserved_them() {
        let mut a = Allocator::new(10);
        assert!(!a.reserve(10), "9 free: 10 refused");
        assert_eq!(a.reserved(), 0);
        assert!(a.reserve(6));
        assert_eq!((a.free_count(), a.used_count(), a.reserved()), (3, 6, 6));
        let mut s = Stock::default();
        assert_eq!(a.lend(9, &mut s), 3, "only the unreserved are lent");
        assert_eq!(a.alloc(), None, "nor allocated");
        let c = a.alloc_reserved();
        assert!(a.is_allocated(c) && a.reserved() == 5);
        assert_eq!((a.free_count(), a.used_count()), (0, 9));
        a.unreserve(5);
        assert_eq!((a.free_count(), a.reserved()), (5, 0));
        assert!(a.alloc().is_some());
    }

    #[test]
    fn lent_clusters_are_allocated_until_taken_back() {
        let mut a = Allocator::new(10);
        let mut s = Stock::default();
        assert_eq!(a.lend(4, &mut s), 4);
        assert_eq!((a.free_count(), a.used_count()), (5, 4));
        let order: Vec<u64> = std::iter::from_fn(|| s.take()).collect();
        assert_eq!(order, [1, 2, 3, 4], "a stock hands clusters out in ascending order");
        assert!(order.iter().all(|&c| a.is_allocated(c)));
        assert_eq!(a.lend(9, &mut s), 5, "lends what is free, no more");
        a.take_back(s.drain());
        a.take_back(order);
        assert_eq!(a.free_count(), 9);
        for c in 1..Stock::MAX as u64 {
            assert_eq!(s.keep(c), None);
        }
        assert_eq!(s.keep(99), None);
        assert_eq!(s.keep(100), Some(100), "a stock keeps at most Stock::MAX");
    }

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
