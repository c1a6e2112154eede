//! The event contract (HuleEdu's `common_core`): topic names and payloads, field for field
//! as `../shared/reference/huleedu.md` section 2 and 4 describe them, plus [`Topics`], the
//! names one pipeline run actually uses, and the helpers that wrap a payload in an
//! envelope and unwrap it again.
//!
//! As in HuleEdu, an event's type is its (base) topic name; a run's topics may carry a
//! suffix, its event types never do.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use outpost::{Aggregate, EventEnvelope, OutboxEvent};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Topic names (`topic_name(ProcessingEvent.X)`), plus ELS's hard-coded ones.
pub mod topic {
    /// BOS → ELS: a batch with N essay slots exists.
    pub const BATCH_ESSAYS_REGISTERED: &str = "huleedu.batch.essays.registered.v1";
    /// File Service → ELS: an essay's text was stored.
    pub const ESSAY_CONTENT_PROVISIONED: &str = "huleedu.file.essay.content.provisioned.v1";
    /// File Service → ELS: a file failed validation.
    pub const ESSAY_VALIDATION_FAILED: &str = "huleedu.file.essay.validation.failed.v1";
    /// File Service → UI: a file was added to a batch.
    pub const BATCH_FILE_ADDED: &str = "huleedu.file.batch.file.added.v1";
    /// File Service → UI: a file was removed from a batch.
    pub const BATCH_FILE_REMOVED: &str = "huleedu.file.batch.file.removed.v1";
    /// ELS → RAS: content was assigned to a slot.
    pub const ESSAY_SLOT_ASSIGNED: &str = "huleedu.els.essay.slot.assigned.v1";
    /// ELS: content arrived with no free slot.
    pub const EXCESS_CONTENT_PROVISIONED: &str = "huleedu.els.excess.content.provisioned.v1";
    /// ELS → BOS: every slot is filled or failed.
    pub const BATCH_ESSAYS_READY: &str = "huleedu.els.batch.essays.ready.v1";
    /// BOS → ELS: start the spellcheck phase (note `els`, not `batch`).
    pub const BATCH_SPELLCHECK_INITIATE_COMMAND: &str =
        "huleedu.els.spellcheck.initiate.command.v1";
    /// ELS → Spellchecker: check one essay.
    pub const ESSAY_SPELLCHECK_REQUESTED: &str = "huleedu.essay.spellcheck.requested.v1";
    /// Spellchecker → ELS: one essay checked.
    pub const ESSAY_SPELLCHECK_COMPLETED: &str = "huleedu.essay.spellcheck.completed.v1";
    /// ELS → BOS: a phase finished for the batch.
    pub const ELS_BATCH_PHASE_OUTCOME: &str = "huleedu.els.batch.phase.outcome.v1";
    /// ELS: an essay's status changed (hard-coded topic in HuleEdu).
    pub const ESSAY_STATUS: &str = "essay.status.events";
    /// ELS: phase progress counts (hard-coded topic in HuleEdu).
    pub const BATCH_PHASE_PROGRESS: &str = "batch.phase.progress.events";
    /// ELS: a phase concluded (hard-coded topic in HuleEdu).
    pub const BATCH_PHASE_CONCLUDED: &str = "batch.phase.concluded.events";

    /// Every topic the pipeline uses.
    pub const ALL: [&str; 15] = [
        BATCH_ESSAYS_REGISTERED,
        ESSAY_CONTENT_PROVISIONED,
        ESSAY_VALIDATION_FAILED,
        BATCH_FILE_ADDED,
        BATCH_FILE_REMOVED,
        ESSAY_SLOT_ASSIGNED,
        EXCESS_CONTENT_PROVISIONED,
        BATCH_ESSAYS_READY,
        BATCH_SPELLCHECK_INITIATE_COMMAND,
        ESSAY_SPELLCHECK_REQUESTED,
        ESSAY_SPELLCHECK_COMPLETED,
        ELS_BATCH_PHASE_OUTCOME,
        ESSAY_STATUS,
        BATCH_PHASE_PROGRESS,
        BATCH_PHASE_CONCLUDED,
    ];
}

/// The topic names of one pipeline run: HuleEdu's, optionally followed by a suffix so
/// concurrent runs on one broker (the tests) never see each other's events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topics {
    suffix: String,
}

impl Topics {
    /// Exactly HuleEdu's names (on a broker that has never carried them; see
    /// [`PipelineConfig::topics`](crate::PipelineConfig::topics)).
    pub fn huleedu() -> Self {
        Self::default()
    }

    /// HuleEdu's names followed by `.{run}`; `run` is reduced to `[a-z0-9-]`.
    pub fn with_suffix(run: &str) -> Self {
        let clean: String = run
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        Self {
            suffix: format!(".{clean}"),
        }
    }

    /// Whether the names carry a run's suffix (so the run owns the topics).
    pub fn is_run_specific(&self) -> bool {
        !self.suffix.is_empty()
    }

    /// The topic this run uses for `base` (one of [`topic`]'s constants).
    pub fn name(&self, base: &str) -> String {
        format!("{base}{}", self.suffix)
    }

    /// The dead-letter topic of `service` (a HuleEdu service name).
    pub fn dead_letter(&self, service: &str) -> String {
        self.name(&format!("huleedu.{service}.dead-letter.v1"))
    }

    /// Serializes `data` as the payload of a `base` event from `source_service`, in an
    /// envelope carrying `correlation_id`, keyed by the aggregate's id.
    ///
    /// # Errors
    /// [`outpost::Error::Serialization`] when `data` cannot be serialized.
    pub fn event<T: Serialize>(
        &self,
        base: &str,
        source_service: &str,
        correlation_id: Uuid,
        aggregate: Aggregate,
        data: &T,
    ) -> outpost::Result<OutboxEvent> {
        let envelope =
            EventEnvelope::new(base, source_service, data).with_correlation_id(correlation_id);
        OutboxEvent::from_envelope(&envelope, self.name(base), aggregate)
    }
}

/// The typed payload of a consumed event.
///
/// # Errors
/// A [permanent](outpost::Error::permanent) handler error when the payload does not match
/// `T`: handling it again cannot help, so the consumer dead-letters it.
pub fn decode<T: DeserializeOwned>(event: &EventEnvelope<serde_json::Value>) -> outpost::Result<T> {
    T::deserialize(&event.data).map_err(|e| {
        outpost::Error::permanent(format!("malformed {} payload: {e}", event.event_type))
    })
}

/// Reference to an entity (`entity_ref`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityRef {
    /// The entity's id.
    pub entity_id: String,
    /// `batch` or `essay`.
    pub entity_type: String,
    /// The enclosing entity (an essay's batch).
    #[serde(default)]
    pub parent_id: Option<String>,
}

/// `ProcessingStage`: where an entity's processing stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessingStage {
    /// Not started.
    Pending,
    /// Set up, not yet running.
    Initialized,
    /// Running.
    Processing,
    /// Finished.
    Completed,
    /// Gave up.
    Failed,
    /// Withdrawn.
    Cancelled,
}

/// `SystemProcessingMetadata`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemProcessingMetadata {
    /// The entity processed.
    pub entity: EntityRef,
    /// When this metadata was written.
    #[serde(default = "Utc::now")]
    pub timestamp: DateTime<Utc>,
    /// When processing started.
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    /// When processing ended.
    #[serde(default)]
    pub completed_at: Option<DateTime<Utc>>,
    /// Processing stage.
    #[serde(default)]
    pub processing_stage: Option<ProcessingStage>,
    /// The event (a `ProcessingEvent` value) this metadata travels with.
    #[serde(default)]
    pub event: Option<String>,
    /// What went wrong, when something did (an object, never null, in HuleEdu's model).
    #[serde(default)]
    pub error_info: serde_json::Map<String, serde_json::Value>,
}

impl SystemProcessingMetadata {
    /// Metadata written now for `event` about `entity` at `stage`.
    pub fn new(entity: EntityRef, stage: ProcessingStage, event: &str) -> Self {
        Self {
            entity,
            timestamp: Utc::now(),
            started_at: None,
            completed_at: None,
            processing_stage: Some(stage),
            event: Some(event.to_owned()),
            error_info: serde_json::Map::new(),
        }
    }
}

/// `ContentType` key of the corrected text in a [`StorageReferenceMetadata`].
pub const CORRECTED_TEXT: &str = "corrected_text";

/// `StorageReferenceMetadata`: where a result's content is stored, by content type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageReferenceMetadata {
    /// Content type (`ContentType` value) → named storage ids (HuleEdu names the only
    /// one `default`).
    #[serde(default)]
    pub references: BTreeMap<String, BTreeMap<String, String>>,
}

impl StorageReferenceMetadata {
    /// A single reference: `content_type` stored as `storage_id`.
    pub fn single(content_type: &str, storage_id: String) -> Self {
        let named = BTreeMap::from([("default".to_owned(), storage_id)]);
        Self {
            references: BTreeMap::from([(content_type.to_owned(), named)]),
        }
    }

    /// The storage id of `content_type`, if referenced.
    pub fn get(&self, content_type: &str) -> Option<&str> {
        self.references
            .get(content_type)?
            .get("default")
            .map(String::as_str)
    }
}

/// `BatchEssaysRegistered`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchEssaysRegistered {
    /// Event name.
    #[serde(default)]
    pub event: String,
    /// The batch.
    pub batch_id: String,
    /// How many essays the batch expects.
    pub expected_essay_count: u32,
    /// Slot ids generated by BOS.
    pub essay_ids: Vec<String>,
    /// Processing metadata.
    pub metadata: SystemProcessingMetadata,
    /// Course code, e.g. `ENG5`.
    pub course_code: String,
    /// Instructions given to students.
    pub essay_instructions: String,
    /// The teacher.
    pub user_id: String,
}

/// `EssayContentProvisionedV1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EssayContentProvisionedV1 {
    /// Event name.
    #[serde(default)]
    pub event: String,
    /// The batch.
    pub batch_id: String,
    /// The upload.
    pub file_upload_id: String,
    /// Name of the uploaded file.
    pub original_file_name: String,
    /// Where the raw file is stored.
    pub raw_file_storage_id: String,
    /// Where the extracted text is stored.
    pub text_storage_id: String,
    /// Size of the raw file.
    pub file_size_bytes: u64,
    /// MD5 of the text, hex.
    #[serde(default)]
    pub content_md5_hash: Option<String>,
    /// Correlation id.
    #[serde(default = "Uuid::new_v4")]
    pub correlation_id: Uuid,
    /// When it happened.
    #[serde(default = "Utc::now")]
    pub timestamp: DateTime<Utc>,
}

/// `ErrorDetail` as carried inside a validation failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationErrorDetail {
    /// Error code.
    pub error_code: String,
    /// Message.
    pub message: String,
    /// Correlation id.
    #[serde(default = "Uuid::new_v4")]
    pub correlation_id: Uuid,
    /// When.
    #[serde(default = "Utc::now")]
    pub timestamp: DateTime<Utc>,
    /// Service.
    pub service: String,
    /// Operation.
    pub operation: String,
    /// Extra fields.
    #[serde(default)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// `EssayValidationFailedV1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EssayValidationFailedV1 {
    /// Event name.
    #[serde(default)]
    pub event: String,
    /// The batch.
    pub batch_id: String,
    /// The upload.
    pub file_upload_id: String,
    /// Name of the uploaded file.
    pub original_file_name: String,
    /// Where the raw file is stored.
    pub raw_file_storage_id: String,
    /// `EMPTY_CONTENT`, `CONTENT_TOO_SHORT`, `CONTENT_TOO_LONG`.
    pub validation_error_code: String,
    /// The structured error.
    pub validation_error_detail: ValidationErrorDetail,
    /// Size of the raw file.
    pub file_size_bytes: u64,
    /// Correlation id.
    #[serde(default = "Uuid::new_v4")]
    pub correlation_id: Uuid,
    /// When.
    #[serde(default = "Utc::now")]
    pub timestamp: DateTime<Utc>,
}

/// `BatchFileAddedV1` / `BatchFileRemovedV1` (same fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchFileChangedV1 {
    /// Event name.
    #[serde(default)]
    pub event: String,
    /// The batch.
    pub batch_id: String,
    /// The upload.
    pub file_upload_id: String,
    /// File name.
    pub filename: String,
    /// The teacher.
    pub user_id: String,
    /// Correlation id.
    #[serde(default = "Uuid::new_v4")]
    pub correlation_id: Uuid,
    /// When.
    #[serde(default = "Utc::now")]
    pub timestamp: DateTime<Utc>,
}

/// `EssaySlotAssignedV1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EssaySlotAssignedV1 {
    /// Event name.
    #[serde(default)]
    pub event: String,
    /// The batch.
    pub batch_id: String,
    /// The slot.
    pub essay_id: String,
    /// The upload assigned to it.
    pub file_upload_id: String,
    /// Its text.
    pub text_storage_id: String,
    /// Correlation id.
    #[serde(default = "Uuid::new_v4")]
    pub correlation_id: Uuid,
    /// When.
    #[serde(default = "Utc::now")]
    pub timestamp: DateTime<Utc>,
}

/// `ExcessContentProvisionedV1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExcessContentProvisionedV1 {
    /// Event name.
    #[serde(default)]
    pub event: String,
    /// The batch.
    pub batch_id: String,
    /// File name.
    pub original_file_name: String,
    /// Its text.
    pub text_storage_id: String,
    /// `NO_AVAILABLE_SLOT`.
    pub reason: String,
    /// Correlation id.
    #[serde(default = "Uuid::new_v4")]
    pub correlation_id: Uuid,
    /// When.
    #[serde(default = "Utc::now")]
    pub timestamp: DateTime<Utc>,
}

/// An essay and its text (`EssayProcessingInputRefV1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EssayRef {
    /// The essay (slot) id.
    pub essay_id: String,
    /// Where its text is.
    pub text_storage_id: String,
}

/// `BatchEssaysReady`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchEssaysReady {
    /// Event name.
    #[serde(default)]
    pub event: String,
    /// The batch.
    pub batch_id: String,
    /// Essays with content.
    pub ready_essays: Vec<EssayRef>,
    /// The batch as an entity.
    pub batch_entity: EntityRef,
    /// Processing metadata.
    pub metadata: SystemProcessingMetadata,
    /// Course code.
    pub course_code: String,
    /// Course language, e.g. `en`.
    pub course_language: String,
    /// Instructions.
    pub essay_instructions: String,
    /// Class type.
    pub class_type: String,
    /// Files that failed validation.
    #[serde(default)]
    pub validation_failures: Option<Vec<EssayValidationFailedV1>>,
    /// Files seen in total.
    #[serde(default)]
    pub total_files_processed: Option<u32>,
}

/// `BatchServiceSpellcheckInitiateCommandDataV1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpellcheckInitiateCommand {
    /// Event name.
    pub event_name: String,
    /// The batch.
    pub entity_ref: EntityRef,
    /// When.
    #[serde(default = "Utc::now")]
    pub timestamp: DateTime<Utc>,
    /// Essays to check.
    pub essays_to_process: Vec<EssayRef>,
    /// Language.
    pub language: String,
}

/// `EssayLifecycleSpellcheckRequestV1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpellcheckRequested {
    /// Event name.
    pub event_name: String,
    /// The essay (parent: the batch).
    pub entity_ref: EntityRef,
    /// When.
    #[serde(default = "Utc::now")]
    pub timestamp: DateTime<Utc>,
    /// The essay's status once requested (`awaiting_spellcheck`).
    pub status: String,
    /// Processing metadata, carried on into the result.
    pub system_metadata: SystemProcessingMetadata,
    /// Where the text is.
    pub text_storage_id: String,
    /// Language.
    pub language: String,
}

/// `SpellcheckResultDataV1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpellcheckCompleted {
    /// Event name.
    pub event_name: String,
    /// The essay (parent: the batch).
    pub entity_ref: EntityRef,
    /// When.
    #[serde(default = "Utc::now")]
    pub timestamp: DateTime<Utc>,
    /// `spellchecked_success` or `spellcheck_failed`.
    pub status: String,
    /// The request's processing metadata, completed (or failed).
    pub system_metadata: SystemProcessingMetadata,
    /// Where the original text was.
    pub original_text_storage_id: String,
    /// Where the corrected text is ([`CORRECTED_TEXT`]), when there is one.
    #[serde(default)]
    pub storage_metadata: Option<StorageReferenceMetadata>,
    /// How many words were corrected (HuleEdu's model allows none: null or absent).
    #[serde(default)]
    pub corrections_made: Option<u32>,
}

impl SpellcheckCompleted {
    /// Where the corrected text is, when there is one.
    pub fn corrected_text_storage_id(&self) -> Option<&str> {
        self.storage_metadata.as_ref()?.get(CORRECTED_TEXT)
    }
}

/// `ELSBatchPhaseOutcomeV1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElsBatchPhaseOutcomeV1 {
    /// The batch.
    pub batch_id: String,
    /// `spellcheck`.
    pub phase_name: String,
    /// `completed_successfully` or `completed_with_failures`.
    pub phase_status: String,
    /// Essays that went through, with their corrected text.
    pub processed_essays: Vec<EssayRef>,
    /// Essays that failed the phase.
    pub failed_essay_ids: Vec<String>,
    /// Correlation id (serialized as a string; HuleEdu's model makes a new one when absent).
    #[serde(default = "new_correlation_id")]
    pub correlation_id: String,
}

/// ELS `publish_status_update` payload (flattened as at HEAD).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EssayStatusUpdated {
    /// Event name.
    pub event_name: String,
    /// The essay.
    pub entity_id: String,
    /// `essay`.
    pub entity_type: String,
    /// Its batch.
    pub parent_id: Option<String>,
    /// New status.
    pub status: String,
}

/// ELS `publish_batch_phase_progress` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPhaseProgress {
    /// Event name.
    pub event_name: String,
    /// The batch.
    pub entity_ref: EntityRef,
    /// Phase.
    pub phase: String,
    /// Essays done.
    pub completed_count: u32,
    /// Essays failed.
    pub failed_count: u32,
    /// Essays in the phase.
    pub total_essays_in_phase: u32,
    /// When.
    pub timestamp: DateTime<Utc>,
}

/// ELS `publish_batch_phase_concluded` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPhaseConcluded {
    /// Event name.
    pub event_name: String,
    /// The batch.
    pub entity_ref: EntityRef,
    /// Phase.
    pub phase: String,
    /// Outcome status.
    pub status: String,
    /// Extra details.
    pub details: serde_json::Value,
    /// When.
    pub timestamp: DateTime<Utc>,
}

/// A fresh correlation id, as HuleEdu's models make one for a payload that has none.
fn new_correlation_id() -> String {
    Uuid::new_v4().to_string()
}
