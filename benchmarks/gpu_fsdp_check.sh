#!/usr/bin/env bash
# GPU check for FGIT under Axolotl's own FSDP2 path (what CPU-only CI cannot run: Axolotl
# 0.19 maps ranks to CUDA devices). On a GPU machine without Axolotl, put its wheels (and
# whatever else that machine lacks, for its Python) in .gpu-wheels first; gpu_env.sh
# installs them into /tmp/site. Then: bash benchmarks/gpu_fsdp_check.sh
# It builds a random-init SmolLM2-shaped model (weights cannot travel), makes pairs with the
# mutation teacher, then trains 6 steps with FSDP2 on all visible GPUs and 6 steps without
# FSDP on one GPU, and prints both runs' FGIT metrics and losses side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/gpu_env.sh
OUT=${OUT:-/tmp/fgit-gpu}
NPROC=${NPROC:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
mkdir -p "$OUT"
python3 - "$OUT" <<'PY'
import sys, pathlib, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
out = pathlib.Path(sys.argv[1])
tok = AutoTokenizer.from_pretrained("benchmarks/assets/smollm2-tokenizer")
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                  max_position_embeddings=8192)
torch.manual_seed(0)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out / "model")
tok.save_pretrained(out / "model")
PY
python3 -m fgit_preprocess run -i examples/data/sample.jsonl -o "$OUT/pairs" --teacher mutate \
  --similarity levenshtein --overwrite
python3 - "$OUT" <<'PY'
import sys, yaml, pathlib
out = pathlib.Path(sys.argv[1])
base = yaml.safe_load(open("examples/yaml/smollm2-135m-cpu.yml"))
base.update(base_model=str(out / "model"), datasets=[{"path": str(out / "pairs"), "type": "axolotl_fgit.strategy"}],
            bf16=True, sequence_len=1024, max_steps=6, val_set_size=0, save_steps=6, micro_batch_size=2)
base.pop("eval_steps", None)
for name, extra in {"fsdp2": {"fsdp_version": 2, "fsdp_config": {
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True}}, "single": {}}.items():
    cfg = {**base, **extra, "dataset_prepared_path": str(out / f"prep-{name}"), "output_dir": str(out / name)}
    yaml.safe_dump(cfg, open(out / f"{name}.yml", "w"))
PY
python3 -m torch.distributed.run --nproc_per_node "$NPROC" -m axolotl.cli.train "$OUT/fsdp2.yml"
python3 -m axolotl.cli.train "$OUT/single.yml"
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("fsdp2", "single"):
    ckpt = sorted((out / name).glob("checkpoint-*"))[-1]
    for row in json.loads((ckpt / "trainer_state.json").read_text())["log_history"]:
        if "loss" in row:
            print(name, row["step"], round(row["loss"], 4), {k: round(v, 4) for k, v in row.items() if k.startswith("fgit/")})
PY
