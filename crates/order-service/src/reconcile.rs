//! `order-service reconcile`: the proof, run against a live database, that the
//! outbox lost nothing. Every order is decided or young; every decision names
//! the message that made it, and that message was recorded by the consumer;
//! the stock of each SKU equals what it received minus what COMPLETED orders
//! took, and every order line names an existing order and a SKU of the
//! catalogue; the outbox holds no dead or stuck event; every Idempotency-Key names
//! its order, and the answer stored for its retries is that order's; every
//! order whose cancel was accepted long enough ago is CANCELLED, and no cancel
//! was applied before its order's OrderPlaced.
//!
//! All checks read one snapshot (a REPEATABLE READ, READ ONLY transaction), so
//! they are exact while the system runs: a decision is either wholly visible
//! (status, `decided_by`, stock and `processed_messages` are committed
//! together) or not at all. Each is a single pass over its tables, sequential
//! scans by design: `orders.status` has no index, so that the consumer's
//! update of it stays HOT. The report's examples (oldest stuck order, ...) cost
//! a second pass, made only when a check fails.
//!
//! It connects with one connection of its own, neither creating nor migrating
//! the database (a check must not change what it checks), and needs no broker.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use service_kit::db::{DbConfig, redact};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use uuid::Uuid;

use crate::config::ReconcileArgs;

/// Most examples a failing check lists.
const EXAMPLES: i64 = 5;

/// What `reconcile` found; [`Report::ok`] tells whether every check held.
#[derive(Debug, Clone)]
pub struct Report {
    pub consumer: String,
    pub pending_after: Duration,
    pub dedup_window: Duration,
    /// Since when every decision names its message (`schema_epochs`).
    pub decided_by_since: DateTime<Utc>,
    /// How long the checks took.
    pub elapsed: Duration,

    pub orders: i64,
    pub pending: i64,
    /// Orders PENDING for longer than `pending_after`.
    pub pending_stuck: i64,
    /// The oldest of them, with their age.
    pub oldest_stuck: Vec<(Uuid, Duration)>,

    pub decided: i64,
    /// Decided orders without `decided_by`, decided since the column exists.
    pub decided_without_message: i64,
    pub without_message_examples: Vec<Uuid>,
    /// Decided orders without `decided_by`, decided before the column existed:
    /// informational, not a failure.
    pub decided_before_tracking: i64,

    /// Decided orders whose message should still be in `processed_messages`.
    pub decided_within_window: i64,
    /// Of those, the ones whose message is not there.
    pub message_missing: i64,
    /// (order, its `decided_by`)
    pub message_missing_examples: Vec<(Uuid, Uuid)>,

    pub skus: i64,
    pub skus_off: Vec<SkuOff>,

    pub lines: i64,
    /// Lines whose order does not exist.
    pub lines_without_order: i64,
    /// Lines whose SKU is not in the catalogue.
    pub lines_unknown_sku: i64,
    /// (order, sku, the order is missing, the SKU is missing) of lines failing
    /// either.
    pub lines_off_examples: Vec<(Uuid, String, bool, bool)>,

    pub outbox_pending: i64,
    /// Pending events older than `pending_after`.
    pub outbox_pending_overdue: i64,
    /// Age of the oldest pending event.
    pub outbox_oldest_pending: Option<Duration>,
    pub outbox_dead: i64,

    pub keys: i64,
    pub keys_without_order: i64,
    /// (key, the order id it names)
    pub keys_without_order_examples: Vec<(String, Uuid)>,
    /// Keys whose stored answer (what every retry with the key is told) is not
    /// a 201 with their order's id, customer and total.
    pub keys_wrong_answer: i64,
    /// (key, the order it names, the id its stored answer gives)
    pub keys_wrong_answer_examples: Vec<(String, Uuid, Option<String>)>,

    /// Cancels accepted (`order_cancellations`).
    pub cancels: i64,
    /// Of those, accepted longer than `pending_after` ago and not CANCELLED.
    pub cancels_stuck: i64,
    /// (order, its status)
    pub cancels_stuck_examples: Vec<(Uuid, String)>,
    /// Cancels applied (`orders.cancelled_from` set).
    pub cancels_applied: i64,
    /// Of those, applied before their order's `OrderPlaced` (`cancelled_from =
    /// 'PENDING'`): one order's events applied out of their order.
    pub cancels_out_of_order: i64,
    pub cancels_out_of_order_examples: Vec<Uuid>,
}

/// A SKU whose stock does not match its books.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkuOff {
    pub sku: String,
    pub available: i64,
    /// `received` minus the quantities of the lines of COMPLETED orders.
    pub expected: i64,
}

impl SkuOff {
    /// `available - expected`: negative when stock went missing, positive when
    /// there is more than the books account for.
    pub fn difference(&self) -> i64 {
        self.available - self.expected
    }
}

/// One check's verdict, as printed.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub summary: String,
    /// Lines printed under the verdict (examples of what failed).
    pub details: Vec<String>,
}

/// Connects to `db` (without creating or migrating it), checks, disconnects.
pub async fn run(db: &DbConfig, args: &ReconcileArgs) -> anyhow::Result<Report> {
    let url = redact(&db.database_url);
    let options = PgConnectOptions::from_str(&db.database_url)
        .with_context(|| format!("DATABASE_URL {url} is not a Postgres URL"))?
        .application_name("order-service reconcile")
        // sqlx logs statements over a second as warnings, on stdout, where they
        // would break `--json`; a pass over a million orders may take that long.
        .disable_statement_logging();
    let timeout = Duration::from_millis(db.db_acquire_timeout_ms);
    let mut conn = tokio::time::timeout(timeout, PgConnection::connect_with(&options))
        .await
        .with_context(|| format!("cannot connect to Postgres at {url} within {timeout:?}"))?
        .with_context(|| format!("cannot connect to Postgres at {url}"))?;
    let report = check(&mut conn, args).await;
    let _ = conn.close().await;
    report
}

/// Runs every check in one read-only snapshot on `conn`.
pub async fn check(conn: &mut PgConnection, args: &ReconcileArgs) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut tx = conn.begin().await.context("cannot begin a transaction")?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .context("cannot take a read-only snapshot")?;
    let decided_by_since = require_schema(&mut tx).await?;
    let pending_after = args.pending_after;
    let window = args.dedup_window;
    let consumer = args.consumer.as_str();

    // Checks 1 to 3 in one pass over orders. The outer join finds each decided
    // order's message; (consumer, message_id) is processed_messages' key, so it
    // adds no rows. `now()` is the snapshot's time in every statement.
    let (
        orders,
        pending,
        pending_stuck,
        decided,
        decided_without_message,
        decided_before_tracking,
        decided_within_window,
        message_missing,
    ): (i64, i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*),
                count(*) FILTER (WHERE o.status = 'PENDING'),
                count(*) FILTER (WHERE o.status = 'PENDING' AND o.created_at < now() - $2),
                count(*) FILTER (WHERE o.status <> 'PENDING'),
                count(*) FILTER (WHERE o.status <> 'PENDING' AND o.decided_by IS NULL
                                   AND o.updated_at >= $4),
                count(*) FILTER (WHERE o.status <> 'PENDING' AND o.decided_by IS NULL
                                   AND o.updated_at < $4),
                count(*) FILTER (WHERE o.status <> 'PENDING' AND o.decided_by IS NOT NULL
                                   AND o.updated_at >= now() - $3),
                count(*) FILTER (WHERE o.status <> 'PENDING' AND o.decided_by IS NOT NULL
                                   AND o.updated_at >= now() - $3 AND p.message_id IS NULL)
         FROM orders AS o
         LEFT JOIN processed_messages AS p
                ON p.consumer = $1 AND p.message_id = o.decided_by",
    )
    .bind(consumer)
    .bind(pending_after)
    .bind(window)
    .bind(decided_by_since)
    .fetch_one(&mut *tx)
    .await
    .context("cannot count the orders")?;

    let oldest_stuck = if pending_stuck > 0 {
        let rows: Vec<(Uuid, f64)> = sqlx::query_as(
            "SELECT id, extract(epoch FROM now() - created_at)::float8 FROM orders
             WHERE status = 'PENDING' AND created_at < now() - $1
             ORDER BY created_at LIMIT $2",
        )
        .bind(pending_after)
        .bind(EXAMPLES)
        .fetch_all(&mut *tx)
        .await
        .context("cannot list the stuck orders")?;
        rows.into_iter().map(|(id, age)| (id, seconds(age))).collect()
    } else {
        Vec::new()
    };
    let without_message_examples = if decided_without_message > 0 {
        sqlx::query_scalar(
            "SELECT id FROM orders
             WHERE status <> 'PENDING' AND decided_by IS NULL AND updated_at >= $1
             ORDER BY updated_at LIMIT $2",
        )
        .bind(decided_by_since)
        .bind(EXAMPLES)
        .fetch_all(&mut *tx)
        .await
        .context("cannot list the orders decided without a message")?
    } else {
        Vec::new()
    };
    let message_missing_examples = if message_missing > 0 {
        sqlx::query_as(
            "SELECT o.id, o.decided_by FROM orders AS o
             WHERE o.status <> 'PENDING' AND o.decided_by IS NOT NULL
               AND o.updated_at >= now() - $2
               AND NOT EXISTS (SELECT FROM processed_messages AS p
                               WHERE p.consumer = $1 AND p.message_id = o.decided_by)
             ORDER BY o.updated_at LIMIT $3",
        )
        .bind(consumer)
        .bind(window)
        .bind(EXAMPLES)
        .fetch_all(&mut *tx)
        .await
        .context("cannot list the orders whose message is missing")?
    } else {
        Vec::new()
    };

    // Check 4: one pass over the lines of COMPLETED orders, grouped by SKU.
    let skus: i64 = sqlx::query_scalar("SELECT count(*) FROM inventory")
        .fetch_one(&mut *tx)
        .await
        .context("cannot count the SKUs")?;
    let skus_off = sqlx::query_as::<_, (String, i64, i64)>(
        "SELECT i.sku, i.available::int8, i.received - coalesce(taken.quantity, 0)
         FROM inventory AS i
         LEFT JOIN (SELECT l.sku, sum(l.quantity)::int8 AS quantity
                    FROM order_lines AS l JOIN orders AS o ON o.id = l.order_id
                    WHERE o.status = 'COMPLETED'
                    GROUP BY l.sku) AS taken USING (sku)
         WHERE i.available <> i.received - coalesce(taken.quantity, 0)
         ORDER BY i.sku",
    )
    .fetch_all(&mut *tx)
    .await
    .context("cannot compare the stock with the completed orders")?
    .into_iter()
    .map(|(sku, available, expected)| SkuOff { sku, available, expected })
    .collect();

    // Check 5: every line names its order and a SKU of the catalogue. No
    // foreign key says so (their per-line checks were the write's largest
    // cost): the write prices each line from the catalogue and writes it after
    // its order, in one transaction, and catalogue rows are never deleted.
    let (lines, lines_without_order, lines_unknown_sku): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE o.id IS NULL),
                count(*) FILTER (WHERE i.sku IS NULL)
         FROM order_lines AS l
         LEFT JOIN orders AS o ON o.id = l.order_id
         LEFT JOIN inventory AS i ON i.sku = l.sku",
    )
    .fetch_one(&mut *tx)
    .await
    .context("cannot count the order lines")?;
    let lines_off_examples = if lines_without_order + lines_unknown_sku > 0 {
        sqlx::query_as(
            "SELECT l.order_id, l.sku, o.id IS NULL, i.sku IS NULL FROM order_lines AS l
             LEFT JOIN orders AS o ON o.id = l.order_id
             LEFT JOIN inventory AS i ON i.sku = l.sku
             WHERE o.id IS NULL OR i.sku IS NULL
             ORDER BY l.order_id, l.sku LIMIT $1",
        )
        .bind(EXAMPLES)
        .fetch_all(&mut *tx)
        .await
        .context("cannot list the order lines without their order or SKU")?
    } else {
        Vec::new()
    };

    // Check 6: the outbox is a queue, small when the relay keeps up.
    let (outbox_pending, outbox_pending_overdue, outbox_dead, oldest): (
        i64,
        i64,
        i64,
        Option<f64>,
    ) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'pending'),
                count(*) FILTER (WHERE state = 'pending' AND created_at < now() - $1),
                count(*) FILTER (WHERE state = 'dead'),
                extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 'pending'))::float8
         FROM outbox",
    )
    .bind(pending_after)
    .fetch_one(&mut *tx)
    .await
    .context("cannot count the outbox")?;

    // Check 7: every key names its order, and the answer stored for its
    // retries is that order's (a 201, or the 202 of a cancel). A writer that stored one order's answer against
    // another's key (a batch's arrays out of step) would tell a retrying client
    // of an order that is not theirs; the foreign key cannot see that. A key
    // without its order cannot arise while the foreign key is enforced, but can
    // from a restore or a replica that skipped triggers.
    const WRONG_ANSWER: &str = "o.id IS NOT NULL AND (
             k.response_status IS DISTINCT FROM
                 CASE WHEN k.request ? 'cancel' THEN 202 ELSE 201 END
          OR k.response_body->>'id' IS DISTINCT FROM o.id::text
          OR k.response_body->>'customer_id' IS DISTINCT FROM o.customer_id
          OR k.response_body->'total_cents' IS DISTINCT FROM to_jsonb(o.total_cents))";
    let (keys, keys_without_order, keys_wrong_answer): (i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(*) FILTER (WHERE o.id IS NULL),
                    count(*) FILTER (WHERE {WRONG_ANSWER})
             FROM idempotency_keys AS k LEFT JOIN orders AS o ON o.id = k.order_id"
    ))
    .fetch_one(&mut *tx)
    .await
    .context("cannot count the idempotency keys")?;
    let keys_without_order_examples = if keys_without_order > 0 {
        sqlx::query_as(
            "SELECT k.idempotency_key, k.order_id FROM idempotency_keys AS k
             WHERE NOT EXISTS (SELECT FROM orders AS o WHERE o.id = k.order_id)
             ORDER BY k.created_at LIMIT $1",
        )
        .bind(EXAMPLES)
        .fetch_all(&mut *tx)
        .await
        .context("cannot list the keys without an order")?
    } else {
        Vec::new()
    };
    let keys_wrong_answer_examples = if keys_wrong_answer > 0 {
        sqlx::query_as(&format!(
            "SELECT k.idempotency_key, k.order_id, k.response_body->>'id'
             FROM idempotency_keys AS k JOIN orders AS o ON o.id = k.order_id
             WHERE {WRONG_ANSWER}
             ORDER BY k.created_at LIMIT $1"
        ))
        .bind(EXAMPLES)
        .fetch_all(&mut *tx)
        .await
        .context("cannot list the keys with a wrong answer")?
    } else {
        Vec::new()
    };
    // Check 8: a cancel accepted long enough ago has been applied: its order is
    // CANCELLED (and, by check 4, holds no stock). A database from before
    // cancels existed has no such table, and nothing to check.
    let (cancels, cancels_stuck, cancels_stuck_examples) =
        if sqlx::query_scalar::<_, bool>("SELECT to_regclass('order_cancellations') IS NOT NULL")
            .fetch_one(&mut *tx)
            .await
            .context("cannot read the schema")?
        {
            let (cancels, stuck): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE o.status <> 'CANCELLED'
                                                 AND c.requested_at < now() - $1)
             FROM order_cancellations AS c JOIN orders AS o ON o.id = c.order_id",
            )
            .bind(pending_after)
            .fetch_one(&mut *tx)
            .await
            .context("cannot count the cancels")?;
            let examples = if stuck > 0 {
                sqlx::query_as(
                    "SELECT o.id, o.status FROM order_cancellations AS c
                 JOIN orders AS o ON o.id = c.order_id
                 WHERE o.status <> 'CANCELLED' AND c.requested_at < now() - $1
                 ORDER BY c.requested_at LIMIT $2",
                )
                .bind(pending_after)
                .bind(EXAMPLES)
                .fetch_all(&mut *tx)
                .await
                .context("cannot list the cancels not applied")?
            } else {
                Vec::new()
            };
            (cancels, stuck, examples)
        } else {
            (0, 0, Vec::new())
        };
    // Check 9: each order's events were applied in the order they were written:
    // no cancel was applied before its order's OrderPlaced. The consumer records
    // the status each cancel found; a database from before that has no column.
    let (cancels_applied, cancels_out_of_order, cancels_out_of_order_examples) =
        if sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass('orders')
                            AND attname = 'cancelled_from' AND NOT attisdropped)",
        )
        .fetch_one(&mut *tx)
        .await
        .context("cannot read the schema")?
        {
            let (applied, out_of_order): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE cancelled_from = 'PENDING')
                 FROM orders WHERE cancelled_from IS NOT NULL",
            )
            .fetch_one(&mut *tx)
            .await
            .context("cannot count the cancels applied")?;
            let examples = if out_of_order > 0 {
                sqlx::query_scalar(
                    "SELECT id FROM orders WHERE cancelled_from = 'PENDING'
                     ORDER BY updated_at LIMIT $1",
                )
                .bind(EXAMPLES)
                .fetch_all(&mut *tx)
                .await
                .context("cannot list the cancels applied out of order")?
            } else {
                Vec::new()
            };
            (applied, out_of_order, examples)
        } else {
            (0, 0, Vec::new())
        };
    tx.rollback().await.context("cannot end the snapshot")?;

    Ok(Report {
        consumer: args.consumer.clone(),
        pending_after,
        dedup_window: window,
        decided_by_since,
        elapsed: started.elapsed(),
        orders,
        pending,
        pending_stuck,
        oldest_stuck,
        decided,
        decided_without_message,
        without_message_examples,
        decided_before_tracking,
        decided_within_window,
        message_missing,
        message_missing_examples,
        skus,
        skus_off,
        lines,
        lines_without_order,
        lines_unknown_sku,
        lines_off_examples,
        outbox_pending,
        outbox_pending_overdue,
        outbox_oldest_pending: oldest.map(seconds),
        outbox_dead,
        keys,
        keys_without_order,
        keys_without_order_examples,
        keys_wrong_answer,
        keys_wrong_answer_examples,
        cancels,
        cancels_stuck,
        cancels_stuck_examples,
        cancels_applied,
        cancels_out_of_order,
        cancels_out_of_order_examples,
    })
}

/// Fails with a clear message unless the schema has what the checks read, and
/// returns the time since which every decision names its message.
async fn require_schema(conn: &mut PgConnection) -> anyhow::Result<DateTime<Utc>> {
    let (has_orders, has_decided_by, has_received, has_epochs): (bool, bool, bool, bool) =
        sqlx::query_as(
            "SELECT to_regclass('orders') IS NOT NULL,
                    EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass('orders')
                            AND attname = 'decided_by' AND NOT attisdropped),
                    EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass('inventory')
                            AND attname = 'received' AND NOT attisdropped),
                    to_regclass('schema_epochs') IS NOT NULL",
        )
        .fetch_one(&mut *conn)
        .await
        .context("cannot read the schema")?;
    if !has_orders {
        bail!(
            "the database has no orders table: is DATABASE_URL the service's database? \
             If it is new, run the service once to migrate it"
        );
    }
    let mut missing = Vec::new();
    if !has_decided_by {
        missing.push("orders.decided_by");
    }
    if !has_received {
        missing.push("inventory.received");
    }
    if !has_epochs {
        missing.push("schema_epochs");
    }
    if !missing.is_empty() {
        bail!(
            "the database lacks {} (migrations 20261124000003_stock_received and 20261124000004_decided_by): \
             run the service once to migrate it; reconcile does not change the database",
            missing.join(", ")
        );
    }
    sqlx::query_scalar("SELECT at FROM schema_epochs WHERE name = 'orders.decided_by'")
        .fetch_optional(&mut *conn)
        .await
        .context("cannot read schema_epochs")?
        .context("schema_epochs has no row for orders.decided_by: the migration did not finish")
}

impl Report {
    /// Every check, in the order printed.
    pub fn checks(&self) -> Vec<Check> {
        let pending_after = human(self.pending_after);
        let window = human(self.dedup_window);
        let mut checks = Vec::with_capacity(7);

        checks.push(Check {
            name: "pending orders",
            ok: self.pending_stuck == 0,
            summary: format!(
                "{} of {} orders pending, {} for longer than {pending_after}",
                self.pending, self.orders, self.pending_stuck
            ),
            details: self
                .oldest_stuck
                .iter()
                .map(|(id, age)| format!("order {id} pending for {}", human(*age)))
                .collect(),
        });

        let before = if self.decided_before_tracking > 0 {
            format!(
                "; {} decided before decided_by existed ({}), not checked",
                self.decided_before_tracking,
                self.decided_by_since.format("%Y-%m-%d %H:%M:%S UTC")
            )
        } else {
            String::new()
        };
        checks.push(Check {
            name: "decided orders",
            ok: self.decided_without_message == 0,
            summary: format!(
                "{} decided, {} without the message that decided them{before}",
                self.decided, self.decided_without_message
            ),
            details: self
                .without_message_examples
                .iter()
                .map(|id| format!("order {id} is decided but names no message"))
                .collect(),
        });

        checks.push(Check {
            name: "processed messages",
            ok: self.message_missing == 0,
            summary: format!(
                "{} decided within {window}, {} whose message is not in processed_messages \
                 of consumer {:?}",
                self.decided_within_window, self.message_missing, self.consumer
            ),
            details: self
                .message_missing_examples
                .iter()
                .map(|(order, message)| format!("order {order}: message {message} not recorded"))
                .collect(),
        });

        checks.push(Check {
            name: "stock",
            ok: self.skus_off.is_empty(),
            summary: format!(
                "{} SKUs, {} where available <> received - completed lines",
                self.skus,
                self.skus_off.len()
            ),
            details: self
                .skus_off
                .iter()
                .map(|off| {
                    format!(
                        "{}: available {}, expected {} ({:+})",
                        off.sku,
                        off.available,
                        off.expected,
                        off.difference()
                    )
                })
                .collect(),
        });

        checks.push(Check {
            name: "order lines",
            ok: self.lines_without_order == 0 && self.lines_unknown_sku == 0,
            summary: format!(
                "{} lines, {} without their order, {} naming a SKU not in the catalogue",
                self.lines, self.lines_without_order, self.lines_unknown_sku
            ),
            details: self
                .lines_off_examples
                .iter()
                .map(|(order, sku, no_order, no_sku)| {
                    let why = match (no_order, no_sku) {
                        (true, true) => "no such order, and the SKU is not in the catalogue",
                        (true, false) => "no such order",
                        _ => "the SKU is not in the catalogue",
                    };
                    format!("the line of order {order} for {sku:?}: {why}")
                })
                .collect(),
        });

        let oldest = self
            .outbox_oldest_pending
            .map(|age| format!(" (oldest {})", human(age)))
            .unwrap_or_default();
        checks.push(Check {
            name: "outbox",
            ok: self.outbox_dead == 0 && self.outbox_pending_overdue == 0,
            summary: format!(
                "{} pending{oldest}, {} for longer than {pending_after}, {} dead",
                self.outbox_pending, self.outbox_pending_overdue, self.outbox_dead
            ),
            details: Vec::new(),
        });

        let wrong_answers = self.keys_wrong_answer_examples.iter().map(|(key, order, answered)| {
            let answered = answered.as_deref().unwrap_or("no id");
            format!(
                "key {key:?} names order {order}; its stored answer (order {answered}) \
                 differs from that order in status, id, customer or total"
            )
        });
        checks.push(Check {
            name: "idempotency keys",
            ok: self.keys_without_order == 0 && self.keys_wrong_answer == 0,
            summary: format!(
                "{} keys, {} naming a missing order, {} whose stored answer is not their order's",
                self.keys, self.keys_without_order, self.keys_wrong_answer
            ),
            details: self
                .keys_without_order_examples
                .iter()
                .map(|(key, order)| {
                    format!("key {key:?} names order {order}, which does not exist")
                })
                .chain(wrong_answers)
                .collect(),
        });

        checks.push(Check {
            name: "cancels",
            ok: self.cancels_stuck == 0,
            summary: format!(
                "{} accepted, {} not CANCELLED after {pending_after}",
                self.cancels, self.cancels_stuck
            ),
            details: self
                .cancels_stuck_examples
                .iter()
                .map(|(order, status)| format!("order {order} is {status}, its cancel not applied"))
                .collect(),
        });

        checks.push(Check {
            name: "event order",
            ok: self.cancels_out_of_order == 0,
            summary: format!(
                "{} cancels applied, {} before their order's OrderPlaced",
                self.cancels_applied, self.cancels_out_of_order
            ),
            details: self
                .cancels_out_of_order_examples
                .iter()
                .map(|order| {
                    format!(
                        "order {order} was cancelled while PENDING: its OrderPlaced did not \
                         come within the consumer's OUT_OF_ORDER_WAIT (dead-lettered?)"
                    )
                })
                .collect(),
        });
        checks
    }

    /// How many checks failed.
    pub fn failures(&self) -> usize {
        self.checks().iter().filter(|check| !check.ok).count()
    }

    pub fn ok(&self) -> bool {
        self.failures() == 0
    }

    /// The report as lines of text: one per check (`ok`/`FAIL` and figures,
    /// examples indented under a failure), then `reconcile: ok` or
    /// `reconcile: FAILED (n checks)`.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let checks = self.checks();
        for check in &checks {
            let verdict = if check.ok { "ok" } else { "FAIL" };
            out.push_str(&format!("{:<19} {verdict:<4} {}\n", check.name, check.summary));
            for detail in &check.details {
                out.push_str(&format!("{:<24} {detail}\n", ""));
            }
        }
        match checks.iter().filter(|check| !check.ok).count() {
            0 => out.push_str("reconcile: ok\n"),
            1 => out.push_str("reconcile: FAILED (1 check)\n"),
            n => out.push_str(&format!("reconcile: FAILED ({n} checks)\n")),
        }
        out
    }

    /// The report as one JSON object, for scripts: every figure, and each
    /// check's verdict.
    pub fn json(&self) -> Value {
        let checks = self.checks();
        json!({
            "ok": checks.iter().all(|check| check.ok),
            "failed_checks": checks.iter().filter(|check| !check.ok).count(),
            "checks": checks.iter().map(|check| json!({
                "name": check.name,
                "ok": check.ok,
                "summary": check.summary,
                "details": check.details,
            })).collect::<Vec<_>>(),
            "consumer": self.consumer,
            "pending_after_seconds": self.pending_after.as_secs_f64(),
            "dedup_window_seconds": self.dedup_window.as_secs_f64(),
            "decided_by_since": self.decided_by_since,
            "elapsed_seconds": self.elapsed.as_secs_f64(),
            "orders": self.orders,
            "pending": self.pending,
            "pending_stuck": self.pending_stuck,
            "pending_stuck_oldest": self.oldest_stuck.iter().map(|(id, age)| json!({
                "id": id,
                "age_seconds": age.as_secs_f64(),
            })).collect::<Vec<_>>(),
            "decided": self.decided,
            "decided_without_message": self.decided_without_message,
            "decided_before_tracking": self.decided_before_tracking,
            "decided_within_window": self.decided_within_window,
            "message_missing": self.message_missing,
            "skus": self.skus,
            "skus_off": self.skus_off.iter().map(|off| json!({
                "sku": off.sku,
                "available": off.available,
                "expected": off.expected,
                "difference": off.difference(),
            })).collect::<Vec<_>>(),
            "lines": self.lines,
            "lines_without_order": self.lines_without_order,
            "lines_unknown_sku": self.lines_unknown_sku,
            "outbox_pending": self.outbox_pending,
            "outbox_pending_overdue": self.outbox_pending_overdue,
            "outbox_oldest_pending_seconds": self.outbox_oldest_pending.map(|age| age.as_secs_f64()),
            "outbox_dead": self.outbox_dead,
            "keys": self.keys,
            "keys_without_order": self.keys_without_order,
            "keys_wrong_answer": self.keys_wrong_answer,
            "cancels": self.cancels,
            "cancels_stuck": self.cancels_stuck,
            "cancels_applied": self.cancels_applied,
            "cancels_out_of_order": self.cancels_out_of_order,
        })
    }
}

/// Whole seconds, for durations from the database (never negative here, but
/// clocks are clocks).
fn seconds(value: f64) -> Duration {
    Duration::from_secs_f64(value.max(0.0).round())
}

/// `7d`, `1h 5m`, `30s`: whole seconds, in the units the flags take.
fn human(duration: Duration) -> String {
    let mut left = duration.as_secs();
    let mut parts = Vec::new();
    for (unit, seconds) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if left >= seconds {
            parts.push(format!("{}{unit}", left / seconds));
            left %= seconds;
        }
    }
    if parts.is_empty() { "0s".to_owned() } else { parts.join(" ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_the_flags() {
        let human = |seconds| human(Duration::from_secs(seconds));
        assert_eq!(human(0), "0s");
        assert_eq!(human(60), "1m");
        assert_eq!(human(65), "1m 5s");
        assert_eq!(human(7 * 86_400), "7d");
        assert_eq!(human(86_400 + 3_600 + 1), "1d 1h 1s");
    }
}
