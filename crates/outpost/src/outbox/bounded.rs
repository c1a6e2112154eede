//! A pool connection whose statements have a deadline.
//!
//! A connection the network stopped carrying (a partition that drops packets, a database
//! host gone without a reset) answers nothing and reports no error until TCP gives up, a
//! quarter of an hour on Linux's defaults. Awaited without a bound, one such statement held
//! the relay's loop (no acks taken in, no shutdown noticed) for all that time. Dropped at a
//! deadline but returned to the pool, the connection was pinged by sqlx before reuse, and
//! that ping hung in the same way. So a statement that outlives its deadline fails with a
//! retriable error, and its connection is closed instead of returned; the next statement
//! takes a connection that answers.

use std::future::Future;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool, Postgres};

use crate::error::{Error, Result};

/// A connection taken from the pool; closed when dropped in the middle of a statement
/// (its deadline passed, or the caller gave up on it), returned to the pool otherwise.
pub(crate) struct Bounded {
    /// Taken out only by [`Self::detach`].
    conn: Option<PoolConnection<Postgres>>,
    deadline: Option<Duration>,
    /// A statement started and did not finish: what the connection will send next is
    /// unknown.
    busy: bool,
}

impl Bounded {
    /// Takes a connection from `pool` (within the pool's own acquire timeout).
    pub(crate) async fn acquire(
        pool: &PgPool,
        deadline: Option<Duration>,
        what: &'static str,
    ) -> Result<Self> {
        let conn = pool.acquire().await.map_err(|e| Error::storage(what, e))?;
        Ok(Self {
            conn: Some(conn),
            deadline,
            busy: false,
        })
    }

    /// Runs `statement` (one statement, or a transaction from `BEGIN` to `COMMIT`) on this
    /// connection, failing `what` with a retriable error if it has not finished by the
    /// deadline.
    pub(crate) async fn run<'s, T, F, Fut>(
        &'s mut self,
        what: &'static str,
        statement: F,
    ) -> Result<T>
    where
        F: FnOnce(&'s mut PgConnection) -> Fut,
        Fut: Future<Output = sqlx::Result<T>> + 's,
    {
        let Self {
            conn,
            deadline,
            busy,
        } = self;
        *busy = true;
        let running = statement(conn.as_mut().expect("taken out only by detach"));
        let done = match *deadline {
            Some(limit) => tokio::time::timeout(limit, running).await.map_err(|_| {
                Error::storage(
                    what,
                    sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "no answer within the statement timeout ({limit:?}); the connection was closed"
                        ),
                    )),
                )
            })?,
            None => running.await,
        };
        *busy = false;
        done.map_err(|e| Error::storage(what, e))
    }

    /// Takes the connection out of the pool for good (a session lock's holder keeps it).
    pub(crate) fn detach(mut self) -> PgConnection {
        self.conn.take().expect("taken out only by detach").detach()
    }
}

impl Drop for Bounded {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut().filter(|_| self.busy) {
            conn.close_on_drop();
        }
    }
}
