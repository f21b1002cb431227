//! The HTTP API: routes, handlers and the layers around them, and the OpenAPI
//! document generated from the same handlers (`GET /openapi.json`).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::extract::{FromRequest, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use outbox::metrics::RelayMetrics;
use outbox::relay::RelayStatus;
use outbox::supervisor::Health;
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde_json::{Value, json};
use service_kit::trace_context;
use sqlx::PgPool;
use tower_http::trace::TraceLayer;
use tracing::Instrument;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::error::{ApiError, ErrorBody, Result};
use crate::idempotency::{self, IdempotencyKey};
use crate::orders::{self, CreateOrder};
use crate::writer::{NewOrder, OrderWriter, Written};

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    /// Writes orders, batching concurrent requests (group commit).
    pub writer: OrderWriter,
    /// The in-process relay's broker connectivity; `None` when it is disabled.
    pub relay: Option<RelayStatus>,
    /// Whether a background task crashed and is not running again.
    pub health: Health,
    pub relay_metrics: RelayMetrics,
    pub registry: Arc<Registry>,
    /// How long a request may take before it is answered 408 (see [`time_limit`]).
    pub request_timeout: Duration,
    /// `ADMIN_TOKEN`: `None` turns the admin API off (its routes answer 404).
    pub admin_token: Option<crate::admin::AdminToken>,
    pub admin_metrics: crate::admin::AdminMetrics,
    /// The console's sessions.
    pub sessions: crate::console::Sessions,
    /// Relay workers of this replica (`RELAY_WORKERS`).
    pub relay_workers: usize,
    /// inventory-consumer's admin API, for the console's DLQ panel
    /// (`CONSUMER_ADMIN_URL`); `None` without it.
    pub consumer_admin: Option<crate::console::ConsumerAdmin>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "order-service",
        description = "Takes orders and writes each with its OrderPlaced event in one transaction \
(the transactional outbox); the inventory consumer later decides it COMPLETED or REJECTED. \
Every error answers with the JSON body `ErrorBody`, whose `error` is a stable code.",
        license(name = "MIT OR Apache-2.0")
    ),
    tags(
        (name = "orders", description = "Placing and reading orders"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
        (name = "admin", description = "The outbox's backlog and dead events, and their replay. \
Only when ADMIN_TOKEN is set (else 404); every call needs `Authorization: Bearer <ADMIN_TOKEN>` \
(else 401 `unauthorized`).")
    ),
    modifiers(&AdminSecurity)
)]
struct ApiDoc;

/// The admin routes' security scheme: a bearer token, ADMIN_TOKEN.
struct AdminSecurity;

impl utoipa::Modify for AdminSecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The routes with their OpenAPI descriptions, registered together so the
/// document cannot drift from what is served.
fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(create_order))
        .routes(routes!(get_order))
        .routes(routes!(cancel_order))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(crate::admin::summary))
        .routes(routes!(crate::admin::dead_events))
        .routes(routes!(crate::admin::replay_one))
        .routes(routes!(crate::admin::replay_many))
}

/// The OpenAPI document of this API, as `GET /openapi.json` serves it.
pub fn openapi_document() -> &'static str {
    static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
        let mut document = api().into_openapi().to_pretty_json().expect("the document serialises");
        document.push('\n');
        document
    });
    &DOCUMENT
}

pub fn router(state: AppState, body_limit_bytes: usize) -> Router {
    let (router, _) = api().split_for_parts();
    router
        // The console's page and its session: HTML, not part of the API document.
        .route("/console", axum::routing::get(crate::console::page))
        .route("/console/login", axum::routing::post(crate::console::login))
        .route("/console/logout", axum::routing::post(crate::console::logout))
        .route("/console/dlq", axum::routing::get(crate::console::dead_letters))
        .route(
            "/console/dlq/{message_id}/replay",
            axum::routing::post(crate::console::replay_dead_letter),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(body_limit_bytes))
        .layer(axum::middleware::from_fn_with_state(
            (state.request_timeout, body_limit_bytes),
            time_limit,
        ))
        // Every bare error response (a 413 of the body limit, say) gets the JSON body.
        .layer(axum::middleware::map_response(crate::error::json_for_bare_errors))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Answers 408 for a request that takes longer than REQUEST_TIMEOUT_MS, except
/// `POST /orders` and `POST /orders/{id}/cancel`, which keep their own time
/// once their body has arrived: a request whose write is under way must be
/// answered with what became of it, not with a timeout that says nothing was
/// written (see [`OrderWriter::write`] and [`cancel_order`]). Their body must
/// arrive within the timeout.
async fn time_limit(
    State((timeout, body_limit)): State<(Duration, usize)>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    let writes = path == "/orders" || (path.starts_with("/orders/") && path.ends_with("/cancel"));
    if request.method() == axum::http::Method::POST && writes {
        let (parts, body) = request.into_parts();
        // One byte over the limit is enough for the extractor to answer 413.
        let reading = axum::body::to_bytes(body, body_limit.saturating_add(1));
        let body = match tokio::time::timeout(timeout, reading).await {
            Ok(Ok(bytes)) => axum::body::Body::from(bytes),
            Ok(Err(error)) => {
                // `to_bytes` fails with http-body-util's LengthLimitError over the limit.
                let too_large = std::iter::successors(
                    Some(&error as &(dyn std::error::Error + 'static)),
                    |error| error.source(),
                )
                .any(|error| error.to_string().contains("length limit exceeded"));
                let (status, message) = if too_large {
                    (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("the request body is over {body_limit} bytes"),
                    )
                } else {
                    (StatusCode::BAD_REQUEST, "the request body could not be read".to_owned())
                };
                return ApiError::BadBody { status, message }.into_response();
            }
            Err(_) => return ApiError::Timeout.into_response(),
        };
        return next.run(axum::extract::Request::from_parts(parts, body)).await;
    }
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// `axum::Json` whose rejections (wrong content type, malformed JSON, wrong shape,
/// body too large) are answered in the API's JSON error format.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
struct JsonBody<T>(T);

/// Place an order.
///
/// Validates the request, then writes the order (PENDING), its lines priced from
/// the catalogue and its OrderPlaced event in one transaction, and answers 201
/// with the order. Concurrent requests share that transaction (group commit);
/// each order is still written whole or not at all, and one request's problem
/// is answered to it alone. With an `Idempotency-Key`, a retry with the same key and body
/// gets the first response again (with `Idempotent-Replayed: true`) and creates
/// nothing; the same key with another body is a 422. A rejected request writes
/// nothing.
///
/// A W3C `traceparent` (and `tracestate`) header is continued: the order's
/// OrderPlaced event carries the trace to the consumer.
/// Without one, or with one that is not valid, a new trace starts.
#[utoipa::path(
    post,
    path = "/orders",
    tag = "orders",
    request_body = CreateOrder,
    params(
        ("Idempotency-Key" = Option<String>, Header,
            description = "Makes retries safe: 1 to 255 visible ASCII characters, \
such as a UUID or `order-42`. Remembered for IDEMPOTENCY_KEY_TTL (24 h by default).",
            pattern = "^[!-~]{1,255}$", example = "order-42"),
    ),
    responses(
        (status = 201, description = "The order was placed (or, for a retried key, had been).",
            body = orders::Order,
            headers(
                ("Location" = String, description = "`/orders/{id}` of the order"),
                ("Idempotent-Replayed" = Option<String>,
                    description = "`true` when this answers a retry of an earlier request"),
            )),
        (status = 400, description = "`malformed_json`: the body is not JSON; \
`invalid_idempotency_key`: the header is not 1 to 255 visible ASCII characters.",
            body = ErrorBody),
        (status = 408, description = "`request_timeout`: the request took longer than \
REQUEST_TIMEOUT_MS before its order was taken into a transaction. Nothing was written: retry.",
            body = ErrorBody),
        (status = 413, description = "`body_too_large`: over BODY_LIMIT_BYTES (64 KiB).",
            body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `application/json`.",
            body = ErrorBody),
        (status = 422, description = "`invalid_body` (wrong shape or type, unknown field), \
`empty_items`, `too_many_items`, `invalid_quantity`, `invalid_customer_id`, `invalid_sku`, \
`unknown_sku`, `duplicate_sku`, or `idempotency_key_reused` (the key came with another body).",
            body = ErrorBody),
        (status = 503, description = "`database_unavailable`: nothing was written (the \
database could not be reached, or rolled the transaction back); retry. \
`commit_outcome_unknown`: the transaction's COMMIT was sent but its outcome could not be \
learnt within COMMIT_DEADLINE, so the order may exist: retry only with the same \
Idempotency-Key, which answers 201 with the order if it was placed.", body = ErrorBody),
        (status = 500, description = "`internal`: not the client's fault; the cause is logged.",
            body = ErrorBody),
    )
)]
async fn create_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<CreateOrder>,
) -> Response {
    // Continue the caller's trace (or start one) with the span that produces the
    // order's event; its context travels with the event to the consumer.
    let parent = trace_context::extract(|name| Some(headers.get(name)?.to_str().ok()?.to_owned()));
    let cx = trace_context::start(
        "OrderPlaced publish",
        SpanKind::Producer,
        &parent,
        vec![KeyValue::new("messaging.operation.type", "create")],
    );
    let span = tracing::info_span!("create_order", trace_id = %trace_context::trace_id(&cx));
    let response = async {
        place_order(&state, &headers, request, trace_context::inject(&cx))
            .await
            .unwrap_or_else(IntoResponse::into_response)
    }
    .instrument(span)
    .await;
    let failed = response.status().is_server_error().then_some("the order was not placed");
    trace_context::end(&cx, failed);
    response
}

async fn place_order(
    state: &AppState,
    headers: &HeaderMap,
    request: CreateOrder,
    trace: HashMap<String, String>,
) -> Result<Response> {
    let deadline = tokio::time::Instant::now() + state.request_timeout;
    let key = IdempotencyKey::from_headers(headers)?;
    let lines = request.validate()?;

    if let Some(key) = &key
        && let Some(saved) = in_time(deadline, idempotency::load(&state.db, key)).await?
    {
        return Ok(replayed(saved.replay_for(&request_json(&request)?)?));
    }

    let order = NewOrder {
        customer_id: request.customer_id.trim().to_owned(),
        lines,
        key: match key {
            Some(key) => Some((key, serde_json::to_value(&request).map_err(anyhow::Error::from)?)),
            None => None,
        },
        trace,
    };
    let key = order.key.as_ref().map(|(key, _)| key.clone());
    match state.writer.write(order, deadline).await? {
        Written::Placed(order) => {
            tracing::debug!(order_id = %order.id, total_cents = order.total_cents, "order placed");
            Ok(created(StatusCode::CREATED, order.id, order))
        }
        Written::KeyTaken => {
            // A concurrent request with this key committed first: ours never happened.
            let key = key.ok_or_else(|| anyhow::anyhow!("a key conflict without a key"))?;
            let saved = in_time(deadline, idempotency::load(&state.db, &key))
                .await?
                .ok_or_else(|| anyhow::anyhow!("idempotency key vanished after a conflict"))?;
            Ok(replayed(saved.replay_for(&request_json(&request)?)?))
        }
    }
}

fn request_json(request: &CreateOrder) -> Result<Value> {
    Ok(serde_json::to_value(request).map_err(anyhow::Error::from)?)
}

/// `future` by `deadline`, else [`ApiError::Timeout`]. Only for what writes
/// nothing (reading a key before the order is handed to the writer, or after it
/// was not written), where a timeout is the truth: nothing was written.
async fn in_time<T>(
    deadline: tokio::time::Instant,
    future: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout_at(deadline, future).await.map_err(|_| ApiError::Timeout)?
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

/// Read an order with its lines and current status.
#[utoipa::path(
    get,
    path = "/orders/{id}",
    tag = "orders",
    params(("id" = String, Path, description = "The order's id, as POST /orders gave it")),
    responses(
        (status = 200, description = "The order", body = orders::Order),
        (status = 404, description = "`not_found`: no such order (or not a UUID).", body = ErrorBody),
        (status = 408, description = "`request_timeout`", body = ErrorBody),
        (status = 503, description = "`database_unavailable`: try again.", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
    )
)]
async fn get_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<orders::Order>> {
    // Parsed here, not by `Path<Uuid>`, so a bad id is a 404 in the API's error format.
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound("order"))?;
    let order = orders::find(&state.db, id).await?.ok_or(ApiError::NotFound("order"))?;
    Ok(Json(order))
}

/// Cancel an order: its stock is given back, and it ends CANCELLED.
///
/// The request is recorded, with an `OrderCancelled` event, in one
/// transaction; the inventory consumer applies the event (the stock the order
/// took back in `inventory.available`, the order `CANCELLED`, in one
/// transaction). The answer is the order as it is when the cancel is accepted:
/// its status changes to CANCELLED once the consumer has applied it. A second
/// cancel of the same order is answered 202 again and writes nothing: a cancel
/// can always be retried. It takes no body (an empty one is fine).
#[utoipa::path(
    post,
    path = "/orders/{id}/cancel",
    tag = "orders",
    params(
        ("id" = String, Path, description = "The order's id, as POST /orders gave it"),
        ("Idempotency-Key" = Option<String>, Header,
            description = "As for POST /orders: a retry with the key gets the first answer; \
the key with another request is `idempotency_key_reused`.",
            pattern = "^[!-~]{1,255}$", example = "cancel-42"),
    ),
    responses(
        (status = 202, description = "The cancel is accepted (now, or by an earlier request): \
the order as it is; it becomes CANCELLED once its stock is given back.", body = orders::Order),
        (status = 400, description = "`invalid_idempotency_key`", body = ErrorBody),
        (status = 404, description = "`order_not_found`: no order has this id.", body = ErrorBody),
        (status = 409, description = "`order_not_cancellable`: the order was REJECTED.",
            body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 422, description = "`invalid_order_id` (not a UUID), `invalid_body` (a cancel \
takes no body), or `idempotency_key_reused`.", body = ErrorBody),
        (status = 503, description = "`database_unavailable`: the cancel may or may not have \
been recorded; retry (a cancel is idempotent).", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
    )
)]
async fn cancel_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response> {
    let id = Uuid::parse_str(&id).map_err(|_| {
        ApiError::validation("invalid_order_id", format!("{id:?} is not an order id (a UUID)"))
    })?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::validation("invalid_body", "a cancel takes no body"));
    }
    let key = IdempotencyKey::from_headers(&headers)?;
    let cancelling = crate::cancel::cancel(&state.db, id, key.as_ref());
    let cancelled =
        tokio::time::timeout(state.request_timeout, cancelling).await.map_err(|_| {
            ApiError::CancelNotKnown(format!("no answer within {:?}", state.request_timeout))
        })??;
    Ok(match cancelled {
        crate::cancel::Cancelled::Accepted(order) => {
            (StatusCode::ACCEPTED, Json(order)).into_response()
        }
        crate::cancel::Cancelled::Replayed(status, id, body) => replayed((status, id, body)),
    })
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "`{\"status\": \"ok\"}`", body = Value)))]
async fn healthz() -> Json<Value> {
    service_kit::http::healthz().await
}

/// Readiness: ready to take orders.
///
/// Needs the database and every background task running (one that crashed is
/// restarted after a pause). The broker's state is reported but does not count:
/// orders are accepted while the broker is down, their events wait in the outbox.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready; `broker` is up, blocked (a resource alarm), down or \
relay disabled, and `broker_since` when it became so", body = Value),
        (status = 503, description = "Not ready: the database is down or a task crashed", body = Value),
    ))]
async fn readyz(State(state): State<AppState>) -> Response {
    let database_up = service_kit::http::database_answers(&state.db).await;
    let crashed_tasks = state.health.crashed_tasks();
    let ready = database_up && crashed_tasks == 0;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "database": if database_up { "up" } else { "down" },
        "crashed_tasks": crashed_tasks,
        "broker": match &state.relay {
            None => "relay disabled".to_owned(),
            Some(relay) => relay.transport().0.to_string(),
        },
    });
    if let Some(relay) = &state.relay {
        body["broker_since"] = relay.transport().1.to_rfc3339().into();
    }
    if let Some(error) = state.relay.as_ref().and_then(RelayStatus::topology_error) {
        body["broker_error"] = error.into();
    }
    (status, Json(body)).into_response()
}

/// Metrics in the OpenMetrics text format, with the outbox backlog read at scrape time.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "OpenMetrics text",
            content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String),
        (status = 503, description = "`database_unavailable`", body = ErrorBody),
    ))]
async fn metrics(State(state): State<AppState>) -> Result<Response> {
    state.relay_metrics.refresh_backlog(&state.db).await?;
    Ok(service_kit::http::metrics_response(&state.registry))
}

/// This document (OpenAPI 3.1).
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document of this API", body = Value)))]
async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_document()).into_response()
}
