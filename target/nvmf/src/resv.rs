//! NVMe reservations of one namespace (Base Specification 2.0, §8.19): who is registered with
//! which key, who holds which kind of reservation, and what that lets each host do. Pure: the
//! queue glue hands it a command's dwords, its data and the issuing host's identifier, and
//! sends back the status (and, for a report, the bytes) it decides; nothing here does I/O.
//!
//! Hosts are told apart by their 128-bit Host Identifier (the Connect command's HOSTID):
//! every controller of one host shares its registration and its reservation, as the
//! specification asks and Linux's nvmet and SPDK do.
//!
//! Invariants (asserted by [`Reservations::assert_invariants`] after every change):
//! - at most one registration per host, at most the namespace's limit in all
//!   (`--nvmf-max-registrants`, [`REGISTRANTS_DEFAULT`]);
//! - a reservation exists only with a registered holder: for the holder-of-one types
//!   (1–4) that host is a registrant; for the all-registrants types (5, 6) every registrant
//!   holds it and it ends with the last registration;
//! - the generation moves on with every successful Register, Preempt and Clear (the
//!   specification's PRgeneration), never otherwise.
//!
//! Persist Through Power Loss (PTPL): where the namespace has somewhere to keep its table
//! (`persistent`: the daemon's pool, [`ResvStore`]), a Register with CPTPL 11b turns it on and
//! 10b off; while it is on, every change is written there (in [`Reservations::encode`]'s form,
//! at most [`PTPL_REGISTRANTS_MAX`] registrations) before the command that made it completes,
//! and a restart finds the table again. Elsewhere CPTPL is accepted and has no effect (PTPLS
//! reads 0), as Linux's nvmet does: Linux's own reservation calls always ask for it.
//!
//! Notifications (§8.19.x, as Linux's nvmet raises them): a command that takes something from
//! another host leaves a [`Notice`] for it ([`Reservations::take_notices`]) — Registration
//! Preempted for a host whose registration a Preempt removed; Reservation Released for the
//! other registrants when a registrants-only or all-registrants reservation is released (by
//! Release, or by its holder unregistering from a registrants-only one) and when a Preempt
//! with the holder's key changes a one-holder reservation's type; Reservation Preempted for
//! the other registrants of a Clear. Never for the issuing host, never for a
//! command that fails; at most one per registrant per command. The queue glue hands them to the
//! hosts' controllers ([`crate::resv_log`]).

use crate::nvme::{io, status, Status};

/// Registrations one namespace keeps at most unless told otherwise: a host past the limit is
/// refused its Register (Internal Error), and a report never exceeds 64 + 64 × the limit bytes.
pub const REGISTRANTS_DEFAULT: usize = 64;
/// The largest limit that may be set (a report of it: 64 KiB).
pub const REGISTRANTS_LIMIT_MAX: usize = 1023;
/// Registrations a table kept across restarts holds at most (its encoded form must fit one
/// configuration entry of the pool); past it a Register is refused as past the limit.
pub const PTPL_REGISTRANTS_MAX: usize = 64;

/// Where namespaces' reservation tables are kept across restarts (the daemon's pool).
/// Blocking: `load` is called by control threads (a namespace added), `save` by the target's
/// saver thread ([`crate::resv_cell::ResvSaver`]); never on a data core.
pub trait ResvStore: Send + Sync {
    /// The table kept for namespace `nsid` of subsystem `nqn`, if any.
    fn load(&self, nqn: &str, nsid: u32) -> Option<Vec<u8>>;
    /// Keeps `table` (None: forgets it) durably before returning; a message saying why not.
    fn save(&self, nqn: &str, nsid: u32, table: Option<&[u8]>) -> Result<(), String>;
}

/// Why a kept table could not be read back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResvDecodeError {
    #[error("reservation table of {0} bytes: truncated or with bytes to spare")]
    Length(usize),
    #[error("reservation table version {0} is not one this build reads")]
    Version(u8),
    #[error("reservation table of another namespace (its NGUID differs)")]
    OtherNamespace,
    #[error("reservation table is inconsistent: {0}")]
    Inconsistent(&'static str),
}

/// The encoded table's version byte.
const ENCODING_VERSION: u8 = 1;
/// Bytes of the encoded table before its registrants, and per registrant.
const ENCODED_HEADER: usize = 1 + 1 + 1 + 1 + 16 + 4 + 16 + 2;
const ENCODED_ENTRY: usize = 16 + 8;

/// Reservation Conflict (generic status 83h).
pub const RESERVATION_CONFLICT: Status = 0x083;
/// Host Identifier Inconsistent Format (generic status 18h): a report without the extended
/// data structure cannot carry 128-bit host identifiers.
pub const HOST_ID_INCONSISTENT: Status = 0x018;

/// Identify Namespace RESCAP: the six types, and Ignore Existing Key as NVMe 1.3 defines it.
pub const RESCAP: u8 = 0b1111_1110;

/// Bytes of a report's extended header, and of each extended registrant entry.
const EXT_HEADER_LEN: usize = 64;
const EXT_ENTRY_LEN: usize = 64;

/// Reported as the controller id of every registrant: the dynamic controller model's 0xFFFF.
const CNTLID_DYNAMIC: u16 = 0xffff;

/// A reservation type (RTYPE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    WriteExclusive = 1,
    ExclusiveAccess = 2,
    WriteExclusiveRegistrantsOnly = 3,
    ExclusiveAccessRegistrantsOnly = 4,
    WriteExclusiveAllRegistrants = 5,
    ExclusiveAccessAllRegistrants = 6,
}

impl Kind {
    fn from_rtype(rtype: u32) -> Option<Kind> {
        Some(match rtype {
            1 => Kind::WriteExclusive,
            2 => Kind::ExclusiveAccess,
            3 => Kind::WriteExclusiveRegistrantsOnly,
            4 => Kind::ExclusiveAccessRegistrantsOnly,
            5 => Kind::WriteExclusiveAllRegistrants,
            6 => Kind::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    /// Every registrant holds it (types 5 and 6).
    fn all_registrants(self) -> bool {
        matches!(self, Kind::WriteExclusiveAllRegistrants | Kind::ExclusiveAccessAllRegistrants)
    }

    /// Reads by others are refused too (the exclusive-access types).
    fn excludes_reads(self) -> bool {
        matches!(
            self,
            Kind::ExclusiveAccess
                | Kind::ExclusiveAccessRegistrantsOnly
                | Kind::ExclusiveAccessAllRegistrants
        )
    }

    /// Registrants that do not hold it may still do what it guards (types 3–6).
    fn admits_registrants(self) -> bool {
        !matches!(self, Kind::WriteExclusive | Kind::ExclusiveAccess)
    }
}

/// What a command does to the namespace's data, as reservations sort commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The read command group: Read.
    Read,
    /// The write command group: Write, Write Zeroes, Dataset Management, Flush.
    Write,
}

impl Access {
    /// The group of I/O command `opcode`, if reservations guard it.
    pub fn of_opcode(opcode: u8) -> Option<Access> {
        match opcode {
            io::READ | io::COMPARE => Some(Access::Read),
            io::WRITE | io::WRITE_ZEROES | io::DSM | io::FLUSH => Some(Access::Write),
            _ => None,
        }
    }
}

pub type HostId = [u8; 16];

/// What happened to a host's registration or reservation (the Reservation Notification log
/// page's type; the Reservation Notification Mask feature's bit of the same number masks it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    RegistrationPreempted = 1,
    ReservationReleased = 2,
    ReservationPreempted = 3,
}

/// A notification owed to `host` (every controller of it on the namespace's subsystem).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice {
    pub host: HostId,
    pub kind: NoticeKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Registrant {
    host: HostId,
    key: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// One host holds it (types 1–4).
    One(HostId),
    /// Every registrant holds it (types 5 and 6).
    AllRegistrants,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    kind: Kind,
    holder: Holder,
}

/// A namespace's reservations as the control plane sees them ([`Reservations::status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResvStatus {
    pub generation: u32,
    /// The reservation's type (1–6), if one is held.
    pub rtype: Option<u8>,
    pub ptpl: bool,
    /// The table can be kept across restarts (a pool serves the namespace).
    pub persistent: bool,
    /// Registrants in registration order, and whether each holds the reservation.
    pub registrants: Vec<(HostId, bool)>,
}

/// One namespace's registrations and reservation.
#[derive(Debug, Clone)]
pub struct Reservations {
    /// Registrations kept at most.
    limit: usize,
    /// The table may be kept across restarts (RESCAP bit 0).
    persistent: bool,
    /// Persist Through Power Loss is on: every change is kept before it completes.
    ptpl: bool,
    generation: u32,
    /// In registration order (a report lists them so).
    registrants: Vec<Registrant>,
    held: Option<Held>,
    /// Raised by the last successful command, until taken.
    notices: Vec<Notice>,
}

/// The 16 bytes of a Register's data: current and new key.
/// The keys a command's data carries (current key, bytes 0-7; the other, 8-15, or 0), if it
/// has the `need` bytes its command takes.
fn keys(data: &[u8], need: usize) -> Option<(u64, u64)> {
    if data.len() < need {
        return None;
    }
    let k = |at: usize| data.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    Some((k(0)?, k(8).unwrap_or(0)))
}

impl Default for Reservations {
    fn default() -> Self {
        Reservations::with_limit(REGISTRANTS_DEFAULT)
    }
}

impl Reservations {
    /// No registrations yet; at most `limit` (1..=[`REGISTRANTS_LIMIT_MAX`]) ever.
    pub fn with_limit(limit: usize) -> Reservations {
        assert!((1..=REGISTRANTS_LIMIT_MAX).contains(&limit), "registrant limit {limit}");
        Reservations {
            limit,
            persistent: false,
            ptpl: false,
            generation: 0,
            registrants: Vec::new(),
            held: None,
            notices: Vec::new(),
        }
    }

    /// The same, for a namespace whose table can be kept across restarts.
    pub fn persistent(mut self) -> Reservations {
        self.persistent = true;
        self
    }

    /// Whether the table can be kept across restarts (RESCAP bit 0).
    pub fn can_persist(&self) -> bool {
        self.persistent
    }

    /// Whether Persist Through Power Loss is on.
    pub fn ptpl(&self) -> bool {
        self.ptpl
    }

    /// Set Features Reservation Persistence (83h): turns PTPL on or off as CPTPL 11b / 10b
    /// would, without a registration — where the table can be kept (else on is Invalid Field;
    /// off is taken and changes nothing), and on only while the registrations fit a kept
    /// table. The generation does not move (no registration or reservation changed).
    pub fn set_ptpl(&mut self, on: bool) -> Status {
        self.notices.clear();
        let st = if on && (!self.persistent || self.registrants.len() > PTPL_REGISTRANTS_MAX) {
            status::INVALID_FIELD
        } else {
            self.ptpl = on;
            status::SUCCESS
        };
        self.settle(st)
    }

    /// Registrations admitted at most now.
    fn admits(&self) -> usize {
        if self.ptpl {
            self.limit.min(PTPL_REGISTRANTS_MAX)
        } else {
            self.limit
        }
    }

    /// The table as it is kept (PTPL): version, PTPL, type, holder, generation, the
    /// namespace's NGUID, registrants in order.
    pub fn encode(&self, nguid: &[u8; 16]) -> Vec<u8> {
        let mut b = Vec::with_capacity(ENCODED_HEADER + ENCODED_ENTRY * self.registrants.len());
        b.push(ENCODING_VERSION);
        b.push(u8::from(self.ptpl));
        b.push(self.held.map_or(0, |h| h.kind as u8));
        let (flag, host) = match self.held.map(|h| h.holder) {
            None => (0, [0; 16]),
            Some(Holder::One(h)) => (1, h),
            Some(Holder::AllRegistrants) => (2, [0; 16]),
        };
        b.push(flag);
        b.extend_from_slice(&host);
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(nguid);
        b.extend_from_slice(&(self.registrants.len() as u16).to_le_bytes());
        for r in &self.registrants {
            b.extend_from_slice(&r.host);
            b.extend_from_slice(&r.key.to_le_bytes());
        }
        b
    }

    /// A kept table back, for the namespace with `nguid`, admitting at most `limit`
    /// registrations from now on (it may hold more, kept under a larger limit: none is lost).
    /// The result is persistent.
    pub fn decode(
        bytes: &[u8],
        nguid: &[u8; 16],
        limit: usize,
    ) -> Result<Reservations, ResvDecodeError> {
        use ResvDecodeError::*;
        if bytes.len() < ENCODED_HEADER {
            return Err(Length(bytes.len()));
        }
        if bytes[0] != ENCODING_VERSION {
            return Err(Version(bytes[0]));
        }
        let count = usize::from(u16::from_le_bytes([bytes[40], bytes[41]]));
        if bytes.len() != ENCODED_HEADER + ENCODED_ENTRY * count {
            return Err(Length(bytes.len()));
        }
        if count > PTPL_REGISTRANTS_MAX {
            return Err(Inconsistent("more registrations than a kept table holds"));
        }
        if bytes[24..40] != nguid[..] {
            return Err(OtherNamespace);
        }
        let mut r = Reservations::with_limit(limit).persistent();
        r.ptpl = match bytes[1] {
            0 => false,
            1 => true,
            _ => return Err(Inconsistent("PTPL neither 0 nor 1")),
        };
        r.generation = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
        let mut seen = std::collections::HashSet::with_capacity(count);
        for e in bytes[ENCODED_HEADER..].chunks_exact(ENCODED_ENTRY) {
            let host: HostId = e[..16].try_into().expect("16 bytes");
            if !seen.insert(host) {
                return Err(Inconsistent("a host registered twice"));
            }
            let key = u64::from_le_bytes(e[16..24].try_into().expect("8 bytes"));
            r.registrants.push(Registrant { host, key });
        }
        let holder_host: HostId = bytes[4..20].try_into().expect("16 bytes");
        if bytes[3] != 1 && holder_host != [0; 16] {
            return Err(Inconsistent("a holder's host without a one-holder reservation"));
        }
        r.held = match (bytes[2], bytes[3]) {
            (0, 0) => None,
            (t, 1) => match Kind::from_rtype(u32::from(t)) {
                Some(kind) if !kind.all_registrants() && seen.contains(&holder_host) => {
                    Some(Held { kind, holder: Holder::One(holder_host) })
                }
                _ => return Err(Inconsistent("a holder that is no registrant, or a wrong type")),
            },
            (t, 2) => match Kind::from_rtype(u32::from(t)) {
                Some(kind) if kind.all_registrants() && count > 0 => {
                    Some(Held { kind, holder: Holder::AllRegistrants })
                }
                _ => {
                    return Err(Inconsistent("an all-registrants reservation without registrants"))
                }
            },
            _ => return Err(Inconsistent("an unknown holder")),
        };
        // A table kept under a larger limit keeps its registrations; new ones wait for room.
        r.limit = r.limit.max(count);
        r.assert_invariants();
        Ok(r)
    }

    /// The longest report: every registrant the limit allows (a longer buffer gets this much).
    pub fn report_max(&self) -> usize {
        EXT_HEADER_LEN + EXT_ENTRY_LEN * self.limit
    }

    /// Whether a reservation is held (while none is, every host may do everything).
    pub fn held(&self) -> bool {
        self.held.is_some()
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    fn registrant(&self, host: &HostId) -> Option<&Registrant> {
        self.registrants.iter().find(|r| r.host == *host)
    }

    fn holds(&self, host: &HostId) -> bool {
        match self.held {
            Some(Held { holder: Holder::One(h), .. }) => h == *host,
            Some(Held { holder: Holder::AllRegistrants, .. }) => self.registrant(host).is_some(),
            None => false,
        }
    }

    /// Whether `host` may do `access` now; Reservation Conflict if not.
    pub fn check(&self, host: &HostId, access: Access) -> Result<(), Status> {
        let Some(held) = self.held else { return Ok(()) };
        if self.holds(host) {
            return Ok(());
        }
        let guarded = access == Access::Write || held.kind.excludes_reads();
        if !guarded || (held.kind.admits_registrants() && self.registrant(host).is_some()) {
            return Ok(());
        }
        Err(RESERVATION_CONFLICT)
    }

    /// Removes `host`'s registration; a reservation it held alone ends with it, and an
    /// all-registrants one ends with the last registrant.
    fn unregister(&mut self, host: &HostId) {
        self.registrants.retain(|r| r.host != *host);
        match self.held {
            Some(Held { holder: Holder::One(h), .. }) if h == *host => self.held = None,
            Some(Held { holder: Holder::AllRegistrants, .. }) if self.registrants.is_empty() => {
                self.held = None
            }
            _ => {}
        }
    }

    /// Unregisters every host but `except` whose key is `key`, each but `by` (the issuer) told
    /// its registration was preempted; whether any was.
    fn unregister_keyed(&mut self, key: u64, except: Option<&HostId>, by: &HostId) -> bool {
        let gone: Vec<HostId> = self
            .registrants
            .iter()
            .filter(|r| r.key == key && Some(&r.host) != except)
            .map(|r| r.host)
            .collect();
        for h in &gone {
            self.unregister(h);
            self.notify(*h, by, NoticeKind::RegistrationPreempted);
        }
        !gone.is_empty()
    }

    /// A notice for `host`, unless it is the issuer `by`.
    fn notify(&mut self, host: HostId, by: &HostId, kind: NoticeKind) {
        if host != *by {
            self.notices.push(Notice { host, kind });
        }
    }

    /// A notice for every registrant but the issuer `by`.
    fn notify_registrants(&mut self, by: &HostId, kind: NoticeKind) {
        let hosts: Vec<HostId> = self.registrants.iter().map(|r| r.host).collect();
        for h in hosts {
            self.notify(h, by, kind);
        }
    }

    /// The notices the last command raised (none if it failed), handed over once.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    fn take(&mut self, host: &HostId, kind: Kind) {
        let holder =
            if kind.all_registrants() { Holder::AllRegistrants } else { Holder::One(*host) };
        self.held = Some(Held { kind, holder });
    }

    /// Reservation Register (opcode 0Dh): CDW10 bits 2:0 the action (0 register, 1 unregister,
    /// 2 replace), bit 3 Ignore Existing Key, bits 31:30 Change Persist Through Power Loss;
    /// `data` the current key (bytes 0–7) and the new one (8–15).
    pub fn register(&mut self, host: &HostId, cdw10: u32, data: &[u8]) -> Status {
        self.notices.clear();
        let st = self.do_register(host, cdw10, data);
        if st == status::SUCCESS {
            self.generation = self.generation.wrapping_add(1);
        }
        self.settle(st)
    }

    /// After a command: the invariants hold, and a failed command raised no notice.
    fn settle(&mut self, st: Status) -> Status {
        if st != status::SUCCESS {
            assert!(self.notices.is_empty(), "a failed command raised notices");
        }
        self.assert_invariants();
        st
    }

    fn do_register(&mut self, host: &HostId, cdw10: u32, data: &[u8]) -> Status {
        let ignore_key = cdw10 & (1 << 3) != 0;
        // CPTPL: 00b no change, 01b reserved, 10b off, 11b on (where the table can be kept).
        let cptpl = cdw10 >> 30;
        if cptpl == 1 {
            return status::INVALID_FIELD;
        }
        let ptpl = match cptpl {
            2 => false,
            3 => self.persistent,
            _ => self.ptpl,
        };
        if ptpl && self.registrants.len() > PTPL_REGISTRANTS_MAX {
            return status::INVALID_FIELD;
        }
        let Some((current, new)) = keys(data, 16) else {
            return status::SGL_DATA_LENGTH_INVALID;
        };
        let st = self.register_action(host, cdw10, ignore_key, current, new);
        if st == status::SUCCESS {
            self.ptpl = ptpl;
        }
        st
    }

    fn register_action(
        &mut self,
        host: &HostId,
        cdw10: u32,
        ignore_key: bool,
        current: u64,
        new: u64,
    ) -> Status {
        let existing = self.registrant(host).copied();
        match cdw10 & 0x7 {
            0 => match existing {
                Some(r) if r.key == new => status::SUCCESS,
                Some(_) => RESERVATION_CONFLICT,
                None if self.registrants.len() >= self.admits() => status::INTERNAL,
                None => {
                    self.registrants.push(Registrant { host: *host, key: new });
                    status::SUCCESS
                }
            },
            1 => match existing {
                Some(r) if ignore_key || r.key == current => {
                    // A registrants-only reservation ends with its holder: the others hear.
                    let released = matches!(self.held, Some(Held { holder: Holder::One(h), kind })
                        if h == *host && kind.admits_registrants());
                    self.unregister(host);
                    if released {
                        self.notify_registrants(host, NoticeKind::ReservationReleased);
                    }
                    status::SUCCESS
                }
                _ => RESERVATION_CONFLICT,
            },
            2 => match existing {
                Some(r) if ignore_key || r.key == current => {
                    let r = self.registrants.iter_mut().find(|r| r.host == *host).unwrap();
                    r.key = new;
                    status::SUCCESS
                }
                _ => RESERVATION_CONFLICT,
            },
            _ => status::INVALID_FIELD,
        }
    }

    /// What Acquire and Release check first: Ignore Existing Key is refused (as NVMe 1.3 on),
    /// the data carries `need` bytes, and its current key is the host's registered one. The
    /// data's other key (0 if it has none).
    fn keyed(&self, host: &HostId, cdw10: u32, data: &[u8], need: usize) -> Result<u64, Status> {
        if cdw10 & (1 << 3) != 0 {
            return Err(status::INVALID_FIELD);
        }
        let (current, other) = keys(data, need).ok_or(status::SGL_DATA_LENGTH_INVALID)?;
        if self.registrant(host).is_none_or(|r| r.key != current) {
            return Err(RESERVATION_CONFLICT);
        }
        Ok(other)
    }

    /// Reservation Acquire (opcode 11h): CDW10 bits 2:0 the action (0 acquire, 1 preempt,
    /// 2 preempt and abort), bit 3 Ignore Existing Key (refused, as NVMe 1.3 on), bits 15:8
    /// the type; `data` the current key (0–7) and the key to preempt (8–15).
    pub fn acquire(&mut self, host: &HostId, cdw10: u32, data: &[u8]) -> Status {
        self.notices.clear();
        let st = self.do_acquire(host, cdw10, data);
        self.settle(st)
    }

    fn do_acquire(&mut self, host: &HostId, cdw10: u32, data: &[u8]) -> Status {
        let Some(kind) = Kind::from_rtype((cdw10 >> 8) & 0xff) else {
            return status::INVALID_FIELD;
        };
        let preempt = match self.keyed(host, cdw10, data, 16) {
            Ok(other) => other,
            Err(st) => return st,
        };
        match cdw10 & 0x7 {
            0 => match self.held {
                None => {
                    self.take(host, kind);
                    status::SUCCESS
                }
                Some(h) if h.kind == kind && self.holds(host) => status::SUCCESS,
                Some(_) => RESERVATION_CONFLICT,
            },
            // Preempt and abort: commands of the preempted hosts already executing finish
            // (this target aborts none; the specification lets it).
            1 | 2 => {
                let st = self.preempt(host, kind, preempt);
                if st == status::SUCCESS {
                    self.generation = self.generation.wrapping_add(1);
                }
                st
            }
            _ => status::INVALID_FIELD,
        }
    }

    fn preempt(&mut self, host: &HostId, kind: Kind, key: u64) -> Status {
        let Some(held) = self.held else {
            // Nothing held: the registrations under `key` go.
            return if self.unregister_keyed(key, None, host) {
                status::SUCCESS
            } else {
                RESERVATION_CONFLICT
            };
        };
        if held.kind.all_registrants() {
            if key == 0 {
                // Every other registrant goes; the issuer holds the new reservation.
                let others: Vec<HostId> =
                    self.registrants.iter().map(|r| r.host).filter(|h| h != host).collect();
                for h in &others {
                    self.unregister(h);
                    self.notify(*h, host, NoticeKind::RegistrationPreempted);
                }
                self.take(host, kind);
                return status::SUCCESS;
            }
            return if self.unregister_keyed(key, None, host) {
                status::SUCCESS
            } else {
                RESERVATION_CONFLICT
            };
        }
        let Holder::One(holder) = held.holder else { unreachable!("one-holder type") };
        if self.registrant(&holder).map(|r| r.key) == Some(key) {
            // The holder's key (the issuer's own included): the issuer holds a reservation of
            // the new type, every other registrant under that key goes; where the type
            // changes, the registrants left hear that the old one was released (as nvmet).
            self.unregister_keyed(key, Some(host), host);
            self.take(host, kind);
            if kind != held.kind {
                self.notify_registrants(host, NoticeKind::ReservationReleased);
            }
            return status::SUCCESS;
        }
        if key == 0 {
            return status::INVALID_FIELD;
        }
        // Another key: its registrants go, the reservation stays as it is.
        if self.unregister_keyed(key, None, host) {
            status::SUCCESS
        } else {
            RESERVATION_CONFLICT
        }
    }

    /// Reservation Release (opcode 15h): CDW10 bits 2:0 the action (0 release, 1 clear),
    /// bit 3 Ignore Existing Key (refused), bits 15:8 the type; `data` the current key.
    pub fn release(&mut self, host: &HostId, cdw10: u32, data: &[u8]) -> Status {
        self.notices.clear();
        let st = self.do_release(host, cdw10, data);
        self.settle(st)
    }

    fn do_release(&mut self, host: &HostId, cdw10: u32, data: &[u8]) -> Status {
        if let Err(st) = self.keyed(host, cdw10, data, 8) {
            return st;
        }
        match cdw10 & 0x7 {
            0 => {
                let Some(held) = self.held else { return status::SUCCESS };
                if !self.holds(host) {
                    // Not the holder: nothing happens (the specification's "no effect").
                    return status::SUCCESS;
                }
                if Kind::from_rtype((cdw10 >> 8) & 0xff) != Some(held.kind) {
                    return status::INVALID_FIELD;
                }
                self.held = None;
                // Write Exclusive and Exclusive Access concern their holder alone.
                if held.kind.admits_registrants() {
                    self.notify_registrants(host, NoticeKind::ReservationReleased);
                }
                status::SUCCESS
            }
            1 => {
                self.notify_registrants(host, NoticeKind::ReservationPreempted);
                self.held = None;
                self.registrants.clear();
                self.generation = self.generation.wrapping_add(1);
                status::SUCCESS
            }
            _ => status::INVALID_FIELD,
        }
    }

    /// What the control plane shows of the table (never the keys: a key lets its holder's
    /// peers preempt it).
    pub fn status(&self) -> ResvStatus {
        ResvStatus {
            generation: self.generation,
            rtype: self.held.map(|h| h.kind as u8),
            ptpl: self.ptpl,
            persistent: self.persistent,
            registrants: self.registrants.iter().map(|r| (r.host, self.holds(&r.host))).collect(),
        }
    }

    /// Reservation Report (opcode 0Eh) for a buffer of `len` bytes: the extended data
    /// structure (CDW11 bit 0) only, since host identifiers here are 128 bits.
    pub fn report(&self, cdw11: u32, len: usize) -> Result<Vec<u8>, Status> {
        if cdw11 & 1 == 0 {
            return Err(HOST_ID_INCONSISTENT);
        }
        let mut full = vec![0u8; EXT_HEADER_LEN + EXT_ENTRY_LEN * self.registrants.len()];
        full[0..4].copy_from_slice(&self.generation.to_le_bytes());
        full[4] = self.held.map_or(0, |h| h.kind as u8);
        full[5..7].copy_from_slice(&(self.registrants.len() as u16).to_le_bytes());
        full[9] = u8::from(self.ptpl); // PTPLS
        for (r, e) in
            self.registrants.iter().zip(full[EXT_HEADER_LEN..].chunks_exact_mut(EXT_ENTRY_LEN))
        {
            e[0..2].copy_from_slice(&CNTLID_DYNAMIC.to_le_bytes());
            e[2] = u8::from(self.holds(&r.host));
            e[8..16].copy_from_slice(&r.key.to_le_bytes());
            e[16..32].copy_from_slice(&r.host);
        }
        full.resize(len, 0);
        Ok(full)
    }

    /// Panics if an invariant of the module header does not hold.
    pub fn assert_invariants(&self) {
        assert!(self.registrants.len() <= self.limit, "more registrants than the limit");
        assert!(self.persistent || !self.ptpl, "PTPL on a table that cannot be kept");
        let mut hosts: Vec<&HostId> = self.registrants.iter().map(|r| &r.host).collect();
        hosts.sort_unstable();
        assert!(hosts.windows(2).all(|w| w[0] != w[1]), "a host registered twice");
        match self.held {
            Some(Held { holder: Holder::One(h), kind }) => {
                assert!(!kind.all_registrants(), "a one-holder reservation of type {kind:?}");
                assert!(self.registrant(&h).is_some(), "the holder is not registered");
            }
            Some(Held { holder: Holder::AllRegistrants, kind }) => {
                assert!(kind.all_registrants(), "an all-registrants reservation of type {kind:?}");
                assert!(
                    !self.registrants.is_empty(),
                    "an all-registrants reservation without registrants"
                );
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests;
