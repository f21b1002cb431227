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
pub struct ConsumerQueue<'a> {
    pub exchange: &'a str,
    pub queue: &'a str,
    pub binding_key: &'a str,
    pub dead_letter_exchange: &'a str,
    pub dead_letter_queue: &'a str,
}

impl ConsumerQueue<'_> {
    /// Declares the exchange, the dead-letter exchange and queue, and the queue
    /// with its binding. Redeclaring with the same arguments is a no-op.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        declare_exchange(channel, self.exchange).await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(self.dead_letter_queue.into(), durable, FieldTable::default())
            .await?;
        channel
            .queue_bind(
                self.dead_letter_queue.into(),
                self.dead_letter_exchange.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(self.dead_letter_exchange)),
        );
        channel.queue_declare(self.queue.into(), durable, arguments).await?;
        channel
            .queue_bind(
                self.queue.into(),
                self.exchange.into(),
                self.binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }
}
