//! The report of the binary: its keys, its counts, and its exit status.

use std::time::Duration;

use sqlx::PgPool;

use crate::helpers::{assert_report_shape, spawn_app, status_total, stress_test};

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn orders_left_pending_are_reported_and_fail_the_run(db: PgPool) {
    let app = spawn_app(db).await;

    let run = stress_test(&[
        "--url",
        &app.address,
        "--database-url",
        &app.database_url,
        "--orders",
        "50",
        "--concurrency",
        "4",
        "--timeout",
        "2",
    ])
    .await;

    let report = &run.report;
    assert_report_shape(report);
    assert_eq!(run.u64("sent"), 50, "{report}");
    assert_eq!(run.u64("ok"), 50, "{report}");
    assert_eq!(report["status_codes"]["201"], 50, "{report}");
    assert_eq!(report["waited"], true);
    assert_eq!(report["converged"], false, "no consumer runs: {report}");
    assert!(report["converge_seconds"].as_f64().expect("waited") >= 2.0, "{report}");
    assert_eq!(status_total(report), run.u64("ok"), "{report}");
    assert_eq!(report["status_counts"]["PENDING"], 50, "{report}");
    assert_eq!(run.u64("not_found"), 0, "{report}");
    assert_eq!(report["e2e_lag_ms"]["count"], 0, "{report}");
    assert_eq!(run.exit_code(), Some(1), "not converging fails the run");

    let (orders,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM orders").fetch_one(&app.db).await.expect("count");
    assert_eq!(orders, 50, "the report counts the orders the service stored");
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_run_whose_orders_are_all_decided_converges_and_passes(db: PgPool) {
    let app = spawn_app(db).await;
    let decider = decider(&app.db, false);

    let run = stress_test(&[
        "--url",
        &app.address,
        "--database-url",
        &app.database_url,
        "--orders",
        "40",
        "--concurrency",
        "4",
        "--rate",
        "200",
        "--timeout",
        "30",
    ])
    .await;
    decider.abort();

    let report = &run.report;
    assert_report_shape(report);
    assert_eq!(run.u64("sent"), 40, "{report}");
    assert_eq!(run.u64("ok"), 40, "{report}");
    assert_eq!(report["converged"], true, "{report}");
    assert!(report["converge_seconds"].as_f64().expect("a time") < 30.0, "{report}");
    assert_eq!(report["status_counts"]["COMPLETED"], 40, "{report}");
    assert_eq!(report["status_counts"]["PENDING"], 0, "{report}");
    assert_eq!(status_total(report), 40, "{report}");
    assert_eq!(report["e2e_lag_ms"]["count"], 40, "{report}");
    assert!(report["e2e_lag_ms"]["p50"].is_number(), "{report}");
    assert!(report["e2e_lag_ms"]["p99"].is_number(), "{report}");
    assert_eq!(run.exit_code(), Some(0), "stderr: {}", String::from_utf8_lossy(&run.output.stderr));
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn refused_requests_are_client_errors(db: PgPool) {
    let app = spawn_app(db).await;

    // POST <address>/nope/orders: no such route, every answer is a 404.
    let url = format!("{}/nope", app.address);
    let run =
        stress_test(&["--url", &url, "--orders", "10", "--concurrency", "2", "--no-wait"]).await;

    let report = &run.report;
    assert_report_shape(report);
    assert_eq!(run.u64("sent"), 10, "{report}");
    assert_eq!(run.u64("client_errors"), 10, "{report}");
    assert_eq!(report["status_codes"]["404"], 10, "{report}");
    assert_eq!(report["waited"], false);
    assert_eq!(report["converged"], false);
    assert!(report["converge_seconds"].is_null(), "{report}");
    assert!(!report["error_samples"].as_array().expect("samples").is_empty(), "{report}");
    assert_eq!(run.exit_code(), Some(1));
}

#[tokio::test]
async fn an_unreachable_service_gives_transport_errors() {
    // A port that was free a moment ago: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    drop(listener);

    let run =
        stress_test(&["--url", &url, "--orders", "8", "--concurrency", "2", "--no-wait"]).await;

    let report = &run.report;
    assert_report_shape(report);
    assert_eq!(run.u64("sent"), 8, "{report}");
    assert_eq!(run.u64("transport_errors"), 8, "{report}");
    assert_eq!(run.u64("ok"), 0, "{report}");
    assert_eq!(run.exit_code(), Some(1));
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn cancelled_orders_are_waited_for_until_cancelled(db: PgPool) {
    let app = spawn_app(db).await;
    let decider = decider(&app.db, false);
    let run = stress_test(&[
        "--url",
        &app.address,
        "--database-url",
        &app.database_url,
        "--orders",
        "40",
        "--concurrency",
        "4",
        "--cancel-ratio",
        "0.5",
        "--scarce-ratio",
        "0",
        "--timeout",
        "30",
    ])
    .await;
    decider.abort();

    let report = &run.report;
    assert_report_shape(report);
    let cancels = run.u64("cancels");
    assert!((5..=35).contains(&cancels), "about half of 40 cancelled: {report}");
    assert_eq!(run.u64("cancels_accepted"), cancels, "{report}");
    assert_eq!(report["converged"], true, "{report}");
    assert_eq!(report["status_counts"]["CANCELLED"], cancels, "waited for each: {report}");
    assert_eq!(report["status_counts"]["COMPLETED"], 40 - cancels, "{report}");
    let requested: i64 = sqlx::query_scalar("SELECT count(*) FROM order_cancellations")
        .fetch_one(&app.db)
        .await
        .expect("count");
    assert_eq!(u64::try_from(requested).expect("count"), cancels, "{report}");
    assert_eq!(run.exit_code(), Some(0), "stderr: {}", String::from_utf8_lossy(&run.output.stderr));
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn late_cancels_come_after_the_delay_and_a_rejected_orders_409_is_no_failure(db: PgPool) {
    let app = spawn_app(db).await;
    let decider = decider(&app.db, true);
    let run = stress_test(&[
        "--url",
        &app.address,
        "--database-url",
        &app.database_url,
        "--orders",
        "30",
        "--concurrency",
        "4",
        "--scarce-ratio",
        "0.4",
        "--late-cancel-ratio",
        "1",
        "--late-cancel-after",
        "300ms",
        "--timeout",
        "30",
    ])
    .await;
    decider.abort();

    let report = &run.report;
    assert_report_shape(report);
    assert_eq!(run.u64("cancels"), 30, "every order cancelled late: {report}");
    let rejected = run.u64("cancels_not_cancellable");
    assert!(rejected > 0, "some orders were REJECTED before their cancel: {report}");
    assert_eq!(run.u64("cancels_accepted") + rejected, 30, "{report}");
    assert_eq!(report["status_counts"]["REJECTED"], rejected, "{report}");
    assert_eq!(report["status_counts"]["CANCELLED"], 30 - rejected, "{report}");
    // Each sent only after its delay.
    let early: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM order_cancellations AS c JOIN orders AS o ON o.id = c.order_id
         WHERE c.requested_at < o.created_at + interval '300 milliseconds'",
    )
    .fetch_one(&app.db)
    .await
    .expect("count");
    assert_eq!(early, 0, "{report}");
    assert_eq!(run.exit_code(), Some(0), "stderr: {}", String::from_utf8_lossy(&run.output.stderr));
}

/// Stands in for the inventory consumer: decides every pending order
/// (COMPLETED, or with `reject_scarce` REJECTED when it asks for a scarce SKU)
/// and, a second after it was asked for (long after its order was decided),
/// applies each cancel.
fn decider(db: &PgPool, reject_scarce: bool) -> tokio::task::JoinHandle<()> {
    let db = db.clone();
    tokio::spawn(async move {
        loop {
            sqlx::query(
                "UPDATE orders AS o SET updated_at = now(), status = CASE
                     WHEN $1 AND EXISTS (SELECT FROM order_lines AS l WHERE l.order_id = o.id
                                         AND l.sku >= 'SKU-021') THEN 'REJECTED'
                     ELSE 'COMPLETED' END
                 WHERE status = 'PENDING'",
            )
            .bind(reject_scarce)
            .execute(&db)
            .await
            .expect("orders decided");
            sqlx::query(
                "UPDATE orders AS o SET status = 'CANCELLED', updated_at = now()
                 FROM order_cancellations AS c
                 WHERE c.order_id = o.id AND o.status <> 'CANCELLED'
                   AND c.requested_at < now() - interval '1 second'",
            )
            .execute(&db)
            .await
            .expect("cancels applied");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}
