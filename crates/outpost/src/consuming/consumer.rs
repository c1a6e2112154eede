//! The consumer helper: read the event id (header first), deduplicate, decode, handle, and
//! only then let the offset be committed.
//!
//! A [`Consumer`] handles the messages of one partition one at a time, in order, and
//! several partitions at once (`concurrent_partitions`); see `partitions.rs`:
//!
//! 1. The event id comes from the `event_id` header; only a message without one has its body
//!    parsed for it. A duplicate is recognised without parsing its JSON.
//! 2. The [`Process`] skips a duplicate, or decodes the envelope and runs the handler:
//!    [`Inboxed`](crate::consuming::inbox::Inboxed) (PostgreSQL inbox, exactly-once effect; the
//!    recommended one) or [`Idempotent`](crate::consuming::idempotency::Idempotent) (Redis, HuleEdu's
//!    two-phase scheme).
//! 3. Once the message is settled (handled, skipped, or dead-lettered) its offset is
//!    *stored*; librdkafka commits stored offsets every `commit_interval`, when partitions
//!    are revoked and at shutdown. Nothing is ever committed past an unsettled message.
//!
//! A retriable failure holds the partition at the message and tries it again after a
//! backoff, so nothing behind it overtakes it; other partitions go on meanwhile. Database errors are retriable unless the
//! data or the statement is at fault (see [`database_is_retriable`]): a dead-lettered
//! event would let the next event of its key be applied without it. A permanent failure,
//! or a message that is not an envelope, goes to the dead-letter topic with its reason (original key, payload
//! and headers kept, `dlq_*` headers added) and the partition moves on.
//!
//! Delivery stays at-least-once: after a crash, the messages since the last commit arrive
//! again, and the [`Process`] makes them harmless.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use outpost::{
//!     Consumer, ConsumerConfig, Error, EventEnvelope, Inbox, InboxConfig, InboxHandler,
//!     InboxTable, Inboxed, Received,
//! };
//! use sqlx::{Postgres, Transaction};
//!
//! struct CountEssays;
//!
//! impl InboxHandler for CountEssays {
//!     async fn handle(
//!         &self,
//!         event: &EventEnvelope<serde_json::Value>,
//!         _received: &Received,
//!         tx: &mut Transaction<'_, Postgres>,
//!     ) -> outpost::Result<()> {
//!         sqlx::query("UPDATE batches SET essays = essays + 1 WHERE id = $1")
//!             .bind(event.data["batch_id"].as_str())
//!             .execute(&mut **tx)
//!             .await
//!             .map_err(Error::database)?;
//!         Ok(())
//!     }
//! }
//!
//! # async fn example(pool: sqlx::PgPool) -> outpost::Result<()> {
//! // How long after a first delivery the publisher may still send a duplicate.
//! let horizon = Duration::from_secs(24 * 3600);
//! let inbox = Inbox::new(pool, InboxTable::new("els")?, InboxConfig::default(), horizon)?;
//! inbox.migrate().await?;
//! let cleanup = inbox.clone();
//! tokio::spawn(async move { cleanup.run_cleanup(std::future::pending()).await });
//!
//! let topics = ["huleedu.essay.submitted.v1"];
//! let config = ConsumerConfig::new("kafka:9092", "els", topics, "els.dead-letter");
//! let consumer = Consumer::new(config, Inboxed::new(inbox, CountEssays))?;
//! consumer
//!     .run(async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     })
//!     .await
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message as _, OwnedMessage};
use serde::Deserialize;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::error::classify;
use crate::error::{bounded, database_is_retriable, redact_properties, Error, Result};
use crate::event::envelope::EventEnvelope;
use crate::kafka::acks::AckProducer;
use crate::kafka::producer::validate_brokers;

use super::partitions::{Batch, Ended, Key, Partitions, Rebalancing};

/// The header the event id is read from before falling back to the body.
pub const EVENT_ID_HEADER: &str = "event_id";
/// Dead-letter header: why the message could not be handled.
pub const DLQ_REASON: &str = "dlq_reason";
/// Longest [`DLQ_REASON`] sent, in bytes.
const MAX_REASON: usize = 4096;
/// Dead-letter header: the [`ErrorCode`](crate::error::ErrorCode) of the failure.
pub const DLQ_ERROR_CODE: &str = "dlq_error_code";
/// Dead-letter header: the topic the message was consumed from.
pub const DLQ_SOURCE_TOPIC: &str = "dlq_source_topic";
/// Dead-letter header: its partition there.
pub const DLQ_PARTITION: &str = "dlq_partition";
/// Dead-letter header: its offset there.
pub const DLQ_OFFSET: &str = "dlq_offset";
/// Dead-letter header: the consumer group that gave up on it.
pub const DLQ_CONSUMER_GROUP: &str = "dlq_consumer_group";
/// Dead-letter header, only on a dead letter sent without its payload (the message with the
/// headers added was more than the dead-letter topic takes): the payload's size in bytes. The
/// payload stays readable at [`DLQ_SOURCE_TOPIC`], [`DLQ_PARTITION`], [`DLQ_OFFSET`] while
/// that topic retains it.
pub const DLQ_PAYLOAD_OMITTED: &str = "dlq_payload_omitted";

/// librdkafka properties the at-least-once guarantee rests on; they cannot be overridden.
const MANAGED: [&str; 2] = ["enable.auto.commit", "enable.auto.offset.store"];

/// Consumer settings; build with [`ConsumerConfig::new`] and adjust fields.
#[derive(Clone, PartialEq)]
pub struct ConsumerConfig {
    /// `host:port[,host:port...]` (no default; required).
    pub brokers: String,
    /// Consumer group; also part of every deduplication key (no default; required).
    pub group_id: String,
    /// Topics to subscribe to (no default; at least one).
    pub topics: Vec<String>,
    /// Where messages that cannot be handled go (no default; required, and not one of
    /// `topics`).
    pub dead_letter_topic: String,
    /// Delay before trying a message again after a retriable failure (default 100 ms
    /// doubling to 10 s).
    pub retry: Backoff,
    /// How often stored offsets are committed (`auto.commit.interval.ms`, default 1 s).
    pub commit_interval: Duration,
    /// How long a dead-letter send may take until acked (`message.timeout.ms`, default 10 s).
    pub dead_letter_timeout: Duration,
    /// Partitions handled at once (default 8); each partition's messages are still handled
    /// one at a time, in order.
    pub concurrent_partitions: usize,
    /// Messages of one partition held in memory (waiting, or in its worker's hands) before
    /// its fetching is paused; it resumes once half of them were handled (default 500).
    pub partition_buffer: usize,
    /// Most messages of one partition settled together, when the [`Process`] can (default
    /// 1: one at a time). With more, the messages already waiting in a partition go to
    /// [`Process::process_together`] as one unit (for an inbox, one transaction); a
    /// partition with one message waiting is not held back to gather more. If the unit
    /// fails, none of it took effect, and its messages are settled again one at a time, so
    /// a failure is retried or dead-lettered on its own. Side effects outside the
    /// transaction may then run twice.
    pub together: usize,
    /// Extra librdkafka properties for the consumer, applied after Outpost's own (for
    /// example `session.timeout.ms`, `auto.offset.reset`, security settings). The offset
    /// store and auto-commit settings are Outpost's and rejected here.
    pub librdkafka: BTreeMap<String, String>,
    /// Extra librdkafka properties for the dead-letter producer, applied last.
    pub dead_letter_librdkafka: BTreeMap<String, String>,
    /// How long a shutdown waits for the messages in the workers' hands (default 30 s).
    /// Past it they are abandoned, their offsets not committed: they come again to the
    /// next consumer (a handler stuck on a lock held by a stalled process would otherwise
    /// keep the consumer from ever stopping).
    pub drain_timeout: Duration,
}

impl ConsumerConfig {
    /// Defaults for a group consuming `topics` from `brokers`.
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: impl IntoIterator<Item = impl Into<String>>,
        dead_letter_topic: impl Into<String>,
    ) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: group_id.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            dead_letter_topic: dead_letter_topic.into(),
            retry: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(10),
            },
            commit_interval: Duration::from_secs(1),
            dead_letter_timeout: Duration::from_secs(10),
            concurrent_partitions: 8,
            partition_buffer: 500,
            together: 1,
            librdkafka: BTreeMap::new(),
            dead_letter_librdkafka: BTreeMap::new(),
            drain_timeout: Duration::from_secs(30),
        }
    }

    /// Sets one librdkafka consumer property.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.librdkafka.insert(key.into(), value.into());
        self
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        validate_brokers(&self.brokers)?;
        if self.group_id.trim().is_empty() {
            return Err(Error::config("group_id", "a non-empty group id", ""));
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.trim().is_empty()) {
            return Err(Error::config(
                "topics",
                "one or more non-empty topic names",
                format!("{:?}", self.topics),
            ));
        }
        if self.dead_letter_topic.trim().is_empty() || self.topics.contains(&self.dead_letter_topic)
        {
            return Err(Error::config(
                "dead_letter_topic",
                "a non-empty topic that is not consumed",
                &self.dead_letter_topic,
            ));
        }
        if self.retry.initial.is_zero() || self.retry.max < self.retry.initial {
            return Err(Error::config(
                "retry",
                "initial > 0 and max >= initial",
                format!("{:?}", self.retry),
            ));
        }
        if self.commit_interval.is_zero() {
            return Err(Error::config("commit_interval", "positive", "0s"));
        }
        if self.dead_letter_timeout < Duration::from_millis(100) {
            return Err(Error::config(
                "dead_letter_timeout",
                "at least 100 ms",
                format!("{:?}", self.dead_letter_timeout),
            ));
        }
        for (name, value) in [
            ("concurrent_partitions", self.concurrent_partitions),
            ("partition_buffer", self.partition_buffer),
            ("together", self.together),
        ] {
            if value == 0 {
                return Err(Error::config(name, "a positive integer", "0"));
            }
        }
        if let Some(key) = MANAGED.iter().find(|k| self.librdkafka.contains_key(**k)) {
            return Err(Error::config(
                format!("librdkafka.{key}"),
                "unset (offsets are stored only after a message is settled)",
                &self.librdkafka[*key],
            ));
        }
        Ok(())
    }

    fn consumer_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("client.id", "outpost-consumer")
            // Offsets are stored by hand once a message is settled; librdkafka commits what
            // was stored, periodically, on revocation and on close.
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "true")
            .set(
                "auto.commit.interval.ms",
                self.commit_interval.as_millis().to_string(),
            )
            // A new group reads what was published before it first joined.
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("reconnect.backoff.ms", "50")
            .set("reconnect.backoff.max.ms", "1000");
        for (k, v) in &self.librdkafka {
            cfg.set(k, v);
        }
        cfg
    }

    fn dead_letter_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.brokers)
            .set("client.id", "outpost-dead-letter")
            .set("acks", "all")
            // A failed dead-letter send is retried by the consumer (the offset is not stored),
            // so a duplicate in the dead-letter topic is possible anyway; without idempotence
            // the producer also survives tansu's fencing after a timeout.
            .set("enable.idempotence", "false")
            .set("linger.ms", "0")
            .set(
                "message.timeout.ms",
                self.dead_letter_timeout.as_millis().to_string(),
            )
            .set("reconnect.backoff.ms", "50")
            .set("reconnect.backoff.max.ms", "1000");
        for (k, v) in &self.dead_letter_librdkafka {
            cfg.set(k, v);
        }
        cfg
    }
}

/// Hides the values of librdkafka properties that may hold a secret (`sasl.password`, ...).
impl fmt::Debug for ConsumerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("retry", &self.retry)
            .field("commit_interval", &self.commit_interval)
            .field("dead_letter_timeout", &self.dead_letter_timeout)
            .field("concurrent_partitions", &self.concurrent_partitions)
            .field("partition_buffer", &self.partition_buffer)
            .field("together", &self.together)
            .field("drain_timeout", &self.drain_timeout)
            .field("librdkafka", &redact_properties(&self.librdkafka))
            .field(
                "dead_letter_librdkafka",
                &redact_properties(&self.dead_letter_librdkafka),
            )
            .finish()
    }
}

/// One message as the consumer received it, before its body is decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// The consumer group that received it.
    pub group_id: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Message key, if any.
    pub key: Option<Vec<u8>>,
    /// Headers (values decoded as UTF-8, lossily; the first of repeated names wins; a name
    /// that is not UTF-8 is left out).
    pub headers: BTreeMap<String, String>,
    /// The raw payload.
    pub payload: Vec<u8>,
    /// The event id, from the `event_id` header or else the envelope (see [`event_id`]).
    pub event_id: Uuid,
}

impl Received {
    /// The producer's W3C `traceparent` header, when it carries a valid one: start the
    /// handler's span as its child to continue the trace.
    pub fn traceparent(&self) -> Option<&str> {
        self.headers
            .get(crate::event::trace::TRACEPARENT)
            .map(String::as_str)
            .filter(|p| p.parse::<crate::event::trace::TraceParent>().is_ok())
    }

    /// The `tracestate` header that goes with [`traceparent`](Self::traceparent).
    pub fn tracestate(&self) -> Option<&str> {
        self.traceparent()?;
        self.headers
            .get(crate::event::trace::TRACESTATE)
            .map(String::as_str)
    }

    /// Parses the payload as an envelope.
    ///
    /// # Errors
    /// [`Error::Decode`] when it is not one, or when its `event_id` differs from the one
    /// deduplication used.
    pub fn decode(&self) -> Result<EventEnvelope<serde_json::Value>> {
        let envelope: EventEnvelope<serde_json::Value> = serde_json::from_slice(&self.payload)
            .map_err(|e| Error::Decode {
                reason: format!("payload is not an event envelope: {e}"),
            })?;
        if envelope.event_id != self.event_id {
            return Err(Error::Decode {
                reason: format!(
                    "event_id header {} does not match the envelope's {}",
                    self.event_id, envelope.event_id
                ),
            });
        }
        Ok(envelope)
    }
}

/// The event id of a message: the `event_id` header when present (no JSON parsing), else
/// the envelope's `event_id` field.
///
/// # Errors
/// [`Error::Decode`] when the header is not a UUID, or there is no header and the payload
/// has no `event_id`.
pub fn event_id(headers: &BTreeMap<String, String>, payload: &[u8]) -> Result<Uuid> {
    #[derive(Deserialize)]
    struct IdOnly {
        event_id: Uuid,
    }
    if let Some(raw) = headers.get(EVENT_ID_HEADER) {
        return raw.parse().map_err(|_| Error::Decode {
            reason: format!("event_id header {raw:?} is not a UUID"),
        });
    }
    serde_json::from_slice::<IdOnly>(payload)
        .map(|e| e.event_id)
        .map_err(|e| Error::Decode {
            reason: format!("no event_id header, and no event_id in the payload: {e}"),
        })
}

/// How a message was settled by a [`Process`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler ran and its effect is durable.
    Handled,
    /// The event had already been handled; nothing was done.
    Duplicate,
}

impl Outcome {
    /// The `outcome` label of the consumed-messages metric.
    fn label(self) -> &'static str {
        match self {
            Outcome::Handled => "handled",
            Outcome::Duplicate => "duplicate",
        }
    }
}

/// The business side of consuming with [`Idempotent`](crate::consuming::idempotency::Idempotent):
/// what to do with one decoded event.
///
/// Contract: return `Ok` only once the effect is durable (committed); the event is then
/// marked completed and never handled again. An error must leave no effect behind: a
/// [retriable](Error::retriable) one makes the consumer hand the same event over again
/// after a backoff, a [permanent](Error::permanent) one dead-letters it; report database
/// errors with [`Error::database`], which tells the two apart by SQLSTATE.
pub trait Handler: Send + Sync {
    /// Handles `event`, received as `received`.
    ///
    /// # Errors
    /// Whatever the handler reports; see the trait's contract.
    fn handle(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        received: &Received,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// What a [`Consumer`] runs for each message: deduplicate, decode, handle.
///
/// Contract: called for one message of a partition at a time, in partition order, and
/// for several partitions at once; the same event may also be in progress in another
/// consumer of the group (after a rebalance), which the implementation must tolerate. `Ok` settles the message and lets its offset be committed;
/// a retriable error makes the consumer call again with the same message after a backoff;
/// any other error dead-letters it.
pub trait Process: Send + Sync {
    /// Settles `received`.
    ///
    /// # Errors
    /// See the trait's contract; [`Error::Decode`] for a payload that is not an envelope.
    fn process(&self, received: &Received) -> impl Future<Output = Result<Outcome>> + Send;

    /// Settles `received` (consecutive messages of one partition, in order) as one unit:
    /// all of them or none. `Some(Ok)` holds an outcome per message, in order; after
    /// `Some(Err)` none may have taken effect (the consumer then calls
    /// [`process`](Self::process) for each). `None` (the default): this `Process` settles
    /// one message at a time only.
    fn process_together(
        &self,
        received: &[Received],
    ) -> impl Future<Output = Option<Result<Vec<Outcome>>>> + Send {
        let _ = received;
        async { None }
    }
}

/// A Kafka consumer that settles each message with a [`Process`] before committing it.
pub struct Consumer<P> {
    config: ConsumerConfig,
    // Shared with the blocking-pool threads that seek and commit.
    consumer: Arc<StreamConsumer<Rebalancing>>,
    dead_letters: AckProducer,
    process: P,
    /// Handler panics since the last event the handler got through (see [`Self::settle`]).
    panics_in_a_row: AtomicU32,
}

/// Handler panics in a row dead-lettered; past them a panic is retried in place. A handler
/// left broken by a panic (a poisoned lock, say) would otherwise dead-letter every event
/// that follows.
const PANICS_DEAD_LETTERED: u32 = 3;

impl<P> fmt::Debug for Consumer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<P: Process> Consumer<P> {
    /// Creates the consumer and subscribes it (the group is joined once [`run`](Self::run)
    /// polls).
    ///
    /// # Errors
    /// [`Error::Configuration`] for invalid settings or librdkafka properties.
    pub fn new(config: ConsumerConfig, process: P) -> Result<Self> {
        config.validate()?;
        let consumer: StreamConsumer<Rebalancing> = config
            .consumer_config()
            .create_with_context(Rebalancing::default())
            .map_err(|e| {
                Error::config(
                    "librdkafka",
                    "valid librdkafka consumer properties",
                    e.to_string(),
                )
            })?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| Error::config("topics", "valid topic names", e.to_string()))?;
        let dead_letters = AckProducer::new(&config.dead_letter_config()).map_err(|e| {
            Error::config(
                "dead_letter_librdkafka",
                "valid librdkafka producer properties",
                e.to_string(),
            )
        })?;
        Ok(Self {
            config,
            consumer: Arc::new(consumer),
            dead_letters,
            process,
            panics_in_a_row: AtomicU32::new(0),
        })
    }

    /// The settings.
    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// Consumes until `shutdown` resolves, then lets every worker finish the message in
    /// hand, commits the stored offsets and returns. Queued messages, and a message waiting
    /// out a retry backoff, are left uncommitted and come again on the next run.
    ///
    /// # Errors
    /// [`Error::KafkaConsume`] when the consumer hits a fatal error.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let mut shutdown = pin!(shutdown.fuse());
        let group = self.config.group_id.as_str();
        let mut parts = Partitions::new(self.config.partition_buffer);
        let mut running = FuturesUnordered::new();
        let mut backoffs = FuturesUnordered::new();
        let mut recv_failures = 0u32;
        let mut recv_after: Option<tokio::time::Instant> = None;
        info!(group, topics = ?self.config.topics, "consumer started");
        let result = loop {
            while running.len() < self.config.concurrent_partitions {
                let Some(batch) = parts.next_batch(&*self.consumer) else {
                    break;
                };
                running.push(self.work(batch));
            }
            tokio::select! {
                biased;
                () = &mut shutdown => break Ok(()),
                () = self.consumer.context().revoked() => {
                    parts.revoke(self.consumer.context().take());
                }
                Some((key, generation, ended)) = running.next() => {
                    if let Some(delay) = parts.ended(&key, generation, ended, &*self.consumer) {
                        backoffs.push(async move {
                            tokio::time::sleep(delay).await;
                            (key, generation)
                        });
                    }
                }
                Some((key, generation)) = backoffs.next() => parts.due(&key, generation),
                () = sleep_until(recv_after) => recv_after = None,
                next = self.consumer.recv(), if recv_after.is_none() => match next {
                    Ok(msg) => {
                        recv_failures = 0;
                        parts.push(msg.detach(), &*self.consumer);
                    }
                    Err(e) => {
                        if self.consumer.client().fatal_error().is_some() {
                            break Err(Error::KafkaConsume {
                                operation: "recv",
                                source: e,
                            });
                        }
                        recv_failures += 1;
                        warn!(group, error = %e, "kafka consumer error");
                        recv_after = Some(
                            tokio::time::Instant::now() + self.config.retry.delay(recv_failures),
                        );
                    }
                },
            }
        };
        // Workers finish the message in hand; what is queued comes again on the next run.
        parts.cancel_all();
        let drained = tokio::time::timeout(self.config.drain_timeout, async {
            while running.next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                group,
                workers = running.len(),
                "messages still in hand past the drain timeout are abandoned; they come again"
            );
            drop(running);
        }
        let consumer = Arc::clone(&self.consumer);
        // A synchronous commit waits for the broker; on a runtime thread it would stall
        // every other task scheduled there.
        let committed =
            tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync))
                .await;
        match committed {
            Ok(Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))) => {}
            // The runtime is shutting down under it: nothing to report to.
            Err(e) if e.is_cancelled() => {}
            Err(e) => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(e)) => warn!(
                group,
                error = %e,
                "final offset commit failed; uncommitted messages come again and are skipped as duplicates"
            ),
        }
        info!(group, "consumer stopped");
        result
    }

    /// Settles a partition's queued messages in order, storing each one's offset once it
    /// is settled; stops at the first that fails (to be tried again after a backoff) or
    /// when cancelled.
    async fn work(&self, batch: Batch) -> (Key, u64, Ended) {
        let Batch {
            key,
            generation,
            mut messages,
            mut attempts,
            cancel,
        } = batch;
        let group = self.config.group_id.as_str();
        // Messages left to settle one at a time after a unit of them failed.
        let mut alone = 0usize;
        let ended = loop {
            if cancel.is_cancelled() {
                break Ended::Cancelled;
            }
            let waiting = messages.len().min(self.config.together);
            if alone == 0 && attempts == 0 && waiting > 1 {
                if self.settle_together(messages.range(..waiting)).await {
                    let last = messages[waiting - 1].offset();
                    if let Err(e) = self.consumer.store_offset(&key.0, key.1, last) {
                        debug!(group, error = %e, "offset not stored");
                    }
                    messages.drain(..waiting);
                    continue;
                }
                alone = waiting;
            }
            let Some(msg) = messages.front() else {
                break Ended::Done;
            };
            match self.settle(msg).await {
                Ok(()) => {
                    attempts = 0;
                    alone = alone.saturating_sub(1);
                    if let Err(e) = self.consumer.store_offset(&key.0, key.1, msg.offset()) {
                        // The partition was revoked meanwhile: its new owner gets the
                        // message again and skips it as a duplicate.
                        debug!(group, error = %e, "offset not stored");
                    }
                    messages.pop_front();
                }
                Err(failure) => {
                    attempts += 1;
                    let delay = self.config.retry.delay(attempts);
                    let span = tracing::info_span!(
                        "message",
                        group,
                        topic = msg.topic(),
                        partition = msg.partition(),
                        offset = msg.offset(),
                        attempts,
                    );
                    let _in = span.enter();
                    let error = explain(&failure);
                    if retry_in_place(&failure) {
                        warn!(error, ?delay, "handling failed; will retry");
                    } else {
                        error!(
                            error,
                            "message can be neither handled nor dead-lettered; partition held"
                        );
                    }
                    break Ended::Retry {
                        rest: messages,
                        attempts,
                        delay,
                    };
                }
            }
        };
        (key, generation, ended)
    }

    /// Settles `msgs` as one unit if the [`Process`] can; `false` means none of them was
    /// settled.
    async fn settle_together(&self, msgs: impl Iterator<Item = &OwnedMessage>) -> bool {
        let Ok(received) = msgs
            .map(|msg| self.received(msg))
            .collect::<Result<Vec<_>>>()
        else {
            return false; // the bad one is dead-lettered on its own
        };
        let group = self.config.group_id.as_str();
        // A panic leaves them to be settled one at a time, where it is dead-lettered.
        let together = AssertUnwindSafe(self.process.process_together(&received))
            .catch_unwind()
            .await
            .unwrap_or(None);
        match together {
            None => false,
            Some(Ok(outcomes)) => {
                debug!(
                    group,
                    messages = received.len(),
                    "messages settled together"
                );
                for outcome in outcomes {
                    crate::metrics::consumed(group, outcome.label());
                }
                true
            }
            Some(Err(e)) => {
                debug!(group, error = %e, "settling together failed; one at a time");
                false
            }
        }
    }

    /// Handles, skips or dead-letters one message. An error means it is not settled.
    async fn settle(&self, msg: &OwnedMessage) -> Result<()> {
        let outcome = match self.received(msg) {
            Ok(received) => {
                // A handler that panics would take the consumer down, and again at the same
                // message after every restart: a bug it meets in this event is a permanent
                // failure of the event (unless the build aborts on panic). Once several
                // events in a row made it panic, it is the handler that is broken: the
                // partition waits and retries, as for a retriable failure.
                let handled = AssertUnwindSafe(self.process.process(&received))
                    .catch_unwind()
                    .await;
                let in_a_row = &self.panics_in_a_row;
                match handled {
                    Ok(outcome) => {
                        if outcome.is_ok() {
                            in_a_row.store(0, Ordering::Relaxed);
                        }
                        outcome
                    }
                    Err(panic) => {
                        let n = in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
                        let said = panicked(panic.as_ref());
                        if n <= PANICS_DEAD_LETTERED {
                            Err(Error::permanent(said))
                        } else {
                            Err(Error::retriable(format!(
                                "{said} ({n} panics in a row: retried, not dead-lettered)"
                            )))
                        }
                    }
                }
            }
            Err(e) => Err(e),
        };
        let group = self.config.group_id.as_str();
        match outcome {
            Ok(outcome) => {
                debug!(
                    topic = msg.topic(),
                    partition = msg.partition(),
                    offset = msg.offset(),
                    ?outcome,
                    "message settled"
                );
                crate::metrics::consumed(group, outcome.label());
                Ok(())
            }
            Err(e) if retry_in_place(&e) => {
                crate::metrics::consumed(group, "retried");
                Err(e)
            }
            Err(e) => {
                self.dead_letter(msg, &e).await?;
                crate::metrics::consumed(group, "dead_lettered");
                Ok(())
            }
        }
    }

    fn received(&self, msg: &OwnedMessage) -> Result<Received> {
        let headers = msg.headers().map(headers_of).unwrap_or_default();
        let payload = msg.payload().ok_or_else(|| Error::Decode {
            reason: "message has no payload".into(),
        })?;
        Ok(Received {
            group_id: self.config.group_id.clone(),
            topic: msg.topic().to_owned(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(<[u8]>::to_vec),
            event_id: event_id(&headers, payload)?,
            headers,
            payload: payload.to_vec(),
        })
    }

    /// Sends `msg` to the dead-letter topic as it was (key, payload, headers) plus `dlq_*`
    /// headers, and waits for the ack.
    async fn dead_letter(&self, msg: &OwnedMessage, failure: &Error) -> Result<()> {
        // Bounded: an error that quotes a large input would otherwise make the dead letter
        // too large for the broker, and the partition would wait on it for good.
        let reason = bounded(&explain(failure), MAX_REASON).to_owned();
        let code = failure.code().to_string();
        let partition = msg.partition().to_string();
        let offset = msg.offset().to_string();
        let added = [
            (DLQ_REASON, reason.as_str()),
            (DLQ_ERROR_CODE, code.as_str()),
            (DLQ_SOURCE_TOPIC, msg.topic()),
            (DLQ_PARTITION, partition.as_str()),
            (DLQ_OFFSET, offset.as_str()),
            (DLQ_CONSUMER_GROUP, self.config.group_id.as_str()),
        ];
        let mut headers = msg.headers().cloned().unwrap_or_default();
        for (key, value) in added {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let topic = self.config.dead_letter_topic.as_str();
        let timeout = self.config.dead_letter_timeout;
        let sent = match self
            .dead_letters
            .send(topic, msg.key(), msg.payload(), headers.clone(), timeout)
            .await
        {
            // Refused for its size (a payload near the limit, the headers added, or a
            // dead-letter topic that takes less than the source): the same message would be
            // refused for good, and the partition wait on it. It goes without its payload,
            // which its origin in the headers still points to.
            Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
                let size = msg.payload().map_or(0, <[u8]>::len).to_string();
                let headers = headers.insert(Header {
                    key: DLQ_PAYLOAD_OMITTED,
                    value: Some(size.as_str()),
                });
                self.dead_letters
                    .send(topic, msg.key(), None, headers, timeout)
                    .await
            }
            sent => sent,
        };
        match sent {
            Ok(_) => {
                warn!(
                    group = self.config.group_id,
                    topic = msg.topic(),
                    partition = msg.partition(),
                    offset = msg.offset(),
                    dead_letter_topic = topic,
                    reason,
                    "message dead-lettered"
                );
                Ok(())
            }
            Err(source) => Err(Error::KafkaPublish {
                topic: topic.to_owned(),
                class: classify(&source),
                source,
            }),
        }
    }
}

/// A message's headers by name (values decoded as UTF-8, lossily; the first of repeated
/// names wins). A header whose name is not UTF-8 is left out: rdkafka panics reading it
/// (librdkafka does not check names), and that panic would stop the consumer on the same
/// message after every restart.
fn headers_of(all: &impl Headers) -> BTreeMap<String, String> {
    let mut headers = BTreeMap::new();
    for idx in 0..all.count() {
        // Nothing is left half-changed by the panic: it comes after the read, before the
        // header is returned.
        let read = std::panic::catch_unwind(AssertUnwindSafe(|| all.try_get(idx)));
        match read {
            Ok(Some(h)) => {
                let value = String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned();
                headers.entry(h.key.to_owned()).or_insert(value);
            }
            Ok(None) => {}
            Err(_) => warn!(index = idx, "header with a name that is not UTF-8 left out"),
        }
    }
    headers
}

/// Resolves at `at`; never when there is none.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether `err` makes the consumer try the message again (after a backoff) rather than
/// dead-letter it. Storage errors, also the outbox's met by a publishing handler, are
/// judged as database errors by [`database_is_retriable`].
fn retry_in_place(err: &Error) -> bool {
    match err {
        Error::OutboxStorage { source, .. } | Error::InboxStorage { source, .. } => {
            database_is_retriable(source)
        }
        other => other.is_retriable(),
    }
}

/// What a handler's panic said.
fn panicked(panic: &(dyn std::any::Any + Send)) -> String {
    let said = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!("the handler panicked: {said}")
}

/// The error and its source chain, `: `-separated. A cause whose text its parent already
/// ends with is left out (some clients print their source in their own message).
fn explain(err: &Error) -> String {
    let mut out = err.to_string();
    let mut next = std::error::Error::source(err);
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ConsumerConfig {
        ConsumerConfig::new("127.0.0.1:9092", "g", ["a", "b"], "a.dlq")
    }

    #[test]
    fn config_validation_names_the_field() {
        assert!(config().validate().is_ok());
        let mut c = config();
        c.dead_letter_topic = "a".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("dead_letter_topic"));
        let mut c = config();
        c.topics.clear();
        assert!(c.validate().unwrap_err().to_string().contains("topics"));
        let c = config().with("enable.auto.offset.store", "true");
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("librdkafka.enable.auto.offset.store"));
        let mut c = config();
        c.group_id = " ".into();
        assert!(c.validate().unwrap_err().to_string().contains("group_id"));
        c = config();
        c.brokers = "nope".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn debug_output_hides_secret_properties() {
        let mut c = config()
            .with("security.protocol", "SASL_SSL")
            .with("sasl.password", "s3cret");
        c.dead_letter_librdkafka
            .insert("ssl.key.password".into(), "s3cret".into());
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("SASL_SSL"), "{shown}");
        assert!(shown.contains("group_id: \"g\""), "{shown}");
    }

    #[test]
    fn event_id_is_read_from_the_header_first() {
        let id = Uuid::new_v4();
        let headers = BTreeMap::from([(EVENT_ID_HEADER.to_owned(), id.to_string())]);
        // The payload is never looked at when the header is there.
        assert_eq!(event_id(&headers, b"not json").unwrap(), id);
        let body = format!(r#"{{"event_id":"{id}","data":{{"big":[1,2,3]}}}}"#);
        assert_eq!(event_id(&BTreeMap::new(), body.as_bytes()).unwrap(), id);
        let bad = BTreeMap::from([(EVENT_ID_HEADER.to_owned(), "x".to_owned())]);
        let err = event_id(&bad, body.as_bytes()).unwrap_err();
        assert!(!err.is_retriable());
        assert!(err.to_string().contains("not a UUID"), "{err}");
        assert!(event_id(&BTreeMap::new(), b"{}").is_err());
    }

    #[test]
    fn decode_rejects_an_envelope_whose_id_differs_from_the_header() {
        let env = EventEnvelope::new("t.v1", "svc", serde_json::json!({"n": 1}));
        let mut received = Received {
            group_id: "g".into(),
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            headers: BTreeMap::new(),
            payload: serde_json::to_vec(&env).unwrap(),
            event_id: env.event_id,
        };
        assert_eq!(received.decode().unwrap(), env);
        received.event_id = Uuid::new_v4();
        let err = received.decode().unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        received.payload = b"[]".to_vec();
        assert!(received
            .decode()
            .unwrap_err()
            .to_string()
            .contains("not an event envelope"));
    }

    /// Headers that read like rdkafka's, which unwrap the UTF-8 check of the name.
    struct RawHeaders(Vec<(&'static [u8], &'static [u8])>);

    impl Headers for RawHeaders {
        fn count(&self) -> usize {
            self.0.len()
        }

        fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
            let (name, value) = self.0.get(idx)?;
            Some(Header {
                key: std::str::from_utf8(name).unwrap(),
                value: Some(*value),
            })
        }
    }

    #[test]
    fn a_header_name_that_is_not_utf8_is_left_out() {
        let headers = RawHeaders(vec![
            (b"event_id", b"e1"),
            (b"\xff", b"x"),
            (b"tenant", b"acme\xff"),
            (b"event_id", b"e2"),
        ]);
        assert_eq!(
            headers_of(&headers),
            BTreeMap::from([
                ("event_id".to_owned(), "e1".to_owned()),
                ("tenant".to_owned(), "acme\u{fffd}".to_owned()),
            ])
        );
    }

    #[test]
    fn explanations_follow_the_source_chain() {
        let err = Error::permanent("unknown essay");
        assert_eq!(explain(&err), "event handler failed: unknown essay");
        let undecodable = Error::Decode { reason: "x".into() };
        assert_eq!(explain(&undecodable), "undecodable message: x");
    }

    #[test]
    fn storage_errors_are_judged_as_database_errors() {
        // A publishing handler's outbox insert that lost its connection mid-protocol: the
        // relay may judge it otherwise, the consumer retries the event in place.
        let lost = Error::storage("stage", sqlx::Error::Protocol("unexpected eof".into()));
        assert!(retry_in_place(&lost));
        let inbox = Error::InboxStorage {
            operation: "claim",
            source: sqlx::Error::PoolTimedOut,
        };
        assert!(retry_in_place(&inbox));
        let missing = Error::storage("stage", sqlx::Error::RowNotFound);
        assert!(!retry_in_place(&missing));
        assert!(retry_in_place(&Error::retriable("downstream")));
        assert!(!retry_in_place(&Error::permanent("unknown essay")));
        assert!(!retry_in_place(&Error::Decode { reason: "x".into() }));
    }
}
