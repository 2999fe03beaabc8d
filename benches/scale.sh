#!/usr/bin/env bash
# How portcullis' cost grows with load, in one run (issue 12):
#   1. steady p99 of active clients with 0, 5,000 and 15,000 idle authenticated connections
#      open (the load tool's `scale` scenario; server pinned to one core, load to the other);
#   2. handshakes/s with `workers = 1` and `workers = 2`, server and load tool unpinned.
#
#   benches/scale.sh > benches/scale-results.md
#
# Knobs (environment): SECONDS_PER_SCENARIO (5), WORKERS (16: the load tool's handshake
# loops), CONNECTIONS (32: active steady connections), SCALE_IDLE (0,5000,15000),
# BASE_PORT (24530), SERVER_CORE (0), CLIENT_CORE (1), KEEP_TMP (0).
set -euo pipefail

SECONDS_PER_SCENARIO=${SECONDS_PER_SCENARIO:-5}
WORKERS=${WORKERS:-16}
CONNECTIONS=${CONNECTIONS:-32}
SCALE_IDLE=${SCALE_IDLE:-0,5000,15000}
BASE_PORT=${BASE_PORT:-24530}
SERVER_CORE=${SERVER_CORE:-0}
CLIENT_CORE=${CLIENT_CORE:-1}
KEEP_TMP=${KEEP_TMP:-0}

TAG=scale

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=benches/lib.sh
source benches/lib.sh

command -v taskset >/dev/null 2>&1 || die "missing taskset (apt-get install -y util-linux)"
cores=$(nproc)
((cores > SERVER_CORE && cores > CLIENT_CORE)) || die "needs cores $SERVER_CORE and $CLIENT_CORE; this machine has $cores"

# Both processes hold every idle connection (plus the active ones, listeners and files).
most=$(tr ',' '\n' <<<"$SCALE_IDLE" | sort -n | tail -n 1)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile=$(ulimit -n)
if [[ $nofile != unlimited ]] && ((nofile < most + CONNECTIONS + 200)); then
    die "ulimit -n is $nofile; SCALE_IDLE up to $most needs at least $((most + CONNECTIONS + 200))"
fi

build_release
"$PORTCULLIS" certs generate --out "$DIR/certs" >/dev/null
CERTS=$DIR/certs
RESULTS=$DIR/results.txt
NOTES=$DIR/notes.txt
: >"$RESULTS"
: >"$NOTES"

# Starts portcullis with benches/bench.toml and `workers = $1`, on the cores `taskset -c $2`
# allows; sets SERVER_PID and SERVER_PORT.
start_portcullis() {
    local workers=$1 cpus=$2
    sed "s/^workers = .*/workers = $workers/" benches/bench.toml >"$DIR/portcullis-$workers.toml"
    free_port
    SERVER_PORT=$PORT
    start "$DIR/portcullis-$workers.log" taskset -c "$cpus" env "PORTCULLIS_SERVER_LISTEN=127.0.0.1:$PORT" \
        "$PORTCULLIS" --config "$DIR/portcullis-$workers.toml" --log-level warn
    SERVER_PID=$STARTED
    wait_port "$SERVER_PORT" "$SERVER_PID" portcullis "$DIR/portcullis-$workers.log"
    sleep 1 # let the readiness probe fall out of the per-source rate window
}

# load CPUS SCENARIO ARGS...: one run of the load tool against the running server.
load() {
    local cpus=$1 scenario=$2
    shift 2
    local out=$DIR/$scenario-$RANDOM.out
    if ! taskset -c "$cpus" "$LOAD" --target "127.0.0.1:$SERVER_PORT" --ca "$CERTS/ca.pem" --pid "$SERVER_PID" \
        --scenarios "$scenario" --workers "$WORKERS" --connections "$CONNECTIONS" \
        --seconds "$SECONDS_PER_SCENARIO" "$@" >"$out" 2>"$out.err"; then
        echo "$scenario: load tool failed: $(tail -n 3 "$out.err" | tr '\n' ' ')" >>"$NOTES"
    fi
    grep '^scenario=' "$out" | tee -a "$RESULTS" >&2 || true
}

field() { # field LINE KEY
    tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k { print $2; exit }'
}

# --- 1. steady p99 against idle connections ------------------------------------------------
log "steady with idle connections $SCALE_IDLE open (server on core $SERVER_CORE, load on core $CLIENT_CORE)"
start_portcullis 1 "$SERVER_CORE"
load "$CLIENT_CORE" scale --scale-idle "$SCALE_IDLE"
stop "$SERVER_PID"

# --- 2. handshakes/s with 1 and 2 workers, unpinned ------------------------------------------
all_cpus="0-$((cores - 1))"
for workers in 1 2; do
    log "handshakes with workers = $workers (unpinned)"
    start_portcullis "$workers" "$all_cpus"
    load "$all_cpus" handshake
    sed -i "s/^scenario=handshake server=/scenario=handshake_w$workers server=/" "$RESULTS"
    stop "$SERVER_PID"
done

# --- report ----------------------------------------------------------------------------------
echo "# How cost grows: idle connections and workers"
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), $cores cores; portcullis $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "SECONDS_PER_SCENARIO=$SECONDS_PER_SCENARIO WORKERS=$WORKERS CONNECTIONS=$CONNECTIONS SCALE_IDLE=$SCALE_IDLE"
echo
echo "Steady: $CONNECTIONS active connections, ECHO of 64 bytes in a closed loop, while the"
echo "given number of idle connections (each did a full handshake and one PING) stay open;"
echo "server (\`workers = 1\`) pinned to core $SERVER_CORE, load tool to core $CLIENT_CORE."
echo
echo "| idle connections open | requests/s | p50 (µs) | p99 (µs) | p99.9 (µs) | requests per server CPU-second | p99 / p99 with none |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
base=""
while read -r line; do
    idle=$(field "$line" idle)
    p99=$(field "$line" p99_us)
    [[ -n $base ]] || base=$p99
    echo "| $idle | $(field "$line" rate) | $(field "$line" p50_us) | $p99 | $(field "$line" p999_us) | $(field "$line" per_server_cpu_s) | $(ratio "$p99" "$base") |"
done < <(grep '^scenario=scale ' "$RESULTS")
echo
echo "Handshakes: $WORKERS load loops of connect, full handshake, one ECHO, close; server and"
echo "load tool unpinned (both compete for the $cores cores)."
echo
echo "| workers | handshakes/s | server CPU-s | handshakes per server CPU-second | load tool CPU share | rate / rate with 1 worker |"
echo "|---:|---:|---:|---:|---:|---:|"
base=""
for workers in 1 2; do
    line=$(grep "^scenario=handshake_w$workers " "$RESULTS" || true)
    [[ -n $line ]] || { echo "| $workers | - | - | - | - | - |"; continue; }
    rate=$(field "$line" rate)
    [[ -n $base ]] || base=$rate
    echo "| $workers | $rate | $(field "$line" server_cpu_s) | $(field "$line" per_server_cpu_s) | $(field "$line" client_cpu_share) | $(ratio "$rate" "$base") |"
done
echo
print_notes_and_results
