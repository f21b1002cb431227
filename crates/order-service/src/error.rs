//! The API's one error type: every failure a handler can meet, the status it
//! answers with, and a JSON body naming the problem. Internal errors are logged
//! with their cause chain and answered with a generic message.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not acceptable JSON for this endpoint (syntax, shape, type,
    /// content type or size); the status comes from axum's rejection.
    #[error("{message}")]
    BadBody { status: StatusCode, message: String },

    /// Well-formed but invalid input, such as an empty item list.
    #[error("{message}")]
    Validation { code: &'static str, message: String },

    /// A malformed `Idempotency-Key` header.
    #[error("{0}")]
    BadIdempotencyKey(String),

    /// The `Idempotency-Key` was used before with a different request.
    #[error("this Idempotency-Key was already used with a different request body")]
    IdempotencyKeyReused,

    #[error("{0} not found")]
    NotFound(&'static str),

    /// No dead outbox event has the id an admin replay names.
    #[error("no dead event has this id")]
    DeadEventNotFound,

    /// The order a cancel names does not exist.
    #[error("no order has this id")]
    OrderNotFound,

    /// A REJECTED order cannot be cancelled: it never took stock.
    #[error("the order was rejected; only a PENDING or COMPLETED order can be cancelled")]
    NotCancellable,

    /// A cancel's COMMIT failed: it may or may not have been recorded. A cancel
    /// is idempotent, so retrying is always safe.
    #[error("the cancel's commit failed: {0}")]
    CancelNotKnown(String),

    #[error("this method is not allowed on this route")]
    MethodNotAllowed,

    #[error(transparent)]
    Database(#[from] sqlx::Error),

    /// The database cannot serve the request now, and nothing was written
    /// (the text says why).
    #[error("{0}")]
    Unavailable(String),

    /// `COMMIT` was sent but its outcome could not be learnt: the order may
    /// exist (the text says why).
    #[error("the outcome of the commit is unknown: {0}")]
    CommitOutcomeUnknown(String),

    /// The request took longer than REQUEST_TIMEOUT_MS before its order was
    /// taken into a batch: nothing was written.
    #[error("the request took longer than REQUEST_TIMEOUT_MS; nothing was written")]
    Timeout,

    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn validation(code: &'static str, message: impl Into<String>) -> Self {
        Self::Validation { code, message: message.into() }
    }

    /// The error each request of a batch gets when the batch's transaction
    /// failed for a reason that is no one order's (sqlx errors cannot be cloned).
    pub fn batch_failed(error: &sqlx::Error) -> Self {
        if database_unavailable(error) {
            Self::Unavailable(error.to_string())
        } else {
            Self::Internal(anyhow::anyhow!("writing a batch of orders failed: {error}"))
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadBody { status, .. } => (*status, body_error_code(*status)),
            Self::Validation { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code),
            Self::BadIdempotencyKey(_) => (StatusCode::BAD_REQUEST, "invalid_idempotency_key"),
            Self::IdempotencyKeyReused => {
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
            }
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::OrderNotFound => (StatusCode::NOT_FOUND, "order_not_found"),
            Self::DeadEventNotFound => (StatusCode::NOT_FOUND, "dead_event_not_found"),
            Self::NotCancellable => (StatusCode::CONFLICT, "order_not_cancellable"),
            Self::CancelNotKnown(_) => (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
            Self::CommitOutcomeUnknown(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "commit_outcome_unknown")
            }
            Self::Timeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            Self::Database(error) if database_unavailable(error) => {
                (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable")
            }
            Self::Database(_) | Self::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        }
    }
}

/// Whether `error` means the database cannot serve now, rather than that the
/// request or the code is wrong: no connection (the pool timed out or closed, an
/// I/O error), or an SQLSTATE of class 08 (connection), 53 (insufficient
/// resources), 57 (operator intervention: shutdown, cancel), 58 (system error)
/// or 25006 (read-only transaction, as after a failover). A retry may succeed.
fn database_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
        sqlx::Error::Database(error) => error.code().is_some_and(|code| {
            ["08", "53", "57", "58"].iter().any(|class| code.starts_with(class)) || code == "25006"
        }),
        _ => false,
    }
}

fn body_error_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::BAD_REQUEST => "malformed_json",
        _ => "invalid_body",
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self::BadBody { status: rejection.status(), message: rejection.body_text() }
    }
}

impl From<outbox::Error> for ApiError {
    fn from(error: outbox::Error) -> Self {
        Self::Database(error.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = if status.is_server_error() {
            // Details stay in the log; the client learns only what it must do.
            let unknown = matches!(self, Self::CommitOutcomeUnknown(_));
            let cancel = matches!(self, Self::CancelNotKnown(_));
            tracing::error!(error = ?anyhow::Error::from(self), "request failed");
            match status {
                StatusCode::SERVICE_UNAVAILABLE if unknown => COMMIT_OUTCOME_UNKNOWN.to_owned(),
                StatusCode::SERVICE_UNAVAILABLE if cancel => {
                    "the database did not confirm the cancel; it may have been recorded. \
                     Retry: a cancel is idempotent"
                        .to_owned()
                }
                StatusCode::SERVICE_UNAVAILABLE => {
                    "the database is busy or unreachable and nothing was written, try again"
                        .to_owned()
                }
                _ => "internal server error".to_owned(),
            }
        } else {
            self.to_string()
        };
        (status, Json(ErrorBody { error: code.to_owned(), message })).into_response()
    }
}

/// What a client is told when its order may or may not exist.
pub const COMMIT_OUTCOME_UNKNOWN: &str = "the database did not say whether the order was placed: \
it may exist. Retry only with the same Idempotency-Key (which answers with the order if it was \
placed); a retry without one may place it twice";

/// The body of every error response.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"error": "invalid_quantity", "message": "items[0].quantity must be between 1 and 1000, got 0"}))]
pub struct ErrorBody {
    /// A stable code for programs (see each response's description).
    pub error: String,
    /// What is wrong, for people.
    pub message: String,
}

/// Gives an error response that has no body (the 408 of the timeout layer, say)
/// the JSON error body, so that every error has one shape.
pub async fn json_for_bare_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error())
        || response.headers().contains_key(axum::http::header::CONTENT_TYPE)
    {
        return response;
    }
    let (code, message) = match status {
        StatusCode::REQUEST_TIMEOUT => ("request_timeout", "the request took too long"),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "method not allowed"),
        StatusCode::NOT_FOUND => ("not_found", "not found"),
        StatusCode::PAYLOAD_TOO_LARGE => ("body_too_large", "the request body is too large"),
        _ if status.is_server_error() => ("internal", "internal server error"),
        _ => ("bad_request", "the request cannot be served"),
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    let body = ErrorBody { error: code.to_owned(), message: message.to_owned() };
    (parts, Json(body)).into_response()
}
