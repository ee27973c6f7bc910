//! The codec between the daemon's NVMe-oF and keyring settings and the pool's configuration
//! entries (`Config` records: key → value of at most `CONFIG_VALUE_MAX` bytes, an empty value
//! removing the key). Pure: no I/O, no clock, no randomness (generations are given).
//!
//! Entries (values are JSON objects; fields added later must default, and unknown ones are
//! refused so a value is never half understood):
//!
//! - `keyring:H(name)` → [`StoredKey`] `{name, path}`: a key's name and file, never its text;
//! - `nvmf:H(nqn)` → [`StoredSubsystem`] `{nqn, gen, created, allow_any_host, serial_number?,
//!   model_number?}`: the subsystem's anchor;
//! - `nvmf:H(nqn):host:H(host)` → [`StoredHost`] `{gen, host, keys: {psk?, dhchap_key?,
//!   dhchap_ctrlr_key?, dhchap_digests?, dhchap_dhgroups?}}`: a host and its key *names*;
//! - `nvmf:H(nqn):listener:H(addr)` → [`StoredListener`] `{gen, addr, listen,
//!   secure_channel}`;
//! - `nvmf:H(nqn):ns:NSID` → [`StoredNamespace`] `{gen, nsid, bdev, block_size}`;
//! - `ana:H(nqn):H(addr)` → [`StoredAna`] `{gen, nqn, addr, all, groups}`: a listener's ANA
//!   states other than optimized (SPDK's names), outside the subsystem's own entries so that a
//!   build that does not know them ignores them (an unreadable one is a problem, never damage:
//!   the listener starts optimized);
//! - `hosts:VOLUME` (legacy) → `{allow_any_host, hosts}`: a volume's subsystem as kept before
//!   anchors; read, never written.
//!
//! `H(x)` is the first 12 bytes of SHA-256(x) in hex, so keys stay short whatever the names
//! (NQNs reach 223 bytes, key names 256); the value names what the key stands for and is
//! checked against it.
//!
//! Invariants:
//! - a child entry (host, listener, namespace) counts only under a readable anchor with the
//!   same `gen`; a subsystem made again gets a new `gen`, so nothing left of an earlier one of
//!   the same name ever applies to it (such entries are `stale`);
//! - a crash keeps a prefix of a batch (`PoolMeta::set_configs`), so batches put children
//!   before their anchor, the anchor before the legacy entry's removal, and a subsystem's
//!   anchor removal before its children's: every prefix decodes to the state before or after;
//! - decoding never fails as a whole: an entry it cannot read is reported in `problems`, and
//!   its subsystem is marked `damaged` (or, for an anchor, listed in `unreadable`) so the
//!   daemon restores it admitting only the hosts it could read (fail closed);
//! - no value holds key text: only keyring names and file paths.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use ballast_engine::volume::records::CONFIG_VALUE_MAX;
use ballast_nvmf::ana::ListenerStates;
use ballast_nvmf::subsys::NQN_PREFIX;
use ballast_nvmf::tls::SecureChannel;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::control::HostKeyNames;

const KEYRING: &str = "keyring:";
const NVMF: &str = "nvmf:";
const LEGACY_HOSTS: &str = "hosts:";
const RESERVATIONS: &str = "resv:";
const ANA: &str = "ana:";
const HOST: &str = "host";
const LISTENER: &str = "listener";
const NAMESPACE: &str = "ns";
/// Bytes of SHA-256 a key keeps (hex: twice as many characters).
const DIGEST_BYTES: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(
        "{what} needs {len_bytes} bytes in the pool's configuration, more than the \
         {CONFIG_VALUE_MAX} one entry may hold"
    )]
    TooLong { what: String, len_bytes: usize },
    #[error("encoding {what}: {source}")]
    Encode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A keyring key: its name and file (never its text).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    pub name: String,
    pub path: String,
}

/// A subsystem's anchor: what it is, and the generation its other entries carry.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredSubsystem {
    pub nqn: String,
    pub gen: u64,
    /// Made by `nvmf_create_subsystem`: restoring makes it again. Otherwise the daemon makes
    /// it (a volume's, a startup export's) and only its settings are kept.
    #[serde(default)]
    pub created: bool,
    pub allow_any_host: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_number: Option<String>,
    /// `nvmf_create_subsystem`'s `max_namespaces` (absent: the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_namespaces: Option<u32>,
}

/// A host allowed on a subsystem, with the keyring names of its keys.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredHost {
    pub gen: u64,
    pub host: String,
    #[serde(default)]
    pub keys: HostKeyNames,
}

/// An address a subsystem was told to listen on (`listen`) or to stop listening on (`!listen`:
/// one of the daemon's default listeners taken away from it).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredListener {
    pub gen: u64,
    pub addr: SocketAddr,
    pub listen: bool,
    #[serde(default)]
    pub secure_channel: SecureChannel,
}

/// A listener's ANA states (`nvmf_subsystem_listener_set_ana_state`) where some group is not
/// optimized: `all` for every group without its own, by SPDK's state names.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredAna {
    pub gen: u64,
    pub nqn: String,
    pub addr: SocketAddr,
    pub all: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<u32, String>,
}

/// A namespace added by `nvmf_subsystem_add_ns`, by the name of its device.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredNamespace {
    pub gen: u64,
    pub nsid: u32,
    pub bdev: String,
    pub block_size: u32,
    /// The device's UUID when the namespace was added: restored only onto that device (a
    /// RAM bdev's is new at each start, so its namespace never comes back; another device
    /// given the name later is not attached). Absent in entries from before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Its ANA group when given (`anagrpid`); absent: its id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anagrpid: Option<u32>,
}

/// A volume's subsystem as kept before anchors existed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyHosts {
    #[serde(default = "yes")]
    allow_any_host: bool,
    #[serde(default)]
    hosts: Vec<String>,
}

fn yes() -> bool {
    true
}

/// One subsystem's kept settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsystemConfig {
    pub subsystem: StoredSubsystem,
    /// From the legacy `hosts:VOLUME` entry: hosts without keys, nothing else.
    pub legacy: bool,
    /// One of its entries could not be read: it is restored admitting listed hosts only.
    pub damaged: bool,
    pub hosts: Vec<StoredHost>,
    pub listeners: Vec<StoredListener>,
    pub namespaces: Vec<StoredNamespace>,
    /// Its listeners' ANA states (not optimized somewhere).
    pub ana: Vec<StoredAna>,
}

/// Everything a pool's configuration holds for the daemon's NVMe-oF and keyring settings.
#[derive(Debug, Default)]
pub struct Decoded {
    pub keys: Vec<StoredKey>,
    pub subsystems: Vec<SubsystemConfig>,
    /// Anchor keys whose value could not be read: the subsystem behind each (found by
    /// [`anchor_key`]) admits no host until set again.
    pub unreadable: BTreeSet<String>,
    /// Entries that no longer apply (another generation, no anchor, a superseded legacy
    /// entry): removing them changes nothing.
    pub stale: Vec<String>,
    /// One line per entry that could not be read, naming its key.
    pub problems: Vec<String>,
}

fn digest(s: &str) -> String {
    let d = Sha256::digest(s.as_bytes());
    d[..DIGEST_BYTES].iter().map(|b| format!("{b:02x}")).collect()
}

/// The entry key of keyring key `name`.
pub fn key_entry_key(name: &str) -> String {
    format!("{KEYRING}{}", digest(name))
}

/// The anchor's entry key of subsystem `nqn` (its other entries' keys start with it).
pub fn anchor_key(nqn: &str) -> String {
    format!("{NVMF}{}", digest(nqn))
}

pub fn host_key(nqn: &str, host: &str) -> String {
    format!("{}:{HOST}:{}", anchor_key(nqn), digest(host))
}

pub fn listener_key(nqn: &str, addr: &SocketAddr) -> String {
    format!("{}:{LISTENER}:{}", anchor_key(nqn), digest(&addr.to_string()))
}

pub fn namespace_key(nqn: &str, nsid: u32) -> String {
    format!("{}:{NAMESPACE}:{nsid}", anchor_key(nqn))
}

/// The entry key of listener `addr`'s ANA states in subsystem `nqn`.
pub fn ana_key(nqn: &str, addr: &SocketAddr) -> String {
    format!("{}{}", ana_prefix(nqn), digest(&addr.to_string()))
}

fn ana_prefix(nqn: &str) -> String {
    format!("{ANA}{}:", digest(nqn))
}

/// The entry keeping listener `addr`'s ANA states `l` in subsystem `nqn` (generation `gen`).
pub fn ana_entry(
    gen: u64,
    nqn: &str,
    addr: SocketAddr,
    l: &ListenerStates,
) -> Result<(String, String), CodecError> {
    let groups = l.groups.iter().map(|(g, s)| (*g, s.name().to_string())).collect();
    let all = l.all.name().to_string();
    entry(ana_key(nqn, &addr), &StoredAna { gen, nqn: nqn.into(), addr, all, groups })
}

/// The entries of listener `addr` of subsystem `anchor` added (`listen`) or removed. A removal
/// is kept as such where the daemon would listen by default (`!anchor.created`), and simply
/// forgotten otherwise. A listener added anew (`fresh`) starts with the ANA states given
/// (`None`: optimized); a removed one forgets its states (`kept_ana`: the pool holds some).
/// Ordered so that every prefix decodes to the state before or after: an addition puts the
/// states before the listener, a removal takes the listener away before its states (a prefix
/// keeping states without their listener applies to nothing; never a listener back without
/// the states it had).
pub fn listener_change(
    anchor: &StoredSubsystem,
    addr: SocketAddr,
    listen: bool,
    secure_channel: SecureChannel,
    fresh: Option<Option<&ListenerStates>>,
    kept_ana: bool,
) -> Result<Vec<(String, String)>, CodecError> {
    let nqn = anchor.nqn.as_str();
    let key = listener_key(nqn, &addr);
    let listener = if !listen && anchor.created {
        removal(key)
    } else {
        entry(key, &StoredListener { gen: anchor.gen, addr, listen, secure_channel })?
    };
    let ana = match fresh.filter(|_| listen) {
        Some(Some(l)) => Some(ana_entry(anchor.gen, nqn, addr, l)?),
        Some(None) | None if kept_ana && (!listen || fresh.is_some()) => {
            Some(removal(ana_key(nqn, &addr)))
        }
        _ => None,
    };
    Ok(match (listen, ana) {
        (true, Some(ana)) => vec![ana, listener],
        (false, Some(ana)) => vec![listener, ana],
        (_, None) => vec![listener],
    })
}

/// The entry key of namespace `nsid` of `nqn`'s kept reservation table (`resv_store`): outside
/// the subsystem's own entries, which this codec reads whole.
pub fn reservations_key(nqn: &str, nsid: u32) -> String {
    format!("{}{nsid}", reservations_prefix(nqn))
}

/// The entries removing every kept reservation table of `nqn`'s namespaces.
pub fn forgetting_reservations(
    config: &BTreeMap<String, String>,
    nqn: &str,
) -> Vec<(String, String)> {
    under(config, &reservations_prefix(nqn)).map(|(k, _)| removal(k.clone())).collect()
}

/// The entries of `config` whose keys start with `prefix`, in key order.
fn under<'a>(
    config: &'a BTreeMap<String, String>,
    prefix: &str,
) -> impl Iterator<Item = (&'a String, &'a String)> {
    let prefix = prefix.to_string();
    config.range(prefix.clone()..).take_while(move |(k, _)| k.starts_with(&prefix))
}

fn reservations_prefix(nqn: &str) -> String {
    format!("{RESERVATIONS}{}:", digest(nqn))
}

/// The legacy entry key of a volume's subsystem `nqn` (daemon-named NQNs only).
pub fn legacy_key(nqn: &str) -> Option<String> {
    nqn.strip_prefix(NQN_PREFIX).map(|name| format!("{LEGACY_HOSTS}{name}"))
}

/// The entry setting `key` to `value`, refused if it would not fit one configuration entry.
pub fn entry<T: Serialize>(key: String, value: &T) -> Result<(String, String), CodecError> {
    let text = serde_json::to_string(value)
        .map_err(|source| CodecError::Encode { what: key.clone(), source })?;
    if text.len() > CONFIG_VALUE_MAX {
        return Err(CodecError::TooLong { what: key, len_bytes: text.len() });
    }
    Ok((key, text))
}

/// The entry removing `key`.
pub fn removal(key: String) -> (String, String) {
    (key, String::new())
}

/// The entries giving subsystem `anchor.nqn` an anchor: `hosts` (its hosts as they are now,
/// under `anchor.gen`), then the anchor, then the removal of its legacy entry if `config`
/// has one. Every prefix decodes to the settings before (legacy or none) or after.
pub fn anchoring(
    config: &BTreeMap<String, String>,
    anchor: &StoredSubsystem,
    hosts: &[StoredHost],
) -> Result<Vec<(String, String)>, CodecError> {
    let nqn = anchor.nqn.as_str();
    let mut out = Vec::with_capacity(hosts.len() + 2);
    for h in hosts {
        assert_eq!(h.gen, anchor.gen, "a snapshot's hosts carry the new anchor's generation");
        out.push(entry(host_key(nqn, &h.host), h)?);
    }
    out.push(entry(anchor_key(nqn), anchor)?);
    if let Some(legacy) = legacy_key(nqn).filter(|k| config.contains_key(k)) {
        out.push(removal(legacy));
    }
    Ok(out)
}

/// The entries removing everything kept for subsystem `nqn`: its anchor first (which makes
/// the rest stale at once), then its other entries, then its legacy entry.
pub fn forgetting(config: &BTreeMap<String, String>, nqn: &str) -> Vec<(String, String)> {
    let anchor = anchor_key(nqn);
    let children = format!("{anchor}:");
    let mut out = Vec::new();
    if config.contains_key(&anchor) {
        out.push(removal(anchor.clone()));
    }
    out.extend(under(config, &children).map(|(k, _)| removal(k.clone())));
    // Its namespaces' kept reservations and its listeners' ANA states (outside the
    // subsystem's own entries).
    out.extend(forgetting_reservations(config, nqn));
    out.extend(under(config, &ana_prefix(nqn)).map(|(k, _)| removal(k.clone())));
    if let Some(legacy) = legacy_key(nqn).filter(|k| config.contains_key(k)) {
        out.push(removal(legacy));
    }
    out
}

/// The entries that move what `config` keeps for a volume renamed from `old` to `new`
/// (`bdev_lvol_rename`): its subsystem's entries (anchor, hosts, listeners, namespaces, ANA
/// states, legacy entry) from `old`'s NQN to `new`'s, and every kept namespace made from
/// device `old` renamed to `new`, given its UUID (`uuid`, the volume's) where it had none, so
/// that restoring finds the device by it whichever name a crash left. Reservation tables are
/// not moved but forgotten with the old subsystem: a table is bound to its namespace's NGUID,
/// which derives from the NQN (the daemon renames no volume whose subsystem holds any). Values that cannot be read are moved as they are, so what was refused before is
/// refused after. `before` goes ahead of the rename in the journal: whatever an earlier
/// subsystem of `new`'s NQN left is forgotten, then the children, then the anchor (a prefix
/// holds no new anchor without its children). `after` goes behind it: the old subsystem's
/// entries forgotten, anchor first.
pub fn renaming(
    config: &BTreeMap<String, String>,
    old: &str,
    new: &str,
    uuid: Option<&str>,
) -> Result<Renaming, CodecError> {
    let (old_nqn, new_nqn) = (format!("{NQN_PREFIX}{old}"), format!("{NQN_PREFIX}{new}"));
    let (old_anchor, new_anchor) = (anchor_key(&old_nqn), anchor_key(&new_nqn));
    let new_children = format!("{new_anchor}:");
    let renamed_ns = |key: &str, value: &str| -> Result<Option<(String, String)>, CodecError> {
        match parse::<StoredNamespace>(value) {
            Ok(ns) if ns.bdev == old => {
                let uuid = ns.uuid.or_else(|| uuid.map(String::from));
                Ok(Some(entry(key.to_string(), &StoredNamespace { bdev: new.into(), uuid, ..ns })?))
            }
            _ => Ok(None),
        }
    };
    let mut before = forgetting(config, &new_nqn);
    let children = format!("{old_anchor}:");
    for (key, value) in under(config, &children) {
        let moved = format!("{new_anchor}:{}", &key[children.len()..]);
        let is_ns = key[children.len()..].starts_with(&format!("{NAMESPACE}:"));
        match renamed_ns(&moved, value)?.filter(|_| is_ns) {
            Some(e) => before.push(e),
            None => before.push((moved, value.clone())),
        }
    }
    let (old_ana, new_ana) = (ana_prefix(&old_nqn), ana_prefix(&new_nqn));
    for (key, value) in under(config, &old_ana) {
        match parse::<StoredAna>(value) {
            Ok(a) if a.nqn == old_nqn && ana_key(&old_nqn, &a.addr) == *key => {
                let a = StoredAna { nqn: new_nqn.clone(), ..a };
                before.push(entry(ana_key(&new_nqn, &a.addr), &a)?);
            }
            _ => before.push((format!("{new_ana}{}", &key[old_ana.len()..]), value.clone())),
        }
    }
    if let (Some(from), Some(to)) = (legacy_key(&old_nqn), legacy_key(&new_nqn)) {
        if let Some(value) = config.get(&from) {
            before.push((to, value.clone()));
        }
    }
    if let Some(value) = config.get(&old_anchor) {
        match parse::<StoredSubsystem>(value) {
            Ok(s) if s.nqn == old_nqn => {
                before.push(entry(new_anchor.clone(), &StoredSubsystem { nqn: new_nqn, ..s })?)
            }
            _ => before.push((new_anchor, value.clone())),
        }
    }
    // Namespaces of other subsystems made from the volume (not the old subsystem's, moved
    // above, nor what an earlier subsystem of the new name left, forgotten above).
    for (key, value) in under(config, NVMF) {
        let rest = &key[NVMF.len()..];
        let moved = key.starts_with(&children) || key.starts_with(&new_children);
        if moved || !rest.contains(&format!(":{NAMESPACE}:")) {
            continue;
        }
        before.extend(renamed_ns(key, value)?);
    }
    let after = forgetting(config, &old_nqn);
    Ok(Renaming { before, after })
}

/// What [`renaming`] writes, around the rename itself.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Renaming {
    pub before: Vec<(String, String)>,
    pub after: Vec<(String, String)>,
}

/// The anchor of subsystem `nqn` as kept in `config`, if there is a readable one.
pub fn anchor_of(config: &BTreeMap<String, String>, nqn: &str) -> Option<StoredSubsystem> {
    let s: StoredSubsystem = parse(config.get(&anchor_key(nqn))?).ok()?;
    (s.nqn == nqn).then_some(s)
}

fn parse<T: DeserializeOwned>(value: &str) -> Result<T, serde_json::Error> {
    serde_json::from_str(value)
}

/// A child entry of an anchor, decoded.
enum Child {
    Host(StoredHost),
    Listener(StoredListener),
    Namespace(StoredNamespace),
}

impl Child {
    fn gen(&self) -> u64 {
        match self {
            Child::Host(h) => h.gen,
            Child::Listener(l) => l.gen,
            Child::Namespace(n) => n.gen,
        }
    }

    /// The key this entry must be kept under in subsystem `nqn`.
    fn key(&self, nqn: &str) -> String {
        match self {
            Child::Host(h) => host_key(nqn, &h.host),
            Child::Listener(l) => listener_key(nqn, &l.addr),
            Child::Namespace(n) => namespace_key(nqn, n.nsid),
        }
    }
}

fn child(kind: &str, value: &str) -> Result<Child, String> {
    let e = |e: serde_json::Error| e.to_string();
    match kind {
        HOST => parse(value).map(Child::Host).map_err(e),
        LISTENER => parse(value).map(Child::Listener).map_err(e),
        NAMESPACE => parse(value).map(Child::Namespace).map_err(e),
        other => Err(format!("unknown kind of entry {other:?}")),
    }
}

/// Reads every entry of `config` this codec owns (others, such as volume UUIDs, are left).
pub fn decode(config: &BTreeMap<String, String>) -> Decoded {
    let mut out = Decoded::default();
    let mut anchors: BTreeMap<String, StoredSubsystem> = BTreeMap::new();
    // Anchor key → (entry key, kind, value) of the entries under it.
    let mut children: BTreeMap<String, Vec<(&String, &str, &String)>> = BTreeMap::new();
    let mut legacy = Vec::new();
    // Anchor key → (entry key, states) of the ANA entries naming it.
    let mut ana: BTreeMap<String, Vec<(&String, StoredAna)>> = BTreeMap::new();
    for (key, value) in config {
        if let Some(hash) = key.strip_prefix(KEYRING) {
            match parse::<StoredKey>(value) {
                Ok(k) if digest(&k.name) == hash => out.keys.push(k),
                Ok(k) => out.problems.push(format!("{key}: holds key {:?}, not its own", k.name)),
                Err(e) => out.problems.push(format!("{key}: {e}")),
            }
        } else if let Some(rest) = key.strip_prefix(NVMF) {
            let mut parts = rest.splitn(3, ':');
            let anchor = format!("{NVMF}{}", parts.next().unwrap_or_default());
            match parts.next() {
                None => match parse::<StoredSubsystem>(value) {
                    Ok(s) if anchor_key(&s.nqn) == *key => {
                        anchors.insert(anchor, s);
                    }
                    Ok(s) => {
                        out.problems
                            .push(format!("{key}: holds subsystem {:?}, not its own", s.nqn));
                        out.unreadable.insert(anchor);
                    }
                    Err(e) => {
                        out.problems.push(format!("{key}: {e}"));
                        out.unreadable.insert(anchor);
                    }
                },
                Some(kind) => children.entry(anchor).or_default().push((key, kind, value)),
            }
        } else if let Some(volume) = key.strip_prefix(LEGACY_HOSTS) {
            legacy.push((key, volume, value));
        } else if key.starts_with(ANA) {
            match parse::<StoredAna>(value) {
                Ok(a) if ana_key(&a.nqn, &a.addr) == *key => {
                    ana.entry(anchor_key(&a.nqn)).or_default().push((key, a))
                }
                Ok(_) => out.problems.push(format!(
                    "{key}: holds an entry of another key (its listener starts optimized)"
                )),
                Err(e) => out.problems.push(format!("{key}: {e} (its listener starts optimized)")),
            }
        }
    }
    for (anchor, subsystem) in anchors {
        let nqn = subsystem.nqn.clone();
        let mut cfg = SubsystemConfig {
            subsystem,
            legacy: false,
            damaged: false,
            hosts: Vec::new(),
            listeners: Vec::new(),
            namespaces: Vec::new(),
            ana: Vec::new(),
        };
        for (key, a) in ana.remove(&anchor).unwrap_or_default() {
            if a.gen == cfg.subsystem.gen {
                cfg.ana.push(a);
            } else {
                out.stale.push(key.clone());
            }
        }
        for (key, kind, value) in children.remove(&anchor).unwrap_or_default() {
            let c = match child(kind, value) {
                Ok(c) => c,
                Err(e) => {
                    out.problems.push(format!("{key}: {e}"));
                    cfg.damaged = true;
                    continue;
                }
            };
            if c.gen() != cfg.subsystem.gen {
                out.stale.push(key.clone());
            } else if c.key(&nqn) != *key {
                out.problems.push(format!("{key}: holds an entry of another key"));
                cfg.damaged = true;
            } else {
                match c {
                    Child::Host(h) => cfg.hosts.push(h),
                    Child::Listener(l) => cfg.listeners.push(l),
                    Child::Namespace(n) => cfg.namespaces.push(n),
                }
            }
        }
        out.subsystems.push(cfg);
    }
    // Entries under no readable anchor: left over (stale), unless their anchor is unreadable.
    for (anchor, entries) in children {
        if !out.unreadable.contains(&anchor) {
            out.stale.extend(entries.into_iter().map(|(k, _, _)| k.clone()));
        }
    }
    for (anchor, entries) in ana {
        if !out.unreadable.contains(&anchor) {
            out.stale.extend(entries.into_iter().map(|(k, _)| k.clone()));
        }
    }
    for (key, volume, value) in legacy {
        let nqn = format!("{NQN_PREFIX}{volume}");
        let anchor = anchor_key(&nqn);
        if out.subsystems.iter().any(|s| s.subsystem.nqn == nqn) {
            out.stale.push(key.clone());
            continue;
        }
        if out.unreadable.contains(&anchor) {
            continue;
        }
        let (allow_any_host, hosts, damaged) = match parse::<LegacyHosts>(value) {
            Ok(l) => (l.allow_any_host, l.hosts, false),
            Err(e) => {
                out.problems.push(format!("{key}: {e}"));
                (false, Vec::new(), true)
            }
        };
        let hosts = hosts
            .into_iter()
            .map(|host| StoredHost { gen: 0, host, keys: HostKeyNames::default() })
            .collect();
        let subsystem = StoredSubsystem {
            nqn,
            gen: 0,
            created: false,
            allow_any_host,
            serial_number: None,
            model_number: None,
            max_namespaces: None,
        };
        out.subsystems.push(SubsystemConfig {
            subsystem,
            legacy: true,
            damaged,
            hosts,
            listeners: Vec::new(),
            namespaces: Vec::new(),
            ana: Vec::new(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_engine::volume::records::NAME_MAX as CONFIG_KEY_MAX;

    const SUB: &str = "nqn.2016-06.io.spdk:cnode1";
    const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000b0b0";
    const HOST_B: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000c0c0";

    fn apply(config: &mut BTreeMap<String, String>, entries: &[(String, String)]) {
        for (k, v) in entries {
            if v.is_empty() {
                config.remove(k);
            } else {
                config.insert(k.clone(), v.clone());
            }
        }
    }

    fn anchor(nqn: &str, gen: u64, created: bool) -> StoredSubsystem {
        StoredSubsystem {
            nqn: nqn.into(),
            gen,
            created,
            allow_any_host: false,
            serial_number: created.then(|| "SPDK00000000000001".into()),
            model_number: created.then(|| "SPDK_Controller1".into()),
            max_namespaces: created.then_some(4),
        }
    }

    fn keyed_host(gen: u64) -> StoredHost {
        StoredHost {
            gen,
            host: HOST_A.into(),
            keys: HostKeyNames {
                psk: Some("psk0".into()),
                dhchap_key: Some("dh0".into()),
                dhchap_ctrlr_key: Some("dh1".into()),
                dhchap_digests: Some(vec!["sha384".into()]),
                dhchap_dhgroups: Some(vec!["ffdhe3072".into(), "null".into()]),
            },
        }
    }

    #[test]
    fn every_setting_round_trips() {
        let mut config = BTreeMap::new();
        config.insert("uuid:vol0".to_string(), "0f0e-...".to_string());
        config.insert("lvs:name".to_string(), "lvs0".to_string());
        let key = StoredKey { name: "psk0".into(), path: "/etc/ballast/psk0".into() };
        let host = keyed_host(7);
        let plain = StoredHost { gen: 7, host: HOST_B.into(), keys: HostKeyNames::default() };
        let l4 = StoredListener {
            gen: 7,
            addr: "127.0.0.1:4421".parse().unwrap(),
            listen: true,
            secure_channel: SecureChannel::Required,
        };
        let l6 = StoredListener {
            gen: 7,
            addr: "[::1]:4420".parse().unwrap(),
            listen: false,
            secure_channel: SecureChannel::None,
        };
        let ns = StoredNamespace {
            gen: 7,
            nsid: 3,
            bdev: "clone0".into(),
            block_size: 512,
            uuid: Some("0f7e1b6c-4a2d-4c8e-9d1a-2b3c4d5e6f70".into()),
            anagrpid: Some(2),
        };
        let sub = anchor(SUB, 7, true);
        let mut batch = vec![entry(key_entry_key("psk0"), &key).unwrap()];
        batch.extend(anchoring(&config, &sub, &[host.clone(), plain.clone()]).unwrap());
        batch.push(entry(listener_key(SUB, &l4.addr), &l4).unwrap());
        batch.push(entry(listener_key(SUB, &l6.addr), &l6).unwrap());
        batch.push(entry(namespace_key(SUB, 3), &ns).unwrap());
        apply(&mut config, &batch);
        for k in config.keys() {
            assert!(k.len() <= CONFIG_KEY_MAX, "{k}");
        }
        let d = decode(&config);
        assert!(d.problems.is_empty() && d.stale.is_empty(), "{:?} {:?}", d.problems, d.stale);
        assert_eq!(d.keys, vec![key]);
        assert_eq!(d.subsystems.len(), 1);
        let s = &d.subsystems[0];
        assert_eq!((&s.subsystem, s.legacy, s.damaged), (&sub, false, false));
        let mut hosts = s.hosts.clone();
        hosts.sort_by(|a, b| a.host.cmp(&b.host));
        assert_eq!(hosts, vec![host, plain]);
        let mut listeners = s.listeners.clone();
        listeners.sort_by_key(|l| l.addr);
        assert_eq!(listeners, vec![l4, l6]);
        assert_eq!(s.namespaces, vec![ns]);
        assert_eq!(anchor_of(&config, SUB), Some(sub));
        // Kept reservations of two of its namespaces and of another subsystem's: outside the
        // subsystem's entries (decoding does not see them), forgotten with it.
        let other = "nqn.2026-11.dev.ballast:other";
        for k in [reservations_key(SUB, 1), reservations_key(SUB, 12), reservations_key(other, 1)] {
            assert!(k.len() <= CONFIG_KEY_MAX && !k.starts_with(&anchor_key(SUB)), "{k}");
            config.insert(k, "AQ==".into());
        }
        assert!(decode(&config).problems.is_empty());
        // Forgetting the subsystem leaves the rest of the configuration as it was.
        let forget = forgetting(&config, SUB);
        apply(&mut config, &forget);
        let d = decode(&config);
        assert!(d.subsystems.is_empty() && d.stale.is_empty());
        assert!(config.contains_key(&reservations_key(other, 1)), "another subsystem's stay");
        assert_eq!(config.len(), 4, "{config:?}");
    }

    #[test]
    fn values_are_as_documented_and_hold_no_key_text() {
        let (k, v) = entry(host_key(SUB, HOST_A), &keyed_host(1)).unwrap();
        assert!(k.starts_with(&anchor_key(SUB)) && k.contains(":host:"), "{k}");
        assert_eq!(
            v,
            format!(
                "{{\"gen\":1,\"host\":\"{HOST_A}\",\"keys\":{{\"psk\":\"psk0\",\
                 \"dhchap_key\":\"dh0\",\"dhchap_ctrlr_key\":\"dh1\",\
                 \"dhchap_digests\":[\"sha384\"],\"dhchap_dhgroups\":[\"ffdhe3072\",\"null\"]}}}}"
            )
        );
        let (_, v) = entry(anchor_key(SUB), &anchor(SUB, 2, false)).unwrap();
        assert_eq!(
            v,
            format!(r#"{{"nqn":"{SUB}","gen":2,"created":false,"allow_any_host":false}}"#)
        );
    }

    #[test]
    fn a_pool_of_the_old_format_opens_with_its_hosts() {
        let mut config = BTreeMap::new();
        // What `persist_hosts` wrote before anchors, and a volume stored with only a host list.
        config.insert(
            "hosts:vol0".to_string(),
            format!(r#"{{"allow_any_host":false,"hosts":["{HOST_A}","{HOST_B}"]}}"#),
        );
        config.insert("hosts:vol1".to_string(), format!(r#"{{"hosts":["{HOST_A}"]}}"#));
        config.insert("uuid:vol0".to_string(), "x".to_string());
        let d = decode(&config);
        assert!(d.problems.is_empty() && d.stale.is_empty() && d.keys.is_empty());
        let got: Vec<(String, bool, bool, Vec<String>)> = d
            .subsystems
            .iter()
            .map(|s| {
                let hosts = s.hosts.iter().map(|h| h.host.clone()).collect();
                (s.subsystem.nqn.clone(), s.subsystem.allow_any_host, s.legacy, hosts)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (format!("{NQN_PREFIX}vol0"), false, true, vec![HOST_A.into(), HOST_B.into()]),
                (format!("{NQN_PREFIX}vol1"), true, true, vec![HOST_A.into()]),
            ]
        );
        assert!(d
            .subsystems
            .iter()
            .all(|s| s.hosts.iter().all(|h| h.keys == HostKeyNames::default())));
        // A legacy entry that does not decode fails closed.
        config.insert("hosts:vol2".to_string(), "{not json".to_string());
        let d = decode(&config);
        let s = d.subsystems.iter().find(|s| s.subsystem.nqn.ends_with(":vol2")).unwrap();
        assert!(s.damaged && !s.subsystem.allow_any_host && s.hosts.is_empty());
        assert_eq!(d.problems.len(), 1);
    }

    /// Moving a volume's subsystem from the legacy entry to an anchor, then removing a host:
    /// a crash after any entry of the batch leaves the hosts before or after, never fewer or
    /// more.
    #[test]
    fn every_prefix_of_an_anchoring_batch_is_the_state_before_or_after() {
        let nqn = format!("{NQN_PREFIX}vol0");
        let mut before = BTreeMap::new();
        before.insert(
            "hosts:vol0".to_string(),
            format!(r#"{{"allow_any_host":false,"hosts":["{HOST_A}","{HOST_B}"]}}"#),
        );
        let hosts_of = |config: &BTreeMap<String, String>| -> (bool, Vec<String>) {
            let d = decode(config);
            assert!(d.problems.is_empty(), "{:?}", d.problems);
            let s = d.subsystems.iter().find(|s| s.subsystem.nqn == nqn).unwrap();
            let mut h: Vec<String> = s.hosts.iter().map(|h| h.host.clone()).collect();
            h.sort();
            (s.subsystem.allow_any_host, h)
        };
        let a = anchor(&nqn, 99, false);
        let snapshot: Vec<StoredHost> = [HOST_A, HOST_B]
            .iter()
            .map(|h| StoredHost { gen: 99, host: h.to_string(), keys: HostKeyNames::default() })
            .collect();
        let mut batch = anchoring(&before, &a, &snapshot).unwrap();
        batch.push(removal(host_key(&nqn, HOST_B)));
        let start = hosts_of(&before);
        let mut end = before.clone();
        apply(&mut end, &batch);
        let end = hosts_of(&end);
        assert_eq!(end, (false, vec![HOST_A.to_string()]));
        for cut in 0..=batch.len() {
            let mut config = before.clone();
            apply(&mut config, &batch[..cut]);
            let seen = hosts_of(&config);
            assert!(seen == start || seen == end, "cut {cut}: {seen:?}");
        }
        // And forgetting: the anchor goes first, so every prefix has it whole or not at all.
        let mut after = before.clone();
        apply(&mut after, &batch);
        let forget = forgetting(&after, &nqn);
        assert_eq!(forget[0], removal(anchor_key(&nqn)));
        for cut in 1..=forget.len() {
            let mut config = after.clone();
            apply(&mut config, &forget[..cut]);
            let d = decode(&config);
            assert!(d.subsystems.is_empty(), "cut {cut}");
        }
    }

    #[test]
    fn entries_of_another_generation_or_no_anchor_are_stale() {
        let mut config = BTreeMap::new();
        let batch = anchoring(&config, &anchor(SUB, 1, true), &[keyed_host(1)]).unwrap();
        apply(&mut config, &batch);
        // The subsystem is made again (a new generation) before the old host entry went.
        apply(&mut config, &[entry(anchor_key(SUB), &anchor(SUB, 2, true)).unwrap()]);
        let orphan = StoredHost { gen: 5, host: HOST_B.into(), keys: HostKeyNames::default() };
        let other = "nqn.2016-06.io.spdk:gone";
        apply(&mut config, &[entry(host_key(other, HOST_B), &orphan).unwrap()]);
        let d = decode(&config);
        assert!(d.problems.is_empty());
        assert_eq!(d.subsystems.len(), 1);
        assert!(d.subsystems[0].hosts.is_empty(), "the old generation's host does not apply");
        let mut stale = d.stale.clone();
        stale.sort();
        let mut want = vec![host_key(SUB, HOST_A), host_key(other, HOST_B)];
        want.sort();
        assert_eq!(stale, want);
    }

    /// A listener's ANA states: read under their anchor's generation, stale otherwise, never
    /// damage when unreadable (the listener starts optimized), gone with their subsystem.
    #[test]
    fn ana_states_are_kept_apart_from_the_subsystem_s_entries() {
        let mut config = BTreeMap::new();
        let batch = anchoring(&config, &anchor(SUB, 1, true), &[]).unwrap();
        apply(&mut config, &batch);
        let addr: SocketAddr = "127.0.0.1:4421".parse().unwrap();
        let a = StoredAna {
            gen: 1,
            nqn: SUB.into(),
            addr,
            all: "inaccessible".into(),
            groups: [(5, "optimized".to_string())].into(),
        };
        apply(&mut config, &[entry(ana_key(SUB, &addr), &a).unwrap()]);
        let d = decode(&config);
        assert_eq!((d.subsystems[0].ana.clone(), d.problems.len()), (vec![a.clone()], 0));
        assert!(config[&ana_key(SUB, &addr)].starts_with(r#"{"gen":1,"nqn":"#));
        // Another generation's: stale. Unreadable: a problem, not damage.
        apply(&mut config, &[entry(anchor_key(SUB), &anchor(SUB, 2, true)).unwrap()]);
        let d = decode(&config);
        assert!(d.subsystems[0].ana.is_empty());
        assert_eq!(d.stale, vec![ana_key(SUB, &addr)]);
        let other: SocketAddr = "127.0.0.1:4422".parse().unwrap();
        config.insert(ana_key(SUB, &other), r#"{"gen":2,"future":1}"#.into());
        config.insert(
            ana_key(SUB, &addr),
            serde_json::to_string(&StoredAna { gen: 2, ..a }).unwrap(),
        );
        let d = decode(&config);
        assert_eq!((d.problems.len(), d.subsystems[0].damaged), (1, false), "{:?}", d.problems);
        assert_eq!(d.subsystems[0].ana.len(), 1);
        // Forgetting the subsystem removes them, after its anchor.
        let gone = forgetting(&config, SUB);
        assert_eq!(gone[0].0, anchor_key(SUB));
        apply(&mut config, &gone);
        assert!(config.keys().all(|k| !k.starts_with(ANA)), "{config:?}");
    }

    /// A listener's addition with ANA states, and its removal, leave after any crash prefix
    /// the listener as it was before or after — never back without the states it had.
    #[test]
    fn every_prefix_of_a_listener_change_is_the_state_before_or_after() {
        use ballast_nvmf::ana::AnaState;
        let addr: SocketAddr = "127.0.0.1:4421".parse().unwrap();
        let inaccessible = ListenerStates::normal(AnaState::Inaccessible, BTreeMap::new());
        // What a decoded configuration says of the listener: (listed, its ANA state).
        let view = |config: &BTreeMap<String, String>| {
            let d = decode(config);
            let s = &d.subsystems[0];
            let listed = s.listeners.iter().any(|l| l.addr == addr && l.listen);
            let ana = s.ana.iter().find(|a| a.addr == addr).map(|a| a.all.clone());
            (listed, listed.then_some(ana).flatten())
        };
        for created in [true, false] {
            let mut config = BTreeMap::new();
            let a = anchor(SUB, 1, created);
            apply(&mut config, &anchoring(&BTreeMap::new(), &a, &[]).unwrap());
            let before = view(&config);
            let fresh = Some(inaccessible.as_ref());
            let add = listener_change(&a, addr, true, SecureChannel::None, fresh, false).unwrap();
            assert_eq!(add.len(), 2, "its states, then the listener");
            let mut after = config.clone();
            apply(&mut after, &add);
            let added = view(&after);
            assert_eq!(added, (true, Some("inaccessible".to_string())));
            for n in 0..=add.len() {
                let mut c = config.clone();
                apply(&mut c, &add[..n]);
                assert!([before.clone(), added.clone()].contains(&view(&c)), "add prefix {n}");
            }
            let remove = listener_change(&a, addr, false, SecureChannel::None, None, true).unwrap();
            assert_eq!(remove.len(), 2, "the listener, then its states");
            let mut gone = after.clone();
            apply(&mut gone, &remove);
            assert!(gone.keys().all(|k| !k.starts_with(ANA)), "its states forgotten");
            for n in 0..=remove.len() {
                let mut c = after.clone();
                apply(&mut c, &remove[..n]);
                assert!([added.clone(), view(&gone)].contains(&view(&c)), "remove prefix {n}");
            }
            // Added again with no state: the states left by a cut removal go first.
            let again = listener_change(&a, addr, true, SecureChannel::None, Some(None), true);
            assert_eq!(again.unwrap()[0], removal(ana_key(SUB, &addr)));
        }
    }

    #[test]
    fn unreadable_entries_are_reported_and_fail_closed() {
        let mut config = BTreeMap::new();
        let batch = anchoring(&config, &anchor(SUB, 1, true), &[keyed_host(1)]).unwrap();
        apply(&mut config, &batch);
        // A field this version does not know (a newer ballast wrote it): refused, not half read.
        let newer = format!(r#"{{"gen":1,"host":"{HOST_B}","keys":{{}},"future":true}}"#);
        config.insert(host_key(SUB, HOST_B), newer);
        config.insert(format!("{}:tunnel:x", anchor_key(SUB)), "{}".into());
        let d = decode(&config);
        assert_eq!(d.problems.len(), 2, "{:?}", d.problems);
        assert!(d.problems.iter().any(|p| p.contains("future")));
        let s = &d.subsystems[0];
        assert!(s.damaged);
        assert_eq!(s.hosts.len(), 1, "the readable host is still restored");
        // An anchor that cannot be read makes its subsystem unreadable; its entries stay.
        let volume = format!("{NQN_PREFIX}vol0");
        config.insert(anchor_key(&volume), r#"{"nqn":1}"#.into());
        config.insert("hosts:vol0".into(), r#"{"hosts":[]}"#.into());
        let d = decode(&config);
        assert!(d.unreadable.contains(&anchor_key(&volume)));
        assert!(d.subsystems.iter().all(|s| s.subsystem.nqn != volume), "no legacy fallback");
        // A value filed under another key is not believed.
        config.insert(key_entry_key("a"), r#"{"name":"b","path":"/b"}"#.into());
        assert!(decode(&config).keys.is_empty());
    }

    #[test]
    fn an_entry_too_long_for_the_pool_is_refused_naming_its_key() {
        let key =
            StoredKey { name: "k".into(), path: format!("/{}", "p".repeat(CONFIG_VALUE_MAX)) };
        let e = entry(key_entry_key("k"), &key).unwrap_err();
        assert!(matches!(e, CodecError::TooLong { .. }), "{e}");
        assert!(e.to_string().starts_with(&key_entry_key("k")), "{e}");
        // The longest names still make short keys.
        let nqn = format!("nqn.{}", "n".repeat(219));
        assert!(host_key(&nqn, &nqn).len() <= CONFIG_KEY_MAX);
    }

    /// A renamed volume's settings, seen whatever it is called: (allow any host, hosts,
    /// listeners, namespaces with the volume's own name as "VOL", ANA states without NQN).
    type Seen = (bool, Vec<StoredHost>, Vec<StoredListener>, Vec<StoredNamespace>, Vec<String>);

    fn seen(d: &Decoded, nqn: &str) -> Option<Seen> {
        let s = d.subsystems.iter().find(|s| s.subsystem.nqn == nqn)?;
        let own = |n: &StoredNamespace| {
            let vol = ["vol0", "vol1"].contains(&n.bdev.as_str());
            StoredNamespace { bdev: if vol { "VOL".into() } else { n.bdev.clone() }, ..n.clone() }
        };
        let ana = s.ana.iter().map(|a| format!("{} {} {:?}", a.addr, a.all, a.groups)).collect();
        let ns = s.namespaces.iter().map(own).collect();
        Some((s.subsystem.allow_any_host, s.hosts.clone(), s.listeners.clone(), ns, ana))
    }

    /// A volume renamed (`bdev_lvol_rename`): whatever prefix of the entries before the
    /// rename, the rename, and the entries after it a crash keeps, the subsystem of the name
    /// the volume has then holds what the old one held, namespaces elsewhere still name the
    /// volume (by its UUID), and unreadable entries stay refused. At the end nothing is left
    /// under the old name and nothing is stale.
    #[test]
    fn every_prefix_of_a_rename_keeps_the_settings_with_the_volume() {
        let (old, new) = (format!("{NQN_PREFIX}vol0"), format!("{NQN_PREFIX}vol1"));
        let uuid = Some("0f7e1b6c-4a2d-4c8e-9d1a-2b3c4d5e6f70".to_string());
        let mut config = BTreeMap::new();
        config.insert(key_entry_key("psk0"), r#"{"name":"psk0","path":"/k"}"#.into());
        // What an earlier subsystem of the new name left: forgotten, never applied.
        let batch = anchoring(&config, &anchor(&new, 3, false), &[]).unwrap();
        apply(&mut config, &batch);
        let host = StoredHost { gen: 3, host: HOST_B.into(), keys: HostKeyNames::default() };
        apply(&mut config, &[entry(host_key(&new, HOST_B), &host).unwrap()]);
        // ... among them a namespace of the volume, under an nsid the volume's subsystem uses.
        let stale = StoredNamespace {
            gen: 3,
            nsid: 2,
            bdev: "vol0".into(),
            block_size: 512,
            uuid: None,
            anagrpid: None,
        };
        apply(&mut config, &[entry(namespace_key(&new, 2), &stale).unwrap()]);
        // The volume's subsystem, every kind of entry.
        let batch = anchoring(&config, &anchor(&old, 7, false), &[keyed_host(7)]).unwrap();
        apply(&mut config, &batch);
        let addr: SocketAddr = "127.0.0.1:4421".parse().unwrap();
        let l = StoredListener { gen: 7, addr, listen: true, secure_channel: SecureChannel::None };
        let ns = |nsid, bdev: &str| StoredNamespace {
            gen: 7,
            nsid,
            bdev: bdev.into(),
            block_size: 4096,
            uuid: uuid.clone(),
            anagrpid: None,
        };
        let states = ListenerStates {
            all: ballast_nvmf::ana::AnaState::Inaccessible,
            groups: BTreeMap::new(),
        };
        apply(
            &mut config,
            &[
                entry(listener_key(&old, &addr), &l).unwrap(),
                entry(namespace_key(&old, 2), &ns(2, "other")).unwrap(),
                ana_entry(7, &old, addr, &states).unwrap(),
                (reservations_key(&old, 1), "AAAA".into()),
            ],
        );
        // An unreadable host entry: the subsystem is damaged, and stays so.
        config.insert(format!("{}:host:zz", anchor_key(&old)), "{".into());
        // Another subsystem with a namespace of the volume, one of another device.
        let batch = anchoring(&config, &anchor(SUB, 1, true), &[]).unwrap();
        apply(&mut config, &batch);
        let elsewhere = |nsid, bdev: &str| StoredNamespace { gen: 1, ..ns(nsid, bdev) };
        apply(&mut config, &[entry(namespace_key(SUB, 1), &elsewhere(1, "vol0")).unwrap()]);
        apply(&mut config, &[entry(namespace_key(SUB, 2), &elsewhere(2, "vol00")).unwrap()]);
        // One kept before namespaces kept their device's UUID.
        let unnamed = StoredNamespace { uuid: None, ..elsewhere(3, "vol0") };
        apply(&mut config, &[entry(namespace_key(SUB, 3), &unnamed).unwrap()]);
        let first = decode(&config);
        let was = seen(&first, &old).expect("the volume's settings");
        let earlier = seen(&first, &new);
        assert!(earlier.is_some());
        assert!(first.subsystems.iter().find(|s| s.subsystem.nqn == old).unwrap().damaged);

        let r = renaming(&config, "vol0", "vol1", uuid.as_deref()).unwrap();
        let steps = r.before.len() + 1 + r.after.len();
        for keep in 0..=steps {
            let mut c = config.clone();
            apply(&mut c, &r.before[..keep.min(r.before.len())]);
            let renamed = keep > r.before.len();
            if renamed {
                apply(&mut c, &r.after[..keep - r.before.len() - 1]);
            }
            let (nqn, name) = if renamed { (&new, "vol1") } else { (&old, "vol0") };
            let d = decode(&c);
            assert_eq!(seen(&d, nqn).as_ref(), Some(&was), "{keep} of {steps} kept");
            let s = d.subsystems.iter().find(|s| s.subsystem.nqn == *nqn).unwrap();
            assert!(s.damaged, "{keep} kept: the unreadable entry still counts");
            let sub = d.subsystems.iter().find(|s| s.subsystem.nqn == SUB).unwrap();
            let bdevs: Vec<&str> = sub.namespaces.iter().map(|n| n.bdev.as_str()).collect();
            assert!(
                [["vol0", "vol00"], ["vol1", "vol00"]].iter().any(|b| bdevs[..2] == b[..]),
                "{keep}: {bdevs:?}"
            );
            assert!(bdevs[2] == "vol0" || bdevs[2] == "vol1", "{keep}: {bdevs:?}");
            let with_uuid = sub.namespaces.iter().filter(|n| n.uuid == uuid).count();
            // The one without a UUID gets the volume's with its new name.
            assert_eq!(with_uuid, if bdevs[2] == "vol1" { 3 } else { 2 }, "{keep}");
            assert_eq!(d.keys.len(), 1);
            // Reservation tables are bound to the old NQN's NGUIDs: kept until the rename,
            // forgotten after it, never moved.
            assert!(!c.contains_key(&reservations_key(&new, 1)));
            if !renamed {
                assert_eq!(c.get(&reservations_key(&old, 1)).map(String::as_str), Some("AAAA"));
                // The new name (no volume has it yet) holds what it held, nothing, or the
                // volume's settings.
                let now = seen(&d, &new);
                assert!(now == earlier || now.is_none() || now.as_ref() == Some(&was), "{keep}");
            } else if keep == steps {
                assert_eq!(d.stale, Vec::<String>::new());
                assert!(c.keys().all(|k| !k.contains(&anchor_key(&old)[NVMF.len()..])));
                assert!(seen(&d, &old).is_none());
                assert!(!c.contains_key(&reservations_key(&old, 1)));
                let moved = sub.namespaces.iter().find(|n| n.nsid == 1).unwrap();
                assert_eq!(moved.bdev, name);
            }
        }
    }
}
