//! File and block-device backend: io_uring reads and writes with O_DIRECT.
//!
//! Invariants:
//! - aligned requests (offset, length and buffer on `ALIGN`) go to the O_DIRECT descriptor;
//!   unaligned ones go to a second, buffered descriptor of the same file, which the kernel keeps
//!   coherent with direct I/O (direct writes invalidate, direct reads write back first);
//! - flush is `fdatasync`, which covers writes completed through either descriptor and from
//!   every core, so one flush on any connection makes every completed write durable;
//! - discard and write-zeroes use `fallocate`; on a block device (whose `fallocate` takes whole
//!   logical blocks: its advertised minimum block) a discard covers the whole logical blocks
//!   inside its range and is a zeroing that may unmap, a write-zeroes is a zeroing that falls
//!   back to writing zeros on devices without an offload;
//! - the O_DIRECT descriptor is registered with the ring of each core that submits on it
//!   ([`crate::fixed`]) and named by its slot there; the buffered one goes as a descriptor;
//! - a file on a memory filesystem (tmpfs, ramfs) is memory: its reads, writes and flushes are
//!   copies the core makes itself (`pread`/`pwrite`, completed through `Cx::complete`, as a
//!   RAM export's are). Such files offer io_uring no non-blocking path, so every operation on
//!   the ring would be handed to one of io_uring's worker threads: a wake-up, two context
//!   switches and a task-work completion around a 4 KiB copy (measured: the worker alone spent
//!   ~4 µs per 4 KiB read). The copy cannot wait for a device; it can wait for swap, if tmpfs
//!   pages are swapped out.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ballast_ffi::sys::{self, CacheMode};
use ballast_ffi::{FileRef, Op, Owned};
use nix::unistd::{lseek, Whence};

use crate::blockdev::{in_range, push_extent, BlockDev, DevInfo, Extent, IoCmd};
use crate::fixed::Registered;
use crate::reactor::Cx;

const ALIGN: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum FileDevError {
    #[error("{path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{path}: size is 0 (create it with a size)")]
    Empty { path: PathBuf },
}

pub struct FileDev {
    direct: File,
    /// `direct` as the cores' rings hold it registered (after `direct`: dropped after it).
    direct_reg: Registered,
    buffered: File,
    info: DevInfo,
    size_bytes: AtomicU64,
    is_block_device: bool,
    /// A block device's logical block size (1 for a file): its trims and zeroing take whole
    /// logical blocks (`fallocate` on a block device refuses anything else).
    lbs: u64,
    /// The file lives in memory (tmpfs, ramfs): reads, writes and flushes are done on the core.
    in_memory: bool,
    /// Not a block device, and its filesystem punches holes (probed at open): a discard
    /// zeroes its range.
    punches_holes: bool,
    /// Not a block device, and its filesystem zeroes ranges in place (`FALLOC_FL_ZERO_RANGE`,
    /// probed at open; NFS and ext3-style files have none).
    zeroes_ranges: bool,
    /// Held by `grow` and `rescan`: the size only ever rises, one change at a time.
    resizing: parking_lot::Mutex<()>,
}

/// Whether `f` is a file of a filesystem that keeps its data in memory (tmpfs, ramfs).
fn on_memory_filesystem(f: &File) -> bool {
    use nix::sys::statfs::{fstatfs, FsType, TMPFS_MAGIC};
    // linux/magic.h; libc does not name it.
    let ramfs = FsType(0x8584_58f6);
    fstatfs(f).is_ok_and(|s| [TMPFS_MAGIC, ramfs].contains(&s.filesystem_type()))
}

/// Runs a positioned read or write of all of `len` bytes at `offset` (a short read stops at
/// the end of the file): the byte count, or a negative errno, as a ring completion has it (a
/// failure after some bytes moved reports the failure, as the ring's short transfers do: a
/// write reaching a full filesystem says ENOSPC, not a count its caller could only call EIO).
fn copy_all(
    len: usize,
    offset: u64,
    mut step: impl FnMut(usize, u64) -> std::io::Result<usize>,
) -> i32 {
    let mut done = 0;
    while done < len {
        match step(done, offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return -e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
    done as i32
}

/// Creates `path`, sparse, of `size` bytes: the daemon's user's alone whatever the umask (an
/// export's or a pool's data), it and its name durable before anything is written to it (a
/// flush later syncs the data, not necessarily a new file's directory entry).
pub fn create_sparse(path: &Path, size: u64) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.set_len(size)?;
    f.sync_all()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Gives the first `len` bytes of the regular file `file` blocks of their own (`fallocate`,
/// KEEP_SIZE): true if done, false where its filesystem has no `fallocate`.
pub fn reserve_start(file: &File, len: u64) -> std::io::Result<bool> {
    use nix::fcntl::{fallocate, FallocateFlags as F};
    match fallocate(file.as_fd(), F::FALLOC_FL_KEEP_SIZE, 0, len as libc::off_t) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EOPNOTSUPP) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Whether `fallocate` with `mode` (and KEEP_SIZE) works on `file`: tried on 4 KiB past its
/// end (`size`), where it changes nothing a reader sees.
fn fallocate_works(file: &File, size: u64, mode: nix::fcntl::FallocateFlags) -> bool {
    use nix::fcntl::{fallocate, FallocateFlags as F};
    fallocate(file.as_fd(), mode | F::FALLOC_FL_KEEP_SIZE, size as libc::off_t, 4096).is_ok()
}

impl FileDev {
    /// Opens `path`; creates a sparse file of `create_size` bytes if it does not exist.
    pub fn open(
        path: &Path,
        create_size: Option<u64>,
        read_only: bool,
    ) -> Result<FileDev, FileDevError> {
        let err = |source| FileDevError::Open { path: path.to_path_buf(), source };
        if let (Some(size), false) = (create_size, path.exists()) {
            create_sparse(path, size).map_err(err)?;
        }
        let (direct, mode) = sys::open_direct(path, read_only).map_err(err)?;
        if mode == CacheMode::Buffered {
            tracing::warn!(path = %path.display(), "filesystem refuses O_DIRECT; using buffered I/O");
        }
        let buffered = OpenOptions::new().read(true).write(!read_only).open(path).map_err(err)?;
        let is_block_device = sys::is_block_device(&direct).map_err(err)?;
        let size_bytes = media_size(&direct).map_err(err)?;
        if size_bytes == 0 {
            return Err(FileDevError::Empty { path: path.to_path_buf() });
        }
        let lbs = if is_block_device {
            u64::from(sys::block_device_logical_block_size(&direct).map_err(err)?)
        } else {
            1
        };
        let in_memory = !is_block_device && on_memory_filesystem(&direct);
        // Whether a discard zeroes (DLFEAT): a hole punched past the end changes nothing and
        // says whether the filesystem punches holes at all (ramfs gets zeros written instead).
        // Whether it zeroes ranges in place: probed first, past the end (where it may
        // preallocate a block the hole punched next gives back).
        use nix::fcntl::FallocateFlags as F;
        let zeroes_ranges = !is_block_device
            && !read_only
            && !in_memory
            && fallocate_works(&buffered, size_bytes, F::FALLOC_FL_ZERO_RANGE);
        let punches_holes = !is_block_device
            && (read_only
                || in_memory
                || fallocate_works(&buffered, size_bytes, F::FALLOC_FL_PUNCH_HOLE));
        let mode_text = match (in_memory, mode) {
            (true, _) => "in memory: copied on the core",
            (false, CacheMode::Direct) => "O_DIRECT",
            (false, CacheMode::Buffered) => "buffered",
        };
        let info = DevInfo {
            min_block: lbs as u32,
            block_size: ALIGN as u32,
            read_only,
            backend: format!("file:{} ({mode_text})", path.display()),
            cheap_extents: false,
            stats_id: crate::stats::device_id(),
        };
        let size_bytes = AtomicU64::new(size_bytes);
        let direct_reg = Registered::new(direct.as_raw_fd());
        Ok(FileDev {
            direct,
            direct_reg,
            buffered,
            info,
            size_bytes,
            is_block_device,
            lbs,
            in_memory,
            punches_holes,
            zeroes_ranges,
            resizing: parking_lot::Mutex::new(()),
        })
    }

    /// The O_DIRECT descriptor (registered on this core) for aligned requests, the buffered
    /// one for the others.
    fn file_for(&self, cx: &mut Cx<'_>, offset: u64, len: u64) -> FileRef {
        if offset.is_multiple_of(ALIGN) && len.is_multiple_of(ALIGN) {
            cx.file_ref(&self.direct_reg)
        } else {
            FileRef::Raw(self.buffered.as_raw_fd())
        }
    }

    /// Zeroes `len` bytes at `offset` of a file in memory, on the core: the range is given
    /// back (a hole), and with `keep` taken again (what write-zeroes without unmapping asks
    /// for; tmpfs has no `FALLOC_FL_ZERO_RANGE`); a filesystem without `fallocate` (ramfs) gets
    /// zeros written. 0 or a negative errno, as a completion has it.
    fn zero_in_memory(&self, offset: u64, len: u64, keep: bool) -> i32 {
        use nix::fcntl::{fallocate, FallocateFlags as F};
        let (off, n) = (offset as libc::off_t, len as libc::off_t);
        let fd = self.buffered.as_fd();
        let r = fallocate(fd, F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE, off, n).and_then(
            |()| if keep { fallocate(fd, F::FALLOC_FL_KEEP_SIZE, off, n) } else { Ok(()) },
        );
        match r {
            Ok(()) => 0,
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
                let mut at = offset;
                while at < offset + len {
                    let step = (offset + len - at).min(ZEROS.len() as u64) as usize;
                    let r =
                        copy_all(step, at, |done, o| self.buffered.write_at(&ZEROS[done..step], o));
                    if r != step as i32 {
                        return if r < 0 { r } else { -libc::EIO };
                    }
                    at += step as u64;
                }
                0
            }
            Err(e) => -(e as i32),
        }
    }

    /// Cores whose rings hold this file registered.
    pub fn cores_registered(&self) -> usize {
        self.direct_reg.cores_registered()
    }
}

/// Size of a regular file or block device.
pub fn media_size(f: &File) -> std::io::Result<u64> {
    if sys::is_block_device(f)? {
        sys::block_device_size(f)
    } else {
        Ok(f.metadata()?.len())
    }
}

impl BlockDev for FileDev {
    fn info(&self) -> &DevInfo {
        &self.info
    }

    fn submit(&self, cx: &mut Cx<'_>, cmd: IoCmd, tag: u32) {
        let size = self.size_bytes();
        match cmd {
            IoCmd::Read { offset, mut buf } if self.in_memory => {
                assert!(in_range(offset, buf.len() as u64, size));
                let out = buf.as_mut_slice();
                let r = copy_all(out.len(), offset, |at, off| {
                    self.buffered.read_at(&mut out[at..], off)
                });
                cx.complete(tag, r, Owned::Buf(buf));
            }
            IoCmd::Write { offset, buf, fua: _ } if self.in_memory => {
                // FUA asks nothing more of memory than a write does.
                assert!(!self.info.read_only);
                assert!(in_range(offset, buf.len() as u64, size));
                let data = buf.as_slice();
                let r = copy_all(data.len(), offset, |at, off| {
                    self.buffered.write_at(&data[at..], off)
                });
                cx.complete(tag, r, Owned::Buf(buf));
            }
            IoCmd::Flush if self.in_memory => {
                let r = match self.buffered.sync_data() {
                    Ok(()) => 0,
                    Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                };
                cx.complete(tag, r, Owned::None);
            }
            IoCmd::Discard { offset, len } | IoCmd::WriteZeroes { offset, len, .. }
                if self.in_memory =>
            {
                assert!(!self.info.read_only);
                assert!(in_range(offset, len, size));
                let keep = matches!(cmd, IoCmd::WriteZeroes { may_unmap: false, .. });
                cx.complete(tag, self.zero_in_memory(offset, len, keep), Owned::None);
            }
            IoCmd::Read { offset, buf } => {
                assert!(in_range(offset, buf.len() as u64, size));
                let file = self.file_for(cx, offset, buf.len() as u64);
                cx.submit(Op::Read { file, buf, offset }, tag);
            }
            IoCmd::Write { offset, buf, fua } => {
                assert!(!self.info.read_only);
                assert!(in_range(offset, buf.len() as u64, size));
                let file = self.file_for(cx, offset, buf.len() as u64);
                cx.submit(Op::Write { file, buf, offset, fua }, tag);
            }
            IoCmd::Flush => {
                if self.info.read_only {
                    cx.complete(tag, 0, Owned::None);
                } else {
                    let file = cx.file_ref(&self.direct_reg);
                    cx.submit(Op::Fsync { file }, tag);
                }
            }
            IoCmd::Discard { offset, len } => {
                assert!(!self.info.read_only);
                assert!(in_range(offset, len, size));
                // Advisory: on a block device, the whole logical blocks inside the range (where
                // a hole punched is a zeroing that may unmap and never falls back: a device
                // without it answers EOPNOTSUPP, which front-ends take as a trim not done).
                let (start, end) =
                    (offset.next_multiple_of(self.lbs), (offset + len) / self.lbs * self.lbs);
                if end <= start {
                    return cx.complete(tag, 0, Owned::None);
                }
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let file = cx.file_ref(&self.direct_reg);
                cx.submit(Op::Fallocate { file, mode, offset: start, len: end - start }, tag);
            }
            IoCmd::WriteZeroes { offset, len, may_unmap } => {
                assert!(!self.info.read_only);
                assert!(in_range(offset, len, size));
                if !(offset.is_multiple_of(self.lbs) && len.is_multiple_of(self.lbs)) {
                    // Only whole logical blocks on a block device (its advertised minimum).
                    return cx.complete(tag, -libc::EINVAL, Owned::None);
                }
                // On a block device ZERO_RANGE zeroes on any device (falling back to writing
                // zeros); a hole punched there would fail where the device cannot unmap. On a
                // file, the mode its filesystem has: a hole where unmapping is allowed (or no
                // zeroing in place exists), else zeros in place.
                let punch = !self.is_block_device
                    && self.punches_holes
                    && (may_unmap || !self.zeroes_ranges);
                let mode =
                    if punch { libc::FALLOC_FL_PUNCH_HOLE } else { libc::FALLOC_FL_ZERO_RANGE }
                        | libc::FALLOC_FL_KEEP_SIZE;
                let file = cx.file_ref(&self.direct_reg);
                cx.submit(Op::Fallocate { file, mode, offset, len }, tag);
            }
        }
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    fn rescan(&self) -> std::io::Result<(u64, u64)> {
        let _one_at_a_time = self.resizing.lock();
        let old = self.size_bytes();
        let now = media_size(&self.direct)?;
        if now < old {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the medium shrank from {old} to {now} bytes"),
            ));
        }
        // Whole logical blocks (a block device's size is whole already; a file's lbs is 1).
        let now = now / self.lbs * self.lbs;
        self.size_bytes.store(now, Ordering::Release);
        Ok((old, now))
    }

    fn grow(&self, new_size: u64) -> std::io::Result<()> {
        let _one_at_a_time = self.resizing.lock();
        let old = self.size_bytes();
        if self.is_block_device || self.info.read_only {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "cannot resize a block device or read-only file",
            ));
        }
        if new_size < old {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "shrinking would drop data",
            ));
        }
        self.buffered.set_len(new_size)?;
        self.size_bytes.store(new_size, Ordering::Release);
        Ok(())
    }

    /// A file's allocated blocks, from one `fstat` (a block device: all of it).
    fn used_bytes(&self) -> u64 {
        let size = self.size_bytes();
        if self.is_block_device {
            return size;
        }
        use std::os::unix::fs::MetadataExt;
        self.buffered.metadata().map_or(size, |m| (m.blocks() * 512).min(size))
    }

    /// Stops seeking once it has `max` extents (each one or two `lseek`s on the core).
    fn extents(&self, offset: u64, len: u64, max: usize) -> std::io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size_bytes());
        let mut out = Vec::new();
        if self.is_block_device {
            push_extent(&mut out, Extent { len: end - offset, hole: false, zero: false });
            return Ok(out);
        }
        let fd = self.buffered.as_fd();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let data = match lseek(fd, pos as i64, Whence::SeekData) {
                Ok(d) => (d as u64).min(end),
                Err(nix::errno::Errno::ENXIO) => end,
                Err(e) => return Err(e.into()),
            };
            push_extent(&mut out, Extent { len: data - pos, hole: true, zero: true });
            if data >= end {
                break;
            }
            let hole = match lseek(fd, data as i64, Whence::SeekHole) {
                Ok(h) => (h as u64).min(end),
                Err(_) => end,
            };
            push_extent(&mut out, Extent { len: hole - data, hole: false, zero: false });
            pos = hole;
        }
        out.truncate(max);
        Ok(out)
    }

    fn flush_blocking(&self) -> std::io::Result<()> {
        if self.info.read_only {
            return Ok(());
        }
        self.direct.sync_data()
    }

    /// A block device zeroes always (the kernel writes zeros where the device has no
    /// offload); memory too; a file where its filesystem has one of the two modes.
    /// A file on a memory filesystem is zeroed on the core (a hole punched, or zeros written
    /// where that is refused): bounded per command. Elsewhere `fallocate` bounds its own work.
    fn effect_piece_max(&self) -> u64 {
        if self.in_memory {
            crate::blockdev::MEMORY_EFFECT_PIECE
        } else {
            u64::MAX
        }
    }

    fn zeroes_supported(&self) -> bool {
        self.is_block_device
            || self.in_memory
            || self.info.read_only
            || self.punches_holes
            || self.zeroes_ranges
    }

    /// On a block device the kernel may write the zeros (devices without an offload).
    fn zeroes_are_fast(&self, _may_unmap: bool) -> bool {
        !self.is_block_device
    }

    /// A block device's discard covers whole logical blocks, and may not be done at all; a
    /// filesystem without hole punching does none (EOPNOTSUPP, taken as a trim not done).
    fn discard_zeroes(&self) -> bool {
        self.punches_holes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::{Engine, EngineConfig, Msg, Task};
    use crossbeam_channel::Sender;
    use std::sync::Arc;

    /// Each completion's result and, for a read, the bytes read.
    type Seen = Vec<(i32, Vec<u8>)>;

    /// One request of a [`Runner`].
    #[derive(Clone)]
    enum Step {
        Write(u64, Vec<u8>),
        Read(u64, usize),
        Flush,
        /// Write zeroes without unmapping (the range stays allocated).
        Zero(u64, u64),
        Trim(u64, u64),
    }

    /// Runs `ops` on a core one after another; reports each completion's result and, for a
    /// read, the bytes read.
    struct Runner {
        dev: Arc<FileDev>,
        ops: Vec<Step>,
        next: usize,
        seen: Seen,
        report: Option<Sender<Seen>>,
    }

    impl Runner {
        fn submit_next(&mut self, cx: &mut Cx<'_>) {
            let Some(step) = self.ops.get(self.next).cloned() else {
                let _ = self.report.take().expect("once").send(std::mem::take(&mut self.seen));
                return;
            };
            let cmd = match step {
                Step::Flush => IoCmd::Flush,
                Step::Write(offset, d) => {
                    let mut buf = cx.buf_with_capacity(d.len());
                    buf.extend_from_slice(&d);
                    IoCmd::Write { offset, buf, fua: self.next.is_multiple_of(2) }
                }
                Step::Read(offset, len) => IoCmd::Read { offset, buf: cx.buf(len) },
                Step::Zero(offset, len) => IoCmd::WriteZeroes { offset, len, may_unmap: false },
                Step::Trim(offset, len) => IoCmd::Discard { offset, len },
            };
            self.dev.submit(cx, cmd, self.next as u32);
        }
    }

    impl Task for Runner {
        fn start(&mut self, cx: &mut Cx<'_>) {
            self.submit_next(cx);
        }
        fn on_completion(&mut self, cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned) {
            assert_eq!(tag as usize, self.next);
            let read = matches!(self.ops[self.next], Step::Read(..));
            let bytes = match owned.into_buf() {
                Some(b) if read => b.as_slice().to_vec(),
                _ => Vec::new(),
            };
            self.seen.push((result, bytes));
            self.next += 1;
            self.submit_next(cx);
        }
        fn flush(&mut self, _cx: &mut Cx<'_>) {}
        fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}
        fn is_done(&self) -> bool {
            self.report.is_none()
        }
    }

    /// Writes (aligned, unaligned, FUA or not), a flush, write zeroes (not unmapped) and reads
    /// through a real core; what the completions say, what the reads return, and whether the
    /// zeroed range is still allocated.
    fn run_on_a_core(path: &Path) -> (bool, Seen, bool) {
        let _ = std::fs::remove_file(path);
        let dev = Arc::new(FileDev::open(path, Some(1 << 20), false).expect("a file device"));
        let in_memory = dev.in_memory;
        let ops = vec![
            Step::Write(8192, vec![1u8; 4096]),
            Step::Write(12_345, vec![2u8; 100]),
            Step::Write(65_536, vec![3u8; 65_536]),
            Step::Flush,
            Step::Read(8192, 4096),
            Step::Read(12_288, 4096),
            Step::Read(65_536, 65_536),
            Step::Read(0, 4096),
            Step::Zero(69_632, 8192),
            Step::Trim(77_824, 4096),
            Step::Read(65_536, 16_384),
        ];
        let engine = Engine::start(EngineConfig::one_core_for_tests()).expect("an engine");
        let (tx, rx) = crossbeam_channel::bounded(1);
        let runner = Runner { dev, ops, next: 0, seen: Vec::new(), report: Some(tx) };
        let spawn = Msg::Spawn(Box::new(move |_cx: &mut Cx<'_>| Box::new(runner) as Box<dyn Task>));
        assert!(engine.handles()[0].send_blocking(spawn));
        let seen = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("a report");
        engine.shutdown();
        // 18 pages were written (2, 3 and 16-31) and one trimmed; the two zeroed are among them
        // and must stay (a hole punched and not taken again would leave 15).
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(path).expect("the file").blocks() * 512 >= 17 * 4096;
        let _ = std::fs::remove_file(path);
        (in_memory, seen, allocated)
    }

    /// A file on tmpfs is served by copies on the core, a file on a disk filesystem through
    /// the ring: the same completions and the same bytes either way (write zeroes included:
    /// tmpfs has no FALLOC_FL_ZERO_RANGE).
    #[test]
    fn a_file_in_memory_is_copied_on_the_core_with_the_rings_results() {
        let name = format!("ballast-filedev-{}", std::process::id());
        let mut piece = vec![0u8; 4096];
        piece[12_345 - 12_288..12_345 - 12_288 + 100].fill(2);
        let want: Seen = vec![
            (4096, vec![]),
            (100, vec![]),
            (65_536, vec![]),
            (0, vec![]),
            (4096, vec![1; 4096]),
            (4096, piece),
            (65_536, vec![3; 65_536]),
            (4096, vec![0; 4096]),
            (0, vec![]),
            (0, vec![]),
            (16_384, [[3; 4096], [0; 4096], [0; 4096], [0; 4096]].concat()),
        ];
        // Wherever the temporary directory is, and on tmpfs wherever the machine has one.
        let (_, seen, allocated) = run_on_a_core(&std::env::temp_dir().join(&name));
        assert!(seen == want, "completions or bytes differ in the temporary directory");
        assert!(allocated, "write zeroes without unmapping leaves the range allocated");
        let tmpfs = ["/dev/shm", "/run"].into_iter().map(Path::new).find(|d| {
            std::fs::File::open(d).is_ok_and(|f| on_memory_filesystem(&f))
                && std::fs::metadata(d).is_ok_and(|m| !m.permissions().readonly())
        });
        match tmpfs {
            Some(dir) => {
                let (in_memory, seen, allocated) = run_on_a_core(&dir.join(&name));
                assert!(in_memory, "a file on tmpfs ({}) is copied on the core", dir.display());
                assert!(seen == want, "tmpfs: completions or bytes differ");
                assert!(allocated, "tmpfs: write zeroes without unmapping leaves it allocated");
            }
            None => eprintln!("no tmpfs at /dev/shm or /run: only the ring's path was tested"),
        }
    }
}

#[cfg(test)]
mod extent_tests {
    use super::*;

    /// A file of data and holes in turn: at most `max` extents, in order, a prefix.
    #[test]
    fn extents_stop_seeking_at_the_most_asked_for() {
        let path = std::env::temp_dir().join(format!("ballast-extents-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let dev = FileDev::open(&path, Some(16 << 20), false).expect("a file device");
        for i in (0..16u64).step_by(2) {
            dev.buffered.write_at(&[7u8; 4096], i << 20).expect("a write");
        }
        let all = dev.extents(0, 16 << 20, usize::MAX).expect("extents");
        let three = dev.extents(0, 16 << 20, 3).expect("extents");
        let _ = std::fs::remove_file(&path);
        if all.len() < 4 {
            eprintln!("this filesystem reports no holes: only the bound was checked");
        } else {
            assert_eq!(three[..], all[..3], "the first three, in order");
        }
        assert!(three.len() <= 3);
        assert!(all.iter().map(|e| e.len).sum::<u64>() == 16 << 20);
    }

    /// A file's used bytes come from its allocated blocks (one `fstat`, however fragmented).
    #[test]
    fn used_bytes_are_the_allocated_blocks() {
        let path = std::env::temp_dir().join(format!("ballast-used-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let dev = FileDev::open(&path, Some(64 << 20), false).expect("a file device");
        assert!(dev.used_bytes() < 64 << 10, "a new sparse file uses (almost) nothing");
        for i in 0..256u64 {
            dev.buffered.write_at(&[7u8; 4096], i << 18).expect("a write");
        }
        let used = dev.used_bytes();
        let _ = std::fs::remove_file(&path);
        // 256 blocks of 4 KiB; a filesystem may allocate more around each, never less.
        assert!((1 << 20..=16 << 20).contains(&used), "{used} bytes used");
    }

    /// A file grown from outside is served at its new size after a rescan; one that shrank
    /// keeps the size it had (and says so).
    #[test]
    fn rescan_takes_growth_and_refuses_shrinking() {
        let path = std::env::temp_dir().join(format!("ballast-rescan-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let dev = FileDev::open(&path, Some(1 << 20), false).expect("a file device");
        assert_eq!(dev.rescan().expect("unchanged"), (1 << 20, 1 << 20));
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(3 << 20).unwrap();
        assert_eq!(dev.rescan().expect("grown"), (1 << 20, 3 << 20));
        assert_eq!(dev.size_bytes(), 3 << 20);
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(2 << 20).unwrap();
        let e = dev.rescan().expect_err("shrunk");
        assert!(e.to_string().contains("shrank from 3145728 to 2097152"), "{e}");
        assert_eq!(dev.size_bytes(), 3 << 20);
        let _ = std::fs::remove_file(&path);
    }
}

#[cfg(test)]
mod fixed_tests {
    use super::*;
    use crate::reactor::{Cx, Engine, EngineConfig, Msg, Task};
    use crate::stats::StatsSnapshot;
    use ballast_ffi::FixedConfig;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// Writes then reads back 64 KiB at 0 and 4 KiB at 12,345 (unaligned) on `dev`, then
    /// flushes and trims; reports whether every result and byte was right.
    struct Check {
        dev: Arc<FileDev>,
        step: u32,
        ok: bool,
        report: Option<crossbeam_channel::Sender<bool>>,
    }

    impl Check {
        fn next(&mut self, cx: &mut Cx<'_>) {
            let cmd = match self.step {
                0 => {
                    let mut buf = cx.buf_with_capacity(65_536);
                    buf.extend_from_slice(&[0x5a; 65_536]);
                    IoCmd::Write { offset: 0, buf, fua: false }
                }
                1 => IoCmd::Read { offset: 0, buf: cx.buf(65_536) },
                2 => {
                    let mut buf = cx.buf_with_capacity(4096);
                    buf.extend_from_slice(&[0x6b; 4096]);
                    IoCmd::Write { offset: 12_345, buf, fua: true }
                }
                3 => IoCmd::Read { offset: 12_345, buf: cx.buf(4096) },
                4 => IoCmd::Flush,
                5 => IoCmd::Discard { offset: 1 << 20, len: 1 << 20 },
                _ => {
                    let _ = self.report.take().expect("once").send(self.ok);
                    return;
                }
            };
            self.dev.submit(cx, cmd, self.step);
        }
    }

    impl Task for Check {
        fn start(&mut self, cx: &mut Cx<'_>) {
            self.next(cx);
        }
        fn on_completion(&mut self, cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned) {
            assert_eq!(tag, self.step);
            let want = [65_536, 65_536, 4096, 4096, 0, 0][tag as usize];
            self.ok &= result == want;
            if let (1 | 3, Some(b)) = (tag, owned.into_buf()) {
                let byte = if tag == 1 { 0x5a } else { 0x6b };
                // The unaligned write landed over the aligned one's bytes from 12,345.
                self.ok &= b.as_slice().iter().all(|&x| x == byte);
                cx.recycle(b);
            }
            self.step += 1;
            self.next(cx);
        }
        fn flush(&mut self, _cx: &mut Cx<'_>) {}
        fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}
        fn is_done(&self) -> bool {
            self.report.is_none()
        }
    }

    fn check(engine: &Engine, dev: &Arc<FileDev>) -> bool {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let task = Check { dev: dev.clone(), step: 0, ok: true, report: Some(tx) };
        let spawn = Msg::Spawn(Box::new(move |_cx: &mut Cx<'_>| Box::new(task) as Box<dyn Task>));
        assert!(engine.handles()[0].send_blocking(spawn));
        rx.recv_timeout(Duration::from_secs(20)).expect("a report")
    }

    fn stats(engine: &Engine) -> StatsSnapshot {
        let (tx, rx) = crossbeam_channel::bounded(1);
        assert!(engine.handles()[0].send_blocking(Msg::Stats(tx)));
        rx.recv_timeout(Duration::from_secs(5)).expect("stats")
    }

    /// The files this process's io_uring instances hold registered, as the kernel lists them
    /// (each ring's fdinfo, `UserFiles:`: a path or a bare name, by kernel version; empty
    /// slots as `<none>` on some). A ring busy at that instant may list none on older kernels.
    fn ring_files() -> Vec<String> {
        let mut out = Vec::new();
        let Ok(fds) = std::fs::read_dir("/proc/self/fd") else { return out };
        for fd in fds.flatten() {
            let ring = std::fs::read_link(fd.path())
                .is_ok_and(|l| l.as_os_str() == "anon_inode:[io_uring]");
            let info = format!("/proc/self/fdinfo/{}", fd.file_name().to_string_lossy());
            let Some(text) = ring.then(|| std::fs::read_to_string(info).ok()).flatten() else {
                continue;
            };
            let mut inside = false;
            for line in text.lines() {
                if line.starts_with("UserFiles:") {
                    inside = true;
                } else if inside && line.starts_with(' ') {
                    let name = line.split_once(':').map_or("", |(_, n)| n.trim());
                    if !name.is_empty() && name != "<none>" {
                        out.push(name.to_string());
                    }
                } else {
                    inside = false;
                }
            }
        }
        out
    }

    fn ring_holds(name: &str) -> bool {
        ring_files().iter().any(|f| f.ends_with(name))
    }

    /// A file's O_DIRECT descriptor is registered with the core's ring at its first
    /// submission, its buffers as they are submitted, and the right bytes come back; with a
    /// table of one file a second device goes as a plain descriptor and works the same; when
    /// a registered device is dropped the core — asleep — is woken to clear its slot: the
    /// kernel's own listing of the ring's files loses it well within the core's longest sleep
    /// (a missing wake-up shows as ~500 ms); the slot then holds the other device.
    #[test]
    fn a_files_descriptor_is_registered_per_core_and_closed_with_its_device() {
        // A directory on a disk filesystem: the temporary one, or else the build directory.
        let name = format!("ballast-fixedfile-{}", std::process::id());
        let build = Path::new(env!("CARGO_MANIFEST_DIR")).join("../build");
        let dir = [std::env::temp_dir(), build]
            .into_iter()
            .map(|d| d.join(&name))
            .find(|d| {
                let disk = std::fs::create_dir_all(d).is_ok()
                    && File::open(d).is_ok_and(|f| !on_memory_filesystem(&f));
                if !disk {
                    let _ = std::fs::remove_dir_all(d);
                }
                disk
            })
            .expect("a directory on a disk filesystem");
        let (na, nb) = (format!("{name}-a"), format!("{name}-b"));
        let a = Arc::new(FileDev::open(&dir.join(&na), Some(4 << 20), false).unwrap());
        let b = Arc::new(FileDev::open(&dir.join(&nb), Some(4 << 20), false).unwrap());
        assert!(!a.in_memory);
        let engine = Engine::start(EngineConfig {
            fixed: FixedConfig { files: 1, bufs: 8 },
            ..EngineConfig::one_core_for_tests()
        })
        .expect("an engine");
        let done = |engine: Engine| {
            engine.shutdown();
            let _ = std::fs::remove_dir_all(&dir);
        };

        assert!(check(&engine, &a), "device a: results or bytes wrong");
        let s = stats(&engine);
        if s.registration_failures > 0 {
            // Before Linux 5.19 (no sparse tables), or no lockable memory left.
            eprintln!("skipped: this kernel refused the registered tables ({s:?})");
            return done(engine);
        }
        assert_eq!(a.cores_registered(), 1);
        assert_eq!(s.files_registered, 1);
        // Aligned write and read, the flush and the trim name the registered file.
        assert_eq!(s.fixed_file_ops, 4, "{s:?}");
        assert!(s.fixed_buf_ops >= 2 && s.bufs_registered >= 1, "{s:?}");
        let listed = Instant::now();
        while !ring_holds(&na) && listed.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(ring_holds(&na), "the kernel lists a's file in the ring: {:?}", ring_files());

        assert!(check(&engine, &b), "device b: results or bytes wrong");
        let s = stats(&engine);
        assert_eq!(b.cores_registered(), 0, "the table of one file is full");
        assert_eq!(s.fixed_file_ops, 4, "b's operations went as descriptors");
        assert!(!ring_holds(&nb));

        // The stats request woke the core; with nothing to do it sleeps at once (poll_us 0)
        // for up to SLEEP_MAX (500 ms) unless woken: drop the device now.
        let _ = stats(&engine);
        let dropped = Instant::now();
        drop(a);
        while ring_holds(&na) && dropped.elapsed() < Duration::from_millis(400) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let took = dropped.elapsed();
        assert!(!ring_holds(&na), "the dropped device's file is still in the ring");
        assert!(took < Duration::from_millis(200), "cleared after {took:?}: the core slept on");
        assert_eq!(stats(&engine).files_registered, 0);
        // The slot is free again: b registers in it.
        assert!(check(&engine, &b));
        assert_eq!(b.cores_registered(), 1);
        assert!(ring_holds(&nb), "b's file now in the ring: {:?}", ring_files());
        done(engine);
    }
}
