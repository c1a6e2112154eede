//! Acks: a librdkafka producer whose delivery reports resolve futures, served by a thread
//! that polls for one second at a time.
//!
//! rust-rdkafka's `FutureProducer` serves its reports from a thread calling
//! `BaseProducer::poll(100 ms)` in a loop, and that poll turns the time left to its deadline
//! into whole milliseconds: for the last millisecond of every call it polls with a zero
//! timeout, in a loop. Every producer so spent 1 % of a core, idle or not (an idle relay: 10
//! ticks in 10 s, all on that thread; librdkafka fixed the same bug in its own main loop,
//! #4671). Polling for a second at a time leaves that millisecond once a second (0.1 %);
//! a report is still served as soon as it arrives.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, ProducerContext};
use tokio::sync::{mpsc, oneshot};

/// Where a message landed: partition and offset.
pub(crate) type Landed = (i32, i64);

/// The wait for one message's delivery report.
pub(crate) type AckReceiver = oneshot::Receiver<Result<Landed, KafkaError>>;

/// A delivery report tagged with the number its message was queued with (see
/// [`AckTo::stream`]).
pub(crate) type Report = (usize, Result<Landed, KafkaError>);

/// Where a message's delivery report goes.
pub(crate) enum AckTo {
    /// The future of one message.
    Once(Option<oneshot::Sender<Result<Landed, KafkaError>>>),
    /// A stream shared by many messages: one channel send per report, where a future per
    /// message cost a relay a fifth of its CPU (allocations, wake-ups and polls of the set of
    /// futures). Dropped unreported (librdkafka never delivers a report for it), it reports
    /// `Canceled`, as a dropped `Once` does.
    Stream(usize, Option<mpsc::UnboundedSender<Report>>),
}

impl AckTo {
    /// The report goes to `to`, tagged with `tag`.
    pub(crate) fn stream(tag: usize, to: &mpsc::UnboundedSender<Report>) -> Self {
        AckTo::Stream(tag, Some(to.clone()))
    }

    fn report(mut self, landed: Result<Landed, KafkaError>) {
        match &mut self {
            AckTo::Once(ack) => {
                if let Some(ack) = ack.take() {
                    // The wait may have been dropped (a caller that gave up): nothing to tell.
                    let _ = ack.send(landed);
                }
            }
            AckTo::Stream(tag, to) => {
                if let Some(to) = to.take() {
                    let _ = to.send((*tag, landed));
                }
            }
        }
    }

    /// The message was refused before it was queued: its caller has the error already.
    fn disarm(&mut self) {
        if let AckTo::Stream(_, to) = self {
            *to = None;
        }
    }
}

impl Drop for AckTo {
    fn drop(&mut self) {
        if let AckTo::Stream(tag, Some(to)) = self {
            let _ = to.send((*tag, Err(KafkaError::Canceled)));
        }
    }
}

/// Sends each message's delivery report where its [`AckTo`] says.
pub(crate) struct AckContext;

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<AckTo>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Self::DeliveryOpaque) {
        let landed = match result {
            Ok(message) => Ok((message.partition(), message.offset())),
            Err((error, _)) => Err(error.clone()),
        };
        ack.report(landed);
    }
}

/// A producer whose sends return futures of their acks (see the module doc).
pub(crate) struct AckProducer {
    producer: Arc<BaseProducer<AckContext>>,
    stop: Arc<AtomicBool>,
    /// Polls so far (each lasts [`POLL`] unless the producer is dropped), for tests.
    #[cfg_attr(not(test), allow(dead_code))]
    passes: Arc<AtomicU64>,
}

/// How long one poll of the serving thread lasts.
const POLL: Duration = Duration::from_secs(1);

impl AckProducer {
    /// Creates the producer from `config` and starts its serving thread.
    pub(crate) fn new(config: &ClientConfig) -> KafkaResult<Self> {
        let producer = Arc::new(BaseProducer::from_config_and_context(config, AckContext)?);
        let stop = Arc::new(AtomicBool::new(false));
        let passes = Arc::new(AtomicU64::new(0));
        {
            let (producer, stop, passes) = (
                Arc::clone(&producer),
                Arc::clone(&stop),
                Arc::clone(&passes),
            );
            std::thread::Builder::new()
                .name("outpost acks".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        passes.fetch_add(1, Ordering::Relaxed);
                        producer.poll(POLL);
                    }
                    // The last handle goes here, off any async runtime: rust-rdkafka's
                    // drop purges what is queued and serves the reports of what was in
                    // flight.
                })
                .map_err(|_| KafkaError::ClientCreation("cannot start the acks thread".into()))?;
        }
        Ok(Self {
            producer,
            stop,
            passes,
        })
    }

    /// Queues one message; the receiver resolves with its delivery report.
    ///
    /// # Errors
    /// The error librdkafka refused the message with (for example `QueueFull`).
    pub(crate) fn enqueue(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Result<AckReceiver, KafkaError> {
        let (ack, acked) = oneshot::channel();
        self.queue(topic, key, payload, headers, AckTo::Once(Some(ack)))?;
        Ok(acked)
    }

    /// Queues one message whose delivery report goes where `to` says.
    ///
    /// # Errors
    /// The error librdkafka refused the message with; nothing is reported then.
    pub(crate) fn queue(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
        to: AckTo,
    ) -> Result<(), KafkaError> {
        let mut record: BaseRecord<'_, [u8], [u8], _> =
            BaseRecord::with_opaque_to(topic, Box::new(to)).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        self.producer.send(record).map_err(|(error, mut record)| {
            record.delivery_opaque.disarm();
            error
        })
    }

    /// Queues one message, retrying while librdkafka's queue is full for up to
    /// `queue_timeout`, and waits for its delivery report.
    ///
    /// # Errors
    /// The error the message was refused or failed with.
    pub(crate) async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
        queue_timeout: Duration,
    ) -> Result<Landed, KafkaError> {
        let started = Instant::now();
        loop {
            match self.enqueue(topic, key, payload, headers.clone()) {
                Ok(acked) => return acked.await.unwrap_or(Err(KafkaError::Canceled)),
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))
                    if started.elapsed() < queue_timeout =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// The librdkafka producer (flush, purge, fatal errors).
    pub(crate) fn inner(&self) -> &BaseProducer<AckContext> {
        &self.producer
    }

    /// How many times the serving thread woke up so far.
    #[cfg(test)]
    fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }
}

impl Drop for AckProducer {
    /// Never blocks: the serving thread stops after its current poll (a second at most)
    /// and closes the client then.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;

    /// An idempotent, acks=all producer on `cluster`.
    fn mock_producer<C: rdkafka::ClientContext>(cluster: &MockCluster<'_, C>) -> AckProducer {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("acks", "all")
            .set("enable.idempotence", "true");
        AckProducer::new(&config).unwrap()
    }

    /// Sends are acked, and the serving thread polls a second at a time, busy or idle (the
    /// thread it replaces started a poll, and spun through its last millisecond, every
    /// 100 ms).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acks_resolve_and_the_thread_polls_a_second_at_a_time() {
        let cluster = MockCluster::new(1).unwrap();
        let producer = mock_producer(&cluster);
        for i in 0..20 {
            let (partition, offset) = producer
                .send(
                    "acks",
                    Some(format!("k{i}").as_bytes()),
                    Some(b"payload"),
                    OwnedHeaders::new(),
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
            assert!(partition >= 0 && offset >= 0);
        }
        let before = producer.passes();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let polls = producer.passes() - before;
        assert!(polls <= 4, "{polls} polls in 2 s");
        drop(producer);
    }

    /// Reports of messages queued to a stream come back once each, with their tags.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streamed_reports_come_back_once_with_their_tags() {
        let cluster = MockCluster::new(1).unwrap();
        let producer = mock_producer(&cluster);
        let (to, mut reports) = mpsc::unbounded_channel();
        for tag in 0..50 {
            producer
                .queue(
                    "acks",
                    Some(b"k"),
                    Some(b"payload"),
                    OwnedHeaders::new(),
                    AckTo::stream(tag, &to),
                )
                .unwrap();
        }
        let mut tags = Vec::new();
        while tags.len() < 50 {
            let (tag, landed) = tokio::time::timeout(Duration::from_secs(10), reports.recv())
                .await
                .expect("every report arrives")
                .unwrap();
            let (_, offset) = landed.unwrap();
            assert_eq!(
                offset,
                i64::try_from(tag).unwrap(),
                "one key, one partition: in order"
            );
            tags.push(tag);
        }
        assert_eq!(tags, (0..50).collect::<Vec<_>>());
        assert!(reports.try_recv().is_err(), "no report twice");
    }

    /// A streamed report dropped unsent reports `Canceled` (its receiver would otherwise
    /// wait for it forever); one disarmed (refused before queueing) reports nothing.
    #[test]
    fn a_dropped_stream_ack_reports_canceled_and_a_disarmed_one_nothing() {
        let (to, mut reports) = mpsc::unbounded_channel();
        drop(AckTo::Stream(7, Some(to.clone())));
        let (tag, landed) = reports.try_recv().unwrap();
        assert_eq!(tag, 7);
        assert!(matches!(landed, Err(KafkaError::Canceled)), "{landed:?}");
        let mut refused = AckTo::Stream(8, Some(to.clone()));
        refused.disarm();
        drop(refused);
        AckTo::Stream(9, Some(to)).report(Ok((0, 1)));
        let (tag, landed) = reports.try_recv().unwrap();
        assert_eq!((tag, landed.unwrap()), (9, (0, 1)));
        assert!(reports.try_recv().is_err(), "reported once, disarmed never");
    }
}
