//! A pool opened by the daemon and its volumes as block devices.
//!
//! [`PoolHandle`] owns the pool's media twice: as a [`FileDev`] for the data path (O_DIRECT,
//! asynchronous through the calling core's io_uring) and as a [`FileDisk`] for the control
//! path (blocking, on the control thread). The [`PoolMeta`] between them sits behind one
//! mutex held only for in-memory decisions, never across I/O on the data path.
//!
//! A [`VolumeDev`] is a [`BlockDev`]: each command becomes a [`VolumeIo`] task on the
//! submitting core that plans under the lock, runs the device I/O the plan needs (direct reads,
//! in-place writes, or a copy-on-write: read the old cluster, lay the new data over it, write
//! the fresh cluster), maps the result, and hands the outcome to the submitting task with the
//! submitter's tag (`Cx::complete_to`).
//!
//! Invariants:
//! - a flush (or FUA write) completes only after a commit sealed after it arrived is durable:
//!   `fsync` of the media (the data and every earlier journal block), then the commit's
//!   journal blocks with FUA, in that order;
//! - every data I/O holds a ticket from `begin_io` until its device I/O ended, so a cluster
//!   freed meanwhile is not reused under it;
//! - control operations that change sharing or size (snapshot, clone, rollback, resize,
//!   delete) freeze the volume and wait until its writes drained before they change anything.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_ffi::{IoBuf, Owned};
use parking_lot::{Mutex, MutexGuard};

use super::format::BLOCK_SIZE;
use super::meta::{Checkpoint, PoolMeta, ReadPiece, Sealed, Ticket, WritePlan, PIECE};
use super::pool::{checkpoint_sync, commit_sync, Pool, PoolError, PoolGeometry, SyncDisk};
use crate::blockdev::{push_extent, BlockDev, DevInfo, Extent, IoCmd};
use crate::file::FileDev;
use crate::reactor::{Cx, Task};

/// How long a request waits before it looks again at a cluster busy with another write.
const RETRY: Duration = Duration::from_micros(30);
/// How long a flush waits before it looks again at a commit in flight.
const RETRY_COMMIT: Duration = Duration::from_micros(100);
/// How long a control operation waits for a volume's writes to drain.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Blocking access to the pool's media for the control path.
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
    disk: Mutex<FileDisk>,
    media: FileDev,
    path: PathBuf,
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
}

impl PoolHandle {
    /// Creates a pool on `path` (a file is created sparse with `size` bytes when missing).
    pub fn create(path: &Path, size: Option<u64>, g: PoolGeometry) -> Result<(), PoolError> {
        if let (Some(size), false) = (size, path.exists()) {
            let f = OpenOptions::new().write(true).create_new(true).open(path)?;
            f.set_len(size)?;
        }
        let disk = FileDisk::open(path, true)?;
        let mut pool = Pool::format(disk, g)?;
        pool.checkpoint()?;
        Ok(())
    }

    /// Opens the pool on `path`: superblock, checkpoint and journal replay.
    pub fn open(path: &Path) -> Result<Arc<PoolHandle>, PoolError> {
        let disk = FileDisk::open(path, true)?;
        let (disk, meta) = Pool::open(disk)?.into_parts();
        let media = FileDev::open(path, None, false)
            .map_err(|e| PoolError::Io(std::io::Error::other(e.to_string())))?;
        Ok(Arc::new(PoolHandle {
            meta: Mutex::new(meta),
            disk: Mutex::new(disk),
            media,
            path: path.to_path_buf(),
        }))
    }

    pub fn meta(&self) -> MutexGuard<'_, PoolMeta> {
        self.meta.lock()
    }

    pub fn info(&self) -> PoolInfo {
        let m = self.meta.lock();
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
        }
    }

    pub fn list(&self) -> Vec<VolumeInfo> {
        let m = self.meta.lock();
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
    pub fn commit_blocking(&self) -> Result<(), PoolError> {
        let start = Instant::now();
        loop {
            let mut meta = self.meta.lock();
            if let Some(why) = meta.failed() {
                return Err(PoolError::Failed(why.to_string()));
            }
            if meta.committing() {
                drop(meta);
                if start.elapsed() > QUIESCE_TIMEOUT {
                    return Err(PoolError::Damaged("a commit did not finish in time".into()));
                }
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            let mut disk = self.disk.lock();
            return commit_sync(&mut *disk, &mut meta);
        }
    }

    /// Writes a checkpoint now (clean shutdown; the next start replays nothing).
    pub fn checkpoint_blocking(&self) -> Result<(), PoolError> {
        let start = Instant::now();
        loop {
            let mut meta = self.meta.lock();
            if meta.committing() && start.elapsed() < QUIESCE_TIMEOUT {
                drop(meta);
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            let mut disk = self.disk.lock();
            return checkpoint_sync(&mut *disk, &mut meta);
        }
    }

    /// The I/O of a checkpoint begun on a core (`begin_checkpoint`), on a helper thread.
    fn write_checkpoint(&self, job: Checkpoint) {
        let start = Instant::now();
        let bytes = job.blob.len();
        let written = {
            let mut disk = self.disk.lock();
            crate::volume::pool::write_checkpoint(&mut *disk, &job)
        };
        let mut meta = self.meta.lock();
        match written {
            Ok(()) => {
                meta.checkpoint_done(job);
                tracing::info!(
                    bytes,
                    millis = start.elapsed().as_millis() as u64,
                    "checkpoint written"
                );
            }
            Err(e) => meta.fail(format!("checkpoint failed: {e}")),
        }
    }

    /// Runs a control operation: freezes `quiesce` (if any) until its writes drained, applies
    /// `op`, unfreezes, and commits, so the operation is durable when this returns.
    pub fn control<T>(
        &self,
        quiesce: Option<u32>,
        op: impl FnOnce(&mut PoolMeta) -> Result<T, PoolError>,
    ) -> Result<T, PoolError> {
        if let Some(id) = quiesce {
            self.meta.lock().set_frozen(id, true);
            let start = Instant::now();
            while !self.meta.lock().quiet(id) {
                if start.elapsed() > QUIESCE_TIMEOUT {
                    self.meta.lock().set_frozen(id, false);
                    return Err(PoolError::Busy(id));
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        let r = {
            let mut meta = self.meta.lock();
            let r = op(&mut meta);
            if let Some(id) = quiesce {
                meta.set_frozen(id, false);
            }
            r
        };
        let value = r?;
        self.commit_blocking()?;
        Ok(value)
    }

    pub fn create_volume(&self, name: &str, size: u64) -> Result<u32, PoolError> {
        self.control(None, |m| m.create_volume(name, size))
    }

    pub fn snapshot(&self, of: &str, name: &str) -> Result<u32, PoolError> {
        let of = self.meta.lock().find(of)?;
        self.control(Some(of), |m| m.snapshot(of, name))
    }

    pub fn clone_volume(&self, of: &str, name: &str) -> Result<u32, PoolError> {
        let of = self.meta.lock().find(of)?;
        self.control(None, |m| m.clone_volume(of, name))
    }

    pub fn rollback(&self, vol: &str, to: &str) -> Result<(), PoolError> {
        let (id, to) = {
            let m = self.meta.lock();
            (m.find(vol)?, m.find(to)?)
        };
        self.control(Some(id), |m| m.rollback(id, to))
    }

    pub fn resize(&self, vol: &str, size: u64, force: bool) -> Result<(), PoolError> {
        let id = self.meta.lock().find(vol)?;
        self.control(Some(id), |m| m.resize(id, size, force))
    }

    pub fn delete(&self, vol: &str) -> Result<(), PoolError> {
        let id = self.meta.lock().find(vol)?;
        self.control(Some(id), |m| m.delete(id))
    }

    pub fn set_config(&self, key: &str, value: &str) -> Result<(), PoolError> {
        self.control(None, |m| m.set_config(key, value))
    }

    /// A block device for volume `name` (read-only for snapshots, or when asked).
    pub fn device(self: &Arc<Self>, name: &str, read_only: bool) -> Result<VolumeDev, PoolError> {
        let m = self.meta.lock();
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

fn errno(e: &PoolError) -> i32 {
    -match e {
        PoolError::NoSpace => libc::ENOSPC,
        PoolError::ReadOnly(_) => libc::EPERM,
        PoolError::Range(_) | PoolError::Unaligned => libc::EINVAL,
        PoolError::NoVolume(_) => libc::ENODEV,
        _ => libc::EIO,
    }
}

impl BlockDev for VolumeDev {
    fn info(&self) -> &DevInfo {
        &self.info
    }

    fn size_bytes(&self) -> u64 {
        self.pool.meta.lock().volume(self.id).map_or(0, |v| v.size_bytes)
    }

    fn grow(&self, new_size: u64) -> std::io::Result<()> {
        let name = self.pool.meta.lock().volume(self.id).map(|v| v.name.clone());
        let r = name.and_then(|n| self.pool.resize(&n, new_size, false));
        r.map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn submit(&self, cx: &mut Cx<'_>, cmd: IoCmd, tag: u32) {
        let io = VolumeIo {
            pool: Arc::clone(&self.pool),
            vol: self.id,
            reply_task: cx.task(),
            reply_tag: tag,
            cmd: Some(cmd),
            buf: None,
            offset: 0,
            len: 0,
            fua: false,
            phase: Phase::Plan,
            outstanding: 0,
            error: 0,
            ticket: None,
            parts: Vec::new(),
            plans: Vec::new(),
            sealed: None,
            wait_seal: 0,
            user: None,
            user_at: 0,
            user_len: 0,
            hold: None,
            edges: Vec::new(),
            steps: VecDeque::new(),
            final_result: None,
            done: false,
        };
        cx.spawn_local(Box::new(io));
    }

    fn extents(&self, offset: u64, len: u64) -> std::io::Result<Vec<Extent>> {
        let runs = self.pool.meta.lock().allocation(self.id, offset, len);
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

/// What a retry (a timer after `Busy` or a commit in flight) resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Plan,
    Hold,
    Write,
    Sync,
}

/// Tags of a volume I/O's own device operations.
mod tag {
    pub const RETRY: u32 = u32::MAX;
    pub const KIND: u32 = 0xff00_0000;
    pub const READ: u32 = 0x0100_0000;
    pub const WRITE: u32 = 0x0200_0000;
    pub const COPY: u32 = 0x0300_0000;
    pub const SYNC: u32 = 0x0400_0000;
    pub const JOURNAL: u32 = 0x0500_0000;
    pub const EDGE: u32 = 0x0600_0000;
}

/// One request to a volume, run as a task on the submitting core.
struct VolumeIo {
    pool: Arc<PoolHandle>,
    vol: u32,
    reply_task: u32,
    reply_tag: u32,
    cmd: Option<IoCmd>,
    /// The submitter's buffer (read target, write source), handed back with the reply.
    buf: Option<IoBuf>,
    offset: u64,
    len: u64,
    fua: bool,
    phase: Phase,
    outstanding: u32,
    /// First error (negative errno).
    error: i32,
    ticket: Option<Ticket>,
    /// Reads: where each device read lands in the request, and its buffer (None when the read
    /// went straight into `buf`).
    parts: Vec<(u64, Option<IoBuf>)>,
    plans: Vec<WritePlan>,
    sealed: Option<Sealed>,
    /// A flush is satisfied once this many commits have been sealed and are durable.
    wait_seal: u64,
    /// Unaligned requests run on the enclosing 4 KiB pieces through a bounce buffer (`buf`):
    /// the submitter's buffer, where its bytes sit in the bounce buffer, and their length.
    user: Option<IoBuf>,
    user_at: usize,
    user_len: u64,
    /// A read-modify-write's exclusive hold on its volume clusters (token, clusters).
    hold: Option<(u64, Vec<u64>)>,
    /// Edge pieces a read-modify-write reads: position in the bounce buffer.
    edges: Vec<u64>,
    /// Further steps of this request (an unaligned write-zeroes), and its result when it has
    /// steps.
    steps: VecDeque<IoCmd>,
    final_result: Option<i32>,
    done: bool,
}

/// The 4 KiB-aligned range enclosing `[offset, offset + len)`.
fn enclosing(offset: u64, len: u64) -> (u64, u64) {
    let start = offset / PIECE * PIECE;
    let end = offset.saturating_add(len).next_multiple_of(PIECE);
    (start, end)
}

impl VolumeIo {
    fn media(&self) -> &FileDev {
        &self.pool.media
    }

    fn reply(&mut self, cx: &mut Cx<'_>, result: i32) {
        if let Some((token, vcs)) = self.hold.take() {
            self.pool.meta.lock().release(self.vol, &vcs, token);
        }
        if let Some(user) = self.user.take() {
            if let Some(bounce) = self.buf.take() {
                cx.recycle(bounce);
            }
            self.buf = Some(user);
        }
        if result >= 0 {
            if let Some(next) = self.steps.pop_front() {
                if let Some(b) = self.buf.take() {
                    cx.recycle(b);
                }
                self.reset();
                self.cmd = Some(next);
                return self.plan(cx);
            }
        }
        let (result, owned) = match self.final_result {
            // A request of several steps: the buffers were ours.
            Some(r) => {
                if let Some(b) = self.buf.take() {
                    cx.recycle(b);
                }
                (if result < 0 { result } else { r }, Owned::None)
            }
            None => (result, self.buf.take().map_or(Owned::None, Owned::Buf)),
        };
        cx.complete_to(self.reply_task, self.reply_tag, result, owned);
        self.done = true;
    }

    /// Forgets a finished step's state (the request's identity and remaining steps stay).
    fn reset(&mut self) {
        self.phase = Phase::Plan;
        self.outstanding = 0;
        self.error = 0;
        self.ticket = None;
        self.parts.clear();
        self.plans.clear();
        self.edges.clear();
        self.offset = 0;
        self.len = 0;
        self.fua = false;
    }

    /// The byte count a successful read or write reports.
    fn done_len(&self) -> i32 {
        (if self.user.is_some() { self.user_len } else { self.len }) as i32
    }

    fn note_error(&mut self, result: i32) {
        if self.error == 0 {
            self.error = if result < 0 { result } else { -libc::EIO };
        }
    }

    /// Plans (or re-plans after a retry) the request.
    fn plan(&mut self, cx: &mut Cx<'_>) {
        if let Some(cmd) = self.cmd.take() {
            match cmd {
                IoCmd::Read { offset, buf } => {
                    let len = buf.len() as u64;
                    let (start, end) = enclosing(offset, len);
                    self.offset = start;
                    self.len = end - start;
                    if (start, end) == (offset, offset + len) {
                        self.buf = Some(buf);
                    } else {
                        self.user_at = (offset - start) as usize;
                        self.user_len = len;
                        self.user = Some(buf);
                        self.buf = Some(cx.buf(self.len as usize));
                    }
                    return self.start_read(cx);
                }
                IoCmd::Write { offset, buf, fua } => {
                    let len = buf.len() as u64;
                    let (start, end) = enclosing(offset, len);
                    self.offset = start;
                    self.len = end - start;
                    self.fua = fua;
                    if (start, end) == (offset, offset + len) {
                        self.buf = Some(buf);
                        self.phase = Phase::Write;
                    } else {
                        self.user_at = (offset - start) as usize;
                        self.user_len = len;
                        self.user = Some(buf);
                        self.phase = Phase::Hold;
                    }
                }
                IoCmd::Flush => {
                    self.wait_seal = self.pool.meta.lock().seals() + 1;
                    self.phase = Phase::Sync;
                }
                IoCmd::Discard { offset, len } => {
                    // Advisory: only whole pieces are released.
                    let start = offset.next_multiple_of(PIECE);
                    let end = offset.saturating_add(len) / PIECE * PIECE;
                    if end <= start {
                        return self.reply(cx, 0);
                    }
                    self.offset = start;
                    self.len = end - start;
                    return self.trim(cx);
                }
                IoCmd::WriteZeroes { offset, len, .. } => {
                    let end = offset.saturating_add(len);
                    if offset.is_multiple_of(PIECE) && end.is_multiple_of(PIECE) {
                        self.offset = offset;
                        self.len = len;
                        return self.trim(cx);
                    }
                    // Partial pieces at the edges are written with zeros (read-modify-write),
                    // the whole pieces between them released.
                    let inner = (offset.next_multiple_of(PIECE), end / PIECE * PIECE);
                    let mut steps = VecDeque::new();
                    let zeros = |cx: &mut Cx<'_>, from: u64, to: u64| {
                        let mut buf = cx.buf((to - from) as usize);
                        buf.as_mut_slice().fill(0);
                        IoCmd::Write { offset: from, buf, fua: false }
                    };
                    if inner.1 <= inner.0 {
                        steps.push_back(zeros(cx, offset, end));
                    } else {
                        if offset < inner.0 {
                            steps.push_back(zeros(cx, offset, inner.0));
                        }
                        steps.push_back(IoCmd::Discard { offset: inner.0, len: inner.1 - inner.0 });
                        if inner.1 < end {
                            steps.push_back(zeros(cx, inner.1, end));
                        }
                    }
                    self.final_result = Some(0);
                    self.cmd = steps.pop_front();
                    self.steps = steps;
                    return self.plan(cx);
                }
            }
        }
        match self.phase {
            Phase::Hold => self.start_hold(cx),
            Phase::Write => self.start_write(cx),
            Phase::Sync => self.start_commit(cx),
            Phase::Plan => self.trim(cx),
        }
    }

    fn start_read(&mut self, cx: &mut Cx<'_>) {
        let planned = {
            let mut m = self.pool.meta.lock();
            m.plan_read(self.vol, self.offset, self.len).map(|p| (p, m.begin_io()))
        };
        let (pieces, ticket) = match planned {
            Ok(x) => x,
            Err(e) => return self.reply(cx, errno(&e)),
        };
        self.ticket = Some(ticket);
        if let [ReadPiece::Disk { offset, len }] = pieces[..] {
            if len == self.len {
                let buf = self.buf.take().expect("read buffer");
                self.parts.push((0, None));
                self.outstanding = 1;
                self.pool.media.submit(cx, IoCmd::Read { offset, buf }, tag::READ);
                return;
            }
        }
        let mut pos = 0u64;
        for p in pieces {
            match p {
                ReadPiece::Zero { len } => {
                    let buf = self.buf.as_mut().expect("read buffer");
                    buf.as_mut_slice()[pos as usize..(pos + len) as usize].fill(0);
                    pos += len;
                }
                ReadPiece::Disk { offset, len } => {
                    let i = self.parts.len() as u32;
                    let sub = cx.buf(len as usize);
                    self.parts.push((pos, None));
                    self.outstanding += 1;
                    self.pool.media.submit(cx, IoCmd::Read { offset, buf: sub }, tag::READ | i);
                    pos += len;
                }
            }
        }
        if self.outstanding == 0 {
            self.finish_read(cx);
        }
    }

    fn on_read(&mut self, cx: &mut Cx<'_>, i: usize, result: i32, owned: Owned) {
        if self.buf.is_none() {
            // The direct read into the submitter's buffer.
            let buf = owned.into_buf().expect("a read completion carries its buffer");
            if result < 0 || result as usize != buf.len() {
                self.note_error(result);
            }
            self.buf = Some(buf);
            self.outstanding -= 1;
        } else if !self.land(cx, self.parts[i].0 as usize, result, owned) {
            return;
        }
        if self.outstanding == 0 {
            self.finish_read(cx);
        }
    }

    /// A device read into a buffer of its own finished: its bytes go to `pos` in `buf` (the
    /// request's buffer or the bounce buffer). Whether it was the last one outstanding.
    fn land(&mut self, cx: &mut Cx<'_>, pos: usize, result: i32, owned: Owned) -> bool {
        let sub = owned.into_buf().expect("a read completion carries its buffer");
        if result < 0 || result as usize != sub.len() {
            self.note_error(result);
        } else if self.error == 0 {
            let dst = self.buf.as_mut().expect("the request's buffer");
            dst.as_mut_slice()[pos..pos + sub.len()].copy_from_slice(sub.as_slice());
        }
        cx.recycle(sub);
        self.outstanding -= 1;
        self.outstanding == 0
    }

    fn finish_read(&mut self, cx: &mut Cx<'_>) {
        if let Some(t) = self.ticket.take() {
            self.pool.meta.lock().end_io(t);
        }
        if let (Some(user), Some(bounce), 0) = (self.user.as_mut(), self.buf.as_ref(), self.error) {
            let n = self.user_len as usize;
            user.as_mut_slice()[..n]
                .copy_from_slice(&bounce.as_slice()[self.user_at..self.user_at + n]);
        }
        let result = if self.error != 0 { self.error } else { self.done_len() };
        self.reply(cx, result);
    }

    /// An unaligned write: hold its clusters, read the partial edge pieces, lay the new bytes
    /// over them in a bounce buffer, then write the enclosing pieces.
    fn start_hold(&mut self, cx: &mut Cx<'_>) {
        let (start, end) = (self.offset, self.offset + self.len);
        let user_end = self.user_at as u64 + self.user_len;
        let mut edges = Vec::new();
        if self.user_at != 0 {
            edges.push(start);
        }
        if !user_end.is_multiple_of(PIECE) && edges.last() != Some(&(end - PIECE)) {
            edges.push(end - PIECE);
        }
        let held = {
            let mut m = self.pool.meta.lock();
            let cb = m.cluster_bytes();
            let vcs: Vec<u64> = (start / cb..end.div_ceil(cb)).collect();
            match m.hold(self.vol, &vcs) {
                Ok(Ok(token)) => {
                    let plans: Result<Vec<_>, _> =
                        edges.iter().map(|&at| m.plan_read(self.vol, at, PIECE)).collect();
                    match plans {
                        Ok(p) => Ok(Ok((token, vcs, p))),
                        Err(e) => {
                            m.release(self.vol, &vcs, token);
                            Err(e)
                        }
                    }
                }
                Ok(Err(busy)) => Ok(Err(busy)),
                Err(e) => Err(e),
            }
        };
        let (token, vcs, plans) = match held {
            Ok(Ok(x)) => x,
            Ok(Err(_busy)) => return self.retry(cx),
            Err(e) => return self.reply(cx, errno(&e)),
        };
        self.hold = Some((token, vcs));
        self.buf = Some(cx.buf(self.len as usize));
        for (k, (at, pieces)) in edges.iter().zip(plans).enumerate() {
            let pos = (at - start) as usize;
            match pieces[..] {
                [ReadPiece::Disk { offset, .. }] => {
                    self.edges.push(at - start);
                    self.outstanding += 1;
                    let sub = cx.buf(PIECE as usize);
                    self.pool.media.submit(
                        cx,
                        IoCmd::Read { offset, buf: sub },
                        tag::EDGE | k as u32,
                    );
                }
                _ => {
                    self.edges.push(at - start);
                    let bounce = self.buf.as_mut().expect("bounce buffer");
                    bounce.as_mut_slice()[pos..pos + PIECE as usize].fill(0);
                }
            }
        }
        if self.outstanding == 0 {
            self.edges_done(cx);
        }
    }

    fn on_edge(&mut self, cx: &mut Cx<'_>, k: usize, result: i32, owned: Owned) {
        if self.land(cx, self.edges[k] as usize, result, owned) {
            self.edges_done(cx);
        }
    }

    fn edges_done(&mut self, cx: &mut Cx<'_>) {
        if self.error != 0 {
            return self.reply(cx, self.error);
        }
        let n = self.user_len as usize;
        let user = self.user.as_ref().expect("unaligned write buffer");
        let bounce = self.buf.as_mut().expect("bounce buffer");
        bounce.as_mut_slice()[self.user_at..self.user_at + n]
            .copy_from_slice(&user.as_slice()[..n]);
        self.phase = Phase::Write;
        self.start_write(cx);
    }

    fn retry(&mut self, cx: &mut Cx<'_>) {
        cx.timer(tag::RETRY, RETRY);
    }

    /// Waits for the commit (or checkpoint) in flight: they take a device flush, so look less
    /// often than for a busy cluster.
    fn retry_commit(&mut self, cx: &mut Cx<'_>) {
        cx.timer(tag::RETRY, RETRY_COMMIT);
    }

    fn start_write(&mut self, cx: &mut Cx<'_>) {
        let planned = {
            let mut m = self.pool.meta.lock();
            let hold = self.hold.as_ref().map_or(0, |h| h.0);
            match m.plan_write(self.vol, self.offset, self.len, hold) {
                Ok(Ok(plans)) => Ok(Ok((plans, m.begin_io(), m.cluster_bytes()))),
                Ok(Err(busy)) => Ok(Err(busy)),
                Err(e) => Err(e),
            }
        };
        let (plans, ticket, cb) = match planned {
            Ok(Ok(x)) => x,
            Ok(Err(_busy)) => return self.retry(cx),
            Err(e) => return self.reply(cx, errno(&e)),
        };
        self.ticket = Some(ticket);
        self.outstanding = plans.len() as u32;
        self.plans = plans;
        for i in 0..self.plans.len() {
            let p = self.plans[i];
            if let Some(old) = p.copy_from {
                let sub = cx.buf(cb as usize);
                self.pool.media.submit(
                    cx,
                    IoCmd::Read { offset: old, buf: sub },
                    tag::COPY | i as u32,
                );
            } else if self.plans.len() == 1 && p.req_len == self.len {
                let buf = self.buf.take().expect("write buffer");
                self.pool.media.submit(
                    cx,
                    IoCmd::Write { offset: p.offset, buf, fua: false },
                    tag::WRITE | i as u32,
                );
            } else {
                let mut sub = cx.buf_with_capacity(p.req_len as usize);
                let src = self.buf.as_ref().expect("write buffer").as_slice();
                sub.extend_from_slice(
                    &src[p.req_start as usize..(p.req_start + p.req_len) as usize],
                );
                self.pool.media.submit(
                    cx,
                    IoCmd::Write { offset: p.offset, buf: sub, fua: false },
                    tag::WRITE | i as u32,
                );
            }
        }
    }

    fn on_copy_read(&mut self, cx: &mut Cx<'_>, i: usize, result: i32, owned: Owned) {
        let Some(mut whole) = owned.into_buf() else {
            unreachable!("a read completion carries its buffer")
        };
        let p = self.plans[i];
        if result < 0 || result as usize != whole.len() {
            self.note_error(result);
            cx.recycle(whole);
            self.pool.meta.lock().abort_span(self.vol, &p);
            return self.span_done(cx);
        }
        let cb = whole.len() as u64;
        let base = p.offset - p.offset % cb;
        let at = (p.offset - base) as usize;
        let src = self.buf.as_ref().expect("write buffer").as_slice();
        whole.as_mut_slice()[at..at + p.req_len as usize]
            .copy_from_slice(&src[p.req_start as usize..(p.req_start + p.req_len) as usize]);
        self.pool.media.submit(
            cx,
            IoCmd::Write { offset: base, buf: whole, fua: false },
            tag::WRITE | i as u32,
        );
    }

    fn on_write(&mut self, cx: &mut Cx<'_>, i: usize, result: i32, owned: Owned) {
        let p = self.plans[i];
        let buf = owned.into_buf();
        let expected = buf.as_ref().map_or(0, |b| b.len());
        if let Some(buf) = buf {
            if self.buf.is_none() && self.plans.len() == 1 && p.copy_from.is_none() {
                self.buf = Some(buf); // the submitter's buffer comes back
            } else {
                cx.recycle(buf);
            }
        }
        {
            let mut m = self.pool.meta.lock();
            if result < 0 || result as usize != expected {
                m.abort_span(self.vol, &p);
            } else {
                m.finish_span(self.vol, &p);
            }
        }
        if result < 0 || result as usize != expected {
            self.note_error(result);
        }
        self.span_done(cx);
    }

    fn span_done(&mut self, cx: &mut Cx<'_>) {
        self.outstanding -= 1;
        if self.outstanding > 0 {
            return;
        }
        {
            let mut m = self.pool.meta.lock();
            m.end_write(self.vol);
            if let Some(t) = self.ticket.take() {
                m.end_io(t);
            }
        }
        if self.error != 0 {
            return self.reply(cx, self.error);
        }
        if let Some((token, vcs)) = self.hold.take() {
            self.pool.meta.lock().release(self.vol, &vcs, token);
        }
        if self.fua {
            self.wait_seal = self.pool.meta.lock().seals() + 1;
            self.phase = Phase::Sync;
            return self.start_commit(cx);
        }
        let n = self.done_len();
        self.reply(cx, n);
    }

    fn trim(&mut self, cx: &mut Cx<'_>) {
        self.phase = Phase::Plan;
        if !self.offset.is_multiple_of(PIECE) || !self.len.is_multiple_of(PIECE) {
            return self.reply(cx, -libc::EINVAL);
        }
        let r = self.pool.meta.lock().trim(self.vol, self.offset, self.len);
        match r {
            Ok(Ok(())) => self.reply(cx, 0),
            Ok(Err(_busy)) => self.retry(cx),
            Err(e) => self.reply(cx, errno(&e)),
        }
    }

    /// Flush: waits for a commit sealed after this request arrived (its own, or another's).
    fn start_commit(&mut self, cx: &mut Cx<'_>) {
        let mut m = self.pool.meta.lock();
        if let Some(why) = m.failed() {
            tracing::debug!(why, "flush on a failed pool");
            drop(m);
            return self.reply(cx, -libc::EIO);
        }
        if m.durable_seals() >= self.wait_seal {
            drop(m);
            return self.finish_commit(cx);
        }
        if m.committing() {
            drop(m);
            return self.retry_commit(cx);
        }
        if m.wants_checkpoint() {
            // Rare (the ring is three quarters full): encoded here, written by a helper thread
            // so that no core waits on its I/O; this flush waits for it like for a commit.
            let job = match m.begin_checkpoint() {
                Ok(Some(job)) => job,
                Ok(None) => unreachable!("checked that no commit is in flight"),
                Err(e) => {
                    drop(m);
                    return self.reply(cx, errno(&e));
                }
            };
            drop(m);
            let pool = Arc::clone(&self.pool);
            let spawned = std::thread::Builder::new()
                .name("ballast-checkpoint".into())
                .spawn(move || pool.write_checkpoint(job));
            if let Err(e) = spawned {
                self.pool.meta.lock().fail(format!("cannot start the checkpoint writer: {e}"));
                return self.reply(cx, -libc::EIO);
            }
            return self.retry_commit(cx);
        }
        let sealed = match m.seal() {
            Ok(Some(s)) => s,
            Ok(None) => unreachable!("checked that no commit is in flight"),
            Err(e) => {
                drop(m);
                return self.reply(cx, errno(&e));
            }
        };
        tracing::debug!(
            seal = m.seals(),
            blocks = ?sealed.blocks.iter().map(|b| b.0).collect::<Vec<_>>(),
            "commit sealed"
        );
        drop(m);
        self.sealed = Some(sealed);
        self.phase = Phase::Sync;
        self.outstanding = 1;
        self.pool.media.submit(cx, IoCmd::Flush, tag::SYNC);
    }

    fn on_sync(&mut self, cx: &mut Cx<'_>, result: i32) {
        self.outstanding = 0;
        if result < 0 {
            return self.commit_failed(cx, result, "fsync of the pool failed");
        }
        let journal_start = self.pool.meta.lock().superblock().journal_start;
        let sealed = self.sealed.as_ref().expect("a sealed commit");
        let blocks: Vec<(u64, Vec<u8>)> = sealed.blocks.clone();
        for (j, (index, bytes)) in blocks.iter().enumerate() {
            let mut buf = cx.buf_with_capacity(BLOCK_SIZE);
            buf.extend_from_slice(bytes);
            self.outstanding += 1;
            let offset = (journal_start + index) * BLOCK_SIZE as u64;
            self.media().submit(
                cx,
                IoCmd::Write { offset, buf, fua: true },
                tag::JOURNAL | j as u32,
            );
        }
        if self.outstanding == 0 {
            self.commit_written(cx);
        }
    }

    fn on_journal(&mut self, cx: &mut Cx<'_>, result: i32, owned: Owned) {
        if let Some(buf) = owned.into_buf() {
            cx.recycle(buf);
        }
        if result < 0 || result as usize != BLOCK_SIZE {
            self.note_error(result);
        }
        self.outstanding -= 1;
        if self.outstanding == 0 {
            if self.error != 0 {
                let e = self.error;
                return self.commit_failed(cx, e, "journal write failed");
            }
            self.commit_written(cx);
        }
    }

    fn commit_written(&mut self, cx: &mut Cx<'_>) {
        let sealed = self.sealed.take().expect("a sealed commit");
        self.pool.meta.lock().commit_done(sealed);
        self.finish_commit(cx);
    }

    fn commit_failed(&mut self, cx: &mut Cx<'_>, result: i32, what: &str) {
        self.pool.meta.lock().fail(format!("{what}: errno {}", -result));
        self.reply(cx, -libc::EIO);
    }

    fn finish_commit(&mut self, cx: &mut Cx<'_>) {
        let result = if self.buf.is_some() || self.len > 0 { self.done_len() } else { 0 };
        self.reply(cx, result);
    }
}

impl Task for VolumeIo {
    fn start(&mut self, cx: &mut Cx<'_>) {
        self.plan(cx);
    }

    fn on_completion(&mut self, cx: &mut Cx<'_>, t: u32, result: i32, owned: Owned) {
        if t == tag::RETRY {
            return self.plan(cx);
        }
        let i = (t & !tag::KIND) as usize;
        match t & tag::KIND {
            tag::READ => self.on_read(cx, i, result, owned),
            tag::COPY => self.on_copy_read(cx, i, result, owned),
            tag::WRITE => self.on_write(cx, i, result, owned),
            tag::SYNC => self.on_sync(cx, result),
            tag::JOURNAL => self.on_journal(cx, result, owned),
            tag::EDGE => self.on_edge(cx, i, result, owned),
            _ => unreachable!("volume I/O tag {t:#x}"),
        }
    }

    fn flush(&mut self, _cx: &mut Cx<'_>) {}

    fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}

    fn is_done(&self) -> bool {
        self.done
    }
}
