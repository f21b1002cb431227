//! An in-process order-service, and the stress-test binary run against it.

use std::process::Output;

use clap::Parser;
use order_service::{Application, Config};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    pub address: String,
    /// The URL of this test's database, for the binary's --database-url.
    pub database_url: String,
    pub db: PgPool,
    shutdown: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The API alone on port 0, without a relay (nothing is published).
pub async fn spawn_app(db: PgPool) -> TestApp {
    spawn_app_on(db, 0).await
}

/// The API alone on `port`, without a relay.
pub async fn spawn_app_on(db: PgPool, port: u16) -> TestApp {
    let listen = format!("127.0.0.1:{port}");
    let config =
        Config::parse_from(["order-service", "--listen-addr", &listen, "--relay-workers", "0"]);
    let app = Application::build_with_pool(config, db.clone()).await.expect("app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let database_url = database_url_of(&db).await;
    TestApp { address, database_url, db, shutdown }
}

/// `#[sqlx::test]` made a database of its own on the server of `DATABASE_URL`:
/// the same URL with that database's name.
async fn database_url_of(db: &PgPool) -> String {
    let (name,): (String,) =
        sqlx::query_as("SELECT current_database()").fetch_one(db).await.expect("database name");
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for the tests");
    let mut url = url::Url::parse(&base).expect("DATABASE_URL is a URL");
    url.set_path(&name);
    url.to_string()
}

/// What one run of the binary gave.
pub struct Run {
    pub output: Output,
    pub report: Value,
}

impl Run {
    pub fn exit_code(&self) -> Option<i32> {
        self.output.status.code()
    }

    pub fn u64(&self, key: &str) -> u64 {
        self.report[key].as_u64().unwrap_or_else(|| panic!("{key} is not a count: {}", self.report))
    }
}

/// Runs the stress-test binary with `--json` and `args`, and parses its stdout,
/// which must be exactly one JSON object.
pub async fn stress_test(args: &[&str]) -> Run {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_stress-test"))
        .arg("--json")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("stress-test runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|error| {
        panic!("stdout is not one JSON object ({error}):\n{stdout}\nstderr:\n{stderr}")
    });
    assert!(report.is_object(), "not an object: {report}");
    Run { output, report }
}

/// Asserts that the report has every documented key with its type, and that
/// the request counts add up to `sent`.
pub fn assert_report_shape(report: &Value) {
    for key in ["sent", "ok", "client_errors", "server_errors", "transport_errors", "not_found"] {
        assert!(report[key].is_u64(), "{key} is not a count: {report}");
    }
    for key in ["throughput_rps", "elapsed_seconds"] {
        assert!(report[key].is_number(), "{key} is not a number: {report}");
    }
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(report["latency_ms"][key].is_number(), "latency_ms.{key} missing: {report}");
    }
    assert!(report["converged"].is_boolean(), "converged is not a bool: {report}");
    assert!(report["waited"].is_boolean(), "waited is not a bool: {report}");
    assert_eq!(report["interrupted"], false, "nothing interrupted the run: {report}");
    let converge_seconds = &report["converge_seconds"];
    assert!(
        converge_seconds.is_number() || converge_seconds.is_null(),
        "converge_seconds is neither a number nor null: {report}"
    );
    assert!(report["e2e_lag_ms"]["count"].is_u64(), "e2e_lag_ms.count missing: {report}");
    for key in ["p50", "p99"] {
        let value = &report["e2e_lag_ms"][key];
        assert!(value.is_number() || value.is_null(), "e2e_lag_ms.{key} missing: {report}");
    }
    let statuses = report["status_counts"].as_object().expect("status_counts is an object");
    assert!(statuses.values().all(Value::is_u64), "status_counts are not counts: {report}");
    assert!(report["status_codes"].is_object(), "status_codes is not an object: {report}");

    let count = |key: &str| report[key].as_u64().expect("a count");
    assert_eq!(
        count("sent"),
        count("ok") + count("client_errors") + count("server_errors") + count("transport_errors"),
        "the outcomes do not add up to the requests sent: {report}"
    );
    let by_code: u64 = report["status_codes"]
        .as_object()
        .expect("object")
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(
        by_code,
        count("sent") - count("transport_errors"),
        "every answer has a status code: {report}"
    );
}

/// The sum of `status_counts`.
pub fn status_total(report: &Value) -> u64 {
    report["status_counts"].as_object().expect("object").values().filter_map(Value::as_u64).sum()
}
