//! Staging from SQL alone (`outpost migrate` installs `"schema".stage(...)`), as a Python or
//! Go service would: the relay delivers what such a transaction commits, byte for byte and
//! in order per key; a rollback stages nothing; bad headers are refused with a clear error.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use outpost::Relay;
use uuid::Uuid;

use support::spawn;

#[tokio::test]
async fn events_staged_by_the_sql_function_are_delivered_in_order_and_rollbacks_are_not() {
    let brokers = support::brokers();
    let store = support::store().await;
    let pool = store.pool().clone();
    let topic = support::topic(2).await;
    let collector = support::Collector::start(&brokers, &topic, 2);
    let stage = store.table().stage_function();
    let call = format!("SELECT {stage}($1, $2, $3, $4::jsonb, event_type => 'essay.v1')");

    let mut tx = pool.begin().await.unwrap();
    let ghost: Option<i64> = sqlx::query_scalar(&call)
        .bind(&topic)
        .bind("k0")
        .bind(b"rolled back".to_vec())
        .bind("{}")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert!(ghost.is_some());
    tx.rollback().await.unwrap();

    // Two writers interleave their transactions over three keys; nothing locks for them.
    let mut expected: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut writers = Vec::new();
    for w in 0..2 {
        let (pool, call, topic) = (pool.clone(), call.clone(), topic.clone());
        writers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..30 {
                let key = format!("k{}", i % 3);
                let payload = format!("{{\"writer\":{w},\"i\":{i}}}").into_bytes();
                let mut tx = pool.begin().await.unwrap();
                let id: Option<i64> = sqlx::query_scalar(&call)
                    .bind(&topic)
                    .bind(&key)
                    .bind(&payload)
                    .bind(format!("{{\"writer\": \"{w}\"}}"))
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                mine.push((id.unwrap(), key, payload));
            }
            mine
        }));
    }
    let mut staged = Vec::new();
    for w in writers {
        staged.extend(w.await.unwrap());
    }
    // Commit order per key is row id order (the key's lock is held to commit).
    staged.sort_by_key(|(id, _, _)| *id);
    for (_, key, payload) in &staged {
        expected
            .entry(key.clone())
            .or_default()
            .push(payload.clone());
    }

    let relay = Relay::new(
        store.clone(),
        support::producer(&brokers),
        support::relay_config(&support::unique("sql")),
    )
    .unwrap();
    let running = spawn(relay);
    let consumed = support::eventually(Duration::from_secs(60), "60 events delivered", || {
        let seen = collector.snapshot();
        async move { (seen.len() >= 60).then_some(seen) }
    })
    .await;
    running.stop().await;
    let consumed = support::settled(&collector, consumed.len(), Duration::from_secs(1)).await;

    assert_eq!(
        consumed.len(),
        60,
        "each committed event once, the rolled-back one never"
    );
    let mut delivered: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for c in &consumed {
        assert_eq!(c.headers["event_type"], "essay.v1");
        assert!(c.headers.contains_key("writer"), "{:?}", c.headers);
        assert_eq!(c.headers["event_id"], c.event_id.to_string());
        delivered
            .entry(c.key.clone())
            .or_default()
            .push(c.payload.clone());
    }
    assert_eq!(delivered, expected, "bytes and per-key order as committed");
}

#[tokio::test]
async fn the_sql_function_refuses_bad_headers_and_is_idempotent_on_event_id() {
    let store = support::store().await;
    let pool = store.pool();
    let stage = store.table().stage_function();

    let err = sqlx::query(&format!("SELECT {stage}('t', 'k', 'x', '{{\"n\": 1}}')"))
        .execute(pool)
        .await
        .unwrap_err();
    let db = err.as_database_error().expect("a database error");
    assert_eq!(db.code().as_deref(), Some("22023"));
    assert!(
        db.message()
            .contains("headers must be a JSON object of strings"),
        "{}",
        db.message()
    );

    let id = Uuid::new_v4();
    let call = format!("SELECT {stage}('t', 'k', 'x', event_id => $1)");
    let first: Option<i64> = sqlx::query_scalar(&call)
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    let again: Option<i64> = sqlx::query_scalar(&call)
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(first.is_some());
    assert_eq!(again, None, "staged once");
    assert_eq!(support::count_status(&store, "pending").await, 1);
}

#[tokio::test]
async fn a_second_transaction_staging_the_same_key_waits_for_the_first_to_end() {
    let store = support::store().await;
    let pool = store.pool().clone();
    let stage = store.table().stage_function();
    let key = support::unique("key");
    let call = format!("SELECT {stage}('t', $1, 'x')");

    let mut first = pool.begin().await.unwrap();
    let first_id = stage_key(&mut first, &call, &key).await;
    let (pool2, call2, key2) = (pool.clone(), call.clone(), key.clone());
    let second = tokio::spawn(async move {
        let mut tx = pool2.begin().await.unwrap();
        let id = stage_key(&mut tx, &call2, &key2).await;
        tx.commit().await.unwrap();
        id
    });
    // The key's lock is what orders commits per key: the second caller waits on it.
    support::eventually(
        Duration::from_secs(30),
        "the second stage waits on the key lock",
        || {
            let (pool, stage) = (pool.clone(), stage.clone());
            async move {
                let waiting: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
                     WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' \
                       AND position($1 in query) > 0)",
                )
                .bind(stage)
                .fetch_one(&pool)
                .await
                .unwrap();
                waiting.then_some(())
            }
        },
    )
    .await;
    assert!(!second.is_finished());
    first.commit().await.unwrap();
    let second_id = second.await.unwrap();
    assert!(second_id > first_id, "{second_id:?} after {first_id:?}");
}

/// Runs `call` (a stage with the key as `$1`) in `tx`; the staged row's id.
async fn stage_key(tx: &mut sqlx::PgConnection, call: &str, key: &str) -> Option<i64> {
    sqlx::query_scalar(call)
        .bind(key)
        .fetch_one(tx)
        .await
        .unwrap()
}
