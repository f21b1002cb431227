//! `stress-test`: loads the order API and reports throughput, latency and convergence.

use clap::Parser;

/// Loads the order API and reports what happened.
#[derive(Debug, Parser)]
#[command(name = "stress-test", version, about)]
struct Config {}

fn main() {
    let _config = Config::parse();
    eprintln!("stress-test: not built yet, see --help");
    std::process::exit(2);
}
