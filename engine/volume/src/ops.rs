//! Control operations as data: what the control plane asks of a pool (create, snapshot,
//! clone, rollback, resize, delete, rename, decouple, configuration, growing the pool), which
//! volume's writes must drain first, and how each applies to the pool state. A control
//! operation runs as a [`crate::request`] (`Cmd::Control`) — freeze, park until drained,
//! apply, thaw, commit — on a core in the daemon and in the simulator alike, so both run one
//! implementation of it. [`decouple`] drives the one operation made of many requests (copy
//! up, then apply) for every driver.
//!
//! Invariant: an operation that changes what a volume's writes see (snapshot, rollback, resize,
//! delete, making it read-only) names that volume in [`ControlOp::quiesce`]; it is applied
//! only with the volume frozen and no write of it in flight.

use crate::meta::{PoolError, PoolMeta};
use crate::request::Cmd;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlOp {
    /// A new volume; a thick one takes all its clusters now.
    Create {
        name: String,
        size_bytes: u64,
        thick: bool,
    },
    /// A read-only snapshot of `of`.
    Snapshot {
        of: u32,
        name: String,
    },
    /// A writable clone of snapshot `of`.
    Clone {
        of: u32,
        name: String,
    },
    /// Volume `id` takes snapshot `to`'s content.
    Rollback {
        id: u32,
        to: u32,
    },
    Resize {
        id: u32,
        size_bytes: u64,
        force: bool,
    },
    Delete {
        id: u32,
    },
    /// Volume `id` becomes read-only for good (SPDK's `bdev_lvol_set_read_only`): it takes no
    /// more writes and, like a snapshot, may be cloned. Already read-only: nothing changes.
    SetReadOnly {
        id: u32,
    },
    /// Volume `id` is called `name` from now on, with configuration entries that go with the
    /// name: `before` journaled ahead of the rename, `after` behind it (`PoolMeta::rename`).
    /// What the volume's writes see does not change: nothing drains.
    Rename {
        id: u32,
        name: String,
        before: Vec<(String, String)>,
        after: Vec<(String, String)>,
    },
    /// Volume `id`, its shared clusters copied up already ([`decouple`]), names no parent
    /// from now on; with `inflate` it is thick too (`PoolMeta::decouple`). Refused with
    /// `StillShared` if a cluster is shared again (a snapshot taken since).
    Decouple {
        id: u32,
        inflate: bool,
    },
    /// Configuration entries (an empty value removes its key), all admitted or none.
    SetConfigs(Vec<(String, String)>),
    /// The pool's device now has `total_bytes`: its data area grows into them. Done with a
    /// checkpoint of its own (the superblock names the new size before any new cluster is
    /// handed out); a device no larger changes nothing, a smaller one is refused.
    Grow {
        total_bytes: u64,
    },
}

impl ControlOp {
    /// The volume whose writes must drain (it is frozen meanwhile) before the operation
    /// applies.
    pub fn quiesce(&self) -> Option<u32> {
        match *self {
            ControlOp::Snapshot { of, .. } => Some(of),
            ControlOp::Rollback { id, .. }
            | ControlOp::Resize { id, .. }
            | ControlOp::Delete { id }
            | ControlOp::SetReadOnly { id }
            | ControlOp::Decouple { id, .. } => Some(id),
            ControlOp::Create { .. }
            | ControlOp::Clone { .. }
            | ControlOp::Rename { .. }
            | ControlOp::SetConfigs(_)
            | ControlOp::Grow { .. } => None,
        }
    }

    /// Whether its commit, now that it applied, must be a checkpoint: a growth not yet named
    /// by a durable superblock lives in the next one (a device no larger needs none).
    pub fn needs_checkpoint(&self, meta: &PoolMeta) -> bool {
        matches!(self, ControlOp::Grow { .. }) && meta.growth_pending()
    }

    /// Applies the operation (its records join the pending ones): the new volume's id for a
    /// create, snapshot or clone, else 0. A refusal changes nothing.
    pub fn apply(&self, meta: &mut PoolMeta) -> Result<u32, PoolError> {
        match self {
            ControlOp::Create { name, size_bytes, thick } => meta.create(name, *size_bytes, *thick),
            ControlOp::Snapshot { of, name } => meta.snapshot(*of, name),
            ControlOp::Clone { of, name } => meta.clone_volume(*of, name),
            ControlOp::Rollback { id, to } => meta.rollback(*id, *to).map(|()| 0),
            ControlOp::Resize { id, size_bytes, force } => {
                meta.resize(*id, *size_bytes, *force).map(|()| 0)
            }
            ControlOp::Delete { id } => meta.delete(*id).map(|()| 0),
            ControlOp::SetReadOnly { id } => meta.set_read_only(*id).map(|()| 0),
            ControlOp::Decouple { id, inflate } => meta.decouple(*id, *inflate).map(|()| 0),
            ControlOp::Rename { id, name, before, after } => {
                meta.rename(*id, name, before, after).map(|()| 0)
            }
            ControlOp::SetConfigs(entries) => meta.set_configs(entries).map(|()| 0),
            ControlOp::Grow { total_bytes } => meta.grow(*total_bytes).map(|_| 0),
        }
    }
}

/// Units of work one [`Cmd::Settle`] step spends at most (`PoolMeta::settle`; plus one
/// tree node's entries): releasing a retired tree, a node popped, a cluster's reference
/// dropped, a child kept each (`Remains::release_some`) — with the standard 64 KiB clusters,
/// 32 full leaves, 1 GiB of a volume's mapping, about 80 µs (perf/RESULTS.md §27); mapping a
/// thick volume's clusters, a cluster looked at 1, one mapped `FILL_UNITS`. The family
/// concerned is locked meanwhile.
pub const SETTLE_STEP: usize = 1 << 14;

/// Units [`settle`] spends between the commits of what its steps did: each commit's end
/// makes its frees reusable under the exclusive borrow (every core's decisions wait), about
/// 3.3 ns a cluster, so a commit frees at most about 256 Ki clusters — 16 GiB of a volume's
/// 64 KiB clusters, under 1 ms (perf/RESULTS.md §27) — not a whole volume's at once; and a
/// commit carries at most about 32 Ki mapping records of a thick volume's.
pub const SETTLE_COMMIT: u64 = 1 << 18;

/// Bytes of a volume one copy-up request covers where it has data to copy (rounded up to
/// whole clusters): with 64 KiB clusters at most 16 fresh clusters and 1 MiB of copy buffers
/// in flight for it (`meta::OWN_COPY_MAX`).
pub const OWN_STEP: u64 = crate::meta::OWN_COPY_MAX;

/// Clusters one copy-up request covers at most where it only maps (shared clusters with
/// nothing written in them, a thick volume's: no buffer, no I/O; counted in clusters, as the
/// core's time follows them — a mapping record and a span's end each): 512, 32 MiB of 64 KiB
/// clusters (perf/RESULTS.md §30: 2048 in a request held the core's other I/O up to 24-121
/// ms, 512 no longer than the commits and the control thread do, 16-18 ms on 2 CPUs). Such a
/// run in 1 MiB requests took a round trip to a core each (a 64 GiB thick clone: a minute).
pub const OWN_RUN: u64 = 512;

/// Clusters [`decouple`]'s copy-ups may map between the commits it asks for (a flush): as a
/// settling's (`SETTLE_COMMIT`), about 32 Ki mapping records a commit — its encoding and
/// its frees' end bounded — not a whole volume's at once at the end.
pub const OWN_COMMIT: u64 = 1 << 15;

/// Times [`decouple`] copies up and tries to apply before it gives up: a snapshot of the
/// volume taken meanwhile shares its clusters again (each pass copies what that shared).
pub const DECOUPLE_PASSES: u32 = 3;

/// What [`decouple`] looks at as it goes (`PoolMeta::volume`, `PoolMeta::next_shared`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sharing {
    pub parent: u32,
    pub read_only: bool,
    /// Byte offset of the first cluster at or after the one asked for that a copy-up would
    /// copy (`PoolMeta::shared_clusters`).
    pub next_shared: Option<u64>,
    /// Bytes from `next_shared` on where a copy-up only maps (up to the first such cluster
    /// with data to copy; at most [`OWN_RUN`] clusters).
    pub quiet: u64,
}

impl Sharing {
    /// Volume `id` as `meta` has it now, looking from byte `from` on for clusters a copy-up
    /// (`in_place` or not) would copy.
    pub fn of(meta: &PoolMeta, id: u32, from: u64, in_place: bool) -> Result<Sharing, PoolError> {
        let v = meta.volume(id)?;
        let (parent, read_only) = (v.parent, v.read_only);
        let cb = meta.cluster_bytes();
        let found = meta.next_shared(id, from / cb, in_place, OWN_RUN)?;
        let (next_shared, quiet) = match found {
            Some((vc, quiet)) => (Some(vc * cb), quiet * cb),
            None => (None, 0),
        };
        Ok(Sharing { parent, read_only, next_shared, quiet })
    }
}

/// What drives [`decouple`]: looks at the pool state, and requests run to completion.
pub trait Driver<B> {
    /// Volume `id` now, looking from byte `from` on for clusters a copy-up (`in_place` or
    /// not) would copy ([`Sharing::of`]).
    fn look(&mut self, id: u32, from: u64, in_place: bool) -> Result<Sharing, PoolError>;
    /// The clusters decoupling volume `id` takes, and the pool's free clusters now
    /// (`PoolMeta::decouple_room`).
    fn room(&mut self, id: u32, inflate: bool) -> Result<(u64, u64), PoolError>;
    /// Runs request `cmd` of volume `vol` (0: pool-wide) to completion: its result.
    fn run(&mut self, vol: u32, cmd: Cmd<B>) -> Result<i32, PoolError>;
    /// Called after each copy-up with the bytes it copied, before the next: the driver keeps
    /// the pool's pace of copying here (the daemon waits as its [`crate::pace::Pace`] says);
    /// an error ends the decoupling (what was copied stays copied). By default, no pace.
    fn copied(&mut self, bytes: u64) -> Result<(), PoolError> {
        let _ = bytes;
        Ok(())
    }
    /// One step of [`settle`]: the units it spent ([`Cmd::Settle`]'s result). By default
    /// that request, run as any other; a driver may instead run its one decision where it
    /// stands, `PoolMeta::settle(SETTLE_STEP)` under a shared borrow (the daemon's control
    /// thread does: no core spends the step, and no round trip to one per step).
    fn settle_step(&mut self) -> Result<i32, PoolError> {
        self.run(0, Cmd::Settle)
    }
}

/// Decouples volume `id` from its parent (`bdev_lvol_decouple_parent`) or, with `inflate`,
/// inflates it (`bdev_lvol_inflate`): every cluster it shares with another volume is copied
/// into one of its own — a [`Cmd::Own`] request from each shared cluster found, of
/// [`OWN_STEP`] where there is data to copy, of the whole run (at most [`OWN_RUN`] clusters)
/// where the shared clusters hold nothing written and are only mapped, racing with its I/O
/// like any write, with a commit every [`OWN_COMMIT`] clusters covered — then
/// [`ControlOp::Decouple`] applies through [`control`] (durable when it returns, an
/// inflation's holes mapped by the settling after it). A snapshot taken in between shares clusters again: the pass is repeated,
/// up to [`DECOUPLE_PASSES`] times, its room looked at again first. The driver runs each
/// request (the daemon: on a core; the synchronous pool and the tests: in place) and paces
/// the copy-ups ([`Driver::copied`], charged the bytes each read and wrote). Returns the
/// clusters copied (read and written; a shared cluster with nothing written in it only gets
/// a fresh one mapped, and counts nothing). Refusals: a read-only volume, `ReadOnly`; one
/// with no parent that shares nothing, `NoParent` (not for `inflate`, which makes any thin
/// volume thick); a pool without the room for every copy (and, inflating, every hole),
/// `NoSpace` before anything is copied; whatever a request refuses (the room taken by writes
/// meanwhile, a failed pool) — what was copied stays copied, harmlessly (the volume reads the
/// same), and a retry goes on from there.
pub fn decouple<B>(
    d: &mut impl Driver<B>,
    id: u32,
    inflate: bool,
    cluster_bytes: u64,
) -> Result<u64, PoolError> {
    // Inflating, the copy-ups also take the clusters a write could not land in now: the
    // volume is thick from the moment it applies, before its commit is durable.
    let in_place = inflate;
    let first = d.look(id, 0, in_place)?;
    if first.read_only {
        return Err(PoolError::ReadOnly(id.into()));
    }
    if !inflate && first.parent == 0 && first.next_shared.is_none() {
        return Err(PoolError::NoParent(id.into()));
    }
    // A pool without the room is refused before anything is copied (writes meanwhile may
    // still take it: then a copy-up or the apply refuses, what was copied staying copied).
    let (needed, free) = d.room(id, inflate)?;
    if needed > free {
        return Err(PoolError::NoSpace);
    }
    let step = OWN_STEP.next_multiple_of(cluster_bytes.max(1));
    // Clusters with data one request copies at most (`meta::OWN_COPY_MAX`).
    let copy_max = (crate::meta::OWN_COPY_MAX / cluster_bytes.max(1)).max(1);
    let (mut copied, mut uncommitted) = (0u64, 0u64);
    for pass in 1..=DECOUPLE_PASSES {
        let mut next = if pass == 1 {
            first
        } else {
            // A snapshot taken meanwhile shares again what was copied: the room for copying it
            // again is looked at before anything more is copied.
            let (needed, free) = d.room(id, inflate)?;
            if needed > free {
                return Err(PoolError::NoSpace);
            }
            d.look(id, 0, in_place)?
        };
        while let Some(at) = next.next_shared {
            // A run that only maps goes in one request (no buffer, no I/O: one round trip
            // to the core, not one per megabyte); one with data to copy, a step. (A cluster
            // with data the request meets past its buffers' worth — none, unless the volume
            // changed since the look — stays shared: the next pass copies it.)
            let len = if next.quiet >= step { next.quiet } else { step };
            let n = d.run(id, Cmd::Own { offset: at, len, in_place })?;
            let n = u64::try_from(n).expect("a copy-up counts what it copied");
            copied += n;
            d.copied(n * cluster_bytes)?;
            // The clusters it covered (what it mapped, and perhaps some it found its own or
            // unmapped): a commit every so many.
            uncommitted += len / cluster_bytes.max(1);
            if uncommitted >= OWN_COMMIT {
                d.run(0, Cmd::Flush)?;
                uncommitted = 0;
            }
            // One that copied its buffers' worth may have left data past them (only if the
            // volume changed since the look): looked at again from where it began (what it
            // copied is its own now, skipped), else from its end.
            let from = if n >= copy_max { at } else { at + len };
            next = d.look(id, from, in_place)?;
        }
        // As every control operation: settled after (an inflation's holes mapped).
        match control(d, ControlOp::Decouple { id, inflate }) {
            Ok(_) => return Ok(copied),
            Err(PoolError::StillShared { .. }) if pass < DECOUPLE_PASSES => continue,
            Err(e) => return Err(e),
        }
    }
    unreachable!("the last pass returns")
}

/// Runs control operation `op` (durable when it returns: the new volume's id, or 0), then
/// [`settle`]s: what every driver runs for a control operation, so a thick volume it made or
/// grew has every cluster mapped, and the space a delete or rollback gives back is free,
/// when it returns, as its effect is visible. The settling runs whatever the operation's
/// result (a request that timed out may still have applied) and after every operation (one
/// finds nothing to do at the cost of one step): work a settling could not finish (a commit
/// timed out) is done by the next control operation, or at the next open. A settling that
/// fails after the operation applied does not undo it: the operation's result is what is
/// returned.
pub fn control<B>(d: &mut impl Driver<B>, op: ControlOp) -> Result<u32, PoolError> {
    let r = d.run(0, Cmd::Control(op));
    match settle(d) {
        // A failed pool does nothing more until restarted: said once, where it failed.
        Ok(_) | Err(PoolError::Failed(_)) => {}
        Err(e) => tracing::warn!(error = %e, "settling what control operations left (mapping \
            thick volumes' clusters, releasing deleted ones') stopped; the next control \
            operation or restart goes on with it"),
    }
    r.map(|id| u32::try_from(id).expect("a control operation returns an id or 0"))
}

/// Does what control operations left to do in steps (`PoolMeta::settle`: the clusters of
/// thick volumes made or grown mapped, the trees of durable deletions and rollbacks
/// released) — steps of [`Cmd::Settle`], [`Driver::settle_step`], each bounded, until one
/// finds nothing left — committing what they did (a flush) every [`SETTLE_COMMIT`] units
/// and at the end, so it is durable and the space free when this returns. Returns the units
/// spent.
pub fn settle<B>(d: &mut impl Driver<B>) -> Result<u64, PoolError> {
    let (mut spent, mut uncommitted) = (0u64, 0u64);
    loop {
        let n = d.settle_step()?;
        let n = u64::try_from(n).expect("a settling step counts what it spent");
        if n > 0 {
            spent += n;
            uncommitted += n;
        }
        if uncommitted > 0 && (n == 0 || uncommitted >= SETTLE_COMMIT) {
            d.run(0, Cmd::Flush)?;
            uncommitted = 0;
        }
        if n == 0 {
            return Ok(spent);
        }
    }
}
