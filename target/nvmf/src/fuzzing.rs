//! Properties of the NVMe/TCP wire decoders under arbitrary input, shared by the cargo-fuzz
//! targets (`target/nvmf/fuzz`) and this crate's proptests: each `*_case` runs bytes through
//! the pure decoders and checks the way [`crate::queue`] does, and panics when an invariant
//! breaks. A [`Meter`] wraps the decoding (not the building of test PDUs) so the fuzz targets
//! can bound what it allocates: never more than the PDU it decodes.

use std::sync::{Arc, OnceLock};

use ballast_engine::ram::RamDev;

use crate::admin::AdminState;
use crate::error_log::{self, ErrorEntry};
use crate::identify::{IDENTIFY_LEN, IN_CAPSULE_BYTES, MAX_TRANSFER_BYTES};
use crate::nvme::{self, fctype, ConnectData, Sqe, FABRICS_OPCODE, SQE_LEN};
use crate::pdu::{self, kind, CommonHeader, H2cData, IcReq};
use crate::queue::MAXH2CDATA;
use crate::resv::{Access, Reservations};
use crate::subsys::{ListenAddr, Subsystem, Target};

/// Runs decoding under an allocation bound.
pub trait Meter {
    /// Runs `f`, which may have at most `limit` bytes allocated at any time (net of what it
    /// frees; what it returns counts).
    fn run<R>(&mut self, limit: usize, f: impl FnOnce() -> R) -> R;
}

/// No bound (the proptests).
pub struct Unmetered;

impl Meter for Unmetered {
    fn run<R>(&mut self, _limit: usize, f: impl FnOnce() -> R) -> R {
        f()
    }
}

/// The PDU size limit the queue applies (`Queue::max_plen`).
pub const MAX_PLEN: u32 = {
    let capsule = pdu::CMD_HLEN as u32 + IN_CAPSULE_BYTES;
    let data = pdu::DATA_HLEN as u32 + MAXH2CDATA;
    (if capsule > data { capsule } else { data }) + 8
};

/// Extra bytes an admin command may build besides the data the host asked for: one
/// Identify-sized structure or log page (the fixture's pages are at most 4 KiB), assembled
/// before it is cut to the host's length.
pub const ADMIN_PAGE_SLACK: usize = 2 * IDENTIFY_LEN;

/// A reader over fuzz input that yields zeros once the input runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn sqe(&mut self) -> [u8; SQE_LEN] {
        let mut raw = [0u8; SQE_LEN];
        raw.iter_mut().for_each(|b| *b = self.u8());
        raw
    }
}

/// A host PDU as the queue takes it apart once `check_host_header` accepted it.
#[derive(Debug)]
pub enum HostPdu<'a> {
    IcReq(IcReq),
    TermReq { fes: u16 },
    Capsule { sqe: Sqe, data: &'a [u8], data_digest_ok: bool },
    Data { h: H2cData, data: &'a [u8], data_digest_ok: bool },
}

/// Splits a whole PDU `p` (exactly PLEN bytes) the way `Queue::on_pdu` does, with the same
/// slicing, so an accepted header that would make the queue index out of bounds panics here.
/// `None` when the header digest does not match.
pub fn split_host_pdu<'a>(
    ch: &CommonHeader,
    p: &'a [u8],
    hdgst: bool,
    ddgst: bool,
    (data_start, data_len): (usize, usize),
) -> Option<HostPdu<'a>> {
    assert_eq!(p.len(), ch.plen as usize);
    let hlen = usize::from(ch.hlen);
    if hdgst
        && ch.kind != kind::IC_REQ
        && ch.kind != kind::H2C_TERM_REQ
        && !pdu::digest_ok(&p[..hlen], &p[hlen..hlen + 4])
    {
        return None;
    }
    let data = &p[data_start..data_start + data_len];
    let data_digest_ok =
        !ddgst || data_len == 0 || pdu::digest_ok(data, &p[data_start + data_len..]);
    Some(match ch.kind {
        kind::IC_REQ => HostPdu::IcReq(pdu::decode_icreq(p).expect("an accepted ICReq decodes")),
        kind::H2C_TERM_REQ => HostPdu::TermReq { fes: u16::from_le_bytes([p[8], p[9]]) },
        kind::CAPSULE_CMD => {
            let mut raw = [0u8; SQE_LEN];
            raw.copy_from_slice(&p[8..72]);
            HostPdu::Capsule { sqe: Sqe::decode(&raw), data, data_digest_ok }
        }
        kind::H2C_DATA => HostPdu::Data {
            h: pdu::decode_h2c_data(p).expect("an accepted H2CData header decodes"),
            data,
            data_digest_ok,
        },
        other => panic!("check_host_header accepted PDU type {other:#x}"),
    })
}

/// Decodes a host byte stream's first PDU: `None` if the queue would wait for more bytes,
/// terminate the connection, or drop a header with a bad digest.
fn decode_host_pdu(p: &[u8], hdgst: bool, ddgst: bool) -> Option<(CommonHeader, HostPdu<'_>)> {
    let ch = CommonHeader::decode(p)?;
    let (start, len) = pdu::check_host_header(&ch, hdgst, ddgst, MAX_PLEN).ok()?;
    let plen = ch.plen as usize;
    assert!(start + len <= plen, "data {start}+{len} beyond PLEN {plen}");
    if ch.kind == kind::IC_REQ {
        assert_eq!(plen, pdu::ICREQ_LEN);
    } else {
        assert!(ch.plen <= MAX_PLEN);
        assert!(start >= usize::from(ch.hlen));
    }
    let p = p.get(..plen)?;
    Some((ch, split_host_pdu(&ch, p, hdgst, ddgst, (start, len))?))
}

/// `pdu`: one option byte (bit 0 header digest, bit 1 data digest negotiated), then a host
/// byte stream: the common header, its checks and every PDU type's decoder.
pub fn pdu_case(input: &[u8], meter: &mut impl Meter) {
    let Some((&opts, p)) = input.split_first() else { return };
    let (hdgst, ddgst) = (opts & 1 != 0, opts & 2 != 0);
    meter.run(input.len(), || {
        let _ = pdu::decode_icreq(p);
        let _ = pdu::decode_h2c_data(p);
        let _ = nvme::decode_cqe(p);
        if CommonHeader::decode(p).is_none() {
            assert!(p.len() < pdu::CH_LEN);
        }
        if let Some((_, HostPdu::Capsule { sqe, .. })) = decode_host_pdu(p, hdgst, ddgst) {
            let _ = (sqe.slba().checked_add(u64::from(sqe.nlb())), sqe.fua());
        }
    });
}

/// `icreq`: one option byte (bit 0: keep the input's common header rather than a valid
/// ICReq's), then the 128-byte ICReq. Checks it decodes, round-trips, and that the ICResp
/// grants only digests the host asked for.
pub fn icreq_case(input: &[u8], meter: &mut impl Meter) {
    let mut r = Input(input);
    let opts = r.u8();
    let mut p = [0u8; pdu::ICREQ_LEN];
    p.iter_mut().for_each(|b| *b = r.u8());
    if opts & 1 == 0 {
        p[..8].copy_from_slice(&[kind::IC_REQ, 0, 128, 0, 128, 0, 0, 0]);
    }
    let decoded = meter.run(input.len(), || decode_host_pdu(&p, false, false));
    let Some((_, HostPdu::IcReq(req))) = decoded else {
        assert!(opts & 1 != 0, "a valid ICReq header was refused");
        return;
    };
    let mut out = Vec::new();
    pdu::encode_icreq(&mut out, &req);
    assert_eq!(out[8..16], p[8..16]);
    out.clear();
    let granted = req.dgst & (pdu::DGST_HEADER | pdu::DGST_DATA);
    pdu::encode_icresp(&mut out, granted, MAXH2CDATA);
    let ch = CommonHeader::decode(&out).expect("ICResp header");
    assert_eq!((ch.kind, ch.plen as usize, out.len()), (kind::IC_RESP, 128, 128));
    assert_eq!(out[11] & !req.dgst, 0, "ICResp grants a digest the host did not ask for");
}

/// The listener the fixture's controllers connected through.
fn fuzz_via() -> ListenAddr {
    ListenAddr { traddr: "127.0.0.1".into(), port: 4420 }
}

/// A target with one subsystem (one namespace, any host) for the registry and admin checks.
fn fixture() -> &'static (Target, Arc<Subsystem>) {
    static FIXTURE: OnceLock<(Target, Arc<Subsystem>)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let target = Target::default();
        target.default_listeners.write().insert(fuzz_via());
        target.listener_bound(fuzz_via());
        let subsys = target.create_subsystem("nqn.2026-11.dev.ballast:fuzz", true).unwrap();
        target.add_namespace(&subsys.nqn, 1, Arc::new(RamDev::new(1 << 20)), 512, "dev").unwrap();
        (target, subsys)
    })
}

/// Builds a CapsuleCmd PDU from fuzz input: option byte (bit 0 header digest, bit 1 data
/// digest), the SQE, then in-capsule data. Returns (options, the SQE bytes, data, PDU).
fn capsule_from(input: &[u8]) -> (u8, [u8; SQE_LEN], &[u8], Vec<u8>) {
    let mut r = Input(input);
    let opts = r.u8();
    let sqe = r.sqe();
    let data = r.0;
    let mut p = Vec::new();
    pdu::encode_capsule_cmd(&mut p, &sqe, data, opts & 1 != 0, opts & 2 != 0);
    (opts, sqe, data, p)
}

/// Decodes a capsule built by [`capsule_from`], checking it comes back as it was built.
fn decode_capsule<'a>(p: &'a [u8], opts: u8, sqe: &[u8; SQE_LEN], data: &[u8]) -> (Sqe, &'a [u8]) {
    let ddgst = opts & 2 != 0;
    let Some((_, HostPdu::Capsule { sqe: got, data: got_data, data_digest_ok })) =
        decode_host_pdu(p, opts & 1 != 0, ddgst)
    else {
        assert!(p.len() > MAX_PLEN as usize, "a well-formed capsule was refused");
        return (Sqe::decode(sqe), &[]);
    };
    assert!(data_digest_ok);
    assert_eq!(got, Sqe::decode(sqe));
    assert_eq!(got_data, data);
    (got, got_data)
}

/// `connect`: a Fabrics Connect capsule (opcode and type forced) with arbitrary SQE fields
/// and connect data: decode, then the registry lookups Connect does.
pub fn connect_case(input: &[u8], meter: &mut impl Meter) {
    let mut input = input.to_vec();
    if input.len() > SQE_LEN {
        input[1] = FABRICS_OPCODE;
        input[1 + 4] = fctype::CONNECT;
    }
    let (opts, sqe, data, p) = capsule_from(&input);
    let (target, subsys) = fixture();
    let cd = meter.run(p.len(), || {
        let (sqe, data) = decode_capsule(&p, opts, &sqe, data);
        if data.len() > IN_CAPSULE_BYTES as usize {
            return None;
        }
        let _fields = (sqe.cdw10 & 0xffff, sqe.cdw10 >> 16, sqe.cdw11 & 0xffff, sqe.cdw12);
        let cd = nvme::decode_connect_data(data)?;
        let found = target.subsystem(&cd.subnqn);
        assert_eq!(found.is_some(), cd.subnqn == subsys.nqn);
        let _ = found.map(|s| s.host_allowed(&cd.hostnqn));
        let _ = target.controller(cd.cntlid);
        Some(cd)
    });
    let Some(ConnectData { subnqn, hostnqn, .. }) = cd else {
        assert!(data.len() < nvme::CONNECT_DATA_LEN || data.len() > IN_CAPSULE_BYTES as usize);
        return;
    };
    for (name, at) in [(&subnqn, 256), (&hostnqn, 512)] {
        assert!(name.len() < 256 || !data[at..at + 256].contains(&0));
        assert!(!name.contains('\0'));
        assert!(name.is_empty() || data[at..].starts_with(name.as_bytes()));
    }
}

/// `capsule`: any admin command or fabrics property command against a controller (option
/// bit 2: a discovery controller; bit 3: CC.EN left clear), and the I/O SQE accessors; an
/// admin command's error recorded in the controller's Error Information log.
/// Admin replies may allocate the data the host's SGL asks for (at most one maximum
/// transfer) plus [`ADMIN_PAGE_SLACK`], never what NUMD alone asks.
pub fn capsule_case(input: &[u8], meter: &mut impl Meter) {
    let (opts, sqe, data, p) = capsule_from(input);
    let sqe = meter.run(p.len(), || {
        let (sqe, data) = decode_capsule(&p, opts, &sqe, data);
        let _ = (sqe.slba().checked_add(u64::from(sqe.nlb())), sqe.fua(), data.len());
        sqe
    });
    if data.len() > IN_CAPSULE_BYTES as usize {
        return;
    }
    let (target, subsys) = fixture();
    let sub = (opts & 4 == 0).then(|| subsys.clone());
    let Some(ctrl) = target.new_controller(sub, "nqn.host".into(), [0; 16], 0, fuzz_via()) else {
        return;
    };
    let cntlid = ctrl.cntlid;
    let mut admin = AdminState::new(ctrl);
    if opts & 8 == 0 {
        admin.property_set(nvme::prop::CC, 1);
    }
    let host_len = (sqe.sgl_len as usize).min(MAX_TRANSFER_BYTES as usize);
    if sqe.opcode == FABRICS_OPCODE {
        meter.run(0, || match sqe.fctype {
            fctype::PROPERTY_GET => {
                let _ = admin.property_get(sqe.cdw11, sqe.cdw10 & 0x7 == 1);
            }
            fctype::PROPERTY_SET => {
                let value = u64::from(sqe.cdw12) | (u64::from(sqe.cdw13) << 32);
                let _ = admin.property_set(sqe.cdw11, value);
            }
            _ => {}
        });
    } else {
        let limit = p.len() + host_len + ADMIN_PAGE_SLACK;
        let reply = meter.run(limit, || admin.execute(target, &sqe));
        if let Some(d) = &reply.data {
            assert!(d.len() <= IDENTIFY_LEN.max(host_len), "{} bytes of reply data", d.len());
        }
        // The queue records an error as the Error Information log keeps it: any command,
        // any status; the page stays its size, the newest entry first.
        if reply.status != nvme::status::SUCCESS {
            let count = admin.ctrl.errors.lock().record(ErrorEntry::of(0, &sqe, reply.status));
            let page = admin.ctrl.errors.lock().page();
            assert_eq!(page.len(), error_log::PAGE_LEN);
            assert_eq!(u64::from_le_bytes(page[..8].try_into().expect("8 bytes")), count);
        }
    }
    target.remove_controller(cntlid);
}

/// `reservations`: a sequence of reservation commands from four hosts against one namespace's
/// [`Reservations`] (limit 3: the limit is reached), 22 bytes each: host, command (Register,
/// Acquire, Release, Set Features Reservation Persistence, Report), CDW10, CDW11, data length
/// (0..=16) and 16 bytes of keys (only the first `length` given). Every command keeps the
/// invariants (each asserts them), a report is never longer than the host's buffer nor
/// [`Reservations::report_max`], notifications never go to the issuer and at most one to each
/// other host, and a host the table says holds the reservation may read and write.
pub fn reservations_case(input: &[u8], meter: &mut impl Meter) {
    let mut r = Input(input);
    let mut table = Reservations::with_limit(3).persistent();
    let hosts = [[1u8; 16], [2; 16], [3; 16], [4; 16]];
    while !r.0.is_empty() {
        let host = &hosts[usize::from(r.u8() % 4)];
        let command = r.u8() % 5;
        let (cdw10, cdw11) = (r.u32(), r.u32());
        let len = usize::from(r.u8() % 17);
        let mut data = [0u8; 16];
        data.iter_mut().for_each(|b| *b = r.u8());
        let data = &data[..len];
        meter.run(2 * table.report_max() + 256, || match command {
            0 => drop(table.register(host, cdw10, data)),
            1 => drop(table.acquire(host, cdw10, data)),
            2 => drop(table.release(host, cdw10, data)),
            3 => drop(table.set_ptpl(cdw11 & 1 != 0)),
            _ => {
                let asked = (cdw10 as usize % 8192 + 1) * 4;
                let len = asked.min(table.report_max());
                if let Ok(report) = table.report(cdw11, len) {
                    assert_eq!(report.len(), len, "a report fills the buffer it may");
                }
            }
        });
        table.assert_invariants();
        let told = table.take_notices();
        assert!(told.iter().all(|n| n.host != *host), "the issuer told of its own command");
        let mut seen: Vec<_> = told.iter().map(|n| n.host).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), told.len(), "two notices for one host");
        // What is kept across a restart decides the same.
        let nguid = [7u8; 16];
        let back = Reservations::decode(&table.encode(&nguid), &nguid, 3).expect("own encoding");
        let len = table.report_max();
        assert_eq!(back.report(1, len), table.report(1, len));
    }
    for h in &hosts {
        let report = table.report(1, table.report_max()).expect("extended report");
        let holds = report[64..].chunks_exact(64).any(|e| e[16..32] == h[..] && e[2] == 1);
        if holds {
            assert!(table.check(h, Access::Read).is_ok() && table.check(h, Access::Write).is_ok());
        }
    }
}

/// `resv_table`: arbitrary bytes as a reservation table kept in the pool (PTPL): decoding
/// never panics, allocates at most what the bytes ask for, and a table it accepts encodes back
/// to exactly those bytes (nothing is read that is not kept).
pub fn resv_table_case(input: &[u8], meter: &mut impl Meter) {
    let nguid = [7u8; 16];
    let decoded = meter.run(4 * input.len() + 4096, || Reservations::decode(input, &nguid, 64));
    if let Ok(table) = decoded {
        table.assert_invariants();
        assert_eq!(table.encode(&nguid), input, "a kept table decodes only from its encoding");
    }
}

/// One H2CData header: (offset, DATAL, PLEN).
fn h2c_header(offset: u32, len: u32, plen: u32, ddgst: bool) -> [u8; pdu::DATA_HLEN] {
    let mut b = [0u8; pdu::DATA_HLEN];
    let flags = if ddgst { pdu::FLAG_DDGSTF } else { 0 };
    b[..4].copy_from_slice(&[kind::H2C_DATA, flags, pdu::DATA_HLEN as u8, pdu::DATA_HLEN as u8]);
    b[4..8].copy_from_slice(&plen.to_le_bytes());
    b[8..12].copy_from_slice(&[1, 0, 0, 0]); // CID 1, TTAG 0
    b[12..16].copy_from_slice(&offset.to_le_bytes());
    b[16..20].copy_from_slice(&len.to_le_bytes());
    b
}

/// `h2c_sequence`: a write transfer of 0..=1 MiB (4 bytes, bit 0 of the next: data digest),
/// then H2CData headers of 12 bytes each: mode, three signed deltas, offset, DATAL. Mode bit
/// 0 puts the offset at the bytes received so far plus a delta, bit 1 DATAL at what is left
/// plus a delta, bit 2 DATAL below MAXH2CDATA + 16, bit 3 lets PLEN disagree with DATAL by
/// a delta. Every header runs through the framing checks and `check_h2c_data`, as the queue
/// runs them, until one is refused or the transfer is complete; the accepted data must tile
/// the transfer from 0 without gaps or overlap and never pass its end. Returns the bytes
/// accepted.
pub fn h2c_sequence_case(input: &[u8], meter: &mut impl Meter) -> u32 {
    let mut r = Input(input);
    let transfer = r.u32() % (MAX_TRANSFER_BYTES + 1);
    let ddgst = r.u8() & 1 != 0;
    let limit = input.len();
    let received = meter.run(limit, || {
        let mut received = 0u32;
        while !r.0.is_empty() && received < transfer {
            let (mode, d1, d2, d3) = (r.u8(), r.u8() as i8, r.u8() as i8, r.u8() as i8);
            let (mut offset, mut len) = (r.u32(), r.u32());
            if mode & 1 != 0 {
                offset = received.wrapping_add_signed(d1.into());
            }
            if mode & 2 != 0 {
                len = (transfer - received).wrapping_add_signed(d2.into());
            } else if mode & 4 != 0 {
                len %= MAXH2CDATA + 16;
            }
            let slack = if mode & 8 != 0 { i64::from(d3) } else { 0 };
            let digests = if ddgst { pdu::DIGEST_LEN as i64 } else { 0 };
            let plen = (pdu::DATA_HLEN as i64 + digests + i64::from(len) + slack)
                .clamp(0, i64::from(u32::MAX)) as u32;
            let hdr = h2c_header(offset, len, plen, ddgst);
            let Some(ch) = CommonHeader::decode(&hdr) else { unreachable!() };
            let Ok((_, data_len)) = pdu::check_host_header(&ch, false, ddgst, MAX_PLEN) else {
                break;
            };
            let h = pdu::decode_h2c_data(&hdr).expect("24-byte header");
            match pdu::check_h2c_data(&h, data_len, received, transfer, MAXH2CDATA) {
                Ok(next) => {
                    assert_eq!(h.offset, received, "data accepted out of order");
                    assert_eq!(h.len as usize, data_len, "DATAL disagrees with the PDU");
                    assert!(h.len <= MAXH2CDATA);
                    assert_eq!(u64::from(next), u64::from(received) + u64::from(h.len));
                    assert!(next <= transfer, "data accepted past the transfer");
                    received = next;
                }
                Err(_) => break,
            }
        }
        received
    });
    assert!(received <= transfer);
    received
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn pdu_decoders(bytes in vec(any::<u8>(), 0..300)) {
            pdu_case(&bytes, &mut Unmetered);
        }

        #[test]
        fn pdu_decoders_on_plausible_headers(opts: u8, kind in 0u8..8, flags in 0u8..8,
                                             plen in 0u32..400, pdo in 60u8..100,
                                             body in vec(any::<u8>(), 0..400)) {
            let hlen = pdu::host_pdu_hlen(kind).unwrap_or(24) as u8;
            let mut bytes = vec![opts, kind, flags, hlen, pdo];
            bytes.extend_from_slice(&plen.to_le_bytes());
            bytes.extend_from_slice(&body);
            pdu_case(&bytes, &mut Unmetered);
        }

        #[test]
        fn icreq(bytes in vec(any::<u8>(), 0..140)) {
            icreq_case(&bytes, &mut Unmetered);
        }

        #[test]
        fn connect(bytes in vec(any::<u8>(), 0..1200)) {
            connect_case(&bytes, &mut Unmetered);
        }

        #[test]
        fn capsule(bytes in vec(any::<u8>(), 0..200)) {
            capsule_case(&bytes, &mut Unmetered);
        }

        #[test]
        fn reservations(bytes in vec(any::<u8>(), 0..600)) {
            reservations_case(&bytes, &mut Unmetered);
        }

        #[test]
        fn resv_table(bytes in vec(any::<u8>(), 0..200)) {
            resv_table_case(&bytes, &mut Unmetered);
        }

        /// Tables that are nearly well formed: a valid header (PTPL, type, holder flag drawn
        /// from small ranges, the right NGUID) over arbitrary registrants.
        #[test]
        fn resv_table_plausible(ptpl in 0u8..3, kind in 0u8..8, flag in 0u8..4, holder: u8,
                                count in 0u16..5, entries in vec(any::<u8>(), 0..130)) {
            let mut b = vec![1, ptpl, kind, flag];
            b.extend_from_slice(&[if flag == 1 { holder } else { 0 }; 16]);
            b.extend_from_slice(&3u32.to_le_bytes());
            b.extend_from_slice(&[7u8; 16]);
            b.extend_from_slice(&count.to_le_bytes());
            b.extend_from_slice(&entries);
            resv_table_case(&b, &mut Unmetered);
        }

        #[test]
        fn capsule_admin_opcodes(opts: u8, opcode in prop::sample::select(
                                     vec![0x02u8, 0x06, 0x08, 0x09, 0x0a, 0x0c, 0x18, 0x7f]),
                                 fctype in prop::sample::select(vec![0u8, 4]),
                                 nsid in prop::sample::select(vec![0u32, 1, 2, u32::MAX]),
                                 sgl_len: u32, cdw in vec(any::<u32>(), 6)) {
            let sqe = nvme::SqeBuilder {
                opcode, fctype, nsid, sgl_len, cid: 1,
                cdw: cdw.try_into().unwrap(), ..Default::default()
            }.encode();
            let mut bytes = vec![opts];
            bytes.extend_from_slice(&sqe);
            capsule_case(&bytes, &mut Unmetered);
        }

        #[test]
        fn h2c_sequence(bytes in vec(any::<u8>(), 0..120)) {
            h2c_sequence_case(&bytes, &mut Unmetered);
        }
    }

    #[test]
    fn h2c_sequence_tiles_a_transfer() {
        // 8 KiB in two 4 KiB PDUs at offsets from the received count: accepted.
        let mut input = 8192u32.to_le_bytes().to_vec();
        input.push(0);
        for _ in 0..2 {
            input.extend_from_slice(&[5, 0, 0, 0]);
            input.extend_from_slice(&0u32.to_le_bytes());
            input.extend_from_slice(&4096u32.to_le_bytes());
        }
        assert_eq!(h2c_sequence_case(&input, &mut Unmetered), 8192);
        // The same with the second PDU one byte early: refused.
        input[5 + 12 + 1] = (-1i8) as u8;
        assert_eq!(h2c_sequence_case(&input, &mut Unmetered), 4096);
    }

    #[test]
    fn h2c_checks() {
        let h = |offset, len| H2cData { cid: 1, ttag: 0, offset, len };
        let check = |d: H2cData, data_len, received, transfer| {
            pdu::check_h2c_data(&d, data_len, received, transfer, MAXH2CDATA)
        };
        assert_eq!(check(h(0, 4096), 4096, 0, 8192), Ok(4096));
        assert_eq!(check(h(4096, 4096), 4096, 4096, 8192), Ok(8192));
        assert_eq!(
            check(h(4096, 4096), 4095, 4096, 8192).unwrap_err().fes,
            pdu::fes::DATA_LIMIT_EXCEEDED
        );
        assert_eq!(
            check(h(0, 4096), 4096, 4096, 8192).unwrap_err().fes,
            pdu::fes::DATA_OUT_OF_RANGE
        );
        assert_eq!(
            check(h(4096, 8192), 8192, 4096, 8192).unwrap_err().fes,
            pdu::fes::DATA_OUT_OF_RANGE
        );
        let big = MAXH2CDATA + 1;
        assert_eq!(
            check(h(0, big), big as usize, 0, u32::MAX).unwrap_err().fes,
            pdu::fes::DATA_LIMIT_EXCEEDED
        );
        // No wrap-around: a received count near u32::MAX plus DATAL does not come back in range.
        assert!(check(h(u32::MAX - 10, 4096), 4096, u32::MAX - 10, u32::MAX).is_err());
    }
}
