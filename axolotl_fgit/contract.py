"""The FGIT data contract: what ``fgit-preprocess`` writes and the plugin and ``fgit-eval`` read.

One dataset row pairs a prompt with a ``correct`` and an ``incorrect`` response, plus four
lists of half-open ``[start, end)`` character spans into those responses (changed lines and
changed characters, per side). Spans are tokenizer-independent; ``project`` turns them into
per-token vectors for any fast tokenizer. ``fgit_params.json`` beside the Arrow files records
``format_version``; readers refuse a dataset written under another version.

Numpy only, so both sides import it without pulling in torch, Axolotl or the diff stack.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

FORMAT_VERSION = 1
PARAMS_FILE = "fgit_params.json"
IGNORE_INDEX = -100  # label of a token that is not trained (Hugging Face's convention)

Span = tuple[int, int]


class Side(IntEnum):
    """Which half of a pair a token belongs to (the ``fgit_side`` column)."""

    PAD = 0
    CORRECT = 1
    INCORRECT = 2


# Per-token columns the prompt strategy adds beside input_ids/labels/attention_mask.
TOKEN_COLUMNS = ("fgit_side", "fgit_line", "fgit_edit")
# Per-sample flag the prompt strategy adds: 1 when a half was cut at sequence_len / 2.
TRUNCATED_COLUMN = "fgit_truncated"


@dataclass(frozen=True)
class Columns:
    """Dataset column names; defaults are what ``fgit-preprocess`` writes.

    Users with their own names map them under ``fgit.columns`` in the Axolotl config.
    """

    __pydantic_config__ = {"extra": "forbid"}  # unknown keys under fgit.columns are errors

    prompt: str = "prompt"
    messages: str = "messages"
    correct: str = "correct"
    incorrect: str = "incorrect"
    correct_line_spans: str = "correct_line_spans"
    correct_edit_spans: str = "correct_edit_spans"
    incorrect_line_spans: str = "incorrect_line_spans"
    incorrect_edit_spans: str = "incorrect_edit_spans"

    @property
    def spans(self) -> tuple[str, str, str, str]:
        """The four span columns: correct line, correct edit, incorrect line, incorrect edit."""
        return (
            self.correct_line_spans,
            self.correct_edit_spans,
            self.incorrect_line_spans,
            self.incorrect_edit_spans,
        )

    def missing(self, present: Iterable[str]) -> list[str]:
        """Required columns absent from ``present`` (a prompt or a messages column counts)."""
        have = set(present)
        out = [c for c in (self.correct, self.incorrect, *self.spans) if c not in have]
        if self.prompt not in have and self.messages not in have:
            out.append(f"{self.prompt} or {self.messages}")
        return out


DEFAULT_COLUMNS = Columns()


class ContractError(ValueError):
    """A dataset that does not follow the FGIT data contract; the message names the fix."""


def check_spans(spans: Any, text_length: int, column: str) -> list[Span]:
    """``spans`` as sorted, disjoint, in-range ``(start, end)`` pairs, or ContractError."""
    out: list[Span] = []
    for span in spans or []:
        if not (isinstance(span, Sequence) and len(span) == 2):
            raise ContractError(f"{column}: {span!r} is not a [start, end] pair")
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end <= text_length or (out and start < out[-1][1]):
            raise ContractError(
                f"{column}: span {[start, end]} is out of order or outside the "
                f"response (length {text_length}); regenerate the dataset with "
                "fgit-preprocess"
            )
        out.append((start, end))
    return out


def read_params(folder: Path) -> dict[str, Any] | None:
    """``fgit_params.json`` of a dataset folder (None when absent), refusing other versions."""
    path = Path(folder) / PARAMS_FILE
    if not path.is_file():
        return None
    params = json.loads(path.read_text())
    version = params.get("format_version")
    if version != FORMAT_VERSION:
        raise ContractError(
            f"{folder} was written under FGIT data format version {version!r}, "
            f"but this axolotl-fgit reads version {FORMAT_VERSION}; rerun "
            "fgit-preprocess with this version on the source data"
        )
    return params


def params_record(**params: Any) -> dict[str, Any]:
    """What ``fgit-preprocess`` writes to ``fgit_params.json``: the version, then ``params``."""
    return {"format_version": FORMAT_VERSION, "columns": asdict(DEFAULT_COLUMNS), **params}


class TokenMasks(NamedTuple):
    """Per-token vectors: ``line``, ``edit`` ∈ {0, 1} and ``hybrid = line + edit``."""

    line: np.ndarray
    edit: np.ndarray
    hybrid: np.ndarray


def overlap_mask(offsets: np.ndarray, spans: Sequence[Span], shift: int = 0) -> np.ndarray:
    """1 for every token whose character range overlaps a span, else 0.

    ``offsets`` is a ``(T, 2)`` array of ``[start, end)``; empty tokens (special tokens,
    ``(0, 0)``) never overlap. ``spans`` must be sorted and disjoint.
    """
    out = np.zeros(len(offsets), dtype=np.int8)
    if not len(spans) or not len(offsets):
        return out
    span_arr = np.asarray(spans, dtype=np.int64).reshape(-1, 2) + shift
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
    """Line, edit and hybrid (0/1/2) vectors for the tokens described by ``offsets``.

    Token ``t`` covering characters ``[s, e)`` is marked when ``[s, e)`` overlaps a span.
    ``shift`` is where the response starts in the tokenized text, so the same rule serves a
    response alone and a response inside its chat-templated sequence.
    """
    arr = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    line = overlap_mask(arr, line_spans, shift)
    edit = overlap_mask(arr, edit_spans, shift)
    return TokenMasks(line, edit, line + edit)


def row_spans(row: Mapping[str, Any], columns: Columns = DEFAULT_COLUMNS) -> dict[str, list[Span]]:
    """The four span lists of a row, checked against their response lengths."""
    lengths = {
        columns.correct_line_spans: len(row[columns.correct]),
        columns.correct_edit_spans: len(row[columns.correct]),
        columns.incorrect_line_spans: len(row[columns.incorrect]),
        columns.incorrect_edit_spans: len(row[columns.incorrect]),
    }
    return {c: check_spans(row[c], n, c) for c, n in lengths.items()}
