//! Per-core reactor: owns this core's io_uring and every operation and task on it.
//!
//! Invariants:
//! - one reactor per data core, on its own pinned thread; it never migrates and never shares
//!   its ring, tasks, ready queue or statistics with another thread;
//! - every submitted operation carries a token `(task key << 32) | tag`; a task stays in the
//!   task slab until it reports `is_done()`, which it must only do with nothing in flight, so a
//!   completion always finds the task that submitted it;
//! - other threads reach a core only through its bounded mailbox, followed by an eventfd write
//!   that wakes the core if it sleeps in the ring — only then: a core that is awake (busy or
//!   spinning) looks at its channels every turn, and a sender that sees it awake rings no
//!   doorbell (the core clears `awake` and looks at its channels once more before it sleeps,
//!   the sender pushes before it looks at `awake`: one of them always sees the other); wake-ups of parked tasks (a volume request
//!   another core's event unblocked) take a channel of their own, unbounded in type but bounded
//!   by the requests parked: each parking is woken once ([`CoreHandle::wake_task`]); a job a
//!   task handed to the offload threads ([`Cx::offload`]) wakes it the same way, once, after
//!   the work (or its panic), and the task stays (not `is_done`) until that wake arrives;
//! - the core spins (non-blocking submit/reap) while the polling policy ([`PollPolicy`]) says
//!   the next work is near — judged by how often work has been arriving — and never longer
//!   than `poll_us` after the last work; otherwise it sleeps in `io_uring_enter`, so an idle
//!   engine uses no CPU;
//! - completions made without I/O ([`Cx::complete`]: memory devices, replies a volume's
//!   requests hand their connections) are delivered within the loop iteration that made them,
//!   in at most `READY_ROUNDS` rounds: those the ring's completions made before any task is
//!   flushed (a memory read's reply joins the other replies in one send), those the flushes
//!   made after them, so a reply joins the same ring entry as the request's next receive; what
//!   a longer chain makes waits for the next iteration, whose ring completions are reaped first;
//! - payload memory is charged to this core's budget ([`BufPool`]) before it is allocated; a
//!   task refused a charge is woken through [`Task::on_buffers`] once memory is released;
//! - a core going idle after connections left gives cached buffers and free heap memory back
//!   to the system (at most once per `TRIM_EVERY`);
//! - with a device ring configured ([`EngineConfig::device_ring`]), each core also owns a
//!   small SQE128/CQE32 ring for NVMe passthrough ([`Cx::submit_nvme`]), submitted from and
//!   reaped on this core every turn while it has I/O in flight. Interrupt mode: before the
//!   core sleeps it turns on the ring's eventfd, which a read kept in flight on the main ring
//!   waits on, so a device completion wakes it; while it runs, the eventfd is off. Polled mode
//!   (IOPOLL): the core does not sleep while device I/O is in flight; entering the device ring
//!   polls the NVMe completion queue.

use std::any::{Any, TypeId};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ballast_ffi::RingError;
use ballast_ffi::{
    Completion, DevRing, DevRingMode, FileRef, FixedConfig, IoBuf, NvmeIo, NvmeNs, Op, Owned, Ring,
};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use slab::Slab;

use crate::fixed::{CoreFiles, Registered};
use crate::offload::{Away, Offload};
use crate::poll::PollPolicy;
use crate::pool::BufPool;
use crate::stats::{CoreStats, StatsSnapshot};

/// Reserved task key for the reactor's own operations (the mailbox eventfd read).
const INTERNAL_KEY: u32 = u32::MAX;
const TAG_EVENTFD: u32 = 0;
/// The read on the device ring's eventfd (interrupt mode).
const TAG_DEV_EVENTFD: u32 = 1;
/// Mailbox messages handled per loop iteration at most (bounded work per turn).
const MAILBOX_BATCH: usize = 64;
/// Rounds per loop iteration in which completions made without I/O ([`Cx::complete`]) are
/// delivered and their tasks flushed again, before the ring is entered: a memory read's
/// reply leaves in the same turn as its request, through the volume layer too (device
/// completion → the core's volume decisions → the connection's reply: two rounds). Bounded, so
/// a chain of such completions cannot keep the ring from being reaped.
const READY_ROUNDS: usize = 4;
/// Longest sleep in the ring before re-checking the mailbox anyway.
const SLEEP_MAX: Duration = Duration::from_millis(500);
/// After shutdown is requested, tasks get this long to drain before the core gives up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle spinning reads the clock once per this many turns.
const SPIN_CLOCK_EVERY: u32 = 32;
/// An idle core returns memory to the system at most this often.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// A unit of work living on one core: a listener, a connection.
pub trait Task {
    /// Called once, on the core that will own the task.
    fn start(&mut self, cx: &mut Cx<'_>);
    /// An operation this task submitted with `tag` completed.
    fn on_completion(&mut self, cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned);
    /// Called at the end of a loop iteration in which the task received events: the place to
    /// batch work (coalesce replies into one send, post the next receive).
    fn flush(&mut self, cx: &mut Cx<'_>);
    /// The engine is shutting down: stop taking new work and finish what is in flight.
    fn on_shutdown(&mut self, cx: &mut Cx<'_>);
    /// Memory was released on this core after a charge of this task's was refused
    /// ([`Cx::charge`]): try again. `flush` follows.
    fn on_buffers(&mut self, cx: &mut Cx<'_>) {
        let _ = cx;
    }
    /// True once the task has finished and nothing it submitted is in flight.
    fn is_done(&self) -> bool;
}

type SpawnFn = Box<dyn FnOnce(&mut Cx<'_>) -> Box<dyn Task> + Send>;

/// Messages between cores and from the control plane.
pub enum Msg {
    /// Build a task on the receiving core and start it.
    Spawn(SpawnFn),
    /// Stop accepting work, drain, exit.
    Shutdown,
    /// Reply with a copy of the core's statistics.
    Stats(Sender<StatsSnapshot>),
}

/// How to reach one core from anywhere.
#[derive(Clone)]
pub struct CoreHandle {
    tx: Sender<Msg>,
    wakes: Sender<u64>,
    wake: Arc<OwnedFd>,
    /// False while the core sleeps (or is about to) in the ring.
    awake: Arc<AtomicBool>,
}

impl CoreHandle {
    /// Sends a message, waking the core. A full mailbox is back-pressure: the message is
    /// returned to the caller.
    pub fn send(&self, msg: Msg) -> Result<(), Msg> {
        match self.tx.try_send(msg) {
            Ok(()) => {
                self.doorbell();
                Ok(())
            }
            Err(TrySendError::Full(m)) | Err(TrySendError::Disconnected(m)) => Err(m),
        }
    }

    /// Completes `tag` for `task` on this core with result 0 and no buffer: wakes a task parked
    /// on something another core released. Never refused (see the module header).
    pub fn wake_task(&self, task: u32, tag: u32) {
        if self.wakes.send(token(task, tag)).is_ok() {
            self.doorbell();
        }
    }

    /// After a push: wakes the core if it sleeps (an eventfd write, a system call); a core
    /// that is awake finds the message on its next turn.
    pub(crate) fn doorbell(&self) {
        fence(Ordering::SeqCst);
        if !self.awake.load(Ordering::SeqCst) {
            ballast_ffi::sys::eventfd_signal(&*self.wake);
        }
    }

    /// Sends, waiting while the mailbox is full (control plane only, never a core).
    pub fn send_blocking(&self, msg: Msg) -> bool {
        let ok = self.tx.send(msg).is_ok();
        self.doorbell();
        ok
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// CPUs to run data cores on, one reactor each.
    pub cpus: Vec<usize>,
    /// Spin at most this long after the last work before sleeping in the ring (the policy
    /// decides within it; 0: never spin).
    pub poll_us: u64,
    pub ring_entries: u32,
    pub mailbox_depth: usize,
    /// Payload memory each core may charge ([`Cx::charge`]), in bytes.
    pub buffer_budget: u64,
    /// Of it, what one export's I/O waiting for its rate limits may hold on each core
    /// ([`crate::qos`]); `None`: an eighth of `buffer_budget`.
    pub qos_wait_budget: Option<u64>,
    /// A second, small ring per core for NVMe passthrough, when a backend needs one.
    pub device_ring: Option<DeviceRingConfig>,
    /// Threads for CPU-heavy one-off work off the cores ([`Cx::offload`]; 0: in place).
    pub offload_threads: usize,
    /// Jobs waiting for an offload thread at most; beyond, they run on the core.
    pub offload_queue: usize,
    /// Files and buffers each core's ring may hold registered ([`crate::fixed`]).
    pub fixed: FixedConfig,
    /// The kernel's worker threads (io-wq) each core may have running its operations that
    /// would block (a buffered write waiting on a file's lock, say), each kind; 0: the
    /// kernel's default (up to four per CPU for files, the process limit for sockets).
    pub io_workers: u32,
}

#[cfg(test)]
impl EngineConfig {
    /// One core on the first allowed CPU, never spinning, no device ring or offload thread:
    /// the engine the unit tests run their tasks on (each overrides what it needs).
    pub(crate) fn one_core_for_tests() -> EngineConfig {
        EngineConfig {
            cpus: vec![ballast_ffi::sys::allowed_cpus()[0]],
            poll_us: 0,
            ring_entries: 64,
            mailbox_depth: 16,
            buffer_budget: 16 << 20,
            qos_wait_budget: None,
            device_ring: None,
            offload_threads: 0,
            offload_queue: 1,
            // No buffers: pinned memory counts against RLIMIT_MEMLOCK, tests run side by side.
            fixed: FixedConfig { files: 4, bufs: 0 },
            io_workers: 4,
        }
    }
}

/// Each core's device ring (see the module header).
#[derive(Debug, Clone, Copy)]
pub struct DeviceRingConfig {
    /// Submission entries (completion entries: twice as many).
    pub entries: u32,
    /// IORING_SETUP_IOPOLL: the core polls the device instead of taking interrupts.
    pub poll: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("core {core}: {source}")]
    Ring { core: usize, source: RingError },
    #[error("core {core}: eventfd: {source}")]
    Eventfd { core: usize, source: std::io::Error },
    #[error("core {core}: thread: {source}")]
    Thread { core: usize, source: std::io::Error },
    #[error("core {core}: device ring (NVMe passthrough needs Linux >= 5.19): {source}")]
    DeviceRing { core: usize, source: RingError },
    #[error("core {core}: device ring eventfd: {source}")]
    DeviceEventfd { core: usize, source: std::io::Error },
    #[error("offload threads: {0}")]
    Offload(std::io::Error),
}

/// The running set of cores.
pub struct Engine {
    handles: Arc<Vec<CoreHandle>>,
    threads: Vec<JoinHandle<()>>,
    /// Dropped after the cores stopped: its threads finish their queue first.
    offload: Arc<Offload>,
}

impl Engine {
    /// Starts one pinned reactor per CPU in `config.cpus`; fails if any ring cannot be created.
    pub fn start(config: EngineConfig) -> Result<Engine, EngineError> {
        assert!(!config.cpus.is_empty(), "engine needs at least one core");
        let offload = Offload::start(config.offload_threads, config.offload_queue)
            .map_err(EngineError::Offload)?;
        let mut handles = Vec::new();
        let mut mailboxes = Vec::new();
        for core in 0..config.cpus.len() {
            let (tx, rx) = crossbeam_channel::bounded(config.mailbox_depth);
            let (wakes, wakes_rx) = crossbeam_channel::unbounded();
            let wake = ballast_ffi::sys::eventfd()
                .map_err(|source| EngineError::Eventfd { core, source })?;
            let wake = Arc::new(wake);
            let awake = Arc::new(AtomicBool::new(true));
            handles.push(CoreHandle { tx, wakes, wake: wake.clone(), awake: awake.clone() });
            mailboxes.push((rx, wakes_rx, wake, awake));
        }
        let handles = Arc::new(handles);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(config.cpus.len());
        let mut threads = Vec::new();
        for (core, (rx, wakes_rx, wake, awake)) in mailboxes.into_iter().enumerate() {
            let cpu = config.cpus[core];
            let peers = handles.clone();
            let offload = offload.clone();
            let ready_tx = ready_tx.clone();
            let cfg = config.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ballast-core{core}"))
                .spawn(move || {
                    if let Err(e) = ballast_ffi::sys::pin_to_cpu(cpu) {
                        tracing::warn!(core, cpu, error = %e, "could not pin reactor thread");
                    }
                    let ring = match Ring::with_fixed(cfg.ring_entries, cfg.fixed) {
                        Ok(r) if r.counters().registration_failures > 0 => {
                            tracing::warn!(
                                core,
                                "the kernel refused tables of registered files or buffers \
                                 (--registered-files, --registered-buffers): plain descriptors \
                                 and buffers"
                            );
                            r
                        }
                        Ok(r) => r,
                        Err(source) => {
                            let _ = ready_tx.send(Err(EngineError::Ring { core, source }));
                            return;
                        }
                    };
                    let dev = match DeviceSide::open(core, cfg.device_ring, cfg.fixed.bufs) {
                        Ok(d) => d,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    if cfg.io_workers > 0 {
                        // The workers are the thread's: this covers the device ring too.
                        let n = cfg.io_workers;
                        if let Err(e) = ring.limit_workers(n, n) {
                            tracing::warn!(core, error = %e, "the kernel refused a limit on its \
                                           worker threads (--io-workers): its defaults apply");
                        }
                    }
                    let _ = ready_tx.send(Ok(()));
                    Core::new(
                        core,
                        ring,
                        dev,
                        (rx, wakes_rx),
                        (wake, awake),
                        (peers, offload),
                        &cfg,
                    )
                    .run();
                })
                .map_err(|source| EngineError::Thread { core, source })?;
            threads.push(thread);
        }
        let mut first_error = None;
        for _ in 0..config.cpus.len() {
            if let Ok(Err(e)) = ready_rx.recv() {
                first_error.get_or_insert(e);
            }
        }
        let engine = Engine { handles, threads, offload };
        if let Some(e) = first_error {
            engine.shutdown();
            return Err(e);
        }
        Ok(engine)
    }

    pub fn handles(&self) -> Arc<Vec<CoreHandle>> {
        self.handles.clone()
    }

    /// Asks every core to drain and stop, then joins them.
    pub fn shutdown(self) {
        for h in self.handles.iter() {
            h.send_blocking(Msg::Shutdown);
        }
        for t in self.threads {
            let _ = t.join();
        }
        drop(self.offload);
    }
}

/// What a task may do while handling an event.
pub struct Cx<'a> {
    core: usize,
    task: u32,
    ring: &'a mut Ring,
    dev: Option<&'a mut DevRing>,
    ready: &'a mut VecDeque<Completion>,
    spawns: &'a mut Vec<Box<dyn Task>>,
    peers: &'a Arc<Vec<CoreHandle>>,
    offload: &'a Offload,
    stats: &'a mut CoreStats,
    pool: &'a mut BufPool,
    locals: &'a mut Locals,
    files: &'a mut CoreFiles,
    /// Tasks to `flush` at the end of this loop iteration although no event came to them.
    flush_also: &'a mut Vec<u32>,
    shutting_down: bool,
}

/// Per-core values of modules above the reactor, one per type (a volume pool's request slots
/// on this core): reached from any task on the core, never from another thread. A value is
/// checked out while in use ([`Cx::take_local`]) and must be put back before the event ends
/// (asserted at the end of every loop iteration); taking it again meanwhile is a bug
/// (re-entrancy) and panics.
#[derive(Default)]
struct Locals(Vec<(TypeId, Option<Box<dyn Any>>)>);

impl Locals {
    /// Whether every per-core value is back in place (none checked out).
    fn all_in(&self) -> bool {
        self.0.iter().all(|(_, v)| v.is_some())
    }
}

impl Cx<'_> {
    pub fn core(&self) -> usize {
        self.core
    }

    pub fn cores(&self) -> usize {
        self.peers.len()
    }

    pub fn peers(&self) -> &Arc<Vec<CoreHandle>> {
        self.peers
    }

    pub fn shutting_down(&self) -> bool {
        self.shutting_down
    }

    pub fn stats(&mut self) -> &mut CoreStats {
        self.stats
    }

    /// A buffer from this core's pool with `len` bytes in use (contents arbitrary).
    pub fn buf(&mut self, len: usize) -> IoBuf {
        let mut buf = self.pool.get(len);
        buf.set_len(len);
        buf
    }

    /// An empty buffer from this core's pool with room for `cap` bytes.
    pub fn buf_with_capacity(&mut self, cap: usize) -> IoBuf {
        self.pool.get(cap)
    }

    /// Gives a buffer back to this core's pool.
    pub fn recycle(&mut self, buf: IoBuf) {
        self.pool.put(buf);
    }

    /// Charges `bytes` of payload memory to this core's budget for a holder (a connection)
    /// that already holds `held`. Refused when the budget (or, for a large holder, the part of
    /// it not reserved for small ones) would be exceeded: the task is then woken through
    /// [`Task::on_buffers`] once memory is released. Allocate only after a grant.
    pub fn charge(&mut self, bytes: u64, held: u64) -> bool {
        self.pool.charge(bytes, held, self.task)
    }

    /// The largest charge this core can ever grant one holder (size requests by it).
    pub fn charge_limit(&self) -> u64 {
        self.pool.large_limit()
    }

    /// Releases payload memory charged earlier.
    pub fn release(&mut self, bytes: u64) {
        self.pool.release(bytes);
    }

    /// Parks this task until memory is released on the core (or I/O waiting for a rate limit
    /// goes): it is woken through [`Task::on_buffers`], as after a refused charge.
    pub fn wait_for_memory(&mut self) {
        self.pool.park(self.task);
    }

    /// Whether the I/O of export `key` (its limiter's address) waiting for its rate limits
    /// holds all it may on this core: connections take no new request for it.
    pub fn qos_wait_full(&self, key: usize) -> bool {
        self.pool.qos_wait_full(key)
    }

    /// An I/O of export `key` holding `bytes` of payload starts waiting for its rate limits.
    pub fn qos_wait_add(&mut self, key: usize, bytes: u64) {
        self.pool.qos_wait_add(key, bytes);
    }

    /// An I/O of export `key` holding `bytes` went: parked tasks look again.
    pub fn qos_wait_sub(&mut self, key: usize, bytes: u64) {
        self.pool.qos_wait_sub(key, bytes);
    }

    /// Hands what this core has queued on its rings to the kernel now, without waiting, so
    /// the device works while the task goes on computing (the loop would submit at the end of
    /// its iteration). A failed enter is left to the loop's own, which reports it.
    pub fn submit_queued(&mut self) {
        let _ = enter_if_needed(self.ring, self.dev.as_deref_mut());
    }

    /// Submits `op` to this core's ring; the completion comes back to this task with `tag`.
    pub fn submit(&mut self, op: Op, tag: u32) {
        let token = token(self.task, tag);
        if let Err(e) = self.ring.push(op, token) {
            // push only fails if io_uring_enter fails while the queue is full: fatal for the ring.
            panic!("core {}: cannot submit to io_uring: {e}", self.core);
        }
    }

    /// The file to name in an operation on `reg`'s descriptor: this core's registered slot for
    /// it (registered now, the first time), or the descriptor when the ring has no slot.
    pub fn file_ref(&mut self, reg: &Registered) -> FileRef {
        self.files.file_ref(reg, self.ring, &self.peers[self.core])
    }

    /// Submits an NVMe passthrough I/O on namespace `ns` to this core's device ring (so the
    /// kernel issues it on this core's NVMe queue); the completion comes back to this task with
    /// `tag`: bytes transferred or 0, or `-errno`, and a read's or write's buffer. Without a
    /// device ring ([`EngineConfig::device_ring`]) it completes with `-EOPNOTSUPP`.
    pub fn submit_nvme(&mut self, ns: &NvmeNs, io: NvmeIo, tag: u32) {
        let token = token(self.task, tag);
        let Some(dev) = self.dev.as_deref_mut() else {
            let owned = match io {
                NvmeIo::Read { buf, .. } | NvmeIo::Write { buf, .. } => Owned::Buf(buf),
                _ => Owned::None,
            };
            self.ready.push_back(Completion { token, result: -libc::EOPNOTSUPP, owned });
            return;
        };
        dev.push(ns, io, token);
    }

    /// Completes `tag` for this task without I/O (memory backends, immediate errors); it is
    /// delivered in the same loop iteration — before the iteration's flushes if made while the
    /// ring's completions were dispatched, else after the flush that made it — up to
    /// `READY_ROUNDS` rounds, else in the next; never re-entrantly.
    pub fn complete(&mut self, tag: u32, result: i32, owned: Owned) {
        self.ready.push_back(Completion { token: token(self.task, tag), result, owned });
    }

    /// The task this context runs (a helper task replies to it through `complete_to`).
    pub fn task(&self) -> u32 {
        self.task
    }

    /// Completes `tag` for task `task` of this core without I/O: a helper task (a volume's
    /// I/O, which runs several device operations for one request) hands the request's result
    /// to the task that submitted it. The target must still exist: tasks do not finish while
    /// requests they submitted are outstanding.
    pub fn complete_to(&mut self, task: u32, tag: u32, result: i32, owned: Owned) {
        self.ready.push_back(Completion { token: token(task, tag), result, owned });
    }

    /// Arms a timer that completes `tag` with `-ETIME` after `after`.
    pub fn timer(&mut self, tag: u32, after: Duration) {
        self.submit(Op::Timer { after }, tag);
    }

    /// Cancels this task's operations submitted with `tag`; the cancel itself completes with
    /// `cancel_tag`.
    pub fn cancel(&mut self, tag: u32, cancel_tag: u32) {
        let target = token(self.task, tag);
        self.submit(Op::Cancel { token: target }, cancel_tag);
    }

    /// Runs `work` off the core, on an offload thread, and completes `tag` for this task
    /// (result 0, nothing owned) once it is done; where no thread can take it now (none
    /// configured, queue full), `work` runs here, before this returns, and `tag` completes
    /// after the current event. Either way `tag` completes exactly once, after `work`.
    pub fn offload(&mut self, tag: u32, work: Box<dyn FnOnce() + Send>) {
        let wake = WakeOnDrop(Some((self.peers[self.core].clone(), self.task, tag)));
        match self.offload.try_run(Box::new(move || {
            // The wake follows the work, also if the work panics (the guard drops).
            let _wake = wake;
            work();
        })) {
            Ok(()) => self.stats.offloaded += 1,
            Err(job) => {
                // `job` wakes through the channel of this very core: the same completion,
                // a turn later.
                self.stats.offload_in_place += 1;
                job();
            }
        }
    }

    /// [`Cx::offload`] for work that produces a value: `tag` completes once the value is
    /// ready, and the returned [`Away`] hands it over.
    pub fn offload_with<T: Send + 'static>(
        &mut self,
        tag: u32,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Away<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.offload(
            tag,
            Box::new(move || {
                let _ = tx.send(work());
            }),
        );
        Away::new(rx)
    }

    /// Checks out this core's value of type `T` (none yet: `None`, and the caller makes one);
    /// it must come back through [`Cx::put_local`] before the event ends.
    pub fn take_local<T: Any>(&mut self) -> Option<Box<T>> {
        let id = TypeId::of::<T>();
        let (_, slot) = self.locals.0.iter_mut().find(|(t, _)| *t == id)?;
        let value = slot.take().expect("a per-core value taken twice (re-entrant use)");
        Some(value.downcast::<T>().expect("per-core values are keyed by their type"))
    }

    /// Puts this core's value of type `T` back (or in, the first time).
    pub fn put_local<T: Any>(&mut self, value: Box<T>) {
        let id = TypeId::of::<T>();
        match self.locals.0.iter_mut().find(|(t, _)| *t == id) {
            Some((_, slot)) => {
                assert!(slot.is_none(), "a per-core value put back twice");
                *slot = Some(value);
            }
            None => self.locals.0.push((id, Some(value))),
        }
    }

    /// Has task `task` of this core `flush`ed at the end of this loop iteration, with the
    /// tasks that received events: a service task (a pool's request slots) that another
    /// task's call handed work to does that work then, together with the rest of the turn's.
    pub fn flush_later(&mut self, task: u32) {
        self.flush_also.push(task);
    }

    /// Starts a task on this core (after the current event).
    pub fn spawn_local(&mut self, task: Box<dyn Task>) {
        self.spawns.push(task);
    }
}

/// Completes an offloaded job's tag when dropped: after the work, or while unwinding from it.
struct WakeOnDrop(Option<(CoreHandle, u32, u32)>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        if let Some((handle, task, tag)) = self.0.take() {
            handle.wake_task(task, tag);
        }
    }
}

fn token(task: u32, tag: u32) -> u64 {
    (u64::from(task) << 32) | u64::from(tag)
}

struct Slot {
    task: Box<dyn Task>,
    dirty: bool,
}

/// A core's device ring and the eventfd it signals (interrupt mode).
struct DeviceSide {
    ring: DevRing,
    wake: Option<OwnedFd>,
}

impl DeviceSide {
    fn open(
        core: usize,
        config: Option<DeviceRingConfig>,
        fixed_bufs: u32,
    ) -> Result<Option<Self>, EngineError> {
        let Some(config) = config else { return Ok(None) };
        let mode = if config.poll { DevRingMode::Poll } else { DevRingMode::Interrupt };
        let mut ring = DevRing::new(config.entries, mode, fixed_bufs)
            .map_err(|source| EngineError::DeviceRing { core, source })?;
        let wake = match mode {
            // Polled completions are never signalled: the core polls while I/O is in flight.
            DevRingMode::Poll => None,
            DevRingMode::Interrupt => {
                let fd = ballast_ffi::sys::eventfd()
                    .map_err(|source| EngineError::DeviceEventfd { core, source })?;
                ring.register_eventfd(fd.as_raw_fd())
                    .map_err(|source| EngineError::DeviceEventfd { core, source })?;
                Some(fd)
            }
        };
        Ok(Some(DeviceSide { ring, wake }))
    }
}

struct Core {
    id: usize,
    ring: Ring,
    dev: Option<DeviceSide>,
    mailbox: Receiver<Msg>,
    wakes: Receiver<u64>,
    wake: Arc<OwnedFd>,
    awake: Arc<AtomicBool>,
    peers: Arc<Vec<CoreHandle>>,
    offload: Arc<Offload>,
    tasks: Slab<Slot>,
    ready: VecDeque<Completion>,
    spawns: Vec<Box<dyn Task>>,
    /// The eventfd fired (or a drain stopped at its batch limit): read the mailbox.
    mail_pending: bool,
    /// Whether idle turns spin or sleep.
    policy: PollPolicy,
    /// Tasks that received events this iteration, to `flush` at its end (each once).
    dirty: Vec<usize>,
    /// The list `flush_dirty` works through while tasks it flushes mark others: it trades
    /// places with `dirty` each round, both keeping their room (no allocation per turn).
    flushing: Vec<usize>,
    /// Tasks asked to be flushed this iteration without an event ([`Cx::flush_later`]).
    flush_also: Vec<u32>,
    /// Tasks to wake because memory they were refused may now be had.
    buffer_waiters: Vec<u32>,
    /// Tasks finished since the last memory trim.
    removed_since_trim: usize,
    last_trim: Instant,
    stats: CoreStats,
    pool: BufPool,
    /// State that modules above the reactor keep per core ([`Cx::take_local`]).
    locals: Locals,
    /// Which devices' files this core's ring holds registered.
    files: CoreFiles,
    shutdown_at: Option<Instant>,
}

impl Core {
    fn new(
        id: usize,
        ring: Ring,
        dev: Option<DeviceSide>,
        (mailbox, wakes): (Receiver<Msg>, Receiver<u64>),
        (wake, awake): (Arc<OwnedFd>, Arc<AtomicBool>),
        (peers, offload): (Arc<Vec<CoreHandle>>, Arc<Offload>),
        cfg: &EngineConfig,
    ) -> Core {
        Core {
            id,
            ring,
            dev,
            mailbox,
            wakes,
            awake,
            wake,
            peers,
            offload,
            tasks: Slab::new(),
            ready: VecDeque::new(),
            spawns: Vec::new(),
            dirty: Vec::new(),
            flushing: Vec::new(),
            flush_also: Vec::new(),
            buffer_waiters: Vec::new(),
            removed_since_trim: 0,
            last_trim: Instant::now(),
            mail_pending: true,
            policy: PollPolicy::new(Duration::from_micros(cfg.poll_us)),
            pool: match cfg.qos_wait_budget {
                Some(limit) => BufPool::new(cfg.buffer_budget).with_qos_wait_limit(limit),
                None => BufPool::new(cfg.buffer_budget),
            },
            stats: CoreStats::new(id),
            locals: Locals::default(),
            files: CoreFiles::default(),
            shutdown_at: None,
        }
    }

    fn run(mut self) {
        self.arm_eventfd(IoBuf::with_capacity(8));
        if self.dev.as_ref().is_some_and(|d| d.wake.is_some()) {
            self.arm_dev_eventfd(IoBuf::with_capacity(8));
        }
        let mut completions = Vec::with_capacity(256);
        // The clock is read when the core changes between busy and idle, and every
        // `SPIN_CLOCK_EVERY` idle turns while it spins; never on busy turns inside a burst.
        let mut idle_turns: u32 = 0;
        loop {
            self.reclaim_returned();
            let mut work = self.ring.reap(&mut completions);
            work += self.reap_device(&mut completions);
            work += self.dispatch_with_ready(&mut completions);
            // Rounds of completions made without I/O left to this iteration.
            let mut rounds = READY_ROUNDS;
            // What the ring's completions made without I/O (a memory read's data) is delivered
            // before anything is flushed, so its replies join the others in one send.
            work += self.deliver_ready(&mut completions, &mut rounds, false);
            // Senders ring no doorbell while we are awake: look for their messages.
            self.mail_pending |= self.channels_pending();
            if self.mail_pending {
                self.mail_pending = false;
                work += self.drain_mailbox();
            }
            work += self.start_spawned();
            work += self.wake_buffer_waiters();
            self.flush_dirty();
            // What the flushes made (a volume request's reply after the core's decisions).
            work += self.deliver_ready(&mut completions, &mut rounds, true);
            // A per-core value checked out by an event and never put back would be lost to
            // every later event of the core.
            assert!(self.locals.all_in(), "core {}: a per-core value was not put back", self.id);
            if self.shutdown_at.is_some() && self.finished() {
                break;
            }
            let result = if work > 0 || !self.ready.is_empty() {
                self.stats.loops_busy += u64::from(work > 0);
                if !self.policy.busy() {
                    self.policy.burst_started(Instant::now());
                }
                self.policy.note_events(work);
                idle_turns = 0;
                self.enter_if_needed()
            } else if self.polling_device() || self.keep_spinning(&mut idle_turns) {
                self.stats.spins += 1;
                self.enter_if_needed()
            } else if self.fall_asleep() {
                self.stats.sleeps += 1;
                idle_turns = 0;
                self.trim_if_idle();
                // What the trim freed was maybe registered: unpin it before sleeping.
                self.reclaim_returned();
                let r = self.sleep();
                self.awake.store(true, Ordering::SeqCst);
                r
            } else {
                // A message arrived as we were about to sleep.
                self.enter_if_needed()
            };
            if let Err(e) = result {
                panic!("core {}: io_uring_enter: {e}", self.id);
            }
        }
        tracing::debug!(core = self.id, "reactor stopped");
    }

    /// Whether a message or wake-up waits in our channels.
    fn channels_pending(&self) -> bool {
        !self.mailbox.is_empty() || !self.wakes.is_empty()
    }

    /// Tells senders we sleep from now on (they ring the doorbell), then looks at the
    /// channels once more: false (and awake again) if a message came in meanwhile.
    fn fall_asleep(&mut self) -> bool {
        self.awake.store(false, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        // A dropped device's slot returned meanwhile rang no doorbell (we were awake).
        if self.channels_pending() || self.returns_pending() {
            self.awake.store(true, Ordering::SeqCst);
            self.mail_pending = true;
            return false;
        }
        true
    }

    /// Whether registrations were let go of (a device dropped, registered buffers freed).
    fn returns_pending(&self) -> bool {
        self.ring.returns().pending()
            || self.dev.as_ref().is_some_and(|d| d.ring.returns().pending())
    }

    /// Clears the ring slots of registrations let go of, and forgets the files among them.
    fn reclaim_returned(&mut self) {
        if self.ring.returns().pending() {
            let cleared = self.ring.reclaim();
            self.files.forget(&cleared);
        }
        if let Some(dev) = self.dev.as_mut().filter(|d| d.ring.returns().pending()) {
            dev.ring.reclaim();
        }
    }

    /// Enters the kernel only when it has something to do for us; otherwise the next turn
    /// just reads the completion queue from shared memory.
    fn enter_if_needed(&mut self) -> Result<(), RingError> {
        enter_if_needed(&mut self.ring, self.dev.as_mut().map(|d| &mut d.ring))
    }

    /// Moves finished device I/O into `out` (nothing to look at while none is in flight).
    fn reap_device(&mut self, out: &mut Vec<Completion>) -> usize {
        match &mut self.dev {
            Some(dev) if dev.ring.inflight() > 0 => dev.ring.reap(out),
            _ => 0,
        }
    }

    /// A polled device ring with I/O in flight: the core keeps turning (each turn polls the
    /// NVMe completion queue), since nothing would wake it.
    fn polling_device(&self) -> bool {
        self.dev
            .as_ref()
            .is_some_and(|d| d.ring.mode() == DevRingMode::Poll && d.ring.inflight() > 0)
    }

    /// Sleeps in the main ring until a completion, a message or `SLEEP_MAX`. Device I/O in
    /// flight signals the device eventfd while the core sleeps: it is turned on first, then the
    /// device ring is entered and looked at once more, so a completion posted before the
    /// switch is reaped now rather than missed. (Passthrough completions are posted by this
    /// thread's own task work, run on entering either ring, after the switch.)
    fn sleep(&mut self) -> Result<(), RingError> {
        let watch = match &mut self.dev {
            Some(dev) if dev.wake.is_some() && dev.ring.inflight() > 0 => {
                dev.ring.notify(true);
                if dev.ring.needs_enter() {
                    dev.ring.submit()?;
                }
                if dev.ring.has_completions() {
                    dev.ring.notify(false);
                    return Ok(());
                }
                true
            }
            _ => false,
        };
        let result = self.ring.submit_and_wait(Some(SLEEP_MAX));
        if let (true, Some(dev)) = (watch, &mut self.dev) {
            dev.ring.notify(false);
        }
        result
    }

    /// Whether an idle turn should spin rather than sleep ([`PollPolicy`]). The first idle
    /// turn after a burst reads the clock (the burst's end); spinning then looks at the clock
    /// once every `SPIN_CLOCK_EVERY` turns.
    fn keep_spinning(&mut self, idle_turns: &mut u32) -> bool {
        if self.policy.busy() {
            let now = Instant::now();
            self.policy.burst_ended(now);
            *idle_turns = 1;
            return self.policy.spin(now);
        }
        if *idle_turns == 0 {
            // Woken with nothing to do (a timeout): no burst to wait after.
            return false;
        }
        *idle_turns += 1;
        // Between clock reads the decision of the last read stands (it said spin, or the
        // core would be asleep).
        !idle_turns.is_multiple_of(SPIN_CLOCK_EVERY) || self.policy.spin(Instant::now())
    }

    /// Before sleeping: if connections went away (or the cache grew) since the last trim,
    /// free cached buffers and give the C heap's free memory back, at most once per
    /// `TRIM_EVERY`, so memory returns to its baseline when clients leave.
    fn trim_if_idle(&mut self) {
        if self.removed_since_trim == 0 && self.pool.snapshot().buffer_cached <= 1 << 20 {
            return;
        }
        if self.last_trim.elapsed() < TRIM_EVERY {
            return;
        }
        self.pool.trim();
        ballast_ffi::sys::malloc_trim();
        self.removed_since_trim = 0;
        self.last_trim = Instant::now();
    }

    /// Wakes tasks refused memory, if some was released since; returns how many.
    fn wake_buffer_waiters(&mut self) -> usize {
        let mut keys = std::mem::take(&mut self.buffer_waiters);
        self.pool.take_waiters(&mut keys);
        let count = keys.len();
        for key in keys.drain(..) {
            let (mut cx, tasks) = self.cx(key);
            // A task that finished meanwhile has nothing to retry.
            if let Some(slot) = tasks.get_mut(key as usize) {
                slot.task.on_buffers(&mut cx);
                self.mark_dirty(key as usize);
            }
        }
        self.buffer_waiters = keys;
        count
    }

    fn finished(&self) -> bool {
        if self.tasks.is_empty() && self.spawns.is_empty() {
            return true;
        }
        let expired = self.shutdown_at.is_some_and(|t| t.elapsed() > DRAIN_TIMEOUT);
        if expired {
            tracing::warn!(core = self.id, tasks = self.tasks.len(), "tasks did not drain in time");
        }
        expired
    }

    fn cx(&mut self, task: u32) -> (Cx<'_>, &mut Slab<Slot>) {
        let cx = Cx {
            core: self.id,
            task,
            ring: &mut self.ring,
            dev: self.dev.as_mut().map(|d| &mut d.ring),
            ready: &mut self.ready,
            spawns: &mut self.spawns,
            peers: &self.peers,
            offload: &self.offload,
            stats: &mut self.stats,
            pool: &mut self.pool,
            locals: &mut self.locals,
            files: &mut self.files,
            flush_also: &mut self.flush_also,
            shutting_down: self.shutdown_at.is_some(),
        };
        (cx, &mut self.tasks)
    }

    fn dispatch(&mut self, c: Completion) {
        let key = (c.token >> 32) as u32;
        let tag = c.token as u32;
        if key == INTERNAL_KEY {
            let buf = c.owned.into_buf().unwrap_or_else(|| IoBuf::with_capacity(8));
            if tag == TAG_DEV_EVENTFD {
                // Device completions are reaped every turn: this only woke the core.
                self.arm_dev_eventfd(buf);
                return;
            }
            assert_eq!(tag, TAG_EVENTFD);
            self.arm_eventfd(buf);
            // Senders push before they signal, so the mailbox holds what woke us.
            self.mail_pending = true;
            return;
        }
        let (mut cx, tasks) = self.cx(key);
        let Some(slot) = tasks.get_mut(key as usize) else {
            panic!("completion for missing task {key} (tag {tag})");
        };
        slot.task.on_completion(&mut cx, tag, c.result, c.owned);
        self.mark_dirty(key as usize);
    }

    fn arm_eventfd(&mut self, mut buf: IoBuf) {
        buf.set_len(0);
        let fd = self.wake.as_raw_fd();
        if let Err(e) =
            self.ring.push(Op::ReadEventfd { fd, buf }, token(INTERNAL_KEY, TAG_EVENTFD))
        {
            panic!("core {}: cannot arm eventfd: {e}", self.id);
        }
    }

    fn arm_dev_eventfd(&mut self, mut buf: IoBuf) {
        buf.set_len(0);
        let Some(fd) = self.dev.as_ref().and_then(|d| d.wake.as_ref()).map(|w| w.as_raw_fd())
        else {
            return;
        };
        let op = Op::ReadEventfd { fd, buf };
        if let Err(e) = self.ring.push(op, token(INTERNAL_KEY, TAG_DEV_EVENTFD)) {
            panic!("core {}: cannot arm the device eventfd: {e}", self.id);
        }
    }

    fn drain_mailbox(&mut self) -> usize {
        let mut count = 0;
        // Wake-ups first, all of them: each is one parked request's, so they are few.
        while let Ok(token) = self.wakes.try_recv() {
            count += 1;
            self.ready.push_back(Completion { token, result: 0, owned: Owned::None });
        }
        loop {
            if count >= MAILBOX_BATCH {
                // More may wait: look again next turn.
                self.mail_pending = true;
                break;
            }
            let Ok(msg) = self.mailbox.try_recv() else {
                break;
            };
            count += 1;
            match msg {
                Msg::Spawn(build) => {
                    let (mut cx, _) = self.cx(INTERNAL_KEY);
                    let task = build(&mut cx);
                    self.spawns.push(task);
                }
                Msg::Shutdown => self.begin_shutdown(),
                Msg::Stats(reply) => {
                    let mut snap = self.stats.snapshot();
                    snap.buffers = self.pool.snapshot();
                    snap.tasks = self.tasks.len() as u64;
                    let c = self.ring.counters();
                    snap.ring_enters = c.enters;
                    snap.ring_ops = c.ops;
                    snap.sends = c.sends;
                    snap.recvs = c.recvs;
                    snap.allocations = ballast_ffi::alloc::thread_allocations();
                    snap.fixed_file_ops = c.fixed_file_ops;
                    snap.fixed_buf_ops = c.fixed_buf_ops;
                    snap.buf_registrations = c.buf_registrations;
                    snap.registration_failures = c.registration_failures;
                    snap.files_registered = c.files_registered;
                    snap.bufs_registered = c.bufs_registered;
                    snap.short_transfers = c.resumed;
                    if let Some(dev) = &self.dev {
                        // The device ring's registered buffers count with the core's.
                        let (d, ops) = dev.ring.fixed_counters();
                        snap.fixed_buf_ops += ops;
                        snap.buf_registrations += d.buf_registrations;
                        snap.registration_failures += d.registration_failures;
                        snap.bufs_registered += d.bufs_registered;
                    }
                    let _ = reply.send(snap);
                }
            }
        }
        count
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown_at.is_some() {
            return;
        }
        self.shutdown_at = Some(Instant::now());
        let keys: Vec<usize> = self.tasks.iter().map(|(k, _)| k).collect();
        for key in keys {
            let (mut cx, tasks) = self.cx(key as u32);
            tasks[key].task.on_shutdown(&mut cx);
            self.mark_dirty(key);
        }
    }

    fn start_spawned(&mut self) -> usize {
        let mut count = 0;
        while let Some(task) = self.spawns.pop() {
            count += 1;
            let key = self.tasks.insert(Slot { task, dirty: false });
            assert!(key < INTERNAL_KEY as usize);
            let shutting_down = self.shutdown_at.is_some();
            let (mut cx, tasks) = self.cx(key as u32);
            let slot = &mut tasks[key];
            slot.task.start(&mut cx);
            if shutting_down {
                slot.task.on_shutdown(&mut cx);
            }
            self.mark_dirty(key);
        }
        count
    }

    /// Dispatches `completions` (the ring's, if any) and then what is ready without I/O, in
    /// that order; returns how many ready completions were delivered.
    fn dispatch_with_ready(&mut self, completions: &mut Vec<Completion>) -> usize {
        let ready = self.ready.len();
        completions.extend(self.ready.drain(..));
        for c in completions.drain(..) {
            self.dispatch(c);
        }
        ready
    }

    /// Completions made without I/O during this iteration ([`Cx::complete`]) are delivered
    /// now, a round at a time while `rounds` lasts (the iteration's `READY_ROUNDS`), and with
    /// `flush` the tasks they reach are flushed after each round; what is still ready after
    /// that waits for the next iteration. Returns the completions delivered.
    fn deliver_ready(
        &mut self,
        completions: &mut Vec<Completion>,
        rounds: &mut usize,
        flush: bool,
    ) -> usize {
        let mut delivered = 0;
        while *rounds > 0 && !self.ready.is_empty() {
            *rounds -= 1;
            delivered += self.dispatch_with_ready(completions);
            if flush {
                self.flush_dirty();
            }
        }
        delivered
    }

    /// Flushes every task that received an event this iteration or was asked to be
    /// ([`Cx::flush_later`]), each once per round; a flush that asks for more flushes gets
    /// another round.
    fn flush_dirty(&mut self) {
        let mut keys = std::mem::take(&mut self.flushing);
        debug_assert!(keys.is_empty());
        loop {
            while let Some(task) = self.flush_also.pop() {
                if self.tasks.contains(task as usize) {
                    self.mark_dirty(task as usize);
                }
            }
            if self.dirty.is_empty() {
                break;
            }
            std::mem::swap(&mut keys, &mut self.dirty);
            for key in keys.drain(..) {
                let (mut cx, tasks) = self.cx(key as u32);
                let slot = &mut tasks[key];
                slot.dirty = false;
                slot.task.flush(&mut cx);
                if slot.task.is_done() {
                    tasks.remove(key);
                    self.removed_since_trim += 1;
                }
            }
        }
        self.flushing = keys;
    }

    fn mark_dirty(&mut self, key: usize) {
        let slot = &mut self.tasks[key];
        if !slot.dirty {
            slot.dirty = true;
            self.dirty.push(key);
        }
    }
}

/// Enters the kernel for a core's rings only where it has something to do: entries to
/// submit, task work to run, an overflowed completion queue.
fn enter_if_needed(ring: &mut Ring, dev: Option<&mut DevRing>) -> Result<(), RingError> {
    if ring.needs_enter() {
        ring.submit()?;
    }
    if let Some(dev) = dev {
        if dev.needs_enter() {
            dev.submit()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::sync::atomic::AtomicU32;

    type Log = Arc<Mutex<Vec<&'static str>>>;

    /// A service task: it does its work in `flush`, which other tasks ask for.
    struct Service {
        id: Arc<AtomicU32>,
        log: Log,
        done: bool,
    }

    impl Task for Service {
        fn start(&mut self, cx: &mut Cx<'_>) {
            self.id.store(cx.task(), Ordering::SeqCst);
        }
        fn on_completion(&mut self, _cx: &mut Cx<'_>, _tag: u32, _result: i32, _owned: Owned) {}
        fn flush(&mut self, _cx: &mut Cx<'_>) {
            self.log.lock().push("service flush");
        }
        fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {
            self.done = true;
        }
        fn is_done(&self) -> bool {
            self.done
        }
    }

    /// Hands the service work at its start and again from its own flush; completes a tag of
    /// its own, which arrives after those flushes, still in the same loop iteration.
    struct Client {
        service: u32,
        log: Log,
        flushed: bool,
        done: bool,
    }

    impl Task for Client {
        fn start(&mut self, cx: &mut Cx<'_>) {
            self.log.lock().push("client start");
            cx.flush_later(self.service);
            cx.complete(1, 0, Owned::None);
        }
        fn on_completion(&mut self, _cx: &mut Cx<'_>, _tag: u32, _result: i32, _owned: Owned) {
            self.log.lock().push("completion");
            self.done = true;
        }
        fn flush(&mut self, cx: &mut Cx<'_>) {
            if !self.flushed {
                self.flushed = true;
                self.log.lock().push("client flush");
                cx.flush_later(self.service);
            }
        }
        fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}
        fn is_done(&self) -> bool {
            self.done
        }
    }

    /// `Cx::flush_later`: the task named is flushed at the end of the same loop iteration,
    /// with the tasks that had events, though no event came to it; a flush that names a task
    /// again gets another round, still before the next iteration.
    #[test]
    fn a_task_named_by_flush_later_is_flushed_in_the_same_iteration() {
        let engine = Engine::start(EngineConfig::one_core_for_tests()).expect("an engine");
        let log: Log = Arc::default();
        let id = Arc::new(AtomicU32::new(u32::MAX));
        let service = Service { id: Arc::clone(&id), log: Arc::clone(&log), done: false };
        let spawn = move |_cx: &mut Cx<'_>| Box::new(service) as Box<dyn Task>;
        assert!(engine.handles()[0].send_blocking(Msg::Spawn(Box::new(spawn))));
        let started = Instant::now();
        while id.load(Ordering::SeqCst) == u32::MAX {
            assert!(started.elapsed() < Duration::from_secs(10), "the service started");
            std::thread::sleep(Duration::from_millis(1));
        }
        let client = Client {
            service: id.load(Ordering::SeqCst),
            log: Arc::clone(&log),
            flushed: false,
            done: false,
        };
        let spawn = move |_cx: &mut Cx<'_>| Box::new(client) as Box<dyn Task>;
        assert!(engine.handles()[0].send_blocking(Msg::Spawn(Box::new(spawn))));
        while !log.lock().contains(&"completion") {
            assert!(started.elapsed() < Duration::from_secs(10), "the client finished");
            std::thread::sleep(Duration::from_millis(1));
        }
        // (Shutting down flushes the service once more.)
        let log = log.lock().clone();
        engine.shutdown();
        let from = log.iter().position(|e| *e == "client start").expect("the client started");
        assert_eq!(
            log[from..],
            ["client start", "client flush", "service flush", "service flush", "completion"]
        );
    }

    /// Completes its own tag `left` times in a chain (each completion asks for the next),
    /// noting the core's busy-loop count at each; with a timer armed beside the chain.
    struct Chain {
        left: u32,
        seen_loops: Arc<Mutex<Vec<u64>>>,
        /// The busy-loop count at each flush while the chain runs.
        flush_loops: Arc<Mutex<Vec<u64>>>,
        timer_fired_after: Arc<Mutex<Option<u32>>>,
        timer_inflight: bool,
    }

    impl Task for Chain {
        fn start(&mut self, cx: &mut Cx<'_>) {
            cx.complete(1, 0, Owned::None);
        }
        fn on_completion(&mut self, cx: &mut Cx<'_>, tag: u32, _result: i32, _owned: Owned) {
            if tag == 2 {
                self.timer_inflight = false;
                *self.timer_fired_after.lock() = Some(self.seen_loops.lock().len() as u32);
                return;
            }
            self.seen_loops.lock().push(cx.stats().loops_busy);
            if self.seen_loops.lock().len() == 1 {
                // Due at once: it must be reaped while the chain still runs.
                self.timer_inflight = true;
                cx.timer(2, Duration::from_millis(1));
            }
            self.left -= 1;
            if self.left > 0 {
                cx.complete(1, 0, Owned::None);
            }
        }
        fn flush(&mut self, cx: &mut Cx<'_>) {
            if self.left > 0 {
                self.flush_loops.lock().push(cx.stats().loops_busy);
            }
        }
        fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}
        fn is_done(&self) -> bool {
            self.left == 0 && !self.timer_inflight
        }
    }

    /// `Cx::complete`: a completion made without I/O is delivered in the loop iteration that
    /// made it (no ring entry between a memory read and its reply), for `READY_ROUNDS` rounds;
    /// a longer chain goes on in later iterations, and the ring is reaped between them (a
    /// timer fires while the chain runs).
    #[test]
    fn completions_without_io_arrive_in_the_same_iteration_for_a_bounded_number_of_rounds() {
        let engine = Engine::start(EngineConfig::one_core_for_tests()).expect("an engine");
        const LINKS: u32 = 200_000;
        let seen_loops = Arc::new(Mutex::new(Vec::new()));
        let flush_loops = Arc::new(Mutex::new(Vec::new()));
        let timer_fired_after = Arc::new(Mutex::new(None));
        let chain = Chain {
            left: LINKS,
            seen_loops: Arc::clone(&seen_loops),
            flush_loops: Arc::clone(&flush_loops),
            timer_fired_after: Arc::clone(&timer_fired_after),
            timer_inflight: false,
        };
        let started_in_loop = Arc::new(Mutex::new(u64::MAX));
        let spawn = {
            let started_in_loop = Arc::clone(&started_in_loop);
            move |cx: &mut Cx<'_>| {
                *started_in_loop.lock() = cx.stats().loops_busy;
                Box::new(chain) as Box<dyn Task>
            }
        };
        assert!(engine.handles()[0].send_blocking(Msg::Spawn(Box::new(spawn))));
        let started = Instant::now();
        while timer_fired_after.lock().is_none() || seen_loops.lock().len() < LINKS as usize {
            assert!(started.elapsed() < Duration::from_secs(30), "the chain and the timer ended");
            std::thread::sleep(Duration::from_millis(1));
        }
        engine.shutdown();
        let seen = seen_loops.lock().clone();
        let start = *started_in_loop.lock();
        // The first completion arrives in the iteration that started the task.
        assert_eq!(seen[0], start, "the first link arrived in its own iteration");
        // An iteration delivers one link with the ring's completions and one in each of its
        // READY_ROUNDS rounds — no more, and no fewer while the chain runs (a round is never
        // left unused): all but the first and last iterations carry exactly that many.
        let mut per_loop = std::collections::BTreeMap::<u64, usize>::new();
        for l in &seen {
            *per_loop.entry(*l).or_default() += 1;
        }
        let counts: Vec<usize> = per_loop.values().copied().collect();
        let inner = &counts[1..counts.len() - 1];
        assert_eq!(counts[0], READY_ROUNDS, "links in the starting iteration");
        let odd: Vec<_> = inner.iter().filter(|&&n| n != READY_ROUNDS + 1).take(5).collect();
        assert!(odd.is_empty(), "iterations delivering other than {}: {odd:?}", READY_ROUNDS + 1);
        // A link the ring's completions made (the one the iteration began with) is followed
        // before any flush: the rounds go to deliveries, and the task is flushed once per
        // iteration, not once per round. (The starting iteration flushes after each round.)
        let mut flushes = std::collections::BTreeMap::<u64, usize>::new();
        for l in flush_loops.lock().iter() {
            *flushes.entry(*l).or_default() += 1;
        }
        let inner_flushes: Vec<usize> =
            flushes.range(start + 1..).map(|(_, n)| *n).filter(|&n| n != 1).take(5).collect();
        assert!(
            inner_flushes.is_empty(),
            "iterations flushing the chain more than once: {inner_flushes:?}"
        );
        assert_eq!(
            flushes.get(&start),
            Some(&(READY_ROUNDS + 1)),
            "flushes when the chain started"
        );
        // The timer, due 1 ms after the first link, fired before the chain's end.
        let after = timer_fired_after.lock().expect("the timer fired");
        assert!(after < LINKS, "the timer fired after link {after} of {LINKS}");
    }
}
