//! Transmission-phase request validation: a decoded request plus the negotiated session →
//! what to do. Pure, so every error path (ranges, flags, read-only) is unit-tested.

use crate::codec::{self, Framing, Request};

/// What the negotiation fixed for this connection.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    pub size_bytes: u64,
    pub read_only: bool,
    /// Simple, structured or extended: what replies may be, how long lengths are.
    pub framing: Framing,
    pub meta_allocation: bool,
    /// A `qemu:dirty-bitmap:NAME` context was selected (block status reports it too).
    pub meta_bitmap: bool,
    /// Largest read or write accepted: the maximum payload advertised in NBD_INFO_BLOCK_SIZE
    /// (what the core's buffer budget can always grant one request).
    pub max_payload: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    /// `len` payload bytes follow the header.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    /// Trim, write zeroes and block status take 64-bit lengths under extended headers.
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast: bool,
        fua: bool,
    },
    Cache,
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
    },
    Disconnect,
    /// A protocol violation no reply can mend: the connection is dropped (a payload too long
    /// to skip, under extended headers where lengths are 64 bits).
    Abandon {
        why: &'static str,
    },
    /// Reply `error`; `discard` payload bytes follow the header and must be skipped.
    Reject {
        error: u32,
        discard: u64,
        why: &'static str,
    },
}

/// A refused request's payload is read and dropped up to this (what a compact header can
/// announce; under extended headers up to the maximum payload); a longer one ends the
/// connection.
pub const SKIP_MAX: u64 = u32::MAX as u64;

/// The flags each command takes. FUA is valid on every command (proto.md: with SEND_FUA
/// negotiated the server "MUST accept all commands with this bit set (even by ignoring the
/// bit)"; clients are known to set it on others): ignored where it means nothing. Under
/// extended headers a write may say PAYLOAD_LEN (its length is its payload's either way).
fn allowed_flags(kind: u16, framing: Framing) -> u16 {
    let payload_len = if framing == Framing::Extended && kind == codec::CMD_WRITE {
        codec::CMD_FLAG_PAYLOAD_LEN
    } else {
        0
    };
    codec::CMD_FLAG_FUA
        | payload_len
        | match kind {
            codec::CMD_READ => codec::CMD_FLAG_DF,
            codec::CMD_WRITE_ZEROES => codec::CMD_FLAG_NO_HOLE | codec::CMD_FLAG_FAST_ZERO,
            codec::CMD_BLOCK_STATUS => codec::CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// Decides what to do with `r`.
pub fn classify(r: &Request, s: &Session) -> Action {
    // The bytes that follow the header: a write's payload, or under extended headers a
    // payload any command says it carries (PAYLOAD_LEN; none is offered for others, so
    // theirs is skipped and refused).
    let payload_len = s.framing == Framing::Extended && r.flags & codec::CMD_FLAG_PAYLOAD_LEN != 0;
    let discard = if r.kind == codec::CMD_WRITE || payload_len { r.length } else { 0 };
    let reject = |error, why| Action::Reject { error, discard, why };
    if r.kind == codec::CMD_DISC {
        // "There is no reply to an NBD_CMD_DISC", whatever its flags.
        return Action::Disconnect;
    }
    // A payload past the maximum is skipped on a compact connection (at most 4 GiB); under
    // extended headers, where it could be any length, the connection ends (proto.md: the
    // server SHOULD disconnect).
    if discard > SKIP_MAX || (s.framing == Framing::Extended && discard > u64::from(s.max_payload))
    {
        return Action::Abandon { why: "request payload beyond the maximum payload" };
    }
    if r.flags & !allowed_flags(r.kind, s.framing) != 0 {
        return reject(codec::EINVAL, "flag not valid for this command");
    }
    if r.flags & codec::CMD_FLAG_DF != 0 && !s.framing.structured() {
        return reject(codec::EINVAL, "DF without structured replies");
    }
    let in_range = r.offset.checked_add(r.length).is_some_and(|end| end <= s.size_bytes);
    let writes = matches!(r.kind, codec::CMD_WRITE | codec::CMD_TRIM | codec::CMD_WRITE_ZEROES);
    if writes && s.read_only {
        return reject(codec::EPERM, "export is read-only");
    }
    let fua = r.flags & codec::CMD_FLAG_FUA != 0;
    // Within the maximum payload (so within 32 bits) for the commands that move data.
    let payload = u32::try_from(r.length).ok().filter(|&len| len <= s.max_payload);
    match r.kind {
        codec::CMD_READ | codec::CMD_WRITE if payload.is_none() => {
            reject(codec::EINVAL, "request larger than the maximum payload")
        }
        codec::CMD_READ if !in_range => reject(codec::EINVAL, "read beyond the end of the export"),
        codec::CMD_READ => Action::Read {
            offset: r.offset,
            len: payload.expect("checked above"),
            df: r.flags & codec::CMD_FLAG_DF != 0,
        },
        codec::CMD_WRITE if !in_range => {
            reject(codec::ENOSPC, "write beyond the end of the export")
        }
        codec::CMD_WRITE => {
            Action::Write { offset: r.offset, len: payload.expect("checked above"), fua }
        }
        codec::CMD_FLUSH => Action::Flush,
        codec::CMD_TRIM if !in_range => reject(codec::EINVAL, "trim beyond the end of the export"),
        codec::CMD_TRIM => Action::Trim { offset: r.offset, len: r.length, fua },
        codec::CMD_WRITE_ZEROES if !in_range => {
            reject(codec::ENOSPC, "write-zeroes beyond the end of the export")
        }
        codec::CMD_WRITE_ZEROES => Action::WriteZeroes {
            offset: r.offset,
            len: r.length,
            may_unmap: r.flags & codec::CMD_FLAG_NO_HOLE == 0,
            fast: r.flags & codec::CMD_FLAG_FAST_ZERO != 0,
            fua,
        },
        codec::CMD_CACHE if !in_range => {
            reject(codec::EINVAL, "cache beyond the end of the export")
        }
        codec::CMD_CACHE => Action::Cache,
        codec::CMD_BLOCK_STATUS if !s.meta_allocation && !s.meta_bitmap => {
            reject(codec::EINVAL, "no metadata context negotiated")
        }
        codec::CMD_BLOCK_STATUS if r.length == 0 || !in_range => {
            reject(codec::EINVAL, "block status range empty or beyond the end")
        }
        codec::CMD_BLOCK_STATUS => Action::BlockStatus {
            offset: r.offset,
            len: r.length,
            req_one: r.flags & codec::CMD_FLAG_REQ_ONE != 0,
        },
        _ => reject(codec::EINVAL, "unknown command"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Session = Session {
        size_bytes: 1 << 20,
        read_only: false,
        framing: Framing::Structured,
        meta_allocation: true,
        meta_bitmap: false,
        max_payload: 32 << 20,
    };

    fn req(kind: u16, flags: u16, offset: u64, length: u64) -> Request {
        Request { flags, kind, handle: 1, offset, length }
    }

    #[test]
    fn ranges_give_the_spec_errors() {
        let end = 1u64 << 20;
        assert!(matches!(
            classify(&req(codec::CMD_READ, 0, end, 1), &S),
            Action::Reject { error: codec::EINVAL, discard: 0, .. }
        ));
        assert!(matches!(
            classify(&req(codec::CMD_WRITE, 0, end - 1, 2), &S),
            Action::Reject { error: codec::ENOSPC, discard: 2, .. }
        ));
        assert!(matches!(
            classify(&req(codec::CMD_WRITE_ZEROES, 0, end, 1), &S),
            Action::Reject { error: codec::ENOSPC, discard: 0, .. }
        ));
        assert!(matches!(
            classify(&req(codec::CMD_TRIM, 0, u64::MAX, 2), &S),
            Action::Reject { error: codec::EINVAL, .. }
        ));
        assert_eq!(
            classify(&req(codec::CMD_READ, 0, end - 4096, 4096), &S),
            Action::Read { offset: end - 4096, len: 4096, df: false }
        );
    }

    #[test]
    fn flags_and_modes() {
        assert!(matches!(
            classify(&req(codec::CMD_FLUSH, codec::CMD_FLAG_DF, 0, 0), &S),
            Action::Reject { .. }
        ));
        let simple = Session { framing: Framing::Simple, meta_allocation: false, ..S };
        let bitmap_only = Session { meta_allocation: false, meta_bitmap: true, ..S };
        assert!(matches!(
            classify(&req(codec::CMD_BLOCK_STATUS, 0, 0, 4096), &bitmap_only),
            Action::BlockStatus { .. }
        ));
        assert!(matches!(
            classify(&req(codec::CMD_READ, codec::CMD_FLAG_DF, 0, 1), &simple),
            Action::Reject { .. }
        ));
        assert!(matches!(
            classify(&req(codec::CMD_BLOCK_STATUS, 0, 0, 1), &simple),
            Action::Reject { .. }
        ));
        let ro = Session { read_only: true, ..S };
        assert!(matches!(
            classify(&req(codec::CMD_WRITE, 0, 0, 9), &ro),
            Action::Reject { error: codec::EPERM, discard: 9, .. }
        ));
        assert!(matches!(
            classify(&req(99, 0, 0, 0), &S),
            Action::Reject { error: codec::EINVAL, .. }
        ));
        // "There is no reply to an NBD_CMD_DISC": not with a flag it does not take either.
        assert_eq!(
            classify(&req(codec::CMD_DISC, codec::CMD_FLAG_DF, 0, 0), &S),
            Action::Disconnect
        );
        let big = u64::from(S.max_payload) + 1;
        assert!(
            matches!(classify(&req(codec::CMD_WRITE, 0, 0, big), &Session { size_bytes: u64::MAX, ..S }),
            Action::Reject { error: codec::EINVAL, discard, .. } if discard == big)
        );
        assert_eq!(
            classify(
                &req(
                    codec::CMD_WRITE_ZEROES,
                    codec::CMD_FLAG_NO_HOLE | codec::CMD_FLAG_FAST_ZERO,
                    0,
                    8
                ),
                &S
            ),
            Action::WriteZeroes { offset: 0, len: 8, may_unmap: false, fast: true, fua: false }
        );
    }

    #[test]
    fn extended_headers_take_64_bit_effect_lengths() {
        let x = Session { framing: Framing::Extended, size_bytes: 16 << 30, ..S };
        // A trim, write zeroes and block status past 4 GiB in one request.
        assert_eq!(
            classify(&req(codec::CMD_TRIM, 0, 0, 8 << 30), &x),
            Action::Trim { offset: 0, len: 8 << 30, fua: false }
        );
        assert_eq!(
            classify(&req(codec::CMD_WRITE_ZEROES, codec::CMD_FLAG_FUA, 4096, 12 << 30), &x),
            Action::WriteZeroes {
                offset: 4096,
                len: 12 << 30,
                may_unmap: true,
                fast: false,
                fua: true
            }
        );
        assert_eq!(
            classify(&req(codec::CMD_BLOCK_STATUS, 0, 0, 16 << 30), &x),
            Action::BlockStatus { offset: 0, len: 16 << 30, req_one: false }
        );
        // ... still within the export.
        assert!(matches!(
            classify(&req(codec::CMD_TRIM, 0, 4096, 16 << 30), &x),
            Action::Reject { error: codec::EINVAL, discard: 0, .. }
        ));
        // Reads and writes stay within the maximum payload; a 64-bit length beyond 32 bits is
        // refused, not truncated to what fits.
        assert!(matches!(
            classify(&req(codec::CMD_READ, 0, 0, (1 << 32) + 4096), &x),
            Action::Reject { error: codec::EINVAL, discard: 0, .. }
        ));
        assert!(matches!(
            classify(&req(codec::CMD_WRITE, 0, 0, (1 << 32) + 4096), &x),
            Action::Abandon { .. }
        ));
        let over = u64::from(S.max_payload) + 1;
        assert!(matches!(classify(&req(codec::CMD_WRITE, 0, 0, over), &x), Action::Abandon { .. }));
        assert!(matches!(
            classify(&req(codec::CMD_WRITE, 0, 0, over), &S),
            Action::Reject { error: codec::EINVAL, discard, .. } if discard == over
        ));
        // PAYLOAD_LEN: a write's length is its payload's either way; another command that
        // says it carries one has it skipped and is refused (none offers one here).
        assert_eq!(
            classify(&req(codec::CMD_WRITE, codec::CMD_FLAG_PAYLOAD_LEN, 512, 8), &x),
            Action::Write { offset: 512, len: 8, fua: false }
        );
        assert!(matches!(
            classify(&req(codec::CMD_BLOCK_STATUS, codec::CMD_FLAG_PAYLOAD_LEN, 0, 16), &x),
            Action::Reject { error: codec::EINVAL, discard: 16, .. }
        ));
        assert!(matches!(
            classify(&req(codec::CMD_TRIM, codec::CMD_FLAG_PAYLOAD_LEN, 0, 1 << 40), &x),
            Action::Abandon { .. }
        ));
        // Without extended headers the bit is an unknown flag, and nothing follows.
        assert!(matches!(
            classify(&req(codec::CMD_WRITE, codec::CMD_FLAG_PAYLOAD_LEN, 0, 8), &S),
            Action::Reject { error: codec::EINVAL, discard: 8, .. }
        ));
        assert!(matches!(
            classify(&req(codec::CMD_FLUSH, codec::CMD_FLAG_PAYLOAD_LEN, 0, 8), &S),
            Action::Reject { error: codec::EINVAL, discard: 0, .. }
        ));
    }
}
