//! The order service: an axum API whose `POST /orders` writes the order and its
//! `OrderPlaced` event in one transaction.
//!
//! [`Application::build`] binds and connects; [`Application::run_until_stopped`]
//! serves until the shutdown token is cancelled. Keeping the two apart lets tests
//! bind port 0 and learn the port before serving.

pub mod config;
pub mod error;
pub mod idempotency;
pub mod orders;
pub mod routes;

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    db: PgPool,
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
        let state = routes::AppState { db: db.clone() };
        let router = routes::router(
            state,
            config.body_limit_bytes,
            Duration::from_millis(config.request_timeout_ms),
        );
        Ok(Self { listener, router, db })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|addr| addr.port()).unwrap_or(0)
    }

    /// Serves until `shutdown` is cancelled, then lets in-flight requests finish.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(addr = %self.listener.local_addr()?, "order-service listening");
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .context("HTTP server failed")?;
        self.db.close().await;
        tracing::info!("order-service stopped");
        Ok(())
    }
}
