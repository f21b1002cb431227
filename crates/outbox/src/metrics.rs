//! The relay's Prometheus metrics, registered in a registry the caller owns (no
//! global state, so several relays in one test process do not mix their counts).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use std::sync::atomic::AtomicU64;

use crate::transport::TransportState;

/// The relay's counters, histograms and backlog gauges. Cheap to clone: the
/// clones share their values. [`RelayMetrics::default`] makes unregistered ones.
#[derive(Clone)]
pub struct RelayMetrics {
    /// Events the broker confirmed and the relay deleted.
    pub published: Counter,
    /// Publish attempts that failed: nacked, returned (unroutable included) or
    /// not confirmed in time.
    pub publish_failures: Counter,
    /// Events marked dead (at the attempt limit, or parked as unroutable).
    pub dead: Counter,
    /// From an event's commit (`created_at`) to the broker's confirm.
    pub commit_to_confirm_seconds: Histogram,
    /// Events claimed per relay pass (passes that found none are not counted).
    pub batch_size: Histogram,
    backlog: Gauge,
    oldest_pending_age_seconds: Gauge<f64, AtomicU64>,
    dead_backlog: Gauge,
    /// 1 for the broker's current state (`state` = up, blocked or down), 0 for the others.
    transport_state: Family<Vec<(String, String)>, Gauge>,
    /// When the broker's state last changed (Unix time, seconds).
    transport_state_since: Gauge<f64, AtomicU64>,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        Self {
            published: Counter::default(),
            publish_failures: Counter::default(),
            dead: Counter::default(),
            // 0.5 ms .. 65 s.
            commit_to_confirm_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            backlog: Gauge::default(),
            oldest_pending_age_seconds: Gauge::default(),
            dead_backlog: Gauge::default(),
            transport_state: Family::default(),
            transport_state_since: Gauge::default(),
        }
    }
}

impl RelayMetrics {
    /// New metrics, registered in `registry` under the names `outbox_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "outbox_commit_to_confirm_seconds",
            "Time from an event's commit to the broker's confirm of its message",
            metrics.commit_to_confirm_seconds.clone(),
        );
        registry.register(
            "outbox_relay_batch_size",
            "Events claimed per relay transaction",
            metrics.batch_size.clone(),
        );
        registry.register(
            "outbox_events_published",
            "Events confirmed by the broker and removed from the outbox",
            metrics.published.clone(),
        );
        registry.register(
            "outbox_publish_failures",
            "Publish attempts that failed (nacked, returned or not confirmed in time)",
            metrics.publish_failures.clone(),
        );
        registry.register(
            "outbox_events_dead",
            "Events marked dead after reaching the attempt limit",
            metrics.dead.clone(),
        );
        registry.register(
            "outbox_backlog_events",
            "Events waiting in the outbox to be published",
            metrics.backlog.clone(),
        );
        registry.register(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest event waiting in the outbox",
            metrics.oldest_pending_age_seconds.clone(),
        );
        registry.register(
            "outbox_dead_backlog_events",
            "Dead events parked in the outbox, waiting for inspection or replay",
            metrics.dead_backlog.clone(),
        );
        registry.register(
            "outbox_transport_state",
            "The broker as the relay sees it: 1 for the current state (up, blocked, down)",
            metrics.transport_state.clone(),
        );
        registry.register(
            "outbox_transport_state_since_seconds",
            "When the broker's state last changed, as Unix time",
            metrics.transport_state_since.clone(),
        );
        metrics.transport_changed(TransportState::Down);
        metrics
    }

    /// Records that the broker is now in `state`.
    pub fn transport_changed(&self, state: TransportState) {
        for each in [TransportState::Up, TransportState::Blocked, TransportState::Down] {
            let label = vec![("state".to_owned(), each.as_str().to_owned())];
            self.transport_state.get_or_create(&label).set(i64::from(each == state));
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        self.transport_state_since.set(now.map_or(0.0, |since| since.as_secs_f64()));
    }

    /// Reads the backlog gauges from the table; called when metrics are scraped.
    pub async fn refresh_backlog(&self, db: &PgPool) -> crate::Result<()> {
        let backlog = crate::store::backlog(db).await?;
        self.backlog.set(backlog.pending);
        self.oldest_pending_age_seconds.set(backlog.oldest_pending_age_seconds);
        self.dead_backlog.set(backlog.dead);
        Ok(())
    }
}
