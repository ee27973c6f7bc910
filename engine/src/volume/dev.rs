//! A pool opened by the daemon and its volumes as block devices: the adapter between the
//! volume core (`ballast-volume`, free of I/O) and the reactor.
//!
//! [`PoolHandle`] owns the pool's media twice: for the data path as a [`FileDev`] (a file or
//! block device, O_DIRECT, asynchronous through the calling core's io_uring) or an
//! [`NvmeDev`] (an NVMe namespace's `/dev/ngXnY`, passthrough commands on the calling core's
//! device ring), and as a [`PoolDisk`] (blocking: file I/O, or passthrough ioctls) for
//! opening and formatting it, and for the requests that arrive once the cores are gone. The
//! [`PoolMeta`] between them sits behind one mutex held only for in-memory decisions, never
//! across I/O on the data path.
//!
//! A [`VolumeDev`] is a [`BlockDev`]: each command becomes a [`VolumeIo`] task on the
//! submitting core that runs the core's [`Request`] state machine — the same code the
//! simulator drives — and carries out the device operations it asks for on the ring. A
//! request the pool parks (busy cluster, frozen volume, commit in flight) waits for a wake-up:
//! whoever changes the pool state under the lock hands the woken requests theirs (a core
//! through its ready queue or another core's wake channel, the control thread through the
//! cores' wake channels). Nothing polls.
//!
//! Control operations are messages to a core: the control thread sends a `Control` request
//! (`ballast_volume::ops`) — freeze, park until the volume's writes drained, apply, thaw,
//! commit, the same request the simulator runs — to core 0 and waits for its reply; commits and
//! checkpoints it asks for are `Flush`/`Checkpoint` requests sent the same way. The lock is
//! never held across I/O, and nothing sleeps on a condition or polls.
//!
//! Invariants:
//! - every borrow of the pool state ends by delivering the wake-ups it produced;
//! - control operations that change sharing or size (snapshot, rollback, resize, delete)
//!   freeze the volume and wait until its writes drained before they change anything; a drain
//!   that outlasts `QUIESCE_TIMEOUT` is given up (`Busy`), nothing changed.

use std::fs::{File, OpenOptions};
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ballast_ffi::{IoBuf, Owned};
use ballast_volume::locks::Waiter;
use ballast_volume::meta::Encoded;
use ballast_volume::request::{Buf, Bufs, Cmd, Ctx, DiskOp, Issue, Outcome, Request};
use crossbeam_channel::Sender;
use parking_lot::{Mutex, MutexGuard};

use super::format::BLOCK_SIZE;
use super::meta::{PoolMeta, PIECE};
use super::ops::ControlOp;
use super::pool::{run, Pool, PoolError, PoolGeometry, SyncDisk};
use crate::blockdev::{push_extent, BlockDev, DevInfo, Extent, IoCmd};
use crate::file::FileDev;
use crate::nvme::{NvmeDev, NvmeDisk};
use crate::offload::Away;
use crate::reactor::{CoreHandle, Cx, Msg, Task};

/// The longest a pending record waits for a commit when no client flushes, by default.
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a control operation waits for a volume's writes to drain.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

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
    meta: Mutex<PoolMeta>,
    disk: Mutex<PoolDisk>,
    media: Media,
    path: PathBuf,
    /// The cores running the pool's requests, to wake requests the control thread unblocks.
    cores: OnceLock<Arc<Vec<CoreHandle>>>,
    /// The longest a pending record waits for a commit when no client flushes.
    commit_interval: Mutex<Duration>,
    /// How long opening (recovery) took, in ms.
    open_ms: u64,
}

/// The pool state borrowed off the data path (control thread, listings): when it ends, the
/// requests it woke get their wake-ups through their cores' wake channels.
pub struct MetaGuard<'a> {
    meta: MutexGuard<'a, PoolMeta>,
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
}

impl PoolHandle {
    /// Creates a pool on `path` (a file is created sparse with `size` bytes when missing; a
    /// block device or NVMe namespace takes its whole size).
    pub fn create(path: &Path, size: Option<u64>, g: PoolGeometry) -> Result<(), PoolError> {
        if let (Some(size), false) = (size, path.exists()) {
            let f = OpenOptions::new().write(true).create_new(true).open(path)?;
            f.set_len(size)?;
        }
        let disk = PoolDisk::open(path, true)?;
        let mut pool = Pool::format(disk, g)?;
        pool.checkpoint()?;
        Ok(())
    }

    /// Opens the pool on `path`: superblock, checkpoint and journal replay.
    pub fn open(path: &Path) -> Result<Arc<PoolHandle>, PoolError> {
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
        Ok(Arc::new(PoolHandle {
            meta: Mutex::new(meta),
            disk: Mutex::new(disk),
            media,
            path: path.to_path_buf(),
            cores: OnceLock::new(),
            commit_interval: Mutex::new(DEFAULT_COMMIT_INTERVAL),
            open_ms: started.elapsed().as_millis() as u64,
        }))
    }

    /// Background commits: after `records` pending records, or `interval` after the first
    /// pending record, whichever comes first, a commit starts without a client's flush.
    pub fn set_commit_policy(&self, records: usize, interval: Duration) {
        self.meta.lock().set_commit_records(records);
        *self.commit_interval.lock() = interval;
    }

    /// Names the cores that will run this pool's requests (before any does).
    pub fn attach_cores(&self, cores: Arc<Vec<CoreHandle>>) {
        let _ = self.cores.set(cores);
    }

    /// The pool state, off the data path.
    pub fn meta(&self) -> MetaGuard<'_> {
        MetaGuard { meta: self.meta.lock(), pool: self }
    }

    pub fn info(&self) -> PoolInfo {
        let m = self.meta();
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
        }
    }

    pub fn list(&self) -> Vec<VolumeInfo> {
        let m = self.meta();
        m.volumes()
            .iter()
            .map(|(&id, v)| VolumeInfo {
                id,
                name: v.name.clone(),
                size_bytes: v.size_bytes,
                allocated_bytes: m.allocated_bytes(id),
                read_only: v.read_only,
                snapshot: v.read_only,
                parent: m.volumes().get(&v.parent).map(|p| p.name.clone()),
            })
            .collect()
    }

    /// Makes every completed write durable, from a blocking thread.
    pub fn commit_blocking(self: &Arc<Self>) -> Result<(), PoolError> {
        self.run_blocking(Cmd::Flush).map(drop)
    }

    /// Writes a checkpoint now (clean shutdown; the next start replays nothing).
    pub fn checkpoint_blocking(self: &Arc<Self>) -> Result<(), PoolError> {
        self.run_blocking(Cmd::Checkpoint).map(drop)
    }

    /// Runs a control operation (durable when this returns): the new volume's id for a
    /// create, snapshot or clone, else 0.
    pub fn control(self: &Arc<Self>, op: ControlOp) -> Result<u32, PoolError> {
        self.run_blocking(Cmd::Control(op)).map(|id| id as u32)
    }

    /// Runs a pool-wide request (flush, checkpoint, control operation) from a blocking thread:
    /// as a message to core 0, where it runs like any request (its I/O on the ring, the lock
    /// never held across it, parked while it waits); once the cores are gone, here on the
    /// blocking disk, the same request run to completion.
    fn run_blocking(self: &Arc<Self>, cmd: Cmd<DevBuf>) -> Result<i32, PoolError> {
        if let Some(why) = self.meta().failed() {
            return Err(PoolError::Failed(why.to_string()));
        }
        // The same command for the blocking disk, should the cores be gone.
        let here: Cmd<Vec<u8>> = match &cmd {
            Cmd::Flush => Cmd::Flush,
            Cmd::Checkpoint => Cmd::Checkpoint,
            Cmd::Control(op) => Cmd::Control(op.clone()),
            _ => unreachable!("only pool-wide requests run from a blocking thread"),
        };
        if let Some(cores) = self.cores.get() {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let io = VolumeIo::new(Arc::clone(self), 0, Reply::Channel(tx), cmd);
            let spawn = move |_cx: &mut Cx<'_>| Box::new(io) as Box<dyn Task>;
            if cores[0].send_blocking(Msg::Spawn(Box::new(spawn))) {
                // A drain may take up to QUIESCE_TIMEOUT, then the commit.
                return match rx.recv_timeout(2 * QUIESCE_TIMEOUT) {
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
        // Nothing would wake a drain now: a volume with a write left in flight stays busy.
        if let Cmd::Control(op) = &here {
            if let Some(v) = op.quiesce().filter(|&v| !meta.quiet(v)) {
                return Err(PoolError::Busy(v));
            }
        }
        let mut disk = self.disk.lock();
        run(&mut *disk, &mut meta, 0, here).map(|(r, _)| r)
    }

    pub fn create_volume(self: &Arc<Self>, name: &str, size: u64) -> Result<u32, PoolError> {
        self.control(ControlOp::Create { name: name.into(), size_bytes: size })
    }

    pub fn snapshot(self: &Arc<Self>, of: &str, name: &str) -> Result<u32, PoolError> {
        let of = self.meta().find(of)?;
        self.control(ControlOp::Snapshot { of, name: name.into() })
    }

    pub fn clone_volume(self: &Arc<Self>, of: &str, name: &str) -> Result<u32, PoolError> {
        let of = self.meta().find(of)?;
        self.control(ControlOp::Clone { of, name: name.into() })
    }

    pub fn rollback(self: &Arc<Self>, vol: &str, to: &str) -> Result<(), PoolError> {
        let (id, to) = {
            let m = self.meta();
            (m.find(vol)?, m.find(to)?)
        };
        self.control(ControlOp::Rollback { id, to }).map(drop)
    }

    pub fn resize(self: &Arc<Self>, vol: &str, size: u64, force: bool) -> Result<(), PoolError> {
        let id = self.meta().find(vol)?;
        self.control(ControlOp::Resize { id, size_bytes: size, force }).map(drop)
    }

    pub fn delete(self: &Arc<Self>, vol: &str) -> Result<(), PoolError> {
        let id = self.meta().find(vol)?;
        self.control(ControlOp::Delete { id }).map(drop)
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
        let read_only = read_only || v.read_only;
        let kind = if v.read_only { "snapshot" } else { "volume" };
        Ok(VolumeDev {
            pool: Arc::clone(self),
            id,
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

/// One volume of an open pool as a block device.
pub struct VolumeDev {
    pool: Arc<PoolHandle>,
    id: u32,
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
        self.pool.meta().volume(self.id).map_or(0, |v| v.size_bytes)
    }

    fn grow(&self, new_size: u64) -> std::io::Result<()> {
        let name = self.pool.meta().volume(self.id).map(|v| v.name.clone());
        let r = name.and_then(|n| self.pool.resize(&n, new_size, false));
        r.map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn submit(&self, cx: &mut Cx<'_>, cmd: IoCmd, tag: u32) {
        let cmd = match cmd {
            IoCmd::Read { offset, buf } => Cmd::Read { offset, buf: DevBuf(buf) },
            IoCmd::Write { offset, buf, fua } => Cmd::Write { offset, buf: DevBuf(buf), fua },
            IoCmd::Flush => Cmd::Flush,
            IoCmd::Discard { offset, len } => Cmd::Discard { offset, len },
            IoCmd::WriteZeroes { offset, len, .. } => Cmd::WriteZeroes { offset, len },
        };
        let reply = Reply::Task(cx.task(), tag);
        cx.spawn_local(Box::new(VolumeIo::new(Arc::clone(&self.pool), self.id, reply, cmd)));
    }

    fn extents(&self, offset: u64, len: u64) -> std::io::Result<Vec<Extent>> {
        let runs = self.pool.meta().allocation(self.id, offset, len);
        let mut out = Vec::with_capacity(runs.len());
        for (_, len, written) in runs {
            push_extent(&mut out, Extent { len, hole: !written, zero: !written });
        }
        Ok(out)
    }

    fn flush_blocking(&self) -> std::io::Result<()> {
        self.pool.commit_blocking().map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// The tag of a parked request's wake-up.
const TAG_WAKE: u32 = u32::MAX;
/// The tag of a checkpoint's encoding, done on an offload thread.
const TAG_ENCODE: u32 = u32::MAX - 1;
/// The deadline of a control operation's drain, and the cancel of that timer.
const TAG_DEADLINE: u32 = u32::MAX - 2;
const TAG_DEADLINE_CANCEL: u32 = u32::MAX - 3;

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

/// A waiter's name for a task on a core.
fn waiter(core: usize, task: u32) -> Waiter {
    Waiter(((core as u64) << 32) | u64::from(task))
}

/// Hands woken requests their wake-up: on this core through the ready queue, on another
/// through its wake channel. `cx` is the core delivering (none: the control thread).
fn deliver(pool: &PoolHandle, mut cx: Option<&mut Cx<'_>>, woken: &mut Vec<Waiter>) {
    for w in woken.drain(..) {
        let (core, task) = ((w.0 >> 32) as usize, w.0 as u32);
        match cx.as_deref_mut() {
            Some(cx) if core == cx.core() => cx.complete_to(task, TAG_WAKE, 0, Owned::None),
            Some(cx) => cx.peers()[core].wake_task(task, TAG_WAKE),
            None => {
                let cores = pool.cores.get().expect("requests parked on a pool no core serves");
                cores[core].wake_task(task, TAG_WAKE);
            }
        }
    }
}

/// One request to a volume, run as a task on the submitting core: a thin adapter that feeds
/// the volume core's [`Request`] its events under the pool lock and carries out the device
/// operations it asks for on this core's ring.
struct VolumeIo {
    pool: Arc<PoolHandle>,
    vol: u32,
    reply: Reply,
    cmd: Option<Cmd<DevBuf>>,
    req: Option<Request<DevBuf>>,
    out: Vec<Issue<DevBuf>>,
    woken: Vec<Waiter>,
    /// A checkpoint's encoding away on an offload thread, and the tag the request gave it.
    encoding: Option<(u32, Away<Encoded>)>,
    /// A control operation's drain deadline is armed; its cancel was sent; engine operations
    /// (the timer, its cancel) not yet completed — the task ends only when none is left.
    deadline_armed: bool,
    deadline_cancelled: bool,
    timer_ops: u32,
    /// When the drain began: the deadline counts from there, however often it is re-armed.
    drain_started: Option<Instant>,
}

/// Who gets a request's result.
enum Reply {
    /// The submitting task, with its tag.
    Task(u32, u32),
    /// The control thread (a commit, checkpoint or control operation it asked for).
    Channel(Sender<Result<i32, PoolError>>),
    /// Nobody (a background commit).
    None,
}

/// What drives the request in one event.
enum Event {
    Start,
    Wake,
    Completion(u32, i32, Option<DevBuf>),
    Encoded(u32, Encoded),
    /// A control operation's drain outlasted its deadline.
    Expire,
}

impl VolumeIo {
    fn new(pool: Arc<PoolHandle>, vol: u32, reply: Reply, cmd: Cmd<DevBuf>) -> VolumeIo {
        VolumeIo {
            pool,
            vol,
            reply,
            cmd: Some(cmd),
            req: None,
            out: Vec::new(),
            woken: Vec::new(),
            encoding: None,
            deadline_armed: false,
            deadline_cancelled: false,
            timer_ops: 0,
            drain_started: None,
        }
    }

    /// Arms the drain deadline while a control operation waits for it; cancels it once the
    /// request is done.
    fn watch_deadline(&mut self, cx: &mut Cx<'_>) {
        let req = self.req.as_ref().expect("started");
        if req.draining() && !self.deadline_armed {
            let started = *self.drain_started.get_or_insert_with(Instant::now);
            self.deadline_armed = true;
            self.deadline_cancelled = false;
            self.timer_ops += 1;
            cx.timer(TAG_DEADLINE, QUIESCE_TIMEOUT.saturating_sub(started.elapsed()));
        } else if req.is_done() && self.deadline_armed && !self.deadline_cancelled {
            self.deadline_cancelled = true;
            self.timer_ops += 1;
            cx.cancel(TAG_DEADLINE, TAG_DEADLINE_CANCEL);
        }
    }

    /// One completion for this task: a wake-up, the drain deadline (or its cancel), an
    /// encoding back from the offload thread, or a device operation.
    fn on_event(&mut self, cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned) {
        if tag == TAG_WAKE {
            return self.step(cx, Event::Wake);
        }
        if tag == TAG_DEADLINE || tag == TAG_DEADLINE_CANCEL {
            self.timer_ops -= 1;
            if tag == TAG_DEADLINE {
                self.deadline_armed = false;
                let draining = self.req.as_ref().is_some_and(Request::draining);
                if result == -libc::ETIME && draining {
                    self.step(cx, Event::Expire);
                }
            }
            return;
        }
        if tag == TAG_ENCODE {
            let (tag, away) = self.encoding.take().expect("an encoding in flight");
            // Encoding is pure; it panics only on a broken invariant (the blob outgrew its
            // half), which was fatal on the core before it moved off it.
            let encoded = away.take().expect("a checkpoint's encoding panicked");
            return self.step(cx, Event::Encoded(tag, encoded));
        }
        self.step(cx, Event::Completion(tag, result, owned.into_buf().map(DevBuf)));
    }

    fn step(&mut self, cx: &mut Cx<'_>, ev: Event) {
        let req = self.req.as_mut().expect("started");
        let (outcome, background, timer, failure) = {
            let mut meta = self.pool.meta.lock();
            let mut bufs = CoreBufs(cx);
            let mut ctx = Ctx { meta: &mut meta, bufs: &mut bufs, out: &mut self.out };
            let outcome = match ev {
                Event::Start => req.start(&mut ctx),
                Event::Wake => req.on_wake(&mut ctx),
                Event::Completion(tag, result, buf) => {
                    req.on_completion(&mut ctx, tag, result, buf)
                }
                Event::Encoded(tag, encoded) => req.on_encoded(&mut ctx, tag, encoded),
                Event::Expire => req.expire(&mut ctx),
            };
            meta.take_woken(&mut self.woken);
            let done = matches!(outcome, Outcome::Done { .. });
            let background = done && meta.take_background_commit();
            let timer = done && !background && meta.take_commit_timer();
            let failure = if done { req.take_failure() } else { None };
            (outcome, background, timer, failure)
        };
        for Issue { tag, op } in self.out.drain(..) {
            let cmd = match op {
                DiskOp::Read { offset, buf } => IoCmd::Read { offset, buf: buf.0 },
                DiskOp::Write { offset, buf, fua } => IoCmd::Write { offset, buf: buf.0, fua },
                DiskOp::Flush => IoCmd::Flush,
                DiskOp::Encode(job) => {
                    // A checkpoint's encoding is CPU work over a frozen copy: off the core,
                    // which goes on serving I/O (the pool lock is not held meanwhile).
                    assert!(self.encoding.is_none(), "one encoding at a time");
                    self.encoding = Some((tag, cx.offload_with(TAG_ENCODE, move || job.run())));
                    continue;
                }
            };
            self.pool.media.submit(cx, cmd, tag);
        }
        deliver(&self.pool, Some(&mut *cx), &mut self.woken);
        if let Outcome::Done { result, buf } = outcome {
            match std::mem::replace(&mut self.reply, Reply::None) {
                Reply::Task(task, tag) => {
                    let owned = buf.map_or(Owned::None, |b| Owned::Buf(b.0));
                    cx.complete_to(task, tag, result, owned);
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
            if background {
                // Enough records are pending: commit them without waiting for a client's
                // flush (bounded memory, bounded loss window for unflushed writes).
                background_commit(cx, &self.pool);
            }
            if timer {
                let after = *self.pool.commit_interval.lock();
                cx.spawn_local(Box::new(CommitTimer {
                    pool: Arc::clone(&self.pool),
                    after,
                    done: false,
                }));
            }
        }
    }
}

/// Starts a commit nobody waits for.
fn background_commit(cx: &mut Cx<'_>, pool: &Arc<PoolHandle>) {
    cx.spawn_local(Box::new(VolumeIo::new(Arc::clone(pool), 0, Reply::None, Cmd::Flush)));
}

/// Commits what is pending `after` the first pending record, when no flush did meanwhile:
/// one per pool at a time (armed through `PoolMeta::take_commit_timer`), so an idle pool
/// keeps no timer.
struct CommitTimer {
    pool: Arc<PoolHandle>,
    after: Duration,
    done: bool,
}

impl Task for CommitTimer {
    fn start(&mut self, cx: &mut Cx<'_>) {
        cx.timer(0, self.after);
    }

    fn on_completion(&mut self, cx: &mut Cx<'_>, _tag: u32, _result: i32, _owned: Owned) {
        self.done = true;
        if self.pool.meta.lock().commit_timer_fired() {
            background_commit(cx, &self.pool);
        }
    }

    fn flush(&mut self, _cx: &mut Cx<'_>) {}

    fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}

    fn is_done(&self) -> bool {
        self.done
    }
}

impl Task for VolumeIo {
    fn start(&mut self, cx: &mut Cx<'_>) {
        let cmd = self.cmd.take().expect("a command");
        self.req = Some(Request::new(self.vol, cmd, waiter(cx.core(), cx.task())));
        self.step(cx, Event::Start);
        self.watch_deadline(cx);
    }

    fn on_completion(&mut self, cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned) {
        self.on_event(cx, tag, result, owned);
        self.watch_deadline(cx);
    }

    fn flush(&mut self, _cx: &mut Cx<'_>) {}

    fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}

    fn is_done(&self) -> bool {
        self.timer_ops == 0 && self.req.as_ref().is_some_and(Request::is_done)
    }
}
