//! Subsystems, namespaces, host access lists, listeners and the controller registry, shared by
//! every queue on every core and by the control plane. Touched on connect, admin commands and
//! control requests only, never per I/O: an I/O command finds its namespace in its queue's
//! [`NsCache`], which reads the subsystem (its lock, its namespaces' shared reference counts)
//! only on a miss; every change of a subsystem's namespaces empties its queues' caches.
//!
//! Listeners belong to subsystems, as in SPDK (`nvmf_subsystem_add_listener`) and Linux nvmet
//! (ports): a host may connect to a subsystem only through an address the subsystem listens
//! on. The daemon's own subsystems (startup exports, volumes) listen on the default listeners
//! (`--nvmf-listen`); one made by `nvmf_create_subsystem` listens nowhere until told. The
//! discovery subsystem answers on every listener; what its log lists depends on where it is
//! asked (see [`crate::identify::discovery_log`]). Invariants:
//! - every address in a subsystem's `listeners` is bound (in `Target::listeners`) or is about
//!   to be by the caller that added it (the control plane binds before it adds);
//! - a controller is reachable only through the address it connected on (`Controller::via`):
//!   removing that address from its subsystem ends it.
//! - a host in a subsystem's `refused_hosts` is refused at Connect (and left out of its
//!   discovery log) whatever the subsystem's access list says.
//!
//! Identities (serial, NGUID, EUI-64, UUID) are derived from the subsystem NQN and namespace
//! id, so they are stable across restarts without storing anything; a subsystem's serial and
//! model number may be given instead (SPDK's `serial_number`, `model_number`), checked as
//! Identify Controller needs them: printable ASCII, at most [`SERIAL_MAX`] and [`MODEL_MAX`]
//! bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use crate::ana::{AnaState, AnaTable, ListenerStates};
use crate::auth::keys::AuthKeys;
use crate::error_log::ErrorLog;
use crate::resv::{Notice, NoticeKind, ResvStore};
use crate::resv_cell::{ResvCell, ResvSaver};
use crate::resv_log::ResvLog;
use crate::spread::Spread;
use crate::tls::{NvmfTls, SecureChannel};
use ballast_engine::BlockDev;
use parking_lot::{Mutex, RwLock, RwLockReadGuard};

pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
pub const NQN_PREFIX: &str = "nqn.2026-11.dev.ballast:";
/// Longest NQN (Base spec: 223 bytes).
pub const NQN_MAX: usize = 223;
/// Identify Controller's SN field (bytes 4..24) and MN field (bytes 24..64).
pub const SERIAL_MAX: usize = 20;
pub const MODEL_MAX: usize = 40;
/// The model number when none is given.
pub const MODEL_DEFAULT: &str = "ballast";

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
    #[error("namespace id {nsid} out of range: 1 to {max} (the subsystem's max_namespaces)")]
    NsidRange { nsid: u32, max: u32 },
    #[error("max_namespaces {0} out of range: at most {max}", max = crate::identify::NN)]
    MaxNamespaces(u32),
    #[error("subsystem {nqn:?} holds at most {max} namespaces")]
    Full { nqn: String, max: u32 },
    #[error("block size {0} not supported (512 or 4096)")]
    BlockSize(u32),
    #[error("block size {block_size} is below the device's logical block size {min}")]
    BelowDeviceBlock { block_size: u32, min: u32 },
    #[error("subsystem {nqn:?} does not listen on {addr}")]
    NoListener { nqn: String, addr: ListenAddr },
    #[error("invalid serial number {0:?}: at most 20 printable ASCII characters")]
    BadSerial(String),
    #[error("invalid model number {0:?}: at most 40 printable ASCII characters")]
    BadModel(String),
    #[error("ANA group {group} out of range: 1 to {max} (the subsystem's max_namespaces)")]
    AnaGroup { group: u32, max: u32 },
}

/// What Identify Controller may carry in an ASCII field (NVMe Base spec 1.3: 20h to 7Eh).
fn printable_ascii(s: &str) -> bool {
    s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// A subsystem's identity as a host sees it in Identify Controller; `None` fields take the
/// defaults (serial derived from the NQN, model [`MODEL_DEFAULT`], at most
/// [`crate::identify::NN`] namespaces).
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub serial: Option<String>,
    pub model: Option<String>,
    /// SPDK's `max_namespaces`: the highest namespace id (Identify Controller's NN); 0 or
    /// `None`: the default.
    pub max_namespaces: Option<u32>,
}

impl Identity {
    /// The serial, model and highest namespace id for `nqn`, checked like SPDK's
    /// `spdk_nvmf_subsystem_set_sn/_mn`.
    fn resolve(self, nqn: &str) -> Result<(String, String, u32), SubsysError> {
        let max_nsid = match self.max_namespaces {
            None | Some(0) => crate::identify::NN,
            Some(n) if n <= crate::identify::NN => n,
            Some(n) => return Err(SubsysError::MaxNamespaces(n)),
        };
        let serial = match self.serial {
            Some(sn) if sn.len() > SERIAL_MAX || !printable_ascii(&sn) => {
                return Err(SubsysError::BadSerial(sn))
            }
            Some(sn) => sn,
            None => format!("{:016x}", fnv(&[nqn.as_bytes()])),
        };
        let model = match self.model {
            Some(mn) if mn.len() > MODEL_MAX || !printable_ascii(&mn) => {
                return Err(SubsysError::BadModel(mn))
            }
            Some(mn) => mn,
            None => MODEL_DEFAULT.to_string(),
        };
        assert!(serial.len() <= SERIAL_MAX);
        assert!(model.len() <= MODEL_MAX);
        Ok((serial, model, max_nsid))
    }
}

/// A TCP address the target listens on, as hosts and discovery log entries name it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenAddr {
    /// The IP address, as `IpAddr` prints it (no brackets for IPv6).
    pub traddr: String,
    pub port: u16,
}

impl ListenAddr {
    pub fn is_ipv6(&self) -> bool {
        self.traddr.contains(':')
    }
}

impl From<SocketAddr> for ListenAddr {
    fn from(a: SocketAddr) -> ListenAddr {
        ListenAddr { traddr: a.ip().to_string(), port: a.port() }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ipv6() {
            write!(f, "[{}]:{}", self.traddr, self.port)
        } else {
            write!(f, "{}:{}", self.traddr, self.port)
        }
    }
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
    /// Its reservations, shared by every controller of the subsystem.
    pub resv: Arc<ResvCell>,
    /// Its ANA group (Identify Namespace ANAGRPID): its id unless given, as in SPDK;
    /// 1..=the subsystem's `max_nsid`.
    pub anagrpid: u32,
}

impl Namespace {
    pub fn blocks(&self) -> u64 {
        self.dev.size_bytes() >> self.lba_shift
    }

    /// Writes, write zeroes and deallocation are refused (Identify says so: NSATTR bit 0).
    /// A volume made read-only while exported turns it on (hosts hear of it through a
    /// Namespace Attribute Changed event).
    pub fn read_only(&self) -> bool {
        self.dev.read_only()
    }
}

pub struct Subsystem {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    /// The highest namespace id (Identify Controller's NN): `max_namespaces`, or
    /// [`crate::identify::NN`].
    pub max_nsid: u32,
    pub allow_any_host: AtomicBool,
    pub hosts: RwLock<BTreeSet<String>>,
    /// Hosts refused whatever `allow_any_host` and `hosts` say: their configured keys could
    /// not be restored (a key file missing at start-up). They stay refused (fail closed) until
    /// the control plane gives them their keys again; never admitted without them.
    pub refused_hosts: RwLock<BTreeSet<String>>,
    /// Read through [`Subsystem::namespaces`]; changed only through
    /// [`Subsystem::change_namespaces`], which empties the queues' caches after each change.
    namespaces: RwLock<BTreeMap<u32, Arc<Namespace>>>,
    /// The caches of the queues serving it ([`NsCache`]), emptied after each change of
    /// `namespaces` (those of queues gone are dropped as others register).
    caches: Mutex<Vec<Weak<CacheCell>>>,
    /// Where hosts may connect to it.
    pub listeners: RwLock<BTreeSet<ListenAddr>>,
    /// Its paths' ANA states, per listener and group.
    pub ana: AnaTable,
}

impl Subsystem {
    pub fn listens_on(&self, addr: &ListenAddr) -> bool {
        self.listeners.read().contains(addr)
    }

    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        if self.refused_hosts.read().contains(hostnqn) {
            return false;
        }
        self.allow_any_host.load(Ordering::Relaxed) || self.hosts.read().contains(hostnqn)
    }

    pub fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        self.namespaces.read().get(&nsid).cloned()
    }

    /// Its namespaces by id.
    pub fn namespaces(&self) -> RwLockReadGuard<'_, BTreeMap<u32, Arc<Namespace>>> {
        self.namespaces.read()
    }

    /// Its ANA groups that hold namespaces, each with their ids (both ascending).
    pub fn ana_groups(&self) -> BTreeMap<u32, Vec<u32>> {
        let mut groups: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for ns in self.namespaces().values() {
            groups.entry(ns.anagrpid).or_default().push(ns.nsid);
        }
        groups
    }

    /// Changes its namespaces with `f`, then empties every queue's cache of them: the next
    /// command finds what changed, and a queue left idle holds no removed namespace (its
    /// device, a RAM export's memory) either.
    fn change_namespaces<R>(&self, f: impl FnOnce(&mut BTreeMap<u32, Arc<Namespace>>) -> R) -> R {
        let r = f(&mut self.namespaces.write());
        // The ANA log lists the groups' namespaces: a host reading it in pieces sees it change.
        self.ana.groups_changed();
        // After the change, never under the map's lock: a queue looks the map up with its own
        // cache locked (see `NsCache::get`).
        let cells: Vec<Arc<CacheCell>> =
            self.caches.lock().iter().filter_map(Weak::upgrade).collect();
        for cell in cells {
            cell.lock().clear();
        }
        r
    }

    /// A new queue's cache, registered to be emptied on changes.
    fn register_cache(&self) -> Arc<CacheCell> {
        let cell = Arc::new(CacheCell::default());
        let mut caches = self.caches.lock();
        caches.retain(|c| c.strong_count() > 0);
        caches.push(Arc::downgrade(&cell));
        cell
    }
}

/// A namespace as one queue holds it: the queue's own reference to it, so that the clone each
/// command takes counts on a cache line only that queue's core writes, not in the namespace
/// every core serving the subsystem shares.
pub type QueueNs = Arc<Arc<Namespace>>;

/// Namespaces a queue keeps at most (a queue using more looks the rest up each time).
const NS_CACHE_MAX: usize = 16;

/// A queue's cached namespaces, behind a lock only that queue's core takes per command (and the
/// control plane, to empty it after a change).
type CacheCell = Mutex<Vec<(u32, QueueNs)>>;

/// The namespaces one queue has used: an I/O command finds its namespace without the
/// subsystem's lock or a reference count every core shares (cache lines each core serving the
/// subsystem would otherwise write on every I/O). The subsystem empties it after every change
/// of its namespaces; a command already holding a removed or replaced one finishes on it, as
/// it would have anyway.
#[derive(Default)]
pub struct NsCache {
    cell: Option<Arc<CacheCell>>,
}

impl NsCache {
    /// Namespace `nsid` of `subsys` (the one subsystem this cache serves), if it exists.
    pub fn get(&mut self, subsys: &Subsystem, nsid: u32) -> Option<QueueNs> {
        let cell = self.cell.get_or_insert_with(|| subsys.register_cache());
        let mut entries = cell.lock();
        if let Some((_, ns)) = entries.iter().find(|(id, _)| *id == nsid) {
            return Some(Arc::clone(ns));
        }
        // A miss reads the map with the cache locked: a change made meanwhile empties the cache
        // only after this insert, so nothing stale stays in it.
        let ns = Arc::new(subsys.namespace(nsid)?);
        if entries.len() >= NS_CACHE_MAX {
            entries.remove(0);
        }
        entries.push((nsid, Arc::clone(&ns)));
        debug_assert!(entries.len() <= NS_CACHE_MAX);
        Some(ns)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.cell.as_ref().map_or(0, |c| c.lock().len())
    }
}

/// What every queue of a controller shares: identity, negotiated settings, liveness.
pub struct Controller {
    pub cntlid: u16,
    /// `None` for a discovery controller.
    pub subsys: Option<Arc<Subsystem>>,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    /// The listener its admin queue connected through.
    pub via: ListenAddr,
    pub kato_ms: AtomicU32,
    /// Milliseconds since `Target::epoch` of the last command on the admin queue.
    pub last_seen_ms: AtomicU64,
    pub dead: AtomicBool,
    /// CC.EN, as set on the admin queue; I/O queues may connect only while it is set.
    pub enabled: AtomicBool,
    /// Resets and shutdowns so far (CC.EN cleared, CC.SHN set): an I/O queue connected before
    /// the last one is deleted by it (it closes at its next tick).
    pub resets: AtomicU32,
    /// I/O queue ids connected now.
    pub io_qids: Mutex<BTreeSet<u16>>,
    /// I/O queues granted by Set Features (Number of Queues), 0's based.
    pub io_queues_granted: AtomicU32,
    /// Namespaces changed since the host last read the Changed Namespace List.
    pub changed_ns: Mutex<BTreeSet<u32>>,
    /// A namespace-attribute notice is waiting for an AER.
    pub aen_pending: AtomicBool,
    /// An ANA change notice is waiting for an AER (a state through `via` changed).
    pub ana_pending: AtomicBool,
    /// Reservation notifications for its host, and their masks (any core's reservation
    /// command adds; its admin queue reads).
    pub resv_log: Mutex<ResvLog>,
    /// A "reservation log page available" event is waiting for an AER.
    pub resv_pending: AtomicBool,
    /// The commands it answered with an error, recent ones (any of its queues records; Get
    /// Log Page 01h and the SMART log read). Taken only on an error path.
    pub errors: Mutex<ErrorLog>,
    /// Bytes its reads and writes moved: the SMART log's data units are rounded from these
    /// totals, not per command.
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub host_reads: AtomicU64,
    pub host_writes: AtomicU64,
    /// Queue id → what `nvmf_subsystem_get_qpairs` says of the queue: entered when it
    /// connects, gone with it.
    pub queues: Mutex<BTreeMap<u16, QueueInfo>>,
}

/// One connected queue of a controller, for the control plane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueInfo {
    /// The host's address, as the socket gave it.
    pub peer: String,
    /// The hash and DH group of the queue's last DH-HMAC-CHAP authentication.
    pub auth: Option<(&'static str, &'static str)>,
    /// Connected, and its first DH-HMAC-CHAP authentication not done yet.
    pub authenticating: bool,
}

pub struct Target {
    pub epoch: Instant,
    subsystems: RwLock<BTreeMap<String, Arc<Subsystem>>>,
    controllers: Mutex<HashMap<u16, Arc<Controller>>>,
    next_cntlid: AtomicU32,
    /// Discovery log generation counter: bumped on every change a host could see.
    pub genctr: AtomicU64,
    /// Every address bound, in the order bound (a listener's port id is its index + 1).
    pub listeners: RwLock<Vec<ListenAddr>>,
    /// The listeners whose discovery log lists every subsystem at all its listeners (a
    /// dedicated discovery service, `--discovery-listen`), not only those listening there.
    pub discovery_services: RwLock<BTreeSet<ListenAddr>>,
    /// Where the daemon's own subsystems listen ([`Target::create_subsystem`]).
    pub default_listeners: RwLock<BTreeSet<ListenAddr>>,
    /// TLS keys per host and subsystem, and the TLS server that uses them.
    pub tls: NvmfTls,
    /// DH-HMAC-CHAP configuration per host and subsystem.
    pub auth: AuthKeys,
    /// What each listener asks of hosts (absent: plaintext only).
    secure: RwLock<BTreeMap<ListenAddr, SecureChannel>>,
    /// The I/O queues each core serves, so new ones go where there are fewest.
    pub spread: Arc<Spread>,
    /// Registrations each namespace keeps at most (`--nvmf-max-registrants`), for namespaces
    /// added from now on.
    pub resv_registrants: AtomicUsize,
    /// The saver of namespaces' reservation tables where they are kept across restarts (the
    /// daemon's pool), for namespaces added from now on; none: not kept (PTPL has no effect).
    resv_saver: RwLock<Option<Arc<ResvSaver>>>,
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
            discovery_services: RwLock::default(),
            default_listeners: RwLock::default(),
            tls: NvmfTls::new(),
            auth: AuthKeys::default(),
            secure: RwLock::default(),
            spread: Arc::default(),
            resv_registrants: AtomicUsize::new(crate::resv::REGISTRANTS_DEFAULT),
            resv_saver: RwLock::new(None),
        }
    }
}

impl Target {
    /// What listener `addr` asks of hosts.
    pub fn secure_channel(&self, addr: &ListenAddr) -> SecureChannel {
        self.secure.read().get(addr).copied().unwrap_or_default()
    }

    /// Sets what listener `addr` asks of hosts (the discovery log shows it).
    pub fn set_secure_channel(&self, addr: ListenAddr, secure: SecureChannel) {
        self.secure.write().insert(addr, secure);
        self.discovery_changed();
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The daemon's own subsystem (a startup export's, a volume's): the default identity,
    /// listening on the default listeners.
    pub fn create_subsystem(
        &self,
        nqn: &str,
        allow_any_host: bool,
    ) -> Result<Arc<Subsystem>, SubsysError> {
        let subsys = self.create_subsystem_as(nqn, allow_any_host, Identity::default())?;
        subsys.listeners.write().extend(self.default_listeners.read().iter().cloned());
        Ok(subsys)
    }

    /// A subsystem as SPDK's `nvmf_create_subsystem` makes one: its Identify Controller says
    /// `identity` (checked before anything changes), and it listens nowhere yet.
    pub fn create_subsystem_as(
        &self,
        nqn: &str,
        allow_any_host: bool,
        identity: Identity,
    ) -> Result<Arc<Subsystem>, SubsysError> {
        if !nqn.starts_with("nqn.") || nqn.len() > NQN_MAX || nqn == DISCOVERY_NQN {
            return Err(SubsysError::BadNqn(nqn.into()));
        }
        let mut map = self.subsystems.write();
        if map.contains_key(nqn) {
            return Err(SubsysError::Exists(nqn.into()));
        }
        let (serial, model, max_nsid) = identity.resolve(nqn)?;
        let subsys = Arc::new(Subsystem {
            nqn: nqn.into(),
            serial,
            model,
            max_nsid,
            allow_any_host: AtomicBool::new(allow_any_host),
            hosts: RwLock::default(),
            refused_hosts: RwLock::default(),
            namespaces: RwLock::default(),
            caches: Mutex::default(),
            listeners: RwLock::default(),
            ana: AnaTable::default(),
        });
        map.insert(nqn.into(), subsys.clone());
        drop(map);
        self.discovery_changed();
        Ok(subsys)
    }

    /// Deletes a subsystem; its namespaces' reservations are saved no more (a control
    /// thread's call: it may wait for a save under way).
    pub fn delete_subsystem(&self, nqn: &str) -> Result<(), SubsysError> {
        let gone = self
            .subsystems
            .write()
            .remove(nqn)
            .ok_or_else(|| SubsysError::NoSubsystem(nqn.into()))?;
        let namespaces: Vec<Arc<Namespace>> = gone.namespaces().values().cloned().collect();
        for ns in &namespaces {
            ns.resv.retire();
        }
        self.auth.remove_subsystem(nqn);
        self.tls.remove_subsystem(nqn);
        for c in self.controllers.lock().values() {
            if c.subsys.as_ref().is_some_and(|s| s.nqn == nqn) {
                c.dead.store(true, Ordering::Relaxed);
            }
        }
        self.discovery_changed();
        Ok(())
    }

    /// Keeps namespaces' reservation tables in `store` from now on (Persist Through Power
    /// Loss for namespaces added after this), through a saver thread of its own.
    pub fn keep_reservations(&self, store: Arc<dyn ResvStore>) -> std::io::Result<()> {
        *self.resv_saver.write() = Some(ResvSaver::start(store)?);
        Ok(())
    }

    /// Records a bound listener (once); returns its port id.
    pub fn listener_bound(&self, addr: ListenAddr) -> u16 {
        let (index, added) = {
            let mut all = self.listeners.write();
            match all.iter().position(|a| *a == addr) {
                Some(i) => (i, false),
                None => {
                    all.push(addr);
                    (all.len() - 1, true)
                }
            }
        };
        if added {
            self.discovery_changed();
        }
        u16::try_from(index + 1).unwrap_or(u16::MAX)
    }

    /// The port id of a bound listener (its place among them, from 1).
    pub fn port_id(&self, addr: &ListenAddr) -> Option<u16> {
        let index = self.listeners.read().iter().position(|a| a == addr)?;
        u16::try_from(index + 1).ok()
    }

    /// Lets hosts reach subsystem `nqn` through `addr` (bound by the caller); `false` if it
    /// already listened there.
    pub fn add_listener(&self, nqn: &str, addr: ListenAddr) -> Result<bool, SubsysError> {
        self.add_listener_in(nqn, addr, None)
    }

    /// [`Target::add_listener`], its path in ANA state `ana` for every group (`None`:
    /// optimized) from before a host can connect there; a listener the subsystem already has
    /// keeps its states.
    pub fn add_listener_in(
        &self,
        nqn: &str,
        addr: ListenAddr,
        ana: Option<AnaState>,
    ) -> Result<bool, SubsysError> {
        let subsys = self.subsystem(nqn).ok_or_else(|| SubsysError::NoSubsystem(nqn.into()))?;
        let added = {
            let mut listeners = subsys.listeners.write();
            let new = !listeners.contains(&addr);
            if new {
                // What a removed listener's path kept for its last controllers goes now.
                subsys.ana.forget_listener(&addr);
                if let Some(state) = ana {
                    subsys.ana.set(&addr, None, state);
                }
                listeners.insert(addr);
            }
            new
        };
        if added {
            self.discovery_changed();
        }
        Ok(added)
    }

    /// Stops subsystem `nqn` listening on `addr`; its controllers connected there end (the
    /// socket stays bound: other subsystems may listen on it, and discovery answers there).
    pub fn remove_listener(&self, nqn: &str, addr: &ListenAddr) -> Result<(), SubsysError> {
        let subsys = self.subsystem(nqn).ok_or_else(|| SubsysError::NoSubsystem(nqn.into()))?;
        if !subsys.listeners.write().remove(addr) {
            return Err(SubsysError::NoListener { nqn: nqn.into(), addr: addr.clone() });
        }
        for c in self.controllers_of(nqn).iter().filter(|c| c.via == *addr) {
            c.dead.store(true, Ordering::Relaxed);
        }
        self.forget_unused_path(&subsys, addr);
        self.discovery_changed();
        Ok(())
    }

    /// Forgets the ANA states of a path `subsys` no longer listens on once no controller
    /// connected through it remains: until its controllers end (at their next tick) a path
    /// that refused I/O keeps refusing it, and after that it costs the data path nothing.
    fn forget_unused_path(&self, subsys: &Subsystem, via: &ListenAddr) {
        // Under the listeners' lock: a listener added again meanwhile keeps what it is given.
        let listeners = subsys.listeners.read();
        let used =
            listeners.contains(via)
                || self.controllers.lock().values().any(|c| {
                    c.via == *via && c.subsys.as_ref().is_some_and(|s| s.nqn == subsys.nqn)
                });
        if !used {
            subsys.ana.forget_listener(via);
        }
    }

    /// Sets the ANA state of group `group` (every group: `None`) of subsystem `nqn` through
    /// listener `addr`; its controllers connected there get an ANA change notice (if their
    /// host enabled them) and read the ANA log again. A listener removed starts optimized;
    /// across restarts the control plane keeps them (`persist`, where there is a pool).
    pub fn set_ana_state(
        &self,
        nqn: &str,
        addr: &ListenAddr,
        group: Option<u32>,
        state: AnaState,
    ) -> Result<(), SubsysError> {
        let subsys = self.ana_path(nqn, addr, group)?;
        if subsys.ana.set(addr, group, state) {
            self.ana_changed(nqn, addr);
        }
        Ok(())
    }

    /// What listener `addr` of subsystem `nqn` keeps of ANA states now, and what
    /// [`Self::set_ana_state`] with these arguments would leave (`None`: optimized
    /// everywhere), refused as it would be; nothing is set.
    pub fn ana_preview(
        &self,
        nqn: &str,
        addr: &ListenAddr,
        group: Option<u32>,
        state: AnaState,
    ) -> Result<(Option<ListenerStates>, Option<ListenerStates>), SubsysError> {
        Ok(self.ana_path(nqn, addr, group)?.ana.preview(addr, group, state))
    }

    /// Puts `states` in force through listener `addr` of `nqn` whole (kept states restored at
    /// start-up), groups beyond the subsystem's namespace ids dropped (and said); the
    /// controllers connected through it are told when it changes what they read.
    pub fn replace_ana(
        &self,
        nqn: &str,
        addr: &ListenAddr,
        states: Option<ListenerStates>,
    ) -> Result<(), SubsysError> {
        let subsys = self.ana_path(nqn, addr, None)?;
        let states = states.map(|mut l| {
            let max = subsys.max_nsid;
            l.groups.retain(|&g, _| {
                let kept = (1..=max).contains(&g);
                if !kept {
                    tracing::warn!(nqn, %addr, group = g, max, "ANA state of a group past the subsystem's namespace ids dropped");
                }
                kept
            });
            l
        });
        if subsys.ana.replace(addr, states) {
            self.ana_changed(nqn, addr);
        }
        Ok(())
    }

    /// The subsystem `nqn` if it listens on `addr` and has group `group` (`None`: every group).
    fn ana_path(
        &self,
        nqn: &str,
        addr: &ListenAddr,
        group: Option<u32>,
    ) -> Result<Arc<Subsystem>, SubsysError> {
        let subsys = self.subsystem(nqn).ok_or_else(|| SubsysError::NoSubsystem(nqn.into()))?;
        if let Some(g) = group {
            if g == 0 || g > subsys.max_nsid {
                return Err(SubsysError::AnaGroup { group: g, max: subsys.max_nsid });
            }
        }
        if !subsys.listens_on(addr) {
            return Err(SubsysError::NoListener { nqn: nqn.into(), addr: addr.clone() });
        }
        Ok(subsys)
    }

    /// The controllers of `nqn` connected through `addr` get an ANA change notice.
    fn ana_changed(&self, nqn: &str, addr: &ListenAddr) {
        for c in self.controllers_of(nqn).iter().filter(|c| c.via == *addr) {
            c.ana_pending.store(true, Ordering::Release);
        }
    }

    /// Ends every controller of `host` on subsystem `nqn` (its queues close when they next
    /// look, within a tick): a host taken off a subsystem keeps no association it made while
    /// it was allowed, as SPDK's `nvmf_subsystem_remove_host` disconnects it. Returns how many.
    pub fn disconnect_host(&self, nqn: &str, host: &str) -> usize {
        let gone: Vec<_> =
            self.controllers_of(nqn).into_iter().filter(|c| c.hostnqn == host).collect();
        for c in &gone {
            c.dead.store(true, Ordering::Relaxed);
        }
        gone.len()
    }

    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        self.subsystems.read().get(nqn).cloned()
    }

    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        self.subsystems.read().values().cloned().collect()
    }

    /// Adds a namespace (`nsid` 0 picks the lowest free id); tells the controllers.
    /// `device_id` names the data behind it (its device's UUID): the namespace's NGUID, UUID
    /// and EUI-64 derive from it with the NQN and the id, so they stay the same across
    /// restarts while the data does, and are never those of another device given the same
    /// id later (a host that sees the same identifiers keeps its cache of the old data).
    pub fn add_namespace(
        &self,
        nqn: &str,
        nsid: u32,
        dev: Arc<dyn BlockDev>,
        block_size: u32,
        device_id: &str,
    ) -> Result<u32, SubsysError> {
        self.add_namespace_in(nqn, nsid, None, dev, block_size, device_id)
    }

    /// [`Target::add_namespace`] in ANA group `anagrpid` (`None`: the namespace's id).
    pub fn add_namespace_in(
        &self,
        nqn: &str,
        nsid: u32,
        anagrpid: Option<u32>,
        dev: Arc<dyn BlockDev>,
        block_size: u32,
        device_id: &str,
    ) -> Result<u32, SubsysError> {
        let subsys = self.subsystem(nqn).ok_or_else(|| SubsysError::NoSubsystem(nqn.into()))?;
        let lba_shift = match block_size {
            512 => 9,
            4096 => 12,
            other => return Err(SubsysError::BlockSize(other)),
        };
        // An LBA smaller than what the device takes whole would fail each I/O on it.
        let min = dev.info().min_block;
        if block_size < min {
            return Err(SubsysError::BelowDeviceBlock { block_size, min });
        }
        // Hosts ask Identify only for ids up to NN; FFFFFFFFh is the broadcast id.
        let max = subsys.max_nsid;
        if nsid > max {
            return Err(SubsysError::NsidRange { nsid, max });
        }
        if let Some(group) = anagrpid.filter(|&g| g == 0 || g > max) {
            return Err(SubsysError::AnaGroup { group, max });
        }
        let nsid = subsys.change_namespaces(|map| {
            let nsid = if nsid == 0 {
                (1..=max)
                    .find(|n| !map.contains_key(n))
                    .ok_or(SubsysError::Full { nqn: nqn.into(), max })?
            } else {
                nsid
            };
            if map.contains_key(&nsid) {
                return Err(SubsysError::NsidInUse(nsid));
            }
            let id = device_id.as_bytes();
            let h1 = fnv(&[nqn.as_bytes(), &nsid.to_le_bytes(), id, b"nguid"]);
            let h2 = fnv(&[nqn.as_bytes(), &nsid.to_le_bytes(), id, b"uuid"]);
            let mut nguid = [0u8; 16];
            nguid[..8].copy_from_slice(&h1.to_be_bytes());
            nguid[8..].copy_from_slice(&h2.to_be_bytes());
            let mut uuid = nguid;
            uuid.reverse();
            uuid[6] = (uuid[6] & 0x0f) | 0x40; // version 4 layout
            uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC 4122 variant
            let eui64 = fnv(&[nqn.as_bytes(), &nsid.to_le_bytes(), id, b"eui64"]).to_be_bytes();
            let limit = self.resv_registrants.load(Ordering::Relaxed);
            let resv = match self.resv_saver.read().clone() {
                Some(saver) => ResvCell::kept(limit, saver, nqn, nsid, nguid),
                None => ResvCell::new(limit),
            };
            let anagrpid = anagrpid.unwrap_or(nsid);
            map.insert(
                nsid,
                Arc::new(Namespace { nsid, dev, lba_shift, nguid, eui64, uuid, resv, anagrpid }),
            );
            Ok(nsid)
        })?;
        self.namespace_changed(&subsys, nsid);
        Ok(nsid)
    }

    /// Removes a namespace; its reservations are saved no more (a control thread's call: it
    /// may wait for a save under way). Forgetting what the pool keeps is the caller's.
    pub fn remove_namespace(&self, nqn: &str, nsid: u32) -> Result<(), SubsysError> {
        let subsys = self.subsystem(nqn).ok_or_else(|| SubsysError::NoSubsystem(nqn.into()))?;
        let ns = subsys
            .change_namespaces(|map| map.remove(&nsid))
            .ok_or(SubsysError::NoNamespace(nsid))?;
        self.namespace_changed(&subsys, nsid);
        for c in self.controllers_of(nqn) {
            c.resv_log.lock().forget_namespace(nsid);
        }
        ns.resv.retire();
        Ok(())
    }

    /// The discovery log changed: its generation counter moves on, and every discovery
    /// controller gets a discovery-log-change notice (sent if its host enabled them, AEC bit
    /// 31: persistent discovery, nvme-cli's autoconnect rules).
    fn discovery_changed(&self) {
        self.genctr.fetch_add(1, Ordering::Relaxed);
        for c in self.controllers.lock().values() {
            if c.subsys.is_none() {
                c.aen_pending.store(true, Ordering::Release);
            }
        }
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
        via: ListenAddr,
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
                via,
                kato_ms: AtomicU32::new(kato_ms),
                last_seen_ms: AtomicU64::new(self.now_ms()),
                dead: AtomicBool::new(false),
                enabled: AtomicBool::new(false),
                resets: AtomicU32::new(0),
                io_qids: Mutex::default(),
                // Until Set Features (Number of Queues) narrows it: every queue we could serve.
                io_queues_granted: AtomicU32::new(
                    u32::from(crate::identify::QUEUE_ENTRIES_MAX) - 2,
                ),
                changed_ns: Mutex::default(),
                aen_pending: AtomicBool::new(false),
                ana_pending: AtomicBool::new(false),
                resv_log: Mutex::default(),
                errors: Mutex::default(),
                resv_pending: AtomicBool::new(false),
                bytes_read: AtomicU64::new(0),
                bytes_written: AtomicU64::new(0),
                host_reads: AtomicU64::new(0),
                host_writes: AtomicU64::new(0),
                queues: Mutex::default(),
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
        let gone = self.controllers.lock().remove(&cntlid);
        if let Some(c) = gone {
            c.dead.store(true, Ordering::Relaxed);
            if let Some(subsys) = &c.subsys {
                self.forget_unused_path(subsys, &c.via);
            }
        }
    }

    /// Hands reservation notifications raised on namespace `nsid` of subsystem `nqn` to every
    /// controller of each notice's host there; a controller whose mask lets one through owes
    /// its host an event (log page 80h available).
    pub fn reservation_notices(&self, nqn: &str, nsid: u32, notices: &[Notice]) {
        if notices.is_empty() {
            return;
        }
        // At most one notice per host (`resv`): found by host, not searched per controller.
        let by_host: HashMap<[u8; 16], NoticeKind> =
            notices.iter().map(|n| (n.host, n.kind)).collect();
        debug_assert_eq!(by_host.len(), notices.len(), "two notices for one host");
        for c in self.controllers_of(nqn) {
            if let Some(&kind) = by_host.get(&c.hostid) {
                if c.resv_log.lock().add(kind, nsid) {
                    c.resv_pending.store(true, Ordering::Release);
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000b0b0";

    #[test]
    fn a_refused_host_is_refused_whatever_the_access_list_says() {
        let target = Target::default();
        let subsys = target.create_subsystem("nqn.2026-11.dev.ballast:t", true).unwrap();
        assert!(subsys.host_allowed(HOST), "any host");
        subsys.refused_hosts.write().insert(HOST.into());
        assert!(!subsys.host_allowed(HOST), "refused although any host is allowed");
        subsys.allow_any_host.store(false, Ordering::Relaxed);
        subsys.hosts.write().insert(HOST.into());
        assert!(!subsys.host_allowed(HOST), "refused although listed");
        assert!(!subsys.host_allowed("nqn.2014-08.org.nvmexpress:other"), "not listed");
        subsys.refused_hosts.write().remove(HOST);
        assert!(subsys.host_allowed(HOST), "listed again once no longer refused");
    }

    #[test]
    fn a_namespace_is_identified_by_its_device_not_only_its_place() {
        use ballast_engine::ram::RamDev;
        let target = Target::default();
        let nqn = "nqn.2026-11.dev.ballast:swap";
        target.create_subsystem(nqn, true).unwrap();
        let ids = |device: &str| {
            target.add_namespace(nqn, 1, Arc::new(RamDev::new(1 << 20)), 4096, device).unwrap();
            let ns = target.subsystem(nqn).unwrap().namespace(1).unwrap();
            target.remove_namespace(nqn, 1).unwrap();
            (ns.nguid, ns.uuid, ns.eui64)
        };
        let a = ids("5f0c7a2e-0000-4000-8000-00000000000a");
        let b = ids("5f0c7a2e-0000-4000-8000-00000000000b");
        assert!(a.0 != b.0 && a.1 != b.1 && a.2 != b.2, "another device at nsid 1: new ids");
        assert_eq!(ids("5f0c7a2e-0000-4000-8000-00000000000a"), a, "the same device: the same");
        assert_eq!(a.1[6] >> 4, 4, "UUID version 4 layout");
    }

    /// A namespace's LBA is never smaller than what its device takes whole: each I/O on it
    /// would fail.
    #[test]
    fn an_lba_below_the_devices_block_is_refused() {
        use ballast_engine::ram::RamDev;
        let target = Target::default();
        let nqn = "nqn.2026-11.dev.ballast:4kn";
        target.create_subsystem(nqn, true).unwrap();
        // A device that takes only whole 4 KiB blocks (a 4Kn disk, an `nvme:` namespace).
        let dev: Arc<dyn BlockDev> = Arc::new(RamDev::new(1 << 20).with_min_block(4096));
        let e = target.add_namespace(nqn, 1, dev.clone(), 512, "d").unwrap_err();
        assert!(matches!(e, SubsysError::BelowDeviceBlock { block_size: 512, min: 4096 }), "{e}");
        assert_eq!(target.add_namespace(nqn, 1, dev, 4096, "d").unwrap(), 1);
    }

    /// SPDK's `max_namespaces`: the highest id, what Identify Controller's NN says.
    #[test]
    fn max_namespaces_bounds_the_ids_and_is_checked() {
        use ballast_engine::ram::RamDev;
        let target = Target::default();
        let nqn = "nqn.2026-11.dev.ballast:two";
        let two = Identity { max_namespaces: Some(2), ..Identity::default() };
        assert_eq!(target.create_subsystem_as(nqn, true, two).unwrap().max_nsid, 2);
        let dev = || -> Arc<dyn BlockDev> { Arc::new(RamDev::new(1 << 20)) };
        let e = target.add_namespace(nqn, 3, dev(), 4096, "dev").unwrap_err();
        assert!(matches!(e, SubsysError::NsidRange { nsid: 3, max: 2 }), "{e}");
        assert_eq!(target.add_namespace(nqn, 0, dev(), 4096, "dev").unwrap(), 1);
        assert_eq!(target.add_namespace(nqn, 0, dev(), 4096, "dev").unwrap(), 2);
        let e = target.add_namespace(nqn, 0, dev(), 4096, "dev").unwrap_err();
        assert!(matches!(e, SubsysError::Full { max: 2, .. }), "{e}");
        let over = Identity { max_namespaces: Some(1025), ..Identity::default() };
        let e = target.create_subsystem_as("nqn.2026-11.dev.ballast:over", true, over);
        assert!(matches!(e, Err(SubsysError::MaxNamespaces(1025))));
        let zero = Identity { max_namespaces: Some(0), ..Identity::default() };
        let s = target.create_subsystem_as("nqn.2026-11.dev.ballast:zero", true, zero).unwrap();
        assert_eq!(s.max_nsid, crate::identify::NN, "0: the default");
    }

    #[test]
    fn namespace_ids_stay_within_what_identify_answers() {
        use ballast_engine::ram::RamDev;
        let target = Target::default();
        let nqn = "nqn.2026-11.dev.ballast:ids";
        target.create_subsystem(nqn, true).unwrap();
        let dev = || -> Arc<dyn BlockDev> { Arc::new(RamDev::new(1 << 20)) };
        for bad in [crate::identify::NN + 1, 2000, u32::MAX] {
            let e = target.add_namespace(nqn, bad, dev(), 4096, "dev").unwrap_err();
            assert!(matches!(e, SubsysError::NsidRange { nsid, .. } if nsid == bad), "{bad}: {e}");
        }
        assert_eq!(
            target.add_namespace(nqn, crate::identify::NN, dev(), 4096, "dev").unwrap(),
            1024
        );
        // Automatic ids fill 1..=NN, then the subsystem is full.
        for want in 1..crate::identify::NN {
            assert_eq!(target.add_namespace(nqn, 0, dev(), 4096, "dev").unwrap(), want);
        }
        let e = target.add_namespace(nqn, 0, dev(), 4096, "dev").unwrap_err();
        assert!(matches!(e, SubsysError::Full { max: 1024, .. }), "{e}");
    }

    /// A queue's cache of namespaces: a hit takes no subsystem lock and no count every core
    /// shares; any change of the subsystem's namespaces (added, removed, replaced at the same
    /// id) empties it at once, so the next lookup sees it and an idle queue lets a removed
    /// namespace go; the cache stays bounded.
    #[test]
    fn a_queues_namespace_cache_is_emptied_when_the_namespaces_change() {
        use ballast_engine::ram::RamDev;
        let target = Target::default();
        let nqn = "nqn.2026-11.dev.ballast:cache";
        let subsys = target.create_subsystem(nqn, true).unwrap();
        let dev = || -> Arc<dyn BlockDev> { Arc::new(RamDev::new(1 << 20)) };
        target.add_namespace(nqn, 1, dev(), 4096, "a").unwrap();
        let mut cache = NsCache::default();
        assert!(cache.get(&subsys, 2).is_none(), "no namespace 2");
        let first = cache.get(&subsys, 1).unwrap();
        let shared = subsys.namespace(1).unwrap();
        // The map, this test's `shared`, and the cache's one reference: per-command clones of
        // the queue's reference leave the shared count alone.
        assert_eq!(Arc::strong_count(&shared), 3);
        let per_command: Vec<QueueNs> = (0..8).map(|_| first.clone()).collect();
        assert_eq!(Arc::strong_count(&shared), 3);
        drop(per_command);
        {
            // A hit while the subsystem's namespaces are write-locked: no lock taken (a read
            // of the lock here would never return).
            let _held = subsys.namespaces.write();
            assert!(Arc::ptr_eq(&cache.get(&subsys, 1).unwrap(), &first));
        }
        // Removed: the cache is emptied at once (an idle queue keeps nothing of it); a
        // command still holding it keeps it until it finishes.
        drop(first);
        target.remove_namespace(nqn, 1).unwrap();
        assert_eq!(cache.len(), 0);
        assert_eq!(Arc::strong_count(&shared), 1, "only this test holds the removed namespace");
        assert!(cache.get(&subsys, 1).is_none(), "removed");
        // Replaced at the same id: the next lookup finds the new device.
        target.add_namespace(nqn, 1, dev(), 512, "b").unwrap();
        let again = cache.get(&subsys, 1).unwrap();
        assert!(!Arc::ptr_eq(&*again, &shared) && again.lba_shift == 9, "the new namespace");
        assert_eq!(shared.lba_shift, 12, "a command holding the old one keeps it");
        // Bounded: a queue using more namespaces than it keeps still finds each of them.
        for nsid in 2..=40 {
            target.add_namespace(nqn, nsid, dev(), 4096, "c").unwrap();
        }
        for round in 0..2 {
            for nsid in 1..=40 {
                assert_eq!(cache.get(&subsys, nsid).map(|n| n.nsid), Some(nsid), "{round}");
                assert!(cache.len() <= NS_CACHE_MAX);
            }
        }
    }
}
