//! The endpoints both services expose beside their work: liveness, the database
//! check their readiness builds on, and metrics in Prometheus text format.

use std::time::Duration;

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use sqlx::PgPool;

/// `GET /healthz`: the process is alive.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Whether the database answers a trivial query within two seconds.
pub async fn database_answers(db: &PgPool) -> bool {
    tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(db))
        .await
        .is_ok_and(|result| result.is_ok())
}

/// `GET /metrics`: everything in `registry`, in the OpenMetrics text format.
pub fn metrics_response(registry: &Registry) -> Response {
    let mut body = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut body, registry) {
        tracing::error!(%error, "cannot encode metrics");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// A service's HTTP socket, bound when the service is built (so that a port
/// in use fails the start, and port 0 gives tests a free port to read back)
/// and served when it runs.
#[derive(Debug)]
pub struct HttpListener(tokio::net::TcpListener);

impl HttpListener {
    /// Binds `addr`; the error names it.
    pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<Self> {
        use anyhow::Context;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        Ok(Self(listener))
    }

    /// The port it listens on (the one the system chose for port 0).
    pub fn port(&self) -> u16 {
        self.0.local_addr().map(|addr| addr.port()).unwrap_or(0)
    }

    /// Serves `router` until `shutdown` is cancelled, then lets in-flight
    /// requests finish. `service` names it in the log.
    pub async fn serve(
        self,
        service: &str,
        router: axum::Router,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<()> {
        use anyhow::Context;
        tracing::info!(addr = %self.0.local_addr()?, "{service} listening");
        axum::serve(self.0, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .context("HTTP server failed")
    }
}
