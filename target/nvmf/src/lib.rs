//! ballast-nvmf: the NVMe/TCP front-end.
//!
//! Layers, kept apart:
//! - [`pdu`] and [`nvme`]: NVMe/TCP PDUs and NVMe structures ⇄ bytes (pure, golden-tested);
//! - [`admin`] and [`identify`]: the admin command set and the data it returns (pure);
//! - [`error_log`]: a controller's Error Information log (pure);
//! - [`subsys`]: subsystems, namespaces, allowed hosts, the controller registry;
//! - [`ana`]: Asymmetric Namespace Access: paths' states, the ANA log page (pure);
//! - [`fused`]: Compare and fused Compare and Write: how commands pair, a pair's steps (pure);
//! - [`queue`]: the task on an engine core that owns one queue pair's socket;
//! - [`psk`], [`auth`] and [`secret`]: NVMe/TCP TLS PSKs and DH-HMAC-CHAP in-band
//!   authentication (pure codecs, key derivations and the per-queue state machine);
//! - [`tls`]: the secure channel: keys per host and subsystem, listener requirements;
//! - [`fuzzing`]: the decoders' properties under arbitrary bytes (fuzz targets and proptests).
#![forbid(unsafe_code)]

pub mod admin;
pub mod ana;
pub mod auth;
pub mod error_log;
pub mod fused;
pub mod fuzzing;
pub mod identify;
pub mod nvme;
pub mod pdu;
pub mod psk;
pub mod queue;
pub mod resv;
pub mod resv_cell;
pub mod resv_log;
pub mod secret;
pub mod spread;
pub mod subsys;
pub mod tls;

use std::sync::Arc;

use ballast_engine::listener::ConnFactory;
use ballast_engine::placed::Placed;
pub use subsys::{ListenAddr, Target, NQN_PREFIX};

/// The factory the engine's listener on `via` uses to serve NVMe/TCP on accepted sockets.
pub fn conn_factory(target: Arc<Target>, via: ListenAddr) -> ConnFactory {
    Arc::new(move |fd, peer, guard| {
        Box::new(Placed::new(queue::Queue::new(fd, peer, guard, target.clone(), via.clone())))
    })
}
