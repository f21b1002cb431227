//! `--idempotency-keys`: every order carries a key of its own, which the service
//! stores with the order.

use sqlx::PgPool;

use crate::helpers::{spawn_app, spawn_app_on, stress_test};

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn each_order_stores_a_key_of_its_own(db: PgPool) {
    let app = spawn_app(db).await;

    let run = stress_test(&[
        "--url",
        &app.address,
        "--orders",
        "30",
        "--concurrency",
        "3",
        "--no-wait",
        "--idempotency-keys",
    ])
    .await;

    assert_eq!(run.u64("ok"), 30, "{}", run.report);
    let (keys, orders): (i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT idempotency_key), count(DISTINCT order_id) FROM idempotency_keys",
    )
    .fetch_one(&app.db)
    .await
    .expect("keys counted");
    assert_eq!((keys, orders), (30, 30), "one key per order, none replayed");
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn without_the_flag_no_key_is_sent(db: PgPool) {
    let app = spawn_app(db).await;

    let run =
        stress_test(&["--url", &app.address, "--orders", "5", "--concurrency", "1", "--no-wait"])
            .await;

    assert_eq!(run.u64("ok"), 5, "{}", run.report);
    let (keys,): (i64,) = sqlx::query_as("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&app.db)
        .await
        .expect("keys counted");
    assert_eq!(keys, 0);
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn retries_ride_out_a_service_that_starts_late_without_doubling_orders(db: PgPool) {
    // A port nobody listens on yet; the service comes up on it a moment later.
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let late = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        spawn_app_on(db, port).await
    });

    let run = stress_test(&[
        "--url",
        &url,
        "--orders",
        "6",
        "--concurrency",
        "2",
        "--no-wait",
        "--idempotency-keys",
        "--retries",
        "10",
    ])
    .await;
    let app = late.await.expect("the service started");

    assert_eq!(run.u64("ok"), 6, "{}", run.report);
    assert!(run.u64("retries") > 0, "the first attempts found no service: {}", run.report);
    assert_eq!(run.u64("transport_errors"), 0, "{}", run.report);
    let (orders,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM orders").fetch_one(&app.db).await.expect("count");
    assert_eq!(orders, 6, "one order per order sent, however often it was retried");
}

#[test]
fn retries_need_idempotency_keys() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stress-test"))
        .args(["--retries", "3", "--no-wait"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--idempotency-keys"));
}
