//! The consumer's service-level metrics on `/metrics`: the end-to-end lag of each
//! applied event, and the depths of its queue and dead-letter queue, read from
//! the broker at scrape time (NaN, not a failed scrape, when it cannot answer).

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use inventory_consumer::metrics::{ConsumerMetrics, QueueDepthProbe};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use outbox::transport::CREATED_AT_HEADER;
use prometheus_client::registry::Registry;
use serde_json::json;
use sqlx::PgPool;
use test_support::{FaultProxy, eventually, sample};

use crate::helpers::{TestApi, TestBroker, TestConsumer, insert_orders, order_status};

const WITHIN: Duration = Duration::from_secs(10);

/// The consumer's `/metrics` text (the scrape must succeed).
async fn scrape(consumer: &TestConsumer) -> String {
    test_support::scrape(&consumer.address).await
}
fn created_at_header(seconds_ago: i64) -> FieldTable {
    let created = Utc::now() - chrono::TimeDelta::seconds(seconds_ago);
    let mut headers = FieldTable::default();
    headers.insert(
        CREATED_AT_HEADER.into(),
        AMQPValue::LongString(created.to_rfc3339_opts(SecondsFormat::Micros, true).into()),
    );
    headers
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn the_lag_of_each_applied_message_and_the_queue_depths_are_exposed(db: PgPool) {
    let broker = TestBroker::new().await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;
    // Three completed, one rejected (25 in stock), one duplicate, one poison.
    let orders = [
        vec![("SKU-013", 1)],
        vec![("SKU-013", 1)],
        vec![("SKU-013", 1)],
        vec![("SKU-021", 100)],
        vec![("SKU-013", 1)],
    ];
    let messages = insert_orders(&db, &orders).await;
    sqlx::query("DELETE FROM orders WHERE id = $1")
        .bind(messages[4].event.order_id())
        .execute(&db)
        .await
        .expect("delete");
    // Created two seconds ago (the relay's header, to the microsecond)...
    for message in &messages[..2] {
        broker
            .publish_with(message, BasicProperties::default().with_headers(created_at_header(2)))
            .await;
    }
    // ...or stamped by an older relay with the AMQP timestamp only (whole seconds).
    let stamped = u64::try_from(Utc::now().timestamp()).expect("after 1970") - 2;
    for message in &messages[2..] {
        broker.publish_with(message, BasicProperties::default().with_timestamp(stamped)).await;
    }
    broker
        .publish_with(&messages[0], BasicProperties::default().with_headers(created_at_header(2)))
        .await;
    consumer.wait_settled(6, WITHIN).await;

    let applied = consumer.metrics.count("completed") + consumer.metrics.count("rejected");
    assert_eq!((consumer.metrics.count("completed"), consumer.metrics.count("rejected")), (3, 1));
    assert_eq!(consumer.metrics.count("duplicate"), 1);
    assert_eq!(order_status(&db, messages[3].event.order_id()).await, "REJECTED");
    let metrics = scrape(&consumer).await;
    assert!(metrics.contains("# TYPE inventory_e2e_lag_seconds histogram"), "{metrics}");
    assert_eq!(
        sample(&metrics, "inventory_e2e_lag_seconds_count"),
        Some(applied as f64),
        "one observation per applied message, none for the duplicate or the poison:\n{metrics}"
    );
    let sum = sample(&metrics, "inventory_e2e_lag_seconds_sum").expect("a sum");
    assert!((2.0 * 4.0..60.0).contains(&sum), "each waited two seconds or more: {sum}");
    let under_a_second = sample(&metrics, r#"inventory_e2e_lag_seconds_bucket{le="1.0"}"#);
    assert_eq!(under_a_second, Some(0.0), "{metrics}");

    assert!(metrics.contains("# TYPE inventory_queue_depth_messages gauge"), "{metrics}");
    assert!(metrics.contains("# TYPE inventory_dlq_depth_messages gauge"), "{metrics}");
    assert_eq!(sample(&metrics, "inventory_queue_depth_messages"), Some(0.0), "{metrics}");
    let one_dead = eventually(WITHIN, || async {
        sample(&scrape(&consumer).await, "inventory_dlq_depth_messages") == Some(1.0)
    })
    .await;
    assert!(one_dead, "the poison message is counted in the dead-letter queue");

    // Messages waiting with no consumer are counted in the queue's depth.
    consumer.stop().await;
    broker.publish(&messages[0]).await;
    broker.publish(&messages[1]).await;
    let metrics = ConsumerMetrics::register(&mut Registry::default());
    let probe = QueueDepthProbe::new(&broker.config, "slo-test", metrics.clone());
    let two = eventually(WITHIN, || async {
        probe.refresh().await;
        metrics.queue_depth.get() == 2.0
    })
    .await;
    assert!(two, "two waiting: {}", metrics.queue_depth.get());
    assert_eq!(metrics.dlq_depth.get(), 1.0);
    probe.close().await;
    broker.delete().await;
}

/// The whole path: the relay stamps each message with its outbox row's
/// `created_at`, and the consumer measures from it.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn the_lag_is_measured_from_the_outbox_row_the_relay_published(db: PgPool) {
    let broker = TestBroker::new().await;
    let api = TestApi::spawn(&db, &broker.config, &[]).await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;
    let client = reqwest::Client::new();
    for i in 0..10 {
        let body = json!({
            "customer_id": format!("customer-{i}"),
            "items": [{"sku": "SKU-014", "quantity": 1}],
        });
        let response =
            client.post(format!("{}/orders", api.address)).json(&body).send().await.expect("post");
        assert_eq!(response.status(), 201);
    }
    consumer.wait_settled(10, WITHIN).await;

    let metrics = scrape(&consumer).await;
    assert_eq!(sample(&metrics, "inventory_e2e_lag_seconds_count"), Some(10.0), "{metrics}");
    let sum = sample(&metrics, "inventory_e2e_lag_seconds_sum").expect("a sum");
    assert!(sum > 0.0 && sum / 10.0 < 5.0, "milliseconds each, not seconds: {sum}");
    // Sub-second precision: whole-second timestamps would put most at 0 or 1 s.
    let within_a_second = sample(&metrics, r#"inventory_e2e_lag_seconds_bucket{le="1.0"}"#);
    assert_eq!(within_a_second, Some(10.0), "{metrics}");
    consumer.stop().await;
    api.stop().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn without_the_broker_the_depths_read_nan_and_the_scrape_still_succeeds(db: PgPool) {
    let broker = TestBroker::new().await;
    let proxy = FaultProxy::broker().await;
    let mut config = broker.config.clone();
    config.amqp_url = proxy.url();
    let consumer = TestConsumer::spawn(db.clone(), &config, &[]).await;
    let [message] = insert_orders(&db, &[vec![("SKU-015", 1)]]).await.try_into().expect("one");
    broker.publish(&message).await;
    consumer.wait_settled(1, WITHIN).await;
    let metrics = scrape(&consumer).await;
    assert_eq!(sample(&metrics, "inventory_queue_depth_messages"), Some(0.0), "{metrics}");

    proxy.down().await;
    broker.publish(&message).await; // waiting, unseen while the broker is away
    let metrics = scrape(&consumer).await;
    assert!(metrics.contains("inventory_queue_depth_messages NaN"), "{metrics}");
    assert!(metrics.contains("inventory_dlq_depth_messages NaN"), "{metrics}");
    assert!(sample(&metrics, "inventory_queue_depth_read_failures_total") >= Some(1.0));
    assert_eq!(
        sample(&metrics, r#"inventory_messages_total{outcome="completed"}"#),
        Some(1.0),
        "the other metrics are served: {metrics}"
    );

    proxy.up();
    let back = eventually(WITHIN, || async {
        let metrics = scrape(&consumer).await;
        sample(&metrics, "inventory_queue_depth_messages").is_some_and(|depth| !depth.is_nan())
            && sample(&metrics, "inventory_dlq_depth_messages") == Some(0.0)
    })
    .await;
    assert!(back, "the depths are read again once the broker is back");
    consumer.wait_settled(2, WITHIN).await;
    consumer.stop().await;
    broker.delete().await;
}
