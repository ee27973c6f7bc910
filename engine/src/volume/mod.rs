//! Volumes in the daemon: the volume core (crate `ballast-volume`, re-exported here) and its
//! adapter to the reactor ([`dev`]).

pub use ballast_volume::{alloc, format, journal, map, meta, ops, pool, records, sim};

pub mod dev;
