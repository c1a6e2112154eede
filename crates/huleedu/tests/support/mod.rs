//! What the handler tests share: a service's outbox in a schema of its own.
// Each test binary uses a part of it.
#![allow(dead_code)]

use std::str::FromStr;
use std::sync::Arc;

use outpost::{
    Environment, EventEnvelope, KafkaProducer, Mode, OutboxStore, OutboxTable, ProducerConfig,
    Publisher, PublisherConfig, Received, WakeSignal, Waker,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

/// A publisher for `service` over a fresh schema (named `{prefix}_…`, the pool's
/// `search_path`, so the service's tables land there too), publishing to the outbox only:
/// the tests read the outbox.
pub async fn outbox_only(prefix: &str, service: &str, max_connections: u32) -> Publisher {
    let url = std::env::var("OUTPOST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let admin = PgPoolOptions::new().connect(&url).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
        .execute(&admin)
        .await
        .unwrap();
    let options = PgConnectOptions::from_str(&url)
        .unwrap()
        .options([("search_path", schema.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .connect_with(options)
        .await
        .unwrap();
    let store = OutboxStore::new(pool, OutboxTable::new(&schema).unwrap());
    store.migrate().await.unwrap();
    // Never reached: the outbox-only mode stages and wakes, it does not produce.
    let producer = Arc::new(KafkaProducer::new(ProducerConfig::new("127.0.0.1:1")).unwrap());
    let mut config = PublisherConfig::new(service, Environment::Testing);
    config.mode = Mode::OutboxOnly;
    Publisher::new(store, producer, Waker::Local(WakeSignal::new()), config).unwrap()
}

/// An envelope of `data` as the consumer would hand it over, with its `Received`.
pub fn delivered<T: serde::Serialize>(
    base: &str,
    data: &T,
) -> (EventEnvelope<serde_json::Value>, Received) {
    let envelope = EventEnvelope::new(base, "test", serde_json::to_value(data).unwrap());
    let received = Received {
        group_id: "handler-test".into(),
        topic: base.into(),
        partition: 0,
        offset: 0,
        key: None,
        headers: Default::default(),
        payload: Vec::new(),
        event_id: envelope.event_id,
    };
    (envelope, received)
}
