//! The consumer side against real PostgreSQL, Redis and the tansu broker on 127.0.0.1:
//! duplicates, a crash between the business commit and the offset commit, dead letters,
//! retries, and Redis outages under both policies.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost::consuming::consumer::{
    DLQ_CONSUMER_GROUP, DLQ_ERROR_CODE, DLQ_OFFSET, DLQ_PARTITION, DLQ_PAYLOAD_OMITTED, DLQ_REASON,
    DLQ_SOURCE_TOPIC,
};
use outpost::consuming::idempotency::Claim;
use outpost::{
    Aggregate, Consumer, ConsumerConfig, Error, ErrorCode, EventEnvelope, Handler, Idempotency,
    IdempotencyConfig, Idempotent, Inbox, InboxConfig, InboxHandler, InboxTable, Inboxed,
    OutboxEvent, Outcome, Process, Received, RedisDownPolicy,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long any single wait in these tests may take.
const WAIT: Duration = Duration::from_secs(20);
/// A publisher retry horizon for tests (the inbox keeps rows longer than this).
const HORIZON: Duration = Duration::from_secs(3600);

/// Consumer settings for tansu: its group join takes `session.timeout.ms / 2`.
fn consumer_config(group: &str, topic: &str, dead_letter_topic: &str) -> ConsumerConfig {
    let mut cfg = ConsumerConfig::new(support::brokers(), group, [topic], dead_letter_topic)
        .with("session.timeout.ms", "2000")
        .with("heartbeat.interval.ms", "500")
        .with("fetch.wait.max.ms", "10")
        .with("reconnect.backoff.max.ms", "200");
    cfg.retry.initial = Duration::from_millis(50);
    cfg.retry.max = Duration::from_millis(300);
    cfg.commit_interval = Duration::from_millis(200);
    cfg
}

/// The business: one row per effect, in a schema of the test's own; no unique constraint,
/// so a duplicate that took effect shows up as a second row.
#[derive(Clone)]
struct Effects {
    pool: PgPool,
    schema: String,
    /// Retriable failures still to inject, per event.
    failures_left: Arc<Mutex<HashMap<Uuid, u32>>>,
}

impl Effects {
    async fn new() -> Self {
        let pool = support::pool().await;
        let schema = support::unique("biz");
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(&format!(
            "CREATE TABLE {schema}.effects (id BIGSERIAL PRIMARY KEY, event_id UUID NOT NULL, \
             key TEXT NOT NULL, seq BIGINT NOT NULL, tx BIGINT NOT NULL DEFAULT txid_current())"
        ))
        .execute(&pool)
        .await
        .unwrap();
        Self {
            pool,
            schema,
            failures_left: Arc::default(),
        }
    }

    async fn inbox(&self) -> Inbox {
        let table = InboxTable::new(&self.schema).unwrap();
        let inbox = Inbox::new(self.pool.clone(), table, InboxConfig::default(), HORIZON).unwrap();
        inbox.migrate().await.unwrap();
        inbox
    }

    /// Poison events fail permanently; `fail_times: n` fails retriably n times first;
    /// `panic` panics, as a handler with a bug does.
    fn check(&self, event: &EventEnvelope<serde_json::Value>) -> outpost::Result<()> {
        if event.data["poison"] == true {
            return Err(Error::permanent("poison event"));
        }
        if let Some(n) = event.data["poison_quoting"].as_u64() {
            // An error that quotes its whole (large) input.
            return Err(Error::permanent(format!(
                "cannot parse {}",
                "x".repeat(n as usize)
            )));
        }
        assert!(event.data["panic"] != true, "an essay nobody expected");
        if let Some(n) = event.data["fail_times"].as_u64() {
            let mut left = self.failures_left.lock().unwrap();
            let left = left.entry(event.event_id).or_insert(n as u32);
            if *left > 0 {
                *left -= 1;
                return Err(Error::retriable("downstream briefly unavailable"));
            }
        }
        Ok(())
    }

    /// The statements of the event's `sql` (`{schema}` filled in) to run before its
    /// effect: on every attempt, or with `sql_times: n` on the first n only.
    fn sql(&self, event: &EventEnvelope<serde_json::Value>) -> Vec<String> {
        let Some(statements) = event.data["sql"].as_array() else {
            return Vec::new();
        };
        if let Some(n) = event.data["sql_times"].as_u64() {
            let mut left = self.failures_left.lock().unwrap();
            let left = left.entry(event.event_id).or_insert(n as u32);
            if *left == 0 {
                return Vec::new();
            }
            *left -= 1;
        }
        statements
            .iter()
            .map(|s| s.as_str().unwrap().replace("{schema}", &self.schema))
            .collect()
    }

    fn insert_sql(&self) -> String {
        format!(
            "INSERT INTO {}.effects (event_id, key, seq) VALUES ($1, $2, $3)",
            self.schema
        )
    }

    /// (event_id, key, seq) in the order the effects happened.
    async fn all(&self) -> Vec<(Uuid, String, i64)> {
        sqlx::query_as(&format!(
            "SELECT event_id, key, seq FROM {}.effects ORDER BY id",
            self.schema
        ))
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    async fn count(&self, event_id: Uuid) -> usize {
        self.all()
            .await
            .iter()
            .filter(|(id, ..)| *id == event_id)
            .count()
    }
}

fn key_and_seq(event: &EventEnvelope<serde_json::Value>) -> (String, i64) {
    (
        event.data["key"].as_str().unwrap_or_default().to_owned(),
        event.data["seq"].as_i64().unwrap_or_default(),
    )
}

impl InboxHandler for Effects {
    async fn handle(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        _received: &Received,
        tx: &mut Transaction<'_, Postgres>,
    ) -> outpost::Result<()> {
        self.check(event)?;
        for statement in self.sql(event) {
            sqlx::query(&statement)
                .execute(&mut **tx)
                .await
                .map_err(Error::database)?;
        }
        let (key, seq) = key_and_seq(event);
        sqlx::query(&self.insert_sql())
            .bind(event.event_id)
            .bind(key)
            .bind(seq)
            .execute(&mut **tx)
            .await
            .map_err(Error::database)?;
        Ok(())
    }
}

/// The Redis variant's handler commits its own effect before returning.
impl Handler for Effects {
    async fn handle(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        _received: &Received,
    ) -> outpost::Result<()> {
        self.check(event)?;
        let (key, seq) = key_and_seq(event);
        sqlx::query(&self.insert_sql())
            .bind(event.event_id)
            .bind(key)
            .bind(seq)
            .execute(&self.pool)
            .await
            .map_err(Error::retriable)?;
        Ok(())
    }
}

/// [`Effects`], except that an event with `swallow_times: n` meets a failed statement on its
/// first n attempts, which the handler ignores before returning `Ok`.
struct Swallowing(Effects);

impl InboxHandler for Swallowing {
    async fn handle(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        received: &Received,
        tx: &mut Transaction<'_, Postgres>,
    ) -> outpost::Result<()> {
        if let Some(n) = event.data["swallow_times"].as_u64() {
            let swallow = {
                let mut left = self.0.failures_left.lock().unwrap();
                let left = left.entry(event.event_id).or_insert(n as u32);
                let swallow = *left > 0;
                *left = left.saturating_sub(1);
                swallow
            };
            if swallow {
                let _ = sqlx::query("SELECT 1 / 0").execute(&mut **tx).await;
                return Ok(());
            }
        }
        InboxHandler::handle(&self.0, event, received, tx).await
    }
}

type Log = Arc<Mutex<Vec<(Uuid, Result<Outcome, ErrorCode>)>>>;

/// Records every call's result.
struct Recording<P> {
    inner: P,
    log: Log,
}

impl<P: Process> Recording<P> {
    fn new(inner: P) -> (Self, Log) {
        let log = Log::default();
        (
            Self {
                inner,
                log: Arc::clone(&log),
            },
            log,
        )
    }
}

impl<P: Process> Process for Recording<P> {
    async fn process(&self, received: &Received) -> outpost::Result<Outcome> {
        let result = self.inner.process(received).await;
        let entry = result.as_ref().map(|o| *o).map_err(Error::code);
        self.log.lock().unwrap().push((received.event_id, entry));
        result
    }
}

/// Waits until `id` was handled.
async fn wait_handled(log: &Log, id: Uuid, what: &str) {
    support::eventually(WAIT, what, || {
        let handled = results(log, id).contains(&Ok(Outcome::Handled));
        async move { handled.then_some(()) }
    })
    .await;
}

/// Waits until `id` was tried at least `n` times.
async fn wait_attempts(log: &Log, id: Uuid, n: usize, what: &str) {
    support::eventually(WAIT, what, || {
        let attempts = results(log, id).len();
        async move { (attempts >= n).then_some(()) }
    })
    .await;
}

fn results(log: &Log, id: Uuid) -> Vec<Result<Outcome, ErrorCode>> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(e, _)| *e == id)
        .map(|(_, r)| *r)
        .collect()
}

fn count_ok(log: &Log, outcome: Outcome) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(_, r)| *r == Ok(outcome))
        .count()
}

/// Settles `event_id` like `inner`, then hangs for good: a process that dies after the
/// business commit and before the offset is stored or committed.
struct CrashAfter<P> {
    inner: P,
    event_id: Uuid,
    crashed: tokio::sync::mpsc::UnboundedSender<()>,
}

impl<P: Process> Process for CrashAfter<P> {
    async fn process(&self, received: &Received) -> outpost::Result<Outcome> {
        let outcome = self.inner.process(received).await?;
        if received.event_id == self.event_id {
            self.crashed.send(()).unwrap();
            std::future::pending::<()>().await;
        }
        Ok(outcome)
    }
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<outpost::Result<()>>,
}

impl Running {
    fn start<P: Process + 'static>(consumer: Consumer<P>) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(consumer.run(shutdown.clone().cancelled_owned()));
        Self { shutdown, task }
    }

    /// Graceful shutdown: drains and commits, within a bound.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("consumer drains and stops")
            .unwrap()
            .unwrap();
    }
}

/// What most tests start from, all their own: the business, a topic with `partitions`
/// partitions, a dead-letter topic, a group, and a producer.
async fn case(partitions: i32) -> (Effects, String, String, String, FutureProducer) {
    let effects = Effects::new().await;
    let topic = support::topic(partitions).await;
    let dead = support::topic(1).await;
    (effects, topic, dead, support::unique("g"), producer())
}

/// A consumer of `topic` in `group`, dead-lettering to `dead`, running `process`.
fn start<P: Process + 'static>(group: &str, topic: &str, dead: &str, process: P) -> Running {
    Running::start(Consumer::new(consumer_config(group, topic, dead), process).unwrap())
}

fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", support::brokers())
        .set("acks", "all")
        .set("linger.ms", "0")
        .create()
        .unwrap()
}

/// Sends one message and returns its partition and offset (from the delivery report:
/// tansu's watermarks can lag the log end, the offsets it acknowledges do not).
async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
    headers: &BTreeMap<String, String>,
) -> (i32, i64) {
    let mut owned = OwnedHeaders::new();
    for (k, v) in headers {
        owned = owned.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    producer
        .send(
            FutureRecord::to(topic)
                .key(key)
                .payload(payload)
                .headers(owned),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)
        .map(|d| (d.partition, d.offset))
        .expect("test message acked")
}

async fn send_event(producer: &FutureProducer, ev: &OutboxEvent) -> (i32, i64) {
    send(producer, &ev.topic, &ev.event_key, &ev.payload, &ev.headers).await
}

/// An event whose data is `{key, seq}` plus `extra`'s fields.
fn event_with(topic: &str, key: &str, seq: usize, extra: serde_json::Value) -> OutboxEvent {
    let mut data = json!({ "key": key, "seq": seq });
    for (k, v) in extra.as_object().into_iter().flatten() {
        data[k] = v.clone();
    }
    let env = EventEnvelope::new("outpost.test.v1", "outpost-tests", data);
    OutboxEvent::from_envelope(&env, topic, Aggregate::new("test", key)).unwrap()
}

/// Every message of a one-partition topic until `n` arrived.
/// Each dead letter's event id and reason, in topic order.
fn dlq_reasons(dead_letters: &[OwnedMessage]) -> Vec<(Option<String>, String)> {
    dead_letters
        .iter()
        .map(|m| (header(m, "event_id"), header(m, DLQ_REASON).unwrap()))
        .collect()
}

/// Each of `parked` failed once and was dead-lettered at once, in this order, with a
/// reason that says why.
fn assert_dead_lettered_at_once(
    log: &Log,
    dead_letters: &[OwnedMessage],
    parked: [(&OutboxEvent, &str); 2],
) {
    let reasons = dlq_reasons(dead_letters);
    for (i, (ev, why)) in parked.into_iter().enumerate() {
        assert_eq!(
            results(log, ev.event_id),
            [Err(ErrorCode::Handler)],
            "dead-lettered at once"
        );
        assert_eq!(reasons[i].0, Some(ev.event_id.to_string()));
        assert!(reasons[i].1.contains(why), "{reasons:?}");
    }
}

async fn read_topic(topic: &str, n: usize) -> Vec<OwnedMessage> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", support::brokers())
        .set("group.id", support::unique("reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} messages read from {topic}", got.len()))
            .unwrap();
        got.push(msg.detach());
    }
    got
}

/// The group's committed offset per partition (`None`: nothing committed).
async fn committed(group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    let (group, topic) = (group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", support::brokers())
            .set("group.id", &group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let offsets = consumer
            .committed_offsets(tpl, Duration::from_secs(5))
            .unwrap();
        (0..partitions)
            .map(
                |p| match offsets.find_partition(&topic, p).unwrap().offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                },
            )
            .collect()
    })
    .await
    .unwrap()
}

fn header(msg: &OwnedMessage, name: &str) -> Option<String> {
    msg.headers()?
        .iter()
        .find(|h| h.key == name)
        .map(|h| String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
}

#[tokio::test]
async fn inbox_every_event_delivered_twice_takes_effect_once() {
    let effects = Effects::new().await;
    let topic = support::topic(3).await;
    let dead = support::topic(1).await;
    support::metrics(); // record from the start
    let group = support::unique("g");
    let producer = producer();

    // 30 events over 6 keys; each copy is sent again three events later (another key),
    // and every third duplicate carries no headers, so its id comes from the body.
    let events: Vec<OutboxEvent> = (0..30)
        .map(|i| event_with(&topic, &format!("k{}", i % 6), i / 6, json!({})))
        .collect();
    let duplicate = |i: usize| {
        let mut copy = events[i].clone();
        if i.is_multiple_of(3) {
            copy.headers.clear();
        }
        copy
    };
    // Each partition's end: one past the last offset the broker acknowledged there.
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut sent = |(partition, offset): (i32, i64)| {
        let end = ends.entry(partition).or_default();
        *end = (*end).max(offset + 1);
    };
    for (i, ev) in events.iter().enumerate() {
        sent(send_event(&producer, ev).await);
        if i >= 3 {
            sent(send_event(&producer, &duplicate(i - 3)).await);
        }
    }
    for i in events.len() - 3..events.len() {
        sent(send_event(&producer, &duplicate(i)).await);
    }

    let (process, log) = Recording::new(Inboxed::new(effects.inbox().await, effects.clone()));
    let running = start(&group, &topic, &dead, process);
    support::eventually(WAIT, "every copy settled", || {
        let settled = log.lock().unwrap().len();
        async move { (settled >= 60).then_some(()) }
    })
    .await;
    running.stop().await;

    assert_eq!(count_ok(&log, Outcome::Handled), 30);
    assert_eq!(count_ok(&log, Outcome::Duplicate), 30);
    assert_eq!(log.lock().unwrap().len(), 60, "no failures, no third copy");
    let consumed = |outcome| {
        support::metric_with(
            outpost::metrics::CONSUMED,
            &[("group", group.as_str()), ("outcome", outcome)],
        )
    };
    assert_eq!((consumed("handled"), consumed("duplicate")), (30.0, 30.0));
    let done = effects.all().await;
    assert_eq!(done.len(), 30, "one effect per event");
    for ev in &events {
        assert_eq!(effects.count(ev.event_id).await, 1);
    }
    // Per key, effects happened in publishing order.
    let mut last: HashMap<String, i64> = HashMap::new();
    for (_, key, seq) in done {
        if let Some(prev) = last.insert(key.clone(), seq) {
            assert!(seq > prev, "key {key}: seq {seq} after {prev}");
        }
    }
    // Shutdown committed everything that was settled.
    for (partition, committed) in (0..).zip(committed(&group, &topic, 3).await) {
        let end = ends.get(&partition).copied().unwrap_or(0);
        assert_eq!(committed.unwrap_or(0), end, "partition {partition}");
    }
}

#[tokio::test]
async fn crash_between_business_commit_and_offset_commit_is_skipped_on_redelivery() {
    let effects = Effects::new().await;
    let inbox = effects.inbox().await;
    let topic = support::topic(1).await;
    let dead = support::topic(1).await;
    let group = support::unique("g");
    let producer = producer();
    let [a, b, c] = [0, 1, 2].map(|seq| event_with(&topic, "k", seq, json!({})));
    let mut offsets = Vec::new();
    for ev in [&a, &b, &c] {
        offsets.push(send_event(&producer, ev).await.1);
    }

    // First run: b's business transaction commits, then the process "dies".
    let (crashed_tx, mut crashed) = tokio::sync::mpsc::unbounded_channel();
    let crashing = CrashAfter {
        inner: Inboxed::new(inbox.clone(), effects.clone()),
        event_id: b.event_id,
        crashed: crashed_tx,
    };
    let first = start(&group, &topic, &dead, crashing);
    tokio::time::timeout(WAIT, crashed.recv())
        .await
        .expect("b handled")
        .unwrap();
    first.task.abort();
    assert!(first.task.await.unwrap_err().is_cancelled());
    assert_eq!(
        effects.count(b.event_id).await,
        1,
        "b's effect is committed"
    );
    let committed_after_crash = committed(&group, &topic, 1).await[0];
    assert!(
        committed_after_crash.unwrap_or(0) <= offsets[1],
        "b's offset ({}) was not committed: {committed_after_crash:?}",
        offsets[1]
    );

    // Second run in the same group: b comes again and the inbox skips it.
    let (process, log) = Recording::new(Inboxed::new(inbox, effects.clone()));
    let second = start(&group, &topic, &dead, process);
    wait_handled(&log, c.event_id, "c handled").await;
    second.stop().await;

    assert_eq!(results(&log, b.event_id), [Ok(Outcome::Duplicate)]);
    assert!(results(&log, a.event_id)
        .iter()
        .all(|r| *r == Ok(Outcome::Duplicate)));
    for ev in [&a, &b, &c] {
        assert_eq!(effects.count(ev.event_id).await, 1, "{}", ev.event_id);
    }
    assert_eq!(committed(&group, &topic, 1).await[0], Some(offsets[2] + 1));
}

#[tokio::test]
async fn unhandleable_messages_are_dead_lettered_and_the_partition_keeps_flowing() {
    let effects = Effects::new().await;
    let inbox = effects.inbox().await;
    let topic = support::topic(1).await;
    let dead = support::topic(1).await;
    let group = support::unique("g");
    let producer = producer();

    let first = event_with(&topic, "k", 0, json!({}));
    let tenant = BTreeMap::from([("tenant".to_owned(), "acme".to_owned())]);
    // Not JSON, and no event_id header: no way to know which event it is.
    let garbage = b"\x00not json".to_vec();
    // An event_id header, but the body is not an envelope.
    let not_envelope_id = Uuid::new_v4();
    let not_envelope = json!({ "event_id": not_envelope_id, "hello": 1 }).to_string();
    let not_envelope_headers =
        BTreeMap::from([("event_id".to_owned(), not_envelope_id.to_string())]);
    // A valid event the handler rejects for good.
    let poison = event_with(&topic, "k", 3, json!({ "poison": true }));
    let last = event_with(&topic, "k", 4, json!({}));

    send_event(&producer, &first).await;
    let (_, garbage_at) = send(&producer, &topic, "k", &garbage, &tenant).await;
    let (_, not_envelope_at) = send(
        &producer,
        &topic,
        "k",
        not_envelope.as_bytes(),
        &not_envelope_headers,
    )
    .await;
    let (_, poison_at) = send_event(&producer, &poison).await;
    let end = send_event(&producer, &last).await.1 + 1;

    let (process, log) = Recording::new(Inboxed::new(inbox.clone(), effects.clone()));
    let running = start(&group, &topic, &dead, process);
    wait_handled(&log, last.event_id, "the event behind the bad ones handled").await;
    let dead_letters = read_topic(&dead, 3).await;
    running.stop().await;

    let done: Vec<Uuid> = effects.all().await.into_iter().map(|e| e.0).collect();
    assert_eq!(done, [first.event_id, last.event_id]);
    let expected: [(&[u8], i64, &str, &str); 3] = [
        (&garbage, garbage_at, "DECODE", "no event_id header"),
        (
            not_envelope.as_bytes(),
            not_envelope_at,
            "DECODE",
            "not an event envelope",
        ),
        (
            &poison.payload,
            poison_at,
            "HANDLER",
            "event handler failed: poison event",
        ),
    ];
    for (msg, (payload, offset, code, reason)) in dead_letters.iter().zip(expected) {
        assert_eq!(msg.payload(), Some(payload), "payload kept");
        assert_eq!(msg.key(), Some(&b"k"[..]), "key kept");
        let dlq_reason = header(msg, DLQ_REASON).unwrap();
        assert!(dlq_reason.contains(reason), "{dlq_reason}");
        assert_eq!(header(msg, DLQ_ERROR_CODE).as_deref(), Some(code));
        assert_eq!(header(msg, DLQ_SOURCE_TOPIC).as_deref(), Some(&*topic));
        assert_eq!(header(msg, DLQ_PARTITION).as_deref(), Some("0"));
        assert_eq!(
            header(msg, DLQ_OFFSET).as_deref(),
            Some(&*offset.to_string())
        );
        assert_eq!(header(msg, DLQ_CONSUMER_GROUP).as_deref(), Some(&*group));
    }
    assert_eq!(header(&dead_letters[0], "tenant").as_deref(), Some("acme"));
    assert_eq!(
        header(&dead_letters[2], "event_id"),
        Some(poison.event_id.to_string()),
        "original headers kept"
    );
    // The rejected event left no inbox row: replayed after a fix, it is handled.
    let mut tx = inbox.pool().begin().await.unwrap();
    assert!(inbox.claim(&mut tx, &group, poison.event_id).await.unwrap());
    tx.rollback().await.unwrap();
    assert_eq!(committed(&group, &topic, 1).await[0], Some(end));
}

#[tokio::test]
async fn retriable_failures_are_retried_in_place_never_skipped() {
    let (effects, topic, dead, group, producer) = case(1).await;
    let flaky = event_with(&topic, "k", 0, json!({ "fail_times": 3 }));
    let next = event_with(&topic, "k", 1, json!({}));
    send_event(&producer, &flaky).await;
    send_event(&producer, &next).await;

    let (process, log) = Recording::new(Inboxed::new(effects.inbox().await, effects.clone()));
    let running = start(&group, &topic, &dead, process);
    wait_handled(&log, next.event_id, "both handled").await;
    running.stop().await;

    assert_eq!(
        results(&log, flaky.event_id),
        [
            Err(ErrorCode::Handler),
            Err(ErrorCode::Handler),
            Err(ErrorCode::Handler),
            Ok(Outcome::Handled)
        ]
    );
    let order: Vec<Uuid> = effects.all().await.into_iter().map(|e| e.0).collect();
    assert_eq!(
        order,
        [flaky.event_id, next.event_id],
        "nothing overtook the retried event"
    );
}

#[tokio::test]
async fn messages_settled_together_take_effect_once_in_order_and_failures_are_settled_alone() {
    let (effects, topic, dead, group, producer) = case(1).await;
    let mut events: Vec<OutboxEvent> = (0..60)
        .map(|seq| {
            let extra = match seq {
                10 => json!({ "poison": true }),
                12 => json!({ "fail_times": 1 }),
                _ => json!({}),
            };
            event_with(&topic, "k", seq, extra)
        })
        .collect();
    // A redelivery of an event handled earlier, in the middle of a later unit.
    events.insert(40, events[5].clone());
    let mut end = 0;
    for event in &events {
        end = send_event(&producer, event).await.1 + 1;
    }

    // Everything is waiting when the consumer starts, so units fill up.
    let mut config = consumer_config(&group, &topic, &dead);
    config.together = 16;
    let process = Inboxed::new(effects.inbox().await, effects.clone());
    let running = Running::start(Consumer::new(config, process).unwrap());
    let last = events.last().unwrap().event_id;
    support::eventually(WAIT, "the last event handled", || {
        let effects = effects.clone();
        async move { (effects.count(last).await == 1).then_some(()) }
    })
    .await;
    let dead_letters = read_topic(&dead, 1).await;
    support::eventually(WAIT, "every offset committed", || {
        let (group, topic) = (group.clone(), topic.clone());
        async move { (committed(&group, &topic, 1).await[0] == Some(end)).then_some(()) }
    })
    .await;
    running.stop().await;

    let all = effects.all().await;
    let seqs: Vec<i64> = all.iter().map(|e| e.2).collect();
    let expected: Vec<i64> = (0..60).filter(|seq| *seq != 10).collect();
    assert_eq!(seqs, expected, "each once, in partition order");
    assert_eq!(
        header(&dead_letters[0], "event_id"),
        Some(events[10].event_id.to_string()),
        "the poison event alone is dead-lettered"
    );
    let transactions: std::collections::HashSet<i64> =
        sqlx::query_scalar(&format!("SELECT tx FROM {}.effects", effects.schema))
            .fetch_all(&effects.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    // The unit with the poison and the flaky event is settled one message at a time
    // (16 transactions); the rest share a few.
    assert!(
        transactions.len() <= all.len() / 2,
        "{} transactions for {} effects",
        transactions.len(),
        all.len()
    );
}

#[tokio::test]
async fn database_errors_are_retried_in_place_unless_the_data_or_statement_is_at_fault() {
    let (effects, topic, dead, group, producer) = case(1).await;
    // A real statement timeout (57014) on the first two attempts: the database is slow,
    // not the event wrong.
    let slow = event_with(
        &topic,
        "k",
        0,
        json!({
            "sql": ["SET LOCAL statement_timeout = 100", "SELECT pg_sleep(10)"],
            "sql_times": 2
        }),
    );
    // A unique violation (23505) and a division by zero (22012) repeat on every attempt.
    let duplicate = event_with(
        &topic,
        "k",
        1,
        json!({ "sql": [
            "CREATE TABLE {schema}.names (name TEXT PRIMARY KEY)",
            "INSERT INTO {schema}.names VALUES ('taken'), ('taken')"
        ] }),
    );
    let bad_data = event_with(&topic, "k", 2, json!({ "sql": ["SELECT 1 / 0"] }));
    let last = event_with(&topic, "k", 3, json!({}));
    for ev in [&slow, &duplicate, &bad_data, &last] {
        send_event(&producer, ev).await;
    }

    let (process, log) = Recording::new(Inboxed::new(effects.inbox().await, effects.clone()));
    let running = start(&group, &topic, &dead, process);
    wait_handled(&log, last.event_id, "the last event handled").await;
    let dead_letters = read_topic(&dead, 2).await;
    running.stop().await;

    assert_eq!(
        results(&log, slow.event_id),
        [
            Err(ErrorCode::Handler),
            Err(ErrorCode::Handler),
            Ok(Outcome::Handled)
        ],
        "a statement timeout is retried in place"
    );
    assert_dead_lettered_at_once(
        &log,
        &dead_letters,
        [
            (&duplicate, "duplicate key"),
            (&bad_data, "division by zero"),
        ],
    );
    let done: Vec<Uuid> = effects.all().await.into_iter().map(|e| e.0).collect();
    assert_eq!(done, [slow.event_id, last.event_id], "in key order");
}

#[tokio::test]
async fn database_errors_raised_by_database_code_are_dead_lettered_not_retried_forever() {
    let (effects, topic, dead, group, producer) = case(1).await;
    // A business rule enforced in PL/pgSQL (P0001) and a subquery meeting two rows (21000)
    // fail the same way on every attempt.
    let raised = event_with(
        &topic,
        "k",
        0,
        json!({ "sql": ["DO $$BEGIN RAISE EXCEPTION 'unknown essay'; END$$"] }),
    );
    let two_rows = event_with(
        &topic,
        "k",
        1,
        json!({ "sql": ["SELECT (SELECT n FROM generate_series(1, 2) AS n)"] }),
    );
    let last = event_with(&topic, "k", 2, json!({}));
    for ev in [&raised, &two_rows, &last] {
        send_event(&producer, ev).await;
    }

    let (process, log) = Recording::new(Inboxed::new(effects.inbox().await, effects.clone()));
    let running = start(&group, &topic, &dead, process);
    wait_handled(&log, last.event_id, "the last event handled").await;
    let dead_letters = read_topic(&dead, 2).await;
    running.stop().await;

    assert_dead_lettered_at_once(
        &log,
        &dead_letters,
        [(&raised, "unknown essay"), (&two_rows, "more than one row")],
    );
    let done: Vec<Uuid> = effects.all().await.into_iter().map(|e| e.0).collect();
    assert_eq!(done, [last.event_id]);
}

/// Sends an event with `data`, then another of its key; runs an inboxed consumer until the
/// second is handled; checks the first was dead-lettered with no effect. Returns its
/// dead letter's reason.
async fn dead_lettered_before_the_next(data: serde_json::Value) -> String {
    let (effects, topic, dead, group, producer) = case(1).await;
    let bad = event_with(&topic, "k", 0, data);
    let next = event_with(&topic, "k", 1, json!({}));
    for ev in [&bad, &next] {
        send_event(&producer, ev).await;
    }
    let (process, log) = Recording::new(Inboxed::new(effects.inbox().await, effects.clone()));
    let running = start(&group, &topic, &dead, process);
    wait_handled(&log, next.event_id, "the next event handled").await;
    let dead_letters = read_topic(&dead, 1).await;
    running.stop().await;
    let done: Vec<Uuid> = effects.all().await.into_iter().map(|e| e.0).collect();
    assert_eq!(
        done,
        [next.event_id],
        "the failed event's effect rolled back"
    );
    let (id, reason) = dlq_reasons(&dead_letters).remove(0);
    assert_eq!(id, Some(bad.event_id.to_string()));
    reason
}

#[tokio::test]
async fn an_event_whose_handler_panics_is_dead_lettered_and_the_partition_goes_on() {
    let reason = dead_lettered_before_the_next(json!({ "panic": true })).await;
    assert!(reason.contains("an essay nobody expected"), "{reason}");
}

/// [`Effects`], panicking on every event while `broken` is set (a handler whose state a
/// panic left broken); counts its panics.
struct BrokenWhile {
    inner: Effects,
    broken: Arc<AtomicBool>,
    panics: Arc<std::sync::atomic::AtomicUsize>,
}

impl InboxHandler for BrokenWhile {
    async fn handle(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        received: &Received,
        tx: &mut Transaction<'_, Postgres>,
    ) -> outpost::Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            self.panics.fetch_add(1, Ordering::SeqCst);
            panic!("the handler's state is broken");
        }
        InboxHandler::handle(&self.inner, event, received, tx).await
    }
}

#[tokio::test]
async fn a_handler_that_keeps_panicking_holds_its_partition_after_a_few_dead_letters() {
    let (effects, topic, dead, group, producer) = case(1).await;
    let events: Vec<OutboxEvent> = (0..5)
        .map(|i| event_with(&topic, "k", i, json!({})))
        .collect();
    for ev in &events {
        send_event(&producer, ev).await;
    }
    let broken = Arc::new(AtomicBool::new(true));
    let panics = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler = BrokenWhile {
        inner: effects.clone(),
        broken: Arc::clone(&broken),
        panics: Arc::clone(&panics),
    };
    let (process, log) = Recording::new(Inboxed::new(effects.inbox().await, handler));
    let running = start(&group, &topic, &dead, process);
    // Three dead letters, then the fourth event is tried again, not dead-lettered.
    support::eventually(WAIT, "five panics", || {
        let n = panics.load(Ordering::SeqCst);
        async move { (n >= 5).then_some(()) }
    })
    .await;
    broken.store(false, Ordering::SeqCst);
    wait_handled(&log, events[4].event_id, "the last event handled").await;
    let dead_letters = read_topic(&dead, 3).await;
    running.stop().await;
    let parked: Vec<Option<String>> = dlq_reasons(&dead_letters)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let first_three: Vec<Option<String>> = events[..3]
        .iter()
        .map(|e| Some(e.event_id.to_string()))
        .collect();
    assert_eq!(parked, first_three);
    let done: Vec<Uuid> = effects.all().await.into_iter().map(|e| e.0).collect();
    assert_eq!(done, [events[3].event_id, events[4].event_id]);
}

/// [`Effects`], stuck for good on the first event it gets (a lock held by a stalled
/// process, say).
struct StuckOnFirst {
    inner: Effects,
    stuck: Arc<AtomicBool>,
}

impl InboxHandler for StuckOnFirst {
    async fn handle(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        received: &Received,
        tx: &mut Transaction<'_, Postgres>,
    ) -> outpost::Result<()> {
        if !self.stuck.swap(true, Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        InboxHandler::handle(&self.inner, event, received, tx).await
    }
}

#[tokio::test]
async fn a_shutdown_abandons_a_message_stuck_in_hand_past_the_drain_timeout() {
    let (effects, topic, dead, group, producer) = case(1).await;
    let ev = event_with(&topic, "k", 0, json!({}));
    send_event(&producer, &ev).await;
    let stuck = Arc::new(AtomicBool::new(false));
    let handler = StuckOnFirst {
        inner: effects.clone(),
        stuck: Arc::clone(&stuck),
    };
    let mut config = consumer_config(&group, &topic, &dead);
    config.drain_timeout = Duration::from_secs(1);
    let process = Inboxed::new(effects.inbox().await, handler);
    let running = Running::start(Consumer::new(config, process).unwrap());
    support::eventually(WAIT, "the handler stuck", || {
        let stuck = stuck.load(Ordering::SeqCst);
        async move { stuck.then_some(()) }
    })
    .await;
    // Stops within its bound, the message in hand abandoned: the next consumer gets it.
    running.stop().await;
    let (process, log) = Recording::new(Inboxed::new(effects.inbox().await, effects.clone()));
    let running = start(&group, &topic, &dead, process);
    wait_handled(&log, ev.event_id, "the event handled by the next consumer").await;
    running.stop().await;
    assert_eq!(effects.count(ev.event_id).await, 1);
}

#[tokio::test]
async fn a_failure_quoting_a_large_input_is_dead_lettered_with_its_reason_cut_short() {
    // Twice what the dead-letter producer sends in one message.
    let reason = dead_lettered_before_the_next(json!({ "poison_quoting": 2_000_000 })).await;
    assert!(reason.contains("cannot parse xxx"), "{reason:.100}");
    assert!(reason.len() <= 4096, "{} bytes", reason.len());
}

/// A message the dead-letter topic does not take as it is (a payload near the limit plus the
/// `dlq_*` headers, or a dead-letter topic that takes less than the source) is dead-lettered
/// without its payload; refused, its partition waited on it for good.
#[tokio::test]
async fn a_dead_letter_too_large_for_its_topic_goes_without_its_payload() {
    let (effects, topic, dead, group, producer) = case(1).await;
    let bad = event_with(
        &topic,
        "k",
        0,
        json!({ "poison": true, "pad": "x".repeat(30_000) }),
    );
    let next = event_with(&topic, "k", 1, json!({}));
    let (_, bad_at) = send_event(&producer, &bad).await;
    send_event(&producer, &next).await;
    let mut cfg = consumer_config(&group, &topic, &dead);
    // The dead-letter producer takes less than the source topic's messages.
    cfg.dead_letter_librdkafka
        .insert("message.max.bytes".into(), "20000".into());
    let (process, log) = Recording::new(Inboxed::new(effects.inbox().await, effects.clone()));
    let running = Running::start(Consumer::new(cfg, process).unwrap());
    wait_handled(&log, next.event_id, "the event after it handled").await;
    let letters = read_topic(&dead, 1).await;
    running.stop().await;
    let letter = &letters[0];
    assert_eq!(header(letter, "event_id"), Some(bad.event_id.to_string()));
    assert_eq!(letter.payload(), None);
    assert_eq!(
        header(letter, DLQ_PAYLOAD_OMITTED),
        Some(bad.payload.len().to_string())
    );
    assert_eq!(header(letter, DLQ_OFFSET), Some(bad_at.to_string()));
    assert!(header(letter, DLQ_REASON).unwrap().contains("poison event"));
}

#[tokio::test]
async fn an_event_whose_handler_ignored_a_failed_statement_is_retried_not_lost() {
    let (effects, topic, dead, group, producer) = case(1).await;
    // PostgreSQL rolls the aborted transaction back at COMMIT and sqlx reports success.
    let swallowed = event_with(&topic, "k", 0, json!({ "swallow_times": 2 }));
    let next = event_with(&topic, "k", 1, json!({}));
    send_event(&producer, &swallowed).await;
    let end = send_event(&producer, &next).await.1 + 1;

    let handler = Swallowing(effects.clone());
    let (process, log) = Recording::new(Inboxed::new(effects.inbox().await, handler));
    let running = start(&group, &topic, &dead, process);
    wait_handled(&log, next.event_id, "both handled").await;
    support::eventually(WAIT, "every offset committed", || {
        let (group, topic) = (group.clone(), topic.clone());
        async move { (committed(&group, &topic, 1).await[0] == Some(end)).then_some(()) }
    })
    .await;
    running.stop().await;

    assert_eq!(
        results(&log, swallowed.event_id),
        [
            Err(ErrorCode::Handler),
            Err(ErrorCode::Handler),
            Ok(Outcome::Handled)
        ],
        "retried in place while nothing of it could be committed"
    );
    let done: Vec<Uuid> = effects.all().await.into_iter().map(|e| e.0).collect();
    assert_eq!(
        done,
        [swallowed.event_id, next.event_id],
        "none lost, in order"
    );
}

#[tokio::test]
async fn inbox_statement_timeout_is_retried_not_dead_lettered() {
    let (effects, topic, dead, group, producer) = case(1).await;
    let a = event_with(&topic, "k", 0, json!({}));
    let b = event_with(&topic, "k", 1, json!({}));
    // Migrated through a patient pool: the migration lock is shared with other tests.
    effects.inbox().await;
    // The consumer's connections give up on any statement after 200 ms.
    let options: sqlx::postgres::PgConnectOptions = support::database_url().parse().unwrap();
    let impatient = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.options([("statement_timeout", "200")]))
        .await
        .unwrap();
    let inbox = Inbox::new(
        impatient,
        InboxTable::new(&effects.schema).unwrap(),
        InboxConfig::default(),
        HORIZON,
    )
    .unwrap();
    // Another transaction locks the inbox table, so the claim's insert times out (57014).
    let mut locker = effects.pool.begin().await.unwrap();
    sqlx::query(&format!("LOCK TABLE {} IN EXCLUSIVE MODE", inbox.table()))
        .execute(&mut *locker)
        .await
        .unwrap();
    send_event(&producer, &a).await;
    send_event(&producer, &b).await;

    let (process, log) = Recording::new(Inboxed::new(inbox, effects.clone()));
    let running = start(&group, &topic, &dead, process);
    wait_attempts(&log, a.event_id, 2, "two timed-out claims").await;
    locker.commit().await.unwrap();
    wait_handled(&log, b.event_id, "both handled once the lock is gone").await;
    running.stop().await;

    let attempts = results(&log, a.event_id);
    let (last, failed) = attempts.split_last().unwrap();
    assert_eq!(*last, Ok(Outcome::Handled), "{attempts:?}");
    assert!(
        failed.len() >= 2 && failed.iter().all(|r| *r == Err(ErrorCode::InboxStorage)),
        "{attempts:?}"
    );
    let done: Vec<Uuid> = effects.all().await.into_iter().map(|e| e.0).collect();
    assert_eq!(done, [a.event_id, b.event_id]);
}

fn idempotency(url: &str, policy: RedisDownPolicy) -> Idempotency {
    let mut cfg = IdempotencyConfig::new(support::unique("svc"), policy);
    cfg.timeout = Duration::from_millis(500);
    Idempotency::new(url, cfg, HORIZON).unwrap()
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(support::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must be reachable at OUTPOST_REDIS_URL (run `make services`)")
}

#[tokio::test]
async fn redis_duplicates_are_skipped_from_the_header_without_parsing() {
    let (effects, topic, dead, group, producer) = case(3).await;
    let events: Vec<OutboxEvent> = (0..20)
        .map(|i| event_with(&topic, &format!("k{}", i % 4), i / 4, json!({})))
        .collect();
    // Each duplicate follows two events later (another key), with the right event_id
    // header and a body that does not even parse: only a header lookup can skip it.
    let duplicate = |i: usize| {
        let mut copy = events[i].clone();
        copy.payload = b"{ truncated".to_vec();
        copy
    };
    for (i, ev) in events.iter().enumerate() {
        send_event(&producer, ev).await;
        if i >= 2 {
            send_event(&producer, &duplicate(i - 2)).await;
        }
    }
    for i in events.len() - 2..events.len() {
        send_event(&producer, &duplicate(i)).await;
    }

    let idem = idempotency(&support::redis_url(), RedisDownPolicy::FailClosed);
    let keys: Vec<String> = events
        .iter()
        .map(|e| idem.key(&group, e.event_id))
        .collect();
    let (process, log) = Recording::new(Idempotent::new(idem, effects.clone()));
    let running = start(&group, &topic, &dead, process);
    support::eventually(WAIT, "every copy settled", || {
        let settled = log.lock().unwrap().len();
        async move { (settled >= 40).then_some(()) }
    })
    .await;
    running.stop().await;

    assert_eq!(count_ok(&log, Outcome::Handled), 20);
    assert_eq!(count_ok(&log, Outcome::Duplicate), 20);
    assert_eq!(log.lock().unwrap().len(), 40);
    for ev in &events {
        assert_eq!(effects.count(ev.event_id).await, 1);
    }
    let mut conn = redis().await;
    for key in keys {
        let value: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(value.as_deref(), Some("completed"), "{key}");
    }
}

/// [`Effects`]' Redis variant, after whose first attempt Redis stops answering (through
/// `proxy`), old connections and new ones alike.
struct CutOffAfter {
    inner: Effects,
    proxy: Arc<support::Partition>,
    cut: AtomicBool,
}

impl CutOffAfter {
    fn new(inner: Effects, proxy: &Arc<support::Partition>) -> Self {
        Self {
            inner,
            proxy: Arc::clone(proxy),
            cut: AtomicBool::new(false),
        }
    }
}

impl Handler for CutOffAfter {
    async fn handle(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        received: &Received,
    ) -> outpost::Result<()> {
        let handled = Handler::handle(&self.inner, event, received).await;
        if !self.cut.swap(true, Ordering::SeqCst) {
            self.proxy.hold_new(true);
            self.proxy.freeze();
        }
        handled
    }
}

/// Idempotency through `proxy`, fail-closed, with a claim that holds 60 s.
fn idempotency_through(proxy: &support::Partition) -> Idempotency {
    let mut cfg = IdempotencyConfig::new(support::unique("svc"), RedisDownPolicy::FailClosed);
    cfg.timeout = Duration::from_millis(500);
    cfg.processing_ttl = Duration::from_secs(60);
    let url = format!("redis://127.0.0.1:{}", proxy.port());
    Idempotency::new(&url, cfg, HORIZON).unwrap()
}

/// Waits until `proxy` saw a connection after `cut`'s, then lets new ones through.
async fn reconnect_through(proxy: &support::Partition) {
    support::eventually(WAIT, "a connection after the cut", || {
        let accepted = proxy.accepted();
        async move { (accepted >= 2).then_some(()) }
    })
    .await;
    proxy.hold_new(false);
}

#[tokio::test]
async fn a_handled_event_whose_completion_redis_missed_is_marked_completed_once_it_answers() {
    let (effects, topic, dead, group, producer) = case(1).await;
    let proxy = Arc::new(support::Partition::start(support::redis_port()).await);
    let idem = idempotency_through(&proxy);
    let first = event_with(&topic, "k", 0, json!({}));
    let key = idem.key(&group, first.event_id);
    send_event(&producer, &first).await;
    let handler = CutOffAfter::new(effects.clone(), &proxy);
    let (process, log) = Recording::new(Idempotent::new(idem, handler));
    let running = start(&group, &topic, &dead, process);
    // The effect is committed, the mark goes unanswered, and so does the next connection.
    reconnect_through(&proxy).await;
    wait_handled(&log, first.event_id, "the first event handled").await;
    let mut conn = redis().await;
    let mark: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(mark.as_deref(), Some("completed"));
    // A copy arriving now is skipped at once, not held until the claim lapses and applied
    // again.
    send_event(&producer, &first).await;
    let next = event_with(&topic, "k", 1, json!({}));
    send_event(&producer, &next).await;
    wait_handled(&log, next.event_id, "the next event handled").await;
    running.stop().await;
    assert_eq!(
        results(&log, first.event_id),
        [Ok(Outcome::Handled), Ok(Outcome::Duplicate)]
    );
    assert_eq!(effects.count(first.event_id).await, 1);
}

#[tokio::test]
async fn a_failed_attempt_whose_release_redis_missed_is_retried_without_waiting_for_its_claim() {
    let (effects, topic, dead, group, producer) = case(1).await;
    let proxy = Arc::new(support::Partition::start(support::redis_port()).await);
    let idem = idempotency_through(&proxy);
    let failing = event_with(&topic, "k", 0, json!({ "fail_times": 1 }));
    send_event(&producer, &failing).await;
    let handler = CutOffAfter::new(effects.clone(), &proxy);
    let (process, log) = Recording::new(Idempotent::new(idem, handler));
    let running = start(&group, &topic, &dead, process);
    // The first attempt fails and its claim's release goes unanswered, as do the claims of
    // the next attempts until Redis answers again.
    reconnect_through(&proxy).await;
    // Well inside the claim's 60 s: the retry takes its own claim over.
    let started = Instant::now();
    wait_handled(&log, failing.event_id, "the event handled").await;
    running.stop().await;
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(effects.count(failing.event_id).await, 1);
}

/// `env` as group `group` receives it from a plain message.
fn received_by(group: &str, env: &EventEnvelope<serde_json::Value>) -> Received {
    Received {
        group_id: group.to_owned(),
        topic: "t".into(),
        partition: 0,
        offset: 0,
        key: None,
        headers: BTreeMap::new(),
        payload: serde_json::to_vec(env).unwrap(),
        event_id: env.event_id,
    }
}

#[tokio::test]
async fn redis_two_phase_marks_processing_then_completed_and_releases_on_failure() {
    let idem = idempotency(&support::redis_url(), RedisDownPolicy::FailClosed);
    let mut conn = redis().await;
    let group = support::unique("g");
    let state_conn = conn.clone();
    let state = move |key: String| {
        let mut conn = state_conn.clone();
        async move {
            let value: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            let ttl: i64 = redis::cmd("TTL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            (value, ttl)
        }
    };

    // Success: processing (short TTL) → completed (long TTL) → duplicate.
    let ok = Uuid::new_v4();
    let Claim::Acquired(token) = idem.claim(&group, ok).await.unwrap() else {
        panic!("a new event is acquired");
    };
    let (value, ttl) = state(idem.key(&group, ok)).await;
    assert_eq!(value.as_deref(), Some("processing"));
    assert!((1..=300).contains(&ttl), "{ttl}");
    assert_eq!(idem.claim(&group, ok).await.unwrap(), Claim::InProgress);
    idem.complete(&group, ok).await.unwrap();
    let (value, ttl) = state(idem.key(&group, ok)).await;
    assert_eq!(value.as_deref(), Some("completed"));
    assert!(ttl > 24 * 3600 - 60, "{ttl}");
    assert_eq!(idem.claim(&group, ok).await.unwrap(), Claim::Duplicate);
    // Releasing never erases a completed mark; another group has its own key.
    idem.release(&group, ok, token).await.unwrap();
    assert_eq!(idem.claim(&group, ok).await.unwrap(), Claim::Duplicate);
    let other_group = support::unique("g");
    assert!(matches!(
        idem.claim(&other_group, ok).await.unwrap(),
        Claim::Acquired(_)
    ));

    // Failure: the claim is deleted, so the retry acquires it again at once.
    let failed = Uuid::new_v4();
    let Claim::Acquired(token) = idem.claim(&group, failed).await.unwrap() else {
        panic!("a new event is acquired");
    };
    idem.release(&group, failed, token).await.unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(idem.key(&group, failed))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0);
    assert!(matches!(
        idem.claim(&group, failed).await.unwrap(),
        Claim::Acquired(_)
    ));

    // Through the consumer's process: a failing handler leaves no key behind.
    let effects = Effects::new().await;
    let process = Idempotent::new(idem, effects.clone());
    let env = EventEnvelope::new(
        "t.v1",
        "tests",
        json!({ "key": "k", "seq": 0, "fail_times": 1 }),
    );
    let received = received_by(&group, &env);
    let err = process.process(&received).await.unwrap_err();
    assert!(err.is_retriable());
    let key = process.idempotency().key(&group, env.event_id);
    assert_eq!(state(key.clone()).await.0, None, "claim released");
    assert_eq!(process.process(&received).await.unwrap(), Outcome::Handled);
    assert_eq!(state(key).await.0.as_deref(), Some("completed"));
    assert_eq!(
        process.process(&received).await.unwrap(),
        Outcome::Duplicate
    );
    assert_eq!(effects.count(env.event_id).await, 1);
}

/// [`Effects`] through the Redis variant, after holding the event for `hold`.
struct Slow {
    effects: Effects,
    hold: Duration,
}

impl Handler for Slow {
    async fn handle(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        received: &Received,
    ) -> outpost::Result<()> {
        tokio::time::sleep(self.hold).await;
        Handler::handle(&self.effects, event, received).await
    }
}

#[tokio::test]
async fn a_claim_is_renewed_while_its_handler_runs_past_the_processing_ttl() {
    let mut cfg = IdempotencyConfig::new(support::unique("svc"), RedisDownPolicy::FailClosed);
    cfg.processing_ttl = Duration::from_secs(3);
    let other = Idempotency::new(&support::redis_url(), cfg.clone(), HORIZON).unwrap();
    let idem = Idempotency::new(&support::redis_url(), cfg, HORIZON).unwrap();
    let effects = Effects::new().await;
    let hold = Duration::from_secs(8);
    let process = Arc::new(Idempotent::new(
        idem,
        Slow {
            effects: effects.clone(),
            hold,
        },
    ));
    let group = support::unique("g");
    let env = EventEnvelope::new("t.v1", "tests", json!({ "key": "k", "seq": 0 }));
    let received = received_by(&group, &env);
    let started = Instant::now();
    let handling = tokio::spawn({
        let process = Arc::clone(&process);
        async move { process.process(&received).await }
    });
    // Another consumer (a rebalance, a copy on another partition) asks all along: more than
    // twice the TTL, the claim is still the first one's.
    let mut asked = 0;
    while started.elapsed() < hold - Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let claim = other.claim(&group, env.event_id).await.unwrap();
        assert_eq!(
            claim,
            Claim::InProgress,
            "asked {:?} after the claim",
            started.elapsed()
        );
        asked += 1;
    }
    assert!(asked > 10, "{asked}");
    assert_eq!(handling.await.unwrap().unwrap(), Outcome::Handled);
    assert_eq!(
        other.claim(&group, env.event_id).await.unwrap(),
        Claim::Duplicate
    );
    assert_eq!(effects.count(env.event_id).await, 1);
}

#[tokio::test]
async fn releasing_a_lapsed_claim_leaves_the_next_consumers_claim() {
    let idem = idempotency(&support::redis_url(), RedisDownPolicy::FailClosed);
    let mut conn = redis().await;
    let (group, event) = (support::unique("g"), Uuid::new_v4());
    let key = idem.key(&group, event);
    let Claim::Acquired(first) = idem.claim(&group, event).await.unwrap() else {
        panic!("a new event is acquired");
    };
    // The mark itself stays what every Outpost reads as "in progress".
    let mark: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(mark, "processing");
    // The first consumer's claim lapses (its TTL, simulated) and a second one claims.
    let _: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let Claim::Acquired(second) = idem.claim(&group, event).await.unwrap() else {
        panic!("a lapsed claim is acquired again");
    };
    // The first consumer's renewal does not extend the second one's claim.
    assert!(!idem.renew(&group, event, first).await.unwrap());
    assert!(idem.renew(&group, event, second).await.unwrap());
    // The first consumer's handler fails late.
    idem.release(&group, event, first).await.unwrap();
    assert_eq!(
        idem.claim(&group, event).await.unwrap(),
        Claim::InProgress,
        "the second consumer's claim stays"
    );
    idem.release(&group, event, second).await.unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "the holder releases its own claim");
}

/// Nothing listens on port 1: connections are refused at once.
const REDIS_DOWN: &str = "redis://127.0.0.1:1";

#[tokio::test]
async fn redis_down_fail_open_keeps_handling_without_the_check() {
    let idem = idempotency(REDIS_DOWN, RedisDownPolicy::FailOpen);
    assert_eq!(
        idem.claim("g", Uuid::new_v4()).await.unwrap(),
        Claim::Unchecked
    );
    let (effects, topic, dead, group, producer) = case(1).await;
    let a = event_with(&topic, "k", 0, json!({}));
    let b = event_with(&topic, "k", 1, json!({}));
    let mut end = 0;
    for ev in [&a, &b, &a] {
        end = send_event(&producer, ev).await.1 + 1;
    }

    let (process, log) = Recording::new(Idempotent::new(idem, effects.clone()));
    let running = start(&group, &topic, &dead, process);
    support::eventually(WAIT, "all three handled", || {
        let handled = count_ok(&log, Outcome::Handled);
        async move { (handled == 3).then_some(()) }
    })
    .await;
    running.stop().await;

    // The price of fail-open: a duplicate during the outage takes effect again.
    assert_eq!(effects.count(a.event_id).await, 2);
    assert_eq!(effects.count(b.event_id).await, 1);
    assert_eq!(committed(&group, &topic, 1).await[0], Some(end));
}

#[tokio::test]
async fn redis_down_fail_closed_refuses_and_commits_nothing() {
    let idem = idempotency(REDIS_DOWN, RedisDownPolicy::FailClosed);
    let err = idem.claim("g", Uuid::new_v4()).await.unwrap_err();
    assert!(err.is_retriable());
    assert_eq!(err.code(), ErrorCode::Idempotency);
    let (effects, topic, dead, group, producer) = case(1).await;
    let a = event_with(&topic, "k", 0, json!({}));
    send_event(&producer, &a).await;

    let (process, log) = Recording::new(Idempotent::new(idem, effects.clone()));
    let refusing = start(&group, &topic, &dead, process);
    wait_attempts(&log, a.event_id, 3, "three refused attempts").await;
    refusing.stop().await;
    assert!(results(&log, a.event_id)
        .iter()
        .all(|r| *r == Err(ErrorCode::Idempotency)));
    assert_eq!(effects.count(a.event_id).await, 0, "handler never ran");
    assert_eq!(
        committed(&group, &topic, 1).await[0],
        None,
        "no offset committed"
    );

    // Redis back: the same group gets the event again and handles it.
    let idem = idempotency(&support::redis_url(), RedisDownPolicy::FailClosed);
    let (process, log) = Recording::new(Idempotent::new(idem, effects.clone()));
    let recovered = start(&group, &topic, &dead, process);
    wait_handled(&log, a.event_id, "handled once Redis answers").await;
    recovered.stop().await;
    assert_eq!(effects.count(a.event_id).await, 1);
}

#[tokio::test]
async fn inbox_keeps_rows_past_the_retry_horizon_then_cleans_them_up() {
    let effects = Effects::new().await;
    let table = InboxTable::new(&effects.schema).unwrap();
    let hour = Duration::from_secs(3600);
    let short = InboxConfig {
        retention: hour,
        ..InboxConfig::default()
    };
    let err = Inbox::new(effects.pool.clone(), table.clone(), short, hour).unwrap_err();
    assert!(err.to_string().contains("retention"), "{err}");

    let config = InboxConfig {
        retention: 2 * hour,
        cleanup_batch: 2,
        ..InboxConfig::default()
    };
    let inbox = Inbox::new(effects.pool.clone(), table, config, hour).unwrap();
    inbox.migrate().await.unwrap();
    inbox.migrate().await.unwrap();
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let mut tx = inbox.pool().begin().await.unwrap();
    for id in &ids {
        assert!(inbox.claim(&mut tx, "g", *id).await.unwrap());
        assert!(!inbox.claim(&mut tx, "g", *id).await.unwrap());
    }
    assert!(inbox.claim(&mut tx, "other", ids[0]).await.unwrap());
    tx.commit().await.unwrap();
    sqlx::query(&format!(
        "UPDATE {} SET processed_at = now() - interval '3 hours' \
         WHERE consumer_group = 'g' AND event_id = ANY($1)",
        inbox.table()
    ))
    .bind(&ids[..3])
    .execute(inbox.pool())
    .await
    .unwrap();

    assert_eq!(inbox.cleanup().await.unwrap(), 3);
    assert_eq!(inbox.cleanup().await.unwrap(), 0);
    let mut tx = inbox.pool().begin().await.unwrap();
    assert!(
        inbox.claim(&mut tx, "g", ids[0]).await.unwrap(),
        "forgotten"
    );
    assert!(
        !inbox.claim(&mut tx, "g", ids[4]).await.unwrap(),
        "remembered"
    );
    assert!(!inbox.claim(&mut tx, "other", ids[0]).await.unwrap());
    tx.rollback().await.unwrap();
}

/// Every replica migrates its inbox when it starts: on a table that is already migrated that
/// must not wait for transactions that claimed events (nor hold new claims back meanwhile).
#[tokio::test]
async fn migrating_a_migrated_inbox_does_not_wait_for_open_claiming_transactions() {
    let effects = Effects::new().await;
    let inbox = effects.inbox().await;
    let index: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(format!(
            "\"{}\".\"{}_processed_at\"",
            effects.schema,
            inbox.table().table()
        ))
        .fetch_one(inbox.pool())
        .await
        .unwrap();
    assert!(
        index.is_some(),
        "the first migrate made the retention index"
    );
    let mut open = inbox.pool().begin().await.unwrap();
    assert!(inbox.claim(&mut open, "g", Uuid::new_v4()).await.unwrap());
    tokio::time::timeout(Duration::from_secs(10), inbox.migrate())
        .await
        .expect("migrate waited for the open transaction")
        .unwrap();
    open.commit().await.unwrap();
}

/// Sends `ev` to `partition` (whatever its key hashes to); returns the offset.
async fn send_to(producer: &FutureProducer, ev: &OutboxEvent, partition: i32) -> i64 {
    let mut owned = OwnedHeaders::new();
    for (k, v) in &ev.headers {
        owned = owned.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    producer
        .send(
            FutureRecord::to(&ev.topic)
                .key(&ev.event_key)
                .partition(partition)
                .payload(&ev.payload)
                .headers(owned),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("test message acked")
        .offset
}

#[tokio::test]
async fn a_partition_backing_off_holds_back_only_itself() {
    let (effects, topic, dead, group, producer) = case(3).await;
    let schema = effects.schema.clone();
    sqlx::query(&format!(
        "CREATE TABLE {schema}.gate (open BOOLEAN NOT NULL)"
    ))
    .execute(&effects.pool)
    .await
    .unwrap();
    sqlx::query(&format!("INSERT INTO {schema}.gate VALUES (false)"))
        .execute(&effects.pool)
        .await
        .unwrap();
    // Fails retriably (serialization failure) until the test opens the gate.
    let gate = "DO $$ BEGIN IF NOT (SELECT open FROM {schema}.gate) THEN \
                RAISE EXCEPTION 'gate closed' USING ERRCODE = '40001'; END IF; END $$";
    let stuck = event_with(&topic, "stuck", 0, json!({ "sql": [gate] }));
    send_to(&producer, &stuck, 0).await;
    let behind: Vec<OutboxEvent> = (1..=5)
        .map(|seq| event_with(&topic, "stuck", seq, json!({})))
        .collect();
    for ev in &behind {
        send_to(&producer, ev, 0).await;
    }
    let others: Vec<OutboxEvent> = (0..20)
        .map(|i| event_with(&topic, &format!("k{}", i % 2), i / 2, json!({})))
        .collect();
    for (i, ev) in (0..).zip(&others) {
        send_to(&producer, ev, 1 + i % 2).await;
    }

    let mut config = consumer_config(&group, &topic, &dead);
    // One worker: a partition waiting out its backoff must not hold it.
    config.concurrent_partitions = 1;
    let (process, log) = Recording::new(Inboxed::new(effects.inbox().await, effects.clone()));
    let running = Running::start(Consumer::new(config, process).unwrap());
    wait_attempts(&log, stuck.event_id, 2, "the stuck event is retried").await;
    // The gate stays closed: whatever is handled now went past a partition backing off.
    for ev in &others {
        wait_handled(&log, ev.event_id, "the other partitions go on").await;
    }
    for ev in &behind {
        assert!(
            results(&log, ev.event_id).is_empty(),
            "nothing overtakes the stuck event on its partition"
        );
    }
    sqlx::query(&format!("UPDATE {schema}.gate SET open = true"))
        .execute(&effects.pool)
        .await
        .unwrap();
    for ev in &behind {
        wait_handled(
            &log,
            ev.event_id,
            "the partition resumes after the gate opens",
        )
        .await;
    }
    running.stop().await;
    let stuck_key: Vec<i64> = effects
        .all()
        .await
        .into_iter()
        .filter(|(_, key, _)| key == "stuck")
        .map(|(_, _, seq)| seq)
        .collect();
    assert_eq!(stuck_key, vec![0, 1, 2, 3, 4, 5], "in partition order");
}

#[tokio::test]
async fn a_consumer_joining_mid_run_takes_partitions_over_without_loss_or_reordering() {
    let (effects, topic, dead, group, producer) = case(3).await;
    support::metrics();
    let keys = 6;
    let per_key = 60;
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut events = Vec::new();
    for seq in 0..per_key {
        for k in 0..keys {
            // Slow enough that the second consumer joins while the first is mid-stream.
            let ev = event_with(
                &topic,
                &format!("k{k}"),
                seq,
                json!({ "sql": ["SELECT pg_sleep(0.004)"] }),
            );
            let (partition, offset) = send_event(&producer, &ev).await;
            let end = ends.entry(partition).or_default();
            *end = (*end).max(offset + 1);
            events.push(ev);
        }
    }
    let inbox = effects.inbox().await;
    let (first, log) = Recording::new(Inboxed::new(inbox.clone(), effects.clone()));
    let first = start(&group, &topic, &dead, first);
    support::eventually(WAIT, "the first consumer is under way", || {
        let handled = count_ok(&log, Outcome::Handled);
        async move { (handled >= 40).then_some(()) }
    })
    .await;
    let (second, second_log) = Recording::new(Inboxed::new(inbox, effects.clone()));
    let second = start(&group, &topic, &dead, second);
    let total = events.len();
    support::eventually(Duration::from_secs(60), "every event took effect", || {
        let effects = effects.clone();
        async move { (effects.all().await.len() >= total).then_some(()) }
    })
    .await;
    let took_over = count_ok(&second_log, Outcome::Handled);
    first.stop().await;
    second.stop().await;

    let done = effects.all().await;
    assert_eq!(done.len(), total, "one effect per event");
    let mut last: HashMap<String, i64> = HashMap::new();
    for (_, key, seq) in done {
        if let Some(prev) = last.insert(key.clone(), seq) {
            assert!(seq > prev, "key {key}: seq {seq} after {prev}");
        }
    }
    assert!(took_over > 0, "the second consumer handled some partitions");
    for (partition, committed) in (0..).zip(committed(&group, &topic, 3).await) {
        let end = ends.get(&partition).copied().unwrap_or(0);
        assert_eq!(committed.unwrap_or(0), end, "partition {partition}");
    }
}

#[tokio::test]
async fn a_partition_paused_when_revoked_is_fetched_again_once_assigned_back() {
    let (effects, topic, dead, group, producer) = case(1).await;
    let schema = effects.schema.clone();
    sqlx::query(&format!("CREATE TABLE {schema}.gate (open BOOLEAN)"))
        .execute(&effects.pool)
        .await
        .unwrap();
    // The first event's handler waits for the gate, which the test holds locked: its
    // worker stays busy, the partition's queue fills up and the partition is paused.
    let mut gate = effects.pool.begin().await.unwrap();
    sqlx::query(&format!("LOCK TABLE {schema}.gate"))
        .execute(&mut *gate)
        .await
        .unwrap();
    let events: Vec<OutboxEvent> = (0..6)
        .map(|seq| {
            let extra = match seq {
                0 => json!({ "sql": ["SELECT count(*) FROM {schema}.gate"] }),
                _ => json!({}),
            };
            event_with(&topic, "k", seq, extra)
        })
        .collect();
    let mut end = 0;
    for ev in &events {
        end = send_event(&producer, ev).await.1 + 1;
    }

    let mut config = consumer_config(&group, &topic, &dead);
    config.partition_buffer = 2;
    let (process, log) = Recording::new(Inboxed::new(effects.inbox().await, effects.clone()));
    let running = Running::start(Consumer::new(config, process).unwrap());
    support::eventually(WAIT, "the first event waits for the gate", || {
        let (pool, schema) = (effects.pool.clone(), schema.clone());
        async move {
            let waiting: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM pg_locks WHERE relation = '{schema}.gate'::regclass \
                 AND NOT granted"
            ))
            .fetch_one(&pool)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        }
    })
    .await;
    // The events behind it arrive within a fetch; the partition is paused after two.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A second member joins the group, for a topic of its own: the partition is revoked
    // and assigned back to the same consumer. Its assignment completes only once the
    // first consumer has rejoined, that is after its revocation.
    let other = support::topic(1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let assigned = Arc::new(AtomicBool::new(false));
    let joiner = tokio::task::spawn_blocking({
        let (group, stop, assigned) = (group.clone(), Arc::clone(&stop), Arc::clone(&assigned));
        move || {
            let member: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", support::brokers())
                .set("group.id", &group)
                .set("session.timeout.ms", "2000")
                .set("heartbeat.interval.ms", "500")
                .create()
                .unwrap();
            member.subscribe(&[&other]).unwrap();
            // Bounded, so a failed test does not wait for it forever.
            let until = Instant::now() + 3 * WAIT;
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                let _ = member.poll(Duration::from_millis(50));
                if member.assignment().unwrap().count() > 0 {
                    assigned.store(true, Ordering::Relaxed);
                }
            }
        }
    });
    support::eventually(WAIT, "the group rebalanced", || {
        let done = assigned.load(Ordering::Relaxed);
        async move { done.then_some(()) }
    })
    .await;
    gate.commit().await.unwrap();
    let last = events.last().unwrap().event_id;
    wait_handled(&log, last, "the partition is fetched again").await;
    stop.store(true, Ordering::Relaxed);
    joiner.await.unwrap();
    support::eventually(WAIT, "every offset committed", || {
        let (group, topic) = (group.clone(), topic.clone());
        async move { (committed(&group, &topic, 1).await[0] == Some(end)).then_some(()) }
    })
    .await;
    running.stop().await;

    let seqs: Vec<i64> = effects.all().await.into_iter().map(|e| e.2).collect();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4, 5], "each once, in order");
}
