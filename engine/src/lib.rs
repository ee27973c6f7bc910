//! ballast-engine: the per-core reactors and the block devices they drive.
//!
//! - [`reactor`]: one pinned thread per data core, each owning an io_uring for sockets and disk,
//!   running [`Task`]s (connections, listeners) and talking to other cores through bounded
//!   mailboxes with an eventfd wake-up.
//! - [`blockdev`]: the [`BlockDev`] trait every backend (and later every volume) implements.
//! - [`file`], [`ram`]: the file/block-device and memory backends; [`nvme`]: NVMe namespaces
//!   through io_uring passthrough on each core's device ring.
//! - [`gate`]: each device's write gate (fused Compare and Write runs alone among its writes).
//! - [`stats`]: per-core counters and latency histograms.
//! - [`pool`], [`limits`]: each core's buffer cache and payload-memory budget; the connection
//!   limits (count, handshake and stall deadlines) every protocol lives under.
#![forbid(unsafe_code)]

pub mod blockdev;
pub mod file;
pub mod fixed;
pub mod gate;
pub mod holder;
pub mod limits;
pub mod listener;
pub mod nvme;
pub mod offload;
pub mod placed;
pub mod poll;
pub mod pool;
pub mod qos;
pub mod ram;
pub mod reactor;
pub mod recvbuf;
pub mod sendq;
pub mod size;
pub mod stats;
pub mod volume;

pub use ballast_ffi::{IoBuf, Op, Owned, SendBatch};
pub use blockdev::{BlockDev, ChangeBase, DevInfo, Extent, IoCmd};
pub use reactor::{Cx, DeviceRingConfig, Engine, EngineConfig, Msg, Task};
