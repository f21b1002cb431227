//! The OpenAPI document: served at `/openapi.json`, equal to the committed
//! `docs/openapi.json` (so an API change shows in review), and errors of one
//! JSON shape on every route, including the ones no handler answers.

use serde_json::Value;
use sqlx::PgPool;

use crate::helpers::{spawn_app, spawn_with_args};

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn the_served_document_is_the_committed_one(db: PgPool) {
    let app = spawn_app(db).await;
    let response =
        app.client.get(format!("{}/openapi.json", app.address)).send().await.expect("get");
    assert_eq!(response.status(), 200);
    let served = response.text().await.expect("text");
    let document: Value = serde_json::from_str(&served).expect("JSON");
    assert_eq!(document["openapi"], "3.1.0");
    for path in [
        "/orders",
        "/orders/{id}",
        "/orders/{id}/cancel",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/admin/summary",
        "/admin/outbox/dead",
        "/admin/outbox/dead/{id}/replay",
        "/admin/outbox/dead/replay",
    ] {
        assert!(document["paths"][path].is_object(), "{path} is described");
    }
    let scheme = &document["components"]["securitySchemes"]["admin_token"];
    assert_eq!(
        (scheme["type"].as_str(), scheme["scheme"].as_str()),
        (Some("http"), Some("bearer"))
    );

    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(COMMITTED, &served).expect("write docs/openapi.json");
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    assert!(
        committed == served,
        "docs/openapi.json differs from the served document; if the API change is intended, \
         run `UPDATE_OPENAPI=1 cargo test -p order-service --test it openapi` and commit it"
    );
}

async fn error_of(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("a JSON error body");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    (status, body["error"].as_str().expect("error code").to_owned())
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn unknown_routes_wrong_methods_and_timeouts_answer_json_errors(db: PgPool) {
    // A pool of one connection, which the test holds: a request that needs the
    // database waits for it until the 200 ms request timeout answers.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*db.connect_options()).clone())
        .await
        .expect("pool");
    let app =
        spawn_with_args(pool.clone(), &["--relay-workers", "0", "--request-timeout-ms", "200"])
            .await;
    let url = |path: &str| format!("{}{path}", app.address);

    let nope = app.client.get(url("/nope")).send().await.expect("get");
    assert_eq!(error_of(nope).await, (404, "not_found".to_owned()));
    let put = app.client.put(url("/orders")).send().await.expect("put");
    assert_eq!(error_of(put).await, (405, "method_not_allowed".to_owned()));
    let _held = pool.acquire().await.expect("the only connection");
    let slow = app
        .client
        .get(url("/orders/0190b8b6-7d3c-7cc0-8000-000000000001"))
        .send()
        .await
        .expect("get");
    assert_eq!(error_of(slow).await, (408, "request_timeout".to_owned()));
}
