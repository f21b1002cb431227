//! A test's own broker names and queue, and events to relay.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::AMQPValue;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, message::Delivery};
use outbox::rabbitmq::RabbitMq;
use outbox::relay::RelayConfig;
use sqlx::PgPool;
use test_support::amqp_url;
use uuid::Uuid;

/// An exchange and an exclusive queue that exist for one test only.
pub struct TestBroker {
    pub exchange: String,
    pub queue: String,
    connection: Connection,
    channel: Channel,
    deliveries: lapin::Consumer,
}

impl TestBroker {
    /// Declares the exchange and a queue bound with `binding_keys`, and starts
    /// consuming it.
    pub async fn new(binding_keys: &[&str]) -> Self {
        test_support::init_logging();
        let suffix = Uuid::new_v4().simple().to_string();
        let exchange = format!("test.relay.{suffix}");
        let queue = format!("test.relay.q.{suffix}");
        let connection = outbox::amqp::connect(&amqp_url(), "relay-test").await.expect("broker");
        let channel = connection.create_channel().await.expect("channel");
        outbox::amqp::declare_exchange(&channel, &exchange).await.expect("exchange");
        // Exclusive: the queue goes away with this test's connection.
        let options = QueueDeclareOptions { exclusive: true, ..QueueDeclareOptions::default() };
        channel
            .queue_declare(queue.as_str().into(), options, FieldTable::default())
            .await
            .expect("queue");
        let broker_channel = channel.clone();
        let deliveries = channel
            .basic_consume(
                queue.as_str().into(),
                "relay-test".into(),
                BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let broker = Self { exchange, queue, connection, channel: broker_channel, deliveries };
        for key in binding_keys {
            broker.bind(key).await;
        }
        broker
    }

    pub async fn bind(&self, binding_key: &str) {
        self.bind_queue(&self.queue, binding_key).await;
    }

    async fn bind_queue(&self, queue: &str, binding_key: &str) {
        self.channel
            .queue_bind(
                queue.into(),
                self.exchange.as_str().into(),
                binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }

    /// A relay pool on this test's exchange with `config`; stop it by
    /// cancelling the token, then `join`.
    pub fn spawn_relay(
        &self,
        db: &PgPool,
        config: RelayConfig,
    ) -> (outbox::relay::Relay, tokio_util::sync::CancellationToken) {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let metrics = outbox::metrics::RelayMetrics::default();
        let relay = outbox::relay::Relay::spawn(
            db.clone(),
            self.transport(),
            config,
            metrics,
            shutdown.clone(),
        )
        .expect("valid settings");
        (relay, shutdown)
    }

    pub fn relay_config(&self) -> RelayConfig {
        RelayConfig { poll_interval: Duration::from_millis(100), ..RelayConfig::default() }
    }

    /// The RabbitMQ transport publishing to this test's exchange.
    pub fn transport(&self) -> RabbitMq {
        self.transport_at(&amqp_url())
    }

    /// The same, through the broker at `url` (a proxy, say).
    pub fn transport_at(&self, url: &str) -> RabbitMq {
        RabbitMq::new(url, self.exchange.clone())
    }

    /// Binds `binding_key` to a second queue that holds nothing and refuses
    /// what it cannot hold (`x-max-length` 0, `reject-publish`): the broker nacks
    /// every message routed there, a failure that counts towards the limit.
    pub async fn bind_rejecting(&self, binding_key: &str) -> String {
        let queue = format!("{}.rejecting", self.queue);
        let mut arguments = FieldTable::default();
        arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
        arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        let options = QueueDeclareOptions { exclusive: true, ..QueueDeclareOptions::default() };
        self.channel.queue_declare(queue.as_str().into(), options, arguments).await.expect("queue");
        self.bind_queue(&queue, binding_key).await;
        queue
    }

    /// Deletes a queue made by [`TestBroker::bind_rejecting`].
    pub async fn delete_queue(&self, queue: &str) {
        self.channel
            .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
            .await
            .expect("delete queue");
    }

    /// Receives until `count` deliveries arrived or `within` passed.
    pub async fn receive(&mut self, count: usize, within: Duration) -> Vec<Delivery> {
        let deadline = tokio::time::Instant::now() + within;
        let mut received = Vec::new();
        while received.len() < count {
            match tokio::time::timeout_at(deadline, self.deliveries.next()).await {
                Ok(Some(Ok(delivery))) => received.push(delivery),
                Ok(Some(Err(error))) => panic!("consumer failed: {error}"),
                Ok(None) | Err(_) => break,
            }
        }
        received
    }

    /// Receives until each of `ids` has arrived at least once (duplicates
    /// allowed: delivery is at-least-once) or `within` passed; returns how many
    /// times each id arrived.
    pub async fn receive_all(&mut self, ids: &[Uuid], within: Duration) -> HashMap<Uuid, usize> {
        let deadline = tokio::time::Instant::now() + within;
        let mut counts: HashMap<Uuid, usize> = HashMap::new();
        while !ids.iter().all(|id| counts.contains_key(id)) {
            match tokio::time::timeout_at(deadline, self.deliveries.next()).await {
                Ok(Some(Ok(delivery))) => *counts.entry(message_id(&delivery)).or_default() += 1,
                Ok(Some(Err(error))) => panic!("consumer failed: {error}"),
                Ok(None) | Err(_) => break,
            }
        }
        counts
    }

    /// Whatever else arrives within `quiet` (to check nothing extra was sent).
    pub async fn receive_rest(&mut self, quiet: Duration) -> Vec<Delivery> {
        self.receive(usize::MAX, quiet).await
    }

    pub async fn delete(self) {
        let _ = self
            .channel
            .exchange_delete(self.exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

pub fn message_id(delivery: &Delivery) -> Uuid {
    delivery
        .properties
        .message_id()
        .as_ref()
        .expect("message_id set")
        .as_str()
        .parse()
        .expect("message_id is a UUID")
}

/// How many times each message id was delivered.
pub fn delivery_counts(deliveries: &[Delivery]) -> HashMap<Uuid, usize> {
    let mut counts = HashMap::new();
    for delivery in deliveries {
        *counts.entry(message_id(delivery)).or_default() += 1;
    }
    counts
}

/// Writes `count` events of `event_type`, one transaction per `per_tx` events,
/// each of an aggregate of its own (so that none waits for another: the relay
/// keeps one aggregate's events in order).
pub async fn enqueue_events(
    db: &PgPool,
    event_type: &str,
    count: usize,
    per_tx: usize,
) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(count);
    let call = Uuid::new_v4().simple().to_string();
    while ids.len() < count {
        let mut tx = db.begin().await.expect("begin");
        for _ in 0..per_tx.min(count - ids.len()) {
            let n = ids.len();
            let event = outbox::NewEvent {
                aggregate_type: "test".to_owned(),
                aggregate_id: format!("aggregate-{n}-{call}"),
                event_type: event_type.to_owned(),
                payload: serde_json::json!({ "n": n }),
                headers: serde_json::Map::from_iter([(
                    "traceparent".to_owned(),
                    serde_json::json!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                )]),
            };
            ids.push(outbox::enqueue_untyped(&mut tx, &event).await.expect("enqueue"));
        }
        tx.commit().await.expect("commit");
    }
    ids
}

/// Writes one event of `aggregate_id` in a transaction of its own.
pub async fn enqueue_one(
    db: &PgPool,
    aggregate_id: &str,
    event_type: &str,
    payload: serde_json::Value,
    headers: serde_json::Value,
) -> Uuid {
    let mut tx = db.begin().await.expect("begin");
    let event = outbox::NewEvent {
        aggregate_type: "test".to_owned(),
        aggregate_id: aggregate_id.to_owned(),
        event_type: event_type.to_owned(),
        payload,
        headers: headers.as_object().cloned().unwrap_or_default(),
    };
    let id = outbox::enqueue_untyped(&mut tx, &event).await.expect("enqueue");
    tx.commit().await.expect("commit");
    id
}

pub async fn outbox_rows(db: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(db).await.expect("count")
}
