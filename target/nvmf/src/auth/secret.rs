//! DH-HMAC-CHAP secrets in the `DHHC-1:xx:<base64(key || crc32)>:` representation (NVMe base
//! spec 2.0 section 8.13.5.8; what `nvme gen-dhchap-key` prints and `nvme connect
//! --dhchap-secret` takes), and the kernel's key transform.
//!
//! `xx` names the hash that transforms the secret before use: 00 none, 01 SHA-256,
//! 02 SHA-384, 03 SHA-512. The transform is the kernel's `nvme_auth_transform_key`
//! (drivers/nvme/common/auth.c): HMAC-xx(key, nqn || "NVMe-over-Fabrics"), with the host NQN
//! for the host's secret and the subsystem NQN for the controller's.
//!
//! Invariants:
//! - the key is 32, 48 or 64 bytes (the kernel's `nvme_auth_extract_key` accepts 36/52/68
//!   decoded bytes with the CRC); for `xx` != 00 it is exactly the hash's length, as `nvme
//!   gen-dhchap-key` makes them. Kernels before the `struct nvme_dhchap_key` rework keyed the
//!   response HMAC with `key->len` bytes of the transformed key, so a secret whose length
//!   differs from its hash would authenticate differently across kernel versions: refused;
//! - the key lives in a [`SecretBytes`]; neither it nor the text appears in errors.

use zeroize::Zeroizing;

use super::chap::{self, Digest};
use super::HashId;
use crate::secret::{self, BodyError, SecretBytes};

const PREFIX: &str = "DHHC-1:";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("not a DH-HMAC-CHAP secret: expected `DHHC-1:xx:<base64>:`")]
    Format,
    #[error(
        "unknown DH-HMAC-CHAP secret hash `{0}` (00 none, 01 SHA-256, 02 SHA-384, 03 SHA-512)"
    )]
    UnknownHash(String),
    #[error("a {hash} secret must be {expected} bytes, this one has {len_bytes}")]
    KeyLength { hash: &'static str, expected: usize, len_bytes: usize },
    #[error("DH-HMAC-CHAP secret: {0}")]
    Body(#[from] BodyError),
}

/// A parsed `DHHC-1` secret.
#[derive(Debug, Clone)]
pub struct DhchapSecret {
    /// The transform hash (`xx`); `None` for 00.
    pub transform: Option<HashId>,
    key: SecretBytes,
}

impl DhchapSecret {
    /// Parses `DHHC-1:xx:<base64>:` (surrounding whitespace trimmed, the final `:` required).
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let text = text.trim();
        let rest = text.strip_prefix(PREFIX).ok_or(SecretError::Format)?;
        let (xx, rest) = rest.split_once(':').ok_or(SecretError::Format)?;
        let body = rest.strip_suffix(':').ok_or(SecretError::Format)?;
        if body.contains(':') {
            return Err(SecretError::Format);
        }
        let transform = match xx {
            "00" => None,
            "01" => Some(HashId::Sha256),
            "02" => Some(HashId::Sha384),
            "03" => Some(HashId::Sha512),
            _ => return Err(SecretError::UnknownHash(crate::secret::shown_hash_field(xx))),
        };
        let key = secret::decode_body(body, &[32, 48, 64], "32, 48 or 64")?;
        DhchapSecret::new(transform, key)
    }

    /// Builds a secret, checking the key length against the transform.
    pub fn new(transform: Option<HashId>, key: SecretBytes) -> Result<Self, SecretError> {
        let len_bytes = key.len();
        match transform {
            None if matches!(len_bytes, 32 | 48 | 64) => {}
            None => {
                return Err(SecretError::KeyLength {
                    hash: "untransformed",
                    expected: 32,
                    len_bytes,
                })
            }
            Some(hash) if hash.len_bytes() == len_bytes => {}
            Some(hash) => {
                return Err(SecretError::KeyLength {
                    hash: hash.name(),
                    expected: hash.len_bytes(),
                    len_bytes,
                })
            }
        }
        Ok(DhchapSecret { transform, key })
    }

    /// The `DHHC-1` text (holds the key: zeroized on drop).
    pub fn encode(&self) -> Zeroizing<String> {
        let xx = self.transform.map_or(0, |hash| hash as u8);
        let body = secret::encode_body(self.key.expose());
        let mut out = Zeroizing::new(String::with_capacity(PREFIX.len() + 4 + body.len()));
        out.push_str(PREFIX);
        out.push_str(&format!("{xx:02}:"));
        out.push_str(&body);
        out.push(':');
        out
    }

    pub fn key(&self) -> &SecretBytes {
        &self.key
    }

    /// `nvme_auth_transform_key(key, nqn)`: the key the response HMAC is keyed with.
    pub fn transformed(&self, nqn: &str) -> SecretBytes {
        match self.transform {
            None => self.key.clone(),
            Some(hash) => {
                let digest: Digest =
                    chap::hmac(hash, self.key.expose(), &[nqn.as_bytes(), b"NVMe-over-Fabrics"]);
                SecretBytes::from_slice(digest.as_ref())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_nvme_gen_dhchap_key_prints_and_round_trips() {
        for (transform, len) in [
            (None, 32),
            (None, 64),
            (Some(HashId::Sha256), 32),
            (Some(HashId::Sha384), 48),
            (Some(HashId::Sha512), 64),
        ] {
            let key: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(37)).collect();
            let secret = DhchapSecret::new(transform, SecretBytes::new(key.clone())).unwrap();
            let text = secret.encode();
            assert!(text.starts_with(&format!("DHHC-1:{:02}:", transform.map_or(0, |h| h as u8))));
            let back = DhchapSecret::parse(&text).unwrap();
            assert_eq!(back.transform, transform);
            assert_eq!(back.key().expose(), &key[..]);
        }
    }

    #[test]
    fn transform_is_hmac_of_nqn_and_seed() {
        // Untransformed secrets are used as they are.
        let plain = DhchapSecret::new(None, SecretBytes::from_slice(&[7; 32])).unwrap();
        assert_eq!(plain.transformed("nqn.host").expose(), &[7; 32]);
        // Transformed: the hash's length, different per NQN.
        let sha384 =
            DhchapSecret::new(Some(HashId::Sha384), SecretBytes::from_slice(&[7; 48])).unwrap();
        let a = sha384.transformed("nqn.a");
        assert_eq!(a.len(), 48);
        assert_ne!(a.expose(), sha384.transformed("nqn.b").expose());
    }

    #[test]
    fn malformed_secrets_are_typed_errors() {
        let good = DhchapSecret::new(Some(HashId::Sha256), SecretBytes::from_slice(&[9; 32]))
            .unwrap()
            .encode();
        assert!(DhchapSecret::parse(&good).is_ok());
        assert_eq!(
            DhchapSecret::parse(&good.replace("DHHC-1", "DHHC-2")).unwrap_err(),
            SecretError::Format
        );
        assert_eq!(
            DhchapSecret::parse(&good.replace(":01:", ":04:")).unwrap_err(),
            SecretError::UnknownHash("04".into())
        );
        // A key whose secret sits where the hash belongs (`DHHC-1:<secret>::`): not one
        // character of it in the error.
        let body = good.split(':').nth(2).unwrap();
        let err = DhchapSecret::parse(&format!("DHHC-1:{body}::")).unwrap_err();
        assert!(!err.to_string().contains(&body[..2]), "{err}");
        assert!(matches!(
            DhchapSecret::parse(&good.replace(":01:", ":03:")),
            Err(SecretError::KeyLength { .. })
        ));
        assert_eq!(DhchapSecret::parse(&good[..good.len() - 1]).unwrap_err(), SecretError::Format);
        let mut damaged = good.to_string();
        damaged.replace_range(12..13, if &good[12..13] == "A" { "B" } else { "A" });
        let err = DhchapSecret::parse(&damaged).unwrap_err();
        assert_eq!(err, SecretError::Body(BodyError::Crc));
        assert!(!format!("{err} {err:?}").contains(&good[10..20]));
        let short = DhchapSecret::new(None, SecretBytes::from_slice(&[1; 16])).unwrap_err();
        assert!(matches!(short, SecretError::KeyLength { len_bytes: 16, .. }));
    }
}
