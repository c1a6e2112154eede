//! What operators ask of an outbox table: its health at a glance ([`OutboxAdmin::status`])
//! and the dead-letter rows in full (list, show, purge). Putting a parked row back in line
//! stays [`OutboxStore::requeue`], which knows about per-key ownership.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::outbox::store::OutboxStore;
use crate::outbox::table::OutboxTable;

/// One outbox table's state, as `outpost status` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OutboxStatus {
    /// Rows waiting for delivery.
    pub pending: i64,
    /// Age of the oldest pending row (zero when there is none).
    #[serde(rename = "oldest_pending_seconds", serialize_with = "as_seconds")]
    pub oldest_pending: Duration,
    /// Parked rows.
    pub dead: i64,
    /// Rows published during the last minute (still within retention).
    pub published_last_minute: i64,
}

/// A parked row with everything an operator needs to decide its fate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParkedEvent {
    /// Row id (what `requeue` and `purge` take).
    pub id: i64,
    /// The envelope's event id.
    pub event_id: Uuid,
    /// Event type.
    pub event_type: String,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Destination topic.
    pub topic: String,
    /// Partition key.
    pub event_key: String,
    /// Delivery attempts made.
    pub attempts: i32,
    /// Failures counted against the attempt budget.
    pub failures: i32,
    /// Why it was parked.
    pub reason: Option<String>,
    /// When it was staged.
    pub created_at: DateTime<Utc>,
    /// The headers it would be sent with.
    pub headers: BTreeMap<String, String>,
    /// The staged bytes (only filled by [`OutboxAdmin::show`]).
    #[serde(skip)]
    pub payload: Vec<u8>,
}

/// Operator queries over one service's outbox table.
#[derive(Debug, Clone)]
pub struct OutboxAdmin {
    pool: PgPool,
    table: OutboxTable,
}

const PARKED_COLUMNS: &str = "e.id, e.event_id, e.event_type, e.aggregate_type, \
     e.aggregate_id, e.topic, e.event_key, e.attempts, e.failures, e.last_error, e.created_at, \
     p.headers";

impl OutboxAdmin {
    /// Admin over the same table and pool as `store`.
    pub fn new(store: &OutboxStore) -> Self {
        Self {
            pool: store.pool().clone(),
            table: store.table().clone(),
        }
    }

    /// Pending count, oldest pending age, parked count and last minute's publications, in
    /// one statement so the numbers belong to the same snapshot.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the query fails.
    pub async fn status(&self) -> Result<OutboxStatus> {
        let t = &self.table;
        let row = sqlx::query(&format!(
            "SELECT count(*) FILTER (WHERE status = 'pending') AS pending, \
             COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - \
                 min(created_at) FILTER (WHERE status = 'pending')), 0)::float8 AS age, \
             count(*) FILTER (WHERE status = 'dead') AS dead, \
             count(*) FILTER (WHERE status = 'published' \
                 AND published_at > clock_timestamp() - interval '1 minute') AS recent \
             FROM {t}"
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| Error::storage("status", e))?;
        let age: f64 = row.get("age");
        Ok(OutboxStatus {
            pending: row.get("pending"),
            oldest_pending: Duration::from_secs_f64(age.max(0.0)),
            dead: row.get("dead"),
            published_last_minute: row.get("recent"),
        })
    }

    /// Up to `limit` parked rows, oldest first, without payloads.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the query fails.
    pub async fn parked(&self, limit: i64) -> Result<Vec<ParkedEvent>> {
        let t = &self.table;
        let rows = sqlx::query(&format!(
            "SELECT {PARKED_COLUMNS} FROM {t} e JOIN {p} p ON p.id = e.id \
             WHERE e.status = 'dead' ORDER BY e.id LIMIT $1",
            p = t.payloads()
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| Error::storage("list_dead", e))?;
        Ok(rows.iter().map(parked_event).collect())
    }

    /// The parked row `id` with its payload, or `None` when no parked row has that id.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the query fails.
    pub async fn show(&self, id: i64) -> Result<Option<ParkedEvent>> {
        let t = &self.table;
        let row = sqlx::query(&format!(
            "SELECT {PARKED_COLUMNS}, p.payload FROM {t} e JOIN {p} p ON p.id = e.id \
             WHERE e.status = 'dead' AND e.id = $1",
            p = t.payloads()
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| Error::storage("show_dead", e))?;
        Ok(row.map(|r| ParkedEvent {
            payload: r.get("payload"),
            ..parked_event(&r)
        }))
    }

    /// Deletes the parked rows among `ids`; returns how many. Pending and published rows
    /// are never touched.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the delete fails.
    pub async fn purge(&self, ids: &[i64]) -> Result<u64> {
        let t = &self.table;
        let done: i64 =
            sqlx::query_scalar(&t.delete_with_payloads("status = 'dead' AND id = ANY($1)"))
                .bind(ids)
                .fetch_one(&self.pool)
                .await
                .map_err(|e| Error::storage("purge_dead", e))?;
        Ok(u64::try_from(done).unwrap_or(0))
    }

    /// Deletes parked rows staged more than `age` ago; returns how many.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the delete fails.
    pub async fn purge_older_than(&self, age: Duration) -> Result<u64> {
        let t = &self.table;
        let done: i64 = sqlx::query_scalar(&t.delete_with_payloads(
            "status = 'dead' AND created_at < clock_timestamp() - make_interval(secs => $1)",
        ))
        .bind(age.as_secs_f64())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| Error::storage("purge_dead", e))?;
        Ok(u64::try_from(done).unwrap_or(0))
    }
}

fn parked_event(r: &PgRow) -> ParkedEvent {
    let headers: Json<BTreeMap<String, String>> = r.get("headers");
    ParkedEvent {
        id: r.get("id"),
        event_id: r.get("event_id"),
        event_type: r.get("event_type"),
        aggregate_type: r.get("aggregate_type"),
        aggregate_id: r.get("aggregate_id"),
        topic: r.get("topic"),
        event_key: r.get("event_key"),
        attempts: r.get("attempts"),
        failures: r.get("failures"),
        reason: r.get("last_error"),
        created_at: r.get("created_at"),
        headers: headers.0,
        payload: Vec::new(),
    }
}

fn as_seconds<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}
