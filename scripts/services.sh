# Sourced by the scripts: makes sure Postgres and RabbitMQ answer, starting the
# local ones when they are installed but stopped.

PG_HOST=${PG_HOST:-127.0.0.1}
PG_PORT=${PG_PORT:-5432}
AMQP_HOST=${AMQP_HOST:-127.0.0.1}
AMQP_PORT=${AMQP_PORT:-5672}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for_port() { # name host port seconds
    local i
    for ((i = 0; i < $4 * 4; i++)); do
        port_open "$2" "$3" && return 0
        sleep 0.25
    done
    return 1
}

ensure_postgres() {
    if port_open "$PG_HOST" "$PG_PORT"; then return 0; fi
    if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
        echo "Postgres is not answering on $PG_HOST:$PG_PORT; starting the local cluster" >&2
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
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
    fi
    if ! wait_for_port rabbitmq "$AMQP_HOST" "$AMQP_PORT" 90; then
        echo "error: RabbitMQ is not reachable on $AMQP_HOST:$AMQP_PORT." >&2
        echo "       Start it (for example 'docker compose up -d rabbitmq') and run this again." >&2
        return 1
    fi
}

ensure_services() {
    ensure_postgres && ensure_rabbitmq
}
