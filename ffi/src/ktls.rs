//! Kernel TLS (kTLS): handing an established TLS 1.2 or 1.3 session's record layer to the
//! kernel, so
//! that the socket's receives return plaintext and its sends take plaintext (the kernel
//! encrypts, or a NIC does). The handshake stays in userspace; this module only installs the
//! traffic keys the handshake produced.
//!
//! Invariants:
//! - `install` sets the `tls` upper-layer protocol, then the receive keys, then the send keys;
//!   the caller must have consumed every ciphertext byte the socket delivered and sent every
//!   ciphertext byte it produced, and pass the record sequence numbers reached in each
//!   direction, or the stream is corrupted (the AEAD makes that an error, never silent);
//! - the key copies made for the kernel are zeroed once handed over.

use std::os::fd::{BorrowedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::setsockopt;
use nix::sys::socket::sockopt::{TcpTlsRx, TcpTlsTx, TcpUlp, TlsCryptoInfo};

/// The AEAD a TLS session negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KtlsCipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl KtlsCipher {
    pub fn key_len(self) -> usize {
        match self {
            KtlsCipher::Aes128Gcm => 16,
            KtlsCipher::Aes256Gcm | KtlsCipher::Chacha20Poly1305 => 32,
        }
    }
}

/// The TLS version whose record format the kernel speaks on the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KtlsVersion {
    Tls12,
    Tls13,
}

impl KtlsVersion {
    fn wire(self) -> u16 {
        match self {
            KtlsVersion::Tls12 => 0x0303,
            KtlsVersion::Tls13 => 0x0304,
        }
    }
}

/// One direction's record protection: the write key, a 12-byte IV and the sequence number of
/// the next record. TLS 1.3 and ChaCha20-Poly1305: the write IV (RFC 8446 7.3, RFC 7905).
/// TLS 1.2 AES-GCM (RFC 5288): the 4-byte implicit salt, then the explicit nonce of the next
/// record we send (the kernel counts on from it; unused for receiving).
pub struct KtlsKeys<'a> {
    pub key: &'a [u8],
    pub iv: &'a [u8; 12],
    pub seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    /// The kernel has no TLS upper-layer protocol (CONFIG_TLS off or the module missing).
    #[error("kernel TLS is not available here (setting TCP_ULP \"tls\": {0})")]
    Unavailable(Errno),
    /// This socket could not take the TLS upper-layer protocol (not the kernel's lack of it).
    #[error("kernel TLS: setting TCP_ULP \"tls\" on this socket: {0}")]
    Ulp(Errno),
    #[error("kernel TLS refused the {direction} keys: {errno}")]
    Keys { direction: &'static str, errno: Errno },
    #[error("kernel TLS: a {cipher:?} key must be {want} bytes, not {got}")]
    KeyLength { cipher: KtlsCipher, want: usize, got: usize },
}

/// Hands the record layer of the TLS session on `fd` to the kernel: `rx` protects what the
/// peer sends, `tx` what we send. The key copies made for the kernel are wiped after each
/// `setsockopt` (the caller's own keys stay in its zeroizing buffers).
pub fn install(
    fd: RawFd,
    version: KtlsVersion,
    cipher: KtlsCipher,
    rx: &KtlsKeys<'_>,
    tx: &KtlsKeys<'_>,
) -> Result<(), KtlsError> {
    for keys in [rx, tx] {
        if keys.key.len() != cipher.key_len() {
            return Err(KtlsError::KeyLength {
                cipher,
                want: cipher.key_len(),
                got: keys.key.len(),
            });
        }
    }
    // SAFETY: the caller owns `fd`, an open socket, for the duration of this call; the
    // borrow does not outlive it.
    let sock = unsafe { BorrowedFd::borrow_raw(fd) };
    setsockopt(&sock, TcpUlp::default(), b"tls").map_err(ulp_error)?;
    let mut info = crypto_info(version, cipher, rx);
    let result = setsockopt(&sock, TcpTlsRx, &info);
    wipe(&mut info);
    result.map_err(|errno| KtlsError::Keys { direction: "receive", errno })?;
    let mut info = crypto_info(version, cipher, tx);
    let result = setsockopt(&sock, TcpTlsTx, &info);
    wipe(&mut info);
    result.map_err(|errno| KtlsError::Keys { direction: "send", errno })
}

/// What a failed `TCP_ULP "tls"` says: that the kernel has no TLS, or only that this socket
/// could not take it (ENOTCONN: the peer already left).
fn ulp_error(errno: Errno) -> KtlsError {
    match errno {
        Errno::ENOENT | Errno::EOPNOTSUPP | Errno::ENOPROTOOPT => KtlsError::Unavailable(errno),
        errno => KtlsError::Ulp(errno),
    }
}

/// The kernel's `tls12_crypto_info_*`: the IV's first four bytes are the "salt", the other
/// eight the "iv"; ChaCha20-Poly1305 takes all twelve as its iv.
fn crypto_info(version: KtlsVersion, cipher: KtlsCipher, keys: &KtlsKeys<'_>) -> TlsCryptoInfo {
    let seq = keys.seq.to_be_bytes();
    match cipher {
        KtlsCipher::Aes128Gcm => {
            let mut c = libc::tls12_crypto_info_aes_gcm_128 {
                info: libc::tls_crypto_info {
                    version: version.wire(),
                    cipher_type: libc::TLS_CIPHER_AES_GCM_128,
                },
                iv: [0; 8],
                key: [0; 16],
                salt: [0; 4],
                rec_seq: seq,
            };
            c.key.copy_from_slice(keys.key);
            c.salt.copy_from_slice(&keys.iv[..4]);
            c.iv.copy_from_slice(&keys.iv[4..]);
            TlsCryptoInfo::Aes128Gcm(c)
        }
        KtlsCipher::Aes256Gcm => {
            let mut c = libc::tls12_crypto_info_aes_gcm_256 {
                info: libc::tls_crypto_info {
                    version: version.wire(),
                    cipher_type: libc::TLS_CIPHER_AES_GCM_256,
                },
                iv: [0; 8],
                key: [0; 32],
                salt: [0; 4],
                rec_seq: seq,
            };
            c.key.copy_from_slice(keys.key);
            c.salt.copy_from_slice(&keys.iv[..4]);
            c.iv.copy_from_slice(&keys.iv[4..]);
            TlsCryptoInfo::Aes256Gcm(c)
        }
        KtlsCipher::Chacha20Poly1305 => {
            let mut c = libc::tls12_crypto_info_chacha20_poly1305 {
                info: libc::tls_crypto_info {
                    version: version.wire(),
                    cipher_type: libc::TLS_CIPHER_CHACHA20_POLY1305,
                },
                iv: [0; 12],
                key: [0; 32],
                salt: [],
                rec_seq: seq,
            };
            c.key.copy_from_slice(keys.key);
            c.iv.copy_from_slice(keys.iv);
            TlsCryptoInfo::Chacha20Poly1305(c)
        }
    }
}

/// Zeroes the key and IV copies (volatile writes: the optimiser may not drop them).
fn wipe(info: &mut TlsCryptoInfo) {
    fn zero(bytes: &mut [u8]) {
        for b in bytes {
            // SAFETY: `b` is a valid, aligned, exclusive reference to one byte.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
    match info {
        TlsCryptoInfo::Aes128Gcm(c) => {
            zero(&mut c.key);
            zero(&mut c.iv);
            zero(&mut c.salt);
        }
        TlsCryptoInfo::Aes256Gcm(c) => {
            zero(&mut c.key);
            zero(&mut c.iv);
            zero(&mut c.salt);
        }
        TlsCryptoInfo::Chacha20Poly1305(c) => {
            zero(&mut c.key);
            zero(&mut c.iv);
        }
    }
}

/// TLS record content types (RFC 8446 5.1) as the kernel's record-type control messages
/// carry them.
const RECORD_ALERT: u8 = 21;

/// Sends a close_notify alert (RFC 8446 6.1: warning level, description 0) on a socket whose
/// records the kernel carries: the kernel seals it as an alert record behind what the socket
/// already holds. Does not block: `EAGAIN` when the send buffer is full (the caller ends
/// without it, as a peer that vanished would).
pub fn send_close_notify(fd: RawFd) -> Result<(), Errno> {
    let alert = [1u8, 0u8];
    let mut iov =
        libc::iovec { iov_base: alert.as_ptr() as *mut libc::c_void, iov_len: alert.len() };
    // u64 words: a control message header's alignment.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes.
    let (space, len) = unsafe { (libc::CMSG_SPACE(1) as usize, libc::CMSG_LEN(1) as usize) };
    assert!(space <= std::mem::size_of_val(&control), "a one-byte control message fits");
    // SAFETY: msghdr is a plain C struct for which all zeros is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` zeroed, aligned bytes we own: CMSG_FIRSTHDR gives
    // the header at their start (non-null: space ≥ one header) and CMSG_DATA its first data
    // byte, inside them (space ≥ CMSG_LEN(1)).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        assert!(!cmsg.is_null());
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = len as _;
        *libc::CMSG_DATA(cmsg) = RECORD_ALERT;
    }
    // SAFETY: `fd` is the caller's open socket; `msg` and the iovec, alert and control bytes
    // it points at live across the call, which only reads them.
    let sent = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    match sent {
        n if n < 0 => Err(Errno::last()),
        2 => Ok(()),
        _ => Err(Errno::EAGAIN),
    }
}

/// Reads one record off a socket whose records the kernel carries, whatever its type: a
/// plain receive fails with `EIO` when the next record is not application data (an alert, a
/// handshake message) and leaves it there, so a socket closed then would answer the peer
/// with a reset. Returns the record's content type and the bytes read (what did not fit in
/// `buf` stays for the next read). Does not block.
pub fn recv_any_record(fd: RawFd, buf: &mut [u8]) -> Result<(u8, usize), Errno> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, TlsGetRecordType};
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!(u8);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_DONTWAIT)?;
    let mut kind = 23; // application data, unless the control message says otherwise
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::TlsGetRecordType(t) = c {
            kind = match t {
                TlsGetRecordType::ChangeCipherSpec => 20,
                TlsGetRecordType::Alert => RECORD_ALERT,
                TlsGetRecordType::Handshake => 22,
                TlsGetRecordType::ApplicationData => 23,
                TlsGetRecordType::Unknown(x) => x,
                _ => 0,
            };
        }
    }
    Ok((kind, msg.bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn crypto_info_splits_the_iv_into_salt_and_iv() {
        let key = [7u8; 16];
        let iv: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        let TlsCryptoInfo::Aes128Gcm(c) = crypto_info(
            KtlsVersion::Tls13,
            KtlsCipher::Aes128Gcm,
            &KtlsKeys { key: &key, iv: &iv, seq: 0x0102 },
        ) else {
            panic!("wrong variant")
        };
        assert_eq!(c.salt, [1, 2, 3, 4]);
        assert_eq!(c.iv, [5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(c.rec_seq, [0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(c.info.version, 0x0304);
        let mut info = TlsCryptoInfo::Aes128Gcm(c);
        wipe(&mut info);
        let TlsCryptoInfo::Aes128Gcm(c) = info else { unreachable!() };
        assert_eq!((c.key, c.salt, c.iv), ([0; 16], [0; 4], [0; 8]));
    }

    #[test]
    fn wrong_key_length_is_refused_before_touching_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let iv = [0u8; 12];
        let short = KtlsKeys { key: &[0; 16], iv: &iv, seq: 0 };
        let err = install(s.as_raw_fd(), KtlsVersion::Tls13, KtlsCipher::Aes256Gcm, &short, &short)
            .unwrap_err();
        assert!(matches!(err, KtlsError::KeyLength { want: 32, got: 16, .. }), "{err}");
    }

    /// One socket's trouble is not the kernel's lack of TLS (that would turn offload off for
    /// every later connection).
    #[test]
    fn only_missing_tls_means_unavailable() {
        for errno in [Errno::ENOENT, Errno::EOPNOTSUPP, Errno::ENOPROTOOPT] {
            assert!(matches!(ulp_error(errno), KtlsError::Unavailable(_)), "{errno}");
        }
        for errno in [Errno::ENOTCONN, Errno::EEXIST, Errno::ENOMEM] {
            assert!(matches!(ulp_error(errno), KtlsError::Ulp(_)), "{errno}");
        }
    }

    /// On a plain socket every record is data: what arrived, read whole and typed 23; nothing
    /// waiting is `EAGAIN`, not a block. (Alerts need a kernel with TLS: the trixie VM suite
    /// test-ktls-kernel.sh reads libnbd's close_notify with it.)
    #[test]
    fn recv_any_record_reads_what_is_there_without_blocking() {
        use std::io::Write;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (peer, _) = listener.accept().unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(recv_any_record(peer.as_raw_fd(), &mut buf), Err(Errno::EAGAIN));
        s.write_all(b"bye").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let got = loop {
            match recv_any_record(peer.as_raw_fd(), &mut buf) {
                Err(Errno::EAGAIN) if std::time::Instant::now() < deadline => continue,
                other => break other,
            }
        };
        assert_eq!(got, Ok((23, 3)));
        assert_eq!(&buf[..3], b"bye");
    }

    /// Where the kernel has no TLS (this build machine), installing says so and leaves the
    /// socket as it was; where it has, the keys are taken.
    #[test]
    fn install_on_a_connected_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_peer, _) = listener.accept().unwrap();
        let key = [9u8; 16];
        let iv = [3u8; 12];
        let keys = KtlsKeys { key: &key, iv: &iv, seq: 5 };
        match install(s.as_raw_fd(), KtlsVersion::Tls12, KtlsCipher::Aes128Gcm, &keys, &keys) {
            Ok(()) => {}
            Err(KtlsError::Unavailable(errno)) => {
                assert!(matches!(errno, Errno::ENOENT | Errno::EOPNOTSUPP), "{errno}")
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }
}
