#!/usr/bin/env bash
# The fault schedule, to run yourself: `cargo xtask chaos` (crates/xtask/src/chaos.rs)
# after making sure the local Postgres and RabbitMQ run. Under a steady
# open-loop load whose client retries with its Idempotency-Key: order-service
# and inventory-consumer SIGKILLed three times each, RabbitMQ restarted twice
# and Postgres once, Postgres, RabbitMQ and both partitioned away (a TCP proxy
# holds every byte), a RabbitMQ memory alarm, two COMMITs whose answer is lost,
# with a fifth of the orders cancelled at once and a fifth two seconds later;
# then every order decided, `order-service reconcile`, and one line:
#
#   chaos: accepted=N lost=N doubled=N out_of_order=N stock_off=N stuck=N dead=N
#
#   scripts/chaos.sh                          # 60 s at 100 orders/s
#   scripts/chaos.sh --duration 40s --rate 150 [--stall 5s] [--no-build]
#   scripts/chaos.sh --transport kafka --duration 40s
#
# On Kafka it runs its own broker (tansu on durable SQLite storage, built once
# by scripts/kafka-broker.sh) behind the proxy, with two consumer replicas;
# the broker restarts are SIGKILLs of it, and the memory alarm is left out.
#
# It RESTARTS THE MACHINE'S RabbitMQ AND Postgres and alarms that RabbitMQ:
# run it on a development machine. `scripts/chaos.sh --help` lists the options.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/services.sh
case " $* " in
    *" -h "* | *" --help "*) exec cargo xtask chaos --help ;;
esac
# On Kafka it runs a broker of its own; RabbitMQ is left alone.
needs=(rabbitmqctl pg_ctlcluster)
if wants_kafka "$@"; then needs=(pg_ctlcluster); fi
for program in "${needs[@]}"; do
    if ! command -v "$program" >/dev/null; then
        echo "error: chaos.sh restarts the local services: it needs ${needs[*]}" >&2
        exit 1
    fi
done
ensure_services_for "$@"
export PG_HOST PG_PORT AMQP_HOST AMQP_PORT
exec cargo xtask chaos "$@"
