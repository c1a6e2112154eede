//! Consuming: the consumer helper (event id header-first, dedup, handle, commit, dead
//! letters) and its two dedup stores, the PostgreSQL inbox and Redis two-phase marks.

pub mod consumer;
pub mod idempotency;
pub mod inbox;
mod partitions;
#[cfg(feature = "opentelemetry")]
pub mod otel;
