//! Metric names and the small functions that record them (the `metrics` facade; install
//! any exporter). Labels are bounded: service, topic, class and source, never ids or keys.

use std::time::Duration;

use crate::error::ErrorClass;

/// Counter: events staged and committed through a `Publisher`, by `service` (a stage
/// that found its `event_id` already staged, or was rolled back, is not counted).
pub const EVENTS_STAGED: &str = "outpost_events_staged_total";
/// Counter: events acked by the broker and marked published, by `service`, `topic`.
pub const EVENTS_PUBLISHED: &str = "outpost_events_published_total";
/// Counter: failed attempts scheduled for retry, by `service`, `class`.
pub const EVENTS_RETRIED: &str = "outpost_events_retried_total";
/// Counter: events parked (dead), by `service`, `class`; once per event.
pub const EVENTS_PARKED: &str = "outpost_events_parked_total";
/// Histogram (seconds): staging to broker acknowledgement, by `service`.
pub const PUBLISH_LATENCY: &str = "outpost_publish_latency_seconds";
/// Gauge: pending rows, by `service`; 0 when drained. Set by the one relay of a service
/// that holds its housekeeping lock; a relay that cannot reach the database keeps its last
/// reading, and one whose lock another relay took over reports 0 (the other reports).
pub const BACKLOG: &str = "outpost_backlog";
/// Gauge (seconds): age of the oldest pending row, by `service`; 0 when drained. Set as
/// [`BACKLOG`] is.
pub const OLDEST_PENDING: &str = "outpost_oldest_pending_seconds";
/// Gauge (seconds): the relay's current idle polling interval, by `service`.
pub const POLL_INTERVAL: &str = "outpost_poll_interval_seconds";
/// Counter: wake-ups received, by `source` (redis, notify, local).
pub const WAKEUPS: &str = "outpost_wakeups_total";
/// Histogram (seconds): wake-up hint sent by a writer → the relay's next claim returned
/// (every row committed before the hint is then claimed, by this relay or another owner);
/// by `service`, `source` (redis, notify). Only hints that carry their send time (Outpost's
/// [`crate::Waker`]) are timed; writer and relay clocks must agree.
pub const WAKEUP_LATENCY: &str = "outpost_wakeup_latency_seconds";
/// Counter: relay iterations that failed (database errors), by `service`.
pub const RELAY_ERRORS: &str = "outpost_relay_errors_total";
/// Counter: Kafka producers replaced after being fenced.
pub const PRODUCER_REBUILDS: &str = "outpost_producer_rebuilds_total";
/// Counter: a later event of a key acked after an earlier one failed (the failed one is
/// then delivered after it), by `service`. Only a broker recovering between the two
/// messages' timeouts can cause it; it should stay 0.
pub const ORDER_BREAKS: &str = "outpost_order_breaks_total";
/// Counter: owned keys whose lease lapsed before the relay renewed it (the relay stalled
/// for longer than the lease), by `service`. What the relay had acked and not yet recorded
/// may then be delivered again by the key's next owner; it should stay 0.
pub const LEASES_LOST: &str = "outpost_leases_lost_total";
/// Counter: published rows deleted by retention, by `service`.
pub const ROWS_CLEANED: &str = "outpost_rows_cleaned_total";

pub(crate) fn staged(service: &str, committed: usize) {
    metrics::counter!(EVENTS_STAGED, "service" => service.to_owned()).increment(committed as u64);
}

pub(crate) fn leases_lost(service: &str, keys: usize) {
    metrics::counter!(LEASES_LOST, "service" => service.to_owned()).increment(keys as u64);
}

pub(crate) fn order_break(service: &str) {
    metrics::counter!(ORDER_BREAKS, "service" => service.to_owned()).increment(1);
}

pub(crate) fn published(service: &str, topic: &str, latency: Duration) {
    published_batch(service, [(topic, latency)]);
}

/// [`published`] for a settled batch: each label set is looked up once, not per row (per
/// row, three label strings were allocated and two series looked up).
pub(crate) fn published_batch<'a>(
    service: &str,
    rows: impl IntoIterator<Item = (&'a str, Duration)>,
) {
    let latency = metrics::histogram!(PUBLISH_LATENCY, "service" => service.to_owned());
    let mut by_topic: Vec<(&str, u64)> = Vec::new();
    for (topic, took) in rows {
        latency.record(took.as_secs_f64());
        match by_topic.iter_mut().find(|(t, _)| *t == topic) {
            Some((_, n)) => *n += 1,
            None => by_topic.push((topic, 1)),
        }
    }
    for (topic, n) in by_topic {
        metrics::counter!(EVENTS_PUBLISHED, "service" => service.to_owned(), "topic" => topic.to_owned())
            .increment(n);
    }
}

pub(crate) fn retried(service: &str, class: ErrorClass) {
    metrics::counter!(EVENTS_RETRIED, "service" => service.to_owned(), "class" => class.as_str())
        .increment(1);
}

pub(crate) fn parked(service: &str, class: ErrorClass) {
    metrics::counter!(EVENTS_PARKED, "service" => service.to_owned(), "class" => class.as_str())
        .increment(1);
}

pub(crate) fn backlog(service: &str, pending: i64, oldest: Duration) {
    #[allow(clippy::cast_precision_loss)]
    metrics::gauge!(BACKLOG, "service" => service.to_owned()).set(pending as f64);
    metrics::gauge!(OLDEST_PENDING, "service" => service.to_owned()).set(oldest.as_secs_f64());
}

pub(crate) fn poll_interval(service: &str, interval: Duration) {
    metrics::gauge!(POLL_INTERVAL, "service" => service.to_owned()).set(interval.as_secs_f64());
}

pub(crate) fn wakeup(source: &'static str) {
    metrics::counter!(WAKEUPS, "source" => source).increment(1);
}

/// `sent_at_ms`: the hint's send time, milliseconds since the Unix epoch.
pub(crate) fn wakeup_latency(service: &str, source: &'static str, sent_at_ms: i64) {
    let waited = chrono::Utc::now()
        .timestamp_millis()
        .saturating_sub(sent_at_ms)
        .max(0);
    #[allow(clippy::cast_precision_loss)]
    metrics::histogram!(WAKEUP_LATENCY, "service" => service.to_owned(), "source" => source)
        .record(waited as f64 / 1000.0);
}

pub(crate) fn relay_error(service: &str) {
    metrics::counter!(RELAY_ERRORS, "service" => service.to_owned()).increment(1);
}

pub(crate) fn producer_rebuilt() {
    metrics::counter!(PRODUCER_REBUILDS).increment(1);
}

pub(crate) fn cleaned(service: &str, rows: u64) {
    metrics::counter!(ROWS_CLEANED, "service" => service.to_owned()).increment(rows);
}

/// Counter: Kafka-first direct publishes, by `service`, `outcome` (acked, rejected, failed).
pub const DIRECT_PUBLISHES: &str = "outpost_direct_publishes_total";
/// Counter: Kafka-first events stored in the outbox instead, by `service`, `reason`
/// (circuit_open, kafka_error, timeout, key_pending).
pub const FALLBACKS: &str = "outpost_fallbacks_total";
/// Gauge: Kafka-first circuit state by `service` (0 closed, 1 half-open, 2 open).
pub const CIRCUIT_STATE: &str = "outpost_circuit_state";
/// Counter: transactional events after commit, by `service`, `result`: `hit` (delivered
/// by the eager path) or `miss` (left to the relay).
pub const EAGER_DISPATCH: &str = "outpost_eager_dispatch_total";

pub(crate) fn direct(service: &str, outcome: &'static str) {
    metrics::counter!(DIRECT_PUBLISHES, "service" => service.to_owned(), "outcome" => outcome)
        .increment(1);
}

pub(crate) fn fallback(service: &str, reason: &'static str) {
    metrics::counter!(FALLBACKS, "service" => service.to_owned(), "reason" => reason).increment(1);
}

/// `gauge`: 0 closed, 1 half-open, 2 open.
pub(crate) fn circuit(service: &str, gauge: f64) {
    metrics::gauge!(CIRCUIT_STATE, "service" => service.to_owned()).set(gauge);
}

pub(crate) fn eager(service: &str, hits: usize, misses: usize) {
    metrics::counter!(EAGER_DISPATCH, "service" => service.to_owned(), "result" => "hit")
        .increment(hits as u64);
    metrics::counter!(EAGER_DISPATCH, "service" => service.to_owned(), "result" => "miss")
        .increment(misses as u64);
}

/// Counter: consumed messages by consumer `group` and `outcome` (handled, duplicate,
/// retried, dead_lettered).
pub const CONSUMED: &str = "outpost_consumed_total";

pub(crate) fn consumed(group: &str, outcome: &'static str) {
    metrics::counter!(CONSUMED, "group" => group.to_owned(), "outcome" => outcome).increment(1);
}

/// Gauge (bytes): WAL the server keeps for a WAL-mode stream's slot (from its
/// `restart_lsn`), by `service`; grows while the relay is stopped or behind.
pub const WAL_RETAINED: &str = "outpost_wal_retained_bytes";
/// Gauge: the commit LSN of the last transaction a WAL relay read, by `service`.
pub const WAL_RECEIVED_LSN: &str = "outpost_wal_received_lsn";
/// Gauge: the LSN a WAL relay acknowledged (every event up to it acked by the broker),
/// by `service`.
pub const WAL_ACKED_LSN: &str = "outpost_wal_acknowledged_lsn";
/// Gauge (seconds): how long the newest acknowledged LSN waited before a standby status
/// update told the server, by `service`.
pub const WAL_FEEDBACK_AGE: &str = "outpost_wal_feedback_age_seconds";
/// Gauge: 1 while this WAL relay leads its stream (reads the slot), 0 while it waits.
pub const WAL_LEADER: &str = "outpost_wal_leader";

pub(crate) fn wal_retained(service: &str, bytes: i64) {
    metrics::gauge!(WAL_RETAINED, "service" => service.to_owned()).set(bytes as f64);
}

pub(crate) fn wal_lsns(service: &str, received: u64, acked: u64) {
    metrics::gauge!(WAL_RECEIVED_LSN, "service" => service.to_owned()).set(received as f64);
    metrics::gauge!(WAL_ACKED_LSN, "service" => service.to_owned()).set(acked as f64);
}

pub(crate) fn wal_feedback_age(service: &str, age: Duration) {
    metrics::gauge!(WAL_FEEDBACK_AGE, "service" => service.to_owned()).set(age.as_secs_f64());
}

pub(crate) fn wal_leader(service: &str, leading: bool) {
    metrics::gauge!(WAL_LEADER, "service" => service.to_owned()).set(f64::from(u8::from(leading)));
}

/// Gives every metric above its help text (exporters print it as `# HELP`); call once
/// after installing a recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    let counters = [
        (
            EVENTS_STAGED,
            "Events staged and committed through a Publisher",
        ),
        (
            EVENTS_PUBLISHED,
            "Events acked by the broker and marked published",
        ),
        (
            EVENTS_RETRIED,
            "Failed delivery attempts scheduled for retry",
        ),
        (EVENTS_PARKED, "Events parked (dead), once per event"),
        (WAKEUPS, "Wake-ups received by relays"),
        (RELAY_ERRORS, "Relay iterations that failed"),
        (
            PRODUCER_REBUILDS,
            "Kafka producers replaced after being fenced",
        ),
        (ROWS_CLEANED, "Published rows deleted by retention"),
        (
            LEASES_LOST,
            "Owned keys whose lease lapsed before the relay renewed it",
        ),
        (DIRECT_PUBLISHES, "Kafka-first direct publishes by outcome"),
        (
            FALLBACKS,
            "Kafka-first events stored in the outbox instead, by reason",
        ),
        (
            EAGER_DISPATCH,
            "Transactional events after commit: eager hit or miss",
        ),
        (CONSUMED, "Consumed messages by outcome"),
    ];
    for (name, help) in counters {
        describe_counter!(name, help);
    }
    let gauges = [
        (BACKLOG, Unit::Count, "Pending outbox rows"),
        (
            OLDEST_PENDING,
            Unit::Seconds,
            "Age of the oldest pending row",
        ),
        (
            POLL_INTERVAL,
            Unit::Seconds,
            "The relay's current idle polling interval",
        ),
        (
            CIRCUIT_STATE,
            Unit::Count,
            "Kafka-first circuit: 0 closed, 1 half-open, 2 open",
        ),
        (
            WAL_RETAINED,
            Unit::Bytes,
            "WAL the server keeps for the stream's slot",
        ),
        (
            WAL_RECEIVED_LSN,
            Unit::Count,
            "Commit LSN of the last transaction the WAL relay read",
        ),
        (
            WAL_ACKED_LSN,
            Unit::Count,
            "LSN the WAL relay acknowledged to the slot",
        ),
        (
            WAL_FEEDBACK_AGE,
            Unit::Seconds,
            "How long the newest acknowledged LSN waited for a status update",
        ),
        (
            WAL_LEADER,
            Unit::Count,
            "1 while this WAL relay reads the slot",
        ),
    ];
    for (name, unit, help) in gauges {
        describe_gauge!(name, unit, help);
    }
    describe_histogram!(
        PUBLISH_LATENCY,
        Unit::Seconds,
        "Staging to broker acknowledgement"
    );
    describe_histogram!(
        WAKEUP_LATENCY,
        Unit::Seconds,
        "Wake-up hint sent to the relay's next claim returned"
    );
}
