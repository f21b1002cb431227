//! The contract between the order service and its consumers: what an
//! `OrderPlaced` event carries.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The aggregate type of order events in the outbox.
pub const ORDER_AGGREGATE: &str = "order";

/// Emitted in the same transaction that creates an order (status PENDING).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderPlaced {
    pub order_id: Uuid,
    pub customer_id: String,
    pub lines: Vec<OrderPlacedLine>,
    pub total_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderPlacedLine {
    pub sku: String,
    pub quantity: i32,
}

impl OrderPlaced {
    /// The event type in the outbox and the AMQP `type` property.
    pub const EVENT_TYPE: &'static str = "OrderPlaced";
}
