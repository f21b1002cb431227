//! One suite for every transport: what the relay may rely on, whichever broker
//! it publishes to. Each test is written once against [`Harness`] and
//! [`outbox::Transport`]; `conformance!` instantiates the whole suite for a
//! harness, so a new transport gets every test with one line (see
//! `rabbitmq.rs` and `kafka.rs` beside this file).
//!
//! What a transport must do, as tested here:
//! - confirm before delete: every event arrives once, and only confirmed ones
//!   leave the outbox;
//! - one outcome per event, in order (confirmed, invalid, unroutable side by side);
//! - an unroutable event is parked with its reason, the rest go through;
//! - a poison event (one this transport can never carry) is parked at once, the
//!   rest go through;
//! - a broker that refuses connections, or holds every byte, costs no event an
//!   attempt, and no call waits past its deadline;
//! - a duplicate publish carries the same message id (consumers dedupe on it);
//! - one aggregate's events arrive in the order they were written;
//! - headers (the event's own, such as `traceparent`, and the relay's) and the
//!   event type are on the wire.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use chrono::Utc;
use outbox::event::OutboxEvent;
use outbox::metrics::RelayMetrics;
use outbox::relay::{RelayConfig, Unroutable, relay_batch};
use outbox::{Outcome, Publisher, Transport};
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use sqlx::types::Json;
use test_support::{Fault, FaultProxy};
use uuid::Uuid;

use crate::helpers::outbox_rows;

pub mod rabbitmq;

#[cfg(feature = "kafka")]
pub mod kafka;

/// The aggregate type whose events reach the harness's destination.
pub const ROUTABLE: &str = "conformance";
/// An aggregate type nothing receives.
pub const NOWHERE: &str = "nowhere";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// The deadline the harness gives connects, sends and confirms in the fault tests.
pub const DEADLINE: Duration = Duration::from_secs(1);

/// A message as it arrived, whatever the transport.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: Uuid,
    pub aggregate_id: String,
    pub event_type: String,
    pub headers: HashMap<String, String>,
    pub payload: Value,
}

/// What the suite needs of a transport's test setup: a destination of this test
/// alone, a way to read what arrived there, and a transport through a proxy for
/// the faults.
pub trait Harness: Sized {
    type Transport: Transport;

    /// Destinations for this test only, where events of aggregate type
    /// [`ROUTABLE`] arrive; those of [`NOWHERE`] are unroutable.
    fn new() -> impl Future<Output = Self>;

    /// The transport to this test's destinations.
    fn transport(&self) -> Self::Transport;

    /// The same transport, reaching the broker through `proxy` (started by
    /// [`Harness::proxy`]), with every connect, send and confirm cut at
    /// [`DEADLINE`].
    fn transport_through(&self, proxy: &FaultProxy) -> Self::Transport;

    /// A proxy in front of this harness's broker.
    fn proxy(&self) -> impl Future<Output = FaultProxy>;

    /// Whether every connection of a publisher goes through the proxy, or only
    /// the first (Kafka's clients reach each broker at the address the cluster
    /// advertises, past a proxy in front of the bootstrap address).
    const PROXIES_EVERY_CONNECTION: bool = true;

    /// An event this transport can never carry (it must say so without sending it).
    fn poison(&self) -> outbox::NewEvent;

    /// Waits until `count` messages arrived (or `within` passed) and returns
    /// every message received so far, in arrival order per aggregate.
    fn received(&mut self, count: usize, within: Duration) -> impl Future<Output = Vec<Received>>;

    /// Removes what the harness made on the broker.
    fn finish(self) -> impl Future<Output = ()>;
}

/// Instantiates the suite for `$harness`: one `#[sqlx::test]` per property.
macro_rules! conformance {
    ($harness:ty) => {
        conformance!(@tests $harness;
            every_event_arrives_once_and_only_confirmed_ones_leave,
            each_event_gets_its_own_outcome_in_order,
            an_unroutable_event_is_parked_and_the_rest_are_delivered,
            a_poison_event_is_parked_at_once_and_the_rest_are_delivered,
            a_broker_that_refuses_connections_costs_no_attempt,
            a_broker_that_holds_every_byte_costs_no_attempt_and_no_wait_past_the_deadline,
            a_duplicate_publish_carries_the_same_message_id,
            one_aggregates_events_arrive_in_the_order_written,
            one_aggregates_events_arrive_in_order_from_four_workers,
            headers_and_the_event_type_are_on_the_wire,
        );
    };
    (@tests $harness:ty; $($test:ident),* $(,)?) => {
        $(
            #[sqlx::test(migrator = "outbox::MIGRATOR")]
            async fn $test(db: sqlx::PgPool) {
                super::$test::<$harness>(db).await;
            }
        )*
    };
}
pub(crate) use conformance;

fn event(aggregate_type: &str, aggregate_id: &str, n: usize) -> outbox::NewEvent {
    outbox::NewEvent {
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id: aggregate_id.to_owned(),
        event_type: "Happened".to_owned(),
        payload: json!({ "aggregate": aggregate_id, "n": n }),
        headers: Map::from_iter([("traceparent".to_owned(), json!(TRACEPARENT))]),
    }
}

/// Writes `events` in one transaction; their ids, in order.
async fn enqueue(db: &PgPool, events: &[outbox::NewEvent]) -> Vec<Uuid> {
    let mut tx = db.begin().await.expect("begin");
    let ids = outbox::enqueue_many(&mut tx, events).await.expect("enqueue");
    tx.commit().await.expect("commit");
    ids
}

/// `per_aggregate` events for each of `aggregates` aggregates, interleaved.
fn interleaved(aggregates: usize, per_aggregate: usize) -> Vec<outbox::NewEvent> {
    (0..per_aggregate)
        .flat_map(|n| (0..aggregates).map(move |a| event(ROUTABLE, &format!("a-{a}"), n)))
        .collect()
}

/// An event as the relay would claim it, for calling a publisher directly.
fn claimed(aggregate_type: &str, event_type: &str) -> OutboxEvent {
    OutboxEvent {
        id: Uuid::now_v7(),
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id: "direct".to_owned(),
        event_type: event_type.to_owned(),
        payload: "{}".to_owned(),
        headers: Json(Map::new()),
        created_at: Utc::now(),
        attempts: 0,
        next_attempt_at: Utc::now(),
    }
}

fn config() -> RelayConfig {
    RelayConfig { batch_size: 7, ..RelayConfig::default() }
}

/// Relay passes until the outbox has no pending event left (or 30 s passed).
async fn drain<P: Publisher>(db: &PgPool, publisher: &P, config: &RelayConfig) {
    let metrics = RelayMetrics::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pending(db).await > 0 {
        assert!(Instant::now() < deadline, "the outbox did not drain within 30 s");
        relay_batch(db, publisher, config, &metrics).await.expect("relay pass");
    }
}

async fn pending(db: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE state = 'pending'")
        .fetch_one(db)
        .await
        .expect("count")
}

/// (state, attempts, last_error) of every outbox row.
async fn rows(db: &PgPool) -> Vec<(Uuid, String, i32, Option<String>)> {
    sqlx::query_as("SELECT id, state, attempts, last_error FROM outbox ORDER BY id")
        .fetch_all(db)
        .await
        .expect("rows")
}

fn counts(received: &[Received]) -> HashMap<Uuid, usize> {
    let mut counts = HashMap::new();
    for message in received {
        *counts.entry(message.id).or_default() += 1;
    }
    counts
}

async fn connect<H: Harness>(harness: &H) -> <H::Transport as Transport>::Publisher {
    harness.transport().connect("conformance").await.expect("publisher connects")
}

pub async fn every_event_arrives_once_and_only_confirmed_ones_leave<H: Harness>(db: PgPool) {
    let mut harness = H::new().await;
    let ids = enqueue(&db, &interleaved(6, 10)).await;
    let publisher = connect(&harness).await;

    drain(&db, &publisher, &config()).await;

    let received = harness.received(ids.len(), Duration::from_secs(20)).await;
    let counts = counts(&received);
    assert_eq!(received.len(), ids.len(), "every event arrived, none twice");
    assert!(ids.iter().all(|id| counts.get(id) == Some(&1)), "the ids are the outbox ids");
    assert_eq!(outbox_rows(&db).await, 0, "every confirmed event left the outbox");
    publisher.close().await;
    harness.finish().await;
}

pub async fn each_event_gets_its_own_outcome_in_order<H: Harness>(_db: PgPool) {
    let mut harness = H::new().await;
    let publisher = connect(&harness).await;
    let poison = harness.poison();
    let mut invalid = claimed(&poison.aggregate_type, &poison.event_type);
    invalid.payload = poison.payload.to_string();
    let events =
        [claimed(ROUTABLE, "First"), invalid, claimed(NOWHERE, "Lost"), claimed(ROUTABLE, "Last")];

    let outcomes = publisher.publish(&events).await.expect("the transport works");

    assert_eq!(outcomes.len(), 4, "{outcomes:?}");
    assert_eq!(outcomes[0], Outcome::Confirmed, "{outcomes:?}");
    assert!(matches!(outcomes[1], Outcome::Invalid(_)), "{outcomes:?}");
    assert!(matches!(outcomes[2], Outcome::Unroutable(_)), "{outcomes:?}");
    assert_eq!(outcomes[3], Outcome::Confirmed, "{outcomes:?}");
    let received = harness.received(2, Duration::from_secs(10)).await;
    let types: Vec<&str> = received.iter().map(|message| message.event_type.as_str()).collect();
    assert_eq!(types, ["First", "Last"], "only the confirmed ones arrived");
    publisher.close().await;
    harness.finish().await;
}

pub async fn an_unroutable_event_is_parked_and_the_rest_are_delivered<H: Harness>(db: PgPool) {
    let mut harness = H::new().await;
    let mut events = interleaved(2, 3);
    events.insert(2, event(NOWHERE, "n-1", 0));
    let ids = enqueue(&db, &events).await;
    let publisher = connect(&harness).await;

    let park = RelayConfig { unroutable: Unroutable::Park, ..config() };
    drain(&db, &publisher, &park).await;

    let received = harness.received(6, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 6, "the others arrived");
    let [(id, state, _, last_error)] = &rows(&db).await[..] else { panic!("one row left") };
    assert_eq!((id, state.as_str()), (&ids[2], "dead"));
    assert!(last_error.as_deref().is_some_and(|error| !error.is_empty()), "{last_error:?}");
    publisher.close().await;
    harness.finish().await;
}

pub async fn a_poison_event_is_parked_at_once_and_the_rest_are_delivered<H: Harness>(db: PgPool) {
    let mut harness = H::new().await;
    let mut events = interleaved(2, 5);
    events.insert(0, harness.poison());
    let ids = enqueue(&db, &events).await;
    let publisher = connect(&harness).await;

    let metrics = RelayMetrics::default();
    let pass = relay_batch(&db, &publisher, &config(), &metrics).await.expect("relay pass");
    assert_eq!(pass.dead, 1, "parked in the first pass: {pass:?}");
    drain(&db, &publisher, &config()).await;

    let received = harness.received(10, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 10, "the events behind it arrived");
    let [(id, state, _, last_error)] = &rows(&db).await[..] else { panic!("one row left") };
    assert_eq!((id, state.as_str()), (&ids[0], "dead"));
    assert!(last_error.as_deref().is_some_and(|error| !error.is_empty()), "{last_error:?}");
    publisher.close().await;
    harness.finish().await;
}

pub async fn a_broker_that_refuses_connections_costs_no_attempt<H: Harness>(db: PgPool) {
    let harness = H::new().await;
    let ids = enqueue(&db, &interleaved(2, 2)).await;
    let proxy = harness.proxy().await;
    proxy.down().await;

    let started = Instant::now();
    let connected = harness.transport_through(&proxy).connect("conformance").await;

    assert!(connected.is_err(), "no publisher from a broker that refuses connections");
    assert!(started.elapsed() < DEADLINE * 3, "gave up in {:?}", started.elapsed());
    let rows = rows(&db).await;
    assert_eq!(rows.len(), ids.len());
    assert!(rows.iter().all(|(_, state, attempts, _)| state == "pending" && *attempts == 0));
    harness.finish().await;
}

pub async fn a_broker_that_holds_every_byte_costs_no_attempt_and_no_wait_past_the_deadline<
    H: Harness,
>(
    db: PgPool,
) {
    let harness = H::new().await;
    let ids = enqueue(&db, &interleaved(2, 2)).await;
    let proxy = harness.proxy().await;
    let transport = harness.transport_through(&proxy);
    let metrics = RelayMetrics::default();

    // Held before the connection is made, or after: either way each call ends
    // by its deadline, and nothing is spent.
    proxy.set(Fault::Hold);
    let started = Instant::now();
    let connected = transport.connect("conformance").await;
    assert!(connected.is_err(), "no publisher from a broker that answers nothing");
    assert!(started.elapsed() < DEADLINE * 3, "gave up in {:?}", started.elapsed());

    proxy.set(Fault::Pass);
    if !H::PROXIES_EVERY_CONNECTION {
        eprintln!(
            "!! {}: a hold after connecting NOT tested: the publisher's connections bypass the proxy",
            std::any::type_name::<H>()
        );
        harness.finish().await;
        return;
    }
    let publisher = transport.connect("conformance").await.expect("connects once it answers");
    proxy.set(Fault::Hold);
    let started = Instant::now();
    let pass = relay_batch(&db, &publisher, &config(), &metrics).await;
    assert!(started.elapsed() < DEADLINE * 5, "the pass took {:?}", started.elapsed());
    if let Ok(pass) = &pass {
        assert_eq!(pass.published + pass.failed, 0, "{pass:?}");
    }

    let rows = rows(&db).await;
    assert_eq!(rows.len(), ids.len(), "nothing left the outbox");
    assert!(
        rows.iter().all(|(_, state, attempts, _)| state == "pending" && *attempts == 0),
        "no attempt spent: {rows:?}"
    );
    proxy.set(Fault::Pass);
    harness.finish().await;
}

pub async fn a_duplicate_publish_carries_the_same_message_id<H: Harness>(_db: PgPool) {
    let mut harness = H::new().await;
    let publisher = connect(&harness).await;
    let event = claimed(ROUTABLE, "Twice");

    for _ in 0..2 {
        let outcomes = publisher.publish(std::slice::from_ref(&event)).await.expect("publish");
        assert_eq!(outcomes, [Outcome::Confirmed]);
    }

    let received = harness.received(2, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 2);
    assert!(received.iter().all(|message| message.id == event.id), "{received:?}");
    publisher.close().await;
    harness.finish().await;
}

/// The `n` of each aggregate's events (see [`event`]), in the order they arrived.
fn arrival_order(received: &[Received]) -> HashMap<String, Vec<u64>> {
    let mut order: HashMap<String, Vec<u64>> = HashMap::new();
    for message in received {
        order
            .entry(message.aggregate_id.clone())
            .or_default()
            .push(message.payload["n"].as_u64().expect("n"));
    }
    order
}

pub async fn one_aggregates_events_arrive_in_the_order_written<H: Harness>(db: PgPool) {
    let mut harness = H::new().await;
    enqueue(&db, &interleaved(5, 6)).await;
    let publisher = connect(&harness).await;

    drain(&db, &publisher, &config()).await;

    let received = harness.received(30, Duration::from_secs(20)).await;
    assert_eq!(received.len(), 30);
    let order = arrival_order(&received);
    assert_eq!(order.len(), 5);
    for (aggregate, ns) in &order {
        assert_eq!(ns, &(0..6).collect::<Vec<u64>>(), "aggregate {aggregate}");
    }
    publisher.close().await;
    harness.finish().await;
}

/// Four workers, each with its own publisher, claiming two events a pass: an
/// aggregate's next event is claimed only once its previous one was confirmed,
/// whichever worker holds it.
pub async fn one_aggregates_events_arrive_in_order_from_four_workers<H: Harness>(db: PgPool) {
    let mut harness = H::new().await;
    enqueue(&db, &interleaved(4, 8)).await;
    let mut publishers = Vec::new();
    for _ in 0..4 {
        publishers.push(connect(&harness).await);
    }
    let config = RelayConfig { batch_size: 2, ..config() };

    futures_util::future::join_all(
        publishers.iter().map(|publisher| drain(&db, publisher, &config)),
    )
    .await;

    let received = harness.received(32, Duration::from_secs(20)).await;
    assert_eq!(received.len(), 32);
    let order = arrival_order(&received);
    assert_eq!(order.len(), 4);
    for (aggregate, ns) in &order {
        assert_eq!(ns, &(0..8).collect::<Vec<u64>>(), "aggregate {aggregate}");
    }
    for publisher in publishers {
        publisher.close().await;
    }
    harness.finish().await;
}

pub async fn headers_and_the_event_type_are_on_the_wire<H: Harness>(db: PgPool) {
    let mut harness = H::new().await;
    let [id] = enqueue(&db, &[event(ROUTABLE, "a-h", 7)]).await[..] else { unreachable!() };
    let created: chrono::DateTime<Utc> =
        sqlx::query_scalar("SELECT created_at FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&db)
            .await
            .expect("created_at");
    let publisher = connect(&harness).await;

    drain(&db, &publisher, &config()).await;

    let [message] = &harness.received(1, Duration::from_secs(10)).await[..] else {
        panic!("one message")
    };
    assert_eq!((message.id, message.event_type.as_str()), (id, "Happened"));
    assert_eq!(message.aggregate_id, "a-h");
    assert_eq!(message.payload, json!({ "aggregate": "a-h", "n": 7 }));
    let header = |name: &str| message.headers.get(name).map(String::as_str);
    assert_eq!(header("traceparent"), Some(TRACEPARENT));
    assert_eq!(header("aggregate_type"), Some(ROUTABLE));
    assert_eq!(header("aggregate_id"), Some("a-h"));
    let sent: chrono::DateTime<Utc> =
        header("x-created-at").expect("x-created-at").parse().expect("RFC 3339");
    assert_eq!(sent, created, "to the microsecond");
    publisher.close().await;
    harness.finish().await;
}
