//! Turns command-line and environment settings into validated library configuration.
//! Every failure names the setting and the expected form.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use outpost::producer::validate_brokers;
use outpost::{
    Environment, Error, KafkaProducer, OutboxStore, OutboxTable, ProducerConfig, RelayConfig,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::cli::Cli;

/// Everything a subcommand needs, validated.
#[derive(Debug)]
pub struct Settings {
    pub database: PgConnectOptions,
    pub database_url: String,
    pub producer: ProducerConfig,
    pub relay: RelayConfig,
    pub table: OutboxTable,
    pub environment: Environment,
}

impl Settings {
    pub fn from_cli(cli: &Cli) -> Result<Self, Error> {
        let database = PgConnectOptions::from_str(&cli.database_url)
            .ok()
            .filter(|_| {
                cli.database_url.starts_with("postgres://")
                    || cli.database_url.starts_with("postgresql://")
            })
            .ok_or_else(|| {
                Error::config(
                    "OUTPOST_DATABASE_URL (--database-url)",
                    "postgres://user[:password]@host[:port]/database",
                    redact(&cli.database_url),
                )
            })?
            // Idempotent DDL raises "already exists" notices; they are not news.
            .options([("client_min_messages", "warning")]);
        validate_brokers(&cli.brokers).map_err(|_| {
            Error::config(
                "OUTPOST_BROKERS (--brokers)",
                "host:port[,host:port...]",
                &cli.brokers,
            )
        })?;
        let environment: Environment = cli.environment.parse().map_err(|_| {
            Error::config(
                "OUTPOST_ENVIRONMENT (--environment)",
                "one of testing, development, production",
                &cli.environment,
            )
        })?;
        let table = OutboxTable::new(&cli.schema).map_err(|_| {
            Error::config(
                "OUTPOST_SCHEMA (--schema)",
                "a lowercase SQL identifier ([a-z_][a-z0-9_]*, at most 63 bytes)",
                &cli.schema,
            )
        })?;
        outpost::wake::validate_service(&cli.service).map_err(|_| {
            Error::config(
                "OUTPOST_SERVICE (--service)",
                "1-48 characters of [A-Za-z0-9_.-]",
                &cli.service,
            )
        })?;
        let mut producer = ProducerConfig::new(&cli.brokers);
        producer.delivery_timeout = Duration::from_millis(cli.delivery_timeout_ms);
        for opt in &cli.kafka_options {
            let (k, v) = opt.split_once('=').ok_or_else(|| {
                Error::config("--kafka-option", "KEY=VALUE (a librdkafka property)", opt)
            })?;
            producer.librdkafka.insert(k.trim().into(), v.trim().into());
        }
        producer.validate().map_err(|e| match e {
            Error::Configuration { expected, got, .. } => Error::Configuration {
                setting: "OUTPOST_DELIVERY_TIMEOUT_MS (--delivery-timeout-ms)".into(),
                expected,
                got,
            },
            other => other,
        })?;
        let mut relay = RelayConfig::new(&cli.service, environment);
        if let Some(ms) = cli.poll_max_ms {
            relay.poll.max_interval = Duration::from_millis(ms);
            relay.poll.min_interval = relay.poll.min_interval.min(relay.poll.max_interval);
        }
        if let Some(ms) = cli.poll_min_ms {
            relay.poll.min_interval = Duration::from_millis(ms);
        }
        if let Some(ms) = cli.error_backoff_ms {
            relay.poll.error_backoff = Duration::from_millis(ms);
        }
        relay.retention = Duration::from_secs(cli.retention_secs);
        relay.lease = match cli.lease_ms {
            Some(ms) => Duration::from_millis(ms),
            None => relay
                .lease
                .max((producer.delivery_timeout + producer.queue_timeout) * 2),
        };
        relay
            .validate(producer.delivery_timeout + producer.queue_timeout)
            .map_err(name_cli_setting)?;
        Ok(Self {
            database,
            database_url: redact(&cli.database_url),
            producer,
            relay,
            table,
            environment,
        })
    }

    /// Connects, failing fast with a message naming the setting.
    pub async fn connect(&self) -> Result<PgPool, anyhow::Error> {
        let fail = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "cannot connect to PostgreSQL at OUTPOST_DATABASE_URL={} (expected a reachable postgres://user[:password]@host[:port]/database): {e}",
                self.database_url
            )
        };
        // One direct attempt first, so a refused connection fails at once with its cause
        // rather than as a pool timeout.
        let probe = tokio::time::timeout(
            Duration::from_secs(5),
            PgConnection::connect_with(&self.database),
        )
        .await
        .map_err(|_| fail(&"no answer within 5 s"))?
        .map_err(|e| fail(&e))?;
        drop(probe);
        PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(5))
            // A broken connection fails its statement, which is retried; a ping before every
            // acquire would cost a round trip on the hot path.
            .test_before_acquire(false)
            .connect_with(self.database.clone())
            .await
            .map_err(|e| fail(&e))
    }

    pub fn store(&self, pool: PgPool) -> OutboxStore {
        OutboxStore::new(pool, self.table.clone())
    }

    pub fn producer(&self) -> Result<Arc<KafkaProducer>, Error> {
        KafkaProducer::new(self.producer.clone()).map(Arc::new)
    }
}

/// Names the flag and variable behind a library field in a configuration error.
fn name_cli_setting(e: Error) -> Error {
    match e {
        Error::Configuration {
            setting,
            expected,
            got,
        } => {
            let setting = match setting.as_str() {
                "lease" => "OUTPOST_LEASE_MS (--lease-ms)".to_owned(),
                "poll.max_interval" => {
                    "OUTPOST_POLL_MAX_MS (--poll-max-ms) / OUTPOST_POLL_MIN_MS (--poll-min-ms)"
                        .to_owned()
                }
                _ => setting,
            };
            Error::Configuration {
                setting,
                expected,
                got,
            }
        }
        other => other,
    }
}

/// Hides a password in a URL before it is printed.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
