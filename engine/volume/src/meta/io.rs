//! The data path's decisions: where a read comes from, where a write goes (in place or
//! copy-on-write into a fresh cluster), holds for read-modify-writes, trims; a request that
//! must wait is parked in the lock table. Family decisions (`impl Family`), reaching the pool
//! only through a [`Link`]; `PoolMeta` wraps them with the pool's health check.

use super::*;

/// Passes of taking other families' stocks back before a write short of fresh clusters fails
/// with `NoSpace` (one suffices unless other decisions take the clusters meanwhile); the write
/// plans once more after each.
const TAKE_BACK_PASSES: usize = 4;

/// How a family's planning of a write ended when nothing blocked it.
pub(super) enum Planned {
    /// Planned: every fresh cluster taken from the stock.
    Ready,
    /// Nothing planned: the write needs this many fresh clusters and the stock holds fewer (the
    /// pool refills it and plans again).
    Short(u64),
}

impl Family {
    /// The volume, if `[offset, offset + len)` is a valid range of it for the access.
    fn check_range(
        &self,
        id: u32,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<&Volume, PoolError> {
        let v = self.volume(id)?;
        if write && v.read_only {
            return Err(PoolError::ReadOnly(id.into()));
        }
        if !offset.is_multiple_of(PIECE) || !len.is_multiple_of(PIECE) {
            return Err(PoolError::Unaligned);
        }
        if offset.checked_add(len).is_none_or(|end| end > v.size_bytes) {
            return Err(PoolError::Range(id.into()));
        }
        Ok(v)
    }

    fn plan_read_into(
        &self,
        id: u32,
        offset: u64,
        len: u64,
        out: &mut Vec<ReadPiece>,
    ) -> Result<(), PoolError> {
        let tree = &self.check_range(id, offset, len, false)?.tree;
        let mut at = offset;
        while at < offset + len {
            let Span { vc, cluster_end, first_bit, bits } = self.span(at, offset + len);
            let e = tree.get(vc);
            for bit in first_bit..first_bit + u64::from(bits.count_ones()) {
                let piece = match e.cluster() {
                    Some(c) if e.written() & (1 << bit) != 0 => {
                        ReadPiece::Disk { offset: self.cluster_offset(c) + bit * PIECE, len: PIECE }
                    }
                    _ => ReadPiece::Zero { len: PIECE },
                };
                match (out.last_mut(), piece) {
                    (Some(ReadPiece::Zero { len }), ReadPiece::Zero { len: add }) => *len += add,
                    (
                        Some(ReadPiece::Disk { offset: o, len }),
                        ReadPiece::Disk { offset: next, len: add },
                    ) if *o + *len == next => *len += add,
                    _ => out.push(piece),
                }
            }
            at = cluster_end;
        }
        Ok(())
    }

    // ---- writes -----------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)] // `PoolMeta::plan_write`'s, and the link
    fn plan_write(
        &mut self,
        id: u32,
        offset: u64,
        len: u64,
        hold: u64,
        kind: WriteKind,
        waiter: Waiter,
        plans: &mut Vec<WritePlan>,
        link: &mut Link,
    ) -> Result<Planned, Blocked> {
        // Copying clusters up reaches the volume's end at most (it may have shrunk since the
        // driver looked).
        let len = match kind {
            WriteKind::Data => len,
            WriteKind::Own { .. } => {
                let size = self.volume(id)?.size_bytes;
                if offset >= size {
                    return Ok(Planned::Ready); // shrunk below it: nothing left to copy
                }
                len.min(size - offset)
            }
        };
        self.check_range(id, offset, len, true)?;
        let v = &self.volumes[&id];
        // A frozen volume takes no new write; a read-modify-write that holds its clusters is
        // already in flight (counted by the freeze) and must finish, or the freeze would wait
        // for it forever.
        if v.frozen > 0 && hold == 0 {
            self.locks.park_frozen(id, waiter);
            return Err(Blocked::Wait);
        }
        // First decide every span (no state changes), so a busy span reserves nothing: each
        // plan names the old cluster for now, and its offset within the cluster.
        let mut fresh_needed = 0u64;
        // A copy-up's clusters with data to copy, and how many it may copy.
        let (mut copies, copy_max) = (0u64, (OWN_COPY_MAX / self.geo.cluster_bytes).max(1));
        let mut at = offset;
        while at < offset + len {
            let s = self.span(at, offset + len);
            let e = v.tree.get(s.vc);
            let (_, owned) = self.ownership(&v.tree, s.vc, e, link.refs);
            if let WriteKind::Own { in_place } = kind {
                if !self.copied_up(&v.tree, s.vc, e, in_place, link.refs) {
                    // Its own already (a copy-up writes nothing in it), or nothing to copy.
                    at = s.cluster_end;
                    continue;
                }
                if e.written() != 0 {
                    if copies == copy_max {
                        // Its copy buffers are spent: the rest is left shared, for the next
                        // request (`ops::decouple` looks again from where this one began
                        // when one copies this many).
                        break;
                    }
                    copies += 1;
                }
            }
            let state = self.locks.state(id, s.vc);
            // A cluster held by a read-modify-write takes only that request's write. A mutant
            // for the simulator's own test (tests/e2e/sim_mutants.sh): a write beside a
            // copy-on-write in flight in its cluster.
            let cow = state.cow && !cfg!(feature = "mutant-skip-lock");
            if cow || (state.held != 0 && state.held != hold) {
                self.locks.park_cluster(id, s.vc, waiter);
                plans.clear();
                return Err(Blocked::Wait);
            }
            if !owned {
                // Writers in place in a cluster that is no longer owned: a copy-on-write waits
                // for them. (Ownership is lost only by sharing, which a snapshot, rollback or
                // delete drains writes for, so the simulator does not reach this.)
                if state.writers > 0 {
                    self.locks.park_cluster(id, s.vc, waiter);
                    plans.clear();
                    return Err(Blocked::Wait);
                }
                fresh_needed += 1;
            }
            let plan = match kind {
                WriteKind::Data => WritePlan {
                    vcluster: s.vc,
                    offset: s.first_bit * PIECE,
                    req_start: at - offset,
                    req_len: s.cluster_end - at,
                    cluster: e.cluster().unwrap_or(0),
                    copy_from: if owned {
                        None
                    } else {
                        e.cluster().map(|c| self.cluster_offset(c))
                    },
                    fresh: !owned,
                    bits: s.bits,
                    base_written: if owned { 0 } else { e.written() },
                },
                // The whole cluster copied (when a piece of it is written) into a fresh one
                // mapped with the same written pieces: its content unchanged, its own.
                WriteKind::Own { .. } => WritePlan {
                    vcluster: s.vc,
                    offset: 0,
                    req_start: 0,
                    req_len: 0,
                    cluster: 0,
                    copy_from: e
                        .cluster()
                        .filter(|_| e.written() != 0)
                        .map(|c| self.cluster_offset(c)),
                    fresh: true,
                    bits: 0,
                    base_written: e.written(),
                },
            };
            plans.push(plan);
            at = s.cluster_end;
        }
        if plans.is_empty() {
            // Copying up found nothing to copy (a data write always plans a span).
            debug_assert!(matches!(kind, WriteKind::Own { .. }));
            return Ok(Planned::Ready);
        }
        if fresh_needed > self.stock.len() {
            plans.clear();
            return Ok(Planned::Short(fresh_needed));
        }
        for p in plans.iter_mut() {
            if p.fresh {
                let fresh = self.stock.take().expect("counted in stock above");
                self.epoch_fresh.insert(fresh);
                self.fresh_inflight += 1;
                p.cluster = fresh;
            }
            p.offset += self.cluster_offset(p.cluster);
            self.locks.add_writer(id, p.vcluster, p.fresh);
        }
        self.volumes.get_mut(&id).expect("checked").writes_inflight += 1;
        Ok(Planned::Ready)
    }

    fn unbusy(&mut self, id: u32, vc: u64) {
        self.locks.remove_writer(id, vc);
    }

    fn hold(&mut self, id: u32, vcs: &[u64], waiter: Waiter) -> Result<u64, Blocked> {
        let v = self.volume(id)?;
        if v.read_only {
            return Err(PoolError::ReadOnly(id.into()).into());
        }
        if v.frozen > 0 {
            self.locks.park_frozen(id, waiter);
            return Err(Blocked::Wait);
        }
        if let Some(vc) = vcs.iter().find(|vc| self.locks.busy(id, **vc)) {
            self.locks.park_cluster(id, *vc, waiter);
            return Err(Blocked::Wait);
        }
        self.next_hold += 1;
        let token = self.next_hold;
        for vc in vcs {
            self.locks.hold(id, *vc, token);
        }
        self.volumes.get_mut(&id).expect("checked").writes_inflight += 1;
        Ok(token)
    }

    fn release(&mut self, id: u32, vcs: &[u64], token: u64) {
        for vc in vcs {
            self.locks.unhold(id, *vc, token);
        }
        self.end_write(id);
    }

    fn finish_span(&mut self, id: u32, p: &WritePlan, link: &mut Link) {
        self.unbusy(id, p.vcluster);
        if p.fresh {
            self.fresh_inflight -= 1;
        }
        let Some(v) = self.volumes.get(&id) else {
            if p.fresh {
                self.abandon_fresh(p, link);
            }
            return;
        };
        let e = v.tree.get(p.vcluster);
        let entry = if p.fresh {
            // The fresh cluster holds the carried-over pieces plus the new ones; the cluster's
            // exclusive hold kept the entry as planned.
            Entry::new(p.cluster, p.base_written | p.bits)
        } else if e.cluster() == Some(p.cluster) {
            Entry::new(p.cluster, e.written() | p.bits)
        } else {
            return;
        };
        if entry != e {
            self.log(Record::MapSet { volume: id, vcluster: p.vcluster, entry: entry.0 }, link);
        }
    }

    /// A fresh cluster no mapping took (its volume went, or its span failed): freed like any
    /// other cluster.
    fn abandon_fresh(&mut self, p: &WritePlan, link: &mut Link) {
        if link.refs.get(p.cluster) == 0 {
            self.free(p.cluster, link);
        }
    }

    fn abort_span(&mut self, id: u32, p: &WritePlan, link: &mut Link) {
        self.unbusy(id, p.vcluster);
        if p.fresh {
            self.fresh_inflight -= 1;
            self.abandon_fresh(p, link);
        }
    }

    pub(super) fn end_write(&mut self, id: u32) {
        if let Some(v) = self.volumes.get_mut(&id) {
            v.writes_inflight -= 1;
            if v.writes_inflight == 0 {
                self.locks.drained(id);
            }
        }
    }

    fn trim(
        &mut self,
        id: u32,
        offset: u64,
        len: u64,
        waiter: Waiter,
        link: &mut Link,
    ) -> Result<(), Blocked> {
        self.check_range(id, offset, len, true)?;
        if self.volumes[&id].frozen > 0 {
            self.locks.park_frozen(id, waiter);
            return Err(Blocked::Wait);
        }
        let mut at = offset;
        while at < offset + len {
            let s = self.span(at, offset + len);
            if self.locks.busy(id, s.vc) {
                self.locks.park_cluster(id, s.vc, waiter);
                return Err(Blocked::Wait);
            }
            at = s.cluster_end;
        }
        self.trim_unchecked(id, offset, len, link);
        Ok(())
    }

    /// Trims a checked range of a volume nothing else is writing.
    pub(super) fn trim_unchecked(&mut self, id: u32, offset: u64, len: u64, link: &mut Link) {
        let mut at = offset;
        while at < offset + len {
            let Span { vc, cluster_end, bits, .. } = self.span(at, offset + len);
            let v = &self.volumes[&id];
            let e = v.tree.get(vc);
            if let Some(c) = e.cluster() {
                let left = e.written() & !bits;
                // A thick volume keeps its cluster (its pieces read zeros): the room stays its.
                let keep = v.thick && link.refs.get(c) == 1 && !v.tree.leaf_shared(vc);
                let entry = if left == 0 && !keep { Entry::UNMAPPED } else { Entry::new(c, left) };
                if entry != e {
                    self.log(Record::MapSet { volume: id, vcluster: vc, entry: entry.0 }, link);
                }
            }
            at = cluster_end;
        }
    }
}

impl PoolMeta {
    /// Where `[offset, offset + len)` of volume `id` comes from, in order, runs merged.
    pub fn plan_read(&self, id: u32, offset: u64, len: u64) -> Result<Vec<ReadPiece>, PoolError> {
        let mut out = Vec::new();
        self.plan_read_into(id, offset, len, &mut out)?;
        Ok(out)
    }

    /// [`PoolMeta::plan_read`] into `out` (cleared first): a caller that reads often keeps
    /// one vector.
    pub fn plan_read_into(
        &self,
        id: u32,
        offset: u64,
        len: u64,
        out: &mut Vec<ReadPiece>,
    ) -> Result<(), PoolError> {
        out.clear();
        let Some(fam) = self.family(id) else { return Err(PoolError::NoVolume(id)) };
        fam.plan_read_into(id, offset, len, out)
    }

    /// Plans a write of `[offset, offset + len)` into `plans` (cleared first; left empty when
    /// it fails): one plan per cluster it touches. [`Blocked::Wait`] when a cluster it needs is
    /// being copied or the volume is frozen: nothing was reserved and `waiter` is parked until
    /// that changes. Each plan must be finished with `finish_span` (or `abort_span`), then the
    /// write with `end_write`.
    pub fn plan_write(
        &self,
        id: u32,
        offset: u64,
        len: u64,
        hold: u64,
        waiter: Waiter,
        plans: &mut Vec<WritePlan>,
    ) -> Result<(), Blocked> {
        self.plan_write_with(id, offset, len, hold, WriteKind::Data, waiter, plans, false)
            .map(|_| ())
    }

    /// `plan_write` and `begin_io` in one decision (one lock of the family): the write's I/O
    /// ticket.
    pub fn plan_write_io(
        &self,
        id: u32,
        offset: u64,
        len: u64,
        hold: u64,
        waiter: Waiter,
        plans: &mut Vec<WritePlan>,
    ) -> Result<Ticket, Blocked> {
        let t =
            self.plan_write_with(id, offset, len, hold, WriteKind::Data, waiter, plans, true)?;
        Ok(t.expect("a planned write's ticket"))
    }

    /// Plans copying up the clusters of `[offset, offset + len)` (cluster-aligned; clipped to
    /// the volume's end) that volume `id` does not own alone (with `in_place`, that a write
    /// could not land in), with the I/O ticket: a [`WriteKind::Own`] plan per such cluster,
    /// none for clusters it owns or leaves unmapped
    /// (`plans` empty: nothing to do, and no write to end — only the ticket). Otherwise like
    /// [`Self::plan_write_io`]: each plan finished with `finish_span` or `abort_span`, the last
    /// with `end_write_io`.
    pub fn plan_own_io(
        &self,
        id: u32,
        offset: u64,
        len: u64,
        in_place: bool,
        waiter: Waiter,
        plans: &mut Vec<WritePlan>,
    ) -> Result<Ticket, Blocked> {
        let cb = self.geo.cluster_bytes;
        assert!(
            offset.is_multiple_of(cb) && len.is_multiple_of(cb),
            "copying up whole clusters: {offset}+{len}"
        );
        let kind = WriteKind::Own { in_place };
        let t = self.plan_write_with(id, offset, len, 0, kind, waiter, plans, true)?;
        Ok(t.expect("a planned write's ticket"))
    }

    #[allow(clippy::too_many_arguments)] // `plan_write`'s, and whether to take a ticket
    fn plan_write_with(
        &self,
        id: u32,
        offset: u64,
        len: u64,
        hold: u64,
        kind: WriteKind,
        waiter: Waiter,
        plans: &mut Vec<WritePlan>,
        io: bool,
    ) -> Result<Option<Ticket>, Blocked> {
        plans.clear();
        self.ok()?;
        let Some(&f) = self.family_of.get(&id) else {
            return Err(PoolError::NoVolume(id).into());
        };
        // Planned with the family's lock held throughout: a stock found short is refilled from
        // the allocator (the leaf lock after the family's) and the write planned again in the
        // same decision, so no other decision can take what was lent in between. The first
        // pass lends at least a batch; when the allocator itself was short, the other
        // families' stocks come back to it (one family at a time, holding no other lock) and
        // the write plans again lending only what it needs — again while a pass brings
        // clusters back (another decision may take them meanwhile) — so a pool is full only
        // when every free cluster is used.
        for pass in 0..=TAKE_BACK_PASSES {
            let plan = |fam: &mut Family, link: &mut Link| -> Result<_, Blocked> {
                // A thick volume whose clusters are still being mapped maps those the write
                // lands in first, from what was promised to it: it writes in place.
                let cb = self.geo.cluster_bytes;
                let to = offset.saturating_add(len).div_ceil(cb);
                self.fill_for_write(fam, link, id, offset / cb, to);
                let mut planned =
                    fam.plan_write(id, offset, len, hold, kind, waiter, plans, link)?;
                if let Planned::Short(want) = planned {
                    if pass == 0 {
                        self.refills.fetch_add(1, Ordering::Relaxed);
                    }
                    let batch = if pass == 0 { want.max(Stock::BATCH) } else { want };
                    self.alloc.lock().lend(batch.saturating_sub(fam.stock.len()), &mut fam.stock);
                    planned = fam.plan_write(id, offset, len, hold, kind, waiter, plans, link)?;
                }
                Ok(match planned {
                    Planned::Ready => Ok(io.then(|| Ticket(f, fam.begin_io()))),
                    Planned::Short(want) => Err(want),
                })
            };
            let want = match self.deciding(id, plan).expect("a named volume's family")? {
                Ok(ticket) => return Ok(ticket),
                Err(want) => want,
            };
            if pass == 0 {
                self.refills_taking_back.fetch_add(1, Ordering::Relaxed);
            }
            if pass == TAKE_BACK_PASSES || self.take_back_stocks(Some(f)) == 0 {
                break;
            }
            tracing::trace!(family = f, want, pass, "stocks taken back for a short write");
        }
        Err(PoolError::NoSpace.into())
    }

    /// `plan_read_into` and `begin_io` in one decision (one lock of the family): the read's
    /// I/O ticket.
    pub fn plan_read_io(
        &self,
        id: u32,
        offset: u64,
        len: u64,
        out: &mut Vec<ReadPiece>,
    ) -> Result<Ticket, PoolError> {
        out.clear();
        let Some(&f) = self.family_of.get(&id) else { return Err(PoolError::NoVolume(id)) };
        let mut fam = self.fams.get(f).expect("a named volume's family");
        fam.plan_read_into(id, offset, len, out)?;
        Ok(Ticket(f, fam.begin_io()))
    }

    /// Takes every family's stock but `except`'s back into the allocator, one family at a time
    /// with no other lock held; returns how many clusters came back.
    pub(super) fn take_back_stocks(&self, except: Option<u32>) -> u64 {
        let mut back = 0;
        for (g, mut other) in self.fams.iter() {
            if Some(g) != except && !other.stock.is_empty() {
                let clusters: Vec<u64> = other.stock.drain().collect();
                drop(other);
                back += clusters.len() as u64;
                self.alloc.lock().take_back(clusters);
            }
        }
        back
    }

    /// For a read-modify-write, in one decision (one lock of the family): checks that the
    /// pieces at `edges` are within the volume and plans their reads (into `edge_plans`, one
    /// list per edge), holds volume clusters `vcs` exclusively, and takes the I/O ticket — so
    /// the edges' mapping cannot change between their planning and the hold. Until `release`
    /// no other write, copy-on-write or trim touches the clusters, so the pieces read and
    /// merged cannot change meanwhile. [`Blocked::Wait`] when one is in use or the volume is
    /// frozen (`waiter` parked).
    pub fn hold_io(
        &self,
        id: u32,
        vcs: &[u64],
        edges: &[u64],
        waiter: Waiter,
        edge_plans: &mut Vec<Vec<ReadPiece>>,
    ) -> Result<(u64, Ticket), Blocked> {
        let Some(&f) = self.family_of.get(&id) else {
            return Err(PoolError::NoVolume(id).into());
        };
        self.deciding(id, |fam, _| {
            edge_plans.clear();
            for &at in edges {
                let mut pieces = Vec::new();
                fam.plan_read_into(id, at, PIECE, &mut pieces)?;
                edge_plans.push(pieces);
            }
            // A bad range is refused as such before a failed pool is (as `hold` alone did).
            self.ok()?;
            let token = fam.hold(id, vcs, waiter)?;
            Ok((token, Ticket(f, fam.begin_io())))
        })
        .expect("a named volume's family")
    }

    pub fn release(&self, id: u32, vcs: &[u64], token: u64) {
        self.deciding(id, |fam, _| fam.release(id, vcs, token)).expect("a held volume's family")
    }

    /// One plan's data is on the media (completed, not necessarily durable): map it.
    pub fn finish_span(&self, id: u32, p: &WritePlan) {
        self.deciding(id, |fam, link| fam.finish_span(id, p, link))
            .expect("a planned volume's family")
    }

    /// A planned span failed: a fresh cluster goes back, the mapping is unchanged.
    pub fn abort_span(&self, id: u32, p: &WritePlan) {
        self.deciding(id, |fam, link| fam.abort_span(id, p, link))
            .expect("a planned volume's family")
    }

    /// A write's last span ended — mapped (`mapped`: its data is on the media) or aborted —
    /// then the write and its I/O, in one decision (one lock of its family): `finish_span` or
    /// `abort_span`, `end_write` and `end_io` in one.
    pub fn end_write_io(&self, id: u32, t: Ticket, last: &WritePlan, mapped: bool) {
        debug_assert_eq!(self.family_of.get(&id), Some(&t.0), "a write's ticket is its family's");
        let surplus = self
            .deciding(id, |fam, link| {
                if mapped {
                    fam.finish_span(id, last, link);
                } else {
                    fam.abort_span(id, last, link);
                }
                fam.end_write(id);
                fam.end_io(t.1)
            })
            .expect("a planned volume's family");
        self.give_back(surplus);
    }

    /// Every span of a planned write has finished or aborted.
    pub fn end_write(&self, id: u32) {
        self.deciding(id, |fam, _| fam.end_write(id)).expect("a planned volume's family")
    }

    /// Trims whole 4 KiB pieces: they read zeros; a cluster with no written piece is released
    /// (a thick volume's is kept).
    /// [`Blocked::Wait`] when a write to one of its clusters is in flight or the volume is
    /// frozen (`waiter` parked).
    pub fn trim(&self, id: u32, offset: u64, len: u64, waiter: Waiter) -> Result<(), Blocked> {
        self.ok()?;
        self.deciding(id, |fam, link| fam.trim(id, offset, len, waiter, link))
            .unwrap_or_else(|| Err(PoolError::NoVolume(id).into()))
    }

    /// Trims a checked range of a volume nothing else is writing.
    pub(super) fn trim_unchecked(&self, id: u32, offset: u64, len: u64) {
        self.deciding(id, |fam, link| fam.trim_unchecked(id, offset, len, link))
            .expect("a checked volume's family")
    }
}
