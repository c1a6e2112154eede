//! The Essay Lifecycle Service (ELS): owns the essay slots of each batch and every essay's
//! state. It assigns provisioned content to free slots, tells BOS when a batch is ready,
//! fans the spellcheck phase out into one request per essay, and aggregates the results
//! into the phase outcome. Each handler's state changes commit together with the events
//! they cause (transactional mode); HuleEdu's seven publishing methods are kept as methods
//! that stage into the handler's transaction.
//!
//! Essay states: `awaiting_content` → `ready_for_processing` → `awaiting_spellcheck` →
//! `spellchecked_success` (or `spellcheck_failed`); every change is appended to
//! `essay_transitions` with the event that caused it. Batch states: `awaiting_content` →
//! `ready` → `spellcheck_in_progress` → `spellcheck_completed`.
//!
//! Nothing depends on the order events arrive in across topics: content or a validation
//! failure that arrives before its batch's registration is kept and applied when the
//! registration comes, and results are aggregated under the batch's row lock. Events with
//! the same meaning (not redeliveries, which the inbox stops) change nothing the second
//! time. The event type of the three hard-coded-topic events is their topic, like every
//! other event here (HuleEdu gave them separate type names).

use chrono::Utc;
use std::collections::HashSet;

use outpost::{
    Aggregate, Error as OutpostError, EventEnvelope, OutboxEvent, OutboxTx, Publisher,
    PublishingHandler, Received,
};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::types::Json;
use sqlx::{PgConnection, Row};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::error::{handler_db, Error, Result};
use crate::events::{
    decode, topic, BatchEssaysReady, BatchEssaysRegistered, BatchPhaseConcluded,
    BatchPhaseProgress, ElsBatchPhaseOutcomeV1, EntityRef, EssayContentProvisionedV1, EssayRef,
    EssaySlotAssignedV1, EssayStatusUpdated, EssayValidationFailedV1, ExcessContentProvisionedV1,
    ProcessingStage, SpellcheckCompleted, SpellcheckInitiateCommand, SpellcheckRequested,
    SystemProcessingMetadata, Topics,
};

/// ELS's service name (`source_service` of its events).
pub const SERVICE: &str = "essay-lifecycle-service";

/// The topics ELS consumes.
pub const CONSUMES: [&str; 5] = [
    topic::BATCH_ESSAYS_REGISTERED,
    topic::ESSAY_CONTENT_PROVISIONED,
    topic::ESSAY_VALIDATION_FAILED,
    topic::BATCH_SPELLCHECK_INITIATE_COMMAND,
    topic::ESSAY_SPELLCHECK_COMPLETED,
];

/// The spellcheck phase's name.
pub const SPELLCHECK: &str = "spellcheck";

/// Essay states.
pub mod essay_state {
    /// A slot waiting for content.
    pub const AWAITING_CONTENT: &str = "awaiting_content";
    /// Content assigned.
    pub const READY_FOR_PROCESSING: &str = "ready_for_processing";
    /// Sent to the spellchecker.
    pub const AWAITING_SPELLCHECK: &str = "awaiting_spellcheck";
    /// Checked.
    pub const SPELLCHECKED_SUCCESS: &str = "spellchecked_success";
    /// The spellchecker could not check it.
    pub const SPELLCHECK_FAILED: &str = "spellcheck_failed";
}

/// Batch states.
pub mod batch_state {
    /// Collecting content.
    pub const AWAITING_CONTENT: &str = "awaiting_content";
    /// Every slot filled or failed; BOS told.
    pub const READY: &str = "ready";
    /// Spellcheck requests sent.
    pub const SPELLCHECK_IN_PROGRESS: &str = "spellcheck_in_progress";
    /// Every result in; outcome published.
    pub const SPELLCHECK_COMPLETED: &str = "spellcheck_completed";
}

/// One essay as ELS holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Essay {
    /// Slot id.
    pub essay_id: String,
    /// Current state.
    pub state: String,
    /// The upload assigned to it.
    pub file_upload_id: Option<String>,
    /// Its text.
    pub text_storage_id: Option<String>,
    /// Its spell-checked text.
    pub corrected_text_storage_id: Option<String>,
}

/// The service (cheap to clone).
#[derive(Debug, Clone)]
pub struct EssayLifecycle {
    publisher: Publisher,
    topics: Topics,
}

impl EssayLifecycle {
    /// ELS publishing through `publisher`, whose pool's `search_path` is ELS's schema.
    pub fn new(publisher: Publisher, topics: Topics) -> Self {
        Self { publisher, topics }
    }

    fn pool(&self) -> &PgPool {
        self.publisher.store().pool()
    }

    /// Creates ELS's tables if they do not exist.
    ///
    /// # Errors
    /// [`Error::Database`] when the DDL fails.
    pub async fn migrate(&self) -> Result<()> {
        let ddl = [
            "CREATE TABLE IF NOT EXISTS batches ( \
               batch_id           TEXT PRIMARY KEY, \
               expected_essays    INT NOT NULL, \
               course_code        TEXT NOT NULL, \
               essay_instructions TEXT NOT NULL, \
               state              TEXT NOT NULL, \
               phase_total        INT)",
            // Running counts, kept under the batch row's lock: a handler reads them instead
            // of counting the batch's essays, which made a batch's handling quadratic.
            "ALTER TABLE batches \
               ADD COLUMN IF NOT EXISTS assigned             INT NOT NULL DEFAULT 0, \
               ADD COLUMN IF NOT EXISTS validation_failed    INT NOT NULL DEFAULT 0, \
               ADD COLUMN IF NOT EXISTS spellcheck_succeeded INT NOT NULL DEFAULT 0, \
               ADD COLUMN IF NOT EXISTS spellcheck_failed    INT NOT NULL DEFAULT 0",
            "CREATE TABLE IF NOT EXISTS essays ( \
               essay_id                  TEXT PRIMARY KEY, \
               batch_id                  TEXT NOT NULL, \
               slot                      INT NOT NULL, \
               state                     TEXT NOT NULL, \
               file_upload_id            TEXT UNIQUE, \
               original_file_name        TEXT, \
               text_storage_id           TEXT, \
               corrected_text_storage_id TEXT)",
            "CREATE INDEX IF NOT EXISTS essays_batch ON essays (batch_id, slot)",
            // The free slots alone, so finding the first one does not walk the filled ones.
            "CREATE INDEX IF NOT EXISTS essays_free_slot ON essays (batch_id, slot) \
               WHERE state = 'awaiting_content'",
            // No unique constraint on purpose: a change applied twice shows as two rows.
            "CREATE TABLE IF NOT EXISTS essay_transitions ( \
               id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
               essay_id   TEXT NOT NULL, \
               from_state TEXT, \
               to_state   TEXT NOT NULL, \
               event_id   UUID NOT NULL, \
               at         TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
            "CREATE TABLE IF NOT EXISTS validation_failures ( \
               file_upload_id TEXT PRIMARY KEY, \
               batch_id       TEXT NOT NULL, \
               error_code     TEXT NOT NULL, \
               failure        JSONB NOT NULL)",
            // Content announced before its batch's registration arrived.
            "CREATE TABLE IF NOT EXISTS pending_content ( \
               file_upload_id TEXT PRIMARY KEY, \
               batch_id       TEXT NOT NULL, \
               content        JSONB NOT NULL, \
               received_at    TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
            "CREATE TABLE IF NOT EXISTS excess_content ( \
               file_upload_id TEXT PRIMARY KEY, \
               batch_id       TEXT NOT NULL, \
               content        JSONB NOT NULL)",
        ];
        for stmt in ddl {
            sqlx::query(stmt)
                .execute(self.pool())
                .await
                .map_err(Error::db(SERVICE, "migrate"))?;
        }
        Ok(())
    }

    /// The batch's state, if ELS knows it.
    ///
    /// # Errors
    /// [`Error::Database`] when the query fails.
    pub async fn batch_state(&self, batch_id: &str) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT state FROM batches WHERE batch_id = $1")
            .bind(batch_id)
            .fetch_optional(self.pool())
            .await
            .map_err(Error::db(SERVICE, "batch_state"))
    }

    /// The batch's essay slots, in slot order.
    ///
    /// # Errors
    /// [`Error::Database`] when the query fails.
    pub async fn essays(&self, batch_id: &str) -> Result<Vec<Essay>> {
        let rows = sqlx::query(
            "SELECT essay_id, state, file_upload_id, text_storage_id, corrected_text_storage_id \
             FROM essays WHERE batch_id = $1 ORDER BY slot",
        )
        .bind(batch_id)
        .fetch_all(self.pool())
        .await
        .map_err(Error::db(SERVICE, "essays"))?;
        Ok(rows
            .iter()
            .map(|r| Essay {
                essay_id: r.get(0),
                state: r.get(1),
                file_upload_id: r.get(2),
                text_storage_id: r.get(3),
                corrected_text_storage_id: r.get(4),
            })
            .collect())
    }

    /// The validation failures recorded for the batch: `(file_upload_id, error_code)`.
    ///
    /// # Errors
    /// [`Error::Database`] when the query fails.
    pub async fn validation_failures(&self, batch_id: &str) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT file_upload_id, error_code FROM validation_failures WHERE batch_id = $1 \
             ORDER BY error_code",
        )
        .bind(batch_id)
        .fetch_all(self.pool())
        .await
        .map_err(Error::db(SERVICE, "validation_failures"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Every essay state change, oldest first: `(essay_id, from, to)`.
    ///
    /// # Errors
    /// [`Error::Database`] when the query fails.
    pub async fn transitions(&self) -> Result<Vec<(String, Option<String>, String)>> {
        let rows =
            sqlx::query("SELECT essay_id, from_state, to_state FROM essay_transitions ORDER BY id")
                .fetch_all(self.pool())
                .await
                .map_err(Error::db(SERVICE, "transitions"))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    // ---- handlers -------------------------------------------------------------------

    /// Creates the batch's slots, then applies whatever arrived for it early.
    async fn on_registered(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        let reg: BatchEssaysRegistered = decode(event)?;
        if lock_batch(tx, &reg.batch_id, Hold::Whole).await?.is_some() {
            debug!(batch_id = reg.batch_id, "batch already registered");
            return Ok(());
        }
        let created = sqlx::query(
            "INSERT INTO batches (batch_id, expected_essays, course_code, essay_instructions, state) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (batch_id) DO NOTHING",
        )
        .bind(&reg.batch_id)
        .bind(i32::try_from(reg.expected_essay_count).unwrap_or(i32::MAX))
        .bind(&reg.course_code)
        .bind(&reg.essay_instructions)
        .bind(batch_state::AWAITING_CONTENT)
        .execute(&mut **tx)
        .await
        .map_err(handler_db)?
        .rows_affected();
        if created == 0 {
            debug!(batch_id = reg.batch_id, "batch already registered");
            return Ok(());
        }
        // Failures that arrived before the registration.
        sqlx::query(
            "UPDATE batches SET validation_failed = \
               (SELECT count(*) FROM validation_failures WHERE batch_id = $1) \
             WHERE batch_id = $1",
        )
        .bind(&reg.batch_id)
        .execute(&mut **tx)
        .await
        .map_err(handler_db)?;
        sqlx::query(
            "INSERT INTO essays (essay_id, batch_id, slot, state) \
             SELECT id, $2, ord, $3 FROM UNNEST($1::text[]) WITH ORDINALITY AS u(id, ord)",
        )
        .bind(&reg.essay_ids)
        .bind(&reg.batch_id)
        .bind(essay_state::AWAITING_CONTENT)
        .execute(&mut **tx)
        .await
        .map_err(handler_db)?;
        sqlx::query(
            "INSERT INTO essay_transitions (essay_id, to_state, event_id) \
             SELECT id, $2, $3 FROM UNNEST($1::text[]) AS u(id)",
        )
        .bind(&reg.essay_ids)
        .bind(essay_state::AWAITING_CONTENT)
        .bind(event.event_id)
        .execute(&mut **tx)
        .await
        .map_err(handler_db)?;
        let early = sqlx::query(
            "DELETE FROM pending_content WHERE batch_id = $1 RETURNING content, received_at",
        )
        .bind(&reg.batch_id)
        .fetch_all(&mut **tx)
        .await
        .map_err(handler_db)?;
        let mut early: Vec<(chrono::DateTime<Utc>, EssayContentProvisionedV1)> = early
            .iter()
            .map(|r| (r.get(1), r.get::<Json<EssayContentProvisionedV1>, _>(0).0))
            .collect();
        early.sort_by_key(|(at, _)| *at);
        let mut placed = 0;
        for (_, content) in &early {
            placed += i32::from(
                self.assign(tx, content, batch_state::AWAITING_CONTENT, event)
                    .await?,
            );
        }
        info!(
            batch_id = reg.batch_id,
            slots = reg.essay_ids.len(),
            early = early.len(),
            "batch registered"
        );
        let counts = count(tx, &reg.batch_id, placed, 0).await?;
        self.check_ready(tx, &reg.batch_id, counts, event).await
    }

    /// Assigns the content to a free slot (or reports it as excess).
    async fn on_content_provisioned(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        let content: EssayContentProvisionedV1 = decode(event)?;
        let Some(state) = lock_batch(tx, &content.batch_id, Hold::Shared).await? else {
            return keep_until_registered(tx, &content).await;
        };
        let placed = self.assign(tx, &content, &state, event).await?;
        // Last, so the batch row's lock (held to the commit) is all that orders the
        // handlers of one batch.
        let counts = count(tx, &content.batch_id, i32::from(placed), 0).await?;
        placed_in_time(&content.batch_id, placed, &state, &counts)?;
        self.check_ready(tx, &content.batch_id, counts, event).await
    }

    /// Places several contents in one transaction, as one by one, but counts each batch's
    /// placements once, at the end: the batch row is locked for the last statements only.
    async fn on_contents_provisioned(
        &self,
        events: &[(EventEnvelope<serde_json::Value>, &Received)],
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        // Per batch: placements, the last event, and the state the placements were decided on.
        let mut batches: Vec<(String, i32, &EventEnvelope<serde_json::Value>, String)> = Vec::new();
        for (event, _) in events {
            let content: EssayContentProvisionedV1 = decode(event)?;
            let Some(state) = lock_batch(tx, &content.batch_id, Hold::Shared).await? else {
                keep_until_registered(tx, &content).await?;
                continue;
            };
            let placed = self.assign(tx, &content, &state, event).await?;
            match batches.iter_mut().find(|b| b.0 == content.batch_id) {
                Some(batch) => {
                    batch.1 += i32::from(placed);
                    batch.2 = event;
                }
                None => batches.push((content.batch_id, i32::from(placed), event, state)),
            }
        }
        // Count rows stay locked to the commit: taken in one order, units of several
        // batches on other partitions do not deadlock on them.
        batches.sort_by(|a, b| a.0.cmp(&b.0));
        for (batch_id, placed, last, state) in batches {
            let counts = count(tx, &batch_id, placed, 0).await?;
            placed_in_time(&batch_id, placed > 0, &state, &counts)?;
            self.check_ready(tx, &batch_id, counts, last).await?;
        }
        Ok(())
    }

    /// Records the failure; it counts towards the batch being complete.
    async fn on_validation_failed(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        let failure: EssayValidationFailedV1 = decode(event)?;
        let registered = lock_batch(tx, &failure.batch_id, Hold::Shared)
            .await?
            .is_some();
        // Kept even before the registration arrives; the registration counts it.
        let recorded = sqlx::query(
            "INSERT INTO validation_failures (file_upload_id, batch_id, error_code, failure) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (file_upload_id) DO NOTHING",
        )
        .bind(&failure.file_upload_id)
        .bind(&failure.batch_id)
        .bind(&failure.validation_error_code)
        .bind(Json(&failure))
        .execute(&mut **tx)
        .await
        .map_err(handler_db)?
        .rows_affected();
        if registered {
            let failed = i32::from(recorded > 0);
            let counts = count(tx, &failure.batch_id, 0, failed).await?;
            self.check_ready(tx, &failure.batch_id, counts, event)
                .await?;
        }
        Ok(())
    }

    /// Sends one spellcheck request per ready essay.
    async fn on_spellcheck_initiate(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        let command: SpellcheckInitiateCommand = decode(event)?;
        let batch_id = command.entity_ref.entity_id.as_str();
        match lock_batch(tx, batch_id, Hold::Whole).await?.as_deref() {
            None => return Err(OutpostError::permanent(format!("unknown batch {batch_id}"))),
            Some(batch_state::READY) => {}
            Some(state) => {
                debug!(batch_id, state, "spellcheck already initiated");
                return Ok(());
            }
        }
        // One statement for the essays' moves and one for their events: a batch of 1,000
        // essays took 4,000 round trips here, one at a time.
        let ids: Vec<&str> = command
            .essays_to_process
            .iter()
            .map(|e| e.essay_id.as_str())
            .collect();
        let mut moved: HashSet<String> = sqlx::query_scalar(
            "WITH moved AS ( \
               UPDATE essays SET state = $3 WHERE essay_id = ANY($1) AND state = $2 \
               RETURNING essay_id), \
             logged AS ( \
               INSERT INTO essay_transitions (essay_id, from_state, to_state, event_id) \
               SELECT essay_id, $2, $3, $4 FROM moved) \
             SELECT essay_id FROM moved",
        )
        .bind(&ids)
        .bind(essay_state::READY_FOR_PROCESSING)
        .bind(essay_state::AWAITING_SPELLCHECK)
        .bind(event.event_id)
        .fetch_all(&mut **tx)
        .await
        .map_err(handler_db)?
        .into_iter()
        .collect();
        let mut events = Vec::with_capacity(2 * moved.len());
        for essay in &command.essays_to_process {
            if !moved.remove(&essay.essay_id) {
                warn!(
                    essay_id = essay.essay_id,
                    "essay not ready for processing; not requested"
                );
                continue;
            }
            events.push(self.spellcheck_request(batch_id, essay, &command.language, event)?);
            events.push(self.status_update(
                &essay.essay_id,
                batch_id,
                essay_state::AWAITING_SPELLCHECK,
                event.correlation_id,
            )?);
        }
        tx.publish_all(&events).await?;
        let requested = u32::try_from(events.len() / 2).unwrap_or(u32::MAX);
        sqlx::query("UPDATE batches SET state = $2, phase_total = $3 WHERE batch_id = $1")
            .bind(batch_id)
            .bind(batch_state::SPELLCHECK_IN_PROGRESS)
            .bind(i32::try_from(requested).unwrap_or(i32::MAX))
            .execute(&mut **tx)
            .await
            .map_err(handler_db)?;
        self.publish_batch_phase_progress(
            tx,
            batch_id,
            SPELLCHECK,
            0,
            0,
            requested,
            event.correlation_id,
        )
        .await?;
        info!(batch_id, essays = requested, "spellcheck requested");
        if requested == 0 {
            // No result will ever come to conclude it (every upload failed validation, say):
            // the phase ends here.
            self.conclude_spellcheck(tx, batch_id, event).await?;
        }
        Ok(())
    }

    /// Records one essay's result; the last one concludes the phase.
    async fn on_spellcheck_completed(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        if let Some(result) = self.record_result(event, tx).await? {
            self.count_results(tx, &[result], event).await?;
        }
        Ok(())
    }

    /// Records several results in one transaction, as one by one, but counts each batch's
    /// once: its count row is locked for the last statements of the transaction only, not
    /// from the first result on.
    async fn on_spellcheck_results(
        &self,
        events: &[(EventEnvelope<serde_json::Value>, &Received)],
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        // Per batch: its results and the last event.
        let mut batches: Vec<(Vec<Recorded>, &EventEnvelope<serde_json::Value>)> = Vec::new();
        for (event, _) in events {
            let Some(result) = self.record_result(event, tx).await? else {
                continue;
            };
            match batches
                .iter_mut()
                .find(|(of_batch, _)| of_batch[0].batch_id == result.batch_id)
            {
                Some((of_batch, last)) => {
                    of_batch.push(result);
                    *last = event;
                }
                None => batches.push((vec![result], event)),
            }
        }
        // Count rows stay locked to the commit: taken in one order, units of several
        // batches on other partitions do not deadlock on them.
        batches.sort_by(|a, b| a.0[0].batch_id.cmp(&b.0[0].batch_id));
        for (of_batch, last) in batches {
            self.count_results(tx, &of_batch, last).await?;
        }
        Ok(())
    }

    /// Moves the essay of one result on and announces its status; `None` when the result
    /// does not count (its batch concluded the phase, or the essay was not waiting for it).
    async fn record_result(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        tx: &mut OutboxTx,
    ) -> outpost::Result<Option<Recorded>> {
        let result: SpellcheckCompleted = decode(event)?;
        let essay_id = result.entity_ref.entity_id.as_str();
        let batch_id = result.entity_ref.parent_id.as_deref().ok_or_else(|| {
            OutpostError::permanent(format!("spellcheck result for {essay_id} names no batch"))
        })?;
        // Results of a batch are handled side by side; only the count, whose row lock is
        // held to the commit, puts them in one order (counts, progress events and the
        // conclusion follow it). The key-share lock still waits for, and holds off, any
        // handler that takes the whole batch (`lock_batch`).
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM batches WHERE batch_id = $1 FOR KEY SHARE")
                .bind(batch_id)
                .fetch_optional(&mut **tx)
                .await
                .map_err(handler_db)?;
        match state.as_deref() {
            None => return Err(OutpostError::permanent(format!("unknown batch {batch_id}"))),
            Some(batch_state::SPELLCHECK_IN_PROGRESS) => {}
            Some(state) => {
                debug!(batch_id, state, "result after the phase concluded; ignored");
                return Ok(None);
            }
        }
        let done = if result.status == essay_state::SPELLCHECKED_SUCCESS {
            essay_state::SPELLCHECKED_SUCCESS
        } else {
            essay_state::SPELLCHECK_FAILED
        };
        if !self
            .transition(tx, essay_id, essay_state::AWAITING_SPELLCHECK, done, event)
            .await?
        {
            debug!(essay_id, "essay not awaiting a result; ignored");
            return Ok(None);
        }
        sqlx::query("UPDATE essays SET corrected_text_storage_id = $2 WHERE essay_id = $1")
            .bind(essay_id)
            .bind(result.corrected_text_storage_id())
            .execute(&mut **tx)
            .await
            .map_err(handler_db)?;
        self.publish_status_update(tx, essay_id, batch_id, done, event.correlation_id)
            .await?;
        Ok(Some(Recorded {
            batch_id: batch_id.to_owned(),
            succeeded: done == essay_state::SPELLCHECKED_SUCCESS,
            correlation_id: event.correlation_id,
        }))
    }

    /// Counts `results` (recorded in this transaction, all of one batch, in order) in one
    /// statement, stages a progress event per result with the counts after it, and
    /// concludes the phase after the last result. The statement is the first of the
    /// transaction's last few: the batch row's lock is held from here to the commit.
    async fn count_results(
        &self,
        tx: &mut OutboxTx,
        results: &[Recorded],
        event: &EventEnvelope<serde_json::Value>,
    ) -> outpost::Result<()> {
        let Some(first) = results.first() else {
            return Ok(());
        };
        let batch_id = first.batch_id.as_str();
        let succeeded_here = results.iter().filter(|r| r.succeeded).count();
        let failed_here = results.len() - succeeded_here;
        // The transitions counted happen once per essay, so each result is counted once. A
        // result counted here after another's wait re-reads the row: the counts never skip.
        let row = sqlx::query(
            "UPDATE batches SET \
               spellcheck_succeeded = spellcheck_succeeded + $2, \
               spellcheck_failed = spellcheck_failed + $3 \
             WHERE batch_id = $1 \
             RETURNING spellcheck_succeeded::bigint, spellcheck_failed::bigint, phase_total",
        )
        .bind(batch_id)
        .bind(i32::try_from(succeeded_here).unwrap_or(i32::MAX))
        .bind(i32::try_from(failed_here).unwrap_or(i32::MAX))
        .fetch_one(&mut **tx)
        .await
        .map_err(handler_db)?;
        let count = |i: usize| u32::try_from(row.get::<i64, _>(i)).unwrap_or(0);
        let (succeeded, failed) = (count(0), count(1));
        let total = u32::try_from(row.get::<Option<i32>, _>(2).unwrap_or(0)).unwrap_or(0);
        // The counts before this transaction's results, then one result at a time.
        let mut at = (
            succeeded.saturating_sub(u32::try_from(succeeded_here).unwrap_or(u32::MAX)),
            failed.saturating_sub(u32::try_from(failed_here).unwrap_or(u32::MAX)),
        );
        let mut progress = Vec::with_capacity(results.len());
        for result in results {
            if result.succeeded {
                at.0 += 1;
            } else {
                at.1 += 1;
            }
            progress.push(self.batch_phase_progress(
                batch_id,
                SPELLCHECK,
                (at.0, at.1, total),
                result.correlation_id,
            )?);
        }
        tx.publish_all(&progress).await?;
        if succeeded + failed >= total {
            self.conclude_spellcheck(tx, batch_id, event).await?;
        }
        Ok(())
    }

    // ---- steps shared by handlers -----------------------------------------------------

    /// Puts `content` into the batch's first free slot and announces it; with no free
    /// slot, or a batch no longer taking content, announces it as excess. Returns whether
    /// it took a slot (the caller counts it).
    async fn assign(
        &self,
        tx: &mut OutboxTx,
        content: &EssayContentProvisionedV1,
        batch_state: &str,
        event: &EventEnvelope<serde_json::Value>,
    ) -> outpost::Result<bool> {
        // Content handlers of a batch run side by side: two announcements of one upload
        // (not redeliveries, which the inbox stops) take turns here, so the second sees
        // the first's slot instead of failing on the unique upload id.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('els.upload:' || $1))")
            .bind(&content.file_upload_id)
            .execute(&mut **tx)
            .await
            .map_err(handler_db)?;
        let seen: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM essays WHERE file_upload_id = $1) \
                 OR EXISTS (SELECT 1 FROM excess_content WHERE file_upload_id = $1)",
        )
        .bind(&content.file_upload_id)
        .fetch_one(&mut **tx)
        .await
        .map_err(handler_db)?;
        if seen {
            debug!(
                file_upload_id = content.file_upload_id,
                "content already placed"
            );
            return Ok(false);
        }
        let slot = if batch_state == batch_state::AWAITING_CONTENT {
            free_slot(tx, &content.batch_id).await?
        } else {
            None
        };
        let Some(essay_id) = slot else {
            sqlx::query(
                "INSERT INTO excess_content (file_upload_id, batch_id, content) VALUES ($1, $2, $3)",
            )
            .bind(&content.file_upload_id)
            .bind(&content.batch_id)
            .bind(Json(content))
            .execute(&mut **tx)
            .await
            .map_err(handler_db)?;
            self.publish_excess_content_provisioned(
                tx,
                &ExcessContentProvisionedV1 {
                    event: "excess.content.provisioned".into(),
                    batch_id: content.batch_id.clone(),
                    original_file_name: content.original_file_name.clone(),
                    text_storage_id: content.text_storage_id.clone(),
                    reason: "NO_AVAILABLE_SLOT".into(),
                    correlation_id: event.correlation_id,
                    timestamp: Utc::now(),
                },
            )
            .await?;
            return Ok(false);
        };
        sqlx::query(
            "UPDATE essays SET file_upload_id = $2, original_file_name = $3, \
               text_storage_id = $4 \
             WHERE essay_id = $1",
        )
        .bind(&essay_id)
        .bind(&content.file_upload_id)
        .bind(&content.original_file_name)
        .bind(&content.text_storage_id)
        .execute(&mut **tx)
        .await
        .map_err(handler_db)?;
        self.transition(
            tx,
            &essay_id,
            essay_state::AWAITING_CONTENT,
            essay_state::READY_FOR_PROCESSING,
            event,
        )
        .await?;
        self.publish_essay_slot_assigned(
            tx,
            &EssaySlotAssignedV1 {
                event: "essay.slot.assigned".into(),
                batch_id: content.batch_id.clone(),
                essay_id: essay_id.clone(),
                file_upload_id: content.file_upload_id.clone(),
                text_storage_id: content.text_storage_id.clone(),
                correlation_id: event.correlation_id,
                timestamp: Utc::now(),
            },
        )
        .await?;
        self.publish_status_update(
            tx,
            &essay_id,
            &content.batch_id,
            essay_state::READY_FOR_PROCESSING,
            event.correlation_id,
        )
        .await?;
        Ok(true)
    }

    /// Marks the batch ready and tells BOS, once every slot is filled or its file failed
    /// validation (`row`: the batch as [`count`] returned it).
    async fn check_ready(
        &self,
        tx: &mut OutboxTx,
        batch_id: &str,
        row: PgRow,
        event: &EventEnvelope<serde_json::Value>,
    ) -> outpost::Result<()> {
        let state: String = row.get(0);
        let expected = i64::from(row.get::<i32, _>(1));
        let (assigned, failed): (i64, i64) = (row.get(4), row.get(5));
        if state != batch_state::AWAITING_CONTENT || assigned + failed < expected {
            return Ok(());
        }
        sqlx::query("UPDATE batches SET state = $2 WHERE batch_id = $1")
            .bind(batch_id)
            .bind(batch_state::READY)
            .execute(&mut **tx)
            .await
            .map_err(handler_db)?;
        let ready_essays: Vec<EssayRef> = sqlx::query(
            "SELECT essay_id, text_storage_id FROM essays \
             WHERE batch_id = $1 AND file_upload_id IS NOT NULL ORDER BY slot",
        )
        .bind(batch_id)
        .fetch_all(&mut **tx)
        .await
        .map_err(handler_db)?
        .iter()
        .map(|r| EssayRef {
            essay_id: r.get(0),
            text_storage_id: r.get(1),
        })
        .collect();
        let failures: Vec<EssayValidationFailedV1> = sqlx::query_scalar(
            "SELECT failure FROM validation_failures WHERE batch_id = $1 ORDER BY file_upload_id",
        )
        .bind(batch_id)
        .fetch_all(&mut **tx)
        .await
        .map_err(handler_db)?
        .into_iter()
        .map(|f: Json<EssayValidationFailedV1>| f.0)
        .collect();
        let batch = EntityRef {
            entity_id: batch_id.to_owned(),
            entity_type: "batch".into(),
            parent_id: None,
        };
        info!(
            batch_id,
            ready = ready_essays.len(),
            failed = failures.len(),
            "batch ready"
        );
        self.publish_batch_essays_ready(
            tx,
            &BatchEssaysReady {
                event: "batch.essays.ready".into(),
                batch_id: batch_id.to_owned(),
                total_files_processed: u32::try_from(assigned + failed).ok(),
                ready_essays,
                // Content collection is what completed: every slot is filled or failed.
                metadata: SystemProcessingMetadata::new(
                    batch.clone(),
                    ProcessingStage::Completed,
                    "batch.essays.ready",
                ),
                batch_entity: batch,
                course_code: row.get(2),
                course_language: "en".into(),
                essay_instructions: row.get(3),
                class_type: "GUEST".into(),
                validation_failures: Some(failures),
            },
            event.correlation_id,
        )
        .await
    }

    /// Publishes the phase outcome (→ BOS) and the concluded notice.
    async fn conclude_spellcheck(
        &self,
        tx: &mut OutboxTx,
        batch_id: &str,
        event: &EventEnvelope<serde_json::Value>,
    ) -> outpost::Result<()> {
        sqlx::query("UPDATE batches SET state = $2 WHERE batch_id = $1")
            .bind(batch_id)
            .bind(batch_state::SPELLCHECK_COMPLETED)
            .execute(&mut **tx)
            .await
            .map_err(handler_db)?;
        let rows = sqlx::query(
            "SELECT essay_id, state, corrected_text_storage_id FROM essays \
             WHERE batch_id = $1 AND state IN ($2, $3) ORDER BY slot",
        )
        .bind(batch_id)
        .bind(essay_state::SPELLCHECKED_SUCCESS)
        .bind(essay_state::SPELLCHECK_FAILED)
        .fetch_all(&mut **tx)
        .await
        .map_err(handler_db)?;
        let mut processed = Vec::new();
        let mut failed = Vec::new();
        for r in &rows {
            let (essay_id, state): (String, String) = (r.get(0), r.get(1));
            match r.get::<Option<String>, _>(2) {
                Some(corrected) if state == essay_state::SPELLCHECKED_SUCCESS => {
                    processed.push(EssayRef {
                        essay_id,
                        text_storage_id: corrected,
                    });
                }
                _ => failed.push(essay_id),
            }
        }
        // Nothing processed (no essay was ready) is no success either.
        let status = if failed.is_empty() && !processed.is_empty() {
            "completed_successfully"
        } else {
            "completed_with_failures"
        };
        info!(
            batch_id,
            processed = processed.len(),
            failed = failed.len(),
            status,
            "spellcheck phase concluded"
        );
        let details = serde_json::json!({ "processed": processed.len(), "failed": failed.len() });
        self.publish_els_batch_phase_outcome(
            tx,
            &ElsBatchPhaseOutcomeV1 {
                batch_id: batch_id.to_owned(),
                phase_name: SPELLCHECK.into(),
                phase_status: status.into(),
                processed_essays: processed,
                failed_essay_ids: failed,
                correlation_id: event.correlation_id.to_string(),
            },
            event.correlation_id,
        )
        .await?;
        self.publish_batch_phase_concluded(
            tx,
            batch_id,
            SPELLCHECK,
            status,
            details,
            event.correlation_id,
        )
        .await
    }

    /// Moves an essay from `from` to `to` and logs it; `false` (and no change) when it is
    /// not in `from`.
    async fn transition(
        &self,
        tx: &mut OutboxTx,
        essay_id: &str,
        from: &str,
        to: &str,
        event: &EventEnvelope<serde_json::Value>,
    ) -> outpost::Result<bool> {
        let changed =
            sqlx::query("UPDATE essays SET state = $3 WHERE essay_id = $1 AND state = $2")
                .bind(essay_id)
                .bind(from)
                .bind(to)
                .execute(&mut **tx)
                .await
                .map_err(handler_db)?
                .rows_affected()
                == 1;
        if changed {
            sqlx::query(
                "INSERT INTO essay_transitions (essay_id, from_state, to_state, event_id) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(essay_id)
            .bind(from)
            .bind(to)
            .bind(event.event_id)
            .execute(&mut **tx)
            .await
            .map_err(handler_db)?;
        }
        Ok(changed)
    }

    // ---- the publishing methods (HuleEdu's `DefaultEventPublisher` and dispatcher) ------

    /// 1. `essay.status.events`, key essay_id: an essay changed state.
    ///
    /// # Errors
    /// [`outpost::Error::OutboxStorage`] when staging fails.
    pub async fn publish_status_update(
        &self,
        tx: &mut OutboxTx,
        essay_id: &str,
        batch_id: &str,
        status: &str,
        correlation_id: Uuid,
    ) -> outpost::Result<()> {
        let update = self.status_update(essay_id, batch_id, status, correlation_id)?;
        tx.publish(&update).await
    }

    /// The event [`publish_status_update`](Self::publish_status_update) stages.
    fn status_update(
        &self,
        essay_id: &str,
        batch_id: &str,
        status: &str,
        correlation_id: Uuid,
    ) -> outpost::Result<OutboxEvent> {
        let data = EssayStatusUpdated {
            event_name: "essay.status.updated.v1".into(),
            entity_id: essay_id.to_owned(),
            entity_type: "essay".into(),
            parent_id: Some(batch_id.to_owned()),
            status: status.to_owned(),
        };
        let aggregate = Aggregate::new("essay", essay_id);
        self.topics.event(
            topic::ESSAY_STATUS,
            SERVICE,
            correlation_id,
            aggregate,
            &data,
        )
    }

    /// 2. `batch.phase.progress.events`, key batch_id: phase counts.
    ///
    /// # Errors
    /// [`outpost::Error::OutboxStorage`] when staging fails.
    #[allow(clippy::too_many_arguments)]
    pub async fn publish_batch_phase_progress(
        &self,
        tx: &mut OutboxTx,
        batch_id: &str,
        phase: &str,
        completed_count: u32,
        failed_count: u32,
        total_essays_in_phase: u32,
        correlation_id: Uuid,
    ) -> outpost::Result<()> {
        let counts = (completed_count, failed_count, total_essays_in_phase);
        let progress = self.batch_phase_progress(batch_id, phase, counts, correlation_id)?;
        tx.publish(&progress).await
    }

    /// The event [`publish_batch_phase_progress`](Self::publish_batch_phase_progress) stages;
    /// `counts`: completed, failed, total.
    fn batch_phase_progress(
        &self,
        batch_id: &str,
        phase: &str,
        (completed_count, failed_count, total_essays_in_phase): (u32, u32, u32),
        correlation_id: Uuid,
    ) -> outpost::Result<OutboxEvent> {
        let data = BatchPhaseProgress {
            event_name: "batch.phase.progress.v1".into(),
            entity_ref: EntityRef {
                entity_id: batch_id.to_owned(),
                entity_type: "batch".into(),
                parent_id: None,
            },
            phase: phase.to_owned(),
            completed_count,
            failed_count,
            total_essays_in_phase,
            timestamp: Utc::now(),
        };
        let aggregate = Aggregate::new("batch", batch_id);
        self.topics.event(
            topic::BATCH_PHASE_PROGRESS,
            SERVICE,
            correlation_id,
            aggregate,
            &data,
        )
    }

    /// 3. `batch.phase.concluded.events`, key batch_id: a phase ended.
    ///
    /// # Errors
    /// [`outpost::Error::OutboxStorage`] when staging fails.
    pub async fn publish_batch_phase_concluded(
        &self,
        tx: &mut OutboxTx,
        batch_id: &str,
        phase: &str,
        status: &str,
        details: serde_json::Value,
        correlation_id: Uuid,
    ) -> outpost::Result<()> {
        let data = BatchPhaseConcluded {
            event_name: "batch.phase.concluded.v1".into(),
            entity_ref: EntityRef {
                entity_id: batch_id.to_owned(),
                entity_type: "batch".into(),
                parent_id: None,
            },
            phase: phase.to_owned(),
            status: status.to_owned(),
            details,
            timestamp: Utc::now(),
        };
        let aggregate = Aggregate::new("batch", batch_id);
        self.stage(
            tx,
            topic::BATCH_PHASE_CONCLUDED,
            correlation_id,
            aggregate,
            &data,
        )
        .await
    }

    /// 4. `ExcessContentProvisionedV1`, key batch_id: content with no slot.
    ///
    /// # Errors
    /// [`outpost::Error::OutboxStorage`] when staging fails.
    pub async fn publish_excess_content_provisioned(
        &self,
        tx: &mut OutboxTx,
        data: &ExcessContentProvisionedV1,
    ) -> outpost::Result<()> {
        let aggregate = Aggregate::new("batch", &data.batch_id);
        self.stage(
            tx,
            topic::EXCESS_CONTENT_PROVISIONED,
            data.correlation_id,
            aggregate,
            data,
        )
        .await
    }

    /// 5. `BatchEssaysReady` → BOS, key batch_id.
    ///
    /// # Errors
    /// [`outpost::Error::OutboxStorage`] when staging fails.
    pub async fn publish_batch_essays_ready(
        &self,
        tx: &mut OutboxTx,
        data: &BatchEssaysReady,
        correlation_id: Uuid,
    ) -> outpost::Result<()> {
        let aggregate = Aggregate::new("batch", &data.batch_id);
        self.stage(
            tx,
            topic::BATCH_ESSAYS_READY,
            correlation_id,
            aggregate,
            data,
        )
        .await
    }

    /// 6. `EssaySlotAssignedV1`, key essay_id: content went into a slot.
    ///
    /// # Errors
    /// [`outpost::Error::OutboxStorage`] when staging fails.
    pub async fn publish_essay_slot_assigned(
        &self,
        tx: &mut OutboxTx,
        data: &EssaySlotAssignedV1,
    ) -> outpost::Result<()> {
        let aggregate = Aggregate::new("essay", &data.essay_id);
        self.stage(
            tx,
            topic::ESSAY_SLOT_ASSIGNED,
            data.correlation_id,
            aggregate,
            data,
        )
        .await
    }

    /// 7. `ELSBatchPhaseOutcomeV1` → BOS, key batch_id.
    ///
    /// # Errors
    /// [`outpost::Error::OutboxStorage`] when staging fails.
    pub async fn publish_els_batch_phase_outcome(
        &self,
        tx: &mut OutboxTx,
        data: &ElsBatchPhaseOutcomeV1,
        correlation_id: Uuid,
    ) -> outpost::Result<()> {
        let aggregate = Aggregate::new("batch", &data.batch_id);
        self.stage(
            tx,
            topic::ELS_BATCH_PHASE_OUTCOME,
            correlation_id,
            aggregate,
            data,
        )
        .await
    }

    /// `huleedu.essay.spellcheck.requested.v1` → Spellchecker, key essay_id (HuleEdu's
    /// service request dispatcher): the request for `essay`.
    fn spellcheck_request(
        &self,
        batch_id: &str,
        essay: &EssayRef,
        language: &str,
        event: &EventEnvelope<serde_json::Value>,
    ) -> outpost::Result<OutboxEvent> {
        let data = spellcheck_request(batch_id, essay, language);
        let aggregate = Aggregate::new("essay", &essay.essay_id);
        self.topics.event(
            topic::ESSAY_SPELLCHECK_REQUESTED,
            SERVICE,
            event.correlation_id,
            aggregate,
            &data,
        )
    }

    async fn stage<T: serde::Serialize + Sync>(
        &self,
        tx: &mut OutboxTx,
        base: &str,
        correlation_id: Uuid,
        aggregate: Aggregate,
        data: &T,
    ) -> outpost::Result<()> {
        let event = self
            .topics
            .event(base, SERVICE, correlation_id, aggregate, data)?;
        tx.publish(&event).await
    }
}

/// A spellcheck result recorded in this transaction and not counted yet.
#[derive(Debug)]
struct Recorded {
    batch_id: String,
    succeeded: bool,
    correlation_id: Uuid,
}

/// How a handler holds its batch for the rest of its transaction.
#[derive(Debug, Clone, Copy)]
enum Hold {
    /// Alone: registration and the phase's start, which change the whole batch.
    Whole,
    /// Beside other handlers of one essay each (content, validation failures), which
    /// take a slot each and meet only at the batch row's counts ([`count`]).
    Shared,
}

/// Holds the batch for the rest of the transaction and returns its state; `None` when
/// ELS has not seen its registration.
///
/// The advisory lock also covers a batch that has no row yet, so content that arrives
/// before the registration and the registration itself cannot pass each other, even with
/// several ELS instances. The state is read in a statement of its own, after the lock: a
/// registration committed while this waited is then visible.
async fn lock_batch(
    conn: &mut PgConnection,
    batch_id: &str,
    hold: Hold,
) -> outpost::Result<Option<String>> {
    let (lock, row_lock) = match hold {
        Hold::Whole => ("pg_advisory_xact_lock", "UPDATE"),
        Hold::Shared => ("pg_advisory_xact_lock_shared", "KEY SHARE"),
    };
    sqlx::query(&format!("SELECT {lock}(hashtext('els.batch:' || $1))"))
        .bind(batch_id)
        .execute(&mut *conn)
        .await
        .map_err(handler_db)?;
    sqlx::query_scalar(&format!(
        "SELECT state FROM batches WHERE batch_id = $1 FOR {row_lock}"
    ))
    .bind(batch_id)
    .fetch_optional(conn)
    .await
    .map_err(handler_db)
}

/// Content is placed in slots on the batch state read under a shared lock, which handlers
/// of one batch hold side by side: another may have made the batch ready meanwhile (the
/// count, which waits for its row lock, returns the state as it is now). A slot filled after
/// the batch was announced ready would never be processed: the handler is retried (its
/// transaction rolled back), and finds the batch ready, so the content is excess.
fn placed_in_time(
    batch_id: &str,
    placed: bool,
    decided_on: &str,
    counts: &PgRow,
) -> outpost::Result<()> {
    let now: String = counts.get(0);
    if placed && now != decided_on {
        return Err(outpost::Error::retriable(format!(
            "batch {batch_id} turned {now} while content was placed in a slot; retrying"
        )));
    }
    Ok(())
}

/// Keeps content whose registration is still on its way (topics are not ordered among each
/// other) until it comes.
async fn keep_until_registered(
    conn: &mut PgConnection,
    content: &EssayContentProvisionedV1,
) -> outpost::Result<()> {
    sqlx::query(
        "INSERT INTO pending_content (file_upload_id, batch_id, content) \
         VALUES ($1, $2, $3) ON CONFLICT (file_upload_id) DO NOTHING",
    )
    .bind(&content.file_upload_id)
    .bind(&content.batch_id)
    .bind(Json(content))
    .execute(conn)
    .await
    .map_err(handler_db)?;
    debug!(
        batch_id = content.batch_id,
        "content before registration; kept"
    );
    Ok(())
}

/// Adds `assigned` and `failed` to the batch's counts and returns the batch row as
/// [`EssayLifecycle::check_ready`] reads it. The row stays locked to the commit, which
/// puts the content handlers of a batch in one order: run it last.
async fn count(
    conn: &mut PgConnection,
    batch_id: &str,
    assigned: i32,
    failed: i32,
) -> outpost::Result<PgRow> {
    sqlx::query(
        "UPDATE batches SET assigned = assigned + $2, \
           validation_failed = validation_failed + $3 \
         WHERE batch_id = $1 \
         RETURNING state, expected_essays, course_code, essay_instructions, \
           assigned::bigint, validation_failed::bigint",
    )
    .bind(batch_id)
    .bind(assigned)
    .bind(failed)
    .fetch_one(conn)
    .await
    .map_err(handler_db)
}

/// Locks the batch's first free slot. Handlers of one batch run side by side and each
/// skips the slots the others hold; when every free slot is held, it waits for them, since
/// a handler that rolls back leaves its slot free. Slots never become free again, so what
/// that wait returns is final.
async fn free_slot(conn: &mut PgConnection, batch_id: &str) -> outpost::Result<Option<String>> {
    for wait in ["SKIP LOCKED", ""] {
        // The state is spelled out (not a parameter) so the planner can use the partial
        // index of free slots.
        let slot: Option<String> = sqlx::query_scalar(&format!(
            "SELECT essay_id FROM essays WHERE batch_id = $1 AND state = '{}' \
             ORDER BY slot LIMIT 1 FOR UPDATE {wait}",
            essay_state::AWAITING_CONTENT
        ))
        .bind(batch_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(handler_db)?;
        if slot.is_some() {
            return Ok(slot);
        }
    }
    Ok(None)
}

impl PublishingHandler for EssayLifecycle {
    async fn handle(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        _received: &Received,
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        match event.event_type.as_str() {
            topic::BATCH_ESSAYS_REGISTERED => self.on_registered(event, tx).await,
            topic::ESSAY_CONTENT_PROVISIONED => self.on_content_provisioned(event, tx).await,
            topic::ESSAY_VALIDATION_FAILED => self.on_validation_failed(event, tx).await,
            topic::BATCH_SPELLCHECK_INITIATE_COMMAND => {
                self.on_spellcheck_initiate(event, tx).await
            }
            topic::ESSAY_SPELLCHECK_COMPLETED => self.on_spellcheck_completed(event, tx).await,
            other => Err(OutpostError::permanent(format!(
                "ELS does not handle {other}"
            ))),
        }
    }

    /// Results and contents share their batch's count; other events are handled one by one.
    async fn handle_together(
        &self,
        events: &[(EventEnvelope<serde_json::Value>, &Received)],
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        let all = |base: &str| events.iter().all(|(event, _)| event.event_type == base);
        if all(topic::ESSAY_SPELLCHECK_COMPLETED) {
            return self.on_spellcheck_results(events, tx).await;
        }
        if all(topic::ESSAY_CONTENT_PROVISIONED) {
            return self.on_contents_provisioned(events, tx).await;
        }
        for (event, received) in events {
            self.handle(event, received, tx).await?;
        }
        Ok(())
    }
}

/// The request to check `essay` of `batch_id` in `language`, as HuleEdu's ELS makes it.
pub(crate) fn spellcheck_request(
    batch_id: &str,
    essay: &EssayRef,
    language: &str,
) -> SpellcheckRequested {
    let essay_ref = EntityRef {
        entity_id: essay.essay_id.clone(),
        entity_type: "essay".into(),
        parent_id: Some(batch_id.to_owned()),
    };
    let event_name = "essay.spellcheck.requested";
    SpellcheckRequested {
        event_name: event_name.into(),
        system_metadata: SystemProcessingMetadata::new(
            essay_ref.clone(),
            ProcessingStage::Pending,
            event_name,
        ),
        entity_ref: essay_ref,
        timestamp: Utc::now(),
        status: essay_state::AWAITING_SPELLCHECK.into(),
        text_storage_id: essay.text_storage_id.clone(),
        language: language.to_owned(),
    }
}
