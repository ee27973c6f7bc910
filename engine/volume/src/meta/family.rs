//! A family's part of the pool state: its volumes and their trees, the lock table, the I/O
//! epochs and the quarantine of freed clusters, the sets that decide in place vs
//! copy-on-write, and its data records pending for the next commit. Every per-I/O decision
//! (`plan_read`, `plan_write`, `finish_span`, `trim`) touches only this part plus a [`Link`]
//! to the pool.
//!
//! A family is a volume with its snapshots and clones (a `VolumeCreate` starts one; a
//! `Snapshot` or `Clone` joins its source's): clusters are only ever shared inside one. The
//! pool holds its families beside the pool part (`PoolMeta`: superblock, allocator, journal,
//! reference counts, configuration, commit pipeline, health), each family behind a lock of its
//! own ([`Families`]): the data path decides under a shared borrow of the pool state, locking
//! the one family it decides for; the pool's own steps borrow it exclusively and reach every
//! family without contention. This is a step of per-family ownership (docs/VOLUMES.md): what a
//! family takes from the pool is exactly what [`Link`] carries.
//!
//! A family takes fresh clusters from its own [`Stock`], which the pool's allocator lends it
//! in batches; what it frees stays its own (freed → sealed → quarantined → back in its stock,
//! beyond `Stock::MAX` back to the pool). So a live write's decisions touch no pool state but
//! the reference counts; the pool is visited to refill a short stock and to take clusters
//! back.
//!
//! Invariants (asserted by `PoolMeta::check` and the commit path): the lock table is
//! consistent; every cluster the pool lent a family is exactly one of: in its stock, the fresh
//! cluster of a write span in flight, named by its trees or by a tree it retired (on the pool's
//! queue until released: `retire_tree`), freed since the last seal (`freed`),
//! freed by the commit in flight (`sealed_freed`), or quarantined; a cluster a family frees is
//! reused only when its record is durable and the family's I/O older than that has ended (only
//! a family's own I/O touches its clusters).

use std::sync::atomic::{AtomicU32, Ordering};

use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, MutexGuard};

use super::*;

/// What a family's decisions take from the pool: the reference counts, shared (a family reads
/// and writes only the counts of its own clusters), and, only while the pool is being loaded,
/// its allocator: loaded records are durable, so what they free is free at the end of the
/// block that freed it, and what they name is taken from the pool directly. Live, under the
/// pool's exclusive borrow, `retire` is where a record's retired tree goes
/// ([`Family::retire_tree`]).
pub(super) struct Link<'a> {
    pub(super) refs: &'a Refs,
    pub(super) loading: Option<&'a mut Allocator>,
    pub(super) retire: Option<Retire<'a>>,
}

/// The pool's queue of retired trees, as a live record of family `family` reaches it: what
/// it retires joins the queue, to be released once `seal` (the seal the record joins: the
/// pool's seals so far, plus one) is durable.
pub(super) struct Retire<'a> {
    pub(super) queue: &'a mut VecDeque<Retiree>,
    pub(super) family: u32,
    pub(super) seal: u64,
}

/// A tree no volume names any more (a deleted volume's, a rolled-back volume's old one): its
/// family, the seal whose durability lets it go, and the nodes it still holds
/// (`PoolMeta::settle` releases them in steps).
pub(super) struct Retiree {
    pub(super) family: u32,
    pub(super) seal: u64,
    pub(super) remains: Remains,
}

/// Reference counts, one per cluster: the distinct leaves naming it. Each entry is read and
/// written only by the family owning the cluster (the pool while loading), so families can
/// share the array with no lock: atomics make the sharing sound, and plain (`Relaxed`) loads
/// and stores suffice because whatever hands a family from one thread to another orders its
/// accesses (the family's own lock) — and whatever hands a cluster from one family to another
/// (freed to a count of 0, then lent to another family through the allocator) must order them
/// too, as the allocator's lock does. An entry is never updated by two owners at once, so a
/// load then a store is an exact update (no read-modify-write instruction on the data path).
pub(super) struct Refs(Box<[AtomicU32]>);

impl Refs {
    pub(super) fn new(clusters: u64) -> Refs {
        Refs((0..clusters).map(|_| AtomicU32::new(0)).collect())
    }

    #[inline]
    pub(super) fn get(&self, cluster: u64) -> u32 {
        self.0[cluster as usize].load(Ordering::Relaxed)
    }

    #[inline]
    fn set(&self, cluster: u64, count: u32) {
        self.0[cluster as usize].store(count, Ordering::Relaxed)
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// Room for `clusters` clusters; the new ones have no references.
    pub(super) fn grow(&mut self, clusters: u64) {
        let old = std::mem::take(&mut self.0).into_vec();
        assert!(clusters as usize >= old.len(), "a pool never shrinks");
        let mut counts = old;
        counts.resize_with(clusters as usize, || AtomicU32::new(0));
        self.0 = counts.into_boxed_slice();
    }

    /// Every count, by cluster.
    pub(super) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().map(|r| r.load(Ordering::Relaxed))
    }
}

/// Where clusters are on the media: fixed at format, one copy in the pool and in each family.
#[derive(Clone, Copy)]
pub(super) struct Geometry {
    pub(super) cluster_bytes: u64,
    /// Pool byte offset of cluster 0.
    data_offset: u64,
}

impl Geometry {
    pub(super) fn of(sb: &Superblock) -> Geometry {
        Geometry {
            cluster_bytes: 1u64 << sb.cluster_shift,
            data_offset: sb.data_start * BLOCK_SIZE as u64,
        }
    }

    pub(super) fn cluster_offset(&self, cluster: u64) -> u64 {
        self.data_offset + cluster * self.cluster_bytes
    }
}

/// Laid out in declaration order (`repr(C)`): what a seal and a commit's end read and write
/// of a family comes first, together — five cache lines of the (cache-line aligned) slot, not
/// fields scattered over all eight — so a commit visiting thousands of families misses less.
#[repr(C)]
pub(super) struct Family {
    /// The seal (the pool's count) that made the sealed sets, 0 when they are empty: a
    /// commit that freed nothing of the family's is ended by the family itself, at its next
    /// decision after the commit is durable (`catch_up`), not by the pool under its exclusive
    /// borrow.
    pub(super) sealed_at: u64,
    /// The family's data records (`MapSet`) since the last seal or control record, applied, in
    /// the order they were made (`PoolMeta::log` says why that is the only order that matters).
    pub(super) pending: Vec<Record>,
    /// Clusters this family's records freed since the last seal, and those the commit in
    /// flight carries.
    pub(super) freed: Vec<u64>,
    pub(super) sealed_freed: Vec<u64>,
    /// Clusters allocated since the last seal (no durable state names them).
    pub(super) epoch_fresh: HashSet<u64>,
    /// Older clusters whose references changed since the last seal.
    pub(super) epoch_touched: HashSet<u64>,
    /// The same two sets as the last seal left them: the commit in flight's, or a durable
    /// commit's that the family has not ended yet (`sealed_at`, `catch_up`).
    pub(super) sealed_fresh: HashSet<u64>,
    pub(super) sealed_touched: HashSet<u64>,
    /// The current I/O epoch (one per durable commit), the I/O in flight per epoch (oldest
    /// first, no epoch with none; a few entries: an I/O that empties it frees nothing), and the
    /// clusters freed by each durable commit waiting for the I/O older than it to end.
    pub(super) io_epoch: u64,
    pub(super) inflight: Vec<(u64, u32)>,
    pub(super) quarantine: VecDeque<(u64, Vec<u64>)>,
    /// On the pool's list of families the next seal visits (`touched`).
    pub(super) listed: bool,
    /// Fresh clusters of write spans in flight (allocated, mapped when the span finishes);
    /// bounded by the requests in flight. Beside `listed`: the two share eight bytes.
    pub(super) fresh_inflight: u32,
    pub(super) geo: Geometry,
    pub(super) volumes: BTreeMap<u32, Volume>,
    pub(super) locks: LockTable,
    pub(super) next_hold: u64,
    /// Free clusters lent by the pool, for this family's fresh clusters.
    pub(super) stock: Stock,
}

/// Sets of clusters a family keeps room in between epochs: at most this many entries' worth
/// (its four sets ~2.5 KiB in all), so a family that once took a burst of writes does not
/// hold its memory while idle; an epoch with more fresh or touched clusters allocates.
const SET_ROOM_KEPT: usize = 64;

/// Empties `set`, keeping its room for the next epoch up to [`SET_ROOM_KEPT`] entries.
fn empty_keeping_room(set: &mut HashSet<u64>) {
    if set.capacity() > SET_ROOM_KEPT {
        *set = HashSet::default();
    } else {
        set.clear();
    }
}

impl Family {
    pub(super) fn new(geo: Geometry) -> Family {
        Family {
            geo,
            volumes: BTreeMap::new(),
            locks: LockTable::default(),
            next_hold: 0,
            epoch_fresh: HashSet::default(),
            epoch_touched: HashSet::default(),
            sealed_fresh: HashSet::default(),
            sealed_touched: HashSet::default(),
            fresh_inflight: 0,
            io_epoch: 0,
            inflight: Vec::new(),
            quarantine: VecDeque::new(),
            freed: Vec::new(),
            sealed_freed: Vec::new(),
            pending: Vec::new(),
            stock: Stock::default(),
            listed: false,
            sealed_at: 0,
        }
    }

    /// Holds something the next seal takes: pending records, frees, clusters fresh or touched
    /// since the last seal.
    #[inline]
    pub(super) fn touched(&self) -> bool {
        !self.pending.is_empty()
            || !self.freed.is_empty()
            || !self.epoch_fresh.is_empty()
            || !self.epoch_touched.is_empty()
    }

    /// Holds what a seal left: for the commit in flight, or for a durable one not yet ended.
    pub(super) fn holds_sealed(&self) -> bool {
        !self.sealed_freed.is_empty()
            || !self.sealed_fresh.is_empty()
            || !self.sealed_touched.is_empty()
    }

    /// Nothing in it and nothing in flight or waiting: it can go (its stock back to the pool).
    pub(super) fn idle_empty(&self) -> bool {
        self.volumes.is_empty()
            && self.inflight.is_empty()
            && self.quarantine.is_empty()
            && self.fresh_inflight == 0
            && self.freed.is_empty()
            && self.sealed_freed.is_empty()
            && self.pending.is_empty()
            && self.locks.slots() == 0
            && self.locks.parked() == 0
            && self.locks.woken() == 0
    }

    pub(super) fn volume(&self, id: u32) -> Result<&Volume, PoolError> {
        self.volumes.get(&id).ok_or(PoolError::NoVolume(id))
    }

    pub(super) fn cluster_offset(&self, cluster: u64) -> u64 {
        self.geo.cluster_offset(cluster)
    }

    pub(super) fn span(&self, at: u64, end: u64) -> Span {
        let vc = at / self.geo.cluster_bytes;
        let cluster_end = ((vc + 1) * self.geo.cluster_bytes).min(end);
        let first_bit = (at % self.geo.cluster_bytes) / PIECE;
        let pieces = (cluster_end - at) / PIECE;
        let bits = (((1u32 << pieces) - 1) << first_bit) as u16;
        Span { vc, cluster_end, first_bit, bits }
    }

    /// Whether volume `id` has a piece written at or after byte `offset`: the walk follows
    /// what is mapped there (stopping at the first written piece), not the range's size.
    pub(super) fn written_from(&self, id: u32, offset: u64) -> bool {
        let Some(v) = self.volumes.get(&id) else { return false };
        let first = offset / self.geo.cluster_bytes;
        // The first cluster's pieces before `offset` do not count.
        let before = (offset % self.geo.cluster_bytes) / PIECE;
        let first_mask = u16::MAX << before;
        let found = v.tree.first_from(first, |vc, e| {
            e.written() & if vc == first { first_mask } else { u16::MAX } != 0
        });
        found.is_some()
    }

    /// Whether 4 KiB piece `piece` of volume `id` holds written data.
    pub(super) fn piece_written(&self, id: u32, piece: u64) -> bool {
        let Some(v) = self.volumes.get(&id) else { return false };
        let at = piece * PIECE;
        let e = v.tree.get(at / self.geo.cluster_bytes);
        e.cluster().is_some() && e.written() & (1 << ((at % self.geo.cluster_bytes) / PIECE)) != 0
    }

    /// Runs of `[offset, offset + len)` (clamped to volume `id`'s size) where `id` may read
    /// differently from volume `base` of this family: (start, length, changed), in order,
    /// adjacent runs merged, at 4 KiB granularity; the first `max` of them (the walk stops
    /// there). A piece is unchanged where it is written in neither (both read zeros) or
    /// written in both from the same pool cluster (a cluster two trees name is never written
    /// in place: both read the same bytes); anything else may differ and is reported changed
    /// — a cluster copied on write counts whole (its copied pieces too), as a dirty bitmap
    /// does at its granularity. `None` if either volume is not in this family. Cost follows
    /// the mapping the two no longer share.
    pub(super) fn changes(
        &self,
        id: u32,
        base: u32,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Option<Vec<(u64, u64, bool)>> {
        let (v, b) = (self.volumes.get(&id)?, self.volumes.get(&base)?);
        let end = offset.saturating_add(len).min(v.size_bytes);
        if end <= offset {
            return Some(Vec::new());
        }
        let cb = self.geo.cluster_bytes;
        let mut runs = PieceRuns::new(offset, end, cb);
        v.tree.differences_in(&b.tree, offset / cb, end.div_ceil(cb), |vc, mine, theirs| {
            let changed = |bit: u64| {
                let (wm, wt) =
                    (mine.written() & (1 << bit) != 0, theirs.written() & (1 << bit) != 0);
                wm != wt || (wm && mine.cluster() != theirs.cluster())
            };
            runs.cluster(vc, changed, max)
        });
        Some(runs.finish(max))
    }

    /// Written runs of `[offset, offset + len)` of volume `id` (see `PoolMeta::allocation`).
    pub(super) fn allocation(
        &self,
        id: u32,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Vec<(u64, u64, bool)> {
        let Some(v) = self.volumes.get(&id) else { return Vec::new() };
        let end = offset.saturating_add(len).min(v.size_bytes);
        let cb = self.geo.cluster_bytes;
        let mut runs = PieceRuns::new(offset, end, cb);
        for (vc, e) in v.tree.entries_in(offset / cb, end.div_ceil(cb)) {
            if !runs.cluster(vc, |bit| e.written() & (1 << bit) != 0, max) {
                break;
            }
        }
        runs.finish(max)
    }

    /// How far entry `e` at volume cluster `vc` of `tree` (this family's) is its volume's own:
    /// `(alone, owned)` — no other leaf or volume names its cluster; and, besides, its sharing
    /// did not change since the last durable commit, so a write may land in it in place (a
    /// crash cannot bring back a sharing it no longer has). Unmapped: neither.
    pub(super) fn ownership(&self, tree: &Tree, vc: u64, e: Entry, refs: &Refs) -> (bool, bool) {
        let Some(c) = e.cluster() else { return (false, false) };
        let alone = refs.get(c) == 1 && !tree.leaf_shared(vc);
        // The touched sets are looked up only for a cluster alone (a write's common case).
        let owned = alone && !self.epoch_touched.contains(&c) && !self.sealed_touched.contains(&c);
        (alone, owned)
    }

    /// Whether a copy-up ([`WriteKind::Own`]) copies entry `e` at `vc` of `tree`: mapped and
    /// not alone — with `in_place`, not owned ([`Self::ownership`]).
    pub(super) fn copied_up(
        &self,
        tree: &Tree,
        vc: u64,
        e: Entry,
        in_place: bool,
        refs: &Refs,
    ) -> bool {
        let (alone, owned) = self.ownership(tree, vc, e, refs);
        e.cluster().is_some() && !if in_place { owned } else { alone }
    }

    pub(super) fn touch(&mut self, cluster: u64) {
        if !self.epoch_fresh.contains(&cluster) && !self.sealed_fresh.contains(&cluster) {
            self.epoch_touched.insert(cluster);
        }
    }

    fn add_ref(&mut self, cluster: u64, link: &mut Link) {
        self.touch(cluster);
        let n = link.refs.get(cluster);
        if n == 0 {
            // Live, a cluster gets its first reference only as a write's fresh cluster, lent
            // already; a loaded record may name any cluster.
            if let Some(alloc) = link.loading.as_deref_mut() {
                if !alloc.is_allocated(cluster) {
                    alloc.mark_allocated(cluster);
                }
            }
        }
        link.refs.set(cluster, n + 1);
    }

    fn drop_ref(&mut self, cluster: u64, link: &mut Link) {
        self.touch(cluster);
        self.unref(cluster, link);
    }

    /// Drops a reference without touching the cluster: for a tree whose retirement is durable
    /// (or loading), which no crash can bring back, so the sharing it ends is the durable one.
    pub(super) fn unref(&mut self, cluster: u64, link: &mut Link) {
        let n = link.refs.get(cluster);
        assert!(n > 0, "cluster {cluster} released more than referenced");
        link.refs.set(cluster, n - 1);
        if n == 1 {
            self.free(cluster, link);
        }
    }

    /// Frees a cluster of this family's: pending until the record freeing it is durable (kept
    /// by the family, in `freed`), or, while loading durable records, pending in the pool's
    /// allocator until the loaded block ends.
    pub(super) fn free(&mut self, cluster: u64, link: &mut Link) {
        match link.loading.as_deref_mut() {
            Some(alloc) => alloc.free(cluster),
            None => self.freed.push(cluster),
        }
    }

    /// A tree no volume names any more (deleted, rolled back away, replaced by replayed
    /// damage). Loading, every record is durable: released at once. Live, it joins the pool's
    /// queue of retired trees whole (`link.retire`), to be released in steps once the seal its
    /// record joins is durable (`PoolMeta::settle`), so the borrow that retired it costs
    /// nothing per cluster. Kept whole, its nodes stay shared: no cluster it names takes an
    /// in-place write meanwhile — which a crash bringing the tree back would see over its
    /// data, even in a leaf another tree holds (whose owner looks alone once this one is gone:
    /// found by the simulator) or a cluster fresh in the commit in flight (which may share it
    /// with a snapshot that commit creates: found by a review). Once the retirement is durable
    /// no crash brings it back: what its release ends is sharing the durable state no longer
    /// has, so its clusters are not touched ([`Self::unref`]).
    pub(super) fn retire_tree(&mut self, tree: Tree, link: &mut Link) {
        self.retire(tree.into_remains(), link);
    }

    /// What a tree no longer holds, as [`Self::retire_tree`] retires a whole tree: a shrunk
    /// volume's leaves beyond its new end (`Tree::cut_from`).
    pub(super) fn retire(&mut self, mut remains: Remains, link: &mut Link) {
        if let Some(r) = &mut link.retire {
            debug_assert!(r.queue.back().is_none_or(|t| t.seal <= r.seal), "out of seal order");
            if !remains.is_empty() {
                r.queue.push_back(Retiree { family: r.family, seal: r.seal, remains });
            }
            return;
        }
        assert!(link.loading.is_some(), "a tree is released at once only while loading");
        let mut released = Vec::new();
        remains.release_some(usize::MAX, |e| released.extend(e.cluster()));
        for c in released {
            self.unref(c, link);
        }
    }

    /// Maps volume `id`'s unmapped clusters from volume cluster `from` on — up to `to` (a
    /// write's range) or to the volume's end — to clusters its promise holds
    /// ([`Volume::fill`], taken with `take(n)`): each a `MapSet` of a fresh cluster with
    /// nothing written (its pieces read zeros), within about `budget` units (a cluster looked
    /// at 1, one mapped `FILL_UNITS`). Returns the units spent, the volume cluster to look
    /// from next, and, once the promise is over — nothing of it is left, or (with no `to`)
    /// a walk from the start reached the volume's end (a walk from further on that does
    /// looks from the start once more), or the volume is gone — `Some` of what was left of it
    /// (its promise now 0), for the caller to give back to the allocator.
    pub(super) fn fill_holes(
        &mut self,
        id: u32,
        from: u64,
        to: Option<u64>,
        budget: usize,
        take: impl FnOnce(usize) -> Vec<u64>,
        link: &mut Link,
    ) -> (usize, u64, Option<u64>) {
        let Some(v) = self.volumes.get(&id) else { return (1, from, Some(0)) };
        let end = v.size_bytes.div_ceil(self.geo.cluster_bytes);
        let stop = to.map_or(end, |t| t.min(end));
        let mut holes = Vec::new();
        let (mut vc, mut spent) = (from, 0);
        while vc < stop && spent < budget && (holes.len() as u64) < v.fill {
            if v.tree.get(vc).cluster().is_none() {
                holes.push(vc);
                spent += super::settle::FILL_UNITS;
            } else {
                spent += 1;
            }
            vc += 1;
        }
        if !holes.is_empty() {
            let clusters = take(holes.len());
            for (&vcluster, c) in holes.iter().zip(clusters) {
                self.epoch_fresh.insert(c);
                let entry = Entry::new(c, 0).0;
                self.log(Record::MapSet { volume: id, vcluster, entry }, link);
            }
        }
        let v = self.volumes.get_mut(&id).expect("looked at above");
        v.fill -= holes.len() as u64;
        if v.fill == 0 {
            return (spent.max(1), vc, Some(0));
        }
        if to.is_none() && vc >= end {
            // At the end with some of the promise left: a thick volume has as many holes as
            // it was promised, so one left behind the walk is looked for from the start once
            // more; a walk from the start that finds none left gives the rest back (a thin
            // volume's, or what a shrink left).
            if from > 0 && v.thick {
                return (spent.max(1), 0, None);
            }
            return (spent.max(1), vc, Some(std::mem::take(&mut v.fill)));
        }
        (spent.max(1), vc, None)
    }

    /// Applies one record about volumes already in this family (`MapSet`, `Rollback` within
    /// the family, `Delete`, `Resize`, `ReadOnly`, `Thick`, `Decouple`; the pool places creations, snapshots and
    /// clones). Records naming volumes that do not exist are ignored (idempotence).
    pub(super) fn apply(&mut self, r: &Record, link: &mut Link) {
        match r {
            Record::MapSet { volume, vcluster, entry } => {
                let Some(v) = self.volumes.get_mut(volume) else { return };
                if *vcluster >= v.tree.capacity() {
                    return;
                }
                let mut copied = Vec::new();
                let old = v.tree.set(*vcluster, Entry(*entry), |leaf| {
                    copied.extend(leaf.iter().filter_map(|e| e.cluster()));
                });
                v.written_pieces = v.written_pieces - u64::from(old.written().count_ones())
                    + u64::from(Entry(*entry).written().count_ones());
                for c in copied {
                    self.add_ref(c, link);
                }
                let new = Entry(*entry).cluster();
                // The same cluster with other written pieces (a write's new pieces, a trim, a
                // thick volume's pieces cleared) changes no sharing: not touched, so the
                // cluster still takes in-place writes this epoch (a thick volume's never need
                // a fresh cluster). Its durable entry names it in the same slot, and reads
                // follow the written bits, so a crash shows each piece as before or after.
                if new != old.cluster() {
                    if let Some(c) = new {
                        self.add_ref(c, link);
                    }
                    if let Some(c) = old.cluster() {
                        self.drop_ref(c, link);
                    }
                }
            }
            Record::Rollback { id, to } => {
                let Some(snap) = self.volumes.get(to) else { return };
                let (tree, size, written) =
                    (snap.tree.clone(), snap.size_bytes, snap.written_pieces);
                let Some(v) = self.volumes.get_mut(id) else { return };
                let old = std::mem::replace(&mut v.tree, tree);
                v.size_bytes = size;
                v.thick = false; // its clusters are the snapshot's too
                v.written_pieces = written;
                self.retire_tree(old, link);
            }
            Record::Delete { id } => {
                if let Some(v) = self.volumes.remove(id) {
                    // Whoever waits for it to thaw or drain proceeds now, and finds it gone.
                    self.locks.thawed(*id);
                    self.locks.drained(*id);
                    self.retire_tree(v.tree, link);
                }
            }
            Record::Resize { id, size_bytes } => {
                let clusters = size_bytes.div_ceil(self.geo.cluster_bytes).max(1);
                let Some(v) = self.volumes.get_mut(id) else { return };
                // Nothing stays mapped beyond the new end (a snapshot or clone loaded as a
                // copy of its parent's tree, then this, drops what the parent mapped out there
                // since): what the end's leaf maps beyond it is unmapped entry by entry (freed
                // as a trim's frees are), the leaves after it are cut away whole and retired
                // as a deleted tree is — so a shrink costs the exclusive borrow a leaf and
                // the walk counting what was written beyond, nothing per cluster released.
                let whole = clusters.next_multiple_of(FANOUT as u64);
                let edge = v.tree.entries_in(clusters, whole.min(v.tree.capacity()));
                let (mut beyond, mut gone) = (false, 0u64);
                v.tree.for_each_in(whole, u64::MAX, |_, e| {
                    beyond = true;
                    gone += u64::from(e.written().count_ones());
                });
                // Nothing mapped past it (a growth, mostly): the tree is left as it is (a cut
                // would make the path's shared nodes its own for nothing).
                let cut = if beyond { v.tree.cut_from(whole) } else { Remains::default() };
                v.written_pieces -= gone;
                v.tree.grow(clusters);
                v.size_bytes = *size_bytes;
                for (vc, _) in edge {
                    let unmap =
                        Record::MapSet { volume: *id, vcluster: vc, entry: Entry::UNMAPPED.0 };
                    self.apply(&unmap, link);
                }
                self.retire(cut, link);
            }
            Record::ReadOnly { id } => {
                if let Some(v) = self.volumes.get_mut(id) {
                    v.read_only = true;
                }
            }
            Record::Thick { id } => {
                if let Some(v) = self.volumes.get_mut(id) {
                    v.thick = true;
                }
            }
            Record::Decouple { id } => {
                if let Some(v) = self.volumes.get_mut(id) {
                    v.parent = 0;
                }
            }
            Record::Rename { id, name } => {
                if let Some(v) = self.volumes.get_mut(id) {
                    v.name.clone_from(name);
                }
            }
            Record::VolumeCreate { .. }
            | Record::Snapshot { .. }
            | Record::Clone { .. }
            | Record::Config { .. }
            | Record::ReclaimProgress { .. } => {
                unreachable!("the pool applies {r:?}, not a family")
            }
        }
    }

    /// Applies a record of the family's and queues it for the next commit (the pool counts
    /// what its calls queued).
    pub(super) fn log(&mut self, r: Record, link: &mut Link) {
        assert!(matches!(r, Record::MapSet { .. }), "a family logs data records only");
        self.apply(&r, link);
        self.pending.push(r);
    }

    /// Everything loaded is durable: no cluster is fresh or touched since a seal.
    pub(super) fn loaded(&mut self) {
        self.epoch_fresh.clear();
        self.epoch_touched.clear();
        self.freed.clear();
    }

    /// A commit (or checkpoint) seals the changes so far: the fresh and touched clusters of
    /// this epoch become the commit's.
    ///
    /// The sets trade places: the sealed ones, empty by now, keep their room (up to
    /// [`SET_ROOM_KEPT`] entries) for the next epoch, which then allocates nothing to begin.
    pub(super) fn seal_epoch(&mut self) {
        assert!(self.sealed_freed.is_empty(), "sealing beside a commit in flight");
        assert!(
            self.sealed_fresh.is_empty() && self.sealed_touched.is_empty(),
            "sealing before the last commit's sets were ended"
        );
        std::mem::swap(&mut self.sealed_fresh, &mut self.epoch_fresh);
        std::mem::swap(&mut self.sealed_touched, &mut self.epoch_touched);
        self.sealed_freed = std::mem::take(&mut self.freed);
    }

    /// The sealed commit is durable: its clusters are durable state now, and what it freed
    /// waits in quarantine for the I/O older than it; returns what the stock does not keep of
    /// what became reusable, for the pool's allocator.
    pub(super) fn commit_ended(&mut self) -> Vec<u64> {
        self.sealed_at = 0;
        empty_keeping_room(&mut self.sealed_fresh);
        empty_keeping_room(&mut self.sealed_touched);
        let frees = std::mem::take(&mut self.sealed_freed);
        if !frees.is_empty() {
            self.quarantine.push_back((self.io_epoch, frees));
        }
        self.io_epoch += 1;
        self.release_quarantine()
    }

    /// Ends the commit that sealed the family if it is durable (`durable`: the pool's durable
    /// seals) and the pool left its end to the family (it freed nothing): before any decision
    /// looks at the sealed sets. It makes nothing reusable: a quarantine that is not empty
    /// waits for an I/O in flight as old as its oldest entry (the last `end_io` before it
    /// released everything else), and ending a commit that freed nothing leaves that so.
    #[inline]
    pub(super) fn catch_up(&mut self, durable: u64) {
        if !self.behind(durable) {
            return;
        }
        assert!(self.sealed_freed.is_empty(), "a commit that freed clusters ends at once");
        let released = self.commit_ended();
        assert!(released.is_empty(), "catching up released {} clusters", released.len());
    }

    /// Whether the family's sealed sets belong to a durable commit it has not ended yet.
    pub(super) fn behind(&self, durable: u64) -> bool {
        self.sealed_at != 0 && self.sealed_at <= durable
    }

    /// The family's own consistency: mappings within the pool and within their volumes, the
    /// lock table. `cluster_count` is the pool's.
    pub(super) fn check(&self, cluster_count: u64) -> Vec<String> {
        let mut problems = Vec::new();
        for (&id, v) in &self.volumes {
            let written: u64 =
                v.tree.entries().iter().map(|(_, e)| u64::from(e.written().count_ones())).sum();
            if written != v.written_pieces {
                problems.push(format!(
                    "volume {id}: {} written pieces kept, its tree has {written}",
                    v.written_pieces
                ));
            }
            for (vc, e) in v.tree.entries() {
                if let Some(c) = e.cluster() {
                    if c >= cluster_count {
                        problems.push(format!(
                            "volume {id} cluster {vc} maps to {c}, beyond the pool's \
                             {cluster_count} clusters"
                        ));
                    }
                }
                if vc * self.geo.cluster_bytes
                    >= v.size_bytes.next_multiple_of(self.geo.cluster_bytes)
                {
                    problems.push(format!("volume {id} maps cluster {vc} beyond its end"));
                }
            }
            if v.thick {
                // Unmapped only while promised (being mapped in steps).
                let clusters = v.size_bytes.div_ceil(self.geo.cluster_bytes);
                let holes = (0..clusters).filter(|&vc| v.tree.get(vc).cluster().is_none()).count();
                if holes as u64 > v.fill {
                    problems.push(format!(
                        "thick volume {id} leaves {holes} clusters unmapped, {} promised",
                        v.fill
                    ));
                }
            }
        }
        problems.extend(self.locks.check());
        problems
    }

    /// Clusters the family accounts for beyond those its trees name: in its stock, the fresh
    /// cluster of a write span in flight, or freed and not yet reusable.
    pub(super) fn in_transit(&self) -> u64 {
        u64::from(self.fresh_inflight) + self.held_free().count() as u64
    }

    /// The clusters the family holds that no tree names, but the fresh clusters of spans in
    /// flight: what holds each, and the cluster.
    pub(super) fn held_free(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        let stock = self.stock.iter().map(|c| ("stock", c));
        let freed = self.freed.iter().map(|&c| ("freed", c));
        let sealed = self.sealed_freed.iter().map(|&c| ("sealed", c));
        let quarantined =
            self.quarantine.iter().flat_map(|(_, cs)| cs.iter().map(|&c| ("quarantine", c)));
        stock.chain(freed).chain(sealed).chain(quarantined)
    }
}

/// The pool's families by number: a slab (a family's number is its slot, reused after the
/// family goes), so finding a volume's family on the data path is an index, not a search.
///
/// Each family sits behind its own mutex: the data path (`PoolMeta`'s `&self` decisions, which
/// a driver may run from several threads under a shared borrow of the pool state) locks the
/// one family it decides for, and nothing else but leaf locks (the allocator, the wake-up
/// queue); whoever borrows the pool state exclusively reaches every family without locking
/// (`get_mut`; its `&self` helpers lock, uncontended). Families are locked in number order
/// when several are (`PoolMeta::check`); a decision locks one.
///
/// Slots are cache-line aligned (`CachePadded`): a core deciding for one family (its lock
/// word, its counters) moves no line that another core reads deciding for the next. A slot
/// is 512 bytes, eight lines (`a_family_slot_is_eight_cache_lines`): the padding inside the
/// `Option`, which has no niche to spare (a mutex hides its contents'), so it adds none.
#[derive(Default)]
pub(super) struct Families {
    slots: Vec<CachePadded<Option<Mutex<Family>>>>,
    free: Vec<u32>,
    len: usize,
}

impl Families {
    /// Adds a family; returns its number.
    pub(super) fn add(&mut self, fam: Family) -> u32 {
        self.len += 1;
        let fam = CachePadded::new(Some(Mutex::new(fam)));
        match self.free.pop() {
            Some(f) => {
                self.slots[f as usize] = fam;
                f
            }
            None => {
                self.slots.push(fam);
                (self.slots.len() - 1) as u32
            }
        }
    }

    pub(super) fn remove(&mut self, f: u32) -> Option<Family> {
        let fam = self.slots.get_mut(f as usize)?.take()?;
        self.len -= 1;
        self.free.push(f);
        Some(fam.into_inner())
    }

    /// Family `f`, locked (a shared borrow of the pool state: other threads may decide for
    /// other families meanwhile).
    #[inline]
    pub(super) fn get(&self, f: u32) -> Option<MutexGuard<'_, Family>> {
        Some(self.slots.get(f as usize)?.as_ref()?.lock())
    }

    #[inline]
    pub(super) fn get_mut(&mut self, f: u32) -> Option<&mut Family> {
        Some(self.slots.get_mut(f as usize)?.as_mut()?.get_mut())
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Families in number order, each locked in turn (one at a time).
    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, MutexGuard<'_, Family>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(f, s)| s.as_ref().map(|fam| (f as u32, fam.lock())))
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut Family)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(f, s)| s.as_mut().map(|fam| (f as u32, fam.get_mut())))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = MutexGuard<'_, Family>> {
        self.slots.iter().filter_map(|s| s.as_ref()).map(|fam| fam.lock())
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut Family> {
        self.slots.iter_mut().filter_map(|s| s.as_mut()).map(|fam| fam.get_mut())
    }
}

/// Runs of 4 KiB pieces over `[offset, end)` built cluster by cluster, in order: the pieces a
/// cluster flags, and unflagged gaps between them (start, length, flag), adjacent runs merged.
struct PieceRuns {
    out: Vec<(u64, u64, bool)>,
    /// Where the unflagged gap before the next flagged piece begins.
    at: u64,
    offset: u64,
    end: u64,
    cluster_bytes: u64,
}

impl PieceRuns {
    fn new(offset: u64, end: u64, cluster_bytes: u64) -> PieceRuns {
        PieceRuns { out: Vec::new(), at: offset, offset, end, cluster_bytes }
    }

    /// Volume cluster `vc`'s pieces (within the range) for which `flagged(bit)` holds; false
    /// once more than `max` runs have begun (the first `max` are then whole: stop walking).
    fn cluster(&mut self, vc: u64, flagged: impl Fn(u64) -> bool, max: usize) -> bool {
        let cb = self.cluster_bytes;
        for bit in 0..cb / PIECE {
            let p0 = (vc * cb + bit * PIECE).max(self.offset);
            let p1 = (vc * cb + (bit + 1) * PIECE).min(self.end);
            if p1 > p0 && flagged(bit) {
                push_run(&mut self.out, self.at, p0, false);
                push_run(&mut self.out, p0, p1, true);
                self.at = p1;
            }
        }
        self.out.len() <= max
    }

    /// The first `max` runs, the gap after the last flagged piece included.
    fn finish(mut self, max: usize) -> Vec<(u64, u64, bool)> {
        if self.out.len() <= max {
            push_run(&mut self.out, self.at, self.end, false);
        }
        self.out.truncate(max);
        self.out
    }
}

/// Appends the run `[start, stop)` with `flag` to `out` (start, length, flag), merged into the
/// last run where it continues it with the same flag; empty runs are dropped.
fn push_run(out: &mut Vec<(u64, u64, bool)>, start: u64, stop: u64, flag: bool) {
    if stop <= start {
        return;
    }
    match out.last_mut() {
        Some(last) if last.2 == flag && last.0 + last.1 == start => last.1 += stop - start,
        _ => out.push((start, stop - start, flag)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The room a family keeps between epochs is bounded: a set emptied after a burst gives
    /// its memory back, a small one keeps its room (the next epoch's first inserts allocate
    /// nothing).
    #[test]
    fn an_emptied_set_keeps_room_only_up_to_its_bound() {
        let mut big: HashSet<u64> = (0..10 * SET_ROOM_KEPT as u64).collect();
        empty_keeping_room(&mut big);
        assert!(big.is_empty());
        assert_eq!(big.capacity(), 0, "a burst's room is not kept");
        let mut small: HashSet<u64> = (0..SET_ROOM_KEPT as u64 / 2).collect();
        let room = small.capacity();
        assert!(room > 0 && room <= SET_ROOM_KEPT);
        empty_keeping_room(&mut small);
        assert!(small.is_empty());
        assert_eq!(small.capacity(), room, "a small set keeps its room");
    }

    /// A family's slot in the slab is eight whole cache lines (the slab is cache-line aligned):
    /// a field added to `Family` that grows it past them costs every family a ninth and a
    /// tenth line (the slot rounds up to 128 bytes), and should move something out instead.
    #[test]
    fn a_family_slot_is_eight_cache_lines() {
        assert_eq!(std::mem::size_of::<CachePadded<Option<Mutex<Family>>>>(), 512);
        assert_eq!(std::mem::align_of::<CachePadded<Option<Mutex<Family>>>>() % 64, 0);
    }
}
