"""FGIT's loss against an independent reference: two separate forwards per sample, full
logits, plain PyTorch — on padded and packed batches, for every mode."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from axolotl_fgit.args import FGITConfig, Granularity
from axolotl_fgit.collator import FGITDataCollator, FGITPackedDataCollator
from axolotl_fgit.layout import Layout, plan
from axolotl_fgit.loss import (
    SideTokens,
    Strength,
    fgit_loss,
    flatten,
    pair_weight,
    strength,
    token_weights,
)
from axolotl_fgit.strategy import pair_strategy
from axolotl_fgit.trainer import batch_loss
from conftest import SAMPLE_PAIRS, pair_row

MODES = list(itertools.product(["dynamic", "static", "sft"], ["hybrid", "line", "token"]))


def make_row(prompt: str, correct: str, incorrect: str) -> dict:
    return pair_row(correct, incorrect, prompt=prompt)


@pytest.fixture(scope="module")
def rows():
    pairs = [json.loads(line) for line in SAMPLE_PAIRS.open()][:3]
    out = [make_row(p["instruction"], p["correct"], p["incorrect"]) for p in pairs]
    # Pure insertion: no sensitive token in the incorrect response -> W = alpha.
    out.append(
        make_row("Sum it.", "def f(a):\n    a = a + 1\n    return a\n", "def f(a):\n    return a\n")
    )
    # Pure deletion: no sensitive token in the correct response -> all weights alpha - 1.
    out.append(
        make_row(
            "Keep it.", "def g(b):\n    return b\n", "def g(b):\n    b = b * 2\n    return b\n"
        )
    )
    return out


@pytest.fixture(scope="module")
def features(rows, tokenizer):
    strategy = pair_strategy(tokenizer, 2048)
    return [strategy.tokenize_prompt(dict(r)) for r in rows]


def collate(features, tokenizer, packed: bool):
    import copy

    feats = copy.deepcopy(features)
    if packed:
        return FGITPackedDataCollator(tokenizer, return_tensors="pt")([feats])
    return FGITDataCollator(tokenizer, return_tensors="pt")(feats)


def reference_loss(model, features, cfg: FGITConfig) -> torch.Tensor:
    """Straightforward FGIT: per sample, separate full-logit forwards of both halves."""

    def half_logprobs(ids):
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        return [None] + [lp[t - 1, ids[t]] for t in range(1, len(ids))]

    def vec(f, idx):
        line, edit = f["fgit_line"], f["fgit_edit"]
        return [
            {"hybrid": line[i] + edit[i], "line": line[i], "token": edit[i]}[cfg.granularity]
            for i in idx
        ]

    n_items = sum(1 for f in features for t in f["labels"][1:] if t != -100)
    total = torch.zeros(())
    for f in features:
        c_idx = [i for i, s in enumerate(f["fgit_side"]) if s == 1]
        a_idx = [i for i, s in enumerate(f["fgit_side"]) if s == 2]
        c_ids, a_ids = [f["input_ids"][i] for i in c_idx], [f["input_ids"][i] for i in a_idx]
        lp_c, lp_a = half_logprobs(c_ids), half_logprobs(a_ids)
        v_c, v_a = vec(f, c_idx), vec(f, a_idx)
        train = [t for t in range(1, len(c_ids)) if f["labels"][c_idx[t]] != -100]
        sc = sum(v_c[t] for t in train)
        sa = sum(v_a[t] for t in range(1, len(a_ids)))
        hc = sum(v_c[t] * lp_c[t].exp() for t in train) / sc if sc else None
        ha = sum(v_a[t] * lp_a[t].exp() for t in range(1, len(a_ids))) / sa if sa else None
        if cfg.weighting == "static":
            w = torch.tensor(cfg.alpha)
        elif hc is not None and ha is not None:
            w = cfg.alpha + 1 - 2 * hc / (hc + ha)
        else:
            w = torch.tensor(cfg.alpha)
        if cfg.detach_weights:
            w = w.detach()
        for t in train:
            weight = 1.0 if cfg.weighting == "sft" else (w if v_c[t] > 0 else cfg.alpha - 1)
            total = total + weight * -lp_c[t]
    return total / n_items


@pytest.mark.parametrize("weighting,granularity", MODES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_loss_matches_reference(tiny_model, tokenizer, features, weighting, granularity, packed):
    cfg = FGITConfig(weighting=weighting, granularity=granularity, logprob_chunk_size=64)
    batch = collate(features, tokenizer, packed)
    tiny_model.eval()
    with torch.no_grad():
        got = batch_loss(tiny_model, batch, cfg).loss
        want = reference_loss(tiny_model, features, cfg)
    assert abs(got.item() - want.item()) < 1e-5, (got.item(), want.item())


def test_training_paths_match_reference(tiny_model, tokenizer, features):
    """Train mode takes the split path (no-grad incorrect pass) for detach/static/sft."""
    tiny_model.train()
    try:
        for cfg in (FGITConfig(detach_weights=True), FGITConfig(weighting="static"), FGITConfig()):
            got = batch_loss(tiny_model, collate(features, tokenizer, True), cfg).loss
            with torch.no_grad():
                want = reference_loss(tiny_model, features, cfg)
            assert abs(got.item() - want.item()) < 1e-5
    finally:
        tiny_model.eval()


def test_sft_mode_equals_standard_sft_loss(tiny_model, tokenizer, features):
    """weighting: sft == the Hugging Face causal-LM loss on the correct halves alone."""
    halves = []
    for f in features:
        n = f["fgit_side"].count(1)
        halves.append(
            {"input_ids": f["input_ids"][:n], "attention_mask": [1] * n, "labels": f["labels"][:n]}
        )
    from axolotl.utils.collators import DataCollatorForSeq2Seq

    sft = DataCollatorForSeq2Seq(tokenizer, return_tensors="pt")(halves)
    n_items = (sft["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        want = tiny_model(**sft, num_items_in_batch=n_items).loss
        got = batch_loss(
            tiny_model, collate(features, tokenizer, False), FGITConfig(weighting="sft"), n_items
        ).loss
    assert abs(got.item() - want.item()) < 1e-5


def _grads(model, batch, cfg):
    model.zero_grad()
    loss = batch_loss(model, batch, cfg).loss
    loss.backward()
    names = [
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.norm.weight",
    ]
    params = dict(model.named_parameters())
    return loss.detach(), {n: params[n].grad.clone() for n in names}


def test_packed_and_padded_give_same_loss_and_gradients(tiny_model, tokenizer, features):
    cfg = FGITConfig()
    tiny_model.train()
    try:
        l1, g1 = _grads(tiny_model, collate(features, tokenizer, False), cfg)
        l2, g2 = _grads(tiny_model, collate(features, tokenizer, True), cfg)
    finally:
        tiny_model.zero_grad()
        tiny_model.eval()
    assert abs(l1.item() - l2.item()) < 1e-5
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-6, rtol=1e-4), name
        assert g1[name].abs().sum() > 0


def test_unrelated_sample_in_the_pack_changes_nothing(tiny_model, tokenizer, rows, features):
    strategy = pair_strategy(tokenizer, 2048)
    other = strategy.tokenize_prompt(
        make_row(
            "Something else entirely.",
            "x = [i * i for i in range(10)]\n",
            "x = [i * i for i in range(11)]\n",
        )
    )
    cfg = FGITConfig()
    with torch.no_grad():
        a = batch_loss(tiny_model, collate([features[0], features[1]], tokenizer, True), cfg)
        b = batch_loss(tiny_model, collate([features[0], other], tokenizer, True), cfg)
    hc_a, ha_a, hc_b, ha_b = (
        a.h_correct.value,
        a.h_incorrect.value,
        b.h_correct.value,
        b.h_incorrect.value,
    )
    assert torch.allclose(hc_a[0], hc_b[0], rtol=1e-5) and torch.allclose(
        ha_a[0], ha_b[0], rtol=1e-5
    )
    assert abs(hc_a[1] - hc_b[1]) > 0.01 * hc_a[1]  # the changed sample itself did change


@pytest.mark.parametrize("detach", [False, True])
def test_gradient_reaches_incorrect_branch_iff_not_detached(
    tiny_model, tokenizer, features, detach
):
    calls = []

    def keep(module, inputs, output) -> None:
        if output.requires_grad:
            output.retain_grad()
        calls.append((inputs[0], output))

    hook = tiny_model.get_input_embeddings().register_forward_hook(keep)
    batch = collate(features, tokenizer, True)
    tiny_model.train()
    try:
        batch_loss(tiny_model, batch, FGITConfig(detach_weights=detach)).loss.backward()
    finally:
        hook.remove()
        tiny_model.zero_grad()
        tiny_model.eval()
    # the truncated layout runs the incorrect tokens up to each half's last sensitive one
    ran = plan(flatten(batch, Granularity.hybrid), Layout.truncated).run
    side = batch["fgit_side"][batch["fgit_side"] > 0][ran]
    assert int((side == 2).sum()) > 0
    if not detach:
        ((ids, out),) = calls  # one forward over both halves
        grad_incorrect = out.grad[0, side == 2].abs().sum()
        assert grad_incorrect > 0
    else:
        (ids_a, out_a), (ids_c, out_c) = calls  # no-grad incorrect pass, then the correct one
        assert not out_a.requires_grad and ids_a.shape[1] == int((side == 2).sum())
        assert out_c.requires_grad and ids_c.shape[1] == int((side == 1).sum())


def test_hand_computed_tiny_case():
    # Sample 0: correct tokens p = (0.5, 0.8, 0.9) with V = (2, 0, 1);
    #           incorrect p = (0.25, 0.5) with V = (1, 1).
    # Sample 1: correct p = (0.6,) with V = (0,) -> no sensitive tokens.
    correct = SideTokens(
        torch.log(torch.tensor([0.5, 0.8, 0.9, 0.6])),
        torch.tensor([2.0, 0.0, 1.0, 0.0]),
        torch.tensor([0, 0, 0, 1]),
    )
    incorrect = SideTokens(
        torch.log(torch.tensor([0.25, 0.5])), torch.tensor([1.0, 1.0]), torch.tensor([0, 0])
    )
    hc = (2 * 0.5 + 1 * 0.9) / 3  # 0.6333
    ha = (0.25 + 0.5) / 2  # 0.375
    w = 2.0 + 1 - 2 * hc / (hc + ha)
    expect = (
        w * -math.log(0.5) + 1.0 * -math.log(0.8) + w * -math.log(0.9) + 1.0 * -math.log(0.6)
    ) / 4
    cfg = FGITConfig(alpha=2.0)
    parts = fgit_loss(correct, incorrect, n_samples=2, num_items=4, cfg=cfg)
    assert abs(parts.loss.item() - expect) < 1e-6
    assert (
        abs(parts.h_correct.value[0].item() - hc) < 1e-6
        and abs(parts.h_incorrect.value[0].item() - ha) < 1e-6
    )
    assert parts.w_pair[1].item() == 1.0 and not parts.h_correct.present[1]  # alpha - 1, unused
    one = strength(
        SideTokens(torch.log(torch.tensor([0.3])), torch.tensor([1.0]), torch.tensor([0])), 2
    )
    assert one.present.tolist() == [True, False] and abs(one.value[0].item() - 0.3) < 1e-6
    w_pure_insert = pair_weight(
        Strength(torch.tensor([0.7]), torch.tensor([True])),
        Strength(torch.tensor([0.0]), torch.tensor([False])),
        cfg,
    )
    assert w_pure_insert.item() == 2.0
    sft_side = SideTokens(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    assert token_weights(torch.tensor([2.5]), sft_side, FGITConfig(weighting="sft")).tolist() == [
        1.0,
        1.0,
    ]
    extremes = pair_weight(
        Strength(torch.tensor([1.0, 0.0]), torch.tensor([True, True])),
        Strength(torch.tensor([0.0, 1.0]), torch.tensor([True, True])),
        cfg,
    )
    assert extremes.tolist() == [1.0, 3.0]  # alpha-1 when it prefers correct, alpha+1 when wrong


def test_padded_batches_keep_one_row_per_pair(tiny_model, tokenizer, features):
    """Without packing each pair is its own attention row (rows × length² masks), not one
    row of the whole micro-batch; the loss is the same either way."""
    shapes = []
    hook = tiny_model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: shapes.append(tuple(inputs[0].shape))
    )
    try:
        with torch.no_grad():
            padded = batch_loss(tiny_model, collate(features, tokenizer, False), FGITConfig())
            packed = batch_loss(tiny_model, collate(features, tokenizer, True), FGITConfig())
    finally:
        hook.remove()
    assert shapes[0][0] == len(features) and shapes[1][0] == 1
    assert abs(padded.loss.item() - packed.loss.item()) < 1e-5
