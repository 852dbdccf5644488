"""``fgit-eval``: does a model tell correct code from its near miss? (before/after FGIT)

For each held-out pair it computes Hc and Ha exactly as training does (hybrid-weighted
mean probability of the error-sensitive tokens) and reports the pairwise accuracy
(share of pairs with Hc > Ha) and the mean and median margin Hc − Ha.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import typer

from axolotl_fgit.args import Granularity
from axolotl_fgit.contract import DEFAULT_COLUMNS, ContractError, read_params

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def load_model(path: str, dtype: str):
    """A causal LM from a full checkpoint or a PEFT adapter folder, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    if (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, attn_implementation="sdpa"
        )
    return model.eval()


def pair_scores(
    model,
    tokenizer,
    rows,
    granularity: Granularity = Granularity.hybrid,
    batch_size: int = 4,
    sequence_len: int = 4096,
) -> list[tuple[float, float]]:
    """(Hc, Ha) of every row that has sensitive tokens on both sides."""
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
    out = []
    checked = False
    for start in tqdm(range(0, len(rows), batch_size), desc="Scoring pairs", unit="batch"):
        feats = [
            strategy.tokenize_prompt(dict(rows[i]))
            for i in range(start, min(start + batch_size, len(rows)))
        ]
        batch = {k: v.to(device) for k, v in collate(feats).items()}
        if not checked:  # a logit transform we do not know would make every score wrong
            verify_fidelity(model, batch, cfg)
            checked = True
        with torch.no_grad():
            parts = batch_loss(model, batch, cfg)
        hc, ha = parts.h_correct, parts.h_incorrect
        both = hc.present & ha.present
        out += [(float(c), float(a)) for c, a in zip(hc.value[both], ha.value[both])]
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


@app.command()
def main(
    model: str = typer.Option(..., help="Model folder (full checkpoint or LoRA adapter)."),
    data: Path = typer.Option(..., help="FGIT dataset (fgit-preprocess output directory)."),
    tokenizer: str | None = typer.Option(None, help="Tokenizer path (default: the model's)."),
    granularity: Granularity = typer.Option(
        Granularity.hybrid, help="Sensitivity vector, as in training."
    ),
    limit: int | None = typer.Option(None, min=1, help="Score only the first N rows."),
    batch_size: int = typer.Option(4, min=1),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Pairwise accuracy (Hc > Ha) and margin Hc − Ha of a model on an FGIT dataset."""
    import datasets
    from transformers import AutoTokenizer

    if not (data / "state.json").exists():
        raise typer.BadParameter(f"{data} is not an FGIT dataset directory", param_hint="--data")
    try:
        read_params(data)
    except ContractError as err:
        raise typer.BadParameter(str(err), param_hint="--data") from None
    ds = datasets.load_from_disk(str(data))
    if missing := DEFAULT_COLUMNS.missing(ds.column_names):
        raise typer.BadParameter(
            f"{data} lacks FGIT columns {missing}; run fgit-preprocess", param_hint="--data"
        )
    rows = ds.select(range(min(limit, len(ds)))) if limit else ds
    tok_path = tokenizer or model
    if (
        (Path(model) / "adapter_config.json").exists()
        and tokenizer is None
        and not (Path(model) / "tokenizer_config.json").exists()
    ):
        tok_path = json.loads((Path(model) / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
    tok = AutoTokenizer.from_pretrained(tok_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    result = summarise(pair_scores(load_model(model, dtype), tok, rows, granularity, batch_size))
    result.update(model=model, data=str(data), rows=len(rows))
    if json_out:
        typer.echo(json.dumps(result))
    else:
        typer.echo(
            f"{model}: pair_acc {result['pair_acc']:.3f}  margin mean "
            f"{result['margin_mean']:+.4f}  median {result['margin_median']:+.4f}  "
            f"(Hc {result['Hc_mean']:.4f}, Ha {result['Ha_mean']:.4f}, "
            f"{result['pairs']} of {len(rows)} pairs scored)"
        )


def run() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    run()
