//! Delivering claimed rows: pipelined across keys, one in flight per key, each outcome
//! classified into a settlement. Shared by the relay and the publisher's eager path.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::producer::{ErrorClass, KafkaProducer};
use crate::relay::RelayConfig;
use crate::store::{ClaimedEvent, Settlement};

/// What one claim-and-deliver round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows acked and marked published.
    pub published: usize,
    /// Rows scheduled for another attempt.
    pub retried: usize,
    /// Rows parked.
    pub parked: usize,
    /// Rows handed back unattempted (behind a failed row of their key, or out of lease).
    pub released: usize,
}

/// Sends claimed rows and decides what becomes of each.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    producer: Arc<KafkaProducer>,
    service: String,
    backoff: Backoff,
    max_attempts: u32,
    max_in_flight: usize,
    lease: Duration,
}

impl Delivery {
    pub(crate) fn new(producer: Arc<KafkaProducer>, config: &RelayConfig) -> Self {
        Self {
            producer,
            service: config.service.clone(),
            backoff: config.backoff,
            max_attempts: config.max_attempts,
            max_in_flight: config.max_in_flight,
            lease: config.lease,
        }
    }

    /// Delivers rows claimed at `claimed_at`; returns their settlements, a summary, and
    /// whether any failure was transient (the broker looked unavailable).
    pub(crate) async fn deliver(
        &self,
        claimed: Vec<ClaimedEvent>,
        claimed_at: Instant,
    ) -> (Vec<(i64, Settlement)>, BatchReport, bool) {
        let mut report = BatchReport {
            claimed: claimed.len(),
            ..BatchReport::default()
        };
        // Sends that start after this could still be in flight when the lease lapses.
        let last_start = claimed_at
            + self
                .lease
                .saturating_sub(longest_send(&self.producer) + self.lease / 10);
        let outcomes: Vec<(i64, Settlement)> = futures::stream::iter(chains_by_key(claimed))
            .map(|chain| self.deliver_chain(chain, last_start))
            .buffer_unordered(self.max_in_flight)
            .flat_map(futures::stream::iter)
            .collect()
            .await;
        let mut transient = false;
        for (_, outcome) in &outcomes {
            match outcome {
                Settlement::Published => report.published += 1,
                Settlement::Retry { budgeted, .. } => {
                    report.retried += 1;
                    transient |= !budgeted;
                }
                Settlement::Dead { .. } => report.parked += 1,
                Settlement::Released => report.released += 1,
            }
        }
        (outcomes, report, transient)
    }

    /// Sends one key's rows in order, stopping at the first retryable failure so nothing
    /// of that key overtakes it.
    async fn deliver_chain(
        &self,
        chain: Vec<ClaimedEvent>,
        last_start: Instant,
    ) -> Vec<(i64, Settlement)> {
        let service = self.service.as_str();
        let mut out = Vec::with_capacity(chain.len());
        let mut rows = chain.into_iter().peekable();
        while let Some(event) = rows.next_if(|_| Instant::now() < last_start) {
            let sent = self
                .producer
                .send(
                    &event.topic,
                    &event.event_key,
                    &event.payload,
                    &event.headers,
                )
                .await;
            let failure = match sent {
                Ok(_) => {
                    let latency = (Utc::now() - event.created_at).to_std().unwrap_or_default();
                    crate::metrics::published(service, &event.topic, latency);
                    out.push((event.id, Settlement::Published));
                    continue;
                }
                Err(failure) => failure,
            };
            let error = failure.to_string();
            let attempt = u32::try_from(event.attempts).unwrap_or(0) + 1;
            let budget_spent = u32::try_from(event.failures).unwrap_or(0) + 1;
            let park = match failure.class {
                ErrorClass::Permanent => true,
                ErrorClass::Retriable => budget_spent >= self.max_attempts,
                ErrorClass::Transient => false,
            };
            if park {
                warn!(event_id = %event.event_id, topic = %event.topic, error, "parking event");
                crate::metrics::parked(service, failure.class);
                out.push((
                    event.id,
                    Settlement::Dead {
                        error,
                        budgeted: failure.class == ErrorClass::Retriable,
                    },
                ));
                continue; // a parked row no longer holds back its key
            }
            debug!(event_id = %event.event_id, error, "delivery failed; will retry");
            crate::metrics::retried(service, failure.class);
            out.push((
                event.id,
                Settlement::Retry {
                    delay: self.backoff.delay(attempt),
                    error,
                    budgeted: failure.class == ErrorClass::Retriable,
                },
            ));
            break;
        }
        out.extend(rows.map(|e| (e.id, Settlement::Released)));
        out
    }
}

/// The longest one send can take: waiting for queue space, then for the ack.
pub(crate) fn longest_send(producer: &KafkaProducer) -> Duration {
    producer.config().delivery_timeout + producer.config().queue_timeout
}

/// Groups rows (in id order) by key, keeping each key's rows in order.
fn chains_by_key(rows: Vec<ClaimedEvent>) -> Vec<Vec<ClaimedEvent>> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut chains: Vec<Vec<ClaimedEvent>> = Vec::new();
    for row in rows {
        match index.get(&row.event_key) {
            Some(&i) => chains[i].push(row),
            None => {
                index.insert(row.event_key.clone(), chains.len());
                chains.push(vec![row]);
            }
        }
    }
    chains
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn row(id: i64, key: &str) -> ClaimedEvent {
        ClaimedEvent {
            id,
            event_id: Uuid::new_v4(),
            topic: "t".into(),
            event_key: key.into(),
            payload: vec![],
            headers: Default::default(),
            attempts: 0,
            failures: 0,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn chains_keep_key_order() {
        let chains = chains_by_key(vec![row(1, "a"), row(2, "b"), row(3, "a"), row(4, "c")]);
        let ids: Vec<Vec<i64>> = chains
            .iter()
            .map(|c| c.iter().map(|r| r.id).collect())
            .collect();
        assert_eq!(ids, vec![vec![1, 3], vec![2], vec![4]]);
    }
}
