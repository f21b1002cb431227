//! `cargo xtask cluster-proof`: nothing is lost or doubled on a RabbitMQ
//! cluster while nodes and processes die. On the 3-node cluster of
//! scripts/rabbitmq-cluster.sh (run as a subprocess: it stays shell), two
//! order-service and two inventory-consumer processes take an open-loop load
//! through both APIs (with Idempotency-Key retries). Mid-load
//! ([`Schedule::cluster_proof`]) the node leading the inventory quorum queue is
//! SIGKILLed (and later brought back), and one order-service and one consumer
//! are SIGKILLed and restarted. Afterwards: every accepted order exists and is
//! decided, none was applied twice, stock is conserved per SKU, the outbox is
//! drained with no dead event, the dead-letter queue is empty. Prints the
//! figures and a PASS or FAIL line per check; fails if any check fails.
//!
//! The cluster is stopped at the end (unless `--keep`), also when the run
//! fails or is interrupted: a guard stops it when dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::{Connection, PgConnection};
use tokio::time::Instant;

use crate::faults::{Fault, Schedule};
use crate::process::{Local, Service, bin_dir, command, free_port, until_signal};
use crate::verdict::Verdict;

const CLUSTER_SCRIPT: &str = "scripts/rabbitmq-cluster.sh";
const DATABASE: &str = "outbox_cluster_proof";
const EXCHANGE: &str = "proof.orders";
const QUEUE: &str = "proof.inventory.order-placed";
const DEAD_LETTER_EXCHANGE: &str = "proof.orders.dlx";
const DEAD_LETTER_QUEUE: &str = "proof.inventory.order-placed.dead";
/// The node every rabbitmqctl call of the proof asks (the default node on
/// 5672 is never touched).
const NODE_A: &str = "outbox-a@localhost";

/// The settings of `cargo xtask cluster-proof`, each also from the
/// environment as scripts/cluster-proof.sh always read them.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Orders per second through EACH API.
    #[arg(long, env = "PROOF_RATE", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..))]
    rate: u64,
    /// Seconds of load.
    #[arg(long, env = "PROOF_SECONDS", default_value_t = 45,
          value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    /// Cargo profile of the binaries.
    #[arg(long, env = "PROOF_PROFILE", default_value = "release",
          value_parser = ["release", "debug"])]
    profile: String,
    /// Leave the cluster running afterwards (PROOF_KEEP=1).
    #[arg(long, env = "PROOF_KEEP")]
    keep: bool,
}

pub async fn run(args: Args) -> anyhow::Result<bool> {
    let run_dir = PathBuf::from(".run/cluster-proof");
    std::fs::create_dir_all(&run_dir)?;
    // Stopped after `prove` ends, however it ends (a signal drops it half-way).
    let mut services = Vec::new();
    let mut loads = Vec::new();
    let mut cluster = None;
    let outcome =
        until_signal(prove(&args, &run_dir, &mut cluster, &mut services, &mut loads)).await;
    for load in &mut loads {
        let _ = load.start_kill();
    }
    for service in &mut services {
        service.stop(Duration::from_secs(15)).await;
    }
    drop(cluster);
    outcome
}

/// The cluster of scripts/rabbitmq-cluster.sh; stopped (and its data removed)
/// when dropped, unless kept.
struct Cluster {
    keep: bool,
}

impl Cluster {
    /// Starts whichever node is not running and clusters them; the AMQP_URL of
    /// the three nodes.
    async fn start() -> anyhow::Result<String> {
        let (status, stdout) = Self::script(&["start"]).await?;
        match amqp_url_of(&stdout) {
            Some(url) if status.success() => Ok(url.to_owned()),
            _ => bail!("the cluster did not start: {}", stdout.lines().last().unwrap_or("")),
        }
    }

    /// The node leading quorum queue `queue`, as `outbox-a@localhost`.
    async fn leader(queue: &str) -> anyhow::Result<String> {
        Ok(Self::script(&["leader", queue]).await?.1.trim().to_owned())
    }

    /// SIGKILLs node `node` (`a`, `b` or `c`).
    async fn kill(node: char) -> anyhow::Result<()> {
        let (status, _) = Self::script(&["kill", &node.to_string()]).await?;
        if !status.success() {
            bail!("{CLUSTER_SCRIPT} kill {node} failed ({status})");
        }
        Ok(())
    }

    /// Runs the script with `args`, its stderr (what it is doing) passed
    /// through; its status and stdout.
    async fn script(args: &[&str]) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let child = tokio::process::Command::new(CLUSTER_SCRIPT)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {CLUSTER_SCRIPT}"))?;
        let output = child.wait_with_output().await?;
        Ok((output.status, String::from_utf8_lossy(&output.stdout).into_owned()))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::process::Command::new(CLUSTER_SCRIPT)
                .arg("stop")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The URL in the last line `rabbitmq-cluster.sh start` prints, `AMQP_URL=…`.
fn amqp_url_of(stdout: &str) -> Option<&str> {
    stdout.lines().last()?.strip_prefix("AMQP_URL=").filter(|url| !url.is_empty())
}

/// `a` of `outbox-a@localhost`: the argument of `rabbitmq-cluster.sh kill`.
fn node_of(leader: &str) -> Option<char> {
    let node = leader.strip_prefix("outbox-")?.strip_suffix("@localhost")?;
    let mut chars = node.chars();
    match (chars.next(), chars.next()) {
        (Some(node), None) => Some(node),
        _ => None,
    }
}

/// The messages of `queue` in `rabbitmqctl list_queues name messages
/// --no-table-headers` (one `name\tmessages` line a queue).
fn messages_in(list_queues: &str, queue: &str) -> Option<u64> {
    list_queues.lines().find_map(|line| {
        let (name, messages) = line.split_once('\t')?;
        (name == queue).then(|| messages.trim().parse().ok())?
    })
}

async fn prove(
    args: &Args,
    run_dir: &Path,
    cluster: &mut Option<Cluster>,
    services: &mut Vec<Service>,
    loads: &mut Vec<tokio::process::Child>,
) -> anyhow::Result<bool> {
    let local = Local::from_env();
    println!("== building ({})", args.profile);
    crate::process::build_services(args.profile == "release", true).await?;
    let bin_dir = bin_dir(&args.profile);

    println!("== the cluster");
    // The guard first: a start that fails half-way leaves nodes to stop.
    *cluster = Some(Cluster { keep: args.keep });
    let amqp_url = Cluster::start().await?;
    println!("AMQP_URL={amqp_url}");

    let database_url = local.database_url(DATABASE);
    let mut admin = PgConnection::connect(&local.database_url("postgres")).await?;
    for statement in [
        format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"),
        format!("CREATE DATABASE {DATABASE}"),
    ] {
        sqlx::raw_sql(&statement)
            .execute(&mut admin)
            .await
            .with_context(|| format!("cannot make the database {DATABASE}: {statement}"))?;
    }
    for queue in [QUEUE, DEAD_LETTER_QUEUE] {
        let _ = command("rabbitmqctl", &["-q", "-n", NODE_A, "delete_queue", queue]).await;
    }

    let env = vec![
        ("AMQP_URL".to_owned(), amqp_url),
        ("DATABASE_URL".to_owned(), database_url.clone()),
        ("EXCHANGE".to_owned(), EXCHANGE.to_owned()),
        ("INVENTORY_QUEUE".to_owned(), QUEUE.to_owned()),
        ("DEAD_LETTER_EXCHANGE".to_owned(), DEAD_LETTER_EXCHANGE.to_owned()),
        ("DEAD_LETTER_QUEUE".to_owned(), DEAD_LETTER_QUEUE.to_owned()),
        ("QUEUE_TYPE".to_owned(), "quorum".to_owned()),
        (
            "RUST_LOG".to_owned(),
            std::env::var("RUST_LOG").unwrap_or("info,sqlx::postgres::notice=warn".into()),
        ),
    ];
    for file in std::fs::read_dir(run_dir)? {
        let path = file?.path();
        if path.extension().is_some_and(|ext| ext == "log" || ext == "json") {
            let _ = std::fs::remove_file(path);
        }
    }
    println!("== two order-services, two consumers");
    // services[0..2] the APIs, services[2..4] the consumers.
    for name in ["order-service", "inventory-consumer"] {
        for i in 0..2 {
            let service = Service::new(name, &bin_dir, free_port()?, env.clone(), run_dir)
                .logging_to(run_dir.join(format!("{name}-{i}.log")));
            services.push(service);
        }
    }
    services[0].start()?;
    services[0].wait_ready(Duration::from_secs(60)).await?; // migrates the database first
    for service in &mut services[1..] {
        service.start()?;
    }
    for service in &mut services[1..] {
        service.wait_ready(Duration::from_secs(60)).await?;
    }
    let mut db = PgConnection::connect(&database_url).await?;
    sqlx::raw_sql("CREATE TABLE proof_initial_stock AS SELECT sku, available FROM inventory")
        .execute(&mut db)
        .await?;

    println!("== load: {} orders/s through each API for {}s", args.rate, args.seconds);
    for (i, api) in services[..2].iter().enumerate() {
        let load = tokio::process::Command::new(bin_dir.join("stress-test"))
            .args(["--url", &api.url, "--rate", &args.rate.to_string()])
            .args(["--duration", &format!("{}s", args.seconds), "--concurrency", "64"])
            .args(["--idempotency-keys", "--retries", "40", "--timeout", "120s", "--json"])
            // Follows its orders in the database until each is decided.
            .env("DATABASE_URL", &database_url)
            .stdout(std::fs::File::create(run_dir.join(format!("load-{i}.json")))?)
            .stderr(std::fs::File::create(run_dir.join(format!("load-{i}.err")))?)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the stress test")?;
        loads.push(load);
    }

    let started = Instant::now();
    let mut leader = String::new();
    for (at, fault) in Schedule::cluster_proof().0 {
        tokio::time::sleep_until(started + at).await;
        let now = || started.elapsed().as_secs();
        match fault {
            Fault::KillQueueLeader => {
                leader = Cluster::leader(QUEUE).await?;
                let Some(node) = node_of(&leader) else {
                    bail!("no leader found for {QUEUE}: '{leader}'")
                };
                println!("[{}s] SIGKILL the queue's leader, {leader}", now());
                Cluster::kill(node).await?;
            }
            Fault::KillApi | Fault::KillConsumer => {
                let service = &mut services[if fault == Fault::KillApi { 0 } else { 2 }];
                println!("[{}s] SIGKILL {} 0, restart it", now(), service.name());
                service.kill().await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                service.start()?;
            }
            Fault::RestartKilledNode => {
                println!("[{}s] bring {leader} back", now());
                Cluster::start().await?;
                let new_leader = Cluster::leader(QUEUE).await?;
                println!("[{}s] {leader} is back; new leader: {new_leader}", now());
            }
            other => bail!("{other}: not a fault of the cluster proof"),
        }
    }

    let mut load_ok = true;
    for load in loads.iter_mut() {
        load_ok &= load.wait().await?.success();
    }
    loads.clear();

    println!("== waiting for the outbox to drain");
    for sql in [
        "SELECT count(*) FROM outbox WHERE state = 'pending'",
        "SELECT count(*) FROM orders WHERE status = 'PENDING'",
    ] {
        for _ in 0..240 {
            if count(&mut db, sql).await? == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    let mut figures = Figures::default();
    for i in 0..2 {
        let file = run_dir.join(format!("load-{i}.json"));
        let report: serde_json::Value = std::fs::read(&file)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .with_context(|| {
                format!(
                    "load {i} printed no report; see {}",
                    run_dir.join(format!("load-{i}.err")).display()
                )
            })?;
        figures.add_load(&report);
    }
    figures.orders = count(&mut db, "SELECT count(*) FROM orders").await?;
    figures.pending =
        count(&mut db, "SELECT count(*) FROM orders WHERE status = 'PENDING'").await?;
    figures.completed =
        count(&mut db, "SELECT count(*) FROM orders WHERE status = 'COMPLETED'").await?;
    figures.rejected =
        count(&mut db, "SELECT count(*) FROM orders WHERE status = 'REJECTED'").await?;
    figures.processed = count(&mut db, "SELECT count(*) FROM processed_messages").await?;
    figures.outbox_left = count(&mut db, "SELECT count(*) FROM outbox").await?;
    figures.dead_events =
        count(&mut db, "SELECT count(*) FROM outbox WHERE state = 'dead'").await?;
    figures.stock_mismatches = count(
        &mut db,
        "SELECT count(*) FROM proof_initial_stock i JOIN inventory v USING (sku)
         LEFT JOIN (SELECT l.sku, sum(l.quantity) AS taken FROM order_lines l
                    JOIN orders o ON o.id = l.order_id WHERE o.status = 'COMPLETED'
                    GROUP BY l.sku) r USING (sku)
         WHERE i.available - v.available <> coalesce(r.taken, 0)",
    )
    .await?;
    figures.dead_letters = command(
        "rabbitmqctl",
        &["-q", "-n", NODE_A, "list_queues", "name", "messages", "--no-table-headers"],
    )
    .await
    .ok()
    .and_then(|list| messages_in(&list, DEAD_LETTER_QUEUE));

    println!();
    println!("== figures");
    print!("{}", figures.table());
    let mut passed = true;
    for (description, holds) in figures.checks(load_ok, min_accepted(args.rate, args.seconds)) {
        println!("{}  {description}", if holds { "PASS" } else { "FAIL" });
        passed &= holds;
    }
    Ok(passed)
}

async fn count(db: &mut PgConnection, sql: &str) -> anyhow::Result<u64> {
    let n: i64 = sqlx::query_scalar(sql).fetch_one(db).await.with_context(|| sql.to_owned())?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Nine tenths of what both loads should have placed.
fn min_accepted(rate: u64, seconds: u64) -> u64 {
    rate * seconds * 2 * 9 / 10
}

/// What the run left, as printed under `== figures`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Figures {
    /// 2xx answers, both loads.
    accepted: u64,
    /// Requests that failed after their retries (5xx, 4xx, transport errors).
    failed: u64,
    /// Accepted orders the loads did not find in the database.
    not_found: u64,
    orders: u64,
    pending: u64,
    completed: u64,
    rejected: u64,
    /// Rows of processed_messages: one per applied event.
    processed: u64,
    outbox_left: u64,
    dead_events: u64,
    stock_mismatches: u64,
    /// None when rabbitmqctl could not say.
    dead_letters: Option<u64>,
}

impl Figures {
    /// Adds one load's stress-test `--json` report.
    fn add_load(&mut self, report: &serde_json::Value) {
        let field = |name: &str| report[name].as_u64().unwrap_or(0);
        self.accepted += field("ok");
        self.failed += field("server_errors") + field("transport_errors") + field("client_errors");
        self.not_found += field("not_found");
    }

    /// The run judged by the one invariant. The cluster proof checks stock
    /// itself (`stock_off`) and a second application shows as more
    /// processed messages than orders; it runs no `reconcile`.
    fn verdict(&self) -> Verdict {
        Verdict {
            accepted: self.accepted,
            lost: self.not_found,
            doubled: self.processed.abs_diff(self.orders),
            // Places no cancels: one event per order, nothing to reorder.
            out_of_order: 0,
            stock_off: self.stock_mismatches,
            stuck: self.pending,
            dead: self.dead_events + self.dead_letters.unwrap_or(1),
            reconciled: true,
        }
    }

    fn table(&self) -> String {
        let dead_letters = self.dead_letters.map_or("?".to_owned(), |n| n.to_string());
        [
            ("orders accepted (2xx), both APIs", self.accepted.to_string()),
            ("requests failed after their retries", self.failed.to_string()),
            ("accepted orders missing from the database", self.not_found.to_string()),
            ("orders in the database", self.orders.to_string()),
            (
                "  COMPLETED / REJECTED / PENDING",
                format!("{} / {} / {}", self.completed, self.rejected, self.pending),
            ),
            ("processed_messages (one per applied event)", self.processed.to_string()),
            ("SKUs whose stock is not conserved", self.stock_mismatches.to_string()),
            (
                "outbox rows left / dead events",
                format!("{} / {}", self.outbox_left, self.dead_events),
            ),
            (&format!("messages in {DEAD_LETTER_QUEUE}"), dead_letters),
        ]
        .iter()
        .map(|(what, figure)| format!("{what:<44} {figure}\n"))
        .collect()
    }

    /// Each check, described, and whether it held.
    fn checks(&self, load_ok: bool, min_accepted: u64) -> Vec<(String, bool)> {
        let verdict = self.verdict();
        vec![
            ("the load ran and converged (stress-test exit status)".into(), load_ok),
            (format!("at least {min_accepted} orders accepted"), self.accepted >= min_accepted),
            ("every accepted order exists".into(), verdict.lost == 0),
            ("no order left PENDING".into(), verdict.stuck == 0),
            ("each order applied once (processed_messages = orders)".into(), verdict.doubled == 0),
            ("stock conserved for every SKU".into(), verdict.stock_off == 0),
            (
                "outbox drained, no dead event".into(),
                self.outbox_left == 0 && self.dead_events == 0,
            ),
            ("dead-letter queue empty".into(), self.dead_letters == Some(0)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_is_the_last_line_the_cluster_script_prints() {
        let stdout = "Stopping rabbit application on node outbox-b@localhost ...\n\
                      AMQP_URL=amqp://guest:guest@127.0.0.1:5701/%2f,amqp://guest:guest@127.0.0.1:5702/%2f\n";
        assert_eq!(
            amqp_url_of(stdout),
            Some("amqp://guest:guest@127.0.0.1:5701/%2f,amqp://guest:guest@127.0.0.1:5702/%2f")
        );
        assert_eq!(amqp_url_of("AMQP_URL=x\njoining\n"), None);
        assert_eq!(amqp_url_of("AMQP_URL=\n"), None);
        assert_eq!(amqp_url_of(""), None);
    }

    #[test]
    fn the_leader_names_a_node_of_the_cluster() {
        assert_eq!(node_of("outbox-b@localhost"), Some('b'));
        for not_ours in ["", "rabbit@localhost", "outbox-ab@localhost", "outbox-a@elsewhere"] {
            assert_eq!(node_of(not_ours), None, "{not_ours}");
        }
    }

    #[test]
    fn the_dead_letter_depth_is_read_from_list_queues() {
        let list = "proof.inventory.order-placed\t12\nproof.inventory.order-placed.dead\t0\n";
        assert_eq!(messages_in(list, DEAD_LETTER_QUEUE), Some(0));
        assert_eq!(messages_in(list, QUEUE), Some(12));
        assert_eq!(messages_in(list, "other"), None);
        assert_eq!(messages_in("proof.inventory.order-placed.dead\t\n", DEAD_LETTER_QUEUE), None);
    }

    fn clean() -> Figures {
        Figures {
            accepted: 9000,
            orders: 9000,
            completed: 8861,
            rejected: 139,
            processed: 9000,
            dead_letters: Some(0),
            ..Figures::default()
        }
    }

    #[test]
    fn a_clean_run_passes_every_check_and_holds_the_invariant() {
        assert_eq!(min_accepted(100, 45), 8100);
        assert!(clean().checks(true, 8100).iter().all(|(_, holds)| *holds));
        assert!(clean().verdict().holds());
    }

    #[test]
    fn each_loss_fails_its_check() {
        for (broken, check) in [
            (Figures { not_found: 1, ..clean() }, "every accepted order exists"),
            (Figures { pending: 1, ..clean() }, "no order left PENDING"),
            (Figures { processed: 9001, ..clean() }, "each order applied once"),
            (Figures { processed: 8999, ..clean() }, "each order applied once"),
            (Figures { stock_mismatches: 2, ..clean() }, "stock conserved"),
            (Figures { outbox_left: 3, ..clean() }, "outbox drained"),
            (Figures { dead_events: 1, outbox_left: 1, ..clean() }, "outbox drained"),
            (Figures { dead_letters: Some(1), ..clean() }, "dead-letter queue empty"),
            (Figures { dead_letters: None, ..clean() }, "dead-letter queue empty"),
            (Figures { accepted: 8099, ..clean() }, "at least 8100 orders accepted"),
        ] {
            let failed: Vec<String> = broken
                .checks(true, 8100)
                .into_iter()
                .filter(|(_, holds)| !holds)
                .map(|(description, _)| description)
                .collect();
            assert_eq!(failed.len(), 1, "{broken:?}: {failed:?}");
            assert!(failed[0].starts_with(check), "{broken:?}: {failed:?}");
        }
        let failed_load = clean().checks(false, 8100);
        assert!(!failed_load[0].1);
    }

    #[test]
    fn the_loads_reports_add_up() {
        let mut figures = Figures::default();
        let report = serde_json::json!({
            "ok": 4500, "server_errors": 1, "transport_errors": 2, "client_errors": 3,
            "not_found": 0, "latency_ms": {"ok": 7}
        });
        figures.add_load(&report);
        figures.add_load(&report);
        assert_eq!((figures.accepted, figures.failed, figures.not_found), (9000, 12, 0));
    }

    #[test]
    fn the_figures_print_as_the_script_printed_them() {
        let table = clean().table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], format!("{:<44} 9000", "orders accepted (2xx), both APIs"));
        assert_eq!(lines[4], format!("{:<44} 8861 / 139 / 0", "  COMPLETED / REJECTED / PENDING"));
        // Longer than the column: one space, as printf '%-44s %s' does.
        assert_eq!(lines[8], "messages in proof.inventory.order-placed.dead 0");
        let unknown = Figures { dead_letters: None, ..clean() }.table();
        assert!(unknown.ends_with("dead ?\n"), "{unknown}");
    }
}
