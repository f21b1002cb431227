#!/usr/bin/env bash
# Proof that nothing is lost or doubled on a RabbitMQ cluster while nodes and
# processes die: on the 3-node cluster of scripts/rabbitmq-cluster.sh, two
# order-service and two inventory-consumer processes take an open-loop load
# through both APIs (with Idempotency-Key retries). Mid-load the node leading the
# inventory quorum queue is SIGKILLed (and later brought back), and one
# order-service and one consumer are SIGKILLed and restarted. Afterwards:
# every accepted order exists and is decided, none was applied twice, stock is
# conserved per SKU, the outbox is drained with no dead event, the dead-letter
# queue is empty. Prints the figures; exits non-zero if any check fails.
#
# Settings (environment):
#   PROOF_RATE      100   orders/s through EACH API
#   PROOF_SECONDS   45    seconds of load
#   PROOF_PROFILE   release  cargo profile of the binaries (release or debug)
#   PROOF_KEEP      unset    1 leaves the cluster running afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

PROOF_RATE=${PROOF_RATE:-100}
PROOF_SECONDS=${PROOF_SECONDS:-45}
PROOF_PROFILE=${PROOF_PROFILE:-release}
RUN_DIR=.run/cluster-proof
DB_NAME=outbox_cluster_proof
PREFIX=proof
API_PORTS=(18280 18281)
CONSUMER_PORTS=(18282 18283)

fail() {
    echo "error: $*" >&2
    exit 1
}

ensure_postgres
mkdir -p "$RUN_DIR"

echo "== building ($PROOF_PROFILE)"
profile_flag=()
[ "$PROOF_PROFILE" = release ] && profile_flag=(--release)
cargo build "${profile_flag[@]}" --locked -q -p order-service -p inventory-consumer -p stress-test
BIN_DIR=${CARGO_TARGET_DIR:-target}/$PROOF_PROFILE

echo "== the cluster"
cluster_started=
cleanup() {
    local pid
    for pid in "${api_pids[@]:-}" "${consumer_pids[@]:-}" "${load_pids[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [ -n "$cluster_started" ] && [ "${PROOF_KEEP:-}" != 1 ]; then
        scripts/rabbitmq-cluster.sh stop >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
amqp_line=$(scripts/rabbitmq-cluster.sh start | tail -n 1)
cluster_started=1
[[ $amqp_line == AMQP_URL=* ]] || fail "the cluster did not start: $amqp_line"

export AMQP_URL=${amqp_line#AMQP_URL=}
export DATABASE_URL=postgres://postgres:postgres@$PG_HOST:$PG_PORT/$DB_NAME
export EXCHANGE=$PREFIX.orders
export INVENTORY_QUEUE=$PREFIX.inventory.order-placed
export DEAD_LETTER_EXCHANGE=$PREFIX.orders.dlx
export DEAD_LETTER_QUEUE=$PREFIX.inventory.order-placed.dead
export QUEUE_TYPE=quorum
export RUST_LOG=${RUST_LOG:-info,sqlx::postgres::notice=warn}
echo "AMQP_URL=$AMQP_URL"

psql_q() { psql -X -q -t -A -v ON_ERROR_STOP=1 "$DATABASE_URL" "$@"; }
admin_url=postgres://postgres:postgres@$PG_HOST:$PG_PORT/postgres
psql -X -q -v ON_ERROR_STOP=1 "$admin_url" -c "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)" \
    -c "CREATE DATABASE $DB_NAME"
for queue in "$INVENTORY_QUEUE" "$DEAD_LETTER_QUEUE"; do
    rabbitmqctl -q -n outbox-a@localhost delete_queue "$queue" >/dev/null 2>&1 || true
done

api_pids=("" "")
consumer_pids=("" "")
load_pids=()

start_api() { # index
    LISTEN_ADDR=127.0.0.1:${API_PORTS[$1]} "$BIN_DIR/order-service" \
        >>"$RUN_DIR/order-service-$1.log" 2>&1 &
    api_pids[$1]=$!
}
start_consumer() { # index
    LISTEN_ADDR=127.0.0.1:${CONSUMER_PORTS[$1]} "$BIN_DIR/inventory-consumer" \
        >>"$RUN_DIR/inventory-consumer-$1.log" 2>&1 &
    consumer_pids[$1]=$!
}
wait_ready() { # url
    local i
    for ((i = 0; i < 120; i++)); do
        curl -fsS -o /dev/null "$1/readyz" 2>/dev/null && return 0
        sleep 0.5
    done
    fail "$1 did not become ready; see $RUN_DIR"
}

rm -f "$RUN_DIR"/*.log "$RUN_DIR"/*.json
echo "== two order-services, two consumers"
start_api 0
wait_ready "http://127.0.0.1:${API_PORTS[0]}" # migrates the database first
start_api 1
start_consumer 0
start_consumer 1
wait_ready "http://127.0.0.1:${API_PORTS[1]}"
wait_ready "http://127.0.0.1:${CONSUMER_PORTS[0]}"
wait_ready "http://127.0.0.1:${CONSUMER_PORTS[1]}"
psql_q -c "CREATE TABLE proof_initial_stock AS SELECT sku, available FROM inventory"

echo "== load: $PROOF_RATE orders/s through each API for ${PROOF_SECONDS}s"
for i in 0 1; do
    "$BIN_DIR/stress-test" --url "http://127.0.0.1:${API_PORTS[$i]}" \
        --rate "$PROOF_RATE" --duration "${PROOF_SECONDS}s" --concurrency 64 \
        --idempotency-keys --retries 40 --timeout 120s --json \
        >"$RUN_DIR/load-$i.json" 2>"$RUN_DIR/load-$i.err" &
    load_pids+=($!)
done

started=$SECONDS
at() { # seconds into the load
    local wait_for=$(($1 - (SECONDS - started)))
    ((wait_for > 0)) && sleep "$wait_for"
    return 0
}

at 8
leader=$(scripts/rabbitmq-cluster.sh leader "$INVENTORY_QUEUE")
[[ $leader == outbox-?@localhost ]] || fail "no leader found for $INVENTORY_QUEUE: '$leader'"
node=${leader#outbox-}
node=${node%@localhost}
echo "[$((SECONDS - started))s] SIGKILL the queue's leader, $leader"
scripts/rabbitmq-cluster.sh kill "$node"

at 14
echo "[$((SECONDS - started))s] SIGKILL order-service 0, restart it"
kill -9 "${api_pids[0]}"
sleep 1
start_api 0

at 20
echo "[$((SECONDS - started))s] SIGKILL inventory-consumer 0, restart it"
kill -9 "${consumer_pids[0]}"
sleep 1
start_consumer 0

at 26
echo "[$((SECONDS - started))s] bring $leader back"
scripts/rabbitmq-cluster.sh start >/dev/null
echo "[$((SECONDS - started))s] $leader is back; new leader: $(scripts/rabbitmq-cluster.sh leader "$INVENTORY_QUEUE")"

load_failed=0
for pid in "${load_pids[@]}"; do
    wait "$pid" || load_failed=1
done
load_pids=()

echo "== waiting for the outbox to drain"
for ((i = 0; i < 240; i++)); do
    [ "$(psql_q -c "SELECT count(*) FROM outbox WHERE state = 'pending'")" = 0 ] && break
    sleep 0.5
done
for ((i = 0; i < 240; i++)); do
    [ "$(psql_q -c "SELECT count(*) FROM orders WHERE status = 'PENDING'")" = 0 ] && break
    sleep 0.5
done

json_field() { # file field
    sed -n "s/.*\"$2\":\([0-9.eE+-]*\).*/\1/p" "$1" | head -n 1
}
accepted=0
failed=0
not_found=0
for i in 0 1; do
    file=$RUN_DIR/load-$i.json
    [ -s "$file" ] || fail "load $i printed no report; see $RUN_DIR/load-$i.err"
    accepted=$((accepted + $(json_field "$file" ok)))
    failed=$((failed + $(json_field "$file" server_errors) + $(json_field "$file" transport_errors) + $(json_field "$file" client_errors)))
    not_found=$((not_found + $(json_field "$file" not_found)))
done

orders=$(psql_q -c "SELECT count(*) FROM orders")
pending=$(psql_q -c "SELECT count(*) FROM orders WHERE status = 'PENDING'")
completed=$(psql_q -c "SELECT count(*) FROM orders WHERE status = 'COMPLETED'")
rejected=$(psql_q -c "SELECT count(*) FROM orders WHERE status = 'REJECTED'")
processed=$(psql_q -c "SELECT count(*) FROM processed_messages")
outbox_left=$(psql_q -c "SELECT count(*) FROM outbox")
dead_events=$(psql_q -c "SELECT count(*) FROM outbox WHERE state = 'dead'")
stock_mismatches=$(psql_q -c "
    SELECT count(*) FROM proof_initial_stock i JOIN inventory v USING (sku)
    LEFT JOIN (SELECT l.sku, sum(l.quantity) AS taken FROM order_lines l
               JOIN orders o ON o.id = l.order_id WHERE o.status = 'COMPLETED'
               GROUP BY l.sku) r USING (sku)
    WHERE i.available - v.available <> coalesce(r.taken, 0)")
dlq=$(rabbitmqctl -q -n outbox-a@localhost list_queues name messages --no-table-headers |
    awk -F'\t' -v q="$DEAD_LETTER_QUEUE" '$1 == q { print $2 }')

echo
echo "== figures"
printf '%-44s %s\n' \
    "orders accepted (2xx), both APIs" "$accepted" \
    "requests failed after their retries" "$failed" \
    "accepted orders missing from the database" "$not_found" \
    "orders in the database" "$orders" \
    "  COMPLETED / REJECTED / PENDING" "$completed / $rejected / $pending" \
    "processed_messages (one per applied event)" "$processed" \
    "SKUs whose stock is not conserved" "$stock_mismatches" \
    "outbox rows left / dead events" "$outbox_left / $dead_events" \
    "messages in $DEAD_LETTER_QUEUE" "${dlq:-?}"

checks=0
check() { # description, condition...
    local description=$1
    shift
    if "$@"; then
        echo "PASS  $description"
    else
        echo "FAIL  $description"
        checks=1
    fi
}
min_accepted=$((PROOF_RATE * PROOF_SECONDS * 2 * 9 / 10))
check "the load ran and converged (stress-test exit status)" test "$load_failed" = 0
check "at least $min_accepted orders accepted" test "$accepted" -ge "$min_accepted"
check "every accepted order exists" test "$not_found" = 0
check "no order left PENDING" test "$pending" = 0
check "each order applied once (processed_messages = orders)" test "$processed" = "$orders"
check "stock conserved for every SKU" test "$stock_mismatches" = 0
check "outbox drained, no dead event" test "$outbox_left/$dead_events" = "0/0"
check "dead-letter queue empty" test "${dlq:-x}" = 0
exit "$checks"
