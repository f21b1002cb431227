//! The Kafka transport (cargo feature `kafka`): publishes each batch with
//! produce requests that all in-sync replicas acknowledge.
//!
//! An event goes to the topic `<prefix><aggregate_type>` (`outbox.order` with
//! the default prefix [`DEFAULT_TOPIC_PREFIX`]), keyed by its aggregate id, in
//! the partition Kafka's default partitioner picks for that key
//! ([`partition_for_key`]: murmur2, as the Java client computes it). So all the
//! events of one aggregate land in one partition, in the order of the outbox,
//! and any other producer of the same key agrees on the partition. The value is
//! the event's JSON payload; the headers carry its id, type and the rest (see
//! [`KafkaPublisher`]).
//!
//! The relay never creates topics ([`KafkaTransport::ensure_topic`] is for an
//! application's start). The partition counts come from a listing of
//! all topics, which, unlike a metadata request naming a topic, does not create
//! the topic on a broker with `auto.create.topics.enable`: an event whose topic
//! is not listed is [`Outcome::Unroutable`] and stays in the outbox.
//!
//! rskafka 0.6 always asks for `acks = -1` (all in-sync replicas) and cannot be
//! told otherwise. It leaves Nagle's algorithm on and writes a request's length
//! and body separately, so a request smaller than one TCP segment waits for the
//! broker's delayed acknowledgement (40 ms on Linux): on loopback, produce
//! requests under 64 KB took 44 ms each, larger ones about 1 ms. The requests
//! of one batch are sent together, so a batch pays this once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use rskafka::BackoffConfig;
use rskafka::BackoffError;
use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;

use crate::event::OutboxEvent;
use crate::transport::{Outcome, Publisher, Transport};
use crate::{Error, Result};

/// The prefix of the topic names unless [`KafkaTransport::topic_prefix`] sets
/// another: events of the aggregate type `order` go to `outbox.order`.
pub const DEFAULT_TOPIC_PREFIX: &str = "outbox.";

/// How long a topic's partition count is trusted before it is listed again, as
/// the Java client's `metadata.max.age.ms`: partitions added to a topic are
/// used within this time. An error on a topic forgets it at once.
const METADATA_MAX_AGE: Duration = Duration::from_secs(300);

/// Kafka, as the relay's [`Transport`].
#[derive(Debug, Clone)]
pub struct KafkaTransport {
    brokers: Vec<String>,
    topic_prefix: String,
    produce_timeout: Duration,
}

impl KafkaTransport {
    /// Publishes to the cluster reached through `brokers`, a comma-separated
    /// list of `host:port` bootstrap brokers (`kafka-1:9092,kafka-2:9092`), to
    /// the topics `outbox.<aggregate_type>`. Writes are awaited 10 s.
    pub fn new(brokers: &str) -> Self {
        Self {
            brokers: brokers
                .split(',')
                .map(str::trim)
                .filter(|broker| !broker.is_empty())
                .map(str::to_owned)
                .collect(),
            topic_prefix: DEFAULT_TOPIC_PREFIX.to_owned(),
            produce_timeout: Duration::from_secs(10),
        }
    }

    /// Sets the prefix of the topic names: an event goes to the topic
    /// `<prefix><aggregate_type>`. May be empty.
    pub fn topic_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.topic_prefix = prefix.into();
        self
    }

    /// How long to wait for a batch's writes to be acknowledged (and to
    /// connect); a write without its acknowledgement by then is a failed
    /// attempt. Must be more than zero.
    pub fn produce_timeout(mut self, timeout: Duration) -> Result<Self> {
        if timeout.is_zero() {
            return Err(Error::Config("the produce timeout must be more than zero".to_owned()));
        }
        self.produce_timeout = timeout;
        Ok(self)
    }

    /// The bootstrap brokers.
    pub fn brokers(&self) -> &[String] {
        &self.brokers
    }

    /// The topic the events of `aggregate_type` are published to.
    pub fn topic_for(&self, aggregate_type: &str) -> String {
        format!("{}{aggregate_type}", self.topic_prefix)
    }

    /// Creates the topic of `aggregate_type` with `partitions` partitions
    /// and `replication_factor` replicas, unless it exists; whether it was
    /// created here. For an application's start: the relay itself never
    /// creates topics.
    pub async fn ensure_topic(
        &self,
        aggregate_type: &str,
        partitions: i32,
        replication_factor: i16,
    ) -> Result<bool> {
        let topic = self.topic_for(aggregate_type);
        let client =
            ClientBuilder::new(self.brokers.clone()).build().await.map_err(Error::broker)?;
        let listed = client.list_topics().await.map_err(Error::broker)?;
        if listed.iter().any(|listed| listed.name == topic) {
            return Ok(false);
        }
        let controller = client.controller_client().map_err(Error::broker)?;
        match controller.create_topic(&topic, partitions, replication_factor, 5_000).await {
            Ok(()) => Ok(true),
            // Created by another process meanwhile.
            Err(KafkaError::ServerError {
                protocol_error: ProtocolError::TopicAlreadyExists,
                ..
            }) => Ok(false),
            Err(error) => Err(Error::broker(error)),
        }
    }
}

impl Transport for KafkaTransport {
    type Publisher = KafkaPublisher;

    /// Connects to one of the bootstrap brokers and reads the cluster's
    /// metadata; `name` is the client id the brokers log.
    async fn connect(&self, name: &str) -> Result<KafkaPublisher> {
        if self.brokers.is_empty() {
            return Err(Error::Config("no Kafka broker is configured".to_owned()));
        }
        // rskafka retries lost connections and moved leaders by itself, by
        // default for ever; a produce is cut at the produce timeout anyway, so
        // it retries no longer than that, and at least every second so that a
        // broker that is back is used at once.
        let backoff = BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 3.0,
            deadline: Some(self.produce_timeout),
        };
        let building = ClientBuilder::new(self.brokers.clone())
            .client_id(name)
            .backoff_config(backoff)
            .build();
        let client = match tokio::time::timeout(self.produce_timeout, building).await {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => return Err(Error::broker(error)),
            Err(_) => {
                return Err(Error::Broker(
                    format!(
                        "no answer from the Kafka brokers {} within {:?}",
                        self.brokers.join(","),
                        self.produce_timeout
                    )
                    .into(),
                ));
            }
        };
        Ok(KafkaPublisher {
            client,
            transport: self.clone(),
            topics: Mutex::new(HashMap::new()),
            broken: AtomicBool::new(false),
        })
    }
}

/// One client of the cluster, owned by one relay worker, with the partition
/// counts (and a client per partition) of the topics it has published to.
///
/// Each event becomes a record whose key is the aggregate id and whose value
/// is the payload, with the headers: the event's own (such as `traceparent`),
/// then `message_id`, `type`, `aggregate_type`, `aggregate_id`,
/// `content-type: application/json` and `x-created-at` (the commit time, RFC
/// 3339 with microseconds, as on RabbitMQ), which win over stored headers of
/// the same names.
///
/// The outcome of an event is its partition's request's:
/// - [`Outcome::Confirmed`]: the partition's leader acknowledged the write
///   (after all in-sync replicas had it);
/// - [`Outcome::Unroutable`]: its topic is not listed;
/// - [`Outcome::Invalid`]: its topic name is not legal in Kafka (not sent);
/// - [`Outcome::Failed`]: the broker refused the write with an error that is
///   not retriable (a record too large, say);
/// - [`Outcome::Unknown`]: a retriable error (a moved leader, a spurious
///   `UNKNOWN_TOPIC_OR_PARTITION`, too few in-sync replicas), no acknowledgement
///   within the produce timeout, or a lost connection: the cluster's trouble,
///   no attempt spent; after a timeout or a lost connection the publisher is
///   replaced, so the next batch starts on fresh connections.
///
/// Any error on a topic drops its cached partitions, which the next batch
/// lists again.
#[derive(Debug)]
pub struct KafkaPublisher {
    client: Client,
    transport: KafkaTransport,
    topics: Mutex<HashMap<String, KnownTopic>>,
    /// Set when a connection broke or a write went unanswered: the worker then
    /// connects a new publisher, whose cache starts empty.
    broken: AtomicBool,
}

/// A topic's partitions, as listed at `listed_at`.
#[derive(Debug, Clone)]
struct KnownTopic {
    partitions: Vec<Arc<PartitionClient>>,
    listed_at: Instant,
}

/// Where the events of one topic go: its partitions, or why there are none.
type Route = std::result::Result<Vec<Arc<PartitionClient>>, String>;

impl Publisher for KafkaPublisher {
    /// Produces the events of each partition in one request, all partitions at
    /// once. `Err` when the topics' partitions cannot be learnt (before anything
    /// is sent).
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<Outcome>> {
        let invalid: Vec<Option<String>> = events
            .iter()
            .map(|event| check(&self.transport.topic_for(&event.aggregate_type)).err())
            .collect();
        let routes =
            match tokio::time::timeout(self.transport.produce_timeout, self.routes(events)).await {
                Ok(Ok(routes)) => routes,
                Ok(Err(error)) => {
                    self.broken.store(true, Ordering::Relaxed);
                    return Err(Error::broker(error));
                }
                Err(_) => {
                    self.broken.store(true, Ordering::Relaxed);
                    return Err(Error::Broker(
                        format!(
                            "no topic metadata from Kafka within {:?}",
                            self.transport.produce_timeout
                        )
                        .into(),
                    ));
                }
            };

        // Group the events by partition, keeping the outbox's order within each.
        let mut outcomes = vec![None; events.len()];
        let mut batches: BTreeMap<(String, i32), (Arc<PartitionClient>, Vec<usize>)> =
            BTreeMap::new();
        for (index, event) in events.iter().enumerate() {
            if let Some(reason) = &invalid[index] {
                outcomes[index] = Some(Outcome::Invalid(reason.clone()));
                continue;
            }
            let topic = self.transport.topic_for(&event.aggregate_type);
            match routes.get(&topic) {
                Some(Ok(partitions)) if !partitions.is_empty() => {
                    let count = i32::try_from(partitions.len()).unwrap_or(i32::MAX);
                    let partition = partition_for_key(event.aggregate_id.as_bytes(), count);
                    // In range: the partition is the key's hash modulo their number.
                    let client = partitions[partition as usize].clone();
                    batches.entry((topic, partition)).or_insert((client, Vec::new())).1.push(index);
                }
                Some(Err(reason)) => outcomes[index] = Some(Outcome::Unroutable(reason.clone())),
                _ => {
                    outcomes[index] =
                        Some(Outcome::Unroutable(format!("topic {topic} has no partitions")));
                }
            }
        }

        let produced = join_all(batches.into_iter().map(|((topic, _), (client, indexes))| {
            let records = indexes.iter().map(|index| record(&events[*index])).collect();
            async move {
                let producing = client.produce(records, Compression::NoCompression);
                let result = tokio::time::timeout(self.transport.produce_timeout, producing).await;
                (topic, client.partition(), indexes, result)
            }
        }))
        .await;

        for (topic, partition, indexes, result) in produced {
            let outcome = match result {
                Ok(Ok(_offsets)) => Outcome::Confirmed,
                Ok(Err(error)) => {
                    self.forget(&topic);
                    let (outcome, broken) = outcome_of_error(&topic, partition, &error);
                    if broken {
                        self.broken.store(true, Ordering::Relaxed);
                    }
                    outcome
                }
                Err(_) => {
                    // A stall of the cluster, not the event's failure.
                    self.forget(&topic);
                    self.broken.store(true, Ordering::Relaxed);
                    tracing::warn!(%topic, partition, timeout = ?self.transport.produce_timeout,
                        "no acknowledgement from Kafka in time");
                    Outcome::Unknown
                }
            };
            for index in indexes {
                outcomes[index] = Some(outcome.clone());
            }
        }
        Ok(outcomes.into_iter().map(|outcome| outcome.unwrap_or(Outcome::Unknown)).collect())
    }

    fn is_usable(&self) -> bool {
        !self.broken.load(Ordering::Relaxed)
    }

    /// Nothing to say to Kafka: dropping the client closes its connections.
    async fn close(self) {}
}

impl KafkaPublisher {
    /// The partitions of every topic `events` go to: from the cache when known
    /// and fresh, else from one listing of all topics.
    async fn routes(
        &self,
        events: &[OutboxEvent],
    ) -> std::result::Result<HashMap<String, Route>, KafkaError> {
        let mut routes = HashMap::new();
        let mut unknown = Vec::new();
        {
            let known = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
            for event in events {
                let topic = self.transport.topic_for(&event.aggregate_type);
                if routes.contains_key(&topic) || unknown.contains(&topic) {
                    continue;
                }
                match known.get(&topic) {
                    Some(entry) if entry.listed_at.elapsed() < METADATA_MAX_AGE => {
                        routes.insert(topic, Ok(entry.partitions.clone()));
                    }
                    _ => unknown.push(topic),
                }
            }
        }
        if unknown.is_empty() {
            return Ok(routes);
        }

        let listed = self.client.list_topics().await?;
        for topic in unknown {
            let Some(listing) = listed.iter().find(|listed| listed.name == topic) else {
                routes.insert(topic.clone(), Err(format!("topic {topic} does not exist")));
                continue;
            };
            let mut partitions = Vec::with_capacity(listing.partitions.len());
            for partition in 0..i32::try_from(listing.partitions.len()).unwrap_or(i32::MAX) {
                let client = self
                    .client
                    .partition_client(topic.as_str(), partition, UnknownTopicHandling::Error)
                    .await?;
                partitions.push(Arc::new(client));
            }
            let entry = KnownTopic { partitions: partitions.clone(), listed_at: Instant::now() };
            self.topics.lock().unwrap_or_else(PoisonError::into_inner).insert(topic.clone(), entry);
            routes.insert(topic, Ok(partitions));
        }
        Ok(routes)
    }

    /// Drops what is known of `topic`, so the next batch lists it again.
    fn forget(&self, topic: &str) {
        self.topics.lock().unwrap_or_else(PoisonError::into_inner).remove(topic);
    }
}

/// What a failed produce request means for its events, and whether the
/// connection is to be dropped. Whatever it is, the caller forgets the topic's
/// partitions, so the next batch reads its metadata again.
///
/// An error Kafka's error table marks retriable (a leader that moved, a
/// partition the broker does not know yet, too few in-sync replicas, a
/// timeout) is the cluster's trouble, not the event's: [`Outcome::Unknown`],
/// no attempt spent. So is `UNKNOWN_TOPIC_OR_PARTITION` on a topic that was
/// just listed: a topic that is really gone is found unlisted by the next
/// batch and is [`Outcome::Unroutable`] then.
fn outcome_of_error(topic: &str, partition: i32, error: &KafkaError) -> (Outcome, bool) {
    match error {
        KafkaError::ServerError { protocol_error, .. } if retriable(protocol_error) => {
            (Outcome::Unknown, false)
        }
        // rskafka retries a lost connection until its deadline: the request may
        // or may not have been written.
        KafkaError::Connection(_) | KafkaError::Request(_) => (Outcome::Unknown, true),
        KafkaError::RetryFailed(BackoffError::DeadlineExceded { source, .. }) => {
            match source.downcast_ref::<KafkaError>() {
                Some(KafkaError::Connection(_) | KafkaError::Request(_)) => {
                    (Outcome::Unknown, true)
                }
                Some(KafkaError::ServerError { protocol_error, .. })
                    if retriable(protocol_error) =>
                {
                    (Outcome::Unknown, false)
                }
                _ => (failed(topic, partition, error), false),
            }
        }
        _ => (failed(topic, partition, error), false),
    }
}

fn failed(topic: &str, partition: i32, error: &KafkaError) -> Outcome {
    Outcome::Failed(format!("partition {partition} of topic {topic}: {error}"))
}

/// Whether Kafka's error table (`org.apache.kafka.common.protocol.Errors`)
/// marks `error` retriable: the request may succeed if sent again, after a
/// metadata refresh. Broker-not-available is added: the broker is the trouble.
fn retriable(error: &ProtocolError) -> bool {
    use ProtocolError as E;
    matches!(
        error,
        E::CorruptMessage
            | E::UnknownTopicOrPartition
            | E::LeaderNotAvailable
            | E::NotLeaderOrFollower
            | E::RequestTimedOut
            | E::BrokerNotAvailable
            | E::ReplicaNotAvailable
            | E::NetworkException
            | E::CoordinatorLoadInProgress
            | E::CoordinatorNotAvailable
            | E::NotCoordinator
            | E::NotEnoughReplicas
            | E::NotEnoughReplicasAfterAppend
            | E::NotController
            | E::KafkaStorageError
            | E::FetchSessionIdNotFound
            | E::InvalidFetchSessionEpoch
            | E::ListenerNotFound
            | E::FencedLeaderEpoch
            | E::UnknownLeaderEpoch
            | E::OffsetNotAvailable
            | E::PreferredLeaderNotAvailable
            | E::EligibleLeadersNotAvailable
            | E::UnstableOffsetCommit
            | E::ThrottlingQuotaExceeded
            | E::ConcurrentTransactions
            | E::UnknownTopicId
    )
}

/// Why Kafka cannot take `event` at all, if it cannot: a topic name that is
/// not legal (at most 249 characters of `a-z A-Z 0-9 . _ -`, not `.` or `..`).
fn check(topic: &str) -> std::result::Result<(), String> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if topic.is_empty()
        || topic.len() > 249
        || topic == "."
        || topic == ".."
        || !topic.chars().all(legal)
    {
        return Err(format!(
            "its topic {:?} is not a legal Kafka topic name (1 to 249 characters of a-z, A-Z, 0-9, '.', '_', '-')",
            topic.chars().take(64).collect::<String>()
        ));
    }
    Ok(())
}

/// The Kafka record of `event`.
fn record(event: &OutboxEvent) -> Record {
    // The relay's headers come after the stored ones, so theirs win.
    let relay = [
        ("message_id", event.id.to_string()),
        ("type", event.event_type.clone()),
        ("content-type", "application/json".to_owned()),
    ];
    let headers: BTreeMap<String, Vec<u8>> = event
        .message_headers()
        .into_iter()
        .chain(relay.map(|(name, value)| (name.to_owned(), value)))
        .map(|(name, value)| (name, value.into_bytes()))
        .collect();
    Record {
        key: Some(event.aggregate_id.as_bytes().to_vec()),
        value: Some(event.payload.as_bytes().to_vec()),
        headers,
        // The time of the publish, as the Java producer stamps it: retention by
        // time then counts from when the record reached Kafka.
        timestamp: chrono::Utc::now(),
    }
}

/// The partition Kafka's default partitioner (the Java client's, and
/// librdkafka's `murmur2_random` for keyed records) picks for a record with
/// `key` in a topic of `partitions` partitions: the murmur2 hash of the key,
/// made positive by clearing its sign bit, modulo the partition count.
/// `partitions` must be more than zero.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// MurmurHash2 (32 bits, seed `0x9747b28c`) exactly as Kafka's
/// `org.apache.kafka.common.utils.Utils.murmur2` computes it: words read little
/// endian, the result as a Java `int`.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    // Java takes the length as an `int`; keys are far below 2 GiB.
    let mut h = SEED ^ (data.len() as u32);
    let mut words = data.chunks_exact(4);
    for word in &mut words {
        let mut k = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = words.remainder();
    if tail.len() == 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_agrees_with_the_java_client() {
        // Kafka's UtilsTest.testMurmur2.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ];
        for (key, hash) in cases {
            assert_eq!(murmur2(key), hash, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn a_key_maps_to_a_positive_partition_below_the_count() {
        // -973932308 & 0x7fffffff = 1173551340; "21" in 7 partitions: 1173551340 % 7.
        assert_eq!(partition_for_key(b"21", 7), 1_173_551_340 % 7);
        for count in 1..20 {
            for key in ["", "a", "order-1", "0193f5a2-7c1e-7d2a-9b1e-2f5c3d4e5f60"] {
                let partition = partition_for_key(key.as_bytes(), count);
                assert!((0..count).contains(&partition), "{key:?} in {count}: {partition}");
            }
        }
    }

    fn server_error(protocol_error: ProtocolError) -> KafkaError {
        KafkaError::ServerError {
            protocol_error,
            error_message: None,
            request: rskafka::client::error::RequestContext::Partition("outbox.order".into(), 0),
            response: None,
            is_virtual: false,
        }
    }

    #[test]
    fn a_retriable_error_is_the_cluster_s_trouble_not_the_event_s() {
        for error in [
            ProtocolError::UnknownTopicOrPartition,
            ProtocolError::NotLeaderOrFollower,
            ProtocolError::LeaderNotAvailable,
            ProtocolError::NotEnoughReplicas,
            ProtocolError::RequestTimedOut,
        ] {
            let (outcome, _) = outcome_of_error("outbox.order", 0, &server_error(error));
            assert_eq!(outcome, Outcome::Unknown, "{error:?} spends no attempt");
        }
        for error in [ProtocolError::MessageTooLarge, ProtocolError::InvalidRecord] {
            let (outcome, _) = outcome_of_error("outbox.order", 0, &server_error(error));
            assert!(matches!(outcome, Outcome::Failed(_)), "{error:?} is the event's: {outcome:?}");
        }
    }

    #[test]
    fn an_illegal_topic_name_is_refused_before_sending() {
        assert!(check("outbox.order").is_ok());
        assert!(check(&format!("outbox.{}", "x".repeat(300))).is_err());
        assert!(check("outbox.order/evil").is_err());
        assert!(check("..").is_err());
    }

    #[test]
    fn topics_are_the_prefix_and_the_aggregate_type() {
        let transport = KafkaTransport::new(" kafka-1:9092, kafka-2:9092 ,");
        assert_eq!(transport.brokers(), ["kafka-1:9092", "kafka-2:9092"]);
        assert_eq!(transport.topic_for("order"), "outbox.order");
        assert_eq!(transport.topic_prefix("").topic_for("order"), "order");
        assert!(KafkaTransport::new("k:9092").produce_timeout(Duration::ZERO).is_err());
    }
}
