#!/usr/bin/env bash
# The one test command: checks that Postgres and RabbitMQ answer (starting the
# local ones if they are installed but stopped), then validates the Compose
# files and the Prometheus configuration and alert rules (promtool, from
# Debian's prometheus package, installed when missing: its prometheus also
# evaluates the dashboard and the rules in the test suite), and runs the format check,
# clippy with warnings as errors, the whole test suite against them (with the
# Kafka transport, against a local broker from scripts/kafka-broker.sh), the
# docs check (cargo xtask check-docs), the API fuzzer (scripts/fuzz-api.sh),
# the Compose stack run for real
# (scripts/compose-smoke.sh) and the cluster proof (scripts/cluster-proof.sh). The last line sums every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

ensure_services

# How long each step took, printed above the summary line (CI's budget is
# 25 minutes; `took` says which step to look at when it grows).
timings=""
step_started=$SECONDS
took() { # name: the step that just ended
    timings+=$(printf '%6d s  %s' "$((SECONDS - step_started))" "$1")$'\n'
    step_started=$SECONDS
}

# Tests create a fresh database each (#[sqlx::test]) through this server and a
# fresh set of exchanges and queues each on this broker.
export DATABASE_URL=${DATABASE_URL:-postgres://postgres:postgres@$PG_HOST:$PG_PORT/postgres}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f}

echo "== docker-compose config"
# Validated here, and run for real by scripts/compose-smoke.sh below.
if command -v docker-compose >/dev/null 2>&1; then
    docker-compose -f docker-compose.yml config -q
    for profile in tools observability kafka; do
        docker-compose -f docker-compose.yml --profile "$profile" config -q
    done
    docker-compose -f docker-compose.yml -f docker-compose.cluster.yml config -q
    docker-compose -f docker-compose.yml -f docker-compose.smoke.yml config -q
    docker-compose -f docker-compose.yml -f docker-compose.smoke-cluster.yml config -q
    echo "docker-compose.yml (each profile), its cluster and the smoke test's overrides are valid"
else
    echo "!! SKIPPED: docker-compose is not installed (apt-get install docker-compose);" \
        "the Compose files were NOT validated" >&2
fi

took "docker-compose config"
echo "== what the tests need; promtool check config"
# Programs the test suite needs from Debian's packages: installed when missing
# (as root), and one that cannot be installed fails the run, unlike a missing
# docker-compose above.
require_packages() { # why, then program:package pairs
    local why=$1 missing=() pair
    shift
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 ||
            [[ " ${missing[*]} " == *" ${pair#*:} "* ]] || missing+=("${pair#*:}")
    done
    [ ${#missing[@]} = 0 ] && return 0
    echo "installing Debian's ${missing[*]} ($why)" >&2
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
            true
    fi
    for pair in "$@"; do
        if ! command -v "${pair%%:*}" >/dev/null 2>&1; then
            echo "!! FAILED: ${pair%%:*} is not installed and could not be installed" \
                "(apt-get install ${pair#*:}, as root): $why" >&2
            exit 1
        fi
    done
}
# The Prometheus of the "observability" profile: promtool validates its
# configuration here; prometheus evaluates every dashboard panel and alert rule
# against the services' metrics in the test suite, and must run there.
require_packages "the Prometheus configuration and the dashboard's test" \
    promtool:prometheus prometheus:prometheus
export OUTBOX_REQUIRE_PROMETHEUS=1
# The console's browser test: headless Chromium driven through chromedriver.
require_packages "the console's browser test" chromium:chromium chromedriver:chromium-driver
export OUTBOX_REQUIRE_BROWSER=1
promtool check config deploy/prometheus/prometheus.yml # its alert rules too

took "promtool (and installing what the tests need)"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
# With the optional Kafka transport, so that its code is linted too.
cargo clippy --workspace --all-targets --locked --features outbox/kafka -- -D warnings
took "cargo fmt, cargo clippy"
echo "== outbox: the core with no transport, and each transport alone"
for features in "" rabbitmq kafka; do
    cargo clippy -p outbox --locked --no-default-features --features "$features" -- -D warnings
done
if cargo tree -p outbox --locked --no-default-features -e normal | grep -E "^.*(lapin|rskafka|rdkafka) v"; then
    echo "!! the outbox core depends on a broker client" >&2
    exit 1
fi
took "cargo clippy of the outbox core and each transport"
echo "== cargo test"
# Every test binary prints its own "test result:" line; the last line of this
# script sums them, so one line tells how the whole suite went.
log=$(mktemp)
trap 'rm -f "$log"; scripts/kafka-broker.sh stop 2>/dev/null || true' EXIT
# The Kafka transport's tests (outbox, feature kafka) need a broker: a local
# one on a free port, stopped on exit. One that cannot start fails the run.
kafka_env=$(scripts/kafka-broker.sh start) || {
    echo "!! FAILED: the local Kafka broker did not start (scripts/kafka-broker.sh start)" >&2
    exit 1
}
eval "$kafka_env"
export KAFKA_BROKERS
status=0
cargo test --workspace --locked --no-fail-fast --features outbox/kafka -- "$@" 2>&1 | tee "$log" || status=$?
scripts/kafka-broker.sh stop
took "cargo test (building the tests included)"
# The binaries the checks below run, built with the tests' features (the
# tests built most of them): `cargo xtask` and the checks' own `cargo build`
# would resolve other features and compile the workspace again. If it fails,
# the checks fail on the missing binaries, and the summary still prints.
cargo build --workspace --all-targets --locked --features outbox/kafka || status=1
export OUTBOX_PREBUILT=1
source scripts/services.sh # again: "${xtask[@]}" is now that binary
took "cargo build of the binaries the checks run"

# The checks that run whole processes: each counts as one test in the summary.
checks_passed=0
checks_failed=0
check() { # name, command...
    local name=$1
    shift
    echo "== $name"
    if "$@"; then
        checks_passed=$((checks_passed + 1))
    else
        echo "!! $name FAILED" >&2
        checks_failed=$((checks_failed + 1))
        status=1
    fi
    took "$name"
}
# The docs: README_zh.md has README.md's headings and code blocks, and every
# relative link of the READMEs and docs/*.md names a file (and a heading) that exists.
check "docs: README_zh mirrors README, links resolve (cargo xtask check-docs)" "${xtask[@]}" check-docs
check "API fuzzing (scripts/fuzz-api.sh)" scripts/fuzz-api.sh
# docker-compose.yml run for real: with the machine's engine and the official
# images where a registry answers, else (here) a private engine and stand-in
# images from Debian's packages. It installs what it needs, as root.
check "docker compose up for real (scripts/compose-smoke.sh)" scripts/compose-smoke.sh --profile dev
if command -v rabbitmq-server >/dev/null 2>&1 && command -v rabbitmqctl >/dev/null 2>&1; then
    check "cluster proof (scripts/cluster-proof.sh)" scripts/cluster-proof.sh --profile debug
else
    echo "!! SKIPPED: the cluster proof needs the local rabbitmq-server (apt-get install rabbitmq-server);" \
        "failover on a cluster was NOT tested" >&2
fi

echo "== time taken ($((SECONDS / 60)) min in all)"
printf '%s' "$timings"
awk -v checks_passed="$checks_passed" -v checks_failed="$checks_failed" '
     /^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i + 1) ~ /^passed/) passed += $i
            if ($(i + 1) ~ /^failed/) failed += $i
        }
     }
     END { printf "%d passed, %d failed\n", passed + checks_passed, failed + checks_failed }' "$log"
exit "$status"
