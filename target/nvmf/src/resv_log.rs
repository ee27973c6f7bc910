//! One controller's reservation notifications (NVMe Base 2.0 §5.16.1.x, "Reservation
//! Notification", log page 80h) and the masks that silence them (feature 82h, Reservation
//! Notification Mask). Pure: the reservation glue adds what [`crate::resv::Reservations`]
//! raised for the controller's host; Get Log Page takes the oldest; nothing here does I/O.
//!
//! Invariants:
//! - at most [`QUEUED_MAX`] notifications wait per controller; one past it is lost, but its
//!   Log Page Count is still used, so the host sees the gap in the counts it reads;
//! - Log Page Counts move on by one per notification raised (masked ones raise none), skip 0
//!   (which means "no notification") on wrapping, and are read back oldest first;
//! - a mask is kept per namespace id (at most `max_nsid` of them, as namespace ids are
//!   bounded by their subsystem's), one set for every namespace (NSID FFFFFFFFh) replacing
//!   them all.

use std::collections::{BTreeMap, VecDeque};

use crate::resv::NoticeKind;

/// Notifications waiting per controller at most (as Linux's nvmet keeps).
pub const QUEUED_MAX: usize = 64;
/// Bytes of the log page.
pub const PAGE_LEN: usize = 64;
/// The mask bits a host may set: Registration Preempted (1), Reservation Released (2),
/// Reservation Preempted (3).
pub const MASK_BITS: u32 = 0b1110;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    count: u64,
    kind: NoticeKind,
    nsid: u32,
}

/// A controller's notifications and masks.
#[derive(Debug, Default)]
pub struct ResvLog {
    /// The Log Page Count of the last notification raised.
    count: u64,
    queue: VecDeque<Entry>,
    /// Notifications lost to a full queue, in all.
    lost: u64,
    /// The mask of namespaces without one of their own.
    mask_all: u32,
    masks: BTreeMap<u32, u32>,
}

impl ResvLog {
    /// The mask of namespace `nsid`.
    pub fn mask(&self, nsid: u32) -> u32 {
        self.masks.get(&nsid).copied().unwrap_or(self.mask_all)
    }

    /// Sets the mask of namespace `nsid` (`u32::MAX`: of every namespace). `mask` holds only
    /// [`MASK_BITS`] (Set Features checks it).
    pub fn set_mask(&mut self, nsid: u32, mask: u32) {
        assert_eq!(mask & !MASK_BITS, 0, "mask bits beyond the three notifications");
        if nsid == u32::MAX {
            self.masks.clear();
            self.mask_all = mask;
        } else {
            self.masks.insert(nsid, mask);
        }
    }

    /// Raises a notification for namespace `nsid`, unless its mask silences it: whether one
    /// was raised (and an event is owed to the host).
    pub fn add(&mut self, kind: NoticeKind, nsid: u32) -> bool {
        if self.mask(nsid) & (1 << kind as u32) != 0 {
            return false;
        }
        self.count = self.count.wrapping_add(1).max(1);
        if self.queue.len() >= QUEUED_MAX {
            self.lost += 1;
            tracing::debug!(nsid, ?kind, "reservation notification lost: the queue is full");
            return true;
        }
        self.queue.push_back(Entry { count: self.count, kind, nsid });
        true
    }

    /// The log page: the oldest notification (all zeros when none waits) — Log Page Count,
    /// type, how many more wait (at most 255), namespace id — taken off the queue if `take`.
    pub fn page(&mut self, take: bool) -> [u8; PAGE_LEN] {
        let mut page = [0u8; PAGE_LEN];
        if let Some(e) = self.queue.front().copied() {
            let more = self.queue.len() - 1;
            page[0..8].copy_from_slice(&e.count.to_le_bytes());
            page[8] = e.kind as u8;
            page[9] = more.min(255) as u8;
            page[12..16].copy_from_slice(&e.nsid.to_le_bytes());
            if take {
                self.queue.pop_front();
            }
        }
        page
    }

    /// The page, taken (what a host's read of the whole page does).
    pub fn take_page(&mut self) -> [u8; PAGE_LEN] {
        self.page(true)
    }

    /// Namespace `nsid` went: its own mask goes with it (a namespace added later under that
    /// id starts with the mask of every namespace).
    pub fn forget_namespace(&mut self, nsid: u32) {
        self.masks.remove(&nsid);
    }

    /// Notifications lost to a full queue so far.
    pub fn lost(&self) -> u64 {
        self.lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(log: &mut ResvLog) -> (u64, u8, u8, u32) {
        let p = log.take_page();
        (
            u64::from_le_bytes(p[0..8].try_into().unwrap()),
            p[8],
            p[9],
            u32::from_le_bytes(p[12..16].try_into().unwrap()),
        )
    }

    #[test]
    fn notifications_are_read_oldest_first_and_an_empty_log_reads_zero() {
        let mut log = ResvLog::default();
        assert_eq!(read(&mut log), (0, 0, 0, 0));
        assert!(log.add(NoticeKind::RegistrationPreempted, 1));
        assert!(log.add(NoticeKind::ReservationReleased, 2));
        assert_eq!(read(&mut log), (1, 1, 1, 1));
        assert_eq!(read(&mut log), (2, 2, 0, 2));
        assert_eq!(read(&mut log), (0, 0, 0, 0));
        assert!(log.add(NoticeKind::ReservationPreempted, 7));
        assert_eq!(read(&mut log), (3, 3, 0, 7), "counts go on after the queue emptied");
    }

    #[test]
    fn masks_apply_per_namespace_and_all_at_once() {
        let mut log = ResvLog::default();
        log.set_mask(1, 1 << 1);
        assert!(!log.add(NoticeKind::RegistrationPreempted, 1), "masked on namespace 1");
        assert!(log.add(NoticeKind::RegistrationPreempted, 2), "not on namespace 2");
        assert!(log.add(NoticeKind::ReservationReleased, 1), "another kind on namespace 1");
        assert_eq!(read(&mut log).0, 1, "a masked notification takes no count");
        log.set_mask(u32::MAX, MASK_BITS);
        assert_eq!((log.mask(1), log.mask(9)), (MASK_BITS, MASK_BITS), "all replaces each");
        for kind in [
            NoticeKind::RegistrationPreempted,
            NoticeKind::ReservationReleased,
            NoticeKind::ReservationPreempted,
        ] {
            assert!(!log.add(kind, 3));
        }
        log.set_mask(3, 0);
        assert!(log.add(NoticeKind::ReservationPreempted, 3));
    }

    #[test]
    fn a_full_queue_loses_the_newest_and_the_counts_show_the_gap() {
        let mut log = ResvLog::default();
        for _ in 0..QUEUED_MAX + 3 {
            assert!(log.add(NoticeKind::RegistrationPreempted, 1));
        }
        assert_eq!(log.lost(), 3);
        assert_eq!(read(&mut log), (1, 1, 63, 1));
        for _ in 1..QUEUED_MAX {
            read(&mut log);
        }
        assert_eq!(read(&mut log).0, 0, "the lost ones are not read");
        log.add(NoticeKind::ReservationReleased, 1);
        assert_eq!(read(&mut log).0, QUEUED_MAX as u64 + 4, "the next count skips the lost");
    }

    #[test]
    fn a_page_not_taken_stays_and_a_forgotten_namespace_loses_its_mask() {
        let mut log = ResvLog::default();
        log.add(NoticeKind::ReservationReleased, 4);
        assert_eq!(log.page(false)[8], 2);
        assert_eq!(read(&mut log), (1, 2, 0, 4), "still there");
        log.set_mask(u32::MAX, 1 << 1);
        log.set_mask(4, 0);
        log.forget_namespace(4);
        assert_eq!(log.mask(4), 1 << 1);
    }

    #[test]
    fn the_count_skips_zero_when_it_wraps() {
        let mut log = ResvLog { count: u64::MAX, ..ResvLog::default() };
        log.add(NoticeKind::ReservationReleased, 1);
        assert_eq!(read(&mut log).0, 1);
    }
}
