//! Settling: recording acks and failures in the outbox, batched. Whatever arrived while the
//! previous statement ran goes out in the next one, so under load one statement settles
//! hundreds of rows, and when idle a single ack is settled at once.
//!
//! Operations are applied in the order they were sent, and a key is handed back only in a
//! statement that also settles (or follows) every row of it: no other owner can see a key
//! whose acked rows still look pending.

use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::warn;
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
    /// Ops written (or given up on) so far, in queue order (see [`Self::written`]).
    written: watch::Receiver<u64>,
}

impl Settler {
    /// Starts the task for `owner`. It ends once every handle is dropped and the queue is
    /// empty; a statement that fails is retried (rows and keys stay leased meanwhile) until
    /// it succeeds or `give_up_after` has passed since the first failure.
    pub(crate) fn start(store: OutboxStore, owner: Uuid, give_up_after: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let released = Arc::new(Notify::new());
        let unwritten_rows = Arc::new(AtomicUsize::new(0));
        let progress = Arc::new(Notify::new());
        let (ops_written, written) = watch::channel(0);
        tokio::spawn(run(
            store,
            owner,
            rx,
            give_up_after,
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

    /// How many ops have been written (or given up on): the op numbered `n` by
    /// [`Self::send`] is done once this reaches `n`.
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

    /// Resolves once everything queued before it has been written (or given up on).
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
    give_up_after: Duration,
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
        let written = retry(give_up_after, || {
            store.settle(owner, &settlements, &release)
        })
        .await;
        if let Some(recorded) = &written {
            count(&service, &rows, recorded);
            if !drained.is_empty() {
                retry(give_up_after, || store.release_drained(owner, &drained)).await;
            }
            if !drained.is_empty() || !release.is_empty() {
                released.notify_one();
            }
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

/// Runs `op` until it succeeds, backing off, for at most `give_up_after`; its answer, or
/// `None` once given up on.
async fn retry<T, F, Fut>(give_up_after: Duration, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::Result<T>>,
{
    let started = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(answer) => return Some(answer),
            Err(e) if started.elapsed() >= give_up_after => {
                warn!(error = %e, "could not settle; leases lapse and the rows are delivered again");
                return None;
            }
            Err(e) => {
                warn!(error = %e, "settle failed; retrying");
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
