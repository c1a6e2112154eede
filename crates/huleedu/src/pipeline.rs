//! The whole pipeline in one process: BOS, the File Service, ELS, the Spellchecker and the
//! notification observer, sharing nothing but Kafka. Each has its own PostgreSQL schema
//! (`{name}_{run}`: its tables, outbox and inbox, reached through the pool's
//! `search_path`), its own producer, publisher and relay, its own consumer group, and
//! learns about the others only from events.
//!
//! ```text
//!  client ─register─▶ BOS ──registered──────────────▶ ELS
//!  client ─upload───▶ File Service ─provisioned/failed─▶ ELS
//!                                  ─added/removed─────▶ observer
//!                     BOS ◀─ready───────────────────── ELS ─slot assigned, status─▶ observer
//!                     BOS ──spellcheck initiate──────▶ ELS ─requested─▶ Spellchecker
//!                                                      ELS ◀─completed── Spellchecker
//!                     BOS ◀─phase outcome──────────── ELS ─progress, concluded──▶ observer
//! ```
//!
//! [`RunMode::Instant`] is Outpost: state changes and their events commit together and are
//! produced right after the commit, the relay (woken over Redis) is the safety net, and the
//! File Service publishes Kafka-first. [`RunMode::Baseline`] is what HuleEdu ran in July
//! 2025: every event through the outbox, and relays that poll every 5 s with no wake-ups.
//! Consumers are identical in both.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost::backoff::Backoff;
use outpost::{
    Consumer, ConsumerConfig, Environment, Inbox, InboxConfig, InboxTable, Inboxed,
    InboxedPublishing, KafkaProducer, Mode, OutboxStore, OutboxTable, Process, ProducerConfig,
    Publisher, PublisherConfig, Relay, RelayConfig, WakeSignal, Waker,
};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use uuid::Uuid;

use crate::bos::{self, BatchOrchestrator};
use crate::content::ContentStore;
use crate::counters::Counters;
use crate::els::{self, EssayLifecycle};
use crate::error::{Error, Result};
use crate::events::{topic, Topics};
use crate::file_service::{self, FileService};
use crate::observer::{self, Observer};
use crate::run::Paths;
use crate::spellchecker::{self, Spellchecker};
use crate::spelling::{Dictionary, DEFAULT_DICTIONARY};
use crate::timeline::Timeline;

/// Messages of a partition a service settles in one transaction when they are already
/// waiting: one commit, one inbox round of locks (ELS's batch count row is locked once per
/// unit, not once per result) and one eager dispatch for all of them.
const SETTLED_TOGETHER: usize = 32;

/// How long after its first delivery a duplicate of an event may still arrive; the
/// inboxes remember processed events for longer (their default, 7 days).
const RETRY_HORIZON: Duration = Duration::from_secs(24 * 3600);

/// The services that consume (each has a dead-letter topic).
pub(crate) const CONSUMERS: [&str; 4] = ["bos", "els", "spellchecker", "observer"];

/// How events get from a committed transaction to Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    /// Outpost: transactional with eager dispatch (the File Service Kafka-first); relays
    /// woken over Redis, polling at most every 5 s.
    Instant,
    /// HuleEdu's always-outbox design: outbox-only, no wake-ups, relays polling every 5 s.
    Baseline,
}

impl RunMode {
    /// `instant` or `baseline`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Instant => "instant",
            Self::Baseline => "baseline",
        }
    }

    /// One line saying what the mode does.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Instant => {
                "transactional outbox + eager dispatch (File Service Kafka-first), relays woken over Redis"
            }
            Self::Baseline => {
                "relay-only outbox, no wake-ups, relays polling every 5 s (HuleEdu, July 2025)"
            }
        }
    }
}

/// Where the services are and how a run behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    /// PostgreSQL URL; every service gets its own schema in this database.
    pub database_url: String,
    /// Redis URL (wake-ups in the instant mode).
    pub redis_url: String,
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Instant or baseline.
    pub mode: RunMode,
    /// Topic names (default: HuleEdu's followed by `.{run_id}`). A run's new consumer
    /// groups read from the beginning of their topics, so a run needs topics of its own;
    /// [`Topics::huleedu`] (the exact names) only on a broker that has never carried them.
    /// Starting new groups at the end of shared topics is not an option on tansu, whose
    /// reported high watermarks can lag the log end.
    pub topics: Topics,
    /// Suffix of schemas, consumer groups and service names (default: 8 random hex
    /// digits), so runs never share state.
    pub run_id: String,
    /// Partitions of each topic created (default: one per CPU core, from 2 to 8). A
    /// consumer handles its partitions concurrently, each one unit at a time. Every
    /// partition adds a transaction and an eager dispatch per unit, and beyond the cores it
    /// adds no parallelism: on 2 cores a 25-essay batch took about 190 ms with 2
    /// partitions, 250 ms with 4 and 290 ms with 8, while 1,000 essays took the same with
    /// any of them (BENCHMARKS.md).
    pub partitions: i32,
    /// The relays' longest idle wait, and the baseline's fixed polling interval (default
    /// 5 s, HuleEdu's production value).
    pub poll_interval: Duration,
    /// How long a produce may take until acked (default 2 s, so a broker outage shows as
    /// fallbacks within seconds rather than after librdkafka's 30 s).
    pub delivery_timeout: Duration,
    /// Consumers' `session.timeout.ms` (default 2 s). tansu takes half of it to let a
    /// consumer join its group, so it is short; a broker outage longer than it makes every
    /// consumer rejoin after the broker is back, which takes seconds more.
    pub session_timeout: Duration,
    /// How long starting the pipeline, and a batch, may take (default 120 s).
    pub timeout: Duration,
}

impl PipelineConfig {
    /// Defaults for services on 127.0.0.1.
    pub fn new(mode: RunMode) -> Self {
        let run_id = Uuid::new_v4().simple().to_string()[..8].to_owned();
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/test".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            brokers: "127.0.0.1:9092".into(),
            mode,
            topics: Topics::with_suffix(&run_id),
            run_id,
            partitions: default_partitions(),
            poll_interval: Duration::from_secs(5),
            delivery_timeout: Duration::from_secs(2),
            session_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(120),
        }
    }
}

/// One partition per CPU core, from 2 (so partitions are still handled side by side) to 8.
fn default_partitions() -> i32 {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    i32::try_from(cores.clamp(2, 8)).unwrap_or(8)
}

/// One service's Outpost plumbing.
#[derive(Debug)]
struct Node {
    /// Short name: schema prefix and timeline label.
    name: &'static str,
    /// Outpost service name (wake-up key, metric label): HuleEdu's name plus the run id.
    service: String,
    pool: PgPool,
    publisher: Publisher,
    inbox: Inbox,
    /// Wakes its relay.
    signal: WakeSignal,
}

/// The running pipeline.
#[derive(Debug)]
pub struct Pipeline {
    config: PipelineConfig,
    timeline: Timeline,
    counters: Option<Counters>,
    bos: BatchOrchestrator,
    file_service: FileService,
    els: EssayLifecycle,
    spellchecker: Spellchecker,
    observer: Observer,
    nodes: Vec<Node>,
    shutdown: CancellationToken,
    tasks: Vec<(String, JoinHandle<outpost::Result<()>>)>,
    listeners: Vec<JoinHandle<()>>,
    started_in: Duration,
}

impl Pipeline {
    /// Creates the topics and schemas, starts every service (relays, wake-up listeners,
    /// consumers) and waits until each consumer group has joined.
    ///
    /// Each run's consumer groups are new and read their topics from the beginning, so the
    /// topics must be the run's own (see [`PipelineConfig::topics`]).
    ///
    /// # Errors
    /// Whatever fails first: configuration, PostgreSQL, Kafka, or a group not joining
    /// within the timeout.
    pub async fn start(config: PipelineConfig) -> Result<Self> {
        let began = Instant::now();
        let counters = Counters::install();
        let topics = &config.topics;
        for t in &all_topics(topics) {
            outpost::kafka::producer::create_topic(
                &config.brokers,
                t,
                config.partitions,
                config.timeout,
            )
            .await?;
        }

        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut listeners = Vec::new();
        let (kafka_first, transactional) = match config.mode {
            RunMode::Instant => (Mode::KafkaFirst, Mode::Transactional),
            RunMode::Baseline => (Mode::OutboxOnly, Mode::OutboxOnly),
        };
        let mut nodes = Vec::new();
        for (name, huleedu_service, mode) in [
            ("bos", bos::SERVICE, transactional),
            ("file", file_service::SERVICE, kafka_first),
            ("els", els::SERVICE, transactional),
            ("spellchecker", spellchecker::SERVICE, transactional),
            ("observer", observer::SERVICE, transactional),
        ] {
            let node =
                Node::start(&config, name, huleedu_service, mode, &shutdown, &mut tasks).await?;
            listeners.extend(node.listener(&config, &shutdown)?);
            nodes.push(node);
        }
        let node = |name: &str| {
            nodes
                .iter()
                .find(|n| n.name == name)
                .expect("every service has a node")
        };

        let content_schema = format!("content_{}", config.run_id);
        let content = ContentStore::new(connect(&config.database_url, &content_schema).await?);
        content
            .migrate()
            .await
            .map_err(Error::db("content-service", "migrate"))?;
        let bos = BatchOrchestrator::new(node("bos").publisher.clone(), topics.clone());
        bos.migrate().await?;
        let file_service = FileService::new(
            node("file").publisher.clone(),
            content.clone(),
            topics.clone(),
        );
        file_service.migrate().await?;
        let els = EssayLifecycle::new(node("els").publisher.clone(), topics.clone());
        els.migrate().await?;
        let spellchecker = Spellchecker::new(
            node("spellchecker").publisher.clone(),
            content,
            Dictionary::parse(DEFAULT_DICTIONARY),
            topics.clone(),
        );
        spellchecker.migrate().await?;
        let observer = Observer::new(node("observer").pool.clone());
        observer.migrate().await?;

        let timeline = Timeline::new();
        let consumers = [
            node("bos")
                .consume(
                    &config,
                    &bos::CONSUMES,
                    timeline.recorded("bos", node("bos").inboxed(bos.clone())),
                    &shutdown,
                )
                .await?,
            node("els")
                .consume(
                    &config,
                    &els::CONSUMES,
                    timeline.recorded("els", node("els").inboxed(els.clone())),
                    &shutdown,
                )
                .await?,
            node("spellchecker")
                .consume(
                    &config,
                    &spellchecker::CONSUMES,
                    timeline.recorded(
                        "spellchecker",
                        node("spellchecker").inboxed(spellchecker.clone()),
                    ),
                    &shutdown,
                )
                .await?,
            node("observer")
                .consume(
                    &config,
                    &observer::CONSUMES,
                    timeline.recorded(
                        "observer",
                        Inboxed::new(node("observer").inbox.clone(), observer.clone()),
                    ),
                    &shutdown,
                )
                .await?,
        ];
        let mut groups = Vec::new();
        for (name, group, handle) in consumers {
            tasks.push((format!("{name} consumer"), handle));
            groups.push(group);
        }
        let mut pipeline = Self {
            nodes,
            config,
            timeline,
            counters,
            bos,
            file_service,
            els,
            spellchecker,
            observer,
            shutdown,
            tasks,
            listeners,
            started_in: Duration::ZERO,
        };
        // Dropping the pipeline on failure stops what was started.
        wait_for_groups(&pipeline.config.brokers, groups, pipeline.config.timeout).await?;
        pipeline.started_in = began.elapsed();
        Ok(pipeline)
    }

    /// The settings.
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// How long [`start`](Self::start) took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// What the consumers handled.
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// The Batch Orchestrator.
    pub fn bos(&self) -> &BatchOrchestrator {
        &self.bos
    }

    /// The File Service.
    pub fn file_service(&self) -> &FileService {
        &self.file_service
    }

    /// The Essay Lifecycle Service.
    pub fn els(&self) -> &EssayLifecycle {
        &self.els
    }

    /// The Spellchecker.
    pub fn spellchecker(&self) -> &Spellchecker {
        &self.spellchecker
    }

    /// The notification observer.
    pub fn observer(&self) -> &Observer {
        &self.observer
    }

    /// Each service's outbox: `(name, store)`.
    pub fn outboxes(&self) -> Vec<(&'static str, &OutboxStore)> {
        self.nodes
            .iter()
            .map(|n| (n.name, n.publisher.store()))
            .collect()
    }

    /// Each service's inbox: `(name, inbox)` (the File Service consumes nothing; its inbox
    /// stays empty).
    pub fn inboxes(&self) -> Vec<(&'static str, &Inbox)> {
        self.nodes.iter().map(|n| (n.name, &n.inbox)).collect()
    }

    /// Outbox rows still pending, all services.
    ///
    /// # Errors
    /// [`Error::Outpost`] when a backlog query fails.
    pub async fn pending_outbox_rows(&self) -> Result<i64> {
        let mut pending = 0;
        for node in &self.nodes {
            pending += node.publisher.store().backlog().await?.pending;
        }
        Ok(pending)
    }

    /// Which path events took, from Outpost's counters and the File Service's count.
    pub(crate) fn paths(&self) -> Paths {
        let sum = |name: &str, result: Option<&str>| {
            self.counters.as_ref().map(|c| {
                self.nodes
                    .iter()
                    .map(|n| {
                        let mut labels = vec![("service", n.service.as_str())];
                        labels.extend(result.map(|r| ("result", r)));
                        c.get(name, &labels)
                    })
                    .sum::<u64>()
            })
        };
        let hits = sum(outpost::metrics::EAGER_DISPATCH, Some("hit"));
        let published = sum(outpost::metrics::EVENTS_PUBLISHED, None);
        Paths {
            kafka_first_fallbacks: self.file_service.fallbacks(),
            eager_hits: hits,
            eager_misses: sum(outpost::metrics::EAGER_DISPATCH, Some("miss")),
            // The eager path settles through the same delivery code, so its acks count as
            // published too.
            relay_deliveries: published.zip(hits).map(|(p, h)| p.saturating_sub(h)),
        }
    }

    /// Stops consumers (after the message in hand), relays (after the batch in hand),
    /// publishers (their eager dispatches in flight) and listeners, and waits for them. Then deletes the run's topics when they are its own
    /// (a long-lived tansu slows down as topics pile up); the schemas stay for inspection.
    ///
    /// # Errors
    /// The first error a consumer or relay stopped with.
    pub async fn shutdown(mut self) -> Result<()> {
        self.shutdown.cancel();
        let mut first = None;
        for (name, task) in std::mem::take(&mut self.tasks) {
            match tokio::time::timeout(Duration::from_secs(15), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    warn!(task = name, error = %e, "stopped with an error");
                    first.get_or_insert(Error::Outpost(e));
                }
                Ok(Err(e)) => warn!(task = name, error = %e, "task panicked"),
                Err(_) => warn!(task = name, "did not stop within 15 s"),
            }
        }
        // Eager dispatches still in flight finish and settle, or the relays of the next
        // run would send their events a second time.
        for node in &self.nodes {
            node.publisher.shutdown(Duration::from_secs(5)).await;
        }
        for listener in std::mem::take(&mut self.listeners) {
            let _ = listener.await;
        }
        if self.config.topics.is_run_specific() {
            delete_topics(&self.config.brokers, &all_topics(&self.config.topics)).await;
        }
        first.map_or(Ok(()), Err)
    }
}

/// Every topic a run uses: the pipeline's and each consumer's dead-letter topic.
fn all_topics(topics: &Topics) -> Vec<String> {
    let mut all: Vec<String> = topic::ALL.iter().map(|t| topics.name(t)).collect();
    all.extend(CONSUMERS.iter().map(|name| topics.dead_letter(name)));
    all
}

/// Deletes `topics`, best effort: a failure only leaves them behind.
async fn delete_topics(brokers: &str, topics: &[String]) {
    let admin: AdminClient<DefaultClientContext> = match ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
    {
        Ok(admin) => admin,
        Err(e) => {
            warn!(error = %e, "cannot create admin client; topics kept");
            return;
        }
    };
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
    match admin.delete_topics(&names, &options).await {
        Ok(results) => {
            for (topic, code) in results.into_iter().filter_map(Result::err) {
                warn!(topic, error = %code, "topic not deleted");
            }
        }
        Err(e) => warn!(error = %e, "topics not deleted"),
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // A pipeline dropped without shutdown (a failed test) must not leave tasks running.
        self.shutdown.cancel();
    }
}

impl Node {
    /// Opens the service's schema (outbox and inbox migrated), producer, relay (started),
    /// wake-ups (instant mode) and publisher in `mode`.
    async fn start(
        config: &PipelineConfig,
        name: &'static str,
        huleedu_service: &str,
        mode: Mode,
        shutdown: &CancellationToken,
        tasks: &mut Vec<(String, JoinHandle<outpost::Result<()>>)>,
    ) -> Result<Self> {
        let schema = format!("{name}_{}", config.run_id);
        let pool = connect(&config.database_url, &schema).await?;
        let store = OutboxStore::new(pool.clone(), OutboxTable::new(&schema)?);
        store.migrate().await?;
        let inbox = Inbox::new(
            pool.clone(),
            InboxTable::new(&schema)?,
            InboxConfig::default(),
            RETRY_HORIZON,
        )?;
        inbox.migrate().await?;

        let service = format!("{huleedu_service}-{}", config.run_id);
        let mut producer_config =
            ProducerConfig::new(&config.brokers).with("reconnect.backoff.max.ms", "200");
        producer_config.delivery_timeout = config.delivery_timeout;
        producer_config.request_timeout = Duration::from_secs(1);
        producer_config.queue_timeout = Duration::from_millis(500);
        let producer = Arc::new(KafkaProducer::new(producer_config)?);

        let mut relay_config = RelayConfig::new(&service, Environment::Production);
        relay_config.poll.max_interval = config.poll_interval;
        // Retries during an outage stay frequent, so recovery shows at once.
        relay_config.backoff = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
        };
        let waker = match config.mode {
            RunMode::Instant => Waker::redis(&config.redis_url, &service)
                .await
                .unwrap_or_else(|e| {
                    warn!(error = %e, service, "redis unavailable; relays fall back to polling");
                    Waker::None
                }),
            RunMode::Baseline => {
                relay_config.poll.min_interval = config.poll_interval;
                // HuleEdu's relay fetched the 100 oldest rows whatever their keys; Outpost's
                // claims at most `per_key` rows of one key per poll, which at fixed 5 s
                // polling would hold the tail of a long key chain (the batch's progress
                // events, then its outcome) back a whole interval.
                relay_config.per_key = relay_config.batch_size;
                Waker::None
            }
        };
        let signal = WakeSignal::new();
        let relay = Relay::new(store.clone(), Arc::clone(&producer), relay_config.clone())?
            .with_wake_signal(signal.clone());
        // Relays started together would poll in lockstep, so every fixed-interval hop would
        // wait either almost nothing or a whole interval. Independently deployed services
        // poll at unrelated moments: start each baseline relay at a random point of the
        // interval, so a hop waits half an interval on average, as in HuleEdu.
        let phase = match config.mode {
            RunMode::Instant => Duration::ZERO,
            RunMode::Baseline => {
                let interval = u128::max(config.poll_interval.as_millis(), 1);
                let offset = Uuid::new_v4().as_u128() % interval;
                Duration::from_millis(u64::try_from(offset).unwrap_or(0))
            }
        };
        let stop = shutdown.clone();
        tasks.push((
            format!("{name} relay"),
            tokio::spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => Ok(()),
                    () = tokio::time::sleep(phase) => relay.run(stop.cancelled_owned()).await,
                }
            }),
        ));

        let mut publisher_config = PublisherConfig::new(&service, Environment::Production);
        publisher_config.mode = mode;
        publisher_config.delivery = relay_config;
        let publisher = Publisher::new(store, producer, waker, publisher_config)?;
        Ok(Self {
            name,
            service,
            pool,
            publisher,
            inbox,
            signal,
        })
    }

    /// In the instant mode, the Redis listener that wakes this service's relay.
    fn listener(
        &self,
        config: &PipelineConfig,
        shutdown: &CancellationToken,
    ) -> Result<Option<JoinHandle<()>>> {
        Ok(match config.mode {
            RunMode::Instant => Some(self.signal.listen_redis(
                &config.redis_url,
                &self.service,
                shutdown.clone(),
            )?),
            RunMode::Baseline => None,
        })
    }

    /// Starts this service's consumer of `consumed` (HuleEdu names) with `process`; returns
    /// the name, group and task.
    async fn consume<P: Process + 'static>(
        &self,
        config: &PipelineConfig,
        consumed: &[&str],
        process: P,
        shutdown: &CancellationToken,
    ) -> Result<(&'static str, String, JoinHandle<outpost::Result<()>>)> {
        let topics: Vec<String> = consumed.iter().map(|t| config.topics.name(t)).collect();
        let group = self.service.clone();
        register_group(&config.brokers, &group, &topics, config.timeout).await?;
        let mut consumer_config = ConsumerConfig::new(
            &config.brokers,
            &group,
            topics,
            config.topics.dead_letter(self.name),
        )
        .with(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        )
        .with(
            "heartbeat.interval.ms",
            (config.session_timeout / 4).as_millis().to_string(),
        )
        // tansu answers an empty fetch only when the wait expires; keep that wait short.
        .with("fetch.wait.max.ms", "10")
        .with("reconnect.backoff.max.ms", "200");
        consumer_config.together = SETTLED_TOGETHER;
        consumer_config.retry = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
        };
        let consumer = Consumer::new(consumer_config, process)?;
        let task = tokio::spawn(consumer.run(shutdown.clone().cancelled_owned()));
        Ok((self.name, group, task))
    }

    /// `handler` behind this service's inbox, publishing through its publisher.
    fn inboxed<H: outpost::PublishingHandler>(&self, handler: H) -> InboxedPublishing<H> {
        InboxedPublishing::new(self.inbox.clone(), self.publisher.clone(), handler)
    }
}

/// A pool whose connections use `schema` as their `search_path` (created if missing), so a
/// service's SQL names its tables plainly.
async fn connect(database_url: &str, schema: &str) -> Result<PgPool> {
    let db = |operation| Error::db("pipeline", operation);
    let options = PgConnectOptions::from_str(database_url)
        .map_err(db("parse_database_url"))?
        .options([("search_path", schema), ("client_min_messages", "warning")]);
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        // A broken connection fails its statement, which is retried; a ping before every
        // acquire would cost a round trip on the hot path.
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .map_err(db("connect"))?;
    OutboxTable::new(schema)?; // a plain identifier, so it can be quoted into the DDL
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
        .execute(&pool)
        .await
        .map_err(db("create_schema"))?;
    Ok(pool)
}

fn kafka_err(operation: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> Error {
    let operation = operation.into();
    move |source| Error::Kafka { operation, source }
}

/// Commits `group`'s offsets at the beginning of `topics` (where a new group starts
/// anyway), so the broker knows the group before its consumer joins: tansu lists a group,
/// and so lets [`wait_for_groups`] see it join, only once it has stored offsets.
///
/// The beginning is offset 0, not a watermark (tansu's can be wrong): a run's topics are
/// its own, and should a log start later, the consumer's `auto.offset.reset=earliest`
/// moves it from 0 to the first message there is.
async fn register_group(
    brokers: &str,
    group: &str,
    topics: &[String],
    timeout: Duration,
) -> Result<()> {
    let (brokers, group, topics) = (brokers.to_owned(), group.to_owned(), topics.to_vec());
    let register = move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(kafka_err("create registering consumer"))?;
        let mut offsets = TopicPartitionList::new();
        for topic in &topics {
            let metadata = consumer
                .fetch_metadata(Some(topic), timeout)
                .map_err(kafka_err(format!("metadata of {topic}")))?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            for partition in partitions {
                offsets
                    .add_partition_offset(topic, partition, Offset::Offset(0))
                    .map_err(kafka_err("offset list"))?;
            }
        }
        consumer
            .commit(&offsets, CommitMode::Sync)
            .map_err(kafka_err(format!("registering group {group}")))
    };
    tokio::task::spawn_blocking(register)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Waits until every group is `Stable` with a member, i.e. its consumer has joined.
async fn wait_for_groups(brokers: &str, groups: Vec<String>, timeout: Duration) -> Result<()> {
    let brokers = brokers.to_owned();
    let wait = move || {
        let admin: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .map_err(kafka_err("create admin consumer"))?;
        let deadline = Instant::now() + timeout;
        let mut waiting = groups;
        loop {
            waiting.retain(|group| {
                let joined = admin
                    .fetch_group_list(Some(group), Duration::from_secs(2))
                    .is_ok_and(|list| {
                        list.groups()
                            .iter()
                            .any(|g| g.state() == "Stable" && !g.members().is_empty())
                    });
                !joined
            });
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("consumer groups {waiting:?} joining"),
                    waited: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    tokio::task::spawn_blocking(wait)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}
