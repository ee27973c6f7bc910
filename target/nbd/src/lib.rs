//! ballast-nbd: the NBD front-end.
//!
//! Three layers, kept apart:
//! - [`codec`]: bytes ⇄ typed messages (pure, golden-tested, fuzzed);
//! - [`handshake`] and [`transmission`]: the negotiation state machine and request
//!   validation (pure);
//! - [`conn`]: the task on an engine core that owns one client's socket (and moves to the core
//!   its volume lives on, `ballast_engine::placed`).
#![forbid(unsafe_code)]

pub mod codec;
pub mod conn;
pub mod exports;
pub mod handshake;
pub mod transmission;

pub use exports::{Access, Export, ExportError, ExportTable};
pub use handshake::TlsMode;

use std::sync::Arc;

use ballast_engine::listener::ConnFactory;
use ballast_engine::placed::Placed;
use ballast_tls::TlsServer;

/// How NBD offers TLS: the mode, and the credentials (required unless the mode is `Off`).
#[derive(Clone, Debug, Default)]
pub struct NbdTls {
    pub mode: TlsMode,
    pub server: Option<TlsServer>,
}

/// The factory the engine's listener uses to serve NBD on accepted sockets.
pub fn conn_factory(exports: Arc<ExportTable>, tls: NbdTls) -> ConnFactory {
    assert!(tls.mode == TlsMode::Off || tls.server.is_some(), "NBD TLS on without credentials");
    Arc::new(move |fd, peer, guard| {
        Box::new(Placed::new(conn::Conn::new(fd, peer, guard, exports.clone(), tls.clone())))
    })
}
