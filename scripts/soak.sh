#!/usr/bin/env bash
# Soak: the whole system under a steady open-loop load for a long while, one row
# a minute, then a verdict. It shows what a short benchmark cannot: whether
# latency creeps up, whether the sweepers keep processed_messages and
# idempotency_keys bounded, whether the outbox bloats, whether memory leaks.
#
#   scripts/soak.sh                         # 30 minutes at half the measured peak
#   scripts/soak.sh --minutes 3 --rate 100  # a short check
#   scripts/soak.sh --chart docs/soak.svg   # the chart where it will be committed
#
# Options:
#   --minutes N   minutes of load (default 30); each minute is one stress-test run
#   --rate R      orders per second (default: half the closed-loop peak, measured
#                 by a 20 s run at the start)
#   --chart PATH  the SVG chart (default .run/soak/soak.svg)
#
# Every minute, the stress test places orders at the rate for 60 s (open loop,
# each with an Idempotency-Key of its own) and waits until the consumer has
# decided them; then the database and /proc are sampled. The row shows that
# minute's accepted orders/s, latency p50/p99, end-to-end lag p99, the outbox
# backlog and its dead tuples (n_dead_tup), the row counts of orders,
# processed_messages, idempotency_keys and outbox, the RSS of both services,
# and the errors. The rows go to .run/soak/soak.csv; `soak-report verdict`
# then draws the chart and judges the run (its --help gives the rule). The exit
# status is non-zero when the run fails.
#
# The services keep messages and keys for short windows, so that the sweepers'
# work shows within a run (each may be overridden from the environment):
#   DEDUP_WINDOW=2m IDEMPOTENCY_KEY_TTL=2m SWEEP_INTERVAL=10s
#
# Settings (environment), as in demo.sh:
#   SOAK_DATABASE_URL   postgres://postgres:postgres@$PG_HOST:$PG_PORT/outbox_soak
#                       dropped and created afresh on every run
#   SOAK_AMQP_URL       amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f
#   SOAK_API_PORT       18180   order-service
#   SOAK_CONSUMER_PORT  18181   inventory-consumer
#   SOAK_CONCURRENCY    64      most requests in flight during the load
#   SOAK_PREFIX         soak    prefix of the exchange and queue names
#   CARGO_TARGET_DIR    target  where the binaries are built
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
# shellcheck source-path=SCRIPTDIR/..
source scripts/lib.sh

minutes=30
rate=
run_dir=.run/soak
chart=$run_dir/soak.svg
while (($# > 0)); do
    case $1 in
        --minutes) minutes=${2:?--minutes needs a value}; shift 2 ;;
        --minutes=*) minutes=${1#*=}; shift ;;
        --rate) rate=${2:?--rate needs a value}; shift 2 ;;
        --rate=*) rate=${1#*=}; shift ;;
        --chart) chart=${2:?--chart needs a value}; shift 2 ;;
        --chart=*) chart=${1#*=}; shift ;;
        -h | --help) usage_of "$0"; exit 0 ;;
        *) echo "error: unknown argument '$1'" >&2; usage_of "$0" >&2; exit 2 ;;
    esac
done
[[ $minutes =~ ^[1-9][0-9]*$ ]] || fail "--minutes takes a whole number of minutes, not '$minutes'"
if [[ -n $rate ]] && ! [[ $rate =~ ^[0-9]+([.][0-9]+)?$ && ! $rate =~ ^0+([.]0+)?$ ]]; then
    fail "--rate takes a positive number of orders per second, not '$rate'"
fi

SOAK_DATABASE_URL=${SOAK_DATABASE_URL:-postgres://postgres:postgres@$PG_HOST:$PG_PORT/outbox_soak}
SOAK_AMQP_URL=${SOAK_AMQP_URL:-amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f}
SOAK_API_PORT=${SOAK_API_PORT:-18180}
SOAK_CONSUMER_PORT=${SOAK_CONSUMER_PORT:-18181}
SOAK_CONCURRENCY=${SOAK_CONCURRENCY:-64}
SOAK_PREFIX=${SOAK_PREFIX:-soak}
BIN_DIR=${CARGO_TARGET_DIR:-target}/release
csv=$run_dir/soak.csv

API_URL=http://127.0.0.1:$SOAK_API_PORT
CONSUMER_URL=http://127.0.0.1:$SOAK_CONSUMER_PORT

# Both services read these; the broker names keep the soak's messages away from
# any other order-service or consumer on the same broker.
export DATABASE_URL=$SOAK_DATABASE_URL
export AMQP_URL=$SOAK_AMQP_URL
export EXCHANGE=$SOAK_PREFIX.orders
export INVENTORY_QUEUE=$SOAK_PREFIX.inventory.order-placed
export DEAD_LETTER_EXCHANGE=$SOAK_PREFIX.orders.dlx
export DEAD_LETTER_QUEUE=$SOAK_PREFIX.inventory.order-placed.dead
# Without the line order-service logs for every order, which at a few hundred
# orders a second for half an hour makes a log of several hundred MB.
export RUST_LOG=${RUST_LOG:-info,sqlx::postgres::notice=warn,order_service::routes=warn}
# Short retention, so the sweepers delete within the run what a real
# deployment would keep for days.
export DEDUP_WINDOW=${DEDUP_WINDOW:-2m}
export IDEMPOTENCY_KEY_TTL=${IDEMPOTENCY_KEY_TTL:-2m}
export SWEEP_INTERVAL=${SWEEP_INTERVAL:-10s}

# --- the processes this script starts (scripts/lib.sh), and only those, are
# stopped on exit ---

LOG_DIR=$run_dir
soak_started=0 # the CSV is this run's only from then on
stress_pid=

# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n $stress_pid ]]; then
        # It stops its load and its wait at SIGTERM, within a request timeout.
        kill -TERM "$stress_pid" 2>/dev/null || true
        wait "$stress_pid" 2>/dev/null || true
    fi
    stop_started
    if ((soak_started)) && [[ -s $csv ]]; then
        echo "   rows: $csv"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rss_kib() { # pid: VmRSS in KiB, or nothing without /proc
    awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || true
}

# One stress-test run; its --json report goes to the file $1, its stderr (the
# error samples, the reason it could not start) next to it. It runs in the
# background so that a signal to this script is handled at once, not after
# the minute.
stress() { # report-file stress-test-arguments...
    local report=$1
    shift
    local status=0
    "$BIN_DIR/stress-test" --url "$API_URL" --database-url "$SOAK_DATABASE_URL" \
        --idempotency-keys --json "$@" >"$report" 2>"${report%.json}.err" &
    stress_pid=$!
    wait "$stress_pid" || status=$?
    stress_pid=
    if ((status == 2)) || [[ ! -s $report ]]; then
        cat "${report%.json}.err" >&2
        fail "stress-test could not run (status $status); see above"
    fi
    return "$status"
}

# ------------------------------------------------------------------------------

for tool in curl psql awk; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is needed; install it and run this again"
done
for port in "$SOAK_API_PORT" "$SOAK_CONSUMER_PORT"; do
    if port_open 127.0.0.1 "$port"; then
        fail "port $port is already taken; choose others with SOAK_API_PORT / SOAK_CONSUMER_PORT"
    fi
done

echo "== services"
ensure_services
echo "   Postgres on $PG_HOST:$PG_PORT, RabbitMQ on $AMQP_HOST:$AMQP_PORT"

echo "== cargo build --release"
cargo build --release --locked -p order-service -p inventory-consumer -p stress-test

echo "== fresh database"
db_name=${SOAK_DATABASE_URL##*/}
db_name=${db_name%%\?*}
admin_url=${SOAK_DATABASE_URL%/*}/postgres
[[ $db_name =~ ^[A-Za-z0-9_]+$ ]] || fail "unexpected database name '$db_name' in SOAK_DATABASE_URL"
psql "$admin_url" -X -q -v ON_ERROR_STOP=1 -c "DROP DATABASE IF EXISTS \"$db_name\" WITH (FORCE)"
echo "   dropped $db_name; the services create and migrate it at start-up"
# Messages an interrupted soak left behind would name orders that no longer
# exist, and its queues may be of another type (QUEUE_TYPE): delete the soak's
# queues where the broker is the local default node; the services declare them
# afresh.
if command -v rabbitmqctl >/dev/null 2>&1 && [[ $SOAK_AMQP_URL == *@127.0.0.1:5672/* ]]; then
    for queue in "$INVENTORY_QUEUE" "$DEAD_LETTER_QUEUE"; do
        rabbitmqctl -q --timeout 10 delete_queue "$queue" >/dev/null 2>&1 || true
    done
fi

echo "== starting the services (DEDUP_WINDOW=$DEDUP_WINDOW IDEMPOTENCY_KEY_TTL=$IDEMPOTENCY_KEY_TTL SWEEP_INTERVAL=$SWEEP_INTERVAL)"
mkdir -p "$run_dir"
rm -f "$csv" "$run_dir"/minute-*.json "$run_dir"/minute-*.err "$run_dir"/peak.json "$run_dir"/peak.err
start order-service "$SOAK_API_PORT"
api_pid=$!
wait_ready order-service "$api_pid" "$API_URL" 60
# The consumer starts second, so the two do not race to create the database.
start inventory-consumer "$SOAK_CONSUMER_PORT"
consumer_pid=$!
wait_ready inventory-consumer "$consumer_pid" "$CONSUMER_URL" 60

if [[ -z $rate ]]; then
    echo "== measuring the peak: closed loop, 32 in flight, 20 s"
    stress "$run_dir/peak.json" --concurrency 32 --duration 20s ||
        fail "the peak run failed: $(cat "$run_dir/peak.err")"
    # serde_json writes compact JSON: "throughput_rps":1234.5
    peak=$(sed -n 's/.*"throughput_rps":\([0-9.eE+-]*\).*/\1/p' "$run_dir/peak.json")
    [[ -n $peak ]] || fail "no throughput_rps in $run_dir/peak.json"
    rate=$(awk -v peak="$peak" 'BEGIN { r = int(peak / 2 + 0.5); print (r < 1 ? 1 : r) }')
    echo "   peak $(printf '%.0f' "$peak") orders/s; the soak runs at half: $rate orders/s"
fi

# The outbox is a queue: the relay deletes every row it publishes, and only
# vacuum reclaims them. A server without autovacuum (some CI setups turn it
# off) shows its dead tuples growing however well the services behave.
autovacuum=$(psql "$SOAK_DATABASE_URL" -X -At -c "SHOW autovacuum" 2>/dev/null || true)
if [[ $autovacuum == off ]]; then
    echo "   warning: autovacuum is off on this Postgres server: the outbox's dead tuples will only grow" >&2
fi

echo "== soak: $minutes minutes at $rate orders/s, at most $SOAK_CONCURRENCY in flight; a row a minute"
started=$SECONDS
soak_started=1
# One query, so the counts of a row are of the same moment. n_dead_tup comes
# from the statistics, which lag the table by up to a second or so.
sample_sql="SELECT
    (SELECT count(*) FROM outbox WHERE state = 'pending'),
    (SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables WHERE relname = 'outbox'),
    (SELECT count(*) FROM orders),
    (SELECT count(*) FROM processed_messages),
    (SELECT count(*) FROM idempotency_keys),
    (SELECT count(*) FROM outbox)"
for ((minute = 1; minute <= minutes; minute++)); do
    report=$run_dir/minute-$(printf '%03d' "$minute").json
    # A minute with failed requests or orders left undecided is recorded, not
    # fatal: the verdict counts it, and the next minutes show whether it lasts.
    stress "$report" --rate "$rate" --duration 60s --concurrency "$SOAK_CONCURRENCY" || true
    check_alive
    IFS='|' read -r pending dead_tuples orders processed keys outbox_rows < <(
        psql "$SOAK_DATABASE_URL" -X -At -v ON_ERROR_STOP=1 -c "$sample_sql"
    ) || fail "cannot sample the database"
    rss_args=()
    api_rss=$(rss_kib "$api_pid")
    consumer_rss=$(rss_kib "$consumer_pid")
    [[ -n $api_rss ]] && rss_args+=(--order-service-rss-kib "$api_rss")
    [[ -n $consumer_rss ]] && rss_args+=(--inventory-consumer-rss-kib "$consumer_rss")
    "$BIN_DIR/soak-report" row --csv "$csv" --minute "$minute" --report "$report" \
        --elapsed-seconds $((SECONDS - started)) \
        --outbox-pending "$pending" --outbox-dead-tuples "$dead_tuples" \
        --orders "$orders" --processed-messages "$processed" \
        --idempotency-keys "$keys" --outbox-rows "$outbox_rows" "${rss_args[@]}"
done

echo "== verdict"
verdict_status=0
"$BIN_DIR/soak-report" verdict --csv "$csv" --chart "$chart" \
    --title "soak: $minutes min at $rate orders/s (DEDUP_WINDOW $DEDUP_WINDOW, IDEMPOTENCY_KEY_TTL $IDEMPOTENCY_KEY_TTL, SWEEP_INTERVAL $SWEEP_INTERVAL)" ||
    verdict_status=$?
exit "$verdict_status"
