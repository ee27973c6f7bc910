//! File and block-device backend: io_uring reads and writes with O_DIRECT.
//!
//! Invariants:
//! - aligned requests (offset, length and buffer on `ALIGN`) go to the O_DIRECT descriptor;
//!   unaligned ones go to a second, buffered descriptor of the same file, which the kernel keeps
//!   coherent with direct I/O (direct writes invalidate, direct reads write back first);
//! - flush is `fdatasync`, which covers writes completed through either descriptor and from
//!   every core, so one flush on any connection makes every completed write durable;
//! - discard and write-zeroes use `fallocate` (on a block device the kernel turns these into
//!   BLKDISCARD / BLKZEROOUT).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ballast_ffi::sys::{self, CacheMode};
use ballast_ffi::{Op, Owned};
use nix::unistd::{lseek, Whence};

use crate::blockdev::{in_range, push_extent, BlockDev, DevInfo, Extent, IoCmd};
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
    buffered: File,
    info: DevInfo,
    size_bytes: AtomicU64,
    is_block_device: bool,
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
            let f = OpenOptions::new().write(true).create_new(true).open(path).map_err(err)?;
            f.set_len(size).map_err(err)?;
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
        let mode_text = match mode {
            CacheMode::Direct => "O_DIRECT",
            CacheMode::Buffered => "buffered",
        };
        let info = DevInfo {
            min_block: 1,
            block_size: ALIGN as u32,
            read_only,
            backend: format!("file:{} ({mode_text})", path.display()),
            cheap_extents: false,
            stats_id: crate::stats::device_id(),
        };
        let size_bytes = AtomicU64::new(size_bytes);
        Ok(FileDev { direct, buffered, info, size_bytes, is_block_device })
    }

    fn fd_for(&self, offset: u64, len: u64, addr_aligned: bool) -> i32 {
        if addr_aligned && offset.is_multiple_of(ALIGN) && len.is_multiple_of(ALIGN) {
            self.direct.as_raw_fd()
        } else {
            self.buffered.as_raw_fd()
        }
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
            IoCmd::Read { offset, buf } => {
                assert!(in_range(offset, buf.len() as u64, size));
                let fd = self.fd_for(offset, buf.len() as u64, true);
                cx.submit(Op::Read { fd, buf, offset }, tag);
            }
            IoCmd::Write { offset, buf, fua } => {
                assert!(!self.info.read_only);
                assert!(in_range(offset, buf.len() as u64, size));
                let fd = self.fd_for(offset, buf.len() as u64, true);
                cx.submit(Op::Write { fd, buf, offset, fua }, tag);
            }
            IoCmd::Flush => {
                if self.info.read_only {
                    cx.complete(tag, 0, Owned::None);
                } else {
                    cx.submit(Op::Fsync { fd: self.direct.as_raw_fd() }, tag);
                }
            }
            IoCmd::Discard { offset, len }
            | IoCmd::WriteZeroes { offset, len, may_unmap: true } => {
                assert!(!self.info.read_only);
                assert!(in_range(offset, len, size));
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                cx.submit(Op::Fallocate { fd: self.direct.as_raw_fd(), mode, offset, len }, tag);
            }
            IoCmd::WriteZeroes { offset, len, may_unmap: false } => {
                assert!(!self.info.read_only);
                assert!(in_range(offset, len, size));
                let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
                cx.submit(Op::Fallocate { fd: self.direct.as_raw_fd(), mode, offset, len }, tag);
            }
        }
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    fn grow(&self, new_size: u64) -> std::io::Result<()> {
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

    fn extents(&self, offset: u64, len: u64) -> std::io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size_bytes());
        let mut out = Vec::new();
        if self.is_block_device {
            push_extent(&mut out, Extent { len: end - offset, hole: false, zero: false });
            return Ok(out);
        }
        let fd = self.buffered.as_fd();
        let mut pos = offset;
        while pos < end {
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
        Ok(out)
    }

    fn flush_blocking(&self) -> std::io::Result<()> {
        if self.info.read_only {
            return Ok(());
        }
        self.direct.sync_data()
    }
}
