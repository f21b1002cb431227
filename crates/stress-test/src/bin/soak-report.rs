//! `soak-report`: the Rust half of `scripts/soak.sh`. The script runs the load
//! and samples the system; this binary keeps the record (`row`: one CSV line a
//! minute, printed as a table line), and judges and draws it (`verdict`). The
//! rules live here rather than in shell so that they are unit-tested.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use stress_test::Report;
use stress_test::soak::{self, Row, Sample, verdict};

/// Keeps and judges the record of a soak run (scripts/soak.sh).
#[derive(Debug, Parser)]
#[command(
    name = "soak-report",
    version,
    after_help = "\
`soak-report verdict --help` gives the pass rule.

Exit status: 0 when the command did its work (for `verdict`: the run passed); 1 when \
`verdict` found the run failed; 2 when the input could not be read or the output not written."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Appends one minute's row to the CSV and prints it as a table line (with the
    /// table header first when the CSV is new).
    Row(RowArgs),
    /// Reads the CSV, draws the chart, prints the verdict; exits 1 if the run failed.
    #[command(after_help = verdict_help())]
    Verdict(VerdictArgs),
}

#[derive(Debug, Args)]
struct RowArgs {
    /// The CSV to append to; created with its header if missing or empty.
    #[arg(long)]
    csv: PathBuf,
    /// The minute of load this row is for, from 1.
    #[arg(long)]
    minute: u32,
    /// The stress-test `--json` report of that minute.
    #[arg(long)]
    report: PathBuf,
    /// Seconds since the soak started.
    #[arg(long, default_value_t = 0.0)]
    elapsed_seconds: f64,
    /// Events waiting in the outbox (state 'pending').
    #[arg(long)]
    outbox_pending: u64,
    /// `n_dead_tup` of the outbox table (pg_stat_user_tables).
    #[arg(long)]
    outbox_dead_tuples: u64,
    /// Rows in `orders`.
    #[arg(long)]
    orders: u64,
    /// Rows in `processed_messages`.
    #[arg(long)]
    processed_messages: u64,
    /// Rows in `idempotency_keys`.
    #[arg(long)]
    idempotency_keys: u64,
    /// Rows in `outbox`, pending and dead.
    #[arg(long)]
    outbox_rows: u64,
    /// VmRSS of order-service in KiB, from /proc/PID/status; omit if unknown.
    #[arg(long)]
    order_service_rss_kib: Option<u64>,
    /// VmRSS of inventory-consumer in KiB; omit if unknown.
    #[arg(long)]
    inventory_consumer_rss_kib: Option<u64>,
}

#[derive(Debug, Args)]
struct VerdictArgs {
    /// The CSV written by `soak-report row`.
    #[arg(long)]
    csv: PathBuf,
    /// Where to write the SVG chart; no chart without it.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// The chart's title; the verdict (passed / FAILED) is appended.
    #[arg(long, default_value = "soak run")]
    title: String,
    /// Print the table of every minute before the verdict.
    #[arg(long)]
    table: bool,
}

fn verdict_help() -> String {
    use verdict::*;
    format!(
        "\
The run passes when every criterion does; one that cannot be judged (too few minutes, a \
figure missing) fails:
  no errors                 every request answered 2xx, every minute converged
  latency p99, e2e lag p99  median of the minute p99s over the last {w} minutes at most \
{STABILITY_FACTOR}x (or +{STABILITY_SLACK_MS} ms) that of the first {w} (the last and first \
halves when the run is under {two} minutes)
  <table> bounded           processed_messages and idempotency_keys: the largest count in \
the last third of the run at most {BOUNDED_FACTOR}x the largest in the middle third (needs 3 \
minutes)
  RSS <service>             growth under {rss:.0} % from minute {base} (after {WARM_UP_MINUTES} \
minutes of warm-up; earlier in shorter runs) to the last minute",
        w = STABILITY_WINDOW_MINUTES,
        two = 2 * STABILITY_WINDOW_MINUTES,
        rss = RSS_GROWTH_LIMIT * 100.0,
        base = WARM_UP_MINUTES + 1,
    )
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().command {
        Command::Row(args) => append_row(&args).map(|()| true),
        Command::Verdict(args) => judge(&args),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("soak-report: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn append_row(args: &RowArgs) -> anyhow::Result<()> {
    let text = fs::read_to_string(&args.report)
        .with_context(|| format!("cannot read the report {}", args.report.display()))?;
    let report: Report = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a stress-test --json report", args.report.display()))?;
    let sample = Sample {
        elapsed_s: args.elapsed_seconds,
        outbox_pending: args.outbox_pending,
        outbox_dead_tuples: args.outbox_dead_tuples,
        orders: args.orders,
        processed_messages: args.processed_messages,
        idempotency_keys: args.idempotency_keys,
        outbox_rows: args.outbox_rows,
        order_service_rss_kib: args.order_service_rss_kib,
        inventory_consumer_rss_kib: args.inventory_consumer_rss_kib,
    };
    let row = Row::new(args.minute, &report, &sample);

    let new = fs::metadata(&args.csv).map(|metadata| metadata.len() == 0).unwrap_or(true);
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.csv)
        .with_context(|| format!("cannot open {}", args.csv.display()))?;
    let mut lines = String::new();
    if new {
        lines.push_str(&Row::csv_header());
        lines.push('\n');
        println!("{}", Row::table_header());
    }
    lines.push_str(&row.to_csv());
    lines.push('\n');
    file.write_all(lines.as_bytes())
        .with_context(|| format!("cannot write to {}", args.csv.display()))?;
    println!("{}", row.table_line());
    Ok(())
}

/// Ok(passed), or an error when the CSV or the chart could not be handled.
fn judge(args: &VerdictArgs) -> anyhow::Result<bool> {
    let text = fs::read_to_string(&args.csv)
        .with_context(|| format!("cannot read {}", args.csv.display()))?;
    let rows = soak::parse_csv(&text).with_context(|| format!("in {}", args.csv.display()))?;
    if args.table {
        println!("{}", Row::table_header());
        for row in &rows {
            println!("{}", row.table_line());
        }
    }
    let verdict = verdict::judge(&rows);
    if let Some(path) = &args.chart {
        let outcome = if verdict.passed() { "passed" } else { "FAILED" };
        let title = format!("{}: {outcome}", args.title);
        write_chart(path, &rows, &title)?;
        println!("chart: {}", path.display());
    }
    print!("{verdict}");
    Ok(verdict.passed())
}

fn write_chart(path: &Path, rows: &[Row], title: &str) -> anyhow::Result<()> {
    let svg = soak::chart::svg(rows, title)?;
    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))
}
