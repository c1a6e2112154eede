//! All SQL against the outbox table: migrate, stage, claim, settle, clean up.
//!
//! Rows move `pending → published` (acked by the broker) or `pending → dead` (parked with
//! its reason). A relay claims a row by leasing it (`lease_owner`, `lease_until`); a lease
//! that lapses (crashed relay) makes the row claimable again.
//!
//! Per-key order: a relay only claims the *head* of a key (its oldest pending row) together
//! with the rows right behind it. While the head is leased nobody else can claim any row of
//! that key, and a head that waits for a retry holds back only its own key.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use sqlx::types::Json;
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use crate::envelope::OutboxEvent;
use crate::error::{Error, EventContext, Result};
use crate::table::OutboxTable;

/// A row claimed by a relay, ready to be produced.
#[derive(Debug, Clone)]
pub struct ClaimedEvent {
    /// Row id (staging order).
    pub id: i64,
    /// The envelope's event id.
    pub event_id: Uuid,
    /// Destination topic.
    pub topic: String,
    /// Partition key.
    pub event_key: String,
    /// The exact bytes staged.
    pub payload: Vec<u8>,
    /// Headers staged with the row.
    pub headers: BTreeMap<String, String>,
    /// Delivery attempts so far.
    pub attempts: i32,
    /// Failures so far that count against the attempt budget.
    pub failures: i32,
    /// When the row was staged.
    pub created_at: DateTime<Utc>,
}

/// What became of one claimed row.
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// The broker acknowledged it.
    Published,
    /// Try again after `delay`; `budgeted` failures count against the attempt budget.
    Retry {
        /// How long to wait before the next attempt.
        delay: Duration,
        /// Why it failed.
        error: String,
        /// Whether this failure consumes the attempt budget.
        budgeted: bool,
    },
    /// Parked for an operator; never selected again by the relay.
    Dead {
        /// Why it was parked.
        error: String,
        /// Whether this last failure counts against the attempt budget.
        budgeted: bool,
    },
    /// Not attempted (an earlier row of its key failed); give the lease back.
    Released,
}

/// Row counts by status, for operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Rows waiting for delivery.
    pub pending: i64,
    /// Age of the oldest pending row (zero when there is none).
    pub oldest_pending: Duration,
}

/// A parked row, as an operator sees it.
#[derive(Debug, Clone)]
pub struct DeadEvent {
    /// Row id.
    pub id: i64,
    /// Event id.
    pub event_id: Uuid,
    /// Topic.
    pub topic: String,
    /// Partition key.
    pub event_key: String,
    /// Why it was parked.
    pub last_error: Option<String>,
    /// Delivery attempts made.
    pub attempts: i32,
}

/// Queries are formatted once per table, so each call only binds values.
#[derive(Debug)]
struct Sql {
    stage: String,
    claim: String,
    claim_keys: String,
    has_pending_key: String,
    published: String,
    retry: String,
    dead: String,
    release: String,
    backlog: String,
    cleanup: String,
    pull_forward: String,
}

impl Sql {
    fn new(t: &OutboxTable) -> Self {
        Self {
            stage: format!(
                "INSERT INTO {t} (event_id, aggregate_type, aggregate_id, event_type, topic, \
                 event_key, payload, headers, correlation_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (event_id) DO NOTHING RETURNING id"
            ),
            claim: claim_sql(t, ""),
            claim_keys: claim_sql(t, "AND h.event_key = ANY($5)"),
            has_pending_key: format!(
                "SELECT EXISTS (SELECT 1 FROM {t} WHERE status = 'pending' AND event_key = $1)"
            ),
            // An acked row is published whoever holds the lease: the broker has it.
            published: format!(
                "UPDATE {t} SET status = 'published', published_at = clock_timestamp(), \
                 attempts = attempts + 1, lease_owner = NULL, lease_until = NULL, last_error = NULL \
                 WHERE id = ANY($1) AND status = 'pending'"
            ),
            retry: format!(
                "UPDATE {t} t SET attempts = t.attempts + 1, failures = t.failures + u.budget, \
                 next_attempt_at = now() + u.delay_ms * interval '1 millisecond', \
                 last_error = u.err, lease_owner = NULL, lease_until = NULL \
                 FROM UNNEST($1::bigint[], $2::float8[], $3::text[], $4::int[]) \
                      AS u(id, delay_ms, err, budget) \
                 WHERE t.id = u.id AND t.status = 'pending' AND t.lease_owner = $5"
            ),
            dead: format!(
                "UPDATE {t} t SET status = 'dead', attempts = t.attempts + 1, \
                 failures = t.failures + u.budget, last_error = u.err, \
                 lease_owner = NULL, lease_until = NULL \
                 FROM UNNEST($1::bigint[], $2::text[], $3::int[]) AS u(id, err, budget) \
                 WHERE t.id = u.id AND t.status = 'pending' AND t.lease_owner = $4"
            ),
            release: format!(
                "UPDATE {t} SET lease_owner = NULL, lease_until = NULL \
                 WHERE id = ANY($1) AND lease_owner = $2 AND status = 'pending'"
            ),
            backlog: format!(
                "SELECT count(*)::bigint AS pending, \
                 COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at)), 0)::float8 AS age \
                 FROM {t} WHERE status = 'pending'"
            ),
            cleanup: format!(
                "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE status = 'published' \
                 AND published_at < now() - make_interval(secs => $1) LIMIT $2)"
            ),
            pull_forward: format!(
                "UPDATE {t} SET next_attempt_at = now() \
                 WHERE status = 'pending' AND next_attempt_at > now()"
            ),
        }
    }
}

/// Heads are locked (SKIP LOCKED) before the chain behind them is leased, so two
/// claimers can never hold rows of the same key at once.
fn claim_sql(t: &OutboxTable, head_filter: &str) -> String {
    format!(
        "WITH heads AS ( \
             SELECT h.id, h.event_key FROM {t} h \
             WHERE h.status = 'pending' AND h.next_attempt_at <= now() \
               AND (h.lease_until IS NULL OR h.lease_until < now()) {head_filter} \
               AND NOT EXISTS (SELECT 1 FROM {t} o WHERE o.status = 'pending' \
                               AND o.event_key = h.event_key AND o.id < h.id) \
             ORDER BY h.id LIMIT $2 \
             FOR UPDATE OF h SKIP LOCKED), \
         chain AS ( \
             SELECT f.id FROM heads CROSS JOIN LATERAL ( \
                 SELECT c.id FROM {t} c WHERE c.status = 'pending' \
                   AND c.event_key = heads.event_key AND c.id >= heads.id \
                 ORDER BY c.id LIMIT $3) f) \
         UPDATE {t} t SET lease_owner = $1, \
             lease_until = now() + make_interval(secs => $4) \
         FROM chain WHERE t.id = chain.id \
         RETURNING t.id, t.event_id, t.topic, t.event_key, t.payload, t.headers, \
                   t.attempts, t.failures, t.created_at"
    )
}

/// Handle on one service's outbox table.
#[derive(Debug, Clone)]
pub struct OutboxStore {
    pool: PgPool,
    table: OutboxTable,
    sql: std::sync::Arc<Sql>,
    service: String,
}

impl OutboxStore {
    /// A store over `table`, using `pool` for the relay's own statements.
    pub fn new(pool: PgPool, table: OutboxTable) -> Self {
        let sql = std::sync::Arc::new(Sql::new(&table));
        Self {
            pool,
            service: table.schema().to_owned(),
            table,
            sql,
        }
    }

    /// Labels this store's metrics with `service` (default: the schema name). Relays and
    /// publishers set it to their service name, so staged and published counts line up.
    #[must_use]
    pub fn with_service(mut self, service: impl Into<String>) -> Self {
        self.service = service.into();
        self
    }

    /// The table this store works on.
    pub fn table(&self) -> &OutboxTable {
        &self.table
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the schema, table and indexes if they do not exist (idempotent, safe to run
    /// from several processes at once).
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the DDL fails.
    pub async fn migrate(&self) -> Result<()> {
        let t = &self.table;
        let schema = t.schema();
        let pending = t.derived("pending");
        let key_pending = t.derived("key_pending");
        let published = t.derived("published");
        let ddl = [
            format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""),
            format!(
                "CREATE TABLE IF NOT EXISTS {t} ( \
                   id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
                   event_id        UUID NOT NULL UNIQUE, \
                   aggregate_type  TEXT NOT NULL, \
                   aggregate_id    TEXT NOT NULL, \
                   event_type      TEXT NOT NULL, \
                   topic           TEXT NOT NULL, \
                   event_key       TEXT NOT NULL, \
                   payload         BYTEA NOT NULL, \
                   headers         JSONB NOT NULL DEFAULT '{{}}', \
                   correlation_id  UUID, \
                   status          TEXT NOT NULL DEFAULT 'pending' \
                                   CHECK (status IN ('pending', 'published', 'dead')), \
                   attempts        INT NOT NULL DEFAULT 0, \
                   failures        INT NOT NULL DEFAULT 0, \
                   next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(), \
                   lease_owner     UUID, \
                   lease_until     TIMESTAMPTZ, \
                   last_error      TEXT, \
                   created_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(), \
                   published_at    TIMESTAMPTZ)"
            ),
            // Claiming scans pending rows in id order; the key index answers "is there an
            // older pending row of this key" and finds the chain behind a head. Neither
            // indexes the lease columns, so leasing stays a cheap update.
            format!(
                "CREATE INDEX IF NOT EXISTS \"{pending}\" ON {t} (id) WHERE status = 'pending'"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS \"{key_pending}\" ON {t} (event_key, id) \
                 WHERE status = 'pending'"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS \"{published}\" ON {t} (published_at) \
                 WHERE status = 'published'"
            ),
        ];
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| Error::storage("migrate", e))?;
        // Concurrent CREATE ... IF NOT EXISTS can still collide; serialize migrations.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('outpost.migrate'))")
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::storage("migrate", e))?;
        for stmt in &ddl {
            sqlx::query(stmt)
                .execute(&mut *tx)
                .await
                .map_err(|e| Error::storage("migrate", e))?;
        }
        tx.commit().await.map_err(|e| Error::storage("migrate", e))
    }

    /// Stages `event` inside the caller's transaction; it is visible to relays only once the
    /// caller commits, and gone if the caller rolls back. Never commits.
    ///
    /// Returns the row id, or `None` when an event with this `event_id` was already staged
    /// (staging is idempotent on `event_id`).
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the insert fails; the caller's transaction is then
    /// aborted and should be rolled back.
    pub async fn stage(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &OutboxEvent,
    ) -> Result<Option<i64>> {
        let row = sqlx::query(&self.sql.stage)
            .bind(event.event_id)
            .bind(&event.aggregate_type)
            .bind(&event.aggregate_id)
            .bind(&event.event_type)
            .bind(&event.topic)
            .bind(&event.event_key)
            .bind(&event.payload)
            .bind(Json(&event.headers))
            .bind(event.correlation_id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(|e| Error::storage_with("stage", context_of(event), e))?;
        crate::metrics::staged(&self.service);
        Ok(row.map(|r| r.get::<i64, _>(0)))
    }

    /// Leases up to `heads` key heads, each with at most `per_key` rows of its key, to
    /// `owner` for `lease`. Returned rows are in staging order.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the query fails.
    pub async fn claim(
        &self,
        owner: Uuid,
        heads: usize,
        per_key: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedEvent>> {
        self.claim_where(owner, heads, per_key, lease, None).await
    }

    /// Like [`claim`](Self::claim), restricted to the given keys (the eager path claims
    /// what a transaction just staged, with whatever is pending ahead of it on its keys
    /// respected: a key whose head is elsewhere is skipped).
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the query fails.
    pub async fn claim_keys(
        &self,
        owner: Uuid,
        keys: &[String],
        per_key: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedEvent>> {
        self.claim_where(owner, keys.len(), per_key, lease, Some(keys))
            .await
    }

    /// Whether any row of `key` is waiting for delivery.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the query fails.
    pub async fn has_pending_key(&self, key: &str) -> Result<bool> {
        sqlx::query_scalar(&self.sql.has_pending_key)
            .bind(key)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| Error::storage("has_pending_key", e))
    }

    async fn claim_where(
        &self,
        owner: Uuid,
        heads: usize,
        per_key: usize,
        lease: Duration,
        keys: Option<&[String]>,
    ) -> Result<Vec<ClaimedEvent>> {
        let sql = if keys.is_some() {
            &self.sql.claim_keys
        } else {
            &self.sql.claim
        };
        let mut query = sqlx::query(sql)
            .bind(owner)
            .bind(i64::try_from(heads).unwrap_or(i64::MAX))
            .bind(i64::try_from(per_key).unwrap_or(i64::MAX))
            .bind(lease.as_secs_f64());
        if let Some(keys) = keys {
            query = query.bind(keys);
        }
        let rows = query
            .fetch_all(&self.pool)
            .await
            .map_err(|e| Error::storage("claim", e))?;
        let mut events = rows
            .into_iter()
            .map(|r| {
                let headers: Json<BTreeMap<String, String>> = r.get("headers");
                ClaimedEvent {
                    id: r.get("id"),
                    event_id: r.get("event_id"),
                    topic: r.get("topic"),
                    event_key: r.get("event_key"),
                    payload: r.get("payload"),
                    headers: headers.0,
                    attempts: r.get("attempts"),
                    failures: r.get("failures"),
                    created_at: r.get("created_at"),
                }
            })
            .collect::<Vec<_>>();
        events.sort_by_key(|e| e.id);
        Ok(events)
    }

    /// Records what happened to claimed rows, in one transaction.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the update fails; the rows stay leased until the lease
    /// lapses and are then delivered again (same bytes, same event id).
    pub async fn settle(&self, owner: Uuid, outcomes: &[(i64, Settlement)]) -> Result<()> {
        let mut published = Vec::new();
        let (mut retry_ids, mut retry_delay, mut retry_err, mut retry_budget) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut dead_ids, mut dead_err, mut dead_budget) = (Vec::new(), Vec::new(), Vec::new());
        let mut released = Vec::new();
        for (id, outcome) in outcomes {
            match outcome {
                Settlement::Published => published.push(*id),
                Settlement::Retry {
                    delay,
                    error,
                    budgeted,
                } => {
                    retry_ids.push(*id);
                    retry_delay.push(delay.as_secs_f64() * 1000.0);
                    retry_err.push(truncate(error));
                    retry_budget.push(i32::from(*budgeted));
                }
                Settlement::Dead { error, budgeted } => {
                    dead_ids.push(*id);
                    dead_err.push(truncate(error));
                    dead_budget.push(i32::from(*budgeted));
                }
                Settlement::Released => released.push(*id),
            }
        }
        let err = |e| Error::storage("settle", e);
        let mut tx = self.pool.begin().await.map_err(err)?;
        if !published.is_empty() {
            sqlx::query(&self.sql.published)
                .bind(&published)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        if !retry_ids.is_empty() {
            sqlx::query(&self.sql.retry)
                .bind(&retry_ids)
                .bind(&retry_delay)
                .bind(&retry_err)
                .bind(&retry_budget)
                .bind(owner)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        if !dead_ids.is_empty() {
            sqlx::query(&self.sql.dead)
                .bind(&dead_ids)
                .bind(&dead_err)
                .bind(&dead_budget)
                .bind(owner)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        if !released.is_empty() {
            sqlx::query(&self.sql.release)
                .bind(&released)
                .bind(owner)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        tx.commit().await.map_err(err)
    }

    /// Pending count and age of the oldest pending row.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the query fails.
    pub async fn backlog(&self) -> Result<Backlog> {
        let row = sqlx::query(&self.sql.backlog)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| Error::storage("backlog", e))?;
        let age: f64 = row.get("age");
        Ok(Backlog {
            pending: row.get("pending"),
            oldest_pending: Duration::from_secs_f64(age.max(0.0)),
        })
    }

    /// Deletes at most `limit` rows published more than `retention` ago; returns how many.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the delete fails.
    pub async fn cleanup(&self, retention: Duration, limit: i64) -> Result<u64> {
        let done = sqlx::query(&self.sql.cleanup)
            .bind(retention.as_secs_f64())
            .bind(limit)
            .execute(&self.pool)
            .await
            .map_err(|e| Error::storage("cleanup", e))?;
        Ok(done.rows_affected())
    }

    /// Makes every row waiting for a retry due now (used once the broker is back).
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the update fails.
    pub async fn pull_forward_retries(&self) -> Result<u64> {
        let done = sqlx::query(&self.sql.pull_forward)
            .execute(&self.pool)
            .await
            .map_err(|e| Error::storage("pull_forward", e))?;
        Ok(done.rows_affected())
    }

    /// Parked rows, oldest first.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the query fails.
    pub async fn dead(&self, limit: i64) -> Result<Vec<DeadEvent>> {
        let t = &self.table;
        let rows = sqlx::query(&format!(
            "SELECT id, event_id, topic, event_key, last_error, attempts FROM {t} \
             WHERE status = 'dead' ORDER BY id LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| Error::storage("list_dead", e))?;
        Ok(rows
            .into_iter()
            .map(|r| DeadEvent {
                id: r.get("id"),
                event_id: r.get("event_id"),
                topic: r.get("topic"),
                event_key: r.get("event_key"),
                last_error: r.get("last_error"),
                attempts: r.get("attempts"),
            })
            .collect())
    }

    /// Puts parked rows back in line at their original position (all of them when `ids` is
    /// `None`); returns how many.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the update fails.
    pub async fn requeue(&self, ids: Option<&[i64]>) -> Result<u64> {
        let t = &self.table;
        let done = sqlx::query(&format!(
            "UPDATE {t} SET status = 'pending', failures = 0, next_attempt_at = now() \
             WHERE status = 'dead' AND ($1::bigint[] IS NULL OR id = ANY($1))"
        ))
        .bind(ids)
        .execute(&self.pool)
        .await
        .map_err(|e| Error::storage("requeue", e))?;
        Ok(done.rows_affected())
    }
}

fn context_of(event: &OutboxEvent) -> EventContext {
    EventContext {
        aggregate_type: Some(event.aggregate_type.clone()),
        aggregate_id: Some(event.aggregate_id.clone()),
        event_type: Some(event.event_type.clone()),
        topic: Some(event.topic.clone()),
        correlation_id: Some(event.correlation_id),
    }
}

fn truncate(s: &str) -> String {
    const MAX: usize = 1000;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
