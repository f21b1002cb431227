//! `POST /orders/{id}/cancel`: the request and its `OrderCancelled` event in one
//! transaction, answered 202 with the order; once per order; the errors each
//! with its code; Idempotency-Key as for `POST /orders`.

use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestApp, spawn_app};

async fn place(app: &TestApp) -> Uuid {
    let body = json!({"customer_id": "cancel", "items": [
        {"sku": "SKU-002", "quantity": 2}, {"sku": "SKU-001", "quantity": 1}]});
    let response = app.post_order(&body).await;
    assert_eq!(response.status(), 201);
    let order: Value = response.json().await.expect("json");
    order["id"].as_str().expect("id").parse().expect("uuid")
}

async fn cancel(app: &TestApp, id: &str, key: Option<&str>, body: &str) -> reqwest::Response {
    let mut request = app
        .client
        .post(format!("{}/orders/{id}/cancel", app.address))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.expect("post")
}

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("a JSON error body");
    assert!(body["message"].as_str().is_some_and(|message| !message.is_empty()), "{body}");
    (status, body["error"].as_str().expect("code").to_owned())
}

/// The OrderCancelled events in the outbox: (aggregate id, payload).
async fn cancel_events(db: &PgPool) -> Vec<(String, Value)> {
    sqlx::query_as(
        "SELECT aggregate_id, payload FROM outbox WHERE event_type = 'OrderCancelled' ORDER BY id",
    )
    .fetch_all(db)
    .await
    .expect("events")
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_cancel_is_accepted_once_with_its_event_and_again_without_one(db: PgPool) {
    let app = spawn_app(db).await;
    let id = place(&app).await;

    let response = cancel(&app, &id.to_string(), None, "").await;

    assert_eq!(response.status(), 202);
    let order: Value = response.json().await.expect("the order");
    assert_eq!(order["id"], id.to_string());
    assert_eq!(order["status"], "PENDING", "CANCELLED once the consumer applied it");
    let [(aggregate, payload)] = &cancel_events(&app.db).await[..] else { panic!("one event") };
    assert_eq!(aggregate, &id.to_string());
    assert_eq!(
        payload,
        &json!({"order_id": id, "lines": [
            {"sku": "SKU-001", "quantity": 1}, {"sku": "SKU-002", "quantity": 2}]})
    );
    let requested: i64 =
        sqlx::query_scalar("SELECT count(*) FROM order_cancellations WHERE order_id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .expect("count");
    assert_eq!(requested, 1);

    let again = cancel(&app, &id.to_string(), None, "  ").await;
    assert_eq!(again.status(), 202, "a second cancel is accepted too");
    assert_eq!(cancel_events(&app.db).await.len(), 1, "and writes nothing new");
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_cancel_that_cannot_be_is_refused_with_its_code_and_writes_nothing(db: PgPool) {
    let app = spawn_app(db).await;
    let id = place(&app).await;

    let unknown = cancel(&app, &Uuid::now_v7().to_string(), None, "").await;
    assert_eq!(error_code(unknown).await, (404, "order_not_found".to_owned()));
    let malformed = cancel(&app, "not-an-id", None, "").await;
    assert_eq!(error_code(malformed).await, (422, "invalid_order_id".to_owned()));
    let with_body = cancel(&app, &id.to_string(), None, r#"{"reason": "changed my mind"}"#).await;
    assert_eq!(error_code(with_body).await, (422, "invalid_body".to_owned()));
    sqlx::query("UPDATE orders SET status = 'REJECTED' WHERE id = $1")
        .bind(id)
        .execute(&app.db)
        .await
        .expect("rejected");
    let rejected = cancel(&app, &id.to_string(), None, "").await;
    assert_eq!(error_code(rejected).await, (409, "order_not_cancellable".to_owned()));

    assert!(cancel_events(&app.db).await.is_empty(), "nothing was written");
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn an_idempotency_key_replays_its_cancel_and_refuses_another_request(db: PgPool) {
    let app = spawn_app(db).await;
    let id = place(&app).await;
    let other = place(&app).await;

    let first = cancel(&app, &id.to_string(), Some("cancel-1"), "").await;
    assert_eq!(first.status(), 202);
    let retried = cancel(&app, &id.to_string(), Some("cancel-1"), "").await;
    assert_eq!(retried.status(), 202);
    assert_eq!(
        retried.headers().get("idempotent-replayed").map(|value| value.to_str().unwrap()),
        Some("true")
    );
    let replayed: Value = retried.json().await.expect("the order");
    assert_eq!(replayed["id"], id.to_string());

    let elsewhere = cancel(&app, &other.to_string(), Some("cancel-1"), "").await;
    assert_eq!(error_code(elsewhere).await, (422, "idempotency_key_reused".to_owned()));
    let body = json!({"customer_id": "cancel", "items": [{"sku": "SKU-001", "quantity": 1}]});
    let as_order = app.post_order_with_key("cancel-1", &body).await;
    assert_eq!(error_code(as_order).await, (422, "idempotency_key_reused".to_owned()));
    assert_eq!(cancel_events(&app.db).await.len(), 1);
}
