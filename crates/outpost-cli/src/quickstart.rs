//! `outpost quickstart`: stage events, let the relay deliver them, consume them back.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use outpost::{Aggregate, EventEnvelope, OutboxEvent, OutboxStore, Relay, WakeSignal, Waker};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cli::{Cli, Wake};
use crate::settings::Settings;

const PARTITIONS: i32 = 4;

/// What quickstart measured.
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
    pub elapsed_ms: f64,
    pub events_per_sec: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
}

impl Report {
    pub fn print(&self) {
        println!(
            "outpost quickstart ({} mode, {} environment, wake-up via {})",
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

pub async fn run(
    cli: &Cli,
    settings: &Settings,
    store: OutboxStore,
    events: usize,
    keys: usize,
    _json: bool,
) -> anyhow::Result<Report> {
    anyhow::ensure!(events > 0, "--events must be positive");
    let keys = keys.max(1);
    store.migrate().await?;
    let topic = format!("outpost.quickstart.{}", Uuid::new_v4().simple());
    outpost::producer::create_topic(&cli.brokers, &topic, PARTITIONS, Duration::from_secs(10))
        .await
        .with_context(|| format!("cannot create topic on OUTPOST_BROKERS={}", cli.brokers))?;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = consume(&cli.brokers, &topic, tx)?;

    let shutdown = CancellationToken::new();
    let signal = WakeSignal::new();
    let pool = store.pool().clone();
    crate::start_listener(cli, settings, &signal, pool.clone(), &shutdown)?;
    let relay = Relay::new(store.clone(), settings.producer()?, settings.relay.clone())?
        .with_wake_signal(signal);
    let relay_task = tokio::spawn(relay.run(shutdown.clone().cancelled_owned()));
    let waker = match cli.wake {
        Wake::Redis => match Waker::redis(&cli.redis_url, &settings.relay.service).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "redis unavailable; relying on polling");
                Waker::None
            }
        },
        Wake::Notify => Waker::notify(pool.clone(), &settings.relay.service)?,
        Wake::None => Waker::None,
    };

    // The first send of an idempotent producer waits ~0.5 s for its producer id; deliver
    // one warm-up event first so the figures describe the steady state.
    let warm_up_started = Instant::now();
    let warm_up = EventEnvelope::new(
        "outpost.quickstart.warmup.v1",
        settings.relay.service.clone(),
        serde_json::json!({ "seq": 0, "key": "warm-up" }),
    );
    let event =
        OutboxEvent::from_envelope(&warm_up, &topic, Aggregate::new("quickstart", "warm-up"))?;
    let mut txn = pool.begin().await?;
    store.stage(&mut txn, &event).await?;
    txn.commit().await?;
    waker.nudge().await;
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

    let started = Instant::now();
    let mut staged_at: HashMap<Uuid, Instant> = HashMap::with_capacity(events);
    for seq in 0..events {
        let key = format!("key-{}", seq % keys);
        let envelope = EventEnvelope::new(
            "outpost.quickstart.v1",
            settings.relay.service.clone(),
            serde_json::json!({ "seq": seq, "key": key }),
        );
        let event =
            OutboxEvent::from_envelope(&envelope, &topic, Aggregate::new("quickstart", &key))?;
        let t0 = Instant::now();
        let mut txn = pool.begin().await?;
        store.stage(&mut txn, &event).await?;
        txn.commit().await?;
        waker.nudge().await;
        staged_at.insert(envelope.event_id, t0);
    }

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
        let msg: Received = msg;
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
    shutdown.cancel();
    relay_task.await??;
    drop(consumer);

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
        mode: "outbox",
        environment: format!("{:?}", settings.environment).to_lowercase(),
        wake: format!("{:?}", cli.wake).to_lowercase(),
        topic,
        warm_up_ms,
        staged: events,
        delivered: seen.len(),
        duplicates,
        order_violations,
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
        "only {} of {} events were consumed back before the deadline",
        report.delivered,
        events
    );
    Ok(report)
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
