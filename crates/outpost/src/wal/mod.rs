//! WAL mode: events written into PostgreSQL's write-ahead log inside the caller's
//! transaction (`pg_logical_emit_message`), and a relay that reads them back from a logical
//! replication slot and produces them.
//!
//! ```text
//!  service tx: UPDATE ...; emit(event) ──commit──▶ WAL ──pgoutput v1──▶ WalRelay ──▶ Kafka
//!                                                   (only committed transactions,  │
//!                                                    whole, in commit order)       │
//!                      slot's confirmed LSN ◀── ack after every event up to it ◀───┘
//! ```
//!
//! The table mode ([`crate::outbox`] + [`crate::relay`]) stays the default. WAL mode trades
//! SQL visibility of pending events (they live only in the WAL until the relay reads them)
//! for no table to bloat, vacuum or claim from, and per-key commit order by construction.
//!
//! - [`WalStream`]: one stream's names (slot, publication, message prefix, SQL objects).
//! - `message`: the bytes of one event inside a logical message.
//! - [`emit`](mod@emit): stage an event in the caller's transaction.
//! - [`setup`]: `outpost wal init|doctor`: server checks, slot, publication, SQL API.
//! - `progress`: the ordered queue that decides which LSN may be acknowledged.
//! - [`relay`]: the leader-elected reader that produces and acknowledges.
//! - `connection`: the replication connection's settings from the database URL.
//! - [`dead`]: events the broker refused for good, to list and requeue.

pub(crate) mod connection;
pub mod dead;
pub mod emit;
pub(crate) mod message;
pub(crate) mod progress;
pub mod relay;
pub mod setup;

pub use dead::{WalDeadLetter, WalDeadLetters};
pub use emit::emit;
pub use relay::{WalRelay, WalRelayConfig};
pub use setup::{WalCheck, WalReport};

use crate::error::{Error, Result};
use crate::outbox::table::validate_identifier;

/// The names that belong to one WAL stream, all derived from one identifier (usually the
/// service's schema, as in table mode):
///
/// | object | name for `els` |
/// |---|---|
/// | replication slot and publication | `outpost_els` |
/// | logical message prefix | `outpost.v1:els` |
/// | SQL staging function | `"els".emit(...)` |
/// | dead letters | `"els".wal_dead_letters` |
///
/// Every slot with messages on receives every database's logical messages, so the relay
/// keeps only its own prefix: streams of several services can share a database.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WalStream {
    name: String,
}

impl WalStream {
    /// A stream named `name` (a lowercase SQL identifier of at most 55 bytes, so the slot
    /// name fits PostgreSQL's 63).
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the `schema` setting.
    pub fn new(name: &str) -> Result<Self> {
        validate_identifier("schema", name)?;
        if name.len() > 55 {
            return Err(Error::config(
                "schema",
                "at most 55 bytes in WAL mode (the slot is named outpost_<schema>)",
                name,
            ));
        }
        Ok(Self {
            name: name.to_owned(),
        })
    }

    /// The stream's identifier (also the schema of its SQL objects).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The logical replication slot (`outpost_<name>`).
    pub fn slot(&self) -> String {
        format!("outpost_{}", self.name)
    }

    /// The publication named at `START_REPLICATION` (`outpost_<name>`); it holds no
    /// tables: logical messages need none.
    pub fn publication(&self) -> String {
        self.slot()
    }

    /// The prefix of this stream's logical messages (`outpost.v1:<name>`).
    pub fn prefix(&self) -> String {
        format!("outpost.v1:{}", self.name)
    }

    /// The quoted name of the SQL function that emits an event from any language
    /// (`"<name>".emit`).
    pub fn emit_function(&self) -> String {
        format!("\"{}\".emit", self.name)
    }

    /// The quoted name of the dead-letter table (`"<name>".wal_dead_letters`).
    pub fn dead_letters(&self) -> String {
        format!("\"{}\".wal_dead_letters", self.name)
    }

    /// The text whose hash is the advisory lock id the leading relay holds.
    pub(crate) fn leader_lock(&self) -> String {
        format!("outpost:wal:{}", self.name)
    }
}

impl std::fmt::Display for WalStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_one_identifier() {
        let s = WalStream::new("els").unwrap();
        assert_eq!(s.slot(), "outpost_els");
        assert_eq!(s.prefix(), "outpost.v1:els");
        assert_eq!(s.emit_function(), "\"els\".emit");
        assert!(WalStream::new("Els").is_err());
        let long = "a".repeat(56);
        assert!(WalStream::new(&long)
            .unwrap_err()
            .to_string()
            .contains("at most 55 bytes"));
    }
}
