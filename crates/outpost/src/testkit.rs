//! A fault-injection test kit (feature `testkit`): a private tansu broker that a test may
//! pause (SIGSTOP: a broker that hangs, connections open) or kill and restart (a broker
//! that is gone, with its memory state), and a collector that reads a topic back.
//!
//! It is what Outpost's own acceptance tests and the HuleEdu demo's `--outage` run use.

use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
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
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| Error::config("port", "a free local port", e.to_string()))?
            .port();
        let mut broker = Self {
            bin: bin.to_owned(),
            port,
            child: None,
        };
        broker.spawn().await?;
        Ok(broker)
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
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(self.brokers())
            .await
            .is_err()
        {
            if Instant::now() >= deadline {
                self.kill();
                return Err(Error::config(
                    "tansu",
                    "a broker that listens within 10 s",
                    format!("nothing on port {}", self.port),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
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
}

/// Reads every partition of a topic from the beginning (assigned, no consumer group, so
/// no rebalance waits) and keeps what carries an `event_id` header.
#[derive(Debug)]
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
        let sink = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok(msg) = consumer.recv().await else {
                    continue;
                };
                let headers = headers_of(&msg);
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
                sink.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(consumed);
            }
        });
        Ok(Self { seen, task })
    }

    /// Everything read so far, in arrival order.
    pub fn snapshot(&self) -> Vec<Consumed> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
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
