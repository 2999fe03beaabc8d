#!/usr/bin/env bash
# Cluster mode against standalone (issue "cluster"): the built gateway (one worker,
# benches/bench.toml) started standalone and then with `[cluster] redis` on a local
# redis-server (persistence off), alternating for ROUNDS rounds, each running the handshake
# and reject scenarios of the load tool. After each scenario the load tool reads the
# gateway's accept-loop histogram (`portcullis_accept_duration_seconds`: admission decision
# and hand-off to the connection's task), which shows whether an accept ever waits on Redis.
#
#   apt-get install -y redis-server   # once
#   benches/cluster.sh > benches/cluster-results.md
#
# The gateway is pinned to SERVER_CORE, the load tool and Redis to CLIENT_CORE, so that
# Redis's own CPU (a real deployment runs it elsewhere) does not come out of the gateway's
# core. Knobs (environment): SECONDS_PER_SCENARIO (4), ROUNDS (3), WORKERS (16: the load
# tool's handshake loops; with 4 the round trips, not the gateway, set the rate), BASE_PORT
# (24600), SERVER_CORE (0), CLIENT_CORE (1), KEEP_TMP (0).
set -euo pipefail

SECONDS_PER_SCENARIO=${SECONDS_PER_SCENARIO:-4}
ROUNDS=${ROUNDS:-3}
WORKERS=${WORKERS:-16}
BASE_PORT=${BASE_PORT:-24600}
SERVER_CORE=${SERVER_CORE:-0}
CLIENT_CORE=${CLIENT_CORE:-1}
KEEP_TMP=${KEEP_TMP:-0}
TAG=cluster

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=benches/lib.sh
source benches/lib.sh

command -v redis-server >/dev/null 2>&1 || die "missing: redis-server (apt-get install -y redis-server)"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
build_release

free_port
start "$DIR/redis.log" taskset -c "$CLIENT_CORE" redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no
REDIS_PID=$STARTED
wait_port "$PORT" "$REDIS_PID" redis-server "$DIR/redis.log"
# cpu_ticks PID: user + system CPU time of a process, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
TICKS=$(getconf CLK_TCK)
REDIS=redis://127.0.0.1:$PORT/0
log "redis-server on 127.0.0.1:$PORT"

RESULTS=$DIR/results.txt
NOTES=$DIR/notes.txt
: >"$RESULTS"
: >"$NOTES"
"$PORTCULLIS" certs generate --out "$DIR/certs" >/dev/null
cp benches/bench.toml "$DIR/portcullis.toml"
for ((round = 1; round <= ROUNDS; round++)); do
    for mode in standalone cluster; do
        redis=""
        [[ $mode == cluster ]] && redis=$REDIS
        free_port
        port=$PORT
        free_port
        admin=$PORT
        logfile=$DIR/$mode-$round.log
        start "$logfile" taskset -c "$SERVER_CORE" env "PORTCULLIS_SERVER_LISTEN=127.0.0.1:$port" \
            "PORTCULLIS_ADMIN_LISTEN=127.0.0.1:$admin" "PORTCULLIS_CLUSTER_REDIS=$redis" \
            "$PORTCULLIS" --config "$DIR/portcullis.toml" --log-level warn
        pid=$STARTED
        wait_port "$port" "$pid" "portcullis ($mode)" "$logfile"
        sleep 1 # cluster mode: the first sync with Redis
        log "round $round: $mode (pid $pid, core $SERVER_CORE)"
        out=$DIR/$mode-$round.out
        redis_before=$(cpu_ticks "$REDIS_PID")
        started=$(date +%s.%N)
        if ! taskset -c "$CLIENT_CORE" "$LOAD" --target "127.0.0.1:$port" --ca "$DIR/certs/ca.pem" \
            --pid "$pid" --admin "127.0.0.1:$admin" --label "$mode" --scenarios handshake,reject \
            --seconds "$SECONDS_PER_SCENARIO" --workers "$WORKERS" >"$out" 2>"$out.err"; then
            echo "$mode round $round: load tool exited with status $?: $(tail -n 3 "$out.err" | tr '\n' ' ')" >>"$NOTES"
        fi
        # Redis's CPU over the whole run of both scenarios, in cores (it shares core CLIENT_CORE
        # with the load tool).
        awk -v m="$mode" -v t0="$started" -v t1="$(date +%s.%N)" -v c="$(($(cpu_ticks "$REDIS_PID") - redis_before))" -v hz="$TICKS" \
            'BEGIN { printf "scenario=redis server=%s cores=%.3f\n", m, c / hz / (t1 - t0) }' >>"$out"
        grep '^scenario=' "$out" | tee -a "$RESULTS" >&2 || true
        stop "$pid"
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
    "Redis CPU during the run (cores, on the load tool's core)|redis|cores|mean"
)

echo "# portcullis cluster mode (local Redis) vs standalone"
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), $(nproc) cores, load average $(cut -d' ' -f1 /proc/loadavg);" \
    "$(redis-server --version | cut -d' ' -f1-3); portcullis $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "Gateway pinned to core $SERVER_CORE, load tool and Redis to core $CLIENT_CORE; $ROUNDS alternating rounds of $SECONDS_PER_SCENARIO s per scenario, $WORKERS handshake loops; means over rounds (p99 and slowest: the worst round)."
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
