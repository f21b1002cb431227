#!/usr/bin/env bash
# Nothing lost or doubled on a RabbitMQ cluster while nodes and processes die
# (`cargo xtask cluster-proof`, crates/xtask/src/cluster.rs): the queue's leader
# node, an order-service and a consumer SIGKILLed mid-load on the cluster of
# scripts/rabbitmq-cluster.sh. Prints the figures and a PASS/FAIL line a check;
# exits non-zero if one fails. Settings: PROOF_RATE 100 (orders/s per API),
# PROOF_SECONDS 45, PROOF_PROFILE release, PROOF_KEEP=1 (or the flags of --help).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/services.sh
case " $* " in *" -h "* | *" --help "*) exec cargo xtask cluster-proof --help ;; esac
ensure_postgres
export PG_HOST PG_PORT
exec "${xtask[@]}" cluster-proof "$@"
