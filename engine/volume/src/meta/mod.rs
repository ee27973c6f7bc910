//! The in-memory state of an open pool and every decision about it: which clusters a read
//! touches, where a write goes (in place or copy-on-write into a fresh cluster), which records
//! a change logs, what a commit writes, what a checkpoint holds. Pure: no I/O. Requests
//! (`request.rs`) consult it; their drivers — the daemon's reactor adapter, the synchronous
//! pool, the simulator — run the same decisions.
//!
//! This module holds the durable state (volumes, trees, reference counts, allocator, `apply`
//! and loading) and its checks; the decisions live beside it by concern: `io` (reads, writes,
//! holds, trims), `commit` (sealing, checkpoints, when a commit is due), `control` (volume
//! operations and metadata admission), `epochs` (I/O tickets and the quarantine of freed
//! clusters).
//!
//! Invariants:
//! - every mapping change is a journal record applied through `apply`, the function replay and
//!   checkpoint loading use, so state after open equals the state the durable records describe;
//! - a write lands in place only in a cluster exactly one leaf names, now and in the last
//!   durable state (untouched since the last commit that is durable, or allocated since);
//!   otherwise it goes to a fresh cluster that carries over the cluster's other written pieces;
//! - a volume cluster with a copy-on-write in flight takes no other write or trim, and one with
//!   writes in flight takes no copy-on-write or trim ([`LockTable`]): such requests are parked
//!   in the cluster's queue and woken when something leaves it ([`Blocked::Wait`]);
//! - `refs[c]` equals the number of distinct leaves naming cluster `c` (`check` recomputes it);
//! - a cluster freed by a record becomes reusable only when that record is durable and every
//!   I/O that started before (and so might still touch the cluster) has ended (`quarantine`);
//! - metadata cannot fill: a checkpoint holds at most one record per mapped volume cluster, and
//!   volumes may only be created, cloned, snapshotted or grown while the sum of all volume sizes
//!   stays within the provisioning limit the metadata area was sized for at `format`.

use std::collections::{BTreeMap, VecDeque};

use rustc_hash::FxHashSet as HashSet;

use crate::alloc::Allocator;
use crate::format::{FormatError, Superblock, BLOCK_SIZE};
use crate::journal::{JournalError, JournalHead, JournalWriter};
use crate::locks::{LockTable, Waiter};

mod commit;
pub use commit::{Encode, Encoded, Frozen};
mod control;
mod epochs;
mod io;
use crate::map::{count_references, Entry, Tree};
use crate::records::{decode_all, Record, CONFIG_VALUE_MAX, NAME_MAX};

/// Piece size tracked by the written bitmap: the pool's I/O granularity.
pub const PIECE: u64 = 4096;
/// Total volume size (snapshots and clones included) the metadata area is sized for, per byte
/// of data area, by default.
pub const OVERCOMMIT: u64 = 8;
/// Pending journal records after which a commit starts without waiting for a client's flush,
/// by default (`PoolMeta::set_commit_records`).
pub const COMMIT_RECORDS: usize = 4096;
/// Bytes a checkpoint needs per mapped volume cluster (one `MapSet` record).
const CHECKPOINT_BYTES_PER_CLUSTER: u64 = 21;
/// Bytes a checkpoint needs per volume (create record with the longest name, plus attributes).
const CHECKPOINT_BYTES_PER_VOLUME: u64 = 24 + NAME_MAX as u64;
/// Bytes a checkpoint needs per configuration entry beyond its key and value.
const CHECKPOINT_BYTES_PER_CONFIG: u64 = 4;
/// Checkpoint header: the payload length.
pub const CHECKPOINT_HEADER: u64 = 8;

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
    #[error("no volume named {0:?}")]
    NoName(String),
    #[error("a volume named {0:?} already exists")]
    NameTaken(String),
    #[error("invalid volume name {0:?}: 1 to {NAME_MAX} bytes of [A-Za-z0-9._:-]")]
    BadName(String),
    #[error("volume {0} is read-only (a snapshot)")]
    ReadOnly(u32),
    #[error("volume {0} is not a snapshot")]
    NotSnapshot(u32),
    #[error("snapshot {snap} was not taken of volume {vol}")]
    NotSnapshotOf { snap: u32, vol: u32 },
    #[error("range beyond the end of volume {0}")]
    Range(u32),
    #[error("I/O must be aligned to {PIECE} bytes")]
    Unaligned,
    #[error("volume size must be a positive multiple of {PIECE} bytes")]
    BadSize,
    #[error("shrinking volume {0} would drop written data (force to discard it)")]
    WouldDropData(u32),
    #[error(
        "metadata reserve: a checkpoint of every volume fully allocated would need {wanted} \
         bytes and the pool reserved {limit} (sized at creation for volumes totalling \
         {OVERCOMMIT}x the data area); refused so that metadata can never fill"
    )]
    Overprovisioned { limit: u64, wanted: u64 },
    #[error("configuration value too long, or key invalid")]
    BadConfig,
    #[error("{0}")]
    Damaged(String),
    #[error(
        "device too small: {bytes} bytes leave no data clusters after {overhead} bytes of \
         superblocks, metadata reserve and journal"
    )]
    TooSmall { bytes: u64, overhead: u64 },
    #[error("volume {0}'s writes did not drain in time; nothing was changed")]
    Busy(u32),
    #[error("a commit is in flight and no core is left to finish it")]
    CommitStranded,
    #[error("the pool's commit did not finish in time")]
    CommitTimeout,
    #[error("pool I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the pool failed an I/O and is now read-only until restarted: {0}")]
    Failed(String),
}

#[derive(Clone)]
pub struct Volume {
    pub name: String,
    pub size_bytes: u64,
    pub read_only: bool,
    /// The volume this one was snapshotted or cloned from (0 for none); kept for listings even
    /// after the parent is deleted.
    pub parent: u32,
    pub(crate) tree: Tree,
    /// Control operations quiescing it (snapshot, rollback, resize, delete): while any does,
    /// new writes wait.
    pub frozen: u32,
    /// Writes planned and not yet finished.
    pub writes_inflight: u32,
}

/// Where a run of a read comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPiece {
    Zero {
        len: u64,
    },
    /// `len` bytes at pool byte `offset`.
    Disk {
        offset: u64,
        len: u64,
    },
}

/// How one cluster's part of a write is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritePlan {
    pub vcluster: u64,
    /// Pool byte offset where this span's data goes.
    pub offset: u64,
    /// Byte range of the request this span covers.
    pub req_start: u64,
    pub req_len: u64,
    pub cluster: u64,
    /// Copy-on-write: the whole old cluster (pool byte offset) must be read first, the new
    /// data laid over it, and the whole fresh cluster written.
    pub copy_from: Option<u64>,
    /// `cluster` was allocated for this write (copy-on-write or first write).
    pub fresh: bool,
    /// The written bitmap the mapping gets when the write finishes.
    bits: u16,
    base_written: u16,
}

/// A checkpoint being written (`PoolMeta::begin_checkpoint`).
pub struct Checkpoint {
    /// Pool byte offset of the inactive metadata half, and what goes there.
    pub blob_offset: u64,
    /// The frozen state to encode, until a driver takes it.
    encode: Option<Encode>,
    /// Empty until encoded (`Checkpoint::encoded`).
    pub blob: Vec<u8>,
    /// The superblock naming it, to write (FUA, at copy `sb.slot()`) once the blob is durable.
    pub sb: Superblock,
    frees: Vec<u64>,
}

/// Why a request cannot go on now.
#[derive(Debug)]
pub enum Blocked {
    /// It was parked (its [`Waiter`] queued): it plans again when woken.
    Wait,
    /// It fails with this error.
    Fail(PoolError),
}

impl From<PoolError> for Blocked {
    fn from(e: PoolError) -> Blocked {
        Blocked::Fail(e)
    }
}

/// What one commit writes: journal blocks (ring index, bytes), to write in order after the data
/// they describe is durable.
pub struct Sealed {
    pub blocks: Vec<(u64, Vec<u8>)>,
    frees: Vec<u64>,
}

pub struct PoolMeta {
    sb: Superblock,
    cluster_bytes: u64,
    alloc: Allocator,
    journal: JournalWriter,
    volumes: BTreeMap<u32, Volume>,
    config: BTreeMap<String, String>,
    refs: Vec<u32>,
    next_id: u32,
    /// Clusters allocated since the last seal (no durable state names them).
    epoch_fresh: HashSet<u64>,
    /// Older clusters whose references changed since the last seal.
    epoch_touched: HashSet<u64>,
    /// The same two sets for the commit in flight.
    sealed_fresh: HashSet<u64>,
    sealed_touched: HashSet<u64>,
    committing: bool,
    next_hold: u64,
    /// Commits sealed so far, and how many of them are durable (checkpoints count as both).
    seals: u64,
    durable_seals: u64,
    locks: LockTable,
    io_epoch: u64,
    inflight: BTreeMap<u64, u32>,
    quarantine: VecDeque<(u64, Vec<u64>)>,
    failed: Option<String>,
    /// Pending records that make a background commit due, and whether one was asked for.
    commit_records: usize,
    background_asked: bool,
    /// A driver's commit timer is armed (`take_commit_timer`).
    timer_armed: bool,
    /// Commits and checkpoints made durable since the pool was opened.
    commits_done: u64,
    checkpoints_done: u64,
    /// Fresh clusters of write spans in flight (allocated, mapped when the span finishes).
    fresh_inflight: u64,
    /// Clusters freed by the commit in flight (between its seal and its end).
    sealed_frees: u64,
}

/// A run of 4 KiB pieces within one cluster.
struct Span {
    vc: u64,
    cluster_end: u64,
    first_bit: u64,
    bits: u16,
}

/// An I/O's place in the epoch order (see `begin_io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

/// Volume `id`'s mapped clusters: (volume cluster, pool cluster, written bitmap).
pub fn mapped_entries(meta: &PoolMeta, id: u32) -> Vec<(u64, u64, u16)> {
    meta.volumes.get(&id).map_or_else(Vec::new, |v| {
        v.tree
            .entries()
            .into_iter()
            .filter_map(|(vc, e)| e.cluster().map(|c| (vc, c, e.written())))
            .collect()
    })
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

impl PoolMeta {
    /// State for `sb` before the checkpoint and journal are loaded.
    pub fn new(sb: Superblock) -> PoolMeta {
        let head = JournalHead {
            block: sb.journal_head_block,
            seq: sb.journal_head_seq,
            prev_crc: sb.journal_head_prev_crc,
        };
        let clusters = sb.cluster_count.max(2);
        PoolMeta {
            cluster_bytes: 1u64 << sb.cluster_shift,
            alloc: Allocator::new(clusters),
            journal: JournalWriter::new(sb.pool_uuid, sb.incarnation, sb.journal_blocks, head),
            volumes: BTreeMap::new(),
            config: BTreeMap::new(),
            refs: vec![0; clusters as usize],
            next_id: 1,
            epoch_fresh: HashSet::default(),
            epoch_touched: HashSet::default(),
            sealed_fresh: HashSet::default(),
            sealed_touched: HashSet::default(),
            committing: false,
            next_hold: 0,
            seals: 0,
            durable_seals: 0,
            locks: LockTable::default(),
            io_epoch: 0,
            inflight: BTreeMap::new(),
            quarantine: VecDeque::new(),
            failed: None,
            commit_records: COMMIT_RECORDS,
            background_asked: false,
            timer_armed: false,
            commits_done: 0,
            checkpoints_done: 0,
            fresh_inflight: 0,
            sealed_frees: 0,
            sb,
        }
    }

    /// Bytes each metadata half reserves for a pool of `cluster_count` clusters, `volumes`
    /// volumes and `config_bytes` of configuration at full allocation.
    pub fn checkpoint_reserve_bytes(cluster_count: u64, volumes: u64, config_bytes: u64) -> u64 {
        OVERCOMMIT * cluster_count * CHECKPOINT_BYTES_PER_CLUSTER
            + volumes * CHECKPOINT_BYTES_PER_VOLUME
            + config_bytes
            + CHECKPOINT_HEADER
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn cluster_bytes(&self) -> u64 {
        self.cluster_bytes
    }

    pub fn volumes(&self) -> &BTreeMap<u32, Volume> {
        &self.volumes
    }

    pub fn config(&self) -> &BTreeMap<String, String> {
        &self.config
    }

    pub fn free_clusters(&self) -> u64 {
        self.alloc.free_count()
    }

    pub fn used_clusters(&self) -> u64 {
        self.alloc.used_count()
    }

    pub fn data_bytes(&self) -> u64 {
        self.sb.cluster_count.saturating_sub(1) * self.cluster_bytes
    }

    pub fn journal_blocks_free(&self) -> u64 {
        self.journal.blocks_free()
    }

    pub fn pending_records(&self) -> usize {
        self.journal.pending()
    }

    /// Journal commits and checkpoints made durable since the pool was opened.
    pub fn commits_done(&self) -> (u64, u64) {
        (self.commits_done, self.checkpoints_done)
    }

    pub fn fail(&mut self, why: String) {
        tracing::error!(why = %why, "pool failed");
        self.failed.get_or_insert(why);
        self.locks.wake_all();
    }

    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    fn ok(&self) -> Result<(), PoolError> {
        match &self.failed {
            Some(why) => Err(PoolError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    pub fn find(&self, name: &str) -> Result<u32, PoolError> {
        self.volumes
            .iter()
            .find(|(_, v)| v.name == name)
            .map(|(id, _)| *id)
            .ok_or_else(|| PoolError::NoName(name.to_string()))
    }

    pub fn volume(&self, id: u32) -> Result<&Volume, PoolError> {
        self.volumes.get(&id).ok_or(PoolError::NoVolume(id))
    }

    /// Pieces of volume `id` that are written, in bytes.
    pub fn allocated_bytes(&self, id: u32) -> u64 {
        self.volumes.get(&id).map_or(0, |v| {
            let size = v.size_bytes;
            self.allocation(id, 0, size).iter().filter(|r| r.2).map(|r| r.1).sum()
        })
    }

    /// Whether 4 KiB piece `piece` of volume `id` holds written data (else it reads as zeros).
    pub fn piece_written(&self, id: u32, piece: u64) -> bool {
        let Some(v) = self.volumes.get(&id) else { return false };
        let at = piece * PIECE;
        let e = v.tree.get(at / self.cluster_bytes);
        e.cluster().is_some() && e.written() & (1 << ((at % self.cluster_bytes) / PIECE)) != 0
    }

    /// Written runs of `[offset, offset + len)` of volume `id`: (start, length, written), in
    /// order, adjacent runs merged, at 4 KiB granularity. Cost follows the mapped clusters.
    pub fn allocation(&self, id: u32, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let Some(v) = self.volumes.get(&id) else { return Vec::new() };
        let end = offset.saturating_add(len).min(v.size_bytes);
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut push = |start: u64, stop: u64, written: bool| {
            if stop <= start {
                return;
            }
            match out.last_mut() {
                Some(last) if last.2 == written && last.0 + last.1 == start => {
                    last.1 += stop - start
                }
                _ => out.push((start, stop - start, written)),
            }
        };
        let cb = self.cluster_bytes;
        let mut at = offset;
        for (vc, e) in v.tree.entries_in(offset / cb, end.div_ceil(cb)) {
            for bit in 0..cb / PIECE {
                let p0 = (vc * cb + bit * PIECE).max(offset);
                let p1 = (vc * cb + (bit + 1) * PIECE).min(end);
                if p1 <= p0 {
                    continue;
                }
                if e.written() & (1 << bit) != 0 {
                    push(at, p0, false);
                    push(p0, p1, true);
                    at = p1;
                }
            }
        }
        push(at, end, false);
        out
    }

    fn span(&self, at: u64, end: u64) -> Span {
        let vc = at / self.cluster_bytes;
        let cluster_end = ((vc + 1) * self.cluster_bytes).min(end);
        let first_bit = (at % self.cluster_bytes) / PIECE;
        let pieces = (cluster_end - at) / PIECE;
        let bits = (((1u32 << pieces) - 1) << first_bit) as u16;
        Span { vc, cluster_end, first_bit, bits }
    }

    pub fn cluster_offset(&self, cluster: u64) -> u64 {
        self.sb.data_start * BLOCK_SIZE as u64 + cluster * self.cluster_bytes
    }

    fn touch(&mut self, cluster: u64) {
        if !self.epoch_fresh.contains(&cluster) && !self.sealed_fresh.contains(&cluster) {
            self.epoch_touched.insert(cluster);
        }
    }

    fn add_ref(&mut self, cluster: u64) {
        self.touch(cluster);
        if self.refs[cluster as usize] == 0 && !self.alloc.is_allocated(cluster) {
            self.alloc.mark_allocated(cluster); // loading: the record names a cluster
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

    fn release_tree(&mut self, tree: Tree) {
        // Every cluster the tree names changes sharing, even those in leaves another tree
        // still holds (their reference counts stay, but the survivor may now look like the
        // only owner): none of them may take an in-place write before this is durable, or a
        // crash would bring the tree back over data written since (found by the simulator: a
        // deleted snapshot reappeared with its origin's later writes).
        for (_, e) in tree.entries() {
            if let Some(c) = e.cluster() {
                self.touch(c);
            }
        }
        let mut released = Vec::new();
        tree.release(|e| released.extend(e.cluster()));
        for c in released {
            self.drop_ref(c);
        }
    }

    /// Applies one record to the in-memory state (live operations, replay and checkpoint
    /// loading alike). Records naming volumes that do not exist are ignored (idempotence).
    pub fn apply(&mut self, r: &Record) {
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
                    frozen: 0,
                    writes_inflight: 0,
                };
                if let Some(old) = self.volumes.insert(*id, v) {
                    self.release_tree(old.tree);
                }
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
                    frozen: 0,
                    writes_inflight: 0,
                };
                if let Some(old) = self.volumes.insert(*id, v) {
                    self.release_tree(old.tree);
                }
                self.next_id = self.next_id.max(id + 1);
            }
            Record::Rollback { id, to } => {
                let Some(snap) = self.volumes.get(to) else { return };
                let (tree, size) = (snap.tree.clone(), snap.size_bytes);
                let Some(v) = self.volumes.get_mut(id) else { return };
                let old = std::mem::replace(&mut v.tree, tree);
                v.size_bytes = size;
                self.release_tree(old);
            }
            Record::Delete { id } => {
                if let Some(v) = self.volumes.remove(id) {
                    self.release_tree(v.tree);
                }
            }
            Record::Resize { id, size_bytes } => {
                let cb = self.cluster_bytes;
                let Some(v) = self.volumes.get_mut(id) else { return };
                v.tree.grow(size_bytes.div_ceil(cb).max(1));
                v.size_bytes = *size_bytes;
            }
            Record::ReadOnly { id } => {
                if let Some(v) = self.volumes.get_mut(id) {
                    v.read_only = true;
                }
            }
            Record::Config { key, value } => {
                if value.is_empty() {
                    self.config.remove(key);
                } else {
                    self.config.insert(key.clone(), value.clone());
                }
            }
            // Deletion releases a tree in memory at once (nothing on the media is per-cluster),
            // so there is no reclaim progress to resume.
            Record::ReclaimProgress { .. } => {}
        }
    }

    /// Applies a record and queues it for the next commit.
    pub fn log(&mut self, r: Record) {
        self.apply(&r);
        self.journal.append(r);
    }

    /// Loads records read from the media (checkpoint, then journal blocks in order).
    pub fn load(&mut self, payload: &[u8]) -> Result<(), PoolError> {
        let records = decode_all(payload)
            .map_err(|_| FormatError::Invalid { field: "metadata", why: "undecodable record" })?;
        for r in &records {
            // Checksums make damage unlikely to get here; a record that would index outside
            // the pool still must not crash the daemon.
            if let Record::MapSet { entry, .. } = r {
                if Entry(*entry).cluster().is_some_and(|c| c >= self.sb.cluster_count) {
                    return Err(PoolError::Damaged(format!(
                        "metadata names cluster {} beyond the pool's {} clusters",
                        Entry(*entry).cluster().unwrap_or(0),
                        self.sb.cluster_count
                    )));
                }
            }
            if let Record::VolumeCreate { size_bytes, .. } | Record::Resize { size_bytes, .. } = r {
                if *size_bytes > 1 << 56 {
                    return Err(PoolError::Damaged(format!(
                        "metadata gives a volume an impossible size ({size_bytes} bytes)"
                    )));
                }
            }
            self.apply(r);
        }
        // The frees these records made were durable before any later commit could reuse the
        // clusters (reuse needs a durable free), so they are free for the records that follow.
        self.alloc.commit();
        Ok(())
    }

    /// Replay reached the end: the writer continues after the replayed blocks; everything
    /// loaded is durable.
    pub fn loaded(&mut self, blocks: u64, last: Option<(u64, u32)>) {
        if let Some((seq, crc)) = last {
            self.journal.skip_replayed(blocks, seq, crc);
        }
        self.alloc.commit();
        self.epoch_fresh.clear();
        self.epoch_touched.clear();
    }

    // ---- checking ---------------------------------------------------------------------------

    /// Recounts references from the trees and compares them with the live counts and the
    /// allocator. Returns every discrepancy found.
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let counts = count_references(self.volumes.values().map(|v| &v.tree));
        for (c, &r) in self.refs.iter().enumerate() {
            let want = counts.get(&(c as u64)).copied().unwrap_or(0);
            if r != want {
                problems.push(format!("cluster {c}: refcount {r}, trees say {want}"));
            }
            if r > 0 && !self.alloc.is_allocated(c as u64) {
                problems.push(format!("cluster {c} referenced but not allocated"));
            }
        }
        for (&id, v) in &self.volumes {
            for (vc, e) in v.tree.entries() {
                if let Some(c) = e.cluster() {
                    if c >= self.sb.cluster_count {
                        problems.push(format!(
                            "volume {id} cluster {vc} maps to {c}, beyond the pool's {} clusters",
                            self.sb.cluster_count
                        ));
                    }
                }
                if vc * self.cluster_bytes >= v.size_bytes.next_multiple_of(self.cluster_bytes) {
                    problems.push(format!("volume {id} maps cluster {vc} beyond its end"));
                }
            }
        }
        let referenced = counts.len() as u64;
        let used = self.alloc.used_count();
        if used < referenced {
            problems.push(format!("allocator counts {used} clusters, {referenced} referenced"));
        }
        problems.extend(self.locks.check());
        problems
    }

    /// Clusters allocated but referenced by nothing and not on their way anywhere (leaks):
    /// neither freed and waiting for a commit (pending, sealed into the commit in flight, or
    /// quarantined behind older I/O) nor the fresh cluster of a write span in flight. Exact
    /// at any moment, under load too.
    pub fn leaked(&self) -> u64 {
        let counts = count_references(self.volumes.values().map(|v| &v.tree));
        let quarantined: u64 = self.quarantine.iter().map(|(_, c)| c.len() as u64).sum();
        let accounted = counts.len() as u64
            + quarantined
            + self.alloc.pending_count()
            + self.sealed_frees
            + self.fresh_inflight;
        self.alloc.used_count().saturating_sub(accounted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{layout, PoolGeometry};
    use proptest::prelude::*;

    /// A small pool's layout: 16 KiB clusters, a 16-block journal.
    fn sb() -> Superblock {
        let g = PoolGeometry {
            cluster_shift: 14,
            journal_blocks: 16,
            pool_uuid: [1; 16],
            max_volumes: 8,
            config_bytes: 0,
        };
        layout(1 << 20, &g).expect("a valid layout")
    }

    fn record() -> impl Strategy<Value = Record> {
        prop_oneof![
            4 => (0u32..5, 0u64..40, 0u64..80, any::<u16>()).prop_map(|(volume, vcluster, c, w)| {
                Record::MapSet { volume, vcluster, entry: c | (u64::from(w) << 40) }
            }),
            1 => (1u32..5, 0u32..5, 1u64..(1 << 22)).prop_map(|(id, parent, size_bytes)| {
                Record::VolumeCreate { id, parent, size_bytes, name: format!("v{id}") }
            }),
            1 => (1u32..5, 0u32..5).prop_map(|(id, of)| Record::Snapshot { id, of, name: "s".into() }),
            1 => (1u32..5, 0u32..5).prop_map(|(id, of)| Record::Clone { id, of, name: "c".into() }),
            1 => (1u32..5, 0u32..5).prop_map(|(id, to)| Record::Rollback { id, to }),
            1 => (1u32..5).prop_map(|id| Record::Delete { id }),
            1 => (1u32..5, 1u64..(1 << 23)).prop_map(|(id, size_bytes)| Record::Resize { id, size_bytes }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Metadata that passed its checksums but makes no sense (damage, or a bug that wrote
        /// it) loads or is refused; it never panics, and what loads keeps exact refcounts.
        #[test]
        fn loading_arbitrary_records_never_panics(
            blocks in proptest::collection::vec(proptest::collection::vec(record(), 0..20), 0..8)
        ) {
            let mut m = PoolMeta::new(sb());
            for records in blocks {
                let mut payload = Vec::new();
                for r in &records {
                    r.encode(&mut payload);
                }
                if m.load(&payload).is_err() {
                    return Ok(());
                }
            }
            // `check` may rightly report nonsense (a mapping beyond a volume's end: what
            // `pool check` is for), but the reference counts stay exact.
            let problems: Vec<String> = m
                .check()
                .into_iter()
                .filter(|p| p.contains("refcount") || p.contains("allocat"))
                .collect();
            prop_assert!(problems.is_empty(), "{:?}", problems);
        }
    }
}
