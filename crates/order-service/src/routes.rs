//! The HTTP API: routes, handlers and the layers around them.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use outbox::metrics::RelayMetrics;
use outbox::relay::RelayStatus;
use outbox::supervisor::Health;
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use uuid::Uuid;

use crate::error::{ApiError, Result};
use crate::idempotency::{self, IdempotencyKey};
use crate::orders::{self, CreateOrder};

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    /// The in-process relay's broker connectivity; `None` when it is disabled.
    pub relay: Option<RelayStatus>,
    /// Whether a background task crashed and is not running again.
    pub health: Health,
    pub relay_metrics: RelayMetrics,
    pub registry: Arc<Registry>,
}

pub fn router(state: AppState, body_limit_bytes: usize, request_timeout: Duration) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(get_order))
        .route("/healthz", get(common::http::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit_bytes))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, request_timeout))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// `axum::Json` whose rejections (wrong content type, malformed JSON, wrong shape,
/// body too large) are answered in the API's JSON error format.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
struct JsonBody<T>(T);

/// `POST /orders`: validate, then write the order, its lines and its event in one
/// transaction; answer 201 with the order and its `Location`.
async fn create_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<CreateOrder>,
) -> Result<Response> {
    let key = IdempotencyKey::from_headers(&headers)?;
    let lines = request.validate()?;

    if let Some(key) = &key
        && let Some(saved) = idempotency::load(&state.db, key).await?
    {
        return Ok(replayed(saved.replay_for(&request)?));
    }

    let mut tx = state.db.begin().await?;
    let order = orders::place(&mut tx, request.customer_id.trim(), &lines).await?;
    let body = serde_json::to_value(&order).map_err(anyhow::Error::from)?;
    if let Some(key) = &key {
        let saved = idempotency::save(&mut tx, key, &request, order.id, StatusCode::CREATED, &body);
        if !saved.await? {
            // A concurrent request with this key committed first: ours never happened.
            tx.rollback().await?;
            let saved = idempotency::load(&state.db, key)
                .await?
                .ok_or_else(|| anyhow::anyhow!("idempotency key vanished after a conflict"))?;
            return Ok(replayed(saved.replay_for(&request)?));
        }
    }
    tx.commit().await?;
    tracing::info!(order_id = %order.id, total_cents = order.total_cents, "order placed");
    // Serialised from the struct, as `GET /orders/{id}` is, so the fields come in
    // the same order (`body` is a map, and sorts them).
    Ok(created(StatusCode::CREATED, order.id, order))
}

fn created(status: StatusCode, id: Uuid, body: impl Serialize) -> Response {
    let location =
        HeaderValue::from_str(&format!("/orders/{id}")).expect("a UUID path is a valid header");
    (status, [(header::LOCATION, location)], Json(body)).into_response()
}

fn replayed((status, id, body): (StatusCode, Uuid, Value)) -> Response {
    let mut response = created(status, id, body);
    response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

/// `GET /orders/{id}`.
async fn get_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<orders::Order>> {
    // Parsed here, not by `Path<Uuid>`, so a bad id is a 404 in the API's error format.
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound("order"))?;
    let order = orders::find(&state.db, id).await?.ok_or(ApiError::NotFound("order"))?;
    Ok(Json(order))
}

/// `GET /readyz`: ready to take orders, which needs the database, and every
/// background task running (one that crashed is restarted after a pause). The
/// broker's state is reported but does not count: orders are accepted while the
/// broker is down, their events wait in the outbox.
async fn readyz(State(state): State<AppState>) -> Response {
    let database_up = common::http::database_answers(&state.db).await;
    let crashed_tasks = state.health.crashed_tasks();
    let ready = database_up && crashed_tasks == 0;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "database": if database_up { "up" } else { "down" },
        "crashed_tasks": crashed_tasks,
        "broker": match &state.relay {
            None => "relay disabled",
            Some(relay) if relay.broker_connected() => "up",
            Some(_) => "down",
        },
    });
    if let Some(error) = state.relay.as_ref().and_then(RelayStatus::topology_error) {
        body["broker_error"] = error.into();
    }
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format, with the backlog read at scrape time.
async fn metrics(State(state): State<AppState>) -> Result<Response> {
    state.relay_metrics.refresh_backlog(&state.db).await?;
    Ok(common::http::metrics_response(&state.registry))
}
