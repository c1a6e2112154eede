//! Outpost: reliable, instant event publishing for Rust services on PostgreSQL and Kafka.
//!
//! ```text
//!  service                                      relay (any number of replicas)
//!  ┌───────────────────────────┐  commit  ┌────────────────────────────────────────┐
//!  │ publisher.begin()         │────────▶ │ claim key heads (SKIP LOCKED + lease)  │
//!  │ UPDATE your tables        │          │ produce: many keys in flight, one per  │
//!  │ tx.publish(event) (stage) │          │   key; idempotent, acks=all            │
//!  │ tx.commit()               │          │ settle: published / retry + backoff /  │
//!  └──────┬──────────────┬─────┘          │   dead (parked with its reason)        │
//!         │ eager: claim │ else: wake     └───────────────────┬────────────────────┘
//!         │ + produce    │ (Redis/NOTIFY,                     │
//!         │ + settle     │  relay also polls)                 │
//!         ▼              └──────────────────▶ relay           ▼
//!       Kafka ◀───────────────────────────────────────────── Kafka
//!         │
//!         ▼ consumer: event_id (header first) → inbox dedup → handler → offset
//! ```
//!
//! Guarantees: at-least-once delivery; a duplicate carries the same `event_id` and the
//! same bytes; events of one key reach Kafka in staging order, also across retries,
//! replicas and the eager path; a row is `published` only after the broker acknowledged
//! it; with the inbox, a consumer's effect happens once.
//!
//! Modules, in pipeline order:
//! - [`envelope`]: the HuleEdu-compatible [`EventEnvelope`], serialized once into an [`OutboxEvent`].
//! - [`trace`]: W3C `traceparent` from the envelope's metadata into the headers, and back out for consumers.
//! - `otel` (feature `opentelemetry`): the same from and to OpenTelemetry span contexts.
//! - [`publisher`]: the API services call: transactional (eager after commit), Kafka-first, outbox-only.
//! - [`breaker`]: the circuit breaker that lets publishing skip a Kafka known to be down.
//! - [`table`]: the validated `schema.table` name of a service's outbox.
//! - [`store`]: all SQL: migrate, stage in the caller's transaction, claim, settle, retention.
//! - [`wake`]: wake-up hints (Redis `LPUSH`/`BLPOP`, PostgreSQL `NOTIFY`) on `outbox:wake:{service}`.
//! - [`admin`]: operator queries: status at a glance, parked rows in full, purge.
//! - [`relay`]: the worker tying claim → produce → settle together, with graceful shutdown.
//! - [`poll`]: adaptive polling between wake-ups.
//! - [`environment`]: per-environment defaults (testing, development, production).
//! - [`backoff`]: exponential retry delays with jitter.
//! - [`producer`]: the Kafka producer, error classes (transient / retriable / permanent), rebuild when fenced.
//! - [`consumer`]: the consuming side: event id header-first, dedup, handle, then commit; dead-letters what cannot be handled.
//! - [`inbox`]: the PostgreSQL inbox: handler writes and "event processed" commit together (exactly-once effect; recommended).
//! - [`idempotency`]: HuleEdu-style Redis two-phase dedup, fail-open or fail-closed when Redis is down.
//! - [`error`]: structured errors ([`Error`], [`ErrorDetail`]) that say whether retrying helps.
//! - `testkit` (feature `testkit`): a private tansu broker to pause or kill, and a collector, for fault-injection tests.
//! - [`metrics`]: metric names and their recording, on the `metrics` facade.

pub mod envelope;
pub mod trace;
#[cfg(feature = "opentelemetry")]
pub mod otel;
pub mod publisher;
pub mod breaker;
pub mod table;
pub mod store;
pub mod wake;
pub mod admin;
pub mod relay;
pub mod poll;
pub mod environment;
pub mod backoff;
pub mod producer;
pub mod consumer;
pub mod inbox;
pub mod idempotency;
pub mod error;
pub mod metrics;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use admin::{OutboxAdmin, OutboxStatus, ParkedEvent};
pub use consumer::{Consumer, ConsumerConfig, Handler, Outcome, Process, Received};
pub use envelope::{Aggregate, EventEnvelope, OutboxEvent};
pub use environment::Environment;
pub use error::{Error, ErrorCode, ErrorDetail, Result};
pub use idempotency::{Idempotency, IdempotencyConfig, Idempotent, RedisDownPolicy};
pub use inbox::{
    Inbox, InboxConfig, InboxHandler, InboxTable, Inboxed, InboxedPublishing, PublishingHandler,
};
pub use producer::{ErrorClass, KafkaProducer, ProducerConfig};
pub use publisher::{Dispatch, Mode, OutboxTx, PublishPath, Publisher, PublisherConfig, Staged};
pub use relay::{BatchReport, Relay, RelayConfig};
pub use store::{OutboxStore, Settlement};
pub use table::OutboxTable;
pub use wake::{wake_key, WakeSignal, WakeSource, Waker};
