//! The consumer's small HTTP side: liveness, readiness and metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use sqlx::PgPool;

#[derive(Clone)]
pub struct HttpState {
    pub db: PgPool,
    pub connected_workers: Arc<AtomicUsize>,
    pub registry: Arc<Registry>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// `GET /healthz`: the process is alive.
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: consuming, which needs both the database and the broker.
async fn readyz(State(state): State<HttpState>) -> Response {
    let database_up =
        tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(&state.db))
            .await
            .is_ok_and(|result| result.is_ok());
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
    let mut body = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        tracing::error!(%error, "cannot encode metrics");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}
