"""FGIT's dynamically weighted loss (FGIT-SPEC §2) as pure tensor functions.

Batches arrive as rows of pairs (``fgit_side`` 1 = correct half, 2 = incorrect half, 0 =
padding) and are flattened into one packed token stream; ``sample`` indexes the pair
each token belongs to. Per-token log-probabilities are computed from hidden states in
chunks (``token_logprobs``), so the vocabulary projection never materialises
``tokens × vocab`` logits, and its backward recomputes one chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

IGNORE = -100
CORRECT, INCORRECT = 1, 2


@dataclass
class FlatBatch:
    """All real tokens of a batch, in order, as 1-D tensors."""

    ids: torch.Tensor
    pos: torch.Tensor
    side: torch.Tensor
    labels: torch.Tensor
    v: torch.Tensor  # sensitivity V (0, 1 or 2) per token
    sample: torch.Tensor  # pair index per token
    n_samples: int

    @property
    def correct_tokens(self) -> torch.Tensor:
        """Trainable tokens of the correct responses (they carry labels)."""
        return (self.labels != IGNORE) & (self.side == CORRECT) & (self.pos > 0)

    @property
    def incorrect_sensitive(self) -> torch.Tensor:
        """Error-sensitive tokens of the incorrect responses (they define Ha)."""
        return (self.side == INCORRECT) & (self.v > 0) & (self.pos > 0)


def sensitivity(line: torch.Tensor, edit: torch.Tensor, granularity: str) -> torch.Tensor:
    """V per token: ``hybrid`` = line + edit, ``line`` = line, ``token`` = edit."""
    if granularity == "hybrid":
        return line + edit
    if granularity == "line":
        return line
    if granularity == "token":
        return edit
    raise ValueError(f"unknown granularity {granularity!r}")


def flatten(input_ids, labels, position_ids, side, line, edit, granularity: str) -> FlatBatch:
    """Drop padding and number the pairs: a pair starts at a correct-half position 0."""
    keep = side > 0
    pos, s = position_ids[keep], side[keep]
    sample = torch.cumsum(((pos == 0) & (s == CORRECT)).long(), 0) - 1
    return FlatBatch(input_ids[keep], pos, s, labels[keep],
                     sensitivity(line[keep], edit[keep], granularity).float(), sample,
                     int(sample.max().item()) + 1 if sample.numel() else 0)


def _chunk_logprobs(head: Callable, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def token_logprobs(hidden: torch.Tensor, head: Callable, targets: torch.Tensor,
                   chunk_size: int) -> torch.Tensor:
    """``log softmax(head(hidden))[target]`` per row, ``chunk_size`` rows at a time.

    Under autograd each chunk is checkpointed: its logits are freed after the forward
    and recomputed in the backward, so peak memory follows the chunk, not the batch.
    """
    out = []
    for start in range(0, targets.numel(), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            out.append(checkpoint(_chunk_logprobs, head, h, t, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(head, h, t))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def strengths(p: torch.Tensor, v: torch.Tensor, sample: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``H_i = Σ V p / Σ V`` over each sample's tokens, and whether ``Σ V > 0``."""
    num = p.new_zeros(n).index_add(0, sample, v * p)
    den = p.new_zeros(n).index_add(0, sample, v)
    return num / den.clamp_min(torch.finfo(den.dtype).tiny), den > 0


def pair_weight(hc, ha, has_c, has_a, alpha: float, weighting: str, eps: float) -> torch.Tensor:
    """W per sample: Bradley–Terry ``α + 1 − 2·Hc/(Hc+Ha)`` (``dynamic``) or ``α`` (``static``).

    A sample with sensitive correct tokens but none in the incorrect response (a pure
    insertion) gets ``α``; a sample without sensitive correct tokens never uses W.
    """
    if weighting == "static":
        return torch.full_like(hc, alpha)
    w = alpha + 1 - 2 * hc / (hc + ha).clamp_min(eps)
    w = torch.where(has_a, w, torch.full_like(w, alpha))
    return torch.where(has_c, w, torch.full_like(w, alpha - 1))


def token_weights(w_pair, v, sample, alpha: float, weighting: str) -> torch.Tensor:
    """``w_j = W`` on sensitive correct tokens, ``α − 1`` elsewhere; all 1 for ``sft``."""
    if weighting == "sft":
        return torch.ones_like(v)
    return torch.where(v > 0, w_pair[sample], torch.full_like(v, alpha - 1))


@dataclass
class LossParts:
    """The loss and what the metrics need."""

    loss: torch.Tensor
    hc: torch.Tensor
    ha: torch.Tensor
    has_c: torch.Tensor
    has_a: torch.Tensor
    w_pair: torch.Tensor
    sensitive: torch.Tensor  # share of correct tokens with V > 0 (0-d)


def fgit_loss(logp_c, sample_c, v_c, logp_a, sample_a, v_a, n_samples: int, num_items,
              alpha: float, weighting: str, detach: bool, eps: float) -> LossParts:
    """``Σ w_j · (−log p_j^c) / N`` with FGIT's weights (N as Hugging Face counts it)."""
    hc, has_c = strengths(logp_c.exp(), v_c, sample_c, n_samples)
    ha, has_a = strengths(logp_a.exp(), v_a, sample_a, n_samples)
    w_pair = pair_weight(hc, ha, has_c, has_a, alpha, weighting, eps)
    if detach:
        w_pair = w_pair.detach()
    w = token_weights(w_pair, v_c, sample_c, alpha, weighting)
    loss = (w * -logp_c).sum() / num_items
    sensitive = (v_c > 0).float().mean() if v_c.numel() else v_c.new_zeros(())
    return LossParts(loss, hc, ha, has_c, has_a, w_pair, sensitive)
