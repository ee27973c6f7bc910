//! Transmission-phase request validation: a decoded request plus the negotiated session →
//! what to do. Pure, so every error path (ranges, flags, read-only) is unit-tested.

use crate::codec::{self, Request};

/// What the negotiation fixed for this connection.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    pub size_bytes: u64,
    pub read_only: bool,
    pub structured: bool,
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
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        may_unmap: bool,
        fast: bool,
        fua: bool,
    },
    Cache,
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
    Disconnect,
    /// Reply `error`; `discard` payload bytes follow the header and must be skipped.
    Reject {
        error: u32,
        discard: u32,
        why: &'static str,
    },
}

/// The flags each command takes. FUA is valid on every command (proto.md: with SEND_FUA
/// negotiated the server "MUST accept all commands with this bit set (even by ignoring the
/// bit)"; clients are known to set it on others): ignored where it means nothing.
fn allowed_flags(kind: u16) -> u16 {
    codec::CMD_FLAG_FUA
        | match kind {
            codec::CMD_READ => codec::CMD_FLAG_DF,
            codec::CMD_WRITE_ZEROES => codec::CMD_FLAG_NO_HOLE | codec::CMD_FLAG_FAST_ZERO,
            codec::CMD_BLOCK_STATUS => codec::CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// Decides what to do with `r`.
pub fn classify(r: &Request, s: &Session) -> Action {
    let discard = if r.kind == codec::CMD_WRITE { r.length } else { 0 };
    let reject = |error, why| Action::Reject { error, discard, why };
    if r.kind == codec::CMD_DISC {
        // "There is no reply to an NBD_CMD_DISC", whatever its flags.
        return Action::Disconnect;
    }
    if r.flags & !allowed_flags(r.kind) != 0 {
        return reject(codec::EINVAL, "flag not valid for this command");
    }
    if r.flags & codec::CMD_FLAG_DF != 0 && !s.structured {
        return reject(codec::EINVAL, "DF without structured replies");
    }
    let in_range = r.offset.checked_add(u64::from(r.length)).is_some_and(|end| end <= s.size_bytes);
    let writes = matches!(r.kind, codec::CMD_WRITE | codec::CMD_TRIM | codec::CMD_WRITE_ZEROES);
    if writes && s.read_only {
        return reject(codec::EPERM, "export is read-only");
    }
    let fua = r.flags & codec::CMD_FLAG_FUA != 0;
    match r.kind {
        codec::CMD_READ | codec::CMD_WRITE if r.length > s.max_payload => {
            reject(codec::EINVAL, "request larger than the maximum payload")
        }
        codec::CMD_READ if !in_range => reject(codec::EINVAL, "read beyond the end of the export"),
        codec::CMD_READ => {
            Action::Read { offset: r.offset, len: r.length, df: r.flags & codec::CMD_FLAG_DF != 0 }
        }
        codec::CMD_WRITE if !in_range => {
            reject(codec::ENOSPC, "write beyond the end of the export")
        }
        codec::CMD_WRITE => Action::Write { offset: r.offset, len: r.length, fua },
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
        structured: true,
        meta_allocation: true,
        meta_bitmap: false,
        max_payload: 32 << 20,
    };

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
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
        let simple = Session { structured: false, meta_allocation: false, ..S };
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
        let big = S.max_payload + 1;
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
}
