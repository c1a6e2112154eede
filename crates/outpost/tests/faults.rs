//! Broker outages against a private tansu broker: paused (SIGSTOP) and killed/restarted,
//! each for longer than several retry intervals and delivery timeouts.

mod support;

use std::time::Duration;

use outpost::{Relay, WakeSignal};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

enum Outage {
    Pause,
    KillAndRestart,
}

async fn survive(outage: Outage) {
    let mut broker = support::PrivateBroker::start().await;
    let brokers = broker.brokers();
    let store = support::store().await;
    let topic = support::topic_on(&brokers, 2).await;
    let service = support::unique("svc");
    let relay = Relay::new(
        store.clone(),
        support::producer(&brokers),
        support::relay_config(&service),
    )
    .unwrap()
    .with_wake_signal(WakeSignal::new());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(relay.run(shutdown.clone().cancelled_owned()));

    let mut staged = support::stage_committed(&store, &topic, 4, 40).await;
    let collector = support::Collector::start(&brokers, &topic, 2);
    let before: Vec<Uuid> = staged.iter().map(|e| e.event_id).collect();
    let mut consumed = collector.wait_for(&before, Duration::from_secs(30)).await;
    drop(collector);

    // The outage lasts well past the 1.5 s delivery timeout and the 50–500 ms retry delays.
    match outage {
        Outage::Pause => broker.pause(),
        Outage::KillAndRestart => broker.kill(),
    }
    for seq in 0..40 {
        let key = format!("k{}", seq % 4);
        let ev = support::event(&topic, &key, 100 + seq);
        let mut tx = store.pool().begin().await.unwrap();
        store.stage(&mut tx, &ev).await.unwrap();
        tx.commit().await.unwrap();
        staged.push(ev);
    }
    support::eventually(
        Duration::from_secs(20),
        "relay hits delivery failures",
        || {
            let store = store.clone();
            async move {
                let failing: i64 = sqlx::query_scalar(&format!(
                    "SELECT count(*) FROM {} WHERE status = 'pending' AND attempts >= 2",
                    store.table()
                ))
                .fetch_one(store.pool())
                .await
                .unwrap();
                (failing > 0).then_some(())
            }
        },
    )
    .await;
    assert_eq!(support::count_status(&store, "dead").await, 0);
    match outage {
        Outage::Pause => broker.resume(),
        Outage::KillAndRestart => {
            broker.restart().await;
            // Memory storage lost the topic; recreate it as an operator would.
            outpost::kafka::producer::create_topic(&brokers, &topic, 2, Duration::from_secs(10))
                .await
                .unwrap();
        }
    }

    // The relay's producer may have re-created the topic (auto-create, broker default
    // partition count) before we did: read every partition it has.
    let partitions = support::partitions_of(&brokers, &topic);
    let collector = support::Collector::start(&brokers, &topic, partitions);
    let after: Vec<Uuid> = staged[40..].iter().map(|e| e.event_id).collect();
    match collector
        .try_wait_for(&after, Duration::from_secs(60))
        .await
    {
        Ok(seen) => consumed.extend(seen),
        Err(missing) => {
            use rdkafka::consumer::Consumer;
            let probe: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .unwrap();
            let reported = probe
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .map(|m| m.topics()[0].partitions().len());
            let watermarks: Vec<_> = (0..partitions)
                .map(|p| probe.fetch_watermarks(&topic, p, Duration::from_secs(5)))
                .collect();
            panic!(
                "{missing} of 40 events not consumed within 60 s; topic partitions {reported:?}, \
                 watermarks {watermarks:?}; collector read {}; table: {} pending, {} published",
                collector.snapshot().len(),
                support::count_status(&store, "pending").await,
                support::count_status(&store, "published").await,
            );
        }
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("relay drains")
        .unwrap()
        .unwrap();

    assert_eq!(
        support::count_status(&store, "dead").await,
        0,
        "nothing parked"
    );
    assert_eq!(support::count_status(&store, "pending").await, 0);
    support::assert_key_order(&consumed);
    let max_attempts: i32 =
        sqlx::query_scalar(&format!("SELECT max(attempts) FROM {}", store.table()))
            .fetch_one(store.pool())
            .await
            .unwrap();
    println!("outage survived; most attempts for one event: {max_attempts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_broker_loses_and_parks_nothing() {
    survive(Outage::Pause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_broker_loses_and_parks_nothing() {
    survive(Outage::KillAndRestart).await;
}
