//! The RabbitMQ transport: publishes each batch to a topic exchange with
//! publisher confirms.
//!
//! All messages of a batch are sent first and their confirms awaited afterwards,
//! so a batch costs about one broker round trip instead of one per message. The
//! routing key is `<aggregate_type>.<event_type>` (`order.OrderPlaced`); every
//! message is `mandatory`, so one that no queue is bound for comes back as
//! [`Outcome::Unroutable`] instead of vanishing.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use crate::store::OutboxEvent;
use crate::transport::{Outcome, Publisher, Transport};
use crate::{Error, Result, amqp};

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// AMQP reply code of a message returned because no queue is bound for it.
const NO_ROUTE: u16 = 312;

/// Declares what the application's consumers need on the broker (their queues
/// and bindings), on every new channel, before anything is published on it.
pub type TopologyHook = Arc<dyn Fn(Channel) -> BoxFuture<'static, Result<()>> + Send + Sync>;

/// RabbitMQ, as the relay's [`Transport`].
#[derive(Clone)]
pub struct RabbitMq {
    url: String,
    exchange: String,
    confirm_timeout: Duration,
    topology: Option<TopologyHook>,
}

impl std::fmt::Debug for RabbitMq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMq")
            .field("url", &amqp::redact(&self.url))
            .field("exchange", &self.exchange)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("topology", &self.topology.is_some())
            .finish()
    }
}

impl RabbitMq {
    /// Publishes to the durable topic exchange `exchange` (declared on connect)
    /// of the broker at `url`: an AMQP URI, or a comma-separated list of a
    /// cluster's nodes (see [`amqp::connect`]). Confirms are awaited 10 s.
    pub fn new(url: impl Into<String>, exchange: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            exchange: exchange.into(),
            confirm_timeout: Duration::from_secs(10),
            topology: None,
        }
    }

    /// How long to wait for the broker to confirm a batch; a message without its
    /// confirm by then is a failed attempt. Must be more than zero.
    pub fn confirm_timeout(mut self, timeout: Duration) -> Result<Self> {
        if timeout.is_zero() {
            return Err(Error::Config("the confirm timeout must be more than zero".to_owned()));
        }
        self.confirm_timeout = timeout;
        Ok(self)
    }

    /// Runs `declare` on every new channel, before publishing on it. Declaring
    /// the consumers' queues here means events published before a consumer
    /// first starts are routed to its queue, not returned as unroutable.
    pub fn with_topology<F>(mut self, declare: F) -> Self
    where
        F: Fn(Channel) -> BoxFuture<'static, Result<()>> + Send + Sync + 'static,
    {
        self.topology = Some(Arc::new(declare));
        self
    }
}

impl Transport for RabbitMq {
    type Publisher = RabbitMqPublisher;

    /// Connects (to one of the nodes if the URL lists several), switches the
    /// channel to confirm mode, declares the exchange and runs the topology hook.
    async fn connect(&self, name: &str) -> Result<RabbitMqPublisher> {
        let connection = amqp::connect(&self.url, name).await?;
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        amqp::declare_exchange(&channel, &self.exchange).await?;
        if let Some(declare) = &self.topology {
            declare(channel.clone()).await?;
        }
        Ok(RabbitMqPublisher {
            connection,
            channel,
            exchange: self.exchange.clone(),
            confirm_timeout: self.confirm_timeout,
        })
    }
}

/// One connection and one confirm-mode channel, owned by one relay worker.
pub struct RabbitMqPublisher {
    connection: Connection,
    channel: Channel,
    exchange: String,
    confirm_timeout: Duration,
}

impl Publisher for RabbitMqPublisher {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<Outcome>> {
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
                Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                    let reason = format!(
                        "returned by the broker: {} {}",
                        returned.reply_code, returned.reply_text
                    );
                    if returned.reply_code == NO_ROUTE {
                        Outcome::Unroutable(reason)
                    } else {
                        Outcome::Failed(reason)
                    }
                }
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

    fn is_usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    async fn close(self) {
        let _ = self.channel.close(200, "relay stopping".into()).await;
        let _ = self.connection.close(200, "relay stopping".into()).await;
    }
}

fn properties(event: &OutboxEvent) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in event.message_headers() {
        headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    }
    let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
    BasicProperties::default()
        .with_message_id(event.id.to_string().into())
        .with_type(event.event_type.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(PERSISTENT)
        .with_timestamp(timestamp)
        .with_headers(headers)
}
