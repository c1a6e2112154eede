//! Kafka: the idempotent producer that every path sends with, and topic administration.
//!
//! - `acks`: a librdkafka producer whose delivery reports resolve futures (the producer's
//!   and the consumer's dead-letter sends go through it).
//! - [`producer`]: the idempotent, acks=all producer, rebuilt when fenced.

pub(crate) mod acks;
pub mod producer;
