#!/usr/bin/env bash
# What TLS costs: the same herald reached over ws:// (PORT) and wss://
# (TLS_PORT, rustls in user space), side by side on the same scenarios,
# loopback only.
#
# A throwaway CA and a certificate for localhost are made with openssl in
# the output directory. For each scenario and round (A B A B: plain, tls)
# a fresh herald is started with TLS_CERT, TLS_KEY and TLS_PORT=0, and the
# harness connects to one port or the other; at the end the medians and
# ratios are printed (herald-loadtest summarize). `conns` scenarios report
# handshakes/s (for wss://, TCP + TLS + WebSocket upgrade + subscribe).
#
# Usage: loadtest/tls-bench.sh [--rounds N] [--out DIR] [--scenario "ARGS"]...
#   --rounds N        rounds per scenario (default 2)
#   --out DIR         where the JSON results, logs and certificates go
#                     (default target/tls-bench/<date>)
#   --scenario ARGS   a herald-loadtest scenario; repeatable; replaces the defaults
#
# herald: WORKERS=2, SEND_QUEUE_LIMIT=16MiB, MAX_CONNECTIONS=19500 (as
# compare.sh), open mode, PORT=0, TLS_PORT=0.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
NAME=tls-bench.sh
# shellcheck source=loadtest/lib.sh
. "$ROOT/loadtest/lib.sh"

ROUNDS=2
OUT=""
SCENARIOS=()
parse_args "$0" "$@"
if [ ${#SCENARIOS[@]} -eq 0 ]; then
    SCENARIOS=(
        "fanout --subs 1000 --channels 1 --size 256 --rate 200 --duration 5"
        "fanout --subs 1000 --channels 1 --size 64 --rate 0 --duration 5"
        "conns --conns 3000 --hold 1"
    )
fi

OUT="${OUT:-target/tls-bench/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
command -v openssl >/dev/null || { echo "tls-bench.sh: needs openssl" >&2; exit 2; }

build_release

# A CA, and a certificate it signs for localhost and 127.0.0.1.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$OUT/ca.key" -out "$OUT/ca.pem" -days 2 -subj "/CN=tls-bench CA" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$OUT/key.pem" -out "$OUT/leaf.csr" -subj "/CN=localhost" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$OUT/leaf.ext"
openssl x509 -req -in "$OUT/leaf.csr" -CA "$OUT/ca.pem" -CAkey "$OUT/ca.key" \
    -CAcreateserial -days 2 -extfile "$OUT/leaf.ext" -out "$OUT/cert.pem" 2>/dev/null

trap stop_server EXIT
trap 'exit 130' INT TERM
echo "== results in $OUT"

i=0
for sc in "${SCENARIOS[@]}"; do
    i=$((i + 1))
    for r in $(seq 1 "$ROUNDS"); do
        for variant in plain tls; do
            base="$OUT/s$i.r$r.$variant"
            start_herald "$base.log" SEND_QUEUE_LIMIT=16MiB MAX_CONNECTIONS=19500 \
                TLS_CERT="$OUT/cert.pem" TLS_KEY="$OUT/key.pem" TLS_PORT=0 || { stop_server; continue; }
            wait_log "$base.log" "https://) on " || { stop_server; continue; }
            tls_port="$(grep -o 'https://) on [0-9.:]*' "$base.log" | head -1 | awk -F: '{print $NF}')"
            case "$variant" in
            plain) url="ws://$ADDR/ws" ;;
            tls) url="wss://localhost:$tls_port/ws" ;;
            esac
            printf '%-6s s%d round %d: %s\n' "$variant" "$i" "$r" "$sc"
            # shellcheck disable=SC2086 # the scenario is a word list
            measure "$base" 600 $sc --url "$url" --tls-ca "$OUT/ca.pem" --label "s$i" --variant "$variant"
            stop_server
        done
    done
done

echo
echo "== plain vs tls (medians of $ROUNDS rounds; results in $OUT)"
"$LT" summarize "$OUT"
