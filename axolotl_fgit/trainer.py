"""Axolotl trainer with FGIT's loss: one packed forward, chunked log-probs, metrics.

Each micro-batch is flattened into a single packed row (position ids restart per half,
so attention stays inside each response), and the log-probabilities FGIT needs are
computed by the model's own output head inside that forward. By default one forward covers both halves of every pair;
when the incorrect half needs no gradient (``detach_weights`` or a
non-dynamic weighting during training) it runs first under ``no_grad`` (no activations
kept, no backward) and only the correct half is trained.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from axolotl.core.trainers.base import AxolotlTrainer
from transformers import PreTrainedModel

from axolotl_fgit.args import FGITConfig
from axolotl_fgit.loss import CORRECT, INCORRECT, FlatBatch, LossParts, fgit_loss, flatten, token_logprobs
from axolotl_fgit.strategy import FGIT_COLUMNS, fgit_config

METRICS = ("Hc", "Ha", "weight", "pair_acc", "sensitive_frac")


def causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The innermost causal LM inside DDP/FSDP/PEFT wrappers (it owns ``lm_head``)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.get_output_embeddings() is not None:
            return module
    raise AttributeError(f"{type(model).__name__} contains no model with output embeddings")


def forward_logprobs(model, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor,
                     targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Forward one packed row; return ``log p(targets)`` predicted from hidden ``rows``.

    ``logits_to_keep=rows`` makes the model hand exactly those hidden states to its
    output head, and for this call the head returns chunked log-probs instead of logits.
    The projection so runs inside every wrapper's forward (FSDP1/FSDP2/DDP/PEFT see the
    head gathered and put their backward hooks on the result, as on logits), and no
    full-vocabulary logits or extra hidden states are kept.
    """
    head = causal_lm(model).get_output_embeddings()
    own = head.__dict__.get("forward")  # an instance-level forward (e.g. accelerate hooks)
    project = own or head.forward
    head.forward = lambda hidden: token_logprobs(hidden[0], project, targets, chunk_size)[None]
    try:
        out = model(input_ids=ids[None], position_ids=pos[None], use_cache=False,
                    logits_to_keep=rows, return_dict=True)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
    return out["logits"][0]


def pair_logprobs(model, flat: FlatBatch, cfg: FGITConfig, split: bool):
    """``log p`` of the correct response tokens and of the incorrect sensitive tokens."""
    sel_c, sel_a = flat.correct_tokens, flat.incorrect_sensitive

    def run(part: torch.Tensor, selections: list[torch.Tensor]) -> list[torch.Tensor]:
        index = torch.cumsum(part.long(), 0) - 1  # position of each token inside ``part``
        sel = torch.cat([s.nonzero().squeeze(1) for s in selections])
        logp = forward_logprobs(model, flat.ids[part], flat.pos[part], index[sel] - 1,
                                flat.ids[sel], cfg.logprob_chunk_size)
        return list(logp.split([int(s.sum()) for s in selections]))

    if not split:
        return run(torch.ones_like(sel_c), [sel_c, sel_a])
    with torch.no_grad():
        (logp_a,) = run(flat.side == INCORRECT, [sel_a])
    (logp_c,) = run(flat.side == CORRECT, [sel_c])
    return logp_c, logp_a


def batch_loss(model, inputs: dict[str, torch.Tensor], cfg: FGITConfig,
               num_items_in_batch=None) -> LossParts:
    """FGIT's loss for one collated micro-batch (what ``compute_loss`` returns)."""
    flat = flatten(inputs["input_ids"], inputs["labels"], inputs["position_ids"],
                   inputs["fgit_side"], inputs["fgit_line"], inputs["fgit_edit"], cfg.granularity)
    if num_items_in_batch is None:
        num_items_in_batch = flat.correct_tokens.sum()
    split = torch.is_grad_enabled() and model.training and (
        cfg.detach_weights or cfg.weighting != "dynamic")
    logp_c, logp_a = pair_logprobs(model, flat, cfg, split)
    sel_c, sel_a = flat.correct_tokens, flat.incorrect_sensitive
    return fgit_loss(logp_c, flat.sample[sel_c], flat.v[sel_c], logp_a, flat.sample[sel_a],
                     flat.v[sel_a], flat.n_samples, num_items_in_batch, cfg.alpha,
                     cfg.weighting, cfg.detach_weights, cfg.eps)


class AxolotlFGITTrainer(AxolotlTrainer):
    """``AxolotlTrainer`` whose loss is FGIT's (config from ``axolotl_cfg.fgit``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # we divide by num_items_in_batch ourselves
        self._fgit_sums: dict[str, dict[str, float]] = {"train": defaultdict(float),
                                                        "eval": defaultdict(float)}

    @property
    def fgit(self) -> FGITConfig:
        return fgit_config(self.axolotl_cfg)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            for name in (*FGIT_COLUMNS, "position_ids"):
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

    def _record(self, parts: LossParts, split: str) -> None:
        sums = self._fgit_sums[split]
        parts = LossParts(*(t.detach() for t in vars(parts).values()))
        both = parts.has_c & parts.has_a
        sums["Hc"] += float(parts.hc[parts.has_c].sum())
        sums["Hc_n"] += float(parts.has_c.sum())
        sums["Ha"] += float(parts.ha[parts.has_a].sum())
        sums["Ha_n"] += float(parts.has_a.sum())
        sums["weight"] += float(parts.w_pair[parts.has_c].sum())
        sums["weight_n"] += float(parts.has_c.sum())
        sums["pair_acc"] += float((parts.hc > parts.ha)[both].sum())
        sums["pair_acc_n"] += float(both.sum())
        sums["sensitive_frac"] += float(parts.sensitive)
        sums["sensitive_frac_n"] += 1.0

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation needs the loss only; nothing large is gathered across steps."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        split, prefix = ("eval", "eval_") if any(k.startswith("eval_") for k in logs) else ("train", "")
        sums = self._fgit_sums[split]
        for name in METRICS:
            if sums.get(f"{name}_n"):
                logs[f"{prefix}fgit/{name}"] = sums[name] / sums[f"{name}_n"]
        sums.clear()
        super().log(logs, *args, **kwargs)
