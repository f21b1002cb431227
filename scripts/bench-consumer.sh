#!/usr/bin/env bash
# Consumer benchmark: the rate at which the inventory consumer applies a backlog
# of OrderPlaced events, batched against one message per transaction (batch 1)
# in the same run, and its peak memory.
#   scripts/bench-consumer.sh [--messages N] [--batch-sizes 1,32,128] [--concurrency C]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@$PG_HOST:$PG_PORT/postgres}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f}
cargo build --release --locked --quiet -p inventory-consumer
cargo run --release --locked --quiet -p inventory-consumer --example consumer_bench -- \
    --consumer-bin "${CARGO_TARGET_DIR:-target}/release/inventory-consumer" "$@"
