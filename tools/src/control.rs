//! The daemon's shared state, as every control method and the metrics see it.
//!
//! Leaf of the control plane: it depends on the registry and the engine, never on a method
//! module, so method modules (`rpc_*`, `volumes`, `metrics`) can all depend on it without a
//! cycle, and `rpc` only dispatches to them. Invariants:
//! - `registry` is the one place devices are named; `target` is changed only through the
//!   registry where a namespace is concerned (so every namespace names its device);
//! - `pool`, when present, is the pool the registry's volumes belong to.

use std::sync::Arc;
use std::time::Instant;

use ballast_engine::limits::Admission;
use ballast_engine::reactor::CoreHandle;
use ballast_engine::volume::dev::PoolHandle;

use crate::registry::Registry;

pub struct Control {
    /// Every device served, by name and UUID, and what references it.
    pub registry: Arc<Registry>,
    pub target: Arc<ballast_nvmf::Target>,
    pub cores: Arc<Vec<CoreHandle>>,
    /// The pool whose volumes are exported, if the daemon serves one.
    pub pool: Option<Arc<PoolHandle>>,
    /// Hosts allowed on subsystems created for new volumes (empty: any host).
    pub allow_hosts: Vec<String>,
    /// Connection limits and what they did.
    pub admission: Arc<Admission>,
    /// Payload memory of all cores together (each core has its share).
    pub buffer_memory: u64,
    /// When the daemon started serving (`bdev_get_iostat`'s `ticks`).
    pub started: Instant,
    /// Named secrets (TLS PSKs, DH-HMAC-CHAP secrets) added through `keyring_file_add_key`.
    pub keyring: crate::keyring::Keyring,
    /// (subsystem NQN, host NQN) → the keyring names its keys came from, for
    /// `nvmf_get_subsystems` and the pool's copy of the configuration (the keys themselves
    /// live in the target).
    pub host_keys: parking_lot::RwLock<std::collections::BTreeMap<(String, String), HostKeyNames>>,
    /// Hosts one subsystem may list at most (`--max-hosts-per-subsystem`).
    pub max_hosts: usize,
    /// Held by every method that changes what the pool keeps of the NVMe-oF settings or the
    /// keyring (`persist`), for its whole run: the pool keeps changes in the order they take
    /// effect, and a subsystem never gets two anchors.
    pub settings: parking_lot::Mutex<()>,
    /// SPDK's `MallocN` counter: the number the next `bdev_malloc_create` without a name takes
    /// (only those advance it; a taken name is -17, as SPDK's).
    pub malloc_names: std::sync::atomic::AtomicU32,
    /// The log's level and debug flags (`log_set_level`, `log_set_flag`).
    pub log: crate::logging::LogControl,
    /// `--default-export`: a volume it names is not renamed (the next start would find no
    /// export of that name and stop).
    pub default_export: Option<String>,
}

/// What `nvmf_subsystem_add_host` was given for one host of one subsystem besides its NQN: the
/// keyring names of its keys and its DH-HMAC-CHAP choices (never a key). Kept in the pool as
/// is (`pool_config`), so its fields refuse unknown ones and default to absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostKeyNames {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhchap_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhchap_ctrlr_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhchap_digests: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhchap_dhgroups: Option<Vec<String>>,
}

impl HostKeyNames {
    /// The keyring names this host's keys come from.
    pub fn key_names(&self) -> impl Iterator<Item = &str> {
        [&self.psk, &self.dhchap_key, &self.dhchap_ctrlr_key]
            .into_iter()
            .flatten()
            .map(|s| s.as_str())
    }
}

/// One control method: its name and its handler, in the module that owns it.
pub struct Method {
    pub name: &'static str,
    pub call:
        fn(&Control, &serde_json::Value) -> Result<serde_json::Value, crate::rpc_error::RpcError>,
}
