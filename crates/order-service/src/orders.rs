//! Orders: validating a request, and reading an order back. Writing is the
//! writer's (group commit, see `writer`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{ApiError, Result};

/// Most lines one order may have.
pub const MAX_ITEMS: usize = 100;
/// Largest quantity of one line.
pub const MAX_QUANTITY: i64 = 1_000;
/// Longest customer id or SKU accepted, in characters.
pub const MAX_ID_LEN: usize = 100;

/// Whether `text` is acceptable as a customer id or SKU: 1 to [`MAX_ID_LEN`]
/// characters, none of them a control character. Postgres `text` cannot hold
/// U+0000 at all (the insert would fail, a 500), and the other control characters
/// (newlines, escapes) have no place in an identifier and confuse logs and psql.
fn is_valid_id(text: &str) -> bool {
    let length = text.chars().count();
    (1..=MAX_ID_LEN).contains(&length) && !text.chars().any(char::is_control)
}

/// The body of `POST /orders`. Unknown fields are refused, so a typo such as
/// `"item"` is an error rather than an empty order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"customer_id": "customer-42", "items": [{"sku": "SKU-001", "quantity": 2}]}))]
pub struct CreateOrder {
    /// Who orders: 1 to 100 characters, no control characters; surrounding
    /// spaces are trimmed.
    #[schema(min_length = 1, max_length = 100, example = "customer-42")]
    pub customer_id: String,
    /// 1 to 100 lines, each SKU at most once.
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<CreateOrderItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrderItem {
    /// A SKU of the catalogue (`SKU-001` .. `SKU-025` in the demo data): 1 to 100
    /// characters, no control characters.
    #[schema(min_length = 1, max_length = 100, example = "SKU-001")]
    pub sku: String,
    /// Wider than a line's `i32` so that an absurd quantity gets our own message.
    #[schema(minimum = 1, maximum = 1000, example = 2)]
    pub quantity: i64,
}

/// A line that passed validation; its price is not known until the catalogue is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidLine {
    pub sku: String,
    pub quantity: i32,
}

impl CreateOrder {
    /// Checks everything that can be checked without the database.
    pub fn validate(&self) -> Result<Vec<ValidLine>> {
        if !is_valid_id(self.customer_id.trim()) {
            return Err(ApiError::validation(
                "invalid_customer_id",
                format!(
                    "customer_id must be 1 to {MAX_ID_LEN} characters, none of them a control character"
                ),
            ));
        }
        if self.items.is_empty() {
            return Err(ApiError::validation("empty_items", "items must hold at least one item"));
        }
        if self.items.len() > MAX_ITEMS {
            return Err(ApiError::validation(
                "too_many_items",
                format!("items holds {} items, at most {MAX_ITEMS} are allowed", self.items.len()),
            ));
        }
        let mut lines: Vec<ValidLine> = Vec::with_capacity(self.items.len());
        for (index, item) in self.items.iter().enumerate() {
            if !is_valid_id(&item.sku) {
                return Err(ApiError::validation(
                    "invalid_sku",
                    format!(
                        "items[{index}].sku must be 1 to {MAX_ID_LEN} characters, none of them a control character"
                    ),
                ));
            }
            let quantity = i32::try_from(item.quantity)
                .ok()
                .filter(|quantity| (1..=MAX_QUANTITY).contains(&i64::from(*quantity)))
                .ok_or_else(|| {
                    ApiError::validation(
                        "invalid_quantity",
                        format!(
                            "items[{index}].quantity must be between 1 and {MAX_QUANTITY}, got {}",
                            item.quantity
                        ),
                    )
                })?;
            if lines.iter().any(|line| line.sku == item.sku) {
                return Err(ApiError::validation(
                    "duplicate_sku",
                    format!("items[{index}].sku {:?} appears more than once", item.sku),
                ));
            }
            lines.push(ValidLine { sku: item.sku.clone(), quantity });
        }
        Ok(lines)
    }
}

/// An order as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Order {
    pub id: Uuid,
    pub customer_id: String,
    /// PENDING until the inventory consumer has processed it, then COMPLETED or
    /// REJECTED; CANCELLED once a cancel was applied.
    #[schema(value_type = OrderStatus)]
    pub status: String,
    pub total_cents: i64,
    pub items: Vec<OrderLine>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What an order's status can be.
#[derive(utoipa::ToSchema)]
#[allow(dead_code, clippy::upper_case_acronyms)] // a schema only: the status travels as text
pub enum OrderStatus {
    PENDING,
    COMPLETED,
    REJECTED,
    CANCELLED,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct OrderLine {
    pub sku: String,
    pub quantity: i32,
    pub unit_price_cents: i64,
}

/// Reads one order with its lines.
pub async fn find(db: &PgPool, id: Uuid) -> Result<Option<Order>> {
    find_in(&mut *db.acquire().await?, id).await
}

/// [`find`] on `conn` (inside a transaction, say).
pub async fn find_in(conn: &mut sqlx::PgConnection, id: Uuid) -> Result<Option<Order>> {
    let Some((customer_id, status, total_cents, created_at, updated_at)) = sqlx::query_as::<
        _,
        (String, String, i64, DateTime<Utc>, DateTime<Utc>),
    >(
        "SELECT customer_id, status, total_cents, created_at, updated_at FROM orders WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let items = sqlx::query_as(
        "SELECT sku, quantity, unit_price_cents FROM order_lines WHERE order_id = $1 ORDER BY sku",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(Order { id, customer_id, status, total_cents, items, created_at, updated_at }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(items: &[(&str, i64)]) -> CreateOrder {
        CreateOrder {
            customer_id: "c-1".to_owned(),
            items: items
                .iter()
                .map(|(sku, quantity)| CreateOrderItem {
                    sku: (*sku).to_owned(),
                    quantity: *quantity,
                })
                .collect(),
        }
    }

    fn code_of(result: Result<Vec<ValidLine>>) -> &'static str {
        match result {
            Err(ApiError::Validation { code, .. }) => code,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_normal_order() {
        let lines =
            request(&[("SKU-001", 2), ("SKU-002", MAX_QUANTITY)]).validate().expect("valid");
        assert_eq!(lines[1], ValidLine { sku: "SKU-002".to_owned(), quantity: 1_000 });
    }

    #[test]
    fn names_each_problem() {
        assert_eq!(code_of(request(&[]).validate()), "empty_items");
        assert_eq!(code_of(request(&[("SKU-001", 0)]).validate()), "invalid_quantity");
        assert_eq!(code_of(request(&[("SKU-001", -3)]).validate()), "invalid_quantity");
        assert_eq!(
            code_of(request(&[("SKU-001", MAX_QUANTITY + 1)]).validate()),
            "invalid_quantity"
        );
        assert_eq!(code_of(request(&[("SKU-001", i64::MAX)]).validate()), "invalid_quantity");
        assert_eq!(code_of(request(&[("", 1)]).validate()), "invalid_sku");
        assert_eq!(code_of(request(&[("SKU-001", 1), ("SKU-001", 1)]).validate()), "duplicate_sku");
        let too_many: Vec<(&str, i64)> = vec![("SKU-001", 1); MAX_ITEMS + 1];
        assert_eq!(code_of(request(&too_many).validate()), "too_many_items");
        let mut blank_customer = request(&[("SKU-001", 1)]);
        blank_customer.customer_id = "  ".to_owned();
        assert_eq!(code_of(blank_customer.validate()), "invalid_customer_id");
    }

    #[test]
    fn control_characters_are_refused_in_ids() {
        for bad in ["\u{0}", "SKU\u{0}001", "a\nb", "\u{1b}[31m", "\u{7f}", "\u{85}"] {
            assert_eq!(code_of(request(&[(bad, 1)]).validate()), "invalid_sku", "{bad:?}");
            let mut order = request(&[("SKU-001", 1)]);
            order.customer_id = bad.to_owned();
            assert_eq!(code_of(order.validate()), "invalid_customer_id", "{bad:?}");
        }
        // Length counts characters, not bytes: 100 non-ASCII characters are fine.
        let mut order = request(&[("SKU-001", 1)]);
        order.customer_id = "é".repeat(MAX_ID_LEN);
        assert!(order.validate().is_ok());
        order.customer_id = "é".repeat(MAX_ID_LEN + 1);
        assert_eq!(code_of(order.validate()), "invalid_customer_id");
    }
}
