//! The relay against real PostgreSQL, Redis and the tansu broker on 127.0.0.1.

mod support;

use std::collections::HashMap;

use std::time::{Duration, Instant};

use outpost::{OutboxStore, Relay, WakeSignal, Waker};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use support::spawn;

#[tokio::test]
async fn committed_events_arrive_byte_for_byte_and_rolled_back_ones_never() {
    support::metrics();
    let brokers = support::brokers();
    let store = support::store().await;
    let topic = support::topic(2).await;
    let collector = support::Collector::start(&brokers, &topic, 2);
    let service = support::unique("svc");

    let ghost = support::event(&topic, "k", 0);
    let mut tx = store.pool().begin().await.unwrap();
    store.stage(&mut tx, &ghost).await.unwrap();
    tx.rollback().await.unwrap();
    let staged = support::stage_committed(&store, &topic, 3, 30).await;

    let relay = default_relay(&store, &brokers, &service);
    let running = spawn(relay);
    let ids: Vec<Uuid> = staged.iter().map(|e| e.event_id).collect();
    collector.wait_for(&ids, Duration::from_secs(30)).await;
    running.stop().await;
    let consumed = collector.read_to_end().await;

    let by_id: HashMap<Uuid, &outpost::OutboxEvent> =
        staged.iter().map(|e| (e.event_id, e)).collect();
    for c in &consumed {
        assert_ne!(
            c.event_id, ghost.event_id,
            "rolled-back event was published"
        );
        let original = by_id[&c.event_id];
        assert_eq!(c.payload, original.payload, "bytes differ");
        assert_eq!(c.key, original.event_key);
        assert_eq!(c.headers, original.headers, "headers differ");
        let envelope: serde_json::Value = serde_json::from_slice(&c.payload).unwrap();
        assert_eq!(envelope["event_id"], c.event_id.to_string());
    }
    assert_eq!(
        support::messages(&consumed),
        30,
        "no duplicates in a fault-free run"
    );
    support::assert_key_order(&consumed);
    assert_eq!(support::count_status(&store, "published").await, 30);

    // Metrics are truthful: every publish counted, the backlog drained to zero.
    assert_eq!(
        support::metric(outpost::metrics::EVENTS_PUBLISHED, &service, &[]),
        30.0
    );
    assert_eq!(
        support::metric(outpost::metrics::PUBLISH_LATENCY, &service, &[]),
        30.0
    );
    assert_eq!(
        support::metric(outpost::metrics::BACKLOG, &service, &[]),
        0.0
    );
    assert_eq!(
        support::metric(outpost::metrics::OLDEST_PENDING, &service, &[]),
        0.0
    );
}

#[tokio::test]
async fn three_relays_deliver_each_event_once_in_key_order() {
    let brokers = support::brokers();
    let store = support::store().await;
    let topic = support::topic(4).await;
    let collector = support::Collector::start(&brokers, &topic, 4);
    let signal = WakeSignal::new();
    let mut relays = Vec::new();
    for _ in 0..3 {
        let mut cfg = support::patient_relay_config(&support::unique("svc"));
        cfg.batch_size = 7; // small batches so the relays interleave
        cfg.per_key = 3;
        let relay = Relay::new(store.clone(), support::patient_producer(&brokers), cfg)
            .unwrap()
            .with_wake_signal(signal.clone());
        relays.push(spawn(relay));
    }
    let staged = support::stage_committed(&store, &topic, 20, 600).await;
    let ids: Vec<Uuid> = staged.iter().map(|e| e.event_id).collect();
    if let Err(missing) = collector.try_wait_for(&ids, Duration::from_secs(60)).await {
        // Say which side lost track: rows still pending point at the relays, rows marked
        // published but never read point at the broker or the collector.
        let watermarks = {
            use rdkafka::consumer::Consumer;
            let probe: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .unwrap();
            (0..4)
                .map(|p| probe.fetch_watermarks(&topic, p, Duration::from_secs(5)))
                .collect::<Vec<_>>()
        };
        let snapshot = collector.snapshot();
        let mut read: Vec<(i32, i64)> = snapshot.iter().map(|c| (c.partition, c.offset)).collect();
        read.sort_unstable();
        panic!(
            "{missing} of 600 events not consumed within 60 s; broker watermarks {watermarks:?}; \
             collector read {} messages ({:?} first/last); table: {} pending, {} published, {} dead",
            read.len(),
            (read.first(), read.last()),
            support::count_status(&store, "pending").await,
            support::count_status(&store, "published").await,
            support::count_status(&store, "dead").await,
        );
    }
    for r in relays {
        r.stop().await;
    }
    // Counted from what was read: tansu's high watermarks undercount batched records.
    let consumed = collector.read_to_end().await;
    let distinct: std::collections::HashSet<Uuid> = consumed.iter().map(|c| c.event_id).collect();
    assert_eq!(distinct.len(), 600);
    if support::messages(&consumed) != 600 {
        // Which copies, how far apart, and what the table says of them: a lease that ran
        // out while its relay was still sending shows as attempts > 1.
        let mut copies: HashMap<Uuid, Vec<&support::Consumed>> = HashMap::new();
        for c in &consumed {
            copies.entry(c.event_id).or_default().push(c);
        }
        let mut twice = Vec::new();
        for (id, cs) in copies
            .iter()
            .filter(|(_, cs)| support::messages(cs.iter().copied()) > 1)
        {
            let row: (i32, Option<i32>, Option<i64>) = sqlx::query_as(&format!(
                "SELECT attempts, kafka_partition, kafka_offset FROM {} WHERE event_id = $1",
                store.table()
            ))
            .bind(id)
            .fetch_one(store.pool())
            .await
            .unwrap();
            let first = cs[0].at;
            let at: Vec<_> = cs
                .iter()
                .map(|c| (c.partition, c.offset, c.at.duration_since(first)))
                .collect();
            twice.push(format!(
                "{id}: row (attempts, partition, offset) {row:?}; read (partition, offset, \
                 after the first) {at:?}"
            ));
        }
        panic!(
            "an event was delivered twice: {} messages for 600 events; {twice:#?}",
            support::messages(&consumed)
        );
    }
    support::assert_key_order(&consumed);
}

async fn wait_until_listening(store: &OutboxStore, channel: &str) {
    let pattern = format!("LISTEN \"{channel}\"%");
    support::eventually(Duration::from_secs(10), "relay is LISTENing", || {
        let pool = store.pool().clone();
        let pattern = pattern.clone();
        async move {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1")
                    .bind(pattern)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            (n > 0).then_some(())
        }
    })
    .await;
}

/// How long the relay in the wake-up tests idles between polls: far longer than
/// [`WOKEN_WITHIN`], so only a wake-up can deliver in time however loaded the machine.
const IDLE: Duration = Duration::from_secs(60);
/// The bound on staged→consumed with a wake-up: below the production poll interval (5 s),
/// and far above the tens of milliseconds it takes on an idle machine.
const WOKEN_WITHIN: Duration = Duration::from_secs(4);

/// A relay idling at [`IDLE`] is woken by a hint after commit; the slowest of the
/// staged→consumed latencies after the first.
async fn wake_up_latency(via_redis: bool) -> Duration {
    support::metrics();
    let (brokers, store, topic, collector, service) = one_partition().await;
    let mut cfg = support::relay_config(&service);
    cfg.poll.min_interval = IDLE;
    cfg.poll.max_interval = IDLE;
    let signal = WakeSignal::new();
    let listeners = CancellationToken::new();
    let waker = if via_redis {
        signal
            .listen_redis(&support::redis_url(), &service, listeners.clone())
            .unwrap();
        Waker::redis(&support::redis_url(), &service).await.unwrap()
    } else {
        signal
            .listen_notify(store.pool().clone(), &service, listeners.clone())
            .unwrap();
        wait_until_listening(&store, &outpost::wake_key(&service)).await;
        Waker::notify(store.pool().clone(), &service).unwrap()
    };
    let relay = Relay::new(store.clone(), support::producer(&brokers), cfg)
        .unwrap()
        .with_wake_signal(signal);
    let running = spawn(relay);

    // First event warms the producer up (an idempotent producer's first send waits for
    // its producer id); the relay then idles for a minute.
    let mut latencies = Vec::new();
    for seq in 0..3 {
        let ev = support::event(&topic, "k", seq);
        let started = Instant::now();
        let mut tx = store.pool().begin().await.unwrap();
        store.stage(&mut tx, &ev).await.unwrap();
        tx.commit().await.unwrap();
        waker.nudge().await;
        collector.wait_for(&[ev.event_id], WOKEN_WITHIN).await;
        latencies.push(started.elapsed());
    }
    running.stop().await;
    listeners.cancel();
    // Each timed hint is timed once, by the claim that followed it.
    let source = if via_redis { "redis" } else { "notify" };
    assert_eq!(
        support::metric(
            outpost::metrics::WAKEUP_LATENCY,
            &service,
            &[("source", source)]
        ),
        3.0,
        "hint sent → claimed samples"
    );
    latencies[1..].iter().max().copied().unwrap()
}

#[tokio::test]
async fn redis_wake_up_beats_the_production_poll_interval() {
    let latency = wake_up_latency(true).await;
    println!("redis wake-up: staged→consumed {latency:?} with a {IDLE:?} poll interval");
    assert!(latency < WOKEN_WITHIN, "{latency:?}");
}

#[tokio::test]
async fn notify_wake_up_beats_the_production_poll_interval() {
    let latency = wake_up_latency(false).await;
    println!("NOTIFY wake-up: staged→consumed {latency:?} with a {IDLE:?} poll interval");
    assert!(latency < WOKEN_WITHIN, "{latency:?}");
}

#[tokio::test]
async fn oversized_events_are_parked_once_and_do_not_block_a_good_one() {
    support::metrics();
    let brokers = support::brokers();
    let store = support::store().await;
    let topic = support::topic(2).await;
    let collector = support::Collector::start(&brokers, &topic, 2);
    let service = support::unique("svc");
    let big = "x".repeat(30_000);
    let mut tx = store.pool().begin().await.unwrap();
    for i in 0..150 {
        let key = format!("k{}", i % 5);
        let env = outpost::EventEnvelope::new(
            "t.v1",
            "tests",
            serde_json::json!({ "key": key, "seq": i, "pad": big }),
        );
        let ev =
            outpost::OutboxEvent::from_envelope(&env, &topic, outpost::Aggregate::new("t", &key))
                .unwrap();
        store.stage(&mut tx, &ev).await.unwrap();
    }
    let good = support::event(&topic, "k0", 1000);
    store.stage(&mut tx, &good).await.unwrap();
    tx.commit().await.unwrap();

    let mut producer_cfg = support::producer_config(&brokers);
    producer_cfg
        .librdkafka
        .insert("message.max.bytes".into(), "20000".into());
    let producer = std::sync::Arc::new(outpost::KafkaProducer::new(producer_cfg).unwrap());
    let relay = Relay::new(store.clone(), producer, support::relay_config(&service)).unwrap();
    let running = spawn(relay);
    collector
        .wait_for(&[good.event_id], Duration::from_secs(20))
        .await;
    support::eventually(Duration::from_secs(10), "all bad events parked", || {
        let store = store.clone();
        async move { (support::count_status(&store, "dead").await == 150).then_some(()) }
    })
    .await;
    running.stop().await;

    let rows = parked(&store).await;
    assert_eq!(rows.len(), 150);
    for (_, attempts, error) in rows {
        assert_eq!(attempts, 1, "parked after one attempt");
        assert!(error.contains("MessageSizeTooLarge"), "{error}");
    }
    assert_eq!(
        support::metric(outpost::metrics::EVENTS_PARKED, &service, &[]),
        150.0
    );
    assert_eq!(
        collector.snapshot().len(),
        1,
        "only the good event reached Kafka"
    );

    // Parked rows are never selected again: the relay has nothing to do.
    let idle = default_relay(&store, &brokers, &service);
    assert_eq!(idle.run_once().await.unwrap().claimed, 0);
}

/// A row written by hand with headers that are not a JSON object of strings cannot be
/// produced: it is parked on its own, and the rest of its key is delivered behind it.
#[tokio::test]
async fn a_row_with_unreadable_headers_is_parked_and_its_key_goes_on() {
    let (brokers, store, topic, collector, service) = one_partition().await;
    let events: Vec<_> = (0..3).map(|i| support::event(&topic, "k", i)).collect();
    let mut tx = store.pool().begin().await.unwrap();
    for ev in &events {
        store.stage(&mut tx, ev).await.unwrap();
    }
    tx.commit().await.unwrap();
    unproducible(&store, events[0].event_id).await;

    let relay = default_relay(&store, &brokers, &service);
    let running = spawn(relay);
    let rest: Vec<Uuid> = events[1..].iter().map(|e| e.event_id).collect();
    collector.wait_for(&rest, Duration::from_secs(30)).await;
    running.stop().await;

    let dead = parked(&store).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, events[0].event_id);
    assert!(dead[0].2.contains("Bad message"), "{}", dead[0].2);
    let consumed = collector.snapshot();
    let got: Vec<Uuid> = consumed.iter().map(|c| c.event_id).collect();
    assert_eq!(got, rest, "the key's other rows, in order, once");
}

/// Only the relay holding the service's housekeeping lock counts the backlog; it takes the
/// chores over once the holder leaves.
#[tokio::test]
async fn one_relay_of_a_service_counts_the_backlog_and_another_takes_over_when_it_leaves() {
    support::metrics();
    let (brokers, store, topic, collector, service) = one_partition().await;
    // Another relay of the service holds the housekeeping lock: this session stands in for it.
    let mut other = store.pool().acquire().await.unwrap().detach();
    let held: bool = sqlx::query_scalar(
        "SELECT pg_try_advisory_lock(hashtext($1), hashtext('outpost.housekeeping:' || $2))",
    )
    .bind(format!(
        "outpost:{}.{}:",
        store.table().schema(),
        store.table().table()
    ))
    .bind(&service)
    .fetch_one(&mut other)
    .await
    .unwrap();
    assert!(held);
    let mut config = support::relay_config(&service);
    config.backlog_interval = Duration::from_millis(50);
    let relay = spawn(Relay::new(store.clone(), support::producer(&brokers), config).unwrap());
    // The relay runs: it delivers what is staged.
    let staged = support::stage_committed(&store, &topic, 2, 4).await;
    let ids: Vec<Uuid> = staged.iter().map(|e| e.event_id).collect();
    collector.wait_for(&ids, Duration::from_secs(30)).await;
    // A relay that counted regardless would have reported many times over by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !support::gauge_reported(outpost::metrics::BACKLOG, &service),
        "the backlog was counted by a relay that does not hold the housekeeping lock"
    );
    sqlx::Connection::close(other).await.unwrap();
    support::eventually(
        Duration::from_secs(30),
        "the relay takes the housekeeping over",
        || async { support::gauge_reported(outpost::metrics::BACKLOG, &service).then_some(()) },
    )
    .await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cannot_reach_the_database_keeps_its_last_backlog_reading() {
    support::metrics();
    let direct = support::store().await;
    let service = support::unique("svc");
    let proxy = support::Partition::start(database_port()).await;
    let store = OutboxStore::new(through(&proxy), direct.table().clone());
    let mut config = support::relay_config(&service);
    config.backlog_interval = Duration::from_millis(50);
    // No broker: what is staged stays pending.
    let relay = spawn(Relay::new(store, support::producer("127.0.0.1:1"), config).unwrap());
    support::stage_committed(&direct, "t", 3, 3).await;
    let backlog = || support::metric(outpost::metrics::BACKLOG, &service, &[]);
    support::eventually(Duration::from_secs(30), "the backlog counted", || async {
        (backlog() == 3.0).then_some(())
    })
    .await;
    proxy.refuse_new(true);
    proxy.close_all();
    // Forty housekeeping intervals with the database out of reach: the reading stays.
    let cut = std::time::Instant::now();
    while cut.elapsed() < Duration::from_secs(2) {
        assert_eq!(
            backlog(),
            3.0,
            "the backlog read 0 while the database was unreachable"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.refuse_new(false);
    relay.stop().await;
}

/// A network that stops carrying the relay's database connections (they stay open and
/// nothing comes back, as in a partition that drops packets) holds the relay for a
/// statement timeout, not until TCP gives up: it goes on through new connections, delivers
/// what was staged before and after, in order, and stops when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_database_connections_fall_silent_goes_on_through_new_ones() {
    let (brokers, direct, topic, collector, service) = one_partition().await;
    let proxy = support::Partition::start(database_port()).await;
    // An idle connection is pinged before it is handed out (sqlx's default), and the pool
    // would wait for that ping longer than this test does: a cut-off connection's ping
    // hangs, so only the store's own bound on taking a connection lets the relay go on.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(600))
        .connect_lazy(&proxied(&proxy))
        .unwrap();
    let store = OutboxStore::new(pool, direct.table().clone());
    let mut config = support::relay_config(&service);
    config.statement_timeout = Duration::from_secs(1);
    let relay = spawn(Relay::new(store, support::producer(&brokers), config).unwrap());
    let mut staged = support::stage_committed(&direct, &topic, 20, 2_000).await;
    // Cut off in the middle of the drain: claims, reads, renewals and settles are on
    // connections that will never answer, and the idle ones in the pool are cut off too.
    support::eventually(Duration::from_secs(30), "the drain started", || async {
        (!collector.snapshot().is_empty()).then_some(())
    })
    .await;
    proxy.freeze();
    let cut = proxy.accepted();
    for i in 0..20 {
        let event = support::event(&topic, &format!("after{i}"), 0);
        let mut tx = direct.pool().begin().await.unwrap();
        direct.stage(&mut tx, &event).await.unwrap();
        tx.commit().await.unwrap();
        staged.push(event);
    }
    let ids: Vec<Uuid> = staged.iter().map(|e| e.event_id).collect();
    let seen = collector.wait_for(&ids, Duration::from_secs(60)).await;
    assert!(
        proxy.accepted() > cut,
        "delivered with no new connection: nothing was cut off"
    );
    relay.stop().await;
    support::assert_key_order(&seen);
}

/// A relay cut off from the database inside a hand-back, whose transaction holds the locks
/// of the keys it hands back (staging of those keys waits for them), holds up that staging
/// for no longer than its statement timeout: the server ends a transaction whose client has
/// been silent that long, though it never learns that the client is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_back_cut_off_inside_its_transaction_holds_up_staging_of_its_keys_briefly() {
    let (brokers, direct, topic, collector, service) = one_partition().await;
    let proxy = support::Partition::start(database_port()).await;
    proxy.strand(true);
    let store = OutboxStore::new(through(&proxy), direct.table().clone());
    // Each drained key row's deletion takes a second, long enough to cut the connection
    // off in the middle of it.
    let schema = direct.table().schema().to_owned();
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION \"{schema}\".slow_delete() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN PERFORM pg_sleep(1); RETURN OLD; END $$; \
         CREATE TRIGGER slow_delete BEFORE DELETE ON {keys} \
           FOR EACH ROW EXECUTE FUNCTION \"{schema}\".slow_delete()",
        keys = direct.table().keys()
    ))
    .execute(direct.pool())
    .await
    .unwrap();
    let mut config = support::relay_config(&service);
    config.statement_timeout = Duration::from_secs(3);
    let relay = spawn(Relay::new(store, support::producer(&brokers), config).unwrap());
    let mut staged = support::stage_committed(&direct, &topic, 1, 1).await;
    let in_hand_back = format!("%DELETE FROM {}%", direct.table().keys());
    support::eventually(Duration::from_secs(30), "the key handed back", || async {
        let sleeping: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event = 'PgSleep' AND query LIKE $1 AND pid <> pg_backend_pid()",
        )
        .bind(&in_hand_back)
        .fetch_one(direct.pool())
        .await
        .unwrap();
        (sleeping > 0).then_some(())
    })
    .await;
    proxy.freeze();
    // The next event of the key waits for the hand-back's key lock.
    let next = support::event(&topic, "k0", 1);
    let mut tx = direct.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL lock_timeout = '30s'")
        .execute(&mut *tx)
        .await
        .unwrap();
    direct
        .stage(&mut tx, &next)
        .await
        .expect("staged once the cut-off hand-back ended");
    tx.commit().await.unwrap();
    staged.push(next);
    let ids: Vec<Uuid> = staged.iter().map(|e| e.event_id).collect();
    let seen = collector.wait_for(&ids, Duration::from_secs(60)).await;
    relay.stop().await;
    support::assert_key_order(&seen);
}

/// A pool of at most four connections to the tests' database through `proxy`.
fn through(proxy: &support::Partition) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .test_before_acquire(false)
        .connect_lazy(&proxied(proxy))
        .unwrap()
}

/// The tests' database URL, through `proxy`.
fn proxied(proxy: &support::Partition) -> String {
    support::database_url().replacen(
        &format!(":{}/", database_port()),
        &format!(":{}/", proxy.port()),
        1,
    )
}

/// The port of the database the tests use.
fn database_port() -> u16 {
    let url = support::database_url();
    let authority = url.split('@').next_back().unwrap_or("");
    authority
        .split('/')
        .next()
        .and_then(|host| host.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(5432)
}

/// A relay with the tests' settings.
fn default_relay(store: &OutboxStore, brokers: &str, service: &str) -> Relay {
    Relay::new(
        store.clone(),
        support::producer(brokers),
        support::relay_config(service),
    )
    .unwrap()
}

/// Broker address, store, a one-partition topic with its collector, and a service name.
async fn one_partition() -> (String, OutboxStore, String, support::Collector, String) {
    let brokers = support::brokers();
    let store = support::store().await;
    let topic = support::topic(1).await;
    let collector = support::Collector::start(&brokers, &topic, 1);
    (brokers, store, topic, collector, support::unique("svc"))
}

/// Gives a staged row headers that are not a string map: it fails before it is produced.
async fn unproducible(store: &OutboxStore, event_id: Uuid) {
    sqlx::query(&format!(
        "UPDATE {} SET headers = '{{\"n\": 1}}' WHERE event_id = $1",
        store.table().payloads()
    ))
    .bind(event_id)
    .execute(store.pool())
    .await
    .unwrap();
}

/// The parked rows: event id, attempts, last error.
async fn parked(store: &OutboxStore) -> Vec<(Uuid, i32, String)> {
    sqlx::query_as(&format!(
        "SELECT event_id, attempts, last_error FROM {} WHERE status = 'dead' ORDER BY id",
        store.table()
    ))
    .fetch_all(store.pool())
    .await
    .unwrap()
}

/// Wake-ups are hints: with Redis unreachable (listener and writer) and NOTIFY pointing at
/// a database that refuses connections, the relay warns and keeps delivering by polling.
#[tokio::test]
async fn unreachable_wake_up_transports_degrade_to_polling() {
    let (brokers, store, topic, collector, service) = one_partition().await;
    let signal = WakeSignal::new();
    let listeners = CancellationToken::new();
    signal
        .listen_redis("redis://127.0.0.1:1", &service, listeners.clone())
        .unwrap();
    let dead_db = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(200))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .unwrap();
    signal
        .listen_notify(dead_db.clone(), &service, listeners.clone())
        .unwrap();
    assert!(Waker::redis("redis://127.0.0.1:1", &service).await.is_err());
    let failing_notify = Waker::notify(dead_db, &service).unwrap();
    assert!(failing_notify.try_nudge().await.is_err());

    let relay = default_relay(&store, &brokers, &service).with_wake_signal(signal);
    let running = spawn(relay);
    let staged = support::stage_committed(&store, &topic, 2, 6).await;
    failing_notify.nudge().await; // logs a warning, never fails the caller
    let ids: Vec<Uuid> = staged.iter().map(|e| e.event_id).collect();
    collector.wait_for(&ids, Duration::from_secs(20)).await;
    running.stop().await;
    listeners.cancel();
}

/// A Redis connection the network stops carrying (open, nothing comes back) stops the
/// wake-ups for a few seconds, not until TCP gives up: the listener takes it for cut off
/// when a `BLPOP` goes unanswered past its own wait, and listens on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_listener_whose_redis_connection_falls_silent_listens_on_a_new_one() {
    let service = support::unique("svc");
    let redis = support::redis_url();
    let proxy = support::Partition::start(support::redis_port()).await;
    let signal = WakeSignal::new();
    let listeners = CancellationToken::new();
    signal
        .listen_redis(
            &format!("redis://127.0.0.1:{}", proxy.port()),
            &service,
            listeners.clone(),
        )
        .unwrap();
    support::eventually(
        Duration::from_secs(10),
        "the listener connected",
        || async { (proxy.accepted() > 0).then_some(()) },
    )
    .await;
    proxy.cut_off().await;
    // Nudged until one is heard: a `BLPOP` the server still holds for the cut-off
    // connection takes a nudge with it (that one is lost; the relay's polling covers it).
    let waker = Waker::redis(&redis, &service).await.unwrap();
    nudged_until_heard(
        &waker,
        &signal,
        Duration::from_secs(30),
        "a wake-up heard again",
    )
    .await;
    assert!(proxy.accepted() > 1, "woken without a new connection");
    listeners.cancel();
}

/// A writer's Redis connection closed under it (Redis restarted) or cut off (open, nothing
/// comes back): its next hints go out on a new connection, not fail for as long as the
/// process lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waker_whose_redis_connection_was_closed_or_cut_off_sends_on_a_new_one() {
    let service = support::unique("svc");
    let proxy = support::Partition::start(support::redis_port()).await;
    let waker = Waker::redis(&format!("redis://127.0.0.1:{}", proxy.port()), &service)
        .await
        .unwrap();
    waker.try_nudge().await.unwrap();
    proxy.close_all();
    support::eventually(Duration::from_secs(10), "the connection closed", || async {
        (proxy.open() == 0).then_some(())
    })
    .await;
    support::eventually(
        Duration::from_secs(10),
        "a hint sent after the close",
        || async { waker.try_nudge().await.ok() },
    )
    .await;
    proxy.cut_off().await;
    support::eventually(
        Duration::from_secs(10),
        "a hint sent after the cut",
        || async { waker.try_nudge().await.ok() },
    )
    .await;
    assert!(proxy.accepted() >= 3, "a new connection after each cut");
}

/// Nudges through `waker` until `signal` hears one (a nudge can be lost on a connection
/// being replaced), or panics after `within`.
async fn nudged_until_heard(waker: &Waker, signal: &WakeSignal, within: Duration, what: &str) {
    support::eventually(within, what, || async {
        waker.nudge().await;
        tokio::time::timeout(Duration::from_millis(300), signal.notified())
            .await
            .ok()
    })
    .await;
}

/// A `LISTEN` connection the network stops carrying hears nothing, as an idle one does: the
/// listener checks it after a while with nothing heard, wakes the relay (notifications may
/// have been missed) and listens on a new one, which hears the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_listener_whose_connection_falls_silent_listens_on_a_new_one() {
    let service = support::unique("svc");
    let direct = support::pool().await;
    let proxy = support::Partition::start(database_port()).await;
    let signal = WakeSignal::new();
    let listeners = CancellationToken::new();
    signal
        .listen_notify(through(&proxy), &service, listeners.clone())
        .unwrap();
    let waker = Waker::notify(direct, &service).unwrap();
    // Listening: a nudge arrives.
    nudged_until_heard(
        &waker,
        &signal,
        Duration::from_secs(20),
        "the listener hears a nudge",
    )
    .await;
    proxy.cut_off().await;
    let cut = proxy.accepted();
    tokio::time::timeout(Duration::from_secs(40), signal.notified())
        .await
        .expect("the listener found its connection cut off and woke the relay");
    nudged_until_heard(
        &waker,
        &signal,
        Duration::from_secs(40),
        "a nudge heard again",
    )
    .await;
    assert!(
        proxy.accepted() > cut,
        "heard again without a new connection"
    );
    listeners.cancel();
}

/// A relay whose settle statement is held up (here by a lock on the event row) longer
/// than its lease keeps the key leased until the settle is written: a second relay must
/// not claim the key and send the acked row again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_settle_keeps_the_key_leased_so_no_other_relay_resends() {
    let brokers = support::brokers();
    let store = support::store().await;
    let topic = support::topic(1).await;
    let collector = support::Collector::start(&brokers, &topic, 1);
    let service = support::unique("slowsettle");
    let cfg = support::relay_config(&service);
    let lease = cfg.lease;
    let event = support::stage_committed(&store, &topic, 1, 1)
        .await
        .remove(0);

    // Holds the row: the relay can read and send it, but not mark it published.
    let mut blocker = store.pool().begin().await.unwrap();
    sqlx::query(&format!(
        "SELECT id FROM {} WHERE event_id = $1 FOR UPDATE",
        store.table()
    ))
    .bind(event.event_id)
    .fetch_one(&mut *blocker)
    .await
    .unwrap();

    let first = spawn(
        Relay::new(store.clone(), support::producer(&brokers), cfg.clone())
            .unwrap()
            .with_wake_signal(WakeSignal::new()),
    );
    collector
        .wait_for(&[event.event_id], Duration::from_secs(30))
        .await;
    let second = spawn(
        Relay::new(store.clone(), support::producer(&brokers), cfg)
            .unwrap()
            .with_wake_signal(WakeSignal::new()),
    );
    // Two leases long the settle stays blocked; the second relay polls all along.
    tokio::time::sleep(lease * 2).await;
    assert_eq!(
        support::count_status(&store, "pending").await,
        1,
        "the settle was held up"
    );
    blocker.rollback().await.unwrap();
    support::eventually(Duration::from_secs(30), "the row published", || {
        let store = store.clone();
        async move { (support::count_status(&store, "published").await == 1).then_some(()) }
    })
    .await;
    let seen = support::settled(&collector, 1, Duration::from_secs(2)).await;
    second.stop().await;
    first.stop().await;
    assert_eq!(
        support::messages(&seen),
        1,
        "the acked row was sent again by the second relay"
    );
}

/// Caps smaller than a read's usual size (here 10 rows in flight, reads of 64) still
/// drain every key: reads shrink to the room there is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_tiny_caps_still_drains_every_key() {
    let brokers = support::brokers();
    let store = support::store().await;
    let topic = support::topic(2).await;
    let collector = support::Collector::start(&brokers, &topic, 2);
    let staged = support::stage_committed(&store, &topic, 5, 300).await;
    let mut cfg = support::relay_config(&support::unique("tiny"));
    cfg.max_in_flight = 10;
    cfg.batch_size = 2;
    let running = spawn(
        Relay::new(store.clone(), support::producer(&brokers), cfg)
            .unwrap()
            .with_wake_signal(WakeSignal::new()),
    );
    let ids: Vec<Uuid> = staged.iter().map(|e| e.event_id).collect();
    let consumed = collector.wait_for(&ids, Duration::from_secs(60)).await;
    running.stop().await;
    support::assert_key_order(&consumed);
}

/// Claims run beside the relay's loop: a relay asked to stop while one waits for the
/// database waits for it, and hands back every key it leased, so nothing waits out a lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stopped_during_a_claim_hands_its_keys_back() {
    let brokers = support::brokers();
    let store = support::store().await;
    let topic = support::topic(2).await;
    let collector = support::Collector::start(&brokers, &topic, 2);
    let staged = support::stage_committed(&store, &topic, 40, 40).await;
    let keys = store.table().keys();

    // Holds the claim's read back (it joins the payloads) once its lease is written; the
    // settle statements, which touch no payload, still run.
    let mut blocker = store.pool().begin().await.unwrap();
    sqlx::query(&format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        store.table().payloads()
    ))
    .execute(&mut *blocker)
    .await
    .unwrap();
    let service = support::unique("stopclaim");
    let relay =
        spawn(default_relay(&store, &brokers, &service).with_wake_signal(WakeSignal::new()));
    let pool = store.pool().clone();
    support::eventually(Duration::from_secs(30), "the claim's read waits for the lock", || {
        let pool = pool.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND query LIKE 'SELECT c.event_key AS claimed_key%'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        }
    })
    .await;
    let stopping = tokio::spawn(relay.stop());
    // A relay leaving now would leave the keys its claim leased to no one until the lease
    // lapses.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !stopping.is_finished(),
        "the relay stopped with a claim still running"
    );
    blocker.rollback().await.unwrap();
    stopping.await.unwrap();

    let leased: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {keys} WHERE lease_owner IS NOT NULL"
    ))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(leased, 0, "keys left leased by a stopped relay");
    // Handed back, they are free at once for the next relay (the lease is 5 s).
    let next = spawn(default_relay(&store, &brokers, &service).with_wake_signal(WakeSignal::new()));
    let ids: Vec<Uuid> = staged.iter().map(|e| e.event_id).collect();
    let consumed = collector.wait_for(&ids, Duration::from_secs(60)).await;
    next.stop().await;
    support::assert_key_order(&consumed);
}

/// With `retention` zero a published row and its payload are deleted when its ack is
/// recorded; a parked row stays (for `outpost dead`). Every event is read back once, each
/// key in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_zero_retention_published_rows_are_deleted_once_acked() {
    let (brokers, store, topic, collector, service) = one_partition().await;
    let staged = support::stage_committed(&store, &topic, 4, 60).await;
    // The first row of key k0 cannot be produced: parked, the rest of k0 goes on.
    unproducible(&store, staged[0].event_id).await;
    let mut cfg = support::relay_config(&service);
    cfg.retention = Duration::ZERO;
    let running = spawn(Relay::new(store.clone(), support::producer(&brokers), cfg).unwrap());
    let delivered: Vec<Uuid> = staged[1..].iter().map(|e| e.event_id).collect();
    collector
        .wait_for(&delivered, Duration::from_secs(60))
        .await;
    let rows = format!(
        "SELECT (SELECT count(*) FROM {t}), (SELECT count(*) FROM {p}), \
                (SELECT count(*) FROM {t} WHERE status = 'dead' AND event_id = $1)",
        t = store.table(),
        p = store.table().payloads()
    );
    support::eventually(
        Duration::from_secs(30),
        "only the parked row and its payload are left",
        || async {
            let left: (i64, i64, i64) = sqlx::query_as(&rows)
                .bind(staged[0].event_id)
                .fetch_one(store.pool())
                .await
                .unwrap();
            (left == (1, 1, 1)).then_some(())
        },
    )
    .await;
    running.stop().await;
    let consumed = collector.read_to_end().await;
    let got: std::collections::HashSet<Uuid> = consumed.iter().map(|c| c.event_id).collect();
    assert_eq!(
        support::messages(&consumed),
        59,
        "each delivered event once"
    );
    assert_eq!(got, delivered.iter().copied().collect());
    support::assert_key_order(&consumed);
}
