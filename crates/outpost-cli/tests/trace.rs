//! Trace context through the outbox, end to end: a W3C `traceparent` injected into the
//! envelope's metadata (as HuleEdu does) or taken from the caller's OpenTelemetry span is
//! stored with the row, sent by a real `outpost relay` to Kafka unchanged, and handed to a
//! real consumer's handler.
//!
//! Needs PostgreSQL and a Kafka broker; run `make services` first.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use outpost::event::trace::{TRACEPARENT, TRACESTATE};
use outpost::{
    Aggregate, Consumer, ConsumerConfig, EventEnvelope, OutboxEvent, OutboxStore, OutboxTable,
    Outcome, Process, Received,
};
use serde_json::json;
use support::{brokers, eventually, pool, single_service, unique, Daemon, Scratch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What the handler saw: event id → (traceparent, tracestate, parent span id).
type Seen = Arc<Mutex<BTreeMap<Uuid, (Option<String>, Option<String>, SpanId)>>>;

struct Recording(Seen);

impl Process for Recording {
    async fn process(&self, received: &Received) -> outpost::Result<Outcome> {
        let parent = received.trace_context().span().span_context().span_id();
        self.0.lock().unwrap().insert(
            received.event_id,
            (
                received.traceparent().map(str::to_owned),
                received.tracestate().map(str::to_owned),
                parent,
            ),
        );
        Ok(Outcome::Handled)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_reaches_kafka_and_the_handler_unchanged() {
    const FROM_METADATA: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let service = unique("ops_trace");
    let topic = unique("ops_trace");
    outpost::kafka::producer::create_topic(&brokers(), &topic, 1, Duration::from_secs(10))
        .await
        .unwrap();
    let store = OutboxStore::new(pool().await, OutboxTable::new(&service).unwrap());
    store.migrate().await.unwrap();

    // HuleEdu: inject_trace_context(envelope.metadata).
    let injected = EventEnvelope::new("huleedu.test.v1", "els", json!({"n": 1}))
        .with_metadata(TRACEPARENT, json!(FROM_METADATA))
        .with_metadata(TRACESTATE, json!("rojo=00f067aa0ba902b7"));
    let injected =
        OutboxEvent::from_envelope(&injected, &topic, Aggregate::new("essay", "e1")).unwrap();
    // A Rust caller inside an OpenTelemetry span.
    let span = SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    );
    let cx = Context::new().with_remote_span_context(span.clone());
    let from_span = OutboxEvent::from_envelope(
        &EventEnvelope::new("huleedu.test.v1", "els", json!({"n": 2})),
        &topic,
        Aggregate::new("essay", "e2"),
    )
    .unwrap()
    .with_trace_context(&cx);
    let untraced = OutboxEvent::from_envelope(
        &EventEnvelope::new("huleedu.test.v1", "els", json!({"n": 3})),
        &topic,
        Aggregate::new("essay", "e3"),
    )
    .unwrap();
    let mut tx = store.pool().begin().await.unwrap();
    for ev in [&injected, &from_span, &untraced] {
        store.stage(&mut tx, ev).await.unwrap().unwrap();
    }
    tx.commit().await.unwrap();
    let stored: Vec<(Uuid, sqlx::types::Json<BTreeMap<String, String>>)> =
        sqlx::query_as(&format!(
            "SELECT e.event_id, p.headers FROM {} e JOIN {} p ON p.id = e.id",
            store.table(),
            store.table().payloads()
        ))
        .fetch_all(store.pool())
        .await
        .unwrap();
    let stored: BTreeMap<Uuid, BTreeMap<String, String>> =
        stored.into_iter().map(|(id, h)| (id, h.0)).collect();
    assert_eq!(stored[&injected.event_id][TRACEPARENT], FROM_METADATA);
    assert_eq!(
        stored[&injected.event_id][TRACESTATE],
        "rojo=00f067aa0ba902b7"
    );
    assert_eq!(
        stored[&from_span.event_id][TRACEPARENT],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert!(!stored[&untraced.event_id].contains_key(TRACEPARENT));

    let scratch = Scratch::new();
    let mut args = single_service(&service);
    args.extend(["--wake", "none"]);
    let relay = Daemon::spawn(&args, &[], &scratch.0.join("relay.log"));
    let seen: Seen = Arc::default();
    let config = ConsumerConfig::new(brokers(), unique("trace"), [&topic], unique("trace_dlq"))
        .with("auto.offset.reset", "earliest");
    let consumer = Consumer::new(config, Recording(Arc::clone(&seen))).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone().cancelled_owned()));
    let seen = eventually(
        Duration::from_secs(90),
        || {
            format!(
                "the handler to see all three events; relay log:\n{}",
                relay.log()
            )
        },
        || {
            let seen = seen.lock().unwrap().clone();
            async move { (seen.len() == 3).then_some(seen) }
        },
    )
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert!(relay.terminate().await.success());

    let (parent, state, span_id) = &seen[&injected.event_id];
    assert_eq!(parent.as_deref(), Some(FROM_METADATA));
    assert_eq!(state.as_deref(), Some("rojo=00f067aa0ba902b7"));
    assert_eq!(*span_id, SpanId::from_hex("b7ad6b7169203331").unwrap());
    let (parent, state, span_id) = &seen[&from_span.event_id];
    assert_eq!(
        parent.as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(*state, None);
    assert_eq!(*span_id, span.span_id());
    let (parent, _, span_id) = &seen[&untraced.event_id];
    assert_eq!((parent.as_deref(), *span_id), (None, SpanId::INVALID));
}
