//! Listening sockets shared by the daemon's servers: binding with a retry, NVMe/TCP acceptors on
//! core 0, and the client-slot and refusal-log helpers of the control and metrics sockets.
//!
//! A leaf module (it uses no other module of the daemon).

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use ballast_engine::limits::Admission;
use ballast_engine::listener::Acceptor;
use ballast_engine::{Msg, Task};

/// Counts refusals of one kind and says which to log: the 1st, 2nd, 4th, 8th, ...
#[derive(Default)]
pub(crate) struct RateLimitedLog(u64);

impl RateLimitedLog {
    pub(crate) fn should_log(&mut self) -> Option<u64> {
        self.0 += 1;
        self.0.is_power_of_two().then_some(self.0)
    }
}

/// Releases a client slot when the client's thread ends (or never starts).
pub(crate) struct Slot(pub(crate) Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Binds an NVMe/TCP listener and starts its acceptor on core 0. Which subsystems a host
/// reaches through it is the subsystems' business (`Subsystem::listeners`).
pub fn start_nvmf_listener(
    cores: &[ballast_engine::reactor::CoreHandle],
    target: &Arc<ballast_nvmf::Target>,
    admission: &Arc<Admission>,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    let admission = admission.clone();
    let listener = bind_retrying(addr).with_context(|| format!("binding NVMe/TCP on {addr}"))?;
    let via = ballast_nvmf::ListenAddr::from(addr);
    target.listener_bound(via.clone());
    let factory = ballast_nvmf::conn_factory(target.clone(), via);
    let spawn = Msg::Spawn(Box::new(move |_cx| {
        Box::new(Acceptor::new(listener, "nvme-tcp", factory, admission)) as Box<dyn Task>
    }));
    if !cores[0].send_blocking(spawn) {
        bail!("core 0 is not running");
    }
    Ok(())
}

/// Whether the kernel would refuse to bind both: the same port on the same address, or on
/// a wildcard address (which takes the port on every address of its family, and an IPv6
/// wildcard the IPv4 ones too). Port 0 asks the kernel for a free port each time: never.
pub(crate) fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let same_ip = a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
    a.port() == b.port() && a.port() != 0 && same_ip
}

/// The daemon's listen addresses from its flags, refused before anything starts where two
/// would take the same port (else the second would wait for a port that never frees). The
/// NVMe/TCP addresses come back without repeats: --discovery-listen naming --nvmf-listen's
/// address adds nothing, that listener serves discovery controllers already.
pub(crate) fn startup_addrs(
    nbd: SocketAddr,
    nvmf: SocketAddr,
    discovery: Option<SocketAddr>,
) -> anyhow::Result<Vec<SocketAddr>> {
    let mut named = vec![("--nvmf-listen", nvmf)];
    if let Some(d) = discovery.filter(|d| *d != nvmf) {
        named.push(("--discovery-listen", d));
    }
    for (flag, addr) in &named {
        if overlap(nbd, *addr) {
            bail!("--nbd-listen {nbd} and {flag} {addr} would share a port: give each its own");
        }
    }
    if let [(_, a), (flag, b)] = named[..] {
        if overlap(a, b) {
            bail!("--nvmf-listen {a} and {flag} {b} would share a port: name the same address or another port");
        }
    }
    Ok(named.into_iter().map(|(_, a)| a).collect())
}

/// Binds `addr`, waiting up to 10 s while it is in use: after a kill -9 the previous daemon's
/// listening sockets stay open until the kernel has torn down its io_uring (an accept in
/// flight holds them), which takes a moment after the process is gone.
pub(crate) fn bind_retrying(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let start = std::time::Instant::now();
    let mut warned = false;
    loop {
        match TcpListener::bind(addr) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && start.elapsed() < std::time::Duration::from_secs(10) =>
            {
                if !warned {
                    tracing::warn!(%addr, "address in use; waiting for it to be released");
                    warned = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_sharing_a_port_are_refused() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let nbd = a("127.0.0.1:10809");
        let nvmf = a("127.0.0.1:4420");
        assert_eq!(startup_addrs(nbd, nvmf, None).unwrap(), [nvmf]);
        // discovery on the I/O listener's address: one listener serves both
        assert_eq!(startup_addrs(nbd, nvmf, Some(nvmf)).unwrap(), [nvmf]);
        let disc = a("127.0.0.1:8009");
        assert_eq!(startup_addrs(nbd, nvmf, Some(disc)).unwrap(), [nvmf, disc]);
        // the same port on other addresses binds; port 0 is a free port each time
        assert!(startup_addrs(a("127.0.0.2:4420"), nvmf, None).is_ok());
        let any = a("127.0.0.1:0");
        assert_eq!(startup_addrs(any, any, Some(a("0.0.0.0:0"))).unwrap().len(), 2);
        for (nbd, nvmf, disc) in [
            (nvmf, nvmf, None),
            (a("0.0.0.0:4420"), nvmf, None),
            (a("[::]:4420"), nvmf, None),
            (a("127.0.0.1:8009"), nvmf, Some(disc)),
            (nbd, a("0.0.0.0:4420"), Some(a("127.0.0.1:4420"))),
        ] {
            let e = startup_addrs(nbd, nvmf, disc).unwrap_err().to_string();
            assert!(e.contains("would share a port"), "{e}");
        }
    }

    #[test]
    fn refusals_are_logged_at_powers_of_two() {
        let mut log = RateLimitedLog::default();
        let logged: Vec<u64> = (0..100).filter_map(|_| log.should_log()).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16, 32, 64]);
    }
}
