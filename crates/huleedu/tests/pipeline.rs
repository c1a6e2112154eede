//! The HuleEdu batch pipeline end to end against real PostgreSQL, Redis and tansu: 25
//! essays (2 of them invalid) through every phase, then redelivered duplicates that must
//! change nothing; the same batch with the broker paused mid-pipeline; and content beyond
//! a batch's slots, reported as excess.
//!
//! Each run has its own topics (a suffix), schemas, consumer groups and wake-up keys, so
//! the tests run concurrently with each other and with the rest of the suite.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use huleedu::bos::BatchRequest;
use huleedu::corpus::{self, CORPUS_DIR};
use huleedu::els::{batch_state, essay_state};
use huleedu::events::topic;
use huleedu::file_service::{UploadContext, CONTENT_TOO_SHORT, EMPTY_CONTENT};
use huleedu::{contract, Outage, Pipeline, PipelineConfig, RunMode, RunReport};
use outpost::testkit::TansuBroker;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

/// How long any single wait in these tests may take.
const WAIT: Duration = Duration::from_secs(30);

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn config(brokers: &str) -> PipelineConfig {
    if let Ok(filter) = std::env::var("OUTPOST_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let mut config = PipelineConfig::new(RunMode::Instant);
    config.database_url = env_or(
        "OUTPOST_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    config.redis_url = env_or("OUTPOST_REDIS_URL", "redis://127.0.0.1:6379");
    config.brokers = brokers.to_owned();
    config.timeout = Duration::from_secs(60);
    config
}

fn progress(run: &'static str) -> impl Fn(Duration, &str) + Sync {
    move |t, line| eprintln!("[{run} {:6.2} s] {line}", t.as_secs_f64())
}

fn essays() -> Vec<corpus::CorpusFile> {
    corpus::load(Path::new(CORPUS_DIR), 25).expect("the shipped corpus")
}

/// Registers a batch of `essays` essays (course ENG5) for `user`: the registration and the
/// context its uploads carry.
async fn register(
    pipeline: &Pipeline,
    essays: u32,
    instructions: &str,
    user: &str,
) -> (huleedu::bos::Registration, UploadContext) {
    let request = BatchRequest {
        expected_essay_count: essays,
        course_code: "ENG5".into(),
        essay_instructions: instructions.into(),
        user_id: user.into(),
    };
    let registration = pipeline.bos().register_batch(&request).await.unwrap();
    let ctx = UploadContext {
        batch_id: registration.batch_id.clone(),
        user_id: request.user_id.clone(),
        correlation_id: registration.correlation_id,
    };
    (registration, ctx)
}

/// Everything a run changed, to compare before and after redeliveries.
#[derive(Debug, PartialEq)]
struct Effects {
    bos_transitions: Vec<(Option<String>, String)>,
    els_transitions: usize,
    spellcheck_results: usize,
    observed: (i64, i64),
    inbox_rows: BTreeMap<&'static str, i64>,
    outbox_rows: BTreeMap<&'static str, i64>,
}

async fn effects(pipeline: &Pipeline, batch_id: &str) -> Effects {
    let mut inbox_rows = BTreeMap::new();
    for (name, inbox) in pipeline.inboxes() {
        let sql = format!("SELECT count(*) FROM {}", inbox.table());
        let n: i64 = sqlx::query_scalar(&sql)
            .fetch_one(inbox.pool())
            .await
            .unwrap();
        inbox_rows.insert(name, n);
    }
    let mut outbox_rows = BTreeMap::new();
    for (name, store) in pipeline.outboxes() {
        let sql = format!("SELECT count(*) FROM {}", store.table());
        let n: i64 = sqlx::query_scalar(&sql)
            .fetch_one(store.pool())
            .await
            .unwrap();
        outbox_rows.insert(name, n);
    }
    Effects {
        bos_transitions: pipeline.bos().transitions(batch_id).await.unwrap(),
        els_transitions: pipeline.els().transitions().await.unwrap().len(),
        spellcheck_results: pipeline.spellchecker().results().await.unwrap().len(),
        observed: pipeline.observer().recorded().await.unwrap(),
        inbox_rows,
        outbox_rows,
    }
}

/// The acceptance checks: every expected event reached its consumer, each business effect
/// happened once, the batch and its essays ended in the right states, no outbox row is
/// left pending.
async fn assert_every_phase_happened_once(pipeline: &Pipeline, report: &RunReport) {
    let timeline = pipeline.timeline();
    assert_eq!((report.valid, report.invalid), (23, 2));
    assert_eq!(
        report.lost, 0,
        "events never consumed: {:?}",
        report.missing
    );
    let per_topic = [
        (topic::BATCH_ESSAYS_REGISTERED, 1),
        (topic::BATCH_FILE_ADDED, 26),
        (topic::BATCH_FILE_REMOVED, 1),
        (topic::ESSAY_CONTENT_PROVISIONED, 23),
        (topic::ESSAY_VALIDATION_FAILED, 2),
        (topic::ESSAY_SLOT_ASSIGNED, 23),
        (topic::EXCESS_CONTENT_PROVISIONED, 0),
        (topic::ESSAY_STATUS, 69),
        (topic::BATCH_ESSAYS_READY, 1),
        (topic::BATCH_SPELLCHECK_INITIATE_COMMAND, 1),
        (topic::ESSAY_SPELLCHECK_REQUESTED, 23),
        (topic::ESSAY_SPELLCHECK_COMPLETED, 23),
        (topic::BATCH_PHASE_PROGRESS, 24),
        (topic::ELS_BATCH_PHASE_OUTCOME, 1),
        (topic::BATCH_PHASE_CONCLUDED, 1),
    ];
    for (topic, n) in per_topic {
        assert_eq!(timeline.count(topic), n, "events consumed on {topic}");
        assert_eq!(report.expected.get(topic), n, "events expected on {topic}");
    }
    assert_eq!(report.consumed, 219);
    assert_eq!(report.duplicates_applied, 0);
    assert!(report.total.is_some(), "BOS never completed the batch");

    // No outbox row left behind, none parked.
    assert_eq!(report.pending_outbox_rows, 0);
    for (name, store) in pipeline.outboxes() {
        assert!(
            store.dead(10).await.unwrap().is_empty(),
            "{name}: parked rows"
        );
    }

    // BOS: registered, spellcheck started, completed; each once.
    let batch = &report.batch_id;
    assert_eq!(report.batch_state.as_deref(), Some("completed"));
    let steps: Vec<(Option<&str>, &str)> = [
        (None, "awaiting_content"),
        (Some("awaiting_content"), "spellcheck_in_progress"),
        (Some("spellcheck_in_progress"), "completed"),
    ]
    .into();
    let transitions = pipeline.bos().transitions(batch).await.unwrap();
    let transitions: Vec<(Option<&str>, &str)> = transitions
        .iter()
        .map(|(from, to)| (from.as_deref(), to.as_str()))
        .collect();
    assert_eq!(transitions, steps);

    // File Service: each file's outcome logged against it, the withdrawn one removed.
    let uploads = pipeline.file_service().uploads(batch).await.unwrap();
    let state = |s: &str| uploads.iter().filter(|u| u.state == s).count();
    assert_eq!(
        (
            state("provisioned"),
            state("validation_failed"),
            state("removed")
        ),
        (23, 2, 1)
    );
    for upload in &uploads {
        let provisioned = upload.state == "provisioned";
        assert_eq!(upload.text_storage_id.is_some(), provisioned, "{upload:?}");
        assert_eq!(
            upload.validation_error_code.is_some(),
            upload.state == "validation_failed",
            "{upload:?}"
        );
    }
    let mut rejected: Vec<&str> = uploads
        .iter()
        .filter_map(|u| u.validation_error_code.as_deref())
        .collect();
    rejected.sort_unstable();
    assert_eq!(rejected, [CONTENT_TOO_SHORT, EMPTY_CONTENT]);

    // ELS: 23 essays checked, 2 slots never filled, 2 validation failures.
    assert_eq!(
        pipeline.els().batch_state(batch).await.unwrap().as_deref(),
        Some(batch_state::SPELLCHECK_COMPLETED)
    );
    let essays = pipeline.els().essays(batch).await.unwrap();
    assert_eq!(essays.len(), 25);
    let checked: Vec<_> = essays
        .iter()
        .filter(|e| e.state == essay_state::SPELLCHECKED_SUCCESS)
        .collect();
    assert_eq!(checked.len(), 23);
    assert!(checked
        .iter()
        .all(|e| e.corrected_text_storage_id.is_some() && e.file_upload_id.is_some()));
    let empty: Vec<_> = essays
        .iter()
        .filter(|e| e.state == essay_state::AWAITING_CONTENT)
        .collect();
    assert_eq!(empty.len(), 2);
    assert!(empty.iter().all(|e| e.file_upload_id.is_none()));
    let failures = pipeline.els().validation_failures(batch).await.unwrap();
    let codes: Vec<&str> = failures.iter().map(|(_, code)| code.as_str()).collect();
    assert_eq!(codes, [CONTENT_TOO_SHORT, EMPTY_CONTENT]);
    // Each essay change exactly once: 25 slots created, 23 × 3 steps.
    let changes = pipeline.els().transitions().await.unwrap();
    assert_eq!(changes.len(), 25 + 23 * 3);
    let distinct: HashSet<(&str, &str)> = changes
        .iter()
        .map(|(essay, _, to)| (essay.as_str(), to.as_str()))
        .collect();
    assert_eq!(
        distinct.len(),
        changes.len(),
        "an essay change applied twice"
    );

    // Spellchecker: each essay checked once, with typos found.
    let results = pipeline.spellchecker().results().await.unwrap();
    assert_eq!(results.len(), 23);
    let essays_checked: HashSet<&str> = results.iter().map(|r| r.essay_id.as_str()).collect();
    assert_eq!(essays_checked.len(), 23);
    assert!(results
        .iter()
        .all(|r| r.status == essay_state::SPELLCHECKED_SUCCESS));
    assert!(results.iter().map(|r| r.corrections).sum::<i32>() > 0);

    // The observer recorded each of its 144 events once.
    assert_eq!(pipeline.observer().recorded().await.unwrap(), (144, 144));

    // Each inbox holds one row per event its service handled.
    let hops = timeline.hops();
    for (name, inbox) in pipeline.inboxes() {
        let sql = format!("SELECT count(*) FROM {}", inbox.table());
        let rows: i64 = sqlx::query_scalar(&sql)
            .fetch_one(inbox.pool())
            .await
            .unwrap();
        let handled = hops.iter().filter(|h| h.consumer == name).count();
        assert_eq!(rows, i64::try_from(handled).unwrap(), "{name} inbox rows");
    }
}

/// Reads the first `n` messages of `topic` (all partitions, from the beginning).
async fn read_back(brokers: &str, topic: String, partitions: i32, n: usize) -> Vec<OwnedMessage> {
    let brokers = brokers.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("read-back-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + WAIT;
        let mut messages = Vec::new();
        while messages.len() < n {
            assert!(
                Instant::now() < deadline,
                "{topic}: only {} of {n} messages",
                messages.len()
            );
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                messages.push(m.detach());
            }
        }
        messages
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_of_25_essays_goes_through_every_phase_once() {
    let brokers = env_or("OUTPOST_BROKERS", "127.0.0.1:9092");
    let pipeline = Pipeline::start(config(&brokers)).await.unwrap();
    let report = pipeline
        .run_batch(&essays(), None, &progress("instant"))
        .await
        .unwrap();
    eprintln!(
        "instant: total {:?}, {} events, started in {:?}",
        report.total,
        report.consumed,
        pipeline.started_in()
    );
    assert_every_phase_happened_once(&pipeline, &report).await;

    // Redeliveries: the same bytes (same event id) again, to every consumer.
    let before = effects(&pipeline, &report.batch_id).await;
    let skipped_before = pipeline.timeline().duplicates_skipped();
    let redeliver = [
        (topic::BATCH_ESSAYS_REGISTERED, 1),
        (topic::ESSAY_CONTENT_PROVISIONED, 3),
        (topic::ESSAY_VALIDATION_FAILED, 1),
        (topic::BATCH_ESSAYS_READY, 1),
        (topic::BATCH_SPELLCHECK_INITIATE_COMMAND, 1),
        (topic::ESSAY_SPELLCHECK_REQUESTED, 3),
        (topic::ESSAY_SPELLCHECK_COMPLETED, 3),
        (topic::ELS_BATCH_PHASE_OUTCOME, 1),
        (topic::ESSAY_STATUS, 2),
        (topic::BATCH_FILE_ADDED, 2),
    ];
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let mut injected = 0;
    for (base, n) in redeliver {
        let name = pipeline.config().topics.name(base);
        for m in read_back(&brokers, name.clone(), pipeline.config().partitions, n).await {
            let mut record = FutureRecord::to(&name)
                .partition(m.partition())
                .payload(m.payload().unwrap());
            if let Some(key) = m.key() {
                record = record.key(key);
            }
            if let Some(headers) = m.headers() {
                record = record.headers(headers.clone());
            }
            producer.send(record, WAIT).await.unwrap();
            injected += 1;
        }
    }
    pipeline
        .timeline()
        .wait_until(WAIT, "every redelivery recognised as a duplicate", |t| {
            t.duplicates_skipped() >= skipped_before + injected
        })
        .await
        .unwrap();
    assert_eq!(
        pipeline.timeline().duplicates_skipped(),
        skipped_before + injected
    );
    assert_eq!(pipeline.timeline().duplicates_applied(), 0);
    assert_eq!(
        effects(&pipeline, &report.batch_id).await,
        before,
        "a duplicate changed something"
    );
    pipeline.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_paused_mid_pipeline_loses_nothing() {
    let broker = TansuBroker::start().await.expect("a private tansu broker");
    let pipeline = Pipeline::start(config(&broker.brokers())).await.unwrap();
    let outage = Outage {
        broker: &broker,
        after_files: 12,
        pause_for: Duration::from_secs(5),
    };
    let report = pipeline
        .run_batch(&essays(), Some(outage), &progress("outage"))
        .await
        .unwrap();
    eprintln!(
        "outage: total {:?}, paths {:?}, skipped duplicates {}",
        report.total, report.paths, report.duplicates_skipped
    );
    let window = report.outage.expect("the broker was paused");
    assert!(window.resumed_at - window.paused_at >= Duration::from_secs(5));
    assert!(
        report.paths.kafka_first_fallbacks > 0,
        "the File Service published during the pause, so some events took its outbox"
    );
    assert_every_phase_happened_once(&pipeline, &report).await;
    // What took the File Service's outbox and the relays follows the contract too.
    let checked = huleedu::contract::check_run(&pipeline, &report, WAIT)
        .await
        .unwrap();
    assert!(checked.is_clean(), "{checked:#?}");
    assert!(checked.checked >= report.expected.total());
    pipeline.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn content_beyond_the_slots_is_reported_as_excess() {
    let brokers = env_or("OUTPOST_BROKERS", "127.0.0.1:9092");
    let pipeline = Pipeline::start(config(&brokers)).await.unwrap();
    let (registration, ctx) = register(&pipeline, 2, "Two essays only.", "teacher-2").await;
    // Three valid essays for two slots: the third arrives after the batch is ready.
    for file in &essays()[..3] {
        let upload = pipeline
            .file_service()
            .add_file(&ctx, &file.name, &file.bytes)
            .await
            .unwrap();
        pipeline
            .file_service()
            .process_file(&ctx, &upload, &file.bytes)
            .await
            .unwrap();
    }
    let timeline = pipeline.timeline();
    timeline
        .wait_until(
            WAIT,
            "excess content reported and the batch completed",
            |t| {
                t.count(topic::EXCESS_CONTENT_PROVISIONED) == 1
                    && t.count(topic::ELS_BATCH_PHASE_OUTCOME) == 1
            },
        )
        .await
        .unwrap();
    assert_eq!(timeline.count(topic::ESSAY_SLOT_ASSIGNED), 2);
    let batch = &registration.batch_id;
    assert_eq!(
        pipeline.bos().batch_state(batch).await.unwrap().as_deref(),
        Some("completed")
    );
    let essays = pipeline.els().essays(batch).await.unwrap();
    assert!(essays
        .iter()
        .all(|e| e.state == essay_state::SPELLCHECKED_SUCCESS));
    pipeline.shutdown().await.unwrap();
}

/// A file the teacher withdrew before it was processed stays removed: processing it after
/// all announces no content for it (which would take a slot of the batch). A removal asked
/// again (a retry after a failed announcement) is announced again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_removed_before_it_was_processed_announces_no_content() {
    let brokers = env_or("OUTPOST_BROKERS", "127.0.0.1:9092");
    let pipeline = Pipeline::start(config(&brokers)).await.unwrap();
    let (registration, ctx) = register(&pipeline, 2, "One withdrawn.", "teacher-3").await;
    let files = essays();
    let service = pipeline.file_service();
    let withdrawn = service
        .add_file(&ctx, &files[0].name, &files[0].bytes)
        .await
        .unwrap();
    assert!(service.remove_file(&ctx, &withdrawn).await.unwrap());
    assert!(service.remove_file(&ctx, &withdrawn).await.unwrap());
    service
        .process_file(&ctx, &withdrawn, &files[0].bytes)
        .await
        .unwrap();
    let kept = service
        .add_file(&ctx, &files[1].name, &files[1].bytes)
        .await
        .unwrap();
    service
        .process_file(&ctx, &kept, &files[1].bytes)
        .await
        .unwrap();
    let timeline = pipeline.timeline();
    timeline
        .wait_until(WAIT, "the kept file's content announced", |t| {
            t.count(topic::ESSAY_CONTENT_PROVISIONED) >= 1
        })
        .await
        .unwrap();
    // Content is keyed by upload: the withdrawn file's, had it been announced, could come
    // after the kept one's. Everything the run's topics hold is read back until quiet.
    let topics = &pipeline.config().topics;
    let (content, removed) = (
        topics.name(topic::ESSAY_CONTENT_PROVISIONED),
        topics.name(topic::BATCH_FILE_REMOVED),
    );
    let (records, unread) = contract::read_run(
        &pipeline,
        BTreeMap::from([(content.clone(), 1), (removed.clone(), 2)]),
        WAIT,
    )
    .await
    .unwrap();
    assert!(unread.values().all(|n| *n == 0), "{unread:?}");
    let announced = |name: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r.topic == name)
            .map(|r| {
                let body: serde_json::Value =
                    serde_json::from_slice(r.payload.as_deref().unwrap_or_default()).unwrap();
                body["data"]["file_upload_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(
        announced(&content),
        std::slice::from_ref(&kept.file_upload_id)
    );
    assert_eq!(
        announced(&removed),
        [
            withdrawn.file_upload_id.clone(),
            withdrawn.file_upload_id.clone()
        ]
    );
    let states: Vec<(String, String)> = service
        .uploads(&registration.batch_id)
        .await
        .unwrap()
        .into_iter()
        .map(|u| (u.filename, u.state))
        .collect();
    assert!(
        states.contains(&(files[0].name.clone(), "removed".into())),
        "{states:?}"
    );
    assert!(
        states.contains(&(files[1].name.clone(), "provisioned".into())),
        "{states:?}"
    );
    pipeline.shutdown().await.unwrap();
}
