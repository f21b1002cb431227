//! `order-service reconcile` against a real database: a healthy one passes, and
//! each kind of loss, injected on its own, fails its check (and only it).
//!
//! Orders are placed through the API (relay off) and decided by [`decide`],
//! which does what the consumer does in one transaction. The consumer itself
//! lives in another crate; its own tests (inventory-consumer `tests/it/
//! reconcile.rs`) run its real apply path, and the whole system, and check that
//! what it leaves passes `reconcile`. Here the point is the checker, so states
//! are made directly.

use std::process::Output;

use clap::Parser;
use order_service::reconcile::{self, Report, SkuOff};
use order_service::{Command, Config, ReconcileArgs};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestApp, spawn_app};

/// The arguments of `order-service reconcile <extra>`.
fn args(extra: &[&str]) -> ReconcileArgs {
    let config = Config::parse_from(["order-service", "reconcile"].iter().chain(extra));
    match config.command {
        Some(Command::Reconcile(args)) => args,
        other => panic!("not reconcile: {other:?}"),
    }
}

async fn check_with(db: &PgPool, extra: &[&str]) -> Report {
    let mut conn = db.acquire().await.expect("connection");
    reconcile::check(&mut conn, &args(extra)).await.expect("reconcile runs")
}

async fn check(db: &PgPool) -> Report {
    check_with(db, &[]).await
}

/// The names of the checks that failed.
fn failed(report: &Report) -> Vec<&'static str> {
    report.checks().into_iter().filter(|check| !check.ok).map(|check| check.name).collect()
}

/// What the consumer does with the OrderPlaced event of every PENDING order
/// but `except`, each in a transaction of its own: record the message id (the
/// outbox id) in processed_messages, take the stock of every line or none,
/// decide the order naming the message. The relay's part is mimicked too: the
/// event leaves the outbox.
async fn decide(db: &PgPool, except: &[Uuid]) {
    let events: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT e.id, o.id FROM outbox AS e JOIN orders AS o ON o.id::text = e.aggregate_id
         WHERE o.status = 'PENDING' AND NOT o.id = ANY($1) ORDER BY e.id",
    )
    .bind(except)
    .fetch_all(db)
    .await
    .expect("events");
    for (message_id, order_id) in events {
        let mut tx = db.begin().await.expect("begin");
        sqlx::query("DELETE FROM outbox WHERE id = $1")
            .bind(message_id)
            .execute(&mut *tx)
            .await
            .expect("relayed");
        sqlx::query(
            "INSERT INTO processed_messages (consumer, message_id) VALUES ('inventory', $1)",
        )
        .bind(message_id)
        .execute(&mut *tx)
        .await
        .expect("recorded");
        let in_stock: bool = sqlx::query_scalar(
            "SELECT bool_and(i.available >= l.quantity) FROM order_lines AS l
             JOIN inventory AS i USING (sku) WHERE l.order_id = $1",
        )
        .bind(order_id)
        .fetch_one(&mut *tx)
        .await
        .expect("stock");
        if in_stock {
            sqlx::query(
                "UPDATE inventory AS i SET available = i.available - l.quantity
                 FROM order_lines AS l WHERE l.order_id = $1 AND l.sku = i.sku",
            )
            .bind(order_id)
            .execute(&mut *tx)
            .await
            .expect("stock taken");
        }
        sqlx::query(
            "UPDATE orders SET status = $2, decided_by = $3, updated_at = now() WHERE id = $1",
        )
        .bind(order_id)
        .bind(if in_stock { "COMPLETED" } else { "REJECTED" })
        .bind(message_id)
        .execute(&mut *tx)
        .await
        .expect("decided");
        tx.commit().await.expect("commit");
    }
}

async fn place(app: &TestApp, key: Option<&str>, items: Value) -> Uuid {
    let body = json!({"customer_id": "reconcile", "items": items});
    let response = match key {
        Some(key) => app.post_order_with_key(key, &body).await,
        None => app.post_order(&body).await,
    };
    assert_eq!(response.status(), 201);
    let order: Value = response.json().await.expect("json");
    order["id"].as_str().expect("id").parse().expect("uuid")
}

/// A healthy system: orders decided COMPLETED (one placed with an
/// Idempotency-Key), one REJECTED for want of stock, and `young`, placed with
/// a key and still PENDING (its event in the outbox), as a live system has.
struct Healthy {
    app: TestApp,
    completed: Uuid,
    rejected: Uuid,
    young: Uuid,
}

async fn healthy(db: PgPool) -> Healthy {
    let app = spawn_app(db).await;
    let completed = place(&app, None, json!([{"sku": "SKU-001", "quantity": 2}])).await;
    place(
        &app,
        Some("key-1"),
        json!([{"sku": "SKU-001", "quantity": 1}, {"sku": "SKU-002", "quantity": 3}]),
    )
    .await;
    // SKU-021 starts with 25: the first takes 20, the second finds 5.
    place(&app, None, json!([{"sku": "SKU-021", "quantity": 20}])).await;
    let rejected = place(&app, None, json!([{"sku": "SKU-021", "quantity": 10}])).await;
    let young = place(&app, Some("key-2"), json!([{"sku": "SKU-003", "quantity": 1}])).await;
    decide(&app.db, &[young]).await;
    Healthy { app, completed, rejected, young }
}

async fn execute(db: &PgPool, sql: &str, id: Uuid) {
    sqlx::query(sql).bind(id).execute(db).await.expect(sql);
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_healthy_database_passes_every_check(db: PgPool) {
    let state = healthy(db).await;
    let db = &state.app.db;
    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
        .bind(state.rejected)
        .fetch_one(db)
        .await
        .expect("status");
    assert_eq!(status, "REJECTED", "one order found its stock short");

    let report = check(db).await;

    let text = report.text();
    assert!(report.ok(), "{text}");
    assert_eq!(report.orders, 5, "{text}");
    assert_eq!((report.pending, report.pending_stuck), (1, 0), "{text}");
    assert_eq!(report.decided, 4, "{text}");
    assert_eq!(report.decided_within_window, 4, "{text}");
    assert_eq!(report.decided_before_tracking, 0, "{text}");
    assert_eq!(report.skus, 25, "{text}");
    assert_eq!(report.outbox_pending, 1, "the young order's event: {text}");
    assert_eq!(report.outbox_dead, 0, "{text}");
    assert_eq!(report.keys, 2, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 10, "one line per check and the verdict: {text}");
    assert!(
        lines[..9].iter().all(|line| line.split_whitespace().any(|word| word == "ok")),
        "{text}"
    );
    assert_eq!(lines[9], "reconcile: ok");

    let json = report.json();
    assert_eq!(json["ok"], true, "{json}");
    assert_eq!(json["failed_checks"], 0, "{json}");
    for count in [
        "pending_stuck",
        "decided_without_message",
        "message_missing",
        "outbox_dead",
        "keys_without_order",
        "lines_without_order",
        "lines_unknown_sku",
    ] {
        assert_eq!(json[count], 0, "{count}: {json}");
    }
    assert_eq!(json["outbox_pending"], 1, "{json}");
    assert_eq!(json["skus_off"], json!([]), "{json}");
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn an_order_pending_too_long_fails_with_its_id_and_age(db: PgPool) {
    let state = healthy(db).await;
    let db = &state.app.db;
    execute(
        db,
        "UPDATE orders SET created_at = now() - interval '5 minutes' WHERE id = $1",
        state.young,
    )
    .await;
    // Its event was relayed (it left the outbox) but never applied: the loss
    // this check exists for.
    execute(db, "DELETE FROM outbox WHERE aggregate_id = $1::text", state.young).await;

    let report = check(db).await;

    assert_eq!(failed(&report), ["pending orders"], "{}", report.text());
    assert_eq!(report.pending_stuck, 1);
    let [(id, age)] = report.oldest_stuck[..] else { panic!("{:?}", report.oldest_stuck) };
    assert_eq!(id, state.young);
    assert!((299..=310).contains(&age.as_secs()), "age {age:?}");
    let text = report.text();
    assert!(text.contains(&format!("order {} pending for 5m", state.young)), "{text}");
    assert!(text.ends_with("reconcile: FAILED (1 check)\n"), "{text}");
    assert_eq!(report.json()["pending_stuck"], 1);

    // A longer threshold tolerates it.
    assert!(check_with(db, &["--pending-after", "10m"]).await.ok());
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_decision_that_names_no_message_fails(db: PgPool) {
    let state = healthy(db).await;
    let db = &state.app.db;
    execute(db, "UPDATE orders SET decided_by = NULL WHERE id = $1", state.completed).await;

    let report = check(db).await;

    assert_eq!(failed(&report), ["decided orders"], "{}", report.text());
    assert_eq!(report.decided_without_message, 1);
    assert_eq!(report.without_message_examples, [state.completed]);
    assert_eq!(report.json()["decided_without_message"], 1);
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn orders_decided_before_decided_by_existed_are_counted_apart(db: PgPool) {
    let state = healthy(db).await;
    let db = &state.app.db;
    // As an upgraded database has them: decided by an older consumer, before
    // the migration that added the column.
    execute(
        db,
        "UPDATE orders SET decided_by = NULL, updated_at = (
             SELECT at - interval '1 hour' FROM schema_epochs WHERE name = 'orders.decided_by')
         WHERE id = $1",
        state.completed,
    )
    .await;

    let report = check(db).await;

    let text = report.text();
    assert!(report.ok(), "{text}");
    assert_eq!(report.decided_before_tracking, 1);
    assert_eq!(report.decided_without_message, 0);
    assert!(text.contains("1 decided before decided_by existed"), "{text}");
    assert!(text.contains("not checked"), "{text}");
    assert_eq!(report.json()["decided_before_tracking"], 1);
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_message_missing_within_the_dedup_window_fails(db: PgPool) {
    let state = healthy(db).await;
    let db = &state.app.db;
    let message: Uuid = sqlx::query_scalar("SELECT decided_by FROM orders WHERE id = $1")
        .bind(state.rejected)
        .fetch_one(db)
        .await
        .expect("decided_by");
    execute(db, "DELETE FROM processed_messages WHERE message_id = $1", message).await;

    let report = check(db).await;

    assert_eq!(failed(&report), ["processed messages"], "{}", report.text());
    assert_eq!(report.message_missing, 1);
    assert_eq!(report.message_missing_examples, [(state.rejected, message)]);
    assert_eq!(report.json()["message_missing"], 1);

    // Past the window its id is swept, as the consumer's sweeper does: no failure.
    execute(
        db,
        "UPDATE orders SET updated_at = now() - interval '8 days' WHERE id = $1",
        state.rejected,
    )
    .await;
    let report = check(db).await;
    assert!(report.ok(), "{}", report.text());
    assert_eq!(report.decided_within_window, 3);
    // A shorter window than the consumer's would hide losses; a wrong consumer
    // name finds none of the messages.
    let report = check_with(db, &["--consumer", "someone-else"]).await;
    assert_eq!(report.message_missing, 3, "{}", report.text());
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn stock_that_is_off_names_each_sku_and_the_difference(db: PgPool) {
    let state = healthy(db).await;
    let db = &state.app.db;
    sqlx::query("UPDATE inventory SET available = available - 3 WHERE sku = 'SKU-002'")
        .execute(db)
        .await
        .expect("stock lost");
    sqlx::query("UPDATE inventory SET available = available + 2 WHERE sku = 'SKU-010'")
        .execute(db)
        .await
        .expect("stock found");

    let report = check(db).await;

    assert_eq!(failed(&report), ["stock"], "{}", report.text());
    let [two, ten] = &report.skus_off[..] else { panic!("{:?}", report.skus_off) };
    assert_eq!((two.sku.as_str(), two.difference()), ("SKU-002", -3));
    assert_eq!((ten.sku.as_str(), ten.difference()), ("SKU-010", 2));
    assert_eq!(
        *two,
        SkuOff { sku: "SKU-002".into(), available: 1_000_000 - 6, expected: 1_000_000 - 3 }
    );
    let text = report.text();
    assert!(text.contains("SKU-002: available 999994, expected 999997 (-3)"), "{text}");
    assert!(text.contains("SKU-010: available 1000002, expected 1000000 (+2)"), "{text}");
    assert_eq!(
        report.json()["skus_off"],
        json!([
            {"sku": "SKU-002", "available": 999_994, "expected": 999_997, "difference": -3},
            {"sku": "SKU-010", "available": 1_000_002, "expected": 1_000_000, "difference": 2},
        ])
    );
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_dead_outbox_event_fails(db: PgPool) {
    let state = healthy(db).await;
    let db = &state.app.db;
    execute(db, "UPDATE outbox SET state = 'dead' WHERE aggregate_id = $1::text", state.young)
        .await;

    let report = check(db).await;

    assert_eq!(failed(&report), ["outbox"], "{}", report.text());
    assert_eq!((report.outbox_pending, report.outbox_dead), (0, 1));
    assert_eq!(report.json()["outbox_dead"], 1);
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn an_outbox_event_pending_too_long_fails(db: PgPool) {
    let state = healthy(db).await;
    let db = &state.app.db;
    execute(
        db,
        "UPDATE outbox SET created_at = now() - interval '2 minutes' WHERE aggregate_id = $1::text",
        state.young,
    )
    .await;

    let report = check(db).await;

    assert_eq!(failed(&report), ["outbox"], "{}", report.text());
    assert_eq!((report.outbox_pending, report.outbox_pending_overdue), (1, 1));
    assert!(report.text().contains("1 pending (oldest 2m"), "{}", report.text());
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn an_order_line_without_its_order_or_its_sku_fails(db: PgPool) {
    let state = healthy(db).await;
    let db = &state.app.db;
    let report = check(db).await;
    assert!(report.ok(), "{}", report.text());
    assert_eq!((report.lines, report.lines_without_order, report.lines_unknown_sku), (6, 0, 0));

    // No foreign key stops either (the write checks both), so a bug or a
    // hand-made row could leave them; reconcile finds them.
    let ghost = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO order_lines (order_id, sku, quantity, unit_price_cents)
         VALUES ($1, 'SKU-001', 1, 100), ($2, 'SKU-999', 1, 100)",
    )
    .bind(ghost)
    .bind(state.young)
    .execute(db)
    .await
    .expect("lines");

    let report = check(db).await;

    assert_eq!(failed(&report), ["order lines"], "{}", report.text());
    assert_eq!((report.lines, report.lines_without_order, report.lines_unknown_sku), (8, 1, 1));
    let mut expected = vec![
        (ghost, "SKU-001".to_owned(), true, false),
        (state.young, "SKU-999".to_owned(), false, true),
    ];
    expected.sort();
    assert_eq!(report.lines_off_examples, expected);
    let text = report.text();
    assert!(text.contains("8 lines, 1 without their order, 1 naming a SKU not in the catalogue"));
    assert!(
        text.contains(&format!("the line of order {ghost} for \"SKU-001\": no such order")),
        "{text}"
    );
    let young = state.young;
    assert!(
        text.contains(&format!(
            "the line of order {young} for \"SKU-999\": the SKU is not in the catalogue"
        )),
        "{text}"
    );
    let json = report.json();
    assert_eq!(
        (json["lines_without_order"].clone(), json["lines_unknown_sku"].clone()),
        (json!(1), json!(1))
    );
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn catalogue_rows_are_never_deleted_and_an_order_takes_its_lines_with_it(db: PgPool) {
    let state = healthy(db).await;
    let db = &state.app.db;
    for statement in [
        "DELETE FROM inventory WHERE sku = 'SKU-025'",
        "UPDATE inventory SET sku = 'SKU-925' WHERE sku = 'SKU-025'",
        "TRUNCATE inventory CASCADE",
    ] {
        let error = sqlx::query(statement).execute(db).await.expect_err(statement);
        let error = error.as_database_error().expect("a database error");
        assert_eq!(error.code().as_deref(), Some("23001"), "{statement}: {error}");
        assert!(error.message().contains("inventory rows are never"), "{error}");
    }
    // A restock or a price change is an update like any other, and so is one
    // that sets the sku to itself (an ORM writing every column).
    sqlx::query(
        "UPDATE inventory SET available = 0, price_cents = 1, sku = sku WHERE sku = 'SKU-025'",
    )
    .execute(db)
    .await
    .expect("an update that keeps the sku");

    let lines = |order: Uuid| {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM order_lines WHERE order_id = $1")
            .bind(order)
            .fetch_one(db)
    };
    assert_eq!(lines(state.completed).await.expect("lines"), 1);
    sqlx::query("DELETE FROM orders WHERE id = ANY($1)")
        .bind([state.completed, state.rejected])
        .execute(db)
        .await
        .expect("orders deleted");
    assert_eq!(lines(state.completed).await.expect("lines"), 0);
    assert_eq!(lines(state.rejected).await.expect("lines"), 0);
    assert_eq!(lines(state.young).await.expect("lines"), 1, "other orders keep their lines");

    // TRUNCATE orders CASCADE (the other foreign keys refuse it without)
    // takes every line with it.
    sqlx::query("TRUNCATE orders CASCADE").execute(db).await.expect("truncated");
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM order_lines").fetch_one(db).await.expect("lines");
    assert_eq!(left, 0);
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_key_whose_order_is_gone_fails(db: PgPool) {
    let state = healthy(db).await;
    let db = &state.app.db;
    // With constraints enforced it cannot happen: deleting an order deletes its
    // key (ON DELETE CASCADE), and a key cannot name an order that never was.
    let mut tx = db.begin().await.expect("begin");
    execute_in(&mut tx, "DELETE FROM orders WHERE id = $1", state.young).await;
    let keys: Vec<String> = sqlx::query_scalar("SELECT idempotency_key FROM idempotency_keys")
        .fetch_all(&mut *tx)
        .await
        .expect("keys");
    assert_eq!(keys, ["key-1"], "key-2 went with its order");
    tx.rollback().await.expect("rollback");
    let refused = sqlx::query(
        "INSERT INTO idempotency_keys (idempotency_key, request, order_id, response_status,
                                       response_body)
         VALUES ('ghost', '{}', $1, 201, '{}')",
    )
    .bind(Uuid::now_v7())
    .execute(db)
    .await;
    assert!(refused.is_err(), "the foreign key refuses a key without its order");

    // It happens when foreign keys are not enforced: a restore or a logical
    // replica applying rows with session_replication_role = replica. The
    // young order (with key-2) goes without its key.
    let mut tx = db.begin().await.expect("begin");
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .expect("replica role");
    execute_in(&mut tx, "DELETE FROM outbox WHERE aggregate_id = $1::text", state.young).await;
    execute_in(&mut tx, "DELETE FROM orders WHERE id = $1", state.young).await;
    execute_in(&mut tx, "DELETE FROM order_lines WHERE order_id = $1", state.young).await;
    tx.commit().await.expect("commit");

    let report = check(db).await;

    assert_eq!(failed(&report), ["idempotency keys"], "{}", report.text());
    assert_eq!(report.keys_without_order, 1);
    assert_eq!(report.keys_without_order_examples, [("key-2".to_owned(), state.young)]);
    assert_eq!(report.json()["keys_without_order"], 1);
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_stored_answer_that_is_not_its_orders_fails(db: PgPool) {
    let state = healthy(db).await;
    let db = &state.app.db;
    // As a writer whose batch arrays slipped out of step would leave them: each
    // key names its order, but a retry would be told of the other order.
    sqlx::query(
        "UPDATE idempotency_keys AS k SET response_body = other.response_body
         FROM idempotency_keys AS other
         WHERE k.idempotency_key <> other.idempotency_key",
    )
    .execute(db)
    .await
    .expect("swap");

    let report = check(db).await;

    assert_eq!(failed(&report), ["idempotency keys"], "{}", report.text());
    assert_eq!((report.keys_wrong_answer, report.keys_without_order), (2, 0));
    let young = state.young.to_string();
    assert!(
        report.keys_wrong_answer_examples.iter().any(|(key, order, answered)| {
            key == "key-2" && *order == state.young && answered.as_deref() != Some(young.as_str())
        }),
        "{:?}",
        report.keys_wrong_answer_examples
    );
    assert!(report.text().contains("whose stored answer is not their order's"));
    assert_eq!(report.json()["keys_wrong_answer"], 2);
}

/// What a batch of the real writer stores for its keys is what each retry must
/// be told: its own order's answer. The writer binds keys, orders and answers as
/// parallel arrays; this is the check that they stay in step.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_batch_of_the_writer_stores_each_key_with_its_own_orders_answer(db: PgPool) {
    use order_service::idempotency::IdempotencyKey;
    use order_service::orders::ValidLine;
    use order_service::writer::{NewOrder, WriteOptions, WriterMetrics, Written, write_batch};

    let orders: Vec<NewOrder> = (0..6u8)
        .map(|n| {
            let mut headers = axum::http::HeaderMap::new();
            headers.insert("idempotency-key", format!("batch-{n}").parse().expect("header"));
            let key = IdempotencyKey::from_headers(&headers).expect("valid").expect("present");
            NewOrder {
                customer_id: format!("customer-{n}"),
                lines: vec![ValidLine { sku: "SKU-001".to_owned(), quantity: 1 + i32::from(n) }],
                key: Some((key, json!({"n": n}))),
                trace: Default::default(),
            }
        })
        .collect();
    let metrics = WriterMetrics::register(&mut prometheus_client::registry::Registry::default());

    let results = write_batch(&db, &orders, WriteOptions::default(), &metrics).await;

    let placed: Vec<Uuid> = results
        .iter()
        .map(|result| match result {
            Ok(Written::Placed(order)) => order.id,
            other => panic!("placed: {other:?}"),
        })
        .collect();
    let report = check(&db).await;
    assert!(report.ok(), "{}", report.text());
    assert_eq!((report.keys, report.keys_wrong_answer), (6, 0), "{}", report.text());
    for (n, id) in placed.iter().enumerate() {
        let answered: (Uuid, String) = sqlx::query_as(
            "SELECT order_id, response_body->>'customer_id' FROM idempotency_keys
             WHERE idempotency_key = $1",
        )
        .bind(format!("batch-{n}"))
        .fetch_one(&db)
        .await
        .expect("key");
        assert_eq!(answered, (*id, format!("customer-{n}")));
    }
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_cancel_accepted_long_ago_and_not_applied_fails(db: PgPool) {
    let state = healthy(db).await;
    let db = &state.app.db;
    let response = state
        .app
        .client
        .post(format!("{}/orders/{}/cancel", state.app.address, state.completed))
        .header("idempotency-key", "cancel-key")
        .send()
        .await
        .expect("cancel");
    assert_eq!(response.status(), 202);
    let young = check(db).await;
    assert!(young.ok(), "a young cancel, and its key's 202, are no failure: {}", young.text());
    assert_eq!(young.keys, 3, "the cancel's key is checked too");
    execute(
        db,
        "UPDATE order_cancellations SET requested_at = now() - interval '5 minutes'
         WHERE order_id = $1",
        state.completed,
    )
    .await;

    let report = check(db).await;

    // Its event was never applied: the order is still COMPLETED, holding stock.
    assert_eq!(failed(&report), ["cancels"], "{}", report.text());
    assert_eq!((report.cancels, report.cancels_stuck), (1, 1));
    assert_eq!(report.cancels_stuck_examples, [(state.completed, "COMPLETED".to_owned())]);
    assert!(check_with(db, &["--pending-after", "10m"]).await.ok());
}

async fn execute_in(tx: &mut sqlx::PgConnection, sql: &str, id: Uuid) {
    sqlx::query(sql).bind(id).execute(tx).await.expect(sql);
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn several_failures_are_all_reported(db: PgPool) {
    let state = healthy(db).await;
    let db = &state.app.db;
    execute(db, "UPDATE orders SET decided_by = NULL WHERE id = $1", state.completed).await;
    execute(db, "UPDATE outbox SET state = 'dead' WHERE aggregate_id = $1::text", state.young)
        .await;

    let report = check(db).await;

    assert_eq!(failed(&report), ["decided orders", "outbox"]);
    assert!(report.text().ends_with("reconcile: FAILED (2 checks)\n"), "{}", report.text());
    assert_eq!(report.json()["failed_checks"], 2);
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_database_without_the_migration_is_not_checked(db: PgPool) {
    sqlx::query("ALTER TABLE inventory DROP COLUMN received").execute(&db).await.expect("drop");
    let mut conn = db.acquire().await.expect("connection");

    let error = reconcile::check(&mut conn, &args(&[])).await.expect_err("cannot check");

    let message = format!("{error:#}");
    assert!(message.contains("inventory.received"), "{message}");
    assert!(message.contains("run the service once to migrate"), "{message}");
}

/// Runs the `order-service` binary with `args` against the database at `url`.
async fn order_service(url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_order-service"))
        .args(args)
        .env("DATABASE_URL", url)
        // reconcile needs no broker: one that cannot be reached changes nothing.
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .env("DB_ACQUIRE_TIMEOUT_MS", "3000")
        .env_remove("DEDUP_WINDOW")
        .env_remove("CONSUMER_NAME")
        .env_remove("RECONCILE_PENDING_AFTER")
        .output()
        .await
        .expect("order-service runs")
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn the_command_exits_0_when_every_check_holds_1_when_one_fails_2_when_it_cannot_run(
    db: PgPool,
) {
    let state = healthy(db).await;
    let db = &state.app.db;
    let url = test_support::database_url_of(db).await;

    let run = order_service(&url, &["reconcile"]).await;
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(stdout.lines().last(), Some("reconcile: ok"), "{stdout}");

    let run = order_service(&url, &["reconcile", "--json"]).await;
    assert_eq!(run.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&run.stdout).expect("stdout is one JSON object");
    assert_eq!(report["ok"], true, "{report}");

    sqlx::query("UPDATE inventory SET available = available - 1 WHERE sku = 'SKU-001'")
        .execute(db)
        .await
        .expect("stock lost");
    let run = order_service(&url, &["reconcile"]).await;
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.lines().any(|line| line.starts_with("stock") && line.contains("FAIL")),
        "{stdout}"
    );
    assert_eq!(stdout.lines().last(), Some("reconcile: FAILED (1 check)"), "{stdout}");
    let run = order_service(&url, &["reconcile", "--json"]).await;
    assert_eq!(run.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&run.stdout).expect("stdout is one JSON object");
    assert_eq!(
        report["skus_off"],
        json!([{"sku": "SKU-001", "available": 999_996,
                                           "expected": 999_997, "difference": -1}])
    );

    // A database that does not exist is neither created nor migrated.
    let name = format!("reconcile_missing_{}", Uuid::new_v4().simple());
    let (server, _) = url.rsplit_once('/').expect("a database name");
    let run = order_service(&format!("{server}/{name}"), &["reconcile"]).await;
    assert_eq!(run.status.code(), Some(2), "{}", String::from_utf8_lossy(&run.stdout));
    let created: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(db)
            .await
            .expect("pg_database");
    assert!(!created);
    // Nothing listening.
    let run = order_service("postgres://postgres@127.0.0.1:1/outbox", &["reconcile"]).await;
    assert_eq!(run.status.code(), Some(2), "{}", String::from_utf8_lossy(&run.stdout));
}
