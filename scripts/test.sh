#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's chromium for the browser tests (tests/browser drive it headless through Playwright; no browser download).
export GSSTUDIO_DEBS="${GSSTUDIO_DEBS:-} chromium"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
.venv/bin/ruff check . && .venv/bin/ruff format --check . >/dev/null
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
