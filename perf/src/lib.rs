//! ballast-perf: a blocking NVMe/TCP initiator, a blocking NBD client, and the load generator
//! built on them.
//!
//! Layers:
//! - [`tls`]: the secure channel (TLS 1.3 with a PSK derived as the Linux host derives it);
//! - [`conn`]: the TCP connection, ICReq/ICResp, header checks and digests;
//! - [`queue`]: Fabrics Connect and the command data path (capsules, R2T/H2CData, C2HData);
//! - [`admin`]: admin-queue helpers (properties, Identify, features, log pages, keep-alive);
//! - [`nbd`]: an NBD client (fixed newstyle, NBD_OPT_GO, pipelined simple-reply requests);
//! - [`bench`]: the `ballast-perf` workload (threads, queue depth, latency histograms, reports).
//!
//! PDU and NVMe structure encoders and decoders come from `ballast_nvmf` (the target's own
//! codec), and NBD's from `ballast_nbd::codec`, so the clients and the targets share one
//! definition of each wire format.
#![forbid(unsafe_code)]

pub mod admin;
pub mod bench;
pub mod conn;
pub mod error;
pub mod nbd;
pub mod queue;
pub mod tls;

pub use admin::{ControllerInfo, NamespaceInfo};
pub use conn::{Conn, IcResp};
pub use error::{Error, Result};
pub use queue::{Command, Completion, Data, Queue, QueueOptions, CNTLID_DYNAMIC};
pub use tls::{TlsClient, TlsError};

/// Connects an admin queue, enables the controller and identifies it and namespace `nsid`.
pub fn open_controller(
    addr: std::net::SocketAddr,
    subnqn: &str,
    hostnqn: &str,
    nsid: u32,
    opts: &QueueOptions,
) -> Result<(Queue, ControllerInfo, NamespaceInfo)> {
    let mut admin = Queue::connect(addr, subnqn, hostnqn, 0, CNTLID_DYNAMIC, opts)?;
    admin.enable_controller(opts.timeout)?;
    let ctrl = admin.identify_controller()?;
    let ns = admin.identify_namespace(nsid)?;
    Ok((admin, ctrl, ns))
}
