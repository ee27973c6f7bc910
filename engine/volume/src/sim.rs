//! A simulated block device for crash testing the volume layer (docs/VOLUMES.md).
//!
//! It models a disk with a volatile write cache: a completed write is visible to reads at once
//! but durable only after a flush (or when written with FUA). `crash` throws the cache away the
//! way real media can: each unflushed write is independently dropped, applied whole, or torn
//! (some of its 4 KiB sectors applied, others not), in an order chosen by the seed. Everything
//! is deterministic for a given seed, so a failing case replays exactly.
//!
//! Invariants:
//! - `durable` holds exactly the state a crash right now could not lose: every write before the
//!   last completed flush, and every FUA write;
//! - reads see the newest completed write for each byte (cache over durable);
//! - after `crash`, the cache is empty and reads see only what the crash left.

use std::collections::BTreeMap;

/// Torn writes land in pieces of this size (a sector of an Advanced Format disk).
pub const SECTOR: usize = 4096;

/// How a crash treats the writes that were not yet durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every unflushed write is lost.
    DropAll,
    /// Every unflushed write survives (the cache happened to drain).
    ApplyAll,
    /// Each unflushed write is dropped, applied or torn, at random, in random order.
    Random,
}

/// A write kept in the volatile cache.
#[derive(Debug, Clone)]
struct Pending {
    offset: u64,
    data: Vec<u8>,
}

#[derive(Clone)]
pub struct SimDisk {
    size_bytes: u64,
    /// Durable contents, sparse by sector; absent sectors read as zeros.
    durable: BTreeMap<u64, Vec<u8>>,
    /// Completed, not yet durable writes, in completion order.
    cache: Vec<Pending>,
    rng: u64,
    /// Device I/Os so far (writes and flushes), for crash-point sweeps.
    pub ios: u64,
    /// Power is lost after this many I/Os: later writes and flushes do nothing (until `crash`).
    pub power_cut_at: Option<u64>,
}

impl SimDisk {
    pub fn new(size_bytes: u64, seed: u64) -> SimDisk {
        assert!(size_bytes.is_multiple_of(SECTOR as u64));
        SimDisk {
            size_bytes,
            durable: BTreeMap::new(),
            cache: Vec::new(),
            rng: seed | 1,
            ios: 0,
            power_cut_at: None,
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The device grows (a file extended, a volume group's volume enlarged): the new bytes
    /// read zeros, and the size is the device's own, not cached: a crash keeps it.
    pub fn grow(&mut self, size_bytes: u64) {
        assert!(size_bytes >= self.size_bytes && size_bytes.is_multiple_of(SECTOR as u64));
        self.size_bytes = size_bytes;
    }

    /// xorshift64*: small, deterministic, good enough to pick crash outcomes.
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn apply(
        durable: &mut BTreeMap<u64, Vec<u8>>,
        offset: u64,
        data: &[u8],
        sectors: Option<&[bool]>,
    ) {
        assert!(offset.is_multiple_of(SECTOR as u64) && data.len().is_multiple_of(SECTOR));
        for (i, chunk) in data.chunks(SECTOR).enumerate() {
            if sectors.is_some_and(|keep| !keep[i]) {
                continue;
            }
            durable.insert(offset / SECTOR as u64 + i as u64, chunk.to_vec());
        }
    }

    /// A write of whole sectors; with `fua` it is durable when it completes.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) {
        assert!(offset + data.len() as u64 <= self.size_bytes, "write beyond the device");
        self.ios += 1;
        if self.powered_off() {
            return;
        }
        if fua {
            // Durable now; cached older writes must not undo it on a crash, so their sectors
            // under this write leave the cache (a disk orders them before the FUA write).
            Self::apply(&mut self.durable, offset, data, None);
            let mut kept = Vec::with_capacity(self.cache.len());
            for p in std::mem::take(&mut self.cache) {
                if !overlaps(offset, data.len(), p.offset, p.data.len()) {
                    kept.push(p);
                    continue;
                }
                for (i, chunk) in p.data.chunks(SECTOR).enumerate() {
                    let at = p.offset + (i * SECTOR) as u64;
                    if !overlaps(offset, data.len(), at, SECTOR) {
                        kept.push(Pending { offset: at, data: chunk.to_vec() });
                    }
                }
            }
            self.cache = kept;
        } else {
            self.cache.push(Pending { offset, data: data.to_vec() });
        }
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) {
        self.ios += 1;
        if self.powered_off() {
            return;
        }
        for p in std::mem::take(&mut self.cache) {
            Self::apply(&mut self.durable, p.offset, &p.data, None);
        }
    }

    /// Reads what the newest completed writes say (cache over durable).
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        assert!(offset + len as u64 <= self.size_bytes, "read beyond the device");
        assert!(offset.is_multiple_of(SECTOR as u64) && len.is_multiple_of(SECTOR));
        let mut out = vec![0u8; len];
        for (i, chunk) in out.chunks_mut(SECTOR).enumerate() {
            if let Some(d) = self.durable.get(&(offset / SECTOR as u64 + i as u64)) {
                chunk.copy_from_slice(d);
            }
        }
        for p in &self.cache {
            for (i, chunk) in p.data.chunks(SECTOR).enumerate() {
                let at = p.offset + (i * SECTOR) as u64;
                if at >= offset && at < offset + len as u64 {
                    let dst = (at - offset) as usize;
                    out[dst..dst + SECTOR].copy_from_slice(chunk);
                }
            }
        }
        out
    }

    /// Changes the seed of later crash outcomes.
    pub fn reseed(&mut self, seed: u64) {
        self.rng = seed | 1;
    }

    fn powered_off(&self) -> bool {
        self.power_cut_at.is_some_and(|n| self.ios > n)
    }

    /// Power loss: resolves every unflushed write per `mode`; returns how many were kept whole.
    /// Power comes back afterwards.
    pub fn crash(&mut self, mode: CrashMode) -> usize {
        self.power_cut_at = None;
        let mut pending = std::mem::take(&mut self.cache);
        let mut kept = 0;
        match mode {
            CrashMode::DropAll => {}
            CrashMode::ApplyAll => {
                kept = pending.len();
                for p in pending {
                    Self::apply(&mut self.durable, p.offset, &p.data, None);
                }
            }
            CrashMode::Random => {
                // Reorder: the cache may reach the media in any order.
                for i in (1..pending.len()).rev() {
                    let j = (self.next() % (i as u64 + 1)) as usize;
                    pending.swap(i, j);
                }
                for p in pending {
                    match self.next() % 3 {
                        0 => {}
                        1 => {
                            kept += 1;
                            Self::apply(&mut self.durable, p.offset, &p.data, None);
                        }
                        _ => {
                            let keep: Vec<bool> = (0..p.data.len() / SECTOR)
                                .map(|_| self.next().is_multiple_of(2))
                                .collect();
                            Self::apply(&mut self.durable, p.offset, &p.data, Some(&keep));
                        }
                    }
                }
            }
        }
        kept
    }
}

fn overlaps(a: u64, alen: usize, b: u64, blen: usize) -> bool {
    a < b + blen as u64 && b < a + alen as u64
}

/// Commits what a pool state has pending with no device at all (its blocks and checkpoint blob
/// dropped): a checkpoint when the journal asks for one, else a journal commit. For tests and
/// cost measurements that drive `PoolMeta` directly; panics on a failed pool or a commit in
/// flight.
pub fn commit_in_memory(m: &mut crate::meta::PoolMeta) {
    if m.wants_checkpoint() {
        let mut c = m.begin_checkpoint().expect("a sound pool").expect("no commit in flight");
        let Some(crate::meta::Encode::Checkpoint(job)) = c.take_encode() else {
            unreachable!("a checkpoint encodes its state")
        };
        c.encoded(job.run());
        m.checkpoint_done(c);
    } else {
        let mut sealed = m.seal().expect("a sound pool").expect("no commit in flight");
        sealed.encode_now();
        m.commit_done(sealed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(byte: u8) -> Vec<u8> {
        vec![byte; SECTOR]
    }

    #[test]
    fn flushed_and_fua_writes_survive_every_crash() {
        for mode in [CrashMode::DropAll, CrashMode::ApplyAll, CrashMode::Random] {
            let mut d = SimDisk::new(1 << 20, 42);
            d.write(0, &block(1), false);
            d.flush();
            d.write(4096, &block(2), true);
            d.write(8192, &block(3), false);
            assert_eq!(d.read(8192, SECTOR), block(3), "reads see unflushed writes");
            d.crash(mode);
            assert_eq!(d.read(0, SECTOR), block(1), "{mode:?}: flushed write lost");
            assert_eq!(d.read(4096, SECTOR), block(2), "{mode:?}: FUA write lost");
            let third = d.read(8192, SECTOR);
            assert!(
                third == block(3) || third == block(0),
                "{mode:?}: unflushed write is old or new"
            );
        }
    }

    #[test]
    fn drop_all_loses_unflushed_and_apply_all_keeps_them() {
        let mut d = SimDisk::new(1 << 20, 1);
        d.write(0, &block(9), false);
        d.crash(CrashMode::DropAll);
        assert_eq!(d.read(0, SECTOR), block(0));
        d.write(0, &block(9), false);
        d.crash(CrashMode::ApplyAll);
        assert_eq!(d.read(0, SECTOR), block(9));
    }

    #[test]
    fn fua_is_not_undone_by_an_older_cached_write() {
        let mut d = SimDisk::new(1 << 20, 7);
        let mut two = block(5);
        two.extend(block(5));
        d.write(0, &two, false); // cached, covers sectors 0 and 1
        d.write(0, &block(6), true); // FUA over sector 0
        d.crash(CrashMode::ApplyAll);
        assert_eq!(d.read(0, SECTOR), block(6), "the older cached write undid a FUA write");
        assert_eq!(d.read(4096, SECTOR), block(5));
    }

    #[test]
    fn random_crashes_tear_writes_at_sector_granularity_and_replay_by_seed() {
        let run = |seed| {
            let mut d = SimDisk::new(1 << 20, seed);
            let data: Vec<u8> = (0..8 * SECTOR).map(|i| (i / SECTOR) as u8 + 1).collect();
            d.write(0, &data, false);
            d.crash(CrashMode::Random);
            d.read(0, 8 * SECTOR)
        };
        let mut saw_torn = false;
        for seed in 0..64 {
            let after = run(seed);
            assert_eq!(after, run(seed), "seed {seed} does not replay");
            for (i, sector) in after.chunks(SECTOR).enumerate() {
                assert!(
                    sector == block(0) || sector == block(i as u8 + 1),
                    "seed {seed}: mixed sector"
                );
            }
            let written = after.chunks(SECTOR).filter(|s| s[0] != 0).count();
            saw_torn |= written > 0 && written < 8;
        }
        assert!(saw_torn, "64 seeds never produced a torn write");
    }
}
