//! `stress-test`: loads the order API and reports throughput, latency and
//! convergence. See `stress-test --help`; the work is in the library.

use std::process::ExitCode;

use clap::Parser;
use stress_test::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    // Ctrl-C or SIGTERM stops the load and the wait; the report covers what was done.
    let shutdown = common::shutdown::on_signal();
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
