#!/usr/bin/env bash
# Throwaway PostgreSQL and Redis instances for roomcast's tests, the nginx binary
# the reverse-proxy tests run (each such test starts and stops its own nginx), and
# a roomcast server for the Node.js suites (start_test_server / stop_test_server).
#
# As a library (what scripts/test.sh does):
#     source scripts/test-services.sh
#     ensure_packages
#     trap stop_services EXIT
#     start_postgres     # exports ROOMCAST_TEST_POSTGRES_URL
#     start_redis        # exports ROOMCAST_TEST_REDIS_URL
#
# As a command, for a developer shell:
#     eval "$(scripts/test-services.sh start)"   # prints `export ...` lines
#     cargo test ...
#     scripts/test-services.sh stop              # uses the exported ROOMCAST_TEST_* state
#
# Each instance lives in its own `mktemp -d /tmp/roomcast-*` directory, listens
# only on 127.0.0.1 on a free port, and is stopped by its recorded PID only:
# nothing here touches the distro's system services or any process it did not
# start. Progress goes to stderr; in `start` mode stdout carries only exports.
#
# State, exported so that `stop` works from another process too:
#     ROOMCAST_TEST_POSTGRES_URL  postgres://postgres@127.0.0.1:PORT/roomcast_test
#     ROOMCAST_TEST_PG_DIR        temp dir (data dir in $DIR/data, socket in $DIR/sock)
#     ROOMCAST_TEST_PG_PID        postmaster PID
#     ROOMCAST_TEST_REDIS_URL     redis://127.0.0.1:PORT/
#     ROOMCAST_TEST_REDIS_DIR     temp dir (log in $DIR/redis.log)
#     ROOMCAST_TEST_REDIS_PID     redis-server PID
#     ROOMCAST_TEST_NGINX         the nginx binary (tests/nginx.rs starts its own)
#
# Optional input: ROOMCAST_PG_BIN = a PostgreSQL bin dir (default: newest
# /usr/lib/postgresql/*/bin holding pg_ctl and initdb).
#
# Also `ensure_node` (used by scripts/connect-es-test.sh): installs Node.js and npm
# with apt when missing (Debian's own `nodejs` + `npm` packages do), and makes a
# `node` command available when the distribution only installed `nodejs`.

# Functions never rely on the caller's `set -e`; each checks its own steps.

_rc_log() { printf '[test-services] %s\n' "$*" >&2; }
_rc_die() {
    printf '[test-services] ERROR: %s\n' "$*" >&2
    return 1
}

ROOMCAST_TEST_DB_NAME=${ROOMCAST_TEST_DB_NAME:-roomcast_test}
# Seconds to wait for a server to accept connections.
ROOMCAST_TEST_WAIT_SECS=${ROOMCAST_TEST_WAIT_SECS:-30}

# ---------------------------------------------------------------- packages

# Print the newest PostgreSQL server bin dir, or nothing.
_rc_pg_bin() {
    if [[ -n ${ROOMCAST_PG_BIN:-} ]]; then
        [[ -x $ROOMCAST_PG_BIN/pg_ctl && -x $ROOMCAST_PG_BIN/initdb ]] && printf '%s\n' "$ROOMCAST_PG_BIN"
        return 0
    fi
    local d best=
    while IFS= read -r d; do
        [[ -x $d/pg_ctl && -x $d/initdb && -x $d/postgres ]] && best=$d
    done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -V)
    [[ -n $best ]] && printf '%s\n' "$best"
    return 0
}

_rc_missing_packages() {
    local missing=()
    [[ -n $(_rc_pg_bin) ]] || missing+=(postgresql)
    if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
        missing+=(redis-server)
    fi
    [[ -n $(nginx_bin) ]] || missing+=(nginx)
    printf '%s\n' "${missing[@]}"
}

# The nginx binary (Debian puts it in /usr/sbin, often not on a user's PATH).
nginx_bin() {
    local found
    found=$(command -v nginx 2>/dev/null) || found=""
    [[ -z $found && -x /usr/sbin/nginx ]] && found=/usr/sbin/nginx
    printf '%s\n' "$found"
}

# Install PostgreSQL server, Redis and nginx from apt if they are not there yet.
ensure_packages() {
    local missing
    mapfile -t missing < <(_rc_missing_packages | sed '/^$/d')
    if ((${#missing[@]} == 0)); then
        _rc_log "postgresql ($(_rc_pg_bin)), redis-server and nginx ($(nginx_bin)) already installed"
        return 0
    fi
    _rc_log "installing ${missing[*]} (and their dependencies) with apt-get"

    local -a sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null 2>&1 || _rc_die "not root and no sudo: cannot apt-get install ${missing[*]}" || return 1
        sudo=(sudo env DEBIAN_FRONTEND=noninteractive)
    fi
    command -v apt-get >/dev/null 2>&1 || _rc_die "apt-get not found: install ${missing[*]} by hand" || return 1

    # The names in `missing` are the Debian/Ubuntu package names.
    local log packages=("${missing[@]}")
    log=$(mktemp /tmp/roomcast-apt.XXXXXX.log) || return 1
    if ! "${sudo[@]}" apt-get update -q >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        rm -f "$log"
        _rc_die "apt-get update failed (output above)"
        return 1
    fi
    if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q -o Dpkg::Use-Pty=0 "${packages[@]}" >>"$log" 2>&1; then
        tail -n 60 "$log" >&2
        rm -f "$log"
        _rc_die "apt-get install ${packages[*]} failed (output above)"
        return 1
    fi
    rm -f "$log"

    mapfile -t missing < <(_rc_missing_packages | sed '/^$/d')
    ((${#missing[@]} == 0)) || _rc_die "still missing after apt-get install: ${missing[*]}" || return 1
    _rc_log "installed ${packages[*]}: postgresql ($(_rc_pg_bin)), $(redis-server --version | cut -d' ' -f1-3), $("$(nginx_bin)" -v 2>&1)"
}

# ---------------------------------------------------------------- Node.js

# Oldest Node.js major version the connect-es step runs on (Debian 12's own
# package is 18).
ROOMCAST_NODE_MIN_MAJOR=${ROOMCAST_NODE_MIN_MAJOR:-18}

# apt-get install PACKAGES... as root, or through sudo; quiet unless it fails.
_rc_apt_install() {
    local -a sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null 2>&1 || _rc_die "not root and no sudo: cannot apt-get install $*" || return 1
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null 2>&1 || _rc_die "apt-get not found: install $* by hand" || return 1
    local log
    log=$(mktemp /tmp/roomcast-apt.XXXXXX.log) || return 1
    if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        rm -f "$log"
        _rc_die "apt-get update failed (output above)"
        return 1
    fi
    if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q -o Dpkg::Use-Pty=0 "$@" >>"$log" 2>&1; then
        tail -n 60 "$log" >&2
        rm -f "$log"
        _rc_die "apt-get install $* failed (output above)"
        return 1
    fi
    rm -f "$log"
}

# Make `node`, `npm` and `npx` available: install the distribution's nodejs and npm
# packages when missing, and when only a `nodejs` binary exists (as older Debian
# packages installed it), put a `node` link to it first on PATH (in a temp dir
# that ROOMCAST_NODE_SHIM_DIR names; remove it when done). Fails when the version
# is older than ROOMCAST_NODE_MIN_MAJOR.
ensure_node() {
    local -a missing=()
    if ! command -v node >/dev/null 2>&1 && ! command -v nodejs >/dev/null 2>&1; then
        missing+=(nodejs)
    fi
    # Debian packages npm (with npx) apart from nodejs; NodeSource's nodejs bundles it.
    if ! command -v npm >/dev/null 2>&1 || ! command -v npx >/dev/null 2>&1; then
        missing+=(npm)
    fi
    if ((${#missing[@]} > 0)); then
        _rc_log "installing ${missing[*]} with apt-get (the connect-es test needs Node.js and npm)"
        _rc_apt_install "${missing[@]}" || return 1
    fi
    if ! command -v node >/dev/null 2>&1; then
        local nodejs
        nodejs=$(command -v nodejs 2>/dev/null) || _rc_die "neither node nor nodejs is on PATH after installing" || return 1
        ROOMCAST_NODE_SHIM_DIR=$(mktemp -d /tmp/roomcast-node.XXXXXX) || return 1
        export ROOMCAST_NODE_SHIM_DIR
        ln -s "$nodejs" "$ROOMCAST_NODE_SHIM_DIR/node" || return 1
        export PATH="$ROOMCAST_NODE_SHIM_DIR:$PATH"
        _rc_log "only 'nodejs' is installed; using it as 'node' ($nodejs)"
    fi
    local version major
    version=$(node --version 2>/dev/null) || _rc_die "'node --version' failed" || return 1
    major=${version#v}
    major=${major%%.*}
    if ! [[ $major =~ ^[0-9]+$ ]] || ((major < ROOMCAST_NODE_MIN_MAJOR)); then
        _rc_die "node $version is too old: the connect-es test needs Node.js >= $ROOMCAST_NODE_MIN_MAJOR"
        return 1
    fi
    command -v npm >/dev/null 2>&1 || _rc_die "npm is still missing" || return 1
    _rc_log "node $version, npm $(npm --version 2>/dev/null)"
}

# Remove what ensure_node added (the `node` link dir), if anything.
cleanup_node() {
    local dir=${ROOMCAST_NODE_SHIM_DIR:-}
    if [[ -n $dir && $dir == /tmp/roomcast-node.* && -d $dir ]]; then
        rm -rf -- "$dir"
    fi
    unset ROOMCAST_NODE_SHIM_DIR
}

# ---------------------------------------------------------------- helpers

# Print a TCP port on 127.0.0.1 that nothing listens on right now.
_rc_free_port() {
    local port
    if command -v python3 >/dev/null 2>&1 &&
        port=$(python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' 2>/dev/null) && [[ $port =~ ^[0-9]+$ ]]; then
        printf '%s\n' "$port"
        return 0
    fi
    # No python3: try random high ports, keep one nothing answers on.
    local i
    for ((i = 0; i < 100; i++)); do
        port=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            printf '%s\n' "$port"
            return 0
        fi
    done
    _rc_die "could not find a free TCP port"
}

# True if PID is running (not a zombie waiting to be reaped).
_rc_pid_alive() {
    local pid=$1 stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 0 # no /proc: trust kill -0
    stat=${stat##*) }                                      # "S ..." after "pid (comm) "
    [[ ${stat%% *} != Z ]]
}

# True if PID is running and its /proc/PID/comm starts with NAME.
_rc_pid_is() {
    local pid=$1 name=$2 comm
    _rc_pid_alive "$pid" || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 0
    [[ $comm == "$name"* ]]
}

# Wait up to SECS (default 10) for PID to exit; with "kill", SIGKILL it after.
_rc_wait_gone() {
    local pid=$1 secs=${2:-10} mode=${3:-kill} i
    for ((i = 0; i < secs * 10; i++)); do
        _rc_pid_alive "$pid" || return 0
        sleep 0.1
    done
    [[ $mode == kill ]] || return 1
    _rc_log "PID $pid did not exit in ${secs}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
}

# ---------------------------------------------------------------- PostgreSQL

# Run a PostgreSQL server binary as an unprivileged user (postgres refuses root).
_rc_pg_as_owner() {
    if ((EUID == 0)); then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && "$@")
    fi
}

start_postgres() {
    if [[ -n ${ROOMCAST_TEST_PG_PID:-} ]] && _rc_pid_is "$ROOMCAST_TEST_PG_PID" postgres; then
        _rc_log "postgres already running (PID $ROOMCAST_TEST_PG_PID): $ROOMCAST_TEST_POSTGRES_URL"
        return 0
    fi
    local bin
    bin=$(_rc_pg_bin)
    [[ -n $bin ]] || _rc_die "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (run ensure_packages)" || return 1
    if ((EUID == 0)) && ! id postgres >/dev/null 2>&1; then
        _rc_die "running as root but there is no 'postgres' OS user to run the server as" || return 1
    fi

    local dir
    dir=$(mktemp -d /tmp/roomcast-pg.XXXXXX) || return 1
    export ROOMCAST_TEST_PG_DIR=$dir
    mkdir -p "$dir/data" "$dir/sock" || return 1
    if ((EUID == 0)); then
        chown -R postgres: "$dir" || return 1
    fi
    chmod 700 "$dir/data"

    _rc_log "initdb ($bin) into $dir/data"
    if ! _rc_pg_as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust \
        --encoding=UTF8 --no-locale --no-sync >"$dir/initdb.log" 2>&1; then
        cat "$dir/initdb.log" >&2
        _rc_die "initdb failed (output above)"
        return 1
    fi

    local attempt port pid='' started=''
    for attempt in 1 2 3 4 5; do
        port=$(_rc_free_port) || return 1
        _rc_log "starting postgres on 127.0.0.1:$port (attempt $attempt)"
        if _rc_pg_as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w \
            -t "$ROOMCAST_TEST_WAIT_SECS" -s \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $dir/sock -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
            start </dev/null >>"$dir/pg_ctl.log" 2>&1; then
            pid=$(head -n 1 "$dir/data/postmaster.pid" 2>/dev/null)
            if _rc_pid_is "$pid" postgres; then
                started=1
                break
            fi
        fi
        # Port taken between picking and binding, or a slow start: clean up, retry.
        _rc_pg_as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -s stop >/dev/null 2>&1 || true
        tail -n 5 "$dir/postgres.log" >&2 2>/dev/null || true
    done
    if [[ -z $started ]]; then
        tail -n 30 "$dir/postgres.log" "$dir/pg_ctl.log" >&2 2>/dev/null || true
        _rc_die "postgres did not start (logs above)"
        return 1
    fi
    export ROOMCAST_TEST_PG_PID=$pid

    # Bounded readiness check on the TCP address the tests use.
    local i ready=
    for ((i = 0; i < ROOMCAST_TEST_WAIT_SECS * 5; i++)); do
        if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -t 2; then
            ready=1
            break
        fi
        sleep 0.2
    done
    [[ -n $ready ]] || _rc_die "postgres (PID $pid) not ready after ${ROOMCAST_TEST_WAIT_SECS}s; log: $dir/postgres.log" || return 1

    # The server on that port must be ours (same data directory).
    local datadir
    datadir=$("$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -XtAqc 'SHOW data_directory' 2>/dev/null)
    [[ $datadir == "$dir/data" ]] || _rc_die "127.0.0.1:$port answers with data_directory '$datadir', not $dir/data" || return 1

    if ! "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres "$ROOMCAST_TEST_DB_NAME" >>"$dir/pg_ctl.log" 2>&1; then
        tail -n 5 "$dir/pg_ctl.log" >&2
        _rc_die "createdb $ROOMCAST_TEST_DB_NAME failed"
        return 1
    fi

    export ROOMCAST_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/$ROOMCAST_TEST_DB_NAME"
    _rc_log "postgres ready (PID $pid): $ROOMCAST_TEST_POSTGRES_URL"
}

stop_postgres() {
    local dir=${ROOMCAST_TEST_PG_DIR:-} pid=${ROOMCAST_TEST_PG_PID:-} bin
    [[ -n $dir || -n $pid ]] || return 0
    bin=$(_rc_pg_bin)

    if [[ -n $dir && -f $dir/data/postmaster.pid && -n $bin ]]; then
        _rc_log "stopping postgres (data dir $dir/data)"
        _rc_pg_as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 20 -s stop >/dev/null 2>&1 || true
    fi
    # Whatever pg_ctl could not do: only the recorded postmaster PID, and only
    # if it still is a postgres process.
    if [[ -n $pid ]] && _rc_pid_is "$pid" postgres && ! _rc_wait_gone "$pid" 5 nokill; then
        _rc_log "postmaster PID $pid still alive; sending SIGTERM"
        kill -TERM "$pid" 2>/dev/null || true
        _rc_wait_gone "$pid"
    fi
    if [[ -n $dir && -d $dir && $dir == /tmp/roomcast-pg.* ]]; then
        rm -rf -- "$dir"
    fi
    unset ROOMCAST_TEST_PG_DIR ROOMCAST_TEST_PG_PID ROOMCAST_TEST_POSTGRES_URL
}

# ---------------------------------------------------------------- roomcast
# A roomcast server for the end-to-end suites (scripts/connect-es-test.sh,
# scripts/web-test.sh):
#
#     start_test_server BIN DIR [NAME=VALUE ...]
#         starts BIN on a free 127.0.0.1 port with a throw-away SQLite store in DIR,
#         the send and sign-up/sign-in limits lifted (the suites sign up and send
#         quickly from one address), log level warn (ROOMCAST_LOG__LEVEL), plus the
#         given environment; output in DIR/server.log. Waits up to 30 s for
#         /healthz. Sets ROOMCAST_TEST_SERVER_PID and ROOMCAST_TEST_SERVER_URL.
#     stop_test_server RC
#         stops that server by its PID (TERM, then KILL after 5 s); when RC is not
#         0, prints the last lines of its log.

start_test_server() {
    local bin=$1 dir=$2 port
    shift 2
    port=$(_rc_free_port) || return 1
    ROOMCAST_TEST_SERVER_URL="http://127.0.0.1:$port"
    ROOMCAST_TEST_SERVER_LOG="$dir/server.log"
    _rc_log "starting $bin on $ROOMCAST_TEST_SERVER_URL (store in $dir)"
    env -u ROOMCAST_CONFIG \
        ROOMCAST_SERVER__LISTEN="127.0.0.1:$port" \
        ROOMCAST_STORE__URL="sqlite://$dir/roomcast.db" \
        ROOMCAST_REALTIME__SEND_RATE_PER_SEC=1000 \
        ROOMCAST_REALTIME__SEND_BURST=1000 \
        ROOMCAST_AUTH__SIGN_UP_IP_PER_HOUR=0 \
        ROOMCAST_AUTH__SIGN_IN_IP_PER_MINUTE=0 \
        ROOMCAST_LOG__LEVEL="${ROOMCAST_LOG__LEVEL:-warn}" \
        "$@" \
        "$bin" serve >"$ROOMCAST_TEST_SERVER_LOG" 2>&1 &
    ROOMCAST_TEST_SERVER_PID=$!
    local _
    for _ in $(seq 1 150); do # up to ~30 s
        if ! kill -0 "$ROOMCAST_TEST_SERVER_PID" 2>/dev/null; then
            _rc_die "the server exited during start-up (log: $ROOMCAST_TEST_SERVER_LOG)"
            return 1
        fi
        if curl -fsS --max-time 1 "$ROOMCAST_TEST_SERVER_URL/healthz" >/dev/null 2>&1; then
            _rc_log "server is up (pid $ROOMCAST_TEST_SERVER_PID)"
            return 0
        fi
        sleep 0.2
    done
    _rc_die "$ROOMCAST_TEST_SERVER_URL/healthz did not answer within 30 s"
}

stop_test_server() {
    local rc=${1:-0} pid=${ROOMCAST_TEST_SERVER_PID:-} _
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    ROOMCAST_TEST_SERVER_PID=""
    if ((rc != 0)) && [[ -s ${ROOMCAST_TEST_SERVER_LOG:-} ]]; then
        printf -- '---- last lines of the roomcast server log (%s) ----\n' "$ROOMCAST_TEST_SERVER_LOG" >&2
        tail -n 40 "$ROOMCAST_TEST_SERVER_LOG" >&2 || true
    fi
    return 0
}

# ---------------------------------------------------------------- Redis

start_redis() {
    if [[ -n ${ROOMCAST_TEST_REDIS_PID:-} ]] && _rc_pid_is "$ROOMCAST_TEST_REDIS_PID" redis-server; then
        _rc_log "redis already running (PID $ROOMCAST_TEST_REDIS_PID): $ROOMCAST_TEST_REDIS_URL"
        return 0
    fi
    command -v redis-server >/dev/null 2>&1 || _rc_die "redis-server not found (run ensure_packages)" || return 1
    command -v redis-cli >/dev/null 2>&1 || _rc_die "redis-cli not found (run ensure_packages)" || return 1

    local dir
    dir=$(mktemp -d /tmp/roomcast-redis.XXXXXX) || return 1
    export ROOMCAST_TEST_REDIS_DIR=$dir

    local attempt port pid i info ready=
    for attempt in 1 2 3 4 5; do
        port=$(_rc_free_port) || return 1
        _rc_log "starting redis-server on 127.0.0.1:$port (attempt $attempt)"
        # stdin/stdout/stderr away from the caller so it never holds a pipe open.
        redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
            --daemonize no --dir "$dir" --logfile '' \
            </dev/null >>"$dir/redis.log" 2>&1 &
        pid=$!
        export ROOMCAST_TEST_REDIS_PID=$pid
        for ((i = 0; i < ROOMCAST_TEST_WAIT_SECS * 10; i++)); do
            _rc_pid_alive "$pid" || break # died, e.g. port taken
            # Answered by *our* server (not one that grabbed the port first)?
            if [[ $(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null) == PONG ]] &&
                info=$(redis-cli -h 127.0.0.1 -p "$port" info server 2>/dev/null) &&
                [[ $'\n'${info//$'\r'/}$'\n' == *$'\n'"process_id:$pid"$'\n'* ]]; then
                ready=1
                break
            fi
            sleep 0.1
        done
        [[ -n $ready ]] && break
        if _rc_pid_alive "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            _rc_wait_gone "$pid"
        fi
        wait "$pid" 2>/dev/null || true
        unset ROOMCAST_TEST_REDIS_PID
        tail -n 5 "$dir/redis.log" >&2 2>/dev/null || true
    done
    if [[ -z $ready ]]; then
        tail -n 30 "$dir/redis.log" >&2 2>/dev/null || true
        _rc_die "redis-server did not start (log above)"
        return 1
    fi

    export ROOMCAST_TEST_REDIS_URL="redis://127.0.0.1:$port/"
    _rc_log "redis ready (PID $pid): $ROOMCAST_TEST_REDIS_URL"
}

stop_redis() {
    local dir=${ROOMCAST_TEST_REDIS_DIR:-} pid=${ROOMCAST_TEST_REDIS_PID:-}
    [[ -n $dir || -n $pid ]] || return 0
    if [[ -n $pid ]] && _rc_pid_is "$pid" redis-server; then
        _rc_log "stopping redis-server (PID $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        _rc_wait_gone "$pid"
        wait "$pid" 2>/dev/null || true # reap it if it is our child
    fi
    if [[ -n $dir && -d $dir && $dir == /tmp/roomcast-redis.* ]]; then
        rm -rf -- "$dir"
    fi
    unset ROOMCAST_TEST_REDIS_DIR ROOMCAST_TEST_REDIS_PID ROOMCAST_TEST_REDIS_URL
}

# ---------------------------------------------------------------- both

start_services() {
    start_postgres || return 1
    start_redis || return 1
}

# Stop everything this script started; safe to call twice or when nothing runs.
stop_services() {
    stop_redis || true
    stop_postgres || true
}

# ---------------------------------------------------------------- command mode

_rc_print_exports() {
    local v
    ROOMCAST_TEST_NGINX=${ROOMCAST_TEST_NGINX:-$(nginx_bin)}
    for v in ROOMCAST_TEST_POSTGRES_URL ROOMCAST_TEST_PG_DIR ROOMCAST_TEST_PG_PID \
        ROOMCAST_TEST_REDIS_URL ROOMCAST_TEST_REDIS_DIR ROOMCAST_TEST_REDIS_PID \
        ROOMCAST_TEST_NGINX; do
        [[ -n ${!v:-} ]] && printf 'export %s=%q\n' "$v" "${!v}"
    done
    return 0
}

_rc_main() {
    set -euo pipefail
    case ${1:-} in
    start)
        ensure_packages
        if ! start_services; then
            stop_services
            exit 1
        fi
        _rc_print_exports
        _rc_log "stop with: scripts/test-services.sh stop   (after eval-ing the exports above)"
        ;;
    stop)
        if [[ -z ${ROOMCAST_TEST_PG_DIR:-}${ROOMCAST_TEST_PG_PID:-}${ROOMCAST_TEST_REDIS_DIR:-}${ROOMCAST_TEST_REDIS_PID:-} ]]; then
            _rc_log "nothing to stop: ROOMCAST_TEST_PG_* / ROOMCAST_TEST_REDIS_* are not set"
            exit 0
        fi
        stop_services
        ;;
    ensure-packages)
        ensure_packages
        ;;
    ensure-node)
        ensure_node
        cleanup_node
        ;;
    *)
        echo "usage: $0 start|stop|ensure-packages|ensure-node   (or: source $0)" >&2
        echo "  eval \"\$($0 start)\"; ...; $0 stop" >&2
        exit 2
        ;;
    esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    _rc_main "$@"
fi
