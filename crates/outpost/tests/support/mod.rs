//! Shared test harness: real PostgreSQL, Redis and tansu on 127.0.0.1, unique schemas and
//! topics per test, a collecting consumer, and private brokers for fault injection.
#![allow(dead_code, missing_docs)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use outpost::{
    Aggregate, Environment, EventEnvelope, KafkaProducer, OutboxEvent, OutboxStore, OutboxTable,
    ProducerConfig, RelayConfig,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::{PgPool, PgPoolOptions};
use uuid::Uuid;

pub fn database_url() -> String {
    std::env::var("OUTPOST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn redis_url() -> String {
    std::env::var("OUTPOST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn brokers() -> String {
    std::env::var("OUTPOST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// Logs to the test output when `OUTPOST_TEST_LOG` is set (e.g. `outpost=debug`).
pub fn init_logging() {
    if let Ok(filter) = std::env::var("OUTPOST_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

pub async fn pool() -> PgPool {
    init_logging();
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&database_url())
        .await
        .expect("PostgreSQL must be reachable at OUTPOST_DATABASE_URL (run `make services`)")
}

/// A migrated outbox in a schema of its own.
pub async fn store() -> OutboxStore {
    let store = OutboxStore::new(
        pool().await,
        OutboxTable::new(&unique("t")).expect("valid schema"),
    );
    store.migrate().await.expect("migrate");
    store
}

pub async fn topic(partitions: i32) -> String {
    topic_on(&brokers(), partitions).await
}

pub async fn topic_on(brokers: &str, partitions: i32) -> String {
    let name = unique("outpost.test").replace('_', ".");
    outpost::producer::create_topic(brokers, &name, partitions, Duration::from_secs(10))
        .await
        .expect("create topic");
    name
}

/// Producer settings suited to tests: short timeouts so outages surface quickly.
pub fn producer_config(brokers: &str) -> ProducerConfig {
    let mut cfg = ProducerConfig::new(brokers);
    cfg.delivery_timeout = Duration::from_millis(1500);
    cfg.request_timeout = Duration::from_millis(1000);
    cfg.queue_timeout = Duration::from_millis(500);
    cfg.librdkafka
        .insert("reconnect.backoff.max.ms".into(), "200".into());
    cfg
}

pub fn producer(brokers: &str) -> Arc<KafkaProducer> {
    Arc::new(KafkaProducer::new(producer_config(brokers)).expect("producer"))
}

pub fn relay_config(service: &str) -> RelayConfig {
    let mut cfg = RelayConfig::new(service, Environment::Testing);
    cfg.lease = Duration::from_secs(5);
    cfg.backoff.initial = Duration::from_millis(50);
    cfg.backoff.max = Duration::from_millis(500);
    cfg
}

/// An event whose data carries its key and per-key sequence number.
pub fn event(topic: &str, key: &str, seq: usize) -> OutboxEvent {
    let env = EventEnvelope::new(
        "outpost.test.v1",
        "outpost-tests",
        serde_json::json!({ "key": key, "seq": seq }),
    );
    OutboxEvent::from_envelope(&env, topic, Aggregate::new("test", key)).expect("serialize")
}

/// `n` events round-robin over `keys` keys, each staged in its own committed transaction.
pub async fn stage_committed(
    store: &OutboxStore,
    topic: &str,
    keys: usize,
    n: usize,
) -> Vec<OutboxEvent> {
    let mut staged = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("k{}", i % keys);
        let ev = event(topic, &key, i / keys);
        let mut tx = store.pool().begin().await.unwrap();
        store.stage(&mut tx, &ev).await.unwrap().expect("new row");
        tx.commit().await.unwrap();
        staged.push(ev);
    }
    staged
}

/// One consumed message.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub event_id: Uuid,
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    pub partition: i32,
    pub offset: i64,
    pub at: Instant,
}

impl Consumed {
    pub fn seq(&self) -> u64 {
        let v: serde_json::Value = serde_json::from_slice(&self.payload).unwrap();
        v["data"]["seq"].as_u64().unwrap()
    }
}

/// Reads every partition of a topic from the beginning (no group, no rebalance waits).
pub struct Collector {
    seen: Arc<Mutex<Vec<Consumed>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    pub fn start(brokers: &str, topic: &str, partitions: i32) -> Self {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", unique("collector"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "5")
            .set("reconnect.backoff.max.ms", "200")
            .set("topic.metadata.refresh.interval.ms", "500")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).expect("assign");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok(msg) = consumer.recv().await else {
                    continue;
                };
                let headers: BTreeMap<String, String> = msg
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let Some(event_id) = headers.get("event_id").and_then(|s| s.parse().ok()) else {
                    continue;
                };
                let consumed = Consumed {
                    event_id,
                    key: String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned(),
                    payload: msg.payload().unwrap_or_default().to_vec(),
                    headers,
                    partition: msg.partition(),
                    offset: msg.offset(),
                    at: Instant::now(),
                };
                sink.lock().unwrap().push(consumed);
            }
        });
        Self { seen, task }
    }

    pub fn snapshot(&self) -> Vec<Consumed> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `ids` were all seen, or panics after `timeout`.
    pub async fn wait_for(&self, ids: &[Uuid], timeout: Duration) -> Vec<Consumed> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.snapshot();
            let got: std::collections::HashSet<Uuid> = seen.iter().map(|c| c.event_id).collect();
            let missing = ids.iter().filter(|id| !got.contains(id)).count();
            if missing == 0 {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "{missing} of {} events not consumed within {timeout:?}",
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Checks that, per key, first deliveries arrive in increasing sequence order.
pub fn assert_key_order(consumed: &[Consumed]) {
    let mut first_seen = std::collections::HashSet::new();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for c in consumed {
        if !first_seen.insert(c.event_id) {
            continue;
        }
        let seq = c.seq();
        if let Some(prev) = last.get(&c.key) {
            assert!(
                seq > *prev,
                "key {} delivered seq {seq} after {prev}",
                c.key
            );
        }
        last.insert(c.key.clone(), seq);
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn count_status(store: &OutboxStore, status: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE status = $1",
        store.table()
    ))
    .bind(status)
    .fetch_one(store.pool())
    .await
    .unwrap()
}

fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("OUTPOST_TANSU_BIN") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let recorded = std::fs::read_to_string(root.join(".tools/tansu-bin"))
        .expect("tansu not installed: run `make services` (or set OUTPOST_TANSU_BIN)");
    PathBuf::from(recorded.trim())
}

/// A tansu broker of the test's own, on a free port, that the test may pause or kill.
pub struct PrivateBroker {
    pub port: u16,
    child: Option<Child>,
}

impl PrivateBroker {
    pub async fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut broker = Self { port, child: None };
        broker.spawn().await;
        broker
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tansu");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        eventually(
            Duration::from_secs(10),
            "private broker accepts connections",
            || {
                let addr = addr.clone();
                async move { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) }
            },
        )
        .await;
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// SIGSTOP: the broker hangs, connections stay open.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGKILL: the broker is gone, with its (memory) state.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a new broker on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_ref() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// A metrics recorder that can be read without draining it (tests in one binary run in
/// parallel and share it; each uses a unique service label).
#[derive(Debug)]
struct TestRecorder(Registry<Key, AtomicStorage>);

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0
            .get_or_create_counter(key, |c| Counter::from_arc(Arc::clone(c)))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0
            .get_or_create_gauge(key, |g| Gauge::from_arc(Arc::clone(g)))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0
            .get_or_create_histogram(key, |h| Histogram::from_arc(Arc::clone(h)))
    }
}

/// Installs the test recorder (once per test binary) and returns its registry.
pub fn metrics() -> &'static Registry<Key, AtomicStorage> {
    static RECORDER: OnceLock<&'static TestRecorder> = OnceLock::new();
    let recorder = RECORDER.get_or_init(|| {
        let recorder: &'static TestRecorder = Box::leak(Box::new(TestRecorder(Registry::atomic())));
        metrics::set_global_recorder(recorder).expect("install recorder");
        recorder
    });
    &recorder.0
}

/// For one service, summed over the series carrying all of `labels`: a counter's count, a
/// gauge's value, a histogram's number of samples.
pub fn metric(name: &str, service: &str, labels: &[(&str, &str)]) -> f64 {
    let registry = metrics();
    let mine = |key: &Key| {
        key.name() == name
            && key
                .labels()
                .any(|l| l.key() == "service" && l.value() == service)
            && labels
                .iter()
                .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
    };
    let counters: u64 = registry
        .get_counter_handles()
        .into_iter()
        .filter(|(k, _)| mine(k))
        .map(|(_, c)| c.load(Ordering::Relaxed))
        .sum();
    let gauges: f64 = registry
        .get_gauge_handles()
        .into_iter()
        .filter(|(k, _)| mine(k))
        .map(|(_, g)| f64::from_bits(g.load(Ordering::Relaxed)))
        .sum();
    let samples: usize = registry
        .get_histogram_handles()
        .into_iter()
        .filter(|(k, _)| mine(k))
        .map(|(_, h)| h.data().len())
        .sum();
    counters as f64 + gauges + samples as f64
}
