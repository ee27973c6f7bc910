//! The pace of a pool's background copying (decoupling and inflating volumes: `ops::decouple`'s
//! copy-ups): a rate in bytes per second that every copy in progress in the pool shares, so
//! that copying a large clone takes the media's bandwidth (and, on a file in memory, its core's
//! CPU) only up to that rate, however many run at once. Pure: instants in, waits out; the
//! driver sleeps them.
//!
//! Model: a virtual clock `until`, the instant by which everything charged so far would have
//! been copied at the rate. A copy of `bytes` that began at `began` is charged from the later
//! of `began` and `until`, for `bytes / rate`; its copier waits until the new `until` before
//! it starts the next. Time left idle is not saved up: a copy charged after a pause starts
//! from when it began, so no burst follows a pause. A copy slower than the rate waits nothing.
//! Invariant: `until` never moves backwards while the rate stays.

use std::time::{Duration, Instant};

/// Bytes per second of copying a pool allows by default (`serve --copy-rate`): a quarter or
/// less of one NVMe drive's bandwidth, counting the copy's reads and writes, so neighbours
/// keep most of it; a 1 TiB clone decouples in about 70 minutes at it.
pub const DEFAULT_COPY_RATE: u64 = 256 << 20;

/// The pool-wide pace of copying (module header). A rate of 0: unpaced.
#[derive(Debug, Clone)]
pub struct Pace {
    rate: u64,
    until: Option<Instant>,
    /// Counts the changes of rate: a copier waiting on the old one sees it move.
    generation: u64,
}

impl Pace {
    /// A pace of `rate` bytes per second (0: unpaced).
    pub fn new(rate: u64) -> Self {
        Pace { rate, until: None, generation: 0 }
    }

    /// Bytes per second (0: unpaced).
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Takes effect from the next charge; what was charged at the old rate is forgotten, so a
    /// copier waiting on a slow rate is not held to it once it is raised. The same rate again
    /// changes nothing (what was charged stays charged).
    pub fn set_rate(&mut self, rate: u64) {
        if rate != self.rate {
            self.rate = rate;
            self.until = None;
            self.generation += 1;
        }
    }

    /// Moves on each change of rate (`set_rate`): a copier waiting since a charge stops
    /// waiting when it moved.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Charges a copy of `bytes` that began at `began`, as its copier sees it at `now`: how
    /// long the copier waits before its next copy.
    pub fn charge(&mut self, began: Instant, now: Instant, bytes: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let start = self.until.map_or(began, |u| u.max(began));
        let nanos = u128::from(bytes) * 1_000_000_000 / u128::from(self.rate);
        let until = start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        debug_assert!(self.until.is_none_or(|u| until >= u), "the clock moves backwards");
        self.until = Some(until);
        until.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn unpaced_never_waits() {
        let mut p = Pace::new(0);
        let t = Instant::now();
        for i in 0..100 {
            assert_eq!(p.charge(t + i * MS, t + i * MS, 1 << 30), Duration::ZERO);
        }
    }

    #[test]
    fn a_fast_copier_is_held_to_the_rate() {
        // 1 MiB per step at 100 MiB/s: 10 ms a step, whatever the copy itself took (1 ms).
        let mut p = Pace::new(100 << 20);
        let t0 = Instant::now();
        let mut now = t0;
        for _ in 0..50 {
            let began = now;
            now += MS;
            now += p.charge(began, now, 1 << 20);
        }
        assert_eq!(now - t0, 500 * MS, "50 MiB at 100 MiB/s");
    }

    #[test]
    fn a_copy_slower_than_the_rate_waits_nothing() {
        let mut p = Pace::new(100 << 20);
        let t = Instant::now();
        // 1 MiB that took 20 ms (the rate allows it in 10).
        assert_eq!(p.charge(t, t + 20 * MS, 1 << 20), Duration::ZERO);
        assert_eq!(p.charge(t + 20 * MS, t + 40 * MS, 1 << 20), Duration::ZERO);
    }

    #[test]
    fn copiers_share_one_rate() {
        // Two copiers, each charging 1 MiB per step, together held to 100 MiB/s: 100 steps in
        // one second in all, not two hundred.
        let mut p = Pace::new(100 << 20);
        let t0 = Instant::now();
        let mut next = [t0, t0];
        let mut steps = 0;
        loop {
            let i = if next[0] <= next[1] { 0 } else { 1 };
            let began = next[i];
            if began >= t0 + Duration::from_secs(1) {
                break;
            }
            let now = began + MS;
            next[i] = now + p.charge(began, now, 1 << 20);
            steps += 1;
        }
        assert!((99..=101).contains(&steps), "{steps} steps of 1 MiB in a second");
    }

    #[test]
    fn no_burst_after_a_pause() {
        let mut p = Pace::new(100 << 20);
        let t = Instant::now();
        p.charge(t, t + MS, 1 << 20);
        // A second later: the next copy waits its own 10 ms again, not nothing.
        let later = t + Duration::from_secs(1);
        assert_eq!(p.charge(later, later + MS, 1 << 20), 9 * MS);
    }

    #[test]
    fn a_new_rate_applies_at_once() {
        let mut p = Pace::new(1 << 20);
        let t = Instant::now();
        assert_eq!(p.charge(t, t, 10 << 20), Duration::from_secs(10));
        p.set_rate(100 << 20);
        assert_eq!(p.rate(), 100 << 20);
        assert_eq!(p.charge(t + MS, t + MS, 1 << 20), 10 * MS, "not held to the old 10 s");
        p.set_rate(0);
        assert_eq!(p.charge(t + MS, t + MS, 1 << 30), Duration::ZERO);
    }

    #[test]
    fn the_same_rate_again_keeps_what_was_charged() {
        let mut p = Pace::new(100 << 20);
        let t = Instant::now();
        assert_eq!(p.charge(t, t, 1 << 20), 10 * MS);
        let g = p.generation();
        p.set_rate(100 << 20);
        assert_eq!(p.generation(), g, "no change to wake anyone for");
        // A second copier still queues behind the first's 10 ms.
        assert_eq!(p.charge(t, t, 1 << 20), 20 * MS);
        p.set_rate(50 << 20);
        assert_eq!(p.generation(), g + 1);
    }
}
