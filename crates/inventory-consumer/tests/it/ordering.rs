//! One aggregate's events in order, end to end, with parallelism: 300 orders,
//! each cancelled right after its 201 through the other of two order-services,
//! written while no relay runs (a backlog, as after a broker outage), then two
//! order-services with four relay workers each, claiming small batches, and two
//! consumers on one database and vhost: every order ends CANCELLED with the
//! stock back, each event is applied once, and a queue an operator binds to
//! `order.#` sees 600 distinct messages with no order's OrderCancelled ahead of
//! its OrderPlaced. (With the relays running while the orders are written, the
//! OrderPlaced is published before the cancel is even written: the backlog is
//! what puts both events of an order within reach of different workers.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestApi, TestBroker, TestConsumer, count_with_status, processed_count};

const ORDERS: usize = 300;

async fn stock(db: &PgPool) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("SELECT sku, available::int8 FROM inventory")
        .fetch_all(db)
        .await
        .expect("stock")
        .into_iter()
        .collect()
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn placed_and_cancelled_at_once_through_replicas_arrive_and_apply_in_order(db: PgPool) {
    let broker = TestBroker::new().await;
    let config = &broker.config;
    let channel = broker.channel();
    let observer = format!("{}.observer", config.inventory_queue);
    channel
        .queue_declare(
            observer.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("observer queue");
    channel
        .queue_bind(
            observer.as_str().into(),
            config.exchange.as_str().into(),
            "order.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind order.#");
    let apis = [
        TestApi::spawn(&db, config, &["--relay-workers", "0"]).await,
        TestApi::spawn(&db, config, &["--relay-workers", "0"]).await,
    ];
    let consumers = [
        TestConsumer::spawn(db.clone(), config, &[]).await,
        TestConsumer::spawn(db.clone(), config, &[]).await,
    ];
    let before = stock(&db).await;
    let client = reqwest::Client::new();

    let mut ids = Vec::with_capacity(ORDERS);
    for n in 0..ORDERS {
        let body = json!({"customer_id": format!("c-{n}"),
                          "items": [{"sku": format!("SKU-{:03}", 1 + n % 20), "quantity": 1}]});
        let placed = client
            .post(format!("{}/orders", apis[n % 2].address))
            .json(&body)
            .send()
            .await
            .expect("post");
        assert_eq!(placed.status(), 201);
        let placed: Value = placed.json().await.expect("json");
        let id = placed["id"].as_str().expect("id").to_owned();
        let cancelled = client
            .post(format!("{}/orders/{id}/cancel", apis[(n + 1) % 2].address))
            .send()
            .await
            .expect("cancel");
        assert!(cancelled.status().is_success(), "cancel {n}: {}", cancelled.status());
        ids.push(id.parse::<Uuid>().expect("uuid"));
    }

    let relay_args = ["--relay-workers", "4", "--relay-batch-size", "3"];
    let relays = [
        TestApi::spawn(&db, config, &relay_args).await,
        TestApi::spawn(&db, config, &relay_args).await,
    ];
    let all_cancelled = test_support::eventually(Duration::from_secs(60), || async {
        count_with_status(&db, &ids, "CANCELLED").await == ORDERS as i64
    })
    .await;
    assert!(all_cancelled, "every order CANCELLED within 60 s");
    assert_eq!(stock(&db).await, before, "every SKU's stock back where it started");
    let applied_out_of_order: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE cancelled_from = 'PENDING'")
            .fetch_one(&db)
            .await
            .expect("count");
    assert_eq!(applied_out_of_order, 0, "no cancel applied before its OrderPlaced");
    let processed = test_support::eventually(Duration::from_secs(10), || async {
        processed_count(&db).await == 2 * ORDERS as i64
    })
    .await;
    assert!(processed, "{} processed messages", processed_count(&db).await);

    // What the operator's queue saw, in its order.
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let mut message_ids = HashSet::new();
    while message_ids.len() < 2 * ORDERS {
        let Some(got) = channel
            .basic_get(observer.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
        else {
            break;
        };
        let properties = &got.delivery.properties;
        let id = properties.message_id().as_ref().expect("message id").to_string();
        let kind = properties.kind().as_ref().expect("type").to_string();
        let aggregate =
            match properties.headers().as_ref().and_then(|h| h.inner().get("aggregate_id")) {
                Some(AMQPValue::LongString(text)) => text.to_string(),
                other => panic!("aggregate_id: {other:?}"),
            };
        message_ids.insert(id);
        seen.entry(aggregate).or_default().push(kind);
    }
    assert_eq!(message_ids.len(), 2 * ORDERS, "600 distinct message ids");
    assert_eq!(seen.len(), ORDERS, "over 300 aggregates");
    let out_of_order: Vec<(&String, &Vec<String>)> = seen
        .iter()
        .filter(|(_, kinds)| kinds.as_slice() != ["OrderPlaced", "OrderCancelled"])
        .collect();
    assert!(out_of_order.is_empty(), "not placed then cancelled: {out_of_order:?}");

    let _ = channel.queue_delete(observer.as_str().into(), QueueDeleteOptions::default()).await;
    for consumer in consumers {
        consumer.stop().await;
    }
    for api in apis.into_iter().chain(relays) {
        api.stop().await;
    }
    broker.delete().await;
}
