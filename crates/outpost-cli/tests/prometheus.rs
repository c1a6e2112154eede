//! A real Prometheus (Debian's `prometheus` package) scrapes a running `outpost relay`
//! and this test process (standing in for a publishing service): through Prometheus's own
//! HTTP API the test sees staged and published move, the backlog go up and back to 0, a
//! poison event counted as parked and its alert fire, a timed wake-up, and every query of
//! the shipped Grafana dashboard evaluate over metrics Outpost defines.
//!
//! Needs PostgreSQL, Redis, a Kafka broker and `prometheus` on PATH (or
//! `OUTPOST_PROMETHEUS_BIN`); run `make services` first.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use metrics_exporter_prometheus::PrometheusBuilder;
use outpost::testkit::Collector;
use outpost::{
    Aggregate, Environment, EventEnvelope, KafkaProducer, Mode, OutboxEvent, OutboxStore,
    OutboxTable, ProducerConfig, Publisher, PublisherConfig, Waker,
};
use serde_json::{json, Value};
use support::{brokers, eventually, free_port, pool, single_service, unique, Daemon, Scratch};
use tokio::process::{Child, Command};

/// Every metric name Outpost records (what a dashboard or alert may name).
const CATALOGUE: &[&str] = &[
    outpost::metrics::EVENTS_STAGED,
    outpost::metrics::EVENTS_PUBLISHED,
    outpost::metrics::EVENTS_RETRIED,
    outpost::metrics::EVENTS_PARKED,
    outpost::metrics::PUBLISH_LATENCY,
    outpost::metrics::BACKLOG,
    outpost::metrics::OLDEST_PENDING,
    outpost::metrics::POLL_INTERVAL,
    outpost::metrics::WAKEUPS,
    outpost::metrics::WAKEUP_LATENCY,
    outpost::metrics::RELAY_ERRORS,
    outpost::metrics::PRODUCER_REBUILDS,
    outpost::metrics::ORDER_BREAKS,
    outpost::metrics::ROWS_CLEANED,
    outpost::metrics::DIRECT_PUBLISHES,
    outpost::metrics::FALLBACKS,
    outpost::metrics::CIRCUIT_STATE,
    outpost::metrics::EAGER_DISPATCH,
    outpost::metrics::CONSUMED,
];

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// A Prometheus server on a free port with its own config and data directory.
struct Prometheus {
    _child: Child,
    url: String,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, relay: &str, service: &str) -> Self {
        let bin = std::env::var("OUTPOST_PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into());
        let alerts = repo_file("deploy/prometheus/alerts.yml");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [{alerts:?}]\n\
                 scrape_configs:\n\
                 - job_name: outpost-relay\n  static_configs: [{{targets: [\"{relay}\"]}}]\n\
                 - job_name: outpost-service\n  static_configs: [{{targets: [\"{service}\"]}}]\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.join("prometheus.log");
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {bin} ({e}); run `make services` to install Debian's prometheus"
                )
            });
        Self {
            _child: child,
            url: format!("http://{addr}"),
            log,
        }
    }

    /// GET an API path; the `data` of a successful answer.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
        let answer: Value = reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .query(query)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        if answer["status"] == "success" {
            Ok(answer["data"].clone())
        } else {
            Err(answer.to_string())
        }
    }

    /// The sum of an instant query's samples (`None` when it has none).
    async fn value(&self, promql: &str) -> Option<f64> {
        let data = self.api("/api/v1/query", &[("query", promql)]).await.ok()?;
        let samples = data["result"].as_array()?;
        if samples.is_empty() {
            return None;
        }
        samples
            .iter()
            .map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until `promql` evaluates to something `accept` likes.
    async fn until(&self, promql: &str, accept: impl Fn(f64) -> bool) -> f64 {
        eventually(
            Duration::from_secs(120),
            || {
                format!(
                    "Prometheus to report an accepted value for {promql}; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )
            },
            || async { self.value(promql).await.filter(|v| accept(*v)) },
        )
        .await
    }
}

/// Serves this process's metrics (what a publishing service would expose) on a free port.
async fn serve_own_metrics() -> String {
    let handle = PrometheusBuilder::new().install_recorder().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let app = axum::Router::new().route("/metrics", get(move || async move { handle.render() }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// What the test process plays: a service publishing outbox-only (commit, the relay
/// delivers), so its `staged` counter is recorded here.
async fn publisher(store: &OutboxStore, service: &str) -> Publisher {
    let mut config = PublisherConfig::new(service, Environment::Testing);
    config.mode = Mode::OutboxOnly;
    let producer = KafkaProducer::new(ProducerConfig::new(brokers())).unwrap();
    Publisher::new(store.clone(), Arc::new(producer), Waker::None, config).unwrap()
}

async fn publish(publisher: &Publisher, topic: &str, key: &str, data: Value) -> OutboxEvent {
    let env = EventEnvelope::new("outpost.ops-test.v1", "outpost-cli-tests", data);
    let event = OutboxEvent::from_envelope(&env, topic, Aggregate::new("test", key)).unwrap();
    let mut tx = publisher.begin().await.unwrap();
    tx.publish(&event).await.unwrap();
    tx.commit().await.unwrap();
    event
}

/// Metric names a PromQL expression mentions (histogram series mapped to their metric).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("outpost_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| CATALOGUE.contains(b)))
            .unwrap_or(name);
        names.insert(base.to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_relay_deliver_drain_and_park() {
    let scratch = Scratch::new();
    let dir = &scratch.0;
    let own = serve_own_metrics().await;
    let service = unique("ops_prom");
    let topic = unique("ops_prom");
    outpost::kafka::producer::create_topic(&brokers(), &topic, 1, Duration::from_secs(10))
        .await
        .unwrap();
    let pool = pool().await;
    let store = OutboxStore::new(pool.clone(), OutboxTable::new(&service).unwrap());
    store.migrate().await.unwrap();
    let publisher = publisher(&store, &service).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(
            publish(&publisher, &topic, &format!("k{}", n % 4), json!({"n": n}))
                .await
                .event_id,
        );
    }
    // Their keys held back (as if waiting for a retry), so the backlog is visibly 20 until
    // released.
    let hold = format!(
        "UPDATE {} SET next_attempt_at = now() + interval '1 hour'",
        store.table().keys()
    );
    sqlx::query(&hold).execute(&pool).await.unwrap();

    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = single_service(&service);
    args.extend([
        "--wake",
        "notify",
        "--poll-max-ms",
        "500",
        "--http-addr",
        &addr,
    ]);
    args.extend(["--kafka-option", "message.max.bytes=1000"]);
    let mut relay = Daemon::spawn(&args, &[], &dir.join("relay.log"));
    let prom = Prometheus::start(dir, &addr, &own);
    let on = |metric: &str| format!("{metric}{{service=\"{service}\"}}");

    prom.until("up{job=\"outpost-relay\"}", |v| v == 1.0).await;
    prom.until("up{job=\"outpost-service\"}", |v| v == 1.0)
        .await;
    relay.assert_running();
    prom.until(&on("outpost_backlog"), |v| v == 20.0).await;
    prom.until(&on("outpost_oldest_pending_seconds"), |v| v > 0.0)
        .await;
    // Staged once the relay's zeroed counters were scraped, so Prometheus sees 0 → 1.
    prom.until(&on("outpost_events_parked_total"), |v| v == 0.0)
        .await;
    publish(
        &publisher,
        &topic,
        "poison",
        json!({"poison": "x".repeat(3000)}),
    )
    .await;
    assert_eq!(
        prom.until(&on("outpost_events_staged_total"), |v| v >= 21.0)
            .await,
        21.0
    );
    prom.until(&on("outpost_events_parked_total"), |v| v == 1.0)
        .await;
    prom.until(&format!("ALERTS{{alertname=\"OutpostEventsParked\",service=\"{service}\",alertstate=\"firing\"}}"), |v| v == 1.0).await;

    let collector = Collector::start(&brokers(), &topic, 1).unwrap();
    let release = format!(
        "UPDATE {} SET next_attempt_at = now()",
        store.table().keys()
    );
    sqlx::query(&release).execute(&pool).await.unwrap();
    Waker::notify(pool.clone(), &service).unwrap().nudge().await;
    let got = relay.delivered(&collector, &ids).await;
    assert!(got.len() >= ids.len());

    prom.until(&on("outpost_events_published_total"), |v| v == 20.0)
        .await;
    prom.until(&on("outpost_backlog"), |v| v == 0.0).await;
    prom.until(&on("outpost_oldest_pending_seconds"), |v| v == 0.0)
        .await;
    // 20 held rows (21 if a refresh caught the poison before it was parked).
    prom.until(
        &format!("max_over_time({}[10m])", on("outpost_backlog")),
        |v| v >= 20.0,
    )
    .await;
    prom.until(&on("outpost_publish_latency_seconds_count"), |v| v == 20.0)
        .await;
    prom.until(&on("outpost_wakeup_latency_seconds_count"), |v| v >= 1.0)
        .await;

    // Every alert rule loaded and evaluated without error.
    let rules = prom.api("/api/v1/rules", &[]).await.unwrap();
    let rules: Vec<&Value> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    let names: BTreeSet<&str> = rules.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "OutpostRelayDown",
            "OutpostOldestPendingTooOld",
            "OutpostEventsParked",
            "OutpostFallbackRateHigh"
        ])
    );
    assert!(rules.iter().all(|r| r["health"] == "ok"), "{rules:?}");

    // The dashboard: valid JSON, the panels HuleEdu asked for, every query naming a metric
    // Outpost records and evaluating in Prometheus.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("deploy/grafana/outpost.json")).unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for wanted in [
        "Kafka-first immediate success rate",
        "Outbox fallback rate",
        "Wake-up latency",
        "Polling interval",
        "Backlog",
        "Oldest pending age",
        "Parked events",
        "Commit → ack latency",
    ] {
        assert!(
            titles.iter().any(|t| t.starts_with(wanted)),
            "no panel {wanted:?} in {titles:?}"
        );
    }
    let mut named = BTreeSet::new();
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(
                !names.is_empty() || expr.contains("up{"),
                "query names no metric: {expr}"
            );
            for name in &names {
                assert!(
                    CATALOGUE.contains(&name.as_str()),
                    "{name} in {expr:?} is not an Outpost metric"
                );
            }
            named.extend(names);
            let concrete = expr
                .replace("$service", ".*")
                .replace("$__rate_interval", "1m");
            prom.api("/api/v1/query", &[("query", &concrete)])
                .await
                .unwrap_or_else(|e| panic!("{expr}: {e}"));
        }
    }
    for needed in [
        outpost::metrics::FALLBACKS,
        outpost::metrics::DIRECT_PUBLISHES,
        outpost::metrics::WAKEUP_LATENCY,
        outpost::metrics::POLL_INTERVAL,
        outpost::metrics::PUBLISH_LATENCY,
    ] {
        assert!(
            named.contains(needed),
            "the dashboard does not chart {needed}"
        );
    }
    assert!(relay.terminate().await.success());
    // The relay is gone: its scrape fails and the relay-down alert starts its `for`.
    prom.until("up{job=\"outpost-relay\"}", |v| v == 0.0).await;
    prom.until(
        "ALERTS{alertname=\"OutpostRelayDown\",job=\"outpost-relay\",alertstate=\"pending\"}",
        |v| v == 1.0,
    )
    .await;
}
