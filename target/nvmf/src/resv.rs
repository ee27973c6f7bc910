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
//! Not kept across restarts (Persist Through Power Loss is not offered: RESCAP bit 0 clear,
//! a Register asking to set it is refused), and no notifications are raised: the Reservation
//! Notification log page stays empty.

use crate::nvme::{io, status, Status};

/// Registrations one namespace keeps at most unless told otherwise: a host past the limit is
/// refused its Register (Internal Error), and a report never exceeds 64 + 64 × the limit bytes.
pub const REGISTRANTS_DEFAULT: usize = 64;
/// The largest limit that may be set (a report of it: 64 KiB).
pub const REGISTRANTS_LIMIT_MAX: usize = 1023;

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
            io::READ => Some(Access::Read),
            io::WRITE | io::WRITE_ZEROES | io::DSM | io::FLUSH => Some(Access::Write),
            _ => None,
        }
    }
}

pub type HostId = [u8; 16];

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

/// One namespace's registrations and reservation.
#[derive(Debug, Clone)]
pub struct Reservations {
    /// Registrations kept at most.
    limit: usize,
    generation: u32,
    /// In registration order (a report lists them so).
    registrants: Vec<Registrant>,
    held: Option<Held>,
}

/// The 16 bytes of a Register's data: current and new key.
fn keys(data: &[u8]) -> Option<(u64, u64)> {
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
        Reservations { limit, generation: 0, registrants: Vec::new(), held: None }
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

    /// Unregisters every host but `except` whose key is `key`; whether any was.
    fn unregister_keyed(&mut self, key: u64, except: Option<&HostId>) -> bool {
        let gone: Vec<HostId> = self
            .registrants
            .iter()
            .filter(|r| r.key == key && Some(&r.host) != except)
            .map(|r| r.host)
            .collect();
        for h in &gone {
            self.unregister(h);
        }
        !gone.is_empty()
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
        let st = self.do_register(host, cdw10, data);
        if st == status::SUCCESS {
            self.generation = self.generation.wrapping_add(1);
        }
        self.assert_invariants();
        st
    }

    fn do_register(&mut self, host: &HostId, cdw10: u32, data: &[u8]) -> Status {
        let ignore_key = cdw10 & (1 << 3) != 0;
        // 3: set Persist Through Power Loss, which this target does not offer.
        if cdw10 >> 30 == 3 {
            return status::INVALID_FIELD;
        }
        let Some((current, new)) = (data.len() >= 16).then(|| keys(data)).flatten() else {
            return status::SGL_DATA_LENGTH_INVALID;
        };
        let existing = self.registrant(host).copied();
        match cdw10 & 0x7 {
            0 => match existing {
                Some(r) if r.key == new => status::SUCCESS,
                Some(_) => RESERVATION_CONFLICT,
                None if self.registrants.len() >= self.limit => status::INTERNAL,
                None => {
                    self.registrants.push(Registrant { host: *host, key: new });
                    status::SUCCESS
                }
            },
            1 => match existing {
                Some(r) if ignore_key || r.key == current => {
                    self.unregister(host);
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

    /// Reservation Acquire (opcode 11h): CDW10 bits 2:0 the action (0 acquire, 1 preempt,
    /// 2 preempt and abort), bit 3 Ignore Existing Key (refused, as NVMe 1.3 on), bits 15:8
    /// the type; `data` the current key (0–7) and the key to preempt (8–15).
    pub fn acquire(&mut self, host: &HostId, cdw10: u32, data: &[u8]) -> Status {
        let st = self.do_acquire(host, cdw10, data);
        self.assert_invariants();
        st
    }

    fn do_acquire(&mut self, host: &HostId, cdw10: u32, data: &[u8]) -> Status {
        let Some(kind) = Kind::from_rtype((cdw10 >> 8) & 0xff) else {
            return status::INVALID_FIELD;
        };
        if cdw10 & (1 << 3) != 0 {
            return status::INVALID_FIELD;
        }
        let Some((current, preempt)) = (data.len() >= 16).then(|| keys(data)).flatten() else {
            return status::SGL_DATA_LENGTH_INVALID;
        };
        if self.registrant(host).is_none_or(|r| r.key != current) {
            return RESERVATION_CONFLICT;
        }
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
            return if self.unregister_keyed(key, None) {
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
                }
                self.take(host, kind);
                return status::SUCCESS;
            }
            return if self.unregister_keyed(key, None) {
                status::SUCCESS
            } else {
                RESERVATION_CONFLICT
            };
        }
        let Holder::One(holder) = held.holder else { unreachable!("one-holder type") };
        if self.registrant(&holder).map(|r| r.key) == Some(key) {
            // The holder's key (the issuer's own included): the issuer holds a reservation of
            // the new type, every other registrant under that key goes.
            self.unregister_keyed(key, Some(host));
            self.take(host, kind);
            return status::SUCCESS;
        }
        if key == 0 {
            return status::INVALID_FIELD;
        }
        // Another key: its registrants go, the reservation stays as it is.
        if self.unregister_keyed(key, None) {
            status::SUCCESS
        } else {
            RESERVATION_CONFLICT
        }
    }

    /// Reservation Release (opcode 15h): CDW10 bits 2:0 the action (0 release, 1 clear),
    /// bit 3 Ignore Existing Key (refused), bits 15:8 the type; `data` the current key.
    pub fn release(&mut self, host: &HostId, cdw10: u32, data: &[u8]) -> Status {
        let st = self.do_release(host, cdw10, data);
        self.assert_invariants();
        st
    }

    fn do_release(&mut self, host: &HostId, cdw10: u32, data: &[u8]) -> Status {
        if cdw10 & (1 << 3) != 0 {
            return status::INVALID_FIELD;
        }
        let Some((current, _)) = (data.len() >= 8).then(|| keys(data)).flatten() else {
            return status::SGL_DATA_LENGTH_INVALID;
        };
        if self.registrant(host).is_none_or(|r| r.key != current) {
            return RESERVATION_CONFLICT;
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
                status::SUCCESS
            }
            1 => {
                self.held = None;
                self.registrants.clear();
                self.generation = self.generation.wrapping_add(1);
                status::SUCCESS
            }
            _ => status::INVALID_FIELD,
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
        // Byte 9, PTPLS: 0 (not persisted).
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
        for (i, r) in self.registrants.iter().enumerate() {
            assert!(
                self.registrants[..i].iter().all(|o| o.host != r.host),
                "a host registered twice"
            );
        }
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
