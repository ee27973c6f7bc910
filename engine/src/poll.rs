//! When an idle reactor turn spins and when the core sleeps in the ring: the polling policy.
//!
//! Pure: the reactor passes the time in, so the policy is tested with made-up arrival
//! sequences. It watches *bursts* — a run of turns that found work, begun after at least one
//! idle turn; a request arriving on a quiet core starts one — and the gap between the starts
//! of consecutive bursts: the inter-arrival time of work as the core sees it.
//!
//! Invariants:
//! - never spins more than `max_spin` after the last work: an idle core sleeps within that
//!   bound (1 ms by default), so a daemon with nothing to do uses no CPU;
//! - spins only while work has been arriving at least every `max_spin` (the smoothed gap) in
//!   small bursts (at most `SPIN_BURST_EVENTS` events each, smoothed), and then for about two
//!   gaps plus the cost of a wake-up: long enough to catch the next request of a
//!   low-queue-depth stream without a sleep and a wake-up (which cost more than the wait),
//!   short enough that a stream that stops costs little. Big bursts (deep queues) sleep at
//!   once: each wake-up then serves many events, and spinning would only add CPU per I/O;
//! - before any work has been seen, and with `max_spin == 0`, it never spins.

use std::time::{Duration, Instant};

/// What sleeping in the ring and being woken costs a request in latency, roughly (scheduler
/// wake-up, interrupt, cache refill on a VM): spinning a little past the expected next arrival
/// is cheaper than missing it by this much.
pub const WAKE_COST: Duration = Duration::from_micros(20);
/// Bursts larger than this (events, smoothed) do not spin: a deep queue amortises wake-ups.
pub const SPIN_BURST_EVENTS: u32 = 8;

#[derive(Debug, Clone)]
pub struct PollPolicy {
    max_spin: Duration,
    /// The core is in a burst (the last turn found work).
    busy: bool,
    burst_start: Option<Instant>,
    /// When the last burst ended (the first idle turn after it).
    last_work: Option<Instant>,
    /// Smoothed gap between burst starts (exponential, weight 1/4), in nanoseconds.
    gap_ns: Option<u64>,
    /// Events in the current burst.
    events: u32,
    /// Smoothed events per burst, in sixteenths (weight 1/4).
    burst_x16: u32,
}

impl PollPolicy {
    /// A policy that spins at most `max_spin` after the last work (0: never spins).
    pub fn new(max_spin: Duration) -> PollPolicy {
        PollPolicy {
            max_spin,
            busy: false,
            burst_start: None,
            last_work: None,
            gap_ns: None,
            events: 0,
            burst_x16: 0,
        }
    }

    /// Whether the previous turn found work (the reactor reads the clock only on changes).
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// A turn found work after idle turns (or a sleep): a burst starts at `now`.
    pub fn burst_started(&mut self, now: Instant) {
        debug_assert!(!self.busy, "a burst started inside a burst");
        if let Some(prev) = self.burst_start {
            // Gaps longer than twice the spin bound only say "long": cap them, so one pause
            // does not take many bursts to forget.
            let cap = (self.max_spin * 2).as_nanos() as u64;
            let sample = (now.saturating_duration_since(prev).as_nanos() as u64).min(cap.max(1));
            self.gap_ns = Some(match self.gap_ns {
                Some(g) => g - g / 4 + sample / 4,
                None => sample,
            });
        }
        self.burst_start = Some(now);
        self.busy = true;
        self.events = 0;
    }

    /// A busy turn found `n` events (completions, messages).
    pub fn note_events(&mut self, n: usize) {
        self.events = self.events.saturating_add(n.min(1 << 16) as u32);
    }

    /// The first idle turn after a burst, at `now`.
    pub fn burst_ended(&mut self, now: Instant) {
        self.busy = false;
        self.last_work = Some(now);
        let sample = self.events.min(1 << 12) << 4;
        self.burst_x16 = self.burst_x16 - self.burst_x16 / 4 + sample / 4;
    }

    /// How long after the last work an idle core keeps spinning (zero: sleep at once).
    pub fn spin_window(&self) -> Duration {
        let Some(gap) = self.gap_ns.map(Duration::from_nanos) else { return Duration::ZERO };
        if self.max_spin.is_zero() || gap > self.max_spin || self.burst_x16 > SPIN_BURST_EVENTS << 4
        {
            return Duration::ZERO;
        }
        (gap * 2 + WAKE_COST).min(self.max_spin)
    }

    /// An idle turn at `now`: spin (true) or sleep in the ring (false).
    pub fn spin(&self, now: Instant) -> bool {
        let Some(last) = self.last_work else { return false };
        let window = self.spin_window();
        let spun = now.saturating_duration_since(last);
        debug_assert!(window <= self.max_spin);
        spun < window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Feeds bursts starting every `gap`, each `busy` long; returns the policy after `n`.
    fn stream(p: &mut PollPolicy, t0: Instant, gap: Duration, busy: Duration, n: u32) -> Instant {
        let mut t = t0;
        for _ in 0..n {
            p.burst_started(t);
            p.note_events(3); // a request, its device completion, its send completion
            p.burst_ended(t + busy);
            t += gap;
        }
        t - gap + busy
    }

    #[test]
    fn never_spins_before_work_or_when_disabled() {
        let t0 = Instant::now();
        let p = PollPolicy::new(MS);
        assert!(!p.spin(t0));
        let mut off = PollPolicy::new(Duration::ZERO);
        let end = stream(&mut off, t0, us(25), us(3), 50);
        assert!(!off.spin(end + us(1)), "max_spin 0 never spins");
    }

    #[test]
    fn a_qd1_stream_is_caught_by_spinning() {
        // A request every 25 us (loopback QD1), 3 us of work each.
        let t0 = Instant::now();
        let mut p = PollPolicy::new(MS);
        let end = stream(&mut p, t0, us(25), us(3), 100);
        let w = p.spin_window();
        assert!(w >= us(50) && w <= us(80), "window {w:?}");
        assert!(p.spin(end + us(22)), "the next request (22 us later) is waited for spinning");
        assert!(p.spin(end + us(60)));
        assert!(!p.spin(end + us(100)), "a stream that stopped stops the spinning");
    }

    #[test]
    fn deep_queues_sleep_between_bursts() {
        // QD32: every burst brings dozens of events; a wake-up serves them all.
        let t0 = Instant::now();
        let mut p = PollPolicy::new(MS);
        let mut t = t0;
        for _ in 0..50 {
            p.burst_started(t);
            p.note_events(40);
            p.burst_ended(t + us(30));
            t += us(40);
        }
        assert_eq!(p.spin_window(), Duration::ZERO);
        assert!(!p.spin(t));
    }

    #[test]
    fn sparse_work_sleeps_at_once() {
        // A request every 5 ms (a trickle, or a keep-alive): not worth spinning for.
        let t0 = Instant::now();
        let mut p = PollPolicy::new(MS);
        let end = stream(&mut p, t0, 5 * MS, us(3), 20);
        assert_eq!(p.spin_window(), Duration::ZERO);
        assert!(!p.spin(end + us(1)));
    }

    #[test]
    fn the_idle_bound_holds_for_any_arrivals() {
        // Whatever the history, an idle core sleeps within max_spin of the last work.
        let t0 = Instant::now();
        for gap in [us(1), us(10), us(400), us(900), MS, 3 * MS] {
            let mut p = PollPolicy::new(MS);
            let end = stream(&mut p, t0, gap, Duration::ZERO, 64);
            assert!(p.spin_window() <= MS);
            assert!(!p.spin(end + MS), "gap {gap:?}");
        }
    }

    #[test]
    fn adapts_when_the_rate_changes() {
        let t0 = Instant::now();
        let mut p = PollPolicy::new(MS);
        let t = stream(&mut p, t0, us(20), us(2), 50);
        assert!(p.spin_window() > Duration::ZERO);
        // The client slows to one request every 10 ms: within a few bursts the core sleeps.
        let t = stream(&mut p, t + 10 * MS, 10 * MS, us(2), 12);
        assert_eq!(p.spin_window(), Duration::ZERO, "gap {:?}", p.gap_ns);
        // And it speeds up again: spinning resumes.
        stream(&mut p, t + us(30), us(30), us(2), 30);
        assert!(p.spin_window() > Duration::ZERO);
    }
}
