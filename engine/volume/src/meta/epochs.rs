//! I/O epochs: which I/O may still touch clusters named by an older mapping, so a cluster freed
//! by a durable record is reused only after every I/O that started before has ended. Per
//! family: only a family's own I/O can touch the clusters its records free.

use super::*;

impl Family {
    pub(super) fn begin_io(&mut self) -> Ticket {
        *self.inflight.entry(self.io_epoch).or_default() += 1;
        Ticket(self.io_epoch)
    }

    pub(super) fn end_io(&mut self, t: Ticket, alloc: &mut Allocator) {
        let n = self.inflight.get_mut(&t.0).expect("ticket of an I/O in flight");
        *n -= 1;
        if *n == 0 {
            self.inflight.remove(&t.0);
        }
        self.release_quarantine(alloc);
    }

    pub(super) fn release_quarantine(&mut self, alloc: &mut Allocator) {
        let oldest = self.inflight.keys().next().copied().unwrap_or(self.io_epoch + 1);
        while self.quarantine.front().is_some_and(|(e, _)| *e < oldest) {
            let (_, clusters) = self.quarantine.pop_front().expect("checked");
            alloc.release(&clusters);
        }
    }
}

impl PoolMeta {
    /// Registers an I/O that may touch clusters named by the current mapping.
    pub fn begin_io(&mut self) -> Ticket {
        self.fam.begin_io()
    }

    pub fn end_io(&mut self, t: Ticket) {
        self.fam.end_io(t, &mut self.alloc)
    }
}
