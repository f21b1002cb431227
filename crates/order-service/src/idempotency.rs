//! `Idempotency-Key` for `POST /orders` and `POST /orders/{id}/cancel`: a retry
//! with the same key and request gets the first response again and writes
//! nothing; the same key with another request is refused.
//!
//! The key's row is inserted in the order's own transaction (see the writer).
//! Of two concurrent requests with one key, the second insert waits on the
//! first's unique-index entry; when the first commits, the second finds the key
//! taken, takes its order back and answers with the stored response. A crash
//! before commit leaves neither the order nor the key, so the retry simply
//! creates the order.

use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{ApiError, Result};

pub const HEADER: &str = "idempotency-key";
const MAX_KEY_LEN: usize = 255;

/// A validated key: 1 to 255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The request's key, if it sent one.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>> {
        let Some(value) = headers.get(HEADER) else { return Ok(None) };
        let key = value
            .to_str()
            .ok()
            .filter(|key| !key.is_empty() && key.len() <= MAX_KEY_LEN)
            .filter(|key| key.bytes().all(|byte| byte.is_ascii_graphic()))
            .ok_or_else(|| {
                ApiError::BadIdempotencyKey(format!(
                    "Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters"
                ))
            })?;
        Ok(Some(Self(key.to_owned())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The response stored with a key.
#[derive(Debug, sqlx::FromRow)]
pub struct SavedResponse {
    /// The request the key first came with: a `POST /orders` body, or
    /// `{"cancel": "<order id>"}` for a cancel.
    request: sqlx::types::Json<Value>,
    pub order_id: Uuid,
    response_status: i16,
    pub response_body: Value,
}

impl SavedResponse {
    /// The stored response if `request` is the one it answered, else an error.
    pub fn replay_for(self, request: &Value) -> Result<(StatusCode, Uuid, Value)> {
        if self.request.0 != *request {
            return Err(ApiError::IdempotencyKeyReused);
        }
        let status = u16::try_from(self.response_status)
            .ok()
            .and_then(|status| StatusCode::from_u16(status).ok())
            .unwrap_or(StatusCode::CREATED);
        Ok((status, self.order_id, self.response_body))
    }
}

pub async fn load(db: &PgPool, key: &IdempotencyKey) -> Result<Option<SavedResponse>> {
    Ok(sqlx::query_as(
        "SELECT request, order_id, response_status, response_body
         FROM idempotency_keys WHERE idempotency_key = $1",
    )
    .bind(&key.0)
    .fetch_optional(db)
    .await?)
}
