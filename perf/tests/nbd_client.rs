//! `ballast-perf`'s NBD client: what real servers may send (a scripted server: no NBD_OPT_GO,
//! replies out of order, errors without data, block-size constraints, a reply for a handle
//! not in flight), and the benchmark driving our own daemon's NBD export.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use ballast_nbd::codec::{self, Request};
use ballast_perf::bench::{self, BenchConfig, Rw};
use ballast_perf::nbd::NbdClient;
use ballast_perf::Error;
use support::{short_bench, Daemon};

const TIMEOUT: Duration = Duration::from_secs(10);

/// One scripted connection: `script` runs the server's side on the accepted socket; join the
/// server (its assertions fail the test).
fn scripted(script: impl FnOnce(&mut TcpStream) + Send + 'static) -> (SocketAddr, Server) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let handle = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        script(&mut s);
    });
    (addr, Server(Some(handle)))
}

/// The scripted server's thread: joined, its panic is the test's.
struct Server(Option<thread::JoinHandle<()>>);

impl Server {
    fn join(mut self) {
        if let Err(panic) = self.0.take().expect("joined once").join() {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Reads until the client closes (what it sends last is not checked).
fn until_closed(s: &mut TcpStream) {
    let mut sink = [0u8; 512];
    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

/// Reads one client option; returns (option, data).
fn read_option(s: &mut TcpStream) -> (u32, Vec<u8>) {
    let h = codec::decode_option_header(&read_n(s, codec::OPTION_HEADER_LEN)).unwrap();
    (h.option, read_n(s, h.length as usize))
}

/// The fixed newstyle greeting (NO_ZEROES offered), then the client's flags and its first
/// option: (flags, option, data).
fn greet(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut out = Vec::new();
    codec::encode_greeting(&mut out);
    s.write_all(&out).unwrap();
    let flags = u32::from_be_bytes(read_n(s, 4).try_into().unwrap());
    let (option, data) = read_option(s);
    (flags, option, data)
}

fn read_request(s: &mut TcpStream) -> Request {
    codec::decode_request(&read_n(s, codec::REQUEST_LEN), codec::Framing::Simple).unwrap()
}

/// Greeting without NO_ZEROES, client flags, NBD_OPT_GO refused as unknown, then the old
/// NBD_OPT_EXPORT_NAME (with its 124 zeros): how a server without NBD_OPT_GO negotiates.
fn old_style_handshake(s: &mut TcpStream, size: u64) {
    let mut out = Vec::new();
    out.extend_from_slice(&codec::NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&codec::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&codec::FLAG_FIXED_NEWSTYLE.to_be_bytes());
    s.write_all(&out).unwrap();
    let flags = u32::from_be_bytes(read_n(s, 4).try_into().unwrap());
    assert_eq!(flags, codec::CLIENT_FIXED_NEWSTYLE, "NO_ZEROES asked of a server without it");
    let (option, data) = read_option(s);
    assert_eq!(option, codec::OPT_GO);
    let req = codec::decode_info_request(&data).unwrap();
    assert_eq!((req.name.as_str(), req.requests.as_slice()), ("e", &[codec::INFO_BLOCK_SIZE][..]));
    out.clear();
    codec::encode_option_reply(&mut out, codec::OPT_GO, codec::REP_ERR_UNSUP, b"");
    s.write_all(&out).unwrap();
    let (option, data) = read_option(s);
    assert_eq!((option, data.as_slice()), (codec::OPT_EXPORT_NAME, &b"e"[..]));
    out.clear();
    codec::encode_export_name_reply(&mut out, size, codec::TF_HAS_FLAGS, false);
    s.write_all(&out).unwrap();
}

#[test]
fn a_server_without_opt_go_and_replies_out_of_order() {
    let (addr, server) = scripted(|s| {
        old_style_handshake(s, 1 << 20);
        let r1 = read_request(s);
        let r2 = read_request(s);
        let w = read_request(s);
        assert_eq!((r1.kind, r1.offset, r1.length), (codec::CMD_READ, 0, 4096));
        assert_eq!((r2.kind, r2.offset, r2.length), (codec::CMD_READ, 8192, 4096));
        assert_eq!((w.kind, w.offset, w.length), (codec::CMD_WRITE, 512, 512));
        assert_eq!(read_n(s, 512), vec![0xab; 512]);
        // Answered last to first; the second read fails and carries no data.
        let mut out = Vec::new();
        codec::encode_simple_reply(&mut out, 0, w.handle);
        codec::encode_simple_reply(&mut out, codec::EIO, r2.handle);
        codec::encode_simple_reply(&mut out, 0, r1.handle);
        out.extend_from_slice(&[7u8; 4096]);
        s.write_all(&out).unwrap();
        let disc = read_request(s);
        assert_eq!(disc.kind, codec::CMD_DISC);
    });
    let mut c = NbdClient::connect(addr, "e", 4, TIMEOUT, false).unwrap();
    let info = c.info();
    assert_eq!((info.size, info.flags, info.min_block), (1 << 20, codec::TF_HAS_FLAGS, 1));
    let h1 = c.submit_read(0, 4096).unwrap();
    let h2 = c.submit_read(8192, 4096).unwrap();
    let hw = c.submit_write(512, &[0xab; 512]).unwrap();
    assert_eq!(c.in_flight(), 3);
    let a = c.poll().unwrap();
    let b = c.poll().unwrap();
    let d = c.poll().unwrap();
    assert_eq!((a.handle, a.error, a.read), (hw, 0, false));
    assert_eq!((b.handle, b.error, b.read), (h2, codec::EIO, true));
    assert_eq!((d.handle, d.error, d.read), (h1, 0, true));
    assert_eq!(c.in_flight(), 0);
    c.disconnect().unwrap();
    server.join();
}

#[test]
fn block_size_constraints_and_refusals() {
    // NBD_OPT_GO answered with the export, its block sizes and an information type we do not
    // know; then a failed read's reply, and a second reply for the same handle (in range, but
    // no longer in flight).
    let (addr, server) = scripted(|s| {
        let (flags, option, _) = greet(s);
        assert_eq!(flags, codec::CLIENT_FIXED_NEWSTYLE | codec::CLIENT_NO_ZEROES);
        assert_eq!(option, codec::OPT_GO);
        let mut out = Vec::new();
        codec::encode_info_export(&mut out, codec::OPT_GO, 64 << 10, codec::TF_HAS_FLAGS);
        codec::encode_info_text(&mut out, codec::OPT_GO, codec::INFO_DESCRIPTION, "d");
        codec::encode_info_block_size(&mut out, codec::OPT_GO, 4096, 65536, 1 << 20);
        codec::encode_option_reply(&mut out, codec::OPT_GO, codec::REP_ACK, &[]);
        s.write_all(&out).unwrap();
        let r = read_request(s);
        assert_eq!(read_request(s).handle, r.handle + 1, "the second slot");
        out.clear();
        codec::encode_simple_reply(&mut out, codec::EIO, r.handle);
        codec::encode_simple_reply(&mut out, codec::EIO, r.handle);
        s.write_all(&out).unwrap();
        until_closed(s);
    });
    let mut c = NbdClient::connect(addr, "", 2, TIMEOUT, true).unwrap();
    let info = c.info();
    assert_eq!(
        (info.size, info.min_block, info.preferred_block, info.max_block),
        (64 << 10, 4096, 65536, 1 << 20)
    );
    c.submit_read(0, 4096).unwrap();
    c.submit_read(4096, 4096).unwrap();
    assert!(matches!(c.submit_read(0, 4096), Err(Error::QueueFull(2))));
    let first = c.poll().unwrap();
    assert_eq!((first.handle, first.error), (0, codec::EIO));
    match c.poll() {
        Err(Error::Protocol(msg)) => assert!(msg.contains("handle 0, not in flight"), "{msg}"),
        other => panic!("a second reply for a handle no longer in flight: {other:?}"),
    }
    assert!(matches!(c.poll(), Err(Error::Broken)));
    drop(c);
    server.join();
}

#[test]
fn an_unknown_export_is_a_clear_error() {
    let (addr, server) = scripted(|s| {
        greet(s);
        let mut out = Vec::new();
        codec::encode_option_reply(&mut out, codec::OPT_GO, codec::REP_ERR_UNKNOWN, b"no such");
        s.write_all(&out).unwrap();
        until_closed(s);
    });
    match NbdClient::connect(addr, "nope", 1, TIMEOUT, false) {
        Err(Error::Invalid(msg)) => assert!(msg.contains("\"nope\"") && msg.contains("no such")),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("an unknown export was opened"),
    }
    server.join();
}

fn nbd_cfg(addr: SocketAddr, export: &str) -> BenchConfig {
    BenchConfig {
        kato_ms: 0,
        timeout: TIMEOUT,
        nbd_export: Some(export.into()),
        ..short_bench(addr)
    }
}

#[test]
fn the_benchmark_drives_our_nbd_export() {
    let d = Daemon::start();
    let report = bench::run(&nbd_cfg(d.nbd_addr, "main")).expect("an NBD benchmark run");
    assert!(report.read.ops > 0 && report.write.ops > 0, "{}", report.text());
    assert_eq!(report.namespace_bytes, 64 << 20);
    assert!(report.text().contains("NBD export \"main\""), "{}", report.text());
    let json = report.json();
    assert_eq!(json["global options"]["ioengine"], "ballast-perf (NBD)");

    // Polled, with a fixed count: the run ends at its last completion.
    let counted = BenchConfig {
        poll: true,
        rw: Rw::Write,
        queues: 1,
        number_ios: Some(500),
        runtime: Duration::from_secs(10),
        ..nbd_cfg(d.nbd_addr, "main")
    };
    let report = bench::run(&counted).expect("a counted NBD run");
    assert_eq!(report.write.ops, 500);
    assert!(report.elapsed < Duration::from_secs(10));

    // What the export cannot take is refused before any I/O.
    let err = bench::run(&nbd_cfg(d.nbd_addr, "nope")).unwrap_err();
    assert!(format!("{err:#}").contains("\"nope\""), "{err:#}");
    let too_big = BenchConfig { bs: 64 << 20, ..nbd_cfg(d.nbd_addr, "main") };
    assert!(bench::run(&too_big).is_err());
    // Mixed reads and writes beyond what the socket buffers surely hold: refused, not hung.
    let mixed = BenchConfig { bs: 128 << 10, qd: 16, ..nbd_cfg(d.nbd_addr, "main") };
    let err = bench::run(&mixed).unwrap_err();
    assert!(format!("{err:#}").contains("randrw over NBD"), "{err:#}");
    d.stop();
}

/// A server answering NBD_OPT_GO with information without end is refused after a bounded
/// number of replies, not followed forever.
#[test]
fn endless_option_replies_are_refused() {
    let (addr, server) = scripted(|s| {
        greet(s);
        let mut out = Vec::new();
        for _ in 0..=ballast_perf::nbd::OPTION_REPLIES_MAX {
            codec::encode_info_text(&mut out, codec::OPT_GO, codec::INFO_NAME, "n");
        }
        s.write_all(&out).unwrap();
        until_closed(s);
    });
    match NbdClient::connect(addr, "e", 1, TIMEOUT, false) {
        Err(Error::Protocol(msg)) => assert!(msg.contains("replies to NBD_OPT_GO"), "{msg}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("endless replies were followed"),
    }
    server.join();
}
