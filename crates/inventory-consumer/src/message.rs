//! Turning a delivery into an order event (`OrderPlaced`, `OrderCancelled`), or
//! into the reason it is poison.
//!
//! A message that fails here can never succeed, however often it is retried, so the
//! worker moves it to the dead-letter queue with the reason (never requeues it).

use chrono::{DateTime, Utc};
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use order_events::{OrderCancelled, OrderPlaced, OrderPlacedLine, VERSION_HEADER};
use outbox::Event as _;
use outbox::transport::CREATED_AT_HEADER;
use uuid::Uuid;

/// A delivery's event, identified by the message id the outbox gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: Uuid,
    pub event: OrderEvent,
}

/// The events of an order this consumer applies. Serialised as the event
/// itself (what the message body holds).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum OrderEvent {
    Placed(OrderPlaced),
    Cancelled(OrderCancelled),
}

impl OrderEvent {
    pub fn order_id(&self) -> Uuid {
        match self {
            Self::Placed(event) => event.order_id,
            Self::Cancelled(event) => event.order_id,
        }
    }

    pub fn lines(&self) -> &[OrderPlacedLine] {
        match self {
            Self::Placed(event) => &event.lines,
            Self::Cancelled(event) => &event.lines,
        }
    }
}

impl From<OrderPlaced> for OrderEvent {
    fn from(event: OrderPlaced) -> Self {
        Self::Placed(event)
    }
}

impl From<OrderCancelled> for OrderEvent {
    fn from(event: OrderCancelled) -> Self {
        Self::Cancelled(event)
    }
}

/// Decodes and checks a delivery; the error is the reason it is poison.
pub fn decode(delivery: &Delivery) -> Result<Message, String> {
    let properties = &delivery.properties;
    let version = match properties.headers().as_ref().and_then(|h| h.inner().get(VERSION_HEADER)) {
        None => None,
        Some(AMQPValue::LongString(text)) => {
            Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
        }
        Some(AMQPValue::ShortString(text)) => Some(text.as_str().to_owned()),
        Some(other) => return Err(format!("header {VERSION_HEADER} is not text: {other:?}")),
    };
    decode_parts(
        properties.message_id().as_ref().map(|id| id.as_str()),
        properties.kind().as_ref().map(|kind| kind.as_str()),
        version.as_deref(),
        &delivery.data,
    )
}

/// Decodes and checks a message of any transport from its id, event type,
/// event version and body; the error is the reason it is poison.
pub fn decode_parts(
    message_id: Option<&str>,
    kind: Option<&str>,
    version: Option<&str>,
    body: &[u8],
) -> Result<Message, String> {
    let id = message_id.ok_or("the message has no message_id")?;
    let id = Uuid::parse_str(id).map_err(|_| format!("message_id {id:?} is not a UUID"))?;
    let kind = match kind {
        Some(OrderPlaced::EVENT_TYPE) => OrderPlaced::EVENT_TYPE,
        Some(OrderCancelled::EVENT_TYPE) => OrderCancelled::EVENT_TYPE,
        Some(kind) => return Err(format!("unknown event type {kind:?}")),
        None => return Err("the message has no type".to_owned()),
    };
    OrderPlaced::check_version(version)?;
    let event: OrderEvent = if kind == OrderPlaced::EVENT_TYPE {
        serde_json::from_slice::<OrderPlaced>(body)
            .map_err(|error| format!("the body is not a valid OrderPlaced event: {error}"))?
            .into()
    } else {
        serde_json::from_slice::<OrderCancelled>(body)
            .map_err(|error| format!("the body is not a valid OrderCancelled event: {error}"))?
            .into()
    };
    check(event.lines())?;
    Ok(Message { id, event })
}

/// What serde cannot check: an event the order service would never have written.
fn check(lines: &[OrderPlacedLine]) -> Result<(), String> {
    if lines.is_empty() {
        return Err("the event has no lines".to_owned());
    }
    if let Some(line) = lines.iter().find(|line| line.quantity <= 0) {
        return Err(format!("line {} has quantity {}", line.sku, line.quantity));
    }
    // Postgres text cannot hold U+0000: such a SKU would fail the batch's query
    // every time it is retried.
    if let Some(line) = lines.iter().find(|line| line.sku.contains('\0')) {
        return Err(format!("line sku {:?} contains a NUL character", line.sku));
    }
    Ok(())
}

/// A header's text, when the delivery has it as a string.
pub fn header_text(delivery: &Delivery, name: &str) -> Option<String> {
    crate::dead_letter::header_text(delivery.properties.headers().as_ref(), name)
}

/// The W3C trace context the message carries (`traceparent`, `tracestate`);
/// empty when it carries none, so the consumer's span then starts a trace.
pub fn trace_parent(delivery: &Delivery) -> opentelemetry::Context {
    service_kit::trace_context::extract(|name| header_text(delivery, name))
}

/// When the event was created, for the end-to-end lag: the relay's
/// `x-created-at` header (the outbox row's `created_at`, RFC 3339 to the
/// microsecond), else the AMQP `timestamp` property (whole seconds, stamped when
/// the relay published it), else `None`.
pub fn created_at(delivery: &Delivery) -> Option<DateTime<Utc>> {
    let properties = &delivery.properties;
    header_text(delivery, CREATED_AT_HEADER)
        .and_then(|text| DateTime::parse_from_rfc3339(text.trim()).ok())
        .map(|at| at.with_timezone(&Utc))
        .or_else(|| {
            let seconds = i64::try_from((*properties.timestamp())?).ok()?;
            DateTime::from_timestamp(seconds, 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::BasicProperties;
    use lapin::types::FieldTable;

    fn delivery(properties: BasicProperties) -> Delivery {
        let mut delivery = Delivery::mock(1, "".into(), "".into(), false, Vec::new());
        delivery.properties = properties;
        delivery
    }

    #[test]
    fn the_creation_time_comes_from_the_header_else_the_timestamp() {
        let mut headers = FieldTable::default();
        headers.insert(
            CREATED_AT_HEADER.into(),
            AMQPValue::LongString("2026-11-24T10:00:00.123456Z".into()),
        );
        let both = BasicProperties::default().with_headers(headers).with_timestamp(1);
        let at = created_at(&delivery(both)).expect("a time");
        assert_eq!(at.to_rfc3339(), "2026-11-24T10:00:00.123456+00:00");

        let timestamp_only = BasicProperties::default().with_timestamp(1_795_000_000);
        assert_eq!(
            created_at(&delivery(timestamp_only)),
            DateTime::from_timestamp(1_795_000_000, 0)
        );

        let mut bad = FieldTable::default();
        bad.insert(CREATED_AT_HEADER.into(), AMQPValue::LongString("yesterday".into()));
        assert_eq!(created_at(&delivery(BasicProperties::default().with_headers(bad))), None);
    }
}
