//! Writing an event into the outbox, inside the caller's transaction.

use serde_json::{Map, Value};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

/// An event to publish once the caller's transaction commits.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The kind of entity the event is about (`order`), first half of the routing key.
    pub aggregate_type: String,
    /// Which entity it is about; sent as the `aggregate_id` header.
    pub aggregate_id: String,
    /// What happened (`OrderPlaced`): the AMQP `type`, second half of the routing key.
    pub event_type: String,
    /// The JSON body of the message.
    pub payload: Value,
    /// Extra AMQP headers (string values), such as a W3C `traceparent`.
    pub headers: Map<String, Value>,
}

/// Adds `event` to the outbox in `tx` and returns its message id (a UUIDv7).
///
/// Taking a transaction, not a pool, is the point of the pattern: the event is
/// committed or rolled back together with the change it announces.
pub async fn enqueue(tx: &mut Transaction<'_, Postgres>, event: &NewEvent) -> sqlx::Result<Uuid> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .bind(&event.event_type)
    .bind(&event.payload)
    .bind(Value::Object(event.headers.clone()))
    .execute(&mut **tx)
    .await?;
    Ok(id)
}
