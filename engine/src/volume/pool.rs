//! A pool of thin volumes over a synchronous disk: the volume semantics (copy-on-write
//! clusters with written bitmaps, O(1) snapshots and clones, trim, group commit on flush,
//! replay after a crash) in their simplest executable form. It is the reference the reactor
//! integration will follow and the subject of the crash and model tests; it is not yet wired
//! into the daemon (docs/VOLUMES.md).
//!
//! Invariants:
//! - every mapping change is a journal record applied through `apply`, the same function
//!   replay uses, so the in-memory state after replay equals the state when the last durable
//!   commit was written;
//! - a cluster is written in place only when exactly one leaf of one tree names it, both now
//!   and in the last durable state (its references did not change since the last commit, or it
//!   was allocated since): after a crash the durable sharing comes back, and an in-place write
//!   into a cluster a snapshot still shares there would change the snapshot. Otherwise a write
//!   goes to a fresh cluster (copying the cluster's other written pieces);
//! - `refs[c]` equals the number of distinct leaves naming cluster `c` (checked by `check`);
//! - a flush makes data durable before the records that name it, and frees reusable only after.

use std::collections::{BTreeMap, HashSet};

use super::alloc::Allocator;
use super::format::{choose_superblock, replay, FormatError, Superblock, BLOCK_SIZE};
use super::journal::{JournalError, JournalHead, JournalWriter};
use super::map::{count_references, Entry, Tree};
use super::records::{decode_all, Record};
use super::sim::SimDisk;

/// Piece size tracked by the written bitmap.
pub const PIECE: u64 = 4096;

/// What the pool needs from a disk.
pub trait SyncDisk {
    fn read(&mut self, offset: u64, len: usize) -> Vec<u8>;
    fn write(&mut self, offset: u64, data: &[u8], fua: bool);
    fn flush(&mut self);
    fn size_bytes(&self) -> u64;
}

impl SyncDisk for SimDisk {
    fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        SimDisk::read(self, offset, len)
    }
    fn write(&mut self, offset: u64, data: &[u8], fua: bool) {
        SimDisk::write(self, offset, data, fua)
    }
    fn flush(&mut self) {
        SimDisk::flush(self)
    }
    fn size_bytes(&self) -> u64 {
        SimDisk::size_bytes(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool format: {0}")]
    Format(#[from] FormatError),
    #[error("{0}")]
    Journal(#[from] JournalError),
    #[error("pool is full")]
    NoSpace,
    #[error("no volume {0}")]
    NoVolume(u32),
    #[error("volume {0} is read-only (a snapshot)")]
    ReadOnly(u32),
    #[error("volume {0} is not a snapshot")]
    NotSnapshot(u32),
    #[error("range beyond the end of volume {0}")]
    Range(u32),
    #[error("I/O must be aligned to {PIECE} bytes")]
    Unaligned,
}

#[derive(Clone)]
pub struct Volume {
    pub name: String,
    pub size_bytes: u64,
    pub read_only: bool,
    pub parent: u32,
    tree: Tree,
}

pub struct Pool<D: SyncDisk> {
    disk: D,
    sb: Superblock,
    cluster_bytes: u64,
    alloc: Allocator,
    journal: JournalWriter,
    volumes: BTreeMap<u32, Volume>,
    refs: Vec<u32>,
    next_id: u32,
    /// Clusters allocated since the last commit (no durable state names them).
    epoch_fresh: HashSet<u64>,
    /// Older clusters whose references changed since the last commit.
    epoch_touched: HashSet<u64>,
}

/// A run of 4 KiB pieces within one cluster: volume cluster, where the run ends (bytes), its
/// first piece and its pieces as a written-bitmap mask.
struct Span {
    vc: u64,
    cluster_end: u64,
    first_bit: u64,
    bits: u16,
}

/// Layout parameters for `Pool::format`.
pub struct PoolGeometry {
    pub cluster_shift: u32,
    pub journal_blocks: u64,
    pub pool_uuid: [u8; 16],
}

impl<D: SyncDisk> Pool<D> {
    /// Writes a new, empty pool over the whole disk.
    pub fn format(mut disk: D, g: PoolGeometry) -> Result<Pool<D>, PoolError> {
        let total_blocks = disk.size_bytes() / BLOCK_SIZE as u64;
        let cluster_blocks = 1u64 << (g.cluster_shift - 12);
        let meta_start = 2;
        let meta_blocks = 2;
        let journal_start = meta_start + meta_blocks;
        let data_start =
            (journal_start + g.journal_blocks).div_ceil(cluster_blocks) * cluster_blocks;
        let cluster_count = total_blocks.saturating_sub(data_start) / cluster_blocks;
        let sb = Superblock {
            pool_uuid: g.pool_uuid,
            generation: 1,
            incarnation: 1,
            cluster_shift: g.cluster_shift,
            total_blocks,
            meta_start,
            meta_blocks,
            journal_start,
            journal_blocks: g.journal_blocks,
            data_start,
            cluster_count,
            checkpoint_half: 0,
            checkpoint_blocks: 0,
            checkpoint_crc: 0,
            checkpoint_seq: 0,
            journal_head_seq: 1,
            journal_head_block: 0,
        };
        sb.validate()?;
        // Invalidate whatever journal the disk held, then both superblock copies.
        let zero = vec![0u8; BLOCK_SIZE];
        disk.write(journal_start * BLOCK_SIZE as u64, &zero, false);
        disk.flush();
        disk.write(BLOCK_SIZE as u64, &Superblock { generation: 0, ..sb.clone() }.encode(), true);
        disk.write(0, &sb.encode(), true);
        Self::open(disk)
    }

    /// Opens a pool: newest valid superblock, then replay of the journal from its head.
    pub fn open(mut disk: D) -> Result<Pool<D>, PoolError> {
        let a = disk.read(0, BLOCK_SIZE);
        let b = disk.read(BLOCK_SIZE as u64, BLOCK_SIZE);
        let sb = choose_superblock(&a, &b)?;
        let head =
            JournalHead { block: sb.journal_head_block, seq: sb.journal_head_seq, prev_crc: 0 };
        let mut journal = JournalWriter::new(sb.pool_uuid, sb.incarnation, sb.journal_blocks, head);
        let cluster_bytes = 1u64 << sb.cluster_shift;
        let mut pool = Pool {
            alloc: Allocator::new(sb.cluster_count.max(2)),
            refs: vec![0; sb.cluster_count.max(2) as usize],
            journal: JournalWriter::new(sb.pool_uuid, sb.incarnation, sb.journal_blocks, head),
            volumes: BTreeMap::new(),
            next_id: 1,
            epoch_fresh: HashSet::new(),
            epoch_touched: HashSet::new(),
            cluster_bytes,
            sb,
            disk,
        };
        let (start, ring) = (pool.sb.journal_start, pool.sb.journal_blocks);
        let uuid = pool.sb.pool_uuid;
        let mut blocks = Vec::new();
        {
            let disk = &mut pool.disk;
            let read = |i: u64| disk.read((start + i) * BLOCK_SIZE as u64, BLOCK_SIZE);
            for block in replay(&uuid, ring, head.block, head.seq, head.prev_crc, read) {
                blocks.push(block);
            }
        }
        let mut last_crc = head.prev_crc;
        for block in &blocks {
            // Records that decoded wrong cannot be in a block whose crc matched.
            for r in decode_all(&block.payload)
                .map_err(|_| FormatError::Invalid { field: "journal", why: "bad record" })?
            {
                pool.apply(&r);
            }
            // A block belongs to one durable commit: the frees it made were durable before any
            // later commit could reuse those clusters.
            pool.alloc.commit();
            last_crc = block.encode(&uuid).1;
        }
        if let Some(last) = blocks.last() {
            journal.skip_replayed(blocks.len() as u64, last.seq, last_crc);
        }
        pool.journal = journal;
        pool.alloc.commit();
        Ok(pool)
    }

    pub fn volumes(&self) -> &BTreeMap<u32, Volume> {
        &self.volumes
    }

    pub fn free_clusters(&self) -> u64 {
        self.alloc.free_count()
    }

    pub fn into_disk(self) -> D {
        self.disk
    }

    /// The part of `[at, end)` inside `at`'s cluster.
    fn span(&self, at: u64, end: u64) -> Span {
        let vc = at / self.cluster_bytes;
        let cluster_end = ((vc + 1) * self.cluster_bytes).min(end);
        let first_bit = (at % self.cluster_bytes) / PIECE;
        let pieces = (cluster_end - at) / PIECE;
        let bits = (((1u32 << pieces) - 1) << first_bit) as u16;
        Span { vc, cluster_end, first_bit, bits }
    }

    fn cluster_offset(&self, cluster: u64) -> u64 {
        self.sb.data_start * BLOCK_SIZE as u64 + cluster * self.cluster_bytes
    }

    fn touch(&mut self, cluster: u64) {
        if !self.epoch_fresh.contains(&cluster) {
            self.epoch_touched.insert(cluster);
        }
    }

    fn add_ref(&mut self, cluster: u64) {
        self.touch(cluster);
        if self.refs[cluster as usize] == 0 && !self.alloc.is_allocated(cluster) {
            self.alloc.mark_allocated(cluster); // replay: the record names a cluster
        }
        self.refs[cluster as usize] += 1;
    }

    fn drop_ref(&mut self, cluster: u64) {
        self.touch(cluster);
        let r = &mut self.refs[cluster as usize];
        assert!(*r > 0, "cluster {cluster} released more than referenced");
        *r -= 1;
        if *r == 0 {
            self.alloc.free(cluster);
        }
    }

    /// Applies one record to the in-memory state (live operations and replay alike).
    fn apply(&mut self, r: &Record) {
        match r {
            Record::MapSet { volume, vcluster, entry } => {
                let Some(v) = self.volumes.get_mut(volume) else { return };
                let mut copied = Vec::new();
                let old = v.tree.set(*vcluster, Entry(*entry), |leaf| {
                    copied.extend(leaf.iter().filter_map(|e| e.cluster()));
                });
                for c in copied {
                    self.add_ref(c);
                }
                if let Some(c) = Entry(*entry).cluster() {
                    self.add_ref(c);
                }
                if let Some(c) = old.cluster() {
                    self.drop_ref(c);
                }
            }
            Record::VolumeCreate { id, parent, size_bytes, name } => {
                let clusters = size_bytes.div_ceil(self.cluster_bytes).max(1);
                let v = Volume {
                    name: name.clone(),
                    size_bytes: *size_bytes,
                    read_only: false,
                    parent: *parent,
                    tree: Tree::new(clusters),
                };
                self.volumes.insert(*id, v);
                self.next_id = self.next_id.max(id + 1);
            }
            Record::Snapshot { id, of, name } | Record::Clone { id, of, name } => {
                let Some(src) = self.volumes.get(of) else { return };
                let v = Volume {
                    name: name.clone(),
                    size_bytes: src.size_bytes,
                    read_only: matches!(r, Record::Snapshot { .. }),
                    parent: *of,
                    tree: src.tree.clone(),
                };
                self.volumes.insert(*id, v);
                self.next_id = self.next_id.max(id + 1);
            }
            Record::Delete { id } => {
                if let Some(v) = self.volumes.remove(id) {
                    let mut released = Vec::new();
                    v.tree.release(|e| released.extend(e.cluster()));
                    for c in released {
                        self.drop_ref(c);
                    }
                }
            }
            Record::Rollback { .. } | Record::Resize { .. } | Record::ReclaimProgress { .. } => {
                unimplemented!("not in the reference pool yet: {r:?}")
            }
        }
    }

    fn log(&mut self, r: Record) {
        self.apply(&r);
        self.journal.append(r);
    }

    /// Group commit: data and earlier journal blocks durable, then the new blocks with FUA.
    pub fn flush(&mut self) -> Result<(), PoolError> {
        self.disk.flush();
        let start = self.sb.journal_start;
        for (i, bytes) in self.journal.commit()? {
            self.disk.write((start + i) * BLOCK_SIZE as u64, &bytes, true);
        }
        self.alloc.commit();
        self.epoch_fresh.clear();
        self.epoch_touched.clear();
        Ok(())
    }

    pub fn create_volume(&mut self, name: &str, size_bytes: u64) -> Result<u32, PoolError> {
        let id = self.next_id;
        self.log(Record::VolumeCreate { id, parent: 0, size_bytes, name: name.into() });
        self.flush()?;
        Ok(id)
    }

    /// A read-only snapshot: O(1), it shares the volume's mapping.
    pub fn snapshot(&mut self, of: u32, name: &str) -> Result<u32, PoolError> {
        self.volumes.get(&of).ok_or(PoolError::NoVolume(of))?;
        let id = self.next_id;
        self.log(Record::Snapshot { id, of, name: name.into() });
        self.flush()?;
        Ok(id)
    }

    /// A writable clone of a snapshot.
    pub fn clone_volume(&mut self, of: u32, name: &str) -> Result<u32, PoolError> {
        let src = self.volumes.get(&of).ok_or(PoolError::NoVolume(of))?;
        if !src.read_only {
            return Err(PoolError::NotSnapshot(of));
        }
        let id = self.next_id;
        self.log(Record::Clone { id, of, name: name.into() });
        self.flush()?;
        Ok(id)
    }

    pub fn delete(&mut self, id: u32) -> Result<(), PoolError> {
        self.volumes.get(&id).ok_or(PoolError::NoVolume(id))?;
        self.log(Record::Delete { id });
        self.flush()
    }

    fn check_range(
        &self,
        id: u32,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<&Volume, PoolError> {
        let v = self.volumes.get(&id).ok_or(PoolError::NoVolume(id))?;
        if write && v.read_only {
            return Err(PoolError::ReadOnly(id));
        }
        if !offset.is_multiple_of(PIECE) || !len.is_multiple_of(PIECE) {
            return Err(PoolError::Unaligned);
        }
        if offset.checked_add(len).is_none_or(|end| end > v.size_bytes) {
            return Err(PoolError::Range(id));
        }
        Ok(v)
    }

    pub fn read(&mut self, id: u32, offset: u64, len: u64) -> Result<Vec<u8>, PoolError> {
        self.check_range(id, offset, len, false)?;
        let mut out = vec![0u8; len as usize];
        for piece in 0..len / PIECE {
            let at = offset + piece * PIECE;
            let e = self.volumes[&id].tree.get(at / self.cluster_bytes);
            let bit = (at % self.cluster_bytes) / PIECE;
            if let (Some(c), true) = (e.cluster(), e.written() & (1 << bit) != 0) {
                let data = self.disk.read(self.cluster_offset(c) + bit * PIECE, PIECE as usize);
                out[(piece * PIECE) as usize..((piece + 1) * PIECE) as usize]
                    .copy_from_slice(&data);
            }
        }
        Ok(out)
    }

    pub fn write(&mut self, id: u32, offset: u64, data: &[u8]) -> Result<(), PoolError> {
        self.check_range(id, offset, data.len() as u64, true)?;
        let mut at = offset;
        let end = offset + data.len() as u64;
        while at < end {
            let Span { vc, cluster_end, first_bit, bits } = self.span(at, end);
            let chunk = &data[(at - offset) as usize..(cluster_end - offset) as usize];
            self.write_cluster(id, vc, first_bit, bits, chunk)?;
            at = cluster_end;
        }
        Ok(())
    }

    fn write_cluster(
        &mut self,
        id: u32,
        vc: u64,
        first_bit: u64,
        bits: u16,
        chunk: &[u8],
    ) -> Result<(), PoolError> {
        let v = &self.volumes[&id];
        let e = v.tree.get(vc);
        let owned = e.cluster().is_some_and(|c| {
            self.refs[c as usize] == 1
                && !v.tree.leaf_shared(vc)
                && !self.epoch_touched.contains(&c)
        });
        if owned {
            let c = e.cluster().expect("owned means mapped");
            self.disk.write(self.cluster_offset(c) + first_bit * PIECE, chunk, false);
            if e.written() & bits != bits {
                self.log(Record::MapSet {
                    volume: id,
                    vcluster: vc,
                    entry: Entry::new(c, e.written() | bits).0,
                });
            }
            return Ok(());
        }
        let fresh = self.alloc.alloc().ok_or(PoolError::NoSpace)?;
        self.epoch_fresh.insert(fresh);
        if let Some(old) = e.cluster() {
            // Carry the other written pieces over from the shared cluster.
            for bit in 0..(self.cluster_bytes / PIECE) {
                if e.written() & (1 << bit) != 0 && bits & (1 << bit) == 0 {
                    let piece =
                        self.disk.read(self.cluster_offset(old) + bit * PIECE, PIECE as usize);
                    self.disk.write(self.cluster_offset(fresh) + bit * PIECE, &piece, false);
                }
            }
        }
        self.disk.write(self.cluster_offset(fresh) + first_bit * PIECE, chunk, false);
        self.log(Record::MapSet {
            volume: id,
            vcluster: vc,
            entry: Entry::new(fresh, e.written() | bits).0,
        });
        Ok(())
    }

    /// Trims whole 4 KiB pieces: they read zeros; a cluster with no written piece is released.
    pub fn trim(&mut self, id: u32, offset: u64, len: u64) -> Result<(), PoolError> {
        self.check_range(id, offset, len, true)?;
        let mut at = offset;
        while at < offset + len {
            let Span { vc, cluster_end, bits, .. } = self.span(at, offset + len);
            let e = self.volumes[&id].tree.get(vc);
            if let Some(c) = e.cluster() {
                let left = e.written() & !bits;
                let entry = if left == 0 { Entry::UNMAPPED } else { Entry::new(c, left) };
                if entry != e {
                    self.log(Record::MapSet { volume: id, vcluster: vc, entry: entry.0 });
                }
            }
            at = cluster_end;
        }
        Ok(())
    }

    /// Recounts references from the trees and compares with the live counts and allocator.
    pub fn check(&self) -> Result<(), String> {
        let counts = count_references(self.volumes.values().map(|v| &v.tree));
        for (c, &r) in self.refs.iter().enumerate() {
            let want = counts.get(&(c as u64)).copied().unwrap_or(0);
            if r != want {
                return Err(format!("cluster {c}: refcount {r}, trees say {want}"));
            }
            if r > 0 && !self.alloc.is_allocated(c as u64) {
                return Err(format!("cluster {c} referenced but not allocated"));
            }
        }
        let referenced = counts.len() as u64;
        if self.alloc.used_count() < referenced {
            return Err("allocator counts fewer clusters than are referenced".into());
        }
        Ok(())
    }

    /// Clusters allocated but referenced by nothing (leaks), after pending frees are durable.
    pub fn leaked(&self) -> u64 {
        let counts = count_references(self.volumes.values().map(|v| &v.tree));
        self.alloc.used_count() - counts.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::sim::CrashMode;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    const CLUSTER_SHIFT: u32 = 14; // 16 KiB clusters: 4 pieces, so copy-on-write paths are common
    const VOL_PIECES: u64 = 64; // 256 KiB volumes

    fn new_pool(seed: u64) -> Pool<SimDisk> {
        let disk = SimDisk::new(4 << 20, seed);
        Pool::format(
            disk,
            PoolGeometry { cluster_shift: CLUSTER_SHIFT, journal_blocks: 512, pool_uuid: [9; 16] },
        )
        .unwrap()
    }

    #[test]
    fn snapshot_keeps_its_data_and_delete_returns_space() {
        let mut p = new_pool(1);
        let baseline = p.free_clusters();
        let v = p.create_volume("v", VOL_PIECES * PIECE).unwrap();
        p.write(v, 0, &vec![1u8; 3 * PIECE as usize]).unwrap();
        let s = p.snapshot(v, "s").unwrap();
        p.write(v, PIECE, &vec![2u8; PIECE as usize]).unwrap();
        assert_eq!(p.read(s, PIECE, PIECE).unwrap(), vec![1u8; PIECE as usize]);
        assert_eq!(p.read(v, PIECE, PIECE).unwrap(), vec![2u8; PIECE as usize]);
        assert_eq!(p.read(v, 0, PIECE).unwrap(), vec![1u8; PIECE as usize], "CoW carried piece 0");
        p.check().unwrap();
        let c = p.clone_volume(s, "c").unwrap();
        p.write(c, 0, &vec![3u8; PIECE as usize]).unwrap();
        assert_eq!(p.read(s, 0, PIECE).unwrap(), vec![1u8; PIECE as usize]);
        p.trim(v, 0, 4 * PIECE).unwrap();
        assert_eq!(p.read(v, 0, PIECE).unwrap(), vec![0u8; PIECE as usize]);
        p.flush().unwrap();
        for id in [c, s, v] {
            p.delete(id).unwrap();
        }
        p.check().unwrap();
        assert_eq!(
            (p.free_clusters(), p.leaked()),
            (baseline, 0),
            "space returns to the empty-pool baseline"
        );
        assert!(matches!(p.write(v, 0, &[0u8; 4096]), Err(PoolError::NoVolume(_))));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write { vol: usize, piece: u64, pieces: u64, byte: u8 },
        Trim { vol: usize, piece: u64, pieces: u64 },
        Flush,
        Snapshot { vol: usize },
        Clone { vol: usize },
        Delete { vol: usize },
        Crash { mode: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0usize..4, 0..VOL_PIECES, 1u64..6, 1u8..=255)
                .prop_map(|(vol, piece, pieces, byte)| Op::Write { vol, piece, pieces, byte }),
            2 => (0usize..4, 0..VOL_PIECES, 1u64..9).prop_map(|(vol, piece, pieces)| Op::Trim { vol, piece, pieces }),
            2 => Just(Op::Flush),
            1 => (0usize..4).prop_map(|vol| Op::Snapshot { vol }),
            1 => (0usize..4).prop_map(|vol| Op::Clone { vol }),
            1 => (0usize..4).prop_map(|vol| Op::Delete { vol }),
            2 => (0u8..3).prop_map(|mode| Op::Crash { mode }),
        ]
    }

    /// Per volume and 4 KiB piece: the value now, the value at the last flush, and the values
    /// written since (any of which a crash may leave).
    #[derive(Clone, Default)]
    struct Model {
        now: Vec<u8>,
        durable: Vec<u8>,
        since: Vec<BTreeSet<u8>>,
        read_only: bool,
    }

    fn run(seed: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let mut pool = new_pool(seed);
        let baseline = pool.free_clusters();
        let first = pool.create_volume("v0", VOL_PIECES * PIECE).unwrap();
        let mut models: BTreeMap<u32, Model> = BTreeMap::new();
        let fresh = || Model {
            now: vec![0; VOL_PIECES as usize],
            durable: vec![0; VOL_PIECES as usize],
            since: vec![BTreeSet::new(); VOL_PIECES as usize],
            read_only: false,
        };
        models.insert(first, fresh());
        let settle = |m: &mut BTreeMap<u32, Model>| {
            for v in m.values_mut() {
                v.durable = v.now.clone();
                v.since.iter_mut().for_each(BTreeSet::clear);
            }
        };
        for op in ops {
            let ids: Vec<u32> = models.keys().copied().collect();
            let pick = |i: usize| ids.get(i % ids.len().max(1)).copied();
            match op {
                Op::Write { vol, piece, pieces, byte } => {
                    let Some(id) = pick(vol) else { continue };
                    let pieces = pieces.min(VOL_PIECES - piece);
                    let r = pool.write(id, piece * PIECE, &vec![byte; (pieces * PIECE) as usize]);
                    let m = models.get_mut(&id).unwrap();
                    if m.read_only {
                        prop_assert!(matches!(r, Err(PoolError::ReadOnly(_))));
                        continue;
                    }
                    if matches!(r, Err(PoolError::NoSpace)) {
                        continue; // a full pool fails the new allocation; the model is unchanged
                    }
                    r.unwrap();
                    for p in piece..piece + pieces {
                        m.now[p as usize] = byte;
                        m.since[p as usize].insert(byte);
                    }
                }
                Op::Trim { vol, piece, pieces } => {
                    let Some(id) = pick(vol) else { continue };
                    let pieces = pieces.min(VOL_PIECES - piece);
                    let r = pool.trim(id, piece * PIECE, pieces * PIECE);
                    let m = models.get_mut(&id).unwrap();
                    if m.read_only {
                        prop_assert!(r.is_err());
                        continue;
                    }
                    r.unwrap();
                    for p in piece..piece + pieces {
                        m.now[p as usize] = 0;
                        m.since[p as usize].insert(0);
                    }
                }
                Op::Flush => {
                    pool.flush().unwrap();
                    settle(&mut models);
                }
                Op::Snapshot { vol } => {
                    let Some(id) = pick(vol) else { continue };
                    let s = pool.snapshot(id, "s").unwrap();
                    settle(&mut models);
                    let mut m = models[&id].clone();
                    m.read_only = true;
                    models.insert(s, m);
                }
                Op::Clone { vol } => {
                    let Some(id) = pick(vol) else { continue };
                    if !models[&id].read_only {
                        prop_assert!(pool.clone_volume(id, "c").is_err());
                        continue;
                    }
                    let c = pool.clone_volume(id, "c").unwrap();
                    settle(&mut models);
                    let mut m = models[&id].clone();
                    m.read_only = false;
                    models.insert(c, m);
                }
                Op::Delete { vol } => {
                    let Some(id) = pick(vol) else { continue };
                    pool.delete(id).unwrap();
                    settle(&mut models);
                    models.remove(&id);
                }
                Op::Crash { mode } => {
                    let mode =
                        [CrashMode::DropAll, CrashMode::ApplyAll, CrashMode::Random][mode as usize];
                    let mut disk = pool.into_disk();
                    disk.crash(mode);
                    pool = Pool::open(disk).unwrap();
                    let ids: BTreeSet<u32> = pool.volumes().keys().copied().collect();
                    prop_assert_eq!(&ids, &models.keys().copied().collect::<BTreeSet<u32>>());
                    for (id, m) in models.iter_mut() {
                        let data = pool.read(*id, 0, VOL_PIECES * PIECE).unwrap();
                        for p in 0..VOL_PIECES as usize {
                            let piece = &data[p * PIECE as usize..(p + 1) * PIECE as usize];
                            let v = piece[0];
                            prop_assert!(
                                piece.iter().all(|&b| b == v),
                                "vol {} piece {} torn inside 4 KiB",
                                id,
                                p
                            );
                            prop_assert!(
                                v == m.durable[p] || m.since[p].contains(&v),
                                "vol {} piece {}: read {} after crash; durable {}, since {:?}",
                                id,
                                p,
                                v,
                                m.durable[p],
                                m.since[p]
                            );
                            m.now[p] = v;
                        }
                    }
                    settle(&mut models);
                }
            }
            if let Err(e) = pool.check() {
                return Err(TestCaseError::fail(e));
            }
            // Reads always match the model outside crashes.
            for (id, m) in &models {
                let data = pool.read(*id, 0, VOL_PIECES * PIECE).unwrap();
                for p in 0..VOL_PIECES as usize {
                    prop_assert_eq!(data[p * PIECE as usize], m.now[p], "vol {} piece {}", id, p);
                }
            }
        }
        pool.flush().unwrap();
        let ids: Vec<u32> = pool.volumes().keys().copied().collect();
        for id in ids {
            pool.delete(id).unwrap();
        }
        pool.check().map_err(TestCaseError::fail)?;
        prop_assert_eq!((pool.free_clusters(), pool.leaked()), (baseline, 0));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("BALLAST_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)))]
        /// Random writes, trims, flushes, snapshots, clones, deletes and crashes against a plain
        /// model: after a crash every 4 KiB piece reads its last durable value or one written
        /// since; snapshots never change; reference counts are exact after every step; deleting
        /// everything returns the pool to its empty baseline.
        #[test]
        fn model_with_crashes(seed in any::<u64>(), ops in proptest::collection::vec(op(), 1..60)) {
            run(seed, ops)?;
        }
    }
}
