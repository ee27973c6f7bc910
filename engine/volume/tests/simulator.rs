//! The seeded simulator: the volume core's own request code (the code the daemon runs, through
//! its reactor adapter) driven with many requests in flight on overlapping clusters, device
//! operations completing in random order, injected EIO, control operations (snapshot, clone,
//! rollback, resize, delete, create thin or thick, making a volume read-only, growing the pool
//! into a grown device, decoupling or inflating a volume) racing with I/O, copy-ups of shared
//! clusters (`Cmd::Own`, the steps of a decoupling) racing with writes, steps settling what
//! control operations left (`Cmd::Settle`: thick volumes' clusters mapped, trees of
//! deletions and rollbacks released) at any moment, before their commits too,
//! and crashes at any point (unflushed
//! writes dropped, applied, torn or reordered; operations in flight landing or not).
//!
//! Oracles:
//! - a read returns, for every 512-byte sector, a value some write could have left there: not
//!   one that a write acknowledged before the read was submitted had superseded;
//! - after a crash every sector holds a value no durable write superseded (a write is durable
//!   once a flush submitted after its acknowledgement completed, or it was FUA);
//! - a snapshot never changes: its content is read at creation and compared at every check;
//!   nor does a volume made read-only, from when the change applied (a crash undoes the change
//!   only while its commit had not completed);
//! - a write to a thick volume never finds the pool full while the volume stays thick, and a
//!   thick volume never leaves unmapped more clusters of its size than it was promised
//!   (mapped in steps: `PoolMeta::check`) nor shares
//!   one (a copy-up of it copies nothing);
//! - a copy-up changes no sector's value; a decoupled volume shares no cluster and names no
//!   parent, an inflated one is thick too;
//! - an operation whose commit completed survives a crash; one whose commit had not may or may
//!   not, but entirely;
//! - reference counts, lock table and the leak count exact (`PoolMeta::check`, `leaked`) at
//!   every checkpoint of the run, I/O and commits in flight;
//!   deleting everything at the end returns the pool to its empty baseline.
//!
//! `BALLAST_SIM_RUNS` sets the number of seeded runs (default 10,000); `BALLAST_SIM_SEED`
//! replays one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ballast_volume::locks::Waiter;
use ballast_volume::meta::{Encode, PoolMeta};
use ballast_volume::ops::ControlOp;
use ballast_volume::pool::{run, Pool, PoolGeometry, PIECE};
use ballast_volume::request::{Access, Bufs, Cmd, Ctx, DiskOp, Issue, Outcome, Request};
use ballast_volume::sim::{CrashMode, SimDisk};

const SECT: u64 = 512;
/// Linux's errno for a full device (what `request::errno` answers `NoSpace` with).
const ENOSPC: i32 = 28;
/// What `request::errno` answers `StillShared` with.
const EBUSY: i32 = 16;
/// What it answers a range beyond the volume with.
const EINVAL: i32 = 22;
const CLUSTER_SHIFT: u32 = 14;
const VOL_BYTES: u64 = 64 * 1024;
const MAX_BYTES: u64 = 2 * VOL_BYTES;
const DISK_BYTES: u64 = 2 << 20;
const STEPS: usize = 400;

/// `BALLAST_SIM_TRACE=1` prints every event of a replayed seed.
fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("BALLAST_SIM_TRACE").is_some())
}

macro_rules! trace {
    ($($t:tt)*) => { if tracing() { eprintln!($($t)*); } };
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

struct VecBufs;

impl Bufs for VecBufs {
    type B = Vec<u8>;
    fn get(&mut self, len: usize) -> Vec<u8> {
        vec![0xee; len]
    }
    fn put(&mut self, _buf: Vec<u8>) {}
}

/// One value a sector may hold: who wrote it and when.
#[derive(Clone, Debug)]
struct Ev {
    val: u64,
    sub: u64,
    ack: Option<u64>,
    durable: bool,
}

impl Ev {
    fn base(val: u64) -> Ev {
        Ev { val, sub: 0, ack: Some(0), durable: true }
    }
}

/// What the model knows of one volume.
struct VolModel {
    name: String,
    snapshot: bool,
    size: u64,
    /// Per sector of the largest size the volume may reach: the values it may hold.
    sectors: Vec<Vec<Ev>>,
    /// A snapshot's content, read when it was taken.
    fixed: Option<Vec<u64>>,
    /// Created (snapshot, clone, create) but the commit recording it has not completed.
    pending_create: bool,
    /// Deleted; the commit recording it has not completed.
    deleted: bool,
    /// Made read-only (`fixed` holds its content); the commit recording it has not completed.
    pending_read_only: bool,
    /// When `fixed` was read: a read submitted before (a volume made read-only later) may see
    /// what its writes held then.
    fixed_since: u64,
    /// Created thick, and neither snapshotted nor rolled back since.
    thick: bool,
    /// Renamed from this name; the commit recording it has not completed.
    pending_rename: Option<String>,
    /// Made thick by an inflation whose commit has not completed.
    pending_inflate: bool,
}

fn sector_value(buf: &[u8], i: usize) -> u64 {
    let s = &buf[i * SECT as usize..(i + 1) * SECT as usize];
    let v = u64::from_le_bytes(s[..8].try_into().unwrap());
    assert!(
        s.chunks(8).all(|c| u64::from_le_bytes(c.try_into().unwrap()) == v),
        "sector mixes two writes' bytes"
    );
    v
}

/// Whether `e` was certainly overwritten, for a reader that started at `t`: a later write
/// `e2` acknowledged before `t` was submitted after `e` was acknowledged.
fn superseded(evs: &[Ev], e: &Ev, t: u64, durable_only: bool) -> bool {
    let Some(a) = e.ack else { return false };
    evs.iter()
        .any(|e2| e2.ack.is_some_and(|a2| a2 < t) && a < e2.sub && (!durable_only || e2.durable))
}

fn allowed(evs: &[Ev], x: u64, sub: u64, done: u64, durable_only: bool) -> bool {
    evs.iter().any(|e| e.val == x && e.sub < done && !superseded(evs, e, sub, durable_only))
}

#[derive(Debug)]
enum Kind {
    Read {
        vol: u32,
        off: u64,
        len: u64,
        sub: u64,
    },
    /// A write (or write-zeroes/discard: value 0 events) whose sectors `first..first+n` got
    /// events at submission.
    Write {
        vol: u32,
        first: usize,
        n: usize,
        fua: bool,
        sub: u64,
        /// The volume was thick when the write was submitted.
        thick: bool,
    },
    Flush {
        sub: u64,
    },
    /// A copy-up of the shared clusters of `[off, off + len)`; `thick`: the volume was thick
    /// when it was submitted.
    Own {
        vol: u32,
        thick: bool,
    },
    /// A step of what control operations left (`Cmd::Settle`, which the daemon runs after
    /// each of them: thick volumes' clusters mapped, retired trees released), at any moment
    /// here: before their commits too.
    Settle,
    /// A control operation (the daemon's `Cmd::Control` request): what the model does when
    /// it applies; then the tick its commit covers and the volumes it makes final.
    Control {
        op: SimOp,
        name: String,
        sub: u64,
        done: Vec<u32>,
    },
}

struct Live {
    req: Request<Vec<u8>>,
    kind: Kind,
}

struct InFlight {
    req: u64,
    tag: u32,
    op: DiskOp<Vec<u8>>,
}

#[derive(Debug, Clone, Copy)]
enum SimOp {
    Snapshot {
        of: u32,
    },
    Clone {
        of: u32,
    },
    Rollback {
        vol: u32,
        to: u32,
    },
    Resize {
        vol: u32,
        size: u64,
    },
    Delete {
        vol: u32,
    },
    /// The volume becomes read-only, as a snapshot (`bdev_lvol_set_read_only`).
    SetReadOnly {
        vol: u32,
    },
    /// The volume gets a new name (`bdev_lvol_rename`), with configuration entries that go
    /// with it: `vol:NEW` set before the rename record, `vol:OLD` removed after it.
    Rename {
        vol: u32,
    },
    /// A new volume; a thick one takes all its clusters at once.
    Create {
        thick: bool,
    },
    /// The volume names no parent any more (inflating: thick too); refused while it shares a
    /// cluster (copy-ups make that rarer as the run goes).
    Decouple {
        vol: u32,
        inflate: bool,
    },
    /// The device grew to this many bytes; the pool grows into it.
    Grow {
        to: u64,
    },
}

/// The pool state as a driver hands it to a request, noting whether the request asked for it
/// exclusively.
struct Watched<'a> {
    meta: &'a mut PoolMeta,
    exclusive: bool,
}

impl Access for Watched<'_> {
    fn shared(&mut self) -> &PoolMeta {
        self.meta
    }
    fn exclusive(&mut self) -> &mut PoolMeta {
        self.exclusive = true;
        self.meta
    }
}

struct Sim {
    rng: Rng,
    seed: u64,
    disk: SimDisk,
    meta: PoolMeta,
    live: BTreeMap<u64, Live>,
    inflight: Vec<InFlight>,
    woken: VecDeque<Waiter>,
    vols: BTreeMap<u32, VolModel>,
    now: u64,
    next_req: u64,
    next_write: u64,
    /// The driver's commit timer: steps until it fires.
    timer: Option<u32>,
    control_busy: bool,
    names: u64,
    /// Names renames gave (each name is given once).
    renamed_to: BTreeSet<String>,
    eio_one_in: u64,
    commit_records: usize,
    /// Clusters in use in the empty pool.
    baseline: u64,
    /// The pool's clusters when it was made.
    first_clusters: u64,
    stats: Stats,
}

#[derive(Default, Debug)]
struct Stats {
    requests: u64,
    parked: u64,
    crashes: u64,
    eio: u64,
    controls: u64,
    reads_checked: u64,
    /// Checkpoint encodings, and those that ended with device operations in flight beside them.
    encodes: u64,
    encodes_raced: u64,
    /// Journal commits' encodings, and those that ended after their commit's data flush (the
    /// step then waits for the encoding, not the device).
    journal_encodes: u64,
    journal_encodes_late: u64,
    /// Control operations given up while their volume drained (refused `Busy`).
    expired: u64,
    /// Families' stock refills, and those that first took other families' stocks back.
    refills: u64,
    refills_taking_back: u64,
    /// Pool growths applied, and clusters beyond a pool's original size seen in use.
    grows: u64,
    grown_used: u64,
    /// Thick volumes made, and writes to thick volumes that failed (EIO, read-only: never
    /// for room).
    thick_created: u64,
    thick_writes_failed: u64,
    /// Thick volumes a crash cut short, completed or made thin when the pool reopened.
    thick_repaired: u64,
    thick_thinned: u64,
    /// Volumes made read-only, and those a crash found still writable (not yet committed).
    made_read_only: u64,
    read_only_undone: u64,
    /// Volumes renamed, and renames a crash undid (not yet committed).
    renamed: u64,
    rename_undone: u64,
    /// Copy-ups run, and the clusters they copied.
    owns: u64,
    owned_clusters: u64,
    /// Decouplings applied (of them inflations), refused because a cluster was shared, and
    /// inflations a crash undid (not yet committed).
    decoupled: u64,
    inflated: u64,
    decouple_refused: u64,
    inflate_undone: u64,
    /// Settling steps that did something, what they spent, retired trees a crash found
    /// waiting (their clusters held whole), and clusters a crash found promised to thick
    /// volumes and not yet mapped.
    settles: u64,
    settled: u64,
    retired_at_crash: u64,
    promised_at_crash: u64,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        // Half the runs start on part of the disk, and grow into the rest as they go.
        let start_bytes = if rng.chance(2) { DISK_BYTES / 4 } else { DISK_BYTES };
        let disk = SimDisk::new(start_bytes, rng.next());
        let g = PoolGeometry {
            cluster_shift: CLUSTER_SHIFT,
            journal_blocks: 16 + rng.below(48),
            pool_uuid: [7; 16],
            max_volumes: 64,
            config_bytes: 256,
        };
        let mut pool = Pool::format(disk, g).expect("format");
        let baseline = pool.meta().used_clusters();
        let first_clusters = pool.meta().superblock().cluster_count;
        let mut vols = BTreeMap::new();
        for name in ["a", "b"] {
            let id = pool.create_volume(name, VOL_BYTES).expect("create");
            vols.insert(id, VolModel::fresh(name, VOL_BYTES));
        }
        let (disk, mut meta) = pool.into_parts();
        let commit_records = 8 + rng.below(64) as usize;
        meta.set_commit_records(commit_records);
        let eio_one_in = if rng.chance(3) { 150 } else { 0 };
        Sim {
            rng,
            seed,
            disk,
            meta,
            live: BTreeMap::new(),
            inflight: Vec::new(),
            woken: VecDeque::new(),
            vols,
            now: 1,
            next_req: 1,
            next_write: 1,
            timer: None,
            control_busy: false,
            names: 0,
            renamed_to: BTreeSet::new(),
            eio_one_in,
            commit_records,
            baseline,
            first_clusters,
            stats: Stats::default(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.now += 1;
        self.now
    }

    /// Writable volumes the model can address now.
    fn writable(&self) -> Vec<u32> {
        self.vols.iter().filter(|(_, v)| !v.snapshot && !v.deleted).map(|(id, _)| *id).collect()
    }

    fn any_volume(&self) -> Vec<u32> {
        self.vols.iter().filter(|(_, v)| !v.deleted).map(|(id, _)| *id).collect()
    }

    /// Feeds one event to request `id` and carries out what follows.
    fn feed(
        &mut self,
        id: u64,
        ev: impl FnOnce(&mut Request<Vec<u8>>, &mut Ctx<'_, VecBufs>) -> Outcome<Vec<u8>>,
    ) {
        let mut out: Vec<Issue<Vec<u8>>> = Vec::new();
        let live = self.live.get_mut(&id).expect("live request");
        // A completion that leaves its request with operations in flight (a step's other
        // operations: a commit's flush beside its encoding, a read's other pieces) decides
        // under a shared borrow at most: the daemon's other cores go on deciding meanwhile.
        let mid_step = self.inflight.iter().any(|f| f.req == id);
        let mut watched = Watched { meta: &mut self.meta, exclusive: false };
        let outcome = {
            let mut bufs = VecBufs;
            let mut cx = Ctx { meta: &mut watched, bufs: &mut bufs, out: &mut out };
            ev(&mut live.req, &mut cx)
        };
        assert!(
            !(mid_step && watched.exclusive),
            "seed {}: request {id} borrowed the pool state exclusively with operations in flight",
            self.seed
        );
        if live.req.parked() {
            self.stats.parked += 1;
        }
        for Issue { tag, op } in out {
            self.inflight.push(InFlight { req: id, tag, op });
        }
        let mut w = Vec::new();
        self.meta.take_woken(&mut w);
        self.woken.extend(w);
        let applied = self.live.get_mut(&id).expect("live").req.take_applied();
        if let Some(new_id) = applied {
            self.control_applied(id, new_id);
        }
        if let Outcome::Done { result, buf } = outcome {
            let live = self.live.remove(&id).expect("live");
            self.finished(live.kind, result, buf);
            if self.meta.take_background_commit() {
                self.submit(Kind::Flush { sub: self.now }, Cmd::Flush, 0);
            } else if self.meta.take_commit_timer() {
                assert!(self.timer.is_none(), "seed {}: two commit timers armed", self.seed);
                self.timer = Some(5 + self.rng.below(60) as u32);
            }
        }
    }

    fn submit(&mut self, kind: Kind, cmd: Cmd<Vec<u8>>, vol: u32) {
        let id = self.next_req;
        self.next_req += 1;
        self.stats.requests += 1;
        let req = Request::new(vol, cmd, Waiter(id));
        trace!("t{} submit r{id} {kind:?}", self.now);
        self.live.insert(id, Live { req, kind });
        self.feed(id, |r, cx| r.start(cx));
    }

    /// A request replied.
    fn finished(&mut self, kind: Kind, result: i32, buf: Option<Vec<u8>>) {
        let now = self.tick();
        trace!("t{now} done {kind:?} -> {result}");
        match kind {
            Kind::Read { vol, off, len, sub } => {
                if result < 0 {
                    return;
                }
                assert_eq!(result as u64, len, "seed {}: short read", self.seed);
                let buf = buf.expect("read buffer");
                // Reads do not hold off a delete: one may finish after its volume went.
                let Some(m) = self.vols.get(&vol) else { return };
                for i in 0..(len / SECT) as usize {
                    let s = (off / SECT) as usize + i;
                    let x = sector_value(&buf, i);
                    if let Some(fixed) = m.fixed.as_ref().filter(|_| sub > m.fixed_since) {
                        assert_eq!(
                            x, fixed[s],
                            "seed {}: snapshot {} sector {s} changed",
                            self.seed, m.name
                        );
                    }
                    assert!(
                        allowed(&m.sectors[s], x, sub, now, false),
                        "seed {}: volume {} sector {s} read {x:#x}; possible: {:?}",
                        self.seed,
                        m.name,
                        m.sectors[s]
                    );
                }
                self.stats.reads_checked += 1;
            }
            Kind::Write { vol, first, n, fua, sub, thick } => {
                if result < 0 {
                    // A thick volume has every cluster it writes: never short of room while
                    // it stays thick (a snapshot or rollback, which drain writes first, makes
                    // it thin; so does a crash that cut its creation or growth short when the
                    // pool lacks the room to complete it at open).
                    let still = self.meta.volumes().get(&vol).is_some_and(|v| v.thick);
                    assert!(
                        !(thick && still && result == -ENOSPC),
                        "seed {}: a write to thick volume {vol} found the pool full",
                        self.seed
                    );
                    if thick && still {
                        self.stats.thick_writes_failed += 1;
                    }
                    return; // never acknowledged: its events stay possible, never superseding
                }
                // A FUA write's data was in place before a delete drained the volume; its reply
                // waited for a commit that came after.
                let Some(m) = self.vols.get_mut(&vol) else { return };
                for s in first..first + n {
                    for e in m.sectors[s].iter_mut().filter(|e| e.sub == sub && e.ack.is_none()) {
                        e.ack = Some(now);
                    }
                }
                if fua {
                    self.durable_before(sub, Some((vol, first, n, sub)));
                }
            }
            Kind::Flush { sub } => {
                if result == 0 {
                    self.durable_before(sub, None);
                }
            }
            Kind::Settle => {
                assert!(
                    result >= 0 || self.meta.failed().is_some(),
                    "seed {}: a settling step of a sound pool failed: {result}",
                    self.seed
                );
                if result > 0 {
                    self.stats.settles += 1;
                    self.stats.settled += result as u64;
                }
            }
            Kind::Own { vol, thick } => {
                // Nothing to check in the model: a copy-up changes no value (reads and crash
                // checks see that). A thick volume shares nothing: nothing to copy.
                let still = self.meta.volumes().get(&vol).is_some_and(|v| v.thick);
                assert!(
                    !(thick && still && result > 0),
                    "seed {}: a copy-up of thick volume {vol} copied {result} clusters",
                    self.seed
                );
                assert_ne!(
                    result, -EINVAL,
                    "seed {}: a copy-up of volume {vol} refused",
                    self.seed
                );
                if result >= 0 {
                    self.stats.owns += 1;
                    self.stats.owned_clusters += result as u64;
                }
            }
            Kind::Control { sub, done, op, .. } => {
                self.control_busy = false;
                if matches!(op, SimOp::Decouple { .. }) && result == -EBUSY {
                    self.stats.decouple_refused += 1; // a cluster still shared
                }
                if result >= 0 {
                    self.durable_before(sub, None);
                    for id in done {
                        if let Some(m) = self.vols.get_mut(&id) {
                            m.pending_create = false;
                            m.pending_read_only = false;
                            m.pending_rename = None;
                            m.pending_inflate = false;
                            if m.deleted {
                                self.vols.remove(&id);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Every write acknowledged before `sub` is durable (and the FUA write itself).
    fn durable_before(&mut self, sub: u64, fua: Option<(u32, usize, usize, u64)>) {
        for (id, m) in self.vols.iter_mut() {
            for (s, evs) in m.sectors.iter_mut().enumerate() {
                for e in evs.iter_mut() {
                    let own = fua
                        .is_some_and(|(v, f, n, t)| v == *id && s >= f && s < f + n && e.sub == t);
                    if e.ack.is_some_and(|a| a < sub) || own {
                        e.durable = true;
                    }
                }
            }
        }
    }

    /// Completes one device operation chosen at random (maybe with EIO).
    fn complete_one(&mut self) {
        let i = self.rng.below(self.inflight.len() as u64) as usize;
        let InFlight { req, tag, op } = self.inflight.swap_remove(i);
        let fail = self.eio_one_in > 0 && self.rng.chance(self.eio_one_in);
        trace!(
            "t{} complete r{req} tag {tag:#x} {} fail={fail}",
            self.now,
            match &op {
                DiskOp::Read { offset, buf } => format!("read {offset:#x}+{:#x}", buf.len()),
                DiskOp::Write { offset, buf, fua } =>
                    format!("write {offset:#x}+{:#x} fua={fua}", buf.len()),
                DiskOp::Flush => "flush".into(),
                DiskOp::Encode(_) => "encode".into(),
            }
        );
        if let DiskOp::Encode(job) = op {
            if let Encode::Journal(_) = job {
                self.stats.journal_encodes += 1;
                let flushing =
                    self.inflight.iter().any(|f| f.req == req && matches!(f.op, DiskOp::Flush));
                self.stats.journal_encodes_late += u64::from(!flushing);
            } else {
                self.stats.encodes += 1;
                self.stats.encodes_raced += u64::from(!self.inflight.is_empty());
            }
            // CPU work, not the device's: it cannot fail, and it ends whenever the driver's
            // thread gets to it (here: at a random point among the device's completions).
            return self.feed(req, |r, cx| r.on_encoded(cx, tag, job.run()));
        }
        if fail {
            self.stats.eio += 1;
        }
        let (result, buf) = match op {
            DiskOp::Read { offset, mut buf } => {
                if fail {
                    (-libc::EIO, Some(buf))
                } else {
                    let d = self.disk.read(offset, buf.len());
                    buf.copy_from_slice(&d);
                    (buf.len() as i32, Some(buf))
                }
            }
            DiskOp::Write { offset, buf, fua } => {
                if fail {
                    (-libc::EIO, Some(buf))
                } else {
                    self.disk.write(offset, &buf, fua);
                    (buf.len() as i32, Some(buf))
                }
            }
            DiskOp::Flush => {
                if fail {
                    (-libc::EIO, None)
                } else {
                    self.disk.flush();
                    (0, None)
                }
            }
            DiskOp::Encode(_) => unreachable!("encodings completed above"),
        };
        self.feed(req, |r, cx| r.on_completion(cx, tag, result, buf));
    }

    fn wake_one(&mut self) {
        let w = self.woken.pop_front().expect("woken");
        trace!("t{} wake r{}", self.now, w.0);
        if self.live.contains_key(&w.0) {
            self.feed(w.0, |r, cx| r.on_wake(cx));
        }
    }

    /// A random new request.
    fn new_request(&mut self) {
        let sub = self.tick();
        match self.rng.below(10) {
            0..=2 => {
                let vols = self.any_volume();
                let vol = vols[self.rng.below(vols.len() as u64) as usize];
                let size = self.vols[&vol].size;
                let (off, len) = self.range(size);
                let buf = vec![0xaa; len as usize];
                self.submit(Kind::Read { vol, off, len, sub }, Cmd::Read { offset: off, buf }, vol);
            }
            3..=6 => {
                let vols = self.writable();
                if vols.is_empty() {
                    return;
                }
                let vol = vols[self.rng.below(vols.len() as u64) as usize];
                let size = self.vols[&vol].size;
                let (off, len) = self.range(size);
                let fua = self.rng.chance(8);
                let w = self.next_write;
                self.next_write += 1;
                let mut buf = vec![0u8; len as usize];
                let first = (off / SECT) as usize;
                let n = (len / SECT) as usize;
                let m = self.vols.get_mut(&vol).expect("volume");
                for i in 0..n {
                    let val = (w << 32) | (first + i) as u64;
                    for c in buf[i * SECT as usize..(i + 1) * SECT as usize].chunks_mut(8) {
                        c.copy_from_slice(&val.to_le_bytes());
                    }
                    m.sectors[first + i].push(Ev { val, sub, ack: None, durable: false });
                }
                let thick = self.meta.volumes()[&vol].thick;
                self.submit(
                    Kind::Write { vol, first, n, fua, sub, thick },
                    Cmd::Write { offset: off, buf, fua },
                    vol,
                );
            }
            7 if self.rng.chance(3) => {
                // A copy-up: of the whole volume (as a decoupling's pass), or of a range.
                let vols = self.writable();
                if vols.is_empty() {
                    return;
                }
                let vol = vols[self.rng.below(vols.len() as u64) as usize];
                let size = self.vols[&vol].size;
                // Whole; a range; or from anywhere below the largest size (a volume shrunk
                // meanwhile: past its end is nothing to copy, not an error).
                let (off, len) = match self.rng.below(3) {
                    0 => (0, MAX_BYTES),
                    1 => self.range(size),
                    _ => {
                        let off = self.rng.below(MAX_BYTES / PIECE) * PIECE;
                        (off, MAX_BYTES - off)
                    }
                };
                let thick = self.meta.volumes()[&vol].thick;
                let in_place = self.rng.chance(2);
                self.submit(Kind::Own { vol, thick }, Cmd::Own { offset: off, len, in_place }, vol);
            }
            7 => {
                let vols = self.writable();
                if vols.is_empty() {
                    return;
                }
                let vol = vols[self.rng.below(vols.len() as u64) as usize];
                let size = self.vols[&vol].size;
                let (mut off, mut len) = self.range(size);
                let discard = self.rng.chance(2);
                if discard {
                    // Discard is advisory: the model knows what it does to whole pieces only.
                    off = off / PIECE * PIECE;
                    len = len.next_multiple_of(PIECE).min(size - off);
                }
                let first = (off / SECT) as usize;
                let n = (len / SECT) as usize;
                let m = self.vols.get_mut(&vol).expect("volume");
                for s in first..first + n {
                    m.sectors[s].push(Ev { val: 0, sub, ack: None, durable: false });
                }
                let cmd = if discard {
                    Cmd::Discard { offset: off, len }
                } else {
                    Cmd::WriteZeroes { offset: off, len, unmap: self.rng.chance(2) }
                };
                let thick = self.meta.volumes()[&vol].thick;
                self.submit(Kind::Write { vol, first, n, fua: false, sub, thick }, cmd, vol);
            }
            8 if self.rng.chance(2) => self.submit(Kind::Settle, Cmd::Settle, 0),
            // A checkpoint asked for (a clean shutdown, `pool checkpoint`) makes every
            // acknowledged write durable just as a flush does.
            _ if self.rng.chance(4) => self.submit(Kind::Flush { sub }, Cmd::Checkpoint, 0),
            _ => self.submit(Kind::Flush { sub }, Cmd::Flush, 0),
        }
    }

    /// A sector-aligned range inside `size`: mostly small, sometimes unaligned to pieces,
    /// sometimes spanning clusters.
    fn range(&mut self, size: u64) -> (u64, u64) {
        let sectors = size / SECT;
        let aligned = self.rng.chance(2);
        let (off, len) = if aligned {
            let pieces = size / PIECE;
            let p = self.rng.below(pieces);
            let n = 1 + self.rng.below(6.min(pieces - p));
            (p * PIECE, n * PIECE)
        } else {
            let s = self.rng.below(sectors);
            let n = 1 + self.rng.below(40.min(sectors - s));
            (s * SECT, n * SECT)
        };
        (off, len)
    }

    /// Starts a control operation (one at a time, as the control thread does).
    fn new_control(&mut self) {
        if self.control_busy {
            return;
        }
        let vols = self.writable();
        let snaps: Vec<u32> =
            self.vols.iter().filter(|(_, v)| v.snapshot && !v.deleted).map(|(id, _)| *id).collect();
        let op = match self.rng.below(8) {
            0 if !vols.is_empty() => {
                SimOp::Snapshot { of: vols[self.rng.below(vols.len() as u64) as usize] }
            }
            1 if !snaps.is_empty() => {
                SimOp::Clone { of: snaps[self.rng.below(snaps.len() as u64) as usize] }
            }
            2 if !snaps.is_empty() => {
                let to = snaps[self.rng.below(snaps.len() as u64) as usize];
                let parent = self.meta.volumes()[&to].parent;
                match self.vols.get(&parent) {
                    Some(m) if !m.deleted && !m.snapshot => SimOp::Rollback { vol: parent, to },
                    _ => return,
                }
            }
            3 if !vols.is_empty() => {
                let vol = vols[self.rng.below(vols.len() as u64) as usize];
                let size = (1 + self.rng.below(MAX_BYTES / PIECE)) * PIECE;
                SimOp::Resize { vol, size }
            }
            4 => {
                let all = self.any_volume();
                if all.len() <= 1 {
                    return;
                }
                SimOp::Delete { vol: all[self.rng.below(all.len() as u64) as usize] }
            }
            5 if self.vols.len() < 8 => SimOp::Create { thick: self.rng.chance(2) },
            6 if self.disk.size_bytes() < DISK_BYTES => {
                let room = (DISK_BYTES - self.disk.size_bytes()) / PIECE;
                SimOp::Grow { to: self.disk.size_bytes() + (1 + self.rng.below(room)) * PIECE }
            }
            7 if vols.len() > 1 && self.rng.chance(2) => {
                SimOp::SetReadOnly { vol: vols[self.rng.below(vols.len() as u64) as usize] }
            }
            7 if !vols.is_empty() && self.rng.chance(2) => SimOp::Decouple {
                vol: vols[self.rng.below(vols.len() as u64) as usize],
                inflate: self.rng.chance(2),
            },
            7 => {
                let all = self.any_volume();
                SimOp::Rename { vol: all[self.rng.below(all.len() as u64) as usize] }
            }
            _ => return,
        };
        self.stats.controls += 1;
        let name = format!("n{}", self.names);
        self.names += 1;
        let real = match op {
            SimOp::Snapshot { of } => ControlOp::Snapshot { of, name: name.clone() },
            SimOp::Clone { of } => ControlOp::Clone { of, name: name.clone() },
            SimOp::Rollback { vol, to } => ControlOp::Rollback { id: vol, to },
            SimOp::Resize { vol, size } => {
                ControlOp::Resize { id: vol, size_bytes: size, force: true }
            }
            SimOp::Delete { vol } => ControlOp::Delete { id: vol },
            SimOp::SetReadOnly { vol } => ControlOp::SetReadOnly { id: vol },
            SimOp::Decouple { vol, inflate } => ControlOp::Decouple { id: vol, inflate },
            SimOp::Rename { vol } => ControlOp::Rename {
                id: vol,
                name: name.clone(),
                before: vec![(format!("vol:{name}"), vol.to_string())],
                after: vec![(format!("vol:{}", self.vols[&vol].name), String::new())],
            },
            SimOp::Create { thick } => {
                ControlOp::Create { name: name.clone(), size_bytes: VOL_BYTES, thick }
            }
            SimOp::Grow { to } => {
                // The device grows now (a crash keeps it grown); the pool follows when the
                // request runs.
                self.disk.grow(to);
                ControlOp::Grow { total_bytes: to }
            }
        };
        // As the daemon's control thread does: one at a time, a request like any other.
        self.control_busy = true;
        let kind = Kind::Control { op, name, sub: 0, done: Vec::new() };
        self.submit(kind, Cmd::Control(real), 0);
    }

    /// The driver gives up a control operation's drain (its deadline), as the daemon does.
    fn expire_control(&mut self) {
        let Some((&id, _)) = self.live.iter().find(|(_, l)| l.req.draining()) else { return };
        trace!("t{} expire r{id}", self.now);
        self.feed(id, |r, cx| r.expire(cx));
        self.stats.expired += u64::from(!self.live.contains_key(&id));
    }
    /// Reads a whole volume now, through a request run synchronously (reads never park).
    fn observe(&mut self, id: u32) -> Vec<u64> {
        let size = self.meta.volumes()[&id].size_bytes;
        let buf = vec![0u8; size as usize];
        let (_, buf) = run(&mut self.disk, &mut self.meta, id, Cmd::Read { offset: 0, buf })
            .unwrap_or_else(|e| panic!("seed {}: observing volume {id}: {e}", self.seed));
        let buf = buf.expect("buffer");
        (0..(size / SECT) as usize).map(|i| sector_value(&buf, i)).collect()
    }

    /// A control operation request applied (its commit runs next): the model follows, looking
    /// at the pool state as the operation left it.
    fn control_applied(&mut self, req: u64, id: u32) {
        let now = self.tick();
        let (op, name) = match &self.live[&req].kind {
            Kind::Control { op, name, .. } => (*op, name.clone()),
            other => panic!("seed {}: {other:?} applied a control operation", self.seed),
        };
        trace!("t{now} control {op:?} applied -> {id}");
        let mut done = Vec::new();
        match op {
            SimOp::Snapshot { of } => {
                let content = self.observe(id);
                check_against(self.seed, &self.vols[&of], &content, now);
                self.vols.get_mut(&of).expect("origin").thick = false;
                let mut m = VolModel::fresh(&name, self.meta.volumes()[&id].size_bytes);
                m.snapshot = true;
                m.pending_create = true;
                for (s, x) in content.iter().enumerate() {
                    m.sectors[s] = vec![Ev::base(*x)];
                }
                m.fixed = Some(content);
                self.vols.insert(id, m);
                done.push(id);
            }
            SimOp::Clone { of } => {
                let src = self.vols[&of].fixed.clone().expect("a snapshot's content");
                let mut m = VolModel::fresh(&name, self.meta.volumes()[&id].size_bytes);
                m.pending_create = true;
                for (s, x) in src.iter().enumerate() {
                    m.sectors[s] = vec![Ev::base(*x)];
                }
                self.vols.insert(id, m);
                done.push(id);
            }
            SimOp::Rollback { vol, to } => {
                let src = self.vols[&to].fixed.clone().expect("a snapshot's content");
                let size = self.meta.volumes()[&vol].size_bytes;
                let m = self.vols.get_mut(&vol).expect("volume");
                m.thick = false;
                for s in 0..(MAX_BYTES / SECT) as usize {
                    let val = src.get(s).copied().unwrap_or(0);
                    m.sectors[s].push(Ev { val, sub: now, ack: Some(now), durable: false });
                }
                m.size = size;
            }
            SimOp::Resize { vol, size } => {
                let m = self.vols.get_mut(&vol).expect("volume");
                if size < m.size {
                    for s in (size / SECT) as usize..(MAX_BYTES / SECT) as usize {
                        m.sectors[s].push(Ev { val: 0, sub: now, ack: Some(now), durable: false });
                    }
                }
                m.size = size;
            }
            SimOp::Delete { vol } => {
                self.vols.get_mut(&vol).expect("volume").deleted = true;
                done.push(vol);
            }
            SimOp::SetReadOnly { vol } => {
                // Its writes drained before it applied: what it holds now is what it keeps.
                let content = self.observe(vol);
                check_against(self.seed, &self.vols[&vol], &content, now);
                assert!(
                    self.meta.volumes()[&vol].read_only,
                    "seed {}: volume {vol} made read-only is not",
                    self.seed
                );
                let m = self.vols.get_mut(&vol).expect("volume");
                m.snapshot = true;
                m.pending_read_only = true;
                m.fixed = Some(content);
                m.fixed_since = now;
                self.stats.made_read_only += 1;
                done.push(vol);
            }
            SimOp::Rename { vol } => {
                assert_eq!(
                    self.meta.volumes()[&vol].name,
                    name,
                    "seed {}: volume {vol} renamed is not called so",
                    self.seed
                );
                let m = self.vols.get_mut(&vol).expect("volume");
                let old = std::mem::replace(&mut m.name, name);
                // Control operations run one at a time, each durable when it answers.
                assert!(m.pending_rename.is_none(), "seed {}: two renames pending", self.seed);
                m.pending_rename = Some(old);
                self.renamed_to.insert(m.name.clone());
                self.stats.renamed += 1;
                done.push(vol);
            }
            SimOp::Create { thick } => {
                if thick {
                    self.stats.thick_created += 1;
                    assert!(
                        self.meta.volumes()[&id].thick,
                        "seed {}: thick volume {id} made thin",
                        self.seed
                    );
                }
                let mut m = VolModel::fresh(&name, VOL_BYTES);
                m.pending_create = true;
                m.thick = thick;
                self.vols.insert(id, m);
                done.push(id);
            }
            SimOp::Decouple { vol, inflate } => {
                // Its writes drained: it reads what it held, shares nothing, names no parent.
                let content = self.observe(vol);
                check_against(self.seed, &self.vols[&vol], &content, now);
                let v = self.meta.volumes()[&vol].clone();
                assert!(
                    v.parent == 0 && (v.thick || !inflate),
                    "seed {}: volume {vol} decoupled (inflate {inflate}) is {v:?}",
                    self.seed
                );
                // Inflated: thick from now on, before its commit is durable, so not one of
                // its clusters may need copying on a write.
                let shared = self.meta.shared_clusters(vol, inflate).expect("a live volume");
                assert_eq!(
                    shared, 0,
                    "seed {}: volume {vol} decoupled (inflate {inflate}) has clusters a write \
                     would copy",
                    self.seed
                );
                let m = self.vols.get_mut(&vol).expect("volume");
                if inflate && !m.thick {
                    m.thick = true;
                    m.pending_inflate = true;
                }
                self.stats.decoupled += 1;
                self.stats.inflated += u64::from(inflate);
                done.push(vol);
            }
            SimOp::Grow { .. } => self.stats.grows += 1,
        }
        let sub = self.tick();
        if let Some(Live { kind: Kind::Control { sub: s, done: d, .. }, .. }) =
            self.live.get_mut(&req)
        {
            *s = sub;
            *d = done;
        }
    }

    /// Power cut: operations in flight land or not, the cache drops/applies/tears, reopen,
    /// and every volume is checked against what may have survived.
    fn crash(&mut self) {
        self.stats.crashes += 1;
        self.stats.retired_at_crash += self.meta.retired_trees() as u64;
        self.stats.promised_at_crash += self.meta.promised_clusters();
        self.count_refills();
        for f in std::mem::take(&mut self.inflight) {
            if let DiskOp::Write { offset, buf, fua } = f.op {
                if self.rng.chance(2) {
                    self.disk.write(offset, &buf, fua);
                }
            }
        }
        let mode = match self.rng.below(3) {
            0 => CrashMode::DropAll,
            1 => CrashMode::ApplyAll,
            _ => CrashMode::Random,
        };
        self.disk.crash(mode);
        trace!("t{} crash {mode:?}", self.now);
        let control = self.live.values().find_map(|l| match l.kind {
            Kind::Control { op, .. } => Some(op),
            _ => None,
        });
        self.live.clear();
        self.woken.clear();
        self.timer = None;
        self.control_busy = false;
        let disk = std::mem::replace(&mut self.disk, SimDisk::new(SECT * 8, 1));
        let pool = Pool::open(disk)
            .unwrap_or_else(|e| panic!("seed {}: reopen after a {mode:?} crash: {e}", self.seed));
        let (disk, mut meta) = pool.into_parts();
        meta.set_commit_records(self.commit_records);
        let (mapped, thinned) = meta.thick_repairs();
        self.stats.thick_repaired += mapped;
        self.stats.thick_thinned += thinned;
        self.disk = disk;
        self.meta = meta;
        let now = self.tick();
        let named =
            |m: &VolModel, name: &str| m.name == name || m.pending_rename.as_deref() == Some(name);
        for (id, v) in &self.meta.volumes() {
            assert!(
                self.vols.get(id).is_some_and(|m| named(m, &v.name)),
                "seed {}: volume {} appeared in a crash",
                self.seed,
                v.name
            );
        }
        let ids: Vec<u32> = self.vols.keys().copied().collect();
        for id in ids {
            let exists =
                self.meta.volumes().get(&id).is_some_and(|v| named(&self.vols[&id], &v.name));
            let m = &self.vols[&id];
            if !exists {
                assert!(
                    m.pending_create || m.deleted,
                    "seed {}: volume {} lost in a crash after its commit",
                    self.seed,
                    m.name
                );
                self.vols.remove(&id);
                continue;
            }
            let m = self.vols.get_mut(&id).expect("volume");
            m.deleted = false;
            m.pending_create = false;
            m.size = self.meta.volumes()[&id].size_bytes;
            if self.meta.volumes()[&id].read_only != m.snapshot {
                // Only a change to read-only not yet committed may be undone by a crash.
                assert!(
                    m.pending_read_only && m.snapshot,
                    "seed {}: volume {} read-only {} after a crash, the model says {}",
                    self.seed,
                    m.name,
                    !m.snapshot,
                    m.snapshot
                );
                m.snapshot = false;
                m.fixed = None;
                self.stats.read_only_undone += 1;
            }
            m.pending_read_only = false;
            let name = self.meta.volumes()[&id].name.clone();
            if m.pending_rename.take().is_some() && name != m.name {
                self.stats.rename_undone += 1;
            }
            if self.renamed_to.contains(&name) {
                // A name given by a rename comes with its configuration entry, set before it.
                let kept = self.meta.config().get(&format!("vol:{name}")).cloned();
                assert_eq!(
                    kept,
                    Some(id.to_string()),
                    "seed {}: volume {id} called {name} after a crash lacks its entry",
                    self.seed
                );
            }
            m.name = name;
            let thick = self.meta.volumes()[&id].thick;
            if m.thick && !thick && m.pending_inflate {
                // An inflation whose commit had not completed: undone.
                self.stats.inflate_undone += 1;
            } else if m.thick && !thick {
                // Only a creation or growth a crash cut short, which the pool then lacked the
                // room to complete, leaves it thin.
                assert!(
                    m.pending_create
                        || matches!(control, Some(SimOp::Resize { vol, .. }) if vol == id),
                    "seed {}: thick volume {} thin after a crash",
                    self.seed,
                    m.name
                );
            }
            m.thick = thick;
            m.pending_inflate = false;
            let content = self.observe(id);
            let m = &self.vols[&id];
            if let Some(fixed) = &m.fixed {
                assert_eq!(
                    &content, fixed,
                    "seed {}: snapshot {} changed in a crash",
                    self.seed, m.name
                );
            }
            for (s, x) in content.iter().enumerate() {
                assert!(
                    allowed(&m.sectors[s], *x, now, now, true),
                    "seed {}: after a {mode:?} crash volume {} sector {s} holds {x:#x}; possible: {:?}",
                    self.seed,
                    m.name,
                    m.sectors[s]
                );
            }
            // What survived is now the durable base.
            let m = self.vols.get_mut(&id).expect("volume");
            for (s, evs) in m.sectors.iter_mut().enumerate() {
                *evs = vec![Ev::base(content.get(s).copied().unwrap_or(0))];
            }
        }
        self.check_meta();
    }

    fn check_meta(&mut self) {
        if self.meta.free_clusters() < self.meta.superblock().cluster_count - self.first_clusters {
            // Some cluster beyond the pool's first size is in use.
            self.stats.grown_used += 1;
        }
        let problems = self.meta.check();
        assert!(problems.is_empty(), "seed {}: {problems:?}", self.seed);
        // Exact under load: every allocated cluster is referenced, on its way to being free,
        // or a write span's fresh cluster in flight (what `bdev_lvol_check` reports online).
        assert_eq!(self.meta.leaked(), 0, "seed {}: leaked clusters mid-run", self.seed);
    }

    fn step(&mut self) {
        if self.meta.failed().is_some() && self.rng.chance(4) {
            return self.crash();
        }
        if let Some(t) = self.timer.as_mut() {
            *t -= 1;
            if *t == 0 {
                self.timer = None;
                if self.meta.commit_timer_fired() {
                    self.submit(Kind::Flush { sub: self.now }, Cmd::Flush, 0);
                }
            }
        }
        match self.rng.below(100) {
            0..=29 => self.new_request(),
            30..=79 if !self.inflight.is_empty() => self.complete_one(),
            30..=79 if !self.woken.is_empty() => self.wake_one(),
            80..=89 if !self.woken.is_empty() => self.wake_one(),
            90..=93 => self.new_control(),
            94 if self.rng.chance(3) => self.crash(),
            95 if self.rng.chance(4) => self.expire_control(),
            _ => {}
        }
    }

    /// Lets everything in flight finish (no new work), then checks the state.
    fn drain(&mut self) {
        let mut guard = 0;
        while !self.inflight.is_empty() || !self.woken.is_empty() {
            guard += 1;
            assert!(guard < 1_000_000, "seed {}: requests never finish", self.seed);
            if !self.woken.is_empty() && (self.inflight.is_empty() || self.rng.chance(2)) {
                self.wake_one();
            } else if !self.inflight.is_empty() {
                self.complete_one();
            }
        }
        if self.meta.failed().is_none() {
            assert!(
                self.live.is_empty(),
                "seed {}: requests parked with nothing to wake them: {:?}",
                self.seed,
                self.live.values().map(|l| &l.kind).collect::<Vec<_>>()
            );
            assert_eq!(self.meta.parked(), 0, "seed {}: waiters left", self.seed);
            assert_eq!(self.meta.lock_slots(), 0, "seed {}: locks left", self.seed);
        }
        self.check_meta();
    }

    /// Deletes everything: the pool returns to its empty baseline.
    fn delete_all(mut self) {
        if self.meta.failed().is_some() {
            self.crash();
        }
        let seed = self.seed;
        let baseline = self.baseline;
        let mut pool = Pool::from_parts(self.disk, self.meta);
        let mut ids: Vec<u32> = pool.volumes().keys().copied().collect();
        ids.sort_unstable_by(|a, b| b.cmp(a)); // children first
        for id in ids {
            pool.delete(id).unwrap_or_else(|e| panic!("seed {seed}: delete {id}: {e}"));
        }
        pool.flush().expect("flush");
        pool.check().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(pool.leaked(), 0, "seed {seed}: leaked clusters");
        assert_eq!(pool.meta().used_clusters(), baseline, "seed {seed}: space not returned");
    }
}

impl VolModel {
    fn fresh(name: &str, size: u64) -> VolModel {
        VolModel {
            name: name.into(),
            snapshot: false,
            size,
            sectors: vec![vec![Ev::base(0)]; (MAX_BYTES / SECT) as usize],
            fixed: None,
            pending_create: false,
            deleted: false,
            pending_read_only: false,
            fixed_since: 0,
            thick: false,
            pending_rename: None,
            pending_inflate: false,
        }
    }
}

/// A quiesced volume's content read now is what its model allows.
fn check_against(seed: u64, m: &VolModel, content: &[u64], now: u64) {
    for (s, x) in content.iter().enumerate() {
        assert!(
            allowed(&m.sectors[s], *x, now, now + 1, false),
            "seed {seed}: volume {} sector {s} holds {x:#x} when snapshotted; possible: {:?}",
            m.name,
            m.sectors[s]
        );
    }
}

impl Sim {
    /// Adds the open pool's stock refills to the run's (before the pool state goes).
    fn count_refills(&mut self) {
        let (refills, taking_back) = self.meta.refills();
        self.stats.refills += refills;
        self.stats.refills_taking_back += taking_back;
    }
}

fn run_seed(seed: u64) -> Stats {
    let mut sim = Sim::new(seed);
    for i in 0..STEPS {
        sim.step();
        if i % 97 == 0 {
            sim.check_meta();
        }
    }
    sim.drain();
    sim.count_refills();
    let stats = std::mem::take(&mut sim.stats);
    sim.delete_all();
    stats
}

#[test]
fn simulated_requests_crashes_and_control_operations() {
    if let Ok(seed) = std::env::var("BALLAST_SIM_SEED") {
        let seed = seed.parse().expect("BALLAST_SIM_SEED: a number");
        eprintln!("{:?}", run_seed(seed));
        return;
    }
    let runs: u64 =
        std::env::var("BALLAST_SIM_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let base = std::env::var("BALLAST_SIM_BASE").ok().and_then(|v| v.parse().ok()).unwrap_or(0u64);
    let mut total = Stats::default();
    for seed in base..base + runs {
        let s = run_seed(seed);
        total.requests += s.requests;
        total.parked += s.parked;
        total.crashes += s.crashes;
        total.eio += s.eio;
        total.controls += s.controls;
        total.reads_checked += s.reads_checked;
        total.encodes += s.encodes;
        total.encodes_raced += s.encodes_raced;
        total.journal_encodes += s.journal_encodes;
        total.journal_encodes_late += s.journal_encodes_late;
        total.expired += s.expired;
        total.refills += s.refills;
        total.refills_taking_back += s.refills_taking_back;
        total.grows += s.grows;
        total.grown_used += s.grown_used;
        total.made_read_only += s.made_read_only;
        total.thick_created += s.thick_created;
        total.thick_writes_failed += s.thick_writes_failed;
        total.thick_repaired += s.thick_repaired;
        total.thick_thinned += s.thick_thinned;
        total.read_only_undone += s.read_only_undone;
        total.renamed += s.renamed;
        total.rename_undone += s.rename_undone;
        total.owns += s.owns;
        total.owned_clusters += s.owned_clusters;
        total.decoupled += s.decoupled;
        total.inflated += s.inflated;
        total.decouple_refused += s.decouple_refused;
        total.inflate_undone += s.inflate_undone;
        total.settles += s.settles;
        total.settled += s.settled;
        total.retired_at_crash += s.retired_at_crash;
        total.promised_at_crash += s.promised_at_crash;
    }
    eprintln!("{runs} runs: {total:?}");
    // The runs must reach what they are for.
    assert!(total.parked > runs, "requests rarely parked: {total:?}");
    assert!(total.crashes > runs / 4, "few crashes: {total:?}");
    assert!(total.controls > runs, "few control operations: {total:?}");
    assert!(total.reads_checked > runs * 10, "few reads checked: {total:?}");
    assert!(total.encodes > runs && total.encodes_raced > runs / 10, "few checkpoints: {total:?}");
    let (journal, late) = (total.journal_encodes, total.journal_encodes_late);
    assert!(
        journal > runs * 4 && late > journal / 10 && late < journal * 9 / 10,
        "journal encodings rarely end on both sides of their data flush: {total:?}"
    );
    assert!(total.expired > runs / 100, "drains rarely given up: {total:?}");
    assert!(
        total.grows > runs / 4 && total.grown_used > runs / 10,
        "pools rarely grew, or rarely used what they grew into: {total:?}"
    );
    assert!(
        total.thick_created > runs / 3 && total.thick_repaired > 0,
        "thick volumes rarely made, or never cut short by a crash while being mapped: {total:?}"
    );
    assert!(
        total.made_read_only > runs / 4 && total.read_only_undone > 0,
        "volumes rarely made read-only, or no crash ever came before that was durable: {total:?}"
    );
    assert!(
        total.renamed > runs / 4 && total.rename_undone > 0,
        "volumes rarely renamed, or no crash ever came before a rename was durable: {total:?}"
    );
    assert!(
        total.owns > runs && total.owned_clusters > runs / 4,
        "copy-ups rarely ran or rarely copied: {total:?}"
    );
    assert!(
        total.decoupled > runs / 8 && total.inflated > runs / 16 && total.decouple_refused > 0,
        "volumes rarely decoupled or inflated, or never refused while sharing: {total:?}"
    );
    assert!(
        total.settles > runs / 4
            && total.retired_at_crash > runs / 100
            && total.promised_at_crash > 0,
        "control operations' leftovers rarely settled in steps, or never held at a crash: \
         {total:?}"
    );
    assert!(
        total.refills > runs && total.refills_taking_back > runs / 25,
        "stocks rarely refilled, or never from other families' stocks: {total:?}"
    );
}
