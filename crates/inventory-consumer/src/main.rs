//! `inventory-consumer`: applies OrderPlaced events from RabbitMQ to the stock,
//! exactly once each. See `inventory-consumer --help`.

use std::process::ExitCode;

use inventory_consumer::{Application, Command, Config};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse_command_line(std::env::args_os());
    service_kit::telemetry::init();
    let status = match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "inventory-consumer failed");
            ExitCode::FAILURE
        }
    };
    service_kit::telemetry::shutdown();
    status
}

async fn run(config: Config) -> anyhow::Result<()> {
    if let Some(Command::Dlq(command)) = &config.command {
        return inventory_consumer::dlq::run(
            inventory_consumer::dlq::Source::of(&config),
            command,
            &mut std::io::stdout(),
        )
        .await;
    }
    let shutdown = service_kit::shutdown::on_signal();
    Application::build(config).await?.run_until_stopped(shutdown).await
}
