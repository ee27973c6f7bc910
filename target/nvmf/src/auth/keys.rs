//! The DH-HMAC-CHAP configuration per (host, subsystem): which secrets authenticate host
//! `hostnqn` to subsystem `subnqn` (and, bidirectionally, the subsystem to the host), and the
//! hashes and DH groups the controller picks from (the kernel target's per-host
//! `dhchap_hash` / `dhchap_dhgroup`; SPDK's `dhchap_digests` / `dhchap_dhgroups`).
//!
//! Invariants:
//! - a host with an entry for a subsystem gets ATR in every Connect response for it and no
//!   command but the handshake's own until its queue authenticated (enforced in `queue`);
//! - an entry is shared by every queue that uses it and replaced whole, never edited: a queue
//!   mid-handshake keeps the configuration it started with;
//! - the secrets live only in the [`AuthConfig`] (transformed, zeroized on drop).

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;

use super::{AuthConfig, DhGroup, HashId};

type ConfigMap = BTreeMap<(String, String), Arc<AuthConfig>>;

/// The DH-HMAC-CHAP configurations of a target.
#[derive(Default)]
pub struct AuthKeys {
    configs: RwLock<ConfigMap>,
}

impl std::fmt::Debug for AuthKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pairs: Vec<_> = self.configs.read().keys().cloned().collect();
        f.debug_struct("AuthKeys").field("configured", &pairs).finish()
    }
}

impl AuthKeys {
    /// Sets (or with `None` removes) what host `hostnqn` must prove to reach `subnqn`.
    pub fn set(&self, hostnqn: &str, subnqn: &str, config: Option<AuthConfig>) {
        let key = (hostnqn.to_string(), subnqn.to_string());
        let mut configs = self.configs.write();
        match config {
            Some(config) => {
                configs.insert(key, Arc::new(config));
            }
            None => {
                configs.remove(&key);
            }
        }
    }

    /// The configuration host `hostnqn` authenticates to `subnqn` with, if it must.
    pub fn get(&self, hostnqn: &str, subnqn: &str) -> Option<Arc<AuthConfig>> {
        self.configs.read().get(&(hostnqn.to_string(), subnqn.to_string())).cloned()
    }

    /// Forgets every entry for subsystem `subnqn` (it was deleted).
    pub fn remove_subsystem(&self, subnqn: &str) {
        self.configs.write().retain(|(_, sub), _| sub != subnqn);
    }
}

/// A hash by its SPDK / kernel name (`sha256`, `sha384`, `sha512`).
pub fn hash_by_name(name: &str) -> Option<HashId> {
    HashId::ALL.into_iter().find(|h| h.name() == name)
}

/// A DH group by its SPDK / kernel name (`null`, `ffdhe2048` … `ffdhe8192`).
pub fn dh_group_by_name(name: &str) -> Option<DhGroup> {
    DhGroup::ALL.into_iter().find(|g| g.name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::DhchapSecret;

    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6";
    const SUB: &str = "nqn.2026-11.dev.ballast:vol0";

    #[test]
    fn entries_are_per_host_and_subsystem() {
        let key = crate::secret::SecretBytes::new((0u8..32).collect());
        let secret = DhchapSecret::new(Some(HashId::Sha256), key).expect("a SHA-256 secret");
        let text = secret.encode();
        let keys = AuthKeys::default();
        keys.set(HOST, SUB, Some(AuthConfig::new(HOST, SUB, &secret, None)));
        assert!(keys.get(HOST, SUB).is_some());
        assert!(keys.get(HOST, "nqn.2026-11.dev.ballast:vol1").is_none());
        assert!(keys.get("nqn.other", SUB).is_none());
        let body = text.split(':').nth(2).expect("DHHC-1:01:<body>:");
        assert!(!format!("{keys:?} {:?}", keys.get(HOST, SUB)).contains(body));
        keys.remove_subsystem(SUB);
        assert!(keys.get(HOST, SUB).is_none());
        keys.set(HOST, SUB, Some(AuthConfig::new(HOST, SUB, &secret, Some(&secret))));
        assert!(keys.get(HOST, SUB).expect("set again").bidirectional());
        keys.set(HOST, SUB, None);
        assert!(keys.get(HOST, SUB).is_none());
    }

    #[test]
    fn names_are_the_kernels() {
        assert_eq!(hash_by_name("sha384"), Some(HashId::Sha384));
        assert_eq!(hash_by_name("SHA384"), None);
        assert_eq!(dh_group_by_name("null"), Some(DhGroup::Null));
        assert_eq!(dh_group_by_name("ffdhe3072"), Some(DhGroup::Ffdhe3072));
        assert_eq!(dh_group_by_name("ffdhe1024"), None);
    }
}
