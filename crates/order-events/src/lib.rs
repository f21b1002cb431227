//! The contract between the order service and its consumers: what an
//! `OrderPlaced` and an `OrderCancelled` event carry.
//!
//! Producers are strict, consumers tolerant, so the two can be deployed one at a
//! time. The producer writes exactly these structs, and stamps each event with
//! its schema version in the [`VERSION_HEADER`] header. A consumer ignores fields
//! it does not know (a newer producer may add some: that is a minor version), and
//! refuses, as poison, an event of a major version it does not know or one
//! missing a field it needs. An event without the header is version 1: every
//! event written before versions existed.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// The aggregate type of order events in the outbox.
pub const ORDER_AGGREGATE: &str = "order";

/// The message header carrying an event's schema version, `<major>.<minor>`.
pub const VERSION_HEADER: &str = "event_version";

/// Emitted in the same transaction that creates an order (status PENDING).
/// Unknown fields are ignored when reading (see the module comment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: Uuid,
    pub customer_id: String,
    pub lines: Vec<OrderPlacedLine>,
    pub total_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlacedLine {
    pub sku: String,
    pub quantity: i32,
}

/// `outbox::enqueue(tx, &order_placed)` writes it with its names and version.
impl outbox::Event for OrderPlaced {
    const AGGREGATE_TYPE: &'static str = ORDER_AGGREGATE;
    /// The event type in the outbox and the message's `type`.
    const EVENT_TYPE: &'static str = "OrderPlaced";

    fn aggregate_id(&self) -> String {
        self.order_id.to_string()
    }

    fn headers(&self) -> Map<String, Value> {
        Map::from_iter([(VERSION_HEADER.to_owned(), Value::from(Self::VERSION))])
    }
}

impl OrderPlaced {
    /// The version this code writes. A new optional field raises the minor
    /// version; removing or changing a field raises the major one.
    pub const VERSION: &'static str = "1.0";
    /// The major version this code reads.
    pub const MAJOR_VERSION: u32 = 1;

    /// Whether a consumer of this code can read an event of `version` (a
    /// [`VERSION_HEADER`] value; `None` when the event has none, which is 1.0).
    pub fn check_version(version: Option<&str>) -> Result<(), String> {
        let Some(version) = version else { return Ok(()) };
        let major = version.split('.').next().and_then(|major| major.trim().parse::<u32>().ok());
        match major {
            Some(Self::MAJOR_VERSION) => Ok(()),
            Some(_) => Err(format!(
                "unsupported event version {version:?}: this consumer reads major version {}",
                Self::MAJOR_VERSION
            )),
            None => Err(format!("event version {version:?} is not <major>.<minor>")),
        }
    }
}

/// Emitted in the transaction that records a cancel request (`POST
/// /orders/{id}/cancel`), once per order. Its consumer gives back the stock the
/// order took, if it took any, and marks it CANCELLED. Published after the
/// order's `OrderPlaced` (the relay keeps one aggregate's events in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: Uuid,
    /// The order's lines, as `OrderPlaced` carried them.
    pub lines: Vec<OrderPlacedLine>,
}

impl outbox::Event for OrderCancelled {
    const AGGREGATE_TYPE: &'static str = ORDER_AGGREGATE;
    const EVENT_TYPE: &'static str = "OrderCancelled";

    fn aggregate_id(&self) -> String {
        self.order_id.to_string()
    }

    fn headers(&self) -> Map<String, Value> {
        Map::from_iter([(VERSION_HEADER.to_owned(), Value::from(OrderPlaced::VERSION))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox::Event;

    #[test]
    fn an_order_placed_event_carries_its_names_and_version() {
        let event = OrderPlaced {
            order_id: Uuid::nil(),
            customer_id: "c".to_owned(),
            lines: vec![OrderPlacedLine { sku: "SKU-001".to_owned(), quantity: 1 }],
            total_cents: 100,
        };
        let new = outbox::NewEvent::from_event(&event).expect("serialisable");
        assert_eq!(new.aggregate_type, "order");
        assert_eq!(new.event_type, OrderPlaced::EVENT_TYPE);
        assert_eq!(new.aggregate_id, Uuid::nil().to_string());
        assert_eq!(new.headers[VERSION_HEADER], "1.0");
        assert_eq!(new.payload["lines"][0]["sku"], "SKU-001");
    }

    #[test]
    fn versions_of_the_same_major_are_read_others_refused() {
        assert_eq!(OrderPlaced::check_version(None), Ok(()));
        assert_eq!(OrderPlaced::check_version(Some("1.0")), Ok(()));
        assert_eq!(OrderPlaced::check_version(Some("1.7")), Ok(()));
        assert_eq!(OrderPlaced::check_version(Some("1")), Ok(()));
        assert!(OrderPlaced::check_version(Some("2.0")).is_err_and(|e| e.contains("major")));
        assert!(OrderPlaced::check_version(Some("latest")).is_err());
        assert!(OrderPlaced::check_version(Some("")).is_err());
    }

    #[test]
    fn a_newer_producer_s_extra_fields_are_ignored() {
        let newer = serde_json::json!({
            "order_id": "0190b8b6-7d3c-7cc0-8000-000000000001",
            "customer_id": "c",
            "lines": [{"sku": "SKU-001", "quantity": 2, "gift_wrap": true}],
            "total_cents": 10,
            "currency": "EUR",
        });
        let event: OrderPlaced = serde_json::from_value(newer).expect("tolerant");
        assert_eq!(event.lines[0].quantity, 2);
        let missing_lines = serde_json::json!({
            "order_id": "0190b8b6-7d3c-7cc0-8000-000000000001",
            "customer_id": "c",
            "total_cents": 10,
        });
        assert!(serde_json::from_value::<OrderPlaced>(missing_lines).is_err());
    }
}
