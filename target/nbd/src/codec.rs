//! NBD wire codec: bytes ⇄ typed values, per the NBD protocol (doc/proto.md of
//! NetworkBlockDevice/nbd). Pure: no I/O, no clock, no `unsafe`; every decoder checks lengths
//! before reading, so nothing a peer sends can panic it.

// ---- magics (proto.md "Handshake", "Transmission") ----
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// proto.md "Extended headers": the 32-byte request and reply headers with 64-bit lengths.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---- handshake flags ----
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;
pub const CLIENT_FLAGS_KNOWN: u32 = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;

// ---- transmission flags ----
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- options ----
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---- option reply types ----
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;

// ---- NBD_OPT_INFO / GO information types ----
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- commands and command flags ----
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers only: the header's length is the payload's, not the effect's.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---- structured reply chunk types and flags ----
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Block status with 64-bit extent lengths and flags: the only kind under extended headers.
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// ---- base:allocation flags ----
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:*`: the extent changed (qemu's NBD_STATE_DIRTY).
pub const STATE_DIRTY: u32 = 1 << 0;

// ---- errors (proto.md "Error values") ----
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Maps a Linux errno from a backend to the closest NBD error value.
pub fn nbd_error_from_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::EOPNOTSUPP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

pub const REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Length of an extended reply's header (payload follows).
pub const EXTENDED_REPLY_LEN: usize = 32;
/// Length of a structured reply chunk's header (payload follows).
pub const STRUCTURED_REPLY_LEN: usize = 20;

/// How transmission messages are framed on one connection, as the handshake settled it.
/// Ordered: each style offers what the one before it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Framing {
    /// 28-byte requests, 16-byte simple replies only.
    #[default]
    Simple,
    /// NBD_OPT_STRUCTURED_REPLY: 28-byte requests; reads (and block status) answered in
    /// 20-byte-header chunks, other commands with simple replies.
    Structured,
    /// NBD_OPT_EXTENDED_HEADERS: 32-byte requests with 64-bit lengths; every reply is a
    /// chunk with a 32-byte header (no simple replies), block status with 64-bit extents.
    Extended,
}

impl Framing {
    /// Whether replies may be chunks (structured replies or extended headers).
    pub fn structured(self) -> bool {
        self >= Framing::Structured
    }

    /// Length of a request's header.
    pub fn request_len(self) -> usize {
        if self == Framing::Extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        }
    }
}

/// The request a reply answers, as its header names it: the framing, the client's cookie
/// ("handle") and, under extended headers, the request's offset (echoed in every chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    pub framing: Framing,
    pub handle: u64,
    pub offset: u64,
}
pub const OPTION_HEADER_LEN: usize = 16;
/// NBD strings "MUST be no longer than 4096 bytes".
pub const STRING_MAX: usize = 4096;
pub const META_BASE_ALLOCATION: &str = "base:allocation";

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The server's first message (proto.md "Newstyle negotiation").
pub fn encode_greeting(out: &mut Vec<u8>) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
}

/// Header of a client option: `IHAVEOPT`, option, length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("truncated")]
    Truncated,
    #[error("string too long or not UTF-8")]
    BadString,
    #[error("trailing bytes in option data")]
    Trailing,
}

/// Decodes an option header from exactly 16 bytes (or reports truncation).
pub fn decode_option_header(b: &[u8]) -> Result<OptionHeader, DecodeError> {
    let magic = be64(b, 0).ok_or(DecodeError::Truncated)?;
    if magic != IHAVEOPT {
        return Err(DecodeError::BadMagic(magic));
    }
    let option = be32(b, 8).ok_or(DecodeError::Truncated)?;
    let length = be32(b, 12).ok_or(DecodeError::Truncated)?;
    Ok(OptionHeader { option, length })
}

/// A cursor over option data that fails instead of panicking.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let v = be16(self.b, self.at).ok_or(DecodeError::Truncated)?;
        self.at += 2;
        Ok(v)
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let v = be32(self.b, self.at).ok_or(DecodeError::Truncated)?;
        self.at += 4;
        Ok(v)
    }
    fn string(&mut self, len: usize) -> Result<String, DecodeError> {
        if len > STRING_MAX {
            return Err(DecodeError::BadString);
        }
        let end = self.at.checked_add(len).ok_or(DecodeError::Truncated)?;
        let bytes = self.b.get(self.at..end).ok_or(DecodeError::Truncated)?;
        self.at = end;
        let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::BadString)?;
        if s.contains('\0') {
            return Err(DecodeError::BadString);
        }
        Ok(s.to_string())
    }
    fn done(&self) -> Result<(), DecodeError> {
        if self.at == self.b.len() {
            Ok(())
        } else {
            Err(DecodeError::Trailing)
        }
    }
}

/// Data of NBD_OPT_INFO / NBD_OPT_GO: export name and requested information types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

pub fn decode_info_request(b: &[u8]) -> Result<InfoRequest, DecodeError> {
    let mut r = Reader { b, at: 0 };
    let name_len = r.u32()? as usize;
    let name = r.string(name_len)?;
    let count = r.u16()?;
    let mut requests = Vec::with_capacity(usize::from(count).min(16));
    for _ in 0..count {
        requests.push(r.u16()?);
    }
    r.done()?;
    Ok(InfoRequest { name, requests })
}

/// Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: String,
    pub queries: Vec<String>,
}

pub fn decode_meta_request(b: &[u8]) -> Result<MetaRequest, DecodeError> {
    let mut r = Reader { b, at: 0 };
    let name_len = r.u32()? as usize;
    let name = r.string(name_len)?;
    let count = r.u32()?;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = r.u32()? as usize;
        queries.push(r.string(len)?);
    }
    r.done()?;
    Ok(MetaRequest { name, queries })
}

/// Data of NBD_OPT_EXPORT_NAME: the whole payload is the name.
pub fn decode_export_name(b: &[u8]) -> Result<String, DecodeError> {
    Reader { b, at: 0 }.string(b.len())
}

/// An option reply header plus `data`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// NBD_REP_INFO NBD_INFO_EXPORT: size and transmission flags.
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut data = Vec::with_capacity(12);
    data.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    data.extend_from_slice(&size.to_be_bytes());
    data.extend_from_slice(&flags.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &data);
}

/// NBD_REP_INFO with a string payload (NBD_INFO_NAME, NBD_INFO_DESCRIPTION).
pub fn encode_info_text(out: &mut Vec<u8>, option: u32, info: u16, text: &str) {
    let mut data = Vec::with_capacity(2 + text.len());
    data.extend_from_slice(&info.to_be_bytes());
    data.extend_from_slice(text.as_bytes());
    encode_option_reply(out, option, REP_INFO, &data);
}

/// NBD_REP_INFO NBD_INFO_BLOCK_SIZE.
pub fn encode_info_block_size(out: &mut Vec<u8>, option: u32, min: u32, preferred: u32, max: u32) {
    let mut data = Vec::with_capacity(14);
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    for v in [min, preferred, max] {
        data.extend_from_slice(&v.to_be_bytes());
    }
    encode_option_reply(out, option, REP_INFO, &data);
}

/// NBD_REP_SERVER for NBD_OPT_LIST: name length, name, description.
pub fn encode_rep_server(out: &mut Vec<u8>, name: &str, description: &str) {
    let mut data = Vec::with_capacity(4 + name.len() + description.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(description.as_bytes());
    encode_option_reply(out, OPT_LIST, REP_SERVER, &data);
}

/// NBD_REP_META_CONTEXT: context id and name.
pub fn encode_rep_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&id.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(out, option, REP_META_CONTEXT, &data);
}

/// Reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless NO_ZEROES.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// A transmission request (proto.md "Request message"). `length` is 32 bits on the wire
/// unless extended headers were negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u64,
}

/// Decodes a request header: 28 bytes (`NBD_REQUEST_MAGIC`, 32-bit length) or, under
/// extended headers, 32 (`NBD_EXTENDED_REQUEST_MAGIC`, 64-bit length). The other style's
/// magic is a bad magic: a client that sends it has lost the framing.
pub fn decode_request(b: &[u8], framing: Framing) -> Result<Request, DecodeError> {
    let magic = be32(b, 0).ok_or(DecodeError::Truncated)?;
    let extended = framing == Framing::Extended;
    let want = if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
    if magic != want {
        return Err(DecodeError::BadMagic(u64::from(magic)));
    }
    let length = if extended {
        be64(b, 24).ok_or(DecodeError::Truncated)?
    } else {
        u64::from(be32(b, 24).ok_or(DecodeError::Truncated)?)
    };
    Ok(Request {
        flags: be16(b, 4).ok_or(DecodeError::Truncated)?,
        kind: be16(b, 6).ok_or(DecodeError::Truncated)?,
        handle: be64(b, 8).ok_or(DecodeError::Truncated)?,
        offset: be64(b, 16).ok_or(DecodeError::Truncated)?,
        length,
    })
}

/// Encodes a request (used by tests and our own clients). A compact header carries 32 bits
/// of length: a longer one is the caller's bug.
pub fn encode_request(out: &mut Vec<u8>, r: &Request, framing: Framing) {
    let extended = framing == Framing::Extended;
    let magic = if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&r.flags.to_be_bytes());
    out.extend_from_slice(&r.kind.to_be_bytes());
    out.extend_from_slice(&r.handle.to_be_bytes());
    out.extend_from_slice(&r.offset.to_be_bytes());
    if extended {
        out.extend_from_slice(&r.length.to_be_bytes());
    } else {
        let length = u32::try_from(r.length).expect("a compact request's length fits 32 bits");
        out.extend_from_slice(&length.to_be_bytes());
    }
}

/// A 16-byte simple reply header; read data, if any, follows.
pub fn encode_simple_reply(out: &mut Vec<u8>, error: u32, handle: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
}

// ---- The client's side (our load generator, tests): the inverses of the server's messages.

/// Length of the server's greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of an option reply's header: magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of a simple reply's header (read data follows a successful read's).
pub const SIMPLE_REPLY_LEN: usize = 16;

/// The handshake flags of a newstyle server's greeting (`GREETING_LEN` bytes).
pub fn decode_greeting(b: &[u8]) -> Result<u16, DecodeError> {
    let magic = be64(b, 0).ok_or(DecodeError::Truncated)?;
    if magic != NBDMAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    let opt = be64(b, 8).ok_or(DecodeError::Truncated)?;
    if opt != IHAVEOPT {
        return Err(DecodeError::BadMagic(opt));
    }
    be16(b, 16).ok_or(DecodeError::Truncated)
}

/// A client option: `IHAVEOPT`, option, length, `data`.
pub fn encode_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Data of NBD_OPT_INFO / NBD_OPT_GO (what [`decode_info_request`] reads).
pub fn encode_info_request(out: &mut Vec<u8>, r: &InfoRequest) {
    out.extend_from_slice(&(r.name.len() as u32).to_be_bytes());
    out.extend_from_slice(r.name.as_bytes());
    out.extend_from_slice(&(r.requests.len() as u16).to_be_bytes());
    for info in &r.requests {
        out.extend_from_slice(&info.to_be_bytes());
    }
}

/// The header of an option reply, as a client reads it; `length` bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub length: u32,
}

pub fn decode_option_reply_header(b: &[u8]) -> Result<OptionReplyHeader, DecodeError> {
    let magic = be64(b, 0).ok_or(DecodeError::Truncated)?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    Ok(OptionReplyHeader {
        option: be32(b, 8).ok_or(DecodeError::Truncated)?,
        reply: be32(b, 12).ok_or(DecodeError::Truncated)?,
        length: be32(b, 16).ok_or(DecodeError::Truncated)?,
    })
}

/// What an NBD_REP_INFO carries that a client uses; other information types are `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    BlockSize { min: u32, preferred: u32, max: u32 },
    Other(u16),
}

/// Decodes an NBD_REP_INFO's data.
pub fn decode_info(b: &[u8]) -> Result<Info, DecodeError> {
    let mut r = Reader { b, at: 0 };
    match r.u16()? {
        INFO_EXPORT => {
            let size = be64(b, 2).ok_or(DecodeError::Truncated)?;
            let flags = be16(b, 10).ok_or(DecodeError::Truncated)?;
            if b.len() != 12 {
                return Err(DecodeError::Trailing);
            }
            Ok(Info::Export { size, flags })
        }
        INFO_BLOCK_SIZE => {
            let (min, preferred, max) = (r.u32()?, r.u32()?, r.u32()?);
            r.done()?;
            Ok(Info::BlockSize { min, preferred, max })
        }
        other => Ok(Info::Other(other)),
    }
}

/// The export size and transmission flags ending NBD_OPT_EXPORT_NAME (the 124 zeros that may
/// follow are the caller's to skip).
pub fn decode_export_name_reply(b: &[u8]) -> Result<(u64, u16), DecodeError> {
    Ok((be64(b, 0).ok_or(DecodeError::Truncated)?, be16(b, 8).ok_or(DecodeError::Truncated)?))
}

/// A simple reply's header: `(error, handle)`.
pub fn decode_simple_reply(b: &[u8]) -> Result<(u32, u64), DecodeError> {
    let magic = be32(b, 0).ok_or(DecodeError::Truncated)?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(DecodeError::BadMagic(u64::from(magic)));
    }
    Ok((be32(b, 4).ok_or(DecodeError::Truncated)?, be64(b, 8).ok_or(DecodeError::Truncated)?))
}

/// A chunk's header; `length` bytes of payload follow: 20 bytes (structured replies) or,
/// under extended headers, 32 with the request's offset and a 64-bit length.
pub fn encode_chunk_header(out: &mut Vec<u8>, to: ReplyTo, flags: u16, kind: u16, length: u64) {
    assert!(to.framing.structured(), "a chunk on a connection without structured replies");
    let extended = to.framing == Framing::Extended;
    let magic = if extended { EXTENDED_REPLY_MAGIC } else { STRUCTURED_REPLY_MAGIC };
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&to.handle.to_be_bytes());
    if extended {
        out.extend_from_slice(&to.offset.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
    } else {
        let length = u32::try_from(length).expect("a structured chunk's payload fits 32 bits");
        out.extend_from_slice(&length.to_be_bytes());
    }
}

/// NBD_REPLY_TYPE_OFFSET_DATA header and offset; `data_len` bytes of data follow.
pub fn encode_offset_data_header(
    out: &mut Vec<u8>,
    to: ReplyTo,
    done: bool,
    offset: u64,
    data_len: u32,
) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    encode_chunk_header(out, to, flags, REPLY_TYPE_OFFSET_DATA, 8 + u64::from(data_len));
    out.extend_from_slice(&offset.to_be_bytes());
}

/// NBD_REPLY_TYPE_OFFSET_HOLE (a read's hole is at most a payload: 32 bits in every framing).
pub fn encode_offset_hole(out: &mut Vec<u8>, to: ReplyTo, done: bool, offset: u64, hole_len: u32) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    encode_chunk_header(out, to, flags, REPLY_TYPE_OFFSET_HOLE, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&hole_len.to_be_bytes());
}

/// NBD_REPLY_TYPE_NONE with DONE (ends a structured reply without payload).
pub fn encode_done(out: &mut Vec<u8>, to: ReplyTo) {
    encode_chunk_header(out, to, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
}

/// NBD_REPLY_TYPE_ERROR with DONE and a human-readable message.
pub fn encode_error_chunk(out: &mut Vec<u8>, to: ReplyTo, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(STRING_MAX)];
    encode_chunk_header(out, to, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + msg.len() as u64);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// The whole reply to a request that carries no data back (or a refusal of one that would):
/// a simple reply, or under extended headers (where there are none) NBD_REPLY_TYPE_NONE, or
/// an error chunk with `why` for a human.
pub fn encode_status_reply(out: &mut Vec<u8>, to: ReplyTo, error: u32, why: &str) {
    match (to.framing, error) {
        (Framing::Extended, 0) => encode_done(out, to),
        (Framing::Extended, _) => encode_error_chunk(out, to, error, why),
        _ => encode_simple_reply(out, error, to.handle),
    }
}

/// Block status for one context: its id and (length, flags) descriptors; DONE only on the
/// reply's last chunk (a reply holds one per selected context). NBD_REPLY_TYPE_BLOCK_STATUS
/// (32-bit lengths) or, under extended headers, NBD_REPLY_TYPE_BLOCK_STATUS_EXT (a count, then
/// 64-bit lengths and flags): the spec has an extended connection get only the latter.
pub fn encode_block_status_chunk(
    out: &mut Vec<u8>,
    to: ReplyTo,
    context: u32,
    extents: &[(u64, u32)],
    done: bool,
) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let n = extents.len() as u64;
    if to.framing == Framing::Extended {
        encode_chunk_header(out, to, flags, REPLY_TYPE_BLOCK_STATUS_EXT, 8 + 16 * n);
        out.extend_from_slice(&context.to_be_bytes());
        out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        for &(length, flags) in extents {
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(&u64::from(flags).to_be_bytes());
        }
    } else {
        encode_chunk_header(out, to, flags, REPLY_TYPE_BLOCK_STATUS, 4 + 8 * n);
        out.extend_from_slice(&context.to_be_bytes());
        for &(length, flags) in extents {
            let length = u32::try_from(length).expect("a compact request's extent fits 32 bits");
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
    }
}

/// A reply chunk's header as a client reads it (structured or extended; the magic says
/// which). `offset` is 0 in a structured chunk, which has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub extended: bool,
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u64,
}

/// Decodes a structured (20-byte) or extended (32-byte) reply chunk header.
pub fn decode_chunk_header(b: &[u8]) -> Result<ChunkHeader, DecodeError> {
    let magic = be32(b, 0).ok_or(DecodeError::Truncated)?;
    let extended = match magic {
        STRUCTURED_REPLY_MAGIC => false,
        EXTENDED_REPLY_MAGIC => true,
        _ => return Err(DecodeError::BadMagic(u64::from(magic))),
    };
    let flags = be16(b, 4).ok_or(DecodeError::Truncated)?;
    let kind = be16(b, 6).ok_or(DecodeError::Truncated)?;
    let handle = be64(b, 8).ok_or(DecodeError::Truncated)?;
    let (offset, length) = if extended {
        (be64(b, 16).ok_or(DecodeError::Truncated)?, be64(b, 24).ok_or(DecodeError::Truncated)?)
    } else {
        (0, u64::from(be32(b, 16).ok_or(DecodeError::Truncated)?))
    };
    Ok(ChunkHeader { extended, flags, kind, handle, offset, length })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn greeting_is_byte_exact() {
        let mut out = Vec::new();
        encode_greeting(&mut out);
        assert_eq!(out, hex("4e42444d41474943 49484156454f5054 0003"));
        assert_eq!(&out[..16], b"NBDMAGICIHAVEOPT");
    }

    #[test]
    fn option_header_and_go() {
        let bytes = hex("49484156454f5054 00000007 0000000c");
        let h = decode_option_header(&bytes).unwrap();
        assert_eq!(h, OptionHeader { option: OPT_GO, length: 12 });
        // name "vol0", two info requests: NAME, BLOCK_SIZE
        let data = hex("00000004 766f6c30 0002 0001 0003");
        let req = decode_info_request(&data).unwrap();
        assert_eq!(req, InfoRequest { name: "vol0".into(), requests: vec![1, 3] });
        assert_eq!(decode_info_request(&data[..9]), Err(DecodeError::Truncated));
        let mut long = data.clone();
        long.push(0);
        assert_eq!(decode_info_request(&long), Err(DecodeError::Trailing));
        assert!(decode_option_header(&hex("0000000000000000 00000001 00000000")).is_err());
    }

    #[test]
    fn option_replies_are_byte_exact() {
        let mut out = Vec::new();
        encode_option_reply(&mut out, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        assert_eq!(out, hex("0003e889045565a9 00000008 00000001 00000000"));
        out.clear();
        encode_info_export(&mut out, OPT_GO, 1 << 30, TF_HAS_FLAGS | TF_SEND_FLUSH);
        assert_eq!(
            out,
            hex("0003e889045565a9 00000007 00000003 0000000c 0000 0000000040000000 0005")
        );
        out.clear();
        encode_info_block_size(&mut out, OPT_INFO, 1, 4096, 32 << 20);
        assert_eq!(
            out,
            hex("0003e889045565a9 00000006 00000003 0000000e 0003 00000001 00001000 02000000")
        );
        out.clear();
        encode_rep_server(&mut out, "a", "d");
        assert_eq!(out, hex("0003e889045565a9 00000003 00000002 00000006 00000001 61 64"));
        out.clear();
        encode_rep_meta_context(&mut out, OPT_SET_META_CONTEXT, 1, "base:allocation");
        assert_eq!(
            out,
            hex("0003e889045565a9 0000000a 00000004 00000013 00000001 626173653a616c6c6f636174696f6e")
        );
        out.clear();
        encode_option_reply(&mut out, OPT_GO, REP_ERR_UNKNOWN, b"");
        assert_eq!(out, hex("0003e889045565a9 00000007 80000006 00000000"));
    }

    #[test]
    fn export_name_reply() {
        let mut out = Vec::new();
        encode_export_name_reply(&mut out, 4096, 0x0101, true);
        assert_eq!(out, hex("0000000000001000 0101"));
        out.clear();
        encode_export_name_reply(&mut out, 4096, 0x0101, false);
        assert_eq!(out.len(), 134);
    }

    #[test]
    fn request_round_trip_and_golden() {
        let bytes = hex("25609513 0001 0001 0102030405060708 0000000000001000 00000200");
        let r = decode_request(&bytes, Framing::Simple).unwrap();
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                handle: 0x0102030405060708,
                offset: 4096,
                length: 512
            }
        );
        let mut out = Vec::new();
        encode_request(&mut out, &r, Framing::Structured);
        assert_eq!(out, bytes);
        assert_eq!(decode_request(&bytes[..27], Framing::Simple), Err(DecodeError::Truncated));
        assert!(matches!(
            decode_request(
                &hex("25609514 0000 0000 0000000000000000 0000000000000000 00000000"),
                Framing::Simple
            ),
            Err(DecodeError::BadMagic(_))
        ));
        // Each framing takes its own magic only.
        assert!(matches!(decode_request(&bytes, Framing::Extended), Err(DecodeError::BadMagic(_))));

        // Extended: 32 bytes, a 64-bit length (a 5 GiB trim).
        let ext = hex("21e41c71 0000 0004 0102030405060708 0000000000001000 0000000140000000");
        let r = decode_request(&ext, Framing::Extended).unwrap();
        assert_eq!(
            r,
            Request {
                flags: 0,
                kind: CMD_TRIM,
                handle: 0x0102030405060708,
                offset: 4096,
                length: 5 << 30
            }
        );
        out.clear();
        encode_request(&mut out, &r, Framing::Extended);
        assert_eq!(out, ext);
        assert_eq!(out.len(), Framing::Extended.request_len());
        assert_eq!(decode_request(&ext[..31], Framing::Extended), Err(DecodeError::Truncated));
        assert!(matches!(decode_request(&ext, Framing::Structured), Err(DecodeError::BadMagic(_))));
    }

    #[test]
    fn client_side_is_the_inverse_of_the_server_side() {
        let mut out = Vec::new();
        encode_greeting(&mut out);
        assert_eq!(out.len(), GREETING_LEN);
        assert_eq!(decode_greeting(&out), Ok(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        assert_eq!(decode_greeting(&out[..17]), Err(DecodeError::Truncated));
        out[8] ^= 1;
        assert!(matches!(decode_greeting(&out), Err(DecodeError::BadMagic(_))));

        let req = InfoRequest { name: "vol0".into(), requests: vec![INFO_BLOCK_SIZE] };
        out.clear();
        encode_option(&mut out, OPT_GO, &[]);
        assert_eq!(out, hex("49484156454f5054 00000007 00000000"));
        let mut data = Vec::new();
        encode_info_request(&mut data, &req);
        assert_eq!(data, hex("00000004 766f6c30 0001 0003"));
        assert_eq!(decode_info_request(&data), Ok(req));

        out.clear();
        encode_info_export(&mut out, OPT_GO, 1 << 30, TF_HAS_FLAGS | TF_SEND_FLUSH);
        let h = decode_option_reply_header(&out).unwrap();
        assert_eq!(h, OptionReplyHeader { option: OPT_GO, reply: REP_INFO, length: 12 });
        let body = &out[OPTION_REPLY_HEADER_LEN..];
        assert_eq!(decode_info(body), Ok(Info::Export { size: 1 << 30, flags: 0x5 }));
        assert_eq!(decode_info(&body[..11]), Err(DecodeError::Truncated));
        out.clear();
        encode_info_block_size(&mut out, OPT_GO, 512, 4096, 32 << 20);
        assert_eq!(
            decode_info(&out[OPTION_REPLY_HEADER_LEN..]),
            Ok(Info::BlockSize { min: 512, preferred: 4096, max: 32 << 20 })
        );
        out.clear();
        encode_info_text(&mut out, OPT_GO, INFO_NAME, "n");
        assert_eq!(decode_info(&out[OPTION_REPLY_HEADER_LEN..]), Ok(Info::Other(INFO_NAME)));
        assert!(decode_option_reply_header(&out[1..]).is_err());

        out.clear();
        encode_export_name_reply(&mut out, 4096, 0x0101, false);
        assert_eq!(decode_export_name_reply(&out), Ok((4096, 0x0101)));

        out.clear();
        encode_simple_reply(&mut out, EINVAL, 7);
        assert_eq!(out.len(), SIMPLE_REPLY_LEN);
        assert_eq!(decode_simple_reply(&out), Ok((EINVAL, 7)));
        out.clear();
        let to = ReplyTo { framing: Framing::Structured, handle: 7, offset: 9 };
        encode_chunk_header(&mut out, to, 0, REPLY_TYPE_NONE, 0);
        assert!(matches!(decode_simple_reply(&out), Err(DecodeError::BadMagic(_))));
        let h = decode_chunk_header(&out).unwrap();
        assert_eq!(
            h,
            ChunkHeader { extended: false, flags: 0, kind: 0, handle: 7, offset: 0, length: 0 }
        );
        assert_eq!(out.len(), STRUCTURED_REPLY_LEN);
        out.clear();
        let to = ReplyTo { framing: Framing::Extended, ..to };
        encode_error_chunk(&mut out, to, EIO, "no");
        let h = decode_chunk_header(&out).unwrap();
        assert_eq!(
            h,
            ChunkHeader {
                extended: true,
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_ERROR,
                handle: 7,
                offset: 9,
                length: 8
            }
        );
        assert_eq!(out.len(), EXTENDED_REPLY_LEN + 8);
        assert_eq!(decode_chunk_header(&out[..31]), Err(DecodeError::Truncated));
    }

    #[test]
    fn replies_are_byte_exact() {
        let mut out = Vec::new();
        encode_simple_reply(&mut out, EINVAL, 7);
        assert_eq!(out, hex("67446698 00000016 0000000000000007"));
        out.clear();
        let to = ReplyTo { framing: Framing::Structured, handle: 7, offset: 512 };
        encode_offset_data_header(&mut out, to, true, 512, 4);
        assert_eq!(out, hex("668e33ef 0001 0001 0000000000000007 0000000c 0000000000000200"));
        out.clear();
        encode_offset_hole(&mut out, ReplyTo { offset: 0, ..to }, false, 0, 512);
        assert_eq!(
            out,
            hex("668e33ef 0000 0002 0000000000000007 0000000c 0000000000000000 00000200")
        );
        out.clear();
        encode_error_chunk(&mut out, to, ENOSPC, "x");
        assert_eq!(out, hex("668e33ef 0001 8001 0000000000000007 00000007 0000001c 0001 78"));
        out.clear();
        encode_block_status_chunk(
            &mut out,
            to,
            1,
            &[(4096, STATE_HOLE | STATE_ZERO), (512, 0)],
            true,
        );
        assert_eq!(
            out,
            hex("668e33ef 0001 0005 0000000000000007 00000014 00000001 00001000 00000003 00000200 00000000")
        );
        out.clear();
        encode_done(&mut out, to);
        assert_eq!(out, hex("668e33ef 0001 0000 0000000000000007 00000000"));
        // A status reply is a simple reply unless extended headers forbid those.
        out.clear();
        encode_status_reply(&mut out, to, EPERM, "read-only");
        assert_eq!(out, hex("67446698 00000001 0000000000000007"));
    }

    #[test]
    fn extended_replies_are_byte_exact() {
        let to = ReplyTo { framing: Framing::Extended, handle: 7, offset: 0x1000 };
        let mut out = Vec::new();
        encode_offset_data_header(&mut out, to, true, 0x1000, 4);
        assert_eq!(
            out,
            hex("6e8a278c 0001 0001 0000000000000007 0000000000001000 000000000000000c 0000000000001000")
        );
        out.clear();
        encode_status_reply(&mut out, to, 0, "unused");
        assert_eq!(
            out,
            hex("6e8a278c 0001 0000 0000000000000007 0000000000001000 0000000000000000")
        );
        out.clear();
        encode_status_reply(&mut out, to, EPERM, "ro");
        assert_eq!(
            out,
            hex("6e8a278c 0001 8001 0000000000000007 0000000000001000 0000000000000008 00000001 0002 726f")
        );
        out.clear();
        // A 6 GiB extent: only the extended chunk can say it.
        encode_block_status_chunk(
            &mut out,
            to,
            1,
            &[(6 << 30, STATE_HOLE | STATE_ZERO), (512, 0)],
            false,
        );
        assert_eq!(
            out,
            hex("6e8a278c 0000 0006 0000000000000007 0000000000001000 0000000000000028
                 00000001 00000002 0000000180000000 0000000000000003 0000000000000200 0000000000000000")
        );
    }

    #[test]
    fn meta_request() {
        let data = hex("00000004 766f6c30 00000001 0000000f 626173653a616c6c6f636174696f6e");
        let m = decode_meta_request(&data).unwrap();
        assert_eq!(m.name, "vol0");
        assert_eq!(m.queries, vec!["base:allocation".to_string()]);
        // a query count far beyond the data must fail cleanly, not allocate or panic
        let bogus = hex("00000000 ffffffff 00000001");
        assert_eq!(decode_meta_request(&bogus), Err(DecodeError::Truncated));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5000))]
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = decode_option_header(&bytes);
            let _ = decode_info_request(&bytes);
            let _ = decode_meta_request(&bytes);
            let _ = decode_export_name(&bytes);
            let _ = decode_request(&bytes, Framing::Simple);
            let _ = decode_request(&bytes, Framing::Extended);
            let _ = decode_chunk_header(&bytes);
        }

        #[test]
        fn request_round_trips(flags: u16, kind: u16, handle: u64, offset: u64, length: u32, wide: u64) {
            let r = Request { flags, kind, handle, offset, length: u64::from(length) };
            let mut out = Vec::new();
            encode_request(&mut out, &r, Framing::Simple);
            proptest::prop_assert_eq!(decode_request(&out, Framing::Simple).unwrap(), r);
            let r = Request { length: wide, ..r };
            out.clear();
            encode_request(&mut out, &r, Framing::Extended);
            proptest::prop_assert_eq!(decode_request(&out, Framing::Extended).unwrap(), r);
        }
    }
}
