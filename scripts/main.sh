#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the embedded default synthetic scene (CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
.venv/bin/python scripts/demo.py "$@"
