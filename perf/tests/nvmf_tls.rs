//! The ballast NVMe/TCP target over its secure channel, seen through the ballast-perf
//! initiator's TLS (TLS 1.3, the PSK derived as the Linux host derives it: identity
//! `NVMe0R01 <host> <subsystem>`, libnvme's encoding): the key configured the way a user
//! configures it (SPDK's `keyring_file_add_key` and `nvmf_subsystem_add_host --psk`, a
//! TLS-required listener), verified I/O through every data path (in-capsule writes, R2T and
//! H2CData, C2HData spanning many TLS records, with and without digests), the benchmark's own
//! paths (a timed run and the handshake loop), and refusals: a wrong key, plaintext from a
//! host that has a key, a Connect naming a subsystem the TLS identity does not name. Keys
//! never reach the daemon's log.
//!
//! Needs the daemon binary, as `nvmf_target.rs` does (`cargo build --release` first).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ballast_nvmf::nvme::{self, io};
use ballast_nvmf::psk::{PskTransform, TlsKey};
use ballast_nvmf::secret::SecretBytes;
use ballast_perf::bench::{self, BenchConfig};
use ballast_perf::{
    open_controller, Command, Data, Error, Queue, QueueOptions, TlsClient, CNTLID_DYNAMIC,
};

mod support;
use support::Daemon;

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
const OTHER_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-666666666666";
const MAIN: &str = "nqn.2026-11.dev.ballast:main";
const FUZZ: &str = "nqn.2026-11.dev.ballast:fuzz";
const TIMEOUT: Duration = Duration::from_secs(5);

fn random_key(transform: PskTransform, len: usize, seed: u64) -> TlsKey {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let bytes = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    TlsKey::new(transform, SecretBytes::new(bytes)).expect("a key of the right length")
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len).map(|i| ((i as u64).wrapping_mul(31).wrapping_add(seed) >> 3) as u8).collect()
}

/// Writes `key` in the interchange format to `dir/name` (mode 0600) and hands it to the
/// daemon's keyring for `host` on `subsystem`.
fn configure_key(d: &Daemon, dir: &Path, name: &str, key: &TlsKey, host: &str, subsystem: &str) {
    let path = dir.join(format!("{name}.key"));
    std::fs::write(&path, key.encode().as_bytes()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let add = format!(r#"{{"name":"{name}","path":"{}"}}"#, path.display());
    d.ctl(&["rpc", "keyring_file_add_key", &add]);
    let host = format!(r#"{{"nqn":"{subsystem}","host":"{host}","psk":"{name}"}}"#);
    d.ctl(&["rpc", "nvmf_subsystem_add_host", &host]);
}

fn tls_opts(tls: &Arc<TlsClient>, header_digest: bool, data_digest: bool) -> QueueOptions {
    QueueOptions {
        header_digest,
        data_digest,
        timeout: TIMEOUT,
        tls: Some(tls.clone()),
        ..QueueOptions::default()
    }
}

/// Admin queue and I/O queue 1 over TLS; every size through every data path, read back.
fn round_trips(addr: SocketAddr, o: &QueueOptions, seed: u64) {
    let (mut admin, info, ns) = open_controller(addr, MAIN, HOSTNQN, 1, o).expect("admin over TLS");
    let described = admin.conn_mut().tls_description().expect("a TLS connection");
    assert_eq!(described, "TLSv1.3 TLS_AES_128_GCM_SHA256");
    admin.set_num_queues(1).unwrap();
    let mut q = Queue::connect(addr, MAIN, HOSTNQN, 1, admin.cntlid(), o).expect("I/O queue");
    q.set_in_capsule_limit(info.in_capsule_bytes());
    q.set_lba_size(ns.lba_size);
    // In the capsule (4k, 8k), by R2T within one H2CData (64k) and across several (1 MiB):
    // records of 16 KiB split every PDU bigger than that.
    let sizes = [4096usize, 8192, 64 << 10, 128 << 10, 1 << 20];
    let mut slba = 0u64;
    for (i, len) in sizes.into_iter().enumerate() {
        let data = pattern(len, seed + i as u64);
        let w = q.submit_write(1, slba, &data).unwrap();
        let c = q.poll().unwrap();
        assert!(c.cid == w && c.ok(), "write of {len}: {c:?}");
        let sqe = q.rw_sqe(io::READ, 1, slba, len).unwrap();
        let (c, back) = q.execute(&Command { sqe, data: Data::FromTarget(len as u32) }).unwrap();
        assert!(c.ok(), "read of {len}: {c:?}");
        assert!(back == data, "read-back of {len} bytes differs");
        slba += (len / 4096) as u64 * 8;
    }
    // Pipelined: 32 reads of 4k in flight, as the benchmark keeps them.
    for i in 0..32 {
        q.submit_read(1, i * 8, 4096).unwrap();
    }
    for _ in 0..32 {
        assert!(q.poll().unwrap().ok());
    }
    q.disconnect().unwrap();
    assert!(q.conn_mut().wait_closed(TIMEOUT), "Disconnect closes the queue, TLS and all");
    admin.keep_alive().unwrap();
}

/// The daemon with a TLS-required listener and a SHA-256 key for HOSTNQN on MAIN.
fn tls_daemon() -> (Daemon, TlsKey) {
    let d = Daemon::start_with(|_| {
        ["--export", "main=ram:64M", "--export", "fuzz=ram:16M"]
            .into_iter()
            .chain(["--nvmf-secure-channel", "required"])
            .map(String::from)
            .collect()
    });
    let key = random_key(PskTransform::Sha256, 32, 1);
    configure_key(&d, &d.dir, "main", &key, HOSTNQN, MAIN);
    (d, key)
}

#[test]
fn tls_round_trips_with_and_without_digests() {
    let (d, key) = tls_daemon();
    let tls = Arc::new(TlsClient::new(&key, HOSTNQN, MAIN).unwrap());
    assert_eq!(tls.identity().to_string(), format!("NVMe0R01 {HOSTNQN} {MAIN}"));
    round_trips(d.addr, &tls_opts(&tls, false, false), 10);
    round_trips(d.addr, &tls_opts(&tls, true, true), 20);
    let log = d.log();
    assert!(log.contains("NVMe/TCP TLS established"), "no TLS in the log:\n{log}");
    assert!(!log.contains(key.encode().as_str()), "the key is in the log");
    d.stop();
}

#[test]
fn tls_refusals() {
    let (d, key) = tls_daemon();
    // A key for another host on the other subsystem (SHA-384): a second configured pair.
    let other = random_key(PskTransform::Sha384, 48, 2);
    configure_key(&d, &d.dir, "fuzz", &other, OTHER_HOST, FUZZ);
    let good = Arc::new(TlsClient::new(&key, HOSTNQN, MAIN).unwrap());
    let plain = QueueOptions { timeout: TIMEOUT, ..QueueOptions::default() };

    // The wrong key: the target finds the key for the identity, the binder does not match.
    let wrong =
        Arc::new(TlsClient::new(&random_key(PskTransform::Sha256, 32, 3), HOSTNQN, MAIN).unwrap());
    match Queue::connect(d.addr, MAIN, HOSTNQN, 0, CNTLID_DYNAMIC, &tls_opts(&wrong, false, false))
    {
        Err(Error::Tls(reason)) => assert!(!reason.contains("NVMeTLSkey"), "{reason}"),
        other => panic!("a wrong key: {:?}", other.map(|q| q.cntlid())),
    }
    // The right key for the wrong host: no key configured for that identity.
    let stranger = Arc::new(TlsClient::new(&key, OTHER_HOST, MAIN).unwrap());
    let r = Queue::connect(
        d.addr,
        MAIN,
        OTHER_HOST,
        0,
        CNTLID_DYNAMIC,
        &tls_opts(&stranger, false, false),
    );
    assert!(matches!(r, Err(Error::Tls(_))), "no key for that host: {:?}", r.map(|q| q.cntlid()));
    // Plaintext on the TLS-required listener: closed before any PDU.
    let r = Queue::connect(d.addr, MAIN, HOSTNQN, 0, CNTLID_DYNAMIC, &plain);
    assert!(matches!(r, Err(ref e) if e.is_disconnect()), "plaintext: {:?}", r.map(|q| q.cntlid()));
    // TLS proved MAIN's key; a Connect naming FUZZ (or another host) through it is refused.
    for (host, subsystem) in [(HOSTNQN, FUZZ), (OTHER_HOST, MAIN)] {
        match Queue::connect(
            d.addr,
            subsystem,
            host,
            0,
            CNTLID_DYNAMIC,
            &tls_opts(&good, false, false),
        ) {
            Err(Error::Status { status, .. }) => {
                assert_eq!(status, nvme::status::CONNECT_INVALID_HOST, "{host} {subsystem}")
            }
            other => panic!(
                "Connect to {subsystem} as {host} over MAIN's TLS: {:?}",
                other.map(|q| q.cntlid())
            ),
        }
    }
    // The other pair works with its own (SHA-384) key: TLS_AES_128_GCM_SHA256 all the same,
    // the suite the Linux host's tlshd binds every external PSK to.
    let fuzz = Arc::new(TlsClient::new(&other, OTHER_HOST, FUZZ).unwrap());
    assert_eq!(fuzz.identity().to_string(), format!("NVMe0R02 {OTHER_HOST} {FUZZ}"));
    let (mut admin, _, ns) =
        open_controller(d.addr, FUZZ, OTHER_HOST, 1, &tls_opts(&fuzz, false, false))
            .expect("the SHA-384 key on its own subsystem");
    assert_eq!(ns.size_bytes(), 16 << 20);
    admin.keep_alive().unwrap();
    // After all that, the good key still works.
    round_trips(d.addr, &tls_opts(&good, false, false), 30);
    let log = d.log();
    assert!(!log.contains(key.encode().as_str()) && !log.contains(other.encode().as_str()));
    d.stop();
}

/// What the benchmark runs: a short timed run with QD in flight on two queues, and the
/// handshake loop, over TLS and in plaintext.
#[test]
fn benchmark_paths_over_tls() {
    let (d, key) = tls_daemon();
    let tls = Arc::new(TlsClient::new(&key, HOSTNQN, MAIN).unwrap());
    let cfg = BenchConfig {
        nqn: MAIN.into(),
        hostnqn: HOSTNQN.into(),
        bs: 16384,
        timeout: TIMEOUT,
        tls: Some(tls),
        ..support::short_bench(d.addr)
    };
    let report = bench::run(&cfg).expect("a benchmark run over TLS");
    assert!(report.read.ops > 0 && report.write.ops > 0, "{}", report.text());
    assert_eq!(report.tls.as_deref(), Some("TLSv1.3 TLS_AES_128_GCM_SHA256"));
    assert!(report.text().contains("tls: TLSv1.3"));
    let shakes = bench::handshakes(&cfg, 5).expect("the handshake loop over TLS");
    assert_eq!(shakes.count, 5);
    assert!(shakes.per_second() > 0.0 && shakes.tls);
    // The same loop in plaintext is refused here (TLS required) ...
    let plain = BenchConfig { tls: None, ..cfg.clone() };
    assert!(bench::handshakes(&plain, 1).is_err());
    d.stop();
    // ... and runs against a plaintext listener.
    let d = Daemon::start();
    let plain = BenchConfig { addr: d.addr, ..plain };
    let shakes = bench::handshakes(&plain, 5).expect("the handshake loop in plaintext");
    assert!(!shakes.tls);
    let report = bench::run(&plain).expect("a plaintext run");
    assert_eq!(report.tls, None);
    // Polled I/O queues (spinning on their sockets) carry the same mixed load ...
    let polled = BenchConfig { poll: true, ..plain.clone() };
    let report = bench::run(&polled).expect("a polled plaintext run");
    assert!(report.read.ops > 0 && report.write.ops > 0, "{}", report.text());
    // ... in plaintext only.
    assert!(bench::run(&BenchConfig { poll: true, ..cfg.clone() }).is_err());
    d.stop();
}
