//! The API's one error type: every failure a handler can meet, the status it
//! answers with, and a JSON body naming the problem. Internal errors are logged
//! with their cause chain and answered with a generic message.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

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

    #[error(transparent)]
    Database(#[from] sqlx::Error),

    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn validation(code: &'static str, message: impl Into<String>) -> Self {
        Self::Validation { code, message: message.into() }
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
            Self::Database(
                sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_),
            ) => (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
            Self::Database(_) | Self::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        }
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = if status.is_server_error() {
            // Details stay in the log; the client learns only that it was not its fault.
            tracing::error!(error = ?anyhow::Error::from(self), "request failed");
            match status {
                StatusCode::SERVICE_UNAVAILABLE => {
                    "the database is busy or unreachable, try again".to_owned()
                }
                _ => "internal server error".to_owned(),
            }
        } else {
            self.to_string()
        };
        (status, Json(json!({ "error": code, "message": message }))).into_response()
    }
}
