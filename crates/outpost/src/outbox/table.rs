//! The outbox table's name: a validated `schema.table` pair, never raw user text in SQL.

use std::fmt;

use crate::error::{Error, Result};

/// Default table name inside the service's schema.
pub const DEFAULT_TABLE: &str = "event_outbox";

/// Longest table name: 63 bytes less `_payloads_event_id_key`.
const MAX_TABLE: usize = 41;

/// A validated, quoted `"schema"."table"` reference.
///
/// Names are lowercase identifiers (`[a-z_][a-z0-9_]*`, at most 63 bytes, a table at most
/// 41), so they can be interpolated into SQL safely; anything else is rejected at
/// construction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OutboxTable {
    schema: String,
    table: String,
}

impl OutboxTable {
    /// `schema.event_outbox`.
    ///
    /// # Errors
    /// [`Error::Configuration`] when `schema` is not a plain lowercase identifier.
    pub fn new(schema: &str) -> Result<Self> {
        Self::with_table(schema, DEFAULT_TABLE)
    }

    /// A table with an explicit name.
    ///
    /// # Errors
    /// [`Error::Configuration`] when either name is not a plain lowercase identifier.
    pub fn with_table(schema: &str, table: &str) -> Result<Self> {
        validate_identifier("schema", schema)?;
        validate_identifier("table", table)?;
        // The names made from it must fit PostgreSQL's 63 bytes whole: the longest,
        // `{table}_payloads_event_id_key`, is PostgreSQL's own name for a constraint the
        // staging function names, and a longer table would have it shortened differently.
        if table.len() > MAX_TABLE {
            return Err(Error::config(
                "table",
                format!("at most {MAX_TABLE} bytes (names derived from it must fit 63)"),
                table,
            ));
        }
        Ok(Self {
            schema: schema.to_owned(),
            table: table.to_owned(),
        })
    }

    /// The schema name.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The quoted name of the keys table that goes with this outbox (`"schema"."table_keys"`).
    pub fn keys(&self) -> String {
        format!("\"{}\".\"{}_keys\"", self.schema, self.table)
    }

    /// The quoted name of the table holding each row's payload and headers
    /// (`"schema"."table_payloads"`): written once at staging and never updated, so settling a
    /// row rewrites only its narrow state.
    pub fn payloads(&self) -> String {
        format!("\"{}\".\"{}_payloads\"", self.schema, self.table)
    }

    /// An expression drawing the next row id from this table's identity sequence (rows are
    /// inserted with an id drawn beforehand: the payload row, which holds the event id's
    /// uniqueness, goes in first).
    pub(crate) fn next_id(&self) -> String {
        format!("nextval(pg_get_serial_sequence('{self}', 'id'))")
    }

    /// A statement deleting the rows that match `filter` (SQL over this table's columns)
    /// with their payloads; it returns how many rows went.
    pub(crate) fn delete_with_payloads(&self, filter: &str) -> String {
        format!(
            "WITH gone AS (DELETE FROM {self} WHERE {filter} RETURNING id), \
             body AS (DELETE FROM {p} p USING gone WHERE p.id = gone.id) \
             SELECT count(*) FROM gone",
            p = self.payloads()
        )
    }

    /// The quoted name of the SQL function that stages an event into this outbox from any
    /// language: `"schema".stage` for the default table (`outpost.stage(...)` in the default
    /// schema), `"schema"."table_stage"` for another.
    pub fn stage_function(&self) -> String {
        if self.table == DEFAULT_TABLE {
            format!("\"{}\".stage", self.schema)
        } else {
            format!("\"{}\".\"{}_stage\"", self.schema, self.table)
        }
    }

    /// The prefix of this outbox's advisory lock ids (identifiers are validated, so it is
    /// safe inside a SQL string literal).
    pub(crate) fn lock_namespace(&self) -> String {
        format!("outpost:{}.{}:", self.schema, self.table)
    }

    /// An index or constraint name derived from the table's, e.g. `event_outbox_pending`.
    pub(crate) fn derived(&self, suffix: &str) -> String {
        format!("{}_{suffix}", self.table)
    }
}

impl fmt::Display for OutboxTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\".\"{}\"", self.schema, self.table)
    }
}

pub(crate) fn validate_identifier(setting: &str, name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with("pg_");
    if ok {
        Ok(())
    } else {
        Err(Error::config(
            setting,
            "a lowercase SQL identifier ([a-z_][a-z0-9_]*, at most 63 bytes, not starting with pg_)",
            name,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_identifiers() {
        let t = OutboxTable::new("els").unwrap();
        assert_eq!(t.to_string(), "\"els\".\"event_outbox\"");
        assert!(OutboxTable::with_table("_a1", "b_2").is_ok());
        assert!(OutboxTable::with_table("s", &"t".repeat(41)).is_ok());
        let long = OutboxTable::with_table("s", &"t".repeat(42)).unwrap_err();
        assert!(long.to_string().contains("at most 41 bytes"), "{long}");
    }

    #[test]
    fn rejects_anything_else() {
        for bad in [
            "",
            "Els",
            "1abc",
            "a-b",
            "a\"; drop table x; --",
            "pg_catalog",
            &"a".repeat(64),
        ] {
            let err = OutboxTable::new(bad).unwrap_err();
            assert!(
                err.to_string().starts_with("invalid setting schema"),
                "{bad}"
            );
        }
    }
}
