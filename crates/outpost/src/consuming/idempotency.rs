//! HuleEdu-style two-phase idempotency on Redis, for handlers whose effects cannot share a
//! transaction with an [`Inbox`](crate::consuming::inbox::Inbox) (prefer the inbox when they can).
//!
//! One key per consumer group and event, `outpost:idempotency:{service}:{group}:{event_id}`:
//!
//! 1. Claim: `processing:{token}`, with a short TTL, unless the key exists (atomically, in
//!    a script); the token is the claim's own. `completed` means a duplicate: skip it.
//!    `processing` means another consumer is on it: retry later; its TTL bounds the wait
//!    if that consumer died.
//! 2. The handler commits its business effect.
//! 3. Complete: `completed`, with a long TTL. If the handler fails instead, the key is
//!    deleted, if it still holds the claim's token, so the retry starts afresh. When Redis
//!    does not answer that release (or a claim), the retry takes the claim over: its token
//!    is remembered, so a Redis blip does not hold the event until the claim lapses.
//!
//! Redis unreachable: [`RedisDownPolicy`] says what happens, and there is no default.
//!
//! Unlike the inbox, the mark and the effect do not commit together: a crash after the
//! business commit but before step 3 leaves `processing`, and once its TTL lapses the
//! redelivered event is handled a second time.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio::sync::Mutex;
use tracing::warn;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::consuming::consumer::{Handler, Outcome, Process, Received};
use crate::error::{redact_url, Error, Result};
use crate::relay::wake::validate_service;

const PROCESSING: &str = "processing";

/// Longest a handled event's `completed` mark is tried again (see
/// `Idempotent::mark_completed`): within a shutdown's usual grace period.
const COMPLETE_RETRIES_FOR: Duration = Duration::from_secs(10);
const COMPLETED: &str = "completed";

/// The Redis key for `event_id` handled by consumer group `group` of `service`.
pub fn idempotency_key(service: &str, group: &str, event_id: Uuid) -> String {
    format!("outpost:idempotency:{service}:{group}:{event_id}")
}

/// What to do when Redis cannot be reached to check an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisDownPolicy {
    /// Handle the event without the check (HuleEdu's behaviour): the consumer keeps
    /// flowing, and a duplicate arriving during the outage takes effect again.
    FailOpen,
    /// Refuse with a retriable error: the consumer retries the event with backoff and
    /// commits nothing until Redis answers; the partition waits.
    FailClosed,
}

/// Settings of the Redis idempotency check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyConfig {
    /// Service name, part of every key: 1–48 characters of `[A-Za-z0-9_.-]` (no default).
    pub service: String,
    /// What to do while Redis is unreachable (no default: an explicit choice).
    pub redis_down: RedisDownPolicy,
    /// How long a `processing` claim holds unless renewed; an event whose consumer died
    /// mid-handling is retried after it (default 300 s). The claim is renewed every third
    /// of it while the handler runs, so handling may take longer.
    pub processing_ttl: Duration,
    /// How long a `completed` mark is kept; must exceed the publisher's retry horizon
    /// (default 24 h).
    pub completed_ttl: Duration,
    /// Connect and response timeout of each Redis call, after which Redis counts as
    /// unreachable (default 1 s).
    pub timeout: Duration,
}

impl IdempotencyConfig {
    /// Defaults for `service`, with the Redis-down policy chosen.
    pub fn new(service: impl Into<String>, redis_down: RedisDownPolicy) -> Self {
        Self {
            service: service.into(),
            redis_down,
            processing_ttl: Duration::from_secs(300),
            completed_ttl: Duration::from_secs(24 * 3600),
            timeout: Duration::from_secs(1),
        }
    }

    /// Checks the settings; `publisher_retry_horizon` is the longest time after an event's
    /// first delivery that a duplicate of it can still arrive.
    ///
    /// # Errors
    /// [`Error::Configuration`] naming the first bad field.
    pub fn validate(&self, publisher_retry_horizon: Duration) -> Result<()> {
        validate_service(&self.service)?;
        if self.processing_ttl < Duration::from_secs(1) {
            return Err(Error::config(
                "processing_ttl",
                "at least 1 s",
                format!("{:?}", self.processing_ttl),
            ));
        }
        if self.completed_ttl <= publisher_retry_horizon
            || self.completed_ttl <= self.processing_ttl
        {
            return Err(Error::config(
                "completed_ttl",
                format!(
                    "longer than the publisher's retry horizon ({publisher_retry_horizon:?}) \
                     and than processing_ttl"
                ),
                format!("{:?}", self.completed_ttl),
            ));
        }
        if self.timeout.is_zero() {
            return Err(Error::config("timeout", "positive", "0s"));
        }
        Ok(())
    }
}

/// The result of claiming an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Marked `processing` by this call: handle it, then [`complete`](Idempotency::complete)
    /// or [`release`](Idempotency::release) it with this token.
    Acquired(ClaimToken),
    /// Already `completed`: skip it.
    Duplicate,
    /// Another consumer is processing it: try again later.
    InProgress,
    /// Redis is unreachable and the policy is [`RedisDownPolicy::FailOpen`]: handle it
    /// unchecked.
    Unchecked,
}

/// Identifies one claim, so that releasing it never deletes a later claim of the same
/// event by another consumer (after this one's lapsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimToken(Uuid);

impl ClaimToken {
    /// The value of the claim's owner key (see [`owner_key`]).
    fn mark(self) -> String {
        self.0.to_string()
    }
}

/// Where a claim's token is kept: beside the event's key, whose value stays exactly
/// `processing`, as every Outpost reads it (an older one takes any other value for a
/// finished event and would skip it).
fn owner_key(key: &str) -> String {
    format!("{key}:owner")
}

/// The Redis side of two-phase idempotency.
#[derive(Debug)]
pub struct Idempotency {
    client: redis::Client,
    config: IdempotencyConfig,
    /// Connected on first use and dropped after any error, so a Redis that was down
    /// (even at start-up) is picked up again by the next call.
    conn: Mutex<Option<MultiplexedConnection>>,
    claim: redis::Script,
    release: redis::Script,
    renew: redis::Script,
    /// Per event key, this process's claims of it that may still hold it although nothing
    /// was handled under them: a claim whose answer was lost, a release that failed. The
    /// next claim of the event takes such a claim over instead of waiting for it to lapse.
    unsettled: std::sync::Mutex<HashMap<String, Vec<ClaimToken>>>,
}

/// Most events with unsettled claims remembered (see [`Idempotency::unsettled`]); past it
/// they are forgotten, and their claims lapse after their TTL as before.
const MAX_UNSETTLED: usize = 1024;

/// Most unsettled claims remembered per event.
const MAX_UNSETTLED_PER_EVENT: usize = 8;

impl Idempotency {
    /// Checks against the Redis at `url`; does not connect yet, so Redis may be down at
    /// start-up (the policy applies from the first event).
    ///
    /// # Errors
    /// [`Error::Configuration`] for a malformed URL or invalid settings (see
    /// [`IdempotencyConfig::validate`]).
    pub fn new(
        url: &str,
        config: IdempotencyConfig,
        publisher_retry_horizon: Duration,
    ) -> Result<Self> {
        config.validate(publisher_retry_horizon)?;
        let client = redis::Client::open(url)
            .map_err(|_| Error::config("redis_url", "redis://host[:port][/db]", redact_url(url)))?;
        Ok(Self {
            client,
            config,
            conn: Mutex::new(None),
            unsettled: std::sync::Mutex::default(),
            // GET-then-SET in one script, so two consumers cannot both acquire. A claim of
            // this process's own (ARGV[3..]) under which nothing was handled is taken over.
            claim: redis::Script::new(&format!(
                "local held = redis.call('GET', KEYS[1]) \
                 if held == '{PROCESSING}' then \
                   local owner = redis.call('GET', KEYS[2]) \
                   for i = 3, #ARGV do \
                     if owner == ARGV[i] then held = false end \
                   end \
                 end \
                 if held then return held end \
                 redis.call('SET', KEYS[1], '{PROCESSING}', 'EX', ARGV[2]) \
                 redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2]) \
                 return false"
            )),
            // Only this claim is released: a `completed` mark, or another consumer's claim
            // after this one lapsed, stays.
            release: redis::Script::new(&format!(
                "if redis.call('GET', KEYS[1]) == '{PROCESSING}' \
                    and redis.call('GET', KEYS[2]) == ARGV[1] then \
                   redis.call('DEL', KEYS[2]) \
                   return redis.call('DEL', KEYS[1]) end \
                 return 0"
            )),
            // Only this claim is extended: one that lapsed and was taken by another consumer
            // stays theirs.
            renew: redis::Script::new(&format!(
                "if redis.call('GET', KEYS[1]) == '{PROCESSING}' \
                    and redis.call('GET', KEYS[2]) == ARGV[1] then \
                   redis.call('EXPIRE', KEYS[2], ARGV[2]) \
                   return redis.call('EXPIRE', KEYS[1], ARGV[2]) end \
                 return 0"
            )),
        })
    }

    /// The settings.
    pub fn config(&self) -> &IdempotencyConfig {
        &self.config
    }

    /// The key for `event_id` handled by `group`.
    pub fn key(&self, group: &str, event_id: Uuid) -> String {
        idempotency_key(&self.config.service, group, event_id)
    }

    /// Marks the event `processing` unless it is already marked. A `processing` mark left
    /// by an earlier claim of this `Idempotency` under which nothing was handled (the
    /// claim's answer was lost, or its release failed) is taken over rather than waited for.
    ///
    /// # Errors
    /// [`Error::Idempotency`] (retriable) when Redis cannot be reached and the policy is
    /// [`RedisDownPolicy::FailClosed`].
    pub async fn claim(&self, group: &str, event_id: Uuid) -> Result<Claim> {
        let key = self.key(group, event_id);
        let token = ClaimToken(Uuid::new_v4());
        let mut earlier = self.take_unsettled(&key);
        let mut invocation = self.claim.key(&key);
        invocation
            .key(owner_key(&key))
            .arg(token.mark())
            .arg(self.config.processing_ttl.as_secs());
        for t in &earlier {
            invocation.arg(t.mark());
        }
        let held: redis::RedisResult<Option<String>> = self.invoke(&invocation).await;
        if held.is_err() {
            // The script may have run, its answer lost: this token may hold the event now.
            earlier.push(token);
            self.keep_unsettled(key.clone(), earlier);
        }
        match held {
            Ok(None) => Ok(Claim::Acquired(token)),
            Ok(Some(value)) if value == PROCESSING => Ok(Claim::InProgress),
            // `completed`, or a value some other writer left: skip, as HuleEdu does.
            Ok(Some(_)) => Ok(Claim::Duplicate),
            Err(e) => match self.config.redis_down {
                RedisDownPolicy::FailOpen => {
                    warn!(%key, error = %e, "redis unavailable; handling the event unchecked (fail-open)");
                    Ok(Claim::Unchecked)
                }
                RedisDownPolicy::FailClosed => Err(Error::Idempotency {
                    operation: "claim",
                    source: Box::new(e),
                }),
            },
        }
    }

    /// Marks the event `completed` (call after the business commit).
    ///
    /// # Errors
    /// [`Error::Idempotency`] when Redis fails; the claim then lapses after its TTL.
    pub async fn complete(&self, group: &str, event_id: Uuid) -> Result<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(group, event_id))
            .arg(COMPLETED)
            .arg("EX")
            .arg(self.config.completed_ttl.as_secs());
        self.run::<()>(&cmd, "complete").await
    }

    /// Deletes the event's `processing` claim `token` (call when handling failed), so a
    /// retry can claim it at once. A claim that lapsed, and whatever replaced it, stays.
    ///
    /// # Errors
    /// [`Error::Idempotency`] when Redis fails; the claim then lapses after its TTL.
    pub async fn release(&self, group: &str, event_id: Uuid, token: ClaimToken) -> Result<()> {
        let key = self.key(group, event_id);
        let mut invocation = self.release.key(&key);
        invocation.key(owner_key(&key)).arg(token.mark());
        match self.invoke::<i64>(&invocation).await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.keep_unsettled(key, vec![token]);
                Err(Error::Idempotency {
                    operation: "release",
                    source: Box::new(e),
                })
            }
        }
    }

    /// Extends the event's `processing` claim `token` by `processing_ttl` from now. `false`
    /// when the claim is no longer this token's (it lapsed, and another consumer may hold
    /// the event).
    ///
    /// # Errors
    /// [`Error::Idempotency`] when Redis fails; the claim then holds until its TTL.
    pub async fn renew(&self, group: &str, event_id: Uuid, token: ClaimToken) -> Result<bool> {
        let key = self.key(group, event_id);
        let mut invocation = self.renew.key(&key);
        invocation
            .key(owner_key(&key))
            .arg(token.mark())
            .arg(self.config.processing_ttl.as_secs());
        let renewed: i64 = self
            .invoke(&invocation)
            .await
            .map_err(|e| Error::Idempotency {
                operation: "renew",
                source: Box::new(e),
            })?;
        Ok(renewed == 1)
    }

    fn take_unsettled(&self, key: &str) -> Vec<ClaimToken> {
        let mut unsettled = self.unsettled.lock().unwrap_or_else(|p| p.into_inner());
        unsettled.remove(key).unwrap_or_default()
    }

    fn keep_unsettled(&self, key: String, mut tokens: Vec<ClaimToken>) {
        let mut unsettled = self.unsettled.lock().unwrap_or_else(|p| p.into_inner());
        if unsettled.len() >= MAX_UNSETTLED {
            unsettled.clear();
        }
        let kept = unsettled.entry(key).or_default();
        kept.append(&mut tokens);
        let over = kept.len().saturating_sub(MAX_UNSETTLED_PER_EVENT);
        kept.drain(..over);
    }

    /// Runs a script on the shared connection; after an error the connection is dropped
    /// (the next call connects again).
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> redis::RedisResult<T> {
        let result = match self.connection().await {
            Ok(mut conn) => invocation.invoke_async(&mut conn).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.forget().await;
        }
        result
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        operation: &'static str,
    ) -> Result<T> {
        let result = match self.connection().await {
            Ok(mut conn) => cmd.query_async(&mut conn).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.forget().await;
        }
        result.map_err(|e| Error::Idempotency {
            operation,
            source: Box::new(e),
        })
    }

    async fn connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        let mut cached = self.conn.lock().await;
        if let Some(conn) = cached.as_ref() {
            return Ok(conn.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.timeout))
            .set_response_timeout(Some(self.config.timeout));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *cached = Some(conn.clone());
        Ok(conn)
    }

    async fn forget(&self) {
        *self.conn.lock().await = None;
    }
}

/// A [`Process`] that runs a [`Handler`] behind the Redis two-phase check.
#[derive(Debug)]
pub struct Idempotent<H> {
    idempotency: Idempotency,
    handler: H,
}

impl<H: Handler> Idempotent<H> {
    /// Guards `handler` with `idempotency`.
    pub fn new(idempotency: Idempotency, handler: H) -> Self {
        Self {
            idempotency,
            handler,
        }
    }

    /// The Redis side.
    pub fn idempotency(&self) -> &Idempotency {
        &self.idempotency
    }

    /// Runs `handling` while renewing `token`'s claim every third of `processing_ttl`: a
    /// handler that outlives the claim's TTL would otherwise share the event with the
    /// next consumer to claim it (after a rebalance, or a duplicate on another partition).
    async fn renewing<T>(
        &self,
        group: &str,
        id: Uuid,
        token: ClaimToken,
        handling: impl Future<Output = T>,
    ) -> T {
        let every = self.idempotency.config().processing_ttl / 3;
        let renewals = async {
            loop {
                tokio::time::sleep(every).await;
                match self.idempotency.renew(group, id, token).await {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!(event_id = %id, "the event's processing claim lapsed while it was handled; another consumer may be handling it too")
                    }
                    Err(e) => {
                        warn!(event_id = %id, error = %e, "could not renew the event's processing claim; trying again")
                    }
                }
            }
        };
        tokio::select! {
            handled = handling => handled,
            () = renewals => unreachable!("the renewals never end"),
        }
    }

    /// Marks a handled event `completed`. Its effect is committed, so it counts as handled
    /// whatever Redis says (handled again, the effect would apply twice). But a copy of the
    /// event arriving later would find the claim `processing`, wait for it to lapse and apply
    /// the effect again: with [`RedisDownPolicy::FailClosed`] the mark is tried again, with
    /// back-off, while the claim holds (for up to [`COMPLETE_RETRIES_FOR`], or half of
    /// `processing_ttl` if that is shorter; the partition, and a shutdown, wait meanwhile).
    async fn mark_completed(&self, group: &str, id: Uuid, claim: Claim) {
        let config = self.idempotency.config();
        // Unchecked (fail-open) there is no claim to finish; fail-open retries nothing.
        let retry_for = match (claim, config.redis_down) {
            (Claim::Acquired(_), RedisDownPolicy::FailClosed) => {
                (config.processing_ttl / 2).min(COMPLETE_RETRIES_FOR)
            }
            _ => Duration::ZERO,
        };
        let pauses = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
        };
        let started = Instant::now();
        for attempt in 1.. {
            let Err(e) = self.idempotency.complete(group, id).await else {
                return;
            };
            let pause = pauses.ceiling(attempt);
            if started.elapsed() + pause >= retry_for {
                if matches!(claim, Claim::Acquired(_)) {
                    warn!(event_id = %id, error = %e, "could not mark the event completed; a copy arriving before its claim lapses waits for it, then takes effect again");
                }
                return;
            }
            tokio::time::sleep(pause).await;
        }
    }
}

impl<H: Handler> Process for Idempotent<H> {
    async fn process(&self, received: &Received) -> Result<Outcome> {
        let (group, id) = (received.group_id.as_str(), received.event_id);
        let claim = self.idempotency.claim(group, id).await?;
        match claim {
            Claim::Duplicate => return Ok(Outcome::Duplicate),
            Claim::InProgress => {
                return Err(Error::Idempotency {
                    operation: "claim",
                    source: "another consumer is processing this event".into(),
                })
            }
            Claim::Acquired(_) | Claim::Unchecked => {}
        }
        let handling = async {
            match received.decode() {
                Ok(event) => self.handler.handle(&event, received).await,
                Err(e) => Err(e),
            }
        };
        let handled = match claim {
            Claim::Acquired(token) => self.renewing(group, id, token, handling).await,
            _ => handling.await,
        };
        match handled {
            Ok(()) => {
                self.mark_completed(group, id, claim).await;
                Ok(Outcome::Handled)
            }
            Err(e) => {
                if let Claim::Acquired(token) = claim {
                    if let Err(release) = self.idempotency.release(group, id, token).await {
                        warn!(event_id = %id, error = %release, "could not release the claim; it lapses after its TTL");
                    }
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_format() {
        let id = Uuid::nil();
        assert_eq!(
            idempotency_key("els", "els-group", id),
            "outpost:idempotency:els:els-group:00000000-0000-0000-0000-000000000000"
        );
    }

    #[test]
    fn config_validation_names_the_field() {
        let hour = Duration::from_secs(3600);
        let c = IdempotencyConfig::new("els", RedisDownPolicy::FailClosed);
        assert!(c.validate(hour).is_ok());
        let err = c.validate(Duration::from_secs(24 * 3600)).unwrap_err();
        assert!(err.to_string().contains("completed_ttl"), "{err}");
        let bad = IdempotencyConfig::new("a b", RedisDownPolicy::FailOpen);
        assert!(bad.validate(hour).is_err());
        let mut short = IdempotencyConfig::new("els", RedisDownPolicy::FailOpen);
        short.processing_ttl = Duration::ZERO;
        assert!(short.validate(hour).is_err());
        assert!(Idempotency::new("nope://", c, hour).is_err());
    }

    #[tokio::test]
    async fn a_refused_redis_url_is_shown_without_its_password() {
        // redis is built without TLS: a rediss:// URL is refused.
        let url = "rediss://default:s3cret@cache.example:6380";
        let config = IdempotencyConfig::new("els", RedisDownPolicy::FailClosed);
        let hour = Duration::from_secs(3600);
        let refused = [
            Idempotency::new(url, config, hour).unwrap_err(),
            crate::relay::wake::Waker::redis(url, "els")
                .await
                .unwrap_err(),
        ];
        for err in refused {
            let text = err.to_string();
            assert!(text.contains("redis_url"), "{text}");
            assert!(text.contains("default:****@cache.example"), "{text}");
            assert!(!text.contains("s3cret"), "{text}");
        }
    }
}
