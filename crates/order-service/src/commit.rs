//! What became of a transaction whose answer to `COMMIT` was lost.
//!
//! A `COMMIT` can take effect in the database while its answer never reaches
//! the client: the connection breaks after the commit record is durable, or the
//! backend waits for a synchronous standby and is terminated ("the transaction
//! has already committed locally"). The client must not then say "nothing was
//! written": the order may exist. So every write transaction learns its id
//! (`pg_current_xact_id()`) and its backend's pid before `COMMIT`, and when the
//! answer is lost, [`resolve`] asks on a new connection:
//! - `pg_xact_status` says `committed` or `aborted`: that is the answer;
//! - it says `in progress` (the backend has not noticed that its client is
//!   gone, or waits for a standby): the backend is terminated, which ends the
//!   transaction one way or the other, and the question is asked again;
//! - the database cannot be reached within the deadline: the outcome is
//!   unknown, and the client is told so.

use std::time::Duration;

use sqlx::{ConnectOptions, PgPool};
use tokio::time::Instant;

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

/// Asks what became of `xact`, on new connections to `db`'s database (not
/// pooled ones, which may be as broken as the one that lost the answer), until
/// it is known or `within` has passed.
pub async fn resolve(db: &PgPool, xact: &XactId, within: Duration) -> CommitOutcome {
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
        match tokio::time::timeout(remaining.min(ASK_TIMEOUT), ask(db, xact, !terminated)).await {
            Ok(Ok(Status::Committed)) => return CommitOutcome::Committed,
            Ok(Ok(Status::Aborted)) => return CommitOutcome::Aborted,
            Ok(Ok(Status::Forgotten)) => {
                return CommitOutcome::Unknown(format!(
                    "transaction {xact} is too old for the database to say"
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
    Committed,
    Aborted,
    /// Too old: `pg_xact_status` no longer knows it.
    Forgotten,
    /// Still running; `terminated` when its backend was just told to end.
    InProgress {
        terminated: bool,
    },
}

/// One question on one new connection; with `terminate`, a transaction still
/// in progress has its backend terminated (if that backend still runs it).
async fn ask(db: &PgPool, xact: &XactId, terminate: bool) -> sqlx::Result<Status> {
    let mut conn = db.connect_options().connect().await?;
    let status: Option<String> = sqlx::query_scalar("SELECT pg_xact_status($1::xid8)::text")
        .bind(&xact.xid)
        .fetch_one(&mut conn)
        .await?;
    let status = match status.as_deref() {
        Some("committed") => Status::Committed,
        Some("aborted") => Status::Aborted,
        Some(_) if terminate => {
            // Only the backend still running this very transaction: a pid may
            // have been reused. `backend_xid` is the 32-bit form of the id.
            let terminated: bool = sqlx::query_scalar(
                "SELECT coalesce(bool_or(pg_terminate_backend(pid, 1000)), false)
                 FROM pg_stat_activity
                 WHERE pid = $1 AND backend_xid::text = ($2::xid8::text::numeric % 4294967296)::text",
            )
            .bind(xact.backend)
            .bind(&xact.xid)
            .fetch_one(&mut conn)
            .await?;
            if terminated {
                tracing::warn!(xact = %xact, "terminated the backend of a transaction whose COMMIT answer was lost");
            }
            Status::InProgress { terminated }
        }
        Some(_) => Status::InProgress { terminated: false },
        None => Status::Forgotten,
    };
    let _ = sqlx::Connection::close(conn).await;
    Ok(status)
}
