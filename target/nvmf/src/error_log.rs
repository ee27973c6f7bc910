//! One controller's Error Information log (NVMe Base 2.0 §5.16.1.2, log page 01h): the
//! commands it answered with an error, newest first, for `nvme error-log` and the SMART log's
//! error count. Pure: the queue that answers a command records it; Get Log Page reads; nothing
//! here does I/O.
//!
//! Invariants:
//! - at most [`SLOTS`] entries are kept (Identify Controller's ELPE says so); a new error
//!   pushes the oldest out, so memory is bounded whatever a host sends;
//! - Error Counts are unique and increase by one per error recorded, from 1 (0 marks an
//!   unused entry); the page lists them newest first, unused entries zero;
//! - the lifetime count (the SMART log's "Number of Error Information Log Entries") is the
//!   last Error Count given.

use std::collections::VecDeque;

use crate::nvme::{self, io, status, Sqe, Status, FABRICS_OPCODE};

/// Entries kept per controller (as Linux's nvmet keeps 128; each is 64 bytes of log page).
pub const SLOTS: usize = 64;
/// Bytes of one entry.
pub const ENTRY_LEN: usize = 64;
/// Bytes of the log page: every slot, used or not.
pub const PAGE_LEN: usize = SLOTS * ENTRY_LEN;
/// Parameter Error Location when no one field of the command is at fault.
pub const NO_LOCATION: u16 = 0xffff;
/// Transport Type of a transport error: TCP (NVMe over Fabrics TRTYPE 3).
const TRTYPE_TCP: u8 = 3;
/// The entry format of NVMe Base 2.0 (with Command Set Identifier and opcode).
const LOG_PAGE_VERSION: u8 = 1;

/// One failed command, as the log page shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorEntry {
    pub count: u64,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
    /// Byte (bits 7:0) and bit (bits 10:8) of the command at fault, or [`NO_LOCATION`].
    pub location: u16,
    pub lba: u64,
    pub nsid: u32,
    pub opcode: u8,
}

impl ErrorEntry {
    /// What the log records of command `sqe` on queue `sqid` that failed with `st`: the
    /// namespace it named, the first LBA of a read, write or Write Zeroes, and the
    /// field at fault where the status names one (the namespace id for Invalid Namespace,
    /// the starting LBA for LBA Out of Range, the opcode for Invalid Opcode).
    pub fn of(sqid: u16, sqe: &Sqe, st: Status) -> Self {
        let lba_cmd = sqid != 0 && matches!(sqe.opcode, io::READ | io::WRITE | io::WRITE_ZEROES);
        // A Fabrics command carries its type where others name a namespace (byte 4).
        let fabrics = sqe.opcode == FABRICS_OPCODE;
        let location = match st {
            status::INVALID_OPCODE if fabrics => 4, // FCTYPE
            status::INVALID_OPCODE => 0,            // CDW0 byte 0
            status::INVALID_NAMESPACE => 4,
            status::LBA_OUT_OF_RANGE if lba_cmd => 40, // CDW10
            _ => NO_LOCATION,
        };
        ErrorEntry {
            count: 0,
            sqid,
            cid: sqe.cid,
            status: st,
            location,
            lba: if lba_cmd { sqe.slba() } else { 0 },
            nsid: if fabrics { 0 } else { sqe.nsid },
            opcode: sqe.opcode,
        }
    }

    fn encode(&self, b: &mut [u8]) {
        assert_eq!(b.len(), ENTRY_LEN);
        b[0..8].copy_from_slice(&self.count.to_le_bytes());
        b[8..10].copy_from_slice(&self.sqid.to_le_bytes());
        b[10..12].copy_from_slice(&self.cid.to_le_bytes());
        b[12..14].copy_from_slice(&nvme::status_field(self.status).to_le_bytes());
        b[14..16].copy_from_slice(&self.location.to_le_bytes());
        b[16..24].copy_from_slice(&self.lba.to_le_bytes());
        b[24..28].copy_from_slice(&self.nsid.to_le_bytes());
        // The transport's type only for an error of the transport (a data digest that did
        // not match); 0 for the rest, as the specification says.
        if self.status == status::TRANSIENT_TRANSPORT_ERROR {
            b[29] = TRTYPE_TCP;
        }
        b[31] = self.opcode; // CSI (byte 30) 0: the NVM command set
        b[63] = LOG_PAGE_VERSION;
    }
}

/// A controller's recent errors.
#[derive(Debug, Default)]
pub struct ErrorLog {
    /// The Error Count of the last error recorded (errors recorded in all).
    count: u64,
    /// Oldest first.
    kept: VecDeque<ErrorEntry>,
}

impl ErrorLog {
    /// Records `e` (its count is given here) and returns its Error Count.
    pub fn record(&mut self, mut e: ErrorEntry) -> u64 {
        assert_ne!(e.status, status::SUCCESS, "a successful command is no error");
        self.count += 1;
        e.count = self.count;
        if self.kept.len() == SLOTS {
            self.kept.pop_front();
        }
        self.kept.push_back(e);
        assert!(self.kept.len() <= SLOTS);
        self.count
    }

    /// Errors recorded in all (the SMART log's count).
    pub fn total(&self) -> u64 {
        self.count
    }

    /// The log page: every slot, newest first, unused ones zero.
    pub fn page(&self) -> Vec<u8> {
        let mut b = vec![0u8; PAGE_LEN];
        for (e, slot) in self.kept.iter().rev().zip(b.chunks_exact_mut(ENTRY_LEN)) {
            e.encode(slot);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqe(opcode: u8, cid: u16, nsid: u32, slba: u64) -> Sqe {
        let mut raw = [0u8; 64];
        raw[0] = opcode;
        raw[2..4].copy_from_slice(&cid.to_le_bytes());
        raw[4..8].copy_from_slice(&nsid.to_le_bytes());
        raw[40..48].copy_from_slice(&slba.to_le_bytes());
        Sqe::decode(&raw)
    }

    fn count_at(page: &[u8], slot: usize) -> u64 {
        u64::from_le_bytes(page[slot * ENTRY_LEN..][..8].try_into().unwrap())
    }

    #[test]
    fn an_entry_is_laid_out_as_the_specification_says() {
        let mut log = ErrorLog::default();
        let e = ErrorEntry::of(2, &sqe(io::READ, 0x1234, 1, 0x10_0000), status::LBA_OUT_OF_RANGE);
        assert_eq!(log.record(e), 1);
        let p = log.page();
        assert_eq!(p.len(), PAGE_LEN);
        assert_eq!(count_at(&p, 0), 1);
        assert_eq!(&p[8..10], &2u16.to_le_bytes(), "SQID");
        assert_eq!(&p[10..12], &0x1234u16.to_le_bytes(), "CID");
        // SC 80h in bits 8:1, SCT 0, DNR: what the completion carried.
        assert_eq!(u16::from_le_bytes([p[12], p[13]]), (0x80 << 1) | (1 << 15));
        assert_eq!(u16::from_le_bytes([p[14], p[15]]), 40, "CDW10: the starting LBA");
        assert_eq!(u64::from_le_bytes(p[16..24].try_into().unwrap()), 0x10_0000);
        assert_eq!(u32::from_le_bytes(p[24..28].try_into().unwrap()), 1);
        assert_eq!(
            (p[29], p[30], p[31], p[63]),
            (0, 0, io::READ, LOG_PAGE_VERSION),
            "no transport error"
        );
        assert!(p[ENTRY_LEN..].iter().all(|&b| b == 0), "unused slots are zero");
    }

    #[test]
    fn an_admin_command_has_no_lba_and_the_location_follows_the_status() {
        // An admin opcode 02h (Get Log Page) is no write: no LBA even with CDW10 set.
        let e = ErrorEntry::of(0, &sqe(0x02, 7, 0, 99), status::INVALID_FIELD);
        assert_eq!((e.lba, e.location, e.sqid), (0, NO_LOCATION, 0));
        let e = ErrorEntry::of(1, &sqe(0x7e, 7, 1, 99), status::INVALID_OPCODE);
        assert_eq!((e.lba, e.location, e.opcode), (0, 0, 0x7e));
        let e = ErrorEntry::of(1, &sqe(io::WRITE, 7, 9, 99), status::INVALID_NAMESPACE);
        assert_eq!((e.lba, e.location, e.nsid), (99, 4, 9));
        // A Fabrics command's byte 4 is its type, not a namespace.
        let e = ErrorEntry::of(0, &sqe(FABRICS_OPCODE, 7, 0x33, 0), status::INVALID_OPCODE);
        assert_eq!((e.nsid, e.location), (0, 4));
    }

    #[test]
    fn a_transport_error_names_the_transport() {
        let mut log = ErrorLog::default();
        let sqe = sqe(io::WRITE, 3, 1, 8);
        log.record(ErrorEntry::of(1, &sqe, status::TRANSIENT_TRANSPORT_ERROR));
        log.record(ErrorEntry::of(1, &sqe, status::WRITE_FAULT));
        let p = log.page();
        assert_eq!(
            (p[29], p[ENTRY_LEN + 29]),
            (0, TRTYPE_TCP),
            "newest first: the media's, then the digest's"
        );
    }

    #[test]
    fn the_newest_slots_entries_are_kept_newest_first() {
        let mut log = ErrorLog::default();
        for i in 0..(SLOTS as u16 + 10) {
            let e = ErrorEntry::of(1, &sqe(io::WRITE, i, 1, 0), status::WRITE_FAULT);
            assert_eq!(log.record(e), u64::from(i) + 1);
        }
        assert_eq!(log.total(), SLOTS as u64 + 10);
        let p = log.page();
        assert_eq!(p.len(), PAGE_LEN, "the page never grows");
        for slot in 0..SLOTS {
            assert_eq!(count_at(&p, slot), SLOTS as u64 + 10 - slot as u64, "slot {slot}");
            let cid = u16::from_le_bytes(p[slot * ENTRY_LEN + 10..][..2].try_into().unwrap());
            assert_eq!(u64::from(cid) + 1, count_at(&p, slot));
        }
    }

    #[test]
    #[should_panic(expected = "no error")]
    fn success_is_not_recorded() {
        ErrorLog::default().record(ErrorEntry::of(1, &sqe(io::READ, 1, 1, 0), status::SUCCESS));
    }
}
