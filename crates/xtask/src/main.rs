//! `cargo xtask <command>`: the project's orchestration, in Rust rather than
//! shell, so that what it proves is itself tested (the cargo `xtask`
//! convention; the alias is in `.cargo/config.toml`).
//!
//! - `chaos`: the whole system under a fault schedule (see [`chaos`]).
//! - `check-docs`: README_zh.md mirrors README.md, and the docs' links resolve
//!   (see [`docs`]).
//! - `cluster-proof`: nothing lost or doubled on a RabbitMQ cluster while
//!   nodes and processes die (see [`cluster`]).
//! - `soak`: the whole system for a long while, a row a minute, then a
//!   verdict (see [`soak`]).

mod chaos;
mod cluster;
mod docs;
mod faults;
mod process;
mod soak;
mod verdict;

use clap::Parser;

#[derive(Debug, clap::Parser)]
#[command(name = "cargo xtask", about = "The project's orchestration")]
enum Command {
    /// The whole system under a schedule of crashes, restarts and stalls, then
    /// a check that nothing was lost or doubled (scripts/chaos.sh runs this).
    Chaos(chaos::Args),
    /// README_zh.md has README.md's headings and code blocks, and every relative
    /// link of the READMEs and docs/*.md resolves (scripts/test.sh runs this).
    CheckDocs(docs::Args),
    /// Nothing lost or doubled on a 3-node RabbitMQ cluster while the queue's
    /// leader, an order-service and a consumer are SIGKILLed
    /// (scripts/cluster-proof.sh runs this).
    ClusterProof(cluster::Args),
    /// The whole system under a steady load for a long while, a row a minute,
    /// then soak-report's verdict (scripts/soak.sh runs this).
    Soak(soak::Args),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let outcome = match Command::parse() {
        Command::Chaos(args) => chaos::run(args).await,
        Command::CheckDocs(args) => docs::run(args),
        Command::ClusterProof(args) => cluster::run(args).await,
        Command::Soak(args) => soak::run(args).await,
    };
    match outcome {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::from(2)
        }
    }
}
