# Shared by the scripts of loadtest/: their common options, checks, the
# release build, and one server process's life (start, readiness from its
# log, stop). Sourced, not run. Callers set NAME (for messages) first.

# Fails unless $1 is a round count in 1..10.
check_rounds() {
    case "$1" in
    '' | *[!0-9]*) echo "$NAME: --rounds must be a number" >&2; exit 2 ;;
    esac
    if [ "$1" -lt 1 ] || [ "$1" -gt 10 ]; then
        echo "$NAME: --rounds must be 1..10" >&2
        exit 2
    fi
}

# Reads the options every script takes into ROUNDS, OUT and SCENARIOS
# (whose defaults the caller sets first): --rounds N, --out DIR,
# --scenario ARGS (repeatable), -h. A script's own options go to its
# function `own_option NAME VALUE`, if it has one, which sets TOOK to the
# words it took (1 for a flag, 2 with a value; 0: not its option).
# Usage: parse_args "$0" "$@"
parse_args() {
    local script="$1"
    shift
    while [ $# -gt 0 ]; do
        case "$1" in
        --rounds | --out | --scenario)
            if [ $# -lt 2 ]; then
                echo "$NAME: $1 needs a value (see --help)" >&2
                exit 2
            fi
            case "$1" in
            --rounds) ROUNDS="$2" ;;
            --out) OUT="$2" ;;
            --scenario) SCENARIOS+=("$2") ;;
            esac
            shift 2
            ;;
        -h | --help)
            usage "$script"
            exit 0
            ;;
        *)
            TOOK=0
            if declare -F own_option >/dev/null; then
                own_option "$1" "${2:-}"
            fi
            if [ "$TOOK" -eq 0 ] || [ "$TOOK" -gt $# ]; then
                echo "$NAME: unknown argument $1, or a missing value (see --help)" >&2
                exit 2
            fi
            shift "$TOOK"
            ;;
        esac
    done
    check_rounds "$ROUNDS"
}

# Prints the usage comment at the top of script $1.
usage() {
    sed -n '2,/^set -euo/p' "$1" | sed '$d' | sed 's/^# \{0,1\}//'
}

# Builds herald and the harness in release; sets HERALD and LT.
build_release() {
    echo "== building herald and herald-loadtest (release)"
    timeout 1800 cargo build --release -p herald-pubsub -p loadtest
    local bin="${CARGO_TARGET_DIR:-$ROOT/target}/release"
    HERALD="$bin/herald"
    LT="$bin/herald-loadtest"
    # Servers and the harness may hold thousands of sockets.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
}

# A free loopback TCP port (nothing answers on it).
free_port() {
    local p
    for _ in $(seq 1 100); do
        p=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

SERVER_PID=""
ADDR=""

# Stops the server started last (TERM, then KILL after 10 s).
stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}

# Waits until LOG ($1) contains PATTERN ($2), or process PID ($3, default
# the server) died, or 20 s passed.
wait_log() {
    local log="$1" pattern="$2" pid="${3:-$SERVER_PID}"
    for _ in $(seq 1 200); do
        if grep -q "$pattern" "$log" 2>/dev/null; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "$NAME: process did not become ready; its log:" >&2
    tail -20 "$log" >&2
    return 1
}

# Starts herald logging to $1 with the environment VAR=VALUE ... after it
# (on top of PORT=0 HOST=127.0.0.1 WORKERS=2 LOGLEVEL=info); sets
# SERVER_PID and ADDR (host:port from its "listening on" line).
start_herald() {
    local log="$1"
    shift
    env PORT=0 HOST=127.0.0.1 WORKERS=2 LOGLEVEL=info "$@" "$HERALD" >"$log" 2>&1 &
    SERVER_PID=$!
    wait_log "$log" "listening on " || return 1
    ADDR="$(grep -o 'listening on [0-9.:]*' "$log" | head -1 | awk '{print $3}')"
}

# Runs one measurement against the server started last: herald-loadtest
# ARGS... with --server-pid and --json, bounded by LIMIT seconds ($2),
# results in BASE.json / BASE.err ($1); says so if the server died or the
# harness exited non-zero (its last error line).
measure() {
    local base="$1" limit="$2" rc=0
    shift 2
    timeout "$limit" "$LT" "$@" --server-pid "$SERVER_PID" --json \
        >"$base.json" 2>"$base.err" || rc=$?
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "   !! the server died during the run; log tail:"
        tail -5 "$base.log" | sed 's/^/      /'
    fi
    if [ "$rc" != 0 ]; then
        echo "   (herald-loadtest exit $rc: $(tail -1 "$base.err" 2>/dev/null))"
    fi
}
