#!/usr/bin/env bash
# roomcast's benchmarks (see BENCHMARKS.md), on this machine only:
#
#     scripts/bench.sh                      # every scenario, SQLite in a temp dir
#     scripts/bench.sh --pin --repeat 3     # server on CPU 0, bench on CPU 1, medians of 3
#     scripts/bench.sh --postgres URL       # an existing PostgreSQL database
#     scripts/bench.sh --postgres auto      # a throwaway PostgreSQL (scripts/test-services.sh)
#     scripts/bench.sh --only fanout,rooms  # some scenarios (comma-separated)
#
# Scenarios (each on a fresh server; sizes from the environment, below):
#     sends            SENDERS senders × MESSAGES, one at a time, one room
#     sends-pipelined  100 senders × 32 in flight, one room          (issue 10 item 5)
#     sends-rooms      100 senders × 32 in flight over 100 rooms     (issue 10 item 5)
#     fanout           SUBSCRIBERS WebSocket subscribers of one room, RATE msgs/s
#     fanout-sse       the same load, subscribers over SSE
#     fanout-poll      the same load, subscribers long-polling (PushService.Poll)
#     live             LIVE_VIEWERS anonymous viewers of one live room (+batch), LIVE_RATE msgs/s, 30 s
#     live-burst       2,000 anonymous viewers of one live room (+batch), 200 msgs/s
#     rooms            ROOMS_SUBSCRIBERS subscribers over ROOMS rooms (1,000 × 10)
#     idle             IDLE idle authenticated connections, one account each
#     storm            STORM connections authenticated and subscribed, one account each
#     cluster-live     issue 8: CLUSTER_VIEWERS anonymous viewers of one live room
#                      (+batch) spread round robin over 3 nodes linked by Redis
#                      (cluster.broker = "redis", one PostgreSQL), CLUSTER_PUBLISHERS
#                      publishers (round robin too) at CLUSTER_RATE msgs/s; then the
#                      same load on 1 node with the Redis broker and on 1 node with
#                      the in-process broker, for the cost of the Redis hop. Needs
#                      PostgreSQL (--postgres URL, else a throwaway one) and starts a
#                      throwaway Redis (scripts/test-services.sh). Labels
#                      cluster-live-3, cluster-live-1redis, cluster-live-1local.
#
# Steps: `cargo build --release -p roomcast -p roomcast-bench`; then for each
# scenario a fresh server: start target/release/roomcast on a free 127.0.0.1 port
# with its own SQLite file in a temp dir, log level warn, the per-user send limit
# lifted (ROOMCAST_REALTIME__SEND_RATE_PER_SEC / _SEND_BURST = 1000000: the default
# 20/s would refuse most benchmark sends), the connection caps lifted (every bench
# connection comes from 127.0.0.1) and argon2id made cheap
# (ROOMCAST_AUTH__ARGON2_MEMORY_KIB=64, _ITERATIONS=1: the bench signs up thousands
# of accounts before it measures; no scenario measures a password hash); run the
# scenario with target/release/roomcast-bench; stop that server by its PID. The
# temp dir goes at the end. Nothing else is started or stopped, and every connection
# goes to 127.0.0.1. A fresh server per scenario keeps one scenario's freed memory
# and rooms from flattering the next (idle's KiB per connection above all).
#
# --pin runs the server under `taskset -c 0` (so it has one core and one HTTP
# worker) and the bench under `taskset -c 1 ... --threads 1`: the method the peer
# figures in BENCHMARKS.md were taken with. Each report says how busy the bench's
# own core was (`bench_cores_busy`); near 1.0 the generator is the bottleneck and
# the report says so. --repeat N runs every scenario N times and prints the median
# of each figure at the end.
#
# The open-files limit is raised to the hard limit (`ulimit -n`) for the server
# and the bench: each idle connection is one descriptor on each side.
#
# Sizes can be changed with environment variables:
#     BENCH_SENDERS=10 BENCH_MESSAGES=500                      sends
#     BENCH_PIPE_SENDERS=100 BENCH_PIPE_IN_FLIGHT=32 BENCH_PIPE_MESSAGES=1000  sends-*
#     BENCH_SUBSCRIBERS=1000 BENCH_PUBLISHERS=2 BENCH_RATE=100 BENCH_DURATION=10   fanout*
#     BENCH_ROOMS=1000 BENCH_ROOMS_SUBSCRIBERS=10000 BENCH_ROOMS_RATE=1000     rooms
#     BENCH_LIVE_VIEWERS=10000 BENCH_LIVE_RATE=20 BENCH_LIVE_DURATION=30       live
#     BENCH_IDLE=10000 BENCH_STORM=10000                       idle, storm
#     BENCH_CLUSTER_VIEWERS=3000 BENCH_CLUSTER_PUBLISHERS=3 BENCH_CLUSTER_RATE=20
#     BENCH_CLUSTER_DURATION=20                                cluster-live
#     BENCH_CODEC=proto                                        proto or json
#     BENCH_SERVER_BIN=path                                    another server build
#         (say, one built from an older commit in a worktree) measured by this tree's
#         bench: A/B comparisons with the same load generator
# Results: the bench's summaries on stdout, and the JSON lines (one per run, with
# "label" and "run" added) again at the end and in $BENCH_OUT (default
# target/bench/results-<time>.jsonl); each run's server log (level warn) beside it as
# <results>.<scenario>.<run>.server.log.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

postgres=""
only=""
pin=0
server_bin=${BENCH_SERVER_BIN:-target/release/roomcast}
repeat=1
while (($# > 0)); do
    case $1 in
    --postgres)
        postgres=${2:?--postgres needs a URL or "auto"}
        shift 2
        ;;
    --only)
        only=${2:?--only needs scenario names, comma-separated}
        shift 2
        ;;
    --pin)
        pin=1
        shift
        ;;
    --repeat)
        repeat=${2:?--repeat needs a count}
        [[ $repeat =~ ^[1-9][0-9]?$ ]] || {
            echo "bench.sh: --repeat must be 1-99" >&2
            exit 2
        }
        shift 2
        ;;
    -h | --help)
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
        exit 0
        ;;
    *)
        echo "bench.sh: unknown argument $1 (see --help)" >&2
        exit 2
        ;;
    esac
done

senders=${BENCH_SENDERS:-10}
messages=${BENCH_MESSAGES:-500}
subscribers=${BENCH_SUBSCRIBERS:-1000}
publishers=${BENCH_PUBLISHERS:-2}
rate=${BENCH_RATE:-100}
duration=${BENCH_DURATION:-10}
pipe_senders=${BENCH_PIPE_SENDERS:-100}
pipe_in_flight=${BENCH_PIPE_IN_FLIGHT:-32}
pipe_messages=${BENCH_PIPE_MESSAGES:-1000}
rooms=${BENCH_ROOMS:-1000}
rooms_subscribers=${BENCH_ROOMS_SUBSCRIBERS:-10000}
rooms_rate=${BENCH_ROOMS_RATE:-1000}
live_viewers=${BENCH_LIVE_VIEWERS:-10000}
live_rate=${BENCH_LIVE_RATE:-20}
live_duration=${BENCH_LIVE_DURATION:-30}
idle=${BENCH_IDLE:-10000}
storm=${BENCH_STORM:-10000}
codec=${BENCH_CODEC:-proto}
cluster_viewers=${BENCH_CLUSTER_VIEWERS:-3000}
cluster_publishers=${BENCH_CLUSTER_PUBLISHERS:-3}
cluster_rate=${BENCH_CLUSTER_RATE:-20}
cluster_duration=${BENCH_CLUSTER_DURATION:-20}

if ((pin)); then
    command -v taskset >/dev/null || {
        echo "bench.sh: --pin needs taskset (util-linux)" >&2
        exit 1
    }
    (($(nproc --all) >= 2)) || {
        echo "bench.sh: --pin needs 2 CPUs" >&2
        exit 1
    }
    server_cmd=(taskset -c 0 "$server_bin")
    bench_cmd=(taskset -c 1 target/release/roomcast-bench --threads 1)
else
    server_cmd=("$server_bin")
    bench_cmd=(target/release/roomcast-bench)
fi

say() { printf '\n==> %s\n' "$*" >&2; }

server_pid=""
# The nodes of a cluster-live run (PIDs and addresses), started by this script.
node_pids=()
node_addrs=()
work_dir=""
pg_started=0
redis_started=0
services_sourced=0

# Stops server process $1 (one this script started), if it runs.
stop_pid() {
    local pid=$1
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "the server did not stop within 10 s; killing pid $pid" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    fi
}

# Stops the server this script started (by its PID), if it runs.
stop_server() {
    stop_pid "$server_pid"
    server_pid=""
}

# Stops every node of a cluster-live run (by their PIDs).
stop_nodes() {
    local pid
    for pid in "${node_pids[@]}"; do
        stop_pid "$pid"
    done
    node_pids=()
    node_addrs=()
}

# Loads scripts/test-services.sh (start/stop of throwaway PostgreSQL and Redis) once.
source_services() {
    if ((!services_sourced)); then
        # shellcheck source=scripts/test-services.sh
        source "$repo_root/scripts/test-services.sh"
        ensure_packages
        services_sourced=1
    fi
}

# shellcheck disable=SC2317  # invoked from the EXIT trap
cleanup() {
    local rc=$?
    stop_server
    stop_nodes
    if ((redis_started)); then
        stop_redis || true
    fi
    if ((pg_started)); then
        stop_postgres || true
    fi
    [[ -n $work_dir ]] && rm -rf "$work_dir"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- build
say "cargo build --release -p roomcast -p roomcast-bench"
cargo build --release -p roomcast -p roomcast-bench

# ---------------------------------------------------------------- store
work_dir=$(mktemp -d /tmp/roomcast-bench.XXXXXX)
case $postgres in
"")
    store_name="SQLite (temp dir, synchronous=full)"
    ;;
auto)
    source_services
    pg_started=1
    start_postgres
    store_name="PostgreSQL (throwaway, scripts/test-services.sh)"
    ;;
*)
    store_name="PostgreSQL (--postgres)"
    ;;
esac

# ---------------------------------------------------------------- limits
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fd_limit=$(ulimit -n)
most=$idle
((storm > most)) && most=$storm
((rooms_subscribers > most)) && most=$rooms_subscribers
((live_viewers > most)) && most=$live_viewers
need=$((most + 200))
if [[ $fd_limit != unlimited ]] && ((fd_limit < need)); then
    echo "bench.sh: the open-files limit is $fd_limit but $most connections need about $need; raise the hard limit (ulimit -Hn)" >&2
    exit 1
fi

out=${BENCH_OUT:-target/bench/results-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
mkdir -p "$(dirname "$out")"
: >"$out"
# Each server's log is kept next to the results: <results>.<scenario>.server.log.
log_prefix=${out%.jsonl}

# Starts a fresh server for run $1 (further arguments: VAR=VALUE settings that
# override the defaults below); sets server_pid and addr.
start_server() {
    local name=$1 store_url port ready=0
    shift
    case $postgres in
    "") store_url="sqlite://$work_dir/$name.db" ;;
    auto) store_url=$ROOMCAST_TEST_POSTGRES_URL ;;
    *) store_url=$postgres ;;
    esac
    port=$(python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
    addr="127.0.0.1:$port"
    env ROOMCAST_SERVER__LISTEN="$addr" \
        ROOMCAST_STORE__URL="$store_url" \
        ROOMCAST_LOG__LEVEL=warn \
        ROOMCAST_REALTIME__SEND_RATE_PER_SEC=1000000 \
        ROOMCAST_REALTIME__SEND_BURST=1000000 \
        ROOMCAST_AUTH__SIGN_UP_IP_PER_HOUR=0 \
        ROOMCAST_AUTH__SIGN_IN_IP_PER_MINUTE=0 \
        ROOMCAST_SERVER__MAX_CONNECTIONS=10000000 \
        ROOMCAST_REALTIME__MAX_CONNECTIONS_PER_IP=0 \
        ROOMCAST_REALTIME__MAX_CONNECTIONS_PER_USER=0 \
        ROOMCAST_REALTIME__MAX_UNAUTHENTICATED=0 \
        ROOMCAST_AUTH__ARGON2_MEMORY_KIB=64 \
        ROOMCAST_AUTH__ARGON2_ITERATIONS=1 \
        "$@" \
        "${server_cmd[@]}" serve >"$log_prefix.$name.server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 300); do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            echo "bench.sh: the server exited during start-up:" >&2
            cat "$log_prefix.$name.server.log" >&2
            server_pid=""
            exit 1
        fi
        # No proxy handler: the readiness probe must go to loopback whatever *_proxy says.
        if python3 -c "import urllib.request, sys
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
sys.exit(0 if opener.open('http://$addr/readyz', timeout=1).status == 200 else 1)" 2>/dev/null; then
            ready=1
            break
        fi
        sleep 0.1
    done
    if ((!ready)); then
        echo "bench.sh: the server did not become ready within 30 s" >&2
        exit 1
    fi
    echo "server pid $server_pid on $addr ($store_name), open-files limit $fd_limit" >&2
}

# ---------------------------------------------------------------- scenarios
status=0

# Other work on this machine skews every number: say how busy it was.
if busy=$(pgrep -x rustc 2>/dev/null | wc -l) && ((busy > 0)); then
    echo "bench.sh: warning: $busy rustc processes are running; results will be noisy" >&2
fi

# run_scenario LABEL SUBCOMMAND ARGS...: LABEL runs `repeat` times, each on a fresh
# server.
run_scenario() {
    local label=$1 sub=$2
    shift 2
    if [[ -n $only && ",$only," != *",$label,"* ]]; then
        return 0
    fi
    local n
    for n in $(seq 1 "$repeat"); do
        run_once "$label" "$n" "$sub" "$@"
    done
}

run_once() {
    local label=$1 n=$2 sub=$3 rc=0
    shift 3
    local name=$label.$n
    start_server "$name"
    # Watch for compilers while the scenario runs (the watcher ends with the server).
    local busy_flag=$work_dir/$name.busy
    (
        while kill -0 "$server_pid" 2>/dev/null; do
            pgrep -x rustc >/dev/null 2>&1 && : >"$busy_flag"
            sleep 1
        done
    ) &
    local watcher=$!
    say "[$label run $n/$repeat] roomcast-bench $sub $* (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    "${bench_cmd[@]}" --server "$addr" --server-pid "$server_pid" --codec "$codec" \
        "$sub" "$@" | tee "$work_dir/$name.out" || rc=$?
    grep '^{' "$work_dir/$name.out" |
        sed "s/^{/{\"label\":\"$label\",\"run\":$n,\"pinned\":$([[ $pin == 1 ]] && echo true || echo false),/" >>"$out" || true
    if ((rc != 0)); then
        echo "bench.sh: scenario $label exited with $rc" >&2
        status=1
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "bench.sh: the server died during $label:" >&2
        tail -50 "$log_prefix.$name.server.log" >&2
        server_pid=""
        exit 1
    fi
    stop_server
    wait "$watcher" 2>/dev/null || true
    if [[ -e $busy_flag ]]; then
        echo "bench.sh: warning: rustc ran during $label; its numbers are noisy" >&2
    fi
    local log=$log_prefix.$name.server.log
    if [[ -s $log ]]; then
        say "the server logged $(wc -l <"$log") lines during $label (full log: $log); the first ones:"
        head -5 "$log" | cut -c1-300 >&2
        if grep -q 'panicked' "$log"; then
            echo "bench.sh: the server panicked during $label:" >&2
            grep -m3 -A2 'panicked' "$log" >&2
        fi
    fi
}

run_scenario sends sends --senders "$senders" --messages "$messages" --timeout 300
run_scenario sends-pipelined sends --senders "$pipe_senders" --messages "$pipe_messages" \
    --in-flight "$pipe_in_flight" --timeout 300
run_scenario sends-rooms sends --senders "$pipe_senders" --messages "$pipe_messages" \
    --in-flight "$pipe_in_flight" --rooms 100 --timeout 600
run_scenario fanout fanout --subscribers "$subscribers" --publishers "$publishers" \
    --rate "$rate" --duration "$duration" --timeout 300
run_scenario fanout-sse fanout --transport sse --subscribers "$subscribers" \
    --publishers "$publishers" --rate "$rate" --duration "$duration" --timeout 300
# One account per poller: poll.max_waiting_per_user (16) bounds a user's waiting polls.
run_scenario fanout-poll fanout --transport poll --subscribers "$subscribers" \
    --subscriber-users "$subscribers" --publishers "$publishers" --rate "$rate" \
    --duration "$duration" --timeout 300
run_scenario live fanout --live --anonymous --batch --subscribers "$live_viewers" \
    --publishers "$publishers" --rate "$live_rate" --duration "$live_duration" --timeout 600
run_scenario live-burst fanout --live --anonymous --batch --subscribers 2000 \
    --publishers "$publishers" --rate 200 --duration "$duration" --timeout 300
run_scenario rooms fanout --rooms "$rooms" --subscribers "$rooms_subscribers" \
    --subscriber-users 200 --publishers "$publishers" --rate "$rooms_rate" \
    --duration "$duration" --timeout 600
run_scenario idle idle --connections "$idle" --concurrency 64 --timeout 900
run_scenario storm idle --connections "$storm" --subscribe --concurrency 256 \
    --hold 1 --timeout 900

# run_cluster LABEL NODES BROKER: the cluster-live load on NODES fresh servers
# sharing one PostgreSQL, linked by the throwaway Redis when BROKER is redis; the
# bench spreads viewers and publishers over them round robin.
run_cluster() {
    local label=$1 nodes=$2 broker=$3 n i rc
    for n in $(seq 1 "$repeat"); do
        local name=$label.$n servers="" pids=""
        for ((i = 0; i < nodes; i++)); do
            local settings=(ROOMCAST_STORE__URL="$cluster_store")
            if [[ $broker == redis ]]; then
                settings+=(
                    ROOMCAST_CLUSTER__BROKER=redis
                    ROOMCAST_CLUSTER__REDIS_URL="$ROOMCAST_TEST_REDIS_URL"
                    ROOMCAST_CLUSTER__CHANNEL_PREFIX="bench-$name:"
                    ROOMCAST_CLUSTER__NODE_ID="node$i"
                )
            fi
            start_server "$name.node$i" "${settings[@]}"
            node_pids+=("$server_pid")
            node_addrs+=("$addr")
            server_pid=""
        done
        servers=$(IFS=,; echo "${node_addrs[*]}")
        pids=$(IFS=,; echo "${node_pids[*]}")
        local busy_before
        busy_before=$(pgrep -x rustc 2>/dev/null | wc -l || true)
        say "[$label run $n/$repeat] $nodes node(s), broker $broker: roomcast-bench fanout on $servers (load average: $(cut -d' ' -f1-3 /proc/loadavg); rustc processes: $busy_before)"
        rc=0
        "${bench_cmd[@]}" --server "$servers" --server-pid "$pids" --codec "$codec" \
            fanout --live --anonymous --batch --subscribers "$cluster_viewers" \
            --publishers "$cluster_publishers" --rate "$cluster_rate" \
            --duration "$cluster_duration" --timeout 600 | tee "$work_dir/$name.out" || rc=$?
        grep '^{' "$work_dir/$name.out" |
            sed "s/^{/{\"label\":\"$label\",\"run\":$n,\"nodes\":$nodes,\"broker\":\"$broker\",\"pinned\":false,/" >>"$out" || true
        if ((rc != 0)); then
            echo "bench.sh: scenario $label exited with $rc" >&2
            status=1
        fi
        for ((i = 0; i < nodes; i++)); do
            if ! kill -0 "${node_pids[$i]}" 2>/dev/null; then
                echo "bench.sh: node $i died during $label:" >&2
                tail -50 "$log_prefix.$name.node$i.server.log" >&2
                status=1
            elif grep -q 'panicked' "$log_prefix.$name.node$i.server.log"; then
                echo "bench.sh: node $i panicked during $label:" >&2
                grep -m3 -A2 'panicked' "$log_prefix.$name.node$i.server.log" >&2
                status=1
            fi
        done
        stop_nodes
    done
}

if [[ -z $only || ",$only," == *",cluster-live,"* ]]; then
    if ((pin)); then
        echo "bench.sh: cluster-live runs unpinned (three nodes and the bench share the cores); --pin ignored for it" >&2
    fi
    cluster_store_name=$store_name
    cluster_server_cmd=("${server_cmd[@]}")
    cluster_bench_cmd=("${bench_cmd[@]}")
    server_cmd=("$server_bin")
    bench_cmd=(target/release/roomcast-bench)
    source_services
    if [[ -z $postgres ]]; then
        start_postgres
        pg_started=1
        cluster_store=$ROOMCAST_TEST_POSTGRES_URL
    elif [[ $postgres == auto ]]; then
        cluster_store=$ROOMCAST_TEST_POSTGRES_URL
    else
        cluster_store=$postgres
    fi
    start_redis
    redis_started=1
    store_name="PostgreSQL (${cluster_store%%@*}@...), Redis $ROOMCAST_TEST_REDIS_URL"
    ((cluster_viewers + 200 <= ${fd_limit/unlimited/10000000})) || {
        echo "bench.sh: the open-files limit is $fd_limit, too low for $cluster_viewers viewers" >&2
        exit 1
    }
    run_cluster cluster-live-3 3 redis
    run_cluster cluster-live-1redis 1 redis
    run_cluster cluster-live-1local 1 local
    stop_redis || true
    redis_started=0
    store_name=$cluster_store_name
    server_cmd=("${cluster_server_cmd[@]}")
    bench_cmd=("${cluster_bench_cmd[@]}")
fi

say "results ($store_name, $codec codec$( ((pin)) && echo ", server on CPU 0, bench on CPU 1")) in $out"
cat "$out"
if ((repeat > 1)); then
    say "medians of $repeat runs"
    python3 "$repo_root/scripts/bench-medians.py" "$out" || true
fi
exit "$status"
