//! `ballast-costs`: what the primitives of a scaling design cost on this machine, measured, so
//! the per-core ownership model (docs/VOLUMES.md, perf/RESULTS.md) is written from numbers:
//!
//! - the volume core per request, with no device I/O (completions handed back at once): a 4 KiB
//!   read of a mapped piece and a 4 KiB in-place overwrite, each under a shared borrow of the
//!   pool state (its read lock) taken once per event, the family's own lock per decision, as
//!   the daemon's adapter does, the request reused in its slot as the adapter does (no
//!   allocation per request); and the pool state's part of a first write of a cluster: a fresh
//!   cluster taken, mapped, then trimmed and freed, commits making it reusable;
//! - two threads on two CPUs overwriting a volume each (two families): every event under the
//!   exclusive borrow of the pool state, as under the former pool mutex, against shared borrows
//!   (each decision locking its own family) — what deciding for families at once buys;
//! - a mutex itself: uncontended, and contended by two threads on two CPUs;
//! - a shared borrow taken by two threads on two CPUs at once: of one reader-writer lock (both
//!   write its cache line) against the sharded lock the pool state uses (a shard per thread);
//! - a cross-core forward through the engine: a task on core 0 spawns a task on core 1 through
//!   its mailbox, which wakes the first back through its wake channel (a forwarded request and
//!   its completion, with no work in between).
//!
//! - a checkpoint of a pool with `--checkpoint-clusters` mapped clusters (a volume, a
//!   snapshot of it and a clone that differs in 1%): freezing the state, the part that stays on
//!   the core under the pool lock, against encoding it, the part an offload thread does.
//!
//! - the cluster allocator of a 1 TiB pool (16 M clusters of 64 KiB) 99.9% full, its free
//!   clusters scattered: ns per allocation.
//!
//! - with `--device PATH` (a block device or a file on a disk filesystem, 1 GiB or more, its
//!   contents read, never written): 4 KiB and 128 KiB O_DIRECT random reads at QD32 through a
//!   core's ring (the file backend's own `submit`), the process's CPU per read (io_uring's
//!   worker threads included), with plain descriptors and buffers against registered ones.
//!
//! Prints a Markdown table (ns per operation, medians of `--reps`).
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ballast_engine::blockdev::{BlockDev, IoCmd};
use ballast_engine::file::FileDev;
use ballast_engine::reactor::{Cx, Engine, EngineConfig, Msg, Task};
use ballast_engine::volume::state_lock::{StateLock, StateRead, StateWrite};
use ballast_engine::Owned;
use ballast_volume::locks::Waiter;
use ballast_volume::meta::{PoolError, PoolMeta};
use ballast_volume::pool::{Pool, PoolGeometry};
use ballast_volume::request::{Access, Bufs, Cmd, Ctx, Issue, Outcome, Request};
use ballast_volume::sim::{commit_in_memory, SimDisk};
use clap::Parser;
use parking_lot::{Mutex, RwLock};

#[derive(Parser, Debug)]
#[command(name = "ballast-costs", about = "Costs of the scaling primitives, measured")]
struct Args {
    /// Operations per measurement.
    #[arg(long, default_value_t = 200_000)]
    ops: u64,
    /// Measurements per figure (the median is shown).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Mapped clusters of the checkpoint figures (64 KiB each: 1,048,576 = 64 GiB written).
    #[arg(long, default_value_t = 1 << 20)]
    checkpoint_clusters: u64,
    /// The two CPUs for the contended and cross-core figures.
    #[arg(long, default_value = "0,1")]
    cpus: String,
    /// A block device or file to read for the registered files and buffers figures.
    #[arg(long)]
    device: Option<std::path::PathBuf>,
    /// Only the device figures.
    #[arg(long)]
    device_only: bool,
    /// Only the commit figures (seal, encode, mark durable).
    #[arg(long)]
    seal_only: bool,
    /// Only the settling figures: a volume of `--checkpoint-clusters` mapped clusters deleted
    /// (the apply), its tree released in settling steps, their frees committed; a thick volume
    /// of as many clusters made, its clusters mapped the same way.
    #[arg(long)]
    settle_only: bool,
}

struct NoBufs;

impl Bufs for NoBufs {
    type B = Vec<u8>;
    fn get(&mut self, len: usize) -> Vec<u8> {
        vec![0; len]
    }
    fn put(&mut self, _buf: Vec<u8>) {}
}

const PIECE: u64 = 4096;
const SPAN: u64 = 64 << 20;

/// A pool whose volume has its first 64 MiB written and committed (so overwrites go in place).
fn mapped_pool() -> anyhow::Result<(PoolMeta, [u32; 2])> {
    let disk = SimDisk::new(256 << 20, 1);
    let mut pool = Pool::format(disk, PoolGeometry::standard([3; 16]))?;
    let chunk = vec![7u8; 1 << 20];
    let mut vols = [0; 2];
    for (vol, name) in vols.iter_mut().zip(["v", "w"]) {
        *vol = pool.create_volume(name, 96 << 20)?;
        for off in (0..SPAN).step_by(chunk.len()) {
            pool.write(*vol, off, &chunk)?;
        }
    }
    pool.flush()?;
    let (_, meta) = pool.into_parts();
    Ok((meta, vols))
}

/// A pool state with `clusters` mapped clusters in volume 1, a snapshot of it (2) and a
/// clone of the snapshot (3) that remaps 1% of them; built from records, no data written.
fn checkpoint_pool(clusters: u64) -> anyhow::Result<PoolMeta> {
    use ballast_volume::records::Record;
    let bytes = (clusters * 3 + 4096) << 16;
    let disk = SimDisk::new(bytes.next_multiple_of(1 << 20), 1);
    let mut g = PoolGeometry::standard([4; 16]);
    g.max_volumes = 16;
    let (_, formatted) = Pool::format(disk, g)?.into_parts();
    // Built as loading builds it (mapping records are applied only while loading).
    let mut meta = PoolMeta::new(formatted.superblock().clone());
    let size = clusters << 16;
    meta.apply(&Record::VolumeCreate { id: 1, parent: 0, size_bytes: size, name: "v".into() });
    for vc in 0..clusters {
        let entry = (vc + 1) | (0xffff << 40);
        meta.apply(&Record::MapSet { volume: 1, vcluster: vc, entry });
    }
    meta.apply(&Record::Snapshot { id: 2, of: 1, name: "s".into() });
    meta.apply(&Record::Clone { id: 3, of: 2, name: "c".into() });
    for vc in (0..clusters).step_by(100) {
        let entry = (clusters + vc + 1) | (0xffff << 40);
        meta.apply(&Record::MapSet { volume: 3, vcluster: vc, entry });
    }
    meta.loaded(0, None);
    Ok(meta)
}

/// What deleting a volume of `clusters` mapped clusters costs, in µs, run as `ops::settle`
/// runs it: the delete's apply (under the exclusive borrow), then [`settle_run`].
fn reclaim_cost(clusters: u64) -> anyhow::Result<SettleFigure> {
    let mut meta = checkpoint_pool(clusters)?;
    // The clone and the snapshot first: the volume's tree is then its own, every cluster freed.
    for id in [3, 2] {
        meta.delete(id)?;
        commit_in_memory(&mut meta);
        while meta.settle(usize::MAX)? > 0 {}
        commit_in_memory(&mut meta);
    }
    let t = Instant::now();
    meta.delete(1)?;
    let apply = t.elapsed().as_secs_f64() * 1e6;
    commit_in_memory(&mut meta);
    let figure = settle_run(&mut meta, apply)?;
    anyhow::ensure!(meta.free_clusters() + 2 > meta.superblock().cluster_count, "space returned");
    Ok(figure)
}

/// What making a thick volume of `clusters` clusters costs, in µs, run as `ops::control` runs
/// it: the creation's apply (under the exclusive borrow: its clusters reserved), then
/// [`settle_run`] (its clusters mapped).
fn thick_cost(clusters: u64) -> anyhow::Result<SettleFigure> {
    let bytes = ((clusters + 8192) << 16).next_multiple_of(1 << 20);
    let (_, mut meta) =
        Pool::format(SimDisk::new(bytes, 1), PoolGeometry::standard([5; 16]))?.into_parts();
    let t = Instant::now();
    let id = meta.create("t", clusters << 16, true)?;
    let apply = t.elapsed().as_secs_f64() * 1e6;
    commit_in_memory(&mut meta);
    let figure = settle_run(&mut meta, apply)?;
    anyhow::ensure!(meta.volume(id).is_ok() && meta.promised_clusters() == 0, "all mapped");
    Ok(figure)
}

/// Settling steps (`SETTLE_STEP` units under a shared borrow, a family locked: median and
/// largest µs) until one finds nothing, with a commit of what they did every `SETTLE_COMMIT`
/// units and at the end (seal and end under the exclusive borrow: the largest µs), as
/// `ops::settle` runs them; `apply`, the operation's own µs, carried along.
fn settle_run(meta: &mut PoolMeta, apply: f64) -> anyhow::Result<SettleFigure> {
    let mut timed = Timed { meta, steps: Vec::new(), commits: Vec::new() };
    ballast_volume::ops::settle(&mut timed)?;
    let Timed { mut steps, commits, .. } = timed;
    steps.pop(); // the step that found nothing left
    let largest = steps.iter().copied().fold(0.0, f64::max);
    let most = |f: fn(&CommitTimes) -> f64| commits.iter().map(f).fold(0.0, f64::max);
    let (commit, journal, checkpoint) =
        (most(|c| c.exclusive), most(|c| c.journal_encode), most(|c| c.checkpoint_encode));
    let (n, commits_n) = (steps.len(), commits.len());
    let checkpoints = commits.iter().filter(|c| c.checkpoint_encode > 0.0).count();
    Ok(SettleFigure {
        us: [apply, median(steps), largest, commit, journal, checkpoint],
        steps: n,
        commits: commits_n,
        checkpoints,
    })
}

/// `ops::settle`'s driver over a pool state in memory, timing each settling step and each
/// commit (its parts under the exclusive borrow: [`commit_exclusive`]), µs.
struct Timed<'a> {
    meta: &'a mut PoolMeta,
    steps: Vec<f64>,
    commits: Vec<CommitTimes>,
}

impl ballast_volume::ops::Driver<Vec<u8>> for Timed<'_> {
    fn look(
        &mut self,
        id: u32,
        from: u64,
        in_place: bool,
    ) -> Result<ballast_volume::ops::Sharing, PoolError> {
        ballast_volume::ops::Sharing::of(self.meta, id, from, in_place)
    }

    fn room(&mut self, id: u32, inflate: bool) -> Result<(u64, u64), PoolError> {
        self.meta.decouple_room(id, inflate)
    }

    /// Only a settling's commits come here.
    fn run(&mut self, _vol: u32, cmd: Cmd<Vec<u8>>) -> Result<i32, PoolError> {
        assert!(matches!(cmd, Cmd::Flush), "settling asks for commits only");
        self.commits.push(commit_exclusive(self.meta)?);
        Ok(0)
    }

    fn settle_step(&mut self) -> Result<i32, PoolError> {
        let t = Instant::now();
        let spent = self.meta.settle(ballast_volume::ops::SETTLE_STEP)?;
        self.steps.push(t.elapsed().as_secs_f64() * 1e6);
        Ok(i32::try_from(spent).expect("a step is bounded"))
    }
}

/// One commit's parts, µs: under the exclusive borrow (a journal commit's seal and end; a
/// checkpoint's start — freezing the state — and end), and its encoding, without the borrow:
/// a journal commit's records on the sealing core (the daemon's), a checkpoint's frozen
/// state on an offload thread (0 for the kind it is not).
struct CommitTimes {
    exclusive: f64,
    journal_encode: f64,
    checkpoint_encode: f64,
}

/// Commits what `meta` has pending, as the daemon does, timing its parts.
fn commit_exclusive(meta: &mut PoolMeta) -> Result<CommitTimes, PoolError> {
    use ballast_volume::meta::Encode;
    let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
    if meta.wants_checkpoint() {
        let t = Instant::now();
        let mut c = meta.begin_checkpoint()?.expect("no commit in flight");
        let begin = t.elapsed();
        let Some(Encode::Checkpoint(job)) = c.take_encode() else {
            unreachable!("a checkpoint encodes its state")
        };
        let t = Instant::now();
        c.encoded(job.run());
        let encode = t.elapsed();
        let t = Instant::now();
        meta.checkpoint_done(c);
        let exclusive = us(begin + t.elapsed());
        return Ok(CommitTimes { exclusive, journal_encode: 0.0, checkpoint_encode: us(encode) });
    }
    let t = Instant::now();
    let mut sealed = meta.seal()?.expect("no commit in flight");
    let seal = t.elapsed();
    let t = Instant::now();
    sealed.encode_now();
    let encode = t.elapsed();
    sealed.blocks_issued();
    let t = Instant::now();
    meta.commit_done(sealed);
    let exclusive = us(seal + t.elapsed());
    Ok(CommitTimes { exclusive, journal_encode: us(encode), checkpoint_encode: 0.0 })
}

/// [`settle_run`]'s figures: µs of the apply, the median and the largest step, the largest
/// commit; the steps and commits taken.
struct SettleFigure {
    /// The apply, the median and largest step, the largest commit's exclusive part, the
    /// largest journal encode, the largest checkpoint encode.
    us: [f64; 6],
    steps: usize,
    commits: usize,
    checkpoints: usize,
}

/// ms to freeze the state for a checkpoint, ms to encode the frozen state, payload bytes and
/// checksum.
fn checkpoint_costs(meta: &PoolMeta) -> (f64, f64, usize, u32) {
    let t = Instant::now();
    let frozen = meta.freeze();
    let freeze = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let payload = frozen.payload();
    let crc = crc32c::crc32c(&payload);
    let encode = t.elapsed().as_secs_f64() * 1e3;
    (freeze, encode, payload.len(), crc)
}

/// ns per allocation from a 16 M-cluster allocator with one cluster in 1,000 free.
fn allocator_cost() -> f64 {
    use ballast_volume::alloc::Allocator;
    let n = 1u64 << 24;
    let mut a = Allocator::new(n);
    for c in 1..n {
        if c % 1000 != 0 {
            a.mark_allocated(c);
        }
    }
    let free = a.free_count();
    let t = Instant::now();
    for _ in 0..free {
        std::hint::black_box(a.alloc());
    }
    t.elapsed().as_nanos() as f64 / free as f64
}

/// A shared borrow of the pool state, as a core's round of data-path decisions holds it: reads
/// and overwrites need nothing exclusive (asserted).
struct Shared<'a>(StateRead<'a, PoolMeta>);

impl Access for Shared<'_> {
    fn shared(&mut self) -> &PoolMeta {
        &self.0
    }
    fn exclusive(&mut self) -> &mut PoolMeta {
        unreachable!("a read or an overwrite asked for an exclusive borrow of the pool state")
    }
}

/// The pool state borrowed exclusively for every event, as the one pool mutex was before the
/// data path borrowed it shared: the baseline of the two-family figure.
struct Exclusive<'a>(StateWrite<'a, PoolMeta>);

impl Access for Exclusive<'_> {
    fn shared(&mut self) -> &PoolMeta {
        &self.0
    }
    fn exclusive(&mut self) -> &mut PoolMeta {
        &mut self.0
    }
}

/// ns per request, aggregate, when two threads on two CPUs each run `volume_core` on a volume
/// of its own family: each event under a shared borrow (the families decide at once) or, with
/// `exclusive`, under the exclusive one (one at a time, as under the former pool mutex).
fn two_families(
    meta: &StateLock<PoolMeta>,
    vols: [u32; 2],
    ops: u64,
    cpus: [usize; 2],
    exclusive: bool,
) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for (vol, cpu) in vols.into_iter().zip(cpus) {
            s.spawn(move || {
                let _ = ballast_ffi_pin(cpu);
                volume_core_as(meta, vol, ops / 2, true, exclusive)
            });
        }
    });
    start.elapsed().as_nanos() as f64 / ops as f64
}

/// ns per request for `make(offset)` run to completion, device operations completed at once.
fn volume_core(meta: &StateLock<PoolMeta>, vol: u32, ops: u64, write: bool) -> f64 {
    volume_core_as(meta, vol, ops, write, false)
}

/// `volume_core`, each event under the exclusive borrow when `exclusive`.
fn volume_core_as(
    meta: &StateLock<PoolMeta>,
    vol: u32,
    ops: u64,
    write: bool,
    exclusive: bool,
) -> f64 {
    let borrow = || -> Box<dyn Access + '_> {
        if exclusive {
            Box::new(Exclusive(meta.write()))
        } else {
            Box::new(Shared(meta.read()))
        }
    };
    let mut bufs = NoBufs;
    let mut out: Vec<Issue<Vec<u8>>> = Vec::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let buf = vec![1u8; PIECE as usize];
    let mut spare = Some(buf);
    let mut slot: Option<Request<Vec<u8>>> = None;
    let start = Instant::now();
    for _ in 0..ops {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let offset = (rng % (SPAN / PIECE)) * PIECE;
        let b = spare.take().expect("buffer");
        let cmd = if write {
            Cmd::Write { offset, buf: b, fua: false }
        } else {
            Cmd::Read { offset, buf: b }
        };
        // The adapter reuses a finished request in its slot (no allocation per request).
        let mut req = match slot.take() {
            Some(mut req) => {
                Request::reuse(&mut req, vol, cmd, Waiter(1));
                req
            }
            None => Request::new(vol, cmd, Waiter(1)),
        };
        let mut outcome = {
            let mut m = borrow();
            req.start(&mut Ctx { meta: &mut *m, bufs: &mut bufs, out: &mut out })
        };
        loop {
            if let Outcome::Done { result, buf } = outcome {
                assert_eq!(result, PIECE as i32);
                spare = buf;
                slot = Some(req);
                break;
            }
            let Issue { tag, op } = out.pop().expect("an operation in flight");
            let (len, buf) = match op {
                ballast_volume::request::DiskOp::Read { buf, .. }
                | ballast_volume::request::DiskOp::Write { buf, .. } => {
                    (buf.len() as i32, Some(buf))
                }
                ballast_volume::request::DiskOp::Flush => (0, None),
                ballast_volume::request::DiskOp::Encode(_) => {
                    unreachable!("reads and overwrites write no checkpoint")
                }
            };
            let mut m = borrow();
            outcome = req.on_completion(
                &mut Ctx { meta: &mut *m, bufs: &mut bufs, out: &mut out },
                tag,
                len,
                buf,
            );
        }
    }
    start.elapsed().as_nanos() as f64 / ops as f64
}

/// ns per first write of a cluster (a fresh cluster taken, written, mapped) followed by a trim
/// of it (freed), with a commit every 256 writes making the freed clusters reusable: what the
/// allocation and freeing of clusters cost a write, the pool state only (no request, no I/O).
/// The pool state's part of a 4 KiB first write at `at` (a fresh cluster mapped), as the
/// daemon's request runs it, without the I/O.
fn first_write(
    m: &mut PoolMeta,
    vol: u32,
    at: u64,
    plans: &mut Vec<ballast_volume::meta::WritePlan>,
) {
    use ballast_volume::meta::Blocked;
    match m.plan_write(vol, at, PIECE, 0, Waiter(1), plans) {
        Ok(()) => {}
        Err(Blocked::Wait) => unreachable!("nothing else runs"),
        Err(Blocked::Fail(e)) => panic!("fresh write: {e}"),
    }
    let ticket = m.begin_io(vol);
    for p in plans.iter() {
        assert!(p.fresh, "a first write takes a fresh cluster");
        m.finish_span(vol, p);
    }
    m.end_write(vol);
    m.end_io(ticket);
}

fn fresh_cluster(meta: &StateLock<PoolMeta>, vol: u32, ops: u64) -> f64 {
    let mut m = meta.write();
    let cb = m.cluster_bytes();
    // Clusters past the written span: unmapped, so each write takes a fresh one.
    let first = SPAN / cb;
    let room = m.volume(vol).expect("the volume").size_bytes / cb - first;
    let mut plans = Vec::new();
    let start = Instant::now();
    for i in 0..ops {
        let at = (first + i % room) * cb;
        first_write(&mut m, vol, at, &mut plans);
        m.trim(vol, at, PIECE, Waiter(1)).expect("nothing blocks a trim");
        if i % 256 == 255 {
            commit_in_memory(&mut m);
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / ops as f64;
    commit_in_memory(&mut m);
    ns
}

/// The commit's pause of every core: µs to seal `records` pending mapping records (first writes
/// of as many clusters) and to mark that commit durable, both under the exclusive borrow of the
/// pool state in the daemon; µs to encode the sealed records, on the sealing core without the
/// borrow; and the journal blocks sealed.
/// The records are spread over `volumes` volumes (each its own family), round robin; `idle`
/// more volumes (families) exist without records.
fn seal_cost(records: u64, volumes: u64, idle: u64) -> anyhow::Result<(f64, f64, f64, usize)> {
    let cb = 64 << 10;
    let disk = SimDisk::new((records * cb * 2 + (64 << 20)).next_multiple_of(1 << 20), 1);
    let mut pool = Pool::format(disk, PoolGeometry::standard([3; 16]))?;
    let per = records.div_ceil(volumes);
    let vols: Vec<u32> = (0..volumes)
        .map(|v| pool.create_volume(&format!("s{v}"), per * cb))
        .collect::<Result<_, _>>()?;
    for v in 0..idle {
        pool.create_volume(&format!("idle{v}"), cb)?;
    }
    pool.flush()?;
    let (_, mut m) = pool.into_parts();
    let mut plans = Vec::new();
    for i in 0..records {
        let vol = vols[(i % volumes) as usize];
        first_write(&mut m, vol, (i / volumes) * cb, &mut plans);
    }
    anyhow::ensure!(m.pending_records() as u64 >= records, "{} pending", m.pending_records());
    let t = Instant::now();
    let mut sealed = m.seal()?.context("no commit in flight")?;
    let seal = t.elapsed().as_secs_f64() * 1e6;
    let t = Instant::now();
    sealed.encode_now();
    let encode = t.elapsed().as_secs_f64() * 1e6;
    let blocks = sealed.blocks().len();
    // As the daemon's journal write does, once the blocks are in its write buffers.
    sealed.blocks_issued();
    let t = Instant::now();
    m.commit_done(sealed);
    Ok((seal, t.elapsed().as_secs_f64() * 1e6, encode, blocks))
}

fn mutex_uncontended(ops: u64) -> f64 {
    let m = Mutex::new(0u64);
    let start = Instant::now();
    for _ in 0..ops {
        *m.lock() += 1;
    }
    assert_eq!(*m.lock(), ops);
    start.elapsed().as_nanos() as f64 / ops as f64
}

fn mutex_contended(ops: u64, cpus: [usize; 2]) -> f64 {
    on_two_cpus(ops, cpus, Mutex::new(0u64), |m: &Mutex<u64>| {
        let mut n = m.lock();
        *n += 1;
        *n
    })
}

/// Two threads on two CPUs running `op` on one shared `lock` (a lock and unlock, a shared
/// borrow and its read), `ops` times together: ns per operation, both threads together.
fn on_two_cpus<L: Send + Sync + 'static>(
    ops: u64,
    cpus: [usize; 2],
    lock: L,
    op: fn(&L) -> u64,
) -> f64 {
    let lock = Arc::new(lock);
    let start = Instant::now();
    let threads: Vec<_> = cpus
        .iter()
        .map(|&cpu| {
            let lock = Arc::clone(&lock);
            std::thread::spawn(move || {
                let _ = ballast_ffi_pin(cpu);
                let mut sum = 0u64;
                for _ in 0..ops / 2 {
                    sum = sum.wrapping_add(std::hint::black_box(op(&lock)));
                }
                sum
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    start.elapsed().as_nanos() as f64 / ops as f64
}

/// Pins the calling thread; a failure only makes the figures noisier.
fn ballast_ffi_pin(cpu: usize) -> bool {
    ballast_ffi::sys::pin_to_cpu(cpu).is_ok()
}

/// Core 0's side of the round trip: forwards to core 1, counts the wake-ups that come back.
struct Pinger {
    left: u64,
    started: Option<Instant>,
    done: Option<crossbeam_channel::Sender<Duration>>,
    finished: bool,
}

impl Pinger {
    fn forward(&mut self, cx: &mut Cx<'_>) {
        let (core, task) = (cx.core(), cx.task());
        let peers = Arc::clone(cx.peers());
        let back = Arc::clone(&peers);
        let msg = Msg::Spawn(Box::new(move |_cx: &mut Cx<'_>| {
            Box::new(Ponger { back, core, task }) as Box<dyn Task>
        }));
        if peers[1].send(msg).is_err() {
            panic!("core 1's mailbox is full");
        }
    }
}

impl Task for Pinger {
    fn start(&mut self, cx: &mut Cx<'_>) {
        self.started = Some(Instant::now());
        self.forward(cx);
    }
    fn on_completion(&mut self, cx: &mut Cx<'_>, _tag: u32, _result: i32, _owned: Owned) {
        self.left -= 1;
        if self.left == 0 {
            let elapsed = self.started.expect("started").elapsed();
            if let Some(tx) = self.done.take() {
                let _ = tx.send(elapsed);
            }
            self.finished = true;
            return;
        }
        self.forward(cx);
    }
    fn flush(&mut self, _cx: &mut Cx<'_>) {}
    fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}
    fn is_done(&self) -> bool {
        self.finished
    }
}

/// Core 1's side: wakes the pinger back, and is done.
struct Ponger {
    back: Arc<Vec<ballast_engine::reactor::CoreHandle>>,
    core: usize,
    task: u32,
}

impl Task for Ponger {
    fn start(&mut self, _cx: &mut Cx<'_>) {
        self.back[self.core].wake_task(self.task, 1);
    }
    fn on_completion(&mut self, _cx: &mut Cx<'_>, _tag: u32, _result: i32, _owned: Owned) {}
    fn flush(&mut self, _cx: &mut Cx<'_>) {}
    fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}
    fn is_done(&self) -> bool {
        true
    }
}

fn cross_core(ops: u64, cpus: [usize; 2], poll_us: u64) -> anyhow::Result<f64> {
    let engine = Engine::start(EngineConfig {
        cpus: cpus.to_vec(),
        poll_us,
        ring_entries: 256,
        mailbox_depth: 1024,
        buffer_budget: 16 << 20,
        qos_wait_budget: None,
        device_ring: None,
        offload_threads: 0,
        offload_queue: 1,
        fixed: ballast_ffi::FixedConfig::default(),
        io_workers: 8,
    })
    .context("starting two cores")?;
    let (tx, rx) = crossbeam_channel::bounded(1);
    let pinger = Pinger { left: ops, started: None, done: Some(tx), finished: false };
    let mut pinger = Some(pinger);
    let spawn = Msg::Spawn(Box::new(move |_cx: &mut Cx<'_>| {
        Box::new(pinger.take().expect("once")) as Box<dyn Task>
    }));
    engine.handles()[0].send_blocking(spawn);
    let elapsed = rx.recv_timeout(Duration::from_secs(120)).context("round trips timed out")?;
    engine.shutdown();
    Ok(elapsed.as_nanos() as f64 / ops as f64)
}

/// Random O_DIRECT reads of `bs` bytes at QD32 through the file backend, `left` in all.
struct Reader {
    dev: Arc<FileDev>,
    bs: usize,
    left: u64,
    inflight: u32,
    rng: u64,
    done: Option<crossbeam_channel::Sender<bool>>,
    ok: bool,
}

impl Reader {
    fn submit(&mut self, cx: &mut Cx<'_>) {
        // xorshift: an offset anywhere in the first GiB, aligned to the read size.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let span = (1u64 << 30).min(self.dev.size_bytes()) / self.bs as u64;
        let offset = (self.rng % span) * self.bs as u64;
        self.left -= 1;
        self.inflight += 1;
        let buf = cx.buf(self.bs);
        self.dev.submit(cx, IoCmd::Read { offset, buf }, 0);
    }
}

impl Task for Reader {
    fn start(&mut self, cx: &mut Cx<'_>) {
        while self.inflight < 32 && self.left > 0 {
            self.submit(cx);
        }
    }
    fn on_completion(&mut self, cx: &mut Cx<'_>, _tag: u32, result: i32, owned: Owned) {
        self.inflight -= 1;
        self.ok &= result == self.bs as i32;
        if let Some(b) = owned.into_buf() {
            cx.recycle(b);
        }
        if self.left > 0 {
            self.submit(cx);
        } else if self.inflight == 0 {
            if let Some(tx) = self.done.take() {
                let _ = tx.send(self.ok);
            }
        }
    }
    fn flush(&mut self, _cx: &mut Cx<'_>) {}
    fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}
    fn is_done(&self) -> bool {
        self.done.is_none()
    }
}

/// The process's CPU time so far (every thread, io_uring's workers included).
fn process_cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(u.user_time()) + tv(u.system_time())
}

/// Process CPU ns per read of `bs` bytes, `ops` reads, with the ring's tables `fixed`.
/// `ops` reads on each of `cpus` (a core each, all on the same device).
fn device_reads(
    path: &std::path::Path,
    bs: usize,
    ops: u64,
    cpus: &[usize],
    fixed: ballast_ffi::FixedConfig,
) -> anyhow::Result<f64> {
    let dev = Arc::new(FileDev::open(path, None, true).context("opening --device")?);
    anyhow::ensure!(
        !dev.info().backend.contains("in memory"),
        "--device is in memory: no ring I/O to measure"
    );
    let engine = Engine::start(EngineConfig {
        cpus: cpus.to_vec(),
        poll_us: 0,
        ring_entries: 256,
        mailbox_depth: 16,
        buffer_budget: 64 << 20,
        qos_wait_budget: None,
        device_ring: None,
        offload_threads: 0,
        offload_queue: 1,
        fixed,
        io_workers: 8,
    })
    .context("starting a core")?;
    let (tx, rx) = crossbeam_channel::bounded(cpus.len());
    let t0 = process_cpu();
    for (i, handle) in engine.handles().iter().enumerate() {
        let (dev, done) = (dev.clone(), Some(tx.clone()));
        let rng = 0x9e37_79b9 + i as u64;
        let mut reader = Some(Reader { dev, bs, left: ops, inflight: 0, rng, done, ok: true });
        handle.send_blocking(Msg::Spawn(Box::new(move |_cx: &mut Cx<'_>| {
            Box::new(reader.take().expect("once")) as Box<dyn Task>
        })));
    }
    let mut ok = true;
    for _ in cpus {
        ok &= rx.recv_timeout(Duration::from_secs(300)).context("reads timed out")?;
    }
    let cpu_used = process_cpu() - t0;
    engine.shutdown();
    anyhow::ensure!(ok, "a read failed or came back short");
    Ok(cpu_used.as_nanos() as f64 / (ops * cpus.len() as u64) as f64)
}

/// The device figures per size and core count: block size, cores, and ns per read with plain
/// descriptor and buffer, registered file only, registered file and buffer.
fn device_costs(
    args: &Args,
    path: &std::path::Path,
    cpus: [usize; 2],
) -> anyhow::Result<Vec<(usize, usize, [f64; 3])>> {
    use ballast_ffi::FixedConfig;
    let configs = [
        FixedConfig::default(),
        FixedConfig { files: 4, bufs: 0 },
        FixedConfig { files: 4, bufs: 256 },
    ];
    let mut out = Vec::new();
    // One core; then two on the same file, whose reference count both would write.
    for (bs, cores) in [(4096, &cpus[..1]), (128 << 10, &cpus[..1]), (4096, &cpus[..])] {
        let ops = if bs == 4096 { args.ops } else { args.ops / 8 };
        let mut runs = [Vec::new(), Vec::new(), Vec::new()];
        // In turn, so drift in the machine hits all alike.
        for _ in 0..args.reps.max(1) {
            for (i, fixed) in configs.iter().enumerate() {
                runs[i].push(device_reads(path, bs, ops, cores, *fixed)?);
            }
        }
        out.push((bs, cores.len(), runs.map(median)));
    }
    Ok(out)
}

fn print_device_costs(path: &std::path::Path, costs: &[(usize, usize, [f64; 3])]) {
    for (bs, cores, [plain, file, both]) in costs {
        println!(
            "| {} KiB O_DIRECT random read at QD32 through {cores} core(s)' rings ({}), process \
             CPU per read: plain / registered file / registered file and buffer | {plain:.0} / \
             {file:.0} ({:.2}x) / {both:.0} ({:.2}x) |",
            bs / 1024,
            path.display(),
            file / plain,
            both / plain
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One commit figure: medians of µs.
struct SealFigure {
    records: u64,
    volumes: u64,
    idle: u64,
    seal: f64,
    done: f64,
    encode: f64,
    blocks: usize,
}

/// The commit figures, medians of `reps`.
fn seal_figures(reps: usize) -> anyhow::Result<Vec<SealFigure>> {
    let mut seals = Vec::new();
    for (records, volumes, idle) in
        [(256u64, 1u64, 0u64), (4096, 1, 0), (4096, 256, 0), (4096, 4096, 0), (4096, 1, 4096)]
    {
        let runs: Vec<(f64, f64, f64, usize)> =
            (0..reps).map(|_| seal_cost(records, volumes, idle)).collect::<anyhow::Result<_>>()?;
        seals.push(SealFigure {
            records,
            volumes,
            idle,
            seal: median(runs.iter().map(|r| r.0).collect()),
            done: median(runs.iter().map(|r| r.1).collect()),
            encode: median(runs.iter().map(|r| r.2).collect()),
            blocks: runs[0].3,
        });
    }
    Ok(seals)
}

fn print_seals(seals: &[SealFigure]) {
    for SealFigure { records, volumes, idle, seal, done, encode, blocks } in seals {
        let mut over =
            if *volumes > 1 { format!(" over {volumes} volumes") } else { String::new() };
        if *idle > 0 {
            over += &format!(", {idle} idle volumes beside");
        }
        println!(
            "| commit of {records} pending mapping records{over} ({blocks} journal blocks): seal, then \
             mark durable, each under the exclusive borrow (every core's decisions wait), µs | \
             {seal:.1} + {done:.1} |"
        );
        println!(
            "| the same commit: encode its records into blocks, on the sealing core without the \
             borrow, µs | {encode:.1} |"
        );
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cpus: Vec<usize> =
        args.cpus.split(',').map(str::parse).collect::<Result<_, _>>().context("--cpus")?;
    let cpus: [usize; 2] = cpus.try_into().map_err(|_| anyhow::anyhow!("--cpus: two CPUs"))?;
    let device = match &args.device {
        Some(path) => Some((path.clone(), device_costs(&args, path, cpus)?)),
        None => None,
    };
    if args.device_only {
        let (path, costs) = device.context("--device-only needs --device")?;
        println!("| primitive | ns per operation (median of {}) |", args.reps.max(1));
        println!("|---|---|");
        print_device_costs(&path, &costs);
        return Ok(());
    }
    if args.settle_only {
        let reps = args.reps.max(1);
        let n = args.checkpoint_clusters;
        println!("| {n} clusters (64 KiB) | µs (median of {reps}) |");
        println!("|---|---|");
        for (what, cost) in [
            (
                "deleting a volume of them (mapped)",
                reclaim_cost as fn(u64) -> anyhow::Result<SettleFigure>,
            ),
            ("a thick volume of them made", thick_cost),
        ] {
            let runs: Vec<SettleFigure> =
                (0..reps).map(|_| cost(n)).collect::<anyhow::Result<Vec<_>>>()?;
            let fig = |i: usize| median(runs.iter().map(|r| r.us[i]).collect::<Vec<f64>>());
            let (steps, commits, checkpoints) =
                (runs[0].steps, runs[0].commits, runs[0].checkpoints);
            println!(
                "| {what}: the operation applied, under the exclusive borrow | {:.1} |",
                fig(0)
            );
            println!(
                "| ... a settling step ({} units, shared borrow, the family locked): median of \
                 {steps} | {:.1} |",
                ballast_volume::ops::SETTLE_STEP,
                fig(1)
            );
            println!("| ... the largest step | {:.1} |", fig(2));
            println!(
                "| ... the largest of {commits} commits of what the steps did (one per {} \
                 units: seal + end, exclusive borrow) | {:.1} |",
                ballast_volume::ops::SETTLE_COMMIT,
                fig(3)
            );
            println!(
                "| ... the largest journal commit's encoding (its records, on the sealing core, \
                 no borrow) | {:.1} |",
                fig(4)
            );
            println!(
                "| ... the largest checkpoint's encoding ({checkpoints} of the commits; an \
                 offload thread) | {:.1} |",
                fig(5)
            );
        }
        return Ok(());
    }
    if args.seal_only {
        let reps = args.reps.max(1);
        println!("| primitive | µs (median of {reps}) |");
        println!("|---|---|");
        print_seals(&seal_figures(reps)?);
        return Ok(());
    }
    let (meta, vols) = mapped_pool()?;
    let vol = vols[0];
    // The daemon's lock of the pool state (sharded: a shared borrow takes this thread's shard).
    let meta = StateLock::new(meta);
    let _ = ballast_ffi_pin(cpus[0]);
    let reps = args.reps.max(1);
    let figure = |f: &mut dyn FnMut() -> f64| median((0..reps).map(|_| f()).collect());
    let read = figure(&mut || volume_core(&meta, vol, args.ops, false));
    let write = figure(&mut || volume_core(&meta, vol, args.ops, true));
    let fresh = figure(&mut || fresh_cluster(&meta, vol, args.ops));
    let unc = figure(&mut || mutex_uncontended(args.ops * 10));
    let con = figure(&mut || mutex_contended(args.ops * 10, cpus));
    let rw_shared = figure(&mut || {
        on_two_cpus(args.ops * 10, cpus, RwLock::new(7u64), |l: &RwLock<u64>| *l.read())
    });
    let sharded_shared = figure(&mut || {
        on_two_cpus(args.ops * 10, cpus, StateLock::new(7u64), |l: &StateLock<u64>| *l.read())
    });
    let two_excl = figure(&mut || two_families(&meta, vols, args.ops, cpus, true));
    let two_shared = figure(&mut || two_families(&meta, vols, args.ops, cpus, false));
    let mut cross = Vec::new();
    for poll_us in [1000, 0] {
        let mut runs = Vec::new();
        for _ in 0..reps {
            runs.push(cross_core(args.ops / 4, cpus, poll_us)?);
        }
        cross.push((poll_us, median(runs)));
    }
    let ckpt = checkpoint_pool(args.checkpoint_clusters)?;
    let costs: Vec<(f64, f64, usize, u32)> = (0..reps).map(|_| checkpoint_costs(&ckpt)).collect();
    let freeze = median(costs.iter().map(|c| c.0).collect());
    let encode = median(costs.iter().map(|c| c.1).collect());
    let (blob, crc) = (costs[0].2, costs[0].3);
    let alloc = figure(&mut allocator_cost);
    let seals = seal_figures(reps)?;
    println!("| primitive | ns per operation (median of {reps}) |");
    println!("|---|---|");
    println!("| volume core: 4 KiB read of a mapped piece (shared borrow per event, family lock per decision, request reused in its slot, no I/O) | {read:.0} |");
    println!(
        "| volume core: 4 KiB in-place overwrite (shared borrow per event, family lock per decision, request reused in its slot, no I/O) | {write:.0} |"
    );
    println!(
        "| volume core: first 4 KiB write of a cluster (fresh cluster, mapped) + trim, commit per \
         256 (pool state only) | {fresh:.0} |"
    );
    println!(
        "| volume core: 4 KiB in-place overwrites, two threads on two CPUs, a family each, every \
         event under the exclusive borrow (as under the former pool mutex): ns per request, \
         both threads together | {two_excl:.0} |"
    );
    println!(
        "| the same, every event under a shared borrow (the families decide at once) | \
         {two_shared:.0} |"
    );
    println!("| pool mutex, uncontended lock + unlock | {unc:.1} |");
    println!("| pool mutex, two threads on two CPUs, per lock + unlock | {con:.1} |");
    println!(
        "| shared borrow of one reader-writer lock (the pool state's before), two threads on two \
         CPUs, per borrow, both threads together | {rw_shared:.1} |"
    );
    println!(
        "| the same with the sharded lock the pool state uses now (a shard per thread) | \
         {sharded_shared:.1} |"
    );
    for (poll_us, ns) in cross {
        println!(
            "| cross-core forward + wake back through the engine (--poll-us {poll_us}) | {ns:.0} |"
        );
    }
    println!(
        "| cluster allocation, 1 TiB pool 99.9% full (free clusters scattered) | {alloc:.0} |"
    );
    let n = args.checkpoint_clusters;
    println!(
        "| checkpoint of {n} mapped clusters + snapshot + clone (1% differs): freeze, on the core \
         under the pool lock | {:.0} |",
        freeze * 1e6
    );
    println!(
        "| the same checkpoint: encode {blob} bytes (crc32c {crc:08x}), on an offload thread | {:.0} |",
        encode * 1e6
    );
    print_seals(&seals);
    if let Some((path, costs)) = device {
        print_device_costs(&path, &costs);
    }
    Ok(())
}
