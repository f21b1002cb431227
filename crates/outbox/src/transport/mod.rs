//! What the relay needs of a broker: connect a publisher, publish a batch and
//! say what became of each event.
//!
//! [`rabbitmq`] (RabbitMQ, publisher confirms; cargo feature `rabbitmq`, on by
//! default) is one implementation; `kafka` (acknowledged writes, cargo feature
//! `kafka`) another. The
//! relay ([`crate::relay`]) is generic over them: it claims events, hands them to
//! a [`Publisher`], deletes the confirmed ones and records the others.

#[cfg(feature = "rabbitmq")]
pub mod amqp;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;

use std::future::Future;

use crate::Result;
use crate::event::OutboxEvent;

pub use crate::event::CREATED_AT_HEADER;

/// A broker the relay publishes to: the settings and topology of one
/// connection, from which each relay worker opens its own [`Publisher`].
pub trait Transport: Send + Sync + 'static {
    /// A connection (and channel) owned by one relay worker.
    type Publisher: Publisher;

    /// Opens a publisher for the relay worker `name` (shown by the broker when
    /// it can name connections). Errors are retried by the worker with backoff;
    /// [`crate::Error::TopologyMismatch`] is reported on the relay's status.
    fn connect(&self, name: &str) -> impl Future<Output = Result<Self::Publisher>> + Send;
}

/// One worker's connection to the broker.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `events` and returns one outcome per event, in order.
    ///
    /// `Err` means the transport failed (the connection broke or stalled while
    /// sending): nothing can be said of any of them, so the relay rolls back its
    /// claim, spends no event's attempts, and backs off as a whole; they are
    /// published again later (consumers deduplicate on the message id).
    ///
    /// Every send and every confirm must have a deadline: a publish never
    /// waits for ever.
    fn publish(&self, events: &[OutboxEvent]) -> impl Future<Output = Result<Vec<Outcome>>> + Send;

    /// Whether this publisher can still be used; if not, the worker connects a new one.
    fn is_usable(&self) -> bool;

    /// Whether the broker has told this connection to stop publishing for now
    /// (RabbitMQ's `connection.blocked`, during a memory or disk alarm). The
    /// relay claims nothing while it is.
    fn is_blocked(&self) -> bool {
        false
    }

    /// Closes the connection politely (best effort).
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// What became of one event of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The broker acknowledged the write (RabbitMQ: routed and confirmed; Kafka:
    /// written to all in-sync replicas): the event may leave the outbox.
    Confirmed,
    /// The broker refused this event while it accepted others (a nack, a
    /// return other than "no route", a channel closed by this message): an
    /// attempt that counts towards the event's limit, after which it is dead.
    Failed(String),
    /// The transport cannot carry this event at all (too large, a name longer
    /// than the protocol allows): it was not sent, and it is parked dead at once
    /// with the reason, for an operator to fix and replay.
    Invalid(String),
    /// Nothing would receive it (RabbitMQ: no queue is bound for its routing key;
    /// Kafka: its topic does not exist). What happens then is the relay's
    /// [`Unroutable`](crate::relay::Unroutable) setting; it is never dropped.
    Unroutable(String),
    /// The transport failed before the broker answered (the connection broke,
    /// confirms stalled, the broker refused everything): whether it arrived is
    /// unknown and it is not the event's fault. The event keeps its attempts and
    /// is published again; the relay backs off as a whole.
    Unknown,
}

/// How a relay's broker is doing, as its workers last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportState {
    /// Publishing and confirming.
    Up,
    /// The broker asked for publishing to stop (a resource alarm).
    Blocked,
    /// Not reachable, or not answering.
    Down,
}

impl TransportState {
    /// `up`, `blocked` or `down`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Blocked => "blocked",
            Self::Down => "down",
        }
    }
}

impl std::fmt::Display for TransportState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The topology mismatch a service's workers last met, if any: shared between
/// them and the readiness check that reports it. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct TopologyStatus(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl TopologyStatus {
    /// The last mismatch met, or `None` since a declaration succeeded.
    pub fn error(&self) -> Option<String> {
        self.0.lock().map(|error| error.clone()).unwrap_or_default()
    }

    /// Records the outcome of a declaration: the mismatch, or `None` once one succeeded.
    pub fn set(&self, error: Option<String>) {
        if let Ok(mut current) = self.0.lock() {
            *current = error;
        }
    }
}
