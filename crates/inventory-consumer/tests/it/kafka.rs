//! inventory-consumer on Kafka (`CONSUMER_TRANSPORT=kafka`), against the
//! Kafka-protocol broker of KAFKA_BROKERS (scripts/test.sh starts one) and
//! order-service's relay on Kafka: the replicas split the partitions, each
//! held by one replica at a time; one that dies has its partitions taken over
//! within seconds; every event is applied once, its offset stored with its
//! effect; a poison record goes to the dead-letter topic and its partition
//! moves on; `dlq list|replay` read and replay that topic.

use std::time::Duration;

use rskafka::client::partition::{Compression, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;
use serde_json::json;
use sqlx::PgPool;
use test_support::eventually;
use uuid::Uuid;

use crate::dlq::{create_orders, messages_for_missing_orders};
use crate::helpers::{TestApi, TestBroker, TestConsumer, order_status, processed_count};

const PARTITIONS: i32 = 4;
const WITHIN: Duration = Duration::from_secs(20);

fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "KAFKA_BROKERS is not set: start a local broker with \
             `eval \"$(scripts/kafka-broker.sh start)\"; export KAFKA_BROKERS` \
             (scripts/test.sh does it), or point it at a Kafka cluster"
        )
    })
}

/// A topic prefix of this test's own, and a client to look at its topics.
struct TestTopics {
    brokers: String,
    prefix: String,
    client: Client,
}

impl TestTopics {
    async fn new() -> Self {
        let brokers = kafka_brokers();
        let prefix = format!("test.{}.", Uuid::new_v4().simple());
        let client = ClientBuilder::new(vec![brokers.clone()]).build().await.expect("Kafka");
        Self { brokers, prefix, client }
    }

    fn consumer_args(&self) -> Vec<String> {
        [
            "--consumer-transport",
            "kafka",
            "--kafka-brokers",
            &self.brokers,
            "--kafka-topic-prefix",
            &self.prefix,
            "--kafka-partitions",
            &PARTITIONS.to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn relay_args(&self) -> Vec<String> {
        let partitions = PARTITIONS.to_string();
        ["--relay-transport", "kafka", "--kafka-brokers", &self.brokers]
            .into_iter()
            .chain(["--kafka-topic-prefix", &self.prefix, "--kafka-partitions", &partitions])
            .map(str::to_owned)
            .collect()
    }

    async fn delete(self) {
        let controller = self.client.controller_client().expect("controller");
        for topic in [format!("{}order", self.prefix), format!("{}order.dlq", self.prefix)] {
            let _ = controller.delete_topic(&topic, 5_000).await;
        }
    }
}

/// order-service with its relay on this test's topics.
async fn spawn_api(db: &PgPool, broker: &TestBroker, topics: &TestTopics) -> TestApi {
    let args = topics.relay_args();
    TestApi::spawn(db, &broker.config, &args.iter().map(String::as_str).collect::<Vec<_>>()).await
}

async fn spawn_consumer(db: &PgPool, broker: &TestBroker, topics: &TestTopics) -> TestConsumer {
    let args = topics.consumer_args();
    TestConsumer::spawn(
        db.clone(),
        &broker.config,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await
}

/// The partitions each backend holds a lease (advisory lock) on, by pid.
async fn leases(db: &PgPool) -> Vec<(i32, i64)> {
    sqlx::query_as(
        "SELECT pid, count(*) FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND database =
               (SELECT oid FROM pg_database WHERE datname = current_database())
         GROUP BY pid ORDER BY pid",
    )
    .fetch_all(db)
    .await
    .expect("pg_locks")
}

async fn place_orders(api: &TestApi, count: usize) {
    let client = reqwest::Client::new();
    for n in 0..count {
        let order = json!({"customer_id": format!("kafka-{n}"),
                           "items": [{"sku": "SKU-002", "quantity": 1}]});
        let placed = client.post(format!("{}/orders", api.address)).json(&order).send().await;
        assert_eq!(placed.expect("an answer").status(), 201);
    }
}

/// A record as the relay writes one: its message id and event type as
/// headers, the event as its value.
fn event_record(message_id: &str, kind: &str, key: Option<String>, value: Vec<u8>) -> Record {
    Record {
        key: key.map(String::into_bytes),
        value: Some(value),
        headers: [("message_id", message_id), ("type", kind)]
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value.as_bytes().to_vec()))
            .collect(),
        timestamp: chrono::Utc::now(),
    }
}

async fn pending_orders(db: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'PENDING'")
        .fetch_one(db)
        .await
        .expect("count")
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn two_replicas_split_the_partitions_and_one_takes_the_dead_ones_over(db: PgPool) {
    let broker = TestBroker::new().await;
    let topics = TestTopics::new().await;
    // order-service, started first, creates the topic.
    let api = spawn_api(&db, &broker, &topics).await;
    let topic = format!("{}order", topics.prefix);
    let created = eventually(WITHIN, || async {
        let listed = topics.client.list_topics().await.expect("topics");
        listed.iter().any(|t| t.name == topic && t.partitions.len() == PARTITIONS as usize)
    });
    assert!(created.await, "order-service created {topic} with {PARTITIONS} partitions");
    let first = spawn_consumer(&db, &broker, &topics).await;
    let second = spawn_consumer(&db, &broker, &topics).await;
    let split = eventually(WITHIN, || async {
        let held = leases(&db).await;
        held.len() == 2 && held.iter().all(|(_, partitions)| *partitions == 2)
    });
    assert!(split.await, "two replicas hold two partitions each: {:?}", leases(&db).await);

    place_orders(&api, 60).await;
    let decided = eventually(WITHIN, || async { pending_orders(&db).await == 0 });
    assert!(decided.await, "{} orders still PENDING", pending_orders(&db).await);

    // One replica dies mid-flight: the other holds all four within seconds.
    first.kill().await;
    let taken = eventually(WITHIN, || async {
        leases(&db).await.iter().map(|(_, n)| n).sum::<i64>() == 4 && leases(&db).await.len() == 1
    });
    assert!(taken.await, "the survivor holds every partition: {:?}", leases(&db).await);
    place_orders(&api, 60).await;
    let decided = eventually(WITHIN, || async { pending_orders(&db).await == 0 });
    assert!(decided.await, "{} orders still PENDING after the takeover", pending_orders(&db).await);

    assert_eq!(processed_count(&db).await, 120, "each event applied once");
    let (partitions, records): (i64, Option<i64>) = sqlx::query_as(
        "SELECT count(*), sum(next_offset)::int8 FROM consumer_offsets WHERE consumer = 'inventory'",
    )
    .fetch_one(&db)
    .await
    .expect("offsets");
    assert_eq!(records, Some(120), "the stored offsets are past every record");
    assert!(partitions <= i64::from(PARTITIONS));

    // Its own pool: each service closes the test's when it stops.
    let observer = PgPool::connect_with((*db.connect_options()).clone()).await.expect("a pool");
    second.stop().await;
    api.stop().await;
    let members: i64 = sqlx::query_scalar("SELECT count(*) FROM consumer_members")
        .fetch_one(&observer)
        .await
        .expect("members");
    // The killed one's heartbeat may still be there; the stopped one's is not.
    assert_eq!(members, 0, "a stopped replica says it left; the killed one aged out");
    observer.close().await;
    topics.delete().await;
    broker.delete().await;
}

#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_poison_record_goes_to_the_dead_letter_topic_and_its_partition_moves_on(db: PgPool) {
    let broker = TestBroker::new().await;
    let topics = TestTopics::new().await;
    let consumer = spawn_consumer(&db, &broker, &topics).await;
    let held =
        eventually(WITHIN, || async { leases(&db).await.iter().map(|(_, n)| n).sum::<i64>() == 4 });
    assert!(held.await, "the consumer holds every partition");
    let ready = reqwest::get(format!("{}/readyz", consumer.address)).await.expect("readyz");
    assert_eq!(ready.status(), 200, "ready on Kafka, with no RabbitMQ queue to consume");

    let good = messages_for_missing_orders(1);
    create_orders(&db, &good).await;
    let record = |id: &str, kind: &str, value: Vec<u8>| event_record(id, kind, None, value);
    let poison_id = Uuid::now_v7().to_string();
    let partition = topics
        .client
        .partition_client(format!("{}order", topics.prefix), 1, UnknownTopicHandling::Retry)
        .await
        .expect("partition");
    let records = vec![
        record(&poison_id, "OrderPlaced", b"not json".to_vec()),
        record(
            &good[0].id.to_string(),
            "OrderPlaced",
            serde_json::to_vec(&good[0].event).expect("json"),
        ),
    ];
    partition.produce(records, Compression::NoCompression).await.expect("produced");

    let order = good[0].event.order_id();
    let applied = eventually(WITHIN, || async { order_status(&db, order).await == "COMPLETED" });
    assert!(applied.await, "the record behind the poison was applied");
    let dead_letters = topics
        .client
        .partition_client(format!("{}order.dlq", topics.prefix), 0, UnknownTopicHandling::Retry)
        .await
        .expect("dead-letter partition");
    let (letters, _) = dead_letters.fetch_records(0, 1..1_000_000, 1_000).await.expect("fetched");
    assert_eq!(letters.len(), 1, "one dead letter");
    let headers = &letters[0].record.headers;
    assert_eq!(headers.get("message_id").map(Vec::as_slice), Some(poison_id.as_bytes()));
    let reason = String::from_utf8_lossy(&headers["x-dead-letter-reason"]).into_owned();
    assert!(reason.contains("not a valid OrderPlaced"), "{reason}");
    assert_eq!(consumer.metrics.count("poison"), 1);

    consumer.stop().await;
    topics.delete().await;
    broker.delete().await;
}

/// A record for an order that does not exist yet, dead-lettered; listed by
/// `inventory-consumer dlq list` on Kafka with its reason; once the order
/// exists, replayed by its id to the partition it died on and applied; then no
/// longer listed, and a second replay of the id finds nothing.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_kafka_dead_letter_is_listed_replayed_to_its_partition_and_applied(db: PgPool) {
    use inventory_consumer::dlq::{self, Source};
    use inventory_consumer::{Config, DlqCommand};

    let broker = TestBroker::new().await;
    let topics = TestTopics::new().await;
    let consumer = spawn_consumer(&db, &broker, &topics).await;
    let config = Config::try_parse_command_line(
        std::iter::once("inventory-consumer".to_owned()).chain(topics.consumer_args()),
    )
    .expect("the consumer's settings");
    let source = Source::of(&config);
    assert!(matches!(source, Source::Kafka(_)), "{source:?}");

    let early = messages_for_missing_orders(1);
    let id = early[0].id.to_string();
    let partition = topics
        .client
        .partition_client(format!("{}order", topics.prefix), 2, UnknownTopicHandling::Retry)
        .await
        .expect("partition");
    let record = event_record(
        &id,
        "OrderPlaced",
        Some(early[0].event.order_id().to_string()),
        serde_json::to_vec(&early[0].event).expect("json"),
    );
    partition.produce(vec![record], Compression::NoCompression).await.expect("produced");
    let dead = eventually(WITHIN, || async { consumer.metrics.count("poison") == 1 });
    assert!(dead.await, "the record for a missing order was dead-lettered");

    let mut out = Vec::new();
    let list = DlqCommand::List { limit: 10, json: true };
    dlq::run(source.clone(), &list, &mut out).await.expect("dlq list");
    let listed: Vec<serde_json::Value> = String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["message_id"], id.as_str());
    assert_eq!(listed[0]["deaths"], 1);
    assert_eq!(listed[0]["type"], "OrderPlaced");
    let reason = listed[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("does not exist"), "{reason}");

    create_orders(&db, &early).await;
    let replay = DlqCommand::Replay { id: Some(id.clone()), all: false };
    let mut out = Vec::new();
    dlq::run(source.clone(), &replay, &mut out).await.expect("dlq replay");
    let said = String::from_utf8(out).expect("utf-8");
    assert!(said.starts_with("1 message(s) replayed"), "{said}");
    let order = early[0].event.order_id();
    let applied = eventually(WITHIN, || async { order_status(&db, order).await == "COMPLETED" });
    assert!(applied.await, "the replayed event was applied");
    let on_its_partition: Option<(i32,)> = sqlx::query_as(
        "SELECT partition FROM consumer_offsets WHERE topic = $1 AND partition = 2 AND next_offset = 2",
    )
    .bind(format!("{}order", topics.prefix))
    .fetch_optional(&db)
    .await
    .expect("offsets");
    assert!(on_its_partition.is_some(), "the replay went back to partition 2, after the letter");

    assert_eq!(source.list(10).await.expect("list"), [], "a replayed letter is not listed");
    let error = dlq::run(source, &replay, &mut Vec::new()).await.expect_err("nothing to replay");
    assert!(error.to_string().contains("no message with id"), "{error:#}");

    consumer.stop().await;
    topics.delete().await;
    broker.delete().await;
}

/// A stored offset past the partition's end (the topic deleted and created
/// again, say) is answered OffsetOutOfRange by the broker: the partition goes
/// on from the log's start, once, counted; it does not fail for ever.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_stored_offset_outside_the_log_moves_to_its_start(db: PgPool) {
    let broker = TestBroker::new().await;
    let topics = TestTopics::new().await;
    let topic = format!("{}order", topics.prefix);
    sqlx::query(
        "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset)
         VALUES ('inventory', $1, 0, 1000)",
    )
    .bind(&topic)
    .execute(&db)
    .await
    .expect("a stored offset from an earlier life of the topic");
    let consumer = spawn_consumer(&db, &broker, &topics).await;
    let messages = messages_for_missing_orders(1);
    create_orders(&db, &messages).await;
    let partition = topics
        .client
        .partition_client(topic.clone(), 0, UnknownTopicHandling::Retry)
        .await
        .expect("partition");
    let record = event_record(
        &messages[0].id.to_string(),
        "OrderPlaced",
        None,
        serde_json::to_vec(&messages[0].event).expect("json"),
    );
    partition.produce(vec![record], Compression::NoCompression).await.expect("produced");

    let order = messages[0].event.order_id();
    let applied = eventually(WITHIN, || async { order_status(&db, order).await == "COMPLETED" });
    assert!(applied.await, "the partition went on from its start and applied the record");
    let stored: i64 = sqlx::query_scalar(
        "SELECT next_offset FROM consumer_offsets WHERE topic = $1 AND partition = 0",
    )
    .bind(&topic)
    .fetch_one(&db)
    .await
    .expect("offset");
    assert_eq!(stored, 1);
    let metrics = reqwest::get(format!("{}/metrics", consumer.address))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("inventory_kafka_offset_resets_total 1\n"), "{metrics}");
    // The order decided on Kafka counts in the end-to-end lag, as on RabbitMQ.
    assert!(metrics.contains("inventory_e2e_lag_seconds_count 1\n"), "{metrics}");

    consumer.stop().await;
    topics.delete().await;
    broker.delete().await;
}

/// The lease connection broken under a running replica (its backend
/// terminated, as a network cut or a Postgres restart would): its locks are
/// gone at once, its workers stop at their next batch (the lease check), and
/// the replica takes its partitions again on a new connection; every event
/// is still applied once.
#[sqlx::test(migrator = "service_kit::MIGRATOR")]
async fn a_replica_whose_lease_connection_broke_takes_its_partitions_again(db: PgPool) {
    let broker = TestBroker::new().await;
    let topics = TestTopics::new().await;
    let api = spawn_api(&db, &broker, &topics).await;
    let consumer = spawn_consumer(&db, &broker, &topics).await;
    let held = eventually(WITHIN, || async {
        let held = leases(&db).await;
        held.len() == 1 && held[0].1 == 4
    });
    assert!(held.await, "one replica holds the four partitions: {:?}", leases(&db).await);
    place_orders(&api, 40).await;

    let old_pid = leases(&db).await[0].0;
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(old_pid)
        .fetch_one(&db)
        .await
        .expect("terminated");
    assert!(terminated);
    place_orders(&api, 40).await;
    let again = eventually(WITHIN, || async {
        let held = leases(&db).await;
        held.len() == 1 && held[0].0 != old_pid && held[0].1 == 4
    });
    assert!(again.await, "the partitions held again on a new connection: {:?}", leases(&db).await);
    let decided = eventually(WITHIN, || async { pending_orders(&db).await == 0 });
    assert!(decided.await, "{} orders still PENDING", pending_orders(&db).await);
    assert_eq!(processed_count(&db).await, 80, "each event applied once");

    consumer.stop().await;
    api.stop().await;
    topics.delete().await;
    broker.delete().await;
}
