"""The ``fgit:`` YAML block, merged into Axolotl's config schema by the plugin.

Validators see the whole Axolotl config, so settings FGIT cannot honour are rejected at
config time with a message that names the key and the fix.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from axolotl_fgit.contract import Columns, ContractError, read_params

LOG = logging.getLogger("axolotl_fgit")
PLUGIN = "axolotl_fgit.FGITPlugin"
STRATEGY_PREFIX = "axolotl_fgit.strategy"


class Weighting(str, Enum):
    """``dynamic``: Bradley–Terry W; ``static``: W = alpha; ``sft``: every weight 1."""

    dynamic = "dynamic"
    static = "static"
    sft = "sft"


class Granularity(str, Enum):
    """Which sensitivity vector V is used: line + edit, line only, edit only."""

    hybrid = "hybrid"
    line = "line"
    token = "token"


class FGITConfig(BaseModel):
    """FGIT's dynamically weighted loss: how tokens of the correct response are weighted."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(
        2.0,
        description="Weight range: shared tokens get alpha-1, "
        "sensitive tokens W in [alpha-1, alpha+1]. Must be >= 1.",
    )
    weighting: Weighting = Weighting.dynamic
    granularity: Granularity = Granularity.hybrid
    detach_weights: bool = Field(
        False,
        description="Stop gradients through W (cheaper: the incorrect response needs no backward).",
    )
    eps: float = Field(1e-6, gt=0, description="Guard for Hc + Ha.")
    logprob_chunk_size: int = Field(
        512,
        ge=16,
        description="Tokens per chunk when projecting hidden states onto the vocabulary.",
    )
    max_truncated_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Largest share of pairs allowed to lose training tokens at "
        "sequence_len / 2 (correct tokens, or sensitive incorrect ones) before training stops "
        "with an error (the count is always logged).",
    )
    share_prefix: bool | Literal["auto"] = Field(
        "auto",
        description="Run the incorrect response only from where it leaves the correct one, "
        "attending to the correct response's tokens before that point (a tree mask, exact for "
        "causal attention). auto: wherever it is exact and the attention backend takes the "
        "mask (SDPA, eager, FlexAttention), else only cut the incorrect response after its "
        "last sensitive "
        "token; true: refuse to train without it; false: never.",
    )
    columns: Columns = Field(default_factory=Columns)

    @field_validator("alpha", "eps", "logprob_chunk_size", "max_truncated_fraction", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's true/false would pass as 1/0: a number is meant, so say which."""
        if isinstance(value, bool):
            default = cls.model_fields[info.field_name].default
            raise ValueError(
                f"fgit.{info.field_name} must be a number, not the boolean {str(value).lower()}; "
                f"for example {info.field_name}: {default}"
            )
        return value

    @model_validator(mode="after")
    def _alpha(self) -> FGITConfig:
        if not math.isfinite(self.alpha) or self.alpha < 1:
            raise ValueError(
                f"fgit.alpha must be a finite number >= 1 (got {self.alpha}); alpha-1 is the "
                "weight of shared tokens. Use alpha: 2.0 for SFT weight 1 on them."
            )
        if self.alpha == 1 and self.weighting != Weighting.sft:
            LOG.warning(
                "fgit.alpha = 1 gives shared (non-sensitive) tokens weight 0: only "
                "error-sensitive tokens are trained"
            )
        return self


def setting(cfg: Any, key: str) -> Any:
    """One key of an Axolotl config, whether a raw mapping, a DictDefault or a pydantic model."""
    return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)


def _zero_stage(deepspeed: Any) -> int | None:
    """The ZeRO stage of a ``deepspeed:`` setting (a JSON path or a dict), if readable."""
    if isinstance(deepspeed, str):
        try:
            deepspeed = json.loads(Path(deepspeed).read_text())
        except (OSError, ValueError):
            return 3 if "zero3" in deepspeed.replace("_", "").lower() else None
    if isinstance(deepspeed, dict):
        return (deepspeed.get("zero_optimization") or {}).get("stage")
    return None


def local_columns(path: str) -> set[str] | None:
    """Column names of a local dataset, read cheaply; None when not local or unknown."""
    p = Path(path)
    try:
        if (p / "dataset_info.json").exists():
            return set(json.loads((p / "dataset_info.json").read_text())["features"])
        if p.suffix in (".jsonl", ".json") and p.is_file():
            with p.open() as fh:
                first = fh.readline()
            return set(json.loads(first)) if p.suffix == ".jsonl" else None
        if p.suffix == ".parquet" and p.is_file():
            import pyarrow.parquet as pq

            return set(pq.read_schema(p).names)
    except (OSError, ValueError, KeyError):
        return None
    return None


# Attention backends that take a mask from the caller, as prefix sharing needs.
TREE_MASK_BACKENDS = ("sdpa", "eager", "flex_attention")
LEGACY_ATTENTION = {  # Axolotl's older boolean keys, and the backend each one names
    "flash_attention": "flash_attention_2",
    "flex_attention": "flex_attention",
    "xformers_attention": "xformers",
    "sage_attention": "sage",
    "s2_attention": "s2_attention",
    "sdp_attention": "sdpa",
    "eager_attention": "eager",
}


def attention_backend(cfg: Any) -> str:
    """The attention backend an Axolotl config asks for (Hugging Face's default: sdpa)."""
    if named := setting(cfg, "attn_implementation"):
        return str(named)
    return next((v for k, v in LEGACY_ATTENTION.items() if setting(cfg, k)), "sdpa")


class FGITArgs(BaseModel):
    """Top-level keys the plugin adds to Axolotl's config."""

    fgit: FGITConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _compatible(cls, data: Any) -> Any:
        """Reject settings FGIT cannot honour, naming the key and the fix."""
        if not isinstance(data, dict) or data.get("fgit") is None:
            return data
        if not isinstance(data["fgit"], (dict, FGITConfig)):
            raise ValueError(
                f"fgit: must be a mapping of FGIT settings, not {data['fgit']!r}; for example "
                "fgit: {alpha: 2.0} (every key is optional)"
            )
        problems = []
        for key in ("context_parallel_size", "sequence_parallel_degree", "tensor_parallel_size"):
            if (setting(data, key) or 1) > 1:
                problems.append(
                    f"{key}: {data[key]} splits sequences across ranks, but FGIT "
                    f"pairs each correct response with its incorrect one in one "
                    f"forward; set {key}: 1"
                )
        others = [
            p
            for p in data.get("plugins") or []
            if p != PLUGIN and any(s in p.lower() for s in ("kd", "diffusion", "grpo", "nemo_gym"))
        ]
        if others:
            problems.append(
                f"plugins: {others} also claim the trainer or collator; FGIT "
                "needs its own. Remove them or remove the fgit: block"
            )
        for flag in ("kd_trainer", "rl", "reward_model", "process_reward_model", "orpo_alpha"):
            if setting(data, flag):
                problems.append(
                    f"{flag} replaces the SFT trainer that FGIT extends; remove "
                    f"{flag} or the fgit: block"
                )
        if _zero_stage(setting(data, "deepspeed")) == 3:
            problems.append(
                "deepspeed: ZeRO-3 partitions lm_head outside the forward, where "
                "FGIT projects hidden states in per-rank chunks; use ZeRO-2 or "
                "FSDP (fsdp_version: 2)"
            )
        from axolotl_fgit.kernels import kernel_problems  # kernels reads configs via setting

        problems += kernel_problems(data)
        if setting(data, "torch_compile"):
            problems.append(
                "torch_compile: FGIT swaps the output head for chunked log-probs inside the "
                "forward, which has not been verified under torch.compile; set "
                "torch_compile: false"
            )
        backend = attention_backend(data)
        if setting(data["fgit"], "share_prefix") is True and backend not in TREE_MASK_BACKENDS:
            problems.append(
                f"fgit.share_prefix: true needs a tree attention mask, which attention backend "
                f"{backend} cannot take; use attn_implementation: sdpa (or eager, "
                "flex_attention), or set fgit.share_prefix: auto to run both halves there, the "
                "incorrect one cut after its last sensitive token"
            )
        if setting(data, "pretraining_dataset"):
            problems.append(
                "pretraining_dataset has no correct/incorrect pairs; use "
                f"datasets: with type: {STRATEGY_PREFIX}"
            )
        datasets = data.get("datasets") or []
        for key in ("datasets", "test_datasets"):
            wrong = [
                setting(d, "type")
                for d in data.get(key) or []
                if not str(setting(d, "type") or "").startswith(STRATEGY_PREFIX)
            ]
            if wrong:
                problems.append(
                    f"{key}: type {wrong} cannot feed FGIT; every entry needs "
                    f"type: {STRATEGY_PREFIX} (output of fgit-preprocess)"
                )
        columns = (
            Columns(**(setting(data["fgit"], "columns") or {}))
            if isinstance(data["fgit"], dict)
            else data["fgit"].columns
        )
        for ds in [*datasets, *(data.get("test_datasets") or [])]:
            try:
                read_params(Path(str(setting(ds, "path") or "")))
            except ContractError as err:
                problems.append(str(err))
            present = local_columns(str(setting(ds, "path") or ""))
            field = setting(ds, "field_messages")
            expected = replace(columns, messages=field) if field else columns
            if present is not None and (missing := expected.missing(present)):
                problems.append(
                    f"dataset {setting(ds, 'path')} lacks FGIT columns {missing} "
                    f"(has {sorted(present)}); run fgit-preprocess on it, or map "
                    "your column names under fgit.columns"
                )
        if problems:
            raise ValueError("fgit: " + "; ".join(problems))
        return data


def fgit_config(cfg: Any) -> FGITConfig:
    """The validated ``fgit:`` block from an Axolotl cfg (dict or pydantic)."""
    raw = setting(cfg, "fgit")
    if isinstance(raw, FGITConfig):
        return raw
    return FGITConfig(**(dict(raw) if raw else {}))
