//! The inventory consumer: applies each order event exactly once although the
//! broker (RabbitMQ, or Kafka: see [`kafka`]) may deliver it more than once. For every new event it reserves the
//! order's stock and sets the order COMPLETED, or REJECTED when stock is short.
//!
//! [`Application::build`] connects and binds; [`Application::run_until_stopped`]
//! consumes (several [`worker::Worker`]s, each on its own channel) and serves
//! `/healthz`, `/readyz` and `/metrics` until the shutdown token is cancelled.
//! Beside the workers, a sweeper forgets processed message ids past the dedup
//! window. All of them run under a supervisor that restarts a task that panics.
//!
//! [`dlq`] is the `inventory-consumer dlq list|replay` command, which needs only
//! the broker.

pub mod apply;
pub mod config;
pub mod dead_letter;
pub mod dlq;
pub mod http;
pub mod kafka;
pub mod message;
pub mod metrics;
pub mod worker;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use outbox::retention::RetentionMetrics;
use outbox::supervisor::{CrashSwitch, Supervisor};
use prometheus_client::registry::Registry;
use service_kit::http::HttpListener;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::{Command, Config, DlqCommand};
use metrics::{ConsumerMetrics, QueueDepthProbe};
use worker::{Worker, WorkerConfig};

pub struct Application {
    listener: HttpListener,
    db: PgPool,
    config: Config,
    metrics: ConsumerMetrics,
    retention_metrics: RetentionMetrics,
    registry: Registry,
    crash_switch: CrashSwitch,
}

impl Application {
    /// Connects to Postgres (creating the database and applying migrations) and
    /// binds the HTTP socket.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let db = config.db.connect_and_migrate().await?;
        Self::build_with_pool(config, db).await
    }

    /// Like [`Application::build`] with a pool the caller prepared (tests pass the
    /// per-test database of `#[sqlx::test]`).
    pub async fn build_with_pool(config: Config, db: PgPool) -> anyhow::Result<Self> {
        let listener = HttpListener::bind(config.listen_addr).await?;
        let mut registry = Registry::default();
        let metrics = ConsumerMetrics::register(&mut registry);
        let retention_metrics = RetentionMetrics::register(&mut registry);
        Ok(Self {
            listener,
            db,
            config,
            metrics,
            retention_metrics,
            registry,
            crash_switch: CrashSwitch::default(),
        })
    }

    /// The port it listens on (the one the system chose for port 0).
    pub fn port(&self) -> u16 {
        self.listener.port()
    }

    /// A handle on the counters, which tests read to know what was settled.
    pub fn metrics(&self) -> ConsumerMetrics {
        self.metrics.clone()
    }

    /// Test hook: the switch that makes a worker panic before its next batch.
    pub fn crash_switch(&self) -> CrashSwitch {
        self.crash_switch.clone()
    }

    /// Consumes and serves until `shutdown` is cancelled, then lets each worker
    /// finish the batch in hand and closes its channel: whatever it received but
    /// did not ack goes back to the queue.
    pub async fn run_until_stopped(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let supervisor = Supervisor::new(&mut self.registry, shutdown.clone());
        let config = &self.config;
        let worker_config = Arc::new(WorkerConfig {
            amqp_url: config.broker.amqp_url.clone(),
            topology: config.broker.inventory_topology(),
            consumer_name: config.consumer_name.clone(),
            prefetch: config.prefetch.max(1),
            batch_size: config.batch_size.max(1),
            out_of_order_wait: config.out_of_order_wait,
            crash_switch: self.crash_switch.clone(),
        });
        let connected = Arc::new(AtomicUsize::new(0));
        let topology = outbox::amqp::TopologyStatus::default();
        let mut workers = JoinSet::new();
        if config.consumer_transport == config::ConsumerTransport::Kafka {
            let consumer = kafka::KafkaConsumer {
                db: self.db.clone(),
                config: config.kafka.clone(),
                consumer_name: config.consumer_name.clone(),
                batch_size: config.batch_size.max(1),
                out_of_order_wait: config.out_of_order_wait,
                metrics: self.metrics.clone(),
                connected: connected.clone(),
            };
            let stop = shutdown.clone();
            supervisor.spawn(&mut workers, "kafka".to_owned(), move || {
                let (consumer, stop) = (consumer.clone(), stop.clone());
                async move {
                    if let Err(error) = consumer.run(stop).await {
                        tracing::error!(error = format!("{error:#}"), "the Kafka consumer stopped");
                        panic!("the Kafka consumer failed: {error:#}");
                    }
                }
            });
        }
        let amqp_workers = match config.consumer_transport {
            config::ConsumerTransport::Rabbitmq => config.concurrency.max(1),
            config::ConsumerTransport::Kafka => 0,
        };
        for index in 0..amqp_workers {
            let worker = Worker {
                name: format!("{}-{index}", config.consumer_name),
                db: self.db.clone(),
                config: worker_config.clone(),
                metrics: self.metrics.clone(),
                connected: connected.clone(),
                topology: topology.clone(),
                shutdown: shutdown.clone(),
            };
            supervisor.spawn(&mut workers, worker.name.clone(), move || worker.clone().run());
        }
        outbox::retention::spawn_supervised(
            &supervisor,
            &mut workers,
            self.db.clone(),
            config.inbox_retention(),
            config.sweep_interval,
            self.retention_metrics.clone(),
        );

        let mut queue_depth = QueueDepthProbe::new(
            &config.broker,
            &format!("{}-metrics", config.consumer_name),
            self.metrics.clone(),
        );
        if config.consumer_transport == config::ConsumerTransport::Kafka {
            queue_depth = queue_depth.disabled();
        }
        let state = http::HttpState {
            db: self.db.clone(),
            connected_workers: connected,
            topology,
            health: supervisor.health(),
            registry: Arc::new(self.registry),
            queue_depth: queue_depth.clone(),
            admin_token: service_kit::admin::AdminToken::new(self.config.admin_token.as_deref()),
            dead_letters: dlq::Source::of(&self.config),
            metrics: self.metrics.clone(),
        };
        let served =
            self.listener.serve("inventory-consumer", http::router(state), shutdown.clone()).await;
        shutdown.cancel();
        while workers.join_next().await.is_some() {}
        queue_depth.close().await;
        self.db.close().await;
        tracing::info!("inventory-consumer stopped");
        served
    }
}
