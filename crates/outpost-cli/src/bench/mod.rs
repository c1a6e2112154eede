//! `outpost bench`: measures this machine's raw limits (librdkafka produce, PostgreSQL
//! INSERT+COMMIT, a drain with none of Outpost's guarantees) and Outpost's figures in one
//! run, and prints each Outpost figure with its ratio to the raw limit it is bounded by.
//!
//! Every phase works in a schema of its own (`bench_{run}_{phase}`), dropped at the end,
//! and sends to one fresh topic. Backlogs are staged in one `INSERT ... SELECT
//! generate_series` of real envelopes (1 KiB, each with its own event id in the payload and
//! the header), and drained by `outpost relay` child processes, so the relay's peak RSS is
//! its own. `--quick` runs the same code on small sizes (what `make test` runs).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use chrono::{DateTime, Utc};
use futures::stream::{FuturesUnordered, StreamExt};
use outpost::{
    Aggregate, EventEnvelope, Mode, OutboxEvent, OutboxStore, OutboxTable, Publisher,
    PublisherConfig, Relay, WakeSignal, Waker,
};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Executor, Row};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

mod raw_drain;
mod wal;

use crate::cli::{Cli, Wake};
use crate::settings::Settings;

/// Partitions of the bench topic (the drains spread keys over them).
const PARTITIONS: i32 = 8;
/// Size of every payload: a serialized envelope padded to this many bytes.
const PAYLOAD_BYTES: usize = 1024;
/// The production polling interval the fallback relay idles at.
const PRODUCTION_POLL: Duration = Duration::from_secs(5);
/// Keys of the "many keys" claim-cost backlogs.
const EXPLAIN_KEYS: usize = 10_000;

/// How much each phase does; `--quick` shrinks everything.
#[derive(Debug, Clone, Serialize)]
struct Sizes {
    sequential: usize,
    pipelined: usize,
    commits: usize,
    fallback: usize,
    drain: usize,
    drain_keys: [usize; 3],
    relays: [usize; 2],
    /// Backlog sizes of the claim-cost plans; the many-key ones are each drained, and the
    /// largest one's rate is compared with the one before it.
    backlogs: [usize; 3],
    explain_keys: usize,
    /// WAL mode's drains: (events, keys).
    wal_drains: Vec<(usize, usize)>,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        // Sequential samples (sends, commits, Kafka-first publishes), pipelined sends,
        // wake-ups, drained events, claim-cost backlogs, keys of the many-key backlogs.
        let (sequential, pipelined, fallback, drain, backlogs, explain_keys) = if quick {
            (100, 2_000, 5, 2_000, [500, 1_000, 4_000], 100)
        } else {
            (
                2_000,
                100_000,
                200,
                100_000,
                [10_000, 100_000, 1_000_000],
                EXPLAIN_KEYS,
            )
        };
        Self {
            sequential,
            pipelined,
            commits: sequential,
            fallback,
            drain,
            drain_keys: [1, 16, drain],
            relays: [1, 3],
            backlogs,
            explain_keys,
            wal_drains: if quick {
                vec![(drain, 1), (drain, drain)]
            } else {
                vec![
                    (100_000, 1),
                    (100_000, 100_000),
                    (1_000_000, 1),
                    (1_000_000, 100_000),
                ]
            },
        }
    }
}

/// The Kafka-first phase: `publish()`, the raw produce beside it, and the outbox check
/// `publish()` makes, timed alone beside them.
struct KafkaFirst {
    direct: Latency,
    raw: Latency,
    check: Latency,
    /// Publishes acked directly (the others fell back to the outbox).
    direct_paths: usize,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
struct Latency {
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

impl Latency {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let at = |p: f64| -> f64 {
            if samples.is_empty() {
                return f64::NAN;
            }
            let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
            ms(samples[i])
        };
        Self {
            n: samples.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: at(1.0),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One line of the table: an Outpost figure, the raw limit it is compared with, the target.
#[derive(Debug, Clone, Serialize)]
struct Line {
    name: String,
    value: f64,
    unit: &'static str,
    raw: Option<f64>,
    /// `value / raw`.
    ratio: Option<f64>,
    target: Option<String>,
    met: Option<bool>,
}

impl Line {
    fn new(name: impl Into<String>, value: f64, unit: &'static str, raw: Option<f64>) -> Self {
        Self {
            name: name.into(),
            value,
            unit,
            raw,
            ratio: raw.map(|r| value / r),
            target: None,
            met: None,
        }
    }

    fn target(mut self, target: impl Into<String>, met: bool) -> Self {
        self.target = Some(target.into());
        self.met = Some(met);
        self
    }
}

/// An envelope serialized once; instances differ only in event id (payload and header)
/// and key.
struct Template {
    event: OutboxEvent,
    /// Byte offset of the event id inside the payload.
    id_at: usize,
}

impl Template {
    fn new(service: &str, topic: &str) -> anyhow::Result<Self> {
        let build = |pad: usize| {
            let envelope = EventEnvelope::new(
                "outpost.bench.v1",
                service.to_owned(),
                json!({ "seq": 0, "pad": "x".repeat(pad) }),
            );
            OutboxEvent::from_envelope(&envelope, topic, Aggregate::new("bench", "bench-0"))
        };
        let bare = build(0)?.payload.len();
        let event = build(PAYLOAD_BYTES.saturating_sub(bare))?;
        let id = event.event_id.to_string();
        let id_at = event
            .payload
            .windows(id.len())
            .position(|w| w == id.as_bytes())
            .context("the envelope does not carry its event id")?;
        Ok(Self { event, id_at })
    }

    fn instance(&self, key: &str) -> OutboxEvent {
        let mut ev = self.event.clone();
        ev.event_id = Uuid::new_v4();
        let id = ev.event_id.to_string();
        ev.payload[self.id_at..self.id_at + id.len()].copy_from_slice(id.as_bytes());
        ev.headers.insert("event_id".into(), id);
        ev.event_key = key.to_owned();
        ev.aggregate_id = key.to_owned();
        ev
    }

    /// The payload as text and the headers as JSON, for SQL to put a fresh event id into
    /// both (the template's id is what it replaces).
    fn payload_sql(&self) -> (String, Value) {
        let payload = String::from_utf8_lossy(&self.event.payload).into_owned();
        let headers = serde_json::to_value(&self.event.headers).unwrap_or_default();
        (payload, headers)
    }
}

/// Runs the bench and prints the result (one JSON object with `json`).
///
/// # Errors
/// When a service cannot be reached, or a phase loses events.
pub async fn run(
    cli: &Cli,
    settings: &Settings,
    quick: bool,
    json: bool,
    plans: bool,
    wal_only: bool,
) -> anyhow::Result<()> {
    let sizes = Sizes::new(quick);
    let run_id = Uuid::new_v4().simple().to_string()[..10].to_owned();
    // Sixteen writers each hold a connection through commit, and their eager dispatch
    // needs more: the pool must not be what is measured.
    // Built as the README tells users to (no ping per acquire, no JIT), for the raw phases
    // and Outpost's alike.
    let pool = PgPoolOptions::new()
        .max_connections(40)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .connect_with(settings.database.clone().options([("jit", "off")]))
        .await
        .context("cannot connect to PostgreSQL (OUTPOST_DATABASE_URL)")?;
    let topic = format!("outpost.bench.{run_id}");
    outpost::kafka::producer::create_topic(
        &cli.brokers,
        &topic,
        PARTITIONS,
        Duration::from_secs(10),
    )
    .await
    .with_context(|| format!("cannot create topic on OUTPOST_BROKERS={}", cli.brokers))?;
    let bench = Bench {
        cli,
        settings,
        pool,
        run_id,
        template: Template::new(&settings.relay.service, &topic)?,
        topic,
        sizes,
        quick,
        wal_only,
    };
    let load_before = loadavg();
    let outcome = bench.measure().await;
    bench.drop_schemas().await;
    let mut report = outcome?;
    report["load_before"] = json!(load_before);
    report["load_after"] = json!(loadavg());
    if json {
        println!("{report}");
    } else {
        print_table(&report);
        if plans {
            print_plans(&report);
        }
    }
    Ok(())
}

struct Bench<'a> {
    cli: &'a Cli,
    settings: &'a Settings,
    pool: PgPool,
    run_id: String,
    topic: String,
    template: Template,
    sizes: Sizes,
    quick: bool,
    wal_only: bool,
}

impl Bench<'_> {
    fn say(&self, line: &str) {
        eprintln!("bench: {line}");
    }

    async fn measure(&self) -> anyhow::Result<Value> {
        let s = &self.sizes;
        self.say("raw produce");
        let raw = RawKafka::new(self.settings, false)?;
        let (produce_seq, produce_rate) = raw
            .measure(&self.template, s.sequential, s.pipelined)
            .await?;
        drop(raw);
        self.say("raw produce, one request in flight");
        let one = RawKafka::new(self.settings, true)?;
        // The idempotent producer's first send waits for its producer id.
        one.send(&self.template.instance("warm-up")).await?;
        let one_in_flight_rate = one.pipelined(&self.template, s.pipelined).await?;
        drop(one);
        if self.wal_only {
            let wal = wal::measure(self).await?;
            let mut lines = vec![Line::new(
                "raw produce throughput (pipelined)",
                produce_rate,
                "ev/s",
                None,
            )];
            lines.extend(wal.lines);
            return Ok(json!({
                "quick": self.quick,
                "machine": machine(),
                "raw": { "produce_pipelined_ev_per_s": produce_rate },
                "wal": wal.report,
                "lines": lines,
            }));
        }
        self.say("raw INSERT+COMMIT");
        let insert = self.raw_insert(s.sequential).await?;
        let budget = insert.p99_ms + produce_seq.p99_ms;

        let mut lines = vec![
            Line::new(
                "raw produce latency p50 (sequential)",
                produce_seq.p50_ms,
                "ms",
                None,
            ),
            Line::new(
                "raw produce latency p99 (sequential)",
                produce_seq.p99_ms,
                "ms",
                None,
            ),
            Line::new(
                "raw produce throughput (pipelined)",
                produce_rate,
                "ev/s",
                None,
            ),
            // What Outpost's producer setting costs (it keeps a timed-out request from
            // being resent behind later ones; see `kafka/producer.rs`).
            Line::new(
                "raw produce throughput (max.in.flight 1)",
                one_in_flight_rate,
                "ev/s",
                Some(produce_rate),
            ),
            Line::new("raw INSERT+COMMIT latency p50", insert.p50_ms, "ms", None),
            Line::new("raw INSERT+COMMIT latency p99", insert.p99_ms, "ms", None),
        ];

        let mut transactional = Vec::new();
        let raw_kafka = RawKafka::new(self.settings, false)?;
        raw_kafka.send(&self.template.instance("warm-up")).await?;
        for writers in [1, 4, 16] {
            // With several writers the two cores are shared by that many backends, the
            // producer and the broker: the same work done raw, by as many writers at once,
            // is the limit the figure is held against; the one-writer sum is shown too.
            self.say(&format!(
                "transactional commit→ack and raw INSERT+COMMIT then produce, interleaved, {writers} writer(s)"
            ));
            let (latency, raw, eager) = self.transactional(&raw_kafka, writers).await?;
            lines.push(Line::new(
                format!("raw COMMIT→ack p50, {writers} writers"),
                raw.p50_ms,
                "ms",
                None,
            ));
            lines.push(Line::new(
                format!("raw COMMIT→ack p99, {writers} writers"),
                raw.p99_ms,
                "ms",
                None,
            ));
            lines.push(Line::new(
                format!("transactional commit→ack p50, {writers} writers"),
                latency.p50_ms,
                "ms",
                Some(raw.p50_ms),
            ));
            lines.push(
                Line::new(
                    format!("transactional commit→ack p99, {writers} writers"),
                    latency.p99_ms,
                    "ms",
                    Some(raw.p99_ms),
                )
                .target(
                    "≤ 2× raw (INSERT+COMMIT, then produce; same writers)",
                    latency.p99_ms <= 2.0 * raw.p99_ms,
                ),
            );
            lines.push(Line::new(
                format!(
                    "transactional commit→ack p99 against the one-writer sum, {writers} writers"
                ),
                latency.p99_ms,
                "ms",
                Some(budget),
            ));
            lines.push(Line::new(
                format!("transactional commit→ack p999, {writers} writers"),
                latency.p999_ms,
                "ms",
                Some(raw.p999_ms),
            ));
            transactional.push(json!({ "writers": writers, "latency": latency, "raw": raw, "eager_hits": eager, "commits": latency.n }));
        }

        self.say("kafka-first direct publish and raw produce, interleaved");
        let KafkaFirst {
            direct,
            raw: produce_beside,
            check,
            direct_paths,
        } = self.kafka_first(&raw_kafka).await?;
        drop(raw_kafka);
        lines.push(Line::new(
            "raw produce latency p99 (beside kafka-first)",
            produce_beside.p99_ms,
            "ms",
            None,
        ));
        lines.push(Line::new(
            "kafka-first publish p50",
            direct.p50_ms,
            "ms",
            Some(produce_beside.p50_ms),
        ));
        lines.push(
            Line::new(
                "kafka-first publish p99",
                direct.p99_ms,
                "ms",
                Some(produce_beside.p99_ms),
            )
            .target(
                "≤ 1.2× raw produce (interleaved)",
                direct.p99_ms <= 1.2 * produce_beside.p99_ms,
            ),
        );
        for (name, value) in [("p50", check.p50_ms), ("p99", check.p99_ms)] {
            lines.push(Line::new(
                format!("kafka-first's outbox check {name} (beside it, alone)"),
                value,
                "ms",
                None,
            ));
        }

        self.say("fallback wake→ack, relay idling at 5 s");
        let fallback = self.fallback().await?;
        lines.push(Line::new(
            "fallback wake→ack p50",
            fallback.p50_ms,
            "ms",
            Some(produce_seq.p50_ms),
        ));
        lines.push(
            Line::new(
                "fallback wake→ack p99",
                fallback.p99_ms,
                "ms",
                Some(produce_seq.p99_ms),
            )
            .target("< 20 ms", fallback.p99_ms < 20.0),
        );

        self.say(&format!(
            "raw drain of {} events, a key each: read, produce, mark published",
            s.drain
        ));
        let raw_drain = raw_drain::measure(self, s.drain).await?;
        lines.push(Line::new(
            format!(
                "raw drain {} ev (read, produce, mark published; no ownership, no order)",
                s.drain
            ),
            raw_drain.rate,
            "ev/s",
            Some(produce_rate),
        ));

        let mut drains = Vec::new();
        let mut peak_rss_kb = 0;
        // The one-key-per-event shape also with `retention` 0 (published rows deleted at the
        // ack, not marked): the same work but for the settle.
        let shapes = s.drain_keys.iter().map(|&keys| (keys, false));
        for (keys, deleting) in shapes.chain([(s.drain, true)]) {
            let deleted = if deleting {
                ", published rows deleted (retention 0)"
            } else {
                ""
            };
            // Each relay count drains the shape twice, in the order 1, 3, 3, 1: a second
            // drain of a shape ran slower than the first for reasons outside the relays
            // (with three relays always second, 100,000 keys lost 6-18 % to one relay; with
            // three first, 3 %), and a drift over the four cancels out of the two sums.
            let [few, many] = s.relays;
            for (turn, relays) in [few, many, many, few].into_iter().enumerate() {
                self.say(&format!(
                    "drain {} events, {keys} key(s), {relays} relay(s){deleted}, turn {}",
                    s.drain,
                    turn + 1
                ));
                let phase = format!("d{keys}x{relays}t{turn}{}", if deleting { "d" } else { "" });
                let d = self.drain(&phase, s.drain, keys, relays, deleting).await?;
                peak_rss_kb = peak_rss_kb.max(d.peak_rss_kb);
                drains.push(d);
            }
            // Both drains' events over both drains' time.
            let turns = &drains[drains.len() - 4..];
            let rate_of = |relays: usize| {
                let (events, seconds) = turns
                    .iter()
                    .filter(|d| d.relays == relays)
                    .fold((0, 0.0), |(e, t), d| (e + d.events, t + d.seconds));
                events as f64 / seconds
            };
            let one_relay = rate_of(few);
            for relays in s.relays {
                let rate = rate_of(relays);
                let mut line = Line::new(
                    format!(
                        "drain {} ev, {keys} keys, {relays} relay(s){deleted}",
                        s.drain
                    ),
                    rate,
                    "ev/s",
                    Some(produce_rate),
                );
                line = match (relays == few, keys == s.drain) {
                    (true, true) => {
                        let goal = 50_000f64.min(0.5 * produce_rate);
                        line.target(format!("≥ {goal:.0} ev/s (50k or 0.5× raw)"), rate >= goal)
                    }
                    (true, false) => {
                        let goal = if keys == 1 { 20_000.0 } else { 40_000.0 };
                        line.target(format!("≥ {goal:.0} ev/s"), rate >= goal)
                    }
                    (false, _) => line.target(
                        format!("≥ 1 relay ({one_relay:.0} ev/s)"),
                        rate >= one_relay,
                    ),
                };
                lines.push(line);
                if keys == s.drain {
                    lines.push(Line::new(
                        format!(
                            "drain {} ev, {keys} keys, {relays} relay(s){deleted}, against the raw drain",
                            s.drain
                        ),
                        rate,
                        "ev/s",
                        Some(raw_drain.rate),
                    ));
                }
            }
        }

        self.say("claim cost on growing backlogs, and their drain rates");
        let scaling = self.claim_cost().await?;
        for d in &scaling.drains {
            peak_rss_kb = peak_rss_kb.max(d.peak_rss_kb);
        }
        if let [.., base, large] = scaling.drains.as_slice() {
            lines.push(
                Line::new(
                    format!("drain {} ev backlog, {} keys", large.events, large.keys),
                    large.rate,
                    "ev/s",
                    Some(base.rate),
                )
                .target(
                    format!("≥ 0.8× the {}-row rate", base.events),
                    large.rate >= 0.8 * base.rate,
                ),
            );
        }
        let claim_fetch = |c: &Value| {
            c["claim_ms"].as_f64().unwrap_or(f64::NAN) + c["fetch_ms"].as_f64().unwrap_or(f64::NAN)
        };
        let many_keys = |c: &&Value| c["backlog_keys"] == json!(self.sizes.explain_keys);
        let fresh = scaling
            .costs
            .iter()
            .filter(many_keys)
            .find(|c| c["published_rows"].is_null());
        let after = scaling
            .costs
            .iter()
            .filter(many_keys)
            .find(|c| c["published_rows"].is_number());
        if let (Some(fresh), Some(after)) = (fresh, after) {
            let (fresh_ms, after_ms) = (claim_fetch(fresh), claim_fetch(after));
            lines.push(
                Line::new(
                    format!(
                        "claim+fetch, {} pending over {} published",
                        after["backlog_rows"], after["published_rows"]
                    ),
                    after_ms,
                    "ms",
                    Some(fresh_ms),
                )
                .target("≤ 2× on an empty table", after_ms <= 2.0 * fresh_ms),
            );
        }
        let rss_mb = peak_rss_kb as f64 / 1024.0;
        lines.push(
            Line::new("peak relay RSS (VmHWM) while draining", rss_mb, "MB", None)
                .target("< 64 MB", rss_mb < 64.0),
        );

        let wal = wal::measure(self).await?;
        lines.extend(wal.lines);

        Ok(json!({
            "quick": self.quick,
            "machine": machine(),
            "sizes": s,
            "payload_bytes": self.template.event.payload.len(),
            "partitions": PARTITIONS,
            "wake": format!("{:?}", self.cli.wake).to_lowercase(),
            "raw": {
                "produce_sequential": produce_seq,
                "produce_pipelined_ev_per_s": produce_rate,
                "produce_pipelined_one_in_flight_ev_per_s": one_in_flight_rate,
                "insert_commit": insert,
                "drain": raw_drain,
            },
            "transactional": transactional,
            "kafka_first": { "latency": direct, "raw": produce_beside, "check": check, "direct": direct_paths },
            "fallback": fallback,
            "drain": drains,
            "backlog_scaling": { "drains": scaling.drains, "claim_cost": scaling.costs },
            "peak_relay_rss_mb": rss_mb,
            "wal": wal.report,
            "lines": lines,
        }))
    }

    /// A fresh schema for one phase, migrated.
    async fn store(&self, phase: &str) -> anyhow::Result<OutboxStore> {
        let table = OutboxTable::new(&format!("bench_{}_{phase}", self.run_id))?;
        let store = OutboxStore::new(self.pool.clone(), table);
        store.migrate().await?;
        Ok(store)
    }

    async fn drop_schemas(&self) {
        let schemas: Vec<String> =
            sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1")
                .bind(format!("bench\\_{}\\_%", self.run_id))
                .fetch_all(&self.pool)
                .await
                .unwrap_or_default();
        for schema in schemas {
            let drop = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
            if let Err(e) = self.pool.execute(drop.as_str()).await {
                self.say(&format!("could not drop schema {schema}: {e}"));
            }
        }
    }

    fn publisher(
        &self,
        store: &OutboxStore,
        mode: Mode,
        waker: Waker,
    ) -> anyhow::Result<Publisher> {
        let mut config =
            PublisherConfig::new(&self.settings.relay.service, self.settings.environment);
        config.mode = mode;
        config.delivery = self.settings.relay.clone();
        Ok(Publisher::new(
            store.clone(),
            self.settings.producer()?,
            waker,
            config,
        )?)
    }

    async fn raw_insert(&self, n: usize) -> anyhow::Result<Latency> {
        let store = self.store("raw").await?;
        let table = format!("\"{}\".raw_insert", store.table().schema());
        insert_commit(&self.pool, &self.template, &table, n).await
    }

    /// `writers` tasks, each alternating two commits: Outpost's (begin, publish, commit;
    /// timed is `commit()` alone, which returns once the eager dispatch was acked, its
    /// settle following in the background) and its raw counterpart (BEGIN, an INSERT of the
    /// payload, COMMIT, then a produce awaiting its ack, nothing of Outpost in between; timed
    /// from COMMIT to the ack). Interleaved, so that both figures see the same machine: run
    /// one after the other, the raw 16-writer p99 moved threefold between runs (5.8 to
    /// 17.5 ms) and the ratio with it. Which of the two goes first alternates.
    ///
    /// Returns Outpost's latencies, the raw ones, and the eager hits.
    async fn transactional(
        &self,
        kafka: &RawKafka,
        writers: usize,
    ) -> anyhow::Result<(Latency, Latency, usize)> {
        let store = self.store(&format!("tx{writers}")).await?;
        let raw_store = self.store(&format!("rawtx{writers}")).await?;
        let table = format!("\"{}\".raw_insert", raw_store.table().schema());
        let insert = raw_table(&self.pool, &table).await?;
        let publisher = self.publisher(&store, Mode::Transactional, Waker::None)?;
        // Warm up: the idempotent producer's first send waits for its producer id.
        publisher
            .publish(&self.template.instance("warm-up"))
            .await?;
        let per_writer = (self.sizes.commits / writers).max(1);
        let writes = (0..writers).map(|w| {
            let (publisher, insert) = (&publisher, &insert);
            async move {
                // Each writer's first commit is not timed: `commit()` takes a second pool
                // connection for its dispatch, and the pool opens the ones it lacks then
                // (a backend start each, inside the timed span), which a running service
                // has long done.
                let mut tx = publisher.begin().await?;
                tx.publish(&self.template.instance(&format!("warm-up-{w}")))
                    .await?;
                tx.commit().await?;
                let mut outpost = Vec::with_capacity(per_writer);
                let mut raw = Vec::with_capacity(per_writer);
                let mut eager = 0;
                for i in 0..per_writer {
                    for turn in [i % 2, 1 - i % 2] {
                        if turn == 0 {
                            let ev = self.template.instance(&format!("agg-{w}-{i}"));
                            let mut tx = publisher.begin().await?;
                            tx.publish(&ev).await?;
                            let t0 = Instant::now();
                            eager += tx.commit().await?.eager_published;
                            outpost.push(t0.elapsed());
                        } else {
                            let ev = self.template.instance(&format!("raw-{w}-{i}"));
                            let mut tx = self.pool.begin().await?;
                            sqlx::query(insert)
                                .bind(&ev.payload)
                                .execute(&mut *tx)
                                .await?;
                            let t0 = Instant::now();
                            tx.commit().await?;
                            kafka.send(&ev).await?;
                            raw.push(t0.elapsed());
                        }
                    }
                }
                anyhow::Ok((outpost, raw, eager))
            }
        });
        let (mut outpost, mut raw, mut eager) = (Vec::new(), Vec::new(), 0);
        for (o, r, e) in futures::future::try_join_all(writes).await? {
            outpost.extend(o);
            raw.extend(r);
            eager += e;
        }
        publisher.shutdown(Duration::from_secs(5)).await;
        Ok((Latency::of(outpost), Latency::of(raw), eager))
    }

    /// Kafka-first publishes, each followed or preceded (alternately) by a raw produce of
    /// the same event shape awaiting its ack, so that both see the same machine. Returns
    /// the Kafka-first latencies, the raw ones, and how many publishes went direct.
    async fn kafka_first(&self, kafka: &RawKafka) -> anyhow::Result<KafkaFirst> {
        let store = self.store("kf").await?;
        let publisher = self.publisher(&store, Mode::KafkaFirst, Waker::None)?;
        publisher
            .publish(&self.template.instance("warm-up"))
            .await?;
        let n = self.sizes.sequential;
        let (mut samples, mut raw, mut check) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut direct = 0;
        for i in 0..n {
            for turn in [i % 2, 1 - i % 2] {
                if turn == 0 {
                    let ev = self.template.instance(&format!("agg-{i}"));
                    let t0 = Instant::now();
                    if publisher.publish(&ev).await? == outpost::PublishPath::Direct {
                        direct += 1;
                    }
                    samples.push(t0.elapsed());
                } else {
                    let ev = self.template.instance(&format!("raw-{i}"));
                    let t0 = Instant::now();
                    kafka.send(&ev).await?;
                    raw.push(t0.elapsed());
                    // The outbox check `publish()` makes before a direct send, alone, after a
                    // wait for an ack as in `publish()`: what Kafka-first adds to a produce.
                    let t0 = Instant::now();
                    store.pending_keys(&[ev.event_key]).await?;
                    check.push(t0.elapsed());
                }
            }
        }
        Ok(KafkaFirst {
            direct: Latency::of(samples),
            raw: Latency::of(raw),
            check: Latency::of(check),
            direct_paths: direct,
        })
    }

    /// Outbox-only commits with an in-process relay that polls every 5 s: the time from
    /// `commit()` (which sends the wake-up hint) until the row is marked published.
    async fn fallback(&self) -> anyhow::Result<Latency> {
        let store = self.store("fb").await?;
        let service = format!("bench-{}", self.run_id);
        let shutdown = CancellationToken::new();
        let signal = WakeSignal::new();
        // A service of its own: a relay of the default service elsewhere would take the
        // hints.
        match self.cli.wake {
            Wake::Redis => {
                signal.listen_redis(&self.cli.redis_url, &service, shutdown.clone())?;
            }
            Wake::Notify => {
                signal.listen_notify(self.pool.clone(), &service, shutdown.clone())?;
            }
            Wake::None => {}
        }
        let mut config = self.settings.relay.clone();
        config.service.clone_from(&service);
        // Minimum and maximum alike: the relay never polls sooner than production idling
        // would, so only the wake-up can make it fast.
        config.poll.min_interval = PRODUCTION_POLL;
        config.poll.max_interval = PRODUCTION_POLL;
        let producer = self.settings.producer()?;
        let relay = Relay::new(store.clone(), producer, config)?.with_wake_signal(signal);
        let relay_task = tokio::spawn(relay.run(shutdown.clone().cancelled_owned()));
        let waker = self.waker(&service).await?;
        let mut publisher_config = PublisherConfig::new(&service, self.settings.environment);
        publisher_config.mode = Mode::OutboxOnly;
        publisher_config.delivery = self.settings.relay.clone();
        publisher_config.delivery.service.clone_from(&service);
        let publisher = Publisher::new(
            store.clone(),
            self.settings.producer()?,
            waker,
            publisher_config,
        )?;
        let published = format!(
            "SELECT status = 'published' FROM {} WHERE event_id = $1",
            store.table()
        );
        let result = async {
            // The first delivery includes the relay producer's start; not counted.
            let mut samples = Vec::new();
            for i in 0..=self.sizes.fallback {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let ev = self.template.instance(&format!("agg-{i}"));
                let mut tx = publisher.begin().await?;
                tx.publish(&ev).await?;
                let t0 = Instant::now();
                tx.commit().await?;
                let deadline = t0 + Duration::from_secs(30);
                loop {
                    let done: Option<bool> = sqlx::query_scalar(&published)
                        .bind(ev.event_id)
                        .fetch_optional(&self.pool)
                        .await?;
                    if done == Some(true) {
                        break;
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "a fallback event was not published within 30 s"
                    );
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
                if i > 0 {
                    samples.push(t0.elapsed());
                }
            }
            anyhow::Ok(Latency::of(samples))
        }
        .await;
        shutdown.cancel();
        relay_task.await??;
        result
    }

    async fn waker(&self, service: &str) -> anyhow::Result<Waker> {
        Ok(match self.cli.wake {
            Wake::Redis => Waker::redis(&self.cli.redis_url, service).await?,
            Wake::Notify => Waker::notify(self.pool.clone(), service)?,
            Wake::None => Waker::None,
        })
    }

    /// Stages `rows` more pending rows over `keys` keys (key rows included) in one
    /// transaction. With `explain`, the claim statements are explained inside that
    /// transaction before it commits, so no relay can have touched the backlog yet.
    /// Returns the commit time on the database clock (what `published_at` is read on).
    async fn stage(
        &self,
        store: &OutboxStore,
        rows: usize,
        keys: usize,
        explain: Option<&Statements>,
    ) -> anyhow::Result<(DateTime<Utc>, Option<Value>)> {
        let t = store.table();
        let (payload, headers) = self.template.payload_sql();
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "WITH staged AS ( \
                 INSERT INTO {t} (event_id, aggregate_type, aggregate_id, event_type, topic, \
                   event_key, correlation_id) \
                 SELECT id, 'bench', key, $3, $4, key, $8::uuid \
                 FROM (SELECT gen_random_uuid() AS id, 'bench-' || (i % $2) AS key \
                       FROM generate_series(1, $1::bigint) i) g \
                 RETURNING id, event_id) \
             INSERT INTO {p} (id, event_id, payload, headers) \
             SELECT id, event_id, convert_to(replace($5, $6, event_id::text), 'UTF8'), \
                    jsonb_set($7::jsonb, '{{event_id}}', to_jsonb(event_id::text)) \
             FROM staged",
            p = t.payloads()
        ))
        .bind(rows as i64)
        .bind(keys as i64)
        .bind(&self.template.event.event_type)
        .bind(&self.topic)
        .bind(&payload)
        .bind(self.template.event.event_id.to_string())
        .bind(&headers)
        .bind(self.template.event.correlation_id)
        .execute(&mut *tx)
        .await
        .context("staging the backlog")?;
        sqlx::query(&format!(
            "INSERT INTO {} (event_key) SELECT 'bench-' || i \
             FROM generate_series(0, $1::bigint - 1) i ON CONFLICT (event_key) DO NOTHING",
            t.keys()
        ))
        .bind(keys.min(rows) as i64)
        .execute(&mut *tx)
        .await?;
        let cost = match explain {
            Some(statements) => Some(statements.explain(&mut tx, store, keys).await?),
            None => None,
        };
        // Read just before the commit: a drain is timed from at most this moment.
        let committed = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((committed, cost))
    }

    /// Stages a backlog and drains it with `relays` relay processes.
    async fn drain(
        &self,
        phase: &str,
        events: usize,
        keys: usize,
        relays: usize,
        deleting: bool,
    ) -> anyhow::Result<Drain> {
        let store = self.store(phase).await?;
        let mut fleet = Fleet::start(self, &store, relays, deleting).await?;
        let result = self.drain_with(&store, &fleet, events, keys, None).await;
        fleet.stop().await;
        Ok(result?.0)
    }

    /// Stages `events` and times the running `fleet` until none is pending.
    async fn drain_with(
        &self,
        store: &OutboxStore,
        fleet: &Fleet,
        events: usize,
        keys: usize,
        explain: Option<&Statements>,
    ) -> anyhow::Result<(Drain, Option<Value>)> {
        let t = store.table();
        // Every drain starts on a fresh checkpoint. A 100,000-event drain writes hundreds
        // of MB of WAL, so with max_wal_size 1 GB the server checkpoints every few seconds
        // through a run, and a drain that starts just after one writes a full-page image
        // at the first change of every page it settles: which phase that fell on decided
        // the comparison between phases more than the phases did.
        self.checkpoint().await;
        let checkpoints_before = self.checkpoints().await?;
        let relay_cpu_before = fleet.cpu_secs();
        let (started, cost) = self.stage(store, events, keys, explain).await?;
        // From the commit: counted from before the staging, the machine read 63-80 % busy
        // over drains that `drain-profile.sh` showed at 87-89 %.
        let machine_before = cpu_busy();
        fleet.nudge().await;
        let deadline =
            Instant::now() + Duration::from_secs(120) + Duration::from_millis(events as u64);
        // The end is read from `published_at`, so polling needs no precision; it must not
        // load the database the relays are draining: the pending index only (a heap scan
        // would walk every published row first), less often as the drain goes on. Deleted
        // rows leave no `published_at`: the end is then the first poll that finds nothing
        // pending, every 10 ms (a late reading, never an early one).
        let pending = format!(
            "SELECT EXISTS (SELECT 1 FROM {t} WHERE status = 'pending'), clock_timestamp()"
        );
        let polling = Instant::now();
        let seen_done = loop {
            let mut tx = self.pool.begin().await?;
            sqlx::query("SET LOCAL enable_seqscan = off")
                .execute(&mut *tx)
                .await?;
            let (left, at): (bool, DateTime<Utc>) =
                sqlx::query_as(&pending).fetch_one(&mut *tx).await?;
            tx.commit().await?;
            if !left {
                break at;
            }
            ensure!(
                Instant::now() < deadline,
                "{events} events staged, some still pending at the deadline"
            );
            let wait = if fleet.deleting {
                Duration::from_millis(10)
            } else {
                (polling.elapsed() / 20).clamp(Duration::from_millis(100), Duration::from_secs(2))
            };
            tokio::time::sleep(wait).await;
        };
        let relay_cpu_s = fleet.cpu_secs() - relay_cpu_before;
        let machine_busy_pct = busy_since(machine_before);
        let checkpoints = self.checkpoints().await? - checkpoints_before;
        let table_stats = self.table_stats(store).await?;
        // Acks are counted in the table (a row is published only with the broker's
        // partition and offset, or deleted only once acked); tansu's watermarks undercount,
        // so they are not used.
        let row = sqlx::query(&format!(
            "SELECT count(*) FILTER (WHERE status = 'published' AND kafka_offset IS NOT NULL \
                                       AND published_at >= $1) AS acked, \
                    count(*) FILTER (WHERE status = 'dead') AS dead, \
                    count(*) AS rows, max(published_at) AS last FROM {t}"
        ))
        .bind(started)
        .fetch_one(&self.pool)
        .await?;
        let dead: i64 = row.get("dead");
        let (acked, last) = if fleet.deleting {
            // Nothing pending, nothing parked, no row left: each was deleted at its ack.
            let rows: i64 = row.get("rows");
            ensure!(
                rows == 0,
                "{rows} rows left after a drain that deletes them"
            );
            (events as i64, seen_done)
        } else {
            (row.get("acked"), row.get("last"))
        };
        ensure!(dead == 0, "{dead} events were parked while draining");
        ensure!(
            acked as usize >= events,
            "only {acked} of {events} events were acked"
        );
        let seconds = seconds_between(started, last);
        let drain = Drain {
            events,
            keys,
            relays: fleet.children.len(),
            seconds,
            rate: events as f64 / seconds,
            acked: acked as usize,
            peak_rss_kb: fleet.peak_rss_kb(),
            relay_cpu_s,
            machine_busy_pct,
            checkpoints,
            table_stats,
            published_rows_deleted: fleet.deleting,
        };
        Ok((drain, cost))
    }

    /// Asks for a checkpoint; without the right to (`pg_checkpoint` or superuser) the run
    /// goes on, and each drain's `checkpoints` count shows what fell into it.
    async fn checkpoint(&self) {
        if let Err(e) = self.pool.execute("CHECKPOINT").await {
            self.say(&format!(
                "CHECKPOINT refused ({e}); drains start wherever the server's checkpoints fall"
            ));
        }
    }

    /// Checkpoints the server started so far, timed and requested.
    async fn checkpoints(&self) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// What the statements did to both tables so far (`pg_stat_user_tables`): scans, rows
    /// read, written and deleted; tells where the database's work per event goes.
    async fn table_stats(&self, store: &OutboxStore) -> anyhow::Result<Value> {
        // Backends report their counters when idle, at most once a second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let t = store.table();
        let rows = sqlx::query(
            "SELECT relname::text AS name, seq_scan, seq_tup_read, idx_scan, idx_tup_fetch, \
                    n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del \
             FROM pg_stat_user_tables WHERE schemaname = $1",
        )
        .bind(t.schema())
        .fetch_all(&self.pool)
        .await?;
        let mut stats = serde_json::Map::new();
        for r in rows {
            let mut table = serde_json::Map::new();
            for col in [
                "seq_scan",
                "seq_tup_read",
                "idx_scan",
                "idx_tup_fetch",
                "n_tup_ins",
                "n_tup_upd",
                "n_tup_hot_upd",
                "n_tup_del",
            ] {
                table.insert(col.into(), json!(r.get::<Option<i64>, _>(col)));
            }
            stats.insert(r.get("name"), Value::Object(table));
        }
        Ok(Value::Object(stats))
    }

    /// EXPLAIN ANALYZE of the relay's claim and fetch statements on growing backlogs of
    /// one key and of many keys; the many-key backlogs are drained, each size on its own.
    async fn claim_cost(&self) -> anyhow::Result<Scaling> {
        let mut costs = Vec::new();
        let one = self.store("cost1").await?;
        let statements = Statements::capture(self, &one).await?;
        let mut staged = 0;
        for rows in self.sizes.backlogs {
            let (_, cost) = self
                .stage(&one, rows - staged, 1, Some(&statements))
                .await?;
            staged = rows;
            costs.extend(cost.map(|c| with_shape(c, rows, 1)));
        }
        // That backlog is large, and only its plans were wanted.
        self.pool
            .execute(format!("DROP SCHEMA \"{}\" CASCADE", one.table().schema()).as_str())
            .await?;

        let keys = self.sizes.explain_keys;
        let many = self.store("costn").await?;
        // The statements name their table.
        let statements = Statements::capture(self, &many).await?;
        let fleet = Fleet::start(self, &many, 1, false).await?;
        let mut drains = Vec::new();
        let mut result = Ok(());
        for rows in self.sizes.backlogs {
            match self
                .drain_with(&many, &fleet, rows, keys, Some(&statements))
                .await
            {
                Ok((drain, cost)) => {
                    costs.extend(cost.map(|c| with_shape(c, rows, keys)));
                    drains.push(drain);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // Published rows must not weigh on the claim path: the first backlog once more, on
        // top of every row the drains above published.
        if result.is_ok() {
            let rows = self.sizes.backlogs[0];
            let published: usize = self.sizes.backlogs.iter().sum();
            match self
                .drain_with(&many, &fleet, rows, keys, Some(&statements))
                .await
            {
                Ok((_, cost)) => costs.extend(cost.map(|c| {
                    let mut c = with_shape(c, rows, keys);
                    c["published_rows"] = json!(published);
                    c
                })),
                Err(e) => result = Err(e),
            }
        }
        let mut fleet = fleet;
        fleet.stop().await;
        result?;
        Ok(Scaling { drains, costs })
    }
}

fn with_shape(mut cost: Value, rows: usize, keys: usize) -> Value {
    cost["backlog_rows"] = json!(rows);
    cost["backlog_keys"] = json!(keys);
    cost
}

/// Drain figures of one backlog.
#[derive(Debug, Clone, Serialize)]
struct Drain {
    events: usize,
    keys: usize,
    relays: usize,
    /// Backlog commit to the last row's `published_at` (database clock).
    seconds: f64,
    rate: f64,
    acked: usize,
    /// Largest VmHWM of the relay processes.
    peak_rss_kb: u64,
    /// CPU time the relay processes used while draining.
    relay_cpu_s: f64,
    /// How busy the whole machine was from the backlog's commit until the drain was seen
    /// to end (every core, every process).
    machine_busy_pct: f64,
    /// Checkpoints the server started from the staging to the end of the drain.
    checkpoints: i64,
    /// `pg_stat_user_tables` of the phase's tables after the drain (cumulative).
    table_stats: Value,
    /// The relays ran with `retention` 0: published rows deleted at the ack.
    published_rows_deleted: bool,
}

struct Scaling {
    /// One drain per backlog size, in `Sizes::backlogs` order.
    drains: Vec<Drain>,
    costs: Vec<Value>,
}

/// The relay's own claim and fetch statements, as the store prepared them.
struct Statements {
    claim: String,
    fetch: String,
    batch: usize,
    per_key: usize,
    lease_secs: f64,
}

impl Statements {
    /// Runs a claim and a fetch on an empty table through a one-connection pool and reads
    /// their text back from `pg_prepared_statements`, so the plans are of the statements
    /// the relay really runs.
    async fn capture(bench: &Bench<'_>, store: &OutboxStore) -> anyhow::Result<Self> {
        let relay = &bench.settings.relay;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(bench.settings.database.clone())
            .await?;
        let probe = OutboxStore::new(pool.clone(), store.table().clone());
        let owner = Uuid::new_v4();
        probe.claim(owner, 1, 1, relay.lease).await?;
        probe.fetch(owner, &[("none".into(), 0)], 1).await?;
        let prepared: Vec<String> =
            sqlx::query_scalar("SELECT statement FROM pg_prepared_statements WHERE NOT from_sql")
                .fetch_all(&pool)
                .await?;
        pool.close().await;
        let find = |what: &str, pick: &dyn Fn(&str) -> bool| {
            prepared
                .iter()
                .find(|s| pick(s))
                .cloned()
                .with_context(|| format!("the store's {what} statement was not found"))
        };
        Ok(Self {
            claim: find("claim", &|s| {
                s.contains("UPDATE") && s.trim_end().ends_with("SELECT event_key FROM leased")
            })?,
            fetch: find("fetch", &|s| {
                s.contains("UNNEST($2::text[]") && !s.contains("UPDATE")
            })?,
            batch: relay.batch_size,
            per_key: relay.per_key,
            lease_secs: relay.lease.as_secs_f64(),
        })
    }

    /// Explains a claim (rolled back), then claims for real and explains the fetch of the
    /// claimed keys' first rows (rolled back too).
    async fn explain(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        store: &OutboxStore,
        keys: usize,
    ) -> anyhow::Result<Value> {
        let t = store.table();
        // Statistics as autovacuum would leave them after such a backlog arrived (ANALYZE
        // counts this transaction's own rows).
        sqlx::raw_sql(&format!("ANALYZE {t}; ANALYZE {}", t.keys()))
            .execute(&mut **tx)
            .await?;
        let owner = Uuid::new_v4();
        let claim = format!(
            "EXECUTE bench_claim('{owner}', {}, {})",
            self.batch, self.lease_secs
        );
        sqlx::raw_sql(&format!(
            "SAVEPOINT bench_explain; PREPARE bench_claim AS {}; PREPARE bench_fetch AS {}",
            self.claim, self.fetch
        ))
        .execute(&mut **tx)
        .await?;
        let result = async {
            let claim_plan = explain(tx, &claim).await?;
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT bench_explain")
                .execute(&mut **tx)
                .await?;
            let claimed: Vec<String> = sqlx::raw_sql(&claim)
                .fetch_all(&mut **tx)
                .await?
                .iter()
                .map(|r| r.get::<String, _>(0))
                .collect();
            let list = claimed
                .iter()
                .map(|k| format!("'{}'", k.replace('\'', "''")))
                .collect::<Vec<_>>()
                .join(",");
            let fetch_plan = explain(
                tx,
                &format!(
                    "EXECUTE bench_fetch('{owner}', ARRAY[{list}]::text[], \
                     array_fill(0::bigint, ARRAY[{}]), {})",
                    claimed.len(),
                    self.per_key
                ),
            )
            .await?;
            anyhow::Ok(json!({
                "claimed_keys": claimed.len(),
                "expected_keys": keys.min(self.batch),
                "claim_ms": execution_ms(&claim_plan),
                "fetch_ms": execution_ms(&fetch_plan),
                "claim_plan": claim_plan,
                "fetch_plan": fetch_plan,
            }))
        }
        .await;
        sqlx::raw_sql(
            "ROLLBACK TO SAVEPOINT bench_explain; DEALLOCATE bench_claim; DEALLOCATE bench_fetch",
        )
        .execute(&mut **tx)
        .await?;
        result
    }
}

async fn explain(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    statement: &str,
) -> anyhow::Result<String> {
    let rows = sqlx::raw_sql(&format!("EXPLAIN (ANALYZE, BUFFERS) {statement}"))
        .fetch_all(&mut **tx)
        .await?;
    Ok(rows
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect::<Vec<_>>()
        .join("\n"))
}

fn execution_ms(plan: &str) -> f64 {
    plan.lines()
        .find_map(|l| l.trim().strip_prefix("Execution Time:"))
        .and_then(|l| l.trim().trim_end_matches("ms").trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// `outpost relay` child processes on one outbox table.
struct Fleet {
    children: Vec<Child>,
    waker: Waker,
    /// Started with `--retention-secs 0`.
    deleting: bool,
}

impl Fleet {
    /// Starts `n` relays and returns once each could have its producer id (every relay's
    /// producer asks for it at start) and a warm-up event per relay was delivered.
    async fn start(
        bench: &Bench<'_>,
        store: &OutboxStore,
        n: usize,
        deleting: bool,
    ) -> anyhow::Result<Self> {
        let schema = store.table().schema();
        let cli = bench.cli;
        let exe = std::env::current_exe().context("cannot find the outpost binary")?;
        let mut children = Vec::new();
        for _ in 0..n {
            let mut cmd = Command::new(&exe);
            cmd.args(["--database-url", &cli.database_url])
                .args(["--brokers", &cli.brokers])
                .args(["--redis-url", &cli.redis_url])
                .args(["--schema", schema, "--service", schema])
                .args(["--environment", &cli.environment])
                .args(["--wake", wake_name(cli.wake)]);
            for opt in &cli.kafka_options {
                cmd.args(["--kafka-option", opt]);
            }
            if deleting {
                cmd.args(["--retention-secs", "0"]);
            }
            cmd.arg("relay")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .kill_on_drop(true);
            children.push(cmd.spawn().context("cannot start `outpost relay`")?);
        }
        let fleet = Self {
            children,
            waker: bench.waker(schema).await?,
            deleting,
        };
        let started = Instant::now();
        let (_, _) = bench.stage(store, n, n, None).await?;
        let pending = format!(
            "SELECT count(*) FROM {} WHERE status = 'pending'",
            store.table()
        );
        loop {
            fleet.nudge().await;
            let left: i64 = sqlx::query_scalar(&pending).fetch_one(&bench.pool).await?;
            if left == 0 {
                break;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "the relays did not deliver their warm-up events within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(started.elapsed())).await;
        Ok(fleet)
    }

    /// One hint per relay: each `BLPOP` takes one.
    async fn nudge(&self) {
        for _ in &self.children {
            self.waker.nudge().await;
        }
    }

    fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.children.iter().filter_map(Child::id)
    }

    fn peak_rss_kb(&self) -> u64 {
        self.pids().map(peak_rss_kb).max().unwrap_or(0)
    }

    /// User plus system CPU seconds of the relays so far.
    fn cpu_secs(&self) -> f64 {
        self.pids()
            .filter_map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                // Fields after the parenthesized command name; utime and stime are the
                // 14th and 15th of the whole line.
                let rest = stat.rsplit_once(')')?.1;
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let ticks: u64 =
                    fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
                Some(ticks as f64 / CLOCK_TICKS)
            })
            .sum()
    }

    async fn stop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill().await;
        }
    }
}

/// `n` INSERT+COMMITs of a template payload into a new `table`, one after the other: the
/// database's raw limit.
/// Creates the plain table of the raw INSERT+COMMIT figures; returns its INSERT statement.
async fn raw_table(pool: &PgPool, table: &str) -> anyhow::Result<String> {
    pool.execute(
        format!("CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, payload BYTEA NOT NULL)").as_str(),
    )
    .await?;
    Ok(format!("INSERT INTO {table} (payload) VALUES ($1)"))
}

async fn insert_commit(
    pool: &PgPool,
    template: &Template,
    table: &str,
    n: usize,
) -> anyhow::Result<Latency> {
    let insert = raw_table(pool, table).await?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let ev = template.instance("raw");
        let t0 = Instant::now();
        let mut tx = pool.begin().await?;
        sqlx::query(&insert)
            .bind(&ev.payload)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        samples.push(t0.elapsed());
    }
    Ok(Latency::of(samples))
}

/// Seconds from `started` to `last` on the database clock (at least a millisecond, so a
/// rate is always finite).
fn seconds_between(started: DateTime<Utc>, last: DateTime<Utc>) -> f64 {
    (last - started)
        .to_std()
        .unwrap_or_default()
        .as_secs_f64()
        .max(1e-3)
}

/// A process's peak resident memory (VmHWM) in kB; 0 once it is gone.
fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// USER_HZ: 100 on every Linux architecture Outpost runs on.
const CLOCK_TICKS: f64 = 100.0;

fn wake_name(wake: Wake) -> &'static str {
    match wake {
        Wake::Redis => "redis",
        Wake::Notify => "notify",
        Wake::None => "none",
    }
}

/// Busy and total jiffies of the whole machine so far (`/proc/stat`).
fn cpu_busy() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn busy_since(before: (u64, u64)) -> f64 {
    let now = cpu_busy();
    let total = now.1.saturating_sub(before.1);
    if total == 0 {
        return f64::NAN;
    }
    now.0.saturating_sub(before.0) as f64 * 100.0 / total as f64
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: Option<u64> = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse().ok());
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "memory_gb": mem_kb.map(|kb| (kb as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0),
        "date": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
    })
}

/// A plain librdkafka producer with Outpost's settings (acks=all, idempotence, the same
/// linger and timeouts, the same extra properties): the limit Outpost's sends are held to.
struct RawKafka {
    producer: FutureProducer,
    queue_timeout: Duration,
}

impl RawKafka {
    /// `one_in_flight`: one request on the wire per broker, as Outpost's own producer has
    /// (librdkafka's default, kept by the plain producer, is five).
    fn new(settings: &Settings, one_in_flight: bool) -> anyhow::Result<Self> {
        let p = &settings.producer;
        let mut cfg = ClientConfig::new();
        if one_in_flight {
            cfg.set("max.in.flight.requests.per.connection", "1");
        }
        cfg.set("bootstrap.servers", &p.brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", p.linger.as_millis().to_string())
            .set(
                "message.timeout.ms",
                p.delivery_timeout.as_millis().to_string(),
            )
            .set(
                "request.timeout.ms",
                p.request_timeout
                    .min(p.delivery_timeout)
                    .as_millis()
                    .to_string(),
            );
        for (k, v) in &p.librdkafka {
            cfg.set(k, v);
        }
        Ok(Self {
            producer: cfg
                .create()
                .context("cannot create the raw kafka producer")?,
            queue_timeout: p.queue_timeout,
        })
    }

    fn record<'e>(ev: &'e OutboxEvent) -> FutureRecord<'e, str, [u8]> {
        FutureRecord::to(&ev.topic)
            .key(ev.event_key.as_str())
            .payload(ev.payload.as_slice())
            .headers(kafka_headers(&ev.headers))
    }

    async fn send(&self, ev: &OutboxEvent) -> anyhow::Result<()> {
        self.producer
            .send(Self::record(ev), self.queue_timeout)
            .await
            .map_err(|(e, _)| e)
            .context("raw produce failed")?;
        Ok(())
    }

    /// Sequential latency (send, await the ack, repeat) over `sequential` events, and
    /// pipelined throughput (queue `pipelined` events, await every ack).
    async fn measure(
        &self,
        template: &Template,
        sequential: usize,
        pipelined: usize,
    ) -> anyhow::Result<(Latency, f64)> {
        // The idempotent producer's first send waits for its producer id.
        self.send(&template.instance("warm-up")).await?;
        let mut samples = Vec::with_capacity(sequential);
        for i in 0..sequential {
            let ev = template.instance(&format!("agg-{i}"));
            let t0 = Instant::now();
            self.send(&ev).await?;
            samples.push(t0.elapsed());
        }
        Ok((
            Latency::of(samples),
            self.pipelined(template, pipelined).await?,
        ))
    }

    /// Queues `pipelined` events as fast as the queue takes them and awaits every ack;
    /// returns acked events per second.
    async fn pipelined(&self, template: &Template, pipelined: usize) -> anyhow::Result<f64> {
        let events: Vec<OutboxEvent> = (0..pipelined)
            .map(|i| template.instance(&format!("agg-{i}")))
            .collect();
        let started = Instant::now();
        let mut in_flight = FuturesUnordered::new();
        let mut acked = 0;
        for ev in &events {
            loop {
                match self.producer.send_result(Self::record(ev)) {
                    Ok(delivery) => {
                        in_flight.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        acked += ack(in_flight.next().await)?;
                    }
                    Err((e, _)) => return Err(e).context("raw produce failed"),
                }
            }
        }
        while let Some(delivery) = in_flight.next().await {
            acked += ack(Some(delivery))?;
        }
        Ok(acked as f64 / started.elapsed().as_secs_f64())
    }
}

type Delivery = Result<
    rdkafka::producer::future_producer::OwnedDeliveryResult,
    futures::channel::oneshot::Canceled,
>;

fn ack(delivery: Option<Delivery>) -> anyhow::Result<usize> {
    match delivery {
        None => Ok(0),
        Some(d) => delivered(d).map(|_| 1),
    }
}

/// Where an acked raw produce landed (partition, offset), or why it failed.
fn delivered(delivery: Delivery) -> anyhow::Result<(i32, i64)> {
    match delivery {
        Ok(Ok(landed)) => Ok((landed.partition, landed.offset)),
        Ok(Err((e, _))) => Err(e).context("raw produce failed"),
        Err(_) => anyhow::bail!("raw produce canceled"),
    }
}

/// Staged headers as librdkafka takes them.
fn kafka_headers(headers: &BTreeMap<String, String>) -> OwnedHeaders {
    let mut kafka = OwnedHeaders::new_with_capacity(headers.len());
    for (key, value) in headers {
        kafka = kafka.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    kafka
}

fn print_table(report: &Value) {
    let m = &report["machine"];
    println!(
        "outpost bench{}: {} × {}, {} GB, {}",
        if report["quick"] == json!(true) {
            " --quick"
        } else {
            ""
        },
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or("?"),
        m["memory_gb"],
        m["date"].as_str().unwrap_or("?")
    );
    println!(
        "load {} → {}; payload {} B; wake-ups via {}",
        report["load_before"].as_str().unwrap_or("?"),
        report["load_after"].as_str().unwrap_or("?"),
        report["payload_bytes"],
        report["wake"].as_str().unwrap_or("?")
    );
    println!();
    println!(
        "{:<46} {:>11} {:<5} {:>11} {:>7}  target",
        "figure", "value", "", "raw limit", "ratio"
    );
    for line in report["lines"].as_array().into_iter().flatten() {
        let num = |v: &Value| v.as_f64().map_or("".to_owned(), |f| format!("{f:.2}"));
        let met = match line["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "",
        };
        println!(
            "{:<46} {:>11} {:<5} {:>11} {:>7}  {} {}",
            line["name"].as_str().unwrap_or("?"),
            num(&line["value"]),
            line["unit"].as_str().unwrap_or(""),
            num(&line["raw"]),
            line["ratio"]
                .as_f64()
                .map_or("".to_owned(), |r| format!("{r:.2}×")),
            line["target"].as_str().unwrap_or(""),
            met
        );
    }
    for t in report["transactional"].as_array().into_iter().flatten() {
        println!(
            "transactional, {} writers: {} of {} commits delivered eagerly",
            t["writers"], t["eager_hits"], t["commits"]
        );
    }
}

fn print_plans(report: &Value) {
    for cost in report["backlog_scaling"]["claim_cost"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for which in ["claim", "fetch"] {
            let published = cost["published_rows"]
                .as_u64()
                .map_or(String::new(), |n| format!(", over {n} published rows"));
            println!(
                "\n-- {which}: {} pending rows, {} key(s){published}\n{}",
                cost["backlog_rows"],
                cost["backlog_keys"],
                cost[format!("{which}_plan")].as_str().unwrap_or("")
            );
        }
    }
}
