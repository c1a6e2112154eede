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

    /// Calls `f` with each header's name and value, in the order stored, borrowing from the
    /// stored text where it has no escapes. The relay builds each message's Kafka headers
    /// this way: through [`Self::to_map`], a row's four headers cost nine allocations on
    /// top of librdkafka's own (heaptrack of a 100,000-event drain: 42 allocations an
    /// event, 9 of them that map).
    ///
    /// # Errors
    /// A [`HeadersError`] as for [`Self::to_map`]; `f` may have seen some headers by then.
    pub fn each(&self, mut f: impl FnMut(&str, &str)) -> Result<(), HeadersError> {
        match &self.0 {
            Repr::Map(map) => {
                map.iter().for_each(|(name, value)| f(name, value));
                Ok(())
            }
            Repr::Json(text) => {
                let mut de = serde_json::Deserializer::from_str(text);
                serde::de::Deserializer::deserialize_map(&mut de, EachHeader(&mut f))
                    .and_then(|()| de.end())
                    .map_err(|e| HeadersError(e.to_string()))
            }
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

/// Walks a JSON object of strings, handing each pair to the callback.
struct EachHeader<F>(F);

impl<'de, F: FnMut(&str, &str)> serde::de::Visitor<'de> for EachHeader<F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of strings")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(name) = map.next_key::<Text<'de>>()? {
            let value: Text<'de> = map.next_value()?;
            (self.0)(&name.0, &value.0);
        }
        Ok(())
    }
}

/// A JSON string, borrowed from the input unless it had escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Text<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Text<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }

            fn visit_str<E>(self, s: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(Visit)
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
    fn each_header_is_handed_over_once_escapes_and_all() {
        let collect = |stored: &StoredHeaders| {
            let mut seen = Vec::new();
            stored
                .each(|name, value| seen.push((name.to_owned(), value.to_owned())))
                .map(|()| seen)
        };
        let stored = StoredHeaders::from_json(r#"{"b": "2", "a": "1 \"q\"", "c\u00e9": ""}"#);
        let seen = collect(&stored).unwrap();
        let expected = [("b", "2"), ("a", "1 \"q\""), ("cé", "")];
        assert_eq!(seen.len(), expected.len());
        for ((name, value), (n, v)) in seen.iter().zip(expected) {
            assert_eq!((name.as_str(), value.as_str()), (n, v));
        }
        let map = BTreeMap::from([("x".to_owned(), "y".to_owned())]);
        assert_eq!(
            collect(&StoredHeaders::from(map)).unwrap(),
            [("x".into(), "y".into())]
        );
        for bad in [r#"{"a": 1}"#, r#"["a"]"#, r#"{"a": "1"} x"#, "{"] {
            let err = collect(&StoredHeaders::from_json(bad)).unwrap_err();
            assert!(err.to_string().contains("requeue"), "{bad}: {err}");
        }
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
