//! The consumer's guarantees: one effect per message however often it arrives,
//! stock never oversold, poison dead-lettered, database trouble retried.

use std::time::Duration;

use inventory_consumer::apply::{Outcome, apply_batch};
use inventory_consumer::message::OrderEvent;
use order_events::OrderPlaced;
use outbox::Event as _;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{
    TestBroker, TestConsumer, available, insert_orders, order_status, processed_count, reserved,
};

const WITHIN: Duration = Duration::from_secs(10);

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_new_event_reserves_stock_and_completes_the_order(db: PgPool) {
    let broker = TestBroker::new().await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;
    let before = (available(&db, "SKU-001").await, available(&db, "SKU-002").await);
    let [message] = insert_orders(&db, &[vec![("SKU-001", 2), ("SKU-002", 5)]])
        .await
        .try_into()
        .expect("one order");

    broker.publish(&message).await;
    consumer.wait_settled(1, WITHIN).await;

    assert_eq!(order_status(&db, message.event.order_id()).await, "COMPLETED");
    assert_eq!(available(&db, "SKU-001").await, before.0 - 2);
    assert_eq!(available(&db, "SKU-002").await, before.1 - 5);
    assert_eq!(consumer.metrics.count("completed"), 1);

    let client = reqwest::Client::new();
    let ready = client.get(format!("{}/readyz", consumer.address)).send().await.expect("readyz");
    assert_eq!(ready.status(), 200);
    let metrics = client.get(format!("{}/metrics", consumer.address)).send().await.expect("get");
    let metrics = metrics.text().await.expect("text");
    assert!(
        metrics.contains(r#"inventory_messages_total{outcome="completed"} 1"#),
        "metrics:\n{metrics}"
    );
    consumer.stop().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_message_delivered_twice_has_one_effect(db: PgPool) {
    let broker = TestBroker::new().await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;
    let before = available(&db, "SKU-003").await;
    let [message] = insert_orders(&db, &[vec![("SKU-003", 4)]]).await.try_into().expect("one");

    broker.publish(&message).await;
    consumer.wait_settled(1, WITHIN).await;
    broker.publish(&message).await;
    consumer.wait_settled(2, WITHIN).await;

    assert_eq!(consumer.metrics.count("completed"), 1);
    assert_eq!(consumer.metrics.count("duplicate"), 1);
    assert_eq!(available(&db, "SKU-003").await, before - 4);
    assert_eq!(order_status(&db, message.event.order_id()).await, "COMPLETED");
    assert_eq!(processed_count(&db).await, 1);
    consumer.stop().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_message_delivered_twice_concurrently_has_one_effect(db: PgPool) {
    let broker = TestBroker::new().await;
    // Two workers taking one message each: both copies are in flight together.
    let args = ["--concurrency", "2", "--prefetch", "1", "--batch-size", "1"];
    let before = available(&db, "SKU-004").await;
    let messages = insert_orders(&db, &vec![vec![("SKU-004", 1)]; 20]).await;
    for message in &messages {
        broker.publish(message).await;
        broker.publish(message).await;
    }
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &args).await;
    consumer.wait_settled(40, WITHIN).await;

    assert_eq!(consumer.metrics.count("completed"), 20);
    assert_eq!(consumer.metrics.count("duplicate"), 20);
    assert_eq!(available(&db, "SKU-004").await, before - 20);
    assert_eq!(processed_count(&db).await, 20);
    consumer.stop().await;
    broker.delete().await;
}

/// The same message applied by two transactions at once, without a broker in
/// between: the second waits for the first and finds it done.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn two_transactions_applying_one_message_take_effect_once(db: PgPool) {
    let before = available(&db, "SKU-005").await;
    let messages = insert_orders(&db, &[vec![("SKU-005", 3)]]).await;
    let apply = |db: PgPool, messages: Vec<_>| async move {
        let mut tx = db.begin().await.expect("begin");
        let outcomes = apply_batch(&mut tx, "inventory", &messages).await.expect("apply");
        tokio::time::sleep(Duration::from_millis(50)).await; // hold the locks a while
        tx.commit().await.expect("commit");
        outcomes
    };
    let (first, second) = tokio::join!(
        tokio::spawn(apply(db.clone(), messages.clone())),
        tokio::spawn(apply(db.clone(), messages.clone())),
    );
    let mut outcomes = [first.expect("task")[0].clone(), second.expect("task")[0].clone()];
    outcomes.sort_by_key(Outcome::label);

    assert_eq!(outcomes, [Outcome::Completed, Outcome::Duplicate]);
    assert_eq!(available(&db, "SKU-005").await, before - 3);
}

/// Placing an order takes `FOR KEY SHARE` locks on its SKUs (the foreign-key
/// checks of its lines). Applying must not wait for them: if it did, a consumer
/// and order-service locking two SKUs in opposite orders would deadlock.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn applying_does_not_wait_for_an_order_being_placed(db: PgPool) {
    let messages = insert_orders(&db, &[vec![("SKU-006", 1)]]).await;
    let mut placing = db.begin().await.expect("begin");
    let placing_id = Uuid::now_v7();
    sqlx::query("INSERT INTO orders (id, customer_id, total_cents) VALUES ($1, 'other', 0)")
        .bind(placing_id)
        .execute(&mut *placing)
        .await
        .expect("insert order");
    sqlx::query(
        "INSERT INTO order_lines (order_id, sku, quantity, unit_price_cents)
         VALUES ($1, 'SKU-006', 1, 0)",
    )
    .bind(placing_id)
    .execute(&mut *placing)
    .await
    .expect("insert line");

    let mut tx = db.begin().await.expect("begin");
    sqlx::query("SET LOCAL lock_timeout = '2s'").execute(&mut *tx).await.expect("lock_timeout");
    let outcomes = apply_batch(&mut tx, "inventory", &messages)
        .await
        .expect("applies without waiting for the order being placed");
    tx.commit().await.expect("commit");
    assert_eq!(outcomes, [Outcome::Completed]);
    placing.rollback().await.expect("rollback");
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn out_of_stock_orders_are_rejected_and_take_no_stock(db: PgPool) {
    let broker = TestBroker::new().await;
    let scarce = "SKU-021";
    let initial = (available(&db, scarce).await, available(&db, "SKU-006").await);
    assert_eq!(initial.0, 25, "the catalogue seeds 25 of {scarce}");
    // 20 orders of 3 compete for 25 units; each also takes one of an ample SKU,
    // which a rejected order must not keep either.
    let orders = vec![vec![(scarce, 3), ("SKU-006", 1)]; 20];
    let messages = insert_orders(&db, &orders).await;
    for message in &messages {
        broker.publish(message).await;
    }
    let args = ["--concurrency", "2", "--batch-size", "3"];
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &args).await;
    consumer.wait_settled(20, WITHIN).await;

    assert_eq!(consumer.metrics.count("completed"), 8);
    assert_eq!(consumer.metrics.count("rejected"), 12);
    assert_eq!(available(&db, scarce).await, 1);
    for sku in [scarce, "SKU-006"] {
        let initial = if sku == scarce { initial.0 } else { initial.1 };
        assert_eq!(available(&db, sku).await + reserved(&db, sku).await, initial, "{sku}");
    }
    let rejected: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'REJECTED'")
        .fetch_one(&db)
        .await
        .expect("count");
    assert_eq!(rejected, 12);
    consumer.stop().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn each_kind_of_poison_is_dead_lettered_and_the_next_message_is_processed(db: PgPool) {
    let broker = TestBroker::new().await;
    let [good, unknown_order] = insert_orders(&db, &[vec![("SKU-007", 1)], vec![("SKU-007", 1)]])
        .await
        .try_into()
        .expect("two orders");
    // The second order is deleted, so its (well-formed) event names no order.
    sqlx::query("DELETE FROM orders WHERE id = $1")
        .bind(unknown_order.event.order_id())
        .execute(&db)
        .await
        .expect("delete");
    let kind = Some(OrderPlaced::EVENT_TYPE);
    let valid_body = serde_json::to_vec(&good.event).expect("json");
    let OrderEvent::Placed(mut zero_quantity) = good.event.clone() else { unreachable!() };
    zero_quantity.lines[0].quantity = 0;
    let poison: Vec<(&str, Option<&str>, Vec<u8>)> = vec![
        ("not json", kind, b"{not json".to_vec()),
        ("wrong shape", kind, br#"{"order_id": 42}"#.to_vec()),
        ("unknown type", Some("OrderShipped"), valid_body.clone()),
        ("no type", None, valid_body.clone()),
        ("zero quantity", kind, serde_json::to_vec(&zero_quantity).expect("json")),
        ("unknown order", kind, serde_json::to_vec(&unknown_order.event).expect("json")),
    ];
    for (name, kind, body) in &poison {
        let id = if *name == "unknown order" { unknown_order.id } else { Uuid::now_v7() };
        broker.publish_raw(Some(&id.to_string()), *kind, body).await;
    }
    broker.publish_raw(None, kind, &valid_body).await; // no message id
    broker.publish(&good).await;
    // Started after publishing, so poison and good messages share a batch.
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;

    let dead = broker.dead_letters(poison.len() + 1, WITHIN).await;
    consumer.wait_settled(poison.len() as u64 + 2, WITHIN).await;

    let text = |body: &[u8]| String::from_utf8_lossy(body).into_owned();
    let mut dead_bodies: Vec<String> = dead.iter().map(|d| text(&d.data)).collect();
    let mut expected: Vec<String> = poison.iter().map(|(_, _, body)| text(body)).collect();
    expected.push(text(&valid_body));
    dead_bodies.sort();
    expected.sort();
    assert_eq!(dead_bodies, expected, "every poison message, and only those, is dead-lettered");
    assert_eq!(consumer.metrics.count("poison"), poison.len() as u64 + 1);
    assert_eq!(order_status(&db, good.event.order_id()).await, "COMPLETED");
    // Poison is not recorded as processed: a fixed replay can still apply.
    assert_eq!(processed_count(&db).await, 1);
    consumer.stop().await;
    broker.delete().await;
}

/// A failing database is waited out: nothing is acked or dead-lettered while the
/// transaction fails, and the message is applied once it can be.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_database_failure_is_retried_not_acked_or_dead_lettered(db: PgPool) {
    let broker = TestBroker::new().await;
    let [message] = insert_orders(&db, &[vec![("SKU-008", 1)]]).await.try_into().expect("one");
    // Every batch transaction fails while the table is missing.
    sqlx::query("ALTER TABLE processed_messages RENAME TO processed_messages_away")
        .execute(&db)
        .await
        .expect("rename");
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;
    broker.publish(&message).await;
    let retried =
        test_support::eventually(WITHIN, || async { consumer.metrics.retries.get() >= 2 }).await;
    assert!(retried, "the failing batch is retried");
    assert_eq!(consumer.settled(), 0);
    assert!(broker.dead_letters(1, Duration::from_millis(200)).await.is_empty());
    assert_eq!(order_status(&db, message.event.order_id()).await, "PENDING");

    sqlx::query("ALTER TABLE processed_messages_away RENAME TO processed_messages")
        .execute(&db)
        .await
        .expect("rename back");
    consumer.wait_settled(1, Duration::from_secs(20)).await;
    assert_eq!(order_status(&db, message.event.order_id()).await, "COMPLETED");
    consumer.stop().await;
    broker.delete().await;
}

/// The broker going away mid-stream: the consumer reconnects and finishes.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn the_consumer_reconnects_after_losing_the_broker(db: PgPool) {
    let broker = TestBroker::new().await;
    let proxy = test_support::FaultProxy::broker().await;
    let mut config = broker.config.clone();
    config.amqp_url = proxy.url();
    let consumer = TestConsumer::spawn(db.clone(), &config, &[]).await;
    let messages = insert_orders(&db, &vec![vec![("SKU-009", 1)]; 10]).await;
    broker.publish(&messages[0]).await;
    consumer.wait_settled(1, WITHIN).await;

    proxy.down().await;
    for message in &messages[1..] {
        broker.publish(message).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(consumer.settled(), 1, "nothing is consumed without a broker");
    proxy.up();
    consumer.wait_settled(10, Duration::from_secs(20)).await;

    assert_eq!(consumer.metrics.count("completed"), 10);
    consumer.stop().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_message_whose_data_the_database_refuses_is_dead_lettered_alone(db: PgPool) {
    let broker = TestBroker::new().await;
    let messages = insert_orders(&db, &vec![vec![("SKU-012", 1)]; 5]).await;
    let refused = messages[2].event.order_id();
    // The database refuses one order's update with a data exception (class 22),
    // as it would text it cannot store: no retry of the batch could succeed.
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.id = '{refused}' THEN
                 RAISE EXCEPTION 'value refused' USING ERRCODE = '22023';
             END IF;
             RETURN NEW;
         END; $$;
         CREATE TRIGGER refuse BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION refuse();"
    ))
    .execute(&db)
    .await
    .expect("trigger");
    for message in &messages {
        broker.publish(message).await;
    }
    // One batch for all five, so the refused one is in a batch with the others.
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &["--concurrency", "1"]).await;

    consumer.wait_settled(5, WITHIN).await;

    // The five were one batch (what this test is about: the refused message
    // among others), applied message by message after the refusal.
    let metrics = test_support::scrape(&consumer.address).await;
    let value = |name: &str| {
        test_support::sample(&metrics, name).unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    assert_eq!(
        (value("inventory_batch_size_count"), value("inventory_batch_size_sum")),
        (1.0, 5.0),
        "one batch of five"
    );

    let dead = broker.dead_letters(1, WITHIN).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].properties.message_id().as_ref().map(|id| id.to_string()),
        Some(messages[2].id.to_string())
    );
    for (index, message) in messages.iter().enumerate() {
        let expected = if index == 2 { "PENDING" } else { "COMPLETED" };
        assert_eq!(order_status(&db, message.event.order_id()).await, expected, "order {index}");
    }
    consumer.stop().await;
    broker.delete().await;
}
