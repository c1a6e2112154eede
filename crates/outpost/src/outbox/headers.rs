//! A claimed row's headers, kept as the stored JSON text until the row is produced.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

/// The headers staged with a row: a JSON object of strings.
///
/// A row read from the outbox holds them as the stored text, one allocation, and they are
/// parsed when the row is produced. A relay holds up to `max_in_flight` rows at once, and
/// as maps (a tree node and two strings per header) the headers of the bench's events were
/// a quarter of the relay's peak memory: `HEADERS=1 bash scripts/drain-profile.sh 100000
/// 10000` peaked at 54-57 MB against 41 MB without headers.
///
/// A row staged on the eager path keeps the map it was staged with.
#[derive(Clone)]
pub struct StoredHeaders(Repr);

#[derive(Clone)]
enum Repr {
    Json(Box<str>),
    Map(BTreeMap<String, String>),
}

impl StoredHeaders {
    /// Headers as PostgreSQL returned the JSONB column, as text.
    pub fn from_json(text: impl Into<Box<str>>) -> Self {
        Self(Repr::Json(text.into()))
    }

    /// The headers as a map.
    ///
    /// # Errors
    /// A [`HeadersError`] when the stored text is not a JSON object of strings (a row written
    /// by hand, bypassing [`OutboxStore::stage`](crate::OutboxStore::stage) and the SQL stage
    /// function, which both check it). The relay parks such a row as a permanent failure.
    pub fn to_map(&self) -> Result<Cow<'_, BTreeMap<String, String>>, HeadersError> {
        match &self.0 {
            Repr::Map(map) => Ok(Cow::Borrowed(map)),
            Repr::Json(text) => serde_json::from_str(text)
                .map(Cow::Owned)
                .map_err(|e| HeadersError(e.to_string())),
        }
    }

    /// The value of header `name`, if the headers parse and have it.
    pub fn get(&self, name: &str) -> Option<String> {
        self.to_map().ok()?.get(name).cloned()
    }
}

impl Default for StoredHeaders {
    fn default() -> Self {
        Self(Repr::Map(BTreeMap::new()))
    }
}

impl From<BTreeMap<String, String>> for StoredHeaders {
    fn from(map: BTreeMap<String, String>) -> Self {
        Self(Repr::Map(map))
    }
}

impl fmt::Debug for StoredHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Json(text) => f.write_str(text),
            Repr::Map(map) => map.fmt(f),
        }
    }
}

/// Equal when both parse to the same map (the stored text's spacing and key order are
/// PostgreSQL's, not the stager's).
impl PartialEq for StoredHeaders {
    fn eq(&self, other: &Self) -> bool {
        matches!((self.to_map(), other.to_map()), (Ok(a), Ok(b)) if a == b)
    }
}

impl PartialEq<BTreeMap<String, String>> for StoredHeaders {
    fn eq(&self, other: &BTreeMap<String, String>) -> bool {
        self.to_map().is_ok_and(|map| *map == *other)
    }
}

/// Stored headers that are not a JSON object of strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadersError(String);

impl fmt::Display for HeadersError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the row's headers are not a JSON object of strings ({}): fix the row's \
             headers in the payloads table and requeue it",
            self.0
        )
    }
}

impl std::error::Error for HeadersError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_text_and_map_compare_by_content() {
        let map = BTreeMap::from([
            ("b".to_owned(), "2".to_owned()),
            ("a".to_owned(), "1 \"q\"".to_owned()),
        ]);
        let stored = StoredHeaders::from_json(r#"{"a": "1 \"q\"", "b": "2"}"#);
        assert_eq!(stored, map);
        assert_eq!(stored, StoredHeaders::from(map.clone()));
        assert_eq!(stored.get("a").as_deref(), Some("1 \"q\""));
        assert_eq!(*stored.to_map().unwrap(), map);
        assert_ne!(StoredHeaders::from_json(r#"{"a": "1"}"#), map);
    }

    #[test]
    fn headers_that_are_not_strings_are_an_error_naming_the_fix() {
        let stored = StoredHeaders::from_json(r#"{"a": 1}"#);
        let err = stored.to_map().unwrap_err().to_string();
        assert!(err.contains("not a JSON object of strings"), "{err}");
        assert!(err.contains("requeue"), "{err}");
        assert_eq!(stored.get("a"), None);
        assert_ne!(stored, stored.clone(), "unparsable headers equal nothing");
    }
}
