//! OpenTelemetry glue (feature `opentelemetry`): the publishing span's context goes into
//! an event's `traceparent`/`tracestate` headers, and a consumer turns them back into a
//! remote parent [`Context`] for its handler span.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;

use crate::consuming::consumer::Received;
use crate::event::envelope::OutboxEvent;
use crate::event::trace::{TraceParent, TRACEPARENT, TRACESTATE};

impl OutboxEvent {
    /// Carries `cx`'s span as the event's trace headers. A `traceparent` the envelope's
    /// metadata already supplied wins (it was injected on purpose); a context without a
    /// valid span changes nothing.
    #[must_use]
    pub fn with_trace_context(self, cx: &Context) -> Self {
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() || self.headers.contains_key(TRACEPARENT) {
            return self;
        }
        let parent = TraceParent {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            flags: sc.trace_flags().to_u8(),
        };
        let state = sc.trace_state().header();
        let event = self.with_header(TRACEPARENT, parent.to_string());
        if state.is_empty() {
            event
        } else {
            event.with_header(TRACESTATE, state)
        }
    }

    /// [`with_trace_context`](Self::with_trace_context) with the caller's current context.
    #[must_use]
    pub fn with_current_trace_context(self) -> Self {
        self.with_trace_context(&Context::current())
    }
}

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
    use crate::event::envelope::{Aggregate, EventEnvelope};
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
