//! `ballast-floor`: the loopback floor under any TCP storage target — a request/response
//! exchange of a protocol's byte sizes, with nothing in the server but the socket calls.
//!
//! `ballast-floor serve` answers every `--req`-byte request with `--resp` bytes, in order, from
//! one thread: it receives what the socket holds (up to 256 KiB), answers every whole request
//! in it with one send, and either spins on a non-blocking socket (`--poll`, what a polling
//! target does while requests keep coming) or sleeps in `recv` (what a target does between
//! bursts). It parses, decides and copies nothing beyond what the kernel's socket calls need, so
//! its server CPU per I/O and the latency its client sees are what a target costs at the least
//! on the same machine, kernel and TCP stack: the reference a target's figures are measured
//! against (perf/floor_bench.py), where the machine itself moves from run to run. With
//! `--span 1G` it also copies each request's 4 KiB from or to a random block of 1 GiB of
//! memory (whole 2 MiB units of it, on huge pages where the kernel has them, each behind the
//! lock of `ballast_ffi::region`), once, as the least a RAM-backed target does (SPDK's malloc
//! bdev copies the same way, from huge pages).
//!
//! `ballast-floor run` is its client: `--qd` requests in flight, each answered in order, for
//! `--runtime` seconds (or `--number-ios`), spinning (`--poll`) or sleeping in `recv`, as
//! `ballast-perf` does; `--json` prints fio-like JSON (`jobs[0].read` or `.write` by `--dir`,
//! completion latency, the client's CPU) so the same harness reads both clients.
//!
//! The sizes of the common exchanges (`--shape`): NVMe/TCP 4 KiB read (a 72-byte command
//! capsule; a 24-byte C2HData header, 4,096 bytes of data and a 24-byte response capsule),
//! NVMe/TCP 4 KiB write with its data in the capsule (4,168 bytes; a 24-byte response), NBD
//! 4 KiB read (a 28-byte request; a 16-byte simple reply and the data), NBD 4 KiB write.
#![forbid(unsafe_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ballast_ffi::region::{Region, HUGE};
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::json;

/// The most a server receives at once.
const RECV_ROOM: usize = 256 * 1024;
/// The data of one request.
const BLOCK: usize = 4096;

fn parse_bytes(s: &str) -> Result<usize, String> {
    ballast_engine::size::parse_size(s).map(|n| n as usize).map_err(|e| e.to_string())
}

#[derive(Parser, Debug)]
#[command(
    name = "ballast-floor",
    version,
    about = "The loopback floor: request/response over bare sockets"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Shape {
    /// NVMe/TCP 4 KiB read: 72-byte command capsule; C2HData (24 + 4096) and a response (24).
    NvmfRead4k,
    /// NVMe/TCP 4 KiB write, data in capsule: 72 + 4096; a 24-byte response.
    NvmfWrite4k,
    /// NBD 4 KiB read: a 28-byte request; a 16-byte reply header and 4096 bytes.
    NbdRead4k,
    /// NBD 4 KiB write: 28 + 4096; a 16-byte reply.
    NbdWrite4k,
}

impl Shape {
    /// (request bytes, response bytes, a read)
    fn sizes(self) -> (usize, usize, bool) {
        match self {
            Shape::NvmfRead4k => (72, 24 + 4096 + 24, true),
            Shape::NvmfWrite4k => (72 + 4096, 24, false),
            Shape::NbdRead4k => (28, 16 + 4096, true),
            Shape::NbdWrite4k => (28 + 4096, 16, false),
        }
    }

    /// Where the 4 KiB of data start in a response (reads) or a request (writes).
    fn data_at(self) -> usize {
        match self {
            Shape::NvmfRead4k => 24,
            Shape::NvmfWrite4k => 72,
            Shape::NbdRead4k => 16,
            Shape::NbdWrite4k => 28,
        }
    }
}

#[derive(clap::Args, Debug)]
struct Sizes {
    /// The exchange's byte sizes.
    #[arg(long, value_enum, default_value = "nvmf-read4k")]
    shape: Shape,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Answers requests on ADDR until killed, one connection at a time.
    Serve {
        #[arg(long, default_value = "127.0.0.1:4499")]
        listen: SocketAddr,
        #[command(flatten)]
        sizes: Sizes,
        /// Spin on a non-blocking socket instead of sleeping in recv.
        #[arg(long)]
        poll: bool,
        /// Copy each request's 4 KiB from (reads) or to (writes) a random block of this many
        /// bytes of memory (whole 2 MiB units, at least one), as a RAM-backed target must (e.g.
        /// 1G); 0: touch no data.
        #[arg(long, default_value = "0", value_parser = parse_bytes)]
        span: usize,
    },
    /// Keeps QD requests in flight against a `serve`.
    Run {
        #[arg(long, default_value = "127.0.0.1:4499")]
        addr: SocketAddr,
        #[command(flatten)]
        sizes: Sizes,
        #[arg(long, default_value_t = 1)]
        qd: u32,
        /// Seconds to run (fractions allowed).
        #[arg(long, default_value_t = 5.0)]
        runtime: f64,
        /// Stop after this many requests (the runtime still bounds the run).
        #[arg(long)]
        number_ios: Option<u64>,
        /// Spin on a non-blocking socket instead of sleeping in recv.
        #[arg(long)]
        poll: bool,
        /// Print fio-like JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let r = match args.cmd {
        Cmd::Serve { listen, sizes, poll, span } => serve(listen, sizes.shape, poll, span),
        Cmd::Run { addr, sizes, qd, runtime, number_ios, poll, json } => {
            let cfg = RunConfig {
                addr,
                shape: sizes.shape,
                qd: qd.max(1),
                runtime: Duration::from_secs_f64(runtime.max(0.0)),
                number_ios: number_ios.unwrap_or(u64::MAX),
                poll,
            };
            run(&cfg).map(|report| {
                if json {
                    println!("{}", report.json(&cfg));
                } else {
                    println!("{}", report.text());
                }
            })
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ballast-floor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads what the socket holds into `buf`, spinning on `WouldBlock` when polled; 0 at its end.
fn recv_some(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                std::hint::spin_loop()
            }
            r => return r,
        }
    }
}

/// Writes all of `buf`, spinning on `WouldBlock` when polled.
fn send_all(s: &mut TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                std::hint::spin_loop()
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn open(s: &TcpStream, poll: bool) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_nonblocking(poll)
}

fn serve(listen: SocketAddr, shape: Shape, poll: bool, span: usize) -> anyhow::Result<()> {
    if span != 0 && span < HUGE {
        bail!("--span {span}: 0 or at least 2 MiB (the memory is used in whole 2 MiB units)");
    }
    let (req, resp, read) = shape.sizes();
    // The replies of a full receive, at most: every whole request in RECV_ROOM answered.
    let mut replies = vec![0x5au8; (RECV_ROOM / req + 1) * resp];
    let mut buf = vec![0u8; RECV_ROOM];
    // The memory a RAM-backed target serves, on huge pages where the kernel has them (as
    // SPDK's malloc bdev and ballast's RAM exports are): written once, so every page is there
    // before the server listens.
    let media = Region::new(span.max(1), HUGE)?;
    let fill = vec![0x3cu8; HUGE];
    for idx in 0..(span / HUGE) {
        media.write(idx, 0, &fill);
    }
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    let blocks = (span / HUGE * HUGE / BLOCK) as u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    loop {
        let (mut s, _) = listener.accept().context("accepting")?;
        open(&s, poll)?;
        // Bytes of a request begun in an earlier receive, kept at the front of `buf`.
        let mut partial = 0usize;
        loop {
            let n = match recv_some(&mut s, &mut buf[partial..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let whole = (partial + n) / req;
            if blocks > 0 {
                // Each request's 4 KiB to or from a random block of the media, as a RAM
                // target copies it (the replies' data, or the requests' data).
                for i in 0..whole {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let at = (rng % blocks) as usize * BLOCK;
                    let (idx, within) = (at / HUGE, at % HUGE);
                    if read {
                        let data = i * resp + shape.data_at();
                        media.read(idx, within, &mut replies[data..data + BLOCK]);
                    } else {
                        let data = i * req + shape.data_at();
                        media.write(idx, within, &buf[data..data + BLOCK]);
                    }
                }
            }
            let left = (partial + n) % req;
            buf.copy_within(whole * req..whole * req + left, 0);
            partial = left;
            if whole > 0 && send_all(&mut s, &replies[..whole * resp]).is_err() {
                break;
            }
        }
    }
}

struct RunConfig {
    addr: SocketAddr,
    shape: Shape,
    qd: u32,
    runtime: Duration,
    number_ios: u64,
    poll: bool,
}

struct Report {
    ios: u64,
    elapsed: Duration,
    lat_ns: Histogram<u64>,
    usr_cpu_s: f64,
    sys_cpu_s: f64,
}

/// This process's user and system CPU seconds.
fn cpu_seconds() -> (f64, f64) {
    use nix::sys::resource::{getrusage, UsageWho};
    let Ok(u) = getrusage(UsageWho::RUSAGE_SELF) else { return (0.0, 0.0) };
    let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    (s(u.user_time()), s(u.system_time()))
}

fn run(cfg: &RunConfig) -> anyhow::Result<Report> {
    let (req, resp, _) = cfg.shape.sizes();
    let mut s =
        TcpStream::connect(cfg.addr).with_context(|| format!("connecting to {}", cfg.addr))?;
    open(&s, cfg.poll)?;
    let requests = vec![0xa5u8; req * cfg.qd as usize];
    let mut buf = vec![0u8; resp * cfg.qd as usize];
    // Submission times of the requests in flight, oldest first: replies come in order.
    let mut sent: std::collections::VecDeque<Instant> = Default::default();
    let mut lat_ns = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let t0 = Instant::now();
    let cpu0 = cpu_seconds();
    let first = u64::from(cfg.qd).min(cfg.number_ios);
    send_all(&mut s, &requests[..req * first as usize]).context("sending")?;
    sent.extend(std::iter::repeat_n(t0, first as usize));
    let (mut issued, mut ios, mut partial) = (first, 0u64, 0usize);
    let mut last = t0;
    while !sent.is_empty() {
        let n = recv_some(&mut s, &mut buf).context("receiving")?;
        if n == 0 {
            bail!("the server closed the connection with {} requests in flight", sent.len());
        }
        let whole = (partial + n) / resp;
        partial = (partial + n) % resp;
        if whole == 0 {
            continue;
        }
        last = Instant::now();
        for _ in 0..whole {
            let Some(at) = sent.pop_front() else { bail!("a reply with no request in flight") };
            lat_ns.saturating_record(last.duration_since(at).as_nanos() as u64);
        }
        ios += whole as u64;
        let more = if last.duration_since(t0) < cfg.runtime {
            (whole as u64).min(cfg.number_ios - issued)
        } else {
            0
        };
        if more > 0 {
            let at = Instant::now();
            send_all(&mut s, &requests[..req * more as usize]).context("sending")?;
            sent.extend(std::iter::repeat_n(at, more as usize));
            issued += more;
        }
    }
    let cpu1 = cpu_seconds();
    Ok(Report {
        ios,
        elapsed: last.duration_since(t0),
        lat_ns,
        usr_cpu_s: cpu1.0 - cpu0.0,
        sys_cpu_s: cpu1.1 - cpu0.1,
    })
}

impl Report {
    fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64().max(1e-9)
    }

    fn text(&self) -> String {
        format!(
            "{} requests in {:.2} s: {:.0} per second, latency avg {:.2} us, p50 {:.2}, p99 {:.2}; client CPU {:.2} us per request",
            self.ios,
            self.secs(),
            self.ios as f64 / self.secs(),
            self.lat_ns.mean() / 1000.0,
            self.lat_ns.value_at_quantile(0.5) as f64 / 1000.0,
            self.lat_ns.value_at_quantile(0.99) as f64 / 1000.0,
            (self.usr_cpu_s + self.sys_cpu_s) * 1e6 / self.ios.max(1) as f64,
        )
    }

    /// fio-like: `jobs[0].read` or `jobs[0].write` (by the shape), usr/sys CPU in percent.
    fn json(&self, cfg: &RunConfig) -> serde_json::Value {
        let mut pct = serde_json::Map::new();
        for p in [1.0, 5.0, 10.0, 50.0, 90.0, 95.0, 99.0, 99.9, 99.99] {
            pct.insert(format!("{p:.6}"), json!(self.lat_ns.value_at_quantile(p / 100.0)));
        }
        let lat = json!({
            "min": self.lat_ns.min(), "max": self.lat_ns.max(), "mean": self.lat_ns.mean(),
            "stddev": self.lat_ns.stdev(), "N": self.ios, "percentile": pct,
        });
        let side = json!({
            "iops": self.ios as f64 / self.secs(),
            "total_ios": self.ios,
            "runtime": self.elapsed.as_millis() as u64,
            "clat_ns": lat.clone(),
            "lat_ns": lat,
        });
        let idle = json!({"iops": 0.0, "total_ios": 0, "runtime": 0});
        let (_, _, read) = cfg.shape.sizes();
        let (r, w) = if read { (side, idle) } else { (idle, side) };
        json!({
            "fio version": concat!("ballast-floor-", env!("CARGO_PKG_VERSION")),
            "jobs": [{
                "jobname": format!("{:?}", cfg.shape),
                "job_runtime": self.elapsed.as_millis() as u64,
                "read": r,
                "write": w,
                "usr_cpu": 100.0 * self.usr_cpu_s / self.secs(),
                "sys_cpu": 100.0 * self.sys_cpu_s / self.secs(),
                "iodepth": cfg.qd,
                "poll": cfg.poll,
            }],
        })
    }
}
