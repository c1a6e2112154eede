//! `outpost relay`: one relay per configured service in one process, sharing a database
//! pool and a Kafka producer, plus the HTTP endpoints, until ctrl-c or SIGTERM; then every
//! relay drains (finishes and settles its batch) before the process exits.

use std::sync::Arc;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use outpost::metrics::{EVENTS_PARKED, EVENTS_RETRIED, RELAY_ERRORS};
use outpost::{ErrorClass, OutboxStore, Relay, WakeSignal};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::http::{self, Readiness};
use crate::settings::Settings;

/// Runs every service's relay (and the HTTP server, if configured) until `shutdown` is
/// cancelled.
pub async fn run(
    settings: &Settings,
    pool: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = recorder(settings)?;
    let exporting = metrics.is_some();
    let producer = settings.producer()?;
    // Whatever can still be refused (a wake-up URL, the HTTP address) is, before anything
    // is written to the database.
    let mut signals = Vec::with_capacity(settings.services.len());
    for service in &settings.services {
        let signal = WakeSignal::new();
        crate::start_listener(settings, service, &signal, pool.clone(), &shutdown)?;
        signals.push(signal);
    }
    let listener = bind_http(settings).await?;
    let mut relays = Vec::with_capacity(settings.services.len());
    for (service, signal) in settings.services.iter().zip(signals) {
        let store = OutboxStore::new(pool.clone(), service.table.clone());
        store
            .migrate()
            .await
            .with_context(|| format!("cannot migrate the outbox of service {}", service.name))?;
        if exporting {
            zero_counters(&service.name);
        }
        relays.push(
            Relay::new(store, Arc::clone(&producer), service.relay.clone())?
                .with_wake_signal(signal),
        );
    }
    let mut tasks = JoinSet::new();
    // Served once the relays are set up: /readyz answers for relays that run.
    serve_http(settings, pool, listener, metrics, &mut tasks, &shutdown)?;
    for relay in relays {
        tasks.spawn(relay.run(shutdown.clone().cancelled_owned()));
    }
    join(tasks, &shutdown).await
}

/// The Prometheus recorder, when an HTTP address is configured; installed before any relay
/// records, so no early sample is lost.
pub(crate) fn recorder(settings: &Settings) -> anyhow::Result<Option<PrometheusHandle>> {
    match settings.http_addr {
        Some(_) => Ok(Some(http::install_recorder()?)),
        None => Ok(None),
    }
}

/// The HTTP listener, when an address is configured: bound before anything else starts, so
/// an address that is taken is refused before the database is touched.
pub(crate) async fn bind_http(settings: &Settings) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = settings.http_addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on OUTPOST_HTTP_ADDR={addr}"))?;
    Ok(Some(listener))
}

/// Serves /metrics, /healthz and /readyz on `listener` in `tasks`.
pub(crate) fn serve_http(
    settings: &Settings,
    pool: PgPool,
    listener: Option<TcpListener>,
    metrics: Option<PrometheusHandle>,
    tasks: &mut JoinSet<outpost::Result<()>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    if let (Some(listener), Some(metrics)) = (listener, metrics) {
        let readiness = Readiness::new(settings, pool)?;
        let addr = listener.local_addr()?;
        info!(%addr, "serving /metrics, /healthz, /readyz");
        tasks.spawn(http::serve(
            listener,
            metrics,
            readiness,
            shutdown.clone().cancelled_owned(),
        ));
    }
    Ok(())
}

/// Waits for every task; the first failure cancels the others (which drain) and is
/// returned: one broken task stops the process rather than leaving a service silently
/// unrelayed.
pub(crate) async fn join(
    mut tasks: JoinSet<outpost::Result<()>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut first_error = None;
    while let Some(done) = tasks.join_next().await {
        let result = done
            .context("a relay task panicked")
            .and_then(|r| r.map_err(anyhow::Error::from));
        if let Err(e) = result {
            shutdown.cancel();
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Exports `service`'s failure counters at 0 from the start: Prometheus sees no increase
/// in a series that first appears at 1, so a relay that parks an event right after
/// starting would otherwise never trip `increase(...) > 0` alerts.
fn zero_counters(service: &str) {
    let service = service.to_owned();
    for class in [ErrorClass::Retriable, ErrorClass::Permanent] {
        metrics::counter!(EVENTS_PARKED, "service" => service.clone(), "class" => class.as_str())
            .increment(0);
    }
    for class in [ErrorClass::Transient, ErrorClass::Retriable] {
        metrics::counter!(EVENTS_RETRIED, "service" => service.clone(), "class" => class.as_str())
            .increment(0);
    }
    metrics::counter!(RELAY_ERRORS, "service" => service).increment(0);
}
