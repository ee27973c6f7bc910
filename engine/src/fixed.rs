//! A device's file registered with the rings of the cores that submit on it.
//!
//! Each core registers a device's descriptor with its own ring the first time it submits on
//! it ([`crate::reactor::Cx::file_ref`]) and from then on names the ring's slot, so the kernel does not look the
//! descriptor up and take a reference to the file on every operation — a reference count every
//! core using the file would otherwise write. A core whose table is full (or a kernel without
//! registered files) submits on the descriptor as before.
//!
//! Invariants:
//! - a core holds at most one slot per device ([`CoreFiles`]), used only while the device is
//!   alive: the slot is handed back (and the core woken to clear it) when the device's
//!   [`Registered`] drops, and nothing can submit on a dropped device;
//! - the core forgets its record of a slot in the same step as its ring clears the slot
//!   (`Core::reclaim_returned`), so a slot is never named for a device after it was reused.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ballast_ffi::{FileRef, Returns, Ring};
use parking_lot::Mutex;

use crate::reactor::CoreHandle;

/// Device numbers: never reused within the process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A descriptor that cores may register with their rings; owned by the device whose file it
/// is, dropped with it (declare it after the file: the slots are returned after the close,
/// which is fine — the ring holds its own reference to the file until it clears the slot).
pub struct Registered {
    id: u64,
    fd: RawFd,
    /// Where each core that registered the file has it.
    homes: Mutex<Vec<Home>>,
}

struct Home {
    returns: Arc<Returns>,
    core: CoreHandle,
    slot: u32,
}

impl Registered {
    /// `fd` must stay open as long as this value lives.
    pub fn new(fd: RawFd) -> Registered {
        Registered {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            fd,
            homes: Mutex::new(Vec::new()),
        }
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Cores holding the file registered now.
    pub fn cores_registered(&self) -> usize {
        self.homes.lock().len()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        for home in self.homes.get_mut().drain(..) {
            home.returns.return_file(home.slot);
            home.core.doorbell();
        }
    }
}

/// One core's record: which device holds which slot of its ring's file table.
#[derive(Default)]
pub(crate) struct CoreFiles {
    by_device: Vec<(u64, u32)>,
}

impl CoreFiles {
    /// The slot of `reg` on this core (whose ring and handle these are), registering it now if
    /// the ring has a slot free.
    pub(crate) fn file_ref(
        &mut self,
        reg: &Registered,
        ring: &mut Ring,
        core: &CoreHandle,
    ) -> FileRef {
        if let Some(&(_, slot)) = self.by_device.iter().find(|(id, _)| *id == reg.id) {
            return FileRef::Fixed(slot);
        }
        let Some(slot) = ring.register_file(reg.fd) else { return FileRef::Raw(reg.fd) };
        let home = Home { returns: ring.returns().clone(), core: core.clone(), slot };
        reg.homes.lock().push(home);
        self.by_device.push((reg.id, slot));
        FileRef::Fixed(slot)
    }

    /// Forgets the slots the ring just cleared.
    pub(crate) fn forget(&mut self, cleared: &[u32]) {
        self.by_device.retain(|(_, slot)| !cleared.contains(slot));
    }
}
