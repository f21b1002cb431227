//! Configuration, by flag or environment variable; `--help` lists every setting.

use std::net::SocketAddr;
use std::time::Duration;

use common::broker::BrokerConfig;
use common::db::DbConfig;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "inventory-consumer", version, about)]
pub struct Config {
    /// Address of the health and metrics endpoints (port 0 picks a free port).
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8081")]
    pub listen_addr: SocketAddr,

    #[command(flatten)]
    pub db: DbConfig,

    #[command(flatten)]
    pub broker: BrokerConfig,

    /// Name recorded with each processed message id. Consumers with different
    /// names each apply every message once; instances sharing a name share the work.
    #[arg(long, env = "CONSUMER_NAME", default_value = "inventory")]
    pub consumer_name: String,

    /// Workers consuming the queue, each on its own channel. Two let one batch's
    /// transaction overlap the next batch's broker round trips.
    #[arg(long, env = "CONCURRENCY", default_value_t = 2)]
    pub concurrency: usize,

    /// Unacknowledged messages the broker may send each worker ahead of its acks
    /// (AMQP prefetch). Bounds the memory a worker holds and what a crash
    /// hands back for redelivery.
    #[arg(long, env = "PREFETCH", default_value_t = 256)]
    pub prefetch: u16,

    /// Most messages applied in one database transaction. A batch takes what has
    /// already arrived and never waits to fill up, so a lone message is applied
    /// at once.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 128)]
    pub batch_size: usize,

    /// How long a processed message id is remembered (`7d`, `12h`, `4s`). A
    /// redelivery older than this counts as new; for OrderPlaced that is harmless,
    /// as its order is no longer PENDING. Keep it well above the longest time a
    /// message can spend in the queue or the dead-letter queue before a replay.
    #[arg(long, env = "DEDUP_WINDOW", default_value = "7d",
          value_parser = humantime::parse_duration)]
    pub dedup_window: Duration,

    /// How often processed message ids past the dedup window are swept (one
    /// replica at a time does it).
    #[arg(long, env = "SWEEP_INTERVAL", default_value = "1m",
          value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,
}
