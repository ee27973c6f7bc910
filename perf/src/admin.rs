//! Admin-queue helpers on [`Queue`]: fabrics Property Get/Set, enabling the controller
//! (CC.EN then waiting for CSTS.RDY), Identify (controller and namespace, parsed into
//! [`ControllerInfo`] and [`NamespaceInfo`]), Set Features (Number of Queues), Get Log Page,
//! Keep Alive and Disconnect. Each runs one command synchronously and turns an error status
//! into [`Error::Status`].

use std::time::{Duration, Instant};

use ballast_nvmf::nvme::{admin, fctype, get_str, prop, SqeBuilder, FABRICS_OPCODE};

use crate::error::{Error, Result};
use crate::queue::{Command, Data, Queue};

/// Identify data length.
pub const IDENTIFY_LEN: u32 = 4096;
/// Controller Configuration: EN, IOSQES = 6 (64 bytes), IOCQES = 4 (16 bytes).
pub const CC_ENABLE: u32 = 1 | (6 << 16) | (4 << 20);
const FEAT_NUM_QUEUES: u32 = 0x07;

/// What Identify Controller says that an initiator cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerInfo {
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// Maximum data transfer: 2^MDTS minimum-size pages (0: no limit).
    pub mdts: u8,
    pub cntlid: u16,
    pub version: u32,
    /// Keep Alive Support granularity, in 100 ms units.
    pub kas: u16,
    pub maxcmd: u16,
    pub nn: u32,
    pub sgls: u32,
    pub subnqn: String,
    /// I/O queue command capsule size, in 16-byte units.
    pub ioccsz: u32,
    pub iorcsz: u32,
    pub icdoff: u16,
    /// The raw 4096 bytes.
    pub raw: Vec<u8>,
}

impl ControllerInfo {
    /// Parses Identify Controller data; `None` if shorter than 4096 bytes.
    pub fn parse(b: &[u8]) -> Option<ControllerInfo> {
        let b = b.get(..IDENTIFY_LEN as usize)?;
        let le16 = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let le32 = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let ascii = |r: std::ops::Range<usize>| get_str(&b[r]).trim_end().to_string();
        Some(ControllerInfo {
            serial: ascii(4..24),
            model: ascii(24..64),
            firmware: ascii(64..72),
            mdts: b[77],
            cntlid: le16(78),
            version: le32(80),
            kas: le16(320),
            maxcmd: le16(514),
            nn: le32(516),
            sgls: le32(536),
            subnqn: get_str(&b[768..1024]),
            ioccsz: le32(1792),
            iorcsz: le32(1796),
            icdoff: le16(1800),
            raw: b.to_vec(),
        })
    }

    /// In-capsule data the I/O queues take: IOCCSZ × 16 minus the 64-byte SQE.
    pub fn in_capsule_bytes(&self) -> u32 {
        self.ioccsz.saturating_mul(16).saturating_sub(64)
    }

    /// Largest transfer in bytes (assuming 4 KiB minimum pages); `None` if unlimited.
    pub fn max_transfer_bytes(&self) -> Option<u64> {
        (self.mdts != 0).then(|| 4096u64.checked_shl(u32::from(self.mdts)).unwrap_or(u64::MAX))
    }
}

/// What Identify Namespace says that an initiator cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Size in logical blocks.
    pub nsze: u64,
    pub ncap: u64,
    pub nuse: u64,
    /// Logical block size in bytes.
    pub lba_size: u32,
}

impl NamespaceInfo {
    /// Parses Identify Namespace data; `None` if short or the LBA format is unusable.
    pub fn parse(b: &[u8]) -> Option<NamespaceInfo> {
        let b = b.get(..IDENTIFY_LEN as usize)?;
        let le64 = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
        let format = usize::from(b[26] & 0x0f);
        let lbads = b[128 + format * 4 + 2];
        if !(9..=16).contains(&lbads) {
            return None;
        }
        Some(NamespaceInfo { nsze: le64(0), ncap: le64(8), nuse: le64(16), lba_size: 1 << lbads })
    }

    pub fn size_bytes(&self) -> u64 {
        self.nsze.saturating_mul(u64::from(self.lba_size))
    }
}

fn fabrics(fctype: u8, cdw: [u32; 6]) -> SqeBuilder {
    SqeBuilder { opcode: FABRICS_OPCODE, fctype, cdw, ..SqeBuilder::default() }
}

impl Queue {
    /// Runs one command, failing on an error status; returns (dw0, data).
    pub fn run(&mut self, sqe: SqeBuilder, data: Data<'_>) -> Result<(u32, Vec<u8>)> {
        let (c, bytes) = self.execute(&Command { sqe, data })?;
        let c = c.check()?;
        Ok((c.dw0, bytes))
    }

    /// Property Get (`size8`: an 8-byte property such as CAP).
    pub fn property_get(&mut self, offset: u32, size8: bool) -> Result<u64> {
        let sqe = fabrics(fctype::PROPERTY_GET, [u32::from(size8), offset, 0, 0, 0, 0]);
        let (c, _) = self.execute(&Command { sqe, data: Data::None })?;
        let c = c.check()?;
        Ok(u64::from(c.dw0) | (u64::from(c.dw1) << 32))
    }

    /// Property Set of a 4-byte property.
    pub fn property_set(&mut self, offset: u32, value: u32) -> Result<()> {
        let sqe = fabrics(fctype::PROPERTY_SET, [0, offset, value, 0, 0, 0]);
        self.run(sqe, Data::None).map(|_| ())
    }

    /// Sets CC.EN (with 64/16-byte queue entries) and waits for CSTS.RDY.
    pub fn enable_controller(&mut self, timeout: Duration) -> Result<()> {
        self.property_set(prop::CC, CC_ENABLE)?;
        let deadline = Instant::now() + timeout;
        loop {
            let csts = self.property_get(prop::CSTS, false)?;
            if csts & 0x2 != 0 {
                return Err(Error::Protocol("controller fatal status (CSTS.CFS)".into()));
            }
            if csts & 0x1 != 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Identify with the given CNS and NSID: the 4096 bytes.
    pub fn identify(&mut self, cns: u8, nsid: u32) -> Result<Vec<u8>> {
        let sqe = SqeBuilder {
            opcode: admin::IDENTIFY,
            nsid,
            cdw: [u32::from(cns), 0, 0, 0, 0, 0],
            ..SqeBuilder::default()
        };
        let (_, data) = self.run(sqe, Data::FromTarget(IDENTIFY_LEN))?;
        Ok(data)
    }

    pub fn identify_controller(&mut self) -> Result<ControllerInfo> {
        let data = self.identify(0x01, 0)?;
        ControllerInfo::parse(&data)
            .ok_or_else(|| Error::Protocol("short Identify Controller data".into()))
    }

    pub fn identify_namespace(&mut self, nsid: u32) -> Result<NamespaceInfo> {
        let data = self.identify(0x00, nsid)?;
        NamespaceInfo::parse(&data)
            .ok_or_else(|| Error::Protocol("unusable Identify Namespace data".into()))
    }

    /// Set Features, Number of Queues: asks for `n` I/O queue pairs, returns how many were
    /// granted.
    pub fn set_num_queues(&mut self, n: u16) -> Result<u16> {
        let want = u32::from(n.max(1) - 1);
        let sqe = SqeBuilder {
            opcode: admin::SET_FEATURES,
            cdw: [FEAT_NUM_QUEUES, want | (want << 16), 0, 0, 0, 0],
            ..SqeBuilder::default()
        };
        let (dw0, _) = self.run(sqe, Data::None)?;
        let granted = (dw0 & 0xffff).min(dw0 >> 16) + 1;
        Ok(granted.min(u32::from(u16::MAX)) as u16)
    }

    /// Get Log Page `lid`: `len` bytes (a multiple of 4) from byte `offset`.
    pub fn get_log_page(&mut self, lid: u8, nsid: u32, len: u32, offset: u64) -> Result<Vec<u8>> {
        if len == 0 || !len.is_multiple_of(4) {
            return Err(Error::Invalid(format!("log page length {len}")));
        }
        let numd = len / 4 - 1;
        let sqe = SqeBuilder {
            opcode: admin::GET_LOG_PAGE,
            nsid,
            cdw: [
                u32::from(lid) | ((numd & 0xffff) << 16),
                numd >> 16,
                offset as u32,
                (offset >> 32) as u32,
                0,
                0,
            ],
            ..SqeBuilder::default()
        };
        let (_, data) = self.run(sqe, Data::FromTarget(len))?;
        Ok(data)
    }

    pub fn keep_alive(&mut self) -> Result<()> {
        let sqe = SqeBuilder { opcode: admin::KEEP_ALIVE, ..SqeBuilder::default() };
        self.run(sqe, Data::None).map(|_| ())
    }

    /// Fabrics Disconnect of this queue.
    pub fn disconnect(&mut self) -> Result<()> {
        self.run(fabrics(fctype::DISCONNECT, [0; 6]), Data::None).map(|_| ())
    }
}
