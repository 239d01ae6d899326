#!/usr/bin/env bash
# Bootstrap, then run the test suite: scripts/test.sh [pytest args...]
# Exits non-zero on any failure, including "no tests collected" (pytest exit 5).
# HD_TEST_TIMEOUT: per-test timeout in seconds (default 300; pytest-timeout).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/bootstrap.sh || { echo "test.sh: bootstrap failed" >&2; exit 1; }

.venv/bin/python -m pytest -q -rfE --timeout="${HD_TEST_TIMEOUT:-300}" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: no tests were collected: that is a failure" >&2
fi
exit "$rc"
