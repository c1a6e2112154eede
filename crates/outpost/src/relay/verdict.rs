//! What a failed send means for its row: retry the key later, or park the row.

use std::time::Duration;

use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::error::ErrorClass;
use crate::kafka::producer::SendFailure;
use crate::outbox::store::{ClaimedEvent, Settlement};

/// The retry policy shared by the relay and the eager path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RetryPolicy {
    pub(crate) backoff: Backoff,
    pub(crate) max_attempts: u32,
}

impl RetryPolicy {
    /// The settlement of `event` after `failure`: [`Settlement::Dead`] for a permanent
    /// error or an exhausted budget, otherwise [`Settlement::Retry`] with the key's delay.
    /// Transient failures (broker unavailable) never consume the budget.
    pub(crate) fn verdict(
        &self,
        service: &str,
        event: &ClaimedEvent,
        failure: &SendFailure,
    ) -> Settlement {
        let error = failure.to_string();
        let attempt = u32::try_from(event.attempts).unwrap_or(0) + 1;
        let budget_spent = u32::try_from(event.failures).unwrap_or(0) + 1;
        let budgeted = failure.class == ErrorClass::Retriable;
        let park = match failure.class {
            ErrorClass::Permanent => true,
            ErrorClass::Retriable => budget_spent >= self.max_attempts,
            ErrorClass::Transient => false,
        };
        if park {
            warn!(service, event_id = %event.event_id, topic = %event.topic, error, "parking event");
            return Settlement::Dead {
                error,
                budgeted,
                attempts: event.attempts,
            };
        }
        debug!(service, event_id = %event.event_id, error, "delivery failed; its key will retry");
        Settlement::Retry {
            delay: self.delay(attempt),
            error,
            budgeted,
            transient: failure.class == ErrorClass::Transient,
            attempts: event.attempts,
        }
    }

    fn delay(&self, attempt: u32) -> Duration {
        self.backoff.delay(attempt)
    }
}
