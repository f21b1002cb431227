//! The relay: every committed event reaches the broker, only confirmed events
//! leave the outbox, failures back off and end as dead events, and a crash
//! before commit means republishing, never loss.

use std::time::Duration;

use outbox::metrics::RelayMetrics;
use outbox::rabbitmq::RabbitMqPublisher;
use outbox::relay::{Relay, RelayConfig, Unroutable, relay_batch};
use outbox::{Publisher, Transport};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use test_support::{FaultProxy, eventually};

use crate::helpers::{TestBroker, delivery_counts, enqueue_events, message_id, outbox_rows};

async fn publisher_for(broker: &TestBroker) -> RabbitMqPublisher {
    broker.transport().connect("relay-test").await.expect("publisher connects")
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn every_event_arrives_once_with_several_workers(db: PgPool) {
    let mut broker = TestBroker::new(&["test.#"]).await;
    let ids = enqueue_events(&db, "Happened", 3_000, 100).await;
    let config = RelayConfig { workers: 4, batch_size: 50, ..broker.relay_config() };
    let shutdown = CancellationToken::new();
    let metrics = RelayMetrics::default();
    let relay =
        Relay::spawn(db.clone(), broker.transport(), config, metrics.clone(), shutdown.clone())
            .expect("valid settings");

    let deliveries = broker.receive(ids.len(), Duration::from_secs(60)).await;
    let extra = broker.receive_rest(Duration::from_millis(300)).await;
    shutdown.cancel();
    relay.join().await;

    let counts = delivery_counts(&deliveries);
    assert_eq!(deliveries.len(), ids.len(), "every event arrived");
    assert!(extra.is_empty(), "{} events were published twice", extra.len());
    assert!(counts.values().all(|count| *count == 1), "no event was published twice");
    assert!(ids.iter().all(|id| counts.contains_key(id)), "the delivered ids are the outbox ids");
    assert_eq!(outbox_rows(&db).await, 0);
    assert_eq!(metrics.published.get(), 3_000);

    let first = &deliveries[0];
    let properties = &first.properties;
    assert_eq!(properties.kind().as_ref().map(|kind| kind.as_str()), Some("Happened"));
    assert_eq!(
        properties.content_type().as_ref().map(|kind| kind.as_str()),
        Some("application/json")
    );
    assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
    assert!(properties.timestamp().is_some_and(|timestamp| timestamp > 0));
    let headers = properties.headers().as_ref().expect("headers");
    assert!(headers.inner().contains_key("aggregate_id"));
    assert!(headers.inner().contains_key("traceparent"));
    let body: serde_json::Value = serde_json::from_slice(&first.data).expect("JSON payload");
    assert!(body["n"].is_u64());
    broker.delete().await;
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn nothing_is_removed_while_the_broker_is_unreachable(db: PgPool) {
    let mut broker = TestBroker::new(&["test.#"]).await;
    let proxy = FaultProxy::broker().await;
    proxy.down().await;
    let config = RelayConfig { workers: 2, ..broker.relay_config() };
    let shutdown = CancellationToken::new();
    let transport = broker.transport_at(&proxy.url());
    let metrics = RelayMetrics::default();
    let relay = Relay::spawn(db.clone(), transport, config, metrics.clone(), shutdown.clone())
        .expect("valid settings");
    let status = relay.status();

    let first = enqueue_events(&db, "Happened", 50, 10).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(!status.broker_connected());
    assert_eq!(outbox_rows(&db).await, 50, "nothing leaves the outbox while the broker is away");
    let attempts: i64 = sqlx::query_scalar("SELECT coalesce(sum(attempts), 0) FROM outbox")
        .fetch_one(&db)
        .await
        .expect("attempts");
    assert_eq!(attempts, 0, "an outage does not spend the events' attempts");

    proxy.up();
    let delivered = broker.receive(50, Duration::from_secs(30)).await;
    assert_eq!(delivery_counts(&delivered).len(), 50);
    assert!(first.iter().all(|id| delivery_counts(&delivered).contains_key(id)));

    // The connection cut in the middle of a batch: the broker has the first
    // half of its messages, the relay no confirm for any. Nothing is lost, no
    // attempt is spent, and every event arrives (some twice).
    let mut tx = db.begin().await.expect("begin");
    let mut mid = Vec::new();
    for n in 0..40 {
        let event = outbox::NewEvent {
            aggregate_type: "test".to_owned(),
            aggregate_id: format!("mid-{n}"),
            event_type: "Happened".to_owned(),
            payload: serde_json::json!({ "mid": n }),
            headers: serde_json::Map::new(),
        };
        mid.push(outbox::enqueue_untyped(&mut tx, &event).await.expect("enqueue"));
    }
    // The 20th message's body, as the relay sends it (jsonb's text form).
    proxy.arm(br#"{"mid": 20}"#, test_support::OnMatch::Swallow);
    tx.commit().await.expect("commit");
    let delivered = broker.receive_all(&mid, Duration::from_secs(30)).await;
    assert!(proxy.fired(), "the connection was cut mid-batch");
    assert!(mid.iter().all(|id| delivered.contains_key(id)), "every event arrived");
    assert!(eventually(Duration::from_secs(5), || async { outbox_rows(&db).await == 0 }).await);
    assert_eq!(metrics.publish_failures.get(), 0, "the cut spent no event's attempt");

    // A second outage, this time cutting live connections.
    proxy.down().await;
    let second = enqueue_events(&db, "Happened", 30, 10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.up();
    // Duplicates of the cut batch may still be queued ahead of them.
    let counts = broker.receive_all(&second, Duration::from_secs(30)).await;
    assert!(
        second.iter().all(|id| counts.contains_key(id)),
        "events written during the outage arrive"
    );
    assert!(eventually(Duration::from_secs(5), || async { outbox_rows(&db).await == 0 }).await);
    assert!(status.broker_connected());

    shutdown.cancel();
    relay.join().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn an_unroutable_event_is_parked_as_dead_and_replayed_once_bound(db: PgPool) {
    // The queue is bound to other events only: nothing routes this one.
    let mut broker = TestBroker::new(&["test.SomethingElse"]).await;
    let config = RelayConfig { unroutable: Unroutable::Park, ..broker.relay_config() };
    let publisher = publisher_for(&broker).await;
    let [id] = enqueue_events(&db, "Unroutable", 1, 1).await[..] else { unreachable!() };

    let pass = relay_batch(&db, &publisher, &config, &RelayMetrics::default()).await.expect("pass");

    assert_eq!((pass.claimed, pass.published, pass.failed, pass.dead), (1, 0, 1, 1));
    let (state, last_error): (String, Option<String>) =
        sqlx::query_as("SELECT state, last_error FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&db)
            .await
            .expect("still in the outbox");
    assert_eq!(state, "dead", "parked at once, not after max_attempts");
    assert!(
        last_error.is_some_and(|error| error.contains("unroutable") && error.contains("NO_ROUTE"))
    );

    broker.bind("test.Unroutable").await;
    assert_eq!(outbox::store::replay_dead(&db, Some(id)).await.expect("replay"), 1);
    let pass = relay_batch(&db, &publisher, &config, &RelayMetrics::default()).await.expect("pass");
    assert_eq!(pass.published, 1);
    let delivered = broker.receive(1, Duration::from_secs(10)).await;
    assert_eq!(delivered.iter().map(message_id).collect::<Vec<Uuid>>(), vec![id]);
    publisher.close().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn an_unroutable_event_is_retried_without_spending_its_attempts(db: PgPool) {
    let broker = TestBroker::new(&["test.SomethingElse"]).await;
    let config = RelayConfig {
        unroutable: Unroutable::Retry,
        max_attempts: 1,
        retry_base: Duration::from_millis(50),
        retry_max: Duration::from_millis(100),
        ..broker.relay_config()
    };
    let publisher = publisher_for(&broker).await;
    let [id] = enqueue_events(&db, "Unroutable", 1, 1).await[..] else { unreachable!() };

    for _ in 0..3 {
        assert!(
            eventually(Duration::from_secs(5), || async {
                relay_batch(&db, &publisher, &config, &RelayMetrics::default())
                    .await
                    .expect("pass")
                    .failed
                    == 1
            })
            .await
        );
    }
    let (state, attempts, last_error): (String, i32, Option<String>) =
        sqlx::query_as("SELECT state, attempts, last_error FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&db)
            .await
            .expect("still in the outbox");
    assert_eq!((state.as_str(), attempts), ("pending", 0), "tried three times, none counted");
    assert!(last_error.is_some_and(|error| error.contains("NO_ROUTE")));
    publisher.close().await;
    broker.delete().await;
}

#[tokio::test]
async fn settings_that_could_never_publish_are_refused() {
    let broker_less = outbox::rabbitmq::RabbitMq::new(test_support::amqp_url(), "unused");
    let db = sqlx::PgPool::connect_lazy("postgres://127.0.0.1/unused").expect("lazy pool");
    for (config, setting) in [
        (RelayConfig { batch_size: 0, ..RelayConfig::default() }, "batch_size"),
        (RelayConfig { workers: 0, ..RelayConfig::default() }, "workers"),
        (RelayConfig { poll_interval: Duration::ZERO, ..RelayConfig::default() }, "poll_interval"),
        (RelayConfig { max_attempts: 0, ..RelayConfig::default() }, "max_attempts"),
        (
            RelayConfig { retry_max: Duration::from_millis(1), ..RelayConfig::default() },
            "retry_max",
        ),
    ] {
        let refused = Relay::spawn(
            db.clone(),
            broker_less.clone(),
            config,
            RelayMetrics::default(),
            CancellationToken::new(),
        );
        let error = refused.err().expect("refused").to_string();
        assert!(error.contains(setting), "{setting}: {error}");
    }
    assert!(
        outbox::rabbitmq::RabbitMq::new("amqp://x", "e").confirm_timeout(Duration::ZERO).is_err()
    );
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn a_relay_that_dies_before_its_commit_publishes_again(db: PgPool) {
    let mut broker = TestBroker::new(&["test.#"]).await;
    let config = broker.relay_config();
    let publisher = publisher_for(&broker).await;
    let ids = enqueue_events(&db, "Happened", 20, 20).await;
    // The pass publishes, deletes, then fails at COMMIT: as if killed right there.
    sqlx::raw_sql(
        "CREATE FUNCTION die_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'relay died before commit'; END; $$;
         CREATE CONSTRAINT TRIGGER die_at_commit AFTER DELETE ON outbox
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION die_at_commit();",
    )
    .execute(&db)
    .await
    .expect("trigger");

    let died = relay_batch(&db, &publisher, &config, &RelayMetrics::default()).await;
    assert!(died.is_err(), "the pass could not commit");
    let first = broker.receive(20, Duration::from_secs(10)).await;
    assert_eq!(first.len(), 20, "the broker had the events");
    assert_eq!(outbox_rows(&db).await, 20, "but the outbox still has them");

    sqlx::query("DROP TRIGGER die_at_commit ON outbox").execute(&db).await.expect("drop");
    let pass = relay_batch(&db, &publisher, &config, &RelayMetrics::default()).await.expect("pass");
    assert_eq!(pass.published, 20);
    let mut deliveries = first;
    deliveries.extend(broker.receive(20, Duration::from_secs(10)).await);

    let counts = delivery_counts(&deliveries);
    assert!(ids.iter().all(|id| counts.get(id) == Some(&2)), "published again: at-least-once");
    assert_eq!(outbox_rows(&db).await, 0);
    publisher.close().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn a_failing_event_backs_off_then_dies_without_blocking_the_others(db: PgPool) {
    let mut broker = TestBroker::new(&["test.Happened"]).await;
    // The broker nacks every `Rejected` event.
    let rejecting = broker.bind_rejecting("test.Rejected").await;
    let config = RelayConfig {
        max_attempts: 4,
        retry_base: Duration::from_millis(200),
        ..broker.relay_config()
    };
    let publisher = publisher_for(&broker).await;
    let metrics = RelayMetrics::default();
    let [poison] = enqueue_events(&db, "Rejected", 1, 1).await[..] else { unreachable!() };
    let behind = enqueue_events(&db, "Happened", 10, 10).await;

    let mut delays = Vec::new();
    for attempt in 1..=4 {
        assert!(
            eventually(Duration::from_secs(5), || async {
                relay_batch(&db, &publisher, &config, &metrics).await.expect("pass").failed == 1
            })
            .await,
            "attempt {attempt} happened once the backoff ended"
        );
        let (state, attempts, delay_ms): (String, i32, f64) = sqlx::query_as(
            "SELECT state, attempts,
                    extract(epoch FROM next_attempt_at - now())::float8 * 1000
             FROM outbox WHERE id = $1",
        )
        .bind(poison)
        .fetch_one(&db)
        .await
        .expect("the poison event is still there");
        assert_eq!(attempts, attempt);
        assert_eq!(state, if attempt < 4 { "pending" } else { "dead" });
        delays.push(delay_ms);
    }
    // Attempt n waits between half and all of 200 ms * 2^(n-1); the windows do
    // not overlap, so the delays grow. (A few ms pass between the update and the read.)
    for (n, delay) in delays.iter().take(3).enumerate() {
        let ceiling = 200.0 * f64::from(1 << n);
        assert!(*delay > ceiling / 2.0 - 50.0 && *delay <= ceiling, "delay {n}: {delays:?}");
    }
    assert!(delays[0] < delays[1] && delays[1] < delays[2], "{delays:?}");
    assert_eq!(metrics.dead.get(), 1);

    // Dead: no longer claimed, even though its next attempt time has passed.
    sqlx::query("UPDATE outbox SET next_attempt_at = now() - interval '1 hour'")
        .execute(&db)
        .await
        .expect("make due");
    let pass = relay_batch(&db, &publisher, &config, &metrics).await.expect("pass");
    assert_eq!(pass.claimed, 0);

    // The events behind it were published on the first pass.
    let delivered = broker.receive(10, Duration::from_secs(10)).await;
    let counts = delivery_counts(&delivered);
    assert!(behind.iter().all(|id| counts.contains_key(id)));

    let dead = outbox::store::dead_events(&db, 10).await.expect("dead events");
    assert_eq!(dead.iter().map(|event| event.id).collect::<Vec<Uuid>>(), vec![poison]);
    assert!(dead[0].last_error.as_deref().is_some_and(|error| error.contains("nacked")));

    // Replay, once it can be delivered.
    broker.delete_queue(&rejecting).await;
    broker.bind("test.Rejected").await;
    assert_eq!(outbox::store::replay_dead(&db, Some(poison)).await.expect("replay"), 1);
    let pass = relay_batch(&db, &publisher, &config, &metrics).await.expect("pass");
    assert_eq!(pass.published, 1);
    let replayed = broker.receive(1, Duration::from_secs(10)).await;
    assert_eq!(replayed.iter().map(message_id).collect::<Vec<Uuid>>(), vec![poison]);
    assert_eq!(outbox_rows(&db).await, 0);
    publisher.close().await;
    broker.delete().await;
}

#[tokio::test]
async fn a_node_list_connects_past_a_dead_node() {
    // Nothing listens on port 1: every attempt that starts there moves on.
    let urls = format!("amqp://guest:guest@127.0.0.1:1/%2f,{}", test_support::amqp_url());
    for _ in 0..5 {
        let connection = outbox::amqp::connect(&urls, "failover-test").await.expect("connects");
        assert!(connection.status().connected());
        let _ = connection.close(200, "done".into()).await;
    }
    let dead = outbox::amqp::connect("amqp://guest:guest@127.0.0.1:1/%2f", "failover-test").await;
    assert!(dead.is_err(), "a list of dead nodes is an error");
}
