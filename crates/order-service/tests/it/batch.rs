//! Group commit: orders written together, each still whole or not at all, and
//! each request's problem answered to that request alone.

use std::time::Duration;

use chrono::{DateTime, Utc};
use order_service::error::ApiError;
use order_service::idempotency::IdempotencyKey;
use order_service::orders::ValidLine;
use order_service::writer::{NewOrder, WriteOptions, WriterMetrics, Written, write_batch};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{RowCounts, spawn_with_args};

fn order(customer: &str, lines: &[(&str, i32)], key: Option<(&str, Value)>) -> NewOrder {
    let key = key.map(|(key, request)| {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("idempotency-key", key.parse().expect("header value"));
        (IdempotencyKey::from_headers(&headers).expect("valid").expect("present"), request)
    });
    NewOrder {
        customer_id: customer.to_owned(),
        lines: lines
            .iter()
            .map(|(sku, quantity)| ValidLine { sku: (*sku).to_owned(), quantity: *quantity })
            .collect(),
        key,
        trace: Default::default(),
    }
}

async fn write(db: &PgPool, orders: &[NewOrder]) -> Vec<Result<Written, ApiError>> {
    let metrics = WriterMetrics::register(&mut Registry::default());
    let results = write_batch(db, orders, WriteOptions::default(), &metrics).await;
    assert_eq!(results.len(), orders.len(), "one answer per order");
    results
}

fn placed(result: &Result<Written, ApiError>) -> &order_service::orders::Order {
    match result {
        Ok(Written::Placed(order)) => order,
        other => panic!("expected a placed order, got {other:?}"),
    }
}

async fn counts(db: &PgPool) -> RowCounts {
    let (orders, lines, events, keys) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM order_lines),
                (SELECT count(*) FROM outbox), (SELECT count(*) FROM idempotency_keys)",
    )
    .fetch_one(db)
    .await
    .expect("counts");
    RowCounts { orders, lines, events, keys }
}

/// Each placed order's event names it, and nothing else is in the outbox.
async fn events_match_orders(db: &PgPool) {
    let unmatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders o FULL JOIN outbox e ON e.aggregate_id = o.id::text
         WHERE o.id IS NULL OR e.id IS NULL",
    )
    .fetch_one(db)
    .await
    .expect("join");
    assert_eq!(unmatched, 0, "an order without its event, or an event without its order");
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn an_unknown_sku_fails_its_order_alone(db: PgPool) {
    let orders = [
        order("a", &[("SKU-001", 1), ("SKU-003", 2)], None),
        order("b", &[("SKU-002", 1), ("SKU-404", 1)], None),
        order("c", &[("SKU-002", 3)], None),
    ];

    let results = write(&db, &orders).await;

    match &results[1] {
        Err(ApiError::Validation { code: "unknown_sku", message }) => {
            assert!(message.contains("items[1]"), "{message}");
        }
        other => panic!("expected unknown_sku, got {other:?}"),
    }
    let (a, c) = (placed(&results[0]), placed(&results[2]));
    assert_eq!((a.customer_id.as_str(), c.customer_id.as_str()), ("a", "c"));
    assert_eq!(a.items.len(), 2);
    // One transaction: both orders carry its start time.
    let created: Vec<DateTime<Utc>> =
        sqlx::query_scalar("SELECT created_at FROM orders").fetch_all(&db).await.expect("orders");
    assert_eq!(created, vec![a.created_at, a.created_at]);
    assert_eq!(counts(&db).await, RowCounts { orders: 2, lines: 3, events: 2, keys: 0 });
    events_match_orders(&db).await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn one_key_twice_in_a_batch_places_one_order(db: PgPool) {
    let body = json!({"customer_id": "a", "items": [{"sku": "SKU-001", "quantity": 1}]});
    let other_body = json!({"customer_id": "b", "items": [{"sku": "SKU-002", "quantity": 1}]});
    let orders = [
        order("a", &[("SKU-001", 1)], Some(("key-1", body.clone()))),
        order("a", &[("SKU-001", 1)], Some(("key-1", body))),
        order("b", &[("SKU-002", 1)], Some(("key-1", other_body))),
        order("d", &[("SKU-004", 1)], None),
    ];

    let results = write(&db, &orders).await;

    let first = placed(&results[0]).id;
    assert!(matches!(results[1], Ok(Written::KeyTaken)), "{:?}", results[1]);
    assert!(matches!(results[2], Ok(Written::KeyTaken)), "{:?}", results[2]);
    placed(&results[3]);
    let stored: uuid::Uuid = sqlx::query_scalar("SELECT order_id FROM idempotency_keys")
        .fetch_one(&db)
        .await
        .expect("one key");
    assert_eq!(stored, first, "the key answers with the first request's order");
    assert_eq!(counts(&db).await, RowCounts { orders: 2, lines: 2, events: 2, keys: 1 });
    events_match_orders(&db).await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_key_committed_by_another_request_is_taken_back(db: PgPool) {
    let body = json!({"customer_id": "a", "items": [{"sku": "SKU-001", "quantity": 1}]});
    placed(&write(&db, &[order("a", &[("SKU-001", 1)], Some(("key-1", body.clone())))]).await[0]);

    let results = write(
        &db,
        &[
            order("x", &[("SKU-002", 1)], None),
            order("a", &[("SKU-001", 1)], Some(("key-1", body))),
        ],
    )
    .await;

    placed(&results[0]);
    assert!(matches!(results[1], Ok(Written::KeyTaken)), "{:?}", results[1]);
    assert_eq!(counts(&db).await, RowCounts { orders: 2, lines: 2, events: 2, keys: 1 });
    events_match_orders(&db).await;
}

/// Makes the database refuse every order of the customer `poison`.
async fn refuse_poison_orders(db: &PgPool) {
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.customer_id = 'poison' THEN RAISE EXCEPTION 'injected failure'; END IF;
             RETURN NEW;
         END; $$;
         CREATE TRIGGER refuse_poison BEFORE INSERT ON orders
             FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .execute(db)
    .await
    .expect("failure trigger installed");
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_failure_mid_batch_lands_on_its_order_alone(db: PgPool) {
    refuse_poison_orders(&db).await;
    let body = |customer: &str| json!({"customer_id": customer, "items": []});
    let orders = [
        order("a", &[("SKU-001", 1)], None),
        order("poison", &[("SKU-002", 1)], Some(("poison-key", body("poison")))),
        order("c", &[("SKU-003", 1)], Some(("c-key", body("c")))),
    ];

    let results = write(&db, &orders).await;

    placed(&results[0]);
    assert!(matches!(results[1], Err(ApiError::Database(_))), "{:?}", results[1]);
    placed(&results[2]);
    assert_eq!(counts(&db).await, RowCounts { orders: 2, lines: 2, events: 2, keys: 1 });
    events_match_orders(&db).await;
    let poison: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM idempotency_keys WHERE idempotency_key = 'poison-key'",
    )
    .fetch_one(&db)
    .await
    .expect("count");
    assert_eq!(poison, 0, "nothing of the refused order is left");
}

/// Holds `LOCK TABLE inventory` until the transaction returned is committed:
/// a batch then waits at its price lookup.
async fn lock_inventory(db: &PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut lock = db.begin().await.expect("begin");
    sqlx::query("LOCK TABLE inventory IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    lock
}

/// Returns once `count` of this database's backends wait for a lock.
async fn until_waiting_for_locks(db: &PgPool, count: i64) {
    let waiting = "SELECT count(*) FROM pg_stat_activity \
                   WHERE wait_event_type = 'Lock' AND datname = current_database()";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sqlx::query_scalar::<_, i64>(waiting).fetch_one(db).await.expect("waiting") < count {
        assert!(tokio::time::Instant::now() < deadline, "{count} writers never waited together");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An order of one SKU-001, from customer `c-<n>`.
fn one_line_order(n: usize) -> Value {
    json!({"customer_id": format!("c-{n}"), "items": [{"sku": "SKU-001", "quantity": 1}]})
}

/// The value of sample `name` in a `/metrics` text.
fn metric(metrics: &str, name: &str) -> f64 {
    test_support::sample(metrics, name).unwrap_or_else(|| panic!("{name} in {metrics}"))
}

/// Over HTTP: requests that queue while the writer is busy share its next
/// transaction, and each gets its own answer.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn concurrent_requests_share_transactions_and_get_their_own_answers(db: PgPool) {
    let app = spawn_with_args(db, &["--relay-workers", "0", "--write-concurrency", "1"]).await;
    // Hold the writer's first transaction at its price lookup, so the others queue.
    let lock = lock_inventory(&app.db).await;

    let good = one_line_order;
    let unknown = json!({"customer_id": "u", "items": [{"sku": "SKU-404", "quantity": 1}]});
    let keyed = good(100);
    let mut requests = Vec::new();
    for n in 0..12 {
        requests.push((good(n), None));
    }
    requests.push((unknown, None));
    for _ in 0..3 {
        requests.push((keyed.clone(), Some("shared-key")));
    }
    let sending = futures_util::future::join_all(requests.iter().map(|(body, key)| async {
        match key {
            Some(key) => app.post_order_with_key(key, body).await,
            None => app.post_order(body).await,
        }
    }));
    let release = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        lock.commit().await.expect("unlock");
    };
    let (responses, ()) = tokio::join!(sending, release);

    let mut statuses = Vec::new();
    let mut keyed_ids = Vec::new();
    for ((body, key), response) in requests.iter().zip(responses) {
        let status = response.status().as_u16();
        let answer: Value = response.json().await.expect("json");
        match body["customer_id"].as_str() {
            Some("u") => assert_eq!(answer["error"], "unknown_sku"),
            Some(customer) => {
                assert_eq!(answer["customer_id"], customer, "each request gets its own order");
                if key.is_some() {
                    keyed_ids.push(answer["id"].clone());
                }
            }
            None => unreachable!(),
        }
        statuses.push(status);
    }
    assert_eq!(statuses.iter().filter(|&&s| s == 201).count(), 15, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 422).count(), 1, "{statuses:?}");
    keyed_ids.dedup();
    assert_eq!(keyed_ids.len(), 1, "one order for the shared key: {keyed_ids:?}");
    assert_eq!(app.row_counts().await, RowCounts { orders: 13, lines: 13, events: 13, keys: 1 });
    events_match_orders(&app.db).await;

    let metrics = app.metrics().await;
    let value = |name: &str| metric(&metrics, name);
    assert_eq!(value("order_write_batch_size_sum"), 13.0, "every placed order counted once");
    let transactions = value("order_write_batch_size_count");
    assert!(transactions <= 4.0, "13 orders in {transactions} transactions: not batched");
}

/// The writers take turns: while one stages its batch, the orders that arrive
/// wait for it to send its `COMMIT` and then all go into the next writer's
/// batch, instead of a free writer taking the first of them alone.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_free_writer_waits_for_the_staging_one_to_commit(db: PgPool) {
    let app = spawn_with_args(db, &["--relay-workers", "0", "--write-concurrency", "2"]).await;
    let lock = lock_inventory(&app.db).await;

    // The first writer's batch of one waits at its price lookup.
    let orders: Vec<Value> = (0..=10).map(one_line_order).collect();
    let app = &app;
    let first = app.post_order(&orders[0]);
    let rest = async {
        until_waiting_for_locks(&app.db, 1).await;
        let sending = futures_util::future::join_all(orders[1..].iter().zip(1..).map(
            |(body, n)| async move {
                // One after another, so that a free writer would take the first alone.
                tokio::time::sleep(Duration::from_millis(20) * n).await;
                app.post_order(body).await
            },
        ));
        let release = async {
            // Well after the last is sent (200 ms), even on a busy machine.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            lock.commit().await.expect("unlock");
        };
        tokio::join!(sending, release).0
    };
    let (first, rest) = tokio::join!(first, rest);
    for response in std::iter::once(first).chain(rest) {
        assert_eq!(response.status().as_u16(), 201);
    }

    let metrics = app.metrics().await;
    let value = |name: &str| metric(&metrics, name);
    assert_eq!(value("order_write_batch_size_sum"), 11.0);
    assert_eq!(
        value("order_write_batch_size_count"),
        2.0,
        "the first order, then the ten that queued behind it: {metrics}"
    );
}

/// Without batches (`WRITE_BATCH_MAX=1`) the writers take no turns: each
/// writes its order while the others write theirs.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn single_order_writers_write_side_by_side(db: PgPool) {
    let args = ["--relay-workers", "0", "--write-batch-max", "1", "--write-concurrency", "3"];
    let app = spawn_with_args(db, &args).await;
    let lock = lock_inventory(&app.db).await;
    let orders: Vec<Value> = (0..3).map(one_line_order).collect();
    let app = &app;
    let sending = futures_util::future::join_all(orders.iter().map(|body| app.post_order(body)));
    let release = async {
        // All three transactions wait at their price lookup at once.
        until_waiting_for_locks(&app.db, 3).await;
        lock.commit().await.expect("unlock");
    };
    let (responses, ()) = tokio::join!(sending, release);
    for response in responses {
        assert_eq!(response.status().as_u16(), 201);
    }
}
