//! NBD handshake state machine: fixed newstyle option haggling, from the client's flags to
//! the start of transmission. Bytes in, bytes out, no I/O (it asks the export table, and an
//! export's device which images it can compare with), so it is tested and fuzzed without
//! sockets.

use std::sync::Arc;

use ballast_engine::ChangeBase;

use crate::codec::{self, Framing, OptionHeader};
use crate::exports::{Access, Export, ExportTable};

/// Options carrying more data than this are skipped and answered with NBD_REP_ERR_TOO_BIG.
pub const OPTION_DATA_MAX: u32 = 64 * 1024;
/// Block size constraints advertised in NBD_INFO_BLOCK_SIZE.
pub const BLOCK_MIN: u32 = 1;
pub const BLOCK_PREFERRED: u32 = 4096;
pub const PAYLOAD_ADVERTISED_MAX: u32 = 32 << 20;
/// Context id we give `base:allocation`.
pub const META_ALLOCATION_ID: u32 = 1;
/// Context id we give the `qemu:dirty-bitmap:NAME` a client selected (one at a time).
pub const META_BITMAP_ID: u32 = 2;
/// The prefix of the contexts that report a volume's changes against one of its kin.
pub const META_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// NBD_OPT_LIST_META_CONTEXT names at most this many dirty-bitmap contexts (a family's
/// volumes beyond are not listed, only reachable by name), bounding one option's replies.
pub const META_LIST_MAX: usize = 128;
/// One [`Handshake::on_input`] call stops taking options once its replies reach this many
/// bytes (plus the last option's, itself bounded): the caller sends them before it asks for
/// more, so a client that asks and never reads is paced by its own socket.
pub const REPLIES_PER_INPUT_MAX: usize = 64 * 1024;

/// How the server offers TLS (the NBD protocol's "TLS support" modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// NOTLS: NBD_OPT_STARTTLS is refused (NBD_REP_ERR_POLICY).
    #[default]
    Off,
    /// SELECTIVETLS: the client may upgrade; exports with an allow-list are TLS-only.
    On,
    /// FORCEDTLS: every option but NBD_OPT_STARTTLS and NBD_OPT_ABORT gets
    /// NBD_REP_ERR_TLS_REQD until TLS is up.
    Require,
}

/// Where the handshake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the client's 32-bit flags.
    ClientFlags,
    /// Waiting for a 16-byte option header.
    OptionHeader,
    /// Waiting for the data of an option we will handle.
    OptionData(OptionHeader),
    /// Discarding the data of an oversized option, then replying NBD_REP_ERR_TOO_BIG.
    Skip { option: u32, remaining: u32 },
    /// Finished (transmission started or connection closing).
    Done,
}

/// What the negotiation settled.
pub struct Negotiated {
    pub export: Arc<Export>,
    /// Simple replies, structured replies, or extended headers.
    pub framing: Framing,
    /// `base:allocation` was selected for this export.
    pub meta_allocation: bool,
    /// `qemu:dirty-bitmap:NAME` was selected for this export: the image block status reports
    /// its changes against (`BlockDev::changes`, by its id: chosen once, here).
    pub meta_bitmap: Option<ChangeBase>,
    pub flags: u16,
}

/// The metadata contexts NBD_OPT_SET_META_CONTEXT selected, for one export.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MetaSelection {
    /// Canonical, non-empty export name.
    export: String,
    allocation: bool,
    bitmap: Option<ChangeBase>,
}

/// The result of feeding input.
pub enum Step {
    /// Send what was written to `out`, then read more.
    NeedMore,
    /// Send `out`, then start transmission.
    Enter(Negotiated),
    /// Send `out` (NBD_REP_ACK to NBD_OPT_STARTTLS) in plaintext, then run a TLS handshake;
    /// every byte after it is TLS. Call [`Handshake::on_tls_open`] once it succeeds.
    StartTls,
    /// Send `out` (if anything), then close the connection.
    Close(&'static str),
    /// NBD_OPT_ABORT: send `out` (its acknowledgement), then end the connection gracefully.
    Abort,
}

pub struct Handshake {
    state: State,
    /// Largest payload advertised (NBD_INFO_BLOCK_SIZE maximum).
    max_payload: u32,
    no_zeroes: bool,
    /// What NBD_OPT_STRUCTURED_REPLY / NBD_OPT_EXTENDED_HEADERS settled so far.
    framing: Framing,
    /// The contexts selected, and for which export.
    meta: Option<MetaSelection>,
    tls_mode: TlsMode,
    /// TLS is up (NBD_OPT_STARTTLS acknowledged and the TLS handshake done).
    tls_active: bool,
    /// The TLS identity the client proved (PSK user name or certificate common name).
    identity: Option<String>,
}

impl Default for Handshake {
    fn default() -> Self {
        Handshake::new()
    }
}

impl Handshake {
    pub fn new() -> Handshake {
        Handshake::with_max_payload(PAYLOAD_ADVERTISED_MAX)
    }

    /// A handshake advertising `max_payload` as the largest request (at most 32 MiB).
    pub fn with_max_payload(max_payload: u32) -> Handshake {
        Handshake::with_tls(max_payload, TlsMode::Off)
    }

    /// A handshake advertising `max_payload`, offering TLS as `tls_mode` says.
    pub fn with_tls(max_payload: u32, tls_mode: TlsMode) -> Handshake {
        assert!(max_payload >= BLOCK_PREFERRED, "max payload below the preferred block size");
        Handshake {
            max_payload: max_payload.min(PAYLOAD_ADVERTISED_MAX),
            state: State::ClientFlags,
            no_zeroes: false,
            framing: Framing::Simple,
            meta: None,
            tls_mode,
            tls_active: false,
            identity: None,
        }
    }

    /// The TLS handshake that followed [`Step::StartTls`] succeeded; `identity` is what the
    /// client proved (none for an anonymous session).
    pub fn on_tls_open(&mut self, identity: Option<String>) {
        assert!(self.tls_mode != TlsMode::Off, "TLS opened while TLS is off");
        assert!(!self.tls_active, "TLS opened twice");
        self.tls_active = true;
        self.identity = identity;
    }

    fn access(&self, exports: &ExportTable, name: &str) -> Access {
        exports.access(name, self.tls_active, self.identity.as_deref())
    }

    /// The error reply for an export this session may not use. NBD_REP_ERR_TLS_REQD only
    /// answers NBD_OPT_INFO and NBD_OPT_GO (proto.md, SELECTIVETLS: "MUST NOT send
    /// NBD_REP_ERR_TLS_REQD in response to any option other than NBD_OPT_INFO, NBD_OPT_GO and
    /// NBD_OPT_EXPORT_NAME"); the metadata options get NBD_REP_ERR_POLICY.
    fn refuse(out: &mut Vec<u8>, option: u32, access: Access) -> Step {
        let info = matches!(option, codec::OPT_INFO | codec::OPT_GO);
        let (code, msg): (u32, &[u8]) = match access {
            Access::TlsRequired if info => (codec::REP_ERR_TLS_REQD, b"this export requires TLS"),
            Access::TlsRequired => (codec::REP_ERR_POLICY, b"this export requires TLS"),
            _ => (codec::REP_ERR_POLICY, b"this TLS identity may not use this export"),
        };
        codec::encode_option_reply(out, option, code, msg);
        Step::NeedMore
    }

    /// Bytes to send on connect.
    pub fn greeting(out: &mut Vec<u8>) {
        codec::encode_greeting(out);
    }

    /// Consumes a prefix of `input`, appending replies to `out`; returns bytes consumed.
    /// [`Step::NeedMore`] with input left over: the replies reached [`REPLIES_PER_INPUT_MAX`];
    /// send them, then call again with the rest.
    pub fn on_input(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        exports: &ExportTable,
    ) -> (usize, Step) {
        let mut used = 0;
        let start = out.len();
        loop {
            if out.len() - start >= REPLIES_PER_INPUT_MAX {
                return (used, Step::NeedMore);
            }
            let rest = &input[used..];
            match self.state {
                State::Done => return (used, Step::Close("handshake already finished")),
                State::ClientFlags => {
                    let Some(b) = rest.get(..4) else {
                        return (used, Step::NeedMore);
                    };
                    used += 4;
                    let flags = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                    if flags & !codec::CLIENT_FLAGS_KNOWN != 0 {
                        self.state = State::Done;
                        return (used, Step::Close("unknown client flags"));
                    }
                    self.no_zeroes = flags & codec::CLIENT_NO_ZEROES != 0;
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    let Some(b) = rest.get(..codec::OPTION_HEADER_LEN) else {
                        return (used, Step::NeedMore);
                    };
                    used += codec::OPTION_HEADER_LEN;
                    let Ok(header) = codec::decode_option_header(b) else {
                        self.state = State::Done;
                        return (used, Step::Close("bad option magic"));
                    };
                    self.state = if header.length > OPTION_DATA_MAX {
                        if header.option == codec::OPT_EXPORT_NAME {
                            self.state = State::Done;
                            return (used, Step::Close("export name too long"));
                        }
                        State::Skip { option: header.option, remaining: header.length }
                    } else {
                        State::OptionData(header)
                    };
                }
                State::Skip { option, remaining } => {
                    let take = (remaining as usize).min(rest.len());
                    used += take;
                    let remaining = remaining - take as u32;
                    if remaining > 0 {
                        self.state = State::Skip { option, remaining };
                        return (used, Step::NeedMore);
                    }
                    // Under FORCEDTLS every option before TLS, an oversized one too, gets
                    // NBD_REP_ERR_TLS_REQD.
                    let (code, msg): (u32, &[u8]) = if self.tls_required(option) {
                        (codec::REP_ERR_TLS_REQD, b"TLS is required: send NBD_OPT_STARTTLS first")
                    } else {
                        (codec::REP_ERR_TOO_BIG, b"option data too long")
                    };
                    codec::encode_option_reply(out, option, code, msg);
                    self.state = State::OptionHeader;
                }
                State::OptionData(header) => {
                    let Some(data) = rest.get(..header.length as usize) else {
                        return (used, Step::NeedMore);
                    };
                    used += data.len();
                    self.state = State::OptionHeader;
                    match self.on_option(header.option, data, out, exports) {
                        Step::NeedMore => {}
                        Step::StartTls => return (used, Step::StartTls),
                        done => {
                            self.state = State::Done;
                            return (used, done);
                        }
                    }
                }
            }
        }
    }

    /// FORCEDTLS before TLS is up: the option is refused for that (all but NBD_OPT_STARTTLS and
    /// NBD_OPT_ABORT).
    fn tls_required(&self, option: u32) -> bool {
        self.tls_mode == TlsMode::Require
            && !self.tls_active
            && !matches!(option, codec::OPT_STARTTLS | codec::OPT_ABORT)
    }

    fn on_option(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
        exports: &ExportTable,
    ) -> Step {
        let invalid = |out: &mut Vec<u8>, why: &str| {
            codec::encode_option_reply(out, option, codec::REP_ERR_INVALID, why.as_bytes());
            Step::NeedMore
        };
        if self.tls_required(option) {
            if option == codec::OPT_EXPORT_NAME {
                return Step::Close("NBD_OPT_EXPORT_NAME before TLS, which is required");
            }
            let msg = b"TLS is required: send NBD_OPT_STARTTLS first";
            codec::encode_option_reply(out, option, codec::REP_ERR_TLS_REQD, msg);
            return Step::NeedMore;
        }
        match option {
            codec::OPT_STARTTLS => {
                if !data.is_empty() {
                    return invalid(out, "NBD_OPT_STARTTLS takes no data");
                }
                if self.tls_active {
                    return invalid(out, "TLS is already active");
                }
                if self.tls_mode == TlsMode::Off {
                    let msg = b"TLS is not enabled on this server";
                    codec::encode_option_reply(out, option, codec::REP_ERR_POLICY, msg);
                    return Step::NeedMore;
                }
                codec::encode_option_reply(out, option, codec::REP_ACK, &[]);
                // Nothing negotiated in plaintext survives the upgrade.
                self.framing = Framing::Simple;
                self.meta = None;
                Step::StartTls
            }
            codec::OPT_EXPORT_NAME => {
                if self.framing == Framing::Extended {
                    // proto.md: a client that negotiated extended headers "MUST NOT" send it
                    // (it cannot be refused: the connection ends).
                    return Step::Close("NBD_OPT_EXPORT_NAME after extended headers");
                }
                let Ok(name) = codec::decode_export_name(data) else {
                    return Step::Close("bad export name");
                };
                let Some(export) = exports.get(&name) else {
                    return Step::Close("unknown export (NBD_OPT_EXPORT_NAME)");
                };
                if self.access(exports, &export.name) != Access::Granted {
                    return Step::Close(
                        "export not allowed for this session (NBD_OPT_EXPORT_NAME)",
                    );
                }
                let flags = export.transmission_flags(self.framing.structured());
                codec::encode_export_name_reply(out, export.size_bytes(), flags, self.no_zeroes);
                self.enter(export, flags)
            }
            codec::OPT_ABORT => {
                codec::encode_option_reply(out, option, codec::REP_ACK, &[]);
                Step::Abort
            }
            codec::OPT_LIST => {
                if !data.is_empty() {
                    return invalid(out, "NBD_OPT_LIST takes no data");
                }
                for export in exports.list() {
                    if self.access(exports, &export.name) == Access::Granted {
                        codec::encode_rep_server(out, &export.name, &export.description);
                    }
                }
                codec::encode_option_reply(out, option, codec::REP_ACK, &[]);
                Step::NeedMore
            }
            codec::OPT_INFO | codec::OPT_GO => {
                let Ok(req) = codec::decode_info_request(data) else {
                    return invalid(out, "malformed NBD_OPT_INFO/GO data");
                };
                let Some(export) = exports.get(&req.name) else {
                    // Strings on the wire are at most 4096 bytes (the name may be that long).
                    let mut msg = format!("no export named {:?}", req.name);
                    msg.truncate(msg.floor_char_boundary(codec::STRING_MAX));
                    codec::encode_option_reply(out, option, codec::REP_ERR_UNKNOWN, msg.as_bytes());
                    return Step::NeedMore;
                };
                match self.access(exports, &export.name) {
                    Access::Granted => {}
                    refused => return Self::refuse(out, option, refused),
                }
                let flags = export.transmission_flags(self.framing.structured());
                codec::encode_info_export(out, option, export.size_bytes(), flags);
                // Each information asked for is sent once, however often it is asked for (a
                // list of 32k copies would otherwise make 32k replies).
                let asked = |what| req.requests.contains(&what);
                if asked(codec::INFO_NAME) {
                    codec::encode_info_text(out, option, codec::INFO_NAME, &export.name);
                }
                if asked(codec::INFO_DESCRIPTION) {
                    let text = &export.description;
                    codec::encode_info_text(out, option, codec::INFO_DESCRIPTION, text);
                }
                // The preferred size is never below the minimum (a 16 KiB-LBA namespace): qemu
                // drops such a server, libnbd ignores all three sizes.
                let min = export.dev.info().min_block.max(BLOCK_MIN);
                codec::encode_info_block_size(
                    out,
                    option,
                    min,
                    BLOCK_PREFERRED.max(min),
                    self.max_payload,
                );
                codec::encode_option_reply(out, option, codec::REP_ACK, &[]);
                if option == codec::OPT_GO {
                    self.enter(export, flags)
                } else {
                    Step::NeedMore
                }
            }
            codec::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return invalid(out, "NBD_OPT_STRUCTURED_REPLY takes no data");
                }
                if self.framing == Framing::Extended {
                    // Extended headers already imply structured replies; going back is not
                    // offered (as qemu-nbd answers).
                    let msg = b"extended headers are already negotiated";
                    codec::encode_option_reply(out, option, codec::REP_ERR_EXT_HEADER_REQD, msg);
                    return Step::NeedMore;
                }
                self.framing = Framing::Structured;
                codec::encode_option_reply(out, option, codec::REP_ACK, &[]);
                Step::NeedMore
            }
            codec::OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    return invalid(out, "NBD_OPT_EXTENDED_HEADERS takes no data");
                }
                if self.framing == Framing::Extended {
                    return invalid(out, "extended headers are already negotiated");
                }
                // Structured replies come with them; contexts already selected stay.
                self.framing = Framing::Extended;
                codec::encode_option_reply(out, option, codec::REP_ACK, &[]);
                Step::NeedMore
            }
            codec::OPT_LIST_META_CONTEXT | codec::OPT_SET_META_CONTEXT => {
                self.on_meta(option, data, out, exports)
            }
            _ => {
                codec::encode_option_reply(
                    out,
                    option,
                    codec::REP_ERR_UNSUP,
                    b"option not supported",
                );
                Step::NeedMore
            }
        }
    }

    fn on_meta(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
        exports: &ExportTable,
    ) -> Step {
        let set = option == codec::OPT_SET_META_CONTEXT;
        if set {
            // "Issuing this command replaces all previously-set metadata contexts (including
            // when this command fails)."
            self.meta = None;
        }
        if set && !self.framing.structured() {
            let msg = b"NBD_OPT_SET_META_CONTEXT needs structured replies first";
            codec::encode_option_reply(out, option, codec::REP_ERR_INVALID, msg);
            return Step::NeedMore;
        }
        let Ok(req) = codec::decode_meta_request(data) else {
            codec::encode_option_reply(
                out,
                option,
                codec::REP_ERR_INVALID,
                b"malformed meta context data",
            );
            return Step::NeedMore;
        };
        let Some(export) = exports.get(&req.name) else {
            codec::encode_option_reply(out, option, codec::REP_ERR_UNKNOWN, b"no such export");
            return Step::NeedMore;
        };
        match self.access(exports, &export.name) {
            Access::Granted => {}
            refused => return Self::refuse(out, option, refused),
        }
        // What the queries name: proto.md lets LIST take a namespace ("base:", "qemu:") or a
        // leaf-name prefix ("qemu:dirty-bitmap:") for "all of them"; SET only exact names.
        let everything = !set && req.queries.is_empty();
        let allocation = everything
            || req.queries.iter().any(|q| {
                q == codec::META_BASE_ALLOCATION || (!set && (q == "base:" || q.is_empty()))
            });
        let all_bitmaps = everything
            || (!set
                && req
                    .queries
                    .iter()
                    .any(|q| q.is_empty() || q == "qemu:" || q == META_BITMAP_PREFIX));
        // Each named image with the position of the first query naming it.
        let mut named: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for (at, q) in req.queries.iter().enumerate() {
            if let Some(name) = q.strip_prefix(META_BITMAP_PREFIX) {
                named.entry(name).or_insert(at);
            }
        }
        // Images offered: the device's kin that this session may open as exports itself (a
        // clone's family holds other tenants' clones: their maps are not this one's to see).
        // LIST: at most `META_LIST_MAX`, in the device's order; SET: the one asked for first.
        let mut bitmaps: Vec<ChangeBase> = Vec::new();
        if all_bitmaps || !named.is_empty() {
            let mut first: Option<(usize, ChangeBase)> = None;
            for b in export.dev.change_bases() {
                if !set && bitmaps.len() >= META_LIST_MAX {
                    break;
                }
                let asked = if all_bitmaps { Some(0) } else { named.get(b.name.as_str()).copied() };
                let Some(at) = asked else { continue };
                if exports.get(&b.name).is_none()
                    || self.access(exports, &b.name) != Access::Granted
                {
                    continue;
                }
                if !set {
                    bitmaps.push(b);
                } else if first.as_ref().is_none_or(|(best, _)| at < *best) {
                    first = Some((at, b));
                }
            }
            bitmaps.extend(first.map(|(_, b)| b));
        }
        if allocation {
            // A listed context has no id yet: proto.md says it SHOULD be zero (as qemu sends).
            codec::encode_rep_meta_context(
                out,
                option,
                if set { META_ALLOCATION_ID } else { 0 },
                codec::META_BASE_ALLOCATION,
            );
        }
        for b in &bitmaps {
            let name = format!("{META_BITMAP_PREFIX}{}", b.name);
            codec::encode_rep_meta_context(
                out,
                option,
                if set { META_BITMAP_ID } else { 0 },
                &name,
            );
        }
        if set && (allocation || !bitmaps.is_empty()) {
            self.meta = Some(MetaSelection {
                export: export.name.clone(),
                allocation,
                bitmap: bitmaps.into_iter().next(),
            });
        }
        codec::encode_option_reply(out, option, codec::REP_ACK, &[]);
        Step::NeedMore
    }

    fn enter(&mut self, export: Arc<Export>, flags: u16) -> Step {
        let meta =
            self.meta.take().filter(|m| self.framing.structured() && m.export == export.name);
        let (meta_allocation, meta_bitmap) =
            meta.map_or((false, None), |m| (m.allocation, m.bitmap));
        Step::Enter(Negotiated {
            export,
            framing: self.framing,
            meta_allocation,
            meta_bitmap,
            flags,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_engine::ram::RamDev;
    use ballast_engine::BlockDev;

    fn table() -> ExportTable {
        let t = ExportTable::default();
        let dev = Arc::new(RamDev::new(1 << 20));
        t.add(Export { name: "vol0".into(), description: "d".into(), dev, read_only: false })
            .unwrap();
        t
    }

    fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = codec::IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    /// NBD_OPT_{SET,LIST}_META_CONTEXT data asking `export` for `base:allocation`.
    fn allocation_query(export: &str) -> Vec<u8> {
        let mut meta = (export.len() as u32).to_be_bytes().to_vec();
        meta.extend_from_slice(export.as_bytes());
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(b"base:allocation");
        meta
    }

    fn info_data(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    /// Feeds `input` in pieces of `chunk` bytes, like a socket would.
    fn run(
        hs: &mut Handshake,
        input: &[u8],
        chunk: usize,
        t: &ExportTable,
    ) -> (Vec<u8>, Option<Step>) {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            let (used, step) = hs.on_input(&buf, &mut out, t);
            buf.drain(..used);
            if !matches!(step, Step::NeedMore) {
                return (out, Some(step));
            }
        }
        (out, None)
    }

    #[test]
    fn go_after_unknown_name_on_same_connection() {
        let t = table();
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(codec::OPT_GO, &info_data("nope")));
        input.extend(opt(codec::OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(codec::OPT_GO, &info_data("")));
        for chunk in [1, 3, 1000] {
            let mut hs = Handshake::new();
            let (out, step) = run(&mut hs, &input, chunk, &t);
            let Some(Step::Enter(n)) = step else { panic!("no enter") };
            assert_eq!(n.export.name, "vol0");
            assert_eq!(n.framing, Framing::Structured);
            assert!(n.flags & codec::TF_SEND_DF != 0);
            // first reply: ERR_UNKNOWN for GO
            assert_eq!(&out[8..16], &[0, 0, 0, 7, 0x80, 0, 0, 6]);
        }
    }

    /// (option, reply type) of every option reply in `out`.
    fn replies(out: &[u8]) -> Vec<(u32, u32)> {
        let mut at = 0;
        let mut v = Vec::new();
        while at < out.len() {
            let h = codec::decode_option_reply_header(&out[at..]).unwrap();
            v.push((h.option, h.reply));
            at += codec::OPTION_REPLY_HEADER_LEN + h.length as usize;
        }
        v
    }

    #[test]
    fn extended_headers_are_negotiated_once_and_imply_structured_replies() {
        let t = table();
        let x = codec::OPT_EXTENDED_HEADERS;
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(x, &[1]));
        input.extend(opt(x, &[]));
        input.extend(opt(x, &[]));
        input.extend(opt(codec::OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(codec::OPT_SET_META_CONTEXT, &allocation_query("vol0")));
        input.extend(opt(codec::OPT_GO, &info_data("vol0")));
        for chunk in [1, 7, 1000] {
            let mut hs = Handshake::new();
            let (out, step) = run(&mut hs, &input, chunk, &t);
            let Some(Step::Enter(n)) = step else { panic!("no enter") };
            assert_eq!(n.framing, Framing::Extended);
            assert!(n.meta_allocation, "contexts need structured replies: extended ones do");
            assert!(n.flags & codec::TF_SEND_DF != 0);
            let r = replies(&out);
            assert_eq!(
                &r[..4],
                &[
                    (x, codec::REP_ERR_INVALID),
                    (x, codec::REP_ACK),
                    (x, codec::REP_ERR_INVALID),
                    (codec::OPT_STRUCTURED_REPLY, codec::REP_ERR_EXT_HEADER_REQD),
                ]
            );
            assert_eq!(r[4], (codec::OPT_SET_META_CONTEXT, codec::REP_META_CONTEXT));
            assert_eq!(r.last(), Some(&(codec::OPT_GO, codec::REP_ACK)));
        }
        // Structured replies first, then extended headers: extended.
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(codec::OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(x, &[]));
        input.extend(opt(codec::OPT_GO, &info_data("vol0")));
        let (_, step) = run(&mut Handshake::new(), &input, 1000, &t);
        let Some(Step::Enter(n)) = step else { panic!("no enter") };
        assert_eq!(n.framing, Framing::Extended);
        // NBD_OPT_EXPORT_NAME cannot be refused, and may not follow extended headers: closed.
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(x, &[]));
        input.extend(opt(codec::OPT_EXPORT_NAME, b"vol0"));
        let (out, step) = run(&mut Handshake::new(), &input, 1000, &t);
        assert!(matches!(step, Some(Step::Close(_))));
        assert_eq!(replies(&out), vec![(x, codec::REP_ACK)]);
        // What plaintext negotiated does not survive NBD_OPT_STARTTLS: simple again.
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(x, &[]));
        input.extend(opt(codec::OPT_STARTTLS, &[]));
        let mut hs = Handshake::with_tls(1 << 20, TlsMode::On);
        let (_, step) = run(&mut hs, &input, 1000, &t);
        assert!(matches!(step, Some(Step::StartTls)));
        hs.on_tls_open(None);
        let (_, step) = run(&mut hs, &opt(codec::OPT_GO, &info_data("vol0")), 1000, &t);
        let Some(Step::Enter(n)) = step else { panic!("no enter") };
        assert_eq!(n.framing, Framing::Simple);
    }

    #[test]
    fn garbage_flags_close() {
        let t = table();
        let mut hs = Handshake::new();
        let (_, step) = run(&mut hs, &[0xff; 4], 4, &t);
        assert!(matches!(step, Some(Step::Close(_))));
    }

    #[test]
    fn oversized_option_is_skipped_then_haggling_continues() {
        let t = table();
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(codec::OPT_LIST, &vec![0u8; 100_000]));
        input.extend(opt(codec::OPT_EXPORT_NAME, b"vol0"));
        let mut hs = Handshake::new();
        let (out, step) = run(&mut hs, &input, 4096, &t);
        assert!(matches!(step, Some(Step::Enter(_))));
        assert_eq!(&out[12..16], &codec::REP_ERR_TOO_BIG.to_be_bytes());
        // reply header 20 bytes + message, then the export-name reply with 124 zero bytes
        assert_eq!(out.len() - (20 + "option data too long".len()), 8 + 2 + 124);
    }

    #[test]
    fn meta_context_requires_structured_and_matches_export() {
        let t = table();
        let meta = allocation_query("vol0");
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(codec::OPT_SET_META_CONTEXT, &meta));
        input.extend(opt(codec::OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(codec::OPT_SET_META_CONTEXT, &meta));
        input.extend(opt(codec::OPT_GO, &info_data("vol0")));
        let mut hs = Handshake::new();
        let (out, step) = run(&mut hs, &input, 7, &t);
        assert_eq!(&out[12..16], &codec::REP_ERR_INVALID.to_be_bytes());
        let Some(Step::Enter(n)) = step else { panic!() };
        assert!(n.meta_allocation);
    }

    /// A device with kin to compare with (a volume with snapshots), for the dirty bitmaps.
    struct WithKin(RamDev, Vec<String>);

    impl BlockDev for WithKin {
        fn info(&self) -> &ballast_engine::DevInfo {
            self.0.info()
        }
        fn size_bytes(&self) -> u64 {
            self.0.size_bytes()
        }
        fn submit(&self, cx: &mut ballast_engine::Cx<'_>, cmd: ballast_engine::IoCmd, tag: u32) {
            self.0.submit(cx, cmd, tag)
        }
        fn extents(
            &self,
            offset: u64,
            len: u64,
            max: usize,
        ) -> std::io::Result<Vec<ballast_engine::Extent>> {
            self.0.extents(offset, len, max)
        }
        fn flush_blocking(&self) -> std::io::Result<()> {
            self.0.flush_blocking()
        }
        fn change_bases(&self) -> Vec<ChangeBase> {
            let kin = self.1.iter().enumerate();
            kin.map(|(i, n)| ChangeBase { name: n.clone(), id: 10 + i as u64 }).collect()
        }
    }

    /// `data` of a metadata-context option on `export` with these queries.
    fn meta_query(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut meta = (export.len() as u32).to_be_bytes().to_vec();
        meta.extend_from_slice(export.as_bytes());
        meta.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            meta.extend_from_slice(&(q.len() as u32).to_be_bytes());
            meta.extend_from_slice(q.as_bytes());
        }
        meta
    }

    /// The (id, name) of every NBD_REP_META_CONTEXT in `out`, from byte `at`.
    fn contexts(out: &[u8], mut at: usize) -> Vec<(u32, String)> {
        let mut found = Vec::new();
        while at + 20 <= out.len() {
            let reply = u32::from_be_bytes(out[at + 12..at + 16].try_into().unwrap());
            let len = u32::from_be_bytes(out[at + 16..at + 20].try_into().unwrap()) as usize;
            if reply == codec::REP_META_CONTEXT {
                let id = u32::from_be_bytes(out[at + 20..at + 24].try_into().unwrap());
                found.push((id, String::from_utf8(out[at + 24..at + 20 + len].to_vec()).unwrap()));
            }
            at += 20 + len;
        }
        found
    }

    /// `qemu:dirty-bitmap:NAME` for each image the device names: listed with the namespace,
    /// the prefix or no query (ids 0), set by exact name only, one at a time (the first),
    /// beside `base:allocation`; a name the device does not know is not selected.
    #[test]
    fn dirty_bitmaps_are_listed_and_one_is_set() {
        let t = ExportTable::default();
        let kin = vec!["s1".to_string(), "s2".to_string(), "hidden".to_string(), "gone".into()];
        let dev = Arc::new(WithKin(RamDev::new(1 << 20), kin));
        t.add(Export { name: "v".into(), description: "d".into(), dev, read_only: false }).unwrap();
        // The kin are exports of their own ("gone" is not: deleted since); "hidden" is another
        // tenant's (TLS-only, for someone else): never offered to this session.
        for name in ["s1", "s2", "hidden"] {
            let dev = Arc::new(RamDev::new(1 << 20));
            t.add(Export { name: name.into(), description: "d".into(), dev, read_only: true })
                .unwrap();
        }
        t.set_allowed("hidden", vec!["bob".into()]);
        let bitmap = |n: &str| format!("{META_BITMAP_PREFIX}{n}");
        let all_three = vec![
            (0, codec::META_BASE_ALLOCATION.to_string()),
            (0, bitmap("s1")),
            (0, bitmap("s2")),
        ];
        for (queries, want) in [
            (vec![], all_three.clone()),
            (vec![""], all_three.clone()),
            (vec!["qemu:"], vec![(0, bitmap("s1")), (0, bitmap("s2"))]),
            (vec!["qemu:dirty-bitmap:"], vec![(0, bitmap("s1")), (0, bitmap("s2"))]),
            (vec!["qemu:dirty-bitmap:s2", "nope:x"], vec![(0, bitmap("s2"))]),
        ] {
            let mut input = 3u32.to_be_bytes().to_vec();
            input.extend(opt(codec::OPT_LIST_META_CONTEXT, &meta_query("v", &queries)));
            let (out, _) = run(&mut Handshake::new(), &input, 1000, &t);
            assert_eq!(contexts(&out, 0), want, "LIST {queries:?}");
        }
        let set = |queries: &[&str]| {
            let mut input = 3u32.to_be_bytes().to_vec();
            input.extend(opt(codec::OPT_STRUCTURED_REPLY, &[]));
            input.extend(opt(codec::OPT_SET_META_CONTEXT, &meta_query("v", queries)));
            input.extend(opt(codec::OPT_GO, &info_data("v")));
            let (out, step) = run(&mut Handshake::new(), &input, 1000, &t);
            let Some(Step::Enter(n)) = step else { panic!("no enter") };
            (contexts(&out, 0), n.meta_allocation, n.meta_bitmap.map(|b| (b.name, b.id)))
        };
        assert_eq!(
            set(&["qemu:dirty-bitmap:s2", "base:allocation", "qemu:dirty-bitmap:s1"]),
            (
                vec![
                    (META_ALLOCATION_ID, codec::META_BASE_ALLOCATION.to_string()),
                    (META_BITMAP_ID, bitmap("s2"))
                ],
                true,
                Some(("s2".to_string(), 11))
            )
        );
        assert_eq!(
            set(&["qemu:dirty-bitmap:s1"]),
            (vec![(META_BITMAP_ID, bitmap("s1"))], false, Some(("s1".to_string(), 10)))
        );
        assert_eq!(set(&["qemu:dirty-bitmap:w"]), (vec![], false, None), "not kin");
        assert_eq!(set(&["qemu:dirty-bitmap:hidden"]), (vec![], false, None), "not ours");
        assert_eq!(set(&["qemu:dirty-bitmap:gone"]), (vec![], false, None), "not exported");
        // 9,000 queries in one option (most of OPTION_DATA_MAX) are answered in one pass over
        // the kin.
        let many: Vec<&str> = std::iter::repeat_n("", 8000)
            .chain(std::iter::repeat_n("qemu:dirty-bitmap:s2", 1000))
            .collect();
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(codec::OPT_LIST_META_CONTEXT, &meta_query("v", &many)));
        let started = std::time::Instant::now();
        let (out, _) = run(&mut Handshake::new(), &input, 1 << 20, &t);
        assert_eq!(contexts(&out, 0), all_three);
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
        assert_eq!(set(&["qemu:"]), (vec![], false, None), "SET takes exact names only");
    }

    /// A family of more than `META_LIST_MAX` kin: LIST names the first `META_LIST_MAX` (one
    /// option's replies stay bounded), SET still reaches one beyond by its name.
    #[test]
    fn listing_dirty_bitmaps_is_bounded() {
        let t = ExportTable::default();
        let kin: Vec<String> = (0..META_LIST_MAX + 5).map(|i| format!("s{i}")).collect();
        for name in &kin {
            let dev = Arc::new(RamDev::new(1 << 20));
            t.add(Export { name: name.clone(), description: "d".into(), dev, read_only: true })
                .unwrap();
        }
        let last = kin.last().unwrap().clone();
        let dev = Arc::new(WithKin(RamDev::new(1 << 20), kin));
        t.add(Export { name: "v".into(), description: "d".into(), dev, read_only: false }).unwrap();
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(codec::OPT_LIST_META_CONTEXT, &meta_query("v", &["qemu:"])));
        let (out, _) = run(&mut Handshake::new(), &input, 1 << 20, &t);
        let listed = contexts(&out, 0);
        assert_eq!(listed.len(), META_LIST_MAX);
        assert_eq!(listed[0].1, format!("{META_BITMAP_PREFIX}s0"));
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(codec::OPT_STRUCTURED_REPLY, &[]));
        let by_name = format!("{META_BITMAP_PREFIX}{last}");
        input.extend(opt(codec::OPT_SET_META_CONTEXT, &meta_query("v", &[&by_name])));
        input.extend(opt(codec::OPT_GO, &info_data("v")));
        let (_, step) = run(&mut Handshake::new(), &input, 1 << 20, &t);
        let Some(Step::Enter(n)) = step else { panic!("no enter") };
        assert_eq!(n.meta_bitmap.map(|b| b.name), Some(last));
    }

    /// NBD_OPT_LIST_META_CONTEXT names the context with id 0 (proto.md: it SHOULD; ids are
    /// SET_META_CONTEXT's), SET with its id.
    #[test]
    fn listed_contexts_carry_id_zero_set_ones_their_id() {
        let t = table();
        let mut meta = 4u32.to_be_bytes().to_vec();
        meta.extend_from_slice(b"vol0");
        meta.extend_from_slice(&0u32.to_be_bytes()); // no query: list all
        for (option, want) in
            [(codec::OPT_LIST_META_CONTEXT, 0), (codec::OPT_SET_META_CONTEXT, META_ALLOCATION_ID)]
        {
            let mut input = 3u32.to_be_bytes().to_vec();
            input.extend(opt(codec::OPT_STRUCTURED_REPLY, &[]));
            let query = if option == codec::OPT_SET_META_CONTEXT {
                allocation_query("vol0")
            } else {
                meta.clone()
            };
            input.extend(opt(option, &query));
            let mut hs = Handshake::new();
            let (out, _) = run(&mut hs, &input, 64, &t);
            // After STRUCTURED_REPLY's ACK (20 bytes): REP_META_CONTEXT, its id first.
            assert_eq!(reply_type(&out, 20), codec::REP_META_CONTEXT);
            assert_eq!(u32::from_be_bytes(out[40..44].try_into().unwrap()), want);
        }
    }

    /// The preferred block size is never below the minimum (a namespace with 16 KiB blocks).
    #[test]
    fn preferred_block_size_is_at_least_the_minimum() {
        let t = ExportTable::default();
        let dev = Arc::new(RamDev::new(1 << 20).with_min_block(16384));
        t.add(Export { name: "big".into(), description: String::new(), dev, read_only: false })
            .unwrap();
        let mut input = 1u32.to_be_bytes().to_vec();
        let mut go = info_data("big");
        go.truncate(go.len() - 2);
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&codec::INFO_BLOCK_SIZE.to_be_bytes());
        input.extend(opt(codec::OPT_GO, &go));
        let mut hs = Handshake::new();
        let (out, step) = run(&mut hs, &input, 64, &t);
        assert!(matches!(step, Some(Step::Enter(_))));
        // The INFO replies: EXPORT (12 bytes of data), then BLOCK_SIZE: min, preferred, max.
        let at = 20 + 12;
        assert_eq!(reply_type(&out, at), codec::REP_INFO);
        let sizes: Vec<u32> = out[at + 22..at + 34]
            .chunks(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(&sizes[..2], &[16384, 16384], "{sizes:?}");
    }

    /// A description is a wire string: at most 4096 bytes, no NUL (NBD_OPT_LIST and
    /// NBD_INFO_DESCRIPTION carry it; a longer one broke libnbd's listing of every export).
    #[test]
    fn export_descriptions_are_wire_strings() {
        let t = ExportTable::default();
        let add = |name: &str, description: String| {
            let dev = Arc::new(RamDev::new(1 << 20));
            t.add(Export { name: name.into(), description, dev, read_only: false })
        };
        assert!(add("a", "d".repeat(codec::STRING_MAX)).is_ok());
        let long = add("b", "d".repeat(codec::STRING_MAX + 1));
        assert!(matches!(long, Err(crate::exports::ExportError::BadDescription(_))));
        assert!(add("c", "a\0b".into()).is_err());
        assert!(t.get("b").is_none() && t.get("c").is_none(), "nothing added");
    }

    /// Reply type of the option reply starting at `at` in `out`.
    fn reply_type(out: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(out[at + 12..at + 16].try_into().unwrap())
    }

    #[test]
    fn abort_is_acknowledged_and_ends_gracefully() {
        let t = table();
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(codec::OPT_ABORT, &[]));
        // Under forced TLS too: NBD_OPT_ABORT needs no TLS.
        for mut hs in [Handshake::new(), Handshake::with_tls(1 << 20, TlsMode::Require)] {
            let (out, step) = run(&mut hs, &input, 5, &t);
            assert!(matches!(step, Some(Step::Abort)));
            assert_eq!(out.len(), 20);
            assert_eq!(reply_type(&out, 0), codec::REP_ACK);
        }
    }

    #[test]
    fn starttls_refused_when_tls_is_off() {
        let t = table();
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(codec::OPT_STARTTLS, &[]));
        input.extend(opt(codec::OPT_GO, &info_data("vol0")));
        let mut hs = Handshake::new();
        let (out, step) = run(&mut hs, &input, 3, &t);
        assert_eq!(reply_type(&out, 0), codec::REP_ERR_POLICY);
        assert!(matches!(step, Some(Step::Enter(_))));
    }

    #[test]
    fn forced_tls_refuses_everything_but_starttls_and_forgets_plaintext_state() {
        let t = table();
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(codec::OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(codec::OPT_LIST, &[]));
        input.extend(opt(codec::OPT_STARTTLS, &[]));
        let mut hs = Handshake::with_tls(1 << 20, TlsMode::Require);
        let (out, step) = run(&mut hs, &input, 5, &t);
        assert!(matches!(step, Some(Step::StartTls)));
        assert_eq!(reply_type(&out, 0), codec::REP_ERR_TLS_REQD);
        let second = 20 + u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert_eq!(reply_type(&out, second), codec::REP_ERR_TLS_REQD);
        let third = second
            + 20
            + u32::from_be_bytes(out[second + 16..second + 20].try_into().unwrap()) as usize;
        assert_eq!(reply_type(&out, third), codec::REP_ACK);
        assert_eq!(out.len(), third + 20);
        // Over TLS now: structured replies asked before the upgrade are gone.
        hs.on_tls_open(Some("alice".into()));
        let mut again = opt(codec::OPT_STARTTLS, &[]);
        again.extend(opt(codec::OPT_GO, &info_data("vol0")));
        let (out, used) = {
            let mut out = Vec::new();
            let (used, step) = hs.on_input(&again, &mut out, &t);
            let Step::Enter(n) = step else { panic!("GO over TLS refused") };
            assert_eq!(n.framing, Framing::Simple);
            (out, used)
        };
        assert_eq!(used, again.len());
        assert_eq!(reply_type(&out, 0), codec::REP_ERR_INVALID);
    }

    #[test]
    fn export_name_before_forced_tls_closes() {
        let t = table();
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(codec::OPT_EXPORT_NAME, b"vol0"));
        let mut hs = Handshake::with_tls(1 << 20, TlsMode::Require);
        let (out, step) = run(&mut hs, &input, 100, &t);
        assert!(matches!(step, Some(Step::Close(_))));
        assert!(out.is_empty());
    }

    #[test]
    fn selective_tls_allow_lists_by_identity() {
        let t = table();
        let dev = Arc::new(RamDev::new(1 << 20));
        t.add(Export { name: "open".into(), description: String::new(), dev, read_only: false })
            .unwrap();
        t.set_allowed("vol0", vec!["alice".into()]);
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(codec::OPT_LIST, &[]));
        input.extend(opt(codec::OPT_GO, &info_data("vol0")));
        input.extend(opt(codec::OPT_STARTTLS, &[]));
        let mut hs = Handshake::with_tls(1 << 20, TlsMode::On);
        let (out, step) = run(&mut hs, &input, 7, &t);
        assert!(matches!(step, Some(Step::StartTls)));
        // LIST shows only "open", then ACK; GO on the TLS-only export needs TLS.
        assert_eq!(reply_type(&out, 0), codec::REP_SERVER);
        assert!(out.windows(4).any(|w| w == b"open"));
        assert!(!out.windows(4).any(|w| w == b"vol0"));
        let go = out.len() - 20 - (20 + b"this export requires TLS".len());
        assert_eq!(reply_type(&out, go), codec::REP_ERR_TLS_REQD);
        for (who, granted) in [(Some("bob"), false), (None, false), (Some("alice"), true)] {
            let mut hs = Handshake::with_tls(1 << 20, TlsMode::On);
            let mut start = 1u32.to_be_bytes().to_vec();
            start.extend(opt(codec::OPT_STARTTLS, &[]));
            let (_, step) = run(&mut hs, &start, 100, &t);
            assert!(matches!(step, Some(Step::StartTls)));
            hs.on_tls_open(who.map(String::from));
            let (out, step) = run(&mut hs, &opt(codec::OPT_GO, &info_data("vol0")), 100, &t);
            if granted {
                assert!(matches!(step, Some(Step::Enter(_))), "{who:?}");
            } else {
                assert!(step.is_none(), "{who:?}");
                assert_eq!(reply_type(&out, 0), codec::REP_ERR_POLICY);
            }
        }
    }

    /// Option replies are bounded per input step, and each information asked for is sent
    /// once: a client sending options it never reads the replies of holds little.
    #[test]
    fn replies_per_input_step_are_bounded_and_asked_information_sent_once() {
        let t = table();
        // One NBD_OPT_INFO naming NBD_INFO_NAME 30,000 times: one NAME reply.
        let mut info = 4u32.to_be_bytes().to_vec();
        info.extend_from_slice(b"vol0");
        info.extend_from_slice(&30_000u16.to_be_bytes());
        for _ in 0..30_000 {
            info.extend_from_slice(&codec::INFO_NAME.to_be_bytes());
        }
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(codec::OPT_INFO, &info));
        let mut hs = Handshake::new();
        let mut out = Vec::new();
        let (used, step) = hs.on_input(&input, &mut out, &t);
        assert!(matches!(step, Step::NeedMore) && used == input.len());
        // EXPORT, NAME, BLOCK_SIZE, ACK.
        let mut at = 0;
        let mut types = Vec::new();
        while at < out.len() {
            types.push(reply_type(&out, at));
            at += 20 + u32::from_be_bytes(out[at + 16..at + 20].try_into().unwrap()) as usize;
        }
        assert_eq!(
            types,
            [codec::REP_INFO; 3].into_iter().chain([codec::REP_ACK]).collect::<Vec<_>>()
        );
        // 20,000 NBD_OPT_LISTs in one input: each step stops once its replies pass the bound
        // and leaves the rest of the input; every LIST is answered in the end.
        let list = opt(codec::OPT_LIST, &[]);
        let mut input: Vec<u8> = 1u32.to_be_bytes().to_vec();
        for _ in 0..20_000 {
            input.extend_from_slice(&list);
        }
        let mut hs = Handshake::new();
        let (mut rest, mut steps, mut total) = (&input[..], 0, 0);
        while !rest.is_empty() {
            let mut out = Vec::new();
            let (used, step) = hs.on_input(rest, &mut out, &t);
            assert!(matches!(step, Step::NeedMore) && used > 0);
            assert!(out.len() <= REPLIES_PER_INPUT_MAX + 64, "{} bytes in one step", out.len());
            rest = &rest[used..];
            total += out.len();
            steps += 1;
        }
        // Each LIST answered as one alone is.
        let mut one = Vec::new();
        Handshake::new().on_input(&input[..4 + list.len()], &mut one, &t);
        assert_eq!(total, 20_000 * one.len());
        assert!(steps > 10, "{steps} steps");
    }

    /// "Issuing [NBD_OPT_SET_META_CONTEXT] replaces all previously-set metadata contexts
    /// (including when this command fails)."
    #[test]
    fn a_failed_set_meta_context_clears_the_earlier_selection() {
        let t = table();
        let meta = allocation_query("vol0");
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(codec::OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(codec::OPT_SET_META_CONTEXT, &meta));
        input.extend(opt(codec::OPT_SET_META_CONTEXT, &meta[..6])); // malformed: refused
        input.extend(opt(codec::OPT_GO, &info_data("vol0")));
        let mut hs = Handshake::new();
        let (_, step) = run(&mut hs, &input, 1000, &t);
        let Some(Step::Enter(n)) = step else { panic!("no enter") };
        assert!(!n.meta_allocation, "the refused SET kept the earlier context");
    }

    /// Under SELECTIVETLS only INFO and GO are answered NBD_REP_ERR_TLS_REQD for a TLS-only
    /// export; under FORCEDTLS an oversized option before TLS is (not NBD_REP_ERR_TOO_BIG).
    #[test]
    fn tls_required_replies_only_where_proto_allows_them() {
        let t = table();
        t.set_allowed("vol0", vec!["alice".into()]);
        let mut meta = 4u32.to_be_bytes().to_vec();
        meta.extend_from_slice(b"vol0");
        meta.extend_from_slice(&0u32.to_be_bytes());
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(codec::OPT_LIST_META_CONTEXT, &meta));
        let mut hs = Handshake::with_tls(1 << 20, TlsMode::On);
        let (out, _) = run(&mut hs, &input, 100, &t);
        assert_eq!(reply_type(&out, 0), codec::REP_ERR_POLICY);
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(0x99, &vec![0u8; OPTION_DATA_MAX as usize + 1]));
        for (mode, want) in
            [(TlsMode::Require, codec::REP_ERR_TLS_REQD), (TlsMode::On, codec::REP_ERR_TOO_BIG)]
        {
            let mut hs = Handshake::with_tls(1 << 20, mode);
            let (out, _) = run(&mut hs, &input, 4096, &t);
            assert_eq!(reply_type(&out, 0), want, "{mode:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        /// Arbitrary bytes after valid flags never panic the machine.
        #[test]
        fn fuzz_handshake(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
                          chunk in 1usize..64) {
            let t = table();
            let mut input = 1u32.to_be_bytes().to_vec();
            input.extend(bytes);
            let mut hs = Handshake::new();
            let _ = run(&mut hs, &input, chunk, &t);
        }

        /// Well-formed option headers with arbitrary option codes and data never panic.
        #[test]
        fn fuzz_options(option in 0u32..16, data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let t = table();
            let mut input = 3u32.to_be_bytes().to_vec();
            input.extend(opt(option, &data));
            for mode in [TlsMode::Off, TlsMode::On, TlsMode::Require] {
                let mut hs = Handshake::with_tls(1 << 20, mode);
                let _ = run(&mut hs, &input, 5, &t);
            }
        }
    }
}
