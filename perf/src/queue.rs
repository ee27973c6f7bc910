//! One queue pair, host side: Fabrics Connect, command identifiers and their slots, and the
//! data path of every command: in-capsule write data, write data sent as H2CData when the
//! controller asks with R2T (split at MAXH2CDATA), read data arriving as C2HData (with the
//! SUCCESS shortcut or a following CapsuleResp), and completions. Blocking: [`Queue::submit`]
//! only batches a capsule; [`Queue::poll`] reads until one command completes, sending the
//! batch before any read that needs the socket (so capsules submitted while completions that
//! arrived together are taken leave together). Any error leaves the queue unusable
//! ([`Error::Broken`] afterwards).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ballast_nvmf::nvme::{
    self, fctype, io, status, ConnectData, SqeBuilder, FABRICS_OPCODE, SGL_DATA_BLOCK_OFFSET,
    SGL_TRANSPORT_DATA_BLOCK,
};
use ballast_nvmf::pdu::{self, kind};

use crate::conn::{Conn, Header, IcResp};
use crate::error::{Error, Result};
use crate::tls::TlsClient;

/// The Connect controller id asking for a new (dynamic) controller.
pub const CNTLID_DYNAMIC: u16 = 0xffff;
/// In-capsule data the admin queue takes (NVMe/TCP: 8 KiB).
pub const ADMIN_IN_CAPSULE_BYTES: u32 = 8192;

/// Connection settings of one queue.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// Ask for header digests.
    pub header_digest: bool,
    /// Ask for data digests.
    pub data_digest: bool,
    /// Submission queue entries; Connect sends SQSIZE = `sq_size - 1`. At most this many
    /// commands are in flight at once.
    pub sq_size: u16,
    /// Keep-alive timeout for Connect (admin queue only; 0 disables).
    pub kato_ms: u32,
    /// Ask to disable SQ flow control (lets the controller use the C2HData SUCCESS shortcut).
    pub disable_sqflow: bool,
    /// How long any socket read or write may block.
    pub timeout: Duration,
    /// Host identifier sent in Connect.
    pub hostid: [u8; 16],
    /// TLS before ICReq, with this client's PSK (its identity must name the host and the
    /// subsystem this queue connects to); `None`: plaintext.
    pub tls: Option<Arc<TlsClient>>,
    /// Poll the socket (spin) instead of sleeping in it (plaintext only).
    pub poll: bool,
}

impl Default for QueueOptions {
    fn default() -> QueueOptions {
        QueueOptions {
            header_digest: false,
            data_digest: false,
            sq_size: 32,
            kato_ms: 0,
            disable_sqflow: false,
            timeout: Duration::from_secs(10),
            hostid: *b"ballast-perf-hid",
            tls: None,
            poll: false,
        }
    }
}

/// The data of a command.
#[derive(Debug, Clone, Copy)]
pub enum Data<'a> {
    /// No data.
    None,
    /// The controller sends this many bytes (C2HData).
    FromTarget(u32),
    /// Data for the controller: in the capsule if it fits the in-capsule limit, else by R2T.
    ToTarget(&'a [u8]),
    /// Data for the controller, in the capsule whatever the limit.
    InCapsule(&'a [u8]),
    /// Data for the controller, sent only when asked by R2T.
    ViaR2T(&'a [u8]),
}

/// A command: the SQE (its CID and SGL are filled in by the queue) and its data.
#[derive(Debug, Clone, Copy)]
pub struct Command<'a> {
    pub sqe: SqeBuilder,
    pub data: Data<'a>,
}

/// A completed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub cid: u16,
    /// (SCT << 8) | SC; 0 on success.
    pub status: u16,
    pub dw0: u32,
    pub dw1: u32,
    /// SQ head pointer from the CQE (`None` when completed by the C2HData SUCCESS flag).
    pub sqhd: Option<u16>,
    /// Bytes transferred (read data received, or write data sent by R2T).
    pub bytes: u32,
}

impl Completion {
    pub fn ok(&self) -> bool {
        self.status == status::SUCCESS
    }

    /// `Err(Error::Status)` unless the command succeeded.
    pub fn check(self) -> Result<Completion> {
        if self.ok() {
            Ok(self)
        } else {
            Err(Error::Status { status: self.status, dw0: self.dw0 })
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Dir {
    #[default]
    None,
    Read,
    Write,
}

#[derive(Debug, Default)]
struct Slot {
    busy: bool,
    dir: Dir,
    /// Bytes the command transfers by C2HData or R2T.
    len: u32,
    /// Read destination or write source (R2T path).
    buf: Vec<u8>,
    /// Bytes received (reads) or requested by R2T and sent (writes).
    done: u32,
}

/// One connected queue (admin when `qid` is 0).
pub struct Queue {
    conn: Conn,
    ic: Option<IcResp>,
    qid: u16,
    cntlid: u16,
    in_capsule_max: u32,
    lba_size: u32,
    slots: Vec<Slot>,
    free: Vec<u16>,
    sqhd: u16,
    connected: bool,
    broken: bool,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn len32(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::Invalid(format!("transfer of {n} bytes")))
}

fn busy_slot<'a>(slots: &'a mut [Slot], cid: u16, what: &str) -> Result<&'a mut Slot> {
    match slots.get_mut(usize::from(cid)) {
        Some(s) if s.busy => Ok(s),
        _ => Err(Error::Protocol(format!("{what} for command id {cid}, which is not in flight"))),
    }
}

impl Queue {
    /// TCP connect, ICReq/ICResp, Fabrics Connect. `cntlid` is [`CNTLID_DYNAMIC`] for an
    /// admin queue, else the controller id the admin queue's Connect returned.
    pub fn connect(
        addr: SocketAddr,
        subnqn: &str,
        hostnqn: &str,
        qid: u16,
        cntlid: u16,
        opts: &QueueOptions,
    ) -> Result<Queue> {
        let mut q = Queue::handshake(addr, qid, opts)?;
        q.fabrics_connect(subnqn, hostnqn, cntlid, opts)?;
        Ok(q)
    }

    /// TCP connect (and TLS with `opts.tls`) and ICReq/ICResp only: a queue that is not yet
    /// connected (for tests).
    pub fn handshake(addr: SocketAddr, qid: u16, opts: &QueueOptions) -> Result<Queue> {
        let mut conn = match &opts.tls {
            Some(_) if opts.poll => {
                return Err(Error::Protocol("polling is for plaintext queues only".into()))
            }
            Some(tls) => Conn::open_tls(addr, opts.timeout, tls)?,
            None if opts.poll => Conn::open_polled(addr, opts.timeout)?,
            None => Conn::open(addr, opts.timeout)?,
        };
        let ic = conn.handshake(opts.header_digest, opts.data_digest)?;
        let mut q = Queue::new(conn, qid, opts);
        q.ic = Some(ic);
        Ok(q)
    }

    /// Wraps a connection (after or before ICReq/ICResp) as queue `qid`.
    pub fn new(conn: Conn, qid: u16, opts: &QueueOptions) -> Queue {
        let entries = opts.sq_size.max(1);
        Queue {
            conn,
            ic: None,
            qid,
            cntlid: CNTLID_DYNAMIC,
            in_capsule_max: if qid == 0 { ADMIN_IN_CAPSULE_BYTES } else { 0 },
            lba_size: 4096,
            slots: (0..entries).map(|_| Slot::default()).collect(),
            free: (0..entries).rev().collect(),
            sqhd: 0,
            connected: false,
            broken: false,
        }
    }

    /// Fabrics Connect with the 1024-byte connect data in the capsule.
    pub fn fabrics_connect(
        &mut self,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
        opts: &QueueOptions,
    ) -> Result<u16> {
        let data = nvme::encode_connect_data(&ConnectData {
            hostid: opts.hostid,
            cntlid,
            subnqn: subnqn.into(),
            hostnqn: hostnqn.into(),
        });
        let cattr: u32 = if opts.disable_sqflow { 0x04 } else { 0 };
        let sqsize = u32::from(opts.sq_size.saturating_sub(1));
        let kato = if self.qid == 0 { opts.kato_ms } else { 0 };
        let sqe = SqeBuilder {
            opcode: FABRICS_OPCODE,
            fctype: fctype::CONNECT,
            cdw: [u32::from(self.qid) << 16, sqsize | (cattr << 16), kato, 0, 0, 0],
            ..SqeBuilder::default()
        };
        let (c, _) = self.execute(&Command { sqe, data: Data::InCapsule(&data) })?;
        let c = c.check()?;
        self.cntlid = c.dw0 as u16;
        self.connected = true;
        Ok(self.cntlid)
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// The controller id (from Connect's completion).
    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }

    /// ICResp as received.
    pub fn ic_resp(&self) -> Option<IcResp> {
        self.ic
    }

    /// The last SQ head pointer the controller reported.
    pub fn sqhd(&self) -> u16 {
        self.sqhd
    }

    /// Commands in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// How many commands may be in flight.
    pub fn depth(&self) -> usize {
        self.slots.len()
    }

    /// Largest write sent in the capsule by [`Data::ToTarget`] (from Identify: IOCCSZ).
    pub fn set_in_capsule_limit(&mut self, bytes: u32) {
        self.in_capsule_max = bytes;
    }

    pub fn in_capsule_limit(&self) -> u32 {
        self.in_capsule_max
    }

    /// LBA size used by [`Queue::submit_read`] / [`Queue::submit_write`] (default 4096).
    pub fn set_lba_size(&mut self, bytes: u32) {
        self.lba_size = bytes.max(1);
    }

    /// The transport connection, for raw PDUs in tests.
    pub fn conn_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }

    /// Gives up the queue, keeping its connection (for raw PDUs in tests).
    pub fn into_conn(self) -> Conn {
        self.conn
    }

    /// Queues a command's capsule (sent by [`Queue::flush`], or by the first [`Queue::poll`]
    /// that has to read from the socket);
    /// returns its command id.
    pub fn submit(&mut self, cmd: &Command<'_>) -> Result<u16> {
        if self.broken {
            return Err(Error::Broken);
        }
        let (dir, len, capsule_data, r2t_data): (Dir, u32, &[u8], &[u8]) = match cmd.data {
            Data::None => (Dir::None, 0, &[], &[]),
            Data::FromTarget(n) => (Dir::Read, n, &[], &[]),
            Data::InCapsule(d) => (Dir::None, len32(d.len())?, d, &[]),
            Data::ToTarget(d) if d.len() <= self.in_capsule_max as usize => {
                (Dir::None, len32(d.len())?, d, &[])
            }
            Data::ToTarget(d) | Data::ViaR2T(d) => (Dir::Write, len32(d.len())?, &[], d),
        };
        let Some(cid) = self.free.pop() else {
            return Err(Error::QueueFull(self.slots.len()));
        };
        let mut sqe = cmd.sqe;
        sqe.cid = cid;
        sqe.sgl_addr = 0;
        sqe.sgl_len = len;
        sqe.sgl_type =
            if capsule_data.is_empty() { SGL_TRANSPORT_DATA_BLOCK } else { SGL_DATA_BLOCK_OFFSET };
        let slot = &mut self.slots[usize::from(cid)];
        slot.busy = true;
        slot.dir = dir;
        slot.done = 0;
        slot.len = if dir == Dir::None { 0 } else { len };
        match dir {
            Dir::Read => {
                if slot.buf.len() < len as usize {
                    slot.buf.resize(len as usize, 0);
                }
            }
            Dir::Write => {
                slot.buf.clear();
                slot.buf.extend_from_slice(r2t_data);
            }
            Dir::None => {}
        }
        let (hdgst, ddgst) = (self.conn.hdgst, self.conn.ddgst);
        pdu::encode_capsule_cmd(self.conn.out_mut(), &sqe.encode(), capsule_data, hdgst, ddgst);
        Ok(cid)
    }

    /// Read of `len` bytes at `slba` (`len` a multiple of the LBA size).
    pub fn submit_read(&mut self, nsid: u32, slba: u64, len: u32) -> Result<u16> {
        let sqe = self.rw_sqe(io::READ, nsid, slba, len as usize)?;
        self.submit(&Command { sqe, data: Data::FromTarget(len) })
    }

    /// Write of `data` at `slba` (in the capsule if it fits, else by R2T).
    pub fn submit_write(&mut self, nsid: u32, slba: u64, data: &[u8]) -> Result<u16> {
        let sqe = self.rw_sqe(io::WRITE, nsid, slba, data.len())?;
        self.submit(&Command { sqe, data: Data::ToTarget(data) })
    }

    /// The SQE of a Read or Write (no FUA).
    pub fn rw_sqe(&self, opcode: u8, nsid: u32, slba: u64, len: usize) -> Result<SqeBuilder> {
        let lba = self.lba_size as usize;
        let nlb = len / lba;
        if !len.is_multiple_of(lba) || nlb == 0 || nlb > 65536 {
            return Err(Error::Invalid(format!("{len} bytes is not 1..=65536 blocks of {lba}")));
        }
        Ok(SqeBuilder {
            opcode,
            nsid,
            cdw: [slba as u32, (slba >> 32) as u32, (nlb - 1) as u32, 0, 0, 0],
            ..SqeBuilder::default()
        })
    }

    /// Sends the batched capsules now.
    pub fn flush(&mut self) -> Result<()> {
        if self.broken {
            return Err(Error::Broken);
        }
        let r = self.conn.flush();
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Reads PDUs (answering R2Ts) until a command completes, sending what is batched before
    /// any read that needs the socket (completions already read in are taken first).
    pub fn poll(&mut self) -> Result<Completion> {
        if self.broken {
            return Err(Error::Broken);
        }
        if self.in_flight() == 0 {
            return Err(Error::Invalid("poll with no command in flight".into()));
        }
        let r = self.poll_inner();
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Read data of a completed command; valid until its command id is reused by a submit.
    pub fn data(&self, cid: u16) -> &[u8] {
        match self.slots.get(usize::from(cid)) {
            Some(s) if s.dir == Dir::Read => &s.buf[..s.done as usize],
            _ => &[],
        }
    }

    /// Submits one command and waits for it; no other command may be in flight.
    /// Returns the completion (whatever its status) and the data read.
    pub fn execute(&mut self, cmd: &Command<'_>) -> Result<(Completion, Vec<u8>)> {
        if self.in_flight() != 0 {
            return Err(Error::Invalid("execute with commands in flight".into()));
        }
        let cid = self.submit(cmd)?;
        let c = self.poll()?;
        if c.cid != cid {
            self.broken = true;
            return Err(Error::Protocol(format!(
                "completion for {} while waiting for {cid}",
                c.cid
            )));
        }
        Ok((c, self.data(cid).to_vec()))
    }

    fn complete(&mut self, cid: u16, st: u16, dw0: u32, dw1: u32, sqhd: Option<u16>) -> Completion {
        let slot = &mut self.slots[usize::from(cid)];
        slot.busy = false;
        self.free.push(cid);
        Completion { cid, status: st, dw0, dw1, sqhd, bytes: slot.done }
    }

    fn poll_inner(&mut self) -> Result<Completion> {
        loop {
            let h = self.conn.read_header()?;
            match h.ch.kind {
                kind::CAPSULE_RESP => return self.on_capsule_resp(&h),
                kind::C2H_DATA => {
                    if let Some(c) = self.on_c2h_data(&h)? {
                        return Ok(c);
                    }
                }
                kind::R2T => self.on_r2t(&h)?,
                other => {
                    return Err(Error::Protocol(format!(
                        "unexpected PDU type {other:#04x} on a connected queue"
                    )))
                }
            }
        }
    }

    fn on_capsule_resp(&mut self, h: &Header) -> Result<Completion> {
        if h.rest != 0 {
            return Err(Error::Protocol(format!("CapsuleResp with {} extra bytes", h.rest)));
        }
        let cqe = &h.bytes()[pdu::CH_LEN..pdu::RESP_HLEN];
        let (cid, st, dw0) =
            nvme::decode_cqe(cqe).ok_or_else(|| Error::Protocol("short CQE".into()))?;
        let (dw1, sqhd, sqid) = (le32(cqe, 4), le16(cqe, 8), le16(cqe, 10));
        // Before Connect completes the controller does not know the queue yet (SQID 0), and
        // some controllers (SPDK's target) send SQID 0 in every CQE: over a fabric the queue
        // pair is the connection, so only another queue's id is an error.
        if sqid != self.qid && sqid != 0 && self.connected {
            return Err(Error::Protocol(format!("CQE for SQ {sqid} on queue {}", self.qid)));
        }
        let slot = busy_slot(&mut self.slots, cid, "CapsuleResp")?;
        if st == status::SUCCESS && slot.dir != Dir::None && slot.done != slot.len {
            return Err(Error::Protocol(format!(
                "command {cid} succeeded after {} of {} data bytes",
                slot.done, slot.len
            )));
        }
        self.sqhd = sqhd;
        Ok(self.complete(cid, st, dw0, dw1, Some(sqhd)))
    }

    fn on_c2h_data(&mut self, h: &Header) -> Result<Option<Completion>> {
        let fields = pdu::decode_h2c_data(h.bytes()) // C2HData has H2CData's layout
            .ok_or_else(|| Error::Protocol("short C2HData header".into()))?;
        let (cid, offset, len) = (fields.cid, fields.offset as usize, fields.len as usize);
        let hd = if self.conn.hdgst { pdu::DIGEST_LEN } else { 0 };
        let dd = if self.conn.ddgst { pdu::DIGEST_LEN } else { 0 };
        let (flags, pdo) = (h.ch.flags, usize::from(h.ch.pdo));
        let header_end = pdu::DATA_HLEN + hd;
        let plen = h.ch.plen as usize;
        if pdo < header_end || pdo + dd > plen {
            return Err(Error::Protocol(format!("C2HData PDO {pdo} with PLEN {plen}")));
        }
        if dd > 0 && flags & pdu::FLAG_DDGSTF == 0 {
            return Err(Error::Protocol("C2HData without the negotiated data digest".into()));
        }
        if plen - pdo - dd != len {
            return Err(Error::Protocol(format!(
                "C2HData DATAL {len} but PLEN {plen} carries {}",
                plen - pdo - dd
            )));
        }
        let slot = busy_slot(&mut self.slots, cid, "C2HData")?;
        if slot.dir != Dir::Read {
            return Err(Error::Protocol(format!("C2HData for command {cid}, which reads nothing")));
        }
        let end = offset.checked_add(len).filter(|&e| e <= slot.len as usize).ok_or_else(|| {
            Error::Protocol(format!(
                "C2HData {offset}+{len} beyond command {cid}'s {} bytes",
                slot.len
            ))
        })?;
        self.conn.skip(pdo - header_end)?;
        self.conn.read_exact(&mut slot.buf[offset..end])?;
        if dd > 0 {
            let mut digest = [0u8; pdu::DIGEST_LEN];
            self.conn.read_exact(&mut digest)?;
            if !pdu::digest_ok(&slot.buf[offset..end], &digest) {
                return Err(Error::DataDigest { cid });
            }
        }
        slot.done = slot
            .done
            .checked_add(len as u32)
            .filter(|&d| d <= slot.len)
            .ok_or_else(|| Error::Protocol(format!("more C2HData than command {cid} reads")))?;
        if flags & pdu::FLAG_SUCCESS == 0 {
            return Ok(None);
        }
        if flags & pdu::FLAG_LAST_PDU == 0 {
            return Err(Error::Protocol("C2HData SUCCESS without LAST_PDU".into()));
        }
        // The SUCCESS flag is only *allowed* to the controller once SQ flow control is off,
        // but the Linux and SPDK hosts accept it either way (SPDK's target sends it with flow
        // control on): take it, the command is done; there is just no SQ head to learn.
        if slot.done != slot.len {
            return Err(Error::Protocol(format!(
                "C2HData SUCCESS after {} of {} bytes",
                slot.done, slot.len
            )));
        }
        Ok(Some(self.complete(cid, status::SUCCESS, 0, 0, None)))
    }

    fn on_r2t(&mut self, h: &Header) -> Result<()> {
        if h.rest != 0 {
            return Err(Error::Protocol(format!("R2T with {} extra bytes", h.rest)));
        }
        let r = pdu::decode_h2c_data(h.bytes()) // R2T has H2CData's layout
            .ok_or_else(|| Error::Protocol("short R2T".into()))?;
        let (cid, offset, len) = (r.cid, r.offset as usize, r.len as usize);
        let maxh2cdata = self.conn.maxh2cdata.max(4096) as usize;
        let (hdgst, ddgst) = (self.conn.hdgst, self.conn.ddgst);
        let slot = busy_slot(&mut self.slots, cid, "R2T")?;
        if slot.dir != Dir::Write {
            return Err(Error::Protocol(format!("R2T for command {cid}, which writes nothing")));
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| len > 0 && e <= slot.len as usize && e <= slot.buf.len())
            .ok_or_else(|| {
                Error::Protocol(format!(
                    "R2T {offset}+{len} outside command {cid}'s {} bytes",
                    slot.len
                ))
            })?;
        if slot.done as usize + len > slot.len as usize {
            return Err(Error::Protocol(format!("R2Ts for more than command {cid} writes")));
        }
        let out = self.conn.out_mut();
        let mut at = offset;
        while at < end {
            let n = (end - at).min(maxh2cdata);
            let d = pdu::H2cData { cid, ttag: r.ttag, offset: at as u32, len: n as u32 };
            pdu::encode_h2c_data_header(out, &d, at + n == end, hdgst, ddgst);
            let chunk = &slot.buf[at..at + n];
            out.extend_from_slice(chunk);
            if ddgst {
                out.extend_from_slice(&crc32c::crc32c(chunk).to_le_bytes());
            }
            at += n;
        }
        slot.done += len as u32;
        self.conn.flush()
    }
}

#[cfg(test)]
mod tests {
    //! The initiator against a scripted fake controller on loopback: paths ballast does not
    //! take (split C2HData, several R2Ts per command) and garbage from the controller.

    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::thread;

    use super::*;

    const HOSTNQN: &str = "nqn.2014-08.org.example:host";

    fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).expect("fake controller read");
        b
    }

    /// A controller that accepts one connection, does ICReq/ICResp and Connect (no digests,
    /// CNTLID 7), then runs `script`.
    fn fake(script: impl FnOnce(&mut TcpStream) + Send + 'static) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            read_n(&mut s, pdu::ICREQ_LEN);
            let mut out = Vec::new();
            pdu::encode_icresp(&mut out, 0, 128 * 1024);
            s.write_all(&out).unwrap();
            out.clear();
            let cmd = read_n(&mut s, pdu::CMD_HLEN + nvme::CONNECT_DATA_LEN);
            let cid = u16::from_le_bytes([cmd[10], cmd[11]]);
            let qid = u16::from_le_bytes([cmd[50], cmd[51]]);
            pdu::encode_capsule_resp(&mut out, &nvme::encode_cqe(7, 0, 1, qid, cid, 0), false);
            s.write_all(&out).unwrap();
            script(&mut s);
        });
        addr
    }

    fn opts() -> QueueOptions {
        QueueOptions {
            disable_sqflow: true,
            timeout: Duration::from_secs(5),
            ..QueueOptions::default()
        }
    }

    #[test]
    fn split_c2h_data_and_several_r2ts() {
        split_c2h_data_and_several_r2ts_with(opts());
    }

    /// The same exchange on a polled socket: every read and write spins until it progresses
    /// (the controller answers after a pause, so the reads find nothing at first).
    #[test]
    fn split_c2h_data_and_several_r2ts_polled() {
        split_c2h_data_and_several_r2ts_with(QueueOptions { poll: true, ..opts() });
    }

    /// Capsules submitted while completions that arrived together are taken wait for the next
    /// read that needs the socket, and then leave in one send (as SPDK's and Linux's hosts
    /// batch them): a poll answered from what is already read in sends nothing.
    #[test]
    fn capsules_wait_while_completions_already_read_in_are_taken() {
        for poll in [false, true] {
            capsules_wait_while_completions_already_read_in_are_taken_with(poll);
        }
    }

    fn capsules_wait_while_completions_already_read_in_are_taken_with(poll: bool) {
        let (taken_tx, taken_rx) = std::sync::mpsc::channel::<()>();
        let (quiet_tx, quiet_rx) = std::sync::mpsc::channel::<bool>();
        let addr = fake(move |s| {
            let cids: Vec<u16> = (0..2)
                .map(|_| {
                    let c = read_n(s, pdu::CMD_HLEN);
                    u16::from_le_bytes([c[10], c[11]])
                })
                .collect();
            let mut out = Vec::new();
            for &cid in &cids {
                pdu::encode_capsule_resp(&mut out, &nvme::encode_cqe(0, 0, 2, 1, cid, 0), false);
            }
            s.write_all(&out).unwrap();
            // The host took both completions and submitted two commands meanwhile.
            taken_rx.recv().unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            let mut b = [0u8; 1];
            let quiet = matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut);
            quiet_tx.send(quiet).unwrap();
            s.set_read_timeout(None).unwrap();
            // Then both capsules arrive, back to back.
            let mut out = Vec::new();
            for _ in 0..2 {
                let c = read_n(s, pdu::CMD_HLEN);
                let cid = u16::from_le_bytes([c[10], c[11]]);
                pdu::encode_capsule_resp(&mut out, &nvme::encode_cqe(0, 0, 4, 1, cid, 0), false);
            }
            s.write_all(&out).unwrap();
        });
        let mut q =
            Queue::connect(addr, "nqn.x", HOSTNQN, 1, 7, &QueueOptions { poll, ..opts() }).unwrap();
        let flush = || Command {
            sqe: SqeBuilder { opcode: io::FLUSH, nsid: 1, ..Default::default() },
            data: Data::None,
        };
        q.submit(&flush()).unwrap();
        q.submit(&flush()).unwrap();
        assert!(q.poll().unwrap().ok());
        q.submit(&flush()).unwrap();
        // Answered from what the first read took in: nothing is sent.
        assert!(q.poll().unwrap().ok());
        q.submit(&flush()).unwrap();
        taken_tx.send(()).unwrap();
        assert!(
            quiet_rx.recv().unwrap(),
            "a capsule left before its batch's next read (poll {poll})"
        );
        for _ in 0..2 {
            assert!(q.poll().unwrap().ok());
        }
        assert_eq!(q.in_flight(), 0);
    }

    /// A polled read that never progresses gives up after the queue's timeout, as a blocking
    /// one does.
    #[test]
    fn a_polled_queue_times_out() {
        let addr = fake(|s| {
            read_n(s, pdu::CMD_HLEN);
            thread::sleep(Duration::from_secs(2));
        });
        let o = QueueOptions { poll: true, timeout: Duration::from_millis(200), ..opts() };
        let mut q = Queue::connect(addr, "nqn.x", HOSTNQN, 1, 7, &o).unwrap();
        q.submit_read(1, 0, 4096).unwrap();
        let t = std::time::Instant::now();
        let e = q.poll().expect_err("nothing answers");
        assert!(matches!(e, Error::Timeout), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(1), "gave up after {:?}", t.elapsed());
    }

    fn split_c2h_data_and_several_r2ts_with(o: QueueOptions) {
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        let expect = data.clone();
        let addr = fake(move |s| {
            let read = read_n(s, pdu::CMD_HLEN);
            let write = read_n(s, pdu::CMD_HLEN);
            let (rcid, wcid) = (
                u16::from_le_bytes([read[10], read[11]]),
                u16::from_le_bytes([write[10], write[11]]),
            );
            let mut out = Vec::new();
            thread::sleep(Duration::from_millis(20));
            pdu::encode_c2h_data_header(&mut out, rcid, 0, 4096, false, false, false, false);
            out.extend_from_slice(&expect[..4096]);
            pdu::encode_c2h_data_header(&mut out, rcid, 4096, 4096, true, true, false, false);
            out.extend_from_slice(&expect[4096..]);
            // Second half first, then the first half.
            pdu::encode_r2t(&mut out, wcid, 3, 4096, 4096, false);
            s.write_all(&out).unwrap();
            for (offset, range) in [(4096u32, 4096..8192), (0, 0..4096)] {
                let h2c = read_n(s, pdu::DATA_HLEN + 4096);
                let d = pdu::decode_h2c_data(&h2c).unwrap();
                assert_eq!((d.cid, d.ttag, d.offset, d.len), (wcid, 3, offset, 4096));
                assert_eq!(h2c[1] & pdu::FLAG_LAST_PDU, pdu::FLAG_LAST_PDU);
                assert!(h2c[pdu::DATA_HLEN..] == expect[range]);
                out.clear();
                if offset == 4096 {
                    pdu::encode_r2t(&mut out, wcid, 3, 0, 4096, false);
                } else {
                    let cqe = nvme::encode_cqe(0, 0, 3, 1, wcid, 0);
                    pdu::encode_capsule_resp(&mut out, &cqe, false);
                }
                s.write_all(&out).unwrap();
            }
        });
        let mut q = Queue::connect(addr, "nqn.x", HOSTNQN, 1, 7, &o).unwrap();
        assert_eq!(q.cntlid(), 7);
        let r = q.submit_read(1, 0, 8192).unwrap();
        let w = q.submit(&Command {
            sqe: q.rw_sqe(io::WRITE, 1, 0, 8192).unwrap(),
            data: Data::ViaR2T(&data),
        });
        let w = w.unwrap();
        let c = q.poll().unwrap();
        assert_eq!((c.cid, c.status, c.sqhd, c.bytes), (r, 0, None, 8192));
        assert!(q.data(r) == &data[..]);
        let c = q.poll().unwrap();
        assert_eq!((c.cid, c.status, c.sqhd, c.bytes), (w, 0, Some(3), 8192));
        assert_eq!(q.in_flight(), 0);
    }

    /// What real targets send that the letter of the spec frowns on: SQID 0 in every CQE and
    /// the C2HData SUCCESS flag while SQ flow control is on (SPDK's target does both).
    #[test]
    fn sqid_zero_and_success_with_flow_control_on() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 13) as u8).collect();
        let expect = data.clone();
        let addr = fake(move |s| {
            let read = read_n(s, pdu::CMD_HLEN);
            let write = read_n(s, pdu::CMD_HLEN + 4096);
            let (rcid, wcid) = (
                u16::from_le_bytes([read[10], read[11]]),
                u16::from_le_bytes([write[10], write[11]]),
            );
            let mut out = Vec::new();
            pdu::encode_c2h_data_header(&mut out, rcid, 0, 4096, true, true, false, false);
            out.extend_from_slice(&expect);
            pdu::encode_capsule_resp(&mut out, &nvme::encode_cqe(0, 0, 2, 0, wcid, 0), false);
            s.write_all(&out).unwrap();
        });
        let flow_on = QueueOptions { disable_sqflow: false, ..opts() };
        let mut q = Queue::connect(addr, "nqn.x", HOSTNQN, 1, 7, &flow_on).unwrap();
        let r = q.submit_read(1, 0, 4096).unwrap();
        let w = q
            .submit(&Command {
                sqe: q.rw_sqe(io::WRITE, 1, 0, 4096).unwrap(),
                data: Data::InCapsule(&data),
            })
            .unwrap();
        let c = q.poll().unwrap();
        assert_eq!((c.cid, c.status, c.sqhd), (r, 0, None), "SUCCESS with flow control on");
        assert!(q.data(r) == &data[..]);
        let c = q.poll().unwrap();
        assert_eq!((c.cid, c.status, c.sqhd), (w, 0, Some(2)), "a CQE carrying SQID 0");
    }

    /// A CQE naming another queue is still refused.
    #[test]
    fn cqe_for_another_queue_is_refused() {
        let addr = fake(move |s| {
            let read = read_n(s, pdu::CMD_HLEN);
            let rcid = u16::from_le_bytes([read[10], read[11]]);
            let mut out = Vec::new();
            pdu::encode_capsule_resp(&mut out, &nvme::encode_cqe(0, 0, 2, 5, rcid, 0), false);
            s.write_all(&out).unwrap();
        });
        let mut q = Queue::connect(addr, "nqn.x", HOSTNQN, 1, 7, &opts()).unwrap();
        q.submit_read(1, 0, 4096).unwrap();
        assert!(matches!(q.poll(), Err(Error::Protocol(m)) if m.contains("SQ 5")));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 128, failure_persistence: None, ..Default::default()
        })]
        /// Whatever the controller sends after Connect, the initiator returns, never panics.
        #[test]
        fn garbage_from_the_controller(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            kind in proptest::prop_oneof![
                proptest::strategy::Just(kind::CAPSULE_RESP),
                proptest::strategy::Just(kind::C2H_DATA),
                proptest::strategy::Just(kind::R2T),
                proptest::strategy::Just(kind::C2H_TERM_REQ),
                proptest::prelude::any::<u8>()
            ],
            plausible in proptest::prelude::any::<bool>(),
        ) {
            let mut garbage = bytes.clone();
            if plausible && garbage.len() >= 8 {
                // A header that passes the first checks, with random fields behind it.
                let hlen = crate::conn::controller_pdu_hlen(kind).unwrap_or(24);
                garbage[0] = kind;
                garbage[2] = hlen as u8;
                let plen = (garbage.len() as u32).max(hlen as u32);
                garbage[4..8].copy_from_slice(&plen.to_le_bytes());
            }
            let addr = fake(move |s| {
                read_n(s, pdu::CMD_HLEN);
                let _ = s.write_all(&garbage);
            });
            let mut q = Queue::connect(addr, "nqn.x", HOSTNQN, 1, 7, &QueueOptions {
                timeout: Duration::from_millis(300),
                ..opts()
            }).unwrap();
            let _ = q.submit_read(1, 0, 4096).unwrap();
            let _ = q.poll();
        }
    }
}
