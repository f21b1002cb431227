//! The event as the relay hands it to a transport: what is claimed from the
//! `outbox` table and what every transport sends of it (headers, routing key,
//! size). A leaf: it depends on no other module of this crate, so the store and
//! the transports both depend on it and not on each other.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::types::Json;
use uuid::Uuid;

/// The header carrying the event's creation time (RFC 3339, microseconds, UTC),
/// from which consumers measure their end-to-end lag.
pub const CREATED_AT_HEADER: &str = "x-created-at";

/// An event claimed for publishing.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxEvent {
    /// The message id (a UUIDv7), which consumers deduplicate on.
    pub id: Uuid,
    /// The kind of entity the event is about (`order`).
    pub aggregate_type: String,
    /// Which entity it is about (the Kafka key).
    pub aggregate_id: String,
    /// What happened (`OrderPlaced`).
    pub event_type: String,
    /// The JSON payload as text: it is sent as is, never parsed by the relay.
    pub payload: String,
    /// Extra message headers, such as a W3C `traceparent`.
    pub headers: Json<Map<String, Value>>,
    /// When it was inserted, on the database's clock (consumers measure their
    /// lag from it; one aggregate's events are published in its order).
    pub created_at: DateTime<Utc>,
    /// Failed publish attempts so far.
    pub attempts: i32,
    /// When it became due: its transaction's start, or the end of its backoff.
    pub next_attempt_at: DateTime<Utc>,
}

impl OutboxEvent {
    /// The headers every transport sends, as text, in order: the event's own
    /// (such as a W3C `traceparent`; a non-string JSON value as its JSON text),
    /// then `aggregate_type`, `aggregate_id` and [`CREATED_AT_HEADER`] (when the
    /// event was committed, to the microsecond: consumers measure their
    /// end-to-end lag from it). A later header wins over an earlier one of the
    /// same name, so a stored header cannot hide the relay's.
    ///
    pub fn message_headers(&self) -> Vec<(String, String)> {
        let stored = self.headers.0.iter().map(|(name, value)| {
            let text = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            (name.clone(), text)
        });
        let relay = [
            ("aggregate_type", self.aggregate_type.clone()),
            ("aggregate_id", self.aggregate_id.clone()),
            (
                CREATED_AT_HEADER,
                self.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ),
        ];
        stored.chain(relay.map(|(name, value)| (name.to_owned(), value))).collect()
    }

    /// The bytes the event takes on the wire, near enough to compare with a
    /// broker's message size limit: payload, header names and values, and
    /// routing key.
    pub fn size_bytes(&self) -> usize {
        let headers: usize =
            self.message_headers().iter().map(|(name, value)| name.len() + value.len()).sum();
        self.payload.len() + headers + self.aggregate_type.len() + self.event_type.len() + 1
    }

    /// `<aggregate_type>.<event_type>`, e.g. `order.OrderPlaced`.
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.aggregate_type, self.event_type)
    }
}
