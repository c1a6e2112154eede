//! Settling: recording acks and failures in the outbox, batched. Whatever arrived while the
//! previous statement ran goes out in the next one, so under load one statement settles
//! hundreds of rows, and when idle a single ack is settled at once.
//!
//! Operations are applied in the order they were sent, and a key is handed back only in a
//! statement that also settles (or follows) every row of it: no other owner can see a key
//! whose acked rows still look pending. A statement that fails is retried until it is
//! written, and nothing queued after it is written before it: a later operation may settle
//! a key's later rows and hand the key back, and written past a dropped one it left the
//! key's earlier rows pending behind its later ones, to be sent again after them.

use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::{info, warn};
use uuid::Uuid;

use crate::error::ErrorClass;
use crate::outbox::store::{KeyRelease, OutboxStore, Recorded, Settlement};

/// Most rows or keys folded into one settle statement.
const MAX_BATCH: usize = 2000;

/// A row's outcome with what its metrics need.
#[derive(Debug)]
pub(crate) struct RowOutcome {
    pub(crate) id: i64,
    pub(crate) settlement: Settlement,
    pub(crate) topic: String,
    /// Staging to acknowledgement (or failure).
    pub(crate) latency: Duration,
    pub(crate) class: Option<ErrorClass>,
}

/// One unit of work for the settler.
#[derive(Debug, Default)]
pub(crate) struct SettleOp {
    pub(crate) rows: Vec<RowOutcome>,
    pub(crate) release: Vec<KeyRelease>,
    pub(crate) drained: Vec<String>,
    pub(crate) done: Option<oneshot::Sender<()>>,
}

impl SettleOp {
    /// Rows and keys: drained keys count as well (each is locked while its row is deleted;
    /// uncounted, thousands of them piled into one statement behind a slow one).
    fn size(&self) -> usize {
        self.rows.len() + self.release.len() + self.drained.len()
    }
}

/// Handle of a settling task; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Settler {
    tx: mpsc::UnboundedSender<SettleOp>,
    released: Arc<Notify>,
    /// Ops queued so far; an op's number is the count after it was queued (numbers follow
    /// queue order for ops sent by one task, which is how the relay uses them).
    queued: Arc<AtomicU64>,
    /// Rows queued and not written yet.
    unwritten_rows: Arc<AtomicUsize>,
    /// Notified after every statement batch.
    progress: Arc<Notify>,
    /// Ops written so far, in queue order (see [`Self::written`]).
    written: watch::Receiver<u64>,
}

impl Settler {
    /// Starts the task for `owner`. It ends once every handle is dropped and the queue is
    /// empty; a statement that fails is retried, backing off, until it is written (rows and
    /// keys stay leased meanwhile, and lapse if the owner stops renewing them).
    pub(crate) fn start(store: OutboxStore, owner: Uuid) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let released = Arc::new(Notify::new());
        let unwritten_rows = Arc::new(AtomicUsize::new(0));
        let progress = Arc::new(Notify::new());
        let (ops_written, written) = watch::channel(0);
        tokio::spawn(run(
            store,
            owner,
            rx,
            Arc::clone(&released),
            Progress {
                ops_written,
                unwritten_rows: Arc::clone(&unwritten_rows),
                notify: Arc::clone(&progress),
            },
        ));
        Self {
            tx,
            released,
            queued: Arc::new(AtomicU64::new(0)),
            written,
            unwritten_rows,
            progress,
        }
    }

    /// Resolves after the settler wrote a batch (room under the caps may have freed up).
    pub(crate) async fn progressed(&self) {
        self.progress.notified().await;
    }

    /// Rows queued and not written yet: the relay counts them against its in-flight cap,
    /// so a settler that falls behind slows the sends instead of piling up outcomes.
    pub(crate) fn unwritten_rows(&self) -> usize {
        self.unwritten_rows.load(Ordering::Acquire)
    }

    /// How many ops have been written: the op numbered `n` by [`Self::send`] is done once
    /// this reaches `n`.
    pub(crate) fn written(&self) -> u64 {
        *self.written.borrow()
    }

    /// Resolves after keys were handed back: rows written meanwhile (which the owner did
    /// not read) are claimable now, by this owner as well.
    pub(crate) async fn keys_released(&self) {
        self.released.notified().await;
    }

    /// Queues `op`; returns its number (see [`Self::written`]).
    pub(crate) fn send(&self, op: SettleOp) -> u64 {
        let number = self.queued.fetch_add(1, Ordering::AcqRel) + 1;
        self.unwritten_rows
            .fetch_add(op.rows.len(), Ordering::AcqRel);
        if let Err(lost) = self.tx.send(op) {
            // Only after the task died; the leases lapse and the rows are delivered again.
            warn!(
                rows = lost.0.rows.len(),
                "settler gone; rows will be redelivered"
            );
        }
        number
    }

    /// Resolves once everything queued before it has been written.
    pub(crate) async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        self.send(SettleOp {
            done: Some(done),
            ..SettleOp::default()
        });
        let _ = wait.await;
    }
}

/// What the settling task reports back to its handles.
struct Progress {
    ops_written: watch::Sender<u64>,
    unwritten_rows: Arc<AtomicUsize>,
    notify: Arc<Notify>,
}

async fn run(
    store: OutboxStore,
    owner: Uuid,
    mut rx: mpsc::UnboundedReceiver<SettleOp>,
    released: Arc<Notify>,
    progress: Progress,
) {
    let service = store.service().to_owned();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let mut size = batch[0].size();
        while size < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => {
                    size += op.size();
                    batch.push(op);
                }
                Err(_) => break,
            }
        }
        let ops = batch.len() as u64;
        let mut rows = Vec::new();
        let mut release = Vec::new();
        let mut drained = Vec::new();
        let mut done = Vec::new();
        for op in batch {
            rows.extend(op.rows);
            release.extend(op.release);
            drained.extend(op.drained);
            done.extend(op.done);
        }
        let settlements: Vec<(i64, Settlement)> =
            rows.iter().map(|r| (r.id, r.settlement.clone())).collect();
        tracing::trace!(target: "outpost::send", %owner, ?settlements, ?release, ?drained, "settling");
        let recorded = retry("settle", || store.settle(owner, &settlements, &release)).await;
        count(&service, &rows, &recorded);
        if !drained.is_empty() {
            retry("hand back", || store.release_drained(owner, &drained)).await;
        }
        if !drained.is_empty() || !release.is_empty() {
            released.notify_one();
        }
        progress.ops_written.send_modify(|written| *written += ops);
        progress
            .unwritten_rows
            .fetch_sub(rows.len(), Ordering::AcqRel);
        progress.notify.notify_one();
        for d in done {
            let _ = d.send(());
        }
    }
}

/// How often a statement that keeps failing is reported.
const REPORT_EVERY: Duration = Duration::from_secs(30);

/// Runs `op` until it succeeds, backing off (50 ms doubling to 2 s); its answer.
async fn retry<T, F, Fut>(what: &'static str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::Result<T>>,
{
    let mut failing_since: Option<Instant> = None;
    let mut reported: Option<Instant> = None;
    let mut pause = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(answer) => {
                if let Some(since) = failing_since {
                    info!(statement = what, failed_for = ?since.elapsed(), "outcomes written again");
                }
                return answer;
            }
            Err(e) => {
                let now = Instant::now();
                let since = *failing_since.get_or_insert(now);
                if reported.is_none_or(|at| now - at >= REPORT_EVERY) {
                    warn!(statement = what, error = %e, failing_for = ?(now - since), "could not record outcomes; retrying (nothing queued after them is written first)");
                    reported = Some(now);
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Metrics count what was recorded, never what was only attempted: a row another owner had
/// recorded already, or a failure under a key this owner no longer held, is not counted.
fn count(service: &str, rows: &[RowOutcome], recorded: &Recorded) {
    crate::metrics::published_batch(
        service,
        rows.iter()
            .filter(|row| recorded.published.contains(&row.id))
            .map(|row| (row.topic.as_str(), row.latency)),
    );
    for row in rows.iter().filter(|row| recorded.failed.contains(&row.id)) {
        match &row.settlement {
            Settlement::Published { .. } | Settlement::Released => {}
            Settlement::Retry { .. } => {
                crate::metrics::retried(service, row.class.unwrap_or(ErrorClass::Retriable));
            }
            Settlement::Dead { .. } => {
                crate::metrics::parked(service, row.class.unwrap_or(ErrorClass::Retriable));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Aggregate, EventEnvelope, OutboxEvent, OutboxTable};
    use sqlx::postgres::PgPoolOptions;

    fn published(id: i64) -> RowOutcome {
        RowOutcome {
            id,
            settlement: Settlement::Published {
                partition: 0,
                offset: id,
            },
            topic: "t".into(),
            latency: Duration::ZERO,
            class: None,
        }
    }

    /// A settle PostgreSQL keeps refusing (here a trigger on a key's first row) holds back
    /// the next one, which settles the key's second row and hands the key back: written
    /// first, it left the first row pending behind the second, and the key's next owner
    /// would have sent it again after it.
    #[tokio::test]
    async fn a_failing_settle_holds_back_everything_queued_after_it() {
        let url = std::env::var("OUTPOST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .expect("PostgreSQL must be reachable at OUTPOST_DATABASE_URL (run `make services`)");
        let schema = format!("settling_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let store = OutboxStore::new(pool.clone(), OutboxTable::new(&schema).unwrap());
        store.migrate().await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        for seq in 0..2 {
            let env = EventEnvelope::new("t.v1", "tests", serde_json::json!({ "seq": seq }));
            let event = OutboxEvent::from_envelope(&env, "t", Aggregate::new("a", "k")).unwrap();
            store.stage(&mut tx, &event).await.unwrap();
        }
        tx.commit().await.unwrap();
        let owner = Uuid::new_v4();
        let claimed = store
            .claim(owner, 1, 10, Duration::from_secs(300))
            .await
            .unwrap();
        let ids: Vec<i64> = claimed[0].rows.iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), 2);
        let table = store.table().to_string();
        for statement in [
            format!("CREATE TABLE {schema}.refusing (on_ bool)"),
            format!("INSERT INTO {schema}.refusing VALUES (true)"),
            format!("CREATE SEQUENCE {schema}.refused"),
            format!(
                "CREATE FUNCTION {schema}.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                   IF EXISTS (SELECT 1 FROM {schema}.refusing) THEN \
                     PERFORM nextval('{schema}.refused'); RAISE EXCEPTION 'refused'; \
                   END IF; RETURN NEW; END $$"
            ),
            format!(
                "CREATE TRIGGER refuse BEFORE UPDATE ON {table} FOR EACH ROW \
                 WHEN (OLD.id = {}) EXECUTE FUNCTION {schema}.refuse()",
                ids[0]
            ),
        ] {
            sqlx::query(&statement).execute(&pool).await.unwrap();
        }
        let refused = || async {
            sqlx::query_scalar::<_, i64>(&format!(
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {schema}.refused"
            ))
            .fetch_one(&pool)
            .await
            .unwrap()
        };
        let pending = || async {
            sqlx::query_scalar::<_, i64>(&format!(
                "SELECT count(*) FROM {table} WHERE status = 'pending'"
            ))
            .fetch_one(&pool)
            .await
            .unwrap()
        };

        let settler = Settler::start(store.clone(), owner);
        settler.send(SettleOp {
            rows: vec![published(ids[0])],
            ..SettleOp::default()
        });
        // Queued once the first is being refused, so the two are not one statement.
        let deadline = Instant::now() + Duration::from_secs(30);
        while refused().await < 1 {
            assert!(Instant::now() < deadline, "the settle was not tried");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        settler.send(SettleOp {
            rows: vec![published(ids[1])],
            drained: vec!["k".into()],
            ..SettleOp::default()
        });
        // Refused six times: retried for a second and a half, unless the second settle
        // went through meanwhile.
        while refused().await < 6 && pending().await == 2 {
            assert!(Instant::now() < deadline, "the settle was not retried");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            pending().await,
            2,
            "nothing written past the refused settle"
        );
        assert_eq!(settler.written(), 0);

        sqlx::query(&format!("DELETE FROM {schema}.refusing"))
            .execute(&pool)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(30), settler.flush())
            .await
            .expect("written once PostgreSQL takes it");
        assert_eq!(pending().await, 0);
        let key_rows: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM {}", store.table().keys()))
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(
            key_rows, 0,
            "the drained key was handed back after both rows"
        );
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&pool)
            .await
            .unwrap();
    }
}
