//! The device registry: every device the daemon serves (pool volumes, RAM and file exports), by
//! name and by UUID, and which front-end references each one.
//!
//! NBD and NVMe/TCP keep their own tables (the handshake reads `ExportTable`, controllers read
//! `Subsystem::namespaces`); this module is the only code that changes them, so both always
//! name devices that are (or were) here. Every lookup by name, SPDK alias (`LVS/LVOL`) or UUID
//! is [`Registry::resolve`]; nothing finds a device's name by comparing device pointers.
//!
//! Invariants:
//! - a name and a UUID each name at most one device; `by_uuid` maps exactly the UUIDs of
//!   `devices`;
//! - every registered device is the NBD export of its name (added and removed together);
//! - every namespace this daemon created has one entry in `namespaces` naming the device it was
//!   created with; the entry goes when the namespace or its subsystem does (the control plane
//!   removes a device's namespaces before the device: `rpc_export`).
//!
//! Depends on no method module and on nothing of the control plane but [`crate::lvstore`].

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ballast_engine::file::FileDev;
use ballast_engine::qos::{Qos, Throttled};
use ballast_engine::ram::RamDev;
use ballast_engine::size::parse_size;
use ballast_engine::volume::dev::{namespace_sibling, PoolHandle, PoolLock};
use ballast_engine::BlockDev;
use ballast_nbd::{Export, ExportError, ExportTable};
use ballast_nvmf::subsys::SubsysError;
use ballast_nvmf::Target;
use parking_lot::RwLock;

use crate::lvstore;

/// What a device is, for listings and SPDK's `product_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A volume of the daemon's pool (its UUID is kept in the pool).
    Volume,
    /// Memory (`ram:SIZE`); its UUID is fresh at every start.
    Ram,
    /// A file or block device (`file:PATH`); its UUID comes from its name and path.
    File,
    /// An NVMe namespace through io_uring passthrough (`nvme:/dev/ngXnY`); its UUID comes from
    /// its name and path.
    Nvme,
}

/// One registered device.
pub struct Device {
    pub name: String,
    /// Canonical form (lowercase, dashes).
    pub uuid: String,
    pub kind: DeviceKind,
    /// Free text shown by `nbdinfo --list`.
    pub description: String,
    pub read_only: bool,
    pub dev: Arc<dyn BlockDev>,
    /// This device's counters in the cores' statistics (`dev.info().stats_id`).
    pub stats_id: u32,
    /// The block size it was created with as an SPDK bdev (`bdev_malloc_create` and the
    /// like): what `bdev_get_bdevs` reports and the LBA size its namespaces get by default.
    pub block_size: Option<u32>,
    /// A file or device export's shared hold on its media (a pool's holder has it
    /// exclusively): while exported it is served as no pool, here or by another daemon.
    pub hold: Option<PoolLock>,
    /// Its rate limits (`bdev_set_qos_limit`): `dev` waits for them.
    pub qos: Arc<Qos>,
}

impl Device {
    pub fn new(
        name: &str,
        uuid: String,
        kind: DeviceKind,
        description: String,
        dev: Arc<dyn BlockDev>,
        read_only: bool,
    ) -> Device {
        let stats_id = dev.info().stats_id;
        // Every export is served through its limits (none until set: one atomic read per I/O).
        let qos = Arc::new(Qos::default());
        let dev: Arc<dyn BlockDev> = Arc::new(Throttled::new(dev, Arc::clone(&qos)));
        Device {
            name: name.to_string(),
            uuid,
            kind,
            description,
            read_only,
            dev,
            stats_id,
            block_size: None,
            hold: None,
            qos,
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.dev.size_bytes()
    }
}

/// Why the registry refused a change.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("export {0:?} already exists")]
    Exists(String),
    #[error("no export named {0:?}")]
    NotFound(String),
    #[error("{0:?} is not a pool volume")]
    NotAVolume(String),
    #[error("UUID {uuid} of {name:?} is already taken")]
    UuidTaken { name: String, uuid: String },
    #[error("{name:?}: block size {block_size} is below the device's logical block size {min}")]
    BlockSize { name: String, block_size: u32, min: u32 },
    #[error(
        "{name:?}: {max} exports (RAM, file, nvme) already, the most there may be (--max-exports)"
    )]
    TooManyExports { name: String, max: usize },
    #[error(
        "{name:?}: {want} bytes of RAM export on top of {used} would exceed --ram-export-memory \
         ({max} bytes)"
    )]
    RamBudget { name: String, want: u64, used: u64, max: u64 },
    #[error(transparent)]
    Nbd(#[from] ExportError),
    #[error(transparent)]
    Nvmf(#[from] SubsysError),
}

#[derive(Default)]
struct Inner {
    devices: BTreeMap<String, Arc<Device>>,
    /// UUID → name.
    by_uuid: HashMap<String, String>,
    /// (subsystem NQN, NSID) → the name of the device the namespace was created with.
    namespaces: BTreeMap<(String, u32), String>,
}

impl Inner {
    /// The device whose UUID is `uuid` in any spelling.
    fn with_uuid(&self, uuid: &str) -> Option<Arc<Device>> {
        let uuid = lvstore::canonical_uuid(uuid)?;
        self.by_uuid.get(&uuid).and_then(|name| self.devices.get(name)).cloned()
    }

    fn room_for(
        &self,
        limits: &RegistryLimits,
        kind: DeviceKind,
        name: &str,
        ram: u64,
    ) -> Result<(), RegistryError> {
        if kind == DeviceKind::Volume {
            return Ok(());
        }
        let exports = self.devices.values().filter(|d| d.kind != DeviceKind::Volume);
        if exports.count() >= limits.max_exports {
            return Err(RegistryError::TooManyExports {
                name: name.into(),
                max: limits.max_exports,
            });
        }
        let used: u64 = self
            .devices
            .values()
            .filter(|d| d.kind == DeviceKind::Ram)
            .map(|d| d.size_bytes())
            .sum();
        if used.saturating_add(ram) > limits.ram_bytes {
            let max = limits.ram_bytes;
            return Err(RegistryError::RamBudget { name: name.into(), want: ram, used, max });
        }
        Ok(())
    }
}

pub struct Registry {
    inner: RwLock<Inner>,
    nbd: Arc<ExportTable>,
    target: Arc<Target>,
    pool: Option<Arc<PoolHandle>>,
    limits: RegistryLimits,
}

/// What exports may hold (pool volumes are the pool's to bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryLimits {
    /// RAM, file and nvme exports at once (`--max-exports`).
    pub max_exports: usize,
    /// Bytes all RAM exports may hold together (`--ram-export-memory`): their memory is taken
    /// as clients write, so the total of their sizes is what they may come to.
    pub ram_bytes: u64,
}

impl Default for RegistryLimits {
    /// 4096 exports; RAM exports up to the machine's memory.
    fn default() -> Self {
        RegistryLimits { max_exports: 4096, ram_bytes: physical_memory() }
    }
}

/// The machine's memory in bytes (`_SC_PHYS_PAGES` × page size), or no bound where unknown.
pub fn physical_memory() -> u64 {
    let pages = nix::unistd::sysconf(nix::unistd::SysconfVar::_PHYS_PAGES).ok().flatten();
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten();
    match (pages, page) {
        (Some(n), Some(p)) if n > 0 && p > 0 => (n as u64).saturating_mul(p as u64),
        _ => u64::MAX,
    }
}

impl Registry {
    /// With the default limits (tests).
    #[cfg(test)]
    pub fn new(target: Arc<Target>, pool: Option<Arc<PoolHandle>>) -> Registry {
        Registry::with_limits(target, pool, RegistryLimits::default())
    }

    pub fn with_limits(
        target: Arc<Target>,
        pool: Option<Arc<PoolHandle>>,
        limits: RegistryLimits,
    ) -> Registry {
        let nbd = Arc::new(ExportTable::default());
        Registry { inner: RwLock::default(), nbd, target, pool, limits }
    }

    /// Whether one more export of `kind`, holding `ram` bytes of RAM, fits the limits.
    pub fn room_for(&self, kind: DeviceKind, name: &str, ram: u64) -> Result<(), RegistryError> {
        self.inner.read().room_for(&self.limits, kind, name, ram)
    }

    /// NBD's view of the registry (for its handshake).
    pub fn nbd_exports(&self) -> Arc<ExportTable> {
        self.nbd.clone()
    }

    /// Registers `device` and exports it over NBD under its name.
    pub fn add(&self, device: Device) -> Result<Arc<Device>, RegistryError> {
        let mut inner = self.inner.write();
        if inner.devices.contains_key(&device.name) {
            return Err(RegistryError::Exists(device.name));
        }
        let ram = if device.kind == DeviceKind::Ram { device.size_bytes() } else { 0 };
        inner.room_for(&self.limits, device.kind, &device.name, ram)?;
        if inner.by_uuid.contains_key(&device.uuid) {
            return Err(RegistryError::UuidTaken { name: device.name, uuid: device.uuid });
        }
        self.nbd.add(Export {
            name: device.name.clone(),
            description: device.description.clone(),
            dev: device.dev.clone(),
            read_only: device.read_only,
        })?;
        let device = Arc::new(device);
        inner.by_uuid.insert(device.uuid.clone(), device.name.clone());
        inner.devices.insert(device.name.clone(), device.clone());
        assert_eq!(inner.by_uuid.len(), inner.devices.len());
        Ok(device)
    }

    /// Unregisters device `name` and ends its NBD export (open connections and NVMe namespaces
    /// keep the device until they end).
    pub fn remove(&self, name: &str) -> Result<Arc<Device>, RegistryError> {
        let mut inner = self.inner.write();
        let device =
            inner.devices.remove(name).ok_or_else(|| RegistryError::NotFound(name.into()))?;
        inner.by_uuid.remove(&device.uuid);
        assert_eq!(inner.by_uuid.len(), inner.devices.len());
        // Registered devices are always exported; a missing export is not worth failing over.
        let _ = self.nbd.remove(name);
        Ok(device)
    }

    /// Registers pool volume `old` as `new` (it was renamed; or, `old` itself, to give it a new
    /// description): the same device, UUID, limits and counters under the new name, its NBD
    /// export (served for the empty name if the old one was) and the namespaces made from it
    /// following. Open NBD connections and NVMe namespaces keep serving it.
    pub fn rename(&self, old: &str, new: &str, description: String) -> Result<(), RegistryError> {
        let mut inner = self.inner.write();
        if old != new && inner.devices.contains_key(new) {
            return Err(RegistryError::Exists(new.into()));
        }
        let d = inner.devices.get(old).ok_or_else(|| RegistryError::NotFound(old.into()))?;
        if d.kind != DeviceKind::Volume || d.hold.is_some() {
            return Err(RegistryError::NotAVolume(old.into()));
        }
        let device = Device {
            name: new.into(),
            uuid: d.uuid.clone(),
            kind: d.kind,
            description,
            read_only: d.read_only,
            dev: d.dev.clone(),
            stats_id: d.stats_id,
            block_size: d.block_size,
            hold: None,
            qos: d.qos.clone(),
        };
        let export = Export {
            name: new.into(),
            description: device.description.clone(),
            dev: device.dev.clone(),
            read_only: device.read_only,
        };
        if old == new {
            self.nbd.replace(export)?;
        } else {
            self.nbd.add(export)?;
            if self.nbd.default_name().as_deref() == Some(old) {
                self.nbd.set_default(new)?;
            }
            let _ = self.nbd.remove(old);
        }
        inner.devices.remove(old);
        inner.by_uuid.insert(device.uuid.clone(), new.into());
        inner.devices.insert(new.into(), Arc::new(device));
        for n in inner.namespaces.values_mut().filter(|n| *n == old) {
            *n = new.into();
        }
        assert_eq!(inner.by_uuid.len(), inner.devices.len());
        Ok(())
    }

    /// The device registered under exactly `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Device>> {
        self.inner.read().devices.get(name).cloned()
    }

    /// The device `s` names: its name, else (for a pool volume) its SPDK alias `LVS/LVOL`,
    /// else its UUID in any spelling.
    pub fn resolve(&self, s: &str) -> Option<Arc<Device>> {
        if s.is_empty() {
            return None;
        }
        let inner = self.inner.read();
        if let Some(d) = inner.devices.get(s) {
            return Some(d.clone());
        }
        if let (Some((lvs, lvol)), Some(pool)) = (s.split_once('/'), &self.pool) {
            let volume = inner.devices.get(lvol).filter(|d| d.kind == DeviceKind::Volume);
            if volume.is_some() && lvs == lvstore::lvs_name(pool) {
                return volume.cloned();
            }
            return None;
        }
        inner.with_uuid(s)
    }

    /// The device whose UUID is `uuid` (in any spelling), whatever its name.
    pub fn by_uuid(&self, uuid: &str) -> Option<Arc<Device>> {
        self.inner.read().with_uuid(uuid)
    }

    /// The pool volume `s` names (by name, alias or UUID).
    pub fn resolve_volume(&self, s: &str) -> Option<Arc<Device>> {
        self.resolve(s).filter(|d| d.kind == DeviceKind::Volume)
    }

    /// SPDK's alias of a pool volume (`LVS/LVOL`); other devices have none.
    pub fn alias(&self, device: &Device) -> Option<String> {
        let pool = self.pool.as_ref().filter(|_| device.kind == DeviceKind::Volume)?;
        Some(lvstore::alias(pool, &device.name))
    }

    /// Every device, by name.
    pub fn list(&self) -> Vec<Arc<Device>> {
        self.inner.read().devices.values().cloned().collect()
    }

    /// The NBD export served for the empty name.
    pub fn default_name(&self) -> Option<String> {
        self.nbd.default_name()
    }

    pub fn set_default(&self, name: &str) -> Result<(), RegistryError> {
        Ok(self.nbd.set_default(name)?)
    }

    /// Adds device `name` to subsystem `nqn` as namespace `nsid` (0: the lowest free one).
    pub fn add_namespace(
        &self,
        nqn: &str,
        nsid: u32,
        anagrpid: Option<u32>,
        name: &str,
        block_size: u32,
    ) -> Result<u32, RegistryError> {
        let device = self.get(name).ok_or_else(|| RegistryError::NotFound(name.into()))?;
        let dev = device.dev.clone();
        let nsid =
            self.target.add_namespace_in(nqn, nsid, anagrpid, dev, block_size, &device.uuid)?;
        assert!(nsid != 0);
        self.inner.write().namespaces.insert((nqn.to_string(), nsid), name.to_string());
        Ok(nsid)
    }

    pub fn remove_namespace(&self, nqn: &str, nsid: u32) -> Result<(), RegistryError> {
        self.target.remove_namespace(nqn, nsid)?;
        self.inner.write().namespaces.remove(&(nqn.to_string(), nsid));
        Ok(())
    }

    pub fn delete_subsystem(&self, nqn: &str) -> Result<(), RegistryError> {
        self.target.delete_subsystem(nqn)?;
        self.inner.write().namespaces.retain(|(n, _), _| n != nqn);
        Ok(())
    }

    /// The name of the device namespace `nsid` of `nqn` was created with.
    pub fn namespace_device(&self, nqn: &str, nsid: u32) -> Option<String> {
        self.inner.read().namespaces.get(&(nqn.to_string(), nsid)).cloned()
    }

    /// Every namespace (NQN, NSID) created with device `name`.
    pub fn namespaces_of(&self, name: &str) -> Vec<(String, u32)> {
        let inner = self.inner.read();
        inner.namespaces.iter().filter(|(_, n)| *n == name).map(|(k, _)| k.clone()).collect()
    }

    /// Tells the NVMe hosts of every namespace of device `name` that it changed (its size).
    pub fn namespaces_changed(&self, name: &str) {
        for (nqn, nsid) in self.namespaces_of(name) {
            if let Some(subsys) = self.target.subsystem(&nqn) {
                self.target.namespace_changed(&subsys, nsid);
            }
        }
    }
}

/// What a device is made from: `--export`'s and `export_add`'s `ram:SIZE`, `file:PATH[:SIZE]`,
/// `nvme:/dev/ngXnY`, or SPDK's bdev creation methods' parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Ram(u64),
    /// A file (created at `size` if given and absent) or block device.
    File {
        path: PathBuf,
        size: Option<u64>,
    },
    Nvme(PathBuf),
}

impl Backend {
    pub fn parse(spec: &str) -> anyhow::Result<Backend> {
        if let Some(size) = spec.strip_prefix("ram:") {
            let bytes = parse_size(size)?;
            if bytes == 0 {
                bail!("ram export of size 0");
            }
            return Ok(Backend::Ram(bytes));
        }
        if let Some(rest) = spec.strip_prefix("file:") {
            let (path, size) = file_spec(rest);
            return Ok(Backend::File { path: path.into(), size });
        }
        if let Some(path) = spec.strip_prefix("nvme:") {
            return Ok(Backend::Nvme(path.into()));
        }
        bail!("unknown backend {spec:?}: expected ram:SIZE, file:PATH[:SIZE] or nvme:/dev/ngXnY")
    }

    pub fn kind(&self) -> DeviceKind {
        match self {
            Backend::Ram(_) => DeviceKind::Ram,
            Backend::File { .. } => DeviceKind::File,
            Backend::Nvme(_) => DeviceKind::Nvme,
        }
    }

    /// Opens the backend (a RAM device reserves its address space and chunk tables here).
    pub fn open(&self, read_only: bool) -> anyhow::Result<Arc<dyn BlockDev>> {
        Ok(match self {
            Backend::Ram(bytes) => {
                Arc::new(RamDev::try_new(*bytes, read_only).with_context(|| {
                    format!("reserving {bytes} bytes of memory for a ram export")
                })?)
            }
            Backend::File { path, size } => Arc::new(FileDev::open(path, *size, read_only)?),
            Backend::Nvme(path) => Arc::new(ballast_engine::nvme::NvmeDev::open(path, read_only)?),
        })
    }

    /// The file or device it opens, as given (none for RAM).
    fn media_path(&self) -> Option<&std::path::Path> {
        match self {
            Backend::Ram(_) => None,
            Backend::File { path, .. } | Backend::Nvme(path) => Some(path),
        }
    }

    /// The file or device behind it: a regular file by its canonical path (one file, however
    /// spelled); a device node as given (`/dev/disk/by-id/...` names the disk, the `/dev/sdX`
    /// or `/dev/ngXnY` it resolves to only its place in this boot's enumeration).
    fn path(&self) -> Option<PathBuf> {
        let path = self.media_path()?;
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => Some(std::fs::canonicalize(path).unwrap_or(path.into())),
            _ => Some(path.into()),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Ram(bytes) => write!(f, "ram:{bytes}"),
            Backend::File { path, size: None } => write!(f, "file:{}", path.display()),
            Backend::File { path, size: Some(s) } => write!(f, "file:{}:{s}", path.display()),
            Backend::Nvme(path) => write!(f, "nvme:{}", path.display()),
        }
    }
}

/// A `file:` spec's `PATH[:SIZE]`: a trailing ":SIZE" is a size only if it parses as one.
fn file_spec(rest: &str) -> (&str, Option<u64>) {
    match rest.rsplit_once(':').map(|(p, s)| (p, parse_size(s))) {
        Some((path, Ok(size))) => (path, Some(size)),
        _ => (rest, None),
    }
}

/// A UUID that only `name` and `path` decide (SHA-256 of them, laid out as a version 5 UUID).
fn stable_uuid(name: &str, path: std::path::PathBuf) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"ballast export\0");
    h.update(name.as_bytes());
    h.update(b"\0");
    h.update(path.as_os_str().as_encoded_bytes());
    lvstore::uuid_of(h.finalize()[..16].try_into().expect("16 of 32 bytes"), 5)
}

/// Registers a RAM, file or nvme export (`spec` as [`Backend::parse`] takes it).
pub fn add_export(
    registry: &Registry,
    name: &str,
    spec: &str,
    read_only: bool,
    description: String,
) -> anyhow::Result<Arc<Device>> {
    let backend = Backend::parse(spec)?;
    add_bdev(registry, name, &backend, read_only, description, BdevShape::default())
}

/// What an SPDK bdev creation method gives beyond the backend: a block size, a UUID.
#[derive(Debug, Default, Clone)]
pub struct BdevShape {
    pub block_size: Option<u32>,
    /// Canonical (lowercase, dashes).
    pub uuid: Option<String>,
}

/// [`add_export`] from a parsed backend, with an SPDK bdev's block size (at least the device's
/// smallest) and UUID where given. The limits are checked before the backend opens (a RAM
/// device's tables are allocated then) and again as it registers.
pub fn add_bdev(
    registry: &Registry,
    name: &str,
    backend: &Backend,
    read_only: bool,
    description: String,
    shape: BdevShape,
) -> anyhow::Result<Arc<Device>> {
    if registry.get(name).is_some() {
        return Err(RegistryError::Exists(name.to_string()).into());
    }
    registry.room_for(backend.kind(), name, backend_ram(backend))?;
    // Not a pool being served (this daemon's or another's): its raw blocks would give a
    // client every volume's data, and writes the pool does not know of.
    if let (Some(pool), Some(path)) = (&registry.pool, backend.media_path()) {
        if same_media(pool.path(), path) {
            bail!("{name:?}: {backend} is this daemon's pool: its volumes are exported by name");
        }
    }
    let hold_now = |path: &std::path::Path| PoolLock::take(path, false, Duration::ZERO);
    let existing = backend.media_path().filter(|p| p.exists());
    let mut hold = existing.map(hold_now).transpose().context("exporting it")?;
    let dev = backend.open(read_only)?;
    if hold.is_none() {
        // Created just now by the open.
        hold = backend.media_path().map(hold_now).transpose().context("exporting it")?;
    }
    if let Some(b) = shape.block_size {
        let min = dev.info().min_block;
        if b < min {
            return Err(RegistryError::BlockSize { name: name.into(), block_size: b, min }.into());
        }
    }
    let uuid = match (shape.uuid, backend.path()) {
        (Some(uuid), _) => uuid,
        // Its data outlives the daemon: the same name on the same file is the same device
        // after a restart (its namespaces keep their identifiers).
        (None, Some(path)) => stable_uuid(name, path),
        // A RAM export's data does not: each is a new device.
        (None, None) => lvstore::random_uuid()?,
    };
    let mut device = Device::new(name, uuid, backend.kind(), description, dev, read_only);
    device.block_size = shape.block_size;
    device.hold = hold;
    Ok(registry.add(device)?)
}

/// Whether `a` and `b` name the same file (any link to it) or the same device (any node of
/// it, and a namespace's `/dev/ngXnY` and `/dev/nvmeXnY` alike).
fn same_media(a: &std::path::Path, b: &std::path::Path) -> bool {
    let sibling = namespace_sibling(a);
    if sibling.is_some_and(|s| same_media_node(&s, b)) {
        return true;
    }
    same_media_node(a, b)
}

/// Whether `a` and `b` are links to one file or nodes of one device of one kind.
fn same_media_node(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let (Ok(a), Ok(b)) = (std::fs::metadata(a), std::fs::metadata(b)) else { return false };
    let device =
        |m: &std::fs::Metadata| m.file_type().is_block_device() || m.file_type().is_char_device();
    if device(&a) && device(&b) {
        a.rdev() == b.rdev() && a.file_type().is_block_device() == b.file_type().is_block_device()
    } else {
        (a.dev(), a.ino()) == (b.dev(), b.ino())
    }
}

fn backend_ram(backend: &Backend) -> u64 {
    match backend {
        Backend::Ram(bytes) => *bytes,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(registry: &Registry, name: &str) -> Arc<Device> {
        add_export(registry, name, "ram:1M", false, String::new()).unwrap()
    }

    /// A file export is the same device after a restart (its namespaces keep their ids): its
    /// UUID comes from its name and file; a RAM export's data is new each time, and so is it.
    #[test]
    fn a_file_exports_uuid_outlives_the_daemon_a_ram_exports_does_not() {
        let dir = std::env::temp_dir().join(format!("ballast-uuid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.img");
        let spec = format!("file:{}:1M", path.display());
        let uuid = |name: &str, spec: &str| {
            let r = Registry::new(Arc::new(Target::default()), None);
            add_export(&r, name, spec, false, String::new()).unwrap().uuid.clone()
        };
        let first = uuid("f", &spec);
        assert_eq!(uuid("f", &spec), first, "same name, same file: same device");
        // The same file by another path spelling is the same file.
        let other = format!("file:{}/./f.img:1M", dir.display());
        assert_eq!(uuid("f", &other), first);
        assert_ne!(uuid("g", &spec), first, "another name: another device");
        assert!(lvstore::canonical_uuid(&first).is_some());
        assert_ne!(uuid("r", "ram:1M"), uuid("r", "ram:1M"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn devices_are_found_by_name_and_uuid_and_exported_over_nbd() {
        let r = Registry::new(Arc::new(Target::default()), None);
        let a = ram(&r, "a");
        let b = ram(&r, "b");
        assert_ne!(a.uuid, b.uuid);
        assert_eq!(r.resolve("a").unwrap().name, "a");
        assert_eq!(r.resolve(&a.uuid.to_uppercase()).unwrap().name, "a");
        assert_eq!(r.resolve(&b.uuid.replace('-', "")).unwrap().name, "b");
        assert!(r.resolve("").is_none());
        assert!(r.resolve("lvs0/a").is_none(), "no pool, no aliases");
        assert!(r.resolve_volume("a").is_none(), "a RAM export is not a volume");
        assert_eq!(r.nbd_exports().list().len(), 2);
        assert_eq!(r.default_name().as_deref(), Some("a"));
        assert!(add_export(&r, "a", "ram:1M", false, String::new()).is_err());
        r.remove("a").unwrap();
        assert!(r.resolve(&a.uuid).is_none());
        assert!(r.nbd_exports().get("a").is_none());
        assert!(matches!(r.remove("a"), Err(RegistryError::NotFound(_))));
    }

    /// Exports are bounded in number and RAM exports in their total size; volumes are the
    /// pool's to bound. Refused before the backend opens, and nothing is left behind.
    #[test]
    fn exports_are_bounded_in_number_and_ram() {
        let limits = RegistryLimits { max_exports: 2, ram_bytes: 3 << 20 };
        let r = Registry::with_limits(Arc::new(Target::default()), None, limits);
        add_export(&r, "a", "ram:2M", false, String::new()).unwrap();
        let e = add_export(&r, "b", "ram:2M", false, String::new()).err().expect("over the RAM");
        assert!(
            matches!(
                e.downcast_ref(),
                Some(RegistryError::RamBudget {
                    want: 0x20_0000,
                    used: 0x20_0000,
                    max: 0x30_0000,
                    ..
                })
            ),
            "{e:#}"
        );
        assert!(e.to_string().contains("--ram-export-memory"), "{e}");
        add_export(&r, "b", "ram:1M", false, String::new()).unwrap();
        let e = add_export(&r, "c", "ram:4096", false, String::new()).err().expect("a third");
        assert!(matches!(e.downcast_ref(), Some(RegistryError::TooManyExports { max: 2, .. })));
        assert!(e.to_string().contains("--max-exports"), "{e}");
        assert!(r.get("c").is_none() && r.nbd_exports().list().len() == 2);
        r.remove("a").unwrap();
        add_export(&r, "c", "ram:2M", false, String::new()).unwrap();
    }

    /// A path from SPDK's bdev methods is taken as given: a trailing ":0" is part of the name
    /// (a `file:` spec would read it as a size and create the shorter name).
    #[test]
    fn bdev_paths_are_not_specs() {
        let dir = std::env::temp_dir().join(format!("ballast-bdev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("scsi-0:0:0:0");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        assert_eq!(
            Backend::parse(&format!("file:{}", path.display())).unwrap(),
            Backend::File { path: dir.join("scsi-0:0:0"), size: Some(0) },
            "what the spec form would have opened"
        );
        let r = Registry::new(Arc::new(Target::default()), None);
        let backend = Backend::File { path: path.clone(), size: None };
        let shape = BdevShape { block_size: Some(4096), uuid: None };
        let d = add_bdev(&r, "f", &backend, false, String::new(), shape).unwrap();
        assert_eq!((d.size_bytes(), d.block_size), (1 << 20, Some(4096)));
        assert!(!dir.join("scsi-0:0:0").exists(), "no stray file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn namespaces_name_their_device() {
        let target = Arc::new(Target::default());
        let r = Registry::new(target.clone(), None);
        ram(&r, "a");
        let nqn = format!("{}a", ballast_nvmf::NQN_PREFIX);
        target.create_subsystem(&nqn, true).unwrap();
        assert!(matches!(
            r.add_namespace(&nqn, 1, None, "zz", 4096),
            Err(RegistryError::NotFound(_))
        ));
        let nsid = r.add_namespace(&nqn, 0, None, "a", 4096).unwrap();
        assert_eq!(r.namespace_device(&nqn, nsid).as_deref(), Some("a"));
        assert_eq!(r.namespaces_of("a"), vec![(nqn.clone(), nsid)]);
        r.delete_subsystem(&nqn).unwrap();
        assert!(r.namespaces_of("a").is_empty());
    }
}
