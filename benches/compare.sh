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
# Knobs (environment): SECONDS_PER_SCENARIO (5), WORKERS (16: handshake loops; fewer leave
# the server waiting on round trips rather than on its CPU), CONNECTIONS (32), IDLE (5000),
# BASE_PORT (first port tried, 24430), SERVER_CORE (0), CLIENT_CORE (1), KEEP_TMP (0: set 1
# to keep the temporary folder with configurations and server logs).
set -euo pipefail

SECONDS_PER_SCENARIO=${SECONDS_PER_SCENARIO:-5}
WORKERS=${WORKERS:-16}
CONNECTIONS=${CONNECTIONS:-32}
IDLE=${IDLE:-5000}
BASE_PORT=${BASE_PORT:-24430}
SERVER_CORE=${SERVER_CORE:-0}
CLIENT_CORE=${CLIENT_CORE:-1}
KEEP_TMP=${KEEP_TMP:-0}
SERVERS=(portcullis haproxy stunnel)
SCENARIOS=(handshake handshake_pq resume steady idle reject)

TAG=compare

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=benches/lib.sh
source benches/lib.sh

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

build_release

# --- certificates ----------------------------------------------------------------------------
log "temp dir $DIR"
"$PORTCULLIS" certs generate --out "$DIR/certs" >/dev/null
CERTS=$DIR/certs
cat "$CERTS/server.pem" "$CERTS/server.key" >"$DIR/haproxy.pem"
chmod 600 "$DIR/haproxy.pem"

# --- crypto floor ----------------------------------------------------------------------------
# The server's unavoidable crypto per full handshake (signature + its side of the key
# exchange), timed on the server core with the provider portcullis uses.
FLOOR=$DIR/floor.txt
taskset -c "$SERVER_CORE" "$LOAD" floor --key "$CERTS/server.key" >"$FLOOR"
log "crypto floor: $(tr '\n' ' ' <"$FLOOR")"

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

run_servers

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
ROWS=(
    "handshake rate (handshakes/s)|handshake|rate"
    "handshakes per server CPU-second|handshake|per_server_cpu_s"
    "server CPU per handshake (µs)|handshake|server_us_per_op"
    "load tool CPU share, handshake|handshake|client_cpu_share"
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
    if [[ $key == client_cpu_share ]]; then
        # The load tool's own figure: a ratio between runs says nothing about the servers.
        echo "| $label | ${p:--} | ${h:--} | $s_cell | - | - |"
        continue
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
echo "The load tool does not verify the server's certificate or handshake signature (the same"
echo "for every server; each server still sends its chain and signs): its CPU share, its own"
echo "CPU time over the elapsed time on its core, stays well below 1 when the server sets the rate."
echo
echo "## Server CPU per full handshake against the crypto floor"
echo
echo "The floor is the crypto a TLS 1.3 server cannot avoid in one full handshake: the"
echo "CertificateVerify signature with its key and its side of the negotiated key exchange"
echo "(X25519: a key pair and the agreement; X25519MLKEM768: that plus the ML-KEM-768"
echo "encapsulation), timed on core $SERVER_CORE in this run by \`load floor\` (rustls on aws-lc-rs,"
echo "the fastest of 7 rounds of thread CPU time). OpenSSL's own primitives may be faster or"
echo "slower; the floor is the same number for every server here."
echo
echo "| server | scenario | group | server CPU per handshake (µs) | crypto floor (µs) | CPU / floor |"
echo "|---|---|---|---:|---:|---:|"
for server in "${SERVERS[@]}"; do
    for scenario in handshake handshake_pq; do
        group=$(value "$scenario" "$server" group)
        [[ -n $group ]] || continue
        cpu=$(value "$scenario" "$server" server_us_per_op)
        floor=$(awk -v g="group=$group" '$2 == g { for (i = 3; i <= NF; i++) if (index($i, "floor_us=") == 1) print substr($i, 10) }' "$FLOOR")
        echo "| $server | $scenario | $group | ${cpu:--} | ${floor:--} | $(ratio "$cpu" "$floor") |"
    done
done
echo
echo "Floor lines:"
echo
echo '```'
cat "$FLOOR"
echo '```'
echo
print_notes_and_results
