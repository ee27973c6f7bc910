//! NVMe/TCP's secure channel, host side (NVMe TCP transport 1.0 section 3.6, TP 8011): TLS 1.3
//! with a PSK derived from a configured key, set up the way the Linux host sets it up, so that
//! a benchmark over TLS takes the target through the same path a real host does:
//! - `nvme connect --tls` (nvme-cli 2.13, libnvme 1.13) turns the configured interchange key
//!   (`NVMeTLSkey-1:xx:<base64>:`) into the retained PSK and then the TLS PSK for the version
//!   0 identity `NVMe0Rhh <hostnqn> <subnqn>`, with libnvme's own HKDF-Expand-Label encoding
//!   (`Encoding::LibnvmeCompat`; tests/vm/TRIXIE.md records what the host sends). The
//!   derivation is the target's own (`ballast_nvmf::psk::derive`), so the two sides cannot
//!   drift apart;
//! - tlshd makes the handshake: TLS 1.3 only, the external PSK bound to SHA-256 and
//!   TLS_AES_128_GCM_SHA256, `psk_dhe_ke` only (an (EC)DHE share with the PSK), secp384r1
//!   offered first (the group the kernel target ends up with); no session tickets.
//!
//! TLS starts right after the TCP connect, before ICReq. Under TLS every NVMe/TCP byte is
//! record payload; [`crate::conn`] reads and writes through [`Stream`] either way.
//!
//! Invariants:
//! - key bytes live only in `SecretBytes` (zeroized, redacted) and in OpenSSL; no error,
//!   `Debug` output or report carries them (the identity is not secret: it names the host and
//!   the subsystem, and travels in the clear in the ClientHello);
//! - one [`TlsClient`] is for one (host, subsystem) pair: the identity names both, and the
//!   target accepts the connection's Connect only for those two;
//! - records the socket writes are held until [`Stream::flush`]: one send per batch of
//!   PDUs, as on the plaintext path (OpenSSL writes each record separately otherwise).

use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ballast_nvmf::psk::{derive, Encoding, PskError, PskIdentity, TlsKey};
use openssl::ssl::{
    HandshakeError, Ssl, SslConnector, SslContext, SslMethod, SslOptions, SslStream, SslVersion,
};

/// The TLS 1.3 suite a SHA-256 PSK is bound to (the one tlshd negotiates with a `01` key).
pub const CIPHERSUITE: &str = "TLS_AES_128_GCM_SHA256";
/// tlshd's supported_groups, in its order (TRIXIE.md); OpenSSL 3.0 sends a key share for the
/// first only, and secp384r1 is what the kernel's host and target settle on.
pub const GROUPS: &str = "secp384r1:X25519:secp521r1:prime256v1:X448:\
                          ffdhe8192:ffdhe2048:ffdhe3072:ffdhe4096:ffdhe6144";
/// The identity version the Linux host offers (no PSK digest).
pub const IDENTITY_VERSION: u8 = 0;
/// The HKDF-Expand-Label encoding libnvme 1.13 derives with.
pub const ENCODING: Encoding = Encoding::LibnvmeCompat;
/// OpenSSL's identity buffer holds PSK_MAX_IDENTITY_LEN (256) bytes and a NUL.
const IDENTITY_MAX_BYTES: usize = 256;
/// Ciphertext read from the socket per system call at most (OpenSSL asks for a record header,
/// then its body: served from here).
const SOCKET_READ_BUF_BYTES: usize = 256 * 1024;

/// Errors setting up the secure channel; none carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS key file {path}: {source}")]
    KeyFile { path: PathBuf, source: io::Error },
    #[error("TLS key file {path}: {source}")]
    Key { path: PathBuf, source: PskError },
    #[error("deriving the TLS PSK for host {hostnqn} and subsystem {subnqn}: {source}")]
    Derive { hostnqn: String, subnqn: String, source: PskError },
    #[error("PSK identity of {len_bytes} bytes exceeds OpenSSL's {IDENTITY_MAX_BYTES}")]
    IdentityTooLong { len_bytes: usize },
    #[error("OpenSSL client context: {0}")]
    Context(#[from] openssl::error::ErrorStack),
}

/// A client context with the TLS PSK for one host and subsystem: what `nvme connect --tls`
/// puts in the keyring, and the TLS settings tlshd uses with it.
pub struct TlsClient {
    ctx: SslContext,
    identity: PskIdentity,
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsClient({})", self.identity)
    }
}

impl TlsClient {
    /// Reads the interchange key in `path` and derives the PSK for `hostnqn` and `subnqn`;
    /// key shares from `groups` (OpenSSL's list syntax; [`GROUPS`] is the Linux host's).
    pub fn from_key_file(
        path: &Path,
        hostnqn: &str,
        subnqn: &str,
        groups: &str,
    ) -> Result<Self, TlsError> {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|source| TlsError::KeyFile { path: path.into(), source })?,
        );
        let key =
            TlsKey::parse(&text).map_err(|source| TlsError::Key { path: path.into(), source })?;
        TlsClient::with_groups(&key, hostnqn, subnqn, groups)
    }

    /// The client for `key`, as host `hostnqn` talking to subsystem `subnqn`, offering the
    /// Linux host's groups.
    pub fn new(key: &TlsKey, hostnqn: &str, subnqn: &str) -> Result<Self, TlsError> {
        TlsClient::with_groups(key, hostnqn, subnqn, GROUPS)
    }

    /// [`TlsClient::new`] offering `groups` (the first gets the key share).
    pub fn with_groups(
        key: &TlsKey,
        hostnqn: &str,
        subnqn: &str,
        groups: &str,
    ) -> Result<Self, TlsError> {
        let derived =
            derive(key, hostnqn, subnqn, IDENTITY_VERSION, ENCODING).map_err(|source| {
                TlsError::Derive { hostnqn: hostnqn.into(), subnqn: subnqn.into(), source }
            })?;
        let identity = derived.identity.to_string();
        if identity.len() > IDENTITY_MAX_BYTES {
            return Err(TlsError::IdentityTooLong { len_bytes: identity.len() });
        }
        let psk = derived.psk;
        let mut b = SslConnector::builder(SslMethod::tls_client())?;
        b.set_min_proto_version(Some(SslVersion::TLS1_3))?;
        b.set_max_proto_version(Some(SslVersion::TLS1_3))?;
        b.set_ciphersuites(CIPHERSUITE)?;
        b.set_groups_list(groups)?;
        b.set_options(SslOptions::NO_TICKET | SslOptions::IGNORE_UNEXPECTED_EOF);
        let id_bytes = identity.into_bytes();
        // TLS 1.3 binds a key from this callback to SHA-256 (TLS_AES_128_GCM_SHA256), as
        // tlshd binds the host's external PSK, whatever the identity's hash.
        b.set_psk_client_callback(move |_ssl, _hint, identity_out, psk_out| {
            let key = psk.expose();
            if id_bytes.len() >= identity_out.len() || key.len() > psk_out.len() {
                return Ok(0);
            }
            identity_out[..id_bytes.len()].copy_from_slice(&id_bytes);
            identity_out[id_bytes.len()] = 0;
            psk_out[..key.len()].copy_from_slice(key);
            Ok(key.len())
        });
        Ok(TlsClient { ctx: b.build().into_context(), identity: derived.identity })
    }

    /// The identity offered in the ClientHello (not secret).
    pub fn identity(&self) -> &PskIdentity {
        &self.identity
    }

    /// The TLS handshake over a connected socket (its timeouts bound it).
    pub(crate) fn connect(&self, tcp: TcpStream) -> crate::Result<Stream> {
        let ssl = Ssl::new(&self.ctx).map_err(|e| crate::Error::Tls(e.to_string()))?;
        let socket = TlsSocket {
            rx: BufReader::with_capacity(SOCKET_READ_BUF_BYTES, tcp),
            pending: Vec::with_capacity(64 * 1024),
        };
        match ssl.connect(socket) {
            Ok(s) => Ok(Stream::Tls(Box::new(s))),
            Err(HandshakeError::WouldBlock(_)) => Err(crate::Error::Timeout),
            Err(HandshakeError::SetupFailure(e)) => Err(crate::Error::Tls(e.to_string())),
            Err(HandshakeError::Failure(mid)) => Err(crate::Error::Tls(mid.error().to_string())),
        }
    }
}

/// The TCP socket under OpenSSL: reads served from a buffer, records written collected until
/// `flush` (OpenSSL's handshake flushes each flight; [`Stream::flush`] each batch after).
#[derive(Debug)]
pub(crate) struct TlsSocket {
    rx: BufReader<TcpStream>,
    /// Records not yet sent; bounded by one batch of PDUs plus record overhead.
    pending: Vec<u8>,
}

impl Read for TlsSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.rx.read(buf)
    }
}

impl Write for TlsSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let r = self.rx.get_mut().write_all(&self.pending);
        self.pending.clear();
        r
    }
}

/// What a queue's connection reads and writes: the socket itself, or TLS over it.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<SslStream<TlsSocket>>),
    /// Plaintext on a socket that reads and writes poll ([`Spinning`]).
    Spin(Spinning),
}

/// A non-blocking socket that reads and writes spin on, as SPDK's perf tool polls its sockets:
/// no sleep and wake-up between a request and its answer. `timeout` is how long one read or
/// write may spin without progress.
pub(crate) struct Spinning {
    pub(crate) tcp: TcpStream,
    pub(crate) timeout: Duration,
}

impl Spinning {
    /// Runs a non-blocking socket operation until it makes progress, spinning (no sleep) for
    /// at most `timeout` while it would block.
    fn spin<T>(&mut self, mut op: impl FnMut(&mut TcpStream) -> io::Result<T>) -> io::Result<T> {
        let mut deadline = None;
        loop {
            match op(&mut self.tcp) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let now = Instant::now();
                    if now >= *deadline.get_or_insert(now + self.timeout) {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no progress on the socket in {:?} of polling", self.timeout),
                        ));
                    }
                    std::hint::spin_loop();
                }
                r => return r,
            }
        }
    }
}

impl Read for Spinning {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.spin(|s| s.read(buf))
    }
}

impl Write for Spinning {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.spin(|s| s.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream {
    /// Sends `out` whole (one batch of PDUs or requests) and empties it, sent or not.
    pub(crate) fn send_batch(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let r = self.write_all(out).and_then(|()| self.flush());
        out.clear();
        r
    }

    /// The TCP socket (for timeouts).
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) | Stream::Spin(Spinning { tcp: s, .. }) => s,
            Stream::Tls(s) => s.get_ref().rx.get_ref(),
        }
    }

    /// Protocol version and cipher suite, for reports; `None` in plaintext.
    pub(crate) fn tls_description(&self) -> Option<String> {
        match self {
            Stream::Plain(_) | Stream::Spin(_) => None,
            Stream::Tls(s) => {
                let ssl = s.ssl();
                let cipher = ssl.current_cipher().map_or("?", |c| c.standard_name().unwrap_or("?"));
                Some(format!("{} {cipher}", ssl.version_str()))
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::Spin(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
            Stream::Spin(s) => s.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(buf),
            Stream::Tls(s) => s.write_all(buf),
            Stream::Spin(s) => s.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(_) | Stream::Spin(_) => Ok(()),
            Stream::Tls(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use ballast_nvmf::psk::{psk_for_identity, PskTransform};
    use ballast_nvmf::secret::SecretBytes;

    use super::*;

    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:6f1c3c52-0b1e-4c52-9d1c-7e1d1a3d0001";
    const SUB: &str = "nqn.2026-11.dev.ballast:vol0";

    /// The identity is the Linux host's (version 0, no digest), and the PSK the client hands
    /// OpenSSL is the one the target's resolver derives for that identity, trying libnvme's
    /// encoding first (target/nvmf/src/tls.rs).
    #[test]
    fn the_linux_hosts_identity_and_the_targets_psk() {
        for (transform, len) in [(PskTransform::Sha256, 32), (PskTransform::Sha384, 48)] {
            let key = TlsKey::new(transform, SecretBytes::new((0..len).collect())).unwrap();
            let client = TlsClient::new(&key, HOST, SUB).unwrap();
            let hh = if len == 32 { "01" } else { "02" };
            assert_eq!(client.identity().to_string(), format!("NVMe0R{hh} {HOST} {SUB}"));
            let host_side = derive(&key, HOST, SUB, 0, Encoding::LibnvmeCompat).unwrap();
            let parsed = PskIdentity::parse(&client.identity().to_string()).unwrap();
            let (encoding, psk) =
                psk_for_identity(&key, &parsed, &[Encoding::LibnvmeCompat, Encoding::Rfc8446])
                    .unwrap();
            assert_eq!(encoding, Encoding::LibnvmeCompat);
            assert!(psk.ct_eq(host_side.psk.expose()));
            assert!(!format!("{client:?}").contains("NVMeTLSkey"));
        }
    }

    #[test]
    fn key_file_errors_name_the_file_not_the_key() {
        let dir = std::env::temp_dir().join(format!("ballast-perf-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.key");
        std::fs::write(&path, "NVMeTLSkey-1:01:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaX:")
            .unwrap();
        let e = TlsClient::from_key_file(&path, HOST, SUB, GROUPS).unwrap_err().to_string();
        assert!(e.contains("bad.key") && e.contains("CRC") && !e.contains("AAEC"), "{e}");
        let missing =
            TlsClient::from_key_file(&dir.join("none.key"), HOST, SUB, GROUPS).unwrap_err();
        assert!(matches!(missing, TlsError::KeyFile { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
