//! Memory backend: sparse chunks in one reserved mapping (`ballast_ffi::region`, on huge pages
//! where the kernel has them), shared by all cores.
//!
//! Invariants:
//! - the device is `CHUNK`-sized chunks; an absent chunk reads as zeros, is reported as a hole
//!   and its pages were never written or were given back (`MADV_DONTNEED`; inside a huge page
//!   the kernel frees them as it splits it); a chunk that is discarded whole becomes absent;
//! - memory is taken as written: with transparent huge pages, 2 MiB at a time (a sparse
//!   export's scattered writes hold up to 32x what 64 KiB chunks held; at most its size);
//! - each chunk has its own lock, held only for one copy; requests spanning chunks take them
//!   one at a time, in address order (no two locks are ever held together);
//! - reads of written ranges may be lent ([`BlockDev::lend`]) rather than copied: the socket
//!   send copies straight from the device's memory.

use ballast_ffi::region::{Lent, Region};
use ballast_ffi::Owned;

use crate::blockdev::{
    in_range, push_extent, BlockDev, DevInfo, Extent, IoCmd, MEMORY_EFFECT_PIECE,
};
use crate::reactor::Cx;

const CHUNK: u64 = 64 * 1024;

pub struct RamDev {
    mem: Region,
    size_bytes: u64,
    info: DevInfo,
}

impl RamDev {
    /// A device of `size_bytes`, all holes; its memory is reserved now and taken as written.
    /// A `read_only` one says so in its [`DevInfo`] (front-ends refuse writes before they
    /// reach it; it asserts that they did).
    pub fn try_new(size_bytes: u64, read_only: bool) -> std::io::Result<RamDev> {
        assert!(size_bytes > 0);
        let len = usize::try_from(size_bytes)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        let mem = Region::new(len, CHUNK as usize)?;
        let info = DevInfo {
            min_block: 1,
            block_size: 4096,
            read_only,
            backend: "ram".into(),
            cheap_extents: true,
            stats_id: crate::stats::device_id(),
        };
        Ok(RamDev { mem, size_bytes, info })
    }

    /// The same device announcing `min_block` as the smallest I/O it takes whole (a stand-in
    /// for a 4Kn disk or an `nvme:` namespace in the front-ends' tests).
    pub fn with_min_block(mut self, min_block: u32) -> RamDev {
        self.info.min_block = min_block;
        self
    }

    /// A writable [`RamDev::try_new`] for sizes that must fit (tests, fuzzers).
    pub fn new(size_bytes: u64) -> RamDev {
        RamDev::try_new(size_bytes, false).expect("reserving a RAM device's memory")
    }

    /// Calls `f(chunk index, offset in chunk, range in the request)` for each piece.
    fn pieces(offset: u64, len: u64, mut f: impl FnMut(usize, usize, std::ops::Range<usize>)) {
        Self::pieces_while(offset, len, |idx, within, range| {
            f(idx, within, range);
            true
        });
    }

    /// [`RamDev::pieces`] until `f` returns false.
    fn pieces_while(
        offset: u64,
        len: u64,
        mut f: impl FnMut(usize, usize, std::ops::Range<usize>) -> bool,
    ) {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let idx = (pos / CHUNK) as usize;
            let within = (pos % CHUNK) as usize;
            let step = (CHUNK - pos % CHUNK).min(end - pos);
            let req = (pos - offset) as usize;
            if !f(idx, within, req..req + step as usize) {
                return;
            }
            pos += step;
        }
    }

    fn read(&self, offset: u64, out: &mut [u8]) {
        Self::pieces(offset, out.len() as u64, |idx, within, range| {
            self.mem.read(idx, within, &mut out[range]);
        });
    }

    fn write(&self, offset: u64, data: &[u8]) {
        Self::pieces(offset, data.len() as u64, |idx, within, range| {
            self.mem.write(idx, within, &data[range]);
        });
    }

    /// Zeroes a range; with `unmap`, whole chunks are given back, otherwise they stay
    /// allocated (NBD_CMD_FLAG_NO_HOLE: "fully provisioned").
    fn zero(&self, offset: u64, len: u64, unmap: bool) {
        Self::pieces(offset, len, |idx, within, range| {
            self.mem.zero(idx, within, range.len(), unmap);
        });
    }
}

impl BlockDev for RamDev {
    fn info(&self) -> &DevInfo {
        &self.info
    }

    fn submit(&self, cx: &mut Cx<'_>, cmd: IoCmd, tag: u32) {
        let size = self.size_bytes;
        match cmd {
            IoCmd::Read { offset, mut buf } => {
                assert!(in_range(offset, buf.len() as u64, size));
                self.read(offset, buf.as_mut_slice());
                cx.complete(tag, buf.len() as i32, Owned::Buf(buf));
            }
            IoCmd::Write { offset, buf, fua: _ } => {
                assert!(!self.info.read_only);
                assert!(in_range(offset, buf.len() as u64, size));
                self.write(offset, buf.as_slice());
                cx.complete(tag, buf.len() as i32, Owned::Buf(buf));
            }
            IoCmd::Flush => cx.complete(tag, 0, Owned::None),
            IoCmd::Discard { offset, len }
            | IoCmd::WriteZeroes { offset, len, may_unmap: true } => {
                assert!(!self.info.read_only);
                assert!(in_range(offset, len, size));
                self.zero(offset, len, true);
                cx.complete(tag, 0, Owned::None);
            }
            IoCmd::WriteZeroes { offset, len, may_unmap: false } => {
                assert!(!self.info.read_only);
                assert!(in_range(offset, len, size));
                self.zero(offset, len, false);
                cx.complete(tag, 0, Owned::None);
            }
        }
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Zeroing is a memset on the core: bounded per command.
    fn effect_piece_max(&self) -> u64 {
        MEMORY_EFFECT_PIECE
    }

    fn extents(&self, offset: u64, len: u64, max: usize) -> std::io::Result<Vec<Extent>> {
        let len = len.min(self.size_bytes.saturating_sub(offset));
        let mut out = Vec::new();
        // Walked until a chunk would start extent `max + 1` (not over the rest of the range:
        // a block status over a whole large export stops where its reply does).
        Self::pieces_while(offset, len, |idx, _, range| {
            let present = self.mem.present(idx);
            push_extent(
                &mut out,
                Extent { len: range.len() as u64, hole: !present, zero: !present },
            );
            out.len() <= max
        });
        out.truncate(max);
        Ok(out)
    }

    /// Lends a range whose chunks are all written (others are copied: zeros are cheaper to
    /// write than to fault in).
    fn lend(&self, core: usize, offset: u64, len: u64) -> Option<Lent> {
        assert!(in_range(offset, len, self.size_bytes));
        self.mem.lend_on(core, usize::try_from(offset).ok()?, usize::try_from(len).ok()?)
    }

    /// Stores at once: memory is the media (FUA changes nothing).
    fn write_now(&self, offset: u64, data: &[u8]) -> bool {
        assert!(!self.info.read_only);
        assert!(in_range(offset, data.len() as u64, self.size_bytes));
        self.write(offset, data);
        true
    }

    /// Every chunk the range touches is absent (no allocation: reads ask this per request).
    fn is_unallocated(&self, offset: u64, len: u64) -> bool {
        if len == 0 || !in_range(offset, len, self.size_bytes) {
            return false;
        }
        let (first, last) = ((offset / CHUNK) as usize, ((offset + len - 1) / CHUNK) as usize);
        (first..=last).all(|idx| !self.mem.present(idx))
    }

    fn flush_blocking(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_read_write_zero() {
        let dev = RamDev::new(4 * CHUNK);
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        dev.write(CHUNK - 10, &data);
        let mut back = vec![0u8; data.len()];
        dev.read(CHUNK - 10, &mut back);
        assert_eq!(back, data);
        let ext = dev.extents(0, 4 * CHUNK, usize::MAX).unwrap();
        assert_eq!(ext[0], Extent { len: 3 * CHUNK, hole: false, zero: false });
        assert!(ext[1].hole);
        dev.zero(3 * CHUNK, CHUNK, false);
        assert!(!dev.extents(3 * CHUNK, CHUNK, usize::MAX).unwrap()[0].hole);
        dev.zero(CHUNK, CHUNK, true);
        let ext = dev.extents(CHUNK, CHUNK, usize::MAX).unwrap();
        assert_eq!(ext, vec![Extent { len: CHUNK, hole: true, zero: true }]);
        let mut one = [1u8; 1];
        dev.read(CHUNK + 5, &mut one);
        assert_eq!(one[0], 0);
    }

    /// At most `max` extents, in order: a prefix of the range.
    #[test]
    fn extents_stop_at_the_most_asked_for() {
        let dev = RamDev::new(8 * CHUNK);
        for idx in (0..8).step_by(2) {
            dev.write(idx * CHUNK, &[1u8; 16]);
        }
        assert_eq!(dev.extents(0, 8 * CHUNK, usize::MAX).unwrap().len(), 8);
        let three = dev.extents(0, 8 * CHUNK, 3).unwrap();
        let flags: Vec<bool> = three.iter().map(|e| e.hole).collect();
        assert_eq!((three.len(), flags), (3, vec![false, true, false]));
        assert!(three.iter().all(|e| e.len == CHUNK));
        assert_eq!(
            dev.extents(CHUNK, 7 * CHUNK, 1).unwrap(),
            vec![Extent { len: CHUNK, hole: true, zero: true }]
        );
    }

    /// Used bytes: exact for a device of few extents; beyond `USED_EXTENTS_MAX` of them what
    /// was not looked at counts as used (bounded work, an answer never below the truth).
    #[test]
    fn used_bytes_look_at_a_bounded_number_of_extents() {
        use crate::blockdev::USED_EXTENTS_MAX;
        let dev = RamDev::new(8 * CHUNK);
        dev.write(CHUNK, &[1u8; 16]);
        dev.write(5 * CHUNK, &[1u8; 16]);
        assert_eq!(dev.used_bytes(), 2 * CHUNK);
        let n = 4 * USED_EXTENTS_MAX as u64;
        let dev = RamDev::new(n * CHUNK);
        for idx in (0..n).step_by(2) {
            dev.write(idx * CHUNK, &[1u8; 16]);
        }
        let used = dev.used_bytes();
        assert!(used >= n / 2 * CHUNK && used < n * CHUNK, "{used}");
        assert_eq!(used, n * CHUNK - USED_EXTENTS_MAX as u64 / 2 * CHUNK);
    }

    /// Written ranges are lent, ranges touching an unwritten or trimmed chunk are copied.
    #[test]
    fn only_written_ranges_are_lent() {
        let dev = RamDev::new(4 * CHUNK);
        dev.write(CHUNK, &vec![5u8; 2 * CHUNK as usize]);
        assert_eq!(dev.lend(0, CHUNK, 2 * CHUNK).map(|l| l.len()), Some(2 * CHUNK as usize));
        assert_eq!(dev.lend(0, 2 * CHUNK - 1, 2).map(|l| l.len()), Some(2));
        assert!(dev.lend(0, CHUNK - 1, 2).is_none(), "chunk 0 was never written");
        assert!(dev.lend(0, 3 * CHUNK - 4096, 8192).is_none(), "chunk 3 was never written");
        dev.zero(2 * CHUNK, CHUNK, true);
        assert!(dev.lend(0, 2 * CHUNK, 4096).is_none(), "a trimmed chunk is absent");
        dev.zero(CHUNK, 4096, true);
        assert!(dev.lend(0, CHUNK, 4096).is_some(), "a partly zeroed chunk is still written");
    }

    /// A write stored at once reads back, across chunks, and makes its chunks written.
    #[test]
    fn writes_now_store_at_once() {
        let dev = RamDev::new(4 * CHUNK);
        let data: Vec<u8> = (0..9000u32).map(|i| (i * 31) as u8).collect();
        assert!(dev.write_now(CHUNK - 4000, &data));
        let mut back = vec![0u8; data.len()];
        dev.read(CHUNK - 4000, &mut back);
        assert_eq!(back, data);
        assert!(dev.lend(0, CHUNK - 4000, 9000).is_some(), "chunks 0 and 1 are written");
        assert!(dev.is_unallocated(2 * CHUNK, CHUNK));
    }

    #[test]
    fn unallocated_ranges_agree_with_the_extents() {
        let dev = RamDev::new(4 * CHUNK);
        dev.write(2 * CHUNK + 100, &[7u8; 10]);
        let cases = [
            (0, 1),
            (0, 2 * CHUNK),
            (CHUNK - 1, 2),
            (CHUNK, CHUNK + 1),
            (2 * CHUNK - 4096, 4096),
            (2 * CHUNK + 4096, 4096),
            (3 * CHUNK, CHUNK),
            (3 * CHUNK, CHUNK + 1),
            (4 * CHUNK, 1),
            (5, 0),
        ];
        for (offset, len) in cases {
            let by_extents = len > 0
                && in_range(offset, len, 4 * CHUNK)
                && dev.extents(offset, len, usize::MAX).unwrap()
                    == vec![Extent { len, hole: true, zero: true }];
            assert_eq!(dev.is_unallocated(offset, len), by_extents, "{offset} + {len}");
        }
        assert!(dev.is_unallocated(0, 2 * CHUNK));
        assert!(!dev.is_unallocated(2 * CHUNK + 4096, 4096), "the written chunk");
        assert!(!dev.is_unallocated(3 * CHUNK, CHUNK + 1), "past the end");
    }
}
