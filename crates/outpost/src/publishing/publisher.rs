//! The API services call: one [`Publisher`], three modes.
//!
//! - [`Mode::Transactional`] (the default, and the one to use for state changes): the event
//!   is staged in the caller's transaction; right after commit it is produced, and
//!   `commit()` returns on the broker's ack, so latency is one broker round trip (plus one
//!   claim statement for a key whose row existed before the transaction: one it created
//!   was leased by its staging); the row is settled in the background, batched with other
//!   commits' settles, its key leased until then. If that dispatch fails, or
//!   the process dies after commit, the relay delivers the row. The eager path leases the
//!   row's *key* exactly as the relay does, so the two never both send it, and it sends
//!   the key's pending rows oldest first: it never overtakes an older event of the key.
//! - [`Mode::KafkaFirst`] (HuleEdu's July 2025 pattern, for callers with no database state
//!   to protect): produce directly with a bounded deadline; on a transient failure store
//!   the same bytes (same `event_id`) in the outbox in a transaction of its own and wake
//!   the relay. A circuit breaker skips Kafka after consecutive failures. **Windows:** a
//!   crash between the caller's commit and the Kafka ack loses the event; a publish before
//!   the caller's commit can announce state that is then rolled back; a direct send that
//!   timed out may still land later, as a duplicate with the same `event_id`.
//! - [`Mode::OutboxOnly`]: stage in the transaction and let the woken relay deliver (the
//!   design HuleEdu ended with): no work after commit beyond a wake-up hint.
//! - [`Mode::Wal`]: emit the event into PostgreSQL's WAL in the caller's transaction
//!   ([`crate::wal::emit()`], stream named after the outbox's schema); the stream's
//!   [`WalRelay`](crate::WalRelay) delivers it in commit order. No table row, no work after
//!   commit (eager dispatch does not apply).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use sqlx::{PgConnection, Postgres, Transaction};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::error::ErrorClass;
use crate::error::{Error, EventContext, Result};
use crate::event::envelope::OutboxEvent;
use crate::kafka::producer::{Acked, KafkaProducer, SendFailure};
use crate::outbox::store::{
    ClaimedEvent, ClaimedKey, KeyLock, KeyRelease, OutboxStore, Settlement, StagedRow,
};
use crate::publishing::breaker::{Admission, BreakerConfig, CircuitBreaker, CircuitState};
use crate::publishing::detached::Detachable;
use crate::publishing::leased::LeasedKeys;
use crate::publishing::turns::{KeyTurns, Turn};
use crate::relay::settling::{RowOutcome, SettleOp, Settler};
use crate::relay::verdict::RetryPolicy;
use crate::relay::wake::{validate_service, Waker};
use crate::relay::{longest_send, RelayConfig};
use crate::wal::WalStream;
use crate::Environment;

/// Most rows of one key an eager dispatch sends (its own and older ones still pending).
const EAGER_ROWS_PER_KEY: usize = 32;

/// The longest Kafka-first waits for the database to say whether the key has an event
/// waiting in the outbox.
const KEY_CHECK_TIMEOUT: Duration = Duration::from_millis(100);

/// How a publisher gets events to Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Stage in the caller's transaction, produce right after commit, relay as the net.
    #[default]
    Transactional,
    /// Produce directly; fall back to the outbox when Kafka fails.
    KafkaFirst,
    /// Stage in the caller's transaction; the woken relay delivers.
    OutboxOnly,
    /// Emit into the WAL in the caller's transaction; the WAL relay delivers.
    Wal,
}

impl Mode {
    /// Lowercase, hyphenated name (`transactional`, `kafka-first`, `outbox-only`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transactional => "transactional",
            Self::KafkaFirst => "kafka-first",
            Self::OutboxOnly => "outbox-only",
            Self::Wal => "wal",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "transactional" => Ok(Self::Transactional),
            "kafka-first" => Ok(Self::KafkaFirst),
            "outbox-only" => Ok(Self::OutboxOnly),
            "wal" => Ok(Self::Wal),
            _ => Err(Error::config(
                "mode",
                "one of transactional, kafka-first, outbox-only, wal",
                s,
            )),
        }
    }
}

/// Publisher settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PublisherConfig {
    /// Service name: metric label, wake-up key.
    pub service: String,
    /// Default mode (default transactional); [`Publisher::with_mode`] picks per call site.
    pub mode: Mode,
    /// Kafka-first: the longest a direct publish may take before the event goes to the
    /// outbox (default 1 s).
    pub direct_deadline: Duration,
    /// Transactional: the longest `commit()` waits for eager dispatch after the database
    /// commit before leaving the events to the relay (default 5 s; it only matters when
    /// Kafka is slow or down, and after a few failures the circuit opens and commits stop
    /// waiting at all).
    pub dispatch_deadline: Duration,
    /// Circuit breaker: Kafka-first skips Kafka while it is open, and the transactional
    /// mode skips eager dispatch (the relay delivers).
    pub breaker: BreakerConfig,
    /// Delivery settings shared with the relay (lease, backoff, attempt budget, rows per
    /// key); use the relay's, so the eager path settles rows exactly as the relay would.
    pub delivery: RelayConfig,
    /// How staging locks an event's key (default [`KeyLock::Exclusive`]: transactions
    /// staging the same key commit one after the other, so Kafka sees them in commit
    /// order). [`KeyLock::Shared`] is for callers that already serialize per key.
    pub key_lock: KeyLock,
}

impl PublisherConfig {
    /// Defaults for `service` in `env`.
    pub fn new(service: impl Into<String>, env: Environment) -> Self {
        let service = service.into();
        Self {
            delivery: RelayConfig::new(service.clone(), env),
            service,
            mode: Mode::default(),
            direct_deadline: Duration::from_secs(1),
            dispatch_deadline: Duration::from_secs(5),
            breaker: BreakerConfig::default(),
            key_lock: KeyLock::default(),
        }
    }
}

/// The publisher; cheap to clone, safe to share.
#[derive(Debug, Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
    mode: Mode,
}

#[derive(Debug)]
struct Inner {
    store: OutboxStore,
    producer: Arc<KafkaProducer>,
    waker: Waker,
    config: PublisherConfig,
    policy: RetryPolicy,
    owner: Uuid,
    breaker: Mutex<CircuitBreaker>,
    /// Settles eager dispatches; concurrent commits share its statements.
    settler: Settler,
    /// Eager dispatches still running (they outlive a `commit()` that stopped waiting),
    /// and the settles of acked ones.
    dispatches: TaskTracker,
    /// The eager dispatches of each key in line: a later dispatch of a key waits until the
    /// earlier one let go of it (acked, and settled unless it kept the key for the next),
    /// then claims it or reads on after the rows sent.
    turns: Arc<KeyTurns>,
    /// The WAL stream named after the outbox's schema (`None` when the schema is too long
    /// to name a slot).
    wal: Option<WalStream>,
}

impl Inner {
    /// Runs `work` while renewing the lease on `keys` every third of it: a slow ack or
    /// settle must not let the lease lapse while acked rows are not yet marked published,
    /// or a relay would claim the key and send them again.
    async fn holding<T>(&self, keys: &[String], work: impl std::future::Future<Output = T>) -> T {
        let lease = self.config.delivery.lease;
        let mut work = std::pin::pin!(work);
        let mut renewals =
            tokio::time::interval_at(tokio::time::Instant::now() + lease / 3, lease / 3);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = renewals.tick() => {
                    match self.store.renew(self.owner, keys, lease).await {
                        Ok(held) if held.len() < keys.len() => {
                            // Its sends are already queued; the key's next owner may send
                            // some of them again.
                            warn!(lost = keys.len() - held.len(), "eager dispatch stalled past its lease");
                            crate::metrics::leases_lost(&self.config.service, keys.len() - held.len());
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "eager dispatch could not renew its lease"),
                    }
                }
            }
        }
    }
}

/// An event staged in a transaction that has not been dispatched yet.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "pass it to Publisher::after_commit once the transaction has committed"]
pub struct Staged {
    /// The staged event's id.
    pub event_id: Uuid,
    /// Its partition key.
    pub event_key: String,
    /// Whether this stage inserted the row (`false`: the event id was staged before).
    pub inserted: bool,
}

/// What happened right after a commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dispatch {
    /// Events this commit staged that the eager path delivered.
    pub eager_published: usize,
    /// Events this commit staged that are left to the relay (which was woken).
    pub left_to_relay: usize,
}

/// Which path a Kafka-first event took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishPath {
    /// Acked by Kafka directly.
    Direct,
    /// Stored in the outbox; the relay delivers it.
    Outbox,
}

impl Publisher {
    /// A publisher over `store`, producing with `producer`, waking the relay with `waker`.
    ///
    /// # Errors
    /// [`Error::Configuration`] for invalid settings.
    pub fn new(
        store: OutboxStore,
        producer: Arc<KafkaProducer>,
        waker: Waker,
        config: PublisherConfig,
    ) -> Result<Self> {
        validate_service(&config.service)?;
        config.delivery.validate(longest_send(&producer))?;
        if config.dispatch_deadline.is_zero() {
            return Err(Error::config(
                "dispatch_deadline",
                "a positive duration",
                "0",
            ));
        }
        if config.direct_deadline.is_zero() {
            return Err(Error::config("direct_deadline", "a positive duration", "0"));
        }
        if config.breaker.failure_threshold == 0 {
            return Err(Error::config(
                "breaker.failure_threshold",
                "a positive integer",
                "0",
            ));
        }
        let store = store
            .with_service(&config.service)
            .with_key_lock(config.key_lock)
            .deleting_published(config.delivery.retention.is_zero())
            .with_statement_timeout(Some(config.delivery.statement_timeout));
        let owner = Uuid::new_v4();
        let wal = match WalStream::new(store.table().schema()) {
            Ok(stream) => Some(stream),
            Err(e) if config.mode == Mode::Wal => return Err(e),
            Err(_) => None,
        };
        Ok(Self {
            mode: config.mode,
            inner: Arc::new(Inner {
                settler: Settler::start(store.clone(), owner),
                store,
                producer,
                waker,
                breaker: Mutex::new(CircuitBreaker::new(config.breaker)),
                policy: config.delivery.retry_policy(),
                config,
                owner,
                dispatches: TaskTracker::new(),
                turns: Arc::new(KeyTurns::default()),
                wal,
            }),
        })
    }

    /// The same publisher in another mode (for one call site).
    #[must_use]
    pub fn with_mode(&self, mode: Mode) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            mode,
        }
    }

    /// This publisher's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The outbox it stages into.
    pub fn store(&self) -> &OutboxStore {
        &self.inner.store
    }

    /// Opens a transaction for business writes and events; [`OutboxTx::commit`] commits
    /// and then dispatches, so the post-commit step cannot be forgotten.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when no connection is available.
    pub async fn begin(&self) -> Result<OutboxTx> {
        let tx = self
            .inner
            .store
            .pool()
            .begin()
            .await
            .map_err(|e| Error::storage("begin", e))?;
        Ok(OutboxTx {
            tx,
            publisher: self.clone(),
            staged: Vec::new(),
            leased: LeasedKeys::default(),
        })
    }

    /// Stages `event` in a transaction the caller owns. After the caller commits, pass the
    /// result to [`after_commit`](Self::after_commit); a caller who forgets loses only
    /// latency: the row is pending and unleased, and the relay finds it by polling.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the insert fails.
    pub async fn stage(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &OutboxEvent,
    ) -> Result<Staged> {
        if self.mode == Mode::Wal {
            let stream = self.inner.wal.as_ref().ok_or_else(|| {
                Error::config(
                    "schema",
                    "at most 55 bytes in WAL mode (the slot is named outpost_<schema>)",
                    self.inner.store.table().schema(),
                )
            })?;
            crate::wal::emit(tx, stream, event).await?;
            return Ok(Staged {
                event_id: event.event_id,
                event_key: event.event_key.clone(),
                inserted: true,
            });
        }
        let inserted = self.inner.store.stage(tx, event).await?.is_some();
        Ok(Staged {
            event_id: event.event_id,
            event_key: event.event_key.clone(),
            inserted,
        })
    }

    /// Runs the post-commit step of the publisher's mode: eager dispatch (transactional)
    /// or a wake-up hint (outbox-only, and for whatever the eager path could not send).
    /// Never fails: the events are committed, so the worst case is relay latency.
    pub async fn after_commit(&self, staged: Vec<Staged>) -> Dispatch {
        self.after_commit_with(staged, LeasedKeys::default()).await
    }

    /// [`after_commit`](Self::after_commit) for a transaction that leased the key rows its
    /// staging created.
    async fn after_commit_with(&self, staged: Vec<Staged>, leased: LeasedKeys) -> Dispatch {
        if staged.is_empty() {
            return Dispatch::default();
        }
        let committed = staged.iter().filter(|s| s.inserted).count();
        crate::metrics::staged(&self.inner.config.service, committed);
        let dispatch = match self.mode {
            Mode::Transactional => self.dispatch_eagerly(&staged, leased).await,
            Mode::OutboxOnly | Mode::KafkaFirst => Dispatch {
                eager_published: 0,
                left_to_relay: staged.len(),
            },
            // The WAL relay reads the stream; it needs no wake-up.
            Mode::Wal => {
                return Dispatch {
                    eager_published: 0,
                    left_to_relay: staged.len(),
                }
            }
        };
        if dispatch.left_to_relay > 0 {
            self.inner.waker.nudge().await;
        }
        dispatch
    }

    /// Eager dispatch, bounded by `dispatch_deadline` and skipped while the circuit is
    /// open, so a Kafka outage never makes `commit()` wait out delivery timeouts. A
    /// dispatch that outlives the deadline finishes (and settles its rows) in the
    /// background, tracked so [`shutdown`](Self::shutdown) can wait for it; its events
    /// count as left to the relay.
    async fn dispatch_eagerly(&self, staged: &[Staged], mut leased: LeasedKeys) -> Dispatch {
        let left = Dispatch {
            eager_published: 0,
            left_to_relay: staged.len(),
        };
        let Some(probe) = Probe::take(self) else {
            crate::metrics::eager(&self.inner.config.service, 0, staged.len());
            // The relay, woken next, must find the keys free (the staging turn is held
            // until they are).
            self.hand_back(leased.keys().cloned()).await;
            self.hand_back_behind(leased.untaken().cloned().collect());
            return left;
        };
        let mut keys: Vec<String> = staged.iter().map(|s| s.event_key.clone()).collect();
        keys.sort();
        keys.dedup();
        // Taken here, before the task starts, so dispatches of a key go in commit order; the
        // keys leased while staging took theirs then (see `LeasedKeys::turn`).
        let mut turn = match leased.turn() {
            Some(mut turn) => {
                turn.committed();
                turn.extend(&keys);
                turn
            }
            None => self.inner.turns.take(&keys),
        };
        // Keys a later turn held when this one reached them (see `Turn::extend`) go in a
        // dispatch of their own, under a turn taken now, behind that later turn: it waits
        // only for turns taken before it, and nothing of this dispatch waits for it. Sent
        // by claim, never from memory (the later turn may have claimed their rows).
        let later: Vec<String> = keys.iter().filter(|k| !turn.holds(k)).cloned().collect();
        let keys: Vec<String> = keys.into_iter().filter(|k| !later.contains(k)).collect();
        let (staged, staged_later): (Vec<Staged>, Vec<Staged>) = staged
            .iter()
            .cloned()
            .partition(|s| !later.contains(&s.event_key));
        turn.expect(staged.iter().map(|s| s.event_id));
        // The probe first: no turn is taken that would go unused.
        let second = (!later.is_empty())
            .then(|| {
                Probe::take(self).map(|probe| {
                    let mut turn = self.inner.turns.take(&later);
                    turn.expect(staged_later.iter().map(|s| s.event_id));
                    (turn, probe)
                })
            })
            .flatten();
        let publisher = self.clone();
        let task = self.inner.dispatches.spawn(async move {
            let first = publisher.dispatch_now(&staged, keys, turn, probe, leased);
            let Some((turn, probe)) = second else {
                let mut dispatch = first.await;
                if !staged_later.is_empty() {
                    // The circuit let one probe through, and this commit has it.
                    let service = &publisher.inner.config.service;
                    crate::metrics::eager(service, 0, staged_later.len());
                    dispatch.left_to_relay += staged_later.len();
                    publisher.hand_back_behind(later);
                }
                return dispatch;
            };
            let second =
                publisher.dispatch_now(&staged_later, later, turn, probe, LeasedKeys::default());
            let (first, second) = futures::join!(first, second);
            Dispatch {
                eager_published: first.eager_published + second.eager_published,
                left_to_relay: first.left_to_relay + second.left_to_relay,
            }
        });
        match tokio::time::timeout(self.inner.config.dispatch_deadline, task).await {
            Ok(Ok(dispatch)) => dispatch,
            Ok(Err(_)) => left,
            Err(_) => {
                // Kafka is too slow to wait for: count it, so the circuit opens and later
                // commits stop waiting.
                self.breaker(|b| b.on_failure(Instant::now()));
                left
            }
        }
    }

    /// Hands back keys a transaction leased while staging that no dispatch will send (a
    /// no-op for any this owner no longer holds).
    async fn hand_back(&self, keys: impl Iterator<Item = String>) {
        let keys: Vec<KeyRelease> = keys.map(KeyRelease::done).collect();
        if keys.is_empty() {
            return;
        }
        if let Err(e) = self.inner.store.settle(self.inner.owner, &[], &keys).await {
            warn!(error = %e, "could not hand back keys leased while staging; the relay takes them once the lease lapses");
        }
    }

    /// [`hand_back`](Self::hand_back) in the background, for a commit that failed: it may
    /// have committed all the same, and its keys must not wait for their leases to lapse
    /// before the relay may deliver.
    fn hand_back_later(&self, leased: LeasedKeys) {
        if leased.is_empty() {
            return;
        }
        self.hand_back_behind(leased.untaken().cloned().collect());
        let publisher = self.clone();
        self.inner
            .dispatches
            .spawn(async move { publisher.hand_back(leased.keys().cloned()).await });
    }

    /// Hands back `keys` that no dispatch of this commit will send, once every dispatch of
    /// them taken before is done (through the settler, after what those settle). For keys
    /// whose turn a later commit holds: the lease is this process's, so handed back at once
    /// it could free the key under that commit's dispatch; left alone, it stayed leased
    /// until it lapsed, and the relay delivered nothing of the key meanwhile.
    fn hand_back_behind(&self, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        let mut turn = self.inner.turns.take(&keys);
        let publisher = self.clone();
        self.inner.dispatches.spawn(async move {
            turn.ready().await;
            let settled = publisher.queue_settle(SettleOp {
                release: keys.iter().cloned().map(KeyRelease::done).collect(),
                ..SettleOp::default()
            });
            let _ = publisher.inner.holding(&keys, settled).await;
            drop(turn);
        });
    }

    /// The lease staging may take on the key rows it creates: in the transactional mode,
    /// while the circuit is closed (when it is not, no dispatch follows the commit).
    fn staging_lease(&self) -> Option<(Uuid, Duration)> {
        let closed = self
            .inner
            .breaker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state(Instant::now())
            == CircuitState::Closed;
        (self.mode == Mode::Transactional && closed)
            .then_some((self.inner.owner, self.inner.config.delivery.lease))
    }

    /// Claims the keys just written (one statement; none for keys the transaction leased
    /// while staging), sends their rows, many per key, and settles them with whatever other
    /// commits are settling (one shared statement).
    async fn dispatch_now(
        &self,
        staged: &[Staged],
        keys: Vec<String>,
        mut turn: Turn,
        mut probe: Probe,
        leased: LeasedKeys,
    ) -> Dispatch {
        let inner = &self.inner;
        let service = inner.config.service.as_str();
        // An earlier dispatch of one of these keys may still be sending, or have returned on
        // its acks with its settle on the way: claiming before it let go would find the key
        // leased and leave this commit's events to the relay.
        turn.ready().await;
        // The dispatch before may have sent this commit's events with its own (a dispatch
        // claims a key's next rows): a key with nothing of this commit left is not claimed.
        let sent_before =
            turn.sent_before(staged.iter().map(|s| (s.event_id, s.event_key.as_str())));
        // Keys the transaction leased while staging hold only its rows: they are sent as
        // staged, not claimed (see `LeasedKeys`); unless a dispatch before sent some of them
        // (it claims under this process's lease): then the key is read like any other.
        let own_since = leased.since();
        let mut own = leased
            .into_sendable(inner.config.delivery.lease)
            .unwrap_or_default();
        own.retain(|k| !k.rows.iter().any(|r| sent_before.contains(&r.event_id)));
        let owned: HashSet<&str> = own.iter().map(|k| k.key.as_str()).collect();
        let keys: Vec<String> = keys
            .into_iter()
            .filter(|k| !owned.contains(k.as_str()))
            .collect();
        let (keys, skipped): (Vec<String>, Vec<String>) = keys.into_iter().partition(|key| {
            staged
                .iter()
                .any(|s| s.event_key == *key && !sent_before.contains(&s.event_id))
        });
        // A skipped key kept for this dispatch is passed on at once: the next dispatch of
        // it goes now, not after this one's other keys are sent (a hot key shared by many
        // commits would otherwise move one commit's round trip at a time). One with no
        // later turn is handed back below, with the turn held until that is written.
        let mut hand_back = Vec::new();
        for key in skipped {
            if turn.followed(&key) {
                turn.release(&key);
            } else {
                hand_back.push(key);
            }
        }
        // A key the dispatch before kept with all its rows acked is read on from there (its
        // settle may still be on its way, so claiming would find those rows pending).
        let kept = turn.kept_through(&keys);
        let keys: Vec<String> = keys.into_iter().filter(|k| !kept.contains_key(k)).collect();
        let lease = inner.config.delivery.lease;
        let mut kept_since: HashMap<String, Instant> = kept
            .iter()
            .map(|(key, (_, since))| (key.clone(), *since))
            .collect();
        let after: Vec<(String, i64)> = kept
            .into_iter()
            .map(|(key, (through, _))| (key, through))
            .collect();
        // A kept lease goes from dispatch to dispatch of a busy key, renewed only while one
        // of them sends: one older than a third of the lease is renewed before its rows are
        // read (sent under a lease about to lapse, they could meet a relay's sends of the
        // key; the read checks only that the lease has not lapsed yet).
        let stale: Vec<String> = kept_since
            .iter()
            .filter(|(_, since)| since.elapsed() >= lease / 3)
            .map(|(key, _)| key.clone())
            .collect();
        // A key with a backlog is the relay's to drain: the commit only helps out with a
        // few rows ahead of its own, so it never waits for a whole backlog.
        let per_key = EAGER_ROWS_PER_KEY.max(staged.len());
        let started = Instant::now();
        let claim = async {
            let mut found = Vec::new();
            if !stale.is_empty() {
                let renewing = Instant::now();
                // A key not held any more is not read below: it comes back empty.
                for key in inner.store.renew(inner.owner, &stale, lease).await? {
                    kept_since.insert(key, renewing);
                }
            }
            if !after.is_empty() {
                found = inner.store.fetch(inner.owner, &after, per_key).await?;
                // A kept key with nothing after the rows acked before comes back absent (the
                // next commit's row went with them, or was parked): still leased to this
                // process, it goes back, or on to its next dispatch, like any other key.
                let read: HashSet<&str> = found.iter().map(|k| k.key.as_str()).collect();
                let empty: Vec<ClaimedKey> = after
                    .iter()
                    .filter(|(key, _)| !read.contains(key.as_str()))
                    .map(|(key, _)| ClaimedKey {
                        key: key.clone(),
                        rows: Vec::new(),
                    })
                    .collect();
                found.extend(empty);
            }
            if !keys.is_empty() {
                found.extend(
                    inner
                        .store
                        .claim_keys(inner.owner, &keys, per_key, inner.config.delivery.lease)
                        .await?,
                );
            }
            Ok::<_, Error>(found)
        };
        let mut claimed = match claim.await {
            Ok(mut keys) => {
                keys.splice(0..0, own);
                keys
            }
            Err(e) => {
                warn!(error = %e, "eager dispatch could not claim; leaving events to the relay");
                crate::metrics::eager(service, 0, staged.len());
                // Nothing of this dispatch is sent. Every key it may hold goes back: those
                // leased while staging, those kept for it, those a claim that failed late
                // may have leased all the same (a no-op for keys not held). Queued behind
                // the dispatch before's settle: a kept key's acked rows are marked first.
                let mut op = SettleOp::default();
                let mut held: Vec<String> = own.into_iter().map(|k| k.key).collect();
                held.extend(after.into_iter().map(|(key, _)| key));
                held.extend(keys);
                held.extend(hand_back);
                op.release = held.iter().cloned().map(KeyRelease::done).collect();
                let settled = self.queue_settle(op);
                self.hold_until_settled(held, settled, Some(turn));
                return Dispatch {
                    eager_published: 0,
                    left_to_relay: staged.len(),
                };
            }
        };
        let claim_took = started.elapsed();
        crate::relay::trace_read(inner.owner, "claimed (eager)", &claimed);
        inner.config.delivery.retarget(&mut claimed);
        // A key's rows go out in runs of one topic: every first run is queued before any ack
        // is awaited (librdkafka keeps a key's rows in this order on its partition), and a
        // key's next run only once its previous one was acked in full. librdkafka keeps
        // order within one partition only: a row failing retriably for its own topic (one
        // that does not exist) fails nothing queued for another, so a later row of its key
        // there would land ahead of its retry.
        let producer = &inner.producer;
        // A later run starts only while every lease of this dispatch is young enough for a
        // send to end before it lapses, as `LeasedKeys::into_sendable` requires of the first
        // (renewals are not counted on: one may fail, and another owner take the key).
        // A key's lease holds since its claim (`started`), its staging (`own_since`) or what
        // the dispatch before kept it with, whichever is oldest.
        let leased_since = |key: &str| {
            let since = own_since.map_or(started, |since| since.min(started));
            kept_since.get(key).map_or(since, |kept| since.min(*kept))
        };
        let send_until = claimed
            .iter()
            .map(|k| leased_since(&k.key))
            .min()
            .unwrap_or(started)
            + lease / 2;
        let mut sends = Vec::new();
        for key in &claimed {
            let mut runs = key.rows.chunk_by(|a, b| a.topic == b.topic);
            // Not even a first run once the leases are too old to send under: the key goes
            // back with its rows pending.
            let first = runs
                .next()
                .map(|run| (Instant::now() < send_until).then(|| queue_run(producer, run)));
            sends.push(async move {
                let Some(first) = first else {
                    return (Vec::new(), false);
                };
                let Some((queued, mut cut)) = first else {
                    return (Vec::new(), true);
                };
                let mut results = futures::future::join_all(queued).await;
                for run in runs {
                    if cut
                        || results.iter().any(|(_, result)| result.is_err())
                        || Instant::now() >= send_until
                    {
                        // Left pending: a failed row is retried first, a cut key goes back.
                        cut = true;
                        break;
                    }
                    // Nothing of the key is out now: any producer instance will do.
                    let (queued, cut_here) = queue_run(producer, run);
                    results.extend(futures::future::join_all(queued).await);
                    cut = cut_here;
                }
                (results, cut)
            });
        }
        let held: Vec<String> = claimed.iter().map(|k| k.key.clone()).collect();
        let sent = inner.holding(&held, futures::future::join_all(sends)).await;
        // Keys with later rows left unsent (after a failure, a row refused before queueing,
        // or a replaced producer instance; see `queue_run`): they stay pending, the key goes
        // back.
        let cut: HashSet<&str> = claimed
            .iter()
            .zip(&sent)
            .filter(|(_, (_, cut))| *cut)
            .map(|(key, _)| key.key.as_str())
            .collect();
        let results = sent.into_iter().flat_map(|(results, _)| results);
        let mut op = SettleOp::default();
        let mut failed: HashMap<&str, (i64, Settlement)> = HashMap::new();
        let mut published = HashSet::new();
        for (row, result) in results {
            let latency = (chrono::Utc::now() - row.created_at)
                .to_std()
                .unwrap_or_default();
            let (settlement, class) = match result {
                Ok(acked) => {
                    probe.answered();
                    published.insert(row.event_id);
                    (
                        Settlement::Published {
                            partition: acked.partition,
                            offset: acked.offset,
                        },
                        None,
                    )
                }
                Err(failure) => {
                    match failure.class {
                        // The purge, if one was due, was made when the failure came in. A
                        // purged row says nothing of the broker (see `publish_kafka_first`).
                        ErrorClass::Transient if failure.is_purged() => {}
                        ErrorClass::Transient => probe.failed(),
                        ErrorClass::Retriable | ErrorClass::Permanent => probe.answered(),
                    }
                    let verdict = inner.policy.verdict(service, row, &failure);
                    if matches!(verdict, Settlement::Retry { .. }) {
                        let first = failed
                            .get(row.event_key.as_str())
                            .is_none_or(|(id, _)| row.id < *id);
                        if first {
                            failed.insert(&row.event_key, (row.id, verdict));
                        }
                        continue;
                    }
                    (verdict, Some(failure.class))
                }
            };
            op.rows.push(RowOutcome {
                id: row.id,
                settlement,
                topic: row.topic.clone(),
                latency,
                class,
            });
        }
        // Keys kept for their next dispatch, let go only once this one's settle is queued.
        let mut kept = Vec::new();
        for key in &claimed {
            // The next dispatch of the key skips what was sent here.
            let events = key.rows.iter().map(|r| r.event_id);
            turn.sent(&key.key, events.filter(|id| published.contains(id)));
            match failed.remove(key.key.as_str()) {
                Some((id, settlement)) => {
                    let (delay, transient) = match &settlement {
                        Settlement::Retry {
                            delay, transient, ..
                        } => (Some(*delay), *transient),
                        _ => (None, false),
                    };
                    op.rows.push(RowOutcome {
                        id,
                        settlement,
                        topic: String::new(),
                        latency: Duration::ZERO,
                        class: Some(if transient {
                            ErrorClass::Transient
                        } else {
                            ErrorClass::Retriable
                        }),
                    });
                    op.release.push(KeyRelease {
                        key: key.key.clone(),
                        backoff: delay,
                        transient,
                    });
                }
                None if cut.contains(key.key.as_str()) => {
                    op.release.push(KeyRelease::done(key.key.clone()));
                }
                // The next dispatch of the key in this process waits for this one: it keeps
                // the lease, or the woken relay could take the key in between and leave that
                // commit's events to itself. It goes now, reading after these rows (their
                // settle may still be on its way).
                None if turn.keep_for_next(
                    &key.key,
                    key.rows.iter().map(|r| r.id).max(),
                    leased_since(&key.key),
                ) =>
                {
                    kept.push(key.key.as_str());
                }
                // An empty key row stays behind; a relay deletes it when it next claims it.
                None => op.release.push(KeyRelease::done(key.key.clone())),
            }
        }
        // A no-op unless this owner holds the key.
        op.release
            .extend(hand_back.into_iter().map(KeyRelease::done));
        drop(probe);
        let hits = staged
            .iter()
            .filter(|s| published.contains(&s.event_id) || sent_before.contains(&s.event_id))
            .count();
        let misses = staged.len() - hits;
        crate::metrics::eager(service, hits, misses);
        debug!(service, hits, misses, ?claim_took, total = ?started.elapsed(), "eager dispatch");
        let dispatch = Dispatch {
            eager_published: hits,
            left_to_relay: misses,
        };
        if op.rows.is_empty() && op.release.is_empty() {
            // Nothing to write (everything was sent before, the key is passed on): the next
            // dispatch of the key goes at once, not after a settle round of its own.
            drop(turn);
            return dispatch;
        }
        // The commit returns on the acks; the settle is written with other commits' (one
        // shared statement) while the keys stay leased, in the background, tracked so
        // `shutdown` waits for it. A row acked and not yet settled is sent again only if
        // the process dies first, as before.
        let releasing = !op.release.is_empty();
        let settled = self.queue_settle(op);
        // Only now may a key's next dispatch go. The settler writes ops in the order they
        // were queued, so whatever that dispatch hands back is written after these rows are
        // marked. Let go before this op was queued, it could hand the key back first, and a
        // relay would claim the key and send these acked rows again.
        for key in kept {
            turn.release(key);
        }
        // The keys still held are handed back (or failed): their next dispatch waits until
        // that is written, since a hand-back written after its claim would take its lease.
        self.hold_until_settled(held, settled, releasing.then_some(turn));
        dispatch
    }

    /// Queues `op` with the settler (written in queue order); resolves once it is written.
    fn queue_settle(&self, mut op: SettleOp) -> tokio::sync::oneshot::Receiver<()> {
        let (done, settled) = tokio::sync::oneshot::channel();
        op.done = Some(done);
        self.inner.settler.send(op);
        settled
    }

    /// Keeps `held` leased, and `turn` taken, until `settled` (in the background, tracked
    /// so `shutdown` waits for it).
    fn hold_until_settled(
        &self,
        held: Vec<String>,
        settled: tokio::sync::oneshot::Receiver<()>,
        turn: Option<Turn>,
    ) {
        let publisher = self.clone();
        self.inner.dispatches.spawn(async move {
            let _ = publisher.inner.holding(&held, settled).await;
            drop(turn);
        });
    }

    /// Waits (at most `timeout`) for eager dispatches still running in the background, for
    /// Kafka-first publishes whose callers stopped waiting (their fallbacks), and for their
    /// settle statements, so a deploy does not cut sends off mid-flight (which
    /// would make the relay send those events again). Call it before the process exits;
    /// publishing after it still works.
    pub async fn shutdown(&self, timeout: Duration) {
        let inner = &self.inner;
        inner.dispatches.close();
        let _ = tokio::time::timeout(timeout, inner.dispatches.wait()).await;
        inner.dispatches.reopen();
        let _ = tokio::time::timeout(timeout, inner.settler.flush()).await;
    }

    /// Publishes one event without a business transaction.
    ///
    /// Kafka-first: produce directly within `direct_deadline`; on a transient failure (or
    /// with the circuit open, or while an earlier event of the same key waits in the
    /// outbox) store the same bytes in the outbox and wake the relay. Other modes: stage
    /// in a transaction of its own, then run the mode's post-commit step.
    ///
    /// Success means acked by Kafka or committed to the outbox, never less.
    ///
    /// # Errors
    /// [`Error::KafkaPublish`] for a permanent Kafka error (the outbox cannot help);
    /// [`Error::OutboxStorage`] (with aggregate, event type, topic, correlation id and the
    /// cause) when the event could not be stored either.
    pub async fn publish(&self, event: &OutboxEvent) -> Result<PublishPath> {
        let dispatch = self.publish_all(std::slice::from_ref(event)).await?;
        Ok(if dispatch.eager_published > 0 {
            PublishPath::Direct
        } else {
            PublishPath::Outbox
        })
    }

    /// Publishes several events without a business transaction, as [`publish`](Self::publish)
    /// does one, in one go: in Kafka-first mode one outbox check for all their keys, every
    /// send queued before any ack is awaited (one broker round trip for the lot), and
    /// whatever falls back stored in one transaction; in the other modes one transaction.
    ///
    /// Events of one key reach Kafka in slice order: once one of them falls back, the rest
    /// of its key follow it into the outbox (librdkafka fails what was queued behind it).
    /// Returns how many were acked directly and how many were left to the relay.
    ///
    /// # Errors
    /// [`Error::KafkaPublish`] for the first event Kafka rejected permanently (every other
    /// event was still acked or stored); [`Error::OutboxStorage`] when the events that fell
    /// back could not be stored (those acked before stay acked).
    pub async fn publish_all(&self, events: &[OutboxEvent]) -> Result<Dispatch> {
        if events.is_empty() {
            return Ok(Dispatch::default());
        }
        if self.mode != Mode::KafkaFirst {
            let mut tx = self.begin().await?;
            tx.publish_all(events).await?;
            return tx.commit().await;
        }
        // To the end even if the caller stops waiting (a request cancelled, a timeout of its
        // own): once sends are queued, one that fails must still put its event in the
        // outbox, and nobody but this would. Tracked, so `shutdown` waits for it too.
        let publisher = self.clone();
        let events = events.to_vec();
        let publish = async move { publisher.publish_kafka_first(&events).await };
        Detachable::new(self.inner.dispatches.track_future(publish)).await
    }

    /// [`publish_all`](Self::publish_all) in Kafka-first mode.
    async fn publish_kafka_first(&self, events: &[OutboxEvent]) -> Result<Dispatch> {
        let inner = &self.inner;
        let service = inner.config.service.as_str();
        let mut keys: Vec<String> = events.iter().map(|e| e.event_key.clone()).collect();
        keys.sort();
        keys.dedup();
        // An eager dispatch of a key in this process holds rows that look pending until its
        // settle is written: wait for it (briefly) rather than send its events to the outbox
        // for nothing; one still sending after that wait may not be overtaken.
        let (pending, unchecked) = if tokio::time::timeout(
            KEY_CHECK_TIMEOUT,
            inner.turns.idle(&keys),
        )
        .await
        .is_err()
        {
            (keys.into_iter().collect(), false)
        } else {
            // Any publisher process may have left an event of these keys in the outbox; a
            // direct send must not overtake it. A database that does not answer at once
            // may still hold one: the events go to the outbox (if it cannot take them
            // either, the caller gets the error), never past an event left there.
            match tokio::time::timeout(KEY_CHECK_TIMEOUT, inner.store.pending_keys(&keys)).await {
                Ok(Ok(pending)) => (pending, false),
                Ok(Err(e)) => {
                    warn!(error = %e, "Kafka-first could not check the outbox for its keys; storing the events there");
                    (keys.into_iter().collect(), true)
                }
                Err(_) => (keys.into_iter().collect(), true),
            }
        };
        let direct: Vec<&OutboxEvent> = events
            .iter()
            .filter(|e| !pending.contains(&e.event_key))
            .collect();
        let held_back = if unchecked {
            "key_check_failed"
        } else {
            "key_pending"
        };
        let behind = |event: &OutboxEvent, otherwise: &'static str| {
            if pending.contains(&event.event_key) {
                held_back
            } else {
                otherwise
            }
        };
        if direct.is_empty() {
            let all: Vec<_> = events.iter().map(|e| (e, held_back)).collect();
            self.fall_back(&all).await?;
            return Ok(Dispatch {
                eager_published: 0,
                left_to_relay: events.len(),
            });
        }
        let (allowed, probe) = {
            let mut breaker = inner.breaker.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let admitted = breaker.admit(now);
            crate::metrics::circuit(service, breaker.state(now).as_gauge());
            (admitted.is_some(), admitted == Some(Admission::Probe))
        };
        if !allowed {
            let all: Vec<_> = events
                .iter()
                .map(|e| (e, behind(e, "circuit_open")))
                .collect();
            self.fall_back(&all).await?;
            return Ok(Dispatch {
                eager_published: 0,
                left_to_relay: events.len(),
            });
        }
        let mut abandoned_probe = AbandonedProbe {
            publisher: self,
            armed: probe,
        };
        // The sends run to completion, in a task of their own once given up on. Abandoned at
        // the deadline, a failure would never reach the producer, whose replace-when-stuck
        // logic (needed after a broker restart) would then never run: the circuit would
        // never close.
        // Later runs of a key start only while the caller still waits: past the deadline it
        // stores what was not acked in the outbox, and a later run sent then would land
        // twice.
        let until = Instant::now() + inner.config.direct_deadline;
        let send = {
            let producer = Arc::clone(&inner.producer);
            let messages: Vec<Message> = direct
                .iter()
                .map(|e| Message {
                    topic: inner.config.delivery.topic_for(&e.topic).to_owned(),
                    key: e.event_key.clone(),
                    payload: e.payload.clone(),
                    headers: e.headers.clone(),
                })
                .collect();
            // A panic is caught as the task it used to run in caught it: no outcome.
            Detachable::new(
                std::panic::AssertUnwindSafe(async move {
                    send_in_order(&producer, messages, until).await
                })
                .catch_unwind(),
            )
        };
        let sent = tokio::time::timeout(inner.config.direct_deadline, send).await;
        abandoned_probe.armed = false;
        let gave_up = if sent.is_err() {
            "timeout"
        } else {
            "kafka_error"
        };
        // Sends given up on have no outcome: they fall back like the unsent.
        let outcomes: Vec<Option<std::result::Result<Acked, SendFailure>>> = match sent {
            Ok(Ok(outcomes)) => outcomes,
            Ok(Err(_)) => {
                warn!("direct publish panicked; its events fall back to the outbox");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        let mut outcomes = outcomes.into_iter();
        let (mut answered, mut failed) = (false, false);
        let mut rejected = None;
        let mut acked = 0;
        let mut stored: Vec<(&OutboxEvent, &'static str)> = Vec::new();
        let mut fell: HashSet<&str> = HashSet::new();
        for event in events {
            if pending.contains(&event.event_key) {
                stored.push((event, "key_pending"));
                continue;
            }
            match outcomes.next().flatten() {
                Some(Ok(_)) => {
                    answered = true;
                    acked += 1;
                    crate::metrics::direct(service, "acked");
                    info!(event_id = %event.event_id, topic = %event.topic, path = "direct", "published");
                    if fell.contains(event.event_key.as_str()) {
                        // Only possible when the broker came back between the two messages'
                        // timeouts; the one that fell back is delivered after it.
                        warn!(key = %event.event_key, event_id = %event.event_id, "a later event of a key was acked after an earlier one fell back");
                        crate::metrics::order_break(service);
                    }
                }
                Some(Err(failure)) if failure.class == ErrorClass::Permanent => {
                    answered = true; // the broker (or the producer's own check) answered
                                     // The key's later events, held back behind it, are not broker failures
                                     // either.
                    fell.insert(&event.event_key);
                    crate::metrics::direct(service, "rejected");
                    rejected.get_or_insert(Error::KafkaPublish {
                        topic: event.topic.clone(),
                        class: failure.class,
                        source: failure.error,
                    });
                }
                Some(Err(failure)) => {
                    // A retriable failure is per topic (unknown topic, corrupt message): the
                    // broker answered, so the circuit stays closed; the relay retries it
                    // within its budget. A purged event says nothing of the broker: the
                    // failure that called for the purge counts for itself (here or in the
                    // call that met it), and one of a topic that does not exist must not
                    // open the circuit for every other event.
                    if failure.class == ErrorClass::Retriable {
                        answered = true;
                    } else if !failure.is_purged() {
                        failed = true;
                    }
                    debug!(error = %failure, "direct publish failed");
                    crate::metrics::direct(service, "failed");
                    fell.insert(&event.event_key);
                    stored.push((event, "kafka_error"));
                }
                // Not sent (an earlier event of its key failed or could not be queued), or
                // the sends were given up on. Only the key's first counts for the circuit:
                // the rest follow it.
                None => {
                    if !fell.contains(event.event_key.as_str()) {
                        failed = true;
                    }
                    crate::metrics::direct(service, "failed");
                    fell.insert(&event.event_key);
                    stored.push((event, gave_up));
                }
            }
        }
        if failed {
            self.breaker(|b| b.on_failure(Instant::now()));
        } else if answered {
            self.breaker(|b| b.on_success());
        } else if probe {
            // Every send of this probe was purged: Kafka said nothing, the next call probes
            // (left as it was, the circuit would stay half-open, and closed to all, for good).
            self.breaker(CircuitBreaker::release_probe);
        }
        if !stored.is_empty() {
            self.fall_back(&stored).await?;
        }
        match rejected {
            Some(error) => Err(error),
            None => Ok(Dispatch {
                eager_published: acked,
                left_to_relay: stored.len(),
            }),
        }
    }

    fn breaker(&self, f: impl FnOnce(&mut CircuitBreaker)) {
        let mut breaker = self.inner.breaker.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut breaker);
        crate::metrics::circuit(
            &self.inner.config.service,
            breaker.state(Instant::now()).as_gauge(),
        );
    }

    /// Stores what Kafka-first could not send in one transaction, in the order given, and
    /// wakes the relay.
    async fn fall_back(&self, events: &[(&OutboxEvent, &'static str)]) -> Result<()> {
        let inner = &self.inner;
        let first = events[0].0;
        let context = || EventContext {
            aggregate_type: Some(first.aggregate_type.clone()),
            aggregate_id: Some(first.aggregate_id.clone()),
            event_type: Some(first.event_type.clone()),
            topic: Some(first.topic.clone()),
            correlation_id: Some(first.correlation_id),
        };
        let owned: Vec<OutboxEvent> = events.iter().map(|(e, _)| (*e).clone()).collect();
        let stored = async {
            let mut tx = inner.store.pool().begin().await?;
            inner
                .store
                .stage_all(&mut tx, &owned)
                .await
                .map_err(|e| match e {
                    Error::OutboxStorage { source, .. } => source,
                    other => sqlx::Error::Protocol(other.to_string()),
                })?;
            tx.commit().await
        }
        .await;
        if let Err(source) = stored {
            warn!(event_id = %first.event_id, events = events.len(), error = %source, "kafka-first: kafka failed and the outbox write failed too");
            return Err(Error::storage_with(
                "kafka_first_fallback",
                context(),
                source,
            ));
        }
        crate::metrics::staged(&inner.config.service, events.len());
        for (event, reason) in events {
            crate::metrics::fallback(&inner.config.service, reason);
            info!(event_id = %event.event_id, topic = %event.topic, path = "outbox", reason, "published");
        }
        inner.waker.nudge().await;
        Ok(())
    }
}

/// One Kafka-first message to send.
struct Message {
    topic: String,
    key: String,
    payload: Vec<u8>,
    headers: BTreeMap<String, String>,
}

/// A row sent eagerly, and how its send ended.
type RowSent<'a> = (&'a ClaimedEvent, std::result::Result<Acked, SendFailure>);

/// Queues one key's `run` of rows (one topic) in order, all on one producer instance;
/// returns the wait for each queued row's outcome, and whether rows were left unsent (a
/// row refused before queueing, after which nothing more of the key may go, or the
/// instance replaced meanwhile, a new producer id, which the broker does not order after
/// the first; or a purge run meanwhile, which may have failed the first).
fn queue_run<'a>(
    producer: &'a Arc<KafkaProducer>,
    run: &'a [ClaimedEvent],
) -> (Vec<impl Future<Output = RowSent<'a>> + 'a>, bool) {
    let mut sends = Vec::new();
    let mut on = None;
    for row in run {
        let ack = match crate::relay::sending::enqueue(producer, row, on) {
            Ok(Some((ack, token))) => {
                on = Some(token);
                Ok(ack)
            }
            Ok(None) => return (sends, true),
            Err(failure) => Err(failure),
        };
        let refused = ack.is_err();
        sends.push(async move {
            let result = match ack {
                Ok(ack) => {
                    let result = ack.await;
                    // At once, not after every ack is in: see `KafkaProducer::purge_queued`
                    // (nothing queued after a timed-out row may land without it). Not for a
                    // refusal (a full queue): that row never entered the queue, and nothing
                    // of its key follows it.
                    if let Err(f) = &result {
                        if f.class == ErrorClass::Transient {
                            producer.purge_behind(f);
                        }
                    }
                    result
                }
                Err(failure) => Err(failure),
            };
            (row, result)
        });
        if refused {
            let unsent = run.last().is_some_and(|last| last.id != row.id);
            return (sends, unsent);
        }
    }
    (sends, false)
}

/// Sends `messages` in order, each key's in runs of one topic: every key's first run is
/// queued before any ack is awaited, and a key's next run once its previous one was acked in
/// full, before `until`. librdkafka keeps order within a partition only: a message failing
/// for its own topic alone (one that does not exist) fails nothing queued for another, so
/// a later message of its key there would land ahead of its retry. `None` for a message
/// not sent because an earlier one of its key failed or could not be queued, or `until`
/// passed. A failed delivery whose event goes to the outbox (any but a permanent failure)
/// purges what is still queued (see [`KafkaProducer::purge_queued`]).
async fn send_in_order(
    producer: &Arc<KafkaProducer>,
    messages: Vec<Message>,
    until: Instant,
) -> Vec<Option<std::result::Result<Acked, SendFailure>>> {
    let mut outcomes: Vec<Option<std::result::Result<Acked, SendFailure>>> =
        messages.iter().map(|_| None).collect();
    // Keys whose next message may not go: one of theirs failed, or could not be queued.
    let mut stopped: HashSet<&str> = HashSet::new();
    let mut left: Vec<usize> = (0..messages.len()).collect();
    while !left.is_empty() && Instant::now() < until {
        let mut run_topic: HashMap<&str, &str> = HashMap::new();
        // The producer's token for each key's run: the rest of the run goes to the same
        // instance with no purge since, or not at all (on a replacement, under a new producer
        // id, the broker would not order them after the first ones; after a purge, they could
        // land ahead of a purged one's retry); those fall back.
        let mut tokens: HashMap<&str, u64> = HashMap::new();
        let mut later = Vec::new();
        let mut queued = Vec::new();
        for i in left {
            let m = &messages[i];
            let key = m.key.as_str();
            if stopped.contains(key) {
                continue;
            }
            if *run_topic.entry(key).or_insert(m.topic.as_str()) != m.topic {
                // The key's next run; its later messages wait behind it.
                run_topic.insert(key, "");
                later.push(i);
                continue;
            }
            let on = tokens.get(key).copied();
            match producer.enqueue_on(&m.topic, key, &m.payload, &m.headers, on) {
                Ok(Some((ack, token))) => {
                    tokens.insert(key, token);
                    queued.push((i, Ok(ack)));
                }
                Ok(None) => {
                    stopped.insert(key);
                }
                Err(failure) => {
                    stopped.insert(key);
                    queued.push((i, Err(failure)));
                }
            }
        }
        let results = futures::future::join_all(queued.into_iter().map(|(i, queued)| async move {
            let result = match queued {
                Ok(ack) => {
                    let result = ack.await;
                    // Its event goes to the outbox unless the failure is permanent: what is
                    // still queued must not land ahead of it, be it a later event of its key
                    // or another call's. librdkafka purges by itself only when a request
                    // failed (gapless guarantee); a retriable failure of one topic (it does
                    // not exist) leaves the other queues alone. As in the WAL relay. A
                    // permanent failure is never retried: nothing can overtake it.
                    if let Err(f) = &result {
                        if f.class != ErrorClass::Permanent {
                            producer.purge_behind(f);
                        }
                    }
                    result
                }
                Err(failure) => {
                    // Refused: it never entered the queue, and the rest of its key is not
                    // queued after it; a retriable refusal (a topic known not to exist)
                    // purges nothing, a transient one (a full queue) purges as its failed
                    // delivery would.
                    if failure.class == ErrorClass::Transient {
                        producer.purge_queued();
                    }
                    Err(failure)
                }
            };
            (i, result)
        }))
        .await;
        for (i, result) in results {
            if result.is_err() {
                stopped.insert(messages[i].key.as_str());
            }
            outcomes[i] = Some(result);
        }
        left = later;
    }
    outcomes
}

/// Permission to try Kafka from the circuit breaker. When it was the half-open probe it is
/// resolved on every path: an answer from the broker closes the circuit, a transient
/// failure reopens it, and a probe dropped without either (nothing was claimed, the claim
/// failed, the task died) is released so the next call can probe.
struct Probe {
    publisher: Publisher,
    /// Taken while the circuit was not closed: the half-open probe.
    half_open: bool,
    answered: bool,
    failed: bool,
}

impl Probe {
    fn take(publisher: &Publisher) -> Option<Self> {
        let admitted = publisher
            .inner
            .breaker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Instant::now())?;
        Some(Self {
            publisher: publisher.clone(),
            half_open: admitted == Admission::Probe,
            answered: false,
            failed: false,
        })
    }

    fn answered(&mut self) {
        self.answered = true;
    }

    fn failed(&mut self) {
        self.failed = true;
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let (answered, failed, half_open) = (self.answered, self.failed, self.half_open);
        self.publisher.breaker(|b| {
            if failed {
                b.on_failure(Instant::now());
            } else if answered {
                b.on_success();
            } else if half_open {
                // Only the probe's own release: one taken while the circuit was closed
                // would free the half-open probe of another call, and two would run.
                b.release_probe();
            }
        });
    }
}

/// A half-open probe whose caller dropped the `publish` future before it finished counts
/// as failed: without a report the breaker would stay half-open, letting no probe through
/// and sending every call to the outbox, for good.
struct AbandonedProbe<'a> {
    publisher: &'a Publisher,
    armed: bool,
}

impl Drop for AbandonedProbe<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.publisher.breaker(|b| b.on_failure(Instant::now()));
        }
    }
}

/// A business transaction that stages events; committing it dispatches them.
///
/// Dereferences to the connection, so business statements run on it:
/// `sqlx::query("UPDATE ...").execute(&mut *tx)`. Dropping it without commit rolls back.
#[derive(Debug)]
pub struct OutboxTx {
    tx: Transaction<'static, Postgres>,
    publisher: Publisher,
    staged: Vec<Staged>,
    leased: LeasedKeys,
}

impl OutboxTx {
    /// Stages `event` in this transaction.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the insert fails; roll back.
    pub async fn publish(&mut self, event: &OutboxEvent) -> Result<()> {
        if self.publisher.mode == Mode::Wal {
            let staged = self.publisher.stage(&mut self.tx, event).await?;
            self.staged.push(staged);
            return Ok(());
        }
        let lease = self.publisher.staging_lease();
        let sent = Instant::now();
        let row = self
            .publisher
            .inner
            .store
            .stage_leasing(&mut self.tx, event, lease)
            .await?;
        self.add(event, row, sent);
        Ok(())
    }

    /// Records a staged event, and its row as one to send from memory when its key was
    /// leased while staging (by this stage or an earlier one of the transaction).
    fn add(&mut self, event: &OutboxEvent, row: Option<StagedRow>, sent: Instant) {
        if let Some(row) = row {
            if row.key_leased || self.leased.holds(&event.event_key) {
                let turns = &self.publisher.inner.turns;
                self.leased.add(event, row.id, sent, turns);
            }
        }
        self.staged.push(Staged {
            event_id: event.event_id,
            event_key: event.event_key.clone(),
            inserted: row.is_some(),
        });
    }

    /// Stages `events` in this transaction in one statement (one round trip instead of one
    /// per event; the rows keep the order given).
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the insert fails; roll back.
    pub async fn publish_all(&mut self, events: &[OutboxEvent]) -> Result<()> {
        if self.publisher.mode == Mode::Wal {
            for event in events {
                self.publish(event).await?;
            }
            return Ok(());
        }
        let lease = self.publisher.staging_lease();
        let sent = Instant::now();
        let rows = self
            .publisher
            .inner
            .store
            .stage_all_leasing(&mut self.tx, events, lease)
            .await?;
        for (event, row) in events.iter().zip(rows) {
            self.add(event, row, sent);
        }
        Ok(())
    }

    /// Commits, then runs the mode's post-commit step. In [`Mode::Transactional`] it returns
    /// once the eager dispatch was acked (or gave up within `dispatch_deadline`); the acked
    /// rows are marked published right after, in the background
    /// ([`Publisher::shutdown`] waits for that).
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the commit fails. Usually nothing was committed then;
    /// but when the connection broke while the server was committing (an I/O error after
    /// `COMMIT` was sent), the transaction may have committed, and its events are then
    /// delivered by the relay. A caller that retries after such an error should reuse the
    /// same `event_id`s: staging is idempotent on them, so a retry never adds a duplicate
    /// (while the first one's row is kept: with `retention` 0 a published row is gone at
    /// once, and the retry is staged anew).
    pub async fn commit(self) -> Result<Dispatch> {
        let (publisher, staged, leased) = self.commit_only().await?;
        Ok(publisher.after_commit_with(staged, leased).await)
    }

    /// Commits and hands back what the post-commit step needs. A failed commit may have
    /// committed all the same: the keys leased while staging are handed back then, so the
    /// relay need not wait for their leases to lapse.
    async fn commit_only(mut self) -> Result<(Publisher, Vec<Staged>, LeasedKeys)> {
        // PostgreSQL answers the `COMMIT` of a transaction that a failed statement aborted
        // with `ROLLBACK`, not with an error, and sqlx reports success; and a savepoint rolled
        // back undoes rows without a word: either way rows leased while staging would be
        // sent from memory though they are not committed. A statement in an aborted
        // transaction fails, and one that counts the rows finds those undone: one round trip,
        // only when rows would be sent from memory.
        if !self.leased.is_empty() {
            let ids = self.leased.row_ids();
            let store = &self.publisher.inner.store;
            if store.staged_present(&mut self.tx, &ids).await? != ids.len() {
                self.leased.distrust();
            }
        }
        if let Err(e) = self.tx.commit().await {
            self.publisher.hand_back_later(self.leased);
            return Err(Error::storage("commit", e));
        }
        Ok((self.publisher, self.staged, self.leased))
    }

    /// Commits, then runs the mode's post-commit step in the background (tracked, so
    /// [`Publisher::shutdown`] waits for it) and returns at once: for callers that need the
    /// events committed, not yet delivered, before they go on, such as a consumer's handler,
    /// whose offset may be committed once the outbox holds its events. The events are
    /// delivered exactly as after [`commit`](Self::commit), by the eager path or the relay.
    ///
    /// # Errors
    /// As [`commit`](Self::commit).
    pub async fn commit_and_dispatch_later(self) -> Result<()> {
        let (publisher, staged, leased) = self.commit_only().await?;
        if !staged.is_empty() {
            let dispatches = publisher.inner.dispatches.clone();
            dispatches.spawn(async move { publisher.after_commit_with(staged, leased).await });
        }
        Ok(())
    }

    /// Rolls back: no business change, no event.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the rollback cannot be sent (the server rolls back
    /// anyway when the connection closes).
    pub async fn rollback(self) -> Result<()> {
        self.tx
            .rollback()
            .await
            .map_err(|e| Error::storage("rollback", e))
    }

    /// The underlying sqlx transaction.
    pub fn transaction(&mut self) -> &mut Transaction<'static, Postgres> {
        &mut self.tx
    }
}

impl Deref for OutboxTx {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.tx
    }
}

impl DerefMut for OutboxTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.tx
    }
}
