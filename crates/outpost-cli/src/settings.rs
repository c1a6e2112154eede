//! Turns the config file, environment and flags into validated library configuration.
//! Flags and environment variables win over the file, the file over built-in defaults.
//! Every failure names the setting (or file key) and the expected form.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::ArgMatches;
use outpost::kafka::producer::validate_brokers;
use outpost::{
    Environment, Error, KafkaProducer, OutboxStore, OutboxTable, ProducerConfig, RelayConfig,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::cli::{Cli, LogFormat, Wake};
use crate::config::{ConfigFile, ServiceOptions};

/// Everything a subcommand needs, validated.
#[derive(Debug)]
pub struct Settings {
    pub database: PgConnectOptions,
    /// With any password replaced by `***`.
    pub database_url: String,
    /// As given, password included: only for the WAL relay's replication connection.
    pub database_secret: Secret,
    pub brokers: String,
    pub redis_url: String,
    pub producer: ProducerConfig,
    /// The first service's relay settings (single-service commands use these).
    pub relay: RelayConfig,
    /// The first service's table.
    pub table: OutboxTable,
    pub environment: Environment,
    /// The first service's wake-up transport.
    pub wake: Wake,
    /// Every service selected, in file order (one without a file).
    pub services: Vec<ServiceSettings>,
    pub http_addr: Option<SocketAddr>,
    pub log_format: LogFormat,
}

/// A value never printed: `Debug` shows `***`.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// One outbox the relay serves.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub name: String,
    pub table: OutboxTable,
    pub wake: Wake,
    pub relay: RelayConfig,
}

/// Where a value came from: the flag and variable, or the file key.
struct Layers<'a> {
    matches: &'a ArgMatches,
    file: Option<&'a ConfigFile>,
}

impl Layers<'_> {
    /// Whether `id` was given on the command line or in its environment variable (as
    /// opposed to clap's default), at any subcommand level.
    fn explicit(&self, id: &str) -> bool {
        let mut level = Some(self.matches);
        while let Some(m) = level {
            if matches!(
                m.try_get_raw(id).ok().and(m.value_source(id)),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            ) {
                return true;
            }
            level = m.subcommand().map(|(_, sub)| sub);
        }
        false
    }

    /// The value to use and the name to blame for it: the flag's value when given (or
    /// when the file is silent), else the file's.
    fn pick<T: Clone>(
        &self,
        id: &str,
        flag: &str,
        cli: &T,
        from_file: impl Fn(&ConfigFile) -> Option<T>,
    ) -> (T, String) {
        match self.file {
            Some(file) if !self.explicit(id) => match from_file(file) {
                Some(v) => (v, file.key(id)),
                None => (cli.clone(), flag.to_owned()),
            },
            _ => (cli.clone(), flag.to_owned()),
        }
    }
}

impl Settings {
    pub fn from_cli(cli: &Cli, matches: &ArgMatches) -> Result<Self, Error> {
        let file = cli.config.as_deref().map(ConfigFile::load).transpose()?;
        let layers = Layers {
            matches,
            file: file.as_ref(),
        };
        let (database_url, setting) = layers.pick(
            "database_url",
            "OUTPOST_DATABASE_URL (--database-url)",
            &cli.database_url,
            |f| f.database_url.clone(),
        );
        let database = PgConnectOptions::from_str(&database_url)
            .ok()
            .filter(|_| {
                database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")
            })
            .ok_or_else(|| {
                Error::config(
                    &setting,
                    "postgres://user[:password]@host[:port]/database",
                    redact(&database_url),
                )
            })?
            // Idempotent DDL raises "already exists" notices; they are not news.
            .options([("client_min_messages", "warning")]);
        let (brokers, setting) = layers.pick(
            "brokers",
            "OUTPOST_BROKERS (--brokers)",
            &cli.brokers,
            |f| f.brokers.clone(),
        );
        validate_brokers(&brokers)
            .map_err(|_| Error::config(&setting, "host:port[,host:port...]", &brokers))?;
        let (redis_url, _) = layers.pick(
            "redis_url",
            "OUTPOST_REDIS_URL (--redis-url)",
            &cli.redis_url,
            |f| f.redis_url.clone(),
        );
        let (environment, setting) = layers.pick(
            "environment",
            "OUTPOST_ENVIRONMENT (--environment)",
            &cli.environment,
            |f| f.environment.clone(),
        );
        let environment: Environment = environment.parse().map_err(|_| {
            Error::config(
                &setting,
                "one of testing, development, production",
                &environment,
            )
        })?;
        let (log_format, _) = layers.pick("log_format", "", &cli.log_format, |f| f.log_format);
        let (http_addr, setting) = layers.pick(
            "http_addr",
            "OUTPOST_HTTP_ADDR (--http-addr)",
            &cli.http_addr,
            |f| f.http_addr.clone().map(Some),
        );
        let http_addr = http_addr
            .map(|a| {
                a.parse::<SocketAddr>()
                    .map_err(|_| Error::config(&setting, "ip:port, e.g. 127.0.0.1:9464", &a))
            })
            .transpose()?;

        let (delivery_ms, setting) = layers.pick(
            "delivery_timeout_ms",
            "OUTPOST_DELIVERY_TIMEOUT_MS (--delivery-timeout-ms)",
            &cli.delivery_timeout_ms,
            |f| f.delivery_timeout_ms,
        );
        let (request_ms, request_setting) = layers.pick(
            "request_timeout_ms",
            "OUTPOST_REQUEST_TIMEOUT_MS (--request-timeout-ms)",
            &cli.request_timeout_ms,
            |f| f.request_timeout_ms,
        );
        let mut producer = ProducerConfig::new(&brokers);
        producer.delivery_timeout = Duration::from_millis(delivery_ms);
        producer.request_timeout = Duration::from_millis(request_ms);
        if let Some(file) = &file {
            producer.librdkafka.extend(file.kafka_options.clone());
        }
        for opt in &cli.kafka_options {
            let (k, v) = opt.split_once('=').ok_or_else(|| {
                Error::config(
                    "--kafka-option",
                    "KEY=VALUE (a librdkafka property)",
                    redact_option(opt),
                )
            })?;
            producer.librdkafka.insert(k.trim().into(), v.trim().into());
        }
        // Named as the user set it: the delivery timeout by its flag, a refused property
        // (`librdkafka.KEY`) by the flag and the file section that pass it.
        producer.validate().map_err(|e| match e {
            Error::Configuration {
                setting: checked,
                expected,
                got,
            } => Error::Configuration {
                setting: match checked.strip_prefix("librdkafka.") {
                    Some(key) => format!("--kafka-option {key} ([kafka_options])"),
                    None if checked == "delivery_timeout" => setting.clone(),
                    None if checked == "request_timeout" => request_setting.clone(),
                    None => checked,
                },
                expected,
                got,
            },
            other => other,
        })?;
        let (retention_secs, _) = layers.pick("retention_secs", "", &cli.retention_secs, |f| {
            f.retention_secs
        });
        let lease_ms = cli
            .lease_ms
            .or_else(|| file.as_ref().and_then(|f| f.lease_ms));
        let statement_timeout_ms = cli
            .statement_timeout_ms
            .or_else(|| file.as_ref().and_then(|f| f.statement_timeout_ms));
        let globals = Globals {
            environment,
            retention: Duration::from_secs(retention_secs),
            lease: lease_ms.map(Duration::from_millis),
            statement_timeout: statement_timeout_ms.map(Duration::from_millis),
            // The relay's own bound on one send (it checks the lease against it again).
            longest_send: producer.delivery_timeout
                + producer.request_timeout.min(producer.delivery_timeout),
        };
        let services = select_services(cli, &layers, file.as_ref())?
            .into_iter()
            .map(|s| s.settle(cli, &layers, &globals))
            .collect::<Result<Vec<_>, _>>()?;
        let first = services[0].clone();
        Ok(Self {
            database,
            database_secret: Secret(database_url.clone()),
            database_url: redact(&database_url),
            brokers,
            redis_url,
            producer,
            relay: first.relay,
            table: first.table,
            environment,
            wake: first.wake,
            services,
            http_addr,
            log_format,
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
            // The relay's statements are short; on a large backlog their cost estimates pass
            // `jit_above_cost` and they compile (24.7 ms of JIT in the bench's fetch plan of
            // a 1M-row backlog).
            .connect_with(self.database.clone().options([("jit", "off")]))
            .await
            .map_err(|e| fail(&e))
    }

    pub fn store(&self, pool: PgPool) -> OutboxStore {
        OutboxStore::new(pool, self.table.clone())
    }

    pub fn producer(&self) -> Result<Arc<KafkaProducer>, Error> {
        KafkaProducer::new(self.producer.clone()).map(Arc::new)
    }

    /// Creates a topic named `prefix.<random>` with `partitions` partitions.
    pub async fn new_topic(&self, prefix: &str, partitions: i32) -> anyhow::Result<String> {
        let topic = format!("{prefix}.{}", uuid::Uuid::new_v4().simple());
        outpost::kafka::producer::create_topic(
            &self.brokers,
            &topic,
            partitions,
            Duration::from_secs(10),
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot create topic on OUTPOST_BROKERS={}: {e}",
                self.brokers
            )
        })?;
        Ok(topic)
    }

    /// How a publisher wakes the relay of the first service (Redis unreachable: polling).
    pub async fn waker(&self, pool: PgPool) -> Result<outpost::Waker, Error> {
        let service = &self.relay.service;
        Ok(match self.wake {
            Wake::Redis => match outpost::Waker::redis(&self.redis_url, service).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "redis unavailable; relying on polling");
                    outpost::Waker::None
                }
            },
            Wake::Notify => outpost::Waker::notify(pool, service)?,
            Wake::None => outpost::Waker::None,
        })
    }
}

/// Settings shared by every service.
struct Globals {
    environment: Environment,
    retention: Duration,
    lease: Option<Duration>,
    statement_timeout: Option<Duration>,
    longest_send: Duration,
}

/// A service before its settings are layered and validated.
struct Candidate {
    name: String,
    schema: String,
    options: ServiceOptions,
    /// How messages name this service's keys: `service[1].` in the file, or "" for flags.
    key: Option<String>,
}

/// The file's services (narrowed by an explicit `--service`), or the one the flags name.
fn select_services(
    cli: &Cli,
    layers: &Layers<'_>,
    file: Option<&ConfigFile>,
) -> Result<Vec<Candidate>, Error> {
    let Some(file) = file.filter(|f| !f.services.is_empty()) else {
        return Ok(vec![Candidate {
            name: cli.service.clone(),
            schema: cli.schema.clone(),
            options: file.map(ConfigFile::defaults).unwrap_or_default(),
            key: None,
        }]);
    };
    let mut all = Vec::new();
    for (i, s) in file.services.iter().enumerate() {
        let key = file.key(&format!("service[{i}].name"));
        if all.iter().any(|c: &Candidate| c.name == s.name) {
            return Err(Error::config(key, "a service name used once", &s.name));
        }
        all.push(Candidate {
            name: s.name.clone(),
            schema: s.schema.clone().unwrap_or_else(|| s.name.clone()),
            options: s.options(file),
            key: Some(format!("service[{i}].")),
        });
    }
    if layers.explicit("service") {
        let names = all.iter().map(|c| c.name.as_str()).collect::<Vec<_>>();
        let expected = format!(
            "one of the services in {}: {}",
            file.path.display(),
            names.join(", ")
        );
        all.retain(|c| c.name == cli.service);
        if all.is_empty() {
            return Err(Error::config(
                "OUTPOST_SERVICE (--service)",
                expected,
                &cli.service,
            ));
        }
    }
    if layers.explicit("schema") {
        match all.as_mut_slice() {
            [one] => one.schema.clone_from(&cli.schema),
            _ => {
                return Err(Error::config(
                    "OUTPOST_SCHEMA (--schema)",
                    "to be given with --service when the config file lists several services",
                    &cli.schema,
                ))
            }
        }
    }
    Ok(all)
}

impl Candidate {
    /// Layers explicit flags over the file and validates the service's settings.
    fn settle(
        self,
        cli: &Cli,
        layers: &Layers<'_>,
        globals: &Globals,
    ) -> Result<ServiceSettings, Error> {
        let file = layers.file;
        let name_of = |field: &str, flag: &str| match (&self.key, file) {
            (Some(prefix), Some(f)) => f.key(&format!("{prefix}{field}")),
            _ => flag.to_owned(),
        };
        outpost::relay::wake::validate_service(&self.name).map_err(|_| {
            Error::config(
                name_of("name", "OUTPOST_SERVICE (--service)"),
                "1-48 characters of [A-Za-z0-9_.-]",
                &self.name,
            )
        })?;
        let table = OutboxTable::new(&self.schema).map_err(|_| {
            Error::config(
                if layers.explicit("schema") || self.key.is_none() {
                    "OUTPOST_SCHEMA (--schema)".to_owned()
                } else {
                    name_of("schema", "")
                },
                "a lowercase SQL identifier ([a-z_][a-z0-9_]*, at most 63 bytes)",
                &self.schema,
            )
        })?;
        let wake = if layers.explicit("wake") {
            cli.wake
        } else {
            self.options.wake.unwrap_or(cli.wake)
        };
        let mut relay = RelayConfig::new(&self.name, globals.environment);
        if let Some(ms) = cli.poll_max_ms.or(self.options.poll_max_ms) {
            relay.poll.max_interval = Duration::from_millis(ms);
            relay.poll.min_interval = relay.poll.min_interval.min(relay.poll.max_interval);
        }
        if let Some(ms) = cli.poll_min_ms.or(self.options.poll_min_ms) {
            relay.poll.min_interval = Duration::from_millis(ms);
        }
        if let Some(ms) = cli.error_backoff_ms.or(self.options.error_backoff_ms) {
            relay.poll.error_backoff = Duration::from_millis(ms);
        }
        if let Some(n) = cli.batch_size.or(self.options.batch_size) {
            relay.batch_size = n;
        }
        if let Some(n) = cli.max_in_flight.or(self.options.max_in_flight) {
            relay.max_in_flight = n;
        }
        relay.topics = self.options.topics;
        for flag in &cli.topics {
            let (from, to) = flag
                .split_once('=')
                .filter(|(from, _)| !from.trim().is_empty())
                .ok_or_else(|| {
                    Error::config("--topic", "STAGED=PRODUCED (two topic names)", flag)
                })?;
            relay.topics.insert(from.trim().into(), to.trim().into());
        }
        let topic_key = |from: &str| {
            let from_flag = cli
                .topics
                .iter()
                .any(|f| f.split_once('=').is_some_and(|(f, _)| f.trim() == from));
            if from_flag || file.is_none() {
                "--topic".to_owned()
            } else {
                name_of(&format!("topics.\"{from}\""), "--topic")
            }
        };
        relay.retention = globals.retention;
        relay.lease = globals
            .lease
            .unwrap_or_else(|| relay.lease.max(globals.longest_send * 2));
        if let Some(limit) = globals.statement_timeout {
            relay.statement_timeout = limit;
        }
        relay.validate(globals.longest_send).map_err(|e| match e {
            Error::Configuration {
                setting,
                expected,
                got,
            } if setting.starts_with("topics.") => {
                let from = setting["topics.".len()..].trim_matches('"');
                Error::Configuration {
                    setting: topic_key(from),
                    expected,
                    got,
                }
            }
            other => name_cli_setting(other),
        })?;
        Ok(ServiceSettings {
            name: self.name,
            table,
            wake,
            relay,
        })
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
                "statement_timeout" => {
                    "OUTPOST_STATEMENT_TIMEOUT_MS (--statement-timeout-ms, statement_timeout_ms)"
                        .to_owned()
                }
                "batch_size" => "OUTPOST_BATCH_SIZE (--batch-size, batch_size)".to_owned(),
                "max_in_flight" => {
                    "OUTPOST_MAX_IN_FLIGHT (--max-in-flight, max_in_flight)".to_owned()
                }
                "poll.max_interval" => "OUTPOST_POLL_MAX_MS (--poll-max-ms, poll_max_ms) / \
                     OUTPOST_POLL_MIN_MS (--poll-min-ms, poll_min_ms)"
                    .to_owned(),
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

/// Hides the value of a `--kafka-option` whose name suggests a secret.
fn redact_option(opt: &str) -> String {
    let lower = opt.to_ascii_lowercase();
    if ["password", "secret", "key"]
        .iter()
        .any(|w| lower.contains(w))
    {
        "***".to_owned()
    } else {
        opt.to_owned()
    }
}

/// Hides the passwords of a URL before it is printed (see [`outpost::error::redact_url`]).
pub(crate) fn redact(url: &str) -> String {
    outpost::error::redact_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:****@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        let query = redact("postgres://u@h/db?password=secret");
        assert!(!query.contains("secret"), "{query}");
    }
}
