//! `cargo xtask bench-e2e`: what the whole system achieves, measured against
//! what Postgres alone can commit of the same work (the benchmark of issue
//! "group commit").
//!
//! 1. cargo build --release of order-service, inventory-consumer, stress-test.
//! 2. The ceiling: pgbench runs bench/e2e/order.pgbench, the single-order write
//!    transaction of that day, frozen, against bench/e2e/yardstick.sql, that
//!    day's schema, frozen, in a database of its own (dropped afterwards): the
//!    orders Postgres on this machine commits when nothing else of the system
//!    runs. Neither file is ever updated, so later versions of the system are
//!    measured against the same ceiling. Shown with Postgres's CPU time a
//!    transaction and the cores other processes kept busy meanwhile.
//! 3. The whole system, at each `--concurrency` in turn (32 and 128 requests in
//!    flight unless told), steps 3 to 6 each time, their files in
//!    .run/bench-e2e/in-flight-<n>/: order-service and inventory-consumer
//!    (release builds) on a fresh database and broker names of their own
//!    (prefix `bench`), a warm-up, then the closed-loop stress test (`--orders`),
//!    waiting until the consumer has decided every order. The services log at
//!    `warn`, so that writing logs does not show in their CPU figures.
//! 4. CPU time per order ([`cpu`]), between a reading just before the run and
//!    one just after it: Postgres is the postmaster's process tree (every
//!    backend, including those that exited during the run, and the stress
//!    test's own reads); RabbitMQ the beam.smp listening on the AMQP port, with
//!    its helpers; order-service and inventory-consumer their processes; the
//!    load generator the stress test, as reaped. "Other" is the rest of the
//!    machine's busy time: the figures are only as quiet as the machine.
//! 5. The table ([`report`]), also written to .run/bench-e2e/result.json.
//! 6. An open-loop run at half the system's orders/s (`--open-seconds`), at
//!    most twice the concurrency in flight: its latency and e2e lag. The goal:
//!    e2e lag p99 under 50 ms at half the peak.
//! 7. With more than one concurrency, a summary: each one's orders/s against
//!    the pipeline ceiling, CPU per order and open-loop lag, with the goals.
//!
//! Fails when a step fails: the build, pgbench, a service that does not become
//! ready or exits, a stress-test run that fails (a request not answered 2xx,
//! or orders not decided in time). The e2e database is kept for a look after
//! the run, and dropped at the start of the next.

mod cpu;
mod parts;
mod report;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use lapin::options::QueueDeleteOptions;
use sqlx::{Connection, PgConnection};

use crate::process::{Local, Service, Transport, bin_dir, command, free_port, until_signal};
use cpu::{Clock, MachineTicks, Processes, delta, reaped_ticks};
use report::{
    BatchSizes, Batches, Ceiling, ClosedRun, Failed, Meta, Open, Pgbench, PipelineCeiling,
    StressReport, System,
};

pub use parts::{PassThrough, QueueTypesArgs, consumer, queue_types, relay};

/// The settings of `cargo xtask bench-e2e` (scripts/bench-e2e.sh).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Orders of the closed-loop run.
    #[arg(
        long,
        env = "BENCH_ORDERS",
        default_value_t = 20000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    orders: u64,
    /// Requests the stress test keeps in flight: a run of the whole system
    /// (fresh database and queues, closed loop, open loop) for each, in turn.
    #[arg(
        long,
        env = "BENCH_CONCURRENCY",
        value_delimiter = ',',
        default_value = "32,128",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    concurrency: Vec<u64>,
    /// pgbench clients of the ceiling.
    #[arg(
        long,
        env = "BENCH_CLIENTS",
        default_value_t = 16,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    clients: u32,
    /// pgbench duration of the ceiling, in seconds.
    #[arg(
        long,
        env = "BENCH_SECONDS",
        default_value_t = 20,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    seconds: u32,
    /// Use the release binaries as they are.
    #[arg(long)]
    no_build: bool,
    /// Orders of the warm-up run.
    #[arg(
        long,
        env = "BENCH_WARMUP_ORDERS",
        default_value_t = 500,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    warmup_orders: u64,
    /// Seconds of the open-loop run.
    #[arg(
        long,
        env = "BENCH_OPEN_SECONDS",
        default_value_t = 20,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    open_seconds: u64,
    /// The system's database, dropped and created afresh on every run
    /// [default: postgres://postgres:postgres@$PG_HOST:$PG_PORT/outbox_bench_e2e].
    #[arg(long, env = "BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// The ceiling's database, dropped after it
    /// [default: postgres://postgres:postgres@$PG_HOST:$PG_PORT/outbox_bench_ceiling].
    #[arg(long, env = "BENCH_CEILING_DATABASE_URL")]
    ceiling_database_url: Option<String>,
    /// The broker [default: amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f].
    #[arg(long, env = "BENCH_AMQP_URL")]
    amqp_url: Option<String>,
    /// The broker between the services: RabbitMQ, or Kafka (the broker of
    /// KAFKA_BROKERS, else one scripts/kafka-broker.sh starts), on topics of
    /// the run's own. Run it once with each to compare the two.
    #[arg(long, env = "BENCH_TRANSPORT", value_enum, default_value_t = Transport::Rabbitmq)]
    transport: Transport,
    /// order-service's port [default: a free one].
    #[arg(long, env = "BENCH_API_PORT")]
    api_port: Option<u16>,
    /// inventory-consumer's port [default: a free one].
    #[arg(long, env = "BENCH_CONSUMER_PORT")]
    consumer_port: Option<u16>,
    /// Prefix of the exchange and queue names, which keeps the benchmark's
    /// messages away from any other service on the same broker.
    #[arg(long, env = "BENCH_PREFIX", default_value = "bench")]
    prefix: String,
    /// The services' RUST_LOG (not the caller's: an info line per order would
    /// be measured as the services' CPU).
    #[arg(long, env = "BENCH_RUST_LOG", default_value = "warn")]
    rust_log: String,
    /// The pipeline ceiling's script, run after the single-order ceiling on the
    /// ceiling's server: the yardstick of the throughput goal (the whole
    /// pipeline's database work, batched, on a frozen schema). A missing script
    /// is said and skipped; one that fails stops the run.
    #[arg(
        long,
        env = "BENCH_PIPELINE_CEILING",
        default_value = "../shared/perf/pipeline-ceiling.sh"
    )]
    pipeline_ceiling: PathBuf,
    /// Its pgbench client counts (the best counts).
    #[arg(long, env = "BENCH_PIPELINE_CLIENTS", default_value = "4 8")]
    pipeline_clients: String,
    /// pgbench [default: on the PATH, else the newest /usr/lib/postgresql/*/bin/pgbench].
    #[arg(long, env = "PGBENCH")]
    pgbench: Option<PathBuf>,
}

const LOG_DIR: &str = ".run/bench-e2e";

pub async fn run(args: Args) -> anyhow::Result<bool> {
    // bench/e2e, .run and target are the workspace's.
    std::env::set_current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))?;
    let mut services = Vec::new();
    let outcome = until_signal(bench(&args, &mut services)).await;
    stop_services(&mut services).await;
    outcome
}

async fn bench(args: &Args, services: &mut Vec<Service>) -> anyhow::Result<bool> {
    let local = Local::from_env();
    let database_url =
        args.database_url.clone().unwrap_or_else(|| local.database_url("outbox_bench_e2e"));
    let ceiling_url = args
        .ceiling_database_url
        .clone()
        .unwrap_or_else(|| local.database_url("outbox_bench_ceiling"));
    let amqp_url = args.amqp_url.clone().unwrap_or_else(|| local.amqp_url());
    let database = database_name(&database_url)?;
    let ceiling_database = database_name(&ceiling_url)?;
    let pgbench = match &args.pgbench {
        Some(path) => path.clone(),
        None => find_pgbench()
            .context("pgbench is needed (it comes with Postgres); set PGBENCH to its path")?,
    };
    let clock = Clock::read().context("/proc is needed to measure CPU time")?;
    let log_dir = PathBuf::from(LOG_DIR);
    let bin_dir = bin_dir("release");

    println!("== services");
    println!("   Postgres on {}, RabbitMQ on {}; {} cores", local.pg, local.amqp, clock.cores);
    let mut admin = PgConnection::connect(&admin_url(&database_url))
        .await
        .context("cannot connect to Postgres")?;
    let autovacuum: String = sqlx::query_scalar("SHOW autovacuum").fetch_one(&mut admin).await?;
    if autovacuum == "off" {
        println!(
            "   note: autovacuum is off on this server: the tables' autovacuum settings do nothing"
        );
    }

    if !args.no_build {
        println!("== cargo build --release");
        crate::process::build_release(false).await?;
    }
    for name in ["order-service", "inventory-consumer", "stress-test"] {
        if !bin_dir.join(name).is_file() {
            bail!("{}/{name} is missing; run without --no-build", bin_dir.display());
        }
    }
    std::fs::create_dir_all(&log_dir)?;
    for file in std::fs::read_dir(&log_dir)? {
        let path = file?.path();
        if path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("in-flight-"))
            && path.is_dir()
        {
            std::fs::remove_dir_all(&path)?;
        } else if path.extension().is_some_and(|ext| {
            ["json", "err", "cpu", "out", "log"].map(Into::into).contains(&ext.to_owned())
        }) {
            std::fs::remove_file(path)?;
        }
    }

    let data_directory: String =
        sqlx::query_scalar("SHOW data_directory").fetch_one(&mut admin).await.unwrap_or_default();
    let pg_pid = cpu::postmaster_pid(
        Some(Path::new(&data_directory)).filter(|dir| !dir.as_os_str().is_empty()),
        &Processes::read()?,
    );
    match pg_pid {
        Some(pid) => println!("   Postgres CPU: the postmaster, pid {pid}, and its process tree"),
        None => println!("   Postgres CPU: not measured (no local postmaster found)"),
    }

    // --- the ceiling ---------------------------------------------------------
    println!(
        "== ceiling: pgbench, {} clients, {} s, bench/e2e/order.pgbench on bench/e2e/yardstick.sql",
        args.clients, args.seconds
    );
    recreate(&mut admin, &ceiling_database).await?;
    {
        let mut ceiling_db = PgConnection::connect(&ceiling_url).await?;
        let yardstick = std::fs::read_to_string("bench/e2e/yardstick.sql")?;
        sqlx::raw_sql(&yardstick)
            .execute(&mut ceiling_db)
            .await
            .context("bench/e2e/yardstick.sql")?;
        // A checkpoint first, so that neither run starts in the middle of one:
        // the full-page images after a checkpoint are a large part of the WAL
        // of a commit.
        sqlx::raw_sql("CHECKPOINT").execute(&mut ceiling_db).await?;
        ceiling_db.close().await?;
    }
    let machine_before = MachineTicks::read()?;
    let pg_before = Processes::read()?.tree_ticks(pg_pid);
    let mut pgbench_command = tokio::process::Command::new(&pgbench);
    pgbench_command
        .args(["-n", "-M", "prepared", "-c", &args.clients.to_string(), "-j", "2"])
        .args(["-T", &args.seconds.to_string(), "-f", "bench/e2e/order.pgbench", &ceiling_url]);
    let pgbench_out = log_dir.join("pgbench.out");
    let pgbench_err = log_dir.join("pgbench.err");
    let (pgbench_status, pgbench_ticks) =
        timed(pgbench_command, &pgbench_out, &pgbench_err).await?;
    let pg_after = Processes::read()?.tree_ticks(pg_pid);
    let machine = machine_before.until(MachineTicks::read()?);
    drop_database(&mut admin, &ceiling_database).await?;
    let pgbench_output = std::fs::read_to_string(&pgbench_out).unwrap_or_default();
    let pgbench_errors = std::fs::read_to_string(&pgbench_err).unwrap_or_default();
    if !pgbench_status.success() {
        eprint!("{pgbench_output}{pgbench_errors}");
        bail!("pgbench failed (status {})", status_code(pgbench_status));
    }
    let Some(parsed) = Pgbench::parse(&pgbench_output) else {
        eprint!("{pgbench_output}{pgbench_errors}");
        bail!("no tps in pgbench's output");
    };
    let ceiling = Ceiling::new(
        args.clients,
        args.seconds,
        parsed,
        delta(pg_before, pg_after),
        machine,
        pgbench_ticks,
        clock,
    );
    println!("{}", ceiling.line(clock.cores));
    let pipeline = pipeline_ceiling(args, &ceiling_url, &log_dir).await?;

    // --- the whole system, at each concurrency ------------------------------
    let kafka_brokers = match args.transport {
        Transport::Rabbitmq => None,
        Transport::Kafka => Some(crate::kafka::brokers().await?),
    };
    let broker_pid = broker_pid(&amqp_url, kafka_brokers.as_deref()).await;
    let setup = Setup {
        args,
        database_url,
        database,
        amqp_url,
        kafka_brokers,
        bin_dir,
        clock,
        pg_pid,
        broker_pid,
        ceiling: &ceiling,
        pipeline: &pipeline,
    };
    let mut runs = Vec::with_capacity(args.concurrency.len());
    // A run that fails ends the benchmark, but the runs before it still make
    // their summary and result.json.
    let mut failed = None;
    for &concurrency in &args.concurrency {
        let run_dir = log_dir.join(format!("in-flight-{concurrency}"));
        std::fs::create_dir_all(&run_dir)?;
        let run = system_run(&setup, &mut admin, concurrency, &run_dir, services).await;
        stop_services(services).await;
        match run {
            Ok(run) => runs.push(run),
            Err(error) => {
                failed = Some(Failed { concurrency, error });
                break;
            }
        }
    }
    admin.close().await?;
    if runs.len() > 1 {
        for line in report::summary(&runs) {
            println!("{line}");
        }
    }

    let meta = Meta {
        commit: command("git", &["rev-parse", "--short", "HEAD"])
            .await
            .map(|commit| commit.trim().to_owned())
            .unwrap_or_default(),
        dirty: command("git", &["status", "--porcelain", "--untracked-files=no"])
            .await
            .is_ok_and(|status| !status.trim().is_empty()),
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        cores: clock.cores,
    };
    let result_file = log_dir.join("result.json");
    let result = report::result_json(&meta, &ceiling, &pipeline, &runs, failed.as_ref());
    std::fs::write(&result_file, serde_json::to_string_pretty(&result)? + "\n")?;
    println!("   result: {}", result_file.display());
    if let Some(Failed { concurrency, error }) = failed {
        return Err(error.context(format!(
            "the run at {concurrency} in flight failed (result.json holds the {} before it)",
            runs.len()
        )));
    }
    for (system, open) in &runs {
        if open.status != 0 {
            bail!(
                "the open-loop run at {} in flight failed (stress-test status {})",
                system.run.concurrency,
                open.status
            );
        }
    }
    Ok(true)
}

/// What every run of the whole system shares.
struct Setup<'a> {
    args: &'a Args,
    database_url: String,
    database: String,
    amqp_url: String,
    /// On Kafka, its brokers.
    kafka_brokers: Option<String>,
    bin_dir: PathBuf,
    clock: Clock,
    pg_pid: Option<i32>,
    broker_pid: Option<i32>,
    ceiling: &'a Ceiling,
    pipeline: &'a PipelineCeiling,
}

/// The broker's process, whose tree's CPU time is the broker's: RabbitMQ's
/// beam.smp listening on the AMQP port, or the Kafka broker's tansu.
async fn broker_pid(amqp_url: &str, kafka_brokers: Option<&str>) -> Option<i32> {
    let Some(brokers) = kafka_brokers else {
        let pid = amqp_port(amqp_url)
            .and_then(|port| cpu::listening_pid(port, "beam.smp", &Processes::read().ok()?));
        match pid {
            Some(pid) => {
                let node = command("rabbitmqctl", &["-q", "--timeout", "10", "eval", "node()."])
                    .await
                    .map(|node| format!("; the default node is {}", node.trim().replace('\'', "")))
                    .unwrap_or_default();
                println!(
                    "   RabbitMQ CPU: beam.smp pid {pid} (the one listening on the AMQP port{node}) \
                     and its process tree"
                );
            }
            None => {
                println!(
                    "   RabbitMQ CPU: not measured (no local beam.smp found for the AMQP port)"
                )
            }
        }
        return pid;
    };
    let pid = brokers
        .split(',')
        .next()
        .and_then(|broker| broker.rsplit_once(':')?.1.parse().ok())
        .and_then(|port| cpu::listening_pid(port, "tansu", &Processes::read().ok()?));
    match pid {
        Some(pid) => println!("   Kafka broker CPU: tansu pid {pid} and its process tree"),
        None => println!("   Kafka broker CPU: not measured (no local tansu found)"),
    }
    pid
}

/// Stops the services, saying where their logs are.
async fn stop_services(services: &mut Vec<Service>) {
    if services.is_empty() {
        return;
    }
    let names: Vec<&str> = services.iter().map(Service::name).collect();
    println!("== stopping {}", names.join(" "));
    let mut logs = Vec::new();
    for mut service in services.drain(..) {
        if !service.stop(Duration::from_secs(15)).await {
            eprintln!("   {} did not stop within 15 s; killed it", service.name());
        }
        logs.push(service.log().display().to_string());
    }
    println!("   logs: {}", logs.join(" "));
}

/// The whole system at `concurrency` requests in flight, on a fresh database
/// and queues: the services started (into `services`, which the caller
/// stops), a warm-up, the closed loop with its CPU per order, then the open
/// loop at half its orders/s. Its files go to `log_dir`.
async fn system_run(
    setup: &Setup<'_>,
    admin: &mut PgConnection,
    concurrency: u64,
    log_dir: &Path,
    services: &mut Vec<Service>,
) -> anyhow::Result<(System, Open)> {
    let Setup { args, database_url, database, amqp_url, clock, .. } = setup;
    let clock = *clock;
    println!("== {concurrency} in flight: fresh database and queues");
    drop_database(admin, database).await?;
    println!("   dropped {database}; the services create and migrate it at start-up");
    // Messages an interrupted run left behind would name orders that no longer
    // exist; the services declare the queues afresh.
    let queue = format!("{}.inventory.order-placed", args.prefix);
    let dead_letter_queue = format!("{queue}.dead");
    if setup.kafka_brokers.is_none() {
        delete_queues(amqp_url, &[&queue, &dead_letter_queue]).await?;
    }

    println!("== starting the services (RUST_LOG={})", args.rust_log);
    let mut env = vec![
        ("DATABASE_URL".to_owned(), database_url.clone()),
        ("AMQP_URL".to_owned(), amqp_url.clone()),
        ("EXCHANGE".to_owned(), format!("{}.orders", args.prefix)),
        ("INVENTORY_QUEUE".to_owned(), queue.clone()),
        ("DEAD_LETTER_EXCHANGE".to_owned(), format!("{}.orders.dlx", args.prefix)),
        ("DEAD_LETTER_QUEUE".to_owned(), dead_letter_queue.clone()),
        ("RUST_LOG".to_owned(), args.rust_log.clone()),
    ];
    if let Some(brokers) = &setup.kafka_brokers {
        let prefix = crate::kafka::run_prefix(&args.prefix);
        println!("   on Kafka: brokers {brokers}, topic {prefix}order");
        env.extend(crate::kafka::service_env(brokers, &prefix));
    }
    let ports =
        [port(args.api_port, "BENCH_API_PORT")?, port(args.consumer_port, "BENCH_CONSUMER_PORT")?];
    // The consumer starts second, so the two do not race to create the database.
    for (name, port) in ["order-service", "inventory-consumer"].into_iter().zip(ports) {
        let mut service = Service::new(name, &setup.bin_dir, port, env.clone(), log_dir);
        service.start_announced()?;
        services.push(service);
        let service = services.last_mut().expect("just pushed");
        if let Err(error) = service.wait_ready(Duration::from_secs(60)).await {
            show_log(service);
            return Err(error);
        }
        println!("   {name} is ready");
    }
    let service_pids = [services[0].pid(), services[1].pid()].map(|pid| pid.map(|pid| pid as i32));

    let stress = Stress {
        bin: setup.bin_dir.join("stress-test"),
        api_url: services[0].url.clone(),
        database_url: database_url.clone(),
        log_dir: log_dir.to_owned(),
    };
    let in_flight = concurrency.to_string();
    println!("== warm-up: {} orders, {concurrency} in flight", args.warmup_orders);
    let (warmup, _) = stress
        .run("warmup", &["--orders", &args.warmup_orders.to_string(), "--concurrency", &in_flight])
        .await?;
    if !warmup.success() {
        bail!("the warm-up run failed");
    }
    check_alive(services)?;

    let mut db = PgConnection::connect(database_url).await?;
    // Transactions committed in other databases during the run: their
    // Postgres CPU is in the postmaster's tree too.
    let other_sql = format!(
        "SELECT coalesce(sum(xact_commit + xact_rollback), 0)::bigint FROM pg_stat_database \
         WHERE datname IS DISTINCT FROM '{database}'"
    );
    sqlx::raw_sql("CHECKPOINT").execute(&mut db).await?;
    println!("== closed loop: {} orders, {concurrency} in flight", args.orders);
    let other_before: i64 = sqlx::query_scalar(&other_sql).fetch_one(&mut db).await.unwrap_or(0);
    let machine_before = MachineTicks::read()?;
    let roots = [setup.pg_pid, setup.broker_pid, service_pids[0], service_pids[1]];
    let metrics_urls = [services[0].url.clone(), services[1].url.clone()];
    let batches_before = batch_sizes(&metrics_urls).await;
    let before = Processes::read()?;
    let (closed, load_ticks) = stress
        .run("closed", &["--orders", &args.orders.to_string(), "--concurrency", &in_flight])
        .await?;
    let after = Processes::read()?;
    let machine = machine_before.until(MachineTicks::read()?);
    let batches_after = batch_sizes(&metrics_urls).await;
    let other_after: i64 = sqlx::query_scalar(&other_sql).fetch_one(&mut db).await.unwrap_or(0);
    if !closed.success() {
        bail!("the closed-loop run failed (stress-test status {})", status_code(closed));
    }
    check_alive(services)?;
    let closed_report = log_dir.join("closed.json");
    let report: StressReport = serde_json::from_slice(&std::fs::read(&closed_report)?)
        .with_context(|| {
            format!("{} lacks ok, elapsed_seconds or converge_seconds", closed_report.display())
        })?;
    // The consumer's status updates that took the HOT path (no new index entries).
    let hot_percent: Option<String> = sqlx::query_scalar(
        "SELECT round(100.0 * n_tup_hot_upd / nullif(n_tup_upd, 0), 1)::text \
         FROM pg_stat_user_tables WHERE relname = 'orders'",
    )
    .fetch_optional(&mut db)
    .await?
    .flatten();
    db.close().await?;
    let run = ClosedRun {
        orders: args.orders,
        concurrency,
        report,
        component_ticks: roots.map(|root| delta(before.tree_ticks(root), after.tree_ticks(root))),
        load_ticks,
        machine,
        hot_percent,
        other_transactions: other_after - other_before,
        batches: BatchSizes {
            write: since(&batches_after[0], &batches_before[0]),
            relay: since(&batches_after[1], &batches_before[1]),
            consumer: since(&batches_after[2], &batches_before[2]),
        },
        broker: match args.transport {
            Transport::Rabbitmq => "rabbitmq",
            Transport::Kafka => "kafka broker",
        },
    };
    let system = System::new(run, setup.ceiling.pgbench.tps, setup.pipeline, clock)?;
    for line in system.lines(setup.ceiling, setup.pipeline, clock.cores) {
        println!("{line}");
    }

    // --- open loop at half the peak -------------------------------------------
    let mut open = Open {
        rate: Open::rate_for(system.orders_per_second),
        seconds: args.open_seconds,
        concurrency: concurrency * 2,
        report: None,
        status: 0,
    };
    println!("{}", open.heading(system.orders_per_second));
    let (status, _) = stress
        .run(
            "open",
            &[
                "--rate",
                &open.rate.to_string(),
                "--duration",
                &format!("{}s", open.seconds),
                "--concurrency",
                &open.concurrency.to_string(),
            ],
        )
        .await?;
    open.status = status_code(status);
    open.report = std::fs::read(log_dir.join("open.json"))
        .ok()
        .and_then(|json| serde_json::from_slice(&json).ok());
    for line in open.lines() {
        println!("{line}");
    }
    Ok((system, open))
}

/// The three batch-size histograms ([`BatchSizes::METRICS`]) from
/// order-service's and the consumer's `/metrics`; `None` for one not read.
async fn batch_sizes(urls: &[String; 2]) -> [Option<Batches>; 3] {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().ok();
    let mut texts = Vec::with_capacity(2);
    for url in urls {
        let text = match &client {
            Some(client) => match client.get(format!("{url}/metrics")).send().await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            },
            None => String::new(),
        };
        texts.push(text);
    }
    let [write, relay, consumer] = BatchSizes::METRICS;
    [
        Batches::parse(&texts[0], write),
        Batches::parse(&texts[0], relay),
        Batches::parse(&texts[1], consumer),
    ]
}

fn since(after: &Option<Batches>, before: &Option<Batches>) -> Option<Batches> {
    Some(after.as_ref()?.since(before.as_ref()?))
}

/// Runs the pipeline ceiling's script against the local Postgres, showing its
/// lines; says so, and measures nothing, when the script is not there.
async fn pipeline_ceiling(
    args: &Args,
    server_url: &str,
    log_dir: &Path,
) -> anyhow::Result<PipelineCeiling> {
    let script = &args.pipeline_ceiling;
    let command = format!("{} {}", script.display(), args.pipeline_clients);
    if !script.is_file() {
        println!(
            "== pipeline ceiling: NOT MEASURED, no {} (set BENCH_PIPELINE_CEILING to its path)",
            script.display()
        );
        return Ok(PipelineCeiling {
            command: format!("no {}", script.display()),
            orders_per_second: None,
            cpu_ms_per_order: None,
        });
    }
    println!("== pipeline ceiling: {command}");
    let output = tokio::process::Command::new("bash")
        .arg(script)
        .args(args.pipeline_clients.split_whitespace())
        .envs(libpq_env(server_url)?)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run {}", script.display()))?;
    let out = String::from_utf8_lossy(&output.stdout);
    std::fs::write(log_dir.join("pipeline-ceiling.out"), &*out)?;
    for line in out.lines() {
        println!("   {line}");
    }
    let orders_per_second = PipelineCeiling::parse(&out);
    if !output.status.success() || orders_per_second.is_none() {
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
        bail!("{command} failed (status {})", status_code(output.status));
    }
    let cpu_ms_per_order = PipelineCeiling::parse_cpu(&out);
    Ok(PipelineCeiling { command, orders_per_second, cpu_ms_per_order })
}

/// The libpq variables (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`) that reach
/// the server of `url`, for the scripts that take no URL.
fn libpq_env(url: &str) -> anyhow::Result<Vec<(&'static str, String)>> {
    use std::str::FromStr;
    if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
        bail!("not a Postgres URL: {url}");
    }
    let options = sqlx::postgres::PgConnectOptions::from_str(url)
        .with_context(|| format!("not a Postgres URL: {url}"))?;
    let mut env = vec![
        ("PGHOST", options.get_host().to_owned()),
        ("PGPORT", options.get_port().to_string()),
        ("PGUSER", options.get_username().to_owned()),
    ];
    // `user:password@` between the scheme and the host, percent-encoding aside.
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(user_info, _)| user_info.split_once(':'))
        .map(|(_, password)| password.to_owned());
    env.extend(password.map(|password| ("PGPASSWORD", password)));
    Ok(env)
}

/// The stress test against the services, each run reporting to
/// `<log_dir>/<name>.json`, its stderr beside it.
struct Stress {
    bin: PathBuf,
    api_url: String,
    database_url: String,
    log_dir: PathBuf,
}

impl Stress {
    /// One run; its exit status and CPU ticks. On failure, its stderr is shown.
    async fn run(&self, name: &str, args: &[&str]) -> anyhow::Result<(ExitStatus, i64)> {
        let report = self.log_dir.join(format!("{name}.json"));
        let errors = self.log_dir.join(format!("{name}.err"));
        let mut command = tokio::process::Command::new(&self.bin);
        command
            .args(["--url", &self.api_url, "--database-url", &self.database_url, "--json"])
            .args(args);
        let (status, ticks) = timed(command, &report, &errors).await?;
        if !status.success() {
            let text = std::fs::read_to_string(&errors).unwrap_or_default();
            eprintln!("---- {}\n{}----", errors.display(), text);
            if std::fs::metadata(&report).is_ok_and(|file| file.len() > 0) {
                eprintln!("   report: {}", report.display());
            }
        }
        Ok((status, ticks))
    }
}

/// Runs `command` to its end, its stdout and stderr to files (killed if this
/// is dropped first); its status and the CPU ticks it used, all its threads
/// and the children it reaped included ([`reaped_ticks`]: nothing else of
/// this process is reaped meanwhile, its services run on).
async fn timed(
    mut command: tokio::process::Command,
    stdout: &Path,
    stderr: &Path,
) -> anyhow::Result<(ExitStatus, i64)> {
    let before = reaped_ticks()?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(stdout)?)
        .stderr(std::fs::File::create(stderr)?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {:?}", command.as_std().get_program()))?;
    let status = child.wait().await?;
    Ok((status, reaped_ticks()? - before))
}

/// The exit code, or 128 + the signal that ended it, as a shell says.
fn status_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().or(status.signal().map(|signal| 128 + signal)).unwrap_or(-1)
}

/// Fails when a started service has exited: a crash would otherwise show
/// only as the next step's errors.
fn check_alive(services: &mut [Service]) -> anyhow::Result<()> {
    for service in services {
        if let Some(status) = service.exited()? {
            show_log(service);
            bail!("{} exited ({status})", service.name());
        }
    }
    Ok(())
}

/// The last lines of a service's log, to say why it failed.
fn show_log(service: &Service) {
    eprintln!("---- last lines of {}\n{}\n----", service.log().display(), service.log_tail(30));
}

/// `wanted`, unless taken, else a free port.
fn port(wanted: Option<u16>, setting: &str) -> anyhow::Result<u16> {
    match wanted {
        None => free_port(),
        Some(port) if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() => Ok(port),
        Some(port) => bail!("port {port} is already taken; choose another with {setting}"),
    }
}

/// The database a URL names, checked to be a plain name (it is written into SQL).
fn database_name(url: &str) -> anyhow::Result<String> {
    let name = url.rsplit_once('/').map_or("", |(_, name)| name);
    let name = name.split('?').next().unwrap_or("");
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("unexpected database name '{name}' in {url}");
    }
    Ok(name.to_owned())
}

/// The same server's `postgres` database.
fn admin_url(url: &str) -> String {
    format!("{}/postgres", url.rsplit_once('/').map_or(url, |(server, _)| server))
}

/// The port of an AMQP URL (`amqp://user:pass@host:port/vhost`); 5672 when none.
fn amqp_port(url: &str) -> Option<u16> {
    let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = authority.split('/').next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    match host.rsplit_once(':') {
        Some((_, port)) => port.parse().ok(),
        None => Some(5672),
    }
}

async fn recreate(admin: &mut PgConnection, database: &str) -> anyhow::Result<()> {
    drop_database(admin, database).await?;
    sqlx::raw_sql(&format!("CREATE DATABASE \"{database}\""))
        .execute(admin)
        .await
        .with_context(|| format!("cannot create the database {database}"))?;
    Ok(())
}

async fn drop_database(admin: &mut PgConnection, database: &str) -> anyhow::Result<()> {
    sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"))
        .execute(admin)
        .await
        .with_context(|| format!("cannot drop the database {database}"))?;
    Ok(())
}

/// Deletes `queues` (those that exist) on the broker of `amqp_url`.
async fn delete_queues(amqp_url: &str, queues: &[&str]) -> anyhow::Result<()> {
    let connection =
        outbox::amqp::connect(amqp_url, "bench").await.context("cannot connect to RabbitMQ")?;
    let channel = connection.create_channel().await?;
    for queue in queues {
        channel.queue_delete((*queue).into(), QueueDeleteOptions::default()).await?;
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// pgbench on the PATH, else the newest of /usr/lib/postgresql/<version>/bin.
fn find_pgbench() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path).map(|dir| dir.join("pgbench")).find(|file| file.is_file())
    });
    on_path.or_else(|| {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let version = entry.file_name().to_str()?.parse().ok()?;
                Some((version, entry.path().join("bin/pgbench")))
            })
            .filter(|(_, file)| file.is_file())
            .collect();
        versions.sort();
        versions.pop().map(|(_, file)| file)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_name_a_plain_database() {
        let url = "postgres://postgres:postgres@127.0.0.1:5432/outbox_bench_e2e";
        assert_eq!(database_name(url).unwrap(), "outbox_bench_e2e");
        assert_eq!(database_name(&format!("{url}?sslmode=disable")).unwrap(), "outbox_bench_e2e");
        assert!(database_name("postgres://h/bad\"name").is_err());
        assert!(database_name("postgres://h/").is_err());
        assert_eq!(admin_url(url), "postgres://postgres:postgres@127.0.0.1:5432/postgres");
    }

    #[test]
    fn the_pipeline_ceiling_reaches_the_server_of_the_ceiling_url() {
        let env =
            libpq_env("postgres://bench:secret@db.internal:5433/outbox_bench_ceiling").unwrap();
        assert_eq!(
            env,
            [
                ("PGHOST", "db.internal".to_owned()),
                ("PGPORT", "5433".to_owned()),
                ("PGUSER", "bench".to_owned()),
                ("PGPASSWORD", "secret".to_owned()),
            ]
        );
        let local = libpq_env("postgres://postgres@127.0.0.1/x").unwrap();
        assert_eq!(local.len(), 3, "no password: {local:?}");
        assert!(libpq_env("mysql://x").is_err());
    }

    #[test]
    fn the_amqp_port() {
        assert_eq!(amqp_port("amqp://guest:guest@127.0.0.1:5672/%2f"), Some(5672));
        assert_eq!(amqp_port("amqp://guest:guest@localhost:5701/%2f"), Some(5701));
        assert_eq!(amqp_port("amqp://localhost/%2f"), Some(5672));
        assert_eq!(amqp_port("amqp://u:p@h:notaport/"), None);
    }

    #[test]
    fn a_taken_port_is_refused_and_none_gives_a_free_one() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port_taken = taken.local_addr().unwrap().port();
        assert!(port(Some(port_taken), "BENCH_API_PORT").is_err());
        assert!(port(None, "BENCH_API_PORT").unwrap() > 0);
    }

    #[tokio::test]
    async fn a_timed_run_counts_the_cpu_of_the_child_and_its_status() {
        let dir = std::env::temp_dir().join(format!("xtask-timed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut busy = tokio::process::Command::new("sh");
        // About 0.3 s of CPU in a grandchild the child reaps.
        busy.args(["-c", "timeout 0.3 sh -c 'while :; do :; done'; exit 3"]);
        let (status, ticks) = timed(busy, &dir.join("out"), &dir.join("err")).await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(status_code(status), 3);
        let tck = procfs::ticks_per_second() as i64;
        assert!(ticks >= tck / 10, "{ticks} ticks");
    }
}
