//! Integration tests of the outbox relay against the real Postgres and RabbitMQ.
//! Each test has its own database (`#[sqlx::test]`) and its own exchange and queue.

mod conformance;
mod helpers;
#[cfg(feature = "kafka")]
mod kafka;
mod months;
mod ordering;
mod relay;
mod stalls;
