"""Project character spans onto real tokens (FGIT-SPEC §1, "Token projection").

Token ``t`` covering characters ``[s, e)`` is marked when ``[s, e)`` overlaps a span.
This works from any Hugging Face fast tokenizer's ``offset_mapping``, on the response
alone or on the response inside its full chat-templated sequence (pass ``shift`` = where
the response starts in the tokenized text), so training and inspection share one rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from preprocess.diff import Span


class TokenMasks(NamedTuple):
    """Per-token vectors: ``line``, ``edit`` ∈ {0, 1} and ``hybrid = line + edit``."""

    line: np.ndarray
    edit: np.ndarray
    hybrid: np.ndarray


def overlap_mask(offsets: np.ndarray, spans: Sequence[Span], shift: int = 0) -> np.ndarray:
    """1 for every token whose character range overlaps a span, else 0.

    ``offsets`` is an ``(T, 2)`` array of ``[start, end)``; empty tokens (special tokens,
    ``(0, 0)``) never overlap. ``spans`` must be sorted and disjoint (``merge_spans``).
    """
    out = np.zeros(len(offsets), dtype=np.int8)
    if not len(spans) or not len(offsets):
        return out
    span_arr = np.asarray(spans, dtype=np.int64) + shift
    starts, ends = offsets[:, 0], offsets[:, 1]
    # First span ending after the token starts; it overlaps iff it also starts before
    # the token ends.
    idx = np.searchsorted(span_arr[:, 1], starts, side="right")
    inside = idx < len(span_arr)
    hit = np.zeros(len(offsets), dtype=bool)
    hit[inside] = span_arr[idx[inside], 0] < ends[inside]
    out[hit & (ends > starts)] = 1
    return out


def project(
    offsets: Sequence[Sequence[int]] | np.ndarray,
    line_spans: Sequence[Span],
    edit_spans: Sequence[Span],
    shift: int = 0,
) -> TokenMasks:
    """Line, edit and hybrid (0/1/2) vectors for the tokens described by ``offsets``."""
    arr = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    line = overlap_mask(arr, line_spans, shift)
    edit = overlap_mask(arr, edit_spans, shift)
    return TokenMasks(line, edit, line + edit)
