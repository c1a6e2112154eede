//! `outpost status` and `outpost dead` against a real outbox: a poison event (larger than
//! the producer accepts) is parked by a real relay, then listed, shown, requeued and
//! purged through the binary.
//!
//! Needs PostgreSQL and a Kafka broker; run `make services` first.

mod support;

use std::sync::Arc;
use std::time::Duration;

use outpost::{
    Environment, KafkaProducer, OutboxAdmin, OutboxStore, OutboxTable, ProducerConfig, Relay,
    RelayConfig,
};
use serde_json::{json, Value};
use support::{brokers, eventually, outpost_ok, outpost_std, pool, stage_one, unique};

/// Everything a test needs to drive one service's outbox.
struct Outbox {
    schema: String,
    store: OutboxStore,
    relay: Relay,
    topic: String,
}

async fn outbox() -> Outbox {
    let schema = unique("ops_admin");
    let store = OutboxStore::new(pool().await, OutboxTable::new(&schema).unwrap());
    store.migrate().await.unwrap();
    let topic = unique("ops_admin");
    outpost::kafka::producer::create_topic(&brokers(), &topic, 1, Duration::from_secs(10))
        .await
        .unwrap();
    // Anything above 1000 bytes is refused by librdkafka itself: a permanent failure,
    // parked at once.
    let producer =
        KafkaProducer::new(ProducerConfig::new(brokers()).with("message.max.bytes", "1000"))
            .unwrap();
    let relay = Relay::new(
        store.clone(),
        Arc::new(producer),
        RelayConfig::new(&schema, Environment::Testing),
    )
    .unwrap();
    Outbox {
        schema,
        store,
        relay,
        topic,
    }
}

impl Outbox {
    /// `outpost --schema S --service S args...`, expecting success.
    fn outpost(&self, args: &[&str]) -> String {
        let mut all = vec!["--schema", &self.schema, "--service", &self.schema];
        all.extend_from_slice(args);
        outpost_ok(&all)
    }

    fn status(&self) -> Value {
        let out: Value = serde_json::from_str(&self.outpost(&["status", "--json"])).unwrap();
        let services = out["services"].as_array().expect("services array");
        assert_eq!(services.len(), 1, "{out}");
        assert_eq!(services[0]["service"], self.schema.as_str(), "{out}");
        services[0].clone()
    }

    /// Runs relay iterations until nothing is pending.
    async fn drain(&self) {
        let admin = OutboxAdmin::new(&self.store);
        eventually(
            Duration::from_secs(60),
            || "the relay to settle every pending row".into(),
            || async {
                self.relay.run_once().await.unwrap();
                (admin.status().await.unwrap().pending == 0).then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_pending_dead_and_recently_published() {
    let o = outbox().await;
    let s = o.status();
    assert_eq!(
        (
            s["pending"].as_i64(),
            s["dead"].as_i64(),
            s["published_last_minute"].as_i64()
        ),
        (Some(0), Some(0), Some(0)),
        "{s}"
    );
    stage_one(&o.store, &o.topic, "k1", json!({"n": 1})).await;
    stage_one(
        &o.store,
        &o.topic,
        "k2",
        json!({"poison": "x".repeat(3000)}),
    )
    .await;
    let s = o.status();
    assert_eq!(s["pending"], 2, "{s}");
    assert!(s["oldest_pending_seconds"].as_f64().unwrap() > 0.0, "{s}");

    o.drain().await;
    let s = o.status();
    assert_eq!(s["pending"], 0, "{s}");
    assert_eq!(s["oldest_pending_seconds"], 0.0, "{s}");
    assert_eq!(s["dead"], 1, "{s}");
    assert_eq!(s["published_last_minute"], 1, "{s}");
    let text = o.outpost(&["status"]);
    assert!(
        text.contains("pending 0") && text.contains("dead 1") && text.contains("last minute 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_events_are_listed_shown_requeued_and_purged() {
    let o = outbox().await;
    assert!(o.outpost(&["dead", "list"]).contains("no parked events"));
    let fine = stage_one(&o.store, &o.topic, "k1", json!({"n": 1})).await;
    let poison = stage_one(
        &o.store,
        &o.topic,
        "k2",
        json!({"poison": "x".repeat(3000)}),
    )
    .await;
    o.drain().await;

    let listed: Value = serde_json::from_str(&o.outpost(&["dead", "list", "--json"])).unwrap();
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let row = &listed[0];
    assert_eq!(row["event_id"], poison.event_id.to_string(), "{row}");
    assert_eq!(row["service"], o.schema.as_str(), "{row}");
    assert_eq!(row["topic"], o.topic.as_str(), "{row}");
    assert!(row["attempts"].as_i64().unwrap() >= 1, "{row}");
    assert!(!row["reason"].as_str().unwrap_or("").is_empty(), "{row}");
    let id = row["id"].as_i64().unwrap().to_string();
    let text = o.outpost(&["dead", "list", "--limit", "5"]);
    assert!(
        text.contains(&format!("id={id} ")) && text.contains(&poison.event_id.to_string()),
        "{text}"
    );

    let shown = o.outpost(&["dead", "show", &id]);
    for part in [
        format!("event_id:       {}", poison.event_id),
        "reason:".into(),
        "attempts:".into(),
        format!("  event_id: {}", poison.event_id),
        "  content_type: application/json".into(),
        // Pretty-printed: the envelope's nested data on its own indented line.
        "\n  \"data\": {\n".into(),
    ] {
        assert!(shown.contains(&part), "missing {part:?} in:\n{shown}");
    }
    let shown: Value = serde_json::from_str(&o.outpost(&["dead", "show", &id, "--json"])).unwrap();
    assert_eq!(
        shown["payload"]["event_id"],
        poison.event_id.to_string(),
        "{shown}"
    );
    assert_eq!(
        shown["headers"]["event_type"], "outpost.ops-test.v1",
        "{shown}"
    );

    let missing = outpost_std()
        .args([
            "--schema",
            &o.schema,
            "--service",
            &o.schema,
            "dead",
            "show",
            "999999999",
        ])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no parked event with id 999999999"));

    // Requeued: pending again at its place, and parked again by the next relay pass.
    assert!(o
        .outpost(&["dead", "requeue", &id])
        .contains("requeued 1 event(s)"));
    assert_eq!(o.status()["pending"], 1);
    assert_eq!(o.status()["dead"], 0);
    o.drain().await;
    assert_eq!(o.status()["dead"], 1);

    // Purging spares what is not parked, and what is younger than asked.
    let published_id: i64 = sqlx::query_scalar(&format!(
        "SELECT id FROM {} WHERE event_id = $1",
        o.store.table()
    ))
    .bind(fine.event_id)
    .fetch_one(o.store.pool())
    .await
    .unwrap();
    let published_id = published_id.to_string();
    assert!(o
        .outpost(&["dead", "purge", &published_id])
        .contains("purged 0"));
    assert!(o
        .outpost(&["dead", "purge", "--older-than", "1h"])
        .contains("purged 0"));
    assert_eq!(o.status()["dead"], 1);
    assert!(o.outpost(&["dead", "purge", &id]).contains("purged 1"));
    let s = o.status();
    assert_eq!(
        (s["dead"].as_i64(), s["pending"].as_i64()),
        (Some(0), Some(0)),
        "{s}"
    );

    // --all and --older-than on the next poison.
    stage_one(
        &o.store,
        &o.topic,
        "k3",
        json!({"poison": "y".repeat(3000)}),
    )
    .await;
    o.drain().await;
    assert!(o
        .outpost(&["dead", "requeue", "--all"])
        .contains("requeued 1"));
    o.drain().await;
    eventually(
        Duration::from_secs(30),
        || "the parked row to be older than 1 s".into(),
        || async {
            o.outpost(&["dead", "purge", "--older-than", "1s"])
                .contains("purged 1")
                .then_some(())
        },
    )
    .await;
    assert_eq!(o.status()["dead"], 0);
}

#[test]
fn admin_commands_refuse_what_they_cannot_mean() {
    for (args, mentions) in [
        // An empty id list (a shell variable unset) must not requeue every parked event.
        (vec!["requeue"], "<IDS>"),
        (vec!["dead", "requeue"], "<IDS>"),
        (vec!["dead", "list", "--limit=-1"], "--limit"),
        (
            vec!["dead", "purge", "--older-than", "1000000y"],
            "--older-than",
        ),
    ] {
        let out = outpost_std().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(mentions), "{args:?}: {stderr}");
    }
}
