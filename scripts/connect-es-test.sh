#!/usr/bin/env bash
# End-to-end compatibility test with connect-es (the Connect client for
# TypeScript/JavaScript): a client generated from src/proto calls a real
# roomcast server, with both the JSON and the binary protobuf codec.
#
#     bash scripts/connect-es-test.sh
#
# Tests: compat (RPCs in both codecs), compression, sse (the npm eventsource
# client), longpoll (PushService.Poll from push.proto).
# Steps: `npm ci` in tests/connect-es (pinned versions from package-lock.json),
# `buf generate` into tests/connect-es/gen/ (gitignored), `cargo build --bin
# roomcast`, start target/debug/roomcast on a free loopback port with a
# throw-away SQLite store, wait for /healthz, then `node --test
# tests/connect-es/` with ROOMCAST_URL set. The server (only the one this
# script started, by PID; start_test_server/stop_test_server in
# scripts/test-services.sh) is stopped on any exit; the exit status is node's.
#
# Needs Node.js >= 18 and npm (the buf CLI and protoc-gen-es come from npm): when
# they are missing, they are installed with apt (Debian's own nodejs and npm
# packages are enough; see ensure_node in scripts/test-services.sh).
# Environment knobs:
#     ROOMCAST_CONNECT_ES_KEEP=1   keep the temp dir (server log, database)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
pkg_dir=tests/connect-es

say() { printf '\n==> %s\n' "$*"; }

for tool in cargo curl; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "ERROR: $tool not found on PATH (the connect-es test needs cargo and curl)" >&2
        exit 1
    fi
done

# Node.js and npm: installed with apt when missing (Debian's own packages work).
# shellcheck source=scripts/test-services.sh
source "$repo_root/scripts/test-services.sh"
say "connect-es: checking Node.js and npm"
if ! ensure_node; then
    cleanup_node
    echo "ERROR: the connect-es test needs Node.js >= $ROOMCAST_NODE_MIN_MAJOR and npm (see above)" >&2
    exit 1
fi

tmp_dir=$(mktemp -d /tmp/roomcast-connect-es.XXXXXX)

# shellcheck disable=SC2317  # invoked from the EXIT trap
cleanup() {
    local rc=$?
    stop_test_server "$rc"
    cleanup_node
    if [[ ${ROOMCAST_CONNECT_ES_KEEP:-0} == 1 ]]; then
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
say "connect-es: installing the pinned npm packages ($pkg_dir)"
(cd "$pkg_dir" && npm ci --no-audit --no-fund --loglevel=error)

say "connect-es: generating the client from src/proto (buf generate)"
(cd "$pkg_dir" && npx --loglevel=error --no-install buf generate)
find "$pkg_dir/gen" -name '*_pb.js' | sort

# ---------------------------------------------------------------- server
say "connect-es: building the server"
# --all-targets: the feature set `cargo test --all-targets` built (dev-dependencies
# unify features), so after scripts/test.sh's test step this compiles nothing;
# `--bin roomcast` alone would rebuild much of the tree with other features.
cargo build --all-targets
server_bin=${CARGO_TARGET_DIR:-target}/debug/roomcast

say "connect-es: starting $server_bin"
start_test_server "$server_bin" "$tmp_dir" || exit 1
base_url=$ROOMCAST_TEST_SERVER_URL

# ---------------------------------------------------------------- tests
say "connect-es: node --test $pkg_dir/*.test.mjs"
rc=0
ROOMCAST_URL=$base_url node --test "$pkg_dir"/*.test.mjs || rc=$?
exit "$rc"
