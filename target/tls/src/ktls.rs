//! Kernel TLS offload of an established TLS 1.2 or 1.3 session: what it takes to hand the record
//! layer to the kernel (`ballast_ffi::ktls`) once the handshake is done, so that the socket
//! carries plaintext for us and the connection goes back to its plain receive and send paths
//! (the kernel, or a NIC, encrypts; no copy through OpenSSL's buffers).
//!
//! Owns: the session's application traffic secrets (TLS 1.3: captured from OpenSSL's key-log
//! callback into the session's ex-data, zeroed on drop, never logged or written anywhere;
//! TLS 1.2: the session's master secret), the record counters that say how many records each
//! direction protected since the handshake, and the keys and IVs derived from the secrets
//! (RFC 8446 section 7.3; RFC 5246 section 6.3's key block).
//!
//! Invariants:
//! - a session is handed over only at a record boundary in both directions: every ciphertext
//!   byte received was consumed, every one produced was sent, nothing decrypted is waiting;
//!   the kernel then starts at the next record's sequence number in each direction;
//! - only TLS 1.2 or 1.3 with one of the kernel's AEADs (AES-GCM, ChaCha20-Poly1305) is
//!   handed over; anything else stays in userspace for its whole life (never an error);
//! - once the kernel says it has no TLS, no later session tries again (one log line).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use parking_lot::Mutex;

use ballast_ffi::ktls::{self as sys, KtlsCipher, KtlsError, KtlsKeys, KtlsVersion};
use hkdf::Hkdf;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use openssl::ex_data::Index;
use openssl::ssl::{Ssl, SslRef, SslVersion};
use sha2::{Sha256, Sha384};
use zeroize::Zeroizing;

/// A TLS record header: type, legacy version, length.
const HEADER: usize = 5;

/// Counts the TLS records of one direction of a byte stream, as it passes in pieces.
#[derive(Debug, Default, Clone)]
pub struct RecordCounter {
    records: u64,
    header: [u8; HEADER],
    /// Header bytes seen of the record under way (0 at a boundary).
    header_seen: usize,
    /// Body bytes still to come of the record under way.
    body_left: usize,
    /// Body bytes seen of the record under way (up to the first eight).
    body_seen: usize,
    /// The first eight body bytes of the record under way, then of the last whole one: in a
    /// TLS 1.2 AES-GCM record, its explicit nonce.
    prefix: [u8; 8],
    last_prefix: [u8; 8],
}

impl RecordCounter {
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                if self.body_seen < 8 {
                    let k = n.min(8 - self.body_seen);
                    self.prefix[self.body_seen..self.body_seen + k].copy_from_slice(&bytes[..k]);
                }
                self.body_seen += n;
                self.body_left -= n;
                bytes = &bytes[n..];
                if self.body_left == 0 {
                    self.end_record();
                }
                continue;
            }
            let n = (HEADER - self.header_seen).min(bytes.len());
            self.header[self.header_seen..self.header_seen + n].copy_from_slice(&bytes[..n]);
            self.header_seen += n;
            bytes = &bytes[n..];
            if self.header_seen == HEADER {
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.body_seen = 0;
                self.prefix = [0; 8];
                if self.body_left == 0 {
                    self.end_record();
                }
            }
        }
    }

    fn end_record(&mut self) {
        self.header_seen = 0;
        self.records += 1;
        self.last_prefix = self.prefix;
    }

    /// The first eight body bytes of the last whole record (TLS 1.2 AES-GCM: its explicit
    /// nonce).
    pub fn last_prefix(&self) -> [u8; 8] {
        self.last_prefix
    }

    /// Whole records seen.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// No record is partly seen.
    pub fn at_boundary(&self) -> bool {
        self.header_seen == 0 && self.body_left == 0
    }
}

/// A session's application traffic secrets, as the handshake derives them, until the kernel
/// has the keys or the session will never go there (`forget`).
#[derive(Default)]
pub struct Secrets {
    client: Mutex<Option<Zeroizing<Vec<u8>>>>,
    server: Mutex<Option<Zeroizing<Vec<u8>>>>,
}

impl Secrets {
    /// One key-log line (`LABEL <client random> <secret>`, hex): keeps the first application
    /// traffic secrets, ignores everything else.
    fn record(&self, line: &str) {
        let mut parts = line.split(' ');
        let slot = match parts.next() {
            Some("CLIENT_TRAFFIC_SECRET_0") => &self.client,
            Some("SERVER_TRAFFIC_SECRET_0") => &self.server,
            _ => return,
        };
        let Some(hex) = parts.nth(1) else { return };
        if let Some(secret) = unhex(hex) {
            slot.lock().get_or_insert(secret);
        }
    }

    /// Drops (and zeroes) both secrets: nothing will derive keys from them any more.
    pub(crate) fn forget(&self) {
        self.client.lock().take();
        self.server.lock().take();
    }
}

fn unhex(hex: &str) -> Option<Zeroizing<Vec<u8>>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Zeroizing::new(Vec::with_capacity(hex.len() / 2));
    for pair in hex.as_bytes().chunks(2) {
        out.push(digit(pair[0])? << 4 | digit(pair[1])?);
    }
    Some(out)
}

/// Where sessions that may go to the kernel keep their secrets.
pub(crate) fn secrets_index() -> Index<Ssl, Secrets> {
    static INDEX: OnceLock<Index<Ssl, Secrets>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("OpenSSL ex-data index"))
}

/// The key-log callback every server context installs: only sessions that carry a
/// [`Secrets`] slot (kernel offload wanted) keep anything.
pub(crate) fn on_keylog(ssl: &SslRef, line: &str) {
    if let Some(secrets) = ssl.ex_data(secrets_index()) {
        secrets.record(line);
    }
}

const UNKNOWN: u8 = 0;
const AVAILABLE: u8 = 1;
/// The kernel said it has no TLS.
const UNAVAILABLE: u8 = 2;
/// The operator turned offload off (`serve --kernel-tls off`).
const DISABLED: u8 = 3;
static KERNEL: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether new sessions are prepared for the kernel: offload is on and the kernel has not
/// said it has no TLS. Process-wide, read once per session.
pub fn offload_wanted() -> bool {
    matches!(KERNEL.load(Ordering::Relaxed), UNKNOWN | AVAILABLE)
}

/// Turns kernel TLS off for sessions that start from now on (records stay in OpenSSL).
pub fn disable_offload() {
    KERNEL.store(DISABLED, Ordering::Relaxed);
}

/// RFC 8446 section 7.1's HkdfLabel: `length` (be16), "tls13 " + `label` and `context`,
/// each with a one-byte length.
pub fn hkdf_label(length: u16, label: &str, context: &[u8]) -> Option<Vec<u8>> {
    let full = format!("tls13 {label}");
    let label_len = u8::try_from(full.len()).ok()?;
    let context_len = u8::try_from(context.len()).ok()?;
    let mut info = Vec::with_capacity(4 + full.len() + context.len());
    info.extend_from_slice(&length.to_be_bytes());
    info.push(label_len);
    info.extend_from_slice(full.as_bytes());
    info.push(context_len);
    info.extend_from_slice(context);
    Some(info)
}

#[derive(Debug, Clone, Copy)]
enum Hash {
    Sha256,
    Sha384,
}

/// HKDF-Expand-Label(`secret`, `label`, "", `len`) with the suite's hash.
fn expand_label(hash: Hash, secret: &[u8], label: &str, len: usize) -> Option<Zeroizing<Vec<u8>>> {
    let info = hkdf_label(u16::try_from(len).ok()?, label, b"")?;
    let mut out = Zeroizing::new(vec![0u8; len]);
    let done = match hash {
        Hash::Sha256 => Hkdf::<Sha256>::from_prk(secret).ok()?.expand(&info, &mut out),
        Hash::Sha384 => Hkdf::<Sha384>::from_prk(secret).ok()?.expand(&info, &mut out),
    };
    done.ok()?;
    Some(out)
}

/// One direction's key, IV and next record sequence number.
pub struct DirectionKeys {
    pub key: Zeroizing<Vec<u8>>,
    pub iv: Zeroizing<[u8; 12]>,
    pub seq: u64,
}

impl DirectionKeys {
    fn derive(hash: Hash, cipher: KtlsCipher, secret: &[u8], seq: u64) -> Option<DirectionKeys> {
        let key = expand_label(hash, secret, "key", cipher.key_len())?;
        let iv_bytes = expand_label(hash, secret, "iv", 12)?;
        let mut iv = Zeroizing::new([0u8; 12]);
        iv.copy_from_slice(&iv_bytes);
        Some(DirectionKeys { key, iv, seq })
    }

    fn as_sys(&self) -> KtlsKeys<'_> {
        KtlsKeys { key: &self.key, iv: &self.iv, seq: self.seq }
    }
}

/// What the kernel needs to carry on a session: its AEAD and both directions' keys.
pub struct KernelKeys {
    pub version: KtlsVersion,
    pub cipher: KtlsCipher,
    /// What the peer (the client) sends.
    pub rx: DirectionKeys,
    /// What we send.
    pub tx: DirectionKeys,
}

impl std::fmt::Debug for KernelKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KernelKeys({:?} {:?}, rx seq {}, tx seq {})",
            self.version, self.cipher, self.rx.seq, self.tx.seq
        )
    }
}

/// Why a session will never go to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Version,
    Cipher,
    NoSecrets,
    Tickets,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Version => "neither TLS 1.2 nor 1.3",
            Refusal::Cipher => "a cipher suite the kernel does not offload",
            Refusal::NoSecrets => "the handshake's traffic secrets were not captured",
            Refusal::Tickets => "the session sends tickets",
        })
    }
}

/// Where each direction stands when the session is handed over.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Position {
    /// Records received since the handshake finished.
    pub rx_records: u64,
    /// Records sent since the handshake finished.
    pub tx_records: u64,
    /// The explicit nonce of the last record sent (TLS 1.2 AES-GCM).
    pub tx_last_nonce: [u8; 8],
}

/// The kernel's AEAD and the PRF hash of a cipher suite (RFC 8446 or RFC 5246 name).
fn suite(name: &str) -> Option<(KtlsCipher, Hash)> {
    let cipher = if name.contains("_AES_128_GCM_") {
        KtlsCipher::Aes128Gcm
    } else if name.contains("_AES_256_GCM_") {
        KtlsCipher::Aes256Gcm
    } else if name.contains("_CHACHA20_POLY1305_") {
        KtlsCipher::Chacha20Poly1305
    } else {
        return None;
    };
    let hash = if name.ends_with("_SHA384") {
        Hash::Sha384
    } else if name.ends_with("_SHA256") {
        Hash::Sha256
    } else {
        return None;
    };
    Some((cipher, hash))
}

/// The keys for the kernel from a finished session, where it stands now.
pub(crate) fn kernel_keys(ssl: &SslRef, at: Position) -> Result<KernelKeys, Refusal> {
    // A TLS 1.3 ticket is written under the application key inside the handshake call, before
    // the counting starts: the send sequence would be short by the tickets (nonce reuse).
    // Every ballast context sends none (config.rs); refuse rather than trust it.
    if ssl.num_tickets() != 0 {
        return Err(Refusal::Tickets);
    }
    let name = ssl.current_cipher().and_then(|c| c.standard_name()).ok_or(Refusal::Cipher)?;
    let (cipher, hash) = suite(name).ok_or(Refusal::Cipher)?;
    match ssl.version2() {
        Some(SslVersion::TLS1_3) => {
            let secrets = ssl.ex_data(secrets_index()).ok_or(Refusal::NoSecrets)?;
            let (client, server) = (secrets.client.lock(), secrets.server.lock());
            let (Some(client), Some(server)) = (client.as_ref(), server.as_ref()) else {
                return Err(Refusal::NoSecrets);
            };
            let rx = DirectionKeys::derive(hash, cipher, client, at.rx_records)
                .ok_or(Refusal::NoSecrets)?;
            let tx = DirectionKeys::derive(hash, cipher, server, at.tx_records)
                .ok_or(Refusal::NoSecrets)?;
            Ok(KernelKeys { version: KtlsVersion::Tls13, cipher, rx, tx })
        }
        Some(SslVersion::TLS1_2) => tls12_keys(ssl, cipher, hash, at),
        _ => Err(Refusal::Version),
    }
}

/// TLS 1.2 (RFC 5246 6.3): the key block from the master secret and both randoms; each
/// direction's Finished was record 0 under these keys, so the next is 1 + those since.
fn tls12_keys(
    ssl: &SslRef,
    cipher: KtlsCipher,
    hash: Hash,
    at: Position,
) -> Result<KernelKeys, Refusal> {
    let session = ssl.session().ok_or(Refusal::NoSecrets)?;
    let mut master = Zeroizing::new([0u8; 48]);
    if session.master_key(&mut master[..]) != 48 {
        return Err(Refusal::NoSecrets);
    }
    let (mut client_random, mut server_random) = ([0u8; 32], [0u8; 32]);
    if ssl.client_random(&mut client_random) != 32 || ssl.server_random(&mut server_random) != 32 {
        return Err(Refusal::NoSecrets);
    }
    let key_len = cipher.key_len();
    let iv_len = if cipher == KtlsCipher::Chacha20Poly1305 { 12 } else { 4 };
    let seed = [&server_random[..], &client_random[..]].concat();
    let block = prf(hash, &master[..], b"key expansion", &seed, 2 * key_len + 2 * iv_len);
    let (client_key, rest) = block.split_at(key_len);
    let (server_key, rest) = rest.split_at(key_len);
    let (client_iv, server_iv) = rest.split_at(iv_len);
    let direction = |key: &[u8], implicit: &[u8], explicit: [u8; 8], seq: u64| {
        let mut iv = Zeroizing::new([0u8; 12]);
        iv[..implicit.len()].copy_from_slice(implicit);
        if implicit.len() == 4 {
            iv[4..].copy_from_slice(&explicit);
        }
        DirectionKeys { key: Zeroizing::new(key.to_vec()), iv, seq }
    };
    // OpenSSL counts its explicit nonces up by one per record: the kernel goes on from there.
    let next_nonce = u64::from_be_bytes(at.tx_last_nonce).wrapping_add(1).to_be_bytes();
    Ok(KernelKeys {
        version: KtlsVersion::Tls12,
        cipher,
        rx: direction(client_key, client_iv, [0; 8], 1 + at.rx_records),
        tx: direction(server_key, server_iv, next_nonce, 1 + at.tx_records),
    })
}

/// TLS 1.2's PRF (RFC 5246 5): P_hash(secret, label || seed), `len` bytes.
fn prf(hash: Hash, secret: &[u8], label: &[u8], seed: &[u8], len: usize) -> Zeroizing<Vec<u8>> {
    fn p_hash<M: Mac + KeyInit + Clone>(
        secret: &[u8],
        seed: &[u8],
        len: usize,
        out: &mut Zeroizing<Vec<u8>>,
    ) {
        let mac = <M as KeyInit>::new_from_slice(secret).expect("HMAC takes any key length");
        let mut a = Zeroizing::new(seed.to_vec());
        while out.len() < len {
            let mut m = mac.clone();
            m.update(&a);
            *a = m.finalize().into_bytes().to_vec();
            let mut m = mac.clone();
            m.update(&a);
            m.update(seed);
            out.extend_from_slice(&m.finalize().into_bytes());
        }
        out.truncate(len);
    }
    let seed = [label, seed].concat();
    // Room for whole hash outputs up front: the buffer never moves, so no copy of the key
    // block is left behind unzeroed.
    let mut out = Zeroizing::new(Vec::with_capacity(len + 64));
    match hash {
        Hash::Sha256 => p_hash::<Hmac<Sha256>>(secret, &seed, len, &mut out),
        Hash::Sha384 => p_hash::<Hmac<Sha384>>(secret, &seed, len, &mut out),
    }
    out
}

/// What installing keys on a socket did.
#[derive(Debug)]
pub enum Installed {
    /// The kernel carries the session from here.
    Yes,
    /// The kernel has no TLS, or refused before taking anything: stay in userspace.
    No(KtlsError),
    /// The kernel took the receive keys and refused the send keys: the socket is neither
    /// userspace TLS nor kernel TLS any more; the connection must end.
    Half(KtlsError),
}

impl KernelKeys {
    pub fn install(&self, fd: std::os::fd::RawFd) -> Installed {
        match sys::install(fd, self.version, self.cipher, &self.rx.as_sys(), &self.tx.as_sys()) {
            Ok(()) => {
                let _ = KERNEL.compare_exchange(
                    UNKNOWN,
                    AVAILABLE,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                Installed::Yes
            }
            Err(e @ KtlsError::Unavailable(_)) => {
                if KERNEL
                    .compare_exchange(UNKNOWN, UNAVAILABLE, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    tracing::info!(error = %e, "TLS records stay in userspace (OpenSSL)");
                }
                Installed::No(e)
            }
            Err(e @ KtlsError::Keys { direction: "send", .. }) => Installed::Half(e),
            Err(e) => Installed::No(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        unhex(&s.split_whitespace().collect::<String>()).unwrap().to_vec()
    }

    /// RFC 8448 section 3 (simple 1-RTT handshake): the server's application traffic secret
    /// and the write key and IV derived from it (TLS_AES_128_GCM_SHA256).
    #[test]
    fn rfc8448_application_keys() {
        let secret = hex(
            "a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32 82 04 b4 f4 4b fb 6b 3a 4b 4f 1f 3f
             cb 63 16 43",
        );
        let keys = DirectionKeys::derive(Hash::Sha256, KtlsCipher::Aes128Gcm, &secret, 0).unwrap();
        assert_eq!(*keys.key, hex("9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56"));
        assert_eq!(keys.iv.to_vec(), hex("cf 78 2b 88 dd 83 54 9a ad f1 e9 84"));
        let client = hex(
            "9e 40 64 6c e7 9a 7f 9d c0 5a f8 88 9b ce 65 52 87 5a fa 0b 06 df 00 87 f7 92 eb b7
             c1 75 04 a5",
        );
        let keys = DirectionKeys::derive(Hash::Sha256, KtlsCipher::Aes128Gcm, &client, 0).unwrap();
        assert_eq!(*keys.key, hex("17 42 2d da 59 6e d5 d9 ac d8 90 e3 c6 3f 50 51"));
        assert_eq!(keys.iv.to_vec(), hex("5b 78 92 3d ee 08 57 90 33 e5 23 d9"));
    }

    #[test]
    fn keylog_keeps_only_application_secrets() {
        let s = Secrets::default();
        s.record("CLIENT_HANDSHAKE_TRAFFIC_SECRET 00 aabb");
        s.record("CLIENT_TRAFFIC_SECRET_0 00 0102");
        s.record("SERVER_TRAFFIC_SECRET_0 00 zz");
        assert_eq!(s.client.lock().as_ref().map(|v| v.to_vec()), Some(vec![1, 2]));
        assert!(s.server.lock().is_none(), "bad hex is ignored");
        s.record("CLIENT_TRAFFIC_SECRET_0 00 0304");
        assert_eq!(
            s.client.lock().as_ref().map(|v| v.to_vec()),
            Some(vec![1, 2]),
            "the first is kept"
        );
        s.forget();
        assert!(s.client.lock().is_none() && s.server.lock().is_none());
    }

    fn records(lens: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        for &len in lens {
            out.extend_from_slice(&[23, 3, 3]);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend(std::iter::repeat_n(0xa5, usize::from(len)));
        }
        out
    }

    proptest! {
        /// However the stream is cut, the counter sees the same records and boundaries.
        #[test]
        fn record_counter_is_cut_independent(
            lens in proptest::collection::vec(0u16..2000, 0..8),
            cuts in proptest::collection::vec(1usize..700, 0..40),
        ) {
            let stream = records(&lens);
            let mut counter = RecordCounter::default();
            let mut at = 0;
            for cut in cuts {
                let end = (at + cut).min(stream.len());
                counter.feed(&stream[at..end]);
                at = end;
            }
            counter.feed(&stream[at..]);
            prop_assert_eq!(counter.records(), lens.len() as u64);
            prop_assert!(counter.at_boundary());
            if !stream.is_empty() {
                let mut partial = RecordCounter::default();
                partial.feed(&stream[..stream.len() - 1]);
                prop_assert!(!partial.at_boundary());
                prop_assert_eq!(partial.records(), lens.len() as u64 - 1);
            }
        }
    }
}
