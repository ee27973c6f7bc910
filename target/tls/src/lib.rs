//! ballast-tls: TLS for the front-ends.
//!
//! - [`psk_file`]: PSK tables in nbdkit's `identity:hexkey` format (secrets redacted, wiped);
//! - [`config`]: a server's credentials loaded once into an OpenSSL context;
//! - [`session`]: one session as a sans-I/O state machine over memory buffers, so the
//!   connection glue keeps its socket I/O on the core's ring;
//! - [`link`]: the glue both front-ends put between their parser and their socket.
#![forbid(unsafe_code)]

pub mod config;
pub mod link;
pub mod psk_file;
pub mod session;

pub use config::{Identity, ServerConfig, TlsConfigError, TlsServer};
pub use link::{Pump, TlsLink};
pub use psk_file::{Key, PskFileError, PskTable};
pub use session::{ReadOutcome, TlsError, TlsSession};
