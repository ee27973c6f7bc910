//! The admin command set and fabrics property registers of one controller: decides the
//! status, completion dword and returned data for every admin command. Pure except for the
//! shared controller state it reads and updates; the queue glue moves the bytes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::identify;
use crate::nvme::{admin, prop, status, Sqe, Status};
use crate::resv_log::{self, ResvLog};
use crate::subsys::{Controller, Namespace, Target};

/// What an admin command produced.
#[derive(Debug, Default)]
pub struct Reply {
    pub status: Status,
    pub dw0: u32,
    pub dw1: u32,
    /// Data for the host (sent with C2HData before the response).
    pub data: Option<Vec<u8>>,
    /// The command is held (Asynchronous Event Request): no response now.
    pub held: bool,
    /// The response waits until this version of the namespace's reservation table is kept
    /// (Set Features Reservation Persistence turned PTPL on or off in a pool).
    pub resv_save: Option<KeptAfter>,
}

/// A namespace's reservation table, and the version of it a response waits to see kept.
pub struct KeptAfter {
    pub ns: Arc<Namespace>,
    pub version: u64,
}

impl std::fmt::Debug for KeptAfter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeptAfter {{ nsid: {}, version: {} }}", self.ns.nsid, self.version)
    }
}

impl Reply {
    fn status(status: Status) -> Reply {
        Reply { status, ..Reply::default() }
    }
    fn data(data: Vec<u8>) -> Reply {
        Reply { data: Some(data), ..Reply::default() }
    }
}

/// Controller Configuration bits.
const CC_EN: u32 = 1;
const CC_SHN_MASK: u32 = 0x3 << 14;
/// Controller Status bits.
const CSTS_RDY: u32 = 1;
const CSTS_SHST_COMPLETE: u32 = 0x2 << 2;

/// Feature identifiers.
const FEAT_ARBITRATION: u8 = 0x01;
const FEAT_POWER_MGMT: u8 = 0x02;
const FEAT_TEMPERATURE: u8 = 0x04;
const FEAT_ERROR_RECOVERY: u8 = 0x05;
const FEAT_WRITE_ATOMICITY: u8 = 0x0a;
const FEAT_VWC: u8 = 0x06;
const FEAT_NUM_QUEUES: u8 = 0x07;
const FEAT_IRQ_COALESCE: u8 = 0x08;
const FEAT_ASYNC_EVENT: u8 = 0x0b;
const FEAT_KATO: u8 = 0x0f;
const FEAT_RESV_MASK: u8 = 0x82;
const FEAT_RESV_PERSIST: u8 = 0x83;
/// Log page identifiers.
const LOG_ERROR: u8 = 0x01;
const LOG_SMART: u8 = 0x02;
const LOG_FIRMWARE: u8 = 0x03;
const LOG_CHANGED_NS: u8 = 0x04;
const LOG_EFFECTS: u8 = 0x05;
const LOG_ANA: u8 = 0x0c;
const LOG_DISCOVERY: u8 = 0x70;
/// Reservation Notification: the oldest of the controller's notifications (`resv_log`).
const LOG_RESERVATION: u8 = 0x80;

/// An AER completion for "namespace attribute changed": notice, info 0, log page 04h.
pub const AEN_NS_CHANGED: u32 = ((LOG_CHANGED_NS as u32) << 16) | 0x02;
/// Asynchronous event: notice (2), discovery log page change (F0h), log page 70h.
pub const AEN_DISC_CHANGED: u32 = ((LOG_DISCOVERY as u32) << 16) | (0xf0 << 8) | 0x02;
/// Asynchronous event: notice (2), ANA change (03h), log page 0Ch.
pub const AEN_ANA_CHANGE: u32 = ((LOG_ANA as u32) << 16) | (0x03 << 8) | 0x02;
/// Asynchronous event: I/O command specific (6), reservation log page available (00h), log
/// page 80h. No configuration bit governs it: sent whenever a notification is raised.
pub const AEN_RESV_LOG: u32 = ((LOG_RESERVATION as u32) << 16) | 0x06;
/// In `take_event`'s table: an event no configuration bit governs.
const AEC_ALWAYS: u32 = 0;
/// Asynchronous Event Configuration: ANA change notices.
const AEC_ANA_CHANGE: u32 = 1 << 11;
/// Asynchronous Event Configuration: discovery log page change notices.
const AEC_DISC_CHANGED: u32 = 1 << 31;
/// Asynchronous Event Configuration: namespace attribute notices.
const AEC_NS_ATTR: u32 = 1 << 8;

/// Admin-queue state of one controller.
pub struct AdminState {
    pub ctrl: Arc<Controller>,
    pub cc: u32,
    pub csts: u32,
    pub async_event_config: u32,
    pub temperature_threshold: u32,
    /// Arbitration (feature 0x01): burst and weights; kept, not used (one queue per core
    /// drains in arrival order).
    pub arbitration: u32,
    /// Error Recovery (0x05): the time-limited error recovery value; kept (no retries here).
    pub error_recovery: u32,
    /// Write Atomicity Normal (0x0a): DN bit; kept (AWUN is 0 anyway).
    pub write_atomicity: u32,
    /// CIDs of held Asynchronous Event Requests.
    pub aers: Vec<u16>,
}

impl AdminState {
    pub fn new(ctrl: Arc<Controller>) -> AdminState {
        AdminState {
            ctrl,
            cc: 0,
            csts: 0,
            async_event_config: 0,
            temperature_threshold: 0x157,
            arbitration: 0,
            error_recovery: 0,
            write_atomicity: 0,
            aers: Vec::new(),
        }
    }

    fn discovery(&self) -> bool {
        self.ctrl.subsys.is_none()
    }

    /// Property Get: (status, value).
    pub fn property_get(&self, offset: u32, size8: bool) -> (Status, u64) {
        let value = match (offset, size8) {
            (prop::CAP, true) => {
                let mqes = u64::from(identify::QUEUE_ENTRIES_MAX - 1);
                let timeout_500ms = 30u64;
                mqes | (1 << 16) | (timeout_500ms << 24) | (1 << 37)
            }
            (prop::VS, false) => 0x0001_0300,
            (prop::CC, false) => u64::from(self.cc),
            (prop::CSTS, false) => u64::from(self.csts),
            _ => return (status::INVALID_FIELD, 0),
        };
        (status::SUCCESS, value)
    }

    /// Property Set (only CC is writable).
    pub fn property_set(&mut self, offset: u32, value: u64) -> Status {
        if offset != prop::CC {
            return status::INVALID_FIELD;
        }
        let new = value as u32;
        if new & CC_EN != 0 && self.cc & CC_EN == 0 {
            self.csts = (self.csts & !CSTS_SHST_COMPLETE) | CSTS_RDY;
        }
        let reset = new & CC_EN == 0 && self.cc & CC_EN != 0;
        let shutdown = new & CC_SHN_MASK != 0 && self.cc & CC_SHN_MASK == 0;
        if reset {
            self.csts &= !CSTS_RDY;
            self.aers.clear();
            // A controller reset starts its reservation notifications afresh (count, masks).
            *self.ctrl.resv_log.lock() = ResvLog::default();
            self.ctrl.resv_pending.store(false, Ordering::Release);
        }
        if reset || shutdown {
            // A reset or shutdown deletes the I/O queues: they see this and close.
            self.ctrl.resets.fetch_add(1, Ordering::Release);
        }
        self.ctrl.enabled.store(new & CC_EN != 0, Ordering::Release);
        if new & CC_SHN_MASK != 0 {
            self.csts |= CSTS_SHST_COMPLETE;
        }
        self.cc = new;
        status::SUCCESS
    }

    /// Executes one admin command.
    pub fn execute(&mut self, target: &Target, sqe: &Sqe) -> Reply {
        self.ctrl.last_seen_ms.store(target.now_ms(), Ordering::Relaxed);
        if self.cc & CC_EN == 0 {
            return Reply::status(status::COMMAND_SEQUENCE);
        }
        match sqe.opcode {
            admin::IDENTIFY => self.identify(sqe),
            admin::GET_LOG_PAGE => self.get_log_page(target, sqe),
            admin::SET_FEATURES => self.set_features(sqe),
            admin::GET_FEATURES => self.get_features(sqe),
            admin::ASYNC_EVENT => {
                if self.aers.len() >= identify::AER_LIMIT {
                    return Reply::status(status::AER_LIMIT);
                }
                self.aers.push(sqe.cid);
                Reply { held: true, ..Reply::default() }
            }
            admin::KEEP_ALIVE => Reply::default(),
            // Commands complete too fast to abort: "not aborted" (dw0 bit 0).
            admin::ABORT => Reply { dw0: 1, ..Reply::default() },
            _ => Reply::status(status::INVALID_OPCODE),
        }
    }

    /// If a notice is pending and an AER is held: the CID to complete, and the event (dw0) —
    /// on an I/O controller [`AEN_NS_CHANGED`] if its host enabled them (AEC bit 8), then
    /// [`AEN_ANA_CHANGE`] (AEC bit 11), then [`AEN_RESV_LOG`] (always: a reservation
    /// notification waits in log page 80h); [`AEN_DISC_CHANGED`] on a discovery controller whose
    /// host enabled it (AEC bit 31). A notice not enabled stays pending until it is (nvmet and
    /// SPDK drop it; a host enabling notices later then hears of the change, and reads the log
    /// it names).
    pub fn take_event(&mut self) -> Option<(u16, u32)> {
        if self.aers.is_empty() {
            return None;
        }
        let ctrl = &self.ctrl;
        let discovery = [(&ctrl.aen_pending, AEN_DISC_CHANGED, AEC_DISC_CHANGED)];
        let io = [
            (&ctrl.aen_pending, AEN_NS_CHANGED, AEC_NS_ATTR),
            (&ctrl.ana_pending, AEN_ANA_CHANGE, AEC_ANA_CHANGE),
            (&ctrl.resv_pending, AEN_RESV_LOG, AEC_ALWAYS),
        ];
        let notices: &[_] = if self.discovery() { &discovery } else { &io };
        let (_, event, _) = notices.iter().find(|(pending, _, enabled)| {
            (*enabled == AEC_ALWAYS || self.async_event_config & enabled != 0)
                && pending.swap(false, Ordering::AcqRel)
        })?;
        let event = *event;
        self.aers.pop().map(|cid| (cid, event))
    }

    fn identify(&self, sqe: &Sqe) -> Reply {
        let cns = (sqe.cdw10 & 0xff) as u8;
        if self.discovery() && cns != 0x01 {
            return Reply::status(status::INVALID_FIELD);
        }
        let subsys = self.ctrl.subsys.as_ref();
        match cns {
            0x01 => Reply::data(identify::controller(&self.ctrl)),
            0x00 | 0x03 => {
                let Some(subsys) = subsys else { return Reply::status(status::INVALID_FIELD) };
                if sqe.nsid == 0 || (sqe.nsid > subsys.max_nsid && sqe.nsid != u32::MAX) {
                    return Reply::status(status::INVALID_NAMESPACE);
                }
                match (subsys.namespace(sqe.nsid), cns) {
                    (Some(ns), 0x00) => Reply::data(identify::namespace(&ns)),
                    (Some(ns), _) => Reply::data(identify::namespace_descriptors(&ns)),
                    // An inactive id: a zeroed structure (Identify Namespace), or an error.
                    (None, 0x00) => Reply::data(vec![0u8; identify::IDENTIFY_LEN]),
                    (None, _) => Reply::status(status::INVALID_NAMESPACE),
                }
            }
            0x02 => match subsys {
                Some(s) if sqe.nsid < 0xffff_fffe => {
                    Reply::data(identify::active_namespaces(s, sqe.nsid))
                }
                _ => Reply::status(status::INVALID_NAMESPACE),
            },
            // The NVM command set's (CSI 0: CDW11 bits 31:24) I/O Command Set specific Identify
            // Controller, which Linux's host asks for its Write Zeroes and Dataset Management
            // limits at every connect: all zero, no limit beyond each command's own fields (a
            // Dataset Management's 256 ranges fit in its capsule), as nvmet answers.
            0x06 if sqe.cdw11 >> 24 == 0 => Reply::data(vec![0u8; identify::IDENTIFY_LEN]),
            _ => Reply::status(status::INVALID_FIELD),
        }
    }

    fn get_log_page(&self, target: &Target, sqe: &Sqe) -> Reply {
        let lid = (sqe.cdw10 & 0xff) as u8;
        let retain = sqe.cdw10 & (1 << 15) != 0;
        let numd = ((sqe.cdw11 & 0xffff) << 16 | (sqe.cdw10 >> 16)) as usize + 1;
        let offset = u64::from(sqe.cdw12) | (u64::from(sqe.cdw13) << 32);
        if lid == LOG_CHANGED_NS && (offset % 4 != 0 || offset > identify::CHANGED_NS_LOG_LEN) {
            // Refused before the read would empty the list (RAE clear): nothing is lost.
            return Reply::status(status::INVALID_FIELD);
        }
        // A log page's size as hosts reckon it, when more than what is built (zeros past it).
        let mut size = 0;
        let page = match (lid, self.discovery()) {
            (LOG_DISCOVERY, true) => {
                identify::discovery_log(target, &self.ctrl.hostnqn, &self.ctrl.via)
            }
            (LOG_ERROR, _) => self.ctrl.errors.lock().page(),
            (LOG_SMART, false) => identify::smart_log(&self.ctrl),
            (LOG_FIRMWARE, false) => identify::firmware_log(),
            (LOG_CHANGED_NS, false) => identify::changed_namespaces_log(&self.ctrl, retain),
            (LOG_EFFECTS, false) => identify::effects_log(),
            (LOG_ANA, false) => {
                let subsys = self.ctrl.subsys.as_ref().expect("an I/O controller's subsystem");
                // LSP bit 0 (CDW10 bit 8): Return Groups Only.
                let groups_only = sqe.cdw10 & (1 << 8) != 0;
                size = crate::ana::log_max_len(subsys.max_nsid);
                subsys.ana.log_page(&self.ctrl.via, || subsys.ana_groups(), groups_only)
            }
            // A read from offset 0 of at least the page's 16 meaningful bytes takes the oldest
            // notification (nvmet's and SPDK's way); any other read (a part, a bad offset
            // refused below) leaves it.
            (LOG_RESERVATION, false) => {
                let take = offset == 0 && (numd * 4).min(sqe.sgl_len as usize) >= 16;
                self.ctrl.resv_log.lock().page(take).to_vec()
            }
            _ => return Reply::status(status::INVALID_LOG_PAGE),
        };
        if offset % 4 != 0 || offset > page.len().max(size) as u64 {
            return Reply::status(status::INVALID_FIELD);
        }
        // NUMD comes from the host: never build more than the host's buffer (the SGL length)
        // or one maximum transfer.
        let len = (numd * 4).min(sqe.sgl_len as usize).min(identify::MAX_TRANSFER_BYTES as usize);
        let start = (offset as usize).min(page.len());
        let mut data = page[start..(start + len).min(page.len())].to_vec();
        data.resize(len, 0);
        Reply::data(data)
    }

    fn set_features(&mut self, sqe: &Sqe) -> Reply {
        let fid = (sqe.cdw10 & 0xff) as u8;
        if sqe.cdw10 & (1 << 31) != 0 {
            return Reply::status(status::FEATURE_NOT_SAVEABLE);
        }
        match fid {
            FEAT_NUM_QUEUES if !self.discovery() => {
                // Spec: after any I/O queue exists, Command Sequence Error (the grant is what
                // the connected queue ids were checked against).
                if !self.ctrl.io_qids.lock().is_empty() {
                    return Reply::status(status::COMMAND_SEQUENCE);
                }
                let nsqr = sqe.cdw11 & 0xffff;
                let ncqr = sqe.cdw11 >> 16;
                if nsqr == 0xffff || ncqr == 0xffff {
                    return Reply::status(status::INVALID_FIELD);
                }
                let max = u32::from(identify::QUEUE_ENTRIES_MAX) - 1;
                let granted = nsqr.min(ncqr).min(max);
                self.ctrl.io_queues_granted.store(granted, Ordering::Relaxed);
                Reply { dw0: granted | (granted << 16), ..Reply::default() }
            }
            FEAT_ASYNC_EVENT => {
                self.async_event_config = sqe.cdw11;
                Reply::default()
            }
            FEAT_KATO => {
                self.ctrl.kato_ms.store(sqe.cdw11, Ordering::Relaxed);
                Reply::default()
            }
            // The cache is always on (writes are durable at Flush or FUA): enabling it is a
            // no-op; turning it off is refused rather than ignored (as Linux's nvmet does).
            FEAT_VWC if !self.discovery() => match sqe.cdw11 & 1 {
                1 => Reply::default(),
                _ => Reply::status(status::INVALID_FIELD),
            },
            FEAT_TEMPERATURE => {
                self.temperature_threshold = sqe.cdw11 & 0xffff;
                Reply::default()
            }
            FEAT_ARBITRATION if !self.discovery() => {
                self.arbitration = sqe.cdw11;
                Reply::default()
            }
            // One power state (NPSS 0), no workload hint: only PS 0 can be set.
            FEAT_POWER_MGMT if !self.discovery() => match sqe.cdw11 & 0x1f {
                0 => Reply::default(),
                _ => Reply::status(status::INVALID_FIELD),
            },
            FEAT_ERROR_RECOVERY if !self.discovery() => {
                // DULBE (bit 16) needs deallocated-block errors we do not report: refused.
                if sqe.cdw11 & (1 << 16) != 0 {
                    return Reply::status(status::INVALID_FIELD);
                }
                self.error_recovery = sqe.cdw11 & 0xffff;
                Reply::default()
            }
            FEAT_WRITE_ATOMICITY if !self.discovery() => {
                self.write_atomicity = sqe.cdw11 & 1;
                Reply::default()
            }
            // Per namespace; NSID FFFFFFFFh sets every namespace's.
            FEAT_RESV_MASK if !self.discovery() => {
                if sqe.cdw11 & !resv_log::MASK_BITS != 0 {
                    return Reply::status(status::INVALID_FIELD);
                }
                if sqe.nsid != u32::MAX && !self.has_namespace(sqe.nsid) {
                    return Reply::status(status::INVALID_NAMESPACE);
                }
                self.ctrl.resv_log.lock().set_mask(sqe.nsid, sqe.cdw11);
                Reply { dw0: sqe.cdw11, ..Reply::default() }
            }
            // PTPL on or off for one namespace (as SPDK; CPTPL of Reservation Register does
            // the same): where it is kept, the response waits until the change is.
            FEAT_RESV_PERSIST if !self.discovery() => {
                let Some(ns) = self.ctrl.subsys.as_ref().and_then(|s| s.namespace(sqe.nsid)) else {
                    return Reply::status(status::INVALID_NAMESPACE);
                };
                match ns.resv.command(|r| r.set_ptpl(sqe.cdw11 & 1 != 0)) {
                    (status::SUCCESS, save) => {
                        let resv_save = save.map(|version| KeptAfter { ns, version });
                        Reply { resv_save, ..Reply::default() }
                    }
                    (st, ..) => Reply::status(st),
                }
            }
            _ => Reply::status(status::INVALID_FIELD),
        }
    }

    /// Whether namespace `nsid` is one of the subsystem's now.
    fn has_namespace(&self, nsid: u32) -> bool {
        self.ctrl.subsys.as_ref().is_some_and(|s| s.namespace(nsid).is_some())
    }

    /// Whether namespace `nsid` keeps its reservations across restarts now (PTPL).
    fn ptpl(&self, nsid: u32) -> Option<bool> {
        let ns = self.ctrl.subsys.as_ref()?.namespace(nsid)?;
        Some(ns.resv.persistence().1)
    }

    fn get_features(&self, sqe: &Sqe) -> Reply {
        let fid = (sqe.cdw10 & 0xff) as u8;
        let dw0 = match fid {
            FEAT_NUM_QUEUES if !self.discovery() => {
                let g = self.ctrl.io_queues_granted.load(Ordering::Relaxed);
                g | (g << 16)
            }
            FEAT_ASYNC_EVENT => self.async_event_config,
            FEAT_KATO => self.ctrl.kato_ms.load(Ordering::Relaxed),
            FEAT_VWC if !self.discovery() => 1,
            FEAT_TEMPERATURE => self.temperature_threshold,
            FEAT_IRQ_COALESCE if !self.discovery() => 0,
            FEAT_ARBITRATION if !self.discovery() => self.arbitration,
            FEAT_POWER_MGMT if !self.discovery() => 0,
            FEAT_ERROR_RECOVERY if !self.discovery() => self.error_recovery,
            FEAT_WRITE_ATOMICITY if !self.discovery() => self.write_atomicity,
            // One namespace's (as nvmet: FFFFFFFFh names none to read).
            FEAT_RESV_MASK if !self.discovery() => {
                if !self.has_namespace(sqe.nsid) {
                    return Reply::status(status::INVALID_NAMESPACE);
                }
                self.ctrl.resv_log.lock().mask(sqe.nsid)
            }
            FEAT_RESV_PERSIST if !self.discovery() => match self.ptpl(sqe.nsid) {
                Some(on) => u32::from(on),
                None => return Reply::status(status::INVALID_NAMESPACE),
            },
            _ => return Reply::status(status::INVALID_FIELD),
        };
        Reply { dw0, ..Reply::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::SqeBuilder;
    use crate::resv::{Notice, NoticeKind};
    use crate::subsys::ListenAddr;
    use ballast_engine::ram::RamDev;

    fn via() -> ListenAddr {
        ListenAddr { traddr: "127.0.0.1".into(), port: 4420 }
    }

    fn setup() -> (Target, AdminState) {
        let t = Target::default();
        let s = t.create_subsystem("nqn.2026-11.dev.ballast:t", true).unwrap();
        t.add_namespace(&s.nqn, 0, Arc::new(RamDev::new(1 << 20)), 4096, "dev").unwrap();
        let c = t.new_controller(Some(s), "nqn.host".into(), [0; 16], 5000, via()).unwrap();
        (t, AdminState::new(c))
    }

    fn cmd(opcode: u8, nsid: u32, cdw: [u32; 6]) -> Sqe {
        let b = SqeBuilder { opcode, cid: 1, nsid, cdw, sgl_len: 4096, ..Default::default() };
        Sqe::decode(&b.encode())
    }

    #[test]
    fn identify_controller_carries_the_given_serial_and_model() {
        use crate::subsys::{Identity, SubsysError};
        let t = Target::default();
        let sn = "SPDK00000000000001";
        let mn = "SPDK_Controller1";
        let identity =
            Identity { serial: Some(sn.into()), model: Some(mn.into()), ..Identity::default() };
        let s = t.create_subsystem_as("nqn.2026-11.dev.ballast:id", true, identity).unwrap();
        let d = t.create_subsystem("nqn.2026-11.dev.ballast:default", true).unwrap();
        let identify = |s| {
            let c = t.new_controller(Some(s), "nqn.host".into(), [0; 16], 5000, via()).unwrap();
            let mut a = AdminState::new(c);
            assert_eq!(a.property_set(prop::CC, 0x0046_0001), status::SUCCESS);
            a.execute(&t, &cmd(admin::IDENTIFY, 0, [1, 0, 0, 0, 0, 0])).data.unwrap()
        };
        let id = identify(s);
        assert_eq!(&id[4..24], format!("{sn:<20}").as_bytes(), "SN, space padded");
        assert_eq!(&id[24..64], format!("{mn:<40}").as_bytes(), "MN, space padded");
        let id = identify(d);
        let serial = std::str::from_utf8(&id[4..24]).unwrap();
        assert_eq!(serial.trim_end().len(), 16, "the default serial: 16 hex digits of the NQN");
        assert!(serial.trim_end().bytes().all(|b| b.is_ascii_hexdigit()), "{serial:?}");
        assert_eq!(&id[24..64], format!("{:<40}", "ballast").as_bytes());
        // SPDK's limits: SN 20 bytes, MN 40, printable ASCII; nothing is created when refused.
        let bad = [
            (Some("x".repeat(21)), None),
            (Some("tab\there".into()), None),
            (None, Some("m".repeat(41))),
            (None, Some("caf\u{e9}".into())),
        ];
        for (serial, model) in bad {
            let nqn = "nqn.2026-11.dev.ballast:bad";
            let r =
                t.create_subsystem_as(nqn, true, Identity { serial, model, ..Identity::default() });
            assert!(matches!(r, Err(SubsysError::BadSerial(_) | SubsysError::BadModel(_))));
            assert!(t.subsystem(nqn).is_none());
        }
        let edge = Identity {
            serial: Some("s".repeat(20)),
            model: Some("m".repeat(40)),
            ..Identity::default()
        };
        assert!(t.create_subsystem_as("nqn.2026-11.dev.ballast:edge", true, edge).is_ok());
    }

    /// Identify Namespace says "write protected" (NSATTR bit 0) exactly for a read-only device.
    #[test]
    fn identify_namespace_says_which_namespaces_are_write_protected() {
        let (t, mut a) = setup();
        let s = t.subsystem("nqn.2026-11.dev.ballast:t").unwrap();
        let ro = Arc::new(RamDev::try_new(1 << 20, true).unwrap());
        assert_eq!(t.add_namespace(&s.nqn, 2, ro, 4096, "dev").unwrap(), 2);
        assert_eq!(a.property_set(prop::CC, 0x0046_0001), status::SUCCESS);
        let nsattr = |a: &mut AdminState, nsid| {
            a.execute(&t, &cmd(admin::IDENTIFY, nsid, [0; 6])).data.unwrap()[99]
        };
        assert_eq!(nsattr(&mut a, 1), 0);
        assert_eq!(nsattr(&mut a, 2), 1);
    }

    /// A Changed Namespace List read refused for its offset empties nothing: the next read
    /// still names the namespace.
    #[test]
    fn a_refused_changed_namespace_read_keeps_the_list() {
        let (t, mut a) = setup();
        assert_eq!(a.property_set(prop::CC, 0x0046_0001), status::SUCCESS);
        let s = t.subsystem("nqn.2026-11.dev.ballast:t").unwrap();
        assert_eq!(
            t.add_namespace(&s.nqn, 3, Arc::new(RamDev::new(1 << 20)), 4096, "d").unwrap(),
            3
        );
        // LID 04h, NUMD 1023 (4 KiB), RAE clear; offset 8192 (beyond the page), then 0.
        let read = |a: &mut AdminState, offset: u32| {
            a.execute(&t, &cmd(admin::GET_LOG_PAGE, 0, [0x03ff_0004, 0, offset, 0, 0, 0]))
        };
        assert_eq!(read(&mut a, 8192).status, status::INVALID_FIELD);
        let log = read(&mut a, 0).data.expect("the log");
        assert_eq!(u32::from_le_bytes(log[0..4].try_into().unwrap()), 3, "still listed");
        let log = read(&mut a, 0).data.expect("the log");
        assert_eq!(u32::from_le_bytes(log[0..4].try_into().unwrap()), 0, "read once: emptied");
    }

    /// Log page 01h shows the controller's recorded errors newest first; the SMART log counts
    /// them all; Identify Controller's ELPE says how many the page holds.
    #[test]
    fn the_error_log_page_shows_recorded_errors_newest_first() {
        use crate::error_log::{ErrorEntry, ENTRY_LEN, PAGE_LEN, SLOTS};
        let (t, mut a) = setup();
        assert_eq!(a.property_set(prop::CC, 0x0046_0001), status::SUCCESS);
        let id = a.execute(&t, &cmd(admin::IDENTIFY, 0, [1, 0, 0, 0, 0, 0])).data.unwrap();
        assert_eq!(usize::from(id[262]) + 1, SLOTS, "ELPE");
        // LID 01h, NUMD 1023: the whole page.
        let read = |a: &mut AdminState| {
            a.execute(&t, &cmd(admin::GET_LOG_PAGE, 0, [0x03ff_0001, 0, 0, 0, 0, 0]))
                .data
                .expect("the error log")
        };
        assert!(read(&mut a).iter().all(|&b| b == 0), "no error yet");
        for (cid, st) in [(5u16, status::INVALID_FIELD), (6, status::INVALID_NAMESPACE)] {
            let bad = Sqe { cid, ..cmd(admin::GET_FEATURES, 9, [0; 6]) };
            a.ctrl.errors.lock().record(ErrorEntry::of(0, &bad, st));
        }
        let log = read(&mut a);
        assert_eq!(log.len(), PAGE_LEN);
        let field = |slot: usize, at: usize| {
            u16::from_le_bytes(log[slot * ENTRY_LEN + at..][..2].try_into().unwrap())
        };
        assert_eq!((log[0], field(0, 10), field(0, 14)), (2, 6, 4), "newest: count 2, cid 6");
        assert_eq!((log[ENTRY_LEN], field(1, 10), field(1, 14)), (1, 5, 0xffff));
        let smart = a.execute(&t, &cmd(admin::GET_LOG_PAGE, 0, [0x007f_0002, 0, 0, 0, 0, 0]));
        let smart = smart.data.unwrap();
        assert_eq!(u64::from_le_bytes(smart[176..184].try_into().unwrap()), 2);
    }

    /// Log page 05h: the commands the controller takes and what they change; Identify's LPA
    /// says it is there (an I/O controller's only).
    #[test]
    fn the_effects_log_lists_what_is_served() {
        let (t, mut a) = setup();
        assert_eq!(a.property_set(prop::CC, 0x0046_0001), status::SUCCESS);
        let id = a.execute(&t, &cmd(admin::IDENTIFY, 0, [1, 0, 0, 0, 0, 0])).data.unwrap();
        assert_eq!(id[261] & 0x02, 0x02, "LPA: Commands Supported and Effects");
        let log = a.execute(&t, &cmd(admin::GET_LOG_PAGE, 0, [0x03ff_0005, 0, 0, 0, 0, 0]));
        let log = log.data.expect("the effects log");
        let at = |i: usize| u32::from_le_bytes(log[i * 4..i * 4 + 4].try_into().unwrap());
        let served: Vec<usize> = (0..256).filter(|&op| at(op) != 0).collect();
        assert_eq!(served, [0x02, 0x06, 0x08, 0x09, 0x0a, 0x0c, 0x18], "admin commands");
        assert!(served.iter().all(|&op| at(op) == 1), "admin commands: supported, no effect");
        assert_eq!((at(256 + 0x01), at(256 + 0x02), at(256 + 0x09)), (3, 1, 3), "write, read, DSM");
        assert_eq!(at(256 + 0x05), 1, "compare: supported, no effect");
        // Each admin opcode listed is answered (not Invalid Opcode), and none unlisted is.
        for op in 0..=255u8 {
            let r = a.execute(&t, &cmd(op, 0, [0; 6]));
            assert_eq!(
                r.status == status::INVALID_OPCODE,
                at(usize::from(op)) == 0,
                "opcode {op:#x}"
            );
        }
    }

    /// Identify CNS 06h for the NVM command set (Linux's host asks at every connect): a
    /// zeroed structure, no limits; another command set: Invalid Field.
    #[test]
    fn identify_cns_6_answers_for_the_nvm_command_set_only() {
        let (t, mut a) = setup();
        assert_eq!(a.property_set(prop::CC, 0x0046_0001), status::SUCCESS);
        let nvm = a.execute(&t, &cmd(admin::IDENTIFY, 0, [6, 0, 0, 0, 0, 0]));
        assert_eq!(nvm.data.expect("the structure"), vec![0u8; identify::IDENTIFY_LEN]);
        let zns = a.execute(&t, &cmd(admin::IDENTIFY, 0, [6, 2 << 24, 0, 0, 0, 0]));
        assert_eq!(zns.status, status::INVALID_FIELD);
    }

    #[test]
    fn smart_data_units_round_the_totals_and_the_write_cache_stays_on() {
        let (t, mut a) = setup();
        assert_eq!(a.property_set(prop::CC, 0x0046_0001), status::SUCCESS);
        // 1000 reads of 4 KiB: 4,096,000 bytes = 8 units of 1000 x 512 bytes (not 1000).
        a.ctrl.bytes_read.fetch_add(1000 * 4096, Ordering::Relaxed);
        a.ctrl.bytes_written.fetch_add(1, Ordering::Relaxed);
        let smart = |a: &mut AdminState| {
            let log =
                a.execute(&t, &cmd(admin::GET_LOG_PAGE, 0xffff_ffff, [0x007f_0002, 0, 0, 0, 0, 0]));
            log.data.unwrap()
        };
        let log = smart(&mut a);
        assert_eq!(u64::from_le_bytes(log[32..40].try_into().unwrap()), 8, "data units read");
        assert_eq!(u64::from_le_bytes(log[48..56].try_into().unwrap()), 1, "rounded up");
        // Number of Queues: granted before any I/O queue exists, refused after.
        let nq = cmd(admin::SET_FEATURES, 0, [7, 3 | (3 << 16), 0, 0, 0, 0]);
        assert_eq!(a.execute(&t, &nq).dw0, 3 | (3 << 16));
        a.ctrl.io_qids.lock().insert(1);
        assert_eq!(a.execute(&t, &nq).status, status::COMMAND_SEQUENCE);
        // Volatile Write Cache: enabling is a no-op, disabling is refused, it reads enabled.
        let vwc = |a: &mut AdminState, on| {
            a.execute(&t, &cmd(admin::SET_FEATURES, 0, [6, on, 0, 0, 0, 0]))
        };
        assert_eq!(vwc(&mut a, 1).status, status::SUCCESS);
        assert_eq!(vwc(&mut a, 0).status, status::INVALID_FIELD);
        assert_eq!(a.execute(&t, &cmd(admin::GET_FEATURES, 0, [6, 0, 0, 0, 0, 0])).dw0, 1);
    }

    /// A discovery controller's host that enabled discovery-change notices (AEC bit 31, as
    /// persistent discovery does) gets 0070F002h when a subsystem or listener comes or goes.
    #[test]
    fn discovery_controllers_hear_of_discovery_log_changes_once_enabled() {
        let t = Target::default();
        let c = t.new_controller(None, "nqn.host".into(), [0; 16], 5000, via()).unwrap();
        let mut a = AdminState::new(c);
        assert_eq!(a.property_set(prop::CC, 0x0046_0001), status::SUCCESS);
        let id = a.execute(&t, &cmd(admin::IDENTIFY, 0, [1, 0, 0, 0, 0, 0])).data.unwrap();
        assert_eq!(u32::from_le_bytes(id[92..96].try_into().unwrap()), 1 << 31, "OAES");
        // A discovery controller has no effects log, and says so.
        assert_eq!(id[261] & 0x02, 0, "LPA bit 1 clear");
        let effects = a.execute(&t, &cmd(admin::GET_LOG_PAGE, 0, [0x03ff_0005, 0, 0, 0, 0, 0]));
        assert_eq!(effects.status, status::INVALID_LOG_PAGE);
        assert!(a.execute(&t, &cmd(admin::ASYNC_EVENT, 0, [0; 6])).held);
        t.create_subsystem("nqn.2026-11.dev.ballast:new", true).unwrap();
        assert_eq!(a.take_event(), None, "not enabled: no notice");
        let aec = cmd(admin::SET_FEATURES, 0, [0x0b, 1 << 31, 0, 0, 0, 0]);
        assert_eq!(a.execute(&t, &aec).status, status::SUCCESS);
        assert_eq!(a.take_event(), Some((1, 0x0070_f002)), "the pending change, once enabled");
        assert_eq!(a.take_event(), None);
        assert!(a.execute(&t, &cmd(admin::ASYNC_EVENT, 0, [0; 6])).held);
        t.add_listener("nqn.2026-11.dev.ballast:new", via()).unwrap();
        assert_eq!(a.take_event(), Some((1, AEN_DISC_CHANGED)));
        // An I/O controller hears nothing of it.
        let (t2, mut io) = setup();
        assert_eq!(io.property_set(prop::CC, 0x0046_0001), status::SUCCESS);
        assert!(io.execute(&t2, &cmd(admin::ASYNC_EVENT, 0, [0; 6])).held);
        t2.create_subsystem("nqn.2026-11.dev.ballast:other", true).unwrap();
        assert_eq!(io.take_event(), None);
    }

    /// ANA: Identify says what Linux's host needs to use it (CMIC bit 3, OAES bit 11, ANATT,
    /// ANACAP, ANAGRPMAX, NANAGRPID, MNAN; ANAGRPID per namespace); the log page is the
    /// controller's own path's; a state set on its listener raises a notice once enabled, on
    /// no controller connected through another listener.
    #[test]
    fn ana_is_reported_per_path_and_changes_are_noticed() {
        use crate::ana::AnaState;
        let (t, mut a) = setup();
        let nqn = "nqn.2026-11.dev.ballast:t";
        let other = ListenAddr { traddr: "127.0.0.1".into(), port: 4421 };
        t.add_listener(nqn, via()).unwrap();
        t.add_listener(nqn, other.clone()).unwrap();
        let s = t.subsystem(nqn).unwrap();
        t.add_namespace_in(nqn, 3, Some(7), Arc::new(RamDev::new(1 << 20)), 4096, "d3").unwrap();
        let c = t.new_controller(Some(s.clone()), "nqn.b".into(), [0; 16], 5000, other.clone());
        let mut b = AdminState::new(c.unwrap());
        for x in [&mut a, &mut b] {
            assert_eq!(x.property_set(prop::CC, 0x0046_0001), status::SUCCESS);
        }
        let id = a.execute(&t, &cmd(admin::IDENTIFY, 0, [1, 0, 0, 0, 0, 0])).data.unwrap();
        let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        assert_eq!(id[76] & 0x0a, 0x0a, "CMIC: several controllers, ANA reporting");
        assert_ne!(le32(&id, 92) & (1 << 11), 0, "OAES: ANA change notices");
        assert_eq!(id[342], crate::ana::ANATT_SECONDS);
        assert_eq!(id[343], crate::ana::ANACAP);
        let nn = le32(&id, 516);
        assert_eq!((le32(&id, 344), le32(&id, 348), le32(&id, 540)), (nn, nn, nn));
        let ns = |a: &mut AdminState, nsid| a.execute(&t, &cmd(admin::IDENTIFY, nsid, [0; 6]));
        assert_eq!(le32(&ns(&mut a, 1).data.unwrap(), 92), 1, "ANAGRPID: its id");
        assert_eq!(le32(&ns(&mut a, 3).data.unwrap(), 92), 7, "ANAGRPID: as given");
        // Log 0Ch, whole (NUMD 0x3ff) and groups only (LSP bit 0).
        let log = |a: &mut AdminState, rgo: u32| {
            let cdw10 = 0x03ff_0000 | (rgo << 8) | 0x0c;
            a.execute(&t, &cmd(admin::GET_LOG_PAGE, 0xffff_ffff, [cdw10, 0, 0, 0, 0, 0]))
                .data
                .unwrap()
        };
        let page = log(&mut a, 0);
        assert_eq!(u16::from_le_bytes([page[8], page[9]]), 2, "groups 1 and 7");
        assert_eq!((le32(&page, 16), le32(&page, 20), page[32]), (1, 1, 0x01));
        assert_eq!((le32(&page, 52), le32(&page, 56), page[68], le32(&page, 84)), (7, 1, 1, 3));
        let count = u64::from_le_bytes(page[..8].try_into().unwrap());
        assert_eq!(le32(&log(&mut a, 1), 20), 0, "RGO: no namespace ids");
        // A namespace added or removed changes what the log lists: its change count moves on.
        t.add_namespace_in(nqn, 4, Some(7), Arc::new(RamDev::new(1 << 20)), 4096, "d4").unwrap();
        let count = {
            let after = u64::from_le_bytes(log(&mut a, 0)[..8].try_into().unwrap());
            assert!(after > count, "added: {count} -> {after}");
            t.remove_namespace(nqn, 4).unwrap();
            let removed = u64::from_le_bytes(log(&mut a, 0)[..8].try_into().unwrap());
            assert!(removed > after, "removed: {after} -> {removed}");
            removed
        };
        // b heard of namespace 4 too; a's notice (of namespaces 3 and 4) is followed below.
        b.ctrl.aen_pending.store(false, Ordering::Relaxed);
        // libnvme reads it in 4 KiB pieces up to its whole size (NANAGRPID and MNAN): zeros.
        let at = |a: &mut AdminState, offset: u32| {
            let cdw10 = 0x03ff_0000 | 0x0c;
            a.execute(&t, &cmd(admin::GET_LOG_PAGE, 0xffff_ffff, [cdw10, 0, offset, 0, 0, 0]))
        };
        let last = (crate::ana::log_max_len(nn) as u32 - 4) & !3;
        for offset in [4096, 8192, last] {
            let r = at(&mut a, offset);
            assert_eq!(r.status, status::SUCCESS, "offset {offset}");
            assert!(r.data.unwrap().iter().all(|&b| b == 0), "offset {offset}: past the groups");
        }
        let past = crate::ana::log_max_len(nn) as u32 + 4;
        assert_eq!(at(&mut a, past).status, status::INVALID_FIELD, "past the whole log");
        // A state on a's listener: a's host hears of it once it enables the notice, b's never.
        for x in [&mut a, &mut b] {
            assert!(x.execute(&t, &cmd(admin::ASYNC_EVENT, 0, [0; 6])).held);
            let aec = cmd(admin::SET_FEATURES, 0, [0x0b, (1 << 8) | (1 << 11), 0, 0, 0, 0]);
            assert_eq!(x.execute(&t, &aec).status, status::SUCCESS);
        }
        // a was told of namespace 3 (b connected after it came): take that first.
        assert_eq!(a.take_event(), Some((1, AEN_NS_CHANGED)));
        assert_eq!(b.take_event(), None);
        assert!(a.execute(&t, &cmd(admin::ASYNC_EVENT, 0, [0; 6])).held);
        t.set_ana_state(nqn, &via(), Some(7), AnaState::Inaccessible).unwrap();
        assert_eq!(a.take_event(), Some((1, AEN_ANA_CHANGE)));
        assert_eq!(AEN_ANA_CHANGE, 0x000c_0302);
        assert_eq!(a.take_event(), None);
        assert_eq!(b.take_event(), None, "another path: nothing changed there");
        let page = log(&mut a, 0);
        assert_eq!((page[32], page[68]), (0x01, 0x03), "group 7 inaccessible on a's path");
        assert!(u64::from_le_bytes(page[..8].try_into().unwrap()) > count, "change count");
        assert_eq!(log(&mut b, 0)[68], 0x01, "still optimized on b's path");
        // Refused: a group past NN, group 0, a listener the subsystem does not use.
        use crate::subsys::SubsysError;
        let set = |g, addr: &ListenAddr| t.set_ana_state(nqn, addr, g, AnaState::Optimized);
        assert!(matches!(set(Some(0), &via()), Err(SubsysError::AnaGroup { .. })));
        assert!(matches!(set(Some(nn + 1), &via()), Err(SubsysError::AnaGroup { .. })));
        let nowhere = ListenAddr { traddr: "127.0.0.1".into(), port: 9 };
        assert!(matches!(set(None, &nowhere), Err(SubsysError::NoListener { .. })));
        let big = Arc::new(RamDev::new(1 << 20));
        let bad = t.add_namespace_in(nqn, 4, Some(nn + 1), big, 4096, "d4");
        assert!(matches!(bad, Err(SubsysError::AnaGroup { .. })));
        assert!(s.namespace(4).is_none(), "nothing added");
        // The listener removed: its controllers end at their next tick, and until then the path
        // still refuses; added again: optimized.
        t.remove_listener(nqn, &via()).unwrap();
        assert_eq!(s.ana.state(&via(), 7), AnaState::Inaccessible);
        t.add_listener(nqn, via()).unwrap();
        assert_eq!(s.ana.state(&via(), 7), AnaState::Optimized);
        assert!(!s.ana.blocked());
        // A listener removed for good: its path refuses while a controller connected through
        // it remains, and is forgotten (nothing blocked) once the last one ends.
        t.set_ana_state(nqn, &other, None, AnaState::Inaccessible).unwrap();
        t.remove_listener(nqn, &other).unwrap();
        assert_eq!(s.ana.state(&other, 1), AnaState::Inaccessible, "b is still connected");
        t.remove_controller(b.ctrl.cntlid);
        assert_eq!(s.ana.state(&other, 1), AnaState::Optimized);
        assert!(!s.ana.blocked(), "a path nobody can use costs nothing");
        // Added with a state: in it before any host connects.
        let third = ListenAddr { traddr: "127.0.0.1".into(), port: 4422 };
        assert!(t.add_listener_in(nqn, third.clone(), Some(AnaState::NonOptimized)).unwrap());
        assert_eq!(s.ana.state(&third, 3), AnaState::NonOptimized);
        let again = t.add_listener_in(nqn, third.clone(), Some(AnaState::Inaccessible)).unwrap();
        assert!(!again, "already listening");
        assert_eq!(s.ana.state(&third, 3), AnaState::NonOptimized, "an existing one keeps its");
    }

    #[test]
    fn enable_then_identify_and_aen() {
        let (t, mut a) = setup();
        assert_eq!(
            a.execute(&t, &cmd(admin::IDENTIFY, 0, [1, 0, 0, 0, 0, 0])).status,
            status::COMMAND_SEQUENCE
        );
        assert_eq!(a.property_set(prop::CC, 0x0046_0001), status::SUCCESS);
        assert_eq!(a.property_get(prop::CSTS, false), (status::SUCCESS, 1));
        let r = a.execute(&t, &cmd(admin::IDENTIFY, 0, [1, 0, 0, 0, 0, 0]));
        let id = r.data.unwrap();
        assert_eq!(u16::from_le_bytes([id[78], id[79]]), a.ctrl.cntlid);
        assert_eq!(u16::from_le_bytes([id[320], id[321]]), identify::KAS_100MS);
        let ns = a.execute(&t, &cmd(admin::IDENTIFY, 1, [0; 6])).data.unwrap();
        assert_eq!(u64::from_le_bytes(ns[0..8].try_into().unwrap()), 256); // 1 MiB / 4 KiB
        assert_eq!(ns[26], 1);
        assert_eq!(
            a.execute(&t, &cmd(admin::IDENTIFY, 7, [3, 0, 0, 0, 0, 0])).status,
            status::INVALID_NAMESPACE
        );
        // AER held, then completed by a namespace change once the host enables the notice
        // (AEC bit 8: Linux sets it from OAES); until then it stays pending.
        assert!(a.execute(&t, &cmd(admin::ASYNC_EVENT, 0, [0; 6])).held);
        assert_eq!(a.take_event(), None);
        let s = t.subsystem("nqn.2026-11.dev.ballast:t").unwrap();
        t.namespace_changed(&s, 1);
        assert_eq!(a.take_event(), None, "namespace notices not enabled");
        let aec = cmd(admin::SET_FEATURES, 0, [0x0b, 1 << 8, 0, 0, 0, 0]);
        assert_eq!(a.execute(&t, &aec).status, status::SUCCESS);
        assert_eq!(a.take_event(), Some((1, AEN_NS_CHANGED)));
        let log =
            a.execute(&t, &cmd(admin::GET_LOG_PAGE, 0, [0x03ff_0004, 0, 0, 0, 0, 0])).data.unwrap();
        assert_eq!(&log[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            a.execute(&t, &cmd(admin::GET_LOG_PAGE, 0, [0x0000_00c0, 0, 0, 0, 0, 0])).status,
            status::INVALID_LOG_PAGE
        );
        assert_eq!(a.execute(&t, &cmd(0x80, 0, [0; 6])).status, status::INVALID_OPCODE);
    }

    #[test]
    fn features() {
        let (t, mut a) = setup();
        a.property_set(prop::CC, 1);
        let r = a.execute(
            &t,
            &cmd(admin::SET_FEATURES, 0, [FEAT_NUM_QUEUES as u32, 0x0003_0003, 0, 0, 0, 0]),
        );
        assert_eq!((r.status, r.dw0), (status::SUCCESS, 0x0003_0003));
        let r = a.execute(&t, &cmd(admin::SET_FEATURES, 0, [FEAT_KATO as u32, 15000, 0, 0, 0, 0]));
        assert_eq!(r.status, status::SUCCESS);
        assert_eq!(a.ctrl.kato_ms.load(Ordering::Relaxed), 15000);
        let r = a.execute(&t, &cmd(admin::SET_FEATURES, 0, [0x99, 0, 0, 0, 0, 0]));
        assert_eq!(r.status, status::INVALID_FIELD);
    }

    /// Reservation features: the notification mask is kept per namespace (only its three
    /// bits), persistence through power loss reads off and cannot be turned on; the
    /// notification log reads empty until a notice for this controller's host, which raises
    /// an event unless masked and is read once.
    #[test]
    fn reservation_features_and_log() {
        let (t, mut a) = setup();
        a.property_set(prop::CC, 1);
        let feat = |a: &mut AdminState, op: u8, fid: u8, v: u32| {
            let r = a.execute(&t, &cmd(op, 1, [fid as u32, v, 0, 0, 0, 0]));
            (r.status, r.dw0)
        };
        assert_eq!(feat(&mut a, admin::SET_FEATURES, FEAT_RESV_MASK, 0b0110).0, status::SUCCESS);
        assert_eq!(feat(&mut a, admin::GET_FEATURES, FEAT_RESV_MASK, 0), (status::SUCCESS, 0b0110));
        assert_eq!(feat(&mut a, admin::SET_FEATURES, FEAT_RESV_MASK, 1).0, status::INVALID_FIELD);
        assert_eq!(feat(&mut a, admin::GET_FEATURES, FEAT_RESV_MASK, 0).1, 0b0110, "unchanged");
        assert_eq!(feat(&mut a, admin::GET_FEATURES, FEAT_RESV_PERSIST, 0), (status::SUCCESS, 0));
        assert_eq!(
            feat(&mut a, admin::SET_FEATURES, FEAT_RESV_PERSIST, 1).0,
            status::INVALID_FIELD
        );
        assert_eq!(feat(&mut a, admin::SET_FEATURES, FEAT_RESV_PERSIST, 0).0, status::SUCCESS);
        let all = cmd(admin::SET_FEATURES, u32::MAX, [FEAT_RESV_PERSIST as u32, 1, 0, 0, 0, 0]);
        assert_eq!(a.execute(&t, &all).status, status::INVALID_NAMESPACE, "one namespace only");
        let mut log =
            cmd(admin::GET_LOG_PAGE, 0, [(15 << 16) | LOG_RESERVATION as u32, 0, 0, 0, 0, 0]);
        log.sgl_len = 64;
        let r = a.execute(&t, &log);
        assert_eq!((r.status, r.data), (status::SUCCESS, Some(vec![0u8; 64])), "none yet");

        // The mask is per namespace: one the subsystem lacks is refused; FFFFFFFFh sets all.
        let on = |a: &mut AdminState, op: u8, nsid: u32, v: u32| {
            let r = a.execute(&t, &cmd(op, nsid, [FEAT_RESV_MASK as u32, v, 0, 0, 0, 0]));
            (r.status, r.dw0)
        };
        assert_eq!(on(&mut a, admin::SET_FEATURES, 9, 0).0, status::INVALID_NAMESPACE);
        assert_eq!(on(&mut a, admin::GET_FEATURES, 9, 0).0, status::INVALID_NAMESPACE);
        assert_eq!(on(&mut a, admin::SET_FEATURES, u32::MAX, 0b1000).0, status::SUCCESS);
        assert_eq!(on(&mut a, admin::GET_FEATURES, 1, 0), (status::SUCCESS, 0b1000));

        // A notification for this controller's host: an event (no AEC bit needed), then the
        // log page gives it once; a masked kind raises nothing.
        let host = a.ctrl.hostid;
        let notice = |kind| Notice { host, kind };
        assert!(a.execute(&t, &cmd(admin::ASYNC_EVENT, 0, [0; 6])).held);
        t.reservation_notices(
            "nqn.2026-11.dev.ballast:t",
            1,
            &[notice(NoticeKind::ReservationPreempted)],
        );
        assert_eq!(a.take_event(), None, "masked: no event");
        t.reservation_notices(
            "nqn.2026-11.dev.ballast:t",
            1,
            &[
                notice(NoticeKind::RegistrationPreempted),
                Notice { host: [0x77; 16], ..notice(NoticeKind::ReservationReleased) },
            ],
        );
        assert_eq!(a.take_event(), Some((1, AEN_RESV_LOG)));
        // A part of the page, or a read past its start, leaves the notification; a bad offset
        // is refused without taking it.
        let mut part =
            cmd(admin::GET_LOG_PAGE, 0, [(1 << 16) | LOG_RESERVATION as u32, 0, 0, 0, 0, 0]);
        part.sgl_len = 8;
        assert_eq!(a.execute(&t, &part).data.unwrap()[..8], [1, 0, 0, 0, 0, 0, 0, 0]);
        let past =
            cmd(admin::GET_LOG_PAGE, 0, [(3 << 16) | LOG_RESERVATION as u32, 0, 16, 0, 0, 0]);
        assert_eq!(a.execute(&t, &past).data, Some(vec![0u8; 16]));
        let odd = cmd(admin::GET_LOG_PAGE, 0, [(3 << 16) | LOG_RESERVATION as u32, 0, 2, 0, 0, 0]);
        assert_eq!(a.execute(&t, &odd).status, status::INVALID_FIELD);
        assert_eq!(on(&mut a, admin::GET_FEATURES, u32::MAX, 0).0, status::INVALID_NAMESPACE);
        let page = a.execute(&t, &log).data.unwrap();
        assert_eq!(u64::from_le_bytes(page[..8].try_into().unwrap()), 1, "log page count");
        assert_eq!((page[8], page[9], &page[12..16]), (1, 0, &[1, 0, 0, 0][..]));
        assert_eq!(
            a.execute(&t, &log).data,
            Some(vec![0u8; 64]),
            "read once; another host's not here"
        );
        // A controller reset starts afresh: masks cleared, counts from 1 again.
        let ns1 = |kind| t.reservation_notices("nqn.2026-11.dev.ballast:t", 1, &[notice(kind)]);
        ns1(NoticeKind::ReservationReleased);
        a.property_set(prop::CC, 0);
        a.property_set(prop::CC, 1);
        assert_eq!(on(&mut a, admin::GET_FEATURES, 1, 0), (status::SUCCESS, 0));
        assert_eq!(a.execute(&t, &log).data, Some(vec![0u8; 64]), "dropped by the reset");
        ns1(NoticeKind::ReservationPreempted);
        assert_eq!(a.execute(&t, &log).data.unwrap()[..9], [1, 0, 0, 0, 0, 0, 0, 0, 3]);
    }

    /// The mandatory features SPDK's identify asks for: Arbitration, Power Management, Error
    /// Recovery, Write Atomicity Normal — get answers, set keeps what is valid.
    #[test]
    fn mandatory_features() {
        let (t, mut a) = setup();
        a.property_set(prop::CC, 1);
        let get = |a: &mut AdminState, fid: u8| {
            let r = a.execute(&t, &cmd(admin::GET_FEATURES, 0, [fid as u32, 0, 0, 0, 0, 0]));
            (r.status, r.dw0)
        };
        for fid in [FEAT_ARBITRATION, FEAT_POWER_MGMT, FEAT_ERROR_RECOVERY, FEAT_WRITE_ATOMICITY] {
            assert_eq!(get(&mut a, fid), (status::SUCCESS, 0), "feature {fid:#x}");
        }
        let set = |a: &mut AdminState, fid: u8, v: u32| {
            a.execute(&t, &cmd(admin::SET_FEATURES, 0, [fid as u32, v, 0, 0, 0, 0])).status
        };
        assert_eq!(set(&mut a, FEAT_ARBITRATION, 0x0302_0103), status::SUCCESS);
        assert_eq!(get(&mut a, FEAT_ARBITRATION), (status::SUCCESS, 0x0302_0103));
        assert_eq!(set(&mut a, FEAT_ERROR_RECOVERY, 30), status::SUCCESS);
        assert_eq!(get(&mut a, FEAT_ERROR_RECOVERY), (status::SUCCESS, 30));
        assert_eq!(set(&mut a, FEAT_ERROR_RECOVERY, 1 << 16), status::INVALID_FIELD);
        assert_eq!(set(&mut a, FEAT_WRITE_ATOMICITY, 1), status::SUCCESS);
        assert_eq!(get(&mut a, FEAT_WRITE_ATOMICITY), (status::SUCCESS, 1));
        assert_eq!(set(&mut a, FEAT_POWER_MGMT, 0), status::SUCCESS);
        assert_eq!(set(&mut a, FEAT_POWER_MGMT, 1), status::INVALID_FIELD, "one power state");
    }
}
