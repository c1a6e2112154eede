//! `outpost`: migrate the outbox table, run the relay (one daemon for many services, with
//! /metrics and health), inspect and repair it (`status`, `dead`), try it out with
//! `quickstart` and `demo`, measure it with `bench`.

mod bench;
mod cli;
mod config;
mod daemon;
mod dead;
mod faults;
mod demo;
mod http;
mod load;
mod quickstart;
mod settings;
mod status;
mod verify;
mod wal;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use tokio_util::sync::CancellationToken;
use tracing::info;
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command, LogFormat, Wake};
use outpost::{OutboxStore, WakeSignal};
use settings::{ServiceSettings, Settings};

/// Exit code for bad settings (as opposed to a runtime failure).
const EXIT_CONFIG: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            eprintln!("{}", one_line(&e.to_string()));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let settings = match Settings::from_cli(&cli, &matches) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(settings.log_format);
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
    let shutdown = CancellationToken::new();
    if matches!(
        cli.command,
        Command::Relay
            | Command::Load { .. }
            | Command::Wal {
                command: cli::WalCommand::Relay
            }
    ) {
        cancel_on_signal(shutdown.clone());
    }
    let pool = settings.connect().await?;
    let store = settings.store(pool.clone());
    match cli.command {
        Command::Migrate => {
            for service in &settings.services {
                let store = OutboxStore::new(pool.clone(), service.table.clone());
                store.migrate().await?;
                println!(
                    "migrated {} (stage from SQL with {}(topic, event_key, payload, headers))",
                    store.table(),
                    store.table().stage_function()
                );
            }
        }
        Command::Relay => daemon::run(&settings, pool, shutdown).await?,
        Command::Quickstart {
            events,
            keys,
            mode,
            concurrency,
            json,
        } => {
            let reports =
                quickstart::run(&settings, store, &mode.modes(), events, keys, concurrency).await?;
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
        Command::Status { json } => status::run(&settings, &pool, json).await?,
        Command::Dead { command } => dead::run(&settings, &pool, command).await?,
        Command::Wal { command } => wal::run(&settings, pool, command, shutdown).await?,
        Command::Bench {
            quick,
            json,
            plans,
            wal_only,
        } => {
            bench::run(&cli, &settings, quick, json, plans, wal_only).await?;
        }
        Command::Load {
            mode,
            rate,
            duration,
            keys,
            payload_bytes,
            into,
            poison_every,
        } => {
            let plan = load::LoadPlan {
                mode: mode.mode(),
                rate,
                duration,
                keys,
                payload_bytes,
                topic: into,
                poison_every,
            };
            let report = load::run(&settings, store, &plan, shutdown).await?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Verify {
            ledger,
            from,
            wait,
            fault_ended_ms,
            read_first,
        } => {
            let verdict = verify::run(
                &settings.producer,
                &store,
                &ledger,
                from.as_deref(),
                wait,
                fault_ended_ms,
                read_first.as_deref(),
            )
            .await?;
            println!("{}", serde_json::to_string(&verdict)?);
            // A gate for scripts: the verdict is printed either way.
            verdict.holds()?;
        }
        Command::Faults {
            quick,
            json,
            scenarios,
        } => faults::run(quick, json, &scenarios).await?,
        Command::Requeue { ids, all } => {
            dead::run(&settings, &pool, cli::DeadCommand::Requeue { ids, all }).await?;
        }
    }
    Ok(())
}

/// Writes logs to stderr as text or JSON lines, filtered by `OUTPOST_LOG` (default warn).
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("OUTPOST_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    // A log line that cannot be written (stderr closed, a pipe whose reader went away) is
    // dropped: reported, the report's own write panicked the thread that logged, librdkafka's
    // delivery-report thread among them, and the relay stopped delivering for good.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}

/// Starts `service`'s wake-up listener feeding `signal`.
pub(crate) fn start_listener(
    settings: &Settings,
    service: &ServiceSettings,
    signal: &WakeSignal,
    pool: sqlx::PgPool,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let name = &service.name;
    match service.wake {
        Wake::Redis => {
            signal
                .listen_redis(&settings.redis_url, name, shutdown.clone())
                .map_err(|_| {
                    outpost::Error::config(
                        "OUTPOST_REDIS_URL (--redis-url, redis_url)",
                        "redis://host[:port][/db]",
                        settings::redact(&settings.redis_url),
                    )
                })?;
        }
        Wake::Notify => {
            signal.listen_notify(pool, name, shutdown.clone())?;
        }
        Wake::None => {}
    }
    Ok(())
}

/// Cancels `token` on the first ctrl-c or SIGTERM. On Unix the handlers are in place when
/// this returns, so a signal that arrives while the daemon is still starting up (migrating,
/// connecting) is not lost: the relays then drain at once.
pub(crate) fn cancel_on_signal(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let signals = signal(SignalKind::terminate())
            .and_then(|term| signal(SignalKind::interrupt()).map(|int| (term, int)));
        tokio::spawn(async move {
            match signals {
                Ok((mut term, mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
            info!("shutdown requested; draining");
            token.cancel();
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        info!("shutdown requested; draining");
        token.cancel();
    });
}
