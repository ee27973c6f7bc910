//! I/O epochs: which I/O may still touch clusters named by an older mapping, so a cluster freed
//! by a durable record is reused only after every I/O that started before has ended. Per
//! family: only a family's own I/O can touch the clusters its records free.

use super::*;

impl Family {
    /// Registers an I/O; returns its epoch.
    pub(super) fn begin_io(&mut self) -> u64 {
        match self.inflight.last_mut() {
            Some((e, n)) if *e == self.io_epoch => *n += 1,
            last => {
                debug_assert!(last.is_none_or(|(e, _)| *e < self.io_epoch), "epochs only grow");
                self.inflight.push((self.io_epoch, 1));
            }
        }
        self.io_epoch
    }

    /// Ends an I/O of epoch `epoch`; returns the clusters its stock does not keep of those
    /// this made reusable, for the pool's allocator.
    pub(super) fn end_io(&mut self, epoch: u64) -> Vec<u64> {
        let i = self
            .inflight
            .binary_search_by_key(&epoch, |&(e, _)| e)
            .expect("ticket of an I/O in flight");
        let n = &mut self.inflight[i].1;
        *n -= 1;
        if *n == 0 {
            self.inflight.remove(i);
        }
        self.release_quarantine()
    }

    /// Quarantined clusters no I/O in flight can name are reusable: into the family's stock;
    /// returns what the stock does not keep, for the pool's allocator (empty, unallocated,
    /// when nothing was released).
    pub(super) fn release_quarantine(&mut self) -> Vec<u64> {
        if self.quarantine.is_empty() {
            return Vec::new();
        }
        let oldest = self.inflight.first().map_or(self.io_epoch + 1, |&(e, _)| e);
        let mut surplus = Vec::new();
        while self.quarantine.front().is_some_and(|(e, _)| *e < oldest) {
            let (_, clusters) = self.quarantine.pop_front().expect("checked");
            let stock = &mut self.stock;
            surplus.extend(clusters.into_iter().filter_map(|c| stock.keep(c)));
        }
        surplus
    }
}

impl PoolMeta {
    /// Registers an I/O of volume `id` (whose mapping it has just planned) that may touch
    /// clusters named by the current mapping.
    pub fn begin_io(&self, id: u32) -> Ticket {
        let f = *self.family_of.get(&id).expect("an I/O of a volume it has just planned");
        Ticket(f, self.fams.get(f).expect("a named volume's family").begin_io())
    }

    /// Ends an I/O: what its family's stock does not keep of the clusters that became
    /// reusable goes back to the allocator (the family's lock, then the allocator's).
    pub fn end_io(&self, t: Ticket) {
        let mut fam = self.fams.get(t.0).expect("a family lives while it has I/O in flight");
        let surplus = fam.end_io(t.1);
        self.give_back(surplus);
    }

    /// Clusters a family's stock did not keep, back to the allocator.
    pub(super) fn give_back(&self, surplus: Vec<u64>) {
        if !surplus.is_empty() {
            self.alloc.lock().take_back(surplus);
        }
    }
}
