//! The Spellchecker: for each request, fetches the essay's text from the Content Service,
//! corrects it against the dictionary, stores the corrected text, and reports the result.
//! The result row and the result event commit together (transactional mode), which is
//! what HuleEdu's spellchecker, publishing straight to Kafka, could not promise.
//!
//! The corrected text is stored outside the transaction (it goes to another service), under
//! an id derived from the original text's id, so a retried request stores it once.

use std::sync::Arc;

use chrono::{DateTime, Utc};
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
    decode, topic, ProcessingStage, SpellcheckCompleted, SpellcheckRequested,
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
        let result = completed(request, started_at, corrected_id, corrections);
        tx.publish(&self.topics.event(
            topic::ESSAY_SPELLCHECK_COMPLETED,
            SERVICE,
            event.correlation_id,
            Aggregate::new("essay", &result.entity_ref.entity_id),
            &result,
        )?)
        .await
    }
}

/// The result of checking `request`'s text, begun at `started_at`: its corrected text
/// stored as `corrected` with `corrections` made, or (`None`) the text was not found.
fn completed(
    request: SpellcheckRequested,
    started_at: DateTime<Utc>,
    corrected: Option<String>,
    corrections: u32,
) -> SpellcheckCompleted {
    let event_name = "essay.spellcheck.completed";
    // The request's metadata carries on (as in HuleEdu), now saying how it ended.
    let mut system_metadata = request.system_metadata;
    let now = Utc::now();
    system_metadata.timestamp = now;
    system_metadata.started_at = Some(started_at);
    system_metadata.completed_at = Some(now);
    system_metadata.event = Some(event_name.to_owned());
    let (status, stage) = if corrected.is_some() {
        (
            essay_state::SPELLCHECKED_SUCCESS,
            ProcessingStage::Completed,
        )
    } else {
        let info = &mut system_metadata.error_info;
        info.insert("reason".into(), "text not found".into());
        info.insert(
            "text_storage_id".into(),
            request.text_storage_id.clone().into(),
        );
        (essay_state::SPELLCHECK_FAILED, ProcessingStage::Failed)
    };
    system_metadata.processing_stage = Some(stage);
    SpellcheckCompleted {
        event_name: event_name.into(),
        entity_ref: request.entity_ref,
        timestamp: now,
        status: status.to_owned(),
        system_metadata,
        original_text_storage_id: request.text_storage_id,
        storage_metadata: corrected.map(|id| StorageReferenceMetadata::single(CORRECTED_TEXT, id)),
        corrections_made: corrections,
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

#[cfg(test)]
mod tests {
    use outpost::EventEnvelope;

    use super::*;
    use crate::contract::Contract;
    use crate::els;
    use crate::events::EssayRef;

    /// Both outcomes of a check, from a request as ELS makes it, follow HuleEdu's schema
    /// (the pipeline runs only ever see the successful one).
    #[test]
    fn results_follow_the_wire_contract() {
        let contract = Contract::new();
        let essay = EssayRef {
            essay_id: Uuid::new_v4().to_string(),
            text_storage_id: Uuid::new_v4().to_string(),
        };
        let request = els::spellcheck_request("batch-1", &essay, "en");
        let check = |base: &str, data: serde_json::Value| {
            let envelope = EventEnvelope::new(base, SERVICE, data);
            contract.check_event(base, Some(&serde_json::to_vec(&envelope).unwrap()))
        };
        assert_eq!(
            check(
                topic::ESSAY_SPELLCHECK_REQUESTED,
                serde_json::to_value(&request).unwrap()
            ),
            Vec::<String>::new()
        );
        for corrected in [Some(Uuid::new_v4().to_string()), None] {
            let result = completed(request.clone(), Utc::now(), corrected.clone(), 3);
            assert_eq!(result.corrected_text_storage_id(), corrected.as_deref());
            assert_eq!(
                check(
                    topic::ESSAY_SPELLCHECK_COMPLETED,
                    serde_json::to_value(&result).unwrap()
                ),
                Vec::<String>::new(),
                "{result:?}"
            );
        }
    }
}
