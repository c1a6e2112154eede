//! The HuleEdu batch pipeline rebuilt on Outpost: four services that share nothing but
//! Kafka, each with its own PostgreSQL schema, outbox, relay, inbox and consumer group.
//!
//! ```text
//!  BOS ──registered─────────▶ ELS ◀──provisioned / validation failed── File Service
//!  BOS ◀──ready────────────── ELS
//!  BOS ──spellcheck initiate─▶ ELS ──requested──▶ Spellchecker
//!  BOS ◀──phase outcome────── ELS ◀──completed─── Spellchecker
//! ```
//!
//! State changes and the events they cause commit together (Outpost's transactional mode,
//! produced right after commit); consumers handle each event behind an inbox, in the same
//! transaction as their writes, so a redelivered event changes nothing. The File Service,
//! which has no business state, publishes Kafka-first, as HuleEdu's did.
//!
//! Modules, in pipeline order:
//! - [`events`]: the event contract: topics, payloads, envelopes.
//! - [`corpus`]: the generated essays a run uploads.
//! - [`content`]: the Content Service stand-in (texts by storage id).
//! - [`spelling`]: the dictionary spell checker.
//! - [`bos`]: the Batch Orchestrator Service.
//! - [`file_service`]: the File Service and its validation.
//! - [`els`]: the Essay Lifecycle Service: slots, essay states, phase aggregation.
//! - [`spellchecker`]: the Spellchecker service.
//! - [`observer`]: the consumers of the notification topics (Result Aggregator and UI stand-in).
//! - [`pipeline`]: all of them wired together: schemas, outboxes, relays, consumers.
//! - [`run`]: one batch through the pipeline: the client's side, progress, the report.
//! - [`timeline`]: what was consumed when: per-hop latency, duplicates.
//! - [`counters`]: Outpost's path counters (eager misses, fallbacks) read back in process.
//! - [`contract`]: HuleEdu's wire contract (JSON Schemas), checked on what a run put on Kafka.
//! - [`error`]: the pipeline's errors.

pub mod events;
pub mod corpus;
pub mod content;
pub mod spelling;
pub mod bos;
pub mod file_service;
pub mod els;
pub mod spellchecker;
pub mod observer;
pub mod pipeline;
pub mod run;
pub mod timeline;
pub mod counters;
pub mod contract;
pub mod error;

pub use error::{Error, Result};
pub use pipeline::{Pipeline, PipelineConfig, RunMode};
pub use run::{Expected, Outage, RunReport};
pub use timeline::Timeline;
