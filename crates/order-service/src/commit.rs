//! What became of a transaction whose answer to `COMMIT` was lost.
//!
//! A `COMMIT` can take effect in the database while its answer never reaches
//! the client: the connection breaks after the commit record is durable, or the
//! backend waits for a synchronous standby and is terminated ("the transaction
//! has already committed locally"). The client must not then say "nothing was
//! written": the order may exist. So every write transaction learns its id
//! (`pg_current_xact_id()`) and its backend's pid before `COMMIT`, and when the
//! answer is lost, [`resolve`] asks on a new connection, first whether the
//! transaction has ended, then what it left:
//! - it has ended when `pg_xact_status` says `committed` or `aborted`, or when
//!   its backend no longer runs it. Then the rows it wrote (the batch's orders)
//!   are there or not, and that is the answer. The status alone is not: an id
//!   that reached no durable WAL before a crash of the database is given again
//!   after recovery, so `committed` may be another transaction's (measured: two
//!   orders answered 201 that did not exist, in a chaos run that restarted
//!   Postgres with `-m immediate` as their COMMIT answers were lost);
//! - it is still running (the backend has not noticed that its client is gone,
//!   or waits for a standby): the backend is terminated, which ends the
//!   transaction one way or the other, and the question is asked again;
//! - the database cannot be reached within the deadline: the outcome is
//!   unknown, and the client is told so.

use std::time::Duration;

use sqlx::{ConnectOptions, PgPool};
use tokio::time::Instant;
use uuid::Uuid;

/// A transaction's id and the backend that ran it, learnt before its `COMMIT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XactId {
    /// `pg_current_xact_id()` as text: a 64-bit id that does not wrap.
    pub xid: String,
    /// `pg_backend_pid()` of its connection.
    pub backend: i32,
}

impl std::fmt::Display for XactId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (backend {})", self.xid, self.backend)
    }
}

/// What became of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed,
    Aborted,
    /// Could not be learnt (the text says why).
    Unknown(String),
}

/// Longest wait for one answer while resolving: a database that does not
/// answer within it is asked again on a new connection.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// Asks what became of `xact`, which wrote the orders `orders` (all or none of
/// them committed), on new connections to `db`'s database (not pooled ones,
/// which may be as broken as the one that lost the answer), until it is known
/// or `within` has passed.
pub async fn resolve(
    db: &PgPool,
    xact: &XactId,
    orders: &[Uuid],
    within: Duration,
) -> CommitOutcome {
    let deadline = Instant::now() + within;
    let mut last_problem = "the database was not asked".to_owned();
    let mut terminated = false;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return CommitOutcome::Unknown(format!(
                "its outcome could not be learnt within {within:?}: {last_problem}"
            ));
        }
        let asked = ask(db, xact, orders, !terminated);
        match tokio::time::timeout(remaining.min(ASK_TIMEOUT), asked).await {
            Ok(Ok(Status::Ended { found })) if found == orders.len() => {
                return CommitOutcome::Committed;
            }
            Ok(Ok(Status::Ended { found: 0 })) => return CommitOutcome::Aborted,
            Ok(Ok(Status::Ended { found })) => {
                return CommitOutcome::Unknown(format!(
                    "transaction {xact} has ended with {found} of its {} orders in the database",
                    orders.len()
                ));
            }
            Ok(Ok(Status::InProgress { terminated: now })) => {
                terminated |= now;
                last_problem = format!("transaction {xact} was still in progress");
            }
            Ok(Err(error)) => last_problem = error.to_string(),
            Err(_) => last_problem = format!("no answer within {ASK_TIMEOUT:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50).min(remaining)).await;
    }
}

enum Status {
    /// Over, committed or not, with `found` of its orders in the database.
    Ended { found: usize },
    /// Still running; `terminated` when its backend was just told to end.
    InProgress { terminated: bool },
}

/// Whether the backend `$1` runs the transaction `$2` (an xid8): only that very
/// transaction, as a pid may have been reused. `backend_xid` is the 32-bit form
/// of the id.
const RUNS_IT: &str =
    "pid = $1 AND backend_xid::text = ($2::xid8::text::numeric % 4294967296)::text";

/// One question on one new connection; with `terminate`, a transaction still
/// in progress has its backend terminated (if that backend still runs it).
async fn ask(db: &PgPool, xact: &XactId, orders: &[Uuid], terminate: bool) -> sqlx::Result<Status> {
    let mut conn = db.connect_options().connect().await?;
    let (status, running): (Option<String>, bool) = sqlx::query_as(&format!(
        "SELECT pg_xact_status($2::xid8)::text,
                EXISTS (SELECT FROM pg_stat_activity WHERE {RUNS_IT})"
    ))
    .bind(xact.backend)
    .bind(&xact.xid)
    .fetch_one(&mut conn)
    .await?;
    let ended = matches!(status.as_deref(), Some("committed" | "aborted")) || !running;
    let status = if ended {
        // A statement of its own, so its snapshot is taken after the end.
        let found: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = ANY($1)")
            .bind(orders)
            .fetch_one(&mut conn)
            .await?;
        Status::Ended { found: usize::try_from(found).unwrap_or(0) }
    } else if terminate {
        let terminated: bool = sqlx::query_scalar(&format!(
            "SELECT coalesce(bool_or(pg_terminate_backend(pid, 1000)), false)
             FROM pg_stat_activity WHERE {RUNS_IT}"
        ))
        .bind(xact.backend)
        .bind(&xact.xid)
        .fetch_one(&mut conn)
        .await?;
        if terminated {
            tracing::warn!(xact = %xact,
                "terminated the backend of a transaction whose COMMIT answer was lost");
        }
        Status::InProgress { terminated }
    } else {
        Status::InProgress { terminated: false }
    };
    let _ = sqlx::Connection::close(conn).await;
    Ok(status)
}
