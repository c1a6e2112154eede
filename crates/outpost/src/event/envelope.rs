//! The HuleEdu-compatible event envelope and the serialized form that is staged.
//!
//! An envelope is serialized exactly once, into an [`OutboxEvent`]; those bytes (and the
//! headers computed next to them) are what Kafka receives on every attempt, so `event_id`
//! and `event_timestamp` never change between retries.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::error::{Error, Result};

/// Content type of every payload Outpost produces.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// HuleEdu's `EventEnvelope`: the JSON object every event travels in.
///
/// Field names and shapes match the Python (Pydantic) model, so a HuleEdu consumer can
/// `EventEnvelope.model_validate_json` what Outpost publishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope<T> {
    /// Unique id of this event; stable across every delivery attempt.
    pub event_id: Uuid,
    /// Event type, by convention the topic name.
    pub event_type: String,
    /// When the event happened (RFC 3339, UTC, microsecond precision).
    #[serde(serialize_with = "ser_ts", deserialize_with = "de_ts")]
    pub event_timestamp: DateTime<Utc>,
    /// The service that emitted the event.
    pub source_service: String,
    /// Envelope schema version (default 1).
    #[serde(default = "default_schema_version")]
    pub schema_version: i32,
    /// Correlation id, propagated across the whole chain of events.
    pub correlation_id: Uuid,
    /// Optional URI of the payload schema.
    #[serde(default)]
    pub data_schema_uri: Option<String>,
    /// The payload.
    pub data: T,
    /// Free-form metadata (trace context, optional `partition_key`).
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

fn default_schema_version() -> i32 {
    1
}

fn ser_ts<S: Serializer>(ts: &DateTime<Utc>, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&ts.to_rfc3339_opts(SecondsFormat::Micros, true))
}

fn de_ts<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<DateTime<Utc>, D::Error> {
    let raw = String::deserialize(d)?;
    // Pydantic emits naive timestamps for naive datetimes; HuleEdu always means UTC.
    DateTime::parse_from_rfc3339(&raw)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(&raw, "%Y-%m-%dT%H:%M:%S%.f").map(|n| n.and_utc())
        })
        .map_err(serde::de::Error::custom)
}

/// Truncates to microseconds, the precision Python's datetime keeps.
fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    let micros = now.timestamp_micros();
    DateTime::from_timestamp_micros(micros).unwrap_or(now)
}

impl<T> EventEnvelope<T> {
    /// A new envelope with a fresh `event_id` and `correlation_id`, stamped now.
    pub fn new(event_type: impl Into<String>, source_service: impl Into<String>, data: T) -> Self {
        Self {
            event_id: Uuid::new_v4(),
            event_type: event_type.into(),
            event_timestamp: now_micros(),
            source_service: source_service.into(),
            schema_version: 1,
            correlation_id: Uuid::new_v4(),
            data_schema_uri: None,
            data,
            metadata: None,
        }
    }

    /// Sets the correlation id (propagate the one of the event being handled).
    #[must_use]
    pub fn with_correlation_id(mut self, correlation_id: Uuid) -> Self {
        self.correlation_id = correlation_id;
        self
    }

    /// Sets a deterministic event id (for example a UUIDv5 of business keys).
    #[must_use]
    pub fn with_event_id(mut self, event_id: Uuid) -> Self {
        self.event_id = event_id;
        self
    }

    /// Adds one metadata entry.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: serde_json::Value) -> Self {
        self.metadata
            .get_or_insert_with(Default::default)
            .insert(key.into(), value);
        self
    }
}

/// The aggregate an event belongs to; its id is the default partition key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    /// For example `batch`, `essay`, `file_upload`.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
}

impl Aggregate {
    /// An aggregate reference.
    pub fn new(aggregate_type: impl Into<String>, aggregate_id: impl Into<String>) -> Self {
        Self {
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
        }
    }
}

/// An envelope serialized once, with its routing and headers: what is staged and sent.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEvent {
    /// The envelope's event id.
    pub event_id: Uuid,
    /// The envelope's event type.
    pub event_type: String,
    /// The envelope's correlation id.
    pub correlation_id: Uuid,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Destination topic.
    pub topic: String,
    /// Partition key; events with one key are delivered in the commit order of the
    /// transactions that staged them.
    pub event_key: String,
    /// The serialized envelope, sent byte for byte.
    pub payload: Vec<u8>,
    /// Kafka headers, sent with every attempt.
    pub headers: BTreeMap<String, String>,
}

impl OutboxEvent {
    /// Serializes `envelope` for `topic`, keyed by the aggregate id unless the envelope's
    /// metadata carries a `partition_key` string.
    ///
    /// # Errors
    /// [`Error::Serialization`] if `T` cannot be serialized to JSON.
    pub fn from_envelope<T: Serialize>(
        envelope: &EventEnvelope<T>,
        topic: impl Into<String>,
        aggregate: Aggregate,
    ) -> Result<Self> {
        let payload = serde_json::to_vec(envelope).map_err(Error::Serialization)?;
        let key = envelope
            .metadata
            .as_ref()
            .and_then(|m| m.get("partition_key"))
            .and_then(|v| v.as_str())
            .map_or_else(|| aggregate.aggregate_id.clone(), str::to_owned);
        let mut headers = BTreeMap::from([
            ("event_id".to_owned(), envelope.event_id.to_string()),
            ("event_type".to_owned(), envelope.event_type.clone()),
            ("trace_id".to_owned(), envelope.correlation_id.to_string()),
            ("source_service".to_owned(), envelope.source_service.clone()),
            (
                "schema_version".to_owned(),
                envelope.schema_version.to_string(),
            ),
            (
                "occurred_at".to_owned(),
                envelope
                    .event_timestamp
                    .to_rfc3339_opts(SecondsFormat::Micros, true),
            ),
            ("content_type".to_owned(), CONTENT_TYPE_JSON.to_owned()),
        ]);
        headers.extend(crate::event::trace::from_metadata(
            envelope.metadata.as_ref(),
        ));
        Ok(Self {
            event_id: envelope.event_id,
            event_type: envelope.event_type.clone(),
            correlation_id: envelope.correlation_id,
            aggregate_type: aggregate.aggregate_type,
            aggregate_id: aggregate.aggregate_id,
            topic: topic.into(),
            event_key: key,
            payload,
            headers,
        })
    }

    /// Overrides the partition key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.event_key = key.into();
        self
    }

    /// Adds a header; standard headers computed from the envelope are kept.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.entry(name.into()).or_insert(value.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_shape_matches_huleedu() {
        let env = EventEnvelope::new("huleedu.x.v1", "els", json!({"a": 1}));
        let v: serde_json::Value = serde_json::to_value(&env).unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            [
                "correlation_id",
                "data",
                "data_schema_uri",
                "event_id",
                "event_timestamp",
                "event_type",
                "metadata",
                "schema_version",
                "source_service"
            ]
        );
        assert_eq!(v["schema_version"], 1);
        assert!(v["data_schema_uri"].is_null());
        assert!(v["metadata"].is_null());
        let ts = v["event_timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.len() == "2025-07-28T12:00:00.123456Z".len());
    }

    #[test]
    fn parses_python_output() {
        let raw = r#"{"event_id":"6f1c1f8e-4d7b-4f57-9b7c-1d2e3f4a5b6c","event_type":"t","event_timestamp":"2025-07-28T12:00:00.123456Z","source_service":"s","schema_version":1,"correlation_id":"6f1c1f8e-4d7b-4f57-9b7c-1d2e3f4a5b6d","data_schema_uri":null,"data":{"x":1},"metadata":{"partition_key":"k"}}"#;
        let env: EventEnvelope<serde_json::Value> = serde_json::from_str(raw).unwrap();
        assert_eq!(env.data["x"], 1);
        let ev = OutboxEvent::from_envelope(&env, "t", Aggregate::new("batch", "b")).unwrap();
        assert_eq!(ev.event_key, "k");
        let naive = raw.replace("123456Z", "123456");
        assert!(serde_json::from_str::<EventEnvelope<serde_json::Value>>(&naive).is_ok());
    }

    #[test]
    fn roundtrip_is_lossless_and_headers_are_standard() {
        let env =
            EventEnvelope::new("t.v1", "els", json!({"n": 2})).with_metadata("trace", json!("x"));
        let ev = OutboxEvent::from_envelope(&env, "topic", Aggregate::new("essay", "e1"))
            .unwrap()
            .with_header("event_id", "ignored")
            .with_header("tenant", "a");
        let back: EventEnvelope<serde_json::Value> = serde_json::from_slice(&ev.payload).unwrap();
        assert_eq!(back, env);
        assert_eq!(ev.event_key, "e1");
        assert_eq!(ev.headers["event_id"], env.event_id.to_string());
        assert_eq!(ev.headers["trace_id"], env.correlation_id.to_string());
        assert_eq!(ev.headers["content_type"], "application/json");
        assert_eq!(ev.headers["tenant"], "a");
        assert_eq!(ev.headers.len(), 8);
    }
}
