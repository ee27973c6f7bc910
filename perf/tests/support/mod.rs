//! The daemon the NVMe/TCP tests talk to: one `ballast serve` on free loopback ports with
//! its own data directory, its control CLI, its log, and a clean SIGTERM exit checked at the
//! end. Shared by the test files of this crate (`mod support;`).
#![allow(dead_code)] // each test file uses its own part

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn ballast_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BALLAST_BIN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/cargo/release/ballast")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free loopback port")
}

static DAEMONS: AtomicU32 = AtomicU32::new(0);

/// One `ballast serve` with exports `main` (64 MiB) and `fuzz` (16 MiB) in RAM.
pub struct Daemon {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// Where it serves NBD.
    pub nbd_addr: SocketAddr,
    pub dir: PathBuf,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(|_| {
            vec!["--export".into(), "main=ram:64M".into(), "--export".into(), "fuzz=ram:16M".into()]
        })
    }

    /// A daemon whose backend arguments `args(dir)` builds (after preparing files in `dir`).
    pub fn start_with(args: impl Fn(&Path) -> Vec<String>) -> Daemon {
        let bin = ballast_bin();
        assert!(
            bin.is_file(),
            "ballast binary not found at {}: run `cargo build --release` first, or set BALLAST_BIN",
            bin.display()
        );
        for _attempt in 0..5 {
            let n = DAEMONS.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("ballast-perf-test-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("creating the daemon's data dir");
            let log = File::create(dir.join("ballast.log")).expect("creating the log");
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let nbd_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let nbd = nbd_addr.to_string();
            let child = Process::new(&bin)
                .arg("serve")
                .arg("--data-dir")
                .arg(&dir)
                .args(["--nbd-listen", &nbd, "--nvmf-listen", &addr.to_string()])
                .arg("--rpc-socket")
                .arg(dir.join("ballast.sock"))
                .args(["--cores", "1"])
                .args(args(&dir))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log fd"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            let mut d = Daemon { child: Some(child), addr, nbd_addr, dir };
            // Ready when the daemon itself says it listens on both ports. A connect is no
            // proof: `free_port` hands out ephemeral ports, so a probe to a port nobody listens
            // on yet can connect to itself (TCP simultaneous open), or reach another test's
            // daemon that took the same port after ours failed to bind.
            let said = |log: &str, a: &str| {
                log.lines().any(|l| l.contains(" listening ") && l.contains(&format!("addr={a} ")))
            };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if !d.running() {
                    break;
                }
                let log = d.log();
                if said(&log, &addr.to_string()) && said(&log, &nbd) {
                    let probe = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                        .expect("connecting to a daemon that says it listens");
                    assert_ne!(probe.local_addr().ok(), probe.peer_addr().ok(), "self-connect");
                    return d;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let log = d.log();
            if log.contains("Address already in use") {
                continue; // lost a race for a port
            }
            panic!("ballast did not start listening on {addr}; log:\n{log}");
        }
        panic!("ballast could not get free ports in 5 attempts");
    }

    /// Runs the control CLI against this daemon; panics unless it succeeds.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Process::new(ballast_bin())
            .args(args)
            .arg("--rpc-socket")
            .arg(self.dir.join("ballast.sock"))
            .output()
            .expect("running the ballast CLI");
        assert!(out.status.success(), "ballast {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon child").id()
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(self.dir.join("ballast.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM; the daemon must exit 0 within 20 s, and never have panicked.
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("daemon child");
        let _ = Process::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break None,
            }
        };
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let log = self.log();
        assert!(!log.contains("panicked"), "ballast panicked; log:\n{log}");
        match status {
            Some(s) if s.success() => {}
            other => panic!("ballast did not exit 0 after SIGTERM ({other:?}); log:\n{log}"),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A short benchmark run both test files use: random reads and writes, 8 in flight on each of
/// two queues over the first 8 MiB for 300 ms, no digests, no TLS, NVMe/TCP (fields set by
/// each test where they differ).
pub fn short_bench(addr: SocketAddr) -> ballast_perf::bench::BenchConfig {
    ballast_perf::bench::BenchConfig {
        addr,
        nqn: String::new(),
        hostnqn: String::new(),
        nsid: 1,
        rw: ballast_perf::bench::Rw::Randrw,
        bs: 4096,
        qd: 8,
        queues: 2,
        runtime: Duration::from_millis(300),
        size: Some(8 << 20),
        rwmixread: 50,
        header_digest: false,
        data_digest: false,
        disable_sqflow: false,
        kato_ms: 15000,
        timeout: Duration::from_secs(10),
        seed: 7,
        number_ios: None,
        tls: None,
        poll: false,
        nbd_export: None,
    }
}
