//! Sending: queue owned keys' rows with the producer, many per key, within the caps on
//! rows and bytes in flight, and collect the acknowledgements as they come.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use tokio::sync::mpsc;

use crate::error::ErrorClass;
use crate::kafka::acks::{AckTo, Report};
use crate::kafka::producer::{Acked, KafkaProducer, PendingAck, Queued, SendFailure};
use crate::outbox::store::ClaimedEvent;

use super::claiming::Keys;

/// A finished send.
#[derive(Debug)]
pub(crate) struct Sent {
    pub(crate) event: ClaimedEvent,
    pub(crate) result: Result<Acked, SendFailure>,
}

/// The sends in flight.
pub(crate) struct Sender {
    producer: Arc<KafkaProducer>,
    /// Rows queued with the producer, by the tag their reports come back with (the index;
    /// freed slots are reused).
    queued: Vec<Option<(ClaimedEvent, Queued)>>,
    free: Vec<usize>,
    reports: mpsc::UnboundedReceiver<Report>,
    report_to: mpsc::UnboundedSender<Report>,
    /// Rows the producer refused before queueing: finished at once, as failed sends.
    refused: VecDeque<Sent>,
    /// Rows queued or refused and not handed back by [`Self::next`] yet.
    rows: usize,
    bytes: usize,
    max_rows: usize,
    max_bytes: usize,
    per_key: usize,
    /// librdkafka's queue was full: nothing is queued until an ack of ours or this instant,
    /// whichever comes first. The queue is shared (the eager path, other services' relays):
    /// with none of our own sends in flight no ack of ours would ever come.
    queue_full: Option<Instant>,
}

/// How long a `QueueFull` refusal holds queueing back when no ack of ours frees room first.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(10);

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("rows", &self.rows)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Sender {
    pub(crate) fn new(
        producer: Arc<KafkaProducer>,
        max_rows: usize,
        max_bytes: usize,
        per_key: usize,
    ) -> Self {
        let (report_to, reports) = mpsc::unbounded_channel();
        Self {
            producer,
            queued: Vec::new(),
            free: Vec::new(),
            reports,
            report_to,
            refused: VecDeque::new(),
            rows: 0,
            bytes: 0,
            max_rows,
            max_bytes,
            per_key,
            queue_full: None,
        }
    }

    /// Room for more rows (claims and fetches stop asking when there is none).
    pub(crate) fn room(&self) -> usize {
        if self.bytes >= self.max_bytes {
            return 0;
        }
        self.max_rows.saturating_sub(self.rows)
    }

    /// Payload bytes queued or refused and not handed back yet.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// While librdkafka's queue was full: when to try queueing again (the engine wakes then,
    /// acks or not).
    pub(crate) fn blocked_until(&self) -> Option<Instant> {
        self.queue_full
    }

    /// Queues rows of `send` keys in order, while the caps allow and `until` (the last
    /// moment a send may start within the lease) has not passed. Keys it could not finish
    /// are marked to be looked at again.
    pub(crate) fn pump(&mut self, keys: &mut Keys, send: &[String], until: Instant) {
        let now = Instant::now();
        if self.queue_full.is_some_and(|retry| retry <= now) {
            self.queue_full = None;
        }
        for (i, key) in send.iter().enumerate() {
            // A refused row of the key is not looked at yet: had it to be retried, a later
            // row queued now would land ahead of it. Its review comes with its outcome.
            if self.refused.iter().any(|r| r.event.event_key == *key) {
                continue;
            }
            let Some(state) = keys.queue(key) else {
                continue;
            };
            let mut blocked = false;
            // Held back behind its rows in flight: for another topic, or on a producer
            // instance since replaced or purged (see below). Their reports bring it back.
            let mut held = false;
            let (mut taken, mut taken_bytes) = (0, 0);
            while state.in_flight < self.per_key && state.failure.is_none() {
                if self.queue_full.is_some() || self.room() == 0 || Instant::now() >= until {
                    blocked = true;
                    break;
                }
                let Some(event) = state.queued.pop_front() else {
                    break;
                };
                // Rows of a key in flight go to one topic. librdkafka keeps order within a
                // partition only: a row failing for its own topic alone (one that does not
                // exist: retriable, nothing purged) leaves a later row of its key for
                // another topic free to land ahead of its retry. On one topic the later row
                // fails with it. The key goes on once the rows in flight resolve.
                if state.in_flight > 0 && state.sent_to != event.topic {
                    state.queued.push_front(event);
                    held = true;
                    break;
                }
                taken += 1;
                taken_bytes += event.payload.len();
                let tag = self.free.last().copied().unwrap_or(self.queued.len());
                let on = (state.in_flight > 0).then_some(state.sent_on);
                match enqueue_reported(self, &event, tag, on) {
                    // Rows of the key are still out on a producer instance since replaced (a
                    // rebuild after another key's failure), or a purge ran since they were
                    // queued (it may have failed them, unknown here yet): the next wait for
                    // them, or they could land ahead of those, which may yet fail. The key is
                    // looked at again as their reports come in, not at every pass before.
                    Ok(None) => {
                        taken -= 1;
                        taken_bytes -= event.payload.len();
                        state.queued.push_front(event);
                        held = true;
                        break;
                    }
                    Err(failure) if is_queue_full(&failure) => {
                        taken -= 1;
                        taken_bytes -= event.payload.len();
                        state.queued.push_front(event);
                        self.queue_full = Some(Instant::now() + QUEUE_FULL_RETRY);
                        blocked = true;
                        break;
                    }
                    Ok(Some(queued)) => {
                        tracing::trace!(target: "outpost::send", id = event.id, key = %event.event_key, "produced");
                        state.sent_on = queued.token();
                        if state.in_flight == 0 {
                            state.sent_to.clone_from(&event.topic);
                        }
                        self.bytes += event.payload.len();
                        if tag == self.queued.len() {
                            self.queued.push(Some((event, queued)));
                        } else {
                            self.free.pop();
                            self.queued[tag] = Some((event, queued));
                        }
                    }
                    // Refused before queueing: handled like a failed ack, and nothing more
                    // of the key is queued before that (see above).
                    Err(failure) => {
                        self.bytes += event.payload.len();
                        self.refused.push_back(Sent {
                            event,
                            result: Err(failure),
                        });
                        state.in_flight += 1;
                        self.rows += 1;
                        break;
                    }
                }
                state.in_flight += 1;
                self.rows += 1;
            }
            if state.queued.is_empty() {
                // A drained queue hands its buffer back: thousands of keys each keeping the
                // buffer of its largest read held most of the relay's memory (heaptrack of a
                // 1M-row, 10,000-key drain: 33 of 48 MB).
                state.queued = std::collections::VecDeque::new();
            }
            keys.took(taken, taken_bytes);
            if blocked {
                send[i..].iter().for_each(|k| keys.touch(k));
                return;
            }
            if !held {
                keys.touch(key);
            }
        }
    }

    /// The next finished send; pending forever when nothing is in flight. Cancel-safe: a
    /// report is taken only where it is handed back.
    pub(crate) async fn next(&mut self) -> Sent {
        loop {
            if let Some(sent) = self.refused.pop_front() {
                return self.finished(sent);
            }
            if self.rows == 0 {
                std::future::pending::<()>().await;
            }
            // The sender half lives in `self`: the channel never closes while it waits.
            let Some((tag, landed)) = self.reports.recv().await else {
                std::future::pending::<()>().await;
                continue;
            };
            let Some((event, queued)) = self.queued.get_mut(tag).and_then(Option::take) else {
                continue; // not ours: cannot happen, tags come from `pump`
            };
            self.free.push(tag);
            let result = self.producer.reported(&queued, landed);
            return self.finished(Sent { event, result });
        }
    }

    fn finished(&mut self, sent: Sent) -> Sent {
        self.rows -= 1;
        self.bytes = self.bytes.saturating_sub(sent.event.payload.len());
        self.queue_full = None;
        sent
    }

    /// A finished send if one is ready now.
    pub(crate) fn ready(&mut self) -> Option<Sent> {
        futures::FutureExt::now_or_never(self.next())
    }
}

/// Queues one claimed row with `producer` (see [`KafkaProducer::enqueue`]), only with the
/// instance of generation `on` if given (`Ok(None)` when it was replaced); returns the
/// wait for its ack and the generation it went to. A row whose stored headers do not parse
/// fails permanently, before anything is queued: it is parked, and its key goes on.
pub(crate) fn enqueue(
    producer: &Arc<KafkaProducer>,
    event: &ClaimedEvent,
    on: Option<u64>,
) -> Result<Option<(PendingAck, u64)>, SendFailure> {
    let headers = headers_of(event)?;
    producer.enqueue_headers(&event.topic, &event.event_key, &event.payload, headers, on)
}

/// Queues one claimed row like [`enqueue`], its report going to the sender's stream; only
/// with the producer instance of generation `on` if given (see
/// [`KafkaProducer::enqueue_reported`]).
fn enqueue_reported(
    sender: &Sender,
    event: &ClaimedEvent,
    tag: usize,
    on: Option<u64>,
) -> Result<Option<Queued>, SendFailure> {
    let headers = headers_of(event)?;
    sender.producer.enqueue_reported(
        &event.topic,
        &event.event_key,
        &event.payload,
        headers,
        || AckTo::stream(tag, &sender.report_to),
        on,
    )
}

/// The row's Kafka headers, built straight from the stored text (see
/// [`StoredHeaders::each`](crate::outbox::headers::StoredHeaders::each)).
fn headers_of(event: &ClaimedEvent) -> Result<OwnedHeaders, SendFailure> {
    // Room for the envelope's headers (event id, type, trace and content type) without
    // growing; more still fit.
    let mut headers = Some(OwnedHeaders::new_with_capacity(4));
    let built = event.headers.each(|key, value| {
        headers = headers.take().map(|h| {
            h.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        });
    });
    built.map(|()| headers.unwrap_or_default()).map_err(|e| {
        tracing::warn!(id = event.id, event_id = %event.event_id, error = %e, "cannot produce a row");
        SendFailure {
            class: ErrorClass::Permanent,
            error: rdkafka::error::KafkaError::MessageProduction(
                rdkafka::types::RDKafkaErrorCode::BadMessage,
            ),
        }
    })
}

fn is_queue_full(failure: &SendFailure) -> bool {
    failure.error.rdkafka_error_code() == Some(rdkafka::error::RDKafkaErrorCode::QueueFull)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::producer::tests::stalled;
    use crate::outbox::store::ClaimedKey;
    use crate::relay::claiming::tests::row;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    /// Rows of a key still out on a replaced producer instance hold its next rows back
    /// until they resolve: on the new instance (a new producer id) the broker would not
    /// keep them in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_sends_nothing_on_a_new_producer_while_rows_of_it_are_out_on_the_old_one() {
        let (_cluster, producer) = stalled(&["t"]);
        let mut sender = Sender::new(Arc::clone(&producer), 100, 1 << 20, 2);
        let mut keys = Keys::default();
        let rows = (1..=4).map(row).collect();
        keys.claimed(
            vec![ClaimedKey {
                key: "k".into(),
                rows,
            }],
            10,
        );
        let send = ["k".to_owned()];
        let until = Instant::now() + Duration::from_secs(60);
        let in_flight = |keys: &mut Keys| keys.queue("k").unwrap().in_flight;

        sender.pump(&mut keys, &send, until);
        assert_eq!(in_flight(&mut keys), 2);
        producer.rebuild(
            0,
            &KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
        );
        // One of the two resolved; the other is still out on the replaced instance.
        keys.queue("k").unwrap().in_flight = 1;
        sender.pump(&mut keys, &send, until);
        assert_eq!(
            in_flight(&mut keys),
            1,
            "nothing queued on the new instance"
        );
        assert_eq!(keys.queue("k").unwrap().queued.len(), 2);
        assert_eq!(keys.queued_rows(), 2);

        keys.queue("k").unwrap().in_flight = 0;
        sender.pump(&mut keys, &send, until);
        assert_eq!(in_flight(&mut keys), 2, "sent once the old rows resolved");
        assert_eq!(
            keys.queue("k").unwrap().sent_on,
            1 << 32,
            "the new instance's token"
        );
        producer.purge_queued();
    }

    /// Rows of a key in flight are all for one topic: a row failing for its topic alone
    /// (retriable: it does not exist) must not let a later row of the key for another topic
    /// land first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_has_rows_in_flight_for_one_topic_at_a_time() {
        let (_cluster, producer) = stalled(&["t", "u"]);
        let mut sender = Sender::new(Arc::clone(&producer), 100, 1 << 20, 10);
        let mut keys = Keys::default();
        let topics = ["t", "t", "u", "u", "t"];
        let rows = (1..=5)
            .map(|id| ClaimedEvent {
                topic: topics[id as usize - 1].into(),
                ..row(id)
            })
            .collect();
        keys.claimed(
            vec![ClaimedKey {
                key: "k".into(),
                rows,
            }],
            10,
        );
        let send = ["k".to_owned()];
        let until = Instant::now() + Duration::from_secs(60);
        let mut sent = Vec::new();
        for in_flight in [2, 2, 1] {
            sender.pump(&mut keys, &send, until);
            let state = keys.queue("k").unwrap();
            assert_eq!(state.in_flight, in_flight, "after {sent:?}");
            sent.push(state.sent_to.clone());
            // Nothing more while they are out, whatever their number.
            sender.pump(&mut keys, &send, until);
            assert_eq!(keys.queue("k").unwrap().in_flight, in_flight);
            // They resolve.
            keys.queue("k").unwrap().in_flight = 0;
        }
        assert_eq!(sent, ["t", "u", "t"]);
        assert!(keys.queue("k").unwrap().queued.is_empty());
        producer.purge_queued();
    }
}
