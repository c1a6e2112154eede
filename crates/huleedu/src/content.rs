//! The Content Service stand-in. HuleEdu's File Service and Spellchecker store and fetch
//! essay texts through a separate Content Service over HTTP; here it is a small store over
//! a schema of its own, called by both services as they would call that service. Its
//! writes are outside their transactions, exactly as an HTTP call would be.

use std::collections::HashMap;

use sqlx::postgres::PgPool;
use sqlx::Row;
use uuid::Uuid;

/// What a stored body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentKind {
    /// An uploaded file as received.
    RawFile,
    /// The text extracted from it.
    ExtractedText,
    /// The text after spell checking.
    CorrectedText,
}

impl ContentKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::RawFile => "raw_file",
            Self::ExtractedText => "extracted_text",
            Self::CorrectedText => "corrected_text",
        }
    }
}

/// Handle on the content store (cheap to clone).
#[derive(Debug, Clone)]
pub struct ContentStore {
    pool: PgPool,
}

impl ContentStore {
    /// A store over `pool`, whose `search_path` is the store's schema.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Creates the table if it does not exist.
    ///
    /// # Errors
    /// The database error.
    pub async fn migrate(&self) -> Result<(), sqlx::Error> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS content ( \
               storage_id UUID PRIMARY KEY, \
               kind       TEXT NOT NULL, \
               body       BYTEA NOT NULL, \
               stored_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
        )
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Stores each of `bodies` under a fresh id, in one statement, and returns the ids in
    /// the same order (one request carrying several files).
    ///
    /// # Errors
    /// The database error; then nothing was stored.
    pub async fn store_many(
        &self,
        kind: ContentKind,
        bodies: &[&[u8]],
    ) -> Result<Vec<String>, sqlx::Error> {
        let ids: Vec<Uuid> = bodies.iter().map(|_| Uuid::new_v4()).collect();
        self.store_many_as(&ids, kind, bodies).await?;
        Ok(ids.iter().map(Uuid::to_string).collect())
    }

    /// Stores each of `bodies` under the id at the same place in `ids`, unless something is
    /// stored there already. Callers that may run twice (a handler retried after a
    /// rollback) derive the ids from their input, so the second run stores nothing new.
    ///
    /// # Errors
    /// The database error; then nothing was stored.
    pub async fn store_many_as(
        &self,
        ids: &[Uuid],
        kind: ContentKind,
        bodies: &[&[u8]],
    ) -> Result<(), sqlx::Error> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO content (storage_id, kind, body) \
             SELECT id, $2, body FROM UNNEST($1::uuid[], $3::bytea[]) AS t (id, body) \
             ON CONFLICT (storage_id) DO NOTHING",
        )
        .bind(ids)
        .bind(kind.as_str())
        .bind(bodies)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// The bodies stored under `storage_ids`, as text, by id; an id with nothing stored
    /// (or not an id at all) is missing from the map.
    ///
    /// # Errors
    /// The database error.
    pub async fn fetch_texts(
        &self,
        storage_ids: &[&str],
    ) -> Result<HashMap<String, String>, sqlx::Error> {
        let ids: Vec<Uuid> = storage_ids
            .iter()
            .filter_map(|id| id.parse().ok())
            .collect();
        let rows = sqlx::query("SELECT storage_id, body FROM content WHERE storage_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let id: Uuid = r.get(0);
                let body: Vec<u8> = r.get(1);
                (id.to_string(), String::from_utf8_lossy(&body).into_owned())
            })
            .collect())
    }
}
