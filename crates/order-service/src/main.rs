//! `order-service`: the HTTP API that takes orders and, in the same process, the
//! relay pool that publishes their events. See `order-service --help`.

use clap::Parser;
use order_service::{Application, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    common::telemetry::init();
    if let Some(order_service::Command::Outbox(command)) = &config.command {
        return order_service::run_outbox_command(&config, command).await;
    }
    let shutdown = common::shutdown::on_signal();
    let app = Application::build(config).await?;
    app.run_until_stopped(shutdown).await
}
