//! The Spellchecker: for each request, fetches the essay's text from the Content Service,
//! corrects it against the dictionary, stores the corrected text, and reports the result.
//! The result row and the result event commit together (transactional mode), which is
//! what HuleEdu's spellchecker, publishing straight to Kafka, could not promise.
//!
//! The corrected text is stored outside the transaction (it goes to another service), under
//! an id derived from the original text's id, so a retried request stores it once.

use std::collections::HashSet;
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

    /// Checks each requested essay once: one statement to skip what was already checked,
    /// one to fetch the texts, one to store the corrected texts, one for the results and
    /// one staging every result event, however many requests there are.
    async fn on_requested(
        &self,
        events: &[&EventEnvelope<serde_json::Value>],
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        let mut requests = Vec::with_capacity(events.len());
        for event in events {
            if event.event_type != topic::ESSAY_SPELLCHECK_REQUESTED {
                return Err(OutpostError::permanent(format!(
                    "the spellchecker does not handle {}",
                    event.event_type
                )));
            }
            let request: SpellcheckRequested = decode(event)?;
            if request.entity_ref.parent_id.is_none() {
                return Err(OutpostError::permanent(format!(
                    "spellcheck request for {} names no batch",
                    request.entity_ref.entity_id
                )));
            }
            requests.push((*event, request));
        }
        let column = |f: fn(&SpellcheckRequested) -> &str| -> Vec<&str> {
            requests.iter().map(|(_, r)| f(r)).collect()
        };
        let checked: Vec<(String, String)> = sqlx::query_as(
            "SELECT r.essay_id, r.original_text_storage_id FROM results r \
             JOIN UNNEST($1::text[], $2::text[]) AS t (essay, text) \
               ON r.essay_id = t.essay AND r.original_text_storage_id = t.text",
        )
        .bind(column(|r| &r.entity_ref.entity_id))
        .bind(column(|r| &r.text_storage_id))
        .fetch_all(&mut **tx)
        .await
        .map_err(handler_db)?;
        // A request seen before, here or earlier in this unit, checks nothing again.
        let mut seen: HashSet<(String, String)> = checked.into_iter().collect();
        requests.retain(|(_, r)| {
            let new = seen.insert((r.entity_ref.entity_id.clone(), r.text_storage_id.clone()));
            if !new {
                debug!(
                    essay_id = r.entity_ref.entity_id,
                    "this text was already checked"
                );
            }
            new
        });
        if requests.is_empty() {
            return Ok(());
        }
        let started_at = Utc::now();
        let text_ids: Vec<&str> = requests
            .iter()
            .map(|(_, r)| r.text_storage_id.as_str())
            .collect();
        let texts = self
            .content
            .fetch_texts(&text_ids)
            .await
            .map_err(handler_db)?;
        let mut corrected_texts: Vec<(Uuid, String)> = Vec::new();
        let mut rows = Vec::with_capacity(requests.len());
        for (event, request) in requests {
            // A missing text is the essay's failure, not the pipeline's: report it failed so
            // the batch can still conclude.
            let checked = match texts.get(&request.text_storage_id) {
                Some(text) => {
                    let result = self.dictionary.check(text);
                    let id = Uuid::new_v5(
                        &Uuid::NAMESPACE_OID,
                        format!("corrected:{}", request.text_storage_id).as_bytes(),
                    );
                    corrected_texts.push((id, result.corrected));
                    Checked {
                        status: essay_state::SPELLCHECKED_SUCCESS,
                        corrected_id: Some(id.to_string()),
                        corrections: result.corrections,
                        unknown: result.unknown,
                    }
                }
                None => {
                    warn!(
                        essay_id = request.entity_ref.entity_id,
                        text_storage_id = request.text_storage_id,
                        "text not found"
                    );
                    Checked {
                        status: essay_state::SPELLCHECK_FAILED,
                        corrected_id: None,
                        corrections: 0,
                        unknown: 0,
                    }
                }
            };
            rows.push((event, request, checked));
        }
        let ids: Vec<Uuid> = corrected_texts.iter().map(|(id, _)| *id).collect();
        let bodies: Vec<&[u8]> = corrected_texts.iter().map(|(_, t)| t.as_bytes()).collect();
        self.content
            .store_many_as(&ids, ContentKind::CorrectedText, &bodies)
            .await
            .map_err(handler_db)?;
        let count = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        sqlx::query(
            "INSERT INTO results (essay_id, batch_id, original_text_storage_id, \
             corrected_text_storage_id, status, corrections, unknown_words, event_id) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                                  $6::int[], $7::int[], $8::uuid[])",
        )
        .bind(
            rows.iter()
                .map(|r| r.1.entity_ref.entity_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.1.entity_ref.parent_id.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.1.text_storage_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.2.corrected_id.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.2.status).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| count(r.2.corrections))
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| count(r.2.unknown)).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.0.event_id).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await
        .map_err(handler_db)?;
        let mut results = Vec::with_capacity(rows.len());
        for (event, request, checked) in rows {
            let result = completed(
                request,
                started_at,
                checked.corrected_id,
                checked.corrections,
            );
            results.push(self.topics.event(
                topic::ESSAY_SPELLCHECK_COMPLETED,
                SERVICE,
                event.correlation_id,
                Aggregate::new("essay", &result.entity_ref.entity_id),
                &result,
            )?);
        }
        tx.publish_all(&results).await
    }
}

/// How one essay's check went.
struct Checked {
    status: &'static str,
    corrected_id: Option<String>,
    corrections: u32,
    unknown: u32,
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
        corrections_made: Some(corrections),
    }
}

impl PublishingHandler for Spellchecker {
    async fn handle(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        _received: &Received,
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        self.on_requested(&[event], tx).await
    }

    async fn handle_together(
        &self,
        events: &[(EventEnvelope<serde_json::Value>, &Received)],
        tx: &mut OutboxTx,
    ) -> outpost::Result<()> {
        let events: Vec<&EventEnvelope<serde_json::Value>> =
            events.iter().map(|(e, _)| e).collect();
        self.on_requested(&events, tx).await
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
