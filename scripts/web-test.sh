#!/usr/bin/env bash
# End-to-end test of the bundled web client (web/, served at / by the server) in a
# real headless Chromium, driven by puppeteer-core:
#
#     bash scripts/web-test.sh
#
# Steps: find Chromium (chromium, chromium-browser, google-chrome; when none is
# there: `apt-get update` and `apt-get install -y chromium`), `npm ci` in
# tests/web (puppeteer-core pinned by package-lock.json; it downloads no browser),
# `cargo build --all-targets`, start target/debug/roomcast on a free loopback port
# with a throw-away SQLite store, wait for /healthz, then `node --test
# tests/web/` with ROOMCAST_URL and ROOMCAST_CHROMIUM set. The server (only the
# one this script started, by PID) is stopped on any exit; the exit status is
# node's.
#
# Needs Node.js >= 18 and npm (installed with apt when missing, see ensure_node in
# scripts/test-services.sh).
# Environment knobs:
#     ROOMCAST_CHROMIUM=/path/to/chrome   use this browser
#     ROOMCAST_WEB_TEST_KEEP=1            keep the temp dir (server log, database, screenshots)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
pkg_dir=tests/web

say() { printf '\n==> %s\n' "$*"; }

for tool in cargo curl; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "ERROR: $tool not found on PATH (the web client test needs cargo and curl)" >&2
        exit 1
    fi
done

# shellcheck source=scripts/test-services.sh
source "$repo_root/scripts/test-services.sh"
say "web: checking Node.js and npm"
if ! ensure_node; then
    cleanup_node
    echo "ERROR: the web client test needs Node.js >= $ROOMCAST_NODE_MIN_MAJOR and npm (see above)" >&2
    exit 1
fi

find_chromium() {
    local candidate
    if [[ -n ${ROOMCAST_CHROMIUM:-} ]]; then
        [[ -x $ROOMCAST_CHROMIUM ]] && printf '%s\n' "$ROOMCAST_CHROMIUM"
        return 0
    fi
    for candidate in chromium chromium-browser google-chrome google-chrome-stable; do
        if command -v "$candidate" >/dev/null 2>&1; then
            command -v "$candidate"
            return 0
        fi
    done
}

say "web: looking for Chromium"
chromium=$(find_chromium)
if [[ -z $chromium ]]; then
    if [[ -n ${ROOMCAST_CHROMIUM:-} ]]; then
        echo "ERROR: ROOMCAST_CHROMIUM=$ROOMCAST_CHROMIUM is not an executable" >&2
        exit 1
    fi
    echo "no chromium, chromium-browser or google-chrome on PATH: installing Debian's chromium with apt-get"
    if ! _rc_apt_install chromium; then
        echo "ERROR: could not install chromium (see above)" >&2
        exit 1
    fi
    chromium=$(find_chromium)
    [[ -n $chromium ]] || { echo "ERROR: chromium is still not on PATH after installing it" >&2; exit 1; }
    echo "installed: $(dpkg-query -W -f='${Package} ${Version}' chromium 2>/dev/null || echo chromium)"
fi
# Debian's wrapper script prints a harmless shell warning on stderr; keep it quiet.
echo "browser: $chromium ($("$chromium" --version 2>/dev/null || echo 'version unknown'))"

tmp_dir=$(mktemp -d /tmp/roomcast-web-test.XXXXXX)
server_pid=""

# shellcheck disable=SC2317  # invoked from the EXIT trap
cleanup() {
    local rc=$?
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if ((rc != 0)) && [[ -s $tmp_dir/server.log ]]; then
        echo "---- last lines of the roomcast server log ($tmp_dir/server.log) ----" >&2
        tail -n 40 "$tmp_dir/server.log" >&2 || true
    fi
    cleanup_node
    if [[ ${ROOMCAST_WEB_TEST_KEEP:-0} == 1 ]]; then
        echo "kept $tmp_dir" >&2
    else
        rm -rf "$tmp_dir"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ---------------------------------------------------------------- client
say "web: installing the pinned npm packages ($pkg_dir)"
(cd "$pkg_dir" && npm ci --no-audit --no-fund --loglevel=error)

# ---------------------------------------------------------------- server
say "web: building the server"
# --all-targets: the feature set the test step built, so nothing recompiles
# (see scripts/connect-es-test.sh).
cargo build --all-targets
server_bin=${CARGO_TARGET_DIR:-target}/debug/roomcast

port=$(node -e '
const s = require("net").createServer();
s.listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); });
')
base_url="http://127.0.0.1:$port"

# A 20 s access token, so the page refreshes its token (and re-authenticates its
# WebSocket) several times during the test.
say "web: starting $server_bin on $base_url (store in $tmp_dir)"
env -u ROOMCAST_CONFIG \
    ROOMCAST_SERVER__LISTEN="127.0.0.1:$port" \
    ROOMCAST_STORE__URL="sqlite://$tmp_dir/roomcast.db" \
    ROOMCAST_AUTH__ACCESS_TOKEN_TTL_SECS=20 \
    ROOMCAST_REALTIME__SEND_RATE_PER_SEC=1000 \
    ROOMCAST_REALTIME__SEND_BURST=1000 \
    ROOMCAST_AUTH__SIGN_UP_IP_PER_HOUR=0 \
    ROOMCAST_AUTH__SIGN_IN_IP_PER_MINUTE=0 \
    ROOMCAST_LOG__LEVEL="${ROOMCAST_LOG__LEVEL:-warn}" \
    "$server_bin" serve >"$tmp_dir/server.log" 2>&1 &
server_pid=$!

ready=0
for _ in $(seq 1 150); do # up to ~30 s
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "ERROR: the server exited during start-up" >&2
        exit 1
    fi
    if curl -fsS --max-time 1 "$base_url/healthz" >/dev/null 2>&1; then
        ready=1
        break
    fi
    sleep 0.2
done
if ((!ready)); then
    echo "ERROR: $base_url/healthz did not answer within 30 s" >&2
    exit 1
fi
echo "server is up (pid $server_pid)"

# ---------------------------------------------------------------- tests
say "web: node --test $pkg_dir/*.test.mjs"
rc=0
ROOMCAST_URL=$base_url ROOMCAST_CHROMIUM=$chromium ROOMCAST_WEB_TEST_DIR=$tmp_dir \
    node --test --test-timeout=240000 "$pkg_dir"/*.test.mjs || rc=$?
exit "$rc"
