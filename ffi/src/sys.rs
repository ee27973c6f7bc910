//! Small system interfaces: block-device ioctls, CPU affinity, eventfd, O_DIRECT opens, and the
//! io_uring availability diagnosis.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);

/// Size in bytes of an open block device (BLKGETSIZE64).
pub fn block_device_size(file: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`, live for
    // the duration of the call; the fd is valid because `file` is borrowed.
    unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(std::io::Error::from)?;
    Ok(size)
}

nix::ioctl_read_bad!(blksszget, libc::BLKSSZGET, libc::c_int);

/// Logical block size in bytes of an open block device (BLKSSZGET): the unit its discards and
/// zeroing take.
pub fn block_device_logical_block_size(file: &File) -> std::io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at `size`, live for
    // the duration of the call; the fd is valid because `file` is borrowed.
    unsafe { blksszget(file.as_raw_fd(), &mut size) }.map_err(std::io::Error::from)?;
    u32::try_from(size).ok().filter(|s| s.is_power_of_two()).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("logical block size {size}"))
    })
}

/// Whether `file` is a block device.
pub fn is_block_device(file: &File) -> std::io::Result<bool> {
    Ok(file.metadata()?.file_type().is_block_device())
}

/// How a file was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    Direct,
    /// The filesystem refused O_DIRECT (tmpfs, some FUSE): page cache in use.
    Buffered,
}

/// Opens read-write (or read-only) with O_DIRECT, falling back to buffered I/O only when the
/// filesystem refuses O_DIRECT with EINVAL.
pub fn open_direct(path: &Path, read_only: bool) -> std::io::Result<(File, CacheMode)> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(!read_only);
    match opts.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, CacheMode::Direct)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            Ok((opts.open(path)?, CacheMode::Buffered))
        }
        Err(e) => Err(e),
    }
}

/// The running kernel's version, major and minor (`/proc/sys/kernel/osrelease`), if readable.
pub fn kernel_version() -> Option<(u32, u32)> {
    parse_release(&std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?)
}

/// `"6.12.38+deb13-amd64"` → `(6, 12)`.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set)
}

/// CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect(),
        Err(_) => vec![0],
    }
}

/// Fills `buf` from the kernel's random number generator (getrandom(2), blocking until it is
/// seeded): no /dev needed, so it works in an empty chroot or a FROM-scratch container.
pub fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable slice; getrandom
        // writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// Returns the C heap's free memory at its top and in whole free pages to the system
/// (glibc's `malloc_trim(0)`); cheap when there is nothing to return. Called by an idle core
/// after connections went away, so their buffers do not stay resident.
pub fn malloc_trim() {
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory; it takes
    // the allocator's locks and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Ignores SIGXFSZ for the whole process: a write reaching the file size limit
/// (RLIMIT_FSIZE, `ulimit -f`) then fails with EFBIG, which the request reports (as ENOSPC to
/// its client), instead of the signal ending the daemon and every other client with it.
pub fn ignore_file_size_signal() -> nix::Result<()> {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: SIG_IGN installs no handler code, so nothing runs in signal context; it only
    // replaces SIGXFSZ's default action (which ends the process).
    unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) }.map(|_| ())
}

/// Ends the process now with `code` (`_exit(2)`): no exit handlers, no flushing of stdio —
/// for a thread that must not race the main thread running those itself.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit only ends the process; it touches no memory of ours and is async-signal
    // and thread safe, unlike exit(3).
    unsafe { libc::_exit(code) }
}

/// A non-blocking eventfd used to wake a sleeping reactor.
pub fn eventfd() -> std::io::Result<OwnedFd> {
    let efd = nix::sys::eventfd::EventFd::from_flags(
        nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
    )?;
    Ok(efd.into())
}

/// Adds one to an eventfd (wakes its reader). Errors (counter saturated) are harmless.
pub fn eventfd_signal(fd: &impl AsFd) {
    let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
}

/// Which of two kernel settings blocks io_uring, and how to change it.
pub fn io_uring_hint(err: &std::io::Error) -> String {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match (err.raw_os_error(), disabled) {
        (_, Some(2)) => "io_uring is disabled by sysctl kernel.io_uring_disabled=2; \
                         run `sysctl -w kernel.io_uring_disabled=0`"
            .into(),
        (Some(libc::EPERM), Some(1)) => "kernel.io_uring_disabled=1 allows io_uring only for the \
             group in kernel.io_uring_group; run ballast as root or set \
             `sysctl -w kernel.io_uring_disabled=0`"
            .into(),
        (Some(libc::EPERM), _) | (Some(libc::ENOSYS), _) => "io_uring is blocked by a seccomp \
             filter (Docker/containerd's default profile drops io_uring_setup): run the container \
             with a seccomp profile that allows io_uring_setup, io_uring_enter and \
             io_uring_register (e.g. --security-opt seccomp=unconfined), or a kernel >= 5.11"
            .into(),
        (Some(libc::ENOMEM), _) => "not enough locked memory for the ring: raise RLIMIT_MEMLOCK \
             (ulimit -l) or use a kernel >= 5.12"
            .into(),
        _ => "io_uring is unavailable on this kernel (needs Linux >= 5.11)".into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_releases_parse() {
        use super::{kernel_version, parse_release};
        assert_eq!(parse_release("6.12.38+deb13-amd64\n"), Some((6, 12)));
        assert_eq!(parse_release("6.1.0-37-amd64"), Some((6, 1)));
        assert_eq!(parse_release("6.18.44-fc-v1252-gpu"), Some((6, 18)));
        assert_eq!(parse_release("garbage"), None);
        assert!(kernel_version().is_some(), "this kernel's release parses");
    }

    #[test]
    fn random_bytes_fill_the_buffer() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        super::random_bytes(&mut a).unwrap();
        super::random_bytes(&mut b).unwrap();
        assert_ne!(a, [0u8; 64]);
        assert_ne!(a, b, "two draws of 512 bits differ");
    }

    use super::*;

    #[test]
    fn ring_round_trip_file_io() {
        use crate::{IoBuf, Op, Owned, Ring};
        let dir = std::env::temp_dir().join(format!("ballast-ffi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let (file, _) = open_direct(&path, false).unwrap();
        let mut ring = Ring::new(8).unwrap();
        let mut buf = IoBuf::zeroed(4096);
        buf.as_mut_slice().fill(0xab);
        ring.push(
            Op::Write { file: crate::FileRef::Raw(file.as_raw_fd()), buf, offset: 4096, fua: true },
            7,
        )
        .unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            ring.submit_and_wait(None).unwrap();
            ring.reap(&mut out);
        }
        assert_eq!(out[0].token, 7);
        assert_eq!(out[0].result, 4096);
        let file = crate::FileRef::Raw(file.as_raw_fd());
        ring.push(Op::Read { file, buf: IoBuf::zeroed(4096), offset: 4096 }, 8).unwrap();
        out.clear();
        while out.is_empty() {
            ring.submit_and_wait(None).unwrap();
            ring.reap(&mut out);
        }
        let Owned::Buf(b) = std::mem::replace(&mut out[0].owned, Owned::None) else { panic!() };
        assert!(b.as_slice().iter().all(|&x| x == 0xab));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod timer_tests {
    use crate::{Op, Ring};
    use std::time::{Duration, Instant};

    #[test]
    fn timer_fires_and_cancel_works() {
        let mut ring = Ring::new(8).unwrap();
        let start = Instant::now();
        ring.push(Op::Timer { after: Duration::from_millis(20) }, 1).unwrap();
        ring.push(Op::Timer { after: Duration::from_secs(60) }, 2).unwrap();
        ring.push(Op::Cancel { token: 2 }, 3).unwrap();
        let mut out = Vec::new();
        while out.len() < 3 {
            ring.submit_and_wait(Some(Duration::from_secs(5))).unwrap();
            ring.reap(&mut out);
        }
        let by = |t: u64| out.iter().find(|c| c.token == t).map(|c| c.result).unwrap();
        assert_eq!(by(1), -libc::ETIME);
        assert_eq!(by(2), -libc::ECANCELED);
        assert_eq!(by(3), 0);
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
