//! Outpost: reliable, instant event publishing for Rust services on PostgreSQL and Kafka.
//!
//! ```text
//!  service                                        relay (any number of replicas)
//!  ┌─────────────────────────────┐  commit  ┌──────────────────────────────────────────┐
//!  │ publisher.begin()           │────────▶ │ claim free keys (SKIP LOCKED + lease)    │
//!  │ UPDATE your tables          │          │ send: many rows per key in flight, in    │
//!  │ tx.publish(event): key lock,│          │   id order; idempotent, acks=all, gapless│
//!  │   key row, event row        │          │ settle acks as they arrive (batched);    │
//!  │ tx.commit()                 │          │   a failed row backs its key off; dead   │
//!  └──────┬──────────────┬───────┘          │   rows parked with the reason            │
//!         │ eager: claim │ else: wake       └────────────────────┬─────────────────────┘
//!         │ keys, send,  │ (Redis/NOTIFY,                        │
//!         │ settle       │  relay also polls)                    │
//!         ▼              └──────────────────▶ relay              ▼
//!       Kafka ◀──────────────────────────────────────────────── Kafka
//!         │
//!         ▼ consumer: event_id (header first) → inbox dedup → handler → offset
//! ```
//!
//! WAL mode, the alternative to the outbox table:
//!
//! ```text
//!  service tx: UPDATE ...; wal::emit(event) ─commit─▶ WAL ─slot, pgoutput v1─▶ WalRelay
//!  (pg_logical_emit_message, transactional)   committed txns only, in commit   │ leader
//!                                             order → per-key order for free   ▼ lock
//!                   slot confirmed ◀── end LSN of txns whose events all acked ── Kafka
//! ```
//!
//! Guarantees: at-least-once delivery; a duplicate carries the same `event_id` and the
//! same bytes; events of one key reach Kafka in the commit order of their transactions,
//! across concurrent writers, retries, relay replicas and the eager path; a key has one
//! owner at a time; a row is `published` only after the broker acknowledged it; with the
//! inbox, a consumer's effect happens once.
//!
//! Modules, in pipeline order (each depends only on those above it, and on the
//! foundations at the end):
//! - [`event`]: the HuleEdu-compatible [`EventEnvelope`], serialized once into an
//!   [`OutboxEvent`]; W3C trace context in its headers.
//! - [`outbox`]: the store: a service's events, payloads and keys tables and all SQL against them
//!   (stage in the caller's transaction, lease keys, settle, retention, operator views).
//! - [`kafka`]: the idempotent producer every path sends with; topic administration.
//! - [`relay`]: the streaming engine (claiming, sending, settling, verdicts), adaptive
//!   polling and wake-ups (Redis `LPUSH`/`BLPOP`, PostgreSQL `NOTIFY`).
//! - [`wal`]: WAL mode: events emitted into PostgreSQL's WAL in the caller's transaction
//!   (`pg_logical_emit_message`), a leader-elected relay reading them from a logical
//!   replication slot in commit order, acknowledging the slot only behind the broker.
//! - [`publishing`]: the API services call (transactional with eager dispatch, Kafka-first,
//!   outbox-only) and its circuit breaker.
//! - [`consuming`]: the consumer helper (dedup, handle, commit, dead letters), the
//!   PostgreSQL inbox and Redis two-phase dedup.
//! - Foundations: [`error`] (structured errors and the class of every Kafka failure),
//!   [`metrics`] (names and recording on the `metrics` facade), [`environment`]
//!   (per-environment defaults), [`backoff`] (retry delays with jitter), and `testkit`
//!   (feature `testkit`: a private tansu broker to pause or kill, and a collector).

pub mod event;
pub mod outbox;
pub mod kafka;
pub mod relay;
pub mod wal;
pub mod publishing;
pub mod consuming;
pub mod error;
pub mod metrics;
pub mod environment;
pub mod backoff;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use consuming::consumer::{Consumer, ConsumerConfig, Handler, Outcome, Process, Received};
pub use consuming::idempotency::{Idempotency, IdempotencyConfig, Idempotent, RedisDownPolicy};
pub use consuming::inbox::{
    Inbox, InboxConfig, InboxHandler, InboxTable, Inboxed, InboxedPublishing, PublishingHandler,
};
pub use environment::Environment;
pub use error::{Error, ErrorClass, ErrorCode, ErrorDetail, Result};
pub use event::envelope::{Aggregate, EventEnvelope, OutboxEvent};
pub use kafka::producer::{KafkaProducer, ProducerConfig};
pub use outbox::admin::{OutboxAdmin, OutboxStatus, ParkedEvent};
pub use outbox::store::{OutboxStore, Settlement};
pub use outbox::table::OutboxTable;
pub use publishing::publisher::{
    Dispatch, Mode, OutboxTx, PublishPath, Publisher, PublisherConfig, Staged,
};
pub use relay::wake::{wake_key, WakeSignal, WakeSource, Waker};
pub use relay::{BatchReport, Relay, RelayConfig};
pub use wal::{WalRelay, WalRelayConfig, WalStream};
