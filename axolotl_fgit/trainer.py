"""Axolotl trainer with FGIT's loss: one packed forward, chunked log-probs, metrics.

Each micro-batch is flattened into a single packed row (position ids restart per half,
so attention stays inside each response), and the log-probabilities FGIT needs come from
the model's own output head inside that forward (``projection``). By default one forward
covers both halves of every pair; when the incorrect half needs no gradient
(``detach_weights``, or a non-dynamic weighting during training) it runs first under
``no_grad`` (no activations kept, no backward) and only the correct half is trained.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from axolotl.core.trainers.base import AxolotlTrainer

from axolotl_fgit.args import FGITConfig, Weighting, fgit_config
from axolotl_fgit.contract import TOKEN_COLUMNS, Side
from axolotl_fgit.loss import FlatBatch, LossParts, SideTokens, fgit_loss, flatten
from axolotl_fgit.projection import forward_logprobs

METRICS = ("Hc", "Ha", "weight", "pair_acc", "sensitive_frac")


def pair_logprobs(
    model, flat: FlatBatch, cfg: FGITConfig, incorrect_without_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p`` of the correct response tokens and of the incorrect sensitive tokens."""
    sel_c, sel_a = flat.correct_tokens, flat.incorrect_sensitive

    def run(part: torch.Tensor, selections: list[torch.Tensor]) -> list[torch.Tensor]:
        index = torch.cumsum(part.long(), 0) - 1  # position of each token inside ``part``
        sel = torch.cat([s.nonzero().squeeze(1) for s in selections])
        logp = forward_logprobs(
            model,
            flat.ids[part],
            flat.pos[part],
            index[sel] - 1,
            flat.ids[sel],
            cfg.logprob_chunk_size,
        )
        return list(logp.split([int(s.sum()) for s in selections]))

    if not incorrect_without_grad:
        return tuple(run(torch.ones_like(sel_c), [sel_c, sel_a]))
    with torch.no_grad():
        (logp_a,) = run(flat.side == Side.INCORRECT, [sel_a])
    (logp_c,) = run(flat.side == Side.CORRECT, [sel_c])
    return logp_c, logp_a


def batch_loss(
    model, inputs: dict[str, torch.Tensor], cfg: FGITConfig, num_items_in_batch=None
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
    logp_c, logp_a = pair_logprobs(model, flat, cfg, no_grad_incorrect)
    sel_c, sel_a = flat.correct_tokens, flat.incorrect_sensitive
    correct = SideTokens(logp_c, flat.v[sel_c], flat.sample[sel_c])
    incorrect = SideTokens(logp_a, flat.v[sel_a], flat.sample[sel_a])
    return fgit_loss(correct, incorrect, flat.n_samples, num_items_in_batch, cfg)


class AxolotlFGITTrainer(AxolotlTrainer):
    """``AxolotlTrainer`` whose loss is FGIT's (config from ``axolotl_cfg.fgit``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # we divide by num_items_in_batch ourselves
        self.fgit = fgit_config(self.axolotl_cfg)
        self._fgit_sums: dict[str, dict[str, float]] = {
            "train": defaultdict(float),
            "eval": defaultdict(float),
        }

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            for name in (*TOKEN_COLUMNS, "position_ids"):
                if name not in self._signature_columns:
                    self._signature_columns.append(name)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        parts = batch_loss(model, inputs, self.fgit, num_items_in_batch)
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
