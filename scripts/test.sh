#!/usr/bin/env bash
# Set up (idempotent), lint, and run the test suite. Arguments go to pytest:
#   bash scripts/test.sh                 # everything (CI): both stages below
#   bash scripts/test.sh -m "not slow"   # the fast loop, about two minutes (stage 1 only)
# Stage 1: the suite in .venv (Python 3.11, Axolotl 0.19 with the CPU torch). A full run
# leaves the end-to-end tests marked compat (about 15 minutes of axolotl train on 2 cores)
# to stage 2, all but one (marked pinned) that keeps the pinned stack's train path honest.
# Stage 2, on a full run only: the newest Axolotl on Python >= 3.12 (scripts/test-current.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# A real OpenAI-compatible server for the teacher tests: llama.cpp's, which PyPI ships as
# source only. The first install builds it (about 4.5 minutes on 2 cores); pip keeps the
# wheel in its cache, so later installs take seconds.
python -c "import llama_cpp.server" 2>/dev/null || \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python -m pip install -q "llama-cpp-python[server]==0.3.36"
ruff format --check .
ruff check .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1
echo "== stage 1: $(python --version), the pinned stack"
if [ $# -eq 0 ]; then
  python -m pytest -q --durations=15 -m "not compat or pinned"
  deactivate
  bash scripts/test-current.sh
else
  python -m pytest -q "$@"
fi
