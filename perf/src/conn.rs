//! One NVMe/TCP transport connection, host side: the TCP socket, the ICReq/ICResp exchange and
//! the negotiated transport settings (digests, MAXH2CDATA), batching of outgoing PDUs, and
//! reading and validating the header of every PDU the controller sends (type, HLEN, PLEN,
//! header digest; a C2HTermReq becomes [`Error::Terminated`]). It knows nothing about
//! commands: [`crate::queue`] owns those. Raw access ([`Conn::send_raw`],
//! [`Conn::read_header`]) is public so tests can speak malformed NVMe/TCP.
//!
//! Over TLS ([`Conn::open_tls`]) the handshake comes first and every byte after it is TLS
//! record payload ([`crate::tls`]); nothing else here changes.
//!
//! PDU layouts come from `ballast_nvmf::pdu`; nothing is encoded or decoded twice.

use std::io::{BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ballast_nvmf::pdu::{self, kind, CommonHeader, IcReq};

use crate::error::{Error, Result};
use crate::tls::{Spinning, Stream, TlsClient};

/// Largest PDU we accept from a controller (a C2HData of up to 64 MiB plus headers).
pub const MAX_PLEN: usize = (64 << 20) + 256;
/// Largest PDU header (ICResp).
pub const MAX_HLEN: usize = pdu::ICREQ_LEN;
const READ_BUF_BYTES: usize = 256 * 1024;

/// What the controller answered in its ICResp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcResp {
    pub pfv: u16,
    /// Controller PDU data alignment (0's based, in dwords).
    pub cpda: u8,
    /// Digests granted: [`pdu::DGST_HEADER`] | [`pdu::DGST_DATA`].
    pub dgst: u8,
    /// Largest H2CData payload the controller accepts.
    pub maxh2cdata: u32,
}

/// The header of one PDU from the controller, already checked (and its digest verified).
#[derive(Debug, Clone)]
pub struct Header {
    pub ch: CommonHeader,
    buf: [u8; MAX_HLEN],
    /// Bytes of this PDU still unread after the header and its digest.
    pub rest: usize,
}

impl Header {
    /// The header bytes (HLEN of them, common header included).
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.ch.hlen).min(MAX_HLEN)]
    }
}

/// The fixed HLEN of each PDU type a controller may send.
pub fn controller_pdu_hlen(pdu_kind: u8) -> Option<usize> {
    match pdu_kind {
        kind::IC_RESP => Some(pdu::ICREQ_LEN),
        kind::C2H_TERM_REQ => Some(pdu::TERM_HLEN),
        kind::CAPSULE_RESP => Some(pdu::RESP_HLEN),
        kind::C2H_DATA => Some(pdu::DATA_HLEN),
        kind::R2T => Some(pdu::R2T_HLEN),
        _ => None,
    }
}

/// A connected socket, before or after the ICReq/ICResp exchange.
pub struct Conn {
    /// Reads are buffered; writes go straight to the stream (one per [`Conn::flush`]).
    rx: BufReader<Stream>,
    out: Vec<u8>,
    peer: SocketAddr,
    /// Header digests negotiated.
    pub hdgst: bool,
    /// Data digests negotiated.
    pub ddgst: bool,
    /// The controller's MAXH2CDATA (0 before ICResp).
    pub maxh2cdata: u32,
}

impl Conn {
    /// Connects (TCP only, no NVMe/TCP yet); reads and writes time out after `timeout`.
    pub fn open(addr: SocketAddr, timeout: Duration) -> Result<Conn> {
        Ok(Conn::with_stream(plain_stream(addr, timeout, false)?, addr))
    }

    /// Connects (TCP only) on a non-blocking socket that every read and write polls, spinning
    /// until it makes progress or `timeout` passes without any: the host side of a
    /// polling initiator (SPDK's perf tool polls its sockets the same way).
    pub fn open_polled(addr: SocketAddr, timeout: Duration) -> Result<Conn> {
        Ok(Conn::with_stream(plain_stream(addr, timeout, true)?, addr))
    }

    /// Connects and makes the TLS handshake (no NVMe/TCP yet); the handshake, reads and
    /// writes time out after `timeout`.
    pub fn open_tls(addr: SocketAddr, timeout: Duration, tls: &TlsClient) -> Result<Conn> {
        Ok(Conn::with_stream(tls.connect(tcp_connect(addr, timeout)?)?, addr))
    }

    fn with_stream(stream: Stream, peer: SocketAddr) -> Conn {
        Conn {
            rx: BufReader::with_capacity(READ_BUF_BYTES, stream),
            out: Vec::with_capacity(64 * 1024),
            peer,
            hdgst: false,
            ddgst: false,
            maxh2cdata: 0,
        }
    }

    /// TLS version and cipher suite; `None` in plaintext.
    pub fn tls_description(&self) -> Option<String> {
        self.rx.get_ref().tls_description()
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Socket read and write timeout (zero is taken as 1 ms).
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        if let Stream::Spin(s) = self.rx.get_mut() {
            s.timeout = timeout.max(Duration::from_millis(1));
        }
        set_timeouts(self.rx.get_ref().tcp(), timeout)
    }

    /// Sends ICReq asking for the given digests, reads and checks ICResp, and adopts what
    /// the controller granted.
    pub fn handshake(&mut self, header_digest: bool, data_digest: bool) -> Result<IcResp> {
        let mut dgst = 0;
        if header_digest {
            dgst |= pdu::DGST_HEADER;
        }
        if data_digest {
            dgst |= pdu::DGST_DATA;
        }
        pdu::encode_icreq(&mut self.out, &IcReq { pfv: pdu::PFV_1_0, hpda: 0, dgst, maxr2t: 0 });
        let h = self.read_header()?;
        if h.ch.kind != kind::IC_RESP {
            return Err(Error::Protocol(format!(
                "expected ICResp, got PDU type {:#04x}",
                h.ch.kind
            )));
        }
        if h.ch.plen as usize != pdu::ICREQ_LEN {
            return Err(Error::Protocol(format!("ICResp PLEN {} (must be 128)", h.ch.plen)));
        }
        // ICResp has ICReq's layout: PFV, CPDA (where HPDA is), DGST, MAXH2CDATA (where MAXR2T is).
        let r =
            pdu::decode_icreq(h.bytes()).ok_or_else(|| Error::Protocol("short ICResp".into()))?;
        let resp = IcResp { pfv: r.pfv, cpda: r.hpda, dgst: r.dgst, maxh2cdata: r.maxr2t };
        if resp.pfv != pdu::PFV_1_0 {
            return Err(Error::Unsupported(format!("PDU format version {}", resp.pfv)));
        }
        if resp.dgst & !dgst != 0 {
            return Err(Error::Protocol(format!(
                "ICResp grants digests {:#x} that were not requested ({dgst:#x})",
                resp.dgst
            )));
        }
        if resp.cpda != 0 {
            return Err(Error::Unsupported(format!("controller PDU data alignment {}", resp.cpda)));
        }
        if resp.maxh2cdata < 4096 {
            return Err(Error::Protocol(format!("MAXH2CDATA {} below 4096", resp.maxh2cdata)));
        }
        self.hdgst = resp.dgst & pdu::DGST_HEADER != 0;
        self.ddgst = resp.dgst & pdu::DGST_DATA != 0;
        self.maxh2cdata = resp.maxh2cdata;
        Ok(resp)
    }

    /// The outgoing batch: encoders append here; [`Conn::flush`] sends it.
    pub fn out_mut(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Sends everything batched.
    pub fn flush(&mut self) -> Result<()> {
        Ok(self.rx.get_mut().send_batch(&mut self.out)?)
    }

    /// Sends arbitrary bytes now (after anything batched).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.extend_from_slice(bytes);
        self.flush()
    }

    /// Reads exactly `buf.len()` bytes of the current PDU.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.rx.read_exact(buf)?;
        Ok(())
    }

    /// Reads and drops `n` bytes of the current PDU.
    pub fn skip(&mut self, mut n: usize) -> Result<()> {
        let mut scratch = [0u8; 512];
        while n > 0 {
            let k = n.min(scratch.len());
            self.rx.read_exact(&mut scratch[..k])?;
            n -= k;
        }
        Ok(())
    }

    /// Whether the whole next PDU is already read in (its header says how long it is): taking
    /// it needs no system call, so capsules batched meanwhile may wait for the next read that
    /// does. A PDU begun but not complete is not.
    fn next_pdu_buffered(&self) -> bool {
        let b = self.rx.buffer();
        b.len() >= pdu::CH_LEN
            && CommonHeader::decode(b).is_some_and(|ch| b.len() >= ch.plen as usize)
    }

    /// Flushes (unless the whole next PDU is already read in: a host batches the capsules it
    /// submits while it takes completions that arrived together, sending them with its next
    /// read from the socket), then reads the next PDU's header and header digest. Checks the
    /// type is one a controller sends, HLEN matches it and PLEN covers it; a C2HTermReq is read
    /// whole and returned as [`Error::Terminated`]. The caller must consume [`Header::rest`]
    /// bytes.
    pub fn read_header(&mut self) -> Result<Header> {
        if !self.next_pdu_buffered() {
            self.flush()?;
        }
        let mut buf = [0u8; MAX_HLEN];
        self.read_exact(&mut buf[..pdu::CH_LEN])?;
        let ch = CommonHeader::decode(&buf)
            .ok_or_else(|| Error::Protocol("short common header".into()))?;
        let Some(hlen) = controller_pdu_hlen(ch.kind) else {
            return Err(Error::Protocol(format!(
                "PDU type {:#04x} is not one a controller sends",
                ch.kind
            )));
        };
        if usize::from(ch.hlen) != hlen {
            return Err(Error::Protocol(format!(
                "PDU type {:#04x} with HLEN {} (must be {hlen})",
                ch.kind, ch.hlen
            )));
        }
        let plen = ch.plen as usize;
        if plen < hlen || plen > MAX_PLEN {
            return Err(Error::Protocol(format!(
                "PDU type {:#04x} with PLEN {plen} (HLEN {hlen})",
                ch.kind
            )));
        }
        self.read_exact(&mut buf[pdu::CH_LEN..hlen])?;
        if ch.kind == kind::C2H_TERM_REQ {
            let fes = u16::from_le_bytes([buf[8], buf[9]]);
            let fei = u32::from_le_bytes([buf[10], buf[11], buf[12], buf[13]]);
            // The copy of our offending header; drop it (best effort: the socket closes next).
            let _ = self.skip(plen - hlen);
            return Err(Error::Terminated { fes, fei });
        }
        let mut rest = plen - hlen;
        if self.hdgst && ch.kind != kind::IC_RESP {
            if ch.flags & pdu::FLAG_HDGSTF == 0 {
                return Err(Error::Protocol(format!(
                    "PDU type {:#04x} without the negotiated header digest",
                    ch.kind
                )));
            }
            if rest < pdu::DIGEST_LEN {
                return Err(Error::Protocol("PLEN leaves no room for the header digest".into()));
            }
            let mut digest = [0u8; pdu::DIGEST_LEN];
            self.read_exact(&mut digest)?;
            if !pdu::digest_ok(&buf[..hlen], &digest) {
                return Err(Error::HeaderDigest { kind: ch.kind });
            }
            rest -= pdu::DIGEST_LEN;
        }
        Ok(Header { ch, buf, rest })
    }

    /// Waits up to `timeout` for the controller to close the connection, discarding anything
    /// it sends meanwhile. True if it closed (EOF or reset).
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut scratch = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.set_timeout(left).is_err() {
                return false;
            }
            match self.rx.read(&mut scratch) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => return matches!(Error::from(e), Error::Closed),
            }
        }
    }
}

/// A TCP connection with no delay and `timeout` on reads and writes.
fn tcp_connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let tcp = TcpStream::connect_timeout(&addr, timeout)?;
    tcp.set_nodelay(true)?;
    set_timeouts(&tcp, timeout)?;
    Ok(tcp)
}

/// A plaintext connection: blocking, or with `poll` non-blocking and spun on (at most
/// `timeout` without progress per read or write).
pub(crate) fn plain_stream(addr: SocketAddr, timeout: Duration, poll: bool) -> Result<Stream> {
    let tcp = tcp_connect(addr, timeout)?;
    if !poll {
        return Ok(Stream::Plain(tcp));
    }
    tcp.set_nonblocking(true)?;
    Ok(Stream::Spin(Spinning { tcp, timeout }))
}

/// Socket read and write timeout (zero is taken as 1 ms).
fn set_timeouts(tcp: &TcpStream, timeout: Duration) -> Result<()> {
    let t = Some(timeout.max(Duration::from_millis(1)));
    tcp.set_read_timeout(t)?;
    tcp.set_write_timeout(t)?;
    Ok(())
}
