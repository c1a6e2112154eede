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
use outpost::OutboxStore;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use uuid::Uuid;

use crate::load::ledger_table;

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
    /// Ledger events parked (dead) in the outbox.
    pub parked: i64,
    /// Messages read whose event is not in the ledger (Kafka-first: acked, but the process
    /// died before recording it).
    pub unledgered: usize,
    /// Up to 10 missing event ids.
    pub missing_sample: Vec<Uuid>,
}

/// Reads `topic` and holds it against `ledger`.
pub async fn run(
    brokers: &str,
    store: &OutboxStore,
    ledger: &str,
    topic: Option<&str>,
    wait: Duration,
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
    let rows: Vec<(Uuid, String, i64)> = sqlx::query_as(&format!(
        "SELECT event_id, event_key, seq FROM {quoted} WHERE topic = $1"
    ))
    .bind(topic)
    .fetch_all(store.pool())
    .await
    .with_context(|| format!("cannot read the ledger {ledger}"))?;
    let committed: HashMap<Uuid, (String, i64)> = rows
        .into_iter()
        .map(|(id, key, seq)| (id, (key, seq)))
        .collect();
    let ids: Vec<Uuid> = committed.keys().copied().collect();
    let parked: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE status = 'dead' AND event_id = ANY($1)",
        store.table()
    ))
    .bind(&ids)
    .fetch_one(store.pool())
    .await
    .context("cannot count parked events")?;

    // Reading metadata blocks until the broker answers.
    let consumer = tokio::task::block_in_place(|| reader(brokers, topic))?;
    let mut seen: HashSet<Uuid> = HashSet::new();
    let mut duplicates = 0;
    let mut unledgered = 0;
    let mut order_violations = 0;
    let mut latest: HashMap<String, i64> = HashMap::new();
    let mut last_new = Instant::now();
    loop {
        let all_seen = seen.len() == committed.len();
        let quiet = if all_seen { GRACE } else { wait };
        let left = quiet.saturating_sub(last_new.elapsed());
        let Ok(next) = tokio::time::timeout(left, consumer.recv()).await else {
            break;
        };
        let msg = next.context("reading the topic failed")?;
        let mut headers = BTreeMap::new();
        if let Some(all) = msg.headers() {
            for h in all.iter() {
                let value = String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned();
                headers.entry(h.key.to_owned()).or_insert(value);
            }
        }
        let Ok(id) =
            outpost::consuming::consumer::event_id(&headers, msg.payload().unwrap_or_default())
        else {
            unledgered += 1;
            continue;
        };
        let Some((key, seq)) = committed.get(&id) else {
            unledgered += 1;
            continue;
        };
        if !seen.insert(id) {
            duplicates += 1;
            continue;
        }
        last_new = Instant::now();
        let latest = latest.entry(key.clone()).or_insert(*seq);
        if *seq < *latest {
            order_violations += 1;
        }
        *latest = (*latest).max(*seq);
    }
    let missing: Vec<Uuid> = committed
        .keys()
        .filter(|id| !seen.contains(id))
        .copied()
        .collect();
    Ok(Verdict {
        topic: topic.to_owned(),
        ledger: ledger.to_owned(),
        committed: committed.len(),
        delivered: seen.len(),
        missing: missing.len(),
        duplicates,
        order_violations,
        parked,
        unledgered,
        missing_sample: missing.into_iter().take(10).collect(),
    })
}

/// A consumer of every partition of `topic` from its beginning, committing nothing.
fn reader(brokers: &str, topic: &str) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("outpost-verify-{}", Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
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
