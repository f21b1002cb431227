//! `cargo xtask soak`: the whole system under a steady open-loop load for a
//! long while, one row a minute, then a verdict. It shows what a short
//! benchmark cannot: whether latency creeps up, whether the sweepers keep
//! processed_messages and idempotency_keys bounded, whether the outbox bloats,
//! whether memory leaks.
//!
//! Every minute the stress test places orders at the rate for 60 s (each with
//! an Idempotency-Key of its own) and waits until the consumer has decided
//! them; then the database and the services' RSS are sampled. The stress-test
//! crate's `soak-report` keeps the rows (`.run/soak/soak.csv`), prints each as
//! a table line, and at the end draws the chart and judges the run (its
//! `verdict --help` gives the rule): this module runs and samples, that binary
//! keeps and judges.
//!
//! The services keep messages and keys for short windows (DEDUP_WINDOW=2m
//! IDEMPOTENCY_KEY_TTL=2m SWEEP_INTERVAL=10s, each overridable from the
//! environment) so that the sweepers' work shows within a run.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::{Connection, PgConnection};
use tokio::time::Instant;

use crate::process::{Local, Service, bin_dir, command, free_port, until_signal};

const RUN_DIR: &str = ".run/soak";

/// The settings of `cargo xtask soak`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Minutes of load; each minute is one stress-test run.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    minutes: u32,
    /// Orders per second [default: half the closed-loop peak, measured by a
    /// 20 s run at the start].
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// The SVG chart.
    #[arg(long, default_value = ".run/soak/soak.svg")]
    chart: PathBuf,
    /// The database, dropped and created afresh on every run [default:
    /// postgres://postgres:postgres@$PG_HOST:$PG_PORT/outbox_soak].
    #[arg(long, env = "SOAK_DATABASE_URL")]
    database_url: Option<String>,
    /// The broker [default: amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f].
    #[arg(long, env = "SOAK_AMQP_URL")]
    amqp_url: Option<String>,
    /// order-service's port [default: a free one].
    #[arg(long, env = "SOAK_API_PORT")]
    api_port: Option<u16>,
    /// inventory-consumer's port [default: a free one].
    #[arg(long, env = "SOAK_CONSUMER_PORT")]
    consumer_port: Option<u16>,
    /// Most requests in flight during the load.
    #[arg(long, env = "SOAK_CONCURRENCY", default_value_t = 64)]
    concurrency: u32,
    /// Prefix of the exchange and queue names, which keeps the soak's messages
    /// away from any other order-service or consumer on the same broker.
    #[arg(long, env = "SOAK_PREFIX", default_value = "soak")]
    prefix: String,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("a positive number of orders per second, not '{text}'")),
    }
}

/// The rate of a soak at half the measured closed-loop peak: rounded, at
/// least 1.
fn half_of(peak: f64) -> f64 {
    (peak / 2.0 + 0.5).floor().max(1.0)
}

/// VmRSS in KiB from the text of `/proc/<pid>/status`.
fn vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|line| line.strip_prefix("VmRSS:"))?;
    line.split_whitespace().next()?.parse().ok()
}

fn rss_kib(pid: Option<u32>) -> Option<u64> {
    vm_rss_kib(&std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?)
}

/// `minute-007.json`: the stress-test report of a minute.
fn minute_report(run_dir: &Path, minute: u32) -> PathBuf {
    run_dir.join(format!("minute-{minute:03}.json"))
}

/// The database name of a Postgres URL (`…/outbox_soak?sslmode=…`), if it is
/// one a statement can name unquoted-safe.
fn database_of(url: &str) -> Option<(&str, &str)> {
    let (server, rest) = url.rsplit_once('/')?;
    let name = rest.split('?').next()?;
    let plain = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    plain.then_some((server, name))
}

/// The windows the services run with: `(name, value)`, from the environment
/// or the soak's short defaults.
fn windows() -> [(&'static str, String); 3] {
    [("DEDUP_WINDOW", "2m"), ("IDEMPOTENCY_KEY_TTL", "2m"), ("SWEEP_INTERVAL", "10s")]
        .map(|(name, default)| (name, std::env::var(name).unwrap_or(default.into())))
}

/// What a run started, stopped at its end however it ends.
#[derive(Default)]
struct Started {
    services: Vec<Service>,
    /// The CSV holds this run's rows from then on.
    rows: Option<PathBuf>,
}

impl Started {
    /// SIGTERM to each (a graceful stop finishes the in-flight batch), SIGKILL
    /// to those still running 15 s later.
    async fn stop(&mut self) {
        if self.services.is_empty() {
            return;
        }
        let names: Vec<&str> = self.services.iter().map(Service::name).collect();
        println!("== stopping {}", names.join(" "));
        for service in &mut self.services {
            let pid = service.pid();
            if !service.stop(Duration::from_secs(15)).await
                && let Some(pid) = pid
            {
                eprintln!("   {pid} did not stop within 15 s; killing it");
            }
        }
        let logs: Vec<String> =
            self.services.iter().map(|service| service.log().display().to_string()).collect();
        println!("   logs: {}", logs.join(" "));
        self.services.clear();
    }
}

pub async fn run(args: Args) -> anyhow::Result<bool> {
    let mut started = Started::default();
    let outcome = until_signal(soak(&args, &mut started)).await;
    started.stop().await;
    if let Some(csv) = &started.rows
        && std::fs::metadata(csv).is_ok_and(|file| file.len() > 0)
    {
        println!("   rows: {}", csv.display());
    }
    outcome
}

async fn soak(args: &Args, started: &mut Started) -> anyhow::Result<bool> {
    let local = Local::from_env();
    let run_dir = PathBuf::from(RUN_DIR);
    let database_url = args.database_url.clone().unwrap_or(local.database_url("outbox_soak"));
    let amqp_url = args.amqp_url.clone().unwrap_or(local.amqp_url());
    let bin_dir = bin_dir("release");
    let csv = run_dir.join("soak.csv");
    for (port, setting) in
        [(args.api_port, "SOAK_API_PORT"), (args.consumer_port, "SOAK_CONSUMER_PORT")]
    {
        if let Some(port) = port
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        {
            bail!("port {port} is already taken; choose another with {setting}");
        }
    }
    let api_port = args.api_port.map_or_else(free_port, Ok)?;
    let consumer_port = args.consumer_port.map_or_else(free_port, Ok)?;

    println!("== services");
    println!("   Postgres on {}, RabbitMQ on {}", local.pg, local.amqp);

    println!("== cargo build --release");
    crate::process::build_release(false).await?;

    println!("== fresh database");
    let Some((server, database)) = database_of(&database_url) else {
        bail!("unexpected database name in SOAK_DATABASE_URL '{database_url}'")
    };
    let mut admin = PgConnection::connect(&format!("{server}/postgres")).await?;
    sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .with_context(|| format!("cannot drop the database {database}"))?;
    drop(admin);
    println!("   dropped {database}; the services create and migrate it at start-up");
    let queue = format!("{}.inventory.order-placed", args.prefix);
    let dead_letter_queue = format!("{queue}.dead");
    // Messages an interrupted soak left behind would name orders that no
    // longer exist, and its queues may be of another type (QUEUE_TYPE): delete
    // the soak's queues where the broker is the local default node; the
    // services declare them afresh.
    if amqp_url.contains("@127.0.0.1:5672/") {
        for queue in [&queue, &dead_letter_queue] {
            let _ = command("rabbitmqctl", &["-q", "--timeout", "10", "delete_queue", queue]).await;
        }
    }

    let windows = windows();
    let shown: Vec<String> =
        windows.iter().map(|(name, value)| format!("{name}={value}")).collect();
    println!("== starting the services ({})", shown.join(" "));
    std::fs::create_dir_all(&run_dir)?;
    for file in std::fs::read_dir(&run_dir)? {
        let path = file?.path();
        let name = path.file_name().and_then(|name| name.to_str()).unwrap_or("");
        let ours = name == "soak.csv"
            || name.ends_with(".log")
            || ((name.starts_with("minute-") || name.starts_with("peak."))
                && (name.ends_with(".json") || name.ends_with(".err")));
        if ours {
            let _ = std::fs::remove_file(path);
        }
    }
    let mut env = vec![
        ("DATABASE_URL".to_owned(), database_url.clone()),
        ("AMQP_URL".to_owned(), amqp_url),
        ("EXCHANGE".to_owned(), format!("{}.orders", args.prefix)),
        ("INVENTORY_QUEUE".to_owned(), queue),
        ("DEAD_LETTER_EXCHANGE".to_owned(), format!("{}.orders.dlx", args.prefix)),
        ("DEAD_LETTER_QUEUE".to_owned(), dead_letter_queue),
        // Without the last part order-service logs every order: several
        // hundred MB over half an hour at a few hundred orders a second.
        (
            "RUST_LOG".to_owned(),
            std::env::var("RUST_LOG")
                .unwrap_or("info,sqlx::postgres::notice=warn,order_service::routes=warn".into()),
        ),
    ];
    env.extend(windows.iter().map(|(name, value)| ((*name).to_owned(), value.clone())));
    // The consumer starts second, so the two do not race to create the database.
    for (name, port) in [("order-service", api_port), ("inventory-consumer", consumer_port)] {
        let mut service = Service::new(name, &bin_dir, port, env.clone(), &run_dir);
        service.start_announced()?;
        let ready = service.wait_ready(Duration::from_secs(60)).await;
        if ready.is_err() {
            show_log(&service);
        }
        started.services.push(service);
        ready?;
        println!("   {name} is ready");
    }
    let api_url = started.services[0].url.clone();
    let stress = Stress { binary: bin_dir.join("stress-test"), api_url, database_url };

    let rate = match args.rate {
        Some(rate) => rate,
        None => {
            println!("== measuring the peak: closed loop, 32 in flight, 20 s");
            let report = run_dir.join("peak.json");
            let status = stress.run(&report, &["--concurrency", "32", "--duration", "20s"]).await?;
            if !status.success() {
                let err = std::fs::read_to_string(report.with_extension("err")).unwrap_or_default();
                bail!("the peak run failed: {}", err.trim_end());
            }
            let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
            let Some(peak) = report["throughput_rps"].as_f64() else {
                bail!("no throughput_rps in {}", run_dir.join("peak.json").display())
            };
            let rate = half_of(peak);
            println!("   peak {peak:.0} orders/s; the soak runs at half: {rate} orders/s");
            rate
        }
    };

    let mut db = PgConnection::connect(&stress.database_url).await?;
    // The outbox is a queue: the relay deletes every row it publishes, and only
    // vacuum reclaims them. A server without autovacuum (some CI setups turn it
    // off) shows its dead tuples growing however well the services behave.
    let autovacuum: Option<String> =
        sqlx::query_scalar("SHOW autovacuum").fetch_one(&mut db).await.ok();
    if autovacuum.as_deref() == Some("off") {
        eprintln!(
            "   warning: autovacuum is off on this Postgres server: the outbox's dead tuples will only grow"
        );
    }

    println!(
        "== soak: {} minutes at {rate} orders/s, at most {} in flight; a row a minute",
        args.minutes, args.concurrency
    );
    let soak_started = Instant::now();
    started.rows = Some(csv.clone());
    let (rate_arg, concurrency) = (rate.to_string(), args.concurrency.to_string());
    for minute in 1..=args.minutes {
        let report = minute_report(&run_dir, minute);
        // A minute with failed requests or orders left undecided is recorded,
        // not fatal: the verdict counts it, and the next minutes show whether
        // it lasts.
        stress
            .run(
                &report,
                &["--rate", &rate_arg, "--duration", "60s", "--concurrency", &concurrency],
            )
            .await?;
        for service in &mut started.services {
            if let Some(status) = service.exited()? {
                show_log(service);
                bail!("{} exited ({status})", service.name());
            }
        }
        let sample = Sample::take(&mut db).await?;
        let mut row = tokio::process::Command::new(bin_dir.join("soak-report"));
        row.arg("row").arg("--csv").arg(&csv).arg("--report").arg(&report);
        row.args(["--minute", &minute.to_string()]);
        row.args(["--elapsed-seconds", &soak_started.elapsed().as_secs().to_string()]);
        row.args(sample.arguments());
        for (flag, service) in ["--order-service-rss-kib", "--inventory-consumer-rss-kib"]
            .iter()
            .zip(&started.services)
        {
            if let Some(rss) = rss_kib(service.pid()) {
                row.args([*flag, &rss.to_string()]);
            }
        }
        let status = row.status().await.context("cannot run soak-report")?;
        if !status.success() {
            bail!("soak-report row failed ({status})");
        }
    }

    println!("== verdict");
    let title = title(args.minutes, rate, &windows);
    let status = tokio::process::Command::new(bin_dir.join("soak-report"))
        .arg("verdict")
        .arg("--csv")
        .arg(&csv)
        .arg("--chart")
        .arg(&args.chart)
        .args(["--title", &title])
        .status()
        .await
        .context("cannot run soak-report")?;
    match status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => bail!("soak-report verdict could not judge the run ({status})"),
    }
}

fn title(minutes: u32, rate: f64, windows: &[(&str, String)]) -> String {
    let windows: Vec<String> =
        windows.iter().map(|(name, value)| format!("{name} {value}")).collect();
    format!("soak: {minutes} min at {rate} orders/s ({})", windows.join(", "))
}

/// The last lines of a service's log, on stderr: why it failed.
fn show_log(service: &Service) {
    eprintln!("---- last lines of {}", service.log().display());
    eprintln!("{}", service.log_tail(30));
    eprintln!("----");
}

/// One stress-test run against the soak's order-service.
struct Stress {
    binary: PathBuf,
    api_url: String,
    database_url: String,
}

impl Stress {
    /// Runs it with `args`, its `--json` report to `report` and its stderr
    /// (the error samples, the reason it could not start) next to it. Its
    /// exit status, unless it could not run at all (status 2, or no report):
    /// then an error, its stderr printed.
    async fn run(&self, report: &Path, args: &[&str]) -> anyhow::Result<ExitStatus> {
        let err = report.with_extension("err");
        let status = tokio::process::Command::new(&self.binary)
            .args(["--url", &self.api_url, "--database-url", &self.database_url])
            .args(["--idempotency-keys", "--json"])
            .args(args)
            .stdout(std::fs::File::create(report)?)
            .stderr(std::fs::File::create(&err)?)
            .kill_on_drop(true)
            .status()
            .await
            .context("cannot start the stress test")?;
        if status.code() == Some(2) || std::fs::metadata(report).map_or(true, |f| f.len() == 0) {
            eprint!("{}", std::fs::read_to_string(&err).unwrap_or_default());
            bail!("stress-test could not run ({status}); see above");
        }
        Ok(status)
    }
}

/// The counts of one moment, from one query (n_dead_tup comes from the
/// statistics, which lag the table by a second or so).
#[derive(Debug, sqlx::FromRow)]
struct Sample {
    pending: i64,
    dead_tuples: i64,
    orders: i64,
    processed: i64,
    keys: i64,
    outbox_rows: i64,
}

impl Sample {
    async fn take(db: &mut PgConnection) -> anyhow::Result<Self> {
        sqlx::query_as(
            "SELECT
                (SELECT count(*) FROM outbox WHERE state = 'pending') AS pending,
                (SELECT coalesce(sum(n_dead_tup), 0)::bigint FROM pg_stat_user_tables
                  WHERE relname = 'outbox') AS dead_tuples,
                (SELECT count(*) FROM orders) AS orders,
                (SELECT count(*) FROM processed_messages) AS processed,
                (SELECT count(*) FROM idempotency_keys) AS keys,
                (SELECT count(*) FROM outbox) AS outbox_rows",
        )
        .fetch_one(db)
        .await
        .context("cannot sample the database")
    }

    /// The flags of `soak-report row` for it.
    fn arguments(&self) -> Vec<String> {
        [
            ("--outbox-pending", self.pending),
            ("--outbox-dead-tuples", self.dead_tuples),
            ("--orders", self.orders),
            ("--processed-messages", self.processed),
            ("--idempotency-keys", self.keys),
            ("--outbox-rows", self.outbox_rows),
        ]
        .iter()
        .flat_map(|(flag, count)| [(*flag).to_owned(), count.max(&0).to_string()])
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn the_flags_of_the_script_parse_and_bad_values_do_not() {
        let cli = Cli::try_parse_from(["soak", "--minutes", "3", "--rate", "100"]).unwrap();
        assert_eq!((cli.args.minutes, cli.args.rate), (3, Some(100.0)));
        let cli = Cli::try_parse_from(["soak", "--minutes=2", "--chart=docs/soak.svg"]).unwrap();
        assert_eq!(cli.args.chart, PathBuf::from("docs/soak.svg"));
        assert_eq!(Cli::try_parse_from(["soak"]).unwrap().args.minutes, 30);
        for bad in [["--minutes", "0"], ["--minutes", "1.5"], ["--rate", "0"], ["--rate", "-3"]] {
            assert!(Cli::try_parse_from(["soak", bad[0], bad[1]]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_soak_runs_at_half_the_peak_rounded_and_never_below_one() {
        assert_eq!(half_of(683.4), 342.0);
        assert_eq!(half_of(682.9), 341.0);
        assert_eq!(half_of(0.4), 1.0);
        assert_eq!(half_of(300.0).to_string(), "150"); // printed as the script did
    }

    #[test]
    fn one_report_a_minute_named_in_order() {
        assert_eq!(
            minute_report(Path::new(".run/soak"), 7),
            Path::new(".run/soak/minute-007.json")
        );
        assert_eq!(minute_report(Path::new("d"), 120), Path::new("d/minute-120.json"));
    }

    #[test]
    fn rss_is_read_from_proc_status() {
        let status =
            "Name:\torder-service\nVmPeak:\t  40000 kB\nVmRSS:\t   29696 kB\nThreads:\t9\n";
        assert_eq!(vm_rss_kib(status), Some(29696));
        assert_eq!(vm_rss_kib("Name:\tkthreadd\n"), None);
        assert!(rss_kib(Some(std::process::id())).is_some_and(|kib| kib > 0));
    }

    #[test]
    fn the_database_of_the_url_is_dropped_only_if_plainly_named() {
        assert_eq!(
            database_of("postgres://u:p@h:5432/outbox_soak"),
            Some(("postgres://u:p@h:5432", "outbox_soak"))
        );
        assert_eq!(
            database_of("postgres://h/soak?sslmode=disable"),
            Some(("postgres://h", "soak"))
        );
        assert_eq!(database_of("postgres://h/a\"b"), None);
        assert_eq!(database_of("postgres://h/"), None);
    }

    #[test]
    fn the_title_names_the_rate_and_the_windows() {
        let windows = [("DEDUP_WINDOW", "2m".to_owned()), ("SWEEP_INTERVAL", "10s".to_owned())];
        assert_eq!(
            title(3, 100.0, &windows),
            "soak: 3 min at 100 orders/s (DEDUP_WINDOW 2m, SWEEP_INTERVAL 10s)"
        );
    }

    #[test]
    fn a_sample_becomes_the_flags_of_a_row() {
        let sample =
            Sample { pending: 0, dead_tuples: 5, orders: 6, processed: 4, keys: 3, outbox_rows: 1 };
        assert_eq!(
            sample.arguments().join(" "),
            "--outbox-pending 0 --outbox-dead-tuples 5 --orders 6 --processed-messages 4 \
             --idempotency-keys 3 --outbox-rows 1"
        );
    }
}
