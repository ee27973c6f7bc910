//! Subsystems, namespaces, host access lists and the controller registry, shared by every
//! queue on every core and by the control plane. Touched on connect, admin commands and
//! control requests only, never per I/O.
//!
//! Identities (serial, NGUID, EUI-64, UUID) are derived from the subsystem NQN and namespace
//! id, so they are stable across restarts without storing anything.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ballast_engine::BlockDev;
use parking_lot::{Mutex, RwLock};

pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
pub const NQN_PREFIX: &str = "nqn.2026-11.dev.ballast:";
/// Longest NQN (Base spec: 223 bytes).
pub const NQN_MAX: usize = 223;

#[derive(Debug, thiserror::Error)]
pub enum SubsysError {
    #[error("subsystem {0:?} already exists")]
    Exists(String),
    #[error("no subsystem {0:?}")]
    NoSubsystem(String),
    #[error("invalid NQN {0:?}: must start with \"nqn.\" and be at most 223 bytes")]
    BadNqn(String),
    #[error("namespace id {0} is in use")]
    NsidInUse(u32),
    #[error("no namespace {0}")]
    NoNamespace(u32),
    #[error("block size {0} not supported (512 or 4096)")]
    BlockSize(u32),
}

/// A 64-bit FNV-1a hash, for deriving stable identifiers.
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

pub struct Namespace {
    pub nsid: u32,
    pub dev: Arc<dyn BlockDev>,
    /// log2 of the LBA size (9 or 12).
    pub lba_shift: u32,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    pub uuid: [u8; 16],
}

impl Namespace {
    pub fn blocks(&self) -> u64 {
        self.dev.size_bytes() >> self.lba_shift
    }
}

pub struct Subsystem {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub allow_any_host: AtomicBool,
    pub hosts: RwLock<BTreeSet<String>>,
    pub namespaces: RwLock<BTreeMap<u32, Arc<Namespace>>>,
}

impl Subsystem {
    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.allow_any_host.load(Ordering::Relaxed) || self.hosts.read().contains(hostnqn)
    }

    pub fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        self.namespaces.read().get(&nsid).cloned()
    }
}

/// What every queue of a controller shares: identity, negotiated settings, liveness.
pub struct Controller {
    pub cntlid: u16,
    /// `None` for a discovery controller.
    pub subsys: Option<Arc<Subsystem>>,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub kato_ms: AtomicU32,
    /// Milliseconds since `Target::epoch` of the last command on the admin queue.
    pub last_seen_ms: AtomicU64,
    pub dead: AtomicBool,
    /// CC.EN, as set on the admin queue; I/O queues may connect only while it is set.
    pub enabled: AtomicBool,
    /// I/O queue ids connected now.
    pub io_qids: Mutex<BTreeSet<u16>>,
    /// I/O queues granted by Set Features (Number of Queues), 0's based.
    pub io_queues_granted: AtomicU32,
    /// Namespaces changed since the host last read the Changed Namespace List.
    pub changed_ns: Mutex<BTreeSet<u32>>,
    /// A namespace-attribute notice is waiting for an AER.
    pub aen_pending: AtomicBool,
    pub data_units_read: AtomicU64,
    pub data_units_written: AtomicU64,
    pub host_reads: AtomicU64,
    pub host_writes: AtomicU64,
}

pub struct Target {
    pub epoch: Instant,
    subsystems: RwLock<BTreeMap<String, Arc<Subsystem>>>,
    controllers: Mutex<HashMap<u16, Arc<Controller>>>,
    next_cntlid: AtomicU32,
    /// Discovery log generation counter: bumped on every change a host could see.
    pub genctr: AtomicU64,
    /// Where we listen, for discovery log entries: (address, port).
    pub listeners: RwLock<Vec<(String, u16)>>,
}

impl Default for Target {
    fn default() -> Self {
        Target {
            epoch: Instant::now(),
            subsystems: RwLock::default(),
            controllers: Mutex::default(),
            next_cntlid: AtomicU32::new(1),
            genctr: AtomicU64::new(1),
            listeners: RwLock::default(),
        }
    }
}

impl Target {
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn create_subsystem(
        &self,
        nqn: &str,
        allow_any_host: bool,
    ) -> Result<Arc<Subsystem>, SubsysError> {
        if !nqn.starts_with("nqn.") || nqn.len() > NQN_MAX || nqn == DISCOVERY_NQN {
            return Err(SubsysError::BadNqn(nqn.into()));
        }
        let mut map = self.subsystems.write();
        if map.contains_key(nqn) {
            return Err(SubsysError::Exists(nqn.into()));
        }
        let serial = format!("{:016x}", fnv(&[nqn.as_bytes()]))[..16].to_string();
        let subsys = Arc::new(Subsystem {
            nqn: nqn.into(),
            serial,
            model: "ballast".into(),
            allow_any_host: AtomicBool::new(allow_any_host),
            hosts: RwLock::default(),
            namespaces: RwLock::default(),
        });
        map.insert(nqn.into(), subsys.clone());
        self.genctr.fetch_add(1, Ordering::Relaxed);
        Ok(subsys)
    }

    pub fn delete_subsystem(&self, nqn: &str) -> Result<(), SubsysError> {
        self.subsystems.write().remove(nqn).ok_or_else(|| SubsysError::NoSubsystem(nqn.into()))?;
        for c in self.controllers.lock().values() {
            if c.subsys.as_ref().is_some_and(|s| s.nqn == nqn) {
                c.dead.store(true, Ordering::Relaxed);
            }
        }
        self.genctr.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        self.subsystems.read().get(nqn).cloned()
    }

    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        self.subsystems.read().values().cloned().collect()
    }

    /// Adds a namespace (`nsid` 0 picks the lowest free id); tells the controllers.
    pub fn add_namespace(
        &self,
        nqn: &str,
        nsid: u32,
        dev: Arc<dyn BlockDev>,
        block_size: u32,
    ) -> Result<u32, SubsysError> {
        let subsys = self.subsystem(nqn).ok_or_else(|| SubsysError::NoSubsystem(nqn.into()))?;
        let lba_shift = match block_size {
            512 => 9,
            4096 => 12,
            other => return Err(SubsysError::BlockSize(other)),
        };
        let nsid = {
            let mut map = subsys.namespaces.write();
            let nsid =
                if nsid == 0 { (1..).find(|n| !map.contains_key(n)).unwrap_or(1) } else { nsid };
            if map.contains_key(&nsid) {
                return Err(SubsysError::NsidInUse(nsid));
            }
            let h1 = fnv(&[nqn.as_bytes(), &nsid.to_le_bytes(), b"nguid"]);
            let h2 = fnv(&[nqn.as_bytes(), &nsid.to_le_bytes(), b"uuid"]);
            let mut nguid = [0u8; 16];
            nguid[..8].copy_from_slice(&h1.to_be_bytes());
            nguid[8..].copy_from_slice(&h2.to_be_bytes());
            let mut uuid = nguid;
            uuid.reverse();
            uuid[6] = (uuid[6] & 0x0f) | 0x40; // version 4 layout
            uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC 4122 variant
            let eui64 = fnv(&[nqn.as_bytes(), &nsid.to_le_bytes(), b"eui64"]).to_be_bytes();
            map.insert(nsid, Arc::new(Namespace { nsid, dev, lba_shift, nguid, eui64, uuid }));
            nsid
        };
        self.namespace_changed(&subsys, nsid);
        Ok(nsid)
    }

    pub fn remove_namespace(&self, nqn: &str, nsid: u32) -> Result<(), SubsysError> {
        let subsys = self.subsystem(nqn).ok_or_else(|| SubsysError::NoSubsystem(nqn.into()))?;
        subsys.namespaces.write().remove(&nsid).ok_or(SubsysError::NoNamespace(nsid))?;
        self.namespace_changed(&subsys, nsid);
        Ok(())
    }

    /// Queues a namespace-attribute-changed notice for every controller of `subsys`.
    pub fn namespace_changed(&self, subsys: &Subsystem, nsid: u32) {
        for c in self.controllers.lock().values() {
            if c.subsys.as_ref().is_some_and(|s| s.nqn == subsys.nqn) {
                c.changed_ns.lock().insert(nsid);
                c.aen_pending.store(true, Ordering::Release);
            }
        }
    }

    /// Registers a new controller; `None` if all ids are taken.
    pub fn new_controller(
        &self,
        subsys: Option<Arc<Subsystem>>,
        hostnqn: String,
        hostid: [u8; 16],
        kato_ms: u32,
    ) -> Option<Arc<Controller>> {
        let mut map = self.controllers.lock();
        for _ in 0..0xffef {
            let id = (self.next_cntlid.fetch_add(1, Ordering::Relaxed) % 0xffef + 1) as u16;
            if map.contains_key(&id) {
                continue;
            }
            let ctrl = Arc::new(Controller {
                cntlid: id,
                subsys,
                hostnqn,
                hostid,
                kato_ms: AtomicU32::new(kato_ms),
                last_seen_ms: AtomicU64::new(self.now_ms()),
                dead: AtomicBool::new(false),
                enabled: AtomicBool::new(false),
                io_qids: Mutex::default(),
                // Until Set Features (Number of Queues) narrows it: every queue we could serve.
                io_queues_granted: AtomicU32::new(
                    u32::from(crate::identify::QUEUE_ENTRIES_MAX) - 2,
                ),
                changed_ns: Mutex::default(),
                aen_pending: AtomicBool::new(false),
                data_units_read: AtomicU64::new(0),
                data_units_written: AtomicU64::new(0),
                host_reads: AtomicU64::new(0),
                host_writes: AtomicU64::new(0),
            });
            map.insert(id, ctrl.clone());
            return Some(ctrl);
        }
        None
    }

    pub fn controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        self.controllers.lock().get(&cntlid).cloned()
    }

    /// Tears a controller down: its queues close when they next look.
    pub fn remove_controller(&self, cntlid: u16) {
        if let Some(c) = self.controllers.lock().remove(&cntlid) {
            c.dead.store(true, Ordering::Relaxed);
        }
    }

    pub fn controllers_of(&self, nqn: &str) -> Vec<Arc<Controller>> {
        self.controllers
            .lock()
            .values()
            .filter(|c| c.subsys.as_ref().is_some_and(|s| s.nqn == nqn))
            .cloned()
            .collect()
    }
}
