//! What a failure means for an event: the class of every producer error.

use std::fmt;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What a failure means for the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The broker is unreachable, slow or moving leaders: retry later, without consuming
    /// the attempt budget and without ever parking the event.
    Transient,
    /// Unexpected or per-topic failure (unknown topic or partition, corrupt message):
    /// retry later, counting against the attempt budget, then park. It says nothing about
    /// the broker as a whole, so it never trips a circuit breaker.
    Retriable,
    /// This record can never be accepted (too large, topic not authorized, invalid topic):
    /// park it at once.
    Permanent,
}

impl ErrorClass {
    /// Lowercase name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::Retriable => "retriable",
            Self::Permanent => "permanent",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Classifies a produce error.
pub fn classify(err: &KafkaError) -> ErrorClass {
    match err.rdkafka_error_code() {
        Some(code) => classify_code(code),
        // A topic or key with a NUL character, refused before librdkafka sees it: no retry
        // can ever send it.
        None if matches!(err, KafkaError::Nul(_)) => ErrorClass::Permanent,
        None => ErrorClass::Retriable,
    }
}

/// Classifies a librdkafka or broker error code.
pub fn classify_code(code: RDKafkaErrorCode) -> ErrorClass {
    use RDKafkaErrorCode as C;
    match code {
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::MessageBatchTooLarge
        | C::InvalidRecord
        | C::BadMessage
        | C::InvalidTimestamp
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::InvalidTopic
        | C::InvalidRequiredAcks
        | C::UnsupportedForMessageFormat
        | C::UnsupportedCompressionType
        | C::InvalidArgument => ErrorClass::Permanent,
        C::MessageTimedOut
        | C::QueueFull
        | C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::Resolve
        | C::RequestTimedOut
        | C::OperationTimedOut
        | C::TimedOutQueue
        | C::NetworkException
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::PreferredLeaderNotAvailable
        | C::EligibleLeadersNotAvailable
        | C::BrokerNotAvailable
        | C::ReplicaNotAvailable
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::ISRInsufficient
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::KafkaStorageError
        | C::ThrottlingQuotaExceeded
        | C::PurgeQueue
        | C::PurgeInflight
        | C::BrokerDestroy
        | C::DestroyBroker
        | C::Retry
        | C::RebootstrapRequired
        | C::ProducerFenced
        | C::UnknownProducerId
        | C::InvalidProducerEpoch
        | C::InvalidProducerIdMapping
        | C::OutOfOrderSequenceNumber
        | C::Fenced
        | C::Fatal => ErrorClass::Transient,
        _ => ErrorClass::Retriable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_with_a_nul_character_is_permanent() {
        let nul = std::ffi::CString::new("t\0x").unwrap_err();
        assert_eq!(classify(&KafkaError::Nul(nul)), ErrorClass::Permanent);
        assert_eq!(classify(&KafkaError::Canceled), ErrorClass::Retriable);
    }

    #[test]
    fn classification() {
        use RDKafkaErrorCode as C;
        assert_eq!(classify_code(C::MessageSizeTooLarge), ErrorClass::Permanent);
        assert_eq!(
            classify_code(C::TopicAuthorizationFailed),
            ErrorClass::Permanent
        );
        assert_eq!(classify_code(C::MessageTimedOut), ErrorClass::Transient);
        assert_eq!(classify_code(C::QueueFull), ErrorClass::Transient);
        assert_eq!(classify_code(C::ProducerFenced), ErrorClass::Transient);
        assert_eq!(
            classify_code(C::NotLeaderForPartition),
            ErrorClass::Transient
        );
        assert_eq!(classify_code(C::Unknown), ErrorClass::Retriable);
        // Per-topic problems are budgeted, never transient forever.
        assert_eq!(
            classify_code(C::UnknownTopicOrPartition),
            ErrorClass::Retriable
        );
        assert_eq!(classify_code(C::UnknownPartition), ErrorClass::Retriable);
        // CORRUPT_MESSAGE is retriable in Kafka: not parked at once.
        assert_eq!(classify_code(C::InvalidMessage), ErrorClass::Retriable);
    }
}
