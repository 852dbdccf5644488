"""The arms of an A/B: one Axolotl config each, trained through the real ``axolotl train``.

Every arm gets the same base model, data, data order (seed), steps and optimiser; only
its ``fgit:`` block differs. ``sft`` is plain SFT through the same pipeline
(``weighting: sft``: every token weight 1), so the comparison isolates FGIT's weighting.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from axolotl_fgit.args import FGITConfig

PRESETS: dict[str, dict[str, Any]] = {
    "sft": {"weighting": "sft"},
    "dynamic": {"weighting": "dynamic"},
    "static": {"weighting": "static"},
}


class ArmError(ValueError):
    """An arm that cannot be trained as given (bad spec or a failed run)."""


@dataclass(frozen=True)
class Arm:
    """A label and the ``fgit:`` block that trains it."""

    label: str
    fgit: dict[str, Any]


def parse_arm(spec: str) -> Arm:
    """``sft`` | ``dynamic`` | ``static`` | ``LABEL:key=value,key=value`` (an ``fgit:``
    block, e.g. ``a4-line:weighting=dynamic,alpha=4,granularity=line``)."""
    label, _, settings = spec.partition(":")
    label = label.strip()
    if not label or not label.replace("-", "").replace("_", "").isalnum():
        raise ArmError(f"--arm {spec!r}: the label must be letters, digits, '-' or '_'")
    if not settings:
        if label not in PRESETS:
            raise ArmError(
                f"--arm {spec!r}: unknown preset; use one of {sorted(PRESETS)} or "
                "LABEL:key=value,... with fgit keys (weighting, alpha, granularity, ...)"
            )
        fgit = dict(PRESETS[label])
    else:
        fgit = {}
        for item in settings.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ArmError(f"--arm {spec!r}: {item!r} is not key=value")
            fgit[key.strip()] = yaml.safe_load(value)
    try:
        FGITConfig(**fgit)
    except ValidationError as err:
        problems = "; ".join(_explain(e) for e in err.errors())
        raise ArmError(f"--arm {spec!r}: {problems}") from None
    return Arm(label, fgit)


def _explain(error: Any) -> str:
    """One pydantic error as ``fgit.<key>: why``; whole-block checks already name the key."""
    message = error["msg"].removeprefix("Value error, ")
    return f"fgit.{'.'.join(map(str, error['loc']))}: {message}" if error["loc"] else message


@dataclass(frozen=True, kw_only=True)
class Training:
    """What every arm shares."""

    max_steps: int = 30
    sequence_len: int = 1536  # both halves of a pair: each gets up to half
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 2
    learning_rate: float = 1e-4
    extra: dict[str, Any] | None = None  # more Axolotl keys (LoRA, bf16, ...), for all arms


def arm_config(
    arm: Arm, seed: int, base_model: str, pairs: Path, folder: Path, training: Training
) -> dict[str, Any]:
    """The Axolotl config of one arm and seed."""
    import torch

    gpu = torch.cuda.is_available()
    config: dict[str, Any] = {
        "base_model": base_model,
        "plugins": ["axolotl_fgit.FGITPlugin"],
        "fgit": arm.fgit,
        "datasets": [{"path": str(pairs), "type": "axolotl_fgit.strategy"}],
        "dataset_prepared_path": str(folder / "prepared"),
        "val_set_size": 0,
        "output_dir": str(folder / "model"),
        "sequence_len": training.sequence_len,
        "sample_packing": True,
        "micro_batch_size": training.micro_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "max_steps": training.max_steps,
        "learning_rate": training.learning_rate,
        "lr_scheduler": "cosine",
        "warmup_steps": max(1, training.max_steps // 10),
        "optimizer": "adamw_torch",
        "weight_decay": 0.0,
        "bf16": "auto" if gpu else False,
        "fp16": False,
        "attn_implementation": "sdpa",
        "dataset_num_proc": 1,
        "logging_steps": 1,
        # One checkpoint at the end: its trainer_state.json holds the per-step logs.
        "save_strategy": "steps",
        "save_steps": training.max_steps,
        "save_total_limit": 1,
        "seed": seed,
    }
    config.update(training.extra or {})
    return config


def axolotl_command() -> list[str]:
    """``axolotl`` from this environment (beside this Python), else from PATH."""
    beside = Path(sys.executable).with_name("axolotl")
    found = str(beside) if beside.exists() else shutil.which("axolotl")
    if not found:
        raise ArmError("the axolotl command is not installed in this environment")
    return [found]


def train(config: dict[str, Any], folder: Path, launcher: str = "python") -> float:
    """Run ``axolotl train`` on ``config`` (written to ``folder``); the seconds it took.

    The log goes to ``folder/train.log``; a failed run raises with its last lines.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    log = folder / "train.log"
    start = time.monotonic()
    with log.open("w", encoding="utf-8") as fh:
        done = subprocess.run(
            [*axolotl_command(), "train", str(path), "--launcher", launcher],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "AXOLOTL_DO_NOT_TRACK": "1"},
        )
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        raise ArmError(f"axolotl train failed for {path} (log {log}):\n" + "\n".join(tail))
    return time.monotonic() - start


def history(folder: Path) -> list[dict[str, float]]:
    """The per-step training logs (loss, fgit/Hc, fgit/Ha, fgit/pair_acc, ...).

    Read from the final checkpoint's ``trainer_state.json``, which is kept beside the
    model as ``history.json``; the checkpoint (optimizer state) is then removed.
    """
    kept = folder / "history.json"
    states = sorted(
        (folder / "model").glob("checkpoint-*/trainer_state.json"),
        key=lambda p: int(p.parent.name.split("-")[1]),
    )
    if states:
        logs = json.loads(states[-1].read_text())["log_history"]
        kept.write_text(json.dumps(logs, indent=1))
        for state in states:
            shutil.rmtree(state.parent)
    if not kept.exists():
        raise ArmError(f"no trainer_state.json under {folder / 'model'}: did training save?")
    return [entry for entry in json.loads(kept.read_text()) if "loss" in entry]
