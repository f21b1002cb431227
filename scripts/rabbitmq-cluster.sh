#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on this one machine, from the locally installed
# rabbitmq-server (no Docker), beside the default node on 5672, which it never
# touches (every rabbitmqctl call names its node with -n).
#
#   scripts/rabbitmq-cluster.sh start    start whichever node is not running (a node that
#                                         was killed comes back with its data and rejoins),
#                                         cluster them, wait for all three; the last line
#                                         printed is the AMQP_URL of the three nodes
#   scripts/rabbitmq-cluster.sh stop     stop the three nodes and remove their data
#   scripts/rabbitmq-cluster.sh status   members, and each quorum queue's leader and members
#   scripts/rabbitmq-cluster.sh kill a   SIGKILL node outbox-a (or b, c): a node lost at once
#   scripts/rabbitmq-cluster.sh leader Q the node leading the quorum queue Q
#
# Nodes outbox-a@localhost, outbox-b@localhost, outbox-c@localhost: AMQP on 5701,
# 5702, 5703, Erlang distribution on 25701, 25702, 25703, no management plugin.
# Their data, logs and configuration live in $CLUSTER_DIR (default
# /var/lib/rabbitmq/outbox-cluster): the Debian wrapper runs RabbitMQ as the
# `rabbitmq` user, which must be able to enter it (a checkout under a home
# directory with mode 0700 is out of its reach). The nodes share the Erlang cookie
# of that user, as the default node does.
set -euo pipefail

CLUSTER_DIR=${CLUSTER_DIR:-/var/lib/rabbitmq/outbox-cluster}
NODES=(a b c)
HOST=127.0.0.1

node_name() { echo "outbox-$1@localhost"; }
amqp_port() { case $1 in a) echo 5701 ;; b) echo 5702 ;; c) echo 5703 ;; esac; }
dist_port() { echo $((20000 + $(amqp_port "$1"))); }

die() {
    echo "error: $*" >&2
    exit 1
}

command -v rabbitmq-server >/dev/null 2>&1 || die "rabbitmq-server is not installed"
command -v rabbitmqctl >/dev/null 2>&1 || die "rabbitmqctl is not installed"

# rabbitmqctl for one node of this cluster, never the default one.
ctl() {
    local node=$1
    shift
    rabbitmqctl -q -n "$(node_name "$node")" "$@"
}

running() { ctl "$1" status >/dev/null 2>&1; }

as_rabbitmq() {
    if [ "$(id -u)" = "$(id -u rabbitmq)" ]; then
        "$@"
    else
        # `su` without --login keeps the environment: the RABBITMQ_* settings pass.
        su rabbitmq -s /bin/sh -c "$(printf '%q ' "$@")"
    fi
}

prepare() {
    local node=$1 dir=$CLUSTER_DIR/$1
    mkdir -p "$dir/mnesia" "$dir/log"
    cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.local = $HOST:$(amqp_port "$node")
# The tests and scripts connect as guest over loopback only.
loopback_users.guest = true
EOF
    echo '[].' >"$dir/enabled_plugins"
    chown -R rabbitmq:rabbitmq "$CLUSTER_DIR"
}

start_node() {
    local node=$1 dir=$CLUSTER_DIR/$1
    prepare "$node"
    echo "starting $(node_name "$node") (AMQP $(amqp_port "$node"))" >&2
    (
        cd "$CLUSTER_DIR"
        export RABBITMQ_NODENAME=$(node_name "$node")
        export RABBITMQ_NODE_IP_ADDRESS=$HOST
        export RABBITMQ_NODE_PORT=$(amqp_port "$node")
        export RABBITMQ_DIST_PORT=$(dist_port "$node")
        export RABBITMQ_MNESIA_BASE=$dir/mnesia
        export RABBITMQ_LOG_BASE=$dir/log
        export RABBITMQ_PID_FILE=$dir/pid
        export RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf
        export RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins
        as_rabbitmq /usr/lib/rabbitmq/bin/rabbitmq-server -detached
    )
}

wait_running() {
    local node=$1 i
    for ((i = 0; i < 120; i++)); do
        if ctl "$node" await_startup --timeout 5 >/dev/null 2>&1; then
            return 0
        fi
        sleep 1
    done
    die "$(node_name "$node") did not start; see $CLUSTER_DIR/$node/log"
}

is_member() { # is node $2 in the cluster as node $1 sees it?
    ctl "$1" cluster_status --formatter json 2>/dev/null | grep -q "\"$(node_name "$2")\""
}

cmd_start() {
    local node
    for node in "${NODES[@]}"; do
        running "$node" || start_node "$node"
    done
    for node in "${NODES[@]}"; do
        wait_running "$node"
    done
    for node in b c; do
        if ! is_member a "$node"; then
            echo "joining $(node_name "$node") to $(node_name a)" >&2
            ctl "$node" stop_app
            ctl "$node" join_cluster "$(node_name a)"
            ctl "$node" start_app
            wait_running "$node"
        fi
    done
    echo "cluster running: $(node_name a), $(node_name b), $(node_name c)" >&2
    local urls=()
    for node in "${NODES[@]}"; do
        urls+=("amqp://guest:guest@$HOST:$(amqp_port "$node")/%2f")
    done
    (IFS=,; echo "AMQP_URL=${urls[*]}")
}

cmd_stop() {
    local node
    for node in "${NODES[@]}"; do
        if running "$node"; then
            echo "stopping $(node_name "$node")" >&2
            ctl "$node" stop >/dev/null || true
        fi
        if [ -f "$CLUSTER_DIR/$node/pid" ]; then
            kill -9 "$(cat "$CLUSTER_DIR/$node/pid")" 2>/dev/null || true
        fi
    done
    rm -rf "$CLUSTER_DIR"
    echo "stopped; removed $CLUSTER_DIR" >&2
}

cmd_status() {
    local node any=
    for node in "${NODES[@]}"; do
        if running "$node"; then
            echo "$(node_name "$node"): running (AMQP $(amqp_port "$node"))"
            any=$node
        else
            echo "$(node_name "$node"): down"
        fi
    done
    [ -n "$any" ] || return 0
    echo
    echo "members, as $(node_name "$any") sees them:"
    ctl "$any" cluster_status | sed 's/\x1b\[[0-9;]*m//g' | sed -n '/^Disk Nodes/,/^Versions/p' |
        grep -v -e '^$' -e '^Versions'
    echo
    echo "quorum queues (name, leader, members):"
    ctl "$any" list_queues name type leader members --no-table-headers 2>/dev/null |
        awk -F'\t' '$2 == "quorum" { print $1 "\t" $3 "\t" $4 }'
}

cmd_kill() {
    local node=${1:?which node: a, b or c}
    local pid_file=$CLUSTER_DIR/$node/pid
    [ -f "$pid_file" ] || die "no pid file for $(node_name "$node")"
    echo "SIGKILL $(node_name "$node") (pid $(cat "$pid_file"))" >&2
    kill -9 "$(cat "$pid_file")"
}

cmd_leader() {
    local queue=${1:?which queue}
    local node
    for node in "${NODES[@]}"; do
        if running "$node"; then
            ctl "$node" list_queues name leader --no-table-headers |
                awk -F'\t' -v q="$queue" '$1 == q { print $2 }'
            return 0
        fi
    done
    die "no node of the cluster is running"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    kill) cmd_kill "${2:-}" ;;
    leader) cmd_leader "${2:-}" ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
