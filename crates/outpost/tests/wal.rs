//! WAL mode on a private PostgreSQL with `wal_level=logical` (the shared server has no
//! logical decoding): events emitted in transactions reach Kafka in commit order per key,
//! rolled-back ones never; one relay leads and another takes over; a broker paused past
//! `wal_sender_timeout` and a PostgreSQL restart lose nothing; the SQL function stages from
//! SQL alone; refused events go to the dead letters and can be requeued, NUL characters and
//! an exhausted attempt budget included (the budget and a failed session's leftovers in
//! librdkafka on its in-process mock broker); the leader's lock connection has short TCP
//! keepalives, and a leader whose lock connection stops answering leaves its session; a
//! standby whose connection hangs, and a leader whose stream never starts, connect again;
//! `doctor` fails a physical slot of the stream's name.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use outpost::testkit::postgres::PrivatePostgres;
use outpost::testkit::TansuBroker;
use outpost::wal::{self, setup, WalDeadLetters, WalRelay, WalRelayConfig, WalStream};
use outpost::{Environment, KafkaProducer, OutboxEvent, ProducerConfig};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use support::{Collector, Consumed, Partition};

/// A private PostgreSQL that can decode logical messages, and a stream initialised on it.
struct WalDb {
    pg: PrivatePostgres,
    pool: PgPool,
    stream: WalStream,
}

impl WalDb {
    async fn start(extra: &[(&'static str, &'static str)]) -> Self {
        Self::start_for(WalStream::new(&support::unique("w")).unwrap(), extra).await
    }

    /// [`Self::start`] for `stream`.
    async fn start_for(stream: WalStream, extra: &[(&'static str, &'static str)]) -> Self {
        support::init_logging();
        support::metrics();
        let mut settings = vec![("wal_level", "logical")];
        settings.extend_from_slice(extra);
        let pg = tokio::task::spawn_blocking(move || PrivatePostgres::start_with(&settings))
            .await
            .unwrap()
            .expect("a private PostgreSQL (initdb, pg_ctl) for WAL mode");
        let pool = PgPoolOptions::new()
            .max_connections(12)
            .connect(&pg.url())
            .await
            .unwrap();
        let report = setup::init(&pool, &stream).await.unwrap();
        assert!(report.is_ready(), "{report}");
        Self { pg, pool, stream }
    }

    /// A fresh topic on the shared broker, a collector reading it, and a relay of the stream
    /// (patient producer, default settings) running.
    async fn streaming(&self, partitions: i32) -> (String, Collector, WalRelay, Running) {
        self.streaming_with(partitions, |_| {}).await
    }

    /// [`Self::streaming`] with the relay's settings tuned.
    async fn streaming_with(
        &self,
        partitions: i32,
        tune: impl FnOnce(&mut WalRelayConfig),
    ) -> (String, Collector, WalRelay, Running) {
        let brokers = support::brokers();
        let topic = support::topic(partitions).await;
        let collector = Collector::start(&brokers, &topic, partitions);
        let relay = self.relay(support::patient_producer(&brokers), tune);
        let running = spawn(&relay);
        (topic, collector, relay, running)
    }

    fn relay(
        &self,
        producer: Arc<KafkaProducer>,
        tune: impl FnOnce(&mut WalRelayConfig),
    ) -> WalRelay {
        self.relay_on(self.pool.clone(), producer, tune)
    }

    /// [`Self::relay`] with `pool` for its lock, health checks and dead letters.
    fn relay_on(
        &self,
        pool: PgPool,
        producer: Arc<KafkaProducer>,
        tune: impl FnOnce(&mut WalRelayConfig),
    ) -> WalRelay {
        let mut cfg = WalRelayConfig::new(
            self.stream.name(),
            self.stream.clone(),
            self.pg.url(),
            Environment::Testing,
        );
        cfg.reconnect_backoff = Duration::from_millis(200);
        cfg.backoff.initial = Duration::from_millis(50);
        cfg.backoff.max = Duration::from_millis(500);
        tune(&mut cfg);
        WalRelay::new(cfg, pool, producer).unwrap()
    }

    /// The slot's confirmed position, as a number.
    async fn confirmed(&self) -> u64 {
        let lsn: Option<i64> = sqlx::query_scalar(
            "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(self.stream.slot())
        .fetch_one(&self.pool)
        .await
        .unwrap();
        lsn.unwrap_or(0) as u64
    }

    async fn drop_slot(&self) {
        support::eventually(Duration::from_secs(20), "the slot is released", || async {
            setup::remove(&self.pool, &self.stream).await.ok()
        })
        .await;
    }
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<outpost::Result<()>>,
}

fn spawn(relay: &WalRelay) -> Running {
    let shutdown = CancellationToken::new();
    let relay = relay.clone();
    let token = shutdown.clone();
    let task = tokio::spawn(async move { relay.run(token.cancelled_owned()).await });
    Running { shutdown, task }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the WAL relay stops within its drain timeout")
            .unwrap()
            .unwrap();
    }
}

/// An event whose payload names its key and per-key sequence number.
fn event(topic: &str, key: &str, seq: usize) -> OutboxEvent {
    support::event(topic, key, seq)
}

/// Emits events `from..from + n` round-robin over `keys` keys (event `i` is number
/// `i / keys` of key `i % keys`), `per_tx` per transaction.
async fn emit_committed(
    db: &WalDb,
    topic: &str,
    keys: usize,
    (from, n): (usize, usize),
    per_tx: usize,
) -> Vec<OutboxEvent> {
    let mut all = Vec::with_capacity(n);
    let mut i = from;
    let n = from + n;
    while i < n {
        let mut tx = db.pool.begin().await.unwrap();
        let mut batch = Vec::new();
        for _ in 0..per_tx.min(n - i) {
            batch.push(event(topic, &format!("k{}", i % keys), i / keys));
            i += 1;
        }
        wal::emit::emit_all(&mut tx, &db.stream, &batch)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        all.extend(batch);
    }
    all
}

/// Events emitted now reach `topic` complete and in order while `running` relays; then it
/// stops and the slot goes.
async fn streams_in_order(db: &WalDb, topic: &str, collector: &Collector, running: Running) {
    let all = emit_committed(db, topic, 2, (0, 6), 2).await;
    let consumed = collector
        .wait_for(&ids(&all), Duration::from_secs(30))
        .await;
    running.stop().await;
    assert_complete_and_ordered(&consumed, &all);
    db.drop_slot().await;
}

/// Waits until `relay` leads its stream.
async fn leads(relay: &WalRelay) {
    support::eventually(Duration::from_secs(20), "the relay leads", || async {
        relay.progress().leader.then_some(())
    })
    .await;
}

fn ids(events: &[OutboxEvent]) -> Vec<Uuid> {
    events.iter().map(|e| e.event_id).collect()
}

/// Every event once at least; per key, first deliveries in sequence order.
fn assert_complete_and_ordered(consumed: &[Consumed], expected: &[OutboxEvent]) {
    let seen: HashSet<Uuid> = consumed.iter().map(|c| c.event_id).collect();
    let missing = expected
        .iter()
        .filter(|e| !seen.contains(&e.event_id))
        .count();
    assert_eq!(missing, 0, "{missing} events never arrived");
    support::assert_key_order(consumed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_reach_kafka_in_commit_order_per_key_and_rolled_back_ones_never() {
    let db = WalDb::start(&[]).await;
    let (topic, collector, relay, running) = db.streaming(4).await;

    // Eight writers share six keys and lock nothing: commit order alone decides the order
    // each key's events must have. Every transaction records its id; a second slot, read
    // with PostgreSQL's own `test_decoding` plugin, gives the commit order afterwards (the
    // order of the commit records: commit timestamps are taken before the record is
    // written, and two commits a microsecond apart can carry them in the other order).
    sqlx::query("SELECT pg_create_logical_replication_slot('commit_order', 'test_decoding')")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut writers = Vec::new();
    for w in 0..8usize {
        let (pool, stream, topic) = (db.pool.clone(), db.stream.clone(), topic.clone());
        writers.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            let mut rolled_back = Vec::new();
            for i in 0..40usize {
                let mut tx = pool.begin().await.unwrap();
                let xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::xid::text")
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                let events: Vec<OutboxEvent> = (0..1 + (i % 3))
                    .map(|j| {
                        let mut e = event(&topic, &format!("k{}", (w + i + j) % 6), j);
                        e.headers.insert("xid".into(), xid.clone());
                        e
                    })
                    .collect();
                wal::emit::emit_all(&mut tx, &stream, &events)
                    .await
                    .unwrap();
                if i % 7 == 3 {
                    tx.rollback().await.unwrap();
                    rolled_back.extend(events);
                } else {
                    tx.commit().await.unwrap();
                    committed.extend(events);
                }
            }
            (committed, rolled_back)
        }));
    }
    let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
    for w in writers {
        let (c, r) = w.await.unwrap();
        committed.extend(c);
        rolled_back.extend(r);
    }
    let consumed = collector
        .wait_for(&ids(&committed), Duration::from_secs(90))
        .await;
    running.stop().await;
    let consumed = support::settled(&collector, consumed.len(), Duration::from_secs(1)).await;

    let ghosts: HashSet<Uuid> = ids(&rolled_back).into_iter().collect();
    assert!(!rolled_back.is_empty());
    assert!(
        consumed.iter().all(|c| !ghosts.contains(&c.event_id)),
        "an event of a rolled-back transaction was delivered"
    );
    let changes: Vec<String> = sqlx::query_scalar(
        "SELECT data FROM pg_logical_slot_get_changes('commit_order', NULL, NULL, \
         'include-xids', '1', 'skip-empty-xacts', '0')",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let rank: HashMap<&str, usize> = changes
        .iter()
        .filter_map(|line| line.strip_prefix("COMMIT "))
        .enumerate()
        .map(|(i, xid)| (xid.trim(), i))
        .collect();
    sqlx::query("SELECT pg_drop_replication_slot('commit_order')")
        .execute(&db.pool)
        .await
        .unwrap();
    // Per key: commit order never goes back; within a transaction, emit order.
    let mut last: BTreeMap<&str, (usize, &str, u64)> = BTreeMap::new();
    let mut first = HashSet::new();
    for c in &consumed {
        if !first.insert(c.event_id) {
            continue;
        }
        let xid = c.headers["xid"].as_str();
        let at = *rank
            .get(xid)
            .unwrap_or_else(|| panic!("transaction {xid} has no commit record"));
        let seq = support::seq(c);
        if let Some((prev_at, prev_xid, prev_seq)) = last.get(c.key.as_str()) {
            assert!(
                at > *prev_at || (xid == *prev_xid && seq > *prev_seq),
                "key {}: transaction {xid} (commit #{at}) delivered after {prev_xid} (commit #{prev_at})",
                c.key
            );
        }
        last.insert(c.key.as_str(), (at, xid, seq));
    }
    assert_eq!(first.len(), committed.len());
    assert!(relay.progress().acked_lsn > 0);
    db.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_relay_waits_and_takes_over_when_the_leader_dies() {
    let db = WalDb::start(&[]).await;
    let brokers = support::brokers();
    let topic = support::topic(2).await;
    let collector = Collector::start(&brokers, &topic, 2);
    let first = db.relay(support::patient_producer(&brokers), |_| {});
    let second = db.relay(support::patient_producer(&brokers), |_| {});
    let a = spawn(&first);
    leads(&first).await;
    let b = spawn(&second);
    let early = emit_committed(&db, &topic, 4, (0, 200), 3).await;
    collector
        .wait_for(&ids(&early), Duration::from_secs(60))
        .await;
    assert!(!second.progress().leader, "only one relay reads the slot");
    assert_eq!(second.progress().delivered, 0);
    let acked_before = db.confirmed().await;

    // The leader dies without draining (its task, connections and stream dropped); the
    // standby takes the lock and resumes at the slot's confirmed position.
    a.task.abort();
    let late = emit_committed(&db, &topic, 4, (200, 200), 3).await;
    support::eventually(
        Duration::from_secs(30),
        "the second relay leads",
        || async { second.progress().leader.then_some(()) },
    )
    .await;
    let mut all = early.clone();
    all.extend(late.iter().cloned());
    let consumed = collector
        .wait_for(&ids(&all), Duration::from_secs(60))
        .await;
    b.stop().await;
    let consumed = support::settled(&collector, consumed.len(), Duration::from_secs(1)).await;
    assert_complete_and_ordered(&consumed, &all);
    assert!(second.progress().delivered >= late.len() as u64);
    assert!(db.confirmed().await > acked_before, "the slot moved on");
    db.drop_slot().await;
}

/// What one outage run leaves behind: the relay, every event emitted, every message read
/// once the relay stopped.
struct Outage {
    db: WalDb,
    relay: WalRelay,
    emitted: Vec<OutboxEvent>,
    consumed: Vec<Consumed>,
}

/// Runs a relay on a private broker, emits 30 events, pauses the broker for `pause` while
/// `during` more are emitted (3 keys), resumes it and waits for all, then stops the relay.
async fn through_an_outage(
    db: WalDb,
    producer: impl FnOnce(&str) -> Arc<KafkaProducer>,
    tune: impl FnOnce(&mut WalRelayConfig),
    during: usize,
    pause: Duration,
) -> Outage {
    let broker = TansuBroker::start().await.unwrap();
    let brokers = broker.brokers();
    let topic = support::topic_on(&brokers, 2).await;
    let collector = Collector::start(&brokers, &topic, 2);
    let relay = db.relay(producer(&brokers), tune);
    let running = spawn(&relay);
    let before = emit_committed(&db, &topic, 3, (0, 30), 1).await;
    collector
        .wait_for(&ids(&before), Duration::from_secs(60))
        .await;

    broker.pause().unwrap();
    let later = emit_committed(&db, &topic, 3, (30, during), 3).await;
    tokio::time::sleep(pause).await;
    broker.resume().unwrap();
    let mut emitted = before.clone();
    emitted.extend(later);
    let consumed = collector
        .wait_for(&ids(&emitted), Duration::from_secs(120))
        .await;
    running.stop().await;
    let consumed = support::settled(&collector, consumed.len(), Duration::from_secs(1)).await;
    assert_complete_and_ordered(&consumed, &emitted);
    Outage {
        db,
        relay,
        emitted,
        consumed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_paused_past_wal_sender_timeout_loses_nothing_and_keeps_the_stream() {
    let db = WalDb::start(&[("wal_sender_timeout", "2s")]).await;
    let patient = |brokers: &str| {
        let mut cfg = support::producer_config(brokers);
        cfg.delivery_timeout = Duration::from_secs(30);
        cfg.request_timeout = Duration::from_secs(10);
        Arc::new(KafkaProducer::new(cfg).unwrap())
    };
    // A cap of 20 events in flight makes the relay stop reading while the broker hangs.
    let run = through_an_outage(
        db,
        patient,
        |c| c.max_in_flight = 20,
        200,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        run.relay.progress().sessions,
        1,
        "the server never timed the stream out: feedback kept flowing while the relay waited"
    );
    assert!(run.consumed.len() >= run.emitted.len());
    run.db.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sends_that_time_out_are_sent_again_in_order() {
    let db = WalDb::start(&[]).await;
    // Test settings: a send fails after 1.5 s, so a 4 s outage fails every one in flight.
    let run = through_an_outage(db, support::producer, |_| {}, 300, Duration::from_secs(4)).await;
    let service = run.db.stream.name();
    assert!(
        support::metric(outpost::metrics::EVENTS_RETRIED, service, &[]) > 0.0,
        "the outage failed sends, and they were retried"
    );
    assert_eq!(
        support::metric(outpost::metrics::ORDER_BREAKS, service, &[]),
        0.0
    );
    run.db.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_loses_nothing() {
    let db = WalDb::start(&[]).await;
    let (topic, collector, relay, running) = db.streaming(2).await;
    let before = emit_committed(&db, &topic, 3, (0, 100), 2).await;
    collector
        .wait_for(&ids(&before), Duration::from_secs(60))
        .await;

    db.pg.stop().unwrap();
    db.pg.start_again().unwrap();
    let after = support::eventually(Duration::from_secs(30), "PostgreSQL is back", || async {
        match db.pool.acquire().await {
            Ok(_) => Some(()),
            Err(_) => None,
        }
    });
    after.await;
    let after = emit_committed(&db, &topic, 3, (100, 100), 2).await;
    let mut all = before.clone();
    all.extend(after);
    let consumed = collector
        .wait_for(&ids(&all), Duration::from_secs(90))
        .await;
    assert!(relay.progress().sessions >= 2, "the relay reconnected");
    running.stop().await;
    let consumed = support::settled(&collector, consumed.len(), Duration::from_secs(1)).await;
    assert_complete_and_ordered(&consumed, &all);
    db.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_function_emits_from_sql_alone_and_an_idle_slot_still_advances() {
    let db = WalDb::start(&[]).await;
    let (topic, collector, _relay, running) = db.streaming(1).await;
    let f = db.stream.emit_function();
    let call = format!("SELECT {f}($1, $2, $3, $4::jsonb, event_type => 'essay.v1')");

    let mut tx = db.pool.begin().await.unwrap();
    let ghost: Uuid = sqlx::query_scalar(&call)
        .bind(&topic)
        .bind("k")
        .bind(b"rolled back".to_vec())
        .bind("{}")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let payload = b"\x00binary\xff{\"not\": json".to_vec();
    let mut tx = db.pool.begin().await.unwrap();
    let id: Uuid = sqlx::query_scalar(&call)
        .bind(&topic)
        .bind("k")
        .bind(&payload)
        .bind(r#"{"source": "psql"}"#)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let bad = sqlx::query(&format!("SELECT {f}('t', 'k', 'x'::bytea, '{{\"n\": 1}}')"))
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(
        bad.to_string()
            .contains("headers must be a JSON object of strings"),
        "{bad}"
    );

    let consumed = collector.wait_for(&[id], Duration::from_secs(60)).await;
    let got = consumed.iter().find(|c| c.event_id == id).unwrap();
    assert_eq!(got.payload, payload);
    assert_eq!(got.key, "k");
    assert_eq!(got.headers["source"], "psql");
    assert_eq!(got.headers["event_type"], "essay.v1");
    assert!(consumed.iter().all(|c| c.event_id != ghost));

    // WAL written by anything else (no events) must not stay retained by an idle slot.
    sqlx::query("CREATE TABLE filler AS SELECT g FROM generate_series(1, 10000) g")
        .execute(&db.pool)
        .await
        .unwrap();
    let written: i64 =
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    support::eventually(
        Duration::from_secs(30),
        "the idle slot advances",
        || async { (db.confirmed().await >= written as u64).then_some(()) },
    )
    .await;
    // The gauges say the same (refreshed every second in testing).
    let service = db.stream.name();
    support::eventually(
        Duration::from_secs(30),
        "the acknowledged-LSN gauge",
        || async {
            (support::metric(outpost::metrics::WAL_ACKED_LSN, service, &[]) >= written as f64)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        support::metric(outpost::metrics::WAL_LEADER, service, &[]),
        1.0
    );
    assert_eq!(
        support::metric(outpost::metrics::EVENTS_PUBLISHED, service, &[]),
        1.0,
        "one event published"
    );
    assert!(support::metric(outpost::metrics::WAL_RECEIVED_LSN, service, &[]) > 0.0);
    running.stop().await;
    assert_eq!(
        support::metric(outpost::metrics::WAL_LEADER, service, &[]),
        0.0
    );
    db.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_foreign_messages_are_dead_lettered_and_requeued() {
    let db = WalDb::start(&[]).await;
    let brokers = support::brokers();
    let topic = support::topic(1).await;
    let collector = Collector::start(&brokers, &topic, 1);
    let mut cfg = support::producer_config(&brokers);
    cfg.delivery_timeout = Duration::from_secs(30);
    cfg.request_timeout = Duration::from_secs(10);
    cfg.librdkafka
        .insert("message.max.bytes".into(), "20000".into());
    let relay = db.relay(Arc::new(KafkaProducer::new(cfg).unwrap()), |_| {});
    let running = spawn(&relay);

    let mut huge = event(&topic, "k", 0);
    huge.payload = vec![b'x'; 50_000];
    let after = event(&topic, "k", 1);
    let mut tx = db.pool.begin().await.unwrap();
    wal::emit(&mut tx, &db.stream, &huge).await.unwrap();
    sqlx::query("SELECT pg_logical_emit_message(true, $1, 'not an event')")
        .bind(db.stream.prefix())
        .execute(&mut *tx)
        .await
        .unwrap();
    wal::emit(&mut tx, &db.stream, &after).await.unwrap();
    tx.commit().await.unwrap();

    collector
        .wait_for(&[after.event_id], Duration::from_secs(60))
        .await;
    let dead = WalDeadLetters::new(db.pool.clone(), db.stream.clone());
    let letters = support::eventually(Duration::from_secs(20), "two dead letters", || async {
        let l = dead.list(10).await.unwrap();
        (l.len() == 2).then_some(l)
    })
    .await;
    let refused = letters
        .iter()
        .find(|l| l.class == "permanent")
        .expect("the huge event");
    assert_eq!(refused.event_id, Some(huge.event_id));
    assert_eq!(refused.payload_bytes, 50_000);
    let foreign = letters
        .iter()
        .find(|l| l.class == "undecodable")
        .expect("the foreign message");
    assert!(foreign.event_id.is_none());
    assert_eq!(relay.progress().dead, 2);

    // Requeued, it is refused again (same producer limit): it comes back as a new letter,
    // and the foreign one, which is no event, stays.
    let requeued = dead
        .requeue(&letters.iter().map(|l| l.id).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(requeued, 1);
    support::eventually(
        Duration::from_secs(20),
        "the requeued event is refused again",
        || async {
            let l = dead.list(10).await.unwrap();
            (l.len() == 2
                && l.iter()
                    .any(|x| x.id > refused.id && x.event_id == Some(huge.event_id)))
            .then_some(())
        },
    )
    .await;
    running.stop().await;
    db.drop_slot().await;
}

#[tokio::test]
async fn doctor_says_what_to_change_on_a_server_without_logical_decoding() {
    // The shared server runs with wal_level=replica.
    let pool = support::pool().await;
    let level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(&pool)
        .await
        .unwrap();
    if level == "logical" {
        return; // nothing to check on a server already set up for WAL mode
    }
    let stream = WalStream::new(&support::unique("w")).unwrap();
    let report = setup::init(&pool, &stream).await.unwrap();
    assert!(!report.is_ready());
    let text = report.to_string();
    assert!(
        text.contains("ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"),
        "{text}"
    );
    assert!(text.contains("outpost wal init"), "{text}");
    let schema_made: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(stream.name())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        !schema_made,
        "init creates nothing while the server cannot replicate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_in_wal_mode_emits_in_the_callers_transaction() {
    let db = WalDb::start(&[]).await;
    let brokers = support::brokers();
    let topic = support::topic(1).await;
    let collector = Collector::start(&brokers, &topic, 1);
    let producer = support::patient_producer(&brokers);
    let relay = db.relay(producer.clone(), |_| {});
    let running = spawn(&relay);
    // The outbox's schema names the stream; no outbox table is needed.
    let store = outpost::OutboxStore::new(
        db.pool.clone(),
        outpost::OutboxTable::new(db.stream.name()).unwrap(),
    );
    let mut config = outpost::PublisherConfig::new("wal-test", Environment::Testing);
    config.mode = outpost::Mode::Wal;
    let waker = outpost::Waker::notify(db.pool.clone(), "wal-test").unwrap();
    let publisher = outpost::Publisher::new(store, producer, waker, config).unwrap();

    let ghost = event(&topic, "k", 0);
    let mut tx = publisher.begin().await.unwrap();
    tx.publish(&ghost).await.unwrap();
    tx.rollback().await.unwrap();
    let kept = event(&topic, "k", 1);
    let mut tx = publisher.begin().await.unwrap();
    sqlx::query("CREATE TABLE business (n int)")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.publish(&kept).await.unwrap();
    let dispatch = tx.commit().await.unwrap();
    assert_eq!(dispatch.eager_published, 0);
    assert_eq!(dispatch.left_to_relay, 1);

    let consumed = collector
        .wait_for(&[kept.event_id], Duration::from_secs(60))
        .await;
    let got = consumed
        .iter()
        .find(|c| c.event_id == kept.event_id)
        .unwrap();
    assert_eq!(got.payload, kept.payload);
    running.stop().await;
    let consumed = support::settled(&collector, consumed.len(), Duration::from_secs(1)).await;
    assert!(consumed.iter().all(|c| c.event_id != ghost.event_id));
    db.drop_slot().await;
}

#[tokio::test]
async fn doctor_fails_a_physical_slot_holding_the_streams_name() {
    // A physical slot needs no logical decoding: the shared server will do.
    let pool = support::pool().await;
    let stream = WalStream::new(&support::unique("w")).unwrap();
    sqlx::query("SELECT pg_create_physical_replication_slot($1)")
        .bind(stream.slot())
        .execute(&pool)
        .await
        .unwrap();
    // In a task of its own, so the slot is dropped even if it panics.
    let report = tokio::spawn({
        let (pool, stream) = (pool.clone(), stream.clone());
        async move { setup::doctor(&pool, &stream).await }
    })
    .await;
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(stream.slot())
        .execute(&pool)
        .await
        .unwrap();
    let report = report.expect("doctor does not panic").unwrap();
    let slot = report.checks.iter().find(|c| c.name == "slot").unwrap();
    assert_eq!(slot.verdict, setup::Verdict::Fail, "{report}");
    assert!(slot.found.contains("a physical slot"), "{report}");
    assert!(
        slot.fix
            .as_deref()
            .is_some_and(|f| f.contains("belongs to something else")),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_with_nul_characters_are_dead_lettered_and_the_stream_moves_on() {
    let db = WalDb::start(&[]).await;
    let (topic, collector, relay, running) = db.streaming(1).await;

    // An event id with a NUL: not an event, and the parse error quotes the character.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(
        "SELECT pg_logical_emit_message(true, $1, \
           convert_to($2, 'UTF8') || '\\x00'::bytea || 'payload'::bytea)",
    )
    .bind(db.stream.prefix())
    .bind(format!(
        r#"{{"id": "0\u0000", "topic": "{topic}", "key": "k"}}"#
    ))
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // A topic with a NUL (librdkafka refuses it before queueing), a key and headers too.
    let mut nul = event(&topic, "k\0ey", 0);
    nul.topic = format!("{topic}\0x");
    nul.headers.insert("h\0".into(), "v\0".into());
    let after = event(&topic, "k", 1);
    let mut tx = db.pool.begin().await.unwrap();
    wal::emit(&mut tx, &db.stream, &nul).await.unwrap();
    wal::emit(&mut tx, &db.stream, &after).await.unwrap();
    tx.commit().await.unwrap();

    let started = std::time::Instant::now();
    let consumed = collector
        .wait_for(&[after.event_id], Duration::from_secs(30))
        .await;
    tracing::info!(elapsed = ?started.elapsed(), "the event behind them arrived");
    assert!(consumed.iter().all(|c| c.event_id != nul.event_id));
    let dead = WalDeadLetters::new(db.pool.clone(), db.stream.clone());
    let letters = dead.list(10).await.unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    let foreign = letters.iter().find(|l| l.class == "undecodable").unwrap();
    assert!(foreign.reason.contains('\u{FFFD}'), "{foreign:?}");
    let refused = letters.iter().find(|l| l.class == "permanent").unwrap();
    assert_eq!(refused.event_id, Some(nul.event_id));
    assert_eq!(refused.topic, Some(format!("{topic}\u{FFFD}x")));
    assert_eq!(refused.event_key.as_deref(), Some("k\u{FFFD}ey"));
    assert!(refused.reason.contains("U+FFFD"), "{refused:?}");
    assert_eq!(relay.progress().dead, 2);
    assert_eq!(relay.progress().sessions, 1, "no session failed");
    running.stop().await;
    db.drop_slot().await;
}

/// A topic of its own on librdkafka's in-process mock broker, for faults tansu cannot
/// inject.
fn mock_cluster() -> (MockCluster<'static, DefaultProducerContext>, String) {
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = support::unique("outpost.mock").replace('_', ".");
    mock.create_topic(&topic, 1, 1).expect("mock topic");
    (mock, topic)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unclassified_failure_is_dead_lettered_after_the_attempt_budget() {
    let db = WalDb::start(&[]).await;
    let (mock, topic) = mock_cluster();
    let collector = Collector::start(&mock.bootstrap_servers(), &topic, 1);
    let relay = db.relay(support::producer(&mock.bootstrap_servers()), |c| {
        c.max_attempts = 3;
    });
    let running = spawn(&relay);

    // UNKNOWN_SERVER_ERROR, which librdkafka hands straight to the application, as often
    // as the budget allows: without a budget the fourth attempt would deliver it.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN; 3],
    );
    let doomed = event(&topic, "k", 0);
    let mut tx = db.pool.begin().await.unwrap();
    wal::emit(&mut tx, &db.stream, &doomed).await.unwrap();
    tx.commit().await.unwrap();
    let dead = WalDeadLetters::new(db.pool.clone(), db.stream.clone());
    let letters = support::eventually(Duration::from_secs(20), "a dead letter", || async {
        let l = dead.list(10).await.unwrap();
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].event_id, Some(doomed.event_id));
    assert_eq!(letters[0].class, "retriable");
    assert!(letters[0].reason.contains("failed 3 times"), "{letters:?}");

    let after = event(&topic, "k", 1);
    let mut tx = db.pool.begin().await.unwrap();
    wal::emit(&mut tx, &db.stream, &after).await.unwrap();
    tx.commit().await.unwrap();
    let consumed = collector
        .wait_for(&[after.event_id], Duration::from_secs(20))
        .await;
    assert!(consumed.iter().all(|c| c.event_id != doomed.event_id));
    running.stop().await;
    db.drop_slot().await;
}

/// The producer may be shared (`outpost wal relay` runs every service's relay on one), and
/// another user's failure can replace its instance while this relay's message of a key is
/// still out on the old one: the key's next messages wait for it, and do not race it from
/// the new instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_replaced_by_another_user_reorders_no_key() {
    let db = WalDb::start(&[]).await;
    let mock = MockCluster::new(2).expect("mock cluster");
    let brokers = mock.bootstrap_servers();
    let (topic, other) = (
        support::unique("outpost.mock").replace('_', "."),
        support::unique("outpost.mock").replace('_', "."),
    );
    for (t, leader) in [(&topic, 1), (&other, 2)] {
        mock.create_topic(t, 1, 1).expect("mock topic");
        mock.partition_leader(t, 0, Some(leader)).expect("leader");
    }
    let collector = Collector::start(&brokers, &topic, 1);
    let mut cfg = support::producer_config(&brokers);
    // Past the late answers below; the fenced instance's message times out after it.
    cfg.delivery_timeout = Duration::from_secs(6);
    cfg.request_timeout = Duration::from_secs(4);
    let producer = Arc::new(KafkaProducer::new(cfg).unwrap());
    let relay = db.relay(Arc::clone(&producer), |_| {});
    let running = spawn(&relay);
    let warm = emit_committed(&db, &topic, 1, (0, 1), 1).await;
    collector
        .wait_for(&ids(&warm), Duration::from_secs(20))
        .await;
    let no_headers = BTreeMap::new();
    producer
        .send(&other, "x", b"warm", &no_headers)
        .await
        .unwrap();

    // The key's next event is refused once, retriably, and answered late: librdkafka sends it
    // again on its instance a moment later.
    mock.broker_round_trip_time(1, Duration::from_millis(1500))
        .unwrap();
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS],
    );
    let mut all = warm;
    let read = wal_position(&db.pool).await;
    all.extend(emit_committed(&db, &topic, 1, (1, 1), 1).await);
    support::eventually(Duration::from_secs(20), "the relay read it", || async {
        (relay.progress().received_lsn > read).then_some(())
    })
    .await;
    // Meanwhile another user of the producer is fenced, and the instance replaced. (Should
    // the refusal above not have reached the relay's request first, its send takes it and
    // this test checks less, not wrongly.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    let _ = producer.send(&other, "x", b"fenced", &no_headers).await;
    all.extend(emit_committed(&db, &topic, 1, (2, 5), 1).await);
    let consumed = collector
        .wait_for(&ids(&all), Duration::from_secs(60))
        .await;
    running.stop().await;
    assert_complete_and_ordered(&consumed, &all);
    db.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_session_purges_its_unsent_messages_before_giving_up_the_lead() {
    let db = WalDb::start(&[]).await;
    let (mock, topic) = mock_cluster();
    let brokers = mock.bootstrap_servers();
    let collector = Collector::start(&brokers, &topic, 1);
    let mut cfg = support::producer_config(&brokers);
    // Long enough that nothing queued during the outage below times out.
    cfg.delivery_timeout = Duration::from_secs(30);
    cfg.request_timeout = Duration::from_secs(10);
    let relay = db.relay(Arc::new(KafkaProducer::new(cfg).unwrap()), |_| {});
    let running = spawn(&relay);
    // Warm up: the producer knows the topic before the outage.
    let warm = emit_committed(&db, &topic, 1, (0, 1), 1).await;
    collector
        .wait_for(&ids(&warm), Duration::from_secs(20))
        .await;

    mock.broker_down(-1).unwrap();
    let mut queued = emit_committed(&db, &topic, 1, (1, 2), 2).await;
    let first_read: i64 =
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    // A transaction after them: once the relay read it, it has queued the two before.
    queued.extend(emit_committed(&db, &topic, 1, (3, 1), 1).await);
    support::eventually(Duration::from_secs(20), "the relay read them", || async {
        (relay.progress().received_lsn >= first_read as u64).then_some(())
    })
    .await;
    // The stream fails while they wait in librdkafka's queue.
    sqlx::query(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(db.stream.slot())
    .execute(&db.pool)
    .await
    .unwrap();
    support::eventually(Duration::from_secs(40), "a second session", || async {
        (relay.progress().sessions >= 2).then_some(())
    })
    .await;

    mock.broker_up(-1).unwrap();
    let consumed = collector
        .wait_for(&ids(&queued), Duration::from_secs(30))
        .await;
    running.stop().await;
    let consumed = support::settled(&collector, consumed.len(), Duration::from_secs(2)).await;
    // The first session's messages were purged, not left to land beside the second's.
    for e in &queued {
        let times = consumed.iter().filter(|c| c.event_id == e.event_id).count();
        assert_eq!(times, 1, "event {} delivered {times} times", e.event_id);
    }
    support::assert_key_order(&consumed);
    db.drop_slot().await;
}

/// The kernel's keepalive timer on the server's end of the leader's lock connection, in
/// seconds: `/proc/net/tcp*` lists it as timer 2 with its expiry in hundredths.
#[cfg(target_os = "linux")]
fn keepalive_due_in(server_port: u16, client_port: u16) -> Option<f64> {
    let ends = (format!(":{server_port:04X}"), format!(":{client_port:04X}"));
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|file| {
        let table = std::fs::read_to_string(file).ok()?;
        table.lines().skip(1).find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if !(f[1].ends_with(&ends.0) && f[2].ends_with(&ends.1)) {
                return None;
            }
            let (timer, due) = f[5].split_once(':')?;
            (timer == "02").then(|| u64::from_str_radix(due, 16).ok().map(|d| d as f64 / 100.0))?
        })
    })
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_lock_connection_has_short_tcp_keepalives() {
    let db = WalDb::start(&[]).await;
    let relay = db.relay(support::patient_producer(&support::brokers()), |_| {});
    let running = spawn(&relay);
    leads(&relay).await;
    let (server_port, client_port): (i32, i32) = sqlx::query_as(
        "SELECT inet_server_port(), a.client_port FROM pg_locks l \
         JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' AND l.granted",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let ports = (
        u16::try_from(server_port).unwrap(),
        u16::try_from(client_port).unwrap(),
    );
    // With the OS default the timer runs two hours; the health query's traffic can hide
    // it behind the retransmission timer for a moment.
    let due = support::eventually(Duration::from_secs(10), "a keepalive timer", || async {
        keepalive_due_in(ports.0, ports.1)
    })
    .await;
    assert!(
        due <= 10.5,
        "the server probes the leader after {due} s of silence"
    );
    running.stop().await;
    db.drop_slot().await;
}

/// The leader's lock connection stops answering (its health check waits behind a lock on the
/// view it reads, as it would behind a hung server or network): the leader leaves its session
/// once the check times out, and leads again when the connection answers, losing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lock_connection_stops_answering_leaves_its_session() {
    let db = WalDb::start(&[]).await;
    let (topic, collector, relay, running) = db.streaming(1).await;
    leads(&relay).await;
    let mut all = emit_committed(&db, &topic, 1, (0, 3), 1).await;
    collector
        .wait_for(&ids(&all), Duration::from_secs(30))
        .await;

    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE pg_catalog.pg_replication_slots IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    // Checked every second in testing, given up on after 10 s. The old backend keeps the
    // leader lock while its check waits, so the relay cannot lead again meanwhile.
    support::eventually(
        Duration::from_secs(40),
        "the leader leaves its session",
        || async { (!relay.progress().leader).then_some(()) },
    )
    .await;
    assert_eq!(relay.progress().sessions, 1);
    blocker.rollback().await.unwrap();
    support::eventually(Duration::from_secs(30), "the relay leads again", || async {
        let p = relay.progress();
        (p.leader && p.sessions >= 2).then_some(())
    })
    .await;
    all.extend(emit_committed(&db, &topic, 1, (3, 3), 1).await);
    let consumed = collector
        .wait_for(&ids(&all), Duration::from_secs(30))
        .await;
    running.stop().await;
    assert_complete_and_ordered(&consumed, &all);
    db.drop_slot().await;
}

/// The private PostgreSQL's URL through `proxy`.
fn postgres_url(proxy: &Partition) -> String {
    format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port())
}

/// A standby relay reaching the database through `proxy` (lock, slot health and stream).
fn standby_through(db: &WalDb, proxy: &Partition) -> WalRelay {
    let url = postgres_url(proxy);
    let mut cfg = WalRelayConfig::new(
        db.stream.name(),
        db.stream.clone(),
        url.clone(),
        Environment::Testing,
    );
    cfg.reconnect_backoff = Duration::from_millis(200);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_lazy(&url)
        .unwrap();
    WalRelay::new(cfg, pool, support::patient_producer(&support::brokers())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_whose_connection_stops_answering_connects_again_and_takes_over() {
    let db = WalDb::start(&[]).await;
    let (topic, collector, leader, running) = db.streaming(1).await;
    leads(&leader).await;
    let proxy = Partition::start(db.pg.port()).await;
    let standby = standby_through(&db, &proxy);
    let standing_by = spawn(&standby);
    support::eventually(
        Duration::from_secs(20),
        "the standby polls for the lead",
        || async {
            let polling: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE client_port = ANY($1) \
                 AND query LIKE '%pg_try_advisory_lock%'",
            )
            .bind(proxy.upstream_ports())
            .fetch_one(&db.pool)
            .await
            .unwrap();
            (polling > 0).then_some(())
        },
    )
    .await;
    let before = proxy.accepted();
    // Its connection goes silent, and so does the server for new ones: then the leader goes.
    proxy.hold_new(true);
    proxy.freeze();
    running.stop().await;
    // Given up on after 10 s, without an answer: it connects again, and that connect hangs.
    support::eventually(
        Duration::from_secs(40),
        "the standby connects again",
        || async { (proxy.accepted() > before).then_some(()) },
    )
    .await;
    proxy.hold_new(false);
    // The hung connect is given up on too; the next one gets through.
    support::eventually(Duration::from_secs(40), "the standby leads", || async {
        standby.progress().leader.then_some(())
    })
    .await;
    streams_in_order(&db, &topic, &collector, standing_by).await;
}

/// The server's current WAL position, as a number.
async fn wal_position(pool: &PgPool) -> u64 {
    let lsn: i64 =
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
            .fetch_one(pool)
            .await
            .unwrap();
    lsn as u64
}

/// A relay that outlives its database's history (a failover to a standby that was behind, a
/// restore, another cluster behind the same address) delivers the events committed there,
/// though their positions are below those it delivered before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_database_is_replaced_by_one_further_behind_delivers_its_events() {
    let first = WalDb::start(&[]).await;
    // Set up as `outpost wal init` would be there after a failover that lost the slot.
    let second = WalDb::start_for(first.stream.clone(), &[]).await;
    // The first server's WAL well ahead of the second's: each switch moves it a segment on.
    sqlx::query("CREATE TABLE filler (n int)")
        .execute(&first.pool)
        .await
        .unwrap();
    for _ in 0..4 {
        sqlx::query("INSERT INTO filler VALUES (1)")
            .execute(&first.pool)
            .await
            .unwrap();
        sqlx::query("SELECT pg_switch_wal()")
            .execute(&first.pool)
            .await
            .unwrap();
    }
    let proxy = Partition::start(first.pg.port()).await;
    let relay = standby_through(&first, &proxy);
    let running = spawn(&relay);
    leads(&relay).await;
    let topic = support::topic(1).await;
    let collector = Collector::start(&support::brokers(), &topic, 1);
    let before = emit_committed(&first, &topic, 1, (0, 3), 1).await;
    collector
        .wait_for(&ids(&before), Duration::from_secs(30))
        .await;
    let behind = wal_position(&second.pool).await + 4 * 1024 * 1024;
    support::eventually(Duration::from_secs(20), "the relay acks them", || async {
        (relay.progress().acked_lsn > behind).then_some(())
    })
    .await;

    proxy.retarget(second.pg.port());
    proxy.close_all();
    let after = emit_committed(&second, &topic, 1, (3, 3), 1).await;
    assert!(wal_position(&second.pool).await < behind);
    let consumed = collector
        .wait_for(&ids(&after), Duration::from_secs(30))
        .await;
    running.stop().await;
    let all: Vec<OutboxEvent> = before.into_iter().chain(after).collect();
    assert_complete_and_ordered(&consumed, &all);
    first.drop_slot().await;
    second.drop_slot().await;
}

/// A relay whose stream reaches the server directly, and its lock, health checks and dead
/// letters through `proxy` (the pool waits ten minutes for a connection).
fn pool_through(
    db: &WalDb,
    proxy: &Partition,
    producer: ProducerConfig,
    tune: impl FnOnce(&mut WalRelayConfig),
) -> WalRelay {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(600))
        .connect_lazy(&postgres_url(proxy))
        .unwrap();
    db.relay_on(pool, Arc::new(KafkaProducer::new(producer).unwrap()), tune)
}

/// A session that fails while draining for a shutdown ends the relay: it took the shutdown
/// already, and reconnected for good, never to see it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_failing_while_it_drains_for_a_shutdown_ends_the_relay() {
    let db = WalDb::start(&[]).await;
    let proxy = Partition::start(db.pg.port()).await;
    let (mock, topic) = mock_cluster();
    let mut producer = support::producer_config(&mock.bootstrap_servers());
    // The event stays out through the drain.
    producer.delivery_timeout = Duration::from_secs(60);
    let relay = pool_through(&db, &proxy, producer, |c| {
        c.drain_timeout = Duration::from_secs(50);
        c.health_interval = Duration::from_millis(500);
    });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let (relay, token) = (relay.clone(), shutdown.clone());
        async move { relay.run(token.cancelled_owned()).await }
    });
    leads(&relay).await;
    let warm = emit_committed(&db, &topic, 1, (0, 1), 1).await;
    support::eventually(Duration::from_secs(20), "delivered", || async {
        (relay.progress().delivered == warm.len() as u64).then_some(())
    })
    .await;
    mock.broker_down(-1).unwrap();
    let read = wal_position(&db.pool).await;
    emit_committed(&db, &topic, 1, (1, 1), 1).await;
    support::eventually(Duration::from_secs(20), "the relay read it", || async {
        (relay.progress().received_lsn > read).then_some(())
    })
    .await;
    shutdown.cancel();
    // Draining, its health check goes unanswered: the session fails.
    proxy.hold_new(true);
    proxy.cut_off().await;
    tokio::time::timeout(Duration::from_secs(45), task)
        .await
        .expect("the relay ends")
        .unwrap()
        .unwrap();
    proxy.hold_new(false);
    mock.broker_up(-1).unwrap();
    db.drop_slot().await;
}

/// A dead letter written on a connection that stopped answering is given up on: the
/// session ends, and the relay still stops when asked (it waited for the pool's acquire
/// timeout, ten minutes here, then tried the event again, and so on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_database_does_not_answer_holds_up_no_shutdown() {
    let db = WalDb::start(&[]).await;
    let proxy = Partition::start(db.pg.port()).await;
    let (mock, topic) = mock_cluster();
    let mut producer = support::producer_config(&mock.bootstrap_servers());
    // Refused before it is sent, for good: the event goes to the dead letters.
    producer
        .librdkafka
        .insert("message.max.bytes".into(), "2000".into());
    // No health check after the first: one going unanswered before the event is read would
    // end the session there, and the next could not start (its lock waits on the proxy).
    let relay = pool_through(&db, &proxy, producer, |c| {
        c.health_interval = Duration::from_secs(3600);
    });
    let running = spawn(&relay);
    leads(&relay).await;
    proxy.hold_new(true);
    proxy.cut_off().await;
    let mut big = event(&topic, "k", 0);
    big.payload = format!("{{\"pad\":\"{}\"}}", "x".repeat(5000)).into_bytes();
    let read = wal_position(&db.pool).await;
    let mut tx = db.pool.begin().await.unwrap();
    wal::emit(&mut tx, &db.stream, &big).await.unwrap();
    tx.commit().await.unwrap();
    support::eventually(Duration::from_secs(20), "the relay read it", || async {
        (relay.progress().received_lsn > read).then_some(())
    })
    .await;
    // Refused at once; its dead letter waits on the proxy now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopping = std::time::Instant::now();
    running.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(45),
        "stopped after {:?}",
        stopping.elapsed()
    );
    proxy.hold_new(false);
    db.drop_slot().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_replication_connection_never_starts_gives_the_lead_up_and_tries_again() {
    let db = WalDb::start(&[]).await;
    // The lock through the database itself, the stream through a server that never answers.
    let proxy = Partition::start(db.pg.port()).await;
    proxy.hold_new(true);
    let (topic, collector, relay, running) = db
        .streaming_with(1, |cfg| cfg.database_url = postgres_url(&proxy))
        .await;
    support::eventually(Duration::from_secs(20), "the relay leads", || async {
        (relay.progress().leader && proxy.accepted() == 1).then_some(())
    })
    .await;
    // Given up on after 20 s: the lock goes back (another relay could take the lead) and
    // it tries again.
    support::eventually(
        Duration::from_secs(90),
        "the relay gives the lead up and opens the stream again, twice",
        || async { (proxy.accepted() >= 3).then_some(()) },
    )
    .await;
    assert_eq!(relay.progress().sessions, 0, "no session started");
    // The attempts given up on left no connection behind.
    support::eventually(
        Duration::from_secs(10),
        "one replication connection open",
        || async { (proxy.open() <= 1).then_some(()) },
    )
    .await;
    proxy.hold_new(false);
    support::eventually(Duration::from_secs(60), "a session starts", || async {
        (relay.progress().sessions >= 1).then_some(())
    })
    .await;
    streams_in_order(&db, &topic, &collector, running).await;
}
