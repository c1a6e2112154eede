//! `outpost verify`: read a topic back from its beginning and hold it against the ledger
//! `outpost load` wrote: what was committed and never arrived, what arrived twice, and
//! which events of a key arrived after a later one of the same key.
//!
//! Messages are counted by reading them (tansu's watermarks undercount). Reading stops
//! once every ledger event was seen and nothing new came for a grace period, or when
//! nothing new came for `wait`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use outpost::{OutboxStore, WalStream};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use uuid::Uuid;

use crate::load::ledger_table;

/// The ledger events parked: dead rows of the outbox table and, in WAL mode, the stream's
/// dead letters (a schema has either or both; a table that does not exist parks nothing).
async fn parked(store: &OutboxStore, ids: &[Uuid]) -> anyhow::Result<HashSet<Uuid>> {
    let mut tables = vec![(store.table().to_string(), "status = 'dead' AND")];
    if let Ok(stream) = WalStream::new(store.table().schema()) {
        tables.push((stream.dead_letters(), ""));
    }
    let mut parked = HashSet::new();
    for (table, dead) in tables {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&table)
            .fetch_one(store.pool())
            .await
            .context("cannot read parked events")?;
        if exists {
            let found: Vec<Uuid> = sqlx::query_scalar(&format!(
                "SELECT event_id FROM {table} WHERE {dead} event_id = ANY($1)"
            ))
            .bind(ids)
            .fetch_all(store.pool())
            .await
            .with_context(|| format!("cannot read parked events from {table}"))?;
            parked.extend(found);
        }
    }
    Ok(parked)
}

/// How long reading goes on after the last ledger event arrived, for late duplicates.
const GRACE: Duration = Duration::from_secs(2);

/// The verdict, as `outpost verify` prints it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Verdict {
    pub topic: String,
    pub ledger: String,
    /// Events in the ledger.
    pub committed: usize,
    /// Ledger events read at least once.
    pub delivered: usize,
    /// Ledger events never read.
    pub missing: usize,
    /// Extra copies of ledger events (same `event_id` read again).
    pub duplicates: usize,
    /// Ledger events whose first copy arrived after the first copy of a later event of
    /// the same key (later: a higher ledger `seq`, which is commit order).
    pub order_violations: usize,
    /// Ledger events parked: dead in the outbox, or WAL-mode dead letters.
    pub parked: i64,
    /// Ledger events neither read nor parked: lost.
    pub lost: usize,
    /// Messages read whose event is not in the ledger, or whose publish returned an error
    /// (it may land all the same: a send that timed out).
    pub unledgered: usize,
    /// Kafka-first publishes in doubt: the caller's state was committed, and the process
    /// ended before publish() returned (the documented window). Not in `committed`.
    pub in_doubt: usize,
    /// Of those, the ones that were delivered all the same.
    pub in_doubt_delivered: usize,
    /// With `--fault-ended-ms`: how long after the fault ended the last event committed
    /// before its end was acknowledged by the broker; 0 when all were acknowledged before
    /// the end; absent when one of them is missing. The acknowledgement time is the outbox
    /// row's `published_at` (written only after the ack), or for a Kafka-first direct send
    /// (no row) the time its publish() returned.
    pub catch_up_ms: Option<i64>,
    /// With `--fault-ended-ms`: how long after the fault ended the first event committed
    /// after its end was acknowledged (writers and delivery working again); absent when
    /// none was committed after it.
    pub resumed_ms: Option<i64>,
    /// The larger of the two: when delivery was back to normal.
    pub recovery_ms: Option<i64>,
    /// Up to 10 missing event ids.
    pub missing_sample: Vec<Uuid>,
    /// Up to 10 event ids read more than once.
    pub duplicate_sample: Vec<Uuid>,
}

impl Verdict {
    /// Every committed event was delivered or parked, each key in order; the error says
    /// what broke (for `outpost verify`'s exit code).
    ///
    /// # Errors
    /// When an event is neither delivered nor parked, or a key's events arrived out of
    /// order.
    pub fn holds(&self) -> anyhow::Result<()> {
        let lost = self.lost;
        anyhow::ensure!(
            lost == 0 && self.order_violations == 0,
            "verify: {lost} committed events neither delivered nor parked, {} out of key order \
             (the JSON above has samples)",
            self.order_violations
        );
        Ok(())
    }
}

/// One ledger row, as verify needs it.
struct Ledgered {
    key: String,
    seq: i64,
    /// `committed` or `pending` (in doubt).
    committed: bool,
    committed_at_ms: i64,
}

/// Reads `topic` and holds it against `ledger`; `fault_ended_ms` (Unix milliseconds) asks
/// for the recovery time after a fault.
pub async fn run(
    kafka: &outpost::ProducerConfig,
    store: &OutboxStore,
    ledger: &str,
    topic: Option<&str>,
    wait: Duration,
    fault_ended_ms: Option<i64>,
    read_first: Option<&std::path::Path>,
) -> anyhow::Result<Verdict> {
    let quoted = ledger_table(ledger)?;
    let topic = match topic {
        Some(topic) => topic.to_owned(),
        None => {
            let topics: Vec<String> =
                sqlx::query_scalar(&format!("SELECT DISTINCT topic FROM {quoted}"))
                    .fetch_all(store.pool())
                    .await
                    .with_context(|| format!("cannot read the ledger {ledger}"))?;
            match topics.as_slice() {
                [one] => one.clone(),
                _ => anyhow::bail!(
                    "the ledger {ledger} names {} topics; pick one with --from",
                    topics.len()
                ),
            }
        }
    };
    let topic = topic.as_str();
    let rows: Vec<(Uuid, String, i64, String, i64)> = sqlx::query_as(&format!(
        "SELECT event_id, event_key, seq, state, \
                (EXTRACT(EPOCH FROM committed_at) * 1000)::int8 \
         FROM {quoted} WHERE topic = $1 AND state IN ('committed', 'pending')"
    ))
    .bind(topic)
    .fetch_all(store.pool())
    .await
    .with_context(|| format!("cannot read the ledger {ledger}"))?;
    let ledgered: HashMap<Uuid, Ledgered> = rows
        .into_iter()
        .map(|(id, key, seq, state, at)| {
            let row = Ledgered {
                key,
                seq,
                committed: state == "committed",
                committed_at_ms: at,
            };
            (id, row)
        })
        .collect();
    let committed = ledgered.values().filter(|l| l.committed).count();
    let ids: Vec<Uuid> = ledgered
        .iter()
        .filter(|(_, l)| l.committed)
        .map(|(id, _)| *id)
        .collect();
    let parked = parked(store, &ids).await?;

    let mut tally = Tally::default();
    // Messages a broker that was then lost had served (`outpost faults` reads them before
    // it kills a broker with memory storage): they come first, as they did.
    if let Some(path) = read_first {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --read-first {}", path.display()))?;
        let earlier: Vec<Option<Uuid>> = serde_json::from_str(&text).with_context(|| {
            format!(
                "--read-first {}: expected a JSON array of event ids",
                path.display()
            )
        })?;
        for id in earlier {
            tally.record(&ledgered, id);
        }
    }
    // Reading metadata blocks until the broker answers.
    let consumer =
        tokio::task::block_in_place(|| reader(&kafka.brokers, &kafka.librdkafka, topic))?;
    let mut last_new = Instant::now();
    loop {
        let all_seen = tally.seen_committed == committed;
        let quiet = if all_seen { GRACE } else { wait };
        let left = quiet.saturating_sub(last_new.elapsed());
        let Ok(next) = tokio::time::timeout(left, consumer.recv()).await else {
            break;
        };
        let msg = next.context("reading the topic failed")?;
        if tally.record(&ledgered, message_id(&msg)) {
            last_new = Instant::now();
        }
    }
    let Tally {
        seen,
        seen_committed,
        duplicates,
        duplicate_sample,
        unledgered,
        order_violations,
        ..
    } = tally;
    let missing: Vec<Uuid> = ledgered
        .iter()
        .filter(|(id, l)| l.committed && !seen.contains(id))
        .map(|(id, _)| *id)
        .collect();
    let in_doubt: Vec<&Uuid> = ledgered
        .iter()
        .filter(|(_, l)| !l.committed)
        .map(|(id, _)| id)
        .collect();
    let acked = match fault_ended_ms {
        Some(_) => acked_at(store, &ledgered, &seen).await?,
        None => HashMap::new(),
    };
    let catch_up_ms = fault_ended_ms.and_then(|end| catch_up(&ledgered, &acked, end));
    let resumed_ms = fault_ended_ms.and_then(|end| resumed(&ledgered, &acked, end));
    let recovery_ms = match (catch_up_ms, resumed_ms) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, None) => a,
        (None, b) => b.filter(|_| missing.is_empty()),
    };
    Ok(Verdict {
        topic: topic.to_owned(),
        ledger: ledger.to_owned(),
        committed,
        delivered: seen_committed,
        missing: missing.len(),
        duplicates,
        order_violations,
        parked: i64::try_from(parked.len()).unwrap_or(i64::MAX),
        lost: missing.iter().filter(|id| !parked.contains(*id)).count(),
        unledgered,
        in_doubt: in_doubt.len(),
        in_doubt_delivered: in_doubt.iter().filter(|id| seen.contains(*id)).count(),
        catch_up_ms,
        resumed_ms,
        recovery_ms,
        missing_sample: missing.into_iter().take(10).collect(),
        duplicate_sample,
    })
}

/// When each delivered ledger event was acknowledged (Unix ms): its outbox row's
/// `published_at`, or, with no row (a Kafka-first direct send), when publish() returned.
async fn acked_at(
    store: &OutboxStore,
    ledgered: &HashMap<Uuid, Ledgered>,
    seen: &HashSet<Uuid>,
) -> anyhow::Result<HashMap<Uuid, i64>> {
    let ids: Vec<Uuid> = seen.iter().copied().collect();
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(&format!(
        "SELECT event_id, (EXTRACT(EPOCH FROM published_at) * 1000)::int8 FROM {} \
         WHERE event_id = ANY($1) AND published_at IS NOT NULL",
        store.table()
    ))
    .bind(&ids)
    .fetch_all(store.pool())
    .await
    .context("cannot read when the events were published")?;
    let mut acked: HashMap<Uuid, i64> = rows.into_iter().collect();
    for id in ids {
        if let Some(row) = ledgered.get(&id) {
            acked.entry(id).or_insert(row.committed_at_ms);
        }
    }
    Ok(acked)
}

/// How long after `end` the last event committed before it was acknowledged; `None` when
/// one of them never was.
fn catch_up(
    ledgered: &HashMap<Uuid, Ledgered>,
    acked: &HashMap<Uuid, i64>,
    end: i64,
) -> Option<i64> {
    let mut last = end;
    for (id, row) in ledgered {
        if row.committed && row.committed_at_ms <= end {
            last = last.max(*acked.get(id)?);
        }
    }
    Some(last - end)
}

/// How long after `end` the first event committed after it was acknowledged.
fn resumed(
    ledgered: &HashMap<Uuid, Ledgered>,
    acked: &HashMap<Uuid, i64>,
    end: i64,
) -> Option<i64> {
    let (id, _) = ledgered
        .iter()
        .filter(|(_, row)| row.committed && row.committed_at_ms > end)
        .min_by_key(|(_, row)| row.committed_at_ms)?;
    Some(acked.get(id)? - end)
}

/// What reading found so far.
#[derive(Default)]
struct Tally {
    /// Each ledger event read.
    seen: HashSet<Uuid>,
    seen_committed: usize,
    duplicates: usize,
    duplicate_sample: Vec<Uuid>,
    unledgered: usize,
    order_violations: usize,
    /// Per key, the highest ledger `seq` read.
    latest: HashMap<String, i64>,
}

impl Tally {
    /// Counts one message read; true when it was a ledger event read for the first time.
    fn record(&mut self, ledgered: &HashMap<Uuid, Ledgered>, id: Option<Uuid>) -> bool {
        let Some((id, row)) = id.and_then(|id| Some((id, ledgered.get(&id)?))) else {
            self.unledgered += 1;
            return false;
        };
        if !self.seen.insert(id) {
            self.duplicates += 1;
            if self.duplicate_sample.len() < 10 {
                self.duplicate_sample.push(id);
            }
            return false;
        }
        self.seen_committed += usize::from(row.committed);
        let latest = self.latest.entry(row.key.clone()).or_insert(row.seq);
        if row.seq < *latest {
            self.order_violations += 1;
        }
        *latest = (*latest).max(row.seq);
        true
    }
}

/// The `event_id` of a message (header, else body), if it has one.
fn message_id(msg: &impl Message) -> Option<Uuid> {
    let mut headers = BTreeMap::new();
    if let Some(all) = msg.headers() {
        for h in all.iter() {
            let value = String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned();
            headers.entry(h.key.to_owned()).or_insert(value);
        }
    }
    outpost::consuming::consumer::event_id(&headers, msg.payload().unwrap_or_default()).ok()
}

/// The reading consumer's settings: the relays' own librdkafka properties (security and
/// connection settings among them: a cluster that wants SASL or TLS from the relays wants
/// them from this reader too; producer-only ones librdkafka ignores here, with a warning).
fn reader_config(brokers: &str, options: &BTreeMap<String, String>) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in options {
        config.set(key, value);
    }
    config
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("outpost-verify-{}", Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10");
    config
}

/// Reads every partition of `topic` from its beginning until nothing new came for
/// `quiet`: the event id of each message (none when it has none), in the order read.
pub async fn read_ids(
    brokers: &str,
    topic: &str,
    quiet: Duration,
) -> anyhow::Result<Vec<Option<Uuid>>> {
    let consumer = tokio::task::block_in_place(|| reader(brokers, &BTreeMap::new(), topic))?;
    let mut ids = Vec::new();
    while let Ok(next) = tokio::time::timeout(quiet, consumer.recv()).await {
        ids.push(message_id(&next.context("reading the topic failed")?));
    }
    Ok(ids)
}

/// A consumer of every partition of `topic` from its beginning, committing nothing.
fn reader(
    brokers: &str,
    options: &BTreeMap<String, String>,
    topic: &str,
) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = reader_config(brokers, options)
        .create()
        .context("cannot create a Kafka consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("cannot read the metadata of topic {topic}"))?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    anyhow::ensure!(
        partitions > 0,
        "topic {topic} has no partitions (does it exist?)"
    );
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, i32::try_from(p)?, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_takes_the_relays_connection_settings_but_keeps_its_own() {
        let options = BTreeMap::from([
            ("security.protocol".to_owned(), "SASL_SSL".to_owned()),
            ("enable.auto.commit".to_owned(), "true".to_owned()),
        ]);
        let config = reader_config("127.0.0.1:9092", &options);
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("bootstrap.servers"), Some("127.0.0.1:9092"));
        assert_eq!(config.get("enable.auto.commit"), Some("false"));
    }
}
