//! The dashboard and the alert rules against a real Prometheus: it scrapes
//! order-service and the consumer (every second) while orders flow, loads
//! deploy/prometheus/alerts.yml, and every expression of every panel of the
//! shipped Grafana dashboard must return data through Prometheus' HTTP API,
//! every alert rule must evaluate without error, and every metric a rule reads
//! must have series. A panel whose query returns nothing fails the test.
//!
//! Needs the `prometheus` binary (Debian's `prometheus` package, which
//! scripts/test.sh installs). Without it the test says loudly that it skipped,
//! unless OUTBOX_REQUIRE_PROMETHEUS is set (scripts/test.sh sets it): then it
//! fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;

use crate::dashboard::{dashboard, metric_names, panels, repository_file};
use crate::helpers::{TestApi, TestBroker, TestConsumer};

const ALERTS: &str = "deploy/prometheus/alerts.yml";

/// `prometheus --version` runs, or the test cannot.
fn prometheus_installed() -> bool {
    std::process::Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

/// A Prometheus of its own on a free port, scraping `targets` every second and
/// evaluating the shipped alert rules every second; killed when dropped.
struct Prometheus {
    url: String,
    process: tokio::process::Child,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.process.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    async fn start(targets: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("outbox-prometheus-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("a directory");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let scrape_configs: Vec<Value> = targets
            .iter()
            .map(|(job, address)| {
                json!({"job_name": job, "static_configs": [{"targets": [address]}]})
            })
            .collect();
        // JSON is YAML.
        let config = json!({
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms",
                       "evaluation_interval": "1s"},
            "rule_files": [repository_file(ALERTS)],
            "scrape_configs": scrape_configs,
        });
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config.to_string()).expect("config written");
        let process = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).expect("log"))
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus starts");
        let url = format!("http://127.0.0.1:{port}");
        let ready = test_support::eventually(Duration::from_secs(30), || async {
            reqwest::get(format!("{url}/-/ready")).await.is_ok_and(|r| r.status().is_success())
        })
        .await;
        assert!(ready, "prometheus answers /-/ready: see {}", dir.join("log").display());
        Self { url, process, dir }
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let url =
            reqwest::Url::parse_with_params(&format!("{}{path}", self.url), query).expect("a URL");
        let response = reqwest::get(url).await.expect("prometheus answers");
        let body: Value = response.json().await.expect("a JSON answer");
        assert_eq!(body["status"], "success", "{path} {query:?}: {body}");
        body["data"].clone()
    }

    /// The series an instant query returns now.
    async fn query(&self, expr: &str) -> Vec<Value> {
        self.get("/api/v1/query", &[("query", expr)]).await["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn every_panel_and_alert_rule_returns_data_from_a_real_prometheus(db: PgPool) {
    if !prometheus_installed() {
        assert!(
            std::env::var_os("OUTBOX_REQUIRE_PROMETHEUS").is_none(),
            "OUTBOX_REQUIRE_PROMETHEUS is set and `prometheus` is not installed \
             (apt-get install prometheus)"
        );
        eprintln!(
            "!! SKIPPED every_panel_and_alert_rule_returns_data_from_a_real_prometheus: \
             `prometheus` is not installed (apt-get install prometheus); the dashboard and \
             the alert rules were NOT evaluated"
        );
        return;
    }
    let broker = TestBroker::new().await;
    let config = &broker.config;
    let api = TestApi::spawn(&db, config, &[]).await;
    // A worker that panics once, so that task_panics_total has a series.
    let consumer = TestConsumer::spawn_armed(db.clone(), config, &[], 1).await;
    let host = |address: &str| address.trim_start_matches("http://").to_owned();
    let (api_target, consumer_target) = (host(&api.address), host(&consumer.address));
    let prometheus = Prometheus::start(&[
        ("order-service", &api_target),
        ("inventory-consumer", &consumer_target),
    ])
    .await;

    // Orders flow, some cancelled, while Prometheus scrapes.
    let orders_url = format!("{}/orders", api.address);
    let load = tokio::spawn(async move {
        let client = reqwest::Client::new();
        for n in 0.. {
            let body = json!({"customer_id": format!("c-{n}"),
                              "items": [{"sku": "SKU-002", "quantity": 1}]});
            if let Ok(response) = client.post(&orders_url).json(&body).send().await
                && n % 4 == 0
                && let Ok(order) = response.json::<Value>().await
                && let Some(id) = order["id"].as_str()
            {
                let _ = client.post(format!("{orders_url}/{id}/cancel")).send().await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    let up = test_support::eventually(Duration::from_secs(30), || async {
        prometheus.query("up == 1").await.len() == 2
    })
    .await;
    assert!(up, "both services scraped: {:?}", prometheus.query("up").await);

    // Every panel's expression returns data (rates need a few scrapes first).
    let dashboard = dashboard();
    let expressions: Vec<(String, String)> = panels(&dashboard)
        .into_iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            panel["targets"].as_array().cloned().unwrap_or_default().into_iter().filter_map(
                move |target| Some((title.clone(), target["expr"].as_str()?.to_owned())),
            )
        })
        .collect();
    assert!(expressions.len() >= 10, "the dashboard's queries: {expressions:?}");
    let empty = async || {
        let mut empty = Vec::new();
        for (title, expr) in &expressions {
            if prometheus.query(expr).await.is_empty() {
                empty.push(format!("{title}: {expr}"));
            }
        }
        empty
    };
    let all_data =
        test_support::eventually(Duration::from_secs(60), || async { empty().await.is_empty() })
            .await;
    assert!(all_data, "panels whose query returns nothing: {:#?}", empty().await);

    // Every alert rule of the file is loaded and evaluates, and every metric it
    // reads has series (a misspelt name would make it silently never fire).
    let shipped = std::fs::read_to_string(repository_file(ALERTS)).expect("the alert rules");
    let shipped = shipped.lines().filter(|line| line.trim_start().starts_with("- alert:")).count();
    let rules = async || -> Vec<Value> {
        let groups = prometheus.get("/api/v1/rules", &[("type", "alert")]).await;
        groups["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    let evaluated = test_support::eventually(Duration::from_secs(30), || async {
        let rules = rules().await;
        rules.len() == shipped && rules.iter().all(|rule| rule["health"] == "ok")
    })
    .await;
    let rules = rules().await;
    assert!(evaluated, "{shipped} rules shipped, loaded and healthy: {rules:#?}");
    let mut unread = BTreeSet::new();
    for rule in &rules {
        let expr = rule["query"].as_str().expect("a rule's query");
        let names = metric_names(expr);
        assert!(!names.is_empty(), "rule {} reads no metric of ours: {expr}", rule["name"]);
        for name in names {
            if prometheus.query(&format!("count({name})")).await.is_empty() {
                unread.insert(format!("{name} (rule {})", rule["name"]));
            }
        }
    }
    assert!(unread.is_empty(), "metrics the alert rules read that have no series: {unread:?}");

    load.abort();
    drop(prometheus);
    consumer.stop().await;
    api.stop().await;
    broker.delete().await;
}

/// The alert rules' file is where the Compose Prometheus loads it from.
#[test]
fn the_compose_prometheus_loads_the_alert_rules() {
    let config = std::fs::read_to_string(repository_file("deploy/prometheus/prometheus.yml"))
        .expect("the Compose Prometheus's configuration");
    assert!(config.contains("  - alerts.yml"), "rule_files names alerts.yml, beside it");
    let compose = std::fs::read_to_string(repository_file("docker-compose.yml")).expect("compose");
    assert!(
        compose.contains("./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro"),
        "docker-compose.yml mounts it"
    );
    assert!(Path::new(&repository_file(ALERTS)).exists());
}
