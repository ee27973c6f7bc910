//! `ballast-floor` serves and measures: its client gets every answer it asked for, at each
//! depth, polling or sleeping, and reports what it measured in the JSON the harness reads.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(port: u16, shape: &str, poll: bool, span: &str) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ballast-floor"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--shape", shape]);
    cmd.args(["--span", span]);
    if poll {
        cmd.arg("--poll");
    }
    let server = Server(cmd.stdout(Stdio::null()).spawn().unwrap());
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return server;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("ballast-floor serve did not listen on {port}");
}

fn run(port: u16, shape: &str, qd: u32, ios: u64, poll: bool) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ballast-floor"));
    cmd.args(["run", "--addr", &format!("127.0.0.1:{port}"), "--shape", shape, "--json"]);
    cmd.args(["--qd", &qd.to_string(), "--number-ios", &ios.to_string(), "--runtime", "30"]);
    if poll {
        cmd.arg("--poll");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_request_is_answered_at_each_depth() {
    for (shape, side, poll, span) in [
        ("nvmf-read4k", "read", true, "0"),
        ("nvmf-write4k", "write", false, "4M"),
        ("nbd-read4k", "read", false, "2M"),
        ("nbd-write4k", "write", true, "0"),
    ] {
        let port = free_port();
        let _server = serve(port, shape, poll, span);
        for qd in [1u32, 7, 32] {
            let j = run(port, shape, qd, 3000, poll);
            let job = &j["jobs"][0];
            assert_eq!(job[side]["total_ios"], 3000, "{shape} qd {qd}: {job}");
            let other = if side == "read" { "write" } else { "read" };
            assert_eq!(job[other]["total_ios"], 0);
            let mean = job[side]["clat_ns"]["mean"].as_f64().unwrap();
            assert!(mean > 0.0, "{shape} qd {qd}: latency {mean}");
            assert!(job[side]["iops"].as_f64().unwrap() > 0.0);
            assert_eq!(job["iodepth"], qd);
        }
    }
}
