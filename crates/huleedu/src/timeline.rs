//! What the pipeline's consumers received and when. Every event a service handled becomes
//! a [`Hop`]: its topic and key, when it was staged (the envelope's `event_timestamp`,
//! read from the `occurred_at` header) and when its consumer received and handled it.
//! Duplicates are counted both ways: skipped (what the inbox is for) and applied (an event
//! handled a second time by the same consumer, which must never happen).
//!
//! All times are wall-clock UTC: the services run in one process, so staging and
//! consumption are read from the same clock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use outpost::{Outcome, Process, Received};
use tokio::sync::watch;
use uuid::Uuid;

/// One handled event.
#[derive(Debug, Clone, PartialEq)]
pub struct Hop {
    /// The service that consumed it (`els`, `bos`, ...).
    pub consumer: &'static str,
    /// Its HuleEdu topic (the event type, without a run's suffix).
    pub topic: String,
    /// Its partition key.
    pub key: String,
    /// Its event id.
    pub event_id: Uuid,
    /// When it was staged (or, Kafka-first, produced).
    pub staged_at: DateTime<Utc>,
    /// When its consumer started handling it.
    pub received_at: DateTime<Utc>,
    /// When its consumer had settled it: committed, and for a publishing handler, the
    /// events it caused dispatched.
    pub handled_at: DateTime<Utc>,
}

impl Hop {
    /// Staging to consumption.
    pub fn latency(&self) -> Duration {
        (self.received_at - self.staged_at)
            .to_std()
            .unwrap_or_default()
    }
}

/// Latencies of one topic's hop.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicStats {
    /// The HuleEdu topic.
    pub topic: String,
    /// Who consumed it.
    pub consumer: &'static str,
    /// Events handled.
    pub count: usize,
    /// The key, when every event of the topic had the same one; otherwise `None`.
    pub key: Option<String>,
    /// Distinct keys.
    pub keys: usize,
    /// When the first event of the topic was received, from the start of the run.
    pub first_received: Duration,
    /// When the last one was handled, from the start of the run.
    pub last_handled: Duration,
    /// Median time its consumer spent on one (received to handled).
    pub handling_p50: Duration,
    /// Median staging-to-consumption latency.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest.
    pub max: Duration,
}

/// The shared record of one pipeline's consumption (cheap to clone).
#[derive(Debug, Clone)]
pub struct Timeline {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    /// Bumped on every record, so waiters re-check instead of polling.
    changed: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct State {
    hops: Vec<Hop>,
    handled: HashSet<(&'static str, Uuid)>,
    /// Distinct events handled per topic, kept as they come: the run's waiters ask after
    /// every recorded event, and counting by a pass over the hops made that quadratic (a
    /// 1,000-essay run: 8,448 passes over up to 8,448 hops, under the lock every consumer
    /// records through).
    by_topic: HashMap<String, HashSet<Uuid>>,
    skipped: BTreeMap<&'static str, usize>,
    applied: usize,
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

impl Timeline {
    /// An empty timeline.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                changed: watch::Sender::new(0),
            }),
        }
    }

    /// Wraps `inner` so what it settles is recorded as consumed by `consumer`.
    pub fn recorded<P: Process>(&self, consumer: &'static str, inner: P) -> Recorded<P> {
        Recorded {
            inner,
            consumer,
            timeline: self.clone(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(
        &self,
        consumer: &'static str,
        received: &Received,
        received_at: DateTime<Utc>,
        outcome: Outcome,
    ) {
        {
            let mut state = self.state();
            match outcome {
                Outcome::Duplicate => *state.skipped.entry(consumer).or_default() += 1,
                Outcome::Handled => {
                    if !state.handled.insert((consumer, received.event_id)) {
                        state.applied += 1;
                    }
                    let header = |name: &str| received.headers.get(name);
                    let staged_at = header("occurred_at")
                        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                        .map_or(received_at, |t| t.with_timezone(&Utc));
                    let topic = header("event_type")
                        .cloned()
                        .unwrap_or_else(|| received.topic.clone());
                    state
                        .by_topic
                        .entry(topic.clone())
                        .or_default()
                        .insert(received.event_id);
                    state.hops.push(Hop {
                        consumer,
                        topic,
                        key: String::from_utf8_lossy(received.key.as_deref().unwrap_or_default())
                            .into_owned(),
                        event_id: received.event_id,
                        staged_at,
                        received_at,
                        handled_at: Utc::now(),
                    });
                }
            }
        }
        self.inner.changed.send_modify(|v| *v += 1);
    }

    /// Every handled event, in the order they were handled.
    pub fn hops(&self) -> Vec<Hop> {
        self.state().hops.clone()
    }

    /// Distinct events of `topic` handled.
    pub fn count(&self, topic: &str) -> usize {
        self.state().by_topic.get(topic).map_or(0, HashSet::len)
    }

    /// Distinct events handled, all topics.
    pub fn distinct_events(&self) -> usize {
        self.state().handled.len()
    }

    /// Duplicates the consumers recognised and skipped.
    pub fn duplicates_skipped(&self) -> usize {
        self.state().skipped.values().sum()
    }

    /// Duplicates `consumer` recognised and skipped.
    pub fn duplicates_skipped_by(&self, consumer: &str) -> usize {
        self.state().skipped.get(consumer).copied().unwrap_or(0)
    }

    /// Events a consumer handled a second time (their effect applied twice); always 0
    /// behind an inbox.
    pub fn duplicates_applied(&self) -> usize {
        self.state().applied
    }

    /// A receiver that changes whenever something is recorded.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Waits until `check` holds, re-checking whenever something is recorded.
    ///
    /// # Errors
    /// [`Error::Timeout`](crate::Error::Timeout) naming `what` once `timeout` has passed.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&Self) -> bool,
    ) -> crate::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.inner.changed.subscribe();
        loop {
            changes.borrow_and_update();
            if check(self) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(crate::Error::Timeout {
                    what: what.to_owned(),
                    waited: timeout,
                });
            }
        }
    }

    /// Latencies per topic for the events staged since `start`, in the order each topic
    /// was first received.
    pub fn stats(&self, start: DateTime<Utc>) -> Vec<TopicStats> {
        let hops = self.hops();
        let mut by_topic: BTreeMap<&str, Vec<&Hop>> = BTreeMap::new();
        for hop in hops.iter().filter(|h| h.staged_at >= start) {
            by_topic.entry(hop.topic.as_str()).or_default().push(hop);
        }
        let mut stats: Vec<TopicStats> = by_topic
            .into_iter()
            .map(|(topic, hops)| {
                let mut latencies: Vec<Duration> = hops.iter().map(|h| h.latency()).collect();
                latencies.sort();
                let keys: HashSet<&str> = hops.iter().map(|h| h.key.as_str()).collect();
                let first = hops.iter().map(|h| h.received_at).min().unwrap_or(start);
                let last = hops.iter().map(|h| h.handled_at).max().unwrap_or(start);
                let mut handling: Vec<Duration> = hops
                    .iter()
                    .map(|h| (h.handled_at - h.received_at).to_std().unwrap_or_default())
                    .collect();
                handling.sort();
                TopicStats {
                    topic: topic.to_owned(),
                    consumer: hops[0].consumer,
                    count: hops.len(),
                    key: (keys.len() == 1).then(|| hops[0].key.clone()),
                    keys: keys.len(),
                    first_received: (first - start).to_std().unwrap_or_default(),
                    last_handled: (last - start).to_std().unwrap_or_default(),
                    handling_p50: percentile(&handling, 0.50),
                    p50: percentile(&latencies, 0.50),
                    p99: percentile(&latencies, 0.99),
                    max: latencies.last().copied().unwrap_or_default(),
                }
            })
            .collect();
        stats.sort_by_key(|s| s.first_received);
        stats
    }
}

/// Nearest-rank percentile of an ascending slice (zero when empty).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = (sorted.len() as f64 * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A [`Process`] that records what the process it wraps settled.
#[derive(Debug)]
pub struct Recorded<P> {
    inner: P,
    consumer: &'static str,
    timeline: Timeline,
}

impl<P: Process> Process for Recorded<P> {
    async fn process(&self, received: &Received) -> outpost::Result<Outcome> {
        let received_at = Utc::now();
        let outcome = self.inner.process(received).await?;
        self.timeline
            .record(self.consumer, received, received_at, outcome);
        Ok(outcome)
    }

    /// Each message of the unit is recorded as received when the unit started.
    async fn process_together(
        &self,
        received: &[Received],
    ) -> Option<outpost::Result<Vec<Outcome>>> {
        let received_at = Utc::now();
        let outcomes = self.inner.process_together(received).await?;
        if let Ok(outcomes) = &outcomes {
            for (received, outcome) in received.iter().zip(outcomes) {
                self.timeline
                    .record(self.consumer, received, received_at, *outcome);
            }
        }
        Some(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ms = |n| Duration::from_millis(n);
        let sorted: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&sorted, 0.50), ms(50));
        assert_eq!(percentile(&sorted, 0.99), ms(99));
        assert_eq!(percentile(&[ms(7)], 0.99), ms(7));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    fn received(id: Uuid, topic: &str, key: &str) -> Received {
        Received {
            group_id: "g".into(),
            topic: format!("{topic}.run1"),
            partition: 0,
            offset: 0,
            key: Some(key.as_bytes().to_vec()),
            headers: [
                ("event_type".to_owned(), topic.to_owned()),
                (
                    "occurred_at".to_owned(),
                    "2025-07-28T12:00:00.000000Z".to_owned(),
                ),
            ]
            .into(),
            payload: Vec::new(),
            event_id: id,
        }
    }

    #[test]
    fn records_hops_and_counts_duplicates() {
        let timeline = Timeline::new();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let at = Utc::now();
        timeline.record("els", &received(a, "t.v1", "k1"), at, Outcome::Handled);
        timeline.record("els", &received(b, "t.v1", "k1"), at, Outcome::Handled);
        timeline.record("els", &received(a, "t.v1", "k1"), at, Outcome::Duplicate);
        assert_eq!(timeline.count("t.v1"), 2);
        assert_eq!(timeline.duplicates_skipped_by("els"), 1);
        assert_eq!(timeline.duplicates_applied(), 0);
        timeline.record("els", &received(a, "t.v1", "k1"), at, Outcome::Handled);
        assert_eq!(timeline.duplicates_applied(), 1);
        // Counts are of distinct events, whoever handled them and however often.
        timeline.record("bos", &received(b, "t.v1", "k1"), at, Outcome::Handled);
        assert_eq!(timeline.count("t.v1"), 2);
        assert_eq!(timeline.count("other.v1"), 0);
        let hop = &timeline.hops()[0];
        assert_eq!(
            hop.topic, "t.v1",
            "the suffix-free event type, not the run's topic"
        );
        assert_eq!(hop.key, "k1");
        let start = "2025-07-28T11:59:59Z".parse().unwrap();
        let stats = timeline.stats(start);
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].key.as_deref(), Some("k1"));
        assert_eq!(stats[0].count, 4);
    }
}
