//! Keys a transaction leased while staging: the ones whose key row its staging created
//! (see `OutboxStore::stage_leasing`). Such a key has no pending row but this
//! transaction's, and nobody else may send it once the transaction commits, so the eager
//! path sends those rows from memory, without a claim statement between `COMMIT` and the
//! produce.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::event::envelope::OutboxEvent;
use crate::outbox::store::{ClaimedEvent, ClaimedKey};

/// The rows a transaction staged under keys it leased, in staging order.
#[derive(Debug, Default)]
pub(crate) struct LeasedKeys {
    keys: HashSet<String>,
    rows: Vec<ClaimedEvent>,
    /// The first lease's start: every lease of the transaction runs at least this long.
    since: Option<Instant>,
}

impl LeasedKeys {
    /// Whether `key` is one of them (a later event of it in the same transaction joins it:
    /// its key row exists by then, so staging does not report it leased).
    pub(crate) fn holds(&self, key: &str) -> bool {
        self.keys.contains(key)
    }

    /// Adds a row staged under a key this transaction leased.
    pub(crate) fn add(&mut self, event: &OutboxEvent, id: i64) {
        self.since.get_or_insert_with(Instant::now);
        self.keys.insert(event.event_key.clone());
        self.rows.push(ClaimedEvent {
            id,
            event_id: event.event_id,
            topic: event.topic.clone(),
            event_key: event.event_key.clone(),
            payload: event.payload.clone(),
            headers: event.headers.clone().into(),
            attempts: 0,
            failures: 0,
            created_at: Utc::now(),
        });
    }

    /// Whether there is nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The leased keys.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &String> {
        self.keys.iter()
    }

    /// Each key with its rows in id order, if the leases are young enough to send under:
    /// younger than half of `lease`, so that sends queued now end (or time out) before the
    /// leases lapse, and the eager path's renewals (every third of a lease from the
    /// dispatch's start) come in time. Older ones (a long transaction, a long wait for
    /// an earlier dispatch of a key) are claimed like any other key: an owner may claim a
    /// key it holds.
    pub(crate) fn into_sendable(self, lease: Duration) -> Option<Vec<ClaimedKey>> {
        let young = self.since.is_some_and(|since| since.elapsed() < lease / 2);
        if !young {
            return None;
        }
        let mut by_key: HashMap<String, usize> = HashMap::new();
        let mut keys: Vec<ClaimedKey> = Vec::new();
        for row in self.rows {
            let slot = *by_key.entry(row.event_key.clone()).or_insert_with(|| {
                keys.push(ClaimedKey {
                    key: row.event_key.clone(),
                    rows: Vec::new(),
                });
                keys.len() - 1
            });
            keys[slot].rows.push(row);
        }
        for key in &mut keys {
            key.rows.sort_by_key(|r| r.id);
        }
        Some(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_back_by_key_in_id_order_only_while_the_leases_are_young() {
        let mut leased = LeasedKeys::default();
        let event = |key: &str| OutboxEvent {
            event_id: uuid::Uuid::new_v4(),
            event_type: "e.v1".into(),
            correlation_id: uuid::Uuid::new_v4(),
            aggregate_type: "a".into(),
            aggregate_id: key.into(),
            topic: "t".into(),
            event_key: key.into(),
            payload: b"{}".to_vec(),
            headers: std::collections::BTreeMap::new(),
        };
        leased.add(&event("b"), 7);
        leased.add(&event("a"), 9);
        leased.add(&event("b"), 5);
        assert!(leased.holds("a") && leased.holds("b") && !leased.holds("c"));
        let keys = leased.into_sendable(Duration::from_secs(90)).unwrap();
        let ids: Vec<(&str, Vec<i64>)> = keys
            .iter()
            .map(|k| (k.key.as_str(), k.rows.iter().map(|r| r.id).collect()))
            .collect();
        assert_eq!(ids, vec![("b", vec![5, 7]), ("a", vec![9])]);

        let mut old = LeasedKeys::default();
        old.add(&event("a"), 1);
        std::thread::sleep(Duration::from_millis(30));
        assert!(old.into_sendable(Duration::from_millis(40)).is_none());
        assert!(LeasedKeys::default()
            .into_sendable(Duration::from_secs(90))
            .is_none());
    }
}
