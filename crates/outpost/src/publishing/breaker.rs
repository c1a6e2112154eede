//! Circuit breaker for Kafka-first publishing: after consecutive transient failures stop
//! paying the broker timeout on every call, and let one probe through now and then.

use std::time::{Duration, Instant};

/// Breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive transient failures that open the circuit (default 3).
    pub failure_threshold: u32,
    /// How long the circuit stays open before one probe is let through (default 5 s).
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            open_for: Duration::from_secs(5),
        }
    }
}

/// The breaker's state (also a metric: 0 closed, 1 half-open, 2 open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls go to Kafka.
    Closed,
    /// One probe is in flight; other calls go to the outbox.
    HalfOpen,
    /// Calls go straight to the outbox.
    Open,
}

impl CircuitState {
    /// Numeric form for the gauge.
    pub fn as_gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::HalfOpen => 1.0,
            Self::Open => 2.0,
        }
    }
}

/// How [`CircuitBreaker::admit`] let a call through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The circuit is closed.
    Closed,
    /// The circuit is half-open and this call is its one probe.
    Probe,
}

/// A consecutive-failure circuit breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            failures: 0,
            open_until: None,
            probing: false,
        }
    }

    /// The state at `now`.
    pub fn state(&self, now: Instant) -> CircuitState {
        match self.open_until {
            None => CircuitState::Closed,
            Some(_) if self.probing => CircuitState::HalfOpen,
            Some(until) if now >= until => CircuitState::HalfOpen,
            Some(_) => CircuitState::Open,
        }
    }

    /// Whether a call may try Kafka now. Once the open period is over exactly one caller
    /// gets `true` (the probe) until it reports back.
    pub fn allow(&mut self, now: Instant) -> bool {
        self.admit(now).is_some()
    }

    /// As [`allow`](Self::allow), saying how: `None` while open (or while another call
    /// probes), else whether the circuit was closed or this call is the half-open probe
    /// (which must report back, or be released).
    pub fn admit(&mut self, now: Instant) -> Option<Admission> {
        match self.open_until {
            None => Some(Admission::Closed),
            Some(until) if now >= until && !self.probing => {
                self.probing = true;
                Some(Admission::Probe)
            }
            Some(_) => None,
        }
    }

    /// Kafka acknowledged (or answered at all): close the circuit.
    pub fn on_success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.probing = false;
    }

    /// The probe let through by [`allow`](Self::allow) ended without asking Kafka anything
    /// (nothing to send, or the caller gave up before sending): the next call may probe.
    /// Outside a probe this does nothing.
    pub fn release_probe(&mut self) {
        self.probing = false;
    }

    /// A transient failure (or a timeout) at `now`.
    pub fn on_failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        if self.probing || self.failures >= self.config.failure_threshold {
            self.open_until = Some(now + self.config.open_for);
            self.probing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_probes_once() {
        let cfg = BreakerConfig {
            failure_threshold: 2,
            open_for: Duration::from_secs(1),
        };
        let mut b = CircuitBreaker::new(cfg);
        let t0 = Instant::now();
        assert!(b.allow(t0));
        b.on_failure(t0);
        assert_eq!(b.state(t0), CircuitState::Closed);
        b.on_failure(t0);
        assert_eq!(b.state(t0), CircuitState::Open);
        assert!(!b.allow(t0 + Duration::from_millis(500)));
        let later = t0 + Duration::from_secs(1);
        assert!(b.allow(later), "one probe");
        assert!(!b.allow(later), "only one probe");
        assert_eq!(b.state(later), CircuitState::HalfOpen);
        b.on_failure(later);
        assert_eq!(b.state(later), CircuitState::Open, "failed probe reopens");
        let later = later + Duration::from_secs(1);
        assert!(b.allow(later));
        b.on_success();
        assert_eq!(b.state(later), CircuitState::Closed);
        assert!(b.allow(later));
    }

    #[test]
    fn a_released_probe_lets_the_next_call_probe() {
        let cfg = BreakerConfig {
            failure_threshold: 1,
            open_for: Duration::from_millis(10),
        };
        let mut b = CircuitBreaker::new(cfg);
        let t0 = Instant::now();
        b.on_failure(t0);
        let later = t0 + Duration::from_millis(10);
        assert!(b.allow(later));
        assert!(!b.allow(later), "one probe at a time");
        b.release_probe();
        assert!(
            b.allow(later),
            "a released probe does not wedge the circuit"
        );
        b.on_success();
        assert_eq!(b.state(later), CircuitState::Closed);
    }

    #[test]
    fn success_resets_the_count() {
        let mut b = CircuitBreaker::new(BreakerConfig::default());
        let t = Instant::now();
        b.on_failure(t);
        b.on_failure(t);
        b.on_success();
        b.on_failure(t);
        b.on_failure(t);
        assert_eq!(b.state(t), CircuitState::Closed);
        b.on_failure(t);
        assert_eq!(b.state(t), CircuitState::Open);
    }
}
