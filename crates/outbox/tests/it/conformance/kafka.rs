//! The conformance suite on Kafka: this test's own topics (a random prefix), the
//! routable one with three partitions, acknowledged writes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use outbox::kafka::KafkaTransport;
use test_support::FaultProxy;

use super::{DEADLINE, Harness, ROUTABLE, Received, conformance};
use crate::kafka::{TestKafka, kafka_brokers};

const PARTITIONS: i32 = 3;

pub struct KafkaHarness {
    kafka: TestKafka,
    topic: String,
}

impl Harness for KafkaHarness {
    type Transport = KafkaTransport;

    const PROXIES_EVERY_CONNECTION: bool = false;

    async fn new() -> Self {
        let kafka = TestKafka::new().await;
        let topic = kafka.create_topic(ROUTABLE, PARTITIONS).await;
        Self { kafka, topic }
    }

    fn transport(&self) -> KafkaTransport {
        self.kafka.transport.clone()
    }

    fn transport_through(&self, proxy: &FaultProxy) -> KafkaTransport {
        let prefix = self.kafka.transport.topic_for("");
        KafkaTransport::new(&format!("127.0.0.1:{}", proxy.port))
            .topic_prefix(prefix)
            .produce_timeout(DEADLINE)
            .expect("a deadline")
    }

    async fn proxy(&self) -> FaultProxy {
        let brokers = kafka_brokers();
        let first = brokers.split(',').next().expect("a broker").trim().to_owned();
        FaultProxy::start(&first).await
    }

    /// A topic name Kafka does not allow (a space and `!`).
    fn poison(&self) -> outbox::NewEvent {
        outbox::NewEvent {
            aggregate_type: "bad topic!".to_owned(),
            aggregate_id: "poison".to_owned(),
            event_type: "Happened".to_owned(),
            payload: serde_json::json!({}),
            headers: serde_json::Map::new(),
        }
    }

    async fn received(&mut self, count: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let records = self.kafka.read_all(&self.topic, PARTITIONS).await;
            let total: usize = records.values().map(Vec::len).sum();
            if total >= count || Instant::now() >= deadline {
                return records.into_values().flatten().map(|record| received(&record)).collect();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn finish(self) {
        self.kafka.delete_topic(&self.topic).await;
    }
}

fn received(record: &rskafka::record::Record) -> Received {
    let headers: HashMap<String, String> = record
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), String::from_utf8_lossy(value).into_owned()))
        .collect();
    Received {
        id: headers["message_id"].parse().expect("message_id is a UUID"),
        aggregate_id: String::from_utf8(record.key.clone().unwrap_or_default()).expect("UTF-8 key"),
        event_type: headers.get("type").cloned().unwrap_or_default(),
        headers,
        payload: serde_json::from_slice(record.value.as_deref().unwrap_or_default())
            .expect("a JSON payload"),
    }
}

conformance!(KafkaHarness);
