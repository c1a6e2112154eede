//! The publisher against real PostgreSQL, Redis and tansu: transactional mode with eager
//! dispatch (and the relay as its net, also across killed processes), Kafka-first with its
//! outbox fallback and circuit breaker through a paused and a killed broker, and the
//! structured error when the database is unreachable as well.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost::metrics::{CIRCUIT_STATE, DIRECT_PUBLISHES, EAGER_DISPATCH, FALLBACKS};
use outpost::outbox::store::KeyRelease;
use outpost::publishing::breaker::BreakerConfig;
use outpost::{
    Dispatch, Environment, ErrorCode, KafkaProducer, Mode, OutboxEvent, OutboxStore, OutboxTable,
    PublishPath, Publisher, PublisherConfig, Relay, Settlement, WakeSignal, Waker,
};
use rand::{Rng, SeedableRng};
use sqlx::postgres::PgPoolOptions;
use sqlx::types::Json;
use sqlx::PgConnection;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------
// Shared helpers.
// ---------------------------------------------------------------------------------------

use support::{spawn, Running};

fn relay(store: &OutboxStore, brokers: &str, service: &str, signal: &WakeSignal) -> Running {
    let relay = Relay::new(
        store.clone(),
        support::producer(brokers),
        support::relay_config(service),
    )
    .unwrap()
    .with_wake_signal(signal.clone());
    spawn(relay)
}

/// Publisher settings for tests: the relay's test delivery settings (5 s lease).
fn publisher_config(service: &str, mode: Mode) -> PublisherConfig {
    let mut cfg = PublisherConfig::new(service, Environment::Testing);
    cfg.mode = mode;
    cfg.delivery = support::relay_config(service);
    cfg
}

/// A fresh outbox with a business table, a service name, and a transactional publisher
/// with no relay anywhere and no wake-up target: only its eager path can deliver.
/// The producer is patient (30 s delivery timeout, and a lease to match), so a broker that
/// hangs for a while delays its sends rather than failing them.
async fn eager_only(brokers: &str) -> (OutboxStore, String, String, Publisher) {
    let store = support::store().await;
    let items = items_table(&store).await;
    let service = support::unique("svc");
    let mut config = publisher_config(&service, Mode::Transactional);
    config.delivery = support::patient_relay_config(&service);
    let publisher = Publisher::new(
        store.clone(),
        support::patient_producer(brokers),
        Waker::None,
        config,
    )
    .unwrap();
    (store, items, service, publisher)
}

/// Waits until `key` is leased (an eager dispatch claimed it).
async fn leased(store: &OutboxStore, key: &str) {
    let keys = store.table().keys();
    support::eventually(Duration::from_secs(10), "the key claimed", || {
        let (pool, keys) = (store.pool().clone(), keys.clone());
        async move {
            sqlx::query_scalar::<_, bool>(&format!(
                "SELECT lease_owner IS NOT NULL FROM {keys} WHERE event_key = $1"
            ))
            .bind(key)
            .fetch_optional(&pool)
            .await
            .unwrap()
            .filter(|leased| *leased)
        }
    })
    .await;
}

/// A commit function for the eager-path tests: bumps `key`'s version in `items`, stages
/// an event of it on `topic`, commits; returns the event id and the dispatch.
fn committer(
    publisher: &Publisher,
    items: &str,
    topic: &str,
) -> impl Fn(&'static str) -> futures::future::BoxFuture<'static, (Uuid, Dispatch)> {
    let (publisher, items, topic) = (publisher.clone(), items.to_owned(), topic.to_owned());
    move |key| {
        let (publisher, items, topic) = (publisher.clone(), items.clone(), topic.clone());
        Box::pin(async move {
            let mut tx = publisher.begin().await.unwrap();
            let seq = bump(&mut tx, &items, key).await;
            let event = support::event(&topic, key, seq);
            tx.publish(&event).await.unwrap();
            (event.event_id, tx.commit().await.unwrap())
        })
    }
}

/// Holds every settle of the publisher back: the dispatch of key `blocker` claims its key,
/// then waits for the paused broker; its row is locked meanwhile, so the settle statement
/// that follows the ack waits, and every settle queued after it, until the returned
/// transaction ends. Returns the blocker's (acked) event id too.
async fn hold_settles_back(
    store: &OutboxStore,
    broker: &support::PrivateBroker,
    commit: &impl Fn(&'static str) -> futures::future::BoxFuture<'static, (Uuid, Dispatch)>,
) -> (Uuid, sqlx::Transaction<'static, sqlx::Postgres>) {
    broker.pause();
    let blocker = tokio::spawn(commit("blocker"));
    leased(store, "blocker").await;
    let mut lock = store.pool().begin().await.unwrap();
    sqlx::query(&format!(
        "SELECT 1 FROM {} WHERE event_key = 'blocker' FOR UPDATE",
        store.table()
    ))
    .execute(&mut *lock)
    .await
    .unwrap();
    broker.resume();
    let (blocker_id, blocker) = blocker.await.unwrap();
    assert_eq!(blocker.eager_published, 1, "acked");
    (blocker_id, lock)
}

/// The tests that hold every settle back: a private broker with a collector, an eager-only
/// publisher (a warm-up event sent) and the settles held (see [`hold_settles_back`]).
struct HeldSettles {
    broker: support::PrivateBroker,
    collector: support::Collector,
    store: OutboxStore,
    items: String,
    topic: String,
    publisher: Publisher,
    commit: Box<dyn Fn(&'static str) -> futures::future::BoxFuture<'static, (Uuid, Dispatch)>>,
    lock: sqlx::Transaction<'static, sqlx::Postgres>,
    /// The warm-up and blocker events.
    sent: Vec<Uuid>,
}

impl HeldSettles {
    async fn start() -> Self {
        support::metrics();
        let broker = support::PrivateBroker::start().await;
        let brokers = broker.brokers();
        let topic = support::topic_on(&brokers, 2).await;
        let collector = support::Collector::start(&brokers, &topic, 2);
        let (store, items, _service, publisher) = eager_only(&brokers).await;
        let commit = committer(&publisher, &items, &topic);
        let (warm, _) = commit("warm-up").await;
        let (blocker, lock) = hold_settles_back(&store, &broker, &commit).await;
        Self {
            broker,
            collector,
            store,
            items,
            topic,
            publisher,
            commit: Box::new(commit),
            lock,
            sent: vec![warm, blocker],
        }
    }

    /// Lets the settles go; every event sent (`sent` and the set-up's) is published and
    /// read back once, in key order.
    async fn finish(self, sent: Vec<Uuid>) {
        let sent: Vec<Uuid> = self.sent.into_iter().chain(sent).collect();
        self.lock.rollback().await.unwrap();
        self.publisher.shutdown(Duration::from_secs(10)).await;
        assert_eq!(
            support::count_status(&self.store, "published").await,
            i64::try_from(sent.len()).unwrap()
        );
        self.collector
            .wait_for(&sent, Duration::from_secs(30))
            .await;
        let all = self.collector.read_to_end().await;
        assert_eq!(support::messages(&all), sent.len(), "nothing sent twice");
        support::assert_key_order(&all);
    }
}

/// A business table next to the outbox: one row per aggregate, its version bumped by
/// every business transaction (the row lock orders a key's transactions).
async fn items_table(store: &OutboxStore) -> String {
    let items = format!("\"{}\".items", store.table().schema());
    sqlx::query(&format!(
        "CREATE TABLE {items} (key TEXT PRIMARY KEY, seq BIGINT NOT NULL)"
    ))
    .execute(store.pool())
    .await
    .unwrap();
    items
}

/// The business write: bumps `key`'s version (0 for a new key) and returns it.
async fn bump(conn: &mut PgConnection, items: &str, key: &str) -> usize {
    let seq: i64 = sqlx::query_scalar(&format!(
        "INSERT INTO {items} AS i (key, seq) VALUES ($1, 0) \
         ON CONFLICT (key) DO UPDATE SET seq = i.seq + 1 RETURNING seq"
    ))
    .bind(key)
    .fetch_one(conn)
    .await
    .unwrap();
    usize::try_from(seq).unwrap()
}

fn ids(events: &[OutboxEvent]) -> Vec<Uuid> {
    events.iter().map(|e| e.event_id).collect()
}

/// An outbox row as stored: status, payload, headers, attempts.
type Row = (String, Vec<u8>, BTreeMap<String, String>, i32);

/// The outbox rows of `events`, by event id.
async fn outbox_rows(store: &OutboxStore, events: &[OutboxEvent]) -> HashMap<Uuid, Row> {
    type Raw = (Uuid, String, Vec<u8>, Json<BTreeMap<String, String>>, i32);
    let rows: Vec<Raw> = sqlx::query_as(&format!(
        "SELECT e.event_id, e.status, p.payload, p.headers, e.attempts FROM {} e \
             JOIN {} p ON p.id = e.id WHERE e.event_id = ANY($1)",
        store.table(),
        store.table().payloads()
    ))
    .bind(ids(events))
    .fetch_all(store.pool())
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, status, payload, headers, attempts)| {
            (id, (status, payload, headers.0, attempts))
        })
        .collect()
}

async fn row_count(store: &OutboxStore) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {}", store.table()))
        .fetch_one(store.pool())
        .await
        .unwrap()
}

async fn wait_drained(store: &OutboxStore) {
    support::eventually(Duration::from_secs(30), "outbox drained", || {
        let store = store.clone();
        async move { (support::count_status(&store, "pending").await == 0).then_some(()) }
    })
    .await;
}

/// Every consumed message carries the exact bytes and headers that were staged.
fn assert_same_bytes(consumed: &[support::Consumed], events: &[OutboxEvent]) {
    let by_id: HashMap<Uuid, &OutboxEvent> = events.iter().map(|e| (e.event_id, e)).collect();
    for c in consumed {
        if let Some(original) = by_id.get(&c.event_id) {
            assert_eq!(c.payload, original.payload, "bytes differ");
            assert_eq!(c.headers, original.headers, "headers differ");
            assert_eq!(c.key, original.event_key);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Transactional mode.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_dispatches_later_returns_first_and_shutdown_waits_for_the_dispatch() {
    support::metrics();
    let broker = support::PrivateBroker::start().await;
    let brokers = broker.brokers();
    let topic = support::topic_on(&brokers, 2).await;
    let collector = support::Collector::start(&brokers, &topic, 2);
    // Only the eager path, in the background, can deliver.
    let (store, items, service, publisher) = eager_only(&brokers).await;

    // With the broker hanging, commits that waited for their dispatch would take the
    // dispatch deadline (5 s) each; these return once committed.
    broker.pause();
    let commits = async {
        let mut sent = Vec::new();
        for i in 0..6 {
            // A key per commit: a later commit of a key whose earlier dispatch still holds
            // it leaves its event to the relay (there is none here).
            let key = format!("k{i}");
            let mut tx = publisher.begin().await.unwrap();
            let seq = bump(&mut tx, &items, &key).await;
            let ev = support::event(&topic, &key, seq);
            tx.publish(&ev).await.unwrap();
            tx.commit_and_dispatch_later().await.unwrap();
            sent.push(ev);
        }
        sent
    };
    let sent = tokio::time::timeout(Duration::from_secs(10), commits)
        .await
        .expect("commits do not wait for Kafka");
    let resume = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        broker.resume();
    };
    // Shutdown waits for every dispatch and its settle, across the outage's end.
    tokio::join!(publisher.shutdown(Duration::from_secs(60)), resume);
    assert_eq!(
        support::count_status(&store, "published").await,
        6,
        "every dispatch finished before shutdown returned"
    );
    assert_eq!(
        support::metric(
            outpost::metrics::EAGER_DISPATCH,
            &service,
            &[("result", "hit")]
        ),
        6.0
    );
    let ids: Vec<_> = sent.iter().map(|e| e.event_id).collect();
    collector.wait_for(&ids, Duration::from_secs(30)).await;
}

#[tokio::test]
async fn transactional_eager_path_alone_delivers_committed_events_and_never_rolled_back_ones() {
    support::metrics();
    let brokers = support::brokers();
    let topic = support::topic(2).await;
    let collector = support::Collector::start(&brokers, &topic, 2);
    // Only the eager path can deliver.
    let (store, items, service, publisher) = eager_only(&brokers).await;

    let mut committed = Vec::new();
    let mut ghosts = Vec::new();
    for i in 0..24 {
        let key = format!("k{}", i % 4);
        let mut tx = publisher.begin().await.unwrap();
        let seq = bump(&mut tx, &items, &key).await;
        let ev = support::event(&topic, &key, seq);
        tx.publish(&ev).await.unwrap();
        match i % 8 {
            3 => tx.rollback().await.unwrap(),
            7 => drop(tx), // dropped without commit: rolled back too
            _ => {
                let dispatch = tx.commit().await.unwrap();
                assert_eq!(
                    dispatch,
                    Dispatch {
                        eager_published: 1,
                        left_to_relay: 0
                    },
                    "fault-free commit is delivered by the eager path"
                );
                committed.push(ev);
                continue;
            }
        }
        ghosts.push(ev);
    }

    // One transaction, several events (two of one key): all delivered eagerly, in order.
    let mut tx = publisher.begin().await.unwrap();
    let mut batch = Vec::new();
    for key in ["m0", "m1", "m0"] {
        let seq = bump(&mut tx, &items, key).await;
        let ev = support::event(&topic, key, seq);
        tx.publish(&ev).await.unwrap();
        batch.push(ev);
    }
    let dispatch = tx.commit().await.unwrap();
    assert_eq!(dispatch.eager_published, 3, "{dispatch:?}");
    committed.extend(batch);

    // publish() without a business transaction: staged in its own, delivered eagerly.
    let lone = support::event(&topic, "lone", 0);
    assert_eq!(publisher.publish(&lone).await.unwrap(), PublishPath::Direct);
    committed.push(lone);

    collector
        .wait_for(&ids(&committed), Duration::from_secs(20))
        .await;
    let consumed = collector.read_to_end().await;
    let ghost_ids: HashSet<Uuid> = ids(&ghosts).into_iter().collect();
    assert!(
        consumed.iter().all(|c| !ghost_ids.contains(&c.event_id)),
        "a rolled-back event was published"
    );
    assert_eq!(
        support::messages(&consumed),
        committed.len(),
        "no duplicates"
    );
    support::assert_key_order(&consumed);
    assert_same_bytes(&consumed, &committed);

    // The outbox holds exactly the committed events, all published once the settles that
    // follow the acks are written; no trace of the rolled-back ones (nothing could ever
    // send them).
    publisher.shutdown(Duration::from_secs(10)).await;
    assert_eq!(row_count(&store).await, committed.len() as i64);
    assert_eq!(
        support::count_status(&store, "published").await,
        committed.len() as i64
    );
    assert!(outbox_rows(&store, &ghosts).await.is_empty());
    let business: i64 = sqlx::query_scalar(&format!("SELECT sum(seq + 1)::bigint FROM {items}"))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(
        business + 1,
        committed.len() as i64,
        "every business write has its event (plus the lone publish)"
    );

    let hits = support::metric(EAGER_DISPATCH, &service, &[("result", "hit")]);
    let misses = support::metric(EAGER_DISPATCH, &service, &[("result", "miss")]);
    assert_eq!(hits, committed.len() as f64);
    assert_eq!(misses, 0.0);
}

#[tokio::test]
async fn transactional_relay_delivers_when_dispatch_is_skipped_or_failing() {
    support::metrics();
    let brokers = support::brokers();
    let store = support::store().await;
    let items = items_table(&store).await;
    let topic = support::topic(2).await;
    let collector = support::Collector::start(&brokers, &topic, 2);
    let service = support::unique("svc");
    let signal = WakeSignal::new();
    let running = relay(&store, &brokers, &service, &signal);
    let publisher = Publisher::new(
        store.clone(),
        support::producer(&brokers),
        Waker::Local(signal.clone()),
        publisher_config(&service, Mode::Transactional),
    )
    .unwrap();
    let mut committed = Vec::new();

    // 1. The caller stages in its own transaction and forgets the post-commit step: no
    //    dispatch, no wake-up; the relay finds the rows by polling.
    for i in 0..8 {
        let key = format!("skip{}", i % 3);
        let mut tx = store.pool().begin().await.unwrap();
        let seq = bump(&mut tx, &items, &key).await;
        let ev = support::event(&topic, &key, seq);
        let _forgotten = publisher.stage(&mut tx, &ev).await.unwrap();
        tx.commit().await.unwrap();
        committed.push(ev);
    }

    // 2. Eager dispatch fails: this publisher's producer reaches no broker.
    let fail_service = support::unique("svc");
    let mut dead = support::producer_config("127.0.0.1:1");
    dead.delivery_timeout = Duration::from_millis(300);
    dead.queue_timeout = Duration::from_millis(100);
    let failing = Publisher::new(
        store.clone(),
        Arc::new(KafkaProducer::new(dead).unwrap()),
        Waker::Local(signal.clone()),
        publisher_config(&fail_service, Mode::Transactional),
    )
    .unwrap();
    let mut left = 0;
    let mut commit_times = Vec::new();
    for i in 0..4 {
        let mut tx = failing.begin().await.unwrap();
        let events = if i == 3 { 2 } else { 1 };
        for _ in 0..events {
            let key = format!("fail{}", i % 2);
            let seq = bump(&mut tx, &items, &key).await;
            let ev = support::event(&topic, &key, seq);
            tx.publish(&ev).await.unwrap();
            committed.push(ev);
        }
        let started = Instant::now();
        let dispatch = tx.commit().await.unwrap();
        commit_times.push(started.elapsed());
        assert_eq!(
            dispatch,
            Dispatch {
                eager_published: 0,
                left_to_relay: events
            }
        );
        left += dispatch.left_to_relay;
    }
    println!("commit + failing eager dispatch (delivery timeout 300 ms): {commit_times:?}");

    // 3. Outbox-only, the same publisher in another mode: the woken relay delivers.
    let outbox_only = publisher.with_mode(Mode::OutboxOnly);
    let ev = support::event(&topic, "only", 0);
    assert_eq!(outbox_only.publish(&ev).await.unwrap(), PublishPath::Outbox);
    committed.push(ev);
    let mut tx = outbox_only.begin().await.unwrap();
    let ev = support::event(&topic, "only", 1);
    tx.publish(&ev).await.unwrap();
    assert_eq!(
        tx.commit().await.unwrap(),
        Dispatch {
            eager_published: 0,
            left_to_relay: 1
        }
    );
    committed.push(ev);

    let consumed = collector
        .wait_for(&ids(&committed), Duration::from_secs(20))
        .await;
    wait_drained(&store).await;
    running.stop().await;
    support::assert_key_order(&consumed);
    assert_same_bytes(&consumed, &committed);
    let consumed = collector.read_to_end().await;
    assert_eq!(
        support::messages(&consumed),
        committed.len(),
        "no duplicates"
    );
    assert_eq!(support::count_status(&store, "dead").await, 0);
    assert_eq!(
        support::count_status(&store, "published").await,
        committed.len() as i64
    );

    assert_eq!(left, 5);
    assert_eq!(
        support::metric(EAGER_DISPATCH, &fail_service, &[("result", "miss")]),
        5.0
    );
    assert_eq!(
        support::metric(EAGER_DISPATCH, &fail_service, &[("result", "hit")]),
        0.0
    );
    // Skipped dispatch records nothing; outbox-only never dispatches eagerly.
    assert_eq!(
        support::metric(EAGER_DISPATCH, &service, &[("result", "hit")]),
        0.0
    );
}

#[tokio::test]
async fn eager_dispatch_never_overtakes_an_older_pending_event_of_its_key() {
    support::metrics();
    let brokers = support::brokers();
    let store = support::store().await;
    let topic = support::topic(2).await;
    let collector = support::Collector::start(&brokers, &topic, 2);
    let service = support::unique("svc");
    let publisher = Publisher::new(
        store.clone(),
        support::producer(&brokers),
        Waker::None,
        publisher_config(&service, Mode::Transactional),
    )
    .unwrap();
    let stage_only = |ev: OutboxEvent| {
        let publisher = publisher.clone();
        async move {
            let mut tx = publisher.store().pool().begin().await.unwrap();
            let _no_dispatch = publisher.stage(&mut tx, &ev).await.unwrap();
            tx.commit().await.unwrap();
            ev
        }
    };
    let commit_eagerly = |ev: OutboxEvent| {
        let publisher = publisher.clone();
        async move {
            let mut tx = publisher.begin().await.unwrap();
            tx.publish(&ev).await.unwrap();
            (tx.commit().await.unwrap(), ev)
        }
    };

    // (a) The older event of key `a` is pending and free (its dispatch never ran): the
    //     eager path claims the key's head, so it sends the older event first.
    let a0 = stage_only(support::event(&topic, "a", 0)).await;
    let (dispatch, a1) = commit_eagerly(support::event(&topic, "a", 1)).await;
    assert_eq!(dispatch.eager_published, 1, "{dispatch:?}");
    let seen = collector
        .wait_for(&[a0.event_id, a1.event_id], Duration::from_secs(10))
        .await;
    support::assert_key_order(&seen);
    // `commit()` returned on the acks; the settle follows in the background.
    publisher.shutdown(Duration::from_secs(10)).await;
    let rows = outbox_rows(&store, &[a0.clone(), a1.clone()]).await;
    assert!(rows.values().all(|r| r.0 == "published"));

    // (b) The older event of key `b` is leased by someone else (a relay sending it): the
    //     eager path leaves the newer one alone.
    let b0 = stage_only(support::event(&topic, "b", 0)).await;
    let other = Uuid::new_v4();
    let held = store
        .claim(other, 100, 20, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(ids_of_claimed(&held), vec![b0.event_id]);
    let (dispatch, b1) = commit_eagerly(support::event(&topic, "b", 1)).await;
    assert_eq!(
        dispatch,
        Dispatch {
            eager_published: 0,
            left_to_relay: 1
        }
    );

    // (c) The older event of key `c` waits for a retry after a failed attempt.
    let c0 = stage_only(support::event(&topic, "c", 0)).await;
    let failed_owner = Uuid::new_v4();
    let claimed = store
        .claim(failed_owner, 100, 20, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(ids_of_claimed(&claimed), vec![c0.event_id]);
    store
        .settle(
            failed_owner,
            &[(
                claimed[0].rows[0].id,
                Settlement::Retry {
                    delay: Duration::from_secs(60),
                    error: "broker unavailable".into(),
                    budgeted: false,
                    transient: true,
                    attempts: 0,
                },
            )],
            &[KeyRelease {
                key: "c".into(),
                backoff: Some(Duration::from_secs(60)),
                transient: true,
            }],
        )
        .await
        .unwrap();
    let (dispatch, c1) = commit_eagerly(support::event(&topic, "c", 1)).await;
    assert_eq!(
        dispatch,
        Dispatch {
            eager_published: 0,
            left_to_relay: 1
        }
    );

    // Neither newer event was attempted: never sent ahead of its predecessor.
    let rows = outbox_rows(&store, &[b1.clone(), c1.clone()]).await;
    for (status, _, _, attempts) in rows.values() {
        assert_eq!((status.as_str(), *attempts), ("pending", 0));
    }
    let early: HashSet<Uuid> = collector.snapshot().iter().map(|c| c.event_id).collect();
    assert!(!early.contains(&b1.event_id) && !early.contains(&c1.event_id));

    // Once the older events are free again the relay delivers each key in order.
    store
        .settle(other, &[], &[KeyRelease::done("b".into())])
        .await
        .unwrap();
    store.pull_forward_transient().await.unwrap();
    let signal = WakeSignal::new();
    let running = relay(&store, &brokers, &service, &signal);
    let all = [a0, a1, b0, b1, c0, c1];
    collector
        .wait_for(&ids(&all), Duration::from_secs(20))
        .await;
    running.stop().await;
    let consumed = collector.read_to_end().await;
    support::assert_key_order(&consumed);
    assert_eq!(support::messages(&consumed), all.len(), "no duplicates");
    assert_eq!(
        support::metric(EAGER_DISPATCH, &service, &[("result", "hit")]),
        1.0
    );
    assert_eq!(
        support::metric(EAGER_DISPATCH, &service, &[("result", "miss")]),
        2.0
    );
}

fn ids_of_claimed(keys: &[outpost::outbox::store::ClaimedKey]) -> Vec<Uuid> {
    keys.iter()
        .flat_map(|k| k.rows.iter().map(|r| r.event_id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_eager_and_relay_together_deliver_each_event_exactly_once_in_key_order() {
    support::metrics();
    let brokers = support::brokers();
    let store = support::store().await;
    let items = items_table(&store).await;
    let topic = support::topic(4).await;
    let collector = support::Collector::start(&brokers, &topic, 4);
    let service = support::unique("svc");

    // The relay is woken through Redis, as across processes.
    let signal = WakeSignal::new();
    let listeners = CancellationToken::new();
    signal
        .listen_redis(&support::redis_url(), &service, listeners.clone())
        .unwrap();
    let running = relay(&store, &brokers, &service, &signal);

    // Four publisher replicas commit concurrently on eight shared keys.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let publisher = Publisher::new(
            store.clone(),
            support::producer(&brokers),
            Waker::redis(&support::redis_url(), &service).await.unwrap(),
            publisher_config(&service, Mode::Transactional),
        )
        .unwrap();
        let (items, topic) = (items.clone(), topic.clone());
        tasks.push(tokio::spawn(async move {
            let mut staged = Vec::new();
            let mut rng = rand::rngs::StdRng::from_os_rng();
            for i in 0..40 {
                let key = format!("k{}", rng.random_range(0..8));
                let mut tx = publisher.begin().await.unwrap();
                for _ in 0..(1 + usize::from(i % 5 == 0)) {
                    let seq = bump(&mut tx, &items, &key).await;
                    let ev = support::event(&topic, &key, seq);
                    tx.publish(&ev).await.unwrap();
                    staged.push(ev);
                }
                tx.commit().await.unwrap();
            }
            staged
        }));
    }
    let mut committed = Vec::new();
    for task in tasks {
        committed.extend(task.await.unwrap());
    }

    let consumed = collector
        .wait_for(&ids(&committed), Duration::from_secs(30))
        .await;
    wait_drained(&store).await;
    running.stop().await;
    listeners.cancel();
    support::assert_key_order(&consumed);
    assert_same_bytes(&consumed, &committed);
    // Counted from what was read: tansu's high watermarks undercount batched records.
    let consumed = collector.read_to_end().await;
    let stored = support::messages(&consumed);
    let hits = support::metric(EAGER_DISPATCH, &service, &[("result", "hit")]);
    let misses = support::metric(EAGER_DISPATCH, &service, &[("result", "miss")]);
    println!(
        "{} events: eager hits {hits}, misses {misses}; {stored} messages in the topic, {} read",
        committed.len(),
        consumed.len()
    );
    assert_eq!(stored, committed.len(), "a message was sent twice");
    let distinct: HashSet<Uuid> = consumed.iter().map(|c| c.event_id).collect();
    assert_eq!(distinct.len(), committed.len());
    assert_eq!(support::count_status(&store, "dead").await, 0);
    assert!(hits > 0.0, "the eager path delivered nothing");
    assert_eq!(hits + misses, committed.len() as f64);
}

// ---------------------------------------------------------------------------------------
// Transactional mode: a publishing process killed at random points after commits.
// ---------------------------------------------------------------------------------------

const CRASH_CHILD: &str = "crash_child_publishes_until_killed";

/// Not a test of its own: the body of the process the crash test starts and kills. Without
/// `OUTPOST_CRASH_CHILD` it returns at once.
#[tokio::test]
#[ignore = "child process of publisher_killed_after_commits_loses_no_committed_event"]
async fn crash_child_publishes_until_killed() {
    use std::io::Write;
    if std::env::var("OUTPOST_CRASH_CHILD").as_deref() != Ok("1") {
        return;
    }
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"));
    let (schema, topic, service) = (
        var("OUTPOST_CRASH_SCHEMA"),
        var("OUTPOST_CRASH_TOPIC"),
        var("OUTPOST_CRASH_SERVICE"),
    );
    let store = OutboxStore::new(support::pool().await, OutboxTable::new(&schema).unwrap());
    let publisher = Publisher::new(
        store.clone(),
        support::producer(&support::brokers()),
        Waker::None,
        publisher_config(&service, Mode::Transactional),
    )
    .unwrap();
    let items = format!("\"{schema}\".items");
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let announce = |ev: &OutboxEvent| {
        let mut out = std::io::stdout().lock();
        if writeln!(out, "COMMITTED {}", ev.event_id)
            .and_then(|()| out.flush())
            .is_err()
        {
            std::process::exit(0); // the parent is gone
        }
    };
    let started = Instant::now();
    // Bounded in case the parent dies without killing this process.
    while started.elapsed() < Duration::from_secs(60) {
        let key = format!("k{}", rng.random_range(0..6));
        if rng.random_bool(0.5) {
            // Commit and dispatch in one call; announce once it returns.
            let mut tx = publisher.begin().await.unwrap();
            let seq = bump(&mut tx, &items, &key).await;
            let ev = support::event(&topic, &key, seq);
            tx.publish(&ev).await.unwrap();
            tx.commit().await.unwrap();
            announce(&ev);
        } else {
            // Announce between commit and dispatch, so a kill can land before, during or
            // after the eager send and its settlement.
            let mut tx = store.pool().begin().await.unwrap();
            let seq = bump(&mut tx, &items, &key).await;
            let ev = support::event(&topic, &key, seq);
            let staged = publisher.stage(&mut tx, &ev).await.unwrap();
            tx.commit().await.unwrap();
            announce(&ev);
            publisher.after_commit(vec![staged]).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_killed_after_commits_loses_no_committed_event() {
    let brokers = support::brokers();
    let store = support::store().await;
    let items = items_table(&store).await;
    let topic = support::topic(2).await;
    let collector = support::Collector::start(&brokers, &topic, 2);
    let service = support::unique("svc");
    let seed = std::env::var("OUTPOST_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    println!("crash test seed {seed} (set OUTPOST_CRASH_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let exe = std::env::current_exe().unwrap();

    let mut announced: Vec<Uuid> = Vec::new();
    let rounds = 4;
    for round in 0..rounds {
        let kill_after = rng.random_range(3..=30);
        let mut child = tokio::process::Command::new(&exe)
            .args(["--exact", CRASH_CHILD, "--nocapture", "--ignored"])
            .env("OUTPOST_CRASH_CHILD", "1")
            .env("OUTPOST_CRASH_SCHEMA", store.table().schema())
            .env("OUTPOST_CRASH_TOPIC", &topic)
            .env("OUTPOST_CRASH_SERVICE", &service)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut seen = 0;
        while seen < kill_after {
            let line = tokio::time::timeout_at(deadline, lines.next_line())
                .await
                .expect("the child commits in time")
                .unwrap()
                .expect("the child exited before it was killed");
            if let Some(id) = line.strip_prefix("COMMITTED ") {
                announced.push(id.trim().parse().unwrap());
                seen += 1;
            }
        }
        // Land the kill at a random point of the child's next transactions.
        let jitter = Duration::from_micros(rng.random_range(0..20_000));
        tokio::time::sleep(jitter).await;
        child.start_kill().unwrap();
        let status = child.wait().await.unwrap();
        assert!(!status.success(), "round {round}: child was killed");
        // Whatever it announced before dying counts as committed.
        while let Some(line) = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
            .await
            .expect("pipe closes once the child is dead")
            .unwrap()
        {
            if let Some(id) = line.strip_prefix("COMMITTED ") {
                announced.push(id.trim().parse().unwrap());
            }
        }
    }

    // What the crashes left behind, then the relay as the net.
    let pending_left = support::count_status(&store, "pending").await;
    let leased_left: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} e JOIN {} k ON k.event_key = e.event_key \
         WHERE e.status = 'pending' AND k.lease_owner IS NOT NULL",
        store.table(),
        store.table().keys()
    ))
    .fetch_one(store.pool())
    .await
    .unwrap();
    let signal = WakeSignal::new();
    let running = relay(&store, &brokers, &service, &signal);
    collector
        .wait_for(&announced, Duration::from_secs(30))
        .await;
    wait_drained(&store).await;
    running.stop().await;

    let all: Vec<(Uuid, String)> = sqlx::query_as(&format!(
        "SELECT event_id, status FROM {} ORDER BY id",
        store.table()
    ))
    .fetch_all(store.pool())
    .await
    .unwrap();
    let table_ids: Vec<Uuid> = all.iter().map(|(id, _)| *id).collect();
    let consumed = collector
        .wait_for(&table_ids, Duration::from_secs(10))
        .await;
    assert!(
        all.iter().all(|(_, status)| status == "published"),
        "every row published, none parked"
    );
    let announced_set: HashSet<Uuid> = announced.iter().copied().collect();
    let table_set: HashSet<Uuid> = table_ids.iter().copied().collect();
    assert!(
        announced_set.is_subset(&table_set),
        "an announced event is not in the outbox"
    );
    support::assert_key_order(&consumed);

    // Every committed business write has its event, and no event lacks its write.
    let mismatched: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {items} i FULL JOIN ( \
             SELECT event_key, count(*) AS n FROM {} GROUP BY event_key) o \
           ON o.event_key = i.key WHERE o.n IS DISTINCT FROM i.seq + 1",
        store.table()
    ))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(mismatched, 0, "business rows and events disagree");

    let distinct: HashSet<Uuid> = consumed.iter().map(|c| c.event_id).collect();
    println!(
        "{rounds} kills: {} events announced, {} committed, {pending_left} left pending \
         ({leased_left} leased by a dead process) for the relay; {} consumed, {} duplicates",
        announced.len(),
        all.len(),
        consumed.len(),
        consumed.len() - distinct.len()
    );
}

// ---------------------------------------------------------------------------------------
// Kafka-first.
// ---------------------------------------------------------------------------------------

const DEADLINE: Duration = Duration::from_millis(300);

fn kafka_first_config(service: &str, open_for: Duration) -> PublisherConfig {
    let mut cfg = publisher_config(service, Mode::KafkaFirst);
    cfg.direct_deadline = DEADLINE;
    cfg.breaker = BreakerConfig {
        failure_threshold: 2,
        open_for,
    };
    cfg
}

enum Outage {
    Pause,
    Kill,
}

async fn kafka_first_survives(outage: Outage) {
    support::metrics();
    let mut broker = support::PrivateBroker::start().await;
    let brokers = broker.brokers();
    let store = support::store().await;
    let topic = support::topic_on(&brokers, 2).await;
    let service = support::unique("svc");
    let signal = WakeSignal::new();
    let producer = support::producer(&brokers);
    // An idempotent producer's first send waits for its producer id; do that outside the
    // measured calls (no event_id header: the collector ignores it).
    producer
        .send(&topic, "warm-up", b"{}", &BTreeMap::new())
        .await
        .expect("warm-up");
    let publisher = Publisher::new(
        store.clone(),
        Arc::clone(&producer),
        Waker::Local(signal.clone()),
        kafka_first_config(&service, Duration::from_secs(3)),
    )
    .unwrap();
    let collector = support::Collector::start(&brokers, &topic, 2);
    let mut direct = Vec::new();
    let mut via_outbox = Vec::new();

    for k in 0..4 {
        let ev = support::event(&topic, &format!("k{k}"), 0);
        assert_eq!(publisher.publish(&ev).await.unwrap(), PublishPath::Direct);
        direct.push(ev);
    }
    let mut consumed = collector
        .wait_for(&ids(&direct), Duration::from_secs(20))
        .await;
    assert_eq!(row_count(&store).await, 0, "direct events skip the outbox");

    // A consumer that lives through a broker restart which lost its topic can crash
    // librdkafka (SIGSEGV in its metadata cache); like faults.rs, read the restarted
    // broker with a fresh one.
    let collector = match outage {
        Outage::Pause => {
            broker.pause();
            Some(collector)
        }
        Outage::Kill => {
            drop(collector);
            broker.kill();
            None
        }
    };
    let mut took = Vec::new();
    for i in 0..12 {
        let ev = support::event(&topic, &format!("k{}", i % 4), 1 + i / 4);
        let started = Instant::now();
        let path = publisher.publish(&ev).await.expect("stored in the outbox");
        took.push(started.elapsed());
        assert_eq!(
            path,
            PublishPath::Outbox,
            "call {i} in the outage, calls took {took:?}"
        );
        via_outbox.push(ev);
    }
    let ms = |d: &[Duration]| d.iter().map(Duration::as_millis).collect::<Vec<_>>();
    println!(
        "kafka-first, broker {}: deadline {DEADLINE:?}; calls took {:?} ms (first two pay the \
         deadline, then the circuit is open)",
        match outage {
            Outage::Pause => "paused",
            Outage::Kill => "killed",
        },
        ms(&took)
    );
    // Margins a loaded machine meets: a call that ignored the deadline would wait for
    // the producer's delivery timeout (1.5 s) instead.
    for t in &took[..2] {
        assert!(
            *t >= DEADLINE && *t < DEADLINE + Duration::from_secs(1),
            "{t:?}"
        );
    }
    // With the circuit open no call tries Kafka at all (counted, not timed: on a loaded
    // machine the outbox write alone can take longer than the deadline).
    assert_eq!(
        support::metric(DIRECT_PUBLISHES, &service, &[("outcome", "failed")]),
        2.0,
        "only the first two calls tried Kafka; calls took {took:?}"
    );
    assert_eq!(
        support::metric(CIRCUIT_STATE, &service, &[]),
        2.0,
        "circuit open"
    );

    // The outbox holds the same envelopes: same event ids, same bytes, same headers.
    let rows = outbox_rows(&store, &via_outbox).await;
    assert_eq!(rows.len(), via_outbox.len());
    assert_eq!(row_count(&store).await, via_outbox.len() as i64);
    for ev in &via_outbox {
        let (status, payload, headers, _) = &rows[&ev.event_id];
        assert_eq!(status, "pending");
        assert_eq!(payload, &ev.payload);
        assert_eq!(headers, &ev.headers);
    }

    match outage {
        Outage::Pause => broker.resume(),
        Outage::Kill => {
            broker.restart().await;
            // Memory storage lost the topic; recreate it as an operator would.
            outpost::kafka::producer::create_topic(&brokers, &topic, 2, Duration::from_secs(10))
                .await
                .unwrap();
        }
    }
    // A metadata request may have re-created the topic with the broker's default partition
    // count before we did: read every partition it has.
    let collector = collector.unwrap_or_else(|| {
        support::Collector::start(&brokers, &topic, support::partitions_of(&brokers, &topic))
    });

    // With the broker back but the relay not yet run, later events of those keys still
    // follow their predecessors through the outbox.
    for i in 0..8 {
        let ev = support::event(&topic, &format!("k{}", i % 4), 4 + i / 4);
        assert_eq!(publisher.publish(&ev).await.unwrap(), PublishPath::Outbox);
        via_outbox.push(ev);
    }
    assert_eq!(
        support::metric(FALLBACKS, &service, &[("reason", "key_pending")]),
        16.0
    );

    // Once `open_for` has passed a probe goes to Kafka and closes the circuit (events of
    // fresh keys, so no key is pending).
    let give_up = Instant::now() + Duration::from_secs(30);
    for probe in 0.. {
        let ev = support::event(&topic, &format!("probe{probe}"), 0);
        let path = publisher.publish(&ev).await.unwrap();
        if path == PublishPath::Direct {
            direct.push(ev);
            break;
        }
        via_outbox.push(ev);
        assert!(Instant::now() < give_up, "circuit never closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        support::metric(CIRCUIT_STATE, &service, &[]),
        0.0,
        "circuit closed"
    );

    // The relay delivers the outbox; nothing is parked.
    let running = relay(&store, &brokers, &service, &signal);
    let after: Vec<Uuid> = ids(&via_outbox)
        .into_iter()
        .chain(direct.last().map(|e| e.event_id))
        .collect();
    collector.wait_for(&after, Duration::from_secs(30)).await;
    wait_drained(&store).await;
    assert_eq!(
        support::count_status(&store, "dead").await,
        0,
        "nothing parked"
    );

    // The key has nothing pending any more: the next event goes direct again.
    let last = support::event(&topic, "k0", 6);
    assert_eq!(publisher.publish(&last).await.unwrap(), PublishPath::Direct);
    direct.push(last.clone());
    collector
        .wait_for(&[last.event_id], Duration::from_secs(10))
        .await;
    running.stop().await;

    match outage {
        Outage::Pause => consumed = collector.snapshot(),
        Outage::Kill => consumed.extend(collector.snapshot()),
    }
    support::assert_key_order(&consumed);
    let everything: Vec<OutboxEvent> = direct.iter().chain(&via_outbox).cloned().collect();
    assert_same_bytes(&consumed, &everything);
    let distinct: HashSet<Uuid> = consumed.iter().map(|c| c.event_id).collect();
    assert!(ids(&everything).iter().all(|id| distinct.contains(id)));
    println!(
        "{} events ({} direct, {} via the outbox), {} consumed ({} duplicates from timed-out \
         direct sends landing late)",
        everything.len(),
        direct.len(),
        via_outbox.len(),
        consumed.len(),
        consumed.len() - distinct.len()
    );

    let failed = support::metric(DIRECT_PUBLISHES, &service, &[("outcome", "failed")]);
    assert!(failed >= 2.0, "{failed}");
    assert_eq!(
        support::metric(FALLBACKS, &service, &[("reason", "timeout")])
            + support::metric(FALLBACKS, &service, &[("reason", "kafka_error")]),
        failed
    );
    assert_eq!(
        support::metric(DIRECT_PUBLISHES, &service, &[("outcome", "acked")]),
        direct.len() as f64
    );
    assert_eq!(
        support::metric(FALLBACKS, &service, &[]),
        via_outbox.len() as f64,
        "one fallback per outbox event"
    );
    assert!(support::metric(FALLBACKS, &service, &[("reason", "circuit_open")]) >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_first_with_broker_paused_falls_back_within_the_deadline_and_keeps_key_order() {
    kafka_first_survives(Outage::Pause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_first_with_broker_killed_falls_back_within_the_deadline_and_keeps_key_order() {
    kafka_first_survives(Outage::Kill).await;
}

#[tokio::test]
async fn kafka_first_with_kafka_and_database_down_returns_a_structured_error() {
    support::metrics();
    let service = support::unique("svc");
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .unwrap();
    let store = OutboxStore::new(pool, OutboxTable::new(&support::unique("t")).unwrap());
    // Nothing listens on port 1: the broker is down.
    let publisher = Publisher::new(
        store,
        support::producer("127.0.0.1:1"),
        Waker::None,
        kafka_first_config(&service, Duration::from_secs(30)),
    )
    .unwrap();

    let mut took = Vec::new();
    for seq in 0..4 {
        let ev = support::event("outpost.test.unreachable", &format!("k{seq}"), seq);
        let started = Instant::now();
        let err = publisher
            .publish(&ev)
            .await
            .expect_err("neither Kafka nor the outbox took the event");
        took.push(started.elapsed());
        assert_eq!(err.code(), ErrorCode::OutboxStorage);
        assert!(err.is_retriable(), "{err}");
        let cause = std::error::Error::source(&err).expect("cause").to_string();
        let detail = err.detail(&service, "publish", None);
        assert_eq!(detail.correlation_id, ev.correlation_id);
        assert_eq!(detail.details["aggregate_type"], ev.aggregate_type.as_str());
        assert_eq!(detail.details["aggregate_id"], ev.aggregate_id.as_str());
        assert_eq!(detail.details["event_type"], ev.event_type.as_str());
        assert_eq!(detail.details["topic"], ev.topic.as_str());
        assert_eq!(detail.details["cause"], cause.as_str());
        assert_eq!(detail.details["retriable"], true);
        let json = serde_json::to_value(&detail).unwrap();
        assert_eq!(json["error_code"], "OUTBOX_STORAGE");
        assert_eq!(json["correlation_id"], ev.correlation_id.to_string());
    }
    println!(
        "kafka-first, broker and database down: calls took {:?} ms (pool acquire timeout 1 s)",
        took.iter().map(Duration::as_millis).collect::<Vec<_>>()
    );
    for (i, t) in took.iter().enumerate() {
        // Bounded by the pool's acquire timeout (1 s) for the outbox check and again for
        // the store, with a margin a loaded machine meets.
        assert!(
            *t < Duration::from_secs(2) + Duration::from_secs(3),
            "call {i}: {t:?}"
        );
    }
    // The outbox check could not answer, so nothing was sent directly (an older event of
    // the key might wait in the outbox), and nothing reported as published by any path.
    for outcome in ["acked", "failed"] {
        assert_eq!(
            support::metric(DIRECT_PUBLISHES, &service, &[("outcome", outcome)]),
            0.0,
            "{outcome}"
        );
    }
    assert_eq!(support::metric(FALLBACKS, &service, &[]), 0.0);
}

#[tokio::test]
async fn kafka_first_returns_permanent_errors_and_stores_nothing() {
    support::metrics();
    let brokers = support::brokers();
    let store = support::store().await;
    let topic = support::topic(1).await;
    let collector = support::Collector::start(&brokers, &topic, 1);
    let service = support::unique("svc");
    let mut cfg = support::producer_config(&brokers);
    cfg.librdkafka
        .insert("message.max.bytes".into(), "20000".into());
    let producer = Arc::new(KafkaProducer::new(cfg).unwrap());
    producer
        .send(&topic, "warm-up", b"{}", &BTreeMap::new())
        .await
        .expect("warm-up");
    let publisher = Publisher::new(
        store.clone(),
        producer,
        Waker::None,
        kafka_first_config(&service, Duration::from_secs(30)),
    )
    .unwrap();

    let good = support::event(&topic, "k", 0);
    assert_eq!(publisher.publish(&good).await.unwrap(), PublishPath::Direct);
    let envelope = outpost::EventEnvelope::new(
        "outpost.test.v1",
        "outpost-tests",
        serde_json::json!({ "key": "k", "seq": 1, "pad": "x".repeat(30_000) }),
    );
    let big = OutboxEvent::from_envelope(&envelope, &topic, outpost::Aggregate::new("test", "k"))
        .unwrap();
    let err = publisher.publish(&big).await.expect_err("too large");
    assert_eq!(err.code(), ErrorCode::KafkaPublish);
    assert!(!err.is_retriable(), "{err}");

    collector
        .wait_for(&[good.event_id], Duration::from_secs(10))
        .await;
    let consumed = collector.read_to_end().await;
    assert_eq!(consumed.len(), 1);
    assert_eq!(
        row_count(&store).await,
        0,
        "the outbox cannot help: not stored"
    );
    assert_eq!(
        support::metric(DIRECT_PUBLISHES, &service, &[("outcome", "rejected")]),
        1.0
    );
    assert_eq!(
        support::metric(DIRECT_PUBLISHES, &service, &[("outcome", "acked")]),
        1.0
    );
    assert_eq!(support::metric(FALLBACKS, &service, &[]), 0.0);
    assert_eq!(
        support::metric(CIRCUIT_STATE, &service, &[]),
        0.0,
        "the broker answered"
    );
}

#[tokio::test]
async fn kafka_first_probe_abandoned_by_its_caller_does_not_wedge_the_circuit() {
    support::metrics();
    let service = support::unique("svc");
    let store = support::store().await;
    let mut cfg = kafka_first_config(&service, Duration::from_millis(200));
    cfg.breaker.failure_threshold = 1;
    // Nothing listens on port 1: every direct attempt times out.
    let publisher = Publisher::new(
        store.clone(),
        support::producer("127.0.0.1:1"),
        Waker::None,
        cfg,
    )
    .unwrap();
    let mut n = 0;
    let mut next = || {
        n += 1;
        support::event("outpost.test.unreachable", &format!("k{n}"), 0)
    };
    assert_eq!(
        publisher.publish(&next()).await.unwrap(),
        PublishPath::Outbox
    );
    assert_eq!(support::metric(CIRCUIT_STATE, &service, &[]), 2.0);

    // Once the circuit lets a probe through, its caller gives up on it mid-send.
    support::eventually(Duration::from_secs(5), "a probe is abandoned", || {
        let (publisher, ev) = (publisher.clone(), next());
        async move {
            tokio::time::timeout(Duration::from_millis(50), publisher.publish(&ev))
                .await
                .is_err()
                .then_some(())
        }
    })
    .await;

    // The breaker still probes Kafka again after `open_for`, instead of waiting for the
    // abandoned probe forever and sending everything to the outbox.
    let timeouts = support::metric(FALLBACKS, &service, &[("reason", "timeout")]);
    support::eventually(Duration::from_secs(5), "another probe", || {
        let (publisher, ev, service) = (publisher.clone(), next(), service.clone());
        async move {
            assert_eq!(publisher.publish(&ev).await.unwrap(), PublishPath::Outbox);
            (support::metric(FALLBACKS, &service, &[("reason", "timeout")]) > timeouts)
                .then_some(())
        }
    })
    .await;
    assert_eq!(
        support::metric(CIRCUIT_STATE, &service, &[]),
        2.0,
        "failed probe reopens"
    );
}

/// A transactional publisher whose Kafka is unreachable: sends wait out a 30 s delivery
/// timeout (the default, far longer than the tests wait), commits wait `dispatch_deadline`
/// for them, and the circuit opens after two such failures, for a minute.
fn kafka_down(store: &OutboxStore, dispatch_deadline: Duration) -> Publisher {
    let mut dead = support::producer_config("127.0.0.1:1");
    dead.delivery_timeout = Duration::from_secs(30);
    let mut cfg = publisher_config(&support::unique("svc"), Mode::Transactional);
    cfg.dispatch_deadline = dispatch_deadline;
    cfg.breaker.failure_threshold = 2;
    cfg.breaker.open_for = Duration::from_secs(60);
    cfg.delivery.lease = Duration::from_secs(70);
    Publisher::new(
        store.clone(),
        Arc::new(KafkaProducer::new(dead).unwrap()),
        Waker::None,
        cfg,
    )
    .unwrap()
}

/// A Kafka outage must not make every transactional commit wait out delivery timeouts:
/// eager dispatch is bounded by `dispatch_deadline`, and once the circuit opens, commits
/// skip it and leave their events to the relay at once.
#[tokio::test]
async fn transactional_commits_stop_waiting_once_kafka_is_known_down() {
    let store = support::store().await;
    // Long enough that a commit skipping dispatch stays far below it on a loaded machine.
    let publisher = kafka_down(&store, Duration::from_secs(2));
    let mut took = Vec::new();
    for seq in 0..6 {
        let mut tx = publisher.begin().await.unwrap();
        let key = format!("k{seq}"); // distinct keys: no row waits behind another
        tx.publish(&support::event("t", &key, seq)).await.unwrap();
        let started = Instant::now();
        let dispatch = tx.commit().await.unwrap();
        took.push(started.elapsed());
        assert_eq!(dispatch.eager_published, 0);
        assert_eq!(dispatch.left_to_relay, 1);
    }
    println!("commit durations with Kafka down: {took:?}");
    let deadline = Duration::from_secs(2);
    for t in &took[..2] {
        assert!(
            *t < deadline + Duration::from_secs(5),
            "bounded by the deadline, not the 30 s delivery timeout: {t:?}"
        );
    }
    for t in &took[2..] {
        assert!(
            *t < deadline,
            "circuit open, no wait for the deadline: {t:?}"
        );
    }
    assert_eq!(support::count_status(&store, "pending").await, 6);
}

/// `commit()` returns on the ack and settles in the background, with the key leased until
/// then: the next commit of the same key must wait for that settle, not find the key
/// taken and leave its event to the relay (there is none here).
#[tokio::test]
async fn back_to_back_commits_of_one_key_are_all_delivered_eagerly_in_order() {
    support::metrics();
    let brokers = support::brokers();
    let (store, items, _service, publisher) = eager_only(&brokers).await;
    let topic = support::topic(2).await;
    let collector = support::Collector::start(&brokers, &topic, 2);
    let mut committed = Vec::new();
    for _ in 0..30 {
        let mut tx = publisher.begin().await.unwrap();
        let seq = bump(&mut tx, &items, "same").await;
        let ev = support::event(&topic, "same", seq);
        tx.publish(&ev).await.unwrap();
        let dispatch = tx.commit().await.unwrap();
        assert_eq!(
            dispatch.eager_published, 1,
            "commit {seq} was left to the relay: {dispatch:?}"
        );
        committed.push(ev);
    }
    let consumed = collector
        .wait_for(&ids(&committed), Duration::from_secs(20))
        .await;
    support::assert_key_order(&consumed);
    assert_eq!(
        support::messages(&consumed),
        committed.len(),
        "no duplicates"
    );
    publisher.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        support::count_status(&store, "published").await,
        committed.len() as i64
    );
}

/// The same, with the race forced: the settles are held back (the settler's statement for
/// another key waits on a row lock) while the second commit of a key runs. The second
/// waits for its key's settle and is delivered eagerly; claiming at once would find the
/// key still leased and leave the event to the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_waits_for_the_settle_of_its_keys_earlier_dispatch() {
    support::metrics();
    let broker = support::PrivateBroker::start().await;
    let brokers = broker.brokers();
    let topic = support::topic_on(&brokers, 2).await;
    let (store, items, _service, publisher) = eager_only(&brokers).await;
    let commit = committer(&publisher, &items, &topic);
    // The producer's first ack (its id handshake) comes before the broker is paused.
    assert_eq!(commit("warm-up").await.1.eager_published, 1);
    let (_, lock) = hold_settles_back(&store, &broker, &commit).await;

    // Acked, its settle queued behind the blocked one: the key stays leased.
    assert_eq!(commit("same").await.1.eager_published, 1);
    let second = tokio::spawn(commit("same"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.rollback().await.unwrap();
    let (_, second) = second.await.unwrap();
    assert_eq!(
        second.eager_published, 1,
        "the second commit of the key was left to the relay: {second:?}"
    );
    publisher.shutdown(Duration::from_secs(10)).await;
    assert_eq!(support::count_status(&store, "published").await, 4);
}

/// Logs every change of a key's lease, in order, into the returned table.
async fn lease_log(store: &OutboxStore) -> String {
    let keys = store.table().keys();
    let schema = store.table().schema();
    let log = format!("\"{schema}\".lease_log");
    for statement in [
        format!("CREATE TABLE {log} (n BIGSERIAL, event_key TEXT, owner UUID)"),
        format!(
            "CREATE FUNCTION \"{schema}\".log_lease() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN INSERT INTO {log} (event_key, owner) VALUES (NEW.event_key, NEW.lease_owner); \
             RETURN NEW; END $$"
        ),
        format!(
            "CREATE TRIGGER log_lease AFTER INSERT OR UPDATE OF lease_owner ON {keys} \
             FOR EACH ROW EXECUTE FUNCTION \"{schema}\".log_lease()"
        ),
    ] {
        sqlx::query(&statement).execute(store.pool()).await.unwrap();
    }
    log
}

/// The owners `key` had in `log`, in order (`None`: free).
async fn lease_changes(store: &OutboxStore, log: &str, key: &str) -> Vec<Option<Uuid>> {
    sqlx::query_scalar(&format!(
        "SELECT owner FROM {log} WHERE event_key = $1 ORDER BY n"
    ))
    .bind(key)
    .fetch_all(store.pool())
    .await
    .unwrap()
}

/// A commit whose staging created a key's row leased that row to the publisher, in the
/// caller's transaction: its dispatch sends those rows as staged, with no claim statement
/// between `COMMIT` and the produce, and no relay can take the key in between. A key whose
/// row existed is claimed as before (it may hold older rows).
#[tokio::test]
async fn a_commit_sends_the_keys_it_created_without_claiming_them() {
    let brokers = support::brokers();
    let topic = support::topic(2).await;
    let collector = support::Collector::start(&brokers, &topic, 3);
    let (store, _, _, publisher) = eager_only(&brokers).await;
    let log = lease_log(&store).await;
    // An empty key row, as a finished dispatch leaves behind.
    sqlx::query(&format!(
        "INSERT INTO {} (event_key) VALUES ('old')",
        store.table().keys()
    ))
    .execute(store.pool())
    .await
    .unwrap();
    let events = [
        support::event(&topic, "new", 0),
        support::event(&topic, "old", 0),
        support::event(&topic, "new", 1),
    ];
    let mut tx = publisher.begin().await.unwrap();
    tx.publish(&events[0]).await.unwrap();
    tx.publish_all(&events[1..]).await.unwrap();
    let dispatch = tx.commit().await.unwrap();
    assert_eq!(dispatch.eager_published, 3, "{dispatch:?}");
    publisher.shutdown(Duration::from_secs(10)).await;

    let fresh = lease_changes(&store, &log, "new").await;
    assert!(
        fresh.len() == 2 && fresh[0].is_some() && fresh[1].is_none(),
        "created leased, handed back, never claimed: {fresh:?}"
    );
    let old = lease_changes(&store, &log, "old").await;
    assert!(
        old.len() == 3 && old[1] == fresh[0] && old[2].is_none(),
        "claimed by the dispatch: {old:?}"
    );
    let seen = collector
        .wait_for(&ids(&events), Duration::from_secs(30))
        .await;
    assert_same_bytes(&seen, &events);
    let new: Vec<Uuid> = seen
        .iter()
        .filter(|c| c.key == "new")
        .map(|c| c.event_id)
        .collect();
    assert_eq!(new, vec![events[0].event_id, events[2].event_id]);
    assert_eq!(support::count_status(&store, "published").await, 3);
}

/// A key leased while staging is handed back when no dispatch follows the commit (the
/// circuit opened in between): the woken relay must find it free, not wait out the lease.
#[tokio::test]
async fn keys_leased_while_staging_are_handed_back_when_the_circuit_opened_before_the_commit() {
    let store = support::store().await;
    let publisher = kafka_down(&store, Duration::from_millis(300));
    let mut waiting = publisher.begin().await.unwrap();
    waiting
        .publish(&support::event("t", "waiting", 0))
        .await
        .unwrap();
    // Two commits time out: the circuit opens (their keys stay with their dispatches).
    for seq in 0..2 {
        let mut tx = publisher.begin().await.unwrap();
        tx.publish(&support::event("t", &format!("k{seq}"), seq))
            .await
            .unwrap();
        assert_eq!(tx.commit().await.unwrap().left_to_relay, 1);
    }
    assert_eq!(waiting.commit().await.unwrap().left_to_relay, 1);
    let claimed = store
        .claim(Uuid::new_v4(), 10, 10, Duration::from_secs(5))
        .await
        .unwrap();
    let keys: Vec<&str> = claimed.iter().map(|k| k.key.as_str()).collect();
    assert!(
        keys.contains(&"waiting"),
        "free for the relay at once: {keys:?}"
    );
}

/// A commit of a key whose earlier dispatch still waits for its ack queues behind it and
/// is delivered eagerly once that one is acked and settled; the earlier dispatch keeps the
/// key for it (no hand-back in between, so a woken relay could not take the key), and
/// nothing is sent twice (the second dispatch may claim a key its own process leases only
/// because it waited its turn). A third commit queued meanwhile is sent by the second's
/// dispatch (it claims the key's next rows): it counts as delivered eagerly and claims
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_queues_behind_its_keys_dispatch_in_flight_which_keeps_the_key_for_it() {
    support::metrics();
    let broker = support::PrivateBroker::start().await;
    let brokers = broker.brokers();
    let topic = support::topic_on(&brokers, 2).await;
    let collector = support::Collector::start(&brokers, &topic, 2);
    let (store, items, service, publisher) = eager_only(&brokers).await;
    let log = lease_log(&store).await;
    let commit = committer(&publisher, &items, &topic);
    let (warm, dispatch) = commit("warm-up").await;
    assert_eq!(dispatch.eager_published, 1);

    broker.pause();
    let first = tokio::spawn(commit("k"));
    leased(&store, "k").await;
    let second = tokio::spawn(commit("k"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let third = tokio::spawn(commit("k"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    broker.resume();
    let (first_id, first) = first.await.unwrap();
    let (second_id, second) = second.await.unwrap();
    let (third_id, third) = third.await.unwrap();
    assert_eq!(first.eager_published, 1, "{first:?}");
    assert_eq!(
        second.eager_published, 1,
        "the second commit was left to the relay: {second:?}"
    );
    assert_eq!(third.eager_published, 1, "{third:?}");
    publisher.shutdown(Duration::from_secs(10)).await;
    assert_eq!(support::count_status(&store, "published").await, 4);

    let owners = lease_changes(&store, &log, "k").await;
    // Inserted leased by the first commit's staging (it created the key row, so the
    // dispatch needs no claim), handed back once, by the last dispatch: never free (for a
    // relay to take) while a later commit of the key waited.
    let (last, held) = owners.split_last().unwrap();
    assert!(
        last.is_none() && !held.is_empty() && held[0].is_some(),
        "{owners:?}"
    );
    assert!(
        held.iter().all(|o| *o == held[0]),
        "the key was handed back between two dispatches: {owners:?}"
    );

    let seen = collector
        .wait_for(
            &[warm, first_id, second_id, third_id],
            Duration::from_secs(30),
        )
        .await;
    let all = collector.read_to_end().await;
    assert_eq!(support::messages(&all), 4, "nothing sent twice: {seen:?}");
    support::assert_key_order(&all);
    assert_eq!(
        support::metric(EAGER_DISPATCH, &service, &[("result", "miss")]),
        0.0
    );
}

/// A dispatch that keeps its key for the next one, every row acked, lets that one go at
/// once: the next reads on after the rows just sent, without waiting for their settle.
/// Forced here by holding every settle back (the settler's statement for another key waits
/// on a row lock): the second commit of the key is still delivered eagerly, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_dispatch_of_a_kept_key_reads_on_without_waiting_for_the_settle() {
    let held = HeldSettles::start().await;
    let (store, broker, commit) = (&held.store, &held.broker, &held.commit);

    broker.pause();
    let first = tokio::spawn(commit("k"));
    leased(store, "k").await;
    let second = tokio::spawn(commit("k"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.resume();
    let (first_id, first) = first.await.unwrap();
    let (second_id, second) = second.await.unwrap();
    assert_eq!(first.eager_published, 1, "{first:?}");
    assert_eq!(
        second.eager_published, 1,
        "the second dispatch waited for the first one's settle: {second:?}"
    );
    held.finish(vec![first_id, second_id]).await;
}

/// A dispatch done with one of its keys lets the next dispatch of that key go while it
/// still works on its others. Every commit after the first stages `hot` and a key of its
/// own, which its dispatch hands back (no later commit of it) and holds until that settle
/// is written, which is held back here:
/// - the first dispatch keeps `hot` for the next one and must let it go on its acks;
/// - the second finds its `hot` row sent already (a dispatch reads a key's next rows, 32
///   at most: the first commit's 31 and this one) and must let the third go at once.
///
/// Before, the whole turn was held, and a hot key shared by many commits moved one
/// commit's round trips at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_lets_the_next_one_of_a_key_it_is_done_with_go_before_its_other_keys() {
    let held = HeldSettles::start().await;
    let (store, broker) = (&held.store, &held.broker);
    let stage = |keys: &'static [(&'static str, usize)]| {
        let (publisher, items, topic) = (
            held.publisher.clone(),
            held.items.clone(),
            held.topic.clone(),
        );
        tokio::spawn(async move {
            let mut tx = publisher.begin().await.unwrap();
            let mut ids = Vec::new();
            for (key, n) in keys {
                for _ in 0..*n {
                    let seq = bump(&mut tx, &items, key).await;
                    let event = support::event(&topic, key, seq);
                    tx.publish(&event).await.unwrap();
                    ids.push(event.event_id);
                }
            }
            (ids, tx.commit().await.unwrap())
        })
    };

    broker.pause();
    let zeroth = stage(&[("hot", 1)]);
    leased(store, "hot").await;
    // Each commit takes its turn right after committing; the pauses keep them in order.
    let first = stage(&[("hot", 31), ("a", 1)]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = stage(&[("hot", 1), ("b", 1)]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = stage(&[("hot", 1)]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.resume();
    let mut sent = Vec::new();
    for (n, commit) in [zeroth, first, second].into_iter().enumerate() {
        let (ids, dispatch) = commit.await.unwrap();
        assert_eq!(
            dispatch.eager_published,
            ids.len(),
            "commit {n}: {dispatch:?}"
        );
        sent.extend(ids);
    }
    let (ids, dispatch) = tokio::time::timeout(Duration::from_secs(20), third)
        .await
        .expect("the third commit returns")
        .unwrap();
    assert_eq!(
        dispatch.eager_published, 1,
        "the third dispatch waited for the second one's hand-back of `b`: {dispatch:?}"
    );
    sent.extend(ids);
    held.finish(sent).await;
}
