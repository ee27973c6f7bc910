//! NVMe/TCP TLS pre-shared keys (NVMe TCP transport spec 1.0 section 3.6.1, TP 8011/8018): the
//! PSK interchange format `NVMeTLSkey-1:xx:<base64(key || crc32)>:`, the retained-PSK and
//! TLS-PSK derivations, and PSK identities `NVMe0Rhh <hostnqn> <subnqn>` /
//! `NVMe1Rhh <hostnqn> <subnqn> <digest>`. Pure: no I/O, no clock.
//!
//! The derivations follow libnvme (src/nvme/linux.c), which is what the Linux host's
//! `nvme connect --tls` runs before it puts the TLS PSK into the kernel keyring for tlshd:
//! - `derive_retained_key`: PRK = HKDF-Extract(0, configured PSK) with the hash named by the
//!   key's `xx` (01 SHA-256, 02 SHA-384; 00 means the configured PSK is the retained PSK);
//!   retained = HKDF-Expand-Label(PRK, "HostNQN", hostnqn, len(configured PSK));
//! - `derive_nvme_keys`: the identity's hash ("cipher") is `xx`, or for `xx` = 00 the one
//!   matching the key length (`default_hmac`: 32 -> SHA-256, 48 -> SHA-384);
//! - `derive_psk_digest` (version 1 identities only): Base64(HMAC-cipher(retained,
//!   hostnqn || " " || subnqn || " " || "NVMe-over-Fabrics")) (also the kernel's
//!   `nvme_auth_generate_digest`, drivers/nvme/common/auth.c);
//! - `derive_tls_key`: TLS PSK = HKDF-Expand-Label(HKDF-Extract(0, retained) with the cipher
//!   hash, "nvme-tls-psk", context, len(key)), where the context is the whole identity for
//!   version 0 and `"%02d %s" (cipher, digest)` for version 1.
//!
//! Two encodings of HKDF-Expand-Label exist in the field ([`Encoding`]): RFC 8446's HkdfLabel,
//! and libnvme's own (a little-endian length, no length prefixes on label and context). The
//! Linux host as Debian trixie ships it (nvme-cli 2.13, libnvme 1.13) derives with libnvme's
//! own: the version 1 digest `nvme check-tls-key --identity=1` printed matches
//! [`Encoding::LibnvmeCompat`] (tls.rs keeps that test), and a kernel host connected with the
//! version 0 PSK it gives.
//!
//! Invariants:
//! - key material lives only in [`SecretBytes`] (zeroized, redacted); errors name fields, never
//!   key bytes;
//! - a parsed interchange key has a length its `xx` allows (00: 32 or 48; 01: 32; 02: 48),
//!   exactly as `nvme_import_tls_key_versioned` checks.

use std::fmt;

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Sha256, Sha384};
use zeroize::Zeroizing;

use crate::secret::{self, BodyError, SecretBytes};

const PREFIX: &str = "NVMeTLSkey-1:";
/// HMAC seed of the PSK digest (`derive_psk_digest`).
const DIGEST_SEED: &[u8] = b"NVMe-over-Fabrics";

/// Errors of this module; none carries key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PskError {
    #[error("not an NVMe TLS PSK: expected `NVMeTLSkey-1:xx:<base64>:`")]
    Format,
    #[error("unknown PSK hash `{0}` (00 none, 01 SHA-256, 02 SHA-384)")]
    UnknownHash(String),
    #[error("PSK hash {hash} needs a {expected} byte key, this one has {len_bytes}")]
    KeyLength { hash: &'static str, expected: &'static str, len_bytes: usize },
    #[error("PSK body: {0}")]
    Body(#[from] BodyError),
    #[error("NQN `{nqn}` is not usable in a PSK identity: {why}")]
    Nqn { nqn: String, why: &'static str },
    #[error("HKDF context of {len_bytes} bytes exceeds 255 (NQNs too long for a TLS identity)")]
    ContextTooLong { len_bytes: usize },
    #[error("PSK identity `{identity}` is malformed: {why}")]
    Identity { identity: String, why: &'static str },
    #[error("identity hash {identity} does not match the configured key's {key}")]
    HashMismatch { identity: &'static str, key: &'static str },
    #[error(
        "identity digest does not match the configured key (wrong key or other host/subsystem)"
    )]
    DigestMismatch,
}

/// The `xx` of an interchange key: how the configured PSK becomes the retained PSK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PskTransform {
    /// 00: the configured PSK is used as the retained PSK.
    None,
    /// 01: HKDF with SHA-256 (32 byte keys).
    Sha256,
    /// 02: HKDF with SHA-384 (48 byte keys).
    Sha384,
}

/// The hash of a PSK identity (`NVMe?R01` / `NVMe?R02`) and of its TLS 1.3 cipher suite:
/// TLS_AES_128_GCM_SHA256 and TLS_AES_256_GCM_SHA384.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherHash {
    Sha256 = 1,
    Sha384 = 2,
}

impl CipherHash {
    pub fn len_bytes(self) -> usize {
        match self {
            CipherHash::Sha256 => 32,
            CipherHash::Sha384 => 48,
        }
    }
    fn name(self) -> &'static str {
        match self {
            CipherHash::Sha256 => "SHA-256",
            CipherHash::Sha384 => "SHA-384",
        }
    }
}

/// Which HKDF-Expand-Label encoding (see the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// RFC 8446 section 7.1 HkdfLabel: be16 length, length-prefixed "tls13 "+label and context.
    Rfc8446,
    /// libnvme's `_compat` encoding: le16 length, "tls13 "+label and context concatenated.
    LibnvmeCompat,
}

/// A PSK in the interchange format.
#[derive(Debug, Clone)]
pub struct TlsKey {
    pub transform: PskTransform,
    pub key: SecretBytes,
}

impl TlsKey {
    /// Parses `NVMeTLSkey-1:xx:<base64(key || crc32)>:` (the trailing `:` is required, as
    /// libnvme writes it; surrounding whitespace from a key file is trimmed).
    pub fn parse(text: &str) -> Result<Self, PskError> {
        let text = text.trim();
        let rest = text.strip_prefix(PREFIX).ok_or(PskError::Format)?;
        let (xx, rest) = rest.split_once(':').ok_or(PskError::Format)?;
        let body = rest.strip_suffix(':').ok_or(PskError::Format)?;
        if body.contains(':') {
            return Err(PskError::Format);
        }
        let transform = match xx {
            "00" => PskTransform::None,
            "01" => PskTransform::Sha256,
            "02" => PskTransform::Sha384,
            _ => return Err(PskError::UnknownHash(secret::shown_hash_field(xx))),
        };
        let key = secret::decode_body(body, &[32, 48], "32 or 48")?;
        let key = TlsKey { transform, key };
        key.check_length()?;
        Ok(key)
    }

    /// Builds a key, checking its length against `transform`.
    pub fn new(transform: PskTransform, key: SecretBytes) -> Result<Self, PskError> {
        let key = TlsKey { transform, key };
        key.check_length()?;
        Ok(key)
    }

    fn check_length(&self) -> Result<(), PskError> {
        let len_bytes = self.key.len();
        let (hash, expected, ok) = match self.transform {
            PskTransform::None => ("none", "32 or 48", len_bytes == 32 || len_bytes == 48),
            PskTransform::Sha256 => ("SHA-256", "32", len_bytes == 32),
            PskTransform::Sha384 => ("SHA-384", "48", len_bytes == 48),
        };
        if ok {
            Ok(())
        } else {
            Err(PskError::KeyLength { hash, expected, len_bytes })
        }
    }

    /// The interchange text (holds the key: zeroized on drop).
    pub fn encode(&self) -> Zeroizing<String> {
        let xx = match self.transform {
            PskTransform::None => "00",
            PskTransform::Sha256 => "01",
            PskTransform::Sha384 => "02",
        };
        let body = secret::encode_body(self.key.expose());
        let mut out = Zeroizing::new(String::with_capacity(PREFIX.len() + 4 + body.len()));
        out.push_str(PREFIX);
        out.push_str(xx);
        out.push(':');
        out.push_str(&body);
        out.push(':');
        out
    }

    /// The identity/cipher hash libnvme pairs with this key (`derive_nvme_keys`).
    pub fn cipher(&self) -> CipherHash {
        match self.transform {
            PskTransform::Sha256 => CipherHash::Sha256,
            PskTransform::Sha384 => CipherHash::Sha384,
            PskTransform::None if self.key.len() == 48 => CipherHash::Sha384,
            PskTransform::None => CipherHash::Sha256,
        }
    }

    /// The retained PSK for `hostnqn` (libnvme `derive_retained_key[_compat]`).
    pub fn retained(&self, hostnqn: &str, encoding: Encoding) -> Result<SecretBytes, PskError> {
        let hash = match self.transform {
            PskTransform::None => return Ok(self.key.clone()),
            PskTransform::Sha256 => CipherHash::Sha256,
            PskTransform::Sha384 => CipherHash::Sha384,
        };
        check_nqn(hostnqn)?;
        hkdf_expand_label(
            hash,
            self.key.expose(),
            "HostNQN",
            hostnqn.as_bytes(),
            self.key.len(),
            encoding,
        )
    }
}

/// HKDF-Extract(salt = none, `ikm`) then HKDF-Expand-Label(PRK, `label`, `context`, `len`),
/// in the given encoding. RFC 5869: an absent salt is HashLen zero bytes, which is what
/// OpenSSL's EVP_PKEY_HKDF (libnvme) and the kernel (`default_salt`) use.
pub fn hkdf_expand_label(
    hash: CipherHash,
    ikm: &[u8],
    label: &str,
    context: &[u8],
    len: usize,
    encoding: Encoding,
) -> Result<SecretBytes, PskError> {
    let full_label = format!("tls13 {label}");
    let len_u16 = u16::try_from(len).map_err(|_| PskError::ContextTooLong { len_bytes: len })?;
    let mut info = Vec::with_capacity(4 + full_label.len() + context.len());
    match encoding {
        Encoding::Rfc8446 => {
            info = ballast_tls::ktls::hkdf_label(len_u16, label, context).ok_or(
                PskError::ContextTooLong { len_bytes: full_label.len().max(context.len()) },
            )?;
        }
        Encoding::LibnvmeCompat => {
            // libnvme: `*(uint16_t *)pos = cpu_to_le16(key_len)`, then one snprintf of at most
            // 256 bytes for "tls13 HostNQN<hostnqn>", or one for the label and one for the
            // context of "nvme-tls-psk".
            let limited =
                if label == "HostNQN" { full_label.len() + context.len() } else { context.len() };
            if limited > 256 {
                return Err(PskError::ContextTooLong { len_bytes: limited });
            }
            info.extend_from_slice(&len_u16.to_le_bytes());
            info.extend_from_slice(full_label.as_bytes());
            info.extend_from_slice(context);
        }
    }
    let mut out = Zeroizing::new(vec![0u8; len]);
    let expanded = match hash {
        CipherHash::Sha256 => Hkdf::<Sha256>::new(None, ikm).expand(&info, &mut out),
        CipherHash::Sha384 => Hkdf::<Sha384>::new(None, ikm).expand(&info, &mut out),
    };
    // `len` is at most 48 here (a key length), far below HKDF's 255 * HashLen limit.
    assert!(expanded.is_ok(), "HKDF-Expand of {len} bytes refused");
    Ok(SecretBytes::new(std::mem::take(&mut *out)))
}

/// Base64(HMAC-`hash`(retained, hostnqn || " " || subnqn || " " || "NVMe-over-Fabrics"))
/// (libnvme `derive_psk_digest`, kernel `nvme_auth_generate_digest`).
pub fn psk_digest(hash: CipherHash, retained: &SecretBytes, hostnqn: &str, subnqn: &str) -> String {
    let parts: [&[u8]; 5] = [hostnqn.as_bytes(), b" ", subnqn.as_bytes(), b" ", DIGEST_SEED];
    match hash {
        CipherHash::Sha256 => secret::base64_encode(&hmac_parts::<Hmac<Sha256>>(retained, &parts)),
        CipherHash::Sha384 => secret::base64_encode(&hmac_parts::<Hmac<Sha384>>(retained, &parts)),
    }
}

fn hmac_parts<M: Mac + hmac::digest::KeyInit>(key: &SecretBytes, parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = <M as hmac::digest::KeyInit>::new_from_slice(key.expose())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

/// A PSK identity as the host sends it in its ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PskIdentity {
    /// 0 (`NVMe0R..`) or 1 (`NVMe1R..`, with a digest).
    pub version: u8,
    pub hash: CipherHash,
    pub hostnqn: String,
    pub subnqn: String,
    /// Version 1 only: the Base64 PSK digest.
    pub digest: Option<String>,
}

impl PskIdentity {
    /// Parses `NVMe<v>R<hh> <hostnqn> <subnqn>[ <digest>]`. Only retained-PSK identities
    /// ('R') are accepted; generated ones ('G') come from secure channel concatenation, which
    /// ballast does not offer.
    pub fn parse(text: &str) -> Result<Self, PskError> {
        let bad = |why| PskError::Identity { identity: text.chars().take(300).collect(), why };
        let mut fields = text.split(' ');
        let head = fields.next().unwrap_or_default();
        let tail = head.strip_prefix("NVMe").ok_or_else(|| bad("no `NVMe` prefix"))?;
        let bytes = tail.as_bytes();
        if bytes.len() != 4 || bytes[1] != b'R' {
            return Err(bad("expected `NVMe<v>R<hh>`"));
        }
        let version = match bytes[0] {
            b'0' => 0,
            b'1' => 1,
            _ => return Err(bad("unknown identity version")),
        };
        let hash = match &tail[2..] {
            "01" => CipherHash::Sha256,
            "02" => CipherHash::Sha384,
            _ => return Err(bad("unknown identity hash")),
        };
        let hostnqn = fields.next().filter(|f| !f.is_empty()).ok_or_else(|| bad("no host NQN"))?;
        let subnqn =
            fields.next().filter(|f| !f.is_empty()).ok_or_else(|| bad("no subsystem NQN"))?;
        let digest = fields.next();
        if fields.next().is_some() {
            return Err(bad("trailing fields"));
        }
        let digest = match (version, digest) {
            (0, None) => None,
            (0, Some(_)) => return Err(bad("a version 0 identity has no digest")),
            (_, Some(d)) if d.len() == 4 * hash.len_bytes().div_ceil(3) => Some(d.to_string()),
            (_, Some(_)) => return Err(bad("digest length does not match the hash")),
            (_, None) => return Err(bad("a version 1 identity needs a digest")),
        };
        Ok(PskIdentity {
            version,
            hash,
            hostnqn: hostnqn.to_string(),
            subnqn: subnqn.to_string(),
            digest,
        })
    }

    /// The HKDF context of the TLS PSK derivation (libnvme `derive_tls_key`).
    fn tls_context(&self) -> String {
        match &self.digest {
            Some(digest) => format!("{:02} {digest}", self.hash as u8),
            None => self.to_string(),
        }
    }
}

impl fmt::Display for PskIdentity {
    /// libnvme `gen_tls_identity`: `"NVMe%01dR%02d %s %s[ %s]"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NVMe{}R{:02} {} {}", self.version, self.hash as u8, self.hostnqn, self.subnqn)?;
        if let Some(digest) = &self.digest {
            write!(f, " {digest}")?;
        }
        Ok(())
    }
}

fn check_nqn(nqn: &str) -> Result<(), PskError> {
    let bad = |why| PskError::Nqn { nqn: nqn.chars().take(300).collect(), why };
    if nqn.is_empty() {
        return Err(bad("empty"));
    }
    if nqn.len() > 223 {
        return Err(bad("longer than 223 bytes"));
    }
    if nqn.bytes().any(|b| b == b' ' || b.is_ascii_control()) {
        return Err(bad("contains a space or control character"));
    }
    Ok(())
}

/// An identity and the TLS PSK that goes with it.
#[derive(Debug, Clone)]
pub struct DerivedPsk {
    pub identity: PskIdentity,
    pub psk: SecretBytes,
}

/// libnvme `derive_nvme_keys`: the identity (version 0 or 1) and TLS PSK a host with this
/// configured key derives for `hostnqn` talking to `subnqn`.
pub fn derive(
    key: &TlsKey,
    hostnqn: &str,
    subnqn: &str,
    version: u8,
    encoding: Encoding,
) -> Result<DerivedPsk, PskError> {
    check_nqn(hostnqn)?;
    check_nqn(subnqn)?;
    let retained = key.retained(hostnqn, encoding)?;
    let hash = key.cipher();
    let digest = match version {
        0 => None,
        1 => Some(psk_digest(hash, &retained, hostnqn, subnqn)),
        _ => {
            return Err(PskError::Identity {
                identity: format!("version {version}"),
                why: "unknown identity version",
            })
        }
    };
    let identity =
        PskIdentity { version, hash, hostnqn: hostnqn.into(), subnqn: subnqn.into(), digest };
    let psk = tls_psk(&retained, &identity, key.key.len(), encoding)?;
    Ok(DerivedPsk { identity, psk })
}

/// TLS PSK = HKDF-Expand-Label(HKDF-Extract(0, retained), "nvme-tls-psk", context, len)
/// with the identity's hash (libnvme `derive_tls_key[_compat]`; `len` is the key length).
pub fn tls_psk(
    retained: &SecretBytes,
    identity: &PskIdentity,
    len: usize,
    encoding: Encoding,
) -> Result<SecretBytes, PskError> {
    let context = identity.tls_context();
    hkdf_expand_label(
        identity.hash,
        retained.expose(),
        "nvme-tls-psk",
        context.as_bytes(),
        len,
        encoding,
    )
}

/// The target's side: the TLS PSK for an identity a host offered, given the key configured
/// for that host. The identity's hash must be the one libnvme pairs with the key; for a
/// version 1 identity the digest must match, which also tells which [`Encoding`] the host
/// used (tried in the order given). A version 0 identity carries no such proof: the first
/// encoding is used, and a host that used the other fails the TLS binder check.
pub fn psk_for_identity(
    key: &TlsKey,
    identity: &PskIdentity,
    encodings: &[Encoding],
) -> Result<(Encoding, SecretBytes), PskError> {
    if identity.hash != key.cipher() {
        return Err(PskError::HashMismatch {
            identity: identity.hash.name(),
            key: key.cipher().name(),
        });
    }
    for &encoding in encodings {
        let retained = key.retained(&identity.hostnqn, encoding)?;
        if let Some(digest) = &identity.digest {
            let expected =
                psk_digest(identity.hash, &retained, &identity.hostnqn, &identity.subnqn);
            if !openssl::memcmp::eq(expected.as_bytes(), digest.as_bytes()) {
                continue;
            }
        }
        let psk = tls_psk(&retained, identity, key.key.len(), encoding)?;
        return Ok((encoding, psk));
    }
    Err(PskError::DigestMismatch)
}

#[cfg(test)]
mod tests;
