#!/usr/bin/env bash
# The whole system in one command: builds the release binaries, starts
# order-service and inventory-consumer on a database and broker names of their
# own, places one order and follows it to COMPLETED, runs the stress test, and
# shows the order and outbox counts. Exits non-zero when any step fails.
#
# Needs Postgres and RabbitMQ: the local ones (started if installed but stopped)
# or `docker compose up -d postgres rabbitmq`; and curl and psql.
#
#   scripts/demo.sh                        # defaults below
#   DEMO_ORDERS=10000 scripts/demo.sh      # a bigger run
#   scripts/demo.sh --rate 500             # extra arguments go to stress-test
#
# Settings (environment):
#   DEMO_DATABASE_URL   postgres://postgres:postgres@$PG_HOST:$PG_PORT/outbox_demo
#                       dropped and created afresh on every run, so the counts are this run's
#   DEMO_AMQP_URL       amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f
#   DEMO_API_PORT       18080   order-service
#   DEMO_CONSUMER_PORT  18081   inventory-consumer
#   DEMO_ORDERS         3000    orders the stress test places
#   DEMO_CONCURRENCY    32      requests it keeps in flight
#   DEMO_PREFIX         demo    prefix of the exchange and queue names, apart from
#                               those of a stack running on the default names
#   CARGO_TARGET_DIR    target  where the binaries are built
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
# shellcheck source-path=SCRIPTDIR/..
source scripts/lib.sh

DEMO_DATABASE_URL=${DEMO_DATABASE_URL:-postgres://postgres:postgres@$PG_HOST:$PG_PORT/outbox_demo}
DEMO_AMQP_URL=${DEMO_AMQP_URL:-amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f}
DEMO_API_PORT=${DEMO_API_PORT:-18080}
DEMO_CONSUMER_PORT=${DEMO_CONSUMER_PORT:-18081}
DEMO_ORDERS=${DEMO_ORDERS:-3000}
DEMO_CONCURRENCY=${DEMO_CONCURRENCY:-32}
DEMO_PREFIX=${DEMO_PREFIX:-demo}
BIN_DIR=${CARGO_TARGET_DIR:-target}/release
RUN_DIR=.run

API_URL=http://127.0.0.1:$DEMO_API_PORT
CONSUMER_URL=http://127.0.0.1:$DEMO_CONSUMER_PORT

# Both services read these; the broker names keep the demo's messages away from
# any other order-service or consumer on the same broker.
export DATABASE_URL=$DEMO_DATABASE_URL
export AMQP_URL=$DEMO_AMQP_URL
export EXCHANGE=$DEMO_PREFIX.orders
export INVENTORY_QUEUE=$DEMO_PREFIX.inventory.order-placed
export DEAD_LETTER_EXCHANGE=$DEMO_PREFIX.orders.dlx
export DEAD_LETTER_QUEUE=$DEMO_PREFIX.inventory.order-placed.dead
export RUST_LOG=${RUST_LOG:-info,sqlx::postgres::notice=warn}


# The processes this script starts (scripts/lib.sh: start, wait_ready), and only
# those, are stopped on exit.
LOG_DIR=$RUN_DIR
LOG_PREFIX=demo-
on_exit() {
    local status=$?
    trap - EXIT INT TERM
    stop_started
    exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- small JSON helpers without a jq dependency -------------------------------

json_field() { # key < json: the string value of that top-level key
    if command -v python3 >/dev/null 2>&1; then
        python3 -c '
import json, sys
try:
    print(json.load(sys.stdin).get(sys.argv[1], ""))
except (ValueError, AttributeError):
    print("")' "$1"
    else
        sed -n "s/.*\"$1\" *: *\"\([^\"]*\)\".*/\1/p" | head -n 1
    fi
}

json_pretty() { # < json
    if command -v python3 >/dev/null 2>&1; then
        python3 -m json.tool 2>/dev/null || cat
    else
        cat
        echo
    fi
}

psql_demo() {
    psql "$DEMO_DATABASE_URL" -X -v ON_ERROR_STOP=1 "$@"
}

# ------------------------------------------------------------------------------

for tool in curl psql; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is needed; install it and run this again"
done
for port in "$DEMO_API_PORT" "$DEMO_CONSUMER_PORT"; do
    if port_open 127.0.0.1 "$port"; then
        fail "port $port is already taken; choose others with DEMO_API_PORT / DEMO_CONSUMER_PORT"
    fi
done

echo "== services"
ensure_services
echo "   Postgres on $PG_HOST:$PG_PORT, RabbitMQ on $AMQP_HOST:$AMQP_PORT"

echo "== cargo build --release"
cargo build --release --locked -p order-service -p inventory-consumer -p stress-test

echo "== fresh database"
db_name=${DEMO_DATABASE_URL##*/}
db_name=${db_name%%\?*}
admin_url=${DEMO_DATABASE_URL%/*}/postgres
[[ $db_name =~ ^[A-Za-z0-9_]+$ ]] || fail "unexpected database name '$db_name' in DEMO_DATABASE_URL"
psql "$admin_url" -X -q -v ON_ERROR_STOP=1 -c "DROP DATABASE IF EXISTS \"$db_name\" WITH (FORCE)"
echo "   dropped $db_name; the services create and migrate it at start-up"
# Messages a previous, interrupted demo left behind would name orders that no
# longer exist, and its queues may be of another type (QUEUE_TYPE): delete the
# demo's queues where the broker is the local default node; the services declare
# them afresh.
if command -v rabbitmqctl >/dev/null 2>&1 && [[ $DEMO_AMQP_URL == *@127.0.0.1:5672/* ]]; then
    for queue in "$INVENTORY_QUEUE" "$DEAD_LETTER_QUEUE"; do
        rabbitmqctl -q --timeout 10 delete_queue "$queue" >/dev/null 2>&1 || true
    done
fi

echo "== starting the services"
mkdir -p "$RUN_DIR"
start order-service "$DEMO_API_PORT"
api_pid=$!
wait_ready order-service "$api_pid" "$API_URL" 60
# The consumer starts second, so the two do not race to create the database.
start inventory-consumer "$DEMO_CONSUMER_PORT"
consumer_pid=$!
wait_ready inventory-consumer "$consumer_pid" "$CONSUMER_URL" 60

echo "== one order: POST $API_URL/orders"
response=$(curl -sS -X POST "$API_URL/orders" \
    -H 'content-type: application/json' \
    -d '{"customer_id":"demo","items":[{"sku":"SKU-001","quantity":2}]}' \
    -w '\n%{http_code}')
code=${response##*$'\n'}
body=${response%$'\n'*}
echo "   HTTP $code"
json_pretty <<<"$body"
[[ $code == 201 ]] || fail "POST /orders answered $code, expected 201"
order_id=$(json_field id <<<"$body")
[[ -n $order_id ]] || fail "no order id in the response"

echo "== following GET /orders/$order_id until the consumer has applied it"
status=
for ((i = 0; i < 50; i++)); do
    body=$(curl -fsS "$API_URL/orders/$order_id")
    status=$(json_field status <<<"$body")
    [[ $status == PENDING ]] || break
    sleep 0.2
done
echo "   status $status after $(awk "BEGIN { print $i * 0.2 }") s"
json_pretty <<<"$body"
if [[ $status != COMPLETED ]]; then
    show_log inventory-consumer
    fail "the order is $status, expected COMPLETED within 10 s"
fi

echo "== stress test: $DEMO_ORDERS orders, $DEMO_CONCURRENCY in flight"
stress_status=0
"$BIN_DIR/stress-test" --url "$API_URL" --database-url "$DEMO_DATABASE_URL" \
    --orders "$DEMO_ORDERS" --concurrency "$DEMO_CONCURRENCY" "$@" || stress_status=$?

echo "== waiting for the outbox to drain and every order to be decided"
remaining=
for ((i = 0; i < 120; i++)); do
    remaining=$(psql_demo -At -c \
        "SELECT (SELECT count(*) FROM orders WHERE status = 'PENDING') + (SELECT count(*) FROM outbox WHERE state = 'pending')")
    [[ $remaining == 0 ]] && break
    sleep 0.25
done

echo "== orders by status"
psql_demo -c "SELECT status, count(*) FROM orders GROUP BY status ORDER BY status"
echo "== outbox backlog (no rows: every event was published)"
psql_demo -c "SELECT state, count(*) FROM outbox GROUP BY state ORDER BY state"

echo "== peak memory (VmHWM)"
for i in "${!started_pids[@]}"; do
    rss=$(awk '/^VmHWM/ { printf "%.1f MiB", $2 / 1024 }' "/proc/${started_pids[$i]}/status" 2>/dev/null || true)
    printf '   %-20s %s\n' "${started_names[$i]}" "${rss:-unknown (no /proc)}"
done

if ((stress_status != 0)); then
    fail "stress-test failed (status $stress_status)"
fi
if [[ $remaining != 0 ]]; then
    show_log order-service
    show_log inventory-consumer
    fail "$remaining orders or events are still pending 30 s after the stress test"
fi
dead=$(psql_demo -At -c "SELECT count(*) FROM outbox WHERE state = 'dead'")
((dead == 0)) || fail "$dead events are dead in the outbox (order-service outbox dead lists them)"
echo "== demo passed"
