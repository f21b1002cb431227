//! Names of the RabbitMQ topology both sides declare at start-up, as
//! command-line/environment settings with defaults that match each other.

/// The exchange, queue and dead-letter names. Flattened into both services'
/// configuration, so one environment configures both sides alike.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerNames {
    /// Durable topic exchange the order events are published to.
    #[arg(long, env = "EXCHANGE", default_value = "orders")]
    pub exchange: String,

    /// Durable queue of the inventory consumer, bound to the exchange.
    #[arg(long, env = "INVENTORY_QUEUE", default_value = "inventory.order-placed")]
    pub inventory_queue: String,

    /// Binding key of the inventory queue (routing keys are `<aggregate>.<event>`).
    #[arg(long, env = "INVENTORY_BINDING", default_value = "order.OrderPlaced")]
    pub inventory_binding: String,

    /// Exchange that messages rejected by the inventory consumer are dead-lettered to.
    #[arg(long, env = "DEAD_LETTER_EXCHANGE", default_value = "orders.dlx")]
    pub dead_letter_exchange: String,

    /// Queue holding dead-lettered messages for inspection.
    #[arg(long, env = "DEAD_LETTER_QUEUE", default_value = "inventory.order-placed.dead")]
    pub dead_letter_queue: String,
}
