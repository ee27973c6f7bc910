//! ballast-tls: TLS for the front-ends.
//!
//! - [`psk_file`]: PSK tables in nbdkit's `identity:hexkey` format (secrets redacted, wiped);
//! - [`config`]: a server's credentials loaded once into an OpenSSL context;
//! - [`session`]: one session as a sans-I/O state machine over memory buffers, so the
//!   connection glue keeps its socket I/O on the core's ring;
//! - [`link`]: the glue both front-ends put between their parser and their socket;
//! - [`ktls`]: handing an established TLS 1.2/1.3 session's records to the kernel.
#![forbid(unsafe_code)]

pub mod config;
pub mod ktls;
pub mod link;
pub mod psk_file;
pub mod session;

pub use ballast_ffi::tls_psk::PskHash;
pub use config::{Identity, ServerConfig, TlsConfigError, TlsServer};
pub use link::{offload_to_kernel, Pump, TlsLink};
pub use psk_file::{Key, PskFileError, PskTable};
pub use session::{Handoff, ReadOutcome, TlsError, TlsSession};
