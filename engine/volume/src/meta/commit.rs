//! Commit bookkeeping: sealing pending records into journal blocks, what a commit or checkpoint
//! makes durable, when one is due (background policy), and the checkpoint's encoding.

use super::*;

impl PoolMeta {
    /// Sets the pending records after which a commit is due without a client's flush.
    pub fn set_commit_records(&mut self, records: usize) {
        self.commit_records = records.max(1);
    }

    /// Whether the driver should start a commit of its own now: at least `commit_records`
    /// records are pending and no commit is in flight or already asked for. True once per
    /// commit: the next seal clears it.
    pub fn take_background_commit(&mut self) -> bool {
        if self.background_asked || self.committing || self.failed.is_some() {
            return false;
        }
        if self.journal.pending() < self.commit_records {
            return false;
        }
        self.background_asked = true;
        true
    }

    /// Whether the driver should arm its commit timer now: records are pending and no timer is
    /// armed. The driver calls `commit_timer_fired` when it fires and commits what is pending
    /// then, so no record waits much longer than the timer for a commit, flush or none.
    pub fn take_commit_timer(&mut self) -> bool {
        if self.timer_armed || self.failed.is_some() || self.journal.pending() == 0 {
            return false;
        }
        self.timer_armed = true;
        true
    }

    /// The commit timer fired: whether records are still pending (commit them).
    pub fn commit_timer_fired(&mut self) -> bool {
        assert!(self.timer_armed, "a commit timer fired that was not armed");
        self.timer_armed = false;
        self.failed.is_none() && self.journal.pending() > 0
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
    /// used, or the pending records would not fit).
    pub fn wants_checkpoint(&self) -> bool {
        let free = self.journal.blocks_free();
        let ring = self.sb.journal_blocks;
        let pending_blocks = (self.journal.pending() as u64 * 40).div_ceil(3800) + 1;
        free < ring / 4 || pending_blocks > free
    }

    /// Starts a commit: takes the pending records as journal blocks. The caller makes the
    /// data durable (and earlier blocks), writes the blocks with FUA in order, then calls
    /// `commit_done`. `None` while another commit is in flight.
    pub fn seal(&mut self) -> Result<Option<Sealed>, PoolError> {
        self.ok()?;
        if self.committing {
            return Ok(None);
        }
        let records = self.journal.pending();
        let blocks = self.journal.commit()?;
        tracing::debug!(records, "sealing a commit");
        self.committing = true;
        self.background_asked = false;
        self.seals += 1;
        self.sealed_fresh = std::mem::take(&mut self.epoch_fresh);
        self.sealed_touched = std::mem::take(&mut self.epoch_touched);
        let frees = self.alloc.seal();
        self.sealed_frees = frees.len() as u64;
        Ok(Some(Sealed { blocks, frees }))
    }

    /// The sealed commit is durable.
    pub fn commit_done(&mut self, sealed: Sealed) {
        assert!(self.committing);
        self.committing = false;
        self.commits_done += 1;
        self.sealed_frees = 0;
        self.durable_seals = self.seals;
        self.sealed_fresh.clear();
        self.sealed_touched.clear();
        self.quarantine.push_back((self.io_epoch, sealed.frees));
        self.io_epoch += 1;
        self.release_quarantine();
        self.locks.commit_ended();
    }

    /// Encodes the whole state as records (the checkpoint): parents before children, each
    /// snapshot or clone as its creation record plus the entries where it differs from its
    /// parent, so loading it shares leaves the way the live trees do.
    pub fn checkpoint_payload(&self) -> Vec<u8> {
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
            let mine = v.tree.entries();
            match base {
                None => {
                    for (vc, e) in mine {
                        Record::MapSet { volume: id, vcluster: vc, entry: e.0 }.encode(&mut out);
                    }
                }
                Some(parent) => {
                    let theirs: BTreeMap<u64, Entry> = parent.entries().into_iter().collect();
                    let mine_map: BTreeMap<u64, Entry> = mine.into_iter().collect();
                    for (vc, e) in &mine_map {
                        if theirs.get(vc) != Some(e) {
                            Record::MapSet { volume: id, vcluster: *vc, entry: e.0 }
                                .encode(&mut out);
                        }
                    }
                    for vc in theirs.keys() {
                        if !mine_map.contains_key(vc) && *vc < v.tree.capacity() {
                            Record::MapSet { volume: id, vcluster: *vc, entry: 0 }.encode(&mut out);
                        }
                    }
                }
            }
        }
        out
    }

    /// Blocks of each metadata half.
    pub fn checkpoint_half_blocks(&self) -> u64 {
        self.sb.meta_blocks / 2
    }

    /// Starts a checkpoint of the current state: encodes it (header + records, padded to
    /// blocks) for the metadata half the live superblock does not name, and the superblock
    /// that will name it and move the journal head here. The pending records are covered by
    /// it (they need no journal block); the frees so far are sealed with it. Like a commit, no
    /// other commit runs until `checkpoint_done`. The caller then: flushes the media (the data
    /// of every mapped record), writes the blob, flushes, writes the superblock with FUA.
    /// `None` while a commit is in flight.
    pub fn begin_checkpoint(&mut self) -> Result<Option<Checkpoint>, PoolError> {
        self.ok()?;
        if self.committing {
            return Ok(None);
        }
        let payload = self.checkpoint_payload();
        let mut blob = Vec::with_capacity(payload.len() + BLOCK_SIZE);
        blob.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        blob.extend_from_slice(&payload);
        blob.resize(blob.len().next_multiple_of(BLOCK_SIZE), 0);
        // `admit` keeps the worst case inside the half, so this cannot fail on a sound pool.
        let limit = self.checkpoint_half_blocks() * BLOCK_SIZE as u64;
        assert!(blob.len() as u64 <= limit, "checkpoint of {} bytes exceeds its half", blob.len());
        let head = self.journal.head();
        let half = 1 - self.sb.checkpoint_half;
        let sb = Superblock {
            generation: self.sb.generation + 1,
            checkpoint_half: half,
            checkpoint_blocks: blob.len() as u64 / BLOCK_SIZE as u64,
            checkpoint_crc: crc32c::crc32c(&blob),
            checkpoint_seq: head.seq,
            journal_head_seq: head.seq,
            journal_head_block: head.block,
            journal_head_prev_crc: head.prev_crc,
            ..self.sb.clone()
        };
        self.journal.discard_pending();
        self.committing = true;
        self.background_asked = false;
        self.seals += 1;
        self.sealed_fresh = std::mem::take(&mut self.epoch_fresh);
        self.sealed_touched = std::mem::take(&mut self.epoch_touched);
        Ok(Some(Checkpoint {
            blob_offset: self.checkpoint_offset(half),
            blob,
            sb,
            frees: {
                let frees = self.alloc.seal();
                self.sealed_frees = frees.len() as u64;
                frees
            },
        }))
    }

    /// The checkpoint's superblock is durable.
    pub fn checkpoint_done(&mut self, c: Checkpoint) {
        assert!(self.committing);
        self.committing = false;
        self.checkpoints_done += 1;
        self.sealed_frees = 0;
        self.durable_seals = self.seals;
        self.sb = c.sb;
        // Nothing was written to the ring since `begin_checkpoint` (commits waited).
        self.journal.checkpointed();
        self.sealed_fresh.clear();
        self.sealed_touched.clear();
        self.quarantine.push_back((self.io_epoch, c.frees));
        self.io_epoch += 1;
        self.release_quarantine();
        self.locks.commit_ended();
    }

    /// Metadata area byte offset of checkpoint half `half`.
    pub fn checkpoint_offset(&self, half: u8) -> u64 {
        (self.sb.meta_start + u64::from(half) * self.checkpoint_half_blocks()) * BLOCK_SIZE as u64
    }
}
