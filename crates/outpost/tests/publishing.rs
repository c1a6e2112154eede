//! Publisher edge cases against real PostgreSQL and tansu: a half-open probe that has
//! nothing to send, and Kafka-first order across publisher processes.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost::metrics::{CIRCUIT_STATE, FALLBACKS};
use outpost::publishing::breaker::CircuitState;
use outpost::{
    Environment, KafkaProducer, Mode, OutboxStore, PublishPath, Publisher, PublisherConfig, Relay,
    WakeSignal, Waker,
};
use uuid::Uuid;

fn config(service: &str, mode: Mode) -> PublisherConfig {
    let mut cfg = PublisherConfig::new(service, Environment::Testing);
    cfg.mode = mode;
    cfg.delivery = support::relay_config(service);
    cfg.dispatch_deadline = Duration::from_millis(500);
    cfg.direct_deadline = Duration::from_millis(500);
    cfg
}

/// Two Kafka-first publisher processes of `service` on one outbox: one whose Kafka is
/// unreachable, one on `brokers`.
fn kafka_first_pair(store: &OutboxStore, service: &str, brokers: &str) -> (Publisher, Publisher) {
    let cut_off = Publisher::new(
        store.clone(),
        Arc::new(KafkaProducer::new(support::producer_config("127.0.0.1:1")).unwrap()),
        Waker::None,
        config(service, Mode::KafkaFirst),
    )
    .unwrap();
    // A cold producer's first ack waits for its producer id: the healthy publisher's
    // deadline leaves room for that on a loaded machine.
    let mut healthy_config = config(service, Mode::KafkaFirst);
    healthy_config.direct_deadline = Duration::from_secs(10);
    let healthy = Publisher::new(
        store.clone(),
        support::producer(brokers),
        Waker::None,
        healthy_config,
    )
    .unwrap();
    (cut_off, healthy)
}

/// The eager path takes the half-open probe; when that probe finds nothing to claim (its
/// key is held by someone else) it must give the probe back, so that once Kafka answers
/// the circuit closes and commits are dispatched eagerly again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_claims_nothing_does_not_wedge_the_circuit() {
    support::metrics();
    let broker = support::PrivateBroker::start().await;
    let topic = support::topic_on(&broker.brokers(), 1).await;
    let store = support::store().await;
    let service = support::unique("probe");
    let mut cfg = config(&service, Mode::Transactional);
    cfg.breaker.failure_threshold = 1;
    cfg.breaker.open_for = Duration::from_millis(300);
    // Long enough for a fresh broker's first ack (the producer id handshake).
    cfg.dispatch_deadline = Duration::from_secs(3);
    let publisher = Publisher::new(
        store.clone(),
        support::producer(&broker.brokers()),
        Waker::None,
        cfg,
    )
    .unwrap();
    let commit = |key: &str, seq: usize| {
        let publisher = publisher.clone();
        let ev = support::event(&topic, key, seq);
        async move {
            let mut tx = publisher.begin().await.unwrap();
            tx.publish(&ev).await.unwrap();
            tx.commit().await.unwrap()
        }
    };
    // Warm the producer up, then open the circuit with the broker paused.
    assert_eq!(commit("warm", 0).await.eager_published, 1);
    broker.pause();
    assert_eq!(commit("a", 0).await.eager_published, 0);
    assert_eq!(
        support::metric(CIRCUIT_STATE, &service, &[]),
        2.0,
        "one failure opens the circuit"
    );
    broker.resume();

    // Half-open: the next commit is the probe, and its key is held by another owner.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let other = Uuid::new_v4();
    let mut tx = store.pool().begin().await.unwrap();
    store
        .stage(&mut tx, &support::event(&topic, "held", 0))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let held = store
        .claim_keys(other, &["held".to_owned()], 10, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    let probe = commit("held", 1).await;
    assert_eq!(probe.eager_published, 0, "the probe's key is elsewhere");

    // Kafka answers again: the very next commit probes, is acked, and closes the circuit.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seq = 0;
    loop {
        seq += 1;
        if commit("b", seq).await.eager_published == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the circuit never closed after an empty probe"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        support::metric(CIRCUIT_STATE, &service, &[]),
        CircuitState::Closed.as_gauge()
    );
    publisher.shutdown(Duration::from_secs(5)).await;
}

/// Two publisher processes on one outbox: while one of them has an event of a key waiting
/// in the outbox (Kafka failed it), the other, with a healthy Kafka, must not send a
/// later event of that key directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_first_never_overtakes_an_event_another_process_left_in_the_outbox() {
    support::metrics();
    let brokers = support::brokers();
    let topic = support::topic(1).await;
    let collector = support::Collector::start(&brokers, &topic, 1);
    let store = support::store().await;
    let service = support::unique("kf");
    let (cut_off, healthy) = kafka_first_pair(&store, &service, &brokers);
    let first = support::event(&topic, "k", 0);
    let second = support::event(&topic, "k", 1);
    let unrelated = support::event(&topic, "other", 0);
    assert_eq!(cut_off.publish(&first).await.unwrap(), PublishPath::Outbox);
    assert_eq!(
        healthy.publish(&unrelated).await.unwrap(),
        PublishPath::Direct
    );
    assert_eq!(
        healthy.publish(&second).await.unwrap(),
        PublishPath::Outbox,
        "an older event of the key waits in the outbox"
    );
    assert_eq!(
        support::metric(FALLBACKS, &service, &[("reason", "key_pending")]),
        1.0
    );

    let running = support::spawn(support::relay(&store, &brokers, &service));
    let seen = collector
        .wait_for(
            &[first.event_id, second.event_id, unrelated.event_id],
            Duration::from_secs(30),
        )
        .await;
    running.stop().await;
    support::assert_key_order(&seen);
}

/// Kafka-first's outbox check unanswered within its 100 ms (the table locked, as a slow or
/// busy database would leave it): the event goes to the outbox, which may hold an older
/// one of its key, and not past it to Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_first_stores_an_event_when_the_outbox_check_cannot_answer() {
    support::metrics();
    let brokers = support::brokers();
    let topic = support::topic(1).await;
    let collector = support::Collector::start(&brokers, &topic, 1);
    let store = support::store().await;
    let service = support::unique("kfslow");
    let (cut_off, healthy) = kafka_first_pair(&store, &service, &brokers);
    let first = support::event(&topic, "k", 0);
    let second = support::event(&topic, "k", 1);
    assert_eq!(cut_off.publish(&first).await.unwrap(), PublishPath::Outbox);

    let mut lock = store.pool().begin().await.unwrap();
    sqlx::query(&format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        store.table()
    ))
    .execute(&mut *lock)
    .await
    .unwrap();
    let publishing = tokio::spawn({
        let healthy = healthy.clone();
        let second = second.clone();
        async move { healthy.publish(&second).await }
    });
    // Well past the check's 100 ms; the event's insert waits for the lock meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    lock.commit().await.unwrap();
    assert_eq!(
        publishing.await.unwrap().unwrap(),
        PublishPath::Outbox,
        "not sent past what the check could not see"
    );
    assert_eq!(
        support::metric(FALLBACKS, &service, &[("reason", "key_check_failed")]),
        1.0
    );

    let running = support::spawn(support::relay(&store, &brokers, &service));
    let seen = collector
        .wait_for(&[first.event_id, second.event_id], Duration::from_secs(30))
        .await;
    running.stop().await;
    support::assert_key_order(&seen);
}

/// A Kafka-first publish its caller stops waiting for (a request cancelled) runs to its
/// end: its send, failing once the caller has gone, still puts the event in the outbox,
/// and the relay delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_first_publish_its_caller_abandons_still_stores_a_failed_event() {
    let brokers = support::brokers();
    let topic = support::topic(1).await;
    let collector = support::Collector::start(&brokers, &topic, 1);
    let store = support::store().await;
    let service = support::unique("kfdrop");
    let mut cfg = config(&service, Mode::KafkaFirst);
    // The send fails (1.5 s delivery timeout, no broker) long after the caller gave up.
    cfg.direct_deadline = Duration::from_secs(10);
    let cut_off = Publisher::new(
        store.clone(),
        Arc::new(KafkaProducer::new(support::producer_config("127.0.0.1:1")).unwrap()),
        Waker::None,
        cfg,
    )
    .unwrap();
    let event = support::event(&topic, "k", 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), cut_off.publish(&event))
            .await
            .is_err(),
        "the caller gave up first"
    );
    support::eventually(
        Duration::from_secs(20),
        "the abandoned event is in the outbox",
        || async { (support::count_status(&store, "pending").await == 1).then_some(()) },
    )
    .await;
    let running = support::spawn(support::relay(&store, &brokers, &service));
    collector
        .wait_for(&[event.event_id], Duration::from_secs(30))
        .await;
    running.stop().await;
}

/// Kafka-first `publish_all`: every event of a batch is queued before any ack is awaited,
/// yet each key's events land in slice order; a key with an older event waiting in the
/// outbox goes there whole; and a batch Kafka cannot take is stored in order, for the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_first_batches_keep_each_key_in_order_on_every_path() {
    support::metrics();
    let brokers = support::brokers();
    let topic = support::topic(2).await;
    let collector = support::Collector::start(&brokers, &topic, 2);
    let store = support::store().await;
    let service = support::unique("kfall");
    let (cut_off, healthy) = kafka_first_pair(&store, &service, &brokers);
    // "k" has an event waiting in the outbox (Kafka failed it in another process).
    let waiting = support::event(&topic, "k", 0);
    assert_eq!(
        cut_off.publish(&waiting).await.unwrap(),
        PublishPath::Outbox
    );

    // Interleaved keys, many events each: sent pipelined, except "k", which must follow
    // its waiting event through the outbox.
    let keys = ["a", "b", "k", "c"];
    let batch: Vec<_> = (1..=30)
        .flat_map(|seq| keys.map(|key| support::event(&topic, key, seq)))
        .collect();
    let sent = healthy.publish_all(&batch).await.unwrap();
    assert_eq!((sent.eager_published, sent.left_to_relay), (90, 30));
    assert_eq!(
        support::metric(FALLBACKS, &service, &[("reason", "key_pending")]),
        30.0
    );

    // Kafka unreachable: the whole batch falls back, in order.
    let down: Vec<_> = (31..=40)
        .flat_map(|seq| ["a", "d"].map(|key| support::event(&topic, key, seq)))
        .collect();
    let fell = cut_off.publish_all(&down).await.unwrap();
    assert_eq!((fell.eager_published, fell.left_to_relay), (0, 20));

    let running = support::spawn(support::relay(&store, &brokers, &service));
    let ids: Vec<Uuid> = std::iter::once(&waiting)
        .chain(&batch)
        .chain(&down)
        .map(|e| e.event_id)
        .collect();
    collector.wait_for(&ids, Duration::from_secs(60)).await;
    running.stop().await;
    let seen = collector.read_to_end().await;
    support::assert_key_order(&seen);
    assert_eq!(
        support::messages(&seen),
        ids.len(),
        "every event once, nothing else"
    );
}

/// One topic map, three paths: the eager path after a commit, a Kafka-first direct send
/// and the relay all produce an event staged for the old topic to the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_overrides_apply_on_the_eager_direct_and_relay_paths() {
    let brokers = support::brokers();
    let topic = support::topic(1).await;
    // Never created: an event produced there instead would be missing below.
    let staged_topic = format!("{topic}.old");
    let collector = support::Collector::start(&brokers, &topic, 1);
    let store = support::store().await;
    let service = support::unique("retarget");
    let mut cfg = config(&service, Mode::Transactional);
    cfg.delivery
        .topics
        .insert(staged_topic.clone(), topic.clone());
    cfg.direct_deadline = Duration::from_secs(10);
    cfg.dispatch_deadline = Duration::from_secs(10);
    let relay_config = cfg.delivery.clone();
    let publisher =
        Publisher::new(store.clone(), support::producer(&brokers), Waker::None, cfg).unwrap();

    let eager = support::event(&staged_topic, "eager", 0);
    let mut tx = publisher.begin().await.unwrap();
    tx.publish(&eager).await.unwrap();
    assert_eq!(tx.commit().await.unwrap().eager_published, 1);

    let direct = support::event(&staged_topic, "direct", 0);
    assert_eq!(
        publisher
            .with_mode(Mode::KafkaFirst)
            .publish(&direct)
            .await
            .unwrap(),
        PublishPath::Direct
    );

    let relayed = support::event(&staged_topic, "relayed", 0);
    let mut tx = store.pool().begin().await.unwrap();
    store.stage(&mut tx, &relayed).await.unwrap();
    tx.commit().await.unwrap();
    let relay = Relay::new(store.clone(), support::producer(&brokers), relay_config)
        .unwrap()
        .with_wake_signal(WakeSignal::new());
    let running = support::spawn(relay);
    let seen = collector
        .wait_for(
            &[eager.event_id, direct.event_id, relayed.event_id],
            Duration::from_secs(30),
        )
        .await;
    running.stop().await;
    publisher.shutdown(Duration::from_secs(5)).await;
    assert_eq!(support::messages(&seen), 3);
}

/// A transactional publisher on a fresh one-partition topic, with a collector reading it.
struct Eager {
    topic: String,
    collector: support::Collector,
    store: OutboxStore,
    publisher: Publisher,
}

impl Eager {
    async fn start(prefix: &str) -> Self {
        support::metrics();
        let brokers = support::brokers();
        let topic = support::topic(1).await;
        let collector = support::Collector::start(&brokers, &topic, 1);
        let store = support::store().await;
        let service = support::unique(prefix);
        let publisher = Publisher::new(
            store.clone(),
            support::producer(&brokers),
            Waker::None,
            config(&service, Mode::Transactional),
        )
        .unwrap();
        Self {
            topic,
            collector,
            store,
            publisher,
        }
    }
}

/// Two commits of one key in one process, the first leasing the key while staging: when
/// the second commit's dispatch starts first (its task ran sooner), it must not claim the
/// first one's leased key and send its row, which the first dispatch then sends again from
/// memory, after the second's (a duplicate that breaks the key's order, and for a moment
/// two senders). The first commit is held between sending `COMMIT` and reading the answer,
/// which is where a busy runtime can hold it.
#[tokio::test]
async fn a_later_commit_of_a_key_dispatched_first_does_not_send_the_earlier_one_twice() {
    commits_dispatched_out_of_order(false).await;
}

/// As above, both commits also carrying an event of a key that has a key row already: the
/// first one's turn for that key, taken when it commits, comes after the second's, while
/// the second waits for the first's turn on the key it leased. Neither may wait for the
/// other (both dispatches hung, and every later one of those keys behind them).
#[tokio::test]
async fn commits_dispatched_out_of_order_with_a_second_key_do_not_wait_for_each_other() {
    commits_dispatched_out_of_order(true).await;
}

async fn commits_dispatched_out_of_order(with_existing_key: bool) {
    let Eager {
        topic,
        collector,
        store,
        publisher,
    } = Eager::start("turns").await;
    // The producer's first ack waits for its producer id: not inside the race. Its key
    // row stays behind, unleased: a key with a row already.
    let warm = support::event(&topic, "warm-up", 0);
    let mut tx = publisher.begin().await.unwrap();
    tx.publish(&warm).await.unwrap();
    tx.commit().await.unwrap();

    let (first, second) = (
        support::event(&topic, "k", 0),
        support::event(&topic, "k", 1),
    );
    let (first_other, second_other) = (
        support::event(&topic, "warm-up", 1),
        support::event(&topic, "warm-up", 2),
    );
    let mut tx = publisher.begin().await.unwrap();
    tx.publish(&first).await.unwrap();
    if with_existing_key {
        tx.publish(&first_other).await.unwrap();
    }
    let mut committing = Box::pin(tx.commit());
    // Polled only until `COMMIT` went out (a poll sends the next statement once the answer
    // to the one before is in): its answer is not read until the second commit is done.
    let landed = || {
        let pool = store.pool().clone();
        let table = store.table().to_string();
        async move {
            let n: i64 =
                sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE event_id = $1"))
                    .bind(first.event_id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            n == 1
        }
    };
    // Short rounds: the first commit's leases are sent from memory only while younger than
    // half a lease (2.5 s here), and the race is only there while they are.
    'commit: for _ in 0..20 {
        assert!(futures::poll!(&mut committing).is_pending());
        let deadline = Instant::now() + Duration::from_millis(250);
        while Instant::now() < deadline {
            if landed().await {
                break 'commit;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert!(landed().await, "the first commit lands");
    let mut tx = publisher.begin().await.unwrap();
    tx.publish(&second).await.unwrap();
    if with_existing_key {
        tx.publish(&second_other).await.unwrap();
    }
    tx.commit_and_dispatch_later().await.unwrap();
    // Let the second dispatch run as far as it can before the first one goes on.
    for _ in 0..50 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let dispatched = committing.await.unwrap();
    publisher.shutdown(Duration::from_secs(10)).await;
    // Each of the first commit's events was sent by a dispatch (its own, or the second's
    // claim, which read it), none left to the relay.
    assert_eq!(dispatched.left_to_relay, 0, "{dispatched:?}");

    // No relay runs: the dispatches send every event (the second one's claim reads the
    // first one's row of the key it holds). Dispatches that wait for each other send none.
    let mut expected = vec![first.event_id, second.event_id];
    if with_existing_key {
        expected.extend([first_other.event_id, second_other.event_id]);
    }
    collector.wait_for(&expected, Duration::from_secs(15)).await;
    let seen = collector.read_to_end().await;
    for (key, want) in [
        ("k", vec![first.event_id, second.event_id]),
        (
            "warm-up",
            vec![warm.event_id, first_other.event_id, second_other.event_id],
        ),
    ] {
        let ids: Vec<Uuid> = seen
            .iter()
            .filter(|c| c.key == key)
            .map(|c| c.event_id)
            .collect();
        let want = if key == "warm-up" && !with_existing_key {
            vec![warm.event_id]
        } else {
            want
        };
        assert_eq!(ids, want, "each event of key {key} once, in commit order");
    }
    assert_eq!(support::count_status(&store, "pending").await, 0);
}

/// A statement that failed inside the transaction aborts it, and PostgreSQL answers a
/// `COMMIT` of an aborted transaction with `ROLLBACK`, not an error. The events it staged
/// under keys it leased must not be sent from memory then: `commit()` fails, nothing is
/// published, nothing is left.
#[tokio::test]
async fn a_commit_the_server_rolled_back_publishes_nothing() {
    let Eager {
        topic,
        collector,
        store,
        publisher,
    } = Eager::start("aborted").await;
    let phantom = support::event(&topic, "fresh", 0);
    let mut tx = publisher.begin().await.unwrap();
    tx.publish(&phantom).await.unwrap();
    // A business statement fails and its error is not passed on.
    assert!(sqlx::query("SELECT 1 / 0").execute(&mut *tx).await.is_err());
    let err = tx
        .commit()
        .await
        .expect_err("the server rolled the transaction back");
    assert!(err.to_string().contains("commit"), "{err}");
    publisher.shutdown(Duration::from_secs(5)).await;

    // A later event on the same topic marks how far to read.
    let marker = support::event(&topic, "marker", 0);
    let mut tx = publisher.begin().await.unwrap();
    tx.publish(&marker).await.unwrap();
    tx.commit().await.unwrap();
    collector
        .wait_for(&[marker.event_id], Duration::from_secs(30))
        .await;
    let seen = collector.read_to_end().await;
    assert!(
        seen.iter().all(|c| c.event_id != phantom.event_id),
        "an event of a rolled-back transaction was published"
    );
    assert_eq!(support::count_status(&store, "pending").await, 0);
}

/// Rows staged inside a savepoint that was rolled back are gone at commit, though the
/// transaction commits: they must not be sent from memory; the rest of it is delivered.
#[tokio::test]
async fn rows_a_savepoint_rolled_back_are_not_published() {
    let Eager {
        topic,
        collector,
        store,
        publisher,
    } = Eager::start("savepoint").await;
    let (undone, kept) = (
        support::event(&topic, "undone", 0),
        support::event(&topic, "kept", 0),
    );
    let mut tx = publisher.begin().await.unwrap();
    sqlx::query("SAVEPOINT before_stage")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.publish(&undone).await.unwrap();
    sqlx::query("ROLLBACK TO SAVEPOINT before_stage")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.publish(&kept).await.unwrap();
    tx.commit().await.unwrap();
    publisher.shutdown(Duration::from_secs(5)).await;
    collector
        .wait_for(&[kept.event_id], Duration::from_secs(30))
        .await;
    let seen = collector.read_to_end().await;
    assert!(
        seen.iter().all(|c| c.event_id != undone.event_id),
        "an event a savepoint rolled back was published"
    );
    assert_eq!(support::count_status(&store, "pending").await, 0);
}

/// With `retention` zero the eager path's settle deletes the rows it published, payloads
/// included; a row it did not publish would stay pending for a relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_zero_retention_the_eager_path_deletes_what_it_published() {
    support::metrics();
    let brokers = support::brokers();
    let topic = support::topic(1).await;
    let collector = support::Collector::start(&brokers, &topic, 1);
    let store = support::store().await;
    let mut cfg = config(&support::unique("eagerdel"), Mode::Transactional);
    cfg.delivery.retention = Duration::ZERO;
    let publisher =
        Publisher::new(store.clone(), support::producer(&brokers), Waker::None, cfg).unwrap();
    let events: Vec<_> = (0..10)
        .map(|i| support::event(&topic, ["a", "b"][i % 2], i / 2))
        .collect();
    let mut eager = 0;
    for ev in &events {
        let mut tx = publisher.begin().await.unwrap();
        tx.publish(ev).await.unwrap();
        eager += tx.commit().await.unwrap().eager_published;
    }
    // Every settle is written.
    publisher.shutdown(Duration::from_secs(10)).await;
    assert!(eager > 0, "nothing was published eagerly");
    let left: (i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT (SELECT count(*) FROM {t}), (SELECT count(*) FROM {t} WHERE status = 'pending'), \
                (SELECT count(*) FROM {p})",
        t = store.table(),
        p = store.table().payloads()
    ))
    .fetch_one(store.pool())
    .await
    .unwrap();
    // A send that outlived the dispatch deadline still settled (deleted) its row.
    let (rows, pending, payloads) = left;
    assert_eq!(
        (pending, payloads),
        (rows, rows),
        "only pending rows are left"
    );
    let published = events.len() - usize::try_from(rows).unwrap();
    assert!(
        published >= eager,
        "{published} of {eager} eager hits deleted"
    );
    let seen = support::settled(&collector, published, Duration::from_secs(1)).await;
    assert_eq!(support::messages(&seen), published);
}
