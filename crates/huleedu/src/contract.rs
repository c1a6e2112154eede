//! The wire contract: what a Python HuleEdu consumer (or any strict reader) must accept,
//! checked on the messages a run actually put on Kafka.
//!
//! The schemas live in `crates/huleedu/contract/` (see its README) and are compiled into
//! the crate, so a check needs no files at run time:
//! - `huleedu/`: HuleEdu's own, exported from its pydantic models (the envelope and one
//!   schema per payload topic, indexed by `topics.json`);
//! - `outpost/`: ours, for the topics HuleEdu has no model for (ELS's hard-coded
//!   `essay.status.events`, `batch.phase.progress.events`, `batch.phase.concluded.events`)
//!   and for dead letters, which are records rather than envelopes.
//!
//! The envelope is checked strictly: HuleEdu's model ignores unknown top-level keys, so its
//! schema allows them, but a strict reader must accept ours too; [`Contract::new`] adds
//! `additionalProperties: false` to a copy of the schema rather than editing the vendored
//! file, which stays byte for byte what HuleEdu exported.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use jsonschema::Validator;
use outpost::testkit::headers_of;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

use crate::events::{topic, Topics};
use crate::pipeline::{Pipeline, CONSUMERS};
use crate::run::RunReport;

/// HuleEdu's envelope schema, as exported.
const ENVELOPE: &str = include_str!("../contract/huleedu/envelope.schema.json");
/// HuleEdu's index: topic → model → schema file.
const HULEEDU_INDEX: &str = include_str!("../contract/huleedu/topics.json");

/// HuleEdu's payload schemas by file name (the index names them).
const HULEEDU_SCHEMAS: [(&str, &str); 12] = [
    (
        "huleedu.batch.essays.registered.v1.schema.json",
        include_str!("../contract/huleedu/huleedu.batch.essays.registered.v1.schema.json"),
    ),
    (
        "huleedu.els.batch.essays.ready.v1.schema.json",
        include_str!("../contract/huleedu/huleedu.els.batch.essays.ready.v1.schema.json"),
    ),
    (
        "huleedu.els.batch.phase.outcome.v1.schema.json",
        include_str!("../contract/huleedu/huleedu.els.batch.phase.outcome.v1.schema.json"),
    ),
    (
        "huleedu.els.essay.slot.assigned.v1.schema.json",
        include_str!("../contract/huleedu/huleedu.els.essay.slot.assigned.v1.schema.json"),
    ),
    (
        "huleedu.els.excess.content.provisioned.v1.schema.json",
        include_str!("../contract/huleedu/huleedu.els.excess.content.provisioned.v1.schema.json"),
    ),
    (
        "huleedu.els.spellcheck.initiate.command.v1.schema.json",
        include_str!("../contract/huleedu/huleedu.els.spellcheck.initiate.command.v1.schema.json"),
    ),
    (
        "huleedu.essay.spellcheck.completed.v1.schema.json",
        include_str!("../contract/huleedu/huleedu.essay.spellcheck.completed.v1.schema.json"),
    ),
    (
        "huleedu.essay.spellcheck.requested.v1.schema.json",
        include_str!("../contract/huleedu/huleedu.essay.spellcheck.requested.v1.schema.json"),
    ),
    (
        "huleedu.file.batch.file.added.v1.schema.json",
        include_str!("../contract/huleedu/huleedu.file.batch.file.added.v1.schema.json"),
    ),
    (
        "huleedu.file.batch.file.removed.v1.schema.json",
        include_str!("../contract/huleedu/huleedu.file.batch.file.removed.v1.schema.json"),
    ),
    (
        "huleedu.file.essay.content.provisioned.v1.schema.json",
        include_str!("../contract/huleedu/huleedu.file.essay.content.provisioned.v1.schema.json"),
    ),
    (
        "huleedu.file.essay.validation.failed.v1.schema.json",
        include_str!("../contract/huleedu/huleedu.file.essay.validation.failed.v1.schema.json"),
    ),
];

/// Our payload schemas, for the topics HuleEdu's index has no model for.
const OUR_SCHEMAS: [(&str, &str); 3] = [
    (
        topic::ESSAY_STATUS,
        include_str!("../contract/outpost/essay.status.events.schema.json"),
    ),
    (
        topic::BATCH_PHASE_PROGRESS,
        include_str!("../contract/outpost/batch.phase.progress.events.schema.json"),
    ),
    (
        topic::BATCH_PHASE_CONCLUDED,
        include_str!("../contract/outpost/batch.phase.concluded.events.schema.json"),
    ),
];

/// Our schema of a dead-letter record (`{key, headers, payload}`).
const DEAD_LETTER: &str = include_str!("../contract/outpost/dead-letter.schema.json");

/// How long the read-back waits, once every expected event was read, for copies still
/// arriving (at-least-once delivery may put an event on Kafka more than once).
const QUIET: Duration = Duration::from_secs(2);

/// The compiled schemas.
#[derive(Debug)]
pub struct Contract {
    envelope: Validator,
    payloads: BTreeMap<&'static str, Validator>,
    dead_letter: Validator,
}

/// One Kafka message as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The topic it was read from (a run's name, suffix included).
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key, when there is one.
    pub key: Option<Vec<u8>>,
    /// Headers (values as lossy UTF-8).
    pub headers: BTreeMap<String, String>,
    /// Payload, when there is one.
    pub payload: Option<Vec<u8>>,
}

/// What a contract check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContractReport {
    /// Messages checked.
    pub checked: usize,
    /// Of those, valid.
    pub valid: usize,
    /// Messages checked, per base topic (dead letters under their run's topic name).
    pub per_topic: BTreeMap<String, usize>,
    /// Each invalid message: where it was and why.
    pub violations: Vec<String>,
    /// Expected events never read back (per base topic), when the read-back timed out.
    pub unread: BTreeMap<String, usize>,
}

impl ContractReport {
    /// Whether every message was valid and every expected event was read back.
    pub fn is_clean(&self) -> bool {
        self.valid == self.checked && self.unread.is_empty()
    }

    /// The checks of several runs as one.
    pub fn merged(reports: &[Self]) -> Self {
        let mut all = Self::default();
        for r in reports {
            all.checked += r.checked;
            all.valid += r.valid;
            all.violations.extend(r.violations.iter().cloned());
            for (topic, n) in &r.per_topic {
                *all.per_topic.entry(topic.clone()).or_default() += n;
            }
            for (topic, n) in &r.unread {
                *all.unread.entry(topic.clone()).or_default() += n;
            }
        }
        all
    }

    /// `contract: N/N messages valid`, the demo's summary line.
    pub fn summary(&self) -> String {
        format!("contract: {}/{} messages valid", self.valid, self.checked)
    }
}

/// What a message on a run's topic is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An envelope whose `data` follows the base topic's payload schema.
    Event(&'static str),
    /// A dead-letter record.
    DeadLetter,
}

fn compile(what: &str, schema: &Value) -> Validator {
    jsonschema::draft202012::options()
        // Formats (uuid, date-time) are annotations only in 2020-12 unless asked for.
        .should_validate_formats(true)
        .build(schema)
        .unwrap_or_else(|e| panic!("the vendored schema {what} does not compile: {e}"))
}

fn parse(what: &str, text: &str) -> Value {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("the vendored schema {what} is not JSON: {e}"))
}

impl Default for Contract {
    fn default() -> Self {
        Self::new()
    }
}

impl Contract {
    /// Compiles the vendored schemas.
    ///
    /// # Panics
    /// When a vendored file is not a valid schema, or HuleEdu's index names a file that is
    /// not vendored: both are build mistakes, caught by any test that checks a message.
    pub fn new() -> Self {
        let mut envelope = parse("envelope", ENVELOPE);
        envelope["additionalProperties"] = Value::Bool(false);
        let files: BTreeMap<&str, &str> = HULEEDU_SCHEMAS.into_iter().collect();
        let index = parse("topics.json", HULEEDU_INDEX);
        let mut payloads = BTreeMap::new();
        for base in topic::ALL {
            if let Some((_, schema)) = OUR_SCHEMAS.iter().find(|(t, _)| *t == base) {
                payloads.insert(base, compile(base, &parse(base, schema)));
                continue;
            }
            let file = index[base]["schema"]
                .as_str()
                .unwrap_or_else(|| panic!("topics.json has no schema for {base}"));
            let text = files
                .get(file)
                .unwrap_or_else(|| panic!("{file} (for {base}) is not vendored"));
            payloads.insert(base, compile(file, &parse(file, text)));
        }
        Self {
            envelope: compile("envelope (strict)", &envelope),
            payloads,
            dead_letter: compile("dead-letter", &parse("dead-letter", DEAD_LETTER)),
        }
    }

    /// The violations of one message read from `base`'s topic; empty when it is valid.
    pub fn check_event(&self, base: &str, payload: Option<&[u8]>) -> Vec<String> {
        let Some(schema) = self.payloads.get(base) else {
            return vec![format!("no schema for topic {base}")];
        };
        let envelope: Value = match payload.map(serde_json::from_slice) {
            None => return vec!["no payload".into()],
            Some(Err(e)) => return vec![format!("payload is not JSON: {e}")],
            Some(Ok(v)) => v,
        };
        let mut errors = describe(&self.envelope, &envelope, "envelope");
        // Our convention (and HuleEdu's): an event's type is its base topic name.
        if envelope["event_type"] != base {
            errors.push(format!(
                "envelope: event_type {} is not the topic {base}",
                envelope["event_type"]
            ));
        }
        errors.extend(describe(schema, &envelope["data"], "data"));
        errors
    }

    /// The violations of one dead-letter record; empty when it is valid.
    pub fn check_dead_letter(&self, record: &Record) -> Vec<String> {
        let payload = record.payload.as_deref().map_or(Value::Null, |p| {
            serde_json::from_slice(p)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(p).into_owned()))
        });
        let view = serde_json::json!({
            "key": record.key.as_deref().map(String::from_utf8_lossy),
            "headers": record.headers,
            "payload": payload,
        });
        describe(&self.dead_letter, &view, "dead letter")
    }

    /// Checks every record, each against what its topic (a run's name) carries.
    pub fn check(&self, topics: &Topics, records: &[Record]) -> ContractReport {
        let kinds = kinds(topics);
        let mut report = ContractReport::default();
        for r in records {
            let (label, errors) = match kinds.get(&r.topic) {
                Some(Kind::Event(base)) => (*base, self.check_event(base, r.payload.as_deref())),
                Some(Kind::DeadLetter) => (r.topic.as_str(), self.check_dead_letter(r)),
                None => (r.topic.as_str(), vec!["not a topic of this run".into()]),
            };
            report.checked += 1;
            *report.per_topic.entry(label.to_owned()).or_default() += 1;
            if errors.is_empty() {
                report.valid += 1;
            } else {
                report.violations.push(format!(
                    "{}[{}]@{}: {}",
                    r.topic,
                    r.partition,
                    r.offset,
                    errors.join("; ")
                ));
            }
        }
        report
    }
}

fn describe(validator: &Validator, instance: &Value, what: &str) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("{what}{}: {e}", e.instance_path()))
        .collect()
}

/// Every topic of a run (its name) with what it carries.
fn kinds(topics: &Topics) -> BTreeMap<String, Kind> {
    let events = topic::ALL.map(|base| (topics.name(base), Kind::Event(base)));
    let dead = CONSUMERS.map(|name| (topics.dead_letter(name), Kind::DeadLetter));
    events.into_iter().chain(dead).collect()
}

/// Reads back every message of every topic of `pipeline`'s run (dead letters included)
/// and checks each against the contract.
///
/// Reading stops once every event `report` expected was read (by event id) and no message
/// arrived for a quiet spell, or at `timeout`; events never read are in
/// [`ContractReport::unread`]. Call it before [`Pipeline::shutdown`], which deletes a run's
/// own topics.
///
/// # Errors
/// [`crate::Error::Kafka`] when the read-back consumer cannot be set up.
pub async fn check_run(
    pipeline: &Pipeline,
    report: &RunReport,
    timeout: Duration,
) -> crate::Result<ContractReport> {
    let topics = &pipeline.config().topics;
    let expected = report
        .expected
        .counts()
        .iter()
        .map(|(base, n)| (topics.name(base), *n))
        .collect();
    let (records, unread) = read_run(pipeline, expected, timeout).await?;
    let mut checked = Contract::new().check(topics, &records);
    let to_base = kinds(topics);
    checked.unread = unread
        .into_iter()
        .map(|(name, n)| match to_base.get(&name) {
            Some(Kind::Event(base)) => ((*base).to_owned(), n),
            _ => (name, n),
        })
        .collect();
    Ok(checked)
}

/// Reads back every message of every topic of `pipeline`'s run, dead letters included,
/// until each topic named in `expected` showed that many distinct event ids and then
/// nothing new came for a quiet spell, or until `timeout`. Returns what was read and, per
/// topic, how many expected events were not.
///
/// # Errors
/// [`crate::Error::Kafka`] when the read-back consumer cannot be set up.
pub async fn read_run(
    pipeline: &Pipeline,
    expected: BTreeMap<String, usize>,
    timeout: Duration,
) -> crate::Result<(Vec<Record>, BTreeMap<String, usize>)> {
    let config = pipeline.config();
    let names: Vec<String> = kinds(&config.topics).into_keys().collect();
    let brokers = config.brokers.clone();
    tokio::task::spawn_blocking(move || read_back(&brokers, &names, &expected, timeout))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// [`read_run`]'s blocking half: one consumer assigned every partition of `names` from the
/// beginning (no group, so no rebalance waits).
fn read_back(
    brokers: &str,
    names: &[String],
    expected: &BTreeMap<String, usize>,
    timeout: Duration,
) -> crate::Result<(Vec<Record>, BTreeMap<String, usize>)> {
    let kafka = |operation: &str| {
        let operation = format!("contract read-back: {operation}");
        move |source| crate::Error::Kafka { operation, source }
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("contract-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()
        .map_err(kafka("create consumer"))?;
    let deadline = Instant::now() + timeout;
    let mut tpl = TopicPartitionList::new();
    for name in names {
        // Partitions as the broker has them now (not as configured): a topic re-created
        // by a restarted broker may have a different count.
        let metadata = consumer
            .fetch_metadata(
                Some(name),
                deadline.saturating_duration_since(Instant::now()),
            )
            .map_err(kafka("fetch metadata"))?;
        for t in metadata.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(name, p.id(), Offset::Beginning)
                    .map_err(kafka("assign"))?;
            }
        }
    }
    consumer.assign(&tpl).map_err(kafka("assign"))?;
    let mut records = Vec::new();
    let mut ids: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    let mut last_new = Instant::now();
    loop {
        let missing: BTreeMap<String, usize> = expected
            .iter()
            .map(|(name, want)| {
                let got = ids.get(name).map_or(0, HashSet::len);
                (name.clone(), want.saturating_sub(got))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        let now = Instant::now();
        if (missing.is_empty() && now >= last_new + QUIET) || now >= deadline {
            return Ok((records, missing));
        }
        // A poll error (a broker connection dropped) is librdkafka's to recover from; the
        // deadline bounds how long that may take.
        let Some(Ok(msg)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let record = Record {
            topic: msg.topic().to_owned(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(<[u8]>::to_vec),
            headers: headers_of(&msg),
            payload: msg.payload().map(<[u8]>::to_vec),
        };
        // The envelope's id, so an event that reached Kafka twice counts once towards
        // what was expected (both copies are checked).
        let event_id = record
            .payload
            .as_deref()
            .and_then(|p| serde_json::from_slice::<Value>(p).ok())
            .and_then(|v| v["event_id"].as_str().map(str::to_owned));
        if let Some(id) = event_id {
            ids.entry(record.topic.clone()).or_default().insert(id);
        }
        records.push(record);
        last_new = Instant::now();
    }
}
