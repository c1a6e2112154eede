//! The API services call: one [`Publisher`], three modes.
//!
//! - [`Mode::Transactional`] (the default, and the one to use for state changes): the event
//!   is staged in the caller's transaction; right after commit it is produced and its row
//!   settled on the ack, so latency is one broker round trip. If that dispatch fails, or
//!   the process dies after commit, the relay delivers the row. The eager path claims the
//!   row with the same lease the relay uses, so the two never both send it, and it only
//!   claims the head of a key: it never overtakes an older pending event of the same key.
//! - [`Mode::KafkaFirst`] (HuleEdu's July 2025 pattern, for callers with no database state
//!   to protect): produce directly with a bounded deadline; on a transient failure store
//!   the same bytes (same `event_id`) in the outbox in a transaction of its own and wake
//!   the relay. A circuit breaker skips Kafka after consecutive failures. **Windows:** a
//!   crash between the caller's commit and the Kafka ack loses the event; a publish before
//!   the caller's commit can announce state that is then rolled back; a direct send that
//!   timed out may still land later, as a duplicate with the same `event_id`.
//! - [`Mode::OutboxOnly`]: stage in the transaction and let the woken relay deliver (the
//!   design HuleEdu ended with): no work after commit beyond a wake-up hint.

use std::collections::HashSet;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::{PgConnection, Postgres, Transaction};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::breaker::{BreakerConfig, CircuitBreaker, CircuitState};
use crate::delivery::{longest_send, Delivery};
use crate::envelope::OutboxEvent;
use crate::error::{Error, EventContext, Result};
use crate::producer::{ErrorClass, KafkaProducer};
use crate::relay::RelayConfig;
use crate::store::OutboxStore;
use crate::wake::{validate_service, Waker};
use crate::Environment;

/// How a publisher gets events to Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Stage in the caller's transaction, produce right after commit, relay as the net.
    #[default]
    Transactional,
    /// Produce directly; fall back to the outbox when Kafka fails.
    KafkaFirst,
    /// Stage in the caller's transaction; the woken relay delivers.
    OutboxOnly,
}

impl Mode {
    /// Lowercase, hyphenated name (`transactional`, `kafka-first`, `outbox-only`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transactional => "transactional",
            Self::KafkaFirst => "kafka-first",
            Self::OutboxOnly => "outbox-only",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "transactional" => Ok(Self::Transactional),
            "kafka-first" => Ok(Self::KafkaFirst),
            "outbox-only" => Ok(Self::OutboxOnly),
            _ => Err(Error::config(
                "mode",
                "one of transactional, kafka-first, outbox-only",
                s,
            )),
        }
    }
}

/// Publisher settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PublisherConfig {
    /// Service name: metric label, wake-up key.
    pub service: String,
    /// Default mode (default transactional); [`Publisher::with_mode`] picks per call site.
    pub mode: Mode,
    /// Kafka-first: the longest a direct publish may take before the event goes to the
    /// outbox (default 1 s).
    pub direct_deadline: Duration,
    /// Transactional: the longest `commit()` waits for eager dispatch after the database
    /// commit before leaving the events to the relay (default 5 s; it only matters when
    /// Kafka is slow or down, and after a few failures the circuit opens and commits stop
    /// waiting at all).
    pub dispatch_deadline: Duration,
    /// Circuit breaker: Kafka-first skips Kafka while it is open, and the transactional
    /// mode skips eager dispatch (the relay delivers).
    pub breaker: BreakerConfig,
    /// Delivery settings shared with the relay (lease, backoff, attempt budget, rows per
    /// key); use the relay's, so the eager path settles rows exactly as the relay would.
    pub delivery: RelayConfig,
}

impl PublisherConfig {
    /// Defaults for `service` in `env`.
    pub fn new(service: impl Into<String>, env: Environment) -> Self {
        let service = service.into();
        Self {
            delivery: RelayConfig::new(service.clone(), env),
            service,
            mode: Mode::default(),
            direct_deadline: Duration::from_secs(1),
            dispatch_deadline: Duration::from_secs(5),
            breaker: BreakerConfig::default(),
        }
    }
}

/// The publisher; cheap to clone, safe to share.
#[derive(Debug, Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
    mode: Mode,
}

#[derive(Debug)]
struct Inner {
    store: OutboxStore,
    producer: Arc<KafkaProducer>,
    waker: Waker,
    config: PublisherConfig,
    delivery: Delivery,
    owner: Uuid,
    breaker: Mutex<CircuitBreaker>,
    /// Keys with an event this publisher sent to the outbox that may still be pending:
    /// later events of those keys follow it there, so they cannot overtake it.
    fallback_keys: Mutex<HashSet<String>>,
}

/// An event staged in a transaction that has not been dispatched yet.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "pass it to Publisher::after_commit once the transaction has committed"]
pub struct Staged {
    /// The staged event's id.
    pub event_id: Uuid,
    /// Its partition key.
    pub event_key: String,
}

/// What happened right after a commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dispatch {
    /// Events this commit staged that the eager path delivered.
    pub eager_published: usize,
    /// Events this commit staged that are left to the relay (which was woken).
    pub left_to_relay: usize,
}

/// Which path a Kafka-first event took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishPath {
    /// Acked by Kafka directly.
    Direct,
    /// Stored in the outbox; the relay delivers it.
    Outbox,
}

impl Publisher {
    /// A publisher over `store`, producing with `producer`, waking the relay with `waker`.
    ///
    /// # Errors
    /// [`Error::Configuration`] for invalid settings.
    pub fn new(
        store: OutboxStore,
        producer: Arc<KafkaProducer>,
        waker: Waker,
        config: PublisherConfig,
    ) -> Result<Self> {
        validate_service(&config.service)?;
        config.delivery.validate(longest_send(&producer))?;
        if config.dispatch_deadline.is_zero() {
            return Err(Error::config(
                "dispatch_deadline",
                "a positive duration",
                "0",
            ));
        }
        if config.direct_deadline.is_zero() {
            return Err(Error::config("direct_deadline", "a positive duration", "0"));
        }
        if config.breaker.failure_threshold == 0 {
            return Err(Error::config(
                "breaker.failure_threshold",
                "a positive integer",
                "0",
            ));
        }
        let delivery = Delivery::new(Arc::clone(&producer), &config.delivery);
        let store = store.with_service(&config.service);
        Ok(Self {
            mode: config.mode,
            inner: Arc::new(Inner {
                store,
                producer,
                waker,
                breaker: Mutex::new(CircuitBreaker::new(config.breaker)),
                config,
                delivery,
                owner: Uuid::new_v4(),
                fallback_keys: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// The same publisher in another mode (for one call site).
    #[must_use]
    pub fn with_mode(&self, mode: Mode) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            mode,
        }
    }

    /// This publisher's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The outbox it stages into.
    pub fn store(&self) -> &OutboxStore {
        &self.inner.store
    }

    /// Opens a transaction for business writes and events; [`OutboxTx::commit`] commits
    /// and then dispatches, so the post-commit step cannot be forgotten.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when no connection is available.
    pub async fn begin(&self) -> Result<OutboxTx> {
        let tx = self
            .inner
            .store
            .pool()
            .begin()
            .await
            .map_err(|e| Error::storage("begin", e))?;
        Ok(OutboxTx {
            tx,
            publisher: self.clone(),
            staged: Vec::new(),
        })
    }

    /// Stages `event` in a transaction the caller owns. After the caller commits, pass the
    /// result to [`after_commit`](Self::after_commit); a caller who forgets loses only
    /// latency: the row is pending and unleased, and the relay finds it by polling.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the insert fails.
    pub async fn stage(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &OutboxEvent,
    ) -> Result<Staged> {
        self.inner.store.stage(tx, event).await?;
        Ok(Staged {
            event_id: event.event_id,
            event_key: event.event_key.clone(),
        })
    }

    /// Runs the post-commit step of the publisher's mode: eager dispatch (transactional)
    /// or a wake-up hint (outbox-only, and for whatever the eager path could not send).
    /// Never fails: the events are committed, so the worst case is relay latency.
    pub async fn after_commit(&self, staged: Vec<Staged>) -> Dispatch {
        if staged.is_empty() {
            return Dispatch::default();
        }
        let dispatch = match self.mode {
            Mode::Transactional => self.dispatch_eagerly(&staged).await,
            Mode::OutboxOnly | Mode::KafkaFirst => Dispatch {
                eager_published: 0,
                left_to_relay: staged.len(),
            },
        };
        if dispatch.left_to_relay > 0 {
            self.inner.waker.nudge().await;
        }
        dispatch
    }

    /// Eager dispatch, bounded by `dispatch_deadline` and skipped while the circuit is
    /// open, so a Kafka outage never makes `commit()` wait out delivery timeouts. A
    /// dispatch that outlives the deadline finishes (and settles its rows) in the
    /// background; its events count as left to the relay.
    async fn dispatch_eagerly(&self, staged: &[Staged]) -> Dispatch {
        let left = Dispatch {
            eager_published: 0,
            left_to_relay: staged.len(),
        };
        let allowed = {
            let mut breaker = self.inner.breaker.lock().unwrap_or_else(|p| p.into_inner());
            breaker.allow(Instant::now())
        };
        if !allowed {
            crate::metrics::eager(&self.inner.config.service, 0, staged.len());
            return left;
        }
        let publisher = self.clone();
        let staged = staged.to_vec();
        let task = tokio::spawn(async move { publisher.dispatch_now(&staged).await });
        match tokio::time::timeout(self.inner.config.dispatch_deadline, task).await {
            Ok(Ok(dispatch)) => dispatch,
            Ok(Err(_)) => left,
            Err(_) => {
                // Kafka is too slow to wait for: count it, so the circuit opens and later
                // commits stop waiting.
                self.breaker(|b| b.on_failure(Instant::now()));
                left
            }
        }
    }

    async fn dispatch_now(&self, staged: &[Staged]) -> Dispatch {
        let inner = &self.inner;
        let service = inner.config.service.as_str();
        let mut keys: Vec<String> = staged.iter().map(|s| s.event_key.clone()).collect();
        keys.sort();
        keys.dedup();
        let claimed_at = Instant::now();
        let claimed = match inner
            .store
            .claim_keys(
                inner.owner,
                &keys,
                inner.config.delivery.per_key.max(staged.len()),
                inner.config.delivery.lease,
            )
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                warn!(error = %e, "eager dispatch could not claim; leaving events to the relay");
                crate::metrics::eager(service, 0, staged.len());
                return Dispatch {
                    eager_published: 0,
                    left_to_relay: staged.len(),
                };
            }
        };
        let claim_took = claimed_at.elapsed();
        let claimed_ids: Vec<(i64, Uuid)> = claimed.iter().map(|r| (r.id, r.event_id)).collect();
        let (outcomes, report, transient) = inner.delivery.deliver(claimed, claimed_at).await;
        let deliver_took = claimed_at.elapsed() - claim_took;
        if transient {
            self.breaker(|b| b.on_failure(Instant::now()));
        } else if report.published > 0 {
            self.breaker(|b| b.on_success());
        }
        if let Err(e) = inner.store.settle(inner.owner, &outcomes).await {
            // Acked rows stay leased until the lease lapses; the relay then sends them
            // again (same bytes, same event id).
            warn!(error = %e, "eager dispatch could not settle; the relay will redeliver");
        }
        let published: HashSet<Uuid> = outcomes
            .iter()
            .filter(|(_, o)| *o == crate::store::Settlement::Published)
            .filter_map(|(id, _)| claimed_ids.iter().find(|(cid, _)| cid == id))
            .map(|(_, event_id)| *event_id)
            .collect();
        let hits = staged
            .iter()
            .filter(|s| published.contains(&s.event_id))
            .count();
        let misses = staged.len() - hits;
        crate::metrics::eager(service, hits, misses);
        debug!(
            hits,
            misses,
            ?claim_took,
            ?deliver_took,
            total = ?claimed_at.elapsed(),
            "eager dispatch"
        );
        Dispatch {
            eager_published: hits,
            left_to_relay: misses,
        }
    }

    /// Publishes one event without a business transaction.
    ///
    /// Kafka-first: produce directly within `direct_deadline`; on a transient failure (or
    /// with the circuit open, or while an earlier event of the same key waits in the
    /// outbox) store the same bytes in the outbox and wake the relay. Other modes: stage
    /// in a transaction of its own, then run the mode's post-commit step.
    ///
    /// Success means acked by Kafka or committed to the outbox, never less.
    ///
    /// # Errors
    /// [`Error::KafkaPublish`] for a permanent Kafka error (the outbox cannot help);
    /// [`Error::OutboxStorage`] (with aggregate, event type, topic, correlation id and the
    /// cause) when the event could not be stored either.
    pub async fn publish(&self, event: &OutboxEvent) -> Result<PublishPath> {
        if self.mode != Mode::KafkaFirst {
            let mut tx = self.begin().await?;
            tx.publish(event).await?;
            let dispatch = tx.commit().await?;
            return Ok(if dispatch.eager_published > 0 {
                PublishPath::Direct
            } else {
                PublishPath::Outbox
            });
        }
        let inner = &self.inner;
        let service = inner.config.service.as_str();
        if self.key_waits_in_outbox(&event.event_key).await {
            return self.fall_back(event, "key_pending").await;
        }
        let (allowed, probe) = {
            let mut breaker = inner.breaker.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let probe = breaker.state(now) != CircuitState::Closed;
            let allowed = breaker.allow(now);
            crate::metrics::circuit(service, breaker.state(now));
            (allowed, allowed && probe)
        };
        if !allowed {
            return self.fall_back(event, "circuit_open").await;
        }
        let mut abandoned_probe = AbandonedProbe {
            publisher: self,
            armed: probe,
        };
        // The send runs to completion in a task of its own. Abandoned at the deadline, its
        // failure would never reach the producer, whose replace-when-stuck logic (needed
        // after a broker restart) would then never run: the circuit would never close.
        let send = {
            let producer = Arc::clone(&inner.producer);
            let (topic, key) = (event.topic.clone(), event.event_key.clone());
            let (payload, headers) = (event.payload.clone(), event.headers.clone());
            tokio::spawn(async move { producer.send(&topic, &key, &payload, &headers).await })
        };
        let sent = tokio::time::timeout(inner.config.direct_deadline, send).await;
        abandoned_probe.armed = false;
        let reason = match sent {
            Ok(Ok(Ok(_))) => {
                self.breaker(|b| b.on_success());
                crate::metrics::direct(service, "acked");
                info!(event_id = %event.event_id, topic = %event.topic, path = "direct", "published");
                return Ok(PublishPath::Direct);
            }
            Ok(Ok(Err(failure))) if failure.class == ErrorClass::Permanent => {
                self.breaker(|b| b.on_success()); // the broker answered
                crate::metrics::direct(service, "rejected");
                return Err(Error::KafkaPublish {
                    topic: event.topic.clone(),
                    class: failure.class,
                    source: failure.error,
                });
            }
            Ok(Ok(Err(failure))) => {
                debug!(error = %failure, "direct publish failed");
                "kafka_error"
            }
            Ok(Err(panicked)) => {
                warn!(error = %panicked, "direct publish task failed");
                "kafka_error"
            }
            Err(_) => "timeout",
        };
        self.breaker(|b| b.on_failure(Instant::now()));
        crate::metrics::direct(service, "failed");
        self.fall_back(event, reason).await
    }

    fn breaker(&self, f: impl FnOnce(&mut CircuitBreaker)) {
        let mut breaker = self.inner.breaker.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut breaker);
        crate::metrics::circuit(&self.inner.config.service, breaker.state(Instant::now()));
    }

    async fn key_waits_in_outbox(&self, key: &str) -> bool {
        let inner = &self.inner;
        let known = inner
            .fallback_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key);
        if !known {
            return false;
        }
        // If the check fails, assume it still waits: order matters more than latency.
        let waiting = inner.store.has_pending_key(key).await.unwrap_or(true);
        if !waiting {
            inner
                .fallback_keys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(key);
        }
        waiting
    }

    async fn fall_back(&self, event: &OutboxEvent, reason: &'static str) -> Result<PublishPath> {
        let inner = &self.inner;
        let context = || EventContext {
            aggregate_type: Some(event.aggregate_type.clone()),
            aggregate_id: Some(event.aggregate_id.clone()),
            event_type: Some(event.event_type.clone()),
            topic: Some(event.topic.clone()),
            correlation_id: Some(event.correlation_id),
        };
        let stored = async {
            let mut tx = inner.store.pool().begin().await?;
            inner
                .store
                .stage(&mut tx, event)
                .await
                .map_err(|e| match e {
                    Error::OutboxStorage { source, .. } => source,
                    other => sqlx::Error::Protocol(other.to_string()),
                })?;
            tx.commit().await
        }
        .await;
        if let Err(source) = stored {
            warn!(event_id = %event.event_id, error = %source, "kafka-first: kafka failed and the outbox write failed too");
            return Err(Error::storage_with(
                "kafka_first_fallback",
                context(),
                source,
            ));
        }
        inner
            .fallback_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(event.event_key.clone());
        crate::metrics::fallback(&inner.config.service, reason);
        info!(event_id = %event.event_id, topic = %event.topic, path = "outbox", reason, "published");
        inner.waker.nudge().await;
        Ok(PublishPath::Outbox)
    }
}

/// A half-open probe whose caller dropped the `publish` future before it finished counts
/// as failed: without a report the breaker would stay half-open, letting no probe through
/// and sending every call to the outbox, for good.
struct AbandonedProbe<'a> {
    publisher: &'a Publisher,
    armed: bool,
}

impl Drop for AbandonedProbe<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.publisher.breaker(|b| b.on_failure(Instant::now()));
        }
    }
}

/// A business transaction that stages events; committing it dispatches them.
///
/// Dereferences to the connection, so business statements run on it:
/// `sqlx::query("UPDATE ...").execute(&mut *tx)`. Dropping it without commit rolls back.
#[derive(Debug)]
pub struct OutboxTx {
    tx: Transaction<'static, Postgres>,
    publisher: Publisher,
    staged: Vec<Staged>,
}

impl OutboxTx {
    /// Stages `event` in this transaction.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the insert fails; roll back.
    pub async fn publish(&mut self, event: &OutboxEvent) -> Result<()> {
        let staged = self.publisher.stage(&mut self.tx, event).await?;
        self.staged.push(staged);
        Ok(())
    }

    /// Commits, then runs the mode's post-commit step.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the commit fails (nothing was published).
    pub async fn commit(self) -> Result<Dispatch> {
        self.tx
            .commit()
            .await
            .map_err(|e| Error::storage("commit", e))?;
        Ok(self.publisher.after_commit(self.staged).await)
    }

    /// Rolls back: no business change, no event.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the rollback cannot be sent (the server rolls back
    /// anyway when the connection closes).
    pub async fn rollback(self) -> Result<()> {
        self.tx
            .rollback()
            .await
            .map_err(|e| Error::storage("rollback", e))
    }

    /// The underlying sqlx transaction.
    pub fn transaction(&mut self) -> &mut Transaction<'static, Postgres> {
        &mut self.tx
    }
}

impl Deref for OutboxTx {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.tx
    }
}

impl DerefMut for OutboxTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.tx
    }
}
