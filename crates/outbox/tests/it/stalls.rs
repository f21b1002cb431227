//! Faults that stall rather than crash, and events that can never be sent:
//! an event's own failure spends its attempts and parks it alone; a failure of
//! the transport spends none; late commits drain at once.

use std::time::Duration;

use outbox::metrics::RelayMetrics;
use outbox::relay::{Relay, RelayConfig, relay_batch};
use outbox::transport::TransportState;
use outbox::{Publisher, Transport};
use sqlx::PgPool;
use test_support::{Fault, FaultProxy, eventually};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{TestBroker, delivery_counts, enqueue_events, outbox_rows};

/// Writes one event of `event_type` with `headers`, as a library user's bug
/// might, of an aggregate of its own (none waits for another).
async fn enqueue_one(db: &PgPool, event_type: &str, headers: serde_json::Value) -> Uuid {
    let aggregate = format!("poison-{}", Uuid::new_v4().simple());
    let payload = serde_json::json!({"n": "poison"});
    crate::helpers::enqueue_one(db, &aggregate, event_type, payload, headers).await
}

async fn state_of(db: &PgPool, id: Uuid) -> (String, i32, Option<String>) {
    sqlx::query_as("SELECT state, attempts, last_error FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(db)
        .await
        .expect("the event is in the outbox")
}

async fn spent_attempts(db: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT coalesce(sum(attempts), 0)::int8, count(*) FILTER (WHERE state = 'dead')
         FROM outbox",
    )
    .fetch_one(db)
    .await
    .expect("attempts")
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn an_event_amqp_cannot_carry_is_parked_at_once_and_the_rest_go_through(db: PgPool) {
    let mut broker = TestBroker::new(&["test.#"]).await;
    let config = RelayConfig { max_message_bytes: 10_000, ..broker.relay_config() };
    let publisher = broker.transport().connect("poison-test").await.expect("connects");
    let too_long = enqueue_one(&db, &"x".repeat(300), serde_json::json!({})).await;
    let too_large =
        enqueue_one(&db, "Big", serde_json::json!({"padding": "y".repeat(20_000)})).await;
    let behind = enqueue_events(&db, "Happened", 50, 50).await;

    let pass = relay_batch(&db, &publisher, &config, &RelayMetrics::default()).await.expect("pass");

    assert_eq!((pass.claimed, pass.published, pass.dead), (52, 50, 2), "{pass:?}");
    let (state, attempts, error) = state_of(&db, too_long).await;
    assert_eq!(state, "dead", "parked at once, not after its attempts");
    assert_eq!(attempts, 1);
    assert!(error.as_deref().is_some_and(|error| error.contains("255")), "{error:?}");
    let (state, _, error) = state_of(&db, too_large).await;
    assert_eq!(state, "dead");
    assert!(
        error.as_deref().is_some_and(|error| error.contains("RELAY_MAX_MESSAGE_BYTES")),
        "{error:?}"
    );
    let counts = delivery_counts(&broker.receive(50, Duration::from_secs(10)).await);
    assert!(behind.iter().all(|id| counts.contains_key(id)), "the events behind were delivered");
    assert_eq!(outbox_rows(&db).await, 2, "only the two parked events are left");
    publisher.close().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn an_event_on_which_the_broker_closes_the_channel_is_found_and_spends_its_attempt_alone(
    db: PgPool,
) {
    let mut broker = TestBroker::new(&["test.#"]).await;
    let config = broker.relay_config();
    let publisher = broker.transport().connect("poison-test").await.expect("connects");
    let before = enqueue_events(&db, "Happened", 20, 20).await;
    // RabbitMQ routes by a `CC` header, which must be an array: as text it
    // closes the channel ("PRECONDITION_FAILED - invalid message").
    let poison = enqueue_one(&db, "Happened", serde_json::json!({"CC": "not-a-list"})).await;
    let after = enqueue_events(&db, "Happened", 20, 20).await;

    let pass = relay_batch(&db, &publisher, &config, &RelayMetrics::default()).await.expect("pass");

    assert_eq!((pass.published, pass.failed, pass.unknown), (40, 1, 0), "{pass:?}");
    let (state, attempts, error) = state_of(&db, poison).await;
    assert_eq!((state.as_str(), attempts), ("pending", 1), "one attempt, on it alone");
    assert!(
        error.as_deref().is_some_and(|error| error.contains("closed the channel")),
        "{error:?}"
    );
    // Events sent after the poison may arrive twice (their confirms were lost
    // with the channel): at-least-once.
    let others: Vec<Uuid> = before.iter().chain(&after).copied().collect();
    let counts = broker.receive_all(&others, Duration::from_secs(10)).await;
    assert!(
        others.iter().all(|id| counts.contains_key(id)),
        "every other event of the batch was delivered"
    );
    assert!(publisher.is_usable(), "the publisher carries on, on a new channel");
    publisher.close().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn a_broker_partition_spends_no_attempts_and_every_event_arrives(db: PgPool) {
    let mut broker = TestBroker::new(&["test.#"]).await;
    let proxy = FaultProxy::broker().await;
    // Short attempts, as the failure would show quickly if a stall spent them.
    let config = RelayConfig {
        max_attempts: 3,
        retry_base: Duration::from_millis(100),
        retry_max: Duration::from_secs(1),
        ..broker.relay_config()
    };
    let transport = broker.transport_at(&proxy.url()).confirm_timeout(Duration::from_secs(1));
    let shutdown = CancellationToken::new();
    let relay = Relay::spawn(
        db.clone(),
        transport.expect("a valid timeout"),
        config,
        RelayMetrics::default(),
        shutdown.clone(),
    )
    .expect("valid settings");
    let status = relay.status();
    enqueue_events(&db, "Happened", 20, 5).await;
    assert_eq!(broker.receive(20, Duration::from_secs(10)).await.len(), 20);

    // Every byte held, nothing closed, while events keep coming.
    proxy.set(Fault::Hold);
    let mut during = Vec::new();
    for _ in 0..10 {
        during.extend(enqueue_events(&db, "Happened", 10, 5).await);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            status.transport().0 == TransportState::Down
        })
        .await,
        "the stall is seen as the broker's: {:?}",
        status.transport()
    );
    assert_eq!(spent_attempts(&db).await, (0, 0), "no attempt spent, nothing dead");

    proxy.set(Fault::Pass);
    let counts = broker.receive_all(&during, Duration::from_secs(30)).await;
    assert!(during.iter().all(|id| counts.contains_key(id)), "every event arrived");
    assert!(eventually(Duration::from_secs(10), || async { outbox_rows(&db).await == 0 }).await);
    assert!(
        eventually(Duration::from_secs(5), || async { status.transport().0 == TransportState::Up })
            .await
    );
    shutdown.cancel();
    relay.join().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn late_commits_drain_at_once_not_one_batch_per_full_scan(db: PgPool) {
    let mut broker = TestBroker::new(&["test.#"]).await;
    let config = RelayConfig {
        workers: 1,
        batch_size: 50,
        full_scan_interval: Duration::from_secs(1),
        claim_lookback: Duration::from_secs(10),
        ..broker.relay_config()
    };
    let (relay, shutdown) = broker.spawn_relay(&db, config);
    // The worker's floor moves up to now.
    enqueue_events(&db, "Happened", 10, 10).await;
    assert_eq!(broker.receive(10, Duration::from_secs(10)).await.len(), 10);

    // 1,000 events whose transactions began an hour ago: far below the floor.
    let late: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload,
                             created_at, next_attempt_at)
         SELECT gen_random_uuid(), 'test', 'late-' || n, 'Late', '{}',
                now() - interval '1 hour', now() - interval '1 hour'
         FROM generate_series(1, 1000) AS n
         RETURNING id",
    )
    .fetch_all(&db)
    .await
    .expect("late commits");

    // One full scan finds them (within its 1 s interval); then they drain at
    // once. One batch per full scan would take 20 s.
    let delivered = broker.receive(late.len(), Duration::from_secs(6)).await;
    let counts = delivery_counts(&delivered);
    assert_eq!(
        late.iter().filter(|id| counts.contains_key(*id)).count(),
        late.len(),
        "every late commit was published within 6 s"
    );
    shutdown.cancel();
    relay.join().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn an_exchange_deleted_under_the_relay_spends_no_attempts(db: PgPool) {
    let broker = TestBroker::new(&["test.#"]).await;
    let config = broker.relay_config();
    let publisher = broker.transport().connect("gone-test").await.expect("connects");
    enqueue_events(&db, "Happened", 5, 5).await;
    // The exchange goes: the broker closes the channel (404) on every message,
    // which is no one message's fault.
    let connection = outbox::amqp::connect(&test_support::amqp_url(), "gone-test").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_delete(broker.exchange.as_str().into(), Default::default())
        .await
        .expect("delete the exchange");

    let pass = relay_batch(&db, &publisher, &config, &RelayMetrics::default()).await.expect("pass");

    assert_eq!((pass.published, pass.failed, pass.unknown), (0, 0, 5), "{pass:?}");
    assert_eq!(spent_attempts(&db).await, (0, 0), "no attempt spent, nothing dead");
    assert!(!publisher.is_usable(), "replaced: a new connection declares the exchange again");
    let _ = connection.close(200, "done".into()).await;
    publisher.close().await;
    broker.delete().await;
}
