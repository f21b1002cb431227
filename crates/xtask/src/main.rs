//! `cargo xtask <command>`: the project's orchestration, in Rust rather than
//! shell, so that what it proves is itself tested (the cargo `xtask`
//! convention; the alias is in `.cargo/config.toml`).
//!
//! - `bench-e2e`: the whole system against what Postgres alone commits, with
//!   CPU per component; `bench-relay`, `bench-consumer`, `bench-queue-types`:
//!   the parts (see [`bench`]).
//! - `chaos`: the whole system under a fault schedule (see [`chaos`]).
//! - `check-docs`: README_zh.md mirrors README.md, and the docs' links resolve
//!   (see [`docs`]).
//! - `cluster-proof`: nothing lost or doubled on a RabbitMQ cluster while
//!   nodes and processes die (see [`cluster`]).
//! - `soak`: the whole system for a long while, a row a minute, then a
//!   verdict (see [`soak`]).
//! - `compose-smoke`: docker-compose.yml for real (see [`compose`]).
//! - `demo`: the whole system in one command (see [`demo`]).
//! - `fuzz-api`: order-service fuzzed from its OpenAPI document (see [`fuzz`]).

mod bench;
mod chaos;
mod cluster;
mod compose;
mod demo;
mod docs;
mod faults;
mod fuzz;
mod kafka;
mod process;
mod settings;
mod soak;
mod verdict;

use clap::Parser;

#[derive(Debug, clap::Parser)]
#[command(name = "cargo xtask", about = "The project's orchestration")]
enum Command {
    /// The whole system against what Postgres alone commits of the same
    /// orders, with CPU per order of each component (scripts/bench-e2e.sh runs
    /// this).
    BenchE2e(bench::Args),
    /// The relay draining a backlog against the broker alone, and its idle
    /// latency: the options of outbox's relay_bench (scripts/bench-relay.sh).
    BenchRelay(bench::PassThrough),
    /// The consumer's apply rate, batched against one transaction a message:
    /// the options of consumer_bench (scripts/bench-consumer.sh).
    BenchConsumer(bench::PassThrough),
    /// Classic against quorum queues, and quorum on a 3-node cluster
    /// (scripts/bench-queue-types.sh runs this).
    BenchQueueTypes(bench::QueueTypesArgs),
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
    /// docker-compose.yml and its cluster run for real: orders posted, seen
    /// decided with psql, reconcile (scripts/compose-smoke.sh runs this).
    ComposeSmoke(compose::Args),
    /// The whole system in one command: one order followed to COMPLETED, the
    /// stress test, the counts (scripts/demo.sh runs this).
    Demo(demo::Args),
    /// order-service fuzzed by schemathesis from its OpenAPI document
    /// (scripts/fuzz-api.sh runs this).
    FuzzApi(fuzz::Args),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let outcome = match Command::parse() {
        Command::BenchE2e(args) => bench::run(args).await,
        Command::BenchRelay(args) => bench::relay(args).await,
        Command::BenchConsumer(args) => bench::consumer(args).await,
        Command::BenchQueueTypes(args) => bench::queue_types(args).await,
        Command::Chaos(args) => chaos::run(args).await,
        Command::CheckDocs(args) => docs::run(args),
        Command::ClusterProof(args) => cluster::run(args).await,
        Command::Soak(args) => soak::run(args).await,
        Command::ComposeSmoke(args) => compose::run(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::FuzzApi(args) => fuzz::run(args).await,
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
