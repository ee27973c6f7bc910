//! Requests carried between cores for the core that owns a volume's family.
//!
//! Under the `owner` placement ([`Placement`]) each family (a volume with its snapshots and
//! clones) is served by one core, its owner: the first core that submitted I/O to it while the
//! pool is open (first touch: connections spread over the cores by volume need no forwarding;
//! [`Owner`]). A command a connection on another core submits travels to the owner in the owner's [`Mailbox`] for
//! the pool, runs there like a local one (same slots, same request state machine), and its
//! answer — result and buffer — comes back in the submitting core's mailbox. So a family's
//! lock, trees and lock table are touched by one core's data path, except for requests a
//! mailbox refuses (its core's slots task not running: startup, shutdown), which run where they
//! arrived — still correct, every decision takes the family's lock whatever the placement.
//!
//! A mailbox is a short critical section, not a channel: a core posts what one flush round
//! forwarded to a destination under one lock, and wakes the destination's slots task only if
//! the mailbox was not already notified since it was last emptied — one wake-up (and at most
//! one system call, if the core sleeps) per batch, however many requests it carries.
//!
//! Invariants:
//! - a mailbox is emptied only by its core's slots task (`take`), which clears `notified`
//!   under the same lock: content posted after that gets a wake-up of its own, none is lost;
//! - while no slots task is registered (`open`) nothing is woken; requests are refused
//!   (`post` leaves them with the caller, who runs them where it is) but answers are kept, and
//!   the slots task takes them as it opens the mailbox;
//! - `close` succeeds only on an empty mailbox (the slots task ends with nothing left in it).
//!
//! Limit: a core that leaves at shutdown on its drain timeout (a connection of its own never
//! finished) leaves its slots task registered; what other cores post to it then waits until
//! their own drain timeout ends them too.

use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

/// Which core runs a volume's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// The family's owning core (the first to submit I/O to it); other cores forward to it.
    Owner,
    /// The core the command arrived on (families decided from several cores, each decision
    /// under the family's lock).
    #[default]
    Any,
}

/// What became of a post.
#[derive(Debug, PartialEq, Eq)]
pub enum Posted {
    /// Delivered; the destination's slots task (this id) must be woken.
    Wake(u32),
    /// Delivered; a wake-up is already on its way (or the destination takes its mail as it
    /// starts).
    Quiet,
    /// Refused (no slots task runs there): the items are still the caller's.
    Closed,
}

struct Inbox<T> {
    /// The core's slots task for the pool, while it runs.
    task: Option<u32>,
    /// A wake-up was sent since the mailbox was last emptied.
    notified: bool,
    items: Vec<T>,
}

/// One core's mail for one pool: forwarded requests and answers to requests it forwarded.
pub struct Mailbox<T> {
    inbox: Mutex<Inbox<T>>,
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Mailbox { inbox: Mutex::new(Inbox { task: None, notified: false, items: Vec::new() }) }
    }
}

impl<T> Mailbox<T> {
    /// Moves `items` into the mailbox (all of them, leaving `items` empty) unless it is closed
    /// and `keep_if_closed` is false (then nothing moves).
    pub fn post(&self, items: &mut Vec<T>, keep_if_closed: bool) -> Posted {
        if items.is_empty() {
            return Posted::Quiet;
        }
        let mut inbox = self.inbox.lock();
        if inbox.task.is_none() && !keep_if_closed {
            return Posted::Closed;
        }
        inbox.items.append(items);
        match inbox.task {
            Some(task) if !inbox.notified => {
                inbox.notified = true;
                Posted::Wake(task)
            }
            _ => Posted::Quiet,
        }
    }

    /// Registers the core's slots task `task` and takes what is already there.
    pub fn open(&self, task: u32, into: &mut Vec<T>) {
        let mut inbox = self.inbox.lock();
        assert!(inbox.task.is_none(), "one slots task per core and pool");
        inbox.task = Some(task);
        inbox.notified = false;
        into.append(&mut inbox.items);
    }

    /// Takes everything (the slots task, woken or flushing); the next post wakes it again.
    pub fn take(&self, into: &mut Vec<T>) {
        let mut inbox = self.inbox.lock();
        inbox.notified = false;
        into.append(&mut inbox.items);
    }

    /// Unregisters the slots task if nothing is left in the mailbox; false if something is.
    pub fn close(&self) -> bool {
        let mut inbox = self.inbox.lock();
        if !inbox.items.is_empty() {
            return false;
        }
        inbox.task = None;
        inbox.notified = false;
        true
    }
}

/// A family's owning core, shared by every device of the family: none until a core claims it
/// (the first to submit I/O to it, or the core a connection to it is placed on), then that
/// core for as long as the pool is open.
#[derive(Debug, Default)]
pub struct Owner(std::sync::OnceLock<usize>);

impl Owner {
    /// The owner, `core` if the family had none (one load once set): first touch by I/O.
    pub fn claim(&self, core: usize, claims: &Claims) -> usize {
        *self.0.get_or_init(|| claims.count(core))
    }

    /// The owner, or if the family has none the core that owns the fewest families (`here`
    /// among equals): where a connection to the family is placed before its first request.
    pub fn place(&self, here: usize, claims: &Claims) -> usize {
        *self.0.get_or_init(|| claims.count(claims.least(here)))
    }

    pub fn get(&self) -> Option<usize> {
        self.0.get().copied().filter(|&core| core != RETIRED)
    }

    /// The family is gone: no core can claim it from now on (a device of it still held runs
    /// its requests where they arrive, and a connection to it stays). Returns the core that
    /// owned it, whose count must drop.
    pub fn retire(&self) -> Option<usize> {
        match self.0.set(RETIRED) {
            Ok(()) => None,
            Err(_) => self.get(),
        }
    }
}

/// What a retired family's owner reads: beyond every core (`claim`/`place` return it; callers
/// treat a core they do not have as "here").
const RETIRED: usize = usize::MAX;

/// How many families each core of a pool owns, to place new families evenly.
pub struct Claims(Box<[AtomicUsize]>);

impl Claims {
    pub fn new(cores: usize) -> Claims {
        assert!(cores > 0, "a pool served by no core");
        Claims((0..cores).map(|_| AtomicUsize::new(0)).collect())
    }

    /// The core owning the fewest families; `here` if it is one of them.
    fn least(&self, here: usize) -> usize {
        let load = |c: usize| self.0.get(c).map_or(usize::MAX, |n| n.load(Ordering::Relaxed));
        let best = (0..self.0.len()).min_by_key(|&c| load(c)).unwrap_or(0);
        if load(here) <= load(best) {
            here
        } else {
            best
        }
    }

    /// Counts a family now owned by `core`; returns `core`.
    fn count(&self, core: usize) -> usize {
        if let Some(n) = self.0.get(core) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        core
    }

    /// A family `core` owned is gone (its last volume deleted).
    pub fn release(&self, core: usize) {
        if let Some(n) = self.0.get(core) {
            let before = n.fetch_sub(1, Ordering::Relaxed);
            assert!(before > 0, "core {core} released a family it did not own");
        }
    }

    /// Families owned by each core.
    pub fn loads(&self) -> Vec<usize> {
        self.0.iter().map(|n| n.load(Ordering::Relaxed)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_wake_per_batch_until_taken() {
        let m = Mailbox::default();
        let mut into = Vec::new();
        m.open(7, &mut into);
        assert!(into.is_empty());
        assert_eq!(m.post(&mut vec![1, 2], false), Posted::Wake(7));
        // Not yet taken: more mail rides on the same wake-up.
        let mut more = vec![3];
        assert_eq!(m.post(&mut more, false), Posted::Quiet);
        assert!(more.is_empty(), "posted items move");
        m.take(&mut into);
        assert_eq!(into, vec![1, 2, 3]);
        // Taken: the next post wakes again.
        assert_eq!(m.post(&mut vec![4], false), Posted::Wake(7));
        assert_eq!(m.post(&mut Vec::new(), false), Posted::Quiet, "nothing to post");
    }

    #[test]
    fn a_closed_mailbox_refuses_requests_and_keeps_answers_for_its_next_task() {
        let m = Mailbox::default();
        let mut requests = vec![1];
        assert_eq!(m.post(&mut requests, false), Posted::Closed);
        assert_eq!(requests, vec![1], "refused items stay with the caller");
        // Answers wait for the slots task that opens the mailbox.
        assert_eq!(m.post(&mut vec![2], true), Posted::Quiet);
        let mut into = Vec::new();
        m.open(3, &mut into);
        assert_eq!(into, vec![2]);
        assert_eq!(m.post(&mut vec![5], false), Posted::Wake(3));
        assert!(!m.close(), "mail left: the task must take it first");
        m.take(&mut into);
        assert!(m.close());
        assert_eq!(m.post(&mut vec![6], false), Posted::Closed);
    }

    #[test]
    fn the_first_core_to_claim_a_family_owns_it() {
        let claims = Claims::new(4);
        let o = Owner::default();
        assert_eq!(o.get(), None);
        assert_eq!(o.claim(3, &claims), 3);
        assert_eq!(o.claim(1, &claims), 3, "claimed once");
        assert_eq!(o.place(0, &claims), 3, "placing follows the owner");
        assert_eq!(o.get(), Some(3));
        assert_eq!(claims.loads(), vec![0, 0, 0, 1], "counted once");
    }

    #[test]
    fn connections_place_new_families_on_the_least_loaded_core() {
        let claims = Claims::new(3);
        let families: Vec<Owner> = (0..7).map(|_| Owner::default()).collect();
        // Every connection arrives on core 0: families still spread, here winning ties.
        let placed: Vec<usize> = families.iter().map(|f| f.place(0, &claims)).collect();
        assert_eq!(placed, vec![0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(claims.loads(), vec![3, 2, 2]);
        // A tie with the arrival core keeps the family where it arrived.
        let f = Owner::default();
        assert_eq!(f.place(2, &claims), 2);
        assert_eq!(claims.loads(), vec![3, 2, 3]);
        // First touch by I/O owns where it runs, loaded or not.
        let g = Owner::default();
        assert_eq!(g.claim(0, &claims), 0);
        assert_eq!(claims.loads(), vec![4, 2, 3]);
        // A family gone: its owner is retired; claimed, its core counts it no more, unclaimed,
        // nothing can claim it afterwards.
        assert_eq!(g.retire(), Some(0));
        let unclaimed = Owner::default();
        assert_eq!(unclaimed.retire(), None);
        assert_eq!(unclaimed.claim(1, &claims), RETIRED, "retired: no core owns it");
        assert_eq!(unclaimed.get(), None);
        assert_eq!(claims.loads(), vec![4, 2, 3], "nothing counted for it");
        // Families gone: the next new one goes to the core now owning the fewest.
        claims.release(2);
        claims.release(2);
        assert_eq!(Owner::default().place(0, &claims), 2);
    }
}
