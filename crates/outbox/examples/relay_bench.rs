//! Relay benchmark, run by `scripts/bench-relay.sh`.
//!
//! In a fresh database, on RabbitMQ (its own exchange and queue) or, with
//! `--transport kafka`, on Kafka (its own topic; the example must be built with
//! the feature `kafka`), it measures:
//! 1. the baseline, the ceiling the relay works under, without the database:
//!    on RabbitMQ raw pipelined publishing with confirms, on Kafka the
//!    transport's publisher producing batches built in memory;
//! 2. the relay draining a backlog of `--events` events;
//! 3. on an idle system, the time from a single event's commit to its delivery.
//!
//! Kafka against RabbitMQ, back to back:
//! `cargo run --release -p outbox --features kafka --example relay_bench -- --transport kafka`
//! then the same with `--transport rabbitmq`.

use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use outbox::Transport;
use outbox::amqp::QueueType;
use outbox::metrics::RelayMetrics;
use outbox::rabbitmq::RabbitMq;
use outbox::relay::{Relay, RelayConfig};
use sqlx::migrate::MigrateDatabase;
use sqlx::{PgPool, Postgres};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The body of every event, an order's size.
const PAYLOAD: &str = r#"{"order_id":"00000000-0000-0000-0000-000000000000","customer_id":"bench","lines":[{"sku":"SKU-001","quantity":1}],"total_cents":100}"#;

/// The broker the relay publishes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TransportKind {
    Rabbitmq,
    Kafka,
}

/// Message ids as the consumer receives them, with the time of arrival.
type Arrivals = mpsc::UnboundedReceiver<(String, Instant)>;

/// What one run measured.
struct Measured {
    /// What the run published to, for the report.
    target: String,
    /// How the baseline was measured, for the report.
    baseline_how: &'static str,
    baseline_messages: i64,
    baseline_rate: f64,
    drain_seconds: f64,
    latencies: Vec<Duration>,
}

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
    /// The broker: `rabbitmq`, or `kafka` (needs the feature `kafka`).
    #[arg(long, value_enum, default_value = "rabbitmq")]
    transport: TransportKind,
    /// Kafka's bootstrap brokers, comma-separated.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// Partitions of the Kafka topic the events go to.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
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

    let measured = match args.transport {
        TransportKind::Rabbitmq => rabbitmq_bench(&args, &db, &suffix).await,
        TransportKind::Kafka => kafka_bench(&args, &db, &suffix).await,
    };
    db.close().await;
    Postgres::drop_database(&db_url).await?;
    let measured = measured?;

    let mut latencies = measured.latencies;
    latencies.sort();
    let percentile = |p: f64| {
        let index = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[index].as_secs_f64() * 1_000.0
    };
    let drain_rate = args.events as f64 / measured.drain_seconds;
    println!(
        "relay benchmark: {} events, {} workers, batch {}, {}",
        args.events, args.workers, args.batch_size, measured.target
    );
    println!(
        "  baseline, broker alone ({}): {:>9.0} msg/s ({} messages)",
        measured.baseline_how, measured.baseline_rate, measured.baseline_messages
    );
    println!(
        "  relay draining the backlog: {drain_rate:>9.0} events/s ({:.2} s)",
        measured.drain_seconds
    );
    println!("  relay / baseline: {:>9.2}", drain_rate / measured.baseline_rate);
    println!(
        "  idle commit-to-delivery ({} samples): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        percentile(0.50),
        percentile(0.90),
        percentile(0.99),
        percentile(1.0)
    );
    Ok(())
}

/// The run on RabbitMQ: its own exchange and durable queue, deleted after.
async fn rabbitmq_bench(args: &Args, db: &PgPool, suffix: &str) -> anyhow::Result<Measured> {
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
                        PAYLOAD.as_bytes(),
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

    let transport = RabbitMq::new(args.amqp_url.clone(), exchange.clone());
    let (drain_seconds, latencies) = relay_stages(args, db, transport, &mut arrived).await?;

    let _ =
        channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
    let _ = channel.queue_delete(queue.as_str().into(), Default::default()).await;
    let _ = connection.close(200, "bench done".into()).await;
    Ok(Measured {
        target: format!("{} queue", args.queue_type),
        baseline_how: "pipelined confirms",
        baseline_messages,
        baseline_rate,
        drain_seconds,
        latencies,
    })
}

/// The run on Kafka: its own topic `bench.<random>.bench` of `--partitions`
/// partitions, deleted after.
#[cfg(feature = "kafka")]
async fn kafka_bench(args: &Args, db: &PgPool, suffix: &str) -> anyhow::Result<Measured> {
    use std::sync::Arc;

    use outbox::kafka::KafkaTransport;
    use outbox::store::OutboxEvent;
    use outbox::{Outcome, Publisher};
    use rskafka::client::ClientBuilder;
    use rskafka::client::consumer::{StartOffset, StreamConsumerBuilder};
    use rskafka::client::partition::UnknownTopicHandling;

    let transport =
        KafkaTransport::new(&args.kafka_brokers).topic_prefix(format!("bench.{suffix}."));
    let topic = transport.topic_for("bench");
    let client =
        ClientBuilder::new(transport.brokers().to_vec()).client_id("relay-bench").build().await?;
    let controller = client.controller_client()?;
    controller.create_topic(&topic, args.partitions, 1, 5_000).await?;

    // Read every partition from its start as it fills, reporting each message
    // id when it arrives.
    let (arrivals, mut arrived) = mpsc::unbounded_channel::<(String, Instant)>();
    for partition in 0..args.partitions {
        let partition =
            client.partition_client(topic.as_str(), partition, UnknownTopicHandling::Retry).await?;
        let mut records = StreamConsumerBuilder::new(Arc::new(partition), StartOffset::Earliest)
            .with_max_wait_ms(100)
            .build();
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Some(Ok((record, _high_watermark))) = records.next().await {
                let id = record
                    .record
                    .headers
                    .get("message_id")
                    .map(|id| String::from_utf8_lossy(id).into_owned())
                    .unwrap_or_default();
                if arrivals.send((id, Instant::now())).is_err() {
                    return;
                }
            }
        });
    }

    // 1. Baseline: the transport's own publisher, batches like the relay's
    // built in memory, no database.
    let publisher = transport.connect("relay-bench-baseline").await?;
    let baseline_messages = (args.events / 5).max(1_000);
    let started = Instant::now();
    let mut sent = 0;
    while sent < baseline_messages {
        let now = chrono::Utc::now();
        let events: Vec<OutboxEvent> = (sent..sent + args.batch_size.min(baseline_messages - sent))
            .map(|n| OutboxEvent {
                id: Uuid::now_v7(),
                aggregate_type: "bench".to_owned(),
                aggregate_id: n.to_string(),
                event_type: "Baseline".to_owned(),
                payload: PAYLOAD.to_owned(),
                headers: sqlx::types::Json(serde_json::Map::new()),
                created_at: now,
                attempts: 0,
                next_attempt_at: now,
            })
            .collect();
        let outcomes = publisher.publish(&events).await?;
        if let Some(outcome) = outcomes.iter().find(|outcome| **outcome != Outcome::Confirmed) {
            anyhow::bail!("baseline publish not acknowledged: {outcome:?}");
        }
        sent += events.len() as i64;
    }
    let baseline_rate = baseline_messages as f64 / started.elapsed().as_secs_f64();
    publisher.close().await;
    drain(&mut arrived, baseline_messages as usize).await;

    let (drain_seconds, latencies) = relay_stages(args, db, transport, &mut arrived).await?;

    let _ = controller.delete_topic(&topic, 5_000).await;
    Ok(Measured {
        target: format!("Kafka topic of {} partitions", args.partitions),
        baseline_how: "the publisher, no database",
        baseline_messages,
        baseline_rate,
        drain_seconds,
        latencies,
    })
}

/// Without the feature `kafka` there is no Kafka transport to measure.
#[cfg(not(feature = "kafka"))]
async fn kafka_bench(_args: &Args, _db: &PgPool, _suffix: &str) -> anyhow::Result<Measured> {
    anyhow::bail!(
        "this relay_bench was built without the Kafka transport: run it with \
         `cargo run --release -p outbox --features kafka --example relay_bench -- --transport kafka`"
    )
}

/// Stages 2 and 3 through `transport`: the seconds the relay took to drain a
/// backlog of `--events` events, then the commit-to-delivery latencies of
/// single events on the idle system.
async fn relay_stages<T: Transport>(
    args: &Args,
    db: &PgPool,
    transport: T,
    arrived: &mut Arrivals,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    // 2. The relay draining a backlog.
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
         SELECT gen_random_uuid(), 'bench', n::text, 'Happened', $1::jsonb
         FROM generate_series(1, $2) AS n",
    )
    .bind(PAYLOAD)
    .bind(args.events)
    .execute(db)
    .await?;
    let config = RelayConfig {
        workers: args.workers,
        batch_size: args.batch_size,
        ..RelayConfig::default()
    };
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let relay =
        Relay::spawn(db.clone(), transport, config, RelayMetrics::default(), shutdown.clone())?;
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(db).await?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_seconds = started.elapsed().as_secs_f64();
    drain(arrived, args.events as usize).await;

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

    shutdown.cancel();
    relay.join().await;
    Ok((drain_seconds, latencies))
}

async fn drain(arrived: &mut Arrivals, count: usize) {
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
