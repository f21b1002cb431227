//! The consumer's Prometheus metrics, in a registry the caller owns.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// completed, rejected, duplicate, already_decided, unknown_order or poison.
    pub outcome: &'static str,
}

#[derive(Clone)]
pub struct ConsumerMetrics {
    /// Messages settled, by what became of them.
    pub messages: Family<OutcomeLabels, Counter>,
    /// Messages per applied batch.
    pub batch_size: Histogram,
    /// Batch transactions that failed and were retried (database trouble).
    pub retries: Counter,
    /// Poison messages whose copy the dead-letter exchange did not confirm:
    /// handed back to the queue instead of acked.
    pub dead_letter_failures: Counter,
}

impl ConsumerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            messages: Family::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            retries: Counter::default(),
            dead_letter_failures: Counter::default(),
        };
        registry.register(
            "inventory_messages",
            "Messages settled (acked, or moved to the dead-letter queue), by outcome",
            metrics.messages.clone(),
        );
        registry.register(
            "inventory_batch_size",
            "Messages applied per database transaction",
            metrics.batch_size.clone(),
        );
        registry.register(
            "inventory_batch_retries",
            "Batch transactions that failed and were retried without acking",
            metrics.retries.clone(),
        );
        registry.register(
            "inventory_dead_letter_failures",
            "Poison messages the dead-letter exchange did not confirm, handed back to the queue",
            metrics.dead_letter_failures.clone(),
        );
        metrics
    }

    /// Messages settled with `outcome` so far.
    pub fn count(&self, outcome: &'static str) -> u64 {
        self.messages.get_or_create(&OutcomeLabels { outcome }).get()
    }

    pub(crate) fn record(&self, outcome: &'static str) {
        self.messages.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}
