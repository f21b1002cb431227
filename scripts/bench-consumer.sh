#!/usr/bin/env bash
# Consumer benchmark: the rate at which the inventory consumer applies a backlog
# of OrderPlaced events, batched against one message per transaction (batch 1)
# in the same run, and its peak memory (`cargo xtask bench-consumer`).
#   scripts/bench-consumer.sh [--messages N] [--batch-sizes 1,32,128] [--concurrency C]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/services.sh
ensure_services
export PG_HOST PG_PORT AMQP_HOST AMQP_PORT
exec cargo xtask bench-consumer "$@"
