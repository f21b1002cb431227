//! The consumer's small HTTP side: liveness, readiness and metrics, and, with
//! `ADMIN_TOKEN` set, the admin API over the dead-letter queue (the same as
//! `inventory-consumer dlq list|replay`): `GET /admin/dlq`, `POST
//! /admin/dlq/{message_id}/replay`, `POST /admin/dlq/replay`. Without the
//! token those answer 404; every call needs `Authorization: Bearer
//! <ADMIN_TOKEN>` (else 401).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use outbox::amqp::TopologyStatus;
use outbox::supervisor::Health;
use prometheus_client::registry::Registry;
use serde_json::json;
use sqlx::PgPool;

use service_kit::admin::AdminToken;

use crate::dead_letter::Selection;
use crate::metrics::{ConsumerMetrics, QueueDepthProbe};

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
    /// `ADMIN_TOKEN`; `None` turns the admin API off.
    pub admin_token: Option<AdminToken>,
    /// The dead letters the admin API reads and replays.
    pub dead_letters: crate::dlq::Source,
    pub metrics: ConsumerMetrics,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(service_kit::http::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/dlq", get(dead_letters))
        .route("/admin/dlq/replay", post(replay_all))
        .route("/admin/dlq/{message_id}/replay", post(replay_one))
        .fallback(not_found)
        .with_state(state)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"error": code, "message": message}))).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "route not found")
}

/// A request that carried the admin token; taken first by every admin handler.
struct Admin;

impl FromRequestParts<HttpState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, Response> {
        match &state.admin_token {
            None => Err(not_found().await),
            Some(token) => {
                token.check(&parts.headers).map(|()| Self).map_err(IntoResponse::into_response)
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

/// `GET /admin/dlq?limit=N`: up to N (1 to 1000, default 100) dead letters,
/// oldest first, left in place, each with its reason.
async fn dead_letters(
    _: Admin,
    State(state): State<HttpState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let limit = match query {
        Ok(Query(ListQuery { limit })) => limit.unwrap_or(100),
        Err(rejection) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_query",
                &rejection.body_text(),
            );
        }
    };
    if !(1..=1000).contains(&limit) {
        let message = format!("limit must be between 1 and 1000, got {limit}");
        return error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_query", &message);
    }
    match state.dead_letters.list(limit).await {
        Ok(letters) => Json(json!({ "messages": letters })).into_response(),
        Err(failure) => broker_unavailable(&failure),
    }
}

/// `POST /admin/dlq/{message_id}/replay`: every copy of that message back to
/// the inventory queue, once the broker confirmed each.
async fn replay_one(
    _: Admin,
    State(state): State<HttpState>,
    Path(message_id): Path<String>,
) -> Response {
    replay(&state, &Selection::Id(message_id)).await
}

/// `POST /admin/dlq/replay`: every dead letter back to the inventory queue.
async fn replay_all(_: Admin, State(state): State<HttpState>) -> Response {
    replay(&state, &Selection::All).await
}

async fn replay(state: &HttpState, selection: &Selection) -> Response {
    let done = match state.dead_letters.replay(selection).await {
        Ok(done) => done,
        Err(failure) => return broker_unavailable(&failure),
    };
    state.metrics.admin_replayed.inc_by(done.replayed as u64);
    tracing::info!(
        who = "admin token",
        ?selection,
        replayed = done.replayed,
        failed = done.failed,
        "replayed dead letters"
    );
    if let Selection::Id(id) = selection
        && done.replayed == 0
        && done.failed == 0
    {
        let message =
            format!("no message with id {id:?} is in {:?}", state.dead_letters.dead_letters());
        return error(StatusCode::NOT_FOUND, "dead_letter_not_found", &message);
    }
    if done.failed > 0 {
        let message = format!(
            "{} message(s) replayed; the broker did not confirm {} more, which stay in {:?}: \
             retry",
            done.replayed,
            done.failed,
            state.dead_letters.dead_letters()
        );
        return error(StatusCode::SERVICE_UNAVAILABLE, "replay_incomplete", &message);
    }
    Json(json!({"replayed": done.replayed})).into_response()
}

fn broker_unavailable(failure: &anyhow::Error) -> Response {
    tracing::warn!(error = format!("{failure:#}"), "an admin call could not reach the broker");
    error(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable", &format!("{failure:#}"))
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
