//! The benchmarks of the parts: `bench-relay` and `bench-consumer` run the
//! examples that measure the relay and the consumer alone (their options are
//! the examples' own), and `bench-queue-types` what quorum queues cost.

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, bail};

use crate::process::{Local, bin_dir, command, until_signal};

/// The options of a benchmark example, passed on as they are (`--help` for
/// its own).
#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub struct PassThrough {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// DATABASE_URL and AMQP_URL as the caller set them, else the local services'.
fn env_urls(local: &Local) -> [(&'static str, String); 2] {
    let var = |name: &str, default: String| std::env::var(name).unwrap_or(default);
    [
        ("DATABASE_URL", var("DATABASE_URL", format!("postgres://postgres@{}/postgres", local.pg))),
        ("AMQP_URL", var("AMQP_URL", local.amqp_url())),
    ]
}

async fn cargo(args: &[&str], pass: &[String]) -> anyhow::Result<bool> {
    let status = tokio::process::Command::new("cargo")
        .args(args)
        .args(pass)
        .envs(env_urls(&Local::from_env()))
        .status()
        .await
        .context("cannot run cargo")?;
    Ok(status.success())
}

/// The rate at which the relay drains a backlog of outbox events, against the
/// broker's own pipelined-publish rate in the same run, and the idle
/// commit-to-delivery latency of single events (outbox's example relay_bench).
pub async fn relay(args: PassThrough) -> anyhow::Result<bool> {
    example("outbox", "relay_bench", &args.args).await
}

/// `cargo run --release` of `package`'s example `name`, passing `pass` on.
async fn example(package: &str, name: &str, pass: &[String]) -> anyhow::Result<bool> {
    let run = ["run", "--release", "--locked", "--quiet", "-p", package, "--example", name, "--"];
    cargo(&run, pass).await
}

/// The rate at which the inventory consumer applies a backlog of OrderPlaced
/// events, batched against one message per transaction, and its peak memory
/// (inventory-consumer's example consumer_bench).
pub async fn consumer(args: PassThrough) -> anyhow::Result<bool> {
    if !cargo(&["build", "--release", "--locked", "--quiet", "-p", "inventory-consumer"], &[])
        .await?
    {
        return Ok(false);
    }
    let consumer_bin = bin_dir("release").join("inventory-consumer");
    let mut pass = vec!["--consumer-bin".to_owned(), consumer_bin.display().to_string()];
    pass.extend(args.args);
    example("inventory-consumer", "consumer_bench", &pass).await
}

/// The settings of `cargo xtask bench-queue-types`.
#[derive(Debug, clap::Args)]
pub struct QueueTypesArgs {
    /// Events of each relay drain.
    #[arg(long, env = "BENCH_EVENTS", default_value_t = 50000)]
    events: u64,
    /// Orders of each whole-system run.
    #[arg(long, env = "BENCH_ORDERS", default_value_t = 10000)]
    orders: u64,
}

const QUEUE_TYPES_DIR: &str = ".run/bench-queue-types";

/// What quorum queues cost, in one run: the relay's drain rate and the whole
/// system's closed-loop orders/s (scripts/demo.sh) with a classic and a quorum
/// queue on the local node, and a quorum queue on the 3-node cluster of
/// scripts/rabbitmq-cluster.sh (started for the run, stopped after). Ratios
/// are against the classic queue of the same run.
pub async fn queue_types(args: QueueTypesArgs) -> anyhow::Result<bool> {
    std::env::set_current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))?;
    until_signal(measure_queue_types(args)).await
}

/// Stops the cluster when dropped, however the run ends.
struct Cluster;

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("scripts/rabbitmq-cluster.sh")
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

async fn measure_queue_types(args: QueueTypesArgs) -> anyhow::Result<bool> {
    let local = Local::from_env();
    let local_amqp = local.amqp_url();
    let run_dir = PathBuf::from(QUEUE_TYPES_DIR);
    std::fs::create_dir_all(&run_dir)?;
    let [database_url, _] = env_urls(&local);
    for packages in [
        &["-p", "outbox", "--example", "relay_bench"][..],
        &["-p", "order-service", "-p", "inventory-consumer", "-p", "stress-test"],
    ] {
        let mut build = vec!["build", "--release", "--locked", "-q"];
        build.extend(packages);
        if !cargo(&build, &[]).await? {
            bail!("cargo build failed");
        }
    }
    let started = command("scripts/rabbitmq-cluster.sh", &["start"]).await?;
    let _cluster = Cluster;
    let cluster_amqp = started
        .lines()
        .last()
        .and_then(|line| line.strip_prefix("AMQP_URL="))
        .context("scripts/rabbitmq-cluster.sh start printed no AMQP_URL")?
        .to_owned();

    let relay_log = run_dir.join("relay.txt");
    std::fs::write(&relay_log, "")?;
    eprintln!("== relay drain, {} events", args.events);
    let mut relay = Vec::new();
    for (amqp, queue_type) in
        [(&local_amqp, "classic"), (&local_amqp, "quorum"), (&cluster_amqp, "quorum")]
    {
        let output = tokio::process::Command::new(bin_dir("release").join("examples/relay_bench"))
            .args(["--amqp-url", amqp, "--queue-type", queue_type])
            .args(["--events", &args.events.to_string(), "--latency-samples", "50"])
            .env(database_url.0, &database_url.1)
            .stderr(Stdio::inherit())
            .output()
            .await
            .context("cannot run relay_bench")?;
        let text = String::from_utf8_lossy(&output.stdout);
        std::fs::OpenOptions::new().append(true).open(&relay_log)?.write_all(&output.stdout)?;
        if !output.status.success() {
            bail!("relay_bench failed ({}); see {}", output.status, relay_log.display());
        }
        relay.push(drain_rate(&text).unwrap_or_default());
    }
    eprintln!("== whole system, closed loop, {} orders", args.orders);
    let mut system = Vec::new();
    for (name, amqp, queue_type) in [
        ("classic", &local_amqp, "classic"),
        ("quorum", &local_amqp, "quorum"),
        ("cluster", &cluster_amqp, "quorum"),
    ] {
        let errors = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join(format!("system-{name}.err")))?;
        let output = tokio::process::Command::new("scripts/demo.sh")
            .arg("--json")
            .env("QUEUE_TYPE", queue_type)
            .env("DEMO_AMQP_URL", amqp)
            .env("DEMO_PREFIX", format!("bench-{name}"))
            .env("DEMO_ORDERS", args.orders.to_string())
            .env("DEMO_DATABASE_URL", local.database_url("outbox_bench_queues"))
            .stderr(errors)
            .output()
            .await
            .context("cannot run scripts/demo.sh")?;
        std::fs::write(run_dir.join(format!("system-{name}.txt")), &output.stdout)?;
        // A failed run shows as an empty cell, as it always has.
        system.push(system_rate(&String::from_utf8_lossy(&output.stdout)).unwrap_or_default());
    }
    let mut queues = Vec::new();
    for prefix in ["bench-classic", "bench-quorum"] {
        queues.push(format!("{prefix}.inventory.order-placed"));
        queues.push(format!("{prefix}.inventory.order-placed.dead"));
    }
    let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
    if let Err(error) = super::delete_queues(&local_amqp, &queues).await {
        eprintln!("warning: the benchmark's queues were not deleted: {error:#}");
    }

    println!();
    for line in queue_types_table(&relay, &system) {
        println!("{line}");
    }
    println!("(ratios against the classic queue of this run; details in {QUEUE_TYPES_DIR})");
    Ok(true)
}

/// The events/s of relay_bench's "relay draining the backlog: N events/s" line.
fn drain_rate(output: &str) -> Option<String> {
    let (_, rest) = output.split_once("relay draining the backlog:")?;
    let digits: String = rest.trim_start().chars().take_while(char::is_ascii_digit).collect();
    (!digits.is_empty()).then_some(digits)
}

/// The whole orders/s of the stress test's JSON line (`{"sent":…`) in
/// demo.sh's output.
fn system_rate(output: &str) -> Option<String> {
    let line = output.lines().find(|line| line.starts_with("{\"sent\""))?;
    let report: serde_json::Value = serde_json::from_str(line).ok()?;
    Some(format!("{}", report["throughput_rps"].as_f64()?.trunc() as u64))
}

/// `a / b` as `1.23x`, or `?` without a `b`.
fn ratio(a: &str, b: &str) -> String {
    let (a, b) = (a.parse().unwrap_or(0.0_f64), b.parse().unwrap_or(0.0_f64));
    if b > 0.0 { format!("{:.2}x", a / b) } else { "?".to_owned() }
}

/// The table: classic, quorum and cluster rows of relay and system rates.
fn queue_types_table(relay: &[String], system: &[String]) -> Vec<String> {
    let line =
        |label: &str, relay: &str, system: &str| format!("{label:<34} {relay:>14} {system:>14}");
    let with_ratio =
        |rates: &[String], i: usize| format!("{} ({})", rates[i], ratio(&rates[i], &rates[0]));
    vec![
        line("", "relay events/s", "system orders/s"),
        line("classic queue, local node", &relay[0], &system[0]),
        line("quorum queue, local node", &with_ratio(relay, 1), &with_ratio(system, 1)),
        line("quorum queue, 3-node cluster", &with_ratio(relay, 2), &with_ratio(system, 2)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_rate_of_relay_bench() {
        let output = "relay benchmark: 50000 events, 4 workers, batch 256, classic queue\n\
                      \x20 baseline, broker alone (pipelined):     15454 msg/s (50000 messages)\n\
                      \x20 relay draining the backlog:     13618 events/s (3.67 s)\n";
        assert_eq!(drain_rate(output).as_deref(), Some("13618"));
        assert_eq!(drain_rate("relay benchmark failed\n"), None);
    }

    #[test]
    fn the_orders_per_second_of_demo_json() {
        let output = "== stress test\n{\"sent\":10000,\"ok\":10000,\"throughput_rps\":870.93}\n== demo passed\n";
        assert_eq!(system_rate(output).as_deref(), Some("870"));
        assert_eq!(system_rate("error: stress-test failed\n"), None);
    }

    #[test]
    fn the_table_with_ratios_against_the_classic_queue() {
        let relay = ["14990", "11814", "6658"].map(String::from);
        let system = ["870", "732", ""].map(String::from);
        assert_eq!(
            queue_types_table(&relay, &system),
            [
                "                                   relay events/s system orders/s",
                "classic queue, local node                   14990            870",
                "quorum queue, local node            11814 (0.79x)    732 (0.84x)",
                "quorum queue, 3-node cluster         6658 (0.44x)        (0.00x)",
            ]
        );
        assert_eq!(ratio("5", ""), "?");
    }
}
