//! The consumer's small HTTP side: liveness, readiness and metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use outbox::amqp::TopologyStatus;
use outbox::supervisor::Health;
use prometheus_client::registry::Registry;
use serde_json::json;
use sqlx::PgPool;

use crate::metrics::QueueDepthProbe;

#[derive(Clone)]
pub struct HttpState {
    pub db: PgPool,
    pub connected_workers: Arc<AtomicUsize>,
    /// Why the queue cannot be declared, if it exists with other arguments.
    pub topology: TopologyStatus,
    /// Whether a supervised task crashed and is not running again.
    pub health: Health,
    pub registry: Arc<Registry>,
    /// Reads the queue depths into their gauges at each scrape.
    pub queue_depth: QueueDepthProbe,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(service_kit::http::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// `GET /readyz`: consuming, which needs the database, the broker (at least one
/// worker consuming) and no task crashed and waiting to be restarted.
async fn readyz(State(state): State<HttpState>) -> Response {
    let database_up = service_kit::http::database_answers(&state.db).await;
    let workers = state.connected_workers.load(Ordering::Relaxed);
    let crashed_tasks = state.health.crashed_tasks();
    let ready = database_up && workers > 0 && crashed_tasks == 0;
    let mut body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "database": if database_up { "up" } else { "down" },
        "broker": if workers > 0 { "up" } else { "down" },
        "consuming_workers": workers,
        "crashed_tasks": crashed_tasks,
    });
    if let Some(error) = state.topology.error() {
        body["broker_error"] = error.into();
    }
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format. The queue depths are read from the
/// broker first; if it cannot answer they read NaN and the rest is served as usual.
async fn metrics(State(state): State<HttpState>) -> Response {
    state.queue_depth.refresh().await;
    service_kit::http::metrics_response(&state.registry)
}
