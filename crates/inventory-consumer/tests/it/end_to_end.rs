//! The whole system: orders posted to order-service, relayed by its outbox relay,
//! applied by the consumer.

use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{TestBroker, TestConsumer};

#[sqlx::test(migrator = "common::MIGRATOR")]
async fn orders_posted_to_the_api_all_reach_completed(db: PgPool) {
    let broker = TestBroker::new().await;
    let config = &broker.config;
    let mut args = vec!["order-service".to_owned(), "--listen-addr".into(), "127.0.0.1:0".into()];
    args.extend(config.to_args());
    let api_config = order_service::Config::parse_from(args);
    let api = order_service::Application::build_with_pool(api_config, db.clone())
        .await
        .expect("order-service builds");
    let address = format!("http://127.0.0.1:{}", api.port());
    let shutdown = CancellationToken::new();
    let api_task = tokio::spawn(api.run_until_stopped(shutdown.clone()));
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
    shutdown.cancel();
    api_task.await.expect("api task").expect("order-service stops cleanly");
    broker.delete().await;
}
