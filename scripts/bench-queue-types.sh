#!/usr/bin/env bash
# What quorum queues cost, in one run: the relay's drain rate and the whole
# system's closed-loop orders/s with a classic queue and a quorum queue on the
# local node, and a quorum queue on the 3-node cluster of
# scripts/rabbitmq-cluster.sh (started for the run, stopped after). Ratios are
# against the classic queue measured in the same run.
#
#   scripts/bench-queue-types.sh          # BENCH_EVENTS (50000) events, BENCH_ORDERS (10000) orders
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services

BENCH_EVENTS=${BENCH_EVENTS:-50000}
BENCH_ORDERS=${BENCH_ORDERS:-10000}
LOCAL_AMQP=amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@$PG_HOST:$PG_PORT/postgres}
RUN_DIR=.run/bench-queue-types
mkdir -p "$RUN_DIR"

cargo build --release --locked -q -p outbox --example relay_bench
cargo build --release --locked -q -p order-service -p inventory-consumer -p stress-test

cluster_started=
cleanup() {
    [ -n "$cluster_started" ] && scripts/rabbitmq-cluster.sh stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
cluster_line=$(scripts/rabbitmq-cluster.sh start | tail -n 1)
cluster_started=1
CLUSTER_AMQP=${cluster_line#AMQP_URL=}

relay_rate() { # amqp-url queue-type
    target/release/examples/relay_bench --amqp-url "$1" --queue-type "$2" \
        --events "$BENCH_EVENTS" --latency-samples 50 | tee -a "$RUN_DIR/relay.txt" |
        sed -n 's/.*relay draining the backlog: *\([0-9]*\) events.*/\1/p'
}

system_rate() { # name amqp-url queue-type
    local json
    json=$(QUEUE_TYPE=$3 DEMO_AMQP_URL=$2 DEMO_PREFIX=bench-$1 DEMO_ORDERS=$BENCH_ORDERS \
        DEMO_DATABASE_URL=postgres://postgres:postgres@$PG_HOST:$PG_PORT/outbox_bench_queues \
        scripts/demo.sh --json 2>>"$RUN_DIR/system-$1.err" | tee "$RUN_DIR/system-$1.txt" |
        grep '^{"sent"' || true)
    sed -n 's/.*"throughput_rps":\([0-9.]*\).*/\1/p' <<<"$json" | cut -d. -f1
}

: >"$RUN_DIR/relay.txt"
echo "== relay drain, $BENCH_EVENTS events" >&2
relay_classic=$(relay_rate "$LOCAL_AMQP" classic)
relay_quorum=$(relay_rate "$LOCAL_AMQP" quorum)
relay_cluster=$(relay_rate "$CLUSTER_AMQP" quorum)
echo "== whole system, closed loop, $BENCH_ORDERS orders" >&2
system_classic=$(system_rate classic "$LOCAL_AMQP" classic)
system_quorum=$(system_rate quorum "$LOCAL_AMQP" quorum)
system_cluster=$(system_rate cluster "$CLUSTER_AMQP" quorum)
for queue in bench-classic bench-quorum; do
    for name in "$queue.inventory.order-placed" "$queue.inventory.order-placed.dead"; do
        rabbitmqctl -q delete_queue "$name" >/dev/null 2>&1 || true
    done
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "?" }'; }
echo
printf '%-34s %14s %14s\n' "" "relay events/s" "system orders/s"
printf '%-34s %14s %14s\n' "classic queue, local node" "$relay_classic" "$system_classic"
printf '%-34s %14s %14s\n' "quorum queue, local node" "$relay_quorum ($(ratio "$relay_quorum" "$relay_classic"))" \
    "$system_quorum ($(ratio "$system_quorum" "$system_classic"))"
printf '%-34s %14s %14s\n' "quorum queue, 3-node cluster" "$relay_cluster ($(ratio "$relay_cluster" "$relay_classic"))" \
    "$system_cluster ($(ratio "$system_cluster" "$system_classic"))"
echo "(ratios against the classic queue of this run; details in $RUN_DIR)"
