//! The whole system: orders posted to order-service, relayed by its outbox relay,
//! applied by the consumer.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestApi, TestBroker, TestConsumer};

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn orders_posted_to_the_api_all_reach_completed(db: PgPool) {
    let broker = TestBroker::new().await;
    let config = &broker.config;
    let api = TestApi::spawn(&db, config, &[]).await;
    let address = api.address.clone();
    let consumer = TestConsumer::spawn(db.clone(), config, &[]).await;

    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..50 {
        let body = json!({
            "customer_id": format!("customer-{i}"),
            "items": [{"sku": format!("SKU-{:03}", 1 + i % 20), "quantity": 1 + i % 3}],
        });
        let response =
            client.post(format!("{address}/orders")).json(&body).send().await.expect("post");
        assert_eq!(response.status(), 201);
        let order: Value = response.json().await.expect("json");
        ids.push(Uuid::parse_str(order["id"].as_str().expect("id")).expect("uuid"));
    }

    consumer.wait_settled(50, Duration::from_secs(20)).await;
    for id in &ids {
        let order: Value = client
            .get(format!("{address}/orders/{id}"))
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        assert_eq!(order["status"], "COMPLETED", "order {id}");
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&db).await.unwrap();
    assert_eq!(left, 0, "the outbox is drained");

    consumer.stop().await;
    api.stop().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_poison_event_written_by_hand_is_parked_and_the_orders_behind_it_complete(db: PgPool) {
    let broker = TestBroker::new().await;
    let config = &broker.config;
    let api = TestApi::spawn(&db, config, &[]).await;
    let consumer = TestConsumer::spawn(db.clone(), config, &[]).await;
    // An event type of 300 bytes: a routing key AMQP cannot carry. Written as a
    // library user's bug would be, just before the orders.
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
         VALUES (gen_random_uuid(), 'order', 'poison-1', repeat('x', 300), '{}')",
    )
    .execute(&db)
    .await
    .expect("the schema takes the row");
    let client = reqwest::Client::new();
    for i in 0..50 {
        let body =
            json!({"customer_id": format!("c-{i}"), "items": [{"sku": "SKU-003", "quantity": 1}]});
        let response =
            client.post(format!("{}/orders", api.address)).json(&body).send().await.expect("post");
        assert_eq!(response.status(), 201);
    }

    consumer.wait_settled(50, Duration::from_secs(30)).await;
    let (state, last_error): (String, Option<String>) =
        sqlx::query_as("SELECT state, last_error FROM outbox WHERE aggregate_id = 'poison-1'")
            .fetch_one(&db)
            .await
            .expect("the poison event is kept");
    assert_eq!(state, "dead");
    assert!(last_error.is_some_and(|error| error.contains("255")), "the reason names the limit");
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'PENDING'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(pending, 0, "every order behind it was decided");
    consumer.stop().await;
    api.stop_with_dead(1).await;
    broker.delete().await;
}
