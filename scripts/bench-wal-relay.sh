#!/usr/bin/env bash
# Prices a relay that reads the WAL on the database side, where it would win
# or lose against polling: the pipeline ceiling's transaction
# (../shared/perf/pipeline_batch.sql: write, relay claim and delete, consumer)
# against the same with each event emitted by pg_logical_emit_message in the
# write and no relay transaction (bench/wal-relay/pipeline_wal.sql), streamed
# meanwhile from a logical slot by pg_recvlogical (pgoutput, an empty
# publication, `messages`), as the relay would read it.
#
# All run on a scratch cluster of the script's own (initdb in a temporary
# directory, a free port, the local server's shared_buffers, autovacuum off,
# synchronous_commit on): polling at `wal_level = replica`, as it runs, and at
# `logical`, to tell the level's cost from decoding's; the WAL at `logical`.
# The modes are alternated round by round. The local server is not touched.
# Figures: orders a second, and the whole machine's CPU an order (pgbench and
# pg_recvlogical included) from /proc/stat, until the walsender has sent
# everything written; for the WAL, the walsender's and pg_recvlogical's share.
#
#   scripts/bench-wal-relay.sh                  # 4 clients, 20 s a mode, three rounds
#   ROUNDS=6 SECS=10 CLIENTS=8 scripts/bench-wal-relay.sh
#
# Needs the PostgreSQL server binaries (initdb, pg_ctl, pgbench, pg_recvlogical)
# and ../shared/perf (PIPELINE_DIR) for the frozen schema and the polling script.
set -euo pipefail
shopt -s inherit_errexit # and in $(…), so that a failed step fails its run
cd "$(dirname "$0")/.."
case " $* " in *" -h "* | *" --help "*) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac

PIPELINE_DIR=${PIPELINE_DIR:-../shared/perf}
CLIENTS=${CLIENTS:-4} SECS=${SECS:-20} BATCH=${BATCH:-64} ROUNDS=${ROUNDS:-3}
[ -f "$PIPELINE_DIR/pipeline_batch.sql" ] || {
    echo "bench-wal-relay: $PIPELINE_DIR/pipeline_batch.sql not found (set PIPELINE_DIR)" >&2
    exit 1
}
for tool in initdb pg_ctl pgbench pg_recvlogical psql; do
    command -v "$tool" >/dev/null || { echo "bench-wal-relay: $tool not on PATH" >&2; exit 1; }
done
shared_buffers=$(psql -h 127.0.0.1 -U postgres -Atc 'SHOW shared_buffers' 2>/dev/null || echo 128MB)

scratch=$(mktemp -d /tmp/bench-wal-relay.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_owner=()
if [ "$(id -u)" = 0 ]; then
    chown postgres "$scratch"
    as_owner=(runuser -u postgres --)
fi
export PGHOST=127.0.0.1 PGPORT=$port PGUSER=postgres PGOPTIONS="-c client_min_messages=warning"
recv_pid=
cleanup() {
    [ -n "$recv_pid" ] && kill "$recv_pid" 2>/dev/null
    "${as_owner[@]}" pg_ctl -D "$scratch/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$scratch"
}
trap cleanup EXIT

"${as_owner[@]}" initdb -D "$scratch/data" -U postgres -A trust >/dev/null
cat >>"$scratch/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$scratch'
shared_buffers = '$shared_buffers'
autovacuum = off
synchronous_commit = on
max_wal_senders = 4
max_replication_slots = 4
EOF

# pg_ctl start with wal_level $1.
start() {
    "${as_owner[@]}" pg_ctl -D "$scratch/data" -l "$scratch/log" -w -o "-c wal_level=$1" start >/dev/null
}
stop() { "${as_owner[@]}" pg_ctl -D "$scratch/data" -m fast -w stop >/dev/null; }

fresh_database() {
    psql -q -d postgres -c "DROP DATABASE IF EXISTS pipeline WITH (FORCE)" -c "CREATE DATABASE pipeline"
    for f in "$PIPELINE_DIR"/pipeline-migrations/*.sql; do
        psql -q -v ON_ERROR_STOP=1 -d pipeline -f "$f" >/dev/null
    done
    psql -q -d pipeline -c checkpoint
}

cpu() { awk '/^cpu / {print $2 + $3 + $4, $5 + $6}' /proc/stat; }
# utime + stime of process $1, in ticks.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# The walsender's pid once pg_recvlogical streams, failing after 10 s.
walsender() {
    local pid
    for _ in $(seq 1 200); do
        pid=$(psql -Atd pipeline -c "SELECT pid FROM pg_stat_replication WHERE application_name = 'pg_recvlogical'")
        [ -n "$pid" ] && { echo "$pid"; return; }
        sleep 0.05
    done
    echo "bench-wal-relay: pg_recvlogical is not streaming ($scratch/recv.log):" >&2
    cat "$scratch/recv.log" >&2
    exit 1
}

# Runs pgbench with $1 and prints "orders/s ms-of-CPU-an-order seconds
# walsender-ms pg_recvlogical-ms" (the last two 0 when polling). For the WAL
# ($2 set), the time and CPU until the walsender has sent all that was written
# count too; one that has not after 15 s fails the run, as its CPU would be
# missing from the figures.
run() {
    local script=$1 slot=${2:-} busy0 idle0 busy1 idle1 t0 t1 out tps target sender=0 s0=0 s1=0 r0=0 r1=0
    if [ -n "$slot" ]; then
        sender=$(walsender)
        s0=$(ticks "$sender"); r0=$(ticks "$recv_pid")
    fi
    read -r busy0 idle0 < <(cpu)
    t0=$(date +%s.%N)
    out=$(pgbench -n -M prepared -D batch="$BATCH" -f "$script" -c "$CLIENTS" -j 2 -T "$SECS" pipeline 2>&1)
    if [ -n "$slot" ]; then
        target=$(psql -Atd pipeline -c 'SELECT pg_current_wal_lsn()')
        local sent=
        for _ in $(seq 1 300); do
            sent=$(psql -Atd pipeline -c "SELECT sent_lsn >= '$target' FROM pg_stat_replication WHERE pid = $sender")
            [ "$sent" = t ] && break
            sleep 0.05
        done
        if [ "$sent" != t ]; then
            echo "bench-wal-relay: the walsender had not sent up to $target 15 s after the load" >&2
            exit 1
        fi
    fi
    t1=$(date +%s.%N)
    read -r busy1 idle1 < <(cpu)
    [ -n "$slot" ] && { s1=$(ticks "$sender"); r1=$(ticks "$recv_pid"); }
    echo "$out" | grep -q aborted && { echo "$out" | grep -i error | head -3 >&2; exit 1; }
    tps=$(echo "$out" | awk '/^tps/ {print $3; exit}')
    [ -n "$tps" ] || { echo "$out" | tail -5 >&2; exit 1; }
    # Every tick is 1/100 s of one core (USER_HZ).
    python3 -c "
tps, batch, secs = float('$tps'), $BATCH, $t1 - $t0
orders = tps * batch * $SECS
print(f'{orders / secs:.0f} {($busy1 - $busy0) * 10 / orders:.4f} {secs:.1f} '
      f'{($s1 - $s0) * 10 / orders:.4f} {($r1 - $r0) * 10 / orders:.4f}')"
}

# Polling at wal_level $1 (replica, as it runs; logical, to price the level alone).
poll_round() {
    start "$1"
    fresh_database
    # Not `read < <(run …)`: a failed run must stop the script.
    result=$(run "$PIPELINE_DIR/pipeline_batch.sql")
    read -r ops ms secs _ <<<"$result"
    left=$(psql -Atd pipeline -c 'SELECT count(*) FROM outbox')
    printf '  %-12s %6s orders/s  %7s ms CPU an order  (%s s; outbox rows left %s)\n' "poll-$1" "$ops" "$ms" "$secs" "$left"
    stop
}

wal_round() {
    start logical
    fresh_database
    psql -q -d pipeline -c "CREATE PUBLICATION outbox_relay" \
        -c "SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')" >/dev/null
    pg_recvlogical -d pipeline --slot outbox_relay --start -f /dev/null -F 1 -s 1 \
        -o proto_version=1 -o publication_names=outbox_relay -o messages=true 2>"$scratch/recv.log" &
    recv_pid=$!
    result=$(run bench/wal-relay/pipeline_wal.sql outbox_relay)
    read -r ops ms secs sender_ms recv_ms <<<"$result"
    lag=$(psql -Atd pipeline -c "SELECT pg_size_pretty(pg_current_wal_lsn() - confirmed_flush_lsn) FROM pg_replication_slots WHERE slot_name = 'outbox_relay'")
    kill "$recv_pid"; wait "$recv_pid" 2>/dev/null || true; recv_pid=
    printf '  %-12s %6s orders/s  %7s ms CPU an order  (%s s; walsender %s ms, pg_recvlogical %s ms an order; slot behind by %s at the end)\n' \
        wal "$ops" "$ms" "$secs" "$sender_ms" "$recv_ms" "$lag"
    psql -q -d pipeline -c "SELECT pg_drop_replication_slot('outbox_relay')" >/dev/null
    stop
}

echo "== scratch cluster on port $port (shared_buffers $shared_buffers, autovacuum off); $CLIENTS clients, batches of $BATCH, $SECS s a mode"
for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round"
    # Alternated, so that neither mode always runs second.
    if [ $((round % 2)) = 1 ]; then
        poll_round replica; wal_round; poll_round logical
    else
        poll_round logical; wal_round; poll_round replica
    fi
done
