//! What the consumer leaves behind passes `order-service reconcile`: each order
//! it decides names the message that decided it (`orders.decided_by`), recorded
//! in processed_messages by the same transaction, and stock moves only with
//! COMPLETED orders. The checker's own tests (each violation detected) are in
//! order-service; these run the consumer's real code.

use std::time::Duration;

use clap::Parser;
use inventory_consumer::apply::{Outcome, apply_batch};
use inventory_consumer::message::Message;
use order_service::Command;
use order_service::reconcile::{self, Report};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestApi, TestBroker, TestConsumer, insert_orders};

async fn reconcile(db: &PgPool) -> Report {
    let config = order_service::Config::parse_from(["order-service", "reconcile"]);
    let Some(Command::Reconcile(args)) = config.command else { unreachable!("a reconcile") };
    let mut conn = db.acquire().await.expect("connection");
    reconcile::check(&mut conn, &args).await.expect("reconcile runs")
}

async fn decided_by(db: &PgPool, order_id: Uuid) -> Option<Uuid> {
    sqlx::query_scalar("SELECT decided_by FROM orders WHERE id = $1")
        .bind(order_id)
        .fetch_one(db)
        .await
        .expect("order exists")
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn applying_a_batch_names_the_deciding_message_on_each_order(db: PgPool) {
    // SKU-021 has 25: the second order finds 5 left and is rejected.
    let messages = insert_orders(
        &db,
        &[vec![("SKU-001", 2), ("SKU-002", 1)], vec![("SKU-021", 20)], vec![("SKU-021", 10)]],
    )
    .await;
    let mut tx = db.begin().await.expect("begin");
    let outcomes = apply_batch(&mut tx, "inventory", &messages).await.expect("apply");
    tx.commit().await.expect("commit");
    assert_eq!(outcomes, [Outcome::Completed, Outcome::Completed, Outcome::Rejected]);
    for message in &messages {
        assert_eq!(decided_by(&db, message.event.order_id()).await, Some(message.id));
    }

    // A redelivery, and another message for a decided order, leave it as it was.
    let again = Message { id: Uuid::now_v7(), event: messages[0].event.clone() };
    let mut tx = db.begin().await.expect("begin");
    let outcomes =
        apply_batch(&mut tx, "inventory", &[messages[0].clone(), again]).await.expect("apply");
    tx.commit().await.expect("commit");
    assert_eq!(outcomes, [Outcome::Duplicate, Outcome::AlreadyDecided]);
    assert_eq!(decided_by(&db, messages[0].event.order_id()).await, Some(messages[0].id));

    let report = reconcile(&db).await;
    assert!(report.ok(), "{}", report.text());
    assert_eq!((report.decided, report.decided_within_window), (3, 3));
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn the_running_system_leaves_a_database_that_reconciles(db: PgPool) {
    let broker = TestBroker::new().await;
    let config = &broker.config;
    let api = TestApi::spawn(&db, config, &[]).await;
    let consumer = TestConsumer::spawn(db.clone(), config, &[]).await;

    let client = reqwest::Client::new();
    let orders = 40;
    for i in 0..orders {
        // Every fifth order asks 4 of SKU-021 (25 in stock): some are rejected.
        let sku = if i % 5 == 0 { "SKU-021".to_owned() } else { format!("SKU-{:03}", 1 + i % 19) };
        let body = json!({
            "customer_id": format!("customer-{i}"),
            "items": [{"sku": sku, "quantity": 4}, {"sku": "SKU-020", "quantity": 1}],
        });
        let response =
            client.post(format!("{}/orders", api.address)).json(&body).send().await.expect("post");
        assert_eq!(response.status(), 201);
        let _: Value = response.json().await.expect("json");
    }
    consumer.wait_settled(orders, Duration::from_secs(20)).await;
    // The relay deletes an event after the broker's confirm: the consumer may
    // have applied it a moment before.
    let drained = test_support::eventually(Duration::from_secs(10), || async {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&db).await.expect("count");
        left == 0
    })
    .await;
    assert!(drained, "the outbox is drained");

    // While both still run: the snapshot sees whole decisions only.
    let report = reconcile(&db).await;

    assert!(report.ok(), "{}", report.text());
    let orders = i64::try_from(orders).expect("small");
    assert_eq!((report.orders, report.pending, report.decided), (orders, 0, orders));
    assert_eq!(report.decided_within_window, orders);
    assert_eq!((report.outbox_pending, report.outbox_dead), (0, 0));
    let rejected: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'REJECTED'")
        .fetch_one(&db)
        .await
        .expect("count");
    assert_eq!(rejected, 2, "25 of SKU-021 serve six orders of 4, not eight");

    consumer.stop().await;
    api.stop().await;
    broker.delete().await;
}

/// reconcile's "processed messages" check looks for the message of every order
/// decided within its `--dedup-window`; the consumer's sweeper deletes ids past
/// its `DEDUP_WINDOW`. With both at their defaults the sweeper, run for real,
/// keeps every id the check needs and only those: a sweeper that forgot ids
/// early (a shorter window, a wrong comparison) fails the check.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn the_consumers_sweeper_keeps_every_message_reconcile_looks_for(db: PgPool) {
    let config = inventory_consumer::Config::parse_command_line(["inventory-consumer"]);
    let messages = insert_orders(
        &db,
        &[vec![("SKU-001", 1)], vec![("SKU-002", 1)], vec![("SKU-003", 1)], vec![("SKU-004", 1)]],
    )
    .await;
    let mut tx = db.begin().await.expect("begin");
    apply_batch(&mut tx, &config.consumer_name, &messages).await.expect("apply");
    tx.commit().await.expect("commit");
    // Decided (and recorded, in the same transaction) at these ages: just
    // inside the window, well inside, just past it, long past it.
    let window = i64::try_from(config.dedup_window.as_secs()).expect("seconds");
    let ages = [window - 60, window / 2, window + 60, 2 * window];
    for (message, age) in messages.iter().zip(ages) {
        sqlx::query(
            "WITH aged AS (SELECT now() - $2 * interval '1 second' AS at)
             , recorded AS (UPDATE processed_messages SET processed_at = (SELECT at FROM aged)
                            WHERE message_id = $1)
             UPDATE orders SET updated_at = (SELECT at FROM aged) WHERE decided_by = $1",
        )
        .bind(message.id)
        .bind(age)
        .execute(&db)
        .await
        .expect("aged");
    }

    let metrics = outbox::retention::RetentionMetrics::default();
    let swept = outbox::retention::sweep(
        &db,
        &config.inbox_retention(),
        &metrics,
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("sweep");

    let report = reconcile(&db).await;
    assert!(report.ok(), "{}", report.text());
    assert_eq!(swept, outbox::retention::Sweep::Deleted(2), "the two past the window");
    assert_eq!((report.decided, report.decided_within_window), (4, 2), "{}", report.text());
}
