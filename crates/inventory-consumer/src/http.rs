//! The consumer's small HTTP side: liveness, readiness and metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde_json::json;
use sqlx::PgPool;

#[derive(Clone)]
pub struct HttpState {
    pub db: PgPool,
    pub connected_workers: Arc<AtomicUsize>,
    pub registry: Arc<Registry>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(common::http::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// `GET /readyz`: consuming, which needs both the database and the broker.
async fn readyz(State(state): State<HttpState>) -> Response {
    let database_up = common::http::database_answers(&state.db).await;
    let workers = state.connected_workers.load(Ordering::Relaxed);
    let ready = database_up && workers > 0;
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "database": if database_up { "up" } else { "down" },
        "broker": if workers > 0 { "up" } else { "down" },
        "consuming_workers": workers,
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(state): State<HttpState>) -> Response {
    common::http::metrics_response(&state.registry)
}
