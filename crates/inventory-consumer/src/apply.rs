//! The effect of a batch of order events, applied in the caller's transaction:
//! each new `OrderPlaced` reserves its order's stock (all lines or none) and
//! decides the order; each new `OrderCancelled` gives back what its order took
//! (if it took anything) and marks it CANCELLED; an event seen before has no
//! effect.
//!
//! A cancel may be applied before its order's `OrderPlaced` (two consumers,
//! each with a prefetch, can receive one aggregate's events at once): the order
//! is then CANCELLED with nothing to give back, and its `OrderPlaced`, applied
//! later, finds it decided and has no effect. Either way a CANCELLED order holds
//! no stock, and the stock of a COMPLETED order is taken once.
//!
//! Set-based on purpose: a batch costs a fixed handful of statements whatever its
//! size, which is where the consumer's throughput comes from. Rows are locked in a
//! fixed order (orders by id, then inventory by sku), so concurrent batches wait
//! for each other instead of deadlocking.

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::message::{Message, OrderEvent};

/// What applying one message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stock reserved for every line; the order is COMPLETED.
    Completed,
    /// A cancel: the stock the order took (if any) given back; it is CANCELLED.
    Cancelled,
    /// Some line's stock was short; nothing reserved, the order is REJECTED.
    Rejected,
    /// This message id was applied before: no effect.
    Duplicate,
    /// A new message for an order that no longer takes it (an `OrderPlaced` for
    /// an order no longer PENDING, a cancel for one already CANCELLED): recorded,
    /// no effect.
    AlreadyDecided,
    /// No such order: the message is poison and is not recorded, so a replay
    /// after the order appears (a restored database, say) is still applied.
    UnknownOrder,
    /// The database refused this message's data (an SQLSTATE class 22 error,
    /// such as text it cannot store): poison, as no retry can succeed.
    Refused(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Rejected => "rejected",
            Self::Duplicate => "duplicate",
            Self::AlreadyDecided => "already_decided",
            Self::UnknownOrder => "unknown_order",
            Self::Refused(_) => "refused",
        }
    }
}

/// Applies `messages` in `tx` as `consumer` and returns each one's outcome, in
/// order. Messages are decided in the order given, so within a batch the earlier
/// of two orders competing for the last units of stock gets them.
pub async fn apply_batch(
    tx: &mut Transaction<'_, Postgres>,
    consumer: &str,
    messages: &[Message],
) -> sqlx::Result<Vec<Outcome>> {
    // Row locks are `FOR NO KEY UPDATE`, the lock an UPDATE that leaves the key
    // alone takes. `FOR UPDATE` would also conflict with the `FOR KEY SHARE` locks
    // that order-service's foreign-key checks take on `inventory` while inserting
    // order lines, and the two would deadlock under load.
    //
    // 1. Lock the orders. This also serialises two deliveries of one message:
    //    the second waits here until the first commits.
    let mut order_ids: Vec<Uuid> = messages.iter().map(|m| m.event.order_id()).collect();
    order_ids.sort_unstable();
    order_ids.dedup();
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, status FROM orders WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
    )
    .bind(&order_ids)
    .fetch_all(&mut **tx)
    .await?;
    let mut status: HashMap<Uuid, String> = rows.into_iter().collect();

    // 2. Record the message ids of known orders; only the new ones take effect.
    let mut known_ids: Vec<Uuid> = messages
        .iter()
        .filter(|m| status.contains_key(&m.event.order_id()))
        .map(|m| m.id)
        .collect();
    known_ids.sort_unstable();
    let mut new_ids: HashSet<Uuid> =
        outbox::inbox::claim_new(tx, consumer, &known_ids).await?.into_iter().collect();

    // 3. Lock the stock the new messages ask for.
    let mut skus: Vec<&str> = messages
        .iter()
        .filter(|m| new_ids.contains(&m.id))
        .flat_map(|m| m.event.lines().iter().map(|line| line.sku.as_str()))
        .collect();
    skus.sort_unstable();
    skus.dedup();
    let mut available: HashMap<String, i64> = sqlx::query_as(
        "SELECT sku, available::int8 FROM inventory WHERE sku = ANY($1)
         ORDER BY sku FOR NO KEY UPDATE",
    )
    .bind(&skus)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();

    // 4. Decide each message in order, against the stock left by those before it.
    let mut outcomes = Vec::with_capacity(messages.len());
    // Stock taken (positive) or given back (negative), per sku.
    let mut reserved: BTreeMap<&str, i64> = BTreeMap::new();
    // Each order's last decision in the batch: its new status and the message
    // that decided it (an order placed and cancelled in one batch is written once).
    let mut decided: BTreeMap<Uuid, (&'static str, Uuid)> = BTreeMap::new();
    for message in messages {
        let order_id = message.event.order_id();
        let Some(order_status) = status.get_mut(&order_id) else {
            outcomes.push(Outcome::UnknownOrder);
            continue;
        };
        // `remove` also makes a message repeated within the batch a duplicate.
        if !new_ids.remove(&message.id) {
            outcomes.push(Outcome::Duplicate);
            continue;
        }
        let outcome = match &message.event {
            OrderEvent::Placed(_) if order_status != "PENDING" => Outcome::AlreadyDecided,
            OrderEvent::Placed(_) => {
                let needed = quantities(message);
                let in_stock = needed.iter().all(|(sku, quantity)| {
                    available.get(*sku).is_some_and(|left| left >= quantity)
                });
                if in_stock {
                    for (sku, quantity) in needed {
                        *available.get_mut(sku).expect("checked above") -= quantity;
                        *reserved.entry(sku).or_default() += quantity;
                    }
                    Outcome::Completed
                } else {
                    Outcome::Rejected
                }
            }
            OrderEvent::Cancelled(_) if order_status == "CANCELLED" => Outcome::AlreadyDecided,
            OrderEvent::Cancelled(_) => {
                // Only a COMPLETED order took stock; a PENDING or REJECTED one
                // has nothing to give back.
                if order_status == "COMPLETED" {
                    for (sku, quantity) in quantities(message) {
                        *available.entry(sku.to_owned()).or_default() += quantity;
                        *reserved.entry(sku).or_default() -= quantity;
                    }
                }
                Outcome::Cancelled
            }
        };
        let new_status = match outcome {
            Outcome::Completed => "COMPLETED",
            Outcome::Rejected => "REJECTED",
            Outcome::Cancelled => "CANCELLED",
            _ => {
                outcomes.push(outcome);
                continue;
            }
        };
        new_status.clone_into(order_status);
        decided.insert(order_id, (new_status, message.id));
        outcomes.push(outcome);
    }

    // 5. Write the decisions: one statement for the stock, one for the orders.
    //    Each decided order names its message (`decided_by`), whose id step 2
    //    recorded in this transaction: `order-service reconcile` checks the pair.
    reserved.retain(|_, quantity| *quantity != 0);
    if !reserved.is_empty() {
        let (skus, quantities): (Vec<&str>, Vec<i64>) = reserved.into_iter().unzip();
        sqlx::query(
            "UPDATE inventory SET available = available - r.quantity
             FROM unnest($1::text[], $2::int8[]) AS r(sku, quantity)
             WHERE inventory.sku = r.sku",
        )
        .bind(&skus)
        .bind(&quantities)
        .execute(&mut **tx)
        .await?;
    }
    if !decided.is_empty() {
        let mut ids = Vec::with_capacity(decided.len());
        let mut statuses = Vec::with_capacity(decided.len());
        let mut deciders = Vec::with_capacity(decided.len());
        for (id, (status, message_id)) in decided {
            ids.push(id);
            statuses.push(status);
            deciders.push(message_id);
        }
        sqlx::query(
            "UPDATE orders SET status = d.status, decided_by = d.message_id, updated_at = now()
             FROM unnest($1::uuid[], $2::text[], $3::uuid[]) AS d(id, status, message_id)
             WHERE orders.id = d.id",
        )
        .bind(&ids)
        .bind(&statuses)
        .bind(&deciders)
        .execute(&mut **tx)
        .await?;
    }
    Ok(outcomes)
}

/// The quantity the message asks of each sku (an sku on two lines counts once).
fn quantities(message: &Message) -> BTreeMap<&str, i64> {
    let mut needed = BTreeMap::new();
    for line in message.event.lines() {
        *needed.entry(line.sku.as_str()).or_default() += i64::from(line.quantity);
    }
    needed
}
