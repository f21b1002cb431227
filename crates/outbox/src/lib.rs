//! The transactional outbox pattern, independent of any business domain.
//!
//! - [`enqueue`] writes an event inside the caller's transaction, so the event
//!   exists exactly when the business change it describes does.
//! - [`relay::Relay`] moves committed events to RabbitMQ with publisher confirms
//!   and deletes only what the broker confirmed; [`store`] has its SQL, including
//!   listing and replaying dead events.
//! - [`inbox`] lets a consumer apply each message once although it may be
//!   delivered more than once; [`retention`] forgets what is past its window.
//! - [`supervisor`] restarts a background task that panicked.
//!
//! The tables are created by the workspace's migrations (`outbox`,
//! `processed_messages`).

pub mod amqp;
pub mod backoff;
pub mod dead_letter;
pub mod inbox;
pub mod metrics;
pub mod publisher;
pub mod relay;
pub mod retention;
pub mod store;
pub mod supervisor;

mod enqueue;
mod listener;

pub use enqueue::{NewEvent, enqueue, enqueue_many, notify};

/// The Postgres channel [`notify`] sends on and the relay listens to.
pub const NOTIFY_CHANNEL: &str = "outbox_events";
