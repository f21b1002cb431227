//! The Grafana dashboard of the "observability" Compose profile
//! (deploy/grafana/dashboards/outbox.json) against what the services really
//! expose: every metric a panel queries is in order-service's or the consumer's
//! /metrics once the system has handled an order.
//!
//! `OUTBOX_DASHBOARD=path` checks another dashboard file instead.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestApi, TestBroker, TestConsumer, order_status};

/// Names of this project's metrics start with one of these; anything else in a
/// query (functions, keywords, label names, durations) is not a metric.
const METRIC_PREFIXES: [&str; 5] = ["outbox_", "inventory_", "order_", "retention_", "task_"];

pub fn repository_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

pub fn dashboard() -> Value {
    let path = std::env::var_os("OUTBOX_DASHBOARD")
        .map(PathBuf::from)
        .unwrap_or_else(|| repository_file("deploy/grafana/dashboards/outbox.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// Every panel, those inside rows included, except the rows themselves.
pub fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, found: &mut Vec<&'a Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            if panel["type"] != "row" {
                found.push(panel);
            }
            walk(&panel["panels"], found);
        }
    }
    let mut found = Vec::new();
    walk(&dashboard["panels"], &mut found);
    found
}

/// The project's metric names in a PromQL expression, parsed loosely: string
/// literals (label values) are skipped, and of the identifiers left those with
/// one of [`METRIC_PREFIXES`] are kept.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        if matches!(c, '"' | '\'' | '`') {
            // A string literal, up to its unescaped closing quote.
            while let Some(inner) = chars.next() {
                if inner == '\\' && c != '`' {
                    chars.next();
                } else if inner == c {
                    break;
                }
            }
        } else if c.is_ascii_digit() {
            // A number or a duration ("1m", "0.99", "1e3"): no metric starts here.
            while chars.next_if(|next| next.is_ascii_alphanumeric() || *next == '.').is_some() {}
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let mut identifier = String::from(c);
            while let Some(next) =
                chars.next_if(|next| next.is_ascii_alphanumeric() || *next == '_' || *next == ':')
            {
                identifier.push(next);
            }
            if METRIC_PREFIXES.iter().any(|prefix| identifier.starts_with(prefix)) {
                names.insert(identifier);
            }
        }
    }
    names
}

/// The metric each panel queries, as (panel title, metric name), and checks
/// that every panel has queries and every query names a project metric.
fn queried_metrics(dashboard: &Value) -> BTreeSet<(String, String)> {
    let panels = panels(dashboard);
    assert!(!panels.is_empty(), "the dashboard has no panels");
    let mut queried = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
        let targets = panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?} has no queries");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "panel {title:?}: {expr:?} queries none of our metrics");
            queried.extend(names.into_iter().map(|name| (title.clone(), name)));
        }
    }
    queried
}

/// The names of the samples in an exposition (Prometheus or OpenMetrics text):
/// a family that is declared but has no sample yet (a labelled counter never
/// incremented) is not there.
fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = |expr| metric_names(expr).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            "histogram_quantile(0.99, sum by (le) \
             (rate(outbox_commit_to_confirm_seconds_bucket{job=\"order_x\"}[1m])))"
        ),
        ["outbox_commit_to_confirm_seconds_bucket"]
    );
    assert_eq!(
        names(
            "sum(rate(order_write_batch_size_sum[1m]))/sum(rate(order_write_batch_size_count[5m]))"
        ),
        ["order_write_batch_size_count", "order_write_batch_size_sum"]
    );
    assert_eq!(
        names("sum by (table) (rate(retention_swept_rows_total{table='outbox_x'}[5m])) > 0"),
        ["retention_swept_rows_total"]
    );
    assert_eq!(names("max(task_panics_total) or vector(0)"), ["task_panics_total"]);
    assert!(names("sum(rate(http_requests_total[1m]))").is_empty());

    let exposition = "# HELP task_panics Background tasks\n# TYPE task_panics counter\n\
                      outbox_backlog_events 0\nretention_swept_rows_total{table=\"t\"} 3\n# EOF\n";
    assert_eq!(
        sample_names(exposition).into_iter().collect::<Vec<_>>(),
        ["outbox_backlog_events", "retention_swept_rows_total"]
    );
}

/// Each panel queries the data source Grafana is provisioned with, by its uid.
#[test]
fn every_panel_queries_the_provisioned_prometheus() {
    let path = repository_file("deploy/grafana/provisioning/datasources/prometheus.yml");
    let provisioning = std::fs::read_to_string(&path).expect("datasource provisioning");
    let uid = provisioning
        .lines()
        .find_map(|line| line.trim().strip_prefix("uid:"))
        .map(str::trim)
        .expect("the provisioned data source has a uid");
    let dashboard = dashboard();
    for panel in panels(&dashboard) {
        let title = &panel["title"];
        assert_eq!(panel["datasource"]["uid"], uid, "panel {title}");
        for target in panel["targets"].as_array().into_iter().flatten() {
            assert_eq!(target["datasource"]["uid"], uid, "panel {title}, query {target}");
        }
    }
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn every_metric_on_the_dashboard_is_exposed(db: PgPool) {
    let queried = queried_metrics(&dashboard());

    let broker = TestBroker::new().await;
    let config = &broker.config;
    let api = TestApi::spawn(&db, config, &[]).await;
    // A consumer worker that panics once (and is restarted), so that the panel
    // of task panics has a series: task_panics_total has one per task that
    // panicked, none before.
    let consumer = TestConsumer::spawn_armed(db.clone(), config, &[], 1).await;

    // One order through the whole system: the relay publishes it and the
    // consumer completes it, so the labelled families (consumer outcomes)
    // have samples.
    let client = reqwest::Client::new();
    let body = json!({"customer_id": "dashboard", "items": [{"sku": "SKU-001", "quantity": 1}]});
    let response =
        client.post(format!("{}/orders", api.address)).json(&body).send().await.expect("post");
    assert_eq!(response.status(), 201);
    let order: Value = response.json().await.expect("json");
    let id = Uuid::parse_str(order["id"].as_str().expect("id")).expect("uuid");
    let completed = test_support::eventually(Duration::from_secs(30), || async {
        order_status(&db, id).await == "COMPLETED"
    })
    .await;
    assert!(completed, "the order is {}", order_status(&db, id).await);

    // Both services' samples; the sweepers' first sweeps and the consumer's
    // queue depth readings may come a moment after the order.
    let scrape = || async {
        let mut names = BTreeSet::new();
        for address in [&api.address, &consumer.address] {
            let response =
                client.get(format!("{address}/metrics")).send().await.expect("scrape /metrics");
            assert!(response.status().is_success(), "{address}/metrics: {}", response.status());
            names.extend(sample_names(&response.text().await.expect("metrics text")));
        }
        names
    };
    let missing = |exposed: &BTreeSet<String>| -> Vec<String> {
        queried
            .iter()
            .filter(|(_, name)| !exposed.contains(name))
            .map(|(panel, name)| format!("{name} (panel {panel:?})"))
            .collect()
    };
    let all_there = test_support::eventually(Duration::from_secs(20), || async {
        missing(&scrape().await).is_empty()
    })
    .await;
    let exposed = scrape().await;
    assert!(
        all_there,
        "queried by the dashboard but not in /metrics: {:#?}\nexposed: {exposed:?}",
        missing(&exposed)
    );

    consumer.stop().await;
    api.stop().await;
    broker.delete().await;
}
