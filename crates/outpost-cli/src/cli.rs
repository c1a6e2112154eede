//! Command-line definition.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Deserialize;

/// Outpost: transactional outbox relay and tools for PostgreSQL + Kafka.
#[derive(Debug, Parser)]
#[command(name = "outpost", version, about)]
pub struct Cli {
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "OUTPOST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test",
        hide_env_values = true,
        global = true
    )]
    pub database_url: String,
    /// Kafka bootstrap servers, host:port[,host:port...].
    #[arg(
        long,
        env = "OUTPOST_BROKERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    pub brokers: String,
    /// Redis URL (wake-ups with --wake redis).
    #[arg(
        long,
        env = "OUTPOST_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true,
        global = true
    )]
    pub redis_url: String,
    /// Schema holding the service's outbox table.
    #[arg(long, env = "OUTPOST_SCHEMA", default_value = "outpost", global = true)]
    pub schema: String,
    /// Service name (wake-up key outbox:wake:{service}, metric label).
    #[arg(
        long,
        env = "OUTPOST_SERVICE",
        default_value = "outpost",
        global = true
    )]
    pub service: String,
    /// testing | development | production: polling and back-off defaults.
    #[arg(
        long,
        env = "OUTPOST_ENVIRONMENT",
        default_value = "production",
        global = true
    )]
    pub environment: String,
    /// How the relay is woken after a commit.
    #[arg(long, env = "OUTPOST_WAKE", value_enum, default_value_t = Wake::Redis, global = true)]
    pub wake: Wake,
    /// Longest idle polling interval in milliseconds (overrides the environment default).
    #[arg(long, env = "OUTPOST_POLL_MAX_MS", global = true)]
    pub poll_max_ms: Option<u64>,
    /// Shortest polling interval in milliseconds, used after activity or a wake-up
    /// (default 10).
    #[arg(long, env = "OUTPOST_POLL_MIN_MS", global = true)]
    pub poll_min_ms: Option<u64>,
    /// Wait after a failed relay iteration in milliseconds (overrides the environment
    /// default: 1 s testing, 10 s development, 30 s production).
    #[arg(long, env = "OUTPOST_ERROR_BACKOFF_MS", global = true)]
    pub error_backoff_ms: Option<u64>,
    /// Keys claimed per claim statement (default 500).
    #[arg(long, env = "OUTPOST_BATCH_SIZE", global = true)]
    pub batch_size: Option<usize>,
    /// Most rows read and not yet settled at once, per service (default 5000).
    #[arg(long, env = "OUTPOST_MAX_IN_FLIGHT", global = true)]
    pub max_in_flight: Option<usize>,
    /// Topic override, STAGED=PRODUCED: events staged for topic STAGED are produced to
    /// PRODUCED (repeatable; wins over the file's `topics` per topic).
    #[arg(long = "topic", value_name = "STAGED=PRODUCED", global = true)]
    pub topics: Vec<String>,
    /// Kafka delivery timeout in milliseconds (message.timeout.ms).
    #[arg(
        long,
        env = "OUTPOST_DELIVERY_TIMEOUT_MS",
        default_value_t = 30_000,
        global = true
    )]
    pub delivery_timeout_ms: u64,
    /// Kafka request timeout in milliseconds (request.timeout.ms): how long one produce
    /// request may wait for the broker's answer; capped at the delivery timeout.
    #[arg(
        long,
        env = "OUTPOST_REQUEST_TIMEOUT_MS",
        default_value_t = 10_000,
        global = true
    )]
    pub request_timeout_ms: u64,
    /// How long a relay's lease on a key lasts, in milliseconds; the relay renews it while
    /// it works (default: 90 s, and at least twice the delivery plus request timeout).
    #[arg(long, env = "OUTPOST_LEASE_MS", global = true)]
    pub lease_ms: Option<u64>,
    /// Longest wait for the database's answer to one of the relay's statements, in
    /// milliseconds; one not answered by then is tried again on a new connection (default
    /// 30 s).
    #[arg(long, env = "OUTPOST_STATEMENT_TIMEOUT_MS", global = true)]
    pub statement_timeout_ms: Option<u64>,
    /// How long published rows are kept before the relay deletes them, in seconds.
    #[arg(
        long,
        env = "OUTPOST_RETENTION_SECS",
        default_value_t = 3600,
        global = true
    )]
    pub retention_secs: u64,
    /// Extra librdkafka producer property, KEY=VALUE (repeatable).
    #[arg(long = "kafka-option", value_name = "KEY=VALUE", global = true)]
    pub kafka_options: Vec<String>,
    /// TOML file with shared settings and one `[[service]]` table per outbox; flags and
    /// environment variables override it.
    #[arg(long, env = "OUTPOST_CONFIG", value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz on this address (relay only), e.g.
    /// 127.0.0.1:9464.
    #[arg(
        long,
        env = "OUTPOST_HTTP_ADDR",
        value_name = "HOST:PORT",
        global = true
    )]
    pub http_addr: Option<String>,
    /// Log line format on stderr.
    #[arg(long, env = "OUTPOST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Wake-up transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Wake {
    /// Redis LPUSH/BLPOP on outbox:wake:{service}.
    Redis,
    /// PostgreSQL LISTEN/NOTIFY on channel outbox:wake:{service}.
    Notify,
    /// Polling only.
    None,
}

/// Which publishing modes quickstart runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuickstartMode {
    /// Stage in a transaction, produce right after commit.
    Transactional,
    /// Produce directly, outbox on failure.
    KafkaFirst,
    /// Stage in a transaction, the woken relay delivers.
    OutboxOnly,
    /// All three, one after the other.
    All,
}

impl QuickstartMode {
    /// The library modes this selects.
    pub fn modes(self) -> Vec<outpost::Mode> {
        use outpost::Mode;
        match self {
            Self::Transactional => vec![Mode::Transactional],
            Self::KafkaFirst => vec![Mode::KafkaFirst],
            Self::OutboxOnly => vec![Mode::OutboxOnly],
            Self::All => vec![Mode::Transactional, Mode::KafkaFirst, Mode::OutboxOnly],
        }
    }
}

/// `outpost load --mode`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LoadMode {
    /// Stage in a transaction, produce right after commit.
    Transactional,
    /// Produce directly, outbox on failure.
    KafkaFirst,
    /// Stage in a transaction, the relay delivers.
    OutboxOnly,
}

impl LoadMode {
    /// The library mode.
    pub fn mode(self) -> outpost::Mode {
        match self {
            Self::Transactional => outpost::Mode::Transactional,
            Self::KafkaFirst => outpost::Mode::KafkaFirst,
            Self::OutboxOnly => outpost::Mode::OutboxOnly,
        }
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the outbox schema, table and indexes (idempotent).
    Migrate,
    /// Run the relay until SIGTERM or ctrl-c.
    Relay,
    /// Stage events, let the relay deliver them, consume them back and report latency.
    Quickstart {
        /// How many events to stage.
        #[arg(long, default_value_t = 1000)]
        events: usize,
        /// How many distinct partition keys to spread them over.
        #[arg(long, default_value_t = 16)]
        keys: usize,
        /// Publishing mode(s): transactional, kafka-first, outbox-only, or all.
        #[arg(long, value_enum, default_value_t = QuickstartMode::All)]
        mode: QuickstartMode,
        /// Concurrent publishing tasks (each owns a share of the keys).
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the HuleEdu batch pipeline (BOS, File Service, ELS, Spellchecker) on Outpost:
    /// a batch of essays through every phase, timed hop by hop, then the same in the
    /// relay-only baseline HuleEdu had, for comparison.
    Demo {
        /// Essays in the batch (the shipped corpus has 25, two of them invalid; more reuse
        /// its files).
        #[arg(long, default_value_t = 25)]
        essays: usize,
        /// Also run the relay-only baseline (default, except with --outage).
        #[arg(long, overrides_with = "no_baseline")]
        baseline: bool,
        /// Skip the baseline.
        #[arg(long)]
        no_baseline: bool,
        /// Run on a private broker and pause it (SIGSTOP) for 5 s mid-run.
        #[arg(long)]
        outage: bool,
        /// Print one JSON object instead of text (progress still goes to stderr).
        #[arg(long)]
        json: bool,
        /// Directory of essay files (default: the shipped corpus).
        #[arg(long)]
        corpus: Option<std::path::PathBuf>,
        /// Partitions of each topic (default: one per CPU core, from 2 to 8).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=64))]
        partitions: Option<i32>,
    },
    /// Measure the raw produce and INSERT+COMMIT limits and Outpost's latencies, drain
    /// rates and relay memory side by side (see BENCHMARKS.md); use a release build.
    Bench {
        /// Small sizes: checks the command works (seconds), not the figures.
        #[arg(long)]
        quick: bool,
        /// Print one JSON object instead of the table (progress goes to stderr).
        #[arg(long)]
        json: bool,
        /// Also print the EXPLAIN ANALYZE plans of the relay's claim statements.
        #[arg(long)]
        plans: bool,
        /// Measure the raw produce limits and WAL mode only.
        #[arg(long)]
        wal_only: bool,
    },
    /// Show pending count, oldest pending age, parked and recently published events per
    /// service.
    Status {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// WAL mode: set up and check logical replication, run the WAL relay, and handle its
    /// dead letters (stream, slot and SQL function named after each service's schema).
    Wal {
        /// What to do.
        #[command(subcommand)]
        command: WalCommand,
    },
    /// Inspect, requeue or purge parked (dead) events.
    Dead {
        /// What to do with them.
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Publish a steady stream of events in one mode, recording every committed one (or,
    /// Kafka-first, every acknowledged one) in a ledger table; prints one JSON object.
    Load {
        /// Publishing mode: transactional, kafka-first or outbox-only.
        #[arg(long, value_enum)]
        mode: LoadMode,
        /// Events per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// How long to publish (e.g. 30s, 2m).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        duration: std::time::Duration,
        /// Distinct partition keys.
        #[arg(long, default_value_t = 16)]
        keys: usize,
        /// Padding bytes in each event's body.
        #[arg(long, default_value_t = 256)]
        payload_bytes: usize,
        /// Topic to publish to (default: a new one with 4 partitions). (`--topic` is the
        /// global topic override.)
        #[arg(long, value_name = "TOPIC")]
        into: Option<String>,
        /// Make every N-th event a poison one (a 16 KiB body), for relays whose producer
        /// refuses large messages.
        #[arg(long, value_name = "N")]
        poison_every: Option<u32>,
    },
    /// Read a topic back and hold it against a ledger written by `load`: committed,
    /// delivered, missing, duplicates, per-key order violations, parked; one JSON object.
    Verify {
        /// The ledger table, `schema.table` (as `load` printed it).
        #[arg(long)]
        ledger: String,
        /// The topic to read (default: the one topic the ledger names). (`--topic` is the
        /// global topic override.)
        #[arg(long, value_name = "TOPIC")]
        from: Option<String>,
        /// Stop reading after this long without a new ledger event (e.g. 30s).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        wait: std::time::Duration,
        /// When a fault ended (Unix milliseconds): report `recovery_ms`, how long after it
        /// the last event committed before it was produced.
        #[arg(long, value_name = "UNIX_MS")]
        fault_ended_ms: Option<i64>,
        /// A JSON array of the event ids (null for none) read from the topic before its
        /// broker lost it (a broker with memory storage killed): counted first.
        #[arg(long, value_name = "FILE")]
        read_first: Option<std::path::PathBuf>,
    },
    /// Run fault scenarios under load on a private broker (broker paused in each mode,
    /// relays killed) and judge each against its promise; fails when one is broken.
    Faults {
        /// Short durations: checks the kit works and the promises hold, in seconds.
        #[arg(long)]
        quick: bool,
        /// Print one JSON object instead of a line per scenario.
        #[arg(long)]
        json: bool,
        /// Scenarios to run (default all).
        scenarios: Vec<String>,
    },
    /// Put parked (dead) events back in line (the same as `dead requeue`).
    Requeue {
        /// Row ids to requeue.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<i64>,
        /// Requeue every parked event (asked for by name: an empty id list, from a shell
        /// variable say, must not requeue them all).
        #[arg(long)]
        all: bool,
    },
}

/// `outpost wal` subcommands.
#[derive(Debug, Subcommand)]
pub enum WalCommand {
    /// Check the server, then create what is missing: slot, publication, the SQL function
    /// `"<schema>".emit(...)` and the dead-letter table (idempotent). Exits non-zero, having
    /// created nothing, while the server cannot replicate; says what to change.
    Init {
        /// Print a JSON array of reports instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check `wal_level`, slots, senders, the role, WAL retention and the stream's objects;
    /// change nothing. Exits non-zero when something must be fixed.
    Doctor {
        /// Print a JSON array of reports instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the WAL relay of every configured service until SIGTERM or ctrl-c (one leads
    /// per stream; start more for availability).
    Relay,
    /// List or requeue the events the broker refused for good.
    Dead {
        /// What to do with them.
        #[command(subcommand)]
        command: WalDeadCommand,
    },
    /// Drop the slot and publication, so the server stops keeping WAL for them; events
    /// not yet delivered are lost.
    Drop {
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
}

/// `outpost wal dead` subcommands.
#[derive(Debug, Subcommand)]
pub enum WalDeadCommand {
    /// List dead letters, oldest first.
    List {
        /// Print a JSON array per service instead of text.
        #[arg(long)]
        json: bool,
        /// Most letters listed per service.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
    },
    /// Emit the given dead letters into the stream again (and delete them).
    Requeue {
        /// Dead letter ids (see `list`).
        #[arg(required = true)]
        ids: Vec<i64>,
    },
}

/// Dead-letter subcommands. With several services configured, `--service` picks the one
/// whose row ids are meant (`list` shows all services without it).
#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List parked events, oldest first.
    List {
        /// Print a JSON array instead of text.
        #[arg(long)]
        json: bool,
        /// Most events listed per service.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
    },
    /// Show one parked event: headers, reason, attempts and payload.
    Show {
        /// Row id (from `dead list`).
        id: i64,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put parked events back in line at their original position.
    Requeue {
        /// Row ids to requeue.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<i64>,
        /// Requeue every parked event.
        #[arg(long)]
        all: bool,
    },
    /// Delete parked events for good.
    Purge {
        /// Row ids to delete.
        #[arg(required_unless_present = "older_than", conflicts_with = "older_than")]
        ids: Vec<i64>,
        /// Delete parked events staged longer ago than this (e.g. 7d, 12h, 30m).
        #[arg(long, value_name = "DURATION", value_parser = age)]
        older_than: Option<std::time::Duration>,
    },
}

/// A `--older-than` age: a humantime duration (7d, 12h, 30m) of at most 100 years, which
/// PostgreSQL's intervals hold.
fn age(text: &str) -> Result<std::time::Duration, String> {
    let age = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if age > std::time::Duration::from_secs(100 * 365 * 24 * 3600) {
        return Err("at most 100 years (e.g. 7d, 12h, 30m)".into());
    }
    Ok(age)
}
