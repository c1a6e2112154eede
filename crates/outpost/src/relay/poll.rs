//! Adaptive polling: how long the relay waits before looking at the table again.

use std::time::Duration;

use crate::environment::Environment;

/// Polling bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PollConfig {
    /// First idle wait, and the wait after a wake-up or activity (default 10 ms).
    pub min_interval: Duration,
    /// Longest idle wait (default: 5 s in production, 1 s in development, 0.1 s in testing).
    pub max_interval: Duration,
    /// Wait after a failed iteration (default: 30 s / 10 s / 1 s).
    pub error_backoff: Duration,
}

impl PollConfig {
    /// The defaults for `env`.
    pub fn for_environment(env: Environment) -> Self {
        Self {
            min_interval: Duration::from_millis(10).min(env.max_poll_interval()),
            max_interval: env.max_poll_interval(),
            error_backoff: env.error_backoff(),
        }
    }
}

impl Default for PollConfig {
    fn default() -> Self {
        Self::for_environment(Environment::default())
    }
}

/// The relay's current polling interval.
///
/// Full batches re-poll at once; any activity snaps back to the minimum; each idle poll
/// doubles the wait up to the maximum; a wake-up resets it to the minimum.
#[derive(Debug, Clone)]
pub struct PollSchedule {
    config: PollConfig,
    current: Duration,
}

impl PollSchedule {
    /// Starts at the minimum interval.
    pub fn new(config: PollConfig) -> Self {
        Self {
            config,
            current: config.min_interval,
        }
    }

    /// The wait after an iteration that claimed `claimed` rows out of a possible `capacity`.
    pub fn after_batch(&mut self, claimed: usize, capacity: usize) -> Duration {
        if claimed > 0 {
            self.current = self.config.min_interval;
            if claimed >= capacity {
                return Duration::ZERO;
            }
            return self.current;
        }
        let wait = self.current;
        self.current = (self.current * 2).min(self.config.max_interval);
        wait
    }

    /// The wait after a failed iteration.
    pub fn after_error(&mut self) -> Duration {
        self.config.error_backoff
    }

    /// A wake-up arrived: the next idle wait starts from the minimum again.
    pub fn on_wake(&mut self) {
        self.current = self.config.min_interval;
    }

    /// The interval the next idle poll would wait.
    pub fn current(&self) -> Duration {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> PollSchedule {
        PollSchedule::new(PollConfig::for_environment(Environment::Production))
    }

    #[test]
    fn idle_backs_off_to_max_and_snaps_back() {
        let mut s = schedule();
        let waits: Vec<_> = (0..12).map(|_| s.after_batch(0, 100)).collect();
        assert_eq!(waits[0], Duration::from_millis(10));
        assert_eq!(waits[1], Duration::from_millis(20));
        assert!(waits.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*waits.last().unwrap(), Duration::from_secs(5));
        s.on_wake();
        assert_eq!(s.current(), Duration::from_millis(10));
        s.after_batch(0, 100);
        s.after_batch(0, 100);
        assert_eq!(s.after_batch(3, 100), Duration::from_millis(10));
        assert_eq!(s.current(), Duration::from_millis(10));
    }

    #[test]
    fn full_batches_repoll_at_once() {
        let mut s = schedule();
        assert_eq!(s.after_batch(100, 100), Duration::ZERO);
        assert_eq!(s.after_error(), Duration::from_secs(30));
    }

    #[test]
    fn testing_caps_at_a_tenth_of_a_second() {
        let mut s = PollSchedule::new(PollConfig::for_environment(Environment::Testing));
        let last = (0..20).map(|_| s.after_batch(0, 1)).last().unwrap();
        assert_eq!(last, Duration::from_millis(100));
    }
}
