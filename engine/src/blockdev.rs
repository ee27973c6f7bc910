//! The block-device contract shared by every backend and, later, by volumes.
//!
//! A device is shared by all cores (`Send + Sync`); each submission runs on the calling core's
//! reactor through its [`Cx`], and its completion comes back to the submitting task with the
//! same tag: `result` is bytes transferred (read/write) or 0, or `-errno`; a read hands its
//! buffer back filled.
//!
//! Invariants the callers guarantee (asserted by backends): `offset + len <= size_bytes`, and
//! write/discard/zeroes are never sent to a read-only device.

use std::sync::Arc;

use ballast_ffi::region::Lent;
use ballast_ffi::IoBuf;

use crate::gate::WriteGate;
use crate::reactor::Cx;

/// One I/O command.
#[derive(Debug)]
pub enum IoCmd {
    /// Fill `buf[..len]` from `offset`.
    Read { offset: u64, buf: IoBuf },
    /// Store `buf[..len]` at `offset`; with `fua`, durable before completion.
    Write { offset: u64, buf: IoBuf, fua: bool },
    /// Make every completed write durable.
    Flush,
    /// The range's contents become unspecified (we read zeros) and space may be freed.
    Discard { offset: u64, len: u64 },
    /// The range reads zeros afterwards; `may_unmap` allows freeing space.
    WriteZeroes { offset: u64, len: u64, may_unmap: bool },
}

/// What a device is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DevInfo {
    /// Preferred I/O granularity.
    pub block_size: u32,
    /// Smallest I/O the device accepts, and the alignment of every request (1: any).
    pub min_block: u32,
    pub read_only: bool,
    /// Kind and location, for listings ("ram", "file:/path (O_DIRECT)").
    pub backend: String,
    /// Whether [`BlockDev::extents`] is cheap enough to call on every read.
    pub cheap_extents: bool,
    /// This device's counters in every core's statistics ([`crate::stats::device_id`]).
    pub stats_id: u32,
}

/// A run of blocks with the same allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Not allocated (reads as zeros).
    pub hole: bool,
    /// Known to read as zeros.
    pub zero: bool,
}

/// The most extents [`BlockDev::used_bytes`] looks at by default.
pub const USED_EXTENTS_MAX: usize = 1024;
/// [`BlockDev::effect_piece_max`] of devices that zero memory on the core (a RAM device, a
/// file on a memory filesystem): 256 MiB of memset per command at most.
pub const MEMORY_EFFECT_PIECE: u64 = 256 << 20;

pub trait BlockDev: Send + Sync {
    fn info(&self) -> &DevInfo;

    /// Current size; it only grows, through [`BlockDev::grow`].
    fn size_bytes(&self) -> u64;

    /// Whether writes are refused now: [`DevInfo::read_only`], or a volume made read-only
    /// since it was opened (`bdev_lvol_set_read_only`). Once true, never false again.
    fn read_only(&self) -> bool {
        self.info().read_only
    }

    /// Grows the device to `new_size` bytes. Shrinking is refused (it would drop data).
    fn grow(&self, new_size: u64) -> std::io::Result<()> {
        let _ = new_size;
        Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "this backend cannot be resized"))
    }

    /// Takes the size its medium has now (a file or block device grown from outside, as
    /// SPDK's `bdev_aio_rescan`): `(old, new)` in bytes. A medium that shrank is refused (what
    /// was past its new end is gone: the device keeps its size, and I/O there fails).
    fn rescan(&self) -> std::io::Result<(u64, u64)> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this backend cannot be rescanned",
        ))
    }

    /// The core that should serve this device's I/O, asked by a connection arriving on core
    /// `here` once it knows its device: `None` (the default) wherever it arrived; a volume
    /// under the `owner` placement names its family's owner, and the connection moves there.
    fn home_core(&self, here: usize) -> Option<usize> {
        let _ = here;
        None
    }

    /// Starts `cmd`; its completion reaches the caller's task with `tag`.
    fn submit(&self, cx: &mut Cx<'_>, cmd: IoCmd, tag: u32);

    /// The gate every write to this device passes ([`crate::gate`]), shared by every export
    /// and namespace made from it; `None` (the default): the device is served without one,
    /// and fused Compare and Write is refused on it.
    fn write_gate(&self) -> Option<&Arc<WriteGate>> {
        None
    }

    /// Allocation map of `[offset, offset + len)`, in order: at most `max` extents (`max` ≥ 1),
    /// covering the whole range or, where that would take more, a prefix of it (a caller
    /// answering a client bounds the work and the reply; one summing the whole device passes
    /// `usize::MAX`).
    fn extents(&self, offset: u64, len: u64, max: usize) -> std::io::Result<Vec<Extent>>;

    /// Bytes allocated (not holes), cheaply enough for a host's Identify: at most
    /// [`USED_EXTENTS_MAX`] extents are looked at, and what they do not reach counts as
    /// allocated (a heavily fragmented device reports more than it holds, never a stall).
    fn used_bytes(&self) -> u64 {
        let size = self.size_bytes();
        let Ok(extents) = self.extents(0, size, USED_EXTENTS_MAX) else { return size };
        let seen: u64 = extents.iter().map(|e| e.len).sum();
        let holes: u64 = extents.iter().filter(|e| e.hole).map(|e| e.len).sum();
        size - holes.min(seen)
    }

    /// Whether all of `[offset, offset + len)` (non-empty, within the device) is unallocated:
    /// it reads as zeros and could be answered as a hole. Asked on every read only where
    /// [`DevInfo::cheap_extents`] says so; the default asks [`BlockDev::extents`].
    fn is_unallocated(&self, offset: u64, len: u64) -> bool {
        len > 0
            && matches!(self.extents(offset, len, 1), Ok(ext)
                if ext.len() == 1 && ext[0].hole && ext[0].len == len)
    }

    /// A read without I/O or copy, asked on core `core`: `[offset, offset + len)` (within the
    /// device) lent from the device's memory, for a protocol to queue on a plain socket send (the kernel copies
    /// the bytes when the send goes; nothing reads them before). `None` (the default, and for
    /// ranges a device would rather copy): submit an [`IoCmd::Read`]. A send concurrent with
    /// an overlapping write may carry a mix of old and new bytes, as a page-cache read may.
    fn lend(&self, core: usize, offset: u64, len: u64) -> Option<Lent> {
        let _ = (core, offset, len);
        None
    }

    /// A write without I/O: a device whose media is memory stores `data` at `offset` (within
    /// the device; never read-only) now, straight from the caller's bytes (a protocol's receive
    /// buffer), durable as any of its completed writes, and returns true. `false` (the default):
    /// submit an [`IoCmd::Write`].
    fn write_now(&self, offset: u64, data: &[u8]) -> bool {
        let _ = (offset, data);
        false
    }

    /// The other images this device can report its changes against (NBD's
    /// `qemu:dirty-bitmap:NAME` metadata contexts): a volume's kin — its snapshots, clones
    /// and origin (docs/VOLUMES.md, "Changes since a snapshot"). None by default.
    fn change_bases(&self) -> Vec<ChangeBase> {
        Vec::new()
    }

    /// Runs of `[offset, offset + len)` (within the device): (length, whether it may read
    /// differently from image `base`), in order, adjacent runs merged; the first `max`.
    /// `base` is a [`ChangeBase::id`]. A run reported unchanged reads the same in both (what an incremental
    /// copy relies on); one reported changed may still hold the same bytes (a cluster copied
    /// on write counts whole). An image deleted since it was listed: `NotFound`, also when
    /// another of the same name took its place (its id is another).
    fn changes(
        &self,
        base: u64,
        offset: u64,
        len: u64,
        max: usize,
    ) -> std::io::Result<Vec<(u64, bool)>> {
        let _ = (offset, len, max);
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no image {base} to compare with"),
        ))
    }

    /// Whether this core should take no new request for the device now: its I/O waiting for
    /// the device's rate limits holds all the payload memory it may on this core
    /// ([`crate::qos`]). A connection told so stops reading and parks
    /// ([`Cx::wait_for_memory`]); it is woken when that I/O drops below the limit. `again`:
    /// the connection was parked for it already (a re-check after a wake-up, not counted as
    /// another pause). False by default.
    fn held_back(&self, cx: &Cx<'_>, again: bool) -> bool {
        let _ = (cx, again);
        false
    }

    /// Whether [`IoCmd::WriteZeroes`] can be done at all (true, the default): false for a
    /// file whose filesystem has neither `fallocate` mode, an NVMe namespace without Write
    /// Zeroes. Front-ends then do not offer it (NBD must not fail a plain write-zeroes it
    /// offered with ENOTSUP; clients write the zeros themselves instead).
    fn zeroes_supported(&self) -> bool {
        true
    }

    /// Whether a write-zeroes (`may_unmap` as [`IoCmd::WriteZeroes`] has it) is quick: true,
    /// the default (memory, `fallocate` on a file, an NVMe Write Zeroes). A volume writes zeros
    /// where it may not unmap, a block device may have the kernel write them: NBD's FAST_ZERO
    /// is then refused at once (ENOTSUP), as the spec asks of a zeroing that would be slow.
    fn zeroes_are_fast(&self, may_unmap: bool) -> bool {
        let _ = may_unmap;
        true
    }

    /// Longest [`IoCmd::Discard`] or [`IoCmd::WriteZeroes`] this device takes as one command
    /// (a multiple of `info().min_block`): a longer one is given to it in pieces cut at
    /// multiples of this, one after another (NBD's extended headers let a request cover a
    /// whole export). Unbounded by default (a file's `fallocate`, a volume, which bound their
    /// own work); a memory device bounds the zeroing it does synchronously on a core, an NVMe
    /// namespace the commands one I/O may become.
    fn effect_piece_max(&self) -> u64 {
        u64::MAX
    }

    /// Whether every byte of a range reads zero after its [`IoCmd::Discard`] succeeds — what
    /// NVMe's DLFEAT tells hosts, which may then zero a range by deallocating it. True by
    /// default (memory, a hole punched in a file); false where a discard is only advisory (a
    /// volume's partial pieces, a block device, a filesystem without hole punching, an NVMe
    /// controller without DSM).
    fn discard_zeroes(&self) -> bool {
        true
    }

    /// Synchronous flush, for shutdown.
    fn flush_blocking(&self) -> std::io::Result<()>;
}

/// An image a device can report its changes against ([`BlockDev::change_bases`]): its name,
/// and an id that names that image alone while the device lives (a new image of the same name
/// gets another).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeBase {
    pub name: String,
    pub id: u64,
}

/// Merges adjacent extents with equal flags (helper for backends).
pub fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.hole == e.hole && last.zero == e.zero => last.len += e.len,
        _ => out.push(e),
    }
}

/// Checks that `[offset, offset + len)` lies within `size`.
pub fn in_range(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}
