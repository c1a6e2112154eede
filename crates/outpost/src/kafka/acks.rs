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
use tokio::sync::oneshot;

/// Where a message landed: partition and offset.
pub(crate) type Landed = (i32, i64);

/// The wait for one message's delivery report.
pub(crate) type AckReceiver = oneshot::Receiver<Result<Landed, KafkaError>>;

/// Resolves each message's future with its delivery report.
pub(crate) struct AckContext;

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<oneshot::Sender<Result<Landed, KafkaError>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Self::DeliveryOpaque) {
        let landed = match result {
            Ok(message) => Ok((message.partition(), message.offset())),
            Err((error, _)) => Err(error.clone()),
        };
        // The sender's wait may have been dropped (a caller that gave up): nothing to tell.
        let _ = ack.send(landed);
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
        let mut record: BaseRecord<'_, [u8], [u8], _> =
            BaseRecord::with_opaque_to(topic, Box::new(ack)).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        self.producer.send(record).map_err(|(error, _)| error)?;
        Ok(acked)
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

    /// Sends are acked, and the serving thread polls a second at a time, busy or idle (the
    /// thread it replaces started a poll, and spun through its last millisecond, every
    /// 100 ms).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acks_resolve_and_the_thread_polls_a_second_at_a_time() {
        let cluster = MockCluster::new(1).unwrap();
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("acks", "all")
            .set("enable.idempotence", "true");
        let producer = AckProducer::new(&config).unwrap();
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
}
