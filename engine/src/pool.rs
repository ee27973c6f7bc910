//! Per-core pool of I/O buffers, so the hot path does not allocate.
//!
//! Invariants:
//! - owned by one core, never shared; buffers handed out may be returned on the same core only
//!   (they always are: a request's buffer lives and dies on the connection's core);
//! - size classes are powers of two from `CLASS_MIN` to `CLASS_MAX`; larger buffers are
//!   allocated and freed directly;
//! - each class keeps at most `KEEP_PER_CLASS` buffers, so the pool is bounded.

use ballast_ffi::IoBuf;

const CLASS_MIN_SHIFT: u32 = 12; // 4 KiB
const CLASS_MAX_SHIFT: u32 = 20; // 1 MiB
const CLASSES: usize = (CLASS_MAX_SHIFT - CLASS_MIN_SHIFT + 1) as usize;
const KEEP_PER_CLASS: usize = 256;

#[derive(Default)]
pub struct BufPool {
    free: [Vec<IoBuf>; CLASSES],
    pub allocated: u64,
    pub reused: u64,
}

fn class_of_capacity(cap: usize) -> Option<usize> {
    let shift = cap.next_power_of_two().trailing_zeros().max(CLASS_MIN_SHIFT);
    (shift <= CLASS_MAX_SHIFT).then(|| (shift - CLASS_MIN_SHIFT) as usize)
}

impl BufPool {
    /// A buffer of capacity >= `cap` with length 0. Its bytes are initialised but arbitrary.
    pub fn get(&mut self, cap: usize) -> IoBuf {
        let Some(class) = class_of_capacity(cap) else {
            self.allocated += 1;
            return IoBuf::with_capacity(cap);
        };
        if let Some(mut buf) = self.free[class].pop() {
            self.reused += 1;
            buf.set_len(0);
            return buf;
        }
        self.allocated += 1;
        IoBuf::with_capacity(1 << (class as u32 + CLASS_MIN_SHIFT))
    }

    /// Returns a buffer for reuse (or frees it if its class is full or it has an odd size).
    pub fn put(&mut self, buf: IoBuf) {
        let cap = buf.capacity();
        if !cap.is_power_of_two() {
            return;
        }
        if let Some(class) = class_of_capacity(cap) {
            let list = &mut self.free[class];
            if list.len() < KEEP_PER_CLASS {
                list.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_by_class() {
        let mut pool = BufPool::default();
        let a = pool.get(100);
        assert_eq!(a.capacity(), 4096);
        pool.put(a);
        let b = pool.get(4000);
        assert_eq!(pool.reused, 1);
        assert_eq!(b.len(), 0);
        let big = pool.get(3 << 20);
        assert!(big.capacity() >= 3 << 20);
        let mid = pool.get(65537);
        assert_eq!(mid.capacity(), 128 * 1024);
    }
}
