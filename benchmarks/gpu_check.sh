#!/usr/bin/env bash
# Every GPU check in one run (prepare .gpu-wheels as gpu_fsdp_check.sh says, then
# bash benchmarks/gpu_check.sh on the GPU machine).
# Prints, in order: FGIT vs SFT throughput and memory (random-init 135M and 1.3B, bf16,
# packed); FGIT's log-prob kernels against each other and the bf16 fidelity check per
# architecture; fgit-eval pairs/s on the GPU; the embedder's GPU-sized batches (chosen size,
# peak memory); Axolotl's own FSDP2 path (gpu_fsdp_check.sh).
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
echo "== selection batches sized to the GPU (random-init UnixCoder-shaped encoder, 512-token rows)"
python3 - "$OUT" <<'PY'
import sys, pathlib, time, torch
from sentence_transformers import SentenceTransformer, models
from transformers import AutoTokenizer, BertConfig, BertModel
from fgit_preprocess.selection import EmbeddingScorer
out = pathlib.Path(sys.argv[1])
tok = AutoTokenizer.from_pretrained("benchmarks/assets/smollm2-tokenizer")
tok.pad_token = tok.pad_token or tok.eos_token
cfg = BertConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=1024)
BertModel(cfg).save_pretrained(out / "encoder")
tok.save_pretrained(out / "encoder")
enc = models.Transformer(str(out / "encoder"), max_seq_length=512)
SentenceTransformer(modules=[enc, models.Pooling(768)]).save(str(out / "embedder"))
free = torch.cuda.mem_get_info()[0]
scorer = EmbeddingScorer(str(out / "embedder"))
texts = [f"def f{i}(x):\n" + "    x = x + %d\n" % i * 200 for i in range(20000)]
torch.cuda.reset_peak_memory_stats()
start = time.monotonic()
scorer(texts[:10000], [[t] for t in texts[10000:]], progress=False)
took = time.monotonic() - start
print(f"batch {scorer.batch_size} rows, free before {free / 2**30:.1f} GiB, peak allocated "
      f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, {20000 / took:,.0f} texts/s")
PY
echo "== Axolotl FSDP2"
bash benchmarks/gpu_fsdp_check.sh
