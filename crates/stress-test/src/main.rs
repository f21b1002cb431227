//! `stress-test`: loads the order API and reports throughput, latency and
//! convergence. See `stress-test --help`; the work is in the library.

use std::process::ExitCode;

use clap::Parser;
use stress_test::Config;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    // Ctrl-C or SIGTERM stops the load and the wait; the report covers what was done.
    let shutdown = on_signal();
    let report = match stress_test::run(&config, shutdown).await {
        Ok(report) => report,
        Err(error) => {
            eprintln!("stress-test: {error:#}");
            return ExitCode::from(2);
        }
    };
    if config.json {
        // Exactly one JSON object on stdout; everything else went to stderr.
        match serde_json::to_string(&report) {
            Ok(json) => println!("{json}"),
            Err(error) => {
                eprintln!("stress-test: cannot serialise the report: {error}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{report}");
    }
    if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// A token cancelled on the first SIGINT (Ctrl-C) or SIGTERM.
fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        let terminate = async {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut terminate) => terminate.recv().await,
                Err(_) => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate => {}
        }
        eprintln!("stress-test: stopping; the report covers what was done");
        cancel.cancel();
    });
    token
}
