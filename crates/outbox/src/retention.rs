//! Retention: deleting rows that have outlived their window, so that tables that
//! grow with traffic (`processed_messages`, `idempotency_keys`) stay bounded.
//!
//! A sweep deletes the rows older than the window oldest first, a bounded batch
//! per statement with a pause between batches, so it never holds many locks or
//! a long transaction and never stalls the hot path. One sweeper at a time works
//! on a table across every replica: a sweep holds a Postgres advisory lock named
//! after the table, and a replica that cannot take it skips its turn.

use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sqlx::{PgConnection, PgPool};
use std::sync::atomic::AtomicU64;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::supervisor::Supervisor;

/// A table with a retention window: rows whose `timestamp_column` is older than
/// `window` are deleted.
#[derive(Debug, Clone)]
pub struct Retention {
    /// The table, written into SQL as is: a name from code, never from input.
    pub table: &'static str,
    /// An indexed `timestamptz` column (the index makes each batch a range scan).
    pub timestamp_column: &'static str,
    /// How long a row is kept: older rows are deleted.
    pub window: Duration,
    /// Most rows one statement deletes.
    pub batch_size: i64,
    /// Pause between two batches, leaving room for the hot path.
    pub pause: Duration,
}

impl Retention {
    /// Rows one statement deletes unless set otherwise.
    pub const DEFAULT_BATCH_SIZE: i64 = 5_000;
    /// The pause between two batches unless set otherwise.
    pub const DEFAULT_PAUSE: Duration = Duration::from_millis(20);

    /// `table` by `timestamp_column`, with the default batch size and pause.
    pub fn new(table: &'static str, timestamp_column: &'static str, window: Duration) -> Self {
        Self {
            table,
            timestamp_column,
            window,
            batch_size: Self::DEFAULT_BATCH_SIZE,
            pause: Self::DEFAULT_PAUSE,
        }
    }

    /// The inbox of the consumers: a message id is remembered for `window` (the
    /// dedup window); a redelivery arriving later counts as new.
    pub fn processed_messages(window: Duration) -> Self {
        Self::new("processed_messages", "processed_at", window)
    }

    /// The Idempotency-Keys of an API: a key is remembered for `window` (its
    /// TTL); a retry with it later creates a new order.
    pub fn idempotency_keys(window: Duration) -> Self {
        Self::new("idempotency_keys", "created_at", window)
    }

    /// The name of this table's sweeper lock, the same in every replica (the
    /// advisory lock key is `hashtextextended(name, 0)`).
    pub fn lock_name(&self) -> String {
        format!("outbox-retention:{}", self.table)
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// Another replica holds the table's sweeper lock; nothing was done.
    Skipped,
    /// This many rows were deleted.
    Deleted(u64),
}

/// Deletes every row of `retention.table` past its window, batch by batch, unless
/// another sweeper is at work on the table. Stops early (between batches) when
/// `shutdown` is cancelled.
pub async fn sweep(
    db: &PgPool,
    retention: &Retention,
    metrics: &RetentionMetrics,
    shutdown: &CancellationToken,
) -> crate::Result<Sweep> {
    // A session-level lock on one connection: it is released by the unlock below
    // or, if this process dies, when the server drops the connection.
    let mut conn = db.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(retention.lock_name())
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        return Ok(Sweep::Skipped);
    }
    let swept = delete_expired(&mut conn, retention, metrics, shutdown).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
        .bind(retention.lock_name())
        .execute(&mut *conn)
        .await;
    if let Err(error) = unlocked {
        // The lock must not outlive this sweep on a pooled connection.
        drop(conn.detach());
        return Err(error.into());
    }
    let deleted = swept?;
    metrics.refresh_oldest(&mut conn, retention).await?;
    Ok(Sweep::Deleted(deleted))
}

async fn delete_expired(
    conn: &mut PgConnection,
    retention: &Retention,
    metrics: &RetentionMetrics,
    shutdown: &CancellationToken,
) -> crate::Result<u64> {
    let (table, column) = (retention.table, retention.timestamp_column);
    // Deleting by `ctid` makes the delete itself a TID scan of exactly the rows
    // the index range scan found. Each batch starts where the previous one ended
    // (`$3`), so a long sweep does not rescan the index entries of rows it has
    // already deleted (they stay in the index until vacuum removes them).
    let delete = format!(
        "WITH expired AS (
             SELECT ctid, {column} AS at FROM {table}
             WHERE {column} < now() - $1 * interval '1 millisecond'
               AND ($3::timestamptz IS NULL OR {column} >= $3)
             ORDER BY {column}
             LIMIT $2
         ), deleted AS (
             DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM expired))
         )
         SELECT count(*), max(at) FROM expired"
    );
    let window_ms = i64::try_from(retention.window.as_millis()).unwrap_or(i64::MAX);
    let mut from: Option<DateTime<Utc>> = None;
    let mut total = 0;
    loop {
        let (deleted, newest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(&delete)
            .bind(window_ms)
            .bind(retention.batch_size)
            .bind(from)
            .fetch_one(&mut *conn)
            .await?;
        let deleted = deleted as u64;
        total += deleted;
        metrics.swept(table).inc_by(deleted);
        if deleted < retention.batch_size as u64 || shutdown.is_cancelled() {
            return Ok(total);
        }
        from = newest;
        tokio::time::sleep(retention.pause).await;
    }
}

/// Runs [`run`] in `tasks` under `supervisor` (restarted if it panics), until
/// the supervisor's shutdown.
pub fn spawn_supervised(
    supervisor: &Supervisor,
    tasks: &mut JoinSet<()>,
    db: PgPool,
    retention: Retention,
    interval: Duration,
    metrics: RetentionMetrics,
) {
    let name = format!("{}-sweeper", retention.table);
    let shutdown = supervisor.shutdown().clone();
    supervisor.spawn(tasks, name, move || {
        run(db.clone(), retention.clone(), interval, metrics.clone(), shutdown.clone())
    });
}

/// Sweeps every `interval` until `shutdown`; a failed sweep is logged and tried
/// again at the next interval.
pub async fn run(
    db: PgPool,
    retention: Retention,
    interval: Duration,
    metrics: RetentionMetrics,
    shutdown: CancellationToken,
) {
    tracing::info!(table = retention.table, window = ?retention.window, ?interval,
        "retention sweeper started");
    loop {
        match sweep(&db, &retention, &metrics, &shutdown).await {
            Ok(Sweep::Deleted(deleted)) if deleted > 0 => {
                tracing::info!(table = retention.table, deleted, "swept rows past their window");
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(table = retention.table, %error, "retention sweep failed");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    table: &'static str,
}

/// Rows swept and the age of the oldest remaining row, per table.
#[derive(Clone, Default)]
pub struct RetentionMetrics {
    swept: Family<TableLabels, Counter>,
    oldest_age_seconds: Family<TableLabels, Gauge<f64, AtomicU64>>,
}

impl RetentionMetrics {
    /// New metrics, registered in `registry` as `retention_swept_rows` and
    /// `retention_oldest_row_age_seconds`, labelled by table.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "retention_swept_rows",
            "Rows deleted by the retention sweeper, by table",
            metrics.swept.clone(),
        );
        registry.register(
            "retention_oldest_row_age_seconds",
            "Age of the oldest row left in a table with a retention window, after the last sweep",
            metrics.oldest_age_seconds.clone(),
        );
        metrics
    }

    /// The rows swept from `table` so far.
    pub fn swept(&self, table: &'static str) -> Counter {
        self.swept.get_or_create(&TableLabels { table }).clone()
    }

    async fn refresh_oldest(
        &self,
        conn: &mut PgConnection,
        retention: &Retention,
    ) -> crate::Result<()> {
        let (table, column) = (retention.table, retention.timestamp_column);
        let age: f64 = sqlx::query_scalar(&format!(
            "SELECT coalesce(extract(epoch FROM now() - min({column})), 0)::float8 FROM {table}"
        ))
        .fetch_one(conn)
        .await?;
        self.oldest_age_seconds.get_or_create(&TableLabels { table }).set(age);
        Ok(())
    }
}
