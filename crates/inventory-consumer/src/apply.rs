//! The effect of a batch of order events, applied in the caller's transaction:
//! each new `OrderPlaced` reserves its order's stock (all lines or none) and
//! decides the order; each new `OrderCancelled` gives back what its order took
//! (if it took anything) and marks it CANCELLED; an event seen before has no
//! effect.
//!
//! One order's events are applied in the order they were written. The relay
//! publishes them in that order, but two workers (or two replicas), each with a
//! prefetch, can receive one order's `OrderPlaced` and `OrderCancelled` at once,
//! and the cancel's batch can commit first. So a cancel whose order is still
//! PENDING (its `OrderPlaced` not applied yet) is [`Outcome::Deferred`]: not
//! recorded, no effect, held by its worker and tried again. Only a cancel whose
//! wait is over (the caller says which: `OUT_OF_ORDER_WAIT`) is applied without
//! its `OrderPlaced` ([`Outcome::CancelledBeforePlaced`]): the order is then
//! CANCELLED with nothing to give back, its `OrderPlaced` has no effect when it
//! comes, and `orders.cancelled_from = 'PENDING'` records it for reconcile.
//! Either way a CANCELLED order holds no stock, and the stock of a COMPLETED
//! order is taken once.
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
    /// A cancel whose order's `OrderPlaced` has not been applied: not recorded,
    /// no effect; the worker holds it and tries again.
    Deferred,
    /// A cancel applied without its order's `OrderPlaced`, its wait being over:
    /// CANCELLED with nothing to give back; applied out of order.
    CancelledBeforePlaced,
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
            Self::Deferred => "deferred",
            Self::CancelledBeforePlaced => "cancelled_before_placed",
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
/// of two orders competing for the last units of stock gets them. A cancel that
/// comes before its order's `OrderPlaced` is deferred.
pub async fn apply_batch(
    tx: &mut Transaction<'_, Postgres>,
    consumer: &str,
    messages: &[Message],
) -> sqlx::Result<Vec<Outcome>> {
    apply_batch_waited(tx, consumer, messages, &HashSet::new()).await
}

/// [`apply_batch`], except that a cancel whose message id is in `waited_out`
/// (its wait for its order's `OrderPlaced` is over) is applied without it.
pub async fn apply_batch_waited(
    tx: &mut Transaction<'_, Postgres>,
    consumer: &str,
    messages: &[Message],
    waited_out: &HashSet<Uuid>,
) -> sqlx::Result<Vec<Outcome>> {
    // Row locks are `FOR NO KEY UPDATE`, the lock an UPDATE that leaves the key
    // alone takes. `FOR UPDATE` would also conflict with the `FOR KEY SHARE` locks
    // that foreign-key checks take (an Idempotency-Key's or a cancel's, on its
    // order), and make those writes wait for a batch or deadlock with it.
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
    // Each order's last decision in the batch: its new status, the message that
    // decided it and, for a cancel, the status it found (an order placed and
    // cancelled in one batch is written once).
    let mut decided: BTreeMap<Uuid, Decision> = BTreeMap::new();
    // Deferred cancels, whose ids step 2 recorded and step 5 forgets.
    let mut deferred = Vec::new();
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
            OrderEvent::Cancelled(_)
                if order_status == "PENDING" && !waited_out.contains(&message.id) =>
            {
                deferred.push(message.id);
                Outcome::Deferred
            }
            OrderEvent::Cancelled(_) if order_status == "PENDING" => Outcome::CancelledBeforePlaced,
            OrderEvent::Cancelled(_) => {
                // Only a COMPLETED order took stock; a REJECTED one has
                // nothing to give back.
                if order_status == "COMPLETED" {
                    for (sku, quantity) in quantities(message) {
                        *available.entry(sku.to_owned()).or_default() += quantity;
                        *reserved.entry(sku).or_default() -= quantity;
                    }
                }
                Outcome::Cancelled
            }
        };
        let status = match outcome {
            Outcome::Completed => "COMPLETED",
            Outcome::Rejected => "REJECTED",
            Outcome::Cancelled | Outcome::CancelledBeforePlaced => "CANCELLED",
            _ => {
                outcomes.push(outcome);
                continue;
            }
        };
        let cancelled_from = (status == "CANCELLED").then(|| order_status.clone());
        status.clone_into(order_status);
        decided.insert(order_id, Decision { status, message_id: message.id, cancelled_from });
        outcomes.push(outcome);
    }

    // 5. Write the decisions: one statement for the stock, one for the orders.
    //    Each decided order names its message (`decided_by`), whose id step 2
    //    recorded in this transaction: `order-service reconcile` checks the pair.
    //    A deferred cancel's id is forgotten, so that it takes effect when it
    //    comes again.
    if !deferred.is_empty() {
        outbox::inbox::forget(tx, consumer, &deferred).await?;
    }
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
        let mut cancelled_from = Vec::with_capacity(decided.len());
        for (id, decision) in decided {
            ids.push(id);
            statuses.push(decision.status);
            deciders.push(decision.message_id);
            cancelled_from.push(decision.cancelled_from);
        }
        sqlx::query(
            "UPDATE orders SET status = d.status, decided_by = d.message_id,
                               cancelled_from = d.cancelled_from, updated_at = now()
             FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[])
                  AS d(id, status, message_id, cancelled_from)
             WHERE orders.id = d.id",
        )
        .bind(&ids)
        .bind(&statuses)
        .bind(&deciders)
        .bind(&cancelled_from)
        .execute(&mut **tx)
        .await?;
    }
    Ok(outcomes)
}

/// An order's new status, the message that decided it and, for a cancel, the
/// status it found (`orders.cancelled_from`).
struct Decision {
    status: &'static str,
    message_id: Uuid,
    cancelled_from: Option<String>,
}

/// The quantity the message asks of each sku (an sku on two lines counts once).
fn quantities(message: &Message) -> BTreeMap<&str, i64> {
    let mut needed = BTreeMap::new();
    for line in message.event.lines() {
        *needed.entry(line.sku.as_str()).or_default() += i64::from(line.quantity);
    }
    needed
}
