//! All SQL against a service's outbox: migrate, stage, claim keys, fetch, settle, release,
//! clean up.
//!
//! Two tables per service:
//! - the **events** table: one row per staged event, `pending → published` (acked by the
//!   broker, with the partition and offset it landed at) or `pending → dead` (parked with
//!   its reason);
//! - the **keys** table: one row per key that may have pending events. It is where
//!   ownership lives: a sender (relay or eager path) leases a *key*, never single rows, so
//!   one key has one owner at a time, whatever happens to its rows (late commits, requeues,
//!   retries). A key that waits for a retry carries `next_attempt_at` and holds back only
//!   itself; a leased key's `next_attempt_at` is when its lease lapses. Claiming walks
//!   this small table, never the backlog, so its cost does not grow with the number of
//!   pending events.
//!
//! Commit order per key: staging takes a transaction-scoped advisory lock on the key before
//! the row gets its id, so two transactions staging the same key serialize, and ids of one
//! key are in commit order (the order in which the state changes became true). Callers who
//! already serialize per key can take the lock shared ([`KeyLock::Shared`]): no waiting,
//! ids then follow insert order.
//!
//! Key rows are deleted only by an owner that finds its key drained, inside a transaction
//! holding the key's advisory lock exclusively (`pg_try_advisory_xact_lock`): a writer that
//! is mid-transaction on the key holds the lock (shared or exclusive), so the delete is
//! skipped and the key row kept; a writer that starts later waits and re-inserts the row.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use sqlx::types::Json;
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use crate::error::{bounded, Error, EventContext, Result};
use crate::event::envelope::OutboxEvent;
use crate::outbox::bounded::Bounded;
use crate::outbox::ddl::{no_column, no_relation, only_if};
use crate::outbox::headers::StoredHeaders;
use crate::outbox::sql_api;
use crate::outbox::table::OutboxTable;

/// What a [`settle`](OutboxStore::settle) recorded, by row id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Rows marked published (or deleted as published).
    pub published: HashSet<i64>,
    /// Rows whose failure was recorded (to retry, or parked).
    pub failed: HashSet<i64>,
}

/// A pending row handed to its key's owner, ready to be produced.
#[derive(Debug, Clone)]
pub struct ClaimedEvent {
    /// Row id (commit order within a key).
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
    pub headers: StoredHeaders,
    /// Delivery attempts so far.
    pub attempts: i32,
    /// Failures so far that count against the attempt budget.
    pub failures: i32,
    /// When the row was staged.
    pub created_at: DateTime<Utc>,
}

/// A key leased by one owner, with the first pending rows of it (oldest first).
#[derive(Debug, Clone)]
pub struct ClaimedKey {
    /// The key.
    pub key: String,
    /// Its pending rows in id order, at most the number asked for.
    pub rows: Vec<ClaimedEvent>,
}

/// A row staging inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StagedRow {
    /// Row id.
    pub(crate) id: i64,
    /// Staging created the key's row leased to the stager (see
    /// [`OutboxStore::stage_leasing`]).
    pub(crate) key_leased: bool,
}

/// What became of one delivered (or failed) row.
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// The broker acknowledged it at `partition`/`offset`.
    Published {
        /// Partition it landed in.
        partition: i32,
        /// Offset within the partition.
        offset: i64,
    },
    /// Try again after `delay`; the row's key waits (holding back only itself).
    Retry {
        /// How long the key waits before the next attempt.
        delay: Duration,
        /// Why it failed.
        error: String,
        /// Whether this failure consumes the attempt budget.
        budgeted: bool,
        /// Whether the failure said the broker was unavailable (such keys are pulled
        /// forward once the broker answers again).
        transient: bool,
        /// The row's `attempts` when it was read: the failure is recorded only over that
        /// value, so a settle that runs twice (its first answer lost, or its statement given
        /// up on by the client and still run by the server) counts it once.
        attempts: i32,
    },
    /// Parked for an operator; never selected again by a relay.
    Dead {
        /// Why it was parked.
        error: String,
        /// Whether this last failure counts against the attempt budget.
        budgeted: bool,
        /// The row's `attempts` when it was read (see [`Settlement::Retry`]).
        attempts: i32,
    },
    /// Not attempted; the row stays pending as it was.
    Released,
}

/// How staging locks the event's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyLock {
    /// Transactions staging the same key wait for each other, so a key's row ids follow
    /// commit order (default).
    #[default]
    Exclusive,
    /// No waiting: for callers that already serialize their writes per key (for example
    /// by locking the aggregate's row); ids then follow insert order.
    Shared,
}

/// Most keys [`OutboxStore::release_drained`] locks in one transaction.
pub const KEYS_PER_HAND_BACK: usize = 1000;

/// Which free keys a claim leases.
#[derive(Clone, Copy)]
enum Due<'a> {
    /// The longest due first.
    Oldest,
    /// The most recently due first (see [`OutboxStore::claim_newest`]).
    Newest,
    /// These keys only, if free.
    Listed(&'a [String]),
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

/// A condition that turns off the wait for the WAL flush at the commit of the statement's
/// transaction (`synchronous_commit` for that transaction only; a one-time filter, so it
/// costs no round trip and runs even when no row matches).
///
/// For bookkeeping only: hand-backs, settles and drained key rows. A crash of the server
/// may lose the last of them, which leaves keys free and rows pending, as after an owner
/// that stopped: the rows are delivered again (same bytes, same event id) and nothing is
/// lost. Each such write would otherwise wait for a flush of its own.
///
/// Never for what gives a key an owner, claims and renewals: a lease lost that way while
/// its holder still sends from memory would let a second owner claim the key after the
/// restart, and two senders can put a key's events out of order. Staging never uses it
/// either: an event is committed with the caller's transaction, durably.
const NO_FLUSH_WAIT: &str = "(SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL";

/// Queries are formatted once per table, so each call only binds values.
#[derive(Debug)]
struct Sql {
    stage: String,
    stage_all: String,
    claim: String,
    claim_newest: String,
    claim_keys: String,
    fetch: String,
    fetch_leased: String,
    renew: String,
    settle: String,
    settle_deleting: String,
    try_lock_keys: String,
    release: String,
    delete_drained: String,
    pending_keys: String,
    pull_forward: String,
    backlog: String,
    staged_present: String,
    cleanup: String,
}

/// The returned columns of a claimed or fetched row, after `claimed_key` (read by position
/// in `group_by_key`).
const ROW_COLUMNS: &str =
    "e.id, e.event_id, e.topic, e.event_key, e.payload, e.headers, e.attempts, e.failures, e.created_at";

impl Sql {
    fn new(t: &OutboxTable, lock: KeyLock) -> Self {
        let k = t.keys();
        let p = t.payloads();
        // Pending rows with their payloads, for the claim's and the fetch's per-key reads.
        // Headers as text: a claimed row keeps them so until it is produced (see
        // `StoredHeaders`).
        let rows = format!(
            "SELECT e.*, p.payload, p.headers::text AS headers FROM {t} e JOIN {p} p ON p.id = e.id"
        );
        let read_keys = |check: &str| {
            format!(
                "SELECT c.event_key AS claimed_key, {ROW_COLUMNS} \
                 FROM UNNEST($2::text[], $3::bigint[]) AS c(event_key, after) \
                 CROSS JOIN LATERAL ( \
                     {rows} WHERE e.status = 'pending' \
                       AND e.event_key = c.event_key AND e.id > c.after {check} \
                     ORDER BY e.id LIMIT $4) e"
            )
        };
        let lock_id = |key: &str| format!("hashtextextended('{}' || {key}, 0)", t.lock_namespace());
        let next_id = t.next_id();
        let lease_until = "CASE WHEN $10::uuid IS NOT NULL \
             THEN statement_timestamp() + make_interval(secs => $11::float8) END";
        // A statement's array parameters are visible to the planner when it plans for the
        // values (sqlx prepares each statement per connection, and PostgreSQL plans its first
        // five executions for their values): a few hundred ids or keys, with statistics that
        // are missing or older than the backlog, were planned as a scan of every pending row
        // or of the keys table per statement (a settle of 128 rows over a 100,000-row backlog:
        // 46 ms, a hash join over all 100,000 pending rows). Read back through a subquery the
        // array's size is unknown when planning, and its primary key is the only way in.
        let listed =
            |column: &str, param: &str| format!("{column} = ANY(ARRAY(SELECT unnest({param})))");
        // `status = 'pending'` matches the predicate of the pending-rows index, whose size
        // the planner takes from the statistics: a row looked up by id is checked this way
        // instead, which that index cannot serve (the CHECK constraint allows three values).
        let still_pending = "t.status <> 'published' AND t.status <> 'dead'";
        let published_ids = listed("t.id", "$1::bigint[]");
        // One statement settles every row of a batch and hands its keys back: an acked row
        // is published whoever holds its key now (the broker has it); failures and releases
        // apply only to keys this owner still holds. `published` is the CTE that records
        // the acked rows (marks or deletes them). It answers with the rows it changed, so
        // that what is counted is what was recorded (not a row another owner had recorded
        // already, nor a failure of a key this owner no longer held).
        let settle = |published: &str| {
            format!(
                "WITH {published}, \
                 failed AS ( \
                     UPDATE {t} t SET attempts = t.attempts + 1, \
                         failures = t.failures + u.budget, last_error = u.err, \
                         status = CASE WHEN u.dead THEN 'dead' ELSE 'pending' END \
                     FROM UNNEST($4::bigint[], $5::int[], $6::text[], $7::bool[], $12::int[]) \
                          AS u(id, budget, err, dead, seen) \
                     WHERE t.id = u.id AND {failed_ids} AND {still_pending} \
                       AND t.attempts = u.seen \
                       AND EXISTS (SELECT 1 FROM {k} k WHERE k.event_key = t.event_key \
                                   AND k.lease_owner = $11) \
                     RETURNING t.id), \
                 released AS ( \
                     UPDATE {k} k SET lease_owner = NULL, lease_until = NULL, \
                         next_attempt_at = CASE WHEN u.delay_ms IS NULL THEN now() \
                             ELSE now() + u.delay_ms * interval '1 millisecond' END, \
                         backoff_transient = COALESCE(u.transient, false) \
                     FROM UNNEST($8::text[], $9::float8[], $10::bool[]) \
                          AS u(key, delay_ms, transient) \
                     WHERE k.event_key = u.key AND {released} AND k.lease_owner = $11) \
                 SELECT ARRAY(SELECT id FROM published) AS published, \
                        ARRAY(SELECT id FROM failed) AS failed",
                failed_ids = listed("t.id", "$4::bigint[]"),
                released = listed("k.event_key", "$8::text[]"),
            )
        };
        let lock_fn = match lock {
            KeyLock::Exclusive => "pg_advisory_xact_lock",
            KeyLock::Shared => "pg_advisory_xact_lock_shared",
        };
        // The lease is written by primary key: an `UPDATE ... FROM free` join was planned as
        // a scan of the whole keys table, per claim.
        //
        // A leased key is not due before its lease lapses (`next_attempt_at` moves with
        // `lease_until`), so the scan for free keys starts past the keys in flight. With
        // `next_attempt_at` left where it was, every claim stepped over each leased key,
        // heap visit and all: a relay keeps thousands in flight (psql, 500-key claims beside
        // 5,000 keys leased elsewhere: 4.9 ms each, 3.7 ms with the move). The lease is no
        // longer a HOT update; that costs less.
        let lease_keys = |own: &str, only: &str, order: &str| {
            format!(
                "WITH free AS ( \
                     SELECT event_key FROM {k} \
                     WHERE ((next_attempt_at <= now() \
                             AND (lease_until IS NULL OR lease_until < now())) {own}) \
                       {only} \
                     ORDER BY next_attempt_at {order} LIMIT $2 \
                     FOR UPDATE SKIP LOCKED), \
                 leased AS ( \
                     UPDATE {k} k SET lease_owner = $1, \
                         lease_until = now() + make_interval(secs => $3), \
                         next_attempt_at = now() + make_interval(secs => $3), \
                         backoff_transient = false \
                     WHERE k.event_key = ANY(ARRAY(SELECT event_key FROM free)) \
                     RETURNING k.event_key)"
            )
        };
        // A key handed back by a statement that committed after this one's snapshot is
        // still claimed (the lock re-reads the key row), but this snapshot would show its
        // just-published rows as pending: the rows are locked too, which re-reads each one
        // and skips those that are no longer pending.
        let claim_with_rows = format!(
            "{} SELECT leased.event_key AS claimed_key, {ROW_COLUMNS} \
             FROM leased LEFT JOIN LATERAL ( \
                 {rows} WHERE e.status = 'pending' AND e.event_key = leased.event_key \
                 ORDER BY e.id LIMIT $4 FOR UPDATE OF e) e ON true",
            // A key its owner kept for the next dispatch (see `claim_keys`) is claimed again.
            lease_keys(
                "OR lease_owner = $1",
                &format!("AND {}", listed("event_key", "$5::text[]")),
                "",
            )
        );
        Self {
            // The lock is taken before the row's id is drawn (the CTE is read first), and the
            // key row is inserted under it. The payload row comes first: its table holds the
            // event id's uniqueness (see `migrate`), so a repeated event id inserts nothing.
            // A key row this statement creates may be leased to the stager at once ($10,
            // $11 seconds; see `stage_leasing`).
            stage: format!(
                "WITH lock AS (SELECT {lock_fn}({}) AS locked), \
                 body AS (INSERT INTO {p} (id, event_id, payload, headers) \
                     SELECT {next_id}, $1::uuid, $7::bytea, $8::jsonb FROM lock \
                     ON CONFLICT (event_id) DO NOTHING RETURNING id), \
                 key AS (INSERT INTO {k} (event_key, lease_owner, lease_until, next_attempt_at) \
                     SELECT $6::text, $10::uuid, {lease_until}, \
                            COALESCE({lease_until}, now()) FROM body \
                     ON CONFLICT (event_key) DO NOTHING RETURNING lease_owner IS NOT NULL AS leased), \
                 staged AS (INSERT INTO {t} (id, event_id, aggregate_type, aggregate_id, \
                     event_type, topic, event_key, correlation_id) OVERRIDING SYSTEM VALUE \
                     SELECT id, $1::uuid, $2::text, $3::text, $4::text, $5::text, $6::text, \
                            $9::uuid FROM body RETURNING id) \
                 SELECT id, COALESCE((SELECT leased FROM key), false) AS leased FROM staged",
                lock_id("$6::text")
            ),
            // Many events in one statement: each key's lock first (in key order, bytewise
            // as everywhere, so two such statements cannot wait for each other), then the
            // rows. Ids are drawn after the locks and handed out in ascending order along
            // the events' order, whatever order the sequence was read in. An event id given
            // twice is inserted by its first occurrence.
            stage_all: format!(
                "WITH ev AS MATERIALIZED ( \
                     SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], \
                         $5::text[], $6::text[], $7::bytea[], $8::jsonb[], $9::uuid[]) \
                     WITH ORDINALITY AS u(event_id, aggregate_type, aggregate_id, event_type, \
                         topic, event_key, payload, headers, correlation_id, ord)), \
                 lock AS MATERIALIZED (SELECT count({lock_fn}({})) AS locked FROM ( \
                     SELECT DISTINCT event_key COLLATE \"C\" AS event_key FROM ev ORDER BY 1) d), \
                 firsts AS MATERIALIZED ( \
                     SELECT d.*, row_number() OVER (ORDER BY d.ord) AS n FROM ( \
                         SELECT DISTINCT ON (event_id) * FROM ev ORDER BY event_id, ord) d), \
                 drawn AS MATERIALIZED (SELECT {next_id} AS id FROM firsts, lock), \
                 ids AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM drawn), \
                 body AS (INSERT INTO {p} (id, event_id, payload, headers) \
                     SELECT ids.id, f.event_id, f.payload, f.headers \
                     FROM firsts f JOIN ids USING (n) \
                     ON CONFLICT (event_id) DO NOTHING RETURNING id, event_id), \
                 key AS (INSERT INTO {k} (event_key, lease_owner, lease_until, next_attempt_at) \
                     SELECT event_key, $10::uuid, {lease_until}, \
                            COALESCE({lease_until}, now()) FROM ( \
                         SELECT DISTINCT f.event_key FROM body b JOIN firsts f USING (event_id)) d \
                     ON CONFLICT (event_key) DO NOTHING \
                     RETURNING event_key, lease_owner IS NOT NULL AS leased), \
                 staged AS (INSERT INTO {t} (id, event_id, aggregate_type, aggregate_id, \
                     event_type, topic, event_key, correlation_id) OVERRIDING SYSTEM VALUE \
                     SELECT b.id, f.event_id, f.aggregate_type, f.aggregate_id, f.event_type, \
                            f.topic, f.event_key, f.correlation_id \
                     FROM body b JOIN firsts f USING (event_id) \
                     RETURNING id, event_id, event_key) \
                 SELECT s.event_id, s.id, COALESCE(key.leased, false) AS leased \
                 FROM staged s LEFT JOIN key USING (event_key)",
                lock_id("d.event_key")
            ),
            // The relay reads the rows of the keys it leased in a second statement, whose
            // snapshot is taken after the lease (see `claim_with_rows`).
            claim: format!("{} SELECT event_key FROM leased", lease_keys("", "", "")),
            // From the other end of the due order: a claim running beside one of `claim`'s
            // leases keys that claim does not reach for. With both from the head, a third of
            // a relay's claims stepped over 500 keys the other had locked (auto_explain in
            // `drain-profile.sh`); one from each end drained 100,000 one-row keys 9 % faster
            // with one relay and 7 % with three (five rounds alternating).
            claim_newest: format!(
                "{} SELECT event_key FROM leased",
                lease_keys("", "", "DESC")
            ),
            claim_keys: claim_with_rows,
            // Only an owner with a live lease reads further rows of its keys. Each key is
            // checked by primary key inside the per-key subquery, so the cost follows the
            // keys asked for, not the keys pending. Not a join of the owned keys: the owner
            // filter is estimated at one row, and that join was planned as a scan of the keys
            // table with a nested loop over the whole UNNEST per owned key (500 keys:
            // 249,500 rows filtered, 31 of a 35 ms fetch).
            fetch: read_keys(&format!(
                "AND EXISTS (SELECT 1 FROM {k} o WHERE o.event_key = c.event_key \
                             AND o.lease_owner = $1 AND o.lease_until > now())"
            )),
            // A claim's own read, right after its lease: the lease check above found every
            // key leased there (a key handed back meanwhile is handed back again unread, and
            // nothing is sent past the claim's start plus the lease), and cost a fifth of
            // the read (psql, 100,000 one-row keys read 1,000 at a time: 4.9-5.0 µs a key
            // with it, 3.8 without). `$1` stays unused so both bind alike.
            fetch_leased: read_keys("AND $1::uuid IS NOT NULL"),
            renew: format!(
                "UPDATE {k} SET lease_until = now() + make_interval(secs => $2), \
                     next_attempt_at = now() + make_interval(secs => $2) \
                 WHERE lease_owner = $1 AND {renewed} \
                 RETURNING event_key",
                renewed = listed("event_key", "$3::text[]")
            ),
            settle: settle(&format!(
                "published AS ( \
                     UPDATE {t} t SET status = 'published', published_at = clock_timestamp(), \
                         attempts = t.attempts + 1, last_error = NULL, \
                         kafka_partition = u.partition, kafka_offset = u.kafka_offset \
                     FROM UNNEST($1::bigint[], $2::int[], $3::bigint[]) \
                          AS u(id, partition, kafka_offset) \
                     WHERE t.id = u.id AND {published_ids} AND {still_pending} \
                       AND {NO_FLUSH_WAIT} \
                     RETURNING t.id)"
            )),
            // Deleting is cheaper than marking: no new row version, no new entries in the
            // primary key and the published index (100,000 one-event keys in
            // `drain-profile.sh`: 50.7k against 45.4k ev/s, six rounds alternating).
            settle_deleting: settle(&format!(
                "published AS ( \
                     DELETE FROM {t} t USING UNNEST($1::bigint[], $2::int[], $3::bigint[]) \
                          AS u(id, partition, kafka_offset) \
                     WHERE t.id = u.id AND {published_ids} AND {still_pending} \
                       AND {NO_FLUSH_WAIT} \
                     RETURNING t.id), \
                 payloads AS (DELETE FROM {p} p USING published d WHERE p.id = d.id)"
            )),
            release: format!(
                "UPDATE {k} SET lease_owner = NULL, lease_until = NULL, next_attempt_at = now() \
                 WHERE {released} AND lease_owner = $2",
                released = listed("event_key", "$1::text[]")
            ),
            // A hand-back's transaction ends on the server if its client falls silent inside
            // it (see `OutboxStore::with_statement_timeout`): the key locks it takes hold up
            // staging of those keys until it ends.
            try_lock_keys: format!(
                "SELECT key FROM UNNEST($1::text[]) AS key \
                 WHERE (SELECT set_config('idle_in_transaction_session_timeout', \
                         COALESCE($2::text, current_setting('idle_in_transaction_session_timeout')), \
                         true)) IS NOT NULL \
                   AND pg_try_advisory_xact_lock({})",
                lock_id("key")
            ),
            delete_drained: format!(
                "DELETE FROM {k} k WHERE {drained} AND k.lease_owner = $2 \
                 AND {NO_FLUSH_WAIT} AND NOT EXISTS (SELECT 1 FROM {t} e WHERE e.status = 'pending' \
                                 AND e.event_key = k.event_key) \
                 RETURNING k.event_key",
                drained = listed("k.event_key", "$1::text[]")
            ),
            pending_keys: format!(
                "SELECT DISTINCT event_key FROM {t} \
                 WHERE status = 'pending' AND event_key = ANY($1)"
            ),
            pull_forward: format!(
                "UPDATE {k} SET next_attempt_at = now(), backoff_transient = false \
                 WHERE backoff_transient AND next_attempt_at > now()"
            ),
            staged_present: format!("SELECT count(*) FROM {t} WHERE id = ANY($1)"),
            backlog: format!(
                "SELECT count(*)::bigint AS pending, \
                 COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at)), 0)::float8 AS age \
                 FROM {t} WHERE status = 'pending'"
            ),
            cleanup: t.delete_with_payloads(&format!(
                "id IN (SELECT id FROM {t} WHERE status = 'published' \
                 AND published_at < now() - make_interval(secs => $1) LIMIT $2)"
            )),
        }
    }
}

/// Handle on one service's outbox.
#[derive(Debug, Clone)]
pub struct OutboxStore {
    pool: PgPool,
    table: OutboxTable,
    sql: std::sync::Arc<Sql>,
    service: String,
    lock: KeyLock,
    delete_published: bool,
    /// How long the relay's statements may take (see [`Self::with_statement_timeout`]).
    deadline: Option<Duration>,
}

impl OutboxStore {
    /// A store over `table`, using `pool` for the relay's own statements.
    pub fn new(pool: PgPool, table: OutboxTable) -> Self {
        let sql = std::sync::Arc::new(Sql::new(&table, KeyLock::default()));
        Self {
            pool,
            service: table.schema().to_owned(),
            table,
            sql,
            lock: KeyLock::default(),
            delete_published: false,
            deadline: None,
        }
    }

    /// Labels this store's metrics with `service` (default: the schema name).
    #[must_use]
    pub fn with_service(mut self, service: impl Into<String>) -> Self {
        self.service = service.into();
        self
    }

    /// How staging locks keys (default [`KeyLock::Exclusive`]: commit order per key).
    #[must_use]
    pub fn with_key_lock(mut self, lock: KeyLock) -> Self {
        self.lock = lock;
        self.sql = std::sync::Arc::new(Sql::new(&self.table, lock));
        self
    }

    /// [`settle`](Self::settle) deletes a published row (and its payload) instead of
    /// marking it `published` for retention to delete later: what a relay or publisher
    /// whose `retention` is zero uses.
    #[must_use]
    pub fn deleting_published(mut self, delete: bool) -> Self {
        self.delete_published = delete;
        self
    }

    /// Bounds each statement the relay and the eager path run through this store (claims,
    /// reads, renewals, settles, hand-backs, housekeeping), and each of their transactions,
    /// to `limit` (default: none). One that has not finished by then fails with a retriable
    /// error and its connection is closed, not returned to the pool: a connection the
    /// network stopped carrying would otherwise hold its caller until TCP gives up. A
    /// hand-back's transaction also sets `idle_in_transaction_session_timeout` to `limit`, so
    /// that the server ends one whose client it cannot hear any more, and the key locks it
    /// holds (which staging of those keys waits for) go with it.
    #[must_use]
    pub fn with_statement_timeout(mut self, limit: Option<Duration>) -> Self {
        self.deadline = limit;
        self
    }

    /// A connection for one of the relay's statements (see [`Self::with_statement_timeout`]).
    pub(crate) async fn connection(&self, what: &'static str) -> Result<Bounded> {
        Bounded::acquire(&self.pool, self.deadline, what).await
    }

    /// The service name metrics are labelled with.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The table this store works on.
    pub fn table(&self) -> &OutboxTable {
        &self.table
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the schema, tables and indexes if they do not exist (idempotent, safe to run
    /// from several processes at once), and gives every pending row's key a key row (a table
    /// written by an older version, or a key row lost by hand, heals here).
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the DDL fails.
    pub async fn migrate(&self) -> Result<()> {
        let t = &self.table;
        let k = t.keys();
        let schema = t.schema();
        let key_pending = t.derived("key_pending");
        let published = t.derived("published");
        let keys_due = t.derived("keys_due");
        let p = t.payloads();
        // Keys compare as bytes (`COLLATE "C"`): they are identifiers, never sorted for
        // people, and under a locale's collation every comparison in the key indexes went
        // through `strcoll` (100,000 one-row keys claimed, read, settled and deleted in
        // psql: 2.86 s with the database's C.UTF-8, 2.53 s with "C"). Tables made before
        // keep their collation; locks are taken in byte order either way.
        let ddl = [
            format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""),
            format!(
                "CREATE TABLE IF NOT EXISTS {t} ( \
                   id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
                   event_id        UUID NOT NULL, \
                   aggregate_type  TEXT NOT NULL, \
                   aggregate_id    TEXT NOT NULL, \
                   event_type      TEXT NOT NULL, \
                   topic           TEXT NOT NULL, \
                   event_key       TEXT COLLATE \"C\" NOT NULL, \
                   correlation_id  UUID, \
                   status          TEXT NOT NULL DEFAULT 'pending' \
                                   CHECK (status IN ('pending', 'published', 'dead')), \
                   attempts        INT NOT NULL DEFAULT 0, \
                   failures        INT NOT NULL DEFAULT 0, \
                   last_error      TEXT, \
                   created_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(), \
                   published_at    TIMESTAMPTZ, \
                   kafka_partition INT, \
                   kafka_offset    BIGINT)"
            ),
            // Settling rewrites a row (its status is in the partial indexes' predicates, so
            // the update is never HOT): with the payload in the row, every settle copied it,
            // and a backlog larger than the buffer cache paid a full-page image per row after
            // each checkpoint. The payload lives apart, written once.
            //
            // The event id's uniqueness (staging is idempotent on it) lives here too, not on
            // the events table: a settle's new row version would otherwise add an entry to
            // that index as well, at a random place and with a uniqueness check, a third of
            // the settle's cost (psql, 100,000 rows settled 2,000 at a time: 10.6 µs a row
            // with it, 6.8 µs without).
            format!(
                "CREATE TABLE IF NOT EXISTS {p} ( \
                   id       BIGINT PRIMARY KEY, \
                   event_id UUID NOT NULL UNIQUE, \
                   payload  BYTEA NOT NULL, \
                   headers  JSONB NOT NULL DEFAULT '{{}}')"
            ),
            // Payload tables made before the event id moved over: it is copied from the
            // events, and the events table's unique constraint goes once the payloads hold it.
            format!(
                "DO $$ BEGIN \
                   IF NOT EXISTS (SELECT 1 FROM information_schema.columns \
                                  WHERE table_schema = '{schema}' AND table_name = '{table}_payloads' \
                                    AND column_name = 'event_id') THEN \
                     ALTER TABLE {p} ADD COLUMN event_id UUID; \
                     UPDATE {p} p SET event_id = e.event_id FROM {t} e WHERE e.id = p.id; \
                     DELETE FROM {p} WHERE event_id IS NULL; \
                     ALTER TABLE {p} ALTER COLUMN event_id SET NOT NULL, \
                       ADD CONSTRAINT \"{table}_payloads_event_id_key\" UNIQUE (event_id); \
                   END IF; \
                 END $$",
                table = t.table()
            ),
            // Tables made before the payload table: their payloads move over once.
            format!(
                "DO $$ BEGIN \
                   IF EXISTS (SELECT 1 FROM information_schema.columns \
                              WHERE table_schema = '{schema}' AND table_name = '{table}' \
                                AND column_name = 'payload') THEN \
                     INSERT INTO {p} (id, event_id, payload, headers) \
                       SELECT id, event_id, payload, headers FROM {t} ON CONFLICT (id) DO NOTHING; \
                     ALTER TABLE {t} DROP COLUMN payload, DROP COLUMN headers; \
                   END IF; \
                 END $$",
                table = t.table()
            ),
            only_if(
                &format!(
                    "EXISTS (SELECT 1 FROM pg_constraint WHERE conname = '{}' \
                     AND conrelid = '{t}'::regclass)",
                    t.derived("event_id_key")
                ),
                &format!(
                    "ALTER TABLE {t} DROP CONSTRAINT \"{}\"",
                    t.derived("event_id_key")
                ),
            ),
            only_if(
                &no_column(t, "kafka_partition"),
                &format!("ALTER TABLE {t} ADD COLUMN kafka_partition INT"),
            ),
            stage_function(t),
            only_if(
                &no_column(t, "kafka_offset"),
                &format!("ALTER TABLE {t} ADD COLUMN kafka_offset BIGINT"),
            ),
            // Fetching a key's next rows and "does this key still have pending rows" both
            // walk this index from (key, after): published rows leave it.
            only_if(
                &no_relation(schema, &key_pending),
                &format!(
                    "CREATE INDEX \"{key_pending}\" ON {t} (event_key, id) \
                     WHERE status = 'pending'"
                ),
            ),
            only_if(
                &no_relation(schema, &published),
                &format!(
                    "CREATE INDEX \"{published}\" ON {t} (published_at) \
                     WHERE status = 'published'"
                ),
            ),
            // `next_attempt_at` is when a key may be claimed next: after its back-off, or
            // while leased, when the lease lapses. Room per page keeps a key row's new
            // versions on its page.
            format!(
                "CREATE TABLE IF NOT EXISTS {k} ( \
                   event_key         TEXT COLLATE \"C\" PRIMARY KEY, \
                   next_attempt_at   TIMESTAMPTZ NOT NULL DEFAULT now(), \
                   backoff_transient BOOLEAN NOT NULL DEFAULT false, \
                   lease_owner       UUID, \
                   lease_until       TIMESTAMPTZ) WITH (fillfactor = 70)"
            ),
            only_if(
                &no_relation(schema, &keys_due),
                &format!("CREATE INDEX \"{keys_due}\" ON {k} (next_attempt_at)"),
            ),
            format!(
                "INSERT INTO {k} (event_key) SELECT DISTINCT event_key FROM {t} \
                 WHERE status = 'pending' ON CONFLICT (event_key) DO NOTHING"
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
    /// With [`KeyLock::Exclusive`] (the default) this waits while another open transaction
    /// has staged an event of the same key, until that one commits or rolls back. Two
    /// transactions that stage two keys in opposite orders can deadlock; PostgreSQL then
    /// aborts one of them (SQLSTATE 40P01, retriable): stage keys in a stable order.
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
        Ok(self.stage_leasing(tx, event, None).await?.map(|r| r.id))
    }

    /// [`stage`](Self::stage), and when `lease` is given and this creates the event's key
    /// row, the key is leased to its owner from here on: committed with the caller's
    /// transaction, so after the commit nobody else may send the key, and nothing else of
    /// it is pending (a key row exists while its key has pending rows). The eager path then
    /// sends the event from memory, without a claim.
    pub(crate) async fn stage_leasing(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &OutboxEvent,
        lease: Option<(Uuid, Duration)>,
    ) -> Result<Option<StagedRow>> {
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
            .bind(lease.map(|(owner, _)| owner))
            .bind(lease.map(|(_, d)| d.as_secs_f64()))
            .fetch_optional(&mut **tx)
            .await
            .map_err(|e| Error::storage_with("stage", context_of(event), e))?;
        Ok(row.map(|r| StagedRow {
            id: r.get("id"),
            key_leased: r.get("leased"),
        }))
    }

    /// How many of the rows `ids`, staged in the caller's transaction, are still in it: in
    /// a transaction a failed statement aborted, an error (see `OutboxTx::commit`).
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the query fails.
    pub(crate) async fn staged_present(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        ids: &[i64],
    ) -> Result<usize> {
        let found: i64 = sqlx::query_scalar(&self.sql.staged_present)
            .bind(ids)
            .fetch_one(&mut **tx)
            .await
            .map_err(|e| Error::storage("commit", e))?;
        Ok(usize::try_from(found).unwrap_or(0))
    }

    /// Stages `events` inside the caller's transaction in one statement, as
    /// [`stage`](Self::stage) would one by one (same locks, rows in the order given; the
    /// locks of their keys are taken in key order). Returns, per event, whether it was
    /// inserted (`false`: its event id was staged before, or earlier in `events`). Never
    /// commits.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the insert fails; the caller's transaction is then
    /// aborted and should be rolled back.
    pub async fn stage_all(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[OutboxEvent],
    ) -> Result<Vec<bool>> {
        let staged = self.stage_all_leasing(tx, events, None).await?;
        Ok(staged.iter().map(Option::is_some).collect())
    }

    /// [`stage_all`](Self::stage_all), leasing the key rows it creates as
    /// [`stage_leasing`](Self::stage_leasing) does; per event, its row when inserted.
    pub(crate) async fn stage_all_leasing(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[OutboxEvent],
        lease: Option<(Uuid, Duration)>,
    ) -> Result<Vec<Option<StagedRow>>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let column = |f: fn(&OutboxEvent) -> &str| -> Vec<&str> { events.iter().map(f).collect() };
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let payloads: Vec<&[u8]> = events.iter().map(|e| e.payload.as_slice()).collect();
        let headers: Vec<Json<&BTreeMap<String, String>>> =
            events.iter().map(|e| Json(&e.headers)).collect();
        let correlations: Vec<Uuid> = events.iter().map(|e| e.correlation_id).collect();
        let inserted: Vec<(Uuid, i64, bool)> = sqlx::query_as(&self.sql.stage_all)
            .bind(&ids)
            .bind(column(|e| &e.aggregate_type))
            .bind(column(|e| &e.aggregate_id))
            .bind(column(|e| &e.event_type))
            .bind(column(|e| &e.topic))
            .bind(column(|e| &e.event_key))
            .bind(&payloads)
            .bind(&headers)
            .bind(&correlations)
            .bind(lease.map(|(owner, _)| owner))
            .bind(lease.map(|(_, d)| d.as_secs_f64()))
            .fetch_all(&mut **tx)
            .await
            .map_err(|e| Error::storage_with("stage", context_of(&events[0]), e))?;
        // An id given twice is inserted by its first occurrence.
        let mut inserted: HashMap<Uuid, StagedRow> = inserted
            .into_iter()
            .map(|(event_id, id, key_leased)| (event_id, StagedRow { id, key_leased }))
            .collect();
        Ok(ids.iter().map(|id| inserted.remove(id)).collect())
    }

    /// Leases up to `keys` free keys (not leased, not backing off) to `owner` for `lease`,
    /// each with its first `per_key` pending rows. A key may come back with no rows: it
    /// drained after its row was written, or the read of its rows failed after the lease
    /// was written (logged); hand it back with [`release_drained`](Self::release_drained)
    /// (unless `owner` already holds it: a lapsed lease of its own may be taken again).
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the query fails.
    pub async fn claim(
        &self,
        owner: Uuid,
        keys: usize,
        per_key: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedKey>> {
        self.claim_where(owner, keys, per_key, lease, Due::Oldest)
            .await
    }

    /// Like [`claim`](Self::claim), the keys due most recently first: for a claim that runs
    /// beside one of [`claim`](Self::claim)'s, so that the two lease keys from the two ends
    /// of the due order instead of stepping over each other's locked keys. Not on its own:
    /// with a backlog larger than a claim, only `claim` is sure to reach the longest-waiting
    /// keys. Beside it, under a backlog that keeps growing, the keys due most recently go
    /// out first and the oldest drain at the pace of `claim`'s alone.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the query fails.
    pub async fn claim_newest(
        &self,
        owner: Uuid,
        keys: usize,
        per_key: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedKey>> {
        self.claim_where(owner, keys, per_key, lease, Due::Newest)
            .await
    }

    /// Like [`claim`](Self::claim), for the given keys only (the eager path claims the keys
    /// a transaction just wrote; a key owned elsewhere or backing off is skipped).
    ///
    /// A key `owner` still leases is claimed again, so a dispatch may keep a key for the
    /// next one instead of handing it back: the caller must make sure nothing else of
    /// `owner` is sending that key's rows by then.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the query fails.
    pub async fn claim_keys(
        &self,
        owner: Uuid,
        keys: &[String],
        per_key: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedKey>> {
        self.claim_where(owner, keys.len(), per_key, lease, Due::Listed(keys))
            .await
    }

    async fn claim_where(
        &self,
        owner: Uuid,
        keys: usize,
        per_key: usize,
        lease: Duration,
        due: Due<'_>,
    ) -> Result<Vec<ClaimedKey>> {
        let keys = i64::try_from(keys).unwrap_or(i64::MAX);
        let claim = match due {
            Due::Oldest => &self.sql.claim,
            Due::Newest => &self.sql.claim_newest,
            Due::Listed(only) => {
                let query = sqlx::query(&self.sql.claim_keys)
                    .bind(owner)
                    .bind(keys)
                    .bind(lease.as_secs_f64())
                    .bind(i64::try_from(per_key).unwrap_or(i64::MAX))
                    .bind(only);
                let mut conn = self.connection("claim").await?;
                return conn.run(|c| group_by_key(query.fetch(c))).await;
            }
        };
        let mut conn = self.connection("claim").await?;
        let leased: Vec<String> = conn
            .run(|c| {
                sqlx::query_scalar(claim)
                    .bind(owner)
                    .bind(keys)
                    .bind(lease.as_secs_f64())
                    .fetch_all(c)
            })
            .await?;
        drop(conn);
        if leased.is_empty() {
            return Ok(Vec::new());
        }
        let from_start: Vec<(String, i64)> = leased.iter().map(|k| (k.clone(), 0)).collect();
        let mut found = match self
            .read(&self.sql.fetch_leased, owner, &from_start, per_key)
            .await
        {
            Ok(found) => found,
            Err(e) => {
                // The keys are leased (that statement committed): as an error they would
                // be nobody's until the lease lapsed. Returned without rows, the caller
                // hands them back as drained ones, except those it already holds (its
                // own lapsed leases, taken again), which a hand-back here would free
                // while it still sends them.
                tracing::warn!(error = %e, keys = leased.len(), "could not read the rows of keys just leased; handing them back");
                Vec::new()
            }
        };
        // A set, not a scan of `found` per key: 500 keys a claim cost 250,000 string
        // compares, a tenth of the relay's CPU over a 100,000-key drain.
        let read: HashSet<&str, foldhash::fast::RandomState> =
            found.iter().map(|k| k.key.as_str()).collect();
        let empty: Vec<ClaimedKey> = leased
            .iter()
            .filter(|key| !read.contains(key.as_str()))
            .map(|key| ClaimedKey {
                key: key.clone(),
                rows: Vec::new(),
            })
            .collect();
        found.extend(empty);
        Ok(found)
    }

    /// The next rows (at most `per_key` each, ids above the given one) of keys `owner`
    /// holds under a live lease. Keys no longer held come back absent.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the query fails.
    pub async fn fetch(
        &self,
        owner: Uuid,
        after: &[(String, i64)],
        per_key: usize,
    ) -> Result<Vec<ClaimedKey>> {
        self.read(&self.sql.fetch, owner, after, per_key).await
    }

    async fn read(
        &self,
        sql: &str,
        owner: Uuid,
        after: &[(String, i64)],
        per_key: usize,
    ) -> Result<Vec<ClaimedKey>> {
        let (keys, ids): (Vec<&str>, Vec<i64>) =
            after.iter().map(|(k, id)| (k.as_str(), *id)).unzip();
        let query = sqlx::query(sql)
            .bind(owner)
            .bind(&keys)
            .bind(&ids)
            .bind(i64::try_from(per_key).unwrap_or(i64::MAX));
        let mut conn = self.connection("fetch").await?;
        conn.run(|c| group_by_key(query.fetch(c))).await
    }

    /// Extends `owner`'s lease on `keys` by `lease` from now; returns the keys it still
    /// held. A key missing from the answer was lost (the lease lapsed and another owner may
    /// have it): its owner must send nothing more of it.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the update fails.
    pub async fn renew(
        &self,
        owner: Uuid,
        keys: &[String],
        lease: Duration,
    ) -> Result<Vec<String>> {
        let mut conn = self.connection("renew").await?;
        conn.run(|c| {
            sqlx::query_scalar(&self.sql.renew)
                .bind(owner)
                .bind(lease.as_secs_f64())
                .bind(keys)
                .fetch_all(c)
        })
        .await
    }

    /// Records what happened to rows and hands keys back, in one statement. A published
    /// row is marked `published` with its partition and offset, or deleted with its payload
    /// (see [`deleting_published`](Self::deleting_published)).
    ///
    /// `keys` are the keys `owner` is done with, each with an optional back-off (`Some`
    /// after a failed row: the key is not claimable before it). Keys still held after this
    /// are unaffected.
    ///
    /// Returns the rows it recorded: a row already recorded (by another owner that sent it
    /// too) or failed under a key `owner` no longer holds is left out.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the update fails; nothing is recorded, the keys stay
    /// leased until their lease lapses and the rows are then delivered again (same bytes,
    /// same event id).
    pub async fn settle(
        &self,
        owner: Uuid,
        rows: &[(i64, Settlement)],
        keys: &[KeyRelease],
    ) -> Result<Recorded> {
        let mut published = (Vec::new(), Vec::new(), Vec::new());
        let mut failed = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (id, outcome) in rows {
            match outcome {
                Settlement::Published { partition, offset } => {
                    published.0.push(*id);
                    published.1.push(*partition);
                    published.2.push(*offset);
                }
                Settlement::Retry {
                    error,
                    budgeted,
                    attempts,
                    ..
                } => {
                    failed.0.push(*id);
                    failed.1.push(i32::from(*budgeted));
                    failed.2.push(bounded(error, 1000).to_owned());
                    failed.3.push(false);
                    failed.4.push(*attempts);
                }
                Settlement::Dead {
                    error,
                    budgeted,
                    attempts,
                } => {
                    failed.0.push(*id);
                    failed.1.push(i32::from(*budgeted));
                    failed.2.push(bounded(error, 1000).to_owned());
                    failed.3.push(true);
                    failed.4.push(*attempts);
                }
                Settlement::Released => {}
            }
        }
        let release_keys: Vec<&str> = keys.iter().map(|k| k.key.as_str()).collect();
        let delays: Vec<Option<f64>> = keys
            .iter()
            .map(|k| k.backoff.map(|d| d.as_secs_f64() * 1000.0))
            .collect();
        let transient: Vec<bool> = keys.iter().map(|k| k.transient).collect();
        let settle = if self.delete_published {
            &self.sql.settle_deleting
        } else {
            &self.sql.settle
        };
        let mut conn = self.connection("settle").await?;
        let recorded = conn
            .run(|c| {
                sqlx::query(settle)
                    .bind(&published.0)
                    .bind(&published.1)
                    .bind(&published.2)
                    .bind(&failed.0)
                    .bind(&failed.1)
                    .bind(&failed.2)
                    .bind(&failed.3)
                    .bind(&release_keys)
                    .bind(&delays)
                    .bind(&transient)
                    .bind(owner)
                    .bind(&failed.4)
                    .fetch_one(c)
            })
            .await?;
        Ok(Recorded {
            published: recorded
                .get::<Vec<i64>, _>("published")
                .into_iter()
                .collect(),
            failed: recorded.get::<Vec<i64>, _>("failed").into_iter().collect(),
        })
    }

    /// Deletes the key rows of `keys` (held by `owner`) that have no pending row left, and
    /// hands the others back. Keys a writer is staging into right now are kept (see the
    /// module doc); so are keys whose rows were requeued meanwhile.
    ///
    /// One transaction: were the hand-back a statement of its own, a writer could re-create
    /// a deleted key in between, this owner claim the new key row, and the late hand-back
    /// free that fresh lease while its rows are in flight (another owner would then send
    /// them again).
    ///
    /// At most [`KEYS_PER_HAND_BACK`] keys a transaction: each holds its key's lock to the
    /// end, and PostgreSQL's lock table, shared by every session, holds a few tens of
    /// thousands (50,000 in one transaction ran out of shared memory on its defaults).
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when a transaction fails (its keys stay leased until their
    /// lease lapses; nothing is lost; the keys of earlier transactions were handed back).
    pub async fn release_drained(&self, owner: Uuid, keys: &[String]) -> Result<u64> {
        let mut deleted = 0;
        for keys in keys.chunks(KEYS_PER_HAND_BACK) {
            deleted += self.release_drained_at_once(owner, keys).await?;
        }
        Ok(deleted)
    }

    async fn release_drained_at_once(&self, owner: Uuid, keys: &[String]) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        // Milliseconds, as the setting reads them (at most `i32::MAX`, the setting's own
        // limit); the server's own setting when unbounded.
        let idle_ms = self
            .deadline
            .map(|d| d.as_millis().clamp(1, i32::MAX as u128).to_string());
        let mut conn = self.connection("release").await?;
        conn.run(|c| async move {
            let mut tx = sqlx::Connection::begin(c).await?;
            // The delete below runs in a statement of its own, so its snapshot is taken
            // after the locks: every writer that committed before them is visible to it.
            let unlocked: Vec<String> = sqlx::query_scalar(&self.sql.try_lock_keys)
                .bind(keys)
                .bind(idle_ms)
                .fetch_all(&mut *tx)
                .await?;
            let deleted: Vec<String> = sqlx::query_scalar(&self.sql.delete_drained)
                .bind(&unlocked)
                .bind(owner)
                .fetch_all(&mut *tx)
                .await?;
            // Usually every key went: looking the deleted ones up again to release them
            // cost the drain of one-event keys a twentieth of the database's time.
            let gone: HashSet<&str> = deleted.iter().map(String::as_str).collect();
            let kept: Vec<&str> = keys
                .iter()
                .map(String::as_str)
                .filter(|k| !gone.contains(k))
                .collect();
            if !kept.is_empty() {
                sqlx::query(&self.sql.release)
                    .bind(&kept)
                    .bind(owner)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(deleted.len() as u64)
        })
        .await
    }

    /// Which of `keys` have a row waiting for delivery.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the query fails.
    pub async fn pending_keys(&self, keys: &[String]) -> Result<HashSet<String>> {
        let mut conn = self.connection("pending_keys").await?;
        let found: Vec<String> = conn
            .run(|c| {
                sqlx::query_scalar(&self.sql.pending_keys)
                    .bind(keys)
                    .fetch_all(c)
            })
            .await?;
        Ok(found.into_iter().collect())
    }

    /// Makes keys that back off after a *transient* failure (broker unavailable) due now;
    /// keys backing off after other failures keep their delay. Used once the broker answers.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the update fails.
    pub async fn pull_forward_transient(&self) -> Result<u64> {
        let mut conn = self.connection("pull_forward").await?;
        let done = conn
            .run(|c| sqlx::query(&self.sql.pull_forward).execute(c))
            .await?;
        Ok(done.rows_affected())
    }

    /// Pending count and age of the oldest pending row.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the query fails.
    pub async fn backlog(&self) -> Result<Backlog> {
        let mut conn = self.connection("backlog").await?;
        let row = conn
            .run(|c| sqlx::query(&self.sql.backlog).fetch_one(c))
            .await?;
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
        let mut conn = self.connection("cleanup").await?;
        let done: i64 = conn
            .run(|c| {
                sqlx::query_scalar(&self.sql.cleanup)
                    .bind(retention.as_secs_f64())
                    .bind(limit)
                    .fetch_one(c)
            })
            .await?;
        Ok(u64::try_from(done).unwrap_or(0))
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

    /// Puts parked rows back in line (all of them when `ids` is `None`); returns how many.
    ///
    /// A requeued row keeps its id, so it goes out before the rows of its key that are
    /// still pending; rows of its key that were delivered while it was parked stay
    /// delivered, so it reaches Kafka after them. It never gets a second owner: its key's
    /// current owner (if any) keeps the key and reads on after the rows it has read, so the
    /// row follows those, and is sent by whoever holds the key next.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the update fails.
    pub async fn requeue(&self, ids: Option<&[i64]>) -> Result<u64> {
        let t = &self.table;
        let k = t.keys();
        let ns = t.lock_namespace();
        let err = |e| Error::storage("requeue", e);
        let mut tx = self.pool.begin().await.map_err(err)?;
        // The rows are fixed (and locked) first: a row parked after the key locks below were
        // taken would otherwise be requeued without its key's lock, and a relay could delete
        // its key row meanwhile (a pending row no relay ever claims).
        let dead: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT id FROM {t} WHERE status = 'dead' AND ($1::bigint[] IS NULL OR id = ANY($1)) \
             FOR UPDATE"
        ))
        .bind(ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?;
        // Shared key locks (in key order, so two requeues cannot deadlock) keep a relay from
        // deleting a key row between the update and the insert below.
        sqlx::query(&format!(
            "SELECT pg_advisory_xact_lock_shared(hashtextextended('{ns}' || event_key, 0)) \
             FROM (SELECT DISTINCT event_key COLLATE \"C\" AS event_key FROM {t} \
                   WHERE id = ANY($1) ORDER BY 1) d"
        ))
        .bind(&dead)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        let done = sqlx::query(&format!(
            "WITH requeued AS ( \
                 UPDATE {t} SET status = 'pending', failures = 0 \
                 WHERE status = 'dead' AND id = ANY($1) \
                 RETURNING event_key), \
             keyed AS (INSERT INTO {k} (event_key) SELECT DISTINCT event_key FROM requeued \
                       ON CONFLICT (event_key) DO NOTHING) \
             SELECT count(*) FROM requeued"
        ))
        .bind(&dead)
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?
        .get::<i64, _>(0);
        tx.commit().await.map_err(err)?;
        Ok(u64::try_from(done).unwrap_or(0))
    }
}

/// A key its owner is done with, for [`OutboxStore::settle`].
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRelease {
    /// The key.
    pub key: String,
    /// Not claimable again before this delay (after a failed row).
    pub backoff: Option<Duration>,
    /// The failure said the broker was unavailable.
    pub transient: bool,
}

impl KeyRelease {
    /// Handed back, claimable at once.
    pub fn done(key: String) -> Self {
        Self {
            key,
            backoff: None,
            transient: false,
        }
    }
}

/// `CREATE OR REPLACE FUNCTION` of [`OutboxTable::stage_function`]: what
/// [`OutboxStore::stage`] does (the key's exclusive lock, the key row, the event row, its
/// payload), callable inside any transaction from any language. It returns the row id, or
/// NULL when the event id was staged already. Headers must be a JSON object of strings;
/// `event_id` and `event_type` headers are set from the arguments, as the Rust envelope does.
fn stage_function(t: &OutboxTable) -> String {
    let f = t.stage_function();
    let k = t.keys();
    let p = t.payloads();
    let ns = t.lock_namespace();
    format!(
        "CREATE OR REPLACE FUNCTION {f}( \
           topic text, event_key text, payload bytea, headers jsonb DEFAULT '{{}}', \
           event_type text DEFAULT NULL, event_id uuid DEFAULT NULL, \
           aggregate_type text DEFAULT NULL, aggregate_id text DEFAULT NULL, \
           correlation_id uuid DEFAULT NULL) \
         RETURNS bigint LANGUAGE plpgsql AS $fn$ \
         #variable_conflict use_variable
         DECLARE {declare} \
           staged_id bigint; \
         BEGIN {checks} \
           PERFORM pg_advisory_xact_lock(hashtextextended('{ns}' || event_key, 0)); \
           INSERT INTO {k} AS k (event_key) VALUES (event_key) \
             ON CONFLICT ON CONSTRAINT \"{table}_keys_pkey\" DO NOTHING; \
           INSERT INTO {p} AS p (id, event_id, payload, headers) \
           VALUES ({next_id}, eid, payload, {headers}) \
           ON CONFLICT ON CONSTRAINT \"{table}_payloads_event_id_key\" DO NOTHING \
           RETURNING p.id INTO staged_id; \
           IF staged_id IS NOT NULL THEN \
             INSERT INTO {t} AS e (id, event_id, aggregate_type, aggregate_id, event_type, \
                                  topic, event_key, correlation_id) OVERRIDING SYSTEM VALUE \
             VALUES (staged_id, eid, coalesce(aggregate_type, ''), \
                     coalesce(aggregate_id, event_key), kind, topic, event_key, correlation_id); \
           END IF; \
           RETURN staged_id; \
         END $fn$",
        table = t.table(),
        declare = sql_api::DECLARE,
        checks = sql_api::checks(&f),
        headers = sql_api::HEADERS,
        next_id = t.next_id(),
    )
}

/// Reads a claim's or fetch's rows as they arrive and groups them by key, in id order.
/// Streamed, not collected first: a read of thousands of rows held each one twice (the
/// wire row and the decoded event) until the last had arrived.
async fn group_by_key(
    mut rows: impl futures::Stream<Item = sqlx::Result<sqlx::postgres::PgRow>> + Unpin,
) -> sqlx::Result<Vec<ClaimedKey>> {
    use futures::TryStreamExt;
    let mut keys: Vec<ClaimedKey> = Vec::new();
    // foldhash, not SipHash: a key is hashed here once per row of every claim.
    let mut index: HashMap<String, usize, foldhash::fast::RandomState> = HashMap::default();
    while let Some(r) = rows.try_next().await? {
        // Columns by position (`claimed_key`, then `ROW_COLUMNS`): by name, each costs a
        // hashed lookup of the name, ten a row.
        let key: &str = r.try_get(0)?;
        // A key's rows arrive one after the other (one lateral read per key).
        let slot = match keys.last() {
            Some(last) if last.key == key => keys.len() - 1,
            _ => *index.entry(key.to_owned()).or_insert_with(|| {
                keys.push(ClaimedKey {
                    key: key.to_owned(),
                    rows: Vec::new(),
                });
                keys.len() - 1
            }),
        };
        let Some(id) = r.try_get::<Option<i64>, _>(1)? else {
            continue; // a key with no pending row left
        };
        let headers: String = r.try_get(6)?;
        keys[slot].rows.push(ClaimedEvent {
            id,
            event_id: r.try_get(2)?,
            topic: r.try_get(3)?,
            event_key: r.try_get(4)?,
            payload: r.try_get(5)?,
            headers: StoredHeaders::from_json(headers),
            attempts: r.try_get(7)?,
            failures: r.try_get(8)?,
            created_at: r.try_get(9)?,
        });
    }
    for k in &mut keys {
        k.rows.sort_by_key(|e| e.id);
    }
    Ok(keys)
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
