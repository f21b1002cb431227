//! `cargo xtask demo`: the whole system in one command. Builds the release
//! binaries, starts order-service and inventory-consumer on a database and
//! broker names of their own, places one order and follows it to COMPLETED,
//! cancels it and follows it to CANCELLED with its stock back,
//! runs the stress test, and shows the orders by status, the outbox backlog
//! and the services' peak memory. Fails (exit status 1) when any step does;
//! the services are stopped in every case, also on Ctrl-C.
//!
//! Its settings are its own flags, `--demo-*`, or their `DEMO_*` variables;
//! every other argument goes to stress-test (`--rate 400 --duration 30s`).
//!
//! With `--transport kafka` the relay and the consumer use Kafka instead
//! of RabbitMQ: the broker of KAFKA_BROKERS, else the one
//! `scripts/kafka-broker.sh start` starts (in memory), on topics of the run's
//! own (`demo.<time>.order`).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use lapin::options::QueueDeleteOptions;
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};

use crate::process::{Local, Service, Transport, bin_dir, until_signal};

/// The settings of `cargo xtask demo` (scripts/demo.sh).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The demo's database, dropped and created afresh on every run, so the
    /// counts are this run's [default:
    /// postgres://postgres:postgres@$PG_HOST:$PG_PORT/outbox_demo].
    #[arg(long, env = "DEMO_DATABASE_URL")]
    demo_database_url: Option<String>,
    /// The broker [default: amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f].
    #[arg(long, env = "DEMO_AMQP_URL")]
    demo_amqp_url: Option<String>,
    /// Where order-service listens (127.0.0.1).
    #[arg(long, env = "DEMO_API_PORT", default_value_t = 18080)]
    demo_api_port: u16,
    /// Where inventory-consumer listens (127.0.0.1).
    #[arg(long, env = "DEMO_CONSUMER_PORT", default_value_t = 18081)]
    demo_consumer_port: u16,
    /// Orders the stress test places.
    #[arg(long, env = "DEMO_ORDERS", default_value_t = 3000)]
    demo_orders: u64,
    /// Requests the stress test keeps in flight.
    #[arg(long, env = "DEMO_CONCURRENCY", default_value_t = 32)]
    demo_concurrency: u32,
    /// Prefix of the exchange and queue names, apart from those of a stack
    /// running on the default names.
    #[arg(long, env = "DEMO_PREFIX", default_value = "demo")]
    demo_prefix: String,
    /// The broker between the two services: RabbitMQ, or Kafka (the broker of
    /// KAFKA_BROKERS, else one started by scripts/kafka-broker.sh).
    #[arg(long = "transport", env = "DEMO_TRANSPORT", value_enum,
          default_value_t = Transport::Rabbitmq)]
    demo_transport: Transport,
    /// Passed on to stress-test, after --url, --database-url, --orders and
    /// --concurrency.
    #[arg(value_name = "STRESS_TEST_ARGS", trailing_var_arg = true, allow_hyphen_values = true)]
    stress_test: Vec<String>,
}

/// What the steps use, resolved from [`Args`].
struct Demo {
    database: PgConnectOptions,
    database_url: String,
    database_name: String,
    amqp_url: String,
    api_port: u16,
    consumer_port: u16,
    orders: u64,
    concurrency: u32,
    inventory_queue: String,
    dead_letter_queue: String,
    transport: Transport,
    /// The environment of both services (and of stress-test, as before).
    env: Vec<(String, String)>,
    stress_test: Vec<String>,
    local: Local,
    bin_dir: PathBuf,
    run_dir: PathBuf,
}

impl Demo {
    fn new(args: Args, local: Local, kafka_brokers: Option<String>) -> anyhow::Result<Self> {
        let database_url =
            args.demo_database_url.unwrap_or_else(|| local.database_url("outbox_demo"));
        let database = PgConnectOptions::from_str(&database_url)
            .context("DEMO_DATABASE_URL is not a Postgres URL")?;
        let database_name = database_name(&database)?;
        let amqp_url = args.demo_amqp_url.unwrap_or_else(|| local.amqp_url());
        let prefix = args.demo_prefix;
        let inventory_queue = format!("{prefix}.inventory.order-placed");
        let dead_letter_queue = format!("{prefix}.inventory.order-placed.dead");
        // The broker names keep the demo's messages away from any other
        // order-service or consumer on the same broker.
        let mut env = vec![
            ("DATABASE_URL".to_owned(), database_url.clone()),
            ("AMQP_URL".to_owned(), amqp_url.clone()),
            ("EXCHANGE".to_owned(), format!("{prefix}.orders")),
            ("INVENTORY_QUEUE".to_owned(), inventory_queue.clone()),
            ("DEAD_LETTER_EXCHANGE".to_owned(), format!("{prefix}.orders.dlx")),
            ("DEAD_LETTER_QUEUE".to_owned(), dead_letter_queue.clone()),
            (
                "RUST_LOG".to_owned(),
                std::env::var("RUST_LOG").unwrap_or("info,sqlx::postgres::notice=warn".into()),
            ),
        ];
        if let Some(brokers) = kafka_brokers {
            // Topics of this run's own: the database is new, so events of an
            // earlier run would name orders that do not exist.
            env.extend(crate::kafka::service_env(&brokers, &crate::kafka::run_prefix(&prefix)));
        }
        Ok(Self {
            database,
            database_url,
            database_name,
            amqp_url,
            api_port: args.demo_api_port,
            consumer_port: args.demo_consumer_port,
            orders: args.demo_orders,
            concurrency: args.demo_concurrency,
            inventory_queue,
            dead_letter_queue,
            transport: args.demo_transport,
            env,
            stress_test: args.stress_test,
            local,
            bin_dir: bin_dir("release"),
            run_dir: PathBuf::from(".run"),
        })
    }

    /// order-service or inventory-consumer, logging to `.run/demo-<name>.log`
    /// afresh.
    fn service(&self, name: &'static str, port: u16) -> Service {
        let log = self.run_dir.join(format!("demo-{name}.log"));
        let _ = std::fs::remove_file(&log);
        Service::new(name, &self.bin_dir, port, self.env.clone(), &self.run_dir).logging_to(log)
    }

    /// The value of a setting the services get.
    fn setting(&self, name: &str) -> &str {
        self.env.iter().find(|(key, _)| key == name).map_or("", |(_, value)| value)
    }

    async fn connect(&self) -> anyhow::Result<PgConnection> {
        self.database
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", self.database_url))
    }
}

/// The database a URL names, which the demo drops: a plain identifier.
fn database_name(options: &PgConnectOptions) -> anyhow::Result<String> {
    let name = options.get_database().unwrap_or_default();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("unexpected database name '{name}' in DEMO_DATABASE_URL");
    }
    Ok(name.to_owned())
}

pub async fn run(args: Args) -> anyhow::Result<bool> {
    let kafka_brokers = match args.demo_transport {
        Transport::Rabbitmq => None,
        Transport::Kafka => Some(crate::kafka::brokers().await?),
    };
    let demo = Demo::new(args, Local::from_env(), kafka_brokers)?;
    // The services started so far, stopped at the end whatever happened.
    let mut started = Vec::new();
    let outcome = until_signal(steps(&demo, &mut started)).await;
    if let Err(error) = &outcome {
        eprintln!("error: {error:#}");
    }
    stop(&mut started).await;
    Ok(outcome.is_ok())
}

async fn steps(demo: &Demo, started: &mut Vec<Service>) -> anyhow::Result<()> {
    for port in [demo.api_port, demo.consumer_port] {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            bail!(
                "port {port} is already taken; choose others with DEMO_API_PORT / DEMO_CONSUMER_PORT"
            );
        }
    }

    println!("== services");
    let needed: &[(&str, &String)] = match demo.transport {
        Transport::Rabbitmq => &[("Postgres", &demo.local.pg), ("RabbitMQ", &demo.local.amqp)],
        Transport::Kafka => &[("Postgres", &demo.local.pg)],
    };
    for (name, address) in needed {
        if tokio::net::TcpStream::connect(address.as_str()).await.is_err() {
            bail!("{name} is not reachable on {address} (scripts/demo.sh starts it)");
        }
    }
    println!("   Postgres on {}, RabbitMQ on {}", demo.local.pg, demo.local.amqp);
    if demo.transport == Transport::Kafka {
        let (brokers, prefix) = (demo.setting("KAFKA_BROKERS"), demo.setting("KAFKA_TOPIC_PREFIX"));
        println!("   on Kafka: brokers {brokers}, topics {prefix}order and {prefix}order.dlq");
    }

    println!("== cargo build --release");
    crate::process::build_release(false).await?;

    println!("== fresh database");
    let mut admin = demo.database.clone().database("postgres").connect().await?;
    let statement = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", demo.database_name);
    sqlx::raw_sql(&statement)
        .execute(&mut admin)
        .await
        .context("cannot drop the demo's database")?;
    drop_connection(admin).await;
    println!("   dropped {}; the services create and migrate it at start-up", demo.database_name);
    // Messages a previous, interrupted demo left behind would name orders that
    // no longer exist, and its queues may be of another type (QUEUE_TYPE):
    // delete them; the services declare them afresh.
    let _ = delete_queues(&demo.amqp_url, &[&demo.inventory_queue, &demo.dead_letter_queue]).await;

    println!("== starting the services");
    std::fs::create_dir_all(&demo.run_dir)?;
    // The consumer starts second, so the two do not race to create the database.
    for (name, port) in
        [("order-service", demo.api_port), ("inventory-consumer", demo.consumer_port)]
    {
        let mut service = demo.service(name, port);
        service.start_announced()?;
        let ready = service.wait_ready(Duration::from_secs(60)).await;
        started.push(service);
        if let Err(error) = ready {
            show_log(&started[started.len() - 1]);
            return Err(error);
        }
        println!("   {name} is ready");
    }
    let api_url = started[0].url.clone();

    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    println!("== one order: POST {api_url}/orders");
    let response = client
        .post(format!("{api_url}/orders"))
        .json(&serde_json::json!({
            "customer_id": "demo",
            "items": [{ "sku": "SKU-001", "quantity": 2 }],
        }))
        .send()
        .await?;
    let code = response.status().as_u16();
    let body = response.text().await?;
    println!("   HTTP {code}");
    println!("{}", pretty(&body));
    if code != 201 {
        bail!("POST /orders answered {code}, expected 201");
    }
    let order: Value = serde_json::from_str(&body).unwrap_or_default();
    let Some(order_id) = order["id"].as_str() else { bail!("no order id in the response") };

    println!("== following GET /orders/{order_id} until the consumer has applied it");
    let (polls, status, body) = follow(&client, &api_url, order_id, "PENDING").await?;
    println!("   status {status} after {} s", fifths(polls));
    println!("{}", pretty(&body));
    if status != "COMPLETED" {
        show_log(&started[1]);
        bail!("the order is {status}, expected COMPLETED within 10 s");
    }

    let mut db = demo.connect().await?;
    let stock = async |db: &mut PgConnection| -> anyhow::Result<i32> {
        let available = sqlx::query_scalar("SELECT available FROM inventory WHERE sku = 'SKU-001'")
            .fetch_one(db)
            .await?;
        Ok(available)
    };
    let taken = stock(&mut db).await?;
    println!("== cancelling it: POST {api_url}/orders/{order_id}/cancel");
    let response = client.post(format!("{api_url}/orders/{order_id}/cancel")).send().await?;
    let code = response.status().as_u16();
    println!("   HTTP {code}");
    if code != 202 {
        bail!("POST /orders/{{id}}/cancel answered {code}, expected 202");
    }
    let (polls, status, body) = follow(&client, &api_url, order_id, "COMPLETED").await?;
    println!("   status {status} after {} s", fifths(polls));
    println!("{}", pretty(&body));
    if status != "CANCELLED" {
        show_log(&started[1]);
        bail!("the order is {status}, expected CANCELLED within 10 s");
    }
    let back = stock(&mut db).await?;
    println!("   SKU-001 available: {taken} while the order held 2, {back} after its cancel");
    if back != taken + 2 {
        bail!("the cancel gave back {} units of SKU-001, expected 2", back - taken);
    }

    println!("== stress test: {} orders, {} in flight", demo.orders, demo.concurrency);
    let stress = tokio::process::Command::new(demo.bin_dir.join("stress-test"))
        .args(["--url", &api_url, "--database-url", &demo.database_url])
        .args(["--orders", &demo.orders.to_string()])
        .args(["--concurrency", &demo.concurrency.to_string()])
        .args(&demo.stress_test)
        .envs(demo.env.iter().map(|(name, value)| (name, value)))
        .kill_on_drop(true)
        .status()
        .await
        .context("cannot run stress-test")?;

    println!("== waiting for the outbox to drain and every order to be decided");
    let mut remaining = 0;
    for _ in 0..120 {
        remaining = sqlx::query_scalar::<_, i64>(
            "SELECT (SELECT count(*) FROM orders WHERE status = 'PENDING')
                  + (SELECT count(*) FROM outbox WHERE state = 'pending')",
        )
        .fetch_one(&mut db)
        .await?;
        if remaining == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    println!("== orders by status");
    let rows = sqlx::query_as::<_, (String, i64)>(
        "SELECT status::text, count(*) FROM orders GROUP BY status ORDER BY status",
    )
    .fetch_all(&mut db)
    .await?;
    print!("{}", table(["status", "count"], &rows));
    println!("== outbox backlog (no rows: every event was published)");
    let rows = sqlx::query_as::<_, (String, i64)>(
        "SELECT state::text, count(*) FROM outbox GROUP BY state ORDER BY state",
    )
    .fetch_all(&mut db)
    .await?;
    print!("{}", table(["state", "count"], &rows));

    println!("== peak memory (VmHWM)");
    for service in started.iter() {
        let peak = service
            .pid()
            .and_then(|pid| procfs::process::Process::new(i32::try_from(pid).ok()?).ok())
            .and_then(|process| process.status().ok()?.vmhwm);
        let peak = peak.map_or("unknown (no /proc)".to_owned(), mib);
        println!("   {:<20} {peak}", service.name());
    }

    if !stress.success() {
        let status = stress.code().map_or(stress.to_string(), |code| code.to_string());
        bail!("stress-test failed (status {status})");
    }
    if remaining != 0 {
        started.iter().for_each(show_log);
        bail!("{remaining} orders or events are still pending 30 s after the stress test");
    }
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE state = 'dead'")
        .fetch_one(&mut db)
        .await?;
    drop_connection(db).await;
    if dead != 0 {
        bail!("{dead} events are dead in the outbox (order-service outbox dead lists them)");
    }
    println!("== demo passed");
    Ok(())
}

/// Polls `GET /orders/{id}` (every 200 ms, for up to 10 s) while the order's
/// status is `while_status`; the polls made, the last status and body.
async fn follow(
    client: &reqwest::Client,
    api_url: &str,
    order_id: &str,
    while_status: &str,
) -> anyhow::Result<(u32, String, String)> {
    let (mut polls, mut status, mut body) = (0, String::new(), String::new());
    while polls < 50 {
        body = client
            .get(format!("{api_url}/orders/{order_id}"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let order: Value = serde_json::from_str(&body).unwrap_or_default();
        status = order["status"].as_str().unwrap_or_default().to_owned();
        if status != while_status {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        polls += 1;
    }
    Ok((polls, status, body))
}

async fn drop_connection(connection: PgConnection) {
    let _ = sqlx::Connection::close(connection).await;
}

/// SIGTERM to each started service, SIGKILL to one still running 15 s later
/// (a graceful stop finishes the in-flight batch).
async fn stop(started: &mut [Service]) {
    if started.is_empty() {
        return;
    }
    let names: Vec<&str> = started.iter().map(Service::name).collect();
    println!("== stopping {}", names.join(" "));
    for service in started.iter_mut() {
        let pid = service.pid().unwrap_or_default();
        if !service.stop(Duration::from_secs(15)).await {
            eprintln!("   {pid} did not stop within 15 s; killed it");
        }
    }
    let logs: Vec<String> = started.iter().map(|s| s.log().display().to_string()).collect();
    println!("   logs: {}", logs.join(" "));
}

/// The last lines of a service's log, on stderr.
fn show_log(service: &Service) {
    eprintln!("---- last lines of {}", service.log().display());
    eprintln!("{}", service.log_tail(30));
    eprintln!("----");
}

async fn delete_queues(amqp_url: &str, queues: &[&str]) -> anyhow::Result<()> {
    let connection = outbox::amqp::connect(amqp_url, "demo").await?;
    let channel = connection.create_channel().await?;
    for queue in queues {
        channel.queue_delete((*queue).into(), QueueDeleteOptions::default()).await?;
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// A JSON body indented by four spaces, its keys in their order (as
/// `python3 -m json.tool` showed it); the body as it is if it is not JSON.
fn pretty(body: &str) -> String {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    let mut deserializer = serde_json::Deserializer::from_str(body);
    match serde_transcode::transcode(&mut deserializer, &mut serializer)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(deserializer.end()?))
    {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        Err(_) => body.to_owned(),
    }
}

/// `polls` fifths of a second, in seconds, as awk prints them (`0`, `0.4`, `2`).
fn fifths(polls: u32) -> String {
    let tenths = polls * 2;
    match tenths % 10 {
        0 => (tenths / 10).to_string(),
        fraction => format!("{}.{fraction}", tenths / 10),
    }
}

/// KiB as MiB, one decimal.
fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// A (text, count) result as psql prints it: headers centred, text left and
/// counts right, then the row count and an empty line.
fn table(headers: [&str; 2], rows: &[(String, i64)]) -> String {
    let counts: Vec<String> = rows.iter().map(|(_, count)| count.to_string()).collect();
    let width =
        |header: &str, cells: &mut dyn Iterator<Item = usize>| cells.fold(header.len(), usize::max);
    let w0 = width(headers[0], &mut rows.iter().map(|(text, _)| text.len()));
    let w1 = width(headers[1], &mut counts.iter().map(String::len));
    let centre = |text: &str, width: usize| {
        let left = (width - text.len()) / 2;
        format!("{}{text}{}", " ".repeat(left), " ".repeat(width - text.len() - left))
    };
    let mut out = format!(" {} | {} \n", centre(headers[0], w0), centre(headers[1], w1));
    out += &format!("{}+{}\n", "-".repeat(w0 + 2), "-".repeat(w1 + 2));
    for ((text, _), count) in rows.iter().zip(&counts) {
        out += &format!(" {text:<w0$} | {count:>w1$}\n");
    }
    let plural = if rows.len() == 1 { "" } else { "s" };
    out += &format!("({} row{plural})\n\n", rows.len());
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(args: &[&str]) -> Args {
        Cli::try_parse_from(std::iter::once("demo").chain(args.iter().copied())).unwrap().args
    }

    #[test]
    fn the_demos_flags_are_its_own_and_the_rest_goes_to_the_stress_test() {
        let args = parse(&["--demo-orders", "12000", "--rate", "400", "--duration", "30s"]);
        assert_eq!(args.demo_orders, 12000);
        assert_eq!(args.stress_test, ["--rate", "400", "--duration", "30s"]);
        let args = parse(&[]);
        assert_eq!((args.demo_api_port, args.demo_consumer_port), (18080, 18081));
        assert_eq!((args.demo_orders, args.demo_concurrency), (3000, 32));
        assert!(args.stress_test.is_empty());
    }

    #[test]
    fn the_database_to_drop_is_the_urls_and_a_plain_name() {
        let name = |url: &str| database_name(&PgConnectOptions::from_str(url).unwrap());
        assert_eq!(name("postgres://u:p@127.0.0.1:5432/outbox_demo").unwrap(), "outbox_demo");
        assert_eq!(name("postgres://u@h/outbox_demo?sslmode=disable").unwrap(), "outbox_demo");
        assert!(name("postgres://u@h/a%22b").is_err());
    }

    #[test]
    fn bodies_are_indented_by_four_with_their_keys_in_order() {
        let body = r#"{"id":"x","status":"PENDING","items":[{"sku":"S","quantity":2}],"e":[]}"#;
        assert_eq!(
            pretty(body),
            "{\n    \"id\": \"x\",\n    \"status\": \"PENDING\",\n    \"items\": [\n        {\n            \
             \"sku\": \"S\",\n            \"quantity\": 2\n        }\n    ],\n    \"e\": []\n}"
        );
        assert_eq!(pretty("not json"), "not json");
        assert_eq!(pretty("{} trailing"), "{} trailing");
    }

    #[test]
    fn seconds_print_as_awk_printed_them() {
        assert_eq!([0, 1, 3, 5, 7, 50].map(fifths), ["0", "0.2", "0.6", "1", "1.4", "10"]);
        assert_eq!(mib(31437), "30.7 MiB");
    }

    #[test]
    fn tables_print_as_psql_printed_them() {
        let rows = [("COMPLETED".to_owned(), 2973), ("REJECTED".to_owned(), 28)];
        assert_eq!(
            table(["status", "count"], &rows),
            "  status   | count \n-----------+-------\n COMPLETED |  2973\n REJECTED  |    28\n\
             (2 rows)\n\n"
        );
        assert_eq!(
            table(["state", "count"], &[]),
            " state | count \n-------+-------\n(0 rows)\n\n"
        );
        assert_eq!(
            table(["state", "count"], &[("x".to_owned(), 1234567)]),
            " state |  count  \n-------+---------\n x     | 1234567\n(1 row)\n\n"
        );
    }
}
