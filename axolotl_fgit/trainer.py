"""Axolotl trainer with FGIT's loss: one forward per micro-batch, chunked log-probs, metrics.

Position ids restart at each half of a pair, so attention stays inside each response:
with flash-attention every sequence of the micro-batch goes into one row (its varlen path);
otherwise each batch row stays a row, so SDPA and eager attention build per-row masks. The
log-probabilities FGIT needs come from the model's own output head inside that forward
(``projection``), checked once against the model's own logits (``verify_fidelity``).

Where it is exact and the attention backend takes a 4-D mask, the incorrect half runs only
from where it leaves the correct one to its last sensitive token, in the same forward
(``layout``: shared prefix, checked once against two halves). Elsewhere both halves run, the
incorrect one cut after its last sensitive token, in one forward; when that half needs no
gradient (``detach_weights``, or a non-dynamic weighting during training) it runs first
under ``no_grad`` (no activations kept, no backward) and only the correct half is trained.
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import cached_property

import torch
from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.utils.logging import get_logger

from axolotl_fgit.args import TREE_MASK_BACKENDS, FGITConfig, Weighting, fgit_config
from axolotl_fgit.contract import TOKEN_COLUMNS, TRUNCATED_COLUMN, Side
from axolotl_fgit.kernels import Kernel, describe, requested_kernel
from axolotl_fgit.layout import Layout, plan, wanted
from axolotl_fgit.loss import FlatBatch, LossParts, SideTokens, fgit_loss, flatten
from axolotl_fgit.projection import (
    FidelityError,
    causal_lm,
    check_fidelity,
    forward_logprobs,
    log_prob_tolerance,
)

LOG = get_logger(__name__)
METRICS = ("Hc", "Ha", "weight", "pair_acc", "sensitive_frac")


def attention(model) -> str:
    """The attention implementation the model runs (``sdpa``, ``eager``, ``flash_attention_2``…)."""
    return str(causal_lm(model).config._attn_implementation)


def one_row_attention(model) -> bool:
    """Flash-attention's varlen path needs all sequences in one row (batch size 1)."""
    return "flash" in attention(model)


# Layers that carry state from token to token: a suffix cannot start from a shared prefix.
RECURRENT = re.compile(r"Mamba|SSM|Recurrent|RWKV|DeltaNet|LinearAttention|ShortConv|Lightning")
ATTENTION_LAYERS = {"full_attention", "sliding_attention"}


def sharing_blocker(model, sequence_len: int | None) -> str | None:
    """Why the shared layout would not be exact or possible for ``model``; None when it is."""
    lm = causal_lm(model)
    if (impl := attention(model)) not in TREE_MASK_BACKENDS:
        return f"attention backend {impl} cannot take a tree mask"
    text = lm.config.get_text_config()
    kinds = set(getattr(text, "layer_types", None) or ()) - ATTENTION_LAYERS
    layers = sorted({type(m).__name__ for m in lm.modules() if RECURRENT.search(type(m).__name__)})
    if kinds or layers:
        return (
            f"{type(lm).__name__} has layers that carry state along the sequence "
            f"({', '.join(sorted(kinds) + layers[:3])})"
        )
    window = getattr(text, "sliding_window", None)
    if window and getattr(text, "use_sliding_window", True) is not False:
        if sequence_len is None or window < sequence_len:
            return (
                f"its sliding-window attention (window {window}) is shorter than sequence_len "
                f"({sequence_len}), so a suffix could reach past it into the shared prefix"
            )
    return None


def check_sharing(
    model, flat: FlatBatch, cfg: FGITConfig, kernel: Kernel = Kernel.chunked
) -> float:
    """Largest difference between the shared and the two-half layout's log-probs on this
    batch, incorrect suffix tokens included (no gradients, eval mode)."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours = pair_logprobs(model, flat, cfg, False, layout=Layout.shared, kernel=kernel)
            theirs = pair_logprobs(model, flat, cfg, False, layout=Layout.halves, kernel=kernel)
    finally:
        model.train(training)
    return max((float((a - b).abs().max()) for a, b in zip(ours, theirs) if a.numel()), default=0.0)


def pair_logprobs(
    model,
    flat: FlatBatch,
    cfg: FGITConfig,
    incorrect_without_grad: bool,
    *,
    layout: Layout = Layout.truncated,
    kernel: Kernel = Kernel.chunked,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p`` of the correct response tokens and of the incorrect sensitive tokens.

    Under the shared layout one forward always covers both: the incorrect suffixes are a few
    tokens, cheaper to carry through the backward than a separate pass over their prefix.
    """
    sel_correct, sel_incorrect = flat.correct_tokens, flat.incorrect_sensitive
    one_row = one_row_attention(model)
    tokens = plan(flat, layout)
    backend = attention(model)

    def run(part: torch.Tensor, selections: list[torch.Tensor]) -> list[torch.Tensor]:
        want = wanted(flat, tokens, part, selections, one_row, backend)
        logp = forward_logprobs(model, want, cfg.logprob_chunk_size, kernel)
        return list(logp.split([int(s.sum()) for s in selections]))

    if layout == Layout.shared or not incorrect_without_grad:
        return tuple(run(tokens.run, [sel_correct, sel_incorrect]))
    with torch.no_grad():
        (logp_incorrect,) = run(tokens.run & (flat.side == Side.INCORRECT), [sel_incorrect])
    (logp_correct,) = run(flat.side == Side.CORRECT, [sel_correct])
    return logp_correct, logp_incorrect


def batch_loss(
    model,
    inputs: dict[str, torch.Tensor],
    cfg: FGITConfig,
    num_items_in_batch=None,
    *,
    layout: Layout = Layout.truncated,
    kernel: Kernel = Kernel.chunked,
) -> LossParts:
    """FGIT's loss for one collated micro-batch (what ``compute_loss`` returns); every
    ``layout`` gives the same loss and gradients (see ``layout``)."""
    flat = flatten(inputs, cfg.granularity)
    if num_items_in_batch is None:
        num_items_in_batch = flat.correct_tokens.sum()
    no_grad_incorrect = (
        torch.is_grad_enabled()
        and model.training
        and (cfg.detach_weights or cfg.weighting != Weighting.dynamic)
    )
    logp_correct, logp_incorrect = pair_logprobs(
        model, flat, cfg, no_grad_incorrect, layout=layout, kernel=kernel
    )
    sel_correct, sel_incorrect = flat.correct_tokens, flat.incorrect_sensitive
    correct = SideTokens(logp_correct, flat.v[sel_correct], flat.sample[sel_correct])
    incorrect = SideTokens(logp_incorrect, flat.v[sel_incorrect], flat.sample[sel_incorrect])
    return fgit_loss(correct, incorrect, flat.n_samples, num_items_in_batch, cfg)


def verify_fidelity(
    model,
    inputs: dict[str, torch.Tensor],
    cfg: FGITConfig,
    *,
    kernel: Kernel = Kernel.chunked,
) -> float:
    """Check FGIT's log-probs against the model's own logits on this batch (see
    ``projection.check_fidelity``); raises ``FidelityError`` on a mismatch."""
    flat = flatten(inputs, cfg.granularity)
    tokens = plan(flat, Layout.halves)  # every token after the first of its half, both halves
    want = wanted(flat, tokens, tokens.run, [flat.pos > 0], one_row_attention(model))
    return check_fidelity(model, want, cfg.logprob_chunk_size, kernel)


def check_truncation(dataset, name: str, cfg: FGITConfig, sequence_len: int) -> int:
    """Log how many pairs lost training tokens at ``sequence_len / 2``; refuse above the limit."""
    if dataset is None or TRUNCATED_COLUMN not in getattr(dataset, "column_names", ()):
        return 0
    cut, total = int(sum(dataset[TRUNCATED_COLUMN])), len(dataset)
    if cut:
        LOG.warning(
            "FGIT: %d of %d %s pairs lost tokens at sequence_len / 2 = %d (correct-response "
            "tokens, or sensitive incorrect ones)",
            cut,
            total,
            name,
            sequence_len // 2,
        )
    if total and cut / total > cfg.max_truncated_fraction:
        raise ValueError(
            f"fgit: {cut} of {total} {name} pairs ({cut / total:.1%}) were truncated, more than "
            f"fgit.max_truncated_fraction = {cfg.max_truncated_fraction}; raise sequence_len "
            f"(now {sequence_len}; each half gets half of it) or fgit.max_truncated_fraction"
        )
    return cut


class AxolotlFGITTrainer(AxolotlTrainer):
    """``AxolotlTrainer`` whose loss is FGIT's (config from ``axolotl_cfg.fgit``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # we divide by num_items_in_batch ourselves
        self._fidelity_checked = False
        self._layout: Layout | None = None  # chosen at the first batch (needs the model)
        self._fgit_sums: dict[str, dict[str, float]] = {
            "train": defaultdict(float),
            "eval": defaultdict(float),
        }

    @cached_property
    def fgit(self) -> FGITConfig:
        """The ``fgit:`` block, parsed once (Axolotl sets ``axolotl_cfg`` after __init__)."""
        return fgit_config(self.axolotl_cfg)

    @cached_property
    def kernel(self) -> Kernel:
        """The fused kernel the config turned on for SFT, if any (see ``kernels``)."""
        return requested_kernel(self.axolotl_cfg)

    def train(self, *args, **kwargs):
        for name, dataset in (("train", self.train_dataset), ("eval", self.eval_dataset)):
            check_truncation(dataset, name, self.fgit, self.axolotl_cfg.sequence_len)
        return super().train(*args, **kwargs)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            for name in (*TOKEN_COLUMNS, "position_ids"):
                if name not in self._signature_columns:
                    self._signature_columns.append(name)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._fidelity_checked:
            LOG.info("FGIT log-probs: %s", describe(self.kernel, self.fgit.logprob_chunk_size))
            error = verify_fidelity(model, inputs, self.fgit, kernel=self.kernel)
            LOG.info("FGIT log-probs match the model's own logits (max |diff| %.2g)", error)
            self._fidelity_checked = True
        layout = self._choose_layout(model, inputs)
        parts = batch_loss(
            model, inputs, self.fgit, num_items_in_batch, layout=layout, kernel=self.kernel
        )
        self._record(parts, "train" if model.training else "eval")
        loss = parts.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # N is the global count; gradients are averaged over ranks (DDP/FSDP), so the
            # rank-local sum is scaled by the world size, exactly as Hugging Face does.
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss

    def _choose_layout(self, model, inputs: dict[str, torch.Tensor]) -> Layout:
        """Shared where ``fgit.share_prefix`` allows it and it is exact, else truncated; the
        shared layout is checked against two halves at the first batch, on every rank."""
        share = self.fgit.share_prefix
        if self._layout is None:
            blocker = (
                None if share is False else sharing_blocker(model, self.axolotl_cfg.sequence_len)
            )
            if share is True and blocker:
                raise ValueError(
                    f"fgit.share_prefix: true, but {blocker}; set fgit.share_prefix: auto to "
                    "train with the incorrect half cut after its last sensitive token instead"
                )
            self._layout = Layout.truncated if share is False or blocker else Layout.shared
            LOG.info(
                "FGIT layout: %s",
                "shared prefix (each incorrect half runs from where it leaves the correct one "
                "to its last sensitive token, under a tree attention mask)"
                if self._layout == Layout.shared
                else "two halves, the incorrect one cut after its last sensitive token ("
                + (blocker or "fgit.share_prefix: false")
                + ")",
            )
            if self._layout == Layout.shared:
                self._verify_sharing(model, flatten(inputs, self.fgit.granularity))
        return self._layout

    def _verify_sharing(self, model, flat: FlatBatch) -> None:
        """Compare the shared layout with two halves once; refuse or fall back on a mismatch."""
        error = check_sharing(model, flat, self.fgit, self.kernel)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank must take the same layout: it fixes how many forwards a step runs
            worst = torch.tensor(error, device=self.accelerator.device)
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
            error = float(worst)
        tolerance = log_prob_tolerance(causal_lm(model))
        if error <= tolerance:
            LOG.info("FGIT shared prefix matches two halves (max |diff| %.2g)", error)
            return
        reason = (
            f"{type(causal_lm(model)).__name__}'s log-probs under the shared layout differ "
            f"from two halves by {error:.3g} (tolerance {tolerance:g})"
        )
        if self.fgit.share_prefix is True:
            raise FidelityError(f"fgit.share_prefix: true, but {reason}; set it to auto")
        LOG.warning("FGIT layout: two halves, the incorrect one cut (%s)", reason)
        self._layout = Layout.truncated

    def _record(self, parts: LossParts, phase: str) -> None:
        """Add one micro-batch's sums to the ``train`` or ``eval`` metrics."""
        sums = self._fgit_sums[phase]
        parts = parts.detach()
        hc, ha = parts.h_correct, parts.h_incorrect
        both = hc.present & ha.present
        for name, values, present in (
            ("Hc", hc.value, hc.present),
            ("Ha", ha.value, ha.present),
            ("weight", parts.w_pair, hc.present),
            ("pair_acc", (hc.value > ha.value).float(), both),
        ):
            sums[name] += float(values[present].sum())
            sums[f"{name}_n"] += float(present.sum())
        sums["sensitive_frac"] += float(parts.sensitive)
        sums["sensitive_frac_n"] += 1.0

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation needs the loss only; nothing large is gathered across steps."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        is_eval = any(k.startswith("eval_") for k in logs)
        sums, prefix = self._fgit_sums["eval" if is_eval else "train"], "eval_" if is_eval else ""
        for name in METRICS:
            if sums.get(f"{name}_n"):
                logs[f"{prefix}fgit/{name}"] = sums[name] / sums[f"{name}_n"]
        sums.clear()
        super().log(logs, *args, **kwargs)
