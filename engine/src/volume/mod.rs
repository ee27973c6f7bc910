//! Volumes in the daemon: the volume core (crate `ballast-volume`, re-exported here) and its
//! adapter to the reactor ([`dev`]), and the mail that carries a request to the core owning
//! its volume's family ([`forward`]).

pub use ballast_volume::{alloc, format, journal, map, meta, ops, pace, pool, records, sim};

pub mod dev;
pub mod forward;
pub mod state_lock;
