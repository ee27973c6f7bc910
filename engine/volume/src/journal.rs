//! The journal writer: records accumulate in memory and a commit turns them into chained,
//! self-validating log blocks at the ring's next positions (docs/VOLUMES.md). Pure: it returns
//! the blocks to write (with FUA); the caller orders them after the data they describe.
//!
//! A commit is made in two steps so that the pool state is held only for the cheap one:
//! [`JournalWriter::reserve`] takes the pending records and places them in ring blocks
//! (counted from their lengths: positions and sequence numbers are known at once), and
//! [`JournalBatch::encode`] — pure CPU work on what it owns, anywhere — writes and checksums
//! the blocks. Each block chains to its predecessor's crc, which only encoding learns, so the
//! writer takes the batch's last crc back ([`JournalWriter::chained`]) before the next
//! reservation or checkpoint head. A seal places first and reserves after
//! ([`JournalWriter::plan_room`], [`JournalWriter::reserve_planned`]): it learns whether the
//! records fit before it moves the families' records in (`reserve` does both at once, for the
//! tests).
//!
//! Invariants:
//! - blocks carry consecutive sequence numbers and each chains to its predecessor's crc, so
//!   replay (`format::replay`) returns exactly a prefix of what was committed;
//! - the writer never overwrites blocks that replay still needs: `blocks_free` counts ring
//!   blocks since the last checkpoint, and a commit that would not fit is refused (the caller
//!   checkpoints first);
//! - at most one reservation is unchained (asserted): the next one, and `head`, need its crc;
//! - a commit with no records writes nothing;
//! - `records` counts the records in `runs`; a planned reservation is for exactly those.

use super::format::{JournalBlock, JOURNAL_PAYLOAD_MAX};
use super::records::{pack_planned, Planner, Record, MAP_SET_LEN};

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
    /// Blocks written or reserved since the checkpoint that replay starts from.
    used_blocks: u64,
    /// The pending records, in order: runs moved in whole (`append_map_sets`, a family's
    /// data records, without a copy) and runs of single records (`append`).
    runs: Vec<Run>,
    /// Records in `runs`.
    records: usize,
    /// A reservation's blocks are placed but not encoded: `prev_crc` is not known yet.
    unchained: bool,
}

/// Where pending records (and mapping records to follow them) would go: payloads and their
/// record counts ([`JournalWriter::plan_room`]), for [`JournalWriter::reserve_planned`].
pub struct Planned {
    plan: Vec<usize>,
    records: usize,
}

/// Pending records: a family's mapping records (all [`MAP_SET_LEN`] bytes: placed in blocks
/// in one step per block, `Planner::uniform`), or single records of any kind.
struct Run {
    records: Vec<Record>,
    map_sets: bool,
}

/// One commit's records and the ring blocks reserved for them: what [`JournalBatch::encode`]
/// turns into blocks, off the pool state.
pub struct JournalBatch {
    pool_uuid: [u8; 16],
    incarnation: u64,
    ring_blocks: u64,
    /// Where the first block goes, its sequence number, and the crc it chains to.
    first: JournalHead,
    /// The records, in order, in the runs they were gathered in.
    runs: Vec<Run>,
    /// Records per block ([`Planner`]).
    plan: Vec<usize>,
}

/// An encoded [`JournalBatch`]: `(ring block index, 4 KiB)` to write in order, and the crc the
/// next commit's first block chains to.
pub struct JournalBlocks {
    pub blocks: Vec<(u64, Vec<u8>)>,
    pub last_crc: u32,
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
            runs: Vec::new(),
            records: 0,
            unchained: false,
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
        self.records += 1;
        match self.runs.last_mut() {
            Some(run) if !run.map_sets => run.records.push(record),
            _ => self.runs.push(Run { records: vec![record], map_sets: false }),
        }
    }

    /// Appends a family's mapping records after the pending ones, in order, taking the vector
    /// itself (no record is copied, none is looked at: a commit's pause does not grow with its
    /// records); leaves it empty.
    pub fn append_map_sets(&mut self, records: &mut Vec<Record>) {
        if records.is_empty() {
            return;
        }
        debug_assert!(records.iter().all(|r| matches!(r, Record::MapSet { .. })));
        self.records += records.len();
        self.runs.push(Run { records: std::mem::take(records), map_sets: true });
    }

    pub fn pending(&self) -> usize {
        self.records
    }

    /// Ring blocks that may still be written before a checkpoint.
    pub fn blocks_free(&self) -> u64 {
        self.ring_blocks - self.used_blocks
    }

    /// Where the next commit starts: a checkpoint taken now records this as the new head.
    pub fn head(&self) -> JournalHead {
        assert!(!self.unchained, "the head of a journal whose last blocks are not encoded");
        JournalHead { block: self.next_block, seq: self.next_seq, prev_crc: self.prev_crc }
    }

    /// A checkpoint holds the pending records' effects: they need no journal block.
    pub fn discard_pending(&mut self) {
        self.runs.clear();
        self.records = 0;
    }

    /// A checkpoint made everything before `head()` redundant: the whole ring is free again.
    pub fn checkpointed(&mut self) {
        self.used_blocks = 0;
    }

    /// Room for `runs` more runs of mapping records (a seal appends one per family).
    pub fn expect_runs(&mut self, runs: usize) {
        self.runs.reserve(runs);
    }

    /// The payloads (records per block) of the pending records with `more_map_sets` mapping
    /// records after them. Consecutive runs of mapping records are placed as one: records of
    /// one length fill payloads alike however they are grouped.
    fn plan(&self, more_map_sets: usize) -> Vec<usize> {
        let mut planner = Planner::new(JOURNAL_PAYLOAD_MAX);
        let mut map_sets = 0;
        for run in &self.runs {
            if run.map_sets {
                map_sets += run.records.len();
            } else {
                planner.uniform(map_sets, MAP_SET_LEN);
                map_sets = 0;
                planner.each(&run.records);
            }
        }
        planner.uniform(map_sets + more_map_sets, MAP_SET_LEN);
        planner.finish()
    }

    /// Where the pending records, and `more_map_sets` mapping records appended after them,
    /// would go; refused as [`JournalWriter::reserve`] refuses. A seal plans before it moves
    /// the families' records (so a refusal moves nothing), then reserves what it planned.
    pub fn plan_room(&self, more_map_sets: usize) -> Result<Planned, JournalError> {
        let records = self.records + more_map_sets;
        if records == 0 {
            return Ok(Planned { plan: Vec::new(), records });
        }
        let plan = self.plan(more_map_sets);
        let needed = plan.len() as u64;
        if needed > self.blocks_free() {
            return Err(JournalError::Full { needed, free: self.blocks_free() });
        }
        Ok(Planned { plan, records })
    }

    /// Takes the pending records and reserves the ring blocks they fill: the batch to encode
    /// ([`JournalBatch::encode`]) and write in order, then [`JournalWriter::chained`]. `None`
    /// when nothing is pending; refused when the blocks would overrun what replay still needs.
    /// (The seal plans and reserves in two steps; this is both, for the tests.)
    #[cfg(test)]
    pub fn reserve(&mut self) -> Result<Option<JournalBatch>, JournalError> {
        let planned = self.plan_room(0)?;
        Ok(self.reserve_planned(planned))
    }

    /// [`JournalWriter::reserve`] with the placement [`JournalWriter::plan_room`] made, the
    /// mapping records it counted since appended (asserted by the count).
    pub fn reserve_planned(&mut self, planned: Planned) -> Option<JournalBatch> {
        assert!(!self.unchained, "a reservation before the last one's blocks were encoded");
        assert_eq!(planned.records, self.records, "a plan for other records");
        if self.records == 0 {
            return None;
        }
        let plan = planned.plan;
        let needed = plan.len() as u64;
        let first = self.head();
        self.next_seq += needed;
        self.next_block = (self.next_block + needed) % self.ring_blocks;
        self.used_blocks += needed;
        self.unchained = true;
        self.records = 0;
        Some(JournalBatch {
            pool_uuid: self.pool_uuid,
            incarnation: self.incarnation,
            ring_blocks: self.ring_blocks,
            first,
            runs: std::mem::take(&mut self.runs),
            plan,
        })
    }

    /// The last reservation is encoded: the next block chains to `last_crc`.
    pub fn chained(&mut self, last_crc: u32) {
        assert!(self.unchained, "chained without a reservation");
        self.prev_crc = last_crc;
        self.unchained = false;
    }

    /// Reserves, encodes and chains at once: the pending records as blocks to write in order.
    #[cfg(test)]
    pub fn commit(&mut self) -> Result<Vec<(u64, Vec<u8>)>, JournalError> {
        let Some(batch) = self.reserve()? else { return Ok(Vec::new()) };
        let encoded = batch.encode();
        self.chained(encoded.last_crc);
        Ok(encoded.blocks)
    }
}

impl JournalBatch {
    /// Blocks reserved.
    pub fn blocks(&self) -> usize {
        self.plan.len()
    }

    /// Records it holds.
    pub fn records(&self) -> usize {
        self.runs.iter().map(|r| r.records.len()).sum()
    }

    /// Encodes the records into their reserved blocks, each chained to the one before.
    pub fn encode(self) -> JournalBlocks {
        let records = self.runs.iter().flat_map(|r| &r.records);
        let payloads = pack_planned(records, &self.plan, JOURNAL_PAYLOAD_MAX);
        let mut blocks = Vec::with_capacity(payloads.len());
        let JournalHead { block: mut at, mut seq, prev_crc: mut crc } = self.first;
        for (i, payload) in payloads.into_iter().enumerate() {
            let block = JournalBlock {
                incarnation: self.incarnation,
                seq,
                prev_crc: crc,
                commit_start: i == 0,
                payload,
            };
            let (bytes, next) = block.encode(&self.pool_uuid);
            blocks.push((at, bytes));
            crc = next;
            seq += 1;
            at = (at + 1) % self.ring_blocks;
        }
        JournalBlocks { blocks, last_crc: crc }
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

    /// A commit in two steps: records appended while a reservation is being encoded go to the
    /// next commit, whose blocks follow and chain on; replay returns everything in order.
    #[test]
    fn records_arriving_while_a_commit_encodes_go_to_the_next() {
        let mut disk = SimDisk::new(RING * BLOCK_SIZE as u64, 1);
        let head = JournalHead { block: 14, seq: 7, prev_crc: 9 };
        let mut w = JournalWriter::new(UUID, 1, RING, head);
        // Single records of other lengths and whole runs (a family's, moved in), interleaved:
        // order kept, blocks placed as encoding fills them.
        let mut first: Vec<Record> = (0..400).map(map).collect();
        first[5] = Record::Delete { id: 3 };
        first[200] = Record::Config { key: "k".into(), value: "v".repeat(700) };
        for r in &first[..10] {
            w.append(r.clone());
        }
        w.append_map_sets(&mut first[10..200].to_vec());
        w.append(first[200].clone());
        let mut run = first[201..].to_vec();
        w.append_map_sets(&mut run);
        assert!(run.is_empty(), "the run was taken");
        w.append_map_sets(&mut Vec::new());
        assert_eq!(w.pending(), 400);
        let batch = w.reserve().unwrap().expect("records pending");
        assert_eq!((batch.records(), w.pending()), (400, 0));
        let blocks = batch.blocks() as u64;
        assert!(blocks >= 2, "spans blocks (and wraps the ring)");
        assert_eq!(w.blocks_free(), RING - blocks, "reserved at once");
        w.append(map(1000));
        let encoded = batch.encode();
        assert_eq!(encoded.blocks.len() as u64, blocks);
        assert_eq!(encoded.blocks[0].0, 14);
        assert_eq!(encoded.blocks[2].0, 0, "wrapped");
        disk.flush();
        for (i, bytes) in &encoded.blocks {
            disk.write(i * BLOCK_SIZE as u64, bytes, true);
        }
        w.chained(encoded.last_crc);
        let second = w.commit().unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].0, (14 + blocks) % RING, "follows the first commit's blocks");
        for (i, bytes) in &second {
            disk.write(i * BLOCK_SIZE as u64, bytes, true);
        }
        let mut all = first;
        all.push(map(1000));
        assert_eq!(replayed(&disk, head), all);
    }

    /// A writer with one reservation not yet chained.
    fn unchained() -> JournalWriter {
        let mut w =
            JournalWriter::new(UUID, 1, RING, JournalHead { block: 0, seq: 1, prev_crc: 0 });
        w.append(map(1));
        w.reserve().unwrap().expect("a record pending");
        w
    }

    #[test]
    #[should_panic(expected = "before the last one's blocks were encoded")]
    fn a_second_reservation_waits_for_the_first_to_chain() {
        let mut w = unchained();
        w.append(map(2));
        let _ = w.reserve();
    }

    #[test]
    #[should_panic(expected = "not encoded")]
    fn no_checkpoint_head_while_blocks_are_unchained() {
        let _ = unchained().head();
    }

    /// A seal plans before it moves the families' records: `plan_room(n)` refuses what does
    /// not fit and places what does as the records packed one by one would go, once `n`
    /// mapping records follow what is pending, around the ring's last block, however the
    /// records come in runs.
    #[test]
    fn room_planned_ahead_is_where_the_records_go() {
        let per_block = JOURNAL_PAYLOAD_MAX / MAP_SET_LEN;
        for n in [0, 1, per_block - 3, per_block - 2, per_block - 1, per_block, 2 * per_block] {
            let mut w =
                JournalWriter::new(UUID, 1, 2, JournalHead { block: 0, seq: 1, prev_crc: 0 });
            w.append(Record::Config { key: "k".into(), value: "v".repeat(40) });
            w.append_map_sets(&mut (0..3).map(map).collect());
            w.append(Record::Delete { id: 9 });
            let room = w.plan_room(n);
            assert_eq!(room.is_ok(), batch_blocks(n) <= 2, "{n} records in a ring of two");
            // The n records in runs of 1, 2, 3, ... (families of several sizes).
            let mut next = 0;
            for len in 1.. {
                if next == n {
                    break;
                }
                let end = (next + len).min(n);
                w.append_map_sets(&mut (next as u64..end as u64).map(map).collect());
                next = end;
            }
            let Ok(room) = room else { continue };
            let batch = w.reserve_planned(room).expect("records pending");
            assert_eq!(batch.records(), n + 5);
            assert_eq!(batch.encode().blocks.len(), batch_blocks(n), "{n} records");
        }
        // Nothing pending needs no room, even with no block free.
        let mut w = JournalWriter::new(UUID, 1, 2, JournalHead { block: 0, seq: 1, prev_crc: 0 });
        w.append(map(1));
        w.append(map(2));
        assert_eq!(w.commit().unwrap().len(), 1);
        w.append(map(3));
        assert_eq!(w.commit().unwrap().len(), 1);
        assert!(w.plan_room(0).is_ok());
        assert!(w.plan_room(1).is_err(), "the ring is full until a checkpoint");
    }

    /// Blocks of the test above's records, packed one by one (the reference placement).
    fn batch_blocks(n: usize) -> usize {
        let mut records = vec![Record::Config { key: "k".into(), value: "v".repeat(40) }];
        records.extend((0..3).map(map));
        records.push(Record::Delete { id: 9 });
        records.extend((0..n as u64).map(map));
        let mut planner = Planner::new(JOURNAL_PAYLOAD_MAX);
        planner.each(&records);
        planner.finish().len()
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
