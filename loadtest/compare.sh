#!/usr/bin/env bash
# Compares herald with nats-server (NATS over WebSocket) on the same load
# scenarios, on this machine, loopback only.
#
# For each scenario and each round (A B A B: herald, nats, herald, nats), a
# fresh server is started, herald-loadtest runs against it with --json and
# --server-pid, and the server is stopped. At the end, per scenario, the
# medians of both servers and the herald/nats ratios are printed
# (herald-loadtest summarize). Results stay in the output directory.
#
# Usage: loadtest/compare.sh [--quick] [--rounds N] [--out DIR] [--scenario "ARGS"]...
#   --quick          smaller scenarios (1000 subscribers, 3 s, 2000 connections)
#   --rounds N       rounds per scenario (default 2)
#   --out DIR        where the JSON results and server logs go
#                    (default target/loadtest-compare/<date>)
#   --scenario ARGS  a herald-loadtest scenario, e.g. "fanout --subs 100 --duration 2";
#                    repeatable; replaces the default list
#
# A fan-out scenario with a fixed --rate also gets, each round, a `floor`
# run with the same --subs/--size/--rate/--duration: no server, just one
# send(2) per subscriber and the cheapest reader (see loadtest/README.md),
# shown as a third column: what the kernel alone costs on this machine.
#
# Servers:
#   herald:      WORKERS=2 SEND_QUEUE_LIMIT=16MiB MAX_CONNECTIONS=19500, PORT=0
#   nats-server: GOMAXPROCS=2, websocket on a free port, no TLS;
#                max_pending 256MB (bytes queued for one client before it is
#                cut as a slow consumer; default 64MB), write_deadline 30s
#                (default 10s), max_payload 1MB (default).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
NAME=compare.sh
# shellcheck source=loadtest/lib.sh
. "$ROOT/loadtest/lib.sh"

QUICK=0
ROUNDS=2
OUT=""
SCENARIOS=()
own_option() {
    case "$1" in
    --quick) QUICK=1; TOOK=1 ;;
    esac
}
parse_args "$0" "$@"

if [ ${#SCENARIOS[@]} -eq 0 ]; then
    if [ "$QUICK" = 1 ]; then
        SCENARIOS=(
            "fanout --subs 1000 --channels 1 --size 64 --rate 0 --duration 3"
            "fanout --subs 1000 --channels 10 --size 256 --rate 0 --duration 3"
            "fanout --subs 1000 --channels 1 --size 64 --rate 100 --duration 3"
            "conns --conns 2000"
        )
    else
        SCENARIOS=(
            "fanout --subs 10000 --channels 1 --size 64 --rate 0 --duration 10"
            "fanout --subs 10000 --channels 100 --size 256 --rate 0 --duration 10"
            "fanout --subs 1000 --channels 1 --size 64 --rate 100 --duration 10"
            "conns --conns 19000"
        )
    fi
fi

OUT="${OUT:-target/loadtest-compare/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"

if ! command -v nats-server >/dev/null 2>&1; then
    echo "== installing nats-server (apt-get)"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    timeout 600 $SUDO apt-get update -qq
    timeout 600 $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
fi
NATS="$(command -v nats-server)"

build_release
trap stop_server EXIT
trap 'exit 130' INT TERM

start_herald_for_compare() {
    start_herald "$1" SEND_QUEUE_LIMIT=16MiB MAX_CONNECTIONS=19500 || return 1
    URL="ws://$ADDR/ws"
}

start_nats() {
    local log="$1" port conf
    port="$(free_port)"
    conf="$OUT/nats-$port.conf"
    cat >"$conf" <<EOF
listen: "127.0.0.1:-1"
max_payload: 1MB
max_pending: 256MB
write_deadline: "30s"
websocket {
  listen: "127.0.0.1:$port"
  no_tls: true
}
EOF
    GOMAXPROCS=2 "$NATS" -c "$conf" >"$log" 2>&1 &
    SERVER_PID=$!
    wait_log "$log" "Server is ready" || return 1
    URL="ws://127.0.0.1:$port"
}

# The `floor` command matching a fixed-rate fan-out scenario, if it is one.
floor_of() {
    local sc="$1" subs=1000 size=64 rate=0 duration=10
    set -- $sc
    [ "$1" = fanout ] || return 1
    shift
    while [ $# -gt 1 ]; do
        case "$1" in
        --subs) subs="$2" ;;
        --size) size="$2" ;;
        --rate) rate="$2" ;;
        --duration) duration="$2" ;;
        --channels) [ "$2" = 1 ] || return 1 ;;
        esac
        shift
    done
    case "$rate" in 0 | 0.0 | 0.00) return 1 ;; esac
    [ "$size" -le 125 ] || return 1
    echo "floor --subs $subs --size $size --rate $rate --duration $duration"
}

echo "== results in $OUT"
i=0
for sc in "${SCENARIOS[@]}"; do
    i=$((i + 1))
    for r in $(seq 1 "$ROUNDS"); do
        for server in herald nats; do
            base="$OUT/s$i.r$r.$server"
            starter="start_$server"
            [ "$server" = herald ] && starter=start_herald_for_compare
            if ! "$starter" "$base.log"; then
                stop_server
                echo "{\"label\":\"s$i\",\"scenario\":\"${sc%% *}\",\"protocol\":\"$server\",\"command\":\"$sc\",\"error\":\"server did not start\",\"ok\":false}" >"$base.json"
                continue
            fi
            printf '%-8s s%d round %d: %s\n' "$server" "$i" "$r" "$sc"
            # shellcheck disable=SC2086 # the scenario is a word list
            measure "$base" 900 $sc --protocol "$server" --url "$URL" --label "s$i"
            stop_server
        done
        if floor_args="$(floor_of "$sc")"; then
            printf '%-8s s%d round %d: %s\n' floor "$i" "$r" "$floor_args"
            # shellcheck disable=SC2086
            timeout 300 "$LT" $floor_args --json --label "s$i" \
                >"$OUT/s$i.r$r.floor.json" 2>"$OUT/s$i.r$r.floor.err" ||
                echo "   (floor exit $?: $(tail -1 "$OUT/s$i.r$r.floor.err" 2>/dev/null))"
        fi
    done
done

echo
echo "== herald vs nats-server (medians of $ROUNDS rounds; results in $OUT)"
"$LT" summarize "$OUT"
