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
# one this script started, by PID; start_test_server/stop_test_server in
# scripts/test-services.sh) is stopped on any exit; the exit status is node's.
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

# shellcheck disable=SC2317  # invoked from the EXIT trap
cleanup() {
    local rc=$?
    stop_test_server "$rc"
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

# A 20 s access token, so the page refreshes its token (and re-authenticates its
# WebSocket) several times during the test.
say "web: starting $server_bin"
start_test_server "$server_bin" "$tmp_dir" ROOMCAST_AUTH__ACCESS_TOKEN_TTL_SECS=20 || exit 1
base_url=$ROOMCAST_TEST_SERVER_URL

# ---------------------------------------------------------------- tests
say "web: node --test $pkg_dir/*.test.mjs"
rc=0
ROOMCAST_URL=$base_url ROOMCAST_CHROMIUM=$chromium ROOMCAST_WEB_TEST_DIR=$tmp_dir \
    node --test --test-timeout=240000 "$pkg_dir"/*.test.mjs || rc=$?
exit "$rc"
