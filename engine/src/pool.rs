//! Per-core pool of I/O buffers, and this core's share of the payload-memory budget.
//!
//! Two separate things live here, both owned by one core and never shared:
//! - a cache of freed buffers by size class, so the hot path does not allocate;
//! - the budget: payload memory (write data, read data awaiting send, grown receive buffers)
//!   is *charged* by the connection that holds it before it is allocated, and released when
//!   the connection lets go. A charge that does not fit is refused and the asking task is
//!   parked; it is woken (`Task::on_buffers`) when memory is released.
//!
//! Invariants:
//! - `charged <= budget` always: nothing is charged past the budget;
//! - a holder that already holds `SMALL_HOLD` bytes or more (counting the new charge) is only
//!   granted memory below `budget - reserve`: the top quarter of the budget stays for
//!   connections holding little, so clients that hoard (stalled writers, peers that never read
//!   their replies) cannot starve the others;
//! - buffers handed out may be returned on the same core only (they always are: a request's
//!   buffer comes back to the connection's core — a volume request forwarded to the core
//!   owning its family carries it there and back with its answer, and the owner's own
//!   scratch buffers stay the owner's);
//! - size classes are powers of two from `CLASS_MIN` to `CLASS_MAX`; larger buffers are
//!   allocated and freed directly; the cache holds at most `cache_max` bytes;
//! - I/O waiting for an export's rate limits ([`crate::qos`]) keeps the payload memory its
//!   connection charged; `qos_waiting` counts it per export on this core (added when an I/O
//!   starts waiting, taken off when it goes), and once an export's count reaches
//!   `qos_wait_limit` its connections here take no new request until some of it goes (they
//!   park as refused charges do, and its going wakes them): a tenant whose limit holds its I/O
//!   back cannot fill the budget the other exports' connections share, however many
//!   connections it opens. An export's count exceeds the limit by at most the requests its
//!   connections took in before they saw it full (one each).

use ballast_ffi::IoBuf;

const CLASS_MIN_SHIFT: u32 = 12; // 4 KiB
const CLASS_MAX_SHIFT: u32 = 20; // 1 MiB
const CLASSES: usize = (CLASS_MAX_SHIFT - CLASS_MIN_SHIFT + 1) as usize;
/// A holder with at least this much charged only grows into the lower part of the budget.
pub const SMALL_HOLD: u64 = 1 << 20;
/// Cache kept after an idle trim.
const CACHE_FLOOR: u64 = 1 << 20;

pub struct BufPool {
    free: [Vec<IoBuf>; CLASSES],
    cached: u64,
    cache_max: u64,
    budget: u64,
    charged: u64,
    peak: u64,
    refusals: u64,
    /// Tasks refused a charge, to wake when memory is released (a task appears once).
    waiters: Vec<u32>,
    /// Memory was released since waiters were last woken.
    released: bool,
    pub allocated: u64,
    pub reused: u64,
    /// Cached buffers freed to make room for another class.
    pub evicted: u64,
    /// The payload memory one export's I/O waiting for its rate limits may hold here.
    qos_wait_limit: u64,
    /// Per export (its limiter's address: [`crate::qos::Qos`]), the payload bytes of its I/O
    /// waiting on this core; an export leaves the list when nothing of it waits.
    qos_waiting: Vec<(usize, u64)>,
}

impl Default for BufPool {
    fn default() -> BufPool {
        BufPool::new(u64::MAX / 2)
    }
}

fn class_of_capacity(cap: usize) -> Option<usize> {
    let shift = cap.next_power_of_two().trailing_zeros().max(CLASS_MIN_SHIFT);
    (shift <= CLASS_MAX_SHIFT).then(|| (shift - CLASS_MIN_SHIFT) as usize)
}

/// What the budget looks like now, for `ballast stats`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct BudgetSnapshot {
    pub buffer_budget: u64,
    pub buffer_charged: u64,
    pub buffer_peak: u64,
    pub buffer_refusals: u64,
    pub buffer_waiters: u64,
    pub buffer_cached: u64,
    /// Payload bytes held by I/O waiting for its export's rate limits, all exports.
    pub buffer_qos_waiting: u64,
}

impl BufPool {
    /// A pool whose holders may charge up to `budget` bytes in all.
    pub fn new(budget: u64) -> BufPool {
        BufPool {
            free: Default::default(),
            cached: 0,
            cache_max: (budget / 8).min(8 << 20),
            budget,
            charged: 0,
            peak: 0,
            refusals: 0,
            waiters: Vec::new(),
            released: false,
            allocated: 0,
            reused: 0,
            evicted: 0,
            qos_wait_limit: budget / 8,
            qos_waiting: Vec::new(),
        }
    }

    /// Sets what one export's I/O waiting for its rate limits may hold (default: an eighth of
    /// the budget).
    pub fn with_qos_wait_limit(mut self, limit: u64) -> BufPool {
        self.qos_wait_limit = limit;
        self
    }

    /// Payload bytes of export `key`'s I/O waiting for its rate limits here.
    pub fn qos_waiting(&self, key: usize) -> u64 {
        self.qos_waiting.iter().find(|(k, _)| *k == key).map_or(0, |(_, b)| *b)
    }

    /// Whether export `key`'s waiting I/O holds all it may here: take no new request for it.
    pub fn qos_wait_full(&self, key: usize) -> bool {
        self.qos_waiting(key) >= self.qos_wait_limit
    }

    /// An I/O of export `key` holding `bytes` (more than none) starts waiting for its slot.
    pub fn qos_wait_add(&mut self, key: usize, bytes: u64) {
        assert!(bytes > 0, "only waiting I/O that holds memory is counted");
        match self.qos_waiting.iter_mut().find(|(k, _)| *k == key) {
            Some((_, b)) => *b += bytes,
            None => self.qos_waiting.push((key, bytes)),
        }
    }

    /// An I/O of export `key` holding `bytes` (more than none) stopped waiting (it went to the
    /// device): if that took the export below its limit, the tasks parked for memory look
    /// again, as after a release (those parked for the export are among them).
    pub fn qos_wait_sub(&mut self, key: usize, bytes: u64) {
        assert!(bytes > 0, "only waiting I/O that holds memory is counted");
        let i = self
            .qos_waiting
            .iter()
            .position(|(k, _)| *k == key)
            .expect("an export's waiting I/O was counted when it began to wait");
        let b = &mut self.qos_waiting[i].1;
        assert!(bytes <= *b, "{bytes} bytes stop waiting with {b} counted");
        let was_full = *b >= self.qos_wait_limit;
        *b -= bytes;
        if was_full && *b < self.qos_wait_limit {
            self.released = true;
        }
        if *b == 0 {
            self.qos_waiting.swap_remove(i);
        }
    }

    /// Parks `task` until memory is released (or waiting I/O goes), without a charge: a
    /// connection holding back for an export whose waiting I/O is at its limit.
    pub fn park(&mut self, task: u32) {
        if !self.waiters.contains(&task) {
            self.waiters.push(task);
        }
    }

    /// A buffer of capacity >= `cap` with length 0. Its bytes are initialised but arbitrary.
    pub fn get(&mut self, cap: usize) -> IoBuf {
        let Some(class) = class_of_capacity(cap) else {
            self.allocated += 1;
            return IoBuf::with_capacity(cap);
        };
        if let Some(mut buf) = self.free[class].pop() {
            self.reused += 1;
            self.cached -= buf.capacity() as u64;
            buf.set_len(0);
            return buf;
        }
        self.allocated += 1;
        IoBuf::with_capacity(1 << (class as u32 + CLASS_MIN_SHIFT))
    }

    /// Returns a buffer for reuse (or frees it if it has an odd size). A full cache makes room
    /// by freeing buffers of other classes, largest first: the sizes in use changed, and the
    /// class being returned is the one the core needs now (otherwise every request of the new
    /// size would allocate — and register with the ring — afresh).
    pub fn put(&mut self, buf: IoBuf) {
        let cap = buf.capacity();
        let Some(class) = class_of_capacity(cap).filter(|_| cap.is_power_of_two()) else {
            return;
        };
        for other in (0..CLASSES).rev().filter(|&c| c != class) {
            while self.cached + cap as u64 > self.cache_max {
                let Some(old) = self.free[other].pop() else { break };
                self.cached -= old.capacity() as u64;
                self.evicted += 1;
            }
        }
        if self.cached + cap as u64 > self.cache_max {
            return;
        }
        self.cached += cap as u64;
        self.free[class].push(buf);
    }

    /// Frees cached buffers down to a small floor (an idle core gives memory back).
    pub fn trim(&mut self) -> bool {
        if self.cached <= CACHE_FLOOR {
            return false;
        }
        for list in self.free.iter_mut().rev() {
            while self.cached > CACHE_FLOOR {
                let Some(buf) = list.pop() else { break };
                self.cached -= buf.capacity() as u64;
            }
        }
        true
    }

    /// Charges `bytes` to a holder that already holds `held`; on refusal `task` is parked.
    pub fn charge(&mut self, bytes: u64, held: u64, task: u32) -> bool {
        let limit =
            if held + bytes >= SMALL_HOLD { self.budget - self.budget / 4 } else { self.budget };
        if self.charged + bytes <= limit {
            self.charged += bytes;
            self.peak = self.peak.max(self.charged);
            return true;
        }
        self.refusals += 1;
        if !self.waiters.contains(&task) {
            self.waiters.push(task);
        }
        false
    }

    /// The most a single holder can ever be granted: the part of the budget outside the
    /// reserve for small holders. Requests larger than this must be refused outright.
    pub fn large_limit(&self) -> u64 {
        self.budget - self.budget / 4
    }

    /// Releases a charge.
    pub fn release(&mut self, bytes: u64) {
        assert!(bytes <= self.charged, "release of {bytes} with {} charged", self.charged);
        self.charged -= bytes;
        self.released |= bytes > 0;
    }

    /// Parked tasks to wake, if memory was released since they were refused (a task refused
    /// again waits for the next release: no busy retry).
    pub fn take_waiters(&mut self, out: &mut Vec<u32>) {
        if self.released && !self.waiters.is_empty() {
            out.append(&mut self.waiters);
        }
        self.released = false;
    }

    pub fn snapshot(&self) -> BudgetSnapshot {
        BudgetSnapshot {
            buffer_budget: self.budget,
            buffer_charged: self.charged,
            buffer_peak: self.peak,
            buffer_refusals: self.refusals,
            buffer_waiters: self.waiters.len() as u64,
            buffer_cached: self.cached,
            buffer_qos_waiting: self.qos_waiting.iter().map(|(_, b)| b).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_by_class() {
        let mut pool = BufPool::default();
        let a = pool.get(100);
        assert_eq!(a.capacity(), 4096);
        pool.put(a);
        let b = pool.get(4000);
        assert_eq!(pool.reused, 1);
        assert_eq!(b.len(), 0);
        let big = pool.get(3 << 20);
        assert!(big.capacity() >= 3 << 20);
        let mid = pool.get(65537);
        assert_eq!(mid.capacity(), 128 * 1024);
    }

    #[test]
    fn cache_is_bounded_and_trims() {
        let mut pool = BufPool::new(64 << 20);
        let bufs: Vec<IoBuf> = (0..20).map(|_| pool.get(1 << 20)).collect();
        for b in bufs {
            pool.put(b);
        }
        assert_eq!(pool.snapshot().buffer_cached, 8 << 20, "cache capped at budget/8");
        // The sizes in use change: the new class takes the room of the old one.
        let small: Vec<IoBuf> = (0..40).map(|_| pool.get(256 << 10)).collect();
        for b in small {
            pool.put(b);
        }
        assert_eq!(pool.snapshot().buffer_cached, 8 << 20, "still capped");
        assert_eq!(pool.evicted, 8, "the eight 1 MiB buffers made room");
        let reused = pool.reused;
        let again: Vec<IoBuf> = (0..32).map(|_| pool.get(256 << 10)).collect();
        assert_eq!(pool.reused - reused, 32, "the 256 KiB requests find their buffers");
        for b in again {
            pool.put(b);
        }
        assert!(pool.trim());
        assert!(pool.snapshot().buffer_cached <= CACHE_FLOOR);
    }

    #[test]
    fn never_charges_past_the_budget_and_keeps_a_reserve_for_small_holders() {
        let mut pool = BufPool::new(16 << 20);
        // Hoarders (each asking 2 MiB) fill only the lower three quarters: 12 MiB.
        let mut granted = 0;
        for task in 0..10 {
            if pool.charge(2 << 20, 0, task) {
                granted += 1;
            }
        }
        assert_eq!(granted, 6);
        assert_eq!(pool.snapshot().buffer_charged, 12 << 20);
        assert_eq!(pool.snapshot().buffer_waiters, 4);
        // A small holder still gets memory from the reserve, up to the budget and no further.
        for _ in 0..64 {
            assert!(pool.charge(64 << 10, 0, 99));
        }
        assert!(!pool.charge(4096, 0, 99), "the budget is a hard limit");
        assert_eq!(pool.snapshot().buffer_charged, 16 << 20);
        let mut woken = Vec::new();
        pool.take_waiters(&mut woken);
        assert!(woken.is_empty(), "nothing released: nobody is woken");
        pool.release(2 << 20);
        pool.take_waiters(&mut woken);
        assert_eq!(woken, vec![6, 7, 8, 9, 99]);
    }

    /// An export's waiting I/O is counted apart per export; at its limit the export is full
    /// (others are not), and its I/O going wakes the parked tasks though nothing was released
    /// — once, when it drops below the limit.
    #[test]
    fn an_exports_waiting_io_is_bounded_and_its_going_wakes_the_parked() {
        let mut pool = BufPool::new(16 << 20).with_qos_wait_limit(1 << 20);
        pool.qos_wait_add(1, 512 << 10);
        assert!(!pool.qos_wait_full(1));
        pool.qos_wait_add(1, 512 << 10);
        pool.qos_wait_add(2, 4096);
        assert!(pool.qos_wait_full(1), "export 1 holds its limit");
        assert!(!pool.qos_wait_full(2), "export 2 is counted apart");
        assert_eq!(pool.snapshot().buffer_qos_waiting, (1 << 20) + 4096);
        pool.qos_wait_add(1, 4096);
        pool.park(7);
        pool.park(7);
        let mut woken = Vec::new();
        pool.take_waiters(&mut woken);
        assert!(woken.is_empty(), "nothing went yet");
        pool.qos_wait_sub(1, 4096);
        pool.take_waiters(&mut woken);
        assert!(woken.is_empty(), "still at the limit: nobody is woken for nothing");
        pool.qos_wait_sub(1, 512 << 10);
        pool.take_waiters(&mut woken);
        assert_eq!(woken, vec![7], "parked once, woken once, when it dropped below");
        assert!(!pool.qos_wait_full(1));
        pool.qos_wait_sub(1, 512 << 10);
        pool.take_waiters(&mut woken);
        assert_eq!(woken, vec![7], "below the limit already: no wake-up");
        pool.qos_wait_sub(2, 4096);
        assert_eq!(pool.qos_waiting(1), 0);
        assert!(pool.qos_waiting.is_empty(), "an export with nothing waiting leaves the list");
    }
}
