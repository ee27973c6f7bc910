//! What the NVMe/TCP fuzz targets share: a counting global allocator and the [`AllocMeter`]
//! that fails a case (panics, so libFuzzer records a crash) when the decoding it wraps has
//! more bytes allocated at once, or in one allocation, than its bound.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use ballast_nvmf::fuzzing::Meter;

/// Bytes allocated now, the most since the meter last reset it, and the largest single one.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Relaxed).wrapping_add(size);
    PEAK.fetch_max(live, Relaxed);
    LARGEST.fetch_max(size, Relaxed);
}

/// `System`, counting. Install with `#[global_allocator]` in each target.
pub struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so this
// allocator keeps `System`'s guarantees; the counting touches only atomics and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller passes a block this allocator (that is, `System`) returned, with
        // its layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller passes a block `System` returned, its layout and a valid size.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            grew(new_size);
        }
        p
    }
}

/// Bounds the allocations of what it runs (libFuzzer calls targets on one thread).
pub struct AllocMeter;

impl Meter for AllocMeter {
    fn run<R>(&mut self, limit: usize, f: impl FnOnce() -> R) -> R {
        let base = LIVE.load(Relaxed);
        PEAK.store(base, Relaxed);
        LARGEST.store(0, Relaxed);
        let r = f();
        let peak = PEAK.load(Relaxed).saturating_sub(base);
        let largest = LARGEST.load(Relaxed);
        assert!(
            peak <= limit && largest <= limit,
            "unbounded allocation: {peak} bytes allocated at once (largest single allocation \
             {largest}) decoding input bounded to {limit}"
        );
        r
    }
}
