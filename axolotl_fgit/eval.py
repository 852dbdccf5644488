"""``fgit-eval``: does a model tell correct code from its near miss? (before/after FGIT)

For each pair it computes Hc and Ha exactly as training does (sensitivity-weighted mean
probability of the error-sensitive tokens) and reports the pairwise accuracy (share of
pairs with Hc > Ha), the mean and median margin Hc − Ha, and the scoring speed.
"""

from __future__ import annotations

import json
import statistics
import time
from enum import Enum
from pathlib import Path

import typer

from axolotl_fgit.args import Granularity
from axolotl_fgit.contract import DEFAULT_COLUMNS, ContractError, read_params

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    auto = "auto"  # bfloat16 on a GPU, float32 on the CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def resolve(device: Device, dtype: DType):
    """The torch device and dtype to score with."""
    import torch

    if device == Device.cuda and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device is visible", param_hint="--device")
    use_cuda = device == Device.cuda or (device == Device.auto and torch.cuda.is_available())
    if dtype == DType.auto:
        return torch.device("cuda" if use_cuda else "cpu"), (
            torch.bfloat16 if use_cuda else torch.float32
        )
    return torch.device("cuda" if use_cuda else "cpu"), getattr(torch, dtype.value)


def load_model(path: str, dtype, device):
    """A causal LM from a full checkpoint or a PEFT adapter folder, in eval mode."""
    from transformers import AutoModelForCausalLM

    if (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


def pair_scores(
    model,
    tokenizer,
    rows,
    granularity: Granularity = Granularity.hybrid,
    batch_size: int = 4,
    sequence_len: int = 4096,
) -> list[tuple[float, float] | None]:
    """(Hc, Ha) per row, in row order; None where a side has no sensitive token.

    Rows are scored in batches of similar length (less padding), and the first batch is
    checked against the model's own logits (``verify_fidelity``).
    """
    import torch
    from tqdm.auto import tqdm

    from axolotl_fgit.args import FGITConfig
    from axolotl_fgit.collator import FGITDataCollator
    from axolotl_fgit.strategy import pair_strategy
    from axolotl_fgit.trainer import batch_loss, verify_fidelity

    strategy = pair_strategy(tokenizer, sequence_len)
    collate = FGITDataCollator(tokenizer, return_tensors="pt")
    cfg = FGITConfig(granularity=granularity)
    device = next(model.parameters()).device
    features = [strategy.tokenize_prompt(dict(row)) for row in rows]
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    out: list[tuple[float, float] | None] = [None] * len(features)
    for start in tqdm(range(0, len(order), batch_size), desc="Scoring pairs", unit="batch"):
        chosen = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([dict(features[i]) for i in chosen]).items()}
        if start == 0:  # a logit transform we do not know would make every score wrong
            verify_fidelity(model, batch, cfg)
        with torch.no_grad():
            parts = batch_loss(model, batch, cfg)
        hc, ha = parts.h_correct, parts.h_incorrect
        for j, i in enumerate(chosen):
            if hc.present[j] and ha.present[j]:
                out[i] = (float(hc.value[j]), float(ha.value[j]))
    return out


def summarise(scores: list[tuple[float, float]]) -> dict[str, float]:
    """Pairwise accuracy and the mean/median margin Hc − Ha."""
    margins = [c - a for c, a in scores]
    return {
        "pairs": len(scores),
        "pair_acc": sum(m > 0 for m in margins) / len(margins) if margins else float("nan"),
        "margin_mean": statistics.fmean(margins) if margins else float("nan"),
        "margin_median": statistics.median(margins) if margins else float("nan"),
        "Hc_mean": statistics.fmean(c for c, _ in scores) if scores else float("nan"),
        "Ha_mean": statistics.fmean(a for _, a in scores) if scores else float("nan"),
    }


def _load_pairs(data: Path, limit: int | None):
    """The FGIT dataset at ``data``, or a BadParameter that says what is wrong with it."""
    import datasets

    if not data.is_dir() or not (data / "state.json").exists():
        raise typer.BadParameter(
            f"{data} is not a dataset directory written by fgit-preprocess (no state.json)",
            param_hint="--data",
        )
    try:
        read_params(data)
        # A folder without data files (a 0-row save) makes load_from_disk raise IndexError.
        has_rows = bool(json.loads((data / "state.json").read_text()).get("_data_files"))
        ds = datasets.load_from_disk(str(data)) if has_rows else []
    except (ContractError, OSError, ValueError) as err:
        raise typer.BadParameter(str(err), param_hint="--data") from None
    if len(ds) == 0:
        raise typer.BadParameter(f"{data} has no rows: nothing to score", param_hint="--data")
    if isinstance(ds, datasets.DatasetDict):
        raise typer.BadParameter(
            f"{data} holds splits {list(ds)}; pass one split's folder", param_hint="--data"
        )
    if missing := DEFAULT_COLUMNS.missing(ds.column_names):
        raise typer.BadParameter(
            f"{data} is not FGIT data: it lacks {missing}; run fgit-preprocess on it",
            param_hint="--data",
        )
    return ds.select(range(min(limit, len(ds)))) if limit else ds


_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "adapter_model.bin")


def check_model_folder(model: str) -> None:
    """Say what a folder lacks before transformers guesses at it (its guess is a missing
    tokenizer library): a config and weights, of a full model or of a LoRA adapter."""
    folder = Path(model)
    if not folder.is_dir():
        raise typer.BadParameter(f"{model} is not a model folder", param_hint="--model")
    configs = [n for n in ("config.json", "adapter_config.json") if (folder / n).exists()]
    if not configs:
        raise typer.BadParameter(
            f"{model} is not a model folder: it has no config.json (nor adapter_config.json); "
            "pass the folder that axolotl train or save_pretrained wrote",
            param_hint="--model",
        )
    if not any(next(folder.glob(pattern), None) for pattern in _WEIGHTS):
        raise typer.BadParameter(
            f"{model} has {configs[0]} but no weights (model*.safetensors, "
            "pytorch_model*.bin or adapter_model.safetensors); was the save interrupted?",
            param_hint="--model",
        )


def load_tokenizer(model: str, tokenizer: str | None = None):
    """The tokenizer of a model folder, or of the base model a LoRA adapter names."""
    from transformers import AutoTokenizer

    path = tokenizer or model
    adapter = Path(model) / "adapter_config.json"
    if (
        adapter.exists()
        and tokenizer is None
        and not (Path(model) / "tokenizer_config.json").exists()
    ):
        path = json.loads(adapter.read_text())["base_model_name_or_path"]
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@app.command()
def main(
    model: str = typer.Option(..., help="Model folder (full checkpoint or LoRA adapter)."),
    data: Path = typer.Option(..., help="FGIT dataset (fgit-preprocess output directory)."),
    tokenizer: str | None = typer.Option(None, help="Tokenizer path (default: the model's)."),
    granularity: Granularity = typer.Option(
        Granularity.hybrid, help="Sensitivity vector, as in training."
    ),
    limit: int | None = typer.Option(None, min=1, help="Score only the first N rows."),
    batch_size: int = typer.Option(8, min=1, help="Pairs per forward (grouped by length)."),
    device: Device = typer.Option(Device.auto, help="auto: the GPU when one is visible."),
    dtype: DType = typer.Option(DType.auto, help="auto: bfloat16 on a GPU, float32 on CPU."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Pairwise accuracy (Hc > Ha) and margin Hc − Ha of a model on an FGIT dataset."""
    rows = _load_pairs(data, limit)
    check_model_folder(model)
    torch_device, torch_dtype = resolve(device, dtype)
    try:
        tok = load_tokenizer(model, tokenizer)
        loaded = load_model(model, torch_dtype, torch_device)
    except (OSError, ValueError) as err:
        raise typer.BadParameter(f"cannot load {model}: {err}", param_hint="--model") from None
    start = time.perf_counter()
    scores = pair_scores(loaded, tok, rows, granularity, batch_size)
    seconds = time.perf_counter() - start
    result = summarise([s for s in scores if s is not None])
    result.update(
        model=model,
        data=str(data),
        rows=len(rows),
        seconds=round(seconds, 3),
        pairs_per_s=len(rows) / seconds if seconds else float("nan"),
        device=str(torch_device),
        dtype=str(torch_dtype).removeprefix("torch."),
    )
    if json_out:
        typer.echo(json.dumps(result))
    else:
        typer.echo(
            f"{model}: pair_acc {result['pair_acc']:.3f}  margin mean "
            f"{result['margin_mean']:+.4f}  median {result['margin_median']:+.4f}  "
            f"(Hc {result['Hc_mean']:.4f}, Ha {result['Ha_mean']:.4f}, "
            f"{result['pairs']} of {len(rows)} pairs scored; {result['pairs_per_s']:.1f} "
            f"pairs/s on {result['device']} {result['dtype']})"
        )


def run() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    run()
