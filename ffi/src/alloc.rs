//! A global allocator that counts, per thread, the heap allocations made on it.
//!
//! `System`'s blocks, unchanged; each allocation (and each reallocation, which may move a
//! block) adds one to a counter of the calling thread's own: no atomic, nothing shared between
//! cores, a few instructions per allocation. `ballast serve` installs it, so each data core
//! can report how many allocations its turns made (`ballast stats`: `allocations`) and a test
//! can hold the per-I/O path to making none. In a binary that does not install it the
//! counters stay at zero.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// Allocations made on this thread through [`CountingAlloc`]. Const-initialised and
    /// without a destructor: reading or bumping it never allocates, at any point of a
    /// thread's life.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

#[inline]
fn counted() {
    ALLOCATIONS.with(|n| n.set(n.get() + 1));
}

/// Heap allocations and reallocations made on the calling thread so far (zero unless the
/// binary installs [`CountingAlloc`]).
pub fn thread_allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// `System`, counting each thread's allocations. Install with `#[global_allocator]`.
pub struct CountingAlloc;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so this
// allocator keeps `System`'s guarantees; the counting touches only a thread-local `Cell`
// (const-initialised, no destructor), which never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    // SAFETY: the trait's contract; the body forwards it to `System` unchanged.
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    // SAFETY: as for `alloc`.
    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        counted();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    // SAFETY: as for `alloc`.
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller passes a block this allocator (that is, `System`) returned, with
        // its layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    // SAFETY: as for `alloc`.
    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        counted();
        // SAFETY: the caller passes a block `System` returned, its layout and a valid size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_allocation_on_its_own_thread() {
        let a = CountingAlloc;
        let layout = Layout::from_size_align(64, 8).unwrap();
        let before = thread_allocations();
        // SAFETY: a non-zero layout; each block is freed once, with its layout.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            let p = a.realloc(p, layout, 128);
            assert!(!p.is_null());
            a.dealloc(p, Layout::from_size_align(128, 8).unwrap());
            let z = a.alloc_zeroed(layout);
            assert!(!z.is_null() && *z == 0);
            a.dealloc(z, layout);
        }
        assert_eq!(thread_allocations() - before, 3, "alloc, realloc, alloc_zeroed");
        let other = std::thread::spawn(thread_allocations).join().unwrap();
        assert_eq!(other, 0, "a new thread starts from zero (the test binary does not count)");
    }
}
