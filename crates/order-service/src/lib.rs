//! The order service: an axum API whose `POST /orders` writes the order and its
//! `OrderPlaced` event in one transaction, and the relay pool that publishes those
//! events to RabbitMQ, in the same process.
//!
//! [`Application::build`] binds and connects; [`Application::run_until_stopped`]
//! serves and relays until the shutdown token is cancelled. Keeping the two apart
//! lets tests bind port 0 and learn the port before serving.

pub mod config;
pub mod error;
pub mod idempotency;
pub mod orders;
pub mod routes;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use outbox::metrics::RelayMetrics;
use outbox::relay::Relay;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{Command, Config, OutboxCommand};

pub struct Application {
    listener: TcpListener,
    db: PgPool,
    config: Config,
    relay_metrics: RelayMetrics,
    registry: Registry,
}

impl Application {
    /// Connects to Postgres (creating the database and applying migrations) and
    /// binds the listening socket.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let db = config.db.connect_and_migrate().await?;
        Self::build_with_pool(config, db).await
    }

    /// Like [`Application::build`] with a pool the caller prepared (tests pass
    /// the per-test database of `#[sqlx::test]`).
    pub async fn build_with_pool(config: Config, db: PgPool) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen_addr))?;
        let mut registry = Registry::default();
        let relay_metrics = RelayMetrics::register(&mut registry);
        Ok(Self { listener, db, config, relay_metrics, registry })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|addr| addr.port()).unwrap_or(0)
    }

    /// Serves and relays until `shutdown` is cancelled, then lets in-flight
    /// requests and relay batches finish.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let relay_config = self.config.relay_config();
        let relay = (relay_config.workers > 0).then(|| {
            Relay::spawn(
                self.db.clone(),
                relay_config,
                self.relay_metrics.clone(),
                shutdown.clone(),
            )
        });
        let state = routes::AppState {
            db: self.db.clone(),
            relay: relay.as_ref().map(Relay::status),
            relay_metrics: self.relay_metrics,
            registry: Arc::new(self.registry),
        };
        let router = routes::router(
            state,
            self.config.body_limit_bytes,
            Duration::from_millis(self.config.request_timeout_ms),
        );

        tracing::info!(addr = %self.listener.local_addr()?, "order-service listening");
        let served = axum::serve(self.listener, router)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await
            .context("HTTP server failed");
        // The relay stops on the same token; wait for its in-flight batches.
        shutdown.cancel();
        if let Some(relay) = relay {
            relay.join().await;
        }
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
