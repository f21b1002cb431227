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
