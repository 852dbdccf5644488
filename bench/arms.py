"""The arms of an A/B: one Axolotl config each, trained through the real ``axolotl train``.

Every arm gets the same base model, data, data order (seed), steps and optimiser, and the
same chat template; what differs is how the pairs train it:

- FGIT arms (``sft``, ``dynamic``, ``static``, ``LABEL:key=value,...``): the plugin with
  their ``fgit:`` block. ``sft`` is ``weighting: sft`` (every token weight 1): plain SFT on
  the correct answers through the same pipeline, so the comparison isolates FGIT's weighting.
- Preference arms (``dpo``, ``rpo``): Axolotl's own ``rl: dpo`` on the same pairs, chosen =
  correct, rejected = incorrect, without the plugin. Their learning rate and beta are those
  of Axolotl's DPO example for full fine-tuning of a small model (``examples/qwen2/dpo.yaml``:
  Qwen2.5-0.5B, ``learning_rate: 0.0002``, beta unset, i.e. TRL's 0.1). ``rpo`` adds the
  NLL of the chosen answer with weight 1 (TRL's ``loss_type: [sigmoid, sft]``, which
  replaced ``rpo_alpha``; Axolotl passes it as ``dpo_loss_type`` / ``dpo_loss_weights``).
  ``dpo-1e6`` is ``dpo`` at TRL's own default learning rate for DPO (1e-6), the usual scale
  for full fine-tuning: at the example's 2e-4, 30 steps of DPO left SmolLM2-135M writing
  no runnable code at all.
- Compute-matched arms (``sft-matched``): SFT given as many optimiser steps as fit in
  another arm's measured training time (``LABEL:matched=ARM``).

No arm packs samples, so every step of every arm holds the same pairs in the same order.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from axolotl_fgit.args import FGITConfig

# Axolotl's DPO example for full fine-tuning of a small model (examples/qwen2/dpo.yaml).
DPO: dict[str, Any] = {"rl": "dpo", "rl_beta": 0.1, "learning_rate": 2e-4}
# Keys a preference arm may set: Axolotl's own, at the top level of its config, typed as
# Axolotl's config schema types them.
PREFERENCE_KEYS = ("rl", "rl_beta", "learning_rate", "dpo_loss_type", "dpo_loss_weights",
                   "dpo_label_smoothing")  # fmt: skip
PREFERENCE_RL = ("dpo", "ipo")  # the losses that train on chosen/rejected pairs as given


class ArmError(ValueError):
    """An arm that cannot be trained as given (bad spec or a failed run)."""


@dataclass(frozen=True)
class Arm:
    """A label and how it trains: exactly one of ``fgit``, ``preference``, ``matched``."""

    label: str
    fgit: dict[str, Any] | None = None  # the plugin's fgit: block
    preference: dict[str, Any] | None = None  # top-level Axolotl keys (rl: dpo, ...)
    matched: str | None = None  # SFT for as long as this arm trained

    @property
    def kind(self) -> str:
        return "fgit" if self.fgit is not None else "preference" if self.preference else "matched"


PRESETS: dict[str, Arm] = {
    "sft": Arm("sft", fgit={"weighting": "sft"}),
    "dynamic": Arm("dynamic", fgit={"weighting": "dynamic"}),
    "static": Arm("static", fgit={"weighting": "static"}),
    "dpo": Arm("dpo", preference=DPO),
    "rpo": Arm(
        "rpo",
        preference={**DPO, "dpo_loss_type": ["sigmoid", "sft"], "dpo_loss_weights": [1.0, 1.0]},
    ),
    "dpo-1e6": Arm("dpo-1e6", preference={**DPO, "learning_rate": 1e-6}),
    "sft-matched": Arm("sft-matched", matched="dynamic"),
}
# The arm a compute-matched arm's steps are counted in (its time per step).
MATCHED_BASE = "sft"


def parse_arm(spec: str) -> Arm:
    """A preset (``sft``, ``dynamic``, ``static``, ``dpo``, ``rpo``, ``dpo-1e6``,
    ``sft-matched``) or ``LABEL:key=value,...``: fgit keys (``a4:weighting=dynamic,alpha=4``),
    Axolotl preference keys with ``rl`` (``dpo-b05:rl=dpo,rl_beta=0.05``), or ``matched=ARM``."""
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
        return PRESETS[label]
    keys = {}
    for item in re.split(r",(?![^\[]*\])", settings):  # commas inside [...] belong to a list
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ArmError(f"--arm {spec!r}: {item!r} is not key=value")
        keys[key.strip()] = yaml.safe_load(value)
    if "matched" in keys:
        if set(keys) != {"matched"} or not isinstance(keys["matched"], str):
            raise ArmError(f"--arm {spec!r}: matched=ARM takes no other key")
        return Arm(label, matched=keys["matched"])
    if "rl" in keys:
        return Arm(label, preference=_preference(spec, keys))
    try:
        FGITConfig(**keys)
    except ValidationError as err:
        problems = "; ".join(_explain(e) for e in err.errors())
        raise ArmError(f"--arm {spec!r}: {problems}") from None
    return Arm(label, fgit=keys)


def check_arms(arms: list[Arm]) -> None:
    """Labels unique and not ``base``; a matched arm names an FGIT or preference arm of
    this run and needs ``sft`` beside it (its time per step)."""
    labels = [a.label for a in arms]
    if len(set(labels)) < len(labels) or "base" in labels:
        raise ArmError("--arm labels must be unique and not 'base'")
    trained = {a.label for a in arms if a.kind != "matched"}
    for arm in arms:
        if arm.kind == "matched" and (arm.matched not in trained or MATCHED_BASE not in labels):
            raise ArmError(
                f"--arm {arm.label}: matched={arm.matched} needs --arm {arm.matched} and "
                f"--arm {MATCHED_BASE} in the same run (it is given {arm.matched}'s training "
                f"time in {MATCHED_BASE}'s steps)"
            )


def _preference(spec: str, keys: dict[str, Any]) -> dict[str, Any]:
    """A preference arm's keys, checked against (and coerced to) the types of Axolotl's own
    config schema, so a bad value stops the run before any work, not at its training."""
    from axolotl.utils.schemas.config import AxolotlInputConfig

    unknown = sorted(set(keys) - set(PREFERENCE_KEYS))
    if unknown or keys["rl"] not in PREFERENCE_RL:
        raise ArmError(
            f"--arm {spec!r}: a preference arm takes rl ({' or '.join(PREFERENCE_RL)}) and "
            f"{list(PREFERENCE_KEYS[1:])}; not {unknown or keys['rl']}"
        )
    checked = {}
    for key, value in keys.items():
        typed = TypeAdapter(AxolotlInputConfig.model_fields[key].annotation)
        try:
            checked[key] = typed.dump_python(typed.validate_python(value), mode="json")
        except ValidationError as err:
            why = "; ".join(e["msg"] for e in err.errors())
            raise ArmError(f"--arm {spec!r}: {key}={value!r}: {why}") from None
    if "learning_rate" in checked:  # typed `str | float`: Axolotl makes it a float later
        try:
            rate = float(checked["learning_rate"])
        except ValueError:
            rate = math.nan
        if not (math.isfinite(rate) and rate >= 0):  # as --learning-rate (and AdamW) require
            raise ArmError(
                f"--arm {spec!r}: learning_rate={keys['learning_rate']!r} is not a number >= 0"
            )
        checked["learning_rate"] = rate
    return checked


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
    gradient_accumulation_steps: int = 4  # pairs per optimiser step (no packing)
    learning_rate: float = 1e-4  # FGIT and SFT arms; preference arms set their own
    extra: dict[str, Any] | None = None  # more Axolotl keys, for all arms


def arm_config(
    arm: Arm,
    seed: int,
    base_model: str,
    pairs: Path,
    folder: Path,
    training: Training,
    steps: int | None = None,
) -> dict[str, Any]:
    """The Axolotl config of one arm and seed (``steps``: a matched arm's count)."""
    import torch

    gpu = torch.cuda.is_available()
    config: dict[str, Any] = {
        "base_model": base_model,
        "chat_template": "tokenizer_default",
        "dataset_prepared_path": str(folder / "prepared"),
        "val_set_size": 0,
        "output_dir": str(folder / "model"),
        "sequence_len": training.sequence_len,
        "sample_packing": False,
        "micro_batch_size": training.micro_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "max_steps": steps or training.max_steps,
        "learning_rate": training.learning_rate,
        "lr_scheduler": "cosine",
        "warmup_steps": max(1, (steps or training.max_steps) // 10),
        "optimizer": "adamw_torch",
        "weight_decay": 0.0,
        "bf16": "auto" if gpu else False,
        "fp16": False,
        "attn_implementation": "sdpa",
        "dataset_num_proc": 1,
        "logging_steps": 1,
        # One checkpoint at the end: its trainer_state.json holds the per-step logs.
        "save_strategy": "steps",
        "save_steps": steps or training.max_steps,
        "save_total_limit": 1,
        "seed": seed,
    }
    if arm.preference:
        dataset = {
            "path": str(pairs),
            "type": "chat_template.default",
            "field_messages": "prompt",  # a string: the user turn, as the FGIT strategy reads it
            "field_chosen": "correct",
            "field_rejected": "incorrect",
        }
        config.update({"datasets": [dataset], **arm.preference})
    else:
        fgit = arm.fgit if arm.fgit is not None else PRESETS[MATCHED_BASE].fgit
        config.update(
            {
                "plugins": ["axolotl_fgit.FGITPlugin"],
                "fgit": fgit,
                "datasets": [{"path": str(pairs), "type": "axolotl_fgit.strategy"}],
            }
        )
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


def history(folder: Path) -> list[dict[str, Any]]:
    """The training logs (per step: loss, fgit/Hc, fgit/Ha, fgit/pair_acc, ...; at the
    end: train_runtime).

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
    return json.loads(kept.read_text())


def steps_logged(logs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The per-step entries of ``history`` (those with a loss)."""
    return [entry for entry in logs if "loss" in entry]


def train_runtime(folder: Path) -> float:
    """Seconds the training loop ran (the Trainer's ``train_runtime``, without loading or
    preprocessing): the time a compute-matched arm is given. The Trainer logs it after
    the last checkpoint is written, so it is read from the run's log."""
    found = re.findall(r"'train_runtime': '?([0-9.]+)", (folder / "train.log").read_text())
    if not found:
        raise ArmError(f"{folder / 'train.log'} has no train_runtime: did training finish?")
    return float(found[-1])
