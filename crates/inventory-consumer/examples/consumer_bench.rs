//! Consumer benchmark, run by `scripts/bench-consumer.sh`.
//!
//! For each batch size asked for, in a fresh database and with its own queues: it
//! writes `--messages` PENDING orders, publishes their OrderPlaced events (the
//! backlog), starts the real `inventory-consumer` binary and times how long it
//! takes to decide every order. Batch size 1 (one transaction and one ack per
//! message) is the baseline the batched runs are compared with. The consumer's
//! peak RSS (VmHWM) is read from /proc before it is stopped.

use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Parser;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use order_events::{OrderPlaced, OrderPlacedLine};
use outbox::Event as _;
use service_kit::broker::BrokerConfig;
use sqlx::migrate::MigrateDatabase;
use sqlx::{PgPool, Postgres};
use tokio::process::Command;
use uuid::Uuid;

#[derive(Debug, Parser)]
struct Args {
    /// Server URL; a database `consumer_bench_<random>` is created per run and dropped after.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// The consumer binary to run (a release build).
    #[arg(long, default_value = "target/release/inventory-consumer")]
    consumer_bin: String,
    /// Messages in the backlog.
    #[arg(long, default_value_t = 30_000)]
    messages: usize,
    /// Batch sizes to run, the first being the baseline.
    #[arg(long, value_delimiter = ',', default_value = "1,128")]
    batch_sizes: Vec<usize>,
    /// Consumer workers (CONCURRENCY); the consumer's default, one.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Prefetch per worker.
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
}

struct Run {
    batch_size: usize,
    seconds: f64,
    peak_rss_kib: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "consumer benchmark: {} messages, {} workers, prefetch {}",
        args.messages, args.concurrency, args.prefetch
    );
    let mut runs = Vec::new();
    for &batch_size in &args.batch_sizes {
        let run = run_once(&args, batch_size).await?;
        println!(
            "  batch {:>4}: {:>8.0} msg/s  ({:.2} s)  peak RSS {:.1} MiB",
            run.batch_size,
            args.messages as f64 / run.seconds,
            run.seconds,
            run.peak_rss_kib as f64 / 1024.0
        );
        runs.push(run);
    }
    if let Some((baseline, rest)) = runs.split_first() {
        for run in rest {
            println!(
                "  batch {} vs batch {}: {:.2}x",
                run.batch_size,
                baseline.batch_size,
                baseline.seconds / run.seconds
            );
        }
    }
    Ok(())
}

async fn run_once(args: &Args, batch_size: usize) -> anyhow::Result<Run> {
    let suffix = Uuid::new_v4().simple().to_string();
    let mut db_url = url::Url::parse(&args.database_url)?;
    db_url.set_path(&format!("consumer_bench_{suffix}"));
    let db_url = db_url.to_string();
    Postgres::create_database(&db_url).await?;
    let db = PgPool::connect(&db_url).await?;
    service_kit::MIGRATOR.run(&db).await?;
    let broker =
        BrokerConfig { amqp_url: args.amqp_url.clone(), ..BrokerConfig::for_test(&suffix) };

    let messages = write_orders(&db, args.messages).await?;
    publish(&broker, &messages).await?;

    let started = Instant::now();
    let mut consumer = Command::new(&args.consumer_bin)
        .args(["--listen-addr", "127.0.0.1:0"])
        .args(["--batch-size", &batch_size.to_string()])
        .args(["--concurrency", &args.concurrency.to_string()])
        .args(["--prefetch", &args.prefetch.to_string()])
        .args(broker.to_args())
        .env("DATABASE_URL", &db_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = consumer.id().unwrap_or_default();
    loop {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'PENDING'")
                .fetch_one(&db)
                .await?;
        if pending == 0 {
            break;
        }
        if let Some(status) = consumer.try_wait()? {
            anyhow::bail!("the consumer exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss_kib = peak_rss_kib(pid).unwrap_or(0);
    consumer.kill().await?;

    db.close().await;
    Postgres::force_drop_database(&db_url).await?;
    let connection = outbox::amqp::connect(&broker.amqp_url, "consumer-bench").await?;
    let channel = connection.create_channel().await?;
    for queue in [&broker.inventory_queue, &broker.dead_letter_queue] {
        channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
    }
    Ok(Run { batch_size, seconds, peak_rss_kib })
}

/// Writes `count` PENDING orders of one to three lines of ample stock.
async fn write_orders(db: &PgPool, count: usize) -> anyhow::Result<Vec<(Uuid, OrderPlaced)>> {
    let mut messages = Vec::with_capacity(count);
    let (mut order_ids, mut line_orders, mut skus, mut quantities) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..count {
        let order_id = Uuid::now_v7();
        let lines: Vec<OrderPlacedLine> = (0..1 + i % 3)
            .map(|j| OrderPlacedLine {
                sku: format!("SKU-{:03}", 1 + (i * 7 + j * 3) % 20),
                quantity: 1 + (i % 5) as i32,
            })
            .collect();
        for line in &lines {
            line_orders.push(order_id);
            skus.push(line.sku.clone());
            quantities.push(line.quantity);
        }
        order_ids.push(order_id);
        let event =
            OrderPlaced { order_id, customer_id: "bench".to_owned(), lines, total_cents: 0 };
        messages.push((Uuid::now_v7(), event));
    }
    sqlx::query(
        "INSERT INTO orders (id, customer_id, total_cents) SELECT id, 'bench', 0 FROM unnest($1::uuid[]) AS t(id)",
    )
    .bind(&order_ids)
    .execute(db)
    .await?;
    sqlx::query(
        "INSERT INTO order_lines (order_id, sku, quantity, unit_price_cents)
         SELECT o, s, q, 0 FROM unnest($1::uuid[], $2::text[], $3::int4[]) AS t(o, s, q)",
    )
    .bind(&line_orders)
    .bind(&skus)
    .bind(&quantities)
    .execute(db)
    .await?;
    Ok(messages)
}

/// Publishes the events as the relay does, pipelined with confirms.
async fn publish(broker: &BrokerConfig, messages: &[(Uuid, OrderPlaced)]) -> anyhow::Result<()> {
    let connection = outbox::amqp::connect(&broker.amqp_url, "consumer-bench").await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    broker.inventory_topology().declare(&channel).await?;
    for chunk in messages.chunks(1_000) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for (id, event) in chunk {
            let properties = BasicProperties::default()
                .with_message_id(id.to_string().into())
                .with_type(OrderPlaced::EVENT_TYPE.into())
                .with_delivery_mode(2);
            let body = serde_json::to_vec(event)?;
            confirms.push(
                channel
                    .basic_publish(
                        broker.exchange.as_str().into(),
                        broker.inventory_binding.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        properties,
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            anyhow::ensure!(confirm.await?.is_ack(), "the broker did not confirm a message");
        }
    }
    let _ = connection.close(200, "published".into()).await;
    Ok(())
}

/// Peak resident set size of process `pid`, from /proc (Linux).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
