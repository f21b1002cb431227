//! Relay benchmark, run by `scripts/bench-relay.sh`.
//!
//! In a fresh database and with its own exchange and queue, it measures:
//! 1. the baseline: raw pipelined publishing with confirms (no database), the
//!    ceiling the relay works under;
//! 2. the relay draining a backlog of `--events` events;
//! 3. on an idle system, the time from a single event's commit to its delivery.

use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use outbox::amqp::QueueType;
use outbox::metrics::RelayMetrics;
use outbox::rabbitmq::RabbitMq;
use outbox::relay::{Relay, RelayConfig};
use sqlx::migrate::MigrateDatabase;
use sqlx::{PgPool, Postgres};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Parser)]
struct Args {
    /// Server URL; a database `outbox_bench_<random>` is created on it and dropped after.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Events in the backlog the relay drains.
    #[arg(long, default_value_t = 100_000)]
    events: i64,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[arg(long, default_value_t = 200)]
    batch_size: i64,
    /// Single events sent one at a time on the idle system, for the latency figure.
    #[arg(long, default_value_t = 200)]
    latency_samples: usize,
    /// Type of the queue the events are routed to: `classic` or `quorum`.
    #[arg(long, default_value = "classic")]
    queue_type: QueueType,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let suffix = Uuid::new_v4().simple().to_string();
    let mut db_url = url::Url::parse(&args.database_url)?;
    db_url.set_path(&format!("outbox_bench_{suffix}"));
    let db_url = db_url.to_string();
    Postgres::create_database(&db_url).await?;
    let db = PgPool::connect(&db_url).await?;
    outbox::MIGRATOR.run(&db).await?;

    let exchange = format!("bench.{suffix}");
    let queue = format!("bench.q.{suffix}");
    let connection = outbox::amqp::connect(&args.amqp_url, "relay-bench").await?;
    let channel = connection.create_channel().await?;
    outbox::amqp::declare_exchange(&channel, &exchange).await?;
    // Durable, as in production, whatever its type (a transient queue would not
    // write the persistent messages to disk); deleted at the end.
    let mut arguments = FieldTable::default();
    let queue_type = lapin::types::LongString::from(args.queue_type.as_str());
    arguments.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString(queue_type));
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(queue.as_str().into(), durable, arguments).await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "bench.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    // Drain the queue as fast as it fills, reporting each message id when it arrives.
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
            FieldTable::default(),
        )
        .await?;
    let (arrivals, mut arrived) = mpsc::unbounded_channel::<(String, Instant)>();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default();
            if arrivals.send((id, Instant::now())).is_err() {
                return;
            }
        }
    });

    // 1. Baseline: the broker alone, pipelined confirms in batches like the relay's.
    let publisher = connection.create_channel().await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;
    let baseline_messages = (args.events / 5).max(1_000);
    let payload = br#"{"order_id":"00000000-0000-0000-0000-000000000000","customer_id":"bench","lines":[{"sku":"SKU-001","quantity":1}],"total_cents":100}"#;
    let started = Instant::now();
    let mut sent = 0;
    while sent < baseline_messages {
        let mut confirms = Vec::new();
        for _ in 0..args.batch_size.min(baseline_messages - sent) {
            let properties = BasicProperties::default()
                .with_message_id(Uuid::now_v7().to_string().into())
                .with_delivery_mode(2);
            confirms.push(
                publisher
                    .basic_publish(
                        exchange.as_str().into(),
                        "bench.Baseline".into(),
                        BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                        payload,
                        properties,
                    )
                    .await?,
            );
            sent += 1;
        }
        for confirm in confirms {
            anyhow::ensure!(confirm.await?.is_ack(), "baseline publish not acked");
        }
    }
    let baseline_rate = baseline_messages as f64 / started.elapsed().as_secs_f64();
    drain(&mut arrived, baseline_messages as usize).await;

    // 2. The relay draining a backlog.
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
         SELECT gen_random_uuid(), 'bench', n::text, 'Happened', $1::jsonb
         FROM generate_series(1, $2) AS n",
    )
    .bind(std::str::from_utf8(payload)?)
    .bind(args.events)
    .execute(&db)
    .await?;
    let config = RelayConfig {
        workers: args.workers,
        batch_size: args.batch_size,
        ..RelayConfig::default()
    };
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let transport = RabbitMq::new(args.amqp_url.clone(), exchange.clone());
    let relay =
        Relay::spawn(db.clone(), transport, config, RelayMetrics::default(), shutdown.clone())?;
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&db).await?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_seconds = started.elapsed().as_secs_f64();
    drain(&mut arrived, args.events as usize).await;
    let drain_rate = args.events as f64 / drain_seconds;

    // 3. Idle system: commit one event, time until the consumer has it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::with_capacity(args.latency_samples);
    for n in 0..args.latency_samples {
        let mut tx = db.begin().await?;
        let event = outbox::NewEvent {
            aggregate_type: "bench".to_owned(),
            aggregate_id: n.to_string(),
            event_type: "Latency".to_owned(),
            payload: serde_json::json!({ "n": n }),
            headers: serde_json::Map::new(),
        };
        let id = outbox::enqueue_untyped(&mut tx, &event).await?.to_string();
        let committing = Instant::now();
        tx.commit().await?;
        loop {
            let (arrived_id, at) = tokio::time::timeout(Duration::from_secs(10), arrived.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("consumer stopped"))?;
            if arrived_id == id {
                latencies.push(at.duration_since(committing));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies.sort();
    let percentile = |p: f64| {
        let index = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[index].as_secs_f64() * 1_000.0
    };

    shutdown.cancel();
    relay.join().await;
    println!(
        "relay benchmark: {} events, {} workers, batch {}, {} queue",
        args.events, args.workers, args.batch_size, args.queue_type
    );
    println!(
        "  baseline, broker alone (pipelined confirms): {baseline_rate:>9.0} msg/s ({baseline_messages} messages)"
    );
    println!(
        "  relay draining the backlog:                  {drain_rate:>9.0} events/s ({drain_seconds:.2} s)"
    );
    println!("  relay / baseline:                            {:>9.2}", drain_rate / baseline_rate);
    println!(
        "  idle commit-to-delivery ({} samples): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        percentile(0.50),
        percentile(0.90),
        percentile(0.99),
        percentile(1.0)
    );

    let _ =
        channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
    let _ = channel.queue_delete(queue.as_str().into(), Default::default()).await;
    let _ = connection.close(200, "bench done".into()).await;
    db.close().await;
    Postgres::drop_database(&db_url).await?;
    Ok(())
}

async fn drain(arrived: &mut mpsc::UnboundedReceiver<(String, Instant)>, count: usize) {
    for _ in 0..count {
        if tokio::time::timeout(Duration::from_secs(30), arrived.recv())
            .await
            .ok()
            .flatten()
            .is_none()
        {
            eprintln!("warning: fewer deliveries than expected");
            return;
        }
    }
}
