//! ballast-nbd: the NBD front-end.
//!
//! Three layers, kept apart:
//! - [`codec`]: bytes ⇄ typed messages (pure, golden-tested, fuzzed);
//! - [`handshake`] and [`transmission`]: the negotiation state machine and request
//!   validation (pure);
//! - [`conn`] and [`server`]: tasks on the engine's cores that own the sockets.
#![forbid(unsafe_code)]

pub mod codec;
pub mod conn;
pub mod exports;
pub mod handshake;
pub mod server;
pub mod transmission;

pub use exports::{Export, ExportError, ExportTable};
pub use server::Acceptor;
