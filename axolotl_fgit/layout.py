"""Which tokens of a batch the forward runs, where each one sits, and what it attends to.

A pair is stored as two halves, ``[prompt + correct]`` then ``[prompt + incorrect]``. FGIT
reads the incorrect half only at its error-sensitive tokens, so for a causal model most of
that half is redundant, and dropping it is exact:

* ``halves``: every token of both halves (positions restart at each half).
* ``truncated``: the incorrect half stops at its last scored token; later tokens cannot
  change earlier ones. Exact for every model and attention backend.
* ``shared``: also drop the incorrect tokens before its *branch point*, the first position
  where its token differs from the correct half's or is scored. Up to there both halves
  hold the same tokens at the same positions, so the same hidden states: the kept suffix
  continues the positions from the branch point and attends to the correct half's tokens
  before it (a tree mask), and its first token is predicted by the correct half's hidden
  state just before the branch. Needs attention that takes a mask from the caller (SDPA,
  eager, FlexAttention), and no state carried across tokens (state-space layers) or
  windows the branch could cross.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from axolotl_fgit.contract import Side
from axolotl_fgit.loss import FlatBatch
from axolotl_fgit.projection import Wanted


class Layout(str, Enum):
    """How the incorrect half of each pair is run (see the module docstring)."""

    halves = "halves"
    truncated = "truncated"
    shared = "shared"


@dataclass
class Plan:
    """Per flat token: does it run, and which token's hidden state predicts it."""

    run: torch.Tensor  # bool
    prev: torch.Tensor  # flat index of the predicting token (meaningful where pos > 0)
    branch: torch.Tensor | None  # per sample: first incorrect position that runs (shared)


def _per_sample(values: torch.Tensor, sample: torch.Tensor, n: int, fill: int, how: str):
    """``how`` (``amax``/``amin``) of ``values`` per sample; ``fill`` where a sample has none."""
    out = torch.full((n,), fill, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, sample, values, how, include_self=True)


def plan(flat: FlatBatch, layout: Layout) -> Plan:
    """Which tokens of ``flat`` the forward runs under ``layout``."""
    idx = torch.arange(flat.ids.numel(), device=flat.ids.device)
    prev = idx - 1
    incorrect = flat.side == Side.INCORRECT
    if layout == Layout.halves:
        return Plan(torch.ones_like(incorrect), prev, None)
    scored = flat.incorrect_sensitive
    n, pos, sample = flat.n_samples, flat.pos, flat.sample
    last = _per_sample(pos[scored], sample[scored], n, -1, "amax")
    run = ~incorrect | (pos <= last[sample])
    if layout == Layout.truncated:
        return Plan(run, prev, None)
    correct = flat.side == Side.CORRECT
    start = torch.zeros(n, dtype=idx.dtype, device=idx.device)
    start[sample[correct & (pos == 0)]] = idx[correct & (pos == 0)]
    n_correct = torch.bincount(sample[correct], minlength=n)
    twin = (start[sample] + pos).clamp(max=idx.numel() - 1)  # correct token at the same position
    differs = (pos >= n_correct[sample]) | (flat.ids != flat.ids[twin])
    leaves = incorrect & (differs | scored)
    branch = _per_sample(pos[leaves], sample[leaves], n, pos.numel() and int(pos.max()) + 1, "amin")
    run &= ~incorrect | (pos >= branch[sample])
    first = incorrect & (pos == branch[sample]) & (pos > 0)
    prev = torch.where(first, start[sample] + pos - 1, prev)
    return Plan(run, prev, branch)


def place(flat: FlatBatch, part: torch.Tensor, one_row: bool) -> tuple[torch.Tensor, ...]:
    """Place the ``part`` tokens in ``[rows, length]`` tensors: ids, positions, row, column.

    With flash-attention (``one_row``) every sequence goes into one row, its varlen path;
    otherwise each batch row stays a row, so SDPA and eager attention build per-row masks
    (rows × length²) instead of one mask over the whole micro-batch.
    """
    ids, pos = flat.ids[part], flat.pos[part]
    row = torch.zeros_like(ids) if one_row else torch.unique(flat.row[part], return_inverse=True)[1]
    n_rows = int(row.max()) + 1 if row.numel() else 1
    counts = torch.bincount(row, minlength=n_rows)
    col = torch.arange(ids.numel(), device=ids.device) - (torch.cumsum(counts, 0) - counts)[row]
    shape = (n_rows, int(counts.max()) if row.numel() else 0)
    ids2d = ids.new_zeros(shape).index_put_((row, col), ids)
    pos2d = pos.new_zeros(shape).index_put_((row, col), pos)
    return ids2d, pos2d, row, col


def tree_mask(
    flat: FlatBatch,
    part: torch.Tensor,
    branch: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    shape: tuple[int, int],
    backend: str,
) -> Any:
    """The mask of one forward: each token sees its own half's causal past and, in an
    incorrect suffix, the correct half's tokens before the branch point.

    In the form ``backend`` takes: ``[rows, 1, length, length]`` booleans (True = attend)
    for SDPA, 0 / -inf for eager attention, a block-sparse ``BlockMask`` for FlexAttention.
    Every position sees itself, so padding rows never softmax over nothing.
    """

    def grid(values: torch.Tensor, fill: int) -> torch.Tensor:
        return values.new_full(shape, fill).index_put_((row, col), values)

    sample = grid(flat.sample[part], -1)
    side = grid(flat.side[part], int(Side.PAD))
    pos = grid(flat.pos[part], 0)
    cut = grid(branch[flat.sample[part]], 0)

    def visible(b, q, k) -> torch.Tensor:
        return (q == k) | (
            (sample[b, q] == sample[b, k])
            & (sample[b, k] >= 0)
            & (pos[b, k] <= pos[b, q])
            & (
                (side[b, q] == side[b, k])
                | ((side[b, k] == int(Side.CORRECT)) & (pos[b, k] < cut[b, q]))
            )
        )

    if backend == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(
            lambda b, h, q, k: visible(b, q, k),
            shape[0],
            None,
            shape[1],
            shape[1],
            device=sample.device,
        )
    b = torch.arange(shape[0], device=sample.device)[:, None, None]
    q = torch.arange(shape[1], device=sample.device)[None, :, None]
    dense = visible(b, q, q.transpose(1, 2))[:, None]
    if backend == "sdpa":
        return dense
    return torch.zeros(dense.shape, device=dense.device).masked_fill_(~dense, torch.finfo().min)


def wanted(
    flat: FlatBatch,
    layout_plan: Plan,
    part: torch.Tensor,
    selections: list[torch.Tensor],
    one_row: bool,
    backend: str = "sdpa",
) -> Wanted:
    """One forward over the ``part`` tokens that predicts every selected token.

    Under the shared layout (``layout_plan.branch`` set) the forward gets its tree mask in
    the form the attention ``backend`` takes (see ``tree_mask``).
    """
    ids, pos, row, col = place(flat, part, one_row)
    index = torch.cumsum(part.long(), 0) - 1  # position of each token inside ``part``
    chosen = torch.cat([s.nonzero().squeeze(1) for s in selections])
    at, hidden = index[chosen], index[layout_plan.prev[chosen]]
    mask = None
    if layout_plan.branch is not None:
        mask = tree_mask(flat, part, layout_plan.branch, row, col, tuple(ids.shape), backend)
    return Wanted(ids, pos, row[hidden], col[hidden], ids[row[at], col[at]], mask)
