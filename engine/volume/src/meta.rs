//! The in-memory state of an open pool and every decision about it: which clusters a read
//! touches, where a write goes (in place or copy-on-write into a fresh cluster), which records
//! a change logs, what a commit writes, what a checkpoint holds. Pure: no I/O. Two drivers run
//! it: the synchronous reference pool (`pool.rs`, model-tested with crashes) and the reactor
//! device (`dev.rs`), so the tests exercise the decisions the daemon makes.
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

use std::collections::{BTreeMap, HashSet, VecDeque};

use super::alloc::Allocator;
use super::format::{FormatError, Superblock, BLOCK_SIZE};
use super::journal::{JournalError, JournalHead, JournalWriter};
use super::locks::{LockTable, Waiter};
use super::map::{count_references, Entry, Tree};
use super::records::{decode_all, Record, CONFIG_VALUE_MAX, NAME_MAX};

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
    /// New writes wait (a snapshot, clone, rollback, resize or delete is quiescing it).
    pub frozen: bool,
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

impl Sealed {
    /// A placeholder for a commit already handed back.
    pub(crate) fn empty() -> Sealed {
        Sealed { blocks: Vec::new(), frees: Vec::new() }
    }
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
            epoch_fresh: HashSet::new(),
            epoch_touched: HashSet::new(),
            sealed_fresh: HashSet::new(),
            sealed_touched: HashSet::new(),
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

    /// Sets the pending records after which a commit is due without a client's flush.
    pub fn set_commit_records(&mut self, records: usize) {
        self.commit_records = records.max(1);
    }

    /// Whether the driver should start a commit of its own now: at least `commit_records`
    /// records are pending and no commit is in flight or already asked for. True once per
    /// commit: the next seal clears it.
    pub fn take_background_commit(&mut self) -> bool {
        if self.background_asked || self.committing || self.failed.is_some() {
            return false;
        }
        if self.journal.pending() < self.commit_records {
            return false;
        }
        self.background_asked = true;
        true
    }

    /// Whether the driver should arm its commit timer now: records are pending and no timer is
    /// armed. The driver calls `commit_timer_fired` when it fires and commits what is pending
    /// then, so no record waits much longer than the timer for a commit, flush or none.
    pub fn take_commit_timer(&mut self) -> bool {
        if self.timer_armed || self.failed.is_some() || self.journal.pending() == 0 {
            return false;
        }
        self.timer_armed = true;
        true
    }

    /// The commit timer fired: whether records are still pending (commit them).
    pub fn commit_timer_fired(&mut self) -> bool {
        assert!(self.timer_armed, "a commit timer fired that was not armed");
        self.timer_armed = false;
        self.failed.is_none() && self.journal.pending() > 0
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
                    frozen: false,
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
                    frozen: false,
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

    // ---- I/O epochs -------------------------------------------------------------------------

    /// Registers an I/O that may touch clusters named by the current mapping.
    pub fn begin_io(&mut self) -> Ticket {
        *self.inflight.entry(self.io_epoch).or_default() += 1;
        Ticket(self.io_epoch)
    }

    pub fn end_io(&mut self, t: Ticket) {
        let n = self.inflight.get_mut(&t.0).expect("ticket of an I/O in flight");
        *n -= 1;
        if *n == 0 {
            self.inflight.remove(&t.0);
        }
        self.release_quarantine();
    }

    fn release_quarantine(&mut self) {
        let oldest = self.inflight.keys().next().copied().unwrap_or(self.io_epoch + 1);
        while self.quarantine.front().is_some_and(|(e, _)| *e < oldest) {
            let (_, clusters) = self.quarantine.pop_front().expect("checked");
            self.alloc.release(&clusters);
        }
    }

    // ---- reads ------------------------------------------------------------------------------

    fn check_range(&self, id: u32, offset: u64, len: u64, write: bool) -> Result<(), PoolError> {
        let v = self.volume(id)?;
        if write && v.read_only {
            return Err(PoolError::ReadOnly(id));
        }
        if !offset.is_multiple_of(PIECE) || !len.is_multiple_of(PIECE) {
            return Err(PoolError::Unaligned);
        }
        if offset.checked_add(len).is_none_or(|end| end > v.size_bytes) {
            return Err(PoolError::Range(id));
        }
        Ok(())
    }

    /// Where `[offset, offset + len)` of volume `id` comes from, in order, runs merged.
    pub fn plan_read(&self, id: u32, offset: u64, len: u64) -> Result<Vec<ReadPiece>, PoolError> {
        self.check_range(id, offset, len, false)?;
        let tree = &self.volumes[&id].tree;
        let mut out: Vec<ReadPiece> = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let Span { vc, cluster_end, first_bit, bits } = self.span(at, offset + len);
            let e = tree.get(vc);
            for bit in first_bit..first_bit + u64::from(bits.count_ones()) {
                let piece = match e.cluster() {
                    Some(c) if e.written() & (1 << bit) != 0 => {
                        ReadPiece::Disk { offset: self.cluster_offset(c) + bit * PIECE, len: PIECE }
                    }
                    _ => ReadPiece::Zero { len: PIECE },
                };
                match (out.last_mut(), piece) {
                    (Some(ReadPiece::Zero { len }), ReadPiece::Zero { len: add }) => *len += add,
                    (
                        Some(ReadPiece::Disk { offset: o, len }),
                        ReadPiece::Disk { offset: next, len: add },
                    ) if *o + *len == next => *len += add,
                    _ => out.push(piece),
                }
            }
            at = cluster_end;
        }
        Ok(out)
    }

    // ---- writes -----------------------------------------------------------------------------

    /// Plans a write of `[offset, offset + len)`: one plan per cluster it touches.
    /// [`Blocked::Wait`] when a cluster it needs is being copied or the volume is frozen:
    /// nothing was reserved and `waiter` is parked until that changes. Each plan must be
    /// finished with `finish_span` (or `abort_span`), then the write with `end_write`.
    pub fn plan_write(
        &mut self,
        id: u32,
        offset: u64,
        len: u64,
        hold: u64,
        waiter: Waiter,
    ) -> Result<Vec<WritePlan>, Blocked> {
        self.ok()?;
        self.check_range(id, offset, len, true)?;
        let v = &self.volumes[&id];
        // A frozen volume takes no new write; a read-modify-write that holds its clusters is
        // already in flight (counted by the freeze) and must finish, or the freeze would wait
        // for it forever.
        if v.frozen && hold == 0 {
            self.locks.park_frozen(id, waiter);
            return Err(Blocked::Wait);
        }
        // First decide every span (no state changes), so a busy span reserves nothing.
        let mut spans = Vec::new();
        let mut fresh_needed = 0u64;
        let mut at = offset;
        while at < offset + len {
            let s = self.span(at, offset + len);
            let state = self.locks.state(id, s.vc);
            // A cluster held by a read-modify-write takes only that request's write.
            if state.cow || (state.held != 0 && state.held != hold) {
                self.locks.park_cluster(id, s.vc, waiter);
                return Err(Blocked::Wait);
            }
            let e = v.tree.get(s.vc);
            let owned = e.cluster().is_some_and(|c| {
                self.refs[c as usize] == 1
                    && !v.tree.leaf_shared(s.vc)
                    && !self.epoch_touched.contains(&c)
                    && !self.sealed_touched.contains(&c)
            });
            if !owned {
                // A mutant for the simulator's own test (tests/mutants.sh): a copy-on-write
                // ignores the writers already in the cluster.
                if state.writers > 0 && !cfg!(feature = "mutant-skip-lock") {
                    self.locks.park_cluster(id, s.vc, waiter);
                    return Err(Blocked::Wait);
                }
                fresh_needed += 1;
            }
            spans.push((at, s, e, owned));
            at = spans.last().expect("pushed").1.cluster_end;
        }
        if fresh_needed > self.alloc.free_count() {
            return Err(PoolError::NoSpace.into());
        }
        let mut plans = Vec::with_capacity(spans.len());
        for (at, s, e, owned) in spans {
            let (cluster, copy_from) = if owned {
                (e.cluster().expect("owned means mapped"), None)
            } else {
                let fresh = self.alloc.alloc().ok_or(PoolError::NoSpace)?;
                self.epoch_fresh.insert(fresh);
                (fresh, e.cluster().map(|old| self.cluster_offset(old)))
            };
            self.locks.add_writer(id, s.vc, !owned);
            plans.push(WritePlan {
                vcluster: s.vc,
                offset: self.cluster_offset(cluster) + s.first_bit * PIECE,
                req_start: at - offset,
                req_len: s.cluster_end - at,
                cluster,
                copy_from,
                fresh: !owned,
                bits: s.bits,
                base_written: if owned { 0 } else { e.written() },
            });
        }
        self.volumes.get_mut(&id).expect("checked").writes_inflight += 1;
        Ok(plans)
    }

    fn unbusy(&mut self, id: u32, vc: u64) {
        self.locks.remove_writer(id, vc);
    }

    /// Holds volume clusters `vcs` exclusively for a read-modify-write (an unaligned write):
    /// no other write, copy-on-write or trim touches them until `release`, so the pieces read
    /// and merged cannot change meanwhile. [`Blocked::Wait`] when one is in use or the volume
    /// is frozen (`waiter` parked).
    pub fn hold(&mut self, id: u32, vcs: &[u64], waiter: Waiter) -> Result<u64, Blocked> {
        self.ok()?;
        let v = self.volume(id)?;
        if v.read_only {
            return Err(PoolError::ReadOnly(id).into());
        }
        if v.frozen {
            self.locks.park_frozen(id, waiter);
            return Err(Blocked::Wait);
        }
        if let Some(vc) = vcs.iter().find(|vc| self.locks.busy(id, **vc)) {
            self.locks.park_cluster(id, *vc, waiter);
            return Err(Blocked::Wait);
        }
        self.next_hold += 1;
        let token = self.next_hold;
        for vc in vcs {
            self.locks.hold(id, *vc, token);
        }
        self.volumes.get_mut(&id).expect("checked").writes_inflight += 1;
        Ok(token)
    }

    pub fn release(&mut self, id: u32, vcs: &[u64], token: u64) {
        for vc in vcs {
            self.locks.unhold(id, *vc, token);
        }
        self.end_write(id);
    }

    /// One plan's data is on the media (completed, not necessarily durable): map it.
    pub fn finish_span(&mut self, id: u32, p: &WritePlan) {
        self.unbusy(id, p.vcluster);
        let Some(v) = self.volumes.get(&id) else {
            if p.fresh {
                self.abandon_fresh(p);
            }
            return;
        };
        let e = v.tree.get(p.vcluster);
        let entry = if p.fresh {
            // The fresh cluster holds the carried-over pieces plus the new ones; the cluster's
            // exclusive hold kept the entry as planned.
            Entry::new(p.cluster, p.base_written | p.bits)
        } else if e.cluster() == Some(p.cluster) {
            Entry::new(p.cluster, e.written() | p.bits)
        } else {
            return;
        };
        if entry != e {
            self.log(Record::MapSet { volume: id, vcluster: p.vcluster, entry: entry.0 });
        }
    }

    fn abandon_fresh(&mut self, p: &WritePlan) {
        if self.refs[p.cluster as usize] == 0 && self.alloc.is_allocated(p.cluster) {
            self.alloc.free(p.cluster);
        }
    }

    /// A planned span failed: a fresh cluster goes back, the mapping is unchanged.
    pub fn abort_span(&mut self, id: u32, p: &WritePlan) {
        self.unbusy(id, p.vcluster);
        if p.fresh {
            self.abandon_fresh(p);
        }
    }

    /// Every span of a planned write has finished or aborted.
    pub fn end_write(&mut self, id: u32) {
        if let Some(v) = self.volumes.get_mut(&id) {
            v.writes_inflight -= 1;
            if v.writes_inflight == 0 {
                self.locks.drained(id);
            }
        }
    }

    /// Trims whole 4 KiB pieces: they read zeros; a cluster with no written piece is released.
    /// [`Blocked::Wait`] when a write to one of its clusters is in flight or the volume is
    /// frozen (`waiter` parked).
    pub fn trim(&mut self, id: u32, offset: u64, len: u64, waiter: Waiter) -> Result<(), Blocked> {
        self.ok()?;
        self.check_range(id, offset, len, true)?;
        if self.volumes[&id].frozen {
            self.locks.park_frozen(id, waiter);
            return Err(Blocked::Wait);
        }
        let mut at = offset;
        while at < offset + len {
            let s = self.span(at, offset + len);
            if self.locks.busy(id, s.vc) {
                self.locks.park_cluster(id, s.vc, waiter);
                return Err(Blocked::Wait);
            }
            at = s.cluster_end;
        }
        self.trim_unchecked(id, offset, len);
        Ok(())
    }

    /// Trims a checked range of a volume nothing else is writing.
    fn trim_unchecked(&mut self, id: u32, offset: u64, len: u64) {
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
    }

    // ---- commits and checkpoints ------------------------------------------------------------

    pub fn committing(&self) -> bool {
        self.committing
    }

    pub fn seals(&self) -> u64 {
        self.seals
    }

    pub fn durable_seals(&self) -> u64 {
        self.durable_seals
    }

    /// Whether the next commit should be a checkpoint instead (the ring is three quarters
    /// used, or the pending records would not fit).
    pub fn wants_checkpoint(&self) -> bool {
        let free = self.journal.blocks_free();
        let ring = self.sb.journal_blocks;
        let pending_blocks = (self.journal.pending() as u64 * 40).div_ceil(3800) + 1;
        free < ring / 4 || pending_blocks > free
    }

    /// Starts a commit: takes the pending records as journal blocks. The caller makes the
    /// data durable (and earlier blocks), writes the blocks with FUA in order, then calls
    /// `commit_done`. `None` while another commit is in flight.
    pub fn seal(&mut self) -> Result<Option<Sealed>, PoolError> {
        self.ok()?;
        if self.committing {
            return Ok(None);
        }
        let records = self.journal.pending();
        let blocks = self.journal.commit()?;
        tracing::debug!(records, "sealing a commit");
        self.committing = true;
        self.background_asked = false;
        self.seals += 1;
        self.sealed_fresh = std::mem::take(&mut self.epoch_fresh);
        self.sealed_touched = std::mem::take(&mut self.epoch_touched);
        Ok(Some(Sealed { blocks, frees: self.alloc.seal() }))
    }

    /// The sealed commit is durable.
    pub fn commit_done(&mut self, sealed: Sealed) {
        assert!(self.committing);
        self.committing = false;
        self.durable_seals = self.seals;
        self.sealed_fresh.clear();
        self.sealed_touched.clear();
        self.quarantine.push_back((self.io_epoch, sealed.frees));
        self.io_epoch += 1;
        self.release_quarantine();
        self.locks.commit_ended();
    }

    /// Encodes the whole state as records (the checkpoint): parents before children, each
    /// snapshot or clone as its creation record plus the entries where it differs from its
    /// parent, so loading it shares leaves the way the live trees do.
    pub fn checkpoint_payload(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (key, value) in &self.config {
            Record::Config { key: key.clone(), value: value.clone() }.encode(&mut out);
        }
        for (&id, v) in &self.volumes {
            let base = match self.volumes.get(&v.parent) {
                Some(p) if v.parent < id => {
                    let r = if v.read_only {
                        Record::Snapshot { id, of: v.parent, name: v.name.clone() }
                    } else {
                        Record::Clone { id, of: v.parent, name: v.name.clone() }
                    };
                    r.encode(&mut out);
                    if p.size_bytes != v.size_bytes {
                        Record::Resize { id, size_bytes: v.size_bytes }.encode(&mut out);
                    }
                    Some(&p.tree)
                }
                _ => {
                    Record::VolumeCreate {
                        id,
                        parent: v.parent,
                        size_bytes: v.size_bytes,
                        name: v.name.clone(),
                    }
                    .encode(&mut out);
                    if v.read_only {
                        Record::ReadOnly { id }.encode(&mut out);
                    }
                    None
                }
            };
            let mine = v.tree.entries();
            match base {
                None => {
                    for (vc, e) in mine {
                        Record::MapSet { volume: id, vcluster: vc, entry: e.0 }.encode(&mut out);
                    }
                }
                Some(parent) => {
                    let theirs: BTreeMap<u64, Entry> = parent.entries().into_iter().collect();
                    let mine_map: BTreeMap<u64, Entry> = mine.into_iter().collect();
                    for (vc, e) in &mine_map {
                        if theirs.get(vc) != Some(e) {
                            Record::MapSet { volume: id, vcluster: *vc, entry: e.0 }
                                .encode(&mut out);
                        }
                    }
                    for vc in theirs.keys() {
                        if !mine_map.contains_key(vc) && *vc < v.tree.capacity() {
                            Record::MapSet { volume: id, vcluster: *vc, entry: 0 }.encode(&mut out);
                        }
                    }
                }
            }
        }
        out
    }

    /// Blocks of each metadata half.
    pub fn checkpoint_half_blocks(&self) -> u64 {
        self.sb.meta_blocks / 2
    }

    /// Starts a checkpoint of the current state: encodes it (header + records, padded to
    /// blocks) for the metadata half the live superblock does not name, and the superblock
    /// that will name it and move the journal head here. The pending records are covered by
    /// it (they need no journal block); the frees so far are sealed with it. Like a commit, no
    /// other commit runs until `checkpoint_done`. The caller then: flushes the media (the data
    /// of every mapped record), writes the blob, flushes, writes the superblock with FUA.
    /// `None` while a commit is in flight.
    pub fn begin_checkpoint(&mut self) -> Result<Option<Checkpoint>, PoolError> {
        self.ok()?;
        if self.committing {
            return Ok(None);
        }
        let payload = self.checkpoint_payload();
        let mut blob = Vec::with_capacity(payload.len() + BLOCK_SIZE);
        blob.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        blob.extend_from_slice(&payload);
        blob.resize(blob.len().next_multiple_of(BLOCK_SIZE), 0);
        // `admit` keeps the worst case inside the half, so this cannot fail on a sound pool.
        let limit = self.checkpoint_half_blocks() * BLOCK_SIZE as u64;
        assert!(blob.len() as u64 <= limit, "checkpoint of {} bytes exceeds its half", blob.len());
        let head = self.journal.head();
        let half = 1 - self.sb.checkpoint_half;
        let sb = Superblock {
            generation: self.sb.generation + 1,
            checkpoint_half: half,
            checkpoint_blocks: blob.len() as u64 / BLOCK_SIZE as u64,
            checkpoint_crc: crc32c::crc32c(&blob),
            checkpoint_seq: head.seq,
            journal_head_seq: head.seq,
            journal_head_block: head.block,
            journal_head_prev_crc: head.prev_crc,
            ..self.sb.clone()
        };
        self.journal.discard_pending();
        self.committing = true;
        self.background_asked = false;
        self.seals += 1;
        self.sealed_fresh = std::mem::take(&mut self.epoch_fresh);
        self.sealed_touched = std::mem::take(&mut self.epoch_touched);
        Ok(Some(Checkpoint {
            blob_offset: self.checkpoint_offset(half),
            blob,
            sb,
            frees: self.alloc.seal(),
        }))
    }

    /// The checkpoint's superblock is durable.
    pub fn checkpoint_done(&mut self, c: Checkpoint) {
        assert!(self.committing);
        self.committing = false;
        self.durable_seals = self.seals;
        self.sb = c.sb;
        // Nothing was written to the ring since `begin_checkpoint` (commits waited).
        self.journal.checkpointed();
        self.sealed_fresh.clear();
        self.sealed_touched.clear();
        self.quarantine.push_back((self.io_epoch, c.frees));
        self.io_epoch += 1;
        self.release_quarantine();
        self.locks.commit_ended();
    }

    /// Metadata area byte offset of checkpoint half `half`.
    pub fn checkpoint_offset(&self, half: u8) -> u64 {
        (self.sb.meta_start + u64::from(half) * self.checkpoint_half_blocks()) * BLOCK_SIZE as u64
    }

    // ---- volume operations ------------------------------------------------------------------

    /// The largest checkpoint the state could need if every volume were fully written, with
    /// `clusters` more volume clusters, `volumes` more volumes and `config` more config bytes.
    fn worst_checkpoint(&self, clusters: u64, volumes: u64, config: u64) -> u64 {
        let mapped: u64 =
            self.volumes.values().map(|v| v.size_bytes.div_ceil(self.cluster_bytes)).sum();
        let config_now: u64 = self
            .config
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64 + CHECKPOINT_BYTES_PER_CONFIG)
            .sum();
        (mapped + clusters) * CHECKPOINT_BYTES_PER_CLUSTER
            + (self.volumes.len() as u64 + volumes) * CHECKPOINT_BYTES_PER_VOLUME
            + config_now
            + config
            + CHECKPOINT_HEADER
    }

    /// Refuses a change after which a checkpoint might not fit its metadata half.
    fn admit(&self, extra_bytes: u64, volumes: u64, config: u64) -> Result<(), PoolError> {
        let limit = self.checkpoint_half_blocks() * BLOCK_SIZE as u64;
        let wanted =
            self.worst_checkpoint(extra_bytes.div_ceil(self.cluster_bytes), volumes, config);
        if wanted > limit {
            return Err(PoolError::Overprovisioned { limit, wanted });
        }
        Ok(())
    }

    fn new_name(&self, name: &str) -> Result<(), PoolError> {
        if !valid_name(name) {
            return Err(PoolError::BadName(name.into()));
        }
        if self.volumes.values().any(|v| v.name == name) {
            return Err(PoolError::NameTaken(name.into()));
        }
        Ok(())
    }

    /// Whether volume `id` has no write in flight (a freeze has taken effect).
    pub fn quiet(&self, id: u32) -> bool {
        self.volumes.get(&id).is_none_or(|v| v.writes_inflight == 0)
    }

    pub fn set_frozen(&mut self, id: u32, frozen: bool) {
        if let Some(v) = self.volumes.get_mut(&id) {
            v.frozen = frozen;
        }
        if !frozen {
            self.locks.thawed(id);
        }
    }

    /// Parks `waiter` (a control operation) until volume `id` has no write in flight.
    pub fn park_drained(&mut self, id: u32, waiter: Waiter) {
        if self.quiet(id) {
            // Nothing would wake it: it proceeds at once.
            self.locks.park_drained(id, waiter);
            self.locks.drained(id);
        } else {
            self.locks.park_drained(id, waiter);
        }
    }

    /// Parks `waiter` until the commit (or checkpoint) in flight ends.
    pub fn park_commit(&mut self, waiter: Waiter) {
        assert!(self.committing || self.failed.is_some(), "parking with no commit in flight");
        self.locks.park_commit(waiter);
    }

    /// Moves the requests woken since the last call into `out`.
    pub fn take_woken(&mut self, out: &mut Vec<Waiter>) {
        self.locks.take_woken(out);
    }

    /// The lock table (for statistics and checks).
    pub fn locks(&self) -> &LockTable {
        &self.locks
    }

    pub fn create_volume(&mut self, name: &str, size_bytes: u64) -> Result<u32, PoolError> {
        self.ok()?;
        self.new_name(name)?;
        if size_bytes == 0 || !size_bytes.is_multiple_of(PIECE) {
            return Err(PoolError::BadSize);
        }
        self.admit(size_bytes, 1, 0)?;
        let id = self.next_id;
        self.log(Record::VolumeCreate { id, parent: 0, size_bytes, name: name.into() });
        Ok(id)
    }

    /// A read-only snapshot: O(1), it shares the volume's mapping. The caller has quiesced
    /// writes to `of`.
    pub fn snapshot(&mut self, of: u32, name: &str) -> Result<u32, PoolError> {
        self.ok()?;
        let size = self.volume(of)?.size_bytes;
        self.new_name(name)?;
        self.admit(size, 1, 0)?;
        let id = self.next_id;
        self.log(Record::Snapshot { id, of, name: name.into() });
        Ok(id)
    }

    /// A writable clone of a snapshot.
    pub fn clone_volume(&mut self, of: u32, name: &str) -> Result<u32, PoolError> {
        self.ok()?;
        let src = self.volume(of)?;
        if !src.read_only {
            return Err(PoolError::NotSnapshot(of));
        }
        let size = src.size_bytes;
        self.new_name(name)?;
        self.admit(size, 1, 0)?;
        let id = self.next_id;
        self.log(Record::Clone { id, of, name: name.into() });
        Ok(id)
    }

    /// Volume `id` gets the contents (and size) of its snapshot `to`. The caller has quiesced
    /// writes to `id`.
    pub fn rollback(&mut self, id: u32, to: u32) -> Result<(), PoolError> {
        self.ok()?;
        let v = self.volume(id)?;
        if v.read_only {
            return Err(PoolError::ReadOnly(id));
        }
        let snap = self.volume(to)?;
        if !snap.read_only {
            return Err(PoolError::NotSnapshot(to));
        }
        if snap.parent != id {
            return Err(PoolError::NotSnapshotOf { snap: to, vol: id });
        }
        let grow = snap.size_bytes.saturating_sub(v.size_bytes);
        self.admit(grow, 0, 0)?;
        self.log(Record::Rollback { id, to });
        Ok(())
    }

    pub fn delete(&mut self, id: u32) -> Result<(), PoolError> {
        self.ok()?;
        self.volume(id)?;
        self.log(Record::Delete { id });
        Ok(())
    }

    /// Grows or shrinks volume `id`. Shrinking drops written data beyond the new end only with
    /// `force` (that data is trimmed first). The caller has quiesced writes to `id`.
    pub fn resize(&mut self, id: u32, size_bytes: u64, force: bool) -> Result<(), PoolError> {
        self.ok()?;
        let v = self.volume(id)?;
        if v.read_only {
            return Err(PoolError::ReadOnly(id));
        }
        if size_bytes == 0 || !size_bytes.is_multiple_of(PIECE) {
            return Err(PoolError::BadSize);
        }
        let old = v.size_bytes;
        if size_bytes > old {
            self.admit(size_bytes - old, 0, 0)?;
        } else if size_bytes < old {
            let first_piece = size_bytes / PIECE;
            let written = (first_piece..old / PIECE).any(|p| self.piece_written(id, p));
            if written && !force {
                return Err(PoolError::WouldDropData(id));
            }
            // Trim whole pieces beyond the new end so nothing stale reappears on growth. The
            // volume is quiesced (frozen, no write in flight), so nothing can be busy.
            self.trim_unchecked(id, size_bytes, old - size_bytes);
        }
        self.log(Record::Resize { id, size_bytes });
        Ok(())
    }

    pub fn set_config(&mut self, key: &str, value: &str) -> Result<(), PoolError> {
        self.ok()?;
        if key.is_empty() || key.len() > NAME_MAX || value.len() > CONFIG_VALUE_MAX {
            return Err(PoolError::BadConfig);
        }
        self.admit(0, 0, (key.len() + value.len()) as u64 + CHECKPOINT_BYTES_PER_CONFIG)?;
        self.log(Record::Config { key: key.into(), value: value.into() });
        Ok(())
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

    /// Clusters allocated but referenced by nothing and not waiting for a commit (leaks).
    pub fn leaked(&self) -> u64 {
        let counts = count_references(self.volumes.values().map(|v| &v.tree));
        let quarantined: u64 = self.quarantine.iter().map(|(_, c)| c.len() as u64).sum();
        self.alloc.used_count() - counts.len() as u64 - quarantined - self.alloc.pending_count()
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
