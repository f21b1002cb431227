//! Every answer to POST /orders is true when the answer to COMMIT is lost: a
//! TCP proxy between order-service and Postgres breaks the connection right
//! after order-service sent COMMIT (the database committed), before it (the
//! database rolls back), or holds every byte (nothing can be learnt).

use std::time::Duration;

use order_service::error::ApiError;
use order_service::orders::ValidLine;
use order_service::writer::{NewOrder, WriteOptions, WriterMetrics, Written, write_batch};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use test_support::{Fault, FaultProxy, OnMatch};

use crate::helpers::{TestApp, spawn_with_args};

/// The bytes sqlx sends to commit: a simple query `COMMIT`.
const COMMIT: &[u8] = b"COMMIT";

fn order() -> Value {
    json!({"customer_id": "alice", "items": [{"sku": "SKU-001", "quantity": 1}]})
}

/// order-service whose API pool reaches this test's database through `proxy`.
async fn spawn_behind(db: &PgPool, proxy: &FaultProxy, extra: &[&str]) -> TestApp {
    let pool = pool_behind(db, proxy).await;
    let mut args = vec!["--relay-workers", "0", "--commit-deadline", "1s"];
    args.extend(extra);
    let mut app = spawn_with_args(pool, &args).await;
    // Counts are read directly, not through the proxy.
    app.db = db.clone();
    app
}

async fn orders(db: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(db).await.expect("count")
}

async fn error_code(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("a JSON body");
    let text = |field: &str| body[field].as_str().unwrap_or_default().to_owned();
    (status, text("error"), text("message"))
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_commit_whose_answer_is_lost_after_it_was_made_is_answered_201(db: PgPool) {
    let proxy = FaultProxy::database().await;
    let app = spawn_behind(&db, &proxy, &[]).await;
    proxy.arm(COMMIT, OnMatch::LoseAnswer);

    let response = app.post_order(&order()).await;

    assert!(proxy.fired(), "the proxy saw the COMMIT");
    assert_eq!(response.status(), 201, "the order exists: {:?}", error_code(response).await);
    let placed: Value = response.json().await.expect("the order");
    let id: uuid::Uuid = placed["id"].as_str().expect("id").parse().expect("uuid");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = $1")
        .bind(id)
        .fetch_one(&db)
        .await
        .expect("count");
    assert_eq!(stored, 1, "the order answered is the order stored");
    assert_eq!(orders(&db).await, 1, "and it is the only one");
}

/// `count` orders of one SKU, without keys, as the writer gets them.
fn batch(count: usize) -> Vec<NewOrder> {
    (0..count)
        .map(|n| NewOrder {
            customer_id: format!("c-{n}"),
            lines: vec![ValidLine { sku: "SKU-001".to_owned(), quantity: 1 }],
            key: None,
            trace: Default::default(),
        })
        .collect()
}

/// A pool of this test's database through `proxy`.
async fn pool_behind(db: &PgPool, proxy: &FaultProxy) -> PgPool {
    let options = (*db.connect_options()).clone().host("127.0.0.1").port(proxy.port);
    PgPoolOptions::new().max_connections(2).connect_with(options).await.expect("pool")
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn every_order_of_a_batch_whose_commit_answer_is_lost_gets_its_answer(db: PgPool) {
    let proxy = FaultProxy::database().await;
    let pool = pool_behind(&db, &proxy).await;
    let options =
        WriteOptions { commit_deadline: Duration::from_secs(1), ..WriteOptions::default() };
    let metrics = WriterMetrics::register(&mut Registry::default());

    // One transaction of eight orders, whose COMMIT answer is lost.
    proxy.arm(COMMIT, OnMatch::LoseAnswer);
    let results = write_batch(&pool, &batch(8), options, &metrics).await;
    assert!(proxy.fired());
    assert!(
        results.iter().all(|result| matches!(result, Ok(Written::Placed(_)))),
        "every order of the batch committed and is answered so: {results:?}"
    );
    assert_eq!(orders(&db).await, 8);

    // Another, whose outcome cannot be learnt: every order is told so.
    proxy.arm(COMMIT, OnMatch::HoldAll);
    let results = write_batch(&pool, &batch(8), options, &metrics).await;
    assert!(
        results.iter().all(|result| matches!(result, Err(ApiError::CommitOutcomeUnknown(_)))),
        "{results:?}"
    );
    proxy.set(Fault::Pass);
    assert!(
        test_support::eventually(Duration::from_secs(10), || async { orders(&db).await == 16 })
            .await,
        "the COMMIT had arrived: all eight committed"
    );
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_commit_that_never_reached_the_database_is_answered_503_retry(db: PgPool) {
    let proxy = FaultProxy::database().await;
    let app = spawn_behind(&db, &proxy, &[]).await;
    proxy.arm(COMMIT, OnMatch::Swallow);

    let response = app.post_order(&order()).await;

    assert!(proxy.fired());
    let (status, code, message) = error_code(response).await;
    assert_eq!((status, code.as_str()), (503, "database_unavailable"), "{message}");
    assert!(message.contains("nothing was written"), "{message}");
    assert_eq!(orders(&db).await, 0, "rolled back: a retry places it once");
    let retried = app.post_order(&order()).await;
    assert_eq!(retried.status(), 201);
    assert_eq!(orders(&db).await, 1);
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_commit_whose_outcome_cannot_be_learnt_says_so_not_timeout(db: PgPool) {
    let proxy = FaultProxy::database().await;
    // The request timeout is shorter than the commit deadline: once its order
    // is in a transaction, the outcome answers, not the timeout.
    let app = spawn_behind(&db, &proxy, &["--request-timeout-ms", "300"]).await;
    proxy.arm(COMMIT, OnMatch::HoldAll);

    let started = std::time::Instant::now();
    let response = app.post_order_with_key("lost-1", &order()).await;
    let took = started.elapsed();

    assert!(proxy.fired());
    let (status, code, message) = error_code(response).await;
    assert_eq!((status, code.as_str()), (503, "commit_outcome_unknown"), "{message}");
    assert!(message.contains("same Idempotency-Key"), "{message}");
    assert!(took < Duration::from_secs(5), "bounded by twice the commit deadline: {took:?}");

    // The partition ends; the COMMIT had arrived, so the order exists, and the
    // retry the answer asked for finds it.
    proxy.set(Fault::Pass);
    assert!(
        test_support::eventually(Duration::from_secs(10), || async { orders(&db).await == 1 })
            .await
    );
    let retried = app.post_order_with_key("lost-1", &order()).await;
    assert_eq!(retried.status(), 201);
    assert_eq!(retried.headers()["idempotent-replayed"], "true");
    assert_eq!(orders(&db).await, 1, "placed once");
}

/// The id of a transaction of its own that committed, as `pg_current_xact_id()`
/// gives it.
async fn a_committed_xid(db: &PgPool) -> String {
    let mut tx = db.begin().await.expect("begin");
    let xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *tx)
        .await
        .expect("xid");
    tx.commit().await.expect("commit");
    xid
}

/// After a crash of the database, the id of a transaction whose COMMIT never
/// reached durable WAL is given again, and `pg_xact_status` then says
/// `committed` of another transaction. The orders decide: a transaction that
/// has ended (its backend gone) committed exactly when its orders are there.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_lost_commit_whose_id_was_given_again_is_judged_by_its_orders(db: PgPool) {
    use order_service::commit::{CommitOutcome, XactId, resolve};

    // The id committed, for someone else: this batch's backend is gone (no pid
    // runs it) and its order is not in the database.
    let reused = XactId { xid: a_committed_xid(&db).await, backend: i32::MAX };
    let missing = [uuid::Uuid::now_v7()];
    let outcome = resolve(&db, &reused, &missing, Duration::from_secs(5)).await;
    assert_eq!(outcome, CommitOutcome::Aborted, "its order does not exist");

    // Its orders there: it committed.
    let placed: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO orders (id, customer_id, total_cents) VALUES ($1, 'c', 0) RETURNING id",
    )
    .bind(uuid::Uuid::now_v7())
    .fetch_one(&db)
    .await
    .expect("order");
    let outcome = resolve(&db, &reused, &[placed], Duration::from_secs(5)).await;
    assert_eq!(outcome, CommitOutcome::Committed);
    // Some of them: no answer can be true.
    let outcome = resolve(&db, &reused, &[placed, missing[0]], Duration::from_secs(5)).await;
    assert!(matches!(outcome, CommitOutcome::Unknown(_)), "{outcome:?}");
}
