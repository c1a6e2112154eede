//! `outpost quickstart`: publish events in one or more modes, consume them back from the
//! broker, and report what arrived and how fast.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use outpost::{
    Aggregate, EventEnvelope, Mode, OutboxEvent, OutboxStore, Publisher, PublisherConfig, Relay,
    WakeSignal,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::settings::Settings;

const PARTITIONS: i32 = 4;

/// What one mode's run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub environment: String,
    pub wake: String,
    pub topic: String,
    pub warm_up_ms: f64,
    pub staged: usize,
    pub delivered: usize,
    pub duplicates: usize,
    pub order_violations: usize,
    pub eager_published: usize,
    pub via_outbox: usize,
    pub elapsed_ms: f64,
    pub events_per_sec: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
}

impl Report {
    pub fn print(&self) {
        println!(
            "outpost quickstart: {} mode ({} environment, wake-up via {})",
            self.mode, self.environment, self.wake
        );
        println!("  topic              {}", self.topic);
        println!(
            "  warm-up event      {:.1} ms (producer start, not counted)",
            self.warm_up_ms
        );
        println!("  staged             {}", self.staged);
        println!("  delivered          {}", self.delivered);
        println!("  duplicates         {}", self.duplicates);
        println!("  order violations   {}", self.order_violations);
        println!(
            "  paths              {} eager/direct, {} via the outbox relay",
            self.eager_published, self.via_outbox
        );
        println!("  elapsed            {:.1} ms", self.elapsed_ms);
        println!("  throughput         {:.0} events/s", self.events_per_sec);
        println!(
            "  staged→consumed    p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.latency_p50_ms, self.latency_p99_ms, self.latency_max_ms
        );
    }
}

struct Received {
    event_id: Uuid,
    key: String,
    seq: u64,
    at: Instant,
}

/// Runs quickstart for each of `modes` in turn.
pub async fn run(
    settings: &Settings,
    store: OutboxStore,
    modes: &[Mode],
    events: usize,
    keys: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Report>> {
    anyhow::ensure!(events > 0, "--events must be positive");
    store.migrate().await?;
    let mut reports = Vec::new();
    for &mode in modes {
        let keys = keys.max(1);
        let concurrency = concurrency.clamp(1, keys);
        reports.push(run_mode(settings, &store, mode, events, keys, concurrency).await?);
    }
    Ok(reports)
}

async fn run_mode(
    settings: &Settings,
    store: &OutboxStore,
    mode: Mode,
    events: usize,
    keys: usize,
    concurrency: usize,
) -> anyhow::Result<Report> {
    let topic = settings.new_topic("outpost.quickstart", PARTITIONS).await?;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = consume(&settings.brokers, &topic, tx)?;

    let shutdown = CancellationToken::new();
    let signal = WakeSignal::new();
    let pool = store.pool().clone();
    crate::start_listener(
        settings,
        &settings.services[0],
        &signal,
        pool.clone(),
        &shutdown,
    )?;
    let producer = settings.producer()?;
    let relay = Relay::new(store.clone(), Arc::clone(&producer), settings.relay.clone())?
        .with_wake_signal(signal);
    let relay_task = tokio::spawn(relay.run(shutdown.clone().cancelled_owned()));
    let waker = settings.waker(pool.clone()).await?;
    let mut config = PublisherConfig::new(&settings.relay.service, settings.environment);
    config.mode = mode;
    config.delivery = settings.relay.clone();
    let publisher = Publisher::new(store.clone(), producer, waker, config)?;

    // The first send of an idempotent producer waits ~0.5 s for its producer id; deliver
    // one warm-up event first so the figures describe the steady state.
    let warm_up_started = Instant::now();
    let warm_up = event(&topic, &settings.relay.service, "warm-up", 0)?;
    publisher.publish(&warm_up).await?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .context("warm-up event was not consumed back within 30 s")?
            .context("consumer stopped")?;
        if msg.event_id == warm_up.event_id {
            break;
        }
    }
    let warm_up_ms = warm_up_started.elapsed().as_secs_f64() * 1000.0;

    // Each task owns a set of keys and publishes them in order, so per-key order is
    // defined; tasks run concurrently.
    let staged_at: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..concurrency {
        let publisher = publisher.clone();
        let staged_at = Arc::clone(&staged_at);
        let topic = topic.clone();
        let service = settings.relay.service.clone();
        tasks.push(tokio::spawn(async move {
            let mut eager = 0;
            for seq in (0..events).filter(|seq| (seq % keys) % concurrency == task) {
                let key = format!("key-{}", seq % keys);
                let ev = event(&topic, &service, &key, seq)?;
                let t0 = Instant::now();
                staged_at.lock().unwrap().insert(ev.event_id, t0);
                if publisher_send(&publisher, &ev).await? {
                    eager += 1;
                }
            }
            anyhow::Ok(eager)
        }));
    }
    let mut eager_published = 0;
    for t in tasks {
        eager_published += t.await??;
    }

    let staged_at = std::mem::take(&mut *staged_at.lock().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60) + Duration::from_millis(events as u64);
    let mut seen = HashSet::with_capacity(events);
    let mut duplicates = 0;
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut order_violations = 0;
    let mut latencies = Vec::with_capacity(events);
    let mut last_at = started;
    while seen.len() < events {
        let Some(remaining) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        let Ok(Some(msg)) = tokio::time::timeout(remaining, rx.recv()).await else {
            break;
        };
        let Some(t0) = staged_at.get(&msg.event_id) else {
            continue;
        };
        if !seen.insert(msg.event_id) {
            duplicates += 1;
            continue;
        }
        if last_seq.get(&msg.key).is_some_and(|&prev| prev > msg.seq) {
            order_violations += 1;
        }
        last_seq.insert(msg.key.clone(), msg.seq);
        latencies.push(msg.at.duration_since(*t0));
        last_at = last_at.max(msg.at);
    }
    publisher.shutdown(Duration::from_secs(5)).await;
    shutdown.cancel();
    relay_task.await??;
    consumer.abort();

    latencies.sort();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let idx = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[idx].as_secs_f64() * 1000.0
    };
    let elapsed = last_at.duration_since(started).as_secs_f64();
    let report = Report {
        mode: mode.as_str(),
        environment: format!("{:?}", settings.environment).to_lowercase(),
        wake: format!("{:?}", settings.wake).to_lowercase(),
        topic,
        warm_up_ms,
        staged: events,
        delivered: seen.len(),
        duplicates,
        order_violations,
        eager_published,
        via_outbox: events - eager_published,
        elapsed_ms: elapsed * 1000.0,
        events_per_sec: if elapsed > 0.0 {
            seen.len() as f64 / elapsed
        } else {
            0.0
        },
        latency_p50_ms: pct(0.50),
        latency_p99_ms: pct(0.99),
        latency_max_ms: pct(1.0),
    };
    anyhow::ensure!(
        report.delivered == events,
        "{} mode: only {} of {} events were consumed back before the deadline",
        mode.as_str(),
        report.delivered,
        events
    );
    Ok(report)
}

fn event(topic: &str, service: &str, key: &str, seq: usize) -> anyhow::Result<OutboxEvent> {
    let envelope = EventEnvelope::new(
        "outpost.quickstart.v1",
        service.to_owned(),
        serde_json::json!({ "seq": seq, "key": key }),
    );
    Ok(OutboxEvent::from_envelope(
        &envelope,
        topic,
        Aggregate::new("quickstart", key),
    )?)
}

/// Publishes one event the way the mode's callers would; true when it went to Kafka
/// without the relay.
async fn publisher_send(publisher: &Publisher, ev: &OutboxEvent) -> anyhow::Result<bool> {
    Ok(match publisher.mode() {
        Mode::KafkaFirst => publisher.publish(ev).await? == outpost::PublishPath::Direct,
        Mode::Transactional | Mode::OutboxOnly | Mode::Wal => {
            let mut tx = publisher.begin().await?;
            tx.publish(ev).await?;
            tx.commit().await?.eager_published > 0
        }
    })
}

/// Reads every partition of `topic` from the beginning, without a consumer group (no
/// rebalance wait), forwarding what it sees.
fn consume(
    brokers: &str,
    topic: &str,
    tx: mpsc::UnboundedSender<Received>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("outpost-quickstart-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "1")
        .set("reconnect.backoff.max.ms", "500")
        .create()
        .context("cannot create kafka consumer")?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(msg) = consumer.recv().await else {
                continue;
            };
            let at = Instant::now();
            let event_id = msg
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "event_id").and_then(|h| h.value))
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|s| s.parse().ok());
            let body: Option<EventEnvelope<serde_json::Value>> =
                msg.payload().and_then(|p| serde_json::from_slice(p).ok());
            let (Some(event_id), Some(body)) = (event_id, body) else {
                continue;
            };
            let received = Received {
                event_id,
                key: body.data["key"].as_str().unwrap_or_default().to_owned(),
                seq: body.data["seq"].as_u64().unwrap_or_default(),
                at,
            };
            if tx.send(received).is_err() {
                return;
            }
        }
    }))
}
