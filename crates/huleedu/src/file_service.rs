//! The File Service: takes a batch's essay files, validates them, stores their text in the
//! Content Service and announces each outcome with HuleEdu's four publishing methods.
//!
//! It keeps no business state worth a transaction (only an `uploads` log), so, as
//! HuleEdu's File Service did in July 2025, it publishes Kafka-first: straight to the
//! broker, and into its own outbox (same bytes, same event id) when the broker fails, for
//! its relay to deliver. The window that design leaves (a crash after the upload row is
//! written and before the broker acks) is the reason every other service uses the
//! transactional mode.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::Utc;
use outpost::{Aggregate, Dispatch, Mode, OutboxEvent, PublishPath, Publisher};
use sqlx::postgres::PgPool;
use sqlx::Row;
use tracing::info;
use uuid::Uuid;

use crate::content::{ContentKind, ContentStore};
use crate::error::{Error, Result};
use crate::events::{
    topic, BatchFileChangedV1, EssayContentProvisionedV1, EssayValidationFailedV1, Topics,
    ValidationErrorDetail,
};

/// The File Service's name (`source_service` of its events).
pub const SERVICE: &str = "file-service";

/// Validation error code: the file has no text.
pub const EMPTY_CONTENT: &str = "EMPTY_CONTENT";
/// Validation error code: too few words to assess.
pub const CONTENT_TOO_SHORT: &str = "CONTENT_TOO_SHORT";
/// Validation error code: the file is larger than allowed.
pub const CONTENT_TOO_LONG: &str = "CONTENT_TOO_LONG";

/// Limits a file must meet to be provisioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidationRules {
    /// Fewest words an essay may have (default 20).
    pub min_words: usize,
    /// Largest file accepted, in bytes (default 50 000).
    pub max_bytes: usize,
}

impl Default for ValidationRules {
    fn default() -> Self {
        Self {
            min_words: 20,
            max_bytes: 50_000,
        }
    }
}

/// The outcome of validating one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Validation {
    /// The extracted text, ready to be stored.
    Valid(String),
    /// Why the file was rejected.
    Invalid {
        /// `EMPTY_CONTENT`, `CONTENT_TOO_SHORT` or `CONTENT_TOO_LONG`.
        code: &'static str,
        /// For the teacher.
        message: String,
    },
}

/// Validates a plain-text file: size first (without reading it as text), then content.
pub fn validate(bytes: &[u8], rules: ValidationRules) -> Validation {
    if bytes.len() > rules.max_bytes {
        return Validation::Invalid {
            code: CONTENT_TOO_LONG,
            message: format!(
                "file has {} bytes; at most {} allowed",
                bytes.len(),
                rules.max_bytes
            ),
        };
    }
    let text = String::from_utf8_lossy(bytes).trim().to_owned();
    if text.is_empty() {
        return Validation::Invalid {
            code: EMPTY_CONTENT,
            message: "file contains no text".into(),
        };
    }
    let words = text.split_whitespace().count();
    if words < rules.min_words {
        return Validation::Invalid {
            code: CONTENT_TOO_SHORT,
            message: format!(
                "essay has {words} words; at least {} needed",
                rules.min_words
            ),
        };
    }
    Validation::Valid(text)
}

/// Who is uploading into which batch (HuleEdu's request context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadContext {
    /// The batch.
    pub batch_id: String,
    /// The teacher.
    pub user_id: String,
    /// Correlation id of the request.
    pub correlation_id: Uuid,
}

/// A file added to a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// Its id.
    pub file_upload_id: String,
    /// File name.
    pub filename: String,
    /// Where the raw file is stored.
    pub raw_file_storage_id: String,
    /// Size in bytes.
    pub size_bytes: u64,
}

/// One logged upload (see [`FileService::uploads`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRow {
    /// File name.
    pub filename: String,
    /// `added`, `removed`, `provisioned` or `validation_failed`.
    pub state: String,
    /// Where its extracted text is, once provisioned.
    pub text_storage_id: Option<String>,
    /// Why it was rejected, when it was.
    pub validation_error_code: Option<String>,
}

/// The service.
#[derive(Debug)]
pub struct FileService {
    publisher: Publisher,
    content: ContentStore,
    topics: Topics,
    rules: ValidationRules,
    fell_back: AtomicUsize,
}

impl FileService {
    /// The File Service publishing through `publisher` (Kafka-first in the instant mode),
    /// whose pool's `search_path` is its schema.
    pub fn new(publisher: Publisher, content: ContentStore, topics: Topics) -> Self {
        Self {
            publisher,
            content,
            topics,
            rules: ValidationRules::default(),
            fell_back: AtomicUsize::new(0),
        }
    }

    fn pool(&self) -> &PgPool {
        self.publisher.store().pool()
    }

    /// The validation limits.
    pub fn rules(&self) -> ValidationRules {
        self.rules
    }

    /// Kafka-first events that went to the outbox because the broker failed.
    pub fn fallbacks(&self) -> usize {
        self.fell_back.load(Ordering::Relaxed)
    }

    /// Creates the uploads table if it does not exist.
    ///
    /// # Errors
    /// [`Error::Database`] when the DDL fails.
    pub async fn migrate(&self) -> Result<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS uploads ( \
               file_upload_id        TEXT PRIMARY KEY, \
               batch_id              TEXT NOT NULL, \
               filename              TEXT NOT NULL, \
               size_bytes            BIGINT NOT NULL, \
               raw_file_storage_id   TEXT NOT NULL, \
               text_storage_id       TEXT, \
               validation_error_code TEXT, \
               state                 TEXT NOT NULL, \
               updated_at            TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
        )
        .execute(self.pool())
        .await
        .map_err(Error::db(SERVICE, "migrate"))?;
        Ok(())
    }

    /// The batch's uploads as logged, oldest first: file name, state (`added`, `removed`,
    /// `provisioned` or `validation_failed`), text storage id and validation error code.
    ///
    /// # Errors
    /// [`Error::Database`] when the query fails.
    pub async fn uploads(&self, batch_id: &str) -> Result<Vec<UploadRow>> {
        let rows = sqlx::query(
            "SELECT filename, state, text_storage_id, validation_error_code FROM uploads \
             WHERE batch_id = $1 ORDER BY updated_at, filename",
        )
        .bind(batch_id)
        .fetch_all(self.pool())
        .await
        .map_err(Error::db(SERVICE, "uploads"))?;
        Ok(rows
            .iter()
            .map(|r| UploadRow {
                filename: r.get(0),
                state: r.get(1),
                text_storage_id: r.get(2),
                validation_error_code: r.get(3),
            })
            .collect())
    }

    /// Receives a file into the batch: stores it raw, logs the upload and announces it
    /// (`publish_batch_file_added_v1`).
    ///
    /// # Errors
    /// [`Error::Database`] when storing fails, [`Error::Outpost`] when the event could be
    /// neither produced nor stored in the outbox.
    pub async fn add_file(
        &self,
        ctx: &UploadContext,
        filename: &str,
        bytes: &[u8],
    ) -> Result<Upload> {
        let mut added = self.add_files(ctx, &[(filename, bytes)]).await?;
        Ok(added.remove(0))
    }

    /// Receives the files of one upload request, as [`add_file`](Self::add_file) does one,
    /// with one statement per step for all of them and their events published together
    /// (in the order given). Returns their uploads in that order.
    ///
    /// # Errors
    /// As [`add_file`](Self::add_file); a database error leaves none of them logged.
    pub async fn add_files(
        &self,
        ctx: &UploadContext,
        files: &[(&str, &[u8])],
    ) -> Result<Vec<Upload>> {
        if files.is_empty() {
            return Ok(Vec::new());
        }
        let bodies: Vec<&[u8]> = files.iter().map(|(_, bytes)| *bytes).collect();
        let raw_ids = self
            .content
            .store_many(ContentKind::RawFile, &bodies)
            .await
            .map_err(Error::db(SERVICE, "store_raw_file"))?;
        let uploads: Vec<Upload> = files
            .iter()
            .zip(raw_ids)
            .map(|((filename, bytes), raw_file_storage_id)| Upload {
                file_upload_id: Uuid::new_v4().to_string(),
                filename: (*filename).to_owned(),
                raw_file_storage_id,
                size_bytes: bytes.len() as u64,
            })
            .collect();
        let column = |f: fn(&Upload) -> &str| -> Vec<&str> { uploads.iter().map(f).collect() };
        let sizes: Vec<i64> = uploads
            .iter()
            .map(|u| i64::try_from(u.size_bytes).unwrap_or(i64::MAX))
            .collect();
        sqlx::query(
            "INSERT INTO uploads (file_upload_id, batch_id, filename, size_bytes, \
             raw_file_storage_id, state) \
             SELECT id, $2, name, size, raw, 'added' \
             FROM UNNEST($1::text[], $3::text[], $4::bigint[], $5::text[]) AS t (id, name, size, raw)",
        )
        .bind(column(|u| &u.file_upload_id))
        .bind(&ctx.batch_id)
        .bind(column(|u| &u.filename))
        .bind(&sizes)
        .bind(column(|u| &u.raw_file_storage_id))
        .execute(self.pool())
        .await
        .map_err(Error::db(SERVICE, "add_file"))?;
        let events = uploads
            .iter()
            .map(|u| {
                let data = self.file_changed(ctx, u, "batch.file.added");
                self.file_changed_event(topic::BATCH_FILE_ADDED, &data)
            })
            .collect::<Result<Vec<_>>>()?;
        self.send_all(&events).await?;
        Ok(uploads)
    }

    /// Validates an added file; stores its text and announces it
    /// (`publish_essay_content_provisioned`), or announces why it was rejected
    /// (`publish_essay_validation_failed`). Returns the validation outcome.
    ///
    /// # Errors
    /// As [`add_file`](Self::add_file).
    pub async fn process_file(
        &self,
        ctx: &UploadContext,
        upload: &Upload,
        bytes: &[u8],
    ) -> Result<Validation> {
        let mut outcomes = self.process_files(ctx, &[(upload, bytes)]).await?;
        Ok(outcomes.remove(0))
    }

    /// Validates the added files of one upload request, as
    /// [`process_file`](Self::process_file) does one, with one statement per step for all
    /// of them and their events published together (in the order given). Returns the
    /// outcomes in that order. A file removed meanwhile is left removed and announces
    /// nothing.
    ///
    /// # Errors
    /// As [`add_file`](Self::add_file).
    pub async fn process_files(
        &self,
        ctx: &UploadContext,
        files: &[(&Upload, &[u8])],
    ) -> Result<Vec<Validation>> {
        if files.is_empty() {
            return Ok(Vec::new());
        }
        let validations: Vec<Validation> = files
            .iter()
            .map(|(_, bytes)| validate(bytes, self.rules))
            .collect();
        let texts: Vec<&[u8]> = validations
            .iter()
            .filter_map(|v| match v {
                Validation::Valid(text) => Some(text.as_bytes()),
                Validation::Invalid { .. } => None,
            })
            .collect();
        let mut text_ids = self
            .content
            .store_many(ContentKind::ExtractedText, &texts)
            .await
            .map_err(Error::db(SERVICE, "store_text"))?
            .into_iter();
        let now = Utc::now();
        // The upload rows' new columns, one entry per file.
        let mut states = Vec::with_capacity(files.len());
        let mut texts = Vec::with_capacity(files.len());
        let mut codes = Vec::with_capacity(files.len());
        let mut events = Vec::with_capacity(files.len());
        for ((upload, _), validation) in files.iter().zip(&validations) {
            match validation {
                Validation::Valid(_) => {
                    let text_storage_id = text_ids.next().unwrap_or_default();
                    states.push("provisioned");
                    texts.push(Some(text_storage_id.clone()));
                    codes.push(None);
                    events.push(self.provisioned_event(&EssayContentProvisionedV1 {
                        event: "essay.content.provisioned".into(),
                        batch_id: ctx.batch_id.clone(),
                        file_upload_id: upload.file_upload_id.clone(),
                        original_file_name: upload.filename.clone(),
                        raw_file_storage_id: upload.raw_file_storage_id.clone(),
                        text_storage_id,
                        file_size_bytes: upload.size_bytes,
                        content_md5_hash: None,
                        correlation_id: ctx.correlation_id,
                        timestamp: now,
                    })?);
                }
                Validation::Invalid { code, message } => {
                    states.push("validation_failed");
                    texts.push(None);
                    codes.push(Some(*code));
                    let details = serde_json::json!({ "filename": upload.filename });
                    events.push(self.validation_failed_event(&EssayValidationFailedV1 {
                        event: "essay.validation.failed".into(),
                        batch_id: ctx.batch_id.clone(),
                        file_upload_id: upload.file_upload_id.clone(),
                        original_file_name: upload.filename.clone(),
                        raw_file_storage_id: upload.raw_file_storage_id.clone(),
                        validation_error_code: (*code).to_owned(),
                        validation_error_detail: ValidationErrorDetail {
                            error_code: (*code).to_owned(),
                            message: message.clone(),
                            correlation_id: ctx.correlation_id,
                            timestamp: now,
                            service: SERVICE.into(),
                            operation: "validate_content".into(),
                            details: details.as_object().cloned().unwrap_or_default(),
                        },
                        file_size_bytes: upload.size_bytes,
                        correlation_id: ctx.correlation_id,
                        timestamp: now,
                    })?);
                }
            }
        }
        let ids: Vec<&str> = files
            .iter()
            .map(|(u, _)| u.file_upload_id.as_str())
            .collect();
        // Not a file the teacher withdrew meanwhile: it stays removed and announces nothing
        // (its removal was announced; content for it would fill a slot). A file processed
        // before is processed again (a retry after a failed announcement announces it).
        let processed: HashSet<String> = sqlx::query_scalar(
            "UPDATE uploads u SET state = t.state, text_storage_id = t.text, \
             validation_error_code = t.code, updated_at = clock_timestamp() \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS t (id, state, text, code) \
             WHERE u.file_upload_id = t.id AND u.state <> 'removed' \
             RETURNING u.file_upload_id",
        )
        .bind(&ids)
        .bind(&states)
        .bind(&texts)
        .bind(&codes)
        .fetch_all(self.pool())
        .await
        .map_err(Error::db(SERVICE, "set_state"))?
        .into_iter()
        .collect();
        let events: Vec<OutboxEvent> = events
            .into_iter()
            .zip(&ids)
            .filter(|(_, id)| processed.contains(**id))
            .map(|(event, _)| event)
            .collect();
        self.send_all(&events).await?;
        Ok(validations)
    }

    /// Removes a file the teacher withdrew before it was processed, and announces it
    /// (`publish_batch_file_removed_v1`). Returns `false` (and announces nothing) when the
    /// file was already processed. A file removed before is announced again: the removal
    /// is committed before its announcement, and a retry after a failed one announces it.
    ///
    /// # Errors
    /// As [`add_file`](Self::add_file).
    pub async fn remove_file(&self, ctx: &UploadContext, upload: &Upload) -> Result<bool> {
        let removed = sqlx::query(
            "UPDATE uploads SET state = 'removed', updated_at = clock_timestamp() \
             WHERE file_upload_id = $1 AND state IN ('added', 'removed')",
        )
        .bind(&upload.file_upload_id)
        .execute(self.pool())
        .await
        .map_err(Error::db(SERVICE, "remove_file"))?
        .rows_affected()
            == 1;
        if removed {
            self.publish_batch_file_removed_v1(&self.file_changed(
                ctx,
                upload,
                "batch.file.removed",
            ))
            .await?;
        }
        Ok(removed)
    }

    fn file_changed(
        &self,
        ctx: &UploadContext,
        upload: &Upload,
        event: &str,
    ) -> BatchFileChangedV1 {
        BatchFileChangedV1 {
            event: event.into(),
            batch_id: ctx.batch_id.clone(),
            file_upload_id: upload.file_upload_id.clone(),
            filename: upload.filename.clone(),
            user_id: ctx.user_id.clone(),
            correlation_id: ctx.correlation_id,
            timestamp: Utc::now(),
        }
    }

    /// `EssayContentProvisionedV1` → ELS, key file_upload_id.
    ///
    /// # Errors
    /// [`Error::Outpost`] when the event could be neither produced nor stored.
    pub async fn publish_essay_content_provisioned(
        &self,
        data: &EssayContentProvisionedV1,
    ) -> Result<PublishPath> {
        self.send(self.provisioned_event(data)?).await
    }

    fn provisioned_event(&self, data: &EssayContentProvisionedV1) -> Result<OutboxEvent> {
        let aggregate = Aggregate::new("file_upload", &data.file_upload_id);
        Ok(self.topics.event(
            topic::ESSAY_CONTENT_PROVISIONED,
            SERVICE,
            data.correlation_id,
            aggregate,
            data,
        )?)
    }

    /// `EssayValidationFailedV1` → ELS, key file_upload_id.
    ///
    /// # Errors
    /// [`Error::Outpost`] when the event could be neither produced nor stored.
    pub async fn publish_essay_validation_failed(
        &self,
        data: &EssayValidationFailedV1,
    ) -> Result<PublishPath> {
        self.send(self.validation_failed_event(data)?).await
    }

    fn validation_failed_event(&self, data: &EssayValidationFailedV1) -> Result<OutboxEvent> {
        let aggregate = Aggregate::new("file_upload", &data.file_upload_id);
        Ok(self.topics.event(
            topic::ESSAY_VALIDATION_FAILED,
            SERVICE,
            data.correlation_id,
            aggregate,
            data,
        )?)
    }

    /// `BatchFileAddedV1` → teacher notifications, key batch_id.
    ///
    /// # Errors
    /// [`Error::Outpost`] when the event could be neither produced nor stored.
    pub async fn publish_batch_file_added_v1(
        &self,
        data: &BatchFileChangedV1,
    ) -> Result<PublishPath> {
        self.send(self.file_changed_event(topic::BATCH_FILE_ADDED, data)?)
            .await
    }

    /// `base` is `BATCH_FILE_ADDED` or `BATCH_FILE_REMOVED`.
    fn file_changed_event(&self, base: &str, data: &BatchFileChangedV1) -> Result<OutboxEvent> {
        let aggregate = Aggregate::new("batch", &data.batch_id);
        Ok(self
            .topics
            .event(base, SERVICE, data.correlation_id, aggregate, data)?)
    }

    /// `BatchFileRemovedV1` → teacher notifications, key batch_id.
    ///
    /// # Errors
    /// [`Error::Outpost`] when the event could be neither produced nor stored.
    pub async fn publish_batch_file_removed_v1(
        &self,
        data: &BatchFileChangedV1,
    ) -> Result<PublishPath> {
        self.send(self.file_changed_event(topic::BATCH_FILE_REMOVED, data)?)
            .await
    }

    async fn send(&self, event: OutboxEvent) -> Result<PublishPath> {
        let dispatch = self.send_all(std::slice::from_ref(&event)).await?;
        Ok(if dispatch.eager_published > 0 {
            PublishPath::Direct
        } else {
            PublishPath::Outbox
        })
    }

    async fn send_all(&self, events: &[OutboxEvent]) -> Result<Dispatch> {
        let dispatch = self.publisher.publish_all(events).await?;
        // In the outbox-only mode every event takes the outbox; only Kafka-first falls back.
        if dispatch.left_to_relay > 0 && self.publisher.mode() == Mode::KafkaFirst {
            self.fell_back
                .fetch_add(dispatch.left_to_relay, Ordering::Relaxed);
            info!(
                events = dispatch.left_to_relay,
                "published through the outbox"
            );
        }
        Ok(dispatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_what_is_wrong() {
        let rules = ValidationRules {
            min_words: 3,
            max_bytes: 40,
        };
        assert_eq!(
            validate(b"one two three", rules),
            Validation::Valid("one two three".into())
        );
        let code = |bytes: &[u8]| match validate(bytes, rules) {
            Validation::Invalid { code, .. } => code,
            Validation::Valid(_) => "valid",
        };
        assert_eq!(code(b""), EMPTY_CONTENT);
        assert_eq!(code(b" \n\t "), EMPTY_CONTENT);
        assert_eq!(code(b"too short"), CONTENT_TOO_SHORT);
        assert_eq!(code(&[b'a'; 41]), CONTENT_TOO_LONG);
    }
}
