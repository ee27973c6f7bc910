//! ballast-nbd: the NBD front-end.
//!
//! Three layers, kept apart:
//! - [`codec`]: bytes ⇄ typed messages (pure, golden-tested, fuzzed);
//! - [`handshake`] and [`transmission`]: the negotiation state machine and request
//!   validation (pure);
//! - [`conn`]: the task on an engine core that owns one client's socket.
#![forbid(unsafe_code)]

pub mod codec;
pub mod conn;
pub mod exports;
pub mod handshake;
pub mod transmission;

pub use exports::{Export, ExportError, ExportTable};

use std::sync::Arc;

use ballast_engine::listener::ConnFactory;

/// The factory the engine's listener uses to serve NBD on accepted sockets.
pub fn conn_factory(exports: Arc<ExportTable>) -> ConnFactory {
    Arc::new(move |fd, peer, guard| Box::new(conn::Conn::new(fd, peer, guard, exports.clone())))
}
