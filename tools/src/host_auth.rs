//! A host's keys for one subsystem: from the keyring names `nvmf_subsystem_add_host` was given
//! to the TLS PSK and DH-HMAC-CHAP configuration the target enforces, and putting a host in
//! place with them, at the call and when the configuration is restored at start-up.
//!
//! Invariants:
//! - a host is admitted only with every key it was configured with: [`admit`] installs the
//!   keys before it lists the host, and a host whose keys cannot be resolved at restore is
//!   listed but in its subsystem's `refused_hosts` ([`refuse`]), never admitted without them;
//! - errors name keys, never their text.

use ballast_nvmf::auth::keys::{dh_group_by_name, hash_by_name};
use ballast_nvmf::auth::{AuthConfig, DhGroup, DhchapSecret, HashId};
use ballast_nvmf::psk::TlsKey;
use ballast_nvmf::subsys::Subsystem;

use crate::control::{Control, HostKeyNames};
use crate::keyring::Keyring;

/// Why a host's keys could not be put together (names only).
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("no key named {0:?} in the keyring")]
    NoKey(String),
    #[error("a key's text was given where a keyring name belongs (not shown): add it to the keyring (keyring_file_add_key) and give its name")]
    KeyTextForName,
    #[error("key {name:?} is unavailable: {why}")]
    Unavailable { name: String, why: String },
    #[error("key {name:?}: {why}")]
    BadKey { name: String, why: String },
    #[error("dhchap_ctrlr_key, dhchap_digests and dhchap_dhgroups need dhchap_key")]
    NeedsDhchapKey,
    #[error("unknown digest {0:?}")]
    UnknownDigest(String),
    #[error("unknown DH group {0:?}")]
    UnknownDhGroup(String),
    #[error("DH-HMAC-CHAP preferences: {0}")]
    Preferences(String),
}

/// The keys a host must prove, ready for the target.
pub struct HostKeys {
    psk: Option<TlsKey>,
    auth: Option<AuthConfig>,
}

/// The text of key `name`, or why there is none.
fn key_text(keyring: &Keyring, name: &str) -> Result<zeroize::Zeroizing<String>, HostKeyError> {
    if let Some(text) = keyring.text(name) {
        return Ok(text);
    }
    match keyring.list().into_iter().find(|k| k.name == name).and_then(|k| k.unavailable) {
        Some(why) => Err(HostKeyError::Unavailable { name: name.into(), why }),
        // nvme-cli takes key text where SPDK takes a keyring name: such a "name" is not
        // repeated in the reply or the log.
        None if crate::keyring::looks_like_key_text(name) => Err(HostKeyError::KeyTextForName),
        None => Err(HostKeyError::NoKey(name.into())),
    }
}

fn dhchap_secret(keyring: &Keyring, name: &str) -> Result<DhchapSecret, HostKeyError> {
    let text = key_text(keyring, name)?;
    DhchapSecret::parse(&text)
        .map_err(|e| HostKeyError::BadKey { name: name.into(), why: e.to_string() })
}

/// The keys `names` ask of host `host` on subsystem `nqn`, from `keyring`.
pub fn resolve(
    keyring: &Keyring,
    nqn: &str,
    host: &str,
    names: &HostKeyNames,
) -> Result<HostKeys, HostKeyError> {
    let psk = match &names.psk {
        Some(name) => {
            let text = key_text(keyring, name)?;
            let key = TlsKey::parse(&text)
                .map_err(|e| HostKeyError::BadKey { name: name.clone(), why: e.to_string() })?;
            Some(key)
        }
        None => None,
    };
    Ok(HostKeys { psk, auth: dhchap_config(keyring, nqn, host, names)? })
}

/// The DH-HMAC-CHAP configuration `names` ask for, if any.
fn dhchap_config(
    keyring: &Keyring,
    nqn: &str,
    host: &str,
    names: &HostKeyNames,
) -> Result<Option<AuthConfig>, HostKeyError> {
    let Some(host_key) = &names.dhchap_key else {
        let extra = names.dhchap_ctrlr_key.is_some()
            || names.dhchap_digests.is_some()
            || names.dhchap_dhgroups.is_some();
        return if extra { Err(HostKeyError::NeedsDhchapKey) } else { Ok(None) };
    };
    let host_secret = dhchap_secret(keyring, host_key)?;
    let ctrl_secret =
        names.dhchap_ctrlr_key.as_deref().map(|n| dhchap_secret(keyring, n)).transpose()?;
    let config = AuthConfig::new(host, nqn, &host_secret, ctrl_secret.as_ref());
    if names.dhchap_digests.is_none() && names.dhchap_dhgroups.is_none() {
        return Ok(Some(config));
    }
    let listed = |list: &Option<Vec<String>>, all: Vec<&'static str>| -> Vec<String> {
        match list {
            Some(list) => list.clone(),
            None => all.into_iter().rev().map(String::from).collect(),
        }
    };
    let digests = listed(&names.dhchap_digests, HashId::ALL.iter().map(|h| h.name()).collect());
    let groups = listed(&names.dhchap_dhgroups, DhGroup::ALL.iter().map(|g| g.name()).collect());
    let hashes = digests
        .iter()
        .map(|n| hash_by_name(n).ok_or_else(|| HostKeyError::UnknownDigest(n.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    let dh_groups = groups
        .iter()
        .map(|n| dh_group_by_name(n).ok_or_else(|| HostKeyError::UnknownDhGroup(n.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    config
        .with_preferences(&hashes, &dh_groups)
        .map(Some)
        .map_err(|e| HostKeyError::Preferences(e.to_string()))
}

fn remember(control: &Control, nqn: &str, host: &str, names: &HostKeyNames) {
    let key = (nqn.to_string(), host.to_string());
    let mut host_keys = control.host_keys.write();
    if *names == HostKeyNames::default() {
        host_keys.remove(&key);
    } else {
        host_keys.insert(key, names.clone());
    }
}

/// Lets `host` reach `subsys` with `keys` (replacing what it had): the keys first, then the
/// host list, then the end of any refusal, so it is never admitted without them.
pub fn admit(
    control: &Control,
    subsys: &Subsystem,
    host: &str,
    names: &HostKeyNames,
    keys: HostKeys,
) {
    let nqn = subsys.nqn.as_str();
    control.target.tls.set_key(host, nqn, keys.psk);
    control.target.auth.set(host, nqn, keys.auth);
    remember(control, nqn, host, names);
    subsys.hosts.write().insert(host.to_string());
    subsys.refused_hosts.write().remove(host);
}

/// Lists `host` on `subsys` with its key names but refuses it: its keys could not be resolved.
pub fn refuse(control: &Control, subsys: &Subsystem, host: &str, names: &HostKeyNames) {
    let nqn = subsys.nqn.as_str();
    subsys.refused_hosts.write().insert(host.to_string());
    control.target.tls.set_key(host, nqn, None);
    control.target.auth.set(host, nqn, None);
    remember(control, nqn, host, names);
    subsys.hosts.write().insert(host.to_string());
}

/// Forgets `host` on `subsys`: its listing, keys and refusal; then ends its controllers there
/// (what it connected while allowed does not outlive the permission, nor the keys it proved).
pub fn forget(control: &Control, subsys: &Subsystem, host: &str) {
    let nqn = subsys.nqn.as_str();
    subsys.hosts.write().remove(host);
    control.target.tls.set_key(host, nqn, None);
    control.target.auth.set(host, nqn, None);
    control.host_keys.write().remove(&(nqn.to_string(), host.to_string()));
    subsys.refused_hosts.write().remove(host);
    let ended = control.target.disconnect_host(nqn, host);
    if ended > 0 {
        tracing::info!(host, nqn, controllers = ended, "host removed: its controllers end");
    }
}

/// The hosts configured with key `name`: ((subsystem NQN, host NQN), their key names).
pub fn users_of(control: &Control, name: &str) -> Vec<((String, String), HostKeyNames)> {
    control
        .host_keys
        .read()
        .iter()
        .filter(|(_, names)| names.key_names().any(|n| n == name))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Key `name` was added to the keyring: every refused host configured with it whose keys now
/// all resolve is admitted. Returns how many were.
pub fn readmit_with(control: &Control, name: &str) -> usize {
    let waiting = users_of(control, name);
    let mut admitted = 0;
    for ((nqn, host), names) in waiting {
        let Some(subsys) = control.target.subsystem(&nqn) else { continue };
        if !subsys.refused_hosts.read().contains(&host) {
            continue;
        }
        match resolve(&control.keyring, &nqn, &host, &names) {
            Ok(keys) => {
                admit(control, &subsys, &host, &names, keys);
                tracing::info!(host, nqn, key = name, "host admitted again: its keys are back");
                admitted += 1;
            }
            Err(e) => {
                tracing::warn!(host, nqn, error = %e, "host still refused: a key is missing");
            }
        }
    }
    if admitted > 0 {
        control.target.genctr.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    admitted
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Key text given where a keyring name belongs is refused without being repeated.
    #[test]
    fn key_text_given_as_a_name_is_not_repeated() {
        let ring = Keyring::default();
        let text = "DHHC-1:00:c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0:";
        let e = key_text(&ring, text).unwrap_err();
        assert!(matches!(e, HostKeyError::KeyTextForName));
        assert!(!e.to_string().contains("c2Vj"), "{e}");
        assert!(matches!(key_text(&ring, "k1").unwrap_err(), HostKeyError::NoKey(_)));
    }
}
