//! Configuration, by flag or environment variable; `--help` lists every setting.

use std::net::SocketAddr;

use common::db::DbConfig;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "order-service", version, about)]
pub struct Config {
    /// Address the HTTP API listens on (port 0 picks a free port).
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,

    #[command(flatten)]
    pub db: DbConfig,

    /// Largest request body accepted, in bytes (larger bodies get 413).
    #[arg(long, env = "BODY_LIMIT_BYTES", default_value_t = 64 * 1024)]
    pub body_limit_bytes: usize,

    /// How long one request may take before it is answered 408.
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,
}
