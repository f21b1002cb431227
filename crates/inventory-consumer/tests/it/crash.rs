//! Killing the consumer process (SIGKILL) mid-stream and starting it again: every
//! order is processed exactly once and no stock is lost or counted twice.

use std::process::Stdio;
use std::time::Duration;

use sqlx::PgPool;
use tokio::process::{Child, Command};

use crate::helpers::{
    TestBroker, available, consumer_args, insert_orders, processed_count, reserved,
};

const ORDERS: usize = 3000;

fn start_consumer(database_url: &str, broker: &service_kit::broker::BrokerConfig) -> Child {
    Command::new(env!("CARGO_BIN_EXE_inventory-consumer"))
        .args(&consumer_args(broker)[1..])
        // Small batches, so the stream is still flowing when the kill comes.
        .args(["--listen-addr", "127.0.0.1:0", "--batch-size", "10", "--concurrency", "2"])
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the consumer binary starts")
}

async fn decided(db: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orders WHERE status <> 'PENDING'")
        .fetch_one(db)
        .await
        .expect("count")
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_consumer_killed_mid_stream_and_restarted_processes_each_order_once(db: PgPool) {
    let broker = TestBroker::new().await;
    let skus = ["SKU-010", "SKU-011", "SKU-022"]; // SKU-022 is scarce: some are REJECTED
    let mut initial = Vec::new();
    for sku in skus {
        initial.push(available(&db, sku).await);
    }
    let orders: Vec<Vec<(&str, i32)>> = (0..ORDERS)
        .map(|i| vec![(skus[i % 3], 1 + (i % 4) as i32), (skus[(i + 1) % 3], 1)])
        .collect();
    let messages = insert_orders(&db, &orders).await;
    for message in &messages {
        broker.publish(message).await;
    }

    let database_url = test_support::database_url_of(&db).await;
    let mut consumer = start_consumer(&database_url, &broker.config);
    let started =
        test_support::eventually(Duration::from_secs(30), || async { decided(&db).await >= 300 })
            .await;
    assert!(started, "the consumer got going");
    consumer.kill().await.expect("SIGKILL");
    let at_kill = decided(&db).await;
    assert!(at_kill < ORDERS as i64, "killed mid-stream (all {at_kill} were done already)");

    // Redeliveries are duplicates of what was committed before the kill; add
    // some explicit duplicates as well.
    for message in &messages[..100] {
        broker.publish(message).await;
    }
    let mut consumer = start_consumer(&database_url, &broker.config);
    let finished = test_support::eventually(Duration::from_secs(60), || async {
        decided(&db).await == ORDERS as i64 && broker.ready_messages().await == 0
    })
    .await;
    assert!(finished, "{} of {ORDERS} orders decided after the restart", decided(&db).await);
    // Let the last acks and duplicates go through before checking the totals.
    tokio::time::sleep(Duration::from_millis(500)).await;
    consumer.kill().await.expect("stop");

    assert_eq!(processed_count(&db).await, ORDERS as i64, "each message recorded once");
    for (sku, initial) in skus.iter().zip(initial) {
        let (left, taken) = (available(&db, sku).await, reserved(&db, sku).await);
        assert!(left >= 0);
        assert_eq!(left + taken, initial, "{sku}: stock is conserved");
    }
    let rejected: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'REJECTED'")
        .fetch_one(&db)
        .await
        .expect("count");
    assert!(rejected > 0, "the scarce SKU ran out, so some orders were rejected");
    broker.delete().await;
}
