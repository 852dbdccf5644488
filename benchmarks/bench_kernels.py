"""FGIT's log-prob kernels side by side: chunked projection, cut-cross-entropy, Liger.

For each kernel that runs on this machine: forward + backward of FGIT's loss on the same
packed batch (bundled pairs, SmolLM2-shaped random-init model), its loss and gradient
difference to the chunked path, time and peak memory. Then the fidelity check (FGIT's
log-probs against ``log_softmax`` of the model's own logits) for the tiny model families of
the test suite, in the dtype of the device (bf16 on a GPU).

    python benchmarks/bench_kernels.py            # CPU: chunked and cut-cross-entropy
    python benchmarks/bench_kernels.py --steps 5  # GPU: all three kernels, bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def batch(tokenizer, device):
    import json

    from axolotl_fgit.collator import FGITPackedDataCollator
    from axolotl_fgit.strategy import pair_strategy
    from fgit_preprocess.diff import pair_spans

    rows = [json.loads(line) for line in (ROOT / "examples/data/sample_pairs.jsonl").open()]
    strategy = pair_strategy(tokenizer, 2048)
    feats = []
    for r in rows:
        spans = pair_spans(r["correct"], r["incorrect"], "response")
        if spans.reject:
            continue
        feats.append(
            strategy.tokenize_prompt(
                {
                    "prompt": r["instruction"],
                    "correct": r["correct"],
                    "incorrect": r["incorrect"],
                    "correct_line_spans": spans.correct_line,
                    "correct_edit_spans": spans.correct_edit,
                    "incorrect_line_spans": spans.incorrect_line,
                    "incorrect_edit_spans": spans.incorrect_edit,
                }
            )
        )
    out = FGITPackedDataCollator(tokenizer, return_tensors="pt")([feats])
    return {k: v.to(device) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from axolotl_fgit.args import FGITConfig
    from axolotl_fgit.kernels import Kernel
    from axolotl_fgit.projection import FidelityError, check_fidelity
    from axolotl_fgit.trainer import batch_loss

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tok = AutoTokenizer.from_pretrained(ROOT / "benchmarks/assets/smollm2-tokenizer")
    tok.pad_token = tok.pad_token or tok.eos_token
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30 if cuda else 4,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device, dtype).train()
    inputs = batch(tok, device)
    kernels = [Kernel.chunked, Kernel.cut_cross_entropy] + ([Kernel.liger] if cuda else [])
    reference = None
    print(f"device {device}, dtype {dtype}, {int((inputs['fgit_side'] > 0).sum())} tokens")
    print(
        f"{'kernel':<20}{'loss':>12}{'|Δloss|':>10}{'max|Δgrad|':>12}{'s/step':>9}{'peak GiB':>10}"
    )
    for kernel in kernels:
        try:
            times = []
            for _ in range(args.steps):
                model.zero_grad()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    torch.cuda.synchronize()
                start = time.perf_counter()
                loss = batch_loss(model, inputs, FGITConfig(), kernel=kernel).loss
                loss.backward()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        except Exception as err:  # a kernel that cannot run here is reported, not hidden
            print(f"{kernel.value:<20} failed: {type(err).__name__}: {str(err)[:200]}")
            continue
        grad = model.model.embed_tokens.weight.grad.float().clone()
        if reference is None:
            reference = (loss.item(), grad)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        print(
            f"{kernel.value:<20}{loss.item():>12.6f}{abs(loss.item() - reference[0]):>10.2e}"
            f"{(grad - reference[1]).abs().max().item():>12.2e}{min(times):>9.3f}{peak:>10.2f}"
        )

    from test_fidelity import FAMILIES, build, packed_request

    print(f"\nfidelity ({dtype}): max |FGIT log p − log_softmax(model logits)|")
    for family, (config_cls, extra) in FAMILIES.items():
        fam = build(config_cls, extra).to(device, dtype)
        want = packed_request()
        want = type(want)(*(t.to(device) for t in vars(want).values()))
        for kernel in kernels:
            try:
                error = check_fidelity(fam, want, 64, kernel)
                print(f"  {family:<14}{kernel.value:<20}{error:.2e}")
            except (FidelityError, ValueError, RuntimeError) as err:
                print(f"  {family:<14}{kernel.value:<20}FAILED: {str(err)[:160]}")


if __name__ == "__main__":
    main()
