//! NVMe I/O commands for io_uring passthrough (`IORING_OP_URING_CMD` on `/dev/ngXnY`): the
//! command encoding, how one logical I/O splits into commands the device accepts, the
//! completion status → errno mapping, and the blocking ioctls (namespace id, Identify, a
//! synchronous flush, synchronous reads and writes) used at open, format and shutdown.
//!
//! Everything here except the ioctls is pure: it builds bytes and numbers, and is
//! unit-tested against the layouts of the kernel's `include/uapi/linux/nvme_ioctl.h` and the
//! NVM Express Base / NVM Command Set specifications (sections cited per item).
//!
//! Invariants:
//! - a command's data range always lies inside the buffer the operation owns (checked by
//!   [`plan`]'s callers with `assert!` before any address reaches the kernel);
//! - a read or write command carries at most `max_data_lbas` LBAs, a Write Zeroes at most
//!   `max_zeroes_lbas` (≤ 65,536, the 16-bit NLB field), a Dataset Management range at most
//!   `u32::MAX` LBAs; one logical I/O never becomes more than [`PARTS_MAX`] commands.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use crate::buf::IoBuf;

/// NVM Command Set opcodes (NVM Command Set Specification 1.0, figure 18).
pub const OPC_FLUSH: u8 = 0x00;
pub const OPC_WRITE: u8 = 0x01;
pub const OPC_READ: u8 = 0x02;
pub const OPC_WRITE_ZEROES: u8 = 0x08;
pub const OPC_DSM: u8 = 0x09;
/// Admin opcode Identify (Base Specification 2.0, figure 138).
pub const OPC_IDENTIFY: u8 = 0x06;
/// Identify CNS values: the namespace (00h) and the controller (01h).
pub const CNS_NAMESPACE: u32 = 0x00;
pub const CNS_CONTROLLER: u32 = 0x01;
/// Size of an Identify data structure.
pub const IDENTIFY_BYTES: usize = 4096;

/// CDW12 bit 30: Force Unit Access (read, write, write zeroes).
pub const CDW12_FUA: u32 = 1 << 30;
/// CDW12 bit 25: Deallocate (Write Zeroes).
pub const CDW12_DEAC: u32 = 1 << 25;
/// CDW11 bit 2: Attribute – Deallocate (Dataset Management).
pub const CDW11_AD: u32 = 1 << 2;
/// Bytes of one Dataset Management range (context attributes, length in LBAs, starting LBA).
pub const DSM_RANGE_BYTES: usize = 16;
/// The NLB field of read/write/write zeroes is 16 bits, zero-based.
pub const NLB_MAX: u32 = 1 << 16;
/// Most commands one logical I/O may become.
pub const PARTS_MAX: usize = 4096;

/// Size of `struct nvme_uring_cmd` (and of `struct nvme_passthru_cmd`: the same layout, with
/// `result` where the former has `rsvd2`).
pub const URING_CMD_BYTES: usize = 72;
/// `NVME_URING_CMD_IO = _IOWR('N', 0x80, struct nvme_uring_cmd)`.
pub const NVME_URING_CMD_IO: u32 = ioc_readwrite(b'N', 0x80, URING_CMD_BYTES as u32);

const fn ioc_readwrite(kind: u8, nr: u8, size: u32) -> u32 {
    // _IOC(_IOC_READ | _IOC_WRITE, type, nr, size) on x86-64, arm64 and riscv.
    (3 << 30) | (size << 16) | ((kind as u32) << 8) | nr as u32
}

const _: () = assert!(NVME_URING_CMD_IO == 0xC048_4E80);
const _: () = assert!(URING_CMD_BYTES <= 80, "fits the SQE128 command area");
const _: () = assert!(PARTS_MAX * DSM_RANGE_BYTES <= 1 << 16);

/// Where a namespace is and what one command may carry; copied into every operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NvmeNs {
    /// The `/dev/ngXnY` character device.
    pub fd: RawFd,
    pub nsid: u32,
    /// log2 of the LBA size in bytes.
    pub lba_shift: u32,
    /// Most LBAs in one read or write command (from MDTS and the kernel's queue limits).
    pub max_data_lbas: u32,
    /// Most LBAs in one Write Zeroes command.
    pub max_zeroes_lbas: u32,
}

/// One logical NVMe I/O; [`plan`] splits it into device commands.
#[derive(Debug)]
pub enum NvmeIo {
    /// Read `buf.len()` bytes (a whole number of LBAs) starting at LBA `slba`.
    Read { slba: u64, buf: IoBuf },
    /// Write `buf[..len]` at `slba`; `fua`: durable before completion.
    Write { slba: u64, buf: IoBuf, fua: bool },
    /// Make every completed write durable (volatile write cache flush).
    Flush,
    /// `nlb` LBAs from `slba` read as zeros afterwards; `deallocate` lets the device unmap.
    WriteZeroes { slba: u64, nlb: u64, deallocate: bool },
    /// Dataset Management, attribute Deallocate, of `nlb` LBAs from `slba`.
    Deallocate { slba: u64, nlb: u64 },
}

/// One device command: the submission queue entry fields a passthrough command sets, and the
/// byte range of the operation's buffer it transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NvmeCmd {
    pub opcode: u8,
    pub nsid: u32,
    /// Command dwords 10 to 15.
    pub cdw: [u32; 6],
    /// `(offset, len)` in the operation's buffer, if the command transfers data.
    pub data: Option<(usize, usize)>,
}

impl NvmeCmd {
    fn new(opcode: u8, nsid: u32) -> NvmeCmd {
        NvmeCmd { opcode, nsid, cdw: [0; 6], data: None }
    }

    /// Starting LBA in CDW10 (low) and CDW11 (high); zero-based count and flags in CDW12.
    fn lba_range(mut self, slba: u64, nlb: u32, flags: u32) -> NvmeCmd {
        assert!(nlb >= 1, "an NVMe range holds at least one LBA");
        assert!(nlb <= NLB_MAX);
        self.cdw[0] = slba as u32;
        self.cdw[1] = (slba >> 32) as u32;
        self.cdw[2] = (nlb - 1) | flags;
        self
    }

    /// The 80-byte command area of an SQE128 for `IORING_OP_URING_CMD`: a `struct
    /// nvme_uring_cmd` (opcode @0, nsid @4, metadata @16, addr @24, metadata_len @32,
    /// data_len @36, cdw10..cdw15 @40..@64, timeout_ms @64), zero elsewhere.
    pub fn encode(&self, addr: u64, data_len: u32) -> [u8; 80] {
        let mut out = [0u8; 80];
        out[0] = self.opcode;
        out[4..8].copy_from_slice(&self.nsid.to_ne_bytes());
        out[24..32].copy_from_slice(&addr.to_ne_bytes());
        out[36..40].copy_from_slice(&data_len.to_ne_bytes());
        for (i, dw) in self.cdw.iter().enumerate() {
            out[40 + 4 * i..44 + 4 * i].copy_from_slice(&dw.to_ne_bytes());
        }
        out
    }
}

/// Calls `emit` with each command `io` becomes on namespace `ns`, in LBA order. Data ranges
/// refer to the I/O's buffer (read, write) or to the range list [`dsm_ranges`] builds
/// (deallocate). Returns the number of commands.
pub fn plan(ns: &NvmeNs, io: &NvmeIo, mut emit: impl FnMut(NvmeCmd)) -> usize {
    assert!(ns.max_data_lbas >= 1 && ns.max_data_lbas <= NLB_MAX);
    assert!(ns.max_zeroes_lbas >= 1 && ns.max_zeroes_lbas <= NLB_MAX);
    let lba_bytes = 1usize << ns.lba_shift;
    let mut count = 0;
    let mut each = |cmd: NvmeCmd| {
        count += 1;
        assert!(count <= PARTS_MAX, "one I/O split into more than {PARTS_MAX} commands");
        emit(cmd)
    };
    match io {
        NvmeIo::Read { slba, buf } | NvmeIo::Write { slba, buf, .. } => {
            let (opcode, flags) = match io {
                NvmeIo::Write { fua: true, .. } => (OPC_WRITE, CDW12_FUA),
                NvmeIo::Write { .. } => (OPC_WRITE, 0),
                _ => (OPC_READ, 0),
            };
            assert!(!buf.is_empty() && buf.len().is_multiple_of(lba_bytes));
            let total = (buf.len() / lba_bytes) as u64;
            for (lba, nlb) in chunks(*slba, total, u64::from(ns.max_data_lbas)) {
                let offset = ((lba - slba) as usize) * lba_bytes;
                let mut cmd = NvmeCmd::new(opcode, ns.nsid).lba_range(lba, nlb as u32, flags);
                cmd.data = Some((offset, nlb as usize * lba_bytes));
                each(cmd);
            }
        }
        NvmeIo::Flush => each(NvmeCmd::new(OPC_FLUSH, ns.nsid)),
        NvmeIo::WriteZeroes { slba, nlb, deallocate } => {
            let flags = if *deallocate { CDW12_DEAC } else { 0 };
            for (lba, count) in chunks(*slba, *nlb, u64::from(ns.max_zeroes_lbas)) {
                each(NvmeCmd::new(OPC_WRITE_ZEROES, ns.nsid).lba_range(lba, count as u32, flags));
            }
        }
        NvmeIo::Deallocate { slba, nlb } => {
            // One range per command (as the kernel's discard does): CDW10 NR = 0.
            for (i, _) in chunks(*slba, *nlb, u64::from(u32::MAX)).enumerate() {
                let mut cmd = NvmeCmd::new(OPC_DSM, ns.nsid);
                cmd.cdw[1] = CDW11_AD;
                cmd.data = Some((i * DSM_RANGE_BYTES, DSM_RANGE_BYTES));
                each(cmd);
            }
        }
    }
    count
}

/// How many commands [`plan`] makes of `io` (callers refuse I/Os above [`PARTS_MAX`]).
pub fn part_count(ns: &NvmeNs, io: &NvmeIo) -> u64 {
    match io {
        NvmeIo::Read { buf, .. } | NvmeIo::Write { buf, .. } => {
            ((buf.len() as u64) >> ns.lba_shift).div_ceil(u64::from(ns.max_data_lbas.max(1)))
        }
        NvmeIo::Flush => 1,
        NvmeIo::WriteZeroes { nlb, .. } => nlb.div_ceil(u64::from(ns.max_zeroes_lbas.max(1))),
        NvmeIo::Deallocate { nlb, .. } => nlb.div_ceil(u64::from(u32::MAX)),
    }
}

/// `[slba, slba + nlb)` in pieces of at most `max` LBAs: `(start, count)`.
fn chunks(slba: u64, nlb: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    assert!(nlb >= 1, "an NVMe I/O covers at least one LBA");
    assert!(slba.checked_add(nlb).is_some());
    (0..nlb.div_ceil(max)).map(move |i| {
        let start = i * max;
        (slba + start, max.min(nlb - start))
    })
}

/// The Dataset Management range list for deallocating `[slba, slba + nlb)`, one 16-byte range
/// per command [`plan`] emits (Base Specification 2.0 / NVM Command Set 1.0, figure 39:
/// context attributes @0, length in LBAs @4, starting LBA @8, little-endian).
pub fn dsm_ranges(slba: u64, nlb: u64) -> IoBuf {
    let count = nlb.div_ceil(u64::from(u32::MAX)) as usize;
    assert!(count <= PARTS_MAX);
    let mut buf = IoBuf::zeroed(count * DSM_RANGE_BYTES);
    for (i, (lba, len)) in chunks(slba, nlb, u64::from(u32::MAX)).enumerate() {
        let range = &mut buf.as_mut_slice()[i * DSM_RANGE_BYTES..(i + 1) * DSM_RANGE_BYTES];
        range[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        range[8..16].copy_from_slice(&lba.to_le_bytes());
    }
    buf
}

/// A passthrough completion's `res`: 0, a negative errno (the kernel failed the command), or
/// a positive NVMe status (the device did: status code in bits 0–7, status code type in bits
/// 8–10, DNR in bit 14). Returns 0 or a negative errno, as the block layer would
/// (drivers/nvme/host/core.c `nvme_error_status`, with finer errnos where they help).
pub fn status_to_errno(res: i32) -> i32 {
    if res <= 0 {
        return res;
    }
    let sct = (res >> 8) & 0x7;
    let sc = res & 0xff;
    let errno = match (sct, sc) {
        // Generic: invalid opcode, invalid field, invalid namespace or format.
        (0, 0x01) => libc::EOPNOTSUPP,
        (0, 0x02) => libc::EINVAL,
        (0, 0x0b) => libc::ENXIO,
        // Generic: namespace is write protected.
        (0, 0x20) => libc::EROFS,
        // Generic: LBA out of range, capacity exceeded.
        (0, 0x80) | (0, 0x81) => libc::ENOSPC,
        // Command specific: attempted write to a read-only range.
        (1, 0x82) => libc::EROFS,
        // Media and data integrity: access denied.
        (2, 0x86) => libc::EACCES,
        _ => libc::EIO,
    };
    -errno
}

/// `struct nvme_passthru_cmd` (`nvme_ioctl.h`), for the blocking ioctls.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PassthruCmd {
    pub opcode: u8,
    pub flags: u8,
    pub rsvd1: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub metadata: u64,
    pub addr: u64,
    pub metadata_len: u32,
    pub data_len: u32,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
    pub timeout_ms: u32,
    pub result: u32,
}

const _: () = assert!(std::mem::size_of::<PassthruCmd>() == URING_CMD_BYTES);

nix::ioctl_none!(nvme_ioctl_id, b'N', 0x40);
nix::ioctl_readwrite!(nvme_ioctl_admin_cmd, b'N', 0x41, PassthruCmd);
nix::ioctl_readwrite!(nvme_ioctl_io_cmd, b'N', 0x43, PassthruCmd);

/// The namespace id of an NVMe namespace device (`NVME_IOCTL_ID`).
pub fn namespace_id(file: &File) -> std::io::Result<u32> {
    // SAFETY: NVME_IOCTL_ID takes no argument and returns the id; the fd is valid because
    // `file` is borrowed for the call.
    let id = unsafe { nvme_ioctl_id(file.as_raw_fd()) }.map_err(std::io::Error::from)?;
    u32::try_from(id).map_err(|_| std::io::Error::other("negative namespace id"))
}

/// Runs one admin Identify (`cns`, for `nsid`) on the namespace's device; returns the 4 KiB
/// data structure. Needs CAP_SYS_ADMIN.
pub fn identify(file: &File, nsid: u32, cns: u32) -> std::io::Result<IoBuf> {
    let mut data = IoBuf::zeroed(IDENTIFY_BYTES);
    let mut cmd = PassthruCmd {
        opcode: OPC_IDENTIFY,
        nsid,
        addr: data.raw_at(0) as u64,
        data_len: IDENTIFY_BYTES as u32,
        cdw10: cns,
        ..PassthruCmd::default()
    };
    // SAFETY: the kernel writes at most `data_len` (4096) bytes to `addr`, which points at
    // `data`, owned here and alive (not moved) until the ioctl returns; `cmd` is a valid
    // `nvme_passthru_cmd` for the call's duration; the fd is borrowed.
    let status = unsafe { nvme_ioctl_admin_cmd(file.as_raw_fd(), &mut cmd) }
        .map_err(std::io::Error::from)?;
    status_result(status)?;
    Ok(data)
}

/// Flushes the namespace's volatile write cache, waiting for it (`NVME_IOCTL_IO_CMD`).
pub fn flush_blocking(file: &File, nsid: u32) -> std::io::Result<()> {
    let mut cmd = PassthruCmd { opcode: OPC_FLUSH, nsid, ..PassthruCmd::default() };
    // SAFETY: Flush transfers no data (addr 0, data_len 0); `cmd` is valid for the call; the fd
    // is borrowed.
    let status =
        unsafe { nvme_ioctl_io_cmd(file.as_raw_fd(), &mut cmd) }.map_err(std::io::Error::from)?;
    status_result(status)
}

/// Runs a read or write (`io`, whole LBAs) on the namespace and waits for it
/// (`NVME_IOCTL_IO_CMD`, one command per [`plan`] part, in LBA order): for the blocking paths
/// that open and format a pool on a namespace. Read data lands in the I/O's buffer. An I/O
/// that would take more than [`PARTS_MAX`] commands fails with EINVAL.
pub fn io_blocking(file: &File, ns: &NvmeNs, io: &mut NvmeIo) -> std::io::Result<()> {
    if part_count(ns, io) > PARTS_MAX as u64 {
        // As the ring path does: too many commands for one I/O is the caller's error.
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut cmds = Vec::new();
    plan(ns, io, |cmd| cmds.push(cmd));
    let buf = match io {
        NvmeIo::Read { buf, .. } | NvmeIo::Write { buf, .. } => buf,
        NvmeIo::Flush => return flush_blocking(file, ns.nsid),
        _ => return Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
    };
    for c in cmds {
        let (offset, len) = c.data.expect("reads and writes transfer data");
        assert!(offset + len <= buf.len(), "a command's data inside its buffer");
        let mut cmd = PassthruCmd {
            opcode: c.opcode,
            nsid: c.nsid,
            addr: buf.raw_at(offset) as u64,
            data_len: len as u32,
            cdw10: c.cdw[0],
            cdw11: c.cdw[1],
            cdw12: c.cdw[2],
            cdw13: c.cdw[3],
            cdw14: c.cdw[4],
            cdw15: c.cdw[5],
            ..PassthruCmd::default()
        };
        // SAFETY: the kernel reads or writes at most `data_len` bytes at `addr`, which lie
        // inside `buf` (asserted above), borrowed mutably here and so alive and unmoved until
        // the ioctl returns; `cmd` is a valid `nvme_passthru_cmd` for the call; the fd is
        // borrowed.
        let status = unsafe { nvme_ioctl_io_cmd(file.as_raw_fd(), &mut cmd) }
            .map_err(std::io::Error::from)?;
        status_result(status)?;
    }
    Ok(())
}

fn status_result(status: i32) -> std::io::Result<()> {
    match status_to_errno(status) {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(-e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(lba_shift: u32, max_data_lbas: u32) -> NvmeNs {
        NvmeNs { fd: 3, nsid: 1, lba_shift, max_data_lbas, max_zeroes_lbas: NLB_MAX }
    }

    fn collect(ns: &NvmeNs, io: &NvmeIo) -> Vec<NvmeCmd> {
        let mut out = Vec::new();
        let n = plan(ns, io, |c| out.push(c));
        assert_eq!(n, out.len());
        out
    }

    fn dword(bytes: &[u8; 80], at: usize) -> u32 {
        u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn encoding_matches_struct_nvme_uring_cmd() {
        let cmd = NvmeCmd { opcode: OPC_WRITE, nsid: 7, cdw: [1, 2, 3, 4, 5, 6], data: None };
        let bytes = cmd.encode(0x1122_3344_5566_7788, 8192);
        assert_eq!(bytes[0], OPC_WRITE);
        assert_eq!(bytes[1], 0, "flags");
        assert_eq!(dword(&bytes, 4), 7, "nsid");
        assert_eq!(&bytes[8..24], &[0u8; 16], "cdw2, cdw3, metadata");
        assert_eq!(u64::from_ne_bytes(bytes[24..32].try_into().unwrap()), 0x1122_3344_5566_7788);
        assert_eq!(dword(&bytes, 32), 0, "metadata_len");
        assert_eq!(dword(&bytes, 36), 8192, "data_len");
        for i in 0..6 {
            assert_eq!(dword(&bytes, 40 + 4 * i), i as u32 + 1, "cdw{}", 10 + i);
        }
        assert_eq!(&bytes[64..], &[0u8; 16], "timeout_ms, rsvd2, the unused tail");
    }

    #[test]
    fn read_and_write_fields() {
        let ns = ns(9, 256);
        let slba = 0x1_0000_0010;
        let read = collect(&ns, &NvmeIo::Read { slba, buf: IoBuf::zeroed(4096) });
        assert_eq!(
            read,
            [NvmeCmd {
                opcode: OPC_READ,
                nsid: 1,
                cdw: [0x10, 1, 7, 0, 0, 0],
                data: Some((0, 4096))
            }]
        );
        let write = collect(&ns, &NvmeIo::Write { slba: 5, buf: IoBuf::zeroed(512), fua: true });
        assert_eq!(write[0].opcode, OPC_WRITE);
        assert_eq!(write[0].cdw[..3], [5, 0, CDW12_FUA]);
        let plain = collect(&ns, &NvmeIo::Write { slba: 5, buf: IoBuf::zeroed(512), fua: false });
        assert_eq!(plain[0].cdw[2], 0, "NLB 0 means one LBA; no FUA");
    }

    #[test]
    fn large_transfers_split_at_the_data_limit_and_cover_the_buffer() {
        // 4 KiB LBAs, at most 32 per command (128 KiB): 1 MiB + 4 KiB becomes 9 commands.
        let ns = ns(12, 32);
        let io = NvmeIo::Read { slba: 100, buf: IoBuf::zeroed((256 + 1) << 12) };
        let cmds = collect(&ns, &io);
        assert_eq!(cmds.len(), 9);
        assert_eq!(part_count(&ns, &io), 9);
        let mut next_lba = 100u64;
        let mut next_byte = 0usize;
        for c in &cmds {
            let (offset, len) = c.data.unwrap();
            assert_eq!(u64::from(c.cdw[0]), next_lba);
            assert_eq!(offset, next_byte);
            assert_eq!(len, ((c.cdw[2] & 0xffff) as usize + 1) << 12);
            assert!(c.cdw[2] & 0xffff < 32);
            next_lba += u64::from(c.cdw[2] & 0xffff) + 1;
            next_byte += len;
        }
        assert_eq!(next_byte, (256 + 1) << 12);
    }

    #[test]
    fn flush_write_zeroes_and_deallocate_fields() {
        let ns = ns(9, 256);
        let flush = collect(&ns, &NvmeIo::Flush);
        assert_eq!(flush, [NvmeCmd { opcode: OPC_FLUSH, nsid: 1, cdw: [0; 6], data: None }]);

        let zeroes = NvmeIo::WriteZeroes { slba: 8, nlb: NLB_MAX as u64 + 2, deallocate: true };
        let z = collect(&ns, &zeroes);
        assert_eq!(z.len(), 2);
        assert_eq!(part_count(&ns, &zeroes), 2);
        assert_eq!(z[0].opcode, OPC_WRITE_ZEROES);
        assert_eq!(z[0].cdw[..3], [8, 0, 0xffff | CDW12_DEAC]);
        assert_eq!(z[1].cdw[..3], [8 + NLB_MAX, 0, 1 | CDW12_DEAC]);
        assert_eq!(z[1].data, None);
        let keep = collect(&ns, &NvmeIo::WriteZeroes { slba: 0, nlb: 1, deallocate: false });
        assert_eq!(keep[0].cdw[2], 0);

        let d = collect(&ns, &NvmeIo::Deallocate { slba: 1 << 33, nlb: 1000 });
        assert_eq!(
            d,
            [NvmeCmd {
                opcode: OPC_DSM,
                nsid: 1,
                cdw: [0, CDW11_AD, 0, 0, 0, 0],
                data: Some((0, 16))
            }]
        );
        let ranges = dsm_ranges(1 << 33, 1000);
        assert_eq!(ranges.as_slice()[..4], [0, 0, 0, 0], "context attributes");
        assert_eq!(ranges.as_slice()[4..8], 1000u32.to_le_bytes());
        assert_eq!(ranges.as_slice()[8..16], (1u64 << 33).to_le_bytes());
    }

    #[test]
    fn huge_deallocate_uses_one_range_per_command() {
        let ns = ns(9, 256);
        let nlb = u64::from(u32::MAX) + 10;
        let d = collect(&ns, &NvmeIo::Deallocate { slba: 0, nlb });
        assert_eq!(d.len(), 2);
        assert_eq!(d[1].data, Some((16, 16)));
        let r = dsm_ranges(0, nlb);
        assert_eq!(r.len(), 32);
        assert_eq!(r.as_slice()[20..24], 10u32.to_le_bytes());
        assert_eq!(r.as_slice()[24..32], u64::from(u32::MAX).to_le_bytes());
    }

    #[test]
    fn statuses_map_to_errnos() {
        assert_eq!(status_to_errno(0), 0);
        assert_eq!(status_to_errno(-libc::EINTR), -libc::EINTR);
        assert_eq!(status_to_errno(0x0002), -libc::EINVAL);
        assert_eq!(status_to_errno(0x4002), -libc::EINVAL, "DNR does not change the status");
        assert_eq!(status_to_errno(0x0080), -libc::ENOSPC);
        assert_eq!(status_to_errno(0x0281), -libc::EIO, "unrecovered read error");
        assert_eq!(status_to_errno(0x0001), -libc::EOPNOTSUPP);
        assert_eq!(status_to_errno(0x0182), -libc::EROFS);
    }
}
