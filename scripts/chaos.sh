#!/usr/bin/env bash
# The fault schedule, to run yourself: under a steady open-loop load whose client
# retries with its Idempotency-Key, SIGKILL order-service three times and
# inventory-consumer three times, restart RabbitMQ twice and Postgres once; then
# wait until every order is decided, run `order-service reconcile`, and count
# what went wrong.
#
#   scripts/chaos.sh                          # 60 s at 100 orders/s
#   scripts/chaos.sh --duration 40s --rate 150
#
# Options:
#   --duration D  how long the load runs (40s, 2m; default 60s); the nine faults
#                 are spread over it, one every tenth
#   --rate R      orders per second (default 100)
#   --no-build    use the release binaries as they are
#
# It RESTARTS THE MACHINE'S RabbitMQ AND Postgres (rabbitmqctl stop and
# rabbitmq-server -detached; pg_ctlcluster restart in immediate mode, a crash and
# recovery): everything else connected to them sees it too. Run it on a
# development machine, not next to anything you care about. The services run on
# a database and broker names of their own (outbox_chaos, prefix chaos).
#
# The last line sums it up, and the exit status is 0 only when every count but
# accepted is 0 and reconcile found nothing wrong:
#   chaos: accepted=N lost=N doubled=N stock_off=N stuck=N dead=N
# accepted   orders answered 2xx (after the client's retries)
# lost       accepted order ids missing from `orders`
# doubled    orders without their Idempotency-Key's row: every request carries a
#            key and the key is written in the order's transaction, so such an
#            order is a second one for some key (an effect applied twice shows in
#            stock_off instead)
# stock_off  SKUs whose stock is not what their received stock minus the
#            COMPLETED lines says (reconcile's check)
# stuck      orders neither COMPLETED nor REJECTED
# dead       dead outbox events plus messages in the dead-letter queue
#
# Settings (environment):
#   CHAOS_API_PORT 18380, CHAOS_CONSUMER_PORT 18381, CARGO_TARGET_DIR (target)
#   PG_CLUSTER     the Postgres cluster to restart (default: 15 main, the first
#                  in /etc/postgresql)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/services.sh
# shellcheck source-path=SCRIPTDIR/..
source scripts/lib.sh

duration=60
rate=100
build=1
while (($# > 0)); do
    case $1 in
        --duration) duration=${2:?--duration needs a value}; shift 2 ;;
        --duration=*) duration=${1#*=}; shift ;;
        --rate) rate=${2:?--rate needs a value}; shift 2 ;;
        --rate=*) rate=${1#*=}; shift ;;
        --no-build) build=0; shift ;;
        -h | --help) usage_of "$0"; exit 0 ;;
        *) echo "error: unknown argument '$1'" >&2; usage_of "$0" >&2; exit 2 ;;
    esac
done
case $duration in
    *m) seconds=$((${duration%m} * 60)) ;;
    *s) seconds=${duration%s} ;;
    *) seconds=$duration ;;
esac
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]] || ((seconds < 20)); then
    fail "--duration takes whole seconds or minutes, at least 20s (got '$duration')"
fi
[[ $rate =~ ^[1-9][0-9]*$ ]] || fail "--rate takes a positive whole number (got '$rate')"

RUN_DIR=.run/chaos
LOG_DIR=$RUN_DIR
BIN_DIR=${CARGO_TARGET_DIR:-target}/release
API_PORT=${CHAOS_API_PORT:-18380}
CONSUMER_PORT=${CHAOS_CONSUMER_PORT:-18381}
default_cluster="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort | head -n1) main"
read -r pg_version pg_name <<<"${PG_CLUSTER:-$default_cluster}"

export DATABASE_URL=postgres://postgres:postgres@$PG_HOST:$PG_PORT/outbox_chaos
export AMQP_URL=amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f
export EXCHANGE=chaos.orders
export INVENTORY_QUEUE=chaos.inventory.order-placed
export DEAD_LETTER_EXCHANGE=chaos.orders.dlx
export DEAD_LETTER_QUEUE=chaos.inventory.order-placed.dead
export RUST_LOG=${RUST_LOG:-info,sqlx::postgres::notice=warn}

if ! command -v rabbitmqctl >/dev/null || ! command -v pg_ctlcluster >/dev/null; then
    fail "chaos.sh restarts the local RabbitMQ and Postgres: it needs rabbitmqctl and pg_ctlcluster"
fi
ensure_services
mkdir -p "$RUN_DIR"
rm -f "$RUN_DIR"/*.log "$RUN_DIR"/*.json "$RUN_DIR"/*.err

if ((build)); then
    echo "== building (release)"
    cargo build --release --locked -q -p order-service -p inventory-consumer -p stress-test
fi

api_pid=
consumer_pid=
load_pid=
cleanup() {
    local status=$? pid
    trap - EXIT INT TERM
    for pid in "$load_pid" "$api_pid" "$consumer_pid"; do
        if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; fi
    done
    wait 2>/dev/null || true
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_api() {
    LISTEN_ADDR=127.0.0.1:$API_PORT "$BIN_DIR/order-service" >>"$RUN_DIR/order-service.log" 2>&1 &
    api_pid=$!
}
start_consumer() {
    LISTEN_ADDR=127.0.0.1:$CONSUMER_PORT "$BIN_DIR/inventory-consumer" \
        >>"$RUN_DIR/inventory-consumer.log" 2>&1 &
    consumer_pid=$!
}
ready() { # port
    local i
    for ((i = 0; i < 240; i++)); do
        curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$1/readyz" 2>/dev/null && return 0
        sleep 0.5
    done
    fail "the service on port $1 did not become ready; see $RUN_DIR"
}
psql_q() { psql -X -q -t -A -v ON_ERROR_STOP=1 "$DATABASE_URL" "$@"; }

restart_rabbitmq() {
    rabbitmqctl -q stop >/dev/null 2>&1 || true
    rabbitmq-server -detached >/dev/null 2>&1
    wait_for_port rabbitmq "$AMQP_HOST" "$AMQP_PORT" 90 || fail "RabbitMQ did not come back"
    rabbitmqctl -q await_startup >/dev/null 2>&1 || true
}
restart_postgres() {
    pg_ctlcluster --skip-systemctl-redirect "$pg_version" "$pg_name" restart -m immediate >/dev/null
    wait_for_port postgres "$PG_HOST" "$PG_PORT" 60 || fail "Postgres did not come back"
}

echo "== fresh database outbox_chaos and queues chaos.*"
psql -X -q -v ON_ERROR_STOP=1 "${DATABASE_URL%/*}/postgres" \
    -c "DROP DATABASE IF EXISTS outbox_chaos WITH (FORCE)" -c "CREATE DATABASE outbox_chaos"
for queue in "$INVENTORY_QUEUE" "$DEAD_LETTER_QUEUE"; do
    rabbitmqctl -q delete_queue "$queue" >/dev/null 2>&1 || true
done
start_api
ready "$API_PORT" # migrates the database first
start_consumer
ready "$CONSUMER_PORT"

echo "== load: $rate orders/s for ${seconds}s, each with an Idempotency-Key, retried"
"$BIN_DIR/stress-test" --url "http://127.0.0.1:$API_PORT" --rate "$rate" --duration "${seconds}s" \
    --concurrency 256 --idempotency-keys --retries 60 --timeout 180s --json \
    >"$RUN_DIR/load.json" 2>"$RUN_DIR/load.err" &
load_pid=$!

started=$SECONDS
at() { # tenth of the run
    local wait_for=$(($1 * seconds / 10 - (SECONDS - started)))
    ((wait_for > 0)) && sleep "$wait_for"
    printf '[%3ss] ' "$((SECONDS - started))"
}
kill_api() {
    echo "SIGKILL order-service, restart it"
    kill -9 "$api_pid"
    wait "$api_pid" 2>/dev/null || true
    start_api
}
kill_consumer() {
    echo "SIGKILL inventory-consumer, restart it"
    kill -9 "$consumer_pid"
    wait "$consumer_pid" 2>/dev/null || true
    start_consumer
}
at 1 && kill_api
at 2 && kill_consumer
at 3 && echo "restart RabbitMQ" && restart_rabbitmq
at 4 && kill_api
at 5 && echo "restart Postgres (immediate: crash and recovery)" && restart_postgres
at 6 && kill_consumer
at 7 && echo "restart RabbitMQ" && restart_rabbitmq
at 8 && kill_api
at 9 && kill_consumer

echo "== load done; waiting for every order to be decided"
load_status=0
wait "$load_pid" || load_status=$?
load_pid=
[[ -s $RUN_DIR/load.json ]] || fail "the load printed no report; see $RUN_DIR/load.err"
for ((i = 0; i < 240; i++)); do
    [[ $(psql_q -c "SELECT count(*) FROM outbox WHERE state = 'pending'") == 0 &&
        $(psql_q -c "SELECT count(*) FROM orders WHERE status = 'PENDING'") == 0 ]] && break
    sleep 0.5
done

echo "== reconcile"
reconcile_status=0
"$BIN_DIR/order-service" reconcile | tee "$RUN_DIR/reconcile.txt" || reconcile_status=$?
"$BIN_DIR/order-service" reconcile --json >"$RUN_DIR/reconcile.json" || true

report_field() { jq -r ".$1" "$RUN_DIR/load.json"; }
accepted=$(report_field ok)
lost=$(report_field not_found)
doubled=$(psql_q -c "SELECT count(*) FROM orders o
    WHERE NOT EXISTS (SELECT 1 FROM idempotency_keys k WHERE k.order_id = o.id)")
stock_off=$(jq -r '.skus_off | length' "$RUN_DIR/reconcile.json")
stuck=$(psql_q -c "SELECT count(*) FROM orders WHERE status NOT IN ('COMPLETED', 'REJECTED')")
dead_events=$(psql_q -c "SELECT count(*) FROM outbox WHERE state = 'dead'")
dlq=$(rabbitmqctl -q list_queues name messages --no-table-headers |
    awk -F'\t' -v q="$DEAD_LETTER_QUEUE" '$1 == q { print $2 }')
dead=$((dead_events + ${dlq:-0}))

echo "load: $(report_field sent) sent, $accepted accepted, $(report_field retries) retries," \
    "stress-test status $load_status; reconcile status $reconcile_status"
echo "chaos: accepted=$accepted lost=$lost doubled=$doubled stock_off=$stock_off stuck=$stuck dead=$dead"
((accepted > 0 && lost == 0 && doubled == 0 && stock_off == 0 && stuck == 0 && dead == 0 &&
    reconcile_status == 0))
