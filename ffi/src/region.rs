//! Memory for a RAM device: one anonymous mapping cut into chunks, each behind its own lock.
//!
//! The mapping is reserved whole at creation (`MAP_NORESERVE`: the kernel takes pages only as
//! they are written; under strict overcommit, `vm.overcommit_memory=2`, it is charged whole)
//! and asked to be backed by transparent huge pages (`MADV_HUGEPAGE`), as SPDK's malloc bdev
//! lives in huge pages: a 4 KiB request into a large device then costs no page walk of its own
//! (measured: a 4 KiB copy from a random block of 1 GiB, ~0.5 µs with 4 KiB pages, ~0.43 with
//! huge pages, on the 2-CPU VM). Where the kernel has no transparent huge pages it is ordinary
//! memory. What huge pages change: the first write into each 2 MiB takes 2 MiB (a sparse
//! device's writes can hold up to 32x the memory 64 KiB chunks held), and that first write may
//! wait for the kernel to compact memory for the huge page (its `defrag` setting decides).
//!
//! A range of present chunks can be *lent* ([`Region::lend_on`]): a [`Lent`] names the bytes
//! and keeps the mapping alive, and a send hands its address to the kernel, which copies the
//! bytes into the socket when the send goes — no copy of ours first (a 4 KiB read's own copy
//! and chunk lock were ~16% of the daemon at QD32). Nothing of ours ever reads lent bytes.
//! A lent range keeps the mapping through its core's [`Keeper`], so lending on many cores at
//! once counts on no cache line two cores write.
//!
//! Invariants:
//! - the mapping ([`Mapping`]) is a private anonymous one of `len` bytes (a whole number of
//!   chunks), aligned to `HUGE`, unmapped when the region and every range lent from it are
//!   gone;
//! - every byte of the mapping is only touched by our code with its chunk's lock held: read
//!   under the read lock, written under the write lock — so no two threads ever race on a byte.
//!   The kernel's copy of a lent range takes no lock: a send concurrent with an overlapping
//!   write may carry a mix of old and new bytes (as the kernel's own page-cache reads and
//!   SPDK's malloc bdev may); a read that completes after a write completed sees that write;
//! - a chunk that is not present holds only zeros (the mapping starts zero, and a chunk made
//!   absent is given back with `MADV_DONTNEED`, which zeroes it), so writing into an absent
//!   chunk needs no clearing first. A chunk inside a huge page splits it; the kernel frees the
//!   pages as it splits, and may later gather the range into a huge page again.
//! - chunks are whole pages (asserted), so giving one back never touches its neighbours.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

/// The alignment asked of the mapping: the x86-64 huge page.
pub const HUGE: usize = 2 << 20;

/// The reserved mapping: its address and length, unmapped when the last holder drops.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a mapping is an address range, not data: our code reaches its bytes only through the
// region's chunk locks (module invariants) and hands lent ranges only to the kernel.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping `Region::new` made; the region and every `Lent` (through its
        // core's `Keeper`) hold it by `Arc`: once the last drops nothing refers to it, and no
        // send the kernel still copies from it is in flight (a batch holds its `Lent` until its
        // completion is reaped).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// One core's hold on the mapping, on a cache line of its own: the reference count a lent
/// range takes and gives back is its core's, not the mapping's, which every core serving the
/// region would otherwise write twice per read.
#[repr(align(128))]
struct Keeper(Arc<Mapping>);

/// Keepers per region: cores beyond this share them (correct, only no longer apart).
const KEEPERS: usize = 64;

/// Bytes of a region lent for a send ([`Region::lend_on`]): the kernel copies them when the
/// send goes. Holding one keeps the mapping alive; nothing of ours reads through it.
pub struct Lent {
    map: Arc<Keeper>,
    off: usize,
    len: usize,
}

impl Lent {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of byte `at` of the range, for an iovec the kernel reads.
    pub(crate) fn addr_at(&self, at: usize) -> *mut libc::c_void {
        assert!(at <= self.len, "past the lent range");
        // In bounds: off + len <= map.len (checked by `Region::lend`).
        self.map.0.base.as_ptr().wrapping_add(self.off + at).cast()
    }
}

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lent").field("off", &self.off).field("len", &self.len).finish()
    }
}

/// A chunked memory region (see the module header).
pub struct Region {
    map: Arc<Mapping>,
    /// Per core (modulo [`KEEPERS`]): what the ranges it lends hold.
    keepers: Box<[Arc<Keeper>]>,
    chunk: usize,
    /// Per chunk: the lock its bytes are touched under.
    locks: Vec<RwLock<()>>,
    /// Per chunk, a bit: whether it holds data (clear: all zero, its pages maybe given back).
    /// Changed only under the chunk's write lock; read without it where a stale answer is
    /// only as stale as a concurrent request (2 KiB per GiB in 64 KiB chunks: it stays in
    /// cache, where a lock table does not — the lock's first load was 91% of `lend`).
    present: Vec<AtomicU64>,
}

impl Region {
    /// Reserves `len` bytes (rounded up to whole chunks of `chunk` bytes, a power of two and a
    /// multiple of the page size), all chunks absent.
    pub fn new(len: usize, chunk: usize) -> io::Result<Region> {
        // A chunk given back with MADV_DONTNEED must not share a page with its neighbours.
        // SAFETY: sysconf reads a constant of the system; no pointers.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        assert!(chunk.is_power_of_two() && chunk.is_multiple_of(page), "chunk {chunk}");
        let count = len.max(1).div_ceil(chunk);
        let len = count
            .checked_mul(chunk)
            .filter(|l| l.checked_add(HUGE).is_some())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // The chunks' locks and bits first: a size whose tables cannot be had is an error too.
        let enomem = |_| io::Error::from_raw_os_error(libc::ENOMEM);
        let mut locks = Vec::new();
        locks.try_reserve_exact(count).map_err(enomem)?;
        locks.extend((0..count).map(|_| RwLock::new(())));
        let mut present = Vec::new();
        present.try_reserve_exact(count.div_ceil(64)).map_err(enomem)?;
        present.extend((0..count.div_ceil(64)).map(|_| AtomicU64::new(0)));
        let span = len + HUGE;
        // SAFETY: a fresh private anonymous mapping with no address hint and no descriptor;
        // the result is checked against MAP_FAILED before use.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(HUGE);
        let (head, tail) = (aligned - start, start + span - (aligned + len));
        // SAFETY: both ranges lie inside the mapping just made, outside [aligned, aligned+len),
        // and nothing refers to them; unmapping a zero-length range is skipped.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        let base = aligned as *mut u8;
        // Huge pages where the kernel offers them; without (EINVAL) the region is still memory.
        // SAFETY: advice on the mapping this value owns; it changes no contents.
        unsafe { libc::madvise(base.cast(), len, libc::MADV_HUGEPAGE) };
        let Some(base) = NonNull::new(base) else {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        };
        let map = Arc::new(Mapping { base, len });
        let keepers = (0..KEEPERS).map(|_| Arc::new(Keeper(Arc::clone(&map)))).collect();
        Ok(Region { map, keepers, chunk, locks, present })
    }

    /// Bytes reserved (whole chunks).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len
    }

    #[cfg(test)]
    fn chunks(&self) -> usize {
        self.locks.len()
    }

    /// Whether chunk `idx` holds data.
    pub fn present(&self, idx: usize) -> bool {
        self.present[idx / 64].load(Ordering::Acquire) & (1 << (idx % 64)) != 0
    }

    /// Marks chunk `idx` present or absent; its write lock is held by the caller.
    fn set_present(&self, idx: usize, present: bool) {
        let (word, bit) = (&self.present[idx / 64], 1u64 << (idx % 64));
        if present {
            word.fetch_or(bit, Ordering::Release);
        } else {
            word.fetch_and(!bit, Ordering::Release);
        }
    }

    /// The bytes `within..within + len` of chunk `idx`, its lock held by the caller.
    fn range(&self, idx: usize, within: usize, len: usize) -> *mut u8 {
        assert!(within.checked_add(len).is_some_and(|end| end <= self.chunk), "past the chunk");
        assert!(idx < self.locks.len());
        // In bounds: idx * chunk + within + len <= count * chunk == the mapping's length.
        self.map.base.as_ptr().wrapping_add(idx * self.chunk + within)
    }

    /// Lends `len` bytes from `offset` for a send, if every chunk they touch is present (an
    /// absent chunk's zeros are cheaper to write than to fault in: a read fault there would map
    /// the zero page, and a later write into that 2 MiB would then get small pages). `None`:
    /// copy with [`Region::read`] instead.
    /// Lent on core `core`, whose [`Keeper`] the range holds.
    pub fn lend_on(&self, core: usize, offset: usize, len: usize) -> Option<Lent> {
        let end = offset.checked_add(len).filter(|&e| e <= self.map.len && len > 0)?;
        let shift = self.chunk.trailing_zeros();
        let (first, last) = (offset >> shift, (end - 1) >> shift);
        if !(first..=last).all(|idx| self.present(idx)) {
            return None;
        }
        Some(Lent { map: Arc::clone(&self.keepers[core % KEEPERS]), off: offset, len })
    }

    /// [`Region::lend_on`] core 0.
    pub fn lend(&self, offset: usize, len: usize) -> Option<Lent> {
        self.lend_on(0, offset, len)
    }

    /// Copies chunk `idx`'s bytes from `within` into `dst`; zeros if it is absent. Returns
    /// whether it was present.
    pub fn read(&self, idx: usize, within: usize, dst: &mut [u8]) -> bool {
        let _held = self.locks[idx].read();
        if !self.present(idx) {
            dst.fill(0);
            return false;
        }
        let src = self.range(idx, within, dst.len());
        // SAFETY: `src` points at dst.len() bytes inside the mapping (checked by `range`), which
        // are initialised (anonymous memory reads as zero); the chunk's read lock is held, so no
        // writer touches them; `dst` is a distinct Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        true
    }

    /// Copies `src` into chunk `idx` from `within`; the chunk is present afterwards.
    pub fn write(&self, idx: usize, within: usize, src: &[u8]) {
        let _held = self.locks[idx].write();
        let dst = self.range(idx, within, src.len());
        // SAFETY: `dst` points at src.len() bytes inside the mapping (checked by `range`); the
        // chunk's write lock is held, so nothing else reads or writes them; `src` is a distinct
        // Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        self.set_present(idx, true);
    }

    /// Zeroes `len` bytes of chunk `idx` from `within`. With `unmap` and the whole chunk, the
    /// chunk becomes absent and its pages are given back (`MADV_DONTNEED`; inside a huge page,
    /// as the kernel splits it); without `unmap`, an absent chunk becomes present ("fully
    /// provisioned": the zeros are written, its pages taken).
    pub fn zero(&self, idx: usize, within: usize, len: usize, unmap: bool) {
        let _held = self.locks[idx].write();
        let present = self.present(idx);
        let at = self.range(idx, within, len);
        if unmap && len == self.chunk {
            if present {
                // SAFETY: the whole chunk, inside the mapping, its write lock held: nothing
                // refers to its bytes; MADV_DONTNEED on private anonymous memory makes them read
                // as zero from now on (the module invariant for absent chunks).
                let r = unsafe { libc::madvise(at.cast(), len, libc::MADV_DONTNEED) };
                if r != 0 {
                    // Not given back: clear it by hand, so the invariant holds all the same.
                    // SAFETY: as above.
                    unsafe { std::ptr::write_bytes(at, 0, len) };
                }
            }
            self.set_present(idx, false);
        } else if present {
            // SAFETY: `len` bytes inside the mapping (checked by `range`), the write lock held.
            unsafe { std::ptr::write_bytes(at, 0, len) };
        } else if !unmap {
            // "Fully provisioned": the zeros are written, so the pages are taken now (and a
            // lent read of them finds memory, not the zero page).
            // SAFETY: `len` bytes inside the mapping (checked by `range`), the write lock held.
            unsafe { std::ptr::write_bytes(at, 0, len) };
            self.set_present(idx, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: usize = 64 * 1024;

    #[test]
    fn chunks_start_absent_and_read_zero() {
        let r = Region::new(3 * CHUNK + 1, CHUNK).unwrap();
        assert_eq!((r.len(), r.chunks()), (4 * CHUNK, 4));
        assert_eq!(r.map.base.as_ptr() as usize % HUGE, 0, "aligned to a huge page");
        let mut b = [7u8; 100];
        assert!(!r.read(3, CHUNK - 100, &mut b));
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn writes_read_back_and_whole_chunk_unmaps_give_zeros() {
        let r = Region::new(2 * CHUNK, CHUNK).unwrap();
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 13) as u8).collect();
        r.write(1, 8192, &data);
        assert!(r.present(1) && !r.present(0));
        let mut back = vec![0u8; 4096];
        assert!(r.read(1, 8192, &mut back));
        assert_eq!(back, data);
        // A partial zero keeps the chunk and clears the bytes.
        r.zero(1, 8192, 100, true);
        assert!(r.present(1));
        r.read(1, 8192, &mut back);
        assert!(back[..100].iter().all(|&x| x == 0) && back[100..] == data[100..]);
        // A whole-chunk unmap makes it absent; written again, the rest reads zero.
        r.zero(1, 0, CHUNK, true);
        assert!(!r.present(1));
        r.write(1, 0, &[1u8; 10]);
        let mut all = vec![9u8; CHUNK];
        r.read(1, 0, &mut all);
        assert!(all[..10].iter().all(|&x| x == 1) && all[10..].iter().all(|&x| x == 0));
        // Zeroing an absent chunk without unmap provisions it.
        r.zero(0, 0, CHUNK, false);
        assert!(r.present(0));
    }

    /// Presence is one bit per chunk, 64 to a word: each chunk's own, across words.
    #[test]
    fn presence_is_each_chunks_own() {
        let r = Region::new(130 * 4096, 4096).unwrap();
        for idx in [0, 63, 64, 127, 129] {
            r.write(idx, 0, &[1]);
        }
        let present: Vec<usize> = (0..130).filter(|&i| r.present(i)).collect();
        assert_eq!(present, [0, 63, 64, 127, 129]);
        r.zero(64, 0, 4096, true);
        r.zero(65, 0, 4096, false);
        let present: Vec<usize> = (0..130).filter(|&i| r.present(i)).collect();
        assert_eq!(present, [0, 63, 65, 127, 129]);
        assert!(r.lend(63 * 4096, 4096).is_some() && r.lend(63 * 4096, 4097).is_none());
    }

    /// Ranges lent on different cores count on their cores' keepers, never on the mapping's
    /// count; each keeper sits on its own cache line; a lent range outlives the region.
    #[test]
    fn ranges_lent_count_on_their_cores_keeper() {
        let r = Region::new(2 * CHUNK, CHUNK).unwrap();
        r.write(0, 0, &[5u8; 4096]);
        let mapping_count = Arc::strong_count(&r.map);
        assert_eq!(mapping_count, 1 + KEEPERS);
        let lent: Vec<Lent> = (0..8).map(|core| r.lend_on(core, 0, 4096).unwrap()).collect();
        let extra = r.lend_on(3, 100, 10).unwrap();
        assert_eq!(Arc::strong_count(&r.map), mapping_count, "the mapping's count untouched");
        assert_eq!(Arc::strong_count(&r.keepers[3]), 3, "core 3's keeper: the region's and two");
        assert_eq!(Arc::strong_count(&r.keepers[2]), 2);
        assert!(Arc::ptr_eq(&r.lend_on(KEEPERS + 3, 0, 1).unwrap().map, &r.keepers[3]));
        let (a, b) = (Arc::as_ptr(&r.keepers[0]) as usize, Arc::as_ptr(&r.keepers[1]) as usize);
        assert_eq!((a % 128, b % 128), (0, 0), "each keeper on its own cache lines");
        let base = r.map.base.as_ptr() as usize;
        drop(r);
        // The mapping stays while a lent range holds it.
        assert_eq!(extra.addr_at(0) as usize, base + 100);
        // SAFETY: the test reads back through the lent address: the mapping is still there.
        let byte = unsafe { *(lent[7].addr_at(4095) as *const u8) };
        assert_eq!(byte, 5);
    }

    #[test]
    fn a_region_too_large_is_an_error_not_a_panic() {
        assert!(Region::new(usize::MAX - 10, CHUNK).is_err());
        // 1 PiB in 4 KiB chunks: a lock table of 4 TiB, or more address space than there is.
        assert!(Region::new(1 << 50, 4096).is_err());
    }

    #[test]
    fn threads_write_and_read_their_chunks_at_once() {
        let r = std::sync::Arc::new(Region::new(8 * CHUNK, CHUNK).unwrap());
        let handles: Vec<_> = (0..4u8)
            .map(|t| {
                let r = std::sync::Arc::clone(&r);
                std::thread::spawn(move || {
                    let mut back = [0u8; 512];
                    for i in 0..2000usize {
                        let idx = (i + t as usize) % 8;
                        r.write(idx, (t as usize) * 512, &[t + 1; 512]);
                        r.read(idx, (t as usize) * 512, &mut back);
                        assert!(back.iter().all(|&x| x == t + 1));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
}
