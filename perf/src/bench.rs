//! The `ballast-perf` workload: one admin queue (kept alive for the whole run) and N I/O
//! queues, each on its own thread keeping QD commands in flight with a fio-like access
//! pattern; completion latencies go to per-thread HDR histograms that are merged at the end
//! into a [`Report`], printed as text or as fio-like JSON.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::nbd::NbdClient;
use crate::queue::{Queue, QueueOptions, CNTLID_DYNAMIC};
use crate::tls::TlsClient;

/// Access pattern, named as fio names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Rw {
    Read,
    Write,
    Randread,
    Randwrite,
    Randrw,
}

impl Rw {
    pub fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Randrw => "randrw",
        }
    }

    fn random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Randrw)
    }
}

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub addr: SocketAddr,
    pub nqn: String,
    pub hostnqn: String,
    pub nsid: u32,
    pub rw: Rw,
    /// Block size in bytes.
    pub bs: u32,
    /// Commands in flight per queue.
    pub qd: u16,
    /// I/O queues (one thread each).
    pub queues: u16,
    pub runtime: Duration,
    /// Bytes of the namespace to use, from offset 0 (default: all of it).
    pub size: Option<u64>,
    /// Percentage of reads for `randrw`.
    pub rwmixread: u8,
    pub header_digest: bool,
    pub data_digest: bool,
    pub disable_sqflow: bool,
    pub kato_ms: u32,
    /// Socket timeout for every queue.
    pub timeout: Duration,
    pub seed: u64,
    /// Stop each queue after this many I/Os (the runtime still bounds the run).
    pub number_ios: Option<u64>,
    /// Every queue over TLS with this client's PSK; `None`: plaintext.
    pub tls: Option<Arc<TlsClient>>,
    /// I/O queues poll their sockets (each I/O thread spins on its CPU, as SPDK's perf tool
    /// does) instead of sleeping in them; the admin queue still sleeps.
    pub poll: bool,
    /// NBD instead of NVMe/TCP: the export to open (`queues` connections to it); the NVMe
    /// fields (NQNs, nsid, digests, keep-alive, TLS) are then unused.
    pub nbd_export: Option<String>,
}

/// Counters and latencies of one direction.
#[derive(Debug, Clone)]
pub struct DirStats {
    pub ops: u64,
    pub bytes: u64,
    /// Completion latency in nanoseconds.
    pub lat_ns: Histogram<u64>,
}

impl DirStats {
    fn new() -> DirStats {
        DirStats {
            ops: 0,
            bytes: 0,
            lat_ns: Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
                .expect("valid histogram bounds"),
        }
    }

    fn merge(&mut self, other: &DirStats) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        // Same bounds on both sides: cannot fail.
        let _ = self.lat_ns.add(&other.lat_ns);
    }

    fn pct(&self, q: f64) -> u64 {
        if self.lat_ns.is_empty() {
            0
        } else {
            self.lat_ns.value_at_quantile(q)
        }
    }
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Report {
    pub config: BenchConfig,
    /// Measured period (from all queues starting to the stop signal).
    pub elapsed: Duration,
    pub read: DirStats,
    pub write: DirStats,
    /// Process CPU time over the measured period, as a percentage of one CPU.
    pub usr_cpu: f64,
    pub sys_cpu: f64,
    pub cntlid: u16,
    pub namespace_bytes: u64,
    /// TLS version and cipher suite of the admin queue; `None` in plaintext.
    pub tls: Option<String>,
}

/// splitmix64: a small, fast, good-enough generator for offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Process user and system CPU seconds (from /proc/self/stat, clock ticks of 1/100 s).
fn cpu_seconds() -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return (0.0, 0.0) };
    let Some((_, after)) = stat.rsplit_once(')') else { return (0.0, 0.0) };
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command name: state is field 3, utime field 14, stime field 15.
    let tick = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(14) / 100.0, tick(15) / 100.0)
}

struct Worker {
    qid: u16,
    cntlid: u16,
    in_capsule: u32,
    lba_size: u32,
    /// Byte range of the namespace this queue uses for sequential patterns.
    region: (u64, u64),
    /// Byte range for random patterns (the whole used size).
    span: u64,
}

/// One queue of commands the workload drives: an NVMe/TCP I/O queue or an NBD connection.
trait IoQueue {
    fn submit_read(&mut self, offset: u64, len: u32) -> anyhow::Result<u16>;
    fn submit_write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<u16>;
    fn in_flight(&self) -> usize;
    /// The id of the next command done; a failed command is an error.
    fn complete(&mut self) -> anyhow::Result<u16>;
}

/// An NVMe/TCP I/O queue addressing one namespace.
struct NvmeIo {
    q: Queue,
    qid: u16,
    nsid: u32,
    lba_size: u32,
}

impl IoQueue for NvmeIo {
    fn submit_read(&mut self, offset: u64, len: u32) -> anyhow::Result<u16> {
        Ok(self.q.submit_read(self.nsid, offset / u64::from(self.lba_size), len)?)
    }

    fn submit_write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<u16> {
        Ok(self.q.submit_write(self.nsid, offset / u64::from(self.lba_size), data)?)
    }

    fn in_flight(&self) -> usize {
        self.q.in_flight()
    }

    fn complete(&mut self) -> anyhow::Result<u16> {
        let c = self.q.poll().with_context(|| format!("I/O queue {}", self.qid))?;
        if !c.ok() {
            bail!("I/O queue {}: command failed with NVMe status {:#05x}", self.qid, c.status);
        }
        Ok(c.cid)
    }
}

/// An NBD connection (one per "queue").
struct NbdIo {
    c: NbdClient,
    n: u16,
}

impl IoQueue for NbdIo {
    fn submit_read(&mut self, offset: u64, len: u32) -> anyhow::Result<u16> {
        Ok(self.c.submit_read(offset, len)?)
    }

    fn submit_write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<u16> {
        Ok(self.c.submit_write(offset, data)?)
    }

    fn in_flight(&self) -> usize {
        self.c.in_flight()
    }

    fn complete(&mut self) -> anyhow::Result<u16> {
        let r = self.c.poll().with_context(|| format!("NBD connection {}", self.n))?;
        if r.error != 0 {
            let what = if r.read { "read" } else { "write" };
            bail!("NBD connection {}: {what} failed with NBD error {}", self.n, r.error);
        }
        Ok(r.handle)
    }
}

fn worker(
    cfg: &BenchConfig,
    w: &Worker,
    start: &Start,
    stop: &AtomicBool,
) -> anyhow::Result<(DirStats, DirStats, Instant)> {
    let opts = QueueOptions {
        header_digest: cfg.header_digest,
        data_digest: cfg.data_digest,
        // A queue of N entries holds N - 1 commands; the minimum is 2 entries.
        sq_size: (cfg.qd + 1).max(2),
        kato_ms: 0,
        disable_sqflow: cfg.disable_sqflow,
        timeout: cfg.timeout,
        tls: cfg.tls.clone(),
        poll: cfg.poll,
        ..QueueOptions::default()
    };
    let connected = Queue::connect(cfg.addr, &cfg.nqn, &cfg.hostnqn, w.qid, w.cntlid, &opts);
    start.arrive();
    let mut q = connected.with_context(|| format!("connecting I/O queue {}", w.qid))?;
    q.set_in_capsule_limit(w.in_capsule);
    q.set_lba_size(w.lba_size);
    let mut io = NvmeIo { q, qid: w.qid, nsid: cfg.nsid, lba_size: w.lba_size };
    drive(&mut io, cfg, w, stop)
}

fn nbd_worker(
    cfg: &BenchConfig,
    export: &str,
    w: &Worker,
    start: &Start,
    stop: &AtomicBool,
) -> anyhow::Result<(DirStats, DirStats, Instant)> {
    let connected = NbdClient::connect(cfg.addr, export, cfg.qd, cfg.timeout, cfg.poll);
    start.arrive();
    let c = connected.with_context(|| format!("NBD connection {}", w.qid))?;
    let mut io = NbdIo { c, n: w.qid };
    let r = drive(&mut io, cfg, w, stop)?;
    io.c.disconnect().with_context(|| format!("NBD connection {}: disconnect", w.qid))?;
    Ok(r)
}

/// Where the I/O threads wait, connected, for the run to start ([`Start::arrive`]), and the
/// main thread for all of them ([`Start::wait_for`]): opened once, also when starting a thread
/// failed (with `stop` set), so no thread waits forever.
#[derive(Default)]
pub struct Start {
    /// Threads arrived, and whether the gate is open.
    state: Mutex<(usize, bool)>,
    cv: Condvar,
}

impl Start {
    /// An I/O thread is ready: it waits until the run starts.
    fn arrive(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 += 1;
        self.cv.notify_all();
        while !s.1 {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits for `n` threads to arrive, then lets them all go.
    fn wait_for(&self, n: usize) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.0 < n {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.1 = true;
        self.cv.notify_all();
    }

    /// Lets every thread go now.
    fn open(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.cv.notify_all();
    }
}

/// Keeps `cfg.qd` commands in flight on `q` until `stop` (or `--number-ios`), recording each
/// completion's latency.
fn drive(
    q: &mut impl IoQueue,
    cfg: &BenchConfig,
    w: &Worker,
    stop: &AtomicBool,
) -> anyhow::Result<(DirStats, DirStats, Instant)> {
    let bs = u64::from(cfg.bs);
    let mut gen = Gen {
        rng: Rng(cfg.seed ^ (u64::from(w.qid) << 32)),
        cursor: 0,
        wbuf: write_pattern(cfg.bs as usize, w.qid),
        started: vec![(Instant::now(), true); usize::from(cfg.qd)],
    };
    let mut read = DirStats::new();
    let mut write = DirStats::new();
    let limit = cfg.number_ios.unwrap_or(u64::MAX);
    let mut issued = 0u64;
    let mut last = Instant::now();
    while issued < limit.min(u64::from(cfg.qd)) {
        gen.issue(q, cfg, w)?;
        issued += 1;
    }
    while q.in_flight() > 0 {
        let id = q.complete()?;
        if !stop.load(Ordering::Relaxed) {
            let (t0, is_read) =
                gen.started.get(usize::from(id)).copied().unwrap_or((Instant::now(), true));
            let d = if is_read { &mut read } else { &mut write };
            d.ops += 1;
            d.bytes += bs;
            last = Instant::now();
            d.lat_ns.saturating_record(last.duration_since(t0).as_nanos() as u64);
            if issued < limit {
                gen.issue(q, cfg, w)?;
                issued += 1;
            }
        }
    }
    Ok((read, write, last))
}

/// What queue `qid` writes in every block: byte `i` is `i * 31 ^ qid` (a test reading the
/// blocks back knows what to expect).
pub fn write_pattern(bs: usize, qid: u16) -> Vec<u8> {
    (0..bs).map(|i| (i as u8).wrapping_mul(31) ^ qid as u8).collect()
}

/// What one I/O thread needs to choose and issue its next command.
struct Gen {
    rng: Rng,
    /// Next offset within the region, for sequential patterns.
    cursor: u64,
    wbuf: Vec<u8>,
    /// Submission time and direction by command id.
    started: Vec<(Instant, bool)>,
}

impl Gen {
    fn issue(&mut self, q: &mut impl IoQueue, cfg: &BenchConfig, w: &Worker) -> anyhow::Result<()> {
        let bs = u64::from(cfg.bs);
        let is_read = match cfg.rw {
            Rw::Read | Rw::Randread => true,
            Rw::Write | Rw::Randwrite => false,
            Rw::Randrw => self.rng.next() % 100 < u64::from(cfg.rwmixread),
        };
        let offset = if cfg.rw.random() {
            (self.rng.next() % (w.span / bs)) * bs
        } else {
            let (start, len) = w.region;
            let o = start + self.cursor;
            self.cursor = (self.cursor + bs) % (len / bs * bs);
            o
        };
        let id = if is_read {
            q.submit_read(offset, cfg.bs)?
        } else {
            q.submit_write(offset, &self.wbuf)?
        };
        if let Some(s) = self.started.get_mut(usize::from(id)) {
            *s = (Instant::now(), is_read);
        }
        Ok(())
    }
}

/// Runs the workload described by `cfg`.
pub fn run(cfg: &BenchConfig) -> anyhow::Result<Report> {
    if cfg.qd < 1 || cfg.qd > 127 {
        bail!("--qd must be 1..=127 (the target's queues hold 128 entries)");
    }
    if cfg.queues < 1 {
        bail!("--queues must be at least 1");
    }
    if let Some(export) = &cfg.nbd_export {
        return run_nbd(cfg, export);
    }
    let admin_opts = QueueOptions {
        header_digest: cfg.header_digest,
        data_digest: cfg.data_digest,
        kato_ms: cfg.kato_ms,
        timeout: cfg.timeout,
        tls: cfg.tls.clone(),
        ..QueueOptions::default()
    };
    let (mut admin, ctrl, ns) =
        crate::open_controller(cfg.addr, &cfg.nqn, &cfg.hostnqn, cfg.nsid, &admin_opts)
            .with_context(|| format!("opening controller {} at {}", cfg.nqn, cfg.addr))?;
    let granted = admin.set_num_queues(cfg.queues).context("Set Features (Number of Queues)")?;
    if granted < cfg.queues {
        bail!("asked for {} I/O queues, the controller granted {granted}", cfg.queues);
    }
    if cfg.bs == 0 || !cfg.bs.is_multiple_of(ns.lba_size) {
        bail!("--bs {} is not a multiple of the LBA size {}", cfg.bs, ns.lba_size);
    }
    if let Some(max) = ctrl.max_transfer_bytes() {
        if u64::from(cfg.bs) > max {
            bail!("--bs {} exceeds the controller's maximum transfer (MDTS) of {max}", cfg.bs);
        }
    }
    let cntlid = admin.cntlid();
    let in_capsule = ctrl.in_capsule_bytes();
    let lba_size = ns.lba_size;
    let ka_every = Duration::from_millis(u64::from(cfg.kato_ms / 3).clamp(100, 5000));
    let mut next_ka = Instant::now() + ka_every;
    let measured = measure(
        cfg,
        ns.size_bytes(),
        |w| Worker { cntlid, in_capsule, lba_size, ..w },
        worker,
        |now| {
            if cfg.kato_ms > 0 && now >= next_ka {
                admin.keep_alive().context("keep-alive on the admin queue")?;
                next_ka = now + ka_every;
            }
            Ok(())
        },
    )?;
    Ok(measured.report(cfg, cntlid, ns.size_bytes(), admin.conn_mut().tls_description()))
}

/// Bytes in flight per NBD connection with reads and writes mixed (see [`run_nbd`]).
const NBD_MIXED_MAX: u64 = 1 << 20;

/// The workload over NBD: each "queue" is a connection to `export`.
fn run_nbd(cfg: &BenchConfig, export: &str) -> anyhow::Result<Report> {
    if cfg.tls.is_some() {
        bail!("--tls-key is NVMe/TCP's; NBD runs in plaintext here");
    }
    let probe = NbdClient::connect(cfg.addr, export, 1, cfg.timeout, false)
        .with_context(|| format!("opening NBD export {export:?} at {}", cfg.addr))?;
    let info = probe.info();
    probe.disconnect().context("NBD disconnect")?;
    if cfg.bs == 0 || !cfg.bs.is_multiple_of(info.min_block.max(1)) {
        bail!("--bs {} is not a multiple of the export's minimum block {}", cfg.bs, info.min_block);
    }
    if cfg.bs > info.max_block.min(crate::nbd::MAX_REQUEST) {
        bail!("--bs {} exceeds the export's maximum block {}", cfg.bs, info.max_block);
    }
    if info.read_only() && !matches!(cfg.rw, Rw::Read | Rw::Randread) {
        bail!("export {export:?} is read-only");
    }
    // A connection sends its writes' payloads before it reads replies: with reads in flight as
    // well, a server whose replies fill the socket buffers stops reading, and both wait. Within
    // this bound the replies always fit the buffers.
    if cfg.rw == Rw::Randrw && u64::from(cfg.qd) * u64::from(cfg.bs) > NBD_MIXED_MAX {
        bail!(
            "--rw randrw over NBD takes --qd x --bs up to {} KiB (writes are sent before replies \
             are read)",
            NBD_MIXED_MAX >> 10
        );
    }
    let measured = measure(
        cfg,
        info.size,
        |w| w,
        |cfg, w, start, stop| nbd_worker(cfg, export, w, start, stop),
        |_| Ok(()),
    )?;
    Ok(measured.report(cfg, 0, info.size, None))
}

/// What [`measure`] took: the merged statistics and the client's CPU over the run.
struct Measured {
    elapsed: Duration,
    read: DirStats,
    write: DirStats,
    usr_cpu: f64,
    sys_cpu: f64,
}

impl Measured {
    fn report(self, cfg: &BenchConfig, cntlid: u16, bytes: u64, tls: Option<String>) -> Report {
        Report {
            config: cfg.clone(),
            elapsed: self.elapsed,
            read: self.read,
            write: self.write,
            usr_cpu: self.usr_cpu,
            sys_cpu: self.sys_cpu,
            cntlid,
            namespace_bytes: bytes,
            tls,
        }
    }
}

/// Starts `cfg.queues` threads running `body` over `device_bytes` (each with its slice for
/// sequential patterns), calls `tick` every few milliseconds until the runtime ends, stops them
/// and merges what they measured.
fn measure<B, T>(
    cfg: &BenchConfig,
    device_bytes: u64,
    shape: impl Fn(Worker) -> Worker,
    body: B,
    mut tick: T,
) -> anyhow::Result<Measured>
where
    B: Fn(
            &BenchConfig,
            &Worker,
            &Start,
            &AtomicBool,
        ) -> anyhow::Result<(DirStats, DirStats, Instant)>
        + Sync,
    T: FnMut(Instant) -> anyhow::Result<()>,
{
    let bs = u64::from(cfg.bs);
    let span = cfg.size.unwrap_or(device_bytes).min(device_bytes) / bs * bs;
    let per_queue = span / u64::from(cfg.queues) / bs * bs;
    if per_queue < bs {
        bail!("--size {span} too small for {} queues of {}-byte blocks", cfg.queues, cfg.bs);
    }
    let start = Start::default();
    let stop = AtomicBool::new(false);
    let failed = AtomicBool::new(false);
    let finished = AtomicUsize::new(0);
    thread::scope(|scope| {
        let mut threads = Vec::new();
        for i in 0..cfg.queues {
            let w = shape(Worker {
                qid: i + 1,
                cntlid: 0,
                in_capsule: 0,
                lba_size: 1,
                region: (u64::from(i) * per_queue, per_queue),
                span,
            });
            let (start, stop, failed, finished, body) = (&start, &stop, &failed, &finished, &body);
            let spawned = thread::Builder::new().name(format!("ioq{}", w.qid)).spawn_scoped(
                scope,
                move || {
                    let r = body(cfg, &w, start, stop);
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    finished.fetch_add(1, Ordering::Relaxed);
                    r
                },
            );
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // The threads started stop at once instead of waiting for the others.
                    stop.store(true, Ordering::Relaxed);
                    start.open();
                    return Err(anyhow::Error::from(e).context("starting an I/O thread"));
                }
            }
        }

        start.wait_for(threads.len());
        let t_start = Instant::now();
        let cpu_start = cpu_seconds();
        let mut tick_err = None;
        let all_done = || finished.load(Ordering::Relaxed) == usize::from(cfg.queues);
        while t_start.elapsed() < cfg.runtime && !failed.load(Ordering::Relaxed) && !all_done() {
            if let Err(e) = tick(Instant::now()) {
                tick_err = Some(e);
                break;
            }
            let left = cfg.runtime.saturating_sub(t_start.elapsed());
            thread::sleep(left.min(Duration::from_millis(5)));
        }
        let ran_out = !all_done();
        stop.store(true, Ordering::Relaxed);
        let mut elapsed = t_start.elapsed();
        let cpu_end = cpu_seconds();

        let mut read = DirStats::new();
        let mut write = DirStats::new();
        let mut errors = Vec::new();
        let mut latest = Duration::ZERO;
        for t in threads {
            match t.join() {
                Ok(Ok((r, w, last))) => {
                    read.merge(&r);
                    write.merge(&w);
                    if !ran_out {
                        // Every queue did its --number-ios: the run ends at the last completion.
                        latest = latest.max(last.saturating_duration_since(t_start));
                    }
                }
                Ok(Err(e)) => errors.push(format!("{e:#}")),
                Err(_) => errors.push("an I/O thread panicked".into()),
            }
        }
        if let Some(e) = tick_err {
            errors.push(format!("{e:#}"));
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("; "));
        }
        if !ran_out && !latest.is_zero() {
            elapsed = latest;
        }
        let secs = elapsed.as_secs_f64().max(1e-9);
        Ok(Measured {
            elapsed,
            read,
            write,
            usr_cpu: 100.0 * (cpu_end.0 - cpu_start.0) / secs,
            sys_cpu: 100.0 * (cpu_end.1 - cpu_start.1) / secs,
        })
    })
}

/// What [`handshakes`] measured.
#[derive(Debug, Clone)]
pub struct HandshakeReport {
    pub count: u64,
    pub elapsed: Duration,
    /// Process CPU seconds over the loop (user, system).
    pub cpu_s: (f64, f64),
    pub tls: bool,
}

impl HandshakeReport {
    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn text(&self) -> String {
        format!(
            "ballast-perf: {} handshakes ({}) in {:.3}s: {:.0}/s, client cpu {:.1} us each\n",
            self.count,
            if self.tls { "TLS" } else { "plaintext" },
            self.elapsed.as_secs_f64(),
            self.per_second(),
            (self.cpu_s.0 + self.cpu_s.1) * 1e6 / self.count.max(1) as f64,
        )
    }

    pub fn json(&self) -> Value {
        json!({
            "handshakes": self.count,
            "seconds": self.elapsed.as_secs_f64(),
            "per_second": self.per_second(),
            "usr_cpu_s": self.cpu_s.0,
            "sys_cpu_s": self.cpu_s.1,
            "tls": self.tls,
        })
    }
}

/// `count` times in a row: TCP connect, TLS handshake (with `cfg.tls`), ICReq/ICResp, Fabrics
/// Connect of an admin queue, Fabrics Disconnect, close. What a host pays to set up one queue
/// (the kernel host connects an admin queue and one I/O queue per CPU this way).
pub fn handshakes(cfg: &BenchConfig, count: u64) -> anyhow::Result<HandshakeReport> {
    let opts = QueueOptions {
        header_digest: cfg.header_digest,
        data_digest: cfg.data_digest,
        kato_ms: cfg.kato_ms,
        timeout: cfg.timeout,
        tls: cfg.tls.clone(),
        ..QueueOptions::default()
    };
    let cpu_start = cpu_seconds();
    let t_start = Instant::now();
    for i in 0..count {
        let mut q = Queue::connect(cfg.addr, &cfg.nqn, &cfg.hostnqn, 0, CNTLID_DYNAMIC, &opts)
            .with_context(|| format!("connection {i} to {} at {}", cfg.nqn, cfg.addr))?;
        q.disconnect().with_context(|| format!("Disconnect of connection {i}"))?;
    }
    let elapsed = t_start.elapsed();
    let cpu_end = cpu_seconds();
    Ok(HandshakeReport {
        count,
        elapsed,
        cpu_s: (cpu_end.0 - cpu_start.0, cpu_end.1 - cpu_start.1),
        tls: cfg.tls.is_some(),
    })
}

/// fio's default completion-latency percentiles.
const PERCENTILES: [f64; 17] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95,
    99.99,
];

impl Report {
    fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64().max(1e-9)
    }

    fn dir_line(&self, name: &str, d: &DirStats) -> String {
        let us = |ns: u64| ns as f64 / 1000.0;
        format!(
            "{name:>5}: IOPS={:.0} BW={:.1}MiB/s lat(us): p50={:.1} p99={:.1} p99.9={:.1} max={:.1} ({} ios)",
            d.ops as f64 / self.secs(),
            d.bytes as f64 / self.secs() / (1u64 << 20) as f64,
            us(d.pct(0.50)),
            us(d.pct(0.99)),
            us(d.pct(0.999)),
            us(d.lat_ns.max()),
            d.ops
        )
    }

    /// Human-readable summary.
    pub fn text(&self) -> String {
        let c = &self.config;
        let target = match &c.nbd_export {
            Some(export) => format!("NBD export {export:?}"),
            None => format!(
                "{} digests: header {}, data {}",
                c.nqn,
                if c.header_digest { "on" } else { "off" },
                if c.data_digest { "on" } else { "off" },
            ),
        };
        let mut s = format!(
            "ballast-perf: {} {target} rw={} bs={} qd={} {}={} runtime={:.2}s\n",
            c.addr,
            c.rw.name(),
            c.bs,
            c.qd,
            if c.nbd_export.is_some() { "connections" } else { "queues" },
            c.queues,
            self.secs(),
        );
        if self.read.ops > 0 {
            s += &self.dir_line("read", &self.read);
            s.push('\n');
        }
        if self.write.ops > 0 {
            s += &self.dir_line("write", &self.write);
            s.push('\n');
        }
        let mut all = self.read.clone();
        all.merge(&self.write);
        s += &self.dir_line("total", &all);
        s.push('\n');
        s += &format!("  cpu: usr={:.1}% sys={:.1}%\n", self.usr_cpu, self.sys_cpu);
        if let Some(tls) = &self.tls {
            s += &format!("  tls: {tls}\n");
        }
        s
    }

    fn dir_json(&self, d: &DirStats) -> Value {
        let mut pct = serde_json::Map::new();
        for p in PERCENTILES {
            pct.insert(format!("{p:.6}"), json!(d.pct(p / 100.0)));
        }
        let (min, max, mean, stddev) = if d.lat_ns.is_empty() {
            (0, 0, 0.0, 0.0)
        } else {
            (d.lat_ns.min(), d.lat_ns.max(), d.lat_ns.mean(), d.lat_ns.stdev())
        };
        let lat = json!({
            "min": min, "max": max, "mean": mean, "stddev": stddev, "N": d.ops, "percentile": pct,
        });
        let bw_bytes = (d.bytes as f64 / self.secs()) as u64;
        json!({
            "io_bytes": d.bytes,
            "io_kbytes": d.bytes / 1024,
            "bw_bytes": bw_bytes,
            "bw": bw_bytes / 1024,
            "iops": d.ops as f64 / self.secs(),
            "runtime": self.elapsed.as_millis() as u64,
            "total_ios": d.ops,
            "short_ios": 0,
            "drop_ios": 0,
            "slat_ns": {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0},
            "clat_ns": lat.clone(),
            "lat_ns": lat,
        })
    }

    /// A fio-like JSON document (`jobs[0].read` / `jobs[0].write`).
    pub fn json(&self) -> Value {
        let c = &self.config;
        json!({
            "fio version": concat!("ballast-perf-", env!("CARGO_PKG_VERSION")),
            "timestamp": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            "global options": {
                "ioengine": if c.nbd_export.is_some() { "ballast-perf (NBD)" } else { "ballast-perf (NVMe/TCP)" },
                "addr": c.addr.to_string(),
                "nqn": c.nqn,
                "nbd_export": c.nbd_export,
                "hostnqn": c.hostnqn,
                "header_digest": c.header_digest,
                "data_digest": c.data_digest,
                "tls": self.tls,
            },
            "jobs": [{
                "jobname": c.rw.name(),
                "groupid": 0,
                "error": 0,
                "job options": {
                    "rw": c.rw.name(),
                    "bs": c.bs.to_string(),
                    "iodepth": c.qd.to_string(),
                    "numjobs": "1",
                    "queues": c.queues.to_string(),
                    "runtime": c.runtime.as_secs_f64().to_string(),
                    "size": c.size.unwrap_or(self.namespace_bytes).to_string(),
                    "rwmixread": c.rwmixread.to_string(),
                },
                "elapsed": self.elapsed.as_secs(),
                "job_runtime": self.elapsed.as_millis() as u64,
                "read": self.dir_json(&self.read),
                "write": self.dir_json(&self.write),
                "trim": self.dir_json(&DirStats::new()),
                "usr_cpu": self.usr_cpu,
                "sys_cpu": self.sys_cpu,
                "iodepth": c.qd,
                "cntlid": self.cntlid,
            }],
        })
    }
}
