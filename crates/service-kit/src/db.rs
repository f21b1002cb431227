//! Connecting to Postgres: create the database if it does not exist, open the
//! process's pools with the session settings every connection needs, and bring
//! the schema up to date.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

/// Database settings shared by both services.
#[derive(Debug, Clone, clap::Args)]
pub struct DbConfig {
    /// Postgres connection URL. The database is created if it does not exist.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:5432/outbox"
    )]
    pub database_url: String,

    /// Most connections this process keeps open to Postgres.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,

    /// How long a request may wait for a free connection before failing.
    #[arg(long, env = "DB_ACQUIRE_TIMEOUT_MS", default_value_t = 5_000)]
    pub db_acquire_timeout_ms: u64,
}

impl DbConfig {
    /// Creates the database when missing, connects, and runs the migrations.
    pub async fn connect_and_migrate(&self) -> anyhow::Result<PgPool> {
        ensure_database_exists(&self.database_url).await?;
        let options = PgConnectOptions::from_str(&self.database_url).with_context(|| {
            format!("DATABASE_URL {} is not a Postgres URL", redact(&self.database_url))
        })?;
        let pool = pool_options(self.db_max_connections, self.db_acquire_timeout_ms)
            .connect_with(outbox::store::with_custom_plans(options))
            .await
            .with_context(|| {
                format!("cannot connect to Postgres at {}", redact(&self.database_url))
            })?;
        crate::MIGRATOR.run(&pool).await.context("cannot apply the database migrations")?;
        Ok(pool)
    }
}

/// A second pool to the database of `pool`, of at most `max_connections`, for
/// work that must not compete with the first pool's users (the relay beside the
/// API). Connections are opened lazily.
pub fn sibling_pool(pool: &PgPool, max_connections: u32, acquire_timeout_ms: u64) -> PgPool {
    let options = (*pool.connect_options()).clone();
    pool_options(max_connections, acquire_timeout_ms)
        .connect_lazy_with(outbox::store::with_custom_plans(options))
}

fn pool_options(max_connections: u32, acquire_timeout_ms: u64) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(Duration::from_millis(acquire_timeout_ms))
}

async fn ensure_database_exists(url: &str) -> anyhow::Result<()> {
    let exists = sqlx::Postgres::database_exists(url)
        .await
        .with_context(|| format!("cannot reach Postgres at {}", redact(url)))?;
    if !exists {
        tracing::info!(url = %redact(url), "database does not exist, creating it");
        // Two services starting together may race to create it: losing is fine.
        if let Err(error) = sqlx::Postgres::create_database(url).await
            && !sqlx::Postgres::database_exists(url).await.unwrap_or(false)
        {
            return Err(error).context("cannot create the database");
        }
    }
    Ok(())
}

/// The URL without its password, for logs and error messages.
pub fn redact(url: &str) -> String {
    outbox::amqp::redact(url)
}
