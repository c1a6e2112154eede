//! Per-key order is commit order: concurrent writers that lock nothing of their own, the
//! eager path and three relays, against real PostgreSQL and tansu.
//!
//! Commit order is observed, not assumed: a watcher polls the outbox on its own
//! connection and records in which poll each row first became visible. A row visible in
//! an earlier poll than another committed before it; rows that first showed up in the
//! same poll are not compared.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outpost::outbox::store::KeyLock;
use outpost::{OutboxStore, Publisher, PublisherConfig, Relay, WakeSignal, Waker};
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const WRITERS: usize = 8;
const KEYS: usize = 4;
const PER_WRITER: usize = 150;

/// Polls the outbox until `stop`; returns each row's first poll number.
async fn watch(store: OutboxStore, stop: Arc<AtomicBool>) -> HashMap<Uuid, u64> {
    let mut seen = HashMap::new();
    let sql = format!("SELECT event_id FROM {}", store.table());
    let mut poll = 0u64;
    let mut conn = store.pool().acquire().await.unwrap();
    while !stop.load(Ordering::SeqCst) {
        poll += 1;
        let ids: Vec<Uuid> = sqlx::query_scalar(&sql)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        for id in ids {
            seen.entry(id).or_insert(poll);
        }
    }
    let ids: Vec<Uuid> = sqlx::query_scalar(&sql)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    for id in ids {
        seen.entry(id).or_insert(poll + 1);
    }
    seen
}

/// Pairs of one key delivered in the opposite order of their commits.
fn inversions(
    consumed: &[support::Consumed],
    committed_in_poll: &HashMap<Uuid, u64>,
) -> Vec<(Uuid, Uuid)> {
    let mut by_key: HashMap<&str, Vec<Uuid>> = HashMap::new();
    let mut first = HashSet::new();
    for c in consumed {
        if first.insert(c.event_id) {
            by_key.entry(&c.key).or_default().push(c.event_id);
        }
    }
    let mut found = Vec::new();
    for order in by_key.values() {
        for (i, earlier) in order.iter().enumerate() {
            for later in &order[i + 1..] {
                if committed_in_poll[earlier] > committed_in_poll[later] {
                    found.push((*earlier, *later));
                }
            }
        }
    }
    found
}

async fn run(lock: KeyLock) -> (usize, usize, Vec<(Uuid, Uuid)>, usize) {
    let brokers = support::brokers();
    let store = support::store().await;
    let topic = support::topic(4).await;
    let collector = support::Collector::start(&brokers, &topic, 4);
    let service = support::unique("order");
    let signal = WakeSignal::new();
    let mut relays = Vec::new();
    for _ in 0..3 {
        // No fault is injected and every message is counted: slow produce requests are
        // waited for (see `patient_producer`).
        let mut cfg = support::patient_relay_config(&service);
        cfg.batch_size = 3;
        let relay = Relay::new(store.clone(), support::patient_producer(&brokers), cfg)
            .unwrap()
            .with_wake_signal(signal.clone());
        relays.push(support::spawn(relay));
    }
    let mut config = PublisherConfig::new(&service, outpost::Environment::Testing);
    config.delivery = support::patient_relay_config(&service);
    config.key_lock = lock;
    let publisher = Publisher::new(
        store.clone(),
        support::patient_producer(&brokers),
        Waker::Local(signal.clone()),
        config,
    )
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch(store.clone(), Arc::clone(&stop)));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let publisher = publisher.clone();
        let topic = topic.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w as u64);
            let mut ids = Vec::new();
            for i in 0..PER_WRITER {
                let key = format!("k{}", rng.random_range(0..KEYS));
                let ev = support::event(&topic, &key, w * PER_WRITER + i);
                let mut tx = publisher.begin().await.unwrap();
                tx.publish(&ev).await.unwrap();
                // Business work inside the transaction, holding no lock of its own.
                let work = rng.random_range(0..20);
                sqlx::query("SELECT pg_sleep($1)")
                    .bind(f64::from(work) / 1000.0)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                ids.push(ev.event_id);
            }
            ids
        }));
    }
    let mut committed = Vec::new();
    for w in writers {
        committed.extend(w.await.unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    let commit_poll = watcher.await.unwrap();
    let consumed = match collector
        .try_wait_for(&committed, Duration::from_secs(60))
        .await
    {
        Ok(consumed) => consumed,
        Err(missing) => {
            // Where the missing events are: their rows, and their keys' leases.
            let seen: std::collections::HashSet<Uuid> =
                collector.snapshot().iter().map(|c| c.event_id).collect();
            let lost: Vec<Uuid> = committed
                .iter()
                .filter(|id| !seen.contains(id))
                .copied()
                .collect();
            let rows: Vec<String> = sqlx::query_scalar(&format!(
                "SELECT format('%s %s %s attempts %s at %s/%s error %s', id, event_key, \
                 status, attempts, kafka_partition, kafka_offset, last_error) \
                 FROM {} WHERE event_id = ANY($1) ORDER BY id",
                store.table()
            ))
            .bind(&lost)
            .fetch_all(store.pool())
            .await
            .unwrap();
            let keys: Vec<(String, Option<Uuid>, Option<String>)> = sqlx::query_as(&format!(
                "SELECT event_key, lease_owner, (lease_until - now())::text FROM {}",
                store.table().keys()
            ))
            .fetch_all(store.pool())
            .await
            .unwrap_or_default();
            panic!(
                "{missing} of {} events not consumed within 60 s; rows {rows:?}; keys {keys:?}",
                committed.len()
            );
        }
    };
    // Quiet period: a duplicate sent late would show up here.
    let consumed = support::settled(&collector, consumed.len(), Duration::from_secs(2)).await;
    publisher.shutdown(Duration::from_secs(5)).await;
    for r in relays {
        r.stop().await;
    }
    let mut copies: HashMap<Uuid, Vec<(i32, i64, Option<i64>)>> = HashMap::new();
    for c in &consumed {
        copies
            .entry(c.event_id)
            .or_default()
            .push((c.partition, c.offset, c.produced_at_ms));
    }
    for (id, at) in copies.iter().filter(|(_, v)| v.len() > 1) {
        let row: (i32, Option<i32>, Option<i64>) = sqlx::query_as(&format!(
            "SELECT attempts, kafka_partition, kafka_offset FROM {} WHERE event_id = $1",
            store.table()
        ))
        .bind(id)
        .fetch_one(store.pool())
        .await
        .unwrap();
        println!(
            "{id} delivered at (partition, offset, producer timestamp) {at:?}; \
             row (attempts, partition, offset) {row:?}"
        );
    }
    let eager = support::metric(
        outpost::metrics::EAGER_DISPATCH,
        &service,
        &[("result", "hit")],
    );
    (
        committed.len(),
        consumed.len(),
        inversions(&consumed, &commit_poll),
        eager as usize,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_eager_path_and_three_relays_deliver_each_key_in_commit_order() {
    support::metrics();
    let (committed, consumed, inversions, eager) = run(KeyLock::Exclusive).await;
    println!(
        "{committed} committed by {WRITERS} writers on {KEYS} keys, {consumed} consumed, \
         {eager} sent by the eager path, {} pairs against commit order",
        inversions.len()
    );
    assert_eq!(consumed, committed, "an event was delivered twice");
    assert!(
        inversions.is_empty(),
        "delivered against commit order: {inversions:?}"
    );
    assert!(eager > 0, "the eager path took part");
}
