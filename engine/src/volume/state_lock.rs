//! The pool state's lock: shared by the cores' data-path decisions, exclusive for the pool's
//! own steps (commits, control operations, listings).
//!
//! A sharded reader-writer lock (`crossbeam_utils::sync::ShardedLock`): a reader locks only
//! the shard of its thread — one cache line per shard, so cores taking their round's shared
//! borrow no longer write one line that every core writes; a writer locks every shard in
//! order. Reads are the data path's (one per core and flush round with volume work); writes
//! are rare (a commit's seal and end, a control step, a listing), and cost one lock per shard.
//!
//! The daemon aborts on panic, so a poisoned shard is never seen; a guard is taken whatever
//! the poison (as `parking_lot`'s locks, which the pool state used before, do).

use std::sync::PoisonError;

use crossbeam_utils::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};

pub type StateRead<'a, T> = ShardedLockReadGuard<'a, T>;
pub type StateWrite<'a, T> = ShardedLockWriteGuard<'a, T>;

pub struct StateLock<T>(ShardedLock<T>);

impl<T> StateLock<T> {
    pub fn new(value: T) -> StateLock<T> {
        StateLock(ShardedLock::new(value))
    }

    /// A shared borrow: this thread's shard only.
    pub fn read(&self) -> StateRead<'_, T> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The exclusive borrow: every shard, in order.
    pub fn write(&self) -> StateWrite<'_, T> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Readers on several threads hold shared borrows at once; a writer waits for every one of
    /// them, and no reader gets in while it writes.
    #[test]
    fn a_writer_excludes_every_reader() {
        let lock = Arc::new(StateLock::new(0u64));
        let writing = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let (lock, writing) = (Arc::clone(&lock), Arc::clone(&writing));
                std::thread::spawn(move || {
                    let mut seen = 0;
                    for _ in 0..20_000 {
                        let r = lock.read();
                        assert!(!writing.load(Ordering::SeqCst), "a reader inside a write");
                        assert!(*r >= seen, "the value went back");
                        seen = *r;
                    }
                })
            })
            .collect();
        for _ in 0..2_000 {
            let mut w = lock.write();
            writing.store(true, Ordering::SeqCst);
            *w += 1;
            writing.store(false, Ordering::SeqCst);
        }
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(*lock.read(), 2_000);
    }
}
