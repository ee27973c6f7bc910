//! NVMe passthrough backend: a namespace's generic character device (`/dev/ngXnY`) driven
//! with NVMe I/O commands through each core's device ring (`IORING_OP_URING_CMD`), so every
//! command is issued by the core that serves the request, on the NVMe hardware queue the kernel
//! maps to that core, with no block layer, page cache or file system in between.
//!
//! Invariants:
//! - geometry comes from the device itself at open (Identify Namespace: size in LBAs, the LBA
//!   format in use; Identify Controller: MDTS, the optional commands supported, the volatile
//!   write cache) and never changes; formats with metadata are refused;
//! - every request is whole LBAs: offset and length are multiples of the LBA size (advertised
//!   as `min_block`), otherwise it fails with EINVAL (a discard is shrunk to the LBAs it
//!   covers whole, since it is advisory); nothing is read-modify-written here;
//! - FLUSH is an NVMe Flush when the controller has a volatile write cache, and completes at
//!   once otherwise (completed writes are then already durable); a Flush issued on any core
//!   covers writes completed on every core (the cache is the controller's);
//! - discard is Dataset Management / deallocate, and is skipped where the controller lacks
//!   it; write-zeroes is Write Zeroes (Deallocate set when unmapping is allowed) and fails
//!   with EOPNOTSUPP where the controller lacks it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use ballast_ffi::nvme::{self, NLB_MAX};
use ballast_ffi::{IoBuf, NvmeIo, NvmeNs, Owned};

use crate::blockdev::{in_range, push_extent, BlockDev, DevInfo, Extent, IoCmd};
use crate::reactor::Cx;

/// Data per command when the kernel's queue limits cannot be read.
const MAX_DATA_BYTES_DEFAULT: u64 = 128 << 10;
/// Data per command at most, whatever the device allows (larger requests are split).
const MAX_DATA_BYTES_CAP: u64 = 1 << 20;
/// The controller memory page size MDTS counts in (CAP.MPSMIN; 4 KiB on every controller
/// Linux drives with 4 KiB pages).
const MDTS_UNIT_BYTES: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum NvmeDevError {
    #[error("{path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error(
        "{path}: not a character device; the passthrough backend takes a namespace's generic \
         device, /dev/ngXnY (the block device /dev/nvmeXnY is served by file:)"
    )]
    NotCharDevice { path: PathBuf },
    #[error("{path}: not an NVMe namespace (NVME_IOCTL_ID: {source})")]
    NotNamespace { path: PathBuf, source: std::io::Error },
    #[error("{path}: Identify {what} failed (needs CAP_SYS_ADMIN): {source}")]
    Identify { path: PathBuf, what: &'static str, source: std::io::Error },
    #[error("{path}: unsupported namespace format: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// What Identify Namespace (CNS 00h) says, in the fields this backend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NsIdentity {
    /// NSZE: size in LBAs.
    pub size_lbas: u64,
    /// LBADS of the format in use: log2 of the LBA size.
    pub lba_shift: u32,
    /// MS of the format in use: metadata bytes per LBA.
    pub metadata_bytes: u16,
}

/// What Identify Controller (CNS 01h) says, in the fields this backend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtrlIdentity {
    /// MDTS: log2 of the largest transfer in units of the minimum page size; 0: no limit.
    pub mdts: u8,
    /// ONCS bit 2: Dataset Management.
    pub dsm: bool,
    /// ONCS bit 3: Write Zeroes.
    pub write_zeroes: bool,
    /// VWC bit 0: a volatile write cache is present.
    pub volatile_cache: bool,
}

/// Parses Identify Namespace (NVM Command Set 1.0, figure 97): NSZE @0, FLBAS @26 (format
/// index in bits 3:0 and, past 16 formats, 6:5), LBA formats @128, 4 bytes each (MS @0,
/// LBADS @2).
pub fn parse_identify_ns(data: &[u8]) -> Result<NsIdentity, String> {
    if data.len() < nvme::IDENTIFY_BYTES {
        return Err(format!("Identify Namespace is {} bytes, not 4096", data.len()));
    }
    let size_lbas = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
    let flbas = data[26];
    let index = usize::from(flbas & 0x0f) | usize::from((flbas >> 5) & 0x03) << 4;
    let format = &data[128 + 4 * index..132 + 4 * index];
    let metadata_bytes = u16::from_le_bytes([format[0], format[1]]);
    let lba_shift = u32::from(format[2]);
    if !(9..=16).contains(&lba_shift) {
        return Err(format!("LBA format {index} has 2^{lba_shift}-byte LBAs"));
    }
    if size_lbas == 0 {
        return Err("the namespace has no LBAs".into());
    }
    Ok(NsIdentity { size_lbas, lba_shift, metadata_bytes })
}

/// Parses Identify Controller (Base Specification 2.0, figure 275): MDTS @77, ONCS @520,
/// VWC @525.
pub fn parse_identify_ctrl(data: &[u8]) -> Result<CtrlIdentity, String> {
    if data.len() < nvme::IDENTIFY_BYTES {
        return Err(format!("Identify Controller is {} bytes, not 4096", data.len()));
    }
    let oncs = u16::from_le_bytes([data[520], data[521]]);
    Ok(CtrlIdentity {
        mdts: data[77],
        dsm: oncs & (1 << 2) != 0,
        write_zeroes: oncs & (1 << 3) != 0,
        volatile_cache: data[525] & 1 != 0,
    })
}

/// The most data one command may carry: the smallest of MDTS, the kernel queue's limits
/// (`max_hw_sectors_kb`; `max_segments` pages, since a user buffer's pages need not be
/// physically contiguous) and `MAX_DATA_BYTES_CAP`; `MAX_DATA_BYTES_DEFAULT` stands in for
/// unreadable queue limits.
pub fn max_data_bytes(mdts: u8, max_hw_kb: Option<u64>, max_segments: Option<u64>) -> u64 {
    let mut limit = MAX_DATA_BYTES_CAP;
    if mdts != 0 {
        limit = limit.min(MDTS_UNIT_BYTES << mdts.min(20));
    }
    match (max_hw_kb, max_segments) {
        (None, None) => limit = limit.min(MAX_DATA_BYTES_DEFAULT),
        (hw, segments) => {
            limit = limit.min(hw.map_or(u64::MAX, |kb| kb << 10));
            limit = limit.min(segments.map_or(u64::MAX, |s| s * 4096));
        }
    }
    limit
}

/// `[offset, offset + len)` in whole LBAs: `(slba, nlb)`, or None when not aligned.
pub fn to_lbas(offset: u64, len: u64, lba_shift: u32) -> Option<(u64, u64)> {
    let mask = (1u64 << lba_shift) - 1;
    if offset & mask != 0 || len & mask != 0 {
        return None;
    }
    Some((offset >> lba_shift, len >> lba_shift))
}

/// The whole LBAs inside `[offset, offset + len)` (for advisory discards): `(slba, nlb)`.
pub fn inner_lbas(offset: u64, len: u64, lba_shift: u32) -> (u64, u64) {
    let lba = 1u64 << lba_shift;
    let start = offset.div_ceil(lba);
    let end = (offset + len) / lba;
    (start, end.saturating_sub(start))
}

pub struct NvmeDev {
    file: File,
    ns: NvmeNs,
    info: DevInfo,
    size_bytes: u64,
    ctrl: CtrlIdentity,
}

impl NvmeDev {
    /// Opens the namespace's generic character device `path` (`/dev/ngXnY`) and reads its
    /// geometry. Needs CAP_SYS_ADMIN (Identify is an admin command). `read_only` opens it
    /// for reading (the kernel then refuses commands that write).
    pub fn open(path: &Path, read_only: bool) -> Result<NvmeDev, NvmeDevError> {
        let path_buf = path.to_path_buf();
        let open_err = |source| NvmeDevError::Open { path: path_buf.clone(), source };
        let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(open_err)?;
        let is_char = file.metadata().map_err(open_err)?.file_type().is_char_device();
        if !is_char {
            return Err(NvmeDevError::NotCharDevice { path: path_buf });
        }
        let nsid = nvme::namespace_id(&file)
            .map_err(|source| NvmeDevError::NotNamespace { path: path_buf.clone(), source })?;
        let identify = |what, nsid, cns| {
            nvme::identify(&file, nsid, cns).map_err(|source| NvmeDevError::Identify {
                path: path_buf.clone(),
                what,
                source,
            })
        };
        let format = |reason| NvmeDevError::Format { path: path_buf.clone(), reason };
        let id_ns = identify("Namespace", nsid, nvme::CNS_NAMESPACE)?;
        let ns_id = parse_identify_ns(id_ns.as_slice()).map_err(format)?;
        let id_ctrl = identify("Controller", 0, nvme::CNS_CONTROLLER)?;
        let mut ctrl = parse_identify_ctrl(id_ctrl.as_slice()).map_err(format)?;
        if ns_id.metadata_bytes != 0 {
            return Err(format(format!(
                "{} metadata bytes per LBA (format the namespace without metadata)",
                ns_id.metadata_bytes
            )));
        }
        let queue = queue_dir(path);
        let read_limit = |name: &str| -> Option<u64> {
            let text = std::fs::read_to_string(queue.as_ref()?.join(name)).ok()?;
            text.trim().parse().ok()
        };
        let data_bytes =
            max_data_bytes(ctrl.mdts, read_limit("max_hw_sectors_kb"), read_limit("max_segments"));
        let lba_bytes = 1u64 << ns_id.lba_shift;
        let max_data_lbas = (data_bytes / lba_bytes).clamp(1, u64::from(NLB_MAX)) as u32;
        let zeroes_limit = read_limit("write_zeroes_max_bytes");
        if zeroes_limit == Some(0) {
            // The kernel turned Write Zeroes off for this device (a quirk: it misbehaves):
            // none is sent through passthrough either.
            ctrl.write_zeroes = false;
        }
        let zeroes_lbas =
            zeroes_limit.filter(|&b| b >= lba_bytes).map_or(u64::from(NLB_MAX), |b| b / lba_bytes);
        let max_zeroes_lbas = zeroes_lbas.clamp(1, u64::from(NLB_MAX)) as u32;
        let ns = NvmeNs {
            fd: file.as_raw_fd(),
            nsid,
            lba_shift: ns_id.lba_shift,
            max_data_lbas,
            max_zeroes_lbas,
        };
        let size_bytes = ns_id
            .size_lbas
            .checked_mul(lba_bytes)
            .ok_or_else(|| format("the namespace's size overflows 64 bits".into()))?;
        let info = DevInfo {
            block_size: (lba_bytes as u32).max(4096),
            min_block: lba_bytes as u32,
            read_only,
            backend: format!(
                "nvme:{} (passthrough, nsid {nsid}, {lba_bytes}-byte LBAs)",
                path.display()
            ),
            cheap_extents: false,
            stats_id: crate::stats::device_id(),
        };
        tracing::info!(
            path = %path.display(),
            nsid,
            lba_bytes,
            size_bytes,
            max_transfer_bytes = u64::from(max_data_lbas) * lba_bytes,
            write_zeroes = ctrl.write_zeroes,
            deallocate = ctrl.dsm,
            volatile_cache = ctrl.volatile_cache,
            "NVMe namespace opened for passthrough"
        );
        if !ctrl.write_zeroes {
            tracing::warn!(path = %path.display(), "no Write Zeroes: write-zeroes requests fail");
        }
        Ok(NvmeDev { file, ns, info, size_bytes, ctrl })
    }

    /// The namespace and per-command limits the ring uses.
    pub fn namespace(&self) -> NvmeNs {
        self.ns
    }

    /// Blocking access to the same namespace (its own descriptor), for what runs off the
    /// cores: opening and formatting a pool on it.
    pub fn blocking(&self) -> std::io::Result<NvmeDisk> {
        let file = self.file.try_clone()?;
        let ns = NvmeNs { fd: file.as_raw_fd(), ..self.ns };
        Ok(NvmeDisk { file, ns, size_bytes: self.size_bytes })
    }

    fn fail(cx: &mut Cx<'_>, tag: u32, errno: i32, buf: Option<IoBuf>) {
        cx.complete(tag, -errno, buf.map_or(Owned::None, Owned::Buf));
    }

    /// Submits `io`, unless it would take more than `PARTS_MAX` commands (a controller with
    /// tiny transfer limits and a huge request): then EINVAL, never a panic.
    fn start(&self, cx: &mut Cx<'_>, io: NvmeIo, tag: u32) {
        if nvme::part_count(&self.ns, &io) > nvme::PARTS_MAX as u64 {
            let buf = match io {
                NvmeIo::Read { buf, .. } | NvmeIo::Write { buf, .. } => Some(buf),
                _ => None,
            };
            return Self::fail(cx, tag, libc::EINVAL, buf);
        }
        cx.submit_nvme(&self.ns, io, tag);
    }
}

/// A namespace driven by blocking passthrough ioctls: whole LBAs only, like the ring path.
pub struct NvmeDisk {
    file: File,
    ns: NvmeNs,
    size_bytes: u64,
}

impl NvmeDisk {
    fn lbas(&self, offset: u64, len: usize) -> std::io::Result<u64> {
        to_lbas(offset, len as u64, self.ns.lba_shift)
            .filter(|_| len > 0 && in_range(offset, len as u64, self.size_bytes))
            .map(|(slba, _)| slba)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))
    }

    pub fn read(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let slba = self.lbas(offset, len)?;
        let mut io = NvmeIo::Read { slba, buf: IoBuf::zeroed(len) };
        nvme::io_blocking(&self.file, &self.ns, &mut io)?;
        let NvmeIo::Read { buf, .. } = io else { unreachable!("a read stays a read") };
        Ok(buf.as_slice().to_vec())
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        let slba = self.lbas(offset, data.len())?;
        let mut buf = IoBuf::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        nvme::io_blocking(&self.file, &self.ns, &mut NvmeIo::Write { slba, buf, fua })
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        nvme::flush_blocking(&self.file, self.ns.nsid)
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
}

/// The longest Write Zeroes one I/O may be on `ns`: [`nvme::PARTS_MAX`] commands' worth.
fn zeroes_piece(ns: &NvmeNs) -> u64 {
    (nvme::PARTS_MAX as u64 * u64::from(ns.max_zeroes_lbas)) << ns.lba_shift
}

/// `/sys/block/nvmeXnY/queue` for `/dev/ngXnY` (the namespace's block device, when the
/// kernel made one; its queue limits bound passthrough commands too).
fn queue_dir(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix("ng")?;
    let dir = PathBuf::from(format!("/sys/block/nvme{rest}/queue"));
    dir.is_dir().then_some(dir)
}

impl BlockDev for NvmeDev {
    fn info(&self) -> &DevInfo {
        &self.info
    }

    /// A controller without DSM completes a discard without doing it; one with it says in
    /// its own DLFEAT what deallocated blocks read, which is not passed through: no promise.
    fn discard_zeroes(&self) -> bool {
        false
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn submit(&self, cx: &mut Cx<'_>, cmd: IoCmd, tag: u32) {
        let size = self.size_bytes;
        let shift = self.ns.lba_shift;
        match cmd {
            IoCmd::Read { offset, buf } | IoCmd::Write { offset, buf, .. } if buf.is_empty() => {
                assert!(offset <= size);
                cx.complete(tag, 0, Owned::Buf(buf));
            }
            IoCmd::Read { offset, buf } => {
                assert!(in_range(offset, buf.len() as u64, size));
                match to_lbas(offset, buf.len() as u64, shift) {
                    Some((slba, _)) => self.start(cx, NvmeIo::Read { slba, buf }, tag),
                    None => Self::fail(cx, tag, libc::EINVAL, Some(buf)),
                }
            }
            IoCmd::Write { offset, buf, fua } => {
                assert!(!self.info.read_only);
                assert!(in_range(offset, buf.len() as u64, size));
                match to_lbas(offset, buf.len() as u64, shift) {
                    Some((slba, _)) => self.start(cx, NvmeIo::Write { slba, buf, fua }, tag),
                    None => Self::fail(cx, tag, libc::EINVAL, Some(buf)),
                }
            }
            IoCmd::Flush if self.info.read_only || !self.ctrl.volatile_cache => {
                cx.complete(tag, 0, Owned::None)
            }
            IoCmd::Flush => self.start(cx, NvmeIo::Flush, tag),
            IoCmd::Discard { offset, len } => {
                assert!(!self.info.read_only);
                assert!(in_range(offset, len, size));
                let (slba, nlb) = inner_lbas(offset, len, shift);
                if nlb == 0 || !self.ctrl.dsm {
                    cx.complete(tag, 0, Owned::None);
                } else {
                    self.start(cx, NvmeIo::Deallocate { slba, nlb }, tag);
                }
            }
            IoCmd::WriteZeroes { offset, len, may_unmap } => {
                assert!(!self.info.read_only);
                assert!(in_range(offset, len, size));
                match to_lbas(offset, len, shift) {
                    _ if len == 0 => cx.complete(tag, 0, Owned::None),
                    _ if !self.ctrl.write_zeroes => Self::fail(cx, tag, libc::EOPNOTSUPP, None),
                    Some((slba, nlb)) => {
                        let io = NvmeIo::WriteZeroes { slba, nlb, deallocate: may_unmap };
                        self.start(cx, io, tag);
                    }
                    None => Self::fail(cx, tag, libc::EINVAL, None),
                }
            }
        }
    }

    fn zeroes_supported(&self) -> bool {
        self.ctrl.write_zeroes
    }

    /// What one I/O of [`nvme::PARTS_MAX`] Write Zeroes commands covers (a Deallocate takes
    /// far more: one range per 2^32 LBAs): longer ones come in pieces instead of being refused.
    fn effect_piece_max(&self) -> u64 {
        zeroes_piece(&self.ns)
    }

    fn extents(&self, offset: u64, len: u64, _max: usize) -> std::io::Result<Vec<Extent>> {
        // Allocation is the controller's business (Get LBA Status is optional): all data.
        let end = offset.saturating_add(len).min(self.size_bytes);
        let mut out = Vec::new();
        push_extent(&mut out, Extent { len: end.saturating_sub(offset), hole: false, zero: false });
        Ok(out)
    }

    fn flush_blocking(&self) -> std::io::Result<()> {
        if self.info.read_only || !self.ctrl.volatile_cache {
            return Ok(());
        }
        nvme::flush_blocking(&self.file, self.ns.nsid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_ns(nsze: u64, flbas: u8, formats: &[(u16, u8)]) -> Vec<u8> {
        let mut d = vec![0u8; 4096];
        d[0..8].copy_from_slice(&nsze.to_le_bytes());
        d[25] = formats.len() as u8 - 1;
        d[26] = flbas;
        for (i, (ms, lbads)) in formats.iter().enumerate() {
            d[128 + 4 * i..130 + 4 * i].copy_from_slice(&ms.to_le_bytes());
            d[130 + 4 * i] = *lbads;
        }
        d
    }

    #[test]
    fn identify_namespace_reads_the_format_in_use() {
        let d = id_ns(1 << 20, 1, &[(0, 9), (0, 12), (8, 12)]);
        let ns = parse_identify_ns(&d).unwrap();
        assert_eq!(ns, NsIdentity { size_lbas: 1 << 20, lba_shift: 12, metadata_bytes: 0 });
        let with_md = parse_identify_ns(&id_ns(8, 2, &[(0, 9), (0, 12), (8, 12)])).unwrap();
        assert_eq!(with_md.metadata_bytes, 8);
        // Format index 17: bits 3:0 = 1, bits 6:5 = 1.
        let mut formats = vec![(0u16, 9u8); 18];
        formats[17] = (0, 12);
        let high = parse_identify_ns(&id_ns(8, 0x21, &formats)).unwrap();
        assert_eq!(high.lba_shift, 12);
        assert!(parse_identify_ns(&id_ns(0, 0, &[(0, 9)])).is_err(), "no LBAs");
        assert!(parse_identify_ns(&id_ns(8, 0, &[(0, 0)])).is_err(), "LBADS 0");
        assert!(parse_identify_ns(&[0u8; 100]).is_err());
    }

    #[test]
    fn identify_controller_fields() {
        let mut d = vec![0u8; 4096];
        d[77] = 7;
        d[520] = 0b1100;
        d[525] = 1;
        let c = parse_identify_ctrl(&d).unwrap();
        let want = CtrlIdentity { mdts: 7, dsm: true, write_zeroes: true, volatile_cache: true };
        assert_eq!(c, want);
        d[520] = 0b0100;
        d[525] = 0;
        let c = parse_identify_ctrl(&d).unwrap();
        assert!(c.dsm && !c.write_zeroes && !c.volatile_cache);
    }

    #[test]
    fn transfer_limit_is_the_smallest_known_bound() {
        // qemu's default MDTS 7 (512 KiB), a 128-segment queue allowing 512 KiB.
        assert_eq!(max_data_bytes(7, Some(512), Some(128)), 512 << 10);
        assert_eq!(max_data_bytes(5, Some(2048), Some(256)), 128 << 10, "MDTS wins");
        assert_eq!(max_data_bytes(0, Some(4096), Some(33)), 33 * 4096, "segments win");
        assert_eq!(max_data_bytes(0, None, None), MAX_DATA_BYTES_DEFAULT);
        assert_eq!(max_data_bytes(0, Some(1 << 20), None), MAX_DATA_BYTES_CAP);
    }

    #[test]
    fn byte_ranges_to_lbas() {
        assert_eq!(to_lbas(4096, 8192, 12), Some((1, 2)));
        assert_eq!(to_lbas(512, 1024, 9), Some((1, 2)));
        assert_eq!(to_lbas(512, 4096, 12), None);
        assert_eq!(to_lbas(4096, 100, 12), None);
        assert_eq!(inner_lbas(100, 10_000, 12), (1, 1));
        assert_eq!(inner_lbas(100, 1000, 12), (1, 0));
        assert_eq!(inner_lbas(0, 8192, 12), (0, 2));
    }

    /// A piece of `effect_piece_max` is the longest Write Zeroes (and Deallocate) the
    /// namespace takes as one I/O: one LBA more would be refused.
    #[test]
    fn the_longest_effect_is_what_one_io_may_carry() {
        for (lba_shift, max_zeroes_lbas) in [(9, 8), (12, 1), (9, 1 << 16), (12, 256)] {
            let ns = NvmeNs { fd: 3, nsid: 1, lba_shift, max_data_lbas: 8, max_zeroes_lbas };
            let nlb = zeroes_piece(&ns) >> lba_shift;
            let io = |nlb| NvmeIo::WriteZeroes { slba: 0, nlb, deallocate: true };
            assert_eq!(nvme::part_count(&ns, &io(nlb)), nvme::PARTS_MAX as u64);
            assert!(nvme::part_count(&ns, &io(nlb + 1)) > nvme::PARTS_MAX as u64);
            let dsm = NvmeIo::Deallocate { slba: 0, nlb };
            assert!(nvme::part_count(&ns, &dsm) <= nvme::PARTS_MAX as u64);
            assert_eq!(zeroes_piece(&ns) % (1 << lba_shift), 0, "whole LBAs");
        }
    }

    /// The reactor side of passthrough without an NVMe device: a task submits a split read
    /// through [`Cx::submit_nvme`] on /dev/null (newer kernels complete any uring_cmd there with
    /// 0; older ones refuse it) and gets exactly one completion, with its buffer; on an engine
    /// without a device ring the same call completes with EOPNOTSUPP.
    #[test]
    fn reactor_carries_passthrough_io_to_the_device_ring_and_back() {
        use crate::reactor::{DeviceRingConfig, Engine, EngineConfig, Msg, Task};
        use std::os::fd::AsRawFd;

        struct Probe {
            file: File,
            done: bool,
            tx: crossbeam_channel::Sender<(i32, usize)>,
        }
        impl Task for Probe {
            fn start(&mut self, cx: &mut Cx<'_>) {
                let ns = NvmeNs {
                    fd: self.file.as_raw_fd(),
                    nsid: 1,
                    lba_shift: 9,
                    max_data_lbas: 8,
                    max_zeroes_lbas: 8,
                };
                let buf = cx.buf(20 * 512);
                cx.submit_nvme(&ns, NvmeIo::Read { slba: 0, buf }, 7);
            }
            fn on_completion(&mut self, _cx: &mut Cx<'_>, tag: u32, result: i32, owned: Owned) {
                assert_eq!(tag, 7);
                assert!(!self.done, "one completion per I/O");
                let len = owned.into_buf().map_or(0, |b| b.len());
                self.done = true;
                let _ = self.tx.send((result, len));
            }
            fn flush(&mut self, _cx: &mut Cx<'_>) {}
            fn on_shutdown(&mut self, _cx: &mut Cx<'_>) {}
            fn is_done(&self) -> bool {
                self.done
            }
        }
        let run = |device_ring: Option<DeviceRingConfig>| -> Option<(i32, usize)> {
            let config = EngineConfig { device_ring, ..EngineConfig::one_core_for_tests() };
            let engine = match Engine::start(config) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("skipped: {e}");
                    return None;
                }
            };
            let (tx, rx) = crossbeam_channel::bounded(1);
            let file = File::open("/dev/null").unwrap();
            let spawn = Msg::Spawn(Box::new(move |_cx: &mut Cx<'_>| {
                Box::new(Probe { file, done: false, tx }) as Box<dyn Task>
            }));
            assert!(engine.handles()[0].send_blocking(spawn));
            let got = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("a completion");
            engine.shutdown();
            Some(got)
        };
        if let Some((result, len)) = run(Some(DeviceRingConfig { entries: 8, poll: false })) {
            assert!(result == 20 * 512 || result < 0, "{result}");
            assert_eq!(len, 20 * 512);
        }
        if let Some((result, len)) = run(None) {
            assert_eq!(result, -libc::EOPNOTSUPP);
            assert_eq!(len, 20 * 512);
        }
    }
}
