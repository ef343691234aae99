//! Auto-converge: when the copy rounds of a live migration stop shrinking
//! (the guests dirty clusters about as fast as the copy sends them), the
//! source slows the guests' writes on every member's gate
//! ([`crate::switch::Gate::throttle`]) to a fraction of the measured copy
//! rate, and lowers that fraction each round that still does not shrink,
//! as QEMU's auto-converge steps its vCPU throttle. Reads are never
//! slowed, and a write is only admitted later, never failed or reordered.
//!
//! This module decides the rate; the gate enforces it. The throttle goes
//! when [`Converge`] is dropped or [`Converge::lift`]ed: at the switch
//! (after the gates are paused, so delayed writes park in the holding
//! queue in their order), on abort and on every failure.

use std::sync::Arc;
use std::time::Duration;

use crate::switch::{Gate, Throttle};

/// The first throttle admits writes at this fraction of the copy rate.
const FIRST: f64 = 0.5;
/// Each round that does not shrink multiplies the fraction by this.
const STEP: f64 = 0.6;
/// The lowest fraction (QEMU's auto-converge stops at a 99 % throttle).
const FLOOR: f64 = 0.01;
/// A round shrinks when what is dirty after it is at most this fraction
/// of what it sent (QEMU's `throttle-trigger-threshold` is 50 %).
const SHRINK: f64 = 0.5;

/// The auto-converge state of one outgoing migration.
pub struct Converge {
    enabled: bool,
    gates: Vec<(Arc<Gate>, u64)>,
    throttles: Vec<Throttle>,
    /// The fraction of the copy rate admitted, once throttling.
    fraction: Option<f64>,
    /// The write rate admitted now, bytes per second.
    rate: Option<u64>,
    /// Rounds that ran throttled.
    pub rounds: u32,
    /// The lowest write rate admitted.
    pub min_rate: Option<u64>,
    /// The gates' delayed-write counts when the migration started.
    base: u64,
}

impl Converge {
    /// For the members' gates, each with its volume's cluster size (what
    /// one write dirties at least).
    pub fn new(enabled: bool, gates: Vec<(Arc<Gate>, u64)>) -> Converge {
        let base = gates.iter().map(|(g, _)| g.throttle_counts().delayed).sum();
        Converge {
            enabled,
            gates,
            throttles: Vec::new(),
            fraction: None,
            rate: None,
            rounds: 0,
            min_rate: None,
            base,
        }
    }

    /// The write rate admitted now (bytes per second), if throttling.
    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// Guest writes the throttle delayed during this migration.
    pub fn delayed(&self) -> u64 {
        let now: u64 = self
            .gates
            .iter()
            .map(|(g, _)| g.throttle_counts().delayed)
            .sum();
        now.saturating_sub(self.base)
    }

    /// A round starts: count it if it runs throttled.
    pub fn round_started(&mut self) {
        if self.rate.is_some() {
            self.rounds += 1;
        }
    }

    /// A round sent `sent` bytes in `took` at `copy_rate` bytes per second,
    /// and `dirty` bytes are dirty after it: throttle the writes, or
    /// throttle them harder, if it did not shrink. Returns the write rate
    /// admitted from now on, if any.
    pub fn after_round(
        &mut self,
        sent: u64,
        dirty: u64,
        took: Duration,
        copy_rate: f64,
    ) -> Option<u64> {
        if !self.enabled {
            return None;
        }
        let dirty_rate = dirty as f64 / took.as_secs_f64().max(1e-3);
        let stuck = dirty as f64 > sent as f64 * SHRINK || dirty_rate > copy_rate;
        if stuck {
            self.fraction = Some(self.fraction.map_or(FIRST, |f| (f * STEP).max(FLOOR)));
        }
        let f = self.fraction?;
        let rate = ((copy_rate * f) as u64).max(1);
        if self.throttles.is_empty() {
            self.throttles = self
                .gates
                .iter()
                .map(|(g, grain)| g.throttle(rate, *grain))
                .collect();
        } else {
            for (t, (_, grain)) in self.throttles.iter().zip(&self.gates) {
                t.set(rate, *grain);
            }
        }
        self.rate = Some(rate);
        self.min_rate = Some(self.min_rate.map_or(rate, |m| m.min(rate)));
        Some(rate)
    }

    /// Let every delayed write go and stop throttling.
    pub fn lift(&mut self) {
        self.throttles.clear();
        self.rate = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::switch::SwitchStats;

    fn gate() -> Arc<Gate> {
        Gate::new(Arc::new(SwitchStats::default()))
    }

    #[test]
    fn rounds_that_do_not_shrink_step_the_throttle_down_to_its_floor() {
        let mut c = Converge::new(true, vec![(gate(), 65536)]);
        let s = Duration::from_secs(1);
        // Shrinking by more than half: no throttle.
        assert_eq!(c.after_round(100 << 20, 40 << 20, s, 200e6), None);
        // Not shrinking: half the copy rate, then 60 % of that each time.
        assert_eq!(
            c.after_round(100 << 20, 90 << 20, s, 200e6),
            Some(100_000_000)
        );
        c.round_started();
        assert_eq!(
            c.after_round(90 << 20, 80 << 20, s, 200e6),
            Some(60_000_000)
        );
        c.round_started();
        // A round that shrinks keeps the fraction (the rate follows the copy).
        assert_eq!(
            c.after_round(80 << 20, 10 << 20, s, 100e6),
            Some(30_000_000)
        );
        for _ in 0..20 {
            c.after_round(10 << 20, 10 << 20, s, 100e6);
        }
        assert_eq!(c.rate(), Some(1_000_000), "the floor is 1 % of the copy");
        assert_eq!(c.min_rate, Some(1_000_000));
        assert_eq!(c.rounds, 2);
        c.lift();
        assert_eq!(c.rate(), None);
    }

    #[test]
    fn a_dirty_rate_above_the_copy_rate_throttles_even_when_the_round_shrank() {
        let mut c = Converge::new(true, vec![(gate(), 65536)]);
        // 10 MiB dirtied in 10 ms: 1 GB/s against a 200 MB/s copy.
        let r = c.after_round(100 << 20, 10 << 20, Duration::from_millis(10), 200e6);
        assert_eq!(r, Some(100_000_000));
    }

    #[test]
    fn with_auto_converge_off_nothing_is_throttled() {
        let g = gate();
        let mut c = Converge::new(false, vec![(g.clone(), 65536)]);
        assert_eq!(c.after_round(1, 1 << 30, Duration::from_secs(1), 1e6), None);
        assert!(g.pace(0, 4096).is_none());
    }
}
