//! Errors of the pipeline as a whole (starting services, driving a batch). Event handlers
//! report [`outpost::Error`] instead, retriable or permanent, because the consumer decides
//! from it whether to try the event again or dead-letter it.

use std::path::PathBuf;
use std::time::Duration;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong outside an event handler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An Outpost component failed or was misconfigured.
    #[error(transparent)]
    Outpost(#[from] outpost::Error),
    /// A service's own SQL failed.
    #[error("{service}: database operation {operation} failed")]
    Database {
        /// The service.
        service: &'static str,
        /// What was being done.
        operation: &'static str,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
    /// A Kafka client call made by the pipeline itself (not by Outpost) failed.
    #[error("kafka {operation} failed")]
    Kafka {
        /// What was being done.
        operation: String,
        /// The client error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The essay corpus could not be read.
    #[error("cannot read the essay corpus at {}", path.display())]
    Corpus {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Something the run waits for did not happen in time.
    #[error("{what} did not happen within {waited:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
    },
}

impl Error {
    pub(crate) fn db(
        service: &'static str,
        operation: &'static str,
    ) -> impl Fn(sqlx::Error) -> Self {
        move |source| Self::Database {
            service,
            operation,
            source,
        }
    }
}

/// Classifies a database error met inside an event handler as Outpost's consumer does
/// ([`outpost::error::database_is_retriable`]): retried in place unless the data or the
/// statement is at fault (the deterministic SQLSTATEs `database_is_retriable` lists: data,
/// integrity, syntax, raised exceptions and the like), because a dead-lettered event
/// lets the next event of its key be applied without it.
pub(crate) fn handler_db(err: sqlx::Error) -> outpost::Error {
    outpost::Error::database(err)
}
