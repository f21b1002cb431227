//! The SQL of the relay over the `outbox` table. Every function that changes rows
//! takes the caller's transaction: claiming, deleting what the broker confirmed
//! and recording failures all commit together.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnectOptions;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

pub use crate::event::OutboxEvent;

/// Locks up to `limit` due events, oldest first, skipping rows other workers hold;
/// with `from`, only events due at or after it (the relay's claim floor, which
/// keeps the index scan clear of the entries of deleted events).
///
/// It must run inside a transaction: outside one the row locks would end with the
/// statement, and two workers could claim and publish the same rows.
pub async fn claim_due(
    tx: &mut Transaction<'_, Postgres>,
    limit: i64,
    from: Option<DateTime<Utc>>,
) -> crate::Result<Vec<OutboxEvent>> {
    sqlx::query_as(CLAIM_DUE_SQL)
        .bind(limit)
        .bind(from)
        .fetch_all(&mut **tx)
        .await
        .map_err(Into::into)
}

/// The claim of [`claim_due`]: `$1` the limit, `$2` the floor or NULL. Public for
/// the tests that look at its plan.
///
/// Only the head of each aggregate is claimed: an event with an earlier pending
/// event of its aggregate (earlier by `created_at`, when it was inserted on the
/// database's clock, then by id) waits until that one has left the outbox,
/// confirmed. So one aggregate's events are published in the order they were
/// written, whatever the number of workers and replicas, and across retries: a
/// later event waits for an earlier one that is backing off (a dead one no
/// longer holds the rest back). A batch holds at most one event per aggregate.
/// Writers of one aggregate must serialise (lock its row before they enqueue, as
/// order-service does), or two of its transactions could commit in the other
/// order. A writer that waited for the lock inserts after the one before it
/// committed, so its `created_at` is later, even when its transaction began
/// first: that is why `created_at` is the insert's clock, not the transaction's.
pub const CLAIM_DUE_SQL: &str = "
    SELECT id, aggregate_type, aggregate_id, event_type, payload::text AS payload,
           headers, created_at, attempts, next_attempt_at
    FROM outbox AS o
    WHERE state = 'pending' AND next_attempt_at <= now()
      AND ($2::timestamptz IS NULL OR next_attempt_at >= $2)
      AND NOT EXISTS (
          SELECT FROM outbox AS earlier
          WHERE earlier.state = 'pending'
            AND earlier.aggregate_type = o.aggregate_type
            AND earlier.aggregate_id = o.aggregate_id
            AND (earlier.created_at, earlier.id) < (o.created_at, o.id))
    ORDER BY next_attempt_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED";

/// Removes the events the broker confirmed.
pub async fn delete(tx: &mut Transaction<'_, Postgres>, ids: &[Uuid]) -> crate::Result<()> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)").bind(ids).execute(&mut **tx).await?;
    Ok(())
}

/// A publish that did not succeed and when to try again.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The event's id.
    pub id: Uuid,
    /// Why, kept in `last_error`.
    pub error: String,
    /// Delay before the next attempt.
    pub retry_in_ms: i64,
    /// What the failure does to the event.
    pub kind: FailureKind,
}

/// What a failed publish does to its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// An attempt: counted, and the event is dead once it reaches the limit.
    Attempt,
    /// The event is dead at once (unroutable under [`crate::relay::Unroutable::Park`]).
    Park,
    /// Not counted: the event waits and is tried again (unroutable under
    /// [`crate::relay::Unroutable::Retry`]).
    Wait,
}

impl FailureKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Attempt => "attempt",
            Self::Park => "park",
            Self::Wait => "wait",
        }
    }
}

/// Records each failure (see [`FailureKind`]); an event whose counted attempts
/// reach `max_attempts` is marked dead, which takes it out of every later claim.
/// Returns how many became dead.
pub async fn record_failures(
    tx: &mut Transaction<'_, Postgres>,
    failures: &[Failure],
    max_attempts: i32,
) -> crate::Result<u64> {
    let ids: Vec<Uuid> = failures.iter().map(|failure| failure.id).collect();
    let errors: Vec<&str> = failures.iter().map(|failure| failure.error.as_str()).collect();
    let delays: Vec<i64> = failures.iter().map(|failure| failure.retry_in_ms).collect();
    let kinds: Vec<&str> = failures.iter().map(|failure| failure.kind.as_str()).collect();
    let dead: Vec<bool> = sqlx::query_scalar(
        "UPDATE outbox AS o
         SET attempts = o.attempts + CASE WHEN f.kind = 'wait' THEN 0 ELSE 1 END,
             last_error = f.error,
             next_attempt_at = now() + f.delay_ms * interval '1 millisecond',
             state = CASE WHEN f.kind = 'park' OR (f.kind = 'attempt' AND o.attempts + 1 >= $4)
                          THEN 'dead' ELSE 'pending' END
         FROM unnest($1::uuid[], $2::text[], $3::bigint[], $5::text[]) AS f(id, error, delay_ms, kind)
         WHERE o.id = f.id
         RETURNING o.state = 'dead'",
    )
    .bind(&ids)
    .bind(&errors)
    .bind(&delays)
    .bind(max_attempts)
    .bind(&kinds)
    .fetch_all(&mut **tx)
    .await?;
    Ok(dead.into_iter().filter(|dead| *dead).count() as u64)
}

/// A dead event, as shown to an operator.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct DeadEvent {
    /// The message id.
    pub id: Uuid,
    /// The kind of entity the event is about.
    pub aggregate_type: String,
    /// Which entity it is about.
    pub aggregate_id: String,
    /// What happened.
    pub event_type: String,
    /// Failed publish attempts, the last one included.
    pub attempts: i32,
    /// Why its last attempt failed.
    pub last_error: Option<String>,
    /// When it was written.
    pub created_at: DateTime<Utc>,
}

/// The oldest `limit` dead events.
pub async fn dead_events(db: &PgPool, limit: i64) -> crate::Result<Vec<DeadEvent>> {
    sqlx::query_as(
        "SELECT id, aggregate_type, aggregate_id, event_type, attempts, last_error, created_at
         FROM outbox WHERE state = 'dead' ORDER BY created_at, id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await
    .map_err(Into::into)
}

/// Makes dead events pending again with a fresh attempt budget, due now, and wakes
/// the relay. `None` replays every dead event. Returns how many were revived.
pub async fn replay_dead(db: &PgPool, id: Option<Uuid>) -> crate::Result<u64> {
    replay_dead_matching(db, &DeadFilter { id, ..DeadFilter::default() }).await
}

/// Which dead events [`replay_dead_matching`] takes: those matching every field
/// given (none given: all of them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadFilter {
    /// This one event.
    pub id: Option<Uuid>,
    /// Events of this aggregate type.
    pub aggregate_type: Option<String>,
    /// Events of this type.
    pub event_type: Option<String>,
}

/// [`replay_dead`] for the dead events `filter` takes.
pub async fn replay_dead_matching(db: &PgPool, filter: &DeadFilter) -> crate::Result<u64> {
    let mut tx = db.begin().await?;
    let revived = sqlx::query(
        "UPDATE outbox
         SET state = 'pending', attempts = 0, next_attempt_at = now(), last_error = NULL
         WHERE state = 'dead' AND ($1::uuid IS NULL OR id = $1)
           AND ($2::text IS NULL OR aggregate_type = $2)
           AND ($3::text IS NULL OR event_type = $3)",
    )
    .bind(filter.id)
    .bind(&filter.aggregate_type)
    .bind(&filter.event_type)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    crate::notify(&mut tx).await?;
    tx.commit().await?;
    Ok(revived)
}

/// What waits in the outbox: pending events, the age of the oldest, dead events.
#[derive(Debug, Clone, Copy, PartialEq, sqlx::FromRow)]
pub struct Backlog {
    /// Pending events, those waiting for a retry included.
    pub pending: i64,
    /// Age of the oldest pending event, from its `created_at`; 0 when none.
    pub oldest_pending_age_seconds: f64,
    /// Dead events.
    pub dead: i64,
}

/// Counts what waits in the outbox, for the backlog gauges. One scan of the
/// table, which a working relay keeps small.
pub async fn backlog(db: &PgPool) -> crate::Result<Backlog> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
                coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 'pending')), 0)::float8
                    AS oldest_pending_age_seconds,
                count(*) FILTER (WHERE state = 'dead') AS dead
         FROM outbox",
    )
    .fetch_one(db)
    .await
    .map_err(Into::into)
}

/// Connection options for the connections that run this crate's statements (and
/// any other statement over a table that grows).
///
/// `plan_cache_mode = force_custom_plan`: sqlx prepares each statement once per
/// connection and reuses it. After five executions Postgres may switch such a
/// statement to a generic plan and keep it for the connection's life; a generic
/// plan made while a table was empty is a sequential scan (of `orders`, say),
/// and without an ANALYZE nothing ever replaces it, so every batch reads the
/// whole table as it grows (measured: the consumer ten times slower within twenty
/// minutes). A custom plan is made at each execution from the table's current
/// size and the actual parameters; planning these short statements costs far
/// less than one wrong plan.
pub fn with_custom_plans(options: PgConnectOptions) -> PgConnectOptions {
    options.options([("plan_cache_mode", "force_custom_plan")])
}
