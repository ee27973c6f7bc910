//! Byte layouts of the data structures the admin queue returns: Identify (controller,
//! namespace, active namespace list, namespace identification descriptors) and log pages
//! (SMART/health, firmware slot, changed namespaces, commands supported and effects,
//! discovery; the error log is `error_log`'s).

use std::sync::atomic::Ordering;

use crate::nvme::{admin, io, put_ascii, put_str};
use crate::subsys::{
    Controller, ListenAddr, Namespace, Subsystem, Target, DISCOVERY_NQN, MODEL_DEFAULT,
};

pub const IDENTIFY_LEN: usize = 4096;
/// Maximum data transfer: 2^MDTS pages of 4 KiB = 1 MiB; the data path accepts exactly this.
pub const MDTS: u8 = 8;
pub const MAX_TRANSFER_BYTES: u32 = 4096 << MDTS;
/// In-capsule data we accept on I/O queues (and on the admin queue, for Connect).
pub const IN_CAPSULE_BYTES: u32 = 8192;
/// The most logical blocks of a fused Compare and Write (ACWU + 1): any such command is
/// atomic with respect to every other write to its device (the device's write gate).
pub const FUSED_MAX_BLOCKS: u32 = 128;
pub const QUEUE_ENTRIES_MAX: u16 = 128;
pub const KAS_100MS: u16 = 10;
pub const AER_LIMIT: usize = 4;
pub const NN: u32 = 1024;
// The whole ANA log page (every group, every namespace id listed) fits one transfer.
const _: () = assert!(crate::ana::log_max_len(NN) <= MAX_TRANSFER_BYTES as usize);
const FIRMWARE: &str = env!("CARGO_PKG_VERSION");

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Identify Controller (CNS 01h), for an NVM subsystem or the discovery subsystem.
pub fn controller(ctrl: &Controller) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    let (serial, model, subnqn, discovery, nn) = match &ctrl.subsys {
        Some(s) => (s.serial.as_str(), s.model.as_str(), s.nqn.as_str(), false, s.max_nsid),
        None => ("discovery", MODEL_DEFAULT, DISCOVERY_NQN, true, 0),
    };
    put_ascii(&mut b[4..24], serial);
    put_ascii(&mut b[24..64], model);
    put_ascii(&mut b[64..72], FIRMWARE);
    b[72] = 6; // RAB
               // CMIC: may have several controllers (bit 1); ANA reporting (bit 3).
    b[76] = if discovery { 0 } else { 0x02 | 0x08 };
    b[77] = MDTS;
    put16(&mut b, 78, ctrl.cntlid);
    put32(&mut b, 80, 0x0001_0300); // VER 1.3
                                    // OAES: notices we send (namespace attribute and ANA changes; discovery log changes).
    put32(&mut b, 92, if discovery { 1 << 31 } else { (1 << 8) | (1 << 11) });
    b[111] = if discovery { 2 } else { 1 }; // CNTRLTYPE
    b[258] = 3; // ACL: 4 outstanding aborts
    b[259] = (AER_LIMIT - 1) as u8; // AERL
    b[260] = 0x03; // FRMW: one slot, read-only
    b[261] = if discovery { 0x04 } else { 0x04 | 0x02 }; // LPA: extended data; effects log (I/O)
    b[262] = (crate::error_log::SLOTS - 1) as u8; // ELPE, 0's based
    put16(&mut b, 320, KAS_100MS);
    if !discovery {
        // ANA: every group id up to NN may be used (a namespace's is its id unless given), so
        // ANAGRPMAX = NANAGRPID = NN; at NN 1024 the whole log page is 36,880 bytes, within
        // one transfer, as Linux's host requires.
        b[342] = crate::ana::ANATT_SECONDS;
        b[343] = crate::ana::ANACAP;
        put32(&mut b, 344, nn); // ANAGRPMAX
        put32(&mut b, 348, nn); // NANAGRPID
    }
    b[512] = 0x66; // SQES
    b[513] = 0x44; // CQES
    put16(&mut b, 514, QUEUE_ENTRIES_MAX);
    if !discovery {
        put32(&mut b, 516, nn);
        // ONCS: Compare, DSM, Write Zeroes, Reservations; FUSES: Compare and Write.
        put16(&mut b, 520, 1 | (1 << 2) | (1 << 3) | (1 << 5));
        put16(&mut b, 522, 1);
        b[525] = 0x07; // VWC present; flush with NSID FFFFFFFFh supported
    }
    if !discovery {
        put16(&mut b, 534, (FUSED_MAX_BLOCKS - 1) as u16); // ACWU, 0's based
    }
    put32(&mut b, 536, 1 | (1 << 20)); // SGLS: supported, offsets for in-capsule data
    if !discovery {
        put32(&mut b, 540, nn); // MNAN: Linux's host refuses ANA without it (1..=NN)
    }
    put_str(&mut b[768..1024], subnqn);
    put32(&mut b, 1792, (64 + IN_CAPSULE_BYTES) / 16); // IOCCSZ
    put32(&mut b, 1796, 1); // IORCSZ
    put16(&mut b, 1800, 0); // ICDOFF
    b[1803] = 1; // MSDBD
    put16(&mut b, 1804, 1); // OFCS: Disconnect supported
    b
}

/// Identify Namespace (CNS 00h). Two LBA formats: 512 (index 0) and 4096 (index 1).
pub fn namespace(ns: &Namespace) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    let size_bytes = ns.dev.size_bytes();
    let blocks = ns.blocks();
    // Bounded work on the core whatever the device's fragmentation (a host's rescan asks).
    let used_bytes = ns.dev.used_bytes().min(size_bytes);
    put64(&mut b, 0, blocks); // NSZE
    put64(&mut b, 8, blocks); // NCAP
    put64(&mut b, 16, used_bytes.div_ceil(1 << ns.lba_shift).min(blocks)); // NUSE
    b[24] = 0x01; // NSFEAT: thin provisioning
    b[25] = 1; // NLBAF: two formats
    b[26] = if ns.lba_shift == 12 { 1 } else { 0 }; // FLBAS
    b[30] = 1; // NMIC: may be shared
               // RESCAP: PTPL (bit 0) where the table can be kept.
    b[31] = crate::resv::RESCAP | u8::from(ns.resv.persistence().0);

    // DLFEAT: Write Zeroes may deallocate (bit 3); deallocated blocks read zero (001b) only
    // where a discard really zeroes its whole range (hosts may zero by deallocating).
    b[33] = if ns.dev.discard_zeroes() { 0x09 } else { 0x08 };
    put32(&mut b, 92, ns.anagrpid); // ANAGRPID
    b[99] = u8::from(ns.read_only()); // NSATTR: write protected
    b[104..120].copy_from_slice(&ns.nguid);
    b[120..128].copy_from_slice(&ns.eui64);
    b[128 + 2] = 9; // LBAF0: 512
    b[128 + 3] = 2;
    b[132 + 2] = 12; // LBAF1: 4096
    b
}

/// Active Namespace ID list (CNS 02h): ids greater than `after`, ascending.
pub fn active_namespaces(subsys: &Subsystem, after: u32) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    let ids =
        subsys.namespaces().keys().copied().filter(|&id| id > after).take(1024).collect::<Vec<_>>();
    for (i, id) in ids.iter().enumerate() {
        put32(&mut b, i * 4, *id);
    }
    b
}

/// Namespace Identification Descriptor list (CNS 03h): EUI-64, NGUID, UUID, CSI.
pub fn namespace_descriptors(ns: &Namespace) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    let mut at = 0;
    for (kind, id) in [(1u8, &ns.eui64[..]), (2, &ns.nguid[..]), (3, &ns.uuid[..]), (4, &[0u8][..])]
    {
        b[at] = kind;
        b[at + 1] = id.len() as u8;
        b[at + 4..at + 4 + id.len()].copy_from_slice(id);
        at += 4 + id.len();
    }
    b
}

/// SMART / Health Information (log 02h).
pub fn smart_log(ctrl: &Controller) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    put16(&mut b, 1, 273 + 35); // composite temperature, kelvin
    b[3] = 100; // available spare
    b[4] = 10; // spare threshold

    // Data units: thousands of 512-byte units, rounded up (of the running totals).
    put64(&mut b, 32, ctrl.bytes_read.load(Ordering::Relaxed).div_ceil(512_000));
    put64(&mut b, 48, ctrl.bytes_written.load(Ordering::Relaxed).div_ceil(512_000));
    put64(&mut b, 64, ctrl.host_reads.load(Ordering::Relaxed));
    put64(&mut b, 80, ctrl.host_writes.load(Ordering::Relaxed));
    // Number of Error Information Log Entries, over the controller's life (128 bits).
    put64(&mut b, 176, ctrl.errors.lock().total());
    b
}

/// Bytes of the Commands Supported and Effects log page (log 05h): 256 admin, then 256 I/O
/// command entries of 4 bytes, then reserved.
pub const EFFECTS_LOG_LEN: usize = 4096;

/// Commands Supported and Effects (log 05h, the NVM command set's): every admin and I/O
/// command an I/O controller takes, marked supported (CSUPP), and those that may change
/// logical block content (LBCC: Write, Write Zeroes, and Dataset Management, whose deallocate
/// reads back zeros; not Compare, whose fused Write is a Write); none changes a namespace's or the controller's capabilities, and none
/// needs the others to stop (CSE 0). What nvmet reports, but for Dataset Management's LBCC.
pub fn effects_log() -> Vec<u8> {
    const CSUPP: u32 = 1;
    const LBCC: u32 = 1 << 1;
    let mut b = vec![0u8; EFFECTS_LOG_LEN];
    let admin = [
        admin::GET_LOG_PAGE,
        admin::IDENTIFY,
        admin::ABORT,
        admin::SET_FEATURES,
        admin::GET_FEATURES,
        admin::ASYNC_EVENT,
        admin::KEEP_ALIVE,
    ];
    for op in admin {
        put32(&mut b, usize::from(op) * 4, CSUPP);
    }
    let io = [
        (io::FLUSH, CSUPP),
        (io::WRITE, CSUPP | LBCC),
        (io::READ, CSUPP),
        (io::COMPARE, CSUPP),
        (io::WRITE_ZEROES, CSUPP | LBCC),
        (io::DSM, CSUPP | LBCC),
        (io::RESV_REGISTER, CSUPP),
        (io::RESV_REPORT, CSUPP),
        (io::RESV_ACQUIRE, CSUPP),
        (io::RESV_RELEASE, CSUPP),
    ];
    for (op, effects) in io {
        put32(&mut b, 1024 + usize::from(op) * 4, effects);
    }
    b
}

/// Firmware Slot Information (log 03h).
pub fn firmware_log() -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0] = 1; // slot 1 active
    put_ascii(&mut b[8..16], FIRMWARE);
    b
}

/// Changed Namespace List (log 04h); empties the list unless `retain`.
/// The Changed Namespace List log page's length: 1024 namespace ids.
pub const CHANGED_NS_LOG_LEN: u64 = 4096;

pub fn changed_namespaces_log(ctrl: &Controller, retain: bool) -> Vec<u8> {
    let mut b = vec![0u8; CHANGED_NS_LOG_LEN as usize];
    let mut list = ctrl.changed_ns.lock();
    if list.len() > 1024 {
        put32(&mut b, 0, 0xffff_ffff);
    } else {
        for (i, id) in list.iter().enumerate() {
            put32(&mut b, i * 4, *id);
        }
    }
    if !retain {
        list.clear();
    }
    b
}

/// Discovery log page (log 70h), as asked through listener `via`, for host `hostnqn`: the
/// subsystems it may use (its access list) and where. On a discovery service (`--discovery-listen`,
/// SPDK's default `match_any`): every such subsystem at each of its listeners. On any other
/// listener (Linux nvmet's per-port view, SPDK's `match_transport_address` filter): only the
/// subsystems listening on `via`, at `via`.
pub fn discovery_log(target: &Target, hostnqn: &str, via: &ListenAddr) -> Vec<u8> {
    let everything = target.discovery_services.read().contains(via);
    let mut entries: Vec<(String, ListenAddr)> = Vec::new();
    for s in target.subsystems().into_iter().filter(|s| s.host_allowed(hostnqn)) {
        for addr in s.listeners.read().iter().filter(|a| everything || *a == via) {
            entries.push((s.nqn.clone(), addr.clone()));
        }
    }
    let mut b = vec![0u8; 1024 * (1 + entries.len())];
    put64(&mut b, 0, target.genctr.load(Ordering::Relaxed));
    put64(&mut b, 8, entries.len() as u64);
    for (e, (nqn, addr)) in b[1024..].chunks_exact_mut(1024).zip(&entries) {
        e[0] = 3; // TRTYPE: TCP
        e[1] = if addr.is_ipv6() { 2 } else { 1 }; // ADRFAM
        e[2] = 2; // SUBTYPE: NVM subsystem
        let secure = target.secure_channel(addr);
        e[3] = secure.treq(); // TREQ: secure channel
        put16(e, 4, target.port_id(addr).unwrap_or(0xffff));
        put16(e, 6, 0xffff); // CNTLID: dynamic
        put16(e, 8, 32); // ASQSZ
        put_str(&mut e[32..64], &addr.port.to_string());
        put_str(&mut e[256..512], nqn);
        put_str(&mut e[512..768], &addr.traddr);
        e[768] = secure.sectype(); // TSAS (TCP): security type
    }
    b
}
