//! `POST /orders/{id}/cancel`: the request recorded, and its `OrderCancelled`
//! event written, in one transaction; the consumer gives the stock back and
//! sets CANCELLED when it applies the event.
//!
//! The transaction locks the order's row first, so the writers of one order
//! serialise (two cancels, or a cancel and the consumer deciding it): the order
//! of their commits is the order of their events, which the relay keeps. A
//! second cancel finds the request already recorded and writes nothing; so a
//! cancel can always be retried, with or without an Idempotency-Key.

use axum::http::StatusCode;
use order_events::{OrderCancelled, OrderPlacedLine};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{ApiError, Result};
use crate::idempotency::{self, IdempotencyKey};
use crate::orders::{self, Order};

/// What a cancel request was answered.
#[derive(Debug)]
pub enum Cancelled {
    /// Accepted (now, or by an earlier request): the order as it is.
    Accepted(Order),
    /// The answer stored for this Idempotency-Key, replayed.
    Replayed(StatusCode, Uuid, Value),
}

/// The request an Idempotency-Key of a cancel stands for.
fn key_request(order_id: Uuid) -> Value {
    json!({ "cancel": order_id })
}

/// Cancels order `id` (see the module comment).
pub async fn cancel(db: &PgPool, id: Uuid, key: Option<&IdempotencyKey>) -> Result<Cancelled> {
    if let Some(key) = key
        && let Some(saved) = idempotency::load(db, key).await?
    {
        let (status, id, body) = saved.replay_for(&key_request(id))?;
        return Ok(Cancelled::Replayed(status, id, body));
    }

    let mut tx = db.begin().await?;
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM orders WHERE id = $1 FOR NO KEY UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    match status.as_deref() {
        None => return Err(ApiError::OrderNotFound),
        Some("REJECTED") => return Err(ApiError::NotCancellable),
        Some(_) => {}
    }
    let recorded: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO order_cancellations (order_id) VALUES ($1)
         ON CONFLICT (order_id) DO NOTHING RETURNING order_id",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    if recorded.is_some() {
        let lines: Vec<(String, i32)> = sqlx::query_as(
            "SELECT sku, quantity FROM order_lines WHERE order_id = $1 ORDER BY sku",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        let event = OrderCancelled {
            order_id: id,
            lines: lines
                .into_iter()
                .map(|(sku, quantity)| OrderPlacedLine { sku, quantity })
                .collect(),
        };
        outbox::enqueue(&mut tx, &event).await?;
    }
    let order = orders::find_in(&mut tx, id).await?.ok_or(ApiError::OrderNotFound)?;
    if let Some(key) = key {
        let body = serde_json::to_value(&order).map_err(anyhow::Error::from)?;
        let stored: Option<Uuid> = sqlx::query_scalar(
            "INSERT INTO idempotency_keys
                 (idempotency_key, request, order_id, response_status, response_body)
             VALUES ($1, $2, $3, 202, $4)
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING order_id",
        )
        .bind(key.as_str())
        .bind(key_request(id))
        .bind(id)
        .bind(body)
        .fetch_optional(&mut *tx)
        .await?;
        if stored.is_none() {
            // A concurrent request with this key committed first: answer as it was.
            drop(tx);
            let saved = idempotency::load(db, key)
                .await?
                .ok_or_else(|| anyhow::anyhow!("idempotency key vanished after a conflict"))?;
            let (status, id, body) = saved.replay_for(&key_request(id))?;
            return Ok(Cancelled::Replayed(status, id, body));
        }
    }
    tx.commit().await.map_err(|error| ApiError::CancelNotKnown(error.to_string()))?;
    if recorded.is_some() {
        tracing::debug!(order_id = %id, "cancel requested");
    }
    Ok(Cancelled::Accepted(order))
}
