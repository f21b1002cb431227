#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod backoff;
pub mod event;
pub mod inbox;
pub mod metrics;
pub mod relay;
pub mod retention;
pub mod store;
pub mod supervisor;
pub mod transport;

mod enqueue;
mod error;

#[cfg(feature = "kafka")]
pub use transport::kafka;
#[cfg(feature = "rabbitmq")]
pub use transport::{amqp, rabbitmq};

use std::sync::LazyLock;

pub use enqueue::{Event, NewEvent, enqueue, enqueue_many, enqueue_untyped, notify};
pub use error::{Error, Result};
pub use transport::{Outcome, Publisher, Transport};

/// The Postgres channel [`notify`] sends on and the relay listens to.
pub const NOTIFY_CHANNEL: &str = "outbox_events";

/// Creates and upgrades this crate's tables (`outbox`, `processed_messages`).
/// Run it before the application's own migrations, or combine the two (see
/// [`migrator_with`]). Its versions are 1 to 999; it ignores the versions of
/// other migrators in the shared `_sqlx_migrations` table.
pub static MIGRATOR: LazyLock<sqlx::migrate::Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
});

/// One migrator applying this crate's migrations and then `application`'s, in
/// one run under one lock, ignoring versions neither knows. For an
/// application's start-up and for `#[sqlx::test(migrator = ...)]`, which takes
/// one migrator. `application`'s versions must not overlap this crate's (1 to 999).
pub fn migrator_with(application: &sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
    // `Migrator` has no constructor from a list; these fields are public for
    // `sqlx::migrate!` (whose expansion sets them the same way).
    sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(
            MIGRATOR.iter().chain(application.iter()).cloned().collect(),
        ),
        ignore_missing: true,
        ..sqlx::migrate::Migrator::DEFAULT
    }
}
