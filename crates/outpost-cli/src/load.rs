//! `outpost load`: publish a steady stream of events in one mode and record, in a ledger
//! table, every event that was committed (Kafka-first: every publish that returned
//! success), so that `outpost verify` can tell what a fault cost.
//!
//! One task publishes in turn, so per key the ledger's `seq` is the commit order. In the
//! transactional and outbox-only modes the ledger row is written in the event's own
//! transaction: a crash can never leave a ledger row without its event, or the reverse.
//! In Kafka-first a row is written `pending` before the publish (the caller's own state
//! change, committed) and turned `committed` once it returned success: a process killed
//! in between leaves the publish in doubt, which is Kafka-first's documented window.

use std::time::{Duration, Instant};

use anyhow::Context;
use outpost::{
    Aggregate, EventEnvelope, Mode, OutboxEvent, OutboxStore, OutboxTable, Publisher,
    PublisherConfig,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;

/// Partitions of a topic `load` creates.
pub(crate) const PARTITIONS: i32 = 4;

/// What to publish.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub mode: Mode,
    /// Events per second.
    pub rate: f64,
    pub duration: Duration,
    pub keys: usize,
    pub payload_bytes: usize,
    /// Topic to publish to (default: the ledger's, else a new one).
    pub topic: Option<String>,
    /// Every n-th event is a poison one: a body padded to `POISON_BYTES`.
    pub poison_every: Option<u32>,
}

/// Body padding of a poison event: more than a producer limited to a few KB accepts.
pub const POISON_BYTES: usize = 16 * 1024;

/// What a run published.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub mode: &'static str,
    pub topic: String,
    /// The ledger table (`schema.table`), for `outpost verify --ledger`.
    pub ledger: String,
    /// Events committed (Kafka-first: acknowledged or stored) and recorded in the ledger.
    pub committed: u64,
    /// Of those, events left in the outbox for the relay (Kafka-first fallbacks; every
    /// event in the outbox-only mode; eager misses in the transactional one).
    pub via_outbox: u64,
    /// Publishes that returned an error (not in the ledger).
    pub failed: u64,
    /// Poison events committed (see `--poison-every`).
    pub poisoned: u64,
    pub elapsed_ms: f64,
    /// Committed events per second achieved.
    pub rate: f64,
}

/// The ledger's table name inside the outbox's schema.
const LEDGER_TABLE: &str = "outpost_load_ledger";

/// `--ledger schema.table` (quotes allowed), validated like every table name Outpost puts
/// into SQL.
pub fn ledger_table(name: &str) -> anyhow::Result<OutboxTable> {
    let plain = name.replace('"', "");
    let invalid =
        |why: String| anyhow::anyhow!("invalid --ledger {name:?}: expected schema.table ({why})");
    let (schema, table) = plain
        .split_once('.')
        .ok_or_else(|| invalid("no `.`".into()))?;
    OutboxTable::with_table(schema, table).map_err(|e| invalid(e.to_string()))
}

/// Publishes `plan` until its duration is over or `stop` is cancelled.
pub async fn run(
    settings: &Settings,
    store: OutboxStore,
    plan: &LoadPlan,
    stop: CancellationToken,
) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(
        plan.rate.is_finite() && plan.rate > 0.0,
        "--rate must be a positive number of events per second"
    );
    anyhow::ensure!(plan.keys > 0, "--keys must be positive");
    store.migrate().await?;
    let ledger = OutboxTable::with_table(settings.table.schema(), LEDGER_TABLE)?;
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {ledger} (event_id UUID PRIMARY KEY, topic TEXT NOT NULL, \
         event_key TEXT NOT NULL, seq BIGINT NOT NULL, \
         state TEXT NOT NULL DEFAULT 'committed', \
         committed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())"
    ))
    .execute(store.pool())
    .await
    .with_context(|| format!("cannot create the ledger {ledger}"))?;
    // A second run on the same schema continues the ledger (its topic, its sequence), so a
    // publisher killed and started again is judged as one stream.
    let (last_topic, mut seq): (Option<String>, i64) = sqlx::query_as(&format!(
        "SELECT (SELECT topic FROM {ledger} ORDER BY seq DESC LIMIT 1), \
                COALESCE(max(seq) + 1, 0) FROM {ledger}"
    ))
    .fetch_one(store.pool())
    .await
    .with_context(|| format!("cannot read the ledger {ledger}"))?;
    let topic = match (&plan.topic, last_topic) {
        (Some(topic), _) => topic.clone(),
        (None, Some(topic)) => topic,
        (None, None) => settings.new_topic("outpost.load", PARTITIONS).await?,
    };
    let mut config = PublisherConfig::new(&settings.relay.service, settings.environment);
    config.mode = plan.mode;
    config.delivery = settings.relay.clone();
    let waker = settings.waker(store.pool().clone()).await?;
    let publisher = Publisher::new(store.clone(), settings.producer()?, waker, config)?;

    let payload = "x".repeat(plan.payload_bytes);
    let poison_pad = "x".repeat(POISON_BYTES);
    let mut poisoned = 0u64;
    let record = format!(
        "INSERT INTO {ledger} (event_id, topic, event_key, seq, state) VALUES ($1, $2, $3, $4, $5)"
    );
    let settle = format!(
        "UPDATE {ledger} SET state = $2, committed_at = clock_timestamp() WHERE event_id = $1"
    );
    let ledger_sql = LedgerSql {
        record: &record,
        settle: &settle,
    };
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / plan.rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let (mut committed, mut via_outbox, mut failed) = (0u64, 0u64, 0u64);
    while started.elapsed() < plan.duration {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let key = format!("k{}", seq % plan.keys as i64);
        let poison = plan
            .poison_every
            .is_some_and(|n| n > 0 && (seq + 1) % i64::from(n) == 0);
        let pad = if poison { &poison_pad } else { &payload };
        let envelope = EventEnvelope::new(
            "outpost.load.v1",
            settings.relay.service.clone(),
            serde_json::json!({ "key": key, "seq": seq, "pad": pad }),
        );
        let event = OutboxEvent::from_envelope(&envelope, &topic, Aggregate::new("load", &key))?;
        let done = publish(&publisher, plan.mode, &event, ledger_sql, seq).await;
        match done {
            Ok(direct) => {
                committed += 1;
                poisoned += u64::from(poison);
                via_outbox += u64::from(!direct);
            }
            Err(e) => {
                failed += 1;
                tracing::warn!(error = %e, seq, "publish failed; not in the ledger");
            }
        }
        seq += 1;
    }
    publisher.shutdown(Duration::from_secs(10)).await;
    let elapsed = started.elapsed().as_secs_f64();
    Ok(LoadReport {
        mode: plan.mode.as_str(),
        topic,
        ledger: format!("{}.{}", ledger.schema(), ledger.table()),
        committed,
        via_outbox,
        failed,
        poisoned,
        elapsed_ms: elapsed * 1000.0,
        rate: committed as f64 / elapsed.max(f64::EPSILON),
    })
}

/// The ledger's statements: insert a row in a state, and move it to another.
#[derive(Clone, Copy)]
struct LedgerSql<'a> {
    record: &'a str,
    settle: &'a str,
}

/// Publishes `event` in `mode` and records it in the ledger once it is safe; true when it
/// reached Kafka without the relay.
async fn publish(
    publisher: &Publisher,
    mode: Mode,
    event: &OutboxEvent,
    ledger: LedgerSql<'_>,
    seq: i64,
) -> anyhow::Result<bool> {
    let ledger_row = |state: &'static str| {
        sqlx::query(ledger.record)
            .bind(event.event_id)
            .bind(&event.topic)
            .bind(&event.event_key)
            .bind(seq)
            .bind(state)
    };
    let pool = publisher.store().pool();
    match mode {
        Mode::KafkaFirst => {
            // `pending` first, as a caller commits its own state before it publishes;
            // `committed` once publish() returned success (acked, or stored in the
            // outbox). A kill in between leaves the row pending: the publish in doubt.
            ledger_row("pending").execute(pool).await?;
            let outcome = publisher.publish(event).await;
            let state = if outcome.is_ok() {
                "committed"
            } else {
                "failed"
            };
            sqlx::query(ledger.settle)
                .bind(event.event_id)
                .bind(state)
                .execute(pool)
                .await?;
            Ok(outcome? == outpost::PublishPath::Direct)
        }
        Mode::Transactional | Mode::OutboxOnly | Mode::Wal => {
            let mut tx = publisher.begin().await?;
            tx.publish(event).await?;
            ledger_row("committed").execute(&mut *tx).await?;
            Ok(tx.commit().await?.eager_published > 0)
        }
    }
}
