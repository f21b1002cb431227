//! The relay's Prometheus metrics, registered in a registry the caller owns (no
//! global state, so several relays in one test process do not mix their counts).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Default)]
pub struct RelayMetrics {
    pub published: Counter,
    pub publish_failures: Counter,
    pub dead: Counter,
    backlog: Gauge,
    oldest_pending_age_seconds: Gauge<f64, AtomicU64>,
    dead_backlog: Gauge,
}

impl RelayMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
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
        metrics
    }

    /// Reads the backlog gauges from the table; called when metrics are scraped.
    pub async fn refresh_backlog(&self, db: &PgPool) -> sqlx::Result<()> {
        let backlog = crate::store::backlog(db).await?;
        self.backlog.set(backlog.pending);
        self.oldest_pending_age_seconds.set(backlog.oldest_pending_age_seconds);
        self.dead_backlog.set(backlog.dead);
        Ok(())
    }
}
