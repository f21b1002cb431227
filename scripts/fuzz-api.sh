#!/usr/bin/env bash
# Property-based fuzzing of order-service from its own OpenAPI document, with
# schemathesis (installed from PyPI into .venv-fuzz, a virtualenv of this
# checkout). Runs an order-service (debug build, no relay) on a fresh database
# `outbox_fuzz`, then:
#   1. negative mode: only requests the document says are invalid. Every answer
#      must be a documented 4xx of the documented shape, and afterwards no order,
#      line, event or key may exist: a rejected request writes nothing;
#   2. all modes, every check but positive_data_acceptance (a request can match
#      the schema and still be refused: a SKU not in the catalogue, a repeated SKU,
#      an Idempotency-Key reused with another body): no 5xx, responses and headers
#      conform to the document, wrong methods get 405.
# Prints how many requests each phase generated; exits non-zero on any failure.
#
#   FUZZ_EXAMPLES (300) examples per operation and phase; FUZZ_MAX_TIME (60) seconds per phase
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_postgres

FUZZ_EXAMPLES=${FUZZ_EXAMPLES:-300}
FUZZ_MAX_TIME=${FUZZ_MAX_TIME:-60}
FUZZ_PORT=${FUZZ_PORT:-18380}
SCHEMATHESIS_VERSION=4.32.5
VENV=.venv-fuzz
RUN_DIR=.run/fuzz
DB_URL=postgres://postgres:postgres@$PG_HOST:$PG_PORT/outbox_fuzz
mkdir -p "$RUN_DIR"

if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    echo "== installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
fi

cargo build -q --locked -p order-service
psql -X -q "postgres://postgres:postgres@$PG_HOST:$PG_PORT/postgres" \
    -c "DROP DATABASE IF EXISTS outbox_fuzz WITH (FORCE)"
port_open 127.0.0.1 "$FUZZ_PORT" && { echo "error: port $FUZZ_PORT is taken (FUZZ_PORT)" >&2; exit 1; }
DATABASE_URL=$DB_URL RELAY_WORKERS=0 LISTEN_ADDR=127.0.0.1:$FUZZ_PORT RUST_LOG=warn \
    "${CARGO_TARGET_DIR:-target}/debug/order-service" >"$RUN_DIR/order-service.log" 2>&1 &
api_pid=$!
trap 'kill "$api_pid" 2>/dev/null || true; wait "$api_pid" 2>/dev/null || true' EXIT
for ((i = 0; i < 120; i++)); do
    curl -fsS -o /dev/null "http://127.0.0.1:$FUZZ_PORT/readyz" 2>/dev/null && break
    kill -0 "$api_pid" 2>/dev/null || { cat "$RUN_DIR/order-service.log" >&2; exit 1; }
    sleep 0.25
done

# Runs schemathesis; prints its summary and the number of generated requests.
fuzz() { # name, schemathesis options...
    local name=$1 status=0
    shift
    (cd "$RUN_DIR" && "../../$VENV/bin/schemathesis" run \
        "http://127.0.0.1:$FUZZ_PORT/openapi.json" \
        --max-examples "$FUZZ_EXAMPLES" --max-time "$FUZZ_MAX_TIME" --seed 20261124 \
        --generation-allow-x00 true --generation-database none --no-color "$@") \
        >"$RUN_DIR/$name.txt" 2>&1 || status=$?
    sed -n '/SUMMARY/,$p' "$RUN_DIR/$name.txt"
    generated=$(sed -n 's/^ *\([0-9][0-9]*\) generated.*/\1/p' "$RUN_DIR/$name.txt" | tail -n 1)
    echo ">> $name: ${generated:-?} requests generated (details in $RUN_DIR/$name.txt)"
    return "$status"
}

rows() {
    psql -X -q -t -A "$DB_URL" -c \
        "SELECT (SELECT count(*) FROM orders) + (SELECT count(*) FROM order_lines)
              + (SELECT count(*) FROM outbox) + (SELECT count(*) FROM idempotency_keys)"
}

failed=0
echo "== fuzzing with invalid requests only"
fuzz negative --mode negative --phases coverage,fuzzing \
    --checks not_a_server_error,negative_data_rejection,status_code_conformance,content_type_conformance,response_schema_conformance ||
    failed=1
negative_requests=${generated:-0}
written=$(rows)
if [ "$written" = 0 ]; then
    echo ">> no row written by the rejected requests"
else
    echo ">> FAIL: the rejected requests wrote $written rows"
    failed=1
fi

echo "== fuzzing with every kind of request"
fuzz all --mode all --checks all --exclude-checks positive_data_acceptance || failed=1
all_requests=${generated:-0}

echo "fuzz-api: $((negative_requests + all_requests)) requests generated; $([ "$failed" = 0 ] && echo passed || echo FAILED)"
exit "$failed"
