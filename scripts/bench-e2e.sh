#!/usr/bin/env bash
# End-to-end benchmark of issue "group commit": what the whole system achieves,
# measured against what Postgres alone can commit of the same work.
#
#   scripts/bench-e2e.sh                     # defaults below
#   scripts/bench-e2e.sh --orders 5000 --seconds 10 --no-build   # a quick look
#
# Options (each also an environment variable):
#   --orders N       BENCH_ORDERS       20000  orders of the closed-loop run
#   --concurrency N  BENCH_CONCURRENCY  32     requests the stress test keeps in flight
#   --clients N      BENCH_CLIENTS      16     pgbench clients of the ceiling
#   --seconds N      BENCH_SECONDS      20     pgbench duration of the ceiling
#   --no-build       use the release binaries as they are
#
# Steps:
# 1. cargo build --release of order-service, inventory-consumer, stress-test.
# 2. The ceiling: pgbench runs bench/e2e/order.pgbench, today's single-order
#    write transaction, frozen, against bench/e2e/yardstick.sql, today's schema,
#    frozen, in a database of its own (outbox_bench_ceiling, dropped afterwards):
#    the orders a second Postgres on this machine commits when nothing else of
#    the system runs. Neither file is ever updated: later versions of the system
#    are measured against the same ceiling. Shown with Postgres's CPU time a
#    transaction and the cores other processes kept busy meanwhile: the ceiling
#    sinks far more than the system does when the machine is shared.
# 3. The whole system: order-service and inventory-consumer (release builds) on a
#    fresh database (outbox_bench_e2e) and broker names of their own (prefix
#    "bench"), 500 orders to warm up, then the closed-loop stress test:
#    --orders N --concurrency C, waiting until the consumer has decided every
#    order. The services log at RUST_LOG=warn (BENCH_RUST_LOG to change it), so
#    that writing logs does not show in their CPU figures.
# 4. CPU time per order, from /proc, between a reading just before the run and
#    one just after it: Postgres is the postmaster's process tree (every backend,
#    including those that exited during the run, the background processes and
#    the stress test's own reads); RabbitMQ the beam.smp listening on the AMQP
#    port, with its helpers; order-service and inventory-consumer their
#    processes; the load generator the stress test, as reaped. "Other" is
#    the rest of the machine's busy time (another build, say): the figures are
#    only as quiet as the machine.
# 5. The table, also written to .run/bench-e2e/result.json: the ceiling in tps,
#    the system's orders/s (orders accepted / (load time + time until the last
#    was decided)), their ratio, HTTP latency and end-to-end lag (created to
#    decided) p50/p99, CPU ms per order of each component.
# 6. An open-loop run at half the system's orders/s for 20 s (BENCH_OPEN_SECONDS),
#    at most 2 C in flight: its latency p99 and e2e lag p50/p99. The goal of the
#    issue: e2e lag p99 under 50 ms at half the peak.
#
# Exits non-zero when a step fails: the build, pgbench, a service that does not
# become ready or exits, a stress-test run that fails (a request not answered
# 2xx, or orders not decided in time).
#
# Settings (environment), as in demo.sh:
#   BENCH_DATABASE_URL          postgres://postgres:postgres@$PG_HOST:$PG_PORT/outbox_bench_e2e
#   BENCH_CEILING_DATABASE_URL  postgres://postgres:postgres@$PG_HOST:$PG_PORT/outbox_bench_ceiling
#                               both dropped and created afresh on every run
#   BENCH_AMQP_URL              amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f
#   BENCH_API_PORT              18280  order-service
#   BENCH_CONSUMER_PORT         18281  inventory-consumer
#   BENCH_PREFIX                bench  prefix of the exchange and queue names
#   BENCH_WARMUP_ORDERS         500
#   PGBENCH                     pgbench, else /usr/lib/postgresql/*/bin/pgbench
#   CARGO_TARGET_DIR            target  where the binaries are built
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091 # checked on its own (shellcheck -x follows it)
source scripts/services.sh
# shellcheck source-path=SCRIPTDIR/..
source scripts/lib.sh

orders=${BENCH_ORDERS:-20000}
concurrency=${BENCH_CONCURRENCY:-32}
clients=${BENCH_CLIENTS:-16}
seconds=${BENCH_SECONDS:-20}
build=1
while (($# > 0)); do
    case $1 in
        --orders) orders=${2:?--orders needs a value}; shift 2 ;;
        --orders=*) orders=${1#*=}; shift ;;
        --concurrency) concurrency=${2:?--concurrency needs a value}; shift 2 ;;
        --concurrency=*) concurrency=${1#*=}; shift ;;
        --clients) clients=${2:?--clients needs a value}; shift 2 ;;
        --clients=*) clients=${1#*=}; shift ;;
        --seconds) seconds=${2:?--seconds needs a value}; shift 2 ;;
        --seconds=*) seconds=${1#*=}; shift ;;
        --no-build) build=0; shift ;;
        -h | --help) usage_of "$0"; exit 0 ;;
        *) echo "error: unknown argument '$1'" >&2; usage_of "$0" >&2; exit 2 ;;
    esac
done
for value in "$orders" "$concurrency" "$clients" "$seconds"; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || fail "--orders, --concurrency, --clients and --seconds take a positive whole number, not '$value'"
done

BENCH_DATABASE_URL=${BENCH_DATABASE_URL:-postgres://postgres:postgres@$PG_HOST:$PG_PORT/outbox_bench_e2e}
BENCH_CEILING_DATABASE_URL=${BENCH_CEILING_DATABASE_URL:-postgres://postgres:postgres@$PG_HOST:$PG_PORT/outbox_bench_ceiling}
BENCH_AMQP_URL=${BENCH_AMQP_URL:-amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f}
BENCH_API_PORT=${BENCH_API_PORT:-18280}
BENCH_CONSUMER_PORT=${BENCH_CONSUMER_PORT:-18281}
BENCH_PREFIX=${BENCH_PREFIX:-bench}
BENCH_WARMUP_ORDERS=${BENCH_WARMUP_ORDERS:-500}
BENCH_OPEN_SECONDS=${BENCH_OPEN_SECONDS:-20}
BIN_DIR=${CARGO_TARGET_DIR:-target}/release
LOG_DIR=.run/bench-e2e
result_file=$LOG_DIR/result.json

API_URL=http://127.0.0.1:$BENCH_API_PORT
CONSUMER_URL=http://127.0.0.1:$BENCH_CONSUMER_PORT

# Both services read these; the broker names keep the benchmark's messages away
# from any other order-service or consumer on the same broker.
export DATABASE_URL=$BENCH_DATABASE_URL
export AMQP_URL=$BENCH_AMQP_URL
export EXCHANGE=$BENCH_PREFIX.orders
export INVENTORY_QUEUE=$BENCH_PREFIX.inventory.order-placed
export DEAD_LETTER_EXCHANGE=$BENCH_PREFIX.orders.dlx
export DEAD_LETTER_QUEUE=$BENCH_PREFIX.inventory.order-placed.dead
# Not RUST_LOG from the caller's shell: an info log line per order would be
# measured as the services' CPU.
export RUST_LOG=${BENCH_RUST_LOG:-warn}

timed_pid= # a stress-test or pgbench run under start_timed

# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n $timed_pid ]]; then
        # start_timed passes SIGTERM on; the stress test stops within a request
        # timeout, pgbench at once.
        kill -TERM "$timed_pid" 2>/dev/null || true
        wait "$timed_pid" 2>/dev/null || true
    fi
    stop_started
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- helpers ------------------------------------------------------------------

admin_url_of() { # database-url: the same server's postgres database
    echo "${1%/*}/postgres"
}

db_name_of() { # database-url
    local name=${1##*/}
    name=${name%%\?*}
    [[ $name =~ ^[A-Za-z0-9_]+$ ]] || fail "unexpected database name '$name' in $1"
    echo "$name"
}

recreate_db() { # database-url
    local name
    name=$(db_name_of "$1")
    PGOPTIONS=--client-min-messages=warning psql "$(admin_url_of "$1")" -X -q -v ON_ERROR_STOP=1 \
        -c "DROP DATABASE IF EXISTS \"$name\" WITH (FORCE)" \
        -c "CREATE DATABASE \"$name\""
}

drop_db() { # database-url
    PGOPTIONS=--client-min-messages=warning psql "$(admin_url_of "$1")" -X -q -v ON_ERROR_STOP=1 \
        -c "DROP DATABASE IF EXISTS \"$(db_name_of "$1")\" WITH (FORCE)"
}

# A value of a stress-test JSON report by its path (latency_ms.p99); "" for null.
json_get() { # file path
    if command -v jq >/dev/null 2>&1; then
        jq -r --arg path "$2" 'getpath($path | split(".")) | if . == null then "" else tostring end' "$1"
    else
        python3 -c '
import json, sys
value = json.load(open(sys.argv[1]))
for key in sys.argv[2].split("."):
    value = value.get(key) if isinstance(value, dict) else None
print("" if value is None else str(value).lower() if isinstance(value, bool) else value)' "$1" "$2"
    fi
}

calc() { # awk-expression [name=value...]: its value
    local expression=$1
    shift
    local args=() pair
    for pair in "$@"; do args+=(-v "$pair"); done
    awk "${args[@]}" "BEGIN { print ($expression) }"
}

or_dash() { # value: the value, or - when empty
    echo "${1:--}"
}

or_null() { # value: the value, or null when empty (for JSON)
    echo "${1:-null}"
}

# One stress-test run with a --json report to $LOG_DIR/<name>.json and its
# stderr next to it; its user + system CPU seconds to <name>.cpu (start_timed).
# Runs in the background so that a signal to this script is handled at once.
stress() { # name stress-test-arguments...
    local name=$1
    shift
    local report=$LOG_DIR/$name.json status=0
    start_timed "$LOG_DIR/$name.cpu" "$report" "$LOG_DIR/$name.err" \
        "$BIN_DIR/stress-test" --url "$API_URL" --database-url "$BENCH_DATABASE_URL" --json "$@"
    timed_pid=$!
    wait "$timed_pid" || status=$?
    timed_pid=
    if ((status != 0)); then
        echo "---- $LOG_DIR/$name.err" >&2
        cat "$LOG_DIR/$name.err" >&2 || true
        echo "----" >&2
        if [[ -s $report ]]; then
            echo "   report: $report" >&2
        fi
    fi
    return "$status"
}

# The processes whose CPU time is measured --------------------------------------

# The postmaster: the first line of postmaster.pid in the server's data
# directory, else the oldest process named postgres.
postmaster_pid() {
    local data_dir pid=
    data_dir=$(psql "$(admin_url_of "$BENCH_DATABASE_URL")" -X -At -c "SHOW data_directory" 2>/dev/null || true)
    if [[ -n $data_dir && -r $data_dir/postmaster.pid ]]; then
        pid=$(head -n 1 "$data_dir/postmaster.pid")
    fi
    if [[ -z $pid || ! -r /proc/$pid/stat ]]; then
        pid=$(pgrep -o -x postgres || true)
    fi
    echo "$pid"
}

# The RabbitMQ node the services talk to: the beam.smp listening on the AMQP
# port (ss shows the pids to root), else the only beam.smp of user rabbitmq.
rabbitmq_pid() {
    local port=${BENCH_AMQP_URL##*@}
    port=${port%%/*}
    port=${port##*:}
    local pid=
    if command -v ss >/dev/null 2>&1; then
        pid=$(ss -Hltnp "sport = :$port" 2>/dev/null |
            sed -n 's/.*("beam\.smp",pid=\([0-9]*\),.*/\1/p' | head -n 1)
    fi
    if [[ -z $pid ]]; then
        local candidates
        candidates=$(pgrep -u rabbitmq -x beam.smp || true)
        if [[ $(wc -w <<<"$candidates") == 1 ]]; then
            pid=$candidates
        fi
    fi
    echo "$pid"
}

# ------------------------------------------------------------------------------

for tool in curl psql awk getconf; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is needed; install it and run this again"
done
command -v jq >/dev/null 2>&1 || command -v python3 >/dev/null 2>&1 ||
    fail "jq or python3 is needed to read the stress test's report"
PGBENCH=${PGBENCH:-$(command -v pgbench || true)}
if [[ -z $PGBENCH ]]; then
    PGBENCH=$(find /usr/lib/postgresql -path '*/bin/pgbench' 2>/dev/null | sort -V | tail -n 1)
fi
[[ -n $PGBENCH && -x $PGBENCH ]] || fail "pgbench is needed (it comes with Postgres); set PGBENCH to its path"
[[ -r /proc/self/stat ]] || fail "/proc is needed to measure CPU time"
for port in "$BENCH_API_PORT" "$BENCH_CONSUMER_PORT"; do
    if port_open 127.0.0.1 "$port"; then
        fail "port $port is already taken; choose others with BENCH_API_PORT / BENCH_CONSUMER_PORT"
    fi
done
clk_tck=$(getconf CLK_TCK)
cores=$(getconf _NPROCESSORS_ONLN)

echo "== services"
ensure_services
echo "   Postgres on $PG_HOST:$PG_PORT, RabbitMQ on $AMQP_HOST:$AMQP_PORT; $cores cores"
autovacuum=$(psql "$(admin_url_of "$BENCH_DATABASE_URL")" -X -At -c "SHOW autovacuum")
if [[ $autovacuum == off ]]; then
    echo "   note: autovacuum is off on this server: the tables' autovacuum settings do nothing"
fi

if ((build)); then
    echo "== cargo build --release"
    cargo build --release --locked -p order-service -p inventory-consumer -p stress-test
fi
for name in order-service inventory-consumer stress-test; do
    [[ -x $BIN_DIR/$name ]] || fail "$BIN_DIR/$name is missing; run without --no-build"
done
mkdir -p "$LOG_DIR"
rm -f "$result_file" "$LOG_DIR"/*.json "$LOG_DIR"/*.err "$LOG_DIR"/*.cpu "$LOG_DIR"/pgbench.out

pg_pid=$(postmaster_pid)
if [[ -n $pg_pid ]]; then
    echo "   Postgres CPU: the postmaster, pid $pg_pid, and its process tree"
else
    echo "   Postgres CPU: not measured (no local postmaster found)"
fi

# --- the ceiling ----------------------------------------------------------------

echo "== ceiling: pgbench, $clients clients, ${seconds} s, bench/e2e/order.pgbench on bench/e2e/yardstick.sql"
recreate_db "$BENCH_CEILING_DATABASE_URL"
psql "$BENCH_CEILING_DATABASE_URL" -X -q -v ON_ERROR_STOP=1 -f bench/e2e/yardstick.sql >/dev/null
# A checkpoint first, so that neither run starts in the middle of one: the
# full-page images after a checkpoint are a large part of the WAL of a commit.
psql "$BENCH_CEILING_DATABASE_URL" -X -q -c CHECKPOINT
pgbench_status=0
read -r ceiling_busy_before ceiling_total_before < <(machine_ticks)
read -r pg_ceiling_before < <(tree_ticks "${pg_pid:-0}")
start_timed "$LOG_DIR/pgbench.cpu" "$LOG_DIR/pgbench.out" "$LOG_DIR/pgbench.err" \
    "$PGBENCH" -n -M prepared -c "$clients" -j 2 -T "$seconds" -f bench/e2e/order.pgbench \
    "$BENCH_CEILING_DATABASE_URL"
timed_pid=$!
wait "$timed_pid" || pgbench_status=$?
timed_pid=
read -r pg_ceiling_after < <(tree_ticks "${pg_pid:-0}")
read -r ceiling_busy_after ceiling_total_after < <(machine_ticks)
drop_db "$BENCH_CEILING_DATABASE_URL"
if ((pgbench_status != 0)); then
    cat "$LOG_DIR/pgbench.out" "$LOG_DIR/pgbench.err" >&2
    fail "pgbench failed (status $pgbench_status)"
fi
# "tps = 1234.5 (without initial connection time)" (Postgres 14 and later) or
# "(excluding connections establishing)" (earlier).
ceiling_tps=$(sed -n 's/^tps = \([0-9.]*\) (\(without initial connection time\|excluding connections establishing\)).*/\1/p' \
    "$LOG_DIR/pgbench.out")
[[ -n $ceiling_tps ]] || { cat "$LOG_DIR/pgbench.out" "$LOG_DIR/pgbench.err" >&2; fail "no tps in pgbench's output"; }
ceiling_latency=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$LOG_DIR/pgbench.out")
ceiling_xacts=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$LOG_DIR/pgbench.out")
# Postgres's own CPU per transaction of the ceiling, to set beside the system's.
ceiling_cpu_postgres=
ceiling_other_cores=
if ((pg_ceiling_before >= 0 && pg_ceiling_after >= 0 && ${ceiling_xacts:-0} > 0)); then
    ceiling_cpu_postgres=$(calc 'sprintf("%.3f", (after - before) * 1000 / tck / n)' \
        "before=$pg_ceiling_before" "after=$pg_ceiling_after" "tck=$clk_tck" "n=$ceiling_xacts")
    # The cores that processes other than Postgres and pgbench kept busy
    # meanwhile: the ceiling is only as high as the machine is quiet.
    ceiling_other_cores=$(calc 'sprintf("%.2f", cores * (busy - pg - bench * tck) / total)' \
        "cores=$cores" "busy=$((ceiling_busy_after - ceiling_busy_before))" \
        "total=$((ceiling_total_after - ceiling_total_before))" \
        "pg=$((pg_ceiling_after - pg_ceiling_before))" "bench=$(cat "$LOG_DIR/pgbench.cpu")" "tck=$clk_tck")
fi
echo "   $(printf '%.1f' "$ceiling_tps") tps, latency average ${ceiling_latency:-?} ms," \
    "postgres CPU $(or_dash "$ceiling_cpu_postgres") ms a transaction," \
    "other processes $(or_dash "$ceiling_other_cores") of $cores cores"

# --- the whole system -------------------------------------------------------------

echo "== fresh database and queues"
drop_db "$BENCH_DATABASE_URL"
echo "   dropped $(db_name_of "$BENCH_DATABASE_URL"); the services create and migrate it at start-up"
# Messages an interrupted run left behind would name orders that no longer
# exist: delete the benchmark's queues where the broker is the local default
# node; the services declare them afresh.
if command -v rabbitmqctl >/dev/null 2>&1 && [[ $BENCH_AMQP_URL == *@127.0.0.1:5672/* ]]; then
    for queue in "$INVENTORY_QUEUE" "$DEAD_LETTER_QUEUE"; do
        rabbitmqctl -q --timeout 10 delete_queue "$queue" >/dev/null 2>&1 || true
    done
fi

echo "== starting the services (RUST_LOG=$RUST_LOG)"
start order-service "$BENCH_API_PORT"
api_pid=$!
wait_ready order-service "$api_pid" "$API_URL" 60
# The consumer starts second, so the two do not race to create the database.
start inventory-consumer "$BENCH_CONSUMER_PORT"
consumer_pid=$!
wait_ready inventory-consumer "$consumer_pid" "$CONSUMER_URL" 60

rabbit_pid=$(rabbitmq_pid)
if [[ -n $rabbit_pid ]]; then
    rabbit_node=
    if command -v rabbitmqctl >/dev/null 2>&1; then
        rabbit_node=$(rabbitmqctl -q --timeout 10 eval 'node().' 2>/dev/null | tr -d "'" || true)
    fi
    echo "   RabbitMQ CPU: beam.smp pid $rabbit_pid (the one listening on the AMQP port${rabbit_node:+; the default node is $rabbit_node}) and its process tree"
else
    echo "   RabbitMQ CPU: not measured (no local beam.smp found for the AMQP port)"
fi

echo "== warm-up: $BENCH_WARMUP_ORDERS orders, $concurrency in flight"
stress warmup --orders "$BENCH_WARMUP_ORDERS" --concurrency "$concurrency" ||
    fail "the warm-up run failed"
check_alive

# Transactions committed in other databases during the run: their Postgres CPU
# is in the postmaster's tree too.
other_xacts_sql="SELECT coalesce(sum(xact_commit + xact_rollback), 0) FROM pg_stat_database
    WHERE datname IS DISTINCT FROM '$(db_name_of "$BENCH_DATABASE_URL")'"
other_xacts() {
    psql "$BENCH_DATABASE_URL" -X -At -c "$other_xacts_sql" 2>/dev/null || echo 0
}

psql "$BENCH_DATABASE_URL" -X -q -c CHECKPOINT
echo "== closed loop: $orders orders, $concurrency in flight"
other_before=$(other_xacts)
read -r machine_busy_before machine_total_before < <(machine_ticks)
mapfile -t before < <(tree_ticks "${pg_pid:-0}" "${rabbit_pid:-0}" "$api_pid" "$consumer_pid")
closed_status=0
stress closed --orders "$orders" --concurrency "$concurrency" || closed_status=$?
mapfile -t after < <(tree_ticks "${pg_pid:-0}" "${rabbit_pid:-0}" "$api_pid" "$consumer_pid")
read -r machine_busy_after machine_total_after < <(machine_ticks)
other_after=$(other_xacts)
((closed_status == 0)) || fail "the closed-loop run failed (stress-test status $closed_status)"
check_alive

report=$LOG_DIR/closed.json
ok=$(json_get "$report" ok)
elapsed=$(json_get "$report" elapsed_seconds)
converge=$(json_get "$report" converge_seconds)
latency_p50=$(json_get "$report" latency_ms.p50)
latency_p99=$(json_get "$report" latency_ms.p99)
lag_p50=$(json_get "$report" e2e_lag_ms.p50)
lag_p99=$(json_get "$report" e2e_lag_ms.p99)
[[ -n $ok && -n $elapsed && -n $converge ]] || fail "$report lacks ok, elapsed_seconds or converge_seconds"
((ok > 0)) || fail "no order was accepted"

system_ops=$(calc 'ok / (elapsed + converge)' "ok=$ok" "elapsed=$elapsed" "converge=$converge")
# The consumer's status updates that took the HOT path (no new index entries).
hot_percent=$(psql "$BENCH_DATABASE_URL" -X -A -t -c \
    "SELECT round(100.0 * n_tup_hot_upd / nullif(n_tup_upd, 0), 1) FROM pg_stat_user_tables WHERE relname = 'orders'")
ratio=$(calc 'sprintf("%.2f", ops / tps)' "ops=$system_ops" "tps=$ceiling_tps")

# CPU ms per order: a component whose process was not found (or vanished) is
# empty, and shown as "-".
per_order() { # ticks-before ticks-after
    if (($1 < 0 || $2 < 0)); then
        echo ""
    else
        calc 'sprintf("%.3f", (after - before) * 1000 / tck / ok)' \
            "before=$1" "after=$2" "tck=$clk_tck" "ok=$ok"
    fi
}
cpu_postgres=$(per_order "${before[0]}" "${after[0]}")
cpu_rabbitmq=$(per_order "${before[1]}" "${after[1]}")
cpu_api=$(per_order "${before[2]}" "${after[2]}")
cpu_consumer=$(per_order "${before[3]}" "${after[3]}")
cpu_load=$(calc 'sprintf("%.3f", seconds * 1000 / ok)' "seconds=$(cat "$LOG_DIR/closed.cpu")" "ok=$ok")
cpu_total=$(calc 'sprintf("%.3f", a + b + c + d + e)' "a=${cpu_postgres:-0}" "b=${cpu_rabbitmq:-0}" \
    "c=$cpu_api" "d=$cpu_consumer" "e=$cpu_load")
# The rest of the machine's busy time in the same interval.
cpu_other=$(calc 'sprintf("%.3f", (busy_after - busy_before) * 1000 / tck / ok - ours)' \
    "busy_after=$machine_busy_after" "busy_before=$machine_busy_before" "tck=$clk_tck" "ok=$ok" \
    "ours=$cpu_total")
machine_busy_pct=$(calc 'sprintf("%.0f", 100 * (busy_after - busy_before) / (total_after - total_before))' \
    "busy_after=$machine_busy_after" "busy_before=$machine_busy_before" \
    "total_after=$machine_total_after" "total_before=$machine_total_before")
other_cores=$(calc 'sprintf("%.2f", other * ok / 1000 / (total_delta / cores / tck))' \
    "other=$cpu_other" "ok=$ok" "total_delta=$((machine_total_after - machine_total_before))" \
    "cores=$cores" "tck=$clk_tck")
other_xact_count=$((other_after - other_before))

# --- the table --------------------------------------------------------------------

row() { # label value [unit]
    printf '  %-52s %16s%s\n' "$1" "$2" "${3:+ $3}"
}
echo "== result"
row "ceiling (pgbench, frozen 1-order txn, $clients clients)" "$(printf '%.1f' "$ceiling_tps")" \
    "tps  (postgres CPU $(or_dash "$ceiling_cpu_postgres") ms a transaction; other processes $(or_dash "$ceiling_other_cores") cores)"
row "system ($ok orders, $concurrency in flight)" "$(printf '%.1f' "$system_ops")" \
    "orders/s  ($ok in $(printf '%.2f' "$elapsed") s + $(printf '%.2f' "$converge") s to decide the last)"
row "system / ceiling" "${ratio}x"
row "HTTP latency p50 / p99" "$latency_p50 / $latency_p99" "ms"
row "e2e lag p50 / p99" "$(or_dash "$lag_p50") / $(or_dash "$lag_p99")" "ms"
echo "  CPU per order"
row "  postgres" "$(or_dash "$cpu_postgres")" "ms"
row "  rabbitmq" "$(or_dash "$cpu_rabbitmq")" "ms"
row "  order-service" "$cpu_api" "ms"
row "  inventory-consumer" "$cpu_consumer" "ms"
row "  load generator (stress-test)" "$cpu_load" "ms"
row "  total" "$cpu_total" "ms"
row "  other processes on the machine (not counted)" "$cpu_other" \
    "ms  ($other_cores cores; the machine ${machine_busy_pct}% busy of $cores)"
row "orders status updates that were HOT" "$(or_dash "$hot_percent")" "%"
if ((other_xact_count > 10)); then
    echo "  note: other databases committed $other_xact_count transactions during the run; their Postgres CPU is in the postgres row"
fi

# --- open loop at half the peak ---------------------------------------------------

open_rate=$(calc 'sprintf("%.0f", r < 2 ? 1 : r / 2)' "r=$system_ops")
open_concurrency=$((concurrency * 2))
echo "== open loop: $open_rate orders/s (half of $(printf '%.0f' "$system_ops")) for ${BENCH_OPEN_SECONDS} s, at most $open_concurrency in flight"
open_status=0
stress open --rate "$open_rate" --duration "${BENCH_OPEN_SECONDS}s" --concurrency "$open_concurrency" ||
    open_status=$?
open_report=$LOG_DIR/open.json
open_ok='' open_rps='' open_latency_p50='' open_latency_p99='' open_lag_p50='' open_lag_p99=
if [[ -s $open_report ]]; then
    open_ok=$(json_get "$open_report" ok)
    open_rps=$(json_get "$open_report" throughput_rps)
    open_latency_p50=$(json_get "$open_report" latency_ms.p50)
    open_latency_p99=$(json_get "$open_report" latency_ms.p99)
    open_lag_p50=$(json_get "$open_report" e2e_lag_ms.p50)
    open_lag_p99=$(json_get "$open_report" e2e_lag_ms.p99)
fi
goal=unknown
if [[ -n $open_lag_p99 ]]; then
    goal=$(calc 'lag < 50 ? "met" : "missed"' "lag=$open_lag_p99")
fi
row "sent at" "$(printf '%.1f' "${open_rps:-0}")" "orders/s  ($(or_dash "$open_ok") accepted)"
row "HTTP latency p50 / p99" "$(or_dash "$open_latency_p50") / $(or_dash "$open_latency_p99")" "ms"
row "e2e lag p50 / p99" "$(or_dash "$open_lag_p50") / $(or_dash "$open_lag_p99")" "ms  (goal: p99 < 50 ms: $goal)"

# --- result.json ------------------------------------------------------------------

commit=$(git rev-parse --short HEAD 2>/dev/null || true)
dirty=false
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null || true) ]]; then dirty=true; fi
cat >"$result_file" <<EOF
{
  "commit": "$commit",
  "dirty": $dirty,
  "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "cores": $cores,
  "ceiling_tps": $ceiling_tps,
  "ceiling_postgres_cpu_ms_per_transaction": $(or_null "$ceiling_cpu_postgres"),
  "ceiling_other_processes_cores": $(or_null "$ceiling_other_cores"),
  "pgbench_clients": $clients,
  "pgbench_seconds": $seconds,
  "orders": $orders,
  "concurrency": $concurrency,
  "ok": $ok,
  "elapsed_seconds": $elapsed,
  "converge_seconds": $converge,
  "system_orders_per_second": $(printf '%.1f' "$system_ops"),
  "system_over_ceiling": $ratio,
  "latency_ms": { "p50": $latency_p50, "p99": $latency_p99 },
  "e2e_lag_ms": { "p50": $(or_null "$lag_p50"), "p99": $(or_null "$lag_p99") },
  "cpu_ms_per_order": {
    "postgres": $(or_null "$cpu_postgres"),
    "rabbitmq": $(or_null "$cpu_rabbitmq"),
    "order_service": $cpu_api,
    "inventory_consumer": $cpu_consumer,
    "load_generator": $cpu_load,
    "total": $cpu_total,
    "other_processes": $cpu_other
  },
  "machine_busy_percent": $machine_busy_pct,
  "other_processes_cores": $other_cores,
  "other_database_transactions": $other_xact_count,
  "orders_hot_update_percent": $(or_null "$hot_percent"),
  "open_loop": {
    "rate": $open_rate,
    "seconds": $BENCH_OPEN_SECONDS,
    "concurrency": $open_concurrency,
    "ok": $(or_null "$open_ok"),
    "throughput_rps": $(or_null "$open_rps"),
    "latency_ms": { "p50": $(or_null "$open_latency_p50"), "p99": $(or_null "$open_latency_p99") },
    "e2e_lag_ms": { "p50": $(or_null "$open_lag_p50"), "p99": $(or_null "$open_lag_p99") },
    "goal_lag_p99_under_50ms": "$goal",
    "stress_test_status": $open_status
  }
}
EOF
echo "   result: $result_file"
((open_status == 0)) || fail "the open-loop run failed (stress-test status $open_status)"
