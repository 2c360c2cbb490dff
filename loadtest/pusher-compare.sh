#!/usr/bin/env bash
# herald's fan-out through the Pusher protocol next to its native protocol,
# on the same scenarios, in one run, loopback only.
#
# One herald configuration serves both: APPS holds one app (key bench-key,
# secret bench-secret, client events enabled, a client-event limit far
# above any rate here). `native` runs the harness with --protocol herald
# against ws://ADDR/ws; `pusher` with --protocol pusher against
# ws://ADDR/app/bench-key: subscribers on private-chN (signed `auth`), the
# publisher subscribed too, publishing client events `client-m`, with a
# `pusher:ping` after every 32 as the acknowledgement (--ping-every).
# For each scenario and round (A B A B: native, pusher) a fresh herald is
# started; at the end the medians and pusher-vs-native ratios are printed
# (herald-loadtest summarize; the ratio column is native/pusher).
#
# Usage: loadtest/pusher-compare.sh [--rounds N] [--out DIR] [--scenario "ARGS"]...
#   --rounds N        rounds per scenario (default 2)
#   --out DIR         where the JSON results and logs go
#                     (default target/pusher-compare/<date>)
#   --scenario ARGS   a herald-loadtest scenario; repeatable; replaces the defaults
#
# herald: WORKERS=2 SEND_QUEUE_LIMIT=16MiB MAX_CONNECTIONS=19500 (as
# compare.sh), PORT=0, APPS as above. Binaries come from
# ${CARGO_TARGET_DIR:-target}/release, built first.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
NAME=pusher-compare.sh
# shellcheck source=loadtest/lib.sh
. "$ROOT/loadtest/lib.sh"

ROUNDS=2
OUT=""
SCENARIOS=()
parse_args "$0" "$@"
if [ ${#SCENARIOS[@]} -eq 0 ]; then
    SCENARIOS=(
        "fanout --subs 1000 --channels 1 --size 64 --rate 0 --duration 5"
        "fanout --subs 1000 --channels 1 --size 64 --rate 100 --duration 5"
        "fanout --subs 1000 --channels 10 --size 256 --rate 0 --duration 5"
    )
fi

APP_KEY=bench-key
APP_SECRET=bench-secret
APPS='[{"id":"bench","key":"'"$APP_KEY"'","secret":"'"$APP_SECRET"'","enable_client_messages":true,"max_client_events_per_second":1000000}]'

OUT="${OUT:-target/pusher-compare/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"

build_release
trap stop_server EXIT
trap 'exit 130' INT TERM

echo "== results in $OUT"
i=0
for sc in "${SCENARIOS[@]}"; do
    i=$((i + 1))
    for r in $(seq 1 "$ROUNDS"); do
        for variant in native pusher; do
            base="$OUT/s$i.r$r.$variant"
            if [ "$variant" = native ]; then
                proto=(--protocol herald)
                path=/ws
            else
                proto=(--protocol pusher --app-key "$APP_KEY" --app-secret "$APP_SECRET")
                path="/app/$APP_KEY"
            fi
            if ! start_herald "$base.log" SEND_QUEUE_LIMIT=16MiB MAX_CONNECTIONS=19500 APPS="$APPS"; then
                stop_server
                echo "{\"label\":\"s$i\",\"scenario\":\"${sc%% *}\",\"protocol\":\"${proto[1]}\",\"variant\":\"$variant\",\"command\":\"$sc\",\"error\":\"server did not start\",\"ok\":false}" >"$base.json"
                continue
            fi
            printf '%-7s s%d round %d: %s\n' "$variant" "$i" "$r" "$sc"
            # shellcheck disable=SC2086 # the scenario is a word list
            measure "$base" 900 $sc "${proto[@]}" --url "ws://$ADDR$path" \
                --label "s$i" --variant "$variant"
            stop_server
        done
    done
done

echo
echo "== herald native vs Pusher protocol (medians of $ROUNDS rounds; results in $OUT)"
"$LT" summarize "$OUT"
