//! The relay: a streaming engine that owns keys, keeps many rows of each in flight, and
//! settles acks as they arrive; woken by hints, polling adaptively as the safety net.
//!
//! ```text
//!  claim keys (+ first rows) ──▶ keys owned ──▶ send: queue rows with the producer,
//!        ▲   (claiming)            │  ▲        many per key, in id order (sending)
//!        │                         │  └─ fetch more rows of a key before it runs dry
//!  wake-up / poll (poll)           ▼
//!                     acks ──▶ settle: batched statements; keys handed back when drained,
//!                                      failed (with back-off) or out of lease (settling)
//! ```
//!
//! Nothing of a key is sent once one of its rows failed: the key goes back with that row's
//! back-off once its rows in flight have resolved, and the next owner starts at the failed
//! row. A slow key holds back only itself; claims go on while sends are in flight.
//! Beside it, one relay of a service counts the backlog and deletes published rows past
//! their retention (housekeeping).

mod claiming;
mod housekeeping;
pub mod poll;
pub(crate) mod sending;
pub(crate) mod settling;
pub(crate) mod verdict;
pub mod wake;

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use tracing::{info, warn};
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::environment::Environment;
use crate::error::ErrorClass;
use crate::error::{Error, Result};
use crate::kafka::producer::KafkaProducer;
use crate::outbox::store::{ClaimedKey, OutboxStore, Settlement};
use crate::relay::poll::{PollConfig, PollSchedule};
use crate::relay::wake::{validate_service, WakeSignal, WakeSource};

use claiming::{Keys, Release, Set};
use housekeeping::{cleanup, housekeep};
use sending::{Sender, Sent};
use settling::{RowOutcome, SettleOp, Settler};
use verdict::RetryPolicy;

/// Relay settings; build with [`RelayConfig::new`] and adjust fields.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    /// Service name: metric label and wake-up key `outbox:wake:{service}`.
    pub service: String,
    /// Keys claimed per claim statement (default 500).
    pub batch_size: usize,
    /// Rows of one key read per statement, and the most of one key in flight at once
    /// (default 500).
    pub per_key: usize,
    /// How long a key's lease lasts; the owner renews it every third of it, and a crashed
    /// relay's keys come back once it lapses (default 90 s; at least twice the longest send,
    /// i.e. delivery plus request timeout). No send starts once it could outlast the lease,
    /// so a second relay never sends the same rows while the first still might.
    pub lease: Duration,
    /// Polling bounds (defaults per [`Environment`]).
    pub poll: PollConfig,
    /// Retry schedule for failed deliveries (default 100 ms doubling to 10 s).
    pub backoff: Backoff,
    /// Unclassified failures allowed before an event is parked (default 10). Transient
    /// failures (broker down, timeouts) never count; permanent ones park at once.
    pub max_attempts: u32,
    /// How long published rows are kept before deletion (default 1 h). Zero deletes a row
    /// (and its payload) when its ack is recorded, which also drains faster (no new row
    /// version to write); the row's partition, offset and `published_at` are then gone, and
    /// staging the same `event_id` again stages it anew (staging is idempotent on the event
    /// id while its row is kept).
    pub retention: Duration,
    /// How often retention runs (default 60 s).
    pub cleanup_interval: Duration,
    /// Most rows deleted per cleanup statement (default 10 000).
    pub cleanup_batch: i64,
    /// Most rows read and not yet settled at once (default 5 000).
    pub max_in_flight: usize,
    /// Most payload bytes read and not yet acked at once (default 8 MiB). Reads are sized by
    /// the payloads read lately (before the first, 1 MiB a row is assumed): a read of rows
    /// much larger than those before it can go past it once.
    pub max_in_flight_bytes: usize,
    /// How often the backlog gauges are refreshed (default 5 s). The count reads every
    /// pending row, so on a deep backlog it waits at least twenty times as long as the last
    /// count took.
    pub backlog_interval: Duration,
    /// Topic overrides (default none): an event staged for topic `K` is produced to
    /// `topics[K]`; other topics are produced as staged. For a deployment that renames
    /// topics (a staging prefix, a migration to a new topic) without touching the code that
    /// stages. The stored row keeps the staged topic; metrics and logs show the produced one.
    pub topics: BTreeMap<String, String>,
    /// Longest wait for the database's answer to one statement (or one hand-back
    /// transaction) of the relay (default 30 s). One not answered by then fails and is
    /// retried on another connection; its own is closed: a connection the network stopped
    /// carrying answers nothing until TCP gives up, and held the relay (its acks, its
    /// shutdown) that long. Keep it well above the slowest statement of a healthy database;
    /// a claim or a settle takes milliseconds, a backlog count on millions of rows seconds.
    pub statement_timeout: Duration,
}

impl RelayConfig {
    /// Defaults for `service` in `env`.
    pub fn new(service: impl Into<String>, env: Environment) -> Self {
        Self {
            service: service.into(),
            batch_size: 500,
            per_key: 500,
            lease: Duration::from_secs(90),
            poll: PollConfig::for_environment(env),
            backoff: Backoff::default(),
            max_attempts: 10,
            retention: Duration::from_secs(3600),
            cleanup_interval: Duration::from_secs(60),
            cleanup_batch: 10_000,
            max_in_flight: 5_000,
            max_in_flight_bytes: 8 << 20,
            backlog_interval: Duration::from_secs(5),
            topics: BTreeMap::new(),
            statement_timeout: Duration::from_secs(30),
        }
    }

    /// The topic an event staged for `staged` is produced to (see [`Self::topics`]).
    pub fn topic_for<'a>(&'a self, staged: &'a str) -> &'a str {
        self.topics.get(staged).map_or(staged, String::as_str)
    }

    /// Points claimed rows at the topics they are produced to.
    pub(crate) fn retarget(&self, keys: &mut [ClaimedKey]) {
        if self.topics.is_empty() {
            return;
        }
        for row in keys.iter_mut().flat_map(|k| k.rows.iter_mut()) {
            if let Some(to) = self.topics.get(&row.topic) {
                row.topic.clone_from(to);
            }
        }
    }

    /// Checks the settings against each other and against the producer's timeouts.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the first bad field.
    pub fn validate(&self, longest_send: Duration) -> Result<()> {
        validate_service(&self.service)?;
        let positive = [
            ("batch_size", self.batch_size),
            ("per_key", self.per_key),
            ("max_in_flight", self.max_in_flight),
            ("max_in_flight_bytes", self.max_in_flight_bytes),
            ("max_attempts", self.max_attempts as usize),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::config(name, "a positive integer", "0"));
            }
        }
        // Retention deletes in batches until one comes back short: with none positive it
        // would never stop (nor let the relay stop).
        if self.cleanup_batch < 1 {
            return Err(Error::config(
                "cleanup_batch",
                "a positive integer",
                self.cleanup_batch.to_string(),
            ));
        }
        for (name, every) in [
            ("cleanup_interval", self.cleanup_interval),
            ("backlog_interval", self.backlog_interval),
            ("statement_timeout", self.statement_timeout),
        ] {
            if every.is_zero() {
                return Err(Error::config(name, "a positive duration", "0s"));
            }
        }
        if self.poll.min_interval > self.poll.max_interval || self.poll.max_interval.is_zero() {
            return Err(Error::config(
                "poll.max_interval",
                "positive and not below poll.min_interval",
                format!("{:?}", self.poll.max_interval),
            ));
        }
        // The hand-back sets the server's `idle_in_transaction_session_timeout` to it.
        if self.statement_timeout > Duration::from_millis(i32::MAX as u64) {
            return Err(Error::config(
                "statement_timeout",
                "at most 24 days (PostgreSQL's limit for a timeout)",
                format!("{:?}", self.statement_timeout),
            ));
        }
        if self.lease < longest_send * 2 {
            return Err(Error::config(
                "lease",
                format!("at least twice the delivery plus request timeout ({longest_send:?})"),
                format!("{:?}", self.lease),
            ));
        }
        for (from, to) in &self.topics {
            if !is_topic_name(to) {
                return Err(Error::config(
                    format!("topics.\"{from}\""),
                    "a Kafka topic name: 1-249 of [A-Za-z0-9._-], not `.` or `..`",
                    to,
                ));
            }
        }
        if self.backoff.initial.is_zero() || self.backoff.max < self.backoff.initial {
            return Err(Error::config(
                "backoff",
                "initial > 0 and max >= initial",
                format!("{:?}", self.backoff),
            ));
        }
        Ok(())
    }

    pub(crate) fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            backoff: self.backoff,
            max_attempts: self.max_attempts,
        }
    }
}

/// Claims running at once while the keys claimed have a row each: a claim is two statements
/// back to back, and with one at a time a 100,000-key drain kept the machine 78 % busy, with
/// two 85-88 % (`scripts/drain-profile.sh`). The second leases from the other end of the
/// due order (see [`OutboxStore::claim_newest`]).
const MAX_CLAIMS: usize = 2;

/// Pause after a failed lease renewal: a thirtieth of the lease, within these bounds.
const RENEWAL_RETRY_MIN: Duration = Duration::from_millis(100);
const RENEWAL_RETRY_MAX: Duration = Duration::from_secs(1);

/// Fewest rows of a key read by one statement when the room allows it.
const MIN_READ: usize = 64;

/// A read's row count: one over its `share` of the room, so that getting no more than the
/// share tells the key is drained, but never over the `per_key` setting.
fn one_over(share: usize, per_key: usize) -> usize {
    if share < per_key {
        share + 1
    } else {
        share
    }
}

/// Kafka's own rule for a topic name.
fn is_topic_name(name: &str) -> bool {
    (1..=249).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The longest one queued message can stay unresolved: librdkafka fails it after the
/// delivery timeout, but a request already on the wire then may still land up to a request
/// timeout later.
pub(crate) fn longest_send(producer: &KafkaProducer) -> Duration {
    let c = producer.config();
    c.delivery_timeout + c.request_timeout.min(c.delivery_timeout)
}

/// What one [`Relay::run_once`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows acked and marked published.
    pub published: usize,
    /// Rows whose key was scheduled for another attempt.
    pub retried: usize,
    /// Rows parked.
    pub parked: usize,
    /// Rows handed back unattempted (behind a failed row of their key, or out of lease).
    pub released: usize,
}

/// Delivers one outbox table's pending rows to Kafka.
#[derive(Debug)]
pub struct Relay {
    store: OutboxStore,
    producer: Arc<KafkaProducer>,
    config: RelayConfig,
    owner: Uuid,
    wake: WakeSignal,
    /// What a row's payload weighed lately, kept from one engine to the next (`run_once`);
    /// 0 before the first read (see `Keys::row_bytes`).
    row_bytes: Arc<AtomicUsize>,
}

impl Relay {
    /// A relay over `store`, producing with `producer`.
    ///
    /// # Errors
    /// [`Error::Configuration`] when `config` is invalid.
    pub fn new(
        store: OutboxStore,
        producer: Arc<KafkaProducer>,
        config: RelayConfig,
    ) -> Result<Self> {
        config.validate(longest_send(&producer))?;
        let store = store
            .with_service(&config.service)
            .deleting_published(config.retention.is_zero())
            .with_statement_timeout(Some(config.statement_timeout));
        Ok(Self {
            store,
            producer,
            config,
            owner: Uuid::new_v4(),
            wake: WakeSignal::new(),
            row_bytes: Arc::default(),
        })
    }

    /// Uses `signal` for wake-ups (share it with listeners or in-process writers).
    #[must_use]
    pub fn with_wake_signal(mut self, signal: WakeSignal) -> Self {
        self.wake = signal;
        self
    }

    /// The signal that wakes this relay.
    pub fn wake_signal(&self) -> WakeSignal {
        self.wake.clone()
    }

    /// This relay's lease owner id.
    pub fn owner(&self) -> Uuid {
        self.owner
    }

    /// The settings.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Claims one batch of keys, delivers the rows claimed with them, settles everything
    /// and hands the keys back (for tests and tools; [`run`](Self::run) streams instead).
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when claiming fails.
    pub async fn run_once(&self) -> Result<BatchReport> {
        let mut engine = Engine::new(self);
        engine.once = true;
        let claimed = engine.claim().await?;
        let report = engine.finish().await;
        Ok(BatchReport {
            claimed,
            released: claimed.saturating_sub(report.published + report.retried + report.parked),
            ..report
        })
    }

    /// Runs until `shutdown` resolves, then stops claiming, waits for the acks of what is
    /// in flight, settles them, hands every key back, flushes the producer and returns.
    ///
    /// Database errors are logged and retried after `poll.error_backoff`.
    ///
    /// # Errors
    /// Currently never; reserved for unrecoverable start-up failures.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let shutdown = pin!(shutdown.fuse());
        let service = self.config.service.clone();
        info!(service, owner = %self.owner, "relay started");
        let mut engine = Engine::new(&self);
        engine.stream(shutdown).await;
        drop(engine);
        self.producer.flush_async(Duration::from_secs(5)).await;
        info!(service, "relay stopped");
        Ok(())
    }

    /// Deletes published rows older than the retention, in bounded batches.
    pub async fn cleanup(&self) -> u64 {
        cleanup(
            &self.store,
            &self.config,
            &tokio_util::sync::CancellationToken::new(),
        )
        .await
    }
}

/// The state of one running relay.
struct Engine<'r> {
    relay: &'r Relay,
    keys: Keys,
    sender: Sender,
    settler: Settler,
    /// Keys handed back whose settle op (numbered) the settler has not written yet.
    settling: VecDeque<(String, u64)>,
    /// Outcomes of the sends finished since the last [`Engine::settle_outcomes`]: a burst
    /// of acks goes to the settler as one op, not one op (and one allocation) per row.
    outcomes: Vec<RowOutcome>,
    policy: RetryPolicy,
    schedule: PollSchedule,
    /// Every owned key's lease lasts at least until then.
    lease_valid_until: Instant,
    /// When the leases are next renewed: a third of the lease after the last renewal, or
    /// soon after a failed one (left in the past, the loop tried again without a pause,
    /// a core's worth of statements against a database refusing them).
    renewal_due: Instant,
    /// Look at the table now (woken, or the last claim was full).
    claim_due: bool,
    /// The claims running beside the stream.
    claiming: Vec<Claiming>,
    /// The last claim came back full: more keys are free.
    more_free: bool,
    /// The last claim's keys had a row each at most: claims run [`MAX_CLAIMS`] at once.
    thin: bool,
    next_poll: Instant,
    /// A transient failure was seen; the next ack pulls backed-off keys forward.
    saw_transient: bool,
    published_at_transient: usize,
    stopping: bool,
    /// `run_once`: no further claims or reads.
    once: bool,
    report: BatchReport,
}

impl Drop for Engine<'_> {
    /// The next engine of the relay (`run_once`) sizes its first reads by what this one read.
    fn drop(&mut self) {
        if let Some(bytes) = self.keys.weighed() {
            self.relay.row_bytes.store(bytes, Ordering::Relaxed);
        }
    }
}

impl<'r> Engine<'r> {
    fn new(relay: &'r Relay) -> Self {
        let c = &relay.config;
        let now = Instant::now();
        Self {
            relay,
            keys: Keys::weighing(relay.row_bytes.load(Ordering::Relaxed)),
            sender: Sender::new(
                Arc::clone(&relay.producer),
                c.max_in_flight,
                c.max_in_flight_bytes,
                c.per_key,
            ),
            settler: Settler::start(relay.store.clone(), relay.owner),
            settling: VecDeque::new(),
            outcomes: Vec::new(),
            policy: c.retry_policy(),
            schedule: PollSchedule::new(c.poll),
            lease_valid_until: now + c.lease,
            renewal_due: now + c.lease / 3,
            claim_due: true,
            claiming: Vec::new(),
            more_free: false,
            thin: false,
            next_poll: now,
            saw_transient: false,
            published_at_transient: 0,
            stopping: false,
            once: false,
            report: BatchReport::default(),
        }
    }

    /// The last moment a send may start: it must resolve before any owned lease lapses.
    fn send_deadline(&self) -> Instant {
        self.lease_valid_until
            .checked_sub(longest_send(&self.relay.producer))
            .unwrap_or_else(Instant::now)
    }

    /// Starts a claim of free keys when there is room for one; it runs beside the stream
    /// (see [`Claiming`]) and [`Self::claimed`] takes in what it brings.
    fn start_claim(&mut self) -> bool {
        let room = self.room();
        let c = &self.relay.config;
        if self.claiming.len() >= MAX_CLAIMS
            || room < self.worth_reading()
            || self.keys.deferred() >= c.batch_size
            || self.hand_backs_in_doubt()
        {
            // Claimed again once acks made room (`claim_due` stays set). With a claim's
            // worth of owned keys waiting to read, those read first: claiming more would
            // grow the owned set without bound.
            return false;
        }
        let want = c.batch_size.min(room);
        // The first read of each key shares the room; a key with more rows gets `per_key`
        // at a time from its refills.
        // One row more than the share (within `per_key`): a key that returns no more than
        // its share is known drained, with no read of nothing to find it out (a 10-row key
        // claimed 10 rows at a time took a second statement each). It overshoots the room
        // by a row a key.
        // While keys come one row each, the room is shared with the claims that may still
        // start beside this one. Keys with more rows get the whole of it: sharing it shrank
        // their first reads and took more statements to read the rest (a 1M-row backlog over
        // 10,000 keys drained 13 % slower).
        let slots = if self.thin && !self.once {
            MAX_CLAIMS - self.claiming.len()
        } else {
            1
        };
        let per_key = one_over(c.per_key.min(room / want / slots).max(1), c.per_key);
        // Taken before the claim: a hint arriving during it may be for rows committed after
        // its snapshot, and is timed by the next claim.
        let hint = self.relay.wake.take_hint();
        let store = self.relay.store.clone();
        let (owner, lease) = (self.relay.owner, c.lease);
        // Beside a claim from the head of the due order, one from its other end (see
        // `OutboxStore::claim_newest`); a claim on its own starts from the head, so the
        // longest-waiting keys are always reached.
        let newest = self.claiming.iter().any(|running| !running.newest);
        self.claiming.push(Claiming {
            result: async move {
                if newest {
                    store.claim_newest(owner, want, per_key, lease).await
                } else {
                    store.claim(owner, want, per_key, lease).await
                }
            }
            .boxed(),
            newest,
            started: Instant::now(),
            want,
            per_key,
            hint,
            handed_back: Set::default(),
        });
        // A wake-up arriving while it runs sets it again.
        self.claim_due = false;
        true
    }

    /// Takes in the keys a finished claim leased; returns the rows claimed.
    fn claimed(&mut self, claiming: Claiming, result: Result<Vec<ClaimedKey>>) -> Result<usize> {
        let mut claimed = result?;
        let c = &self.relay.config;
        if let Some((sent, source)) = claiming.hint {
            crate::metrics::wakeup_latency(&c.service, source.as_str(), sent);
        }
        // The renewals made while the claim ran did not cover its keys: their leases run
        // from the claim on.
        self.lease_valid_until = self.lease_valid_until.min(claiming.started + c.lease);
        c.retarget(&mut claimed);
        let keys = claimed.len();
        // A key handed back while the claim ran can be in it only if the claim found our
        // own lease on it lapsed, or took it once more after its hand-back was written:
        // its rows may be ones just acked whose settle the claim did not see. It goes back
        // again, unread; its next claim reads it afresh.
        let (again, claimed): (Vec<ClaimedKey>, Vec<ClaimedKey>) = claimed
            .into_iter()
            .partition(|k| claiming.handed_back.contains(&k.key));
        let rows = claimed.iter().map(|k| k.rows.len()).sum();
        trace_read(self.relay.owner, "claimed", &claimed);
        self.keys.claimed(claimed, claiming.per_key);
        self.release(again.into_iter().map(|k| (k.key, Release::Plain)).collect());
        // A full claim means more keys are free: claim again without waiting.
        self.more_free = keys >= claiming.want && !self.once;
        self.thin = rows <= keys;
        self.claim_due |= self.more_free;
        Ok(rows)
    }

    /// Claims free keys when there is room and waits for the claim (`run_once`).
    async fn claim(&mut self) -> Result<usize> {
        if !self.start_claim() {
            return Ok(0);
        }
        let mut claiming = self.claiming.pop().expect("a claim was just started");
        let result = (&mut claiming.result).await;
        self.claimed(claiming, result)
    }

    /// Rows that may still be read: the caps' room less the rows read and not sent, the
    /// acked rows the settler has not written yet, and the most the running claims can bring;
    /// under the byte cap, as many rows as fit of the size the last reads had (see
    /// `Keys::row_bytes`).
    fn room(&self) -> usize {
        let claiming: usize = self.claiming.iter().map(|c| c.want * c.per_key).sum();
        let rows = self
            .sender
            .room()
            .saturating_sub(self.keys.queued_rows() + self.settler.unwritten_rows() + claiming);
        let row_bytes = self.keys.row_bytes();
        let held = self.sender.bytes() + self.keys.queued_bytes() + claiming * row_bytes;
        let fit = self.relay.config.max_in_flight_bytes.saturating_sub(held) / row_bytes;
        // One row at least while nothing is held, however large rows are taken to be.
        rows.min(if held == 0 { fit.max(1) } else { fit })
    }

    /// The least room a claim or a read waits for: a quarter of what the caps hold, or one
    /// row when no ack and no settle is outstanding (nothing would wake the relay for more).
    fn worth_reading(&self) -> usize {
        let c = &self.relay.config;
        if self.sender.room() >= c.max_in_flight && self.settler.unwritten_rows() == 0 {
            1
        } else {
            let fit = c.max_in_flight_bytes / self.keys.row_bytes();
            (c.max_in_flight.min(fit) / 4).max(1)
        }
    }

    /// Reads the next rows of owned keys that are about to run dry.
    async fn fetch(&mut self, mut asked: Vec<(String, i64)>) {
        // Rows read wait in memory until they are sent, so reads stay within the room the
        // caps leave. A read waits until that room is worth a statement: reading one row
        // per key as each ack frees a slot would cost a round trip per row.
        let room = self.room();
        let chunk = self
            .relay
            .config
            .per_key
            .min((room / asked.len().max(1)).max(MIN_READ))
            .min(room)
            .max(1);
        let keys = (room / chunk).min(asked.len());
        if keys == 0 || room < self.worth_reading().min(asked.len() * chunk) {
            asked.into_iter().for_each(|(key, _)| self.keys.defer(key));
            return;
        }
        for (key, _) in asked.drain(keys..) {
            self.keys.defer(key);
        }
        if asked.is_empty() {
            return;
        }
        let per_key = one_over(chunk, self.relay.config.per_key);
        match self
            .relay
            .store
            .fetch(self.relay.owner, &asked, per_key)
            .await
        {
            Ok(mut got) => {
                self.relay.config.retarget(&mut got);
                trace_read(self.relay.owner, "fetched", &got);
                self.keys.fetched(&asked, got, per_key);
            }
            Err(e) => {
                // Keys stay owned; they are read again after the next ack or at release.
                warn!(error = %e, "reading further rows failed");
                self.keys.fetched(&asked, Vec::new(), usize::MAX);
            }
        }
    }

    /// Whether a key handed back may still be leased to this owner past its lease: its
    /// hand-back is not written, and no renewal has held the leases since they could
    /// lapse (the database was gone). A claim then could lease that key afresh (a lapsed
    /// lease of one's own counts as free) and read rows acked but not yet recorded, and the
    /// late hand-back would free the new lease while its rows are in flight. Claims wait
    /// for the settler instead.
    fn hand_backs_in_doubt(&self) -> bool {
        Instant::now() >= self.lease_valid_until
            && self
                .settling
                .back()
                .is_some_and(|(_, number)| *number > self.settler.written())
    }

    /// Forgets the keys whose settles have been written: they need no renewal any more.
    /// Done as the settles are written: pruned only at a renewal, the list held every key
    /// handed back in the last third of a lease (at 30,000 keys a second and the default
    /// 90 s lease, about 900,000).
    fn forget_settled(&mut self) {
        let written = self.settler.written();
        // Numbers grow in queue order.
        while self
            .settling
            .front()
            .is_some_and(|(_, number)| *number <= written)
        {
            self.settling.pop_front();
        }
    }

    /// Extends the lease of every owned key when a third of it has passed.
    async fn renew(&mut self) {
        let lease = self.relay.config.lease;
        let started = Instant::now();
        if started < self.renewal_due {
            return;
        }
        self.forget_settled();
        if self.keys.is_empty() && self.settling.is_empty() {
            self.renewal_due = started + lease / 3;
            self.lease_valid_until = started + lease;
            return;
        }
        let mut names = self.keys.names();
        names.extend(self.settling.iter().map(|(key, _)| key.clone()));
        match self
            .relay
            .store
            .renew(self.relay.owner, &names, lease)
            .await
        {
            Ok(held) => {
                self.renewal_due = started + lease / 3;
                self.lease_valid_until = started + lease;
                if held.len() < names.len() {
                    let held: Set<String> = held.into_iter().collect();
                    names.retain(|k| !held.contains(k));
                    self.settling.retain(|(key, _)| held.contains(key));
                    let lost = self.keys.lose(names);
                    if lost > 0 {
                        // Only a relay stalled for longer than the rest of its lease gets
                        // here; what it had acked and not settled may be sent again by the
                        // key's next owner.
                        warn!(keys = lost, "lease lapsed before it was renewed; those keys are left to their next owner");
                        crate::metrics::leases_lost(&self.relay.config.service, lost);
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "lease renewal failed; sends stop before the lease lapses");
                self.renewal_due =
                    Instant::now() + (lease / 30).clamp(RENEWAL_RETRY_MIN, RENEWAL_RETRY_MAX);
            }
        }
    }

    /// One pass over what changed: hand back finished keys, read further rows, send.
    async fn step(&mut self) {
        let c = &self.relay.config;
        let out_of_lease = Instant::now() >= self.send_deadline();
        let winding_down = self.stopping || out_of_lease;
        if winding_down && !self.keys.is_empty() {
            self.keys.drop_queued();
        }
        let refill_below = c.per_key / 2 + 1;
        if winding_down {
            self.keys.recall(usize::MAX);
        } else if self.keys.deferred() > 0 && self.room() >= self.worth_reading() {
            // As many as one read can serve.
            self.keys.recall((self.room() / MIN_READ).max(1));
        }
        let review = self.keys.review(refill_below, winding_down, self.once);
        self.release(review.release);
        if !review.fetch.is_empty() {
            self.fetch(review.fetch).await;
            let again = self.keys.review(refill_below, winding_down, self.once);
            self.release(again.release);
            // Keys left unread for want of room are read once there is room.
            for (key, _) in again.fetch {
                self.keys.defer(key);
            }
            let until = self.send_deadline();
            self.sender.pump(&mut self.keys, &again.send, until);
        }
        let until = self.send_deadline();
        self.sender.pump(&mut self.keys, &review.send, until);
    }

    /// Starts a claim when due (woken, polled, or the last claim was full) and there is
    /// room; while claims come back full, keeps [`MAX_CLAIMS`] running.
    fn claim_if_due(&mut self) {
        if self.stopping || !(self.claim_due || Instant::now() >= self.next_poll) {
            return;
        }
        let idle = self.claiming.is_empty();
        if !self.start_claim() {
            if idle {
                self.after_claim(Ok(0));
            }
            return;
        }
        while self.more_free && self.thin && self.start_claim() {}
    }

    /// Schedules the next claim after one finished (or could not start: `Ok(0)`).
    fn after_claim(&mut self, rows: Result<usize>) {
        let c = &self.relay.config;
        match rows {
            Ok(rows) => {
                let wait = self.schedule.after_batch(rows, 1);
                self.next_poll = Instant::now() + wait;
            }
            Err(e) => {
                crate::metrics::relay_error(&c.service);
                warn!(error = %e, source = ?std::error::Error::source(&e), "claim failed");
                self.claim_due = false;
                self.next_poll = Instant::now() + self.schedule.after_error();
            }
        }
        crate::metrics::poll_interval(&c.service, self.schedule.current());
    }

    /// Streams until `shutdown`, then drains what is in flight.
    async fn stream(
        &mut self,
        mut shutdown: std::pin::Pin<&mut futures::future::Fuse<impl Future<Output = ()>>>,
    ) {
        let housekeeping = tokio_util::sync::CancellationToken::new();
        let chores = tokio::spawn(housekeep(
            self.relay.store.clone(),
            self.relay.config.clone(),
            housekeeping.clone(),
        ));
        loop {
            // Renewing first: a claim after a late renewal would find our own keys free.
            self.renew().await;
            self.claim_if_due();
            self.step().await;
            if self.stopping && self.keys.is_empty() && self.claiming.is_empty() {
                break;
            }
            // A running claim's end wakes the loop; the poll is due after it.
            let mut wake_at = if self.stopping || !self.claiming.is_empty() {
                self.renewal_due
            } else {
                self.next_poll.min(self.renewal_due)
            };
            // Room in a queue others filled comes back with no ack of ours to tell.
            if let Some(retry) = self.sender.blocked_until() {
                wake_at = wake_at.min(retry);
            }
            tokio::select! {
                biased;
                sent = self.sender.next() => {
                    self.on_sent(sent);
                    while let Some(sent) = self.sender.ready() {
                        self.on_sent(sent);
                    }
                    self.settle_outcomes();
                    self.after_acks().await;
                }
                () = &mut shutdown, if !self.stopping => self.stopping = true,
                () = self.settler.keys_released(), if !self.stopping => self.claim_due = true,
                // Written settles free room under the caps for reads and claims.
                () = self.settler.progressed() => self.forget_settled(),
                // Its keys are leased to us, stopping or not.
                (i, result) = claim_result(&mut self.claiming) => {
                    let claiming = self.claiming.swap_remove(i);
                    let rows = self.claimed(claiming, result);
                    self.after_claim(rows);
                }
                () = self.relay.wake.notified(), if !self.stopping => {
                    self.schedule.on_wake();
                    self.claim_due = true;
                }
                () = tokio::time::sleep_until(wake_at.into()) => {}
            }
        }
        self.flush_settles().await;
        housekeeping.cancel();
        let _ = chores.await;
    }

    /// After an outage the broker answers again: keys that backed off because it was down
    /// need not wait out their delays.
    async fn after_acks(&mut self) {
        if self.saw_transient && self.report.published > self.published_at_transient {
            self.saw_transient = false;
            match self.relay.store.pull_forward_transient().await {
                Ok(keys) => info!(keys, "broker answers again; retrying backed-off keys now"),
                Err(e) => warn!(error = %e, "could not pull backed-off keys forward"),
            }
        }
    }

    fn release(&mut self, finished: Vec<(String, Release)>) {
        self.settle_outcomes();
        let finished: Vec<_> = finished
            .into_iter()
            .filter(|(_, release)| *release != Release::Lost)
            .collect();
        if finished.is_empty() {
            return;
        }
        let mut op = SettleOp::default();
        for (key, release) in finished {
            if let Release::Failed(id, settlement, class) = &release {
                self.report.retried += 1;
                op.rows.push(RowOutcome {
                    id: *id,
                    settlement: settlement.clone(),
                    topic: String::new(),
                    latency: Duration::ZERO,
                    class: Some(*class),
                });
            }
            match release.key_release(&key) {
                Some(r) => op.release.push(r),
                None => op.drained.push(key),
            }
        }
        let keys: Vec<String> = op
            .release
            .iter()
            .map(|r| r.key.clone())
            .chain(op.drained.iter().cloned())
            .collect();
        for claiming in &mut self.claiming {
            claiming.handed_back.extend(keys.iter().cloned());
        }
        let number = self.settler.send(op);
        // Acked rows of these keys may still wait in the settler: until it has written
        // them, the keys stay leased (renewed), or another relay would send them again.
        self.settling
            .extend(keys.into_iter().map(|key| (key, number)));
    }

    /// Records one finished send.
    fn on_sent(&mut self, sent: Sent) {
        let Sent { event, result } = sent;
        let latency = (chrono::Utc::now() - event.created_at)
            .to_std()
            .unwrap_or_default();
        let Some(state) = self.keys.get_mut(&event.event_key) else {
            return;
        };
        state.in_flight -= 1;
        let (settlement, class) = match result {
            Ok(acked) => {
                if let Some((failed, ..)) = &state.failure {
                    if event.id > *failed {
                        // Only possible when the broker came back between the two messages'
                        // timeouts; the failed one is retried after it.
                        warn!(key = %event.event_key, failed, overtook = event.id, "a later event of a key was acked after an earlier one failed");
                        crate::metrics::order_break(&self.relay.config.service);
                    }
                }
                self.report.published += 1;
                (
                    Settlement::Published {
                        partition: acked.partition,
                        offset: acked.offset,
                    },
                    None,
                )
            }
            Err(failure) => {
                let verdict = self
                    .policy
                    .verdict(&self.relay.config.service, &event, &failure);
                if failure.class == ErrorClass::Transient {
                    self.saw_transient = true;
                    self.published_at_transient = self.report.published;
                }
                if matches!(verdict, Settlement::Retry { .. }) {
                    if state.failure.is_none() && failure.class == ErrorClass::Transient {
                        self.relay.producer.purge_behind(&failure);
                    }
                    let earlier = state.failure.as_ref().is_none_or(|(id, ..)| event.id < *id);
                    if earlier {
                        state.failure = Some((event.id, verdict, failure.class));
                    }
                    return;
                }
                self.report.parked += 1;
                (verdict, Some(failure.class))
            }
        };
        self.outcomes.push(RowOutcome {
            id: event.id,
            settlement,
            topic: event.topic,
            latency,
            class,
        });
    }

    /// Hands the outcomes recorded by [`Self::on_sent`] to the settler, before anything
    /// else is sent to it (a key's release must follow its rows' outcomes).
    fn settle_outcomes(&mut self) {
        if !self.outcomes.is_empty() {
            self.settler.send(SettleOp {
                rows: std::mem::take(&mut self.outcomes),
                ..SettleOp::default()
            });
        }
    }

    /// Sends until every owned key is finished (`run_once`).
    async fn finish(&mut self) -> BatchReport {
        loop {
            self.step().await;
            if self.keys.is_empty() {
                break;
            }
            let sent = match self.sender.blocked_until() {
                // As in `stream`: with a queue others filled no ack of ours may ever come.
                Some(retry) => tokio::select! {
                    sent = self.sender.next() => sent,
                    () = tokio::time::sleep_until(retry.into()) => continue,
                },
                None => self.sender.next().await,
            };
            self.on_sent(sent);
            while let Some(sent) = self.sender.ready() {
                self.on_sent(sent);
            }
            self.settle_outcomes();
        }
        self.flush_settles().await;
        self.report
    }

    /// Waits for the settles queued so far, for half a lease at most: with the database
    /// gone they are left to the settler, which goes on trying while the process lives; the
    /// keys lapse to their next owner, who sends what was not recorded again.
    async fn flush_settles(&mut self) {
        let wait = self.relay.config.lease / 2;
        if tokio::time::timeout(wait, self.settler.flush())
            .await
            .is_err()
        {
            warn!(waited = ?wait, "stopping with outcomes not recorded; their rows are sent again once the leases lapse");
        }
    }
}

/// A claim statement running beside the stream: acks are taken in, settles handed over and
/// rows sent while it waits for the database. Awaited in line, a 100,000-key drain had its
/// loop waiting on claims for about 60 % of the drain, with nothing sent meanwhile.
struct Claiming {
    result: BoxFuture<'static, Result<Vec<ClaimedKey>>>,
    /// Leasing the most recently due keys first (see [`Engine::start_claim`]).
    newest: bool,
    /// Taken before the statement was sent: its leases run from later on.
    started: Instant,
    /// Keys asked for, each with up to `per_key` rows: until it is back, `want × per_key`
    /// rows are kept out of the room.
    want: usize,
    per_key: usize,
    hint: Option<(i64, WakeSource)>,
    /// Keys handed back while it ran (see [`Engine::claimed`]).
    handed_back: Set<String>,
}

/// The first running claim to finish (its index) and its outcome; never resolves when none
/// runs.
async fn claim_result(claiming: &mut [Claiming]) -> (usize, Result<Vec<ClaimedKey>>) {
    std::future::poll_fn(|cx| {
        for (i, claim) in claiming.iter_mut().enumerate() {
            if let std::task::Poll::Ready(result) = claim.result.poll_unpin(cx) {
                return std::task::Poll::Ready((i, result));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Which rows of which keys an owner read (`outpost::send=trace` shows who sent what).
pub(crate) fn trace_read(owner: Uuid, what: &str, keys: &[ClaimedKey]) {
    if tracing::enabled!(target: "outpost::send", tracing::Level::TRACE) {
        for k in keys {
            let ids: Vec<i64> = k.rows.iter().map(|r| r.id).collect();
            tracing::trace!(target: "outpost::send", %owner, key = %k.key, ?ids, "{what}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_field() {
        let mut c = RelayConfig::new("els", Environment::Testing);
        assert!(c.validate(Duration::from_secs(5)).is_ok());
        c.lease = Duration::from_secs(5);
        let e = c.validate(Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("invalid setting lease"));
        c = RelayConfig::new("bad name", Environment::Testing);
        assert!(c.validate(Duration::from_secs(1)).is_err());
        // Zero cleanup_batch would have retention delete empty batches for ever, and the
        // relay never stop.
        type Zero = fn(&mut RelayConfig);
        let zeroed: [(&str, Zero); 5] = [
            ("batch_size", |c| c.batch_size = 0),
            ("cleanup_batch", |c| c.cleanup_batch = 0),
            ("cleanup_interval", |c| c.cleanup_interval = Duration::ZERO),
            ("statement_timeout", |c| {
                c.statement_timeout = Duration::ZERO
            }),
            // "Unbounded" as a huge duration: the server refuses it as a timeout, and every
            // hand-back would fail.
            ("statement_timeout", |c| c.statement_timeout = Duration::MAX),
        ];
        for (field, zero) in zeroed {
            c = RelayConfig::new("els", Environment::Testing);
            zero(&mut c);
            let e = c.validate(Duration::from_secs(1)).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}
