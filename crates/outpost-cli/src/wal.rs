//! `outpost wal ...`: WAL mode's setup (`init`, `doctor`), relay, dead letters and
//! retirement, for every configured service (each service's schema names its stream).

use std::sync::Arc;

use anyhow::Context;
use outpost::wal::{setup, WalDeadLetters, WalRelay, WalRelayConfig, WalStream};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cli::{WalCommand, WalDeadCommand};
use crate::settings::Settings;

/// Runs `command`.
pub async fn run(
    settings: &Settings,
    pool: PgPool,
    command: WalCommand,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let streams = settings
        .services
        .iter()
        .map(|s| Ok((s.name.clone(), WalStream::new(s.table.schema())?)))
        .collect::<outpost::Result<Vec<_>>>()?;
    match command {
        WalCommand::Init { json } | WalCommand::Doctor { json } => {
            let init = matches!(command, WalCommand::Init { .. });
            let mut ready = true;
            let mut reports = Vec::new();
            for (_, stream) in &streams {
                let report = if init {
                    setup::init(&pool, stream).await?
                } else {
                    setup::doctor(&pool, stream).await?
                };
                ready &= report.is_ready();
                if !json {
                    println!("stream {stream} (slot {}):", stream.slot());
                    print!("{report}");
                    if init && report.is_ready() {
                        println!(
                            "emit from SQL with {}(topic, event_key, payload, headers)",
                            stream.emit_function()
                        );
                    }
                }
                reports.push(report);
            }
            if json {
                println!("{}", serde_json::to_string(&reports)?);
            }
            anyhow::ensure!(
                ready,
                "WAL mode is not ready: apply the fixes above, then run `outpost wal init`"
            );
        }
        WalCommand::Relay => relay(settings, pool, &streams, shutdown).await?,
        // Letter ids are per stream: a requeue names one service, as in table mode.
        WalCommand::Dead {
            command: WalDeadCommand::Requeue { ids },
        } => {
            let service = crate::dead::one_service(settings)?;
            let stream = WalStream::new(service.table.schema())?;
            let n = WalDeadLetters::new(pool, stream).requeue(&ids).await?;
            println!("{}: requeued {n} event(s)", service.name);
        }
        WalCommand::Dead {
            command: WalDeadCommand::List { json, limit },
        } => {
            for (service, stream) in &streams {
                let letters = WalDeadLetters::new(pool.clone(), stream.clone())
                    .list(limit)
                    .await?;
                if json {
                    println!("{}", serde_json::to_string(&letters)?);
                    continue;
                }
                println!("{service}: {} dead letter(s)", letters.len());
                for l in &letters {
                    println!(
                        "  {} {} topic={} key={} {} bytes, commit {} [{}] {}",
                        l.id,
                        l.event_id.map_or("-".into(), |id| id.to_string()),
                        l.topic.as_deref().unwrap_or("-"),
                        l.event_key.as_deref().unwrap_or("-"),
                        l.payload_bytes,
                        l.commit_lsn,
                        l.class,
                        l.reason
                    );
                }
            }
        }
        WalCommand::Drop { yes } => {
            anyhow::ensure!(
                yes,
                "dropping a stream's slot loses every event not yet delivered: pass --yes"
            );
            for (_, stream) in &streams {
                setup::remove(&pool, stream).await?;
                println!("dropped slot and publication {}", stream.slot());
            }
        }
    }
    Ok(())
}

/// One WAL relay per service, sharing a producer, plus the HTTP endpoints when configured,
/// until `shutdown`.
async fn relay(
    settings: &Settings,
    pool: PgPool,
    streams: &[(String, WalStream)],
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = crate::daemon::recorder(settings)?;
    let producer = settings.producer()?;
    let listener = crate::daemon::bind_http(settings).await?;
    let mut tasks = JoinSet::new();
    for (service, stream) in streams {
        let report = setup::doctor(&pool, stream).await?;
        anyhow::ensure!(
            report.is_ready(),
            "WAL stream {stream} is not ready (run `outpost wal doctor`):\n{report}"
        );
        let mut config = WalRelayConfig::new(
            service.clone(),
            stream.clone(),
            settings.database_secret.0.clone(),
            settings.environment,
        );
        // Topic overrides and the attempt budget are the service's, as in table mode.
        if let Some(svc) = settings.services.iter().find(|s| &s.name == service) {
            config.topics = svc.relay.topics.clone();
            config.max_attempts = svc.relay.max_attempts;
        }
        let relay = WalRelay::new(config, pool.clone(), Arc::clone(&producer))
            .with_context(|| format!("cannot start the WAL relay of service {service}"))?;
        let token = shutdown.clone();
        tasks.spawn(async move { relay.run(token.cancelled_owned()).await });
    }
    crate::daemon::serve_http(settings, pool, listener, metrics, &mut tasks, &shutdown)?;
    crate::daemon::join(tasks, &shutdown).await
}
