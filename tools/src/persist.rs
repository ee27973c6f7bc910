//! Keeps the daemon's NVMe-oF security settings in its pool as the control methods change them
//! (keyring names and paths; subsystems made at runtime with their serial and model numbers,
//! namespaces, access; hosts with their key names; listeners with their secure channel and ANA
//! states), and restores them at start-up before any NVMe/TCP listener accepts. The entries and their
//! format are `pool_config`'s; a daemon without a pool keeps nothing.
//!
//! Invariants:
//! - a method reports success only once its change is durable in the pool: the change is
//!   written (one `set_configs` batch: one commit) before it takes effect, or undone when
//!   writing fails;
//! - a subsystem's first kept change gives it an anchor holding its hosts as they are then
//!   (from the legacy entry or the startup defaults), so nothing kept before is lost;
//! - restoring is fail closed and never stops the daemon: a key whose file cannot be read is
//!   held as unavailable and the hosts configured with it are refused; a subsystem with an
//!   unreadable entry admits only the hosts restored; one whose anchor cannot be read admits
//!   none (ANA states are no access: an unreadable one leaves its listener optimized). Each is
//!   logged as a warning naming keys, hosts and paths, never key text.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ballast_engine::volume::dev::PoolHandle;
use ballast_engine::volume::pool::PoolError;
use ballast_nvmf::ana::{AnaState, ListenerStates};
use ballast_nvmf::subsys::{Identity, ListenAddr, Subsystem, DISCOVERY_NQN};
use ballast_nvmf::tls::SecureChannel;

use crate::control::{Control, HostKeyNames};
use crate::host_auth;
use crate::pool_config::{
    self, ana_entry, ana_key, anchor_key, anchor_of, anchoring, entry, forgetting, host_key,
    key_entry_key, legacy_key, listener_change, namespace_key, removal, CodecError, StoredAna,
    StoredHost, StoredKey, StoredNamespace, StoredSubsystem, SubsystemConfig,
};

/// Why a change could not be kept in the pool (it did not take effect).
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{0}")]
    Codec(#[from] CodecError),
    #[error("could not keep the change in the pool: {0}")]
    Pool(#[from] PoolError),
    #[error("no subsystem {0:?}")]
    NoSubsystem(String),
}

/// Writes `entries` in one batch (nothing without a pool or entries).
fn write(pool: &Arc<PoolHandle>, entries: &[(String, String)]) -> Result<(), PersistError> {
    if entries.is_empty() {
        return Ok(());
    }
    pool.set_configs(entries)?;
    Ok(())
}

/// A fresh anchor generation.
fn new_gen() -> u64 {
    let mut b = [0u8; 8];
    if ballast_ffi::sys::random_bytes(&mut b).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        b = nanos.to_le_bytes();
    }
    u64::from_le_bytes(b)
}

/// Subsystem `nqn`'s anchor, and the entries to write first when it has none yet: its hosts
/// as they are now under a new generation, then the anchor (`pool_config::anchoring`).
fn anchored(
    control: &Control,
    pool: &PoolHandle,
    nqn: &str,
) -> Result<(StoredSubsystem, Vec<(String, String)>), PersistError> {
    // The pool's lock is never held while the target's are taken.
    let kept = anchor_of(pool.meta().config(), nqn);
    if let Some(anchor) = kept {
        return Ok((anchor, Vec::new()));
    }
    let gen = new_gen();
    let (allow_any_host, hosts) = if nqn == DISCOVERY_NQN {
        (true, Vec::new())
    } else {
        let subsys =
            control.target.subsystem(nqn).ok_or_else(|| PersistError::NoSubsystem(nqn.into()))?;
        let host_keys = control.host_keys.read();
        let hosts = subsys
            .hosts
            .read()
            .iter()
            .map(|h| StoredHost {
                gen,
                host: h.clone(),
                keys: host_keys.get(&(nqn.to_string(), h.clone())).cloned().unwrap_or_default(),
            })
            .collect::<Vec<_>>();
        (subsys.allow_any_host.load(Ordering::Relaxed), hosts)
    };
    let anchor = StoredSubsystem {
        nqn: nqn.to_string(),
        gen,
        created: false,
        allow_any_host,
        serial_number: None,
        model_number: None,
        max_namespaces: None,
    };
    let batch = anchoring(pool.meta().config(), &anchor, &hosts)?;
    Ok((anchor, batch))
}

/// Runs `change` with subsystem `nqn`'s anchor and the batch it appends to, then writes it.
fn change_subsystem(
    control: &Control,
    nqn: &str,
    change: impl FnOnce(&mut StoredSubsystem, &mut Vec<(String, String)>) -> Result<(), CodecError>,
) -> Result<(), PersistError> {
    let Some(pool) = &control.pool else { return Ok(()) };
    let (mut anchor, mut batch) = anchored(control, pool, nqn)?;
    change(&mut anchor, &mut batch)?;
    write(pool, &batch)
}

/// `keyring_file_add_key`: the key's name and path (never its text).
pub fn keep_key(control: &Control, name: &str, path: &str) -> Result<(), PersistError> {
    let Some(pool) = &control.pool else { return Ok(()) };
    let key = StoredKey { name: name.into(), path: path.into() };
    write(pool, &[entry(key_entry_key(name), &key)?])
}

/// `keyring_file_remove_key`.
pub fn forget_key(control: &Control, name: &str) -> Result<(), PersistError> {
    let Some(pool) = &control.pool else { return Ok(()) };
    write(pool, &[removal(key_entry_key(name))])
}

/// `nvmf_create_subsystem`: an anchor of a new generation (entries left by an earlier subsystem
/// of that NQN become stale).
pub fn keep_created(
    control: &Control,
    nqn: &str,
    allow_any_host: bool,
    identity: &Identity,
) -> Result<(), PersistError> {
    let Some(pool) = &control.pool else { return Ok(()) };
    let anchor = StoredSubsystem {
        nqn: nqn.into(),
        gen: new_gen(),
        created: true,
        allow_any_host,
        serial_number: identity.serial.clone(),
        model_number: identity.model.clone(),
        max_namespaces: identity.max_namespaces.filter(|&n| n > 0),
    };
    write(pool, &[entry(anchor_key(nqn), &anchor)?])
}

/// Its volume deleted: everything kept for subsystem `nqn`.
pub fn forget_subsystem(control: &Control, nqn: &str) -> Result<(), PersistError> {
    let Some(pool) = &control.pool else { return Ok(()) };
    let batch = forgetting(pool.meta().config(), nqn);
    write(pool, &batch)
}

/// `nvmf_delete_subsystem`: everything kept for `nqn` if `nvmf_create_subsystem` made it. The
/// daemon's own subsystems (volumes', startup exports') keep their settings: the next start
/// makes them again, and they must not come back more open than they were.
/// Whether it forgot them (the subsystem's namespaces' kept reservations are to be forgotten
/// again once they stop being served: [`forget_subsystem_reservations`]).
pub fn forget_deleted(control: &Control, nqn: &str) -> Result<bool, PersistError> {
    let Some(pool) = &control.pool else { return Ok(false) };
    let created = anchor_of(pool.meta().config(), nqn).is_some_and(|a| a.created);
    if !created {
        return Ok(false);
    }
    forget_subsystem(control, nqn)?;
    Ok(true)
}

/// Every kept reservation table of `nqn`'s namespaces. For after they stopped being served
/// (their cells retired: nothing writes one back), as well as before.
pub fn forget_subsystem_reservations(control: &Control, nqn: &str) -> Result<(), PersistError> {
    let Some(pool) = &control.pool else { return Ok(()) };
    let batch = pool_config::forgetting_reservations(pool.meta_shared().config(), nqn);
    write(pool, &batch)
}

/// `nvmf_subsystem_allow_any_host`.
pub fn keep_access(control: &Control, nqn: &str, allow_any_host: bool) -> Result<(), PersistError> {
    change_subsystem(control, nqn, |anchor, batch| {
        anchor.allow_any_host = allow_any_host;
        batch.push(entry(anchor_key(nqn), anchor)?);
        Ok(())
    })
}

/// `nvmf_subsystem_add_host`: the host and its key names.
pub fn keep_host(
    control: &Control,
    nqn: &str,
    host: &str,
    keys: &HostKeyNames,
) -> Result<(), PersistError> {
    change_subsystem(control, nqn, |anchor, batch| {
        let h = StoredHost { gen: anchor.gen, host: host.into(), keys: keys.clone() };
        batch.push(entry(host_key(nqn, host), &h)?);
        Ok(())
    })
}

/// `nvmf_subsystem_remove_host`.
pub fn forget_host(control: &Control, nqn: &str, host: &str) -> Result<(), PersistError> {
    change_subsystem(control, nqn, |_, batch| {
        batch.push(removal(host_key(nqn, host)));
        Ok(())
    })
}

/// `nvmf_subsystem_add_listener` (`listen`) and `_remove_listener` (`pool_config::
/// listener_change`: a listener added anew, `fresh`, starts with the ANA state given for every
/// group; a removed one forgets its states).
pub fn keep_listener(
    control: &Control,
    nqn: &str,
    addr: SocketAddr,
    listen: bool,
    secure_channel: SecureChannel,
    fresh: Option<Option<AnaState>>,
) -> Result<(), PersistError> {
    let kept_ana = has_ana(control, nqn, &addr);
    let states = fresh.map(|all| all.and_then(|all| ListenerStates::normal(all, BTreeMap::new())));
    change_subsystem(control, nqn, |anchor, batch| {
        let fresh = states.as_ref().map(Option::as_ref);
        batch.extend(listener_change(anchor, addr, listen, secure_channel, fresh, kept_ana)?);
        Ok(())
    })
}

/// Whether the pool keeps ANA states for listener `addr` of `nqn` (readable or not).
pub fn has_ana(control: &Control, nqn: &str, addr: &SocketAddr) -> bool {
    control
        .pool
        .as_ref()
        .is_some_and(|p| p.meta_shared().config().contains_key(&ana_key(nqn, addr)))
}

/// Whether what the pool keeps for listener `addr` of `nqn` is `states` already, readable and
/// under the subsystem's anchor (no pool: nothing to keep). A repeated set of the same states
/// writes nothing; an entry this build could not restore is never taken for them.
pub fn ana_kept_as(
    control: &Control,
    nqn: &str,
    addr: &SocketAddr,
    states: Option<&ListenerStates>,
) -> bool {
    let Some(pool) = &control.pool else { return true };
    let m = pool.meta_shared();
    let config = m.config();
    let Some(value) = config.get(&ana_key(nqn, addr)) else { return states.is_none() };
    let (Some(states), Some(anchor)) = (states, anchor_of(config, nqn)) else { return false };
    ana_entry(anchor.gen, nqn, *addr, states).is_ok_and(|(_, want)| *value == want)
}

/// `nvmf_subsystem_listener_set_ana_state`: listener `addr`'s ANA states whole (`None`:
/// optimized for every group, its entry goes), kept before the change is made.
pub fn keep_ana(
    control: &Control,
    nqn: &str,
    addr: SocketAddr,
    states: Option<&ListenerStates>,
) -> Result<(), PersistError> {
    change_subsystem(control, nqn, |anchor, batch| {
        match states {
            None => batch.push(removal(ana_key(nqn, &addr))),
            Some(l) => batch.push(ana_entry(anchor.gen, nqn, addr, l)?),
        }
        Ok(())
    })
}

/// A listener's kept ANA states in force again (at start-up no host is connected to tell).
fn restore_ana(control: &Control, nqn: &str, a: &StoredAna) {
    // `change` is refused at the RPC (a host resets a controller left in it past ANATT): a
    // kept one is no state to restore either.
    let parse = |name: &String| {
        AnaState::parse(name).filter(|s| *s != AnaState::Change).ok_or_else(|| name.clone())
    };
    let states = parse(&a.all).and_then(|all| {
        let groups = a.groups.iter().map(|(g, s)| Ok((*g, parse(s)?)));
        Ok(ListenerStates { all, groups: groups.collect::<Result<_, String>>()? })
    });
    let addr = a.addr;
    match states {
        Err(state) => {
            tracing::warn!(nqn, %addr, state, "kept ANA states not restored: not a state to keep; the listener starts optimized")
        }
        Ok(l) => match control.target.replace_ana(nqn, &ListenAddr::from(addr), Some(l)) {
            Ok(()) => tracing::info!(nqn, %addr, "ANA states restored"),
            Err(e) => tracing::warn!(nqn, %addr, error = %e, "kept ANA states not restored"),
        },
    }
}

/// `nvmf_subsystem_add_ns`, by the device's name.
pub fn keep_namespace(
    control: &Control,
    nqn: &str,
    nsid: u32,
    anagrpid: Option<u32>,
    bdev: &str,
    uuid: &str,
    block_size: u32,
) -> Result<(), PersistError> {
    change_subsystem(control, nqn, |anchor, batch| {
        let ns = StoredNamespace {
            gen: anchor.gen,
            nsid,
            bdev: bdev.into(),
            block_size,
            uuid: Some(uuid.into()),
            anagrpid,
        };
        batch.push(entry(namespace_key(nqn, nsid), &ns)?);
        Ok(())
    })
}

/// `nvmf_subsystem_remove_ns`.
pub fn forget_namespace(control: &Control, nqn: &str, nsid: u32) -> Result<(), PersistError> {
    change_subsystem(control, nqn, |_, batch| {
        batch.push(removal(namespace_key(nqn, nsid)));
        Ok(())
    })?;
    forget_reservations(control, nqn, nsid)
}

/// Namespace `nsid` of `nqn`'s kept reservations (PTPL), if the pool holds any: the namespace
/// is gone for good (a namespace added later at the id starts without them). Called again
/// once the namespace is removed (its cell retired): a save that ran in between would have
/// written the table back.
pub fn forget_reservations(control: &Control, nqn: &str, nsid: u32) -> Result<(), PersistError> {
    let Some(pool) = &control.pool else { return Ok(()) };
    let key = pool_config::reservations_key(nqn, nsid);
    if !pool.meta_shared().config().contains_key(&key) {
        return Ok(());
    }
    write(pool, &[removal(key)])
}

/// Whether the pool keeps settings for subsystem `nqn` (its maker then creates it admitting
/// no host until they are applied).
pub fn has_settings(control: &Control, nqn: &str) -> bool {
    let Some(pool) = &control.pool else { return false };
    let meta = pool.meta();
    let config = meta.config();
    config.contains_key(&anchor_key(nqn))
        || legacy_key(nqn).is_some_and(|k| config.contains_key(&k))
}

/// How strict a secure-channel mode is (restoring keeps the strictest asked for an address).
/// How much a secure channel asks: an address shared by subsystems asks the most any of them
/// was given (at restore and at `nvmf_subsystem_add_listener` alike).
pub fn strictness(mode: SecureChannel) -> u8 {
    match mode {
        SecureChannel::None => 0,
        SecureChannel::Optional => 1,
        SecureChannel::Required => 2,
    }
}

/// What applying kept settings leaves to do: addresses to bind, and what each must ask.
#[derive(Default)]
struct Pending {
    bind: Vec<SocketAddr>,
    secure: BTreeMap<SocketAddr, SecureChannel>,
}

impl Pending {
    fn listen(&mut self, control: &Control, addr: SocketAddr, mode: SecureChannel) {
        let via = ListenAddr::from(addr);
        if control.target.port_id(&via).is_none() && !self.bind.contains(&addr) {
            self.bind.push(addr);
        }
        let current = control.target.secure_channel(&via);
        let slot = self.secure.entry(addr).or_insert(current);
        if strictness(mode) > strictness(*slot) {
            *slot = mode;
        }
    }

    /// Sets each address's secure channel (before anything listens there); the addresses to
    /// bind.
    fn finish(self, control: &Control) -> Vec<SocketAddr> {
        for (addr, mode) in self.secure {
            if mode != control.target.secure_channel(&ListenAddr::from(addr)) {
                control.target.set_secure_channel(addr.into(), mode);
            }
        }
        self.bind
    }
}

/// A subsystem that exists now: its kept settings cannot be read, so it admits no host.
fn shut(control: &Control, subsys: &Subsystem) {
    subsys.allow_any_host.store(false, Ordering::Relaxed);
    for h in subsys.hosts.read().clone() {
        host_auth::forget(control, subsys, &h);
    }
    tracing::error!(
        nqn = subsys.nqn,
        "the pool's settings for this subsystem cannot be read (written by a newer ballast, or \
         damaged): it admits no host until they are set again"
    );
}

/// Puts one subsystem's kept settings in place, fail closed: it admits no host until its
/// hosts and their keys are in place.
fn apply(control: &Control, cfg: &SubsystemConfig, pending: &mut Pending) {
    let target = &control.target;
    let nqn = cfg.subsystem.nqn.as_str();
    if nqn == DISCOVERY_NQN {
        for l in &cfg.listeners {
            if l.listen {
                target.discovery_services.write().insert(l.addr.into());
                pending.listen(control, l.addr, l.secure_channel);
            } else {
                target.discovery_services.write().remove(&ListenAddr::from(l.addr));
            }
        }
        target.genctr.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let subsys = match target.subsystem(nqn) {
        Some(s) => s,
        None if cfg.subsystem.created => {
            let identity = Identity {
                serial: cfg.subsystem.serial_number.clone(),
                model: cfg.subsystem.model_number.clone(),
                max_namespaces: cfg.subsystem.max_namespaces,
            };
            match target.create_subsystem_as(nqn, false, identity) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(nqn, error = %e, "kept subsystem not restored");
                    return;
                }
            }
        }
        None => {
            tracing::warn!(
                nqn,
                "kept settings not applied: no such subsystem now (its volume or --export is gone)"
            );
            return;
        }
    };
    subsys.allow_any_host.store(false, Ordering::Relaxed);
    // The kept hosts replace those the daemon gave it (--allow-host).
    for h in subsys.hosts.read().clone() {
        host_auth::forget(control, &subsys, &h);
    }
    for ns in &cfg.namespaces {
        if subsys.namespace(ns.nsid).is_some() {
            continue;
        }
        // By its UUID first: a volume renamed keeps it (and a crash may keep the rename
        // without the entry's new name, or the other way round).
        let by_uuid = ns.uuid.as_deref().and_then(|u| control.registry.by_uuid(u));
        let device = by_uuid.or_else(|| control.registry.get(&ns.bdev));
        let bdev = device.as_ref().map_or(ns.bdev.as_str(), |d| d.name.as_str());
        let now = device.as_ref().map(|d| d.uuid.clone());
        if let (Some(kept), Some(now)) = (&ns.uuid, &now) {
            if kept != now {
                let (nsid, bdev) = (ns.nsid, ns.bdev.as_str());
                tracing::warn!(
                    nqn,
                    nsid,
                    bdev,
                    "kept namespace not restored: its bdev is another device now"
                );
                continue;
            }
        }
        let added = control.registry.add_namespace(nqn, ns.nsid, ns.anagrpid, bdev, ns.block_size);
        if let Err(e) = added {
            let (nsid, bdev) = (ns.nsid, ns.bdev.as_str());
            tracing::warn!(nqn, nsid, bdev, error = %e, "kept namespace not restored");
        }
    }
    let mut refused = 0;
    for h in &cfg.hosts {
        match host_auth::resolve(&control.keyring, nqn, &h.host, &h.keys) {
            Ok(keys) => host_auth::admit(control, &subsys, &h.host, &h.keys, keys),
            Err(e) => {
                tracing::warn!(
                    host = h.host,
                    nqn,
                    keys = ?h.keys.key_names().collect::<Vec<_>>(),
                    error = %e,
                    "host refused (fail closed): a key it was configured with is not available; \
                     add the key again (keyring_file_add_key) to admit it"
                );
                host_auth::refuse(control, &subsys, &h.host, &h.keys);
                refused += 1;
            }
        }
    }
    let hosts = subsys.hosts.read().len();
    if hosts > control.max_hosts {
        tracing::warn!(
            nqn,
            hosts,
            limit = control.max_hosts,
            "subsystem lists more hosts than --max-hosts-per-subsystem: all restored, none can \
             be added"
        );
    }
    for l in &cfg.listeners {
        let via = ListenAddr::from(l.addr);
        if l.listen {
            let _ = target.add_listener(nqn, via);
            pending.listen(control, l.addr, l.secure_channel);
        } else {
            let _ = target.remove_listener(nqn, &via);
        }
    }
    for a in &cfg.ana {
        restore_ana(control, nqn, a);
    }
    if cfg.damaged {
        tracing::error!(
            nqn,
            "some of the pool's settings for this subsystem cannot be read: it admits only the \
             hosts restored"
        );
    }
    subsys.allow_any_host.store(cfg.subsystem.allow_any_host && !cfg.damaged, Ordering::Relaxed);
    target.genctr.fetch_add(1, Ordering::Relaxed);
    let listeners = subsys.listeners.read().len();
    tracing::info!(
        nqn,
        hosts,
        refused,
        listeners,
        legacy = cfg.legacy,
        "subsystem settings restored"
    );
}

/// Reads the keyring back: each key's file again; one that cannot be read is held as
/// unavailable (its hosts are then refused).
fn restore_keyring(control: &Control, keys: &[StoredKey]) {
    for k in keys {
        let path = std::path::PathBuf::from(&k.path);
        match control.keyring.add(&k.name, path.clone()) {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(
                    key = k.name,
                    path = k.path,
                    error = %e,
                    "keyring key not restored: its file cannot be read; hosts configured with it \
                     are refused until it is added again"
                );
                if let Err(e) = control.keyring.add_unavailable(&k.name, path, e.to_string()) {
                    tracing::warn!(key = k.name, error = %e, "keyring key not held");
                }
            }
        }
    }
}

/// Restores everything the pool keeps (after the daemon made its own subsystems, before any
/// NVMe/TCP listener accepts): the keyring, then each subsystem's settings, then each
/// address's secure channel. Returns the kept addresses not bound yet, for the caller to bind
/// (and [`unbindable`] those that cannot be). Left-over entries are removed.
pub fn restore(control: &Control) -> Vec<SocketAddr> {
    let Some(pool) = &control.pool else { return Vec::new() };
    let decoded = pool_config::decode(pool.meta().config());
    for problem in &decoded.problems {
        tracing::warn!(
            entry = problem,
            "pool configuration: an entry cannot be read; what it belongs to fails closed \
             (ANA states: their listener starts optimized)"
        );
    }
    restore_keyring(control, &decoded.keys);
    for subsys in control.target.subsystems() {
        if decoded.unreadable.contains(&anchor_key(&subsys.nqn)) {
            shut(control, &subsys);
        }
    }
    let mut pending = Pending::default();
    for cfg in &decoded.subsystems {
        apply(control, cfg, &mut pending);
    }
    let bind = pending.finish(control);
    let stale: Vec<(String, String)> = decoded.stale.iter().cloned().map(removal).collect();
    match write(pool, &stale) {
        Ok(()) if !stale.is_empty() => {
            tracing::info!(entries = stale.len(), "left-over configuration entries removed")
        }
        Ok(()) => {}
        Err(e) => tracing::warn!(error = %e, "left-over configuration entries not removed"),
    }
    tracing::info!(
        keys = decoded.keys.len(),
        subsystems = decoded.subsystems.len(),
        "NVMe-oF settings restored from the pool"
    );
    bind
}

/// Subsystem `nqn` was made again at runtime (a volume whose deletion failed): its kept
/// settings, and any listener they name, in place again.
pub fn reapply(control: &Control, nqn: &str) {
    let Some(pool) = &control.pool else { return };
    let decoded = pool_config::decode(pool.meta().config());
    let mut pending = Pending::default();
    if decoded.unreadable.contains(&anchor_key(nqn)) {
        if let Some(subsys) = control.target.subsystem(nqn) {
            shut(control, &subsys);
        }
    }
    for cfg in decoded.subsystems.iter().filter(|c| c.subsystem.nqn == nqn) {
        apply(control, cfg, &mut pending);
    }
    for addr in pending.finish(control) {
        let bound = crate::listeners::start_nvmf_listener(
            &control.cores,
            &control.target,
            &control.admission,
            addr,
        );
        if let Err(e) = bound {
            tracing::warn!(%addr, error = %format!("{e:#}"), "kept listener cannot be bound");
            unbindable(control, addr);
        }
    }
}

/// A kept address could not be bound: nothing listens there (the subsystems and the discovery
/// service forget it until it is added again; the pool still keeps it).
pub fn unbindable(control: &Control, addr: SocketAddr) {
    let via = ListenAddr::from(addr);
    for subsys in control.target.subsystems() {
        if subsys.listeners.write().remove(&via) {
            // Its restored ANA states go too (kept in the pool for when it can be bound).
            subsys.ana.forget_listener(&via);
            tracing::warn!(
                nqn = subsys.nqn,
                %addr,
                "subsystem does not listen on this kept address: it cannot be bound"
            );
        }
    }
    control.target.discovery_services.write().remove(&via);
    control.target.genctr.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use ballast_engine::limits::{Admission, ConnLimits};
    use ballast_engine::volume::pool::PoolGeometry;
    use ballast_nvmf::auth::{DhchapSecret, HashId};
    use ballast_nvmf::secret::SecretBytes;
    use serde_json::{json, Value};

    use crate::registry::Registry;
    use crate::volumes::nqn_of;

    const SUB: &str = "nqn.2016-06.io.spdk:cnode1";
    const SUB2: &str = "nqn.2016-06.io.spdk:cnode2";
    const HOST_PSK: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000a1";
    const HOST_DH: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000a2";
    const HOST_GONE: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000a3";
    const HOST_PLAIN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000a4";
    /// A TLS PSK in the interchange format (the NVMe TLS test vector's key).
    const PSK_TEXT: &str = "NVMeTLSkey-1:01:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:";
    const DEFAULT_LISTEN: &str = "127.0.0.1:4420";
    const TLS_LISTEN: &str = "127.0.0.1:4421";
    const DISCOVERY_LISTEN: &str = "127.0.0.1:8009";

    /// A scratch directory, removed at the end.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("ballast-persist-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn key(&self, name: &str, text: &str) -> String {
            let path = self.0.join(name);
            std::fs::write(&path, format!("{text}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            path.display().to_string()
        }

        /// A pool with one volume, vol0.
        fn pool(&self) -> PathBuf {
            let path = self.0.join("pool.img");
            PoolHandle::create(&path, Some(256 << 20), PoolGeometry::standard([7; 16])).unwrap();
            PoolHandle::open(&path).unwrap().create_volume("vol0", 16 << 20).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dhchap_text(byte: u8) -> String {
        let secret = DhchapSecret::new(Some(HashId::Sha256), SecretBytes::new(vec![byte; 32]));
        secret.unwrap().encode().to_string()
    }

    /// What `serve` does with a pool, without cores or sockets: open it, make the volumes'
    /// subsystems, restore what it keeps; the addresses it would bind count as bound.
    fn start(pool_path: &Path, max_hosts: usize) -> Control {
        let pool = PoolHandle::open(pool_path).unwrap();
        let target = Arc::new(ballast_nvmf::Target::default());
        let default: SocketAddr = DEFAULT_LISTEN.parse().unwrap();
        target.default_listeners.write().insert(default.into());
        let control = Control {
            registry: Arc::new(Registry::new(target.clone(), Some(pool.clone()))),
            target,
            cores: Arc::new(Vec::new()),
            pool: Some(pool.clone()),
            allow_hosts: Vec::new(),
            admission: Admission::new(ConnLimits {
                max_connections: 16,
                handshake_timeout: Duration::from_secs(10),
                stall_timeout: Duration::from_secs(30),
            }),
            buffer_memory: 0,
            started: Instant::now(),
            keyring: Default::default(),
            host_keys: Default::default(),
            max_hosts,
            settings: Default::default(),
            malloc_names: Default::default(),
            log: crate::logging::LogControl::detached(),
            default_export: None,
        };
        crate::volumes::export_all(&control, &pool).unwrap();
        let bind = restore(&control);
        for addr in std::iter::once(default).chain(bind) {
            control.target.listener_bound(addr.into());
        }
        control
    }

    fn call(control: &Control, method: &str, params: Value) -> Result<Value, (i64, String)> {
        let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let reply = crate::rpc::handle(&req, control).expect("a request with an id is answered");
        match reply.get("error") {
            Some(e) => Err((e["code"].as_i64().unwrap(), e["message"].as_str().unwrap().into())),
            None => Ok(reply["result"].clone()),
        }
    }

    fn ok(control: &Control, method: &str, params: Value) -> Value {
        call(control, method, params.clone()).unwrap_or_else(|e| panic!("{method} {params}: {e:?}"))
    }

    fn subsystem(control: &Control, nqn: &str) -> Value {
        ok(control, "nvmf_get_subsystems", json!({"nqn": nqn}))[0].clone()
    }

    fn host_names(s: &Value) -> Vec<String> {
        let mut h: Vec<String> = s["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["nqn"].as_str().unwrap().into())
            .collect();
        h.sort();
        h
    }

    #[test]
    fn the_security_configuration_survives_a_restart_and_a_missing_key_fails_closed() {
        let scratch = Scratch::new("restart");
        let pool = scratch.pool();
        let dh0 = dhchap_text(1);
        let dh1 = dhchap_text(2);
        let (psk0_path, dh0_path, dh1_path) =
            (scratch.key("psk0", PSK_TEXT), scratch.key("dh0", &dh0), scratch.key("dh1", &dh1));
        let gone_path = scratch.key("gone0", PSK_TEXT);
        let vol0 = nqn_of("vol0");
        {
            let c = start(&pool, 1024);
            c.target.listener_bound(TLS_LISTEN.parse::<SocketAddr>().unwrap().into());
            for (name, path) in [
                ("psk0", &psk0_path),
                ("dh0", &dh0_path),
                ("dh1", &dh1_path),
                ("gone0", &gone_path),
            ] {
                ok(&c, "keyring_file_add_key", json!({"name": name, "path": path}));
            }
            ok(
                &c,
                "nvmf_create_subsystem",
                json!({
                    "nqn": SUB, "allow_any_host": true,
                    "serial_number": "SN0001", "model_number": "Model X"
                }),
            );
            ok(
                &c,
                "nvmf_subsystem_add_ns",
                json!({"nqn": SUB, "namespace": {"bdev_name": "vol0", "block_size": 512}}),
            );
            ok(&c, "nvmf_subsystem_add_host", json!({"nqn": SUB, "host": HOST_PSK, "psk": "psk0"}));
            ok(
                &c,
                "nvmf_subsystem_add_host",
                json!({
                    "nqn": SUB, "host": HOST_DH, "dhchap_key": "dh0", "dhchap_ctrlr_key": "dh1",
                    "dhchap_digests": ["sha384"], "dhchap_dhgroups": ["ffdhe3072"]
                }),
            );
            ok(
                &c,
                "nvmf_subsystem_add_host",
                json!({"nqn": SUB, "host": HOST_GONE, "psk": "gone0"}),
            );
            ok(&c, "nvmf_subsystem_add_host", json!({"nqn": SUB, "host": HOST_PLAIN}));
            let tls = json!({"trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": "4421"});
            ok(
                &c,
                "nvmf_subsystem_add_listener",
                json!({"nqn": SUB, "listen_address": tls, "secure_channel": true}),
            );
            // The volume's own subsystem: a host, no longer any host, not on the default port.
            ok(&c, "nvmf_subsystem_add_host", json!({"nqn": vol0, "host": HOST_PLAIN}));
            ok(&c, "nvmf_subsystem_allow_any_host", json!({"nqn": vol0, "allow_any_host": false}));
            let default = json!({"trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": "4420"});
            ok(
                &c,
                "nvmf_subsystem_remove_listener",
                json!({"nqn": vol0, "listen_address": default}),
            );
            // A discovery service on an address of its own.
            let disc = json!({"trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": "8009"});
            c.target.listener_bound(DISCOVERY_LISTEN.parse::<SocketAddr>().unwrap().into());
            ok(
                &c,
                "nvmf_subsystem_add_listener",
                json!({"nqn": DISCOVERY_NQN, "listen_address": disc}),
            );
            // Made and deleted: nothing of it comes back.
            ok(&c, "nvmf_create_subsystem", json!({"nqn": SUB2}));
            ok(
                &c,
                "nvmf_subsystem_add_host",
                json!({"nqn": SUB2, "host": HOST_PSK, "psk": "psk0"}),
            );
            ok(&c, "nvmf_delete_subsystem", json!({"nqn": SUB2}));
            // No clean stop (no checkpoint): as after kill -9, the journal holds it all.
        }
        std::fs::remove_file(&gone_path).unwrap();
        let c = start(&pool, 1024);
        let keys = ok(&c, "keyring_get_keys", json!({}));
        let listed: Vec<(String, String, bool)> = keys
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["name"].as_str().unwrap().into(),
                    k["path"].as_str().unwrap().into(),
                    k.get("unavailable").is_some(),
                )
            })
            .collect();
        assert_eq!(
            listed,
            vec![
                ("dh0".into(), dh0_path.clone(), false),
                ("dh1".into(), dh1_path.clone(), false),
                ("gone0".into(), gone_path.clone(), true),
                ("psk0".into(), psk0_path.clone(), false),
            ]
        );
        let s = subsystem(&c, SUB);
        assert_eq!(
            (s["serial_number"].as_str(), s["model_number"].as_str()),
            (Some("SN0001"), Some("Model X"))
        );
        assert_eq!(s["allow_any_host"], json!(true));
        assert_eq!(host_names(&s), vec![HOST_PSK, HOST_DH, HOST_GONE, HOST_PLAIN]);
        let host = |nqn: &str| {
            s["hosts"].as_array().unwrap().iter().find(|h| h["nqn"] == nqn).unwrap().clone()
        };
        assert_eq!(host(HOST_PSK)["psk"], "psk0");
        assert_eq!(
            (host(HOST_DH)["dhchap_key"].as_str(), host(HOST_DH)["dhchap_ctrlr_key"].as_str()),
            (Some("dh0"), Some("dh1"))
        );
        assert_eq!(
            (host(HOST_GONE)["psk"].as_str(), host(HOST_GONE)["refused"].as_bool()),
            (Some("gone0"), Some(true))
        );
        assert!(host(HOST_PSK).get("refused").is_none());
        assert_eq!(s["namespaces"][0]["bdev_name"], "vol0");
        assert_eq!(s["namespaces"][0]["block_size"], 512);
        assert_eq!(s["listen_addresses"].as_array().unwrap().len(), 1);
        assert_eq!(s["listen_addresses"][0]["trsvcid"], "4421");
        let listeners = ok(&c, "nvmf_subsystem_get_listeners", json!({"nqn": SUB}));
        assert_eq!(
            (&listeners[0]["secure_channel"], &listeners[0]["secure_channel_mode"]),
            (&json!(true), &json!("required"))
        );
        // What the target enforces: the keys are back; the host whose key file is gone is
        // refused although the subsystem allows any host.
        let t = &c.target;
        let sub = t.subsystem(SUB).unwrap();
        assert!(t.tls.has_key(HOST_PSK, SUB));
        assert!(t.auth.get(HOST_DH, SUB).is_some_and(|a| a.bidirectional()));
        assert!(sub.host_allowed(HOST_PLAIN) && sub.host_allowed(HOST_PSK));
        assert!(!sub.host_allowed(HOST_GONE), "admitted without the key it was configured with");
        assert!(!t.tls.has_key(HOST_GONE, SUB));
        assert!(t.subsystem(SUB2).is_none());
        let disc: SocketAddr = DISCOVERY_LISTEN.parse().unwrap();
        assert!(t.discovery_services.read().contains(&ListenAddr::from(disc)));
        let v = subsystem(&c, &vol0);
        assert_eq!(
            (&v["allow_any_host"], host_names(&v)),
            (&json!(false), vec![HOST_PLAIN.to_string()])
        );
        assert!(
            v["listen_addresses"].as_array().unwrap().is_empty(),
            "the default listener was removed"
        );
        // The pool holds names and paths, never key text.
        let bytes = std::fs::read(&pool).unwrap();
        for text in [PSK_TEXT, dh0.as_str(), dh1.as_str()] {
            let body = text.split(':').nth(2).unwrap().as_bytes();
            assert!(!bytes.windows(body.len()).any(|w| w == body), "key text in the pool");
        }
        assert!(bytes.windows(psk0_path.len()).any(|w| w == psk0_path.as_bytes()));
        // The key file is back and added again: the refused host is admitted, with its key.
        let gone_path = scratch.key("gone0", PSK_TEXT);
        ok(&c, "keyring_file_add_key", json!({"name": "gone0", "path": gone_path}));
        assert!(sub.host_allowed(HOST_GONE) && t.tls.has_key(HOST_GONE, SUB));
        assert!(subsystem(&c, SUB)["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h.get("refused").is_none()));
        // What held the pool goes before the restart (a pool is one holder's at a time).
        drop(sub);
        drop(c);
        // Nothing is left over: a third start removes no entry and finds the same.
        let c = start(&pool, 1024);
        assert_eq!(host_names(&subsystem(&c, SUB)), vec![HOST_PSK, HOST_DH, HOST_GONE, HOST_PLAIN]);
        assert!(c.target.subsystem(SUB).unwrap().host_allowed(HOST_GONE));
        let decoded = pool_config::decode(c.pool.as_ref().unwrap().meta().config());
        assert!(decoded.stale.is_empty() && decoded.problems.is_empty(), "{:?}", decoded.stale);
    }

    #[test]
    fn a_pool_of_the_old_format_opens_and_moves_to_anchors_on_its_first_change() {
        let scratch = Scratch::new("legacy");
        let pool = scratch.pool();
        let vol0 = nqn_of("vol0");
        {
            // What the daemon kept before this format: `hosts:VOLUME`.
            let p = PoolHandle::open(&pool).unwrap();
            let legacy = json!({"allow_any_host": false, "hosts": [HOST_PLAIN]}).to_string();
            p.set_config("hosts:vol0", &legacy).unwrap();
        }
        let c = start(&pool, 1024);
        let v = subsystem(&c, &vol0);
        assert_eq!(
            (&v["allow_any_host"], host_names(&v)),
            (&json!(false), vec![HOST_PLAIN.to_string()])
        );
        assert!(!c.target.subsystem(&vol0).unwrap().host_allowed(HOST_PSK));
        ok(&c, "nvmf_subsystem_add_host", json!({"nqn": vol0, "host": HOST_DH}));
        {
            let meta = c.pool.as_ref().unwrap().meta();
            assert!(!meta.config().contains_key("hosts:vol0"), "the legacy entry went");
            assert!(meta.config().contains_key(&anchor_key(&vol0)));
        }
        drop(c);
        let c = start(&pool, 1024);
        let v = subsystem(&c, &vol0);
        assert_eq!(
            (&v["allow_any_host"], host_names(&v)),
            (&json!(false), vec![HOST_DH.to_string(), HOST_PLAIN.to_string()])
        );
        // An anchor this version cannot read: the subsystem admits no host at all.
        c.pool
            .as_ref()
            .unwrap()
            .set_config(&anchor_key(&vol0), r#"{"nqn":"x","future":1}"#)
            .unwrap();
        drop(c);
        let c = start(&pool, 1024);
        let sub = c.target.subsystem(&vol0).unwrap();
        assert!(!sub.allow_any_host.load(Ordering::Relaxed) && sub.hosts.read().is_empty());
        assert!(!sub.host_allowed(HOST_PLAIN) && !sub.host_allowed(HOST_DH));
    }

    /// A listener's ANA states are written once (the same states set again write nothing),
    /// an entry this build cannot read is replaced by the next set, and a restart finds them.
    #[test]
    fn ana_states_are_kept_once_and_an_unreadable_entry_is_replaced() {
        let scratch = Scratch::new("ana");
        let pool = scratch.pool();
        let vol0 = nqn_of("vol0");
        let addr: SocketAddr = DEFAULT_LISTEN.parse().unwrap();
        let via = ListenAddr::from(addr);
        let listen = json!({"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
                            "trsvcid": addr.port().to_string()});
        let kept_all = |c: &Control| {
            c.target.ana_preview(&vol0, &via, None, AnaState::Optimized).unwrap().0.map(|l| l.all)
        };
        {
            let c = start(&pool, 16);
            let set = |state: &str| {
                let p = json!({"nqn": vol0, "listen_address": listen, "ana_state": state});
                ok(&c, "nvmf_subsystem_listener_set_ana_state", p);
            };
            let commits = || c.pool.as_ref().unwrap().meta_shared().commits_done().0;
            set("inaccessible");
            let n = commits();
            set("inaccessible");
            assert_eq!(commits(), n, "the same states again: nothing written");
            let unreadable = r#"{"gen":1,"future":true}"#;
            c.pool.as_ref().unwrap().set_config(&ana_key(&vol0, &addr), unreadable).unwrap();
            assert!(!ana_kept_as(
                &c,
                &vol0,
                &addr,
                c.target.subsystem(&vol0).unwrap().ana.listener(&via).as_ref()
            ));
            set("inaccessible");
            assert!(commits() > n + 1, "the unreadable entry replaced");
        }
        let c = start(&pool, 16);
        assert_eq!(kept_all(&c), Some(AnaState::Inaccessible), "found after the restart");
    }

    #[test]
    fn a_subsystem_lists_at_most_max_hosts_and_says_so() {
        let scratch = Scratch::new("limit");
        let pool = scratch.pool();
        let vol0 = nqn_of("vol0");
        let c = start(&pool, 3);
        let host = |i: u32| format!("nqn.2014-08.org.nvmexpress:uuid:host-{i}");
        for i in 0..3 {
            ok(&c, "nvmf_subsystem_add_host", json!({"nqn": vol0, "host": host(i)}));
        }
        let e =
            call(&c, "nvmf_subsystem_add_host", json!({"nqn": vol0, "host": host(3)})).unwrap_err();
        assert_eq!(
            e,
            (
                crate::rpc_error::INVALID_PARAMS,
                format!(
                    "Invalid parameters: subsystem '{vol0}' has 3 hosts, the most it may have \
                     (--max-hosts-per-subsystem 3)"
                )
            )
        );
        assert_eq!(host_names(&subsystem(&c, &vol0)).len(), 3, "nothing was added");
        // Adding a listed host again (new keys) is no new host; removing one makes room.
        ok(&c, "nvmf_subsystem_add_host", json!({"nqn": vol0, "host": host(0)}));
        ok(&c, "nvmf_subsystem_remove_host", json!({"nqn": vol0, "host": host(1)}));
        ok(&c, "nvmf_subsystem_add_host", json!({"nqn": vol0, "host": host(3)}));
        ok(&c, "nvmf_subsystem_allow_any_host", json!({"nqn": vol0, "allow_any_host": false}));
        // Deleting the volume's own subsystem lasts until the restart, which makes it again
        // with its settings, not more open than it was.
        ok(&c, "nvmf_delete_subsystem", json!({"nqn": vol0}));
        drop(c);
        let c = start(&pool, 3);
        let v = subsystem(&c, &vol0);
        assert_eq!(host_names(&v), vec![host(0), host(2), host(3)]);
        assert_eq!(v["allow_any_host"], json!(false));
    }
}
