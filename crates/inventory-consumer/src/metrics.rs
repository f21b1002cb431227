//! The consumer's Prometheus metrics, in a registry the caller owns.
//!
//! Besides counts of what became of each message, two service-level signals:
//! - `inventory_e2e_lag_seconds`: from an event's creation (the outbox row's
//!   `created_at`, sent by the relay as the `x-created-at` header, to the
//!   microsecond) to the commit of its effect here. A message without the header
//!   (an older relay) falls back to the AMQP `timestamp` property, which has whole
//!   seconds only and is stamped at publish time. Only messages whose effect
//!   committed (completed, rejected) are observed: a duplicate's lag says nothing
//!   about how fast orders are decided.
//! - `inventory_queue_depth_messages` and `inventory_dlq_depth_messages`: read
//!   from the broker when `/metrics` is scraped ([`QueueDepthProbe`]), so they
//!   are as fresh as the scrape and cost nothing between scrapes.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context;
use lapin::{Channel, Connection};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use service_kit::broker::BrokerConfig;
use tokio::sync::Mutex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// completed, rejected, cancelled, cancelled_before_placed, deferred (a
    /// cancel held for its OrderPlaced, counted at each try), duplicate,
    /// already_decided, unknown_order or poison.
    pub outcome: &'static str,
}

/// Upper bounds of the lag histogram, in seconds: milliseconds when all is
/// well, up to an hour for a backlog drained after an outage (or a replay).
const LAG_BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 3600.0,
];

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
    /// Event creation to the commit of its effect (completed or rejected only).
    pub e2e_lag_seconds: Histogram,
    /// Messages ready in the inventory queue, as of the last scrape.
    pub queue_depth: Gauge<f64, AtomicU64>,
    /// Messages ready in the dead-letter queue, as of the last scrape.
    pub dlq_depth: Gauge<f64, AtomicU64>,
    /// Scrapes that could not read a queue's depth from the broker.
    pub queue_depth_failures: Counter,
    /// Dead letters moved back to the inventory queue through the admin API.
    pub admin_replayed: Counter,
    /// Kafka partitions whose stored offset was outside their log, moved to
    /// the log's start (see `kafka::PartitionWorker::out_of_range`).
    pub kafka_offset_resets: Counter,
}

impl ConsumerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            messages: Family::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            retries: Counter::default(),
            dead_letter_failures: Counter::default(),
            e2e_lag_seconds: Histogram::new(LAG_BUCKETS),
            queue_depth: Gauge::default(),
            dlq_depth: Gauge::default(),
            admin_replayed: Counter::default(),
            queue_depth_failures: Counter::default(),
            kafka_offset_resets: Counter::default(),
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
        registry.register(
            "inventory_e2e_lag_seconds",
            "From an event's creation in the outbox to the commit of its effect (completed or \
             rejected orders)",
            metrics.e2e_lag_seconds.clone(),
        );
        registry.register(
            "inventory_queue_depth_messages",
            "Messages ready in the inventory queue, read from the broker at scrape time \
             (NaN when it cannot be read)",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "inventory_dlq_depth_messages",
            "Messages in the dead-letter queue, read from the broker at scrape time (NaN when it \
             cannot be read)",
            metrics.dlq_depth.clone(),
        );
        registry.register(
            "inventory_admin_replayed_messages",
            "Dead letters moved back to the inventory queue through the admin API",
            metrics.admin_replayed.clone(),
        );
        registry.register(
            "inventory_queue_depth_read_failures",
            "Scrapes that could not read a queue's depth from the broker",
            metrics.queue_depth_failures.clone(),
        );
        registry.register(
            "inventory_kafka_offset_resets",
            "Kafka partitions whose stored offset was outside their log (records deleted before \
             they were applied, or a recreated topic), moved to the log's earliest offset",
            metrics.kafka_offset_resets.clone(),
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

/// How long a scrape may wait for the broker before the depths read as unknown.
/// Well under Prometheus' default scrape timeout (10 s), so the other metrics
/// are still served.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads the queue depths into their gauges when `/metrics` is scraped, with a
/// passive declaration (which never creates a queue) on a connection of its own,
/// kept between scrapes: connecting per scrape would cost a handshake each time
/// and fill the broker's log with connections. Cheap to clone.
///
/// When a depth cannot be read (the broker is down, or slower than
/// [`PROBE_TIMEOUT`], or the queue does not exist yet), its gauge is set to NaN
/// rather than left at its last value: a frozen depth looks exactly like a
/// steady queue and would hide a backlog growing while the broker is away,
/// whereas NaN shows as a gap in graphs and fails every threshold comparison,
/// so alert on the broker itself (`inventory_queue_depth_read_failures_total`,
/// `/readyz`) rather than on the depth alone. The scrape still answers 200 with
/// every other metric.
#[derive(Clone)]
pub struct QueueDepthProbe {
    amqp_url: String,
    connection_name: String,
    inventory_queue: String,
    dead_letter_queue: String,
    metrics: ConsumerMetrics,
    /// The probe's connection and channel; one scrape at a time uses them.
    session: Arc<Mutex<Option<ProbeSession>>>,
    /// False on Kafka, where there are no queues to read.
    enabled: bool,
}

struct ProbeSession {
    connection: Connection,
    channel: Option<Channel>,
}

impl QueueDepthProbe {
    pub fn new(broker: &BrokerConfig, connection_name: &str, metrics: ConsumerMetrics) -> Self {
        Self {
            amqp_url: broker.amqp_url.clone(),
            connection_name: connection_name.to_owned(),
            inventory_queue: broker.inventory_queue.clone(),
            dead_letter_queue: broker.dead_letter_queue.clone(),
            metrics,
            session: Arc::default(),
            enabled: true,
        }
    }

    /// A probe that reads nothing: the consumer is on Kafka.
    pub fn disabled(mut self) -> Self {
        self.enabled = false;
        self
    }

    /// Reads both depths into their gauges (NaN for one that cannot be read).
    pub async fn refresh(&self) {
        if !self.enabled {
            return;
        }
        let mut session = self.session.lock().await;
        let queues = [
            (&self.inventory_queue, &self.metrics.queue_depth),
            (&self.dead_letter_queue, &self.metrics.dlq_depth),
        ];
        for (queue, gauge) in queues {
            let read = tokio::time::timeout(PROBE_TIMEOUT, self.depth(&mut session, queue)).await;
            let error = match read {
                Ok(Ok(depth)) => {
                    gauge.set(f64::from(depth));
                    continue;
                }
                Ok(Err(error)) => error,
                Err(_) => {
                    // Whatever it was doing is abandoned half-way: start afresh.
                    *session = None;
                    anyhow::anyhow!("no answer from the broker within {PROBE_TIMEOUT:?}")
                }
            };
            gauge.set(f64::NAN);
            self.metrics.queue_depth_failures.inc();
            tracing::warn!(queue = %queue, error = format!("{error:#}"),
                "cannot read a queue's depth for the metrics");
        }
    }

    /// Closes the probe's connection, if it has one.
    pub async fn close(&self) {
        let session = self.session.lock().await.take();
        if let Some(session) = session
            && session.connection.status().connected()
        {
            let _ = session.connection.close(200, "consumer stopping".into()).await;
        }
    }

    async fn depth(&self, session: &mut Option<ProbeSession>, queue: &str) -> anyhow::Result<u32> {
        if session.as_ref().is_none_or(|open| !open.connection.status().connected()) {
            let connection = outbox::amqp::connect(&self.amqp_url, &self.connection_name)
                .await
                .context("cannot connect to RabbitMQ")?;
            *session = Some(ProbeSession { connection, channel: None });
        }
        let open = session.as_mut().expect("connected above");
        // A passive declaration of a missing queue closes the channel: open another.
        if open.channel.as_ref().is_none_or(|channel| !channel.status().connected()) {
            open.channel =
                Some(open.connection.create_channel().await.context("cannot open a channel")?);
        }
        let channel = open.channel.as_ref().expect("opened above");
        crate::dead_letter::queue_depth(channel, queue)
            .await
            .with_context(|| format!("cannot read the depth of {queue:?}"))
    }
}
