//! Fuzzing the consumer with generated messages: valid events mutated at random
//! (fields removed, retyped or stretched, bodies that are not JSON, missing or
//! bad properties and version headers) are published to a test queue. Every one
//! must end dead-lettered or applied, the consumer must keep running, and a valid
//! message after them must be applied. The seed is printed, and `FUZZ_SEED`
//! replays a run.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use order_events::{OrderPlaced, VERSION_HEADER};
use outbox::Event as _;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestBroker, TestConsumer, insert_orders, order_status};

const MESSAGES: usize = 400;

/// Awkward text: empty, NUL, control characters, long, non-ASCII.
fn awkward_text(rng: &mut StdRng) -> Value {
    let choices = ["", "\u{0}", "SKU\u{0}001", "\u{1b}[31m", "ü✓", "SKU-001 "];
    match rng.random_range(0..3) {
        0 => json!(choices[rng.random_range(0..choices.len())]),
        1 => json!("x".repeat(rng.random_range(100..5_000))),
        _ => json!(format!("SKU-{:03}", rng.random_range(0..40))),
    }
}

/// A value of some other type than expected.
fn wrong_type(rng: &mut StdRng) -> Value {
    match rng.random_range(0..7) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(rng.random_range(-5..5)),
        3 => json!(1e300),
        4 => json!([]),
        5 => json!({}),
        _ => awkward_text(rng),
    }
}

/// A valid event for `order_id`, then between none and three mutations.
fn mutated_body(rng: &mut StdRng, order_id: Uuid) -> Vec<u8> {
    if rng.random_range(0..12) == 0 {
        // Not JSON at all.
        let length = rng.random_range(0..64);
        return (0..length).map(|_| rng.random_range(0..=255u8)).collect();
    }
    let mut event = json!({
        "order_id": order_id,
        "customer_id": "fuzz",
        "lines": [{"sku": format!("SKU-{:03}", rng.random_range(1..=25)), "quantity": rng.random_range(1..4)}],
        "total_cents": 100,
    });
    for _ in 0..rng.random_range(0..=3) {
        let object = event.as_object_mut().expect("an object");
        let fields = ["order_id", "customer_id", "lines", "total_cents"];
        let field = fields[rng.random_range(0..fields.len())];
        match rng.random_range(0..8) {
            0 => {
                object.remove(field);
            }
            1 => {
                object.insert(field.to_owned(), wrong_type(rng));
            }
            2 => {
                object.insert(format!("extra_{}", rng.random_range(0..100)), wrong_type(rng));
            }
            3 => {
                object.insert("order_id".to_owned(), json!(Uuid::new_v4()));
            }
            4 => {
                let quantity =
                    [0, -1, i64::from(i32::MAX) + 1, i64::MIN, 1_000_000][rng.random_range(0..5)];
                object
                    .insert("lines".to_owned(), json!([{"sku": "SKU-001", "quantity": quantity}]));
            }
            5 => {
                object
                    .insert("lines".to_owned(), json!([{"sku": awkward_text(rng), "quantity": 1}]));
            }
            6 => {
                object.insert("lines".to_owned(), json!([]));
            }
            _ => {
                let line = json!({"sku": "SKU-002", "quantity": 1, "note": wrong_type(rng)});
                object.insert("lines".to_owned(), json!([line]));
            }
        }
    }
    serde_json::to_vec(&event).expect("json")
}

fn mutated_properties(rng: &mut StdRng) -> BasicProperties {
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    match rng.random_range(0..10) {
        0 => {}
        1 => properties = properties.with_message_id(ShortString::from("not-a-uuid")),
        _ => properties = properties.with_message_id(ShortString::from(Uuid::now_v7().to_string())),
    }
    match rng.random_range(0..10) {
        0 => {}
        1 => properties = properties.with_type(ShortString::from("OrderCancelled")),
        _ => properties = properties.with_type(ShortString::from(OrderPlaced::EVENT_TYPE)),
    }
    let mut headers = FieldTable::default();
    let version = match rng.random_range(0..8) {
        0 => Some(AMQPValue::LongString("2.0".into())),
        1 => Some(AMQPValue::LongString("latest".into())),
        2 => Some(AMQPValue::LongLongInt(1)),
        3 => Some(AMQPValue::LongString("1.9".into())),
        4 => None,
        _ => Some(AMQPValue::LongString(OrderPlaced::VERSION.into())),
    };
    if let Some(version) = version {
        headers.insert(VERSION_HEADER.into(), version);
    }
    properties.with_headers(headers)
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn generated_messages_are_dead_lettered_or_applied_and_the_consumer_carries_on(db: PgPool) {
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| rand::random_range(0..u64::MAX));
    let mut rng = StdRng::seed_from_u64(seed);
    eprintln!("consumer fuzz: FUZZ_SEED={seed} replays this run");
    let broker = TestBroker::new().await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;
    let orders = insert_orders(&db, &vec![vec![("SKU-003", 1)]; 50]).await;

    let channel = broker.channel();
    for _ in 0..MESSAGES {
        let order_id = orders[rng.random_range(0..orders.len())].event.order_id();
        let body = mutated_body(&mut rng, order_id);
        let confirm = channel
            .basic_publish(
                broker.config.exchange.as_str().into(),
                broker.config.inventory_binding.as_str().into(),
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                &body,
                mutated_properties(&mut rng),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
    }
    consumer.wait_settled(MESSAGES as u64, Duration::from_secs(60)).await;

    let poison = consumer.metrics.count("poison");
    let dead = broker.dead_letters(MESSAGES, Duration::from_secs(10)).await;
    eprintln!(
        "consumer fuzz (FUZZ_SEED={seed}): {MESSAGES} messages, {poison} dead-lettered, {} applied",
        MESSAGES as u64 - poison
    );
    assert_eq!(dead.len() as u64, poison, "every rejected message is in the dead-letter queue");
    assert_eq!(consumer.settled(), MESSAGES as u64, "each settled once");

    // Still consuming: a valid message after all that is applied.
    let [valid] = insert_orders(&db, &[vec![("SKU-004", 1)]]).await.try_into().expect("one");
    broker.publish(&valid).await;
    consumer.wait_settled(MESSAGES as u64 + 1, Duration::from_secs(10)).await;
    assert_eq!(order_status(&db, valid.event.order_id()).await, "COMPLETED", "seed {seed}");
    let ready = reqwest::get(format!("{}/readyz", consumer.address)).await.expect("readyz");
    assert_eq!(ready.status(), 200, "seed {seed}");
    consumer.stop().await;
    broker.delete().await;
}
