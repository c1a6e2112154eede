//! Claiming: the keys a relay owns, what it still has to send of each, and when a key is
//! finished (drained, failed, or out of lease) and goes back.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::outbox::store::{ClaimedEvent, ClaimedKey, KeyRelease, Settlement};

/// A map keyed by event keys. Owned keys are hashed several times per row (the key, its
/// review, its ack): with std's SipHash that was 4 % of the relay's CPU over a 100,000-key
/// drain. Seeded per process, so keys cannot be picked to collide.
pub(crate) type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// A set of event keys (see [`Map`]).
pub(crate) type Set<K> = HashSet<K, foldhash::fast::RandomState>;

/// One owned key.
#[derive(Debug, Default)]
pub(crate) struct KeyState {
    /// Fetched rows not sent yet, in id order.
    pub(crate) queued: VecDeque<ClaimedEvent>,
    /// Rows sent and not yet acked or failed.
    pub(crate) in_flight: usize,
    /// The producer's token for the latest row in flight (its instance and the purges so
    /// far): while rows are in flight, more are queued only while it holds (see
    /// `Sender::pump`).
    pub(crate) sent_on: u64,
    /// The topic of the rows in flight: while rows are in flight, more go to that topic only
    /// (see `Sender::pump`).
    pub(crate) sent_to: String,
    /// Highest row id fetched: the next fetch starts after it.
    pub(crate) after: i64,
    /// The last read returned fewer rows than asked: the key had nothing more then.
    pub(crate) drained: bool,
    /// The earliest failed row (to retry) with its settlement; nothing more of the key is
    /// sent once set, so nothing overtakes it.
    pub(crate) failure: Option<(i64, Settlement, crate::error::ErrorClass)>,
    /// The lease lapsed and was not renewed (the relay stalled): another owner may be
    /// sending this key, so nothing more of it is sent; acks still in flight are recorded.
    pub(crate) lost: bool,
    /// Lost, then leased to this relay again by a claim while rows of the lost lease were
    /// still in flight: it goes back with a hand-back of that new lease, not without one
    /// (the key would sit leased, unread and unrenewed, until the lease lapsed).
    pub(crate) reclaimed: bool,
    /// Waiting in [`Keys::defer`]'s queue (once: a key touched by each ack would otherwise
    /// be queued once per ack).
    pub(crate) deferred: bool,
}

/// What to do with a key after looking at it.
#[derive(Debug, PartialEq)]
pub(crate) enum Next {
    /// Rows are queued: send them.
    Send,
    /// Queue empty but more may wait in the table: fetch.
    Fetch,
    /// Waiting for acks.
    Wait,
    /// Finished: hand it back.
    Release(Release),
}

/// How a finished key goes back.
#[derive(Debug, PartialEq)]
pub(crate) enum Release {
    /// With the failed row's retry recorded and the key's back-off.
    Failed(i64, Settlement, crate::error::ErrorClass),
    /// Nothing more to send: delete its key row if still empty.
    Drained,
    /// Stopping or out of lease: hand it back as it is.
    Plain,
    /// The lease was lost: nothing to hand back.
    Lost,
}

/// The keys this relay owns.
#[derive(Debug, Default)]
pub(crate) struct Keys {
    keys: Map<String, KeyState>,
    /// Keys that changed since they were last looked at.
    dirty: Set<String>,
    /// Keys that need a read the caps left no room for, oldest first. They wait here, not
    /// among the changed keys: looking at every one of them after each ack cost a pass
    /// over thousands of keys per ack (a 1M-row, 100,000-key drain: 5,000 ev/s, the relay
    /// at 100 % CPU in its reviews).
    deferred: VecDeque<String>,
    /// Rows queued over all keys (kept as they change: summing per call would cost a pass
    /// over every owned key per read).
    queued: usize,
    /// Payload bytes of the rows queued over all keys.
    queued_bytes: usize,
    /// The payload size of the rows read lately (see [`Self::row_bytes`]).
    row_bytes: Option<usize>,
}

/// What a row's payload is taken to weigh before any was read: Kafka's own default
/// message size limit (librdkafka's `message.max.bytes`, 1,000,000), rounded up. A larger
/// row is refused by the producer unless that limit was raised.
const UNREAD_ROW_BYTES: usize = 1 << 20;

impl Keys {
    /// Rows read and not sent yet, over all keys.
    pub(crate) fn queued_rows(&self) -> usize {
        self.queued
    }

    /// No keys yet; rows are taken to weigh `row_bytes` bytes (0: not known, see
    /// [`Self::row_bytes`]).
    pub(crate) fn weighing(row_bytes: usize) -> Self {
        Self {
            row_bytes: (row_bytes > 0).then_some(row_bytes),
            ..Self::default()
        }
    }

    /// What the rows read weighed lately, once any was read.
    pub(crate) fn weighed(&self) -> Option<usize> {
        self.row_bytes
    }

    /// Payload bytes read and not sent yet, over all keys.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// What the next rows read are expected to weigh: the mean payload of the reads so
    /// far, the latest counting for a quarter; before the first read, [`UNREAD_ROW_BYTES`].
    /// Reads are sized by it under the byte cap, so rows much larger than those before
    /// them can take one read past the cap.
    pub(crate) fn row_bytes(&self) -> usize {
        self.row_bytes.unwrap_or(UNREAD_ROW_BYTES).max(1)
    }

    /// The sender took `rows` queued rows of `bytes` payload bytes (see [`Self::queue`]).
    pub(crate) fn took(&mut self, rows: usize, bytes: usize) {
        self.queued -= rows;
        self.queued_bytes -= bytes;
    }

    /// Counts rows just read into the queues; returns their payload bytes.
    fn read(&mut self, rows: &[ClaimedEvent]) -> usize {
        let bytes: usize = rows.iter().map(|r| r.payload.len()).sum();
        self.queued += rows.len();
        self.queued_bytes += bytes;
        bytes
    }

    /// Weighs one statement's read of `rows` rows of `bytes` payload bytes in all (see
    /// [`Self::row_bytes`]). Once per statement, not per key: weighed key by key, a claim
    /// of 500 keys left the estimate with the last few keys' sizes.
    fn weigh(&mut self, rows: usize, bytes: usize) {
        if rows == 0 {
            return;
        }
        let mean = bytes / rows;
        self.row_bytes = Some(match self.row_bytes {
            Some(before) => (before * 3 + mean) / 4,
            None => mean,
        });
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys whose lease this relay renews (lost ones are not).
    pub(crate) fn names(&self) -> Vec<String> {
        self.keys
            .iter()
            .filter(|(_, state)| !state.lost)
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Marks `key` to be looked at in the next review.
    pub(crate) fn touch(&mut self, key: &str) {
        mark(&mut self.dirty, key);
    }

    /// `key` needs a read there is no room for yet: it is looked at again once
    /// [`Self::recall`] brings it back.
    pub(crate) fn defer(&mut self, key: String) {
        if let Some(state) = self.keys.get_mut(&key) {
            if !state.deferred {
                state.deferred = true;
                self.deferred.push_back(key);
            }
        }
    }

    /// Keys waiting for room to read.
    pub(crate) fn deferred(&self) -> usize {
        self.deferred.len()
    }

    /// Brings back up to `n` deferred keys, oldest first, for the next review (a key
    /// finished or handed back meanwhile is skipped there).
    pub(crate) fn recall(&mut self, n: usize) {
        let n = n.min(self.deferred.len());
        for key in self.deferred.drain(..n) {
            if let Some(state) = self.keys.get_mut(&key) {
                state.deferred = false;
                self.dirty.insert(key);
            }
        }
    }

    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut KeyState> {
        mark(&mut self.dirty, key);
        self.keys.get_mut(key)
    }

    /// Takes in freshly claimed keys (`asked` rows per key were requested).
    pub(crate) fn claimed(&mut self, claimed: Vec<ClaimedKey>, asked: usize) {
        let (mut read, mut bytes) = (0, 0);
        for ClaimedKey { key, rows } in claimed {
            if let Some(state) = self.keys.get_mut(&key) {
                // Our own lease ran out (a slow renewal) and the claim took the key again:
                // its rows are already queued or in flight here; reading them twice would
                // send them twice.
                if state.lost {
                    state.reclaimed = true;
                    self.dirty.insert(key);
                }
                continue;
            }
            read += rows.len();
            bytes += self.read(&rows);
            let state = self.keys.entry(key.clone()).or_default();
            state.drained = rows.len() < asked;
            if let Some(last) = rows.last() {
                state.after = last.id;
            }
            state.queued.extend(rows);
            self.dirty.insert(key);
        }
        self.weigh(read, bytes);
    }

    /// Takes in rows fetched for owned keys; `asked` keys were asked for `per_key` rows.
    pub(crate) fn fetched(
        &mut self,
        asked: &[(String, i64)],
        got: Vec<ClaimedKey>,
        per_key: usize,
    ) {
        let mut got: Map<String, Vec<ClaimedEvent>> =
            got.into_iter().map(|k| (k.key, k.rows)).collect();
        let (mut read, mut bytes) = (0, 0);
        for (key, _) in asked {
            if !self.keys.contains_key(key) {
                continue;
            }
            let rows = got.remove(key).unwrap_or_default();
            read += rows.len();
            bytes += self.read(&rows);
            let Some(state) = self.keys.get_mut(key) else {
                continue;
            };
            state.drained = rows.len() < per_key;
            if let Some(last) = rows.last() {
                state.after = last.id;
            }
            state.queued.extend(rows);
            self.dirty.insert(key.clone());
        }
        self.weigh(read, bytes);
    }

    /// Keys whose lease a renewal found lapsed: their queued rows are dropped and nothing
    /// more of them is read or sent. Returns how many owned keys were lost.
    pub(crate) fn lose(&mut self, lost: impl IntoIterator<Item = String>) -> usize {
        let mut count = 0;
        for key in lost {
            if let Some(state) = self.keys.get_mut(&key) {
                state.lost = true;
                let (rows, bytes) = unqueue(state);
                self.queued -= rows;
                self.queued_bytes -= bytes;
                self.dirty.insert(key);
                count += 1;
            }
        }
        count
    }

    /// Every owned key drops its queued rows (stopping, or the lease is running out).
    pub(crate) fn drop_queued(&mut self) {
        for (key, state) in &mut self.keys {
            if let Some(first) = state.queued.front() {
                // Should the key stay (rows in flight, then a late renewal), the dropped
                // rows are read again rather than skipped.
                state.after = first.id - 1;
                state.drained = false;
            }
            let (rows, bytes) = unqueue(state);
            self.queued -= rows;
            self.queued_bytes -= bytes;
            self.dirty.insert(key.clone());
        }
    }

    /// Looks at every key that changed: what each needs next. Finished keys are removed.
    /// `once`: no further reads; a key whose read rows are done goes back.
    pub(crate) fn review(&mut self, refill_below: usize, stopping: bool, once: bool) -> Review {
        let mut review = Review::default();
        for key in std::mem::take(&mut self.dirty) {
            let Some(state) = self.keys.get_mut(&key) else {
                continue;
            };
            match next(state, refill_below, stopping, once) {
                Next::Send => review.send.push(key),
                Next::Fetch => review.fetch.push((key, state.after)),
                Next::Wait => {}
                Next::Release(release) => {
                    // A failed key goes back with rows read and never sent (nothing is sent
                    // after its failure); they leave the count with it, or every failure
                    // would shrink the room for reads until the relay claimed nothing more.
                    let (rows, bytes) = unqueue(state);
                    self.queued -= rows;
                    self.queued_bytes -= bytes;
                    self.keys.remove(&key);
                    review.release.push((key, release));
                }
            }
        }
        review
    }

    /// Rows queued for `key`, to send in order; report what was taken with [`Self::took`].
    pub(crate) fn queue(&mut self, key: &str) -> Option<&mut KeyState> {
        self.keys.get_mut(key)
    }
}

/// Drops the queued rows of `state`; how many there were, and their payload bytes.
fn unqueue(state: &mut KeyState) -> (usize, usize) {
    let rows = std::mem::take(&mut state.queued);
    (rows.len(), rows.iter().map(|r| r.payload.len()).sum())
}

/// The outcome of [`Keys::review`].
#[derive(Debug, Default)]
pub(crate) struct Review {
    pub(crate) send: Vec<String>,
    pub(crate) fetch: Vec<(String, i64)>,
    pub(crate) release: Vec<(String, Release)>,
}

impl Release {
    /// The key's part of a settle statement.
    pub(crate) fn key_release(&self, key: &str) -> Option<KeyRelease> {
        match self {
            Self::Failed(
                _,
                Settlement::Retry {
                    delay, transient, ..
                },
                _,
            ) => Some(KeyRelease {
                key: key.to_owned(),
                backoff: Some(*delay),
                transient: *transient,
            }),
            Self::Failed(..) | Self::Plain => Some(KeyRelease::done(key.to_owned())),
            Self::Drained | Self::Lost => None,
        }
    }
}

/// Adds `key` to `dirty`, copying it only when it is not there yet (a key acked many
/// times between two reviews was copied once per ack).
fn mark(dirty: &mut Set<String>, key: &str) {
    if !dirty.contains(key) {
        dirty.insert(key.to_owned());
    }
}

fn next(state: &KeyState, refill_below: usize, stopping: bool, once: bool) -> Next {
    if state.lost {
        // A failure of a lost key is not recorded either: the new owner retries the row.
        return if state.in_flight == 0 {
            Next::Release(if state.reclaimed {
                Release::Plain
            } else {
                Release::Lost
            })
        } else {
            Next::Wait
        };
    }
    if let Some((id, settlement, class)) = &state.failure {
        if state.in_flight == 0 {
            return Next::Release(Release::Failed(*id, settlement.clone(), *class));
        }
        return Next::Wait;
    }
    if stopping {
        return if state.in_flight == 0 {
            Next::Release(Release::Plain)
        } else {
            Next::Wait
        };
    }
    if !state.queued.is_empty() {
        return Next::Send;
    }
    if !state.drained && !once {
        return if state.in_flight < refill_below {
            Next::Fetch
        } else {
            Next::Wait
        };
    }
    match (state.in_flight, state.drained) {
        (0, true) => Next::Release(Release::Drained),
        (0, false) => Next::Release(Release::Plain),
        _ => Next::Wait,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::error::ErrorClass;
    use std::time::Duration;

    fn retry() -> Settlement {
        Settlement::Retry {
            delay: Duration::from_millis(100),
            error: "x".into(),
            budgeted: false,
            transient: true,
            attempts: 0,
        }
    }

    #[test]
    fn a_failed_key_waits_for_its_in_flight_rows_then_goes_back_with_the_failure() {
        let mut s = KeyState {
            in_flight: 2,
            failure: Some((7, retry(), ErrorClass::Transient)),
            ..KeyState::default()
        };
        assert_eq!(next(&s, 10, false, false), Next::Wait);
        s.in_flight = 0;
        assert!(matches!(
            next(&s, 10, false, false),
            Next::Release(Release::Failed(7, _, _))
        ));
    }

    /// A claimed row of key `k`, topic `t`.
    /// The payload bytes of a [`row`].
    const PAYLOAD: usize = 10;

    pub(crate) fn row(id: i64) -> ClaimedEvent {
        ClaimedEvent {
            id,
            event_id: uuid::Uuid::new_v4(),
            topic: "t".into(),
            event_key: "k".into(),
            payload: vec![0; PAYLOAD],
            headers: Default::default(),
            attempts: 0,
            failures: 0,
            created_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn a_read_is_weighed_as_a_whole_not_by_its_last_keys() {
        let mut keys = Keys::default();
        let sized = |id, size| ClaimedEvent {
            payload: vec![0; size],
            ..row(id)
        };
        // Three keys of a 1,000-byte row, then one of three 40-byte rows: one statement's
        // read, 3,120 bytes over 6 rows (weighed key by key: 760).
        let claimed = (0..4)
            .map(|i| ClaimedKey {
                key: format!("k{i}"),
                rows: if i < 3 {
                    vec![sized(i, 1_000)]
                } else {
                    (3..6).map(|id| sized(id, 40)).collect()
                },
            })
            .collect();
        keys.claimed(claimed, 10);
        assert_eq!(keys.row_bytes(), 520);
        // A later read counts for a quarter.
        keys.fetched(
            &[("k0".into(), 0), ("k1".into(), 1)],
            vec![
                ClaimedKey {
                    key: "k0".into(),
                    rows: vec![sized(10, 2_000)],
                },
                ClaimedKey {
                    key: "k1".into(),
                    rows: vec![sized(11, 0)],
                },
            ],
            10,
        );
        assert_eq!(keys.row_bytes(), (520 * 3 + 1_000) / 4);
    }

    #[test]
    fn a_failed_key_takes_its_unsent_rows_out_of_the_count() {
        let mut keys = Keys::default();
        keys.claimed(
            vec![ClaimedKey {
                key: "k".into(),
                rows: vec![row(1), row(2), row(3)],
            }],
            10,
        );
        assert_eq!(keys.queued_bytes(), 3 * PAYLOAD);
        assert_eq!(keys.row_bytes(), PAYLOAD);
        let state = keys.queue("k").unwrap();
        state.queued.pop_front();
        state.in_flight = 1;
        keys.took(1, PAYLOAD);
        let state = keys.get_mut("k").unwrap();
        state.failure = Some((1, retry(), ErrorClass::Transient));
        state.in_flight = 0;
        let review = keys.review(5, false, false);
        assert!(matches!(
            review.release.as_slice(),
            [(_, Release::Failed(1, _, _))]
        ));
        assert_eq!(keys.queued_rows(), 0);
        assert_eq!(keys.queued_bytes(), 0);
    }

    #[test]
    fn a_key_claimed_again_by_its_owner_is_not_read_twice() {
        let mut keys = Keys::default();
        let claim = |ids: &[i64]| {
            vec![ClaimedKey {
                key: "k".into(),
                rows: ids.iter().map(|&id| row(id)).collect(),
            }]
        };
        keys.claimed(claim(&[1, 2]), 10);
        keys.claimed(claim(&[1, 2, 3]), 10);
        assert_eq!(keys.queued_rows(), 2);
    }

    #[test]
    fn rows_dropped_while_out_of_lease_are_read_again_not_skipped() {
        let mut keys = Keys::default();
        keys.claimed(
            vec![ClaimedKey {
                key: "k".into(),
                rows: vec![row(4), row(5), row(6)],
            }],
            3,
        );
        let state = keys.queue("k").unwrap();
        state.queued.pop_front();
        state.in_flight = 1;
        keys.took(1, PAYLOAD);
        keys.drop_queued();
        assert_eq!(keys.queued_rows(), 0);
        let review = keys.review(5, false, false);
        assert_eq!(review.fetch, vec![("k".to_owned(), 4)]);
    }

    #[test]
    fn a_lost_key_sends_nothing_more_and_goes_back_without_a_release() {
        let mut keys = Keys::default();
        keys.claimed(
            vec![ClaimedKey {
                key: "k".into(),
                rows: vec![row(1), row(2)],
            }],
            10,
        );
        keys.queue("k").unwrap().in_flight = 1;
        assert_eq!(keys.lose(["k".to_owned(), "other".to_owned()]), 1);
        assert_eq!(keys.queued_rows(), 0);
        let review = keys.review(5, false, false);
        assert!(review.send.is_empty() && review.fetch.is_empty() && review.release.is_empty());
        keys.get_mut("k").unwrap().in_flight = 0;
        let review = keys.review(5, false, false);
        assert_eq!(review.release, vec![("k".to_owned(), Release::Lost)]);
        assert_eq!(Release::Lost.key_release("k"), None);
    }

    #[test]
    fn a_lost_key_claimed_again_goes_back_with_a_hand_back() {
        let mut keys = Keys::default();
        let claim = || {
            vec![ClaimedKey {
                key: "k".into(),
                rows: vec![row(1)],
            }]
        };
        keys.claimed(claim(), 10);
        let state = keys.queue("k").unwrap();
        state.queued.pop_front();
        state.in_flight = 1;
        keys.took(1, PAYLOAD);
        keys.lose(["k".to_owned()]);
        keys.claimed(claim(), 10);
        assert_eq!(keys.queued_rows(), 0, "not read twice");
        keys.get_mut("k").unwrap().in_flight = 0;
        let review = keys.review(5, false, false);
        assert_eq!(review.release, vec![("k".to_owned(), Release::Plain)]);
    }

    #[test]
    fn a_key_is_refilled_before_it_runs_dry_and_released_once_drained() {
        let mut s = KeyState {
            in_flight: 3,
            ..KeyState::default()
        };
        assert_eq!(next(&s, 5, false, false), Next::Fetch);
        assert_eq!(next(&s, 2, false, false), Next::Wait);
        s.drained = true;
        assert_eq!(next(&s, 5, false, false), Next::Wait);
        s.in_flight = 0;
        assert_eq!(next(&s, 5, false, false), Next::Release(Release::Drained));
        assert_eq!(next(&s, 5, true, false), Next::Release(Release::Plain));
    }

    #[test]
    fn a_key_waiting_for_room_is_queued_once_and_looked_at_only_when_recalled() {
        let mut keys = Keys::default();
        let claimed = (0..3)
            .map(|i| ClaimedKey {
                key: format!("k{i}"),
                rows: vec![row(i)],
            })
            .collect();
        keys.claimed(claimed, 1);
        for key in ["k0", "k1", "k2"] {
            let state = keys.queue(key).unwrap();
            state.queued.clear();
            state.in_flight = 1;
        }
        keys.took(3, 3 * PAYLOAD);
        let mut waiting = keys.review(5, false, false).fetch;
        assert_eq!(waiting.len(), 3);
        waiting.sort();
        for (key, _) in waiting {
            keys.defer(key);
        }
        // Acks touch a waiting key again and again; it waits in the queue once.
        for _ in 0..5 {
            keys.get_mut("k1").unwrap();
            let again = keys.review(5, false, false);
            assert_eq!(again.fetch, vec![("k1".to_owned(), 1)]);
            again.fetch.into_iter().for_each(|(key, _)| keys.defer(key));
        }
        assert_eq!(keys.deferred(), 3);
        assert!(
            keys.review(5, false, false).fetch.is_empty(),
            "not looked at until recalled"
        );
        keys.recall(2);
        let recalled: Vec<String> = keys
            .review(5, false, false)
            .fetch
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(recalled.len(), 2);
        assert!(recalled.contains(&"k0".to_owned()) && recalled.contains(&"k1".to_owned()));
        assert_eq!(keys.deferred(), 1);
    }
}
