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

use crossbeam_channel::{Receiver, Sender, TrySendError};

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
                        // A job that panics has woken its task already (its guard dropped);
                        // the thread goes on with the next.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
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

/// A value whose computation was handed to an offload thread ([`crate::Cx::offload_with`]):
/// it comes back through `take` once the task's tag completed.
pub struct Away<T>(Receiver<T>);

impl<T> Away<T> {
    pub(crate) fn new(rx: Receiver<T>) -> Away<T> {
        Away(rx)
    }

    /// The result, once the tag completed; None if the work panicked.
    pub fn take(self) -> Option<T> {
        self.0.try_recv().ok()
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

    /// Through a core: the task's tag completes once, after the work, with the work on an
    /// offload thread (or on the core without threads), also when the work panics.
    #[test]
    fn cx_offload_completes_the_tag_after_the_work() {
        use crate::reactor::{Cx, Engine, EngineConfig, Msg, Task};
        use ballast_ffi::Owned;
        use std::sync::atomic::AtomicBool;

        struct Probe {
            ran: Arc<AtomicBool>,
            core_thread: Option<std::thread::ThreadId>,
            worker: Arc<parking_lot::Mutex<Option<std::thread::ThreadId>>>,
            panic: bool,
            done: bool,
            tx: crossbeam_channel::Sender<(bool, bool)>,
        }
        impl Task for Probe {
            fn start(&mut self, cx: &mut Cx<'_>) {
                self.core_thread = Some(std::thread::current().id());
                let (ran, worker, panic) = (self.ran.clone(), self.worker.clone(), self.panic);
                cx.offload(
                    9,
                    Box::new(move || {
                        *worker.lock() = Some(std::thread::current().id());
                        assert!(!panic, "a job that panics (expected in this test)");
                        ran.store(true, Ordering::SeqCst);
                    }),
                );
            }
            fn on_completion(&mut self, _cx: &mut Cx<'_>, tag: u32, result: i32, _o: Owned) {
                assert_eq!((tag, result), (9, 0));
                assert!(!self.done, "one completion per job");
                self.done = true;
                let off_core = *self.worker.lock() != self.core_thread;
                let _ = self.tx.send((self.ran.load(Ordering::SeqCst), off_core));
            }
            fn flush(&mut self, _cx: &mut Cx<'_>) {}
            fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}
            fn is_done(&self) -> bool {
                self.done
            }
        }
        let run = |threads: usize, panic: bool| -> (bool, bool) {
            let engine = Engine::start(EngineConfig {
                offload_threads: threads,
                offload_queue: 4,
                ..EngineConfig::one_core_for_tests()
            })
            .expect("an engine");
            let (tx, rx) = crossbeam_channel::bounded(1);
            let probe = Probe {
                ran: Arc::default(),
                core_thread: None,
                worker: Arc::default(),
                panic,
                done: false,
                tx,
            };
            let spawn =
                Msg::Spawn(Box::new(move |_cx: &mut Cx<'_>| Box::new(probe) as Box<dyn Task>));
            assert!(engine.handles()[0].send_blocking(spawn));
            let got =
                rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the tag completes");
            engine.shutdown();
            got
        };
        assert_eq!(run(2, false), (true, true), "ran, on an offload thread");
        assert_eq!(run(0, false), (true, false), "ran, in place on the core");
        assert!(!run(1, true).0, "a panicking job still completes its tag");
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
