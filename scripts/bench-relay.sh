#!/usr/bin/env bash
# Relay benchmark: the rate at which the relay drains a backlog of outbox events,
# against the broker's own pipelined-publish rate measured in the same run, and
# the idle commit-to-delivery latency of single events (`cargo xtask bench-relay`).
#   scripts/bench-relay.sh [--events N] [--workers W] [--batch-size B] [--latency-samples S]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/services.sh
ensure_services
export PG_HOST PG_PORT AMQP_HOST AMQP_PORT
exec cargo xtask bench-relay "$@"
