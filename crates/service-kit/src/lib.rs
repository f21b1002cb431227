//! What order-service and inventory-consumer are built from: the database and
//! its schema (migrations) and set-up, the broker topology both declare,
//! health and metrics endpoints, telemetry and shutdown signals. The event
//! contract between them is the crate `order-events`.

pub mod admin;
pub mod broker;
pub mod db;
pub mod http;
pub mod kafka;
pub mod shutdown;
pub mod telemetry;
pub mod trace_context;

/// The schema of the whole system: the outbox crate's tables (`outbox::MIGRATOR`)
/// and then this system's, from `migrations/`, as one migrator. Both services
/// run it at start-up (sqlx serialises concurrent runs with an advisory lock),
/// so it does not matter which starts first. Tests pass it to
/// `#[sqlx::test(migrator = ...)]`.
pub static MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> =
    std::sync::LazyLock::new(|| outbox::migrator_with(&sqlx::migrate!("../../migrations")));
