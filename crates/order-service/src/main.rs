//! `order-service`: the HTTP API that takes orders and, in the same process, the
//! relay pool that publishes their events. See `order-service --help`.

use std::process::ExitCode;

use clap::Parser;
use order_service::{Application, Command, Config};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    common::telemetry::init();
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "order-service failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    if let Some(Command::Outbox(command)) = &config.command {
        return order_service::run_outbox_command(&config, command).await;
    }
    let shutdown = common::shutdown::on_signal();
    Application::build(config).await?.run_until_stopped(shutdown).await
}
