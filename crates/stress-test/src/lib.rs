//! `stress-test`: places orders on the order API, measures how it answered, and
//! then follows the orders in the database until each is decided.
//!
//! The binary is a thin shell over [`run`], which returns a [`Report`]; tests run
//! the binary itself against an in-process order-service. The second binary,
//! `soak-report`, keeps and judges the record of `scripts/soak.sh` ([`soak`]).

mod config;
mod converge;
mod load;
mod report;
pub mod soak;

use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

pub use crate::config::{Config, DEFAULT_ORDERS, parse_duration};
pub use crate::report::{Lag, Latency, Report};

/// Runs the load, then (unless `--no-wait`) waits for convergence. `shutdown`
/// stops both early; the report then covers what was done.
///
/// Fails only when the run cannot start (the database is unreachable, the HTTP
/// client cannot be built): failed requests and a run that does not converge
/// are in the report.
pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<Report> {
    // Connected first, so that a wrong --database-url is found before the load.
    let db = match config.no_wait {
        true => None,
        false => Some(converge::connect(&config.database_url).await?),
    };

    let plan = load::Plan {
        url: config.url.clone(),
        limit: config.order_limit(),
        duration: config.duration,
        rate: config.rate,
        concurrency: config.concurrency,
        request_timeout: config.request_timeout,
        scarce_ratio: config.scarce_ratio,
        cancel_ratio: config.cancel_ratio,
        late_cancel_ratio: config.late_cancel_ratio,
        late_cancel_after: config.late_cancel_after,
        idempotency_keys: config.idempotency_keys,
        retries: config.retries,
    };
    let progress = match plan.limit {
        Some(limit) => {
            bar(config, limit, "{elapsed_precise} {wide_bar} {pos}/{len} orders, {per_sec} {msg}")
        }
        None => bar(config, 0, "{spinner} {elapsed_precise} {pos} orders, {per_sec} {msg}"),
    };
    let tally = load::run(&plan, progress.clone(), shutdown.clone()).await?;
    progress.finish_and_clear();

    let elapsed_seconds = tally.elapsed.as_secs_f64();
    let mut report = Report {
        sent: tally.sent,
        ok: tally.ok,
        client_errors: tally.client_errors,
        server_errors: tally.server_errors,
        transport_errors: tally.transport_errors,
        retries: tally.retries,
        cancels: tally.cancels,
        cancels_accepted: tally.cancelled.len() as u64,
        cancels_not_cancellable: tally.cancels_not_cancellable,
        unreadable_bodies: tally.unreadable_bodies,
        status_codes: tally.status_codes.iter().map(|(code, n)| (code.to_string(), *n)).collect(),
        elapsed_seconds,
        throughput_rps: if elapsed_seconds > 0.0 {
            tally.sent as f64 / elapsed_seconds
        } else {
            0.0
        },
        latency_ms: Latency::from_micros(&tally.latency),
        waited: false,
        converged: false,
        converge_seconds: None,
        e2e_lag_ms: Lag::from_micros(&load::micros_histogram()),
        status_counts: Default::default(),
        not_found: 0,
        interrupted: false,
        error_samples: tally.error_samples,
    };

    if let Some(db) = db {
        let total = tally.ids.len() as u64;
        let progress =
            bar(config, total, "{elapsed_precise} {wide_bar} {pos}/{len} orders decided");
        let convergence =
            converge::wait(&db, &tally.ids, &tally.cancelled, config.timeout, &progress, &shutdown)
                .await;
        progress.finish_and_clear();
        db.close().await;
        report.waited = true;
        report.converged = convergence.converged;
        report.converge_seconds = Some(convergence.waited.as_secs_f64());
        report.e2e_lag_ms = Lag::from_micros(&convergence.e2e_lag);
        report.status_counts = convergence.status_counts;
        report.not_found = convergence.not_found;
    }
    report.interrupted = shutdown.is_cancelled();
    Ok(report)
}

/// A progress bar on stderr; hidden with `--json`, and by indicatif itself when
/// stderr is not a terminal.
fn bar(config: &Config, length: u64, template: &str) -> ProgressBar {
    if config.json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(length);
    bar.set_style(ProgressStyle::with_template(template).expect("a valid progress template"));
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    bar
}
