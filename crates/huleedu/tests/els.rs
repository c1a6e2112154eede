//! ELS's handlers against real PostgreSQL and without Kafka, called directly: content
//! handlers side by side on one batch, each in a transaction of its own, all at once, so
//! nothing but ELS's own locks orders them (in a pipeline run, the partitions would order
//! those of one upload); and results handled together in one transaction, as a consumer
//! settles a unit of them.

mod support;

use std::time::Duration;

use chrono::Utc;
use huleedu::bos::{registration, BatchRequest};
use huleedu::els::{batch_state, essay_state, Essay, EssayLifecycle};
use huleedu::events::{
    topic, EntityRef, EssayContentProvisionedV1, EssayRef, EssayValidationFailedV1,
    ProcessingStage, SpellcheckCompleted, SpellcheckInitiateCommand, StorageReferenceMetadata,
    SystemProcessingMetadata, Topics, ValidationErrorDetail, CORRECTED_TEXT,
};
use outpost::{Publisher, PublishingHandler};
use uuid::Uuid;

const SLOTS: usize = 24;

/// ELS in a schema of its own, publishing to the outbox only (the test reads the outbox).
async fn els() -> (EssayLifecycle, Publisher) {
    let connections = u32::try_from(2 * SLOTS + 4).unwrap();
    let publisher = support::outbox_only("els", "els-test", connections).await;
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
    let (envelope, received) = support::delivered(base, data);
    let mut tx = publisher.begin().await?;
    els.handle(&envelope, &received, &mut tx).await?;
    tx.commit_and_dispatch_later().await
}

/// Registers a batch of `slots` essays with ELS; returns its id.
async fn register(els: &EssayLifecycle, publisher: &Publisher, slots: usize) -> String {
    let batch_id = Uuid::new_v4().to_string();
    let request = BatchRequest {
        expected_essay_count: u32::try_from(slots).unwrap(),
        course_code: "ENG5".into(),
        essay_instructions: "Write.".into(),
        user_id: "teacher".into(),
    };
    let slots = (0..slots).map(|_| Uuid::new_v4().to_string()).collect();
    let registered = registration(&batch_id, slots, &request);
    handle(els, publisher, topic::BATCH_ESSAYS_REGISTERED, &registered)
        .await
        .unwrap();
    batch_id
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

/// File Service's report that `upload` of `batch_id` failed validation.
fn validation_failed(batch_id: &str, upload: usize) -> EssayValidationFailedV1 {
    EssayValidationFailedV1 {
        event: "essay.validation.failed".into(),
        batch_id: batch_id.into(),
        file_upload_id: format!("upload-{upload}"),
        original_file_name: format!("essay_{upload}.txt"),
        raw_file_storage_id: Uuid::new_v4().to_string(),
        validation_error_code: "EMPTY_CONTENT".into(),
        validation_error_detail: ValidationErrorDetail {
            error_code: "EMPTY_CONTENT".into(),
            message: "empty".into(),
            correlation_id: Uuid::new_v4(),
            timestamp: Utc::now(),
            service: "file_service".into(),
            operation: "validate".into(),
            details: Default::default(),
        },
        file_size_bytes: 0,
        correlation_id: Uuid::new_v4(),
        timestamp: Utc::now(),
    }
}

/// BOS's command to spellcheck `essays` of `batch_id`.
fn initiate(batch_id: &str, essays: &[Essay]) -> SpellcheckInitiateCommand {
    SpellcheckInitiateCommand {
        event_name: "batch.spellcheck.initiate.command".into(),
        entity_ref: EntityRef {
            entity_id: batch_id.into(),
            entity_type: "batch".into(),
            parent_id: None,
        },
        timestamp: Utc::now(),
        essays_to_process: essays
            .iter()
            .map(|e| EssayRef {
                essay_id: e.essay_id.clone(),
                text_storage_id: e.text_storage_id.clone().unwrap(),
            })
            .collect(),
        language: "en".into(),
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
    let batch_id = register(&els, &publisher, SLOTS).await;

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

/// Content placed on a batch state another handler changed meanwhile: the batch was made
/// ready (its last slot's upload failed validation) while this content waited to take the
/// free slot. The handler fails (retriable) instead of filling a slot of a batch already
/// announced ready, and its retry reports the content as excess.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn content_placed_after_its_batch_became_ready_is_retried_as_excess() {
    let (els, publisher) = els().await;
    let batch_id = register(&els, &publisher, 2).await;
    let late = content(&batch_id, 2);
    // The late content's handler stops inside its placement, after it read the state.
    let mut holder = publisher.store().pool().begin().await.unwrap();
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('els.upload:' || $1))")
        .bind(&late.file_upload_id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let (els, publisher, late) = (els.clone(), publisher.clone(), late.clone());
        async move { handle(&els, &publisher, topic::ESSAY_CONTENT_PROVISIONED, &late).await }
    });
    wait_blocked(&publisher, holder_pid).await;
    // Meanwhile the batch fills up: one essay placed, one upload failed.
    handle(
        &els,
        &publisher,
        topic::ESSAY_CONTENT_PROVISIONED,
        &content(&batch_id, 0),
    )
    .await
    .unwrap();
    handle(
        &els,
        &publisher,
        topic::ESSAY_VALIDATION_FAILED,
        &validation_failed(&batch_id, 1),
    )
    .await
    .unwrap();
    assert_eq!(
        els.batch_state(&batch_id).await.unwrap().as_deref(),
        Some(batch_state::READY)
    );
    holder.rollback().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the late handler finishes")
        .unwrap();
    let err = first.expect_err("the late content must not take the slot");
    assert!(err.is_retriable(), "{err}");
    // The consumer's retry.
    handle(&els, &publisher, topic::ESSAY_CONTENT_PROVISIONED, &late)
        .await
        .unwrap();
    let filled = els
        .essays(&batch_id)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.file_upload_id.is_some())
        .count();
    assert_eq!(filled, 1, "the failed upload's slot stays empty");
    assert_eq!(
        outbox_count(&publisher, topic::ESSAY_SLOT_ASSIGNED).await,
        1
    );
    assert_eq!(
        outbox_count(&publisher, topic::EXCESS_CONTENT_PROVISIONED).await,
        1
    );
    assert_eq!(outbox_count(&publisher, topic::BATCH_ESSAYS_READY).await, 1);
}

/// Waits (at most 10 s) until a session waits behind `pid`'s locks.
async fn wait_blocked(publisher: &Publisher, pid: i32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
        )
        .bind(pid)
        .fetch_one(publisher.store().pool())
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing waited behind the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The spellchecker's answer for `essay`: corrected, or (`ok` false) failed.
fn result(batch_id: &str, essay: &Essay, ok: bool) -> SpellcheckCompleted {
    let entity = EntityRef {
        entity_id: essay.essay_id.clone(),
        entity_type: "essay".into(),
        parent_id: Some(batch_id.into()),
    };
    let (status, stage) = if ok {
        (
            essay_state::SPELLCHECKED_SUCCESS,
            ProcessingStage::Completed,
        )
    } else {
        (essay_state::SPELLCHECK_FAILED, ProcessingStage::Failed)
    };
    SpellcheckCompleted {
        event_name: "essay.spellcheck.completed".into(),
        system_metadata: SystemProcessingMetadata::new(
            entity.clone(),
            stage,
            "essay.spellcheck.completed",
        ),
        entity_ref: entity,
        timestamp: Utc::now(),
        status: status.into(),
        original_text_storage_id: essay.text_storage_id.clone().unwrap(),
        storage_metadata: ok
            .then(|| StorageReferenceMetadata::single(CORRECTED_TEXT, Uuid::new_v4().to_string())),
        corrections_made: Some(1),
    }
}

/// Results handled together (one transaction, as a consumer settles a unit of them) count
/// their batch in one statement, yet each result still gets its own progress event with
/// the counts after it, in order; a repeated result counts nothing; the phase concludes
/// once, after the last result.
#[tokio::test]
async fn results_handled_together_announce_each_count_in_order_and_conclude_once() {
    const ESSAYS: usize = 6;
    let (els, publisher) = els().await;
    let batch_id = register(&els, &publisher, ESSAYS).await;
    for upload in 0..ESSAYS {
        let c = content(&batch_id, upload);
        handle(&els, &publisher, topic::ESSAY_CONTENT_PROVISIONED, &c)
            .await
            .unwrap();
    }
    let essays = els.essays(&batch_id).await.unwrap();
    let command = initiate(&batch_id, &essays);
    handle(
        &els,
        &publisher,
        topic::BATCH_SPELLCHECK_INITIATE_COMMAND,
        &command,
    )
    .await
    .unwrap();

    // Two results one at a time, then four together with a repeat of the first among them.
    for essay in &essays[..2] {
        let r = result(&batch_id, essay, true);
        handle(&els, &publisher, topic::ESSAY_SPELLCHECK_COMPLETED, &r)
            .await
            .unwrap();
    }
    let unit: Vec<_> = [
        result(&batch_id, &essays[2], true),
        result(&batch_id, &essays[3], false),
        result(&batch_id, &essays[0], true),
        result(&batch_id, &essays[4], true),
        result(&batch_id, &essays[5], true),
    ]
    .iter()
    .map(|r| support::delivered(topic::ESSAY_SPELLCHECK_COMPLETED, r))
    .collect();
    let unit: Vec<_> = unit.iter().map(|(e, r)| (e.clone(), r)).collect();
    let mut tx = publisher.begin().await.unwrap();
    els.handle_together(&unit, &mut tx).await.unwrap();
    tx.commit_and_dispatch_later().await.unwrap();

    let store = publisher.store();
    let progress: Vec<(u64, u64, u64)> = sqlx::query_scalar::<_, Vec<u8>>(&format!(
        "SELECT p.payload FROM {} e JOIN {} p ON p.id = e.id WHERE e.event_type = $1 \
         ORDER BY e.id",
        store.table(),
        store.table().payloads()
    ))
    .bind(topic::BATCH_PHASE_PROGRESS)
    .fetch_all(store.pool())
    .await
    .unwrap()
    .iter()
    .map(|payload| {
        let envelope: serde_json::Value = serde_json::from_slice(payload).unwrap();
        let data = &envelope["data"];
        let n = |field: &str| data[field].as_u64().unwrap();
        (
            n("completed_count"),
            n("failed_count"),
            n("total_essays_in_phase"),
        )
    })
    .collect();
    let counts: Vec<(u64, u64)> = progress.iter().map(|p| (p.0, p.1)).collect();
    assert_eq!(
        counts,
        [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1), (4, 1), (5, 1)],
        "one progress event per counted result, in order"
    );
    assert!(progress.iter().all(|p| p.2 == ESSAYS as u64));
    assert_eq!(
        outbox_count(&publisher, topic::BATCH_PHASE_CONCLUDED).await,
        1
    );
    assert_eq!(
        els.batch_state(&batch_id).await.unwrap().as_deref(),
        Some(batch_state::SPELLCHECK_COMPLETED)
    );
}

/// Contents handled together count their batch's placements once, at the end: a unit that
/// fills the last slots makes the batch ready (once), a repeated announcement takes no
/// second slot, and content beyond the slots is excess.
#[tokio::test]
async fn contents_handled_together_fill_each_slot_once_and_make_the_batch_ready_once() {
    const ESSAYS: usize = 4;
    let (els, publisher) = els().await;
    let batch_id = register(&els, &publisher, ESSAYS).await;
    let first = content(&batch_id, 0);
    handle(&els, &publisher, topic::ESSAY_CONTENT_PROVISIONED, &first)
        .await
        .unwrap();
    let unit: Vec<_> = [1, 2, 1, 3, 4]
        .into_iter()
        .map(|upload| {
            support::delivered(
                topic::ESSAY_CONTENT_PROVISIONED,
                &content(&batch_id, upload),
            )
        })
        .collect();
    let unit: Vec<_> = unit.iter().map(|(e, r)| (e.clone(), r)).collect();
    let mut tx = publisher.begin().await.unwrap();
    els.handle_together(&unit, &mut tx).await.unwrap();
    tx.commit_and_dispatch_later().await.unwrap();

    let essays = els.essays(&batch_id).await.unwrap();
    let uploads: Vec<String> = essays
        .iter()
        .map(|e| e.file_upload_id.clone().expect("every slot filled"))
        .collect();
    assert_eq!(uploads, ["upload-0", "upload-1", "upload-2", "upload-3"]);
    assert_eq!(
        els.batch_state(&batch_id).await.unwrap().as_deref(),
        Some(batch_state::READY)
    );
    assert_eq!(outbox_count(&publisher, topic::BATCH_ESSAYS_READY).await, 1);
    assert_eq!(
        outbox_count(&publisher, topic::ESSAY_SLOT_ASSIGNED).await,
        4
    );
    assert_eq!(
        outbox_count(&publisher, topic::EXCESS_CONTENT_PROVISIONED).await,
        1,
        "upload-4 found no slot"
    );
}

/// Units of contents for two batches each, on two partitions, in opposite orders: their
/// counts lock the batch rows (to the commit) in one order, so neither waits on the other
/// in a cycle (PostgreSQL would abort one after its deadlock timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn contents_of_two_batches_handled_together_in_opposite_orders_do_not_deadlock() {
    let (els, publisher) = els().await;
    let (a, b) = (
        register(&els, &publisher, 2).await,
        register(&els, &publisher, 2).await,
    );
    // Each count holds its row a moment: long enough for both units to hold one each.
    for ddl in [
        "CREATE FUNCTION linger() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END $$",
        "CREATE TRIGGER linger AFTER UPDATE OF assigned ON batches \
         FOR EACH ROW EXECUTE FUNCTION linger()",
    ] {
        sqlx::query(ddl)
            .execute(publisher.store().pool())
            .await
            .unwrap();
    }
    let units = [[(&a, 0), (&b, 2)], [(&b, 3), (&a, 1)]].map(|unit| {
        unit.map(|(batch, upload)| {
            support::delivered(topic::ESSAY_CONTENT_PROVISIONED, &content(batch, upload))
        })
    });
    let handled = futures::future::join_all(units.iter().map(|unit| async {
        let unit: Vec<_> = unit.iter().map(|(e, r)| (e.clone(), r)).collect();
        let mut tx = publisher.begin().await?;
        els.handle_together(&unit, &mut tx).await?;
        tx.commit_and_dispatch_later().await
    }))
    .await;
    for result in handled {
        result.unwrap();
    }
    for batch in [&a, &b] {
        assert_eq!(
            els.batch_state(batch).await.unwrap().as_deref(),
            Some(batch_state::READY)
        );
    }
}

/// Every upload failed validation: the batch is ready with no essay, and the spellcheck
/// phase, which no result will ever conclude, ends as it starts.
#[tokio::test]
async fn a_batch_with_no_valid_essay_concludes_its_phase_at_once() {
    let (els, publisher) = els().await;
    let batch_id = register(&els, &publisher, 2).await;
    for upload in 0..2 {
        handle(
            &els,
            &publisher,
            topic::ESSAY_VALIDATION_FAILED,
            &validation_failed(&batch_id, upload),
        )
        .await
        .unwrap();
    }
    assert_eq!(
        els.batch_state(&batch_id).await.unwrap().as_deref(),
        Some(batch_state::READY)
    );
    let command = initiate(&batch_id, &[]);
    handle(
        &els,
        &publisher,
        topic::BATCH_SPELLCHECK_INITIATE_COMMAND,
        &command,
    )
    .await
    .unwrap();
    assert_eq!(
        els.batch_state(&batch_id).await.unwrap().as_deref(),
        Some(batch_state::SPELLCHECK_COMPLETED)
    );
    assert_eq!(
        outbox_count(&publisher, topic::ELS_BATCH_PHASE_OUTCOME).await,
        1
    );
    let status: String = sqlx::query_scalar(&format!(
        "SELECT convert_from(p.payload, 'UTF8')::jsonb #>> '{{data,phase_status}}' \
         FROM {} e JOIN {} p USING (id) WHERE e.event_type = $1",
        publisher.store().table(),
        publisher.store().table().payloads()
    ))
    .bind(topic::ELS_BATCH_PHASE_OUTCOME)
    .fetch_one(publisher.store().pool())
    .await
    .unwrap();
    assert_eq!(status, "completed_with_failures");
}
