//! ballast-volume: the volume core, free of I/O (see docs/VOLUMES.md).
//!
//! - [`format`], [`records`], [`journal`]: the byte-exact on-media codecs (superblock,
//!   journal blocks, records) and the journal writer;
//! - [`map`], [`alloc`]: the copy-on-write mapping trees and the cluster allocator;
//! - [`meta`]: the in-memory state of an open pool and every decision about it;
//! - [`pace`]: the pool-wide rate of background copying (decoupling, inflating);
//! - [`pool`]: the synchronous driver (format, open and replay, control operations on a
//!   blocking disk);
//! - [`sim`]: the crash-simulating device the core is tested against.
//!
//! Nothing here submits I/O: a driver (the daemon's reactor adapter, the synchronous pool, the
//! simulator) carries out what the core asks for and reports back.
#![forbid(unsafe_code)]

pub mod alloc;
pub mod commit;
pub mod format;
pub mod journal;
pub mod locks;
pub mod map;
pub mod meta;
pub mod ops;
pub mod pace;
pub mod pool;
pub mod records;
pub mod request;
pub mod sim;
