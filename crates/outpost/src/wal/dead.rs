//! WAL mode's dead letters: events the broker refused for good (or message bytes that are
//! not an Outpost event), kept in a table so the stream can move on, then listed and
//! requeued by an operator, as table mode's parked rows are.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::message::WalEvent;
use super::WalStream;
use crate::error::{Error, Result};

/// One dead letter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WalDeadLetter {
    /// Its id in the table (what [`WalDeadLetters::requeue`] takes).
    pub id: i64,
    /// The event's id; `None` when the message was not an Outpost event.
    pub event_id: Option<Uuid>,
    /// Destination topic.
    pub topic: Option<String>,
    /// Partition key.
    pub event_key: Option<String>,
    /// Payload size in bytes.
    pub payload_bytes: i64,
    /// The commit LSN of the transaction that emitted it.
    pub commit_lsn: String,
    /// Why it could not be delivered: `permanent` (refused for good), `retriable` (failed
    /// more than the relay's `max_attempts` times) or `undecodable` (not an Outpost event).
    pub class: String,
    /// Why it is here. NUL characters of the topic, key, headers and reason are stored as
    /// U+FFFD (PostgreSQL text cannot hold them); when the event's own fields lost one, the
    /// reason says so.
    pub reason: String,
    /// When it was put here.
    pub dead_at: DateTime<Utc>,
}

/// The dead-letter table of one stream (created by `outpost wal init`).
#[derive(Debug, Clone)]
pub struct WalDeadLetters {
    pool: PgPool,
    stream: WalStream,
}

impl WalDeadLetters {
    /// The dead letters of `stream`.
    pub fn new(pool: PgPool, stream: WalStream) -> Self {
        Self { pool, stream }
    }

    /// Up to `limit` dead letters, oldest first.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] (operation `wal_dead_list`).
    pub async fn list(&self, limit: i64) -> Result<Vec<WalDeadLetter>> {
        let rows = sqlx::query(&format!(
            "SELECT id, event_id, topic, event_key, length(payload)::bigint AS payload_bytes, \
                    commit_lsn::text AS commit_lsn, class, reason, dead_at \
             FROM {} ORDER BY id LIMIT $1",
            self.stream.dead_letters()
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| Error::storage("wal_dead_list", e))?;
        Ok(rows
            .into_iter()
            .map(|r| WalDeadLetter {
                id: r.get("id"),
                event_id: r.get("event_id"),
                topic: r.get("topic"),
                event_key: r.get("event_key"),
                payload_bytes: r.get("payload_bytes"),
                commit_lsn: r.get("commit_lsn"),
                class: r.get("class"),
                reason: r.get("reason"),
                dead_at: r.get("dead_at"),
            })
            .collect())
    }

    /// Emits the dead letters `ids` into the stream again and deletes them, in one
    /// transaction, in id order; returns how many were requeued. Letters that are not
    /// Outpost events (no event id) are left where they are.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] (operation `wal_dead_requeue`).
    pub async fn requeue(&self, ids: &[i64]) -> Result<u64> {
        // The emit function builds the same bytes the relay read the first time.
        let requeued: i64 = sqlx::query_scalar(&format!(
            "WITH gone AS ( \
               DELETE FROM {d} WHERE id = ANY($1) AND event_id IS NOT NULL \
               RETURNING id, event_id, topic, event_key, headers, payload), \
             emitted AS ( \
               SELECT {f}(topic, event_key, payload, headers, NULL, event_id) \
               FROM (SELECT * FROM gone ORDER BY id) g) \
             SELECT count(*) FROM emitted",
            d = self.stream.dead_letters(),
            f = self.stream.emit_function(),
        ))
        .bind(ids)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| Error::storage("wal_dead_requeue", e))?;
        Ok(requeued.max(0) as u64)
    }

    /// Records an event the relay gave up on.
    pub(crate) async fn record(
        &self,
        event: &WalEvent,
        commit_lsn: u64,
        class: &str,
        reason: &str,
    ) -> Result<()> {
        let headers: BTreeMap<Cow<'_, str>, Cow<'_, str>> = event
            .headers
            .iter()
            .map(|(k, v)| (storable(k), storable(v)))
            .collect();
        let altered = [&event.topic, &event.key]
            .into_iter()
            .chain(event.headers.iter().flat_map(|(k, v)| [k, v]))
            .any(|s| s.contains('\0'));
        let reason = if altered {
            Cow::Owned(format!(
                "{reason} (NUL characters of its topic, key or headers are stored here as \
                 U+FFFD; a requeue emits them so)"
            ))
        } else {
            Cow::Borrowed(reason)
        };
        let headers = serde_json::to_value(&headers).map_err(Error::Serialization)?;
        self.insert(
            Some(event.event_id),
            Some(&storable(&event.topic)),
            Some(&storable(&event.key)),
            Some(headers),
            &event.payload,
            commit_lsn,
            class,
            &reason,
        )
        .await
    }

    /// Records message bytes with the stream's prefix that are not an Outpost event.
    pub(crate) async fn record_undecodable(
        &self,
        content: &[u8],
        commit_lsn: u64,
        reason: &str,
    ) -> Result<()> {
        self.insert(
            None,
            None,
            None,
            None,
            content,
            commit_lsn,
            "undecodable",
            reason,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn insert(
        &self,
        event_id: Option<Uuid>,
        topic: Option<&str>,
        key: Option<&str>,
        headers: Option<serde_json::Value>,
        payload: &[u8],
        commit_lsn: u64,
        class: &str,
        reason: &str,
    ) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO {} (event_id, topic, event_key, headers, payload, commit_lsn, class, reason) \
             VALUES ($1, $2, $3, $4, $5, $6::text::pg_lsn, $7, $8)",
            self.stream.dead_letters()
        ))
        .bind(event_id)
        .bind(topic)
        .bind(key)
        .bind(headers)
        .bind(payload)
        .bind(pgwire_replication::Lsn::from_u64(commit_lsn).to_pg_string())
        .bind(class)
        .bind(storable(reason))
        .execute(&self.pool)
        .await
        .map_err(|e| Error::storage("wal_dead_record", e))?;
        Ok(())
    }
}

/// `s` as PostgreSQL text and jsonb accept it: NUL characters become U+FFFD. A letter that
/// cannot be inserted would stop the stream for good (the transaction is read again and
/// fails again), so a lossy letter beats none.
fn storable(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_characters_become_replacement_characters() {
        assert_eq!(storable("k\0e\0y"), "k\u{FFFD}e\u{FFFD}y");
        assert!(matches!(storable("plain"), Cow::Borrowed("plain")));
    }
}
