//! RabbitMQ connection and topology: what both the relay and consumers declare,
//! idempotently, at start-up, so that start order does not matter.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

/// Opens a connection named `name` (shown in the RabbitMQ management UI).
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, properties).await
}

/// Declares the durable topic exchange events are published to.
pub async fn declare_exchange(channel: &Channel, exchange: &str) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
            FieldTable::default(),
        )
        .await
}

/// A consumer's queue, bound to the events exchange, with a dead-letter exchange
/// and queue for the messages it rejects.
#[derive(Debug, Clone)]
pub struct ConsumerQueue {
    pub exchange: String,
    pub queue: String,
    pub binding_key: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
}

impl ConsumerQueue {
    /// Declares the exchange, the dead-letter exchange and queue, and the queue
    /// with its binding. Redeclaring with the same arguments is a no-op.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        declare_exchange(channel, &self.exchange).await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(self.dead_letter_queue.as_str().into(), durable, FieldTable::default())
            .await?;
        channel
            .queue_bind(
                self.dead_letter_queue.as_str().into(),
                self.dead_letter_exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(self.dead_letter_exchange.as_str())),
        );
        channel.queue_declare(self.queue.as_str().into(), durable, arguments).await?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                self.binding_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }
}
