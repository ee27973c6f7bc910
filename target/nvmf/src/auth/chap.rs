//! The DH-HMAC-CHAP computations (NVMe base spec 2.0 section 8.13.5.2-5), in the byte order
//! the kernel feeds its HMACs (drivers/nvme/target/auth.c `nvmet_auth_host_hash` and
//! `nvmet_auth_ctrl_hash`; drivers/nvme/host/auth.c `nvme_auth_dhchap_setup_host_response`
//! and `..._ctrl_response`; drivers/nvme/common/auth.c `nvme_auth_augmented_challenge`):
//!
//! ```text
//! C'  = C                                  with the null DH group
//! C'  = HMAC-H(H(g^xy mod p), C)           otherwise (the shared secret padded to the group)
//! R1  = HMAC-H(Kh', C1' || le32 S1 || le16 T_ID || SC_C || "HostHost"
//!                      || hostnqn || 0x00 || subsysnqn)
//! R2  = HMAC-H(Kc', C2' || le32 S2 || le16 T_ID || 0x00 || "Controller"
//!                      || subsysnqn || 0x00 || hostnqn)
//! ```
//!
//! H is the negotiated hash; Kh' and Kc' are the transformed host and controller secrets
//! ([`super::secret::DhchapSecret::transformed`]). The kernel puts SC_C (0: no secure
//! channel concatenation, the only mode ballast accepts) in R1 and a constant zero in R2.
//!
//! Invariant: outputs are [`Digest`]s, which zeroize themselves on drop.

use hmac::{Hmac, Mac};
use sha2::{Sha256, Sha384, Sha512};
use zeroize::Zeroize;

use super::HashId;
use crate::secret::SecretBytes;

/// A hash or HMAC output, at most 64 bytes, zeroized on drop.
#[derive(Clone)]
pub struct Digest {
    bytes: [u8; 64],
    len: usize,
}

impl Digest {
    fn new(out: &[u8]) -> Self {
        assert!(out.len() <= 64, "digest of {} bytes", out.len());
        let mut bytes = [0u8; 64];
        bytes[..out.len()].copy_from_slice(out);
        Digest { bytes, len: out.len() }
    }

    /// Constant-time comparison with a peer's value (lengths are public).
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        self.len == other.len() && openssl::memcmp::eq(self.as_ref(), other)
    }
}

impl AsRef<[u8]> for Digest {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Drop for Digest {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest({} bytes)", self.len)
    }
}

/// HMAC-`hash`(key, parts concatenated).
pub fn hmac(hash: HashId, key: &[u8], parts: &[&[u8]]) -> Digest {
    fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Digest {
        let mut mac = <M as hmac::digest::KeyInit>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        for part in parts {
            mac.update(part);
        }
        let mut out = mac.finalize().into_bytes();
        let digest = Digest::new(&out);
        out.as_mut_slice().zeroize();
        digest
    }
    match hash {
        HashId::Sha256 => run::<Hmac<Sha256>>(key, parts),
        HashId::Sha384 => run::<Hmac<Sha384>>(key, parts),
        HashId::Sha512 => run::<Hmac<Sha512>>(key, parts),
    }
}

/// H(data).
pub fn hash(hash: HashId, data: &[u8]) -> Digest {
    use sha2::Digest as _;
    let mut out = match hash {
        HashId::Sha256 => Sha256::digest(data).to_vec(),
        HashId::Sha384 => Sha384::digest(data).to_vec(),
        HashId::Sha512 => Sha512::digest(data).to_vec(),
    };
    let digest = Digest::new(&out);
    out.zeroize();
    digest
}

/// `nvme_auth_augmented_challenge`: HMAC-H(H(shared secret), challenge).
pub fn augmented_challenge(
    hash_id: HashId,
    shared_secret: &SecretBytes,
    challenge: &[u8],
) -> Digest {
    let hashed_key = hash(hash_id, shared_secret.expose());
    hmac(hash_id, hashed_key.as_ref(), &[challenge])
}

/// What both responses are computed over, besides the key and the challenge.
#[derive(Debug, Clone, Copy)]
pub struct Transaction<'a> {
    pub hash: HashId,
    pub tid: u16,
    pub hostnqn: &'a str,
    pub subnqn: &'a str,
}

/// R1, the host's response, that the controller recomputes to authenticate the host.
/// `challenge` is C1, or C1' with a DH group; `sc_c` the Negotiate's SC_C.
pub fn host_response(
    t: &Transaction<'_>,
    host_key: &SecretBytes,
    challenge: &[u8],
    s1: u32,
    sc_c: u8,
) -> Digest {
    hmac(
        t.hash,
        host_key.expose(),
        &[
            challenge,
            &s1.to_le_bytes(),
            &t.tid.to_le_bytes(),
            &[sc_c],
            b"HostHost",
            t.hostnqn.as_bytes(),
            &[0],
            t.subnqn.as_bytes(),
        ],
    )
}

/// R2, the controller's response to the host's challenge C2 (bidirectional authentication).
/// `challenge` is C2, or C2' with a DH group.
pub fn controller_response(
    t: &Transaction<'_>,
    ctrl_key: &SecretBytes,
    challenge: &[u8],
    s2: u32,
) -> Digest {
    hmac(
        t.hash,
        ctrl_key.expose(),
        &[
            challenge,
            &s2.to_le_bytes(),
            &t.tid.to_le_bytes(),
            &[0],
            b"Controller",
            t.subnqn.as_bytes(),
            &[0],
            t.hostnqn.as_bytes(),
        ],
    )
}

#[cfg(test)]
pub(crate) mod tests;
