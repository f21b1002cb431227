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
# Usage: scripts/compose-smoke.sh [--orders N]   (N orders posted with curl, default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ORDERS=20
while [ $# -gt 0 ]; do
    case $1 in
        --orders) ORDERS=$2; shift 2 ;;
        -h | --help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
if docker info >/dev/null 2>&1 && registry_answers; then
    MODE=registry
    API=http://127.0.0.1:8080
    say "a Docker engine and the registry answer: the compose file as the README runs it"
    for port in 5432 5672 15672 8080 8081; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            fail "port $port is in use; the compose file publishes it (stop the local service first)"
        fi
    done
    UP_ARGS=(--build)
    PROMETHEUS=http://127.0.0.1:9090
    OBSERVABILITY=(prometheus grafana)
else
    MODE=standins
    start_own_engine
    # Host networking cannot publish ports, and an override cannot remove the
    # base file's `ports` (Compose merges lists): the two files merged, without
    # them, make the one file this mode runs.
    mkdir -p .run/compose
    sed -e 's/"order-service:8080"/"127.0.0.1:18080"/' -e 's/"inventory-consumer:8081"/"127.0.0.1:18081"/' \
        deploy/prometheus/prometheus.yml >.run/compose/prometheus.yml
    docker-compose -f docker-compose.yml -f docker-compose.smoke.yml config |
        /usr/bin/python3 -c 'import sys, yaml
config = yaml.safe_load(sys.stdin)
for service in config["services"].values():
    service.pop("ports", None)
# Prometheus on the host network scrapes 127.0.0.1 (a copy of its config).
prometheus = config["services"]["prometheus"]
prometheus["volumes"] = [sys.argv[1] + ":/etc/prometheus/prometheus.yml:ro"]
prometheus["command"] = list(prometheus["command"]) + ["--web.listen-address=127.0.0.1:19090"]
# No network of its own, which would add a bridge to the host: the host network.
config["networks"] = {"default": {"external": True, "name": "host"}}
yaml.safe_dump(config, sys.stdout, sort_keys=False)' "$ROOT/.run/compose/prometheus.yml" \
        >.run/compose/docker-compose.smoke-merged.yml ||
        fail "cannot merge docker-compose.yml with docker-compose.smoke.yml"
    COMPOSE_FILES=(-f .run/compose/docker-compose.smoke-merged.yml)
    API=http://127.0.0.1:18080
    PROMETHEUS=http://127.0.0.1:19090
    OBSERVABILITY=(prometheus)
    build_standins
    build_service_image
    UP_ARGS=(--no-build)
fi

started=$(date +%s)
STACK_UP=1
say "docker compose up ($MODE)"
mkdir -p .run/compose
compose up -d "${UP_ARGS[@]}" postgres rabbitmq order-service inventory-consumer >.run/compose/up.log 2>&1 ||
    { tail -20 .run/compose/up.log >&2; fail "docker compose up failed"; }

healthy() { # service
    local id
    id=$(compose ps -q "$1")
    [ -n "$id" ] && [ "$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null)" = healthy ]
}
for _ in $(seq 1 120); do
    healthy order-service && healthy inventory-consumer && break
    sleep 1
done
healthy order-service && healthy inventory-consumer ||
    fail "order-service and inventory-consumer were not healthy within 120 s"
say "the stack is healthy after $(($(date +%s) - started)) s"

psql_value() { # sql
    compose exec -T postgres psql -U postgres -d outbox -tAc "$1" | tr -d '[:space:]'
}

posted=0
ids=()
for n in $(seq 1 "$ORDERS"); do
    body=$(printf '{"customer_id": "smoke-%d", "items": [{"sku": "SKU-%03d", "quantity": 1}]}' "$n" $((1 + n % 20)))
    answer=$(curl -sS -w '\n%{http_code}' -X POST "$API/orders" -H 'content-type: application/json' -d "$body") ||
        fail "POST /orders $n did not answer"
    [ "$(tail -n1 <<<"$answer")" = 201 ] || fail "POST /orders $n answered $(tail -n1 <<<"$answer"): $(head -n1 <<<"$answer")"
    ids+=("$(head -n1 <<<"$answer" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')")
    posted=$((posted + 1))
done
say "posted $posted orders with curl"

id_list=$(printf "'%s'," "${ids[@]}")
id_list=${id_list%,}
completed=0
for _ in $(seq 1 60); do
    completed=$(psql_value "SELECT count(*) FROM orders WHERE id IN ($id_list) AND status IN ('COMPLETED', 'REJECTED')")
    [ "$completed" = "$posted" ] && break
    sleep 0.5
done
say "psql in the postgres container: $completed of $posted decided"
compose exec -T postgres psql -U postgres -d outbox -c \
    "SELECT status, count(*) FROM orders WHERE id IN ($id_list) GROUP BY status" >&2

# The observability profile: Prometheus scrapes both services.
targets_up() {
    curl -fsS --max-time 3 "$PROMETHEUS/api/v1/targets" 2>/dev/null | /usr/bin/python3 -c 'import json, sys
targets = json.load(sys.stdin)["data"]["activeTargets"]
jobs = {target["labels"]["job"] for target in targets if target["health"] == "up"}
sys.exit(0 if {"order-service", "inventory-consumer"} <= jobs else 1)'
}
say "observability profile: ${OBSERVABILITY[*]}"
compose --profile observability up -d "${UP_ARGS[@]}" "${OBSERVABILITY[@]}" >.run/compose/up.log 2>&1 ||
    { tail -20 .run/compose/up.log >&2; fail "docker compose --profile observability up failed"; }
[ "$MODE" = standins ] && say "!! grafana is not checked here: it has no Debian package, so no stand-in"
for _ in $(seq 1 60); do
    targets_up && break
    sleep 1
done
targets_up || fail "Prometheus does not scrape both services ($PROMETHEUS/api/v1/targets)"
say "Prometheus scrapes order-service and inventory-consumer (both targets up)"

if [ "$completed" = "$posted" ]; then
    say "stress test: 500 orders, 8 in flight (docker compose run --rm stress-test)"
    compose run --rm stress-test --orders 500 --concurrency 8 >&2 || fail "the stress test failed"
    say "order-service reconcile"
    compose exec -T order-service order-service reconcile >&2 || fail "reconcile found a problem"
fi

echo "compose-smoke: posted=$posted completed=$completed"
[ "$completed" = "$posted" ]
