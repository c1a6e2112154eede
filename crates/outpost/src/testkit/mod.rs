//! A fault-injection test kit (feature `testkit`): a private tansu broker that a test may
//! pause (SIGSTOP: a broker that hangs, connections open) or kill and restart (a broker
//! that is gone, with its memory state), and a collector that reads a topic back.
//!
//! It is what Outpost's own acceptance tests and the HuleEdu demo's `--outage` run use.
//! [`postgres::PrivatePostgres`] is a PostgreSQL of one's own, for crashes and server
//! settings (WAL mode needs `wal_level=logical`).

pub mod postgres;

use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

use crate::error::{Error, Result};

/// Where the tansu binary is: `OUTPOST_TANSU_BIN`, else the path `scripts/kafka-setup.sh`
/// recorded in `.tools/tansu-bin`, looked up in the current directory and its ancestors.
pub fn tansu_bin() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("OUTPOST_TANSU_BIN") {
        return Some(PathBuf::from(path));
    }
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors()
        .filter_map(|dir| std::fs::read_to_string(dir.join(".tools/tansu-bin")).ok())
        .map(|recorded| PathBuf::from(recorded.trim()))
        .find(|bin| bin.is_file())
}

/// A tansu broker of one's own on a free port, with memory storage; killed when dropped.
#[derive(Debug)]
pub struct TansuBroker {
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl TansuBroker {
    /// Starts the broker found by [`tansu_bin`].
    ///
    /// # Errors
    /// [`Error::Configuration`] when no tansu binary is installed (run `make services`),
    /// or the errors of [`start_with`](Self::start_with).
    pub async fn start() -> Result<Self> {
        let bin = tansu_bin().ok_or_else(|| {
            Error::config(
                "OUTPOST_TANSU_BIN",
                "the path of a tansu binary (`make services` installs one and records it in .tools/tansu-bin)",
                "",
            )
        })?;
        Self::start_with(&bin).await
    }

    /// Starts `bin` on a free port and waits (up to 10 s) until it accepts connections.
    ///
    /// # Errors
    /// [`Error::Configuration`] when it cannot be started or never listens.
    pub async fn start_with(bin: &Path) -> Result<Self> {
        // A port free when picked can be taken before the broker binds it (by another
        // test's broker restarting on the port it had); then try another.
        let mut attempts = 0;
        loop {
            let port = free_port()?;
            let mut broker = Self {
                bin: bin.to_owned(),
                port,
                child: None,
            };
            match broker.spawn().await {
                Err(Error::Configuration { setting, .. })
                    if setting == "tansu.port" && attempts < 5 =>
                {
                    attempts += 1;
                }
                Err(e) => return Err(e),
                Ok(()) => return Ok(broker),
            }
        }
    }

    async fn spawn(&mut self) -> Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&self.bin)
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                Error::config(
                    "OUTPOST_TANSU_BIN",
                    "an executable tansu binary",
                    format!("{}: {e}", self.bin.display()),
                )
            })?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // A connection alone could reach another process listening on the port (this
            // broker then fails to bind and exits): a test would talk to a broker it
            // neither pauses nor kills.
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(Error::config(
                    "tansu.port",
                    "a port the broker can listen on",
                    format!("{} ({status}; taken by another process?)", self.port),
                ));
            }
            let ours = match listener_owned_by(pid, self.port) {
                Some(ours) => ours,
                None => tokio::net::TcpStream::connect(self.brokers()).await.is_ok(),
            };
            if ours {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(Error::config(
                    "tansu",
                    "a broker that listens within 10 s",
                    format!("nothing of its own on port {}", self.port),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Its bootstrap address, `127.0.0.1:port`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn signal(&self, signal: &str) -> Result<()> {
        let Some(child) = self.child.as_ref() else {
            return Ok(());
        };
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .map_err(|e| Error::config("kill", "the kill command", e.to_string()))?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::config(
                "kill",
                "a running broker",
                status.to_string(),
            ))
        }
    }

    /// SIGSTOP: the broker hangs; connections stay open.
    ///
    /// # Errors
    /// When the signal cannot be sent.
    pub fn pause(&self) -> Result<()> {
        self.signal("-STOP")
    }

    /// SIGCONT.
    ///
    /// # Errors
    /// When the signal cannot be sent.
    pub fn resume(&self) -> Result<()> {
        self.signal("-CONT")
    }

    /// SIGKILL: the broker is gone, with its (memory) state.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A new, empty broker on the same port.
    ///
    /// # Errors
    /// As [`start_with`](Self::start_with).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        let _ = self.resume();
        self.kill();
    }
}

/// A free local port that no broker of this process has had: a killed broker's port stays
/// its own for a restart.
fn free_port() -> Result<u16> {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| Error::config("port", "a free local port", e.to_string()))?
            .port();
        let mut given = lock(&GIVEN);
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
}

/// Whether process `pid` holds the socket listening on `port` (Linux: `/proc/net/tcp*`
/// and `/proc/<pid>/fd`); `None` where that cannot be told.
fn listener_owned_by(pid: u32, port: u16) -> Option<bool> {
    let mut inodes = Vec::new();
    let mut readable = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        readable = true;
        // Columns: sl local_address rem_address st ... inode; `0A` is LISTEN.
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && cols.get(3) == Some(&"0A") {
                if let Some(inode) = cols.get(9) {
                    inodes.push(format!("socket:[{inode}]"));
                }
            }
        }
    }
    if !readable {
        return None;
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    }))
}

/// A message's headers, values as lossy UTF-8 (of a repeated key, the last wins).
pub fn headers_of(msg: &impl Message) -> BTreeMap<String, String> {
    msg.headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    let value = String::from_utf8_lossy(h.value.unwrap_or_default());
                    (h.key.to_owned(), value.into_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One message read back by a [`Collector`].
#[derive(Debug, Clone)]
pub struct Consumed {
    /// From the `event_id` header.
    pub event_id: Uuid,
    /// Message key.
    pub key: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: BTreeMap<String, String>,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// When it was read.
    pub at: Instant,
    /// The message's producer timestamp (ms since the epoch): a copy made by a client
    /// retry keeps it, a second send of the row does not.
    pub produced_at_ms: Option<i64>,
}

/// The header that marks a [`Collector`]'s fence; fences are never collected.
const FENCE_HEADER: &str = "outpost_test_fence";

/// Reads every partition of a topic from the beginning (assigned, no consumer group, so
/// no rebalance waits) and keeps what carries an `event_id` header.
#[derive(Debug)]
pub struct Collector {
    brokers: String,
    topic: String,
    partitions: i32,
    seen: Arc<Mutex<Vec<Consumed>>>,
    fences: Arc<Mutex<HashSet<Uuid>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    /// Starts reading `partitions` partitions of `topic`.
    ///
    /// # Errors
    /// [`Error::Configuration`] when the consumer cannot be created.
    pub fn start(brokers: &str, topic: &str, partitions: i32) -> Result<Self> {
        let bad = |e: rdkafka::error::KafkaError| {
            Error::config("collector", "a consumer for the topic", e.to_string())
        };
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("outpost-collector-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "5")
            .set("reconnect.backoff.max.ms", "200")
            .set("topic.metadata.refresh.interval.ms", "500")
            .create()
            .map_err(bad)?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(bad)?;
        }
        consumer.assign(&tpl).map_err(bad)?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let fences = Arc::new(Mutex::new(HashSet::new()));
        let (sink, fence_sink) = (Arc::clone(&seen), Arc::clone(&fences));
        let task = tokio::spawn(async move {
            loop {
                let Ok(msg) = consumer.recv().await else {
                    continue;
                };
                let headers = headers_of(&msg);
                let Some(event_id) = headers.get("event_id").and_then(|s| s.parse().ok()) else {
                    continue;
                };
                if headers.contains_key(FENCE_HEADER) {
                    lock(&fence_sink).insert(event_id);
                    continue;
                }
                let consumed = Consumed {
                    event_id,
                    key: String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned(),
                    payload: msg.payload().unwrap_or_default().to_vec(),
                    headers,
                    partition: msg.partition(),
                    offset: msg.offset(),
                    at: Instant::now(),
                    produced_at_ms: msg.timestamp().to_millis(),
                };
                lock(&sink).push(consumed);
            }
        });
        Ok(Self {
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
            partitions,
            seen,
            fences,
            task,
        })
    }

    /// Everything read so far, in arrival order.
    pub fn snapshot(&self) -> Vec<Consumed> {
        lock(&self.seen).clone()
    }

    /// Everything the topic held when this was called, read to its end: writes a fence
    /// to every partition and waits until all fences were read. Unlike a count taken from
    /// watermarks (tansu's lag the log end) or a quiet period (a slow reader looks quiet),
    /// this cannot stop early. Fences are never collected; a message still in some
    /// producer's queue is not covered.
    ///
    /// # Errors
    /// [`Error::KafkaPublish`] when a fence is not acked, [`Error::KafkaConsume`] when the
    /// fences are not all read within `timeout`.
    pub async fn read_to_end(&self, timeout: Duration) -> Result<Vec<Consumed>> {
        let deadline = Instant::now() + timeout;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("acks", "all")
            .set("linger.ms", "0")
            .create()
            .map_err(|e| Error::config("collector", "a producer for fences", e.to_string()))?;
        let mut fences = Vec::new();
        for partition in 0..self.partitions {
            let fence = Uuid::new_v4();
            let id = fence.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "event_id",
                    value: Some(&id),
                })
                .insert(Header {
                    key: FENCE_HEADER,
                    value: Some("1"),
                });
            let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.topic)
                .partition(partition)
                .key("fence")
                .payload(&b""[..])
                .headers(headers);
            producer
                .send(record, deadline.saturating_duration_since(Instant::now()))
                .await
                .map_err(|(source, _)| Error::KafkaPublish {
                    topic: self.topic.clone(),
                    class: crate::error::classify(&source),
                    source,
                })?;
            fences.push(fence);
        }
        loop {
            if fences.iter().all(|f| lock(&self.fences).contains(f)) {
                return Ok(self.snapshot());
            }
            if Instant::now() >= deadline {
                return Err(Error::KafkaConsume {
                    operation: "read_to_end",
                    source: KafkaError::MessageConsumption(RDKafkaErrorCode::OperationTimedOut),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every id in `ids` was read; returns everything read, or how many are
    /// still missing after `timeout`.
    ///
    /// # Errors
    /// `Err(missing)` with the number of ids not seen in time.
    pub async fn wait_for(
        &self,
        ids: &[Uuid],
        timeout: Duration,
    ) -> std::result::Result<Vec<Consumed>, usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.snapshot();
            let got: HashSet<Uuid> = seen.iter().map(|c| c.event_id).collect();
            let missing = ids.iter().filter(|id| !got.contains(id)).count();
            if missing == 0 {
                return Ok(seen);
            }
            if Instant::now() >= deadline {
                return Err(missing);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The collector's state stays usable after a test thread panicked holding it.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_is_told_from_its_owner() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // `None` off Linux: the broker start then falls back to connecting.
        if let Some(ours) = listener_owned_by(std::process::id(), port) {
            assert!(ours);
            drop(listener);
            assert_eq!(listener_owned_by(std::process::id(), port), Some(false));
        }
    }
}
