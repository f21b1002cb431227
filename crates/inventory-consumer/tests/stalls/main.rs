//! The whole system under faults that stall the broker rather than crash it,
//! with the relay's attempts made short (3 attempts, 100 ms to 1 s apart, a
//! 1 s confirm timeout), so that a stall counted as the events' failure would
//! kill them within seconds: a 25 s partition between order-service and the
//! broker (every byte held, nothing closed), then a 25 s memory alarm on the
//! broker (`rabbitmqctl set_vm_memory_high_watermark 0`, then restored), under
//! a steady load. Afterwards every order accepted is decided, no event is dead
//! and the outbox is empty.
//!
//! A test binary of its own: the alarm stops every publisher of the broker,
//! and cargo runs test binaries one at a time, so nothing else runs meanwhile.

#[path = "../it/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;
use test_support::{Fault, FaultProxy, eventually};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use helpers::{TestApi, TestBroker, TestConsumer};

/// How long each fault lasts.
const STALL: Duration = Duration::from_secs(25);

/// The broker's memory watermark while the test runs; put back on drop, even
/// when the test fails.
struct MemoryAlarm {
    restore: String,
}

impl MemoryAlarm {
    /// Raises the alarm; `None` (said loudly) when `rabbitmqctl` cannot.
    fn raise() -> Option<Self> {
        let current = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])?;
        // `0.4`, or `{absolute,N}` when set in bytes.
        let restore = current.trim().trim_matches('"').to_owned();
        rabbitmqctl(&["set_vm_memory_high_watermark", "0"])?;
        Some(Self { restore })
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        let restored = match self.restore.strip_prefix("{absolute,") {
            Some(bytes) => rabbitmqctl(&[
                "set_vm_memory_high_watermark",
                "absolute",
                bytes.trim_end_matches('}'),
            ]),
            None => rabbitmqctl(&["set_vm_memory_high_watermark", &self.restore]),
        };
        if restored.is_none() {
            eprintln!("!! could not restore the broker's memory watermark to {}", self.restore);
        }
    }
}

fn rabbitmqctl(args: &[&str]) -> Option<String> {
    let output = Command::new("rabbitmqctl").args(args).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Posts orders at about `rate` a second until `stop`, each with its own
/// Idempotency-Key, retried until answered 201; returns the ids accepted.
async fn load(address: String, rate: u32, stop: CancellationToken) -> Vec<Uuid> {
    let client =
        reqwest::Client::builder().timeout(Duration::from_secs(15)).build().expect("client");
    let mut ids = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut n = 0u32;
    while !stop.is_cancelled() {
        tick.tick().await;
        n += 1;
        let body = json!({
            "customer_id": format!("stall-{n}"),
            "items": [{"sku": format!("SKU-{:03}", 1 + n % 20), "quantity": 1}],
        });
        let key = format!("stall-{n}");
        loop {
            let sent = client
                .post(format!("{address}/orders"))
                .header("Idempotency-Key", &key)
                .json(&body)
                .send()
                .await;
            if let Ok(response) = sent
                && response.status() == 201
            {
                let order: Value = response.json().await.expect("json");
                ids.push(order["id"].as_str().expect("id").parse().expect("uuid"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    ids
}

async fn count(db: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.expect(sql)
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_partition_and_a_memory_alarm_leave_no_event_dead_and_every_order_decided(db: PgPool) {
    if rabbitmqctl(&["status"]).is_none() {
        eprintln!(
            "!! SKIPPED: rabbitmqctl cannot reach the local broker; the memory alarm and \
             partition proof did NOT run"
        );
        return;
    }
    let broker = TestBroker::new().await;
    let proxy = FaultProxy::broker().await;
    let mut through_proxy = broker.config.clone();
    through_proxy.amqp_url = proxy.url();
    let api = TestApi::spawn(
        &db,
        &through_proxy,
        &[
            "--relay-max-attempts",
            "3",
            "--relay-retry-base-ms",
            "100",
            "--relay-retry-max-ms",
            "1000",
            "--relay-confirm-timeout-ms",
            "1000",
        ],
    )
    .await;
    let consumer = TestConsumer::spawn(db.clone(), &broker.config, &[]).await;
    let stop = CancellationToken::new();
    let loader = tokio::spawn(load(api.address.clone(), 100, stop.clone()));

    tokio::time::sleep(Duration::from_secs(3)).await;
    eprintln!("partition: every byte between order-service and the broker held for {STALL:?}");
    proxy.set(Fault::Hold);
    tokio::time::sleep(STALL).await;
    let dead_in_partition = count(&db, "SELECT count(*) FROM outbox WHERE state = 'dead'").await;
    proxy.set(Fault::Pass);
    tokio::time::sleep(Duration::from_secs(5)).await;

    eprintln!("memory alarm for {STALL:?}");
    let alarm = MemoryAlarm::raise().expect("rabbitmqctl set_vm_memory_high_watermark 0");
    tokio::time::sleep(STALL).await;
    let dead_in_alarm = count(&db, "SELECT count(*) FROM outbox WHERE state = 'dead'").await;
    drop(alarm);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let accepted = loader.await.expect("load");

    let decided = eventually(Duration::from_secs(60), || async {
        count(&db, "SELECT count(*) FROM orders WHERE status IN ('COMPLETED', 'REJECTED')").await
            == accepted.len() as i64
    })
    .await;
    let orders = count(&db, "SELECT count(*) FROM orders").await;
    let pending = count(&db, "SELECT count(*) FROM orders WHERE status = 'PENDING'").await;
    // Every failed attempt the relay counted, from its metrics.
    let attempts = test_support::sample(
        &test_support::scrape(&api.address).await,
        "outbox_publish_failures_total",
    )
    .expect("outbox_publish_failures_total");
    eprintln!(
        "stalls: accepted={} orders={orders} pending={pending} dead during the partition \
         {dead_in_partition}, during the alarm {dead_in_alarm}; attempts spent {attempts}",
        accepted.len()
    );
    assert_eq!((dead_in_partition, dead_in_alarm), (0, 0), "no event died of a stall");
    assert_eq!(orders, accepted.len() as i64, "every accepted order, once");
    assert!(decided, "{pending} orders still PENDING");
    assert_eq!(attempts, 0.0, "no attempt was spent on a stall");
    consumer.stop().await;
    // Checks the outbox: nothing pending, nothing dead.
    api.stop().await;
    broker.delete().await;
}
