//! The one error type of this crate's public API.

/// What can go wrong in the outbox: the database, the broker, the settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A statement failed or the database could not be reached.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The outbox's tables could not be created or upgraded.
    #[error("cannot apply the outbox's migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The broker could not be reached, or a channel or connection to it failed.
    #[error("broker: {0}")]
    Broker(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// The broker holds a queue (or topic) other than the one this process
    /// declares. Not transient: the settings or the broker must change.
    #[error(
        "queue {queue:?} already exists with another type or other arguments than this \
         service declares ({reason}). A queue's type and arguments cannot change in place: \
         either change the settings to match the existing queue, or migrate it: stop the \
         consumers, move its messages to a new queue (a shovel, or drain it), delete it, and \
         start the services, which declare it afresh"
    )]
    TopologyMismatch {
        /// The queue that disagrees.
        queue: String,
        /// The broker's explanation.
        reason: String,
    },
    /// A setting is out of its range; the message names it.
    #[error("invalid outbox setting: {0}")]
    Config(String),
    /// An event could not be turned into JSON.
    #[error("cannot serialise the event: {0}")]
    Serialize(#[from] serde_json::Error),
}

impl Error {
    /// A broker error, from any client library's error type.
    pub fn broker(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Broker(Box::new(error))
    }
}

#[cfg(feature = "rabbitmq")]
impl From<lapin::Error> for Error {
    fn from(error: lapin::Error) -> Self {
        Self::broker(error)
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// So that `?` works on this crate's calls inside code that returns
/// `sqlx::Result`, such as the caller's own transaction: a database error is
/// itself again; a serialisation error is an encoding error.
impl From<Error> for sqlx::Error {
    fn from(error: Error) -> Self {
        match error {
            Error::Database(error) => error,
            Error::Serialize(error) => sqlx::Error::Encode(Box::new(error)),
            other => sqlx::Error::Protocol(other.to_string()),
        }
    }
}
