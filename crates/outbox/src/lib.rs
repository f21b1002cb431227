//! The transactional outbox pattern, independent of any business domain.
//!
//! - [`enqueue`] writes an event inside the caller's transaction, so the event
//!   exists exactly when the business change it describes does.
//! - The relay (see [`relay`]) moves committed events to RabbitMQ with publisher
//!   confirms and deletes only what the broker confirmed.
//! - [`inbox`] lets a consumer apply each message once although it may be
//!   delivered more than once.
//!
//! The tables are created by the workspace's migrations (`outbox`,
//! `processed_messages`).

pub mod amqp;
pub mod inbox;

mod enqueue;

pub use enqueue::{NewEvent, enqueue};

/// The Postgres channel the outbox's insert trigger notifies on commit.
pub const NOTIFY_CHANNEL: &str = "outbox_events";
