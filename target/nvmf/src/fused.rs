//! Compare and fused Compare and Write (NVM Command Set 1.0 §3.2.1, Base 2.0 §3.4.2): the
//! rules that pair a queue's commands and the named steps a pair goes through; the queue
//! (`crate::queue`) moves the data and talks to the device.
//!
//! Invariants:
//! - a queue has at most one Compare waiting for its second command (`FUSE_FIRST` seen, the
//!   next capsule not yet): whatever the next capsule is, it either completes the pair or the
//!   waiting Compare is answered Command Aborted due to Missing Fused Command;
//! - a pair executes under its device's fence ([`ballast_engine::gate`]): the Compare's read,
//!   the comparison and the Write happen with no other write to the device in between, and the
//!   fence is lifted when the pair is dropped, whatever became of it;
//! - a pair's two answers follow its outcome: both succeed, or the one that failed carries
//!   the failure and the other Command Aborted due to Failed Fused Command.

use ballast_engine::gate::Fence;

use crate::identify::FUSED_MAX_BLOCKS;
use crate::nvme::{io, status, Sqe, Status, FUSE_FIRST, FUSE_NONE, FUSE_SECOND};

/// What a command with data to the controller becomes once its data is here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Anything but a Compare: a write goes to its device as it is.
    Plain,
    /// A Compare on its own: read, compared, answered.
    Compare,
    /// The first command of a fused pair (a Compare).
    FusedCompare,
    /// The second command of a fused pair (a Write).
    FusedWrite,
}

/// Where a fused pair is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Both capsules came; a command's data is still arriving (R2T/H2CData).
    AwaitData,
    /// Both commands' data is here; another pair holds the device's fence (or an earlier pair
    /// of this queue goes first).
    Fencing,
    /// The fence is up: the writes that went to the device before it are finishing.
    Draining,
    /// The Compare's range is being read.
    Reading,
    /// The data matched: the Write is at the device.
    Writing,
}

/// A fused Compare and Write of one queue: its commands' tags (their `cmds` slots) and step.
#[derive(Debug)]
pub struct Pair {
    pub compare: u32,
    pub write: u32,
    pub step: Step,
    /// Held from `Draining` on; dropped with the pair.
    pub fence: Option<Fence>,
}

/// How a capsule stands to the Compare waiting for its second command, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pairing {
    /// No pair involved: served as usual.
    Alone,
    /// A Compare opening a pair: it waits for the next capsule.
    Opens,
    /// The Write completing the waiting pair.
    Completes,
    /// Refused with this status (a waiting first command, if any, is aborted as missing
    /// its second).
    Refused(Status),
}

/// Decides what `sqe` is to a queue whose waiting first command is `first` (its SQE). A
/// waiting first command that does not get `Completes` is answered Command Aborted due to
/// Missing Fused Command by the caller, whatever this capsule becomes.
pub fn pairing(sqe: &Sqe, first: Option<&Sqe>) -> Pairing {
    match (sqe.fuse(), first) {
        (FUSE_NONE, _) => Pairing::Alone,
        (FUSE_FIRST, _) if sqe.opcode != io::COMPARE => Pairing::Refused(status::INVALID_OPCODE),
        // Longer than ACWU.
        (FUSE_FIRST, _) if sqe.nlb() > FUSED_MAX_BLOCKS => Pairing::Refused(status::INVALID_FIELD),
        (FUSE_FIRST, _) => Pairing::Opens,
        (FUSE_SECOND, None) => Pairing::Refused(status::ABORTED_MISSING_FUSED),
        (FUSE_SECOND, Some(_)) if sqe.opcode != io::WRITE => {
            Pairing::Refused(status::INVALID_OPCODE)
        }
        (FUSE_SECOND, Some(f))
            if f.nsid != sqe.nsid || f.slba() != sqe.slba() || f.nlb() != sqe.nlb() =>
        {
            // Both commands of a Compare and Write name the same blocks.
            Pairing::Refused(status::INVALID_FIELD)
        }
        (FUSE_SECOND, Some(_)) => Pairing::Completes,
        _ => Pairing::Refused(status::INVALID_FIELD),
    }
}

/// The Compare's verdict: the media's bytes `read` (all `expected.len()` of them) against the
/// host's.
pub fn verdict(read: &[u8], expected: &[u8]) -> Status {
    if read == expected {
        status::SUCCESS
    } else {
        status::COMPARE_FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::SqeBuilder;

    fn sqe(opcode: u8, fuse: u8, nsid: u32, slba: u64, nlb0: u32) -> Sqe {
        let mut raw = SqeBuilder {
            opcode,
            nsid,
            cdw: [slba as u32, (slba >> 32) as u32, nlb0, 0, 0, 0],
            ..Default::default()
        }
        .encode();
        raw[1] |= fuse;
        Sqe::decode(&raw)
    }

    #[test]
    fn a_pair_is_a_compare_then_a_write_of_the_same_blocks() {
        let first = sqe(io::COMPARE, FUSE_FIRST, 1, 8, 0);
        assert_eq!(pairing(&first, None), Pairing::Opens);
        // A second Compare opening a pair replaces the first (aborted by the caller).
        assert_eq!(pairing(&first, Some(&first)), Pairing::Opens);
        assert_eq!(
            pairing(&sqe(io::WRITE, FUSE_SECOND, 1, 8, 0), Some(&first)),
            Pairing::Completes
        );
        assert_eq!(pairing(&sqe(io::READ, FUSE_NONE, 1, 8, 0), Some(&first)), Pairing::Alone);
    }

    #[test]
    fn broken_pairs_are_refused_with_the_statuses_hosts_expect() {
        let first = sqe(io::COMPARE, FUSE_FIRST, 1, 8, 0);
        let refused = |s: Sqe, f: Option<&Sqe>| match pairing(&s, f) {
            Pairing::Refused(st) => st,
            other => panic!("{s:?}: {other:?}, expected a refusal"),
        };
        assert_eq!(refused(sqe(io::WRITE, FUSE_FIRST, 1, 8, 0), None), status::INVALID_OPCODE);
        assert_eq!(
            refused(sqe(io::WRITE, FUSE_SECOND, 1, 8, 0), None),
            status::ABORTED_MISSING_FUSED
        );
        assert_eq!(
            refused(sqe(io::READ, FUSE_SECOND, 1, 8, 0), Some(&first)),
            status::INVALID_OPCODE
        );
        for other in [
            sqe(io::WRITE, FUSE_SECOND, 2, 8, 0),
            sqe(io::WRITE, FUSE_SECOND, 1, 9, 0),
            sqe(io::WRITE, FUSE_SECOND, 1, 8, 1),
        ] {
            assert_eq!(refused(other, Some(&first)), status::INVALID_FIELD, "{other:?}");
        }
        assert_eq!(refused(sqe(io::COMPARE, 3, 1, 8, 0), None), status::INVALID_FIELD);
        let longest = FUSED_MAX_BLOCKS - 1;
        assert_eq!(pairing(&sqe(io::COMPARE, FUSE_FIRST, 1, 0, longest), None), Pairing::Opens);
        assert_eq!(
            refused(sqe(io::COMPARE, FUSE_FIRST, 1, 0, longest + 1), None),
            status::INVALID_FIELD
        );
    }

    #[test]
    fn a_compare_matches_only_equal_bytes() {
        assert_eq!(verdict(b"abc", b"abc"), status::SUCCESS);
        assert_eq!(verdict(b"abc", b"abd"), status::COMPARE_FAILURE);
    }
}
