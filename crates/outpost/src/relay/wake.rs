//! Wake-up hints: writers nudge after commit, the relay listens. Hints only shorten the wait;
//! the relay still polls, so a lost or failed hint costs latency, never an event.
//!
//! Redis: `LPUSH` + `LTRIM` on [`wake_key`] (the list never holds more than one element,
//! even when no relay listens), `BLPOP` on the relay side. PostgreSQL: `pg_notify` on the
//! same name after commit, `LISTEN` on the relay side.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{Error, Result};

/// The one key (Redis list) and channel (NOTIFY) shared by writers and the relay of
/// `service`: `outbox:wake:{service}`.
pub fn wake_key(service: &str) -> String {
    format!("outbox:wake:{service}")
}

/// Checks a service name: 1–48 characters of `[A-Za-z0-9_.-]`.
///
/// # Errors
/// [`Error::Configuration`] otherwise.
pub fn validate_service(service: &str) -> Result<()> {
    let ok = !service.is_empty()
        && service.len() <= 48
        && service
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::config(
            "service",
            "1-48 characters of [A-Za-z0-9_.-]",
            service,
        ))
    }
}

/// Where a wake-up came from (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeSource {
    /// Redis `BLPOP`.
    Redis,
    /// PostgreSQL `NOTIFY`.
    Notify,
    /// An in-process signal (same-process writer).
    Local,
}

impl WakeSource {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Notify => "notify",
            Self::Local => "local",
        }
    }
}

/// Sends wake-up hints after commit.
#[derive(Debug, Clone)]
pub enum Waker {
    /// `LPUSH` + `LTRIM` on the service's key.
    Redis {
        /// Connection, made again after a failure.
        link: RedisLink,
        /// `outbox:wake:{service}`.
        key: String,
    },
    /// `pg_notify` on the service's channel.
    Notify {
        /// Pool to notify through (outside the business transaction, so commits do not
        /// queue on the NOTIFY lock).
        pool: PgPool,
        /// `outbox:wake:{service}`.
        channel: String,
    },
    /// An in-process signal for a relay in the same process.
    Local(WakeSignal),
    /// No hints; the relay finds work by polling.
    None,
}

impl Waker {
    /// A Redis waker for `service`.
    ///
    /// # Errors
    /// [`Error::Configuration`] for a malformed URL, [`Error::WakeUp`] when Redis cannot be
    /// reached.
    pub async fn redis(url: &str, service: &str) -> Result<Self> {
        validate_service(service)?;
        let link = RedisLink {
            client: redis_client(url)?,
            state: Arc::default(),
        };
        link.connection().await.map_err(|e| Error::WakeUp {
            via: "redis",
            source: Box::new(e),
        })?;
        Ok(Self::Redis {
            link,
            key: wake_key(service),
        })
    }

    /// A NOTIFY waker for `service`.
    ///
    /// # Errors
    /// [`Error::Configuration`] for a bad service name.
    pub fn notify(pool: PgPool, service: &str) -> Result<Self> {
        validate_service(service)?;
        Ok(Self::Notify {
            pool,
            channel: wake_key(service),
        })
    }

    /// Sends one hint. Failures are logged and swallowed: the relay polls anyway.
    pub async fn nudge(&self) {
        if let Err(e) = self.try_nudge().await {
            warn!(error = %e, source = ?std::error::Error::source(&e), "wake-up hint not sent; the relay will find the event by polling");
        }
    }

    /// Sends one hint, reporting failure.
    ///
    /// # Errors
    /// [`Error::WakeUp`] when Redis or PostgreSQL refuses.
    pub async fn try_nudge(&self) -> Result<()> {
        match self {
            Self::Redis { link, key } => {
                let sent = async {
                    let mut conn = link.connection().await?;
                    redis::pipe()
                        .atomic()
                        .lpush(key, sent_at_millis())
                        .ignore()
                        .ltrim(key, 0, 0)
                        .ignore()
                        .query_async::<()>(&mut conn)
                        .await
                }
                .await;
                sent.map_err(|e| {
                    if e.is_io_error() || e.is_timeout() || e.is_unrecoverable_error() {
                        link.forget();
                    }
                    Error::WakeUp {
                        via: "redis",
                        source: Box::new(e),
                    }
                })
            }
            Self::Notify { pool, channel } => sqlx::query("SELECT pg_notify($1, $2)")
                .bind(channel)
                .bind(sent_at_millis().to_string())
                .execute(pool)
                .await
                .map(|_| ())
                .map_err(|e| Error::WakeUp {
                    via: "notify",
                    source: Box::new(e),
                }),
            Self::Local(signal) => {
                signal.wake(WakeSource::Local);
                Ok(())
            }
            Self::None => Ok(()),
        }
    }
}

/// A Redis connection for hints, made again after it failed. A multiplexed connection never
/// reconnects: once Redis restarted, or a partition cut the connection off, every hint
/// after failed for as long as the process lived (each cut-off one after waiting its
/// response timeout), and every relay fell back to polling. After a connection attempt
/// failed, hints fail at once for [`RECONNECT_PAUSE`] (they are awaited after commits:
/// each would otherwise wait out a connect timeout while Redis is unreachable).
#[derive(Clone)]
pub struct RedisLink {
    client: redis::Client,
    state: Arc<Mutex<Link>>,
}

/// Where a [`RedisLink`] stands.
#[derive(Default)]
enum Link {
    Up(MultiplexedConnection),
    /// No connection; the next hint makes one.
    #[default]
    Down,
    /// No connection, and none is tried before the instant (the last attempt failed).
    Paused(std::time::Instant),
}

/// How long hints fail at once after a connection attempt failed.
const RECONNECT_PAUSE: Duration = Duration::from_secs(2);

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLink").finish_non_exhaustive()
    }
}

impl RedisLink {
    /// The connection, made now if there is none (after a failure).
    async fn connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        match &*self.state.lock().unwrap_or_else(PoisonError::into_inner) {
            Link::Up(conn) => return Ok(conn.clone()),
            Link::Paused(until) if std::time::Instant::now() < *until => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "Redis did not answer the last connection attempt; trying again shortly",
                )
                .into())
            }
            Link::Paused(_) | Link::Down => {}
        }
        let made = self.client.get_multiplexed_async_connection().await;
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = match &made {
            Ok(conn) => Link::Up(conn.clone()),
            Err(_) => Link::Paused(std::time::Instant::now() + RECONNECT_PAUSE),
        };
        made
    }

    /// Drops the connection: the next hint makes a new one.
    fn forget(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(*state, Link::Up(_)) {
            *state = Link::Down;
        }
    }
}

/// What a hint carries: when it was sent (milliseconds since the Unix epoch), so the
/// listener can record how long it took to arrive.
fn sent_at_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The send time a hint carries, when it carries one. Hints from other writers (HuleEdu
/// pushes `"wake"` or `1`) carry no time and are not timed.
fn sent_at(payload: &str) -> Option<i64> {
    // Anything before 2020 is not a send time.
    const EARLIEST: i64 = 1_577_836_800_000;
    payload
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|&ms| ms >= EARLIEST)
}

fn redis_client(url: &str) -> Result<redis::Client> {
    redis::Client::open(url).map_err(|_| {
        Error::config(
            "redis_url",
            "redis://host[:port][/db]",
            crate::error::redact_url(url),
        )
    })
}

/// The relay side of wake-ups: listeners set it, the relay awaits it.
///
/// A wake that arrives while the relay is busy is remembered (one permit), so it is never
/// lost between two waits.
#[derive(Debug, Clone, Default)]
pub struct WakeSignal {
    notify: Arc<Notify>,
    /// The oldest timed hint not yet followed by a claim: (sent, ms since the epoch; source).
    hint: Arc<Mutex<Option<(i64, WakeSource)>>>,
}

impl WakeSignal {
    /// A fresh signal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wakes the relay.
    pub fn wake(&self, source: WakeSource) {
        crate::metrics::wakeup(source.as_str());
        self.notify.notify_one();
    }

    /// Wakes the relay for a hint whose payload may carry its send time; the relay's next
    /// claim then records hint sent → claimed ([`crate::metrics::WAKEUP_LATENCY`]).
    fn hinted(&self, source: WakeSource, payload: &str) {
        if let Some(sent) = sent_at(payload) {
            let mut hint = self.hint.lock().unwrap_or_else(PoisonError::into_inner);
            if hint.is_none_or(|(oldest, _)| sent < oldest) {
                *hint = Some((sent, source));
            }
        }
        self.wake(source);
    }

    /// Takes the oldest timed hint received since the last call (the relay calls it just
    /// before it claims, and times the hint once the claim returned).
    pub(crate) fn take_hint(&self) -> Option<(i64, WakeSource)> {
        self.hint
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Resolves at the next wake-up.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Listens with `BLPOP` on the service's key until `shutdown`; reconnects with back-off
    /// and logs a warning while Redis is unavailable.
    ///
    /// # Errors
    /// [`Error::Configuration`] for a malformed URL or service name.
    pub fn listen_redis(
        &self,
        url: &str,
        service: &str,
        shutdown: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>> {
        validate_service(service)?;
        let client = redis_client(url)?;
        let key = wake_key(service);
        let signal = self.clone();
        Ok(tokio::spawn(async move {
            // BLPOP blocks its connection, so it gets one of its own, whose response timeout
            // is the BLPOP timeout and a margin: with none, a connection a partition cut off
            // (open, nothing coming back) kept the listener waiting until TCP gave up, and
            // wake-ups stopped meanwhile.
            let config = AsyncConnectionConfig::new()
                .set_response_timeout(Some(BLPOP_WAIT + BLPOP_MARGIN))
                .set_connection_timeout(Some(Duration::from_secs(2)));
            let mut failures = 0u32;
            while !shutdown.is_cancelled() {
                let mut conn = match client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        failures += 1;
                        warn!(error = %e, "redis wake-up listener cannot connect; relay keeps polling");
                        backoff_sleep(failures, &shutdown).await;
                        continue;
                    }
                };
                let mut blpop = redis::cmd("BLPOP");
                blpop.arg(&key).arg(BLPOP_WAIT.as_secs_f64());
                loop {
                    let popped: redis::RedisResult<Option<(String, String)>> = tokio::select! {
                        () = shutdown.cancelled() => return,
                        r = blpop.query_async(&mut conn) => r,
                    };
                    match popped {
                        Ok(Some((_, payload))) => {
                            failures = 0;
                            signal.hinted(WakeSource::Redis, &payload);
                        }
                        Ok(None) => failures = 0,
                        Err(e) => {
                            failures += 1;
                            warn!(error = %e, "redis wake-up listener failed; relay keeps polling");
                            backoff_sleep(failures, &shutdown).await;
                            break;
                        }
                    }
                }
            }
        }))
    }

    /// Listens with PostgreSQL `LISTEN` on the service's channel until `shutdown`;
    /// reconnects with back-off and logs a warning while it cannot. Its connection is its
    /// own (made with `pool`'s settings, not taken from it), and after a while with nothing
    /// heard it checks that the connection still answers: one a partition cut off hears
    /// nothing either, until TCP gives up.
    ///
    /// # Errors
    /// [`Error::Configuration`] for a bad service name.
    pub fn listen_notify(
        &self,
        pool: PgPool,
        service: &str,
        shutdown: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>> {
        validate_service(service)?;
        let channel = wake_key(service);
        let signal = self.clone();
        Ok(tokio::spawn(async move {
            let mut failures = 0u32;
            while !shutdown.is_cancelled() {
                // A pool of its own for each connection: a listener dropped on a connection
                // that stopped answering hands it back in the background, and that hand-back
                // hangs as long as the connection does, holding its place in the pool.
                let own = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(LISTEN_CHECK_WAIT)
                    .connect_lazy_with((*pool.connect_options()).clone());
                let mut listener = match PgListener::connect_with(&own).await {
                    Ok(l) => l,
                    Err(e) => {
                        failures += 1;
                        warn!(error = %e, "NOTIFY wake-up listener cannot connect; relay keeps polling");
                        backoff_sleep(failures, &shutdown).await;
                        continue;
                    }
                };
                let listening =
                    tokio::time::timeout(LISTEN_CHECK_WAIT, listener.listen(&channel)).await;
                let listening = listening.unwrap_or_else(|_| {
                    Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "LISTEN unanswered",
                    )))
                });
                if let Err(e) = listening {
                    failures += 1;
                    warn!(error = %e, "LISTEN failed; relay keeps polling");
                    backoff_sleep(failures, &shutdown).await;
                    continue;
                }
                debug!(channel, "listening for wake-ups");
                loop {
                    let next = tokio::select! {
                        () = shutdown.cancelled() => return,
                        n = listener.try_recv() => n,
                        () = tokio::time::sleep(LISTEN_CHECK_AFTER) => {
                            let check = sqlx::query("SELECT 1").execute(&mut listener);
                            if let Ok(Ok(_)) = tokio::time::timeout(LISTEN_CHECK_WAIT, check).await {
                                continue;
                            }
                            warn!("NOTIFY wake-up listener's connection stopped answering; relay polls and listens on a new one");
                            // Notifications may have been missed meanwhile.
                            signal.wake(WakeSource::Notify);
                            break;
                        }
                    };
                    match next {
                        Ok(Some(notification)) => {
                            failures = 0;
                            signal.hinted(WakeSource::Notify, notification.payload());
                        }
                        Ok(None) => {
                            // Connection lost: notifications may have been missed, so poll.
                            signal.wake(WakeSource::Notify);
                        }
                        Err(e) => {
                            failures += 1;
                            warn!(error = %e, "NOTIFY wake-up listener failed; relay keeps polling");
                            backoff_sleep(failures, &shutdown).await;
                            break;
                        }
                    }
                }
            }
        }))
    }
}

/// How long the `LISTEN` connection may hear nothing before it is checked.
const LISTEN_CHECK_AFTER: Duration = Duration::from_secs(10);

/// How long that check (and the connection's acquisition) may take.
const LISTEN_CHECK_WAIT: Duration = Duration::from_secs(5);

/// How long one `BLPOP` waits for a wake-up before it asks again.
const BLPOP_WAIT: Duration = Duration::from_secs(1);

/// How much longer than [`BLPOP_WAIT`] its answer may take before the connection is taken
/// for cut off.
const BLPOP_MARGIN: Duration = Duration::from_secs(4);

async fn backoff_sleep(failures: u32, shutdown: &CancellationToken) {
    let delay = crate::backoff::Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(10),
    }
    .delay(failures);
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(delay) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_shared_and_names_are_checked() {
        assert_eq!(
            wake_key("essay-lifecycle-service"),
            "outbox:wake:essay-lifecycle-service"
        );
        assert!(validate_service("file_service.v2").is_ok());
        assert!(validate_service("").is_err());
        assert!(validate_service("a b").is_err());
        assert!(validate_service("x:y").is_err());
    }
}
