//! A TLS server's configuration, loaded once and shared by every connection: X.509 (a
//! certificate chain and its key; optionally a CA that client certificates must chain to) and
//! TLS-PSK (a table of identities and keys).
//!
//! Invariants:
//! - TLS 1.2 is the oldest version offered (the NBD protocol requires 1.2; 1.3 is preferred);
//!   no session tickets, no session cache, no renegotiation, no compression, no 0-RTT: every
//!   connection is a full handshake that proves the key or certificate again;
//! - with a CA, a client without a certificate that chains to it fails the handshake;
//! - private keys and PSK files readable by group or others are refused; no secret is ever
//!   part of an error, a log line or `Debug` output.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ballast_ffi::tls_psk::{set_psk_find_session, ExternalPsk, PskHash};
use openssl::ex_data::Index;
use openssl::nid::Nid;
use openssl::ssl::{
    ClientHelloResponse, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslOptions,
    SslSessionCacheMode, SslVerifyMode, SslVersion,
};

use crate::psk_file::{Key, PskFileError, PskTable};

/// TLS 1.2 cipher suites offered (1.3's are OpenSSL's defaults, all AEAD): forward-secret
/// AEAD with certificates, and the PSK suites, (EC)DHE first.
const TLS12_CIPHERS: &str = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:\
                             ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK+AESGCM:PSK+AESGCM:\
                             PSK-CHACHA20-POLY1305:!aNULL:!MD5:!SHA1";

/// TLS 1.3 cipher suites, in the server's order of preference: AES-GCM first (AES-NI makes it
/// the cheapest per byte on the x86 machines we run on), ChaCha20 for clients without it.
const TLS13_SUITES: &str =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("TLS: a certificate needs its private key, and a key its certificate")]
    HalfPair,
    #[error("TLS: no certificate and no PSK file: nothing to authenticate with")]
    NoCredentials,
    #[error("TLS: a CA to check client certificates needs a server certificate too")]
    CaWithoutCertificate,
    #[error("TLS: {what} {path}: {source}")]
    Read { what: &'static str, path: String, source: std::io::Error },
    #[error(
        "TLS: private key {path} is readable by group or others (mode {mode:o}); chmod 600 it"
    )]
    KeyPermissions { path: String, mode: u32 },
    #[error("TLS: {what} {path}: {reason}")]
    OpenSsl { what: &'static str, path: String, reason: String },
    #[error("{0}")]
    Psk(#[from] PskFileError),
}

/// Where a server's credentials are.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// PEM certificate chain (the server's certificate first).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert` (mode 0600 or stricter).
    pub key: Option<PathBuf>,
    /// PEM CA certificates client certificates must chain to; unset: no client certificate
    /// is asked for.
    pub ca: Option<PathBuf>,
    /// PSK file (`identity:hexkey` lines, mode 0600 or stricter).
    pub psk: Option<PathBuf>,
}

/// Who the peer proved to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The PSK identity (user name) whose key the client proved.
    Psk(String),
    /// The common name of a client certificate that chains to the configured CA.
    Certificate(String),
    /// Encrypted, but the client proved no identity (no CA configured).
    Anonymous,
}

impl Identity {
    /// The name per-export allow-lists match: the PSK identity or the certificate's CN.
    pub fn name(&self) -> Option<&str> {
        match self {
            Identity::Psk(n) | Identity::Certificate(n) => Some(n),
            Identity::Anonymous => None,
        }
    }
}

/// A loaded configuration: the OpenSSL context every session of this server starts from.
#[derive(Clone)]
pub struct TlsServer {
    pub(crate) ctx: SslContext,
    /// Where the PSK callback leaves the identity it accepted, on each session.
    pub(crate) psk_identity: Index<Ssl, String>,
    summary: Arc<str>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsServer({})", self.summary)
    }
}

fn openssl_err(
    what: &'static str,
    path: &Path,
) -> impl FnOnce(openssl::error::ErrorStack) -> TlsConfigError {
    let path = path.display().to_string();
    move |e| TlsConfigError::OpenSsl { what, path, reason: e.to_string() }
}

impl TlsServer {
    pub fn new(config: &ServerConfig) -> Result<TlsServer, TlsConfigError> {
        let mut b = context(SslVersion::TLS1_2)?;
        b.set_options(SslOptions::NO_RENEGOTIATION);
        b.set_cipher_list(TLS12_CIPHERS).map_err(context_err)?;
        let mut summary = Vec::new();
        match (&config.cert, &config.key) {
            (Some(cert), Some(key)) => {
                check_private(key)?;
                b.set_certificate_chain_file(cert).map_err(openssl_err("certificate", cert))?;
                b.set_private_key_file(key, SslFiletype::PEM)
                    .map_err(openssl_err("private key", key))?;
                b.check_private_key()
                    .map_err(openssl_err("private key (does not match the certificate)", key))?;
                summary.push(format!("certificate {}", cert.display()));
            }
            (None, None) => {}
            _ => return Err(TlsConfigError::HalfPair),
        }
        if let Some(ca) = &config.ca {
            if config.cert.is_none() {
                return Err(TlsConfigError::CaWithoutCertificate);
            }
            b.set_ca_file(ca).map_err(openssl_err("CA file", ca))?;
            b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
            summary.push(format!("client certificates checked against {}", ca.display()));
        }
        let psk_identity = Ssl::new_ex_index::<String>().map_err(context_err)?;
        if let Some(path) = &config.psk {
            let table = PskTable::load(path)?;
            summary.push(format!("{} PSK identities from {}", table.len(), path.display()));
            psk_callback(&mut b, psk_identity, move |name| table.get(name).cloned());
        }
        if summary.is_empty() {
            return Err(TlsConfigError::NoCredentials);
        }
        Ok(TlsServer { ctx: b.build(), psk_identity, summary: summary.join(", ").into() })
    }

    /// A TLS 1.3-only server whose pre-shared keys come from `resolve` (identity → key and
    /// the hash it is bound to; none refuses the identity): NVMe/TCP's secure channel, where
    /// keys are derived per host and subsystem from the identity the host offers. PSK with
    /// (EC)DHE, no certificates.
    ///
    /// A key's hash decides its cipher suite only for a client that offers no SHA-256 suite
    /// (SPDK's initiator with a SHA-384 key: TLS_AES_256_GCM_SHA384 alone); one that offers
    /// them gets the key bound to SHA-256, as OpenSSL's PSK callback binds every key — what
    /// the Linux host (tlshd) does even for SHA-384 keys, and what the kernel target accepts.
    pub fn with_psk_resolver(
        resolve: impl Fn(&str) -> Option<(Key, PskHash)> + Send + Sync + 'static,
    ) -> Result<TlsServer, TlsConfigError> {
        let mut b = context(SslVersion::TLS1_3)?;
        let psk_identity = Ssl::new_ex_index::<String>().map_err(context_err)?;
        let resolve = Arc::new(resolve);
        let legacy = resolve.clone();
        psk_callback(&mut b, psk_identity, move |name| legacy(name).map(|(key, _)| key));
        let sha256_offered = Ssl::new_ex_index::<bool>().map_err(context_err)?;
        b.set_client_hello_callback(move |ssl, _alert| {
            let offered = ssl.client_hello_ciphers().is_some_and(|suites| {
                suites.chunks_exact(2).any(|s| s == [0x13, 0x01] || s == [0x13, 0x03])
            });
            ssl.set_ex_data(sha256_offered, offered);
            Ok(ClientHelloResponse::SUCCESS)
        });
        set_psk_find_session(&mut b, move |ssl, identity| {
            if ssl.ex_data(sha256_offered).copied().unwrap_or(true) {
                return None;
            }
            let name = std::str::from_utf8(identity).ok()?;
            let (key, hash) = resolve(name)?;
            if hash != PskHash::Sha384 {
                return None;
            }
            ssl.set_ex_data(psk_identity, name.to_string());
            Some(ExternalPsk { key: zeroize::Zeroizing::new(key.bytes().to_vec()), hash })
        })
        .map_err(context_err)?;
        Ok(TlsServer {
            ctx: b.build(),
            psk_identity,
            summary: "TLS 1.3 PSK (resolved per identity)".into(),
        })
    }

    /// What this server authenticates with, for logs (no secrets).
    pub fn summary(&self) -> &str {
        &self.summary
    }
}

/// A server context with what every ballast TLS server shares: `min` as the oldest version,
/// no tickets, no session cache, no compression, the server's cipher order, TLS 1.3 suites.
fn context(min: SslVersion) -> Result<SslContextBuilder, TlsConfigError> {
    let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(context_err)?;
    b.set_min_proto_version(Some(min)).map_err(context_err)?;
    b.set_options(
        SslOptions::NO_TICKET | SslOptions::NO_COMPRESSION | SslOptions::CIPHER_SERVER_PREFERENCE,
    );
    b.set_num_tickets(0).map_err(context_err)?;
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    b.set_ciphersuites(TLS13_SUITES).map_err(context_err)?;
    // Sessions that may go to the kernel keep their traffic secrets (nothing is logged).
    b.set_keylog_callback(crate::ktls::on_keylog);
    Ok(b)
}

fn context_err(e: openssl::error::ErrorStack) -> TlsConfigError {
    TlsConfigError::OpenSsl { what: "context", path: String::new(), reason: e.to_string() }
}

/// The PSK callback: the key `lookup` gives for the identity the client offers (none refuses
/// it); the accepted identity is left on the session under `psk_identity`.
fn psk_callback(
    b: &mut SslContextBuilder,
    psk_identity: Index<Ssl, String>,
    lookup: impl Fn(&str) -> Option<Key> + Send + Sync + 'static,
) {
    b.set_psk_server_callback(move |ssl, identity, out| {
        let Some(name) = identity.and_then(|i| std::str::from_utf8(i).ok()) else {
            return Ok(0);
        };
        let Some(key) = lookup(name) else {
            // Debug, not info: any client can offer identities, once per attempt.
            tracing::debug!(identity = name, "TLS-PSK: no key for this identity");
            return Ok(0);
        };
        let key = key.bytes();
        if key.is_empty() || key.len() > out.len() {
            return Ok(0);
        }
        out[..key.len()].copy_from_slice(key);
        ssl.set_ex_data(psk_identity, name.to_string());
        Ok(key.len())
    });
}

/// The identity a finished handshake proved. The PSK callback's identity is only a
/// candidate: OpenSSL asks for a key before it knows whether the PSK will be used (a TLS 1.3
/// client may offer an identity with a binder it cannot make, then pick a suite that PSK cannot
/// serve: the PSK is dropped unchecked and the handshake goes on with the certificate), so it
/// counts only where the handshake was a PSK one.
pub(crate) fn identity_of(ssl: &openssl::ssl::SslRef, psk: Index<Ssl, String>) -> Identity {
    let psk_used =
        ssl.session_reused() || ssl.current_cipher().is_some_and(|c| c.name().contains("PSK"));
    if let (Some(name), true) = (ssl.ex_data(psk), psk_used) {
        return Identity::Psk(name.clone());
    }
    let cn = ssl.peer_certificate().and_then(|cert| {
        let entry = cert.subject_name().entries_by_nid(Nid::COMMONNAME).next()?;
        entry.data().to_string().ok()
    });
    match cn {
        Some(cn) => Identity::Certificate(cn),
        None => Identity::Anonymous,
    }
}

fn check_private(path: &Path) -> Result<(), TlsConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| TlsConfigError::Read {
        what: "private key",
        path: path.display().to_string(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsConfigError::KeyPermissions { path: path.display().to_string(), mode });
    }
    Ok(())
}
