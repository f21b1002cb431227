//! Publishing a batch of outbox events to RabbitMQ with publisher confirms.
//!
//! All messages of a batch are sent first and their confirms awaited afterwards,
//! so a batch costs about one broker round trip instead of one per message.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};

use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use crate::amqp::{self, ConsumerQueue, TopologyError};
use crate::store::OutboxEvent;

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// The AMQP header carrying the event's creation time (RFC 3339, microseconds, UTC).
pub const CREATED_AT_HEADER: &str = "x-created-at";

/// What became of one message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Routed and confirmed by the broker: the event may leave the outbox.
    Confirmed,
    /// The broker refused it (nack), returned it as unroutable, or did not confirm
    /// in time: an attempt that counts towards the event's limit.
    Failed(String),
    /// The channel broke before the broker answered: whether it arrived is unknown.
    /// The event stays as it is and is published again after reconnecting.
    Unknown,
}

/// One connection and one confirm-mode channel, owned by one relay worker.
pub struct Publisher {
    connection: Connection,
    channel: Channel,
    exchange: String,
    confirm_timeout: Duration,
}

impl Publisher {
    /// Connects (to one of the nodes if `url` lists several), switches the channel
    /// to confirm mode and declares the exchange and `queues`.
    pub async fn connect(
        url: &str,
        connection_name: &str,
        exchange: &str,
        queues: &[ConsumerQueue],
        confirm_timeout: Duration,
    ) -> Result<Self, TopologyError> {
        let connection = amqp::connect(url, connection_name).await?;
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        amqp::declare_exchange(&channel, exchange).await?;
        for queue in queues {
            queue.declare(&channel).await?;
        }
        Ok(Self { connection, channel, exchange: exchange.to_owned(), confirm_timeout })
    }

    /// Whether the channel can still be used; if not, connect a new publisher.
    pub fn is_usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// Publishes `events` and returns their outcomes, in order. An error means the
    /// channel failed while sending: nothing can be said about any of them.
    pub async fn publish(&self, events: &[OutboxEvent]) -> lapin::Result<Vec<Outcome>> {
        let mut confirms = Vec::with_capacity(events.len());
        for event in events {
            let confirm = self
                .channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    event.routing_key().into(),
                    // Mandatory: an unroutable message comes back instead of vanishing.
                    BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                    event.payload.as_bytes(),
                    properties(event),
                )
                .await?;
            confirms.push(confirm);
        }

        let deadline = tokio::time::Instant::now() + self.confirm_timeout;
        let mut outcomes = Vec::with_capacity(confirms.len());
        for confirm in confirms {
            outcomes.push(match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => Outcome::Confirmed,
                Ok(Ok(Confirmation::Ack(Some(returned)))) => Outcome::Failed(format!(
                    "returned by the broker: {} {}",
                    returned.reply_code, returned.reply_text
                )),
                Ok(Ok(Confirmation::Nack(_))) => Outcome::Failed("nacked by the broker".to_owned()),
                Ok(Ok(Confirmation::NotRequested)) => {
                    Outcome::Failed("the channel is not in confirm mode".to_owned())
                }
                Ok(Err(_)) => Outcome::Unknown,
                Err(_) => Outcome::Failed(format!(
                    "no confirm from the broker within {:?}",
                    self.confirm_timeout
                )),
            });
        }
        Ok(outcomes)
    }

    /// Closes the channel and connection politely (best effort).
    pub async fn close(self) {
        let _ = self.channel.close(200, "relay stopping".into()).await;
        let _ = self.connection.close(200, "relay stopping".into()).await;
    }
}

fn properties(event: &OutboxEvent) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "aggregate_type".into(),
        AMQPValue::LongString(LongString::from(event.aggregate_type.as_str())),
    );
    headers.insert(
        "aggregate_id".into(),
        AMQPValue::LongString(LongString::from(event.aggregate_id.as_str())),
    );
    // Extra headers stored with the event, such as a W3C `traceparent`.
    for (name, value) in event.headers.0.iter() {
        let text = match value {
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        headers.insert(name.as_str().into(), AMQPValue::LongString(LongString::from(text)));
    }
    // When the event was committed (its transaction's start), to the microsecond:
    // consumers measure their end-to-end lag from it (the AMQP timestamp has
    // whole seconds only).
    headers.insert(
        CREATED_AT_HEADER.into(),
        AMQPValue::LongString(LongString::from(
            event.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        )),
    );
    let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
    BasicProperties::default()
        .with_message_id(event.id.to_string().into())
        .with_type(event.event_type.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(timestamp)
        .with_headers(headers)
}
