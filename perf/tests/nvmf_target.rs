//! The ballast NVMe/TCP target seen through the ballast-perf initiator: connect and identify,
//! verified I/O with and without digests (in-capsule and R2T writes, C2HData reads with and
//! without the SUCCESS shortcut), NVMe error statuses, commands out of sequence, malformed
//! PDUs (each must end in a C2HTermReq and a closed connection, or the documented status),
//! and a bounded fuzz loop. After every hostile case a fresh connection must still do
//! verified I/O and the daemon must still run; each test ends with a clean SIGTERM exit.
//!
//! Needs the daemon binary: `$BALLAST_BIN`, else `<workspace>/build/cargo/release/ballast`
//! (run `cargo build --release` first). Only 127.0.0.1 is used; every socket operation has a
//! timeout, so every test is bounded in time.

use std::net::SocketAddr;
use std::process::Command as Process;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ballast_nvmf::nvme::{self, admin, io, SqeBuilder, SGL_DATA_BLOCK_OFFSET};
use ballast_nvmf::pdu::{self, kind, CommonHeader, H2cData, IcReq};
use ballast_perf::{
    open_controller, Command, Conn, ControllerInfo, Data, Error, NamespaceInfo, Queue,
    QueueOptions, CNTLID_DYNAMIC,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestCaseError, TestRunner};

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
const MAIN: &str = "nqn.2026-11.dev.ballast:main";
const FUZZ: &str = "nqn.2026-11.dev.ballast:fuzz";
const MAIN_BYTES: u64 = 64 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);

// ------------------------------------------------------------------------------------ daemon

mod support;
use support::{ballast_bin, free_port, Daemon};

/// The health check every hostile case ends with.
trait Healthy {
    fn assert_healthy(&mut self, after: &str);
}

impl Healthy for Daemon {
    /// The daemon still runs and a fresh controller does verified I/O.
    fn assert_healthy(&mut self, after: &str) {
        assert!(self.running(), "ballast died after {after}; log tail:\n{}", self.log_tail());
        if let Err(e) = healthy_io(self.addr) {
            panic!("no healthy I/O after {after}: {e}; log tail:\n{}", self.log_tail());
        }
    }
}

// ----------------------------------------------------------------------------------- helpers

fn opts(header_digest: bool, data_digest: bool, disable_sqflow: bool) -> QueueOptions {
    QueueOptions {
        header_digest,
        data_digest,
        disable_sqflow,
        timeout: TIMEOUT,
        ..Default::default()
    }
}

/// A controller on `nqn`: admin queue (enabled, identified) and I/O queue 1.
struct Ctrl {
    admin: Queue,
    io: Queue,
    info: ControllerInfo,
    ns: NamespaceInfo,
}

fn controller(addr: SocketAddr, nqn: &str, o: &QueueOptions) -> Result<Ctrl, Error> {
    let (mut admin, info, ns) = open_controller(addr, nqn, HOSTNQN, 1, o)?;
    admin.set_num_queues(1)?;
    let mut io = Queue::connect(addr, nqn, HOSTNQN, 1, admin.cntlid(), o)?;
    io.set_in_capsule_limit(info.in_capsule_bytes());
    io.set_lba_size(ns.lba_size);
    Ok(Ctrl { admin, io, info, ns })
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

static HEALTH_SEED: AtomicU32 = AtomicU32::new(1);

/// A fresh controller on `main` writes and reads back 8 KiB (in-capsule) and 256 KiB (R2T).
fn healthy_io(addr: SocketAddr) -> Result<(), String> {
    let mut c = controller(addr, MAIN, &opts(false, false, false)).map_err(|e| e.to_string())?;
    let seed = u64::from(HEALTH_SEED.fetch_add(1, Ordering::Relaxed));
    for (slba, len) in [(8192 + (seed % 64) * 2, 8192usize), (12288, 256 << 10)] {
        let data = pattern(len, seed ^ slba);
        let w = c.io.submit_write(1, slba, &data).map_err(|e| e.to_string())?;
        let cw = c.io.poll().map_err(|e| e.to_string())?;
        if cw.cid != w || !cw.ok() {
            return Err(format!("write {len} at LBA {slba}: {cw:?}"));
        }
        let (cr, back) =
            c.io.execute(&Command {
                sqe: c.io.rw_sqe(io::READ, 1, slba, len).map_err(|e| e.to_string())?,
                data: Data::FromTarget(len as u32),
            })
            .map_err(|e| e.to_string())?;
        if !cr.ok() || back != data {
            return Err(format!("read-back of {len} bytes at LBA {slba} differs ({cr:?})"));
        }
    }
    c.admin.keep_alive().map_err(|e| e.to_string())
}

/// Reads until the target ends the connection: Ok(FES) if a C2HTermReq came and then the
/// socket closed.
fn expect_term(conn: &mut Conn) -> Result<u16, String> {
    for _ in 0..64 {
        match conn.read_header() {
            Err(Error::Terminated { fes, .. }) => {
                return if conn.wait_closed(TIMEOUT) {
                    Ok(fes)
                } else {
                    Err(format!("C2HTermReq (FES {fes:#x}) but the connection stayed open"))
                };
            }
            Ok(h) => conn.skip(h.rest).map_err(|e| e.to_string())?,
            Err(e) => return Err(format!("expected a C2HTermReq, got: {e}")),
        }
    }
    Err("no C2HTermReq after 64 PDUs".into())
}

/// A fresh TCP connection after ICReq/ICResp.
fn handshaken(addr: SocketAddr, hdgst: bool, ddgst: bool) -> Conn {
    let mut c = Conn::open(addr, TIMEOUT).expect("TCP connect");
    c.handshake(hdgst, ddgst).expect("ICReq/ICResp");
    c
}

fn read_sqe(cid: u16, slba: u64, nlb: u32) -> SqeBuilder {
    SqeBuilder {
        opcode: io::READ,
        cid,
        nsid: 1,
        sgl_len: nlb * 4096,
        sgl_type: nvme::SGL_TRANSPORT_DATA_BLOCK,
        cdw: [slba as u32, (slba >> 32) as u32, nlb - 1, 0, 0, 0],
        ..Default::default()
    }
}

fn capsule(sqe: &SqeBuilder, data: &[u8], hdgst: bool, ddgst: bool) -> Vec<u8> {
    let mut out = Vec::new();
    pdu::encode_capsule_cmd(&mut out, &sqe.encode(), data, hdgst, ddgst);
    out
}

/// A named hostile case run against the daemon's address.
type Case<'a> = (&'a str, &'a dyn Fn(SocketAddr) -> Result<(), String>);

/// Runs hostile `case`s, each on a fresh connection, checking health after each; collects
/// every failure so one report names them all.
fn run_cases(d: &mut Daemon, cases: &[Case<'_>]) {
    let mut failures = Vec::new();
    for (name, case) in cases {
        if let Err(e) = case(d.addr) {
            failures.push(format!("{name}: {e}"));
        }
        d.assert_healthy(name);
    }
    assert!(failures.is_empty(), "failed cases:\n  {}", failures.join("\n  "));
}

/// `raw` after ICReq/ICResp (digests as given) must be answered by a C2HTermReq and a close.
fn term_after_icreq(addr: SocketAddr, hdgst: bool, raw: &[u8]) -> Result<u16, String> {
    let mut c = handshaken(addr, hdgst, false);
    c.send_raw(raw).map_err(|e| e.to_string())?;
    expect_term(&mut c)
}

/// A connected I/O queue on `main` (its admin queue kept alongside).
fn io_queue(addr: SocketAddr, o: &QueueOptions) -> Result<(Queue, Queue), String> {
    let c = controller(addr, MAIN, o).map_err(|e| e.to_string())?;
    Ok((c.admin, c.io))
}

/// Sends a write of `len` bytes by R2T on `q` and returns the R2T's (ttag, offset, length).
fn start_r2t_write(
    q: &mut Queue,
    cid: u16,
    slba: u64,
    len: u32,
) -> Result<(u16, u32, u32), String> {
    let sqe = SqeBuilder {
        opcode: io::WRITE,
        cid,
        nsid: 1,
        sgl_len: len,
        sgl_type: nvme::SGL_TRANSPORT_DATA_BLOCK,
        cdw: [slba as u32, 0, len / 4096 - 1, 0, 0, 0],
        ..Default::default()
    };
    let (hd, dd) = (q.conn_mut().hdgst, q.conn_mut().ddgst);
    q.conn_mut().send_raw(&capsule(&sqe, &[], hd, dd)).map_err(|e| e.to_string())?;
    let h = q.conn_mut().read_header().map_err(|e| e.to_string())?;
    if h.ch.kind != kind::R2T {
        return Err(format!("expected R2T, got PDU type {:#x}", h.ch.kind));
    }
    let r = pdu::decode_h2c_data(h.bytes()).ok_or("short R2T")?;
    if r.cid != cid || r.offset != 0 || r.len != len {
        return Err(format!("R2T {r:?} for a {len}-byte write of cid {cid}"));
    }
    Ok((r.ttag, r.offset, r.len))
}

fn h2c_data(d: &H2cData, payload_len: usize, last: bool) -> Vec<u8> {
    let mut out = Vec::new();
    pdu::encode_h2c_data_header(&mut out, d, last, false, false);
    out.extend(pattern(payload_len, 7));
    out
}

// ------------------------------------------------------------------------------------- tests

#[test]
fn h2c_data_arriving_in_dribbles_lands_intact() {
    // A 64 KiB H2CData PDU whose header comes with 100 bytes of payload, then the rest in
    // uneven pieces with pauses: the target receives the rest straight into the command's
    // buffer, its receives completing short several times, and the data must land exactly.
    let mut d = Daemon::start();
    let (_admin, mut q) = io_queue(d.addr, &opts(false, false, false)).unwrap();
    let len = 64 * 1024u32;
    let slba = 4096;
    let (ttag, _, _) = start_r2t_write(&mut q, 11, slba, len).unwrap();
    let data = pattern(len as usize, 99);
    let mut raw = Vec::new();
    let h = H2cData { cid: 11, ttag, offset: 0, len };
    pdu::encode_h2c_data_header(&mut raw, &h, true, false, false);
    let hdr = raw.len();
    raw.extend_from_slice(&data);
    let mut at = 0;
    for cut in [hdr + 100, hdr + 5000, hdr + 20000, hdr + 20001, hdr + 45000, raw.len()] {
        q.conn_mut().send_raw(&raw[at..cut]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        at = cut;
    }
    let resp = q.conn_mut().read_header().unwrap();
    assert_eq!(resp.ch.kind, kind::CAPSULE_RESP, "the write's response");
    let (cid, st, _) = nvme::decode_cqe(&resp.bytes()[8..]).unwrap();
    assert_eq!((cid, st), (11, 0), "the dribbled write succeeds");
    let sqe = q.rw_sqe(io::READ, 1, slba, len as usize).unwrap();
    let (cr, back) = q.execute(&Command { sqe, data: Data::FromTarget(len) }).unwrap();
    assert!(cr.ok(), "read status {:#x}", cr.status);
    assert!(back == data, "the dribbled data read back differs");
    d.assert_healthy("dribbled H2CData");
    d.stop();
}

#[test]
fn connect_and_identify() {
    let mut d = Daemon::start();
    let o = QueueOptions { kato_ms: 10_000, ..opts(false, false, false) };
    let mut admin = Queue::connect(d.addr, MAIN, HOSTNQN, 0, CNTLID_DYNAMIC, &o).unwrap();
    let connect_cntlid = admin.cntlid();
    let ic = admin.ic_resp().unwrap();
    assert_eq!((ic.pfv, ic.cpda, ic.dgst), (0, 0, 0));
    assert!(ic.maxh2cdata >= 4096, "MAXH2CDATA {}", ic.maxh2cdata);
    // Before CC.EN, admin commands are out of sequence.
    let (c, _) = admin
        .execute(&Command {
            sqe: SqeBuilder {
                opcode: admin::IDENTIFY,
                cdw: [1, 0, 0, 0, 0, 0],
                ..Default::default()
            },
            data: Data::FromTarget(4096),
        })
        .unwrap();
    assert_eq!(c.status, nvme::status::COMMAND_SEQUENCE, "Identify before CC.EN");
    let vs = admin.property_get(nvme::prop::VS, false).unwrap();
    assert!(vs >= 0x0001_0300, "VS {vs:#x}");
    let cap = admin.property_get(nvme::prop::CAP, true).unwrap();
    assert!(cap & 0xffff >= 31, "CAP.MQES {cap:#x}");
    admin.enable_controller(TIMEOUT).unwrap();
    let info = admin.identify_controller().unwrap();
    assert_eq!(info.cntlid, connect_cntlid, "Identify CNTLID vs Connect's");
    assert_eq!(info.subnqn, MAIN);
    assert!(info.in_capsule_bytes() >= 4096, "IOCCSZ {}", info.ioccsz);
    assert_eq!(info.max_transfer_bytes(), Some(1 << 20));
    let ns = admin.identify_namespace(1).unwrap();
    assert_eq!(ns.lba_size, 4096);
    assert_eq!(ns.size_bytes(), MAIN_BYTES);
    assert!(admin.set_num_queues(2).unwrap() >= 2);
    let smart = admin.get_log_page(0x02, 0xffff_ffff, 512, 0).unwrap();
    assert_eq!(smart.len(), 512);
    admin.keep_alive().unwrap();
    // I/O queues join the controller by CNTLID.
    let mut io1 = Queue::connect(d.addr, MAIN, HOSTNQN, 1, connect_cntlid, &o).unwrap();
    assert_eq!(io1.cntlid(), connect_cntlid);
    // ... but not with another host's NQN, nor an unknown controller.
    for (host, cntlid) in [("nqn.2014-08.org.example:other", connect_cntlid), (HOSTNQN, 0xfffe)] {
        match Queue::connect(d.addr, MAIN, host, 2, cntlid, &o) {
            Err(Error::Status { status, .. }) => {
                assert_eq!(status, nvme::status::CONNECT_INVALID_PARAMETERS, "{host} {cntlid}")
            }
            other => panic!("I/O connect as {host} to {cntlid}: {:?}", other.map(|q| q.cntlid())),
        }
    }
    // An unknown subsystem is refused.
    match Queue::connect(d.addr, "nqn.2026-11.dev.ballast:nope", HOSTNQN, 0, CNTLID_DYNAMIC, &o) {
        Err(Error::Status { status, .. }) => {
            assert_eq!(status, nvme::status::CONNECT_INVALID_PARAMETERS)
        }
        other => panic!("connect to an unknown subsystem: {:?}", other.map(|q| q.cntlid())),
    }
    io1.disconnect().unwrap();
    assert!(io1.conn_mut().wait_closed(TIMEOUT), "Disconnect closes the queue");
    d.assert_healthy("connect and identify");
    d.stop();
}

/// Writes then reads back every size and path on `c`, sequentially and pipelined.
fn round_trips(c: &mut Ctrl, seed: u64) {
    let icd = c.info.in_capsule_bytes() as usize;
    assert!(icd >= 8192, "in-capsule data {icd}");
    let cases: [(&str, usize, u64); 6] = [
        ("4k in-capsule", 4096, 0),
        ("8k in-capsule", 8192, 16),
        ("4k by R2T", 4096, 32),
        ("12k by R2T", 12288, 48),
        ("256k by R2T", 256 << 10, 256),
        ("1MiB by R2T", 1 << 20, 1024),
    ];
    for (name, len, slba) in cases {
        let data = pattern(len, seed ^ slba);
        let sqe = c.io.rw_sqe(io::WRITE, 1, slba, len).unwrap();
        let via = if name.contains("R2T") { Data::ViaR2T(&data) } else { Data::ToTarget(&data) };
        let (cw, _) = c.io.execute(&Command { sqe, data: via }).unwrap();
        assert!(cw.ok(), "{name}: write status {:#x}", cw.status);
        let r2t_bytes = if name.contains("R2T") { len as u32 } else { 0 };
        assert_eq!(cw.bytes, r2t_bytes, "{name}: bytes moved by R2T");
        let sqe = c.io.rw_sqe(io::READ, 1, slba, len).unwrap();
        let (cr, back) =
            c.io.execute(&Command { sqe, data: Data::FromTarget(len as u32) }).unwrap();
        assert!(cr.ok(), "{name}: read status {:#x}", cr.status);
        assert_eq!(back.len(), len, "{name}: read length");
        assert!(back == data, "{name}: data read back differs");
    }
    // Pipelined: a queue's worth of mixed writes, then reads of the same blocks.
    let depth = c.io.depth().min(24);
    let blocks: Vec<(u64, usize)> =
        (0..depth).map(|i| (2048 + i as u64 * 64, [4096, 8192, 65536][i % 3])).collect();
    let datas: Vec<Vec<u8>> =
        blocks.iter().map(|&(slba, len)| pattern(len, seed ^ (slba << 8))).collect();
    for (&(slba, _), data) in blocks.iter().zip(&datas) {
        c.io.submit_write(1, slba, data).unwrap();
    }
    for _ in 0..depth {
        let done = c.io.poll().unwrap();
        assert!(done.ok(), "pipelined write status {:#x}", done.status);
    }
    let mut by_cid = std::collections::HashMap::new();
    for (i, &(slba, len)) in blocks.iter().enumerate() {
        by_cid.insert(c.io.submit_read(1, slba, len as u32).unwrap(), i);
    }
    for _ in 0..depth {
        let done = c.io.poll().unwrap();
        assert!(done.ok(), "pipelined read status {:#x}", done.status);
        let i = by_cid[&done.cid];
        assert!(c.io.data(done.cid) == &datas[i][..], "pipelined read {i} differs");
    }
}

fn round_trip_test(hdgst: bool, ddgst: bool, no_sqflow: bool) {
    let mut d = Daemon::start();
    let o = opts(hdgst, ddgst, no_sqflow);
    let mut c = controller(d.addr, MAIN, &o).unwrap();
    let ic = c.io.ic_resp().unwrap();
    let want = u8::from(hdgst) | (u8::from(ddgst) << 1);
    assert_eq!(ic.dgst, want, "digests granted");
    round_trips(&mut c, u64::from(want) << 40 | u64::from(no_sqflow));
    d.assert_healthy("round trips");
    d.stop();
}

#[test]
fn round_trip_no_digests() {
    round_trip_test(false, false, false);
}

#[test]
fn round_trip_header_digest() {
    round_trip_test(true, false, false);
}

#[test]
fn round_trip_data_digest() {
    round_trip_test(false, true, false);
}

#[test]
fn round_trip_both_digests() {
    round_trip_test(true, true, false);
}

#[test]
fn round_trip_sqflow_disabled_success_shortcut() {
    round_trip_test(false, false, true);
}

#[test]
fn round_trip_sqflow_disabled_both_digests() {
    round_trip_test(true, true, true);
}

#[test]
fn io_error_statuses() {
    let mut d = Daemon::start();
    let mut c = controller(d.addr, MAIN, &opts(false, false, false)).unwrap();
    let nsze = c.ns.nsze;
    let mut status_of = |sqe: SqeBuilder, data: Data<'_>| -> u16 {
        let (done, _) = c.io.execute(&Command { sqe, data }).unwrap();
        done.status
    };
    let rw = |opcode: u8, nsid: u32, slba: u64, nlb: u32| SqeBuilder {
        opcode,
        nsid,
        cdw: [slba as u32, (slba >> 32) as u32, nlb - 1, 0, 0, 0],
        ..Default::default()
    };
    let four_k = pattern(4096, 1);
    let eight_k = pattern(8192, 2);
    let lba_range = nvme::status::LBA_OUT_OF_RANGE;
    assert_eq!(status_of(rw(io::READ, 1, nsze, 1), Data::FromTarget(4096)), lba_range);
    assert_eq!(status_of(rw(io::READ, 1, nsze - 1, 2), Data::FromTarget(8192)), lba_range);
    assert_eq!(status_of(rw(io::READ, 1, u64::MAX, 2), Data::FromTarget(8192)), lba_range);
    assert_eq!(status_of(rw(io::WRITE, 1, nsze, 1), Data::ToTarget(&four_k)), lba_range);
    assert_eq!(status_of(rw(io::WRITE, 1, nsze - 1, 2), Data::ToTarget(&eight_k)), lba_range);
    assert_eq!(status_of(rw(io::WRITE, 1, nsze - 1, 2), Data::ViaR2T(&eight_k)), lba_range);
    let bad_ns = nvme::status::INVALID_NAMESPACE;
    for nsid in [0, 2, 1024, 0xffff_fffe] {
        assert_eq!(status_of(rw(io::READ, nsid, 0, 1), Data::FromTarget(4096)), bad_ns, "{nsid}");
        assert_eq!(status_of(rw(io::WRITE, nsid, 0, 1), Data::ToTarget(&four_k)), bad_ns);
    }
    for opcode in [0x03, 0x55, 0x7e, 0x80, 0xff] {
        let sqe = SqeBuilder { opcode, nsid: 1, ..Default::default() };
        assert_eq!(status_of(sqe, Data::None), nvme::status::INVALID_OPCODE, "opcode {opcode:#x}");
    }
    // MDTS is 1 MiB: 2 MiB must fail, reads and writes alike (a write without asking for data).
    let st = status_of(rw(io::READ, 1, 0, 512), Data::FromTarget(2 << 20));
    assert_ne!(st, 0, "2 MiB read beyond MDTS succeeded");
    let two_mib = pattern(2 << 20, 3);
    let st = status_of(rw(io::WRITE, 1, 0, 512), Data::ViaR2T(&two_mib));
    assert_ne!(st, 0, "2 MiB write beyond MDTS succeeded");
    // SGL length must match NLB.
    let mut sqe = rw(io::READ, 1, 0, 2);
    sqe.cdw[2] = 0; // one block, but 8 KiB of SGL
    assert_eq!(status_of(sqe, Data::FromTarget(8192)), nvme::status::SGL_DATA_LENGTH_INVALID);
    // The queue is still fine.
    let data = pattern(4096, 9);
    let w = c.io.submit_write(1, 7, &data).unwrap();
    assert_eq!(c.io.poll().unwrap().cid, w);
    let sqe = c.io.rw_sqe(io::READ, 1, 7, 4096).unwrap();
    let (_, back) = c.io.execute(&Command { sqe, data: Data::FromTarget(4096) }).unwrap();
    assert!(back == data);
    d.assert_healthy("error statuses");
    d.stop();
}

/// A thin volume larger than its pool: writes fail with Capacity Exceeded once the pool is
/// full, overwrites of written blocks still succeed; a snapshot's namespace refuses writes
/// with "Namespace is Write Protected" and reads its data.
#[test]
fn volume_statuses_full_pool_and_read_only_snapshot() {
    let bin = ballast_bin();
    let d = Daemon::start_with(|dir| {
        let pool = dir.join("pool.img");
        let st = Process::new(&bin)
            .args(["pool", "create"])
            .arg(&pool)
            .args(["--size", "64M"])
            .output()
            .expect("ballast pool create");
        assert!(st.status.success(), "pool create: {}", String::from_utf8_lossy(&st.stderr));
        vec!["--pool".into(), pool.display().to_string()]
    });
    d.ctl(&["volume", "create", "v", "256M"]);
    let nqn = "nqn.2026-11.dev.ballast:v";
    let mut c = controller(d.addr, nqn, &opts(false, false, false)).unwrap();
    assert_eq!(c.ns.lba_size, 4096);
    let chunk = pattern(1 << 20, 5);
    let mut full_at = None;
    for mib in 0..256u64 {
        let sqe = c.io.rw_sqe(io::WRITE, 1, mib * 256, chunk.len()).unwrap();
        let (done, _) = c.io.execute(&Command { sqe, data: Data::ViaR2T(&chunk) }).unwrap();
        if done.status != 0 {
            assert_eq!(done.status, nvme::status::CAPACITY_EXCEEDED, "write at {mib} MiB");
            full_at = Some(mib);
            break;
        }
    }
    let full_at = full_at.expect("a 256 MiB volume in a 64 MiB pool must fill up");
    assert!(full_at > 16, "the pool filled after only {full_at} MiB");
    // Overwriting written blocks needs no new space.
    let again = pattern(1 << 20, 6);
    let sqe = c.io.rw_sqe(io::WRITE, 1, 0, again.len()).unwrap();
    let (done, _) = c.io.execute(&Command { sqe, data: Data::ViaR2T(&again) }).unwrap();
    assert_eq!(done.status, 0, "overwrite in a full pool");
    let sqe = c.io.rw_sqe(io::READ, 1, 0, again.len()).unwrap();
    let (done, back) = c.io.execute(&Command { sqe, data: Data::FromTarget(1 << 20) }).unwrap();
    assert!(done.ok() && back == again, "overwritten data reads back");
    // A snapshot shares the clusters (no space needed) and refuses writes.
    d.ctl(&["snapshot", "create", "v", "s"]);
    let mut s =
        controller(d.addr, "nqn.2026-11.dev.ballast:s", &opts(false, false, false)).unwrap();
    let four_k = pattern(4096, 7);
    let sqe = s.io.rw_sqe(io::WRITE, 1, 0, 4096).unwrap();
    let (done, _) = s.io.execute(&Command { sqe, data: Data::ToTarget(&four_k) }).unwrap();
    assert_eq!(done.status, 0x020, "write to a snapshot: Namespace is Write Protected");
    let sqe = s.io.rw_sqe(io::READ, 1, 0, again.len()).unwrap();
    let (done, back) = s.io.execute(&Command { sqe, data: Data::FromTarget(1 << 20) }).unwrap();
    assert!(done.ok() && back == again, "the snapshot reads the volume's data");
    drop((c, s));
    d.stop();
}

#[test]
fn commands_out_of_sequence() {
    let mut d = Daemon::start();
    let o = opts(false, false, false);
    // I/O and admin commands after ICReq, before Connect.
    let cmds: [(&str, SqeBuilder, u32); 3] = [
        ("read", read_sqe(0, 0, 1), 4096),
        (
            "identify",
            SqeBuilder { opcode: admin::IDENTIFY, cdw: [1, 0, 0, 0, 0, 0], ..Default::default() },
            4096,
        ),
        (
            "property get",
            SqeBuilder {
                opcode: nvme::FABRICS_OPCODE,
                fctype: nvme::fctype::PROPERTY_GET,
                ..Default::default()
            },
            0,
        ),
    ];
    for (name, sqe, len) in cmds {
        let mut q = Queue::handshake(d.addr, 0, &o).unwrap();
        let data = if len > 0 { Data::FromTarget(len) } else { Data::None };
        match q.execute(&Command { sqe, data }) {
            Ok((c, _)) => assert_eq!(c.status, nvme::status::COMMAND_SEQUENCE, "{name}"),
            Err(Error::Terminated { .. }) => {}
            Err(e) => panic!("{name} before Connect: {e}"),
        }
        d.assert_healthy(&format!("{name} before Connect"));
    }
    // A second Connect on a connected queue.
    let mut q = Queue::connect(d.addr, MAIN, HOSTNQN, 0, CNTLID_DYNAMIC, &o).unwrap();
    match q.fabrics_connect(MAIN, HOSTNQN, CNTLID_DYNAMIC, &o) {
        Err(Error::Status { status, .. }) => assert_eq!(status, nvme::status::COMMAND_SEQUENCE),
        other => panic!("second Connect: {other:?}"),
    }
    d.assert_healthy("second Connect");
    d.stop();
}

#[test]
fn io_commands_on_the_admin_queue() {
    let mut d = Daemon::start();
    let o = opts(false, false, false);
    let (mut admin, _, _) = open_controller(d.addr, MAIN, HOSTNQN, 1, &o).unwrap();
    let data = pattern(4096, 5);
    let write = SqeBuilder { opcode: io::WRITE, nsid: 1, ..Default::default() };
    let (c, _) = admin.execute(&Command { sqe: write, data: Data::InCapsule(&data) }).unwrap();
    assert_eq!(c.status, nvme::status::INVALID_OPCODE, "Write on the admin queue");
    let flush = SqeBuilder { opcode: io::FLUSH, nsid: 1, ..Default::default() };
    let (c, _) = admin.execute(&Command { sqe: flush, data: Data::None }).unwrap();
    assert_eq!(c.status, nvme::status::INVALID_OPCODE, "Flush on the admin queue");
    // Read shares its opcode (02h) with Get Log Page; LBA 0 is log page 0, which is invalid.
    let mut read = read_sqe(0, 0, 1);
    read.sgl_len = 0;
    let (c, _) = admin.execute(&Command { sqe: read, data: Data::FromTarget(4096) }).unwrap();
    assert_ne!(c.status, 0, "Read (LBA 0) on the admin queue succeeded");
    admin.keep_alive().unwrap();
    d.assert_healthy("I/O commands on the admin queue");
    d.stop();
}

#[test]
fn malformed_pdu_types() {
    let mut d = Daemon::start();
    let before_icreq = |addr: SocketAddr| -> Result<(), String> {
        let mut c = Conn::open(addr, TIMEOUT).map_err(|e| e.to_string())?;
        c.send_raw(&capsule(&read_sqe(1, 0, 1), &[], false, false)).map_err(|e| e.to_string())?;
        expect_term(&mut c).map(|_| ())
    };
    let second_icreq = |addr: SocketAddr| -> Result<(), String> {
        let mut raw = Vec::new();
        pdu::encode_icreq(&mut raw, &IcReq { pfv: 0, hpda: 0, dgst: 0, maxr2t: 0 });
        let fes = term_after_icreq(addr, false, &raw)?;
        if fes != pdu::fes::PDU_SEQUENCE_ERROR {
            return Err(format!("FES {fes:#x}, expected PDU sequence error"));
        }
        Ok(())
    };
    // Controller-to-host PDU types sent by the host, after ICReq and after Connect.
    let controller_types = |addr: SocketAddr| -> Result<(), String> {
        for t in [kind::IC_RESP, kind::C2H_TERM_REQ, kind::CAPSULE_RESP, kind::C2H_DATA, kind::R2T]
        {
            let hlen = ballast_perf::conn::controller_pdu_hlen(t).unwrap_or(24);
            let mut raw = Vec::new();
            CommonHeader { kind: t, flags: 0, hlen: hlen as u8, pdo: 0, plen: hlen as u32 }
                .encode(&mut raw);
            raw.resize(hlen, 0);
            term_after_icreq(addr, false, &raw).map_err(|e| format!("type {t:#x}: {e}"))?;
            let (_admin, mut q) = io_queue(addr, &opts(false, false, false))?;
            q.conn_mut().send_raw(&raw).map_err(|e| e.to_string())?;
            expect_term(q.conn_mut()).map_err(|e| format!("type {t:#x} on an I/O queue: {e}"))?;
        }
        Ok(())
    };
    let unknown_types = |addr: SocketAddr| -> Result<(), String> {
        for t in [0x08u8, 0x0a, 0x0b, 0x10, 0x7f, 0xff] {
            let mut raw = Vec::new();
            CommonHeader { kind: t, flags: 0, hlen: 24, pdo: 0, plen: 24 }.encode(&mut raw);
            raw.resize(24, 0);
            term_after_icreq(addr, false, &raw).map_err(|e| format!("type {t:#x}: {e}"))?;
        }
        Ok(())
    };
    let c2h_data_with_payload = |addr: SocketAddr| -> Result<(), String> {
        let (_admin, mut q) = io_queue(addr, &opts(false, false, false))?;
        let mut raw = Vec::new();
        pdu::encode_c2h_data_header(&mut raw, 0, 0, 4096, true, true, false, false);
        raw.extend(pattern(4096, 1));
        q.conn_mut().send_raw(&raw).map_err(|e| e.to_string())?;
        expect_term(q.conn_mut()).map(|_| ())
    };
    run_cases(
        &mut d,
        &[
            ("capsule before ICReq", &before_icreq),
            ("second ICReq", &second_icreq),
            ("controller PDU types from the host", &controller_types),
            ("unknown PDU types", &unknown_types),
            ("C2HData with payload from the host", &c2h_data_with_payload),
        ],
    );
    d.stop();
}

#[test]
fn malformed_lengths() {
    let mut d = Daemon::start();
    let patched = |patch: &dyn Fn(&mut Vec<u8>)| {
        let mut raw = capsule(&read_sqe(1, 0, 1), &[], false, false);
        patch(&mut raw);
        raw
    };
    let set_plen = |raw: &mut Vec<u8>, plen: u32| raw[4..8].copy_from_slice(&plen.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("capsule HLEN 70", patched(&|r| r[2] = 70)),
        ("capsule HLEN 0", patched(&|r| r[2] = 0)),
        ("capsule HLEN 255", patched(&|r| r[2] = 255)),
        ("capsule PLEN 8 (< HLEN)", patched(&|r| set_plen(r, 8))),
        ("capsule PLEN 71 (< HLEN)", patched(&|r| set_plen(r, 71))),
        ("capsule PLEN 0", patched(&|r| set_plen(r, 0))),
        ("capsule PLEN 1 GiB", patched(&|r| set_plen(r, 1 << 30))),
        ("capsule PLEN u32::MAX", patched(&|r| set_plen(r, u32::MAX))),
        (
            "capsule PDO beyond PLEN",
            patched(&|r| {
                set_plen(r, 72 + 16);
                r[3] = 100;
                r.extend([0u8; 16]);
            }),
        ),
        (
            "capsule PDO inside the header",
            patched(&|r| {
                set_plen(r, 72 + 16);
                r[3] = 10;
                r.extend([0u8; 16]);
            }),
        ),
        ("header digest flag without negotiation", patched(&|r| r[1] |= pdu::FLAG_HDGSTF)),
        ("H2CData HLEN 23", {
            let mut r = h2c_data(&H2cData { cid: 0, ttag: 0, offset: 0, len: 16 }, 16, true);
            r[2] = 23;
            r
        }),
        ("H2CTermReq HLEN 8", {
            let mut r = Vec::new();
            CommonHeader { kind: kind::H2C_TERM_REQ, flags: 0, hlen: 8, pdo: 0, plen: 24 }
                .encode(&mut r);
            r.resize(24, 0);
            r
        }),
    ];
    let mut failures = Vec::new();
    for (name, raw) in &cases {
        if let Err(e) = term_after_icreq(d.addr, false, raw) {
            failures.push(format!("{name}: {e}"));
        }
        d.assert_healthy(name);
    }
    // ICReq with a bad PLEN, and with an unsupported PFV, on fresh connections.
    for (name, patch) in [("ICReq PLEN 100", (4usize, 100u8)), ("ICReq PFV 1", (8, 1))] {
        let mut raw = Vec::new();
        pdu::encode_icreq(&mut raw, &IcReq { pfv: 0, hpda: 0, dgst: 0, maxr2t: 0 });
        raw[patch.0] = patch.1;
        let r = Conn::open(d.addr, TIMEOUT).map_err(|e| e.to_string()).and_then(|mut c| {
            c.send_raw(&raw).map_err(|e| e.to_string())?;
            expect_term(&mut c)
        });
        if let Err(e) = r {
            failures.push(format!("{name}: {e}"));
        }
        d.assert_healthy(name);
    }
    assert!(failures.is_empty(), "failed cases:\n  {}", failures.join("\n  "));
    d.stop();
}

#[test]
fn malformed_header_digest() {
    let mut d = Daemon::start();
    let bad_capsule = |addr: SocketAddr| -> Result<(), String> {
        let mut raw = capsule(&read_sqe(1, 0, 1), &[], true, false);
        let n = raw.len();
        raw[n - 1] ^= 0xff;
        let fes = term_after_icreq(addr, true, &raw)?;
        if fes != pdu::fes::HEADER_DIGEST_ERROR {
            return Err(format!("FES {fes:#x}, expected header digest error (3)"));
        }
        Ok(())
    };
    let bad_connected = |addr: SocketAddr| -> Result<(), String> {
        let (_admin, mut q) = io_queue(addr, &opts(true, true, false))?;
        let mut raw = capsule(&read_sqe(1, 0, 1), &[], true, true);
        raw[20] ^= 0x01; // the header changed after its digest was computed
        q.conn_mut().send_raw(&raw).map_err(|e| e.to_string())?;
        let fes = expect_term(q.conn_mut())?;
        if fes != pdu::fes::HEADER_DIGEST_ERROR {
            return Err(format!("FES {fes:#x}, expected header digest error (3)"));
        }
        Ok(())
    };
    let missing_digest = |addr: SocketAddr| -> Result<(), String> {
        // Digests negotiated, capsule sent without one: PLEN is then shorter than the header.
        term_after_icreq(addr, true, &capsule(&read_sqe(1, 0, 1), &[], false, false)).map(|_| ())
    };
    run_cases(
        &mut d,
        &[
            ("corrupt header digest after ICReq", &bad_capsule),
            ("corrupt header on a connected queue", &bad_connected),
            ("negotiated header digest missing", &missing_digest),
        ],
    );
    d.stop();
}

#[test]
fn malformed_h2c_data() {
    let mut d = Daemon::start();
    let expect_fes = |q: &mut Queue, want: Option<u16>| -> Result<(), String> {
        let fes = expect_term(q.conn_mut())?;
        match want {
            Some(w) if w != fes => Err(format!("FES {fes:#x}, expected {w:#x}")),
            _ => Ok(()),
        }
    };
    let past_maxh2cdata = |addr: SocketAddr| -> Result<(), String> {
        for extra in [4u32, 4096] {
            let (_admin, mut q) = io_queue(addr, &opts(false, false, false))?;
            let max = q.ic_resp().map(|ic| ic.maxh2cdata).unwrap_or(0);
            let (ttag, _, _) = start_r2t_write(&mut q, 3, 0, 1 << 20)?;
            let len = max + extra;
            let raw = h2c_data(&H2cData { cid: 3, ttag, offset: 0, len }, len as usize, false);
            q.conn_mut().send_raw(&raw).map_err(|e| e.to_string())?;
            expect_fes(&mut q, Some(pdu::fes::DATA_LIMIT_EXCEEDED))
                .map_err(|e| format!("MAXH2CDATA + {extra}: {e}"))?;
        }
        Ok(())
    };
    let past_transfer = |addr: SocketAddr| -> Result<(), String> {
        // (offset, len) against a 16 KiB R2T.
        for (offset, len) in [(0u32, 20480u32), (8192, 16384), (16384, 4096), (4096, 4096)] {
            let (_admin, mut q) = io_queue(addr, &opts(false, false, false))?;
            let (ttag, _, _) = start_r2t_write(&mut q, 5, 64, 16384)?;
            let raw = h2c_data(&H2cData { cid: 5, ttag, offset, len }, len as usize, true);
            q.conn_mut().send_raw(&raw).map_err(|e| e.to_string())?;
            expect_fes(&mut q, Some(pdu::fes::DATA_OUT_OF_RANGE))
                .map_err(|e| format!("H2CData {offset}+{len} of 16384: {e}"))?;
        }
        Ok(())
    };
    let bad_tags = |addr: SocketAddr| -> Result<(), String> {
        // Unknown transfer tag, with and without a write in flight; wrong CID for the tag.
        let (_admin, mut q) = io_queue(addr, &opts(false, false, false))?;
        let raw = h2c_data(&H2cData { cid: 1, ttag: 77, offset: 0, len: 4096 }, 4096, true);
        q.conn_mut().send_raw(&raw).map_err(|e| e.to_string())?;
        expect_fes(&mut q, None).map_err(|e| format!("unknown ttag: {e}"))?;
        let (_admin, mut q) = io_queue(addr, &opts(false, false, false))?;
        let (ttag, _, _) = start_r2t_write(&mut q, 9, 64, 8192)?;
        let raw = h2c_data(
            &H2cData { cid: 9, ttag: ttag.wrapping_add(1), offset: 0, len: 8192 },
            8192,
            true,
        );
        q.conn_mut().send_raw(&raw).map_err(|e| e.to_string())?;
        expect_fes(&mut q, None).map_err(|e| format!("other ttag: {e}"))?;
        let (_admin, mut q) = io_queue(addr, &opts(false, false, false))?;
        let (ttag, _, _) = start_r2t_write(&mut q, 9, 64, 8192)?;
        let raw = h2c_data(&H2cData { cid: 10, ttag, offset: 0, len: 8192 }, 8192, true);
        q.conn_mut().send_raw(&raw).map_err(|e| e.to_string())?;
        expect_fes(&mut q, None).map_err(|e| format!("wrong cid for the ttag: {e}"))
    };
    let datal_mismatch = |addr: SocketAddr| -> Result<(), String> {
        // DATAL says 8 KiB, the PDU carries 4 KiB.
        let (_admin, mut q) = io_queue(addr, &opts(false, false, false))?;
        let (ttag, _, _) = start_r2t_write(&mut q, 4, 64, 8192)?;
        let mut raw = h2c_data(&H2cData { cid: 4, ttag, offset: 0, len: 4096 }, 4096, true);
        raw[16..20].copy_from_slice(&8192u32.to_le_bytes());
        q.conn_mut().send_raw(&raw).map_err(|e| e.to_string())?;
        expect_fes(&mut q, None)
    };
    let bad_data_digest = |addr: SocketAddr| -> Result<(), String> {
        // NVMe/TCP: a data digest error either fails the command or terminates the connection.
        let (_admin, mut q) = io_queue(addr, &opts(false, true, false))?;
        let (ttag, _, _) = start_r2t_write(&mut q, 6, 64, 4096)?;
        let mut raw = Vec::new();
        let d = H2cData { cid: 6, ttag, offset: 0, len: 4096 };
        pdu::encode_h2c_data_header(&mut raw, &d, true, false, true);
        raw.extend(pattern(4096, 2));
        raw.extend([0xde, 0xad, 0xbe, 0xef]);
        q.conn_mut().send_raw(&raw).map_err(|e| e.to_string())?;
        match q.conn_mut().read_header() {
            Err(Error::Terminated { .. }) => Ok(()),
            Ok(h) if h.ch.kind == kind::CAPSULE_RESP => {
                let st = nvme::decode_cqe(&h.bytes()[8..24]).map(|c| c.1).unwrap_or(0);
                if st == 0 {
                    Err("write with a bad data digest succeeded".into())
                } else {
                    Ok(())
                }
            }
            Ok(h) => Err(format!("unexpected PDU type {:#x}", h.ch.kind)),
            Err(e) => Err(e.to_string()),
        }
    };
    run_cases(
        &mut d,
        &[
            ("H2CData past MAXH2CDATA", &past_maxh2cdata),
            ("H2CData past the transfer", &past_transfer),
            ("H2CData with bad tags", &bad_tags),
            ("H2CData DATAL vs PLEN", &datal_mismatch),
            ("H2CData with a bad data digest", &bad_data_digest),
        ],
    );
    d.stop();
}

#[test]
fn host_termination_closes_quietly() {
    let mut d = Daemon::start();
    let (_admin, mut q) = io_queue(d.addr, &opts(false, false, false)).unwrap();
    let mut raw = Vec::new();
    CommonHeader { kind: kind::H2C_TERM_REQ, flags: 0, hlen: 24, pdo: 0, plen: 24 }
        .encode(&mut raw);
    raw.extend(pdu::fes::INVALID_HEADER_FIELD.to_le_bytes());
    raw.resize(24, 0);
    q.conn_mut().send_raw(&raw).unwrap();
    // The controller closes without answering with a C2HTermReq.
    match q.conn_mut().read_header() {
        Err(Error::Closed) => {}
        other => panic!("after H2CTermReq: {:?}", other.map(|h| h.ch)),
    }
    d.assert_healthy("H2CTermReq");
    d.stop();
}

/// NVMe/TCP: a data digest error in a CapsuleCmd is not fatal; the command completes with
/// Transient Transport Error (22h) (or, as some targets do, the connection is terminated).
#[test]
fn capsule_data_digest_error_status() {
    let mut d = Daemon::start();
    let (_admin, mut q) = io_queue(d.addr, &opts(false, true, false)).unwrap();
    let data = pattern(4096, 4);
    let sqe = SqeBuilder {
        opcode: io::WRITE,
        cid: 2,
        nsid: 1,
        sgl_len: 4096,
        sgl_type: SGL_DATA_BLOCK_OFFSET,
        ..Default::default()
    };
    let mut raw = capsule(&sqe, &data, false, true);
    let n = raw.len();
    raw[n - 1] ^= 0xff;
    q.conn_mut().send_raw(&raw).unwrap();
    match q.conn_mut().read_header() {
        Err(Error::Terminated { .. }) => {}
        Ok(h) if h.ch.kind == kind::CAPSULE_RESP => {
            let (cid, st, _) = nvme::decode_cqe(&h.bytes()[8..24]).unwrap();
            assert_eq!((cid, st), (2, 0x022), "status of a capsule with a bad data digest");
        }
        other => panic!("after a bad capsule data digest: {:?}", other.map(|h| h.ch)),
    }
    d.assert_healthy("capsule data digest error");
    d.stop();
}

/// Reads `/proc/PID/status` VmHWM (peak resident set) in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Get Log Page's NUMD is host-controlled: the controller must not build a page of NUMD × 4
/// bytes when the host's buffer (the SGL) holds 4 KiB. Probed with 256 MiB, which is safe to
/// allocate; NUMD = FFFFFFFFh asks for 16 GiB.
#[test]
fn get_log_page_numd_is_bounded() {
    let mut d = Daemon::start();
    let pid = d.pid();
    let (mut admin, _, _) =
        open_controller(d.addr, MAIN, HOSTNQN, 1, &opts(false, false, false)).unwrap();
    let before = peak_rss_kib(pid);
    let numd: u32 = (256 << 20) / 4 - 1;
    let sqe = SqeBuilder {
        opcode: admin::GET_LOG_PAGE,
        nsid: 0xffff_ffff,
        cdw: [0x02 | ((numd & 0xffff) << 16), numd >> 16, 0, 0, 0, 0],
        ..Default::default()
    };
    let (c, data) = admin.execute(&Command { sqe, data: Data::FromTarget(4096) }).unwrap();
    assert!(data.len() <= 4096, "{} bytes for a 4 KiB buffer", data.len());
    let grown_mib = peak_rss_kib(pid).saturating_sub(before) / 1024;
    assert!(
        grown_mib < 64,
        "one Get Log Page (NUMD for 256 MiB, SGL 4 KiB, status {:#x}) grew the daemon's peak RSS by {grown_mib} MiB",
        c.status
    );
    d.assert_healthy("huge NUMD");
    d.stop();
}

/// Random bytes, or random PDUs with plausible headers, on fresh connections after ICReq (and
/// after Connect of an admin or I/O queue on the `fuzz` subsystem): the daemon must survive
/// all of them and keep serving.
#[test]
fn fuzz_after_icreq() {
    let mut d = Daemon::start();
    let addr = d.addr;
    // A controller on `fuzz` whose I/O queues the fuzz connections join (no keep-alive).
    let fo = opts(false, false, false);
    let (mut fuzz_admin, _, _) = open_controller(addr, FUZZ, HOSTNQN, 1, &fo).unwrap();
    fuzz_admin.set_num_queues(8).unwrap();
    let fuzz_cntlid = fuzz_admin.cntlid();

    let host_kinds = prop_oneof![
        Just(kind::CAPSULE_CMD),
        Just(kind::CAPSULE_CMD),
        Just(kind::H2C_DATA),
        Just(kind::H2C_TERM_REQ),
        Just(kind::IC_REQ),
        any::<u8>(),
    ];
    let opcodes = prop_oneof![
        Just(io::READ),
        Just(io::WRITE),
        Just(io::FLUSH),
        Just(io::WRITE_ZEROES),
        Just(io::DSM),
        Just(admin::IDENTIFY),
        Just(admin::SET_FEATURES),
        Just(admin::GET_FEATURES),
        Just(admin::KEEP_ALIVE),
        Just(admin::ASYNC_EVENT),
        Just(admin::ABORT),
        Just(nvme::FABRICS_OPCODE),
        any::<u8>(),
    ];
    // One PDU: kind, flags, pdo, extra PLEN skew, SQE-ish body (opcode, dwords), payload.
    let one_pdu = (
        host_kinds,
        any::<u8>(),
        any::<u8>(),
        prop_oneof![Just(0i64), -8i64..8],
        opcodes,
        proptest::collection::vec(any::<u32>(), 16),
        proptest::collection::vec(any::<u8>(), 0..300),
    );
    // (mode, raw random bytes, structured PDUs)
    let strategy = (
        0u8..4,
        proptest::collection::vec(any::<u8>(), 0..600),
        proptest::collection::vec(one_pdu, 1..4),
    );
    let mut runner = TestRunner::new(PtConfig {
        cases: 200,
        failure_persistence: None,
        max_shrink_iters: 64,
        ..PtConfig::default()
    });
    let cases = std::cell::Cell::new(0u32);
    // By mode: C2HTermReq, closed, no answer, a PDU, other error.
    let outcomes = std::cell::Cell::new([[0u32; 5]; 4]);
    let daemon = std::cell::RefCell::new(&mut d);
    let result = runner.run(&strategy, |(mode, random, pdus)| {
        let case_no = cases.get() + 1;
        cases.set(case_no);
        let mut bytes = Vec::new();
        if mode == 0 {
            bytes = random.clone();
        } else {
            for (k, flags, pdo, skew, opcode, dw, payload) in &pdus {
                let hlen = pdu::host_pdu_hlen(*k).unwrap_or(24);
                let mut body = vec![0u8; hlen];
                for (i, w) in dw.iter().enumerate() {
                    let at = 8 + i * 4;
                    if at + 4 <= hlen {
                        body[at..at + 4].copy_from_slice(&w.to_le_bytes());
                    }
                }
                if *k == kind::CAPSULE_CMD {
                    body[8] = *opcode;
                    body[9] = 0x40;
                    // Keep transfers small: NLB below 16 blocks, mostly in range.
                    body[8 + 48] &= 0x0f;
                    body[8 + 49] = 0;
                    body[8 + 44..8 + 48].copy_from_slice(&0u32.to_le_bytes());
                    body[8 + 40] &= 0x3f;
                }
                let plen = (hlen + payload.len()) as i64 + skew;
                CommonHeader {
                    kind: *k,
                    flags: *flags & 0x0f,
                    hlen: hlen as u8,
                    pdo: if payload.is_empty() {
                        0
                    } else if *pdo % 2 == 0 {
                        hlen as u8
                    } else {
                        *pdo
                    },
                    plen: plen.max(0) as u32,
                }
                .encode(&mut bytes);
                bytes.extend_from_slice(&body[8..]);
                bytes.extend_from_slice(payload);
            }
        }
        let mut conn = match mode {
            0 | 1 => {
                let mut c =
                    Conn::open(addr, TIMEOUT).map_err(|e| TestCaseError::fail(e.to_string()))?;
                c.handshake(false, false).map_err(|e| TestCaseError::fail(e.to_string()))?;
                c
            }
            m => {
                let (qid, cntlid) = if m == 2 {
                    (0, CNTLID_DYNAMIC)
                } else {
                    (1 + case_no as u16 % 8, fuzz_cntlid)
                };
                let mut q = Queue::connect(addr, FUZZ, HOSTNQN, qid, cntlid, &fo)
                    .map_err(|e| TestCaseError::fail(format!("connect qid {qid}: {e}")))?;
                if m == 2 {
                    q.enable_controller(TIMEOUT).map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
                q.into_conn()
            }
        };
        // Whatever the target answers (or not), it must not die.
        let _ = conn.send_raw(&bytes);
        let _ = conn.set_timeout(Duration::from_millis(300));
        let outcome = match conn.read_header() {
            Err(Error::Terminated { .. }) => 0,
            Err(Error::Closed) => 1,
            Err(Error::Timeout) => 2,
            Ok(_) => 3,
            Err(_) => 4,
        };
        let mut o = outcomes.get();
        o[mode as usize][outcome] += 1;
        outcomes.set(o);
        let _ = conn.wait_closed(Duration::from_millis(30));
        drop(conn);
        if case_no.is_multiple_of(25) && !daemon.borrow_mut().running() {
            return Err(TestCaseError::fail(format!("daemon died at case {case_no}")));
        }
        Ok(())
    });
    eprintln!(
        "fuzz: {} cases; per mode [C2HTermReq, closed, silent, PDU, error]: {:?}",
        cases.get(),
        outcomes.get()
    );
    if let Err(e) = result {
        panic!("fuzz: {e}; log tail:\n{}", d.log_tail());
    }
    fuzz_admin.keep_alive().unwrap();
    d.assert_healthy("fuzzing");
    d.stop();
}

/// A host that keeps sending reads without reading the responses must not make the target
/// buffer their data without bound: a command whose response has not left should still hold
/// its submission queue entry (then excess commands fail, or the target stops reading).
#[test]
fn unread_responses_are_bounded() {
    let mut d = Daemon::start();
    let pid = d.pid();
    let (_admin, mut q) = io_queue(d.addr, &opts(false, false, false)).unwrap();
    let rss_kib = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
            })
            .unwrap_or(0)
    };
    let before = rss_kib();
    for batch in 0..16u16 {
        let mut raw = Vec::new();
        for i in 0..32 {
            let mut sqe = read_sqe(batch * 32 + i, 0, 256);
            sqe.sgl_len = 1 << 20;
            raw.extend(capsule(&sqe, &[], false, false));
        }
        q.conn_mut().send_raw(&raw).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    // Drain, so the daemon can settle.
    let mut responses = 0;
    while responses < 512 {
        match q.conn_mut().read_header() {
            Ok(h) if h.ch.kind == kind::CAPSULE_RESP => responses += 1,
            Ok(h) => q.conn_mut().skip(h.rest).unwrap(),
            Err(e) => panic!("draining: {e}"),
        }
    }
    assert!(grown_mib < 160, "512 unread 1 MiB reads grew the daemon's RSS by {grown_mib} MiB");
    d.assert_healthy("unread responses");
    d.stop();
}

/// Connect of an I/O queue must name a queue the controller granted and not already in use.
#[test]
fn io_queue_connect_limits() {
    let mut d = Daemon::start();
    let o = opts(false, false, false);
    let (mut admin, _, _) = open_controller(d.addr, MAIN, HOSTNQN, 1, &o).unwrap();
    assert_eq!(admin.set_num_queues(2).unwrap(), 2);
    let cntlid = admin.cntlid();
    let _q1 = Queue::connect(d.addr, MAIN, HOSTNQN, 1, cntlid, &o).unwrap();
    let mut refused = Vec::new();
    for (what, qid) in [("duplicate QID 1", 1u16), ("QID 3 > 2 granted", 3), ("QID 200", 200)] {
        match Queue::connect(d.addr, MAIN, HOSTNQN, qid, cntlid, &o) {
            Err(Error::Status { .. }) => {}
            Ok(_) => refused.push(format!("{what}: accepted")),
            Err(e) => refused.push(format!("{what}: {e}")),
        }
    }
    assert!(refused.is_empty(), "{}", refused.join("; "));
    d.assert_healthy("connect limits");
    d.stop();
}

/// A controller whose host stops sending keep-alives is torn down after its KATO: the admin
/// queue and its I/O queues are closed, and the daemon keeps serving others.
#[test]
fn keep_alive_timeout_tears_the_controller_down() {
    let mut d = Daemon::start();
    let o = QueueOptions { kato_ms: 1000, ..opts(false, false, false) };
    let mut admin = Queue::connect(d.addr, MAIN, HOSTNQN, 0, CNTLID_DYNAMIC, &o).unwrap();
    admin.enable_controller(TIMEOUT).unwrap();
    assert!(admin.set_num_queues(1).unwrap() >= 1);
    let io = Queue::connect(d.addr, MAIN, HOSTNQN, 1, admin.cntlid(), &o).unwrap();
    let started = std::time::Instant::now();
    let mut admin_conn = admin.into_conn();
    assert!(
        admin_conn.wait_closed(Duration::from_secs(5)),
        "admin queue still open 5 s after a 1 s KATO"
    );
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(900), "closed too early: {elapsed:?}");
    let mut io_conn = io.into_conn();
    assert!(
        io_conn.wait_closed(Duration::from_secs(5)),
        "I/O queue of a dead controller still open"
    );
    d.assert_healthy("keep-alive timeout");
    d.stop();
}

/// (subsystem NQN, "traddr:trsvcid") of each entry of the discovery log asked through `addr`.
fn discovery_entries(addr: SocketAddr) -> Vec<(String, String)> {
    let o = opts(false, false, false);
    let disc = "nqn.2014-08.org.nvmexpress.discovery";
    let mut q = Queue::connect(addr, disc, HOSTNQN, 0, CNTLID_DYNAMIC, &o).unwrap();
    q.enable_controller(TIMEOUT).unwrap();
    let head = q.get_log_page(0x70, 0, 1024, 0).unwrap();
    let count = u64::from_le_bytes(head[8..16].try_into().unwrap()) as usize;
    assert!(count < 64, "discovery log of {count} entries");
    let page = q.get_log_page(0x70, 0, 1024 * (1 + count as u32), 0).unwrap();
    let text = |b: &[u8]| nvme::get_str(b);
    let mut out: Vec<(String, String)> = page[1024..]
        .chunks_exact(1024)
        .map(|e| (text(&e[256..512]), format!("{}:{}", text(&e[512..768]), text(&e[32..64]))))
        .collect();
    out.sort();
    out
}

fn connect_refused(addr: SocketAddr, nqn: &str) -> bool {
    let o = opts(false, false, false);
    match Queue::connect(addr, nqn, HOSTNQN, 0, CNTLID_DYNAMIC, &o) {
        Err(Error::Status { status, .. }) => status == nvme::status::CONNECT_INVALID_PARAMETERS,
        Ok(_) => false,
        Err(e) => panic!("connect to {nqn} on {addr}: {e}"),
    }
}

/// A subsystem made through the control API (SPDK's methods): its serial and model number
/// reach Identify Controller; it listens only where told, Connect elsewhere is refused, and
/// each port's discovery log lists the subsystems listening there.
#[test]
fn subsystem_identity_and_listeners() {
    let d = Daemon::start();
    let nqn = "nqn.2016-06.io.spdk:cnode1";
    let create = format!(
        r#"{{"nqn":"{nqn}","allow_any_host":true,"serial_number":"SPDK00000000000001","model_number":"SPDK bdev Controller"}}"#
    );
    d.ctl(&["rpc", "nvmf_create_subsystem", &create]);
    let ns = format!(r#"{{"nqn":"{nqn}","namespace":{{"bdev_name":"fuzz"}}}}"#);
    d.ctl(&["rpc", "nvmf_subsystem_add_ns", &ns]);
    assert!(connect_refused(d.addr, nqn), "no listener yet: refused on the default port");
    let port = free_port();
    let other: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let listener = |method: &str| {
        let la = format!(
            r#"{{"nqn":"{nqn}","listen_address":{{"trtype":"tcp","traddr":"127.0.0.1","trsvcid":"{port}"}}}}"#
        );
        d.ctl(&["rpc", method, &la]);
    };
    listener("nvmf_subsystem_add_listener");
    let (_admin, info, ns) = open_controller(other, nqn, HOSTNQN, 1, &opts(false, false, false))
        .expect("connecting where the subsystem listens");
    assert_eq!(info.serial, "SPDK00000000000001");
    assert_eq!(info.model, "SPDK bdev Controller");
    assert_eq!(&info.raw[4..24], b"SPDK00000000000001  ", "SN padded with spaces");
    assert_eq!(ns.size_bytes(), 16 << 20);
    let main = open_controller(d.addr, MAIN, HOSTNQN, 1, &opts(false, false, false)).unwrap();
    assert_eq!(main.1.model, "ballast", "the default model number");
    assert_eq!(main.1.serial.len(), 16, "the default serial: {:?}", main.1.serial);
    assert!(connect_refused(other, MAIN), "main does not listen on the new port");
    let here = |a: SocketAddr| format!("127.0.0.1:{}", a.port());
    assert_eq!(discovery_entries(other), vec![(nqn.to_string(), here(other))]);
    assert_eq!(
        discovery_entries(d.addr),
        vec![(FUZZ.to_string(), here(d.addr)), (MAIN.to_string(), here(d.addr))]
    );
    let got = d.ctl(&["rpc", "nvmf_subsystem_get_listeners", &format!(r#"{{"nqn":"{nqn}"}}"#)]);
    let got: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(got[0]["address"]["trsvcid"], port.to_string(), "{got}");
    assert_eq!(got.as_array().map(Vec::len), Some(1), "{got}");
    listener("nvmf_subsystem_remove_listener");
    assert!(connect_refused(other, nqn), "refused once the listener is removed");
    assert_eq!(discovery_entries(other), vec![], "nothing listens on the port any more");
    d.stop();
}

/// The SMART log counts every command a host has seen complete: each queue adds what it moved
/// to its controller's totals once per turn, before that turn's responses leave. Writes in the
/// capsule (stored at once on a RAM export), by R2T, and reads (lent from its memory), in
/// flight together; the log is read right after the last completion.
#[test]
fn smart_log_counts_every_completed_command() {
    let d = Daemon::start();
    let o = QueueOptions { timeout: TIMEOUT, ..QueueOptions::default() };
    let mut c = controller(d.addr, MAIN, &o).unwrap();
    let counts = |admin: &mut Queue| {
        let log = admin.get_log_page(0x02, 0xffff_ffff, 512, 0).unwrap();
        let n = |at: usize| u64::from_le_bytes(log[at..at + 8].try_into().unwrap());
        // Data units read / written (thousands of 512 bytes, rounded up), host read / write
        // commands.
        (n(32), n(48), n(64), n(80))
    };
    assert_eq!(counts(&mut c.admin), (0, 0, 0, 0));
    let (mut reads, mut writes, mut read_bytes, mut written_bytes) = (0u64, 0u64, 0u64, 0u64);
    for round in 0..5u64 {
        let lens = [4096usize, 65536, 8192];
        let mut inflight = 0;
        for i in 0..12u64 {
            let len = lens[(i % 3) as usize];
            let slba = (round * 12 + i) * 16;
            c.io.submit_write(1, slba, &pattern(len, slba)).unwrap();
            writes += 1;
            written_bytes += len as u64;
            inflight += 1;
        }
        for i in 0..12u64 {
            let len = lens[(i % 3) as usize];
            c.io.submit_read(1, i * 16, len as u32).unwrap();
            reads += 1;
            read_bytes += len as u64;
            inflight += 1;
        }
        for _ in 0..inflight {
            assert!(c.io.poll().unwrap().ok());
        }
        let units = |bytes: u64| bytes.div_ceil(512 * 1000);
        assert_eq!(
            counts(&mut c.admin),
            (units(read_bytes), units(written_bytes), reads, writes),
            "after round {round}"
        );
    }
    d.stop();
}
