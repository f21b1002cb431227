//! Per-aggregate order: the relay claims only the head of each aggregate, so
//! one aggregate's events are published in the order they were written, with
//! several workers, across retries, and across late commits; other aggregates
//! are not held back.

use std::collections::HashMap;
use std::time::Duration;

use lapin::message::Delivery;
use outbox::metrics::RelayMetrics;
use outbox::relay::{RelayConfig, relay_batch};
use outbox::{Publisher, Transport};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestBroker, enqueue_one, message_id, outbox_rows};

/// Writes one event of `aggregate` of `event_type`, in a transaction of its own.
async fn write(db: &PgPool, aggregate: &str, event_type: &str, n: usize) -> Uuid {
    let payload = serde_json::json!({ "n": n });
    enqueue_one(db, aggregate, event_type, payload, serde_json::json!({})).await
}

fn aggregate_of(delivery: &Delivery) -> String {
    let headers = delivery.properties.headers().as_ref().expect("headers");
    match headers.inner().get("aggregate_id") {
        Some(lapin::types::AMQPValue::LongString(text)) => text.to_string(),
        other => panic!("aggregate_id: {other:?}"),
    }
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn one_aggregates_events_are_published_in_order_by_many_workers(db: PgPool) {
    let mut broker = TestBroker::new(&["test.#"]).await;
    // 10 aggregates, 20 events each, one transaction per event, interleaved.
    let mut written: HashMap<String, Vec<Uuid>> = HashMap::new();
    for n in 0..20 {
        for a in 0..10 {
            let aggregate = format!("a-{a}");
            let id = write(&db, &aggregate, "Happened", n).await;
            written.entry(aggregate).or_default().push(id);
        }
    }
    let config = RelayConfig { workers: 4, batch_size: 3, ..broker.relay_config() };
    let (relay, shutdown) = broker.spawn_relay(&db, config);

    let deliveries = broker.receive(200, Duration::from_secs(60)).await;
    shutdown.cancel();
    relay.join().await;

    assert_eq!(deliveries.len(), 200);
    let mut published: HashMap<String, Vec<Uuid>> = HashMap::new();
    for delivery in &deliveries {
        published.entry(aggregate_of(delivery)).or_default().push(message_id(delivery));
    }
    let out_of_order: Vec<&String> = written
        .iter()
        .filter(|(aggregate, ids)| published.get(*aggregate) != Some(*ids))
        .map(|(aggregate, _)| aggregate)
        .collect();
    assert!(out_of_order.is_empty(), "published out of the order written: {out_of_order:?}");
    assert_eq!(outbox_rows(&db).await, 0);
    broker.delete().await;
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn a_later_event_waits_for_an_earlier_one_that_backs_off_and_others_do_not(db: PgPool) {
    let mut broker = TestBroker::new(&["test.Happened"]).await;
    // The broker nacks every `Refused` event while this queue is bound.
    let rejecting = broker.bind_rejecting("test.Refused").await;
    let first = write(&db, "a", "Refused", 0).await;
    let second = write(&db, "a", "Happened", 1).await;
    let other = write(&db, "b", "Happened", 0).await;
    let publisher = broker.transport().connect("ordering").await.expect("publisher");
    let config = RelayConfig { retry_base: Duration::from_secs(60), ..broker.relay_config() };
    let metrics = RelayMetrics::default();

    let pass = relay_batch(&db, &publisher, &config, &metrics).await.expect("pass");
    assert_eq!((pass.claimed, pass.published, pass.failed), (2, 1, 1), "a's head and b: {pass:?}");
    let pass = relay_batch(&db, &publisher, &config, &metrics).await.expect("pass");
    assert_eq!(pass.claimed, 0, "a's second waits while its first backs off: {pass:?}");

    broker.delete_queue(&rejecting).await;
    broker.bind("test.Refused").await;
    sqlx::query("UPDATE outbox SET next_attempt_at = now() WHERE id = $1")
        .bind(first)
        .execute(&db)
        .await
        .expect("due again");
    for _ in 0..2 {
        relay_batch(&db, &publisher, &config, &metrics).await.expect("pass");
    }

    let order: Vec<Uuid> =
        broker.receive(3, Duration::from_secs(10)).await.iter().map(message_id).collect();
    assert_eq!(order, [other, first, second]);
    assert_eq!(outbox_rows(&db).await, 0);
    publisher.close().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn a_dead_event_no_longer_holds_its_aggregate_back(db: PgPool) {
    let mut broker = TestBroker::new(&["test.#"]).await;
    let dead = write(&db, "a", "Happened", 0).await;
    let next = write(&db, "a", "Happened", 1).await;
    sqlx::query("UPDATE outbox SET state = 'dead', last_error = 'parked' WHERE id = $1")
        .bind(dead)
        .execute(&db)
        .await
        .expect("parked");
    let publisher = broker.transport().connect("ordering").await.expect("publisher");

    let pass = relay_batch(&db, &publisher, &broker.relay_config(), &RelayMetrics::default())
        .await
        .expect("pass");

    assert_eq!(pass.published, 1);
    let order: Vec<Uuid> =
        broker.receive(1, Duration::from_secs(10)).await.iter().map(message_id).collect();
    assert_eq!(order, [next]);
    publisher.close().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn a_late_commit_below_the_claim_floor_goes_out_before_its_aggregates_next_event(db: PgPool) {
    let mut broker = TestBroker::new(&["test.#"]).await;
    // Claims start 200 ms below the newest event claimed; a full scan, which
    // finds what lies below, comes every 3 s.
    let config = RelayConfig {
        workers: 1,
        claim_lookback: Duration::from_millis(200),
        full_scan_interval: Duration::from_secs(3),
        ..broker.relay_config()
    };
    let (relay, shutdown) = broker.spawn_relay(&db, config);

    // A transaction writes aggregate a's first event and stays open while
    // others are written and published: its event's time (its transaction's
    // start) falls below the relay's floor.
    let mut slow = db.begin().await.expect("begin");
    let event = |aggregate: &str, n: usize| outbox::NewEvent {
        aggregate_type: "test".to_owned(),
        aggregate_id: aggregate.to_owned(),
        event_type: "Happened".to_owned(),
        payload: serde_json::json!({ "n": n }),
        headers: serde_json::Map::new(),
    };
    let first = outbox::enqueue_untyped(&mut slow, &event("a", 0)).await.expect("enqueue");
    for n in 0..3 {
        write(&db, "b", "Happened", n).await;
    }
    assert_eq!(broker.receive(3, Duration::from_secs(10)).await.len(), 3);
    tokio::time::sleep(Duration::from_millis(400)).await;
    write(&db, "b", "Happened", 3).await;
    assert_eq!(broker.receive(1, Duration::from_secs(10)).await.len(), 1);

    // It commits late; a's next event follows it, as a writer that locks the
    // aggregate would write it. Claims above the floor see only the second.
    slow.commit().await.expect("commit");
    let second = write(&db, "a", "Happened", 1).await;

    let order: Vec<Uuid> =
        broker.receive(2, Duration::from_secs(10)).await.iter().map(message_id).collect();
    assert_eq!(order, [first, second], "the late one first, found by the full scan");
    shutdown.cancel();
    relay.join().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn a_writer_that_began_first_but_took_the_aggregates_lock_second_is_published_second(
    db: PgPool,
) {
    let mut broker = TestBroker::new(&["test.#"]).await;
    sqlx::raw_sql(
        "CREATE TABLE aggregates (id TEXT PRIMARY KEY); INSERT INTO aggregates VALUES ('a')",
    )
    .execute(&db)
    .await
    .expect("table");
    let event = |n: usize| outbox::NewEvent {
        aggregate_type: "test".to_owned(),
        aggregate_id: "a".to_owned(),
        event_type: "Happened".to_owned(),
        payload: serde_json::json!({ "n": n }),
        headers: serde_json::Map::new(),
    };
    let lock = "SELECT id FROM aggregates WHERE id = 'a' FOR UPDATE";
    // The later writer's transaction begins first ...
    let mut later = db.begin().await.expect("begin");
    sqlx::query("SELECT 1").execute(&mut *later).await.expect("began");
    tokio::time::sleep(Duration::from_millis(20)).await;
    // ... the earlier one takes the aggregate's lock, writes and commits ...
    let mut earlier = db.begin().await.expect("begin");
    sqlx::query(lock).execute(&mut *earlier).await.expect("lock");
    let first = outbox::enqueue_untyped(&mut earlier, &event(0)).await.expect("enqueue");
    earlier.commit().await.expect("commit");
    // ... and only then does the later one take it and write.
    sqlx::query(lock).execute(&mut *later).await.expect("lock");
    let second = outbox::enqueue_untyped(&mut later, &event(1)).await.expect("enqueue");
    later.commit().await.expect("commit");

    let publisher = broker.transport().connect("ordering").await.expect("publisher");
    for _ in 0..2 {
        relay_batch(&db, &publisher, &broker.relay_config(), &RelayMetrics::default())
            .await
            .expect("pass");
    }
    let order: Vec<Uuid> =
        broker.receive(2, Duration::from_secs(10)).await.iter().map(message_id).collect();
    assert_eq!(order, [first, second], "in the order they were written");
    publisher.close().await;
    broker.delete().await;
}
