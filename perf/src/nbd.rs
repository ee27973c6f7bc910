//! A blocking NBD client for the load generator: so `ballast-perf` can drive any NBD server
//! (ours, nbdkit, qemu-nbd) the way it drives NVMe/TCP targets — pipelined requests, a
//! polling socket, and the requests submitted while replies already read in are taken leaving
//! together with the next read from the socket (as Linux's host and SPDK's perf tool batch).
//! fio's NBD engine sends one request per system call and sleeps in each, which makes it, not
//! the server, the bottleneck on a small machine.
//!
//! What it speaks: fixed newstyle, NBD_OPT_GO asking for the block-size constraints (or
//! NBD_OPT_EXPORT_NAME where a server lacks NBD_OPT_GO), then simple replies only (structured
//! replies are never negotiated, so every reply is a 16-byte header and, for a successful
//! read, its data). Invariants: a handle is a slot index below the depth; a reply naming a
//! handle not in flight is a protocol error; nothing the server sends panics the client.
//!
//! Message layouts come from `ballast_nbd::codec` (the server's codec and its inverses).

use std::io::{BufReader, Read};
use std::net::SocketAddr;
use std::time::Duration;

use ballast_nbd::codec::{self, Info, InfoRequest, Request};

use crate::conn::plain_stream;
use crate::error::{Error, Result};
use crate::tls::Stream;

const READ_BUF_BYTES: usize = 256 * 1024;
/// Largest option reply data we read (block-size info is 14 bytes; names at most 4 KiB).
const OPTION_REPLY_MAX: u32 = 64 * 1024;
/// Replies to NBD_OPT_GO at most before its acknowledgement (a server sends a handful of
/// NBD_REP_INFO; one sending them without end is refused, not followed).
pub const OPTION_REPLIES_MAX: usize = 64;
/// Largest request we send: what servers accept without asking (proto.md's 32 MiB).
pub const MAX_REQUEST: u32 = 32 << 20;

/// What the handshake learned about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// The server's block-size constraints (1 / 4096 / 32 MiB where it sent none).
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        self.flags & codec::TF_READ_ONLY != 0
    }
}

/// A request in flight.
#[derive(Debug, Clone, Copy)]
struct Slot {
    read: bool,
    len: u32,
}

/// One NBD connection in transmission.
pub struct NbdClient {
    rx: BufReader<Stream>,
    out: Vec<u8>,
    info: ExportInfo,
    slots: Vec<Option<Slot>>,
    free: Vec<u16>,
    scratch: Vec<u8>,
    broken: bool,
}

/// A reply: the handle (slot) and the NBD error (0: success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub handle: u16,
    pub error: u32,
    pub read: bool,
}

impl NbdClient {
    /// Connects to `addr`, negotiates `export` and prepares `depth` request slots; with
    /// `poll`, the socket is non-blocking and every read and write spins.
    pub fn connect(
        addr: SocketAddr,
        export: &str,
        depth: u16,
        timeout: Duration,
        poll: bool,
    ) -> Result<NbdClient> {
        let stream = plain_stream(addr, timeout, poll)?;
        let mut c = NbdClient {
            rx: BufReader::with_capacity(READ_BUF_BYTES, stream),
            out: Vec::with_capacity(64 * 1024),
            info: ExportInfo {
                size: 0,
                flags: 0,
                min_block: 1,
                preferred_block: 4096,
                max_block: MAX_REQUEST,
            },
            slots: vec![None; usize::from(depth.max(1))],
            free: (0..depth.max(1)).rev().collect(),
            scratch: Vec::new(),
            broken: false,
        };
        c.handshake(export)?;
        Ok(c)
    }

    pub fn info(&self) -> ExportInfo {
        self.info
    }

    fn flush(&mut self) -> Result<()> {
        Ok(self.rx.get_mut().send_batch(&mut self.out)?)
    }

    fn read_exact(&mut self, n: usize) -> Result<&[u8]> {
        self.scratch.resize(n, 0);
        self.rx.read_exact(&mut self.scratch[..n])?;
        Ok(&self.scratch[..n])
    }

    fn protocol(what: impl Into<String>) -> Error {
        Error::Protocol(what.into())
    }

    fn handshake(&mut self, export: &str) -> Result<()> {
        let greeting = self.read_exact(codec::GREETING_LEN)?;
        let flags = codec::decode_greeting(greeting)
            .map_err(|e| Self::protocol(format!("NBD greeting: {e}")))?;
        if flags & codec::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(Error::Unsupported("a server without fixed newstyle".into()));
        }
        let no_zeroes = flags & codec::FLAG_NO_ZEROES != 0;
        let client_flags =
            codec::CLIENT_FIXED_NEWSTYLE | if no_zeroes { codec::CLIENT_NO_ZEROES } else { 0 };
        self.out.extend_from_slice(&client_flags.to_be_bytes());
        let mut data = Vec::new();
        codec::encode_info_request(
            &mut data,
            &InfoRequest { name: export.into(), requests: vec![codec::INFO_BLOCK_SIZE] },
        );
        codec::encode_option(&mut self.out, codec::OPT_GO, &data);
        self.flush()?;
        let mut export_info = None;
        for replies in 1.. {
            if replies > OPTION_REPLIES_MAX {
                return Err(Self::protocol(format!(
                    "more than {OPTION_REPLIES_MAX} replies to NBD_OPT_GO"
                )));
            }
            let h =
                codec::decode_option_reply_header(self.read_exact(codec::OPTION_REPLY_HEADER_LEN)?)
                    .map_err(|e| Self::protocol(format!("option reply: {e}")))?;
            if h.option != codec::OPT_GO {
                return Err(Self::protocol(format!(
                    "reply to option {} after NBD_OPT_GO",
                    h.option
                )));
            }
            if h.length > OPTION_REPLY_MAX {
                return Err(Self::protocol(format!("option reply of {} bytes", h.length)));
            }
            let body = self.read_exact(h.length as usize)?.to_vec();
            match h.reply {
                codec::REP_ACK => break,
                codec::REP_INFO => match codec::decode_info(&body) {
                    Ok(Info::Export { size, flags }) => export_info = Some((size, flags)),
                    Ok(Info::BlockSize { min, preferred, max }) => {
                        self.info.min_block = min;
                        self.info.preferred_block = preferred;
                        self.info.max_block = max;
                    }
                    Ok(Info::Other(_)) => {}
                    Err(e) => return Err(Self::protocol(format!("NBD_REP_INFO: {e}"))),
                },
                codec::REP_ERR_UNSUP => {
                    // A server without NBD_OPT_GO: the old way, which ends the haggling.
                    codec::encode_option(&mut self.out, codec::OPT_EXPORT_NAME, export.as_bytes());
                    self.flush()?;
                    let reply = self.read_exact(10)?;
                    let (size, flags) = codec::decode_export_name_reply(reply)
                        .map_err(|e| Self::protocol(format!("NBD_OPT_EXPORT_NAME reply: {e}")))?;
                    if !no_zeroes {
                        self.read_exact(124)?;
                    }
                    export_info = Some((size, flags));
                    break;
                }
                error if error & (1 << 31) != 0 => {
                    let msg = String::from_utf8_lossy(&body).into_owned();
                    return Err(Error::Invalid(format!(
                        "the server refused export {export:?} (reply {error:#x}): {msg}"
                    )));
                }
                other => return Err(Self::protocol(format!("option reply type {other}"))),
            }
        }
        let (size, flags) = export_info
            .ok_or_else(|| Self::protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"))?;
        self.info.size = size;
        self.info.flags = flags;
        Ok(())
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn submit(&mut self, kind: u16, offset: u64, len: u32, data: &[u8]) -> Result<u16> {
        if self.broken {
            return Err(Error::Broken);
        }
        let Some(handle) = self.free.pop() else {
            return Err(Error::QueueFull(self.slots.len()));
        };
        self.slots[usize::from(handle)] = Some(Slot { read: kind == codec::CMD_READ, len });
        let length = u64::from(len);
        let req = Request { flags: 0, kind, handle: u64::from(handle), offset, length };
        codec::encode_request(&mut self.out, &req, codec::Framing::Simple);
        self.out.extend_from_slice(data);
        Ok(handle)
    }

    /// Queues a read of `len` bytes at `offset` (sent with the next socket read).
    pub fn submit_read(&mut self, offset: u64, len: u32) -> Result<u16> {
        self.submit(codec::CMD_READ, offset, len, &[])
    }

    /// Queues a write of `data` at `offset`.
    pub fn submit_write(&mut self, offset: u64, data: &[u8]) -> Result<u16> {
        let len =
            u32::try_from(data.len()).map_err(|_| Error::Invalid("write too large".into()))?;
        self.submit(codec::CMD_WRITE, offset, len, data)
    }

    /// Whether the next reply is wholly read in (header and, for a read, its data): taking it
    /// needs no system call, so requests queued meanwhile may wait for the next read.
    fn next_reply_buffered(&self) -> bool {
        let b = self.rx.buffer();
        let Ok((error, handle)) = codec::decode_simple_reply(b) else { return false };
        let data = match self.slots.get(handle as usize).copied().flatten() {
            Some(Slot { read: true, len }) if error == 0 => len as usize,
            _ => 0,
        };
        b.len() >= codec::SIMPLE_REPLY_LEN + data
    }

    /// Sends what is queued (unless the next reply is already read in) and takes one reply;
    /// a read's data is read and dropped.
    pub fn poll(&mut self) -> Result<Reply> {
        if self.broken {
            return Err(Error::Broken);
        }
        if self.in_flight() == 0 {
            return Err(Error::Invalid("poll with no request in flight".into()));
        }
        let r = self.take_reply();
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    fn take_reply(&mut self) -> Result<Reply> {
        if !self.next_reply_buffered() {
            self.flush()?;
        }
        let header = self.read_exact(codec::SIMPLE_REPLY_LEN)?;
        let (error, handle) = codec::decode_simple_reply(header)
            .map_err(|e| Self::protocol(format!("reply header: {e}")))?;
        let slot = usize::try_from(handle)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
            .and_then(Option::take)
            .ok_or_else(|| Self::protocol(format!("reply for handle {handle}, not in flight")))?;
        let handle = handle as u16;
        self.free.push(handle);
        if slot.read && error == 0 {
            let mut left = slot.len as usize;
            while left > 0 {
                let n = left.min(READ_BUF_BYTES);
                self.read_exact(n)?;
                left -= n;
            }
        }
        Ok(Reply { handle, error, read: slot.read })
    }

    /// Sends NBD_CMD_DISC (after what is queued) and waits briefly for the server's close.
    pub fn disconnect(mut self) -> Result<()> {
        let req = Request { flags: 0, kind: codec::CMD_DISC, handle: 0, offset: 0, length: 0 };
        codec::encode_request(&mut self.out, &req, codec::Framing::Simple);
        self.flush()?;
        let _ = self.rx.get_ref().tcp().shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 4096];
        for _ in 0..64 {
            match self.rx.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        Ok(())
    }
}
