//! OpenTelemetry glue (feature `opentelemetry`): the publishing span's context goes into
//! an event's `traceparent`/`tracestate` headers (a consumer turns them back into a remote
//! parent, in `consuming::otel`).

use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;

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
