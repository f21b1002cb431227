# shellcheck shell=bash
# Sourced by the scripts: makes sure Postgres and RabbitMQ answer, starting the
# local ones when they are installed but stopped, or else, on a machine with
# Docker, the Compose services `postgres` and `rabbitmq`.

PG_HOST=${PG_HOST:-127.0.0.1}
PG_PORT=${PG_PORT:-5432}
AMQP_HOST=${AMQP_HOST:-127.0.0.1}
AMQP_PORT=${AMQP_PORT:-5672}

# How the scripts run `cargo xtask`: through cargo, which builds it first, or,
# with OUTBOX_PREBUILT=1 (scripts/test.sh, which has built the workspace with
# the tests' features), the binary as it is: another `cargo run` would resolve
# other features and compile the workspace a second time.
if [ "${OUTBOX_PREBUILT:-}" = 1 ]; then
    xtask=("${CARGO_TARGET_DIR:-target}/debug/xtask")
else
    xtask=(cargo xtask)
fi

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for_port() { # name host port seconds
    local i
    for ((i = 0; i < $4 * 4; i++)); do
        port_open "$2" "$3" && return 0
        sleep 0.25
    done
    return 1
}

# `docker compose`, or the older `docker-compose`, when a Docker engine answers.
compose() {
    if docker compose version >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        docker compose "$@"
    elif command -v docker-compose >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        docker-compose "$@"
    else
        return 127
    fi
}

# Starts a Compose service and waits until Docker reports it healthy.
compose_up() { # service seconds
    local script_dir id i
    script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    echo "$1 is neither reachable nor installed here; starting it with 'docker compose up -d $1'" >&2
    (cd "$script_dir/.." && compose up -d "$1") >&2 || return 1
    id=$(cd "$script_dir/.." && compose ps -q "$1")
    for ((i = 0; i < $2 * 2; i++)); do
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null)" = healthy ] && return 0
        sleep 0.5
    done
    echo "error: the Compose service $1 did not become healthy within $2 s" >&2
    return 1
}

ensure_postgres() {
    if port_open "$PG_HOST" "$PG_PORT"; then return 0; fi
    if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
        echo "Postgres is not answering on $PG_HOST:$PG_PORT; starting the local cluster" >&2
        pg_ctlcluster --skip-systemctl-redirect "$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf "%f\n" | sort | head -n1)" main start || true
    elif compose version >/dev/null 2>&1; then
        compose_up postgres 60 || return 1
    fi
    if ! wait_for_port postgres "$PG_HOST" "$PG_PORT" 30; then
        echo "error: Postgres is not reachable on $PG_HOST:$PG_PORT." >&2
        echo "       Start it (for example 'docker compose up -d postgres') and run this again." >&2
        return 1
    fi
}

ensure_rabbitmq() {
    if port_open "$AMQP_HOST" "$AMQP_PORT"; then return 0; fi
    if command -v rabbitmq-server >/dev/null 2>&1; then
        echo "RabbitMQ is not answering on $AMQP_HOST:$AMQP_PORT; starting the local server" >&2
        rabbitmq-server -detached || true
    elif compose version >/dev/null 2>&1; then
        compose_up rabbitmq 120 || return 1
    fi
    if ! wait_for_port rabbitmq "$AMQP_HOST" "$AMQP_PORT" 90; then
        echo "error: RabbitMQ is not reachable on $AMQP_HOST:$AMQP_PORT." >&2
        echo "       Start it (for example 'docker compose up -d rabbitmq') and run this again." >&2
        return 1
    fi
}

# Whether the arguments ask for the Kafka transport (`--transport kafka`).
wants_kafka() {
    case " $* " in
    *" --transport kafka "* | *" --transport=kafka "*) return 0 ;;
    *) return 1 ;;
    esac
}

# Postgres, and RabbitMQ unless the arguments ask for Kafka.
ensure_services_for() {
    if wants_kafka "$@"; then ensure_postgres; else ensure_services; fi
}

ensure_services() {
    ensure_postgres && ensure_rabbitmq
}
