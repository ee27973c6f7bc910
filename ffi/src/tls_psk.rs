//! TLS 1.3 external PSKs bound to a hash of their own, through the OpenSSL callbacks the
//! `openssl` crate does not wrap: the server's find-session callback and the client's
//! use-session callback. OpenSSL's older PSK callbacks (which the crate does wrap) always bind
//! a PSK to SHA-256, so a peer that binds its PSK to SHA-384 (SPDK's NVMe/TCP initiator with a
//! SHA-384 key: TLS_AES_256_GCM_SHA384 only) could not complete a handshake with them.
//!
//! Invariants:
//! - a session built here carries the key, TLS 1.3 and exactly the cipher suite of the PSK's
//!   hash (TLS_AES_128_GCM_SHA256 or TLS_AES_256_GCM_SHA384); OpenSSL owns it once returned;
//! - the server's lookup returning nothing leaves the handshake to the context's other PSK
//!   callback (SHA-256), so both kinds of peers are served by one context;
//! - the key bytes given to OpenSSL are copied by it; ours stay in `Zeroizing` buffers.

use std::ffi::{c_int, c_uchar};
use std::sync::{Arc, OnceLock};

use foreign_types::ForeignTypeRef;
use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::ssl::{SslContext, SslContextBuilder, SslRef};
use openssl_sys::{EVP_MD, SSL, SSL_CIPHER, SSL_SESSION};

/// The hash a PSK is bound to, and with it the TLS 1.3 cipher suite that uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PskHash {
    Sha256,
    Sha384,
}

impl PskHash {
    /// The TLS 1.3 cipher suite's two bytes (RFC 8446 B.4).
    fn suite(self) -> [u8; 2] {
        match self {
            PskHash::Sha256 => [0x13, 0x01],
            PskHash::Sha384 => [0x13, 0x02],
        }
    }

    fn digest(self) -> *const EVP_MD {
        // SAFETY: EVP_sha256/EVP_sha384 return pointers to static method tables.
        unsafe {
            match self {
                PskHash::Sha256 => openssl_sys::EVP_sha256(),
                PskHash::Sha384 => openssl_sys::EVP_sha384(),
            }
        }
    }
}

/// A key for one identity, with its hash.
pub struct ExternalPsk {
    pub key: zeroize::Zeroizing<Vec<u8>>,
    pub hash: PskHash,
}

type FindFn = dyn Fn(&mut SslRef, &[u8]) -> Option<ExternalPsk> + Send + Sync;

struct UseSession {
    identity: Vec<u8>,
    psk: ExternalPsk,
}

const TLS1_3_VERSION: c_int = 0x0304;

extern "C" {
    fn SSL_CTX_set_psk_find_session_callback(
        ctx: *mut openssl_sys::SSL_CTX,
        cb: Option<
            unsafe extern "C" fn(*mut SSL, *const c_uchar, usize, *mut *mut SSL_SESSION) -> c_int,
        >,
    );
    fn SSL_CTX_set_psk_use_session_callback(
        ctx: *mut openssl_sys::SSL_CTX,
        cb: Option<
            unsafe extern "C" fn(
                *mut SSL,
                *const EVP_MD,
                *mut *const c_uchar,
                *mut usize,
                *mut *mut SSL_SESSION,
            ) -> c_int,
        >,
    );
    fn SSL_CIPHER_find(ssl: *mut SSL, ptr: *const c_uchar) -> *const SSL_CIPHER;
    fn SSL_SESSION_new() -> *mut SSL_SESSION;
    fn SSL_SESSION_set1_master_key(s: *mut SSL_SESSION, key: *const c_uchar, len: usize) -> c_int;
    fn SSL_SESSION_set_cipher(s: *mut SSL_SESSION, cipher: *const SSL_CIPHER) -> c_int;
    fn SSL_SESSION_set_protocol_version(s: *mut SSL_SESSION, version: c_int) -> c_int;
    fn EVP_MD_get_type(md: *const EVP_MD) -> c_int;
}

fn find_index() -> Result<Index<SslContext, Arc<FindFn>>, ErrorStack> {
    static INDEX: OnceLock<Index<SslContext, Arc<FindFn>>> = OnceLock::new();
    if let Some(i) = INDEX.get() {
        return Ok(*i);
    }
    let i = SslContext::new_ex_index()?;
    Ok(*INDEX.get_or_init(|| i))
}

fn use_index() -> Result<Index<SslContext, UseSession>, ErrorStack> {
    static INDEX: OnceLock<Index<SslContext, UseSession>> = OnceLock::new();
    if let Some(i) = INDEX.get() {
        return Ok(*i);
    }
    let i = SslContext::new_ex_index()?;
    Ok(*INDEX.get_or_init(|| i))
}

/// Server: `find` gives the key and hash for the identity a client offers (the session is
/// at hand, e.g. to look at what the client offered); None leaves it to the context's other
/// PSK callback.
pub fn set_psk_find_session(
    b: &mut SslContextBuilder,
    find: impl Fn(&mut SslRef, &[u8]) -> Option<ExternalPsk> + Send + Sync + 'static,
) -> Result<(), ErrorStack> {
    let index = find_index()?;
    b.set_ex_data(index, Arc::new(find) as Arc<FindFn>);
    // SAFETY: `b` owns a live SSL_CTX; the callback finds its closure in the context's
    // ex-data, which lives as long as the context.
    unsafe { SSL_CTX_set_psk_find_session_callback(b.as_ptr(), Some(find_session)) };
    Ok(())
}

/// Client: offer `identity` with `psk` (bound to its hash) in TLS 1.3.
pub fn set_psk_use_session(
    b: &mut SslContextBuilder,
    identity: &[u8],
    psk: ExternalPsk,
) -> Result<(), ErrorStack> {
    let index = use_index()?;
    b.set_ex_data(index, UseSession { identity: identity.to_vec(), psk });
    // SAFETY: as in `set_psk_find_session`; the identity bytes live in the context's ex-data.
    unsafe { SSL_CTX_set_psk_use_session_callback(b.as_ptr(), Some(use_session)) };
    Ok(())
}

/// A TLS 1.3 session resuming nothing: the PSK, TLS 1.3, the hash's cipher suite.
///
/// # Safety
/// SAFETY: `ssl` must be a live SSL in a handshake (both callbacks below pass theirs).
unsafe fn psk_session(ssl: *mut SSL, psk: &ExternalPsk) -> *mut SSL_SESSION {
    let suite = psk.hash.suite();
    // SAFETY: `ssl` is live (caller); `suite` holds the two bytes SSL_CIPHER_find reads.
    let cipher = unsafe { SSL_CIPHER_find(ssl, suite.as_ptr()) };
    if cipher.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: a fresh session, set up with OpenSSL's own setters (which copy the key), freed
    // if any of them fails.
    unsafe {
        let s = SSL_SESSION_new();
        if s.is_null() {
            return s;
        }
        if SSL_SESSION_set1_master_key(s, psk.key.as_ptr(), psk.key.len()) != 1
            || SSL_SESSION_set_cipher(s, cipher) != 1
            || SSL_SESSION_set_protocol_version(s, TLS1_3_VERSION) != 1
        {
            openssl_sys::SSL_SESSION_free(s);
            return std::ptr::null_mut();
        }
        s
    }
}

unsafe extern "C" fn find_session(
    ssl: *mut SSL,
    identity: *const c_uchar,
    len: usize,
    sess: *mut *mut SSL_SESSION,
) -> c_int {
    // SAFETY: OpenSSL calls this with a live SSL, `len` readable identity bytes and a place
    // for the session.
    unsafe {
        *sess = std::ptr::null_mut();
        let ssl_ref = SslRef::from_ptr_mut(ssl);
        let Ok(index) = find_index() else { return 1 };
        let Some(find) = ssl_ref.ssl_context().ex_data(index).cloned() else { return 1 };
        let id = if len == 0 { &[][..] } else { std::slice::from_raw_parts(identity, len) };
        let Some(psk) = find(ssl_ref, id) else { return 1 };
        let s = psk_session(ssl, &psk);
        if s.is_null() {
            return 0;
        }
        *sess = s;
        1
    }
}

unsafe extern "C" fn use_session(
    ssl: *mut SSL,
    md: *const EVP_MD,
    id: *mut *const c_uchar,
    idlen: *mut usize,
    sess: *mut *mut SSL_SESSION,
) -> c_int {
    // SAFETY: OpenSSL calls this with a live SSL and places for the identity and session;
    // the identity points into the context's ex-data, which outlives the handshake.
    unsafe {
        *sess = std::ptr::null_mut();
        let ssl_ref = SslRef::from_ptr_mut(ssl);
        let Ok(index) = use_index() else { return 1 };
        let Some(offer) = ssl_ref.ssl_context().ex_data(index) else { return 1 };
        // After a HelloRetryRequest OpenSSL names the hash it needs: offer nothing else.
        if !md.is_null() && EVP_MD_get_type(md) != EVP_MD_get_type(offer.psk.hash.digest()) {
            return 1;
        }
        let s = psk_session(ssl, &offer.psk);
        if s.is_null() {
            return 0;
        }
        *id = offer.identity.as_ptr();
        *idlen = offer.identity.len();
        *sess = s;
        1
    }
}
