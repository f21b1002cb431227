#!/usr/bin/env bash
# The whole system in one command, `cargo xtask demo` (crates/xtask/src/demo.rs),
# once the local Postgres and RabbitMQ run: builds the release binaries, starts
# order-service (:18080) and inventory-consumer (:18081) on the database
# outbox_demo, follows one order to COMPLETED, runs the stress test, shows the counts.
#
#   scripts/demo.sh                        # 3000 orders, 32 in flight
#   DEMO_ORDERS=10000 scripts/demo.sh      # DEMO_* settings: scripts/demo.sh --help
#   scripts/demo.sh --rate 500             # extra arguments go to stress-test
#   scripts/demo.sh --transport kafka      # on Kafka: KAFKA_BROKERS, else a broker
#                                          # scripts/kafka-broker.sh starts
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
case " $* " in *" -h "* | *" --help "*) ;; *) ensure_services_for "$@" ;; esac
export PG_HOST PG_PORT AMQP_HOST AMQP_PORT
exec cargo xtask demo "$@"
