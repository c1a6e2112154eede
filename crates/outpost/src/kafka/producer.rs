//! The Kafka producer: idempotent, acks=all, every error classified, rebuilt when fenced.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::Producer;
use rdkafka::util::Timeout;
use tracing::warn;

use crate::error::{classify, Error, ErrorClass, Result};
use crate::kafka::acks::{AckProducer, AckTo};

/// Producer settings. Any librdkafka property can be set through `librdkafka`, which is
/// applied last, except ones that would break per-key order or the relay's lease arithmetic
/// (see [`Self::validate`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ProducerConfig {
    /// `host:port[,host:port...]` (no default; required).
    pub brokers: String,
    /// How long librdkafka waits to batch messages (`linger.ms`, default 1 ms).
    pub linger: Duration,
    /// How long a message may take until acked before it fails (`message.timeout.ms`,
    /// default 30 s).
    pub delivery_timeout: Duration,
    /// Broker request timeout (`request.timeout.ms`, default 10 s).
    pub request_timeout: Duration,
    /// How long `send` waits for room in a full local queue (default 1 s).
    pub queue_timeout: Duration,
    /// Extra librdkafka properties, applied after Outpost's own (see [`Self::validate`]).
    pub librdkafka: BTreeMap<String, String>,
}

impl ProducerConfig {
    /// Defaults for `brokers`.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            linger: Duration::from_millis(1),
            delivery_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            queue_timeout: Duration::from_secs(1),
            librdkafka: BTreeMap::new(),
        }
    }

    /// Sets one librdkafka property.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.librdkafka.insert(key.into(), value.into());
        self
    }

    /// Checks the broker list, the timeouts, and that no `librdkafka` property overrides
    /// what per-key order or the relay's lease arithmetic rely on.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the faulty setting.
    pub fn validate(&self) -> Result<()> {
        validate_brokers(&self.brokers)?;
        for (key, value) in &self.librdkafka {
            check_override(key.trim(), value.trim())?;
        }
        // librdkafka's own checks of each property, without creating a client.
        self.client_config()
            .create_native_config()
            .map_err(refused_property)?;
        if self.delivery_timeout < Duration::from_millis(100) {
            return Err(Error::config(
                "delivery_timeout",
                "at least 100 ms",
                format!("{:?}", self.delivery_timeout),
            ));
        }
        if self.request_timeout < Duration::from_millis(100) {
            return Err(Error::config(
                "request_timeout",
                "at least 100 ms",
                format!("{:?}", self.request_timeout),
            ));
        }
        Ok(())
    }

    fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.brokers)
            .set("client.id", "outpost")
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // A batch failed in a way that would leave a gap (later batches of its partition
            // landing without it) stops the producer instead: the later rows of the key fail
            // too, and the relay resends them after the failed one.
            .set("enable.gapless.guarantee", "true")
            // One request on the wire per broker: when a request times out, the rows
            // queued behind it have not been sent, and `purge_queued` fails them before
            // librdkafka can resend them under a new epoch without the timed-out one.
            .set("max.in.flight.requests.per.connection", "1")
            .set("linger.ms", self.linger.as_millis().to_string())
            .set(
                "message.timeout.ms",
                self.delivery_timeout.as_millis().to_string(),
            )
            .set(
                "request.timeout.ms",
                self.request_timeout
                    .min(self.delivery_timeout)
                    .as_millis()
                    .to_string(),
            )
            // librdkafka's 10 s reconnect ceiling delays recovery after an outage by as much.
            .set("reconnect.backoff.ms", "50")
            .set("reconnect.backoff.max.ms", "1000");
        for (k, v) in &self.librdkafka {
            cfg.set(k, v);
        }
        cfg
    }
}

/// A property librdkafka refused, named `librdkafka.KEY` (as [`check_override`] names
/// them), its value hidden where it may be a secret: librdkafka's own message quotes it.
fn refused_property(e: rdkafka::error::KafkaError) -> Error {
    match e {
        rdkafka::error::KafkaError::ClientConfig(_, desc, key, value) => {
            let shown = crate::error::shown_property(&key, &value);
            let desc = if value.is_empty() {
                desc
            } else {
                desc.replace(&value, shown)
            };
            Error::config(
                format!("librdkafka.{key}"),
                format!("a value librdkafka accepts ({desc})"),
                shown,
            )
        }
        other => Error::config(
            "librdkafka",
            "valid librdkafka properties",
            other.to_string(),
        ),
    }
}

/// Rejects a librdkafka property (names and aliases) that [`ProducerConfig::client_config`]
/// sets for a reason: applied last, it would silently win. The property is named in what
/// is expected and got too, as callers may report the error under a setting of their own.
fn check_override(key: &str, value: &str) -> Result<()> {
    let v = value.to_ascii_lowercase();
    let (ok, expected) = match key {
        "enable.idempotence" | "enable.gapless.guarantee" => (
            v == "true",
            format!("{key}=true (per-key order relies on it)"),
        ),
        "acks" | "request.required.acks" => (
            v == "all" || v == "-1",
            format!("{key}=all or -1 (per-key order relies on it)"),
        ),
        // One request on the wire: see `client_config` (`purge_queued` relies on it).
        "max.in.flight.requests.per.connection" | "max.in.flight" => (
            v == "1",
            format!("{key}=1 (per-key order after a timeout relies on it)"),
        ),
        // The relay's lease is checked against the typed timeouts; a property would
        // change them behind its back.
        "message.timeout.ms" | "delivery.timeout.ms" | "request.timeout.ms" => (
            false,
            format!(
                "{key} unset: use delivery_timeout / request_timeout \
                 (--delivery-timeout-ms, --request-timeout-ms)"
            ),
        ),
        _ => return Ok(()),
    };
    if ok {
        return Ok(());
    }
    Err(Error::config(
        format!("librdkafka.{key}"),
        expected,
        format!("{key}={value}"),
    ))
}

/// Checks a `host:port[,host:port...]` list.
///
/// # Errors
/// [`Error::Configuration`] for an empty list, a missing host or a bad port.
pub fn validate_brokers(brokers: &str) -> Result<()> {
    let bad = || Error::config("brokers", "host:port[,host:port...]", brokers);
    if brokers.trim().is_empty() {
        return Err(bad());
    }
    for entry in brokers.split(',') {
        let entry = entry.trim();
        let entry = entry
            .strip_prefix("PLAINTEXT://")
            .or_else(|| entry.strip_prefix("SSL://"))
            .unwrap_or(entry);
        let (host, port) = entry.rsplit_once(':').ok_or_else(bad)?;
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._[]:".contains(c));
        if !host_ok || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad());
        }
    }
    Ok(())
}

/// Errors after which this producer instance cannot deliver again and must be replaced.
///
/// tansu fences an idempotent producer after any timeout (`ProducerFenced`, or
/// `UnknownProducerId` after a restart); real Kafka raises fatal idempotence errors.
fn needs_rebuild(err: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        err.rdkafka_error_code(),
        Some(
            C::ProducerFenced
                | C::UnknownProducerId
                | C::InvalidProducerEpoch
                | C::InvalidProducerIdMapping
                | C::OutOfOrderSequenceNumber
                | C::Fenced
                | C::Fatal
        )
    )
}

/// A failed send.
#[derive(Debug)]
pub struct SendFailure {
    /// How the relay should react.
    pub class: ErrorClass,
    /// The client error.
    pub error: KafkaError,
}

impl SendFailure {
    /// The message was purged from librdkafka's queue (see
    /// [`KafkaProducer::purge_queued`]) because another one failed: nothing of the broker.
    pub fn is_purged(&self) -> bool {
        matches!(
            self.error,
            KafkaError::MessageProduction(
                RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight
            )
        )
    }
}

impl fmt::Display for SendFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.error, self.class)
    }
}

/// Where an acked message landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// A message queued and waiting for its report: the producer instance it went to stays
/// alive until then (see [`KafkaProducer::reported`]).
pub(crate) struct Queued {
    /// The instance's generation and the purges so far when it was queued (see
    /// [`Self::token`]).
    token: u64,
    producer: Arc<AckProducer>,
}

impl Queued {
    /// The generation of the instance it went to ([`KafkaProducer::generation`] then).
    fn generation(&self) -> u64 {
        self.token >> 32
    }

    /// What to pass as `on` to queue a message only behind this one: refused once the
    /// instance it went to was replaced or a purge ran since (see
    /// [`KafkaProducer::enqueue_reported`]).
    pub(crate) fn token(&self) -> u64 {
        self.token
    }
}

/// The wait for one queued message's acknowledgement (see [`KafkaProducer::enqueue`]).
pub type PendingAck = std::pin::Pin<
    Box<dyn std::future::Future<Output = std::result::Result<Acked, SendFailure>> + Send>,
>;

fn kafka_headers(headers: &BTreeMap<String, String>) -> OwnedHeaders {
    let mut kafka_headers = OwnedHeaders::new_with_capacity(headers.len());
    for (name, value) in headers {
        kafka_headers = kafka_headers.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    kafka_headers
}

/// An idempotent, acks=all Kafka producer that replaces itself when fenced.
pub struct KafkaProducer {
    config: ProducerConfig,
    current: RwLock<(u64, Arc<AckProducer>)>,
    /// Last ack or rebuild; timeouts long after it mean this instance is stuck.
    last_progress: std::sync::Mutex<std::time::Instant>,
    /// Messages queued so far, and their count at the last purge: a purge is skipped only
    /// when nothing was queued since the previous one.
    queued: std::sync::atomic::AtomicU64,
    last_purge: std::sync::Mutex<Option<(u64, u64)>>,
    /// Purges so far; bumped under `current`'s write lock (see [`Self::queue_on`]).
    purges: std::sync::atomic::AtomicU64,
    /// Replaced instances: each lives on while a message queued on it waits for its report,
    /// and [`Self::purge_queued`] must reach those messages too.
    retired: std::sync::Mutex<Vec<Weak<AckProducer>>>,
}

impl fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("config", &self.config)
            .field("generation", &self.generation())
            .finish()
    }
}

impl KafkaProducer {
    /// Creates the producer (does not connect yet).
    ///
    /// # Errors
    /// [`Error::Configuration`] for a bad broker list or librdkafka property.
    pub fn new(config: ProducerConfig) -> Result<Self> {
        config.validate()?;
        let producer = Self::build(&config)?;
        Ok(Self {
            config,
            current: RwLock::new((0, Arc::new(producer))),
            last_progress: std::sync::Mutex::new(std::time::Instant::now()),
            queued: std::sync::atomic::AtomicU64::new(0),
            last_purge: std::sync::Mutex::new(None),
            purges: std::sync::atomic::AtomicU64::new(0),
            retired: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn build(config: &ProducerConfig) -> Result<AckProducer> {
        AckProducer::new(&config.client_config()).map_err(refused_property)
    }

    /// The settings this producer was built from.
    pub fn config(&self) -> &ProducerConfig {
        &self.config
    }

    fn snapshot(&self) -> (u64, Arc<AckProducer>) {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        (guard.0, Arc::clone(&guard.1))
    }

    /// Queues one message with librdkafka now and returns the wait for its acknowledgement.
    /// Messages queued one after another for the same partition reach it in that order
    /// (idempotent producer), so a caller can keep many of one key in flight; unless the
    /// instance was replaced (fenced, stuck) or its queue purged in between, by this caller
    /// or any other sharing the producer: a caller keeping a key's order across those
    /// holds the key's next message until the earlier ones resolved.
    ///
    /// # Errors
    /// [`SendFailure`] when the message cannot even be queued: `QueueFull` (transient: try
    /// again once acks have drained the queue) or a local permanent error.
    pub fn enqueue(
        self: &Arc<Self>,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &BTreeMap<String, String>,
    ) -> std::result::Result<PendingAck, SendFailure> {
        let (ack, _) = self
            .enqueue_on(topic, key, payload, headers, None)?
            .expect("any instance will do");
        Ok(ack)
    }

    /// [`enqueue`](Self::enqueue), with the message's [`Queued::token`]; `on` as in
    /// [`enqueue_reported`](Self::enqueue_reported).
    pub(crate) fn enqueue_on(
        self: &Arc<Self>,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &BTreeMap<String, String>,
        on: Option<u64>,
    ) -> std::result::Result<Option<(PendingAck, u64)>, SendFailure> {
        self.enqueue_headers(topic, key, payload, kafka_headers(headers), on)
    }

    /// [`enqueue`](Self::enqueue) with the Kafka headers already built, with the message's
    /// [`Queued::token`]; `on` as in [`enqueue_reported`](Self::enqueue_reported).
    pub(crate) fn enqueue_headers(
        self: &Arc<Self>,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: OwnedHeaders,
        on: Option<u64>,
    ) -> std::result::Result<Option<(PendingAck, u64)>, SendFailure> {
        let Some((queued, delivery)) = self.queue_on(on, |producer| {
            producer.enqueue(topic, Some(key.as_bytes()), Some(payload), headers)
        })?
        else {
            return Ok(None);
        };
        let token = queued.token;
        let this = Arc::clone(self);
        let ack: PendingAck = Box::pin(async move {
            let landed = delivery.await.unwrap_or(Err(KafkaError::Canceled));
            this.reported(&queued, landed)
        });
        Ok(Some((ack, token)))
    }

    /// Queues one message like [`enqueue`](Self::enqueue), its delivery report going to
    /// `to()` instead of to a future of its own (for a caller with thousands in flight).
    /// Hand the report back to [`reported`](Self::reported) with what this returns.
    ///
    /// `on`: the [`Queued::token`] of the key's messages still out, if any: queue it only if
    /// their instance is still the current one and no purge ran since, else return
    /// `Ok(None)`, queueing nothing and calling no `to`; the caller holds the key's next
    /// messages until those resolve. On two instances (two producer ids) the broker's
    /// sequence check no longer orders them, and the new one's could land first; after a
    /// purge that failed an earlier message of the key (not known to the caller yet), this
    /// one would land ahead of its retry.
    ///
    /// # Errors
    /// As [`enqueue`](Self::enqueue); nothing is reported to `to` then.
    pub(crate) fn enqueue_reported(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: OwnedHeaders,
        to: impl FnOnce() -> AckTo,
        on: Option<u64>,
    ) -> std::result::Result<Option<Queued>, SendFailure> {
        let queued = self.queue_on(on, |producer| {
            producer.queue(topic, Some(key.as_bytes()), Some(payload), headers, to())
        })?;
        Ok(queued.map(|(queued, ())| queued))
    }

    /// Queues one message through `queue` with the current producer instance, only if the
    /// token `on` (if given) is still current (`None` otherwise): the instance is held while
    /// queueing, so it cannot be replaced, nor a purge run, between the check and the
    /// queueing (librdkafka queues without blocking). A refusal is classified (and a fenced
    /// producer replaced) as a failed delivery would be.
    fn queue_on<T>(
        &self,
        on: Option<u64>,
        queue: impl FnOnce(&AckProducer) -> std::result::Result<T, KafkaError>,
    ) -> std::result::Result<Option<(Queued, T)>, SendFailure> {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        let purges = self.purges.load(std::sync::atomic::Ordering::Acquire);
        let token = (guard.0 << 32) | (purges & 0xFFFF_FFFF);
        if on.is_some_and(|on| on != token) {
            return Ok(None);
        }
        let (generation, producer) = (guard.0, Arc::clone(&guard.1));
        let queued = queue(&producer);
        drop(guard);
        match queued {
            Ok(waiting) => {
                self.queued
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                Ok(Some((Queued { token, producer }, waiting)))
            }
            Err(error) => Err(self.outcome(generation, &producer, Err(error)).unwrap_err()),
        }
    }

    /// The outcome of a queued message, from its report: progress recorded, a fenced or
    /// stuck producer replaced, a failure classified.
    ///
    /// # Errors
    /// [`SendFailure`] with the error's class.
    pub(crate) fn reported(
        &self,
        queued: &Queued,
        landed: std::result::Result<(i32, i64), KafkaError>,
    ) -> std::result::Result<Acked, SendFailure> {
        let result = landed.map(|(partition, offset)| Acked { partition, offset });
        self.outcome(queued.generation(), &queued.producer, result)
    }

    /// Records progress or replaces a fenced/stuck producer, and classifies the failure.
    fn outcome(
        &self,
        generation: u64,
        producer: &AckProducer,
        result: std::result::Result<Acked, KafkaError>,
    ) -> std::result::Result<Acked, SendFailure> {
        match result {
            Ok(acked) => {
                self.progressed();
                Ok(acked)
            }
            Err(error) => {
                if needs_rebuild(&error)
                    || producer.inner().client().fatal_error().is_some()
                    || self.stuck(&error)
                {
                    self.rebuild(generation, &error);
                }
                Err(SendFailure {
                    class: classify(&error),
                    error,
                })
            }
        }
    }

    /// Produces one message and waits for the broker's acknowledgement.
    ///
    /// # Errors
    /// [`SendFailure`] with the error's class; a fenced producer is replaced before this
    /// returns, so the next send uses a fresh one.
    pub async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &BTreeMap<String, String>,
    ) -> Result<Acked, SendFailure> {
        let (generation, producer) = self.snapshot();
        self.queued
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let result = producer
            .send(
                topic,
                Some(key.as_bytes()),
                Some(payload),
                kafka_headers(headers),
                self.config.queue_timeout,
            )
            .await
            .map(|(partition, offset)| Acked { partition, offset });
        self.outcome(generation, &producer, result)
    }

    fn progressed(&self) {
        *self.last_progress.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
    }

    /// Timeouts for more than two delivery timeouts without a single ack. After a broker
    /// restart librdkafka's idempotent producer can loop forever on `UNKNOWN_PRODUCER_ID`
    /// internally (tansu does this) and only ever reports `MessageTimedOut`; a fresh
    /// producer recovers at once, and during a real outage a rebuild per two timeouts costs
    /// nothing.
    fn stuck(&self, error: &KafkaError) -> bool {
        error.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut)
            && self
                .last_progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
                >= self.config.delivery_timeout * 2
    }

    /// Replaces the instance of generation `seen_generation` (a no-op if it already was).
    pub(crate) fn rebuild(&self, seen_generation: u64, cause: &KafkaError) {
        if self.generation() != seen_generation {
            return; // another task already replaced it
        }
        // Built outside the lock: sends keep reading the current producer meanwhile.
        let fresh = match Self::build(&self.config) {
            Ok(fresh) => Arc::new(fresh),
            Err(e) => {
                warn!(error = %e, "could not rebuild kafka producer");
                return;
            }
        };
        let old = {
            let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
            if guard.0 != seen_generation {
                return;
            }
            warn!(error = %cause, generation = guard.0 + 1, "replacing fenced kafka producer");
            crate::metrics::producer_rebuilt();
            let old = std::mem::replace(&mut *guard, (seen_generation + 1, fresh)).1;
            // Retired under the same lock: a purge (which takes it too) reaches either the
            // instance as current or as retired, never neither.
            let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
            retired.retain(|instance| instance.strong_count() > 0);
            retired.push(Arc::downgrade(&old));
            old
        };
        self.progressed();
        // Its acks thread closes it (flushing what is in flight), off the runtime.
        drop(old);
    }

    /// Fails every message still waiting in librdkafka's queues (never sent) with
    /// `PurgeQueue`, on the current instance and on every replaced one still alive;
    /// messages already on the wire are left to resolve.
    ///
    /// librdkafka times messages out one by one: when an earlier message of a partition
    /// timed out and the broker answers again before the later ones time out, those would
    /// land without it. Purging the queue as soon as the first one fails narrows that
    /// window: every later message still queued fails too, and its key is sent again from
    /// the failed row. It does not close it: see the known gap in the tests
    /// (`a_message_timed_out_with_a_later_one_of_its_key_behind_it_lands_first`).
    pub fn purge_queued(&self) {
        // Under the write lock: no message is queued between the bump and the purge, so
        // one queued behind a key's earlier message either is purged with it or sees the
        // bump and is held back (see `queue_on`); and no instance is being retired.
        let guard = self.current.write().unwrap_or_else(|p| p.into_inner());
        // A burst of failures needs one purge, not one per message; but a message queued
        // after the last purge (another key still sending when that purge ran), or an
        // instance replaced since, must be purged too, or a message lands ahead of its
        // key's failed one.
        let queued = self.queued.load(std::sync::atomic::Ordering::Acquire);
        {
            let mut last = self.last_purge.lock().unwrap_or_else(|p| p.into_inner());
            if *last == Some((guard.0, queued)) {
                return;
            }
            *last = Some((guard.0, queued));
        }
        // The failure that calls for the purge may come from a replaced instance (the
        // timeout that made it look stuck), with its key's later messages still queued there.
        let retired: Vec<Arc<AckProducer>> = self
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        self.purges
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        for producer in retired.iter().chain([&guard.1]) {
            producer.inner().purge(
                rdkafka::producer::PurgeConfig::default()
                    .queue()
                    .non_blocking(),
            );
        }
    }

    /// [`purge_queued`](Self::purge_queued) after `failure`, unless a purge failed it: that
    /// purge failed what was queued behind it, and tokens hold back the rest (a purge for
    /// each purged message would cascade over every key queued since).
    pub(crate) fn purge_behind(&self, failure: &SendFailure) {
        if !failure.is_purged() {
            self.purge_queued();
        }
    }

    /// Waits up to `timeout` for queued messages to be delivered, off the async runtime's
    /// worker threads.
    pub async fn flush_async(self: &Arc<Self>, timeout: Duration) {
        let this = Arc::clone(self);
        let _ = tokio::task::spawn_blocking(move || this.flush(timeout)).await;
    }

    /// Waits up to `timeout` for queued messages to be delivered.
    pub fn flush(&self, timeout: Duration) {
        let (_, producer) = self.snapshot();
        if let Err(e) = producer.inner().flush(Timeout::After(timeout)) {
            warn!(error = %e, "kafka flush did not complete");
        }
    }

    /// How many times the producer was replaced.
    pub fn generation(&self) -> u64 {
        self.snapshot().0
    }
}

/// Creates `topic` with `partitions` partitions (replication 1) if it does not exist.
///
/// # Errors
/// [`Error::KafkaPublish`] when the broker refuses or cannot be reached within `timeout`.
pub async fn create_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Result<()> {
    validate_brokers(brokers)?;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| Error::config("brokers", "host:port[,host:port...]", e.to_string()))?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(timeout));
    let to_err = |source: KafkaError| Error::KafkaPublish {
        topic: topic.to_owned(),
        class: classify(&source),
        source,
    };
    let results = tokio::time::timeout(timeout, admin.create_topics([&new], &opts))
        .await
        .map_err(|_| to_err(KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut)))?
        .map_err(to_err)?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(to_err(KafkaError::AdminOp(code))),
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A mock cluster with `topics` (one partition each) whose broker is down, and a
    /// producer on it: nothing queued leaves, every report comes from the test.
    pub(crate) fn stalled(
        topics: &[&str],
    ) -> (
        rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        Arc<KafkaProducer>,
    ) {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        for topic in topics {
            cluster.create_topic(topic, 1, 1).unwrap();
        }
        cluster.broker_down(-1).unwrap();
        let producer =
            Arc::new(KafkaProducer::new(ProducerConfig::new(cluster.bootstrap_servers())).unwrap());
        (cluster, producer)
    }

    #[test]
    fn broker_lists() {
        assert!(validate_brokers("127.0.0.1:9092").is_ok());
        assert!(validate_brokers("a:1, b.example.com:9093").is_ok());
        assert!(validate_brokers("PLAINTEXT://kafka:9092").is_ok());
        for bad in [
            "",
            "kafka",
            "kafka:",
            ":9092",
            "kafka:port",
            "kafka:0",
            "a b:1",
        ] {
            let err = validate_brokers(bad).unwrap_err();
            assert!(err.to_string().contains("host:port"), "{bad}");
        }
    }

    /// A message's key may still have later messages queued on the instance it was queued
    /// on after that instance was replaced: the purge must fail them too, or they could land
    /// ahead of the failed one's retry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purging_reaches_replaced_instances() {
        // Nothing queued can leave before the purge.
        let (_cluster, producer) = stalled(&["purge"]);
        let acks: Vec<PendingAck> = (0..2)
            .map(|i| {
                let payload = format!("{i}");
                producer
                    .enqueue("purge", "k", payload.as_bytes(), &BTreeMap::new())
                    .unwrap()
            })
            .collect();
        producer.rebuild(
            0,
            &KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
        );
        assert_eq!(producer.generation(), 1);
        producer.purge_queued();
        for ack in acks {
            let failed = tokio::time::timeout(Duration::from_secs(5), ack)
                .await
                .expect("purged, not left queued on the replaced instance")
                .unwrap_err();
            assert_eq!(
                failed.error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::PurgeQueue),
                "{failed}"
            );
        }
    }

    /// KNOWN GAP, not fixed yet (found 2026-12-07): librdkafka times a message out of its
    /// partition queue (after a retriable error sent it back there) while a later message of
    /// the key waits behind it; for an idempotent producer it then bumps the epoch on its
    /// own, at once when nothing is in flight, and sends the later one, which lands before
    /// the caller even sees the timeout (so before `purge_queued` can stop it). The earlier
    /// one, sent again, lands after it. Tried and reverted: librdkafka's `message.timeout.ms`
    /// set past an Outpost deadline at which everything was purged, queue and requests in
    /// flight. It fixed this test, but purging in flight failed messages a slow broker was
    /// about to ack, and their retries put copies on the broker
    /// (`a_batch_outliving_its_lease_is_not_delivered_twice`: 14 of 12 under load). A fix
    /// must purge only the queue at the deadline, again whenever an expired message is back
    /// in it, and still end every send within the delivery plus the request timeout (the
    /// relay's lease relies on it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "known gap: a librdkafka message timeout lets the next message of its key land first"]
    async fn a_message_timed_out_with_a_later_one_of_its_key_behind_it_lands_first() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let mut cfg = ProducerConfig::new(cluster.bootstrap_servers());
        cfg.delivery_timeout = Duration::from_secs(1);
        cfg.request_timeout = Duration::from_millis(900);
        cfg.librdkafka
            .insert("retry.backoff.ms".into(), "100".into());
        cfg.librdkafka
            .insert("retry.backoff.max.ms".into(), "100".into());
        let producer = Arc::new(KafkaProducer::new(cfg).unwrap());
        let none = BTreeMap::new();
        producer.send("t", "k", b"warm", &none).await.unwrap();
        // Slow refusals the client retries, for longer than the first message may live.
        cluster
            .broker_round_trip_time(1, Duration::from_millis(300))
            .unwrap();
        cluster.request_errors(
            rdkafka::types::RDKafkaApiKey::Produce,
            &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 4],
        );
        let (first, token) = producer
            .enqueue_on("t", "k", b"1", &none, None)
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (second, _) = producer
            .enqueue_on("t", "k", b"2", &none, Some(token))
            .unwrap()
            .unwrap();
        let first = first.await;
        if first.is_err() {
            producer.purge_queued();
        }
        let second = second.await;
        assert!(
            !(first.is_err() && second.is_ok()),
            "the second landed ({second:?}) though the first failed ({first:?})"
        );
    }

    /// A message meant for a replaced instance is not queued at all (on the current one it
    /// would go out under another producer id, unordered with the first ones).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_for_a_replaced_instance_is_not_queued() {
        let (_cluster, producer) = stalled(&["on"]);
        let send = |on| producer.enqueue_headers("on", "k", b"x", OwnedHeaders::new(), on);
        let (_first, token) = send(None).unwrap().expect("queued");
        let (_, same) = send(Some(token)).unwrap().expect("same instance");
        assert_eq!(same, token);
        producer.rebuild(
            0,
            &KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
        );
        assert!(send(Some(token)).unwrap().is_none(), "replaced: not queued");
        let (_, new_token) = send(None).unwrap().expect("the new instance");
        assert!(send(Some(new_token)).unwrap().is_some());
        producer.purge_queued();
    }

    /// A message queued behind an earlier one of its key after a purge (which failed that
    /// one, though its sender has not heard yet) is not queued: it would land ahead of the
    /// earlier one's retry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_behind_a_purged_one_is_not_queued() {
        let (_cluster, producer) = stalled(&["behind"]);
        let send = |on| producer.enqueue_headers("behind", "k", b"x", OwnedHeaders::new(), on);
        let (first, token) = send(None).unwrap().expect("queued");
        producer.purge_queued();
        assert!(send(Some(token)).unwrap().is_none(), "held back");
        let failed = tokio::time::timeout(Duration::from_secs(5), first)
            .await
            .expect("purged")
            .unwrap_err();
        assert!(failed.is_purged(), "{failed}");
        // A key with nothing out goes on at once.
        let (later, _) = send(None).unwrap().expect("queued");
        producer.purge_queued();
        drop(later);
    }

    #[test]
    fn overrides_that_break_order_or_the_lease_are_refused() {
        let with = |k: &str, v: &str| ProducerConfig::new("127.0.0.1:9092").with(k, v).validate();
        for (key, value) in [
            ("enable.idempotence", "false"),
            ("enable.gapless.guarantee", "false"),
            ("acks", "1"),
            ("request.required.acks", "0"),
            ("max.in.flight.requests.per.connection", "5"),
            ("max.in.flight", "0"),
            ("message.timeout.ms", "300000"),
            ("delivery.timeout.ms", "300000"),
            ("request.timeout.ms", "30000"),
        ] {
            let err = with(key, value).unwrap_err().to_string();
            assert!(err.contains(&format!("got \"{key}={value}\"")), "{err}");
        }
        for (key, value) in [
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("acks", "-1"),
            ("max.in.flight.requests.per.connection", "1"),
            ("linger.ms", "5"),
        ] {
            assert!(with(key, value).is_ok(), "{key}={value}");
        }
    }

    #[test]
    fn fencing_errors_need_a_new_producer() {
        use RDKafkaErrorCode as C;
        assert!(needs_rebuild(&KafkaError::MessageProduction(
            C::UnknownProducerId
        )));
        assert!(!needs_rebuild(&KafkaError::MessageProduction(
            C::MessageTimedOut
        )));
    }
}
