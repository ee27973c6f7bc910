//! NBD handshake state machine: fixed newstyle option haggling, from the client's flags to
//! the start of transmission. Pure: bytes in, bytes out, no I/O, so it is tested and fuzzed
//! without sockets.

use std::sync::Arc;

use crate::codec::{self, OptionHeader};
use crate::exports::{Export, ExportTable};

/// Options carrying more data than this are skipped and answered with NBD_REP_ERR_TOO_BIG.
pub const OPTION_DATA_MAX: u32 = 64 * 1024;
/// Block size constraints advertised in NBD_INFO_BLOCK_SIZE.
pub const BLOCK_MIN: u32 = 1;
pub const BLOCK_PREFERRED: u32 = 4096;
pub const PAYLOAD_ADVERTISED_MAX: u32 = 32 << 20;
/// Context id we give `base:allocation`.
pub const META_ALLOCATION_ID: u32 = 1;

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
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub meta_allocation: bool,
    pub flags: u16,
}

/// The result of feeding input.
pub enum Step {
    /// Send what was written to `out`, then read more.
    NeedMore,
    /// Send `out`, then start transmission.
    Enter(Negotiated),
    /// Send `out` (if anything), then close the connection.
    Close(&'static str),
}

pub struct Handshake {
    state: State,
    /// Largest payload advertised (NBD_INFO_BLOCK_SIZE maximum).
    max_payload: u32,
    no_zeroes: bool,
    structured: bool,
    /// Export name (canonical, non-empty) for which `base:allocation` was set.
    meta_export: Option<String>,
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
        assert!(max_payload >= BLOCK_PREFERRED, "max payload below the preferred block size");
        Handshake {
            max_payload: max_payload.min(PAYLOAD_ADVERTISED_MAX),
            state: State::ClientFlags,
            no_zeroes: false,
            structured: false,
            meta_export: None,
        }
    }

    /// Bytes to send on connect.
    pub fn greeting(out: &mut Vec<u8>) {
        codec::encode_greeting(out);
    }

    /// Consumes a prefix of `input`, appending replies to `out`; returns bytes consumed.
    pub fn on_input(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        exports: &ExportTable,
    ) -> (usize, Step) {
        let mut used = 0;
        loop {
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
                    codec::encode_option_reply(
                        out,
                        option,
                        codec::REP_ERR_TOO_BIG,
                        b"option data too long",
                    );
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
                        done => {
                            self.state = State::Done;
                            return (used, done);
                        }
                    }
                }
            }
        }
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
        match option {
            codec::OPT_EXPORT_NAME => {
                let Ok(name) = codec::decode_export_name(data) else {
                    return Step::Close("bad export name");
                };
                let Some(export) = exports.get(&name) else {
                    return Step::Close("unknown export (NBD_OPT_EXPORT_NAME)");
                };
                let flags = export.transmission_flags(self.structured);
                codec::encode_export_name_reply(out, export.size_bytes(), flags, self.no_zeroes);
                self.enter(export, flags)
            }
            codec::OPT_ABORT => {
                codec::encode_option_reply(out, option, codec::REP_ACK, &[]);
                Step::Close("client aborted")
            }
            codec::OPT_LIST => {
                if !data.is_empty() {
                    return invalid(out, "NBD_OPT_LIST takes no data");
                }
                for export in exports.list() {
                    codec::encode_rep_server(out, &export.name, &export.description);
                }
                codec::encode_option_reply(out, option, codec::REP_ACK, &[]);
                Step::NeedMore
            }
            codec::OPT_INFO | codec::OPT_GO => {
                let Ok(req) = codec::decode_info_request(data) else {
                    return invalid(out, "malformed NBD_OPT_INFO/GO data");
                };
                let Some(export) = exports.get(&req.name) else {
                    let msg = format!("no export named {:?}", req.name);
                    codec::encode_option_reply(out, option, codec::REP_ERR_UNKNOWN, msg.as_bytes());
                    return Step::NeedMore;
                };
                let flags = export.transmission_flags(self.structured);
                codec::encode_info_export(out, option, export.size_bytes(), flags);
                for info in &req.requests {
                    match *info {
                        codec::INFO_NAME => {
                            codec::encode_info_text(out, option, codec::INFO_NAME, &export.name)
                        }
                        codec::INFO_DESCRIPTION => codec::encode_info_text(
                            out,
                            option,
                            codec::INFO_DESCRIPTION,
                            &export.description,
                        ),
                        _ => {}
                    }
                }
                codec::encode_info_block_size(
                    out,
                    option,
                    export.dev.info().min_block.max(BLOCK_MIN),
                    BLOCK_PREFERRED,
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
                self.structured = true;
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
        if set && !self.structured {
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
        let wanted = if req.queries.is_empty() {
            !set
        } else {
            req.queries.iter().any(|q| {
                q == codec::META_BASE_ALLOCATION || (!set && (q == "base:" || q.is_empty()))
            })
        };
        if wanted {
            codec::encode_rep_meta_context(
                out,
                option,
                META_ALLOCATION_ID,
                codec::META_BASE_ALLOCATION,
            );
        }
        if set {
            self.meta_export = wanted.then(|| export.name.clone());
        }
        codec::encode_option_reply(out, option, codec::REP_ACK, &[]);
        Step::NeedMore
    }

    fn enter(&mut self, export: Arc<Export>, flags: u16) -> Step {
        let meta_allocation =
            self.structured && self.meta_export.as_deref() == Some(export.name.as_str());
        Step::Enter(Negotiated { export, structured: self.structured, meta_allocation, flags })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_engine::ram::RamDev;

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
            assert!(n.structured);
            assert!(n.flags & codec::TF_SEND_DF != 0);
            // first reply: ERR_UNKNOWN for GO
            assert_eq!(&out[8..16], &[0, 0, 0, 7, 0x80, 0, 0, 6]);
        }
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
        let mut meta = 4u32.to_be_bytes().to_vec();
        meta.extend_from_slice(b"vol0");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(b"base:allocation");
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
            let mut hs = Handshake::new();
            let _ = run(&mut hs, &input, 5, &t);
        }
    }
}
