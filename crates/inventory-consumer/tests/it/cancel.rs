//! `OrderCancelled`: the stock a COMPLETED order took comes back, exactly once,
//! in the transaction that marks it CANCELLED; a cancel applied before its
//! order's `OrderPlaced` (two consumers can receive one order's events at once)
//! cancels it with nothing to give back, and the `OrderPlaced` is then no-op.
//! And the whole system: orders placed and cancelled over HTTP end CANCELLED
//! with the stock where it started, and the database reconciles.

use std::time::Duration;

use clap::Parser;
use inventory_consumer::apply::{Outcome, apply_batch};
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

async fn reconciles(db: &PgPool) {
    let config = order_service::Config::parse_from(["order-service", "reconcile"]);
    let Some(Command::Reconcile(args)) = config.command else { unreachable!("a reconcile") };
    let mut conn = db.acquire().await.expect("connection");
    let report = reconcile::check(&mut conn, &args).await.expect("reconcile runs");
    assert!(report.ok(), "{}", report.text());
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
async fn placed_and_cancelled_in_one_batch_or_cancelled_first_end_the_same(db: PgPool) {
    let before = available(&db, "SKU-004").await;
    let messages = insert_orders(&db, &[vec![("SKU-004", 2)], vec![("SKU-004", 3)]]).await;
    let (one, two) = (&messages[0], &messages[1]);

    // One batch: placed (stock taken), then cancelled (given back).
    let outcomes = apply(&db, &[one.clone(), cancel_of(one)]).await;
    assert_eq!(outcomes, [Outcome::Completed, Outcome::Cancelled]);
    // The cancel first: nothing taken, nothing to give back; the OrderPlaced
    // that arrives after it has no effect.
    assert_eq!(apply(&db, &[cancel_of(two)]).await, [Outcome::Cancelled]);
    assert_eq!(apply(&db, std::slice::from_ref(two)).await, [Outcome::AlreadyDecided]);

    for message in &messages {
        assert_eq!(order_status(&db, message.event.order_id()).await, "CANCELLED");
    }
    assert_eq!(available(&db, "SKU-004").await, before);
    reconciles(&db).await;
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
