//! `outpost`: migrate the outbox table, run the relay, try it out with `quickstart` and
//! `demo`, measure it with `bench`.

mod bench;
mod cli;
mod demo;
mod quickstart;
mod settings;

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::info;
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command, Wake};
use outpost::{Relay, WakeSignal};
use settings::Settings;

/// Exit code for bad settings (as opposed to a runtime failure).
const EXIT_CONFIG: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("OUTPOST_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            eprintln!("{}", one_line(&e.to_string()));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let settings = match Settings::from_cli(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match run(cli, settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut line = format!("error: {e}");
            for cause in e.chain().skip(1) {
                line.push_str(&format!(": {cause}"));
            }
            eprintln!("{line}");
            let config = e
                .downcast_ref::<outpost::Error>()
                .is_some_and(|e| e.code() == outpost::ErrorCode::Configuration);
            ExitCode::from(if config { EXIT_CONFIG } else { 1 })
        }
    }
}

/// Folds clap's multi-line usage error into one line (without the usage and help hints).
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run(cli: Cli, settings: Settings) -> anyhow::Result<()> {
    let pool = settings.connect().await?;
    let store = settings.store(pool.clone());
    match cli.command {
        Command::Migrate => {
            store.migrate().await?;
            println!("migrated {}", store.table());
        }
        Command::Relay => {
            store.migrate().await?;
            let shutdown = CancellationToken::new();
            let signal = WakeSignal::new();
            start_listener(&cli, &settings, &signal, pool, &shutdown)?;
            let relay = Relay::new(store, settings.producer()?, settings.relay.clone())?
                .with_wake_signal(signal);
            let token = shutdown.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                info!("shutdown requested; draining");
                token.cancel();
            });
            relay.run(shutdown.cancelled_owned()).await?;
        }
        Command::Quickstart {
            events,
            keys,
            mode,
            concurrency,
            json,
        } => {
            let reports = quickstart::run(
                &cli,
                &settings,
                store,
                &mode.modes(),
                events,
                keys,
                concurrency,
            )
            .await?;
            if json {
                let out = match reports.as_slice() {
                    [one] => serde_json::to_value(one)?,
                    many => serde_json::json!({ "modes": many }),
                };
                println!("{out}");
            } else {
                for report in &reports {
                    report.print();
                }
            }
        }
        Command::Demo { .. } => demo::run(&cli).await?,
        Command::Bench { quick, json, plans } => {
            bench::run(&cli, &settings, quick, json, plans).await?;
        }
        Command::Status => {
            let backlog = store.backlog().await?;
            println!(
                "{}: pending {} (oldest {:.3} s)",
                store.table(),
                backlog.pending,
                backlog.oldest_pending.as_secs_f64()
            );
            for dead in store.dead(100).await? {
                println!(
                    "dead id={} event_id={} topic={} key={} attempts={} error={}",
                    dead.id,
                    dead.event_id,
                    dead.topic,
                    dead.event_key,
                    dead.attempts,
                    dead.last_error.unwrap_or_default()
                );
            }
        }
        Command::Requeue { ids } => {
            let n = store
                .requeue(if ids.is_empty() { None } else { Some(&ids) })
                .await?;
            println!("requeued {n} event(s)");
        }
    }
    Ok(())
}

/// Starts the configured wake-up listener feeding `signal`.
pub(crate) fn start_listener(
    cli: &Cli,
    settings: &Settings,
    signal: &WakeSignal,
    pool: sqlx::PgPool,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let service = &settings.relay.service;
    match cli.wake {
        Wake::Redis => {
            signal
                .listen_redis(&cli.redis_url, service, shutdown.clone())
                .map_err(|_| {
                    outpost::Error::config(
                        "OUTPOST_REDIS_URL (--redis-url)",
                        "redis://host[:port][/db]",
                        &cli.redis_url,
                    )
                })?;
        }
        Wake::Notify => {
            signal.listen_notify(pool, service, shutdown.clone())?;
        }
        Wake::None => {}
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
