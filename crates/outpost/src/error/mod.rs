//! Structured errors: every error names its code and says whether retrying can help.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

mod class;
mod redaction;

pub use class::{classify, classify_code, ErrorClass};
pub use redaction::redact_url;
pub(crate) use redaction::{redact_properties, shown_property};

/// The first `max` bytes of `text` (cut at a character boundary): error texts stored or sent
/// along (a row's last error, a dead letter's reason) stay bounded, however long the error.
pub(crate) fn bounded(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Stable, machine-readable error codes (serialized in SCREAMING_SNAKE_CASE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// Reading or writing the outbox table failed.
    OutboxStorage,
    /// Producing to Kafka failed.
    KafkaPublish,
    /// A setting is missing or malformed.
    Configuration,
    /// An event could not be serialized.
    Serialization,
    /// A wake-up hint (Redis or NOTIFY) could not be sent or received.
    WakeUp,
    /// A consumer's event handler failed.
    Handler,
    /// A consumed message is not a valid event envelope.
    Decode,
    /// Consuming from Kafka failed.
    KafkaConsume,
    /// Reading or writing the consumer inbox table failed.
    InboxStorage,
    /// The Redis idempotency check failed, or another consumer holds the event.
    Idempotency,
    /// The WAL relay's replication stream failed.
    WalStream,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::OutboxStorage => "OUTBOX_STORAGE",
            Self::KafkaPublish => "KAFKA_PUBLISH",
            Self::Configuration => "CONFIGURATION",
            Self::Serialization => "SERIALIZATION",
            Self::WakeUp => "WAKE_UP",
            Self::Handler => "HANDLER",
            Self::Decode => "DECODE",
            Self::KafkaConsume => "KAFKA_CONSUME",
            Self::InboxStorage => "INBOX_STORAGE",
            Self::Idempotency => "IDEMPOTENCY",
            Self::WalStream => "WAL_STREAM",
        };
        f.write_str(s)
    }
}

/// Context attached to storage errors so an operator can find the event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EventContext {
    /// Aggregate type of the event, when known.
    pub aggregate_type: Option<String>,
    /// Aggregate id of the event, when known.
    pub aggregate_id: Option<String>,
    /// Event type, when known.
    pub event_type: Option<String>,
    /// Destination topic, when known.
    pub topic: Option<String>,
    /// Correlation id of the event, when known.
    pub correlation_id: Option<Uuid>,
}

/// The crate's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The outbox table could not be read or written.
    #[error("outbox storage failed during {operation}")]
    OutboxStorage {
        /// What was being done (`stage`, `claim`, `settle`, ...).
        operation: &'static str,
        /// The event concerned, when there is one.
        context: Box<EventContext>,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
    /// Kafka did not acknowledge a message.
    #[error("kafka publish to topic {topic} failed ({class})")]
    KafkaPublish {
        /// Destination topic.
        topic: String,
        /// Whether the failure is transient, retriable or permanent.
        class: ErrorClass,
        /// The client error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// A setting is missing or malformed.
    #[error("invalid setting {setting}: expected {expected}, got {got:?}")]
    Configuration {
        /// The setting's name (an environment variable or field name).
        setting: String,
        /// What form the value must take.
        expected: String,
        /// The value that was given.
        got: String,
    },
    /// An event could not be serialized.
    #[error("could not serialize the event envelope")]
    Serialization(#[source] serde_json::Error),
    /// A wake-up hint could not be sent.
    #[error("wake-up through {via} failed")]
    WakeUp {
        /// `redis` or `notify`.
        via: &'static str,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A consumer's event handler failed; build it with [`Error::retriable`] or
    /// [`Error::permanent`].
    #[error("event handler failed")]
    Handler {
        /// Whether handling the same event again can succeed (otherwise it is dead-lettered).
        retriable: bool,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A consumed message is not a valid event envelope; it is dead-lettered.
    #[error("undecodable message: {reason}")]
    Decode {
        /// What is wrong with it.
        reason: String,
    },
    /// The Kafka consumer failed.
    #[error("kafka consume failed during {operation}")]
    KafkaConsume {
        /// What was being done (`recv`, `seek`, ...).
        operation: &'static str,
        /// The client error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The consumer inbox table could not be read or written.
    #[error("inbox storage failed during {operation}")]
    InboxStorage {
        /// What was being done (`claim`, `commit`, `cleanup`, ...).
        operation: &'static str,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
    /// The Redis idempotency check could not be made (Redis down, fail-closed), or another
    /// consumer is processing the event right now; either way, try again later.
    #[error("idempotency check failed during {operation}")]
    Idempotency {
        /// What was being done (`claim`, ...).
        operation: &'static str,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The WAL relay's replication connection failed or was refused (slot missing or
    /// read by another process, server restarting, role without REPLICATION); the relay
    /// reconnects after its backoff, `outpost wal doctor` says what is wrong.
    #[error("replication stream of slot {slot} failed")]
    WalStream {
        /// The slot being read.
        slot: String,
        /// The replication client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Builds a configuration error.
    pub fn config(
        setting: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Self::Configuration {
            setting: setting.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }

    /// A handler failure that may succeed when the event is handled again (a database or
    /// downstream service briefly unavailable); the consumer retries it with backoff.
    pub fn retriable(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Handler {
            retriable: true,
            source: source.into(),
        }
    }

    /// A handler failure that will repeat however often the event is handled (invalid
    /// data, a violated business rule); the consumer dead-letters the event.
    pub fn permanent(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Handler {
            retriable: false,
            source: source.into(),
        }
    }

    /// A handler's database failure, classified by [`database_is_retriable`]: retried in
    /// place unless the data or the statement is at fault. Use it as
    /// `.map_err(Error::database)` on the handler's queries.
    pub fn database(source: sqlx::Error) -> Self {
        Self::Handler {
            retriable: database_is_retriable(&source),
            source: Box::new(source),
        }
    }

    pub(crate) fn storage(operation: &'static str, source: sqlx::Error) -> Self {
        Self::OutboxStorage {
            operation,
            context: Box::default(),
            source,
        }
    }

    pub(crate) fn storage_with(
        operation: &'static str,
        context: EventContext,
        source: sqlx::Error,
    ) -> Self {
        Self::OutboxStorage {
            operation,
            context: Box::new(context),
            source,
        }
    }

    /// The stable error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::OutboxStorage { .. } => ErrorCode::OutboxStorage,
            Self::KafkaPublish { .. } => ErrorCode::KafkaPublish,
            Self::Configuration { .. } => ErrorCode::Configuration,
            Self::Serialization(_) => ErrorCode::Serialization,
            Self::WakeUp { .. } => ErrorCode::WakeUp,
            Self::Handler { .. } => ErrorCode::Handler,
            Self::Decode { .. } => ErrorCode::Decode,
            Self::KafkaConsume { .. } => ErrorCode::KafkaConsume,
            Self::InboxStorage { .. } => ErrorCode::InboxStorage,
            Self::Idempotency { .. } => ErrorCode::Idempotency,
            Self::WalStream { .. } => ErrorCode::WalStream,
        }
    }

    /// Whether doing the same thing again later can succeed.
    ///
    /// Configuration and serialization errors never heal by themselves; a permanent Kafka
    /// error (message too large, topic authorization) will fail the same way again; nor will
    /// an undecodable message.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::OutboxStorage { source, .. } => storage_is_retriable(source),
            Self::InboxStorage { source, .. } => database_is_retriable(source),
            Self::KafkaPublish { class, .. } => *class != ErrorClass::Permanent,
            Self::Configuration { .. } | Self::Serialization(_) | Self::Decode { .. } => false,
            Self::WakeUp { .. } | Self::Idempotency { .. } | Self::WalStream { .. } => true,
            Self::Handler { retriable, .. } => *retriable,
            Self::KafkaConsume { source, .. } => classify(source) != ErrorClass::Permanent,
        }
    }

    /// A structured description, for logs and API responses.
    pub fn detail(
        &self,
        service: &str,
        operation: &str,
        correlation_id: Option<Uuid>,
    ) -> ErrorDetail {
        let mut details = BTreeMap::new();
        details.insert(
            "retriable".to_owned(),
            serde_json::Value::Bool(self.is_retriable()),
        );
        let mut correlation = correlation_id;
        match self {
            Self::OutboxStorage {
                operation, context, ..
            } => {
                details.insert("outbox_operation".into(), (*operation).into());
                let fields = [
                    ("aggregate_type", &context.aggregate_type),
                    ("aggregate_id", &context.aggregate_id),
                    ("event_type", &context.event_type),
                    ("topic", &context.topic),
                ];
                for (name, value) in fields {
                    if let Some(v) = value {
                        details.insert(name.to_owned(), v.clone().into());
                    }
                }
                correlation = correlation.or(context.correlation_id);
            }
            Self::KafkaPublish { topic, class, .. } => {
                details.insert("topic".into(), topic.clone().into());
                details.insert("error_class".into(), class.to_string().into());
            }
            Self::Configuration {
                setting, expected, ..
            } => {
                details.insert("setting".into(), setting.clone().into());
                details.insert("expected".into(), expected.clone().into());
            }
            Self::KafkaConsume { operation, .. } => {
                details.insert("kafka_operation".into(), (*operation).into());
            }
            Self::InboxStorage { operation, .. } => {
                details.insert("inbox_operation".into(), (*operation).into());
            }
            Self::Idempotency { operation, .. } => {
                details.insert("idempotency_operation".into(), (*operation).into());
            }
            Self::WalStream { slot, .. } => {
                details.insert("slot".into(), slot.clone().into());
            }
            Self::Serialization(_)
            | Self::WakeUp { .. }
            | Self::Handler { .. }
            | Self::Decode { .. } => {}
        }
        if let Some(cause) = std::error::Error::source(self) {
            details.insert("cause".into(), cause.to_string().into());
        }
        ErrorDetail {
            error_code: self.code(),
            message: self.to_string(),
            correlation_id: correlation.unwrap_or_else(Uuid::new_v4),
            timestamp: Utc::now(),
            service: service.to_owned(),
            operation: operation.to_owned(),
            details,
        }
    }
}

/// Connection loss, pool exhaustion, serialization failures and deadlocks heal on retry;
/// constraint violations and bad SQL do not.
fn storage_is_retriable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            Some("40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03" | "53300")
        ),
        _ => false,
    }
}

/// SQLSTATE classes that fail the same way however often the statement is retried, as
/// long as the data it reads stays the same: the data or the statement is at fault.
const PERMANENT_SQLSTATE_CLASSES: [&str; 10] = [
    "0A", // feature not supported
    "21", // cardinality violation: a subquery or ON CONFLICT meets more than one row
    "22", // data exception: division by zero, a value out of range or malformed
    "23", // integrity constraint violation
    "27", // triggered data change violation: a trigger changes a row its statement changes
    "2F", // SQL routine exception: a function ends without RETURN, writes when read-only
    "38", // external routine exception: a function does what its declaration forbids
    "39", // external routine invocation exception: a function breaks its calling protocol
    "42", // syntax error or access rule violation
    "44", // WITH CHECK OPTION violation: a row a view's condition rejects
];

/// PL/pgSQL's own errors that a retry reproduces: `RAISE EXCEPTION` without an error code
/// (P0001: the code raising it rejects the data, as a constraint would), `SELECT INTO
/// STRICT` finding no row (P0002) or more than one (P0003), a failed `ASSERT` (P0004).
/// Not the whole class: P0000 says nothing about the cause.
const PERMANENT_SQLSTATES: [&str; 4] = ["P0001", "P0002", "P0003", "P0004"];

/// Whether a consumer retries a database error in place rather than dead-lettering it.
///
/// Retriable by default: a dead-lettered event is skipped, so the next event of its key
/// is applied without it, while a retried one only holds its partition until the database
/// is back (statement timeouts 57014, read-only transactions during a failover 25006,
/// connection exceptions 08xxx, resource shortages 53xxx, protocol and I/O errors, ...).
/// Permanent are only the SQLSTATE classes 0A, 21, 22, 23, 27, 2F, 38, 39, 42 and 44,
/// PL/pgSQL's P0001 to P0004 (a plain `RAISE EXCEPTION` included: give one whose condition
/// a retry may find changed a retriable `ERRCODE`, such as 40001), and client-side errors
/// that a retry reproduces (a missing row, a column or type the query does not match, a value
/// that does not encode or decode).
pub fn database_is_retriable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => !db.code().is_some_and(|code| {
            PERMANENT_SQLSTATES.contains(&code.as_ref())
                || PERMANENT_SQLSTATE_CLASSES.contains(&code.get(..2).unwrap_or(""))
        }),
        sqlx::Error::Configuration(_)
        | sqlx::Error::InvalidArgument(_)
        | sqlx::Error::RowNotFound
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Encode(_)
        | sqlx::Error::Decode(_)
        | sqlx::Error::InvalidSavePointStatement => false,
        _ => true,
    }
}

/// HuleEdu-compatible structured error description.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    /// Machine-readable code.
    pub error_code: ErrorCode,
    /// Human-readable message.
    pub message: String,
    /// Correlation id of the request or event concerned.
    pub correlation_id: Uuid,
    /// When the error was described.
    pub timestamp: DateTime<Utc>,
    /// The service that hit the error.
    pub service: String,
    /// The operation that failed.
    pub operation: String,
    /// Extra fields: `retriable`, `cause`, and per-code context.
    pub details: BTreeMap<String, serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_error_names_setting_and_form() {
        let err = Error::config("OUTPOST_BROKERS", "host:port[,host:port...]", "nope");
        assert_eq!(
            err.to_string(),
            "invalid setting OUTPOST_BROKERS: expected host:port[,host:port...], got \"nope\""
        );
        assert!(!err.is_retriable());
        assert_eq!(err.code(), ErrorCode::Configuration);
    }

    #[test]
    fn storage_error_has_its_own_code_and_context() {
        let ctx = EventContext {
            aggregate_type: Some("batch".into()),
            aggregate_id: Some("b1".into()),
            event_type: Some("x.v1".into()),
            topic: Some("t".into()),
            correlation_id: Some(Uuid::nil()),
        };
        let err = Error::storage_with("stage", ctx, sqlx::Error::PoolTimedOut);
        assert_eq!(err.code(), ErrorCode::OutboxStorage);
        assert!(err.is_retriable());
        let d = err.detail("els", "publish", None);
        assert_eq!(d.correlation_id, Uuid::nil());
        assert_eq!(d.details["aggregate_id"], "b1");
        assert_eq!(d.details["outbox_operation"], "stage");
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["error_code"], "OUTBOX_STORAGE");
    }

    #[test]
    fn consumer_errors_say_whether_to_retry() {
        let err = Error::retriable("database unavailable");
        assert!(err.is_retriable());
        assert_eq!(err.code(), ErrorCode::Handler);
        assert_eq!(
            err.detail("els", "handle", None).details["cause"],
            "database unavailable"
        );
        assert!(!Error::permanent("unknown essay").is_retriable());
        let undecodable = Error::Decode {
            reason: "not json".into(),
        };
        assert!(!undecodable.is_retriable());
        assert_eq!(undecodable.to_string(), "undecodable message: not json");
        let inbox = Error::InboxStorage {
            operation: "claim",
            source: sqlx::Error::PoolTimedOut,
        };
        assert!(inbox.is_retriable());
        assert_eq!(ErrorCode::InboxStorage.to_string(), "INBOX_STORAGE");
    }

    /// A server error carrying only a SQLSTATE, as PostgreSQL reports it.
    #[derive(Debug)]
    struct Sqlstate(&'static str);

    impl fmt::Display for Sqlstate {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Sqlstate {}

    impl sqlx::error::DatabaseError for Sqlstate {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn server(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Sqlstate(code)))
    }

    #[test]
    fn database_errors_are_retriable_unless_data_or_statement_is_at_fault() {
        let retriable = [
            "57014", // statement timeout
            "25006", // read-only transaction (failover)
            "08006", // connection failure
            "08P01", // protocol violation
            "53100", // disk full
            "53200", // out of memory
            "53300", // too many connections
            "40001", // serialization failure
            "40P01", // deadlock
            "55P03", // lock not available
            "57P01", // admin shutdown
            "XX000", // internal error
            "25P02", // in a transaction an earlier failure aborted
            "P0000", // PL/pgSQL error of no stated cause
        ];
        for code in retriable {
            assert!(database_is_retriable(&server(code)), "{code}");
            let err = Error::database(server(code));
            assert!(err.is_retriable(), "{code}");
            assert_eq!(err.code(), ErrorCode::Handler);
        }
        let permanent = [
            "22012", // division by zero
            "22P02", // invalid text representation
            "23505", // unique violation
            "23503", // foreign key violation
            "42P01", // undefined table
            "42601", // syntax error
            "0A000", // feature not supported
            "21000", // subquery returned more than one row
            "27000", // triggered data change violation
            "2F005", // function ended without RETURN
            "38003", // prohibited SQL statement in a function
            "39P01", // trigger protocol violated
            "44000", // WITH CHECK OPTION violation
            "P0001", // RAISE EXCEPTION
            "P0002", // SELECT INTO STRICT found no row
            "P0003", // SELECT INTO STRICT found several
            "P0004", // ASSERT failed
        ];
        for code in permanent {
            assert!(!database_is_retriable(&server(code)), "{code}");
            assert!(!Error::database(server(code)).is_retriable(), "{code}");
            let inbox = Error::InboxStorage {
                operation: "claim",
                source: server(code),
            };
            assert!(!inbox.is_retriable(), "{code}");
        }
        let client_side_retriable = [
            sqlx::Error::Protocol("unexpected message".into()),
            sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into()),
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
        ];
        for err in &client_side_retriable {
            assert!(database_is_retriable(err), "{err}");
        }
        let client_side_permanent = [
            sqlx::Error::RowNotFound,
            sqlx::Error::ColumnNotFound("essays".into()),
            sqlx::Error::Decode("not a uuid".into()),
        ];
        for err in &client_side_permanent {
            assert!(!database_is_retriable(err), "{err}");
        }
        let timed_out = Error::InboxStorage {
            operation: "claim",
            source: server("57014"),
        };
        assert!(timed_out.is_retriable());
        assert_eq!(
            timed_out.detail("els", "consume", None).details["retriable"],
            true
        );
    }
}
