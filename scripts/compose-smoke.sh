#!/usr/bin/env bash
# compose-smoke.sh: runs docker-compose.yml for real, as a user would: the
# stack up, orders posted with curl, each seen COMPLETED (or REJECTED) with
# psql inside the postgres container, a short stress test, `order-service
# reconcile`, then everything down with its volumes. The last line is
#
#   compose-smoke: posted=N completed=N
#
# and the exit status is 0 only when the two are equal (and nothing failed).
#
# Two ways to run, chosen by what the machine has:
# - a Docker engine answers (`docker info`) and the registry can be reached:
#   the compose file exactly as the README says (`up -d --build`), official
#   images, its own networks and ports (8080, 5432, ...);
# - otherwise (a machine with no registry, such as CI here), as root: Debian's
#   docker.io, docker-compose and debootstrap are installed when missing, a
#   private dockerd is started (data and exec roots under .run/docker, its own
#   socket, --iptables=false --ip6tables=false --bridge=none: the host's network
#   is not touched), stand-in images are built from Debian's packages
#   (deploy/standins; the Debian base from debootstrap is cached in
#   ~/.cache/outbox), the service image from binaries compiled on the host, and
#   the containers share the host's network through docker-compose.smoke.yml
#   on ports away from the services already running. The engine it started is
#   stopped by its pid.
#
# It runs the stack twice: as `docker compose up` starts it (with the
# observability profile, a stress test and reconcile), then with
# docker-compose.cluster.yml (three clustered RabbitMQ nodes, two replicas of
# each service, orders posted to both APIs, reconcile).
#
# Usage: scripts/compose-smoke.sh [--orders N]   (N orders posted with curl per stack, default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ORDERS=20
while [ $# -gt 0 ]; do
    case $1 in
        --orders) ORDERS=$2; shift 2 ;;
        -h | --help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "compose-smoke: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

say() { echo "compose-smoke: $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

PROJECT=outbox-smoke
STATE=$ROOT/.run/docker
OWN_ENGINE_PID=
COMPOSE_FILES=(-f docker-compose.yml)
DOCKER=docker

# ---- the engine -------------------------------------------------------------
registry_answers() {
    curl -fsS -o /dev/null --max-time 5 https://registry-1.docker.io/v2/ 2>/dev/null ||
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 https://registry-1.docker.io/v2/)" = 401 ]
}

install_missing() { # command package...
    local command=$1
    shift
    command -v "$command" >/dev/null 2>&1 && return
    [ "$(id -u)" = 0 ] || fail "$command is missing; install $* (as root)"
    say "installing $*"
    # Packages must not start services (docker.io would start the system's
    # engine): a policy-rc.d that refuses, for the install only.
    local policy=/usr/sbin/policy-rc.d own_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; } ||
        { [ -n "$own_policy" ] && rm -f "$policy"; fail "cannot install $*"; }
    [ -n "$own_policy" ] && rm -f "$policy"
    return 0
}

start_own_engine() {
    [ "$(id -u)" = 0 ] || fail "no Docker engine answers, and starting one needs root"
    install_missing dockerd docker.io
    install_missing docker-compose docker-compose
    install_missing debootstrap debootstrap
    mkdir -p "$STATE"
    export DOCKER_HOST=unix://$STATE/docker.sock
    # Debian's client: its built-in BuildKit builds without a buildx plugin.
    DOCKER=/usr/bin/docker
    if [ -f "$STATE/docker.pid" ] && kill -0 "$(cat "$STATE/docker.pid")" 2>/dev/null; then
        fail "a private engine from an earlier run still runs (pid $(cat "$STATE/docker.pid")); stop it first"
    fi
    say "starting a private Docker engine (logs: .run/docker/dockerd.log)"
    dockerd --data-root "$STATE/data" --exec-root "$STATE/exec" --host "$DOCKER_HOST" \
        --pidfile "$STATE/docker.pid" --iptables=false --ip6tables=false --bridge=none \
        >"$STATE/dockerd.log" 2>&1 &
    OWN_ENGINE_PID=$!
    for _ in $(seq 1 60); do
        "$DOCKER" info >/dev/null 2>&1 && return
        kill -0 "$OWN_ENGINE_PID" 2>/dev/null || fail "dockerd exited; see .run/docker/dockerd.log"
        sleep 0.5
    done
    fail "dockerd did not answer within 30 s; see .run/docker/dockerd.log"
}

stop_own_engine() {
    [ -n "$OWN_ENGINE_PID" ] || return 0
    kill "$OWN_ENGINE_PID" 2>/dev/null || true
    for _ in $(seq 1 40); do
        kill -0 "$OWN_ENGINE_PID" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -9 "$OWN_ENGINE_PID" 2>/dev/null || true
}

# dockerd leaves its bind of the host's network namespace mounted when it
# stops (exec root, netns/default): unmounted here, so nothing is left behind.
unmount_engine_state() {
    [ -n "$OWN_ENGINE_PID" ] || return 0
    awk -v state="$STATE/" 'index($2, state) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r mount; do umount "$mount" 2>/dev/null || umount -l "$mount" 2>/dev/null || true; done
}

compose() {
    if "$DOCKER" compose version >/dev/null 2>&1; then
        "$DOCKER" compose -p "$PROJECT" "${COMPOSE_FILES[@]}" "$@"
    else
        docker-compose -p "$PROJECT" "${COMPOSE_FILES[@]}" "$@"
    fi
}

cleanup() {
    local status=$?
    if [ -n "${STACK_UP:-}" ]; then
        if [ "$status" != 0 ]; then
            say "the services' last logs:"
            compose logs --tail 30 >&2 2>/dev/null || true
        fi
        compose --profile tools down -v --remove-orphans >/dev/null 2>&1 || true
    fi
    stop_own_engine
    unmount_engine_state
    exit "$status"
}
trap cleanup EXIT

# ---- images for a machine without a registry --------------------------------
have_image() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

build_standins() {
    local cache=${XDG_CACHE_HOME:-$HOME/.cache}/outbox
    local base=$cache/debian-bookworm-minbase.tar
    if ! have_image debian:bookworm-slim; then
        if [ ! -s "$base" ]; then
            say "making a Debian base with debootstrap (once; cached in $base)"
            mkdir -p "$cache"
            local rootfs
            rootfs=$(mktemp -d)
            if ! debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1; then
                # It may leave /proc and /sys mounted in the root it was making.
                awk -v root="$rootfs/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r |
                    while read -r mount; do umount -l "$mount" 2>/dev/null || true; done
                fail "debootstrap failed; see $cache/debootstrap.log"
            fi
            tar -C "$rootfs" -c . >"$base.partial" && mv "$base.partial" "$base"
            rm -rf "$rootfs"
        fi
        "$DOCKER" import "$base" debian:bookworm-slim >/dev/null
    fi
    for standin in postgres:15:postgres rabbitmq:3-management:rabbitmq prom/prometheus:v3.13.2:prometheus; do
        local tag=${standin%:*} dir=${standin##*:}
        if ! have_image "$tag"; then
            say "building the stand-in $tag from Debian's packages (deploy/standins/$dir)"
            DOCKER_BUILDKIT=1 "$DOCKER" build -q --network host -t "$tag" "deploy/standins/$dir" >/dev/null
        fi
    done
}

build_service_image() {
    say "building the service image from binaries compiled here (cargo build --release)"
    cargo build --release --locked -q -p order-service -p inventory-consumer -p stress-test
    local context=$ROOT/.run/compose/prebuilt
    rm -rf "$context" && mkdir -p "$context"
    cp target/release/order-service target/release/inventory-consumer target/release/stress-test "$context/"
    strip --strip-debug "$context"/order-service "$context"/inventory-consumer "$context"/stress-test
    printf 'FROM scratch\nCOPY order-service inventory-consumer stress-test /out/\n' >"$context/Dockerfile"
    DOCKER_BUILDKIT=1 "$DOCKER" build -q -t outbox-prebuilt:smoke "$context" >/dev/null
    DOCKER_BUILDKIT=1 "$DOCKER" build -q --network host --build-arg BINARIES=outbox-prebuilt:smoke \
        -t outbox:dev . >/dev/null
}

# ---- the run ---------------------------------------------------------------
# In stand-in mode the compose files named are merged into one file, without
# the base file's `ports` (host networking cannot publish ports, and an
# override cannot remove them: Compose merges lists), and hostnames (host
# networking has the host's); the cluster's peer list names the nodes of
# docker-compose.smoke-cluster.yml.
merge_for_host_network() { # output file...
    local output=$1
    shift
    local files=()
    for file in "$@"; do files+=(-f "$file"); done
    docker-compose "${files[@]}" config |
        /usr/bin/python3 -c 'import sys, yaml
config = yaml.safe_load(sys.stdin)
run = sys.argv[1]
for service in config["services"].values():
    service.pop("ports", None)
    service.pop("hostname", None)
    service["volumes"] = [volume for volume in service.get("volumes", [])
                          if not str(volume).startswith(sys.argv[2] + "/deploy/rabbitmq-cluster.conf")]
    if service.get("image") == "rabbitmq:3-management" and "RABBITMQ_ERLANG_COOKIE" in service.get("environment", {}):
        service["volumes"].append(run + "/rabbitmq-cluster.conf:/etc/rabbitmq/conf.d/20-cluster.conf:ro")
    if not service["volumes"]:
        del service["volumes"]
# Prometheus on the host network scrapes 127.0.0.1 (a copy of its config).
prometheus = config["services"].get("prometheus")
if prometheus:
    prometheus["volumes"] = [run + "/prometheus.yml:/etc/prometheus/prometheus.yml:ro"]
    prometheus["command"] = list(prometheus["command"]) + ["--web.listen-address=127.0.0.1:19090"]
# No network of its own, which would add a bridge to the host: the host network.
config["networks"] = {"default": {"external": True, "name": "host"}}
yaml.safe_dump(config, sys.stdout, sort_keys=False)' "$ROOT/.run/compose" "$ROOT" >"$output" ||
        fail "cannot merge $*"
}

if docker info >/dev/null 2>&1 && registry_answers; then
    MODE=registry
    say "a Docker engine and the registry answer: the compose file as the README runs it"
    for port in 5432 5672 15672 8080 8081 8082 8083; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            fail "port $port is in use; the compose files publish it (stop the local service first)"
        fi
    done
    SINGLE=(-f docker-compose.yml)
    CLUSTER=(-f docker-compose.yml -f docker-compose.cluster.yml)
    APIS=(http://127.0.0.1:8080 http://127.0.0.1:8082)
    UP_ARGS=(--build)
    PROMETHEUS=http://127.0.0.1:9090
    OBSERVABILITY=(prometheus grafana)
else
    MODE=standins
    start_own_engine
    mkdir -p .run/compose
    sed -e 's/"order-service:8080"/"127.0.0.1:18080"/' -e 's/"inventory-consumer:8081"/"127.0.0.1:18081"/' \
        deploy/prometheus/prometheus.yml >.run/compose/prometheus.yml
    printf '%s\n' '# Written by scripts/compose-smoke.sh: the nodes of docker-compose.smoke-cluster.yml.' \
        'cluster_formation.peer_discovery_backend = classic_config' \
        'cluster_formation.classic_config.nodes.1 = outbox-smoke@localhost' \
        'cluster_formation.classic_config.nodes.2 = outbox-smoke-b@localhost' \
        'cluster_formation.classic_config.nodes.3 = outbox-smoke-c@localhost' >.run/compose/rabbitmq-cluster.conf
    merge_for_host_network .run/compose/docker-compose.smoke-merged.yml docker-compose.yml docker-compose.smoke.yml
    merge_for_host_network .run/compose/docker-compose.smoke-cluster-merged.yml docker-compose.yml \
        docker-compose.cluster.yml docker-compose.smoke.yml docker-compose.smoke-cluster.yml
    SINGLE=(-f .run/compose/docker-compose.smoke-merged.yml)
    CLUSTER=(-f .run/compose/docker-compose.smoke-cluster-merged.yml)
    APIS=(http://127.0.0.1:18080 http://127.0.0.1:18082)
    PROMETHEUS=http://127.0.0.1:19090
    OBSERVABILITY=(prometheus)
    build_standins
    build_service_image
    UP_ARGS=(--no-build)
fi
mkdir -p .run/compose

up() { # what... services...
    local what=$1
    shift
    compose up -d "${UP_ARGS[@]}" "$@" >.run/compose/up.log 2>&1 ||
        { tail -20 .run/compose/up.log >&2; fail "docker compose up ($what) failed"; }
}

healthy() { # service...
    local service id
    for service in "$@"; do
        id=$(compose ps -q "$service")
        [ -n "$id" ] && [ "$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null)" = healthy ] ||
            return 1
    done
}

wait_healthy() { # service...
    local started=$SECONDS
    for _ in $(seq 1 150); do
        healthy "$@" && break
        sleep 1
    done
    healthy "$@" || fail "$* were not healthy within 150 s"
    say "$* healthy after $((SECONDS - started)) s"
}

psql_value() { # sql
    compose exec -T postgres psql -U postgres -d outbox -tAc "$1" | tr -d '[:space:]'
}

posted=0
completed=0
# Posts ORDERS orders with curl, in turn to each API given, and waits until
# psql in the postgres container shows each of them decided.
post_and_decide() { # label api...
    local label=$1
    shift
    local apis=("$@") ids=() n answer body decided=0
    for n in $(seq 1 "$ORDERS"); do
        local api=${apis[$((n % ${#apis[@]}))]}
        body=$(printf '{"customer_id": "%s-%d", "items": [{"sku": "SKU-%03d", "quantity": 1}]}' "$label" "$n" $((1 + n % 20)))
        answer=$(curl -sS -w '\n%{http_code}' -X POST "$api/orders" -H 'content-type: application/json' -d "$body") ||
            fail "POST $api/orders ($label $n) did not answer"
        [ "$(tail -n1 <<<"$answer")" = 201 ] ||
            fail "POST $api/orders ($label $n) answered $(tail -n1 <<<"$answer"): $(head -n1 <<<"$answer")"
        ids+=("$(head -n1 <<<"$answer" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')")
    done
    posted=$((posted + ORDERS))
    say "$label: posted $ORDERS orders with curl to ${apis[*]}"
    local id_list
    id_list=$(printf "'%s'," "${ids[@]}")
    id_list=${id_list%,}
    for _ in $(seq 1 60); do
        decided=$(psql_value "SELECT count(*) FROM orders WHERE id IN ($id_list) AND status IN ('COMPLETED', 'REJECTED')")
        [ "$decided" = "$ORDERS" ] && break
        sleep 0.5
    done
    completed=$((completed + decided))
    say "$label: psql in the postgres container: $decided of $ORDERS decided"
    compose exec -T postgres psql -U postgres -d outbox -c \
        "SELECT status, count(*) FROM orders WHERE id IN ($id_list) GROUP BY status" >&2
    [ "$decided" = "$ORDERS" ] || fail "$label: $((ORDERS - decided)) orders were not decided within 30 s"
}

down() {
    compose --profile tools down -v --remove-orphans >/dev/null 2>&1 || true
    STACK_UP=
}

# -- One of each, as `docker compose up` starts it.
COMPOSE_FILES=("${SINGLE[@]}")
STACK_UP=1
say "docker compose up ($MODE)"
up "the stack" postgres rabbitmq order-service inventory-consumer
wait_healthy order-service inventory-consumer
post_and_decide smoke "${APIS[0]}"

# The observability profile: Prometheus scrapes both services.
targets_up() {
    curl -fsS --max-time 3 "$PROMETHEUS/api/v1/targets" 2>/dev/null | /usr/bin/python3 -c 'import json, sys
targets = json.load(sys.stdin)["data"]["activeTargets"]
jobs = {target["labels"]["job"] for target in targets if target["health"] == "up"}
sys.exit(0 if {"order-service", "inventory-consumer"} <= jobs else 1)'
}
say "observability profile: ${OBSERVABILITY[*]}"
up "--profile observability" "${OBSERVABILITY[@]}"
[ "$MODE" = standins ] && say "!! grafana is not checked here: it has no Debian package, so no stand-in"
for _ in $(seq 1 60); do
    targets_up && break
    sleep 1
done
targets_up || fail "Prometheus does not scrape both services ($PROMETHEUS/api/v1/targets)"
say "Prometheus scrapes order-service and inventory-consumer (both targets up)"

say "stress test: 500 orders, 8 in flight (docker compose run --rm stress-test)"
compose run --rm stress-test --orders 500 --concurrency 8 >&2 || fail "the stress test failed"
say "order-service reconcile"
compose exec -T order-service order-service reconcile >&2 || fail "reconcile found a problem"
down

# -- The cluster: three RabbitMQ nodes, two replicas of each service.
COMPOSE_FILES=("${CLUSTER[@]}")
STACK_UP=1
say "docker compose up with docker-compose.cluster.yml ($MODE)"
up "the cluster" postgres rabbitmq rabbitmq-b rabbitmq-c \
    order-service order-service-2 inventory-consumer inventory-consumer-2
wait_healthy rabbitmq rabbitmq-b rabbitmq-c order-service order-service-2 inventory-consumer inventory-consumer-2
nodes=$(compose exec -T rabbitmq rabbitmqctl -q cluster_status --formatter json |
    /usr/bin/python3 -c 'import json, sys; print(len(json.load(sys.stdin)["running_nodes"]))') ||
    fail "cannot read the cluster's status (rabbitmqctl cluster_status)"
[ "$nodes" = 3 ] || fail "the cluster has $nodes running nodes, not 3"
say "the three RabbitMQ nodes form one cluster (rabbitmqctl cluster_status: 3 running nodes)"
post_and_decide cluster "${APIS[@]}"
queue_type=$(compose exec -T rabbitmq rabbitmqctl -q list_queues name type --formatter json |
    /usr/bin/python3 -c 'import json, sys
print(" ".join(sorted(queue["type"] for queue in json.load(sys.stdin) if queue["name"] == "inventory.order-placed")))')
[ "$queue_type" = quorum ] || fail "the queue inventory.order-placed is ${queue_type:-missing}, not a quorum queue"
say "the queue inventory.order-placed is a quorum queue"
say "order-service reconcile"
compose exec -T order-service order-service reconcile >&2 || fail "reconcile found a problem"
down

echo "compose-smoke: posted=$posted completed=$completed"
[ "$completed" = "$posted" ]
