//! NVMe command set pieces the target needs (NVMe Base 2.0, NVM Command Set 1.0, Fabrics 1.1):
//! submission-queue entries, completion entries, status codes, and the byte layouts of the
//! Identify and log-page structures we return. Pure and little-endian throughout.

pub const SQE_LEN: usize = 64;
pub const CQE_LEN: usize = 16;

/// Admin opcodes.
pub mod admin {
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT: u8 = 0x0c;
    pub const KEEP_ALIVE: u8 = 0x18;
}

/// NVM I/O opcodes.
pub mod io {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DSM: u8 = 0x09;
    pub const RESV_REGISTER: u8 = 0x0d;
    pub const RESV_REPORT: u8 = 0x0e;
    pub const RESV_ACQUIRE: u8 = 0x11;
    pub const RESV_RELEASE: u8 = 0x15;
}

/// Fabrics command opcode and types.
pub const FABRICS_OPCODE: u8 = 0x7f;
pub mod fctype {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
    pub const DISCONNECT: u8 = 0x08;
}

/// Status: (status code type << 8) | status code.
pub type Status = u16;
pub mod status {
    use super::Status;
    pub const SUCCESS: Status = 0x000;
    pub const INVALID_OPCODE: Status = 0x001;
    pub const INVALID_FIELD: Status = 0x002;
    pub const DATA_TRANSFER_ERROR: Status = 0x004;
    pub const INTERNAL: Status = 0x006;
    /// The other command of a fused pair failed (its Compare found other data).
    pub const ABORTED_FAILED_FUSED: Status = 0x005;
    pub const ABORT_REQUESTED: Status = 0x007;
    /// A fused pair's other half never came (or was not the command it had to be).
    pub const ABORTED_MISSING_FUSED: Status = 0x00a;
    pub const INVALID_NAMESPACE: Status = 0x00b;
    pub const COMMAND_SEQUENCE: Status = 0x00c;
    pub const SGL_DATA_LENGTH_INVALID: Status = 0x00f;
    pub const SGL_TYPE_INVALID: Status = 0x011;
    /// The namespace refuses writes (a read-only export, a snapshot): what Linux's nvmet
    /// answers too, for every command that would change data.
    pub const NS_WRITE_PROTECTED: Status = 0x020;
    pub const TRANSIENT_TRANSPORT_ERROR: Status = 0x022;
    pub const LBA_OUT_OF_RANGE: Status = 0x080;
    pub const CAPACITY_EXCEEDED: Status = 0x081;
    // command specific (SCT 1)
    pub const ABORT_LIMIT: Status = 0x103;
    pub const AER_LIMIT: Status = 0x105;
    pub const INVALID_LOG_PAGE: Status = 0x109;
    pub const FEATURE_NOT_SAVEABLE: Status = 0x10d;
    pub const CONNECT_INCOMPATIBLE_FORMAT: Status = 0x180;
    pub const CONNECT_CONTROLLER_BUSY: Status = 0x181;
    pub const CONNECT_INVALID_PARAMETERS: Status = 0x182;
    pub const CONNECT_INVALID_HOST: Status = 0x184;
    // media errors (SCT 2)
    pub const WRITE_FAULT: Status = 0x280;
    pub const UNRECOVERED_READ: Status = 0x281;
    /// A Compare found the media's data differs from the host's.
    pub const COMPARE_FAILURE: Status = 0x285;
}

/// Maps a backend errno to an NVMe status.
pub fn status_from_errno(errno: i32, write: bool) -> Status {
    match errno {
        // Out of room: the filesystem is full, a quota or the file size limit is reached
        // (Linux's host turns Capacity Exceeded into ENOSPC, as NBD's codec does).
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => status::CAPACITY_EXCEEDED,
        libc::EINVAL => status::INVALID_FIELD,
        // The backend cannot do it (an `nvme:` export's controller without Write Zeroes, a
        // filesystem without the fallocate mode): hosts then do it another way (Linux writes
        // the zeros itself), where a media error would fail their I/O.
        libc::EOPNOTSUPP => status::INVALID_OPCODE,
        // The media refused the change (a write-protected namespace behind an `nvme:` export).
        libc::EROFS | libc::EPERM | libc::EACCES if write => status::NS_WRITE_PROTECTED,
        _ if write => status::WRITE_FAULT,
        _ => status::UNRECOVERED_READ,
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// SGL descriptor types we understand (byte 15 of the descriptor: type << 4 | subtype).
pub const SGL_DATA_BLOCK_OFFSET: u8 = 0x01; // in-capsule data
pub const SGL_TRANSPORT_DATA_BLOCK: u8 = 0x5a; // data moved by R2T/H2CData or C2HData

/// Fused Operation values ([`Sqe::fuse`]): a normal command, the first (Compare) and the
/// second (Write) command of a fused Compare and Write.
pub const FUSE_NONE: u8 = 0;
pub const FUSE_FIRST: u8 = 1;
pub const FUSE_SECOND: u8 = 2;

/// A 64-byte submission queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sqe {
    pub opcode: u8,
    pub flags: u8,
    pub cid: u16,
    pub nsid: u32,
    pub sgl_addr: u64,
    pub sgl_len: u32,
    pub sgl_type: u8,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
    /// For fabrics commands, the command type (byte 4).
    pub fctype: u8,
}

impl Sqe {
    pub fn decode(b: &[u8; SQE_LEN]) -> Sqe {
        Sqe {
            opcode: b[0],
            flags: b[1],
            cid: le16(b, 2),
            nsid: le32(b, 4),
            sgl_addr: le64(b, 24),
            sgl_len: le32(b, 32),
            sgl_type: b[39],
            cdw10: le32(b, 40),
            cdw11: le32(b, 44),
            cdw12: le32(b, 48),
            cdw13: le32(b, 52),
            cdw14: le32(b, 56),
            cdw15: le32(b, 60),
            fctype: b[4],
        }
    }

    /// Starting LBA of an I/O command (CDW10-11).
    pub fn slba(&self) -> u64 {
        u64::from(self.cdw10) | (u64::from(self.cdw11) << 32)
    }

    /// Number of logical blocks (CDW12 bits 15:0 are 0's based).
    pub fn nlb(&self) -> u32 {
        (self.cdw12 & 0xffff) + 1
    }

    /// Force Unit Access (CDW12 bit 30).
    pub fn fua(&self) -> bool {
        self.cdw12 & (1 << 30) != 0
    }

    /// Fused Operation (CDW0 bits 9:8): [`FUSE_NONE`], [`FUSE_FIRST`], [`FUSE_SECOND`] or
    /// reserved (3).
    pub fn fuse(&self) -> u8 {
        self.flags & 0x03
    }
}

/// Builds an SQE (for our initiator and tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct SqeBuilder {
    pub opcode: u8,
    pub cid: u16,
    pub nsid: u32,
    pub fctype: u8,
    pub sgl_addr: u64,
    pub sgl_len: u32,
    pub sgl_type: u8,
    pub cdw: [u32; 6],
}

impl SqeBuilder {
    pub fn encode(&self) -> [u8; SQE_LEN] {
        let mut b = [0u8; SQE_LEN];
        b[0] = self.opcode;
        b[1] = 0x40; // PSDT: SGL
        b[2..4].copy_from_slice(&self.cid.to_le_bytes());
        if self.opcode == FABRICS_OPCODE {
            b[4] = self.fctype;
        } else {
            b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        }
        b[24..32].copy_from_slice(&self.sgl_addr.to_le_bytes());
        b[32..36].copy_from_slice(&self.sgl_len.to_le_bytes());
        b[39] = self.sgl_type;
        for (i, dw) in self.cdw.iter().enumerate() {
            b[40 + i * 4..44 + i * 4].copy_from_slice(&dw.to_le_bytes());
        }
        b
    }
}

/// A completion queue entry.
pub fn encode_cqe(
    dw0: u32,
    dw1: u32,
    sqhd: u16,
    sqid: u16,
    cid: u16,
    status: Status,
) -> [u8; CQE_LEN] {
    let mut c = [0u8; CQE_LEN];
    c[0..4].copy_from_slice(&dw0.to_le_bytes());
    c[4..8].copy_from_slice(&dw1.to_le_bytes());
    c[8..10].copy_from_slice(&sqhd.to_le_bytes());
    c[10..12].copy_from_slice(&sqid.to_le_bytes());
    c[12..14].copy_from_slice(&cid.to_le_bytes());
    c[14..16].copy_from_slice(&status_field(status).to_le_bytes());
    c
}

/// The Status Field of a completion (and of an Error Information log entry) for `status`:
/// phase bit 0 unused on fabrics; SC in bits 8:1, SCT in bits 11:9; DNR (bit 15) for errors a
/// retry cannot cure.
pub fn status_field(status: Status) -> u16 {
    let dnr = if status == status::SUCCESS || retryable(status) { 0 } else { 1 << 15 };
    ((status & 0xff) << 1) | (((status >> 8) & 0x7) << 9) | dnr
}

/// Whether a failed command may succeed if the host sends it again (its completion then goes
/// without Do Not Retry): a failure of the moment — the transport (a data digest error), the
/// backend's I/O, an abort, a busy controller — as Linux's nvmet and SPDK answer them. A Linux
/// host retries these (up to `nvme_core.max_retries`, or on another path) instead of failing
/// the I/O at once. A command that is wrong in itself (a bad field, an LBA out of range, a
/// write-protected namespace) gets DNR, and so does Authentication Required, as nvmet sends
/// it (without, a Linux host re-authenticates every queue and retries, and a command sent
/// mid re-authentication would start another).
pub fn retryable(status: Status) -> bool {
    use status::*;
    matches!(
        status,
        INTERNAL
            | ABORT_REQUESTED
            | TRANSIENT_TRANSPORT_ERROR
            | CONNECT_CONTROLLER_BUSY
            | WRITE_FAULT
            | UNRECOVERED_READ
            | crate::ana::ANA_PERSISTENT_LOSS
            | crate::ana::ANA_INACCESSIBLE
            | crate::ana::ANA_TRANSITION
    )
}

/// Decodes a CQE's (cid, status, dw0) (for our initiator and tests).
pub fn decode_cqe(c: &[u8]) -> Option<(u16, Status, u32)> {
    let c = c.get(..CQE_LEN)?;
    let sf = le16(c, 14);
    let status = ((sf >> 1) & 0xff) | (((sf >> 9) & 0x7) << 8);
    Some((le16(c, 12), status, le32(c, 0)))
}

/// Fixed-width, space-padded ASCII (serial, model, firmware, transport service id).
pub fn put_ascii(b: &mut [u8], text: &str) {
    for (i, slot) in b.iter_mut().enumerate() {
        *slot = *text.as_bytes().get(i).unwrap_or(&b' ');
    }
}

/// NUL-padded string (NQNs, transport addresses).
pub fn put_str(b: &mut [u8], text: &str) {
    let n = text.len().min(b.len().saturating_sub(1));
    b[..n].copy_from_slice(&text.as_bytes()[..n]);
    b[n..].fill(0);
}

/// Reads a NUL-terminated string field.
pub fn get_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Reads a NUL-terminated NQN field from a host. NQNs are UTF-8: one that is not decodes to
/// the empty string, which names no subsystem and no allowed host. (A lossy decoding would
/// let different bytes alias one name and could grow the field threefold.)
pub fn get_nqn(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    std::str::from_utf8(&b[..end]).map(str::to_owned).unwrap_or_default()
}

/// Connect command data (Fabrics §3.3.1): host id, controller id, NQNs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectData {
    pub hostid: [u8; 16],
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

pub const CONNECT_DATA_LEN: usize = 1024;

pub fn decode_connect_data(b: &[u8]) -> Option<ConnectData> {
    let b = b.get(..CONNECT_DATA_LEN)?;
    let mut hostid = [0u8; 16];
    hostid.copy_from_slice(&b[..16]);
    Some(ConnectData {
        hostid,
        cntlid: le16(b, 16),
        subnqn: get_nqn(&b[256..512]),
        hostnqn: get_nqn(&b[512..768]),
    })
}

pub fn encode_connect_data(d: &ConnectData) -> Vec<u8> {
    let mut b = vec![0u8; CONNECT_DATA_LEN];
    b[..16].copy_from_slice(&d.hostid);
    b[16..18].copy_from_slice(&d.cntlid.to_le_bytes());
    put_str(&mut b[256..512], &d.subnqn);
    put_str(&mut b[512..768], &d.hostnqn);
    b
}

/// Controller properties (Fabrics property offsets).
pub mod prop {
    pub const CAP: u32 = 0x00;
    pub const VS: u32 = 0x08;
    pub const CC: u32 = 0x14;
    pub const CSTS: u32 = 0x1c;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backend errors as NVMe statuses: space, arguments, refused changes, the rest.
    #[test]
    fn errnos_map_to_the_statuses_hosts_act_on() {
        assert_eq!(status_from_errno(libc::ENOSPC, true), status::CAPACITY_EXCEEDED);
        assert_eq!(status_from_errno(libc::EFBIG, true), status::CAPACITY_EXCEEDED);
        assert_eq!(status_from_errno(libc::EINVAL, false), status::INVALID_FIELD);
        assert_eq!(status_from_errno(libc::EROFS, true), status::NS_WRITE_PROTECTED);
        assert_eq!(status_from_errno(libc::EIO, true), status::WRITE_FAULT);
        assert_eq!(status_from_errno(libc::EROFS, false), status::UNRECOVERED_READ);
        assert_eq!(status_from_errno(libc::EOPNOTSUPP, true), status::INVALID_OPCODE);
    }

    #[test]
    fn cqe_status_encoding_round_trips() {
        let c = encode_cqe(5, 0, 3, 1, 0x42, status::LBA_OUT_OF_RANGE);
        assert_eq!(&c[12..16], &[0x42, 0x00, 0x00, 0x81]);
        assert_eq!(decode_cqe(&c), Some((0x42, status::LBA_OUT_OF_RANGE, 5)));
        let c = encode_cqe(0, 0, 0, 0, 1, status::CONNECT_INVALID_HOST);
        // SC 0x84 << 1 = 0x108, SCT 1 << 9 = 0x200, DNR 0x8000
        assert_eq!(u16::from_le_bytes([c[14], c[15]]), 0x8308);
        assert_eq!(decode_cqe(&c).unwrap().1, status::CONNECT_INVALID_HOST);
        // A digest error or the backend's failure may be retried: no DNR.
        for st in [status::TRANSIENT_TRANSPORT_ERROR, status::WRITE_FAULT, status::INTERNAL] {
            let sf = u16::from_le_bytes(encode_cqe(0, 0, 0, 1, 1, st)[14..16].try_into().unwrap());
            assert_eq!(sf & 0x8000, 0, "status {st:#x}");
            assert_eq!(decode_cqe(&encode_cqe(0, 0, 0, 1, 1, st)).unwrap().1, st);
        }
        for st in [status::INVALID_FIELD, status::NS_WRITE_PROTECTED, status::CAPACITY_EXCEEDED] {
            let sf = u16::from_le_bytes(encode_cqe(0, 0, 0, 1, 1, st)[14..16].try_into().unwrap());
            assert_eq!(sf & 0x8000, 0x8000, "status {st:#x}");
        }
    }

    #[test]
    fn sqe_round_trip() {
        let b = SqeBuilder {
            opcode: io::WRITE,
            cid: 9,
            nsid: 1,
            sgl_len: 8192,
            sgl_type: SGL_TRANSPORT_DATA_BLOCK,
            cdw: [100, 0, (1 << 30) | 1, 0, 0, 0],
            ..Default::default()
        };
        let s = Sqe::decode(&b.encode());
        assert_eq!(
            (s.opcode, s.cid, s.nsid, s.slba(), s.nlb(), s.fua()),
            (io::WRITE, 9, 1, 100, 2, true)
        );
        assert_eq!((s.sgl_len, s.sgl_type), (8192, SGL_TRANSPORT_DATA_BLOCK));
    }

    #[test]
    fn connect_data_round_trip() {
        let d = ConnectData {
            hostid: [7; 16],
            cntlid: 0xffff,
            subnqn: "nqn.a".into(),
            hostnqn: "nqn.h".into(),
        };
        assert_eq!(decode_connect_data(&encode_connect_data(&d)), Some(d));
        assert_eq!(decode_connect_data(&[0u8; 100]), None);
    }

    /// Found by the `connect` fuzz target: NQN fields of invalid UTF-8 were decoded lossily,
    /// 256 bytes of 0x80 growing to a 1 KiB string each (2 KiB for a 1 KiB capsule), and two
    /// different byte strings could decode to the same name.
    #[test]
    fn connect_data_with_invalid_utf8_nqns() {
        let mut b = encode_connect_data(&ConnectData {
            hostid: [1; 16],
            cntlid: 1,
            subnqn: "nqn.a".into(),
            hostnqn: "nqn.h".into(),
        });
        b[256..512].fill(0x80);
        b[512 + 4] = 0xff;
        let d = decode_connect_data(&b).unwrap();
        assert_eq!((d.subnqn.as_str(), d.hostnqn.as_str()), ("", ""));
        assert_eq!(d.subnqn.capacity(), 0);
        // Valid UTF-8 beyond ASCII stays as it is, and takes no more than its bytes.
        b[256..256 + 7].copy_from_slice("nqn.é\0".as_bytes());
        let d = decode_connect_data(&b).unwrap();
        assert_eq!(d.subnqn, "nqn.é");
        assert!(d.subnqn.capacity() <= 256);
    }
}
