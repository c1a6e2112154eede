//! A pool connection whose statements have a deadline.
//!
//! A connection the network stopped carrying (a partition that drops packets, a database
//! host gone without a reset) answers nothing and reports no error until TCP gives up, a
//! quarter of an hour on Linux's defaults. Awaited without a bound, one such statement held
//! the relay's loop (no acks taken in, no shutdown noticed) for all that time. Dropped at a
//! deadline but returned to the pool, the connection was pinged by sqlx before reuse, and
//! that ping hung in the same way. So a statement that outlives its deadline fails with a
//! retriable error, and its connection is closed instead of returned; the next statement
//! takes a connection that answers. Taking a connection from the pool has the same bound
//! (the pool may ping an idle connection first, and that ping hangs in the same way).
//!
//! The bound is the client's: a statement it gave up on may still run to its end on the
//! server (one waiting on a lock, say). The relay's statements are written so that running
//! one twice records nothing twice.
//!
//! A caller that drops a statement before its deadline (it has a bound of its own, as the
//! Kafka-first check has) leaves the connection to the pool, as sqlx does: closing it would
//! open a new connection per give-up while the database is merely slow.

use std::future::Future;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool, Postgres};

use crate::error::{Error, Result};

/// A connection taken from the pool; closed when a statement on it outlived its deadline,
/// returned to the pool otherwise.
pub(crate) struct Bounded {
    /// Taken out only by [`Self::detach`].
    conn: Option<PoolConnection<Postgres>>,
    deadline: Option<Duration>,
    /// The operation its errors are reported as.
    what: &'static str,
    /// A statement outlived the deadline: the connection is taken for cut off.
    expired: bool,
}

/// The error of a wait that outlived `limit`.
fn timed_out(what: &'static str, limit: Duration, detail: &str) -> Error {
    Error::storage(
        what,
        sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within the statement timeout ({limit:?}); {detail}"),
        )),
    )
}

impl Bounded {
    /// Takes a connection from `pool`, within the deadline (and the pool's own acquire
    /// timeout).
    pub(crate) async fn acquire(
        pool: &PgPool,
        deadline: Option<Duration>,
        what: &'static str,
    ) -> Result<Self> {
        let conn = match deadline {
            Some(limit) => tokio::time::timeout(limit, pool.acquire())
                .await
                .map_err(|_| timed_out(what, limit, "no connection could be taken"))?,
            None => pool.acquire().await,
        }
        .map_err(|e| Error::storage(what, e))?;
        Ok(Self {
            conn: Some(conn),
            deadline,
            what,
            expired: false,
        })
    }

    /// Runs `statement` (one statement, or a transaction from `BEGIN` to `COMMIT`) on this
    /// connection, failing with a retriable error if it has not finished by the deadline.
    pub(crate) async fn run<'s, T, F, Fut>(&'s mut self, statement: F) -> Result<T>
    where
        F: FnOnce(&'s mut PgConnection) -> Fut,
        Fut: Future<Output = sqlx::Result<T>> + 's,
    {
        let Self {
            conn,
            deadline,
            what,
            expired,
        } = self;
        let what = *what;
        let running = statement(conn.as_mut().expect("taken out only by detach"));
        let done = match *deadline {
            Some(limit) => match tokio::time::timeout(limit, running).await {
                Ok(done) => done,
                Err(_) => {
                    *expired = true;
                    return Err(timed_out(what, limit, "the connection was closed"));
                }
            },
            None => running.await,
        };
        done.map_err(|e| Error::storage(what, e))
    }

    /// Takes the connection out of the pool for good (a session lock's holder keeps it).
    pub(crate) fn detach(mut self) -> PgConnection {
        self.conn.take().expect("taken out only by detach").detach()
    }
}

impl Drop for Bounded {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut().filter(|_| self.expired) {
            conn.close_on_drop();
        }
    }
}
