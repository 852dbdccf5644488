"""Collators: restart position ids at each half of a pair, carry FGIT's token columns.

Position ids are rebuilt per sample as ``range(len(correct half)) + range(len(incorrect
half))``, overriding Axolotl's ``range(len(input_ids))``: with packing (multipack, varlen
attention) and without it (the trainer flattens padded rows into one packed row),
attention never crosses from one half, or one sample, to another.

Axolotl's collators know nothing of ``fgit_side``/``fgit_line``/``fgit_edit``, so these
columns are taken out before Axolotl's collator runs and put back afterwards, joined per
packed row and padded with 0 (``Side.PAD``) to the width that collator chose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from axolotl.utils.collators import DataCollatorForSeq2Seq, V2BatchSamplerDataCollatorForSeq2Seq

from axolotl_fgit.contract import TOKEN_COLUMNS, TRUNCATED_COLUMN, Side

Feature = dict[str, Any]


def pair_positions(side: Sequence[int]) -> np.ndarray:
    """``0..n-1`` over the correct half, then ``0..m-1`` over the incorrect half."""
    side = np.asarray(side)
    n_correct = int((side == Side.CORRECT).sum())
    return np.concatenate([np.arange(n_correct), np.arange(len(side) - n_correct)]).astype(np.int64)


def take_token_columns(rows: Sequence[Sequence[Feature]]) -> dict[str, list[np.ndarray]]:
    """Remove FGIT's columns from every feature and return them joined per output row.

    Each row is the list of samples that end up in one batch row (one sample unless packed),
    and position ids are set per sample on the way.
    """
    out: dict[str, list[np.ndarray]] = {name: [] for name in TOKEN_COLUMNS}
    for row in rows:
        for feature in row:
            feature["position_ids"] = pair_positions(feature["fgit_side"])
            feature.pop(TRUNCATED_COLUMN, None)  # counted by the trainer, not a model input
        for name in TOKEN_COLUMNS:
            out[name].append(np.concatenate([np.asarray(f.pop(name), dtype=np.int64) for f in row]))
    return out


def put_token_columns(batch: Any, columns: dict[str, list[np.ndarray]], left: bool) -> Any:
    """Add the columns to a collated batch, padded with 0 to its ``input_ids`` width."""
    width = batch["input_ids"].shape[1]
    for name, rows in columns.items():
        padded = np.zeros((len(rows), width), dtype=np.int64)
        for i, values in enumerate(rows):
            if left:
                padded[i, width - len(values) :] = values
            else:
                padded[i, : len(values)] = values
        batch[name] = torch.from_numpy(padded)
    return batch


@dataclass
class FGITDataCollator(DataCollatorForSeq2Seq):
    """Padded (non-packed) batches of FGIT pairs."""

    def __call__(self, features: list[Feature], return_tensors=None):
        columns = take_token_columns([[f] for f in features])
        batch = super().__call__(features, return_tensors=return_tensors)
        return put_token_columns(batch, columns, self.tokenizer.padding_side == "left")


@dataclass
class FGITPackedDataCollator(V2BatchSamplerDataCollatorForSeq2Seq):
    """Multipack batches: samples concatenated into rows, positions restarting per half."""

    def __call__(self, features: list[list[Feature]], return_tensors=None):
        rows = features if isinstance(features[0], list) else [features]
        columns = take_token_columns(rows)
        batch = super().__call__(features, return_tensors=return_tensors)
        return put_token_columns(batch, columns, self.tokenizer.padding_side == "left")
