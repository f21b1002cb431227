//! POST /orders writes order, lines and event together or not at all.

use order_events::OrderPlaced;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{RowCounts, spawn_app, spawn_with_args};

fn two_line_order() -> Value {
    json!({"customer_id": "alice", "items": [{"sku": "SKU-001", "quantity": 2}, {"sku": "SKU-002", "quantity": 1}]})
}

async fn price_of(db: &PgPool, sku: &str) -> i64 {
    sqlx::query_scalar("SELECT price_cents FROM inventory WHERE sku = $1")
        .bind(sku)
        .fetch_one(db)
        .await
        .expect("catalogue price")
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn order_lines_and_event_are_committed_together(db: PgPool) {
    let app = spawn_app(db).await;

    let response = app.post_order(&two_line_order()).await;

    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().expect("ascii").to_owned();
    let order: Value = response.json().await.expect("json body");
    let id: Uuid = order["id"].as_str().expect("id").parse().expect("uuid");
    assert_eq!(location, format!("/orders/{id}"));
    assert_eq!(order["status"], "PENDING");
    let expected_total =
        2 * price_of(&app.db, "SKU-001").await + price_of(&app.db, "SKU-002").await;
    assert_eq!(order["total_cents"], expected_total);

    assert_eq!(app.row_counts().await, RowCounts { orders: 1, lines: 2, events: 1, keys: 0 });
    let (aggregate_type, aggregate_id, event_type, payload, attempts): (
        String,
        String,
        String,
        Value,
        i32,
    ) = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, event_type, payload, attempts FROM outbox",
    )
    .fetch_one(&app.db)
    .await
    .expect("one event");
    assert_eq!((aggregate_type.as_str(), event_type.as_str()), ("order", "OrderPlaced"));
    assert_eq!(aggregate_id, id.to_string());
    assert_eq!(attempts, 0);
    let event: OrderPlaced = serde_json::from_value(payload).expect("an OrderPlaced payload");
    assert_eq!(event.order_id, id);
    assert_eq!(event.total_cents, expected_total);
    let lines: Vec<(String, i32)> =
        event.lines.into_iter().map(|line| (line.sku, line.quantity)).collect();
    assert_eq!(lines, vec![("SKU-001".to_owned(), 2), ("SKU-002".to_owned(), 1)]);

    let fetched: Value = app
        .client
        .get(format!("{}{location}", app.address))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(fetched, order);
}

/// Makes every insert into `outbox` fail, after the order and its lines were written.
async fn fail_outbox_inserts(db: &PgPool) {
    sqlx::raw_sql(
        "CREATE FUNCTION fail_injected() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'injected failure'; END; $$;
         CREATE TRIGGER fail_injected BEFORE INSERT ON outbox
             FOR EACH ROW EXECUTE FUNCTION fail_injected();",
    )
    .execute(db)
    .await
    .expect("failure trigger installed");
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_failure_before_commit_leaves_no_order_and_no_event(db: PgPool) {
    let app = spawn_app(db).await;
    fail_outbox_inserts(&app.db).await;

    let response = app.post_order_with_key("failing-1", &two_line_order()).await;

    assert_eq!(response.status(), 500);
    let body = response.text().await.expect("body");
    assert!(!body.contains("injected"), "internal error text leaked: {body}");
    assert_eq!(serde_json::from_str::<Value>(&body).expect("json")["error"], "internal");
    assert_eq!(app.row_counts().await, RowCounts::NONE);
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_failure_at_commit_leaves_no_order_and_no_event(db: PgPool) {
    let app = spawn_app(db).await;
    // A deferred constraint trigger runs at COMMIT, after every statement succeeded.
    sqlx::raw_sql(
        "CREATE FUNCTION fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'injected failure at commit'; END; $$;
         CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON outbox
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_at_commit();",
    )
    .execute(&app.db)
    .await
    .expect("failure trigger installed");

    let response = app.post_order(&two_line_order()).await;

    assert_eq!(response.status(), 500);
    assert_eq!(app.row_counts().await, RowCounts::NONE);
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_retry_after_a_failed_attempt_creates_the_order_once(db: PgPool) {
    let app = spawn_app(db).await;
    fail_outbox_inserts(&app.db).await;
    let failed = app.post_order_with_key("retry-me", &two_line_order()).await;
    assert_eq!(failed.status(), 500);

    sqlx::query("DROP TRIGGER fail_injected ON outbox").execute(&app.db).await.expect("drop");
    let retried = app.post_order_with_key("retry-me", &two_line_order()).await;

    assert_eq!(retried.status(), 201);
    assert_eq!(app.row_counts().await, RowCounts { orders: 1, lines: 2, events: 1, keys: 1 });
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn bad_input_gets_a_named_4xx_and_writes_nothing(db: PgPool) {
    let app = spawn_app(db).await;
    let url = format!("{}/orders", app.address);
    let item = |sku: &str, quantity: Value| json!({"customer_id": "c", "items": [{"sku": sku, "quantity": quantity}]});
    let oversized = json!({"customer_id": "x".repeat(100 * 1024), "items": [{"sku": "SKU-001", "quantity": 1}]});

    let json_cases: Vec<(&str, Value, u16, &str)> = vec![
        ("empty items", json!({"customer_id": "c", "items": []}), 422, "empty_items"),
        ("zero quantity", item("SKU-001", json!(0)), 422, "invalid_quantity"),
        ("negative quantity", item("SKU-001", json!(-2)), 422, "invalid_quantity"),
        ("absurd quantity", item("SKU-001", json!(1_000_000_000)), 422, "invalid_quantity"),
        ("quantity beyond i64", item("SKU-001", json!(1e30)), 422, "invalid_body"),
        ("quantity as text", item("SKU-001", json!("2")), 422, "invalid_body"),
        ("unknown SKU", item("NO-SUCH-SKU", json!(1)), 422, "unknown_sku"),
        ("empty SKU", item("", json!(1)), 422, "invalid_sku"),
        // Postgres text cannot hold U+0000: these were a 500 before validation refused them.
        ("NUL in a SKU", item("SKU\u{0}001", json!(1)), 422, "invalid_sku"),
        (
            "NUL in the customer",
            json!({"customer_id": "\u{0}", "items": [{"sku": "SKU-001", "quantity": 1}]}),
            422,
            "invalid_customer_id",
        ),
        (
            "missing customer",
            json!({"items": [{"sku": "SKU-001", "quantity": 1}]}),
            422,
            "invalid_body",
        ),
        (
            "blank customer",
            json!({"customer_id": " ", "items": [{"sku": "SKU-001", "quantity": 1}]}),
            422,
            "invalid_customer_id",
        ),
        (
            "unknown field",
            json!({"customer_id": "c", "items": [], "price": 1}),
            422,
            "invalid_body",
        ),
        (
            "client-set price",
            json!({"customer_id": "c", "items": [{"sku": "SKU-001", "quantity": 1, "unit_price_cents": 1}]}),
            422,
            "invalid_body",
        ),
        (
            "duplicate SKU",
            json!({"customer_id": "c", "items": [{"sku": "SKU-001", "quantity": 1}, {"sku": "SKU-001", "quantity": 2}]}),
            422,
            "duplicate_sku",
        ),
        ("not an object", json!([1, 2]), 422, "invalid_body"),
        ("oversized body", oversized, 413, "body_too_large"),
    ];
    for (case, body, status, code) in json_cases {
        let response = app.post_order(&body).await;
        assert_eq!(response.status(), status, "{case}");
        let error: Value =
            response.json().await.unwrap_or_else(|e| panic!("{case}: JSON error body: {e}"));
        assert_eq!(error["error"], code, "{case}: {error}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{case}: {error}");
    }

    let raw_cases: Vec<(&str, Option<&str>, &str, u16, &str)> = vec![
        ("malformed JSON", Some("application/json"), "{\"customer_id\": ", 400, "malformed_json"),
        ("no content type", None, "{}", 415, "unsupported_media_type"),
        ("wrong content type", Some("text/plain"), "{}", 415, "unsupported_media_type"),
    ];
    for (case, content_type, body, status, code) in raw_cases {
        let mut request = app.client.post(&url).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.expect("sent");
        assert_eq!(response.status(), status, "{case}");
        let error: Value = response.json().await.expect("JSON error body");
        assert_eq!(error["error"], code, "{case}: {error}");
    }

    let bad_key = app.post_order_with_key(&"k".repeat(300), &two_line_order()).await;
    assert_eq!(bad_key.status(), 400);
    assert_eq!(bad_key.json::<Value>().await.expect("json")["error"], "invalid_idempotency_key");

    assert_eq!(app.row_counts().await, RowCounts::NONE);
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn unknown_orders_are_404(db: PgPool) {
    let app = spawn_app(db).await;
    for path in [format!("/orders/{}", Uuid::now_v7()), "/orders/not-a-uuid".to_owned()] {
        let response = app.client.get(format!("{}{path}", app.address)).send().await.expect("get");
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(response.json::<Value>().await.expect("json")["error"], "not_found");
    }
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_retry_with_the_same_key_returns_the_original_response(db: PgPool) {
    let app = spawn_app(db).await;

    let first = app.post_order_with_key("key-1", &two_line_order()).await;
    assert_eq!(first.status(), 201);
    let first_location = first.headers()["location"].clone();
    let first_body: Value = first.json().await.expect("json");
    let retry = app.post_order_with_key("key-1", &two_line_order()).await;

    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["location"], first_location);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.json::<Value>().await.expect("json"), first_body);
    assert_eq!(app.row_counts().await, RowCounts { orders: 1, lines: 2, events: 1, keys: 1 });
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn the_same_key_with_another_body_is_refused(db: PgPool) {
    let app = spawn_app(db).await;
    assert_eq!(app.post_order_with_key("key-2", &two_line_order()).await.status(), 201);

    let other = json!({"customer_id": "alice", "items": [{"sku": "SKU-003", "quantity": 1}]});
    let response = app.post_order_with_key("key-2", &other).await;

    assert_eq!(response.status(), 422);
    let error: Value = response.json().await.expect("json");
    assert_eq!(error["error"], "idempotency_key_reused");
    assert_eq!(app.row_counts().await, RowCounts { orders: 1, lines: 2, events: 1, keys: 1 });
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn concurrent_requests_with_one_key_create_one_order(db: PgPool) {
    let app = spawn_app(db).await;
    let body = two_line_order();

    let responses = futures_util::future::join_all(
        (0..8).map(|_| app.post_order_with_key("concurrent-key", &body)),
    )
    .await;

    let mut ids = Vec::new();
    for response in responses {
        assert_eq!(response.status(), 201);
        ids.push(response.json::<Value>().await.expect("json")["id"].clone());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every response names the same order: {ids:?}");
    assert_eq!(app.row_counts().await, RowCounts { orders: 1, lines: 2, events: 1, keys: 1 });
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn health_and_readiness(db: PgPool) {
    let app = spawn_app(db).await;
    let health = app.client.get(format!("{}/healthz", app.address)).send().await.expect("get");
    assert_eq!(health.status(), 200);
    let ready = app.client.get(format!("{}/readyz", app.address)).send().await.expect("get");
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().await.expect("json")["database"], "up");
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_database_outage_is_a_503_and_not_ready(db: PgPool) {
    let app = spawn_app(db).await;
    app.db.close().await; // the app shares this pool: it can no longer reach Postgres

    let response = app.post_order(&two_line_order()).await;
    assert_eq!(response.status(), 503);
    let error: Value = response.json().await.expect("json");
    assert_eq!(error["error"], "database_unavailable");

    let ready = app.client.get(format!("{}/readyz", app.address)).send().await.expect("get");
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.json::<Value>().await.expect("json")["database"], "down");
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_key_past_its_ttl_creates_a_new_order(db: PgPool) {
    let args = ["--relay-workers", "0", "--idempotency-key-ttl", "1s", "--sweep-interval", "100ms"];
    let app = spawn_with_args(db, &args).await;
    let first = app.post_order_with_key("ttl-key", &two_line_order()).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.expect("json");

    // The TTL passes and the service's sweeper forgets the key.
    let forgotten = test_support::eventually(std::time::Duration::from_secs(10), || async {
        app.row_counts().await.keys == 0
    })
    .await;
    assert!(forgotten, "the key is swept a second after its order");

    let second = app.post_order_with_key("ttl-key", &two_line_order()).await;
    assert_eq!(second.status(), 201);
    assert!(second.headers().get("idempotent-replayed").is_none(), "not a replay");
    let second: Value = second.json().await.expect("json");
    assert_ne!(first["id"], second["id"], "a new order");
    assert_eq!(app.row_counts().await, RowCounts { orders: 2, lines: 4, events: 2, keys: 1 });
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_body_that_never_arrives_is_answered_408_within_the_timeout(db: PgPool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_with_args(db, &["--relay-workers", "0", "--request-timeout-ms", "300"]).await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.expect("connect");
    // Promises 100 bytes and sends 10.
    stream
        .write_all(
            b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"customer",
        )
        .await
        .expect("send");
    let mut answer = vec![0u8; 1024];
    let read = tokio::time::timeout(std::time::Duration::from_secs(3), stream.read(&mut answer))
        .await
        .expect("answered, not left hanging")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert_eq!(app.row_counts().await, RowCounts::NONE);
}
