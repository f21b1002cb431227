# shellcheck shell=bash
# Sourced by the scripts that run the whole system (demo.sh, soak.sh, bench-e2e.sh, chaos.sh): the
# processes a script starts, waiting for them to be ready, stopping them on
# exit, and the CPU time of process trees from /proc.
#
# The sourcing script sets, before it calls these:
#   BIN_DIR     where the release binaries are (${CARGO_TARGET_DIR:-target}/release)
#   LOG_DIR     where each started process logs, as $LOG_DIR/$LOG_PREFIX<name>.log
#   LOG_PREFIX  (optional) a prefix of those log names
# and installs the traps, for example:
#   trap 'status=$?; stop_started; exit "$status"' EXIT
#   trap 'exit 130' INT
#   trap 'exit 143' TERM

fail() {
    echo "error: $*" >&2
    exit 1
}

# The comment block at the top of the script, from its second line to the
# `set -euo pipefail` line, without the comment marks: its --help.
usage_of() { # script
    sed -n '2,/^set -euo/p' "$1" | sed '$d' | sed 's/^# \{0,1\}//'
}

# --- the processes the script starts, and only those, are stopped on exit ----

started_pids=()
started_names=()

log_of() { # name
    echo "$LOG_DIR/${LOG_PREFIX:-}$1.log"
}

# Starts $BIN_DIR/<name> listening on 127.0.0.1:<port>; its pid is then in $!
# and at the end of started_pids.
start() { # name listen-port
    local name=$1 port=$2 log
    log=$(log_of "$name")
    LISTEN_ADDR=127.0.0.1:$port "$BIN_DIR/$name" >"$log" 2>&1 &
    started_pids+=($!)
    started_names+=("$name")
    echo "   $name: pid $!, http://127.0.0.1:$port, log $log"
}

show_log() { # name
    local log
    log=$(log_of "$1")
    echo "---- last lines of $log" >&2
    tail -n 30 "$log" >&2 || true
    echo "----" >&2
}

wait_ready() { # name pid url seconds
    local name=$1 pid=$2 url=$3 i
    for ((i = 0; i < $4 * 4; i++)); do
        if curl -fsS -o /dev/null --max-time 2 "$url/readyz" 2>/dev/null; then
            echo "   $name is ready"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            local code=0
            wait "$pid" || code=$?
            show_log "$name"
            fail "$name exited (status $code) before it was ready"
        fi
        sleep 0.25
    done
    show_log "$name"
    fail "$name was not ready at $url/readyz within $4 s"
}

# Fails when a started process has exited: a crash would otherwise show only as
# the next step's errors.
check_alive() {
    local i code
    for i in "${!started_pids[@]}"; do
        if ! kill -0 "${started_pids[$i]}" 2>/dev/null; then
            code=0
            wait "${started_pids[$i]}" || code=$?
            show_log "${started_names[$i]}"
            fail "${started_names[$i]} exited (status $code)"
        fi
    done
}

# SIGTERM to every started process, SIGKILL to those still running 15 s later
# (a graceful stop finishes the in-flight batch). For the EXIT trap.
stop_started() {
    ((${#started_pids[@]} > 0)) || return 0
    echo "== stopping ${started_names[*]}"
    local pid i alive name logs=()
    for pid in "${started_pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for ((i = 0; i < 60; i++)); do
        alive=0
        for pid in "${started_pids[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then alive=1; fi
        done
        ((alive)) || break
        sleep 0.25
    done
    for pid in "${started_pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            echo "   $pid did not stop within 15 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    for name in "${started_names[@]}"; do
        logs+=("$(log_of "$name")")
    done
    echo "   logs: ${logs[*]}"
    started_pids=()
    started_names=()
}

# --- CPU time from /proc ------------------------------------------------------

# The CPU time, in clock ticks (getconf CLK_TCK a second), of each root's
# process tree, one line per root in their order: for the root and every live
# descendant, utime + stime (all its threads) + cutime + cstime (the children it
# has reaped, with what they had reaped). A process that exits between two
# readings moves from "live" into its parent's cutime/cstime, so the difference
# of two readings counts it whole: the backends Postgres forks and reaps, the
# helpers an Erlang VM starts. -1 for a root that does not run (any more).
tree_ticks() { # root-pid...
    # comm, the second field, may hold spaces and parentheses: the fields are
    # counted after its last ')'. Processes vanish while cat reads: ignored.
    cat /proc/[0-9]*/stat 2>/dev/null | awk -v roots="$*" '
        {
            pid = $1
            rest = $0
            sub(/^.*\) /, "", rest)
            split(rest, f, " ")
            # f[1] state, f[2] ppid, f[12..15] utime stime cutime cstime
            parent[pid] = f[2]
            ticks[pid] = f[12] + f[13] + f[14] + f[15]
        }
        END {
            n = split(roots, root, " ")
            for (i = 1; i <= n; i++) {
                if (!(root[i] in ticks)) { print -1; continue }
                total = 0
                for (p in ticks) {
                    q = p
                    while (q != root[i] && q in parent && q > 1) q = parent[q]
                    if (q == root[i]) total += ticks[p]
                }
                print total
            }
        }'
}

# Busy and total CPU time of the whole machine so far, in clock ticks, from the
# first line of /proc/stat: "busy total" (busy excludes idle and iowait; guest
# time is already in user and nice).
machine_ticks() {
    awk '/^cpu / {
        total = $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9
        print total - $5 - $6, total
        exit
    }' /proc/stat
}

# Starts a command in the background, in a subshell that writes the user +
# system CPU seconds the command used, all its threads and the children it
# reaped included, to a file once it has ended: `times`, read once the command
# has been reaped, gives getrusage(RUSAGE_CHILDREN), exact even for a process
# that exits between two /proc readings, and the subshell waits on nothing
# else. $! is then the subshell's pid; `wait` on it gives the command's exit
# status, and SIGTERM or SIGINT to it is passed on to the command.
start_timed() { # seconds-file stdout-file stderr-file command...
    local seconds_file=$1 stdout_file=$2 stderr_file=$3
    shift 3
    (
        "$@" >"$stdout_file" 2>"$stderr_file" &
        child=$!
        trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
        status=0
        wait "$child" || status=$?
        if kill -0 "$child" 2>/dev/null; then # the wait was cut short by a signal
            status=0
            wait "$child" || status=$?
        fi
        # The second line of `times`: the reaped children's user and system time,
        # as 0m1.234s 0m0.567s. Redirected, not piped: a pipe would run `times`
        # in a forked child, which has reaped nothing.
        times >"$seconds_file.times"
        awk 'NR == 2 {
            split($1, u, /[ms]/)
            split($2, s, /[ms]/)
            printf "%.3f\n", u[1] * 60 + u[2] + s[1] * 60 + s[2]
        }' "$seconds_file.times" >"$seconds_file"
        rm -f "$seconds_file.times"
        exit "$status"
    ) &
}
