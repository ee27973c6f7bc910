//! Registered ("fixed") files and buffers of one ring: the kernel takes a file reference and
//! pins a buffer's pages once, at registration, instead of on every operation.
//!
//! What it saves, per read or write: `fget`/`fput` of the file (an atomic on the file's
//! reference count, a cache line every core using the file shares) and, for a buffer, pinning
//! and unpinning its pages (O_DIRECT and NVMe passthrough map user memory on every operation).
//!
//! Invariants:
//! - a table slot is in exactly one of: free, in use by one registration, returned (its owner
//!   let go; the ring clears it before it is free again);
//! - a registered buffer's slot is used only for that buffer: the slot travels inside the
//!   [`IoBuf`](crate::IoBuf) it was registered for ([`FixedBuf`]) and comes back here when the
//!   buffer is dropped — no other buffer can name it while it is in use, so an operation on a
//!   slot always reaches the memory of the buffer that carries it;
//! - the kernel keeps a returned buffer's pages pinned until the ring clears its slot; no
//!   operation names a returned slot (its buffer is gone), so those pages are never written to
//!   again, and clearing (one system call for all returned slots) gives them back;
//! - a file slot is returned only by the owner of the file once nothing can submit on it;
//! - each ring's [`Returns`] is its own: a buffer registered on one ring is submitted as a
//!   plain buffer on any other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The largest buffer registered (larger ones go as plain buffers): bounds what one slot
/// pins.
pub const FIXED_BUF_MAX: usize = 1 << 20;
/// The most buffer slots a ring may have (the SQE's buffer index is 16 bits).
pub const FIXED_BUFS_MAX: u32 = 1 << 15;

/// Where slots come back to a ring from wherever their owners let go (any thread).
#[derive(Default)]
pub struct Returns {
    files: Mutex<Vec<u32>>,
    bufs: Mutex<Vec<u16>>,
    /// Something was returned since the ring last cleared: one relaxed load per turn.
    pending: AtomicBool,
}

impl Returns {
    /// Hands back a file slot (its file must no longer be submitted on this ring).
    pub fn return_file(&self, slot: u32) {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).push(slot);
        self.pending.store(true, Ordering::Release);
    }

    fn return_buf(&self, slot: u16) {
        self.bufs.lock().unwrap_or_else(|e| e.into_inner()).push(slot);
        self.pending.store(true, Ordering::Release);
    }

    /// Whether slots wait to be cleared.
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    fn take(&self) -> (Vec<u32>, Vec<u16>) {
        self.pending.store(false, Ordering::Relaxed);
        let files = std::mem::take(&mut *self.files.lock().unwrap_or_else(|e| e.into_inner()));
        let bufs = std::mem::take(&mut *self.bufs.lock().unwrap_or_else(|e| e.into_inner()));
        (files, bufs)
    }
}

/// A buffer's registration on one ring: carried by the buffer, returned when it drops.
pub struct FixedBuf {
    home: Arc<Returns>,
    slot: u16,
}

impl FixedBuf {
    /// The slot, if the registration belongs to the ring whose returns are `home`.
    pub(crate) fn slot_on(&self, home: &Arc<Returns>) -> Option<u16> {
        Arc::ptr_eq(&self.home, home).then_some(self.slot)
    }
}

impl Drop for FixedBuf {
    fn drop(&mut self) {
        self.home.return_buf(self.slot);
    }
}

/// A table of slots: which are free, how many there are.
pub(crate) struct Slots {
    free: Vec<u32>,
    size: u32,
}

impl Slots {
    pub(crate) fn new(size: u32) -> Slots {
        Slots { free: (0..size).rev().collect(), size }
    }

    pub(crate) fn take(&mut self) -> Option<u32> {
        self.free.pop()
    }

    pub(crate) fn give(&mut self, slot: u32) {
        assert!(slot < self.size, "slot {slot} outside a table of {}", self.size);
        debug_assert!(!self.free.contains(&slot), "slot {slot} freed twice");
        self.free.push(slot);
    }
}

/// One ring's tables: file slots, buffer slots, and where their owners return them.
pub(crate) struct Tables {
    pub(crate) files: Option<Slots>,
    pub(crate) bufs: Option<Slots>,
    pub(crate) home: Arc<Returns>,
}

impl Tables {
    /// Takes back what was returned; the caller clears the slots in the kernel first.
    pub(crate) fn take_returned(&self) -> (Vec<u32>, Vec<u16>) {
        self.home.take()
    }

    /// A registration record for a buffer just registered in `slot`.
    pub(crate) fn tag(&self, slot: u16) -> FixedBuf {
        FixedBuf { home: self.home.clone(), slot }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_come_back_through_returns() {
        let mut s = Slots::new(2);
        let a = s.take().unwrap();
        let b = s.take().unwrap();
        assert_ne!(a, b);
        assert!(s.take().is_none(), "a table of two gives two");
        let t = Tables { files: None, bufs: None, home: Arc::new(Returns::default()) };
        let tag = t.tag(b as u16);
        assert_eq!(tag.slot_on(&t.home), Some(b as u16));
        assert_eq!(tag.slot_on(&Arc::new(Returns::default())), None, "another ring's");
        assert!(!t.home.pending());
        drop(tag);
        t.home.return_file(a);
        assert!(t.home.pending());
        let (files, bufs) = t.take_returned();
        assert_eq!((files, bufs), (vec![a], vec![b as u16]));
        assert!(!t.home.pending());
    }
}
