//! `cargo xtask chaos`: the whole system on the local services under a steady
//! open-loop load whose client retries with its Idempotency-Key, and a
//! schedule of faults ([`Schedule::chaos`]): order-service and
//! inventory-consumer SIGKILLed, RabbitMQ and Postgres restarted, Postgres,
//! RabbitMQ and both partitioned away (every byte held by a TCP proxy between
//! the services and them, nothing closed), a RabbitMQ memory alarm, and
//! COMMITs whose answer is lost. A fifth of the orders are cancelled at once
//! and a fifth two seconds later. Then it waits until every order is decided,
//! runs `order-service reconcile`, and judges the run ([`Verdict`]), counting
//! the events applied out of their order too.
//!
//! It RESTARTS THE MACHINE'S RabbitMQ AND Postgres and raises a memory alarm on
//! that RabbitMQ: run it on a development machine. The services use a database
//! and broker names of their own (`outbox_chaos`, prefix `chaos.`).
//!
//! With `--transport kafka` the whole system runs on a Kafka-protocol broker
//! of its own instead ([`crate::kafka::Broker`], on durable storage, behind
//! the proxy) with two inventory-consumer replicas: the kills of the consumer
//! take turns between them, a broker restart is a SIGKILL of the broker and a
//! start on the same storage, and the memory alarm, which only RabbitMQ has,
//! is left out (the run says so). RabbitMQ is not touched.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use sqlx::{Connection, PgConnection};
use test_support::{Fault as ProxyFault, FaultProxy, OnMatch};
use tokio::time::Instant;

use crate::faults::{Fault, Schedule};
use crate::kafka::Broker;
use crate::process::{Local, Service, Transport, bin_dir, command, free_port};
use crate::verdict::Verdict;

const EXCHANGE: &str = "chaos.orders";
const QUEUE: &str = "chaos.inventory.order-placed";
const DEAD_LETTER_EXCHANGE: &str = "chaos.orders.dlx";
const DEAD_LETTER_QUEUE: &str = "chaos.inventory.order-placed.dead";
/// The Kafka topics' prefix: `chaos.order` and `chaos.order.dlq`.
const TOPIC_PREFIX: &str = "chaos.";

/// Orders not decided yet: PENDING, or with an accepted cancel and not CANCELLED.
const STUCK_ORDERS: &str = "
    SELECT count(*) FROM orders AS o
    WHERE status = 'PENDING'
       OR (status <> 'CANCELLED'
           AND EXISTS (SELECT FROM order_cancellations AS c WHERE c.order_id = o.id))";

/// The settings of `cargo xtask chaos`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long the load runs (`40s`, `2m`); the faults are spread over it.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Orders per second.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    /// How long each partition and the memory alarm last [default: an eighth
    /// of --duration, at most 25s].
    #[arg(long, value_parser = humantime::parse_duration)]
    stall: Option<Duration>,
    /// Use the release binaries as they are.
    #[arg(long)]
    no_build: bool,
    /// The broker the system runs on: the local RabbitMQ, or a Kafka-protocol
    /// broker this run starts on durable storage (scripts/kafka-broker.sh
    /// builds it once).
    #[arg(long, value_enum, default_value_t = Transport::Rabbitmq)]
    transport: Transport,
}

/// Whether `fault` can happen on `transport`: the memory alarm is RabbitMQ's.
fn applies(fault: Fault, transport: Transport) -> bool {
    !(transport == Transport::Kafka && matches!(fault, Fault::MemoryAlarm(_)))
}

pub async fn run(args: Args) -> anyhow::Result<bool> {
    if args.duration < Duration::from_secs(20) {
        bail!("--duration must be at least 20s");
    }
    let stall = args.stall.unwrap_or((args.duration / 8).min(Duration::from_secs(25)));
    let mut schedule = Schedule::chaos(args.duration, stall);
    let left_out: Vec<String> = schedule
        .0
        .iter()
        .filter(|(_, fault)| !applies(*fault, args.transport))
        .map(|(_, fault)| fault.to_string())
        .collect();
    schedule.0.retain(|(_, fault)| applies(*fault, args.transport));
    let local = Local::from_env();
    let run_dir = PathBuf::from(".run/chaos");
    std::fs::create_dir_all(&run_dir)?;
    for file in std::fs::read_dir(&run_dir)? {
        let _ = std::fs::remove_file(file?.path());
    }
    let bin_dir = bin_dir("release");
    if !args.no_build {
        println!("== building (release)");
        crate::process::build_release(true).await?;
    }

    println!(
        "== fresh database outbox_chaos and {} chaos.*",
        if args.transport == Transport::Kafka { "topics" } else { "queues" }
    );
    let mut admin = PgConnection::connect(&local.database_url("postgres")).await?;
    for statement in
        ["DROP DATABASE IF EXISTS outbox_chaos WITH (FORCE)", "CREATE DATABASE outbox_chaos"]
    {
        sqlx::raw_sql(statement)
            .execute(&mut admin)
            .await
            .with_context(|| format!("cannot make the database outbox_chaos: {statement}"))?;
    }
    // The services reach Postgres and the broker through proxies that can
    // hold every byte; this process reads and counts past them (on Kafka,
    // whose broker tells clients where to connect, through the proxy too).
    let db_proxy = FaultProxy::start(&local.pg).await;
    let mut env = vec![
        (
            "DATABASE_URL".to_owned(),
            format!("postgres://postgres:postgres@127.0.0.1:{}/outbox_chaos", db_proxy.port),
        ),
        (
            "RUST_LOG".to_owned(),
            std::env::var("RUST_LOG").unwrap_or("info,sqlx::postgres::notice=warn".into()),
        ),
    ];
    let (broker_proxy, mut kafka) = match args.transport {
        Transport::Rabbitmq => {
            delete_queues(&local).await?;
            let proxy = FaultProxy::start(&local.amqp).await;
            env.extend(
                [
                    ("AMQP_URL", format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port)),
                    ("EXCHANGE", EXCHANGE.to_owned()),
                    ("INVENTORY_QUEUE", QUEUE.to_owned()),
                    ("DEAD_LETTER_EXCHANGE", DEAD_LETTER_EXCHANGE.to_owned()),
                    ("DEAD_LETTER_QUEUE", DEAD_LETTER_QUEUE.to_owned()),
                    // Two workers on the one queue, so that their batches race
                    // for the same orders and stock (the default is one).
                    ("CONCURRENCY", "2".to_owned()),
                ]
                .map(|(name, value)| (name.to_owned(), value)),
            );
            (proxy, None)
        }
        Transport::Kafka => {
            let binary = Broker::binary().await?;
            let port = free_port()?;
            let proxy = FaultProxy::start(&format!("127.0.0.1:{port}")).await;
            let mut broker = Broker::new(binary, &run_dir.join("kafka"), port, proxy.port)?;
            broker.start().await?;
            println!(
                "== Kafka broker on {} (durable: {}), reached through 127.0.0.1:{}",
                broker.address,
                broker.log().with_file_name("tansu.db").display(),
                proxy.port
            );
            let brokers = format!("127.0.0.1:{}", proxy.port);
            env.extend(crate::kafka::service_env(&brokers, TOPIC_PREFIX));
            (proxy, Some(broker))
        }
    };
    let mut api = Service::new("order-service", &bin_dir, free_port()?, env.clone(), &run_dir);
    // On Kafka two replicas share the partitions; a kill hits one in turn.
    let replicas = if kafka.is_some() { 2 } else { 1 };
    let mut consumers: Vec<Service> = (0..replicas)
        .map(|replica| {
            let consumer =
                Service::new("inventory-consumer", &bin_dir, free_port()?, env.clone(), &run_dir);
            Ok(match replica {
                0 => consumer,
                n => consumer.logging_to(run_dir.join(format!("inventory-consumer-{}.log", n + 1))),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    api.start()?;
    api.wait_ready(Duration::from_secs(60)).await?; // migrates the database first
    for consumer in &mut consumers {
        consumer.start()?;
        consumer.wait_ready(Duration::from_secs(60)).await?;
    }

    println!(
        "== load: {} orders/s for {}, each with an Idempotency-Key, retried; stalls of {}",
        args.rate,
        humantime::format_duration(args.duration),
        humantime::format_duration(stall)
    );
    println!(
        "   {} faults; the last heals {} after the load starts",
        schedule.0.len(),
        humantime::format_duration(schedule.ends())
    );
    for fault in &left_out {
        println!("   LEFT OUT on {:?}: {fault} (RabbitMQ only)", args.transport);
    }
    let load_report = run_dir.join("load.json");
    let mut load = tokio::process::Command::new(bin_dir.join("stress-test"))
        .args(["--url", &api.url, "--rate", &args.rate.to_string()])
        .args(["--duration", &format!("{}s", args.duration.as_secs())])
        .args(["--concurrency", "256", "--idempotency-keys", "--retries", "60"])
        // A share of the orders cancelled at once (its OrderCancelled right
        // behind its OrderPlaced), a share two seconds later (mostly after it
        // was decided, giving its stock back).
        .args(["--cancel-ratio", "0.2", "--late-cancel-ratio", "0.2", "--late-cancel-after", "2s"])
        .args(["--timeout", "180s", "--json"])
        // Follows the orders in the database directly, past the proxy.
        .env("DATABASE_URL", local.database_url("outbox_chaos"))
        .stdout(std::fs::File::create(&load_report)?)
        .stderr(std::fs::File::create(run_dir.join("load.err"))?)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the stress test")?;

    let started = Instant::now();
    let (mut commits_armed, mut commits_lost) = (0u32, 0u32);
    let mut consumer_kills = 0usize;
    for (at, fault) in &schedule.0 {
        tokio::time::sleep_until(started + *at).await;
        let said = match args.transport {
            Transport::Rabbitmq => fault.to_string(),
            Transport::Kafka => fault.to_string().replace("RabbitMQ", "the Kafka broker"),
        };
        println!("[{:>3}s] {said}", started.elapsed().as_secs());
        match *fault {
            Fault::KillApi => {
                api.kill().await;
                api.start()?;
            }
            Fault::KillConsumer => {
                let consumer = &mut consumers[consumer_kills % replicas];
                consumer_kills += 1;
                consumer.kill().await;
                consumer.start()?;
            }
            Fault::RestartBroker => match kafka.as_mut() {
                Some(broker) => broker.restart().await?,
                None => restart_broker(&local).await?,
            },
            Fault::RestartDatabase => restart_database(&local).await?,
            Fault::PartitionDatabase(lasts) => hold(&[&db_proxy], lasts).await,
            Fault::PartitionBroker(lasts) => hold(&[&broker_proxy], lasts).await,
            Fault::PartitionBoth(lasts) => hold(&[&db_proxy, &broker_proxy], lasts).await,
            Fault::MemoryAlarm(lasts) => memory_alarm(lasts).await?,
            Fault::AmbiguousCommit => {
                commits_lost += u32::from(commits_armed > 0 && db_proxy.fired());
                commits_armed += 1;
                db_proxy.arm(b"COMMIT", OnMatch::LoseAnswer);
            }
            Fault::KillQueueLeader | Fault::RestartKilledNode => {
                bail!("{fault}: a fault of the cluster proof, not of this run")
            }
        }
    }

    let load_status = load.wait().await?;
    commits_lost += u32::from(commits_armed > 0 && db_proxy.fired());
    println!(
        "== load done ({commits_lost} of {commits_armed} COMMIT answers lost); \
         waiting for every order to be decided"
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&load_report)?)
        .with_context(|| {
            format!("the load printed no report; see {}", run_dir.join("load.err").display())
        })?;
    let mut db = PgConnection::connect(&local.database_url("outbox_chaos")).await?;
    let count = async |db: &mut PgConnection, sql: &str| -> anyhow::Result<u64> {
        let n: i64 = sqlx::query_scalar(sql).fetch_one(db).await.with_context(|| sql.to_owned())?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    let converge_until = Instant::now() + Duration::from_secs(120);
    while Instant::now() < converge_until {
        let pending = count(&mut db, "SELECT count(*) FROM outbox WHERE state = 'pending'").await?
            + count(&mut db, STUCK_ORDERS).await?;
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    println!("== reconcile");
    let reconcile = tokio::process::Command::new(bin_dir.join("order-service"))
        .arg("reconcile")
        .env("DATABASE_URL", local.database_url("outbox_chaos"))
        .status()
        .await?;
    let reconcile_json = tokio::process::Command::new(bin_dir.join("order-service"))
        .args(["reconcile", "--json"])
        .env("DATABASE_URL", local.database_url("outbox_chaos"))
        .output()
        .await?;
    std::fs::write(run_dir.join("reconcile.json"), &reconcile_json.stdout)?;
    let reconciled: serde_json::Value = serde_json::from_slice(&reconcile_json.stdout)
        .context("reconcile --json printed no report")?;

    let field = |name: &str| report[name].as_u64().unwrap_or(0);
    let verdict = Verdict {
        accepted: field("ok"),
        lost: field("not_found"),
        doubled: count(
            &mut db,
            "SELECT count(*) FROM orders o
             WHERE NOT EXISTS (SELECT 1 FROM idempotency_keys k WHERE k.order_id = o.id)",
        )
        .await?,
        stock_off: reconciled["skus_off"].as_array().map_or(0, |skus| skus.len() as u64),
        out_of_order: reconciled["cancels_out_of_order"].as_u64().unwrap_or(0),
        stuck: count(&mut db, STUCK_ORDERS).await?,
        dead: count(&mut db, "SELECT count(*) FROM outbox WHERE state = 'dead'").await?
            + match args.transport {
                Transport::Rabbitmq => dead_letters(&local).await?,
                Transport::Kafka => kafka_dead_letters(broker_proxy.port).await?,
            },
        reconciled: reconcile.success(),
    };
    println!(
        "load: {} sent, {} accepted, {} retries, {} cancels ({} accepted, {} of REJECTED \
         orders), stress-test {load_status}; reconcile {reconcile}",
        field("sent"),
        verdict.accepted,
        field("retries"),
        field("cancels"),
        field("cancels_accepted"),
        field("cancels_not_cancellable")
    );
    println!("{verdict}");
    drop((api, consumers, kafka));
    Ok(verdict.holds())
}

/// Holds every byte through `proxies` for `lasts`, then lets them pass.
async fn hold(proxies: &[&FaultProxy], lasts: Duration) {
    for proxy in proxies {
        proxy.set(ProxyFault::Hold);
    }
    tokio::time::sleep(lasts).await;
    for proxy in proxies {
        proxy.set(ProxyFault::Pass);
    }
}

async fn restart_broker(local: &Local) -> anyhow::Result<()> {
    let _ = command("rabbitmqctl", &["-q", "stop"]).await;
    command("rabbitmq-server", &["-detached"]).await?;
    wait_for_port(&local.amqp, Duration::from_secs(90)).await?;
    let _ = command("rabbitmqctl", &["-q", "await_startup"]).await;
    Ok(())
}

async fn restart_database(local: &Local) -> anyhow::Result<()> {
    let cluster = std::env::var("PG_CLUSTER").ok().or_else(|| {
        let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
            .ok()?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .collect();
        versions.sort();
        Some(format!("{} main", versions.first()?))
    });
    let Some(cluster) = cluster else {
        bail!("no Postgres cluster in /etc/postgresql (set PG_CLUSTER)")
    };
    let (version, name) = cluster.split_once(' ').unwrap_or((cluster.as_str(), "main"));
    command(
        "pg_ctlcluster",
        &["--skip-systemctl-redirect", version, name, "restart", "-m", "immediate"],
    )
    .await?;
    wait_for_port(&local.pg, Duration::from_secs(60)).await
}

/// Raises a memory alarm on the local RabbitMQ for `lasts`, then puts its
/// watermark back as it was.
async fn memory_alarm(lasts: Duration) -> anyhow::Result<()> {
    let current =
        command("rabbitmqctl", &["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
            .await?;
    let current = current.trim().trim_matches('"').to_owned();
    command("rabbitmqctl", &["set_vm_memory_high_watermark", "0"]).await?;
    tokio::time::sleep(lasts).await;
    match current.strip_prefix("{absolute,") {
        Some(bytes) => {
            command(
                "rabbitmqctl",
                &["set_vm_memory_high_watermark", "absolute", bytes.trim_end_matches('}')],
            )
            .await?
        }
        None => command("rabbitmqctl", &["set_vm_memory_high_watermark", &current]).await?,
    };
    Ok(())
}

async fn wait_for_port(address: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("{address} did not answer within {within:?}")
}

async fn delete_queues(local: &Local) -> anyhow::Result<()> {
    let connection = outbox::amqp::connect(&local.amqp_url(), "chaos").await?;
    let channel = connection.create_channel().await?;
    for queue in [QUEUE, DEAD_LETTER_QUEUE] {
        channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await?;
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// Letters in the dead-letter topic (not replayed), read through the proxy
/// on `port`.
async fn kafka_dead_letters(port: u16) -> anyhow::Result<u64> {
    let config = inventory_consumer::Config::try_parse_command_line([
        "inventory-consumer",
        "--kafka-brokers",
        &format!("127.0.0.1:{port}"),
        "--kafka-topic-prefix",
        TOPIC_PREFIX,
    ])?;
    let letters = inventory_consumer::kafka::dead_letter::list(&config.kafka, usize::MAX).await?;
    Ok(letters.len() as u64)
}

/// Messages in the dead-letter queue.
async fn dead_letters(local: &Local) -> anyhow::Result<u64> {
    let connection = outbox::amqp::connect(&local.amqp_url(), "chaos").await?;
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let depth =
        match channel.queue_declare(DEAD_LETTER_QUEUE.into(), passive, Default::default()).await {
            Ok(queue) => u64::from(queue.message_count()),
            Err(_) => 0, // never declared: nothing was dead-lettered
        };
    let _ = connection.close(200, "done".into()).await;
    Ok(depth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_kafka_only_the_memory_alarm_is_left_out() {
        let schedule = Schedule::chaos(Duration::from_secs(40), Duration::from_secs(5));
        let kept: Vec<Fault> = schedule
            .0
            .iter()
            .map(|(_, fault)| *fault)
            .filter(|fault| applies(*fault, Transport::Kafka))
            .collect();
        assert_eq!(kept.len(), schedule.0.len() - 1);
        assert!(!kept.iter().any(|fault| matches!(fault, Fault::MemoryAlarm(_))));
        assert!(kept.contains(&Fault::RestartBroker));
        assert!(schedule.0.iter().all(|(_, fault)| applies(*fault, Transport::Rabbitmq)));
    }
}
