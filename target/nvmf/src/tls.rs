//! The NVMe/TCP secure channel (NVMe TCP transport 1.0 section 3.6): TLS 1.3 with retained
//! pre-shared keys, configured per (host, subsystem) and turned into the TLS PSK for the
//! identity the host offers (`psk::psk_for_identity`); per-listener requirements, which the
//! discovery log reports (TREQ, TSAS).
//!
//! Invariants:
//! - a key is only ever used for the host and subsystem it was configured for: the identity
//!   names both, and the connection's Connect must name the same two (checked in `queue`);
//! - a host with a key configured for a subsystem reaches it only through TLS with that key;
//! - keys never leave this module but as the derived TLS PSK handed to OpenSSL.

use std::collections::BTreeMap;
use std::sync::Arc;

use ballast_tls::{Key, PskHash, TlsServer};
use parking_lot::RwLock;

use crate::psk::{psk_for_identity, CipherHash, Encoding, PskIdentity, TlsKey};
use crate::subsys::DISCOVERY_NQN;

/// TREQ (discovery log entry byte 3), secure channel bits.
pub const TREQ_NOT_SPECIFIED: u8 = 0;
pub const TREQ_REQUIRED: u8 = 1;
pub const TREQ_NOT_REQUIRED: u8 = 2;
/// TSAS for TCP: security type (discovery log entry byte 768).
pub const SECTYPE_NONE: u8 = 0;
pub const SECTYPE_TLS13: u8 = 2;
/// The first byte of a TLS record carrying a handshake message (a ClientHello): what tells a
/// TLS connection from a plaintext one, whose first PDU is an ICReq (type 0).
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What a listener asks of the hosts that connect through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecureChannel {
    /// Plaintext only.
    #[default]
    None,
    /// TLS or plaintext, as each host chooses (hosts with a key must still use TLS).
    Optional,
    /// TLS only.
    Required,
}

impl SecureChannel {
    pub fn treq(self) -> u8 {
        match self {
            SecureChannel::None => TREQ_NOT_SPECIFIED,
            SecureChannel::Optional => TREQ_NOT_REQUIRED,
            SecureChannel::Required => TREQ_REQUIRED,
        }
    }

    pub fn sectype(self) -> u8 {
        match self {
            SecureChannel::None => SECTYPE_NONE,
            _ => SECTYPE_TLS13,
        }
    }
}

type KeyMap = BTreeMap<(String, String), Arc<TlsKey>>;

/// Configured keys and the TLS server that uses them.
pub struct NvmfTls {
    keys: Arc<RwLock<KeyMap>>,
    server: TlsServer,
}

impl NvmfTls {
    pub fn new() -> NvmfTls {
        let keys: Arc<RwLock<KeyMap>> = Arc::default();
        let lookup = keys.clone();
        let server =
            TlsServer::with_psk_resolver(move |identity| resolve(&lookup.read(), identity))
                .expect("an OpenSSL TLS 1.3 PSK context");
        NvmfTls { keys, server }
    }

    /// Sets (or with `None` removes) the key host `hostnqn` uses for subsystem `subnqn`.
    pub fn set_key(&self, hostnqn: &str, subnqn: &str, key: Option<TlsKey>) {
        let mut keys = self.keys.write();
        let k = (hostnqn.to_string(), subnqn.to_string());
        match key {
            Some(key) => {
                keys.insert(k, Arc::new(key));
            }
            None => {
                keys.remove(&k);
            }
        }
    }

    /// Forgets every key for subsystem `subnqn` (it was deleted).
    pub fn remove_subsystem(&self, subnqn: &str) {
        self.keys.write().retain(|(_, s), _| s != subnqn);
    }

    /// Whether host `hostnqn` has a key for subsystem `subnqn` (and so must use TLS there).
    pub fn has_key(&self, hostnqn: &str, subnqn: &str) -> bool {
        self.keys.read().contains_key(&(hostnqn.to_string(), subnqn.to_string()))
    }

    /// Whether any key is configured for `hostnqn` (discovery over TLS uses one of them).
    pub fn host_has_keys(&self, hostnqn: &str) -> bool {
        self.keys.read().keys().any(|(h, _)| h == hostnqn)
    }

    pub fn server(&self) -> &TlsServer {
        &self.server
    }
}

impl Default for NvmfTls {
    fn default() -> Self {
        NvmfTls::new()
    }
}

/// The TLS PSK for `identity`, from the key configured for its host and subsystem; for the
/// discovery subsystem, from the first key configured for the host (hosts insert their
/// configured key for the discovery NQN too: `nvme discover --tls`).
fn resolve(keys: &KeyMap, identity: &str) -> Option<(Key, PskHash)> {
    let id = PskIdentity::parse(identity).ok()?;
    let key = match keys.get(&(id.hostnqn.clone(), id.subnqn.clone())) {
        Some(k) => k.clone(),
        None if id.subnqn == DISCOVERY_NQN => {
            keys.iter().find(|((h, _), _)| *h == id.hostnqn).map(|(_, k)| k.clone())?
        }
        None => return None,
    };
    // libnvme's own encoding first: it is what nvme-cli 2.13 / libnvme 1.13 (Debian trixie)
    // derive, checked against a real host (the NVMe1 digest `nvme check-tls-key --identity=1`
    // prints matches `LibnvmeCompat`); a version 0 identity carries no digest to tell them
    // apart, so the first is the one used.
    match psk_for_identity(&key, &id, &[Encoding::LibnvmeCompat, Encoding::Rfc8446]) {
        Ok((_, psk)) => {
            let hash = match id.hash {
                CipherHash::Sha256 => PskHash::Sha256,
                CipherHash::Sha384 => PskHash::Sha384,
            };
            Some((Key::new(psk.expose().to_vec()), hash))
        }
        Err(e) => {
            tracing::info!(identity, error = %e, "TLS-PSK: the identity does not fit the key");
            None
        }
    }
}

/// The host and subsystem a TLS identity names (once the handshake proved the key).
pub fn identity_names(identity: &str) -> Option<(String, String)> {
    PskIdentity::parse(identity).ok().map(|id| (id.hostnqn, id.subnqn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::psk::derive;

    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6";
    const SUB: &str = "nqn.2026-11.dev.ballast:vol0";

    /// What a real host computed: `nvme check-tls-key --identity=1` (nvme-cli 2.13, libnvme
    /// 1.13, Debian trixie) for this key, host and subsystem printed this identity.
    #[test]
    fn the_digest_a_real_host_printed() {
        let key =
            TlsKey::parse("NVMeTLSkey-1:01:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:")
                .unwrap();
        let host = "nqn.2014-08.org.nvmexpress:uuid:6f1c3c52-0b1e-4c52-9d1c-7e1d1a3d0001";
        let d = derive(&key, host, "nqn.2026-11.dev.ballast:vol0", 1, Encoding::LibnvmeCompat);
        assert_eq!(
            d.unwrap().identity.to_string(),
            format!(
                "NVMe1R01 {host} nqn.2026-11.dev.ballast:vol0 \
                 TUZH9u8DmxnxPmBdIoQNmIYr43Xu/+TBHhM7TZQWdqA="
            )
        );
    }

    #[test]
    fn resolves_the_psk_the_host_derives_and_nothing_else() {
        let key =
            TlsKey::parse("NVMeTLSkey-1:01:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:")
                .expect("libnvme's example key");
        let tls = NvmfTls::new();
        tls.set_key(HOST, SUB, Some(key.clone()));
        for version in [0, 1] {
            let host_side = derive(&key, HOST, SUB, version, Encoding::LibnvmeCompat).unwrap();
            let id = host_side.identity.to_string();
            let (got, _) = resolve(&tls.keys.read(), &id).expect("resolved");
            assert_eq!(got.bytes(), host_side.psk.expose(), "version {version}");
            assert_eq!(identity_names(&id), Some((HOST.into(), SUB.into())));
        }
        let other =
            derive(&key, HOST, "nqn.2026-11.dev.ballast:other", 0, Encoding::Rfc8446).unwrap();
        assert!(resolve(&tls.keys.read(), &other.identity.to_string()).is_none());
        let disc = derive(&key, HOST, DISCOVERY_NQN, 0, Encoding::LibnvmeCompat).unwrap();
        assert_eq!(
            resolve(&tls.keys.read(), &disc.identity.to_string()).unwrap().0.bytes(),
            disc.psk.expose()
        );
        assert!(tls.has_key(HOST, SUB) && !tls.has_key(HOST, DISCOVERY_NQN));
        tls.remove_subsystem("nqn.2026-11.dev.ballast:other");
        assert!(tls.has_key(HOST, SUB));
        tls.remove_subsystem(SUB);
        assert!(!tls.has_key(HOST, SUB));
        assert!(resolve(&tls.keys.read(), &disc.identity.to_string()).is_none());
    }
}
