//! The pool seen as SPDK sees an lvol store: its name, its UUID and every volume's UUID (the
//! registry resolves the names SPDK's tools use, `LVS/LVOL` alias, UUID or plain name, with
//! them).
//!
//! A leaf module (it uses no other module of the daemon). Invariants:
//! - identities live in the pool's configuration, so they survive restarts and travel with the
//!   pool: `lvs:name` (the store's name, [`DEFAULT_LVS_NAME`] until renamed) and `uuid:NAME`
//!   (one per volume, a random version-4 UUID, lowercase with dashes);
//! - the store's UUID is the pool's own identity from its superblock;
//! - a volume's UUID is assigned when the volume is created or, for volumes older than this
//!   scheme, when it is first exported, and dropped when it is deleted; no two volumes share one;
//! - a volume's rate limits (`bdev_set_qos_limit`) are kept as `qos:NAME` ("IOS,RW,R,W": I/Os
//!   per second, MiB per second of reads and writes, of reads, of writes), applied when it is
//!   exported, and dropped with it;
//! - a renamed volume keeps its UUID and rate limits: they move to its new name in the same
//!   batch as the rename ([`renaming`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use ballast_engine::qos::QosLimits;
use ballast_engine::volume::dev::PoolHandle;
use ballast_engine::volume::pool::PoolError;

/// The store's name until `bdev_lvol_rename_lvstore` sets another.
pub const DEFAULT_LVS_NAME: &str = "lvs0";
const LVS_NAME_KEY: &str = "lvs:name";

/// The entry key of volume `volume`'s UUID.
pub fn uuid_key(volume: &str) -> String {
    format!("uuid:{volume}")
}

fn qos_key(volume: &str) -> String {
    format!("qos:{volume}")
}

/// Why an identity could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum LvstoreError {
    #[error("generating a UUID: {0}")]
    Random(#[source] std::io::Error),
    #[error("storing {key} in the pool: {source}")]
    Store {
        key: String,
        #[source]
        source: PoolError,
    },
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lowercase.
pub fn format_uuid(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// A UUID in any case, with or without dashes, in its canonical form; `None` if it is not one.
pub fn canonical_uuid(s: &str) -> Option<String> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(format_uuid(&b))
}

/// A fresh random (version 4) UUID.
pub fn random_uuid() -> Result<String, LvstoreError> {
    let mut b = [0u8; 16];
    ballast_ffi::sys::random_bytes(&mut b).map_err(LvstoreError::Random)?;
    Ok(uuid_of(b, 4))
}

/// 16 bytes laid out as an RFC 4122 UUID of `version` (4: random, 5: from a hash).
pub fn uuid_of(mut b: [u8; 16], version: u8) -> String {
    b[6] = (b[6] & 0x0f) | (version << 4);
    b[8] = (b[8] & 0x3f) | 0x80;
    format_uuid(&b)
}

pub fn lvs_name(pool: &PoolHandle) -> String {
    let m = pool.meta();
    m.config().get(LVS_NAME_KEY).cloned().unwrap_or_else(|| DEFAULT_LVS_NAME.to_string())
}

pub fn lvs_uuid(pool: &PoolHandle) -> String {
    format_uuid(&pool.meta().superblock().pool_uuid)
}

pub fn set_lvs_name(pool: &Arc<PoolHandle>, name: &str) -> Result<(), LvstoreError> {
    pool.set_config(LVS_NAME_KEY, name)
        .map_err(|source| LvstoreError::Store { key: LVS_NAME_KEY.into(), source })
}

/// Whether `uuid` (any spelling) is this store's UUID.
pub fn is_lvs_uuid(pool: &PoolHandle, uuid: &str) -> bool {
    canonical_uuid(uuid).is_some_and(|u| u == lvs_uuid(pool))
}

/// Volume `name`'s UUID, if it has one yet.
pub fn volume_uuid(pool: &PoolHandle, name: &str) -> Option<String> {
    pool.meta().config().get(&uuid_key(name)).cloned()
}

/// Volume `name`'s UUID, assigning (and storing) a fresh one if it has none.
pub fn ensure_volume_uuid(pool: &Arc<PoolHandle>, name: &str) -> Result<String, LvstoreError> {
    match volume_uuid(pool, name) {
        Some(u) => Ok(u),
        None => assign_volume_uuid(pool, name),
    }
}

/// Gives a new volume a fresh UUID (replacing any left by a deleted volume of that name).
pub fn assign_volume_uuid(pool: &Arc<PoolHandle>, name: &str) -> Result<String, LvstoreError> {
    let uuid = random_uuid()?;
    let key = uuid_key(name);
    pool.set_config(&key, &uuid).map_err(|source| LvstoreError::Store { key, source })?;
    Ok(uuid)
}

/// Drops a deleted volume's UUID and rate limits (best effort: a stale entry names no volume
/// and is ignored; a volume made later under the name gets a fresh UUID and no limits).
pub fn forget_volume(pool: &Arc<PoolHandle>, name: &str) {
    let config = pool.meta().config().clone();
    for key in [uuid_key(name), qos_key(name)] {
        if config.contains_key(&key) {
            if let Err(e) = pool.set_config(&key, "") {
                tracing::warn!(volume = name, key, error = %e, "could not drop the volume's entry");
            }
        }
    }
}

/// Volume `name`'s kept rate limits (none kept, or unreadable: none).
pub fn volume_limits(pool: &PoolHandle, name: &str) -> QosLimits {
    let Some(text) = pool.meta().config().get(&qos_key(name)).cloned() else {
        return QosLimits::default();
    };
    let parsed: Option<Vec<u64>> = text.split(',').map(|n| n.parse().ok()).collect();
    match parsed.as_deref() {
        Some(&[ios, rw, r, w]) => QosLimits {
            rw_ios_per_sec: ios,
            rw_mbytes_per_sec: rw,
            r_mbytes_per_sec: r,
            w_mbytes_per_sec: w,
        },
        _ => {
            tracing::warn!(volume = name, text, "kept rate limits unreadable: none applied");
            QosLimits::default()
        }
    }
}

/// Keeps volume `name`'s rate limits in the pool (none: the entry goes).
pub fn store_volume_limits(
    pool: &Arc<PoolHandle>,
    name: &str,
    l: QosLimits,
) -> Result<(), LvstoreError> {
    let value = if l == QosLimits::default() {
        String::new()
    } else {
        let (a, b, c, d) =
            (l.rw_ios_per_sec, l.rw_mbytes_per_sec, l.r_mbytes_per_sec, l.w_mbytes_per_sec);
        format!("{a},{b},{c},{d}")
    };
    let key = qos_key(name);
    pool.set_config(&key, &value).map_err(|source| LvstoreError::Store { key, source })
}

/// Configuration entries (key, value; an empty value removes the key).
pub type Entries = Vec<(String, String)>;

/// The entries that carry volume `old`'s UUID and rate limits to its new name `new`
/// (`bdev_lvol_rename`): the new name's set (or, where `old` has none, whatever an earlier
/// volume of that name left removed) to go ahead of the rename, the old name's removed to go
/// behind it.
pub fn renaming(config: &BTreeMap<String, String>, old: &str, new: &str) -> (Entries, Entries) {
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for (from, to) in [(uuid_key(old), uuid_key(new)), (qos_key(old), qos_key(new))] {
        match config.get(&from) {
            Some(value) => {
                before.push((to, value.clone()));
                after.push((from, String::new()));
            }
            None if config.contains_key(&to) => before.push((to, String::new())),
            None => {}
        }
    }
    (before, after)
}

/// SPDK's alias of volume `name`: `LVS_NAME/NAME`.
pub fn alias(pool: &PoolHandle, name: &str) -> String {
    format!("{}/{name}", lvs_name(pool))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_canonical_lowercase_with_dashes() {
        let b: [u8; 16] = core::array::from_fn(|i| (i * 17) as u8);
        let u = format_uuid(&b);
        assert_eq!(u, "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(canonical_uuid("00112233445566778899AABBCCDDEEFF").as_deref(), Some(&*u));
        assert_eq!(canonical_uuid(&u.to_uppercase()).as_deref(), Some(&*u));
        assert_eq!(canonical_uuid("lvs0/vol0"), None);
        assert_eq!(canonical_uuid("0011223344556677889aabbccddeeff"), None);
    }

    #[test]
    fn random_uuids_are_version_4_and_differ() {
        let a = random_uuid().unwrap();
        let b = random_uuid().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
    }
}
