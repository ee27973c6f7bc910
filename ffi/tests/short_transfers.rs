//! Short reads and writes go on from where they stopped: the caller of a ring sees the whole
//! length, the error that stopped the transfer, or a short count only at the end of the file.
//!
//! Its own test binary (one process, one test): it lowers the process's file size limit
//! (RLIMIT_FSIZE), which would cut the writes of any test running beside it.

use std::os::fd::AsRawFd;

use ballast_ffi::ring::{Completion, FileRef, FixedConfig, Op, Ring};
use ballast_ffi::IoBuf;
use nix::sys::resource::{setrlimit, Resource};

fn run(ring: &mut Ring, op: Op) -> Completion {
    ring.push(op, 7).unwrap();
    let mut out = Vec::new();
    while out.is_empty() {
        ring.submit_and_wait(None).unwrap();
        ring.reap(&mut out);
    }
    assert_eq!(out.len(), 1, "one operation, one completion");
    out.pop().unwrap()
}

fn filled(len: usize, byte: u8) -> IoBuf {
    let mut buf = IoBuf::zeroed(len);
    buf.as_mut_slice().fill(byte);
    buf
}

#[test]
fn short_transfers_go_on_to_their_end_or_their_error() {
    const LIMIT: u64 = 1 << 20;
    let dir = std::env::temp_dir().join(format!("ballast-short-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("f");
    // A file ending 10,000 bytes in: a read past that is short, whatever the kernel retries.
    std::fs::write(&path, vec![0x5au8; 10_000]).unwrap();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let f = FileRef::Raw(file.as_raw_fd());
    let mut ring = Ring::new(8).unwrap();

    // A read reaching the end of the file: what is there, once the rest read nothing.
    let c = run(&mut ring, Op::Read { file: f, buf: IoBuf::zeroed(16384), offset: 0 });
    assert_eq!(c.result, 10_000, "a read stops at the end of the file");
    let buf = c.owned.into_buf().unwrap();
    assert!(buf.as_slice()[..10_000].iter().all(|&b| b == 0x5a));
    let resumed = ring.counters().resumed;
    assert!(resumed >= 1, "the short read was submitted again for its rest");

    // The process may write no further than LIMIT (SIGXFSZ ignored, as the daemon does): a
    // write across it moves what fits, then its rest fails with EFBIG, which is what the
    // caller sees (a short count would leave it nothing better than EIO to say).
    ballast_ffi::sys::ignore_file_size_signal().unwrap();
    setrlimit(Resource::RLIMIT_FSIZE, LIMIT, LIMIT).unwrap();
    let at = LIMIT - 16384;
    let c = run(&mut ring, Op::Write { file: f, buf: filled(65536, 0xc7), offset: at, fua: false });
    assert_eq!(c.result, -libc::EFBIG, "the error that stopped the write, not a short count");
    assert!(ring.counters().resumed > resumed, "the short write was submitted again");
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk.len() as u64, LIMIT, "the write moved what fit below the limit");
    assert!(on_disk[at as usize..].iter().all(|&b| b == 0xc7));

    // Writes wholly below the limit are whole.
    for len in [4096, 12288, 65536] {
        let c = run(&mut ring, Op::Write { file: f, buf: filled(len, 0x11), offset: 0, fua: true });
        assert_eq!(c.result, len as i32);
    }

    // The same through a registered file and a registered buffer: the rest goes on from the
    // right place inside the registered buffer (ReadFixed / WriteFixed at an offset).
    let mut fixed = Ring::with_fixed(8, FixedConfig { files: 1, bufs: 2 }).unwrap();
    if fixed.counters().registration_failures > 0 {
        eprintln!("registered part skipped: this kernel refused the registered tables");
    } else {
        let slot = fixed.register_file(file.as_raw_fd()).expect("a file slot");
        let f = FileRef::Fixed(slot);
        let before = fixed.counters().resumed;
        let c = run(
            &mut fixed,
            Op::Write { file: f, buf: filled(65536, 0x3c), offset: at, fua: false },
        );
        assert_eq!(c.result, -libc::EFBIG);
        assert!(c.owned.into_buf().unwrap().is_registered(), "a registered buffer went on");
        assert!(fixed.counters().resumed > before);
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[at as usize..].iter().all(|&b| b == 0x3c), "its first part landed");
        // A registered read across the end of the file: what is there.
        let end = LIMIT - 4096;
        let c = run(&mut fixed, Op::Read { file: f, buf: IoBuf::zeroed(65536), offset: end });
        assert_eq!(c.result, 4096, "a registered read stops at the end of the file");
        let buf = c.owned.into_buf().unwrap();
        assert!(buf.as_slice()[..4096].iter().all(|&b| b == 0x3c));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
