//! `inventory-consumer`: applies OrderPlaced events from RabbitMQ to the stock,
//! exactly once each. See `inventory-consumer --help`.

use std::process::ExitCode;

use clap::Parser;
use inventory_consumer::{Application, Config};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    common::telemetry::init();
    let shutdown = common::shutdown::on_signal();
    let result = match Application::build(config).await {
        Ok(app) => app.run_until_stopped(shutdown).await,
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "inventory-consumer failed");
            ExitCode::FAILURE
        }
    }
}
