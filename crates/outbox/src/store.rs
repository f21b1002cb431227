//! The SQL of the relay over the `outbox` table. Every function that changes rows
//! takes the caller's transaction: claiming, deleting what the broker confirmed
//! and recording failures all commit together.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::postgres::PgConnectOptions;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

/// An event claimed for publishing.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxEvent {
    /// The message id (a UUIDv7), which consumers deduplicate on.
    pub id: Uuid,
    /// The kind of entity the event is about (`order`).
    pub aggregate_type: String,
    /// Which entity it is about (the Kafka key).
    pub aggregate_id: String,
    /// What happened (`OrderPlaced`).
    pub event_type: String,
    /// The JSON payload as text: it is sent as is, never parsed by the relay.
    pub payload: String,
    /// Extra message headers, such as a W3C `traceparent`.
    pub headers: Json<Map<String, Value>>,
    /// When its transaction began (consumers measure their lag from it).
    pub created_at: DateTime<Utc>,
    /// Failed publish attempts so far.
    pub attempts: i32,
    /// When it became due: its transaction's start, or the end of its backoff.
    pub next_attempt_at: DateTime<Utc>,
}

impl OutboxEvent {
    /// The headers every transport sends, as text, in order: the event's own
    /// (such as a W3C `traceparent`; a non-string JSON value as its JSON text),
    /// then `aggregate_type`, `aggregate_id` and [`CREATED_AT_HEADER`] (when the
    /// event was committed, to the microsecond: consumers measure their
    /// end-to-end lag from it). A later header wins over an earlier one of the
    /// same name, so a stored header cannot hide the relay's.
    ///
    /// [`CREATED_AT_HEADER`]: crate::transport::CREATED_AT_HEADER
    pub fn message_headers(&self) -> Vec<(String, String)> {
        let stored = self.headers.0.iter().map(|(name, value)| {
            let text = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            (name.clone(), text)
        });
        let relay = [
            ("aggregate_type", self.aggregate_type.clone()),
            ("aggregate_id", self.aggregate_id.clone()),
            (
                crate::transport::CREATED_AT_HEADER,
                self.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ),
        ];
        stored.chain(relay.map(|(name, value)| (name.to_owned(), value))).collect()
    }

    /// The bytes the event takes on the wire, near enough to compare with a
    /// broker's message size limit: payload, header names and values, and
    /// routing key.
    pub fn size_bytes(&self) -> usize {
        let headers: usize =
            self.message_headers().iter().map(|(name, value)| name.len() + value.len()).sum();
        self.payload.len() + headers + self.aggregate_type.len() + self.event_type.len() + 1
    }

    /// `<aggregate_type>.<event_type>`, e.g. `order.OrderPlaced`.
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.aggregate_type, self.event_type)
    }
}

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
pub const CLAIM_DUE_SQL: &str = "
    SELECT id, aggregate_type, aggregate_id, event_type, payload::text AS payload,
           headers, created_at, attempts, next_attempt_at
    FROM outbox
    WHERE state = 'pending' AND next_attempt_at <= now()
      AND ($2::timestamptz IS NULL OR next_attempt_at >= $2)
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
    /// When its transaction began.
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
    let mut tx = db.begin().await?;
    let revived = sqlx::query(
        "UPDATE outbox
         SET state = 'pending', attempts = 0, next_attempt_at = now(), last_error = NULL
         WHERE state = 'dead' AND ($1::uuid IS NULL OR id = $1)",
    )
    .bind(id)
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
