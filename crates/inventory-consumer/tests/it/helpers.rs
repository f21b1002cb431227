//! A test's own topology with a publisher and a dead-letter reader, the consumer
//! run in-process, and orders written straight into the database.

use std::time::Duration;

use clap::Parser;
use inventory_consumer::message::{Message, OrderEvent};
use inventory_consumer::metrics::ConsumerMetrics;
use inventory_consumer::{Application, Config};
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use order_events::{OrderPlaced, OrderPlacedLine, VERSION_HEADER};
use outbox::Event as _;
use serde_json::Value;
use service_kit::broker::BrokerConfig;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// This test's exchange, queue and dead-letter queue, and a channel to publish
/// to them as the relay would.
pub struct TestBroker {
    pub config: BrokerConfig,
    connection: Connection,
    channel: Channel,
}

impl TestBroker {
    pub async fn new() -> Self {
        Self::new_with(|_| {}).await
    }

    /// Like [`TestBroker::new`], with the settings changed by `adjust` before the
    /// topology is declared.
    pub async fn new_with(adjust: impl FnOnce(&mut BrokerConfig)) -> Self {
        let mut config = BrokerConfig::for_test(&Uuid::new_v4().simple().to_string());
        adjust(&mut config);
        let connection =
            outbox::amqp::connect(&config.amqp_url, "consumer-test").await.expect("broker");
        let channel = connection.create_channel().await.expect("channel");
        channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
        config.inventory_topology().declare(&channel).await.expect("topology");
        Self { config, connection, channel }
    }

    /// The channel the helper publishes on, for tests that drive the broker directly.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Publishes `message` as the relay does.
    pub async fn publish(&self, message: &Message) {
        let body = serde_json::to_vec(&message.event).expect("json");
        let id = message.id.to_string();
        let kind = match message.event {
            OrderEvent::Placed(_) => OrderPlaced::EVENT_TYPE,
            OrderEvent::Cancelled(_) => order_events::OrderCancelled::EVENT_TYPE,
        };
        self.publish_raw(Some(&id), Some(kind), &body).await;
    }

    /// Publishes `message` as the relay does, with `properties` (message id and
    /// type are set here), and waits for the broker's confirm.
    pub async fn publish_with(&self, message: &Message, properties: BasicProperties) {
        let body = serde_json::to_vec(&message.event).expect("json");
        let properties = properties
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(message.id.to_string()))
            .with_type(ShortString::from(OrderPlaced::EVENT_TYPE));
        self.publish_properties(properties, &body).await;
    }

    /// Publishes a message with these properties and body, and waits for the
    /// broker's confirm.
    pub async fn publish_raw(&self, message_id: Option<&str>, kind: Option<&str>, body: &[u8]) {
        self.publish_with_headers(message_id, kind, FieldTable::default(), body).await;
    }

    /// An OrderPlaced `body` with message id `id`, stamped with `version` (the
    /// event version header) when given.
    pub async fn publish_versioned(&self, id: Uuid, version: Option<&str>, body: &Value) {
        let mut headers = FieldTable::default();
        if let Some(version) = version {
            headers.insert(VERSION_HEADER.into(), AMQPValue::LongString(version.into()));
        }
        let body = serde_json::to_vec(body).expect("json");
        let id = id.to_string();
        self.publish_with_headers(Some(&id), Some(OrderPlaced::EVENT_TYPE), headers, &body).await;
    }

    async fn publish_with_headers(
        &self,
        message_id: Option<&str>,
        kind: Option<&str>,
        headers: FieldTable,
        body: &[u8],
    ) {
        let mut properties = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
        if let Some(id) = message_id {
            properties = properties.with_message_id(ShortString::from(id));
        }
        if let Some(kind) = kind {
            properties = properties.with_type(ShortString::from(kind));
        }
        self.publish_properties(properties, body).await;
    }

    async fn publish_properties(&self, properties: BasicProperties, body: &[u8]) {
        let confirm = self
            .channel
            .basic_publish(
                self.config.exchange.as_str().into(),
                self.config.inventory_binding.as_str().into(),
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "the broker did not confirm a test message");
    }

    /// Takes up to `count` dead-lettered messages, waiting at most `within`.
    pub async fn dead_letters(
        &self,
        count: usize,
        within: Duration,
    ) -> Vec<lapin::message::Delivery> {
        let deadline = tokio::time::Instant::now() + within;
        let mut dead = Vec::new();
        while dead.len() < count && tokio::time::Instant::now() < deadline {
            let got = self
                .channel
                .basic_get(
                    self.config.dead_letter_queue.as_str().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic.get");
            match got {
                Some(message) => dead.push(message.delivery),
                None => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
        dead
    }

    /// Messages ready in the inventory queue (not counting unacked ones).
    pub async fn ready_messages(&self) -> u32 {
        self.depth(&self.config.inventory_queue).await
    }

    /// Messages ready in the dead-letter queue (not counting unacked ones).
    pub async fn dead_letter_depth(&self) -> u32 {
        self.depth(&self.config.dead_letter_queue).await
    }

    async fn depth(&self, queue: &str) -> u32 {
        inventory_consumer::dead_letter::queue_depth(&self.channel, queue)
            .await
            .expect("queue exists")
    }

    pub async fn delete(self) {
        let _ = self.connection.close(200, "test done".into()).await;
        let config = &self.config;
        test_support::delete_topology(
            &config.amqp_url,
            &[&config.inventory_queue, &config.dead_letter_queue],
            &[&config.exchange, &config.dead_letter_exchange],
        )
        .await;
    }
}

/// order-service in-process, with its relay publishing to a test's topology.
///
/// [`TestApi::stop`] checks the invariant every test that relays ends with: no
/// pending event is left in the outbox, and no dead one (a test that runs no
/// relay, `--relay-workers 0`, is not checked).
pub struct TestApi {
    pub address: String,
    db: PgPool,
    relays: bool,
    shutdown: CancellationToken,
    stopped: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestApi {
    /// Starts order-service on port 0 over `db`; `args` add or override flags.
    pub async fn spawn(db: &PgPool, broker: &BrokerConfig, args: &[&str]) -> Self {
        test_support::init_logging();
        let mut command =
            vec!["order-service".to_owned(), "--listen-addr".into(), "127.0.0.1:0".into()];
        command.extend(broker.to_args());
        command.extend(args.iter().map(|arg| (*arg).to_owned()));
        let config = order_service::Config::parse_from(command);
        let app = order_service::Application::build_with_pool(config, db.clone())
            .await
            .expect("order-service builds");
        let address = format!("http://127.0.0.1:{}", app.port());
        let shutdown = CancellationToken::new();
        let stopped = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        let relays = !args.windows(2).any(|pair| pair == ["--relay-workers", "0"]);
        // Its own pool: the test's may be closed by a consumer stopped first.
        let db = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with((*db.connect_options()).clone());
        Self { address, db, relays, shutdown, stopped }
    }

    /// Checks the outbox invariant (when this order-service relays), then shuts
    /// order-service down and waits until it has stopped.
    pub async fn stop(self) {
        self.stop_with_dead(0).await;
    }

    /// [`TestApi::stop`] for a test that made `dead` dead events on purpose.
    pub async fn stop_with_dead(self, dead: i64) {
        if self.relays {
            test_support::assert_outbox_settled(&self.db, dead, Duration::from_secs(15)).await;
        }
        self.shutdown.cancel();
        self.stopped.await.expect("order-service task").expect("order-service stops cleanly");
    }
}

/// The consumer, in-process, until dropped.
pub struct TestConsumer {
    pub metrics: ConsumerMetrics,
    pub address: String,
    shutdown: CancellationToken,
    stopped: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestConsumer {
    /// Starts a consumer of `broker`'s queue; `args` add or override flags.
    pub async fn spawn(db: PgPool, broker: &BrokerConfig, args: &[&str]) -> Self {
        Self::spawn_armed(db, broker, args, 0).await
    }

    /// Like [`TestConsumer::spawn`], with workers that panic before each of their
    /// first `panics` batches (the supervisor restarts them).
    pub async fn spawn_armed(
        db: PgPool,
        broker: &BrokerConfig,
        args: &[&str],
        panics: usize,
    ) -> Self {
        test_support::init_logging();
        let config = Config::parse_from(
            consumer_args(broker)
                .iter()
                .map(String::as_str)
                .chain(["--listen-addr", "127.0.0.1:0"].into_iter().chain(args.iter().copied())),
        );
        let app = Application::build_with_pool(config, db).await.expect("consumer builds");
        app.crash_switch().crash_next(panics);
        let address = format!("http://127.0.0.1:{}", app.port());
        let metrics = app.metrics();
        let shutdown = CancellationToken::new();
        let stopped = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        Self { metrics, address, shutdown, stopped }
    }

    /// Messages settled so far, whatever their outcome.
    pub fn settled(&self) -> u64 {
        [
            "completed",
            "rejected",
            "cancelled",
            "cancelled_before_placed",
            "duplicate",
            "already_decided",
            "poison",
        ]
        .into_iter()
        .map(|outcome| self.metrics.count(outcome))
        .sum()
    }

    /// Waits until `count` messages are settled; panics after `within`.
    pub async fn wait_settled(&self, count: u64, within: Duration) {
        let settled = test_support::eventually(within, || async { self.settled() >= count }).await;
        assert!(settled, "{} of {count} messages settled in {within:?}", self.settled());
    }

    /// Ends the consumer as a crash would: its task dropped mid-flight, its
    /// connections closed without a goodbye, nothing finished.
    pub async fn kill(self) {
        self.stopped.abort();
        let _ = self.stopped.await;
    }

    /// Shuts the consumer down and waits until it has stopped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.stopped.await.expect("consumer task").expect("consumer stops cleanly");
    }
}

/// The command line (program name first) pointing a consumer at `broker`'s topology.
pub fn consumer_args(broker: &BrokerConfig) -> Vec<String> {
    let mut args = vec!["inventory-consumer".to_owned()];
    args.extend(broker.to_args());
    args
}

/// Writes PENDING orders (one per entry of `orders`: its lines as sku and
/// quantity) and returns the OrderPlaced message of each.
pub async fn insert_orders(db: &PgPool, orders: &[Vec<(&str, i32)>]) -> Vec<Message> {
    let mut tx = db.begin().await.expect("begin");
    let mut messages = Vec::with_capacity(orders.len());
    for lines in orders {
        let order_id = Uuid::now_v7();
        sqlx::query("INSERT INTO orders (id, customer_id, total_cents) VALUES ($1, 'test', 0)")
            .bind(order_id)
            .execute(&mut *tx)
            .await
            .expect("insert order");
        for (sku, quantity) in lines {
            sqlx::query(
                "INSERT INTO order_lines (order_id, sku, quantity, unit_price_cents)
                 VALUES ($1, $2, $3, 0)",
            )
            .bind(order_id)
            .bind(sku)
            .bind(quantity)
            .execute(&mut *tx)
            .await
            .expect("insert line");
        }
        let event = OrderPlaced {
            order_id,
            customer_id: "test".to_owned(),
            lines: lines
                .iter()
                .map(|(sku, quantity)| OrderPlacedLine {
                    sku: (*sku).to_owned(),
                    quantity: *quantity,
                })
                .collect(),
            total_cents: 0,
        };
        messages.push(Message { id: Uuid::now_v7(), event: event.into() });
    }
    tx.commit().await.expect("commit");
    messages
}

/// How many of `ids` have `status`.
pub async fn count_with_status(db: &PgPool, ids: &[Uuid], status: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = ANY($1) AND status = $2")
        .bind(ids)
        .bind(status)
        .fetch_one(db)
        .await
        .expect("count")
}

pub async fn order_status(db: &PgPool, order_id: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
        .bind(order_id)
        .fetch_one(db)
        .await
        .expect("order exists")
}

pub async fn available(db: &PgPool, sku: &str) -> i64 {
    sqlx::query_scalar("SELECT available::int8 FROM inventory WHERE sku = $1")
        .bind(sku)
        .fetch_one(db)
        .await
        .expect("sku exists")
}

/// Stock of `sku` held by COMPLETED orders, by their lines.
pub async fn reserved(db: &PgPool, sku: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(l.quantity), 0)::int8 FROM order_lines l
         JOIN orders o ON o.id = l.order_id WHERE o.status = 'COMPLETED' AND l.sku = $1",
    )
    .bind(sku)
    .fetch_one(db)
    .await
    .expect("reserved")
}

pub async fn processed_count(db: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM processed_messages")
        .fetch_one(db)
        .await
        .expect("count")
}
