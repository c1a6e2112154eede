//! Deterministic fault injection through the real relay and real PostgreSQL, against
//! librdkafka's in-process mock cluster (`rdkafka::mocking::MockCluster`).
//!
//! Every test stages rows in a schema of its own, drives [`Relay::run_once`] by hand, and
//! checks both the relay's [`BatchReport`] and the row state in the table (status,
//! attempts, failures, last_error, next_attempt_at, lease), then reads the mock broker
//! from the beginning to check what actually landed there.
//!
//! Faults are injected with `MockCluster::request_errors` (a FIFO stack consumed one error
//! per Produce request, cluster-wide), `topic_error` and `broker_down`/`broker_up`. Where
//! the victim of an injected error must be deterministic, the relay runs with
//! `max_in_flight = 1`, so rows are delivered one after another, oldest key first.
//!
//! The Kafka-first test near the end drives a [`outpost::Publisher`] instead of the relay,
//! on a two-broker mock cluster; the eager-dispatch test at the end drives one too.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost::backoff::Backoff;
use outpost::{
    BatchReport, KafkaProducer, OutboxEvent, OutboxStore, ProducerConfig, Relay, RelayConfig,
};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use sqlx::Row;
use support::{Collector, Consumed};
use uuid::Uuid;

type Mock = MockCluster<'static, DefaultProducerContext>;

/// One row as the relay left it.
#[derive(Debug)]
struct RowState {
    status: String,
    attempts: i32,
    failures: i32,
    last_error: Option<String>,
    /// Who holds the row's key.
    lease_owner: Option<Uuid>,
    /// The key's `next_attempt_at - clock_timestamp()`, in milliseconds (positive: the key
    /// backs off).
    due_in_ms: f64,
}

/// A mock cluster with one single-partition topic, a store, a producer and a relay.
struct Harness {
    relay: Relay,
    producer: Arc<KafkaProducer>,
    store: OutboxStore,
    topic: String,
    /// Declared last so it is dropped after every client that talks to it.
    mock: Mock,
}

impl Harness {
    async fn new(
        tweak_producer: impl FnOnce(&mut ProducerConfig),
        tweak_relay: impl FnOnce(&mut RelayConfig),
    ) -> Self {
        let mock = MockCluster::new(1).expect("mock cluster");
        let topic = support::unique("outpost.mock").replace('_', ".");
        mock.create_topic(&topic, 1, 1).expect("mock topic");
        let store = support::store().await;
        let mut pcfg = support::producer_config(&mock.bootstrap_servers());
        tweak_producer(&mut pcfg);
        let producer = Arc::new(KafkaProducer::new(pcfg).expect("producer"));
        let mut rcfg = support::relay_config(&support::unique("mock"));
        tweak_relay(&mut rcfg);
        let relay = Relay::new(store.clone(), Arc::clone(&producer), rcfg).expect("relay");
        Self {
            relay,
            producer,
            store,
            topic,
            mock,
        }
    }

    /// Stages one event of `key` in its own committed transaction.
    async fn stage(&self, key: &str, seq: usize) -> OutboxEvent {
        self.stage_event(support::event(&self.topic, key, seq))
            .await
    }

    async fn stage_event(&self, ev: OutboxEvent) -> OutboxEvent {
        let mut tx = self.store.pool().begin().await.unwrap();
        self.store
            .stage(&mut tx, &ev)
            .await
            .unwrap()
            .expect("new row");
        tx.commit().await.unwrap();
        ev
    }

    /// Queues errors for the next Produce requests (one error per request).
    fn inject(&self, errors: &[RDKafkaRespErr]) {
        self.mock.request_errors(RDKafkaApiKey::Produce, errors);
    }

    async fn run_once(&self) -> BatchReport {
        self.relay.run_once().await.expect("run_once")
    }

    /// Calls `run_once` until it claims something (waiting out retry delays).
    async fn run_until_claimed(&self, timeout: Duration) -> BatchReport {
        let deadline = Instant::now() + timeout;
        loop {
            let report = self.run_once().await;
            if report.claimed > 0 {
                return report;
            }
            assert!(
                Instant::now() < deadline,
                "nothing became claimable within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Calls `run_once` until no row is pending; returns every report.
    async fn drain(&self, timeout: Duration) -> Vec<BatchReport> {
        let deadline = Instant::now() + timeout;
        let mut reports = Vec::new();
        while support::count_status(&self.store, "pending").await > 0 {
            assert!(
                Instant::now() < deadline,
                "rows still pending after {timeout:?}: {reports:?}"
            );
            let report = self.run_once().await;
            if report.claimed == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            reports.push(report);
        }
        reports
    }

    /// Waits until no pending row waits for a retry any more.
    async fn wait_all_due(&self, timeout: Duration) {
        let sql = format!(
            "SELECT count(*) FROM {} WHERE next_attempt_at > now()",
            self.store.table().keys()
        );
        support::eventually(timeout, "every retry delay has elapsed", || {
            let sql = sql.clone();
            async move {
                let waiting: i64 = sqlx::query_scalar(&sql)
                    .fetch_one(self.store.pool())
                    .await
                    .unwrap();
                (waiting == 0).then_some(())
            }
        })
        .await;
    }

    async fn row(&self, ev: &OutboxEvent) -> RowState {
        let r = sqlx::query(&format!(
            "SELECT e.status, e.attempts, e.failures, e.last_error, k.lease_owner, \
             COALESCE(EXTRACT(EPOCH FROM k.next_attempt_at - clock_timestamp()) * 1000, 0)::float8 AS due \
             FROM {} e LEFT JOIN {} k ON k.event_key = e.event_key WHERE e.event_id = $1",
            self.store.table(),
            self.store.table().keys()
        ))
        .bind(ev.event_id)
        .fetch_one(self.store.pool())
        .await
        .unwrap();
        RowState {
            status: r.get("status"),
            attempts: r.get("attempts"),
            failures: r.get("failures"),
            last_error: r.get("last_error"),
            lease_owner: r.get("lease_owner"),
            due_in_ms: r.get("due"),
        }
    }

    /// Runs a second relay of the same settings in the background (`run`, not `run_once`).
    fn run(&self) -> support::Running {
        let relay = Relay::new(
            self.store.clone(),
            Arc::clone(&self.producer),
            self.relay.config().clone(),
        )
        .unwrap()
        .with_wake_signal(outpost::WakeSignal::new());
        support::spawn(relay)
    }

    fn collector(&self) -> Collector {
        Collector::start(&self.mock.bootstrap_servers(), &self.topic, 1)
    }
}

fn ids(events: &[&OutboxEvent]) -> Vec<Uuid> {
    events.iter().map(|e| e.event_id).collect()
}

fn report(
    claimed: usize,
    published: usize,
    retried: usize,
    parked: usize,
    released: usize,
) -> BatchReport {
    BatchReport {
        claimed,
        published,
        retried,
        parked,
        released,
    }
}

fn times_consumed(seen: &[Consumed], ev: &OutboxEvent) -> usize {
    seen.iter().filter(|c| c.event_id == ev.event_id).count()
}

/// Asserts a parked row: dead after one attempt, lease cleared, reason recorded.
fn assert_parked_once(row: &RowState, reason: &str) {
    assert_eq!(row.status, "dead", "{row:?}");
    assert_eq!(row.attempts, 1, "{row:?}");
    assert_eq!(
        row.failures, 0,
        "permanent errors do not touch the budget: {row:?}"
    );
    assert!(row.lease_owner.is_none(), "{row:?}");
    let err = row.last_error.as_deref().unwrap_or_default();
    assert!(err.contains(reason) && err.contains("permanent"), "{row:?}");
}

/// A broker-side MSG_SIZE_TOO_LARGE parks that row at once; the next row of the same key
/// is delivered in a later iteration (per_key = 1), and another key is unaffected.
#[tokio::test]
async fn message_too_large_parks_the_row_and_unblocks_its_key() {
    let h = Harness::new(
        |_| {},
        |r| {
            r.per_key = 1;
            r.max_in_flight = 1;
        },
    )
    .await;
    let a1 = h.stage("a", 0).await;
    let b1 = h.stage("b", 0).await;
    let a2 = h.stage("a", 1).await;
    h.inject(&[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE]);

    // One row in flight at a time: a1 (the oldest key) goes first and takes the error.
    assert_eq!(h.run_once().await, report(1, 0, 0, 1, 0));
    assert_parked_once(&h.row(&a1).await, "MessageSizeTooLarge");
    let a2_row = h.row(&a2).await;
    assert_eq!((a2_row.status.as_str(), a2_row.attempts), ("pending", 0));

    // The parked row no longer holds back its key; the other key is unaffected.
    assert_eq!(h.run_once().await, report(1, 1, 0, 0, 0));
    h.drain(Duration::from_secs(10)).await;
    let a2_row = h.row(&a2).await;
    assert_eq!((a2_row.status.as_str(), a2_row.attempts), ("published", 1));
    assert_eq!(h.row(&b1).await.status, "published");
    assert_eq!(h.run_once().await, BatchReport::default());
    // A failed batch stops the producer (gapless guarantee: nothing behind it may land
    // without it); it was replaced once.
    assert_eq!(h.producer.generation(), 1);

    // a2 was produced after a1 failed, on the same partition: once a2 is read, a1 would
    // have been read before it had the broker stored it.
    let seen = h
        .collector()
        .wait_for(&ids(&[&b1, &a2]), Duration::from_secs(10))
        .await;
    assert_eq!(
        times_consumed(&seen, &a1),
        0,
        "a parked event must not reach Kafka"
    );
    assert_eq!(
        (times_consumed(&seen, &a2), times_consumed(&seen, &b1)),
        (1, 1)
    );
}

/// A payload above the producer's `message.max.bytes` is refused by librdkafka itself
/// (synchronously, never sent) and parked; the rest of its key goes on in the same batch.
#[tokio::test]
async fn oversized_payload_is_parked_without_reaching_the_broker() {
    let h = Harness::new(
        |p| {
            p.librdkafka
                .extend([("message.max.bytes".into(), "1000".into())])
        },
        |_| {},
    )
    .await;
    let env = outpost::EventEnvelope::new(
        "outpost.test.v1",
        "outpost-tests",
        serde_json::json!({ "key": "a", "seq": 0, "blob": "x".repeat(4000) }),
    );
    let big = h
        .stage_event(
            OutboxEvent::from_envelope(&env, h.topic.clone(), outpost::Aggregate::new("test", "a"))
                .unwrap(),
        )
        .await;
    let small = h.stage("a", 1).await;

    assert_eq!(h.run_once().await, report(2, 1, 0, 1, 0));
    assert_parked_once(&h.row(&big).await, "MessageSizeTooLarge");
    assert_eq!(h.row(&small).await.status, "published");
    let seen = h
        .collector()
        .wait_for(&ids(&[&small]), Duration::from_secs(10))
        .await;
    assert_eq!(times_consumed(&seen, &big), 0);
}

/// TOPIC_AUTHORIZATION_FAILED (from the topic's metadata) parks every row for that topic
/// at once, without blocking their keys' later rows or another topic; after access is
/// granted again, an operator's requeue delivers them.
#[tokio::test]
async fn topic_authorization_failure_parks_at_once() {
    let h = Harness::new(
        |p| {
            // So the producer re-reads metadata soon after access is granted again.
            p.librdkafka
                .insert("topic.metadata.refresh.interval.ms".into(), "200".into());
        },
        |_| {},
    )
    .await;
    let open = support::unique("outpost.mock.open").replace('_', ".");
    h.mock.create_topic(&open, 1, 1).unwrap();
    h.mock
        .topic_error(
            &h.topic,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .unwrap();
    let a1 = h.stage("a", 0).await;
    let a2 = h.stage("a", 1).await;
    let b1 = h.stage("b", 0).await;
    let c1 = h.stage_event(support::event(&open, "c", 0)).await;

    assert_eq!(h.run_once().await, report(4, 1, 0, 3, 0));
    for ev in [&a1, &a2, &b1] {
        assert_parked_once(&h.row(ev).await, "TopicAuthorizationFailed");
    }
    assert_eq!(h.row(&c1).await.status, "published");
    assert_eq!(
        h.run_once().await,
        BatchReport::default(),
        "parked rows are never retried"
    );
    assert_eq!(h.producer.generation(), 0);

    // Access granted again: requeued rows go out, in their original per-key order.
    h.mock
        .topic_error(&h.topic, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    assert_eq!(h.store.requeue(None).await.unwrap(), 3);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Until the producer's metadata refresh sees the topic as readable again, sends
        // still fail (and park) at once; requeue those and try again.
        h.drain(Duration::from_secs(5)).await;
        if support::count_status(&h.store, "dead").await == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "topic never became writable again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        h.store.requeue(None).await.unwrap();
    }
    let seen = h
        .collector()
        .wait_for(&ids(&[&a1, &a2, &b1]), Duration::from_secs(10))
        .await;
    support::assert_key_order(&seen);
}

/// Broker down: sends time out (transient). Rows are retried with a future due time,
/// never count against the budget (max_attempts = 2, four outages in a row) and are never
/// parked; the rows behind a failed head are released unattempted. After the broker is
/// back everything is published, in per-key order.
#[tokio::test]
async fn broker_outage_is_transient_and_never_parks() {
    let h = Harness::new(
        |p| p.delivery_timeout = Duration::from_millis(1000),
        |r| {
            r.max_attempts = 2;
            // Delays between 300 and 600 ms: long enough to observe, short enough to wait.
            r.backoff = Backoff {
                initial: Duration::from_millis(600),
                max: Duration::from_millis(600),
            };
        },
    )
    .await;
    // Warm up: the producer is connected and knows the topic before the outage.
    let warm = h.stage("warm", 0).await;
    assert_eq!(h.run_once().await, report(1, 1, 0, 0, 0));

    h.mock.broker_down(-1).unwrap();
    let staged = support::stage_committed(&h.store, &h.topic, 2, 5).await; // k0: 3, k1: 2
    let heads = [&staged[0], &staged[1]];
    let followers = [&staged[2], &staged[3], &staged[4]];

    const OUTAGES: i32 = 4;
    for outage in 1..=OUTAGES {
        h.wait_all_due(Duration::from_secs(5)).await;
        let started = Instant::now();
        let rep = h.run_once().await;
        assert_eq!(rep, report(5, 0, 2, 0, 3), "outage {outage}");
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "a send fails only after the delivery timeout"
        );
        for ev in heads {
            let row = h.row(ev).await;
            assert_eq!(row.status, "pending", "outage {outage}: {row:?}");
            assert_eq!(row.attempts, outage, "{row:?}");
            assert_eq!(row.failures, 0, "transient failures are free: {row:?}");
            assert!(row.lease_owner.is_none(), "{row:?}");
            assert!(
                row.due_in_ms > 0.0,
                "next attempt must be in the future: {row:?}"
            );
            let err = row.last_error.unwrap_or_default();
            assert!(
                err.contains("MessageTimedOut") && err.contains("transient"),
                "{err}"
            );
        }
        for ev in followers {
            let row = h.row(ev).await;
            assert_eq!(
                (
                    row.status.as_str(),
                    row.attempts,
                    row.lease_owner,
                    row.last_error
                ),
                ("pending", 0, None, None),
                "followers are released, not attempted"
            );
        }
        // While the heads back off, nothing of either key can be claimed.
        assert_eq!(h.run_once().await.claimed, 0, "outage {outage}");
    }
    assert_eq!(support::count_status(&h.store, "dead").await, 0);

    h.mock.broker_up(-1).unwrap();
    let reports = h.drain(Duration::from_secs(15)).await;
    assert!(reports.iter().all(|r| r.parked == 0), "{reports:?}");
    assert_eq!(support::count_status(&h.store, "published").await, 6);
    for ev in &staged {
        let row = h.row(ev).await;
        assert_eq!(row.failures, 0, "{row:?}");
        assert!(
            row.last_error.is_none() && row.lease_owner.is_none(),
            "{row:?}"
        );
    }

    let mut all: Vec<&OutboxEvent> = staged.iter().collect();
    all.push(&warm);
    let seen = h
        .collector()
        .wait_for(&ids(&all), Duration::from_secs(10))
        .await;
    support::assert_key_order(&seen);
    for ev in all {
        assert_eq!(
            times_consumed(&seen, ev),
            1,
            "no duplicates expected from the mock"
        );
    }
}

/// Errors librdkafka retries by itself (leader moved, request timed out, connection
/// dropped, not enough replicas) never reach the relay: the row is published in the same
/// iteration, with no error recorded.
#[tokio::test]
async fn internally_retried_errors_deliver_in_the_same_iteration() {
    let h = Harness::new(
        |p| {
            p.delivery_timeout = Duration::from_secs(5);
            p.librdkafka.insert("retry.backoff.ms".into(), "50".into());
        },
        |r| r.lease = Duration::from_secs(15),
    )
    .await;
    use RDKafkaRespErr as E;
    let cases: [&[E]; 6] = [
        &[E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION],
        &[E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT],
        &[E::RD_KAFKA_RESP_ERR__TRANSPORT],
        &[E::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS],
        &[E::RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID],
        &[
            E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            E::RD_KAFKA_RESP_ERR__TRANSPORT,
        ],
    ];
    // Without an injected error a send takes a few milliseconds.
    let mut staged = vec![h.stage("k", 0).await];
    let started = Instant::now();
    assert_eq!(h.run_once().await, report(1, 1, 0, 0, 0));
    eprintln!("no error: delivered in {:?}", started.elapsed());
    for (i, errors) in cases.iter().enumerate() {
        let ev = h.stage("k", i + 1).await;
        h.inject(errors);
        let started = Instant::now();
        let rep = h.run_once().await;
        let took = started.elapsed();
        eprintln!("{errors:?}: delivered in {took:?}");
        assert_eq!(rep, report(1, 1, 0, 0, 0), "{errors:?}");
        // Every librdkafka retry waits retry.backoff.ms (50 ms, jitter -20%..+20%), so
        // this shows the injected error was hit and retried.
        assert!(
            took >= Duration::from_millis(40),
            "{errors:?} took only {took:?}"
        );
        let row = h.row(&ev).await;
        assert_eq!(
            (
                row.status.as_str(),
                row.attempts,
                row.failures,
                row.last_error
            ),
            ("published", 1, 0, None),
            "{errors:?}"
        );
        staged.push(ev);
    }
    assert_eq!(h.producer.generation(), 0);
    let all: Vec<&OutboxEvent> = staged.iter().collect();
    let seen = h
        .collector()
        .wait_for(&ids(&all), Duration::from_secs(10))
        .await;
    support::assert_key_order(&seen);
}

/// An unclassified broker error (UNKNOWN_SERVER_ERROR, which librdkafka hands straight to
/// the application) counts against the budget: with max_attempts = 3 the row is parked on
/// its third budgeted failure, never before; a transient error in between (throttling)
/// costs nothing; the row behind it (in flight in the same request) is never delivered
/// before it, and is delivered once it is parked.
#[tokio::test]
async fn retriable_errors_park_after_the_attempt_budget() {
    let h = Harness::new(
        |_| {},
        |r| {
            r.max_attempts = 3;
            r.backoff = Backoff {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(40),
            };
        },
    )
    .await;
    use RDKafkaRespErr as E;
    let head = h.stage("a", 0).await;
    let next = h.stage("a", 1).await;

    // (error injected = UNKNOWN_SERVER_ERROR or throttling, attempts after, failures
    // after, class named in last_error)
    let steps = [
        (E::RD_KAFKA_RESP_ERR_UNKNOWN, 1, 1, "retriable"),
        (
            E::RD_KAFKA_RESP_ERR_THROTTLING_QUOTA_EXCEEDED,
            2,
            1,
            "transient",
        ),
        (E::RD_KAFKA_RESP_ERR_UNKNOWN, 3, 2, "retriable"),
    ];
    for (error, attempts, failures, class) in steps {
        h.inject(&[error]);
        let rep = h.run_until_claimed(Duration::from_secs(5)).await;
        // Both rows went out in the same request, so the error failed both; only the
        // first is recorded, the key backs off, and `next` is never delivered before it.
        assert_eq!(rep, report(2, 0, 1, 0, 1), "{error:?}");
        let row = h.row(&head).await;
        assert_eq!(
            (row.status.as_str(), row.attempts, row.failures),
            ("pending", attempts, failures),
            "{error:?}: {row:?}"
        );
        assert!(
            row.last_error.unwrap_or_default().contains(class),
            "{error:?}"
        );
        assert_eq!(h.row(&next).await.attempts, 0);
    }

    // Third budgeted failure: parked; `next`, failed by the same request, is retried and
    // delivered once its key's back-off is over.
    h.inject(&[E::RD_KAFKA_RESP_ERR_UNKNOWN]);
    assert_eq!(
        h.run_until_claimed(Duration::from_secs(5)).await,
        report(2, 0, 1, 1, 0)
    );
    h.drain(Duration::from_secs(10)).await;
    let row = h.row(&head).await;
    assert_eq!((row.status.as_str(), row.attempts), ("dead", 4), "{row:?}");
    // The parking failure is the third budgeted one; `failures` records only the two
    // failures settled as retries (the dead settlement does not add to it).
    assert!((2..=3).contains(&row.failures), "{row:?}");
    assert!(row.lease_owner.is_none());
    assert!(row.last_error.unwrap_or_default().contains("retriable"));
    assert_eq!(h.row(&next).await.status, "published");
    // Each of the four injected errors failed its batch, which stops the producer (gapless
    // guarantee: nothing behind it may land without it); it was replaced each time.
    assert_eq!(h.producer.generation(), 4);

    let seen = h
        .collector()
        .wait_for(&ids(&[&next]), Duration::from_secs(10))
        .await;
    assert_eq!(times_consumed(&seen, &head), 0);
}

/// Fencing errors replace the producer: PRODUCER_FENCED (surfaced as is) and
/// OUT_OF_ORDER_SEQUENCE_NUMBER on the first in-flight request (a fatal idempotence
/// error in librdkafka). Each bumps the generation exactly once, even with several keys
/// in flight; the failed rows are retried for free and later deliveries succeed.
#[tokio::test]
async fn fencing_errors_rebuild_the_producer() {
    let h = Harness::new(
        |_| {},
        |r| {
            r.backoff = Backoff {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(40),
            };
        },
    )
    .await;
    use RDKafkaRespErr as E;

    let a0 = h.stage("a", 0).await;
    h.inject(&[E::RD_KAFKA_RESP_ERR_PRODUCER_FENCED]);
    assert_eq!(h.run_once().await, report(1, 0, 1, 0, 0));
    assert_eq!(h.producer.generation(), 1);
    let row = h.row(&a0).await;
    assert_eq!(
        (row.status.as_str(), row.attempts, row.failures),
        ("pending", 1, 0)
    );
    assert!(row
        .last_error
        .unwrap_or_default()
        .contains("ProducerFenced"));
    assert_eq!(
        h.run_until_claimed(Duration::from_secs(5)).await,
        report(1, 1, 0, 0, 0)
    );
    assert_eq!(h.producer.generation(), 1);

    // Two keys in flight on the same producer; the fatal error hits both (or one), but the
    // producer is replaced once.
    let a1 = h.stage("a", 1).await;
    let b0 = h.stage("b", 0).await;
    h.inject(&[E::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER]);
    let rep = h.run_once().await;
    eprintln!("after OUT_OF_ORDER_SEQUENCE_NUMBER: {rep:?}");
    assert!(rep.retried >= 1 && rep.parked == 0, "{rep:?}");
    assert_eq!(h.producer.generation(), 2);
    for ev in [&a1, &b0] {
        assert_eq!(h.row(ev).await.failures, 0);
    }
    let reports = h.drain(Duration::from_secs(10)).await;
    assert!(
        reports.iter().all(|r| r.parked == 0 && r.retried == 0),
        "{reports:?}"
    );
    assert_eq!(h.producer.generation(), 2);

    let a2 = h.stage("a", 2).await;
    assert_eq!(h.run_once().await, report(1, 1, 0, 0, 0));
    let seen = h
        .collector()
        .wait_for(&ids(&[&a0, &a1, &b0, &a2]), Duration::from_secs(10))
        .await;
    support::assert_key_order(&seen);
}

/// A batch on a slow broker (400 ms per ack, 12 rows of one key, lease 6 s = twice the
/// 1.5 s delivery + 1.5 s request timeout, the least `RelayConfig::validate` accepts) must still not be delivered twice by a second relay
/// that claims the rows once the first relay's lease has lapsed: the first relay stops
/// starting sends that could outlive its lease and hands the rest back.
#[tokio::test]
async fn a_batch_outliving_its_lease_is_not_delivered_twice() {
    let h = Harness::new(|_| {}, |r| r.lease = Duration::from_secs(6)).await;
    let staged = support::stage_committed(&h.store, &h.topic, 1, 12).await;
    h.mock
        .broker_round_trip_time(-1, Duration::from_millis(400))
        .unwrap();
    let mut other = support::relay_config(&support::unique("mock"));
    other.lease = Duration::from_secs(6);
    let relay2 = Relay::new(
        h.store.clone(),
        support::producer(&h.mock.bootstrap_servers()),
        other,
    )
    .unwrap();
    let first_done = std::sync::atomic::AtomicBool::new(false);
    let lapsed_sql = format!(
        "SELECT coalesce(bool_or(lease_until < clock_timestamp()), false) FROM {}",
        h.store.table().keys()
    );
    let pool = h.store.pool();
    let (first, second) = tokio::join!(
        async {
            let report = h.run_once().await;
            first_done.store(true, std::sync::atomic::Ordering::SeqCst);
            report
        },
        async {
            // Start the second relay as soon as a lease of the first one has lapsed (or the
            // first relay is done).
            support::eventually(
                Duration::from_secs(20),
                "lease lapsed or batch done",
                || {
                    let sql = lapsed_sql.clone();
                    let done = first_done.load(std::sync::atomic::Ordering::SeqCst);
                    async move {
                        let lapsed: bool = sqlx::query_scalar(&sql).fetch_one(pool).await.unwrap();
                        (lapsed || done).then_some(())
                    }
                },
            )
            .await;
            relay2.run_once().await.expect("run_once")
        }
    );
    eprintln!("first relay {first:?}, second relay {second:?}");
    h.mock.broker_round_trip_time(-1, Duration::ZERO).unwrap();
    h.drain(Duration::from_secs(10)).await;
    assert_eq!(support::count_status(&h.store, "published").await, 12);
    // Every send above was acked, so the high watermark counts every copy on the broker.
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", h.mock.bootstrap_servers())
        .create()
        .unwrap();
    let (_, high) = rdkafka::consumer::Consumer::fetch_watermarks(
        &consumer,
        &h.topic,
        0,
        Duration::from_secs(5),
    )
    .unwrap();
    let all: Vec<&OutboxEvent> = staged.iter().collect();
    let seen = h
        .collector()
        .wait_for(&ids(&all), Duration::from_secs(10))
        .await;
    support::assert_key_order(&seen);
    assert_eq!(high, 12, "each of the 12 events must be on the broker once");
}

/// Room for this many messages in librdkafka's queue, for the `QueueFull` tests.
const TINY_QUEUE: usize = 4;

/// A harness whose producer queues at most [`TINY_QUEUE`] messages, its fillers outliving
/// the test's outage (lease: twice the 10 s delivery + 1 s request timeout, and some).
async fn tiny_queue_harness() -> Harness {
    Harness::new(
        |p| {
            p.delivery_timeout = Duration::from_secs(10);
            p.librdkafka.insert(
                "queue.buffering.max.messages".into(),
                TINY_QUEUE.to_string(),
            );
        },
        |r| r.lease = Duration::from_secs(30),
    )
    .await
}

/// Takes the broker down and fills the shared producer's queue as another user of it would
/// (the eager path, another service's relay): messages it cannot deliver until the broker
/// is back. Returns their acks.
fn fill_queue(h: &Harness) -> Vec<outpost::kafka::producer::PendingAck> {
    h.mock.broker_down(-1).unwrap();
    let no_headers = std::collections::BTreeMap::new();
    let mut fillers = Vec::new();
    loop {
        match h
            .producer
            .enqueue(&h.topic, "someone else", b"filler", &no_headers)
        {
            Ok(ack) => fillers.push(ack),
            Err(failure) => {
                assert_eq!(
                    failure.error.rdkafka_error_code(),
                    Some(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    "{failure}"
                );
                break;
            }
        }
        assert!(fillers.len() <= TINY_QUEUE, "the queue never filled up");
    }
    fillers
}

/// Both staged events of key `k` are on the broker, in order.
async fn assert_key_k_in_order(h: &Harness, staged: &[OutboxEvent; 2]) {
    let mut seen = h
        .collector()
        .wait_for(&ids(&[&staged[0], &staged[1]]), Duration::from_secs(10))
        .await;
    seen.retain(|c| c.key == "k");
    support::assert_key_order(&seen);
}

/// The relay's first sends are refused with `QueueFull` while none of its own are in flight
/// (no ack of its own will come to unblock it): once others' messages leave the queue, it
/// sends its rows all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_filled_by_others_does_not_stall_the_relay() {
    let h = tiny_queue_harness().await;
    let fillers = fill_queue(&h);
    let staged = [h.stage("k", 0).await, h.stage("k", 1).await];
    let running = h.run();
    support::eventually(
        Duration::from_secs(10),
        "the relay owns the key",
        || async { h.row(&staged[0]).await.lease_owner.is_some().then_some(()) },
    )
    .await;
    // Time to be refused: its first pump follows the claim at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(support::count_status(&h.store, "published").await, 0);
    h.mock.broker_up(-1).unwrap();
    for ack in fillers {
        ack.await
            .expect("the filler is delivered once the broker is back");
    }
    support::eventually(
        Duration::from_secs(10),
        "the relay's rows are published once the queue drained",
        || async { (support::count_status(&h.store, "published").await == 2).then_some(()) },
    )
    .await;
    running.stop().await;
    assert_key_k_in_order(&h, &staged).await;
}

/// As [`a_queue_filled_by_others_does_not_stall_the_relay`], for `run_once`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_filled_by_others_does_not_stall_run_once() {
    let h = tiny_queue_harness().await;
    let fillers = fill_queue(&h);
    let staged = [h.stage("k", 0).await, h.stage("k", 1).await];
    let (once, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(10), h.run_once()),
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            h.mock.broker_up(-1).unwrap();
        }
    );
    let once = once.expect("run_once returns once the queue drained");
    assert_eq!(once, report(2, 2, 0, 0, 0));
    for ack in fillers {
        ack.await.expect("filler delivered");
    }
    assert_key_k_in_order(&h, &staged).await;
}

/// A key fails while rows of it are read and not sent (a refill came in before the
/// failure): those rows go back with the key. Failure after failure of a busy key, the
/// relay keeps claiming: every row is delivered once the errors stop, in key order, and so
/// is a key staged after them. (Before the fix, each such failure kept its unsent rows in
/// the relay's count of rows in memory: 19-23 of its 24 here, reads shrank to a row at a
/// time, and at the cap nothing more was claimed; the exact count depends on timing, so
/// `claiming`'s unit test `a_failed_key_takes_its_unsent_rows_out_of_the_count` pins it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_of_a_busy_key_do_not_use_up_the_relays_room() {
    let h = Harness::new(
        // Five rows a request: a key's rows in flight are acked a few at a time, and it is
        // refilled while rows of it are still on the wire.
        |p| {
            p.librdkafka.insert("batch.num.messages".into(), "5".into());
        },
        |r| {
            r.per_key = 20;
            r.max_in_flight = 24;
            r.max_attempts = 1_000;
            r.backoff = Backoff {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(40),
            };
        },
    )
    .await;
    let mut staged = Vec::new();
    for seq in 0..300 {
        staged.push(h.stage("a", seq).await);
    }
    // Two requests through, then one failed, 60 times over: each failure finds rows of the
    // key read and waiting behind the failed ones (at least the one a read takes beyond
    // what it sends, to tell whether the key has more): more than the relay has room for.
    use RDKafkaRespErr as E;
    let mut errors = Vec::new();
    for _ in 0..60 {
        errors.extend([
            E::RD_KAFKA_RESP_ERR_NO_ERROR,
            E::RD_KAFKA_RESP_ERR_NO_ERROR,
            E::RD_KAFKA_RESP_ERR_UNKNOWN,
        ]);
    }
    h.inject(&errors);
    let running = h.run();
    support::eventually(
        Duration::from_secs(60),
        "every row of the failing key is published",
        || async { (support::count_status(&h.store, "pending").await == 0).then_some(()) },
    )
    .await;
    let late = h.stage("b", 0).await;
    support::eventually(
        Duration::from_secs(10),
        "a key staged after the failures is published",
        || async { (h.row(&late).await.status == "published").then_some(()) },
    )
    .await;
    running.stop().await;
    assert!(
        h.producer.generation() > 1,
        "the injected errors failed requests (the producer was replaced)"
    );
    let mut all: Vec<&OutboxEvent> = staged.iter().collect();
    all.push(&late);
    let mut seen = h
        .collector()
        .wait_for(&ids(&all), Duration::from_secs(10))
        .await;
    seen.retain(|c| c.key == "a");
    support::assert_key_order(&seen);
}

/// Makes the cluster say `topic` does not exist (a retriable failure, per topic).
fn say_missing(mock: &Mock, topic: &str) {
    mock.topic_error(
        topic,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
    )
    .expect("topic error");
}

/// Producer settings under which a message for a topic said not to exist fails soon after
/// the cluster says so, not by timing out.
fn missing_fails_fast(mock: &Mock) -> ProducerConfig {
    let mut pcfg = support::producer_config(&mock.bootstrap_servers());
    pcfg.librdkafka
        .insert("topic.metadata.propagation.max.ms".into(), "200".into());
    pcfg
}

/// `publish_all(batch)` while broker 2 (the leader of `known`) is down, for at most 15 s:
/// what is queued for it can only be purged, not sent, meanwhile. Past that, broker 2 comes
/// back and the publish ends however it may (the caller's assertions then fail).
async fn publish_all_with_broker_2_down(
    mock: &Mock,
    publisher: &outpost::Publisher,
    batch: Vec<OutboxEvent>,
) -> outpost::Dispatch {
    mock.broker_down(2).unwrap();
    let mut sent = {
        let publisher = publisher.clone();
        tokio::spawn(async move { publisher.publish_all(&batch).await })
    };
    let dispatch = match tokio::time::timeout(Duration::from_secs(15), &mut sent).await {
        Ok(done) => done,
        Err(_) => {
            mock.broker_up(2).unwrap();
            sent.await
        }
    }
    .expect("publish task")
    .expect("acked or stored");
    mock.broker_up(2).unwrap();
    dispatch
}

/// Kafka-first on a two-broker mock cluster: `known` (one partition) is led by broker 2,
/// which a test takes down to hold what is queued for it; `missing` is a topic the cluster
/// says does not exist (a retriable failure, soon after it says so).
struct KafkaFirstTwoBrokers {
    known: String,
    missing: String,
    store: OutboxStore,
    service: String,
    publisher: outpost::Publisher,
    /// Declared last so it is dropped after every client that talks to it.
    mock: Mock,
}

impl KafkaFirstTwoBrokers {
    async fn start(tweak: impl FnOnce(&mut outpost::PublisherConfig)) -> Self {
        use outpost::{Environment, Mode, Publisher, PublisherConfig, Waker};

        support::metrics();
        let mock = MockCluster::new(2).expect("mock cluster");
        let known = support::unique("outpost.mock.kf").replace('_', ".");
        mock.create_topic(&known, 1, 1).expect("mock topic");
        mock.partition_leader(&known, 0, Some(2)).expect("leader");
        let missing = format!("{known}.missing");
        say_missing(&mock, &missing);

        let store = support::store().await;
        let service = support::unique("kfretriable");
        let mut pcfg = missing_fails_fast(&mock);
        // Outlives broker 2's outage: a message queued for it must not time out meanwhile.
        pcfg.delivery_timeout = Duration::from_secs(30);
        pcfg.request_timeout = Duration::from_secs(10);
        let producer = Arc::new(KafkaProducer::new(pcfg).expect("producer"));
        let mut cfg = PublisherConfig::new(&service, Environment::Testing);
        cfg.mode = Mode::KafkaFirst;
        cfg.delivery = support::patient_relay_config(&service);
        // The sends are waited for, never given up on: what is not failed is acked.
        cfg.direct_deadline = Duration::from_secs(60);
        tweak(&mut cfg);
        Self {
            publisher: Publisher::new(store.clone(), producer, Waker::None, cfg)
                .expect("publisher"),
            mock,
            known,
            missing,
            store,
            service,
        }
    }
}

/// Kafka-first: a direct send that fails with a *retriable* error (here the topic does not
/// exist: per topic, so librdkafka does not stop the producer as it does after a failed
/// request) puts its event in the outbox; a later event of its key, queued directly on
/// another topic and still waiting in librdkafka's queue (the partition's leader is down),
/// must not reach the broker ahead of it: it follows it into the outbox. So does a later
/// `publish` of the key, with Kafka healthy again. Read back: the key's events on the topic
/// (sent directly), then those in the outbox, are in publish order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_first_retriable_failure_keeps_later_events_of_its_key_behind_it() {
    use outpost::metrics::ORDER_BREAKS;
    use outpost::PublishPath;

    let KafkaFirstTwoBrokers {
        mock,
        known,
        missing,
        store,
        service,
        publisher,
    } = KafkaFirstTwoBrokers::start(|_| {}).await;

    let first = support::event(&known, "k", 0);
    assert_eq!(
        publisher.publish(&first).await.unwrap(),
        PublishPath::Direct
    );

    let failing = support::event(&missing, "k", 1);
    let behind = support::event(&known, "k", 2);
    // `behind` can only reach the broker once broker 2 is back: the publish must be over
    // without it. If it is not, broker 2 comes back, and `behind` lands ahead of `failing`.
    let dispatch =
        publish_all_with_broker_2_down(&mock, &publisher, vec![failing.clone(), behind.clone()])
            .await;

    // The key has an event in the outbox: a later publish goes there too, though Kafka
    // would take it now.
    let later = support::event(&known, "k", 3);
    assert_eq!(
        publisher.publish(&later).await.unwrap(),
        PublishPath::Outbox
    );

    let mut order: Vec<Uuid> = Collector::start(&mock.bootstrap_servers(), &known, 1)
        .read_to_end()
        .await
        .into_iter()
        .filter(|c| c.key == "k")
        .map(|c| c.event_id)
        .collect();
    let direct = order.len();
    let stored: Vec<Uuid> = sqlx::query_scalar(&format!(
        "SELECT event_id FROM {} WHERE event_key = 'k' ORDER BY id",
        store.table()
    ))
    .fetch_all(store.pool())
    .await
    .unwrap();
    order.extend(stored);
    assert_eq!(
        order,
        ids(&[&first, &failing, &behind, &later]),
        "the key's events sent directly (the first {direct}), then those in the outbox, in publish order"
    );
    assert_eq!(
        (dispatch.eager_published, dispatch.left_to_relay),
        (0, 2),
        "both fell back to the outbox"
    );
    assert_eq!(support::metric(ORDER_BREAKS, &service, &[]), 0.0);
    publisher.shutdown(Duration::from_secs(5)).await;
}

/// A row failing for its own topic alone (retriable: the cluster says the topic does not
/// exist, which fails nothing else) holds back a later row of its key for another topic
/// until it is delivered: at every look, the later row is not published while the earlier
/// one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_failing_for_its_topic_alone_holds_back_its_keys_rows_for_other_topics() {
    let h = Harness::new(
        |p| {
            // The missing topic's row fails soon after the cluster says so.
            p.librdkafka
                .insert("topic.metadata.propagation.max.ms".into(), "200".into());
        },
        |_| {},
    )
    .await;
    let missing = format!("{}.missing", h.topic);
    h.mock
        .topic_error(
            &missing,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
        )
        .unwrap();
    let first = h.stage_event(support::event(&missing, "k", 0)).await;
    let later = h.stage("k", 1).await;
    let statuses = format!(
        "SELECT status, failures FROM {} WHERE event_id = ANY($1) ORDER BY id",
        h.store.table()
    );
    let running = h.run();
    let started = Instant::now();
    let mut healed = false;
    loop {
        // One statement: both rows as of one instant.
        let rows: Vec<(String, i32)> = sqlx::query_as(&statuses)
            .bind(vec![first.event_id, later.event_id])
            .fetch_all(h.store.pool())
            .await
            .unwrap();
        let [(first_status, failures), (later_status, _)] = &rows[..] else {
            panic!("two rows: {rows:?}");
        };
        assert!(
            !(later_status == "published" && first_status != "published"),
            "the later row was delivered ahead of the earlier one: {rows:?}"
        );
        if first_status == "published" && later_status == "published" {
            assert!(*failures > 0, "the first row failed before: {rows:?}");
            break;
        }
        // Once the first row has failed for a while, the topic is there.
        if !healed && *failures > 0 && started.elapsed() > Duration::from_secs(2) {
            h.mock
                .topic_error(&missing, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
                .unwrap();
            healed = true;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "both rows delivered within 60 s: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.stop().await;
}

/// Eager dispatch: one transaction stages, for key `k`, `first` on a topic the cluster says
/// does not exist (a *retriable* failure: per topic, so librdkafka fails nothing queued for
/// another topic, unlike after a timeout, which purges the queue) and then `second` on a
/// healthy topic. Queued together, `second` would be acked while `first` stays pending for
/// the relay: delivered ahead of it. The eager path sends a key's rows one topic at a time,
/// the next only once the previous one's were acked: `second` stays pending until the relay,
/// once the topic exists, sends `first` before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eager_dispatch_sends_no_later_row_of_a_key_on_another_topic() {
    use outpost::{Environment, Mode, Publisher, PublisherConfig, Waker};

    let mock = MockCluster::new(1).expect("mock cluster");
    let healthy = support::unique("outpost.mock.eager").replace('_', ".");
    mock.create_topic(&healthy, 1, 1).expect("mock topic");
    let missing = format!("{healthy}.missing");
    mock.create_topic(&missing, 1, 1).expect("mock topic");
    say_missing(&mock, &missing);

    let store = support::store().await;
    let service = support::unique("eagertopics");
    let producer = Arc::new(KafkaProducer::new(missing_fails_fast(&mock)).expect("producer"));
    let mut cfg = PublisherConfig::new(&service, Environment::Testing);
    cfg.mode = Mode::Transactional;
    cfg.delivery = support::relay_config(&service);
    // The commit waits for every ack or failure.
    cfg.dispatch_deadline = Duration::from_secs(10);
    let relay_config = cfg.delivery.clone();
    let publisher = Publisher::new(store.clone(), producer, Waker::None, cfg).expect("publisher");

    let first = support::event(&missing, "k", 0);
    let second = support::event(&healthy, "k", 1);
    let mut tx = publisher.begin().await.unwrap();
    tx.publish(&first).await.unwrap();
    tx.publish(&second).await.unwrap();
    let dispatch = tx.commit().await.unwrap();
    // The dispatch's settle is written.
    publisher.shutdown(Duration::from_secs(10)).await;

    let status = |ev: &OutboxEvent| {
        let (pool, sql) = (
            store.pool().clone(),
            format!("SELECT status FROM {} WHERE event_id = $1", store.table()),
        );
        let id = ev.event_id;
        async move {
            sqlx::query_scalar::<_, String>(&sql)
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let landed = Collector::start(&mock.bootstrap_servers(), &healthy, 1)
        .read_to_end()
        .await;
    assert_eq!(
        (
            status(&first).await,
            status(&second).await,
            times_consumed(&landed, &second)
        ),
        ("pending".to_owned(), "pending".to_owned(), 0),
        "the first event failed and waits for a retry: the second is neither sent nor \
         acked ahead of it ({dispatch:?})"
    );
    assert_eq!(
        (dispatch.eager_published, dispatch.left_to_relay),
        (0, 2),
        "both left to the relay"
    );

    // The topic exists now; a relay (a producer of its own, with fresh metadata) delivers
    // the key's events, the first one first.
    mock.topic_error(&missing, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .expect("topic error cleared");
    let relay = Relay::new(
        store.clone(),
        support::producer(&mock.bootstrap_servers()),
        relay_config,
    )
    .expect("relay");
    let deadline = Instant::now() + Duration::from_secs(30);
    while support::count_status(&store, "pending").await > 0 {
        assert!(Instant::now() < deadline, "rows still pending after 30 s");
        if relay.run_once().await.expect("run_once").claimed == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(support::count_status(&store, "published").await, 2);
    let on_missing = Collector::start(&mock.bootstrap_servers(), &missing, 1)
        .read_to_end()
        .await;
    let on_healthy = Collector::start(&mock.bootstrap_servers(), &healthy, 1)
        .read_to_end()
        .await;
    assert_eq!(
        (
            times_consumed(&on_missing, &first),
            times_consumed(&on_healthy, &second)
        ),
        (1, 1),
        "each event once, on its topic"
    );

    // Healthy topics: the eager path sends the key's run on its first topic, then, once
    // that is acked, its run on the next: both acked in the commit, nothing left over.
    let other = format!("{healthy}.other");
    mock.create_topic(&other, 1, 1).expect("mock topic");
    let on_first = support::event(&healthy, "j", 0);
    let on_other = support::event(&other, "j", 1);
    let mut tx = publisher.begin().await.unwrap();
    tx.publish_all(&[on_first.clone(), on_other.clone()])
        .await
        .unwrap();
    let dispatch = tx.commit().await.unwrap();
    publisher.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        (dispatch.eager_published, dispatch.left_to_relay),
        (2, 0),
        "both sent eagerly, one topic after the other"
    );
    assert_eq!(
        (status(&on_first).await, status(&on_other).await),
        ("published".to_owned(), "published".to_owned())
    );
    let on_other_topic = Collector::start(&mock.bootstrap_servers(), &other, 1)
        .read_to_end()
        .await;
    assert_eq!(times_consumed(&on_other_topic, &on_other), 1);
}

/// A purge is not a broker failure: when a retriable failure purges the producer's queue,
/// the events it fails (here another key's, queued for a partition whose leader is down)
/// go to the outbox, but the circuit stays closed, and the next event is sent directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_failed_by_a_purge_do_not_open_the_circuit() {
    use outpost::PublishPath;

    let KafkaFirstTwoBrokers {
        mock,
        known,
        missing,
        store: _,
        service: _,
        publisher,
    } = KafkaFirstTwoBrokers::start(|c| c.breaker.failure_threshold = 1).await;
    let warm = support::event(&known, "w", 0);
    assert_eq!(publisher.publish(&warm).await.unwrap(), PublishPath::Direct);

    let batch = vec![
        support::event(&missing, "a", 0),
        support::event(&known, "b", 0),
    ];
    // Its queued event is purged, not sent: the publish is over while broker 2 is down.
    let dispatch = publish_all_with_broker_2_down(&mock, &publisher, batch).await;
    assert_eq!(
        (dispatch.eager_published, dispatch.left_to_relay),
        (0, 2),
        "the purged event fell back with the failed one"
    );
    let next = support::event(&known, "c", 0);
    assert_eq!(
        publisher.publish(&next).await.unwrap(),
        PublishPath::Direct,
        "the circuit stayed closed"
    );
    publisher.shutdown(Duration::from_secs(5)).await;
}

/// Kafka-first sends a key's events one topic at a time: a batch whose first event of key
/// `k` fails for its own topic (it does not exist) and whose second, for a healthy topic,
/// would be acked at once, stores both, the second never sent; a batch of a key over two
/// healthy topics is sent directly in full, one topic after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_first_sends_a_keys_next_topic_only_once_the_previous_one_was_acked() {
    use outpost::PublishPath;

    let kf = KafkaFirstTwoBrokers::start(|_| {}).await;
    let warm = support::event(&kf.known, "w", 0);
    assert_eq!(
        kf.publisher.publish(&warm).await.unwrap(),
        PublishPath::Direct
    );
    let failing = support::event(&kf.missing, "k", 0);
    let behind = support::event(&kf.known, "k", 1);
    let dispatch = kf
        .publisher
        .publish_all(&[failing.clone(), behind.clone()])
        .await
        .unwrap();
    assert_eq!(
        (dispatch.eager_published, dispatch.left_to_relay),
        (0, 2),
        "both stored, the second never sent ahead of the first"
    );

    let other = format!("{}.other", kf.known);
    kf.mock.create_topic(&other, 1, 1).expect("mock topic");
    let both = [
        support::event(&kf.known, "j", 0),
        support::event(&other, "j", 1),
    ];
    let dispatch = kf.publisher.publish_all(&both).await.unwrap();
    assert_eq!((dispatch.eager_published, dispatch.left_to_relay), (2, 0));
    let landed = Collector::start(&kf.mock.bootstrap_servers(), &kf.known, 1)
        .read_to_end()
        .await;
    assert_eq!(times_consumed(&landed, &behind), 0);
    assert_eq!(times_consumed(&landed, &both[0]), 1);
    kf.publisher.shutdown(Duration::from_secs(5)).await;
}

/// Kafka-first: an event the producer refuses for good (too large) is the caller's error,
/// not a broker failure. Neither it nor the later event of its key that was held back
/// behind it opens the circuit: the next event goes out directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_and_the_rest_of_its_key_do_not_open_the_circuit() {
    use outpost::{Environment, Mode, PublishPath, Publisher, PublisherConfig, Waker};

    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = support::unique("outpost.mock.refused").replace('_', ".");
    mock.create_topic(&topic, 1, 1).expect("mock topic");
    let mut pcfg = support::producer_config(&mock.bootstrap_servers());
    pcfg.librdkafka
        .insert("message.max.bytes".into(), "1000".into());
    let producer = Arc::new(KafkaProducer::new(pcfg).expect("producer"));
    let service = support::unique("refused");
    let mut cfg = PublisherConfig::new(&service, Environment::Testing);
    cfg.mode = Mode::KafkaFirst;
    cfg.breaker.failure_threshold = 1;
    let publisher =
        Publisher::new(support::store().await, producer, Waker::None, cfg).expect("publisher");

    let env = outpost::EventEnvelope::new(
        "outpost.test.v1",
        "outpost-tests",
        serde_json::json!({ "key": "k", "seq": 0, "blob": "x".repeat(4000) }),
    );
    let big = OutboxEvent::from_envelope(&env, topic.clone(), outpost::Aggregate::new("test", "k"))
        .unwrap();
    let after = support::event(&topic, "k", 1);
    let refused = publisher.publish_all(&[big, after]).await.unwrap_err();
    assert_eq!(
        refused.code(),
        outpost::ErrorCode::KafkaPublish,
        "{refused}"
    );
    assert_eq!(
        publisher
            .publish(&support::event(&topic, "other", 0))
            .await
            .unwrap(),
        PublishPath::Direct,
        "the circuit stayed closed"
    );
    publisher.shutdown(Duration::from_secs(5)).await;
}

/// Kafka-first: a publish whose caller stopped waiting goes on in the background (its
/// event must still reach Kafka or the outbox), and `shutdown` waits for it: with the broker
/// down, the event is in the outbox once `shutdown` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_publish_its_caller_gave_up_on() {
    use outpost::{Environment, Mode, Publisher, PublisherConfig, Waker};

    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = support::unique("outpost.mock.abandoned").replace('_', ".");
    mock.create_topic(&topic, 1, 1).expect("mock topic");
    let producer = Arc::new(
        KafkaProducer::new(support::producer_config(&mock.bootstrap_servers())).expect("producer"),
    );
    let store = support::store().await;
    let mut cfg = PublisherConfig::new(support::unique("abandoned"), Environment::Testing);
    cfg.mode = Mode::KafkaFirst;
    cfg.direct_deadline = Duration::from_secs(2);
    let publisher = Publisher::new(store.clone(), producer, Waker::None, cfg).expect("publisher");

    mock.broker_down(1).unwrap();
    let event = support::event(&topic, "k", 0);
    let gave_up = tokio::time::timeout(Duration::from_millis(50), publisher.publish(&event)).await;
    assert!(
        gave_up.is_err(),
        "the publish cannot finish with the broker down"
    );
    publisher.shutdown(Duration::from_secs(20)).await;
    assert_eq!(support::count_status(&store, "pending").await, 1);
    mock.broker_up(1).unwrap();
}

/// A lease renewal the database refuses (here a trigger; in life a failover to a read-only
/// node) is tried again after a pause while the relay's sends are in flight, not in a loop
/// (the loop's next renewal stayed due: a core's worth of refused statements).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_lease_renewal_is_tried_again_after_a_pause() {
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = support::unique("outpost.mock.renew").replace('_', ".");
    mock.create_topic(&topic, 1, 1).expect("mock topic");
    let store = support::store().await;
    let refused = support::unique("renewals_refused");
    // Counted by a sequence: its values survive the refusal's rollback.
    for statement in [
        format!("CREATE SEQUENCE {refused}"),
        format!(
            "CREATE FUNCTION {refused}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               IF OLD.lease_owner = NEW.lease_owner AND NEW.lease_until > OLD.lease_until THEN \
                 PERFORM nextval('{refused}'); \
                 RAISE EXCEPTION 'read-only, as after a failover'; \
               END IF; RETURN NEW; END $$"
        ),
        format!(
            "CREATE TRIGGER {refused} BEFORE UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION {refused}()",
            store.table().keys()
        ),
    ] {
        sqlx::query(&statement).execute(store.pool()).await.unwrap();
    }
    let renewals = || async {
        sqlx::query_scalar::<_, i64>(&format!(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {refused}"
        ))
        .fetch_one(store.pool())
        .await
        .unwrap()
    };

    // The send waits for the broker for 6 s, the lease is renewed from 14 / 3 s on.
    mock.broker_down(1).unwrap();
    let mut pcfg = support::producer_config(&mock.bootstrap_servers());
    pcfg.delivery_timeout = Duration::from_secs(6);
    let mut cfg = support::relay_config(&support::unique("renew"));
    cfg.lease = Duration::from_secs(14);
    let relay = outpost::Relay::new(
        store.clone(),
        Arc::new(KafkaProducer::new(pcfg).expect("producer")),
        cfg,
    )
    .unwrap()
    .with_wake_signal(outpost::WakeSignal::new());
    stage_in_one_transaction(&store, &[support::event(&topic, "k", 0)]).await;
    let running = support::spawn(relay);
    support::eventually(Duration::from_secs(20), "a renewal tried", || async {
        (renewals().await > 0).then_some(())
    })
    .await;
    let first = renewals().await;
    // A measuring window, inside the send's 6 s: retried every 14 / 30 s, a few tries.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tries = renewals().await - first;
    running.stop().await;
    mock.broker_up(1).unwrap();
    assert!(tries <= 10, "{tries} renewals in a second");
}

/// `max_in_flight_bytes` bounds what a relay reads, not only what it has sent: with rows of
/// 256 KiB and a 1 MiB cap, a relay whose sends wait for a broker that is down holds a few
/// keys at a time (it leased 40 at once, 10 MiB read, when only sent bytes counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_cap_bounds_the_rows_a_relay_reads() {
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = support::unique("outpost.mock.bytes").replace('_', ".");
    mock.create_topic(&topic, 1, 1).expect("mock topic");
    let store = support::store().await;
    let events: Vec<OutboxEvent> = (0..40)
        .map(|i| {
            let env = outpost::EventEnvelope::new(
                "outpost.test.v1",
                "outpost-tests",
                serde_json::json!({ "key": format!("k{i}"), "seq": 0, "blob": "x".repeat(256 << 10) }),
            );
            let aggregate = outpost::Aggregate::new("test", format!("k{i}"));
            OutboxEvent::from_envelope(&env, topic.clone(), aggregate).unwrap()
        })
        .collect();
    stage_in_one_transaction(&store, &events).await;
    mock.broker_down(1).unwrap();
    let mut cfg = support::relay_config(&support::unique("bytes"));
    cfg.max_in_flight_bytes = 1 << 20;
    let relay = outpost::Relay::new(
        store.clone(),
        support::producer(&mock.bootstrap_servers()),
        cfg,
    )
    .unwrap()
    .with_wake_signal(outpost::WakeSignal::new());
    let running = support::spawn(relay);
    let leased = || async {
        sqlx::query_scalar::<_, i64>(&format!(
            "SELECT count(*) FROM {} WHERE lease_owner IS NOT NULL",
            store.table().keys()
        ))
        .fetch_one(store.pool())
        .await
        .unwrap()
    };
    // Through the first sends' 1.5 s delivery timeout and the claims after it.
    let (mut most, started) = (0, Instant::now());
    while started.elapsed() < Duration::from_secs(3) {
        most = most.max(leased().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.stop().await;
    mock.broker_up(1).unwrap();
    assert!(
        (1..=6).contains(&most),
        "{most} keys of 256 KiB held at once"
    );
}

/// Stages `events` in one committed transaction.
async fn stage_in_one_transaction(store: &OutboxStore, events: &[OutboxEvent]) {
    let mut tx = store.pool().begin().await.unwrap();
    for event in events {
        store.stage(&mut tx, event).await.unwrap().expect("new row");
    }
    tx.commit().await.unwrap();
}
