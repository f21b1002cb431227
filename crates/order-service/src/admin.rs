//! The admin API (`/admin/*`): the outbox's backlog and its dead events, and
//! replaying them. On only when `ADMIN_TOKEN` is set; without it every admin
//! route answers 404, as an unknown route does. Every call needs
//! `Authorization: Bearer <ADMIN_TOKEN>`, compared in constant time, or the
//! console's session (see [`crate::console`]), with its CSRF token for a
//! replay; a missing or wrong token is a 401 in the API's error shape. Every replay is logged
//! and counted (`outbox_admin_replayed_events_total`).

use axum::Json;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

pub use service_kit::admin::AdminToken;

use crate::error::{ApiError, ErrorBody, Result};
use crate::routes::AppState;

/// The admin API's counters.
#[derive(Clone, Debug, Default)]
pub struct AdminMetrics {
    /// Dead events made pending again through the admin API.
    pub replayed: Counter,
}

impl AdminMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "outbox_admin_replayed_events",
            "Dead outbox events made pending again through the admin API",
            metrics.replayed.clone(),
        );
        metrics
    }
}

/// A request that carried the admin token. Taken first by every admin handler,
/// so that nothing else about the request is looked at before it.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let Some(token) = &state.admin_token else {
            return Err(ApiError::NotFound("route").into_response());
        };
        // A console session instead of the bearer token: a call that changes
        // something must also carry the session's CSRF token.
        if !parts.headers.contains_key(header::AUTHORIZATION)
            && let Some(csrf) = state.sessions.csrf_of(&parts.headers)
        {
            if parts.method == Method::GET || crate::console::csrf_matches(&csrf, &parts.headers) {
                return Ok(Self);
            }
            let body = ErrorBody {
                error: "invalid_csrf_token".to_owned(),
                message: format!(
                    "a change made with a console session needs its CSRF token in {}",
                    crate::console::CSRF_HEADER
                ),
            };
            return Err((StatusCode::FORBIDDEN, Json(body)).into_response());
        }
        token.check(&parts.headers).map(|()| Self).map_err(IntoResponse::into_response)
    }
}

/// What waits in the outbox, and whether the relay reaches its broker.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Summary {
    /// Pending events, those waiting for a retry included.
    pub outbox_pending: i64,
    /// Age of the oldest pending event, in seconds (0 when none).
    pub oldest_pending_age_seconds: f64,
    /// Dead events, waiting for a replay.
    pub outbox_dead: i64,
    /// Relay workers of this replica (0: the relay is off here).
    pub relay_workers: usize,
    /// The relay's broker as its workers last saw it: `up`, `blocked` (a
    /// resource alarm) or `down`; `off` without a relay.
    pub transport: String,
    /// Since when it has been so (`null` without a relay).
    pub transport_since: Option<DateTime<Utc>>,
    /// Why the broker's topology cannot be declared, when it cannot.
    pub topology_error: Option<String>,
    /// Events this replica published since it started.
    pub published_total: u64,
    /// End-to-end lag, placed to decided, of the recent orders: see [`RecentLag`].
    pub e2e_lag: RecentLag,
}

/// The lag from an order's write to its decision by inventory-consumer,
/// over the newest 1,000 orders, those placed in the last minute and decided
/// (so an idle system shows none rather than an old figure).
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct RecentLag {
    /// How many orders the figures are taken over.
    pub orders: i64,
    /// Median, in milliseconds (`null` without orders).
    pub p50_ms: Option<f64>,
    /// 99th percentile, in milliseconds (`null` without orders).
    pub p99_ms: Option<f64>,
}

/// Summarise the outbox: backlog, oldest pending age, dead events, transport.
#[utoipa::path(
    get,
    path = "/admin/summary",
    tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The summary", body = Summary),
        (status = 401, description = "`unauthorized`: no or a wrong admin token.", body = ErrorBody),
        (status = 404, description = "`not_found`: ADMIN_TOKEN is not set.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`: try again.", body = ErrorBody),
    )
)]
pub async fn summary(_: Admin, State(state): State<AppState>) -> Result<Json<Summary>> {
    let backlog = outbox::store::backlog(&state.db).await?;
    let (transport, transport_since, topology_error) = match &state.relay {
        None => ("off", None, None),
        Some(relay) => {
            let (transport, since) = relay.transport();
            (transport.as_str(), Some(since), relay.topology_error())
        }
    };
    // The newest orders by id (UUIDv7: the order they were written in), read
    // backwards along the primary key: cheap whatever the table's size.
    let e2e_lag = sqlx::query_as::<_, RecentLag>(
        "SELECT count(*) AS orders,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY lag_ms) AS p50_ms,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY lag_ms) AS p99_ms
         FROM (SELECT extract(epoch FROM updated_at - created_at)::float8 * 1000 AS lag_ms,
                      status, created_at
               FROM orders ORDER BY id DESC LIMIT 1000) newest
         WHERE status IN ('COMPLETED', 'REJECTED') AND created_at > now() - interval '1 minute'",
    )
    .fetch_one(&state.db)
    .await?;
    Ok(Json(Summary {
        outbox_pending: backlog.pending,
        oldest_pending_age_seconds: backlog.oldest_pending_age_seconds,
        outbox_dead: backlog.dead,
        relay_workers: state.relay_workers,
        transport: transport.to_owned(),
        transport_since,
        topology_error,
        published_total: state.relay_metrics.published.get(),
        e2e_lag,
    }))
}

/// Paging of the dead events.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadQuery {
    /// Events per page, 1 to 500 (default 50).
    pub limit: Option<i64>,
    /// The `next` of the previous page: the events written before that one.
    pub before: Option<Uuid>,
}

/// A dead event, as the admin API lists it.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct DeadEvent {
    pub id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// Failed publish attempts, the last one included.
    pub attempts: i32,
    /// Why its last attempt failed.
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// One page of dead events, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadPage {
    pub events: Vec<DeadEvent>,
    /// Pass as `before` for the next page; `null` on the last one.
    pub next: Option<Uuid>,
}

/// List the dead events, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/admin/outbox/dead",
    tag = "admin",
    security(("admin_token" = [])),
    params(DeadQuery),
    responses(
        (status = 200, description = "A page of dead events", body = DeadPage),
        (status = 401, description = "`unauthorized`: no or a wrong admin token.", body = ErrorBody),
        (status = 404, description = "`not_found`: ADMIN_TOKEN is not set.", body = ErrorBody),
        (status = 422, description = "`invalid_query`: a limit out of range, a `before` that is not a UUID.",
            body = ErrorBody),
        (status = 503, description = "`database_unavailable`: try again.", body = ErrorBody),
    )
)]
pub async fn dead_events(
    _: Admin,
    State(state): State<AppState>,
    query: std::result::Result<Query<DeadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeadPage>> {
    let Query(query) =
        query.map_err(|rejection| ApiError::validation("invalid_query", rejection.body_text()))?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::validation(
            "invalid_query",
            format!("limit must be between 1 and 500, got {limit}"),
        ));
    }
    // One more than a page, to know whether another follows.
    let mut events: Vec<DeadEvent> = sqlx::query_as(
        "SELECT id, aggregate_type, aggregate_id, event_type, attempts, last_error, created_at
         FROM outbox
         WHERE state = 'dead'
           AND ($2::uuid IS NULL
                OR (created_at, id) < (SELECT created_at, id FROM outbox WHERE id = $2))
         ORDER BY created_at DESC, id DESC
         LIMIT $1 + 1",
    )
    .bind(limit)
    .bind(query.before)
    .fetch_all(&state.db)
    .await?;
    let next = if events.len() as i64 > limit {
        events.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        events.last().map(|event| event.id)
    } else {
        None
    };
    Ok(Json(DeadPage { events, next }))
}

/// What a replay did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Replayed {
    /// Dead events made pending again (due now, with a fresh attempt budget).
    pub replayed: u64,
}

/// Replay one dead event: it is pending again, due now, with a fresh attempt
/// budget, and the relay is woken.
#[utoipa::path(
    post,
    path = "/admin/outbox/dead/{id}/replay",
    tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "The dead event's id")),
    responses(
        (status = 200, description = "The event is pending again (or already published).",
            body = Replayed),
        (status = 401, description = "`unauthorized`: no or a wrong admin token.", body = ErrorBody),
        (status = 404, description = "`dead_event_not_found`: no dead event has this id; \
`not_found`: ADMIN_TOKEN is not set.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`: try again.", body = ErrorBody),
    )
)]
pub async fn replay_one(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Replayed>> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::DeadEventNotFound)?;
    let replayed = outbox::store::replay_dead(&state.db, Some(id)).await?;
    if replayed == 0 {
        return Err(ApiError::DeadEventNotFound);
    }
    state.admin_metrics.replayed.inc_by(replayed);
    tracing::info!(who = "admin token", event_id = %id, replayed, "replayed a dead event");
    Ok(Json(Replayed { replayed }))
}

/// Which dead events a bulk replay takes; none given: every one.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReplayFilter {
    /// Only events of this aggregate type (`order`).
    pub aggregate_type: Option<String>,
    /// Only events of this type (`OrderPlaced`).
    pub event_type: Option<String>,
}

/// Replay every dead event the filter takes.
#[utoipa::path(
    post,
    path = "/admin/outbox/dead/replay",
    tag = "admin",
    security(("admin_token" = [])),
    params(ReplayFilter),
    responses(
        (status = 200, description = "The events are pending again.", body = Replayed),
        (status = 401, description = "`unauthorized`: no or a wrong admin token.", body = ErrorBody),
        (status = 404, description = "`not_found`: ADMIN_TOKEN is not set.", body = ErrorBody),
        (status = 422, description = "`invalid_query`: the query is malformed, or a value holds a NUL character.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`: try again.", body = ErrorBody),
    )
)]
pub async fn replay_many(
    _: Admin,
    State(state): State<AppState>,
    filter: std::result::Result<Query<ReplayFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Replayed>> {
    let Query(filter) =
        filter.map_err(|rejection| ApiError::validation("invalid_query", rejection.body_text()))?;
    for (name, value) in
        [("aggregate_type", &filter.aggregate_type), ("event_type", &filter.event_type)]
    {
        if value.as_deref().is_some_and(|value| value.contains('\0')) {
            // Postgres text cannot hold NUL, so no event has it: say so
            // rather than fail the query.
            let message = format!("{name} contains a NUL character");
            return Err(ApiError::validation("invalid_query", message));
        }
    }
    let which = outbox::store::DeadFilter {
        id: None,
        aggregate_type: filter.aggregate_type.clone(),
        event_type: filter.event_type.clone(),
    };
    let replayed = outbox::store::replay_dead_matching(&state.db, &which).await?;
    state.admin_metrics.replayed.inc_by(replayed);
    tracing::info!(who = "admin token", aggregate_type = ?filter.aggregate_type,
        event_type = ?filter.event_type, replayed, "replayed dead events");
    Ok(Json(Replayed { replayed }))
}
