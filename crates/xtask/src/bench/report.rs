//! The figures of `cargo xtask bench-e2e` from its readings, the table it
//! prints and the `result.json` it writes: the arithmetic and the formatting,
//! apart from the processes, so that both are tested.
//!
//! Figures are rounded where they are shown (CPU ms to 3 decimals, cores to
//! 2, ratios to 2), and sums are of the rounded figures, so that the rows of
//! the table add up and the JSON says what the table says.

use std::fmt::Display;

use serde::Deserialize;
use serde_json::{Value, json};

use super::cpu::{Clock, MachineTicks};

/// The part of a stress-test `--json` report the benchmark reads.
#[derive(Debug, Clone, Deserialize)]
pub struct StressReport {
    pub ok: u64,
    pub elapsed_seconds: f64,
    pub throughput_rps: f64,
    /// `null` when convergence was not waited for.
    pub converge_seconds: Option<f64>,
    pub latency_ms: Latency,
    pub e2e_lag_ms: Lag,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
}

/// `null` percentiles when no order was measured.
#[derive(Debug, Clone, Deserialize)]
pub struct Lag {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// What pgbench printed of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Pgbench {
    pub tps: f64,
    /// "latency average = N ms", as printed.
    pub latency: Option<String>,
    pub transactions: Option<u64>,
}

impl Pgbench {
    /// From pgbench's output: `tps = 1234.5 (without initial connection time)`
    /// (Postgres 14 and later) or `(excluding connections establishing)`
    /// (earlier); `None` without a tps.
    pub fn parse(output: &str) -> Option<Self> {
        let (mut tps, mut latency, mut transactions) = (None, None, None);
        for line in output.lines() {
            if let Some(rest) = line.strip_prefix("tps = ")
                && let Some((number, how)) = rest.split_once(" (")
                && (how.starts_with("without initial connection time")
                    || how.starts_with("excluding connections establishing"))
            {
                tps = number.parse().ok();
            } else if let Some(rest) = line.strip_prefix("latency average = ") {
                latency = rest.split_once(" ms").map(|(number, _)| number.to_owned());
            } else if let Some(rest) =
                line.strip_prefix("number of transactions actually processed: ")
            {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                transactions = digits.parse().ok();
            }
        }
        Some(Self { tps: tps?, latency, transactions })
    }
}

/// `x` rounded to `digits` decimals, as `%.<digits>f` prints it.
pub fn fixed(x: f64, digits: usize) -> f64 {
    format!("{x:.digits$}").parse().unwrap_or(x)
}

/// A value, or `-` when there is none.
fn dash<T: Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| value.to_string())
}

/// A figure with `digits` decimals, or `-`.
fn dash_fixed(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format!("{value:.digits$}"))
}

/// One row of the table: a label, a right-aligned value, a unit.
pub fn row(label: &str, value: &str, unit: &str) -> String {
    let unit = if unit.is_empty() { String::new() } else { format!(" {unit}") };
    format!("  {label:<52} {value:>16}{unit}")
}

/// The ceiling: what Postgres alone commits of the frozen one-order transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Ceiling {
    pub clients: u32,
    pub seconds: u32,
    pub pgbench: Pgbench,
    /// Postgres's CPU ms a transaction, when its tree was read.
    pub postgres_cpu_ms: Option<f64>,
    /// The cores that processes other than Postgres and pgbench kept busy
    /// meanwhile: the ceiling is only as high as the machine is quiet.
    pub other_cores: Option<f64>,
}

impl Ceiling {
    /// From pgbench's figures, the ticks Postgres's tree used meanwhile, the
    /// machine's, and pgbench's own.
    pub fn new(
        clients: u32,
        seconds: u32,
        pgbench: Pgbench,
        postgres_ticks: Option<i64>,
        machine: MachineTicks,
        pgbench_ticks: i64,
        clock: Clock,
    ) -> Self {
        let tck = clock.ticks_per_second as f64;
        let measured = postgres_ticks.zip(pgbench.transactions.filter(|&n| n > 0));
        let postgres_cpu_ms =
            measured.map(|(ticks, n)| fixed(ticks as f64 * 1000.0 / tck / n as f64, 3));
        let other_cores = measured.map(|(ticks, _)| {
            let others = (machine.busy - ticks - pgbench_ticks) as f64;
            fixed(clock.cores as f64 * others / machine.total as f64, 2)
        });
        Self { clients, seconds, pgbench, postgres_cpu_ms, other_cores }
    }

    /// The line under `== ceiling`.
    pub fn line(&self, cores: usize) -> String {
        format!(
            "   {:.1} tps, latency average {} ms, postgres CPU {} ms a transaction, \
             other processes {} of {cores} cores",
            self.pgbench.tps,
            self.pgbench.latency.as_deref().unwrap_or("?"),
            dash_fixed(self.postgres_cpu_ms, 3),
            dash_fixed(self.other_cores, 2),
        )
    }
}

/// The pipeline ceiling: what Postgres alone does of the whole pipeline,
/// batched as the system batches it (`../shared/perf/pipeline-ceiling.sh`:
/// the group-commit write, the relay's claim and delete, the consumer's
/// effect, on a frozen schema), the best of its client counts.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineCeiling {
    /// The script and its client counts, as run.
    pub command: String,
    /// `None` when it was not run (no script) or printed no figure.
    pub orders_per_second: Option<f64>,
    /// The whole machine's CPU time per order in the best run, in ms; `None`
    /// when not measured.
    pub cpu_ms_per_order: Option<f64>,
}

impl PipelineCeiling {
    /// The script's last line: `pipeline_ceiling=<orders/s>`.
    pub fn parse(output: &str) -> Option<f64> {
        output
            .lines()
            .rev()
            .find_map(|line| line.trim().strip_prefix("pipeline_ceiling=")?.parse().ok())
            .filter(|&ops: &f64| ops > 0.0)
    }

    /// The machine's CPU ms an order of the run that made the ceiling: its
    /// line's `busy_cores` over its `orders/s`.
    pub fn parse_cpu(output: &str) -> Option<f64> {
        let best = Self::parse(output)?;
        output.lines().find_map(|line| {
            let field = |name: &str| -> Option<f64> {
                line.split_whitespace().find_map(|word| word.strip_prefix(name)?.parse().ok())
            };
            let orders_per_second = field("orders/s=")?;
            (orders_per_second == best).then_some(field("busy_cores=")? * 1000.0 / best)
        })
    }
}

/// The goal for the whole system against the pipeline ceiling at `concurrency`
/// requests in flight: 0.40x from 128, 0.25x from 32, none below.
pub fn pipeline_goal(concurrency: u64) -> Option<f64> {
    match concurrency {
        128.. => Some(0.40),
        32.. => Some(0.25),
        _ => None,
    }
}

/// The goal for the whole system's CPU time per order at `concurrency`
/// requests in flight: 0.30 ms from 128, none below.
pub fn cpu_goal(concurrency: u64) -> Option<f64> {
    (concurrency >= 128).then_some(0.30)
}

/// The machine's CPU ms an order of the pipeline ceiling where the CPU goal was
/// set (2026-12-06: 16,697 orders/s, 1.94 cores busy).
const CPU_GOAL_PIPELINE_CPU_MS: f64 = 1.94 * 1000.0 / 16_697.0;

/// [`cpu_goal`] as a ratio to the pipeline ceiling's own CPU an order, which
/// moves with the machine as the system's does: 0.30 ms against the 0.116 ms
/// of the ceiling where it was set, 2.58x.
pub fn cpu_ratio_goal(concurrency: u64) -> Option<f64> {
    cpu_goal(concurrency).map(|ms| fixed(ms / CPU_GOAL_PIPELINE_CPU_MS, 2))
}

/// The last table of a run at several concurrencies: each one's orders/s,
/// against the pipeline ceiling, CPU per order and open-loop lag, with the goals.
pub fn summary(runs: &[(System, Open)]) -> Vec<String> {
    let verdict = |met: bool| if met { "met" } else { "missed" };
    let mut lines = vec![
        "== summary".to_owned(),
        format!(
            "  {:>9}  {:>9}  {:<26}  {:<26}  {:<26}  {}",
            "in flight",
            "orders/s",
            "/ pipeline ceiling",
            "CPU ms an order",
            "/ pipeline ceiling's CPU",
            "open-loop e2e lag p99"
        ),
    ];
    for (system, open) in runs {
        let concurrency = system.run.concurrency;
        let ratio = match (system.over_pipeline, pipeline_goal(concurrency)) {
            (Some(ratio), Some(goal)) => {
                format!("{ratio:.2}x (>= {goal:.2}x: {})", verdict(ratio >= goal))
            }
            (Some(ratio), None) => format!("{ratio:.2}x"),
            (None, _) => "not measured".to_owned(),
        };
        let total = system.cpu.total;
        let cpu = match cpu_goal(concurrency) {
            Some(goal) => format!("{total:.3} (<= {goal:.2}: {})", verdict(total <= goal)),
            None => format!("{total:.3}"),
        };
        let cpu_ratio = match (system.cpu_over_pipeline, cpu_ratio_goal(concurrency)) {
            (Some(ratio), Some(goal)) => {
                format!("{ratio:.2}x (<= {goal:.2}x: {})", verdict(ratio <= goal))
            }
            (Some(ratio), None) => format!("{ratio:.2}x"),
            (None, _) => "not measured".to_owned(),
        };
        let lag = open.report.as_ref().and_then(|report| report.e2e_lag_ms.p99);
        lines.push(format!(
            "  {concurrency:>9}  {:>9.1}  {ratio:<26}  {cpu:<26}  {cpu_ratio:<26}  {} ms (< 50 ms: {})",
            system.orders_per_second,
            dash(lag),
            open.goal()
        ));
    }
    lines
}

/// A batch-size histogram of one of the services' metrics (Prometheus text),
/// cumulative as exposed: `(le, count)` per bucket, `+Inf` last.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batches {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

impl Batches {
    /// `metric`'s histogram in `text`; `None` when it is not there.
    pub fn parse(text: &str, metric: &str) -> Option<Self> {
        let bucket = format!("{metric}_bucket{{le=\"");
        let buckets = text
            .lines()
            .filter_map(|line| {
                let (le, _) = line.strip_prefix(&bucket)?.split_once('"')?;
                let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                let count = test_support::sample(line, &format!("{bucket}{le}\"}}"))?;
                Some((bound, count as u64))
            })
            .collect::<Vec<_>>();
        (!buckets.is_empty()).then(|| Self {
            buckets,
            count: test_support::sample(text, &format!("{metric}_count")).unwrap_or(0.0) as u64,
            sum: test_support::sample(text, &format!("{metric}_sum")).unwrap_or(0.0),
        })
    }

    /// What was observed between `before` and `self`.
    pub fn since(&self, before: &Self) -> Self {
        let earlier =
            |le: f64| before.buckets.iter().find(|(other, _)| *other == le).map_or(0, |(_, n)| *n);
        Self {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, n)| (le, n.saturating_sub(earlier(le))))
                .collect(),
            count: self.count.saturating_sub(before.count),
            sum: self.sum - before.sum,
        }
    }

    /// `31.6 mean of 1266  | <=16 5% | <=32 40% | <=64 55%`: the mean, the
    /// number of batches, and each bucket's share of them (empty ones left out).
    pub fn line(&self) -> String {
        if self.count == 0 {
            return "- (no batch)".to_owned();
        }
        let mut line = format!("{:.1} mean of {}", self.sum / self.count as f64, self.count);
        let mut below = 0;
        for &(le, cumulative) in &self.buckets {
            let n = cumulative.saturating_sub(below);
            below = cumulative.max(below);
            if n == 0 {
                continue;
            }
            let share = 100.0 * n as f64 / self.count as f64;
            let bound = if le.is_infinite() { "more".to_owned() } else { format!("<={le}") };
            line.push_str(&format!(" | {bound} {share:.0}%"));
        }
        line
    }
}

/// The batch sizes the closed-loop run reached: the writer's, the relay's and
/// the consumer's (`None` for one whose metrics could not be read).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchSizes {
    pub write: Option<Batches>,
    pub relay: Option<Batches>,
    pub consumer: Option<Batches>,
}

impl BatchSizes {
    /// The metrics: order-service's writer and relay, the consumer's.
    pub const METRICS: [&str; 3] =
        ["order_write_batch_size", "outbox_relay_batch_size", "inventory_batch_size"];

    pub fn lines(&self) -> Vec<String> {
        let line =
            |batches: &Option<Batches>| batches.as_ref().map_or("-".to_owned(), Batches::line);
        vec![
            "  batch sizes reached (mean, batches, share of batches by size)".to_owned(),
            format!("    write, orders a transaction      {}", line(&self.write)),
            format!("    relay, events a claim            {}", line(&self.relay)),
            format!("    consumer, messages a transaction {}", line(&self.consumer)),
        ]
    }

    /// For result.json: each one's mean and count.
    pub fn json(&self) -> Value {
        let one = |batches: &Option<Batches>| {
            batches
                .as_ref()
                .filter(|b| b.count > 0)
                .map(|b| json!({ "mean": fixed(b.sum / b.count as f64, 1), "batches": b.count }))
        };
        json!({ "write": one(&self.write), "relay": one(&self.relay), "consumer": one(&self.consumer) })
    }
}

/// What the closed-loop run measured, before any arithmetic.
#[derive(Debug, Clone)]
pub struct ClosedRun {
    pub orders: u64,
    pub concurrency: u64,
    pub report: StressReport,
    /// Tick deltas of postgres, the broker, order-service and inventory-consumer.
    pub component_ticks: [Option<i64>; 4],
    /// The broker's name in the report: `rabbitmq` or `kafka broker`.
    pub broker: &'static str,
    /// The stress test's own, as reaped.
    pub load_ticks: i64,
    pub machine: MachineTicks,
    /// The share of the `orders` updates that were HOT, as Postgres printed it.
    pub hot_percent: Option<String>,
    /// Transactions committed in other databases meanwhile.
    pub other_transactions: i64,
    /// The batch sizes reached.
    pub batches: BatchSizes,
}

/// CPU ms per order of each component; `None` for one whose process was not
/// found (or vanished).
#[derive(Debug, Clone, PartialEq)]
pub struct CpuPerOrder {
    pub postgres: Option<f64>,
    /// The broker's (RabbitMQ's, or the Kafka broker's: see `ClosedRun::broker`).
    pub rabbitmq: Option<f64>,
    pub order_service: Option<f64>,
    pub inventory_consumer: Option<f64>,
    pub load_generator: f64,
    pub total: f64,
    /// The rest of the machine's busy time in the same interval (another
    /// build, say): not counted in `total`.
    pub other_processes: f64,
}

/// The whole system's figures of the closed-loop run.
#[derive(Debug, Clone)]
pub struct System {
    pub run: ClosedRun,
    /// Orders accepted / (load time + time until the last was decided).
    pub orders_per_second: f64,
    /// Against the ceiling's tps.
    pub over_ceiling: f64,
    /// Against the pipeline ceiling's orders/s, when it was measured.
    pub over_pipeline: Option<f64>,
    pub cpu: CpuPerOrder,
    /// The total CPU an order against the pipeline ceiling's, when measured.
    pub cpu_over_pipeline: Option<f64>,
    pub machine_busy_percent: i64,
    /// The cores the other processes kept busy.
    pub other_cores: f64,
}

impl System {
    pub fn new(
        run: ClosedRun,
        ceiling_tps: f64,
        pipeline: &PipelineCeiling,
        clock: Clock,
    ) -> anyhow::Result<Self> {
        let report = &run.report;
        let Some(converge) = report.converge_seconds else {
            anyhow::bail!("the closed-loop report lacks converge_seconds")
        };
        if report.ok == 0 {
            anyhow::bail!("no order was accepted");
        }
        let ok = report.ok as f64;
        let tck = clock.ticks_per_second as f64;
        let orders_per_second = ok / (report.elapsed_seconds + converge);
        let per_order = |ticks: i64| fixed(ticks as f64 * 1000.0 / tck / ok, 3);
        let [postgres, rabbitmq, order_service, inventory_consumer] =
            run.component_ticks.map(|ticks| ticks.map(per_order));
        let load_generator = per_order(run.load_ticks);
        let total = fixed(
            [postgres, rabbitmq, order_service, inventory_consumer]
                .iter()
                .map(|ms| ms.unwrap_or(0.0))
                .sum::<f64>()
                + load_generator,
            3,
        );
        let other_processes = fixed(run.machine.busy as f64 * 1000.0 / tck / ok - total, 3);
        let busy_percent = 100.0 * run.machine.busy as f64 / run.machine.total as f64;
        let seconds = run.machine.total as f64 / clock.cores as f64 / tck;
        let other_cores = fixed(other_processes * ok / 1000.0 / seconds, 2);
        Ok(Self {
            orders_per_second,
            over_ceiling: fixed(orders_per_second / ceiling_tps, 2),
            over_pipeline: pipeline.orders_per_second.map(|ops| fixed(orders_per_second / ops, 2)),
            cpu_over_pipeline: pipeline.cpu_ms_per_order.map(|ms| fixed(total / ms, 2)),
            cpu: CpuPerOrder {
                postgres,
                rabbitmq,
                order_service,
                inventory_consumer,
                load_generator,
                total,
                other_processes,
            },
            machine_busy_percent: fixed(busy_percent, 0) as i64,
            other_cores,
            run,
        })
    }

    /// What follows the ratio of CPU an order to the pipeline ceiling's: the
    /// ceiling's own, and the goal scaled to it with its verdict.
    fn cpu_over_pipeline_note(&self, pipeline: &PipelineCeiling) -> String {
        let Some(ceiling_ms) = pipeline.cpu_ms_per_order else {
            return "(not measured)".to_owned();
        };
        let concurrency = self.run.concurrency;
        let goal =
            match (self.cpu_over_pipeline, cpu_ratio_goal(concurrency), cpu_goal(concurrency)) {
                (Some(ratio), Some(goal), Some(goal_ms)) => format!(
                    "; goal <= {goal:.2}x, the {goal_ms:.2} ms goal on its machine: {}",
                    if ratio <= goal { "met" } else { "missed" }
                ),
                _ => String::new(),
            };
        format!("(the ceiling's {ceiling_ms:.3} ms an order{goal})")
    }

    /// The `== result` table.
    pub fn lines(
        &self,
        ceiling: &Ceiling,
        pipeline: &PipelineCeiling,
        cores: usize,
    ) -> Vec<String> {
        let report = &self.run.report;
        let cpu = &self.cpu;
        let ms = |value: Option<f64>| dash_fixed(value, 3);
        let mut lines = vec![
            "== result".to_owned(),
            row(
                &format!("ceiling (pgbench, frozen 1-order txn, {} clients)", ceiling.clients),
                &format!("{:.1}", ceiling.pgbench.tps),
                &format!(
                    "tps  (postgres CPU {} ms a transaction; other processes {} cores)",
                    dash_fixed(ceiling.postgres_cpu_ms, 3),
                    dash_fixed(ceiling.other_cores, 2)
                ),
            ),
            row(
                &format!("system ({} orders, {} in flight)", report.ok, self.run.concurrency),
                &format!("{:.1}", self.orders_per_second),
                &format!(
                    "orders/s  ({} in {:.2} s + {:.2} s to decide the last)",
                    report.ok,
                    report.elapsed_seconds,
                    report.converge_seconds.unwrap_or(0.0)
                ),
            ),
            row("system / ceiling", &format!("{:.2}x", self.over_ceiling), ""),
            row(
                "pipeline ceiling (best of its client counts)",
                &dash(pipeline.orders_per_second.map(|ops| format!("{ops:.0}"))),
                &format!("orders/s  ({})", pipeline.command),
            ),
            row(
                "system / pipeline ceiling",
                &dash(self.over_pipeline.map(|ratio| format!("{ratio:.2}x"))),
                &match (self.over_pipeline, pipeline_goal(self.run.concurrency)) {
                    (Some(ratio), Some(goal)) if ratio >= goal => {
                        format!("(goal >= {goal:.2}x: met)")
                    }
                    (Some(_), Some(goal)) => format!("(goal >= {goal:.2}x: missed)"),
                    (Some(_), None) => String::new(),
                    (None, _) => "(not measured)".to_owned(),
                },
            ),
            row(
                "HTTP latency p50 / p99",
                &format!("{} / {}", report.latency_ms.p50, report.latency_ms.p99),
                "ms",
            ),
            row(
                "e2e lag p50 / p99",
                &format!("{} / {}", dash(report.e2e_lag_ms.p50), dash(report.e2e_lag_ms.p99)),
                "ms",
            ),
            "  CPU per order".to_owned(),
            row("  postgres", &ms(cpu.postgres), "ms"),
            row(&format!("  {}", self.run.broker), &ms(cpu.rabbitmq), "ms"),
            row("  order-service", &ms(cpu.order_service), "ms"),
            row("  inventory-consumer", &ms(cpu.inventory_consumer), "ms"),
            row("  load generator (stress-test)", &ms(Some(cpu.load_generator)), "ms"),
            row(
                "  total",
                &ms(Some(cpu.total)),
                &match cpu_goal(self.run.concurrency) {
                    Some(goal) if cpu.total <= goal => format!("ms  (goal <= {goal:.2} ms: met)"),
                    Some(goal) => format!("ms  (goal <= {goal:.2} ms: missed)"),
                    None => "ms".to_owned(),
                },
            ),
            row(
                "  total / the pipeline ceiling's",
                &dash(self.cpu_over_pipeline.map(|ratio| format!("{ratio:.2}x"))),
                &self.cpu_over_pipeline_note(pipeline),
            ),
            row(
                "  other processes on the machine (not counted)",
                &ms(Some(cpu.other_processes)),
                &format!(
                    "ms  ({:.2} cores; the machine {}% busy of {cores})",
                    self.other_cores, self.machine_busy_percent
                ),
            ),
            row("orders status updates that were HOT", &dash(self.run.hot_percent.as_deref()), "%"),
        ];
        lines.extend(self.run.batches.lines());
        if self.run.other_transactions > 10 {
            lines.push(format!(
                "  note: other databases committed {} transactions during the run; \
                 their Postgres CPU is in the postgres row",
                self.run.other_transactions
            ));
        }
        lines
    }
}

/// The open-loop run at half the system's orders/s.
#[derive(Debug, Clone)]
pub struct Open {
    pub rate: u64,
    pub seconds: u64,
    pub concurrency: u64,
    /// `None` when the stress test wrote no report.
    pub report: Option<StressReport>,
    /// The stress test's exit status.
    pub status: i32,
}

impl Open {
    /// Half the system's orders/s, at least 1.
    pub fn rate_for(orders_per_second: f64) -> u64 {
        let rate = if orders_per_second < 2.0 { 1.0 } else { orders_per_second / 2.0 };
        fixed(rate, 0) as u64
    }

    /// The goal: e2e lag p99 under 50 ms at half the peak.
    pub fn goal(&self) -> &'static str {
        match self.report.as_ref().and_then(|report| report.e2e_lag_ms.p99) {
            Some(p99) if p99 < 50.0 => "met",
            Some(_) => "missed",
            None => "unknown",
        }
    }

    /// The line before the run.
    pub fn heading(&self, orders_per_second: f64) -> String {
        format!(
            "== open loop: {} orders/s (half of {orders_per_second:.0}) for {} s, at most {} in flight",
            self.rate, self.seconds, self.concurrency
        )
    }

    /// The rows after it.
    pub fn lines(&self) -> Vec<String> {
        let report = self.report.as_ref();
        let latency = |pick: fn(&Latency) -> f64| dash(report.map(|r| pick(&r.latency_ms)));
        let lag = |pick: fn(&Lag) -> Option<f64>| dash(report.and_then(|r| pick(&r.e2e_lag_ms)));
        vec![
            row(
                "sent at",
                &format!("{:.1}", report.map_or(0.0, |r| r.throughput_rps)),
                &format!("orders/s  ({} accepted)", dash(report.map(|r| r.ok))),
            ),
            row(
                "HTTP latency p50 / p99",
                &format!("{} / {}", latency(|l| l.p50), latency(|l| l.p99)),
                "ms",
            ),
            row(
                "e2e lag p50 / p99",
                &format!("{} / {}", lag(|l| l.p50), lag(|l| l.p99)),
                &format!("ms  (goal: p99 < 50 ms: {})", self.goal()),
            ),
        ]
    }
}

/// Where and when the run was made.
#[derive(Debug, Clone)]
pub struct Meta {
    pub commit: String,
    pub dirty: bool,
    /// UTC, RFC 3339 to the second.
    pub date: String,
    pub cores: usize,
}

/// A run of the whole system that failed, which ended the benchmark.
pub struct Failed {
    pub concurrency: u64,
    pub error: anyhow::Error,
}

/// `result.json`, the keys as scripts/bench-e2e.sh always wrote them; `failed`
/// when a run failed after `runs`.
pub fn result_json(
    meta: &Meta,
    ceiling: &Ceiling,
    pipeline: &PipelineCeiling,
    runs: &[(System, Open)],
    failed: Option<&Failed>,
) -> Value {
    json!({
        "commit": meta.commit,
        "dirty": meta.dirty,
        "date": meta.date,
        "cores": meta.cores,
        "ceiling_tps": ceiling.pgbench.tps,
        "ceiling_postgres_cpu_ms_per_transaction": ceiling.postgres_cpu_ms,
        "ceiling_other_processes_cores": ceiling.other_cores,
        "pgbench_clients": ceiling.clients,
        "pgbench_seconds": ceiling.seconds,
        "pipeline_ceiling_command": pipeline.command,
        "pipeline_ceiling_orders_per_second": pipeline.orders_per_second,
        "pipeline_ceiling_cpu_ms_per_order": pipeline.cpu_ms_per_order,
        "runs": runs.iter().map(|(system, open)| run_json(system, open)).collect::<Vec<_>>(),
        "failed": failed.map(|failed| json!({
            "concurrency": failed.concurrency,
            "error": format!("{:#}", failed.error),
        })),
    })
}

/// One concurrency's figures in result.json.
fn run_json(system: &System, open: &Open) -> Value {
    let run = &system.run;
    let report = &run.report;
    let cpu = &system.cpu;
    let open_report = open.report.as_ref();
    json!({
        "orders": run.orders,
        "concurrency": run.concurrency,
        "ok": report.ok,
        "elapsed_seconds": report.elapsed_seconds,
        "converge_seconds": report.converge_seconds,
        "system_orders_per_second": fixed(system.orders_per_second, 1),
        "system_over_ceiling": system.over_ceiling,
        "system_over_pipeline_ceiling": system.over_pipeline,
        "pipeline_goal": pipeline_goal(run.concurrency),
        "cpu_over_pipeline_ceiling": system.cpu_over_pipeline,
        "cpu_over_pipeline_ceiling_goal": cpu_ratio_goal(run.concurrency),
        "latency_ms": { "p50": report.latency_ms.p50, "p99": report.latency_ms.p99 },
        "e2e_lag_ms": { "p50": report.e2e_lag_ms.p50, "p99": report.e2e_lag_ms.p99 },
        "cpu_ms_per_order": {
            "postgres": cpu.postgres,
            (run.broker.replace(' ', "_")): cpu.rabbitmq,
            "order_service": cpu.order_service,
            "inventory_consumer": cpu.inventory_consumer,
            "load_generator": cpu.load_generator,
            "total": cpu.total,
            "other_processes": cpu.other_processes,
        },
        "machine_busy_percent": system.machine_busy_percent,
        "other_processes_cores": system.other_cores,
        "other_database_transactions": run.other_transactions,
        "orders_hot_update_percent": run.hot_percent.as_deref().and_then(|p| p.parse::<f64>().ok()),
        "batch_sizes": run.batches.json(),
        "open_loop": {
            "rate": open.rate,
            "seconds": open.seconds,
            "concurrency": open.concurrency,
            "ok": open_report.map(|r| r.ok),
            "throughput_rps": open_report.map(|r| r.throughput_rps),
            "latency_ms": {
                "p50": open_report.map(|r| r.latency_ms.p50),
                "p99": open_report.map(|r| r.latency_ms.p99),
            },
            "e2e_lag_ms": {
                "p50": open_report.and_then(|r| r.e2e_lag_ms.p50),
                "p99": open_report.and_then(|r| r.e2e_lag_ms.p99),
            },
            "goal_lag_p99_under_50ms": open.goal(),
            "stress_test_status": open.status,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PGBENCH_15: &str = "\
pgbench (15.8 (Debian 15.8-0+deb12u1))
transaction type: bench/e2e/order.pgbench
scaling factor: 1
query mode: prepared
number of clients: 16
number of threads: 2
maximum number of tries: 1
duration: 20 s
number of transactions actually processed: 45558
number of failed transactions: 0 (0.000%)
latency average = 7.024 ms
initial connection time = 21.383 ms
tps = 2277.912345 (without initial connection time)
";

    /// 100 ticks a second, 2 cores.
    const CLOCK: Clock = Clock { ticks_per_second: 100, cores: 2 };

    fn report(ok: u64, lag_p99: Option<f64>) -> StressReport {
        serde_json::from_value(json!({
            "sent": ok, "ok": ok, "elapsed_seconds": 7.72, "throughput_rps": 2590.7,
            "converge_seconds": 0.03,
            "latency_ms": { "p50": 12.095, "p90": 20.0, "p99": 24.207, "p999": 30.0, "max": 31.0 },
            "e2e_lag_ms": { "count": ok, "p50": 20.751, "p99": lag_p99, "max": 90.0 },
        }))
        .unwrap()
    }

    fn ceiling() -> Ceiling {
        let pgbench = Pgbench::parse(PGBENCH_15).unwrap();
        // 20 s on 2 cores = 4000 ticks, 3500 busy: Postgres 2862, pgbench 300.
        let machine = MachineTicks { busy: 3500, total: 4000 };
        Ceiling::new(16, 20, pgbench, Some(2862), machine, 300, CLOCK)
    }

    fn system() -> System {
        let run = ClosedRun {
            orders: 20000,
            concurrency: 32,
            report: report(20000, Some(57.759)),
            // 628 ticks over 20000 orders at 100 ticks/s = 0.314 ms an order.
            component_ticks: [Some(628), Some(360), Some(254), Some(138)],
            load_ticks: 88,
            // 7.75 s on 2 cores = 1550 ticks, 1550 busy of them.
            machine: MachineTicks { busy: 1550, total: 1550 },
            hot_percent: Some("99.5".to_owned()),
            other_transactions: 3,
            broker: "rabbitmq",
            batches: BatchSizes::default(),
        };
        System::new(run, ceiling().pgbench.tps, &pipeline(), CLOCK).unwrap()
    }

    fn pipeline() -> PipelineCeiling {
        PipelineCeiling {
            command: "../shared/perf/pipeline-ceiling.sh 4 8".to_owned(),
            orders_per_second: Some(12482.0),
            // 1.90 cores busy at 12482 orders/s.
            cpu_ms_per_order: Some(0.1522),
        }
    }

    fn unmeasured() -> PipelineCeiling {
        PipelineCeiling {
            command: "no ../shared/perf/pipeline-ceiling.sh".to_owned(),
            orders_per_second: None,
            cpu_ms_per_order: None,
        }
    }

    const METRICS_BEFORE: &str = "\
# HELP order_write_batch_size Orders written per database transaction (group commit).
# TYPE order_write_batch_size histogram
order_write_batch_size_sum 10.0
order_write_batch_size_count 10
order_write_batch_size_bucket{le=\"1.0\"} 10
order_write_batch_size_bucket{le=\"2.0\"} 10
order_write_batch_size_bucket{le=\"4.0\"} 10
order_write_batch_size_bucket{le=\"+Inf\"} 10
# EOF
";
    const METRICS_AFTER: &str = "\
order_write_batch_size_sum 40.0
order_write_batch_size_count 20
order_write_batch_size_bucket{le=\"1.0\"} 12
order_write_batch_size_bucket{le=\"2.0\"} 14
order_write_batch_size_bucket{le=\"4.0\"} 19
order_write_batch_size_bucket{le=\"+Inf\"} 20
";

    #[test]
    fn the_pipeline_goal_depends_on_the_requests_in_flight() {
        assert_eq!(pipeline_goal(128), Some(0.40));
        assert_eq!(pipeline_goal(256), Some(0.40));
        assert_eq!(pipeline_goal(32), Some(0.25));
        assert_eq!(pipeline_goal(16), None);
    }

    #[test]
    fn batch_sizes_are_what_the_run_added_to_the_histograms() {
        let before = Batches::parse(METRICS_BEFORE, "order_write_batch_size").unwrap();
        assert_eq!(before.count, 10);
        assert_eq!(before.buckets.last(), Some(&(f64::INFINITY, 10)));
        assert_eq!(Batches::parse(METRICS_BEFORE, "inventory_batch_size"), None);
        let run = Batches::parse(METRICS_AFTER, "order_write_batch_size").unwrap().since(&before);
        // 10 batches of 30 orders: 2 of 1, 2 of 2, 5 of up to 4, 1 larger.
        assert_eq!((run.count, run.sum), (10, 30.0));
        assert_eq!(run.line(), "3.0 mean of 10 | <=1 20% | <=2 20% | <=4 50% | more 10%");
        assert_eq!(Batches::default().line(), "- (no batch)");
        let sizes = BatchSizes { write: Some(run), ..BatchSizes::default() };
        assert_eq!(
            sizes.lines()[1],
            "    write, orders a transaction      3.0 mean of 10 | <=1 20% | <=2 20% | <=4 50% | more 10%"
        );
        assert_eq!(
            sizes.json(),
            json!({"write": {"mean": 3.0, "batches": 10}, "relay": null, "consumer": null})
        );
    }

    #[test]
    fn the_pipeline_ceiling_is_its_scripts_last_line() {
        let output = "clients=4 batch=64 tps=114.69 orders/s=7340 busy_cores=1.67\n\
                      clients=8 batch=64 tps=195.04 orders/s=12482 busy_cores=1.90\n\
                      pipeline_ceiling=12482\n";
        assert_eq!(PipelineCeiling::parse(output), Some(12482.0));
        assert_eq!(PipelineCeiling::parse("pipeline_ceiling=0\n"), None);
        assert_eq!(PipelineCeiling::parse("psql: error: connection refused\n"), None);
        // The CPU of the line that made the ceiling, not the first line's.
        let cpu = PipelineCeiling::parse_cpu(output).unwrap();
        assert!((cpu - 1.90 * 1000.0 / 12482.0).abs() < 1e-9, "{cpu}");
        assert_eq!(
            PipelineCeiling::parse_cpu("clients=4 orders/s=7340\npipeline_ceiling=7340\n"),
            None
        );
        assert_eq!(PipelineCeiling::parse_cpu("busy_cores=1.9\n"), None);
    }

    #[test]
    fn the_cpu_goal_scales_with_the_pipeline_ceilings_cpu() {
        assert_eq!(cpu_goal(128), Some(0.30));
        assert_eq!(cpu_goal(32), None);
        // 0.30 ms against the 0.116 ms a pipeline order took where it was set.
        assert_eq!(cpu_ratio_goal(128), Some(2.58));
        assert_eq!(cpu_ratio_goal(32), None);
        // 0.734 ms against the ceiling's 0.1522 ms.
        assert_eq!(system().cpu_over_pipeline, Some(4.82));
    }

    #[test]
    fn pgbench_output_of_each_postgres_version_parses() {
        let parsed = Pgbench::parse(PGBENCH_15).unwrap();
        assert_eq!(
            parsed,
            Pgbench { tps: 2277.912345, latency: Some("7.024".into()), transactions: Some(45558) }
        );
        let old = "tps = 812.5 (including connections establishing)\n\
                   tps = 815.25 (excluding connections establishing)\n";
        assert_eq!(Pgbench::parse(old).unwrap().tps, 815.25);
        assert_eq!(Pgbench::parse("pgbench: error: connection failed\n"), None);
    }

    #[test]
    fn the_ceiling_per_transaction_and_the_cores_others_used() {
        let ceiling = ceiling();
        // 2862 ticks = 28.62 s over 45558 transactions.
        assert_eq!(ceiling.postgres_cpu_ms, Some(0.628));
        // (3500 - 2862 - 300) / 4000 of 2 cores.
        assert_eq!(ceiling.other_cores, Some(0.17));
        assert_eq!(
            ceiling.line(2),
            "   2277.9 tps, latency average 7.024 ms, postgres CPU 0.628 ms a transaction, \
             other processes 0.17 of 2 cores"
        );
        let unmeasured = Ceiling::new(
            16,
            20,
            Pgbench { latency: None, ..ceiling.pgbench.clone() },
            None,
            MachineTicks::default(),
            0,
            CLOCK,
        );
        assert_eq!(
            unmeasured.line(2),
            "   2277.9 tps, latency average ? ms, postgres CPU - ms a transaction, \
             other processes - of 2 cores"
        );
    }

    #[test]
    fn the_system_per_order_and_against_the_ceiling() {
        let system = system();
        assert!((system.orders_per_second - 20000.0 / 7.75).abs() < 1e-9);
        assert_eq!(system.over_ceiling, 1.13);
        assert_eq!(
            system.cpu,
            CpuPerOrder {
                postgres: Some(0.314),
                rabbitmq: Some(0.18),
                order_service: Some(0.127),
                inventory_consumer: Some(0.069),
                load_generator: 0.044,
                total: 0.734,
                // 1550 ticks = 0.775 ms an order, less the 0.734 counted.
                other_processes: 0.041,
            }
        );
        assert_eq!(system.machine_busy_percent, 100);
        // 0.041 ms x 20000 = 0.82 s of the 7.75 s.
        assert_eq!(system.other_cores, 0.11);
    }

    #[test]
    fn the_result_table_is_the_one_the_docs_quote() {
        let expected = [
            "== result",
            "  ceiling (pgbench, frozen 1-order txn, 16 clients)              2277.9 tps  (postgres CPU 0.628 ms a transaction; other processes 0.17 cores)",
            "  system (20000 orders, 32 in flight)                            2580.6 orders/s  (20000 in 7.72 s + 0.03 s to decide the last)",
            "  system / ceiling                                                1.13x",
            "  pipeline ceiling (best of its client counts)                    12482 orders/s  (../shared/perf/pipeline-ceiling.sh 4 8)",
            "  system / pipeline ceiling                                       0.21x (goal >= 0.25x: missed)",
            "  HTTP latency p50 / p99                                12.095 / 24.207 ms",
            "  e2e lag p50 / p99                                     20.751 / 57.759 ms",
            "  CPU per order",
            "    postgres                                                      0.314 ms",
            "    rabbitmq                                                      0.180 ms",
            "    order-service                                                 0.127 ms",
            "    inventory-consumer                                            0.069 ms",
            "    load generator (stress-test)                                  0.044 ms",
            "    total                                                         0.734 ms",
            "    total / the pipeline ceiling's                                4.82x (the ceiling's 0.152 ms an order)",
            "    other processes on the machine (not counted)                  0.041 ms  (0.11 cores; the machine 100% busy of 2)",
            "  orders status updates that were HOT                              99.5 %",
            "  batch sizes reached (mean, batches, share of batches by size)",
            "    write, orders a transaction      -",
            "    relay, events a claim            -",
            "    consumer, messages a transaction -",
        ];
        assert_eq!(system().lines(&ceiling(), &pipeline(), 2), expected);
        let mut fast = system();
        fast.over_pipeline = Some(0.4);
        fast.run.concurrency = 128;
        assert!(fast.lines(&ceiling(), &pipeline(), 2).contains(&row(
            "system / pipeline ceiling",
            "0.40x",
            "(goal >= 0.40x: met)"
        )));
        fast.cpu_over_pipeline = Some(2.5);
        assert!(fast.lines(&ceiling(), &pipeline(), 2).contains(&row(
            "  total / the pipeline ceiling's",
            "2.50x",
            "(the ceiling's 0.152 ms an order; goal <= 2.58x, the 0.30 ms goal on its machine: met)"
        )));
    }

    #[test]
    fn unmeasured_components_show_as_a_dash_and_busy_other_databases_as_a_note() {
        let mut system = system();
        system.run.component_ticks[1] = None;
        system.run.hot_percent = None;
        system.run.other_transactions = 11;
        system.run.report.e2e_lag_ms = Lag { p50: None, p99: None };
        let system = System::new(system.run, 2277.9, &unmeasured(), CLOCK).unwrap();
        assert_eq!(system.cpu.rabbitmq, None);
        assert_eq!(system.cpu.total, 0.554); // the rest still adds up
        assert_eq!(system.cpu_over_pipeline, None);
        let lines = system.lines(&ceiling(), &unmeasured(), 2);
        assert!(lines.contains(&row(
            "pipeline ceiling (best of its client counts)",
            "-",
            "orders/s  (no ../shared/perf/pipeline-ceiling.sh)"
        )));
        assert!(lines.contains(&row("system / pipeline ceiling", "-", "(not measured)")));
        assert!(lines.contains(&row("  total / the pipeline ceiling's", "-", "(not measured)")));
        assert!(lines.contains(&row("e2e lag p50 / p99", "- / -", "ms")));
        assert!(lines.contains(&row("  rabbitmq", "-", "ms")));
        assert!(lines.contains(&row("orders status updates that were HOT", "-", "%")));
        assert_eq!(
            lines.last().unwrap(),
            "  note: other databases committed 11 transactions during the run; \
             their Postgres CPU is in the postgres row"
        );
    }

    #[test]
    fn a_run_that_accepted_nothing_or_did_not_wait_has_no_figures() {
        let mut run = system().run;
        run.report = report(0, None);
        assert!(System::new(run.clone(), 100.0, &unmeasured(), CLOCK).is_err());
        run.report = StressReport { converge_seconds: None, ..report(10, None) };
        assert!(System::new(run, 100.0, &unmeasured(), CLOCK).is_err());
    }

    #[test]
    fn the_open_loop_at_half_the_rate_and_its_goal() {
        assert_eq!(Open::rate_for(2580.6), 1290);
        assert_eq!(Open::rate_for(1.5), 1);
        let open = |lag_p99| Open {
            rate: 1290,
            seconds: 20,
            concurrency: 64,
            report: Some(report(25800, lag_p99)),
            status: 0,
        };
        assert_eq!(
            open(Some(27.279)).heading(2579.3),
            "== open loop: 1290 orders/s (half of 2579) for 20 s, at most 64 in flight"
        );
        assert_eq!(
            open(Some(27.279)).lines(),
            [
                "  sent at                                                        2590.7 orders/s  (25800 accepted)",
                "  HTTP latency p50 / p99                                12.095 / 24.207 ms",
                "  e2e lag p50 / p99                                     20.751 / 27.279 ms  (goal: p99 < 50 ms: met)",
            ]
        );
        assert_eq!(open(Some(50.0)).goal(), "missed");
        assert_eq!(open(None).goal(), "unknown");
        let failed = Open { report: None, status: 1, ..open(None) };
        assert_eq!(
            failed.lines(),
            [
                row("sent at", "0.0", "orders/s  (- accepted)"),
                row("HTTP latency p50 / p99", "- / -", "ms"),
                row("e2e lag p50 / p99", "- / -", "ms  (goal: p99 < 50 ms: unknown)"),
            ]
        );
    }

    #[test]
    fn result_json_keeps_the_keys_and_numbers() {
        let meta = Meta {
            commit: "41ac1b3".into(),
            dirty: false,
            date: "2026-12-06T10:00:00Z".into(),
            cores: 2,
        };
        let open = Open { rate: 1290, seconds: 20, concurrency: 64, report: None, status: 1 };
        let json = result_json(&meta, &ceiling(), &pipeline(), &[(system(), open.clone())], None);
        assert_eq!(json["failed"], Value::Null);
        let failed = Failed { concurrency: 128, error: anyhow::anyhow!("no order was accepted") };
        let partial =
            result_json(&meta, &ceiling(), &pipeline(), &[(system(), open)], Some(&failed));
        assert_eq!(partial["runs"].as_array().map(Vec::len), Some(1));
        assert_eq!(
            partial["failed"],
            json!({"concurrency": 128, "error": "no order was accepted"})
        );
        assert_eq!(json["ceiling_tps"], json!(2277.912345));
        assert_eq!(json["pipeline_ceiling_orders_per_second"], json!(12482.0));
        let run = &json["runs"][0];
        assert_eq!(run["concurrency"], json!(32));
        assert_eq!(run["system_orders_per_second"], json!(2580.6));
        assert_eq!(run["system_over_ceiling"], json!(1.13));
        assert_eq!(run["system_over_pipeline_ceiling"], json!(0.21));
        assert_eq!(run["pipeline_goal"], json!(0.25));
        assert_eq!(run["cpu_over_pipeline_ceiling"], json!(4.82));
        assert_eq!(run["cpu_over_pipeline_ceiling_goal"], Value::Null);
        assert_eq!(json["pipeline_ceiling_cpu_ms_per_order"], json!(0.1522));
        assert_eq!(run["cpu_ms_per_order"]["total"], json!(0.734));
        assert_eq!(run["machine_busy_percent"].to_string(), "100");
        assert_eq!(run["orders_hot_update_percent"], json!(99.5));
        assert_eq!(run["open_loop"]["ok"], Value::Null);
        assert_eq!(run["open_loop"]["goal_lag_p99_under_50ms"], json!("unknown"));
        assert_eq!(run["open_loop"]["stress_test_status"], json!(1));
        let keys_of = |value: &Value| {
            let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
            keys.sort_unstable();
            keys
        };
        let sorted = |keys: &[&str]| {
            let mut keys: Vec<String> = keys.iter().map(|key| (*key).to_owned()).collect();
            keys.sort_unstable();
            keys
        };
        assert_eq!(
            keys_of(&json),
            sorted(&[
                "commit",
                "dirty",
                "date",
                "cores",
                "ceiling_tps",
                "ceiling_postgres_cpu_ms_per_transaction",
                "ceiling_other_processes_cores",
                "pgbench_clients",
                "pgbench_seconds",
                "pipeline_ceiling_command",
                "pipeline_ceiling_cpu_ms_per_order",
                "pipeline_ceiling_orders_per_second",
                "runs",
                "failed",
            ])
        );
        assert_eq!(
            keys_of(run),
            sorted(&[
                "orders",
                "concurrency",
                "ok",
                "elapsed_seconds",
                "converge_seconds",
                "system_orders_per_second",
                "system_over_ceiling",
                "system_over_pipeline_ceiling",
                "pipeline_goal",
                "cpu_over_pipeline_ceiling",
                "cpu_over_pipeline_ceiling_goal",
                "latency_ms",
                "e2e_lag_ms",
                "cpu_ms_per_order",
                "machine_busy_percent",
                "other_processes_cores",
                "other_database_transactions",
                "orders_hot_update_percent",
                "batch_sizes",
                "open_loop",
            ])
        );
    }

    #[test]
    fn the_summary_has_a_row_for_each_concurrency_with_its_goals() {
        let at_32 = system();
        let mut at_128 = system();
        at_128.run.concurrency = 128;
        at_128.over_pipeline = Some(0.41);
        let mut at_256 = system();
        at_256.run.concurrency = 256;
        at_256.cpu_over_pipeline = Some(2.3);
        let open = |p99: f64| Open {
            rate: 1290,
            seconds: 20,
            concurrency: 64,
            report: Some(report(20000, Some(p99))),
            status: 0,
        };
        let lines = summary(&[(at_32, open(23.5)), (at_128, open(57.759)), (at_256, open(20.0))]);
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(lines[2].trim_start().starts_with("32"), "{}", lines[2]);
        assert!(lines[2].contains("0.21x (>= 0.25x: missed)"), "{}", lines[2]);
        assert!(lines[2].contains("0.734  "), "no CPU goal below 128: {}", lines[2]);
        assert!(lines[2].contains("4.82x  "), "no CPU goal below 128: {}", lines[2]);
        assert!(lines[2].ends_with("23.5 ms (< 50 ms: met)"), "{}", lines[2]);
        assert!(lines[3].contains("0.41x (>= 0.40x: met)"), "{}", lines[3]);
        assert!(lines[3].contains("0.734 (<= 0.30: missed)"), "{}", lines[3]);
        assert!(lines[3].contains("4.82x (<= 2.58x: missed)"), "{}", lines[3]);
        assert!(lines[4].contains("2.30x (<= 2.58x: met)"), "{}", lines[4]);
        assert!(lines[3].ends_with("57.759 ms (< 50 ms: missed)"), "{}", lines[3]);
    }
}
