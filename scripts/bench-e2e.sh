#!/usr/bin/env bash
# End-to-end benchmark: the whole system against what Postgres alone commits of
# the same orders (pgbench on the frozen bench/e2e/ transaction and schema), CPU
# per order of each component, then an open-loop run at half the peak. It is
# `cargo xtask bench-e2e` (crates/xtask/src/bench/), run after making sure the
# local Postgres and RabbitMQ run; the table also goes to .run/bench-e2e/result.json
# (when a concurrency fails, with the ones before it and the failure in `failed`).
#
#   scripts/bench-e2e.sh                     # 20000 orders at 32, then 128 in flight; pgbench 16 clients, 20 s
#   scripts/bench-e2e.sh --orders 5000 --seconds 10 --no-build   # a quick look
#   scripts/bench-e2e.sh --transport kafka   # the same on Kafka (KAFKA_BROKERS, else
#                                            # a broker scripts/kafka-broker.sh starts)
#
# `scripts/bench-e2e.sh --help` lists the options (each also a BENCH_* variable).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/services.sh
case " $* " in *" -h "* | *" --help "*) exec cargo xtask bench-e2e --help ;; esac
ensure_services_for "$@"
export PG_HOST PG_PORT AMQP_HOST AMQP_PORT
exec cargo xtask bench-e2e "$@"
