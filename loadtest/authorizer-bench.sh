#!/usr/bin/env bash
# What authorizing every publish costs: herald without an authorizer vs
# herald with AUTHORIZER_URL and AUTHORIZE=publish, side by side on the same
# scenarios, loopback only.
#
# The authorizer is `herald-loadtest webhook`, an always-200 HTTP/1.1
# keep-alive server, so the figures are herald's cost of asking (one HTTP
# round trip per publish through its per-reactor pool), not a backend's cost
# of deciding. For each scenario and round (A B A B: plain, authorized) a
# fresh herald is started; at the end the medians and ratios are printed
# (herald-loadtest summarize). The webhook's own CPU per request is printed
# last.
#
# Usage: loadtest/authorizer-bench.sh [--rounds N] [--out DIR] [--cache-ttl SECS] [--scenario "ARGS"]...
#   --rounds N        rounds per scenario (default 2)
#   --out DIR         where the JSON results and logs go
#                     (default target/authorizer-bench/<date>)
#   --cache-ttl SECS  give the authorized herald AUTHORIZER_CACHE_TTL=SECS
#                     (default 0: every publish is asked)
#   --scenario ARGS   a herald-loadtest scenario; repeatable; replaces the defaults
#
# herald: WORKERS=2, SEND_QUEUE_LIMIT=16MiB (as compare.sh), open mode
# (plain) or AUTHORIZER_URL=<webhook> AUTHORIZE=publish (authorized), PORT=0.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
NAME=authorizer-bench.sh
# shellcheck source=loadtest/lib.sh
. "$ROOT/loadtest/lib.sh"

ROUNDS=2
OUT=""
TTL=0
SCENARIOS=()
own_option() {
    case "$1" in
    --cache-ttl) TTL="$2"; TOOK=2 ;;
    esac
}
parse_args "$0" "$@"
if [ ${#SCENARIOS[@]} -eq 0 ]; then
    SCENARIOS=(
        "fanout --subs 1 --channels 1 --size 64 --rate 10000 --duration 5 --publishers 16"
        "fanout --subs 100 --channels 1 --size 64 --rate 1000 --duration 5 --publishers 4"
    )
fi

OUT="${OUT:-target/authorizer-bench/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"

build_release

HOOK_PID=""
stop_all() {
    stop_server
    if [ -n "$HOOK_PID" ]; then
        kill -TERM "$HOOK_PID" 2>/dev/null || true
        wait "$HOOK_PID" 2>/dev/null || true
        HOOK_PID=""
    fi
}
trap stop_all EXIT
trap 'exit 130' INT TERM

"$LT" webhook --duration 3600 --threads 1 >"$OUT/webhook.out" 2>"$OUT/webhook.log" &
HOOK_PID=$!
wait_log "$OUT/webhook.log" "webhook listening on" "$HOOK_PID"
HOOK="http://$(grep -o 'listening on [0-9.:]*' "$OUT/webhook.log" | awk '{print $3}')/authorize"
echo "== webhook at $HOOK; results in $OUT"

start_variant() {
    local log="$1" variant="$2"
    local extra=()
    if [ "$variant" = authorized ]; then
        extra=(AUTHORIZER_URL="$HOOK" AUTHORIZE=publish AUTHORIZER_CACHE_TTL="$TTL")
    fi
    start_herald "$log" SEND_QUEUE_LIMIT=16MiB "${extra[@]}" || return 1
    URL="ws://$ADDR/ws"
}

i=0
for sc in "${SCENARIOS[@]}"; do
    i=$((i + 1))
    for r in $(seq 1 "$ROUNDS"); do
        for variant in plain authorized; do
            base="$OUT/s$i.r$r.$variant"
            start_variant "$base.log" "$variant" || { stop_server; continue; }
            printf '%-10s s%d round %d: %s\n' "$variant" "$i" "$r" "$sc"
            # shellcheck disable=SC2086 # the scenario is a word list
            measure "$base" 600 $sc --url "$URL" --label "s$i" --variant "$variant"
            stop_server
        done
    done
done

kill -TERM "$HOOK_PID" 2>/dev/null || true
wait "$HOOK_PID" 2>/dev/null || true
HOOK_PID=""
echo
echo "== plain vs authorized (AUTHORIZE=publish, AUTHORIZER_CACHE_TTL=$TTL; medians of $ROUNDS rounds; results in $OUT)"
"$LT" summarize "$OUT"
echo
echo "== webhook: $(cat "$OUT/webhook.out")"
