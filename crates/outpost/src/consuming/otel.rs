//! OpenTelemetry glue (feature `opentelemetry`): a consumed message's `traceparent` and
//! `tracestate` headers become a remote parent [`Context`] for the handler's span.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;

use crate::consuming::consumer::Received;
use crate::event::trace::TraceParent;

impl Received {
    /// A context whose remote parent is the publishing span, for the handler's span; an
    /// empty context when the message carries no valid `traceparent`.
    pub fn trace_context(&self) -> Context {
        let Some(parent) = self
            .traceparent()
            .and_then(|p| p.parse::<TraceParent>().ok())
        else {
            return Context::new();
        };
        let state = self
            .tracestate()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(parent.trace_id.to_be_bytes()),
            SpanId::from_bytes(parent.span_id.to_be_bytes()),
            TraceFlags::new(parent.flags),
            true,
            state,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::envelope::OutboxEvent;
    use crate::event::envelope::{Aggregate, EventEnvelope};
    use crate::event::trace::{TRACEPARENT, TRACESTATE};
    use serde_json::json;

    fn event() -> OutboxEvent {
        let env = EventEnvelope::new("t.v1", "els", json!({}));
        OutboxEvent::from_envelope(&env, "topic", Aggregate::new("essay", "e1")).unwrap()
    }

    #[test]
    fn span_context_survives_the_round_trip() {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            "congo=t61rcWkgMzE".parse().unwrap(),
        );
        let cx = Context::new().with_remote_span_context(sc.clone());
        let ev = event().with_trace_context(&cx);
        assert_eq!(
            ev.headers[TRACEPARENT],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(ev.headers[TRACESTATE], "congo=t61rcWkgMzE");
        let received = Received {
            group_id: "g".into(),
            topic: "topic".into(),
            partition: 0,
            offset: 0,
            key: None,
            headers: ev.headers,
            payload: ev.payload,
            event_id: ev.event_id,
        };
        let back = received.trace_context();
        let back = back.span().span_context().clone();
        assert_eq!(back.trace_id(), sc.trace_id());
        assert_eq!(back.span_id(), sc.span_id());
        assert!(back.is_sampled() && back.is_remote());
        assert_eq!(back.trace_state().header(), "congo=t61rcWkgMzE");
    }

    #[test]
    fn no_span_no_headers_and_metadata_wins() {
        assert!(!event()
            .with_trace_context(&Context::new())
            .headers
            .contains_key(TRACEPARENT));
        let given = "00-11111111111111111111111111111111-2222222222222222-00";
        let env =
            EventEnvelope::new("t.v1", "els", json!({})).with_metadata(TRACEPARENT, json!(given));
        let ev = OutboxEvent::from_envelope(&env, "topic", Aggregate::new("essay", "e1"))
            .unwrap()
            .with_trace_context(&Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
                SpanId::from_hex("00f067aa0ba902b7").unwrap(),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            )));
        assert_eq!(ev.headers[TRACEPARENT], given);
    }
}
