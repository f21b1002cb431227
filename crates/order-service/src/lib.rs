//! The order service: an axum API whose `POST /orders` writes the order and its
//! `OrderPlaced` event in one transaction, and the relay pool that publishes those
//! events to RabbitMQ, in the same process.
//!
//! [`Application::build`] binds and connects; [`Application::run_until_stopped`]
//! serves and relays until the shutdown token is cancelled. Keeping the two apart
//! lets tests bind port 0 and learn the port before serving.
//!
//! The API and the background work (relay, its listener, the sweeper of expired
//! Idempotency-Keys) use two pools, so a burst of requests cannot starve the
//! relay of connections, nor a slow broker hold the connections the API needs.
//! Background tasks run under a supervisor that restarts one that panics.

pub mod admin;
pub mod cancel;
pub mod commit;
pub mod config;
pub mod console;
pub mod error;
pub mod idempotency;
pub mod orders;
pub mod reconcile;
pub mod routes;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use outbox::metrics::RelayMetrics;
use outbox::relay::{Relay, RelayConfig};
use outbox::retention::{Retention, RetentionMetrics};
use outbox::supervisor::{CrashSwitch, Supervisor};
use prometheus_client::registry::Registry;
use service_kit::http::HttpListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use writer::{OrderWriter, WriterMetrics};

pub use config::{Command, Config, OutboxCommand, ReconcileArgs, TransportKind};

pub struct Application {
    listener: HttpListener,
    /// The API's pool.
    db: PgPool,
    /// The pool of the relay, its listener and the sweeper.
    background_db: PgPool,
    config: Config,
    relay_metrics: RelayMetrics,
    retention_metrics: RetentionMetrics,
    writer_metrics: WriterMetrics,
    registry: Registry,
    admin_metrics: admin::AdminMetrics,
    crash_switch: CrashSwitch,
}

/// Refuses settings that could never work (relay settings that could never
/// publish, a zero COMMIT_DEADLINE), before anything starts. RELAY_WORKERS=0
/// (no relay in this process) is allowed.
fn check_settings(config: &Config) -> anyhow::Result<()> {
    if config.write.commit_deadline.is_zero() {
        anyhow::bail!("COMMIT_DEADLINE must be more than zero");
    }
    if config.relay.relay_workers > 0 {
        config.relay_config().validate()?;
        match config.relay.relay_transport {
            TransportKind::Rabbitmq => drop(config.relay_transport()?),
            TransportKind::Kafka => drop(config.kafka_transport()?),
        }
    }
    Ok(())
}

impl Application {
    /// Connects to Postgres (creating the database and applying migrations) and
    /// binds the listening socket.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        check_settings(&config)?;
        let db = config.db.connect_and_migrate().await?;
        Self::build_with_pool(config, db).await
    }

    /// Like [`Application::build`] with the API's pool prepared by the caller
    /// (tests pass the per-test database of `#[sqlx::test]`); the background
    /// pool connects to the same database.
    pub async fn build_with_pool(config: Config, db: PgPool) -> anyhow::Result<Self> {
        check_settings(&config)?;
        let listener = HttpListener::bind(config.listen_addr).await?;
        let background_db = service_kit::db::sibling_pool(
            &db,
            config.relay.relay_db_max_connections,
            config.db.db_acquire_timeout_ms,
        );
        let mut registry = Registry::default();
        let relay_metrics = RelayMetrics::register(&mut registry);
        let retention_metrics = RetentionMetrics::register(&mut registry);
        let writer_metrics = WriterMetrics::register(&mut registry);
        let admin_metrics = admin::AdminMetrics::register(&mut registry);
        Ok(Self {
            listener,
            db,
            background_db,
            config,
            relay_metrics,
            retention_metrics,
            writer_metrics,
            admin_metrics,
            registry,
            crash_switch: CrashSwitch::default(),
        })
    }

    /// The port it listens on (the one the system chose for port 0).
    pub fn port(&self) -> u16 {
        self.listener.port()
    }

    /// Test hook: the switch that makes relay workers panic (see [`CrashSwitch`]).
    pub fn crash_switch(&self) -> CrashSwitch {
        self.crash_switch.clone()
    }

    /// Serves and relays until `shutdown` is cancelled, then lets in-flight
    /// requests and relay batches finish.
    pub async fn run_until_stopped(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let supervisor = Supervisor::new(&mut self.registry, shutdown.clone());
        let relay_config =
            RelayConfig { crash_switch: self.crash_switch.clone(), ..self.config.relay_config() };
        let (db, metrics) = (self.background_db.clone(), self.relay_metrics.clone());
        let relay = match self.config.relay.relay_transport {
            _ if relay_config.workers == 0 => None,
            TransportKind::Rabbitmq => {
                let transport = self.config.relay_transport()?;
                Some(Relay::spawn_supervised(db, transport, relay_config, metrics, &supervisor)?)
            }
            TransportKind::Kafka => {
                let transport = self.config.kafka_transport()?;
                ensure_kafka_topic(&transport, &self.config.relay, shutdown.clone());
                Some(Relay::spawn_supervised(db, transport, relay_config, metrics, &supervisor)?)
            }
        };
        // Writers, and the sweeper of expired keys.
        let mut tasks = tokio::task::JoinSet::new();
        let writer = OrderWriter::spawn(
            self.db.clone(),
            self.config.writer_config(),
            relay.as_ref().map(Relay::waker),
            self.writer_metrics,
            &supervisor,
            &mut tasks,
        );
        outbox::retention::spawn_supervised(
            &supervisor,
            &mut tasks,
            self.background_db.clone(),
            Retention::idempotency_keys(self.config.idempotency_key_ttl),
            self.config.sweep_interval,
            self.retention_metrics.clone(),
        );
        let state = routes::AppState {
            db: self.db.clone(),
            writer,
            relay: relay.as_ref().map(Relay::status),
            health: supervisor.health(),
            relay_metrics: self.relay_metrics,
            registry: Arc::new(self.registry),
            request_timeout: Duration::from_millis(self.config.request_timeout_ms),
            admin_token: admin::AdminToken::new(self.config.admin_token.as_deref()),
            admin_metrics: self.admin_metrics,
            sessions: console::Sessions::default(),
            relay_workers: self.config.relay.relay_workers,
            consumer_admin: self
                .config
                .consumer_admin_url
                .clone()
                .zip(self.config.admin_token.clone())
                .map(|(url, token)| console::ConsumerAdmin::new(url, token)),
        };
        let router = routes::router(state, self.config.body_limit_bytes);

        let served = self.listener.serve("order-service", router, shutdown.clone()).await;
        // The relay stops on the same token; wait for its in-flight batches.
        shutdown.cancel();
        if let Some(relay) = relay {
            relay.join().await;
        }
        // The writers stop once the server, and with it the last request, is gone.
        while tasks.join_next().await.is_some() {}
        self.background_db.close().await;
        self.db.close().await;
        tracing::info!("order-service stopped");
        served
    }
}

/// Runs an `order-service outbox ...` subcommand and prints its result.
pub async fn run_outbox_command(config: &Config, command: &OutboxCommand) -> anyhow::Result<()> {
    let db = config.db.connect_and_migrate().await?;
    match command {
        OutboxCommand::Dead { limit } => {
            for event in outbox::store::dead_events(&db, *limit).await? {
                println!("{}", serde_json::to_string(&event)?);
            }
        }
        OutboxCommand::Replay { id, all: _ } => {
            // clap guarantees an id unless --all was given.
            let revived = outbox::store::replay_dead(&db, *id).await?;
            match id {
                Some(id) if revived == 0 => anyhow::bail!("no dead event with id {id}"),
                _ => println!("{revived} event(s) pending again"),
            }
        }
    }
    Ok(())
}

/// Runs `order-service reconcile`: prints its report (text, or JSON with
/// `--json`) and returns whether every check held. An error means the checks
/// could not run (no database, an unmigrated schema).
pub async fn run_reconcile_command(config: &Config, args: &ReconcileArgs) -> anyhow::Result<bool> {
    let report = reconcile::run(&config.db, args).await?;
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.text());
    }
    Ok(report.ok())
}

/// Creates the orders' topic when it is missing, in the background: tried
/// every 5 s until it exists (a broker that is down does not hold the start
/// up; the relay's events wait for the topic meanwhile).
fn ensure_kafka_topic(
    transport: &outbox::kafka::KafkaTransport,
    settings: &config::RelayArgs,
    shutdown: CancellationToken,
) {
    let transport = transport.clone();
    let (partitions, replicas) =
        (settings.kafka_topics.kafka_partitions, settings.kafka_topics.kafka_replication_factor);
    tokio::spawn(async move {
        let topic = transport.topic_for("order");
        loop {
            let ensured = transport.ensure_topic("order", partitions, replicas);
            let ensured = tokio::time::timeout(Duration::from_secs(10), ensured).await;
            let ensured = ensured.unwrap_or_else(|_| {
                Err(outbox::Error::Broker("no answer from the Kafka brokers within 10 s".into()))
            });
            match ensured {
                Ok(true) => {
                    tracing::info!(%topic, partitions, "created the Kafka topic");
                    return;
                }
                Ok(false) => return,
                Err(error) => tracing::warn!(%topic, error = %error,
                    "cannot create the Kafka topic yet; trying again in 5 s"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
}
