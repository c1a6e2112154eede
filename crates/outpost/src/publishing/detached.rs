//! A future that finishes even when its caller stops waiting for it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Runs a future in the caller's task while the caller waits, and in a task of its own
/// once the caller drops it unfinished (a deadline passed, or the caller was cancelled).
///
/// For work whose end matters to others whoever waits for it: Kafka-first's sends, whose
/// failures must reach the producer (its replace-when-stuck logic runs on them). Spawned
/// from the start, each send cost a task and a wake-up more between the ack and the
/// caller; this way only an abandoned one does.
pub(crate) struct Detachable<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    future: Option<Pin<Box<F>>>,
}

impl<F> Detachable<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    pub(crate) fn new(future: F) -> Self {
        Self {
            future: Some(Box::pin(future)),
        }
    }
}

impl<F> Future for Detachable<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(future) = self.future.as_mut() else {
            panic!("Detachable polled after it finished");
        };
        let output = std::task::ready!(future.as_mut().poll(cx));
        self.future = None;
        Poll::Ready(output)
    }
}

impl<F> Drop for Detachable<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let Some(future) = self.future.take() {
            // Outside a runtime there is nothing to finish it on; it is dropped as it was.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(future);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn finishes_in_place_or_in_a_task_of_its_own_once_dropped() {
        let (done, finished) = tokio::sync::oneshot::channel();
        let (go, gate) = tokio::sync::oneshot::channel::<()>();
        let work = Detachable::new(async move {
            let _ = gate.await;
            let _ = done.send(());
            7
        });
        // The caller gives up before the work can end.
        assert!(tokio::time::timeout(Duration::from_millis(10), work)
            .await
            .is_err());
        go.send(())
            .expect("the abandoned work still waits for the gate");
        tokio::time::timeout(Duration::from_secs(10), finished)
            .await
            .expect("the abandoned work finished in a task of its own")
            .expect("it ran to the end");

        assert_eq!(Detachable::new(async { 7 }).await, 7);
    }
}
