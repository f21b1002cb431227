//! `spawn_app`: an order-service on port 0 over a test's own database.

use clap::Parser;
use order_service::{Application, Config};
use serde_json::Value;
use service_kit::broker::BrokerConfig;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    pub address: String,
    pub db: PgPool,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The API alone, without a relay (nothing is published).
pub async fn spawn_app(db: PgPool) -> TestApp {
    spawn_with_args(db, &["--relay-workers", "0"]).await
}

/// The API with its relay, publishing to this test's own exchange and queues.
pub async fn spawn_app_with_relay(db: PgPool, broker: &BrokerConfig) -> TestApp {
    spawn_app_with_relay_and_args(db, broker, &[]).await
}

/// Like [`spawn_app_with_relay`], with more flags.
pub async fn spawn_app_with_relay_and_args(
    db: PgPool,
    broker: &BrokerConfig,
    extra: &[&str],
) -> TestApp {
    let mut args = broker.to_args();
    args.extend(["--relay-poll-interval-ms".to_owned(), "100".to_owned()]);
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    spawn_with_args(db, &args.iter().map(String::as_str).collect::<Vec<_>>()).await
}

pub async fn spawn_with_args(db: PgPool, args: &[&str]) -> TestApp {
    test_support::init_logging();
    let base = ["order-service", "--listen-addr", "127.0.0.1:0"];
    let config = Config::parse_from(base.iter().chain(args));
    let app = Application::build_with_pool(config, db.clone()).await.expect("app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(shutdown.clone()));
    TestApp { address, db, client: reqwest::Client::new(), shutdown }
}

impl TestApp {
    pub async fn post_order(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}/orders", self.address))
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_order_with_key(&self, key: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}/orders", self.address))
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    /// The text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        let response =
            self.client.get(format!("{}/metrics", self.address)).send().await.expect("metrics");
        response.text().await.expect("metrics text")
    }

    /// Rows in each table a POST /orders writes to.
    pub async fn row_counts(&self) -> RowCounts {
        let (orders, lines, events, keys) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM order_lines),
                    (SELECT count(*) FROM outbox), (SELECT count(*) FROM idempotency_keys)",
        )
        .fetch_one(&self.db)
        .await
        .expect("counts");
        RowCounts { orders, lines, events, keys }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct RowCounts {
    pub orders: i64,
    pub lines: i64,
    pub events: i64,
    pub keys: i64,
}

impl RowCounts {
    pub const NONE: Self = Self { orders: 0, lines: 0, events: 0, keys: 0 };
}
