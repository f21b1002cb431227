//! Integration tests of order-service against the real Postgres (and, for the
//! relay, RabbitMQ). One test binary; each test gets a fresh database.

mod admin;
mod batch;
mod cancel;
mod commit;
mod helpers;
mod openapi;
mod orders;
mod reconcile;
mod relay;
mod upgrade;
