//! The WAL relay: one leader per stream reads the slot (pgoutput protocol 1, messages on,
//! no streaming of transactions in progress), produces each event of its prefix in stream
//! order with the idempotent producer, many in flight, and acknowledges a transaction's
//! end LSN only once all of its events, and all earlier ones, were acked by the broker.
//!
//! Protocol 1 sends only committed transactions, each whole, in commit order, so producing
//! in stream order keeps every key's events in commit order with no locks anywhere.
//!
//! - **Leader.** A relay holds a session advisory lock while it reads; the others retry the
//!   lock every `leader_poll`. A dead leader's connection closes, which frees the lock; the
//!   lock connection's short TCP keepalives make the server notice a leader host that
//!   vanished without closing it within half a minute, not the OS default two hours; the
//!   leader, in turn, leaves its session when that connection's periodic health check goes
//!   unanswered for 10 s (a hung server or network). A standby gives up a connection that
//!   stops answering its lock polls (or its connect) after 10 s and connects again, and a
//!   leader whose replication connection has not started streaming after 20 s gives the lock
//!   back and tries again: no hung connection keeps the stream without a leader.
//! - **At least once.** A restart resumes at the slot's confirmed LSN: whatever followed the
//!   last acknowledgement may be produced again, with the same `event_id` header.
//! - **Failures.** A failed send purges librdkafka's queue (every later message fails too,
//!   so none lands ahead of it), stops reading, and after a backoff sends the failed events
//!   again in stream order. Transient failures (broker unreachable, timeouts) are retried
//!   until they succeed; unclassified ones count against `max_attempts`, and a permanent one
//!   or an exhausted budget puts the event in the dead letters, where it counts as
//!   delivered. Feedback keeps flowing meanwhile (the replication client answers keepalives
//!   while the relay does not read), so the server never times the stream out.
//! - **Leaving.** A session that ends (shutdown, or a failure of the stream or database)
//!   purges what librdkafka has not sent yet and waits for the sends on the wire before it
//!   frees the lock, so no send of a former leader lands behind its successor's.
//! - **Idle.** With nothing in flight, a keepalive's WAL position is acknowledged, so the
//!   slot advances, and keeps no WAL, while no event is emitted.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::FusedFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use pgwire_replication::{FeedbackObserver, Lsn, ReplicationClient, ReplicationEvent};
use sqlx::{Connection, PgConnection, PgPool};
use tracing::{debug, info, warn};

use super::connection::replication_config;
use super::dead::WalDeadLetters;
use super::message::{decode, WalEvent};
use super::progress::{Progress, TxnId};
use super::WalStream;
use crate::backoff::Backoff;
use crate::environment::Environment;
use crate::error::{Error, ErrorClass, Result};
use crate::kafka::producer::{Acked, KafkaProducer, SendFailure};

/// Settings of a [`WalRelay`]. `Debug` hides the database password.
#[derive(Clone)]
pub struct WalRelayConfig {
    /// Service name: metric label.
    pub service: String,
    /// The stream to relay.
    pub stream: WalStream,
    /// `postgres://user[:password]@host[:port]/database[?sslmode=...]` of the database the
    /// stream's slot belongs to; the replication connection is opened with it (the role
    /// needs the REPLICATION attribute).
    pub database_url: String,
    /// Most events read and not yet acked by the broker (default 2 000).
    pub max_in_flight: usize,
    /// Most payload bytes read and not yet acked (default 4 MiB).
    pub max_in_flight_bytes: usize,
    /// Most time between an acknowledgement and the standby status update that reports it
    /// (default 1 s; 10 ms in testing).
    pub status_interval: Duration,
    /// How often a waiting relay tries to become the leader (default 1 s; 100 ms in
    /// testing).
    pub leader_poll: Duration,
    /// Retry schedule for failed sends (default 100 ms doubling to 10 s).
    pub backoff: Backoff,
    /// Unclassified failures of one event (an unknown topic, an error without a code)
    /// allowed before it goes to the dead letters (default 10, as table mode's
    /// [`crate::RelayConfig::max_attempts`]). Transient failures (broker down, timeouts)
    /// never count; permanent ones go to the dead letters at once.
    pub max_attempts: u32,
    /// Wait before reconnecting after the stream or the leadership failed (per
    /// [`Environment::error_backoff`]).
    pub reconnect_backoff: Duration,
    /// How long a stopping relay waits for in-flight sends (default 30 s). Past it, and
    /// whenever a session fails, the sends librdkafka has not started are purged and the
    /// ones on the wire waited for, up to the producer's delivery timeout, before the
    /// leadership is given up.
    pub drain_timeout: Duration,
    /// How often the slot's retained WAL is measured and the leader's lock connection
    /// checked (default 5 s; 1 s in testing).
    pub health_interval: Duration,
    /// Topic overrides, as [`crate::RelayConfig::topics`].
    pub topics: BTreeMap<String, String>,
}

impl std::fmt::Debug for WalRelayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalRelayConfig")
            .field("service", &self.service)
            .field("stream", &self.stream)
            .field(
                "database_url",
                &crate::error::redact_url(&self.database_url),
            )
            .field("max_in_flight", &self.max_in_flight)
            .field("max_in_flight_bytes", &self.max_in_flight_bytes)
            .field("status_interval", &self.status_interval)
            .field("leader_poll", &self.leader_poll)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

impl WalRelayConfig {
    /// Defaults for `service` in `env`.
    pub fn new(
        service: impl Into<String>,
        stream: WalStream,
        database_url: impl Into<String>,
        env: Environment,
    ) -> Self {
        let testing = env == Environment::Testing;
        Self {
            service: service.into(),
            stream,
            database_url: database_url.into(),
            max_in_flight: 2_000,
            max_in_flight_bytes: 4 << 20,
            status_interval: if testing {
                Duration::from_millis(10)
            } else {
                Duration::from_secs(1)
            },
            leader_poll: if testing {
                Duration::from_millis(100)
            } else {
                Duration::from_secs(1)
            },
            backoff: Backoff::default(),
            max_attempts: 10,
            reconnect_backoff: env.error_backoff(),
            drain_timeout: Duration::from_secs(30),
            health_interval: if testing {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(5)
            },
            topics: BTreeMap::new(),
        }
    }

    /// Checks the settings once.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the faulty setting.
    pub fn validate(&self) -> Result<()> {
        replication_config(&self.database_url, &self.stream)?;
        if self.max_in_flight == 0 {
            return Err(Error::config("max_in_flight", "at least 1", "0"));
        }
        if self.max_in_flight_bytes == 0 {
            return Err(Error::config("max_in_flight_bytes", "at least 1", "0"));
        }
        if self.max_attempts == 0 {
            return Err(Error::config("max_attempts", "at least 1", "0"));
        }
        Ok(())
    }
}

/// Longest the leader waits for the health check on its lock connection; past it the
/// connection counts as lost, and the lock with it (the session ends, as when the check
/// fails). A hung server or network would otherwise stall the check, and with it the whole
/// session, for good. Well inside the ~25 s of silence after which the server ends a vanished
/// leader's backend and frees its lock (see `lead`): with the default `health_interval` a
/// leader cut off leaves its session within 15 s.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a session waits for its replication connection to start streaming. The leader
/// holds the lock meanwhile, so a server that accepts the connection and never answers would
/// otherwise stall the stream for good, with every standby kept out.
const STREAM_START_TIMEOUT: Duration = Duration::from_secs(20);

/// `call`'s answer within [`HEALTH_TIMEOUT`]: past it the connection counts as failed (a hung
/// server or network), like any other failure of `what`.
async fn answered<T>(what: &'static str, call: impl Future<Output = sqlx::Result<T>>) -> Result<T> {
    bounded(what, async {
        call.await.map_err(|e| Error::storage(what, e))
    })
    .await
}

/// [`answered`] for a call that returns the crate's own errors.
async fn bounded<T>(what: &'static str, call: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(HEALTH_TIMEOUT, call)
        .await
        .map_err(|_| {
            Error::storage(
                what,
                sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the database did not answer within {HEALTH_TIMEOUT:?}"),
                )),
            )
        })?
}

#[derive(Debug, Default)]
struct Shared {
    /// Woken at each delivery.
    delivery: tokio::sync::Notify,
    leader: AtomicBool,
    received: AtomicU64,
    acked: AtomicU64,
    delivered: AtomicU64,
    dead: AtomicU64,
    sessions: AtomicU64,
}

/// What a [`WalRelay`] has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalProgress {
    /// It leads the stream right now.
    pub leader: bool,
    /// Commit LSN of the last transaction read.
    pub received_lsn: u64,
    /// The LSN acknowledged to the slot.
    pub acked_lsn: u64,
    /// Events acked by the broker.
    pub delivered: u64,
    /// Events put in the dead letters.
    pub dead: u64,
    /// Replication sessions started (1 + reconnects, while leading).
    pub sessions: u64,
}

/// The WAL-mode relay of one stream. Run several for availability: one leads, the others
/// wait and take over within `leader_poll` of its death.
#[derive(Debug, Clone)]
pub struct WalRelay {
    config: Arc<WalRelayConfig>,
    pool: PgPool,
    producer: Arc<KafkaProducer>,
    dead: WalDeadLetters,
    shared: Arc<Shared>,
}

/// One event queued with the producer.
struct Sending {
    seq: u64,
    txn: TxnId,
    commit_lsn: u64,
    committed_at: Instant,
    event: WalEvent,
    /// Failures that count against `max_attempts`.
    failures: u32,
}

struct Done {
    sending: Sending,
    result: std::result::Result<Acked, SendFailure>,
}

type InFlight = std::pin::Pin<Box<dyn Future<Output = Done> + Send>>;

impl WalRelay {
    /// A relay for `config.stream`; `pool` reaches the same database (leader lock, dead
    /// letters, slot health).
    ///
    /// # Errors
    /// [`Error::Configuration`] for bad settings.
    pub fn new(config: WalRelayConfig, pool: PgPool, producer: Arc<KafkaProducer>) -> Result<Self> {
        config.validate()?;
        let dead = WalDeadLetters::new(pool.clone(), config.stream.clone());
        Ok(Self {
            config: Arc::new(config),
            pool,
            producer,
            dead,
            shared: Arc::default(),
        })
    }

    /// What it has done so far.
    pub fn progress(&self) -> WalProgress {
        let s = &self.shared;
        WalProgress {
            leader: s.leader.load(Ordering::Relaxed),
            received_lsn: s.received.load(Ordering::Relaxed),
            acked_lsn: s.acked.load(Ordering::Relaxed),
            delivered: s.delivered.load(Ordering::Relaxed),
            dead: s.dead.load(Ordering::Relaxed),
            sessions: s.sessions.load(Ordering::Relaxed),
        }
    }

    /// Waits until at least `n` events were delivered (acked by the broker) since it was
    /// built.
    pub async fn delivered_at_least(&self, n: u64) {
        loop {
            let woken = self.shared.delivery.notified();
            if self.shared.delivered.load(Ordering::Acquire) >= n {
                return;
            }
            woken.await;
        }
    }

    /// Waits to lead, then relays until `shutdown` resolves; then stops reading, waits up to
    /// `drain_timeout` for the sends in flight, acknowledges what they completed and
    /// returns. Failures of the stream, the database or the leadership are logged and
    /// retried after `reconnect_backoff`; they never end the relay.
    ///
    /// # Errors
    /// None today; the `Result` leaves room for fatal conditions.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let mut shutdown = pin!(shutdown.fuse());
        let service = self.config.service.clone();
        // The end LSN up to which everything was delivered, across sessions: a new session
        // may be sent transactions again whose acknowledgement the server never got.
        let mut delivered_lsn = 0u64;
        // The server's system identifier and timeline that `delivered_lsn` was read on.
        let mut history = None;
        loop {
            let lock = tokio::select! {
                lock = self.lead() => lock,
                () = &mut shutdown => return Ok(()),
            };
            let outcome = match lock {
                Ok(mut conn) => {
                    self.shared.leader.store(true, Ordering::Relaxed);
                    crate::metrics::wal_leader(&service, true);
                    info!(stream = %self.config.stream, "leading the WAL stream");
                    let outcome = self
                        .session(&mut conn, &mut shutdown, &mut delivered_lsn, &mut history)
                        .await;
                    self.shared.leader.store(false, Ordering::Relaxed);
                    crate::metrics::wal_leader(&service, false);
                    // Closing the session frees the lock for the next leader.
                    let _ = conn.close().await;
                    outcome
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => return Ok(()),
                // Failed while draining for a shutdown it already took: nothing is left to
                // wait for (the future, fused, would never resolve again).
                Err(e) if shutdown.is_terminated() => {
                    warn!(stream = %self.config.stream, error = %error_chain(&e),
                          "WAL relay session failed while stopping");
                    return Ok(());
                }
                Err(e) => {
                    crate::metrics::relay_error(&service);
                    warn!(stream = %self.config.stream, error = %error_chain(&e),
                          "WAL relay session failed; reconnecting");
                    tokio::select! {
                        () = tokio::time::sleep(self.config.reconnect_backoff) => {}
                        () = &mut shutdown => return Ok(()),
                    }
                }
            }
        }
    }

    /// Connects and takes the stream's leader lock, retrying every `leader_poll` while
    /// another relay holds it. Each step is given up on after [`HEALTH_TIMEOUT`]: a standby
    /// stuck on a connection that stopped answering (a server that accepts and hangs, a
    /// partition that drops packets) would never take over; `run` connects again instead.
    async fn lead(&self) -> Result<PgConnection> {
        let options = self.pool.connect_options();
        let mut conn = answered("wal_lead", PgConnection::connect_with(&options)).await?;
        // The lock lives as long as the server's backend of this idle connection. A leader
        // host that vanishes (power loss, a partition) sends no FIN, and with the OS's
        // keepalive defaults the server would hold the lock, and keep every standby out,
        // for over two hours; these end the backend after about 25 s of silence.
        answered(
            "wal_lead",
            sqlx::query(
                "SELECT set_config('tcp_keepalives_idle', '10', false), \
                        set_config('tcp_keepalives_interval', '5', false), \
                        set_config('tcp_keepalives_count', '3', false), \
                        set_config('tcp_user_timeout', '25000', false)",
            )
            .execute(&mut conn),
        )
        .await?;
        loop {
            let got: bool = answered(
                "wal_lead",
                sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                    .bind(self.config.stream.leader_lock())
                    .fetch_one(&mut conn),
            )
            .await?;
            if got {
                return Ok(conn);
            }
            tokio::time::sleep(self.config.leader_poll).await;
        }
    }

    /// Reads and relays while leading; `Ok` only once `shutdown` stopped it and it drained.
    #[allow(clippy::too_many_lines)]
    async fn session(
        &self,
        lock: &mut PgConnection,
        shutdown: &mut std::pin::Pin<&mut futures::future::Fuse<impl Future<Output = ()>>>,
        delivered_lsn: &mut u64,
        history: &mut Option<String>,
    ) -> Result<()> {
        let cfg = &self.config;
        let service = cfg.service.clone();
        let observer_service = service.clone();
        let repl = replication_config(&cfg.database_url, &cfg.stream)?
            .with_status_interval(cfg.status_interval)
            // Decoded messages waiting for the relay: bounded memory, not speed (a read
            // takes what is there).
            .with_buffer_size(256)
            .with_wakeup_interval(cfg.status_interval.max(Duration::from_secs(1)))
            .with_application_name(format!("outpost-wal-{}", cfg.stream))
            .with_feedback_observer(FeedbackObserver::new(move |sent| {
                crate::metrics::wal_feedback_age(&observer_service, sent.pending_for);
            }));
        let stream_err = |e: pgwire_replication::PgWireError| Error::WalStream {
            slot: cfg.stream.slot(),
            source: Box::new(e),
        };
        // `connect` only starts the client's worker; a start given up on (timed out, or
        // stopping) aborts that worker, which would otherwise stay on the silent socket.
        let mut client = ReplicationClient::connect_gated(repl)
            .await
            .map_err(stream_err)?;
        // The server the stream opens on, read on the same session before it starts.
        let start = async {
            let system = client.identify_system().await?;
            client.start().await?;
            client.wait_started().await.map(|()| system)
        };
        let started = tokio::select! {
            started = tokio::time::timeout(STREAM_START_TIMEOUT, start) => Some(started),
            () = &mut *shutdown => None,
        };
        match started {
            Some(Ok(Ok(system))) => {
                // Positions compare only within one history of one cluster. After a
                // failover (a promoted standby's new timeline), a restore, or another
                // cluster behind the same address, the events committed there below the
                // position delivered before are new ones: skipped as delivered, they would
                // be lost, and the slot confirmed past them.
                let now = format!("system {} timeline {}", system.system_id, system.timeline);
                if let Some(before) = history.replace(now.clone()) {
                    if before != now && *delivered_lsn > 0 {
                        warn!(stream = %cfg.stream, before, now,
                              "the database's history changed (failover, restore or another cluster): \
                               positions delivered before no longer count; events may be sent twice");
                        *delivered_lsn = 0;
                    }
                }
            }
            Some(Ok(Err(e))) => return Err(stream_err(e)),
            Some(Err(_)) => {
                client.abort();
                return Err(stream_err(pgwire_replication::PgWireError::Io(
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the replication connection did not start within {STREAM_START_TIMEOUT:?}"),
                    )
                    .into(),
                )));
            }
            None => {
                client.abort();
                return Ok(());
            }
        }
        self.shared.sessions.fetch_add(1, Ordering::Relaxed);
        if *delivered_lsn > 0 {
            client.update_applied_lsn(Lsn::from_u64(*delivered_lsn));
        }
        let prefix = cfg.stream.prefix();
        let mut progress = Progress::default();
        let mut sends: FuturesUnordered<InFlight> = FuturesUnordered::new();
        let mut failed: BTreeMap<u64, Sending> = BTreeMap::new();
        let mut attempt = 0u32;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let (mut rows, mut bytes) = (0usize, 0usize);
        let mut seq = 0u64;
        // The token of the last message queued (see `send`).
        let mut queued_on: Option<u64> = None;
        // The transaction being read: its queue id, commit LSN, commit time, and whether it
        // was delivered in an earlier session.
        let mut current: Option<(TxnId, u64, Instant, bool)> = None;
        let mut stopping = false;
        let mut stop_deadline = None;
        let mut health = tokio::time::interval(cfg.health_interval);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let ack = |client: &ReplicationClient, lsn: u64, delivered_lsn: &mut u64| {
            client.update_applied_lsn(Lsn::from_u64(lsn));
            *delivered_lsn = (*delivered_lsn).max(lsn);
            self.shared.acked.store(*delivered_lsn, Ordering::Relaxed);
        };

        // Every way out of the loop, a failure included, passes the settling below: sends
        // still in flight must be resolved before the lock is given up.
        let outcome = async {
            loop {
                if stopping && (sends.is_empty() || stop_deadline.is_some_and(|d| Instant::now() >= d))
                {
                    break;
                }
                let can_read = !stopping
                    && failed.is_empty()
                    && rows < cfg.max_in_flight
                    && bytes < cfg.max_in_flight_bytes;
                let retry_due = async {
                    match retry_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => futures::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    () = &mut *shutdown, if !stopping => {
                        stopping = true;
                        stop_deadline = Some(Instant::now() + cfg.drain_timeout);
                    }
                    Some(done) = sends.next(), if !sends.is_empty() => {
                        rows -= 1;
                        bytes -= done.sending.event.size();
                        match done.result {
                            Ok(_) => {
                                attempt = 0;
                                if failed.range(..done.sending.seq).any(|(_, f)| f.event.key == done.sending.event.key) {
                                    crate::metrics::order_break(&service);
                                }
                                if let Some(lsn) = self.delivered(&done.sending, &mut progress) {
                                    ack(&client, lsn, delivered_lsn);
                                }
                            }
                            Err(f) => {
                                let mut s = done.sending;
                                let class = f.class;
                                if class != ErrorClass::Permanent {
                                    // Every later message queued for the partition fails too, so
                                    // none lands ahead of this one.
                                    self.producer.purge_behind(&f);
                                }
                                if class == ErrorClass::Retriable {
                                    s.failures += 1;
                                }
                                let give_up = match class {
                                    ErrorClass::Permanent => true,
                                    ErrorClass::Retriable => s.failures >= cfg.max_attempts,
                                    ErrorClass::Transient => false,
                                };
                                if !give_up {
                                    debug!(error = %f, "WAL event send failed");
                                    self.retry_later(&mut failed, s, &mut attempt, &mut retry_at, class);
                                    continue;
                                }
                                let reason = match class {
                                    ErrorClass::Retriable => format!("{} ({class}; failed {} times)", f.error, s.failures),
                                    _ => format!("{} ({class})", f.error),
                                };
                                // Not written, the session ends: the event is read again by the
                                // next one, whose lead is checked first (a database that does not
                                // answer may have freed the lock to a successor meanwhile).
                                bounded("wal_dead_letter", self.dead.record(&s.event, s.commit_lsn, class.as_str(), &reason)).await?;
                                warn!(event_id = %s.event.event_id, topic = %s.event.topic.escape_debug(),
                                      reason, "WAL event dead-lettered");
                                crate::metrics::parked(&service, class);
                                self.shared.dead.fetch_add(1, Ordering::Relaxed);
                                if let Some(lsn) = progress.done(s.txn) {
                                    ack(&client, lsn, delivered_lsn);
                                }
                            }
                        }
                    }
                    () = retry_due, if retry_at.is_some() && sends.is_empty() && !stopping => {
                        retry_at = None;
                        for (_, s) in std::mem::take(&mut failed) {
                            let size = s.event.size();
                            match self.send(&mut sends, &mut queued_on, s) {
                                None => (rows, bytes) = (rows + 1, bytes + size),
                                Some(s) => hold(&mut failed, &mut retry_at, s),
                            }
                        }
                    }
                    _ = health.tick() => {
                        let check = sqlx::query_scalar(
                            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint \
                             FROM pg_replication_slots WHERE slot_name = $1")
                            .bind(cfg.stream.slot())
                            .fetch_optional(&mut *lock);
                        let retained: Option<i64> =
                            answered("wal_health", check).await?.flatten();
                        crate::metrics::wal_retained(&service, retained.unwrap_or(0));
                        crate::metrics::wal_lsns(&service, self.shared.received.load(Ordering::Relaxed), *delivered_lsn);
                    }
                    event = client.recv(), if can_read => {
                        let Some(event) = event.map_err(stream_err)? else {
                            return Err(Error::WalStream {
                                slot: cfg.stream.slot(),
                                source: "the server ended the replication stream".into(),
                            });
                        };
                        match event {
                            ReplicationEvent::Begin { final_lsn, .. } => {
                                let txn = progress.begin();
                                let lsn = final_lsn.as_u64();
                                self.shared.received.store(lsn, Ordering::Relaxed);
                                current = Some((txn, lsn, Instant::now(), lsn < *delivered_lsn));
                            }
                            ReplicationEvent::Message { transactional, prefix: p, content, lsn } if p == prefix => {
                                let Some((txn, commit_lsn, committed_at, replayed)) = current else {
                                    warn!(%lsn, transactional, "a message of this stream outside a transaction was ignored: \
                                          emit only with pg_logical_emit_message(true, ...)");
                                    continue;
                                };
                                if replayed {
                                    continue;
                                }
                                match decode(content.clone()) {
                                    Ok(event) => {
                                        progress.sent(txn);
                                        let size = event.size();
                                        seq += 1;
                                        let s = Sending { seq, txn, commit_lsn, committed_at, event, failures: 0 };
                                        match self.send(&mut sends, &mut queued_on, s) {
                                            None => (rows, bytes) = (rows + 1, bytes + size),
                                            Some(s) => hold(&mut failed, &mut retry_at, s),
                                        }
                                    }
                                    Err(reason) => {
                                        warn!(%lsn, reason = %reason.escape_debug(), "a message of this stream is not an Outpost event; dead-lettered");
                                        bounded("wal_dead_letter", self.dead.record_undecodable(&content, commit_lsn, &reason)).await?;
                                        self.shared.dead.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                            ReplicationEvent::Commit { end_lsn, .. } => {
                                if let Some((txn, ..)) = current.take() {
                                    if let Some(lsn) = progress.commit(txn, end_lsn.as_u64()) {
                                        ack(&client, lsn, delivered_lsn);
                                    }
                                }
                            }
                            // Nothing read is waiting: everything before this position was sent and
                            // delivered, so the slot may move past it.
                            ReplicationEvent::KeepAlive { wal_end, .. }
                                if current.is_none() && progress.is_idle() && wal_end.as_u64() > *delivered_lsn =>
                            {
                                ack(&client, wal_end.as_u64(), delivered_lsn);
                            }
                            _ => {}
                        }
                    }
                }
            }
            Ok::<(), Error>(())
        }
        .await;
        if !sends.is_empty() {
            // Left in librdkafka, this session's messages would go on with nobody handling
            // their reports: one that times out while a later one of its key lands is sent
            // again by the next session after that one, out of order. Fail the unsent ones
            // now and wait for those on the wire (librdkafka reports every message within
            // its delivery timeout).
            self.producer.purge_queued();
            let deadline = tokio::time::Instant::now()
                + self.producer.config().delivery_timeout
                + Duration::from_secs(1);
            while let Ok(Some(done)) = tokio::time::timeout_at(deadline, sends.next()).await {
                if done.result.is_ok() {
                    if let Some(lsn) = self.delivered(&done.sending, &mut progress) {
                        ack(&client, lsn, delivered_lsn);
                    }
                }
            }
            if !sends.is_empty() {
                warn!(stream = %cfg.stream, unreported = sends.len(),
                      "WAL sends still unreported past the delivery timeout; leaving the stream anyway");
            }
        }
        // Report the last acknowledgement before closing: stopping does not send one.
        let deadline = Instant::now() + cfg.status_interval * 3 + Duration::from_millis(500);
        let metrics = client.metrics();
        while metrics.last_applied_lsn().as_u64() < progress.acked().max(*delivered_lsn)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
        outcome
    }

    /// Counts `s` as delivered; returns a newly acknowledgeable LSN, if any.
    fn delivered(&self, s: &Sending, progress: &mut Progress) -> Option<u64> {
        crate::metrics::published(
            &self.config.service,
            &s.event.topic,
            s.committed_at.elapsed(),
        );
        self.shared.delivered.fetch_add(1, Ordering::Release);
        self.shared.delivery.notify_waiters();
        progress.done(s.txn)
    }

    /// Queues `s` with the producer, behind this session's messages still out only: while
    /// any is, `queued_on` (the token of the last one queued) must still be current. The
    /// producer may be shared (the CLI runs every service's relay on one), and another
    /// relay's failure can replace its instance or purge its queue; a message queued after
    /// that could land ahead of an earlier one of its key, still out on the old instance or
    /// purged and not yet reported. Then `s` comes back, to be sent once those resolved.
    #[must_use]
    fn send(
        &self,
        sends: &mut FuturesUnordered<InFlight>,
        queued_on: &mut Option<u64>,
        s: Sending,
    ) -> Option<Sending> {
        let topic = self
            .config
            .topics
            .get(&s.event.topic)
            .unwrap_or(&s.event.topic)
            .clone();
        let behind = if sends.is_empty() { None } else { *queued_on };
        match self.producer.enqueue_on(
            &topic,
            &s.event.key,
            &s.event.payload,
            &s.event.headers,
            behind,
        ) {
            Ok(None) => return Some(s),
            Ok(Some((pending, token))) => {
                *queued_on = Some(token);
                sends.push(Box::pin(async move {
                    Done {
                        result: pending.await,
                        sending: s,
                    }
                }));
            }
            // A full queue (not below librdkafka's 100 000 messages: the in-flight cap is
            // lower) or a topic librdkafka cannot take; handled as any failed send.
            Err(f) => sends.push(Box::pin(async move {
                Done {
                    sending: s,
                    result: Err(f),
                }
            })),
        }
        None
    }

    fn retry_later(
        &self,
        failed: &mut BTreeMap<u64, Sending>,
        s: Sending,
        attempt: &mut u32,
        retry_at: &mut Option<tokio::time::Instant>,
        class: ErrorClass,
    ) {
        crate::metrics::retried(&self.config.service, class);
        failed.insert(s.seq, s);
        if retry_at.is_none() {
            *attempt += 1;
            *retry_at = Some(tokio::time::Instant::now() + self.config.backoff.delay(*attempt));
        }
    }
}

/// Keeps `s`, refused by [`WalRelay::send`], for a send as soon as nothing is out: reads
/// stop meanwhile (the retry map is not empty), so nothing queued overtakes it.
fn hold(
    failed: &mut BTreeMap<u64, Sending>,
    retry_at: &mut Option<tokio::time::Instant>,
    s: Sending,
) {
    failed.insert(s.seq, s);
    retry_at.get_or_insert_with(tokio::time::Instant::now);
}

fn error_chain(e: &Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::producer::ProducerConfig;
    use rdkafka::error::KafkaError;

    fn sending(seq: u64) -> Sending {
        Sending {
            seq,
            txn: seq,
            commit_lsn: seq,
            committed_at: Instant::now(),
            event: WalEvent {
                event_id: uuid::Uuid::new_v4(),
                topic: "t".into(),
                key: "k".into(),
                headers: BTreeMap::new(),
                payload: bytes::Bytes::from_static(b"{}"),
            },
            failures: 0,
        }
    }

    /// Nothing is queued behind messages still out on an instance that was replaced, or
    /// whose queue was purged since, whoever did it: it could land ahead of them.
    #[tokio::test]
    async fn a_message_waits_for_those_out_before_a_replaced_instance_or_a_purge() {
        // No broker: messages stay queued, which is all this needs.
        let producer = Arc::new(KafkaProducer::new(ProducerConfig::new("127.0.0.1:9")).unwrap());
        let url = "postgres://postgres@127.0.0.1:9/none";
        let config = WalRelayConfig::new(
            "s",
            WalStream::new("s").unwrap(),
            url,
            crate::Environment::Testing,
        );
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy(url)
            .unwrap();
        let relay = WalRelay::new(config, pool, Arc::clone(&producer)).unwrap();
        let mut sends = FuturesUnordered::new();
        let mut queued_on = None;
        assert!(relay.send(&mut sends, &mut queued_on, sending(1)).is_none());
        assert!(relay.send(&mut sends, &mut queued_on, sending(2)).is_none());

        // Another user of the producer replaced its instance.
        producer.rebuild(producer.generation(), &KafkaError::Canceled);
        let refused = relay.send(&mut sends, &mut queued_on, sending(3));
        assert_eq!(refused.map(|s| s.seq), Some(3));
        assert_eq!(sends.len(), 2);

        // Once nothing is out, on the new instance; then another user purges its queue.
        producer.purge_queued();
        while sends.next().await.is_some() {}
        assert!(relay.send(&mut sends, &mut queued_on, sending(3)).is_none());
        producer.purge_queued();
        let refused = relay.send(&mut sends, &mut queued_on, sending(4));
        assert_eq!(refused.map(|s| s.seq), Some(4));
    }
}
