//! `outpost load` and `outpost verify` through the binary, against PostgreSQL and the
//! broker: a clean run verifies clean, and verify catches a missing event, a duplicate and
//! an event of a key delivered after a later one.
//!
//! Needs PostgreSQL and a Kafka broker; run `make services` first.

mod support;

use std::time::Duration;

use std::sync::Arc;

use outpost::{
    Environment, KafkaProducer, OutboxStore, OutboxTable, ProducerConfig, Relay, RelayConfig,
};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use support::{brokers, outpost_ok, pool, unique};
use uuid::Uuid;

/// `outpost --schema S --service S args...` as JSON.
fn outpost_json(schema: &str, args: &[&str]) -> Value {
    let mut all = vec!["--schema", schema, "--service", schema];
    all.extend_from_slice(args);
    let out = outpost_ok(&all);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Produces a message carrying `event_id` in its header, as a stray copy would.
async fn produce_copy(topic: &str, key: &str, event_id: Uuid) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let id = event_id.to_string();
    producer
        .send(
            FutureRecord::to(topic)
                .key(key)
                .payload("{}")
                .headers(OwnedHeaders::new().insert(Header {
                    key: "event_id",
                    value: Some(&id),
                })),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_then_verify_counts_what_arrived_and_catches_what_is_wrong() {
    let schema = unique("load");
    let load = outpost_json(
        &schema,
        &[
            "load",
            "--mode",
            "transactional",
            "--rate",
            "300",
            "--duration",
            "3s",
            "--keys",
            "3",
        ],
    );
    let committed = load["committed"].as_u64().unwrap();
    // The first publish waits for the new topic and the producer id; then many follow.
    assert!(committed > 10, "{load}");
    assert_eq!(load["failed"], 0, "{load}");
    let ledger = load["ledger"].as_str().unwrap().to_owned();
    let topic = load["topic"].as_str().unwrap().to_owned();
    // Events that fell back to the outbox are the relay's (none runs during the load).
    let store = OutboxStore::new(pool().await, OutboxTable::new(&schema).unwrap());
    let relay = Relay::new(
        store.clone(),
        Arc::new(KafkaProducer::new(ProducerConfig::new(brokers())).unwrap()),
        RelayConfig::new(&schema, Environment::Testing),
    )
    .unwrap();
    while relay.run_once().await.unwrap().claimed > 0 {}

    let clean = outpost_json(&schema, &["verify", "--ledger", &ledger, "--wait", "20s"]);
    assert_eq!(clean["committed"], committed, "{clean}");
    assert_eq!(clean["delivered"], committed, "{clean}");
    assert_eq!(
        (
            &clean["missing"],
            &clean["duplicates"],
            &clean["order_violations"]
        ),
        (&Value::from(0), &Value::from(0), &Value::from(0)),
        "{clean}"
    );

    // What verify must catch: a committed event that never arrived, a second copy of a
    // delivered one, and an event of k0 committed before all others (seq -1) that arrives
    // after them.
    let pool = pool().await;
    let record = format!(
        "INSERT INTO \"{schema}\".outpost_load_ledger (event_id, topic, event_key, seq) \
         VALUES ($1, $2, $3, $4)"
    );
    let never_sent = Uuid::new_v4();
    let late = Uuid::new_v4();
    for (id, seq) in [(never_sent, 1_000_000), (late, -1)] {
        sqlx::query(&record)
            .bind(id)
            .bind(&topic)
            .bind("k0")
            .bind(seq)
            .execute(&pool)
            .await
            .unwrap();
    }
    let delivered: Uuid = sqlx::query_scalar(&format!(
        "SELECT event_id FROM \"{schema}\".outpost_load_ledger WHERE seq = 0"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    produce_copy(&topic, "k0", delivered).await;
    produce_copy(&topic, "k0", late).await;

    // The verdict is printed, and the exit code says it does not hold (a gate for scripts).
    let out = support::outpost_std()
        .args(["--schema", &schema, "--service", &schema])
        .args(["verify", "--ledger", &ledger, "--wait", "5s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("1 committed events neither delivered nor parked, 1 out of key order"),
        "{stderr}"
    );
    let caught: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(caught["committed"], committed + 2, "{caught}");
    assert_eq!(caught["delivered"], committed + 1, "{caught}");
    assert_eq!(caught["missing"], 1, "{caught}");
    assert_eq!(
        caught["missing_sample"][0],
        never_sent.to_string(),
        "{caught}"
    );
    assert_eq!(caught["duplicates"], 1, "{caught}");
    assert_eq!(caught["order_violations"], 1, "{caught}");
    assert_eq!(caught["lost"], 1, "{caught}");

    // In WAL mode a parked event is a row of the stream's dead-letter table (its event id
    // is all verify reads of it): the missing event, parked there, is not lost.
    sqlx::query(&format!(
        "CREATE TABLE \"{schema}\".wal_dead_letters (event_id uuid)"
    ))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "INSERT INTO \"{schema}\".wal_dead_letters VALUES ($1)"
    ))
    .bind(never_sent)
    .execute(&pool)
    .await
    .unwrap();
    let out = support::outpost_std()
        .args(["--schema", &schema, "--service", &schema])
        .args(["verify", "--ledger", &ledger, "--wait", "5s"])
        .output()
        .unwrap();
    let parked: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&parked["parked"], &parked["lost"]),
        (&Value::from(1), &Value::from(0)),
        "{parked}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "still out of key order: {parked}"
    );
}

#[test]
fn a_malformed_ledger_name_is_refused_in_one_line() {
    let out = support::outpost_std()
        .args(["verify", "--ledger", "no-dots; DROP TABLE x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid --ledger") && stderr.trim().lines().count() == 1,
        "{stderr}"
    );
}
