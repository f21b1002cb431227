//! `order-service`: the HTTP API that takes orders and, in the same process, the
//! relay pool that publishes their events. See `order-service --help`.

use std::process::ExitCode;

use clap::Parser;
use order_service::{Application, Command, Config, ReconcileArgs};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    service_kit::telemetry::init();
    if let Some(Command::Reconcile(args)) = &config.command {
        return reconcile(&config, args).await;
    }
    let status = match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "order-service failed");
            ExitCode::FAILURE
        }
    };
    service_kit::telemetry::shutdown();
    status
}

async fn run(config: Config) -> anyhow::Result<()> {
    if let Some(Command::Outbox(command)) = &config.command {
        return order_service::run_outbox_command(&config, command).await;
    }
    let shutdown = service_kit::shutdown::on_signal();
    Application::build(config).await?.run_until_stopped(shutdown).await
}

/// `order-service reconcile`: 0 when every check holds, 1 when one fails, 2
/// when the checks cannot run (as for a command line clap rejects).
async fn reconcile(config: &Config, args: &ReconcileArgs) -> ExitCode {
    match order_service::run_reconcile_command(config, args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "reconcile could not run");
            ExitCode::from(2)
        }
    }
}
