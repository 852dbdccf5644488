"""Collators: restart position ids at each half of a pair, pad the FGIT columns.

Position ids are rebuilt per sample as ``range(len(correct half)) + range(len(incorrect
half))``, overriding Axolotl's ``range(len(input_ids))``: with packing (multipack,
varlen attention) and without it (the trainer flattens padded rows into one packed
row), attention never crosses from one half, or one sample, to another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from axolotl.utils.collators import DataCollatorForSeq2Seq, V2BatchSamplerDataCollatorForSeq2Seq

from axolotl_fgit.loss import CORRECT
from axolotl_fgit.strategy import FGIT_COLUMNS


def pair_positions(side) -> np.ndarray:
    """``0..n-1`` over the correct half, then ``0..m-1`` over the incorrect half."""
    side = np.asarray(side)
    n_good = int((side == CORRECT).sum())
    return np.concatenate([np.arange(n_good), np.arange(len(side) - n_good)]).astype(np.int64)


class _SamplePositions:
    """Rewrites ``position_ids`` of each sample before packing or padding."""

    def __call__(self, features, return_tensors=None):
        groups = features if isinstance(features[0], list) else [features]
        for group in groups:
            for feature in group:
                feature["position_ids"] = pair_positions(feature["fgit_side"])
        return super().__call__(features, return_tensors=return_tensors)


class _PadFGITColumns(DataCollatorForSeq2Seq):
    """Pads ``fgit_*`` columns with 0 to the longest ``input_ids`` (tokenizer.pad won't).

    A subclass of the padding collator, so that it runs right before it in every MRO.
    """

    def __call__(self, features, return_tensors=None):
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        right = self.tokenizer.padding_side == "right"
        for feature in features:
            for name in FGIT_COLUMNS:
                values = np.asarray(feature[name], dtype=np.int64)
                pad = np.zeros(longest - len(values), dtype=np.int64)
                feature[name] = np.concatenate([values, pad] if right else [pad, values])
        return super().__call__(features, return_tensors=return_tensors)


@dataclass
class FGITDataCollator(_SamplePositions, _PadFGITColumns):
    """Padded (non-packed) batches of FGIT pairs."""


@dataclass
class FGITPackedDataCollator(_SamplePositions, V2BatchSamplerDataCollatorForSeq2Seq, _PadFGITColumns):
    """Multipack batches: samples concatenated into rows, positions restarting per half."""
