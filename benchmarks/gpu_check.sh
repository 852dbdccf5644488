#!/usr/bin/env bash
# Every GPU check in one run (prepare .gpu-wheels as gpu_fsdp_check.sh says, then
# bash benchmarks/gpu_check.sh on the GPU machine).
# Prints, in order: FGIT vs SFT throughput and memory (random-init 135M and 1.3B, bf16,
# packed); FGIT's log-prob kernels against each other and the bf16 fidelity check per
# architecture; fgit-eval pairs/s on the GPU; Axolotl's own FSDP2 path (gpu_fsdp_check.sh).
# Not yet run on a GPU (none was lent so far); bench_train, bench_kernels and fgit-eval run on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/gpu_env.sh
OUT=${OUT:-/tmp/fgit-gpu}
mkdir -p "$OUT"
echo "== throughput and memory, FGIT vs SFT"
python3 - "$OUT" <<'PY'
import sys, pathlib
from transformers import AutoTokenizer, LlamaConfig
out = pathlib.Path(sys.argv[1]) / "shape"  # a config + tokenizer; bench_train sets the sizes
tok = AutoTokenizer.from_pretrained("benchmarks/assets/smollm2-tokenizer")
LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=8192).save_pretrained(out)
tok.save_pretrained(out)
PY
for size in 135m 1.3b; do
  python3 benchmarks/bench_train.py --random-init "$size" --model "$OUT/shape" --samples 24 \
    --packed-tokens 2048 --skip-loss-path
done
echo "== log-prob kernels and bf16 fidelity"
python3 benchmarks/bench_kernels.py --steps 3
echo "== fgit-eval on the GPU (random-init 1.3B-shaped model)"
python3 - "$OUT" <<'PY'
import sys, pathlib, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
out = pathlib.Path(sys.argv[1]) / "eval-model"
tok = AutoTokenizer.from_pretrained("benchmarks/assets/smollm2-tokenizer")
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True)
torch.manual_seed(0)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
tok.save_pretrained(out)
PY
python3 -m fgit_preprocess run -i examples/data/sample.jsonl -o "$OUT/eval-pairs" --teacher mutate \
  --similarity levenshtein --overwrite
python3 -m axolotl_fgit.eval --model "$OUT/eval-model" --data "$OUT/eval-pairs" --device cuda \
  --dtype auto --batch-size 16
echo "== Axolotl FSDP2"
bash benchmarks/gpu_fsdp_check.sh
