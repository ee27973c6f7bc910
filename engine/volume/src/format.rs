//! On-media formats of a pool: the superblock and the journal's log blocks, byte for byte
//! (docs/VOLUMES.md). Pure: encoders and validating decoders over 4 KiB blocks; every decoder
//! checks magic, version, identity and crc32c before trusting a field, so damaged media yields
//! a typed error, never a panic.

pub const BLOCK_SIZE: usize = 4096;
pub const SUPER_MAGIC: &[u8; 8] = b"BALLASTP";
pub const FORMAT_VERSION: u32 = 1;
pub const JOURNAL_MAGIC: &[u8; 4] = b"BLJR";

/// Superblock field offsets, each derived from the previous one.
mod sb {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = MAGIC + 8;
    pub const BLOCK_SIZE: usize = VERSION + 4;
    pub const POOL_UUID: usize = BLOCK_SIZE + 4;
    pub const GENERATION: usize = POOL_UUID + 16;
    pub const INCARNATION: usize = GENERATION + 8;
    pub const CLUSTER_SHIFT: usize = INCARNATION + 8;
    pub const TOTAL_BLOCKS: usize = CLUSTER_SHIFT + 4;
    pub const META_START: usize = TOTAL_BLOCKS + 8;
    pub const META_BLOCKS: usize = META_START + 8;
    pub const JOURNAL_START: usize = META_BLOCKS + 8;
    pub const JOURNAL_BLOCKS: usize = JOURNAL_START + 8;
    pub const DATA_START: usize = JOURNAL_BLOCKS + 8;
    pub const CLUSTER_COUNT: usize = DATA_START + 8;
    pub const CHECKPOINT_HALF: usize = CLUSTER_COUNT + 8;
    pub const CHECKPOINT_BLOCKS: usize = CHECKPOINT_HALF + 1;
    pub const CHECKPOINT_CRC: usize = CHECKPOINT_BLOCKS + 8;
    pub const CHECKPOINT_SEQ: usize = CHECKPOINT_CRC + 4;
    pub const JOURNAL_HEAD_SEQ: usize = CHECKPOINT_SEQ + 8;
    pub const JOURNAL_HEAD_BLOCK: usize = JOURNAL_HEAD_SEQ + 8;
    pub const JOURNAL_HEAD_PREV_CRC: usize = JOURNAL_HEAD_BLOCK + 8;
    pub const CRC: usize = JOURNAL_HEAD_PREV_CRC + 4;
    pub const END: usize = CRC + 4;
}
const _: () = assert!(sb::END <= BLOCK_SIZE);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a ballast pool (bad magic)")]
    BadMagic,
    #[error("pool format version {0} is not supported (this build reads {FORMAT_VERSION})")]
    Version(u32),
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("block belongs to another pool")]
    OtherPool,
    #[error("field {field} is invalid: {why}")]
    Invalid { field: &'static str, why: &'static str },
    #[error("both superblock copies are damaged: A: {a}; B: {b}")]
    NoSuperblock { a: Box<FormatError>, b: Box<FormatError> },
    #[error("block is not {BLOCK_SIZE} bytes")]
    Size,
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The pool's root of trust, stored twice (blocks 0 and 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub pool_uuid: [u8; 16],
    pub generation: u64,
    pub incarnation: u64,
    pub cluster_shift: u32,
    pub total_blocks: u64,
    pub meta_start: u64,
    pub meta_blocks: u64,
    pub journal_start: u64,
    pub journal_blocks: u64,
    pub data_start: u64,
    pub cluster_count: u64,
    pub checkpoint_half: u8,
    pub checkpoint_blocks: u64,
    pub checkpoint_crc: u32,
    pub checkpoint_seq: u64,
    pub journal_head_seq: u64,
    pub journal_head_block: u64,
    /// The crc the journal block at the head chains to (the last block a checkpoint covers).
    pub journal_head_prev_crc: u32,
}

impl Superblock {
    /// Which copy (0 = A, 1 = B) this generation is written to.
    pub fn slot(&self) -> u64 {
        self.generation % 2
    }

    /// Checks that the regions are in order, inside the device, and not overlapping.
    pub fn validate(&self) -> Result<(), FormatError> {
        let bad = |field, why| Err(FormatError::Invalid { field, why });
        if !(14..=16).contains(&self.cluster_shift) {
            return bad("cluster_shift", "cluster size must be 16, 32 or 64 KiB");
        }
        if self.meta_start < 2 {
            return bad("meta_start", "overlaps the superblocks");
        }
        let meta_end = self.meta_start.checked_add(self.meta_blocks);
        if meta_end.is_none_or(|end| end > self.journal_start) {
            return bad("journal_start", "overlaps the metadata area");
        }
        let journal_end = self.journal_start.checked_add(self.journal_blocks);
        if self.journal_blocks < 2 || journal_end.is_none_or(|end| end > self.data_start) {
            return bad("data_start", "overlaps the journal (or journal too small)");
        }
        let cluster_blocks = 1u64 << (self.cluster_shift - 12);
        let data_end = self
            .cluster_count
            .checked_mul(cluster_blocks)
            .and_then(|n| n.checked_add(self.data_start));
        if data_end.is_none_or(|end| end > self.total_blocks) {
            return bad("cluster_count", "data area beyond the device");
        }
        if self.checkpoint_half > 1 || self.checkpoint_blocks > self.meta_blocks / 2 {
            return bad("checkpoint", "outside its metadata half");
        }
        if self.journal_head_block >= self.journal_blocks {
            return bad("journal_head_block", "outside the journal");
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        assert!(self.validate().is_ok(), "encoding an invalid superblock: {:?}", self.validate());
        let mut b = vec![0u8; BLOCK_SIZE];
        b[sb::MAGIC..sb::MAGIC + 8].copy_from_slice(SUPER_MAGIC);
        put_u32(&mut b, sb::VERSION, FORMAT_VERSION);
        put_u32(&mut b, sb::BLOCK_SIZE, BLOCK_SIZE as u32);
        b[sb::POOL_UUID..sb::POOL_UUID + 16].copy_from_slice(&self.pool_uuid);
        put_u64(&mut b, sb::GENERATION, self.generation);
        put_u64(&mut b, sb::INCARNATION, self.incarnation);
        put_u32(&mut b, sb::CLUSTER_SHIFT, self.cluster_shift);
        put_u64(&mut b, sb::TOTAL_BLOCKS, self.total_blocks);
        put_u64(&mut b, sb::META_START, self.meta_start);
        put_u64(&mut b, sb::META_BLOCKS, self.meta_blocks);
        put_u64(&mut b, sb::JOURNAL_START, self.journal_start);
        put_u64(&mut b, sb::JOURNAL_BLOCKS, self.journal_blocks);
        put_u64(&mut b, sb::DATA_START, self.data_start);
        put_u64(&mut b, sb::CLUSTER_COUNT, self.cluster_count);
        b[sb::CHECKPOINT_HALF] = self.checkpoint_half;
        put_u64(&mut b, sb::CHECKPOINT_BLOCKS, self.checkpoint_blocks);
        put_u32(&mut b, sb::CHECKPOINT_CRC, self.checkpoint_crc);
        put_u64(&mut b, sb::CHECKPOINT_SEQ, self.checkpoint_seq);
        put_u64(&mut b, sb::JOURNAL_HEAD_SEQ, self.journal_head_seq);
        put_u64(&mut b, sb::JOURNAL_HEAD_BLOCK, self.journal_head_block);
        put_u32(&mut b, sb::JOURNAL_HEAD_PREV_CRC, self.journal_head_prev_crc);
        let crc = crc32c::crc32c(&b[..sb::CRC]);
        put_u32(&mut b, sb::CRC, crc);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Superblock, FormatError> {
        if b.len() != BLOCK_SIZE {
            return Err(FormatError::Size);
        }
        if &b[sb::MAGIC..sb::MAGIC + 8] != SUPER_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let stored = get_u32(b, sb::CRC);
        let computed = crc32c::crc32c(&b[..sb::CRC]);
        if stored != computed {
            return Err(FormatError::Checksum { stored, computed });
        }
        let version = get_u32(b, sb::VERSION);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version(version));
        }
        if get_u32(b, sb::BLOCK_SIZE) as usize != BLOCK_SIZE {
            return Err(FormatError::Invalid { field: "block_size", why: "must be 4096" });
        }
        let mut pool_uuid = [0u8; 16];
        pool_uuid.copy_from_slice(&b[sb::POOL_UUID..sb::POOL_UUID + 16]);
        let s = Superblock {
            pool_uuid,
            generation: get_u64(b, sb::GENERATION),
            incarnation: get_u64(b, sb::INCARNATION),
            cluster_shift: get_u32(b, sb::CLUSTER_SHIFT),
            total_blocks: get_u64(b, sb::TOTAL_BLOCKS),
            meta_start: get_u64(b, sb::META_START),
            meta_blocks: get_u64(b, sb::META_BLOCKS),
            journal_start: get_u64(b, sb::JOURNAL_START),
            journal_blocks: get_u64(b, sb::JOURNAL_BLOCKS),
            data_start: get_u64(b, sb::DATA_START),
            cluster_count: get_u64(b, sb::CLUSTER_COUNT),
            checkpoint_half: b[sb::CHECKPOINT_HALF],
            checkpoint_blocks: get_u64(b, sb::CHECKPOINT_BLOCKS),
            checkpoint_crc: get_u32(b, sb::CHECKPOINT_CRC),
            checkpoint_seq: get_u64(b, sb::CHECKPOINT_SEQ),
            journal_head_seq: get_u64(b, sb::JOURNAL_HEAD_SEQ),
            journal_head_block: get_u64(b, sb::JOURNAL_HEAD_BLOCK),
            journal_head_prev_crc: get_u32(b, sb::JOURNAL_HEAD_PREV_CRC),
        };
        s.validate()?;
        Ok(s)
    }
}

/// Picks the live superblock from the two copies: the valid one with the higher generation.
/// Both copies must name the same pool when both are valid.
pub fn choose_superblock(a: &[u8], b: &[u8]) -> Result<Superblock, FormatError> {
    match (Superblock::decode(a), Superblock::decode(b)) {
        (Ok(x), Ok(y)) if x.pool_uuid != y.pool_uuid => Err(FormatError::OtherPool),
        (Ok(x), Ok(y)) => Ok(if y.generation > x.generation { y } else { x }),
        (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok(x),
        (Err(ea), Err(eb)) => Err(FormatError::NoSuperblock { a: Box::new(ea), b: Box::new(eb) }),
    }
}

/// Journal block header offsets.
mod jb {
    pub const MAGIC: usize = 0;
    pub const POOL_UUID: usize = MAGIC + 4;
    pub const INCARNATION: usize = POOL_UUID + 16;
    pub const SEQ: usize = INCARNATION + 8;
    pub const PREV_CRC: usize = SEQ + 8;
    pub const PAYLOAD_LEN: usize = PREV_CRC + 4;
    pub const PAYLOAD: usize = PAYLOAD_LEN + 4;
}
/// The block's own crc32c sits in its last 4 bytes.
const JB_CRC: usize = BLOCK_SIZE - 4;
/// Payload bytes one journal block can carry.
pub const JOURNAL_PAYLOAD_MAX: usize = JB_CRC - jb::PAYLOAD;

/// One journal block: a run of encoded records with its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalBlock {
    pub incarnation: u64,
    pub seq: u64,
    /// crc32c of the previous block (its stored crc), chaining the log.
    pub prev_crc: u32,
    /// The first block of a commit (stored as the top bit of the payload length). A commit
    /// starts only after every block of the previous one is durable, so a damaged block
    /// followed by the valid start of the next commit is damage, not a crash's torn tail.
    pub commit_start: bool,
    pub payload: Vec<u8>,
}

/// Top bit of the stored payload length: `commit_start`.
const JB_COMMIT_START: u32 = 1 << 31;

impl JournalBlock {
    /// Encodes the block; returns the bytes and the crc the next block must chain to.
    pub fn encode(&self, pool_uuid: &[u8; 16]) -> (Vec<u8>, u32) {
        assert!(self.payload.len() <= JOURNAL_PAYLOAD_MAX, "journal payload too large");
        let mut b = vec![0u8; BLOCK_SIZE];
        b[jb::MAGIC..jb::MAGIC + 4].copy_from_slice(JOURNAL_MAGIC);
        b[jb::POOL_UUID..jb::POOL_UUID + 16].copy_from_slice(pool_uuid);
        put_u64(&mut b, jb::INCARNATION, self.incarnation);
        put_u64(&mut b, jb::SEQ, self.seq);
        put_u32(&mut b, jb::PREV_CRC, self.prev_crc);
        let flag = if self.commit_start { JB_COMMIT_START } else { 0 };
        put_u32(&mut b, jb::PAYLOAD_LEN, self.payload.len() as u32 | flag);
        b[jb::PAYLOAD..jb::PAYLOAD + self.payload.len()].copy_from_slice(&self.payload);
        let crc = crc32c::crc32c(&b[..JB_CRC]);
        put_u32(&mut b, JB_CRC, crc);
        (b, crc)
    }

    /// Decodes and validates a block of `pool_uuid`; returns it and its own crc.
    pub fn decode(b: &[u8], pool_uuid: &[u8; 16]) -> Result<(JournalBlock, u32), FormatError> {
        if b.len() != BLOCK_SIZE {
            return Err(FormatError::Size);
        }
        if &b[jb::MAGIC..jb::MAGIC + 4] != JOURNAL_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let stored = get_u32(b, JB_CRC);
        let computed = crc32c::crc32c(&b[..JB_CRC]);
        if stored != computed {
            return Err(FormatError::Checksum { stored, computed });
        }
        if &b[jb::POOL_UUID..jb::POOL_UUID + 16] != pool_uuid {
            return Err(FormatError::OtherPool);
        }
        let raw_len = get_u32(b, jb::PAYLOAD_LEN);
        let len = (raw_len & !JB_COMMIT_START) as usize;
        if len > JOURNAL_PAYLOAD_MAX {
            return Err(FormatError::Invalid { field: "payload_len", why: "beyond the block" });
        }
        let block = JournalBlock {
            incarnation: get_u64(b, jb::INCARNATION),
            seq: get_u64(b, jb::SEQ),
            prev_crc: get_u32(b, jb::PREV_CRC),
            commit_start: raw_len & JB_COMMIT_START != 0,
            payload: b[jb::PAYLOAD..jb::PAYLOAD + len].to_vec(),
        };
        Ok((block, stored))
    }
}

/// Replays a ring: from the head (`seq`, chained to `prev_crc`), yields blocks in order until the
/// first one that is damaged, from another pool, out of sequence or not chained to its
/// predecessor. `read(i)` returns ring block `i`.
pub fn replay<'a>(
    pool_uuid: &'a [u8; 16],
    ring_blocks: u64,
    head_block: u64,
    head_seq: u64,
    mut prev_crc: u32,
    mut read: impl FnMut(u64) -> Vec<u8> + 'a,
) -> impl Iterator<Item = JournalBlock> + 'a {
    let mut seq = head_seq;
    let mut index = head_block;
    let mut remaining = ring_blocks;
    std::iter::from_fn(move || {
        if remaining == 0 {
            return None;
        }
        let bytes = read(index);
        let (block, crc) = JournalBlock::decode(&bytes, pool_uuid).ok()?;
        if block.seq != seq || block.prev_crc != prev_crc {
            return None;
        }
        prev_crc = crc;
        seq += 1;
        index = (index + 1) % ring_blocks;
        remaining -= 1;
        Some(block)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            pool_uuid: [7; 16],
            generation: 5,
            incarnation: 2,
            cluster_shift: 16,
            total_blocks: 262_144,
            meta_start: 2,
            meta_blocks: 1024,
            journal_start: 1026,
            journal_blocks: 1024,
            data_start: 2050,
            cluster_count: 16_000,
            checkpoint_half: 1,
            checkpoint_blocks: 10,
            checkpoint_crc: 0xdead_beef,
            checkpoint_seq: 100,
            journal_head_seq: 101,
            journal_head_block: 3,
            journal_head_prev_crc: 0xdead_beef,
        }
    }

    #[test]
    fn superblock_round_trip_and_layout() {
        let s = sample();
        let b = s.encode();
        assert_eq!(&b[..8], b"BALLASTP");
        assert_eq!(&b[8..16], &[1, 0, 0, 0, 0, 0x10, 0, 0]); // version 1, block size 4096
        assert_eq!(u64::from_le_bytes(b[32..40].try_into().unwrap()), 5); // generation
        assert_eq!(Superblock::decode(&b).unwrap(), s);
    }

    #[test]
    fn damaged_superblocks_are_refused_with_the_reason() {
        let good = sample().encode();
        let mut flipped = good.clone();
        flipped[100] ^= 1;
        assert!(matches!(Superblock::decode(&flipped), Err(FormatError::Checksum { .. })));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert_eq!(Superblock::decode(&magic), Err(FormatError::BadMagic));
        assert_eq!(Superblock::decode(&good[..100]), Err(FormatError::Size));
        // Newer generation wins; a damaged copy falls back to the other one.
        let newer = Superblock { generation: 6, ..sample() }.encode();
        assert_eq!(choose_superblock(&good, &newer).unwrap().generation, 6);
        assert_eq!(choose_superblock(&newer, &flipped).unwrap().generation, 6);
        assert!(matches!(
            choose_superblock(&flipped, &magic),
            Err(FormatError::NoSuperblock { .. })
        ));
        let other = Superblock { pool_uuid: [8; 16], ..sample() }.encode();
        assert_eq!(choose_superblock(&good, &other), Err(FormatError::OtherPool));
    }

    #[test]
    fn invalid_layouts_are_refused() {
        let overlap = Superblock { journal_start: 100, ..sample() };
        assert!(overlap.validate().is_err());
        let beyond = Superblock { cluster_count: 1 << 40, ..sample() };
        assert!(beyond.validate().is_err());
        let tiny_cluster = Superblock { cluster_shift: 12, ..sample() };
        assert!(tiny_cluster.validate().is_err());
    }

    #[test]
    fn replay_stops_at_the_first_stale_or_torn_block() {
        let uuid = [3u8; 16];
        let ring = 8u64;
        let mut blocks: Vec<Vec<u8>> = vec![vec![0u8; BLOCK_SIZE]; ring as usize];
        let mut prev = 0u32;
        for i in 0..5u64 {
            let jb = JournalBlock {
                incarnation: 1,
                seq: 10 + i,
                prev_crc: prev,
                commit_start: true,
                payload: vec![i as u8; 100],
            };
            let (bytes, crc) = jb.encode(&uuid);
            blocks[((6 + i) % ring) as usize] = bytes; // wraps around the ring end
            prev = crc;
        }
        let read = |i: u64| blocks[i as usize].clone();
        let seqs: Vec<u64> = replay(&uuid, ring, 6, 10, 0, read).map(|b| b.seq).collect();
        assert_eq!(seqs, vec![10, 11, 12, 13, 14]);
        // Tear block 12: replay ends before it.
        let mut torn = blocks.clone();
        torn[0][200] ^= 0xff;
        let seqs: Vec<u64> =
            replay(&uuid, ring, 6, 10, 0, |i| torn[i as usize].clone()).map(|b| b.seq).collect();
        assert_eq!(seqs, vec![10, 11]);
        // A stale block from an older pass (valid crc, wrong chain) also ends it.
        let (stale, _) = JournalBlock {
            incarnation: 1,
            seq: 12,
            prev_crc: 1,
            commit_start: true,
            payload: vec![],
        }
        .encode(&uuid);
        let mut chain = blocks.clone();
        chain[0] = stale;
        assert_eq!(replay(&uuid, ring, 6, 10, 0, |i| chain[i as usize].clone()).count(), 2);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), BLOCK_SIZE..=BLOCK_SIZE),
                                keep_magic: bool) {
            let mut bytes = bytes;
            if keep_magic {
                bytes[..8].copy_from_slice(SUPER_MAGIC);
            }
            let _ = Superblock::decode(&bytes);
            let _ = JournalBlock::decode(&bytes, &[0; 16]);
        }

        #[test]
        fn journal_round_trip(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..JOURNAL_PAYLOAD_MAX),
                              seq: u64, prev: u32) {
            let jb = JournalBlock { incarnation: 9, seq, prev_crc: prev, commit_start: seq % 2 == 0, payload };
            let (bytes, crc) = jb.encode(&[1; 16]);
            let (back, crc2) = JournalBlock::decode(&bytes, &[1; 16]).unwrap();
            proptest::prop_assert_eq!(back, jb);
            proptest::prop_assert_eq!(crc, crc2);
        }
    }
}
