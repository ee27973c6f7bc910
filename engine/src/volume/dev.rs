//! A pool opened by the daemon and its volumes as block devices: the adapter between the
//! volume core (`ballast-volume`, free of I/O) and the reactor.
//!
//! [`PoolHandle`] owns the pool's media twice: for the data path as a [`FileDev`] (a file or
//! block device, O_DIRECT, asynchronous through the calling core's io_uring) or an
//! [`NvmeDev`] (an NVMe namespace's `/dev/ngXnY`, passthrough commands on the calling core's
//! device ring), and as a [`PoolDisk`] (blocking: file I/O, or passthrough ioctls) for
//! opening and formatting it, and for the requests that arrive once the cores are gone. The
//! [`PoolMeta`] between them sits behind a read-write lock held only for in-memory decisions,
//! never across I/O. A core borrows it shared once per flush round with volume work (a loop
//! iteration flushes once, then once per round of same-iteration completions): a round's
//! request events are decided together in that borrow, each data-path decision locking only
//! its volume's family (`ballast_volume::meta`), so cores serving different families decide at
//! the same time. A step that needs the pool itself — a commit's seal and end (its steps in
//! between borrow shared at most), a control operation, parking on the commit — takes the
//! exclusive borrow for that event alone (`Round`); the control thread's listings and
//! operations take it too ([`PoolHandle::meta`]).
//!
//! A [`VolumeDev`] is a [`BlockDev`]: each command becomes a request in a slot of the
//! submitting core's [`CoreQueue`] for the pool — request slots reused in place, run by one
//! task per core and pool, so a volume I/O costs no task and no allocation of its own. Each
//! runs the volume core's [`Request`] state machine — the same code the simulator drives — and
//! carries out the device operations it asks for on the core's ring. A request the pool parks
//! (busy cluster, frozen volume, commit in flight) waits for a wake-up naming its slot:
//! whoever changes the pool state under the lock hands the woken requests theirs (a core
//! through its ready queue or another core's wake channel, the control thread through the
//! cores' wake channels). Nothing polls.
//!
//! Control operations are messages to a core: the control thread sends a `Control` request
//! (`ballast_volume::ops`) — freeze, park until the volume's writes drained, apply, thaw,
//! commit, the same request the simulator runs — to core 0 (under the `owner` placement, one
//! that freezes a volume to its family's owner) and waits for its reply; commits and
//! checkpoints it asks for are `Flush`/`Checkpoint` requests sent to core 0 the same way. The lock is
//! never held across I/O, and nothing sleeps on a condition or polls.
//!
//! Invariants:
//! - every borrow of the pool state ends by delivering the wake-ups it produced;
//! - control operations that change sharing or size (snapshot, rollback, resize, delete)
//!   freeze the volume and wait until its writes drained before they change anything; a drain
//!   that outlasts the pool's quiesce timeout (`PoolHandle::set_quiesce_timeout`, by default
//!   `DEFAULT_QUIESCE_TIMEOUT`) is given up (`Busy`), nothing changed.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use ballast_ffi::{IoBuf, Owned};
use ballast_volume::locks::Waiter;
use ballast_volume::meta::Encoded;
use ballast_volume::pace::{Pace, DEFAULT_COPY_RATE};
use ballast_volume::request::{Access, Buf, Bufs, Cmd, Ctx, DiskOp, Issue, Outcome, Request};
use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};

use super::state_lock::{StateLock, StateRead, StateWrite};
use slab::Slab;

use super::format::BLOCK_SIZE;
use super::forward::{Claims, Mailbox, Owner, Placement, Posted};
use super::meta::{PoolMeta, PIECE};
use super::ops::ControlOp;
use super::pool::{run, Pool, PoolError, PoolGeometry, SyncDisk};
use crate::blockdev::{push_extent, BlockDev, ChangeBase, DevInfo, Extent, IoCmd};
use crate::file::FileDev;
use crate::nvme::{NvmeDev, NvmeDisk};
use crate::offload::Away;
use crate::reactor::{CoreHandle, Cx, Msg, Task};

/// The longest a pending record waits for a commit when no client flushes, by default.
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a control operation waits for a volume's writes to drain, by default.
pub const DEFAULT_QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

/// The most decouplings and inflations running at once by default (`serve --max-decouples`):
/// they share the pool's pace, so more at once go no faster, and each holds a control client
/// (of `--rpc-max-clients`, 16) while it copies.
pub const DEFAULT_MAX_DECOUPLES: u64 = 4;

/// Whether `path` is a character device: an NVMe namespace's generic device, which a pool
/// reaches through passthrough commands (anything else is a file or block device).
pub fn is_namespace(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device())
}

/// Blocking access to the pool's media (opening, formatting, checks): a file or block device,
/// or an NVMe namespace through passthrough ioctls.
pub enum PoolDisk {
    File(FileDisk),
    Nvme(NvmeDisk),
}

impl PoolDisk {
    pub fn open(path: &Path, writable: bool) -> std::io::Result<PoolDisk> {
        if is_namespace(path) {
            let dev = NvmeDev::open(path, !writable).map_err(std::io::Error::other)?;
            return Ok(PoolDisk::Nvme(dev.blocking()?));
        }
        Ok(PoolDisk::File(FileDisk::open(path, writable)?))
    }
}

impl SyncDisk for PoolDisk {
    fn read(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        match self {
            PoolDisk::File(d) => d.read(offset, len),
            PoolDisk::Nvme(d) => d.read(offset, len),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        match self {
            PoolDisk::File(d) => d.write(offset, data, fua),
            PoolDisk::Nvme(d) => d.write(offset, data, fua),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            PoolDisk::File(d) => d.flush(),
            PoolDisk::Nvme(d) => d.flush(),
        }
    }
    fn size_bytes(&self) -> u64 {
        match self {
            PoolDisk::File(d) => d.size_bytes(),
            PoolDisk::Nvme(d) => d.size_bytes(),
        }
    }
}

impl PoolDisk {
    /// The file or device was found to have grown to `bytes` (a namespace's size is fixed).
    fn grown_to(&mut self, bytes: u64) {
        if let PoolDisk::File(d) = self {
            d.size = d.size.max(bytes);
        }
    }
}

/// Gives a pool file's first `blocks` blocks (superblocks, checkpoint halves, journal) their
/// own blocks on its filesystem (`fallocate`, size unchanged), so that a filesystem filling up
/// with data fails data writes to fresh clusters (ENOSPC to the client), never a commit. An
/// error only when the filesystem has no room for them; one without `fallocate` is warned
/// of; a block device or namespace needs nothing.
fn reserve_metadata(path: &Path, blocks: u64) -> std::io::Result<()> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    if !file.metadata()?.is_file() {
        return Ok(());
    }
    let bytes = blocks * BLOCK_SIZE as u64;
    match crate::file::reserve_start(&file, bytes) {
        Ok(true) => Ok(()),
        Ok(false) => {
            tracing::warn!(path = %path.display(), "the pool's filesystem has no fallocate: its metadata blocks are not reserved, and commits fail if it fills up");
            Ok(())
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => {
            Err(std::io::Error::new(
                e.kind(),
                format!(
                    "{}: its filesystem has no room for the pool's metadata ({bytes} bytes of \
                     superblocks, checkpoints and journal): {e}",
                    path.display()
                ),
            ))
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not reserve the pool's metadata blocks");
            Ok(())
        }
    }
}

/// The pool's media held by one process: an advisory lock (`flock`) on its file or device,
/// exclusive for the daemon and for formatting, shared for the offline readers (`pool check`,
/// `pool dump`). Two daemons serving one pool would each write metadata and data the other
/// does not know of; a check of a pool being served would report what it is still writing.
/// The lock goes with the descriptor: released at drop, and by the kernel when the process
/// dies (kill -9 included: the descriptor is its own, never registered with a ring). An NVMe
/// namespace has two nodes, `/dev/nvmeXnY` (block) and `/dev/ngXnY` (passthrough): both are
/// locked, in that name order, so a pool served through one is not taken through the other.
#[derive(Debug)]
pub struct PoolLock {
    _held: Vec<nix::fcntl::Flock<File>>,
}

/// How long opening a pool waits for another process to let go of it (a daemon still
/// stopping) before it refuses.
pub const POOL_LOCK_WAIT: Duration = Duration::from_secs(10);

/// The other node of the NVMe namespace `path` names (`/dev/ngXnY` for `/dev/nvmeXnY` and
/// the other way round, in the same directory), where it exists as a device node.
pub fn namespace_sibling(path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let real = std::fs::canonicalize(path).ok()?;
    let name = real.file_name()?.to_str()?;
    let (other, rest) = match (name.strip_prefix("ng"), name.strip_prefix("nvme")) {
        (Some(rest), _) => ("nvme", rest),
        (_, Some(rest)) => ("ng", rest),
        _ => return None,
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (ctrl, ns) = rest.split_once('n')?;
    if !(digits(ctrl) && digits(ns)) {
        return None; // a controller (nvme0), a partition (nvme0n1p1), a path (nvme0c1n1)
    }
    let sibling = real.with_file_name(format!("{other}{ctrl}n{ns}"));
    let kind = std::fs::metadata(&sibling).ok()?.file_type();
    (kind.is_block_device() || kind.is_char_device()).then_some(sibling)
}

impl PoolLock {
    /// Locks `path` (exclusive or shared), and its namespace's other node if it has one,
    /// waiting up to `wait` while another process holds either; the error says who to stop.
    pub fn take(path: &Path, exclusive: bool, wait: Duration) -> std::io::Result<PoolLock> {
        let deadline = Instant::now() + wait;
        let mut nodes = vec![std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())];
        nodes.extend(namespace_sibling(path));
        // One order for every process, by the nodes' real paths (whatever link named them):
        // two never each hold the node the other waits for.
        nodes.sort();
        let mut held = Vec::with_capacity(nodes.len());
        for node in &nodes {
            let sibling = namespace_sibling(path).as_deref() == Some(node.as_path());
            match Self::lock_one(path, node, exclusive, deadline) {
                Ok(lock) => held.push(lock),
                // A sibling node this user may not open (udev makes /dev/ngXnY root's alone,
                // /dev/nvmeXnY the disk group's): nobody without the same rights uses it
                // either; the node named is locked.
                Err(e) if sibling && e.kind() == std::io::ErrorKind::PermissionDenied => {
                    tracing::debug!(node = %node.display(), "namespace's other node not locked: no permission");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(PoolLock { _held: held })
    }

    fn lock_one(
        path: &Path,
        node: &Path,
        exclusive: bool,
        deadline: Instant,
    ) -> std::io::Result<nix::fcntl::Flock<File>> {
        use nix::fcntl::{Flock, FlockArg};
        let arg =
            if exclusive { FlockArg::LockExclusiveNonblock } else { FlockArg::LockSharedNonblock };
        let mut logged = false;
        let mut file = File::open(node)?;
        let through =
            if node == path { String::new() } else { format!(" (through {})", node.display()) };
        loop {
            match Flock::lock(file, arg) {
                Ok(held) => return Ok(held),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    if !logged {
                        tracing::warn!(path = %path.display(), node = %node.display(), "pool in use by another process; waiting for it to be released");
                        logged = true;
                    }
                    file = f;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        format!(
                            "{}: in use by another process{through} (a running `ballast \
                             serve`?); stop it first",
                            path.display()
                        ),
                    ))
                }
                Err((_, e)) => return Err(e.into()),
            }
        }
    }
}

/// The pool's media on the data path.
enum Media {
    File(FileDev),
    Nvme(NvmeDev),
}

impl Media {
    fn submit(&self, cx: &mut Cx<'_>, cmd: IoCmd, tag: u32) {
        match self {
            Media::File(d) => d.submit(cx, cmd, tag),
            Media::Nvme(d) => d.submit(cx, cmd, tag),
        }
    }
}

/// Blocking access to a file or block device.
pub struct FileDisk {
    file: File,
    size: u64,
}

impl FileDisk {
    pub fn open(path: &Path, writable: bool) -> std::io::Result<FileDisk> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        let size = crate::file::media_size(&file)?;
        Ok(FileDisk { file, size })
    }
}

impl SyncDisk for FileDisk {
    fn read(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        self.file.read_exact_at(&mut out, offset)?;
        Ok(out)
    }
    fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
    fn size_bytes(&self) -> u64 {
        self.size
    }
}

/// An open pool shared by the cores and the control thread.
pub struct PoolHandle {
    /// Shared by the cores' data-path decisions (each locks the one family it decides for),
    /// exclusive for the pool's own steps (commits, control operations, listings).
    meta: StateLock<PoolMeta>,
    disk: Mutex<PoolDisk>,
    media: Media,
    path: PathBuf,
    /// The cores running the pool's requests, to wake requests the control thread unblocks.
    cores: OnceLock<Arc<Vec<CoreHandle>>>,
    /// Each core's mail for this pool (one per core, made with `cores`): requests forwarded to
    /// the core owning their family, and the answers coming back.
    mail: OnceLock<Box<[Mailbox<Mail>]>>,
    /// Requests run on their family's owning core ([`Placement::Owner`]), not where they arrive.
    forwarding: AtomicBool,
    /// Each family's owning core, by family number (shared with the family's devices).
    owners: Mutex<HashMap<u32, Arc<Owner>>>,
    /// How many families each core owns (made with `cores`), to place new ones evenly.
    claims: OnceLock<Claims>,
    /// The longest a pending record waits for a commit when no client flushes.
    commit_interval: Mutex<Duration>,
    /// How long a control operation waits for a volume's writes to drain before it gives up
    /// (`Busy`, nothing changed).
    quiesce_timeout: Mutex<Duration>,
    /// The pace of copying that decoupling and inflating keep to, every copy of the pool
    /// together (`PoolHandle::set_copy_rate`); its condition wakes copiers waiting on it
    /// when the rate changes.
    pace: Mutex<Pace>,
    pace_changed: Condvar,
    /// The volumes being decoupled or inflated now (one decoupling each), and the bytes their
    /// copy-ups copied since the pool opened (their progress, for `pool info` and the
    /// metrics).
    decoupling: Mutex<std::collections::HashSet<u32>>,
    copied_bytes: AtomicU64,
    /// The most decouplings and inflations running at once (`set_max_decouples`): each holds
    /// a control client's thread for as long as its paced copy takes.
    max_decouples: AtomicU64,
    /// How long opening (recovery) took, in ms.
    open_ms: u64,
    /// What the volumes' devices report of their volumes (size, read-only), refreshed after
    /// each control operation (the only thing that changes them).
    live_attrs: Mutex<Vec<(u32, Weak<LiveAttrs>)>>,
    /// This process's hold on the media (after `media`: released after it closes).
    _lock: PoolLock,
}

/// The pool state borrowed exclusively off the data path (control thread, listings): when it
/// ends, the requests it woke get their wake-ups through their cores' wake channels.
pub struct MetaGuard<'a> {
    meta: StateWrite<'a, PoolMeta>,
    pool: &'a PoolHandle,
}

impl Deref for MetaGuard<'_> {
    type Target = PoolMeta;
    fn deref(&self) -> &PoolMeta {
        &self.meta
    }
}

impl DerefMut for MetaGuard<'_> {
    fn deref_mut(&mut self) -> &mut PoolMeta {
        &mut self.meta
    }
}

impl Drop for MetaGuard<'_> {
    fn drop(&mut self) {
        let mut woken = Vec::new();
        self.meta.take_woken(&mut woken);
        deliver(self.pool, None, &mut woken);
    }
}

/// One volume's listing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VolumeInfo {
    pub id: u32,
    pub name: String,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    pub read_only: bool,
    pub snapshot: bool,
    /// Every cluster of it is taken (`bdev_lvol_create` without `thin_provision`).
    pub thick: bool,
    pub parent: Option<String>,
}

/// The pool's listing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolInfo {
    pub path: String,
    pub uuid: String,
    pub cluster_bytes: u64,
    pub data_bytes: u64,
    pub free_bytes: u64,
    pub used_bytes: u64,
    pub metadata_bytes: u64,
    pub journal_bytes: u64,
    pub volumes: usize,
    /// Journal ring bytes free (a checkpoint starts the ring over when a quarter is left).
    pub journal_free_bytes: u64,
    /// Mapping records not yet committed.
    pub pending_records: u64,
    /// Journal commits and checkpoints made durable since the pool was opened.
    pub commits: u64,
    pub checkpoints: u64,
    /// How long opening took (superblock, checkpoint, journal replay), in ms.
    pub open_ms: u64,
    /// Which core runs a volume's requests (`--volume-placement`).
    pub placement: Placement,
    /// Families owned by each core (under `owner`; zeros under `any`).
    pub families_per_core: Vec<usize>,
    /// The pace of decoupling and inflating, bytes per second (0: unpaced).
    pub copy_rate_bytes_per_sec: u64,
    /// Decouplings and inflations running now.
    pub decouples_running: u64,
    /// Bytes decoupling and inflating copied since the pool opened.
    pub copied_bytes: u64,
}

impl PoolHandle {
    /// Creates a pool on `path` (a file is created sparse with `size` bytes when missing; a
    /// block device or NVMe namespace takes its whole size).
    pub fn create(path: &Path, size: Option<u64>, g: PoolGeometry) -> Result<(), PoolError> {
        let created = matches!((size, path.exists()), (Some(_), false));
        if let (Some(size), true) = (size, created) {
            crate::file::create_sparse(path, size)?;
        }
        let made = Self::format(path, g);
        if made.is_err() && created {
            let _ = std::fs::remove_file(path);
        }
        made
    }

    /// Formats `path` (locked), a file's metadata region given its blocks first: a pool whose
    /// filesystem has no room for its own metadata is refused now, not at a commit later.
    fn format(path: &Path, g: PoolGeometry) -> Result<(), PoolError> {
        let _lock = PoolLock::take(path, true, Duration::ZERO)?;
        // A regular file's metadata region (a device or namespace needs nothing reserved).
        let meta = File::open(path)?.metadata()?;
        if meta.is_file() {
            reserve_metadata(path, super::pool::layout(meta.len(), &g)?.data_start)?;
        }
        let disk = PoolDisk::open(path, true)?;
        let mut pool = Pool::format(disk, g)?;
        pool.checkpoint()?;
        Ok(())
    }

    /// Opens the pool on `path`: superblock, checkpoint and journal replay.
    pub fn open(path: &Path) -> Result<Arc<PoolHandle>, PoolError> {
        let lock = PoolLock::take(path, true, POOL_LOCK_WAIT)?;
        let started = Instant::now();
        let (media, disk) = if is_namespace(path) {
            let dev = NvmeDev::open(path, false).map_err(std::io::Error::other)?;
            let disk = PoolDisk::Nvme(dev.blocking()?);
            (Media::Nvme(dev), disk)
        } else {
            let dev = FileDev::open(path, None, false)
                .map_err(|e| PoolError::Io(std::io::Error::other(e.to_string())))?;
            (Media::File(dev), PoolDisk::File(FileDisk::open(path, true)?))
        };
        let (disk, meta) = Pool::open(disk)?.into_parts();
        let spans = meta.superblock().total_blocks * BLOCK_SIZE as u64;
        if disk.size_bytes() >= spans + meta.cluster_bytes() {
            let (device, pool) = (disk.size_bytes(), spans);
            tracing::info!(
                device,
                pool,
                "the pool's device is larger than the pool: `ballast pool grow` takes the room in"
            );
        }
        // Its metadata blocks reserved (a no-op but for pools made before creation did it).
        if let Err(e) = reserve_metadata(path, meta.superblock().data_start) {
            tracing::warn!(error = %e, "commits will fail if the pool's filesystem fills up");
        }
        Ok(Arc::new(PoolHandle {
            meta: StateLock::new(meta),
            disk: Mutex::new(disk),
            media,
            path: path.to_path_buf(),
            cores: OnceLock::new(),
            mail: OnceLock::new(),
            owners: Mutex::new(HashMap::new()),
            claims: OnceLock::new(),
            forwarding: AtomicBool::new(Placement::default() == Placement::Owner),
            commit_interval: Mutex::new(DEFAULT_COMMIT_INTERVAL),
            quiesce_timeout: Mutex::new(DEFAULT_QUIESCE_TIMEOUT),
            pace: Mutex::new(Pace::new(DEFAULT_COPY_RATE)),
            pace_changed: Condvar::new(),
            decoupling: Mutex::new(std::collections::HashSet::new()),
            copied_bytes: AtomicU64::new(0),
            max_decouples: AtomicU64::new(DEFAULT_MAX_DECOUPLES),
            open_ms: started.elapsed().as_millis() as u64,
            live_attrs: Mutex::new(Vec::new()),
            _lock: lock,
        }))
    }

    /// The pool's file or device, as it was opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Background commits: after `records` pending records, or `interval` after the first
    /// pending record, whichever comes first, a commit starts without a client's flush.
    pub fn set_commit_policy(&self, records: usize, interval: Duration) {
        self.meta.write().set_commit_records(records);
        *self.commit_interval.lock() = interval;
    }

    /// How long a control operation that changes sharing or size (snapshot, rollback, resize,
    /// delete) waits for the volume's writes in flight to drain; past it the operation fails
    /// (`Busy`) and nothing changes.
    pub fn set_quiesce_timeout(&self, timeout: Duration) {
        *self.quiesce_timeout.lock() = timeout;
    }

    /// The pace of copying for decoupling and inflating volumes, in bytes per second (0:
    /// unpaced), shared by every decoupling in progress (`ballast_volume::pace`); a copier
    /// waiting on the old rate goes on at the new one at once.
    pub fn set_copy_rate(&self, bytes_per_sec: u64) {
        self.pace.lock().set_rate(bytes_per_sec);
        self.pace_changed.notify_all();
    }

    pub fn copy_rate(&self) -> u64 {
        self.pace.lock().rate()
    }

    /// The most decouplings and inflations that run at once; one more is refused
    /// (`DecouplesBusy`) until one ends.
    pub fn set_max_decouples(&self, n: u64) {
        self.max_decouples.store(n.max(1), Ordering::Relaxed);
    }

    /// Which core runs a volume's requests: the core the command arrived on (the default,
    /// [`Placement::Any`]), or its family's owner.
    pub fn set_placement(&self, placement: Placement) {
        self.forwarding.store(placement == Placement::Owner, Ordering::Relaxed);
    }

    pub fn placement(&self) -> Placement {
        match self.forwarding.load(Ordering::Relaxed) {
            true => Placement::Owner,
            false => Placement::Any,
        }
    }

    /// Names the cores that will run this pool's requests (before any does), and starts the
    /// pool's slots task on each of them, so forwarded requests find their owner's running.
    pub fn attach_cores(self: &Arc<Self>, cores: Arc<Vec<CoreHandle>>) {
        // The mailboxes first: a slots task that sees the cores finds its mailbox too.
        let mail = (0..cores.len()).map(|_| Mailbox::default()).collect();
        if self.claims.set(Claims::new(cores.len())).is_err()
            || self.mail.set(mail).is_err()
            || self.cores.set(Arc::clone(&cores)).is_err()
        {
            return;
        }
        for core in cores.iter() {
            let pool = Arc::clone(self);
            core.send_blocking(Msg::Spawn(Box::new(move |_| {
                Box::new(Starter { pool: Some(pool) })
            })));
        }
    }

    /// The families' owners' counts, under the `owner` placement once cores are attached.
    fn owned_by_cores(&self) -> Option<&Claims> {
        match self.forwarding.load(Ordering::Relaxed) {
            true => self.claims.get(),
            false => None,
        }
    }

    /// How many families each core owns (empty before cores are attached).
    pub fn families_per_core(&self) -> Vec<usize> {
        self.claims.get().map(Claims::loads).unwrap_or_default()
    }

    /// Core `core`'s mailbox for this pool, once cores are attached.
    fn mailbox(&self, core: usize) -> Option<&Mailbox<Mail>> {
        self.mail.get().and_then(|m| m.get(core))
    }

    /// The pool state, off the data path.
    pub fn meta(&self) -> MetaGuard<'_> {
        MetaGuard { meta: self.meta.write(), pool: self }
    }

    /// The pool state borrowed shared, for what only reads it (a volume's allocation map): the
    /// cores' decisions go on meanwhile.
    pub fn meta_shared(&self) -> StateRead<'_, PoolMeta> {
        self.meta.read()
    }

    /// Read under the shared borrow: a listing (`/metrics` scrapes it) does not stop the cores'
    /// decisions.
    pub fn info(&self) -> PoolInfo {
        let m = self.meta_shared();
        let sb = m.superblock();
        PoolInfo {
            path: self.path.display().to_string(),
            uuid: sb.pool_uuid.iter().map(|b| format!("{b:02x}")).collect(),
            cluster_bytes: m.cluster_bytes(),
            data_bytes: m.data_bytes(),
            free_bytes: m.free_clusters() * m.cluster_bytes(),
            used_bytes: m.used_clusters() * m.cluster_bytes(),
            metadata_bytes: sb.meta_blocks * BLOCK_SIZE as u64,
            journal_bytes: sb.journal_blocks * BLOCK_SIZE as u64,
            volumes: m.volumes().len(),
            journal_free_bytes: m.journal_blocks_free() * BLOCK_SIZE as u64,
            pending_records: m.pending_records() as u64,
            commits: m.commits_done().0,
            checkpoints: m.commits_done().1,
            open_ms: self.open_ms,
            placement: self.placement(),
            families_per_core: self.families_per_core(),
            copy_rate_bytes_per_sec: self.copy_rate(),
            decouples_running: self.decoupling.lock().len() as u64,
            copied_bytes: self.copied_bytes.load(Ordering::Relaxed),
        }
    }

    /// Read under the shared borrow, as `info`.
    pub fn list(&self) -> Vec<VolumeInfo> {
        let m = self.meta_shared();
        let vols = m.volumes();
        vols.iter()
            .map(|(&id, v)| VolumeInfo {
                id,
                name: v.name.clone(),
                size_bytes: v.size_bytes,
                allocated_bytes: m.allocated_bytes(id),
                read_only: v.read_only,
                snapshot: v.read_only,
                thick: v.thick,
                parent: vols.get(&v.parent).map(|p| p.name.clone()),
            })
            .collect()
    }

    /// Makes every completed write durable, from a blocking thread.
    pub fn commit_blocking(self: &Arc<Self>) -> Result<(), PoolError> {
        self.run_blocking(0, Cmd::Flush).map(drop)
    }

    /// Writes a checkpoint now (clean shutdown; the next start replays nothing).
    pub fn checkpoint_blocking(self: &Arc<Self>) -> Result<(), PoolError> {
        self.run_blocking(0, Cmd::Checkpoint).map(drop)
    }

    /// Runs a control operation (durable when this returns): the new volume's id for a
    /// create, snapshot or clone, else 0. What it leaves to do in steps — a thick volume's
    /// clusters to map, a deleted or rolled-back tree to release — is done here, on the
    /// control thread ([`ballast_volume::ops::control`], `ControlThread::settle_step`), before
    /// this returns, no step holding the others' I/O for long.
    pub fn control(self: &Arc<Self>, op: ControlOp) -> Result<u32, PoolError> {
        let mut driver = ControlThread { pool: self, began: Instant::now() };
        let r = ballast_volume::ops::control(&mut driver, op);
        self.refresh_attrs();
        r
    }

    /// The core a request from the control thread runs on: under the `owner` placement, a
    /// control operation that freezes a volume and drains its writes (snapshot, rollback,
    /// resize, delete) or a copy-up of a volume's clusters on the core owning the volume's
    /// family, if it has one — the core whose requests it waits for and whose family state it
    /// changes; everything else on core 0.
    fn core_for<B>(&self, vol: u32, cmd: &Cmd<B>, cores: usize) -> usize {
        let id = match cmd {
            Cmd::Control(op) => op.quiesce(),
            Cmd::Own { .. } => Some(vol),
            _ => None,
        };
        if self.owned_by_cores().is_none() {
            return 0;
        }
        let family = id.and_then(|id| self.meta_shared().family_number(id));
        let owner = family.and_then(|f| self.owners.lock().get(&f).and_then(|o| o.get()));
        owner.filter(|&core| core < cores).unwrap_or(0)
    }

    /// Brings what devices report up to date (a deleted volume reports size 0).
    fn refresh_attrs(&self) {
        let m = self.meta();
        self.live_attrs.lock().retain(|(id, attrs)| {
            let Some(attrs) = attrs.upgrade() else { return false };
            let v = m.volume(*id).ok();
            attrs.size.store(v.as_ref().map_or(0, |v| v.size_bytes), Ordering::Relaxed);
            if v.is_some_and(|v| v.read_only) {
                attrs.read_only.store(true, Ordering::Relaxed);
            }
            true
        });
    }

    /// Runs a request of the control thread's (flush, checkpoint, control operation — volume
    /// 0 — or a copy-up of volume `vol`'s clusters) from a blocking thread: as a message to a
    /// core ([`PoolHandle::core_for`]), where it runs like any request (its I/O on the ring,
    /// the lock never held across it, parked while it waits); once the cores are gone, here on
    /// the blocking disk, the same request run to completion. Its refusal names the volumes
    /// it is about ([`PoolHandle::named`]).
    fn run_blocking(self: &Arc<Self>, vol: u32, cmd: Cmd<DevBuf>) -> Result<i32, PoolError> {
        self.run_blocking_by_id(vol, cmd).map_err(|e| self.named(e))
    }

    /// `Decoupling` while volume `id` is being decoupled or inflated: what a snapshot or a
    /// rollback of it waits for (either would share again what the decoupling copied).
    fn not_decoupling(&self, id: u32) -> Result<(), PoolError> {
        if self.decoupling.lock().contains(&id) {
            return Err(self.named(PoolError::Decoupling(id.into())));
        }
        Ok(())
    }

    /// `e` with the volumes it names by id named by their names now: what the control API's
    /// clients know them by.
    pub fn named(&self, e: PoolError) -> PoolError {
        let m = self.meta_shared();
        e.named(|id| m.volume(id).ok().map(|v| v.name.clone()))
    }

    fn run_blocking_by_id(self: &Arc<Self>, vol: u32, cmd: Cmd<DevBuf>) -> Result<i32, PoolError> {
        if let Some(why) = self.meta_shared().failed() {
            return Err(PoolError::Failed(why.to_string()));
        }
        // The same command for the blocking disk, should the cores be gone.
        let here: Cmd<Vec<u8>> = pool_wide(&cmd);
        if let Some(cores) = self.cores.get() {
            // Its core first; should that one have stopped already (shutdown), core 0.
            let first = self.core_for(vol, &cmd, cores.len());
            for core in if first == 0 { vec![0] } else { vec![first, 0] } {
                let (tx, rx) = crossbeam_channel::bounded(1);
                let request = Some((Reply::Channel(tx), vol, pool_wide(&cmd)));
                let io = Handoff { pool: Arc::clone(self), request };
                let spawn = move |_cx: &mut Cx<'_>| Box::new(io) as Box<dyn Task>;
                if !cores[core].send_blocking(Msg::Spawn(Box::new(spawn))) {
                    continue;
                }
                // A drain may take up to the quiesce timeout, then the commit (never less
                // patience than the default timeout allows: a short drain deadline says
                // nothing about how long the operation queued before it or its commit take).
                let patience = 2 * (*self.quiesce_timeout.lock()).max(DEFAULT_QUIESCE_TIMEOUT);
                return match rx.recv_timeout(patience) {
                    Ok(r) => r,
                    Err(_) => Err(PoolError::CommitTimeout),
                };
            }
            // The cores have stopped: nothing else runs, so it runs here.
        }
        let mut meta = self.meta();
        if meta.committing() {
            return Err(PoolError::CommitStranded);
        }
        // Nothing would wake a drain now, nor a copy-up parked behind a write: a volume with a
        // write left in flight (or frozen by an operation the cores never finished) stays busy.
        let busy = |v: u32| !meta.quiet(v) || meta.volume(v).is_ok_and(|a| a.frozen > 0);
        match &here {
            Cmd::Control(op) => {
                if let Some(v) = op.quiesce().filter(|&v| !meta.quiet(v)) {
                    return Err(PoolError::Busy(v.into()));
                }
            }
            Cmd::Own { .. } if busy(vol) => return Err(PoolError::Busy(vol.into())),
            _ => {}
        }
        let mut disk = self.disk.lock();
        run(&mut *disk, &mut meta, vol, here).map(|(r, _)| r)
    }

    /// Decouples volume `vol` from its parent (`bdev_lvol_decouple_parent`) or, with
    /// `inflate`, inflates it (`bdev_lvol_inflate`): [`ballast_volume::ops::decouple`], its
    /// copy-ups and its control operation run as requests on the cores like any other (its
    /// I/O goes on meanwhile), durable when this returns: the volume's id and the clusters
    /// copied. One decoupling per volume at a time (`Decoupling` for a second: a client that
    /// gave up waiting and asks again), at most `set_max_decouples` in all (`DecouplesBusy`).
    pub fn decouple(self: &Arc<Self>, vol: &str, inflate: bool) -> Result<(u32, u64), PoolError> {
        let (id, cb) = {
            let m = self.meta_shared();
            (m.find(vol)?, m.cluster_bytes())
        };
        {
            let mut running = self.decoupling.lock();
            let limit = self.max_decouples.load(Ordering::Relaxed);
            if running.contains(&id) {
                drop(running);
                return Err(self.named(PoolError::Decoupling(id.into())));
            }
            if running.len() as u64 >= limit {
                return Err(PoolError::DecouplesBusy { limit });
            }
            running.insert(id);
        }
        // Counted out however it ends.
        struct Running<'a>(&'a Mutex<std::collections::HashSet<u32>>, u32);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.lock().remove(&self.1);
            }
        }
        let _running = Running(&self.decoupling, id);
        let mut driver = ControlThread { pool: self, began: Instant::now() };
        let r = ballast_volume::ops::decouple(&mut driver, id, inflate, cb);
        self.refresh_attrs();
        r.map(|copied| (id, copied)).map_err(|e| self.named(e))
    }

    pub fn create_volume(self: &Arc<Self>, name: &str, size: u64) -> Result<u32, PoolError> {
        self.create_volume_as(name, size, false)
    }

    /// A new volume (durable when this returns); a thick one has all its clusters from now on
    /// (`NoSpace` if the pool lacks them), so its writes never find the pool full.
    pub fn create_volume_as(
        self: &Arc<Self>,
        name: &str,
        size: u64,
        thick: bool,
    ) -> Result<u32, PoolError> {
        self.control(ControlOp::Create { name: name.into(), size_bytes: size, thick })
    }

    /// A snapshot of volume `of` (durable when this returns). Refused while `of` is being
    /// decoupled (`Decoupling`, as SPDK refuses a snapshot of a blob being inflated): it
    /// would share again what the decoupling copied, and the decoupling would copy it again.
    /// (Only the admission is checked: one that began before the decoupling did is what the
    /// decoupling's further passes are for.)
    pub fn snapshot(self: &Arc<Self>, of: &str, name: &str) -> Result<u32, PoolError> {
        let of = self.meta().find(of)?;
        self.not_decoupling(of)?;
        self.control(ControlOp::Snapshot { of, name: name.into() })
    }

    pub fn clone_volume(self: &Arc<Self>, of: &str, name: &str) -> Result<u32, PoolError> {
        let of = self.meta().find(of)?;
        self.control(ControlOp::Clone { of, name: name.into() })
    }

    /// Rolls volume `vol` back to its snapshot `to` (durable when this returns). Refused
    /// while `vol` is being decoupled (`Decoupling`): it would share again what was copied.
    pub fn rollback(self: &Arc<Self>, vol: &str, to: &str) -> Result<(), PoolError> {
        let (id, to) = {
            let m = self.meta();
            (m.find(vol)?, m.find(to)?)
        };
        self.not_decoupling(id)?;
        self.control(ControlOp::Rollback { id, to }).map(drop)
    }

    pub fn resize(self: &Arc<Self>, vol: &str, size: u64, force: bool) -> Result<(), PoolError> {
        let id = self.meta().find(vol)?;
        self.control(ControlOp::Resize { id, size_bytes: size, force }).map(drop)
    }

    /// Makes volume `vol` read-only for good (durable when this returns): its devices refuse
    /// writes from now on, and it may be cloned as a snapshot is.
    pub fn set_read_only(self: &Arc<Self>, vol: &str) -> Result<(), PoolError> {
        let id = self.meta().find(vol)?;
        self.control(ControlOp::SetReadOnly { id }).map(drop)
    }

    /// Calls volume `vol` `name` from now on (durable when this returns), with configuration
    /// entries that go with the name: `before` journaled ahead of the rename, `after` behind
    /// it (`PoolMeta::rename`). Its devices serve on; only lookups by name change.
    pub fn rename(
        self: &Arc<Self>,
        vol: &str,
        name: &str,
        before: Vec<(String, String)>,
        after: Vec<(String, String)>,
    ) -> Result<(), PoolError> {
        let id = self.meta().find(vol)?;
        self.control(ControlOp::Rename { id, name: name.into(), before, after }).map(drop)
    }

    pub fn delete(self: &Arc<Self>, vol: &str) -> Result<(), PoolError> {
        let (id, family) = {
            let m = self.meta();
            let id = m.find(vol)?;
            (id, m.family_number(id))
        };
        self.control(ControlOp::Delete { id })?;
        // The family's last volume gone: its owner no longer counts against its core, and a
        // device of it still held somewhere (a connection not yet closed) can claim no core.
        // (Checked and removed under the pool state's borrow, which `device` takes before
        // `owners`; a new family that reused the number in between keeps the old owner, as
        // it would have without this.)
        if let Some(f) = family {
            let m = self.meta_shared();
            if !m.family_alive(f) {
                let retired = self.owners.lock().remove(&f).and_then(|o| o.retire());
                if let (Some(core), Some(claims)) = (retired, self.claims.get()) {
                    claims.release(core);
                }
            }
        }
        Ok(())
    }

    /// Grows the pool into its file or block device, grown from outside (`truncate`,
    /// `lvextend`; SPDK's `bdev_lvol_grow_lvstore`): the media's size is read again, the data
    /// area takes the new room with a checkpoint (durable when this returns), and the new
    /// clusters take writes. A medium no larger changes nothing; a smaller one is refused.
    /// An NVMe namespace keeps the size it was opened with. Returns the data area's bytes
    /// before and after.
    pub fn grow(self: &Arc<Self>) -> Result<(u64, u64), PoolError> {
        let before = self.meta_shared().data_bytes();
        let total_bytes = match &self.media {
            Media::File(d) => {
                let grew = d.rescan();
                grew.map_err(|e| {
                    PoolError::Io(std::io::Error::new(
                        e.kind(),
                        format!("{}: {e}", self.path.display()),
                    ))
                })?
                .1
            }
            Media::Nvme(_) => self.disk.lock().size_bytes(),
        };
        // The blocking disk (a stop's checkpoint once the cores are gone) learns it too.
        self.disk.lock().grown_to(total_bytes);
        self.control(ControlOp::Grow { total_bytes })?;
        let after = self.meta_shared().data_bytes();
        if after != before {
            tracing::info!(pool = %self.path.display(), before, after, "pool grown: data bytes");
        }
        Ok((before, after))
    }

    pub fn set_config(self: &Arc<Self>, key: &str, value: &str) -> Result<(), PoolError> {
        self.set_configs(&[(key.to_string(), value.to_string())])
    }

    /// Several configuration entries in one control operation and one commit
    /// ([`PoolMeta::set_configs`]: all admitted or none; a crash keeps a prefix of them).
    pub fn set_configs(self: &Arc<Self>, entries: &[(String, String)]) -> Result<(), PoolError> {
        self.control(ControlOp::SetConfigs(entries.to_vec())).map(drop)
    }

    /// A block device for volume `name` (read-only for snapshots, or when asked).
    pub fn device(self: &Arc<Self>, name: &str, read_only: bool) -> Result<VolumeDev, PoolError> {
        let m = self.meta();
        let id = m.find(name)?;
        let v = m.volume(id)?;
        let family = m.family_number(id).ok_or(PoolError::NoVolume(id))?;
        let owner = Arc::clone(self.owners.lock().entry(family).or_default());
        let read_only = read_only || v.read_only;
        let kind = if v.read_only { "snapshot" } else { "volume" };
        let live = Arc::new(LiveAttrs {
            size: AtomicU64::new(v.size_bytes),
            read_only: AtomicBool::new(v.read_only),
        });
        self.live_attrs.lock().push((id, Arc::downgrade(&live)));
        Ok(VolumeDev {
            owner,
            pool: Arc::clone(self),
            id,
            live,
            info: DevInfo {
                block_size: PIECE as u32,
                // Any alignment works (partial pieces are read-modify-written); 4 KiB is the
                // preferred size.
                min_block: 1,
                read_only,
                backend: format!("{kind}:{name} in pool {}", self.path.display()),
                cheap_extents: false,
                stats_id: crate::stats::device_id(),
            },
        })
    }
}

/// What a volume's device reports of it that a control operation may change.
struct LiveAttrs {
    size: AtomicU64,
    /// Made read-only (`bdev_lvol_set_read_only`): never false again.
    read_only: AtomicBool,
}

/// One volume of an open pool as a block device.
pub struct VolumeDev {
    pool: Arc<PoolHandle>,
    id: u32,
    /// The core owning the volume's family (its number is fixed for the volume's life).
    owner: Arc<Owner>,
    /// The volume's size and read-only flag as of the last control operation (asked per I/O:
    /// no lock).
    live: Arc<LiveAttrs>,
    info: DevInfo,
}

impl VolumeDev {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn pool(&self) -> &Arc<PoolHandle> {
        &self.pool
    }
}

impl BlockDev for VolumeDev {
    fn info(&self) -> &DevInfo {
        &self.info
    }

    fn size_bytes(&self) -> u64 {
        self.live.size.load(Ordering::Relaxed)
    }

    fn read_only(&self) -> bool {
        self.info.read_only || self.live.read_only.load(Ordering::Relaxed)
    }

    fn grow(&self, new_size: u64) -> std::io::Result<()> {
        let name = self.pool.meta_shared().volume(self.id).map(|v| v.name);
        let r = name.and_then(|n| self.pool.resize(&n, new_size, false));
        r.map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn submit(&self, cx: &mut Cx<'_>, cmd: IoCmd, tag: u32) {
        let cmd = match cmd {
            IoCmd::Read { offset, buf } => Cmd::Read { offset, buf: DevBuf(buf) },
            IoCmd::Write { offset, buf, fua } => Cmd::Write { offset, buf: DevBuf(buf), fua },
            IoCmd::Flush => Cmd::Flush,
            IoCmd::Discard { offset, len } => Cmd::Discard { offset, len },
            IoCmd::WriteZeroes { offset, len, may_unmap } => {
                Cmd::WriteZeroes { offset, len, unmap: may_unmap }
            }
        };
        if let Some(claims) = self.pool.owned_by_cores() {
            let owner = self.owner.claim(cx.core(), claims);
            if owner != cx.core() && self.pool.mailbox(owner).is_some() {
                with_queue(cx, &self.pool, |q, cx| q.forward(cx, owner, self.id, tag, cmd));
                return;
            }
        }
        let reply = Reply::Task(cx.task(), tag);
        submit_local(cx, &self.pool, self.id, reply, cmd);
    }

    /// Under the `owner` placement, the family's owner (placed on the core owning the fewest
    /// families if it has none yet): connections to the volume move there.
    fn home_core(&self, here: usize) -> Option<usize> {
        let claims = self.pool.owned_by_cores()?;
        Some(self.owner.place(here, claims))
    }

    /// The range's runs from the map in memory, the walk stopping after `max` of them.
    fn extents(&self, offset: u64, len: u64, max: usize) -> std::io::Result<Vec<Extent>> {
        let runs = self.pool.meta_shared().allocation(self.id, offset, len, max);
        let mut out = Vec::with_capacity(runs.len().min(max));
        for (_, len, written) in runs {
            push_extent(&mut out, Extent { len, hole: !written, zero: !written });
            if out.len() > max {
                out.truncate(max);
                break;
            }
        }
        Ok(out)
    }

    fn change_bases(&self) -> Vec<ChangeBase> {
        let kin = self.pool.meta_shared().kin(self.id);
        kin.into_iter().map(|(id, name)| ChangeBase { name, id: u64::from(id) }).collect()
    }

    /// From the maps in memory: the two trees are walked together, what they still share
    /// skipped ([`PoolMeta::changes`]). `base` is a volume id: one deleted meanwhile is gone
    /// for good (ids are not reused while the pool is open).
    fn changes(
        &self,
        base: u64,
        offset: u64,
        len: u64,
        max: usize,
    ) -> std::io::Result<Vec<(u64, bool)>> {
        let gone = || {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("volume {base} is no longer of this one's family"),
            )
        };
        let base = u32::try_from(base).map_err(|_| gone())?;
        let runs = self.pool.meta_shared().changes(self.id, base, offset, len, max);
        Ok(runs.map_err(|_| gone())?.into_iter().map(|(_, len, changed)| (len, changed)).collect())
    }

    /// Zeros that must stay allocated are written (in steps of `ZERO_STEP`): not fast.
    fn zeroes_are_fast(&self, may_unmap: bool) -> bool {
        may_unmap
    }

    /// A discard releases the whole 4 KiB pieces inside its range; partial ones keep their
    /// data (zeroing them would allocate, or copy a snapshot's, on a trim meant to free space).
    fn discard_zeroes(&self) -> bool {
        false
    }

    fn flush_blocking(&self) -> std::io::Result<()> {
        self.pool.commit_blocking().map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// A slots task's tags: the kind in the top two bits, an operation's key or a slot below.
mod tag {
    pub const KIND: u32 = 0xc000_0000;
    /// A device operation or an encoding: the key in `CoreQueue::ops`.
    pub const OP: u32 = 0;
    /// A control operation's drain deadline, and the cancel of that timer (slot below).
    pub const DEADLINE: u32 = 0x4000_0000;
    pub const DEADLINE_CANCEL: u32 = 0xc000_0000;
    /// A parked request's wake-up (slot below).
    pub const WAKE: u32 = 0x8000_0000;
    /// Keys and slots stay below this.
    pub const LIMIT: u32 = 0x4000_0000;
    /// The pool's mailbox on this core has mail (a wake-up beyond every slot's).
    pub const MAIL: u32 = WAKE | (LIMIT - 1);
}
/// Slots a core keeps per pool once its volume requests are all done (more exist only while
/// that many requests are in flight at once, which the connections' queue limits bound).
const SLOTS_KEPT: usize = 256;
/// A waiter's core, slots task and slot share its 64 bits: 16, 24 and 24 bits.
const WAITER_TASKS: u32 = 1 << 24;

/// An [`IoBuf`] as the volume core's buffer.
pub struct DevBuf(pub IoBuf);

impl Buf for DevBuf {
    fn as_slice(&self) -> &[u8] {
        self.0.as_slice()
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }
}

/// The core's buffer cache as the volume core's buffer source.
struct CoreBufs<'a, 'b>(&'a mut Cx<'b>);

impl Bufs for CoreBufs<'_, '_> {
    type B = DevBuf;
    fn get(&mut self, len: usize) -> DevBuf {
        DevBuf(self.0.buf(len))
    }
    fn put(&mut self, buf: DevBuf) {
        self.0.recycle(buf.0);
    }
}

/// A waiter's name for request slot `slot` of slots task `task` on `core`.
fn waiter(core: usize, task: u32, slot: u32) -> Waiter {
    assert!(core < 1 << 16 && task < WAITER_TASKS && slot < WAITER_TASKS, "waiter name space");
    Waiter(((core as u64) << 48) | (u64::from(task) << 24) | u64::from(slot))
}

/// Hands woken requests their wake-up: on this core through the ready queue, on another
/// through its wake channel. `cx` is the core delivering (none: the control thread).
fn deliver(pool: &PoolHandle, mut cx: Option<&mut Cx<'_>>, woken: &mut Vec<Waiter>) {
    for w in woken.drain(..) {
        let core = (w.0 >> 48) as usize;
        let task = ((w.0 >> 24) as u32) & (WAITER_TASKS - 1);
        let wake = tag::WAKE | (w.0 as u32 & (WAITER_TASKS - 1));
        match cx.as_deref_mut() {
            Some(cx) if core == cx.core() => cx.complete_to(task, wake, 0, Owned::None),
            Some(cx) => cx.peers()[core].wake_task(task, wake),
            None => {
                let cores = pool.cores.get().expect("requests parked on a pool no core serves");
                cores[core].wake_task(task, wake);
            }
        }
    }
}

/// What a core's mailbox for a pool carries ([`forward`]).
enum Mail {
    /// A command for a family this core owns, from task `task` of core `core`, with its tag.
    Request { core: usize, task: u32, tag: u32, vol: u32, cmd: Cmd<DevBuf> },
    /// The answer to a request this core forwarded, for its submitting task.
    Answer { task: u32, tag: u32, result: i32, buf: Option<DevBuf> },
}

/// Who gets a request's result.
enum Reply {
    /// The submitting task, with its tag.
    Task(u32, u32),
    /// A task of another core (core, task, tag), whose command was forwarded here: the answer
    /// goes back in that core's mailbox.
    Remote(usize, u32, u32),
    /// The control thread (a commit, checkpoint or control operation it asked for).
    Channel(Sender<Result<i32, PoolError>>),
    /// Nobody (a background commit).
    None,
}

/// What drives a request in one event.
enum Event {
    Start,
    Wake,
    Completion(u32, i32, Option<DevBuf>),
    Encoded(u32, Encoded),
    /// A control operation's drain outlasted its deadline.
    Expire,
}

/// What an operation a slots task submitted is for (keyed in `CoreQueue::ops`).
enum OpFor {
    /// A device operation of a slot's request, with the request's own tag.
    Disk { slot: u32, tag: u32 },
    /// A slot's checkpoint encoding, away on an offload thread.
    Encode { slot: u32 },
}

/// One request in a slot: the volume core's [`Request`] and what the adapter keeps beside it.
/// A free slot keeps its finished request, whose vectors the next one reuses.
struct Slot {
    live: bool,
    reply: Reply,
    req: Request<DevBuf>,
    /// A checkpoint's encoding away on an offload thread, and the tag the request gave it.
    encoding: Option<(u32, Away<Encoded>)>,
    /// A control operation's drain deadline is armed; its cancel was sent; engine operations
    /// (the timer, its cancel) not yet completed — the slot is freed only when none is left.
    deadline_armed: bool,
    deadline_cancelled: bool,
    timer_ops: u32,
    /// When the drain began: the deadline counts from there, however often it is re-armed.
    drain_started: Option<Instant>,
    /// An event of this turn's batch was for it (its `after_event` is due).
    touched: bool,
}

/// The slots task of a [`CoreQueue`]: whether it runs yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runner {
    Absent,
    Starting,
    Running(u32),
}

/// This core's requests to one pool, in reused slots, run by one task of this core (the
/// slots task, [`SlotsTask`]): a volume command costs no task of its own and no heap
/// allocation of the adapter's. Each request runs the volume core's [`Request`] state machine
/// — the same code the simulator drives — and its device operations go to this core's ring.
///
/// A turn's events for the slots (new requests, device completions, wake-ups) are queued as
/// they come and decided together when the turn's tasks are flushed, in one borrow of the
/// pool state (the slots task's `flush`); what the decisions ask for (device operations,
/// replies, wake-ups) is carried out after the borrow ends. The lock the cores share is taken
/// once per flush round with volume work (a few per loop iteration at most), not once or
/// twice per request.
///
/// Invariants: a slot is freed only when its request is done and none of its operations
/// (device I/O, encoding, deadline timer or its cancel) is in flight; `ops` holds exactly the
/// device operations and encodings in flight; a parked request's wake-up names its slot; the
/// batch names only live slots, and is empty whenever the slots task's flush has returned.
struct CoreQueue {
    pool: Arc<PoolHandle>,
    runner: Runner,
    /// Every slot this core has needed at once (they are reused in place, never moved), and
    /// the free ones.
    slots: Vec<Slot>,
    free: Vec<u32>,
    ops: Slab<OpFor>,
    /// Requests that arrived before the slots task started (the same turn).
    waiting: Vec<(u32, Reply, Cmd<DevBuf>)>,
    /// This turn's events, in arrival order, to decide at its end.
    batch: Vec<(u32, Event)>,
    /// What the batch's decisions asked for, to carry out once the borrow ended: device
    /// operations (by slot), finished requests' results, slots whose `after_event` is due.
    issued: Vec<(u32, Issue<DevBuf>)>,
    finished: Vec<(u32, i32, Option<DevBuf>, Option<PoolError>)>,
    touched: Vec<u32>,
    /// The batch's decisions asked for a background commit, or for the commit timer.
    background: bool,
    timer: bool,
    out: Vec<Issue<DevBuf>>,
    woken: Vec<Waiter>,
    /// Mail to post at the end of the flush round, by destination core: requests for families
    /// other cores own, and answers to requests they forwarded here.
    requests_out: Vec<Vec<Mail>>,
    answers_out: Vec<Vec<Mail>>,
    /// Requests this core forwarded whose answers have not come back.
    forwarded: usize,
    /// The slots task is registered with this core's mailbox.
    mail_open: bool,
    /// Mail taken from this core's mailbox, being handled.
    inbox: Vec<Mail>,
}

/// Every pool's [`CoreQueue`] on this core: a per-core value ([`Cx::take_local`]).
#[derive(Default)]
struct CoreVolumes(Vec<CoreQueue>);

/// Runs `f` on this core's queue for `pool` (made on first use).
fn with_queue<R>(
    cx: &mut Cx<'_>,
    pool: &Arc<PoolHandle>,
    f: impl FnOnce(&mut CoreQueue, &mut Cx<'_>) -> R,
) -> R {
    let mut all = cx.take_local::<CoreVolumes>().unwrap_or_default();
    let i = match all.0.iter().position(|q| Arc::ptr_eq(&q.pool, pool)) {
        Some(i) => i,
        None => {
            all.0.push(CoreQueue::new(Arc::clone(pool)));
            all.0.len() - 1
        }
    };
    let r = f(&mut all.0[i], cx);
    cx.put_local(all);
    r
}

/// Hands `cmd` for volume `vol` to this core's slots for `pool`.
fn submit_local(cx: &mut Cx<'_>, pool: &Arc<PoolHandle>, vol: u32, reply: Reply, cmd: Cmd<DevBuf>) {
    with_queue(cx, pool, |q, cx| q.submit(cx, vol, reply, cmd));
}

impl CoreQueue {
    fn new(pool: Arc<PoolHandle>) -> CoreQueue {
        CoreQueue {
            pool,
            runner: Runner::Absent,
            slots: Vec::new(),
            free: Vec::new(),
            ops: Slab::new(),
            waiting: Vec::new(),
            batch: Vec::new(),
            issued: Vec::new(),
            finished: Vec::new(),
            touched: Vec::new(),
            background: false,
            timer: false,
            out: Vec::new(),
            woken: Vec::new(),
            requests_out: Vec::new(),
            answers_out: Vec::new(),
            forwarded: 0,
            mail_open: false,
            inbox: Vec::new(),
        }
    }

    /// Makes sure the slots task runs or is starting; returns it if it runs.
    fn runner(&mut self, cx: &mut Cx<'_>) -> Option<u32> {
        match self.runner {
            Runner::Running(task) => Some(task),
            Runner::Starting => None,
            Runner::Absent => {
                self.runner = Runner::Starting;
                cx.spawn_local(Box::new(SlotsTask { pool: Arc::clone(&self.pool), done: false }));
                None
            }
        }
    }

    /// A command from a task of this core for volume `vol`, whose family core `owner` owns:
    /// queued for that core's mailbox, posted when this core's slots task flushes (once per
    /// destination and flush round); the answer comes back in this core's mailbox.
    fn forward(&mut self, cx: &mut Cx<'_>, owner: usize, vol: u32, tag: u32, cmd: Cmd<DevBuf>) {
        debug_assert_ne!(owner, cx.core(), "a family this core owns runs here");
        let (core, task) = (cx.core(), cx.task());
        mail_for(&mut self.requests_out, owner).push(Mail::Request { core, task, tag, vol, cmd });
        self.forwarded += 1;
        if let Some(task) = self.runner(cx) {
            cx.flush_later(task);
        }
    }

    /// Posts the outboxes: per destination a lock for its answers, one for its requests, and
    /// at most one wake-up. Requests a destination refuses (its slots task ended: shutdown)
    /// run here instead.
    fn post_mail(&mut self, cx: &mut Cx<'_>) {
        let cores = self.requests_out.len().max(self.answers_out.len());
        for dest in 0..cores {
            let mailbox = self.pool.mailbox(dest).expect("mail only once cores are attached");
            let mut wake = None;
            if let Some(answers) = self.answers_out.get_mut(dest) {
                if let Posted::Wake(task) = mailbox.post(answers, true) {
                    wake = Some(task);
                }
            }
            if let Some(requests) = self.requests_out.get_mut(dest) {
                let count = requests.len() as u64;
                match mailbox.post(requests, false) {
                    Posted::Wake(task) => {
                        cx.stats().volume_forwarded += count;
                        wake = Some(task);
                    }
                    Posted::Quiet => cx.stats().volume_forwarded += count,
                    Posted::Closed => {
                        let Runner::Running(me) = self.runner else { unreachable!("flushing") };
                        for m in std::mem::take(requests) {
                            let Mail::Request { task, tag, vol, cmd, .. } = m else {
                                unreachable!("only requests go out as requests")
                            };
                            self.forwarded -= 1;
                            self.start(cx.core(), me, vol, Reply::Task(task, tag), cmd);
                        }
                    }
                }
            }
            if let Some(task) = wake {
                cx.stats().volume_mail_wakes += 1;
                cx.peers()[dest].wake_task(task, tag::MAIL);
            }
        }
    }

    /// Registers the running slots task with this core's mailbox (once), taking what waits
    /// there: before this core's first request leaves for another, so its answer finds the
    /// mailbox open.
    fn open_mail(&mut self, cx: &mut Cx<'_>) {
        if self.mail_open {
            return;
        }
        let Runner::Running(me) = self.runner else { return };
        if let Some(mailbox) = self.pool.mailbox(cx.core()) {
            mailbox.open(me, &mut self.inbox);
            self.mail_open = true;
            self.handle_mail(cx);
        }
    }

    /// Handles the mail taken from this core's mailbox: forwarded requests start in slots
    /// here; answers go to the tasks that submitted them.
    fn handle_mail(&mut self, cx: &mut Cx<'_>) {
        let Runner::Running(me) = self.runner else { unreachable!("mail reaches a running task") };
        let mut inbox = std::mem::take(&mut self.inbox);
        for m in inbox.drain(..) {
            match m {
                Mail::Request { core, task, tag, vol, cmd } => {
                    self.start(cx.core(), me, vol, Reply::Remote(core, task, tag), cmd);
                }
                Mail::Answer { task, tag, result, buf } => {
                    assert!(self.forwarded > 0, "an answer to a request this core forwarded");
                    self.forwarded -= 1;
                    cx.complete_to(task, tag, result, buf.map_or(Owned::None, |b| Owned::Buf(b.0)));
                }
            }
        }
        self.inbox = inbox;
    }

    /// A command from any task of this core: it takes a slot now and starts with the turn's
    /// other events (the slots task is flushed at the turn's end), or once the slots task
    /// started.
    fn submit(&mut self, cx: &mut Cx<'_>, vol: u32, reply: Reply, cmd: Cmd<DevBuf>) {
        match self.runner(cx) {
            Some(task) => {
                self.start(cx.core(), task, vol, reply, cmd);
                cx.flush_later(task);
            }
            None => self.waiting.push((vol, reply, cmd)),
        }
    }

    /// Puts a request in a free slot (of slots task `task` on `core`) and queues its start.
    fn start(&mut self, core: usize, task: u32, vol: u32, reply: Reply, cmd: Cmd<DevBuf>) {
        debug_assert_eq!(self.runner, Runner::Running(task));
        let slot = match self.free.pop() {
            Some(slot) => {
                let s = &mut self.slots[slot as usize];
                assert!(!s.live && s.timer_ops == 0 && s.encoding.is_none(), "a free slot");
                s.req.reuse(vol, cmd, waiter(core, task, slot));
                s.live = true;
                s.reply = reply;
                s.deadline_armed = false;
                s.deadline_cancelled = false;
                s.drain_started = None;
                slot
            }
            None => {
                let slot = self.slots.len() as u32;
                // Below the waiter name space, hence below `tag::MAIL`'s slot bits too.
                assert!(slot < WAITER_TASKS, "request slots beyond the tag space");
                self.slots.push(Slot {
                    live: true,
                    reply,
                    req: Request::new(vol, cmd, waiter(core, task, slot)),
                    encoding: None,
                    deadline_armed: false,
                    deadline_cancelled: false,
                    timer_ops: 0,
                    drain_started: None,
                    touched: false,
                });
                slot
            }
        };
        self.batch.push((slot, Event::Start));
    }

    /// One completion for the slots task: a wake-up, a drain deadline (or its cancel), an
    /// encoding back from the offload thread, or a device operation. Request events join the
    /// turn's batch; timer bookkeeping is done here.
    fn on_event(&mut self, cx: &mut Cx<'_>, t: u32, result: i32, owned: Owned) {
        let slot = t & !tag::KIND;
        match t & tag::KIND {
            tag::WAKE if t == tag::MAIL => {
                let mailbox = self.pool.mailbox(cx.core()).expect("mail once cores are attached");
                mailbox.take(&mut self.inbox);
                self.handle_mail(cx);
            }
            tag::WAKE => self.batch.push((slot, Event::Wake)),
            tag::DEADLINE | tag::DEADLINE_CANCEL => {
                let s = &mut self.slots[slot as usize];
                s.timer_ops -= 1;
                if t & tag::KIND == tag::DEADLINE {
                    s.deadline_armed = false;
                    if result == -libc::ETIME && s.req.draining() {
                        self.batch.push((slot, Event::Expire));
                        return;
                    }
                }
                touch(&mut self.slots, &mut self.touched, slot);
            }
            tag::OP => match self.ops.remove(slot as usize) {
                OpFor::Disk { slot, tag } => {
                    let buf = owned.into_buf().map(DevBuf);
                    self.batch.push((slot, Event::Completion(tag, result, buf)));
                }
                OpFor::Encode { slot } => {
                    let (tag, away) = self.slots[slot as usize].encoding.take().expect("encoding");
                    // Encoding is pure; it panics only on a broken invariant (the blob outgrew
                    // its half), which was fatal on the core before it moved off it.
                    let encoded = away.take().expect("a checkpoint's encoding panicked");
                    self.batch.push((slot, Event::Encoded(tag, encoded)));
                }
            },
            _ => unreachable!("two bits of kind"),
        }
    }

    /// The turn's end: decides the batch in one borrow of the pool state, carries out what
    /// it asked for, and again for what that started (a background commit), until nothing is
    /// left.
    /// Posts the mail the round made (forwarded requests, answers) last, and decides again
    /// what a refused post started here.
    fn run_batch(&mut self, cx: &mut Cx<'_>) {
        self.open_mail(cx);
        loop {
            while !self.batch.is_empty() || !self.touched.is_empty() {
                if !self.batch.is_empty() {
                    self.decide(cx);
                }
                self.carry_out(cx);
            }
            self.post_mail(cx);
            if self.batch.is_empty() {
                break;
            }
        }
    }

    /// Runs every queued event through its request's state machine, under one borrow of the
    /// pool state; collects what they ask for.
    fn decide(&mut self, cx: &mut Cx<'_>) {
        let stats = cx.stats();
        stats.volume_rounds += 1;
        stats.volume_events += self.batch.len() as u64;
        let CoreQueue { pool, slots, batch, issued, finished, touched, out, woken, .. } = self;
        let mut meta = Round { lock: &pool.meta, read: None, write: None };
        let mut bufs = CoreBufs(cx);
        for (slot, ev) in batch.drain(..) {
            let s = &mut slots[slot as usize];
            assert!(s.live, "an event for a free slot");
            let mut ctx = Ctx { meta: &mut meta, bufs: &mut bufs, out };
            let req = &mut s.req;
            let outcome = match ev {
                Event::Start => req.start(&mut ctx),
                Event::Wake => req.on_wake(&mut ctx),
                Event::Completion(tag, result, buf) => {
                    req.on_completion(&mut ctx, tag, result, buf)
                }
                Event::Encoded(tag, encoded) => req.on_encoded(&mut ctx, tag, encoded),
                Event::Expire => req.expire(&mut ctx),
            };
            issued.extend(out.drain(..).map(|issue| (slot, issue)));
            if let Outcome::Done { result, buf } = outcome {
                if meta.shared().background_commit_due() {
                    self.background |= meta.exclusive().take_background_commit();
                } else if !self.background && meta.shared().commit_timer_due() {
                    self.timer |= meta.exclusive().take_commit_timer();
                }
                finished.push((slot, result, buf, req.take_failure()));
            }
            touch(slots, touched, slot);
            meta.relax(woken);
        }
        meta.shared().take_woken_shared(woken);
    }

    /// What the decisions asked for, the pool state no longer borrowed: device operations go
    /// to the ring (a checkpoint's encoding to an offload thread; a commit's records are
    /// encoded here, last), parked requests get their wake-ups,
    /// finished requests their replies; then each touched slot's `after_event`, and a
    /// background commit or the commit timer if one was asked for.
    fn carry_out(&mut self, cx: &mut Cx<'_>) {
        let CoreQueue { pool, slots, ops, issued, finished, woken, answers_out, batch, .. } = self;
        // A commit's records to encode on this core, once everything else is on its way.
        let mut here = Vec::new();
        for (slot, Issue { tag, op }) in issued.drain(..) {
            let cmd = match op {
                DiskOp::Read { offset, buf } => IoCmd::Read { offset, buf: buf.0 },
                DiskOp::Write { offset, buf, fua } => IoCmd::Write { offset, buf: buf.0, fua },
                DiskOp::Flush => IoCmd::Flush,
                DiskOp::Encode(job) if !job.off_core() => {
                    here.push((slot, tag, job));
                    continue;
                }
                DiskOp::Encode(job) => {
                    // A checkpoint's encoding is CPU work over a frozen copy: off the core,
                    // which goes on serving I/O (the pool state is not borrowed meanwhile).
                    let s = &mut slots[slot as usize];
                    assert!(s.encoding.is_none(), "one encoding at a time");
                    let key = op_key(ops, OpFor::Encode { slot });
                    s.encoding = Some((tag, cx.offload_with(key, move || job.run())));
                    continue;
                }
            };
            let key = op_key(ops, OpFor::Disk { slot, tag });
            pool.media.submit(cx, cmd, key);
        }
        deliver(pool, Some(&mut *cx), woken);
        for (slot, result, buf, failure) in finished.drain(..) {
            let s = &mut slots[slot as usize];
            match std::mem::replace(&mut s.reply, Reply::None) {
                Reply::Task(task, tag) => {
                    let owned = buf.map_or(Owned::None, |b| Owned::Buf(b.0));
                    cx.complete_to(task, tag, result, owned);
                }
                Reply::Remote(core, task, tag) => {
                    mail_for(answers_out, core).push(Mail::Answer { task, tag, result, buf });
                }
                other => {
                    if let Some(b) = buf {
                        cx.recycle(b.0);
                    }
                    if let Reply::Channel(tx) = other {
                        let r = match (result, failure) {
                            (0.., _) => Ok(result),
                            (_, Some(e)) => Err(e),
                            (errno, None) => Err(std::io::Error::from_raw_os_error(-errno).into()),
                        };
                        let _ = tx.send(r);
                    }
                }
            }
        }
        if !here.is_empty() {
            // A commit's records: encoded here, the pool state not borrowed (other cores decide
            // meanwhile), after the operations queued so far — the commit's data flush among
            // them — are with the kernel and the replies are out, so the device works while
            // this core encodes; decided again in this turn's next round.
            cx.submit_queued();
            for (slot, tag, job) in here {
                batch.push((slot, Event::Encoded(tag, job.run())));
            }
        }
        while let Some(slot) = self.touched.pop() {
            self.slots[slot as usize].touched = false;
            self.after_event(cx, slot);
        }
        if std::mem::take(&mut self.background) {
            // Enough records are pending: commit them without waiting for a client's flush
            // (bounded memory, bounded loss window for unflushed writes).
            let Runner::Running(task) = self.runner else { unreachable!("the slots task runs") };
            self.start(cx.core(), task, 0, Reply::None, Cmd::Flush);
        }
        if std::mem::take(&mut self.timer) {
            let after = *self.pool.commit_interval.lock();
            cx.spawn_local(Box::new(CommitTimer {
                pool: Arc::clone(&self.pool),
                after,
                done: false,
                stopping: false,
                cancel_inflight: false,
            }));
        }
    }

    /// After a slot's events: arms the drain deadline while a control operation waits for
    /// it, cancels it once the request is done; frees the slot once nothing of it is in
    /// flight.
    fn after_event(&mut self, cx: &mut Cx<'_>, slot: u32) {
        let s = &mut self.slots[slot as usize];
        assert!(s.live, "an event for a free slot");
        if s.req.draining() && !s.deadline_armed {
            let started = *s.drain_started.get_or_insert_with(Instant::now);
            s.deadline_armed = true;
            s.deadline_cancelled = false;
            s.timer_ops += 1;
            let timeout = *self.pool.quiesce_timeout.lock();
            cx.timer(tag::DEADLINE | slot, timeout.saturating_sub(started.elapsed()));
        } else if s.req.is_done() && s.deadline_armed && !s.deadline_cancelled {
            s.deadline_cancelled = true;
            s.timer_ops += 1;
            cx.cancel(tag::DEADLINE | slot, tag::DEADLINE_CANCEL | slot);
        }
        if s.req.is_done() && s.timer_ops == 0 {
            assert!(s.encoding.is_none(), "a done request's encoding in flight");
            s.live = false;
            self.free.push(slot);
            if self.free.len() == self.slots.len() && self.slots.len() > SLOTS_KEPT {
                // Idle after a burst: keep the memory of `SLOTS_KEPT` slots, not the burst's.
                self.slots.truncate(SLOTS_KEPT);
                self.free.clear();
                self.free.extend((0..SLOTS_KEPT as u32).rev());
            }
        }
    }
}

/// A core's borrow of the pool state for one round of decisions: shared (its shard of the read
/// lock, kept for the round) for the data path, whose decisions lock one family at a time;
/// exclusive (every shard) for a request step that needs it (a commit, a control operation,
/// parking on the commit), given back after that event. Nothing is locked across I/O.
struct Round<'a> {
    lock: &'a StateLock<PoolMeta>,
    read: Option<StateRead<'a, PoolMeta>>,
    write: Option<StateWrite<'a, PoolMeta>>,
}

impl Access for Round<'_> {
    fn shared(&mut self) -> &PoolMeta {
        if let Some(w) = &self.write {
            return w;
        }
        let lock = self.lock;
        self.read.get_or_insert_with(|| lock.read())
    }

    fn exclusive(&mut self) -> &mut PoolMeta {
        if self.write.is_none() {
            // The read lock goes first: two cores each waiting to upgrade would wait forever.
            self.read = None;
            self.write = Some(self.lock.write());
        }
        self.write.as_mut().expect("just taken")
    }
}

impl Round<'_> {
    /// Between events: an exclusive borrow ends (collecting whom its steps woke), so other
    /// cores decide again.
    fn relax(&mut self, woken: &mut Vec<Waiter>) {
        if let Some(mut w) = self.write.take() {
            w.take_woken(woken);
        }
    }
}

/// The control thread driving a decoupling (`PoolHandle::decouple`): its requests go to the
/// cores (`run_blocking`), and between copy-ups it waits as the pool's pace says.
struct ControlThread<'a> {
    pool: &'a Arc<PoolHandle>,
    /// When the last copy-up was sent.
    began: Instant,
}

impl ballast_volume::ops::Driver<DevBuf> for ControlThread<'_> {
    fn look(
        &mut self,
        id: u32,
        from: u64,
        in_place: bool,
    ) -> Result<ballast_volume::ops::Sharing, PoolError> {
        ballast_volume::ops::Sharing::of(&self.pool.meta_shared(), id, from, in_place)
    }

    fn room(&mut self, id: u32, inflate: bool) -> Result<(u64, u64), PoolError> {
        self.pool.meta_shared().decouple_room(id, inflate)
    }

    fn run(&mut self, vol: u32, cmd: Cmd<DevBuf>) -> Result<i32, PoolError> {
        self.began = Instant::now();
        self.pool.run_blocking(vol, cmd)
    }

    /// A settling step here, on the control thread, under a shared borrow of the pool state
    /// (the decision `Cmd::Settle` runs: a thick volume's clusters mapped, a retired tree
    /// released): the cores' decisions go on meanwhile, but for the family's it works for,
    /// which waits for the step; no core spends it, and no wake-up is owed (nothing parks on
    /// a settling: a write into a thick volume being mapped maps its clusters itself).
    fn settle_step(&mut self) -> Result<i32, PoolError> {
        let spent = self.pool.meta_shared().settle(ballast_volume::ops::SETTLE_STEP)?;
        Ok(i32::try_from(spent).expect("a step is bounded"))
    }

    /// Waits what the pace asks for the copy-up just done; a change of rate meanwhile ends
    /// the wait (the next copy-up is charged at the new rate). A pool that failed meanwhile
    /// ends the decoupling once the wait is over (at most a step's time at the rate).
    fn copied(&mut self, bytes: u64) -> Result<(), PoolError> {
        let pool = self.pool;
        pool.copied_bytes.fetch_add(bytes, Ordering::Relaxed);
        let mut pace = pool.pace.lock();
        let generation = pace.generation();
        let now = Instant::now();
        let until = now + pace.charge(self.began, now, bytes);
        while Instant::now() < until && pace.generation() == generation {
            pool.pace_changed.wait_until(&mut pace, until);
        }
        drop(pace);
        match pool.meta_shared().failed() {
            Some(why) => Err(PoolError::Failed(why.to_string())),
            None => Ok(()),
        }
    }
}

/// A copy of a request of the control thread's (flush, checkpoint, settling step, control
/// operation, copy-up: no buffers), for any buffer type.
fn pool_wide<A, B>(cmd: &Cmd<A>) -> Cmd<B> {
    match cmd {
        Cmd::Flush => Cmd::Flush,
        Cmd::Checkpoint => Cmd::Checkpoint,
        Cmd::Settle => Cmd::Settle,
        Cmd::Control(op) => Cmd::Control(op.clone()),
        &Cmd::Own { offset, len, in_place } => Cmd::Own { offset, len, in_place },
        _ => unreachable!("only pool-wide requests run from a blocking thread"),
    }
}

/// The outgoing mail for core `core` (made on first use).
fn mail_for(out: &mut Vec<Vec<Mail>>, core: usize) -> &mut Vec<Mail> {
    if out.len() <= core {
        out.resize_with(core + 1, Vec::new);
    }
    &mut out[core]
}

/// Marks `slot` (live) for its `after_event` once the batch is carried out, once per batch.
fn touch(slots: &mut [Slot], touched: &mut Vec<u32>, slot: u32) {
    let s = &mut slots[slot as usize];
    assert!(s.live, "an event for a free slot");
    if !s.touched {
        s.touched = true;
        touched.push(slot);
    }
}

/// Files an operation in flight; its key is the tag it goes out with.
fn op_key(ops: &mut Slab<OpFor>, op: OpFor) -> u32 {
    let key = ops.insert(op) as u32;
    assert!(key < tag::LIMIT, "operations in flight beyond the tag space");
    key
}

/// The task that runs a [`CoreQueue`]'s slots on its core: completions come to it, and it
/// hands them to the slot they are for. It lives while the core runs (finishing at shutdown
/// once its slots are empty).
struct SlotsTask {
    pool: Arc<PoolHandle>,
    done: bool,
}

impl Task for SlotsTask {
    fn start(&mut self, cx: &mut Cx<'_>) {
        with_queue(cx, &self.pool, |q, cx| {
            assert!(q.runner == Runner::Starting, "one slots task per pool and core");
            q.runner = Runner::Running(cx.task());
            for (vol, reply, cmd) in std::mem::take(&mut q.waiting) {
                q.start(cx.core(), cx.task(), vol, reply, cmd);
            }
            q.open_mail(cx);
        });
    }

    fn on_completion(&mut self, cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned) {
        with_queue(cx, &self.pool, |q, cx| q.on_event(cx, tag, result, owned));
    }

    /// The turn's end: its events are decided together ([`CoreQueue::run_batch`]); at
    /// shutdown, the task ends once its slots are empty.
    fn flush(&mut self, cx: &mut Cx<'_>) {
        let mut all = cx.take_local::<CoreVolumes>().unwrap_or_default();
        if let Some(i) = all.0.iter().position(|q| Arc::ptr_eq(&q.pool, &self.pool)) {
            let q = &mut all.0[i];
            q.run_batch(cx);
            debug_assert!(q.batch.is_empty() && q.touched.is_empty(), "the batch ran");
            debug_assert!(
                q.requests_out.iter().chain(&q.answers_out).all(Vec::is_empty),
                "the mail went out"
            );
            if cx.shutting_down()
                && q.free.len() == q.slots.len()
                && q.waiting.is_empty()
                && q.forwarded == 0
                && (!q.mail_open || q.pool.mailbox(cx.core()).is_none_or(Mailbox::close))
            {
                assert!(q.ops.is_empty(), "operations in flight with no request");
                all.0.swap_remove(i);
                self.done = true;
            }
        }
        cx.put_local(all);
    }

    fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}

    fn is_done(&self) -> bool {
        self.done
    }
}

/// Commits what is pending `after` the first pending record, when no flush did meanwhile:
/// one per pool at a time (armed through `PoolMeta::take_commit_timer`), so an idle pool
/// keeps no timer. At shutdown the timer is cancelled instead of waited for (however long
/// `--commit-interval` is): the daemon commits what is pending once the cores stopped.
struct CommitTimer {
    pool: Arc<PoolHandle>,
    after: Duration,
    /// The timer came back (fired or cancelled).
    done: bool,
    stopping: bool,
    cancel_inflight: bool,
}

impl CommitTimer {
    const TIMER: u32 = 0;
    const CANCEL: u32 = 1;
}

impl Task for CommitTimer {
    fn start(&mut self, cx: &mut Cx<'_>) {
        cx.timer(Self::TIMER, self.after);
    }

    fn on_completion(&mut self, cx: &mut Cx<'_>, tag: u32, _result: i32, _owned: Owned) {
        if tag == Self::CANCEL {
            self.cancel_inflight = false;
            return;
        }
        self.done = true;
        if self.pool.meta.write().commit_timer_fired() && !self.stopping {
            submit_local(cx, &self.pool, 0, Reply::None, Cmd::Flush);
        }
    }

    fn flush(&mut self, _cx: &mut Cx<'_>) {}

    fn on_shutdown(&mut self, cx: &mut Cx<'_>) {
        self.stopping = true;
        if !self.done && !self.cancel_inflight {
            self.cancel_inflight = true;
            cx.cancel(Self::TIMER, Self::CANCEL);
        }
    }

    fn is_done(&self) -> bool {
        self.done && !self.cancel_inflight
    }
}

/// Starts a pool's slots task on a core as the pool is attached to the cores, so requests
/// forwarded to the core find it running.
struct Starter {
    pool: Option<Arc<PoolHandle>>,
}

impl Task for Starter {
    fn start(&mut self, cx: &mut Cx<'_>) {
        let pool = self.pool.take().expect("started once");
        with_queue(cx, &pool, |q, cx| q.runner(cx).map(drop));
    }

    fn on_completion(&mut self, _cx: &mut Cx<'_>, _tag: u32, _result: i32, _owned: Owned) {}

    fn flush(&mut self, _cx: &mut Cx<'_>) {}

    fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}

    fn is_done(&self) -> bool {
        self.pool.is_none()
    }
}

/// Runs a request the control thread sent to this core ([`PoolHandle::run_blocking`]): it
/// hands the request to the core's slots as it starts, and is done.
struct Handoff {
    pool: Arc<PoolHandle>,
    request: Option<(Reply, u32, Cmd<DevBuf>)>,
}

impl Task for Handoff {
    fn start(&mut self, cx: &mut Cx<'_>) {
        let (reply, vol, cmd) = self.request.take().expect("handed off once");
        submit_local(cx, &self.pool, vol, reply, cmd);
    }

    fn on_completion(&mut self, _cx: &mut Cx<'_>, _tag: u32, _result: i32, _owned: Owned) {}

    fn flush(&mut self, _cx: &mut Cx<'_>) {}

    fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}

    fn is_done(&self) -> bool {
        self.request.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::{Engine, EngineConfig, Msg};
    use std::collections::HashMap;

    /// What the client saw: errors, slots and free slots once done, the core's volume rounds
    /// and events.
    type Report = (Vec<String>, usize, usize, (u64, u64));

    /// More than `SLOTS_KEPT`, so the slots grow past it and shrink back once idle.
    const WRITES: u64 = 320;
    /// Tags: writes `0..WRITES`, the flush, reads from `READ`.
    const FLUSH: u32 = 1000;
    const READ: u32 = 2000;

    /// A client task on the core: many requests to one volume at once through the adapter.
    struct Client {
        dev: Arc<VolumeDev>,
        expect: HashMap<u32, (u64, Vec<u8>)>,
        pending: u32,
        reading: bool,
        errors: Vec<String>,
        report: Option<Sender<Report>>,
        /// The only client of its core's queue (which is then idle once it is answered).
        alone: bool,
    }

    /// Write `i`: 4 KiB at cluster `i / 2` (two writes share each cluster, so the second waits
    /// while the first allocates it), except every eighth, which is 100 bytes unaligned (a
    /// read-modify-write holding its cluster).
    fn write_of(i: u64) -> (u64, Vec<u8>) {
        let cluster = (i / 2) * 65536;
        let offset = if i % 8 == 7 { cluster + 3 * 4096 + 10 } else { cluster + (i % 2) * 4096 };
        let len = if i % 8 == 7 { 100 } else { 4096 };
        (offset, vec![(i % 251) as u8 + 1; len])
    }

    impl Task for Client {
        fn start(&mut self, cx: &mut Cx<'_>) {
            for i in 0..WRITES {
                let (offset, data) = write_of(i);
                let mut buf = cx.buf_with_capacity(data.len());
                buf.extend_from_slice(&data);
                self.dev.submit(cx, IoCmd::Write { offset, buf, fua: false }, i as u32);
                self.expect.insert(READ + i as u32, (offset, data));
            }
            self.pending = WRITES as u32;
        }

        fn on_completion(&mut self, cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned) {
            if result < 0 {
                self.errors.push(format!("tag {tag}: errno {}", -result));
            }
            if tag >= READ {
                let (_, want) = &self.expect[&tag];
                let buf = owned.into_buf().expect("a read returns its buffer");
                if buf.as_slice() != &want[..] {
                    self.errors.push(format!("read {tag} does not return what was written"));
                }
                cx.recycle(buf);
            } else if let Some(buf) = owned.into_buf() {
                cx.recycle(buf);
            }
            self.pending -= 1;
            if self.pending > 0 {
                return;
            }
            if tag < FLUSH {
                self.dev.submit(cx, IoCmd::Flush, FLUSH);
                self.pending = 1;
            } else if !self.reading {
                self.reading = true;
                for (&tag, (offset, data)) in &self.expect {
                    let buf = cx.buf(data.len());
                    self.dev.submit(cx, IoCmd::Read { offset: *offset, buf }, tag);
                }
                self.pending = self.expect.len() as u32;
            } else {
                let all = cx.take_local::<CoreVolumes>().expect("the core's volume queues");
                let q = all.0.iter().find(|q| Arc::ptr_eq(&q.pool, &self.dev.pool)).expect("q");
                let slots = (q.slots.len(), q.free.len());
                assert!(
                    !self.alone || q.ops.is_empty(),
                    "no operation in flight once every request replied"
                );
                cx.put_local(all);
                let rounds = (cx.stats().volume_rounds, cx.stats().volume_events);
                let report = self.report.take().expect("reports once");
                let _ = report.send((std::mem::take(&mut self.errors), slots.0, slots.1, rounds));
            }
        }

        fn flush(&mut self, _cx: &mut Cx<'_>) {}
        fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}
        fn is_done(&self) -> bool {
            self.report.is_none()
        }
    }

    /// A pool is one process's: while it is open, neither an exclusive nor a shared lock is
    /// had on it (another daemon, `pool check`); once dropped, both are; a shared lock keeps
    /// the pool from being opened.
    #[test]
    fn an_open_pool_is_locked_against_every_other_opener() {
        let dir = std::env::temp_dir().join(format!("ballast-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pool.img");
        let _ = std::fs::remove_file(&path);
        PoolHandle::create(&path, Some(64 << 20), PoolGeometry::standard([7; 16])).unwrap();
        let pool = PoolHandle::open(&path).unwrap();
        for exclusive in [true, false] {
            let t0 = Instant::now();
            let err = PoolLock::take(&path, exclusive, Duration::from_millis(200)).unwrap_err();
            assert!(t0.elapsed() >= Duration::from_millis(200), "it waited");
            assert!(err.to_string().contains("in use by another process"), "{err}");
        }
        drop(pool);
        drop(PoolLock::take(&path, true, Duration::ZERO).expect("free once the pool is closed"));
        let reader = PoolLock::take(&path, false, Duration::ZERO).unwrap();
        assert!(PoolLock::take(&path, false, Duration::ZERO).is_ok(), "readers share");
        let create = PoolHandle::create(&path, None, PoolGeometry::standard([7; 16]));
        assert!(create.is_err(), "no formatting under a reader");
        drop(reader);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Both nodes of an NVMe namespace take the lock: a pool held through `ngXnY` is refused
    /// through `nvmeXnY` and the other way round; other names have no sibling. (Nodes made
    /// with mknod in a scratch directory, with /dev/null's and /dev/zero's numbers, which any
    /// kernel has; skipped where mknod is not allowed.)
    #[test]
    fn a_namespace_is_locked_through_both_of_its_nodes() {
        use nix::sys::stat::{makedev, mknod, Mode, SFlag};
        let dir = std::env::temp_dir().join(format!("ballast-nodes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ng, block) = (dir.join("ng3n1"), dir.join("nvme3n1"));
        let mode = Mode::from_bits_truncate(0o600);
        if mknod(&ng, SFlag::S_IFCHR, mode, makedev(1, 3)).is_err()
            || mknod(&block, SFlag::S_IFCHR, mode, makedev(1, 5)).is_err()
        {
            eprintln!("skipped: mknod is not allowed here");
            std::fs::remove_dir_all(&dir).unwrap();
            return;
        }
        assert_eq!(namespace_sibling(&ng), Some(block.clone()));
        assert_eq!(namespace_sibling(&block), Some(ng.clone()));
        for name in ["nvme3", "nvme3n1p1", "nvme3c0n1", "ng3", "pool.img"] {
            assert_eq!(namespace_sibling(&dir.join(name)), None, "{name}");
        }
        let held = PoolLock::take(&ng, true, Duration::ZERO).unwrap();
        for (node, exclusive) in [(&block, true), (&block, false), (&ng, false)] {
            let err = PoolLock::take(node, exclusive, Duration::ZERO).unwrap_err();
            assert!(err.to_string().contains("in use by another process"), "{err}");
        }
        drop(held);
        let reader = PoolLock::take(&block, false, Duration::ZERO).unwrap();
        assert!(PoolLock::take(&ng, false, Duration::ZERO).is_ok(), "readers share");
        assert!(PoolLock::take(&ng, true, Duration::ZERO).is_err(), "a reader of the other node");
        drop(reader);
        assert!(PoolLock::take(&ng, true, Duration::ZERO).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A fresh 256 MiB pool file in its own directory, opened and served by one core, with a
    /// 64 MiB volume "v" (created as a request on that core).
    fn pool_on_a_core(name: &str) -> (std::path::PathBuf, Arc<PoolHandle>, Engine) {
        pool_on_cores(name, 1, Placement::default())
    }

    /// [`pool_on_a_core`] with `cores` cores (on the first and last allowed CPUs when two)
    /// and the given placement.
    fn pool_on_cores(
        name: &str,
        cores: usize,
        placement: Placement,
    ) -> (std::path::PathBuf, Arc<PoolHandle>, Engine) {
        let dir = std::env::temp_dir().join(format!("ballast-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pool.img");
        let _ = std::fs::remove_file(&path);
        PoolHandle::create(&path, Some(256 << 20), PoolGeometry::standard([7; 16])).unwrap();
        let pool = PoolHandle::open(&path).unwrap();
        let allowed = ballast_ffi::sys::allowed_cpus();
        let cpus = (0..cores).map(|i| allowed[(i * (allowed.len() - 1)).min(allowed.len() - 1)]);
        let engine = Engine::start(EngineConfig {
            cpus: cpus.collect(),
            ring_entries: 256,
            buffer_budget: 64 << 20,
            offload_threads: 1,
            offload_queue: 4,
            ..EngineConfig::one_core_for_tests()
        })
        .expect("an engine");
        pool.set_placement(placement);
        pool.attach_cores(engine.handles());
        pool.create_volume("v", 64 << 20).expect("create runs as a request on core 0");
        (dir, pool, engine)
    }

    /// The daemon's adapter end to end on a real pool file and a real core: concurrent writes
    /// (some parked behind a cluster's allocation, some read-modify-writes), a flush, reads
    /// that return the data; each flush round's events were decided in one borrow of the pool
    /// state;
    /// the requests ran in reused slots, which shrink back to
    /// `SLOTS_KEPT` once idle after the burst, and a control operation ran on the core.
    #[test]
    fn requests_run_in_reused_slots_on_the_core() {
        let (dir, pool, engine) = pool_on_a_core("slots");
        let dev = Arc::new(pool.device("v", false).unwrap());
        assert_eq!(dev.size_bytes(), 64 << 20);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let client = Client {
            dev: Arc::clone(&dev),
            expect: HashMap::new(),
            pending: 0,
            reading: false,
            errors: Vec::new(),
            report: Some(tx),
            alone: true,
        };
        let spawn = Msg::Spawn(Box::new(move |_cx: &mut Cx<'_>| Box::new(client) as Box<dyn Task>));
        assert!(engine.handles()[0].send_blocking(spawn));
        let (errors, slots, free, (rounds, events)) =
            rx.recv_timeout(Duration::from_secs(20)).expect("a report");
        assert_eq!(errors, Vec::<String>::new());
        // Every write and read starts and completes at least once. A turn's events share one
        // borrow of the pool state: at least the writes the client submitted in one event
        // did, and so did the reads (however the device's completions trickle in; measured
        // on ext4: ~1,450 events in ~26 borrows).
        assert!(events >= 4 * WRITES, "{events} events");
        assert!(
            rounds + 2 * (WRITES - 1) <= events,
            "{rounds} borrows of the pool state for {events} events"
        );
        assert_eq!(slots, SLOTS_KEPT, "{slots} slots kept after {WRITES} at once, then idle");
        assert_eq!(free, slots, "every slot free again");
        pool.resize("v", 128 << 20, false).expect("resize");
        assert_eq!(dev.size_bytes(), 128 << 20, "the device reports the new size");
        engine.shutdown();
        drop(dev);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Spawns a [`Client`] on each (core, volume) at once and waits for their reports.
    fn clients(engine: &Engine, pool: &Arc<PoolHandle>, on: &[(usize, &str)]) {
        let mut reports = Vec::new();
        for &(core, vol) in on {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let client = Client {
                dev: Arc::new(pool.device(vol, false).unwrap()),
                expect: HashMap::new(),
                pending: 0,
                reading: false,
                errors: Vec::new(),
                report: Some(tx),
                alone: false,
            };
            let spawn =
                Msg::Spawn(Box::new(move |_cx: &mut Cx<'_>| Box::new(client) as Box<dyn Task>));
            assert!(engine.handles()[core].send_blocking(spawn));
            reports.push(rx);
        }
        for rx in reports {
            let (errors, ..) = rx.recv_timeout(Duration::from_secs(20)).expect("a report");
            assert_eq!(errors, Vec::<String>::new());
        }
    }

    /// Every core's (forwarded, mail wake-ups, events) so far.
    fn forwarding_stats(engine: &Engine) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        for h in engine.handles().iter() {
            let (tx, rx) = crossbeam_channel::bounded(1);
            assert!(h.send_blocking(Msg::Stats(tx)));
            let s = rx.recv_timeout(Duration::from_secs(5)).expect("stats");
            out.push((s.volume_forwarded, s.volume_mail_wakes, s.volume_events));
        }
        out
    }

    /// Two cores, two families: volume "v" first written from core 0 and "w" from core 1,
    /// which makes them their families' owners (first touch) — nothing crosses. Then each
    /// volume is driven from the other core: under the `owner` placement every request crosses,
    /// runs on its family's core and its answer (result, read data) comes back; a client's
    /// burst leaves in one batch per flush round, not one wake-up per request. Under `any`
    /// nothing crosses. Every read returns what was written, and the engine shuts down with
    /// nothing left in flight.
    #[test]
    fn requests_run_on_the_core_owning_their_family() {
        for placement in [Placement::Owner, Placement::Any] {
            let name = format!("owner-{placement:?}");
            let (dir, pool, engine) = pool_on_cores(&name, 2, placement);
            // No background commit (which could run on either core) during the checks below.
            pool.set_commit_policy(1 << 20, Duration::from_secs(600));
            pool.create_volume("w", 64 << 20).unwrap();
            clients(&engine, &pool, &[(0, "v"), (1, "w")]);
            let first = forwarding_stats(&engine);
            assert!(first.iter().all(|&(f, w, _)| f == 0 && w == 0), "{first:?}");
            clients(&engine, &pool, &[(1, "v"), (0, "w")]);
            let then = forwarding_stats(&engine);
            // Each client: WRITES writes, a flush, WRITES reads.
            let sent = 2 * WRITES + 1;
            for (core, (&(f0, w0, e0), &(f, w, e))) in first.iter().zip(&then).enumerate() {
                let (forwarded, wakes, events) = (f - f0, w - w0, e - e0);
                match placement {
                    Placement::Owner => {
                        assert_eq!(forwarded, sent, "core {core} forwarded all");
                        // Requests and answers are 2 * sent messages: batches need fewer.
                        assert!(
                            wakes > 0 && wakes < sent,
                            "core {core}: {wakes} wake-ups for {sent} requests and their answers"
                        );
                    }
                    Placement::Any => assert_eq!((forwarded, wakes), (0, 0)),
                }
                // Either way each core started its share: the owner the other core's requests
                // (owner), or its own client's (any).
                assert!(events >= sent, "core {core}: {events} events");
            }
            // A snapshot of w (owned by core 1) runs on its owner under `owner`, on core 0
            // under `any`: only that core decides anything meanwhile (the clients are done).
            pool.snapshot("w", "w-snap").unwrap();
            let after = forwarding_stats(&engine);
            let ran: Vec<bool> = then.iter().zip(&after).map(|(a, b)| b.2 > a.2).collect();
            let expect = match placement {
                Placement::Owner => [false, true],
                Placement::Any => [true, false],
            };
            assert_eq!(ran, expect, "the cores that decided the snapshot");
            // Deleting the family's volumes: its core owns one family fewer once the last goes.
            let owned = |loads: [usize; 2]| match placement {
                Placement::Owner => loads.to_vec(),
                Placement::Any => vec![0, 0],
            };
            assert_eq!(pool.families_per_core(), owned([1, 1]));
            pool.delete("w-snap").unwrap();
            assert_eq!(pool.families_per_core(), owned([1, 1]), "w still lives");
            pool.delete("w").unwrap();
            assert_eq!(pool.families_per_core(), owned([1, 0]));
            // A commit timer pending (10 minutes) is cancelled, not waited for.
            let stopping = Instant::now();
            engine.shutdown();
            let took = stopping.elapsed();
            assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
            assert_eq!(pool.meta().check(), Vec::<String>::new(), "the pool is consistent");
            assert_eq!(pool.meta().leaked(), 0);
            drop(pool);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    /// A control operation that changes sharing (a snapshot) waits for the volume's writes in
    /// flight to drain, and gives up at the pool's quiesce timeout with `Busy`, nothing
    /// changed; once the writes are gone it succeeds. A read-modify-write's hold stands in for
    /// a write that never finishes (it counts as a write in flight, as a hung device write
    /// would).
    #[test]
    fn a_drain_that_outlasts_the_quiesce_timeout_gives_up_and_changes_nothing() {
        let (dir, pool, engine) = pool_on_a_core("quiesce");
        pool.set_quiesce_timeout(Duration::from_millis(300));
        let id = pool.meta().find("v").unwrap();
        let mut edges = Vec::new();
        let (token, ticket) = pool
            .meta()
            .hold_io(id, &[0], &[], Waiter(u64::MAX), &mut edges)
            .expect("nothing else holds it");
        let started = Instant::now();
        let r = pool.snapshot("v", "s");
        let waited = started.elapsed();
        assert!(matches!(&r, Err(PoolError::Busy(v)) if *v == id), "{r:?}");
        assert!(waited >= Duration::from_millis(300), "gave up after {waited:?}, before its time");
        assert!(waited < Duration::from_secs(10), "gave up after {waited:?}");
        assert!(pool.meta().find("s").is_err(), "a snapshot that gave up left nothing");
        assert_eq!(pool.list().len(), 1);
        assert_eq!(pool.meta().volume(id).unwrap().frozen, 0, "the freeze ended with it");
        pool.meta().release(id, &[0], token);
        pool.meta().end_io(ticket);
        pool.snapshot("v", "s").expect("nothing in flight: the snapshot is taken");
        assert!(pool.meta().find("s").is_ok());
        engine.shutdown();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
