#!/usr/bin/env bash
# What quorum queues cost, in one run: the relay's drain rate and the whole
# system's closed-loop orders/s with a classic queue and a quorum queue on the
# local node, and a quorum queue on the 3-node cluster of
# scripts/rabbitmq-cluster.sh (started for the run, stopped after). Ratios are
# against the classic queue measured in the same run (`cargo xtask bench-queue-types`).
#
#   scripts/bench-queue-types.sh          # BENCH_EVENTS (50000) events, BENCH_ORDERS (10000) orders
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/services.sh
ensure_services
export PG_HOST PG_PORT AMQP_HOST AMQP_PORT
exec cargo xtask bench-queue-types "$@"
