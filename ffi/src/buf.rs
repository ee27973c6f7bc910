//! Page-aligned heap buffers for disk and socket I/O.
//!
//! Invariants:
//! - `ptr` is aligned to `ALIGN` and points at `cap` bytes that were zero-initialised at
//!   allocation, so every byte in `0..cap` is always initialised;
//! - `len <= cap`;
//! - the allocation is owned uniquely; `IoBuf` is `Send` (moving it moves ownership);
//! - buffers of `MAP_MIN` bytes or more are private anonymous mappings of their own: the kernel
//!   hands them out zeroed and faults their pages in only as bytes are written, so a large
//!   buffer costs resident memory only for what was filled, and `munmap` returns all of it to
//!   the system at once (the C heap would keep it: glibc raises its mmap threshold after each
//!   large free, and freed heap memory stays resident). Smaller ones come from the heap.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use crate::fixed::FixedBuf;

/// Alignment of every buffer: the largest logical block size O_DIRECT may require.
pub const ALIGN: usize = 4096;
/// Capacity from which a buffer is a mapping of its own rather than a heap block.
pub const MAP_MIN: usize = 64 * 1024;

/// An owned, aligned byte buffer with a length (bytes in use) and a capacity.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    /// Its registration with a ring, if one registered it (returned when the buffer drops).
    fixed: Option<FixedBuf>,
}

// SAFETY: IoBuf uniquely owns its allocation (like Vec<u8>), so sending it to another thread
// transfers ownership with no shared aliasing.
unsafe impl Send for IoBuf {}
// SAFETY: &IoBuf only gives out &[u8]; no interior mutability.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A buffer of `cap` bytes (rounded up to `ALIGN`), all zero, with `len == 0`.
    pub fn with_capacity(cap: usize) -> IoBuf {
        let cap = cap.max(1).div_ceil(ALIGN) * ALIGN;
        let layout = Layout::from_size_align(cap, ALIGN).expect("IoBuf layout");
        let raw = if cap >= MAP_MIN {
            // SAFETY: an anonymous private mapping of `cap` bytes, no address hint, no fd; the
            // result is checked against MAP_FAILED before use.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    cap,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                std::alloc::handle_alloc_error(layout)
            }
            // Page-aligned (ALIGN is the page size) and zero-filled by the kernel.
            p.cast::<u8>()
        } else {
            // SAFETY: layout has non-zero size (cap >= ALIGN).
            unsafe { alloc_zeroed(layout) }
        };
        let Some(ptr) = NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        IoBuf { ptr, len: 0, cap, fixed: None }
    }

    /// A zero-filled buffer whose length is `len`.
    pub fn zeroed(len: usize) -> IoBuf {
        let mut buf = IoBuf::with_capacity(len);
        buf.len = len;
        buf
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length; every byte below `cap` is initialised, so this is safe.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "IoBuf::set_len {len} > cap {}", self.cap);
        self.len = len;
    }

    /// Appends bytes; panics if they do not fit (callers size buffers first).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        let end = self.len + bytes.len();
        assert!(end <= self.cap, "IoBuf overflow: {end} > {}", self.cap);
        let old = self.len;
        self.len = end;
        self.as_mut_slice()[old..end].copy_from_slice(bytes);
    }

    /// Drops the first `n` bytes in use, moving the rest to the front.
    pub fn consume_front(&mut self, n: usize) {
        assert!(n <= self.len);
        let len = self.len;
        self.full_mut().copy_within(n..len, 0);
        self.len = len - n;
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes and uniquely owned.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes past the length, up to the capacity (initialised), to be filled and then
    /// counted with [`IoBuf::set_len`].
    pub fn spare_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.full_mut()[len..]
    }

    /// The whole capacity, initialised bytes all.
    fn full_mut(&mut self) -> &mut [u8] {
        // SAFETY: every byte in 0..cap was zero-initialised at allocation.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }

    /// The ring registration this buffer carries, if any.
    pub(crate) fn fixed(&self) -> Option<&FixedBuf> {
        self.fixed.as_ref()
    }

    /// Records the buffer's registration (once: a buffer is registered with one ring).
    pub(crate) fn set_fixed(&mut self, fixed: FixedBuf) {
        assert!(self.fixed.is_none(), "an IoBuf registered twice");
        self.fixed = Some(fixed);
    }

    /// Whether a ring registered this buffer.
    pub fn is_registered(&self) -> bool {
        self.fixed.is_some()
    }

    /// The whole allocation as an iovec, for registering it.
    pub(crate) fn iovec(&mut self) -> libc::iovec {
        libc::iovec { iov_base: self.ptr.as_ptr().cast(), iov_len: self.cap }
    }

    /// Pointer to byte `offset` for the kernel; only the ring uses it, while it owns the buffer.
    pub(crate) fn raw_at(&mut self, offset: usize) -> *mut u8 {
        assert!(offset <= self.cap);
        // SAFETY: offset is within (or one past) the allocation.
        unsafe { self.ptr.as_ptr().add(offset) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // The memory goes now; a registration (the field, dropped after this) hands its slot
        // back to its ring, which unpins the pages (see `fixed`'s invariants).
        if self.cap >= MAP_MIN {
            // SAFETY: ptr/cap are exactly the mapping made in `with_capacity` (cap never
            // changes), unmapped once, here.
            let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.cap) };
            debug_assert_eq!(rc, 0, "munmap of an IoBuf mapping failed");
            return;
        }
        let layout = Layout::from_size_align(self.cap, ALIGN).expect("IoBuf layout");
        // SAFETY: ptr was allocated with exactly this layout and is freed once.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf {{ len: {}, cap: {} }}", self.len, self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_bounded() {
        let mut buf = IoBuf::with_capacity(100);
        assert_eq!(buf.capacity(), ALIGN);
        assert_eq!(buf.raw_at(0) as usize % ALIGN, 0);
        buf.set_len(ALIGN);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
        buf.set_len(3);
        buf.extend_from_slice(b"abc");
        assert_eq!(&buf.as_slice()[3..], b"abc");
        buf.consume_front(3);
        assert_eq!(buf.as_slice(), b"abc");
    }

    #[test]
    fn large_buffers_are_mappings_zeroed_and_writable() {
        let mut buf = IoBuf::zeroed(MAP_MIN * 4);
        assert_eq!(buf.raw_at(0) as usize % ALIGN, 0);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
        buf.as_mut_slice()[MAP_MIN * 4 - 1] = 7;
        buf.consume_front(MAP_MIN * 4 - 1);
        assert_eq!(buf.as_slice(), &[7]);
    }
}
