//! Conditional DDL for the migrations of the outbox and the inbox.
//!
//! `ALTER TABLE ... IF [NOT] EXISTS` and `CREATE INDEX IF NOT EXISTS` lock the table before
//! they find there is nothing to do (an index a SHARE lock, an ALTER an ACCESS EXCLUSIVE
//! one), so every start of every replica waited behind any open transaction that had written
//! the table, and held all writers back meanwhile. The conditions here read the catalog
//! without locking the table. (`CREATE TABLE IF NOT EXISTS` and `CREATE SCHEMA IF NOT
//! EXISTS` take no lock on what exists, and need none of this.)

use crate::outbox::table::OutboxTable;

/// `ddl` only when `condition` (SQL) holds.
pub(crate) fn only_if(condition: &str, ddl: &str) -> String {
    format!("DO $$ BEGIN IF {condition} THEN {ddl}; END IF; END $$")
}

/// SQL: `t` has no column `column`.
pub(crate) fn no_column(t: &OutboxTable, column: &str) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{t}'::regclass \
         AND attname = '{column}' AND NOT attisdropped)"
    )
}

/// SQL: no relation `name` in `schema`.
pub(crate) fn no_relation(schema: &str, name: &str) -> String {
    format!("to_regclass('\"{schema}\".\"{name}\"') IS NULL")
}
