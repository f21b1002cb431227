//! Integration tests of the inventory consumer against the real Postgres and
//! RabbitMQ. Each test has its own database (`#[sqlx::test]`) and its own
//! exchanges and queues.

mod cancel;
mod console;
mod consumer;
mod crash;
mod dashboard;
mod dlq;
mod end_to_end;
mod fuzz;
mod helpers;
mod kafka;
mod months;
mod ordering;
mod prometheus;
mod queues;
mod reconcile;
mod slo;
mod trace;
