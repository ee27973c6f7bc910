//! Secret key material, and the `base64(key || CRC-32)` body that both NVMe key interchange
//! formats share (`NVMeTLSkey-1:xx:<body>:` for TLS PSKs, [`crate::psk`]; `DHHC-1:xx:<body>:`
//! for DH-HMAC-CHAP secrets, [`crate::auth::secret`]).
//!
//! Invariants:
//! - the bytes of a [`SecretBytes`] are zeroized when it drops, and appear in no `Debug`, no
//!   `Display` and no error: `Debug` prints the length and a [`SecretBytes::fingerprint`];
//! - the CRC is the IEEE CRC-32 (zlib's `crc32()`, which libnvme's `nvme_export_tls_key` uses;
//!   the kernel's `nvme_auth_extract_key` computes the same as `~crc32(~0, key, len)`), stored
//!   little-endian after the key (libnvme linux.c `nvme_import_tls_key_versioned`);
//! - decoding buffers that held key bytes are zeroized too (the base64 output is decoded into
//!   a buffer sized up front, so it never reallocates and leaves a copy behind).

use std::fmt;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The CRC-32 that follows the key in an interchange body.
pub const CRC_BYTES: usize = 4;

/// Key bytes that must not leak: zeroized on drop, redacted in `Debug`.
#[derive(Clone)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of `bytes` (zeroized when this drops).
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(Zeroizing::new(bytes))
    }

    /// Copies `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Self {
        SecretBytes::new(bytes.to_vec())
    }

    /// The key bytes. Callers hand them to a KDF or MAC, never to a log.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A short, non-reversible name for the key: the first 8 hex digits of
    /// SHA-256("ballast-key-fingerprint" || key). Enough to tell two keys apart in a listing,
    /// useless for recovering either.
    pub fn fingerprint(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(b"ballast-key-fingerprint");
        hash.update(self.expose());
        let digest = hash.finalize();
        digest[..4].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Constant-time equality (lengths are not secret).
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        self.len() == other.len() && openssl::memcmp::eq(self.expose(), other)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretBytes")
            .field("len_bytes", &self.len())
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

/// What is wrong with an interchange body. Carries no key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the key is not valid base64")]
    NotBase64,
    #[error(
        "the key decodes to {len_bytes} bytes; expected a {expected} byte key plus a 4 byte CRC"
    )]
    Length { len_bytes: usize, expected: &'static str },
    #[error("the key's CRC-32 does not match (a mistyped or truncated key)")]
    Crc,
}

/// Standard alphabet; padding optional on input (older kernels wrote none), always on output.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// IEEE CRC-32 of `key` (zlib `crc32(0, key, len)`).
pub fn crc32(key: &[u8]) -> u32 {
    crc32fast::hash(key)
}

/// A key's hash field as an error may show it: two digits as given, anything else not at all
/// (a malformed key may have its secret where the field belongs).
pub fn shown_hash_field(xx: &str) -> String {
    if xx.len() == 2 && xx.bytes().all(|b| b.is_ascii_digit()) {
        xx.to_string()
    } else {
        "(not two digits)".to_string()
    }
}

/// Decodes `base64(key || crc32_le(key))`, checks the CRC, and returns the key if its length
/// is one of `key_lens`. `expected` names the allowed lengths for the error.
pub fn decode_body(
    body: &str,
    key_lens: &[usize],
    expected: &'static str,
) -> Result<SecretBytes, BodyError> {
    let longest = key_lens.iter().copied().max().unwrap_or(0) + CRC_BYTES;
    // A body longer than the longest valid one is rejected before decoding anything.
    if body.len() > 4 * longest.div_ceil(3) {
        return Err(BodyError::Length { len_bytes: body.len() / 4 * 3, expected });
    }
    // The decoder sizes its output at most ceil(body / 4) * 3 <= longest + 2 bytes, so this
    // buffer never reallocates (which would leave a copy of the key in freed memory).
    let mut raw = Zeroizing::new(Vec::with_capacity(longest + 3));
    let capacity = raw.capacity();
    BASE64.decode_vec(body, &mut raw).map_err(|_| BodyError::NotBase64)?;
    assert_eq!(raw.capacity(), capacity, "the key buffer reallocated while decoding");
    let len_bytes = raw.len();
    let key_len =
        len_bytes.checked_sub(CRC_BYTES).ok_or(BodyError::Length { len_bytes, expected })?;
    if !key_lens.contains(&key_len) {
        return Err(BodyError::Length { len_bytes, expected });
    }
    let (key, crc) = raw.split_at(key_len);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if stored != crc32(key) {
        return Err(BodyError::Crc);
    }
    Ok(SecretBytes::from_slice(key))
}

/// Encodes `base64(key || crc32_le(key))`. The result holds the key: it is zeroized on drop.
pub fn encode_body(key: &[u8]) -> Zeroizing<String> {
    let mut raw = Zeroizing::new(Vec::with_capacity(key.len() + CRC_BYTES));
    raw.extend_from_slice(key);
    raw.extend_from_slice(&crc32(key).to_le_bytes());
    let mut out = Zeroizing::new(String::with_capacity(4 * raw.len().div_ceil(3)));
    BASE64.encode_string(raw.as_slice(), &mut out);
    out
}

/// Standard base64 with padding (PSK digests in TLS identities).
pub fn base64_encode(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_is_ieee_crc32() {
        // The CRC-32 check value (zlib crc32 of "123456789").
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn body_round_trips_and_rejects_damage() {
        let key: Vec<u8> = (0u8..32).collect();
        let body = encode_body(&key);
        let back = decode_body(&body, &[32, 48], "32 or 48").unwrap();
        assert_eq!(back.expose(), &key[..]);
        // One flipped key bit: the CRC catches it.
        let mut raw = BASE64.decode(body.as_bytes()).unwrap();
        raw[3] ^= 1;
        let bad = BASE64.encode(&raw);
        assert_eq!(decode_body(&bad, &[32, 48], "32 or 48").unwrap_err(), BodyError::Crc);
        assert_eq!(
            decode_body(&body, &[48], "48").unwrap_err(),
            BodyError::Length { len_bytes: 36, expected: "48" }
        );
        assert_eq!(decode_body("!!!!", &[32], "32").unwrap_err(), BodyError::NotBase64);
        assert!(matches!(
            decode_body(&"A".repeat(4000), &[32], "32"),
            Err(BodyError::Length { .. })
        ));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let secret = SecretBytes::from_slice(&[0xab; 32]);
        let shown = format!("{secret:?}");
        assert!(shown.contains("len_bytes: 32"), "{shown}");
        assert!(!shown.to_lowercase().contains("abab"), "{shown}");
        assert_eq!(secret.fingerprint().len(), 8);
        assert_ne!(secret.fingerprint(), SecretBytes::from_slice(&[0xac; 32]).fingerprint());
    }
}
