#!/usr/bin/env bash
# Relay benchmark: the rate at which the relay drains a backlog of outbox events,
# against the broker's own pipelined-publish rate measured in the same run, and
# the idle commit-to-delivery latency of single events.
#   scripts/bench-relay.sh [--events N] [--workers W] [--batch-size B] [--latency-samples S]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@$PG_HOST:$PG_PORT/postgres}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f}
cargo run --release --locked --quiet -p outbox --example relay_bench -- "$@"
