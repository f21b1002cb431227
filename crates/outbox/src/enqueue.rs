//! Writing events into the outbox, inside the caller's transaction.

use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::{NOTIFY_CHANNEL, Result};

/// A Rust type that is an event: which aggregate it is about and what happened,
/// so that [`enqueue`] is type-checked and the names are written once.
///
/// ```
/// use serde::Serialize;
///
/// #[derive(Serialize)]
/// struct OrderShipped {
///     order_id: String,
///     carrier: String,
/// }
///
/// impl outbox::Event for OrderShipped {
///     const AGGREGATE_TYPE: &'static str = "order";
///     const EVENT_TYPE: &'static str = "OrderShipped";
///
///     fn aggregate_id(&self) -> String {
///         self.order_id.clone()
///     }
/// }
/// ```
pub trait Event: Serialize {
    /// The kind of entity the event is about (`order`).
    const AGGREGATE_TYPE: &'static str;
    /// What happened (`OrderPlaced`).
    const EVENT_TYPE: &'static str;

    /// Which entity it is about: one aggregate's events are published in order
    /// (the Kafka key; the `aggregate_id` header).
    fn aggregate_id(&self) -> String;

    /// Headers every event of this type carries, such as a schema version.
    fn headers(&self) -> Map<String, Value> {
        Map::new()
    }
}

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

impl NewEvent {
    /// The untyped form of a typed `event`: its payload is its JSON.
    pub fn from_event<E: Event>(event: &E) -> Result<Self> {
        Ok(Self {
            aggregate_type: E::AGGREGATE_TYPE.to_owned(),
            aggregate_id: event.aggregate_id(),
            event_type: E::EVENT_TYPE.to_owned(),
            payload: serde_json::to_value(event)?,
            headers: event.headers(),
        })
    }

    /// Adds the header `name` (a string value), such as a W3C `traceparent`.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), Value::String(value.into()));
        self
    }
}

/// Adds `event` to the outbox in `tx` and returns its message id (a UUIDv7).
///
/// Taking a transaction, not a pool, is the point of the pattern: the event is
/// committed or rolled back together with the change it announces.
pub async fn enqueue<E: Event>(tx: &mut Transaction<'_, Postgres>, event: &E) -> Result<Uuid> {
    enqueue_untyped(tx, &NewEvent::from_event(event)?).await
}

/// [`enqueue`] for an event built at run time (names and JSON of its own).
pub async fn enqueue_untyped(tx: &mut Transaction<'_, Postgres>, event: &NewEvent) -> Result<Uuid> {
    let ids = enqueue_many(tx, std::slice::from_ref(event)).await?;
    Ok(ids[0])
}

/// Adds `events` to the outbox in `tx` with one statement, whatever their number,
/// and returns their message ids in order.
pub async fn enqueue_many(
    tx: &mut Transaction<'_, Postgres>,
    events: &[NewEvent],
) -> Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = events.iter().map(|_| Uuid::now_v7()).collect();
    let column = |field: fn(&NewEvent) -> &str| -> Vec<&str> { events.iter().map(field).collect() };
    let payloads: Vec<&Value> = events.iter().map(|event| &event.payload).collect();
    let headers: Vec<Value> =
        events.iter().map(|event| Value::Object(event.headers.clone())).collect();
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[])",
    )
    .bind(&ids)
    .bind(column(|event| &event.aggregate_type))
    .bind(column(|event| &event.aggregate_id))
    .bind(column(|event| &event.event_type))
    .bind(&payloads)
    .bind(&headers)
    .execute(&mut **tx)
    .await?;
    Ok(ids)
}

/// Sends the outbox's notification when `tx` commits, waking relays that
/// `LISTEN` in other processes.
///
/// Only needed when no relay runs in the writing process (which wakes its own
/// relay directly) and polling is too slow. It has a price: Postgres serialises
/// the commits of all transactions that notify on one global lock, which cost
/// 28 % of the order write's throughput when measured.
pub async fn notify(tx: &mut Transaction<'_, Postgres>) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, '')").bind(NOTIFY_CHANNEL).execute(&mut **tx).await?;
    Ok(())
}
