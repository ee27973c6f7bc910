//! NVMe-oF control methods, with SPDK's names and parameters so SPDK tooling works against us.
//! A method that changes a subsystem, its hosts or listeners keeps the change in the pool
//! (`persist`, under `Control::settings`) before it takes effect, and answers an error, having
//! changed nothing, when it cannot.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use ballast_nvmf::ana::AnaState;
use ballast_nvmf::subsys::{Identity, ListenAddr, SubsysError, Subsystem, DISCOVERY_NQN};
use ballast_nvmf::tls::SecureChannel;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::control::{Control, HostKeyNames, Method};
use crate::host_auth;
use crate::persist::{self, PersistError};
use crate::registry::RegistryError;
use crate::rpc_error::{
    invalid_parameters, no_such_device, params, DecodeStyle, RpcError, INTERNAL_ERROR,
    INVALID_PARAMS,
};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// SPDK's methods take `tgt_name` to pick one of several targets; ballast has one, unnamed.
fn check_target(tgt_name: Option<&str>) -> Result<(), RpcError> {
    match tgt_name {
        Some(t) => Err(invalid_parameters(format!("NVMf target '{t}' not found"))),
        None => Ok(()),
    }
}

fn subsys_err(e: SubsysError) -> RpcError {
    match e {
        SubsysError::NoSubsystem(nqn) => not_found(&nqn),
        other => invalid_parameters(other),
    }
}

fn registry_err(e: RegistryError) -> RpcError {
    match e {
        RegistryError::Nvmf(e) => subsys_err(e),
        other => invalid_parameters(other),
    }
}

/// The controller ids every subsystem hands out (SPDK's defaults, 0xFFEF the spec's highest).
const CNTLID_MIN: u16 = 1;
const CNTLID_MAX: u16 = 0xFFEF;

fn not_found(nqn: &str) -> RpcError {
    invalid_parameters(format!("Subsystem with NQN '{nqn}' not found"))
}

/// A change the pool could not keep (so it did not take effect).
pub fn persist_err(e: PersistError) -> RpcError {
    match e {
        PersistError::NoSubsystem(nqn) => not_found(&nqn),
        PersistError::Codec(e) => invalid_parameters(e),
        e @ PersistError::Pool(_) => RpcError::new(INTERNAL_ERROR, e.to_string()),
    }
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GetSubsystems {
    pub nqn: Option<String>,
    pub tgt_name: Option<String>,
}

/// `nvmf_create_transport`: TCP is always there (its listeners come from `--nvmf-listen` and
/// `nvmf_subsystem_add_listener`), so creating it again succeeds. The tuning fields spdk-rpc
/// sends (`c2h_success`, `zcopy`, `no_srq`, ...) are accepted and do not change anything.
#[derive(Deserialize)]
struct CreateTransport {
    trtype: String,
    tgt_name: Option<String>,
    #[serde(flatten)]
    tuning: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetTransports {
    trtype: Option<String>,
    tgt_name: Option<String>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateSubsystem {
    pub nqn: String,
    pub serial_number: Option<String>,
    pub model_number: Option<String>,
    #[serde(default)]
    pub allow_any_host: bool,
    /// Every I/O subsystem reports ANA (as Linux's nvmet does): either value is accepted.
    #[serde(default)]
    pub ana_reporting: bool,
    #[serde(default)]
    pub passthrough: bool,
    #[serde(default)]
    pub enable_nssr: bool,
    pub max_namespaces: Option<u32>,
    pub min_cntlid: Option<u16>,
    pub max_cntlid: Option<u16>,
    pub tgt_name: Option<String>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Nqn {
    pub nqn: String,
    pub tgt_name: Option<String>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AddNs {
    pub nqn: String,
    pub namespace: NsParams,
    pub tgt_name: Option<String>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NsParams {
    pub bdev_name: String,
    #[serde(default)]
    pub nsid: u32,
    /// Ballast's: the LBA size hosts see (512 or 4096).
    pub block_size: Option<u32>,
    /// Namespace identities derive from the subsystem's NQN; giving them is refused.
    pub nguid: Option<String>,
    pub eui64: Option<String>,
    pub uuid: Option<String>,
    pub anagrpid: Option<u32>,
    pub ptpl_file: Option<String>,
    /// Every namespace is visible to every allowed host; `false` (the default) is accepted.
    #[serde(default)]
    pub no_auto_visible: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveNs {
    nqn: String,
    nsid: u32,
    tgt_name: Option<String>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub nqn: String,
    pub host: String,
    pub tgt_name: Option<String>,
    /// The keyring name of the host's TLS PSK (interchange format `NVMeTLSkey-1:xx:...:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk: Option<String>,
    /// The keyring name of the host's DH-HMAC-CHAP secret (`DHHC-1:xx:...:`): the host must
    /// authenticate in-band on every queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhchap_key: Option<String>,
    /// The keyring name of the controller's secret (bidirectional authentication).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhchap_ctrlr_key: Option<String>,
    /// ballast's extension, with the names SPDK's `nvmf_set_config` uses target-wide: the
    /// hashes (`sha256`, `sha384`, `sha512`) this host may use, preferred first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhchap_digests: Option<Vec<String>>,
    /// Likewise the DH groups (`null`, `ffdhe2048` … `ffdhe8192`), preferred first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhchap_dhgroups: Option<Vec<String>>,
}

/// `nvmf_subsystem_set_keys`: a listed host's DH-HMAC-CHAP keys replaced (both absent: it
/// connects without authenticating); its PSK, hashes and groups stay.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetKeys {
    nqn: String,
    host: String,
    tgt_name: Option<String>,
    dhchap_key: Option<String>,
    dhchap_ctrlr_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowAnyHost {
    nqn: String,
    allow_any_host: bool,
    tgt_name: Option<String>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AddListener {
    pub nqn: String,
    pub listen_address: ListenAddress,
    /// SPDK's `true` (TLS required on this listener), or ballast's "none" | "optional" |
    /// "required".
    #[serde(default)]
    pub secure_channel: SecureChannelParam,
    pub tgt_name: Option<String>,
    /// SPDK's: the listener's ANA state for every group from the start (a listener added now;
    /// one the subsystem already had keeps its states).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ana_state: Option<String>,
}

/// `nvmf_subsystem_listener_set_ana_state`, SPDK's parameters.
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SetAnaState {
    pub nqn: String,
    pub listen_address: ListenAddress,
    /// "optimized", "non_optimized" or "inaccessible" (SPDK's); "persistent_loss" too
    /// ("change" is refused: see `ana_state`).
    pub ana_state: String,
    /// One ANA group (1 to the subsystem's max_namespaces); absent: every group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anagrpid: Option<u32>,
    pub tgt_name: Option<String>,
}

/// `secure_channel` of `nvmf_subsystem_add_listener`: SPDK's flag or a named mode.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(untagged)]
pub enum SecureChannelParam {
    Flag(bool),
    Mode(SecureChannel),
}

impl Default for SecureChannelParam {
    fn default() -> Self {
        SecureChannelParam::Flag(false)
    }
}

impl SecureChannelParam {
    fn mode(self) -> SecureChannel {
        match self {
            SecureChannelParam::Flag(true) => SecureChannel::Required,
            SecureChannelParam::Flag(false) => SecureChannel::None,
            SecureChannelParam::Mode(m) => m,
        }
    }
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ListenAddress {
    pub trtype: String,
    pub adrfam: Option<String>,
    pub traddr: String,
    pub trsvcid: Option<String>,
}

/// Refuses what SPDK would honour and ballast cannot, instead of ignoring it.
fn unsupported(what: &str, given: bool) -> Result<(), RpcError> {
    if given {
        return Err(invalid_parameters(format!("{what} is not supported by ballast")));
    }
    Ok(())
}

const G: DecodeStyle = DecodeStyle::Generic;

/// The `nvmf_*` methods, each in one place: name and handler.
pub const METHODS: &[Method] = &[
    Method { name: "nvmf_get_subsystems", call: get_subsystems },
    Method { name: "nvmf_create_transport", call: create_transport },
    Method { name: "nvmf_get_transports", call: get_transports },
    Method { name: "nvmf_create_subsystem", call: create_subsystem },
    Method { name: "nvmf_delete_subsystem", call: delete_subsystem },
    Method { name: "nvmf_subsystem_add_ns", call: add_ns },
    Method { name: "nvmf_subsystem_remove_ns", call: remove_ns },
    Method { name: "nvmf_subsystem_add_host", call: |c, p| host(c, p, true) },
    Method { name: "nvmf_subsystem_remove_host", call: |c, p| host(c, p, false) },
    Method { name: "nvmf_subsystem_allow_any_host", call: allow_any_host },
    Method { name: "nvmf_subsystem_add_listener", call: |c, p| add_listener(c, params(p, G)?) },
    Method {
        name: "nvmf_subsystem_remove_listener",
        call: |c, p| remove_listener(c, params(p, G)?),
    },
    Method { name: "nvmf_subsystem_get_listeners", call: get_listeners },
    Method { name: "nvmf_subsystem_listener_set_ana_state", call: set_ana_state },
    Method { name: "nvmf_subsystem_set_keys", call: set_keys },
    Method { name: "nvmf_subsystem_get_controllers", call: get_controllers },
    Method { name: "nvmf_subsystem_get_qpairs", call: get_qpairs },
    Method { name: "nvmf_ns_get_reservation", call: get_reservation },
];

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NsRef {
    pub nqn: String,
    pub nsid: u32,
    pub tgt_name: Option<String>,
}

/// One registrant of `nvmf_ns_get_reservation` (no key: a key lets a peer preempt).
#[derive(Serialize, Deserialize)]
pub struct RegistrantEntry {
    pub hostid: String,
    /// Hosts of the subsystem's controllers connected with this identifier now.
    pub hostnqns: Vec<String>,
    pub holds: bool,
}

/// `nvmf_ns_get_reservation`'s result.
#[derive(Serialize, Deserialize)]
pub struct ReservationView {
    pub nsid: u32,
    pub generation: u32,
    /// The reservation's type (1-6), 0 when none is held.
    pub rtype: u8,
    pub ptpl: bool,
    /// PTPL can be turned on (a pool keeps the table).
    pub ptpl_capable: bool,
    pub registrants: Vec<RegistrantEntry>,
}

/// `nvmf_ns_get_reservation {nqn, nsid}` (ballast's own; SPDK has none): a namespace's NVMe
/// reservation as hosts' Reservation Report sees it, without the keys.
fn get_reservation(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let r: NsRef = params(p, G)?;
    check_target(r.tgt_name.as_deref())?;
    let subsys = control.target.subsystem(&r.nqn).ok_or_else(|| not_found(&r.nqn))?;
    let ns =
        subsys.namespace(r.nsid).ok_or(SubsysError::NoNamespace(r.nsid)).map_err(subsys_err)?;
    let st = ns.resv.status();
    let ctrls = control.target.controllers_of(&r.nqn);
    let registrants: Vec<RegistrantEntry> = st
        .registrants
        .iter()
        .map(|(host, holds)| {
            let mut hostnqns: Vec<String> =
                ctrls.iter().filter(|c| c.hostid == *host).map(|c| c.hostnqn.clone()).collect();
            hostnqns.sort();
            hostnqns.dedup();
            RegistrantEntry { hostid: hostid_text(host), hostnqns, holds: *holds }
        })
        .collect();
    Ok(json!(ReservationView {
        nsid: r.nsid,
        generation: st.generation,
        rtype: st.rtype.unwrap_or(0),
        ptpl: st.ptpl,
        ptpl_capable: st.persistent,
        registrants,
    }))
}

fn create_transport(_: &Control, p: &Value) -> Result<Value, RpcError> {
    let t: CreateTransport = params(p, G)?;
    check_target(t.tgt_name.as_deref())?;
    if !t.trtype.eq_ignore_ascii_case("tcp") {
        let msg = format!("Transport type '{}' unsupported", t.trtype);
        return Err(invalid_parameters(msg));
    }
    let ignored: Vec<&String> = t.tuning.keys().collect();
    tracing::info!(?ignored, "nvmf_create_transport TCP: already there");
    Ok(json!(true))
}

/// One transport of `nvmf_get_transports` (SPDK's fields that apply).
#[derive(Serialize)]
struct TransportEntry {
    trtype: &'static str,
    max_io_size: u32,
    in_capsule_data_size: u32,
}

fn get_transports(_: &Control, p: &Value) -> Result<Value, RpcError> {
    let t: GetTransports = params(p, G)?;
    check_target(t.tgt_name.as_deref())?;
    if t.trtype.as_deref().is_some_and(|tr| !tr.eq_ignore_ascii_case("tcp")) {
        // SPDK (rpc_nvmf_get_transports): -ENODEV.
        return Err(no_such_device());
    }
    let tcp = TransportEntry {
        trtype: "TCP",
        max_io_size: ballast_nvmf::identify::MAX_TRANSFER_BYTES,
        in_capsule_data_size: ballast_nvmf::identify::IN_CAPSULE_BYTES,
    };
    Ok(json!([tcp]))
}

fn create_subsystem(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let c: CreateSubsystem = params(p, G)?;
    check_target(c.tgt_name.as_deref())?;
    unsupported("passthrough", c.passthrough)?;
    unsupported("enable_nssr", c.enable_nssr)?;
    // SPDK's own defaults (older clients always send them) are our range; others are refused.
    unsupported(
        "min_cntlid/max_cntlid other than 1/65519",
        c.min_cntlid.is_some_and(|n| n != CNTLID_MIN)
            || c.max_cntlid.is_some_and(|n| n != CNTLID_MAX),
    )?;
    let nqn = c.nqn.as_str();
    let identity = Identity {
        serial: c.serial_number.clone(),
        model: c.model_number.clone(),
        max_namespaces: c.max_namespaces,
    };
    let _settings = control.settings.lock();
    let subsys = control
        .target
        .create_subsystem_as(nqn, c.allow_any_host, identity.clone())
        .map_err(|e| match e {
            SubsysError::Exists(_) => {
                RpcError::new(INTERNAL_ERROR, format!("Unable to create subsystem {nqn}"))
            }
            // SPDK's messages for what spdk_nvmf_subsystem_set_sn/_mn refuse.
            SubsysError::BadSerial(sn) => RpcError::new(INVALID_PARAMS, format!("Invalid SN {sn}")),
            SubsysError::BadModel(mn) => RpcError::new(INVALID_PARAMS, format!("Invalid MN {mn}")),
            other => invalid_parameters(other),
        })?;
    if let Err(e) = persist::keep_created(control, nqn, c.allow_any_host, &identity) {
        let _ = control.registry.delete_subsystem(nqn);
        return Err(persist_err(e));
    }
    let max_ns = c.max_namespaces;
    tracing::info!(
        nqn,
        allow_any_host = c.allow_any_host,
        serial = subsys.serial,
        model = subsys.model,
        ?max_ns,
        "subsystem created"
    );
    Ok(json!(true))
}

fn delete_subsystem(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let d: Nqn = params(p, G)?;
    check_target(d.tgt_name.as_deref())?;
    let _settings = control.settings.lock();
    if control.target.subsystem(&d.nqn).is_none() {
        return Err(not_found(&d.nqn));
    }
    let forgot = persist::forget_deleted(control, &d.nqn).map_err(persist_err)?;
    control.registry.delete_subsystem(&d.nqn).map_err(registry_err)?;
    if forgot {
        // Again, now that no namespace of it can save its reservations any more.
        persist::forget_subsystem_reservations(control, &d.nqn).map_err(persist_err)?;
    }
    control.host_keys.write().retain(|(nqn, _), _| *nqn != d.nqn);
    tracing::info!(nqn = d.nqn, "subsystem deleted");
    Ok(json!(true))
}

fn add_ns(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let a: AddNs = params(p, G)?;
    check_target(a.tgt_name.as_deref())?;
    let ns = &a.namespace;
    unsupported("nguid/eui64/uuid", ns.nguid.is_some() || ns.eui64.is_some())?;
    unsupported("uuid", ns.uuid.is_some())?;
    unsupported("ptpl_file", ns.ptpl_file.is_some())?;
    unsupported("no_auto_visible", ns.no_auto_visible)?;
    if control.target.subsystem(&a.nqn).is_none() {
        return Err(not_found(&a.nqn));
    }
    let bdev = ns.bdev_name.as_str();
    let device = control
        .registry
        .resolve(bdev)
        .ok_or_else(|| invalid_parameters(format!("bdev '{bdev}' does not exist")))?;
    // Given, else the bdev's own (SPDK: the namespace's LBA size is its bdev's), else 4096.
    let block_size = ns.block_size.or(device.block_size).unwrap_or(4096);
    let _settings = control.settings.lock();
    let nsid = control
        .registry
        .add_namespace(&a.nqn, ns.nsid, ns.anagrpid, &device.name, block_size)
        .map_err(registry_err)?;
    let (name, uuid) = (&device.name, &device.uuid);
    let kept = persist::keep_namespace(control, &a.nqn, nsid, ns.anagrpid, name, uuid, block_size);
    if let Err(e) = kept {
        let _ = control.registry.remove_namespace(&a.nqn, nsid);
        return Err(persist_err(e));
    }
    tracing::info!(nqn = a.nqn, nsid, bdev, export = device.name, "namespace added");
    Ok(json!(nsid))
}

fn remove_ns(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let r: RemoveNs = params(p, G)?;
    check_target(r.tgt_name.as_deref())?;
    let _settings = control.settings.lock();
    let subsys = control.target.subsystem(&r.nqn).ok_or_else(|| not_found(&r.nqn))?;
    if subsys.namespace(r.nsid).is_none() {
        return Err(subsys_err(SubsysError::NoNamespace(r.nsid)));
    }
    persist::forget_namespace(control, &r.nqn, r.nsid).map_err(persist_err)?;
    control.registry.remove_namespace(&r.nqn, r.nsid).map_err(registry_err)?;
    // Again, now that the namespace's cell is retired (a save may have run in between).
    persist::forget_reservations(control, &r.nqn, r.nsid).map_err(persist_err)?;
    Ok(json!(true))
}

/// A host NQN that a Connect can carry and a TLS identity can name: 1 to 223 bytes (the NVMe
/// base specification's limit), no spaces or control characters (SPDK refuses what is not an
/// NQN with -EINVAL too; one kept unusable would only mislead a listing).
fn check_host_nqn(nqn: &str) -> Result<(), RpcError> {
    if nqn.is_empty() || nqn.len() > 223 || nqn.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid_parameters(format!(
            "host NQN {:?}: 1 to 223 bytes, no spaces or control characters",
            nqn.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

/// `nvmf_subsystem_add_host` (`add`) and `nvmf_subsystem_remove_host`. A host is added with
/// every key it names resolved, kept in the pool, then admitted; at most `--max-hosts-per-
/// subsystem` hosts per subsystem.
fn host(control: &Control, p: &Value, add: bool) -> Result<Value, RpcError> {
    let h: Host = params(p, G)?;
    check_target(h.tgt_name.as_deref())?;
    let names = HostKeyNames {
        psk: h.psk.clone(),
        dhchap_key: h.dhchap_key.clone(),
        dhchap_ctrlr_key: h.dhchap_ctrlr_key.clone(),
        dhchap_digests: h.dhchap_digests.clone(),
        dhchap_dhgroups: h.dhchap_dhgroups.clone(),
    };
    if !add && h.psk.is_some() {
        return Err(invalid_parameters("psk is only for adding a host"));
    }
    if add {
        check_host_nqn(&h.host)?;
    }
    let _settings = control.settings.lock();
    let subsys = control.target.subsystem(&h.nqn).ok_or_else(|| not_found(&h.nqn))?;
    if add {
        let listed = subsys.hosts.read().len();
        if listed >= control.max_hosts && !subsys.hosts.read().contains(&h.host) {
            return Err(invalid_parameters(format!(
                "subsystem '{}' has {listed} hosts, the most it may have \
                 (--max-hosts-per-subsystem {})",
                h.nqn, control.max_hosts
            )));
        }
        admit_host(control, &subsys, &h.host, &names)?;
        if names != HostKeyNames::default() {
            let keys: Vec<&str> = names.key_names().collect();
            tracing::info!(host = h.host, nqn = h.nqn, ?keys, "host added with keys");
        }
    } else {
        persist::forget_host(control, &h.nqn, &h.host).map_err(persist_err)?;
        host_auth::forget(control, &subsys, &h.host);
    }
    control.target.genctr.fetch_add(1, Ordering::Relaxed);
    Ok(json!(true))
}

/// Removes the NVMe namespaces made from device `name`, as SPDK hot-removes a deleted bdev's
/// (their hosts get a namespace-changed event); the pool forgets each where it keeps the
/// subsystem's settings (an export's own subsystem, made at start from `--export`, is made
/// again with its namespace). The caller holds `control.settings`.
pub fn remove_namespaces_of(
    control: &Control,
    name: &str,
    _settings: &parking_lot::MutexGuard<'_, ()>,
) -> Result<(), RpcError> {
    for (nqn, nsid) in control.registry.namespaces_of(name) {
        if persist::has_settings(control, &nqn) {
            persist::forget_namespace(control, &nqn, nsid).map_err(persist_err)?;
        } else {
            persist::forget_reservations(control, &nqn, nsid).map_err(persist_err)?;
        }
        if let Err(e) = control.registry.remove_namespace(&nqn, nsid) {
            tracing::warn!(device = name, nqn, nsid, error = %e, "removing its namespace failed");
        }
        // Again, now that the namespace's cell is retired (a save may have run in between).
        persist::forget_reservations(control, &nqn, nsid).map_err(persist_err)?;
        tracing::info!(device = name, nqn, nsid, "namespace removed with its device");
    }
    Ok(())
}

/// A host admitted with `names` (every key resolved, then kept in the pool, then in effect),
/// under the caller's settings lock: a queue's next authentication uses them.
fn admit_host(
    control: &Control,
    subsys: &ballast_nvmf::subsys::Subsystem,
    host: &str,
    names: &HostKeyNames,
) -> Result<(), RpcError> {
    let keys = host_auth::resolve(&control.keyring, &subsys.nqn, host, names)
        .map_err(invalid_parameters)?;
    persist::keep_host(control, &subsys.nqn, host, names).map_err(persist_err)?;
    host_auth::admit(control, subsys, host, names, keys);
    Ok(())
}

/// `nvmf_subsystem_set_keys` (SPDK 24.09's key rotation): only for a host already listed
/// (SPDK's -EINVAL otherwise). Controllers connected keep their association; each queue's
/// next authentication (the host's re-authentication, a new connection) uses the new keys.
fn set_keys(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let k: SetKeys = params(p, G)?;
    check_target(k.tgt_name.as_deref())?;
    let _settings = control.settings.lock();
    let subsys = control.target.subsystem(&k.nqn).ok_or_else(|| not_found(&k.nqn))?;
    if !subsys.hosts.read().contains(&k.host) {
        return Err(invalid_parameters(format!(
            "host '{}' is not allowed on subsystem '{}' (nvmf_subsystem_add_host first)",
            k.host, k.nqn
        )));
    }
    if k.dhchap_ctrlr_key.is_some() && k.dhchap_key.is_none() {
        return Err(invalid_parameters("a controller key needs a host key (dhchap_key)"));
    }
    let mut names =
        control.host_keys.read().get(&(k.nqn.clone(), k.host.clone())).cloned().unwrap_or_default();
    if k.dhchap_key.is_none() {
        // No authentication from now on: its hash and group choices go with the keys.
        names.dhchap_digests = None;
        names.dhchap_dhgroups = None;
    }
    names.dhchap_key = k.dhchap_key;
    names.dhchap_ctrlr_key = k.dhchap_ctrlr_key;
    admit_host(control, &subsys, &k.host, &names)?;
    let keys: Vec<&str> = names.key_names().collect();
    tracing::info!(host = k.host, nqn = k.nqn, ?keys, "host's keys set");
    Ok(json!(true))
}

/// `nvmf_subsystem_get_controllers`' entries, SPDK's shape (`dump_nvmf_ctrlr`).
#[derive(Serialize)]
struct ControllerInfo {
    cntlid: u16,
    hostnqn: String,
    hostid: String,
    num_io_qpairs: usize,
    cntrltype: &'static str,
}

#[derive(Serialize)]
struct AuthInfo {
    state: &'static str,
    digest: &'static str,
    dhgroup: &'static str,
}

/// `nvmf_subsystem_get_qpairs`' entries, SPDK's shape (`dump_nvmf_qpair`; no `thread`: a
/// queue's core may change as it is placed). `auth` as SPDK's: on a queue that authenticated.
#[derive(Serialize)]
struct QpairInfo {
    cntlid: u16,
    qid: u16,
    state: &'static str,
    hostnqn: String,
    listen_address: ListenEntry,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_address: Option<ListenEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<AuthInfo>,
}

/// A host identifier as SPDK prints it: the 16 bytes as a UUID.
fn hostid_text(b: &[u8; 16]) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        hex(&b[..4]),
        hex(&b[4..6]),
        hex(&b[6..8]),
        hex(&b[8..10]),
        hex(&b[10..])
    )
    .to_lowercase()
}

/// The live controllers of subsystem `nqn`, by controller id.
fn live_controllers(
    control: &Control,
    p: &Value,
) -> Result<Vec<std::sync::Arc<ballast_nvmf::subsys::Controller>>, RpcError> {
    let n: Nqn = params(p, G)?;
    check_target(n.tgt_name.as_deref())?;
    control.target.subsystem(&n.nqn).ok_or_else(|| not_found(&n.nqn))?;
    let mut list = control.target.controllers_of(&n.nqn);
    list.retain(|c| !c.dead.load(Ordering::Relaxed));
    list.sort_by_key(|c| c.cntlid);
    Ok(list)
}

/// `nvmf_subsystem_get_controllers`: who is connected, with how many I/O queues.
fn get_controllers(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let out: Vec<ControllerInfo> = live_controllers(control, p)?
        .iter()
        .map(|c| ControllerInfo {
            cntlid: c.cntlid,
            hostnqn: c.hostnqn.clone(),
            hostid: hostid_text(&c.hostid),
            num_io_qpairs: c.io_qids.lock().len(),
            cntrltype: "io",
        })
        .collect();
    Ok(json!(out))
}

/// `nvmf_subsystem_get_qpairs`: every connected queue of every live controller (by queue
/// id: the admin queue first), in SPDK's states ("authenticating" until its first
/// authentication is done, then "enabled"; an I/O queue that must authenticate is listed once
/// it has), where the host connects from and how the queue authenticated.
fn get_qpairs(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let mut out = Vec::new();
    for c in live_controllers(control, p)? {
        let queues = c.queues.lock().clone();
        for (qid, q) in queues {
            out.push(QpairInfo {
                cntlid: c.cntlid,
                qid,
                state: if q.authenticating { "authenticating" } else { "enabled" },
                hostnqn: c.hostnqn.clone(),
                listen_address: ListenEntry::from(&c.via),
                peer_address: q
                    .peer
                    .parse::<SocketAddr>()
                    .ok()
                    .map(|a| ListenEntry::from(&ListenAddr::from(a))),
                auth: q.auth.map(|(digest, dhgroup)| AuthInfo {
                    state: "completed",
                    digest,
                    dhgroup,
                }),
            });
        }
    }
    Ok(json!(out))
}

fn allow_any_host(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let a: AllowAnyHost = params(p, G)?;
    check_target(a.tgt_name.as_deref())?;
    let _settings = control.settings.lock();
    let subsys = control.target.subsystem(&a.nqn).ok_or_else(|| not_found(&a.nqn))?;
    persist::keep_access(control, &a.nqn, a.allow_any_host).map_err(persist_err)?;
    subsys.allow_any_host.store(a.allow_any_host, Ordering::Relaxed);
    control.target.genctr.fetch_add(1, Ordering::Relaxed);
    Ok(json!(true))
}

/// The address of `nvmf_subsystem_add_listener`/`_remove_listener` (TCP only).
fn listen_addr(la: &ListenAddress) -> Result<SocketAddr, RpcError> {
    if !la.trtype.eq_ignore_ascii_case("tcp") {
        let msg = format!("transport {:?} not supported (tcp only)", la.trtype);
        return Err(invalid_parameters(msg));
    }
    if let Some(fam) = &la.adrfam {
        if !fam.eq_ignore_ascii_case("ipv4") && !fam.eq_ignore_ascii_case("ipv6") {
            return Err(invalid_parameters(format!("adrfam {fam:?}: IPv4 or IPv6 only")));
        }
    }
    let port = la.trsvcid.as_deref().unwrap_or("4420");
    let host = la.traddr.trim_start_matches('[').trim_end_matches(']');
    let text =
        if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    text.parse().map_err(|e| invalid_parameters(format!("listen address {text}: {e}")))
}

/// Lets hosts reach a subsystem through an address, binding it first if nothing listens there
/// yet (its secure channel set before it accepts). On the discovery NQN, the address becomes a
/// discovery service (its log lists every subsystem, as `--discovery-listen`'s does). Kept in
/// the pool before the subsystem listens there.
fn add_listener(control: &Control, l: AddListener) -> Result<Value, RpcError> {
    check_target(l.tgt_name.as_deref())?;
    let target = &control.target;
    let discovery = l.nqn == DISCOVERY_NQN;
    let _settings = control.settings.lock();
    if !discovery && target.subsystem(&l.nqn).is_none() {
        return Err(not_found(&l.nqn));
    }
    let addr = listen_addr(&l.listen_address)?;
    let via = ListenAddr::from(addr);
    let secure = l.secure_channel.mode();
    let ana = l.ana_state.as_deref().map(ana_state).transpose()?;
    if ana.is_some() && discovery {
        return Err(invalid_parameters("the discovery subsystem has no ANA states"));
    }
    let bound = target.port_id(&via).is_some();
    if !bound {
        let before = target.secure_channel(&via);
        if secure != before {
            target.set_secure_channel(via.clone(), secure);
        }
        let started =
            crate::listeners::start_nvmf_listener(&control.cores, target, &control.admission, addr);
        if let Err(e) = started {
            if secure != before {
                target.set_secure_channel(via.clone(), before);
            }
            return Err(invalid_parameters(format!("{e:#}")));
        }
    }
    // The channel is the address's, shared by every subsystem listening there: a listener
    // added asking more makes it stricter, never weaker (another subsystem's hosts without
    // keys would otherwise be let in in plaintext, or ones with none locked out) — as the
    // restore at start-up takes the strictest.
    let before = target.secure_channel(&via);
    if bound && persist::strictness(secure) > persist::strictness(before) {
        target.set_secure_channel(via.clone(), secure);
    }
    // A listener new to the subsystem starts with `ana_state` (kept with it).
    let fresh = (!discovery && !target.subsystem(&l.nqn).is_some_and(|s| s.listens_on(&via)))
        .then_some(ana);
    if let Err(e) = persist::keep_listener(control, &l.nqn, addr, true, secure, fresh) {
        // Nothing changed but the socket bound, which answers discovery and serves no
        // subsystem more than before.
        if target.secure_channel(&via) != before {
            target.set_secure_channel(via.clone(), before);
        }
        return Err(persist_err(e));
    }
    if discovery {
        target.discovery_services.write().insert(via);
        target.genctr.fetch_add(1, Ordering::Relaxed);
    } else {
        target.add_listener_in(&l.nqn, via, ana).map_err(subsys_err)?;
    }
    tracing::info!(nqn = l.nqn, %addr, new = !bound, ?secure, ?ana, "listener added");
    Ok(json!(true))
}

/// Stops a subsystem listening on an address; its controllers connected there end. The socket
/// stays bound (discovery answers there; other subsystems may listen on it).
fn remove_listener(control: &Control, l: AddListener) -> Result<Value, RpcError> {
    check_target(l.tgt_name.as_deref())?;
    let target = &control.target;
    let addr = listen_addr(&l.listen_address)?;
    let via = ListenAddr::from(addr);
    let _settings = control.settings.lock();
    // SPDK's answer when the subsystem has no such listener.
    let no_listener = || RpcError::new(INVALID_PARAMS, "Invalid parameters");
    if l.nqn == DISCOVERY_NQN {
        if !target.discovery_services.read().contains(&via) {
            return Err(no_listener());
        }
    } else {
        let subsys = target.subsystem(&l.nqn).ok_or_else(|| not_found(&l.nqn))?;
        if !subsys.listens_on(&via) {
            return Err(no_listener());
        }
    }
    persist::keep_listener(control, &l.nqn, addr, false, SecureChannel::None, None)
        .map_err(persist_err)?;
    if l.nqn == DISCOVERY_NQN {
        target.discovery_services.write().remove(&via);
        target.genctr.fetch_add(1, Ordering::Relaxed);
    } else {
        target.remove_listener(&l.nqn, &via).map_err(|e| match e {
            SubsysError::NoSubsystem(nqn) => not_found(&nqn),
            _ => no_listener(),
        })?;
    }
    tracing::info!(nqn = l.nqn, addr = %via, "listener removed");
    Ok(json!(true))
}

/// An ANA state a path may be set to, named as SPDK names them (any case; nvmet's dashes too).
/// Not `change`: a group may be in it at most ANATT (10 s), after which Linux's host resets the
/// controller, again and again while it stays (SPDK's method refuses it too).
fn ana_state(name: &str) -> Result<AnaState, RpcError> {
    match AnaState::parse(name) {
        Some(AnaState::Change) => Err(invalid_parameters(
            "ana_state \"change\": a path may be changing for at most ANATT (10 s); set the state it \
             changes to",
        )),
        Some(state) => Ok(state),
        None => Err(invalid_parameters(format!(
            "ana_state {:?}: optimized, non_optimized, inaccessible or persistent_loss",
            name.chars().take(32).collect::<String>()
        ))),
    }
}

/// Sets a listener's ANA state for one group or all of them: the hosts connected through it
/// hear of it (an ANA change notice) and move their I/O to the paths that serve it. Where the
/// daemon serves a pool the listener's states are kept there before the change is made (one
/// that cannot be kept is refused, nothing changed), so a restart — kill -9 included — finds
/// them again; the listener removed starts optimized.
fn set_ana_state(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let s: SetAnaState = params(p, G)?;
    check_target(s.tgt_name.as_deref())?;
    let state = ana_state(&s.ana_state)?;
    let addr = listen_addr(&s.listen_address)?;
    let via = ListenAddr::from(addr);
    let _settings = control.settings.lock();
    let target = &control.target;
    let (_before, after) =
        target.ana_preview(&s.nqn, &via, s.anagrpid, state).map_err(subsys_err)?;
    // Kept before it takes effect (hosts never see a change that is then undone), whenever
    // the pool does not hold exactly these states (a change; or states this build did not
    // restore: unreadable, stale, left by another build), so what is set now is what a
    // restart finds; the same states set again write nothing.
    if !persist::ana_kept_as(control, &s.nqn, &addr, after.as_ref()) {
        persist::keep_ana(control, &s.nqn, addr, after.as_ref()).map_err(persist_err)?;
    }
    target.set_ana_state(&s.nqn, &via, s.anagrpid, state).map_err(subsys_err)?;
    let group = s.anagrpid;
    tracing::info!(nqn = s.nqn, addr = %via, ?group, state = state.name(), "ANA state set");
    Ok(json!(true))
}

/// One group's state through one listener (SPDK's `ana_states` entries).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AnaStateEntry {
    pub ana_group: u32,
    pub ana_state: String,
}

/// The states through `via` of `groups` (a subsystem's groups that hold namespaces).
fn ana_states(subsys: &Subsystem, groups: &[u32], via: &ListenAddr) -> Vec<AnaStateEntry> {
    let state = |g| subsys.ana.state(via, g).name().to_string();
    groups.iter().map(|&g| AnaStateEntry { ana_group: g, ana_state: state(g) }).collect()
}

/// One listener of `nvmf_subsystem_get_listeners` (SPDK's shape).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ListenerEntry {
    pub address: ListenEntry,
    /// SPDK's: each group's ANA state through the listener (groups holding namespaces).
    #[serde(default)]
    pub ana_states: Vec<AnaStateEntry>,
    /// SPDK's: whether the listener requires TLS.
    #[serde(default)]
    pub secure_channel: bool,
    /// ballast's: what the listener asks of hosts ("none", "optional", "required").
    #[serde(default)]
    pub secure_channel_mode: SecureChannel,
}

fn get_listeners(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let g: Nqn = params(p, G)?;
    check_target(g.tgt_name.as_deref())?;
    let (addrs, subsys): (Vec<ListenAddr>, _) = if g.nqn == DISCOVERY_NQN {
        (control.target.listeners.read().clone(), None)
    } else {
        let subsys = control.target.subsystem(&g.nqn).ok_or_else(|| not_found(&g.nqn))?;
        let addrs = subsys.listeners.read().iter().cloned().collect();
        (addrs, Some(subsys))
    };
    let groups: Vec<u32> =
        subsys.as_ref().map(|s| s.ana_groups().into_keys().collect()).unwrap_or_default();
    let out: Vec<ListenerEntry> = addrs
        .iter()
        .map(|a| {
            let mode = control.target.secure_channel(a);
            ListenerEntry {
                address: ListenEntry::from(a),
                ana_states: subsys
                    .as_deref()
                    .map(|s| ana_states(s, &groups, a))
                    .unwrap_or_default(),
                secure_channel: mode == SecureChannel::Required,
                secure_channel_mode: mode,
            }
        })
        .collect();
    Ok(json!(out))
}

/// One listen address of `nvmf_get_subsystems`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ListenEntry {
    pub trtype: String,
    pub adrfam: String,
    pub traddr: String,
    pub trsvcid: String,
}

impl From<&ListenAddr> for ListenEntry {
    fn from(a: &ListenAddr) -> ListenEntry {
        ListenEntry {
            trtype: "TCP".into(),
            adrfam: if a.is_ipv6() { "IPv6" } else { "IPv4" }.into(),
            traddr: a.traddr.clone(),
            trsvcid: a.port.to_string(),
        }
    }
}

/// A host allowed on a subsystem.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct HostEntry {
    pub nqn: String,
    /// Keyring names of the host's keys (SPDK's fields; never the keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhchap_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhchap_ctrlr_key: Option<String>,
    /// ballast's: the host is refused until a key it was configured with is available again
    /// (its file could not be read when the keyring was restored).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
}

/// One namespace of `nvmf_get_subsystems`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NamespaceEntry {
    pub nsid: u32,
    /// The registered device's name (SPDK's `bdev_name`; `name` repeats it).
    pub bdev_name: String,
    pub name: String,
    pub nguid: String,
    pub eui64: String,
    pub uuid: String,
    pub block_size: u32,
    /// Its ANA group (SPDK's `anagrpid`).
    #[serde(default)]
    pub anagrpid: u32,
    /// A pool volume's SPDK alias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
}

/// A controller connected to a subsystem.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ControllerEntry {
    pub cntlid: u16,
    pub hostnqn: String,
}

/// One entry of `nvmf_get_subsystems` (SPDK's shape; the discovery subsystem has only the
/// first five fields).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SubsystemEntry {
    pub nqn: String,
    /// "Discovery" or "NVMe".
    pub subtype: String,
    pub listen_addresses: Vec<ListenEntry>,
    pub allow_any_host: bool,
    pub hosts: Vec<HostEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_namespaces: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cntlid: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cntlid: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<NamespaceEntry>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controllers: Option<Vec<ControllerEntry>>,
}

fn get_subsystems(control: &Control, p: &Value) -> Result<Value, RpcError> {
    let g: GetSubsystems = params(p, G)?;
    check_target(g.tgt_name.as_deref())?;
    let only = g.nqn.as_deref();
    let mut out = Vec::new();
    if only.is_none_or(|n| n == DISCOVERY_NQN) {
        // The discovery controller answers on every listener.
        let everywhere = control.target.listeners.read().iter().map(ListenEntry::from).collect();
        out.push(SubsystemEntry {
            nqn: DISCOVERY_NQN.into(),
            subtype: "Discovery".into(),
            listen_addresses: everywhere,
            allow_any_host: true,
            hosts: vec![],
            serial_number: None,
            model_number: None,
            max_namespaces: None,
            min_cntlid: None,
            max_cntlid: None,
            namespaces: None,
            controllers: None,
        });
    }
    let registry = &control.registry;
    for s in control.target.subsystems() {
        if only.is_some_and(|n| n != s.nqn) {
            continue;
        }
        let namespaces = s
            .namespaces()
            .values()
            .map(|ns| {
                let bdev = registry.namespace_device(&s.nqn, ns.nsid).unwrap_or_default();
                let alias = registry.get(&bdev).and_then(|d| registry.alias(&d));
                NamespaceEntry {
                    nsid: ns.nsid,
                    name: bdev.clone(),
                    bdev_name: bdev,
                    nguid: hex(&ns.nguid),
                    eui64: hex(&ns.eui64),
                    uuid: crate::lvstore::format_uuid(&ns.uuid),
                    block_size: 1u32 << ns.lba_shift,
                    anagrpid: ns.anagrpid,
                    alias,
                }
            })
            .collect();
        let listed: Vec<String> = s.hosts.read().iter().cloned().collect();
        let refused = s.refused_hosts.read().clone();
        let host_keys = control.host_keys.read();
        let hosts = listed
            .into_iter()
            .map(|h| {
                let names = host_keys.get(&(s.nqn.clone(), h.clone())).cloned().unwrap_or_default();
                HostEntry {
                    refused: refused.contains(&h),
                    nqn: h,
                    psk: names.psk,
                    dhchap_key: names.dhchap_key,
                    dhchap_ctrlr_key: names.dhchap_ctrlr_key,
                }
            })
            .collect();
        drop(host_keys);
        let controllers = control
            .target
            .controllers_of(&s.nqn)
            .iter()
            .map(|c| ControllerEntry { cntlid: c.cntlid, hostnqn: c.hostnqn.clone() })
            .collect();
        out.push(SubsystemEntry {
            nqn: s.nqn.clone(),
            subtype: "NVMe".into(),
            listen_addresses: s.listeners.read().iter().map(ListenEntry::from).collect(),
            allow_any_host: s.allow_any_host.load(Ordering::Relaxed),
            hosts,
            serial_number: Some(s.serial.clone()),
            model_number: Some(s.model.clone()),
            // SPDK's: the limit set at creation, 0 for none.
            max_namespaces: Some(if s.max_nsid == ballast_nvmf::identify::NN {
                0
            } else {
                s.max_nsid
            }),
            min_cntlid: Some(CNTLID_MIN),
            max_cntlid: Some(CNTLID_MAX),
            namespaces: Some(namespaces),
            controllers: Some(controllers),
        });
    }
    if let Some(nqn) = only.filter(|_| out.is_empty()) {
        // SPDK (rpc_nvmf_get_subsystems): -ENODEV, which callers test for "absent".
        tracing::debug!(nqn, "nvmf_get_subsystems: no such subsystem");
        return Err(no_such_device());
    }
    Ok(json!(out))
}
