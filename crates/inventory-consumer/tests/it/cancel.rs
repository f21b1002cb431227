//! `OrderCancelled`: the stock a COMPLETED order took comes back, exactly once,
//! in the transaction that marks it CANCELLED; a cancel that comes before its
//! order's `OrderPlaced` (two workers can receive one order's events at once)
//! waits for it, and only once its wait is over cancels the order with nothing
//! to give back, which reconcile reports as applied out of order.
//! And the whole system: orders placed and cancelled over HTTP end CANCELLED
//! with the stock where it started, and the database reconciles.

use std::collections::HashSet;
use std::time::Duration;

use clap::Parser;
use inventory_consumer::apply::{Outcome, apply_batch, apply_batch_waited};
use inventory_consumer::message::{Message, OrderEvent};
use order_events::OrderCancelled;
use order_service::Command;
use order_service::reconcile;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{
    TestApi, TestBroker, TestConsumer, available, count_with_status, insert_orders, order_status,
};

fn cancel_of(placed: &Message) -> Message {
    let OrderEvent::Placed(event) = &placed.event else { panic!("an OrderPlaced") };
    let cancel = OrderCancelled { order_id: event.order_id, lines: event.lines.clone() };
    Message { id: Uuid::now_v7(), event: cancel.into() }
}

async fn apply(db: &PgPool, messages: &[Message]) -> Vec<Outcome> {
    let mut tx = db.begin().await.expect("begin");
    let outcomes = apply_batch(&mut tx, "inventory", messages).await.expect("apply");
    tx.commit().await.expect("commit");
    outcomes
}

async fn reconcile_report(db: &PgPool) -> reconcile::Report {
    let config = order_service::Config::parse_from(["order-service", "reconcile"]);
    let Some(Command::Reconcile(args)) = config.command else { unreachable!("a reconcile") };
    let mut conn = db.acquire().await.expect("connection");
    reconcile::check(&mut conn, &args).await.expect("reconcile runs")
}

async fn reconciles(db: &PgPool) {
    let report = reconcile_report(db).await;
    assert!(report.ok(), "{}", report.text());
}

/// The status the order's cancel found (`orders.cancelled_from`).
async fn cancelled_from(db: &PgPool, placed: &Message) -> Option<String> {
    sqlx::query_scalar("SELECT cancelled_from FROM orders WHERE id = $1")
        .bind(placed.event.order_id())
        .fetch_one(db)
        .await
        .expect("order")
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_cancel_gives_back_what_the_order_took_once(db: PgPool) {
    let before = available(&db, "SKU-003").await;
    let [placed] = &insert_orders(&db, &[vec![("SKU-003", 4)]]).await[..] else { unreachable!() };
    assert_eq!(apply(&db, std::slice::from_ref(placed)).await, [Outcome::Completed]);
    assert_eq!(available(&db, "SKU-003").await, before - 4);

    let cancel = cancel_of(placed);
    let again = cancel_of(placed);
    let outcomes = apply(&db, &[cancel.clone(), cancel.clone(), again]).await;

    assert_eq!(outcomes, [Outcome::Cancelled, Outcome::Duplicate, Outcome::AlreadyDecided]);
    assert_eq!(order_status(&db, placed.event.order_id()).await, "CANCELLED");
    assert_eq!(available(&db, "SKU-003").await, before, "given back once");
    assert_eq!(apply(&db, &[cancel]).await, [Outcome::Duplicate], "a redelivery");
    assert_eq!(available(&db, "SKU-003").await, before);
    reconciles(&db).await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_cancel_before_its_orders_placed_waits_for_it(db: PgPool) {
    let before = available(&db, "SKU-004").await;
    let messages = insert_orders(&db, &[vec![("SKU-004", 2)], vec![("SKU-004", 3)]]).await;
    let (one, two) = (&messages[0], &messages[1]);

    // One batch: placed (stock taken), then cancelled (given back).
    let outcomes = apply(&db, &[one.clone(), cancel_of(one)]).await;
    assert_eq!(outcomes, [Outcome::Completed, Outcome::Cancelled]);
    assert_eq!(cancelled_from(&db, one).await.as_deref(), Some("COMPLETED"));

    // The cancel first: deferred, not recorded, no effect.
    let cancel = cancel_of(two);
    assert_eq!(apply(&db, std::slice::from_ref(&cancel)).await, [Outcome::Deferred]);
    assert_eq!(order_status(&db, two.event.order_id()).await, "PENDING");
    // Behind its OrderPlaced in one batch, it waits for it too, and then takes
    // effect when it comes again.
    let outcomes = apply(&db, &[cancel.clone(), two.clone()]).await;
    assert_eq!(outcomes, [Outcome::Deferred, Outcome::Completed]);
    assert_eq!(available(&db, "SKU-004").await, before - 3);
    assert_eq!(apply(&db, &[cancel]).await, [Outcome::Cancelled]);
    assert_eq!(cancelled_from(&db, two).await.as_deref(), Some("COMPLETED"));

    for message in &messages {
        assert_eq!(order_status(&db, message.event.order_id()).await, "CANCELLED");
    }
    assert_eq!(available(&db, "SKU-004").await, before);
    reconciles(&db).await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_cancel_whose_wait_is_over_is_applied_out_of_order_and_reconcile_says_so(db: PgPool) {
    let before = available(&db, "SKU-004").await;
    let [placed] = &insert_orders(&db, &[vec![("SKU-004", 2)]]).await[..] else { unreachable!() };
    let cancel = cancel_of(placed);

    // Its wait over, the cancel goes without its OrderPlaced: nothing to give
    // back, and the OrderPlaced that comes after it has no effect.
    let mut tx = db.begin().await.expect("begin");
    let waited_out = HashSet::from([cancel.id]);
    let outcomes =
        apply_batch_waited(&mut tx, "inventory", std::slice::from_ref(&cancel), &waited_out)
            .await
            .expect("apply");
    tx.commit().await.expect("commit");
    assert_eq!(outcomes, [Outcome::CancelledBeforePlaced]);
    assert_eq!(apply(&db, std::slice::from_ref(placed)).await, [Outcome::AlreadyDecided]);
    assert_eq!(order_status(&db, placed.event.order_id()).await, "CANCELLED");
    assert_eq!(cancelled_from(&db, placed).await.as_deref(), Some("PENDING"));
    assert_eq!(available(&db, "SKU-004").await, before, "no stock taken");

    let report = reconcile_report(&db).await;
    assert_eq!((report.cancels_applied, report.cancels_out_of_order), (1, 1));
    assert_eq!(report.cancels_out_of_order_examples, [placed.event.order_id()]);
    assert!(!report.ok(), "{}", report.text());
    assert!(report.text().contains("event order         FAIL 1 cancels applied, 1 before"));
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_consumer_holds_a_cancel_that_arrives_first_until_its_orders_placed_is_applied(
    db: PgPool,
) {
    let broker = TestBroker::new().await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;
    let before = available(&db, "SKU-006").await;
    let [placed] = &insert_orders(&db, &[vec![("SKU-006", 5)]]).await[..] else { unreachable!() };

    // The cancel arrives first (as when another worker still holds the
    // OrderPlaced); it is held, unacked, and has no effect meanwhile.
    broker.publish(&cancel_of(placed)).await;
    let held = test_support::eventually(Duration::from_secs(10), || async {
        consumer.metrics.count("deferred") >= 3
    })
    .await;
    assert!(held, "the cancel is tried again while it waits");
    assert_eq!(order_status(&db, placed.event.order_id()).await, "PENDING");
    assert_eq!(consumer.settled(), 0);

    broker.publish(placed).await;
    consumer.wait_settled(2, Duration::from_secs(10)).await;
    assert_eq!(order_status(&db, placed.event.order_id()).await, "CANCELLED");
    assert_eq!(cancelled_from(&db, placed).await.as_deref(), Some("COMPLETED"), "in order");
    assert_eq!(available(&db, "SKU-006").await, before, "the stock it took is back");
    assert_eq!(broker.ready_messages().await, 0);
    reconciles(&db).await;

    consumer.stop().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_cancel_whose_orders_placed_never_comes_is_applied_after_the_wait(db: PgPool) {
    let broker = TestBroker::new().await;
    let consumer =
        TestConsumer::spawn(db.clone(), &broker.config, &["--out-of-order-wait", "300ms"]).await;
    let [placed] = &insert_orders(&db, &[vec![("SKU-006", 5)]]).await[..] else { unreachable!() };

    broker.publish(&cancel_of(placed)).await;
    consumer.wait_settled(1, Duration::from_secs(10)).await;
    assert_eq!(consumer.metrics.count("cancelled_before_placed"), 1);
    assert_eq!(order_status(&db, placed.event.order_id()).await, "CANCELLED");
    assert_eq!(cancelled_from(&db, placed).await.as_deref(), Some("PENDING"));
    assert_eq!(broker.ready_messages().await, 0, "acked once applied");

    consumer.stop().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn orders_placed_and_cancelled_over_http_end_cancelled_with_their_stock_back(db: PgPool) {
    let broker = TestBroker::new().await;
    let config = &broker.config;
    let api = TestApi::spawn(&db, config, &["--relay-workers", "4"]).await;
    let consumer = TestConsumer::spawn(db.clone(), config, &["--concurrency", "2"]).await;
    let before = available(&db, "SKU-005").await;
    let client = reqwest::Client::new();

    let mut ids = Vec::new();
    for n in 0..30 {
        let body = json!({"customer_id": format!("c-{n}"),
                          "items": [{"sku": "SKU-005", "quantity": 1}]});
        let placed = client.post(format!("{}/orders", api.address)).json(&body).send().await;
        let placed: Value = placed.expect("post").json().await.expect("json");
        let id = placed["id"].as_str().expect("id").to_owned();
        // Cancelled at once, or after it was decided, for half of them.
        if n % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let cancelled = client
            .post(format!("{}/orders/{id}/cancel", api.address))
            .send()
            .await
            .expect("cancel");
        assert_eq!(cancelled.status(), 202);
        ids.push(id.parse::<Uuid>().expect("uuid"));
    }

    let all_cancelled = test_support::eventually(Duration::from_secs(30), || async {
        count_with_status(&db, &ids, "CANCELLED").await == 30
    })
    .await;
    assert!(all_cancelled, "every cancelled order ends CANCELLED");
    assert_eq!(available(&db, "SKU-005").await, before, "and its stock is back");
    consumer.wait_settled(60, Duration::from_secs(10)).await;
    reconciles(&db).await;

    consumer.stop().await;
    api.stop().await;
    broker.delete().await;
}
