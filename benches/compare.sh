#!/usr/bin/env bash
# Compare portcullis with HAProxy and stunnel as TLS-terminating TCP gateways, using the
# end-to-end load tool (benches/load.rs) on the same certificate, backend and CPU budget.
#
#   apt-get install -y haproxy stunnel4      # once
#   benches/compare.sh > benches/compare-results.md
#
# Layout: each server runs alone, pinned to core 0 (taskset -c 0), one worker/thread where
# the server has that knob; the load tool and the plaintext backend (`load backend`) share
# core 1. Every scenario is a separate run of the load tool, so one failure does not lose
# the others. Progress goes to stderr; the markdown report (table and raw lines) to stdout.
#
# Knobs (environment): SECONDS_PER_SCENARIO (5), WORKERS (4), CONNECTIONS (32), IDLE (5000),
# BASE_PORT (first port tried, 24430), SERVER_CORE (0), CLIENT_CORE (1), KEEP_TMP (0: set 1
# to keep the temporary folder with configurations and server logs).
set -euo pipefail

SECONDS_PER_SCENARIO=${SECONDS_PER_SCENARIO:-5}
WORKERS=${WORKERS:-4}
CONNECTIONS=${CONNECTIONS:-32}
IDLE=${IDLE:-5000}
BASE_PORT=${BASE_PORT:-24430}
SERVER_CORE=${SERVER_CORE:-0}
CLIENT_CORE=${CLIENT_CORE:-1}
KEEP_TMP=${KEEP_TMP:-0}
SERVERS=(portcullis haproxy stunnel)
SCENARIOS=(handshake resume steady idle reject)

log() { printf '[compare] %s\n' "$*" >&2; }
die() { printf '[compare] error: %s\n' "$*" >&2; exit 1; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --- prerequisites ---------------------------------------------------------------------------
missing=()
for program in cargo taskset haproxy stunnel; do
    command -v "$program" >/dev/null 2>&1 || missing+=("$program")
done
if ((${#missing[@]})); then
    printf '[compare] missing: %s\n' "${missing[*]}" >&2
    printf '[compare] install with: apt-get install -y haproxy stunnel4 util-linux\n' >&2
    exit 1
fi
cores=$(nproc)
((cores > SERVER_CORE && cores > CLIENT_CORE)) || die "needs cores $SERVER_CORE and $CLIENT_CORE; this machine has $cores"

# The idle scenario holds IDLE connections open: the load tool needs that many descriptors,
# HAProxy twice as many (client and backend side).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile=$(ulimit -n)
if [[ $nofile != unlimited ]] && ((nofile < 2 * IDLE + 1000)); then
    die "ulimit -n is $nofile; IDLE=$IDLE needs at least $((2 * IDLE + 1000)) (lower IDLE or raise the hard limit)"
fi

# HAProxy reserves two descriptors per connection for its maxconn and refuses to start
# when RLIMIT_NOFILE cannot hold them: 20000 where the limit allows, less otherwise.
HAPROXY_MAXCONN=20000
if [[ $nofile != unlimited ]] && ((2 * HAPROXY_MAXCONN + 100 > nofile)); then
    HAPROXY_MAXCONN=$(((nofile - 100) / 2))
fi

# --- build -----------------------------------------------------------------------------------
log "building (cargo build --release --locked, then the load bench)"
cargo build --release --locked >&2
LOAD=$(cargo bench --locked --bench load --no-run --message-format=json |
    grep '"kind":\["bench"\],[^}]*"name":"load"' | grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d'"' -f4)
[[ -n $LOAD && -x $LOAD ]] || die "could not find the load bench binary (cargo bench --bench load --no-run)"
PORTCULLIS=$PWD/target/release/portcullis
[[ -x $PORTCULLIS ]] || die "no $PORTCULLIS after the build"

# --- temp dir, cleanup -----------------------------------------------------------------------
DIR=$(mktemp -d "${TMPDIR:-/tmp}/portcullis-compare.XXXXXX")
PIDS=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP_TMP == 1 ]]; then
        log "kept $DIR"
    else
        rm -rf "$DIR"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Start a background process and remember its pid (in $STARTED, and for the cleanup).
start() {
    local logfile=$1
    shift
    "$@" >"$logfile" 2>&1 &
    STARTED=$!
    PIDS+=("$STARTED")
}

# SIGTERM, then SIGKILL after 10 s.
stop() {
    local pid=$1 i
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local kept=() p
    for p in "${PIDS[@]}"; do
        [[ $p == "$pid" ]] || kept+=("$p")
    done
    PIDS=("${kept[@]}")
}

port_free() { [[ -z $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }

NEXT_PORT=$BASE_PORT
free_port() {
    while ! port_free "$NEXT_PORT"; do
        NEXT_PORT=$((NEXT_PORT + 1))
    done
    PORT=$NEXT_PORT
    NEXT_PORT=$((NEXT_PORT + 1))
}

# Wait until 127.0.0.1:$port accepts (and $pid is still alive), up to 15 s.
wait_port() {
    local port=$1 pid=$2 name=$3 logfile=$4
    local i
    for ((i = 0; i < 150; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$logfile" >&2 || true
            die "$name exited before listening"
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    tail -n 20 "$logfile" >&2 || true
    die "$name did not listen on 127.0.0.1:$port within 15 s"
}

# --- certificates ----------------------------------------------------------------------------
log "temp dir $DIR"
"$PORTCULLIS" certs generate --out "$DIR/certs" >/dev/null
CERTS=$DIR/certs
cat "$CERTS/server.pem" "$CERTS/server.key" >"$DIR/haproxy.pem"
chmod 600 "$DIR/haproxy.pem"

# --- backend ---------------------------------------------------------------------------------
free_port
BPORT=$PORT
start "$DIR/backend.log" taskset -c "$CLIENT_CORE" "$LOAD" backend "127.0.0.1:$BPORT"
BACKEND_PID=$STARTED
wait_port "$BPORT" "$BACKEND_PID" backend "$DIR/backend.log"
log "backend on 127.0.0.1:$BPORT (pid $BACKEND_PID, core $CLIENT_CORE)"

# --- server configurations -------------------------------------------------------------------
# portcullis: the BENCH_CONFIG of benches/load.rs on a fixed port.
config_portcullis() {
    # The configuration the load tool itself uses; certificates are in $DIR/certs.
    cp benches/bench.toml "$DIR/portcullis.toml"
    CMD=(env "PORTCULLIS_SERVER_LISTEN=127.0.0.1:$1" "$PORTCULLIS" --config "$DIR/portcullis.toml" --log-level warn)
}

# HAProxy: TCP mode, one thread, a TLS session cache, tickets on (default), and a per-source
# connection-rate limit like portcullis' (more than 20 new connections in 1 s: refused at
# accept, before any TLS).
config_haproxy() {
    cat >"$DIR/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $HAPROXY_MAXCONN
    tune.ssl.cachesize 20000
    ssl-default-bind-options ssl-min-ver TLSv1.2
    pidfile $DIR/haproxy.pid

defaults
    mode tcp
    maxconn $HAPROXY_MAXCONN
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout client-fin 5s
    timeout server-fin 5s

frontend gw
    bind 127.0.0.1:$1 ssl crt $DIR/haproxy.pem ssl-min-ver TLSv1.2
    stick-table type ip size 100k expire 30s store conn_rate(1s)
    tcp-request connection track-sc0 src
    tcp-request connection reject if { sc_conn_rate(0) gt 20 }
    default_backend echo

backend echo
    server b 127.0.0.1:$BPORT
EOF
    CMD=(haproxy -db -f "$DIR/haproxy.cfg")
}

# stunnel: one service, TLS 1.2+, no Nagle on either side; session cache and tickets at
# their defaults. stunnel has no connection-rate limiting.
config_stunnel() {
    cat >"$DIR/stunnel.conf" <<EOF
foreground = yes
pid = $DIR/stunnel.pid
debug = 3
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1

[gw]
accept = 127.0.0.1:$1
connect = 127.0.0.1:$BPORT
cert = $CERTS/server.pem
key = $CERTS/server.key
sslVersionMin = TLSv1.2
EOF
    CMD=(stunnel "$DIR/stunnel.conf")
}

# --- runs ------------------------------------------------------------------------------------
RESULTS=$DIR/results.txt
NOTES=$DIR/notes.txt
: >"$RESULTS"
: >"$NOTES"
if ((HAPROXY_MAXCONN < 20000)); then
    echo "haproxy maxconn lowered to $HAPROXY_MAXCONN: ulimit -n is $nofile (2 descriptors per connection)" >>"$NOTES"
fi

for server in "${SERVERS[@]}"; do
    free_port
    "config_$server" "$PORT"
    logfile=$DIR/$server.log
    start "$logfile" taskset -c "$SERVER_CORE" "${CMD[@]}"
    pid=$STARTED
    wait_port "$PORT" "$pid" "$server" "$logfile"
    log "$server on 127.0.0.1:$PORT (pid $pid, core $SERVER_CORE)"
    sleep 1 # let the readiness probe fall out of the per-source rate window
    for scenario in "${SCENARIOS[@]}"; do
        log "  $server: $scenario"
        out=$DIR/$server-$scenario.out
        if taskset -c "$CLIENT_CORE" "$LOAD" --target "127.0.0.1:$PORT" --ca "$CERTS/ca.pem" --pid "$pid" \
            --label "$server" --scenarios "$scenario" --workers "$WORKERS" --connections "$CONNECTIONS" \
            --idle "$IDLE" --seconds "$SECONDS_PER_SCENARIO" >"$out" 2>"$out.err"; then
            :
        else
            echo "$server $scenario: load tool exited with status $?: $(tail -n 3 "$out.err" | tr '\n' ' ')" >>"$NOTES"
        fi
        grep '^scenario=' "$out" | tee -a "$RESULTS" >&2 || true
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$server exited during $scenario: $(tail -n 3 "$logfile" | tr '\n' ' ')" >>"$NOTES"
            break
        fi
        sleep 1
    done
    stop "$pid"
    # Warnings and errors the server logged while under load (HAProxy's are expected to be
    # quiet; stunnel logs resets at debug 3).
    if [[ -s $logfile ]]; then
        lines=$(wc -l <"$logfile")
        echo "$server logged $lines line(s); last: $(tail -n 1 "$logfile" | cut -c1-200)" >>"$NOTES"
    fi
done

# Anything in the result lines that makes a number mean less than it says.
awk '
    { delete f; for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] } }
    f["errors"] > 0 { printf "%s %s: %d errors\n", f["server"], f["scenario"], f["errors"] }
    f["scenario"] == "resume" && f["resumed"] < 0.9 * f["handshakes"] {
        printf "%s resume: only %d of %d handshakes resumed\n", f["server"], f["resumed"], f["handshakes"] }
    f["scenario"] == "handshake" && f["resumed"] > 0 { printf "%s handshake: %d resumed\n", f["server"], f["resumed"] }
' "$RESULTS" >>"$NOTES"
for server in "${SERVERS[@]}"; do
    for scenario in "${SCENARIOS[@]}"; do
        grep -q "^scenario=$scenario server=$server " "$RESULTS" || echo "$server $scenario: no result" >>"$NOTES"
    done
done

# --- report ----------------------------------------------------------------------------------
# value SCENARIO SERVER KEY: the KEY=value of that result line, or empty.
value() {
    awk -v s="scenario=$1" -v srv="server=$2" -v k="$3=" '
        $1 == s && $2 == srv { for (i = 3; i <= NF; i++) if (index($i, k) == 1) { print substr($i, length(k) + 1); exit } }
    ' "$RESULTS"
}

ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print "n/a"; else printf "%.2f\n", a / b }'
}

ROWS=(
    "handshake rate (handshakes/s)|handshake|rate"
    "handshakes per server CPU-second|handshake|per_server_cpu_s"
    "handshake p99 (µs)|handshake|p99_us"
    "resume rate (handshakes/s)|resume|rate"
    "resumptions per server CPU-second|resume|per_server_cpu_s"
    "steady rate (requests/s)|steady|rate"
    "requests per server CPU-second|steady|per_server_cpu_s"
    "steady p99 (µs)|steady|p99_us"
    "steady p99.9 (µs)|steady|p999_us"
    "idle bytes/connection|idle|bytes_per_connection"
    "reject: legit p99 (µs)|reject|legit_p99_us"
    "reject: refusals/s|reject|refusals_per_s"
)

echo "# portcullis vs HAProxy vs stunnel"
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), $cores cores; $(haproxy -v 2>/dev/null | head -n 1 | cut -d' ' -f1-3);" \
    "$(stunnel -version 2>&1 | grep -m1 '^stunnel' | cut -d' ' -f1-2); portcullis $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "Servers pinned to core $SERVER_CORE, load tool and plaintext backend to core $CLIENT_CORE."
echo "SECONDS_PER_SCENARIO=$SECONDS_PER_SCENARIO WORKERS=$WORKERS CONNECTIONS=$CONNECTIONS IDLE=$IDLE"
echo
echo "| metric | portcullis | haproxy | stunnel | portcullis/haproxy | portcullis/stunnel |"
echo "|---|---:|---:|---:|---:|---:|"
for row in "${ROWS[@]}"; do
    IFS='|' read -r label scenario key <<<"$row"
    p=$(value "$scenario" portcullis "$key")
    h=$(value "$scenario" haproxy "$key")
    s=$(value "$scenario" stunnel "$key")
    s_cell=${s:--}
    if [[ $scenario == reject && $key == refusals_per_s ]]; then
        s_cell="${s:--} (no rate limiting)"
    fi
    echo "| $label | ${p:--} | ${h:--} | $s_cell | $(ratio "$p" "$h") | $(ratio "$p" "$s") |"
done
echo
echo "Ratios are portcullis divided by the other server. For rates (handshakes/s, requests/s,"
echo "refusals/s, and operations per second of the server's own CPU time) a ratio above 1 is"
echo "better for portcullis; for latencies (p99, p99.9) and"
echo "memory (bytes/connection) a ratio below 1 is better for portcullis. stunnel has no"
echo "connection-rate limiting, so its reject row measures a flood it accepts; HAProxy and"
echo "portcullis both refuse a source above 20 new connections/s. Numbers on a shared machine"
echo "are noisy: compare ratios across repeated runs, not single digits."
echo
if [[ -s $NOTES ]]; then
    echo "Notes:"
    echo
    sed 's/^/- /' "$NOTES"
    echo
fi
echo "Raw result lines:"
echo
echo '```'
cat "$RESULTS"
echo '```'
