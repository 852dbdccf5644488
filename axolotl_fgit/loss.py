"""FGIT's dynamically weighted loss as pure tensor functions.

Batches arrive as rows of pairs (``fgit_side``: correct half, incorrect half, padding) and
are flattened into one packed token stream; ``sample`` indexes the pair each token belongs
to. Per sample, ``Hc`` and ``Ha`` are the sensitivity-weighted mean probabilities of the
error-sensitive tokens of the correct and the incorrect response; the Bradley–Terry weight
``W = α + 1 − 2·Hc/(Hc+Ha)`` then scales the loss of the correct response's sensitive tokens,
and every other trained token gets ``α − 1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from axolotl_fgit.args import FGITConfig, Granularity, Weighting
from axolotl_fgit.contract import IGNORE_INDEX, Side


@dataclass
class FlatBatch:
    """All real tokens of a batch, in order, as 1-D tensors."""

    ids: torch.Tensor
    pos: torch.Tensor
    row: torch.Tensor  # the batch row each token came from
    side: torch.Tensor
    labels: torch.Tensor
    v: torch.Tensor  # sensitivity V (0, 1 or 2) per token
    sample: torch.Tensor  # pair index per token
    n_samples: int

    @property
    def correct_tokens(self) -> torch.Tensor:
        """Trainable tokens of the correct responses (they carry labels)."""
        return (self.labels != IGNORE_INDEX) & (self.side == Side.CORRECT) & (self.pos > 0)

    @property
    def incorrect_sensitive(self) -> torch.Tensor:
        """Error-sensitive tokens of the incorrect responses (they define Ha)."""
        return (self.side == Side.INCORRECT) & (self.v > 0) & (self.pos > 0)


def sensitivity(line: torch.Tensor, edit: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """V per token: ``hybrid`` = line + edit, ``line`` = line, ``token`` = edit."""
    return {
        Granularity.hybrid: lambda: line + edit,
        Granularity.line: lambda: line,
        Granularity.token: lambda: edit,
    }[Granularity(granularity)]()


def flatten(batch: Mapping[str, torch.Tensor], granularity: Granularity) -> FlatBatch:
    """Drop padding and number the pairs: a pair starts at a correct-half position 0."""
    side = batch["fgit_side"]
    keep = side > Side.PAD
    pos, s = batch["position_ids"][keep], side[keep]
    row = torch.arange(side.shape[0], device=side.device)[:, None].expand_as(side)[keep]
    sample = torch.cumsum(((pos == 0) & (s == Side.CORRECT)).long(), 0) - 1
    v = sensitivity(batch["fgit_line"][keep], batch["fgit_edit"][keep], granularity).float()
    return FlatBatch(
        batch["input_ids"][keep],
        pos,
        row,
        s,
        batch["labels"][keep],
        v,
        sample,
        int(sample.max().item()) + 1 if sample.numel() else 0,
    )


@dataclass
class SideTokens:
    """The selected tokens of one side: log-probability, sensitivity V and pair index."""

    logp: torch.Tensor
    v: torch.Tensor
    sample: torch.Tensor


class Strength(NamedTuple):
    """``H`` per sample, and whether the sample has any sensitive token on that side."""

    value: torch.Tensor
    present: torch.Tensor


def strength(side: SideTokens, n_samples: int) -> Strength:
    """``H_i = Σ V p / Σ V`` over each sample's tokens, and whether ``Σ V > 0``."""
    p = side.logp.exp()
    num = p.new_zeros(n_samples).index_add(0, side.sample, side.v * p)
    den = p.new_zeros(n_samples).index_add(0, side.sample, side.v)
    return Strength(num / den.clamp_min(torch.finfo(den.dtype).tiny), den > 0)


def pair_weight(correct: Strength, incorrect: Strength, cfg: FGITConfig) -> torch.Tensor:
    """W per sample: Bradley–Terry ``α + 1 − 2·Hc/(Hc+Ha)`` (``dynamic``) or ``α`` (``static``).

    A sample with sensitive correct tokens but none in the incorrect response (a pure
    insertion) gets ``α``; a sample without sensitive correct tokens never uses W.
    """
    hc, alpha = correct.value, cfg.alpha
    if cfg.weighting == Weighting.static:
        return torch.full_like(hc, alpha)
    w = alpha + 1 - 2 * hc / (hc + incorrect.value).clamp_min(cfg.eps)
    w = torch.where(incorrect.present, w, torch.full_like(w, alpha))
    return torch.where(correct.present, w, torch.full_like(w, alpha - 1))


def token_weights(w_pair: torch.Tensor, correct: SideTokens, cfg: FGITConfig) -> torch.Tensor:
    """``w_j = W`` on sensitive correct tokens, ``α − 1`` elsewhere; all 1 for ``sft``."""
    if cfg.weighting == Weighting.sft:
        return torch.ones_like(correct.v)
    return torch.where(
        correct.v > 0, w_pair[correct.sample], torch.full_like(correct.v, cfg.alpha - 1)
    )


@dataclass
class LossParts:
    """The loss and what the metrics need."""

    loss: torch.Tensor
    h_correct: Strength
    h_incorrect: Strength
    w_pair: torch.Tensor
    sensitive: torch.Tensor  # share of correct tokens with V > 0 (0-d)

    def detach(self) -> LossParts:
        return LossParts(
            self.loss.detach(),
            Strength(*(t.detach() for t in self.h_correct)),
            Strength(*(t.detach() for t in self.h_incorrect)),
            self.w_pair.detach(),
            self.sensitive.detach(),
        )


def fgit_loss(
    correct: SideTokens,
    incorrect: SideTokens,
    n_samples: int,
    num_items: torch.Tensor | int,
    cfg: FGITConfig,
) -> LossParts:
    """``Σ w_j · (−log p_j^c) / N`` with FGIT's weights (N counted as Hugging Face does)."""
    h_correct, h_incorrect = strength(correct, n_samples), strength(incorrect, n_samples)
    w_pair = pair_weight(h_correct, h_incorrect, cfg)
    if cfg.detach_weights:
        w_pair = w_pair.detach()
    w = token_weights(w_pair, correct, cfg)
    loss = (w * -correct.logp).sum() / num_items
    sensitive = (correct.v > 0).float().mean() if correct.v.numel() else correct.v.new_zeros(())
    return LossParts(loss, h_correct, h_incorrect, w_pair, sensitive)
