#!/usr/bin/env bash
# The main job: install, then walk PRODUCT.md's golden path for real on this machine
# (hd edge, tunnel, route, connector, client) against a throwaway PostgreSQL it starts,
# or your own with:  scripts/golden-path.sh --pg postgresql://user:pass@127.0.0.1:5432/db
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m examples.golden_path "$@"
