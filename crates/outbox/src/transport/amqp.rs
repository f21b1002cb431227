//! RabbitMQ connection and topology: what both the relay and consumers declare,
//! idempotently, at start-up, so that start order does not matter.
//!
//! A broker address may be a comma-separated list of a cluster's nodes: each
//! connection tries them in turn from a random one, so the connections of many
//! processes spread over the nodes and a dead node is passed over.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

/// The nodes of a comma-separated list of AMQP URIs, in order.
pub fn nodes(urls: &str) -> Vec<&str> {
    urls.split(',').map(str::trim).filter(|url| !url.is_empty()).collect()
}

/// Opens a connection named `name` (shown in the RabbitMQ management UI) to one of
/// the nodes of `urls` (see [`nodes`]): from a random one, the next on failure,
/// until one answers. The error is the last node's.
pub async fn connect(urls: &str, name: &str) -> lapin::Result<Connection> {
    let nodes = nodes(urls);
    let start = if nodes.len() > 1 { rand::random_range(0..nodes.len()) } else { 0 };
    let mut last_error = None;
    for offset in 0..nodes.len().max(1) {
        let url = nodes.get((start + offset) % nodes.len().max(1)).copied().unwrap_or(urls);
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        match Connection::connect(url, properties).await {
            Ok(connection) => {
                if nodes.len() > 1 {
                    tracing::debug!(name, node = %redact(url), "connected to a broker node");
                }
                return Ok(connection);
            }
            Err(error) => {
                if nodes.len() > 1 {
                    tracing::warn!(name, node = %redact(url), %error,
                        "broker node unreachable; trying the next");
                }
                last_error = Some(error);
            }
        }
    }
    Err(last_error.expect("at least one node was tried"))
}

/// A URL (AMQP or Postgres) without its password, for logs and error messages.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|at| at + 3) else { return url.to_owned() };
    let rest = &url[scheme_end..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    match authority
        .rfind('@')
        .and_then(|at| authority[..at].split_once(':').map(|(user, _)| (user, at)))
    {
        Some((user, at)) => format!("{}{user}:***{}", &url[..scheme_end], &rest[at..]),
        None => url.to_owned(),
    }
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

/// The kind of RabbitMQ queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated over the cluster's nodes (Raft): it survives the loss of a
    /// minority of them. RabbitMQ's replicated queue type.
    Quorum,
    /// Lives on one node: unavailable, with every message in it, while that node
    /// is down.
    Classic,
}

impl QueueType {
    /// The value of the `x-queue-type` argument (`quorum`, `classic`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quorum => "quorum",
            Self::Classic => "classic",
        }
    }
}

impl std::str::FromStr for QueueType {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "quorum" => Ok(Self::Quorum),
            "classic" => Ok(Self::Classic),
            _ => Err(format!("{text:?} is not a queue type: use quorum or classic")),
        }
    }
}

impl std::fmt::Display for QueueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A consumer's queue, bound to the events exchange, with a dead-letter exchange
/// and queue for the messages it rejects.
#[derive(Debug, Clone)]
pub struct ConsumerQueue {
    /// The topic exchange events are published to (declared here too).
    pub exchange: String,
    /// The consumer's queue.
    pub queue: String,
    /// The routing-key pattern binding the queue to `exchange` (`order.*`).
    pub binding_key: String,
    /// The fanout exchange the queue dead-letters to (its `x-dead-letter-exchange`).
    pub dead_letter_exchange: String,
    /// The queue bound to `dead_letter_exchange`, holding the dead letters.
    pub dead_letter_queue: String,
    /// The type of both queues. Every process declaring them must agree.
    pub queue_type: QueueType,
    /// Quorum queues only: deliveries of one message after which the broker
    /// dead-letters it instead of delivering it again (see [`ConsumerQueue::declare`]).
    pub delivery_limit: u32,
}

pub use crate::transport::TopologyStatus;

impl ConsumerQueue {
    /// Declares the exchange, the dead-letter exchange and queue, and the queue
    /// with its binding. Redeclaring with the same arguments is a no-op; a queue
    /// that exists with other arguments is a [`crate::Error::TopologyMismatch`].
    ///
    /// The arguments of a quorum queue:
    /// - `x-dead-letter-exchange`: where rejected (poison) messages go.
    /// - `x-delivery-limit`: a message delivered this many times without an ack
    ///   (its consumer crashes or times out on it every time) is dead-lettered
    ///   instead of looping for ever. The count also grows for the innocent
    ///   messages a crashed consumer held unacked (up to its prefetch), so the
    ///   limit must leave room for several crashes in a row.
    /// - `x-dead-letter-strategy = at-least-once`: the broker keeps a dead-lettered
    ///   message until the dead-letter queue has confirmed it, so a rejected
    ///   message is never dropped on its way there (the default, at-most-once,
    ///   can lose it). It requires `x-overflow = reject-publish`, which matters
    ///   only if a length limit is set (none is).
    ///
    /// The dead-letter queue has no delivery limit: listing or replaying it must
    /// never drop a message.
    pub async fn declare(&self, channel: &Channel) -> crate::Result<()> {
        declare_exchange(channel, &self.exchange).await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
                FieldTable::default(),
            )
            .await?;
        self.declare_queue(channel, &self.dead_letter_queue, self.type_argument()).await?;
        channel
            .queue_bind(
                self.dead_letter_queue.as_str().into(),
                self.dead_letter_exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        self.declare_queue(channel, &self.queue, self.queue_arguments()).await?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                self.binding_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    async fn declare_queue(
        &self,
        channel: &Channel,
        queue: &str,
        arguments: FieldTable,
    ) -> crate::Result<()> {
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        match channel.queue_declare(queue.into(), durable, arguments).await {
            Ok(_) => Ok(()),
            Err(error) => match precondition_failed(&error) {
                Some(reason) => {
                    Err(crate::Error::TopologyMismatch { queue: queue.to_owned(), reason })
                }
                None => Err(error.into()),
            },
        }
    }

    fn type_argument(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), text(self.queue_type.as_str()));
        arguments
    }

    /// The consumer queue's arguments (see [`ConsumerQueue::declare`]).
    pub fn queue_arguments(&self) -> FieldTable {
        let mut arguments = self.type_argument();
        arguments.insert("x-dead-letter-exchange".into(), text(&self.dead_letter_exchange));
        if self.queue_type == QueueType::Quorum {
            arguments.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
            );
            arguments.insert("x-dead-letter-strategy".into(), text("at-least-once"));
            arguments.insert("x-overflow".into(), text("reject-publish"));
        }
        arguments
    }
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// The broker's text when `error` is a 406 PRECONDITION_FAILED, which is what a
/// declaration that disagrees with an existing queue gets.
fn precondition_failed(error: &lapin::Error) -> Option<String> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406 => {
            Some(amqp.get_message().to_string())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_list_is_split_and_trimmed() {
        assert_eq!(nodes("amqp://a:5672/%2f"), ["amqp://a:5672/%2f"]);
        assert_eq!(
            nodes("amqp://a/%2f, amqp://b/%2f,,amqp://c/%2f"),
            ["amqp://a/%2f", "amqp://b/%2f", "amqp://c/%2f"]
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
        assert_eq!(redact("amqp://host:5672/%2f"), "amqp://host:5672/%2f");
        assert_eq!(
            redact("postgres://postgres:pw@db:5432/outbox"),
            "postgres://postgres:***@db:5432/outbox"
        );
        assert_eq!(redact("postgres://postgres@db/outbox"), "postgres://postgres@db/outbox");
    }
}
