//! The bytes of one event inside a logical message: a JSON head (event id, topic, key,
//! headers), a NUL byte, then the payload exactly as staged.
//!
//! JSON text never contains a NUL byte, so the first one ends the head whatever the
//! payload holds, and the SQL function can build the same bytes with `convert_to` and `||`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::envelope::OutboxEvent;

#[derive(Serialize, Deserialize)]
struct Head<'a> {
    id: Uuid,
    #[serde(borrow)]
    topic: Cow<'a, str>,
    #[serde(borrow)]
    key: Cow<'a, str>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// One event read back from the WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WalEvent {
    pub(crate) event_id: Uuid,
    pub(crate) topic: String,
    pub(crate) key: String,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) payload: bytes::Bytes,
}

impl WalEvent {
    /// Bytes this event holds in memory while in flight.
    pub(crate) fn size(&self) -> usize {
        self.payload.len()
            + self.topic.len()
            + self.key.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// The message content for `event`; its `event_id` header is always set.
pub(crate) fn encode(event: &OutboxEvent) -> Vec<u8> {
    let mut headers = event.headers.clone();
    headers.insert("event_id".to_owned(), event.event_id.to_string());
    let head = Head {
        id: event.event_id,
        topic: Cow::Borrowed(&event.topic),
        key: Cow::Borrowed(&event.event_key),
        headers,
    };
    let mut out = serde_json::to_vec(&head).expect("a map of strings always serializes");
    out.push(0);
    out.extend_from_slice(&event.payload);
    out
}

/// Reads a message content back.
///
/// # Errors
/// Why the bytes are not an Outpost event (they are dead-lettered as they are).
pub(crate) fn decode(content: bytes::Bytes) -> Result<WalEvent, String> {
    let nul = content
        .iter()
        .position(|&b| b == 0)
        .ok_or("no NUL byte after the JSON head")?;
    let head: Head<'_> = serde_json::from_slice(&content[..nul])
        .map_err(|e| format!("the JSON head is not an Outpost event head: {e}"))?;
    if head.topic.is_empty() {
        return Err("the head's topic is empty".to_owned());
    }
    Ok(WalEvent {
        event_id: head.id,
        topic: head.topic.into_owned(),
        key: head.key.into_owned(),
        headers: head.headers,
        payload: content.slice(nul + 1..),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(payload: &[u8]) -> OutboxEvent {
        OutboxEvent {
            event_id: Uuid::new_v4(),
            event_type: "t".into(),
            correlation_id: Uuid::new_v4(),
            aggregate_type: "a".into(),
            aggregate_id: "k".into(),
            topic: "topic".into(),
            event_key: "k".into(),
            payload: payload.to_vec(),
            headers: BTreeMap::from([("x".to_owned(), "y\u{0}z".to_owned())]),
        }
    }

    #[test]
    fn any_payload_bytes_come_back_exactly() {
        for payload in [&b""[..], b"\x00\x00{\"id\":1}\x00", &[0xff, 0xfe, 0]] {
            let e = event(payload);
            let back = decode(encode(&e).into()).unwrap();
            assert_eq!(&back.payload[..], payload);
            assert_eq!(back.event_id, e.event_id);
            assert_eq!(back.key, "k");
            assert_eq!(back.headers["x"], "y\u{0}z");
            assert_eq!(back.headers["event_id"], e.event_id.to_string());
        }
    }

    #[test]
    fn foreign_bytes_are_refused_with_a_reason() {
        assert!(decode(bytes::Bytes::from_static(b"hello"))
            .unwrap_err()
            .contains("NUL"));
        assert!(decode(bytes::Bytes::from_static(b"{}\x00x"))
            .unwrap_err()
            .contains("head"));
    }
}
