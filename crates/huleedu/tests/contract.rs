//! HuleEdu's wire contract, on real services: every message a pipeline run puts on Kafka
//! is read back and validated against HuleEdu's JSON Schemas (ours for the topics HuleEdu
//! has no model for, and for dead letters): a run in the instant mode (eager produces,
//! the File Service's Kafka-first direct sends) and one in the relay-only baseline (every
//! event through an outbox and its relay). Then the checks are shown to bite: a removed
//! field, a made-up enum value, an extra envelope key and a poison message are rejected,
//! and the poison's dead letter follows our dead-letter schema.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use huleedu::contract::{self, Contract, ContractReport, Record};
use huleedu::corpus::{self, CORPUS_DIR};
use huleedu::events::topic;
use huleedu::{Pipeline, PipelineConfig, RunMode, RunReport};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

/// How long any single wait in this test may take.
const WAIT: Duration = Duration::from_secs(60);

fn config(mode: RunMode) -> PipelineConfig {
    let env_or = |name: &str, default: &str| std::env::var(name).unwrap_or(default.to_owned());
    let mut config = PipelineConfig::new(mode);
    config.database_url = env_or(
        "OUTPOST_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    config.redis_url = env_or("OUTPOST_REDIS_URL", "redis://127.0.0.1:6379");
    config.brokers = env_or("OUTPOST_BROKERS", "127.0.0.1:9092");
    // The baseline polls its outboxes; a short interval keeps the run short, and every
    // event still goes through an outbox and a relay.
    config.poll_interval = Duration::from_millis(200);
    config.timeout = Duration::from_secs(90);
    config
}

/// Runs a 25-essay batch and checks every message of the run; the pipeline is left
/// running (its topics exist until shutdown).
async fn run_and_check(mode: RunMode) -> (Pipeline, RunReport, ContractReport) {
    let pipeline = Pipeline::start(config(mode)).await.unwrap();
    let files = corpus::load(Path::new(CORPUS_DIR), 25).unwrap();
    let label = mode.as_str();
    let say =
        move |t: Duration, line: &str| eprintln!("[{label} {:6.2} s] {line}", t.as_secs_f64());
    let report = pipeline.run_batch(&files, None, &say).await.unwrap();
    assert_eq!(report.lost, 0, "{label}: events never consumed");
    let checked = contract::check_run(&pipeline, &report, WAIT).await.unwrap();
    eprintln!("{label}: {}", checked.summary());
    assert!(
        checked.violations.is_empty(),
        "{label}: {} invalid messages:\n{}",
        checked.violations.len(),
        checked.violations.join("\n")
    );
    assert!(
        checked.unread.is_empty(),
        "{label}: not read back {:?}",
        checked.unread
    );
    assert_eq!(checked.valid, checked.checked);
    // Every expected event was read back (duplicates may add copies), on every topic.
    for (base, n) in report.expected.counts() {
        let read = checked.per_topic.get(*base).copied().unwrap_or(0);
        assert!(
            read >= *n,
            "{label}: {read} of {n} messages checked on {base}"
        );
    }
    assert!(checked.checked >= report.expected.total());
    (pipeline, report, checked)
}

/// The first record read from `base`'s topic, as JSON.
fn first(records: &[Record], name: &str) -> Value {
    let r = records
        .iter()
        .find(|r| r.topic == name)
        .unwrap_or_else(|| panic!("no message on {name}"));
    serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap()
}

fn violations(contract: &Contract, base: &str, envelope: &Value) -> Vec<String> {
    contract.check_event(base, Some(&serde_json::to_vec(envelope).unwrap()))
}

/// Mutations of valid messages the checks must reject, each with a word of the reason.
fn assert_mutations_rejected(pipeline: &Pipeline, records: &[Record]) {
    let contract = Contract::new();
    let topics = &pipeline.config().topics;
    let requested = first(records, &topics.name(topic::ESSAY_SPELLCHECK_REQUESTED));
    assert!(violations(&contract, topic::ESSAY_SPELLCHECK_REQUESTED, &requested).is_empty());
    type Mutation = fn(&mut Value);
    let mutations: [(&str, &str, Value, Mutation); 5] = [
        (
            "a required payload field removed",
            topic::ESSAY_SPELLCHECK_REQUESTED,
            requested.clone(),
            |e| {
                e["data"].as_object_mut().unwrap().remove("system_metadata");
            },
        ),
        (
            "a made-up processing stage",
            topic::ESSAY_SPELLCHECK_REQUESTED,
            requested.clone(),
            |e| e["data"]["system_metadata"]["processing_stage"] = json!("content_ready"),
        ),
        (
            "an envelope key HuleEdu's model does not have",
            topic::ESSAY_SPELLCHECK_REQUESTED,
            requested,
            |e| e["partition_key"] = json!("essay-1"),
        ),
        (
            "a made-up essay status on our own topic",
            topic::ESSAY_STATUS,
            first(records, &topics.name(topic::ESSAY_STATUS)),
            |e| e["data"]["status"] = json!("spellchecked_failed"),
        ),
        (
            "an event id that is not a uuid",
            topic::BATCH_ESSAYS_READY,
            first(records, &topics.name(topic::BATCH_ESSAYS_READY)),
            |e| e["event_id"] = json!("event-1"),
        ),
    ];
    for (what, base, mut envelope, mutate) in mutations {
        mutate(&mut envelope);
        let found = violations(&contract, base, &envelope);
        assert!(!found.is_empty(), "{what}: accepted");
        eprintln!("{what}: {}", found.join("; "));
    }
}

/// A message ELS cannot decode is dead-lettered; the dead letter follows our schema while
/// the poison itself breaks HuleEdu's.
async fn assert_dead_letters_follow_the_contract(pipeline: &Pipeline) {
    let topics = &pipeline.config().topics;
    let source = topics.name(topic::ESSAY_SPELLCHECK_COMPLETED);
    let event_id = uuid::Uuid::new_v4();
    let poison = json!({
        "event_id": event_id,
        "event_type": topic::ESSAY_SPELLCHECK_COMPLETED,
        "event_timestamp": "2025-01-01T00:00:00Z",
        "source_service": "contract-test",
        "schema_version": 1,
        "correlation_id": uuid::Uuid::new_v4(),
        "data": {"event_name": "essay.spellcheck.completed"},
    });
    let bytes = serde_json::to_vec(&poison).unwrap();
    let contract = Contract::new();
    assert!(!contract
        .check_event(topic::ESSAY_SPELLCHECK_COMPLETED, Some(&bytes))
        .is_empty());
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &pipeline.config().brokers)
        .create()
        .unwrap();
    let id = event_id.to_string();
    let record = FutureRecord::to(&source)
        .key("poison")
        .payload(&bytes)
        .headers(
            rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "event_id",
                value: Some(&id),
            }),
        );
    producer.send(record, WAIT).await.unwrap();

    let dead_letters = topics.dead_letter("els");
    let expected = BTreeMap::from([(dead_letters.clone(), 1)]);
    let (records, unread) = contract::read_run(pipeline, expected, WAIT).await.unwrap();
    assert!(
        unread.is_empty(),
        "no dead letter for the poison: {unread:?}"
    );
    let dead: Vec<Record> = records
        .into_iter()
        .filter(|r| r.topic.contains(".dead-letter."))
        .collect();
    let checked = contract.check(topics, &dead);
    assert!(checked.checked >= 1);
    assert!(checked.violations.is_empty(), "{:#?}", checked.violations);
    let dl = dead.iter().find(|r| r.topic == dead_letters).unwrap();
    assert_eq!(dl.headers.get("dlq_source_topic"), Some(&source));
    // A dead letter without its reason is rejected.
    let mut stripped = dl.clone();
    stripped.headers.remove("dlq_reason");
    assert!(!contract.check_dead_letter(&stripped).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_message_a_run_puts_on_kafka_follows_the_wire_contract() {
    let (instant, report, _) = run_and_check(RunMode::Instant).await;
    assert!(
        report.paths.eager_hits.unwrap_or(0) > 0,
        "the instant run produced transactional events right after their commit"
    );
    let (records, _) = contract::read_run(&instant, BTreeMap::new(), WAIT)
        .await
        .unwrap();
    assert_mutations_rejected(&instant, &records);
    assert_dead_letters_follow_the_contract(&instant).await;
    instant.shutdown().await.unwrap();

    let (baseline, report, _) = run_and_check(RunMode::Baseline).await;
    assert!(
        report.paths.relay_deliveries.unwrap_or(0) > 0,
        "the baseline delivered through its relays"
    );
    baseline.shutdown().await.unwrap();
}

/// The least a schema allows: only its required properties, null where null is allowed, one
/// item per array (so the items' types are decoded too), the first value of an enum.
fn least(schema: &Value, defs: &Value) -> Value {
    if let Some(name) = schema.get("$ref").and_then(Value::as_str) {
        return least(&defs[name.trim_start_matches("#/$defs/")], defs);
    }
    if let Some(options) = schema.get("anyOf").and_then(Value::as_array) {
        if options.iter().any(|o| o["type"] == "null") {
            return Value::Null;
        }
        return least(&options[0], defs);
    }
    if let Some(value) = schema.get("const") {
        return value.clone();
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        return values[0].clone();
    }
    match schema["type"].as_str() {
        Some("object") => Value::Object(
            schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|name| (name.to_owned(), least(&schema["properties"][name], defs)))
                .collect(),
        ),
        Some("array") => json!([least(&schema["items"], defs)]),
        Some("string") => match schema["format"].as_str() {
            Some("date-time") => json!("2026-12-07T12:00:00Z"),
            Some("uuid") => json!("8f14e45f-ceea-467f-a0e6-3a2c1f0b6d21"),
            _ => json!("x"),
        },
        Some("integer" | "number") => schema.get("minimum").cloned().unwrap_or(json!(0)),
        Some("boolean") => json!(false),
        _ => Value::Null,
    }
}

/// What HuleEdu's schemas allow, the services accept: a payload with only the required
/// fields (null where allowed) decodes into each model a service reads. Stricter models
/// dead-lettered valid events, and a batch waiting for one never concluded (a spellcheck
/// result with `corrections_made: null`).
#[test]
fn the_least_payload_each_schema_allows_decodes() {
    use huleedu::events::*;
    fn decodes<T: serde::de::DeserializeOwned>(v: Value) -> Result<(), String> {
        serde_json::from_value::<T>(v)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    type Decode = fn(Value) -> Result<(), String>;
    let models: [(&str, Decode); 12] = [
        ("batch.essays.registered", decodes::<BatchEssaysRegistered>),
        ("els.batch.essays.ready", decodes::<BatchEssaysReady>),
        ("els.batch.phase.outcome", decodes::<ElsBatchPhaseOutcomeV1>),
        ("els.essay.slot.assigned", decodes::<EssaySlotAssignedV1>),
        (
            "els.excess.content.provisioned",
            decodes::<ExcessContentProvisionedV1>,
        ),
        (
            "els.spellcheck.initiate.command",
            decodes::<SpellcheckInitiateCommand>,
        ),
        ("essay.spellcheck.completed", decodes::<SpellcheckCompleted>),
        ("essay.spellcheck.requested", decodes::<SpellcheckRequested>),
        ("file.batch.file.added", decodes::<BatchFileChangedV1>),
        ("file.batch.file.removed", decodes::<BatchFileChangedV1>),
        (
            "file.essay.content.provisioned",
            decodes::<EssayContentProvisionedV1>,
        ),
        (
            "file.essay.validation.failed",
            decodes::<EssayValidationFailedV1>,
        ),
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("contract/huleedu");
    let mut refused = Vec::new();
    for (name, decode) in models {
        let file = dir.join(format!("huleedu.{name}.v1.schema.json"));
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let payload = least(&schema, &schema["$defs"]);
        let validator = jsonschema::validator_for(&schema).unwrap();
        assert!(
            validator.is_valid(&payload),
            "{name}: not the schema's: {payload}"
        );
        if let Err(e) = decode(payload.clone()) {
            refused.push(format!("{name}: {e} in {payload}"));
        }
    }
    assert!(refused.is_empty(), "{refused:#?}");
}
