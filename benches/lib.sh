# Shared by benches/compare.sh and benches/relay.sh: logging, the release build, process
# start/stop with cleanup on exit, free ports, readiness waits and reading result lines.
# Source it from the repository root after setting TAG (the log prefix) and KEEP_TMP.

log() { printf '[%s] %s\n' "$TAG" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$TAG" "$*" >&2; exit 1; }

# Builds the release binary and the load bench; sets LOAD and PORTCULLIS.
build_release() {
    log "building (cargo build --release --locked, then the load bench)"
    cargo build --release --locked >&2
    LOAD=$(cargo bench --locked --bench load --no-run --message-format=json |
        grep '"kind":\["bench"\],[^}]*"name":"load"' | grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d'"' -f4)
    [[ -n $LOAD && -x $LOAD ]] || die "could not find the load bench binary (cargo bench --bench load --no-run)"
    PORTCULLIS=${CARGO_TARGET_DIR:-$PWD/target}/release/portcullis
    [[ -x $PORTCULLIS ]] || die "no $PORTCULLIS after the build"
}

# --- temp dir, cleanup -----------------------------------------------------------------------
DIR=$(mktemp -d "${TMPDIR:-/tmp}/portcullis-$TAG.XXXXXX")
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

# value SCENARIO SERVER KEY: the KEY=value of the first such result line, or empty. With
# several rounds (ROUNDS > 1), the median over the rounds' lines (a word, not a number: the
# first); a scenario that prints several lines per run (idle with a list of counts) then
# wants one count.
value() {
    awk -v s="scenario=$1" -v srv="server=$2" -v k="$3=" -v rounds="${ROUNDS:-1}" '
        $1 == s && $2 == srv { for (i = 3; i <= NF; i++) if (index($i, k) == 1) { v[n++] = substr($i, length(k) + 1); break } }
        END {
            if (n == 0) exit
            if (rounds + 0 <= 1 || v[0] !~ /^-?[0-9.]+$/) { print v[0]; exit }
            for (i = 1; i < n; i++) { x = v[i] + 0; for (j = i - 1; j >= 0 && v[j] + 0 > x; j--) v[j + 1] = v[j]; v[j + 1] = x }
            if (n % 2) print v[(n - 1) / 2]; else print (v[n / 2 - 1] + v[n / 2]) / 2
        }
    ' "$RESULTS"
}

ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0 || a ~ /inf/ || b ~ /inf/) print "n/a"; else printf "%.2f\n", a / b }'
}


# Runs every scenario of SCENARIOS against every server of SERVERS, one server at a time,
# ROUNDS times over (1 unless set; the servers alternate within each round, so that a
# slower minute of this shared machine does not fall on one server only):
# `config_<server> PORT` sets CMD, the server runs pinned to SERVER_CORE, the load tool to
# CLIENT_CORE; result lines go to RESULTS, anything that went wrong to NOTES.
run_servers() {
    local round
    for ((round = 1; round <= ${ROUNDS:-1}; round++)); do
        ((${ROUNDS:-1} == 1)) || log "round $round of $ROUNDS"
        run_round
    done
}

# One round of run_servers.
run_round() {
    local server scenario logfile pid out lines
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
}

# The end of a report: what went wrong (NOTES), then the raw result lines (RESULTS).
print_notes_and_results() {
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
}
