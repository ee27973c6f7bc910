//! A namespace's reservations as every queue of its subsystem shares them: the table
//! ([`Reservations`]) behind a lock, what the data path reads without it, the write-group
//! commands executing (for Preempt and Abort), and the saving of the table where it is kept
//! (Persist Through Power Loss) by the target's saver thread ([`ResvSaver`]).
//!
//! Invariants:
//! - the data path never takes the lock while no reservation is held (`held`, one load), and
//!   while one is, only when the table's `version` moved past the verdict its queue cached;
//!   versions are unique across cells (each cell starts at its own base), so a verdict is never
//!   taken for another namespace's;
//! - a write-group command that goes to the media while a reservation is held is counted
//!   ([`ResvCell::enter`]) before its last check and uncounted when it is done
//!   ([`ResvCell::exit`]), on the shard it was counted on; an epoch begins only once the one
//!   two before it is drained, so the counters an epoch uses hold none of an older one's;
//! - a change made while PTPL is on (or turning it off) marks the table `dirty`; it is clean
//!   again only once a save of a version at least as late succeeded; the command that changed
//!   it, and any command that finds it dirty, completes only once `saved` reaches its version
//!   (or `failed` does: Internal Error, and the next command saves again);
//! - saves run one at a time per cell on the saver thread, never on a data core (the pool's
//!   write waits for a core, and its checkpoints for the offload threads); a retired cell (its
//!   namespace removed) saves nothing more.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::nvme::{status, Status};
use crate::resv::{Access, HostId, Notice, Reservations, ResvStatus, ResvStore};

/// Shards of the executing-write counters (cores map onto them modulo this many): 1 KiB a
/// namespace.
const DRAIN_SHARDS: usize = 16;
/// Cells waiting for the saver thread at most; past it a command's save is refused
/// (Internal Error) and the table stays dirty for the next command.
const SAVES_QUEUED_MAX: usize = 1024;

/// Each cell's versions start at a base of their own.
static NEXT_BASE: AtomicU64 = AtomicU64::new(1 << 32);

/// One core's counters of write-group commands executing on a namespace, per epoch parity,
/// on a cache line of its own.
#[repr(align(64))]
#[derive(Default)]
struct DrainShard([AtomicU64; 2]);

/// A write-group command counted among those executing on a namespace ([`ResvCell::enter`]):
/// its shard and epoch parity, handed back to [`ResvCell::exit`] when it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Executing {
    shard: u16,
    parity: u8,
}

/// The thread that writes reservation tables where they are kept, for every namespace of a
/// target, so that no data core and no offload thread ever waits for the pool.
pub struct ResvSaver {
    store: Arc<dyn ResvStore>,
    tx: SyncSender<Weak<ResvCell>>,
}

impl ResvSaver {
    /// Starts the thread (it ends when the saver is dropped and its queue is empty).
    pub fn start(store: Arc<dyn ResvStore>) -> std::io::Result<Arc<ResvSaver>> {
        let (tx, rx) = sync_channel::<Weak<ResvCell>>(SAVES_QUEUED_MAX);
        std::thread::Builder::new().name("ballast-resv".into()).spawn(move || {
            for cell in rx {
                if let Some(cell) = cell.upgrade() {
                    cell.queued.store(false, Ordering::SeqCst);
                    let saved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        cell.save_now();
                    }));
                    if saved.is_err() {
                        // The store panicked: the table stays dirty (the next command saves
                        // it again) and its waiters fail rather than wait forever.
                        tracing::error!("saving NVMe reservations panicked");
                        cell.failed.fetch_max(cell.version(), Ordering::AcqRel);
                    }
                }
            }
        })?;
        Ok(Arc::new(ResvSaver { store, tx }))
    }
}

/// Where a namespace's reservation table is kept: the saver (and its store), and the
/// namespace's subsystem NQN, id and NGUID (the kept table names the NGUID: another device
/// put at the id is not it).
struct KeptAt {
    saver: Arc<ResvSaver>,
    nqn: String,
    nsid: u32,
    nguid: [u8; 16],
}

/// The table with what the saving needs to know of it.
struct Table {
    r: Reservations,
    /// A change not known to be kept yet.
    dirty: bool,
}

pub struct ResvCell {
    held: AtomicBool,
    /// Moves on with every reservation command (queues' cached verdicts name the version).
    version: AtomicU64,
    table: Mutex<Table>,
    /// Preempt and Abort's epochs: each waits for the write-group commands counted under the
    /// epoch before it.
    epoch: AtomicU64,
    executing: Box<[DrainShard]>,
    kept: Option<KeptAt>,
    /// The latest version known kept, and the latest whose save failed.
    saved: AtomicU64,
    failed: AtomicU64,
    /// Waiting for the saver thread.
    queued: AtomicBool,
    /// One save at a time; a retired cell saves nothing more.
    saving: Mutex<()>,
    retired: AtomicBool,
}

impl ResvCell {
    /// No registrations; at most `limit` ever; not kept anywhere.
    pub fn new(limit: usize) -> Arc<ResvCell> {
        ResvCell::with_table(Reservations::with_limit(limit), None)
    }

    /// The table `saver`'s store keeps for namespace `nsid` of `nqn` (NGUID `nguid`), or an
    /// empty one it can keep. A kept table that cannot be read back (another device's,
    /// damaged) is left there and logged; the namespace starts empty.
    pub fn kept(
        limit: usize,
        saver: Arc<ResvSaver>,
        nqn: &str,
        nsid: u32,
        nguid: [u8; 16],
    ) -> Arc<ResvCell> {
        let table = match saver.store.load(nqn, nsid) {
            None => Reservations::with_limit(limit).persistent(),
            Some(bytes) => match Reservations::decode(&bytes, &nguid, limit) {
                Ok(t) => {
                    tracing::info!(
                        nqn,
                        nsid,
                        held = t.held(),
                        generation = t.generation(),
                        "NVMe reservations restored (persist through power loss)"
                    );
                    t
                }
                Err(e) => {
                    tracing::warn!(nqn, nsid, error = %e, "kept NVMe reservations not restored");
                    Reservations::with_limit(limit).persistent()
                }
            },
        };
        let at = KeptAt { saver, nqn: nqn.to_string(), nsid, nguid };
        ResvCell::with_table(table, Some(at))
    }

    fn with_table(r: Reservations, kept: Option<KeptAt>) -> Arc<ResvCell> {
        let base = NEXT_BASE.fetch_add(1 << 32, Ordering::Relaxed);
        Arc::new(ResvCell {
            held: AtomicBool::new(r.held()),
            version: AtomicU64::new(base),
            table: Mutex::new(Table { r, dirty: false }),
            epoch: AtomicU64::new(0),
            executing: (0..DRAIN_SHARDS).map(|_| DrainShard::default()).collect(),
            kept,
            saved: AtomicU64::new(base),
            failed: AtomicU64::new(0),
            queued: AtomicBool::new(false),
            saving: Mutex::new(()),
            retired: AtomicBool::new(false),
        })
    }

    /// Whether a reservation is held (while none is, every host may do everything).
    pub fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// The table's version now.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// (version, may read, may write) for `host`, decided together under the lock.
    pub fn verdicts(&self, host: &HostId) -> (u64, bool, bool) {
        let t = self.table.lock();
        let version = self.version.load(Ordering::Acquire);
        let read = t.r.check(host, Access::Read).is_ok();
        let write = t.r.check(host, Access::Write).is_ok();
        (version, read, write)
    }

    /// Whether the table can be kept across restarts, and whether PTPL is on.
    pub fn persistence(&self) -> (bool, bool) {
        let t = self.table.lock();
        (t.r.can_persist(), t.r.ptpl())
    }

    /// The table now, as the control plane shows it.
    pub fn status(&self) -> ResvStatus {
        self.table.lock().r.status()
    }

    /// Reservation Report of the table now.
    pub fn report(&self, cdw11: u32, len: usize) -> Result<Vec<u8>, Status> {
        let t = self.table.lock();
        t.r.report(cdw11, len.min(t.r.report_max()))
    }

    /// Runs a reservation command on the table: its status, and the version that must be
    /// kept before it completes (`None`: nothing to wait for) — its own change while PTPL is
    /// on, or an earlier one whose save failed. A command that raises no notifications.
    pub fn command(&self, f: impl FnOnce(&mut Reservations) -> Status) -> (Status, Option<u64>) {
        self.command_then(f, |n| assert!(n.is_empty(), "notices raised and dropped"))
    }

    /// [`Self::command`], handing the notifications it raised for other hosts to `notify`
    /// while the table is still locked, so that the notifications of two commands reach a
    /// host's controllers in the order the commands changed the table (`notify` must take no
    /// lock that is held while this table's is taken).
    pub fn command_then(
        &self,
        f: impl FnOnce(&mut Reservations) -> Status,
        notify: impl FnOnce(&[Notice]),
    ) -> (Status, Option<u64>) {
        let mut t = self.table.lock();
        let nguid = self.kept.as_ref().map(|k| k.nguid);
        let before = nguid.filter(|_| t.r.ptpl()).map(|n| t.r.encode(&n));
        let st = f(&mut t.r);
        let after = nguid.filter(|_| t.r.ptpl()).map(|n| t.r.encode(&n));
        if st == status::SUCCESS && before != after {
            t.dirty = true;
        }
        self.held.store(t.r.held(), Ordering::Release);
        let version = self.version.fetch_add(1, Ordering::AcqRel) + 1;
        notify(&t.r.take_notices());
        (st, t.dirty.then_some(version))
    }

    /// Hands the table to the saver thread (already waiting there: nothing to do); false if
    /// its queue is full (the table stays dirty: the next command tries again).
    pub fn queue_save(self: &Arc<Self>) -> bool {
        let Some(k) = &self.kept else { return true };
        if self.queued.swap(true, Ordering::SeqCst) {
            return true;
        }
        match k.saver.tx.try_send(Arc::downgrade(self)) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.queued.store(false, Ordering::SeqCst);
                false
            }
        }
    }

    /// Whether version `v` is kept (`Some(true)`), its save failed (`Some(false)`), or
    /// neither yet (`None`).
    pub fn save_outcome(&self, v: u64) -> Option<bool> {
        if self.saved.load(Ordering::Acquire) >= v {
            Some(true)
        } else if self.failed.load(Ordering::Acquire) >= v {
            Some(false)
        } else {
            None
        }
    }

    /// Writes the table as it is now where it is kept (forgets it if PTPL is off), if it is
    /// dirty. Blocking: the saver thread's work.
    fn save_now(&self) {
        let Some(k) = &self.kept else { return };
        let _one_at_a_time = self.saving.lock();
        if self.retired.load(Ordering::SeqCst) {
            return;
        }
        let (bytes, version) = {
            let t = self.table.lock();
            let version = self.version.load(Ordering::Acquire);
            if !t.dirty {
                // Kept by an earlier save (which recorded its version).
                self.saved.fetch_max(version, Ordering::AcqRel);
                return;
            }
            (t.r.ptpl().then(|| t.r.encode(&k.nguid)), version)
        };
        match k.saver.store.save(&k.nqn, k.nsid, bytes.as_deref()) {
            Ok(()) => {
                let mut t = self.table.lock();
                if self.version.load(Ordering::Acquire) == version {
                    t.dirty = false;
                }
                self.saved.fetch_max(version, Ordering::AcqRel);
            }
            Err(e) => {
                tracing::warn!(nqn = k.nqn, nsid = k.nsid, error = %e, "NVMe reservation change not kept");
                self.failed.fetch_max(version, Ordering::AcqRel);
            }
        }
    }

    /// The namespace is gone: nothing more is saved, a save under way is waited for (so that
    /// forgetting what was kept, after this, is final), and commands waiting for a save fail.
    /// Blocking: control threads.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        drop(self.saving.lock());
        // Commands still waiting for a save fail (Internal Error) rather than wait forever.
        self.failed.store(u64::MAX, Ordering::SeqCst);
    }

    /// Counts a write-group command about to go to the media on core `core`, while a
    /// reservation is held (none: `None`, nothing to wait for). The caller checks the
    /// reservation again after this: a Preempt and Abort either counts the command (and waits
    /// for it) or the command sees the preempt.
    pub fn enter(&self, core: usize) -> Option<Executing> {
        if !self.held() {
            return None;
        }
        let shard = core % DRAIN_SHARDS;
        let counters = &self.executing[shard].0;
        loop {
            let parity = (self.epoch.load(Ordering::SeqCst) & 1) as usize;
            counters[parity].fetch_add(1, Ordering::SeqCst);
            if (self.epoch.load(Ordering::SeqCst) & 1) as usize == parity {
                return Some(Executing { shard: shard as u16, parity: parity as u8 });
            }
            // The epoch moved on meanwhile: count under the new one.
            counters[parity].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// The command counted by `enter` is done.
    pub fn exit(&self, e: Executing) {
        let counter = &self.executing[usize::from(e.shard)].0[usize::from(e.parity)];
        let before = counter.fetch_sub(1, Ordering::SeqCst);
        assert!(before > 0, "a command left its namespace twice");
    }

    /// Begins a new epoch for a Preempt and Abort that succeeded, once the epoch before the
    /// current one is drained (its counters are the ones the new epoch uses); the epoch
    /// returned is drained when [`ResvCell::drained`] says so. `None`: not yet, ask again.
    pub fn try_begin_drain(&self) -> Option<u64> {
        loop {
            let e = self.epoch.load(Ordering::SeqCst);
            if e > 0 && !self.drained(e - 1) {
                return None;
            }
            if self.epoch.compare_exchange(e, e + 1, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                return Some(e);
            }
        }
    }

    /// Whether no write-group command counted under epoch `old` still executes.
    pub fn drained(&self, old: u64) -> bool {
        let parity = (old & 1) as usize;
        self.executing.iter().all(|s| s.0[parity].load(Ordering::SeqCst) == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(a: u64, b: u64) -> Vec<u8> {
        [a.to_le_bytes(), b.to_le_bytes()].concat()
    }

    const A: HostId = [1; 16];
    const B: HostId = [2; 16];

    fn held_by_a(cell: &ResvCell) {
        assert_eq!(cell.command(|t| t.register(&A, 0, &keys(0, 1))).0, status::SUCCESS);
        assert_eq!(cell.command(|t| t.register(&B, 0, &keys(0, 2))).0, status::SUCCESS);
        assert_eq!(cell.command(|t| t.acquire(&A, 1 << 8, &keys(1, 0))).0, status::SUCCESS);
    }

    /// Preempt and Abort's drain: writes counted before it hold it back until they leave;
    /// writes counted after it (the next epoch) do not; nothing is counted while no
    /// reservation is held; a second drain waits until the first is over.
    #[test]
    fn a_drain_waits_for_the_writes_of_the_epoch_before_only() {
        let cell = ResvCell::new(8);
        assert_eq!(cell.enter(0), None, "nothing held: nothing counted");
        held_by_a(&cell);
        let before = [cell.enter(0).unwrap(), cell.enter(5).unwrap(), cell.enter(70).unwrap()];
        let mut told = Vec::new();
        let st = cell
            .command_then(
                |t| t.acquire(&B, (1 << 8) | 2, &keys(2, 1)),
                |n| told.extend_from_slice(n),
            )
            .0;
        assert_eq!(st, status::SUCCESS, "B preempts A and aborts");
        assert_eq!(told.iter().map(|n| n.host).collect::<Vec<_>>(), [A], "A hears, under the lock");
        let old = cell.try_begin_drain().expect("the first drain begins at once");
        assert!(!cell.drained(old));
        let after = cell.enter(5).unwrap();
        assert_ne!(after, before[1], "a later write counts under the new epoch");
        assert_eq!(cell.try_begin_drain(), None, "a second drain waits for the first");
        for e in before {
            assert!(!cell.drained(old));
            cell.exit(e);
        }
        assert!(cell.drained(old), "the writes before it are done; the one after does not count");
        let second = cell.try_begin_drain().expect("the first is over");
        assert!(!cell.drained(second), "the write of its epoch is still out");
        cell.exit(after);
        assert!(cell.drained(second));
    }

    /// Verdict versions never repeat across cells: a namespace added again is not mistaken
    /// for the one before it.
    #[test]
    fn versions_are_unique_across_cells() {
        let (one, two) = (ResvCell::new(8), ResvCell::new(8));
        held_by_a(&one);
        held_by_a(&two);
        assert_ne!(one.version(), two.version());
        assert_ne!(one.verdicts(&B).0, two.verdicts(&B).0);
    }

    /// A store that keeps tables in memory and fails while told to.
    #[derive(Default)]
    struct Memory {
        kept: Mutex<Option<Vec<u8>>>,
        fail: AtomicBool,
        saves: AtomicU64,
    }

    impl ResvStore for Memory {
        fn load(&self, _nqn: &str, _nsid: u32) -> Option<Vec<u8>> {
            self.kept.lock().clone()
        }
        fn save(&self, _nqn: &str, _nsid: u32, table: Option<&[u8]>) -> Result<(), String> {
            self.saves.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err("the store refuses (test)".into());
            }
            *self.kept.lock() = table.map(<[u8]>::to_vec);
            Ok(())
        }
    }

    fn wait_outcome(cell: &ResvCell, v: u64) -> bool {
        for _ in 0..2000 {
            if let Some(ok) = cell.save_outcome(v) {
                return ok;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("no save outcome for version {v}");
    }

    /// PTPL on: each change is saved before its command may complete; a failed save leaves
    /// the table dirty, so the host's retry (which changes nothing) saves it; the kept table
    /// opens again as it was; a retired cell saves nothing more.
    #[test]
    fn changes_are_kept_before_they_complete_and_a_failed_save_is_retried() {
        let store = Arc::new(Memory::default());
        let saver = ResvSaver::start(store.clone()).unwrap();
        let nguid = [9u8; 16];
        let cell = ResvCell::kept(8, saver.clone(), "nqn.t", 1, nguid);
        assert_eq!(cell.persistence(), (true, false));
        let (st, wait) = cell.command(|t| t.register(&B, 0, &keys(0, 2)));
        assert_eq!((st, wait), (status::SUCCESS, None), "PTPL off: nothing to keep");
        store.fail.store(true, Ordering::SeqCst);
        let (st, wait) = cell.command(|t| t.register(&A, 3 << 30, &keys(0, 1)));
        assert_eq!(st, status::SUCCESS);
        let v = wait.expect("PTPL turned on: kept before it completes");
        assert!(cell.queue_save());
        assert!(!wait_outcome(&cell, v), "the save failed");
        assert!(store.kept.lock().is_none());
        // The host retries the same Register: no change, but the table is still dirty.
        store.fail.store(false, Ordering::SeqCst);
        let (st, wait) = cell.command(|t| t.register(&A, 3 << 30, &keys(0, 1)));
        assert_eq!(st, status::SUCCESS);
        let v = wait.expect("still to be kept");
        assert!(cell.queue_save());
        assert!(wait_outcome(&cell, v));
        let back = Reservations::decode(store.kept.lock().as_ref().unwrap(), &nguid, 8).unwrap();
        assert!(back.ptpl());
        // Clean now: a command that changes nothing (refused) waits for nothing.
        let (st, wait) = cell.command(|t| t.acquire(&A, 1 << 8, &keys(99, 0)));
        assert_eq!((st, wait), (crate::resv::RESERVATION_CONFLICT, None));
        // Opened again from the store: the same table.
        let again = ResvCell::kept(8, saver.clone(), "nqn.t", 1, nguid);
        assert_eq!(again.persistence(), (true, true));
        assert_eq!(again.report(1, 192), cell.report(1, 192));
        // Another device at the id does not get it.
        assert_eq!(
            ResvCell::kept(8, saver.clone(), "nqn.t", 1, [8; 16]).persistence(),
            (true, false)
        );
        // Retired: no more saves.
        cell.retire();
        let saves = store.saves.load(Ordering::SeqCst);
        let (_, wait) = cell.command(|t| t.acquire(&A, 1 << 8, &keys(1, 0)));
        assert!(cell.queue_save());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(store.saves.load(Ordering::SeqCst), saves, "nothing saved after retiring");
        assert_eq!(cell.save_outcome(wait.unwrap()), Some(false), "its waiters fail");
    }
}
