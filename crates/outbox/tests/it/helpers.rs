//! A test's own broker names and queue, events to relay, and a TCP proxy that can
//! take the broker away and bring it back.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, message::Delivery};
use outbox::relay::RelayConfig;
use sqlx::PgPool;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

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
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }

    pub fn relay_config(&self) -> RelayConfig {
        RelayConfig {
            amqp_url: amqp_url(),
            exchange: self.exchange.clone(),
            poll_interval: Duration::from_millis(100),
            ..RelayConfig::default()
        }
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

/// Writes `count` events of `event_type`, one transaction per `per_tx` events.
pub async fn enqueue_events(
    db: &PgPool,
    event_type: &str,
    count: usize,
    per_tx: usize,
) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(count);
    while ids.len() < count {
        let mut tx = db.begin().await.expect("begin");
        for _ in 0..per_tx.min(count - ids.len()) {
            let n = ids.len();
            let event = outbox::NewEvent {
                aggregate_type: "test".to_owned(),
                aggregate_id: format!("aggregate-{n}"),
                event_type: event_type.to_owned(),
                payload: serde_json::json!({ "n": n }),
                headers: serde_json::Map::from_iter([(
                    "traceparent".to_owned(),
                    serde_json::json!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                )]),
            };
            ids.push(outbox::enqueue(&mut tx, &event).await.expect("enqueue"));
        }
        tx.commit().await.expect("commit");
    }
    ids
}

pub async fn outbox_rows(db: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(db).await.expect("count")
}

/// Polls `check` until it holds or `within` passes; returns whether it held.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    check().await
}

/// A TCP proxy in front of RabbitMQ. `down()` cuts every proxied connection and
/// refuses new ones until `up()`: an outage the relay cannot tell from a real one.
pub struct BrokerProxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl BrokerProxy {
    pub async fn start() -> Self {
        let broker = url::Url::parse(&amqp_url()).expect("AMQP_URL is a URL");
        let target = format!(
            "{}:{}",
            broker.host_str().unwrap_or("127.0.0.1"),
            broker.port().unwrap_or(5672)
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let up = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (accept_up, accept_connections, accept_stop) =
            (up.clone(), connections.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = accept_stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut inbound, _)) = accepted else { continue };
                if !accept_up.load(Ordering::SeqCst) {
                    continue; // dropping `inbound` refuses the connection
                }
                let cut = accept_connections.lock().await.clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else { return };
                    tokio::select! {
                        () = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Self { port, up, connections, stop }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub async fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut connections = self.connections.lock().await;
        connections.cancel();
        *connections = CancellationToken::new();
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for BrokerProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
