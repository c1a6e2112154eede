//! The relay worker: claim → produce (pipelined across keys, one in flight per key) →
//! settle, woken by hints and polling adaptively as the safety net.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::backoff::Backoff;
pub use crate::delivery::BatchReport;
use crate::delivery::{longest_send, Delivery};
use crate::environment::Environment;
use crate::error::{Error, Result};
use crate::poll::{PollConfig, PollSchedule};
use crate::producer::KafkaProducer;
use crate::store::OutboxStore;
use crate::wake::{validate_service, WakeSignal};

/// Relay settings; build with [`RelayConfig::new`] and adjust fields.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    /// Service name: metric label and wake-up key `outbox:wake:{service}`.
    pub service: String,
    /// Key heads claimed per iteration (default 100).
    pub batch_size: usize,
    /// Rows of one key claimed behind its head per iteration (default 20).
    pub per_key: usize,
    /// How long a claim is exclusive; a crashed relay's rows come back after it
    /// (default 90 s; at least twice the longest send, i.e. delivery plus queue timeout).
    /// No send starts once it could outlast the lease: the rest of its key is handed
    /// back, so a slow broker never lets a second relay send the same rows.
    pub lease: Duration,
    /// Polling bounds (defaults per [`Environment`]).
    pub poll: PollConfig,
    /// Retry schedule for failed deliveries (default 100 ms doubling to 10 s).
    pub backoff: Backoff,
    /// Unclassified failures allowed before an event is parked (default 10). Transient
    /// failures (broker down, timeouts) never count; permanent ones park at once.
    pub max_attempts: u32,
    /// How long published rows are kept before deletion (default 1 h).
    pub retention: Duration,
    /// How often retention runs (default 60 s).
    pub cleanup_interval: Duration,
    /// Most rows deleted per cleanup statement (default 10 000).
    pub cleanup_batch: i64,
    /// Most keys with a message in flight at once (default 1000).
    pub max_in_flight: usize,
    /// How often the backlog gauges are refreshed (default 1 s).
    pub backlog_interval: Duration,
}

impl RelayConfig {
    /// Defaults for `service` in `env`.
    pub fn new(service: impl Into<String>, env: Environment) -> Self {
        Self {
            service: service.into(),
            batch_size: 100,
            per_key: 20,
            lease: Duration::from_secs(90),
            poll: PollConfig::for_environment(env),
            backoff: Backoff::default(),
            max_attempts: 10,
            retention: Duration::from_secs(3600),
            cleanup_interval: Duration::from_secs(60),
            cleanup_batch: 10_000,
            max_in_flight: 1000,
            backlog_interval: Duration::from_secs(1),
        }
    }

    /// Checks the settings against each other and against the producer's timeouts.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the first bad field.
    pub fn validate(&self, longest_send: Duration) -> Result<()> {
        validate_service(&self.service)?;
        let positive = [
            ("batch_size", self.batch_size),
            ("per_key", self.per_key),
            ("max_in_flight", self.max_in_flight),
            ("max_attempts", self.max_attempts as usize),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::config(name, "a positive integer", "0"));
            }
        }
        if self.poll.min_interval > self.poll.max_interval || self.poll.max_interval.is_zero() {
            return Err(Error::config(
                "poll.max_interval",
                "positive and not below poll.min_interval",
                format!("{:?}", self.poll.max_interval),
            ));
        }
        if self.lease < longest_send * 2 {
            return Err(Error::config(
                "lease",
                format!("at least twice the delivery plus queue timeout ({longest_send:?})"),
                format!("{:?}", self.lease),
            ));
        }
        if self.backoff.initial.is_zero() || self.backoff.max < self.backoff.initial {
            return Err(Error::config(
                "backoff",
                "initial > 0 and max >= initial",
                format!("{:?}", self.backoff),
            ));
        }
        Ok(())
    }
}

/// Delivers one outbox table's pending rows to Kafka.
#[derive(Debug)]
pub struct Relay {
    store: OutboxStore,
    producer: Arc<KafkaProducer>,
    delivery: Delivery,
    config: RelayConfig,
    owner: Uuid,
    wake: WakeSignal,
    saw_transient: AtomicBool,
}

impl Relay {
    /// A relay over `store`, producing with `producer`.
    ///
    /// # Errors
    /// [`Error::Configuration`] when `config` is invalid.
    pub fn new(
        store: OutboxStore,
        producer: Arc<KafkaProducer>,
        config: RelayConfig,
    ) -> Result<Self> {
        config.validate(longest_send(&producer))?;
        let delivery = Delivery::new(Arc::clone(&producer), &config);
        let store = store.with_service(&config.service);
        Ok(Self {
            store,
            producer,
            delivery,
            config,
            owner: Uuid::new_v4(),
            wake: WakeSignal::new(),
            saw_transient: AtomicBool::new(false),
        })
    }

    /// Uses `signal` for wake-ups (share it with listeners or in-process writers).
    #[must_use]
    pub fn with_wake_signal(mut self, signal: WakeSignal) -> Self {
        self.wake = signal;
        self
    }

    /// The signal that wakes this relay.
    pub fn wake_signal(&self) -> WakeSignal {
        self.wake.clone()
    }

    /// This relay's lease owner id.
    pub fn owner(&self) -> Uuid {
        self.owner
    }

    /// The settings.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Claims one batch, delivers it and settles it.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when claiming or settling fails (rows stay leased and come
    /// back when the lease lapses).
    pub async fn run_once(&self) -> Result<BatchReport> {
        let claimed_at = Instant::now();
        let claimed = self
            .store
            .claim(
                self.owner,
                self.config.batch_size,
                self.config.per_key,
                self.config.lease,
            )
            .await?;
        if claimed.is_empty() {
            return Ok(BatchReport::default());
        }
        let (outcomes, report, transient) = self.delivery.deliver(claimed, claimed_at).await;
        self.store.settle(self.owner, &outcomes).await?;
        if transient {
            self.saw_transient.store(true, Ordering::Relaxed);
        } else if report.published > 0 && self.saw_transient.swap(false, Ordering::Relaxed) {
            // The broker is back: rows backed off during the outage need not wait out
            // their delays.
            let pulled = self.store.pull_forward_retries().await?;
            info!(
                rows = pulled,
                "broker recovered; retrying backed-off rows now"
            );
        }
        debug!(?report, "batch settled");
        Ok(report)
    }

    /// Runs until `shutdown` resolves, then finishes the batch in hand (awaiting every
    /// delivery report and settling it), flushes the producer and returns.
    ///
    /// Database errors are logged and retried after `poll.error_backoff`; this only returns
    /// an error if the final flush cannot be attempted.
    ///
    /// # Errors
    /// Currently never; reserved for unrecoverable start-up failures.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let mut shutdown = pin!(shutdown.fuse());
        let service = self.config.service.clone();
        let mut schedule = PollSchedule::new(self.config.poll);
        let mut last_backlog: Option<Instant> = None;
        let mut last_cleanup = Instant::now();
        info!(service, owner = %self.owner, "relay started");
        loop {
            let wait = match self.run_once().await {
                Ok(report) => schedule.after_batch(report.claimed, self.config.batch_size),
                Err(e) => {
                    crate::metrics::relay_error(&service);
                    warn!(error = %e, source = ?std::error::Error::source(&e), "relay iteration failed");
                    schedule.after_error()
                }
            };
            crate::metrics::poll_interval(&service, schedule.current());
            if last_backlog.is_none_or(|t| t.elapsed() >= self.config.backlog_interval) {
                if let Ok(b) = self.store.backlog().await {
                    crate::metrics::backlog(&service, b.pending, b.oldest_pending);
                }
                last_backlog = Some(Instant::now());
            }
            if last_cleanup.elapsed() >= self.config.cleanup_interval {
                self.cleanup().await;
                last_cleanup = Instant::now();
            }
            if (&mut shutdown).now_or_never().is_some() {
                break;
            }
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = self.wake.notified() => schedule.on_wake(),
                () = tokio::time::sleep(wait) => {}
            }
        }
        self.producer.flush(Duration::from_secs(5));
        info!(service, "relay stopped");
        Ok(())
    }

    /// Deletes published rows older than the retention, in bounded batches.
    pub async fn cleanup(&self) -> u64 {
        let mut total = 0;
        loop {
            match self
                .store
                .cleanup(self.config.retention, self.config.cleanup_batch)
                .await
            {
                Ok(n) => {
                    total += n;
                    if n < u64::try_from(self.config.cleanup_batch).unwrap_or(0) {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "retention cleanup failed");
                    break;
                }
            }
        }
        if total > 0 {
            crate::metrics::cleaned(&self.config.service, total);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_field() {
        let mut c = RelayConfig::new("els", Environment::Testing);
        assert!(c.validate(Duration::from_secs(5)).is_ok());
        c.lease = Duration::from_secs(5);
        let e = c.validate(Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("invalid setting lease"));
        c = RelayConfig::new("bad name", Environment::Testing);
        assert!(c.validate(Duration::from_secs(1)).is_err());
        c = RelayConfig::new("els", Environment::Testing);
        c.batch_size = 0;
        assert!(c
            .validate(Duration::from_secs(1))
            .unwrap_err()
            .to_string()
            .contains("batch_size"));
    }
}
