#!/usr/bin/env bash
# Compare portcullis as a relay (issue "upstream": messages mode and stream mode) with
# HAProxy (TCP mode) and nginx (stream module), each terminating TLS and relaying to the same
# plaintext byte-echo backend, with the end-to-end load tool (benches/load.rs).
#
#   apt-get install -y haproxy nginx-light libnginx-mod-stream   # once
#   benches/relay.sh > benches/relay-results.md
#
# Layout as in benches/compare.sh: each server alone, pinned to core 0, one worker/thread;
# the load tool and the backend (`load raw-echo`) on core 1. No PROXY header anywhere
# (portcullis `send_proxy = "off"`), so every gateway sends the backend the same bytes.
#
# Scenarios: `relay` (CONNECTIONS persistent connections, a 64-byte binary frame echoed in
# a closed loop: requests/s, p99, requests per server CPU-second) and `relay_handshake`
# (WORKERS loops of connect + full handshake + one relayed frame + close: the cost of a new
# client connection including the gateway's connection to the backend).
#
# The floor: `bare-epoll` and `bare-uring` are benches/bare-relay, a rustls relay with
# nothing else in it (no limits, timers, metrics or authentication), on monoio with its
# epoll driver and with its io_uring driver: what any rustls relay spends per message here.
#
# Knobs (environment): SECONDS_PER_SCENARIO (5), ROUNDS (3: the servers alternate within
# each round; the table shows medians over the rounds, since one run of a server moves by
# up to 20 % on a shared machine), WORKERS (4), CONNECTIONS (32), BASE_PORT (24530),
# SERVER_CORE (0), CLIENT_CORE (1), KEEP_TMP (0), BARE (1: 0 leaves the bare relays out).
set -euo pipefail

SECONDS_PER_SCENARIO=${SECONDS_PER_SCENARIO:-5}
ROUNDS=${ROUNDS:-3}
WORKERS=${WORKERS:-4}
CONNECTIONS=${CONNECTIONS:-32}
IDLE=0
BASE_PORT=${BASE_PORT:-24530}
SERVER_CORE=${SERVER_CORE:-0}
CLIENT_CORE=${CLIENT_CORE:-1}
KEEP_TMP=${KEEP_TMP:-0}
BARE=${BARE:-1}
SERVERS=(messages stream haproxy nginx)
((BARE == 0)) || SERVERS+=(bare-epoll bare-uring)
SCENARIOS=(relay relay_handshake)
NGINX_STREAM_MODULE=${NGINX_STREAM_MODULE:-/usr/lib/nginx/modules/ngx_stream_module.so}

TAG=relay

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=benches/lib.sh
source benches/lib.sh

missing=()
for program in cargo taskset haproxy nginx; do
    command -v "$program" >/dev/null 2>&1 || missing+=("$program")
done
((${#missing[@]} == 0)) || die "missing: ${missing[*]} (apt-get install -y haproxy nginx-light libnginx-mod-stream)"
[[ -f $NGINX_STREAM_MODULE ]] || die "no nginx stream module at $NGINX_STREAM_MODULE (apt-get install -y libnginx-mod-stream)"
cores=$(nproc)
((cores > SERVER_CORE && cores > CLIENT_CORE)) || die "needs cores $SERVER_CORE and $CLIENT_CORE; this machine has $cores"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

build_release
if ((BARE != 0)); then
    log "building benches/bare-relay"
    cargo build --release --locked --quiet --manifest-path benches/bare-relay/Cargo.toml \
        --target-dir target/bare-relay
fi
BARE_RELAY=target/bare-relay/release/bare-relay

log "temp dir $DIR"
"$PORTCULLIS" certs generate --out "$DIR/certs" >/dev/null
CERTS=$DIR/certs
cat "$CERTS/server.pem" "$CERTS/server.key" >"$DIR/haproxy.pem"
chmod 600 "$DIR/haproxy.pem"

free_port
BPORT=$PORT
start "$DIR/backend.log" taskset -c "$CLIENT_CORE" "$LOAD" raw-echo "127.0.0.1:$BPORT"
wait_port "$BPORT" "$STARTED" backend "$DIR/backend.log"
log "raw echo backend on 127.0.0.1:$BPORT"

# portcullis: the benchmark configuration (one worker, auth off) relaying to the backend.
config_portcullis() {
    cp benches/bench.toml "$DIR/portcullis.toml"
    CMD=(env "PORTCULLIS_SERVER_LISTEN=127.0.0.1:$1" "PORTCULLIS_UPSTREAM_SERVERS=127.0.0.1:$BPORT"
        "PORTCULLIS_UPSTREAM_MODE=$2" PORTCULLIS_UPSTREAM_SEND_PROXY=off
        "$PORTCULLIS" --config "$DIR/portcullis.toml" --log-level warn)
}
config_messages() { config_portcullis "$1" messages; }
config_stream() { config_portcullis "$1" stream; }

# The bare relay (benches/bare-relay) with monoio's epoll or io_uring driver.
config_bare() {
    CMD=("$BARE_RELAY" "$2" "127.0.0.1:$1" "127.0.0.1:$BPORT" "$CERTS/server.pem" "$CERTS/server.key")
}
config_bare-epoll() { config_bare "$1" epoll; }
config_bare-uring() { config_bare "$1" uring; }

# HAProxy: TCP mode, one thread, no limits in the way (maxconn covers the scenarios'
# connections; HAProxy reserves two descriptors each and checks them against ulimit -n).
config_haproxy() {
    cat >"$DIR/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4000
    tune.ssl.cachesize 20000
    pidfile $DIR/haproxy.pid

defaults
    mode tcp
    maxconn 4000
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend gw
    bind 127.0.0.1:$1 ssl crt $DIR/haproxy.pem ssl-min-ver TLSv1.2
    default_backend echo

backend echo
    server b 127.0.0.1:$BPORT
EOF
    CMD=(haproxy -db -f "$DIR/haproxy.cfg")
}

# nginx: the stream module, one worker process, TLS 1.2+, no Nagle.
config_nginx() {
    cat >"$DIR/nginx.conf" <<EOF
load_module $NGINX_STREAM_MODULE;
worker_processes 1;
daemon off;
master_process off;
pid $DIR/nginx.pid;
error_log $DIR/nginx-error.log warn;
events { worker_connections 20000; }
stream {
    ssl_session_cache shared:SSL:10m;
    server {
        listen 127.0.0.1:$1 ssl;
        ssl_certificate $CERTS/server.pem;
        ssl_certificate_key $CERTS/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        tcp_nodelay on;
        proxy_pass 127.0.0.1:$BPORT;
    }
}
EOF
    CMD=(nginx -e "$DIR/nginx-error.log" -p "$DIR" -c "$DIR/nginx.conf")
}

RESULTS=$DIR/results.txt
NOTES=$DIR/notes.txt
: >"$RESULTS"
: >"$NOTES"
run_servers

awk '
    { delete f; for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] } }
    f["errors"] > 0 { printf "%s %s: %d errors\n", f["server"], f["scenario"], f["errors"] }
' "$RESULTS" >>"$NOTES"

# The best peer of a row: the larger value for rates, the smaller for latencies.
best_peer() {
    local scenario=$1 key=$2 better=$3
    local h n
    h=$(value "$scenario" haproxy "$key")
    n=$(value "$scenario" nginx "$key")
    awk -v h="$h" -v n="$n" -v better="$better" 'BEGIN {
        if (h == "") { print n; exit } if (n == "") { print h; exit }
        if (better == "higher") print (h + 0 > n + 0 ? h : n); else print (h + 0 < n + 0 ? h : n) }'
}

# Per round: each of ours against the better peer of that same round, and the median of
# those ratios. The table above takes each server's median first, which flatters whoever
# is compared with a peer that had its slow rounds (the best peer changes from round to
# round on this machine); pairing within a round does not.
per_round() {
    local key=$1 better=$2
    awk -v key="$key" -v better="$better" -v ours="${OURS[*]}" '
        BEGIN { round = 0; n_ours = split(ours, name, " ") }
        $1 == "scenario=relay" {
            for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
            if (f["server"] in seen) { round++; delete seen }
            seen[f["server"]] = 1
            v[round, f["server"]] = f[key]
        }
        END {
            for (r = 0; r <= round; r++) {
                h = v[r, "haproxy"]; g = v[r, "nginx"]
                best = (better == "higher") ? (h > g ? h : g) : (h < g ? h : g)
                line = "| " r + 1 " | " best " |"
                for (k = 1; k <= n_ours; k++) {
                    x = v[r, name[k]] / best
                    line = line sprintf(" %.2f |", x)
                    ratio[k, r] = x
                }
                print line
            }
            line = "| median | |"
            for (k = 1; k <= n_ours; k++) {
                m = 0
                for (r = 0; r <= round; r++) s[m++] = ratio[k, r]
                for (i = 1; i < m; i++) { x = s[i]; for (j = i - 1; j >= 0 && s[j] > x; j--) s[j + 1] = s[j]; s[j + 1] = x }
                line = line sprintf(" %.2f |", (m % 2) ? s[(m - 1) / 2] : (s[m / 2 - 1] + s[m / 2]) / 2)
            }
            print line
        }
    ' "$RESULTS"
}

ROWS=(
    "relayed requests/s|relay|rate|higher"
    "relayed requests per server CPU-second|relay|per_server_cpu_s|higher"
    "relay p99 (µs)|relay|p99_us|lower"
    "relay p99.9 (µs)|relay|p999_us|lower"
    "handshakes/s incl. upstream connect|relay_handshake|rate|higher"
    "handshakes per server CPU-second|relay_handshake|per_server_cpu_s|higher"
)

echo "# portcullis relay vs HAProxy (TCP) vs nginx (stream)"
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), $cores cores; $(haproxy -v 2>/dev/null | head -n 1 | cut -d' ' -f1-3);" \
    "$(nginx -v 2>&1 | cut -d' ' -f3); portcullis $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "Servers pinned to core $SERVER_CORE, load tool and byte-echo backend to core $CLIENT_CORE."
echo "SECONDS_PER_SCENARIO=$SECONDS_PER_SCENARIO ROUNDS=$ROUNDS WORKERS=$WORKERS CONNECTIONS=$CONNECTIONS; medians over the rounds"
echo
# Columns: every server, then each one that is not a peer against the best peer.
OURS=()
for server in "${SERVERS[@]}"; do
    [[ $server == haproxy || $server == nginx ]] || OURS+=("$server")
done
header="| metric |"
rule="|---|"
for server in "${SERVERS[@]}"; do header+=" $server |"; rule+="---:|"; done
for server in "${OURS[@]}"; do header+=" $server/best |"; rule+="---:|"; done
echo "$header"
echo "$rule"
for row in "${ROWS[@]}"; do
    IFS='|' read -r label scenario key better <<<"$row"
    line="| $label |"
    for server in "${SERVERS[@]}"; do
        v=$(value "$scenario" "$server" "$key")
        line+=" ${v:--} |"
    done
    b=$(best_peer "$scenario" "$key" "$better")
    for server in "${OURS[@]}"; do
        line+=" $(ratio "$(value "$scenario" "$server" "$key")" "$b") |"
    done
    echo "$line"
done
echo
echo "\"best\" is the better of HAProxy and nginx in that row. Server CPU per relayed message is"
echo "the inverse of \"requests per server CPU-second\": a ratio above 1 there means less CPU"
echo "per message than the best peer. For p99 a ratio below 1 is better than the best peer."
echo "bare-epoll and bare-uring (benches/bare-relay) are the floor: a rustls relay with nothing"
echo "else in it, on monoio's epoll and io_uring drivers."
for row in "relayed requests per server CPU-second|per_server_cpu_s|higher" "relay p99 (µs)|p99_us|lower"; do
    IFS='|' read -r label key better <<<"$row"
    echo
    echo "Per round, $label against that round's better peer:"
    echo
    header="| round | best peer |"
    rule="|---|---:|"
    for server in "${OURS[@]}"; do header+=" $server |"; rule+="---:|"; done
    echo "$header"
    echo "$rule"
    per_round "$key" "$better"
done
echo
echo "The profile behind these rows (instructions and system calls per message, what bounds"
echo "the CPU per message): benches/relay-profile.md."
echo
print_notes_and_results
