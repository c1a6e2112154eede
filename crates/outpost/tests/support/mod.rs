//! Shared test harness: real PostgreSQL, Redis and tansu on 127.0.0.1, unique schemas and
//! topics per test, a collecting consumer, and private brokers for fault injection.
#![allow(dead_code, missing_docs)]

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use outpost::{
    Aggregate, Environment, EventEnvelope, KafkaProducer, OutboxEvent, OutboxStore, OutboxTable,
    ProducerConfig, RelayConfig,
};
use sqlx::postgres::{PgPool, PgPoolOptions};
use uuid::Uuid;

pub fn database_url() -> String {
    std::env::var("OUTPOST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn redis_url() -> String {
    std::env::var("OUTPOST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The port of the Redis server the tests use (for a proxy in front of it).
pub fn redis_port() -> u16 {
    redis_url()
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .and_then(|authority| authority.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(6379)
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
    outpost::kafka::producer::create_topic(brokers, &name, partitions, Duration::from_secs(10))
        .await
        .expect("create topic");
    name
}

/// How many partitions `topic` has now. After a broker restart a client's metadata request
/// can re-create a topic (auto-create, broker default count) before the test does.
pub fn partitions_of(brokers: &str, topic: &str) -> i32 {
    use rdkafka::consumer::Consumer;
    let probe: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let metadata = probe
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    i32::try_from(metadata.topics()[0].partitions().len()).unwrap()
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

/// For tests that inject no broker fault and count every message: a produce request the
/// shared broker answers slowly is waited for, not retried by the client. With the 1 s
/// request timeout above, the three-relay test once saw 9 rows acked and marked published
/// that no reader ever found (suspected: a batch retried by librdkafka that tansu answered
/// as a duplicate sequence without having stored it).
pub fn patient_producer(brokers: &str) -> Arc<KafkaProducer> {
    let mut cfg = producer_config(brokers);
    cfg.delivery_timeout = Duration::from_secs(30);
    cfg.request_timeout = Duration::from_secs(10);
    Arc::new(KafkaProducer::new(cfg).expect("producer"))
}

/// [`relay_config`] with a lease long enough for [`patient_producer`]'s timeouts.
pub fn patient_relay_config(service: &str) -> RelayConfig {
    let mut cfg = relay_config(service);
    cfg.lease = Duration::from_secs(90);
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

pub use outpost::testkit::Consumed;

/// The per-key sequence number test events carry in `data.seq`.
pub fn seq(c: &Consumed) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&c.payload).unwrap();
    v["data"]["seq"].as_u64().unwrap()
}

/// The test kit's collector, failing the test instead of returning errors.
pub struct Collector(outpost::testkit::Collector);

impl Collector {
    pub fn start(brokers: &str, topic: &str, partitions: i32) -> Self {
        Self(outpost::testkit::Collector::start(brokers, topic, partitions).expect("collector"))
    }

    pub fn snapshot(&self) -> Vec<Consumed> {
        self.0.snapshot()
    }

    /// Waits until `ids` were all seen; `Err(missing)` after `timeout`.
    pub async fn try_wait_for(
        &self,
        ids: &[Uuid],
        timeout: Duration,
    ) -> Result<Vec<Consumed>, usize> {
        self.0.wait_for(ids, timeout).await
    }

    /// Everything the topic holds, read to its end (through fences, not watermarks).
    pub async fn read_to_end(&self) -> Vec<Consumed> {
        self.0
            .read_to_end(Duration::from_secs(30))
            .await
            .expect("collector reads the topic to its end")
    }

    /// Waits until `ids` were all seen, or panics after `timeout`.
    pub async fn wait_for(&self, ids: &[Uuid], timeout: Duration) -> Vec<Consumed> {
        match self.0.wait_for(ids, timeout).await {
            Ok(seen) => seen,
            Err(missing) => panic!(
                "{missing} of {} events not consumed within {timeout:?}",
                ids.len()
            ),
        }
    }
}

/// How many messages were read: distinct (partition, offset) pairs, so a reader that
/// read some offsets again (after an offset reset) does not count them twice.
pub fn messages<'a>(consumed: impl IntoIterator<Item = &'a Consumed>) -> usize {
    consumed
        .into_iter()
        .map(|c| (c.partition, c.offset))
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Checks that, per key, first deliveries arrive in increasing sequence order.
pub fn assert_key_order(consumed: &[Consumed]) {
    let mut first_seen = std::collections::HashSet::new();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for c in consumed {
        if !first_seen.insert(c.event_id) {
            continue;
        }
        let seq = seq(c);
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

/// The test kit's private broker, failing the test instead of returning errors.
pub struct PrivateBroker(outpost::testkit::TansuBroker);

impl PrivateBroker {
    pub async fn start() -> Self {
        Self(
            outpost::testkit::TansuBroker::start()
                .await
                .expect("private tansu broker (run `make services`, or set OUTPOST_TANSU_BIN)"),
        )
    }

    pub fn brokers(&self) -> String {
        self.0.brokers()
    }

    /// SIGSTOP: the broker hangs, connections stay open.
    pub fn pause(&self) {
        self.0.pause().expect("SIGSTOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.0.resume().expect("SIGCONT");
    }

    /// SIGKILL: the broker is gone, with its (memory) state.
    pub fn kill(&mut self) {
        self.0.kill();
    }

    /// Starts a new broker on the same port.
    pub async fn restart(&mut self) {
        self.0.restart().await.expect("restart tansu");
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
    let mut all = vec![("service", service)];
    all.extend_from_slice(labels);
    metric_with(name, &all)
}

/// Whether any gauge `name` was ever set for `service` (a gauge set to 0 is reported).
pub fn gauge_reported(name: &str, service: &str) -> bool {
    metrics().get_gauge_handles().into_iter().any(|(key, _)| {
        key.name() == name
            && key
                .labels()
                .any(|l| l.key() == "service" && l.value() == service)
    })
}

/// Like [`metric`], for series selected by `labels` alone.
pub fn metric_with(name: &str, labels: &[(&str, &str)]) -> f64 {
    let registry = metrics();
    let mine = |key: &Key| {
        key.name() == name
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

/// A relay running in the background until [`Running::stop`].
pub struct Running {
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<outpost::Result<()>>,
}

impl Running {
    /// Signals shutdown and waits for the relay to drain and stop.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("relay drains and stops")
            .unwrap()
            .unwrap();
    }
}

/// A relay of `service`'s outbox on `brokers`, woken by a signal of its own.
pub fn relay(store: &OutboxStore, brokers: &str, service: &str) -> outpost::Relay {
    outpost::Relay::new(store.clone(), producer(brokers), relay_config(service))
        .unwrap()
        .with_wake_signal(outpost::WakeSignal::new())
}

/// Runs `relay` in the background.
pub fn spawn(relay: outpost::Relay) -> Running {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(relay.run(shutdown.clone().cancelled_owned()));
    Running { shutdown, task }
}

/// Everything `collector` has read once nothing new arrived for `quiet` (at least `seen`
/// messages are already there): a duplicate sent late still gets counted.
pub async fn settled(collector: &Collector, seen: usize, quiet: Duration) -> Vec<Consumed> {
    let mut count = seen;
    loop {
        tokio::time::sleep(quiet).await;
        let now = collector.snapshot();
        if now.len() == count {
            return now;
        }
        count = now.len();
    }
}

/// A TCP proxy to a server on 127.0.0.1 (PostgreSQL, Redis) whose connections can be cut off without being
/// closed, as a partition that drops packets cuts them: a frozen connection forwards nothing
/// more, either way, and stays open. While new connections are held, those accepted are
/// frozen from the start (a server that accepts and never answers). Connections can also be
/// closed, and new ones refused (a server that went down).
pub struct Partition {
    port: u16,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// Local ports of the proxy's connections to the server (`client_port` there).
    upstream_ports: Arc<std::sync::Mutex<Vec<i32>>>,
    freezes: tokio::sync::watch::Sender<u64>,
    hold_new: Arc<std::sync::atomic::AtomicBool>,
    closes: tokio::sync::watch::Sender<u64>,
    refuse_new: Arc<std::sync::atomic::AtomicBool>,
    /// Connections whose client has not closed its end.
    open: Arc<std::sync::atomic::AtomicUsize>,
    /// Whether a frozen connection's server end stays open after its client closed (see
    /// [`Partition::strand`]).
    strand: Arc<std::sync::atomic::AtomicBool>,
    /// Server ends kept open that way.
    stranded: Arc<std::sync::Mutex<Vec<tokio::net::TcpStream>>>,
    /// Connections frozen so far.
    frozen: Arc<std::sync::atomic::AtomicUsize>,
    /// The server's port for new connections (see [`Partition::retarget`]).
    target: Arc<std::sync::atomic::AtomicU16>,
}

/// Counts one connection as open for as long as it lives.
struct Open(Arc<std::sync::atomic::AtomicUsize>);

impl Open {
    fn count(open: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(Arc::clone(open))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Reads what `client` sends, answering nothing, until it closes its end.
async fn until_closed(client: &mut tokio::net::TcpStream) {
    let mut sink = [0u8; 4096];
    while let Ok(n) = tokio::io::AsyncReadExt::read(client, &mut sink).await {
        if n == 0 {
            break;
        }
    }
}

impl Partition {
    pub async fn start(target_port: u16) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (freezes, _) = tokio::sync::watch::channel(0u64);
        let (closes, _) = tokio::sync::watch::channel(0u64);
        let proxy = Self {
            port,
            accepted: Arc::default(),
            upstream_ports: Arc::default(),
            freezes,
            hold_new: Arc::default(),
            closes,
            refuse_new: Arc::default(),
            open: Arc::default(),
            strand: Arc::default(),
            stranded: Arc::default(),
            frozen: Arc::default(),
            target: Arc::new(std::sync::atomic::AtomicU16::new(target_port)),
        };
        let open = Arc::clone(&proxy.open);
        let (accepted, ports, hold_new, refuse_new) = (
            Arc::clone(&proxy.accepted),
            Arc::clone(&proxy.upstream_ports),
            Arc::clone(&proxy.hold_new),
            Arc::clone(&proxy.refuse_new),
        );
        let (freezes, closes) = (proxy.freezes.clone(), proxy.closes.clone());
        let (strand, stranded) = (Arc::clone(&proxy.strand), Arc::clone(&proxy.stranded));
        let frozen_so_far = Arc::clone(&proxy.frozen);
        let target = Arc::clone(&proxy.target);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                // Subscribed before the connection is counted: a freeze after a caller saw
                // it counted cuts it off.
                let mut frozen = freezes.subscribe();
                let mut closed = closes.subscribe();
                accepted.fetch_add(1, SeqCst);
                if refuse_new.load(SeqCst) {
                    continue; // dropped: closed at once
                }
                let held = hold_new.load(SeqCst);
                let ports = Arc::clone(&ports);
                let open = Arc::clone(&open);
                let (strand, stranded) = (Arc::clone(&strand), Arc::clone(&stranded));
                let frozen_so_far = Arc::clone(&frozen_so_far);
                let target_port = target.load(SeqCst);
                tokio::spawn(async move {
                    let _open = Open::count(&open);
                    if held {
                        return until_closed(&mut client).await;
                    }
                    let mut server = tokio::net::TcpStream::connect(("127.0.0.1", target_port))
                        .await
                        .unwrap();
                    let local = server.local_addr().unwrap().port();
                    ports.lock().unwrap().push(i32::from(local));
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                        _ = closed.changed() => return,
                        _ = frozen.changed() => {
                            frozen_so_far.fetch_add(1, SeqCst);
                        }
                    }
                    // Both stay open and silent, until the client closes its end.
                    until_closed(&mut client).await;
                    if strand.load(SeqCst) {
                        stranded.lock().unwrap().push(server);
                    }
                });
            }
        });
        proxy
    }

    /// Sends new connections to the server on `port` from now on (another server behind the
    /// same address, as after a failover); those open stay where they are.
    pub fn retarget(&self, port: u16) {
        self.target.store(port, std::sync::atomic::Ordering::SeqCst);
    }

    /// Where it listens.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections open now: accepted, not refused, and not closed by their client.
    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Local ports of its connections to the server (`client_port` in `pg_stat_activity`).
    pub fn upstream_ports(&self) -> Vec<i32> {
        self.upstream_ports.lock().unwrap().clone()
    }

    /// Closes every connection open now (those frozen stay as they are).
    pub fn close_all(&self) {
        self.closes.send_modify(|n| *n += 1);
    }

    /// Whether connections accepted from now on are closed at once.
    pub fn refuse_new(&self, refuse: bool) {
        self.refuse_new
            .store(refuse, std::sync::atomic::Ordering::SeqCst);
    }

    /// Cuts off every connection open now.
    pub fn freeze(&self) {
        self.freezes.send_modify(|n| *n += 1);
    }

    /// Cuts off every connection open now, as [`Self::freeze`] does, and returns once one of
    /// them is cut off (each stops in its own task: a request sent right after `freeze` can
    /// still get through). For a proxy with one connection open.
    pub async fn cut_off(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let before = self.frozen.load(SeqCst);
        self.freeze();
        eventually(Duration::from_secs(10), "a connection cut off", || async {
            (self.frozen.load(SeqCst) > before).then_some(())
        })
        .await;
    }

    /// Whether the server end of a frozen connection stays open once its client closed: a
    /// partition carries no FIN either, so the server goes on waiting for that client
    /// (by default the close is passed on).
    pub fn strand(&self, strand: bool) {
        self.strand
            .store(strand, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether connections accepted from now on are cut off from the start.
    pub fn hold_new(&self, hold: bool) {
        self.hold_new
            .store(hold, std::sync::atomic::Ordering::SeqCst);
    }
}
