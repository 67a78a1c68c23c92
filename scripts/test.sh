#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU, in GSSTUDIO_TEST_WORKERS pytest-xdist workers (default 2:
# most tests are many small single-threaded ops, so a second core is otherwise idle). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's chromium for the browser tests (tests/browser drive it headless through Playwright; no browser download).
export GSSTUDIO_DEBS="${GSSTUDIO_DEBS:-} chromium"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
.venv/bin/ruff check . && .venv/bin/ruff format --check . >/dev/null
workers="${GSSTUDIO_TEST_WORKERS:-2}"
.venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadgroup --no-loadscope-reorder "$@"
