//! The Content Service stand-in. HuleEdu's File Service and Spellchecker store and fetch
//! essay texts through a separate Content Service over HTTP; here it is a small store over
//! a schema of its own, called by both services as they would call that service. Its
//! writes are outside their transactions, exactly as an HTTP call would be.

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

    /// Stores `body` under a fresh id and returns it.
    ///
    /// # Errors
    /// The database error.
    pub async fn store(&self, kind: ContentKind, body: &[u8]) -> Result<String, sqlx::Error> {
        self.store_as(Uuid::new_v4(), kind, body).await
    }

    /// Stores `body` under `storage_id` unless something is stored there already, and
    /// returns the id. Callers that may run twice (a handler retried after a rollback)
    /// derive the id from their input, so the second run stores nothing new.
    ///
    /// # Errors
    /// The database error.
    pub async fn store_as(
        &self,
        storage_id: Uuid,
        kind: ContentKind,
        body: &[u8],
    ) -> Result<String, sqlx::Error> {
        sqlx::query(
            "INSERT INTO content (storage_id, kind, body) VALUES ($1, $2, $3) \
             ON CONFLICT (storage_id) DO NOTHING",
        )
        .bind(storage_id)
        .bind(kind.as_str())
        .bind(body)
        .execute(&self.pool)
        .await?;
        Ok(storage_id.to_string())
    }

    /// The body stored under `storage_id` as text, if there is one.
    ///
    /// # Errors
    /// The database error.
    pub async fn fetch_text(&self, storage_id: &str) -> Result<Option<String>, sqlx::Error> {
        let Ok(id) = storage_id.parse::<Uuid>() else {
            return Ok(None);
        };
        let row = sqlx::query("SELECT body FROM content WHERE storage_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| String::from_utf8_lossy(&r.get::<Vec<u8>, _>(0)).into_owned()))
    }
}
