//! ballast-ffi: every `unsafe` block of ballast lives in this crate, behind safe APIs.
//!
//! - [`buf`]: page-aligned, zero-initialised I/O buffers (O_DIRECT-safe).
//! - [`ring`]: an io_uring whose in-flight operations own the memory the kernel touches.
//! - [`sys`]: ioctls, CPU affinity, eventfd, O_DIRECT opens, io_uring availability probe.

pub mod buf;
pub mod ring;
pub mod sys;

pub use buf::IoBuf;
pub use ring::{Completion, Op, Owned, Ring, RingCounters, RingError, SendBatch};
