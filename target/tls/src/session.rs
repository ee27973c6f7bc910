//! One server-side TLS session, sans I/O: ciphertext in from the ring's receives, plaintext
//! out to the protocol's parser; plaintext in from the protocol, ciphertext out to the ring's
//! sends. OpenSSL does the handshake and record protection over a memory pipe; nothing here
//! touches a socket, so the connection glue keeps its receives and sends on the core's ring.
//!
//! States: `Handshaking` (until OpenSSL reports the handshake finished) → `Open` (records
//! flow; the peer's identity is known) → `Closed` (the peer sent close_notify, or we did).
//! A failed handshake or a bad record is an error: the connection must end (what OpenSSL
//! queued, an alert, may still be sent).
//!
//! Invariants:
//! - ciphertext leaves in the order OpenSSL produced it (`take_output` drains it whole);
//! - plaintext written before the handshake finishes is held and encrypted as soon as it does,
//!   in order (a protocol may queue a reply while the handshake ends);
//! - input is held only as the buffer the last receive filled: the glue feeds a new one only
//!   once `wants_input` says the last is consumed, so ciphertext held is bounded by one receive.

use std::io::{self, Read, Write};

use ballast_ffi::IoBuf;
use openssl::ssl::{ErrorCode, Ssl, SslStream};

use crate::config::{identity_of, Identity, TlsServer};
use crate::ktls::{self, KernelKeys, Position, RecordCounter, Refusal};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    #[error("TLS record error: {0}")]
    Record(String),
    #[error("TLS session setup: {0}")]
    Setup(String),
}

/// The memory both directions go through.
#[derive(Default)]
struct Pipe {
    /// The last receive's buffer and how far OpenSSL has read it.
    input: Option<IoBuf>,
    input_pos: usize,
    /// Ciphertext OpenSSL wrote, not yet taken.
    output: Vec<u8>,
    /// Records OpenSSL read and wrote, counted only for a session that may go to the kernel
    /// (see `ktls`).
    counters: Option<Counters>,
}

#[derive(Default)]
struct Counters {
    rx: RecordCounter,
    tx: RecordCounter,
    /// Records each way when the handshake finished (rx, tx).
    at_open: Option<(u64, u64)>,
}

impl Read for Pipe {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let Some(buf) = &self.input else { return Err(io::ErrorKind::WouldBlock.into()) };
        let rest = &buf.as_slice()[self.input_pos..];
        if rest.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = rest.len().min(out.len());
        out[..n].copy_from_slice(&rest[..n]);
        self.input_pos += n;
        if let Some(c) = &mut self.counters {
            c.rx.feed(&out[..n]);
        }
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(bytes);
        if let Some(c) = &mut self.counters {
            c.tx.feed(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The handshake is under way.
    Handshaking,
    /// Application data flows both ways.
    Open,
    /// close_notify was received or sent: nothing more is read.
    Closed,
}

/// Whether a session's record layer can go to the kernel.
#[derive(Debug)]
pub enum Handoff {
    /// Not at this moment (handshake under way, bytes in flight or buffered): ask later.
    NotYet,
    /// Never: the session stays in userspace.
    Never(Refusal),
    /// Now, with these keys.
    Ready(KernelKeys),
}

/// What a `read` produced.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// This many plaintext bytes were written to the front of the buffer.
    Data(usize),
    /// Nothing more until more ciphertext is fed (the handshake may have progressed: take the
    /// output).
    WantInput,
    /// The peer closed the session (close_notify).
    Closed,
}

pub struct TlsSession {
    stream: SslStream<Pipe>,
    state: State,
    /// Plaintext written before the handshake finished.
    early: Vec<u8>,
    identity: Option<Identity>,
    server: TlsServer,
}

impl TlsSession {
    /// A session that waits for the client's hello.
    pub fn accept(server: &TlsServer) -> Result<TlsSession, TlsError> {
        let mut ssl = Ssl::new(&server.ctx).map_err(|e| TlsError::Setup(e.to_string()))?;
        ssl.set_accept_state();
        let offload = ktls::offload_wanted();
        if offload {
            ssl.set_ex_data(ktls::secrets_index(), ktls::Secrets::default());
        }
        let pipe = Pipe { counters: offload.then(Counters::default), ..Pipe::default() };
        let stream = SslStream::new(ssl, pipe).map_err(|e| TlsError::Setup(e.to_string()))?;
        Ok(TlsSession {
            stream,
            state: State::Handshaking,
            early: Vec::new(),
            identity: None,
            server: server.clone(),
        })
    }

    /// Hands over a receive's ciphertext. The previous one must be consumed (`wants_input`).
    pub fn feed(&mut self, buf: IoBuf) {
        assert!(self.wants_input(), "TLS input fed before the last was consumed");
        let pipe = self.stream.get_mut();
        pipe.input = Some(buf);
        pipe.input_pos = 0;
    }

    /// Whether all ciphertext fed so far has been consumed (feed the next receive).
    pub fn wants_input(&self) -> bool {
        let pipe = self.stream.get_ref();
        pipe.input.as_ref().is_none_or(|b| pipe.input_pos == b.len())
    }

    /// The consumed input buffer, for reuse by the next receive.
    pub fn take_spent(&mut self) -> Option<IoBuf> {
        if !self.wants_input() {
            return None;
        }
        let pipe = self.stream.get_mut();
        pipe.input_pos = 0;
        let mut buf = pipe.input.take()?;
        buf.set_len(0);
        Some(buf)
    }

    /// Whether plaintext is ready without more input (decrypted and buffered by OpenSSL, or
    /// ciphertext fed and not yet processed).
    pub fn readable(&self) -> bool {
        self.state != State::Closed && (self.stream.ssl().pending() > 0 || !self.wants_input())
    }

    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Who the peer proved to be (once open).
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// Protocol and cipher, for logs.
    pub fn describe(&self) -> String {
        let ssl = self.stream.ssl();
        let cipher = ssl.current_cipher().map_or("none", |c| c.name());
        format!("{} {}", ssl.version_str(), cipher)
    }

    /// Advances the handshake and decrypts into `out` (non-empty).
    pub fn read(&mut self, out: &mut [u8]) -> Result<ReadOutcome, TlsError> {
        assert!(!out.is_empty(), "TLS read into an empty buffer");
        if self.state == State::Closed {
            return Ok(ReadOutcome::Closed);
        }
        if self.state == State::Handshaking {
            self.handshake()?;
            if self.state == State::Handshaking {
                return Ok(ReadOutcome::WantInput);
            }
        }
        let result = self.stream.ssl_read(out);
        match result {
            Ok(n) => Ok(ReadOutcome::Data(n)),
            Err(e) => match e.code() {
                ErrorCode::WANT_READ => Ok(ReadOutcome::WantInput),
                ErrorCode::ZERO_RETURN => {
                    self.state = State::Closed;
                    Ok(ReadOutcome::Closed)
                }
                _ if self.state == State::Handshaking => Err(TlsError::Handshake(describe(&e))),
                _ => Err(TlsError::Record(describe(&e))),
            },
        }
    }

    /// Advances the handshake with the ciphertext fed — the costly part of TLS (key exchange,
    /// signatures), which the link may run off the core — and reads no application data: it
    /// ends exactly after the client's Finished, so the records counted from there are the
    /// application's (see `handoff`). Ok also when it needs more input.
    pub fn handshake(&mut self) -> Result<(), TlsError> {
        if self.state != State::Handshaking {
            return Ok(());
        }
        match self.stream.do_handshake() {
            Ok(()) => self.check_open(),
            Err(e) if e.code() == ErrorCode::WANT_READ => Ok(()),
            Err(e) => Err(TlsError::Handshake(describe(&e))),
        }
    }

    pub fn is_handshaking(&self) -> bool {
        self.state == State::Handshaking
    }

    /// Encrypts `plain` (held until the handshake finishes if it has not).
    pub fn write(&mut self, plain: &[u8]) -> Result<(), TlsError> {
        match self.state {
            State::Handshaking => {
                self.early.extend_from_slice(plain);
                Ok(())
            }
            State::Open => self.write_all(plain),
            State::Closed => Err(TlsError::Record("write after the session closed".into())),
        }
    }

    fn write_all(&mut self, mut plain: &[u8]) -> Result<(), TlsError> {
        while !plain.is_empty() {
            let n = self.stream.ssl_write(plain).map_err(|e| TlsError::Record(describe(&e)))?;
            plain = &plain[n..];
        }
        Ok(())
    }

    /// Ciphertext ready to send, if any: `f` gets all of it, then it is gone.
    pub fn take_output(&mut self, f: impl FnOnce(&[u8])) {
        let out = &mut self.stream.get_mut().output;
        if !out.is_empty() {
            f(out);
            out.clear();
        }
    }

    pub fn has_output(&self) -> bool {
        !self.stream.get_ref().output.is_empty()
    }

    /// Queues close_notify (sent with the next output); reads end.
    pub fn close(&mut self) {
        if self.state == State::Open {
            let _ = self.stream.shutdown();
        }
        self.state = State::Closed;
    }

    /// Whether the record layer can go to the kernel now ([`Handoff::Ready`] with its keys):
    /// open, everything fed consumed and everything decrypted read, no ciphertext left to
    /// take, both directions at a record boundary. The caller must also have sent all it took.
    pub fn handoff(&self) -> Handoff {
        let Some(c) = &self.stream.get_ref().counters else {
            return Handoff::Never(Refusal::NoSecrets);
        };
        let Some((rx_at_open, tx_at_open)) = c.at_open else { return Handoff::NotYet };
        if self.state != State::Open
            || !self.wants_input()
            || self.stream.ssl().pending() > 0
            || self.has_output()
            || !c.rx.at_boundary()
            || !c.tx.at_boundary()
        {
            return Handoff::NotYet;
        }
        let at = Position {
            rx_records: c.rx.records() - rx_at_open,
            tx_records: c.tx.records() - tx_at_open,
            tx_last_nonce: c.tx.last_prefix(),
        };
        match ktls::kernel_keys(self.stream.ssl(), at) {
            Ok(keys) => Handoff::Ready(keys),
            Err(refusal) => Handoff::Never(refusal),
        }
    }

    /// The session will not go to the kernel (or already has its keys): its captured traffic
    /// secrets are dropped and zeroed now rather than with the session.
    pub fn forget_secrets(&self) {
        if let Some(secrets) = self.stream.ssl().ex_data(ktls::secrets_index()) {
            secrets.forget();
        }
    }

    fn check_open(&mut self) -> Result<(), TlsError> {
        if self.state == State::Handshaking && self.stream.ssl().is_init_finished() {
            self.state = State::Open;
            self.identity = Some(identity_of(self.stream.ssl(), self.server.psk_identity));
            if let Some(c) = &mut self.stream.get_mut().counters {
                c.at_open = Some((c.rx.records(), c.tx.records()));
            }
            let early = std::mem::take(&mut self.early);
            self.write_all(&early)?;
        }
        Ok(())
    }
}

/// An OpenSSL error as text (library reason strings only: never key material).
fn describe(e: &openssl::ssl::Error) -> String {
    match e.ssl_error() {
        Some(stack) => stack.to_string(),
        None => match e.io_error() {
            Some(io) => io.to_string(),
            None => format!("{:?}", e.code()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;
    use crate::ktls::DirectionKeys;
    use ballast_ffi::ktls::{KtlsCipher, KtlsVersion};
    use ballast_ffi::tls_psk::{set_psk_use_session, ExternalPsk, PskHash};
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};
    use std::os::unix::fs::PermissionsExt;

    fn psk_server(tag: &str) -> TlsServer {
        let path = std::env::temp_dir().join(format!("ballast-tls-{tag}-{}", std::process::id()));
        std::fs::write(&path, "alice:000102030405060708090a0b0c0d0e0f\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let server =
            TlsServer::new(&ServerConfig { psk: Some(path.clone()), ..Default::default() });
        std::fs::remove_file(&path).unwrap();
        server.unwrap()
    }

    /// An OpenSSL client over a memory pipe, offering `key` for identity "alice".
    fn client(key: Vec<u8>) -> SslStream<Pipe> {
        client_with(key, |_| {})
    }

    fn client_with(
        key: Vec<u8>,
        setup: impl FnOnce(&mut openssl::ssl::SslConnectorBuilder),
    ) -> SslStream<Pipe> {
        let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
        b.set_verify(SslVerifyMode::NONE);
        setup(&mut b);
        b.set_psk_client_callback(move |_, _, id, psk| {
            id[..6].copy_from_slice(b"alice\0");
            psk[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        let mut ssl = Ssl::new(&b.build().into_context()).unwrap();
        ssl.set_connect_state();
        SslStream::new(ssl, Pipe::default()).unwrap()
    }

    /// Appends `bytes` to what the client has not read yet.
    fn give(client: &mut SslStream<Pipe>, bytes: &[u8]) {
        let pipe = client.get_mut();
        let mut all = pipe.input.take().map(|b| b.as_slice()[pipe.input_pos..].to_vec());
        let all = all.get_or_insert_with(Vec::new);
        all.extend_from_slice(bytes);
        pipe.input = Some(to_iobuf(all));
        pipe.input_pos = 0;
    }

    fn to_iobuf(bytes: &[u8]) -> IoBuf {
        let mut b = IoBuf::with_capacity(bytes.len().max(1));
        b.extend_from_slice(bytes);
        b
    }

    /// Moves bytes both ways until neither side has anything to say; returns the plaintext
    /// the server read.
    fn pump(server: &mut TlsSession, client: &mut SslStream<Pipe>) -> Result<Vec<u8>, TlsError> {
        let mut got = Vec::new();
        for _ in 0..20 {
            let _ = client.do_handshake();
            let c2s = std::mem::take(&mut client.get_mut().output);
            if !c2s.is_empty() {
                server.feed(to_iobuf(&c2s));
            }
            let mut buf = [0u8; 64];
            while let ReadOutcome::Data(n) = server.read(&mut buf)? {
                got.extend_from_slice(&buf[..n]);
            }
            let mut s2c = Vec::new();
            server.take_output(|b| s2c.extend_from_slice(b));
            if s2c.is_empty() && c2s.is_empty() {
                break;
            }
            give(client, &s2c);
        }
        Ok(got)
    }

    #[test]
    fn psk_handshake_then_data_both_ways_in_order() {
        let server_cfg = psk_server("ok");
        let mut s = TlsSession::accept(&server_cfg).unwrap();
        let mut c = client((0u8..16).collect());
        s.write(b"early reply ").unwrap();
        pump(&mut s, &mut c).unwrap();
        assert!(s.is_open());
        assert_eq!(s.identity(), Some(&Identity::Psk("alice".into())));
        assert!(s.describe().starts_with("TLSv1.3"), "{}", s.describe());
        c.ssl_write(b"hello over tls, a bit longer than one read buffer of 64 bytes.....").unwrap();
        let got = pump(&mut s, &mut c).unwrap();
        assert_eq!(
            &got[..],
            &b"hello over tls, a bit longer than one read buffer of 64 bytes....."[..]
        );
        s.write(b"and back").unwrap();
        let mut s2c = Vec::new();
        s.take_output(|b| s2c.extend_from_slice(b));
        give(&mut c, &s2c);
        let mut back = Vec::new();
        while back.len() < 20 {
            let mut buf = [0u8; 64];
            let n = c.ssl_read(&mut buf).unwrap();
            back.extend_from_slice(&buf[..n]);
        }
        assert_eq!(&back[..], b"early reply and back");
        s.close();
        assert!(s.is_closed() && s.has_output());
    }

    /// One TLS 1.3 record as the kernel would protect it with `keys` (RFC 8446 5.2).
    fn seal(keys: &DirectionKeys, seq: u64, plain: &[u8]) -> Vec<u8> {
        let mut inner = plain.to_vec();
        inner.push(23);
        let len = u16::try_from(inner.len() + 16).unwrap();
        let mut header = vec![23, 3, 3];
        header.extend_from_slice(&len.to_be_bytes());
        let mut tag = [0u8; 16];
        let body = encrypt_aead(
            Cipher::aes_128_gcm(),
            &keys.key,
            Some(&nonce(keys, seq)),
            &header,
            &inner,
            &mut tag,
        )
        .unwrap();
        [header, body, tag.to_vec()].concat()
    }

    /// The plaintext of one record protected with `keys` at `seq`, as the kernel would read it.
    fn open(keys: &DirectionKeys, seq: u64, record: &[u8]) -> Vec<u8> {
        open_with(Cipher::aes_128_gcm(), keys, seq, record)
    }

    fn open_with(cipher: Cipher, keys: &DirectionKeys, seq: u64, record: &[u8]) -> Vec<u8> {
        let (header, rest) = record.split_at(5);
        let (body, tag) = rest.split_at(rest.len() - 16);
        let mut inner = decrypt_aead(cipher, &keys.key, Some(&nonce(keys, seq)), header, body, tag)
            .expect("the record opens with the handed-over keys");
        assert_eq!(inner.pop(), Some(23), "application data");
        inner
    }

    fn nonce(keys: &DirectionKeys, seq: u64) -> [u8; 12] {
        let mut n = *keys.iv;
        for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    /// The keys and sequence numbers a session hands to the kernel are the ones its peer
    /// uses: records sealed with them open at the client and the client's open with them.
    #[test]
    fn handoff_keys_continue_the_session_both_ways() {
        let server_cfg = psk_server("kt");
        let mut s = TlsSession::accept(&server_cfg).unwrap();
        let mut c = client((0u8..16).collect());
        assert!(matches!(s.handoff(), Handoff::NotYet), "not before the handshake");
        s.write(b"early reply").unwrap();
        pump(&mut s, &mut c).unwrap();
        c.ssl_write(b"one").unwrap();
        c.ssl_write(b"two").unwrap();
        assert_eq!(pump(&mut s, &mut c).unwrap(), b"onetwo");
        let mut early = [0u8; 32];
        let n = c.ssl_read(&mut early).unwrap();
        assert_eq!(&early[..n], b"early reply");
        let Handoff::Ready(keys) = s.handoff() else { panic!("not ready: {:?}", s.handoff()) };
        assert_eq!((keys.cipher, keys.rx.seq, keys.tx.seq), (KtlsCipher::Aes128Gcm, 2, 1));
        // The client goes on; the "kernel" reads what it sends and writes to it.
        c.ssl_write(b"after the handoff").unwrap();
        let record = std::mem::take(&mut c.get_mut().output);
        assert_eq!(open(&keys.rx, keys.rx.seq, &record), b"after the handoff");
        give(&mut c, &seal(&keys.tx, keys.tx.seq, b"from the kernel"));
        let n = c.ssl_read(&mut early).unwrap();
        assert_eq!(&early[..n], b"from the kernel");
    }

    /// TLS 1.2 records as the kernel writes and reads them (RFC 5288, RFC 7905): AES-GCM with
    /// the explicit nonce in the record, ChaCha20-Poly1305 with the IV xor the sequence.
    struct Tls12 {
        cipher: Cipher,
        gcm: bool,
    }

    impl Tls12 {
        fn nonce_and_aad(
            &self,
            keys: &DirectionKeys,
            seq: u64,
            explicit: [u8; 8],
            len: usize,
        ) -> ([u8; 12], Vec<u8>) {
            let mut n = *keys.iv;
            if self.gcm {
                n[4..].copy_from_slice(&explicit);
            } else {
                for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
                    *b ^= s;
                }
            }
            let mut aad = seq.to_be_bytes().to_vec();
            aad.extend_from_slice(&[23, 3, 3]);
            aad.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
            (n, aad)
        }

        fn seal(&self, keys: &DirectionKeys, seq: u64, explicit: [u8; 8], plain: &[u8]) -> Vec<u8> {
            let (nonce, aad) = self.nonce_and_aad(keys, seq, explicit, plain.len());
            let mut tag = [0u8; 16];
            let body =
                encrypt_aead(self.cipher, &keys.key, Some(&nonce), &aad, plain, &mut tag).unwrap();
            let prefix = if self.gcm { explicit.to_vec() } else { Vec::new() };
            let len = u16::try_from(prefix.len() + body.len() + 16).unwrap();
            let mut record = vec![23, 3, 3];
            record.extend_from_slice(&len.to_be_bytes());
            [record, prefix, body, tag.to_vec()].concat()
        }

        fn open(&self, keys: &DirectionKeys, seq: u64, record: &[u8]) -> Vec<u8> {
            let mut body = &record[5..];
            let mut explicit = [0u8; 8];
            if self.gcm {
                explicit.copy_from_slice(&body[..8]);
                body = &body[8..];
            }
            let (ct, tag) = body.split_at(body.len() - 16);
            let (nonce, aad) = self.nonce_and_aad(keys, seq, explicit, ct.len());
            decrypt_aead(self.cipher, &keys.key, Some(&nonce), &aad, ct, tag)
                .expect("the record opens with the handed-over keys")
        }
    }

    /// TLS 1.2 sessions hand over too: the key block, the sequence numbers after each side's
    /// Finished, and (AES-GCM) the explicit nonce after OpenSSL's last.
    #[test]
    fn tls12_handoff_keys_continue_the_session_both_ways() {
        let cases = [
            ("PSK-AES128-GCM-SHA256", KtlsCipher::Aes128Gcm, Cipher::aes_128_gcm(), true),
            ("PSK-AES256-GCM-SHA384", KtlsCipher::Aes256Gcm, Cipher::aes_256_gcm(), true),
            (
                "ECDHE-PSK-CHACHA20-POLY1305",
                KtlsCipher::Chacha20Poly1305,
                Cipher::chacha20_poly1305(),
                false,
            ),
        ];
        for (suite, want, cipher, gcm) in cases {
            let server_cfg = psk_server("kt12");
            let mut s = TlsSession::accept(&server_cfg).unwrap();
            let mut c = client_with((0u8..16).collect(), |b| {
                b.set_max_proto_version(Some(openssl::ssl::SslVersion::TLS1_2)).unwrap();
                b.set_cipher_list(suite).unwrap();
            });
            s.write(b"early").unwrap();
            pump(&mut s, &mut c).unwrap();
            c.ssl_write(b"ping").unwrap();
            assert_eq!(pump(&mut s, &mut c).unwrap(), b"ping", "{suite}");
            let mut buf = [0u8; 64];
            assert_eq!(c.ssl_read(&mut buf).unwrap(), 5);
            // One more record from OpenSSL, taken here to see its explicit nonce.
            s.write(b"last").unwrap();
            let mut last = Vec::new();
            s.take_output(|b| last.extend_from_slice(b));
            give(&mut c, &last);
            assert_eq!(c.ssl_read(&mut buf).unwrap(), 4);
            let Handoff::Ready(keys) = s.handoff() else { panic!("{suite}: {:?}", s.handoff()) };
            assert_eq!((keys.version, keys.cipher), (KtlsVersion::Tls12, want), "{suite}");
            assert_eq!((keys.rx.seq, keys.tx.seq), (2, 3), "{suite}: Finished, then the records");
            if gcm {
                let used = u64::from_be_bytes(last[5..13].try_into().unwrap());
                let next = u64::from_be_bytes(keys.tx.iv[4..].try_into().unwrap());
                assert_eq!(next, used.wrapping_add(1), "{suite}: the kernel's first nonce is new");
            }
            let t = Tls12 { cipher, gcm };
            c.ssl_write(b"after the handoff").unwrap();
            let record = std::mem::take(&mut c.get_mut().output);
            assert_eq!(t.open(&keys.rx, keys.rx.seq, &record), b"after the handoff", "{suite}");
            let mut explicit = [0u8; 8];
            explicit.copy_from_slice(&keys.tx.iv[4..]);
            give(&mut c, &t.seal(&keys.tx, keys.tx.seq, explicit, b"from the kernel"));
            let n = c.ssl_read(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"from the kernel", "{suite}");
        }
    }

    /// A resolver server and a key bound to SHA-384: a client that binds it so and offers
    /// only TLS_AES_256_GCM_SHA384 (SPDK's initiator) gets that suite; one that binds it to
    /// SHA-256 through OpenSSL's PSK callback and offers the SHA-256 suites (how the Linux
    /// host's tlshd does it) gets one of those; a wrong key fails either way.
    #[test]
    fn sha384_keys_serve_both_kinds_of_clients() {
        let key: Vec<u8> = (0u8..48).collect();
        let k = key.clone();
        let server_cfg = TlsServer::with_psk_resolver(move |id| {
            (id == "alice").then(|| (crate::Key::new(k.clone()), PskHash::Sha384))
        })
        .unwrap();
        let spdk_like = |key: Vec<u8>| {
            client_with(Vec::new(), move |b| {
                b.set_ciphersuites("TLS_AES_256_GCM_SHA384").unwrap();
                b.set_min_proto_version(Some(openssl::ssl::SslVersion::TLS1_3)).unwrap();
                let psk = ExternalPsk { key: zeroize::Zeroizing::new(key), hash: PskHash::Sha384 };
                set_psk_use_session(b, b"alice", psk).unwrap();
            })
        };
        let mut s = TlsSession::accept(&server_cfg).unwrap();
        let mut c = spdk_like(key.clone());
        pump(&mut s, &mut c).unwrap();
        assert!(s.is_open());
        assert_eq!(s.describe(), "TLSv1.3 TLS_AES_256_GCM_SHA384");
        assert_eq!(s.identity(), Some(&Identity::Psk("alice".into())));
        let Handoff::Ready(keys) = s.handoff() else { panic!("{:?}", s.handoff()) };
        assert_eq!(keys.cipher, KtlsCipher::Aes256Gcm);
        c.ssl_write(b"sha384").unwrap();
        let record = std::mem::take(&mut c.get_mut().output);
        assert_eq!(open_with(Cipher::aes_256_gcm(), &keys.rx, 0, &record), b"sha384");

        let mut s = TlsSession::accept(&server_cfg).unwrap();
        let mut c = client(key.clone());
        pump(&mut s, &mut c).unwrap();
        assert!(s.is_open(), "OpenSSL's PSK callback (SHA-256 binder) still works");
        assert!(!s.describe().contains("SHA384"), "{}", s.describe());

        let mut s = TlsSession::accept(&server_cfg).unwrap();
        let mut c = spdk_like(vec![7u8; 48]);
        assert!(matches!(pump(&mut s, &mut c), Err(TlsError::Handshake(_))));
    }

    /// A server with a certificate and a PSK file: a client that offers identity "alice" with
    /// a key it does not have, and only a suite her (SHA-256) key cannot serve, is not
    /// "alice" — OpenSSL asked for her key, then dropped the PSK unchecked and finished the
    /// handshake on the certificate (found by a review: `--nbd-tls-allow vol=alice` let it in).
    #[test]
    fn a_psk_identity_counts_only_when_the_psk_was_used() {
        use openssl::asn1::Asn1Time;
        use openssl::bn::BigNum;
        use openssl::ec::{EcGroup, EcKey};
        use openssl::hash::MessageDigest;
        use openssl::nid::Nid;
        use openssl::pkey::PKey;
        use openssl::x509::{X509NameBuilder, X509};
        let dir = std::env::temp_dir().join(format!("ballast-tls-spoof-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_nid(Nid::COMMONNAME, "server").unwrap();
        let name = name.build();
        let mut x = X509::builder().unwrap();
        x.set_version(2).unwrap();
        x.set_serial_number(&BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap()).unwrap();
        x.set_subject_name(&name).unwrap();
        x.set_issuer_name(&name).unwrap();
        x.set_pubkey(&key).unwrap();
        x.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
        x.set_not_after(&Asn1Time::days_from_now(1).unwrap()).unwrap();
        x.sign(&key, MessageDigest::sha256()).unwrap();
        let private = |path: &std::path::Path, bytes: &[u8]| {
            std::fs::write(path, bytes).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        let (cert, key_file, psk) = (dir.join("cert.pem"), dir.join("key.pem"), dir.join("psk"));
        private(&cert, &x.build().to_pem().unwrap());
        private(&key_file, &key.private_key_to_pem_pkcs8().unwrap());
        private(&psk, b"alice:000102030405060708090a0b0c0d0e0f\n");
        let server = TlsServer::new(&ServerConfig {
            cert: Some(cert),
            key: Some(key_file),
            psk: Some(psk),
            ..Default::default()
        })
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let mut s = TlsSession::accept(&server).unwrap();
        let mut c = client_with(vec![0x55; 16], |b| {
            b.set_ciphersuites("TLS_AES_256_GCM_SHA384").unwrap();
            b.set_min_proto_version(Some(openssl::ssl::SslVersion::TLS1_3)).unwrap();
        });
        let outcome = pump(&mut s, &mut c);
        assert_ne!(
            s.identity(),
            Some(&Identity::Psk("alice".into())),
            "a PSK identity without its key ({outcome:?})"
        );
        // Her key, on a suite it serves: "alice".
        let mut s = TlsSession::accept(&server).unwrap();
        let mut c = client((0u8..16).collect());
        pump(&mut s, &mut c).unwrap();
        assert_eq!(s.identity(), Some(&Identity::Psk("alice".into())));
    }

    /// Half a record fed, or ciphertext not yet taken: not a moment to hand over.
    #[test]
    fn no_handoff_mid_record_or_with_output_pending() {
        let server_cfg = psk_server("kt2");
        let mut s = TlsSession::accept(&server_cfg).unwrap();
        let mut c = client((0u8..16).collect());
        pump(&mut s, &mut c).unwrap();
        assert!(matches!(s.handoff(), Handoff::Ready(_)));
        c.ssl_write(b"split me").unwrap();
        let record = std::mem::take(&mut c.get_mut().output);
        s.feed(to_iobuf(&record[..7]));
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).unwrap(), ReadOutcome::WantInput);
        assert!(matches!(s.handoff(), Handoff::NotYet), "mid-record");
        s.feed(to_iobuf(&record[7..]));
        assert_eq!(s.read(&mut buf).unwrap(), ReadOutcome::Data(8));
        assert!(matches!(s.handoff(), Handoff::Ready(_)));
        s.write(b"reply").unwrap();
        assert!(matches!(s.handoff(), Handoff::NotYet), "ciphertext not taken yet");
        s.take_output(|_| {});
        let Handoff::Ready(keys) = s.handoff() else { panic!("not ready") };
        assert_eq!((keys.rx.seq, keys.tx.seq), (1, 1));
    }

    #[test]
    fn wrong_key_fails_the_handshake() {
        let server_cfg = psk_server("bad");
        let mut s = TlsSession::accept(&server_cfg).unwrap();
        let mut c = client(vec![9u8; 16]);
        let err = pump(&mut s, &mut c).unwrap_err();
        assert!(matches!(err, TlsError::Handshake(_)), "{err}");
        assert!(!s.is_open());
        assert!(s.identity().is_none());
    }
}
