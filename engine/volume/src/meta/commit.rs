//! Commit bookkeeping: sealing pending records into journal blocks, what a commit or checkpoint
//! makes durable, when one is due (background policy), and the checkpoint's encoding.

use super::*;
use crate::map::{Freezer, FrozenTree};

impl PoolMeta {
    /// Sets the pending records after which a commit is due without a client's flush.
    pub fn set_commit_records(&mut self, records: usize) {
        self.commit_records = records.max(1);
    }

    /// Whether the driver should start a commit of its own now: at least `commit_records`
    /// records are pending and no commit is in flight or already asked for. True once per
    /// commit: the next seal clears it.
    pub fn take_background_commit(&mut self) -> bool {
        if !self.background_commit_due() {
            return false;
        }
        self.background_asked = true;
        true
    }

    /// Whether `take_background_commit` would start one now (a shared borrow may ask; the
    /// answer holds until the next exclusive borrow).
    pub fn background_commit_due(&self) -> bool {
        !self.background_asked
            && !self.committing
            && self.failed.is_none()
            && self.pending_records() >= self.commit_records
    }

    /// Whether the driver should arm its commit timer now: records are pending and no timer is
    /// armed. The driver calls `commit_timer_fired` when it fires and commits what is pending
    /// then, so no record waits much longer than the timer for a commit, flush or none.
    pub fn take_commit_timer(&mut self) -> bool {
        if !self.commit_timer_due() {
            return false;
        }
        self.timer_armed = true;
        true
    }

    /// Whether `take_commit_timer` would arm one now (a shared borrow may ask).
    pub fn commit_timer_due(&self) -> bool {
        !self.timer_armed && self.failed.is_none() && self.pending_records() > 0
    }

    /// The commit timer fired: whether records are still pending (commit them).
    pub fn commit_timer_fired(&mut self) -> bool {
        assert!(self.timer_armed, "a commit timer fired that was not armed");
        self.timer_armed = false;
        self.failed.is_none() && self.pending_records() > 0
    }

    pub fn committing(&self) -> bool {
        self.committing
    }

    pub fn seals(&self) -> u64 {
        self.seals
    }

    pub fn durable_seals(&self) -> u64 {
        self.durable_seals
    }

    /// Whether the next commit should be a checkpoint instead (the ring is three quarters
    /// used, or the pending records would not fit: placed as the seal would place them, so
    /// large records — configuration, names — are counted at their size, and a commit is
    /// never refused for a full ring that a checkpoint would empty).
    pub fn wants_checkpoint(&self) -> bool {
        let free = self.journal.blocks_free();
        let ring = self.sb.journal_blocks;
        let pending = self.family_pending.load(Ordering::Relaxed);
        free < ring / 4 || self.journal.plan_room(pending).is_err()
    }

    /// Starts a commit: takes the pending records as journal blocks. The caller makes the
    /// data durable (and earlier blocks), writes the blocks with FUA in order, then calls
    /// `commit_done`. `None` while another commit is in flight.
    ///
    /// Sealing only moves the records and reserves their ring blocks: their encoding, most of
    /// what a commit costs the CPU, is the driver's to run without the pool state
    /// ([`Sealed::take_encode`], [`Sealed::encoded`]).
    pub fn seal(&mut self) -> Result<Option<Sealed>, PoolError> {
        self.ok()?;
        if self.committing {
            return Ok(None);
        }
        let records = self.pending_records();
        // Refused before anything moves: the families' records go to the journal as the
        // families are sealed, in one visit each, where this places them.
        let room = self.journal.plan_room(*self.family_pending.get_mut())?;
        tracing::debug!(records, "sealing a commit");
        self.committing = true;
        self.background_asked = false;
        self.seals += 1;
        let frees = self.seal_families();
        let batch = self.journal.reserve_planned(room);
        let journal = batch.map_or(SealedJournal::Empty, SealedJournal::Reserved);
        Ok(Some(Sealed { journal, frees }))
    }

    /// The sealed commit is durable.
    pub fn commit_done(&mut self, sealed: Sealed) {
        assert!(self.committing);
        match &sealed.journal {
            SealedJournal::Empty => {}
            SealedJournal::Encoded(e) => self.journal.chained(e.last_crc),
            SealedJournal::Issued { last_crc } => self.journal.chained(*last_crc),
            _ => panic!("a commit's blocks are encoded before it is durable"),
        }
        self.committing = false;
        self.commits_done += 1;
        self.durable_seals = self.seals;
        self.end_families(sealed.frees);
    }

    /// The state a checkpoint encodes, frozen: one copy of each distinct mapping leaf (4 KiB
    /// per 512 volume clusters), a small part of what encoding costs.
    pub fn freeze(&self) -> Frozen {
        let mut seen = Freezer::default();
        let mut volumes = BTreeMap::new();
        // Family by family (only a family's volumes share leaves), each in id order.
        for fam in self.fams.values() {
            for (&id, v) in &fam.volumes {
                let frozen = FrozenVolume {
                    name: v.name.clone(),
                    size_bytes: v.size_bytes,
                    read_only: v.read_only,
                    parent: v.parent,
                    thick: v.thick,
                    clusters: v.size_bytes.div_ceil(self.geo.cluster_bytes),
                    tree: v.tree.freeze(&mut seen),
                };
                volumes.insert(id, frozen);
            }
        }
        Frozen { config: self.config.clone(), volumes }
    }

    /// Blocks of each metadata half.
    pub fn checkpoint_half_blocks(&self) -> u64 {
        self.sb.meta_blocks / 2
    }

    /// Starts a checkpoint of the current state: freezes it (to encode as header + records,
    /// padded to blocks, off the data path: `Checkpoint::take_encode`) for the metadata half
    /// the live superblock does not name, and the superblock that will name it and move the
    /// journal head here. The pending records are covered by
    /// it (they need no journal block); the frees so far are sealed with it. Like a commit, no
    /// other commit runs until `checkpoint_done`. The caller then: encodes the frozen state and
    /// flushes the media (the data of every mapped record), writes the blob, flushes, writes
    /// the superblock with FUA.
    /// `None` while a commit is in flight.
    pub fn begin_checkpoint(&mut self) -> Result<Option<Checkpoint>, PoolError> {
        self.ok()?;
        if self.committing {
            return Ok(None);
        }
        let head = self.journal.head();
        let half = 1 - self.sb.checkpoint_half;
        // A growth asked for is named here; its clusters are lent out once this is durable.
        let (total_blocks, cluster_count) =
            self.grow_to.unwrap_or((self.sb.total_blocks, self.sb.cluster_count));
        let sb = Superblock {
            generation: self.sb.generation + 1,
            total_blocks,
            cluster_count,
            checkpoint_half: half,
            // Filled in once the frozen state is encoded (`Checkpoint::encoded`).
            checkpoint_blocks: 0,
            checkpoint_crc: 0,
            checkpoint_seq: head.seq,
            journal_head_seq: head.seq,
            journal_head_block: head.block,
            journal_head_prev_crc: head.prev_crc,
            ..self.sb.clone()
        };
        self.committing = true;
        self.background_asked = false;
        self.seals += 1;
        // The checkpoint holds the pending records' effects: sealing gathers them, and the
        // journal drops them.
        let frees = self.seal_families();
        self.journal.discard_pending();
        Ok(Some(Checkpoint {
            blob_offset: self.checkpoint_offset(half),
            encode: Some(EncodeState {
                frozen: self.freeze(),
                limit: self.checkpoint_half_blocks() * BLOCK_SIZE as u64,
            }),
            blob: Vec::new(),
            sb,
            frees,
        }))
    }

    /// The checkpoint's superblock is durable.
    pub fn checkpoint_done(&mut self, c: Checkpoint) {
        assert!(self.committing);
        self.committing = false;
        self.checkpoints_done += 1;
        self.durable_seals = self.seals;
        self.sb = c.sb;
        // The superblock on the media names every cluster now: the new ones become free.
        let clusters = self.sb.cluster_count;
        if self.grow_to.is_some_and(|(_, c)| c <= clusters) {
            self.grow_to = None;
        }
        if clusters > self.refs.len() as u64 {
            tracing::info!(from = self.refs.len(), to = clusters, "pool grown: clusters");
            self.alloc.get_mut().grow(clusters);
            self.refs.grow(clusters);
        }
        debug_assert_eq!(self.alloc.get_mut().clusters(), self.refs.len() as u64);
        // Nothing was written to the ring since `begin_checkpoint` (commits waited).
        self.journal.checkpointed();
        self.end_families(c.frees);
    }

    /// Metadata area byte offset of checkpoint half `half`.
    pub fn checkpoint_offset(&self, half: u8) -> u64 {
        (self.sb.meta_start + u64::from(half) * self.checkpoint_half_blocks()) * BLOCK_SIZE as u64
    }
}

/// One volume as a checkpoint encodes it.
struct FrozenVolume {
    name: String,
    size_bytes: u64,
    read_only: bool,
    parent: u32,
    thick: bool,
    /// Volume clusters within its size: nothing is encoded beyond them.
    clusters: u64,
    tree: FrozenTree,
}

/// The state a checkpoint holds, frozen at `begin_checkpoint` ([`PoolMeta::freeze`]).
pub struct Frozen {
    config: BTreeMap<String, String>,
    volumes: BTreeMap<u32, FrozenVolume>,
}

impl Frozen {
    /// Encodes the state as records: parents before children, each snapshot or clone as its
    /// creation record plus the entries where it differs from its parent, so loading it shares
    /// leaves the way the live trees do.
    pub fn payload(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (key, value) in &self.config {
            Record::Config { key: key.clone(), value: value.clone() }.encode(&mut out);
        }
        for (&id, v) in &self.volumes {
            let base = match self.volumes.get(&v.parent) {
                Some(p) if v.parent < id => {
                    let r = if v.read_only {
                        Record::Snapshot { id, of: v.parent, name: v.name.clone() }
                    } else {
                        Record::Clone { id, of: v.parent, name: v.name.clone() }
                    };
                    r.encode(&mut out);
                    if p.size_bytes != v.size_bytes {
                        Record::Resize { id, size_bytes: v.size_bytes }.encode(&mut out);
                    }
                    Some(&p.tree)
                }
                _ => {
                    Record::VolumeCreate {
                        id,
                        parent: v.parent,
                        size_bytes: v.size_bytes,
                        name: v.name.clone(),
                    }
                    .encode(&mut out);
                    if v.read_only {
                        Record::ReadOnly { id }.encode(&mut out);
                    }
                    None
                }
            };
            let mut set = |vcluster: u64, e: Entry| {
                Record::MapSet { volume: id, vcluster, entry: e.0 }.encode(&mut out)
            };
            match base {
                None => v.tree.for_each_mapped(&mut set),
                // Within the volume's own size only: loading copies the parent's tree, and the
                // `Resize` above drops what lies beyond the end (a snapshot of a volume that
                // grew since maps none of the parent's later clusters out there).
                Some(parent) => v.tree.for_each_difference(parent, v.clusters, &mut set),
            }
        }
        // Thick volumes last: a `Snapshot` record loaded after one's `Thick` would make its
        // origin thin again (as a snapshot taken live does).
        for (&id, v) in &self.volumes {
            if v.thick {
                Record::Thick { id }.encode(&mut out);
            }
        }
        out
    }
}

/// CPU work a commit hands its driver: pure, over what the job owns (nothing the pool state
/// still touches), so the driver runs it without the pool state borrowed, on whatever thread it
/// likes ([`Encode::run`]), and hands the result back ([`crate::commit::Commit::on_encoded`]).
pub enum Encode {
    /// A checkpoint's frozen state: big (every mapping), best run away from the data cores.
    Checkpoint(EncodeState),
    /// A journal commit's records, their blocks reserved: at most a few hundred KiB.
    Journal(JournalBatch),
}

/// What an [`Encode`] made.
pub enum Encoded {
    Checkpoint(StateBlob),
    Journal(JournalBlocks),
}

impl Encode {
    pub fn run(self) -> Encoded {
        match self {
            Encode::Checkpoint(e) => Encoded::Checkpoint(e.run()),
            Encode::Journal(b) => Encoded::Journal(b.encode()),
        }
    }

    /// Whether it is worth a trip to another thread: a checkpoint is (milliseconds per
    /// hundred thousand mappings); a journal commit is not (tens of ns per record, less than
    /// the trip, and its core does nothing else meanwhile that the trip would let it do).
    pub fn off_core(&self) -> bool {
        matches!(self, Encode::Checkpoint(_))
    }
}

/// Encoding a checkpoint's frozen state.
pub struct EncodeState {
    frozen: Frozen,
    /// Bytes of the metadata half the blob must fit.
    limit: u64,
}

/// A checkpoint blob: header + records, padded to whole blocks, and its checksum.
pub struct StateBlob {
    blob: Vec<u8>,
    crc: u32,
}

impl EncodeState {
    pub fn run(self) -> StateBlob {
        let payload = self.frozen.payload();
        let mut blob = Vec::with_capacity(payload.len() + BLOCK_SIZE);
        blob.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        blob.extend_from_slice(&payload);
        blob.resize(blob.len().next_multiple_of(BLOCK_SIZE), 0);
        // `admit` keeps the worst case inside the half, so this cannot fail on a sound pool.
        assert!(
            blob.len() as u64 <= self.limit,
            "checkpoint of {} bytes exceeds its half of {}",
            blob.len(),
            self.limit
        );
        let crc = crc32c::crc32c(&blob);
        StateBlob { blob, crc }
    }
}

impl Checkpoint {
    /// The encoding still to run (once: the first call takes it).
    pub fn take_encode(&mut self) -> Option<Encode> {
        self.encode.take().map(Encode::Checkpoint)
    }

    /// The frozen state's encoding is done: the blob and the superblock naming it are ready.
    pub fn encoded(&mut self, e: StateBlob) {
        assert!(self.encode.is_none() && self.blob.is_empty(), "a checkpoint is encoded once");
        self.sb.checkpoint_blocks = e.blob.len() as u64 / BLOCK_SIZE as u64;
        self.sb.checkpoint_crc = e.crc;
        self.blob = e.blob;
    }

    /// Whether the blob is ready to write.
    pub fn is_encoded(&self) -> bool {
        !self.blob.is_empty()
    }
}

impl Sealed {
    /// The records' encoding still to run (once; `None` for a commit without records).
    pub fn take_encode(&mut self) -> Option<Encode> {
        match std::mem::replace(&mut self.journal, SealedJournal::Encoding) {
            SealedJournal::Reserved(b) => Some(Encode::Journal(b)),
            other => {
                self.journal = other;
                None
            }
        }
    }

    /// The records are encoded: the blocks are ready to write.
    pub fn encoded(&mut self, e: JournalBlocks) {
        assert!(
            matches!(self.journal, SealedJournal::Encoding),
            "a commit's records are encoded once, after they were taken"
        );
        self.journal = SealedJournal::Encoded(e);
    }

    /// Encodes the records here and now (a driver with nothing better to do meanwhile).
    pub fn encode_now(&mut self) {
        if let Some(Encode::Journal(b)) = self.take_encode() {
            self.encoded(b.encode());
        }
    }

    /// Whether there are blocks to write (once encoded).
    pub fn has_blocks(&self) -> bool {
        !matches!(self.journal, SealedJournal::Empty)
    }

    /// The blocks were copied into the device's write buffers: their bytes go now, off the
    /// exclusive borrow the commit's end takes, and only the chain's last crc stays.
    pub fn blocks_issued(&mut self) {
        if let SealedJournal::Encoded(e) = &self.journal {
            let last_crc = e.last_crc;
            self.journal = SealedJournal::Issued { last_crc };
        }
    }

    /// The blocks to write in order, `(ring block index, 4 KiB)`: empty until encoded, and
    /// again once issued (`blocks_issued`).
    pub fn blocks(&self) -> &[(u64, Vec<u8>)] {
        match &self.journal {
            SealedJournal::Encoded(e) => &e.blocks,
            _ => &[],
        }
    }
}
