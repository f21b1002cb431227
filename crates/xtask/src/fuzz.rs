//! `cargo xtask fuzz-api`: property-based fuzzing of order-service from its
//! own OpenAPI document, with schemathesis (installed from PyPI into
//! `.venv-fuzz`, a virtualenv of this checkout). Runs an order-service (debug
//! build, no relay) on a fresh database `outbox_fuzz`, then:
//!
//! 1. negative mode: only requests the document says are invalid. Every answer
//!    must be a documented 4xx of the documented shape, and afterwards no
//!    order, line, event or key may exist: a rejected request writes nothing;
//! 2. all modes, every check but `positive_data_acceptance` (a request can
//!    match the schema and still be refused: a SKU not in the catalogue, a
//!    repeated SKU, an Idempotency-Key reused with another body): no 5xx,
//!    responses and headers conform to the document, wrong methods get 405.
//!
//! Prints how many requests each phase generated; fails on any failure.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::{Connection, PgConnection};

use crate::process::{Local, Service, bin_dir, free_port, until_signal};

const SCHEMATHESIS_VERSION: &str = "4.32.5";
const VENV: &str = ".venv-fuzz";
const RUN_DIR: &str = ".run/fuzz";
/// The admin token of the order-service under test.
const ADMIN_TOKEN: &str = "fuzz-admin-token";

/// The settings of `cargo xtask fuzz-api` (scripts/fuzz-api.sh).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Examples per operation and phase.
    #[arg(long, env = "FUZZ_EXAMPLES", default_value_t = 300)]
    examples: u32,
    /// Seconds per phase.
    #[arg(long, env = "FUZZ_MAX_TIME", default_value_t = 60)]
    max_time: u32,
    /// Where the order-service under test listens (127.0.0.1) [default: a
    /// free port].
    #[arg(long, env = "FUZZ_PORT")]
    port: Option<u16>,
}

pub async fn run(args: Args) -> anyhow::Result<bool> {
    let local = Local::from_env();
    let run_dir = PathBuf::from(RUN_DIR);
    std::fs::create_dir_all(&run_dir)?;
    let schemathesis = install_schemathesis().await?;

    crate::process::build_services(false, true).await?;
    let mut admin = PgConnection::connect(&local.database_url("postgres")).await?;
    sqlx::raw_sql("DROP DATABASE IF EXISTS outbox_fuzz WITH (FORCE)")
        .execute(&mut admin)
        .await
        .context("cannot drop the database outbox_fuzz")?;
    let _ = admin.close().await;

    let port = match args.port {
        Some(port) if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() => {
            bail!("port {port} is taken (FUZZ_PORT)")
        }
        Some(port) => port,
        None => free_port()?,
    };
    let env = vec![
        ("DATABASE_URL".to_owned(), local.database_url("outbox_fuzz")),
        ("RELAY_WORKERS".to_owned(), "0".to_owned()),
        ("RUST_LOG".to_owned(), "warn".to_owned()),
        // The admin API is on, so that it is fuzzed too: with the token
        // (every request carries it) and, in the coverage phase, without it.
        ("ADMIN_TOKEN".to_owned(), ADMIN_TOKEN.to_owned()),
    ];
    let mut api = Service::new("order-service", &bin_dir("debug"), port, env, &run_dir);
    let _ = std::fs::remove_file(api.log());
    api.start()?;
    if let Err(error) = api.wait_ready(Duration::from_secs(30)).await {
        eprint!("{}", std::fs::read_to_string(api.log()).unwrap_or_default());
        return Err(error);
    }
    let fuzz = Fuzz {
        schemathesis,
        url: format!("{}/openapi.json", api.url),
        examples: args.examples,
        max_time: args.max_time,
    };
    let passed = until_signal(phases(&fuzz, &local)).await?;
    drop(api);
    Ok(passed)
}

async fn phases(fuzz: &Fuzz, local: &Local) -> anyhow::Result<bool> {
    let mut passed = true;
    println!("== fuzzing with invalid requests only");
    let checks = "not_a_server_error,negative_data_rejection,status_code_conformance,\
                  content_type_conformance,response_schema_conformance";
    let negative = fuzz
        .phase(
            "negative",
            &["--mode", "negative", "--phases", "coverage,fuzzing", "--checks", checks],
        )
        .await?;
    passed &= negative.passed;
    let written = rows_written(local).await?;
    if written == 0 {
        println!(">> no row written by the rejected requests");
    } else {
        println!(">> FAIL: the rejected requests wrote {written} rows");
        passed = false;
    }

    println!("== fuzzing with every kind of request");
    let all = fuzz
        .phase(
            "all",
            &["--mode", "all", "--checks", "all", "--exclude-checks", "positive_data_acceptance"],
        )
        .await?;
    passed &= all.passed;

    let requests = negative.generated.unwrap_or(0) + all.generated.unwrap_or(0);
    println!(
        "fuzz-api: {requests} requests generated; {}",
        if passed { "passed" } else { "FAILED" }
    );
    Ok(passed)
}

/// The schemathesis of `.venv-fuzz`, installed there unless it is already,
/// in its version.
async fn install_schemathesis() -> anyhow::Result<PathBuf> {
    let schemathesis = std::env::current_dir()?.join(VENV).join("bin/schemathesis");
    let version = tokio::process::Command::new(&schemathesis).arg("--version").output().await;
    if version.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(SCHEMATHESIS_VERSION))
    {
        return Ok(schemathesis);
    }
    println!("== installing schemathesis {SCHEMATHESIS_VERSION} into {VENV}");
    let steps: [(&str, Vec<String>); 2] = [
        ("python3", vec!["-m".into(), "venv".into(), VENV.into()]),
        (
            &format!("{VENV}/bin/pip"),
            vec!["install".into(), "-q".into(), format!("schemathesis=={SCHEMATHESIS_VERSION}")],
        ),
    ];
    for (program, args) in steps {
        let status = tokio::process::Command::new(program).args(&args).status().await;
        let status = status.with_context(|| format!("cannot run {program}"))?;
        if !status.success() {
            bail!("{program} {} failed ({status})", args.join(" "));
        }
    }
    Ok(schemathesis)
}

/// How each phase runs schemathesis.
struct Fuzz {
    schemathesis: PathBuf,
    /// The OpenAPI document of the order-service under test.
    url: String,
    examples: u32,
    max_time: u32,
}

/// What a phase did.
struct Phase {
    passed: bool,
    /// Requests schemathesis generated, if its summary says.
    generated: Option<u64>,
}

impl Fuzz {
    /// Runs schemathesis with `options`, its output to `.run/fuzz/<name>.txt`;
    /// prints its summary and the number of generated requests.
    async fn phase(&self, name: &str, options: &[&str]) -> anyhow::Result<Phase> {
        let report = Path::new(RUN_DIR).join(format!("{name}.txt"));
        let output = std::fs::File::create(&report)?;
        let status = tokio::process::Command::new(&self.schemathesis)
            .arg("run")
            .arg(&self.url)
            .args(["--max-examples", &self.examples.to_string()])
            .args(["--max-time", &self.max_time.to_string()])
            .args(["--seed", "20261124", "--generation-allow-x00", "true"])
            .args(["--generation-database", "none", "--no-color"])
            .args(["--header", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
            .args(options)
            .current_dir(RUN_DIR)
            .stdin(Stdio::null())
            .stdout(Stdio::from(output.try_clone()?))
            .stderr(Stdio::from(output))
            .kill_on_drop(true)
            .status()
            .await
            .with_context(|| format!("cannot run {}", self.schemathesis.display()))?;
        let text = std::fs::read_to_string(&report).unwrap_or_default();
        print!("{}", summary(&text));
        let generated = generated(&text);
        println!(
            ">> {name}: {} requests generated (details in {})",
            generated.map_or("?".to_owned(), |n| n.to_string()),
            report.display()
        );
        Ok(Phase { passed: status.success(), generated })
    }
}

/// What schemathesis printed from its SUMMARY line on, each line ended.
fn summary(output: &str) -> String {
    let lines = output.lines().skip_while(|line| !line.contains("SUMMARY"));
    lines.map(|line| format!("{line}\n")).collect()
}

/// The count of its last `<N> generated` line (`  1234 generated, 1234 passed`).
fn generated(output: &str) -> Option<u64> {
    output.lines().rev().find_map(|line| {
        let (count, rest) = line.trim_start().split_once(' ')?;
        if !rest.starts_with("generated") {
            return None;
        }
        count.parse().ok()
    })
}

/// Orders, lines, outbox events and idempotency keys in `outbox_fuzz`.
async fn rows_written(local: &Local) -> anyhow::Result<i64> {
    let mut db = PgConnection::connect(&local.database_url("outbox_fuzz")).await?;
    let rows = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM orders) + (SELECT count(*) FROM order_lines)
              + (SELECT count(*) FROM outbox) + (SELECT count(*) FROM idempotency_keys)",
    )
    .fetch_one(&mut db)
    .await
    .context("cannot count the rows of outbox_fuzz")?;
    let _ = db.close().await;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "\
Schemathesis v4.32.5
====================

 ✅  Coverage (in 1.02s)

     42 passed

===================== SUMMARY =====================

API Operations:
  Selected: 3/3
  Tested: 3

Test Phases:
  ✅ Coverage
  ✅ Fuzzing

Test cases:
  1234 generated, 1234 passed

===================== 1234 test cases in 30.00s =====================
";

    #[test]
    fn the_summary_is_what_follows_the_summary_line() {
        let summary = summary(OUTPUT);
        assert!(summary.starts_with("===================== SUMMARY"), "{summary}");
        assert!(summary.ends_with("in 30.00s =====================\n"), "{summary}");
        assert_eq!(summary.lines().count(), 14);
        assert_eq!(super::summary("no summary\n"), "");
    }

    #[test]
    fn the_generated_requests_are_the_last_generated_line() {
        assert_eq!(generated(OUTPUT), Some(1234));
        let twice =
            format!("  7 generated, 7 passed\n{OUTPUT}  99 generated, 98 passed, 1 failed\n");
        assert_eq!(generated(&twice), Some(99));
        assert_eq!(generated("Test cases:\n  none generated\n"), None);
        assert_eq!(generated(""), None);
    }
}
