//! Housekeeping: the backlog gauges and retention, off the sending loop (a count over a large
//! backlog, or a large delete, must not hold acks back), done by one relay of a service at a
//! time.
//!
//! Every relay of a service would count the same backlog and delete the same published rows:
//! with three relays over a 100,000-row backlog that was three counts of 60-200 ms each in the
//! middle of the drain they were all working on. The relay that holds the service's
//! housekeeping lock does the chores; the others try for the lock at each interval and take
//! over when its holder stops or loses its connection. A relay that never held the lock
//! exports no backlog gauge; one that another relay took it over from exports 0. One that
//! cannot reach the database keeps its last reading: 0 would say "drained" when nothing is
//! known, and hide the backlog growing meanwhile.

use std::time::Instant;

use sqlx::postgres::PgConnection;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::RelayConfig;
use crate::outbox::store::OutboxStore;

/// Counts the backlog and runs retention while this relay holds the lock, until `stop`.
pub(crate) async fn housekeep(store: OutboxStore, config: RelayConfig, stop: CancellationToken) {
    let mut lead: Option<PgConnection> = None;
    let mut reported = false;
    let mut last_cleanup = Instant::now();
    loop {
        lead = match keep_or_take(&store, &config, lead).await {
            Lead::Held(conn) => Some(conn),
            Lead::Elsewhere => {
                if std::mem::take(&mut reported) {
                    // Another relay counts now: this one's last reading would stay exported
                    // for good, however far the backlog has moved since.
                    crate::metrics::backlog(&config.service, 0, std::time::Duration::ZERO);
                }
                None
            }
            Lead::Unknown => None,
        };
        let mut pause = config.backlog_interval;
        if lead.is_some() {
            let counted = Instant::now();
            if let Ok(b) = store.backlog().await {
                crate::metrics::backlog(&config.service, b.pending, b.oldest_pending);
                reported = true;
            }
            // The count reads every pending row: on a deep backlog it is spaced out so that
            // it takes at most a twentieth of one database core from the drain itself.
            pause = pause.max(counted.elapsed() * 20);
        }
        if stop.is_cancelled() {
            break; // the last reading is taken after the relay's final settle
        }
        if lead.is_some() && last_cleanup.elapsed() >= config.cleanup_interval {
            cleanup(&store, &config, &stop).await;
            last_cleanup = Instant::now();
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(pause) => {}
        }
    }
    if let Some(conn) = lead {
        // Closing the session releases the lock at once: the next relay takes over at its
        // next interval. A connection that does not answer is dropped.
        let _ = tokio::time::timeout(config.statement_timeout, conn.close()).await;
    }
}

/// Who holds the housekeeping lock, as far as this relay can tell.
enum Lead {
    /// This relay, on this connection.
    Held(PgConnection),
    /// Another relay: the database answered, and the lock was taken.
    Elsewhere,
    /// Not known: the database did not answer.
    Unknown,
}

/// The lock is a session lock on a connection of its own (taken out of the pool, so the
/// pool may open one more than its limit), held for as long as this relay lives; checked
/// at each interval, since a connection the server dropped took the lock with it.
async fn keep_or_take(
    store: &OutboxStore,
    config: &RelayConfig,
    lead: Option<PgConnection>,
) -> Lead {
    if let Some(mut conn) = lead {
        // Dropped unanswered, the connection is closed, and the lock goes with it once
        // the server notices.
        let limit = config.statement_timeout;
        if let Ok(Ok(())) = tokio::time::timeout(limit, conn.ping()).await {
            return Lead::Held(conn);
        }
        warn!(service = %config.service, "lost the housekeeping lock with its connection");
    }
    let Ok(mut conn) = store.connection("housekeeping").await else {
        return Lead::Unknown;
    };
    // The two-key form: its locks never meet the one-key locks staging takes on event keys.
    // Per table and service: services sharing a table each report their gauges.
    let held = conn
        .run(|c| {
            sqlx::query_scalar(
                "SELECT pg_try_advisory_lock(hashtext($1), hashtext('outpost.housekeeping:' || $2))",
            )
            .bind(store.table().lock_namespace())
            .bind(&config.service)
            .fetch_one(c)
        })
        .await;
    match held {
        Ok(true) => {
            debug!(service = %config.service, "took the housekeeping lock");
            // The lock lives as long as the server's backend of this connection. A holder
            // that a partition cut off sends no FIN, and with the OS's keepalive defaults
            // the server would keep the lock (and every other relay out of the chores, their
            // backlog gauges at 0) for over two hours; these end the backend after about
            // 25 s of silence, as the WAL relay's lock connection does. Best effort: kept
            // either way (handed back to the pool, the connection would hold the lock).
            let keepalives = conn
                .run(|c| {
                    sqlx::query(
                        "SELECT set_config('tcp_keepalives_idle', '10', false), \
                                set_config('tcp_keepalives_interval', '5', false), \
                                set_config('tcp_keepalives_count', '3', false), \
                                set_config('tcp_user_timeout', '25000', false)",
                    )
                    .execute(c)
                })
                .await;
            if let Err(e) = keepalives {
                debug!(error = %e, "housekeeping connection keeps the server's keepalives");
            }
            Lead::Held(conn.detach())
        }
        Ok(false) => Lead::Elsewhere,
        Err(_) => Lead::Unknown,
    }
}

/// Deletes published rows older than the retention, in bounded batches, until none is left
/// or `stop` (checked between batches: a purge of millions of rows after a shorter
/// retention held the relay's shutdown until it was done).
pub(crate) async fn cleanup(
    store: &OutboxStore,
    config: &RelayConfig,
    stop: &CancellationToken,
) -> u64 {
    let mut total = 0;
    while !stop.is_cancelled() {
        match store.cleanup(config.retention, config.cleanup_batch).await {
            Ok(n) => {
                total += n;
                if n < u64::try_from(config.cleanup_batch).unwrap_or(0) {
                    break;
                }
            }
            Err(e) => {
                warn!(error = %e, "retention cleanup failed");
                break;
            }
        }
    }
    if total > 0 {
        crate::metrics::cleaned(&config.service, total);
    }
    total
}
