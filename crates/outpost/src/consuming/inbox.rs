//! The PostgreSQL inbox: "consumer group G processed event E" is written in the same
//! transaction as the handler's business writes, so an event takes effect exactly once
//! however often it is delivered. The recommended way to consume Outpost events.
//!
//! A duplicate is recognised from its event id alone (header first, see
//! [`consumer`](crate::consuming::consumer)), before its body is parsed. Two consumers handling the
//! same event at once (a rebalance) serialize on the inbox row: the second waits until the
//! first commits and then skips, or until it rolls back and then handles it.
//!
//! Rows are kept for [`InboxConfig::retention`], which must exceed the publisher's retry
//! horizon (how long after its first delivery a duplicate of an event can still arrive),
//! and are then deleted by [`Inbox::cleanup`].

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::consuming::consumer::{Outcome, Process, Received};
use crate::error::{Error, Result};
use crate::event::envelope::EventEnvelope;
use crate::outbox::ddl::{no_relation, only_if};
use crate::outbox::table::OutboxTable;
use crate::publishing::publisher::{OutboxTx, Publisher};

/// Default inbox table name inside the service's schema.
pub const DEFAULT_INBOX_TABLE: &str = "event_inbox";

/// SQLSTATE of any statement in a transaction that an earlier failure aborted.
const IN_FAILED_TRANSACTION: &str = "25P02";

/// A validated, quoted `"schema"."table"` reference to an inbox (same rules as
/// [`OutboxTable`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InboxTable(OutboxTable);

impl InboxTable {
    /// `schema.event_inbox`.
    ///
    /// # Errors
    /// [`Error::Configuration`] when `schema` is not a plain lowercase identifier.
    pub fn new(schema: &str) -> Result<Self> {
        Self::with_table(schema, DEFAULT_INBOX_TABLE)
    }

    /// A table with an explicit name.
    ///
    /// # Errors
    /// [`Error::Configuration`] when either name is not a plain lowercase identifier.
    pub fn with_table(schema: &str, table: &str) -> Result<Self> {
        OutboxTable::with_table(schema, table).map(Self)
    }

    /// The schema name.
    pub fn schema(&self) -> &str {
        self.0.schema()
    }

    /// The table name.
    pub fn table(&self) -> &str {
        self.0.table()
    }
}

impl fmt::Display for InboxTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Inbox settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxConfig {
    /// How long a processed event id is remembered; a duplicate arriving later takes effect
    /// again. Must exceed the publisher's retry horizon (default 7 days).
    pub retention: Duration,
    /// How often [`Inbox::run_cleanup`] deletes expired rows (default 1 h).
    pub cleanup_interval: Duration,
    /// Most rows deleted per cleanup statement (default 10 000).
    pub cleanup_batch: i64,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(3600),
            cleanup_batch: 10_000,
        }
    }
}

impl InboxConfig {
    /// Checks the settings; `publisher_retry_horizon` is the longest time after an event's
    /// first delivery that a duplicate of it can still arrive (publisher retries, relay
    /// lease expiry, consumer redelivery).
    ///
    /// # Errors
    /// [`Error::Configuration`] when `retention` does not exceed the horizon, or a field is
    /// not positive.
    pub fn validate(&self, publisher_retry_horizon: Duration) -> Result<()> {
        if self.retention <= publisher_retry_horizon {
            return Err(Error::config(
                "retention",
                format!("longer than the publisher's retry horizon ({publisher_retry_horizon:?})"),
                format!("{:?}", self.retention),
            ));
        }
        if self.cleanup_interval.is_zero() {
            return Err(Error::config("cleanup_interval", "positive", "0s"));
        }
        if self.cleanup_batch <= 0 {
            return Err(Error::config(
                "cleanup_batch",
                "a positive integer",
                self.cleanup_batch.to_string(),
            ));
        }
        Ok(())
    }
}

/// Handle on one service's inbox table.
#[derive(Debug, Clone)]
pub struct Inbox {
    pool: PgPool,
    table: InboxTable,
    config: InboxConfig,
    sql: Arc<Sql>,
}

/// Queries are formatted once per table, so each call only binds values.
#[derive(Debug)]
struct Sql {
    claim: String,
    held: String,
    cleanup: String,
}

impl Inbox {
    /// An inbox over `table`.
    ///
    /// # Errors
    /// [`Error::Configuration`] when `config` is invalid for `publisher_retry_horizon` (see
    /// [`InboxConfig::validate`]).
    pub fn new(
        pool: PgPool,
        table: InboxTable,
        config: InboxConfig,
        publisher_retry_horizon: Duration,
    ) -> Result<Self> {
        config.validate(publisher_retry_horizon)?;
        let t = &table;
        let sql = Sql {
            claim: format!(
                "INSERT INTO {t} (consumer_group, event_id) VALUES ($1, $2) \
                 ON CONFLICT (consumer_group, event_id) DO NOTHING"
            ),
            held: format!(
                "SELECT count(*) FROM {t} WHERE consumer_group = $1 AND event_id = ANY($2)"
            ),
            cleanup: format!(
                "DELETE FROM {t} WHERE (consumer_group, event_id) IN ( \
                     SELECT consumer_group, event_id FROM {t} \
                     WHERE processed_at < now() - make_interval(secs => $1) LIMIT $2)"
            ),
        };
        Ok(Self {
            pool,
            table,
            config,
            sql: Arc::new(sql),
        })
    }

    /// The table this inbox works on.
    pub fn table(&self) -> &InboxTable {
        &self.table
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The settings.
    pub fn config(&self) -> &InboxConfig {
        &self.config
    }

    /// Creates the schema, table and index if they do not exist (idempotent, safe to run
    /// from several processes at once). On a migrated table it takes no lock on the table,
    /// so it neither waits for open transactions that claimed events nor holds claims back.
    ///
    /// # Errors
    /// [`Error::InboxStorage`] when the DDL fails.
    pub async fn migrate(&self) -> Result<()> {
        let t = &self.table;
        let schema = t.schema();
        let processed = t.0.derived("processed_at");
        let ddl = [
            format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""),
            format!(
                "CREATE TABLE IF NOT EXISTS {t} ( \
                   consumer_group TEXT NOT NULL, \
                   event_id       UUID NOT NULL, \
                   processed_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(), \
                   PRIMARY KEY (consumer_group, event_id))"
            ),
            // Retention deletes by age. Not `CREATE INDEX IF NOT EXISTS`: that takes its
            // SHARE lock on the table before finding the index, so every replica's start
            // waited behind open transactions that claimed events, and held claims back.
            only_if(
                &no_relation(schema, &processed),
                &format!("CREATE INDEX \"{processed}\" ON {t} (processed_at)"),
            ),
        ];
        let err = |source| Error::InboxStorage {
            operation: "migrate",
            source,
        };
        let mut tx = self.pool.begin().await.map_err(err)?;
        // Concurrent CREATE ... IF NOT EXISTS can still collide; same lock as the outbox's.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('outpost.migrate'))")
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        for stmt in &ddl {
            sqlx::query(stmt).execute(&mut *tx).await.map_err(err)?;
        }
        tx.commit().await.map_err(err)
    }

    /// Records, inside the caller's transaction, that `group` processed `event_id`. Returns
    /// `true` when this transaction is the first to do so: go on and handle the event, then
    /// commit. `false` means a duplicate: roll back and skip it. Never commits.
    ///
    /// If another transaction recorded the same event and has not finished, this waits
    /// for it: `false` once it commits, `true` if it rolls back.
    ///
    /// # Errors
    /// [`Error::InboxStorage`] when the insert fails; the transaction is then aborted.
    pub async fn claim(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        group: &str,
        event_id: Uuid,
    ) -> Result<bool> {
        let done = sqlx::query(&self.sql.claim)
            .bind(group)
            .bind(event_id)
            .execute(&mut **tx)
            .await
            .map_err(|source| Error::InboxStorage {
                operation: "claim",
                source,
            })?;
        Ok(done.rows_affected() == 1)
    }

    /// Checks, right before the commit, that `tx` still holds its claims of `event_ids`.
    ///
    /// PostgreSQL answers the `COMMIT` of a transaction that a failed statement aborted
    /// with `ROLLBACK`, not with an error, and sqlx reports success: a handler that went on
    /// after a failed statement would have its event settled, its offset committed, and
    /// nothing of it kept. A statement in an aborted transaction fails; one that counts the
    /// claims also finds those undone some other way (a `ROLLBACK` sent by the handler).
    ///
    /// # Errors
    /// A retriable [`Error::Handler`] when the claims are lost (the transaction must be
    /// dropped; nothing was committed), [`Error::InboxStorage`] when the check fails
    /// otherwise.
    async fn confirm_claims(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        group: &str,
        event_ids: &[Uuid],
    ) -> Result<()> {
        let held: i64 = sqlx::query_scalar(&self.sql.held)
            .bind(group)
            .bind(event_ids)
            .fetch_one(&mut **tx)
            .await
            .map_err(|source| match &source {
                sqlx::Error::Database(db)
                    if db.code().as_deref() == Some(IN_FAILED_TRANSACTION) =>
                {
                    Error::retriable(
                        "a statement failed in the handler's transaction and the handler went \
                         on, so PostgreSQL aborted the transaction and nothing was committed; \
                         the event is retried: return the statement's error from the handler",
                    )
                }
                _ => Error::InboxStorage {
                    operation: "commit",
                    source,
                },
            })?;
        if usize::try_from(held).ok() != Some(event_ids.len()) {
            return Err(Error::retriable(
                "the inbox claim was rolled back inside the handler's transaction (a ROLLBACK \
                 the handler sent), so nothing was committed; the event is retried: leave \
                 ending the transaction to the inbox",
            ));
        }
        Ok(())
    }

    /// Deletes rows older than the retention, in batches of `cleanup_batch`; returns how
    /// many.
    ///
    /// # Errors
    /// [`Error::InboxStorage`] when a delete fails (rows deleted before it stay deleted).
    pub async fn cleanup(&self) -> Result<u64> {
        let mut total = 0;
        loop {
            let done = sqlx::query(&self.sql.cleanup)
                .bind(self.config.retention.as_secs_f64())
                .bind(self.config.cleanup_batch)
                .execute(&self.pool)
                .await
                .map_err(|source| Error::InboxStorage {
                    operation: "cleanup",
                    source,
                })?;
            total += done.rows_affected();
            if done.rows_affected() < u64::try_from(self.config.cleanup_batch).unwrap_or(0) {
                return Ok(total);
            }
        }
    }

    /// Runs [`cleanup`](Self::cleanup) now and every `cleanup_interval` until `shutdown`
    /// resolves. Failures are logged and retried at the next interval.
    pub async fn run_cleanup(&self, shutdown: impl Future<Output = ()> + Send) {
        let mut shutdown = pin!(shutdown.fuse());
        loop {
            match self.cleanup().await {
                Ok(0) => {}
                Ok(rows) => debug!(table = %self.table, rows, "expired inbox rows deleted"),
                Err(e) => warn!(table = %self.table, error = %e, "inbox cleanup failed"),
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(self.config.cleanup_interval) => {}
            }
        }
    }
}

/// The business side of consuming with an [`Inbox`]: what to do with one decoded event,
/// inside the transaction that also records it as processed.
///
/// Contract: write through `tx` and never commit or roll it back; the inbox commits it
/// when this returns `Ok`, so the writes and the inbox row take effect together, once. On
/// error everything is rolled back: a [retriable](Error::retriable) error makes the
/// consumer hand the event over again after a backoff, a [permanent](Error::permanent) one
/// dead-letters it ([`Error::database`] picks one for a database error). A failed statement
/// aborts `tx`: return its error; a handler that goes on and returns `Ok` has its event
/// retried, as nothing of it can be committed. Side effects outside `tx` (HTTP calls, other
/// stores) are not covered.
pub trait InboxHandler: Send + Sync {
    /// Handles `event`, received as `received`, writing through `tx`.
    ///
    /// # Errors
    /// Whatever the handler reports; see the trait's contract.
    fn handle(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        received: &Received,
        tx: &mut Transaction<'_, Postgres>,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// A [`Process`] that runs an [`InboxHandler`] behind an [`Inbox`]: one transaction holds
/// the inbox row and the handler's writes.
#[derive(Debug, Clone)]
pub struct Inboxed<H> {
    inbox: Inbox,
    handler: H,
}

impl<H: InboxHandler> Inboxed<H> {
    /// Guards `handler` with `inbox`.
    pub fn new(inbox: Inbox, handler: H) -> Self {
        Self { inbox, handler }
    }

    /// The inbox.
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }
}

impl<H: InboxHandler> Inboxed<H> {
    /// Records `received` in the inbox within `tx` and, the first time, handles it.
    async fn settle_in(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        received: &Received,
    ) -> Result<Outcome> {
        if !self
            .inbox
            .claim(tx, &received.group_id, received.event_id)
            .await?
        {
            return Ok(Outcome::Duplicate);
        }
        let event = received.decode()?;
        self.handler.handle(&event, received, tx).await?;
        Ok(Outcome::Handled)
    }
}

impl<H: InboxHandler> Process for Inboxed<H> {
    async fn process(&self, received: &Received) -> Result<Outcome> {
        let err = |operation| move |source| Error::InboxStorage { operation, source };
        let mut tx = self.inbox.pool.begin().await.map_err(err("begin"))?;
        // Dropping `tx` on any error rolls the inbox row back with the writes.
        let outcome = self.settle_in(&mut tx, received).await?;
        if outcome == Outcome::Duplicate {
            tx.rollback().await.map_err(err("rollback"))?;
        } else {
            self.inbox
                .confirm_claims(&mut tx, &received.group_id, &[received.event_id])
                .await?;
            // A commit that fails ambiguously is retried: if it did commit, the retry is a
            // duplicate.
            tx.commit().await.map_err(err("commit"))?;
        }
        Ok(outcome)
    }

    /// One transaction for all of `received`: one commit (and one flush of the WAL)
    /// instead of one per message. A duplicate's claim writes nothing, so it is skipped
    /// without touching the others.
    async fn process_together(&self, received: &[Received]) -> Option<Result<Vec<Outcome>>> {
        let err = |operation| move |source| Error::InboxStorage { operation, source };
        let settled = async {
            let mut tx = self.inbox.pool.begin().await.map_err(err("begin"))?;
            let mut outcomes = Vec::with_capacity(received.len());
            let mut claimed = Vec::with_capacity(received.len());
            for received in received {
                let outcome = self.settle_in(&mut tx, received).await?;
                if outcome == Outcome::Handled {
                    claimed.push(received.event_id);
                }
                outcomes.push(outcome);
            }
            if !claimed.is_empty() {
                self.inbox
                    .confirm_claims(&mut tx, &received[0].group_id, &claimed)
                    .await?;
            }
            tx.commit().await.map_err(err("commit"))?;
            Ok(outcomes)
        };
        Some(settled.await)
    }
}

/// The business side of a service that consumes and publishes: handle one event, writing
/// business rows and staging the events it causes through `tx`.
///
/// Contract: as [`InboxHandler`]'s; the inbox row, the business writes and the staged
/// events commit together, and the events are then dispatched in the publisher's mode.
pub trait PublishingHandler: Send + Sync {
    /// Handles `event`, received as `received`, writing and publishing through `tx`.
    ///
    /// # Errors
    /// Whatever the handler reports; see [`InboxHandler`]'s contract.
    fn handle(
        &self,
        event: &EventEnvelope<serde_json::Value>,
        received: &Received,
        tx: &mut OutboxTx,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Handles `events` (consecutive messages of one partition, in order, each new to the
    /// inbox) in one transaction, when the consumer settles messages together
    /// ([`ConsumerConfig::together`](crate::ConsumerConfig::together)). The default calls
    /// [`handle`](Self::handle) for each in order; override it to share work between them
    /// (one lock, one statement for all), with the effect of handling them one by one.
    ///
    /// # Errors
    /// As [`handle`](Self::handle); an error rolls back the whole unit, whose messages are
    /// then handled one at a time.
    fn handle_together(
        &self,
        events: &[(EventEnvelope<serde_json::Value>, &Received)],
        tx: &mut OutboxTx,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            for (event, received) in events {
                self.handle(event, received, tx).await?;
            }
            Ok(())
        }
    }
}

/// A [`Process`] for consume-then-publish services: one transaction holds the inbox row,
/// the handler's writes and the events it stages; after commit they are dispatched (in
/// the transactional mode: produced at once, the relay as the net).
///
/// The publisher's outbox and the inbox must live in the same database.
#[derive(Debug, Clone)]
pub struct InboxedPublishing<H> {
    inbox: Inbox,
    publisher: Publisher,
    handler: H,
}

impl<H: PublishingHandler> InboxedPublishing<H> {
    /// Guards `handler` with `inbox`, publishing through `publisher`.
    pub fn new(inbox: Inbox, publisher: Publisher, handler: H) -> Self {
        Self {
            inbox,
            publisher,
            handler,
        }
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }
}

impl<H: PublishingHandler> InboxedPublishing<H> {
    /// Records `received` in the inbox within `tx`; its event the first time, `None` for a
    /// duplicate (whose claim wrote nothing).
    async fn claim(
        &self,
        tx: &mut OutboxTx,
        received: &Received,
    ) -> Result<Option<EventEnvelope<serde_json::Value>>> {
        if self
            .inbox
            .claim(tx.transaction(), &received.group_id, received.event_id)
            .await?
        {
            received.decode().map(Some)
        } else {
            Ok(None)
        }
    }
}

impl<H: PublishingHandler> Process for InboxedPublishing<H> {
    async fn process(&self, received: &Received) -> Result<Outcome> {
        let mut tx = self.publisher.begin().await?;
        // Dropping `tx` on any error rolls back the inbox row, writes and events.
        let Some(event) = self.claim(&mut tx, received).await? else {
            tx.rollback().await?;
            return Ok(Outcome::Duplicate);
        };
        self.handler.handle(&event, received, &mut tx).await?;
        self.inbox
            .confirm_claims(tx.transaction(), &received.group_id, &[received.event_id])
            .await?;
        // The outbox holds the events once this commits; their dispatch need not hold up
        // the next message of the partition.
        tx.commit_and_dispatch_later().await?;
        Ok(Outcome::Handled)
    }

    /// One transaction for all of `received`, and one eager dispatch for every event they
    /// staged.
    async fn process_together(&self, received: &[Received]) -> Option<Result<Vec<Outcome>>> {
        let settled = async {
            let mut tx = self.publisher.begin().await?;
            let mut outcomes = Vec::with_capacity(received.len());
            let mut new = Vec::with_capacity(received.len());
            for received in received {
                // A duplicate is skipped without touching the others.
                match self.claim(&mut tx, received).await? {
                    Some(event) => {
                        new.push((event, received));
                        outcomes.push(Outcome::Handled);
                    }
                    None => outcomes.push(Outcome::Duplicate),
                }
            }
            self.handler.handle_together(&new, &mut tx).await?;
            if !new.is_empty() {
                let claimed: Vec<Uuid> = new.iter().map(|(_, r)| r.event_id).collect();
                self.inbox
                    .confirm_claims(tx.transaction(), &received[0].group_id, &claimed)
                    .await?;
            }
            tx.commit_and_dispatch_later().await?;
            Ok(outcomes)
        };
        Some(settled.await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_must_outlast_the_publisher_retry_horizon() {
        let day = Duration::from_secs(24 * 3600);
        let config = InboxConfig::default();
        assert!(config.validate(day).is_ok());
        let err = config.validate(7 * day).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid setting retention"),
            "{err}"
        );
        let batch = InboxConfig {
            cleanup_batch: 0,
            ..config
        };
        assert!(batch.validate(day).is_err());
    }

    #[test]
    fn table_names_are_validated() {
        let t = InboxTable::new("els").unwrap();
        assert_eq!(t.to_string(), "\"els\".\"event_inbox\"");
        assert!(InboxTable::new("Els").is_err());
        assert!(InboxTable::with_table("els", "in box").is_err());
    }
}
