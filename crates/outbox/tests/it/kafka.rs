//! The Kafka transport against a real broker (`KAFKA_BROKERS`; locally
//! `eval "$(scripts/kafka-broker.sh start)"`): every event arrives once, keyed by
//! its aggregate, in the partition Kafka's default partitioner picks, one
//! aggregate's events in order; an event whose topic does not exist stays in
//! the outbox. Each test has its own topics (a random prefix).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use outbox::kafka::{KafkaPublisher, KafkaTransport, partition_for_key};
use outbox::metrics::RelayMetrics;
use outbox::relay::{Relay, RelayConfig, Unroutable, relay_batch};
use outbox::transport::{Publisher, Transport};
use rskafka::client::partition::UnknownTopicHandling;
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::outbox_rows;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The broker the tests publish to. Unset is a failure, not a skip: a run that
/// asked for the Kafka tests (the feature `kafka`) must not pass without them.
pub(crate) fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "KAFKA_BROKERS is not set: start a local broker with \
             `eval \"$(scripts/kafka-broker.sh start)\"; export KAFKA_BROKERS` \
             (scripts/test.sh does it), or point it at a Kafka cluster"
        )
    })
}

/// A transport whose topics exist for one test only: `test.<random>.<aggregate_type>`.
pub(crate) struct TestKafka {
    pub(crate) transport: KafkaTransport,
    client: Client,
}

impl TestKafka {
    pub(crate) async fn new() -> Self {
        let brokers = kafka_brokers();
        let prefix = format!("test.{}.", Uuid::new_v4().simple());
        let transport = KafkaTransport::new(&brokers).topic_prefix(prefix);
        let client = ClientBuilder::new(transport.brokers().to_vec())
            .build()
            .await
            .unwrap_or_else(|error| panic!("cannot reach Kafka at {brokers}: {error}"));
        Self { transport, client }
    }

    /// Creates the topic of `aggregate_type` with `partitions` partitions.
    pub(crate) async fn create_topic(&self, aggregate_type: &str, partitions: i32) -> String {
        let topic = self.transport.topic_for(aggregate_type);
        let controller = self.client.controller_client().expect("controller client");
        controller.create_topic(&topic, partitions, 1, 5_000).await.expect("topic created");
        topic
    }

    pub(crate) async fn publisher(&self) -> KafkaPublisher {
        self.transport.connect("relay-test").await.expect("publisher connects")
    }

    pub(crate) async fn topic_exists(&self, topic: &str) -> bool {
        let topics = self.client.list_topics().await.expect("topics listed");
        topics.iter().any(|listed| listed.name == topic)
    }

    /// Every record of `topic`, per partition, in offset order.
    pub(crate) async fn read_all(
        &self,
        topic: &str,
        partitions: i32,
    ) -> BTreeMap<i32, Vec<Record>> {
        let mut all = BTreeMap::new();
        for partition in 0..partitions {
            let client = self
                .client
                .partition_client(topic, partition, UnknownTopicHandling::Retry)
                .await
                .expect("partition client");
            let mut records = Vec::new();
            let mut offset = 0;
            loop {
                let (batch, high_watermark) =
                    client.fetch_records(offset, 1..10_000_000, 100).await.expect("fetch");
                if let Some(last) = batch.last() {
                    offset = last.offset + 1;
                }
                records.extend(batch.into_iter().map(|record| record.record));
                if offset >= high_watermark {
                    break;
                }
            }
            all.insert(partition, records);
        }
        all
    }

    pub(crate) async fn delete_topic(&self, topic: &str) {
        let controller = self.client.controller_client().expect("controller client");
        let _ = controller.delete_topic(topic, 5_000).await;
    }
}

/// Writes `per_aggregate` events for each of `aggregates` in one transaction,
/// interleaved (a1, a2, …, a1, a2, …) so that each aggregate's order is
/// something the relay must keep. Returns their ids in enqueue order with their
/// aggregate id.
async fn enqueue_interleaved(
    db: &PgPool,
    aggregate_type: &str,
    aggregates: &[String],
    per_aggregate: usize,
) -> Vec<(Uuid, String)> {
    let events: Vec<outbox::NewEvent> = (0..per_aggregate)
        .flat_map(|n| {
            aggregates.iter().map(move |aggregate| outbox::NewEvent {
                aggregate_type: aggregate_type.to_owned(),
                aggregate_id: aggregate.clone(),
                event_type: "Happened".to_owned(),
                payload: serde_json::json!({ "aggregate": aggregate, "n": n }),
                headers: serde_json::Map::from_iter([(
                    "traceparent".to_owned(),
                    serde_json::json!(TRACEPARENT),
                )]),
            })
        })
        .collect();
    let mut tx = db.begin().await.expect("begin");
    let ids = outbox::enqueue_many(&mut tx, &events).await.expect("enqueue");
    tx.commit().await.expect("commit");
    ids.into_iter().zip(events.into_iter().map(|event| event.aggregate_id)).collect()
}

fn header(record: &Record, name: &str) -> String {
    let value = record.headers.get(name).unwrap_or_else(|| panic!("header {name} is missing"));
    String::from_utf8(value.clone()).expect("UTF-8 header")
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn kafka_every_event_arrives_once_in_its_aggregates_partition_in_order(db: PgPool) {
    const PARTITIONS: i32 = 4;
    let kafka = TestKafka::new().await;
    let topic = kafka.create_topic("order", PARTITIONS).await;
    let aggregates: Vec<String> = (0..8).map(|n| format!("order-{n}")).collect();
    let enqueued = enqueue_interleaved(&db, "order", &aggregates, 5).await;
    let publisher = kafka.publisher().await;
    let config = RelayConfig::default();
    let metrics = RelayMetrics::default();

    // A pass claims the head of each aggregate only: five passes of eight.
    for _ in 0..5 {
        let pass = relay_batch(&db, &publisher, &config, &metrics).await.expect("relay pass");
        assert_eq!((pass.claimed, pass.published, pass.failed, pass.unknown), (8, 8, 0, 0));
    }

    assert_eq!(outbox_rows(&db).await, 0, "the outbox is empty");
    assert_eq!(metrics.published.get(), 40);
    let partitions = kafka.read_all(&topic, PARTITIONS).await;

    // Every event once, under its own id.
    let mut seen: HashMap<Uuid, (i32, usize)> = HashMap::new();
    for (partition, records) in &partitions {
        for (position, record) in records.iter().enumerate() {
            let id: Uuid = header(record, "message_id").parse().expect("message_id is a UUID");
            assert!(seen.insert(id, (*partition, position)).is_none(), "{id} arrived twice");
        }
    }
    assert_eq!(seen.len(), enqueued.len(), "every event arrived once");
    assert!(enqueued.iter().all(|(id, _)| seen.contains_key(id)), "the records are the outbox's");

    // Keyed by aggregate, in the partition the partitioner computes, in order.
    for aggregate in &aggregates {
        let expected = partition_for_key(aggregate.as_bytes(), PARTITIONS);
        let ids: Vec<Uuid> =
            enqueued.iter().filter(|(_, of)| of == aggregate).map(|(id, _)| *id).collect();
        let positions: Vec<(i32, usize)> = ids.iter().map(|id| seen[id]).collect();
        assert!(
            positions.iter().all(|(partition, _)| *partition == expected),
            "all of {aggregate}'s events are in partition {expected}: {positions:?}"
        );
        assert!(
            positions.windows(2).all(|pair| pair[0].1 < pair[1].1),
            "{aggregate}'s events are in enqueue order: {positions:?}"
        );
    }
    let used = partitions.values().filter(|records| !records.is_empty()).count();
    assert!(used > 1, "the aggregates are spread over several partitions");

    for (partition, records) in &partitions {
        for record in records {
            let key = String::from_utf8(record.key.clone().expect("a key")).expect("UTF-8 key");
            assert_eq!(partition_for_key(key.as_bytes(), PARTITIONS), *partition);
            assert_eq!(header(record, "aggregate_id"), key, "the key is the aggregate id");
            assert_eq!(header(record, "aggregate_type"), "order");
            assert_eq!(header(record, "type"), "Happened");
            assert_eq!(header(record, "content-type"), "application/json");
            assert_eq!(header(record, "traceparent"), TRACEPARENT);
            let created_at = header(record, outbox::transport::CREATED_AT_HEADER);
            assert!(chrono::DateTime::parse_from_rfc3339(&created_at).is_ok(), "{created_at}");
            let body: serde_json::Value =
                serde_json::from_slice(record.value.as_deref().expect("a value")).expect("JSON");
            assert_eq!(body["aggregate"], key.as_str());
        }
    }
    publisher.close().await;
    kafka.delete_topic(&topic).await;
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn kafka_an_event_whose_topic_does_not_exist_stays_in_the_outbox(db: PgPool) {
    let kafka = TestKafka::new().await;
    let missing = kafka.transport.topic_for("nowhere");
    let [(parked, _)] = enqueue_interleaved(&db, "nowhere", &["n-1".to_owned()], 1).await[..]
    else {
        unreachable!()
    };
    let publisher = kafka.publisher().await;
    let metrics = RelayMetrics::default();

    // The default: parked, dead at once with the reason.
    let park = RelayConfig { unroutable: Unroutable::Park, ..RelayConfig::default() };
    let pass = relay_batch(&db, &publisher, &park, &metrics).await.expect("relay pass");
    assert_eq!((pass.claimed, pass.published, pass.failed), (1, 0, 1));
    let (state, last_error): (String, Option<String>) =
        sqlx::query_as("SELECT state, last_error FROM outbox WHERE id = $1")
            .bind(parked)
            .fetch_one(&db)
            .await
            .expect("still in the outbox");
    assert_eq!(state, "dead");
    assert!(
        last_error.as_deref().is_some_and(|error| error.contains("does not exist")),
        "{last_error:?}"
    );

    // Retry: pending, without spending an attempt.
    let [(waiting, _)] = enqueue_interleaved(&db, "nowhere", &["n-2".to_owned()], 1).await[..]
    else {
        unreachable!()
    };
    let retry = RelayConfig { unroutable: Unroutable::Retry, ..RelayConfig::default() };
    let pass = relay_batch(&db, &publisher, &retry, &metrics).await.expect("relay pass");
    assert_eq!((pass.claimed, pass.published, pass.failed), (1, 0, 1));
    let (state, attempts): (String, i32) =
        sqlx::query_as("SELECT state, attempts FROM outbox WHERE id = $1")
            .bind(waiting)
            .fetch_one(&db)
            .await
            .expect("still in the outbox");
    assert_eq!((state.as_str(), attempts), ("pending", 0));

    assert_eq!(outbox_rows(&db).await, 2, "nothing left the outbox");
    assert!(publisher.is_usable(), "a missing topic is not a broken connection");
    assert!(!kafka.topic_exists(&missing).await, "publishing did not create the topic");
    publisher.close().await;
}

#[sqlx::test(migrator = "outbox::MIGRATOR")]
async fn kafka_a_relay_pool_publishes_every_event_once(db: PgPool) {
    const PARTITIONS: i32 = 3;
    let kafka = TestKafka::new().await;
    let topic = kafka.create_topic("order", PARTITIONS).await;
    let aggregates: Vec<String> = (0..50).map(|n| format!("order-{n}")).collect();
    let enqueued = enqueue_interleaved(&db, "order", &aggregates, 20).await;
    let config = RelayConfig { workers: 3, batch_size: 50, ..RelayConfig::default() };
    let shutdown = CancellationToken::new();
    let metrics = RelayMetrics::default();
    let relay = Relay::spawn(
        db.clone(),
        kafka.transport.clone(),
        config,
        metrics.clone(),
        shutdown.clone(),
    )
    .expect("relay starts");

    let drained =
        test_support::eventually(Duration::from_secs(60), || async { outbox_rows(&db).await == 0 })
            .await;
    shutdown.cancel();
    relay.join().await;
    assert!(drained, "the relay drained the outbox");

    let mut counts: HashMap<Uuid, usize> = HashMap::new();
    for records in kafka.read_all(&topic, PARTITIONS).await.values() {
        for record in records {
            *counts.entry(header(record, "message_id").parse().expect("UUID")).or_default() += 1;
        }
    }
    assert_eq!(counts.len(), enqueued.len(), "every event arrived");
    assert!(counts.values().all(|count| *count == 1), "no event was published twice");
    assert_eq!(metrics.published.get(), enqueued.len() as u64);
    kafka.delete_topic(&topic).await;
}
