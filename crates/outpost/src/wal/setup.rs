//! `outpost wal init|doctor`: what the server needs for WAL mode, checked one by one with
//! the exact change to make, and the stream's slot, publication and SQL objects created.

use std::fmt;

use sqlx::{PgPool, Row};

use super::WalStream;
use crate::error::{Error, Result};
use crate::outbox::sql_api;

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Ready.
    Ok,
    /// Works, but an operator should look (for example unlimited WAL retention).
    Warn,
    /// WAL mode cannot run until this is fixed.
    Fail,
}

/// One check of [`doctor`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct WalCheck {
    /// What was checked (`wal_level`, `slot`, ...).
    pub name: &'static str,
    /// The outcome.
    pub verdict: Verdict,
    /// What was found.
    pub found: String,
    /// What to change, when something must or should change.
    pub fix: Option<String>,
}

/// Every check, in order.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WalReport {
    /// The stream checked.
    pub stream: String,
    /// The checks.
    pub checks: Vec<WalCheck>,
}

impl WalReport {
    /// No check failed.
    pub fn is_ready(&self) -> bool {
        self.checks.iter().all(|c| c.verdict != Verdict::Fail)
    }

    fn failed(&self, name: &str) -> bool {
        self.checks
            .iter()
            .any(|c| c.name == name && c.verdict == Verdict::Fail)
    }
}

impl fmt::Display for WalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            let mark = match c.verdict {
                Verdict::Ok => "ok  ",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
            };
            writeln!(f, "{mark} {:<22} {}", c.name, c.found)?;
            if let Some(fix) = &c.fix {
                writeln!(f, "     {:<22} fix: {fix}", "")?;
            }
        }
        Ok(())
    }
}

fn check(name: &'static str, verdict: Verdict, found: String, fix: Option<String>) -> WalCheck {
    WalCheck {
        name,
        verdict,
        found,
        fix,
    }
}

/// Checks the server settings, the role and the stream's objects; changes nothing.
///
/// # Errors
/// [`Error::OutboxStorage`] (operation `wal_doctor`) when the queries fail.
pub async fn doctor(pool: &PgPool, stream: &WalStream) -> Result<WalReport> {
    let err = |e| Error::storage("wal_doctor", e);
    let s = sqlx::query(
        "SELECT current_setting('wal_level') AS wal_level, \
                current_setting('max_replication_slots')::int AS max_slots, \
                (SELECT count(*)::int FROM pg_replication_slots) AS slots, \
                current_setting('max_wal_senders')::int AS max_senders, \
                (SELECT count(*)::int FROM pg_stat_replication) AS senders, \
                current_setting('max_slot_wal_keep_size') AS keep_size, \
                current_setting('wal_sender_timeout') AS sender_timeout, \
                current_user::text AS role, \
                (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user) \
                  AS may_replicate, \
                current_database()::text AS db",
    )
    .fetch_one(pool)
    .await
    .map_err(err)?;
    let wal_level: String = s.get("wal_level");
    let (max_slots, slots): (i32, i32) = (s.get("max_slots"), s.get("slots"));
    let (max_senders, senders): (i32, i32) = (s.get("max_senders"), s.get("senders"));
    let keep_size: String = s.get("keep_size");
    let role: String = s.get("role");
    let db: String = s.get("db");
    let slot_name = stream.slot();
    let slot = sqlx::query(
        "SELECT plugin, database::text AS db, wal_status, active_pid, \
                pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&slot_name)
    .fetch_optional(pool)
    .await
    .map_err(err)?;

    let mut checks = Vec::new();
    checks.push(if wal_level == "logical" {
        check("wal_level", Verdict::Ok, wal_level, None)
    } else {
        check(
            "wal_level",
            Verdict::Fail,
            wal_level,
            Some("ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL".into()),
        )
    });
    let free = max_slots - slots;
    checks.push(if slot.is_some() || free > 0 {
        check(
            "max_replication_slots",
            Verdict::Ok,
            format!("{slots} of {max_slots} in use"),
            None,
        )
    } else {
        check(
            "max_replication_slots",
            Verdict::Fail,
            format!("{slots} of {max_slots} in use, none free for {slot_name}"),
            Some(format!(
                "ALTER SYSTEM SET max_replication_slots = {}; then restart PostgreSQL",
                max_slots + 1
            )),
        )
    });
    checks.push(if max_senders > senders {
        check(
            "max_wal_senders",
            Verdict::Ok,
            format!("{senders} of {max_senders} in use"),
            None,
        )
    } else {
        check(
            "max_wal_senders",
            Verdict::Fail,
            format!("{senders} of {max_senders} in use"),
            Some(format!(
                "ALTER SYSTEM SET max_wal_senders = {}; then restart PostgreSQL",
                max_senders + 1
            )),
        )
    });
    checks.push(if s.get::<Option<bool>, _>("may_replicate") == Some(true) {
        check("role", Verdict::Ok, format!("{role} may replicate"), None)
    } else {
        check(
            "role",
            Verdict::Fail,
            format!("{role} lacks the REPLICATION attribute"),
            Some(format!("ALTER ROLE \"{role}\" REPLICATION;")),
        )
    });
    checks.push(if keep_size == "-1" {
        check(
            "max_slot_wal_keep_size",
            Verdict::Warn,
            "unlimited: a stopped relay makes the server keep WAL until its disk fills".into(),
            Some(
                "ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf(); \
                 (a slot past the limit is lost: see the README)"
                    .into(),
            ),
        )
    } else {
        check("max_slot_wal_keep_size", Verdict::Ok, keep_size, None)
    });
    checks.push(match &slot {
        None => check(
            "slot",
            Verdict::Fail,
            format!("{slot_name} does not exist"),
            Some("outpost wal init".into()),
        ),
        Some(r) => {
            // NULL for a physical slot.
            let plugin: Option<String> = r.get("plugin");
            let slot_db: Option<String> = r.get("db");
            let status: Option<String> = r.get("wal_status");
            let retained: Option<i64> = r.get("retained");
            let active: Option<i32> = r.get("active_pid");
            let found = format!(
                "{slot_name}: {}, database {}, wal_status {}, retaining {} bytes, {}",
                plugin
                    .as_deref()
                    .map_or("a physical slot".to_owned(), |p| format!("plugin {p}")),
                slot_db.as_deref().unwrap_or("?"),
                status.as_deref().unwrap_or("?"),
                retained.unwrap_or(0),
                active.map_or("idle".to_owned(), |p| format!("read by pid {p}")),
            );
            if plugin.as_deref() != Some("pgoutput") || slot_db.as_deref() != Some(db.as_str()) {
                check(
                    "slot",
                    Verdict::Fail,
                    found,
                    Some(format!(
                        "the slot belongs to something else: pick another schema, or \
                         SELECT pg_drop_replication_slot('{slot_name}'); then outpost wal init"
                    )),
                )
            } else if status.as_deref() == Some("lost") {
                check(
                    "slot",
                    Verdict::Fail,
                    found,
                    Some(format!(
                        "the server removed WAL the slot needed, so events staged since the \
                         relay last acknowledged are gone from the stream: \
                         SELECT pg_drop_replication_slot('{slot_name}'); then outpost wal init"
                    )),
                )
            } else {
                check("slot", Verdict::Ok, found, None)
            }
        }
    });
    let objects = sqlx::query(
        "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1) AS publication, \
                to_regprocedure($2) IS NOT NULL AS function, \
                to_regclass($3) IS NOT NULL AS dead",
    )
    .bind(stream.publication())
    .bind(format!(
        "{}(text,text,bytea,jsonb,text,uuid)",
        stream.emit_function()
    ))
    .bind(stream.dead_letters())
    .fetch_one(pool)
    .await
    .map_err(err)?;
    for (name, column, what) in [
        ("publication", "publication", stream.publication()),
        ("emit function", "function", stream.emit_function()),
        ("dead letters", "dead", stream.dead_letters()),
    ] {
        checks.push(if objects.get::<bool, _>(column) {
            check(name, Verdict::Ok, what, None)
        } else {
            check(
                name,
                Verdict::Fail,
                format!("{what} missing"),
                Some("outpost wal init".into()),
            )
        });
    }
    Ok(WalReport {
        stream: stream.name().to_owned(),
        checks,
    })
}

/// Creates what is missing: the schema, dead-letter table and SQL function, the (empty)
/// publication, then the slot; returns [`doctor`]'s report afterwards. Creates nothing
/// while the server cannot replicate (the report says what to change). Idempotent.
///
/// Creating the slot waits for transactions open at that moment to end.
///
/// # Errors
/// [`Error::OutboxStorage`] (operation `wal_init`) when a statement fails.
pub async fn init(pool: &PgPool, stream: &WalStream) -> Result<WalReport> {
    let before = doctor(pool, stream).await?;
    if ["wal_level", "role", "max_replication_slots"]
        .iter()
        .any(|n| before.failed(n))
    {
        return Ok(before);
    }
    let err = |e| Error::storage("wal_init", e);
    let mut tx = pool.begin().await.map_err(err)?;
    // Concurrent inits (replicas starting together) take turns.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("{}:init", stream.leader_lock()))
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    let statements = [
        format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", stream.name()),
        format!(
            "CREATE TABLE IF NOT EXISTS {} ( \
               id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
               event_id uuid, \
               topic text, \
               event_key text, \
               headers jsonb, \
               payload bytea NOT NULL, \
               commit_lsn pg_lsn NOT NULL, \
               class text NOT NULL, \
               reason text NOT NULL, \
               dead_at timestamptz NOT NULL DEFAULT now())",
            stream.dead_letters()
        ),
        emit_function(stream),
    ];
    for sql in &statements {
        sqlx::query(sql).execute(&mut *tx).await.map_err(err)?;
    }
    let has_publication: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(stream.publication())
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
    if !has_publication {
        // Logical messages need no table in the publication.
        sqlx::query(&format!("CREATE PUBLICATION \"{}\"", stream.publication()))
            .execute(&mut *tx)
            .await
            .map_err(err)?;
    }
    tx.commit().await.map_err(err)?;
    // A slot cannot be created in a transaction that wrote anything.
    let has_slot: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
    )
    .bind(stream.slot())
    .fetch_one(pool)
    .await
    .map_err(err)?;
    if !has_slot {
        let created = sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(stream.slot())
            .execute(pool)
            .await;
        match created {
            Ok(_) => {}
            // Another replica created it meanwhile.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => {}
            Err(e) => return Err(err(e)),
        }
    }
    doctor(pool, stream).await
}

/// Drops the stream's slot and publication (the server stops keeping WAL for it); the
/// dead letters and the SQL function stay. Events emitted and not yet delivered are lost:
/// run it only to retire a stream.
///
/// A relay that just stopped leaves its walsender behind for a moment: while the slot is
/// still read, this retries for up to 10 s.
///
/// # Errors
/// [`Error::OutboxStorage`] (operation `wal_drop`), for example while a relay still reads
/// the slot after that (SQLSTATE 55006: stop the relays first).
pub async fn remove(pool: &PgPool, stream: &WalStream) -> Result<()> {
    let err = |e| Error::storage("wal_drop", e);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let dropped = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1",
        )
        .bind(stream.slot())
        .execute(pool)
        .await;
        match dropped {
            Ok(_) => break,
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("55006") && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(err(e)),
        }
    }
    sqlx::query(&format!(
        "DROP PUBLICATION IF EXISTS \"{}\"",
        stream.publication()
    ))
    .execute(pool)
    .await
    .map_err(err)?;
    Ok(())
}

/// `CREATE OR REPLACE FUNCTION` of [`WalStream::emit_function`]: the bytes
/// [`emit`](super::emit) writes, built in SQL, so a service in any language stages an event
/// with one call in its own transaction. Returns the event id.
fn emit_function(stream: &WalStream) -> String {
    let f = stream.emit_function();
    let prefix = stream.prefix();
    format!(
        "CREATE OR REPLACE FUNCTION {f}( \
           topic text, event_key text, payload bytea, headers jsonb DEFAULT '{{}}', \
           event_type text DEFAULT NULL, event_id uuid DEFAULT NULL) \
         RETURNS uuid LANGUAGE plpgsql AS $fn$ \
         #variable_conflict use_variable
         DECLARE {declare} \
           head jsonb; \
         BEGIN {checks} \
           head := jsonb_build_object('id', eid, 'topic', topic, 'key', event_key, \
             'headers', {headers}); \
           PERFORM pg_logical_emit_message(true, '{prefix}', \
             convert_to(head::text, 'UTF8') || '\\x00'::bytea || payload); \
           RETURN eid; \
         END $fn$",
        declare = sql_api::DECLARE,
        checks = sql_api::checks(&f),
        headers = sql_api::HEADERS,
    )
}
