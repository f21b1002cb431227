//! The RabbitMQ settings both services share: where the broker is and the names of
//! the topology both sides declare at start-up, with defaults that match.

use outbox::amqp::{ConsumerQueue, QueueType};

/// Flattened into both services' configuration, so one environment configures
/// both sides alike.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerConfig {
    /// AMQP URL of RabbitMQ, or a comma-separated list of the URLs of a cluster's
    /// nodes: each connection starts at a random one and tries the next on failure.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,

    /// Type of the inventory queue and its dead-letter queue: `quorum`
    /// (replicated, survives the loss of a node) or `classic` (on one node). Every
    /// process must declare the same: a queue's type cannot change in place.
    #[arg(long, env = "QUEUE_TYPE", default_value = "quorum")]
    pub queue_type: QueueType,

    /// Quorum queues: deliveries of one message without an ack (its consumer
    /// crashed or timed out each time) after which it is dead-lettered. A crash
    /// also counts against the other messages a worker held (up to PREFETCH), so
    /// leave room for several crashes. Every process must declare the same.
    #[arg(long, env = "DELIVERY_LIMIT", default_value_t = 20)]
    pub delivery_limit: u32,

    /// Durable topic exchange the order events are published to.
    #[arg(long, env = "EXCHANGE", default_value = "orders")]
    pub exchange: String,

    /// Durable queue of the inventory consumer, bound to the exchange.
    #[arg(long, env = "INVENTORY_QUEUE", default_value = "inventory.order-placed")]
    pub inventory_queue: String,

    /// Binding key of the inventory queue (routing keys are `<aggregate>.<event>`):
    /// by default every order event (`OrderPlaced`, `OrderCancelled`).
    #[arg(long, env = "INVENTORY_BINDING", default_value = "order.*")]
    pub inventory_binding: String,

    /// Exchange that messages rejected by the inventory consumer are dead-lettered to.
    #[arg(long, env = "DEAD_LETTER_EXCHANGE", default_value = "orders.dlx")]
    pub dead_letter_exchange: String,

    /// Queue holding dead-lettered messages for inspection.
    #[arg(long, env = "DEAD_LETTER_QUEUE", default_value = "inventory.order-placed.dead")]
    pub dead_letter_queue: String,
}

impl BrokerConfig {
    /// The inventory consumer's queue with its binding and dead-lettering.
    pub fn inventory_topology(&self) -> ConsumerQueue {
        ConsumerQueue {
            exchange: self.exchange.clone(),
            queue: self.inventory_queue.clone(),
            binding_key: self.inventory_binding.clone(),
            dead_letter_exchange: self.dead_letter_exchange.clone(),
            dead_letter_queue: self.dead_letter_queue.clone(),
            queue_type: self.queue_type,
            delivery_limit: self.delivery_limit,
        }
    }

    /// The command-line flags that configure a service with these settings, for
    /// tests and benchmarks that start one.
    pub fn to_args(&self) -> Vec<String> {
        [
            ("--amqp-url", &self.amqp_url),
            ("--exchange", &self.exchange),
            ("--inventory-queue", &self.inventory_queue),
            ("--inventory-binding", &self.inventory_binding),
            ("--dead-letter-exchange", &self.dead_letter_exchange),
            ("--dead-letter-queue", &self.dead_letter_queue),
            ("--queue-type", &self.queue_type.to_string()),
            ("--delivery-limit", &self.delivery_limit.to_string()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value.clone()])
        .collect()
    }

    /// Names no other test uses (every exchange and queue gets `suffix`), so tests
    /// can share one broker. Broker URL from `AMQP_URL`, else the local default.
    /// Only with the feature `testing`, which only the workspace's tests and
    /// benchmarks enable.
    #[cfg(feature = "testing")]
    pub fn for_test(suffix: &str) -> Self {
        Self {
            amqp_url: std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
            exchange: format!("test.orders.{suffix}"),
            inventory_queue: format!("test.inventory.{suffix}"),
            inventory_binding: "order.*".to_owned(),
            dead_letter_exchange: format!("test.orders.dlx.{suffix}"),
            dead_letter_queue: format!("test.inventory.dead.{suffix}"),
            queue_type: QueueType::Quorum,
            delivery_limit: 20,
        }
    }
}
