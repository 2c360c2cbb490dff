#!/usr/bin/env bash
# Two herald builds side by side on the same scenarios (the same harness,
# loopback only): did a change move herald's own figures?
#
# For each scenario and round (A B A B: base, new) a fresh server is
# started as compare.sh starts herald; at the end the medians and the
# base/new ratios are printed (herald-loadtest summarize).
#
# Usage: loadtest/ab.sh --base BIN [--new BIN] [--rounds N] [--out DIR] [--scenario "ARGS"]...
#   --base BIN        the herald binary to compare against (e.g. a release
#                     build of an earlier commit in a worktree)
#   --new BIN         default: this checkout's target/release/herald
#   --rounds N        rounds per scenario (default 3)
#   --out DIR         where the JSON results and logs go (default target/ab/<date>)
#   --scenario ARGS   a herald-loadtest scenario; repeatable; replaces the defaults
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
NAME=ab.sh
# shellcheck source=loadtest/lib.sh
. "$ROOT/loadtest/lib.sh"

ROUNDS=3
OUT=""
BASE=""
NEW=""
SCENARIOS=()
own_option() {
    case "$1" in
    --base) BASE="$2"; TOOK=2 ;;
    --new) NEW="$2"; TOOK=2 ;;
    esac
}
parse_args "$0" "$@"
[ -x "$BASE" ] || { echo "ab.sh: --base must name a herald binary" >&2; exit 2; }
if [ ${#SCENARIOS[@]} -eq 0 ]; then
    SCENARIOS=(
        "fanout --subs 1000 --channels 1 --size 64 --rate 0 --duration 5"
        "fanout --subs 1000 --channels 1 --size 64 --rate 100 --duration 5"
        "fanout --subs 1000 --channels 10 --size 256 --rate 0 --duration 5"
    )
fi
OUT="${OUT:-target/ab/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"

build_release
NEW="${NEW:-$HERALD}"
trap stop_server EXIT
trap 'exit 130' INT TERM
echo "== base $BASE, new $NEW; results in $OUT"

i=0
for sc in "${SCENARIOS[@]}"; do
    i=$((i + 1))
    for r in $(seq 1 "$ROUNDS"); do
        for variant in base new; do
            case "$variant" in
            base) HERALD="$BASE" ;;
            new) HERALD="$NEW" ;;
            esac
            b="$OUT/s$i.r$r.$variant"
            start_herald "$b.log" SEND_QUEUE_LIMIT=16MiB MAX_CONNECTIONS=19500 || { stop_server; continue; }
            printf '%-5s s%d round %d: %s\n' "$variant" "$i" "$r" "$sc"
            # shellcheck disable=SC2086 # the scenario is a word list
            measure "$b" 300 $sc --url "ws://$ADDR/ws" --label "s$i" --variant "$variant"
            stop_server
        done
    done
done

echo
echo "== base vs new (medians of $ROUNDS rounds; results in $OUT)"
"$LT" summarize "$OUT"
