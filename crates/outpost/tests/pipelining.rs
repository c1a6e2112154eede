//! Many rows of one key in flight at once, and row N failing while N+1.. are in flight:
//! no event of a key is ever delivered after a later one of the same key. Faults come from
//! librdkafka's mock cluster (deterministic, per Produce request) and from a real tansu
//! broker paused mid-stream.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use outpost::{OutboxEvent, OutboxStore, Relay, WakeSignal};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const EVENTS: usize = 300;

/// First deliveries of each key, in the order read: their sequence numbers must rise.
fn assert_first_deliveries_in_order(consumed: &[support::Consumed]) {
    support::assert_key_order(consumed);
}

async fn start_relay(
    store: &OutboxStore,
    brokers: &str,
    service: &str,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<outpost::Result<()>>,
) {
    let mut cfg = support::relay_config(service);
    cfg.per_key = EVENTS; // the whole key in flight at once
                          // Small requests, so a key's rows span many of them and faults hit the middle.
    let producer = support::producer_config(brokers).with("batch.num.messages", "10");
    let producer = std::sync::Arc::new(outpost::KafkaProducer::new(producer).unwrap());
    let relay = Relay::new(store.clone(), producer, cfg)
        .unwrap()
        .with_wake_signal(WakeSignal::new());
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone().cancelled_owned()));
    (stop, task)
}

async fn dead_ids(store: &OutboxStore) -> Vec<Uuid> {
    sqlx::query_scalar(&format!(
        "SELECT event_id FROM {} WHERE status = 'dead'",
        store.table()
    ))
    .fetch_all(store.pool())
    .await
    .unwrap()
}

/// Produce requests fail in the middle of a key's stream: some errors librdkafka retries
/// itself, one that fails its request's messages back to the relay (retriable, budgeted),
/// one transient, and one permanent (parks the messages of that request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_in_the_middle_of_a_key_never_let_a_later_event_overtake() {
    support::metrics();
    let mock = MockCluster::<DefaultProducerContext>::new(1).expect("mock cluster");
    let topic = support::unique("outpost.pipe").replace('_', ".");
    mock.create_topic(&topic, 1, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let store = support::store().await;
    let service = support::unique("pipe");
    let staged = support::stage_committed(&store, &topic, 2, EVENTS).await;
    use RDKafkaRespErr as E;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            E::RD_KAFKA_RESP_ERR_NO_ERROR,
            E::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            E::RD_KAFKA_RESP_ERR_NO_ERROR,
            E::RD_KAFKA_RESP_ERR_UNKNOWN,
            E::RD_KAFKA_RESP_ERR_NO_ERROR,
            E::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            E::RD_KAFKA_RESP_ERR_NO_ERROR,
            E::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
        ],
    );
    let (stop, task) = start_relay(&store, &brokers, &service).await;
    support::eventually(Duration::from_secs(60), "nothing pending", || {
        let store = store.clone();
        async move { (support::count_status(&store, "pending").await == 0).then_some(()) }
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();

    let parked = dead_ids(&store).await;
    let delivered: Vec<&OutboxEvent> = staged
        .iter()
        .filter(|e| !parked.contains(&e.event_id))
        .collect();
    let ids: Vec<Uuid> = delivered.iter().map(|e| e.event_id).collect();
    let collector = support::Collector::start(&brokers, &topic, 1);
    let consumed = collector.wait_for(&ids, Duration::from_secs(30)).await;
    let consumed = support::settled(&collector, consumed.len(), Duration::from_secs(1)).await;
    println!(
        "{} staged, {} parked, {} read back ({} copies)",
        staged.len(),
        parked.len(),
        ids.len(),
        consumed.len()
    );
    let failed: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE failures > 0",
        store.table()
    ))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert!(failed > 0, "the budgeted failure hit a row");
    assert!(
        !parked.is_empty(),
        "the permanent failure parked a request's rows"
    );
    assert!(
        consumed.iter().all(|c| !parked.contains(&c.event_id)),
        "a parked event reached the broker"
    );
    assert_first_deliveries_in_order(&consumed);
    assert_eq!(
        support::metric(outpost::metrics::ORDER_BREAKS, &service, &[]),
        0.0
    );
}

/// A real broker paused while a key has hundreds of rows in flight, for longer than the
/// delivery timeout: every row fails, the key backs off and starts again at its first
/// unsent row once the broker is back. Nothing is parked, every event arrives, and first
/// deliveries keep each key's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_paused_with_a_key_in_flight_keeps_the_key_in_order() {
    support::metrics();
    let broker = support::PrivateBroker::start().await;
    let brokers = broker.brokers();
    let topic = support::topic_on(&brokers, 2).await;
    let store = support::store().await;
    let service = support::unique("pipe");
    let collector = support::Collector::start(&brokers, &topic, 2);
    let (stop, task) = start_relay(&store, &brokers, &service).await;
    let warm = support::stage_committed(&store, &topic, 2, 2).await;
    collector
        .wait_for(
            &warm.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            Duration::from_secs(30),
        )
        .await;

    broker.pause();
    let mut staged = warm;
    for i in 0..EVENTS {
        staged.push(support::event(&topic, &format!("k{}", i % 2), 1 + i / 2));
    }
    let mut tx = store.pool().begin().await.unwrap();
    for ev in &staged[2..] {
        store.stage(&mut tx, ev).await.unwrap();
    }
    tx.commit().await.unwrap();
    support::eventually(Duration::from_secs(30), "sends fail while paused", || {
        let store = store.clone();
        async move {
            let failed: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {} WHERE status = 'pending' AND attempts > 0",
                store.table()
            ))
            .fetch_one(store.pool())
            .await
            .unwrap();
            (failed > 0).then_some(())
        }
    })
    .await;
    broker.resume();

    let ids: Vec<Uuid> = staged.iter().map(|e| e.event_id).collect();
    let consumed = collector.wait_for(&ids, Duration::from_secs(90)).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let mut copies: HashMap<Uuid, usize> = HashMap::new();
    for c in &consumed {
        *copies.entry(c.event_id).or_default() += 1;
    }
    println!(
        "{} events, {} copies read back",
        staged.len(),
        consumed.len()
    );
    assert_eq!(support::count_status(&store, "dead").await, 0);
    assert_first_deliveries_in_order(&consumed);
    assert_eq!(
        support::metric(outpost::metrics::ORDER_BREAKS, &service, &[]),
        0.0
    );
}
