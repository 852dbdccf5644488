"""Per-token log-probabilities from the model's own output head, in chunks.

FGIT needs ``log p(target)`` at a few thousand positions, never full ``tokens × vocab``
logits. For one forward, ``logprob_head`` makes the model's output head return those
log-probs directly: ``logits_to_keep`` hands it only the needed positions, and it projects
them onto the vocabulary ``chunk_size`` rows at a time under activation checkpointing. The
projection so runs inside every wrapper's forward (FSDP1, FSDP2, DDP and PEFT see the head
gathered and hook their backward onto the result as onto logits).

Some models transform logits after the head (Gemma-2/3 soft-capping, Granite's
``logits_scaling``, Cohere's ``logit_scale``). Those transforms are applied here, inside the
projection, and switched off in the model for the duration of the call, so the model's own
code never touches FGIT's log-probs. ``check_fidelity`` compares the result with
``log_softmax`` of the model's real logits, so a transform we do not know stops training
instead of training a wrong objective.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from axolotl_fgit.kernels import Kernel, fused_logprobs


class FidelityError(RuntimeError):
    """FGIT's log-probs differ from the model's own; training would optimise a wrong loss."""


def causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The innermost causal LM inside DDP/FSDP/PEFT wrappers (it owns the output head)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.get_output_embeddings() is not None:
            return module
    raise AttributeError(f"{type(model).__name__} contains no model with output embeddings")


@dataclass(frozen=True)
class _Knob:
    """A model parameter that transforms logits after the head, and its no-op value."""

    name: str
    owner: str  # where it lives: "config" (config or text config), "module" or "inner"
    neutral: Any
    kind: str  # "softcap", "divide" or "multiply"
    model_types: frozenset[str] | None = None  # only these (None: any model type)
    exclude: frozenset[str] = frozenset()

    def applies(self, lm: PreTrainedModel) -> bool:
        kind = getattr(lm.config, "model_type", "")
        return (self.model_types is None or kind in self.model_types) and kind not in self.exclude


KNOBS = (
    _Knob("final_logit_softcapping", "config", None, "softcap"),  # Gemma-2/3
    _Knob("logits_scaling", "config", 1.0, "divide", exclude=frozenset({"hyperclovax"})),  # Granite
    _Knob("logits_scaling", "config", 1.0, "multiply", frozenset({"hyperclovax"})),  # HyperCLOVA X
    _Knob("logit_scale", "module", 1.0, "multiply"),  # Cohere
    _Knob("lm_head_multiplier", "inner", 1.0, "multiply"),  # Falcon-H1
)


@dataclass(frozen=True)
class PostHead:
    """What a model does to its head's output: multiply by ``scale``, then soft-cap."""

    scale: float = 1.0
    softcap: float | None = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _owners(lm: PreTrainedModel, knob: _Knob) -> list[Any]:
    if not knob.applies(lm):
        return []
    if knob.owner == "module":
        return [lm]
    if knob.owner == "inner":
        return [lm.model] if isinstance(getattr(lm, "model", None), torch.nn.Module) else []
    configs = [lm.config, lm.config.get_text_config()]
    return [c for i, c in enumerate(configs) if c not in configs[:i]]


def post_head(lm: PreTrainedModel) -> PostHead:
    """The logit transforms ``lm``'s forward applies after its head."""
    scale, softcap = 1.0, None
    for knob in KNOBS:
        values = {getattr(o, knob.name, None) for o in _owners(lm, knob)} - {None}
        if len(values) > 1:
            raise FidelityError(f"{type(lm).__name__} has two values of {knob.name}: {values}")
        if not values or (value := values.pop()) == knob.neutral:
            continue
        if knob.kind == "softcap":
            softcap = float(value)
        else:
            scale *= float(value) if knob.kind == "multiply" else 1.0 / float(value)
    return PostHead(scale, softcap)


@contextmanager
def _switched_off(lm: PreTrainedModel) -> Iterator[None]:
    """Set every known post-head parameter to its no-op value; restore it on exit."""
    saved = [
        (o, k, getattr(o, k.name))
        for k in KNOBS
        for o in _owners(lm, k)
        if getattr(o, k.name, None) is not None
    ]
    try:
        for owner, knob, _ in saved:
            setattr(owner, knob.name, knob.neutral)
        yield
    finally:
        for owner, knob, value in saved:
            setattr(owner, knob.name, value)


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


@dataclass
class Wanted:
    """Which next-token log-probs one forward must return.

    ``ids``/``pos`` are ``[rows, length]``; the hidden state at ``(row[i], col[i])`` predicts
    ``targets[i]``. ``mask``, when set, is the 4-D attention mask the model gets as it is
    (otherwise attention follows ``pos``: causal, restarting where a position is 0).
    """

    ids: torch.Tensor
    pos: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor | None = None


def accepts_logits_to_keep(lm: PreTrainedModel) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (older or remote code may not)."""
    return "logits_to_keep" in inspect.signature(lm.forward).parameters


@contextmanager
def logprob_head(
    model: torch.nn.Module,
    want: Wanted,
    keep: torch.Tensor,
    chunk_size: int,
    kernel: Kernel = Kernel.chunked,
) -> Iterator[None]:
    """Inside the block, the model's output head returns ``log p(targets)``, not logits.

    The head gets the hidden states of the ``keep`` columns (``logits_to_keep``) or, from a
    model without that argument, of every column, and picks the wanted ones itself. Post-head
    transforms run inside the projection (or the fused ``kernel``) and are switched off in
    the model. The head's own
    forward (an instance-level one too, as accelerate's hooks install) is restored on every
    exit path, exceptions included.
    """
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    own = head.__dict__.get("forward")
    project = own or head.forward
    post = post_head(lm)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        return post.apply(project(hidden))

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[1] == keep.numel():
            picked = hidden[want.row, torch.searchsorted(keep, want.col)]
        elif hidden.shape[1] == want.ids.shape[1]:
            picked = hidden[want.row, want.col]
        else:
            raise FidelityError(
                f"{type(lm).__name__} handed its output head {hidden.shape[1]} "
                f"positions, neither the {keep.numel()} asked for nor all "
                f"{want.ids.shape[1]}"
            )
        if kernel != Kernel.chunked:
            return fused_logprobs(kernel, picked, head, want.targets, post.scale, post.softcap)[
                None
            ]
        return token_logprobs(picked, logits, want.targets, chunk_size)[None]

    with ExitStack() as stack:
        stack.enter_context(_switched_off(lm))
        head.forward = forward
        try:
            yield
        finally:
            if own is None:
                del head.forward
            else:
                head.forward = own


def _forward_kwargs(lm: PreTrainedModel, want: Wanted, keep: torch.Tensor) -> dict[str, Any]:
    """The model call for ``want``: only the ``keep`` positions reach the head, when the
    model's forward takes ``logits_to_keep``."""
    kwargs: dict[str, Any] = {
        "input_ids": want.ids,
        "position_ids": want.pos,
        "use_cache": False,
        "return_dict": True,
    }
    if want.mask is not None:
        kwargs["attention_mask"] = want.mask
    if accepts_logits_to_keep(lm):
        kwargs["logits_to_keep"] = keep
    return kwargs


def forward_logprobs(
    model: torch.nn.Module, want: Wanted, chunk_size: int, kernel: Kernel = Kernel.chunked
) -> torch.Tensor:
    """One forward over ``want.ids``; return ``log p(want.targets)``, one per wanted token."""
    keep = torch.unique(want.col)
    kwargs = _forward_kwargs(causal_lm(model), want, keep)
    with logprob_head(model, want, keep, chunk_size, kernel):
        out = model(**kwargs)
    return out["logits"][0]


def log_prob_tolerance(lm: torch.nn.Module) -> float:
    """How far two computations of the same log-probs may differ in ``lm``'s precision:
    reordered float32 sums stay within 1e-4; bfloat16/float16 rounding reaches 5e-2."""
    return 1e-4 if next(lm.parameters()).dtype == torch.float32 else 5e-2


def check_fidelity(
    model: torch.nn.Module,
    want: Wanted,
    chunk_size: int,
    kernel: Kernel = Kernel.chunked,
    n: int = 8,
) -> float:
    """Compare FGIT's log-probs with ``log_softmax`` of the model's own logits at ``n`` tokens.

    The tokens are taken from the last sequence of the first row, and the model's own logits
    come from that sequence run on its own: so a logit transform FGIT does not know, and
    layers that let packed sequences see each other (state-space layers), both show. Runs
    without gradients and in eval mode (dropout off), then restores the mode. Raises
    ``FidelityError`` naming the model class on a mismatch; returns the largest difference.
    """
    lm = causal_lm(model)
    if want.row.numel() == 0:
        return 0.0
    row = int(want.row[0])
    in_row = (want.row == row).nonzero().squeeze(1)
    starts = (want.pos[row] == 0).nonzero().squeeze(1)
    start = int(starts[starts <= want.col[in_row].max()].max())
    idx = in_row[want.col[in_row] >= start][:n]
    end = int(want.col[idx].max()) + 1  # causal: later tokens change nothing
    packed = Wanted(
        want.ids[row : row + 1, :end],
        want.pos[row : row + 1, :end],
        torch.zeros_like(idx),
        want.col[idx],
        want.targets[idx],
    )
    alone = Wanted(
        want.ids[row : row + 1, start:end],
        want.pos[row : row + 1, start:end],
        torch.zeros_like(idx),
        want.col[idx] - start,
        want.targets[idx],
    )
    keep = torch.unique(alone.col)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours = forward_logprobs(model, packed, chunk_size, kernel)
            logits = model(**_forward_kwargs(lm, alone, keep))["logits"][0].float()
    finally:
        model.train(training)
    at = torch.searchsorted(keep, alone.col) if logits.shape[0] == keep.numel() else alone.col
    theirs = torch.log_softmax(logits[at], dim=-1).gather(1, alone.targets[:, None])[:, 0]
    tolerance = log_prob_tolerance(lm)
    error = float((ours - theirs).abs().max())
    if not error <= tolerance:
        raise FidelityError(
            f"FGIT's log-probs for {type(lm).__name__} differ from log_softmax of the model's "
            f"own logits by {error:.3g} (tolerance {tolerance:g}), so the FGIT loss would be "
            "wrong. Either its forward transforms logits in a way axolotl-fgit does not know "
            f"(known: {', '.join(sorted({k.name for k in KNOBS}))}), or its layers let packed "
            "sequences see each other (state-space/recurrent layers): FGIT packs both halves "
            "of a pair into one row, so such models are not supported. Please report the "
            "model class."
        )
    return error
