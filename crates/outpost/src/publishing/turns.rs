//! Per-key turns of eager dispatches in one process.
//!
//! A commit whose key is still held by an earlier commit's dispatch (sending, or acked with
//! its settle on the way) would find the key leased and leave its events to the relay,
//! which can only claim them once that dispatch is done anyway. Instead it queues behind
//! the earlier dispatch and claims when that one has let go: one broker round trip later,
//! with no relay claim and no wake-up.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;
use uuid::Uuid;

/// The dispatches holding or waiting for each key, latest last.
#[derive(Debug, Default)]
pub(crate) struct KeyTurns {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// The latest turn taken of each key: a new turn of the key waits for it.
    latest: HashMap<String, Latest>,
    /// Events of a key that a dispatch sent (acked) for the later turns of the key: a dispatch claims a key's next rows, which may be later commits' too.
    /// Only events a live turn expects (see [`Turn::expect`]): a busy key's dispatches
    /// also send other processes' events, which no turn asks about, and those piled up
    /// for as long as the key had a later turn. Dropped with the key's last turn.
    sent: HashMap<String, HashSet<Uuid>>,
    /// Events of live turns (see [`Turn::expect`]).
    expected: HashSet<Uuid>,
    /// Keys a dispatch kept for the next one with every row it claimed acked, the last of
    /// those rows' ids, and since when the kept lease is known to hold: the next dispatch
    /// reads the rows after it under the kept lease at once, while the settle of those
    /// before may still be on its way. Dropped with the key's last turn.
    through: HashMap<String, (i64, Instant)>,
}

/// The latest turn of a key.
#[derive(Debug)]
struct Latest {
    id: u64,
    /// Resolves (with an error) once that turn gives the key up.
    done: watch::Receiver<()>,
    /// Taken while staging by a transaction not committed yet (see [`Turn::committed`]).
    open: bool,
}

/// A dispatch's place in line for its keys; releasing a key (or dropping the turn) lets
/// the next dispatch of that key go.
#[derive(Debug)]
pub(crate) struct Turn {
    turns: Arc<KeyTurns>,
    id: u64,
    /// Taken by a transaction that has not committed yet.
    open: bool,
    /// The keys still held, each with the sender whose drop (it is never sent on) is what
    /// the key's next turn waits for: a dispatch done with one key lets that key's next
    /// dispatch go while it still works on its other keys.
    held: Vec<(String, watch::Sender<()>)>,
    /// The turn each key had before this one took its place, until [`Self::ready`] has
    /// waited for them: a turn given up before that puts its key's one back.
    before: Vec<(String, Latest)>,
    /// The events this turn's dispatch is for (see [`Self::expect`]).
    expected: Vec<Uuid>,
}

impl KeyTurns {
    /// Takes a turn for `keys` behind every turn of them taken before. Taking it is
    /// synchronous, so turns follow the order of the calls.
    pub(crate) fn take(self: &Arc<Self>, keys: &[String]) -> Turn {
        self.take_with(keys, false)
    }

    /// [`Self::take`] for a transaction staging `keys`, before it commits: open until
    /// [`Turn::committed`], which [`Self::idle`] does not wait for.
    pub(crate) fn take_staging(self: &Arc<Self>, keys: &[String]) -> Turn {
        self.take_with(keys, true)
    }

    fn take_with(self: &Arc<Self>, keys: &[String], open: bool) -> Turn {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // The id is drawn under the same lock as the places: a turn's id is above every
        // turn it waits for (see `Turn::extend`).
        state.next += 1;
        let mut turn = Turn {
            turns: Arc::clone(self),
            id: state.next,
            open,
            held: Vec::with_capacity(keys.len()),
            before: Vec::new(),
            expected: Vec::new(),
        };
        let untaken = turn.extend_in(&mut state, keys);
        debug_assert!(untaken.is_empty(), "a new turn is the latest of every key");
        turn
    }

    /// Resolves once the latest turn taken so far of each of `keys` was given up (a
    /// dispatch gives its turn up after the earlier ones, unless it failed before waiting).
    /// A turn of a transaction still open is not waited for: its events are not committed,
    /// and the caller may be that transaction's own task.
    pub(crate) async fn idle(&self, keys: &[String]) {
        let earlier: Vec<watch::Receiver<()>> = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            keys.iter()
                .filter_map(|k| state.latest.get(k))
                .filter(|latest| !latest.open)
                .map(|latest| latest.done.clone())
                .collect()
        };
        wait_all(earlier).await;
    }

    /// Keys with a turn taken and not given up.
    #[cfg(test)]
    fn busy(&self) -> usize {
        self.state.lock().unwrap().latest.len()
    }

    /// Events recorded as sent, over all keys.
    #[cfg(test)]
    fn recorded(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .sent
            .values()
            .map(HashSet::len)
            .sum()
    }
}

impl State {
    /// Turn `id` gave `key` up: with no later turn of it, the key is forgotten, unless
    /// `earlier` (the turn it had not waited for yet) still runs: the key is that one's
    /// again, and what it leaves for the next turn stays.
    fn given_up(&mut self, key: &str, id: u64, earlier: Option<Latest>) {
        if self.latest.get(key).is_none_or(|latest| latest.id != id) {
            return;
        }
        match earlier {
            Some(earlier) if earlier.done.has_changed().is_ok() => {
                self.latest.insert(key.to_owned(), earlier);
            }
            _ => {
                self.latest.remove(key);
                self.sent.remove(key);
                self.through.remove(key);
            }
        }
    }

    /// Whether a turn of `key` later than turn `id` was taken.
    fn followed(&self, key: &str, id: u64) -> bool {
        self.latest.get(key).is_some_and(|latest| latest.id != id)
    }
}

impl Turn {
    /// Takes this turn's place for more keys (those it holds already are skipped), behind
    /// the turns of them taken before: a transaction takes its turn for a key it leases
    /// while its staging holds the key's lock, and for its other keys when it commits.
    ///
    /// Returns the keys it took no place for: those whose latest turn was taken after this
    /// one. Queued behind such a turn, this one could wait for a turn that waits for it (a
    /// later commit of a key this one holds and of one it adds); the caller leaves those
    /// keys alone (it neither sends nor claims them; their events are the relay's, or the
    /// later turn's).
    pub(crate) fn extend(&mut self, keys: &[String]) -> Vec<String> {
        let turns = Arc::clone(&self.turns);
        let mut state = turns.state.lock().unwrap_or_else(|p| p.into_inner());
        self.extend_in(&mut state, keys)
    }

    fn extend_in(&mut self, state: &mut State, keys: &[String]) -> Vec<String> {
        let mut untaken = Vec::new();
        for key in keys {
            if self.held.iter().any(|(k, _)| k == key) {
                continue;
            }
            if state
                .latest
                .get(key)
                .is_some_and(|latest| latest.id > self.id)
            {
                untaken.push(key.clone());
                continue;
            }
            let (done, rx) = watch::channel(());
            let latest = Latest {
                id: self.id,
                done: rx,
                open: self.open,
            };
            if let Some(earlier) = state.latest.insert(key.clone(), latest) {
                self.before.push((key.clone(), earlier));
            }
            self.held.push((key.clone(), done));
        }
        untaken
    }

    /// The transaction that took this turn while staging committed: [`KeyTurns::idle`]
    /// waits for it from now on.
    pub(crate) fn committed(&mut self) {
        if !std::mem::take(&mut self.open) {
            return;
        }
        let mut state = self.state();
        for (key, _) in &self.held {
            if let Some(latest) = state.latest.get_mut(key) {
                if latest.id == self.id {
                    latest.open = false;
                }
            }
        }
    }

    /// The turn `key` had before this one, if not waited for yet.
    fn take_before(&mut self, key: &str) -> Option<Latest> {
        let at = self.before.iter().position(|(k, _)| k == key)?;
        Some(self.before.swap_remove(at).1)
    }

    /// Whether this turn holds `key`.
    pub(crate) fn holds(&self, key: &str) -> bool {
        self.held.iter().any(|(k, _)| k == key)
    }

    /// Resolves once the turns of this one's keys taken before it were given up.
    pub(crate) async fn ready(&mut self) {
        let before = std::mem::take(&mut self.before);
        wait_all(
            before
                .into_iter()
                .map(|(_, earlier)| earlier.done)
                .collect(),
        )
        .await;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.turns.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets the next turn of `key` go now (this dispatch is done with the key); no-op for
    /// a key this turn does not hold.
    pub(crate) fn release(&mut self, key: &str) {
        let Some(at) = self.held.iter().position(|(k, _)| k == key) else {
            return;
        };
        let (key, done) = self.held.swap_remove(at);
        let earlier = self.take_before(&key);
        self.state().given_up(&key, self.id, earlier);
        drop(done);
    }

    /// Whether a later turn of `key` was taken (it will claim the key after this one).
    pub(crate) fn followed(&self, key: &str) -> bool {
        self.state().followed(key, self.id)
    }

    /// Keeps `key` (leased since `leased_since` at the latest) for the later turn of it, if
    /// there is one, and returns whether there is; with `through`, every row of the key
    /// this dispatch claimed was acked, up to that id.
    pub(crate) fn keep_for_next(
        &self,
        key: &str,
        through: Option<i64>,
        leased_since: Instant,
    ) -> bool {
        let mut state = self.state();
        let followed = state.followed(key, self.id);
        if let (true, Some(through)) = (followed, through) {
            state
                .through
                .insert(key.to_owned(), (through, leased_since));
        }
        followed
    }

    /// The keys of `keys` the turn before kept for this one with all its rows acked, with
    /// the last acked row's id (see [`keep_for_next`](Self::keep_for_next)); call it once
    /// ready.
    pub(crate) fn kept_through(&self, keys: &[String]) -> HashMap<String, (i64, Instant)> {
        let mut state = self.state();
        keys.iter()
            .filter_map(|k| state.through.remove(k).map(|id| (k.clone(), id)))
            .collect()
    }

    /// The events this turn's dispatch is for: an earlier dispatch that sends one of them
    /// tells it (see [`Self::sent`]). Call it before those events are committed where they
    /// may be sent from memory (keys leased while staging), so that no earlier dispatch can
    /// read them first.
    pub(crate) fn expect(&mut self, events: impl IntoIterator<Item = Uuid>) {
        let mut state = self.turns.state.lock().unwrap_or_else(|p| p.into_inner());
        for event in events {
            state.expected.insert(event);
            self.expected.push(event);
        }
    }

    /// Tells the later turns of `key` which of its events this dispatch sent (call it once
    /// they are acked, before the turn is given up); events no live turn expects are not
    /// kept.
    pub(crate) fn sent(&self, key: &str, events: impl IntoIterator<Item = Uuid>) {
        let mut state = self.state();
        if state.followed(key, self.id) {
            let expected: Vec<Uuid> = events
                .into_iter()
                .filter(|event| state.expected.contains(event))
                .collect();
            if !expected.is_empty() {
                state
                    .sent
                    .entry(key.to_owned())
                    .or_default()
                    .extend(expected);
            }
        }
    }

    /// Which of `events` (event id and key) an earlier turn sent; call it once ready.
    pub(crate) fn sent_before<'a>(
        &self,
        events: impl IntoIterator<Item = (Uuid, &'a str)>,
    ) -> HashSet<Uuid> {
        let mut state = self.state();
        events
            .into_iter()
            .filter(|(event, key)| {
                state
                    .sent
                    .get_mut(*key)
                    .is_some_and(|sent| sent.remove(event))
            })
            .map(|(event, _)| event)
            .collect()
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let keys: Vec<String> = self.held.iter().map(|(k, _)| k.clone()).collect();
        let earlier: Vec<Option<Latest>> = keys.iter().map(|k| self.take_before(k)).collect();
        let mut state = self.state();
        for (key, earlier) in keys.iter().zip(earlier) {
            state.given_up(key, self.id, earlier);
        }
        for event in &self.expected {
            state.expected.remove(event);
        }
    }
}

async fn wait_all(receivers: Vec<watch::Receiver<()>>) {
    for mut rx in receivers {
        // Nothing is ever sent: `changed()` returns (with an error) when the turn is dropped.
        let _ = rx.changed().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| (*s).to_owned()).collect()
    }

    #[tokio::test]
    async fn a_turn_waits_for_earlier_turns_of_its_keys_only() {
        let turns = Arc::new(KeyTurns::default());
        let a = turns.take(&keys(&["k1"]));
        let mut other = turns.take(&keys(&["k2"]));
        tokio::time::timeout(Duration::from_secs(1), other.ready())
            .await
            .expect("a turn of another key does not wait");
        assert!(!a.followed("k1"));
        let mut b = turns.take(&keys(&["k1", "k2"]));
        assert!(a.followed("k1") && other.followed("k2") && !b.followed("k1"));
        let mut waiting = tokio::spawn(async move {
            b.ready().await;
            b
        });
        drop(other);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut waiting)
                .await
                .is_err(),
            "b must still wait for a"
        );
        drop(a);
        let b = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("b goes once a is given up")
            .unwrap();
        assert_eq!(turns.busy(), 2);
        let (e1, e2) = (Uuid::new_v4(), Uuid::new_v4());
        b.sent("k1", [e1]);
        assert!(
            b.sent_before([(e1, "k1")]).is_empty(),
            "no later turn: nothing kept"
        );
        let mut c = turns.take(&keys(&["k1"]));
        c.expect([e1, e2]);
        // Another process's event, sent with them: no turn here asks about it.
        let foreign = Uuid::new_v4();
        b.sent("k1", [e1, e2, foreign]);
        assert_eq!(turns.recorded(), 2, "only events a turn expects are kept");
        assert_eq!(c.sent_before([(e1, "k1"), (e2, "k2")]), HashSet::from([e1]));
        assert!(c.sent_before([(e1, "k1")]).is_empty(), "told once");
        let since = Instant::now();
        assert!(b.keep_for_next("k1", Some(7), since) && !b.keep_for_next("k2", Some(9), since));
        assert_eq!(
            c.kept_through(&keys(&["k1", "k2"])),
            HashMap::from([("k1".to_owned(), (7, since))])
        );
        assert!(c.kept_through(&keys(&["k1"])).is_empty(), "told once");
        drop(c);
        drop(b);
        assert_eq!(turns.busy(), 0, "the last turn of a key removes it");
        assert_eq!(turns.recorded(), 0);
        assert!(turns.state.lock().unwrap().expected.is_empty());
    }

    #[tokio::test]
    async fn a_released_key_lets_its_next_turn_go_while_the_others_stay_held() {
        let turns = Arc::new(KeyTurns::default());
        let mut a = turns.take(&keys(&["k1", "k2"]));
        let mut b = turns.take(&keys(&["k1"]));
        let mut c = turns.take(&keys(&["k2"]));
        a.release("k1");
        a.release("k1");
        tokio::time::timeout(Duration::from_secs(1), b.ready())
            .await
            .expect("k1 was given up");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), c.ready())
                .await
                .is_err(),
            "k2 is still held"
        );
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), c.ready())
            .await
            .expect("k2 is given up with the turn");
        drop((b, c));
        assert_eq!(turns.busy(), 0);
    }

    #[tokio::test]
    async fn idle_waits_for_every_turn_taken_before() {
        let turns = Arc::new(KeyTurns::default());
        let a = turns.take(&keys(&["k"]));
        let b = turns.take(&keys(&["k"]));
        let idle = {
            let turns = Arc::clone(&turns);
            tokio::spawn(async move { turns.idle(&keys(&["k"])).await })
        };
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!idle.is_finished(), "b still holds k");
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), idle)
            .await
            .expect("idle once b is given up")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), turns.idle(&keys(&["k"])))
            .await
            .expect("a key with no turn is idle");
    }

    #[test]
    fn a_turn_never_queues_behind_a_later_one_and_open_turns_are_not_waited_for() {
        use futures::FutureExt;
        let turns = Arc::new(KeyTurns::default());
        let mut staging = turns.take_staging(&keys(&["k1"]));
        assert!(
            turns.idle(&keys(&["k1"])).now_or_never().is_some(),
            "a transaction still open is not waited for"
        );
        // A later commit of k1 and k2 queues behind it on k1 ...
        let mut later = turns.take(&keys(&["k1", "k2"]));
        // ... so it may not queue behind that one on k2: each would wait for the other.
        assert_eq!(staging.extend(&keys(&["k2", "k3"])), keys(&["k2"]));
        assert!(staging.ready().now_or_never().is_some(), "k3 was free");
        let mut waiting = Box::pin(later.ready());
        assert!(waiting.as_mut().now_or_never().is_none(), "waits for k1");
        staging.committed();
        drop(staging);
        assert!(waiting.as_mut().now_or_never().is_some());
        assert!(turns.idle(&keys(&["k3"])).now_or_never().is_some());
        assert!(turns.idle(&keys(&["k2"])).now_or_never().is_none());
    }

    #[test]
    fn a_turn_given_up_before_it_waited_gives_the_key_back_to_the_one_before() {
        use futures::FutureExt;
        let turns = Arc::new(KeyTurns::default());
        let running = turns.take(&keys(&["k"]));
        let unused = turns.take(&keys(&["k"]));
        drop(unused);
        let mut next = turns.take(&keys(&["k"]));
        let mut waiting = Box::pin(next.ready());
        assert!(
            waiting.as_mut().now_or_never().is_none(),
            "the next turn waits for the one still running"
        );
        assert!(running.followed("k"));
        drop(running);
        assert!(waiting.as_mut().now_or_never().is_some());
    }
}
