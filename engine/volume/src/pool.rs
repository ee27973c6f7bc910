//! A pool of thin volumes over a synchronous disk. It formats and opens pools (superblock,
//! checkpoint, journal replay) for every user and serves the control-path operations (create,
//! snapshot, clone, rollback, resize, delete, checkpoint). Reads, writes, trims, flushes and
//! checkpoints are the volume core's [`Request`]s, run to completion by [`run`], a trivial
//! driver that carries out each device operation at once, in order — the same request code the
//! daemon's reactor adapter and the simulator drive asynchronously.
//!
//! Invariants (with those of `meta.rs` and `commit.rs`):
//! - a commit makes data and every earlier journal block durable (flush) before it writes its
//!   journal blocks with FUA, and frees become reusable only after;
//! - a checkpoint is written to the metadata half the live superblock does not name, flushed,
//!   and only then named by a new superblock (FUA): a crash at any point leaves the old
//!   checkpoint and its journal, or the new checkpoint, never a mix;
//! - opening reads nothing but the superblocks, one checkpoint and at most the journal ring.

use std::collections::VecDeque;

use super::commit::BLOB_CHUNK;
use super::format::{choose_superblock, replay, JournalBlock, Superblock, BLOCK_SIZE};
use super::locks::Waiter;
pub use super::meta::{PoolError, VolumeAttrs, PIECE};
use super::meta::{PoolMeta, CHECKPOINT_HEADER};
use super::ops::ControlOp;
use super::request::{Bufs, Cmd, Ctx, DiskOp, Issue, Outcome, Request};
use super::sim::SimDisk;

/// What the pool needs from a disk.
pub trait SyncDisk {
    fn read(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>>;
    fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()>;
    fn size_bytes(&self) -> u64;
}

impl SyncDisk for SimDisk {
    fn read(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        Ok(SimDisk::read(self, offset, len))
    }
    fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        SimDisk::write(self, offset, data, fua);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        SimDisk::flush(self);
        Ok(())
    }
    fn size_bytes(&self) -> u64 {
        SimDisk::size_bytes(self)
    }
}

/// Layout parameters for `Pool::format`.
#[derive(Debug, Clone)]
pub struct PoolGeometry {
    pub cluster_shift: u32,
    pub journal_blocks: u64,
    pub pool_uuid: [u8; 16],
    /// Volumes (snapshots and clones included) the metadata reserve is sized for.
    pub max_volumes: u64,
    /// Configuration bytes the metadata reserve is sized for.
    pub config_bytes: u64,
}

impl PoolGeometry {
    /// The defaults for a real pool: 64 KiB clusters, a 16 MiB journal.
    pub fn standard(pool_uuid: [u8; 16]) -> PoolGeometry {
        PoolGeometry {
            cluster_shift: 16,
            journal_blocks: 4096,
            pool_uuid,
            max_volumes: 4096,
            config_bytes: 1 << 20,
        }
    }
}

pub struct Pool<D: SyncDisk> {
    disk: D,
    meta: PoolMeta,
}

/// Where each region of a new pool goes.
pub fn layout(total_bytes: u64, g: &PoolGeometry) -> Result<Superblock, PoolError> {
    let total_blocks = total_bytes / BLOCK_SIZE as u64;
    let cluster_blocks = 1u64 << g.cluster_shift.clamp(12, 20).saturating_sub(12);
    let upper_clusters = total_blocks / cluster_blocks;
    let half_bytes =
        PoolMeta::checkpoint_reserve_bytes(upper_clusters, g.max_volumes, g.config_bytes);
    let half_blocks = half_bytes.div_ceil(BLOCK_SIZE as u64);
    let meta_start = 2;
    let meta_blocks = 2 * half_blocks;
    let journal_start = meta_start + meta_blocks;
    let data_start = (journal_start + g.journal_blocks).div_ceil(cluster_blocks) * cluster_blocks;
    let cluster_count = total_blocks.saturating_sub(data_start) / cluster_blocks;
    if cluster_count < 2 {
        return Err(PoolError::TooSmall {
            bytes: total_bytes,
            overhead: data_start * BLOCK_SIZE as u64,
        });
    }
    let sb = Superblock {
        pool_uuid: g.pool_uuid,
        generation: 1,
        incarnation: 1,
        cluster_shift: g.cluster_shift,
        total_blocks,
        meta_start,
        meta_blocks,
        journal_start,
        journal_blocks: g.journal_blocks,
        data_start,
        cluster_count,
        checkpoint_half: 0,
        checkpoint_blocks: 0,
        checkpoint_crc: 0,
        checkpoint_seq: 0,
        journal_head_seq: 1,
        journal_head_block: 0,
        journal_head_prev_crc: 0,
    };
    sb.validate()?;
    Ok(sb)
}

/// Replay stopped after `replayed` blocks: a crash's torn tail, or damage? A commit starts only
/// after the previous one is durable, so if the block after the stopping point is the valid
/// start of the next commit, the block replay stopped at was durable once and is now damaged:
/// opening would silently drop every record after it, so refuse instead.
fn check_journal_end<D: SyncDisk>(
    disk: &mut D,
    sb: &Superblock,
    replayed: u64,
) -> Result<(), PoolError> {
    if replayed + 1 >= sb.journal_blocks {
        return Ok(());
    }
    let stop = (sb.journal_head_block + replayed) % sb.journal_blocks;
    let next = (stop + 1) % sb.journal_blocks;
    let bytes = disk.read((sb.journal_start + next) * BLOCK_SIZE as u64, BLOCK_SIZE)?;
    let seq = sb.journal_head_seq + replayed;
    match JournalBlock::decode(&bytes, &sb.pool_uuid) {
        Ok((b, _)) if b.seq == seq + 1 && b.commit_start => Err(PoolError::Damaged(format!(
            "journal block {stop} (byte {}, sequence {seq}) is damaged but the commit after it \
             is intact: refusing to open rather than drop the records after it",
            (sb.journal_start + stop) * BLOCK_SIZE as u64
        ))),
        _ => Ok(()),
    }
}

/// Reads and checks the checkpoint `sb` names; returns its records' payload.
pub fn read_checkpoint<D: SyncDisk>(disk: &mut D, sb: &Superblock) -> Result<Vec<u8>, PoolError> {
    if sb.checkpoint_blocks == 0 {
        return Ok(Vec::new());
    }
    let half = sb.meta_blocks / 2;
    let at = (sb.meta_start + u64::from(sb.checkpoint_half) * half) * BLOCK_SIZE as u64;
    let total = sb.checkpoint_blocks * BLOCK_SIZE as u64;
    let mut blob = Vec::with_capacity(total as usize);
    for from in (0..total).step_by(BLOB_CHUNK) {
        let len = (total - from).min(BLOB_CHUNK as u64) as usize;
        blob.extend_from_slice(&disk.read(at + from, len)?);
    }
    let crc = crc32c::crc32c(&blob);
    let name = if sb.checkpoint_half == 0 { "A" } else { "B" };
    if crc != sb.checkpoint_crc {
        return Err(PoolError::Damaged(format!(
            "checkpoint (metadata half {name}, {} blocks at byte {at}) is damaged: crc32c \
             {crc:#010x}, the superblock recorded {:#010x}",
            sb.checkpoint_blocks, sb.checkpoint_crc
        )));
    }
    let len = u64::from_le_bytes(blob[..8].try_into().expect("8 bytes"));
    if len > blob.len() as u64 - CHECKPOINT_HEADER {
        return Err(PoolError::Damaged(format!("checkpoint {name} length {len} is invalid")));
    }
    Ok(blob[CHECKPOINT_HEADER as usize..(CHECKPOINT_HEADER + len) as usize].to_vec())
}

impl<D: SyncDisk> Pool<D> {
    /// Writes a new, empty pool over the whole disk.
    pub fn format(mut disk: D, g: PoolGeometry) -> Result<Pool<D>, PoolError> {
        let sb = layout(disk.size_bytes(), &g)?;
        // Invalidate whatever journal the disk held, then both superblock copies.
        let zero = vec![0u8; BLOCK_SIZE];
        disk.write(sb.journal_start * BLOCK_SIZE as u64, &zero, false)?;
        disk.flush()?;
        disk.write(BLOCK_SIZE as u64, &Superblock { generation: 0, ..sb.clone() }.encode(), true)?;
        disk.write(0, &sb.encode(), true)?;
        Self::open(disk)
    }

    /// Opens a pool: newest valid superblock, its checkpoint, then the journal from its head.
    pub fn open(mut disk: D) -> Result<Pool<D>, PoolError> {
        let a = disk.read(0, BLOCK_SIZE)?;
        let b = disk.read(BLOCK_SIZE as u64, BLOCK_SIZE)?;
        let sb = choose_superblock(&a, &b)?;
        let need = sb.total_blocks * BLOCK_SIZE as u64;
        if disk.size_bytes() < need {
            return Err(PoolError::Damaged(format!(
                "the pool was made for {need} bytes but the device now has {}: it was truncated \
                 or is the wrong device; refusing to open",
                disk.size_bytes()
            )));
        }
        let checkpoint = read_checkpoint(&mut disk, &sb)?;
        let mut meta = PoolMeta::new(sb.clone());
        meta.load(&checkpoint)?;
        let mut count = 0u64;
        let mut last = None;
        let mut io_error = None;
        let blocks: Vec<_> = {
            let start = sb.journal_start;
            let io_error = &mut io_error;
            let read = |i: u64| match disk.read((start + i) * BLOCK_SIZE as u64, BLOCK_SIZE) {
                Ok(b) => b,
                Err(e) => {
                    io_error.get_or_insert(e);
                    Vec::new() // ends replay; the error is returned below
                }
            };
            replay(
                &sb.pool_uuid,
                sb.journal_blocks,
                sb.journal_head_block,
                sb.journal_head_seq,
                sb.journal_head_prev_crc,
                read,
            )
            .collect()
        };
        if let Some(e) = io_error {
            return Err(e.into());
        }
        check_journal_end(&mut disk, &sb, blocks.len() as u64)?;
        for block in &blocks {
            meta.load(&block.payload)?;
            count += 1;
            last = Some((block.seq, block.encode(&sb.pool_uuid).1));
        }
        meta.loaded(count, last);
        Ok(Pool { disk, meta })
    }

    pub fn meta(&self) -> &PoolMeta {
        &self.meta
    }

    pub fn meta_mut(&mut self) -> &mut PoolMeta {
        &mut self.meta
    }

    pub fn volumes(&self) -> std::collections::BTreeMap<u32, VolumeAttrs> {
        self.meta.volumes()
    }

    pub fn free_clusters(&self) -> u64 {
        self.meta.free_clusters()
    }

    pub fn into_disk(self) -> D {
        self.disk
    }

    pub fn into_parts(self) -> (D, PoolMeta) {
        (self.disk, self.meta)
    }

    pub fn from_parts(disk: D, meta: PoolMeta) -> Pool<D> {
        Pool { disk, meta }
    }

    /// Group commit (or a checkpoint when the journal wants one).
    pub fn flush(&mut self) -> Result<(), PoolError> {
        run(&mut self.disk, &mut self.meta, 0, Cmd::Flush).map(drop)
    }

    /// Writes the whole state to the inactive metadata half and names it in a new superblock
    /// (the journal starts over from the current position).
    pub fn checkpoint(&mut self) -> Result<(), PoolError> {
        run(&mut self.disk, &mut self.meta, 0, Cmd::Checkpoint).map(drop)
    }

    /// Runs a control operation as the daemon does — the same request: freeze, apply, thaw,
    /// commit; then, for a deletion or rollback, the steps releasing the tree it retired
    /// ([`crate::ops::control`]) — and returns its result (the new volume's id, or 0).
    pub fn control(&mut self, op: ControlOp) -> Result<u32, PoolError> {
        crate::ops::control(self, op)
    }

    /// Decouples volume `id` from its parent or, with `inflate`, inflates it
    /// ([`crate::ops::decouple`], as the daemon does): the clusters copied.
    pub fn decouple(&mut self, id: u32, inflate: bool) -> Result<u64, PoolError> {
        let cb = self.meta.cluster_bytes();
        crate::ops::decouple(self, id, inflate, cb)
    }

    pub fn create_volume(&mut self, name: &str, size_bytes: u64) -> Result<u32, PoolError> {
        self.control(ControlOp::Create { name: name.into(), size_bytes, thick: false })
    }

    pub fn create_thick(&mut self, name: &str, size_bytes: u64) -> Result<u32, PoolError> {
        self.control(ControlOp::Create { name: name.into(), size_bytes, thick: true })
    }

    pub fn snapshot(&mut self, of: u32, name: &str) -> Result<u32, PoolError> {
        self.control(ControlOp::Snapshot { of, name: name.into() })
    }

    pub fn clone_volume(&mut self, of: u32, name: &str) -> Result<u32, PoolError> {
        self.control(ControlOp::Clone { of, name: name.into() })
    }

    pub fn rollback(&mut self, id: u32, to: u32) -> Result<(), PoolError> {
        self.control(ControlOp::Rollback { id, to }).map(drop)
    }

    pub fn resize(&mut self, id: u32, size_bytes: u64, force: bool) -> Result<(), PoolError> {
        self.control(ControlOp::Resize { id, size_bytes, force }).map(drop)
    }

    pub fn set_read_only(&mut self, id: u32) -> Result<(), PoolError> {
        self.control(ControlOp::SetReadOnly { id }).map(drop)
    }

    /// Calls volume `id` `name` (no configuration entries go with it here).
    pub fn rename(&mut self, id: u32, name: &str) -> Result<(), PoolError> {
        let (before, after) = (Vec::new(), Vec::new());
        self.control(ControlOp::Rename { id, name: name.into(), before, after }).map(drop)
    }

    pub fn delete(&mut self, id: u32) -> Result<(), PoolError> {
        self.control(ControlOp::Delete { id }).map(drop)
    }

    /// Grows the pool into what its disk now holds (`ControlOp::Grow`).
    pub fn grow(&mut self) -> Result<(), PoolError> {
        let total_bytes = self.disk.size_bytes();
        self.control(ControlOp::Grow { total_bytes }).map(drop)
    }

    pub fn read(&mut self, id: u32, offset: u64, len: u64) -> Result<Vec<u8>, PoolError> {
        let buf = vec![0u8; len as usize];
        let (_, buf) = run(&mut self.disk, &mut self.meta, id, Cmd::Read { offset, buf })?;
        Ok(buf.expect("a read hands its buffer back"))
    }

    pub fn write(&mut self, id: u32, offset: u64, data: &[u8]) -> Result<(), PoolError> {
        let cmd = Cmd::Write { offset, buf: data.to_vec(), fua: false };
        run(&mut self.disk, &mut self.meta, id, cmd).map(drop)
    }

    pub fn trim(&mut self, id: u32, offset: u64, len: u64) -> Result<(), PoolError> {
        run(&mut self.disk, &mut self.meta, id, Cmd::Discard { offset, len }).map(drop)
    }

    /// Every discrepancy between the live counts and what the trees say (empty when exact).
    pub fn check(&self) -> Result<(), String> {
        let problems = self.meta.check();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    pub fn leaked(&self) -> u64 {
        self.meta.leaked()
    }
}

/// Plain vectors as the core's buffers.
struct VecBufs;

impl Bufs for VecBufs {
    type B = Vec<u8>;
    fn get(&mut self, len: usize) -> Vec<u8> {
        vec![0u8; len]
    }
    fn put(&mut self, _buf: Vec<u8>) {}
}

impl<D: SyncDisk> crate::ops::Driver<Vec<u8>> for Pool<D> {
    fn look(
        &mut self,
        id: u32,
        from: u64,
        in_place: bool,
    ) -> Result<crate::ops::Sharing, PoolError> {
        crate::ops::Sharing::of(&self.meta, id, from, in_place)
    }

    fn room(&mut self, id: u32, inflate: bool) -> Result<(u64, u64), PoolError> {
        self.meta.decouple_room(id, inflate)
    }

    fn run(&mut self, vol: u32, cmd: Cmd<Vec<u8>>) -> Result<i32, PoolError> {
        run(&mut self.disk, &mut self.meta, vol, cmd).map(|(r, _)| r)
    }
}

/// Runs one request of volume `vol` (0 for a flush or checkpoint) to completion over a
/// synchronous disk: each device operation it asks for is carried out at once, in the order
/// asked. The caller holds `meta` exclusively, so nothing else is in flight and the request
/// never parks. The result (bytes or 0) and the command's buffer; a refusal or a device
/// error as a `PoolError`.
pub fn run<D: SyncDisk>(
    disk: &mut D,
    meta: &mut PoolMeta,
    vol: u32,
    cmd: Cmd<Vec<u8>>,
) -> Result<(i32, Option<Vec<u8>>), PoolError> {
    let mut bufs = VecBufs;
    let mut out = Vec::new();
    let mut queue = VecDeque::new();
    let mut io_error: Option<std::io::Error> = None;
    let mut req = Request::new(vol, cmd, Waiter(0));
    let mut outcome = req.start(&mut Ctx { meta, bufs: &mut bufs, out: &mut out });
    loop {
        queue.extend(out.drain(..));
        let mut woken = Vec::new();
        meta.take_woken(&mut woken);
        assert!(woken.is_empty(), "a synchronous pool parks nothing");
        if let Outcome::Done { result, buf } = outcome {
            assert!(queue.is_empty(), "a request finished with operations not yet run");
            if result < 0 {
                return Err(req
                    .take_failure()
                    .or(io_error.map(PoolError::Io))
                    .unwrap_or_else(|| PoolError::Io(std::io::Error::from_raw_os_error(-result))));
            }
            return Ok((result, buf));
        }
        assert!(!req.parked(), "a request parked on a synchronous pool: nothing would wake it");
        let Issue { tag, op } = queue.pop_front().expect("a pending request has work in flight");
        let ctx = &mut Ctx { meta, bufs: &mut bufs, out: &mut out };
        let (result, buf) = match op {
            DiskOp::Encode(job) => {
                outcome = req.on_encoded(ctx, tag, job.run());
                continue;
            }
            DiskOp::Read { offset, mut buf } => match disk.read(offset, buf.len()) {
                Ok(data) => {
                    buf.copy_from_slice(&data);
                    (buf.len() as i32, Some(buf))
                }
                Err(e) => (errno_of(&e, &mut io_error), Some(buf)),
            },
            DiskOp::Write { offset, buf, fua } => match disk.write(offset, &buf, fua) {
                Ok(()) => (buf.len() as i32, Some(buf)),
                Err(e) => (errno_of(&e, &mut io_error), Some(buf)),
            },
            DiskOp::Flush => match disk.flush() {
                Ok(()) => (0, None),
                Err(e) => (errno_of(&e, &mut io_error), None),
            },
        };
        outcome = req.on_completion(ctx, tag, result, buf);
    }
}

/// A device error as the negative errno a request sees; the first one kept for the caller.
fn errno_of(e: &std::io::Error, first: &mut Option<std::io::Error>) -> i32 {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    first.get_or_insert_with(|| std::io::Error::new(e.kind(), e.to_string()));
    -errno
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::CrashMode;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    const CLUSTER_SHIFT: u32 = 14; // 16 KiB clusters: 4 pieces, so copy-on-write paths are common
    const VOL_PIECES: u64 = 64; // 256 KiB volumes

    /// The tests' geometry: 16 KiB clusters, a journal ring of `journal_blocks`.
    fn geometry(journal_blocks: u64, uuid: u8) -> PoolGeometry {
        PoolGeometry {
            cluster_shift: CLUSTER_SHIFT,
            journal_blocks,
            pool_uuid: [uuid; 16],
            max_volumes: 64,
            config_bytes: 256,
        }
    }

    fn new_pool(seed: u64) -> Pool<SimDisk> {
        // A small ring, so that checkpoints and wrap-around happen in most cases.
        Pool::format(SimDisk::new(4 << 20, seed), geometry(16, 9)).unwrap()
    }

    /// A checkpoint of several MiB goes out and comes back in `BLOB_CHUNK` pieces, whole.
    #[test]
    fn a_checkpoint_larger_than_one_chunk_round_trips() {
        use crate::meta::mapped_entries;
        use crate::records::Record;
        let disk = SimDisk::new(8 << 30, 3);
        let (disk, formatted) =
            Pool::format(disk, PoolGeometry::standard([5; 16])).unwrap().into_parts();
        // ~2.5 MB of MapSet records: three chunks. The state is built as loading builds it
        // (mapping records are applied only while loading).
        let n = 120_000u64;
        let mut m = PoolMeta::new(formatted.superblock().clone());
        m.apply(&Record::VolumeCreate { id: 1, parent: 0, size_bytes: n << 16, name: "v".into() });
        for vc in 0..n {
            m.apply(&Record::MapSet { volume: 1, vcluster: vc, entry: (vc + 1) | (1 << 40) });
        }
        m.loaded(0, None);
        let mut p = Pool::from_parts(disk, m);
        let before = mapped_entries(p.meta(), 1);
        p.checkpoint().unwrap();
        let blocks = p.meta().superblock().checkpoint_blocks;
        assert!(blocks * BLOCK_SIZE as u64 > 2 * BLOB_CHUNK as u64, "{blocks} blocks");
        let p = Pool::open(p.into_disk()).unwrap();
        assert_eq!(mapped_entries(p.meta(), 1), before);
    }

    /// A snapshot taken while its origin was small (a one-level tree) is still its size after
    /// the origin grew and wrote beyond it and a checkpoint was loaded: a clone of it or a
    /// rollback to it, grown, reads zeros there (the checkpoint encodes a snapshot as its
    /// origin's tree and the differences; what lies beyond the snapshot's end went unnoticed,
    /// and it came back with the origin's later data, found by a review).
    #[test]
    fn a_snapshot_loaded_from_a_checkpoint_maps_nothing_beyond_its_end() {
        let mut p = Pool::format(SimDisk::new(64 << 20, 21), geometry(64, 9)).unwrap();
        let cb = 1u64 << CLUSTER_SHIFT;
        let small = 512 * cb; // one leaf: the tree's whole capacity
        let v = p.create_volume("v", small).unwrap();
        p.write(v, 0, &vec![1u8; PIECE as usize]).unwrap();
        let s = p.snapshot(v, "s").unwrap();
        // A second snapshot smaller than its tree's capacity, of a volume that then maps
        // clusters between its end and that capacity.
        let w = p.create_volume("w", 100 * cb).unwrap();
        let t = p.snapshot(w, "t").unwrap();
        p.resize(w, small, false).unwrap();
        for vc in 100..300 {
            p.write(w, vc * cb, &vec![3u8; PIECE as usize]).unwrap();
        }
        p.resize(v, 4 * small, false).unwrap();
        let far = 3 * small + 5 * cb;
        p.write(v, far, &vec![0xab; PIECE as usize]).unwrap();
        p.write(v, small - cb, &vec![2u8; PIECE as usize]).unwrap();
        // The checkpoint encodes no more mapping records per volume than its size has
        // clusters (what admission counts on): none for the snapshots' regions beyond their end.
        let records = crate::records::decode_all(&p.meta().freeze().payload()).unwrap();
        // s differs from v only at the cluster v wrote within s's size; t from w nowhere.
        for (id, size, want) in [(s, small, 1), (t, 100 * cb, 0)] {
            let n = records
                .iter()
                .filter(
                    |r| matches!(r, crate::records::Record::MapSet { volume, .. } if *volume == id),
                )
                .count() as u64;
            assert!(n <= size / cb, "volume {id}: {n} mapping records");
            assert_eq!(n, want, "volume {id}'s mapping records");
        }
        p.checkpoint().unwrap();
        let mut p = Pool::open(p.into_disk()).unwrap();
        p.check().unwrap();
        assert_eq!(p.read(s, 0, PIECE).unwrap(), vec![1u8; PIECE as usize]);
        assert_eq!(p.read(s, small - cb, PIECE).unwrap(), vec![0u8; PIECE as usize]);
        let u = p.clone_volume(t, "u").unwrap();
        p.resize(u, small, false).unwrap();
        assert_eq!(p.read(u, 200 * cb, PIECE).unwrap(), vec![0u8; PIECE as usize]);
        let c = p.clone_volume(s, "c").unwrap();
        p.resize(c, 4 * small, false).unwrap();
        assert_eq!(p.read(c, far, PIECE).unwrap(), vec![0u8; PIECE as usize], "clone, grown");
        p.rollback(v, s).unwrap();
        p.resize(v, 4 * small, false).unwrap();
        assert_eq!(p.read(v, far, PIECE).unwrap(), vec![0u8; PIECE as usize], "rolled back");
        p.check().unwrap();
        let baseline = {
            for id in [c, s, v, u, t, w] {
                p.delete(id).unwrap();
            }
            p.flush().unwrap();
            p.leaked()
        };
        assert_eq!(baseline, 0, "no cluster leaked");
    }

    #[test]
    fn snapshot_keeps_its_data_and_delete_returns_space() {
        let mut p = new_pool(1);
        let baseline = p.free_clusters();
        let v = p.create_volume("v", VOL_PIECES * PIECE).unwrap();
        p.write(v, 0, &vec![1u8; 3 * PIECE as usize]).unwrap();
        let s = p.snapshot(v, "s").unwrap();
        p.write(v, PIECE, &vec![2u8; PIECE as usize]).unwrap();
        assert_eq!(p.read(s, PIECE, PIECE).unwrap(), vec![1u8; PIECE as usize]);
        assert_eq!(p.read(v, PIECE, PIECE).unwrap(), vec![2u8; PIECE as usize]);
        assert_eq!(p.read(v, 0, PIECE).unwrap(), vec![1u8; PIECE as usize], "CoW carried piece 0");
        p.check().unwrap();
        let c = p.clone_volume(s, "c").unwrap();
        p.write(c, 0, &vec![3u8; PIECE as usize]).unwrap();
        assert_eq!(p.read(s, 0, PIECE).unwrap(), vec![1u8; PIECE as usize]);
        p.trim(v, 0, 4 * PIECE).unwrap();
        assert_eq!(p.read(v, 0, PIECE).unwrap(), vec![0u8; PIECE as usize]);
        p.flush().unwrap();
        for id in [c, s, v] {
            p.delete(id).unwrap();
        }
        p.check().unwrap();
        assert_eq!(
            (p.free_clusters(), p.leaked()),
            (baseline, 0),
            "space returns to the empty-pool baseline"
        );
        assert!(matches!(p.write(v, 0, &[0u8; 4096]), Err(PoolError::NoVolume(_))));
    }

    /// What a volume changed since its snapshot (and a clone since its origin), as NBD's
    /// dirty-bitmap context reports it: a cluster copied on write counts whole, a cluster
    /// only one side maps counts by its written pieces, trimmed pieces count, holes in both do
    /// not; another family's volume is refused.
    #[test]
    fn changes_since_a_snapshot_follow_the_mapping() {
        let mut p = new_pool(2);
        const P: u64 = PIECE;
        assert_eq!(p.meta().cluster_bytes(), 4 * P, "clusters of four pieces here");
        let v = p.create_volume("v", VOL_PIECES * P).unwrap();
        p.write(v, 0, &vec![1u8; 10 * P as usize]).unwrap();
        let s = p.snapshot(v, "s").unwrap();
        let all = VOL_PIECES * P;
        let runs = |p: &Pool<SimDisk>, a, b| p.meta().changes(a, b, 0, all, usize::MAX).unwrap();
        assert_eq!(runs(&p, v, s), vec![(0, all, false)], "nothing yet");
        // A write into piece 5 copies cluster 1 (pieces 4-7): its written pieces count.
        p.write(v, 5 * P, &vec![2u8; P as usize]).unwrap();
        // A write where the snapshot maps nothing: that piece alone.
        p.write(v, 40 * P, &vec![3u8; P as usize]).unwrap();
        assert_eq!(
            runs(&p, v, s),
            vec![
                (0, 4 * P, false),
                (4 * P, 4 * P, true),
                (8 * P, 32 * P, false),
                (40 * P, P, true),
                (41 * P, 23 * P, false)
            ]
        );
        // The other way round, the same runs; from inside the range, the same cut.
        assert_eq!(runs(&p, s, v), runs(&p, v, s));
        assert_eq!(
            p.meta().changes(v, s, 41 * P - 100, 2 * P, 2).unwrap(),
            vec![(41 * P - 100, 100, true), (41 * P, 2 * P - 100, false)]
        );
        // A clone of the snapshot starts the same as it; its own write shows against either.
        let c = p.clone_volume(s, "c").unwrap();
        assert_eq!(runs(&p, c, s), vec![(0, all, false)]);
        p.write(c, 20 * P, &vec![4u8; P as usize]).unwrap();
        assert_eq!(
            runs(&p, c, s),
            vec![(0, 20 * P, false), (20 * P, P, true), (21 * P, 43 * P, false)]
        );
        // Trimmed pieces the snapshot has written are changes (they read zeros now); pieces
        // of a shared cluster both still have are not; a trimmed piece neither has is not.
        p.trim(v, 40 * P, P).unwrap();
        p.trim(v, 0, 2 * P).unwrap();
        assert_eq!(
            runs(&p, v, s),
            vec![
                (0, 2 * P, true),
                (2 * P, 2 * P, false),
                (4 * P, 4 * P, true),
                (8 * P, 56 * P, false)
            ]
        );
        assert_eq!(runs(&p, v, v), vec![(0, all, false)]);
        assert_eq!(p.meta().kin(v), vec![(s, "s".to_string()), (c, "c".to_string())]);
        let w = p.create_volume("w", VOL_PIECES * P).unwrap();
        assert!(p.meta().kin(w).is_empty());
        assert!(matches!(
            p.meta().changes(v, w, 0, all, 8),
            Err(PoolError::OtherFamily { vol, base }) if (vol.id, base.id) == (v, w)
        ));
    }

    /// What a crash may leave: each volume's size, kind, parent and contents, by name.
    type Seen = BTreeMap<String, (u64, bool, u32, Vec<u8>)>;

    fn observe(p: &mut Pool<SimDisk>) -> Seen {
        let vols: Vec<(u32, String, u64, bool, u32)> = p
            .volumes()
            .iter()
            .map(|(id, v)| (*id, v.name.clone(), v.size_bytes, v.read_only, v.parent))
            .collect();
        vols.into_iter()
            .map(|(id, name, size, ro, parent)| {
                (name, (size, ro, parent, p.read(id, 0, size).unwrap()))
            })
            .collect()
    }

    /// A volume with data, a snapshot of it, more writes, a clone with its own writes; then
    /// `commits` small commits that move the journal head (across the ring's end, and into a
    /// checkpoint, as `commits` grows).
    fn sweep_setup(commits: u64) -> Pool<SimDisk> {
        let mut p = new_pool(7);
        let v = p.create_volume("v", VOL_PIECES * PIECE).unwrap();
        p.write(v, 0, &vec![1u8; 10 * PIECE as usize]).unwrap();
        let s = p.snapshot(v, "s").unwrap();
        p.write(v, 4 * PIECE, &vec![2u8; 6 * PIECE as usize]).unwrap();
        let c = p.clone_volume(s, "c").unwrap();
        p.write(c, 8 * PIECE, &vec![3u8; 2 * PIECE as usize]).unwrap();
        p.flush().unwrap();
        for i in 0..commits {
            let piece = 20 + i % 8;
            p.write(v, piece * PIECE, &vec![4u8; PIECE as usize]).unwrap();
            p.trim(v, piece * PIECE, PIECE).unwrap();
            p.flush().unwrap();
        }
        p
    }

    /// Crash-point sweep: cuts power after the 0th, 1st, … device I/O of `op` and crashes in
    /// every mode; the pool must open to exactly the state before or exactly the state after.
    fn sweep(name: &str, commits: u64, op: &dyn Fn(&mut Pool<SimDisk>)) {
        let mut clean = sweep_setup(commits);
        let before = observe(&mut clean);
        let start = clean.disk.ios;
        op(&mut clean);
        let ios = clean.disk.ios - start;
        let after = observe(&mut clean);
        let modes = [CrashMode::DropAll, CrashMode::ApplyAll, CrashMode::Random, CrashMode::Random];
        for cut in 0..=ios {
            for (k, mode) in modes.iter().enumerate() {
                let mut p = sweep_setup(commits);
                p.disk.power_cut_at = Some(p.disk.ios + cut);
                op(&mut p);
                let mut disk = p.into_disk();
                disk.reseed(cut * 16 + k as u64);
                disk.crash(*mode);
                let mut p = Pool::open(disk)
                    .unwrap_or_else(|e| panic!("{name}: cut after {cut}/{ios} I/Os: open: {e}"));
                let seen = observe(&mut p);
                assert!(
                    seen == before || seen == after,
                    "{name} (journal +{commits}): cut after {cut} of {ios} I/Os, {mode:?}: \
                     neither the state before nor after"
                );
                p.check().unwrap_or_else(|e| panic!("{name}: cut {cut}: {e}"));
                p.flush().unwrap();
                assert_eq!(p.leaked(), 0, "{name}: cut {cut}: leaked clusters");
            }
        }
    }

    fn id(p: &Pool<SimDisk>, name: &str) -> u32 {
        p.meta().find(name).unwrap()
    }

    #[test]
    fn crash_point_sweeps_are_all_or_nothing() {
        type OpFn = fn(&mut Pool<SimDisk>);
        let ops: [(&str, OpFn); 9] = [
            ("snapshot", |p| {
                p.snapshot(id(p, "v"), "s2").unwrap();
            }),
            ("clone", |p| {
                p.clone_volume(id(p, "s"), "c2").unwrap();
            }),
            ("delete origin", |p| p.delete(id(p, "v")).unwrap()),
            ("delete snapshot", |p| p.delete(id(p, "s")).unwrap()),
            ("grow", |p| p.resize(id(p, "v"), 2 * VOL_PIECES * PIECE, false).unwrap()),
            ("shrink", |p| p.resize(id(p, "v"), 2 * PIECE, true).unwrap()),
            ("rollback", |p| p.rollback(id(p, "v"), id(p, "s")).unwrap()),
            ("create", |p| {
                p.create_volume("n", 8 * PIECE).unwrap();
            }),
            ("checkpoint+snapshot", |p| {
                p.checkpoint().unwrap();
                p.snapshot(id(p, "c"), "s3").unwrap();
            }),
        ];
        for commits in [0, 5, 11, 14, 15, 16, 17] {
            for (name, op) in ops {
                sweep(name, commits, &op);
            }
        }
    }

    /// A pool made on the first 2 MiB of a disk, filled to its last cluster and flushed;
    /// then the disk grows to 4 MiB.
    fn grown_setup() -> (Pool<SimDisk>, u32) {
        let mut p = Pool::format(SimDisk::new(2 << 20, 3), geometry(16, 5)).unwrap();
        let v = p.create_volume("v", 8 << 20).unwrap();
        let mut piece = 0;
        while p.write(v, piece * PIECE, &vec![1 + (piece % 200) as u8; PIECE as usize]).is_ok() {
            piece += 1;
        }
        assert_eq!(p.free_clusters(), 0, "the pool is full");
        p.flush().unwrap();
        p.disk.grow(4 << 20);
        (p, v)
    }

    /// Growing, then writes only the new clusters can take, then a flush.
    fn grow_and_fill(p: &mut Pool<SimDisk>, v: u32) {
        p.grow().unwrap();
        let first_free = p.meta().superblock().cluster_count;
        assert!(first_free > 0 && p.free_clusters() > 0, "the grown pool has room");
        for piece in (3 << 20) / PIECE..(3 << 20) / PIECE + 24 {
            p.write(v, piece * PIECE, &vec![0xa0; PIECE as usize]).unwrap();
        }
        p.flush().unwrap();
    }

    #[test]
    fn a_pool_grows_into_its_device_and_a_crash_at_any_point_keeps_it_whole() {
        let (mut clean, v) = grown_setup();
        let old = clean.meta().superblock().clone();
        let before = observe(&mut clean);
        let start = clean.disk.ios;
        grow_and_fill(&mut clean, v);
        let ios = clean.disk.ios - start;
        let after = observe(&mut clean);
        let new = clean.meta().superblock().clone();
        assert!(new.cluster_count > 2 * old.cluster_count - 8, "{old:?} -> {new:?}");
        assert_eq!(new.total_blocks, (4 << 20) / BLOCK_SIZE as u64);
        assert_eq!((new.data_start, new.meta_blocks), (old.data_start, old.meta_blocks));
        clean.check().unwrap();
        // Reopened, the pool has its new size and every byte written.
        let mut reopened = Pool::open(clean.into_disk()).unwrap();
        assert_eq!(reopened.meta().superblock().cluster_count, new.cluster_count);
        assert_eq!(observe(&mut reopened), after);
        let modes = [CrashMode::DropAll, CrashMode::ApplyAll, CrashMode::Random, CrashMode::Random];
        let mut sizes_seen = BTreeSet::new();
        for cut in 0..=ios {
            for (k, mode) in modes.iter().enumerate() {
                let (mut p, v) = grown_setup();
                p.disk.power_cut_at = Some(p.disk.ios + cut);
                // Past the cut, device I/O does nothing: a commit's reads see it, not errors.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    grow_and_fill(&mut p, v)
                }));
                let mut disk = p.into_disk();
                disk.reseed(cut * 16 + k as u64);
                disk.crash(*mode);
                let mut p = Pool::open(disk)
                    .unwrap_or_else(|e| panic!("grow: cut after {cut}/{ios} I/Os: open: {e}"));
                let count = p.meta().superblock().cluster_count;
                assert!(count == old.cluster_count || count == new.cluster_count, "{count}");
                sizes_seen.insert(count);
                let seen = observe(&mut p);
                assert!(
                    seen == before || (seen == after && count == new.cluster_count),
                    "grow: cut after {cut} of {ios} I/Os, {mode:?}: neither before nor after"
                );
                p.check().unwrap_or_else(|e| panic!("grow: cut {cut}: {e}"));
                // Growing again (or for the first time) and filling the rest works.
                p.grow().unwrap();
                assert_eq!(p.meta().superblock().cluster_count, new.cluster_count);
                let v = id(&p, "v");
                let mut piece = (3 << 20) / PIECE;
                while p.write(v, piece * PIECE, &vec![7; PIECE as usize]).is_ok() {
                    piece += 1;
                }
                p.flush().unwrap();
                assert_eq!(
                    (p.free_clusters(), p.leaked()),
                    (0, 0),
                    "cut {cut}: every cluster used"
                );
                p.check().unwrap_or_else(|e| panic!("grow: cut {cut}, filled: {e}"));
            }
        }
        assert_eq!(sizes_seen.len(), 2, "crashes left both the old size and the new one");
    }

    #[test]
    fn a_pool_cannot_shrink_and_a_device_no_larger_changes_nothing() {
        let (mut p, _) = grown_setup();
        p.grow().unwrap();
        let grown = p.meta().superblock().clone();
        let checkpoints = p.meta().commits_done().1;
        p.grow().unwrap();
        assert_eq!(p.meta().superblock().cluster_count, grown.cluster_count, "same device");
        assert_eq!(p.meta().commits_done().1, checkpoints, "nothing to grow: no checkpoint");
        let (sb_bytes, free) = (grown.total_blocks * BLOCK_SIZE as u64, p.free_clusters());
        match p.meta_mut().grow(sb_bytes - BLOCK_SIZE as u64) {
            Err(e @ PoolError::DeviceShrank { .. }) => {
                assert!(e.to_string().contains("cannot shrink"), "{e}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(p.free_clusters(), free, "a refusal changes nothing");
        p.check().unwrap();
    }

    /// A device grown far beyond what the pool's metadata was sized for: the pool takes in
    /// the clusters it can ever use (its checkpoint's bound), not a count whose reference
    /// counts alone could exhaust memory at every later open.
    #[test]
    fn a_pool_grows_only_as_far_as_its_metadata_can_name() {
        let (mut p, v) = grown_setup();
        p.disk.grow(1 << 40); // 1 TiB: 2^26 clusters of 16 KiB
        p.grow().unwrap();
        let usable = p.meta().usable_clusters();
        assert!(usable < 1 << 20, "{usable}");
        assert_eq!(p.meta().superblock().cluster_count, usable);
        assert_eq!(p.meta().superblock().total_blocks, (1 << 40) / BLOCK_SIZE as u64);
        p.write(v, 5 << 20, &[9u8; PIECE as usize]).unwrap();
        p.flush().unwrap();
        let mut p = Pool::open(p.into_disk()).unwrap();
        assert_eq!(p.meta().superblock().cluster_count, usable);
        assert_eq!(p.read(v, 5 << 20, PIECE).unwrap(), vec![9u8; PIECE as usize]);
        p.check().unwrap();
    }

    /// A thick volume's creation and growth span several journal blocks (a thousand
    /// `MapSet`s); a power cut at every device operation of them, each crash mode: the pool
    /// opens with the volume absent (creation lost) or thick with every cluster mapped — what
    /// the crash left out is mapped at open, and kept by the next commit — never thin, never
    /// with a hole; references exact.
    #[test]
    fn a_thick_volume_cut_short_by_a_crash_is_completed_when_the_pool_opens() {
        const MIB: u64 = 1 << 20;
        let fresh = || Pool::format(SimDisk::new(32 * MIB, 5), geometry(64, 9)).unwrap();
        type Step = fn(&mut Pool<SimDisk>);
        let cases: [(&str, Step); 2] = [
            ("creation", |p| {
                p.create_thick("t", 16 * MIB).unwrap();
            }),
            ("growth", |p| {
                let t = p.meta().find("t").unwrap();
                p.resize(t, 16 * MIB, false).unwrap();
            }),
        ];
        for (what, step) in cases {
            let prepare = |p: &mut Pool<SimDisk>| {
                if what == "growth" {
                    p.create_thick("t", MIB).unwrap();
                }
                p.flush().unwrap();
            };
            let mut clean = fresh();
            prepare(&mut clean);
            let start = clean.disk.ios;
            step(&mut clean);
            let ios = clean.disk.ios - start;
            assert!(ios >= 5, "{what}: spans several journal blocks ({ios} I/Os)");
            let mut completed = 0;
            for cut in 0..=ios {
                for (k, mode) in
                    [CrashMode::DropAll, CrashMode::ApplyAll, CrashMode::Random].iter().enumerate()
                {
                    let mut p = fresh();
                    prepare(&mut p);
                    p.disk.power_cut_at = Some(p.disk.ios + cut);
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| step(&mut p)));
                    let mut disk = p.into_disk();
                    disk.reseed(cut * 8 + k as u64);
                    disk.crash(*mode);
                    let mut p = Pool::open(disk).unwrap();
                    completed += p.meta().thick_repairs().0;
                    assert_eq!(p.meta().thick_repairs().1, 0, "{what} cut {cut}: room enough");
                    let at = format!("{what}, cut {cut} {mode:?}");
                    p.check().unwrap_or_else(|e| panic!("{at}: {e}"));
                    assert_eq!(p.leaked(), 0, "{at}");
                    let Ok(t) = p.meta().find("t") else {
                        assert_eq!(what, "creation", "{at}: the volume lost");
                        continue;
                    };
                    let v = p.volumes()[&t].clone();
                    assert!(v.thick, "{at}: thin");
                    assert!(v.size_bytes == 16 * MIB || what == "growth", "{at}: {v:?}");
                    // Mapped at open, kept by a commit: opened again, nothing left to do.
                    p.flush().unwrap();
                    let p = Pool::open(p.into_disk()).unwrap();
                    assert_eq!(p.meta().thick_repairs(), (0, 0), "{at}: completed for good");
                    p.check().unwrap_or_else(|e| panic!("{at}, reopened: {e}"));
                }
            }
            assert!(completed > 0, "{what}: no cut left the volume short of clusters");
        }
    }

    /// A clone decoupled from its snapshot (`bdev_lvol_decouple_parent`) reads the same,
    /// shares no cluster, names no parent (kept across a restart and a checkpoint), and the
    /// snapshot is unchanged; only shared clusters are copied (its own and the unmapped are
    /// not); inflating (`bdev_lvol_inflate`) also maps every hole (thick); the refusals.
    #[test]
    fn decoupling_and_inflating_copy_what_is_shared_and_leave_the_content() {
        const MIB: u64 = 1 << 20;
        let cb = 1u64 << CLUSTER_SHIFT;
        let mut p = Pool::format(SimDisk::new(32 * MIB, 31), geometry(64, 9)).unwrap();
        let v = p.create_volume("v", 4 * MIB).unwrap();
        // Clusters 0..40 written (some partly), the rest of the 256 unmapped.
        for c in 0..40u64 {
            let len = if c % 3 == 0 { PIECE } else { cb };
            p.write(v, c * cb, &vec![c as u8 + 1; len as usize]).unwrap();
        }
        let s = p.snapshot(v, "s").unwrap();
        let c1 = p.clone_volume(s, "c1").unwrap();
        let c2 = p.clone_volume(s, "c2").unwrap();
        // c1 overwrites 10 of the shared clusters: its own already.
        for c in 0..10u64 {
            p.write(c1, c * cb, &vec![0xc1; cb as usize]).unwrap();
        }
        let snap_before = p.read(s, 0, 4 * MIB).unwrap();
        let c1_before = p.read(c1, 0, 4 * MIB).unwrap();
        let shared = |p: &Pool<SimDisk>, id| p.meta().shared_clusters(id, false).unwrap();
        assert_eq!(shared(&p, c1), 30);
        let free = p.free_clusters();

        assert_eq!(p.decouple(c1, false).unwrap(), 30, "the shared clusters only");
        assert_eq!(shared(&p, c1), 0);
        assert_eq!(p.free_clusters(), free - 30);
        assert_eq!(p.volumes()[&c1].parent, 0);
        assert!(!p.volumes()[&c1].thick);
        assert!(p.read(c1, 0, 4 * MIB).unwrap() == c1_before);
        assert!(p.read(s, 0, 4 * MIB).unwrap() == snap_before);
        p.check().unwrap();
        assert_eq!(p.leaked(), 0);
        assert!(
            matches!(p.decouple(c1, false), Err(PoolError::NoParent(id)) if id == c1),
            "nothing left to decouple it from"
        );
        assert!(matches!(p.decouple(s, false), Err(PoolError::ReadOnly(_))));

        // Inflating c2: its 40 shared clusters copied, the 216 holes mapped, thick.
        let c2_before = p.read(c2, 0, 4 * MIB).unwrap();
        assert_eq!(p.decouple(c2, true).unwrap(), 40);
        let attrs = p.volumes()[&c2].clone();
        assert!(attrs.thick && attrs.parent == 0, "{attrs:?}");
        assert_eq!(shared(&p, c2), 0);
        assert_eq!(p.meta().allocated_bytes(c2), 40 * cb - 14 * (cb - PIECE), "written bytes");
        assert!(p.read(c2, 0, 4 * MIB).unwrap() == c2_before);
        p.check().unwrap();
        // Thick: writes and trims take nothing from the pool.
        let free = p.free_clusters();
        p.trim(c2, 0, 4 * MIB).unwrap();
        p.write(c2, 200 * cb, &[7; 4096]).unwrap();
        assert_eq!(p.free_clusters(), free);
        let c2_before = p.read(c2, 0, 4 * MIB).unwrap();

        // The origin of a snapshot names no parent but shares clusters: decoupling copies them.
        let before = p.read(v, 0, 4 * MIB).unwrap();
        assert_eq!(p.decouple(v, false).unwrap(), 40);
        assert!(p.read(v, 0, 4 * MIB).unwrap() == before);
        assert_eq!(shared(&p, v), 0);

        // Kept across a restart (journal), then a checkpoint.
        p.flush().unwrap();
        let mut p = Pool::open(p.into_disk()).unwrap();
        for (id, want) in [(c1, &c1_before), (c2, &c2_before), (s, &snap_before)] {
            assert!(p.read(id, 0, 4 * MIB).unwrap() == *want, "volume {id}");
        }
        assert_eq!(p.volumes()[&c1].parent, 0);
        assert!(p.volumes()[&c2].thick && p.volumes()[&c2].parent == 0);
        assert_eq!(p.volumes()[&c2].parent, 0);
        p.checkpoint().unwrap();
        let mut p = Pool::open(p.into_disk()).unwrap();
        assert_eq!(p.volumes()[&c1].parent, 0);
        assert!(p.volumes()[&c2].thick);
        assert!(p.read(c1, 0, 4 * MIB).unwrap() == c1_before);
        p.check().unwrap();
        // Deleting the snapshot and everything gives every cluster back.
        for id in [s, c1, c2, v] {
            p.delete(id).unwrap();
        }
        p.flush().unwrap();
        assert_eq!(p.leaked(), 0);
        p.check().unwrap();
    }

    /// A pool on a simulated disk of `disk` bytes (seed `seed`) with volume v of `size` bytes
    /// whose first `written` bytes hold `byte`, its snapshot s and a clone c of that:
    /// (pool, v, s, c).
    fn clone_of_written(
        disk: u64,
        seed: u64,
        size: u64,
        written: u64,
        byte: u8,
    ) -> (Pool<SimDisk>, u32, u32, u32) {
        let mut p = Pool::format(SimDisk::new(disk, seed), geometry(64, 9)).unwrap();
        let v = p.create_volume("v", size).unwrap();
        p.write(v, 0, &vec![byte; written as usize]).unwrap();
        let s = p.snapshot(v, "s").unwrap();
        let c = p.clone_volume(s, "c").unwrap();
        (p, v, s, c)
    }

    /// A pool without the room for a decoupling's copies (or an inflation's holes) refuses it
    /// before copying anything; with the room back, it completes.
    #[test]
    fn a_decoupling_without_the_room_is_refused_before_it_copies() {
        const MIB: u64 = 1 << 20;
        let cb = 1u64 << CLUSTER_SHIFT;
        let (mut p, _, _, c) = clone_of_written(16 * MIB, 41, 4 * MIB, 2 * MIB, 3);
        // Fill the pool until fewer than the clone's 2 MiB of shared clusters are free.
        let fill = p.create_volume("fill", 16 * MIB).unwrap();
        let mut at = 0;
        while p.free_clusters() >= 2 * MIB / cb {
            p.write(fill, at, &vec![1; cb as usize]).unwrap();
            at += cb;
        }
        let free = p.free_clusters();
        assert!(matches!(p.decouple(c, false), Err(PoolError::NoSpace)));
        assert!(matches!(p.decouple(c, true), Err(PoolError::NoSpace)));
        assert_eq!(p.free_clusters(), free, "nothing copied");
        assert_eq!(p.meta().shared_clusters(c, false).unwrap(), 2 * MIB / cb);
        // Room enough for the copies, not for the holes too: decoupling goes, inflating not.
        p.trim(fill, 0, 2 * MIB).unwrap();
        p.flush().unwrap();
        let free = p.free_clusters();
        assert!((2 * MIB / cb..4 * MIB / cb).contains(&free), "{free} free");
        assert!(matches!(p.decouple(c, true), Err(PoolError::NoSpace)));
        assert_eq!(p.decouple(c, false).unwrap(), 2 * MIB / cb);
        assert_eq!(p.read(c, 0, 4 * MIB).unwrap()[..2 * MIB as usize], vec![3; 2 * MIB as usize]);
        p.check().unwrap();
    }

    /// A driver that counts what the pace is charged and can refuse to go on after `stop_after`
    /// copy-ups, as the daemon's does when its pool fails or it stops.
    struct Paced<'a> {
        pool: &'a mut Pool<SimDisk>,
        charged: Vec<u64>,
        /// The copy-up requests run: (offset, length).
        owns: Vec<(u64, u64)>,
        stop_after: usize,
    }

    impl<'a> Paced<'a> {
        fn new(pool: &'a mut Pool<SimDisk>, stop_after: usize) -> Self {
            Paced { pool, charged: Vec::new(), owns: Vec::new(), stop_after }
        }
    }

    impl crate::ops::Driver<Vec<u8>> for Paced<'_> {
        fn look(&mut self, id: u32, from: u64, ip: bool) -> Result<crate::ops::Sharing, PoolError> {
            crate::ops::Driver::look(self.pool, id, from, ip)
        }
        fn room(&mut self, id: u32, inflate: bool) -> Result<(u64, u64), PoolError> {
            crate::ops::Driver::room(self.pool, id, inflate)
        }
        fn run(&mut self, vol: u32, cmd: Cmd<Vec<u8>>) -> Result<i32, PoolError> {
            if let Cmd::Own { offset, len, .. } = cmd {
                self.owns.push((offset, len));
            }
            crate::ops::Driver::run(self.pool, vol, cmd)
        }
        fn copied(&mut self, bytes: u64) -> Result<(), PoolError> {
            self.charged.push(bytes);
            if self.charged.len() >= self.stop_after {
                return Err(PoolError::Failed("stopped".into()));
            }
            Ok(())
        }
    }

    /// The pace is charged the bytes each copy-up copied (every shared cluster once, none for
    /// clusters already the volume's); a driver that stops the decoupling between copy-ups
    /// leaves the clone reading the same, what was copied copied, and a retry finishes it.
    #[test]
    fn each_copy_up_is_charged_to_the_pace_and_a_stop_between_them_loses_nothing() {
        const MIB: u64 = 1 << 20;
        let cb = 1u64 << CLUSTER_SHIFT;
        let (mut p, _, s, c) = clone_of_written(32 * MIB, 37, 4 * MIB, 4 * MIB, 5);
        // Its first 20 clusters its own already: the rest to copy, in copy-ups of 1 MiB.
        p.write(c, 0, &vec![6; 20 * cb as usize]).unwrap();
        let before = p.read(c, 0, 4 * MIB).unwrap();
        let step = crate::ops::OWN_STEP / cb;
        let shared = 4 * MIB / cb - 20;
        assert!(shared > 2 * step);
        let mut d = Paced::new(&mut p, 2);
        assert!(matches!(crate::ops::decouple(&mut d, c, false, cb), Err(PoolError::Failed(_))));
        assert_eq!(d.charged, vec![step * cb, step * cb], "two full copy-ups, then stopped");
        assert!(p.read(c, 0, 4 * MIB).unwrap() == before);
        assert_eq!(p.meta().shared_clusters(c, false).unwrap(), shared - 2 * step);
        assert_eq!(p.volumes()[&c].parent, s, "not decoupled yet");
        p.check().unwrap();

        let mut d = Paced::new(&mut p, usize::MAX);
        assert_eq!(crate::ops::decouple(&mut d, c, false, cb).unwrap(), shared - 2 * step);
        assert_eq!(d.charged.iter().sum::<u64>(), (shared - 2 * step) * cb, "{:?}", d.charged);
        assert_eq!(p.volumes()[&c].parent, 0);
        assert!(p.read(c, 0, 4 * MIB).unwrap() == before);
        p.check().unwrap();
        assert_eq!(p.leaked(), 0);
    }

    /// A clone of a snapshot of a thick volume with nothing written: decoupling gives it a
    /// cluster of its own for each (the pool's free clusters fall by all of them) but reads
    /// and writes none, so the pace is charged nothing and nothing counts as copied; one
    /// written cluster counts as one.
    #[test]
    fn clusters_with_nothing_written_are_mapped_not_copied_nor_charged() {
        const MIB: u64 = 1 << 20;
        let cb = 1u64 << CLUSTER_SHIFT;
        let mut p = Pool::format(SimDisk::new(32 * MIB, 41), geometry(64, 9)).unwrap();
        let v = p
            .control(ControlOp::Create { name: "v".into(), size_bytes: 2 * MIB, thick: true })
            .unwrap();
        p.write(v, 5 * cb, &[9; PIECE as usize]).unwrap();
        let s = p.snapshot(v, "s").unwrap();
        let c = p.clone_volume(s, "c").unwrap();
        let free = p.free_clusters();
        let mut d = Paced::new(&mut p, usize::MAX);
        assert_eq!(crate::ops::decouple(&mut d, c, false, cb).unwrap(), 1, "the written one");
        assert_eq!(d.charged.iter().sum::<u64>(), cb, "{:?}", d.charged);
        assert_eq!(p.free_clusters(), free - 2 * MIB / cb, "every cluster its own now");
        assert_eq!(p.meta().shared_clusters(c, false).unwrap(), 0);
        let got = p.read(c, 0, 2 * MIB).unwrap();
        assert!(got[..5 * cb as usize].iter().all(|&b| b == 0));
        assert_eq!(&got[5 * cb as usize..(5 * cb + PIECE) as usize], &[9; PIECE as usize][..]);
        p.check().unwrap();
    }

    /// A run of shared clusters with nothing written (a thick volume's) goes in one copy-up
    /// request (`ops::OWN_RUN` clusters at most: only mappings, no buffer), clusters with
    /// data a step at a time: a clone of a 40 MiB thick volume written at 0 and at 20 MiB
    /// decouples in eight requests (a step, a run in three, a step, a run in three), not
    /// forty, each beginning where the last ended; the content stays, nothing shared.
    #[test]
    fn a_run_of_clusters_that_only_map_is_one_copy_up() {
        const MIB: u64 = 1 << 20;
        let cb = 1u64 << CLUSTER_SHIFT;
        let mut p = Pool::format(SimDisk::new(128 * MIB, 43), geometry(64, 9)).unwrap();
        let v = p.create_thick("v", 40 * MIB).unwrap();
        p.write(v, 0, &vec![7; 4 * cb as usize]).unwrap();
        p.write(v, 20 * MIB + cb, &vec![8; 2 * cb as usize]).unwrap();
        let s = p.snapshot(v, "s").unwrap();
        let c = p.clone_volume(s, "c").unwrap();
        let before = p.read(c, 0, 40 * MIB).unwrap();
        let free = p.free_clusters();
        let mut d = Paced::new(&mut p, usize::MAX);
        assert_eq!(crate::ops::decouple(&mut d, c, false, cb).unwrap(), 6, "the written ones");
        // In clusters: a step of 64 (1 MiB) from 0 copying 4; the run to the data at 20 MiB
        // and a cluster in requests of 512; a step from there copying 2; the run to the end.
        let (step, run) = (MIB / cb, crate::ops::OWN_RUN);
        let data = 20 * MIB / cb + 1;
        let mut want = vec![(0, step)];
        let mut at = step;
        while at < data {
            want.push((at, run.min(data - at)));
            at += run.min(data - at);
        }
        want.push((data, step));
        at = data + step;
        while at < 40 * MIB / cb {
            want.push((at, run));
            at += run;
        }
        let got: Vec<(u64, u64)> = d.owns.iter().map(|&(o, l)| (o / cb, l / cb)).collect();
        assert_eq!(got, want);
        assert!(want.len() < 12, "{} requests", want.len());
        let charged: Vec<u64> = want
            .iter()
            .map(|&(o, _)| match o {
                0 => 4 * cb,
                o if o == data => 2 * cb,
                _ => 0,
            })
            .collect();
        assert_eq!(d.charged, charged, "each step's copies");
        assert_eq!(p.free_clusters(), free - 40 * MIB / cb, "every cluster its own now");
        assert_eq!(p.meta().shared_clusters(c, false).unwrap(), 0);
        assert!(p.read(c, 0, 40 * MIB).unwrap() == before);
        p.check().unwrap();
        assert_eq!(p.leaked(), 0);
    }

    /// One copy-up request copies at most `OWN_COPY_MAX` bytes of data, however long its
    /// range (its buffers are bounded): the clusters with data past that stay shared, for the
    /// next request.
    #[test]
    fn a_copy_up_copies_at_most_its_buffers_worth() {
        const MIB: u64 = 1 << 20;
        let cb = 1u64 << CLUSTER_SHIFT;
        let (mut p, _, _, c) = clone_of_written(32 * MIB, 44, 4 * MIB, 4 * MIB, 6);
        let max = crate::meta::OWN_COPY_MAX / cb;
        let shared = 4 * MIB / cb;
        assert!(shared > max);
        let before = p.read(c, 0, 4 * MIB).unwrap();
        let own = Cmd::Own { offset: 0, len: 4 * MIB, in_place: false };
        let n = crate::ops::Driver::run(&mut p, c, own).unwrap();
        assert_eq!(n as u64, max);
        assert_eq!(p.meta().shared_clusters(c, false).unwrap(), shared - max);
        // The first `max` were copied; the next still shared.
        assert_eq!(p.meta().next_shared(c, 0, false, 1).unwrap().map(|(vc, _)| vc), Some(max));
        assert!(p.read(c, 0, 4 * MIB).unwrap() == before);
        p.check().unwrap();
        assert_eq!(p.leaked(), 0);
        // A decoupling finishes the rest.
        assert_eq!(p.decouple(c, false).unwrap(), shared - max);
        assert!(p.read(c, 0, 4 * MIB).unwrap() == before);
        p.check().unwrap();
    }

    /// Inflating a clone, a power cut at every device operation of it, each crash mode: the
    /// pool opens with the clone as it was (a clone, some of its clusters perhaps copied
    /// already) or decoupled and thick with every cluster mapped; its content and its
    /// snapshot's never change; references exact; a second try completes it.
    #[test]
    fn an_inflation_cut_short_by_a_crash_loses_nothing_and_can_be_retried() {
        const MIB: u64 = 1 << 20;
        let cb = 1u64 << CLUSTER_SHIFT;
        let prepare = || {
            let mut p = Pool::format(SimDisk::new(16 * MIB, 7), geometry(64, 9)).unwrap();
            let v = p.create_volume("v", MIB).unwrap();
            for c in 0..24u64 {
                p.write(v, c * cb + (c % 4) * PIECE, &vec![c as u8 + 1; PIECE as usize]).unwrap();
            }
            let s = p.snapshot(v, "s").unwrap();
            let c = p.clone_volume(s, "c").unwrap();
            p.write(c, 3 * cb, &[0xcc; 4096]).unwrap();
            p.flush().unwrap();
            (p, s, c)
        };
        let (mut clean, s, c) = prepare();
        let (want_s, want_c) = (clean.read(s, 0, MIB).unwrap(), clean.read(c, 0, MIB).unwrap());
        let start = clean.disk.ios;
        clean.decouple(c, true).unwrap();
        let ios = clean.disk.ios - start;
        assert!(ios >= 6, "{ios} I/Os");
        let (mut done, mut not_done) = (0, 0);
        for cut in 0..=ios {
            for (k, mode) in
                [CrashMode::DropAll, CrashMode::ApplyAll, CrashMode::Random].iter().enumerate()
            {
                let (mut p, _, _) = prepare();
                p.disk.power_cut_at = Some(p.disk.ios + cut);
                let _ =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.decouple(c, true)));
                let mut disk = p.into_disk();
                disk.reseed(cut * 8 + k as u64);
                disk.crash(*mode);
                let mut p = Pool::open(disk).unwrap();
                let at = format!("cut {cut} {mode:?}");
                p.check().unwrap_or_else(|e| panic!("{at}: {e}"));
                assert_eq!(p.leaked(), 0, "{at}");
                assert!(p.read(s, 0, MIB).unwrap() == want_s, "{at}: the snapshot changed");
                assert!(p.read(c, 0, MIB).unwrap() == want_c, "{at}: the clone changed");
                let attrs = p.volumes()[&c].clone();
                if attrs.thick {
                    // `Decouple` goes ahead of `Thick` in the journal.
                    done += 1;
                    assert_eq!(attrs.parent, 0, "{at}: thick while still a clone");
                    assert_eq!(p.meta().shared_clusters(c, false).unwrap(), 0, "{at}");
                } else {
                    // Not done, or decoupled with its `Thick` lost: a second try completes it.
                    not_done += 1;
                    p.decouple(c, true).unwrap_or_else(|e| panic!("{at}: retried: {e}"));
                    assert!(p.read(c, 0, MIB).unwrap() == want_c, "{at}: retried");
                }
                let attrs = p.volumes()[&c].clone();
                assert!(attrs.thick && attrs.parent == 0, "{at}: {attrs:?}");
                p.check().unwrap_or_else(|e| panic!("{at}, after: {e}"));
                assert_eq!(p.meta().shared_clusters(c, false).unwrap(), 0);
                assert_eq!(p.meta().allocated_bytes(c) / PIECE, 25, "{at}");
            }
        }
        assert!(done > 0 && not_done > 0, "{done} done, {not_done} not");
    }

    #[test]
    fn a_config_batch_is_admitted_whole_and_a_crash_keeps_a_prefix_of_it() {
        let mut p = new_pool(11);
        let bad = [("a".to_string(), "1".to_string()), (String::new(), "2".to_string())];
        assert!(matches!(p.meta_mut().set_configs(&bad), Err(PoolError::BadConfig)));
        assert!(p.meta().config().is_empty(), "a refused batch sets nothing");
        p.flush().unwrap();
        // Values of 2500 bytes: each record needs a journal block of its own.
        let batch: Vec<(String, String)> = (0..3u8)
            .map(|i| (format!("k{i}"), char::from(b'a' + i).to_string().repeat(2500)))
            .collect();
        let run = |p: &mut Pool<SimDisk>| {
            p.meta_mut().set_configs(&batch).unwrap();
            p.flush().unwrap();
        };
        let mut clean = new_pool(11);
        clean.flush().unwrap();
        let start = clean.disk.ios;
        run(&mut clean);
        let ios = clean.disk.ios - start;
        assert!(ios >= 3, "the batch spans several journal blocks ({ios} I/Os)");
        assert_eq!(clean.meta().config().len(), 3);
        let modes = [CrashMode::DropAll, CrashMode::ApplyAll, CrashMode::Random];
        let mut lengths = std::collections::BTreeSet::new();
        for cut in 0..=ios {
            for (k, mode) in modes.iter().enumerate() {
                let mut p = new_pool(11);
                p.flush().unwrap();
                p.disk.power_cut_at = Some(p.disk.ios + cut);
                p.meta_mut().set_configs(&batch).unwrap();
                let _ = p.flush();
                let mut disk = p.into_disk();
                disk.reseed(cut * 8 + k as u64);
                disk.crash(*mode);
                let p = Pool::open(disk).unwrap();
                let seen: Vec<(String, String)> =
                    p.meta().config().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                assert_eq!(seen, batch[..seen.len()], "cut {cut} {mode:?}: not a prefix");
                lengths.insert(seen.len());
            }
        }
        // Every prefix happens: a commit spanning blocks is not atomic, hence the ordering rule.
        assert_eq!(lengths, (0..=3).collect(), "prefixes seen after the crashes");
    }

    #[test]
    fn a_truncated_device_is_refused() {
        let p = new_pool(4);
        let disk = p.into_disk();
        let small = SimDisk::new(disk.size_bytes() / 2, 4);
        let head = disk.read(0, 2 * BLOCK_SIZE);
        let mut small = small;
        small.write(0, &head, true);
        match Pool::open(small) {
            Err(PoolError::Damaged(why)) => assert!(why.contains("truncated"), "{why}"),
            other => panic!("expected a refusal, got {:?}", other.err()),
        }
    }

    #[test]
    fn a_damaged_journal_block_before_intact_commits_is_refused() {
        let mut p = new_pool(3);
        let v = p.create_volume("v", VOL_PIECES * PIECE).unwrap();
        for i in 0..4u64 {
            p.write(v, i * PIECE, &vec![i as u8 + 1; PIECE as usize]).unwrap();
            p.flush().unwrap();
        }
        let sb = p.meta().superblock().clone();
        let mut disk = p.into_disk();
        // The torn tail of a crash is fine: damage the last block only.
        let clean = disk.clone();
        let last = (sb.journal_head_block + 4) % sb.journal_blocks;
        disk.write((sb.journal_start + last) * BLOCK_SIZE as u64, &[0xa5; BLOCK_SIZE], true);
        assert!(Pool::open(disk).is_ok(), "a damaged last block is a crash's torn tail");
        // A damaged block with intact commits after it is refused, naming the block.
        let mut disk = clean;
        let mid = (sb.journal_head_block + 2) % sb.journal_blocks;
        disk.write((sb.journal_start + mid) * BLOCK_SIZE as u64, &[0xa5; BLOCK_SIZE], true);
        match Pool::open(disk) {
            Err(PoolError::Damaged(why)) => {
                assert!(why.contains(&format!("journal block {mid}")), "{why}")
            }
            other => panic!("expected a refusal, got {:?}", other.err()),
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write { vol: usize, piece: u64, pieces: u64, byte: u8 },
        Trim { vol: usize, piece: u64, pieces: u64 },
        Flush,
        Snapshot { vol: usize },
        Clone { vol: usize },
        Delete { vol: usize },
        Rollback { vol: usize, snap: usize },
        Resize { vol: usize, pieces: u64 },
        SetReadOnly { vol: usize },
        Rename { vol: usize },
        Decouple { vol: usize, inflate: bool },
        CreateThick,
        Checkpoint,
        Crash { mode: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0usize..4, 0..VOL_PIECES, 1u64..6, 1u8..=255)
                .prop_map(|(vol, piece, pieces, byte)| Op::Write { vol, piece, pieces, byte }),
            2 => (0usize..4, 0..VOL_PIECES, 1u64..9).prop_map(|(vol, piece, pieces)| Op::Trim { vol, piece, pieces }),
            2 => Just(Op::Flush),
            1 => (0usize..4).prop_map(|vol| Op::Snapshot { vol }),
            1 => (0usize..4).prop_map(|vol| Op::Clone { vol }),
            1 => (0usize..4).prop_map(|vol| Op::Delete { vol }),
            1 => (0usize..4, 0usize..8).prop_map(|(vol, snap)| Op::Rollback { vol, snap }),
            1 => (0usize..4, 1..=VOL_PIECES).prop_map(|(vol, pieces)| Op::Resize { vol, pieces }),
            1 => (0usize..4).prop_map(|vol| Op::SetReadOnly { vol }),
            1 => (0usize..4).prop_map(|vol| Op::Rename { vol }),
            1 => (0usize..4, any::<bool>()).prop_map(|(vol, inflate)| Op::Decouple { vol, inflate }),
            1 => Just(Op::CreateThick),
            1 => Just(Op::Checkpoint),
            2 => (0u8..3).prop_map(|mode| Op::Crash { mode }),
        ]
    }

    /// Per volume and 4 KiB piece: the value now, the value at the last flush, and the values
    /// written since (any of which a crash may leave).
    #[derive(Clone, Default)]
    struct Model {
        now: Vec<u8>,
        durable: Vec<u8>,
        since: Vec<BTreeSet<u8>>,
        read_only: bool,
        /// The volume a snapshot or clone was taken of.
        parent: u32,
        /// Size in pieces (the vectors always hold `VOL_PIECES`; beyond the size they are 0).
        size: u64,
        /// Created thick, and not snapshotted or rolled back since.
        thick: bool,
        name: String,
    }

    fn run(seed: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let mut pool = new_pool(seed);
        let baseline = pool.free_clusters();
        let first = pool.create_volume("v0", VOL_PIECES * PIECE).unwrap();
        let mut models: BTreeMap<u32, Model> = BTreeMap::new();
        let fresh = || Model {
            now: vec![0; VOL_PIECES as usize],
            durable: vec![0; VOL_PIECES as usize],
            since: vec![BTreeSet::new(); VOL_PIECES as usize],
            read_only: false,
            parent: 0,
            size: VOL_PIECES,
            thick: false,
            name: String::new(),
        };
        let mut names = 0u32;
        let mut name = |prefix: &str| {
            names += 1;
            format!("{prefix}{names}")
        };
        models.insert(first, Model { name: "v0".into(), ..fresh() });
        let settle = |m: &mut BTreeMap<u32, Model>| {
            for v in m.values_mut() {
                v.durable = v.now.clone();
                v.since.iter_mut().for_each(BTreeSet::clear);
            }
        };
        for op in ops {
            let ids: Vec<u32> = models.keys().copied().collect();
            let pick = |i: usize| ids.get(i % ids.len().max(1)).copied();
            match op {
                Op::Write { vol, piece, pieces, byte } => {
                    let Some(id) = pick(vol) else { continue };
                    let size = models[&id].size;
                    let piece = piece % size;
                    let pieces = pieces.min(size - piece);
                    let r = pool.write(id, piece * PIECE, &vec![byte; (pieces * PIECE) as usize]);
                    let m = models.get_mut(&id).unwrap();
                    if m.read_only {
                        prop_assert!(matches!(r, Err(PoolError::ReadOnly(_))));
                        continue;
                    }
                    if matches!(r, Err(PoolError::NoSpace)) {
                        prop_assert!(
                            !pool.volumes()[&id].thick,
                            "a thick volume found the pool full"
                        );
                        continue; // a full pool fails the new allocation; the model is unchanged
                    }
                    r.unwrap();
                    for p in piece..piece + pieces {
                        m.now[p as usize] = byte;
                        m.since[p as usize].insert(byte);
                    }
                }
                Op::Trim { vol, piece, pieces } => {
                    let Some(id) = pick(vol) else { continue };
                    let size = models[&id].size;
                    let piece = piece % size;
                    let pieces = pieces.min(size - piece);
                    // A thick volume's trim, between two flushes (what it frees is free once
                    // committed): the pool's free clusters are the same after it.
                    let thick = pool.volumes()[&id].thick && !models[&id].read_only;
                    if thick {
                        pool.flush().unwrap();
                        settle(&mut models);
                    }
                    let free = pool.free_clusters();
                    let r = pool.trim(id, piece * PIECE, pieces * PIECE);
                    let m = models.get_mut(&id).unwrap();
                    if m.read_only {
                        prop_assert!(r.is_err());
                        continue;
                    }
                    r.unwrap();
                    for p in piece..piece + pieces {
                        m.now[p as usize] = 0;
                        m.since[p as usize].insert(0);
                    }
                    if thick {
                        pool.flush().unwrap();
                        settle(&mut models);
                        prop_assert_eq!(
                            pool.free_clusters(),
                            free,
                            "a thick volume keeps its room"
                        );
                    }
                }
                Op::Flush => {
                    pool.flush().unwrap();
                    settle(&mut models);
                }
                Op::Snapshot { vol } => {
                    let Some(id) = pick(vol) else { continue };
                    let s = pool.snapshot(id, &name("s")).unwrap();
                    settle(&mut models);
                    models.get_mut(&id).unwrap().thick = false;
                    let mut m = models[&id].clone();
                    m.read_only = true;
                    m.parent = id;
                    m.name = pool.volumes()[&s].name.clone();
                    models.insert(s, m);
                }
                Op::Clone { vol } => {
                    let Some(id) = pick(vol) else { continue };
                    if !models[&id].read_only {
                        prop_assert!(pool.clone_volume(id, &name("c")).is_err());
                        continue;
                    }
                    let c = pool.clone_volume(id, &name("c")).unwrap();
                    settle(&mut models);
                    let mut m = models[&id].clone();
                    m.read_only = false;
                    m.parent = id;
                    m.thick = false;
                    m.name = pool.volumes()[&c].name.clone();
                    models.insert(c, m);
                }
                Op::CreateThick => {
                    // All its clusters now (the pool check says none is left unmapped), or
                    // none when the pool lacks them; its writes never find the pool full.
                    let free = pool.free_clusters();
                    match pool.create_thick(&name("t"), VOL_PIECES * PIECE) {
                        Ok(t) => {
                            prop_assert!(pool.volumes()[&t].thick);
                            settle(&mut models);
                            let name = pool.volumes()[&t].name.clone();
                            models.insert(t, Model { thick: true, name, ..fresh() });
                        }
                        Err(PoolError::NoSpace | PoolError::Overprovisioned { .. }) => {
                            prop_assert_eq!(pool.free_clusters(), free, "a refusal takes nothing");
                        }
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    }
                }
                Op::SetReadOnly { vol } => {
                    // Read-only for good, as a snapshot (a second time changes nothing); it is
                    // durable when this answers, with every write before it.
                    let Some(id) = pick(vol) else { continue };
                    pool.set_read_only(id).unwrap();
                    prop_assert!(pool.volumes()[&id].read_only);
                    settle(&mut models);
                    models.get_mut(&id).unwrap().read_only = true;
                }
                Op::Rename { vol } => {
                    // Durable when this answers, with every write before it; another
                    // volume's name is refused.
                    let Some(id) = pick(vol) else { continue };
                    let taken = models.iter().find(|(o, _)| **o != id).map(|(_, m)| &m.name);
                    if let Some(taken) = taken {
                        let r = pool.rename(id, taken);
                        prop_assert!(matches!(r, Err(PoolError::NameTaken(_))), "{:?}", r);
                    }
                    let new = name("r");
                    pool.rename(id, &new).unwrap();
                    settle(&mut models);
                    models.get_mut(&id).unwrap().name = new;
                }
                Op::Decouple { vol, inflate } => {
                    // What it shares copied up, then no parent named (inflating: thick),
                    // durable when this answers with every write before it; what it reads
                    // never changes (checked below, and across later crashes).
                    let Some(id) = pick(vol) else { continue };
                    let (read_only, parent) = (models[&id].read_only, pool.volumes()[&id].parent);
                    match pool.decouple(id, inflate) {
                        Ok(_) => {
                            prop_assert!(!read_only);
                            let a = pool.volumes()[&id].clone();
                            prop_assert!(a.parent == 0 && (a.thick || !inflate), "{:?}", a);
                            prop_assert_eq!(pool.meta().shared_clusters(id, false).unwrap(), 0);
                            settle(&mut models);
                            models.get_mut(&id).unwrap().thick |= inflate;
                        }
                        Err(PoolError::ReadOnly(_)) => prop_assert!(read_only),
                        Err(PoolError::NoParent(_)) => prop_assert!(!inflate && parent == 0),
                        // The pool full: what was copied stays copied (it reads the same).
                        Err(PoolError::NoSpace) => {}
                        Err(e) => return Err(TestCaseError::fail(format!("decouple {id}: {e}"))),
                    }
                }
                Op::Delete { vol } => {
                    let Some(id) = pick(vol) else { continue };
                    pool.delete(id).unwrap();
                    settle(&mut models);
                    models.remove(&id);
                }
                Op::Rollback { vol, snap } => {
                    let Some(id) = pick(vol) else { continue };
                    let snaps: Vec<u32> = models
                        .iter()
                        .filter(|(_, m)| m.read_only && m.parent == id)
                        .map(|(s, _)| *s)
                        .collect();
                    let r = snaps.get(snap % snaps.len().max(1)).copied();
                    let Some(to) = r else { continue };
                    if models[&id].read_only {
                        prop_assert!(pool.rollback(id, to).is_err());
                        continue;
                    }
                    pool.rollback(id, to).unwrap();
                    settle(&mut models);
                    let snap_model = models[&to].clone();
                    let m = models.get_mut(&id).unwrap();
                    m.now = snap_model.now;
                    m.size = snap_model.size;
                    m.thick = false;
                    settle(&mut models);
                }
                Op::Resize { vol, pieces } => {
                    let Some(id) = pick(vol) else { continue };
                    let r = pool.resize(id, pieces * PIECE, true);
                    if models[&id].read_only {
                        prop_assert!(r.is_err());
                        continue;
                    }
                    if models[&id].thick && matches!(r, Err(PoolError::NoSpace)) {
                        // A thick volume grows only with room for the growth: unchanged.
                        prop_assert_eq!(pool.volumes()[&id].size_bytes, models[&id].size * PIECE);
                        continue;
                    }
                    r.unwrap();
                    settle(&mut models);
                    let m = models.get_mut(&id).unwrap();
                    for p in pieces..VOL_PIECES {
                        m.now[p as usize] = 0;
                    }
                    m.size = pieces;
                    settle(&mut models);
                }
                Op::Checkpoint => {
                    pool.checkpoint().unwrap();
                    settle(&mut models);
                }
                Op::Crash { mode } => {
                    let mode =
                        [CrashMode::DropAll, CrashMode::ApplyAll, CrashMode::Random][mode as usize];
                    let mut disk = pool.into_disk();
                    disk.crash(mode);
                    pool = Pool::open(disk).unwrap();
                    let ids: BTreeSet<u32> = pool.volumes().keys().copied().collect();
                    prop_assert_eq!(&ids, &models.keys().copied().collect::<BTreeSet<u32>>());
                    for (id, m) in models.iter_mut() {
                        prop_assert_eq!(pool.volumes()[id].size_bytes, m.size * PIECE);
                        prop_assert_eq!(pool.volumes()[id].read_only, m.read_only, "vol {}", id);
                        prop_assert_eq!(pool.volumes()[id].thick, m.thick, "vol {} thick", id);
                        prop_assert_eq!(&pool.volumes()[id].name, &m.name, "vol {} name", id);
                        let data = pool.read(*id, 0, m.size * PIECE).unwrap();
                        for p in 0..m.size as usize {
                            let piece = &data[p * PIECE as usize..(p + 1) * PIECE as usize];
                            let v = piece[0];
                            prop_assert!(
                                piece.iter().all(|&b| b == v),
                                "vol {} piece {} torn inside 4 KiB",
                                id,
                                p
                            );
                            prop_assert!(
                                v == m.durable[p] || m.since[p].contains(&v),
                                "vol {} piece {}: read {} after crash; durable {}, since {:?}",
                                id,
                                p,
                                v,
                                m.durable[p],
                                m.since[p]
                            );
                            m.now[p] = v;
                        }
                    }
                    settle(&mut models);
                }
            }
            if let Err(e) = pool.check() {
                return Err(TestCaseError::fail(e));
            }
            // Reads always match the model outside crashes.
            for (id, m) in &models {
                let data = pool.read(*id, 0, m.size * PIECE).unwrap();
                for p in 0..m.size as usize {
                    prop_assert_eq!(data[p * PIECE as usize], m.now[p], "vol {} piece {}", id, p);
                }
                // Allocation (NBD block status, NVMe NUSE) is exactly the written pieces.
                let mut written = vec![false; m.size as usize];
                let runs = pool.meta().allocation(*id, 0, m.size * PIECE, usize::MAX);
                for &(start, len, w) in &runs {
                    for p in start / PIECE..(start + len) / PIECE {
                        written[p as usize] = w;
                    }
                }
                for (p, w) in written.iter().enumerate() {
                    prop_assert_eq!(*w, m.now[p] != 0, "vol {} piece {} allocation", id, p);
                }
                // Asked for at most `max` runs (NBD's REQ_ONE, its reply bound), from an
                // unaligned start: the walk stops early and what it gives is the same.
                for max in 1..=3 {
                    let from = PIECE / 2;
                    let part = pool.meta().allocation(*id, from, m.size * PIECE - from, max);
                    let mut whole = pool.meta().allocation(*id, from, m.size * PIECE, usize::MAX);
                    whole.truncate(max);
                    prop_assert_eq!(part, whole, "vol {} first {} runs", id, max);
                }
                // Changes against each other volume of its family (NBD's
                // qemu:dirty-bitmap:NAME): a piece reported unchanged reads the same in both
                // (sound: an incremental copy of what changed is exact); one reported changed
                // is written in at least one of them (two holes never differ).
                for (base, bm) in &models {
                    let same = pool.meta().family_number(*base) == pool.meta().family_number(*id);
                    let runs = pool.meta().changes(*id, *base, 0, m.size * PIECE, usize::MAX);
                    if !same {
                        prop_assert!(
                            matches!(runs, Err(PoolError::OtherFamily { .. })),
                            "vol {} against {} of another family: {:?}",
                            id,
                            base,
                            runs
                        );
                        continue;
                    }
                    let runs = runs.unwrap();
                    let covered: u64 = runs.iter().map(|r| r.1).sum();
                    prop_assert_eq!(
                        covered,
                        m.size * PIECE,
                        "vol {} against {}: runs cover it",
                        id,
                        base
                    );
                    for &(start, len, changed) in &runs {
                        for p in (start / PIECE..(start + len) / PIECE).map(|p| p as usize) {
                            let theirs = if (p as u64) < bm.size { bm.now[p] } else { 0 };
                            if changed {
                                prop_assert!(
                                    m.now[p] != 0 || theirs != 0,
                                    "vol {} against {}: piece {} changed, a hole in both",
                                    id,
                                    base,
                                    p
                                );
                            } else {
                                prop_assert_eq!(
                                    m.now[p],
                                    theirs,
                                    "vol {} against {}: piece {} unchanged but differs",
                                    id,
                                    base,
                                    p
                                );
                            }
                        }
                    }
                    let from = PIECE / 2;
                    let mut whole = runs;
                    whole.retain(|r| r.0 + r.1 > from);
                    if let Some(first) = whole.first_mut() {
                        first.1 -= from - first.0.min(from);
                        first.0 = first.0.max(from);
                    }
                    for max in 1..=3 {
                        let part =
                            pool.meta().changes(*id, *base, from, m.size * PIECE, max).unwrap();
                        prop_assert_eq!(
                            &part[..],
                            &whole[..whole.len().min(max)],
                            "vol {} against {}: first {} runs",
                            id,
                            base,
                            max
                        );
                    }
                }
            }
        }
        pool.flush().unwrap();
        let ids: Vec<u32> = pool.volumes().keys().copied().collect();
        for id in ids {
            pool.delete(id).unwrap();
        }
        pool.check().map_err(TestCaseError::fail)?;
        prop_assert_eq!((pool.free_clusters(), pool.leaked()), (baseline, 0));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("BALLAST_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)))]
        /// Random writes, trims, flushes, snapshots, clones, deletes and crashes against a plain
        /// model: after a crash every 4 KiB piece reads its last durable value or one written
        /// since; snapshots never change; reference counts are exact after every step; deleting
        /// everything returns the pool to its empty baseline.
        #[test]
        fn model_with_crashes(seed in any::<u64>(), ops in proptest::collection::vec(op(), 1..60)) {
            run(seed, ops)?;
        }
    }
}
