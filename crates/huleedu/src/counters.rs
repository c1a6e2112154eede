//! In-process metric counters. Outpost reports which path an event took (eager dispatch
//! hit or miss, Kafka-first direct or fallback, relay delivery) only as metrics, so the
//! pipeline installs this small `metrics` recorder to read those counters back and show
//! them in its report. Gauges and histograms are not kept.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// Counters recorded since the recorder was installed (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Counters {
    registry: Arc<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    counters: Mutex<HashMap<Key, Arc<AtomicU64>>>,
}

/// `None` when another recorder already owned the process.
static INSTALLED: OnceLock<Option<Counters>> = OnceLock::new();

impl Counters {
    /// Installs the recorder as the process's global one (once; later calls return the
    /// same counters). `None` when another recorder was installed first.
    pub fn install() -> Option<Self> {
        INSTALLED
            .get_or_init(|| {
                let counters = Self::default();
                metrics::set_global_recorder(Arc::clone(&counters.registry))
                    .ok()
                    .map(|()| counters)
            })
            .clone()
    }

    /// The sum of counter `name` over every label set that includes all of `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let counters = self
            .registry
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        counters
            .iter()
            .filter(|(key, _)| key.name() == name)
            .filter(|(key, _)| {
                labels
                    .iter()
                    .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
            })
            .map(|(_, value)| value.load(Ordering::Relaxed))
            .sum()
    }
}

impl Recorder for Registry {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        Counter::from_arc(Arc::clone(counters.entry(key.clone()).or_default()))
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}
