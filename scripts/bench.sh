#!/usr/bin/env bash
# roomcast's benchmarks (see BENCHMARKS.md), on this machine only:
#
#     scripts/bench.sh                      # SQLite in a temp dir
#     scripts/bench.sh --postgres URL       # an existing PostgreSQL database
#     scripts/bench.sh --postgres auto      # a throwaway PostgreSQL (scripts/test-services.sh)
#     scripts/bench.sh --only fanout        # one scenario (sends, fanout or idle)
#
# Steps: `cargo build --release --bins`; then for each scenario a fresh server:
# start target/release/roomcast on a free 127.0.0.1 port with its own SQLite file
# in a temp dir, log level warn and the per-user send limit lifted
# (ROOMCAST_REALTIME__SEND_RATE_PER_SEC / _SEND_BURST = 1000000: the default 20/s
# would refuse most benchmark sends) and the connection caps lifted (every
# bench connection comes from 127.0.0.1; server.max_connections is still fitted
# under the open-files limit); run the scenario with
# target/release/roomcast-bench; stop that server by its PID. The temp dir goes at
# the end. Nothing else is started or stopped, and every connection goes to
# 127.0.0.1. A fresh server per scenario keeps one scenario's freed memory and
# rooms from flattering the next (idle's KiB per connection above all).
#
# The open-files limit is raised to the hard limit (`ulimit -n`) for the server
# and the bench: each idle connection is one descriptor on each side.
#
# Sizes (moderate, for a 2-core machine) can be changed with environment variables:
#     BENCH_SENDERS=10 BENCH_MESSAGES=500                      sends
#     BENCH_SUBSCRIBERS=1000 BENCH_PUBLISHERS=2 BENCH_RATE=200 BENCH_DURATION=10   fanout
#     BENCH_IDLE=2000                                          idle
#     BENCH_CODEC=proto                                        proto or json
# Results: the bench's summaries on stdout, and the JSON lines (one per scenario)
# again at the end and in $BENCH_OUT (default target/bench/results-<time>.jsonl);
# each scenario's server log (level warn) beside it as <results>.<scenario>.server.log.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

postgres=""
only=""
while (($# > 0)); do
    case $1 in
    --postgres)
        postgres=${2:?--postgres needs a URL or "auto"}
        shift 2
        ;;
    --only)
        only=${2:?--only needs sends, fanout or idle}
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
rate=${BENCH_RATE:-200}
duration=${BENCH_DURATION:-10}
idle=${BENCH_IDLE:-2000}
codec=${BENCH_CODEC:-proto}

say() { printf '\n==> %s\n' "$*" >&2; }

server_pid=""
work_dir=""
pg_started=0

# Stops the server this script started (by its PID), if it runs.
stop_server() {
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$server_pid" 2>/dev/null; then
            echo "the server did not stop within 10 s; killing pid $server_pid" >&2
            kill -KILL "$server_pid" 2>/dev/null || true
        fi
        wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
}

# shellcheck disable=SC2317  # invoked from the EXIT trap
cleanup() {
    local rc=$?
    stop_server
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
say "cargo build --release --bins"
cargo build --release --bins

# ---------------------------------------------------------------- store
work_dir=$(mktemp -d /tmp/roomcast-bench.XXXXXX)
case $postgres in
"")
    store_name="SQLite (temp dir, synchronous=full)"
    ;;
auto)
    # shellcheck source=scripts/test-services.sh
    source "$repo_root/scripts/test-services.sh"
    ensure_packages
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
need=$((idle + 200))
if [[ $fd_limit != unlimited ]] && ((fd_limit < need)); then
    echo "bench.sh: the open-files limit is $fd_limit but $idle idle connections need about $need; raise the hard limit (ulimit -Hn)" >&2
    exit 1
fi

out=${BENCH_OUT:-target/bench/results-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
mkdir -p "$(dirname "$out")"
: >"$out"
# Each server's log is kept next to the results: <results>.<scenario>.server.log.
log_prefix=${out%.jsonl}

# Starts a fresh server for scenario $1; sets server_pid and addr.
start_server() {
    local name=$1 store_url port ready=0
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
    ROOMCAST_SERVER__LISTEN="$addr" \
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
        target/release/roomcast serve >"$log_prefix.$name.server.log" 2>&1 &
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

run_scenario() {
    local name=$1 rc=0
    shift
    if [[ -n $only && $only != "$name" ]]; then
        return 0
    fi
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
    say "roomcast-bench $name $* (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    target/release/roomcast-bench --server "$addr" --server-pid "$server_pid" --codec "$codec" \
        "$name" "$@" | tee "$work_dir/$name.out" || rc=$?
    grep '^{' "$work_dir/$name.out" >>"$out" || true
    if ((rc != 0)); then
        echo "bench.sh: scenario $name exited with $rc" >&2
        status=1
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "bench.sh: the server died during $name:" >&2
        tail -50 "$log_prefix.$name.server.log" >&2
        server_pid=""
        exit 1
    fi
    stop_server
    wait "$watcher" 2>/dev/null || true
    if [[ -e $busy_flag ]]; then
        echo "bench.sh: warning: rustc ran during $name; its numbers are noisy" >&2
    fi
    local log=$log_prefix.$name.server.log
    if [[ -s $log ]]; then
        say "the server logged $(wc -l <"$log") lines during $name (full log: $log); the first ones:"
        head -5 "$log" | cut -c1-300 >&2
        if grep -q 'panicked' "$log"; then
            echo "bench.sh: the server panicked during $name:" >&2
            grep -m3 -A2 'panicked' "$log" >&2
        fi
    fi
}

run_scenario sends --senders "$senders" --messages "$messages" --timeout 300
run_scenario fanout --subscribers "$subscribers" --publishers "$publishers" \
    --rate "$rate" --duration "$duration" --timeout 300
run_scenario idle --connections "$idle" --timeout 600

say "results ($store_name, $codec codec) in $out"
cat "$out"
exit "$status"
