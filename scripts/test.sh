#!/usr/bin/env bash
# Set up (idempotent), lint, and run the test suite. Arguments go to pytest:
#   bash scripts/test.sh                 # everything (CI)
#   bash scripts/test.sh -m "not slow"   # the fast loop, under two minutes
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff format --check .
ruff check .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1
exec python -m pytest -q "$@"
