"""Axolotl trainer with FGIT's loss: one forward per micro-batch, chunked log-probs, metrics.

Position ids restart at each half of a pair, so attention stays inside each response:
with flash-attention every sequence of the micro-batch goes into one row (its varlen path);
otherwise each batch row stays a row, so SDPA and eager attention build per-row masks. The
log-probabilities FGIT needs come from the model's own output head inside that forward
(``projection``), checked once against the model's own logits (``verify_fidelity``). By
default one forward covers both halves of every pair; when the incorrect half needs no
gradient (``detach_weights``, or a non-dynamic weighting during training) it runs first
under ``no_grad`` (no activations kept, no backward) and only the correct half is trained.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cached_property

import torch
from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.utils.logging import get_logger

from axolotl_fgit.args import FGITConfig, Weighting, fgit_config
from axolotl_fgit.contract import TOKEN_COLUMNS, TRUNCATED_COLUMN, Side
from axolotl_fgit.kernels import Kernel, describe, requested_kernel
from axolotl_fgit.loss import FlatBatch, LossParts, SideTokens, fgit_loss, flatten
from axolotl_fgit.projection import Wanted, causal_lm, check_fidelity, forward_logprobs

LOG = get_logger(__name__)
METRICS = ("Hc", "Ha", "weight", "pair_acc", "sensitive_frac")


def layout(flat: FlatBatch, part: torch.Tensor, one_row: bool) -> tuple[torch.Tensor, ...]:
    """Place the ``part`` tokens in ``[rows, length]`` tensors: ids, positions, row, column.

    ``one_row`` packs everything into a single row (flash-attention's varlen path needs
    batch size 1); otherwise each batch row stays a row, so SDPA and eager attention build
    per-row masks (rows × length²) instead of one mask over the whole micro-batch.
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


def wanted(
    flat: FlatBatch, part: torch.Tensor, selections: list[torch.Tensor], one_row: bool
) -> Wanted:
    """One forward over the ``part`` tokens that predicts every selected token."""
    ids, pos, row, col = layout(flat, part, one_row)
    index = torch.cumsum(part.long(), 0) - 1  # position of each token inside ``part``
    sel = index[torch.cat([s.nonzero().squeeze(1) for s in selections])]
    return Wanted(ids, pos, row[sel], col[sel] - 1, ids[row[sel], col[sel]])


def one_row_attention(model) -> bool:
    """Flash-attention's varlen path needs all sequences in one row (batch size 1)."""
    return "flash" in str(causal_lm(model).config._attn_implementation)


def pair_logprobs(
    model,
    flat: FlatBatch,
    cfg: FGITConfig,
    incorrect_without_grad: bool,
    *,
    kernel: Kernel = Kernel.chunked,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p`` of the correct response tokens and of the incorrect sensitive tokens."""
    sel_correct, sel_incorrect = flat.correct_tokens, flat.incorrect_sensitive
    one_row = one_row_attention(model)

    def run(part: torch.Tensor, selections: list[torch.Tensor]) -> list[torch.Tensor]:
        want = wanted(flat, part, selections, one_row)
        logp = forward_logprobs(model, want, cfg.logprob_chunk_size, kernel)
        return list(logp.split([int(s.sum()) for s in selections]))

    if not incorrect_without_grad:
        return tuple(run(torch.ones_like(sel_correct), [sel_correct, sel_incorrect]))
    with torch.no_grad():
        (logp_incorrect,) = run(flat.side == Side.INCORRECT, [sel_incorrect])
    (logp_correct,) = run(flat.side == Side.CORRECT, [sel_correct])
    return logp_correct, logp_incorrect


def batch_loss(
    model,
    inputs: dict[str, torch.Tensor],
    cfg: FGITConfig,
    num_items_in_batch=None,
    *,
    kernel: Kernel = Kernel.chunked,
) -> LossParts:
    """FGIT's loss for one collated micro-batch (what ``compute_loss`` returns)."""
    flat = flatten(inputs, cfg.granularity)
    if num_items_in_batch is None:
        num_items_in_batch = flat.correct_tokens.sum()
    no_grad_incorrect = (
        torch.is_grad_enabled()
        and model.training
        and (cfg.detach_weights or cfg.weighting != Weighting.dynamic)
    )
    logp_correct, logp_incorrect = pair_logprobs(model, flat, cfg, no_grad_incorrect, kernel=kernel)
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
    part = torch.ones_like(flat.correct_tokens)  # every token after the first of its half:
    want = wanted(flat, part, [flat.pos > 0], one_row_attention(model))  # the incorrect half too
    return check_fidelity(model, want, cfg.logprob_chunk_size, kernel)


def check_truncation(dataset, name: str, cfg: FGITConfig, sequence_len: int) -> int:
    """Log how many pairs had a half cut at ``sequence_len / 2``; refuse above the limit."""
    if dataset is None or TRUNCATED_COLUMN not in getattr(dataset, "column_names", ()):
        return 0
    cut, total = int(sum(dataset[TRUNCATED_COLUMN])), len(dataset)
    if cut:
        LOG.warning(
            "FGIT: %d of %d %s pairs had a response half cut at sequence_len / 2 = %d tokens",
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
        parts = batch_loss(model, inputs, self.fgit, num_items_in_batch, kernel=self.kernel)
        self._record(parts, "train" if model.training else "eval")
        loss = parts.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # N is the global count; gradients are averaged over ranks (DDP/FSDP), so the
            # rank-local sum is scaled by the world size, exactly as Hugging Face does.
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss

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
