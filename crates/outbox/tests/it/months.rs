//! What keeps the outbox working after months: retention sweeps, plans that do
//! not rot as tables grow, a claim that stays cheap behind a million dead rows,
//! and relay workers that come back after a panic.

use std::time::Duration;

use outbox::metrics::RelayMetrics;
use outbox::relay::{ClaimFloor, Pass, Relay, RelayConfig};
use outbox::retention::{Retention, RetentionMetrics, Sweep, sweep};
use outbox::store::{self, Failure, FailureKind};
use outbox::supervisor::{CrashSwitch, Supervisor};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use test_support::{eventually, seq_scans};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{TestBroker, delivery_counts, enqueue_events, outbox_rows};

/// Inserts `count` processed message ids, processed `age` ago.
async fn processed(db: &PgPool, count: i64, age: &str) {
    sqlx::query(
        "INSERT INTO processed_messages (consumer, message_id, processed_at)
         SELECT 'test', gen_random_uuid(), now() - $2::interval FROM generate_series(1, $1)",
    )
    .bind(count)
    .bind(age)
    .execute(db)
    .await
    .expect("insert processed ids");
}

async fn processed_rows(db: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM processed_messages").fetch_one(db).await.expect("n")
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn a_sweep_deletes_only_rows_past_the_window_in_bounded_batches(db: PgPool) {
    processed(&db, 23, "2 hours").await;
    processed(&db, 5, "1 minute").await;
    let retention = Retention {
        batch_size: 5,
        pause: Duration::from_millis(1),
        ..Retention::processed_messages(Duration::from_secs(3600))
    };
    let metrics = RetentionMetrics::default();

    let swept = sweep(&db, &retention, &metrics, &CancellationToken::new()).await.expect("sweep");

    assert_eq!(swept, Sweep::Deleted(23));
    assert_eq!(processed_rows(&db).await, 5, "the rows inside the window stay");
    assert_eq!(metrics.swept("processed_messages").get(), 23);
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn only_one_sweeper_at_a_time_works_on_a_table(db: PgPool) {
    processed(&db, 10, "2 hours").await;
    let retention = Retention::processed_messages(Duration::from_secs(60));
    // Another replica's sweeper holds the table's lock.
    let mut other = db.acquire().await.expect("connection");
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
        .bind(retention.lock_name())
        .execute(&mut *other)
        .await
        .expect("lock");
    let metrics = RetentionMetrics::default();
    let shutdown = CancellationToken::new();

    assert_eq!(sweep(&db, &retention, &metrics, &shutdown).await.expect("skip"), Sweep::Skipped);
    assert_eq!(processed_rows(&db).await, 10);

    sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
        .bind(retention.lock_name())
        .execute(&mut *other)
        .await
        .expect("unlock");
    assert_eq!(
        sweep(&db, &retention, &metrics, &shutdown).await.expect("sweep"),
        Sweep::Deleted(10)
    );
    // And the lock was given back: the other replica can take it again.
    let relocked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(retention.lock_name())
        .fetch_one(&mut *other)
        .await
        .expect("try lock");
    assert!(relocked);
}

/// One connection, set up as the services set up theirs, so that statements
/// prepared on it keep being reused as they would be in a service.
async fn service_connection(db: &PgPool) -> PgPool {
    let options = store::with_custom_plans((*db.connect_options()).clone());
    PgPoolOptions::new().max_connections(1).connect_with(options).await.expect("pool")
}

/// Runs the relay's statements that change rows (the claim, the delete of
/// confirmed events, the record of failures) on the one event `id`, in a
/// transaction, and returns the sequential scans of `outbox` they made.
async fn relay_statements(conn: &PgPool, id: Uuid) -> i64 {
    let mut tx = conn.begin().await.expect("begin");
    store::claim_due(&mut tx, 10, None).await.expect("claim");
    let failure =
        Failure { id, error: "test".to_owned(), retry_in_ms: 1, kind: FailureKind::Attempt };
    store::record_failures(&mut tx, &[failure], 10).await.expect("record failure");
    store::delete(&mut tx, &[id]).await.expect("delete");
    let scans = seq_scans(&mut tx, "outbox").await;
    tx.rollback().await.expect("rollback");
    scans
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn the_relay_s_statements_keep_their_index_plans_as_the_outbox_grows(db: PgPool) {
    let conn = service_connection(&db).await;
    let [id] = enqueue_events(&db, "Happened", 1, 1).await[..] else { unreachable!() };
    // Prepared and run many times while the table is nearly empty, as after a
    // deployment on a fresh database: long enough for a generic plan to set in.
    for _ in 0..10 {
        relay_statements(&conn, id).await;
    }
    // A backlog of 200,000 events, not due for a day (so the claim leaves them).
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, next_attempt_at)
         SELECT gen_random_uuid(), 'test', 'a', 'Waiting', '{}', now() + interval '1 day'
         FROM generate_series(1, 200000)",
    )
    .execute(&db)
    .await
    .expect("grow the outbox");

    assert_eq!(relay_statements(&conn, id).await, 0, "no sequential scan of the outbox");
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn the_sweep_keeps_its_index_plan_as_the_table_grows(db: PgPool) {
    let conn = service_connection(&db).await;
    let retention = Retention::processed_messages(Duration::from_secs(3600));
    let metrics = RetentionMetrics::default();
    let shutdown = CancellationToken::new();
    for _ in 0..10 {
        processed(&db, 1, "2 hours").await;
        sweep(&conn, &retention, &metrics, &shutdown).await.expect("sweep");
    }
    processed(&db, 200_000, "1 minute").await;
    processed(&db, 3, "2 hours").await;

    let mut tx = conn.begin().await.expect("begin");
    // The view also holds this backend's counts not yet flushed (the sweeps
    // above scanned the table while it was tiny): the statement's are the difference.
    let before = seq_scans(&mut tx, "processed_messages").await;
    // The sweep's own statement, run in this transaction to count its scans.
    let deleted: i64 = sqlx::query_scalar(
        "WITH expired AS (SELECT ctid FROM processed_messages
                          WHERE processed_at < now() - $1 * interval '1 millisecond'
                          ORDER BY processed_at LIMIT $2)
         SELECT count(*) FROM expired",
    )
    .bind(3_600_000_i64)
    .bind(5_000_i64)
    .fetch_one(&mut *tx)
    .await
    .expect("expired");
    assert_eq!(deleted, 3);
    assert_eq!(seq_scans(&mut tx, "processed_messages").await - before, 0);
    tx.rollback().await.expect("rollback");
    assert_eq!(
        sweep(&conn, &retention, &metrics, &shutdown).await.expect("sweep"),
        Sweep::Deleted(3)
    );
}

/// Shared buffers the claim touches, and its execution time, from EXPLAIN.
async fn claim_cost(db: &PgPool, from: Option<chrono::DateTime<chrono::Utc>>) -> (i64, f64) {
    let mut tx = db.begin().await.expect("begin");
    let plan: Value = sqlx::query_scalar(&format!(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}",
        store::CLAIM_DUE_SQL
    ))
    .bind(200_i64)
    .bind(from)
    .fetch_one(&mut *tx)
    .await
    .expect("explain");
    tx.rollback().await.expect("rollback");
    let top = &plan[0]["Plan"];
    let blocks = top["Shared Hit Blocks"].as_i64().unwrap_or(0)
        + top["Shared Read Blocks"].as_i64().unwrap_or(0);
    (blocks, plan[0]["Execution Time"].as_f64().unwrap_or(f64::NAN))
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn the_claim_stays_cheap_with_a_million_dead_rows_behind_it(db: PgPool) {
    // A transaction holding an old snapshot (a long report, a forgotten session):
    // while it is open, vacuum cannot remove the rows deleted after it began, and
    // every index scan that crosses their entries must visit them.
    let mut old_snapshot = db.begin().await.expect("begin");
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *old_snapshot)
        .await
        .expect("isolation");
    sqlx::query("SELECT count(*) FROM outbox").execute(&mut *old_snapshot).await.expect("snapshot");
    // An hour of traffic, published and deleted.
    sqlx::raw_sql(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, next_attempt_at)
         SELECT gen_random_uuid(), 'test', 'a', 'Published', '{}',
                now() - interval '1 hour' + n * interval '3 milliseconds'
         FROM generate_series(1, 1000000) AS n;
         DELETE FROM outbox;",
    )
    .execute(&db)
    .await
    .expect("a million dead rows");
    enqueue_events(&db, "Happened", 50, 50).await;

    // A worker that has been relaying claims from the floor its `ClaimFloor`
    // gives after it claimed the newest events (the floor is the relay's own,
    // not computed here): a full scan first, then from the floor.
    let config = RelayConfig::default();
    let mut floor = ClaimFloor::default();
    assert_eq!(floor.next(&config), None, "a worker starts with a full scan");
    let newest: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT max(next_attempt_at) FROM outbox")
            .fetch_one(&db)
            .await
            .expect("newest");
    let pass = Pass { claimed: 50, newest_claimed: Some(newest), ..Pass::default() };
    floor.observe(&Ok(pass), config.batch_size);
    let from = floor.next(&config);
    assert!(from.is_some(), "after a pass it claims from a floor");
    let (floor_blocks, floor_ms) = claim_cost(&db, from).await;
    let (full_blocks, full_ms) = claim_cost(&db, None).await;
    eprintln!(
        "claim behind 1,000,000 dead rows: from the floor {floor_blocks} buffers in \
         {floor_ms:.2} ms; full scan {full_blocks} buffers in {full_ms:.1} ms"
    );
    assert!(full_blocks > 10_000, "the dead entries are there to wade through: {full_blocks}");
    assert!(floor_blocks < 500, "the floor skips them: {floor_blocks} buffers");
    old_snapshot.rollback().await.expect("rollback");
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn a_relay_worker_that_panics_is_restarted_and_relays_on(db: PgPool) {
    let mut broker = TestBroker::new(&["test.#"]).await;
    let crash_switch = CrashSwitch::default();
    crash_switch.crash_next(2);
    let config = RelayConfig { workers: 1, crash_switch, ..broker.relay_config() };
    let shutdown = CancellationToken::new();
    let supervisor = Supervisor::unregistered(shutdown.clone());
    let relay = Relay::spawn_supervised(
        db.clone(),
        broker.transport(),
        config,
        RelayMetrics::default(),
        &supervisor,
    )
    .expect("valid settings");
    let ids = enqueue_events(&db, "Happened", 20, 20).await;

    let delivered = broker.receive(20, Duration::from_secs(20)).await;

    let counts = delivery_counts(&delivered);
    assert!(ids.iter().all(|id| counts.contains_key(id)), "every event arrives");
    assert_eq!(supervisor.panics("outbox-relay-0"), 2, "two panics, two restarts");
    assert_eq!(supervisor.health().crashed_tasks(), 0);
    assert!(relay.status().broker_connected(), "the restarted worker counts as connected");
    assert!(eventually(Duration::from_secs(5), || async { outbox_rows(&db).await == 0 }).await);
    shutdown.cancel();
    relay.join().await;
    broker.delete().await;
}
