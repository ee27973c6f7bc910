//! The journal writer: records accumulate in memory and a commit turns them into chained,
//! self-validating log blocks at the ring's next positions (docs/VOLUMES.md). Pure: it returns
//! the blocks to write (with FUA); the caller orders them after the data they describe.
//!
//! Invariants:
//! - blocks carry consecutive sequence numbers and each chains to its predecessor's crc, so
//!   replay (`format::replay`) returns exactly a prefix of what was committed;
//! - the writer never overwrites blocks that replay still needs: `blocks_free` counts ring
//!   blocks since the last checkpoint, and a commit that would not fit is refused (the caller
//!   checkpoints first);
//! - a commit with no records writes nothing.

use super::format::{JournalBlock, JOURNAL_PAYLOAD_MAX};
use super::records::{pack, Record};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("journal full: {needed} blocks needed, {free} free until the next checkpoint")]
    Full { needed: u64, free: u64 },
}

pub struct JournalWriter {
    pool_uuid: [u8; 16],
    incarnation: u64,
    ring_blocks: u64,
    next_block: u64,
    next_seq: u64,
    prev_crc: u32,
    /// Blocks written since the checkpoint that replay starts from.
    used_blocks: u64,
    pending: Vec<Record>,
}

/// Where replay must start: the state a checkpoint records in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalHead {
    pub block: u64,
    pub seq: u64,
    pub prev_crc: u32,
}

impl JournalWriter {
    /// A writer continuing after `head` (plus `replayed` blocks found valid after it).
    pub fn new(
        pool_uuid: [u8; 16],
        incarnation: u64,
        ring_blocks: u64,
        head: JournalHead,
    ) -> JournalWriter {
        assert!(ring_blocks >= 2);
        assert!(head.block < ring_blocks);
        JournalWriter {
            pool_uuid,
            incarnation,
            ring_blocks,
            next_block: head.block,
            next_seq: head.seq,
            prev_crc: head.prev_crc,
            used_blocks: 0,
            pending: Vec::new(),
        }
    }

    /// Continues after blocks that replay found (the last one's seq and crc).
    pub fn skip_replayed(&mut self, blocks: u64, last_seq: u64, last_crc: u32) {
        self.next_block = (self.next_block + blocks) % self.ring_blocks;
        self.next_seq = last_seq + 1;
        self.prev_crc = last_crc;
        self.used_blocks += blocks;
    }

    pub fn append(&mut self, record: Record) {
        self.pending.push(record);
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Ring blocks that may still be written before a checkpoint.
    pub fn blocks_free(&self) -> u64 {
        self.ring_blocks - self.used_blocks
    }

    /// Where the next commit starts: a checkpoint taken now records this as the new head.
    pub fn head(&self) -> JournalHead {
        JournalHead { block: self.next_block, seq: self.next_seq, prev_crc: self.prev_crc }
    }

    /// A checkpoint holds the pending records' effects: they need no journal block.
    pub fn discard_pending(&mut self) {
        self.pending.clear();
    }

    /// A checkpoint made everything before `head()` redundant: the whole ring is free again.
    pub fn checkpointed(&mut self) {
        self.used_blocks = 0;
    }

    /// Turns pending records into blocks: `(ring block index, 4 KiB)` to write in order.
    pub fn commit(&mut self) -> Result<Vec<(u64, Vec<u8>)>, JournalError> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let payloads = pack(&self.pending, JOURNAL_PAYLOAD_MAX);
        let needed = payloads.len() as u64;
        if needed > self.blocks_free() {
            return Err(JournalError::Full { needed, free: self.blocks_free() });
        }
        self.pending.clear();
        let mut out = Vec::with_capacity(payloads.len());
        for (i, payload) in payloads.into_iter().enumerate() {
            let block = JournalBlock {
                incarnation: self.incarnation,
                seq: self.next_seq,
                prev_crc: self.prev_crc,
                commit_start: i == 0,
                payload,
            };
            let (bytes, crc) = block.encode(&self.pool_uuid);
            out.push((self.next_block, bytes));
            self.prev_crc = crc;
            self.next_seq += 1;
            self.next_block = (self.next_block + 1) % self.ring_blocks;
            self.used_blocks += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::{replay, BLOCK_SIZE};
    use super::super::records::decode_all;
    use super::super::sim::{CrashMode, SimDisk};
    use super::*;

    const UUID: [u8; 16] = [5; 16];
    const RING: u64 = 16;

    fn map(i: u64) -> Record {
        Record::MapSet { volume: 1, vcluster: i, entry: i + 1 }
    }

    fn replayed(disk: &SimDisk, head: JournalHead) -> Vec<Record> {
        replay(&UUID, RING, head.block, head.seq, head.prev_crc, |i| {
            disk.read(i * BLOCK_SIZE as u64, BLOCK_SIZE)
        })
        .flat_map(|b| decode_all(&b.payload).unwrap())
        .collect()
    }

    /// Whatever a crash does to unflushed blocks, replay returns a prefix of the committed
    /// records that contains every record of a durable (flush + FUA) commit. Found while writing
    /// it: FUA alone is not enough, the blocks before it must be flushed first, or the chain
    /// breaks before the durable block.
    #[test]
    fn crash_leaves_a_prefix_holding_every_durable_commit() {
        for seed in 0..200u64 {
            let mut disk = SimDisk::new(RING * BLOCK_SIZE as u64, seed);
            let head = JournalHead { block: 3, seq: 100, prev_crc: 0 };
            let mut w = JournalWriter::new(UUID, 1, RING, head);
            let mut all = Vec::new();
            let mut durable = 0;
            for round in 0..6u64 {
                let n = 1 + (seed + round) % 400; // some rounds span several blocks
                for i in 0..n {
                    let r = map(round * 1000 + i);
                    all.push(r.clone());
                    w.append(r);
                }
                // A durable commit is the group commit of docs/VOLUMES.md: flush what came before
                // (data and earlier journal blocks), then write this commit's blocks with FUA.
                let fua = (seed + round) % 2 == 0;
                let Ok(blocks) = w.commit() else { break };
                if fua {
                    disk.flush();
                }
                for (i, bytes) in blocks {
                    disk.write(i * BLOCK_SIZE as u64, &bytes, fua);
                }
                if fua {
                    durable = all.len();
                }
            }
            let mode =
                [CrashMode::DropAll, CrashMode::ApplyAll, CrashMode::Random][(seed % 3) as usize];
            disk.crash(mode);
            let got = replayed(&disk, head);
            assert!(
                got.len() >= durable,
                "seed {seed}: lost durable records ({} < {durable})",
                got.len()
            );
            assert_eq!(&all[..got.len()], &got[..], "seed {seed}: replay is not a prefix");
        }
    }

    #[test]
    fn refuses_to_overrun_the_ring_until_checkpointed() {
        let mut w = JournalWriter::new(UUID, 1, 2, JournalHead { block: 0, seq: 1, prev_crc: 0 });
        for i in 0..1000 {
            w.append(map(i));
        }
        assert!(matches!(w.commit(), Err(JournalError::Full { .. })));
        let mut w = JournalWriter::new(UUID, 1, 2, JournalHead { block: 0, seq: 1, prev_crc: 0 });
        w.append(map(1));
        assert_eq!(w.commit().unwrap().len(), 1);
        w.append(map(2));
        assert_eq!(w.commit().unwrap()[0].0, 1);
        w.append(map(3));
        assert!(w.commit().is_err(), "would overwrite blocks replay needs");
        w.checkpointed();
        assert_eq!(w.commit().unwrap()[0].0, 0, "wraps after a checkpoint");
        assert!(w.commit().unwrap().is_empty());
    }
}
