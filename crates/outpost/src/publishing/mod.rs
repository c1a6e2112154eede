//! Publishing: the API services call (transactional with eager dispatch, Kafka-first,
//! outbox-only) and the circuit breaker that lets it skip a Kafka known to be down.

pub mod breaker;
mod detached;
mod leased;
pub mod publisher;
mod turns;
