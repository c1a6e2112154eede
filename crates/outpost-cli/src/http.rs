//! The relay's HTTP endpoints: `/metrics` (Prometheus exposition of everything recorded
//! on the `metrics` facade), `/healthz` (the process answers) and `/readyz` (the database,
//! the broker and, when a service wakes through it, Redis answer; 503 naming what fails).

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::ClientConfig;
use sqlx::PgPool;

use crate::cli::Wake;
use crate::settings::{redact, Settings};

/// Each readiness probe gets this long before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Histogram buckets (seconds) for every `*_seconds` histogram: latencies from a
/// millisecond (eager path) to minutes (a broker outage drained by the relay).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Installs the Prometheus recorder as the process's `metrics` recorder, with Outpost's
/// help texts.
///
/// # Errors
/// When a recorder is already installed.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .context("histogram buckets")?
        .install_recorder()
        .context("cannot install the Prometheus recorder")?;
    outpost::metrics::describe();
    Ok(handle)
}

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    pool: PgPool,
    brokers: String,
    kafka: std::sync::Arc<BaseProducer>,
    /// Only when some service wakes through Redis; with the password hidden for messages.
    redis: Option<(redis::Client, String)>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("brokers", &self.brokers)
            .finish_non_exhaustive()
    }
}

impl Readiness {
    /// Probes for `settings`' database (through `pool`), broker and Redis.
    ///
    /// # Errors
    /// When the Kafka client or the Redis URL cannot be set up.
    pub fn new(settings: &Settings, pool: PgPool) -> anyhow::Result<Self> {
        let mut config = ClientConfig::new();
        // The same security settings as the relay's producer, so a SASL misconfiguration
        // shows up here too.
        for (k, v) in &settings.producer.librdkafka {
            config.set(k, v);
        }
        config.set("bootstrap.servers", &settings.brokers);
        let kafka = std::sync::Arc::new(
            config
                .create()
                .context("cannot create the Kafka client for /readyz")?,
        );
        let redis = if settings.services.iter().any(|s| s.wake == Wake::Redis) {
            let client = redis::Client::open(settings.redis_url.as_str()).map_err(|_| {
                outpost::Error::config(
                    "OUTPOST_REDIS_URL (--redis-url, redis_url)",
                    "redis://host[:port][/db]",
                    redact(&settings.redis_url),
                )
            })?;
            Some((client, redact(&settings.redis_url)))
        } else {
            None
        };
        Ok(Self {
            pool,
            brokers: settings.brokers.clone(),
            kafka,
            redis,
        })
    }

    /// One line per dependency, `name: ok` or `name: <why not>`; ready when all are ok.
    async fn check(&self) -> (bool, String) {
        let (database, broker, redis) = tokio::join!(self.database(), self.broker(), self.redis());
        let mut ready = true;
        let mut body = String::new();
        let mut line = |name: &str, result: Result<(), String>| {
            let status = result.map_or_else(|why| format!("failing ({why})"), |()| "ok".into());
            ready &= status == "ok";
            body.push_str(&format!("{name}: {status}\n"));
        };
        line("database", database);
        line(&format!("broker {}", self.brokers), broker);
        if let (Some(result), Some((_, url))) = (redis, &self.redis) {
            line(&format!("redis {url}"), result);
        }
        (ready, body)
    }

    async fn database(&self) -> Result<(), String> {
        let ping = sqlx::query("SELECT 1").execute(&self.pool);
        match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
        }
    }

    async fn broker(&self) -> Result<(), String> {
        let kafka = std::sync::Arc::clone(&self.kafka);
        // librdkafka's metadata request blocks its calling thread.
        tokio::task::spawn_blocking(move || {
            kafka
                .client()
                .fetch_metadata(None, PROBE_TIMEOUT)
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    async fn redis(&self) -> Option<Result<(), String>> {
        let (client, _) = self.redis.as_ref()?;
        let ping = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        Some(match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
        })
    }
}

#[derive(Clone)]
struct Endpoints {
    metrics: PrometheusHandle,
    readiness: Readiness,
}

/// Serves the endpoints on `listener` until `shutdown` resolves.
///
/// # Errors
/// When the server fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> outpost::Result<()> {
    // Without the built-in listener nobody else drains the histograms' buffers.
    let upkeep = metrics.clone();
    let upkeep = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Endpoints { metrics, readiness });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    upkeep.abort();
    served.map_err(|e| {
        outpost::Error::config("OUTPOST_HTTP_ADDR", "a working listener", e.to_string())
    })
}

async fn render_metrics(State(endpoints): State<Endpoints>) -> String {
    endpoints.metrics.render()
}

async fn ready(State(endpoints): State<Endpoints>) -> (StatusCode, String) {
    let (ready, body) = endpoints.readiness.check().await;
    if ready {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}
