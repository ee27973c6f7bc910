//! The commit pipeline as a state machine free of I/O: what one group commit (or checkpoint)
//! asks of the device, in order, and what it changes in the pool state when each step ends.
//!
//! A journal commit, once sealed ([`PoolMeta::seal`], which only moves the records and reserves
//! their blocks):
//! - `SyncData`: the sealed records are encoded into their blocks by the driver, without the
//!   pool state ([`DiskOp::Encode`]), while the media is flushed, so the data every sealed
//!   record maps — and every earlier journal block — is durable before any record naming it is;
//! - `WriteJournal`: the sealed journal blocks are written with FUA (all at once: replay stops
//!   at the first block that does not chain, so a torn tail is cut cleanly);
//! - done: [`PoolMeta::commit_done`] (frees of the commit quarantined, waiters woken).
//!
//! A checkpoint, once begun ([`PoolMeta::begin_checkpoint`], which freezes the state):
//! - `Encode`: the frozen state is encoded by the driver, on whatever thread it likes
//!   ([`DiskOp::Encode`]), while the media is flushed as in `SyncData`;
//! - `WriteBlob`: the encoded state goes to the inactive metadata half;
//! - `SyncBlob`: the media is flushed, so the blob is durable before anything names it;
//! - `WriteSuperblock`: the superblock naming the blob and the new journal head, with FUA;
//! - done: [`PoolMeta::checkpoint_done`].
//!
//! A failed step fails the pool ([`PoolMeta::fail`]): what is durable is unknown, so it takes
//! no more writes until reopened (replay decides). Invariant: one commit in flight per pool
//! (`PoolMeta` refuses a second seal), and a commit's device operations of one step are all
//! complete before the next step's are issued. The pool state is borrowed exclusively only
//! where a step changes it (the commit's end, a failure); a completion within a step, and the
//! next step's operations, need it shared at most.

use crate::format::BLOCK_SIZE;
use crate::meta::{Checkpoint, Encoded, PoolError, PoolMeta, Sealed};
use crate::request::{Access, Buf, Bufs, DiskOp, Issue};

/// What is being made durable.
enum Job {
    Journal(Sealed),
    Checkpoint(Box<Checkpoint>),
    /// Handed back to the pool state (the commit ended).
    Ended,
}

/// Where a commit stands; one doc line per state in the module header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    SyncData,
    Encode,
    WriteJournal,
    WriteBlob,
    SyncBlob,
    WriteSuperblock,
    Done,
}

/// One commit or checkpoint in flight. Its device operations carry `tag_base | n`.
pub struct Commit {
    job: Job,
    stage: Stage,
    outstanding: u32,
    /// First failure of the current step (negative errno, or a short transfer).
    error: Option<String>,
    tag_base: u32,
}

/// How a commit ended.
pub enum Finished {
    /// Durable (the pool state knows).
    Durable,
    /// It failed and failed the pool.
    Failed(PoolError),
}

/// Bytes of a checkpoint blob per device write (and per read at open: `pool::read_checkpoint`).
pub const BLOB_CHUNK: usize = 1 << 20;

/// A mutant for the simulator's own test (tests/e2e/sim_mutants.sh): commits skip the flush
/// that makes their data durable before the records naming it.
const DROP_FLUSH: bool = cfg!(feature = "mutant-drop-flush");

impl Commit {
    /// Seals the pending records (or begins a checkpoint, when asked or when the journal wants
    /// one) and issues the first step. `None` while another commit is in flight.
    pub fn begin<K: Bufs>(
        meta: &mut PoolMeta,
        bufs: &mut K,
        out: &mut Vec<Issue<K::B>>,
        tag_base: u32,
        checkpoint: bool,
    ) -> Result<Option<Commit>, PoolError> {
        let job = if checkpoint || meta.wants_checkpoint() {
            match meta.begin_checkpoint()? {
                Some(c) => Job::Checkpoint(Box::new(c)),
                None => return Ok(None),
            }
        } else {
            match meta.seal()? {
                Some(s) => Job::Journal(s),
                None => return Ok(None),
            }
        };
        let first = match job {
            Job::Journal(_) => Stage::SyncData,
            _ => Stage::Encode,
        };
        let mut c = Commit { job, stage: first, outstanding: 0, error: None, tag_base };
        c.issue(meta, bufs, out);
        assert!(c.outstanding > 0, "a commit's first step issues something");
        Ok(Some(c))
    }

    fn push<B>(&mut self, out: &mut Vec<Issue<B>>, op: DiskOp<B>) {
        out.push(Issue { tag: self.tag_base | self.outstanding, op });
        self.outstanding += 1;
    }

    /// Issues the operations of the current stage.
    fn issue<K: Bufs>(&mut self, meta: &PoolMeta, bufs: &mut K, out: &mut Vec<Issue<K::B>>) {
        assert_eq!(self.outstanding, 0, "a step starts when the previous one has ended");
        match self.stage {
            Stage::SyncData => {
                let Job::Journal(sealed) = &mut self.job else { unreachable!("journal stage") };
                let encode = sealed.take_encode();
                // The flush first, so a driver that submits as it goes has the device working
                // while it encodes. The mutant skips it where the commit has records.
                if !(DROP_FLUSH && encode.is_some()) {
                    self.push(out, DiskOp::Flush);
                }
                if let Some(job) = encode {
                    self.push(out, DiskOp::Encode(job));
                }
            }
            Stage::SyncBlob => self.push(out, DiskOp::Flush),
            Stage::Encode => {
                let Job::Checkpoint(c) = &mut self.job else { unreachable!("checkpoint stage") };
                let job = c.take_encode().expect("a checkpoint is encoded once");
                self.push(out, DiskOp::Encode(job));
                if !DROP_FLUSH {
                    self.push(out, DiskOp::Flush);
                }
            }
            Stage::WriteJournal => {
                let start = meta.superblock().journal_start;
                let Job::Journal(sealed) = &mut self.job else { unreachable!("journal stage") };
                assert!(!sealed.blocks().is_empty(), "journal blocks are written once encoded");
                let writes: Vec<(u64, K::B)> = sealed
                    .blocks()
                    .iter()
                    .map(|(index, bytes)| {
                        let mut b = bufs.get(BLOCK_SIZE);
                        b.as_mut_slice().copy_from_slice(bytes);
                        ((start + index) * BLOCK_SIZE as u64, b)
                    })
                    .collect();
                sealed.blocks_issued();
                for (offset, buf) in writes {
                    self.push(out, DiskOp::Write { offset, buf, fua: true });
                }
            }
            Stage::WriteBlob => {
                let Job::Checkpoint(c) = &self.job else { unreachable!("checkpoint stage") };
                assert!(c.is_encoded(), "the blob is written once encoded");
                // In pieces: one device I/O stays within what any backend takes at once (an
                // NVMe namespace splits an I/O into at most PARTS_MAX commands).
                let writes: Vec<(u64, K::B)> = c
                    .blob
                    .chunks(BLOB_CHUNK)
                    .enumerate()
                    .map(|(i, piece)| {
                        let mut b = bufs.get(piece.len());
                        b.as_mut_slice().copy_from_slice(piece);
                        (c.blob_offset + (i * BLOB_CHUNK) as u64, b)
                    })
                    .collect();
                for (offset, buf) in writes {
                    self.push(out, DiskOp::Write { offset, buf, fua: false });
                }
            }
            Stage::WriteSuperblock => {
                let Job::Checkpoint(c) = &self.job else { unreachable!("checkpoint stage") };
                let bytes = c.sb.encode();
                let mut b = bufs.get(bytes.len());
                b.as_mut_slice().copy_from_slice(&bytes);
                let offset = c.sb.slot() * BLOCK_SIZE as u64;
                self.push(out, DiskOp::Write { offset, buf: b, fua: true });
            }
            Stage::Done => unreachable!("nothing to issue when done"),
        }
    }

    /// One of this commit's operations completed (`n`: its index within the step). `Some`
    /// when the commit has ended.
    pub fn on_completion<K: Bufs>(
        &mut self,
        meta: &mut dyn Access,
        bufs: &mut K,
        out: &mut Vec<Issue<K::B>>,
        result: i32,
        buf: Option<K::B>,
    ) -> Option<Finished> {
        assert!(self.outstanding > 0, "completion of a commit step with nothing in flight");
        let expected = buf.as_ref().map_or(0, |b| b.len());
        if let Some(b) = buf {
            bufs.put(b);
        }
        if result < 0 || result as usize != expected {
            self.error.get_or_insert_with(|| {
                let what = match self.stage {
                    Stage::SyncData => "flush of the pool's data before a commit",
                    Stage::Encode => "flush of the pool's data before a checkpoint",
                    Stage::WriteJournal => "journal block write",
                    Stage::WriteBlob => "checkpoint write",
                    Stage::SyncBlob => "flush of a checkpoint",
                    Stage::WriteSuperblock => "superblock write",
                    Stage::Done => "commit",
                };
                if result < 0 {
                    format!("{what} failed: errno {}", -result)
                } else {
                    format!("{what} was short: {result} of {expected} bytes")
                }
            });
        }
        self.outstanding -= 1;
        self.step_ended(meta, bufs, out)
    }

    /// What this commit handed out as [`DiskOp::Encode`] (the checkpoint's frozen state, or
    /// the journal commit's records) is encoded. `Some` when the commit has ended.
    pub fn on_encoded<K: Bufs>(
        &mut self,
        meta: &mut dyn Access,
        bufs: &mut K,
        out: &mut Vec<Issue<K::B>>,
        encoded: Encoded,
    ) -> Option<Finished> {
        assert!(self.outstanding > 0, "an encoding not asked for");
        match (&mut self.job, encoded) {
            (Job::Checkpoint(c), Encoded::Checkpoint(e)) if self.stage == Stage::Encode => {
                c.encoded(e)
            }
            (Job::Journal(s), Encoded::Journal(e)) if self.stage == Stage::SyncData => s.encoded(e),
            _ => panic!("an encoding not asked for, at {:?}", self.stage),
        }
        self.outstanding -= 1;
        self.step_ended(meta, bufs, out)
    }

    /// After an operation of the current step ended: the next step once all have.
    fn step_ended<K: Bufs>(
        &mut self,
        meta: &mut dyn Access,
        bufs: &mut K,
        out: &mut Vec<Issue<K::B>>,
    ) -> Option<Finished> {
        if self.outstanding > 0 {
            return None;
        }
        if let Some(why) = self.error.take() {
            self.stage = Stage::Done;
            meta.exclusive().fail(why.clone());
            return Some(Finished::Failed(PoolError::Failed(why)));
        }
        self.stage = match self.stage {
            Stage::SyncData => Stage::WriteJournal,
            Stage::Encode => Stage::WriteBlob,
            Stage::WriteJournal => Stage::Done,
            Stage::WriteBlob => Stage::SyncBlob,
            Stage::SyncBlob => Stage::WriteSuperblock,
            Stage::WriteSuperblock => Stage::Done,
            Stage::Done => unreachable!("completion after the end"),
        };
        if self.stage == Stage::WriteJournal {
            let Job::Journal(sealed) = &self.job else { unreachable!() };
            if !sealed.has_blocks() {
                self.stage = Stage::Done;
            }
        }
        if self.stage != Stage::Done {
            self.issue(meta.shared(), bufs, out);
            return None;
        }
        let meta = meta.exclusive();
        let job = std::mem::replace(&mut self.job, Job::Ended);
        match job {
            Job::Journal(s) => meta.commit_done(s),
            Job::Checkpoint(c) => {
                tracing::info!(bytes = c.blob.len(), "checkpoint written");
                meta.checkpoint_done(*c)
            }
            Job::Ended => unreachable!("a commit ends once"),
        }
        Some(Finished::Durable)
    }
}
