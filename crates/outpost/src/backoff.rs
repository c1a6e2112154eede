//! Retry schedule: exponential growth with jitter, capped.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with "equal jitter": the n-th retry waits between half and all of
/// `min(max, initial * 2^(n-1))`, so many rows failing together do not retry in lockstep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the first retry (default 100 ms).
    pub initial: Duration,
    /// Upper bound of any delay (default 10 s).
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The uncapped-by-jitter ceiling for retry number `attempt` (1-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        self.initial
            .checked_mul(1u32 << exp)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The delay before retry number `attempt` (1-based), with jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        let jitter = rand::rng().random_range(0.0..=1.0);
        half + half.mul_f64(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(2), Duration::from_millis(200));
        assert_eq!(b.ceiling(4), Duration::from_millis(800));
        assert_eq!(b.ceiling(6), Duration::from_secs(2));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn jitter_stays_within_half_and_full_ceiling() {
        let b = Backoff::default();
        let mut distinct = std::collections::HashSet::new();
        for attempt in 1..=10 {
            for _ in 0..50 {
                let d = b.delay(attempt);
                assert!(d >= b.ceiling(attempt) / 2 && d <= b.ceiling(attempt));
                distinct.insert(d);
            }
        }
        assert!(distinct.len() > 100, "jitter should spread delays");
    }
}
