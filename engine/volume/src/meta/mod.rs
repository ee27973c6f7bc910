//! The in-memory state of an open pool and every decision about it: which clusters a read
//! touches, where a write goes (in place or copy-on-write into a fresh cluster), which records
//! a change logs, what a commit writes, what a checkpoint holds. Pure: no I/O. Requests
//! (`request.rs`) consult it; their drivers — the daemon's reactor adapter, the synchronous
//! pool, the simulator — run the same decisions.
//!
//! The state is in two parts, the split per-family ownership will move between cores
//! (docs/VOLUMES.md): the pool part here (superblock, allocator, journal, configuration, the
//! commit pipeline, health; `apply` and loading, checks) and the family part (`family`:
//! volumes, trees, the lock table, I/O epochs, the in-place/copy-on-write sets, a stock of
//! free clusters lent by the allocator). A family decision reaches the pool only through a
//! `Link` (the reference counts, shared; the allocator too while loading); the pool counts
//! the records a family call queued, and refills a family's stock when a write finds it
//! short. Who may decide at once: the data path's decisions (`plan_read_io`, `plan_write_io`,
//! `finish_span`, `end_write_io`, `trim`, `hold_io`/`release`, I/O tickets) take `&self` — a
//! shared borrow several threads may hold at once — and lock the one family they decide for,
//! as a step of what control operations left does (`settle`: mapping a thick volume's
//! clusters, releasing a deleted volume's tree); everything else takes `&mut self`, an
//! exclusive borrow that reaches every family without contention. Lock order: families'
//! locks in number order, then the leaf locks (the allocator's, the wake-up queue's, the
//! queues of retired trees and of thick volumes being mapped), which nothing holds while
//! taking another lock — but `check` and `leaked`, which take the two queues, then the
//! allocator's. A
//! decision locks one family only (a write that takes other families' stocks back takes them
//! one at a time, holding nothing else); `check` and `leaked` lock every family, in number
//! order. So nothing can deadlock. The decisions live beside them by concern: `io` (reads,
//! writes, holds, trims), `commit` (sealing, checkpoints, when a commit is due), `control`
//! (volume operations and metadata admission), `settle` (what control operations leave to
//! do in steps), `epochs` (I/O tickets and the quarantine of
//! freed clusters), `touched` (which families a commit visits: those changed since the last
//! seal, so a commit's cost follows what changed, not how many volumes the pool holds).
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
//! - `refs[c]` equals the number of distinct leaves naming cluster `c`, over the volumes' trees
//!   and the retired trees not yet released (`check` recomputes it);
//! - a cluster freed by a record becomes reusable only when that record is durable and every
//!   I/O that started before (and so might still touch the cluster) has ended (`quarantine`);
//! - metadata cannot fill: a checkpoint holds at most one record per mapped volume cluster, and
//!   volumes may only be created, cloned, snapshotted or grown while the sum of all volume sizes
//!   stays within the provisioning limit the metadata area was sized for at `format`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, MutexGuard};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::alloc::{Allocator, Stock};
use crate::format::{FormatError, Superblock, BLOCK_SIZE};
use crate::journal::{JournalBatch, JournalBlocks, JournalError, JournalHead, JournalWriter};
use crate::locks::{LockTable, Waiter};

mod commit;
pub use commit::{Encode, EncodeState, Encoded, Frozen, StateBlob};
mod control;
mod epochs;
mod family;
use family::{Families, Family, Geometry, Link, Refs, Retire, Retiree};
mod io;
mod settle;
use settle::Filling;
mod touched;
use crate::map::{count_references, Entry, Remains, Tree, FANOUT};
use crate::records::{decode_all, Record, CONFIG_VALUE_MAX, NAME_MAX};
use touched::Touched;

/// Piece size tracked by the written bitmap: the pool's I/O granularity.
pub const PIECE: u64 = 4096;
/// Total volume size (snapshots and clones included) the metadata area is sized for, per byte
/// of data area, by default.
pub const OVERCOMMIT: u64 = 8;
/// Bytes of data one copy-up request (`WriteKind::Own`) copies at most — with 64 KiB
/// clusters 16 clusters, 1 MiB of copy buffers in flight for it: a cluster with data past
/// that is left to the next request (`ops::decouple` sends ranges holding no more).
pub const OWN_COPY_MAX: u64 = 1 << 20;

/// Clusters one operation may map for a thick volume (its creation, a growth, an inflation, a
/// repair after a crash): 64 GiB of the standard 64 KiB clusters. Each is a record; a creation,
/// growth or inflation reserves them and maps them in steps (`settle`), a repair at open maps
/// them before anything is served; what one crash can leave to map at open is so bounded: a
/// larger thick volume is made in steps, created at most this large, then grown.
pub const THICK_MAP_MAX: u64 = 1 << 20;

/// Volume ids run from 1 below this (0 is "no parent"); a record naming another is damage.
pub const VOLUME_ID_MAX: u32 = u32::MAX;
/// Pending journal records after which a commit starts without waiting for a client's flush,
/// by default (`PoolMeta::set_commit_records`).
pub const COMMIT_RECORDS: usize = 4096;
/// Bytes a checkpoint needs per mapped volume cluster (one `MapSet` record).
const CHECKPOINT_BYTES_PER_CLUSTER: u64 = 21;
/// Bytes a checkpoint needs per volume: its creation record with the longest name, plus its
/// attributes (`Resize` or `ReadOnly`, and `Thick`).
const CHECKPOINT_BYTES_PER_VOLUME: u64 = 29 + NAME_MAX as u64;
/// Bytes a checkpoint needs per configuration entry beyond its key and value.
const CHECKPOINT_BYTES_PER_CONFIG: u64 = 4;
/// Checkpoint header: the payload length.
pub const CHECKPOINT_HEADER: u64 = 8;

/// A volume as an error names it: by id (what the core decides by), and by name where
/// whoever passes the error on knew it ([`PoolError::named`]: the daemon names them for its
/// clients, who know volumes by name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vol {
    pub id: u32,
    pub name: Option<String>,
}

impl From<u32> for Vol {
    fn from(id: u32) -> Self {
        Vol { id, name: None }
    }
}

impl PartialEq<u32> for Vol {
    fn eq(&self, id: &u32) -> bool {
        self.id == *id
    }
}

impl std::fmt::Display for Vol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name:?}"),
            None => write!(f, "{}", self.id),
        }
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
    #[error("no volume named {0:?}")]
    NoName(String),
    #[error("a volume named {0:?} already exists")]
    NameTaken(String),
    #[error("invalid volume name {0:?}: 1 to {NAME_MAX} bytes of [A-Za-z0-9._:-]")]
    BadName(String),
    #[error("volume {0} is read-only (a snapshot)")]
    ReadOnly(Vol),
    #[error("volume {0} is not a snapshot")]
    NotSnapshot(Vol),
    #[error("snapshot {snap} was not taken of volume {vol}")]
    NotSnapshotOf { snap: Vol, vol: Vol },
    #[error("volume {base} is not of volume {vol}'s family (its snapshots, clones and origin)")]
    OtherFamily { vol: Vol, base: Vol },
    #[error("range beyond the end of volume {0}")]
    Range(Vol),
    #[error("I/O must be aligned to {PIECE} bytes")]
    Unaligned,
    #[error("volume size must be a positive multiple of {PIECE} bytes")]
    BadSize,
    #[error("shrinking volume {0} would drop written data (force to discard it)")]
    WouldDropData(Vol),
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
    #[error(
        "the device has {device} bytes, fewer than the {pool} bytes the pool spans: a pool \
         cannot shrink (was the device truncated, or is it the wrong one?)"
    )]
    DeviceShrank { pool: u64, device: u64 },
    #[error(
        "a thick volume maps at most {max} clusters in one operation and this one needs \
         {wanted}: create it smaller and grow it in steps, or make it thin"
    )]
    ThickTooLarge { wanted: u64, max: u64 },
    #[error(
        "inflating maps at most {max} unmapped clusters in one operation and this volume \
         leaves {wanted} unmapped: decouple it instead (it stays thin), or write what it lacks"
    )]
    InflateTooLarge { wanted: u64, max: u64 },
    #[error(
        "no volume id is left: a volume has the highest ({}); ids only grow while the pool \
         is open, so delete that volume and restart the daemon to count from the highest in \
         use again", VOLUME_ID_MAX - 1
    )]
    IdsExhausted,
    #[error("volume {0}'s writes did not drain in time; nothing was changed")]
    Busy(Vol),
    #[error("a commit is in flight and no core is left to finish it")]
    CommitStranded,
    #[error("volume {vol} still shares {clusters} clusters with another volume (a snapshot taken meanwhile)")]
    StillShared { vol: Vol, clusters: u64 },
    #[error("volume {0} has no parent and shares no cluster: nothing to decouple it from")]
    NoParent(Vol),
    #[error(
        "{limit} decouplings or inflations are running, the most the daemon runs at once \
         (--max-decouples): ask again when one has ended"
    )]
    DecouplesBusy { limit: u64 },
    #[error(
        "volume {0} is being decoupled or inflated: ask again once that has ended (it is \
         listed no clone from then on)"
    )]
    Decoupling(Vol),
    #[error("the pool's commit did not finish in time")]
    CommitTimeout,
    #[error("pool I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the pool failed an I/O and is now read-only until restarted: {0}")]
    Failed(String),
}

impl PoolError {
    /// The same error with the volumes it names by id named by `name` too (a volume it no
    /// longer finds keeps its id alone; one named already keeps its name).
    pub fn named(self, name: impl Fn(u32) -> Option<String>) -> Self {
        let n = |v: Vol| Vol { name: v.name.or_else(|| name(v.id)), ..v };
        use PoolError as E;
        match self {
            E::ReadOnly(v) => E::ReadOnly(n(v)),
            E::NotSnapshot(v) => E::NotSnapshot(n(v)),
            E::NotSnapshotOf { snap, vol } => E::NotSnapshotOf { snap: n(snap), vol: n(vol) },
            E::OtherFamily { vol, base } => E::OtherFamily { vol: n(vol), base: n(base) },
            E::Range(v) => E::Range(n(v)),
            E::WouldDropData(v) => E::WouldDropData(n(v)),
            E::Busy(v) => E::Busy(n(v)),
            E::StillShared { vol, clusters } => E::StillShared { vol: n(vol), clusters },
            E::NoParent(v) => E::NoParent(n(v)),
            E::Decoupling(v) => E::Decoupling(n(v)),
            other => other,
        }
    }
}

#[derive(Clone)]
pub struct Volume {
    pub name: String,
    pub size_bytes: u64,
    pub read_only: bool,
    /// The volume this one was snapshotted or cloned from (0 for none); kept for listings even
    /// after the parent is deleted.
    pub parent: u32,
    /// Thick (`Record::Thick`): every cluster within its size is mapped and named by its tree
    /// alone, so a write never needs a fresh cluster; a trim keeps the clusters; a growth maps
    /// its clusters in the same operation (and opening the pool maps what a crash left out).
    /// A snapshot of it or a rollback makes it thin.
    pub thick: bool,
    pub(crate) tree: Tree,
    /// Control operations quiescing it (snapshot, rollback, resize, delete): while any does,
    /// new writes wait.
    pub frozen: u32,
    /// Writes planned and not yet finished.
    pub writes_inflight: u32,
    /// Written 4 KiB pieces its tree maps, kept with every change to the tree (a listing or a
    /// `/metrics` scrape reads it instead of walking the map under the family's lock).
    pub(crate) written_pieces: u64,
    /// Clusters promised to it and not yet mapped: a thick volume made or grown, its
    /// clusters reserved in the allocator and mapped in steps (`settle`), or by a write into
    /// one first. 0 once all are mapped; never durable (opening maps what a crash left out).
    pub(crate) fill: u64,
}

/// A volume's attributes, copied out of its family (listings, control operations, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeAttrs {
    pub name: String,
    pub size_bytes: u64,
    pub read_only: bool,
    pub parent: u32,
    pub thick: bool,
    pub frozen: u32,
    pub writes_inflight: u32,
}

impl Volume {
    pub fn attrs(&self) -> VolumeAttrs {
        VolumeAttrs {
            name: self.name.clone(),
            size_bytes: self.size_bytes,
            read_only: self.read_only,
            parent: self.parent,
            thick: self.thick,
            frozen: self.frozen,
            writes_inflight: self.writes_inflight,
        }
    }
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

/// What a planned write puts in the clusters it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// The request's data, over its range.
    Data,
    /// Nothing new (`Cmd::Own`): each cluster another volume names too (a snapshot, a clone,
    /// its origin) is copied whole into a fresh one, mapped with the same written pieces, so
    /// the volume shares it no more and reads the same. With `in_place`, also each cluster a
    /// write could not land in now (its sharing changed since the last durable commit: the
    /// write path's test), so that none of its writes needs a fresh cluster (inflating: a
    /// thick volume's writes never do).
    Own { in_place: bool },
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
    encode: Option<EncodeState>,
    /// Empty until encoded (`Checkpoint::encoded`).
    pub blob: Vec<u8>,
    /// The superblock naming it, to write (FUA, at copy `sb.slot()`) once the blob is durable.
    pub sb: Superblock,
    /// Clusters it frees.
    frees: usize,
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
/// they describe is durable. Sealed with its records and their blocks reserved; the blocks are
/// there once the records are encoded ([`Sealed::take_encode`] then [`Sealed::encoded`], or
/// [`Sealed::encode_now`]), and go once copied into the device's write buffers
/// ([`Sealed::blocks_issued`]): the commit's end needs only their last crc.
pub struct Sealed {
    journal: SealedJournal,
    /// Clusters it frees.
    frees: usize,
}

/// Where a commit's journal blocks stand.
enum SealedJournal {
    /// No records: nothing to write.
    Empty,
    /// The records and their reserved blocks, until a driver takes them to encode.
    Reserved(JournalBatch),
    /// Taken to encode.
    Encoding,
    /// Ready to write; the next commit chains to their last crc.
    Encoded(JournalBlocks),
    /// Copied into the device's write buffers and let go of (`Sealed::blocks_issued`): only
    /// the chain's last crc is left, so the commit's end, under the exclusive borrow, frees
    /// no memory (a heap trim there would hold every core's decisions).
    Issued { last_crc: u32 },
}

/// The state of an open pool: the pool part here (superblock, allocator, journal, reference
/// counts, configuration, the commit pipeline, health) and its families ([`Family`]: volumes,
/// locks, epochs). Family decisions reach the pool only through a [`family::Link`].
pub struct PoolMeta {
    sb: Superblock,
    geo: Geometry,
    /// The allocator: behind a leaf lock of its own, taken by a family's write whose stock is
    /// short (once per `Stock::BATCH` fresh clusters) and by a family's quarantine returning
    /// what its stock does not keep; an exclusive borrow reaches it without locking.
    alloc: Mutex<Allocator>,
    journal: JournalWriter,
    /// Distinct leaves naming each cluster (a family touches only its clusters' counts).
    refs: Refs,
    config: BTreeMap<String, String>,
    next_id: u32,
    /// The families by number, and which family each volume is in (a deleted volume leaves it
    /// at its delete, which the control operation made only once its writes drained).
    fams: Families,
    family_of: HashMap<u32, u32>,
    /// Requests waiting for the commit in flight to end (the only queue of this table used).
    commit_waiters: LockTable,
    /// Records pending in the families (the journal's own pending are the configuration's):
    /// counted by whichever thread's family decision queued them.
    family_pending: AtomicUsize,
    /// Requests woken by family decisions made under a shared borrow (`take_woken_shared`),
    /// and how many: the count is read on every round, the queue locked only when it is not 0.
    woken: Mutex<Vec<Waiter>>,
    woken_count: AtomicUsize,
    /// Families borrowed mutably since `take_woken` last ran (only they can have woken
    /// anyone), so collecting wake-ups costs what was done, not the number of families.
    borrowed: Vec<u32>,
    /// The families the next commit visits, those whose frees the commit in flight makes
    /// durable (it ends them), and those waiting to go (`touched`).
    touched: Touched,
    committing: bool,
    /// Commits sealed so far, and how many of them are durable (checkpoints count as both).
    seals: u64,
    durable_seals: u64,
    failed: Option<String>,
    /// Pending records that make a background commit due, and whether one was asked for.
    commit_records: usize,
    background_asked: bool,
    /// A driver's commit timer is armed (`take_commit_timer`).
    timer_armed: bool,
    /// Commits and checkpoints made durable since the pool was opened.
    commits_done: u64,
    checkpoints_done: u64,
    /// Records are being loaded (`load`) and `loaded` has not run yet: what they free and
    /// name is the allocator's business directly (see [`family::Link`]).
    loading: bool,
    /// Stock refills, and refills that took other families' stocks back first (the pool was
    /// short), since the pool was opened.
    refills: AtomicU64,
    refills_taking_back: AtomicU64,
    /// Thick volumes a crash had cut short when the pool was opened: completed, made thin.
    thick_repairs: (u64, u64),
    /// A growth asked for (`grow`) and not yet named by a durable superblock: the device's
    /// blocks and the clusters they hold. The next checkpoint's superblock carries it; its
    /// clusters are handed out only once that superblock is durable (`checkpoint_done`), so
    /// no journal record can name a cluster the superblock on the media does not have.
    grow_to: Option<(u64, u64)>,
    /// Trees deletions and rollbacks retired, in the order of the seals that let them go:
    /// released in bounded steps (`settle`) once their records are durable, not under the
    /// exclusive borrow that applied them. A leaf lock, taken under the family's lock a step
    /// releases for (a family with a tree here does not go).
    retired: Mutex<VecDeque<Retiree>>,
    /// Thick volumes with clusters promised and not yet mapped, in the order promised (each
    /// until its promise is kept or given back): what `settle` maps. A leaf lock, as
    /// `retired`.
    filling: Mutex<VecDeque<Filling>>,
}

/// A run of 4 KiB pieces within one cluster.
struct Span {
    vc: u64,
    cluster_end: u64,
    first_bit: u64,
    bits: u16,
}

/// An I/O's place in its family's epoch order (see `begin_io`): the family's number and the
/// epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u32, u64);

/// Volume `id`'s mapped clusters: (volume cluster, pool cluster, written bitmap).
pub fn mapped_entries(meta: &PoolMeta, id: u32) -> Vec<(u64, u64, u16)> {
    let Some(fam) = meta.family(id) else { return Vec::new() };
    fam.volumes.get(&id).map_or_else(Vec::new, |v| {
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
            geo: Geometry::of(&sb),
            alloc: Mutex::new(Allocator::new(clusters)),
            journal: JournalWriter::new(sb.pool_uuid, sb.incarnation, sb.journal_blocks, head),
            refs: Refs::new(clusters),
            config: BTreeMap::new(),
            next_id: 1,
            fams: Families::default(),
            family_of: HashMap::default(),
            commit_waiters: LockTable::default(),
            family_pending: AtomicUsize::new(0),
            woken: Mutex::new(Vec::new()),
            woken_count: AtomicUsize::new(0),
            borrowed: Vec::new(),
            touched: Touched::default(),
            committing: false,
            seals: 0,
            durable_seals: 0,
            failed: None,
            commit_records: COMMIT_RECORDS,
            background_asked: false,
            timer_armed: false,
            commits_done: 0,
            checkpoints_done: 0,
            loading: true,
            refills: AtomicU64::new(0),
            refills_taking_back: AtomicU64::new(0),
            thick_repairs: (0, 0),
            grow_to: None,
            retired: Mutex::new(VecDeque::new()),
            filling: Mutex::new(VecDeque::new()),
            sb,
        }
    }

    /// Volume `id`'s family and the pool's link to it, borrowed apart (`None`: no such
    /// volume, nor a deleted one whose family still lives).
    #[inline]
    fn split(&mut self, id: u32) -> Option<(&mut Family, Link<'_>)> {
        let f = *self.family_of.get(&id)?;
        Some(self.split_family(f))
    }

    /// Family `f` (alive) and the pool's link to it, borrowed apart.
    #[inline]
    fn split_family(&mut self, f: u32) -> (&mut Family, Link<'_>) {
        self.note_borrowed(f);
        let fam = self.fams.get_mut(f).expect("a volume's family lives while it is named");
        let (loading, retire) = if self.loading {
            (Some(self.alloc.get_mut()), None)
        } else {
            let queue = self.retired.get_mut();
            (None, Some(Retire { queue, family: f, seal: self.seals + 1 }))
        };
        let link = Link { refs: &self.refs, loading, retire };
        (fam, link)
    }

    /// Volume `id`'s family, locked (a shared borrow: the data path's way in; it takes no other
    /// family's lock while it holds this one).
    #[inline]
    fn family(&self, id: u32) -> Option<MutexGuard<'_, Family>> {
        self.family_of.get(&id).and_then(|&f| self.fams.get(f))
    }

    /// Runs a family decision on volume `id`'s family under a shared borrow of the pool state
    /// (`None`: no such volume), locking that family alone: counts the data records it queued
    /// into the pool's pending count and moves whom it woke to the shared wake-up queue.
    #[inline]
    fn deciding<R>(&self, id: u32, op: impl FnOnce(&mut Family, &mut Link) -> R) -> Option<R> {
        self.deciding_family(*self.family_of.get(&id)?, op)
    }

    /// [`Self::deciding`] for family number `f` (`None`: no such family): a settling step's
    /// way in to a family no volume id leads to any more (a deleted volume's).
    #[inline]
    fn deciding_family<R>(
        &self,
        f: u32,
        op: impl FnOnce(&mut Family, &mut Link) -> R,
    ) -> Option<R> {
        debug_assert!(!self.loading, "the data path runs on a loaded pool");
        let mut fam = self.fams.get(f)?;
        fam.catch_up(self.durable_seals);
        let mut link = Link { refs: &self.refs, loading: None, retire: None };
        let before = fam.pending.len();
        let r = op(&mut fam, &mut link);
        let queued = fam.pending.len() - before;
        if queued > 0 {
            self.family_pending.fetch_add(queued, Ordering::Relaxed);
        }
        self.list_decided(f, &mut fam);
        if fam.locks.woken() > 0 {
            let mut woken = self.woken.lock();
            fam.locks.take_woken(&mut woken);
            self.woken_count.store(woken.len(), Ordering::Relaxed);
        }
        Some(r)
    }

    #[inline]
    fn family_mut(&mut self, id: u32) -> Option<&mut Family> {
        let f = *self.family_of.get(&id)?;
        self.note_borrowed(f);
        self.fams.get_mut(f)
    }

    /// Family `f` is borrowed mutably: its wake-ups are collected (`take_woken`) and the next
    /// commit visits it.
    #[inline]
    fn note_borrowed(&mut self, f: u32) {
        if self.borrowed.last() != Some(&f) {
            self.borrowed.push(f);
        }
        self.list_borrowed(f);
    }

    /// Clusters lent to families and free in their stocks.
    fn stocked(&self) -> u64 {
        self.fams.values().map(|f| f.stock.len()).sum()
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
        self.geo.cluster_bytes
    }

    /// Every volume's attributes, by id (copied out of the families: for listings and control
    /// operations, not the data path).
    pub fn volumes(&self) -> BTreeMap<u32, VolumeAttrs> {
        let mut out = BTreeMap::new();
        for f in self.fams.values() {
            out.extend(f.volumes.iter().map(|(id, v)| (*id, v.attrs())));
        }
        out
    }

    pub fn volume_count(&self) -> usize {
        self.fams.values().map(|f| f.volumes.len()).sum()
    }

    /// Families (a volume with its snapshots and clones) now.
    pub fn family_count(&self) -> usize {
        self.fams.len()
    }

    pub fn config(&self) -> &BTreeMap<String, String> {
        &self.config
    }

    /// Free clusters: the allocator's and those in the families' stocks.
    pub fn free_clusters(&self) -> u64 {
        // The stocks first: the allocator's lock is a leaf, never held while a family's is taken.
        let stocked = self.stocked();
        self.alloc.lock().free_count() + stocked
    }

    /// Clusters in use (named, in flight, or freed and not yet reusable).
    pub fn used_clusters(&self) -> u64 {
        let stocked = self.stocked();
        self.alloc.lock().used_count() - stocked
    }

    /// The most clusters this pool can ever use: every cluster in use is named by some
    /// volume's mapping, and a checkpoint (which must fit its metadata half, sized at
    /// creation) holds at most one `MapSet` per volume cluster.
    pub fn usable_clusters(&self) -> u64 {
        let half = self.checkpoint_half_blocks() * BLOCK_SIZE as u64;
        half.saturating_sub(CHECKPOINT_HEADER) / CHECKPOINT_BYTES_PER_CLUSTER + 1
    }

    /// The clusters a device of `total_bytes` holds for this pool (its regions before the
    /// data area unchanged; at most [`PoolMeta::usable_clusters`], and below 2^40, what a
    /// mapping entry can name), and its blocks. A device smaller than the pool spans (or
    /// than a growth already asked for) is refused.
    pub fn clusters_on(&self, total_bytes: u64) -> Result<(u64, u64), PoolError> {
        let total_blocks = total_bytes / BLOCK_SIZE as u64;
        let spans = self.grow_to.map_or(self.sb.total_blocks, |(b, _)| b).max(self.sb.total_blocks);
        if total_blocks < spans {
            let pool = spans * BLOCK_SIZE as u64;
            return Err(PoolError::DeviceShrank { pool, device: total_bytes });
        }
        let cluster_blocks = self.geo.cluster_bytes / BLOCK_SIZE as u64;
        let fits = (total_blocks - self.sb.data_start) / cluster_blocks;
        let clusters = fits.min(self.usable_clusters()).min((1 << 40) - 1);
        if clusters < fits {
            tracing::warn!(
                device_clusters = fits,
                usable = clusters,
                "the pool's metadata was sized at creation for fewer clusters than the device \
                 now holds: the pool takes in what it can use"
            );
        }
        Ok((total_blocks, clusters.max(self.sb.cluster_count)))
    }

    /// Grows the pool's data area to what a device of `total_bytes` holds: the next
    /// checkpoint names the new size, and the new clusters are free once it is durable (a
    /// `ControlOp::Grow` request runs that checkpoint and returns when it is). The metadata
    /// reserve keeps its size: the volumes' total stays within what it was made for.
    /// Returns the clusters the pool will have.
    pub fn grow(&mut self, total_bytes: u64) -> Result<u64, PoolError> {
        self.ok()?;
        let (total_blocks, clusters) = self.clusters_on(total_bytes)?;
        let asked = self.grow_to.map_or(self.sb.cluster_count, |(_, c)| c);
        if clusters > asked {
            self.grow_to = Some((total_blocks, clusters));
            // A mutant for the simulator's own test (tests/e2e/sim_mutants.sh): the new
            // clusters are handed out before any superblock on the media names them.
            if cfg!(feature = "mutant-grow-early") {
                self.alloc.get_mut().grow(clusters);
                self.refs.grow(clusters);
            }
        }
        Ok(clusters.max(asked))
    }

    /// A growth is asked for that no durable superblock names yet.
    pub fn growth_pending(&self) -> bool {
        self.grow_to.is_some()
    }

    pub fn data_bytes(&self) -> u64 {
        self.sb.cluster_count.saturating_sub(1) * self.geo.cluster_bytes
    }

    pub fn journal_blocks_free(&self) -> u64 {
        self.journal.blocks_free()
    }

    /// Records applied and not yet sealed into a commit: the families' and the
    /// configuration's.
    pub fn pending_records(&self) -> usize {
        self.journal.pending() + self.family_pending.load(Ordering::Relaxed)
    }

    /// Families' stock refills since the pool was opened, and how many of them first took
    /// other families' stocks back because the allocator was short.
    pub fn refills(&self) -> (u64, u64) {
        (self.refills.load(Ordering::Relaxed), self.refills_taking_back.load(Ordering::Relaxed))
    }

    /// Thick volumes a crash had cut short when the pool was opened: how many got their
    /// missing clusters, how many became thin for want of room.
    pub fn thick_repairs(&self) -> (u64, u64) {
        self.thick_repairs
    }

    /// Journal commits and checkpoints made durable since the pool was opened.
    pub fn commits_done(&self) -> (u64, u64) {
        (self.commits_done, self.checkpoints_done)
    }

    pub fn fail(&mut self, why: String) {
        tracing::error!(why = %why, "pool failed");
        self.failed.get_or_insert(why);
        for (n, f) in self.fams.iter_mut() {
            f.locks.wake_all();
            self.borrowed.push(n);
        }
        self.commit_waiters.wake_all();
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
        self.fams
            .values()
            .find_map(|f| f.volumes.iter().find(|(_, v)| v.name == name).map(|(id, _)| *id))
            .ok_or_else(|| PoolError::NoName(name.to_string()))
    }

    /// The number of volume `id`'s family (a volume with its snapshots and clones): fixed for
    /// the volume's life while the pool is open (a daemon places a family's requests by it).
    pub fn family_number(&self, id: u32) -> Option<u32> {
        self.family_of.get(&id).copied()
    }

    /// Whether any volume still belongs to family number `family`.
    pub fn family_alive(&self, family: u32) -> bool {
        self.family_of.values().any(|&f| f == family)
    }

    /// Volume `id`'s attributes, copied out of its family.
    pub fn volume(&self, id: u32) -> Result<VolumeAttrs, PoolError> {
        let Some(fam) = self.family(id) else { return Err(PoolError::NoVolume(id)) };
        fam.volume(id).map(Volume::attrs)
    }

    /// Bytes of volume `id` written (its written pieces): kept, not counted, so the cost
    /// does not grow with the volume.
    pub fn allocated_bytes(&self, id: u32) -> u64 {
        self.family(id).map_or(0, |f| f.volume(id).map_or(0, |v| v.written_pieces * PIECE))
    }

    /// Whether volume `id` has a piece written at or after byte `offset`
    /// ([`Family::written_from`]: the cost follows what is mapped there).
    pub fn written_from(&self, id: u32, offset: u64) -> bool {
        self.family(id).is_some_and(|f| f.written_from(id, offset))
    }

    /// Whether 4 KiB piece `piece` of volume `id` holds written data (else it reads as zeros).
    pub fn piece_written(&self, id: u32, piece: u64) -> bool {
        self.family(id).is_some_and(|f| f.piece_written(id, piece))
    }

    /// Written runs of `[offset, offset + len)` of volume `id`: (start, length, written), in
    /// order, adjacent runs merged, at 4 KiB granularity; the first `max` of them (the walk
    /// stops there). Cost follows the mapped clusters walked.
    pub fn allocation(&self, id: u32, offset: u64, len: u64, max: usize) -> Vec<(u64, u64, bool)> {
        self.family(id).map_or_else(Vec::new, |f| f.allocation(id, offset, len, max))
    }

    /// Runs of `[offset, offset + len)` of volume `id` where it may read differently from
    /// volume `base` (start, length, changed), as [`Family::changes`] defines them; the first
    /// `max`. Both must be volumes of one family (a volume with its snapshots and clones):
    /// another family's mapping is none of this volume's business.
    pub fn changes(
        &self,
        id: u32,
        base: u32,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<(u64, u64, bool)>, PoolError> {
        let f = self.family(id).ok_or(PoolError::NoVolume(id))?;
        f.changes(id, base, offset, len, max)
            .ok_or(PoolError::OtherFamily { vol: id.into(), base: base.into() })
    }

    /// The other volumes of volume `id`'s family (its snapshots, clones, origin and their
    /// kin), (id, name) in id order: what [`Self::changes`] can compare it with. Ids are not
    /// reused while the pool is open, so an id names one volume for good.
    pub fn kin(&self, id: u32) -> Vec<(u32, String)> {
        self.family(id).map_or_else(Vec::new, |f| {
            f.volumes.iter().filter(|(&k, _)| k != id).map(|(&k, v)| (k, v.name.clone())).collect()
        })
    }

    pub fn cluster_offset(&self, cluster: u64) -> u64 {
        self.geo.cluster_offset(cluster)
    }

    /// Applies one record to the in-memory state (live control operations, replay and
    /// checkpoint loading alike; a mapping record only while loading, before `loaded`):
    /// configuration to the pool; a creation starts a family, a snapshot or clone joins its
    /// source's, everything else goes to the volume's family. Records naming
    /// volumes that do not exist are ignored (idempotence), and so is a rollback between
    /// families (which no sound pool writes: a snapshot is in its origin's family).
    pub fn apply(&mut self, r: &Record) {
        match r {
            Record::Config { key, value } => {
                if value.is_empty() {
                    self.config.remove(key);
                } else {
                    self.config.insert(key.clone(), value.clone());
                }
            }
            Record::VolumeCreate { id, parent, size_bytes, name } => {
                let v = Volume {
                    name: name.clone(),
                    size_bytes: *size_bytes,
                    read_only: false,
                    parent: *parent,
                    thick: false,
                    tree: Tree::new(size_bytes.div_ceil(self.geo.cluster_bytes).max(1)),
                    frozen: 0,
                    writes_inflight: 0,
                    written_pieces: 0,
                    fill: 0,
                };
                let f = self.fams.add(Family::new(self.geo));
                self.place(*id, v, f);
            }
            Record::Snapshot { id, of, name } | Record::Clone { id, of, name } => {
                let Some(&f) = self.family_of.get(of) else { return };
                let Some(src) = self.fams.get_mut(f).and_then(|fam| fam.volumes.get(of)) else {
                    return;
                };
                let v = Volume {
                    name: name.clone(),
                    size_bytes: src.size_bytes,
                    read_only: matches!(r, Record::Snapshot { .. }),
                    parent: *of,
                    thick: false,
                    tree: src.tree.clone(),
                    frozen: 0,
                    writes_inflight: 0,
                    written_pieces: src.written_pieces,
                    fill: 0,
                };
                self.place(*id, v, f);
                // A snapshot's origin shares its clusters now: its next writes copy them, so it
                // is thin (as SPDK's thick lvol becomes when snapshotted). A clone's source is
                // read-only: it writes nothing, and stays as it was.
                if matches!(r, Record::Snapshot { .. }) {
                    if let Some(o) = self.family_mut(*of).and_then(|fam| fam.volumes.get_mut(of)) {
                        o.thick = false;
                    }
                }
            }
            Record::Rollback { id, to } => {
                if self.family_of.get(id) != self.family_of.get(to) {
                    return;
                }
                if let Some((fam, mut link)) = self.split(*id) {
                    fam.apply(r, &mut link);
                }
            }
            Record::Delete { id } => {
                // A deleted volume's name leaves with it once nothing of it is in flight (the
                // control operation drained its writes; reads end by their family's number).
                let quiet = self.volume(*id).is_ok_and(|v| v.writes_inflight == 0);
                // What was promised to it and not mapped goes back to everyone.
                let promised = self.family_mut(*id).and_then(|fam| fam.volumes.get(id));
                let promised = promised.map_or(0, |v| v.fill);
                self.alloc.get_mut().unreserve(promised);
                let emptied = self.split(*id).map(|(fam, mut link)| {
                    fam.apply(r, &mut link);
                    fam.volumes.is_empty()
                });
                if emptied == Some(true) {
                    let f = self.family_of[id];
                    self.family_emptied(f);
                }
                if quiet {
                    self.family_of.remove(id);
                }
            }
            Record::MapSet { volume: id, .. }
            | Record::Resize { id, .. }
            | Record::ReadOnly { id }
            | Record::Thick { id }
            | Record::Decouple { id }
            | Record::Rename { id, .. } => {
                // Live, a mapping changes only through its family's decisions (a write, a
                // trim), which take and free clusters the family's way; an applied one would
                // name clusters no allocator state accounts for.
                assert!(
                    self.loading || !matches!(r, Record::MapSet { .. }),
                    "a mapping record applied outside loading: {r:?}"
                );
                if let Some((fam, mut link)) = self.split(*id) {
                    fam.apply(r, &mut link);
                }
            }
            // A deleted tree is released in memory (nothing on the media is per-cluster): at
            // once while loading, in steps live (`settle`); there is no progress to resume.
            Record::ReclaimProgress { .. } => {}
        }
    }

    /// Puts volume `id` into family `f`, replacing (and releasing) a volume of that id
    /// wherever it was (only replayed damage names a live id again).
    fn place(&mut self, id: u32, v: Volume, f: u32) {
        if let Some((fam, mut link)) = self.split(id) {
            if let Some(old) = fam.volumes.remove(&id) {
                fam.retire_tree(old.tree, &mut link);
            }
        }
        self.fams.get_mut(f).expect("placing into a live family").volumes.insert(id, v);
        self.family_of.insert(id, f);
        self.next_id = self.next_id.max(id.saturating_add(1));
    }

    /// Applies a control or configuration record and queues it for the next commit (a data
    /// record, `MapSet`, is made and queued by its volume's family). Such a record is a
    /// barrier: every family's pending records go to the journal first, then it. So a crash
    /// that keeps only the first blocks of a commit keeps a prefix of the control records in
    /// the order they were made, each after every record made before it — never, say, a
    /// snapshot named like a volume whose deletion it followed without that deletion. Data
    /// records of different families commute; they are independent until a flush, which waits
    /// for the whole commit.
    pub fn log(&mut self, r: Record) {
        assert!(!matches!(r, Record::MapSet { .. }), "a family logs its data records");
        self.apply(&r);
        self.gather_pending();
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
            if let Record::VolumeCreate { id, .. }
            | Record::Snapshot { id, .. }
            | Record::Clone { id, .. } = r
            {
                if *id == 0 || *id == VOLUME_ID_MAX {
                    return Err(PoolError::Damaged(format!(
                        "metadata makes a volume of id {id}, outside 1..{VOLUME_ID_MAX}"
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
        self.alloc.get_mut().commit();
        for f in self.fams.values_mut() {
            f.loaded();
        }
        Ok(())
    }

    /// Replay reached the end: the writer continues after the replayed blocks; everything
    /// loaded is durable.
    pub fn loaded(&mut self, blocks: u64, last: Option<(u64, u32)>) {
        if let Some((seq, crc)) = last {
            self.journal.skip_replayed(blocks, seq, crc);
        }
        self.loading = false;
        self.alloc.get_mut().commit();
        self.touched_loaded();
        self.merge_sharing_families();
        self.repair_thick();
    }

    /// Merges families whose trees name a common cluster. A sound pool shares clusters only
    /// inside a family, but a checkpoint writes a volume whose parent was deleted as a new
    /// volume with its own mappings (a `VolumeCreate`, not a `Snapshot`), so loading it starts
    /// a family that still shares clusters with its relatives: they are one family again.
    fn merge_sharing_families(&mut self) {
        if self.fams.len() < 2 {
            return;
        }
        const NONE: u32 = u32::MAX;
        // Union-find over family numbers, by the first family seen naming each cluster.
        let mut owner = vec![NONE; self.refs.len()];
        let mut root: BTreeMap<u32, u32> = self.fams.iter_mut().map(|(f, _)| (f, f)).collect();
        fn find(root: &mut BTreeMap<u32, u32>, mut f: u32) -> u32 {
            while root[&f] != f {
                let up = root[&root[&f]];
                root.insert(f, up);
                f = up;
            }
            f
        }
        for (f, fam) in self.fams.iter_mut() {
            for v in fam.volumes.values() {
                for c in v.tree.entries().into_iter().filter_map(|(_, e)| e.cluster()) {
                    let slot = &mut owner[c as usize];
                    if *slot == NONE {
                        *slot = f;
                    } else {
                        let (a, b) = (find(&mut root, *slot), find(&mut root, f));
                        if a != b {
                            root.insert(a.max(b), a.min(b));
                        }
                    }
                }
            }
        }
        let numbers: Vec<u32> = self.fams.iter_mut().map(|(f, _)| f).collect();
        for f in numbers {
            let to = find(&mut root, f);
            if to == f {
                continue;
            }
            let from = self.fams.remove(f).expect("a family being merged");
            assert!(
                from.inflight.is_empty()
                    && from.held_free().next().is_none()
                    && from.pending.is_empty()
                    && from.locks.slots() == 0,
                "families are merged only at open, with nothing in flight, freed, stocked or \
                 pending"
            );
            for (id, v) in from.volumes {
                self.family_of.insert(id, to);
                self.fams.get_mut(to).expect("a merge target").volumes.insert(id, v);
            }
        }
        let fams = &mut self.fams;
        self.family_of.retain(|_, f| fams.get_mut(*f).is_some());
    }

    // ---- checking ---------------------------------------------------------------------------

    /// Recounts references from the trees and compares them with the live counts and the
    /// allocator; checks each family and that no cluster is shared between families. Returns
    /// every discrepancy found.
    ///
    /// Exact when nothing decides meanwhile (an exclusive borrow); it locks every family at
    /// once, in number order (a decision holds one family's lock and waits for no other).
    pub fn check(&self) -> Vec<String> {
        let fams: Vec<(u32, MutexGuard<'_, Family>)> = self.fams.iter().collect();
        let retired = self.retired.lock();
        let filling: HashSet<u32> = self.filling.lock().iter().map(|t| t.id).collect();
        let alloc = self.alloc.lock();
        let mut problems = Vec::new();
        let mut counts: BTreeMap<u64, u32> = BTreeMap::new();
        let mut owner: HashMap<u64, u32> = HashMap::default();
        let live: HashSet<u32> = fams.iter().map(|(f, _)| *f).collect();
        for t in retired.iter().filter(|t| !live.contains(&t.family)) {
            problems.push(format!("a tree retired by family {} outlives the family", t.family));
        }
        for (f, fam) in &fams {
            let f = *f;
            let trees = fam.volumes.values().map(|v| &v.tree);
            let remains = retired.iter().filter(|t| t.family == f).map(|t| &t.remains);
            for (c, n) in count_references(trees, remains) {
                *counts.entry(c).or_default() += n;
                if let Some(g) = owner.insert(c, f) {
                    problems.push(format!("cluster {c} is shared by families {g} and {f}"));
                }
            }
            problems.extend(fam.check(self.sb.cluster_count));
        }
        // What families hold unnamed: each cluster once, named by no tree, lent.
        let mut held: HashMap<u64, (u32, &str)> = HashMap::default();
        for (f, fam) in &fams {
            let f = *f;
            for (what, c) in fam.held_free() {
                if let Some((g, other)) = held.insert(c, (f, what)) {
                    problems.push(format!(
                        "cluster {c} held twice: by family {g} ({other}) and family {f} ({what})"
                    ));
                }
                if counts.contains_key(&c) {
                    problems.push(format!("cluster {c} in family {f}'s {what} but named"));
                }
                if !alloc.is_allocated(c) {
                    problems.push(format!("cluster {c} in family {f}'s {what} but not lent"));
                }
            }
        }
        for (c, r) in self.refs.iter().enumerate() {
            let want = counts.get(&(c as u64)).copied().unwrap_or(0);
            if r != want {
                problems.push(format!("cluster {c}: refcount {r}, trees say {want}"));
            }
            if r > 0 && !alloc.is_allocated(c as u64) {
                problems.push(format!("cluster {c} referenced but not allocated"));
            }
        }
        let promised: u64 = fams.iter().flat_map(|(_, f)| f.volumes.values()).map(|v| v.fill).sum();
        if promised != alloc.reserved() {
            let reserved = alloc.reserved();
            problems
                .push(format!("{promised} clusters promised, the allocator reserves {reserved}"));
        }
        for (_, fam) in &fams {
            for (id, v) in fam.volumes.iter().filter(|(id, v)| v.fill > 0 && !filling.contains(*id))
            {
                problems.push(format!("volume {id}: {} clusters promised, not queued", v.fill));
            }
        }
        let referenced = counts.len() as u64;
        let used = alloc.used_count();
        if used < referenced {
            problems.push(format!("allocator counts {used} clusters, {referenced} referenced"));
        }
        problems.extend(self.commit_waiters.check());
        let queued: usize = fams.iter().map(|(_, f)| f.pending.len()).sum();
        let counted = self.family_pending.load(Ordering::Relaxed);
        if queued != counted {
            problems
                .push(format!("families hold {queued} pending records, the pool counts {counted}"));
        }
        problems.extend(self.check_touched(&fams));
        let borrowed: HashSet<u32> = self.borrowed.iter().copied().collect();
        for (f, fam) in &fams {
            let f = *f;
            if fam.locks.woken() > 0 && !borrowed.contains(&f) {
                problems.push(format!("family {f}: wake-ups that take_woken would not collect"));
            }
        }
        problems
    }

    /// Clusters allocated but referenced by nothing and not on their way anywhere (leaks):
    /// not in a family's stock, not freed and waiting for a commit (pending, sealed into the
    /// commit in flight, or quarantined behind older I/O), not the fresh cluster of a write
    /// span in flight. Exact at any moment under an exclusive borrow, under load too (under a
    /// shared one, clusters on their way between a family and the allocator — a write's refill
    /// taking other stocks back, an I/O's surplus — are briefly in neither).
    /// Locks every family at once, as `check` does.
    pub fn leaked(&self) -> u64 {
        let fams: Vec<MutexGuard<'_, Family>> = self.fams.values().collect();
        let retired = self.retired.lock();
        let trees = fams.iter().flat_map(|f| f.volumes.values().map(|v| &v.tree));
        let remains = retired.iter().map(|t| &t.remains);
        let referenced = count_references(trees, remains).len() as u64;
        let in_transit: u64 = fams.iter().map(|f| f.in_transit()).sum();
        let alloc = self.alloc.lock();
        let accounted = referenced + in_transit + alloc.pending_count() + alloc.reserved();
        alloc.used_count().saturating_sub(accounted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{layout, PoolGeometry};
    use crate::sim::commit_in_memory as commit;
    use proptest::prelude::*;

    /// A small pool's layout: 16 KiB clusters, a 16-block journal.
    fn sb() -> Superblock {
        sb_of(1 << 20)
    }

    fn sb_of(bytes: u64) -> Superblock {
        layout(bytes, &geometry(0)).expect("a valid layout")
    }

    /// 16 KiB clusters, a 16-block journal, room for `config_bytes` of configuration.
    fn geometry(config_bytes: u64) -> PoolGeometry {
        PoolGeometry {
            cluster_shift: 14,
            journal_blocks: 16,
            pool_uuid: [1; 16],
            max_volumes: 8,
            config_bytes,
        }
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
            1 => (1u32..5, 0u32..3).prop_map(|(id, n)| Record::Rename { id, name: format!("r{n}") }),
        ]
    }

    /// A durable write of piece 0 of volume `id`.
    fn write(m: &mut PoolMeta, id: u32) {
        let mut plans = Vec::new();
        m.plan_write(id, 0, PIECE, 0, Waiter(0), &mut plans).expect("nothing blocks it");
        for p in &plans {
            m.finish_span(id, p);
        }
        m.end_write(id);
        commit(m);
    }

    fn fresh() -> PoolMeta {
        fresh_of(sb())
    }

    /// Commits, then settles what control operations left (a thick volume's clusters mapped,
    /// what the deletions and rollbacks it made durable retired released) and commits that
    /// too (what `ops::control` has every driver do after one).
    fn commit_and_settle(m: &mut PoolMeta) {
        commit(m);
        while m.settle(crate::ops::SETTLE_STEP).unwrap() > 0 {}
        commit(m);
    }

    fn fresh_of(sb: Superblock) -> PoolMeta {
        let mut m = PoolMeta::new(sb);
        m.loaded(0, None);
        m
    }

    /// Writes piece 0 of volume cluster `vc` (not committed); false when the pool is full.
    fn write_cluster(m: &mut PoolMeta, id: u32, vc: u64) -> bool {
        let mut plans = Vec::new();
        match m.plan_write(id, vc * m.cluster_bytes(), PIECE, 0, Waiter(0), &mut plans) {
            Ok(()) => {}
            Err(Blocked::Fail(PoolError::NoSpace)) => return false,
            Err(e) => panic!("writing {id}:{vc}: {e:?}"),
        }
        for p in &plans {
            m.finish_span(id, p);
        }
        m.end_write(id);
        true
    }

    /// Pending records too big for the ring's free blocks make the next commit a checkpoint,
    /// whatever their count: configuration records of ~3 KiB each filled a 16-block ring
    /// that a count of 40 bytes per record thought had room, and every commit was refused
    /// (every flush failed) until data records pushed the count up (found by a review).
    #[test]
    fn large_pending_records_make_the_commit_a_checkpoint() {
        let mut m = fresh_of(layout(1 << 20, &geometry(8192)).unwrap());
        let value = "x".repeat(3000);
        for i in 0..30 {
            m.set_config("k", &format!("{i}{value}")).unwrap();
        }
        assert!(m.wants_checkpoint(), "30 records of 3 KiB do not fit a 16-block ring");
        commit(&mut m);
        assert!(m.config()["k"].starts_with("29x"));
    }

    /// A snapshot deleted while the commit creating it is in flight: once that commit is
    /// durable it names the snapshot and its clusters, so until the delete is durable too the
    /// origin may not write them in place — not even a cluster fresh in that commit (a crash
    /// would bring the snapshot back holding the origin's later data; found by a review).
    #[test]
    fn a_snapshot_deleted_during_its_creating_commit_keeps_its_clusters_from_in_place_writes() {
        let mut m = fresh();
        let v = m.create_volume("v", 4 * m.cluster_bytes()).unwrap();
        commit(&mut m);
        assert!(write_cluster(&mut m, v, 0));
        let s = m.snapshot(v, "s").unwrap();
        let mut sealed = m.seal().unwrap().expect("no commit in flight");
        m.delete(s).unwrap();
        sealed.encode_now();
        m.commit_done(sealed);
        let mut plans = Vec::new();
        m.plan_write(v, 0, PIECE, 0, Waiter(0), &mut plans).expect("nothing blocks it");
        assert!(plans[0].copy_from.is_some(), "an in-place write into the snapshot's cluster");
        for p in &plans {
            m.finish_span(v, p);
        }
        m.end_write(v);
        commit(&mut m);
        // Durable now: the next write goes in place.
        m.plan_write(v, 0, PIECE, 0, Waiter(0), &mut plans).expect("nothing blocks it");
        assert!(plans[0].copy_from.is_none(), "the delete is durable: in place again");
        for p in &plans {
            m.abort_span(v, p);
        }
        m.end_write(v);
    }

    /// A deleted volume's tree is released in bounded steps once its delete is durable, not
    /// under the exclusive borrow that applied it: before, a step releases nothing; each step
    /// spends about its budget; reference counts and the leak count stay exact between steps;
    /// the space is back once the last step's frees are durable, and the family goes.
    #[test]
    fn a_deleted_volume_is_released_in_bounded_steps_once_its_delete_is_durable() {
        let mut m = fresh_of(sb_of(64 << 20));
        let baseline = m.used_clusters();
        let v = m.create_volume("v", 32 << 20).unwrap();
        let n = 1500;
        for vc in 0..n {
            assert!(write_cluster(&mut m, v, vc));
        }
        commit(&mut m);
        let used = m.used_clusters();
        assert_eq!(used, baseline + n);
        m.delete(v).unwrap();
        assert_eq!(m.retired_trees(), 1);
        assert_eq!(
            m.settle(usize::MAX).unwrap(),
            0,
            "nothing is released before the delete is durable"
        );
        commit(&mut m);
        assert_eq!(m.used_clusters(), used, "its clusters are held whole until released");
        assert!(m.check().is_empty(), "{:?}", m.check());
        let (budget, mut steps) = (64, 0);
        loop {
            let spent = m.settle(budget).unwrap();
            if spent == 0 {
                break;
            }
            assert!(spent <= budget + crate::map::FANOUT, "a step spent {spent}");
            steps += 1;
            assert!(m.check().is_empty(), "{:?}", m.check());
            assert_eq!(m.leaked(), 0);
        }
        assert!(steps as u64 >= n / (budget + crate::map::FANOUT) as u64, "{steps} steps");
        assert_eq!(m.retired_trees(), 0);
        assert_eq!(m.used_clusters(), used, "freed, not yet reusable: the frees are not durable");
        commit(&mut m);
        assert_eq!((m.used_clusters(), m.family_count(), m.leaked()), (baseline, 0, 0));
    }

    /// While a deleted snapshot's tree waits to be released, the origin's writes to what they
    /// shared go to fresh clusters — before the delete is durable a crash would bring the
    /// snapshot back — even once it is durable, until a step releases it; after that they land
    /// in place (a release after the delete is durable ends only sharing the durable state no
    /// longer has: it touches nothing).
    #[test]
    fn a_retired_tree_keeps_what_it_shared_from_in_place_writes_until_released() {
        let mut m = fresh();
        let v = m.create_volume("v", 4 * m.cluster_bytes()).unwrap();
        for vc in 0..3 {
            assert!(write_cluster(&mut m, v, vc));
        }
        commit(&mut m);
        let s = m.snapshot(v, "s").unwrap();
        // A write elsewhere in the leaf copies it: v and s name clusters 0-2 from leaves of
        // their own (two references each), nothing shared by node any more.
        assert!(write_cluster(&mut m, v, 3));
        commit(&mut m);
        m.delete(s).unwrap();
        let in_place = |m: &mut PoolMeta, vc: u64| {
            let mut plans = Vec::new();
            let at = vc * m.cluster_bytes();
            m.plan_write(v, at, PIECE, 0, Waiter(0), &mut plans).expect("nothing blocks it");
            for p in &plans {
                m.finish_span(v, p);
            }
            m.end_write(v);
            plans[0].copy_from.is_none()
        };
        assert!(!in_place(&mut m, 0), "the delete is not durable: a fresh cluster");
        commit(&mut m);
        assert!(!in_place(&mut m, 1), "durable, not yet released: still a fresh cluster");
        while m.settle(crate::ops::SETTLE_STEP).unwrap() > 0 {}
        assert!(in_place(&mut m, 2), "released: v's own cluster, in place");
        commit(&mut m);
        assert!(m.check().is_empty(), "{:?}", m.check());
        assert_eq!(m.leaked(), 0);
    }

    /// A rollback retires the volume's old tree as a delete does: released once the rollback
    /// is durable, what only it named freed, the volume reading its snapshot meanwhile.
    #[test]
    fn a_rolled_back_tree_is_released_once_the_rollback_is_durable() {
        let mut m = fresh();
        let baseline = m.used_clusters();
        let v = m.create_volume("v", 8 * m.cluster_bytes()).unwrap();
        assert!(write_cluster(&mut m, v, 0));
        let s = m.snapshot(v, "s").unwrap();
        for vc in 1..6 {
            assert!(write_cluster(&mut m, v, vc));
        }
        commit(&mut m);
        assert_eq!(m.used_clusters(), baseline + 6);
        m.rollback(v, s).unwrap();
        assert_eq!((m.retired_trees(), m.settle(usize::MAX).unwrap()), (1, 0), "not yet durable");
        assert!(!m.piece_written(v, m.cluster_bytes() / PIECE), "v reads its snapshot at once");
        commit_and_settle(&mut m);
        assert_eq!((m.retired_trees(), m.used_clusters()), (0, baseline + 1));
        assert!(m.piece_written(v, 0) && m.piece_written(s, 0));
        assert!(m.check().is_empty(), "{:?}", m.check());
        assert_eq!(m.leaked(), 0);
    }

    /// A thick volume takes its room at once (reserved: nobody else gets it, the pool full for
    /// the others), but its clusters are mapped in bounded steps (`settle`) under a shared
    /// borrow, not under the exclusive one that made it; a write into one not yet mapped
    /// maps it first, from the same reservation, and lands in place. Counts exact between
    /// steps; nothing promised is left at the end.
    #[test]
    fn a_thick_volume_is_mapped_in_bounded_steps_its_room_reserved_meanwhile() {
        let mut m = fresh_of(sb_of(64 << 20));
        let free = m.free_clusters();
        let n = 2048;
        let t = m.create("t", n * m.cluster_bytes(), true).unwrap();
        assert_eq!((m.free_clusters(), m.promised_clusters()), (free - n, n));
        assert!(m.check().is_empty(), "{:?}", m.check());
        assert_eq!(m.leaked(), 0);
        commit(&mut m);
        // A write into a cluster not yet mapped maps it from the promise: in place.
        let mut plans = Vec::new();
        m.plan_write(t, 100 * m.cluster_bytes(), PIECE, 0, Waiter(0), &mut plans).unwrap();
        assert!(!plans[0].fresh && plans[0].copy_from.is_none(), "{plans:?}");
        for p in &plans {
            m.finish_span(t, p);
        }
        m.end_write(t);
        assert_eq!(m.promised_clusters(), n - 1);
        // The others cannot take the promised room: a thin volume fills what is left.
        let u = m.create_volume("u", 64 << 20).unwrap();
        let mut written = 0;
        while write_cluster(&mut m, u, written) {
            written += 1;
        }
        assert_eq!(written, free - n, "the thin volume got all but the promised clusters");
        let (budget, mut steps) = (256, 0);
        loop {
            let spent = m.settle(budget).unwrap();
            if spent == 0 {
                break;
            }
            assert!(spent <= budget + settle::FILL_UNITS, "a step spent {spent}");
            steps += 1;
            assert!(m.check().is_empty(), "{:?}", m.check());
            assert_eq!(m.leaked(), 0);
        }
        assert!(steps >= (n - 1) as usize * settle::FILL_UNITS / budget, "{steps} steps");
        assert_eq!(m.promised_clusters(), 0);
        assert_eq!(m.unmapped_clusters(t, n), 0, "every cluster of the thick volume mapped");
        commit(&mut m);
        assert!(m.check().is_empty(), "{:?}", m.check());
        assert_eq!((m.free_clusters(), m.leaked()), (0, 0));
    }

    /// A thick volume deleted, or grown, while its clusters are being mapped: what it was
    /// promised and did not map goes back at its delete; a growth adds to the promise.
    #[test]
    fn a_promise_grows_with_its_volume_and_goes_back_at_its_delete() {
        let mut m = fresh_of(sb_of(64 << 20));
        let free = m.free_clusters();
        let cb = m.cluster_bytes();
        let t = m.create("t", 1000 * cb, true).unwrap();
        assert!(m.settle(100).unwrap() > 0);
        let left = m.promised_clusters();
        assert!(left > 0 && left < 1000, "{left}");
        m.resize(t, 1500 * cb, false).unwrap();
        assert_eq!(m.promised_clusters(), left + 500);
        assert!(m.check().is_empty(), "{:?}", m.check());
        assert!(m.settle(100).unwrap() > 0);
        // Mapped up to half-way; shrunk below that, then grown back before another step: the
        // shrink gives back what it no longer has, the growth promises all it lacks, and the
        // steps map it all, behind where they had got to as well.
        while m.unmapped_clusters(t, 1500) > 1000 {
            assert!(m.settle(64).unwrap() > 0);
        }
        m.resize(t, 200 * cb, false).unwrap();
        assert_eq!(m.promised_clusters(), 0, "its remaining holes were past the new end");
        m.resize(t, 1500 * cb, false).unwrap();
        assert_eq!(m.promised_clusters(), 1300);
        assert!(m.check().is_empty(), "{:?}", m.check());
        while m.settle(64).unwrap() > 0 {
            assert!(m.check().is_empty(), "{:?}", m.check());
        }
        assert_eq!((m.promised_clusters(), m.unmapped_clusters(t, 1500)), (0, 0));
        commit(&mut m);
        m.resize(t, 2000 * cb, false).unwrap();
        assert!(m.settle(100).unwrap() > 0);
        m.delete(t).unwrap();
        assert_eq!(m.promised_clusters(), 0, "what it did not map goes back");
        assert!(m.check().is_empty(), "{:?}", m.check());
        commit_and_settle(&mut m);
        assert_eq!((m.free_clusters(), m.leaked(), m.family_count()), (free, 0, 0));
    }

    /// The threaded tests' pseudo-random numbers (xorshift64).
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// The threaded tests' committer: while `going`, commits under the exclusive borrow and
    /// checks the state exact (references, nothing leaked), yielding between rounds.
    fn commit_and_check_while(meta: &parking_lot::RwLock<PoolMeta>, going: impl Fn() -> bool) {
        while going() {
            let mut m = meta.write();
            commit(&mut m);
            assert!(m.check().is_empty(), "{:?}", m.check());
            assert_eq!(m.leaked(), 0);
            drop(m);
            std::thread::yield_now();
        }
    }

    /// Decisions run at once from several threads under shared borrows of the pool state —
    /// for different families, and for two volumes of one family (a volume and a clone of its
    /// snapshot, sharing clusters) —
    /// while another thread commits and checks under the exclusive borrow. Each decision locks
    /// one family at a time; the state stays exact (reference counts, stocks, the pending
    /// count, nothing leaked) and every write is mapped. The pool is small, so stocks run short
    /// and take other families' stocks back while those families decide.
    #[test]
    fn families_decide_at_once_under_shared_borrows() {
        use parking_lot::RwLock;
        const VCS: u64 = 40;
        const ROUNDS: usize = 10_000;
        let mut m = fresh_of(sb_of(4 << 20));
        let a = m.create_volume("a", VCS * m.cluster_bytes()).unwrap();
        for vc in 0..VCS / 2 {
            assert!(write_cluster(&mut m, a, vc));
        }
        commit(&mut m);
        let snap = m.snapshot(a, "a-snap").unwrap();
        let ac = m.clone_volume(snap, "a-clone").unwrap();
        let b = m.create_volume("b", VCS * m.cluster_bytes()).unwrap();
        let c = m.create_volume("c", VCS * m.cluster_bytes()).unwrap();
        assert_eq!(m.family_count(), 3);
        let cb = m.cluster_bytes();
        let baseline_refills = m.refills();
        let meta = RwLock::new(m);
        // Threads inside a shared borrow now, and the most seen at once; the four writers meet
        // inside their first shared borrows before the committer starts.
        let (inside, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let met = std::sync::Barrier::new(5);
        let writer = |vol: u32, seed: u64| {
            let meta = &meta;
            let (inside, most, met) = (&inside, &most, &met);
            move || {
                let mut rng = seed;
                let mut next = move || xorshift(&mut rng);
                // `a` wrote its first half before the snapshot its clone `ac` started from.
                let mut written = vec![false; VCS as usize];
                if vol == a || vol == ac {
                    written[..VCS as usize / 2].fill(true);
                }
                let (mut plans, mut pieces) = (Vec::new(), Vec::new());
                for round in 0..ROUNDS {
                    let vc = next() % VCS;
                    let at = vc * cb;
                    let m = meta.read();
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    if round == 0 {
                        met.wait();
                    }
                    let mut full = false;
                    match next() % 4 {
                        0 => {
                            m.trim(vol, at, cb, Waiter(vol.into())).expect("nothing blocks it");
                            written[vc as usize] = false;
                        }
                        1 => {
                            let t = m.plan_read_io(vol, at, PIECE, &mut pieces).unwrap();
                            m.end_io(t);
                        }
                        _ => {
                            let w = Waiter(vol.into());
                            match m.plan_write_io(vol, at, PIECE, 0, w, &mut plans) {
                                Ok(t) => {
                                    // One cluster: its span and the write end in one decision,
                                    // as a request's last span does.
                                    m.end_write_io(vol, t, &plans[0], true);
                                    written[vc as usize] = true;
                                }
                                Err(Blocked::Fail(PoolError::NoSpace)) => full = true,
                                Err(e) => panic!("writing {vol}:{vc}: {e:?}"),
                            }
                        }
                    }
                    inside.fetch_sub(1, Ordering::SeqCst);
                    drop(m);
                    if full {
                        // What the families freed waits for a commit: make one.
                        commit(&mut meta.write());
                    }
                }
                (vol, written)
            }
        };
        let models = std::thread::scope(|s| {
            let threads: Vec<_> = [(a, 1), (ac, 2), (b, 3), (c, 4)]
                .into_iter()
                .map(|(vol, seed)| s.spawn(writer(vol, 0x9e37_79b9 * seed)))
                .collect();
            met.wait();
            commit_and_check_while(&meta, || !threads.iter().all(|t| t.is_finished()));
            threads.into_iter().map(|t| t.join().unwrap()).collect::<Vec<_>>()
        });
        assert_eq!(most.into_inner(), 4, "the four writers' shared borrows overlapped");
        let mut m = meta.into_inner();
        commit(&mut m);
        assert!(m.check().is_empty(), "{:?}", m.check());
        assert_eq!(m.leaked(), 0);
        for (vol, written) in models {
            for (vc, w) in written.into_iter().enumerate() {
                let piece = vc as u64 * cb / PIECE;
                assert_eq!(m.piece_written(vol, piece), w, "volume {vol} cluster {vc}");
            }
        }
        let (refills, taking_back) = m.refills();
        assert!(
            taking_back > baseline_refills.1 && refills > baseline_refills.0,
            "the short-pool path ran: {:?} -> {:?}",
            baseline_refills,
            (refills, taking_back)
        );
    }

    /// Settling steps run on one thread under shared borrows while writers of the same
    /// families run on others — a thick volume's writes mapping promised clusters as the
    /// steps map the rest, a volume's writes while its deleted snapshot's tree and its
    /// shrink's cut leaves are released — and the main thread commits and checks under the
    /// exclusive borrow. The pool is otherwise full: every thick write goes in place, never
    /// short of room; the state stays exact throughout (references, reservation, nothing
    /// leaked); once settled every promise is kept, every retired tree gone, every write read.
    #[test]
    fn settling_steps_race_the_same_familys_writes_on_other_threads() {
        use parking_lot::RwLock;
        const ROUNDS: usize = 20_000;
        let mut m = fresh_of(sb_of(64 << 20));
        let (cb, fan) = (m.cluster_bytes(), crate::map::FANOUT as u64);
        // d: three leaves written, a snapshot, a cluster of each leaf written again (d's own
        // leaves), the snapshot deleted and d shrunk to just past one leaf: both trees'
        // remains wait for release, durable.
        let d = m.create_volume("d", (2 * fan + 10) * cb).unwrap();
        for vc in 0..2 * fan + 10 {
            assert!(write_cluster(&mut m, d, vc));
        }
        commit(&mut m);
        let ds = m.snapshot(d, "ds").unwrap();
        for k in 0..3 {
            assert!(write_cluster(&mut m, d, k * fan + 1));
        }
        m.delete(ds).unwrap();
        let d_vcs = fan + 3;
        m.resize(d, d_vcs * cb, true).unwrap();
        commit(&mut m);
        assert_eq!(m.retired_trees(), 2);
        // t: thick, its clusters promised; f takes every other free cluster.
        let t_vcs = 1200;
        let t = m.create("t", t_vcs * cb, true).unwrap();
        commit(&mut m);
        let f = m.create_volume("f", m.free_clusters() * cb + cb).unwrap();
        let mut vc = 0;
        while write_cluster(&mut m, f, vc) {
            vc += 1;
        }
        commit(&mut m);
        assert_eq!(m.free_clusters(), 0, "the pool is full but for t's promise");
        assert_eq!(m.promised_clusters(), t_vcs);
        let meta = RwLock::new(m);
        let settled = AtomicUsize::new(0);
        let writers_left = AtomicUsize::new(3);
        // The writers and the settler start together.
        let start = std::sync::Barrier::new(4);
        let writer = |vol: u32, vcs: u64, seed: u64| {
            let (meta, writers_left, start) = (&meta, &writers_left, &start);
            move || {
                start.wait();
                let mut rng = seed;
                let mut written = vec![false; vcs as usize];
                let mut plans = Vec::new();
                for _ in 0..ROUNDS {
                    let vc = xorshift(&mut rng) % vcs;
                    let m = meta.read();
                    let w = Waiter(vol.into());
                    // Piece 1 of the cluster (piece 0 of d's was written before).
                    match m.plan_write_io(vol, vc * cb + PIECE, PIECE, 0, w, &mut plans) {
                        Ok(ticket) => {
                            if vol == t {
                                assert!(plans[0].copy_from.is_none(), "a thick write in place");
                            }
                            m.end_write_io(vol, ticket, &plans[0], true);
                            written[vc as usize] = true;
                        }
                        // d's copy-on-writes may find the pool full until what the steps
                        // free is durable: a commit.
                        Err(Blocked::Fail(PoolError::NoSpace)) if vol == d => {
                            drop(m);
                            commit(&mut meta.write());
                        }
                        Err(e) => panic!("writing {vol}:{vc}: {e:?}"),
                    }
                }
                writers_left.fetch_sub(1, Ordering::SeqCst);
                (vol, written)
            }
        };
        let models = std::thread::scope(|s| {
            let threads: Vec<_> = [(t, t_vcs, 1), (t, t_vcs, 2), (d, d_vcs, 3)]
                .into_iter()
                .map(|(vol, vcs, seed)| s.spawn(writer(vol, vcs, 0x9e37_79b9 * seed)))
                .collect();
            s.spawn(|| {
                start.wait();
                loop {
                    let spent = meta.read().settle(37).unwrap();
                    settled.fetch_add(spent, Ordering::SeqCst);
                    if writers_left.load(Ordering::SeqCst) == 0 {
                        break;
                    }
                    std::thread::yield_now();
                }
            });
            commit_and_check_while(&meta, || writers_left.load(Ordering::SeqCst) > 0);
            threads.into_iter().map(|t| t.join().unwrap()).collect::<Vec<_>>()
        });
        assert!(settled.into_inner() > 0, "the steps ran beside the writers");
        let mut m = meta.into_inner();
        commit_and_settle(&mut m);
        assert!(m.check().is_empty(), "{:?}", m.check());
        assert_eq!((m.leaked(), m.retired_trees(), m.promised_clusters()), (0, 0, 0));
        assert_eq!(m.unmapped_clusters(t, t_vcs), 0, "every promised cluster mapped");
        let mut want: HashMap<u32, Vec<bool>> = HashMap::default();
        for (vol, written) in models {
            let merged = want.entry(vol).or_insert_with(|| vec![false; written.len()]);
            for (vc, w) in written.into_iter().enumerate() {
                merged[vc] |= w;
            }
        }
        for (vol, written) in want {
            for (vc, w) in written.into_iter().enumerate() {
                let piece = vc as u64 * cb / PIECE;
                assert_eq!(m.piece_written(vol, piece + 1), w, "{vol}:{vc} piece 1");
                assert_eq!(m.piece_written(vol, piece), vol == d, "{vol}:{vc} piece 0");
            }
        }
    }

    /// A family's stock of lent clusters never makes another family run out early: the pool is
    /// full only when every free cluster, stocked or not, is used. (A refill that does not
    /// take the other stocks back, run as a mutant, fails here.)
    #[test]
    fn a_family_can_use_the_clusters_another_family_holds_in_stock() {
        let mut m = fresh();
        let a = m.create_volume("a", 1 << 20).unwrap();
        let b = m.create_volume("b", 4 << 20).unwrap();
        assert!(write_cluster(&mut m, a, 0));
        let a_stock = m.fams.get(m.family_of[&a]).unwrap().stock.len();
        assert!(a_stock > 0, "the write's family keeps the rest of its batch");
        let free = m.free_clusters();
        assert_eq!(free, m.alloc.lock().free_count() + a_stock, "stocked clusters count as free");
        let mut written = 0;
        while write_cluster(&mut m, b, written) {
            written += 1;
            assert!(m.check().is_empty(), "{:?}", m.check());
        }
        assert_eq!(written, free, "b used every free cluster, a's stock included");
        assert_eq!((m.free_clusters(), m.leaked()), (0, 0));
        commit(&mut m);
        assert!(m.check().is_empty(), "{:?}", m.check());
    }

    /// Only a write that needs fresh clusters its stock lacks makes the pool lend: not one that
    /// is refused, nor one that overwrites in place, however many clusters it spans.
    #[test]
    fn only_a_write_short_of_fresh_clusters_refills_its_stock() {
        let mut m = fresh_of(sb_of(8 << 20));
        let v = m.create_volume("v", 1 << 20).unwrap();
        let mut plans = Vec::new();
        let whole = 1 << 20;
        m.plan_write(v, 0, whole, 0, Waiter(0), &mut plans).unwrap();
        assert_eq!(plans.len() as u64, whole / m.cluster_bytes());
        for p in &plans {
            m.finish_span(v, p);
        }
        m.end_write(v);
        commit(&mut m);
        let lent = |m: &PoolMeta| m.alloc.lock().used_count();
        let before = lent(&m);
        m.plan_write(v, 0, whole, 0, Waiter(0), &mut plans).unwrap();
        assert!(plans.iter().all(|p| !p.fresh), "owned clusters are overwritten in place");
        for p in &plans {
            m.finish_span(v, p);
        }
        m.end_write(v);
        assert_eq!(lent(&m), before, "an in-place write lends nothing");
        let s = m.snapshot(v, "s").unwrap();
        let r = m.plan_write(s, 0, whole, 0, Waiter(0), &mut plans);
        assert!(matches!(r, Err(Blocked::Fail(PoolError::ReadOnly(_)))), "{r:?}");
        assert_eq!(lent(&m), before, "a refused write lends nothing");
        assert!(m.check().is_empty(), "{:?}", m.check());
    }

    /// Mapping records change live state only through a family's decisions.
    #[test]
    #[should_panic(expected = "a mapping record applied outside loading")]
    fn a_mapping_record_is_not_applied_live() {
        let mut m = fresh();
        let v = m.create_volume("v", 1 << 20).unwrap();
        m.apply(&Record::MapSet { volume: v, vcluster: 0, entry: Entry::new(5, 1).0 });
    }

    /// What a family frees comes back to its own stock once reusable, up to `Stock::MAX`; the
    /// pool takes back the rest, and the stock itself when the family goes.
    #[test]
    fn freed_clusters_refill_the_family_stock_up_to_its_bound() {
        let mut m = fresh_of(sb_of(8 << 20));
        let baseline = m.free_clusters();
        let a = m.create_volume("a", 4 << 20).unwrap();
        let n = 3 * Stock::MAX as u64;
        for vc in 0..n {
            assert!(write_cluster(&mut m, a, vc));
        }
        commit(&mut m);
        assert_eq!(m.free_clusters(), baseline - n);
        m.trim(a, 0, n * m.cluster_bytes(), Waiter(0)).unwrap();
        assert_eq!(m.free_clusters(), baseline - n, "not reusable before the trim is durable");
        commit(&mut m);
        let stock = m.fams.get(m.family_of[&a]).unwrap().stock.len();
        assert_eq!(stock, Stock::MAX as u64, "the stock keeps what it may");
        assert_eq!(m.free_clusters(), baseline, "and the pool took back the rest");
        assert!(m.check().is_empty(), "{:?}", m.check());
        m.delete(a).unwrap();
        commit_and_settle(&mut m);
        assert_eq!(m.family_count(), 0);
        let free = m.alloc.lock().free_count();
        assert_eq!((free, m.leaked()), (baseline, 0), "a gone family's stock");
    }

    /// Clusters are shared only inside a family, so a cluster a family frees waits only for
    /// that family's older I/O: another volume's long read does not hold it back.
    #[test]
    fn a_family_reuses_what_it_frees_whatever_other_families_have_in_flight() {
        let mut m = fresh();
        let a = m.create_volume("a", 1 << 20).unwrap();
        let b = m.create_volume("b", 1 << 20).unwrap();
        let snap = m.snapshot(b, "b-snap").unwrap();
        assert_eq!(m.family_count(), 2, "a snapshot joins its origin's family");
        write(&mut m, a);
        write(&mut m, b);
        let free = m.free_clusters();
        let b_read = m.begin_io(b);
        let a_read = m.begin_io(a);
        m.trim(a, 0, PIECE, Waiter(1)).unwrap();
        commit(&mut m);
        assert_eq!(m.free_clusters(), free, "a's own older read still may touch the cluster");
        m.end_io(a_read);
        assert_eq!(m.free_clusters(), free + 1, "b's read does not hold a's cluster back");
        m.end_io(b_read);
        assert!(m.check().is_empty(), "{:?}", m.check());
        // Deleting a family's last volume lets the family go once nothing is left in flight.
        for id in [a, b, snap] {
            m.delete(id).unwrap();
        }
        commit_and_settle(&mut m);
        assert_eq!((m.family_count(), m.volume_count(), m.leaked()), (0, 0, 0));
    }

    /// A family that lives on (rolling snapshots of a volume) does not keep the names of the
    /// volumes deleted from it; whoever waited for a deleted volume to thaw is woken and finds
    /// it gone.
    #[test]
    fn deleted_volumes_leave_no_trace_in_a_living_family() {
        let mut m = fresh();
        let v = m.create_volume("v", 1 << 20).unwrap();
        for i in 0..50 {
            let s = m.snapshot(v, &format!("s{i}")).unwrap();
            write(&mut m, v);
            m.delete(s).unwrap();
            commit_and_settle(&mut m);
        }
        assert_eq!((m.family_count(), m.family_of.len()), (1, 1));
        // A write waits for a frozen volume that is then deleted.
        m.set_frozen(v, true);
        let mut plans = Vec::new();
        let r = m.plan_write(v, 0, PIECE, 0, Waiter(7), &mut plans);
        assert!(matches!(r, Err(Blocked::Wait)), "{r:?}");
        m.delete(v).unwrap();
        m.set_frozen(v, false);
        let mut woken = Vec::new();
        m.take_woken(&mut woken);
        assert_eq!(woken, [Waiter(7)]);
        let r = m.plan_write(v, 0, PIECE, 0, Waiter(7), &mut plans);
        assert!(matches!(r, Err(Blocked::Fail(PoolError::NoVolume(_)))), "{r:?}");
        commit_and_settle(&mut m);
        assert_eq!((m.family_count(), m.family_of.len(), m.parked()), (0, 0, 0));
        assert!(m.check().is_empty(), "{:?}", m.check());
    }

    /// A commit visits the families touched since the last seal, not every family: idle ones
    /// keep their I/O epoch; one that freed nothing ends the commit itself at its next
    /// decision; a deleted family still reading goes at the first commit after its last I/O,
    /// though that commit touched nothing of it.
    #[test]
    fn a_commit_visits_only_the_families_touched_since_the_last_seal() {
        let mut m = fresh_of(sb_of(4 << 20));
        let ids: Vec<u32> =
            (0..6).map(|i| m.create_volume(&format!("v{i}"), 1 << 20).unwrap()).collect();
        for &id in &ids {
            write(&mut m, id);
        }
        assert_eq!(m.touched_families(), 0, "a commit leaves nothing listed");
        let epoch = |m: &PoolMeta, id: u32| m.fams.get(m.family_of[&id]).unwrap().io_epoch;
        let before: Vec<u64> = ids.iter().map(|&id| epoch(&m, id)).collect();
        // A read touches nothing; a write lists its family once, however many records.
        let mut pieces = Vec::new();
        let read = m.plan_read_io(ids[1], 0, PIECE, &mut pieces).unwrap();
        m.end_io(read);
        assert_eq!(m.touched_families(), 0, "a read lists nothing");
        for vc in 0..8 {
            assert!(write_cluster(&mut m, ids[0], vc));
        }
        assert_eq!(m.touched_families(), 1);
        assert!(m.check().is_empty(), "{:?}", m.check());
        commit(&mut m);
        let after: Vec<u64> = ids.iter().map(|&id| epoch(&m, id)).collect();
        // The written family ended the first commits itself at its first write; the idle
        // ones end theirs when they next decide (a read is no decision).
        assert_eq!(after[1..], before[1..], "the idle families were not visited");
        assert_eq!(after[0], before[0] + 1, "the commit's end left the written family alone");
        assert!(m.check().is_empty(), "{:?}", m.check());
        let read = m.plan_read_io(ids[0], 0, PIECE, &mut pieces).unwrap();
        m.end_io(read);
        assert_eq!(epoch(&m, ids[0]), before[0] + 1, "a read is not a decision");
        assert!(write_cluster(&mut m, ids[0], 9));
        assert_eq!(epoch(&m, ids[0]), before[0] + 2, "which ends it at its next decision");
        assert!(m.check().is_empty(), "{:?}", m.check());
        // A read in flight on a volume that is then deleted: its family waits for it.
        let families = m.family_count();
        let read = m.plan_read_io(ids[2], 0, PIECE, &mut pieces).unwrap();
        m.delete(ids[2]).unwrap();
        commit_and_settle(&mut m);
        assert_eq!(m.family_count(), families, "the family waits for its read");
        m.end_io(read);
        assert!(write_cluster(&mut m, ids[3], 1));
        commit(&mut m);
        assert_eq!(m.family_count(), families - 1, "and goes at the next commit");
        assert_eq!(m.leaked(), 0);
        assert!(m.check().is_empty(), "{:?}", m.check());
    }

    /// A checkpoint writes a clone whose snapshot was deleted as a volume of its own; loading
    /// it must still put it in its origin's family, as they share clusters.
    #[test]
    fn loading_merges_families_that_share_clusters() {
        let mut m = fresh();
        let origin = m.create_volume("o", 1 << 20).unwrap();
        write(&mut m, origin);
        let snap = m.snapshot(origin, "s").unwrap();
        let clone = m.clone_volume(snap, "c").unwrap();
        m.delete(snap).unwrap();
        commit(&mut m);
        assert_eq!(m.family_count(), 1);
        let mut n = PoolMeta::new(sb());
        n.load(&m.freeze().payload()).unwrap();
        assert_eq!(n.family_count(), 2, "the clone is loaded as a volume of its own");
        n.loaded(0, None);
        assert_eq!(n.family_count(), 1, "and then merged with the origin it shares clusters with");
        assert!(n.check().is_empty(), "{:?}", n.check());
        assert_eq!(n.volume(clone).unwrap().parent, snap);
    }

    /// A crash can keep the first blocks of a commit and lose the rest, so the journal must
    /// hold control records in the order they were made, after the records made before them:
    /// here a volume gets many writes and is deleted, and a snapshot of a volume of another
    /// family then takes its name. Every prefix of the commit's blocks replays to a state with
    /// unique names. (With control records queued per family, the snapshot's family went
    /// first: a prefix kept two "x". Caught by this test as a mutant.)
    #[test]
    fn every_prefix_of_a_commit_keeps_control_records_in_order() {
        use crate::format::JournalBlock;
        let mut m = fresh();
        let a = m.create_volume("a", PIECE).unwrap();
        let x = m.create_volume("x", 512 << 10).unwrap();
        commit(&mut m);
        let before = m.freeze().payload();
        // Enough data records in x's family for the commit to span blocks: each piece of each
        // cluster written (a record per new bit), then trimmed (a record each).
        let mut plans = Vec::new();
        let pieces = (512 << 10) / PIECE;
        for p in (0..pieces).chain(0..pieces) {
            if m.piece_written(x, p) {
                m.trim(x, p * PIECE, PIECE, Waiter(0)).unwrap();
                continue;
            }
            m.plan_write(x, p * PIECE, PIECE, 0, Waiter(0), &mut plans).unwrap();
            for plan in &plans {
                m.finish_span(x, plan);
            }
            m.end_write(x);
        }
        m.delete(x).unwrap();
        m.snapshot(a, "x").unwrap();
        let mut sealed = m.seal().unwrap().unwrap();
        sealed.encode_now();
        assert!(sealed.blocks().len() >= 2, "the commit spans blocks");
        for keep in 0..=sealed.blocks().len() {
            let mut n = PoolMeta::new(sb());
            n.load(&before).unwrap();
            for (_, bytes) in &sealed.blocks()[..keep] {
                let (block, _) = JournalBlock::decode(bytes, &[1; 16]).unwrap();
                n.load(&block.payload).unwrap();
            }
            let names: Vec<String> = n.volumes().values().map(|v| v.name.clone()).collect();
            let unique: std::collections::BTreeSet<&String> = names.iter().collect();
            assert_eq!(names.len(), unique.len(), "{keep} blocks kept: {names:?}");
        }
        m.commit_done(sealed);
    }

    /// Found by the fuzzer (engine/volume/fuzz, `metadata`): damaged metadata naming a thick
    /// volume larger than the pool opened by listing every cluster it lacked (2^36 here: out of
    /// memory); now it opens thin at once. A volume id outside 1..VOLUME_ID_MAX is refused as
    /// damage (it overflowed the next id); a pool whose ids are spent refuses new volumes.
    #[test]
    fn damaged_metadata_of_impossible_sizes_and_ids_opens_or_is_refused_cleanly() {
        let load = |records: &[Record]| {
            let mut m = PoolMeta::new(sb());
            let mut payload = Vec::new();
            records.iter().for_each(|r| r.encode(&mut payload));
            m.load(&payload).map(|()| m)
        };
        let huge = 1u64 << 50;
        let create =
            |id| Record::VolumeCreate { id, parent: 0, size_bytes: huge, name: "t".into() };
        let mut m = load(&[create(1), Record::Thick { id: 1 }]).unwrap();
        m.loaded(0, None);
        assert!(!m.volume(1).unwrap().thick);
        assert_eq!(m.thick_repairs(), (0, 1));
        // Within the pool's size but lacking more than one operation ever maps: thin at once,
        // without listing what it lacks.
        let cb = 1u64 << 14;
        let big = layout((THICK_MAP_MAX + 4096) * cb * 5 / 4, &geometry(0)).unwrap();
        let mut m = PoolMeta::new(big);
        let mut payload = Vec::new();
        let size_bytes = (THICK_MAP_MAX + 1) * cb;
        Record::VolumeCreate { id: 1, parent: 0, size_bytes, name: "t".into() }
            .encode(&mut payload);
        Record::Thick { id: 1 }.encode(&mut payload);
        m.load(&payload).unwrap();
        m.loaded(0, None);
        assert!(!m.volume(1).unwrap().thick);
        assert_eq!(m.thick_repairs(), (0, 1));
        for id in [0, VOLUME_ID_MAX] {
            let r = load(&[create(id)]);
            assert!(matches!(r, Err(PoolError::Damaged(_))), "id {id}: {:?}", r.err());
        }
        let last = VOLUME_ID_MAX - 1;
        let small =
            Record::VolumeCreate { id: last, parent: 0, size_bytes: PIECE, name: "l".into() };
        let mut m = load(&[small]).unwrap();
        m.loaded(0, None);
        assert!(matches!(m.create_volume("v", PIECE), Err(PoolError::IdsExhausted)));
        assert!(matches!(m.snapshot(last, "s"), Err(PoolError::IdsExhausted)));
    }

    /// One thick creation or growth takes at most `THICK_MAP_MAX` clusters (a bound on what
    /// one operation reserves and records): one more is refused, `ThickTooLarge`, and changes
    /// nothing; the bound itself is taken, and a growth past it refused.
    #[test]
    fn a_thick_volume_maps_at_most_thick_map_max_clusters_per_operation() {
        let cb = 1u64 << 14;
        let mut m = fresh_of(layout((THICK_MAP_MAX + 4096) * cb * 5 / 4, &geometry(0)).unwrap());
        let free = m.free_clusters();
        assert!(free > THICK_MAP_MAX + 1, "room for more than the bound: {free}");
        let r = m.create("big", (THICK_MAP_MAX + 1) * cb, true);
        assert!(
            matches!(r, Err(PoolError::ThickTooLarge { wanted, max })
            if wanted == THICK_MAP_MAX + 1 && max == THICK_MAP_MAX),
            "{r:?}"
        );
        assert!(m.find("big").is_err() && m.pending_records() == 0, "a refusal logs nothing");
        assert_eq!(m.free_clusters(), free);
        let id = m.create("big", THICK_MAP_MAX * cb, true).unwrap();
        assert_eq!(m.free_clusters(), free - THICK_MAP_MAX);
        let r = m.resize(id, (2 * THICK_MAP_MAX + 1) * cb, false);
        assert!(matches!(r, Err(PoolError::ThickTooLarge { .. })), "{r:?}");
        assert_eq!(m.volume(id).unwrap().size_bytes, THICK_MAP_MAX * cb);
        // Nothing mapped yet: a growth would leave more promised than one operation maps.
        let r = m.resize(id, (THICK_MAP_MAX + 1) * cb, false);
        assert!(
            matches!(r, Err(PoolError::ThickTooLarge { wanted, .. }) if wanted == THICK_MAP_MAX + 1),
            "{r:?}"
        );
        while m.settle(crate::ops::SETTLE_STEP).unwrap() > 0 {}
        m.resize(id, (THICK_MAP_MAX + 1) * cb, false).unwrap();
        assert_eq!(m.free_clusters(), free - THICK_MAP_MAX - 1);
        assert!(m.check().is_empty(), "{:?}", m.check());
    }

    /// An inflation that would map more than `THICK_MAP_MAX` holes is refused before anything
    /// (`decouple_room`, which `ops::decouple` asks first) and by the apply itself, changing
    /// nothing; one hole fewer goes.
    #[test]
    fn an_inflation_maps_at_most_thick_map_max_holes() {
        let cb = 1u64 << 14;
        let mut m = fresh_of(layout((THICK_MAP_MAX + 4096) * cb * 5 / 4, &geometry(0)).unwrap());
        let id = m.create("thin", (THICK_MAP_MAX + 1) * cb, false).unwrap();
        let r = m.decouple_room(id, true);
        assert!(
            matches!(r, Err(PoolError::InflateTooLarge { wanted, max })
            if wanted == THICK_MAP_MAX + 1 && max == THICK_MAP_MAX),
            "{r:?}"
        );
        let pending = m.pending_records();
        assert!(matches!(m.decouple(id, true), Err(PoolError::InflateTooLarge { .. })));
        assert_eq!(m.pending_records(), pending, "a refusal logs nothing");
        assert!(!m.volume(id).unwrap().thick);
        m.resize(id, THICK_MAP_MAX * cb, false).unwrap();
        assert_eq!(m.decouple_room(id, true).unwrap().0, THICK_MAP_MAX);
        m.decouple(id, true).unwrap();
        assert!(m.volume(id).unwrap().thick);
        assert!(m.check().is_empty(), "{:?}", m.check());
        // Reserved at once, mapped by settling steps.
        assert_eq!(m.promised_clusters(), THICK_MAP_MAX);
        commit_and_settle(&mut m);
        assert_eq!((m.promised_clusters(), m.unmapped_clusters(id, THICK_MAP_MAX)), (0, 0));
        assert!(m.check().is_empty(), "{:?}", m.check());
    }

    /// A shrink cuts away the leaves past the new end whole and retires them, released in
    /// steps once the shrink is durable (the exclusive borrow releases nothing per cluster);
    /// what the end's own leaf maps past it is unmapped, the pieces of the last cluster past
    /// the end trimmed. A snapshot sharing the leaves keeps reading them; the written count,
    /// reference counts and the leak count stay exact throughout; without `force` a shrink
    /// over a written piece is refused, looking only at what is mapped.
    #[test]
    fn a_shrink_retires_the_leaves_past_its_end_released_in_steps_once_durable() {
        let mut m = fresh_of(sb_of(256 << 20));
        let (cb, fan) = (m.cluster_bytes(), crate::map::FANOUT as u64);
        let baseline = m.used_clusters();
        let n = 6 * fan + 5;
        let v = m.create_volume("v", n * cb).unwrap();
        for vc in 0..n {
            assert!(write_cluster(&mut m, v, vc));
        }
        commit(&mut m);
        let s = m.snapshot(v, "s").unwrap();
        // v's own clusters past the end to come (four leaves copied from the snapshot's).
        for k in 2..6 {
            assert!(write_cluster(&mut m, v, k * fan + 1));
        }
        commit(&mut m);
        let used = m.used_clusters();
        assert_eq!(used, baseline + n + 4);
        // The new end: piece 1 of volume cluster fan + 7 (its piece 0, written, stays).
        let end = (fan + 7) * cb + PIECE;
        assert!(m.written_from(v, end - PIECE) && m.written_from(v, end));
        assert!(matches!(m.resize(v, end, false), Err(PoolError::WouldDropData(_))));
        let before = m.freeze().payload();
        m.resize(v, end, true).unwrap();
        assert_eq!(m.retired_trees(), 1, "the leaves past the end, retired whole");
        assert_eq!(m.allocated_bytes(v), (fan + 8) * PIECE);
        assert!(m.written_from(v, end - PIECE), "the last cluster's piece 0 stays");
        assert!(!m.written_from(v, end), "nothing written past the end");
        assert_eq!(m.settle(usize::MAX).unwrap(), 0, "nothing released before it is durable");
        // The shrink's commit, replayed from its journal blocks over the state before it
        // (loading releases what it cuts at once): the same volume, references exact.
        let mut sealed = m.seal().unwrap().expect("no commit in flight");
        sealed.encode_now();
        let mut replayed = PoolMeta::new(sb_of(256 << 20));
        replayed.load(&before).unwrap();
        for (_, bytes) in sealed.blocks() {
            let (block, _) = crate::format::JournalBlock::decode(bytes, &[1; 16]).unwrap();
            replayed.load(&block.payload).unwrap();
        }
        replayed.loaded(0, None);
        let r = &replayed;
        assert!(r.check().is_empty(), "{:?}", r.check());
        assert_eq!((r.leaked(), r.retired_trees()), (0, 0));
        assert_eq!(r.volume(v).unwrap().size_bytes, end);
        assert_eq!(r.allocated_bytes(v), m.allocated_bytes(v));
        assert_eq!(r.allocation(v, 0, end, usize::MAX), m.allocation(v, 0, end, usize::MAX));
        assert_eq!(r.allocated_bytes(s), n * PIECE);
        m.commit_done(sealed);
        assert!(m.check().is_empty(), "{:?}", m.check());
        assert_eq!(m.used_clusters(), used, "the cut leaves hold their clusters until released");
        let mut steps = 0;
        while m.settle(16).unwrap() > 0 {
            steps += 1;
            assert!(m.check().is_empty(), "{:?}", m.check());
            assert_eq!(m.leaked(), 0);
        }
        assert!(steps >= 4, "a step at a time: {steps} steps");
        commit(&mut m);
        // v's own clusters past the end are free; the snapshot keeps all it had.
        assert_eq!(m.used_clusters(), baseline + n);
        assert_eq!(m.allocated_bytes(s), n * PIECE);
        let runs = m.allocation(s, 0, n * cb, usize::MAX);
        let written: u64 = runs.iter().filter(|r| r.2).map(|r| r.1).sum();
        assert_eq!(written, n * PIECE);
        // Grown back, v reads nothing written past its old end.
        m.resize(v, n * cb, false).unwrap();
        assert_eq!(m.allocated_bytes(v), (fan + 8) * PIECE);
        assert!(!m.written_from(v, end));
        // Without force: a shrink past nothing written goes.
        m.resize(v, end, false).unwrap();
        commit_and_settle(&mut m);
        assert!(m.check().is_empty(), "{:?}", m.check());
        assert_eq!((m.retired_trees(), m.leaked()), (0, 0));
    }

    /// A rename's configuration entries and its record may span journal blocks: every prefix
    /// of the commit replays to the volume under its old name with the old entries whole, or
    /// under its new name with every entry written before the rename (`PoolMeta::rename`).
    #[test]
    fn every_prefix_of_a_rename_keeps_its_entries_with_the_name() {
        use crate::format::JournalBlock;
        let sb = layout(4 << 20, &geometry(64 << 10)).unwrap();
        let mut m = fresh_of(sb.clone());
        let id = m.create_volume("old", PIECE).unwrap();
        let big = |c: char| c.to_string().repeat(3000);
        m.set_configs(&[("k:old:1".into(), big('a')), ("k:old:2".into(), big('b'))]).unwrap();
        commit(&mut m);
        let before = m.freeze().payload();
        let new: Vec<(String, String)> =
            vec![("k:new:1".into(), big('a')), ("k:new:2".into(), big('b'))];
        // The removals, and an entry big enough to end up in a block of its own.
        let gone: Vec<(String, String)> = vec![
            ("k:old:1".into(), String::new()),
            ("k:old:2".into(), String::new()),
            ("k:after".into(), big('c')),
        ];
        m.rename(id, "new", &new, &gone).unwrap();
        assert_eq!(m.find("new").ok(), Some(id));
        assert!(m.find("old").is_err());
        let mut sealed = m.seal().unwrap().unwrap();
        sealed.encode_now();
        assert!(sealed.blocks().len() >= 3, "the commit spans blocks");
        let mut seen = std::collections::BTreeSet::new();
        for keep in 0..=sealed.blocks().len() {
            let mut n = PoolMeta::new(sb.clone());
            n.load(&before).unwrap();
            for (_, bytes) in &sealed.blocks()[..keep] {
                let (block, _) = JournalBlock::decode(bytes, &[1; 16]).unwrap();
                n.load(&block.payload).unwrap();
            }
            let name = n.volume(id).unwrap().name;
            let has = |k: &str| n.config().contains_key(k);
            match name.as_str() {
                "old" => assert!(has("k:old:1") && has("k:old:2"), "{keep} blocks kept"),
                "new" => assert!(has("k:new:1") && has("k:new:2"), "{keep} blocks kept"),
                other => panic!("{keep} blocks kept: called {other}"),
            }
            seen.insert(name);
        }
        assert_eq!(seen.len(), 2, "prefixes end both before and after the rename");
        m.commit_done(sealed);
        // A name taken, or not a name, is refused and changes nothing; the same name is no
        // change at all.
        let other = m.create_volume("other", PIECE).unwrap();
        assert!(matches!(m.rename(other, "new", &[], &[]), Err(PoolError::NameTaken(_))));
        assert!(matches!(m.rename(other, "a/b", &[], &[]), Err(PoolError::BadName(_))));
        let pending = m.pending_records();
        m.rename(id, "new", &new, &gone).unwrap();
        assert_eq!(m.pending_records(), pending, "renamed to its own name: nothing logged");
        assert_eq!(m.volume(other).unwrap().name, "other");
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
