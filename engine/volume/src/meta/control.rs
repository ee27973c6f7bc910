//! Control operations (create, snapshot, clone, rollback, delete, resize, rename,
//! configuration), the metadata admission that keeps a checkpoint within its half, and
//! freezing for quiescence.

use super::*;

impl PoolMeta {
    /// The largest checkpoint the state could need if every volume were fully written, with
    /// `clusters` more volume clusters, `volumes` more volumes and `config` more config bytes.
    fn worst_checkpoint(&self, clusters: u64, volumes: u64, config: u64) -> u64 {
        let cb = self.geo.cluster_bytes;
        let vols = self.volumes();
        let mapped: u64 = vols.values().map(|v| v.size_bytes.div_ceil(cb)).sum();
        let config_now: u64 = self
            .config
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64 + CHECKPOINT_BYTES_PER_CONFIG)
            .sum();
        (mapped + clusters) * CHECKPOINT_BYTES_PER_CLUSTER
            + (vols.len() as u64 + volumes) * CHECKPOINT_BYTES_PER_VOLUME
            + config_now
            + config
            + CHECKPOINT_HEADER
    }

    /// Refuses a change after which a checkpoint might not fit its metadata half.
    fn admit(&self, extra_bytes: u64, volumes: u64, config: u64) -> Result<(), PoolError> {
        let limit = self.checkpoint_half_blocks() * BLOCK_SIZE as u64;
        let wanted =
            self.worst_checkpoint(extra_bytes.div_ceil(self.geo.cluster_bytes), volumes, config);
        if wanted > limit {
            return Err(PoolError::Overprovisioned { limit, wanted });
        }
        Ok(())
    }

    fn new_name(&self, name: &str) -> Result<(), PoolError> {
        if !valid_name(name) {
            return Err(PoolError::BadName(name.into()));
        }
        if self.find(name).is_ok() {
            return Err(PoolError::NameTaken(name.into()));
        }
        Ok(())
    }

    /// The id a new volume takes: ids only grow while the pool is open (one names one volume
    /// until the pool closes; an open counts on from the highest in use), so once a volume
    /// has id `VOLUME_ID_MAX - 1` there is none left until it is deleted and the pool
    /// reopened.
    fn new_id(&self) -> Result<u32, PoolError> {
        if self.next_id == VOLUME_ID_MAX {
            return Err(PoolError::IdsExhausted);
        }
        Ok(self.next_id)
    }

    /// Whether volume `id` has no write in flight (a freeze has taken effect).
    pub fn quiet(&self, id: u32) -> bool {
        self.volume(id).map_or(true, |v| v.writes_inflight == 0)
    }

    /// Freezes volume `id` (`true`) for one more control operation, or ends one operation's
    /// freeze (`false`): new writes wait while any holds it; they are woken when the last
    /// lets go.
    pub fn set_frozen(&mut self, id: u32, frozen: bool) {
        let Some(fam) = self.family_mut(id) else { return };
        let Some(v) = fam.volumes.get_mut(&id) else {
            // Gone (deleted by the operation that froze it): its waiters fail when woken.
            if !frozen {
                fam.locks.thawed(id);
            }
            return;
        };
        if frozen {
            v.frozen += 1;
        } else {
            assert!(v.frozen > 0, "thawing volume {id} that is not frozen");
            v.frozen -= 1;
            if v.frozen == 0 {
                fam.locks.thawed(id);
            }
        }
    }

    /// Parks `waiter` (a control operation) until volume `id` has no write in flight.
    pub fn park_drained(&mut self, id: u32, waiter: Waiter) {
        let quiet = self.quiet(id);
        // A volume that is gone is quiet: its waiter proceeds (and fails) at once, through the
        // commit waiters' table when not even its family is left.
        let locks = match self.family_mut(id) {
            Some(fam) => &mut fam.locks,
            None => &mut self.commit_waiters,
        };
        locks.park_drained(id, waiter);
        if quiet {
            // Nothing would wake it: it proceeds at once.
            locks.drained(id);
        }
    }

    /// Takes `waiter` out of volume `id`'s drain queue (it gave up waiting); false when it was
    /// already woken.
    pub fn unpark_drained(&mut self, id: u32, waiter: Waiter) -> bool {
        self.family_mut(id).is_some_and(|f| f.locks.unpark_drained(id, waiter))
    }

    /// Parks `waiter` until the commit (or checkpoint) in flight ends.
    pub fn park_commit(&mut self, waiter: Waiter) {
        assert!(self.committing || self.failed.is_some(), "parking with no commit in flight");
        self.commit_waiters.park_commit(waiter);
    }

    /// Moves the requests woken since the last call into `out`.
    pub fn take_woken(&mut self, out: &mut Vec<Waiter>) {
        self.commit_waiters.take_woken(out);
        for f in self.borrowed.drain(..) {
            if let Some(fam) = self.fams.get_mut(f) {
                fam.locks.take_woken(out);
            }
        }
        if *self.woken_count.get_mut() > 0 {
            out.append(self.woken.get_mut());
            *self.woken_count.get_mut() = 0;
        }
    }

    /// Moves the requests woken by decisions made under a shared borrow into `out` (those of
    /// an exclusive borrow's operations are `take_woken`'s): one load of a shared count when
    /// nobody was woken.
    pub fn take_woken_shared(&self, out: &mut Vec<Waiter>) {
        if self.woken_count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut woken = self.woken.lock();
        out.append(&mut woken);
        self.woken_count.store(0, Ordering::Relaxed);
    }

    /// Requests parked now, in every queue of every family and the commit's.
    pub fn parked(&self) -> usize {
        self.commit_waiters.parked() + self.fams.values().map(|f| f.locks.parked()).sum::<usize>()
    }

    /// Volume clusters with something in flight (lock table slots), in every family.
    pub fn lock_slots(&self) -> usize {
        self.fams.values().map(|f| f.locks.slots()).sum()
    }

    pub fn create_volume(&mut self, name: &str, size_bytes: u64) -> Result<u32, PoolError> {
        self.create(name, size_bytes, false)
    }

    /// A new volume, thin or thick. A thick one takes all its clusters now (all or none: a
    /// pool without the room refuses it, `NoSpace`): reserved for it at once, mapped by
    /// [`Self::settle`] steps (or by a write into one first); their pieces read zeros until
    /// written.
    pub fn create(&mut self, name: &str, size_bytes: u64, thick: bool) -> Result<u32, PoolError> {
        self.ok()?;
        self.new_name(name)?;
        if size_bytes == 0 || !size_bytes.is_multiple_of(PIECE) {
            return Err(PoolError::BadSize);
        }
        self.admit(size_bytes, 1, 0)?;
        let id = self.new_id()?;
        if thick {
            self.room_for(size_bytes.div_ceil(self.geo.cluster_bytes))?;
        }
        self.log(Record::VolumeCreate { id, parent: 0, size_bytes, name: name.into() });
        if thick {
            self.log(Record::Thick { id });
            self.promise_holes(id, 0, size_bytes.div_ceil(self.geo.cluster_bytes));
        }
        Ok(id)
    }

    /// Clusters from volume cluster `from` to the end of volume `id`'s size (`size_bytes`, or
    /// its own) that its tree leaves unmapped: a look at each (a repair's at open).
    fn holes(&self, id: u32, from: u64, size_bytes: Option<u64>) -> Vec<u64> {
        let Some(fam) = self.family(id) else { return Vec::new() };
        let Some(v) = fam.volumes.get(&id) else { return Vec::new() };
        let clusters = size_bytes.unwrap_or(v.size_bytes).div_ceil(self.geo.cluster_bytes);
        let reach = v.tree.capacity();
        (from..clusters).filter(|&vc| vc >= reach || v.tree.get(vc).cluster().is_none()).collect()
    }

    /// How many of volume `id`'s first `clusters` volume clusters its tree leaves unmapped,
    /// counted from what is mapped (the cost follows what is mapped, not the size; nothing
    /// listed, unlike [`Self::holes`]).
    pub(super) fn unmapped_clusters(&self, id: u32, clusters: u64) -> u64 {
        self.unmapped_in(id, 0, clusters)
    }

    /// How many of volume clusters `[from, to)` of volume `id` its tree leaves unmapped
    /// (beyond its reach: all), counted from what is mapped.
    fn unmapped_in(&self, id: u32, from: u64, to: u64) -> u64 {
        let mut mapped = 0u64;
        if let Some(fam) = self.family(id) {
            if let Some(v) = fam.volumes.get(&id) {
                v.tree.for_each_in(from, to, |_, _| mapped += 1);
            }
        }
        to.saturating_sub(from).saturating_sub(mapped)
    }

    /// Whether `clusters` free clusters can be had now for a thick volume, taking every
    /// family's stock back to the allocator first if it alone has too few; `NoSpace` if not,
    /// `ThickTooLarge` past what one operation maps ([`THICK_MAP_MAX`]).
    fn room_for(&mut self, clusters: u64) -> Result<(), PoolError> {
        if clusters > THICK_MAP_MAX {
            return Err(PoolError::ThickTooLarge { wanted: clusters, max: THICK_MAP_MAX });
        }
        if self.alloc.get_mut().free_count() < clusters {
            self.take_back_stocks(None);
        }
        if self.alloc.get_mut().free_count() < clusters {
            return Err(PoolError::NoSpace);
        }
        Ok(())
    }

    /// Maps each cluster within thick volume `id`'s size that its tree leaves unmapped to a
    /// fresh cluster with nothing written in it (`MapSet`s: its pieces read zeros). The caller
    /// made room for them ([`Self::room_for`] of these [`Self::holes`]): a repair's at open,
    /// before anything is served (a creation, growth or inflation promises its clusters
    /// instead, mapped in steps: `promise_holes`). The records follow the `Thick`
    /// record in the journal: a crash that keeps only some of them leaves a thick volume with
    /// holes, which opening the pool maps (`repair_thick`).
    fn map_holes(&mut self, id: u32, holes: &[u64]) {
        if holes.is_empty() {
            return;
        }
        let clusters: Vec<u64> = holes
            .iter()
            .map(|_| self.alloc.get_mut().alloc().expect("room made for every hole"))
            .collect();
        let (fam, mut link) = self.split(id).expect("a named volume's family");
        for (&vcluster, c) in holes.iter().zip(clusters) {
            fam.epoch_fresh.insert(c);
            let entry = Entry::new(c, 0).0;
            fam.log(Record::MapSet { volume: id, vcluster, entry }, &mut link);
        }
        *self.family_pending.get_mut() += holes.len();
    }

    /// After loading: a thick volume whose creation or growth a crash cut short (its `Thick`
    /// or `Resize` record kept, some of its `MapSet`s not) gets its holes mapped now (records
    /// pending for the next commit), or, where the pool lacks the room, becomes thin (a
    /// checkpoint then writes it thin; until one does, each open tries again), with a warning
    /// either way.
    pub(super) fn repair_thick(&mut self) {
        let thick: Vec<u32> =
            self.volumes().iter().filter(|(_, v)| v.thick).map(|(&id, _)| id).collect();
        for id in thick {
            // Every cluster of a sound thick volume is its own: one larger than the pool is
            // damage, and not looked through (it may name 2^42 clusters).
            let size = self.volume(id).map_or(0, |v| v.size_bytes);
            let clusters = size.div_ceil(self.geo.cluster_bytes);
            if clusters > self.sb.cluster_count {
                tracing::warn!(
                    volume = id,
                    size_bytes = size,
                    "thick volume larger than the pool (damaged metadata): it is thin now"
                );
                self.thin_out(id);
                continue;
            }
            // Counted from what is mapped before any list is made (nothing allocated: a
            // sound thick volume maps every cluster): one cut short lacks at most what one
            // operation maps (`THICK_MAP_MAX`; a growth is refused while it would leave more
            // promised and unmapped).
            let holes = self.unmapped_clusters(id, clusters);
            if holes == 0 {
                continue;
            }
            if holes <= THICK_MAP_MAX && self.room_for(holes).is_ok() {
                let missing = self.holes(id, 0, None);
                debug_assert_eq!(missing.len() as u64, holes, "holes counted as listed");
                tracing::warn!(
                    volume = id,
                    clusters = holes,
                    "thick volume cut short (a crash, or a stop while its clusters were being \
                     mapped): its missing clusters mapped"
                );
                self.map_holes(id, &missing);
                self.thick_repairs.0 += 1;
            } else {
                tracing::warn!(
                    volume = id,
                    clusters = holes,
                    "thick volume cut short (a crash, or a stop while its clusters were being \
                     mapped), and the pool lacks the room to complete it: it is thin now"
                );
                self.thin_out(id);
            }
        }
    }

    /// A thick volume that opening the pool cannot complete becomes thin.
    fn thin_out(&mut self, id: u32) {
        if let Some(v) = self.family_mut(id).and_then(|f| f.volumes.get_mut(&id)) {
            v.thick = false;
        }
        self.thick_repairs.1 += 1;
    }

    /// A read-only snapshot: O(1), it shares the volume's mapping. The caller has quiesced
    /// writes to `of`.
    pub fn snapshot(&mut self, of: u32, name: &str) -> Result<u32, PoolError> {
        self.ok()?;
        let size = self.volume(of)?.size_bytes;
        self.new_name(name)?;
        self.admit(size, 1, 0)?;
        let id = self.new_id()?;
        self.log(Record::Snapshot { id, of, name: name.into() });
        Ok(id)
    }

    /// A writable clone of a snapshot.
    pub fn clone_volume(&mut self, of: u32, name: &str) -> Result<u32, PoolError> {
        self.ok()?;
        let src = self.volume(of)?;
        if !src.read_only {
            return Err(PoolError::NotSnapshot(of.into()));
        }
        let size = src.size_bytes;
        self.new_name(name)?;
        self.admit(size, 1, 0)?;
        let id = self.new_id()?;
        self.log(Record::Clone { id, of, name: name.into() });
        Ok(id)
    }

    /// Volume `id` gets the contents (and size) of its snapshot `to`. The caller has quiesced
    /// writes to `id`.
    pub fn rollback(&mut self, id: u32, to: u32) -> Result<(), PoolError> {
        self.ok()?;
        let v = self.volume(id)?;
        if v.read_only {
            return Err(PoolError::ReadOnly(id.into()));
        }
        let snap = self.volume(to)?;
        if !snap.read_only {
            return Err(PoolError::NotSnapshot(to.into()));
        }
        if snap.parent != id {
            return Err(PoolError::NotSnapshotOf { snap: to.into(), vol: id.into() });
        }
        if self.family_of.get(&id) != self.family_of.get(&to) {
            // A snapshot joins its origin's family, live and when loaded: never reached.
            return Err(PoolError::Damaged(format!(
                "snapshot {to} of volume {id} is not in its family"
            )));
        }
        let grow = snap.size_bytes.saturating_sub(v.size_bytes);
        self.admit(grow, 0, 0)?;
        self.log(Record::Rollback { id, to });
        Ok(())
    }

    /// Makes volume `id` read-only for good: no write after this lands (the caller has
    /// quiesced its writes; those parked behind the freeze are refused when they wake), and it
    /// may be cloned as a snapshot is. One that is read-only already logs nothing.
    pub fn set_read_only(&mut self, id: u32) -> Result<(), PoolError> {
        self.ok()?;
        if self.volume(id)?.read_only {
            return Ok(());
        }
        self.log(Record::ReadOnly { id });
        debug_assert!(self.volume(id).is_ok_and(|v| v.read_only));
        Ok(())
    }

    /// Clusters volume `id` maps without owning them alone (named by another volume's leaf
    /// too, or through a leaf it shares) — with `in_place`, also those a write could not land
    /// in now (their sharing changed since the last durable commit): what
    /// [`crate::request::Cmd::Own`] copies up, and what must be none before
    /// [`Self::decouple`] applies. Walks the volume's tree.
    pub fn shared_clusters(&self, id: u32, in_place: bool) -> Result<u64, PoolError> {
        let fam = self.family(id).ok_or(PoolError::NoVolume(id))?;
        let v = fam.volumes.get(&id).ok_or(PoolError::NoVolume(id))?;
        let mut shared = 0;
        v.tree.for_each_in(0, v.tree.capacity(), |vc, e| {
            shared += u64::from(fam.copied_up(&v.tree, vc, e, in_place, &self.refs));
        });
        Ok(shared)
    }

    /// The first volume cluster at or after `from` that [`Self::shared_clusters`] counts, if
    /// any, with how many volume clusters from it on a copy-up would only map (up to the
    /// first counted cluster with something written in it, whose data it would copy; at most
    /// `quiet_max`). The walk follows what is mapped.
    pub fn next_shared(
        &self,
        id: u32,
        from: u64,
        in_place: bool,
        quiet_max: u64,
    ) -> Result<Option<(u64, u64)>, PoolError> {
        let fam = self.family(id).ok_or(PoolError::NoVolume(id))?;
        let v = fam.volumes.get(&id).ok_or(PoolError::NoVolume(id))?;
        let counted = |vc, e| fam.copied_up(&v.tree, vc, e, in_place, &self.refs);
        let Some(first) = v.tree.first_from(from, counted) else { return Ok(None) };
        let limit = first.saturating_add(quiet_max);
        let data =
            v.tree.first_from(first, |vc, e| vc >= limit || (e.written() != 0 && counted(vc, e)));
        Ok(Some((first, data.map_or(limit, |d| d.min(limit)) - first)))
    }

    /// Fresh clusters decoupling volume `id` takes (its clusters a copy-up copies, and,
    /// inflating a thin one, those it leaves unmapped), and the pool's free clusters now: what
    /// [`crate::ops::decouple`] looks at before it copies anything.
    /// An inflation whose holes are more than one operation maps is refused,
    /// `InflateTooLarge`.
    pub fn decouple_room(&self, id: u32, inflate: bool) -> Result<(u64, u64), PoolError> {
        let thick = self.volume(id)?.thick;
        let holes = self.inflation_holes(id, inflate && !thick)?;
        let copies = self.shared_clusters(id, inflate && !thick)?;
        Ok((copies + holes, self.free_clusters()))
    }

    /// The clusters inflating volume `id` reserves (0 unless `inflating`, a thin volume):
    /// its holes, counted, not listed (the walk follows what is mapped: a huge thin volume is
    /// mostly holes), less those promised already (a thick volume's, made thin by a rollback
    /// before its steps mapped them: reserved already, not twice). More than one operation
    /// maps is refused, `InflateTooLarge`.
    fn inflation_holes(&self, id: u32, inflating: bool) -> Result<u64, PoolError> {
        if !inflating {
            return Ok(0);
        }
        let clusters = self.volume(id)?.size_bytes.div_ceil(self.geo.cluster_bytes);
        let holes = self.unmapped_clusters(id, clusters).saturating_sub(self.promised(id));
        if holes > THICK_MAP_MAX {
            return Err(PoolError::InflateTooLarge { wanted: holes, max: THICK_MAP_MAX });
        }
        Ok(holes)
    }

    /// Volume `id` leaves its parent (`bdev_lvol_decouple_parent`): it names none from now on,
    /// so listings no longer call it a clone. With `inflate` (`bdev_lvol_inflate`) it is
    /// thick too: every cluster of its size left unmapped gets a fresh one reading zeros (all
    /// or none: without the room, `NoSpace`) — reserved at once, mapped by settling steps
    /// (`promise_holes`), a write into one mapping it first, as a thick creation's. Its shared
    /// clusters were copied up before ([`crate::request::Cmd::Own`]; inflating, with `in_place`: a thick volume's writes must
    /// never need a fresh cluster, not even before this commit is durable): any left — a
    /// snapshot taken since — refuse it, [`PoolError::StillShared`], changing nothing. The
    /// caller has quiesced its writes.
    /// Records: `Decouple` (where it names a parent), then `Thick`; the holes' `MapSet`s
    /// follow in steps, as a thick creation's (a crash before they are all durable leaves
    /// holes that opening the pool maps).
    pub fn decouple(&mut self, id: u32, inflate: bool) -> Result<(), PoolError> {
        self.ok()?;
        let v = self.volume(id)?;
        if v.read_only {
            return Err(PoolError::ReadOnly(id.into()));
        }
        let (parent, thick) = (v.parent, v.thick);
        let clusters = self.shared_clusters(id, inflate && !thick)?;
        if clusters > 0 {
            return Err(PoolError::StillShared { vol: id.into(), clusters });
        }
        let holes = self.inflation_holes(id, inflate && !thick)?;
        self.room_for(holes)?;
        if parent != 0 {
            self.log(Record::Decouple { id });
        }
        if inflate && !thick {
            self.log(Record::Thick { id });
            // Reserved now, mapped in steps (`settle`), as a thick creation's clusters.
            self.promise_holes(id, 0, holes);
        }
        debug_assert!(self.volume(id).is_ok_and(|v| v.parent == 0 && (v.thick || !inflate)));
        Ok(())
    }

    /// Deletes volume `id`: gone from now on; its tree is retired, its clusters released by
    /// [`Self::settle`] steps once the delete is durable (so the exclusive borrow that
    /// applies it costs nothing per cluster).
    pub fn delete(&mut self, id: u32) -> Result<(), PoolError> {
        self.ok()?;
        self.volume(id)?;
        self.log(Record::Delete { id });
        Ok(())
    }

    /// Grows or shrinks volume `id`. Shrinking drops written data beyond the new end only with
    /// `force` (the look for it walks what is mapped past the end: a thick volume's every
    /// cluster, about a nanosecond each); the last cluster's pieces past the end are trimmed,
    /// the clusters past it go with the `Resize` record (its apply cuts the tree and retires
    /// what it cut). The caller has quiesced writes to `id`.
    pub fn resize(&mut self, id: u32, size_bytes: u64, force: bool) -> Result<(), PoolError> {
        self.ok()?;
        let v = self.volume(id)?;
        if v.read_only {
            return Err(PoolError::ReadOnly(id.into()));
        }
        if size_bytes == 0 || !size_bytes.is_multiple_of(PIECE) {
            return Err(PoolError::BadSize);
        }
        let old = v.size_bytes;
        let thick = v.thick;
        if size_bytes > old {
            self.admit(size_bytes - old, 0, 0)?;
        }
        // A growth's clusters, counted from what is mapped there (a thick volume's holes below
        // its old end, while its clusters are still being mapped, are promised already).
        let grown_from = old.div_ceil(self.geo.cluster_bytes);
        let new_end = size_bytes.div_ceil(self.geo.cluster_bytes);
        let growth = if thick && new_end > grown_from {
            self.unmapped_in(id, grown_from, new_end)
        } else {
            0
        };
        // What one operation maps, with what is still promised: all a crash can leave
        // unmapped, which opening the pool then maps (`repair_thick`).
        let promised = self.promised(id);
        if growth > 0 && promised + growth > THICK_MAP_MAX {
            let wanted = promised + growth;
            return Err(PoolError::ThickTooLarge { wanted, max: THICK_MAP_MAX });
        }
        self.room_for(growth)?;
        if size_bytes < old {
            if !force && self.written_from(id, size_bytes) {
                return Err(PoolError::WouldDropData(id.into()));
            }
            // The pieces past the new end in its last cluster are trimmed, so nothing stale
            // reappears on growth (the volume is quiesced: frozen, no write in flight, so
            // nothing can be busy); the clusters beyond go with the `Resize` record's apply
            // (the leaves past the end cut away whole and retired: `Family::apply`).
            let edge_end = size_bytes.next_multiple_of(self.geo.cluster_bytes).min(old);
            if edge_end > size_bytes {
                self.trim_unchecked(id, size_bytes, edge_end - size_bytes);
            }
            // What was promised for clusters past the new end, not mapped yet, goes back.
            if promised > 0 {
                let old_end = old.div_ceil(self.geo.cluster_bytes);
                let gone = self.unmapped_in(id, new_end, old_end).min(promised);
                self.withdraw_promise(id, gone);
            }
        }
        self.log(Record::Resize { id, size_bytes });
        self.promise_holes(id, grown_from, growth);
        Ok(())
    }

    /// Calls volume `id` `name` from now on, with configuration entries that go with the name
    /// (an empty value removes its key): `before` journaled ahead of the `Rename` record,
    /// `after` behind it, so a crash keeps the volume under its old name with some of
    /// `before`, or under its new one with all of `before` and some of `after` (callers put
    /// what the new name needs in `before` and the old name's removals in `after`). All is
    /// admitted or nothing applied. A volume renamed to the name it has changes nothing.
    pub fn rename(
        &mut self,
        id: u32,
        name: &str,
        before: &[(String, String)],
        after: &[(String, String)],
    ) -> Result<(), PoolError> {
        self.ok()?;
        if self.volume(id)?.name == name {
            return Ok(());
        }
        self.new_name(name)?;
        // The name takes no room of its own: a checkpoint keeps NAME_MAX bytes per volume.
        let bytes = Self::config_bytes(before)? + Self::config_bytes(after)?;
        self.admit(0, 0, bytes)?;
        self.log_configs(before);
        self.log(Record::Rename { id, name: name.into() });
        self.log_configs(after);
        debug_assert!(
            self.find(name).is_ok_and(|f| f == id),
            "volume {id} is found by its new name"
        );
        Ok(())
    }

    /// The checkpoint bytes configuration `entries` could take, or why one is refused.
    fn config_bytes(entries: &[(String, String)]) -> Result<u64, PoolError> {
        let mut bytes = 0u64;
        for (key, value) in entries {
            if key.is_empty() || key.len() > NAME_MAX || value.len() > CONFIG_VALUE_MAX {
                return Err(PoolError::BadConfig);
            }
            bytes += (key.len() + value.len()) as u64 + CHECKPOINT_BYTES_PER_CONFIG;
        }
        Ok(bytes)
    }

    /// Logs configuration entries, in order (admitted by the caller).
    fn log_configs(&mut self, entries: &[(String, String)]) {
        for (key, value) in entries {
            self.log(Record::Config { key: key.clone(), value: value.clone() });
        }
    }

    pub fn set_config(&mut self, key: &str, value: &str) -> Result<(), PoolError> {
        self.set_configs(&[(key.to_string(), value.to_string())])
    }

    /// Sets several configuration entries (an empty value removes its key) in one control
    /// operation: every entry is checked and admitted before any is applied, so a refusal
    /// changes nothing. They are journaled in the order given and replay keeps a prefix of
    /// them after a crash (a commit may span journal blocks), so callers order entries such
    /// that every prefix is a consistent configuration.
    pub fn set_configs(&mut self, entries: &[(String, String)]) -> Result<(), PoolError> {
        self.ok()?;
        let bytes = Self::config_bytes(entries)?;
        self.admit(0, 0, bytes)?;
        self.log_configs(entries);
        Ok(())
    }
}
