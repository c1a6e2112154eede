//! ELS's content handlers side by side on one batch, against real PostgreSQL and without
//! Kafka: the handlers are called directly, each in a transaction of its own, all at once,
//! so nothing but ELS's own locks orders them (in a pipeline run, the partitions would
//! order those of one upload).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use huleedu::bos::{registration, BatchRequest};
use huleedu::els::{batch_state, EssayLifecycle};
use huleedu::events::{topic, EssayContentProvisionedV1, Topics};
use outpost::{
    Environment, EventEnvelope, KafkaProducer, Mode, OutboxStore, OutboxTable, ProducerConfig,
    Publisher, PublisherConfig, PublishingHandler, Received, WakeSignal, Waker,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

const SLOTS: usize = 24;

/// ELS in a schema of its own, publishing to the outbox only (the test reads the outbox).
async fn els() -> (EssayLifecycle, Publisher) {
    let url = std::env::var("OUTPOST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("els_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let admin = PgPoolOptions::new().connect(&url).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
        .execute(&admin)
        .await
        .unwrap();
    let options = PgConnectOptions::from_str(&url)
        .unwrap()
        .options([("search_path", schema.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(2 * SLOTS + 4).unwrap())
        .connect_with(options)
        .await
        .unwrap();
    let store = OutboxStore::new(pool, OutboxTable::new(&schema).unwrap());
    store.migrate().await.unwrap();
    // Never reached: the outbox-only mode stages and wakes, it does not produce.
    let producer = Arc::new(KafkaProducer::new(ProducerConfig::new("127.0.0.1:1")).unwrap());
    let mut config = PublisherConfig::new("els-test", Environment::Testing);
    config.mode = Mode::OutboxOnly;
    let publisher =
        Publisher::new(store, producer, Waker::Local(WakeSignal::new()), config).unwrap();
    let els = EssayLifecycle::new(publisher.clone(), Topics::huleedu());
    els.migrate().await.unwrap();
    (els, publisher)
}

/// Runs `event` through ELS in a transaction of its own, as the consumer would.
async fn handle<T: serde::Serialize>(
    els: &EssayLifecycle,
    publisher: &Publisher,
    base: &str,
    data: &T,
) -> outpost::Result<()> {
    let envelope = EventEnvelope::new(base, "test", serde_json::to_value(data).unwrap());
    let received = Received {
        group_id: "els-test".into(),
        topic: base.into(),
        partition: 0,
        offset: 0,
        key: None,
        headers: Default::default(),
        payload: Vec::new(),
        event_id: envelope.event_id,
    };
    let mut tx = publisher.begin().await?;
    els.handle(&envelope, &received, &mut tx).await?;
    tx.commit_and_dispatch_later().await
}

fn content(batch_id: &str, upload: usize) -> EssayContentProvisionedV1 {
    EssayContentProvisionedV1 {
        event: "essay.content.provisioned".into(),
        batch_id: batch_id.into(),
        file_upload_id: format!("upload-{upload}"),
        original_file_name: format!("essay_{upload}.txt"),
        raw_file_storage_id: Uuid::new_v4().to_string(),
        text_storage_id: Uuid::new_v4().to_string(),
        file_size_bytes: 100,
        content_md5_hash: None,
        correlation_id: Uuid::new_v4(),
        timestamp: Utc::now(),
    }
}

async fn outbox_count(publisher: &Publisher, event_type: &str) -> i64 {
    let store = publisher.store();
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE event_type = $1",
        store.table()
    ))
    .bind(event_type)
    .fetch_one(store.pool())
    .await
    .unwrap()
}

/// Every upload of a batch announced twice (two events each), all at once, while a
/// transaction that rolls back holds the slots: each upload takes one slot, every slot is
/// filled once, nothing is reported as excess, and the batch is ready exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn content_handlers_of_one_batch_run_side_by_side_and_fill_each_slot_once() {
    let (els, publisher) = els().await;
    let batch_id = Uuid::new_v4().to_string();
    let request = BatchRequest {
        expected_essay_count: u32::try_from(SLOTS).unwrap(),
        course_code: "ENG5".into(),
        essay_instructions: "Write.".into(),
        user_id: "teacher".into(),
    };
    let slots = (0..SLOTS).map(|_| Uuid::new_v4().to_string()).collect();
    let registered = registration(&batch_id, slots, &request);
    handle(
        &els,
        &publisher,
        topic::BATCH_ESSAYS_REGISTERED,
        &registered,
    )
    .await
    .unwrap();

    // A transaction that holds every slot and then rolls back, as handlers that fail
    // would: the announcements must wait for those slots, not report excess content.
    let mut holder = publisher.store().pool().begin().await.unwrap();
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    let held: Vec<String> = sqlx::query_scalar(
        "SELECT essay_id FROM essays WHERE batch_id = $1 ORDER BY slot FOR UPDATE",
    )
    .bind(&batch_id)
    .fetch_all(&mut *holder)
    .await
    .unwrap();
    assert_eq!(held.len(), SLOTS);
    // Every upload announced twice (two events each).
    let announcements: Vec<_> = (0..2 * SLOTS)
        .map(|i| content(&batch_id, i % SLOTS))
        .collect();
    let handlers: Vec<_> = announcements
        .into_iter()
        .map(|c| {
            let (els, publisher) = (els.clone(), publisher.clone());
            tokio::spawn(async move {
                handle(&els, &publisher, topic::ESSAY_CONTENT_PROVISIONED, &c).await
            })
        })
        .collect();
    // The rollback comes once every announcement waits behind the holder (on a held slot,
    // or on one that waits for one), or after 10 s whatever they do.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        let waiting: i64 = sqlx::query_scalar(
            "WITH RECURSIVE behind(pid) AS ( \
                 SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)) \
                 UNION SELECT a.pid FROM pg_stat_activity a JOIN behind b \
                     ON b.pid = ANY(pg_blocking_pids(a.pid))) \
             SELECT count(*) FROM behind",
        )
        .bind(holder_pid)
        .fetch_one(publisher.store().pool())
        .await
        .unwrap();
        if waiting >= 2 * SLOTS as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    holder.rollback().await.unwrap();
    for handler in handlers {
        tokio::time::timeout(Duration::from_secs(60), handler)
            .await
            .expect("handlers finish")
            .unwrap()
            .expect("every announcement is handled");
    }

    let essays = els.essays(&batch_id).await.unwrap();
    let mut uploads: Vec<String> = essays
        .iter()
        .map(|e| e.file_upload_id.clone().expect("every slot filled"))
        .collect();
    uploads.sort();
    uploads.dedup();
    assert_eq!(uploads.len(), SLOTS, "each upload in one slot");
    assert_eq!(
        els.batch_state(&batch_id).await.unwrap().as_deref(),
        Some(batch_state::READY)
    );
    assert_eq!(
        outbox_count(&publisher, topic::ESSAY_SLOT_ASSIGNED).await,
        i64::try_from(SLOTS).unwrap()
    );
    assert_eq!(outbox_count(&publisher, topic::BATCH_ESSAYS_READY).await, 1);
    assert_eq!(
        outbox_count(&publisher, topic::EXCESS_CONTENT_PROVISIONED).await,
        0
    );
}
