//! The event: HuleEdu's envelope, serialized once into the bytes and headers that are
//! stored and sent, with its trace context.

pub mod envelope;
#[cfg(feature = "opentelemetry")]
pub mod otel;
pub mod trace;
