//! The Spellchecker: for each request, fetches the essay's text from the Content Service,
//! corrects it against the dictionary, stores the corrected text, and reports the result.
//! The result row and the result event commit together (transactional mode), which is
//! what HuleEdu's spellchecker, publishing straight to Kafka, could not promise.
//!
//! The corrected text is stored outside the transaction (it goes to another service), under
//! an id derived from the original text's id, so a retried request stores it once.

use std::sync::Arc;

use chrono::Utc;
use outpost::{
    Aggregate, Error as OutpostError, EventEnvelope, OutboxTx, Publisher, PublishingHandler,
    Received,
};
use sqlx::postgres::PgPool;
use sqlx::Row;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::content::{ContentKind, ContentStore};
use crate::els::essay_state;
use crate::error::{handler_db, Error, Result};
use crate::events::{
    decode, topic, EntityRef, ProcessingStage, SpellcheckCompleted, SpellcheckRequested,
    StorageReferenceMetadata, Topics, CORRECTED_TEXT,
};
use crate::spelling::Dictionary;

/// The Spellchecker's service name (`source_service` of its events).
pub const SERVICE: &str = "spellchecker-service";

/// The topics the Spellchecker consumes.
pub const CONSUMES: [&str; 1] = [topic::ESSAY_SPELLCHECK_REQUESTED];

/// One checked essay, as the Spellchecker recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// The essay.
    pub essay_id: String,
    /// `spellchecked_success` or `spellcheck_failed`.
    pub status: String,
    /// Words corrected.
    pub corrections: i32,
    /// Where the corrected text is.
    pub corrected_text_storage_id: Option<String>,
}

/// The service (cheap to clone).
#[derive(Debug, Clone)]
pub struct Spellchecker {
    publisher: Publisher,
    content: ContentStore,
    dictionary: Arc<Dictionary>,
    topics: Topics,
}

impl Spellchecker {
    /// The Spellchecker publishing through `publisher` (whose pool's `search_path` is its
    /// schema), reading and writing texts in `content`.
    pub fn new(
        publisher: Publisher,
        content: ContentStore,
        dictionary: Dictionary,
        topics: Topics,
    ) -> Self {
        Self {
            publisher,
            content,
            dictionary: Arc::new(dictionary),
            topics,
        }
    }

    fn pool(&self) -> &PgPool {
        self.publisher.store().pool()
    }

    /// Creates the results table if it does not exist.
    ///
    /// # Errors
    /// [`Error::Database`] when the DDL fails.
    pub async fn migrate(&self) -> Result<()> {
        // No unique constraint on purpose: an essay checked twice shows as two rows.
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS results ( \
               id                        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
               essay_id                  TEXT NOT NULL, \
               batch_id                  TEXT NOT NULL, \
               original_text_storage_id  TEXT NOT NULL, \
               corrected_text_storage_id TEXT, \
               status                    TEXT NOT NULL, \
               corrections               INT NOT NULL, \
               unknown_words             INT NOT NULL, \
               event_id                  UUID NOT NULL)",
        )
        .execute(self.pool())
        .await
        .map_err(Error::db(SERVICE, "migrate"))?;
        Ok(())
    }

    /// Every result recorded, in the order they were recorded.
    ///
    /// # Errors
    /// [`Error::Database`] when the query fails.
    pub async fn results(&self) -> Result<Vec<CheckResult>> {
        let rows = sqlx::query(
            "SELECT essay_id, status, corrections, corrected_text_storage_id FROM results \
             ORDER BY id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(Error::db(SERVICE, "results"))?;
        Ok(rows
            .iter()
            .map(|r| CheckResult {
                essay_id: r.get(0),
                status: r.get(1),
                corrections: r.get(2),
                corrected_text_storage_id: r.get(3),
            })
            .collect())
    }

    async fn on_requested(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        let request: SpellcheckRequested = decode(event)?;
        let essay_id = request.entity_ref.entity_id.as_str();
        let batch_id = request.entity_ref.parent_id.as_deref().ok_or_else(|| {
            OutpostError::permanent(format!("spellcheck request for {essay_id} names no batch"))
        })?;
        let checked: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM results WHERE essay_id = $1 \
                            AND original_text_storage_id = $2)",
        )
        .bind(essay_id)
        .bind(&request.text_storage_id)
        .fetch_one(&mut **tx)
        .await
        .map_err(handler_db)?;
        if checked {
            debug!(essay_id, "this text was already checked");
            return Ok(());
        }
        let started_at = Utc::now();
        // A missing text is the essay's failure, not the pipeline's: report it failed so
        // the batch can still conclude.
        let text = self
            .content
            .fetch_text(&request.text_storage_id)
            .await
            .map_err(handler_db)?;
        let (status, corrected_id, corrections, unknown) = match text {
            Some(text) => {
                let result = self.dictionary.check(&text);
                let id = Uuid::new_v5(
                    &Uuid::NAMESPACE_OID,
                    format!("corrected:{}", request.text_storage_id).as_bytes(),
                );
                let stored = self
                    .content
                    .store_as(id, ContentKind::CorrectedText, result.corrected.as_bytes())
                    .await
                    .map_err(handler_db)?;
                (
                    essay_state::SPELLCHECKED_SUCCESS,
                    Some(stored),
                    result.corrections,
                    result.unknown,
                )
            }
            None => {
                warn!(
                    essay_id,
                    text_storage_id = request.text_storage_id,
                    "text not found"
                );
                (essay_state::SPELLCHECK_FAILED, None, 0, 0)
            }
        };
        sqlx::query(
            "INSERT INTO results (essay_id, batch_id, original_text_storage_id, \
             corrected_text_storage_id, status, corrections, unknown_words, event_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(essay_id)
        .bind(batch_id)
        .bind(&request.text_storage_id)
        .bind(&corrected_id)
        .bind(status)
        .bind(i32::try_from(corrections).unwrap_or(i32::MAX))
        .bind(i32::try_from(unknown).unwrap_or(i32::MAX))
        .bind(event.event_id)
        .execute(&mut **tx)
        .await
        .map_err(handler_db)?;
        let event_name = "essay.spellcheck.completed";
        // The request's metadata carries on (as in HuleEdu), now saying how it ended.
        let mut system_metadata = request.system_metadata;
        let now = Utc::now();
        system_metadata.timestamp = now;
        system_metadata.started_at = Some(started_at);
        system_metadata.completed_at = Some(now);
        system_metadata.event = Some(event_name.to_owned());
        system_metadata.processing_stage = Some(if corrected_id.is_some() {
            ProcessingStage::Completed
        } else {
            system_metadata
                .error_info
                .insert("reason".into(), "text not found".into());
            system_metadata.error_info.insert(
                "text_storage_id".into(),
                request.text_storage_id.clone().into(),
            );
            ProcessingStage::Failed
        });
        let result = SpellcheckCompleted {
            event_name: event_name.into(),
            entity_ref: EntityRef {
                entity_id: essay_id.to_owned(),
                entity_type: "essay".into(),
                parent_id: Some(batch_id.to_owned()),
            },
            timestamp: now,
            status: status.to_owned(),
            system_metadata,
            original_text_storage_id: request.text_storage_id.clone(),
            storage_metadata: corrected_id
                .map(|id| StorageReferenceMetadata::single(CORRECTED_TEXT, id)),
            corrections_made: corrections,
        };
        tx.publish(&self.topics.event(
            topic::ESSAY_SPELLCHECK_COMPLETED,
            SERVICE,
            event.correlation_id,
            Aggregate::new("essay", essay_id),
            &result,
        )?)
        .await
    }
}

impl PublishingHandler for Spellchecker {
    async fn handle(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        _received: &Received,
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        match event.event_type.as_str() {
            topic::ESSAY_SPELLCHECK_REQUESTED => self.on_requested(event, tx).await,
            other => Err(OutpostError::permanent(format!(
                "the spellchecker does not handle {other}"
            ))),
        }
    }
}
