#!/usr/bin/env bash
# Property-based test of the admin API against its own OpenAPI document
# (src/admin/openapi.json, served at GET /openapi.json), with schemathesis.
#
# Starts `keygate serve --dev` (in-memory store) on free loopback ports, then runs every
# schemathesis check but one (`--checks all`, see below): no request gets a 5xx; every status code, content
# type, response header and body is the one the document gives; unauthenticated calls
# are refused; schema-valid requests are accepted and schema-invalid ones refused.
#
# schemathesis comes from .venv-ci/ (scripts/ci-venv makes it, pinned to 4.x in
# scripts/ci-requirements.txt); this fails, never skips, when it cannot be installed.
#
# Env: ST_MAX_EXAMPLES (default 30) test cases per operation and phase; ST_SEED for a
# reproducible run; CARGO (default cargo); KEYGATE_CI_VENV (default .venv-ci).
set -euo pipefail

cd "$(dirname "$0")/.."

MAX_EXAMPLES="${ST_MAX_EXAMPLES:-30}"
ROOT_TOKEN="kgtest_schemathesis_0123456789ab" # fixed, 32 characters

# ---------------------------------------------------------------- schemathesis
VENV="$(scripts/ci-venv)" || { echo "error: could not install schemathesis (scripts/ci-venv)" >&2; exit 1; }
PYTHON="$VENV/bin/python"
ST_VERSION="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("schemathesis"))')"
case "$ST_VERSION" in
    4.*) ;;
    *) echo "error: schemathesis $ST_VERSION in $VENV; this script needs 4.x (scripts/ci-requirements.txt)" >&2
       exit 2 ;;
esac
echo "schemathesis $ST_VERSION" >&2

# ---------------------------------------------------------------- keygate
"${CARGO:-cargo}" build --quiet --bin keygate

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
PROXY_PORT="$(free_port)"
ADMIN_PORT="$(free_port)"
while [ "$ADMIN_PORT" = "$PROXY_PORT" ]; do ADMIN_PORT="$(free_port)"; done
ADMIN="http://127.0.0.1:${ADMIN_PORT}"

WORK="$(mktemp -d)"
KEYGATE_PID=""
cleanup() {
    if [ -n "$KEYGATE_PID" ] && kill -0 "$KEYGATE_PID" 2>/dev/null; then
        kill "$KEYGATE_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$KEYGATE_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$KEYGATE_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

KEYGATE_PROXY_LISTEN="127.0.0.1:${PROXY_PORT}" \
KEYGATE_ADMIN_LISTEN="127.0.0.1:${ADMIN_PORT}" \
KEYGATE_ROOT_TOKEN="$ROOT_TOKEN" \
KEYGATE_LOG="${KEYGATE_LOG:-warn}" \
    target/debug/keygate serve --dev >"$WORK/keygate.log" 2>&1 &
KEYGATE_PID=$!

for _ in $(seq 100); do
    if "$PYTHON" - "$ADMIN/healthz" <<'EOF' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=1).read()
EOF
    if ! kill -0 "$KEYGATE_PID" 2>/dev/null; then
        echo "error: keygate exited before it was healthy:" >&2
        cat "$WORK/keygate.log" >&2
        exit 1
    fi
    sleep 0.1
done
if ! kill -0 "$KEYGATE_PID" 2>/dev/null; then
    echo "error: keygate is not running" >&2; cat "$WORK/keygate.log" >&2; exit 1
fi

# ---------------------------------------------------------------- run
# Every check schemathesis has: besides the response conformance checks, that no
# schema-valid request is refused (positive_data_acceptance: the duration patterns say
# exactly what keygate accepts), that no schema-invalid one is accepted
# (negative_data_rejection), ignored_auth, and the rest; all but use_after_free.
# In both API documents `DELETE /v1/keys/{id}` and `DELETE /v1/api-keys/{id}` revoke:
# the key stops working at once and its record stays readable, with `revoked_at` set
# (`revoked=true` lists it). use_after_free wants a 404 after a DELETE; its stateful
# scenarios reach that link only on some seeds, so it failed one CI run in four.
CHECKS="all"
EXCLUDED_CHECKS="use_after_free"

# One worker: schemathesis' threads can hit CPython 3.11's non-thread-safe ast.parse
# ("SystemError: AST constructor recursion depth mismatch") inside hypothesis.
args=(
    run "$ADMIN/openapi.json"
    --header "Authorization: Bearer ${ROOT_TOKEN}"
    --checks "$CHECKS"
    --exclude-checks "$EXCLUDED_CHECKS"
    --max-examples "$MAX_EXAMPLES"
    --phases examples,coverage,fuzzing,stateful
    --workers 1
    --request-timeout 10
    --generation-database none
    --suppress-health-check too_slow,filter_too_much
    --no-color
)
if [ -n "${ST_SEED:-}" ]; then args+=(--seed "$ST_SEED"); fi

# tests/schemathesis_hooks.py leaves out the one rule JSON Schema cannot state (unique
# rate-limit names); see its docstring.
status=0
HOOKS_DIR="$PWD/tests"
( cd "$WORK" && PYTHONPATH="$HOOKS_DIR" SCHEMATHESIS_HOOKS=schemathesis_hooks \
    timeout 600 "$PYTHON" -m schemathesis.cli "${args[@]}" ) || status=$?
if [ "$status" -ne 0 ]; then
    echo "schemathesis: FAILED (exit $status); keygate's log follows" >&2
    tail -n 50 "$WORK/keygate.log" >&2 || true
    exit "$status"
fi
echo "schemathesis: passed"
