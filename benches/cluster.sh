#!/usr/bin/env bash
# Cluster mode against standalone (issue "cluster"): the load tool starts the built gateway
# (one worker, benches/bench.toml) standalone and then with `--redis` on a local redis-server
# (persistence off), alternating for ROUNDS rounds, and runs the handshake and reject
# scenarios on each. After each scenario it reads the gateway's accept-loop histogram
# (`portcullis_accept_duration_seconds`: admission decision and hand-off to the connection's
# task), which shows whether an accept ever waits on Redis.
#
#   apt-get install -y redis-server   # once
#   benches/cluster.sh > benches/cluster-results.md
#
# Unpinned (the gateway and the load tool share the machine's cores): compare the modes by
# the ratios of one run, not across runs. Knobs (environment): SECONDS_PER_SCENARIO (4),
# ROUNDS (2), BASE_PORT (24600), KEEP_TMP (0).
set -euo pipefail

SECONDS_PER_SCENARIO=${SECONDS_PER_SCENARIO:-4}
ROUNDS=${ROUNDS:-2}
BASE_PORT=${BASE_PORT:-24600}
KEEP_TMP=${KEEP_TMP:-0}
TAG=cluster

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=benches/lib.sh
source benches/lib.sh

command -v redis-server >/dev/null 2>&1 || die "missing: redis-server (apt-get install -y redis-server)"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
build_release

free_port
start "$DIR/redis.log" redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no
wait_port "$PORT" "$STARTED" redis-server "$DIR/redis.log"
REDIS=redis://127.0.0.1:$PORT/0
log "redis-server on 127.0.0.1:$PORT"

RESULTS=$DIR/results.txt
NOTES=$DIR/notes.txt
: >"$RESULTS"
: >"$NOTES"
for ((round = 1; round <= ROUNDS; round++)); do
    for mode in standalone cluster; do
        extra=()
        [[ $mode == cluster ]] && extra=(--redis "$REDIS")
        log "round $round: $mode"
        out=$DIR/$mode-$round.out
        if ! "$LOAD" --label "$mode" --scenarios handshake,reject --seconds "$SECONDS_PER_SCENARIO" \
            "${extra[@]}" >"$out" 2>"$out.err"; then
            echo "$mode round $round: load tool exited with status $?: $(tail -n 3 "$out.err" | tr '\n' ' ')" >>"$NOTES"
        fi
        grep '^scenario=' "$out" | tee -a "$RESULTS" >&2 || true
    done
done

# mean SCENARIO SERVER KEY: the mean of KEY over that server's lines for that scenario.
mean() {
    awk -v s="scenario=$1" -v srv="server=$2" -v k="$3=" '
        $1 == s && $2 == srv { for (i = 3; i <= NF; i++) if (index($i, k) == 1) { sum += substr($i, length(k) + 1); n++ } }
        END { if (n) printf "%.6g\n", sum / n }
    ' "$RESULTS"
}
# worst SCENARIO SERVER KEY: the largest value of KEY over those lines.
worst() {
    awk -v s="scenario=$1" -v srv="server=$2" -v k="$3=" '
        $1 == s && $2 == srv { for (i = 3; i <= NF; i++) if (index($i, k) == 1) { v = substr($i, length(k) + 1) + 0; if (!seen++ || v > m) m = v } }
        END { if (seen) print m }
    ' "$RESULTS"
}

ROWS=(
    "handshake rate (handshakes/s)|handshake|rate|mean"
    "handshakes per server CPU-second|handshake|per_server_cpu_s|mean"
    "reject: refusals/s (decided in the accept loop)|reject|refusals_per_s|mean"
    "reject: legitimate client's p99 (µs)|reject|legit_p99_us|mean"
    "accept loop, mean per connection (µs), handshake|accept_handshake|mean_us|mean"
    "accept loop, p99 bucket bound (µs), handshake|accept_handshake|p99_le_us|worst"
    "accept loop, mean per connection (µs), reject|accept_reject|mean_us|mean"
    "accept loop, p99 bucket bound (µs), reject|accept_reject|p99_le_us|worst"
    "accept loop, slowest bucket bound (µs), both|accept_handshake accept_reject|max_le_us|worst"
)

echo "# portcullis cluster mode (local Redis) vs standalone"
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), $(nproc) cores, load average $(cut -d' ' -f1 /proc/loadavg);" \
    "$(redis-server --version | cut -d' ' -f1-3); portcullis $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "Unpinned; $ROUNDS alternating rounds of $SECONDS_PER_SCENARIO s per scenario; means over rounds (p99 and slowest: the worst round)."
echo
echo "| metric | standalone | cluster | cluster/standalone |"
echo "|---|---:|---:|---:|"
for row in "${ROWS[@]}"; do
    IFS='|' read -r label scenarios key how <<<"$row"
    vals=()
    for mode in standalone cluster; do
        v=""
        for scenario in $scenarios; do
            w=$("$how" "$scenario" "$mode" "$key")
            [[ -z $v || ( -n $w && $(awk -v a="$w" -v b="$v" 'BEGIN { print (a > b) }') == 1 ) ]] && v=$w
        done
        vals+=("$v")
    done
    echo "| $label | ${vals[0]:--} | ${vals[1]:--} | $(ratio "${vals[1]}" "${vals[0]}") |"
done
echo
echo "The accept loop's time is read from \`portcullis_accept_duration_seconds\` (buckets from"
echo "1 µs to 10 ms) before and after each scenario. Between its two timestamps the accept loop"
echo "never awaits; a wait on Redis would be a round trip (≥ 100 µs on loopback) on every"
echo "connection and would move the mean and the p99 bucket. The slowest bucket is the OS"
echo "taking the thread away (the machine is shared; see the load average above)."
echo
print_notes_and_results
