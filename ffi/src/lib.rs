//! ballast-ffi: every `unsafe` block of ballast lives in this crate, behind safe APIs.
//!
//! - [`alloc`]: the daemon's global allocator, counting each thread's allocations.
//! - [`buf`]: page-aligned, zero-initialised I/O buffers (O_DIRECT-safe).
//! - [`fixed`]: a ring's registered files and buffers, and how their slots come back.
//! - [`region`]: a RAM device's memory: one mapping (huge pages where the kernel has them) in
//!   chunks, each behind its own lock.
//! - [`ring`]: an io_uring whose in-flight operations own the memory the kernel touches.
//! - [`sys`]: ioctls, CPU affinity, eventfd, O_DIRECT opens, io_uring availability probe.
//! - [`nvme`]: NVMe I/O command encoding for io_uring passthrough, status mapping, the
//!   namespace ioctls (id, Identify, a blocking flush).
//! - [`devring`]: a core's device ring (SQE128/CQE32) carrying NVMe passthrough commands.
//! - [`ktls`]: handing an established TLS session's record layer to the kernel.
//! - [`tls_psk`]: TLS 1.3 external PSKs bound to SHA-384 (OpenSSL callbacks the `openssl`
//!   crate does not wrap).

pub mod alloc;
pub mod buf;
pub mod devring;
pub mod fixed;
pub mod ktls;
pub mod nvme;
pub mod region;
pub mod ring;
pub mod sys;
pub mod tls_psk;

pub use buf::IoBuf;
pub use devring::{DevRing, DevRingMode};
pub use fixed::Returns;
pub use nvme::{NvmeIo, NvmeNs};
pub use ring::{
    Completion, FileRef, FixedConfig, Op, Owned, Ring, RingCounters, RingError, SendBatch,
};
