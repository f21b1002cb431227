//! `--idempotency-keys`: every order carries a key of its own, which the service
//! stores with the order.

use sqlx::PgPool;

use crate::helpers::{spawn_app, stress_test};

#[sqlx::test(migrator = "common::MIGRATOR")]
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

#[sqlx::test(migrator = "common::MIGRATOR")]
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
