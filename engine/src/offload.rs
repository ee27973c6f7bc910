//! Worker threads for CPU-heavy one-off work that must not stall a data core — a TLS
//! handshake's key exchange and signatures take milliseconds, during which every other
//! connection on the core would wait. A task hands a job over ([`crate::Cx::offload`]), goes on
//! serving its other events, and is completed with the tag it chose when the job is done.
//!
//! Invariants:
//! - bounded: `threads` threads (0: none, every job runs in place) and at most `queue` jobs
//!   waiting; a job the queue cannot take is handed back and runs in place on the core (slower
//!   for that core, never lost, never reordered with its completion);
//! - every accepted job runs exactly once, then wakes the task that gave it; the threads drain
//!   the queue before they exit, so a task parked on a job is always woken.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, TrySendError};

/// A job: the work, then its wake-up.
pub type Job = Box<dyn FnOnce() + Send>;

/// Default threads: handshakes are rare next to I/O; two keep a burst of reconnects (hundreds
/// of queues after a failover) off the data cores without taking many CPUs from them.
pub const THREADS_DEFAULT: usize = 2;
/// Default queue bound: jobs waiting for a thread; beyond it, work runs on the core.
pub const QUEUE_DEFAULT: usize = 1024;

pub struct Offload {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Offload {
    /// Starts `threads` workers sharing a queue of `queue` jobs.
    pub fn start(threads: usize, queue: usize) -> std::io::Result<Arc<Offload>> {
        if threads == 0 {
            return Ok(Arc::new(Offload { tx: None, threads: Vec::new() }));
        }
        let (tx, rx) = crossbeam_channel::bounded::<Job>(queue.max(1));
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = rx.clone();
            let thread = std::thread::Builder::new().name(format!("ballast-offload{i}")).spawn(
                move || {
                    for job in rx {
                        job();
                    }
                },
            )?;
            handles.push(thread);
        }
        Ok(Arc::new(Offload { tx: Some(tx), threads: handles }))
    }

    /// Queues `job`; hands it back if no thread exists or the queue is full.
    pub fn try_run(&self, job: Job) -> Result<(), Job> {
        let Some(tx) = &self.tx else { return Err(job) };
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => Err(job),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }
}

impl Drop for Offload {
    /// Lets the workers finish the queue, then joins them.
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn jobs_run_off_the_caller_and_all_run() {
        let pool = Offload::start(2, 64).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        let caller = std::thread::current().id();
        for _ in 0..50 {
            let done = done.clone();
            let job: Job = Box::new(move || {
                assert_ne!(std::thread::current().id(), caller);
                done.fetch_add(1, Ordering::SeqCst);
            });
            assert!(pool.try_run(job).is_ok());
        }
        drop(pool);
        assert_eq!(done.load(Ordering::SeqCst), 50, "the queue drains before the threads exit");
    }

    /// The queue bound holds: with the only thread busy and the queue full, a job comes back.
    #[test]
    fn a_full_queue_hands_the_job_back() {
        let pool = Offload::start(1, 1).unwrap();
        let (hold_tx, hold_rx) = crossbeam_channel::bounded::<()>(0);
        let (started_tx, started_rx) = crossbeam_channel::bounded::<()>(1);
        assert!(pool
            .try_run(Box::new(move || {
                started_tx.send(()).unwrap();
                hold_rx.recv().unwrap();
            }))
            .is_ok());
        started_rx.recv().unwrap();
        assert!(pool.try_run(Box::new(|| {})).is_ok(), "one waits in the queue");
        let back = pool.try_run(Box::new(|| {}));
        assert!(back.is_err(), "the queue is full");
        hold_tx.send(()).unwrap();
        let none = Offload::start(0, 8).unwrap();
        assert!(none.try_run(Box::new(|| {})).is_err(), "no threads: every job runs in place");
    }
}
