//! W3C trace context carried through the outbox: a `traceparent` (and its `tracestate`)
//! becomes a stored header, is sent to Kafka byte for byte on every attempt, and is handed
//! to consumers ([`crate::Received::traceparent`]). It comes from the envelope's metadata,
//! where HuleEdu's `inject_trace_context` puts it, or, with the `opentelemetry` feature,
//! from the caller's span (`OutboxEvent::with_current_trace_context`).

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// Header (and metadata key) holding the W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// Header (and metadata key) holding the W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";

/// Longest `tracestate` carried (the W3C limit is 32 members of at most 256 bytes; 512
/// bytes is what the specification asks propagators to keep at least).
const MAX_TRACESTATE: usize = 512;

/// A version-00 `traceparent`: `00-{trace id}-{parent span id}-{flags}` in lowercase hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16-byte trace id, never all zeros.
    pub trace_id: u128,
    /// 8-byte id of the span that published, never all zeros.
    pub span_id: u64,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

/// `part` when it is exactly `len` lowercase hex digits.
fn hex(part: &str, len: usize) -> Option<&str> {
    (part.len() == len && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then_some(part)
}

impl FromStr for TraceParent {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            Error::config(
                TRACEPARENT,
                "00-<32 hex trace id>-<16 hex span id>-<2 hex flags>, ids not all zero",
                s,
            )
        };
        let mut parts = s.split('-');
        let (Some(version), Some(trace), Some(span), Some(flags), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        hex(version, 2).filter(|v| *v == "00").ok_or_else(bad)?;
        let trace_id = hex(trace, 32)
            .and_then(|t| u128::from_str_radix(t, 16).ok())
            .filter(|&t| t != 0)
            .ok_or_else(bad)?;
        let span_id = hex(span, 16)
            .and_then(|p| u64::from_str_radix(p, 16).ok())
            .filter(|&p| p != 0)
            .ok_or_else(bad)?;
        let flags = hex(flags, 2)
            .and_then(|f| u8::from_str_radix(f, 16).ok())
            .ok_or_else(bad)?;
        Ok(Self {
            trace_id,
            span_id,
            flags,
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// The trace headers an envelope's metadata carries: `traceparent` when it is valid (kept
/// exactly as given), with `tracestate` when present and not oversized.
pub(crate) fn from_metadata(
    metadata: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Vec<(String, String)> {
    let Some(metadata) = metadata else {
        return Vec::new();
    };
    let text = |key: &str| metadata.get(key).and_then(serde_json::Value::as_str);
    let Some(parent) = text(TRACEPARENT).filter(|p| p.parse::<TraceParent>().is_ok()) else {
        return Vec::new();
    };
    let mut headers = vec![(TRACEPARENT.to_owned(), parent.to_owned())];
    if let Some(state) = text(TRACESTATE).filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE) {
        headers.push((TRACESTATE.to_owned(), state.to_owned()));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_prints_the_w3c_example() {
        let tp: TraceParent = SAMPLE.parse().unwrap();
        assert_eq!(tp.trace_id, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        assert_eq!(tp.span_id, 0x00f0_67aa_0ba9_02b7);
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.to_string(), SAMPLE);
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn metadata_yields_headers_only_for_a_valid_traceparent() {
        let with = |v: serde_json::Value| from_metadata(v.as_object());
        assert_eq!(
            with(json!({"traceparent": SAMPLE, "tracestate": "congo=t61rcWkgMzE"})),
            [
                (TRACEPARENT.to_owned(), SAMPLE.to_owned()),
                (TRACESTATE.to_owned(), "congo=t61rcWkgMzE".to_owned())
            ]
        );
        assert!(with(json!({"traceparent": "nonsense", "tracestate": "a=b"})).is_empty());
        assert!(with(json!({"partition_key": "k"})).is_empty());
        assert!(from_metadata(None).is_empty());
    }
}
