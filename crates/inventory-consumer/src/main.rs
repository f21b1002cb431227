//! `inventory-consumer`: applies OrderPlaced events to the inventory exactly once.

use clap::Parser;

/// Consumes OrderPlaced events, reserves stock and completes or rejects orders.
#[derive(Debug, Parser)]
#[command(name = "inventory-consumer", version, about)]
struct Config {}

fn main() {
    let _config = Config::parse();
    eprintln!("inventory-consumer: not built yet, see --help");
    std::process::exit(2);
}
