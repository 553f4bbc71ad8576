#!/usr/bin/env bash
# The one command that runs every roomcast check on a fresh machine:
#
#     scripts/test.sh                    # everything (what CI runs via .ci/run)
#     scripts/test.sh -- room_history    # extra args go to `cargo test`
#     scripts/test.sh -- --test api -- --nocapture
#
# Steps: install PostgreSQL + Redis if missing (apt), start private instances
# on free loopback ports, then
#     cargo fmt --all -- --check
#     cargo clippy --workspace --all-targets -- -D warnings
#     cargo test --no-fail-fast --workspace --all-targets [EXTRA...] -- --test-threads=4
#     cargo test --doc            (only when there is a library and no EXTRA)
#     scripts/connect-es-test.sh  (only when no EXTRA: a connect-es client
#                                  generated from src/proto against a live
#                                  server, JSON and binary; needs Node.js >= 18
#                                  and npm, installed with apt if missing)
#     scripts/web-test.sh         (only when no EXTRA: the bundled web client in
#                                  a real headless Chromium against a live server;
#                                  installs Debian's chromium with apt if missing)
#     ../shared/tools/autobahn.sh (only when no EXTRA: the Autobahn WebSocket
#                                  conformance suite against the server's echo
#                                  endpoint, realtime.echo_path; needs Python 2.7)
# with ROOMCAST_TEST_POSTGRES_URL and ROOMCAST_TEST_REDIS_URL exported, so the
# tests run against SQLite and PostgreSQL (and Redis). PostgreSQL is required:
# if it cannot be installed or started the script fails, and
# ROOMCAST_TEST_REQUIRE_POSTGRES=1 makes any test that finds no database fail
# rather than skip; a `SKIPPED` line in the test output fails the run too.
# The connect-es step installs Node.js and npm with apt when they are missing
# (Debian's own packages will do). Every step runs even if
# an earlier one failed; the summary at the end lists each one, and the exit
# status is non-zero if any failed. The services are stopped on any exit.
#
# Environment knobs:
#     ROOMCAST_TEST_THREADS=N     --test-threads for cargo test (default 4)
#     ROOMCAST_TEST_SKIP_LINT=1   skip fmt and clippy (local iteration only)
#     ROOMCAST_TEST_SKIP_CONNECT_ES=1  skip the connect-es step (local iteration only)
#     ROOMCAST_TEST_SKIP_WEB=1         skip the web client step (local iteration only)
#     ROOMCAST_TEST_SKIP_AUTOBAHN=1    skip the autobahn step (local iteration only)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

# ---------------------------------------------------------------- arguments
extra=()
if (($# > 0)); then
    case $1 in
    --) shift ;;
    -h | --help)
        sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    esac
    extra=("$@")
fi

# shellcheck source=scripts/test-services.sh
source "$repo_root/scripts/test-services.sh"

say() { printf '\n==> %s\n' "$*"; }

# shellcheck disable=SC2317  # invoked from the EXIT trap
cleanup() {
    local rc=$?
    stop_services
    [[ -n ${cargo_test_log:-} ]] && rm -f "$cargo_test_log"
    [[ -n ${connect_es_log:-} ]] && rm -f "$connect_es_log"
    [[ -n ${web_log:-} ]] && rm -f "$web_log"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ---------------------------------------------------------------- toolchain + services
say "checking the Rust toolchain"
if ! command -v cargo >/dev/null 2>&1; then
    echo "ERROR: cargo not found on PATH; install a Rust toolchain (https://rustup.rs)" >&2
    exit 1
fi
cargo --version
for comp in fmt clippy; do
    if ! cargo "$comp" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            tool=$([[ $comp == fmt ]] && echo rustfmt || echo clippy)
            echo "cargo $comp missing; rustup component add $tool" >&2
            rustup component add "$tool"
        else
            echo "ERROR: cargo $comp is missing and rustup is not available" >&2
            exit 1
        fi
    fi
done

say "ensuring PostgreSQL, Redis and nginx are installed"
ensure_packages
ROOMCAST_TEST_NGINX=$(nginx_bin)
export ROOMCAST_TEST_NGINX

say "starting PostgreSQL and Redis for the tests"
start_postgres
start_redis
export ROOMCAST_TEST_POSTGRES_URL ROOMCAST_TEST_REDIS_URL
if [[ -z ${ROOMCAST_TEST_POSTGRES_URL:-} ]]; then
    echo "ERROR: PostgreSQL did not start (ROOMCAST_TEST_POSTGRES_URL is empty); the tests need it" >&2
    exit 1
fi
# The PostgreSQL half of the suite must run here: a test that finds no database
# fails instead of skipping (see tests/common/mod.rs).
export ROOMCAST_TEST_REQUIRE_POSTGRES=1
echo "ROOMCAST_TEST_POSTGRES_URL=$ROOMCAST_TEST_POSTGRES_URL"
echo "ROOMCAST_TEST_REDIS_URL=$ROOMCAST_TEST_REDIS_URL"

# ---------------------------------------------------------------- steps
step_names=()
step_results=()
step_secs=()

# run_step NAME CMD... : run, record PASS/FAIL and duration, never abort.
run_step() {
    local name=$1 start rc=0 shown
    shift
    shown=$*
    say "$name: ${shown#cargo_test }"
    start=$SECONDS
    "$@" || rc=$?
    step_names+=("$name")
    step_secs+=($((SECONDS - start)))
    if ((rc == 0)); then
        step_results+=(PASS)
    else
        step_results+=("FAIL (exit $rc)")
    fi
    return 0
}

threads=${ROOMCAST_TEST_THREADS:-4}

# cargo test args: --all-targets unless the caller picked targets; EXTRA go
# before the `--` (cargo options / test-name filter) or after it if they
# already contain one; --test-threads unless the caller set it.
test_cmd=(cargo test --no-fail-fast)
has_target_flag=0 has_sep=0 has_threads=0
for a in "${extra[@]}"; do
    case $a in
    --lib | --bins | --bin | --bin=* | --tests | --test | --test=* | --benches | --bench | --bench=* | \
        --examples | --example | --example=* | --doc | --all-targets) ((has_sep)) || has_target_flag=1 ;;
    --) has_sep=1 ;;
    --test-threads | --test-threads=*) ((has_sep)) && has_threads=1 ;;
    esac
done
((has_target_flag)) || test_cmd+=(--workspace --all-targets)
test_cmd+=("${extra[@]}")
if ((!has_threads)); then
    ((has_sep)) || test_cmd+=(--)
    test_cmd+=("--test-threads=$threads")
fi

# shellcheck disable=SC2317  # invoked through run_step
cargo_test() {
    # tee keeps cargo's own output (incl. "test result:" lines) on the console
    # and lets the summary count them; pipefail keeps cargo's exit status.
    "$@" 2>&1 | tee -a "$cargo_test_log"
}
cargo_test_log=$(mktemp /tmp/roomcast-cargo-test.XXXXXX.log)

if [[ ${ROOMCAST_TEST_SKIP_LINT:-0} == 1 ]]; then
    echo "ROOMCAST_TEST_SKIP_LINT=1: skipping cargo fmt and cargo clippy" >&2
else
    run_step "fmt" cargo fmt --all -- --check
    run_step "clippy" cargo clippy --workspace --all-targets -- -D warnings
fi
run_step "test" cargo_test "${test_cmd[@]}"
if ((${#extra[@]} == 0)) && [[ -f src/lib.rs ]]; then
    run_step "doctest" cargo_test cargo test --doc -- "--test-threads=$threads"
fi

# shellcheck disable=SC2317  # invoked through run_step
connect_es() {
    # tee for the summary's pass/fail counts (node's "# pass N" / "# fail N").
    bash scripts/connect-es-test.sh 2>&1 | tee "$connect_es_log"
}
connect_es_log=$(mktemp /tmp/roomcast-connect-es.XXXXXX.log)
if ((${#extra[@]} > 0)); then
    echo "extra cargo test arguments given: skipping the connect-es step" >&2
elif [[ ${ROOMCAST_TEST_SKIP_CONNECT_ES:-0} == 1 ]]; then
    echo "ROOMCAST_TEST_SKIP_CONNECT_ES=1: skipping the connect-es step" >&2
else
    run_step "connect-es" connect_es
fi

# shellcheck disable=SC2317  # invoked through run_step
web_client() {
    # tee for the summary's pass/fail counts (node's "# pass N" / "# fail N").
    bash scripts/web-test.sh 2>&1 | tee "$web_log"
}
web_log=$(mktemp /tmp/roomcast-web-test.XXXXXX.log)
if ((${#extra[@]} > 0)); then
    echo "extra cargo test arguments given: skipping the web client step" >&2
elif [[ ${ROOMCAST_TEST_SKIP_WEB:-0} == 1 ]]; then
    echo "ROOMCAST_TEST_SKIP_WEB=1: skipping the web client step" >&2
else
    run_step "web" web_client
fi

# shellcheck disable=SC2317  # invoked through run_step
autobahn() {
    # The Autobahn|Testsuite against an echo endpoint built on roomcast's own
    # WebSocket framing (src/ws/): the roomcast binary with realtime.echo_path
    # set, on an ephemeral loopback port, with its own temp data directory.
    local tool=$repo_root/../shared/tools/autobahn.sh
    if [[ ! -x $tool ]]; then
        echo "ERROR: $tool not found (CI has shared/ next to the clone);" \
            "set ROOMCAST_TEST_SKIP_AUTOBAHN=1 to skip locally" >&2
        return 1
    fi
    # --all-targets reuses the test step's build (see scripts/connect-es-test.sh).
    cargo build --quiet --all-targets || return 1
    local dir pid addr="" rc=0
    dir=$(mktemp -d /tmp/roomcast-autobahn.XXXXXX)
    ROOMCAST_SERVER__LISTEN=127.0.0.1:0 \
        ROOMCAST_STORE__URL="sqlite://$dir/roomcast.db" \
        ROOMCAST_REALTIME__ECHO_PATH=/autobahn-echo \
        ROOMCAST_LOG__FORMAT=json \
        ROOMCAST_LOG__LEVEL=info \
        "$repo_root/target/debug/roomcast" serve >"$dir/server.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 300); do
        addr=$(grep -o '"addr":"127\.0\.0\.1:[0-9]*"' "$dir/server.log" | head -n 1 | cut -d'"' -f4 || true)
        [[ -n $addr ]] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -z $addr ]]; then
        echo "ERROR: the echo server did not start:" >&2
        cat "$dir/server.log" >&2
        rc=1
    else
        echo "echo endpoint: ws://$addr/autobahn-echo (server PID $pid)"
        # The suite needs Python 2.7. Under pyenv, name 2.7.18 (with the system
        # Python for python3) so the tool finds it whichever way it looks: its own
        # `pyenv versions | grep -q` check can lose to SIGPIPE under pipefail.
        local pyenv_version=${PYENV_VERSION:-}
        if command -v pyenv >/dev/null 2>&1 &&
            pyenv versions --bare 2>/dev/null | grep -x '2.7.18' >/dev/null; then
            pyenv_version=2.7.18:system
        fi
        PYENV_VERSION=$pyenv_version "$tool" "ws://$addr/autobahn-echo" "$dir/autobahn" || rc=$?
    fi
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    ((rc == 0)) && rm -rf "$dir"
    return "$rc"
}
if ((${#extra[@]} > 0)); then
    echo "extra cargo test arguments given: skipping the autobahn step" >&2
elif [[ ${ROOMCAST_TEST_SKIP_AUTOBAHN:-0} == 1 ]]; then
    echo "ROOMCAST_TEST_SKIP_AUTOBAHN=1: skipping the autobahn step" >&2
else
    run_step "autobahn" autobahn
fi

# ---------------------------------------------------------------- summary
passed=0 failed=0 ignored=0 suites=0
while IFS= read -r line; do
    if [[ $line =~ test\ result:\ [A-Za-z]+\.\ ([0-9]+)\ passed\;\ ([0-9]+)\ failed\;\ ([0-9]+)\ ignored ]]; then
        passed=$((passed + BASH_REMATCH[1]))
        failed=$((failed + BASH_REMATCH[2]))
        ignored=$((ignored + BASH_REMATCH[3]))
        suites=$((suites + 1))
    fi
done <"$cargo_test_log"

# A skipped test prints `SKIPPED <test>: <why>` (tests/common/mod.rs); none may
# pass silently here.
skipped=$(grep -c '^SKIPPED ' "$cargo_test_log" || true)

overall=0
((skipped == 0)) || overall=1
{
    printf '\n==================== roomcast test summary ====================\n'
    for i in "${!step_names[@]}"; do
        printf '  %-10s %-16s %5ss\n' "${step_names[$i]}" "${step_results[$i]}" "${step_secs[$i]}"
        [[ ${step_results[$i]} == PASS ]] || overall=1
    done
    printf '  tests:   %d passed, %d failed, %d ignored (%d test binaries)\n' \
        "$passed" "$failed" "$ignored" "$suites"
    if ((skipped > 0)); then
        printf '  skipped at run time (a failure here): %d\n' "$skipped"
        grep '^SKIPPED ' "$cargo_test_log" | sort -u | sed 's/^/    /'
    fi
    if [[ -s $connect_es_log ]]; then
        printf '  connect-es: %s passed, %s failed (node --test)\n' \
            "$(sed -n 's/^# pass \([0-9]*\)$/\1/p' "$connect_es_log" | tail -n 1 | grep . || echo 0)" \
            "$(sed -n 's/^# fail \([0-9]*\)$/\1/p' "$connect_es_log" | tail -n 1 | grep . || echo 0)"
    fi
    if [[ -s $web_log ]]; then
        printf '  web:        %s passed, %s failed (node --test, Chromium)\n' \
            "$(sed -n 's/^# pass \([0-9]*\)$/\1/p' "$web_log" | tail -n 1 | grep . || echo 0)" \
            "$(sed -n 's/^# fail \([0-9]*\)$/\1/p' "$web_log" | tail -n 1 | grep . || echo 0)"
    fi
    if grep -q '^failures:$' "$cargo_test_log"; then
        printf '  failing tests:\n'
        # The "failures:" list that libtest prints last in each failed binary.
        awk '/^failures:$/ {inlist=1; next} inlist && /^    [^ ]/ {print "    " $1; next} inlist && /^$/ {next} {inlist=0}' \
            "$cargo_test_log" | sort -u
    fi
    printf '  postgres: %s\n  redis:    %s\n' "$ROOMCAST_TEST_POSTGRES_URL" "$ROOMCAST_TEST_REDIS_URL"
    if ((overall == 0)); then
        printf '  RESULT: ALL PASSED\n'
    else
        printf '  RESULT: FAILED\n'
    fi
    printf '===============================================================\n'
}

exit "$overall"
