//! Registered ("fixed") files and buffers of one ring: the kernel takes a file reference and
//! pins a buffer's pages once, at registration, instead of on every operation.
//!
//! What it saves, per read or write: `fget`/`fput` of the file (an atomic on the file's
//! reference count, a cache line every core using the file shares) and, for a buffer, pinning
//! and unpinning its pages (O_DIRECT maps user memory on every operation).
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
//!   again, and clearing the slot gives them back;
//! - a file slot is returned only by the owner of the file once nothing can submit on it;
//! - each ring's [`Returns`] is its own: a buffer registered on one ring is submitted as a
//!   plain buffer on any other.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use io_uring::Submitter;

use crate::buf::IoBuf;

/// The largest buffer registered (larger ones go as plain buffers): bounds what one slot
/// pins.
pub const FIXED_BUF_MAX: usize = 1 << 20;
/// The most buffer slots a ring may have (the kernel's IORING_MAX_REG_BUFFERS).
pub const FIXED_BUFS_MAX: u32 = 1 << 14;

/// Where slots come back to a ring from wherever their owners let go (any thread).
#[derive(Default)]
pub struct Returns {
    files: Mutex<Vec<u32>>,
    bufs: Mutex<Vec<u16>>,
    /// Something was returned since the ring last cleared: one relaxed load per turn.
    pending: AtomicBool,
}

impl Returns {
    /// Hands back a file slot this ring gave out ([`crate::Ring::register_file`]); its file
    /// must no longer be submitted on this ring.
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

/// What a ring's tables did: registrations over time and now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FixedCounters {
    /// Buffers registered (each once in its life), registrations the kernel refused (the
    /// table is then given up: what it held stays, nothing more is registered).
    pub buf_registrations: u64,
    pub registration_failures: u64,
    /// Files and buffers registered now.
    pub files_registered: u64,
    pub bufs_registered: u64,
}

/// One ring's tables: file slots, buffer slots, and where their owners return them. Shared by
/// the main ring and the device ring, each with its own.
pub(crate) struct Tables {
    files: Option<Slots>,
    bufs: Option<Slots>,
    home: Arc<Returns>,
    pub(crate) counters: FixedCounters,
}

impl Tables {
    /// Sparse tables of `files` and `bufs` slots on the ring of `submitter`; a kernel that
    /// refuses them (before 5.19) leaves the ring without: plain descriptors and buffers.
    pub(crate) fn open(submitter: &Submitter<'_>, files: u32, bufs: u32) -> Tables {
        let mut counters = FixedCounters::default();
        let mut refused = |ok: bool| {
            counters.registration_failures += u64::from(!ok);
            ok
        };
        let files = (files > 0 && refused(submitter.register_files_sparse(files).is_ok()))
            .then(|| Slots::new(files));
        let nbufs = bufs.min(FIXED_BUFS_MAX);
        let bufs = (nbufs > 0 && refused(submitter.register_buffers_sparse(nbufs).is_ok()))
            .then(|| Slots::new(nbufs));
        Tables { files, bufs, home: Arc::new(Returns::default()), counters }
    }

    pub(crate) fn home(&self) -> &Arc<Returns> {
        &self.home
    }

    /// Whether `buf` is registered with this ring.
    pub(crate) fn is_home_of(&self, buf: &IoBuf) -> bool {
        buf.fixed().is_some_and(|f| f.slot_on(&self.home).is_some())
    }

    /// Registers `fd` in a free file slot: the slot, or None (no table, table full, or the
    /// kernel refused: the table is given up).
    pub(crate) fn register_file(&mut self, submitter: &Submitter<'_>, fd: RawFd) -> Option<u32> {
        let slot = self.files.as_mut()?.take()?;
        match submitter.register_files_update(slot, &[fd]) {
            Ok(1) => {
                self.counters.files_registered += 1;
                Some(slot)
            }
            _ => {
                self.counters.registration_failures += 1;
                self.files = None;
                None
            }
        }
    }

    /// The buffer slot `buf` goes in on this ring: its own registration here, or a fresh one
    /// if it has none and a slot is free. None: a plain buffer.
    pub(crate) fn buf_slot(&mut self, submitter: &Submitter<'_>, buf: &mut IoBuf) -> Option<u16> {
        if let Some(f) = buf.fixed() {
            return f.slot_on(&self.home);
        }
        // Only buffers of the cores' pool classes (powers of two) are registered: they are
        // reused, so the registration is paid once; an odd size is freed after one use.
        if buf.capacity() > FIXED_BUF_MAX || !buf.capacity().is_power_of_two() {
            return None;
        }
        let slot = self.bufs.as_mut()?.take()?;
        let iov = [buf.iovec()];
        // SAFETY: the iovec is the buffer's whole allocation, which lives as long as the
        // registration can be used: the slot is named only by this buffer's `FixedBuf`, and
        // it is cleared (`reclaim`) after the buffer is gone, before it is used again.
        let r = unsafe { submitter.register_buffers_update(slot, &iov, None) };
        match r {
            Ok(()) => {
                let slot = u16::try_from(slot).expect("buffer tables have at most 2^14 slots");
                buf.set_fixed(FixedBuf { home: self.home.clone(), slot });
                self.counters.buf_registrations += 1;
                self.counters.bufs_registered += 1;
                Some(slot)
            }
            Err(_) => {
                // Out of lockable memory (RLIMIT_MEMLOCK for an unprivileged user) or a
                // kernel without it: plain buffers from now on. The slot stays taken.
                self.counters.registration_failures += 1;
                self.bufs = None;
                None
            }
        }
    }

    /// Clears the slots returned since the last call (one system call per slot; slots come
    /// back only when their device or buffer is dropped) and frees them; the file slots
    /// cleared, for the caller's own bookkeeping.
    pub(crate) fn reclaim(&mut self, submitter: &Submitter<'_>) -> Vec<u32> {
        let (files, bufs) = self.home.take();
        for &slot in &files {
            // Fails only if the table is gone (then nothing is registered there any more).
            let _ = submitter.register_files_update(slot, &[-1]);
            if let Some(t) = self.files.as_mut() {
                t.give(slot);
            }
            self.counters.files_registered -= 1;
        }
        let empty = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }];
        for &slot in &bufs {
            // SAFETY: a null, empty iovec registers nothing: the slot is cleared and the pages
            // of the buffer that was there are unpinned.
            let _ = unsafe { submitter.register_buffers_update(slot.into(), &empty, None) };
            if let Some(t) = self.bufs.as_mut() {
                t.give(slot.into());
            }
            self.counters.bufs_registered -= 1;
        }
        files
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
        let home = Arc::new(Returns::default());
        let tag = FixedBuf { home: home.clone(), slot: b as u16 };
        assert_eq!(tag.slot_on(&home), Some(b as u16));
        assert_eq!(tag.slot_on(&Arc::new(Returns::default())), None, "another ring's");
        assert!(!home.pending());
        drop(tag);
        home.return_file(a);
        assert!(home.pending());
        let (files, bufs) = home.take();
        assert_eq!((files, bufs), (vec![a], vec![b as u16]));
        assert!(!home.pending());
    }
}
