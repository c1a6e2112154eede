//! The Batch Orchestrator Service (BOS): registers a batch of essay slots, starts the
//! spellcheck phase once the Essay Lifecycle Service reports the batch ready, and completes
//! the batch on the phase outcome. Each state change commits together with the event it
//! causes (transactional mode), so the batch and its announcements never disagree.
//!
//! Batch states: `awaiting_content` → `spellcheck_in_progress` → `completed` (or
//! `completed_with_failures`). Every change is also appended to `batch_transitions` with
//! the event that caused it, which is how the tests see that each happened exactly once.

use chrono::Utc;
use outpost::{
    Aggregate, Error as OutpostError, EventEnvelope, OutboxTx, Publisher, PublishingHandler,
    Received,
};
use sqlx::postgres::PgPool;
use sqlx::types::Json;
use sqlx::Row;
use tracing::{debug, info};
use uuid::Uuid;

use crate::error::{handler_db, Error, Result};
use crate::events::{
    decode, topic, BatchEssaysReady, BatchEssaysRegistered, ElsBatchPhaseOutcomeV1, EntityRef,
    ProcessingStage, SpellcheckInitiateCommand, SystemProcessingMetadata, Topics,
};

/// BOS's service name (`source_service` of its events).
pub const SERVICE: &str = "batch-service";

/// The topics BOS consumes.
pub const CONSUMES: [&str; 2] = [topic::BATCH_ESSAYS_READY, topic::ELS_BATCH_PHASE_OUTCOME];

/// Batch states.
pub mod state {
    /// Registered; ELS is collecting content.
    pub const AWAITING_CONTENT: &str = "awaiting_content";
    /// Spellcheck initiated.
    pub const SPELLCHECK_IN_PROGRESS: &str = "spellcheck_in_progress";
    /// Every essay went through.
    pub const COMPLETED: &str = "completed";
    /// The phase finished, some essays failed it.
    pub const COMPLETED_WITH_FAILURES: &str = "completed_with_failures";
}

/// The course codes HuleEdu knows (the contract's `CourseCode`).
pub const COURSE_CODES: [&str; 6] = ["ENG5", "ENG6", "ENG7", "SV1", "SV2", "SV3"];

/// What a teacher asks BOS for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRequest {
    /// How many essays will be uploaded.
    pub expected_essay_count: u32,
    /// Course code, one of [`COURSE_CODES`].
    pub course_code: String,
    /// Instructions given to the students.
    pub essay_instructions: String,
    /// The teacher.
    pub user_id: String,
}

/// What registering returns to the client (HuleEdu's API response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The new batch.
    pub batch_id: String,
    /// Its essay slots.
    pub essay_ids: Vec<String>,
    /// Correlation id of everything the batch causes.
    pub correlation_id: Uuid,
}

/// The service (cheap to clone).
#[derive(Debug, Clone)]
pub struct BatchOrchestrator {
    publisher: Publisher,
    topics: Topics,
}

impl BatchOrchestrator {
    /// BOS publishing through `publisher`, whose pool's `search_path` is BOS's schema.
    pub fn new(publisher: Publisher, topics: Topics) -> Self {
        Self { publisher, topics }
    }

    fn pool(&self) -> &PgPool {
        self.publisher.store().pool()
    }

    /// Creates BOS's tables if they do not exist.
    ///
    /// # Errors
    /// [`Error::Database`] when the DDL fails.
    pub async fn migrate(&self) -> Result<()> {
        let ddl = [
            "CREATE TABLE IF NOT EXISTS batches ( \
               batch_id             TEXT PRIMARY KEY, \
               expected_essay_count INT NOT NULL, \
               essay_ids            JSONB NOT NULL, \
               course_code          TEXT NOT NULL, \
               essay_instructions   TEXT NOT NULL, \
               user_id              TEXT NOT NULL, \
               correlation_id       UUID NOT NULL, \
               state                TEXT NOT NULL, \
               ready_essays         JSONB, \
               validation_failures  INT, \
               processed_essays     JSONB, \
               failed_essay_ids     JSONB)",
            // No unique constraint on purpose: a change applied twice shows as two rows.
            "CREATE TABLE IF NOT EXISTS batch_transitions ( \
               id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
               batch_id   TEXT NOT NULL, \
               from_state TEXT, \
               to_state   TEXT NOT NULL, \
               event_id   UUID, \
               at         TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
        ];
        for stmt in ddl {
            sqlx::query(stmt)
                .execute(self.pool())
                .await
                .map_err(Error::db(SERVICE, "migrate"))?;
        }
        Ok(())
    }

    /// Registers a batch of `expected_essay_count` slots and announces it
    /// (`BatchEssaysRegistered`, key batch_id) in the same transaction.
    ///
    /// # Errors
    /// [`Error::Database`] or [`Error::Outpost`] when the transaction fails (then nothing
    /// was registered and nothing announced).
    pub async fn register_batch(&self, request: &BatchRequest) -> Result<Registration> {
        // The contract's `CourseCode`: another value would go out in events that break it.
        if !COURSE_CODES.contains(&request.course_code.as_str()) {
            return Err(outpost::Error::config(
                "course_code",
                format!("one of {}", COURSE_CODES.join(", ")),
                &request.course_code,
            )
            .into());
        }
        let batch_id = Uuid::new_v4().to_string();
        let essay_ids: Vec<String> = (0..request.expected_essay_count)
            .map(|_| Uuid::new_v4().to_string())
            .collect();
        let correlation_id = Uuid::new_v4();
        let registered = registration(&batch_id, essay_ids.clone(), request);
        let event = self.topics.event(
            topic::BATCH_ESSAYS_REGISTERED,
            SERVICE,
            correlation_id,
            Aggregate::new("batch", &batch_id),
            &registered,
        )?;
        let db = |operation| Error::db(SERVICE, operation);
        let mut tx = self.publisher.begin().await?;
        sqlx::query(
            "INSERT INTO batches (batch_id, expected_essay_count, essay_ids, course_code, \
             essay_instructions, user_id, correlation_id, state) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&batch_id)
        .bind(i32::try_from(request.expected_essay_count).unwrap_or(i32::MAX))
        .bind(Json(&essay_ids))
        .bind(&request.course_code)
        .bind(&request.essay_instructions)
        .bind(&request.user_id)
        .bind(correlation_id)
        .bind(state::AWAITING_CONTENT)
        .execute(&mut *tx)
        .await
        .map_err(db("register_batch"))?;
        record_transition(&mut tx, &batch_id, None, state::AWAITING_CONTENT, None)
            .await
            .map_err(db("register_batch"))?;
        tx.publish(&event).await?;
        tx.commit().await?;
        info!(batch_id, essays = essay_ids.len(), "batch registered");
        Ok(Registration {
            batch_id,
            essay_ids,
            correlation_id,
        })
    }

    /// The batch's state, if it exists.
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

    /// Every state change of the batch, oldest first: `(from, to)`.
    ///
    /// # Errors
    /// [`Error::Database`] when the query fails.
    pub async fn transitions(&self, batch_id: &str) -> Result<Vec<(Option<String>, String)>> {
        let rows = sqlx::query(
            "SELECT from_state, to_state FROM batch_transitions WHERE batch_id = $1 ORDER BY id",
        )
        .bind(batch_id)
        .fetch_all(self.pool())
        .await
        .map_err(Error::db(SERVICE, "transitions"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// On `BatchEssaysReady`: store the ready essays and issue the spellcheck initiate
    /// command (key batch_id).
    async fn on_ready(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        let ready: BatchEssaysReady = decode(event)?;
        if !lock_in_state(tx, &ready.batch_id, state::AWAITING_CONTENT).await? {
            return Ok(());
        }
        let failures = ready.validation_failures.as_ref().map_or(0, Vec::len);
        sqlx::query(
            "UPDATE batches SET state = $2, ready_essays = $3, validation_failures = $4 \
             WHERE batch_id = $1",
        )
        .bind(&ready.batch_id)
        .bind(state::SPELLCHECK_IN_PROGRESS)
        .bind(Json(&ready.ready_essays))
        .bind(i32::try_from(failures).unwrap_or(i32::MAX))
        .execute(&mut **tx)
        .await
        .map_err(handler_db)?;
        record_transition(
            tx,
            &ready.batch_id,
            Some(state::AWAITING_CONTENT),
            state::SPELLCHECK_IN_PROGRESS,
            Some(event.event_id),
        )
        .await
        .map_err(handler_db)?;
        let command = SpellcheckInitiateCommand {
            event_name: "batch.spellcheck.initiate.command".into(),
            entity_ref: EntityRef {
                entity_id: ready.batch_id.clone(),
                entity_type: "batch".into(),
                parent_id: None,
            },
            timestamp: Utc::now(),
            essays_to_process: ready.ready_essays,
            language: ready.course_language,
        };
        tx.publish(&self.topics.event(
            topic::BATCH_SPELLCHECK_INITIATE_COMMAND,
            SERVICE,
            event.correlation_id,
            Aggregate::new("batch", &ready.batch_id),
            &command,
        )?)
        .await
    }

    /// On the phase outcome: complete the batch.
    async fn on_outcome(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        let outcome: ElsBatchPhaseOutcomeV1 = decode(event)?;
        if !lock_in_state(tx, &outcome.batch_id, state::SPELLCHECK_IN_PROGRESS).await? {
            return Ok(());
        }
        let done = if outcome.failed_essay_ids.is_empty()
            && outcome.phase_status == "completed_successfully"
        {
            state::COMPLETED
        } else {
            state::COMPLETED_WITH_FAILURES
        };
        sqlx::query(
            "UPDATE batches SET state = $2, processed_essays = $3, failed_essay_ids = $4 \
             WHERE batch_id = $1",
        )
        .bind(&outcome.batch_id)
        .bind(done)
        .bind(Json(&outcome.processed_essays))
        .bind(Json(&outcome.failed_essay_ids))
        .execute(&mut **tx)
        .await
        .map_err(handler_db)?;
        record_transition(
            tx,
            &outcome.batch_id,
            Some(state::SPELLCHECK_IN_PROGRESS),
            done,
            Some(event.event_id),
        )
        .await
        .map_err(handler_db)?;
        info!(batch_id = outcome.batch_id, state = done, "batch finished");
        Ok(())
    }
}

/// Locks the batch row; `true` when it is in `expected`. A batch already past it means
/// a second event with the same meaning (not a redelivery, which the inbox stops): it
/// changes nothing. An unknown batch can never be handled: dead-letter the event.
async fn lock_in_state(tx: &mut OutboxTx, batch_id: &str, expected: &str) -> outpost::Result<bool> {
    let current: Option<String> =
        sqlx::query_scalar("SELECT state FROM batches WHERE batch_id = $1 FOR UPDATE")
            .bind(batch_id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(handler_db)?;
    match current {
        None => Err(OutpostError::permanent(format!("unknown batch {batch_id}"))),
        Some(state) if state == expected => Ok(true),
        Some(state) => {
            debug!(
                batch_id,
                state, expected, "batch already past this step; nothing to do"
            );
            Ok(false)
        }
    }
}

async fn record_transition(
    conn: &mut sqlx::PgConnection,
    batch_id: &str,
    from: Option<&str>,
    to: &str,
    event_id: Option<Uuid>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO batch_transitions (batch_id, from_state, to_state, event_id) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(batch_id)
    .bind(from)
    .bind(to)
    .bind(event_id)
    .execute(conn)
    .await
    .map(|_| ())
}

impl PublishingHandler for BatchOrchestrator {
    async fn handle(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        _received: &Received,
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        match event.event_type.as_str() {
            topic::BATCH_ESSAYS_READY => self.on_ready(event, tx).await,
            topic::ELS_BATCH_PHASE_OUTCOME => self.on_outcome(event, tx).await,
            other => Err(OutpostError::permanent(format!(
                "BOS does not handle {other}"
            ))),
        }
    }
}

/// The registration BOS announces for `request`, with slots `essay_ids`.
pub fn registration(
    batch_id: &str,
    essay_ids: Vec<String>,
    request: &BatchRequest,
) -> BatchEssaysRegistered {
    BatchEssaysRegistered {
        event: "batch.essays.registered".into(),
        batch_id: batch_id.to_owned(),
        expected_essay_count: request.expected_essay_count,
        essay_ids,
        metadata: SystemProcessingMetadata::new(
            EntityRef {
                entity_id: batch_id.to_owned(),
                entity_type: "batch".into(),
                parent_id: None,
            },
            ProcessingStage::Pending,
            "batch.essays.registered",
        ),
        course_code: request.course_code.clone(),
        essay_instructions: request.essay_instructions.clone(),
        user_id: request.user_id.clone(),
    }
}
