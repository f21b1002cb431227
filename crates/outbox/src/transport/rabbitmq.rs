//! The RabbitMQ transport: publishes each batch to a topic exchange with
//! publisher confirms.
//!
//! All messages of a batch are sent first and their confirms awaited afterwards,
//! so a batch costs about one broker round trip instead of one per message. The
//! routing key is `<aggregate_type>.<event_type>` (`order.OrderPlaced`); every
//! message is `mandatory`, so one that no queue is bound for comes back as
//! [`Outcome::Unroutable`] instead of vanishing.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::{self, BoxFuture};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};

use super::amqp;
use crate::event::OutboxEvent;
use crate::transport::{Outcome, Publisher, Transport};
use crate::{Error, Result};

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
    /// The whole of it must be done within the confirm timeout: a broker that
    /// takes the TCP connection but says nothing (a partition) is an error, not
    /// a wait for ever.
    async fn connect(&self, name: &str) -> Result<RabbitMqPublisher> {
        match tokio::time::timeout(self.confirm_timeout, self.open(name)).await {
            Ok(publisher) => publisher,
            Err(_) => Err(Error::broker(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer from the broker within {:?} while connecting",
                    self.confirm_timeout
                ),
            ))),
        }
    }
}

impl RabbitMq {
    async fn open(&self, name: &str) -> Result<RabbitMqPublisher> {
        let connection = amqp::connect(&self.url, name).await?;
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        amqp::declare_exchange(&channel, &self.exchange).await?;
        if let Some(declare) = &self.topology {
            declare(channel.clone()).await?;
        }
        Ok(RabbitMqPublisher {
            connection,
            channel: Mutex::new(channel),
            exchange: self.exchange.clone(),
            confirm_timeout: self.confirm_timeout,
            confirming: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            lone_nack: Mutex::new(None),
        })
    }
}

/// One connection and one confirm-mode channel, owned by one relay worker.
///
/// What becomes of each event of a batch:
/// - one that AMQP cannot carry (a routing key, type or header name over 255
///   bytes, the limit of a short string) is [`Outcome::Invalid`] and not sent;
/// - acked is [`Outcome::Confirmed`]; returned for no route [`Outcome::Unroutable`];
/// - nacked is [`Outcome::Failed`] when the broker is otherwise confirming:
///   another event of the batch was acked, or the batch is one event and this
///   channel has had acks (or nacked that same event alone just before). A
///   batch of several events all nacked is the broker's trouble, not theirs:
///   [`Outcome::Unknown`];
/// - no confirm by the confirm timeout is a stall of the transport:
///   [`Outcome::Unknown`], and the publisher is replaced;
/// - the broker closed the channel during the batch (as it does for a message
///   it will not take: a header of the wrong type, a message over its size
///   limit): one event may be the cause, so the unconfirmed ones are published
///   again one by one on a new channel; the one on which the channel closes
///   again is [`Outcome::Failed`] with the broker's reason, the others go
///   through. A close that concerns every message (the exchange gone, access
///   refused), or one on every event alone, is the transport's: they stay
///   [`Outcome::Unknown`] and the publisher is replaced. A lost connection
///   leaves them [`Outcome::Unknown`].
///
/// No batch is started while the broker blocks the connection (a memory or
/// disk alarm: [`Publisher::is_blocked`]), and sending has the confirm timeout
/// as its deadline too: a connection blocked mid-batch fails the batch as a
/// stall. Its messages, already handed to the connection, may then still go
/// out at `connection.unblocked`, before the batch is published again: each
/// comes twice, which the consumer's dedupe absorbs (at least once, as ever).
pub struct RabbitMqPublisher {
    connection: Connection,
    /// The current channel; replaced when the broker closes it.
    channel: Mutex<Channel>,
    exchange: String,
    confirm_timeout: Duration,
    /// The broker has acked a message on this connection: a nack of a lone
    /// event is then that event's.
    confirming: AtomicBool,
    /// A send or a confirm missed its deadline: the worker replaces this publisher.
    stalled: AtomicBool,
    /// The last event nacked alone on a channel without acks (so not counted):
    /// nacked alone again, it is that event's failure.
    lone_nack: Mutex<Option<uuid::Uuid>>,
}

/// AMQP's limit on a short string (routing key, type, header name).
const SHORT_STRING_MAX: usize = 255;

impl Publisher for RabbitMqPublisher {
    async fn publish(&self, events: &[OutboxEvent]) -> Result<Vec<Outcome>> {
        let mut outcomes: Vec<Option<Outcome>> =
            events.iter().map(|event| check(event).err().map(Outcome::Invalid)).collect();
        let sendable: Vec<usize> = (0..events.len()).filter(|&i| outcomes[i].is_none()).collect();
        if sendable.is_empty() {
            return Ok(outcomes
                .into_iter()
                .map(|outcome| outcome.unwrap_or(Outcome::Unknown))
                .collect());
        }
        if self.is_blocked() {
            return Err(Error::broker(std::io::Error::other(
                "the broker has blocked this connection (a resource alarm); nothing was sent",
            )));
        }
        let channel = self.open_channel().await?;
        let deadline = tokio::time::Instant::now() + self.confirm_timeout;

        let sending = async {
            // A publish hands its frames to the connection at its first poll,
            // then waits until they are written. Polling every publish once, in
            // order, queues the whole batch at once (in order: the order on the
            // wire and of the delivery tags), so the connection's I/O thread
            // writes it in a few system calls instead of waking up, and waking
            // this task, once a message.
            let mut publishes: Vec<_> = sendable
                .iter()
                .map(|&index| Box::pin(future::maybe_done(self.send(&channel, &events[index]))))
                .collect();
            std::future::poll_fn(|cx| {
                for publish in &mut publishes {
                    let _ = publish.as_mut().poll(cx);
                }
                Poll::Ready(())
            })
            .await;
            let mut sent = Vec::with_capacity(sendable.len());
            for (publish, &index) in publishes.iter_mut().zip(&sendable) {
                publish.as_mut().await;
                sent.push((index, publish.as_mut().take_output().expect("polled to completion")));
            }
            sent
        };
        let Ok(sent) = tokio::time::timeout_at(deadline, sending).await else {
            // Blocked mid-batch: the connection is fine and says so; the worker
            // waits for it to be unblocked. Anything else: a new connection.
            if !self.is_blocked() {
                self.stalled.store(true, Ordering::Relaxed);
            }
            return Err(Error::broker(std::io::Error::other(format!(
                "the broker took no messages for {:?} (blocked or unreachable)",
                self.confirm_timeout
            ))));
        };

        let mut acked = 0;
        let mut nacked = Vec::new();
        let mut suspects = Vec::new();
        let mut closed_by: Option<String> = None;
        for (index, confirm) in sent {
            let confirm = match confirm {
                Ok(confirm) => confirm,
                Err(error) => {
                    closed_by.get_or_insert_with(|| error.to_string());
                    suspects.push(index);
                    continue;
                }
            };
            outcomes[index] = match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Nack(_))) => {
                    nacked.push(index);
                    continue;
                }
                Ok(Ok(confirmation)) => {
                    acked += usize::from(matches!(confirmation, Confirmation::Ack(_)));
                    Some(outcome_of(confirmation))
                }
                Ok(Err(error)) => {
                    closed_by.get_or_insert_with(|| error.to_string());
                    suspects.push(index);
                    continue;
                }
                Err(_) => {
                    if !self.is_blocked() {
                        self.stalled.store(true, Ordering::Relaxed);
                    }
                    Some(Outcome::Unknown)
                }
            };
        }
        if acked > 0 {
            self.confirming.store(true, Ordering::Relaxed);
        }
        let lone = (sendable.len() == 1).then(|| events[sendable[0]].id);
        let nacked_again = {
            let mut last = self.lone_nack.lock().unwrap_or_else(PoisonError::into_inner);
            let again = lone.is_some() && *last == lone && !nacked.is_empty();
            *last = if nacked.is_empty() { None } else { lone };
            again
        };
        let nack_is_theirs = acked > 0
            || (lone.is_some() && (self.confirming.load(Ordering::Relaxed) || nacked_again));
        for index in nacked {
            outcomes[index] = Some(if nack_is_theirs {
                Outcome::Failed("nacked by the broker".to_owned())
            } else {
                Outcome::Unknown
            });
        }
        if let Some(reason) = closed_by {
            self.isolate(events, &suspects, &reason, &mut outcomes).await;
        }
        Ok(outcomes.into_iter().map(|outcome| outcome.unwrap_or(Outcome::Unknown)).collect())
    }

    fn is_usable(&self) -> bool {
        self.connection.status().connected() && !self.stalled.load(Ordering::Relaxed)
    }

    fn is_blocked(&self) -> bool {
        self.connection.status().blocked()
    }

    async fn close(self) {
        let channel = self.current_channel();
        let _ = channel.close(200, "relay stopping".into()).await;
        let _ = self.connection.close(200, "relay stopping".into()).await;
    }
}

impl RabbitMqPublisher {
    fn current_channel(&self) -> Channel {
        self.channel.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The current channel, or a new one in confirm mode if the broker closed it.
    async fn open_channel(&self) -> Result<Channel> {
        let channel = self.current_channel();
        if channel.status().connected() {
            return Ok(channel);
        }
        let opening = async {
            let channel = self.connection.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>(channel)
        };
        let channel = match tokio::time::timeout(self.confirm_timeout, opening).await {
            Ok(channel) => channel?,
            Err(_) => {
                self.stalled.store(true, Ordering::Relaxed);
                return Err(Error::broker(std::io::Error::other(format!(
                    "no new channel from the broker within {:?}",
                    self.confirm_timeout
                ))));
            }
        };
        *self.channel.lock().unwrap_or_else(PoisonError::into_inner) = channel.clone();
        Ok(channel)
    }

    async fn send(
        &self,
        channel: &Channel,
        event: &OutboxEvent,
    ) -> lapin::Result<PublisherConfirm> {
        channel
            .basic_publish(
                self.exchange.as_str().into(),
                event.routing_key().into(),
                // Mandatory: an unroutable message comes back instead of vanishing.
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                event.payload.as_bytes(),
                properties(event),
            )
            .await
    }

    /// The broker closed the channel while `suspects` were unconfirmed (`reason`
    /// is what the client saw). If the connection is still up, one of them may
    /// have caused it: each is published alone on a new channel, so the one on
    /// which the channel closes again is found and the others go through.
    async fn isolate(
        &self,
        events: &[OutboxEvent],
        suspects: &[usize],
        reason: &str,
        outcomes: &mut [Option<Outcome>],
    ) {
        if !self.connection.status().connected() || suspects.is_empty() {
            return; // the connection is gone: they stay unknown
        }
        tracing::warn!(unconfirmed = suspects.len(), %reason,
            "the broker closed the channel during a batch; publishing its unconfirmed events one by one");
        let mut closed_on = Vec::new();
        for (position, &index) in suspects.iter().enumerate() {
            let Ok(channel) = self.open_channel().await else { return };
            let alone = async { self.send(&channel, &events[index]).await?.await };
            outcomes[index] = Some(match tokio::time::timeout(self.confirm_timeout, alone).await {
                Ok(Ok(confirmation)) => outcome_of(confirmation),
                Ok(Err(error)) if closes_for_everyone(&error) => {
                    // Not this message: the exchange is gone or access is refused.
                    // A new connection declares the exchange again.
                    tracing::warn!(%error, "the broker refuses every message on this channel");
                    self.stalled.store(true, Ordering::Relaxed);
                    return;
                }
                Ok(Err(error)) if self.connection.status().connected() => {
                    tracing::warn!(message_id = %events[index].id, %error,
                        "the broker closed the channel on this event");
                    closed_on.push(index);
                    Outcome::Failed(format!(
                        "the broker closed the channel on this message: {error}"
                    ))
                }
                // The connection went: this one and the rest are unknown.
                Ok(Err(_)) => return,
                Err(_) => {
                    self.stalled.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        left = suspects.len() - position,
                        "no confirm while isolating; the rest stay unknown"
                    );
                    return;
                }
            });
        }
        if closed_on.len() > 1 && closed_on.len() == suspects.len() {
            // Every one of them closes it: the channel's trouble, not theirs.
            tracing::warn!(
                events = closed_on.len(),
                "the broker closed the channel on every event alone; not their failure"
            );
            self.stalled.store(true, Ordering::Relaxed);
            for index in closed_on {
                outcomes[index] = None;
            }
        }
    }
}

/// Whether the broker closed the channel for a reason that concerns every
/// message, not one: the exchange does not exist (404), access refused (403).
fn closes_for_everyone(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.get_id(), 403 | 404))
}

/// What a confirm other than a nack says of its event.
fn outcome_of(confirmation: Confirmation) -> Outcome {
    match confirmation {
        Confirmation::Ack(None) => Outcome::Confirmed,
        Confirmation::Ack(Some(returned)) => {
            let reason =
                format!("returned by the broker: {} {}", returned.reply_code, returned.reply_text);
            if returned.reply_code == NO_ROUTE {
                Outcome::Unroutable(reason)
            } else {
                Outcome::Failed(reason)
            }
        }
        Confirmation::Nack(_) => Outcome::Failed("nacked by the broker".to_owned()),
        Confirmation::NotRequested => {
            Outcome::Failed("the channel is not in confirm mode".to_owned())
        }
    }
}

/// Why AMQP cannot carry `event`, if it cannot: a routing key, type or header
/// name longer than a short string.
fn check(event: &OutboxEvent) -> std::result::Result<(), String> {
    let too_long = |what: &str, length: usize| {
        format!("its {what} is {length} bytes; AMQP allows at most {SHORT_STRING_MAX}")
    };
    let routing_key = event.routing_key().len();
    if routing_key > SHORT_STRING_MAX {
        return Err(too_long("routing key (aggregate type + '.' + event type)", routing_key));
    }
    if event.event_type.len() > SHORT_STRING_MAX {
        return Err(too_long("event type", event.event_type.len()));
    }
    if let Some((name, _)) =
        event.message_headers().into_iter().find(|(name, _)| name.len() > SHORT_STRING_MAX)
    {
        let start: String = name.chars().take(32).collect();
        return Err(too_long(&format!("header name {start:?}…"), name.len()));
    }
    Ok(())
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
