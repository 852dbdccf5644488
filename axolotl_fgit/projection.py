"""Per-token log-probabilities from the model's own output head, in chunks.

FGIT needs ``log p(target)`` at a few thousand positions, never full ``tokens × vocab``
logits. For one forward, ``logprob_head`` makes the model's output head return those
log-probs directly: ``logits_to_keep=rows`` hands it only the needed hidden states, and it
projects them onto the vocabulary ``chunk_size`` rows at a time under activation
checkpointing. The projection so runs inside every wrapper's forward (FSDP1, FSDP2, DDP and
PEFT see the head gathered and hook their backward onto the result as onto logits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel


def causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The innermost causal LM inside DDP/FSDP/PEFT wrappers (it owns the output head)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.get_output_embeddings() is not None:
            return module
    raise AttributeError(f"{type(model).__name__} contains no model with output embeddings")


def _chunk_logprobs(head: Callable, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def token_logprobs(
    hidden: torch.Tensor, head: Callable, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
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


@contextmanager
def logprob_head(model: torch.nn.Module, targets: torch.Tensor, chunk_size: int) -> Iterator[None]:
    """Inside the block, the model's output head returns ``log p(targets)``, not logits.

    The head's own forward (an instance-level one too, as accelerate's hooks install) is
    restored on every exit path, exceptions included.
    """
    head = causal_lm(model).get_output_embeddings()
    own = head.__dict__.get("forward")
    project = own or head.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return token_logprobs(hidden[0], project, targets, chunk_size)[None]

    head.forward = forward
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def forward_logprobs(
    model: torch.nn.Module,
    ids: torch.Tensor,
    pos: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """Forward one packed row; return ``log p(targets)`` predicted from hidden ``rows``."""
    with logprob_head(model, targets, chunk_size):
        out = model(
            input_ids=ids[None],
            position_ids=pos[None],
            use_cache=False,
            logits_to_keep=rows,
            return_dict=True,
        )
    return out["logits"][0]
