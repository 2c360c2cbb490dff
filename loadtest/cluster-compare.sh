#!/usr/bin/env bash
# A herald cluster next to a single herald and to nats-server's own
# cluster, on the same fan-out scenarios, in one run, loopback only.
#
# For each scenario and round, three configurations, each started fresh:
#   herald-1  one herald node (WORKERS=1), no broker (reported as
#             `single`);
#   herald-3  redis-server and three herald nodes (WORKERS=1 each,
#             BROKER_URL to that Redis);
#   herald-3n nats-server -js (GOMAXPROCS=1) and three herald nodes
#             (BROKER_URL to that NATS);
#   nats-3    three nats-server processes (GOMAXPROCS=1 each) joined by
#             routes, each with a WebSocket listener.
# In the clusters, subscriber j connects to node (j mod 3) and the
# publisher to node 1 (--sub-url, --url), so two thirds of the deliveries
# cross the broker or the routes. Server CPU is the sum over the nodes
# (--server-pid, --also-pid); Redis's CPU is reported apart (--broker-pid,
# `broker_cpu_secs` in the JSON).
# At the end: herald-3 against herald-1, herald-3 against nats-3, and
# herald-3 against herald-3n (herald-loadtest summarize, medians of the
# rounds).
#
# Usage: loadtest/cluster-compare.sh [--rounds N] [--out DIR] [--scenario "ARGS"]...
#   --rounds N        rounds per scenario (default 2)
#   --out DIR         where the JSON results and logs go
#                     (default target/cluster-compare/<date>)
#   --scenario ARGS   a herald-loadtest fanout scenario; repeatable;
#                     replaces the defaults
#
# Needs redis-server and nats-server (installed with apt-get when
# missing). Binaries come from ${CARGO_TARGET_DIR:-target}/release, built
# first.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
NAME=cluster-compare.sh
# shellcheck source=loadtest/lib.sh
. "$ROOT/loadtest/lib.sh"

ROUNDS=2
OUT=""
SCENARIOS=()
parse_args "$0" "$@"
if [ ${#SCENARIOS[@]} -eq 0 ]; then
    SCENARIOS=(
        "fanout --subs 3000 --channels 1 --size 64 --rate 0 --duration 10"
        "fanout --subs 3000 --channels 30 --size 256 --rate 0 --duration 10"
        "fanout --subs 900 --channels 1 --size 64 --rate 200 --duration 10"
    )
fi
OUT="${OUT:-target/cluster-compare/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT/all" "$OUT/vs-single" "$OUT/vs-nats" "$OUT/vs-redis"

need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    echo "== installing $2 (apt-get)"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    timeout 600 $sudo apt-get update -qq
    timeout 600 $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}
need redis-server redis-server
need nats-server nats-server
build_release

PIDS=()
stop_all() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    PIDS=()
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# Starts one herald node logging to $1 with the environment after it;
# appends its pid to PIDS and its address to ADDRS.
ADDRS=()
herald_node() {
    local log="$1"
    shift
    env PORT=0 HOST=127.0.0.1 WORKERS=1 LOGLEVEL=info SEND_QUEUE_LIMIT=16MiB \
        MAX_CONNECTIONS=19500 "$@" "$HERALD" >"$log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_log "$log" "listening on " "$pid" || return 1
    ADDRS+=("$(grep -o 'listening on [0-9.:]*' "$log" | head -1 | awk '{print $3}')")
}

# Starts three herald nodes on the broker at $2 (already started, its pid
# PIDS[0]), logging to $1.n*.log; sets ARGS: publisher on node 1,
# subscribers spread over the three.
herald_three() {
    local base="$1" url="$2" n
    for n in 1 2 3; do
        herald_node "$base.n$n.log" BROKER_URL="$url" NODE_ID="n$n" || return 1
    done
    ARGS=(--url "ws://${ADDRS[0]}/ws"
        --sub-url "ws://${ADDRS[0]}/ws" --sub-url "ws://${ADDRS[1]}/ws" --sub-url "ws://${ADDRS[2]}/ws"
        --server-pid "${PIDS[1]}" --also-pid "${PIDS[2]}" --also-pid "${PIDS[3]}"
        --broker-pid "${PIDS[0]}")
}

# Sets ARGS (the harness's target arguments) for configuration $1.
start_config() {
    local config="$1" base="$2"
    ADDRS=()
    case "$config" in
    herald-1)
        herald_node "$base.log" || return 1
        ARGS=(--url "ws://${ADDRS[0]}/ws" --server-pid "${PIDS[0]}")
        ;;
    herald-3)
        local rport
        rport="$(free_port)"
        redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
            >"$base.redis.log" 2>&1 &
        PIDS+=("$!")
        wait_log "$base.redis.log" "Ready to accept" "${PIDS[0]}" || return 1
        herald_three "$base" "redis://127.0.0.1:$rport" || return 1
        ;;
    herald-3n)
        local nport
        nport="$(free_port)"
        GOMAXPROCS=1 nats-server -js -a 127.0.0.1 -p "$nport" -sd "$base.js" \
            >"$base.nats.log" 2>&1 &
        PIDS+=("$!")
        wait_log "$base.nats.log" "Server is ready" "${PIDS[0]}" || return 1
        herald_three "$base" "nats://127.0.0.1:$nport" || return 1
        ;;
    nats-3)
        local cports=() wports=() n routes conf
        for n in 1 2 3; do cports+=("$(free_port)"); wports+=("$(free_port)"); done
        routes="nats://127.0.0.1:${cports[0]}, nats://127.0.0.1:${cports[1]}, nats://127.0.0.1:${cports[2]}"
        for n in 0 1 2; do
            conf="$base.n$n.conf"
            cat >"$conf" <<EOF
listen: "127.0.0.1:-1"
max_payload: 1MB
max_pending: 256MB
write_deadline: "30s"
websocket { listen: "127.0.0.1:${wports[$n]}", no_tls: true }
cluster { name: bench, listen: "127.0.0.1:${cports[$n]}", routes: [$routes] }
EOF
            GOMAXPROCS=1 nats-server -c "$conf" >"$base.n$n.log" 2>&1 &
            PIDS+=("$!")
        done
        for n in 0 1 2; do
            wait_log "$base.n$n.log" "Server is ready" "${PIDS[$n]}" || return 1
        done
        # Every route up before anyone subscribes.
        for n in 0 1 2; do
            for _ in $(seq 1 100); do
                [ "$(grep -c 'Route connection created' "$base.n$n.log")" -ge 2 ] && break
                sleep 0.1
            done
        done
        ARGS=(--protocol nats --url "ws://127.0.0.1:${wports[0]}"
            --sub-url "ws://127.0.0.1:${wports[0]}" --sub-url "ws://127.0.0.1:${wports[1]}"
            --sub-url "ws://127.0.0.1:${wports[2]}"
            --server-pid "${PIDS[0]}" --also-pid "${PIDS[1]}" --also-pid "${PIDS[2]}")
        ;;
    esac
}

echo "== results in $OUT"
i=0
for sc in "${SCENARIOS[@]}"; do
    i=$((i + 1))
    for r in $(seq 1 "$ROUNDS"); do
        for config in herald-1 herald-3 herald-3n nats-3; do
            base="$OUT/all/s$i.r$r.$config"
            if ! start_config "$config" "$base"; then
                stop_all
                echo "   $config did not start (logs in $base.*)"
                continue
            fi
            printf '%-9s s%d round %d: %s\n' "$config" "$i" "$r" "$sc"
            rc=0
            # shellcheck disable=SC2086 # the scenario is a word list
            variant="$config"
            [ "$config" = herald-1 ] && variant=single
            timeout 900 "$LT" $sc "${ARGS[@]}" --json --label "s$i" --variant "$variant" \
                >"$base.json" 2>"$base.err" || rc=$?
            [ "$rc" = 0 ] || echo "   (herald-loadtest exit $rc: $(tail -1 "$base.err" 2>/dev/null))"
            stop_all
        done
    done
done

for f in "$OUT"/all/*.json; do
    case "$f" in
    *herald-1.json) ln -sf "../all/$(basename "$f")" "$OUT/vs-single/" ;;
    *nats-3.json) ln -sf "../all/$(basename "$f")" "$OUT/vs-nats/" ;;
    *herald-3.json)
        ln -sf "../all/$(basename "$f")" "$OUT/vs-single/"
        ln -sf "../all/$(basename "$f")" "$OUT/vs-nats/"
        ln -sf "../all/$(basename "$f")" "$OUT/vs-redis/"
        ;;
    *herald-3n.json) ln -sf "../all/$(basename "$f")" "$OUT/vs-redis/" ;;
    esac
done
echo
echo "== herald-3 against a single herald node (medians of $ROUNDS rounds)"
"$LT" summarize "$OUT/vs-single"
echo
echo "== herald-3 against nats-3 (medians of $ROUNDS rounds)"
"$LT" summarize "$OUT/vs-nats"
echo
echo "== herald-3 (over Redis) against herald-3n (over NATS) (medians of $ROUNDS rounds)"
"$LT" summarize "$OUT/vs-redis"
