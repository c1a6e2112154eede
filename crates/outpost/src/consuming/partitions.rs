//! Partitions: the per-partition queues of a running [`Consumer`](super::consumer::Consumer).
//!
//! Each assigned partition's messages wait in a queue of their own and are handled in
//! order by at most one worker at a time; workers of different partitions run at once, up
//! to a limit. A partition waiting out a retry backoff holds no worker, and one holding its
//! buffer's worth of messages (queued or in its worker's hands) is paused at the broker until
//! half of them were handled, so neither slows the other partitions down, and a partition
//! that keeps failing holds no more than its buffer, however long it retries.
//! A revoked partition's queue is dropped and its worker stops after the message in hand,
//! whose offset can then no longer be stored: its new owner receives it again.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// A partition: topic and number.
pub(crate) type Key = (String, i32);

/// Records revocations for the consumer loop (librdkafka calls it while the loop polls).
#[derive(Debug, Default)]
pub(crate) struct Rebalancing {
    revoked: Mutex<Vec<Key>>,
    notify: Notify,
}

impl Rebalancing {
    /// Resolves once partitions were revoked since the last [`Self::take`].
    pub(crate) async fn revoked(&self) {
        self.notify.notified().await;
    }

    /// The partitions revoked since the last call.
    pub(crate) fn take(&self) -> Vec<Key> {
        std::mem::take(&mut *self.revoked.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl ClientContext for Rebalancing {}

impl ConsumerContext for Rebalancing {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // librdkafka keeps a pause across unassign, and the queue that would have resumed
            // it is dropped: a partition assigned back would never be fetched again.
            if let Err(e) = consumer.resume(tpl) {
                warn!(error = %e, "could not resume revoked partitions");
            }
            let keys: Vec<Key> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            self.revoked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(keys);
            self.notify.notify_one();
        }
    }
}

/// Work handed to a worker: a partition's queued messages, oldest first.
pub(crate) struct Batch {
    pub(crate) key: Key,
    pub(crate) generation: u64,
    pub(crate) messages: VecDeque<OwnedMessage>,
    /// Failed attempts of the first message so far.
    pub(crate) attempts: u32,
    /// Set when the partition is revoked or the consumer stops.
    pub(crate) cancel: CancellationToken,
}

/// How a worker's run over a batch ended.
pub(crate) enum Ended {
    /// Every message was settled.
    Done,
    /// The first of `rest` failed `attempts` times: try it again after `delay`.
    Retry {
        rest: VecDeque<OwnedMessage>,
        attempts: u32,
        delay: Duration,
    },
    /// Stopped early (revoked, or shutting down) after the message in hand.
    Cancelled,
}

struct Partition {
    generation: u64,
    queue: VecDeque<OwnedMessage>,
    /// Failed attempts of the queue's first message.
    attempts: u32,
    /// Messages handed to the running worker.
    in_hand: usize,
    /// The running worker's token.
    running: Option<CancellationToken>,
    /// Waiting out a retry backoff.
    backing_off: bool,
    paused: bool,
    /// Highest offset queued: a copy fetched again (after a pause) is dropped.
    last_offset: i64,
}

/// The partitions of a running consumer and their queues.
pub(crate) struct Partitions {
    parts: HashMap<Key, Partition>,
    /// Partitions with queued messages and no worker, in the order they became ready.
    ready: VecDeque<Key>,
    /// Revoked partitions whose worker is still finishing its message: a new assignment of
    /// the partition waits for it, so one partition never has two workers.
    finishing: HashMap<Key, u64>,
    buffer: usize,
    next_generation: u64,
}

impl Partitions {
    /// `buffer`: messages queued per partition before it is paused.
    pub(crate) fn new(buffer: usize) -> Self {
        Self {
            parts: HashMap::new(),
            ready: VecDeque::new(),
            finishing: HashMap::new(),
            buffer,
            next_generation: 0,
        }
    }

    /// Queues a received message; pauses its partition when the queue is full.
    pub(crate) fn push<C: rdkafka::consumer::Consumer<X>, X: ConsumerContext>(
        &mut self,
        msg: OwnedMessage,
        consumer: &C,
    ) {
        let key = (msg.topic().to_owned(), msg.partition());
        let generation = &mut self.next_generation;
        let part = self.parts.entry(key.clone()).or_insert_with(|| {
            *generation += 1;
            Partition {
                generation: *generation,
                queue: VecDeque::new(),
                attempts: 0,
                in_hand: 0,
                running: None,
                backing_off: false,
                paused: false,
                last_offset: -1,
            }
        });
        if msg.offset() <= part.last_offset {
            debug!(
                topic = key.0,
                partition = key.1,
                offset = msg.offset(),
                "copy of a queued message dropped"
            );
            return;
        }
        part.last_offset = msg.offset();
        let was_idle = part.queue.is_empty() && part.running.is_none() && !part.backing_off;
        part.queue.push_back(msg);
        if was_idle && !self.finishing.contains_key(&key) {
            self.ready.push_back(key.clone());
        }
        part.hold_back(consumer, &key, self.buffer);
    }

    /// The next partition to hand to a worker, with its queued messages.
    pub(crate) fn next_batch<C: rdkafka::consumer::Consumer<X>, X: ConsumerContext>(
        &mut self,
        consumer: &C,
    ) -> Option<Batch> {
        while let Some(key) = self.ready.pop_front() {
            let Some(part) = self.parts.get_mut(&key) else {
                continue;
            };
            // A revoked partition's entry can outlive it here; its new assignment waits for
            // the old worker, which puts it back in line when it ends.
            if part.queue.is_empty()
                || part.running.is_some()
                || part.backing_off
                || self.finishing.contains_key(&key)
            {
                continue;
            }
            let cancel = CancellationToken::new();
            part.running = Some(cancel.clone());
            // Half the buffer at most: the messages stay held until the worker is done with
            // them (a batch that fails goes back whole, ahead of whatever was fetched
            // meanwhile), so with more in hand the partition would stay paused until the
            // whole batch was handled, and its worker would then wait for a fetch.
            let take = part.queue.len().min((self.buffer / 2).max(1));
            let messages: VecDeque<OwnedMessage> = part.queue.drain(..take).collect();
            part.in_hand = messages.len();
            part.hold_back(consumer, &key, self.buffer);
            return Some(Batch {
                key,
                generation: part.generation,
                messages,
                attempts: std::mem::take(&mut part.attempts),
                cancel,
            });
        }
        None
    }

    /// A worker finished its batch. Returns the backoff to wait before the partition's
    /// next try, when its first message failed.
    pub(crate) fn ended<C: rdkafka::consumer::Consumer<X>, X: ConsumerContext>(
        &mut self,
        key: &Key,
        generation: u64,
        ended: Ended,
        consumer: &C,
    ) -> Option<Duration> {
        if self.finishing.get(key) == Some(&generation) {
            self.finishing.remove(key);
            if self.parts.get(key).is_some_and(|p| !p.queue.is_empty()) {
                self.ready.push_back(key.clone());
            }
            return None;
        }
        let part = self
            .parts
            .get_mut(key)
            .filter(|p| p.generation == generation)?;
        part.running = None;
        part.in_hand = 0;
        let delay = match ended {
            Ended::Done | Ended::Cancelled => {
                if !part.queue.is_empty() {
                    self.ready.push_back(key.clone());
                }
                None
            }
            Ended::Retry {
                mut rest,
                attempts,
                delay,
            } => {
                rest.append(&mut part.queue);
                part.queue = rest;
                part.attempts = attempts;
                part.backing_off = true;
                Some(delay)
            }
        };
        part.hold_back(consumer, key, self.buffer);
        delay
    }

    /// A partition's retry backoff is over.
    pub(crate) fn due(&mut self, key: &Key, generation: u64) {
        if let Some(part) = self.parts.get_mut(key) {
            if part.generation == generation && part.backing_off {
                part.backing_off = false;
                self.ready.push_back(key.clone());
            }
        }
    }

    /// Drops what is queued for revoked partitions; their workers stop after the message
    /// in hand.
    pub(crate) fn revoke(&mut self, keys: Vec<Key>) {
        for key in keys {
            let Some(part) = self.parts.remove(&key) else {
                continue;
            };
            debug!(
                topic = key.0,
                partition = key.1,
                dropped = part.queue.len(),
                "partition revoked"
            );
            if let Some(cancel) = part.running {
                cancel.cancel();
                self.finishing.insert(key, part.generation);
            }
        }
    }

    /// Stops every worker after its message in hand (shutdown).
    pub(crate) fn cancel_all(&mut self) {
        for part in self.parts.values() {
            if let Some(cancel) = &part.running {
                cancel.cancel();
            }
        }
        self.ready.clear();
    }

    /// Messages queued over all partitions.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.parts.values().map(|p| p.queue.len()).sum()
    }
}

impl Partition {
    /// Messages held: queued, or in the worker's hands.
    fn held(&self) -> usize {
        self.in_hand + self.queue.len()
    }

    /// Pauses fetching once `buffer` messages are held, and resumes it once no more than
    /// half of that are.
    fn hold_back<C: rdkafka::consumer::Consumer<X>, X: ConsumerContext>(
        &mut self,
        consumer: &C,
        key: &Key,
        buffer: usize,
    ) {
        if !self.paused && self.held() >= buffer {
            self.paused = set_paused(consumer, key, true);
        } else if self.paused && self.held() <= buffer / 2 {
            self.paused = !set_paused(consumer, key, false);
        }
    }
}

/// Pauses or resumes fetching one partition; returns whether it took effect.
fn set_paused<C: rdkafka::consumer::Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    (topic, partition): &Key,
    pause: bool,
) -> bool {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, *partition);
    let done = if pause {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    match done {
        Ok(()) => true,
        Err(e) => {
            // Not assigned any more (a revocation is on its way): nothing to hold back.
            warn!(topic, partition, pause, error = %e, "could not pause or resume a partition");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::message::Timestamp;
    use rdkafka::ClientConfig;

    fn msg(partition: i32, offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"x".to_vec()),
            None,
            "t".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    fn consumer() -> BaseConsumer {
        // Never connects: pausing an unassigned partition only fails, which is logged.
        ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "unit")
            .create()
            .unwrap()
    }

    #[test]
    fn one_worker_per_partition_in_offset_order_and_a_retry_holds_back_only_its_partition() {
        let c = consumer();
        let mut p = Partitions::new(100);
        p.push(msg(0, 1), &c);
        p.push(msg(0, 2), &c);
        p.push(msg(1, 7), &c);
        let a = p.next_batch(&c).unwrap();
        let b = p.next_batch(&c).unwrap();
        assert!(p.next_batch(&c).is_none(), "each partition has one worker");
        assert_eq!(a.key.1, 0);
        let offsets: Vec<i64> = a.messages.iter().map(OwnedMessage::offset).collect();
        assert_eq!(offsets, vec![1, 2]);
        p.push(msg(0, 3), &c);
        p.push(msg(0, 2), &c); // fetched again after a pause: dropped
        assert!(p.next_batch(&c).is_none(), "partition 0 is busy");
        let delay = p.ended(
            &a.key,
            a.generation,
            Ended::Retry {
                rest: a.messages,
                attempts: 1,
                delay: Duration::from_millis(5),
            },
            &c,
        );
        assert_eq!(delay, Some(Duration::from_millis(5)));
        assert_eq!(p.ended(&b.key, b.generation, Ended::Done, &c), None);
        p.push(msg(1, 8), &c);
        let next = p.next_batch(&c).unwrap();
        assert_eq!(next.key.1, 1, "partition 1 goes on while 0 backs off");
        assert!(p.next_batch(&c).is_none());
        p.due(&a.key, a.generation);
        let again = p.next_batch(&c).unwrap();
        let offsets: Vec<i64> = again.messages.iter().map(OwnedMessage::offset).collect();
        assert_eq!(
            offsets,
            vec![1, 2, 3],
            "the failed message first, nothing lost"
        );
        assert_eq!(again.attempts, 1);
    }

    #[test]
    fn a_revoked_partition_drops_its_queue_and_a_new_assignment_waits_for_the_old_worker() {
        let c = consumer();
        let mut p = Partitions::new(100);
        p.push(msg(0, 1), &c);
        let old = p.next_batch(&c).unwrap();
        p.push(msg(0, 2), &c);
        p.revoke(vec![old.key.clone()]);
        assert!(old.cancel.is_cancelled());
        assert_eq!(p.queued(), 0);
        p.push(msg(0, 1), &c); // the new assignment starts at the committed offset
        assert!(p.next_batch(&c).is_none(), "the old worker still runs");
        assert_eq!(
            p.ended(&old.key, old.generation, Ended::Cancelled, &c),
            None
        );
        let new = p.next_batch(&c).unwrap();
        assert_ne!(new.generation, old.generation);
        assert_eq!(new.messages.len(), 1);
    }

    #[test]
    fn a_partition_ready_before_a_revocation_waits_for_its_old_worker_too() {
        let c = consumer();
        let mut p = Partitions::new(100);
        // Revoked while ready: its place in the ready queue outlives it.
        p.push(msg(0, 1), &c);
        p.revoke(vec![("t".into(), 0)]);
        p.push(msg(0, 1), &c);
        let old = p.next_batch(&c).unwrap();
        p.revoke(vec![old.key.clone()]);
        p.push(msg(0, 1), &c);
        assert!(p.next_batch(&c).is_none(), "the old worker still runs");
        assert_eq!(
            p.ended(&old.key, old.generation, Ended::Cancelled, &c),
            None
        );
        assert!(p.next_batch(&c).is_some());
    }

    #[test]
    fn a_partition_that_keeps_failing_holds_no_more_than_its_buffer() {
        // Assigned, so pausing takes effect (locally: it never connects).
        let c = consumer();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("t", 0);
        c.assign(&tpl).unwrap();
        let key: Key = ("t".into(), 0);
        let buffer = 5;
        let mut p = Partitions::new(buffer);
        let mut next = 0;
        // What the broker delivers while the partition is fetched.
        let mut fetch = |p: &mut Partitions| {
            while !p.parts.get(&key).is_some_and(|part| part.paused) {
                assert!(next < 1_000, "never paused");
                p.push(msg(0, next), &c);
                next += 1;
            }
        };
        fetch(&mut p);
        for _ in 0..5 {
            let batch = p.next_batch(&c).unwrap();
            fetch(&mut p);
            let held = batch.messages.len() + p.queued();
            assert!(held <= buffer, "{held} messages held, buffer {buffer}");
            assert_eq!(batch.messages[0].offset(), 0, "the failed message first");
            p.ended(
                &batch.key,
                batch.generation,
                Ended::Retry {
                    rest: batch.messages,
                    attempts: 1,
                    delay: Duration::ZERO,
                },
                &c,
            );
            p.due(&key, batch.generation);
        }
        // Once it goes through, fetching resumes with half the buffer held, before the
        // worker has run out of messages.
        let mut handled = Vec::new();
        loop {
            let batch = p.next_batch(&c).unwrap();
            handled.extend(batch.messages.iter().map(OwnedMessage::offset));
            p.ended(&batch.key, batch.generation, Ended::Done, &c);
            if !p.parts[&key].paused {
                break;
            }
        }
        assert!(p.queued() > 0, "resumed only once the worker ran dry");
        fetch(&mut p);
        handled.extend(p.parts[&key].queue.iter().map(OwnedMessage::offset));
        assert_eq!(handled, (0..next).collect::<Vec<_>>(), "nothing skipped");
    }
}
