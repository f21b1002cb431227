//! The in-process relay: placed orders reach the inventory queue, and the API
//! keeps taking orders while the broker is away.

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::BasicGetOptions;
use order_events::OrderPlaced;
use serde_json::{Value, json};
use service_kit::broker::BrokerConfig;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::helpers::{
    TestApp, spawn_app_with_relay, spawn_app_with_relay_and_args, spawn_with_args,
};

fn order() -> Value {
    json!({"customer_id": "bob", "items": [{"sku": "SKU-003", "quantity": 1}]})
}

pub async fn delete_topology(broker: &BrokerConfig) {
    test_support::delete_topology(
        &broker.amqp_url,
        &[&broker.inventory_queue, &broker.dead_letter_queue],
        &[&broker.exchange, &broker.dead_letter_exchange],
    )
    .await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn placed_orders_reach_the_inventory_queue(db: PgPool) {
    let broker = BrokerConfig::for_test(&Uuid::new_v4().simple().to_string());
    let app = spawn_app_with_relay(db, &broker).await;

    let mut placed = HashSet::new();
    for _ in 0..5 {
        let response = app.post_order(&order()).await;
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.expect("json");
        placed.insert(body["id"].as_str().expect("id").parse::<Uuid>().expect("uuid"));
    }

    // The relay declared the inventory queue, so the events were routed to it.
    wait_broker_up(&app).await;
    let connection = outbox::amqp::connect(&broker.amqp_url, "test").await.expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    let mut received = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while received.len() < placed.len() && tokio::time::Instant::now() < deadline {
        let got = channel
            .basic_get(broker.inventory_queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get");
        match got {
            Some(message) => {
                let event: OrderPlaced =
                    serde_json::from_slice(&message.delivery.data).expect("event");
                assert_eq!(
                    message.delivery.properties.kind().as_ref().map(|k| k.as_str()),
                    Some("OrderPlaced")
                );
                received.insert(event.order_id);
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert_eq!(received, placed);

    let metrics = app.metrics().await;
    assert!(metrics.contains("outbox_events_published_total 5"), "{metrics}");
    assert!(metrics.contains("outbox_backlog_events 0"), "{metrics}");
    let ready: Value = app
        .client
        .get(format!("{}/readyz", app.address))
        .send()
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(ready["broker"], "up");

    let _ = connection.close(200, "done".into()).await;
    delete_topology(&broker).await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn orders_are_accepted_while_the_broker_is_down(db: PgPool) {
    let mut broker = BrokerConfig::for_test(&Uuid::new_v4().simple().to_string());
    // Nothing listens on port 1.
    broker.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2f".to_owned();
    let app = spawn_app_with_relay(db, &broker).await;

    for _ in 0..3 {
        assert_eq!(app.post_order(&order()).await.status(), 201);
    }

    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE attempts = 0")
        .fetch_one(&app.db)
        .await
        .expect("count");
    assert_eq!(waiting, 3, "the events wait in the outbox");
    let ready = app.client.get(format!("{}/readyz", app.address)).send().await.expect("readyz");
    assert_eq!(ready.status(), 200, "ready to take orders without the broker");
    let ready: Value = ready.json().await.expect("json");
    assert_eq!(ready["broker"], "down");
    let metrics = app.metrics().await;
    assert!(metrics.contains("outbox_backlog_events 3"), "{metrics}");
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn events_reach_the_broker_while_the_api_pool_is_exhausted(db: PgPool) {
    let broker = BrokerConfig::for_test(&Uuid::new_v4().simple().to_string());
    // The API's pool: two connections, both held by "requests" that never end.
    let api_pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(300))
        .connect_with((*db.connect_options()).clone())
        .await
        .expect("api pool");
    let app = spawn_app_with_relay_and_args(api_pool.clone(), &broker, &[]).await;
    let _held = [api_pool.acquire().await.expect("one"), api_pool.acquire().await.expect("two")];
    let refused = app.post_order(&order()).await;
    assert_eq!(refused.status(), 503, "the API has no connection left");

    // An order committed by another writer: only the relay's own pool can move it.
    let mut tx = db.begin().await.expect("begin");
    let event = outbox::NewEvent {
        aggregate_type: "order".to_owned(),
        aggregate_id: "elsewhere".to_owned(),
        event_type: "OrderPlaced".to_owned(),
        payload: json!({"order_id": Uuid::now_v7()}),
        headers: serde_json::Map::new(),
    };
    let id = outbox::enqueue_untyped(&mut tx, &event).await.expect("enqueue");
    tx.commit().await.expect("commit");

    let connection = outbox::amqp::connect(&broker.amqp_url, "test").await.expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    let arrived = test_support::eventually(Duration::from_secs(10), || async {
        let got = channel
            .basic_get(broker.inventory_queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get");
        got.is_some_and(|message| {
            message.delivery.properties.message_id().as_ref().map(|m| m.to_string())
                == Some(id.to_string())
        })
    })
    .await;
    assert!(arrived, "the relay published with the API's pool exhausted");
    let _ = connection.close(200, "done".into()).await;
    delete_topology(&broker).await;
}

/// Waits until the app's relay is connected, and so has declared the queues.
async fn wait_broker_up(app: &TestApp) {
    let up = test_support::eventually(Duration::from_secs(10), || async {
        let ready = app.client.get(format!("{}/readyz", app.address)).send().await;
        match ready {
            Ok(response) => response.json::<Value>().await.is_ok_and(|body| body["broker"] == "up"),
            Err(_) => false,
        }
    })
    .await;
    assert!(up, "the relay connects to the broker");
}

/// Whether the order's event is in the inventory queue within `within`.
async fn published_within(broker: &BrokerConfig, order_id: Uuid, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let connection = outbox::amqp::connect(&broker.amqp_url, "test").await.expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    let mut arrived = false;
    while !arrived && tokio::time::Instant::now() < deadline {
        let got = channel
            .basic_get(broker.inventory_queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get");
        match got {
            Some(message) => {
                let event: OrderPlaced =
                    serde_json::from_slice(&message.delivery.data).expect("event");
                arrived = event.order_id == order_id;
            }
            None => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let _ = connection.close(200, "done".into()).await;
    arrived
}

/// An order-service whose relay polls only once a minute, connected and past
/// its first pass at start-up: only a wake-up makes it find the next event.
async fn spawn_idle_relay(db: PgPool, broker: &BrokerConfig) -> TestApp {
    let mut args = broker.to_args();
    args.extend(["--relay-poll-interval-ms".to_owned(), "60000".to_owned()]);
    let app = spawn_with_args(db, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    wait_broker_up(&app).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    app
}

async fn place(app: &TestApp) -> Uuid {
    let response = app.post_order(&order()).await;
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.expect("json");
    body["id"].as_str().expect("id").parse().expect("uuid")
}

/// The writer wakes the relay in its process: with polling a minute apart, the
/// event is still published at once.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn the_writer_wakes_the_relay_in_its_process(db: PgPool) {
    let broker = BrokerConfig::for_test(&Uuid::new_v4().simple().to_string());
    let app = spawn_idle_relay(db, &broker).await;

    let order_id = place(&app).await;

    let published = published_within(&broker, order_id, Duration::from_secs(3)).await;
    assert!(published, "published without waiting for the 60 s poll");
    delete_topology(&broker).await;
}

/// A relay in another process is woken by NOTIFY when the writers set
/// OUTBOX_NOTIFY, again without waiting for its poll.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn outbox_notify_wakes_a_relay_in_another_process(db: PgPool) {
    let broker = BrokerConfig::for_test(&Uuid::new_v4().simple().to_string());
    let _relay = spawn_idle_relay(db.clone(), &broker).await;
    let writer = spawn_with_args(db, &["--relay-workers", "0", "--outbox-notify"]).await;

    let order_id = place(&writer).await;

    let published = published_within(&broker, order_id, Duration::from_secs(3)).await;
    assert!(published, "the other process's relay was notified");
    delete_topology(&broker).await;
}
