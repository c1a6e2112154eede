//! The downstream consumers the pipeline services do not stand in for: HuleEdu's Result
//! Aggregator (slot assignments) and teacher notifications (file added/removed, essay
//! status, phase progress and conclusion, excess content). It records each event once,
//! behind its own inbox, so every event of the pipeline has a consumer and a measured hop.

use outpost::{EventEnvelope, InboxHandler, Received};
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Row, Transaction};

use crate::error::{handler_db, Error, Result};
use crate::events::topic;

/// The observer's name (its consumer group's prefix).
pub const SERVICE: &str = "notification-service";

/// The topics it consumes: every topic no pipeline service consumes.
pub const CONSUMES: [&str; 7] = [
    topic::BATCH_FILE_ADDED,
    topic::BATCH_FILE_REMOVED,
    topic::ESSAY_SLOT_ASSIGNED,
    topic::EXCESS_CONTENT_PROVISIONED,
    topic::ESSAY_STATUS,
    topic::BATCH_PHASE_PROGRESS,
    topic::BATCH_PHASE_CONCLUDED,
];

/// The observer (cheap to clone).
#[derive(Debug, Clone)]
pub struct Observer {
    pool: PgPool,
}

impl Observer {
    /// An observer writing through `pool`, whose `search_path` is its schema.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Creates its table if it does not exist.
    ///
    /// # Errors
    /// [`Error::Database`] when the DDL fails.
    pub async fn migrate(&self) -> Result<()> {
        // No unique constraint on purpose: an event recorded twice shows as two rows.
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS received ( \
               id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
               event_id    UUID NOT NULL, \
               topic       TEXT NOT NULL, \
               event_key   TEXT NOT NULL, \
               received_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())",
        )
        .execute(&self.pool)
        .await
        .map_err(Error::db(SERVICE, "migrate"))?;
        Ok(())
    }

    /// Rows recorded and distinct events among them.
    ///
    /// # Errors
    /// [`Error::Database`] when the query fails.
    pub async fn recorded(&self) -> Result<(i64, i64)> {
        let row = sqlx::query("SELECT count(*), count(DISTINCT event_id) FROM received")
            .fetch_one(&self.pool)
            .await
            .map_err(Error::db(SERVICE, "recorded"))?;
        Ok((row.get(0), row.get(1)))
    }
}

impl InboxHandler for Observer {
    async fn handle(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        received: &Received,
        tx: &mut Transaction<'_, Postgres>,
    ) -> outpost::Result<()> {
        let key = String::from_utf8_lossy(received.key.as_deref().unwrap_or_default()).into_owned();
        sqlx::query("INSERT INTO received (event_id, topic, event_key) VALUES ($1, $2, $3)")
            .bind(event.event_id)
            .bind(&event.event_type)
            .bind(key)
            .execute(&mut **tx)
            .await
            .map_err(handler_db)?;
        Ok(())
    }
}
