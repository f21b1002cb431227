//! Convergence: waiting until the inventory consumer has decided every order
//! the load placed, then measuring how long each took end to end.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::load::micros_histogram;

/// How often the orders table is read while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// The statuses an order can have; each is reported, even when none has it.
const STATUSES: [&str; 4] = ["PENDING", "COMPLETED", "REJECTED", "CANCELLED"];

/// A small pool: the stress test reads, it must not compete with the services
/// for connections.
pub async fn connect(database_url: &str) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect(database_url)
        .await
        .with_context(|| format!("cannot connect to Postgres at {}", redact(database_url)))
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

pub struct Convergence {
    pub converged: bool,
    /// Time spent waiting: the time to converge when `converged`.
    pub waited: Duration,
    /// The orders by status, as last read.
    pub status_counts: BTreeMap<String, u64>,
    /// Orders answered 201 that the database does not hold (the wrong database,
    /// or a lost write).
    pub not_found: u64,
    /// Created to decided (`updated_at - created_at`), in microseconds, of the
    /// orders decided by the end of the wait.
    pub e2e_lag: Histogram<u64>,
}

/// Polls until no order of `ids` is PENDING or missing and each of `cancelled`
/// is CANCELLED, `timeout` passes or `shutdown` is cancelled.
pub async fn wait(
    db: &PgPool,
    ids: &[Uuid],
    cancelled: &[Uuid],
    timeout: Duration,
    progress: &ProgressBar,
    shutdown: &CancellationToken,
) -> Convergence {
    let start = Instant::now();
    let deadline = start + timeout;
    // Only orders not yet decided are read again: a decided order never goes
    // back to PENDING, so each poll is smaller than the last. An order whose
    // cancel was accepted is decided once CANCELLED.
    let cancelled: HashSet<Uuid> = cancelled.iter().copied().collect();
    let mut undecided: Vec<Uuid> = ids.to_vec();
    let mut decided: BTreeMap<String, u64> = BTreeMap::new();
    let mut pending = 0;
    let mut not_found = u64::try_from(undecided.len()).unwrap_or(u64::MAX);
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let converged = loop {
        match poll(db, &undecided).await {
            Ok(rows) => {
                let found = rows.len();
                let mut now_decided = HashSet::new();
                for (id, status) in rows {
                    if status != "PENDING" && (status == "CANCELLED" || !cancelled.contains(&id)) {
                        now_decided.insert(id);
                        *decided.entry(status).or_default() += 1;
                    }
                }
                undecided.retain(|id| !now_decided.contains(id));
                pending = (found - now_decided.len()) as u64;
                not_found = (undecided.len() - (found - now_decided.len())) as u64;
                progress.set_position((ids.len() - undecided.len()) as u64);
            }
            // Read again at the next tick: a blip must not end the wait early.
            Err(error) => {
                progress.suspend(|| eprintln!("stress-test: cannot read the orders: {error:#}"))
            }
        }
        if undecided.is_empty() {
            break true;
        }
        tokio::select! {
            _ = ticks.tick() => {}
            () = tokio::time::sleep_until(deadline) => break false,
            () = shutdown.cancelled() => break false,
        }
    };
    let waited = start.elapsed();

    let mut status_counts: BTreeMap<String, u64> =
        STATUSES.iter().map(|status| ((*status).to_owned(), 0)).collect();
    status_counts.insert("PENDING".to_owned(), pending);
    for (status, count) in decided {
        *status_counts.entry(status).or_default() += count;
    }
    let e2e_lag = match e2e_lag(db, ids).await {
        Ok(lag) => lag,
        Err(error) => {
            eprintln!("stress-test: cannot read the end-to-end lag: {error:#}");
            micros_histogram()
        }
    };
    Convergence { converged, waited, status_counts, not_found, e2e_lag }
}

/// The id and status of each order of `ids` that exists.
async fn poll(db: &PgPool, ids: &[Uuid]) -> anyhow::Result<Vec<(Uuid, String)>> {
    sqlx::query_as("SELECT id, status FROM orders WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(db)
        .await
        .context("cannot read the orders' statuses")
}

async fn e2e_lag(db: &PgPool, ids: &[Uuid]) -> anyhow::Result<Histogram<u64>> {
    // `updated_at` is set by the transaction that decided the order.
    let lags: Vec<(f64,)> = sqlx::query_as(
        "SELECT (EXTRACT(EPOCH FROM (updated_at - created_at)) * 1000000)::float8
         FROM orders WHERE id = ANY($1) AND status <> 'PENDING'",
    )
    .bind(ids)
    .fetch_all(db)
    .await
    .context("cannot read the orders' timestamps")?;
    let mut histogram = micros_histogram();
    for (micros,) in lags {
        // A negative lag would be a clock step; it counts as no lag at all.
        histogram.saturating_record(micros.max(0.0) as u64);
    }
    Ok(histogram)
}
