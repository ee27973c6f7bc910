//! I/O epochs: which I/O may still touch clusters named by an older mapping, so a cluster freed
//! by a durable record is reused only after every I/O that started before has ended. Per
//! family: only a family's own I/O can touch the clusters its records free.

use super::*;

impl Family {
    /// Registers an I/O; returns its epoch.
    fn begin_io(&mut self) -> u64 {
        *self.inflight.entry(self.io_epoch).or_default() += 1;
        self.io_epoch
    }

    fn end_io(&mut self, epoch: u64, pool: &mut Allocator) {
        let n = self.inflight.get_mut(&epoch).expect("ticket of an I/O in flight");
        *n -= 1;
        if *n == 0 {
            self.inflight.remove(&epoch);
        }
        self.release_quarantine(pool);
    }

    /// Quarantined clusters no I/O in flight can name are reusable: into the family's stock,
    /// the pool taking back what the stock does not keep.
    pub(super) fn release_quarantine(&mut self, pool: &mut Allocator) {
        let oldest = self.inflight.keys().next().copied().unwrap_or(self.io_epoch + 1);
        while self.quarantine.front().is_some_and(|(e, _)| *e < oldest) {
            let (_, clusters) = self.quarantine.pop_front().expect("checked");
            let stock = &mut self.stock;
            pool.take_back(clusters.into_iter().filter_map(|c| stock.keep(c)));
        }
    }
}

impl PoolMeta {
    /// Registers an I/O of volume `id` (whose mapping it has just planned) that may touch
    /// clusters named by the current mapping.
    pub fn begin_io(&mut self, id: u32) -> Ticket {
        let f = *self.family_of.get(&id).expect("an I/O of a volume it has just planned");
        Ticket(f, self.fams.get_mut(f).expect("a named volume's family").begin_io())
    }

    pub fn end_io(&mut self, t: Ticket) {
        let fam = self.fams.get_mut(t.0).expect("a family lives while it has I/O in flight");
        fam.end_io(t.1, &mut self.alloc)
    }
}
