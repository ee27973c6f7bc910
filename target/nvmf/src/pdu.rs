//! NVMe/TCP PDU codec (NVM Express TCP Transport Specification 1.0, §3.6): common header,
//! ICReq/ICResp, capsules, data PDUs, R2T and termination requests, with CRC32C digests.
//! Pure: no I/O, lengths checked before every read; all multi-byte fields are little-endian.

pub const CH_LEN: usize = 8;
pub const ICREQ_LEN: usize = 128;
pub const CMD_HLEN: usize = 72; // 8 + 64-byte SQE
pub const RESP_HLEN: usize = 24; // 8 + 16-byte CQE
pub const DATA_HLEN: usize = 24;
pub const R2T_HLEN: usize = 24;
pub const TERM_HLEN: usize = 24;
pub const DIGEST_LEN: usize = 4;

pub const PFV_1_0: u16 = 0;

/// PDU types (§3.6.1).
pub mod kind {
    pub const IC_REQ: u8 = 0x00;
    pub const IC_RESP: u8 = 0x01;
    pub const H2C_TERM_REQ: u8 = 0x02;
    pub const C2H_TERM_REQ: u8 = 0x03;
    pub const CAPSULE_CMD: u8 = 0x04;
    pub const CAPSULE_RESP: u8 = 0x05;
    pub const H2C_DATA: u8 = 0x06;
    pub const C2H_DATA: u8 = 0x07;
    pub const R2T: u8 = 0x09;
}

/// Common header flags.
pub const FLAG_HDGSTF: u8 = 0x01;
pub const FLAG_DDGSTF: u8 = 0x02;
pub const FLAG_LAST_PDU: u8 = 0x04;
pub const FLAG_SUCCESS: u8 = 0x08;

/// ICReq/ICResp DGST bits.
pub const DGST_HEADER: u8 = 0x01;
pub const DGST_DATA: u8 = 0x02;

/// Fatal error status of a termination request (§3.6.2.7).
pub mod fes {
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    pub const PDU_SEQUENCE_ERROR: u16 = 0x02;
    pub const HEADER_DIGEST_ERROR: u16 = 0x03;
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    pub const DATA_LIMIT_EXCEEDED: u16 = 0x05;
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The 8-byte common header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonHeader {
    pub kind: u8,
    pub flags: u8,
    pub hlen: u8,
    pub pdo: u8,
    pub plen: u32,
}

impl CommonHeader {
    /// Decodes the first 8 bytes; `None` if fewer are available.
    pub fn decode(b: &[u8]) -> Option<CommonHeader> {
        let b = b.get(..CH_LEN)?;
        Some(CommonHeader { kind: b[0], flags: b[1], hlen: b[2], pdo: b[3], plen: le32(b, 4) })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.kind, self.flags, self.hlen, self.pdo]);
        out.extend_from_slice(&self.plen.to_le_bytes());
    }
}

/// Validation failures that end the connection with a C2HTermReq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fatal {
    pub fes: u16,
    /// Byte offset of the offending field in the header (FEI for invalid-field errors).
    pub field: u32,
    pub why: &'static str,
}

impl Fatal {
    pub fn field(offset: u32, why: &'static str) -> Fatal {
        Fatal { fes: fes::INVALID_HEADER_FIELD, field: offset, why }
    }
}

/// The fixed header length a PDU type must have, if it is one a host may send.
pub fn host_pdu_hlen(kind: u8) -> Option<usize> {
    match kind {
        kind::IC_REQ => Some(ICREQ_LEN),
        kind::H2C_TERM_REQ => Some(TERM_HLEN),
        kind::CAPSULE_CMD => Some(CMD_HLEN),
        kind::H2C_DATA => Some(DATA_HLEN),
        _ => None,
    }
}

/// Checks a host PDU's common header against the negotiated digests and our size limit.
/// Returns where data starts and how long it is: `(data_offset, data_len)`.
pub fn check_host_header(
    ch: &CommonHeader,
    hdgst: bool,
    ddgst: bool,
    max_plen: u32,
) -> Result<(usize, usize), Fatal> {
    let Some(hlen) = host_pdu_hlen(ch.kind) else {
        return Err(Fatal::field(0, "PDU type a host may not send"));
    };
    if usize::from(ch.hlen) != hlen {
        return Err(Fatal::field(2, "HLEN does not match the PDU type"));
    }
    if ch.kind == kind::IC_REQ {
        if ch.plen as usize != ICREQ_LEN {
            return Err(Fatal::field(4, "ICReq PLEN must be 128"));
        }
        return Ok((ICREQ_LEN, 0));
    }
    if ch.plen > max_plen {
        return Err(Fatal {
            fes: fes::DATA_LIMIT_EXCEEDED,
            field: 4,
            why: "PDU longer than we accept",
        });
    }
    let header_digest = if hdgst && ch.kind != kind::H2C_TERM_REQ { DIGEST_LEN } else { 0 };
    let header_end = hlen + header_digest;
    if ch.flags & FLAG_HDGSTF != 0 && header_digest == 0 && ch.kind != kind::H2C_TERM_REQ {
        return Err(Fatal::field(1, "header digest flag without negotiated header digest"));
    }
    let plen = ch.plen as usize;
    if plen < header_end {
        return Err(Fatal::field(4, "PLEN shorter than the header"));
    }
    if plen == header_end {
        return Ok((header_end, 0));
    }
    if ch.kind == kind::H2C_TERM_REQ {
        return Ok((hlen, plen - hlen));
    }
    // Data follows: PDO must point past the header (we ask for no padding: CPDA 0).
    let pdo = usize::from(ch.pdo);
    if pdo < header_end || pdo > plen {
        return Err(Fatal::field(3, "PDO outside the PDU"));
    }
    let data_digest = if ddgst { DIGEST_LEN } else { 0 };
    if plen < pdo + data_digest {
        return Err(Fatal::field(4, "PLEN shorter than data digest"));
    }
    Ok((pdo, plen - pdo - data_digest))
}

/// ICReq fields (§3.6.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcReq {
    pub pfv: u16,
    pub hpda: u8,
    pub dgst: u8,
    pub maxr2t: u32,
}

pub fn decode_icreq(pdu: &[u8]) -> Option<IcReq> {
    let b = pdu.get(..ICREQ_LEN)?;
    Some(IcReq { pfv: le16(b, 8), hpda: b[10], dgst: b[11], maxr2t: le32(b, 12) })
}

pub fn encode_icreq(out: &mut Vec<u8>, req: &IcReq) {
    let start = out.len();
    CommonHeader { kind: kind::IC_REQ, flags: 0, hlen: 128, pdo: 0, plen: 128 }.encode(out);
    out.extend_from_slice(&req.pfv.to_le_bytes());
    out.extend_from_slice(&[req.hpda, req.dgst]);
    out.extend_from_slice(&req.maxr2t.to_le_bytes());
    out.resize(start + ICREQ_LEN, 0);
}

/// ICResp: PFV 1.0, CPDA 0, the digests granted, MAXH2CDATA.
pub fn encode_icresp(out: &mut Vec<u8>, dgst: u8, maxh2cdata: u32) {
    let start = out.len();
    CommonHeader { kind: kind::IC_RESP, flags: 0, hlen: 128, pdo: 0, plen: 128 }.encode(out);
    out.extend_from_slice(&PFV_1_0.to_le_bytes());
    out.extend_from_slice(&[0, dgst]);
    out.extend_from_slice(&maxh2cdata.to_le_bytes());
    out.resize(start + ICREQ_LEN, 0);
}

fn put_header_digest(out: &mut Vec<u8>, start: usize, hdgst: bool) {
    if hdgst {
        let crc = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }
}

/// CapsuleResp carrying a 16-byte CQE.
pub fn encode_capsule_resp(out: &mut Vec<u8>, cqe: &[u8; 16], hdgst: bool) {
    let start = out.len();
    let digest = if hdgst { DIGEST_LEN } else { 0 };
    let flags = if hdgst { FLAG_HDGSTF } else { 0 };
    let plen = (RESP_HLEN + digest) as u32;
    CommonHeader { kind: kind::CAPSULE_RESP, flags, hlen: RESP_HLEN as u8, pdo: 0, plen }
        .encode(out);
    out.extend_from_slice(cqe);
    put_header_digest(out, start, hdgst);
}

/// C2HData header (and header digest); `data_len` bytes of data then the data digest follow.
#[allow(clippy::too_many_arguments)]
pub fn encode_c2h_data_header(
    out: &mut Vec<u8>,
    cid: u16,
    offset: u32,
    data_len: u32,
    last: bool,
    success: bool,
    hdgst: bool,
    ddgst: bool,
) {
    let start = out.len();
    let hd = if hdgst { DIGEST_LEN } else { 0 };
    let dd = if ddgst { DIGEST_LEN } else { 0 };
    let mut flags = 0;
    if hdgst {
        flags |= FLAG_HDGSTF;
    }
    if ddgst {
        flags |= FLAG_DDGSTF;
    }
    if last {
        flags |= FLAG_LAST_PDU;
    }
    if success {
        flags |= FLAG_SUCCESS;
    }
    let pdo = (DATA_HLEN + hd) as u8;
    let plen = (DATA_HLEN + hd) as u32 + data_len + dd as u32;
    CommonHeader { kind: kind::C2H_DATA, flags, hlen: DATA_HLEN as u8, pdo, plen }.encode(out);
    out.extend_from_slice(&cid.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&data_len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    put_header_digest(out, start, hdgst);
}

/// R2T asking for `len` bytes at `offset` of command `cid`, tagged `ttag`.
pub fn encode_r2t(out: &mut Vec<u8>, cid: u16, ttag: u16, offset: u32, len: u32, hdgst: bool) {
    let start = out.len();
    let hd = if hdgst { DIGEST_LEN } else { 0 };
    let flags = if hdgst { FLAG_HDGSTF } else { 0 };
    let plen = (R2T_HLEN + hd) as u32;
    CommonHeader { kind: kind::R2T, flags, hlen: R2T_HLEN as u8, pdo: 0, plen }.encode(out);
    out.extend_from_slice(&cid.to_le_bytes());
    out.extend_from_slice(&ttag.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    put_header_digest(out, start, hdgst);
}

/// C2HTermReq with the fatal error status and a copy of the offending header (≤ 128 bytes).
pub fn encode_c2h_term_req(out: &mut Vec<u8>, fatal: &Fatal, offending: &[u8]) {
    let copy = &offending[..offending.len().min(128)];
    let plen = (TERM_HLEN + copy.len()) as u32;
    CommonHeader { kind: kind::C2H_TERM_REQ, flags: 0, hlen: TERM_HLEN as u8, pdo: 0, plen }
        .encode(out);
    out.extend_from_slice(&fatal.fes.to_le_bytes());
    out.extend_from_slice(&fatal.field.to_le_bytes());
    out.extend_from_slice(&[0; 10]);
    out.extend_from_slice(copy);
}

/// H2CData header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2cData {
    pub cid: u16,
    pub ttag: u16,
    pub offset: u32,
    pub len: u32,
}

pub fn decode_h2c_data(pdu: &[u8]) -> Option<H2cData> {
    let b = pdu.get(..DATA_HLEN)?;
    Some(H2cData { cid: le16(b, 8), ttag: le16(b, 10), offset: le32(b, 12), len: le32(b, 16) })
}

/// Checks one H2CData PDU against its write transfer: the header's DATAL must equal the
/// `data_len` the framing carries and be at most `max_len`, and the data must continue the
/// transfer exactly where the `received` bytes so far end, without passing its `transfer`
/// bytes. Returns the bytes received once this PDU's data is taken.
pub fn check_h2c_data(
    h: &H2cData,
    data_len: usize,
    received: u32,
    transfer: u32,
    max_len: u32,
) -> Result<u32, Fatal> {
    if h.len as usize != data_len || h.len > max_len {
        return Err(Fatal { fes: fes::DATA_LIMIT_EXCEEDED, field: 16, why: "H2CData length" });
    }
    match received.checked_add(h.len) {
        Some(end) if h.offset == received && end <= transfer => Ok(end),
        _ => Err(Fatal {
            fes: fes::DATA_OUT_OF_RANGE,
            field: 12,
            why: "H2CData outside the transfer",
        }),
    }
}

/// Encodes an H2CData header (for our initiator and tests).
pub fn encode_h2c_data_header(
    out: &mut Vec<u8>,
    d: &H2cData,
    last: bool,
    hdgst: bool,
    ddgst: bool,
) {
    let start = out.len();
    let hd = if hdgst { DIGEST_LEN } else { 0 };
    let dd = if ddgst { DIGEST_LEN } else { 0 };
    let mut flags = if last { FLAG_LAST_PDU } else { 0 };
    if hdgst {
        flags |= FLAG_HDGSTF;
    }
    if ddgst {
        flags |= FLAG_DDGSTF;
    }
    let pdo = (DATA_HLEN + hd) as u8;
    let plen = (DATA_HLEN + hd + dd) as u32 + d.len;
    CommonHeader { kind: kind::H2C_DATA, flags, hlen: DATA_HLEN as u8, pdo, plen }.encode(out);
    out.extend_from_slice(&d.cid.to_le_bytes());
    out.extend_from_slice(&d.ttag.to_le_bytes());
    out.extend_from_slice(&d.offset.to_le_bytes());
    out.extend_from_slice(&d.len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    put_header_digest(out, start, hdgst);
}

/// Encodes a CapsuleCmd with optional in-capsule data (for our initiator and tests).
pub fn encode_capsule_cmd(
    out: &mut Vec<u8>,
    sqe: &[u8; 64],
    data: &[u8],
    hdgst: bool,
    ddgst: bool,
) {
    let start = out.len();
    let hd = if hdgst { DIGEST_LEN } else { 0 };
    let dd = if ddgst && !data.is_empty() { DIGEST_LEN } else { 0 };
    let mut flags = if hdgst { FLAG_HDGSTF } else { 0 };
    if dd > 0 {
        flags |= FLAG_DDGSTF;
    }
    let pdo = if data.is_empty() { 0 } else { (CMD_HLEN + hd) as u8 };
    let plen = (CMD_HLEN + hd + data.len() + dd) as u32;
    CommonHeader { kind: kind::CAPSULE_CMD, flags, hlen: CMD_HLEN as u8, pdo, plen }.encode(out);
    out.extend_from_slice(sqe);
    put_header_digest(out, start, hdgst);
    out.extend_from_slice(data);
    if dd > 0 {
        out.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    }
}

/// Verifies a little-endian CRC32C digest stored right after `covered`.
pub fn digest_ok(covered: &[u8], digest: &[u8]) -> bool {
    digest.len() == DIGEST_LEN && crc32c::crc32c(covered).to_le_bytes() == digest[..DIGEST_LEN]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn icreq_icresp_golden() {
        let mut out = Vec::new();
        encode_icreq(&mut out, &IcReq { pfv: 0, hpda: 0, dgst: 3, maxr2t: 0 });
        assert_eq!(&out[..16], &hex("00 00 80 00 80000000 0000 00 03 00000000")[..]);
        assert_eq!(out.len(), 128);
        assert_eq!(decode_icreq(&out), Some(IcReq { pfv: 0, hpda: 0, dgst: 3, maxr2t: 0 }));
        out.clear();
        encode_icresp(&mut out, DGST_HEADER, 256 * 1024);
        assert_eq!(&out[..16], &hex("01 00 80 00 80000000 0000 00 01 00000400")[..]);
        assert!(out[16..].iter().all(|&b| b == 0));
    }

    #[test]
    fn capsule_resp_with_header_digest() {
        let mut out = Vec::new();
        let cqe = [0u8; 16];
        encode_capsule_resp(&mut out, &cqe, true);
        assert_eq!(&out[..8], &hex("05 01 18 00 1c000000")[..]);
        assert_eq!(out.len(), 28);
        assert!(digest_ok(&out[..24], &out[24..]));
        // CRC32C of the well-known check string "123456789" is 0xe3069283.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn c2h_data_and_r2t_golden() {
        let mut out = Vec::new();
        encode_c2h_data_header(&mut out, 0x0102, 0, 4096, true, true, false, true);
        assert_eq!(out, hex("07 0e 18 18 1c100000 0201 0000 00000000 00100000 00000000"));
        out.clear();
        encode_r2t(&mut out, 7, 3, 0, 65536, false);
        assert_eq!(out, hex("09 00 18 00 18000000 0700 0300 00000000 00000100 00000000"));
    }

    #[test]
    fn connect_capsule_golden() {
        use crate::nvme::{self, SqeBuilder};
        let sqe = SqeBuilder {
            opcode: nvme::FABRICS_OPCODE,
            fctype: nvme::fctype::CONNECT,
            cid: 1,
            sgl_len: 1024,
            sgl_type: nvme::SGL_DATA_BLOCK_OFFSET,
            cdw: [0, 31, 30_000, 0, 0, 0],
            ..Default::default()
        }
        .encode();
        let data = nvme::encode_connect_data(&nvme::ConnectData {
            hostid: [0xab; 16],
            cntlid: 0xffff,
            subnqn: "nqn.2026-11.dev.ballast:vol0".into(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1".into(),
        });
        let mut out = Vec::new();
        encode_capsule_cmd(&mut out, &sqe, &data, false, false);
        // common header: CapsuleCmd, no flags, HLEN 72, PDO 72, PLEN 72 + 1024
        assert_eq!(&out[..8], &hex("04 00 48 48 48040000")[..]);
        // SQE: opcode 7F, PSDT SGL, CID 1, FCTYPE Connect
        assert_eq!(&out[8..13], &hex("7f 40 0100 01")[..]);
        // SGL: in-capsule data block (offset 0, 1024 bytes, type 01h)
        assert_eq!(&out[8 + 24..8 + 40], &hex("0000000000000000 00040000 000000 01")[..]);
        // CDW10 RECFMT 0 / QID 0, CDW11 SQSIZE 31, CDW12 KATO 30000 ms
        assert_eq!(&out[8 + 40..8 + 52], &hex("00000000 1f000000 30750000")[..]);
        assert_eq!(&out[72 + 16..72 + 18], &[0xff, 0xff]);
        assert_eq!(&out[72 + 256..72 + 256 + 28], b"nqn.2026-11.dev.ballast:vol0");
        assert_eq!(out.len(), 72 + 1024);
    }

    #[test]
    fn header_checks() {
        let cmd =
            CommonHeader { kind: kind::CAPSULE_CMD, flags: 0, hlen: 72, pdo: 72, plen: 72 + 512 };
        assert_eq!(check_host_header(&cmd, false, false, 9000), Ok((72, 512)));
        assert_eq!(
            check_host_header(
                &CommonHeader { pdo: 76, plen: 76 + 512 + 4, ..cmd },
                true,
                true,
                9000
            ),
            Ok((76, 512))
        );
        assert!(check_host_header(&CommonHeader { hlen: 70, ..cmd }, false, false, 9000).is_err());
        assert!(check_host_header(
            &CommonHeader { kind: kind::C2H_DATA, ..cmd },
            false,
            false,
            9000
        )
        .is_err());
        assert_eq!(
            check_host_header(&CommonHeader { plen: 100_000, ..cmd }, false, false, 9000)
                .unwrap_err()
                .fes,
            fes::DATA_LIMIT_EXCEEDED
        );
        assert!(check_host_header(&CommonHeader { pdo: 10, ..cmd }, false, false, 9000).is_err());
        let ic = CommonHeader { kind: kind::IC_REQ, flags: 0, hlen: 128, pdo: 0, plen: 128 };
        assert_eq!(check_host_header(&ic, false, false, 9000), Ok((128, 0)));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5000))]
        #[test]
        fn header_checker_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 8..160),
                                       hd: bool, dd: bool) {
            if let Some(ch) = CommonHeader::decode(&bytes) {
                if let Ok((start, len)) = check_host_header(&ch, hd, dd, 16384) {
                    proptest::prop_assert!(start + len <= ch.plen as usize);
                }
            }
            let _ = decode_icreq(&bytes);
            let _ = decode_h2c_data(&bytes);
        }

        #[test]
        fn capsule_round_trip(sqe in proptest::collection::vec(proptest::prelude::any::<u8>(), 64),
                              data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
                              hd: bool, dd: bool) {
            let sqe: [u8; 64] = sqe.try_into().unwrap();
            let mut out = Vec::new();
            encode_capsule_cmd(&mut out, &sqe, &data, hd, dd);
            let ch = CommonHeader::decode(&out).unwrap();
            proptest::prop_assert_eq!(ch.plen as usize, out.len());
            let (start, len) = check_host_header(&ch, hd, dd && !data.is_empty(), 16384).unwrap();
            proptest::prop_assert_eq!(&out[start..start + len], &data[..]);
            proptest::prop_assert_eq!(&out[8..72], &sqe[..]);
        }
    }
}
