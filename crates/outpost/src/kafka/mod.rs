//! Kafka: the idempotent producer that every path sends with, and topic administration.

pub mod producer;
