//! The queue arguments the services declare, as the broker applies them: quorum
//! queues with a delivery limit and at-least-once dead-lettering, and a clear
//! report when a queue exists with other arguments.

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicRejectOptions};
use lapin::types::AMQPValue;
use outbox::amqp::QueueType;
use serde_json::Value;
use sqlx::PgPool;
use test_support::eventually;

use crate::helpers::{TestBroker, TestConsumer, insert_orders};

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_message_that_keeps_coming_back_is_dead_lettered_at_the_delivery_limit(db: PgPool) {
    let broker = TestBroker::new_with(|config| config.delivery_limit = 3).await;
    let [message] = insert_orders(&db, &[vec![("SKU-001", 1)]]).await.try_into().expect("one");
    broker.publish(&message).await;

    // A consumer that crashes on it every time: the message goes back each time.
    let channel = broker.channel();
    let queue = broker.config.inventory_queue.clone();
    let mut deliveries = 0;
    while deliveries < 10 {
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get");
        let Some(got) = got else { break };
        deliveries += 1;
        got.delivery
            .reject(BasicRejectOptions { requeue: true })
            .await
            .expect("reject with requeue");
    }

    assert_eq!(deliveries, 4, "delivered 1 + 3 times, then dead-lettered");
    let dead = broker.dead_letters(1, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 1, "in the dead-letter queue");
    let headers = dead[0].properties.headers().clone().unwrap_or_default();
    assert!(headers.inner().contains_key("x-death"), "with its x-death header: {headers:?}");
    broker.delete().await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_queue_of_another_type_is_reported_by_name_and_the_consumer_keeps_running(db: PgPool) {
    // A broker where the queue was declared classic (by an older version, say).
    let mut broker = TestBroker::new_with(|config| config.queue_type = QueueType::Classic).await;
    broker.config.queue_type = QueueType::Quorum;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;

    let client = reqwest::Client::new();
    let readyz = format!("{}/readyz", consumer.address);
    let reported = eventually(Duration::from_secs(10), || async {
        let response = client.get(&readyz).send().await.expect("readyz");
        let status = response.status();
        let body: Value = response.json().await.expect("json");
        status == 503 && body["broker_error"].is_string()
    })
    .await;
    assert!(reported, "/readyz reports the mismatch");
    let body: Value = client.get(&readyz).send().await.expect("readyz").json().await.expect("json");
    let error = body["broker_error"].as_str().expect("text");
    // The dead-letter queue is declared first, so it is the one named.
    let named = format!("queue {:?}", broker.config.dead_letter_queue);
    assert!(error.starts_with(&named), "names the queue: {error}");
    assert!(error.contains("x-queue-type"), "says what differs: {error}");
    assert!(error.contains("QUEUE_TYPE") && error.contains("migrate"), "says what to do: {error}");

    // Still alive and answering: a crash loop would have ended the task.
    let health = client.get(format!("{}/healthz", consumer.address)).send().await.expect("healthz");
    assert_eq!(health.status(), 200);
    consumer.stop().await;
    broker.delete().await;
}

#[tokio::test]
async fn the_quorum_queue_carries_the_documented_arguments() {
    let broker = TestBroker::new().await;
    let topology = broker.config.inventory_topology();
    let arguments = topology.queue_arguments();
    let get = |name: &str| arguments.inner().get(name).cloned();
    assert_eq!(get("x-queue-type"), Some(AMQPValue::LongString("quorum".into())));
    assert_eq!(get("x-delivery-limit"), Some(AMQPValue::LongLongInt(20)));
    assert_eq!(get("x-dead-letter-strategy"), Some(AMQPValue::LongString("at-least-once".into())));
    assert_eq!(get("x-overflow"), Some(AMQPValue::LongString("reject-publish".into())));
    // The broker took them (the helper declared the topology), and takes them again.
    topology.declare(&broker.channel()).await.expect("same arguments again");
    broker.delete().await;
}
