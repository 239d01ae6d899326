#!/usr/bin/env bash
# Make this checkout ready to run the tests and benchmarks. Idempotent; quiet on success.
#   - .venv with Python >= 3.11 (created if missing), the project installed editable with [test]
#     (re-installed only when pyproject.toml changed or the install is broken)
#   - PgBouncer (benchmark anchor) from the distribution when missing: only as root with apt-get,
#     otherwise a warning
#   - checks that the PostgreSQL server binaries the test harness needs are present (warning only)
#   - MariaDB server binaries (mariadbd, mariadb-install-db, mariadb client) for the test harness
#     (tests/harness/mariadb.py starts its own server): installed from the distribution when
#     missing (root with apt-get, the package's own service is not started), otherwise a warning
# Environment: PYTHON=/path/to/python3.x to choose the interpreter for a new venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LOG="$(mktemp -t hd-bootstrap.XXXXXX)"
trap 'rm -f "$LOG"' EXIT
warn() { echo "bootstrap: warning: $*" >&2; }
fail() {
    echo "bootstrap: $1 failed; output:" >&2
    cat "$LOG" >&2
    exit 1
}

# --- Python venv ------------------------------------------------------------------------------
py_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1; }

if [ ! -x .venv/bin/python ] || ! py_ok .venv/bin/python; then
    PY=""
    for cand in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$cand" ] || continue
        if command -v "$cand" >/dev/null 2>&1 && py_ok "$cand"; then PY="$(command -v "$cand")"; break; fi
    done
    [ -n "$PY" ] || { echo "bootstrap: need Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }
    rm -rf .venv
    "$PY" -m venv .venv >"$LOG" 2>&1 || fail "creating .venv with $PY"
fi

STAMP=.venv/.hd-bootstrap-stamp
WANT="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
installed_ok() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] &&
        .venv/bin/python - <<'PY' >/dev/null 2>&1
import importlib.util, sys
mods = ["pytest", "pytest_asyncio", "pytest_timeout", "hypothesis", "asyncssh", "psycopg",
        "asyncpg", "pg8000", "sqlalchemy", "pymysql", "jwt", "postgast", "websockets", "aiohttp", "cryptography", "click", "yaml", "tunnel", "relay", "connector", "cli"]
sys.exit(0 if all(importlib.util.find_spec(m) for m in mods) else 1)
PY
}
if ! installed_ok; then
    {
        .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
    } >"$LOG" 2>&1 || fail "pip install -e '.[test]'"
    echo "$WANT" >"$STAMP"
fi

# --- PgBouncer (benchmarks) -------------------------------------------------------------------
if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        # Install without starting the distribution's pgbouncer service (the benchmarks start
        # their own on a free port): a temporary policy-rc.d refuses service starts.
        POLICY=/usr/sbin/policy-rc.d
        ADDED_POLICY=""
        if [ ! -e "$POLICY" ]; then
            printf '#!/bin/sh\nexit 101\n' >"$POLICY" && chmod +x "$POLICY" && ADDED_POLICY=1
        fi
        trap 'rm -f "$LOG"; [ -n "$ADDED_POLICY" ] && rm -f "$POLICY"' EXIT
        {
            apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pgbouncer
        } </dev/null >"$LOG" 2>&1 || warn "could not install pgbouncer with apt-get (benchmarks will lack the PgBouncer anchor): $(tail -n 3 "$LOG" | tr '\n' ' ')"
        if [ -n "$ADDED_POLICY" ]; then rm -f "$POLICY"; ADDED_POLICY=""; fi
    else
        warn "pgbouncer is not installed and I cannot install it here (need root and apt-get); benchmarks will lack the PgBouncer anchor"
    fi
fi

# --- PostgreSQL server binaries (tests start their own clusters) ------------------------------
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 &&
   [ -z "${HD_PG_BIN:-}" ]; then
    warn "PostgreSQL server binaries (initdb, postgres) not found: install postgresql-15 or set HD_PG_BIN; database tests will fail"
fi

# --- MariaDB server binaries (tests start their own servers, tests/harness/mariadb.py) ----------
md_ok() {
    [ -n "${HD_MARIADB_BIN:-}" ] && return 0
    { command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ]; } &&
        command -v mariadb-install-db >/dev/null 2>&1 && command -v mariadb >/dev/null 2>&1
}
if ! md_ok; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        # As for pgbouncer: a temporary policy-rc.d keeps the package's own service from starting.
        POLICY=/usr/sbin/policy-rc.d
        ADDED_POLICY=""
        if [ ! -e "$POLICY" ]; then
            printf '#!/bin/sh\nexit 101\n' >"$POLICY" && chmod +x "$POLICY" && ADDED_POLICY=1
        fi
        trap 'rm -f "$LOG"; [ -n "$ADDED_POLICY" ] && rm -f "$POLICY"' EXIT
        {
            apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mariadb-server mariadb-client
        } </dev/null >"$LOG" 2>&1 || warn "could not install mariadb-server with apt-get: $(tail -n 3 "$LOG" | tr '\n' ' ')"
        if [ -n "$ADDED_POLICY" ]; then rm -f "$POLICY"; ADDED_POLICY=""; fi
    fi
    md_ok || warn "MariaDB server binaries (mariadbd, mariadb-install-db, mariadb) not found: install mariadb-server or set HD_MARIADB_BIN; MariaDB tests will fail"
fi

# --- npm: the JavaScript drivers of the end-to-end tests (tests/node) ---------------------------
# `npm ci` when node_modules is missing or package-lock.json changed since the last install.
NODE_DIR=tests/node
NODE_STAMP="$NODE_DIR/node_modules/.hd-bootstrap-stamp"
if [ -f "$NODE_DIR/package-lock.json" ]; then
    if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
        LOCK_SUM="$(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)"
        if [ ! -d "$NODE_DIR/node_modules" ] || [ ! -f "$NODE_STAMP" ] || [ "$(cat "$NODE_STAMP")" != "$LOCK_SUM" ]; then
            (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error) </dev/null >"$LOG" 2>&1 ||
                fail "npm ci in $NODE_DIR"
            echo "$LOCK_SUM" >"$NODE_STAMP"
        fi
    else
        warn "node/npm not found: the JavaScript driver tests (tests/e2e/test_proxy_drivers.py) will fail; install Node.js >= 18"
    fi
fi
exit 0
