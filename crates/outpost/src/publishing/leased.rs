//! Keys a transaction leased while staging: the ones whose key row its staging created
//! (see `OutboxStore::stage_leasing`). Such a key has no pending row but this
//! transaction's, and nobody else may send it once the transaction commits, so the eager
//! path sends those rows from memory, without a claim statement between `COMMIT` and the
//! produce.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::event::envelope::OutboxEvent;
use crate::outbox::store::{ClaimedEvent, ClaimedKey};
use crate::publishing::turns::{KeyTurns, Turn};

/// The rows a transaction staged under keys it leased, in staging order.
#[derive(Debug, Default)]
pub(crate) struct LeasedKeys {
    keys: HashSet<String>,
    rows: Vec<ClaimedEvent>,
    /// When the first leasing statement was sent: every lease of the transaction runs at
    /// least this long (a lease counts from its statement's start, lock waits included).
    since: Option<Instant>,
    /// The transaction's turn for these keys, taken while its staging held their locks.
    turn: Option<Turn>,
    /// Keys the turn took no place for (see `Turn::extend`): a later turn of the key was
    /// taken first, and may claim this transaction's rows once it commits (the lease is
    /// this process's). Never sent from memory or handed back: the dispatch claims them
    /// from the table, behind that later turn.
    untaken: HashSet<String>,
}

impl LeasedKeys {
    /// Whether `key` is one of them (a later event of it in the same transaction joins it:
    /// its key row exists by then, so staging does not report it leased).
    pub(crate) fn holds(&self, key: &str) -> bool {
        self.keys.contains(key)
    }

    /// Adds a row staged under a key this transaction leased, by a statement sent at
    /// `sent`. The key's first row takes the transaction's turn for it (see [`Self::turn`]).
    pub(crate) fn add(
        &mut self,
        event: &OutboxEvent,
        id: i64,
        sent: Instant,
        turns: &Arc<KeyTurns>,
    ) {
        self.since.get_or_insert(sent);
        if self.keys.insert(event.event_key.clone()) {
            let key = std::slice::from_ref(&event.event_key);
            match &mut self.turn {
                Some(turn) => self.untaken.extend(turn.extend(key)),
                None => self.turn = Some(turns.take_staging(key)),
            }
        }
        // Before the commit: a dispatch before this one that reads the row once committed
        // tells this one, which would otherwise send it again from memory.
        if let Some(turn) = &mut self.turn {
            turn.expect([event.event_id]);
        }
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

    /// The transaction's turn for its leased keys. Taken at staging, while the transaction
    /// holds each key's lock, it comes before the turn of any later commit of the key in
    /// this process, whose staging waited for that lock: taken at commit, a later commit
    /// could take its turn first (its task ran sooner), claim the key (its owner is this
    /// process) and send this transaction's rows, which were then sent again from memory.
    pub(crate) fn turn(&mut self) -> Option<Turn> {
        self.turn.take()
    }

    /// Whether there is nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The ids of the rows to be sent from memory.
    pub(crate) fn row_ids(&self) -> Vec<i64> {
        self.rows.iter().map(|r| r.id).collect()
    }

    /// Not all of the rows are there to commit (a savepoint rolled some back): none is
    /// sent from memory; the keys, still leased to this process, are claimed like any
    /// other, which reads what was committed.
    pub(crate) fn distrust(&mut self) {
        self.rows.clear();
        self.since = None;
    }

    /// The leased keys this transaction may hand back (not the untaken ones).
    pub(crate) fn keys(&self) -> impl Iterator<Item = &String> {
        self.keys.iter().filter(|k| !self.untaken.contains(*k))
    }

    /// The leased keys whose turn went to a later commit: never sent from memory, and
    /// handed back only behind that commit's turn.
    pub(crate) fn untaken(&self) -> impl Iterator<Item = &String> {
        self.untaken.iter()
    }

    /// When the oldest of these leases was taken (its statement sent), if any.
    pub(crate) fn since(&self) -> Option<Instant> {
        self.since
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
            if self.untaken.contains(&row.event_key) {
                continue;
            }
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
        let turns = Arc::new(KeyTurns::default());
        let now = Instant::now();
        leased.add(&event("b"), 7, now, &turns);
        leased.add(&event("a"), 9, now, &turns);
        leased.add(&event("b"), 5, now, &turns);
        assert!(leased.holds("a") && leased.holds("b") && !leased.holds("c"));
        // One turn for both keys: a later commit of either waits for it.
        let turn = leased.turn().expect("the first leased key took a turn");
        let mut later = turns.take(&["a".to_owned()]);
        assert!(turn.followed("a") && !turn.followed("b"));
        let mut waiting = Box::pin(later.ready());
        assert!(
            futures::FutureExt::now_or_never(waiting.as_mut()).is_none(),
            "a later turn of the key waits for the staging turn"
        );
        drop(turn);
        assert!(futures::FutureExt::now_or_never(waiting.as_mut()).is_some());
        let keys = leased.into_sendable(Duration::from_secs(90)).unwrap();
        let ids: Vec<(&str, Vec<i64>)> = keys
            .iter()
            .map(|k| (k.key.as_str(), k.rows.iter().map(|r| r.id).collect()))
            .collect();
        assert_eq!(ids, vec![("b", vec![5, 7]), ("a", vec![9])]);

        // A lease counts from its statement's start, not from when the statement returned.
        let mut old = LeasedKeys::default();
        let sent = Instant::now() - Duration::from_millis(30);
        old.add(&event("a"), 1, sent, &turns);
        assert!(old.into_sendable(Duration::from_millis(40)).is_none());
        assert!(LeasedKeys::default()
            .into_sendable(Duration::from_secs(90))
            .is_none());
    }
}
