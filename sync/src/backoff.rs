//! Reconnect delays: exponential with jitter, capped, reset on a successful connection.
//!
//! Attempt `n` (from 0) waits a delay drawn uniformly from `[d/2, d]` where
//! `d = min(max, initial * 2^n)`: the floor keeps a fleet from hammering a hub that just came
//! back, the jitter spreads the fleet's reconnects out.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Reconnect back-off state.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// Starts at `initial`, doubles per failed attempt, never above `max`; jitter seeded from
    /// the clock.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0x5eed, |d| {
                d.as_secs().rotate_left(30) ^ u64::from(d.subsec_nanos())
            })
            ^ u64::from(std::process::id()).rotate_left(32);
        Self::with_seed(initial, max, seed)
    }

    /// Like [`Backoff::new`] with a fixed jitter seed, for tests.
    pub fn with_seed(initial: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
            rng: seed,
        }
    }

    /// The delay before the next attempt; counts one more failed attempt.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        let ceiling = self.initial.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let span = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        let jitter = if span == 0 {
            0
        } else {
            self.next_random() % span.saturating_add(1)
        };
        half + Duration::from_nanos(jitter)
    }

    /// A connection succeeded: the next failure starts from `initial` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Failed attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    // SplitMix64: jitter needs spread, not secrecy.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn grows_exponentially_within_jitter_bounds_and_caps() {
        let mut b = Backoff::with_seed(100 * MS, 1000 * MS, 7);
        let ceilings = [100, 200, 400, 800, 1000, 1000, 1000];
        for c in ceilings {
            let d = b.next_delay();
            assert!(
                d >= c * MS / 2 && d <= c * MS,
                "{d:?} not in [{c}/2, {c}] ms"
            );
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::with_seed(100 * MS, 10_000 * MS, 1);
        for _ in 0..5 {
            b.next_delay();
        }
        assert_eq!(b.attempts(), 5);
        b.reset();
        assert!(b.next_delay() <= 100 * MS);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut a = Backoff::with_seed(1000 * MS, 1000 * MS, 1);
        let delays: std::collections::HashSet<_> = (0..20).map(|_| a.next_delay()).collect();
        assert!(delays.len() > 15, "only {} distinct delays", delays.len());
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::with_seed(MS, 60_000 * MS, 3);
        for _ in 0..1000 {
            assert!(b.next_delay() <= 60_000 * MS);
        }
    }
}
