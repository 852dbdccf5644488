"""FGIT's loss against an independent reference: two separate forwards per sample, full
logits, plain PyTorch — on padded and packed batches, for every mode (FGIT-SPEC §2)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from axolotl_fgit.args import FGITColumns, FGITConfig
from axolotl_fgit.collator import FGITDataCollator, FGITPackedDataCollator
from axolotl_fgit.loss import fgit_loss, pair_weight, strengths, token_weights
from axolotl_fgit.strategy import FGITPromptStrategy
from axolotl_fgit.trainer import batch_loss
from conftest import SAMPLE_PAIRS
from preprocess.diff import pair_spans

MODES = list(itertools.product(["dynamic", "static", "sft"], ["hybrid", "line", "token"]))


def make_row(prompt: str, correct: str, incorrect: str) -> dict:
    spans = pair_spans(correct, incorrect, "response")
    return {"prompt": prompt, "correct": correct, "incorrect": incorrect,
            "correct_line_spans": spans.correct_line, "correct_edit_spans": spans.correct_edit,
            "incorrect_line_spans": spans.incorrect_line, "incorrect_edit_spans": spans.incorrect_edit}


@pytest.fixture(scope="module")
def rows():
    pairs = [json.loads(line) for line in SAMPLE_PAIRS.open()][:3]
    out = [make_row(p["instruction"], p["correct"], p["incorrect"]) for p in pairs]
    # Pure insertion: no sensitive token in the incorrect response -> W = alpha.
    out.append(make_row("Sum it.", "def f(a):\n    a = a + 1\n    return a\n", "def f(a):\n    return a\n"))
    # Pure deletion: no sensitive token in the correct response -> all weights alpha - 1.
    out.append(make_row("Keep it.", "def g(b):\n    return b\n", "def g(b):\n    b = b * 2\n    return b\n"))
    return out


@pytest.fixture(scope="module")
def features(rows, smollm2_tokenizer):
    strategy = FGITPromptStrategy(smollm2_tokenizer, FGITColumns(), sequence_len=2048)
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
        return [{"hybrid": line[i] + edit[i], "line": line[i], "token": edit[i]}[cfg.granularity] for i in idx]

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
def test_loss_matches_reference(smollm2_model, smollm2_tokenizer, features, weighting, granularity, packed):
    cfg = FGITConfig(weighting=weighting, granularity=granularity, logprob_chunk_size=64)
    batch = collate(features, smollm2_tokenizer, packed)
    smollm2_model.eval()
    with torch.no_grad():
        got = batch_loss(smollm2_model, batch, cfg).loss
        want = reference_loss(smollm2_model, features, cfg)
    assert abs(got.item() - want.item()) < 1e-5, (got.item(), want.item())


def test_training_paths_match_reference(smollm2_model, smollm2_tokenizer, features):
    """Train mode takes the split path (no-grad incorrect pass) for detach/static/sft."""
    smollm2_model.train()
    try:
        for cfg in (FGITConfig(detach_weights=True), FGITConfig(weighting="static"), FGITConfig()):
            got = batch_loss(smollm2_model, collate(features, smollm2_tokenizer, True), cfg).loss
            with torch.no_grad():
                want = reference_loss(smollm2_model, features, cfg)
            assert abs(got.item() - want.item()) < 1e-5
    finally:
        smollm2_model.eval()


def test_sft_mode_equals_standard_sft_loss(smollm2_model, smollm2_tokenizer, features):
    """weighting: sft == the Hugging Face causal-LM loss on the correct halves alone."""
    halves = []
    for f in features:
        n = f["fgit_side"].count(1)
        halves.append({"input_ids": f["input_ids"][:n], "attention_mask": [1] * n, "labels": f["labels"][:n]})
    from axolotl.utils.collators import DataCollatorForSeq2Seq

    sft = DataCollatorForSeq2Seq(smollm2_tokenizer, return_tensors="pt")(halves)
    n_items = (sft["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        want = smollm2_model(**sft, num_items_in_batch=n_items).loss
        got = batch_loss(smollm2_model, collate(features, smollm2_tokenizer, False),
                         FGITConfig(weighting="sft"), n_items).loss
    assert abs(got.item() - want.item()) < 1e-5


def _grads(model, batch, cfg):
    model.zero_grad()
    loss = batch_loss(model, batch, cfg).loss
    loss.backward()
    names = ["model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight", "model.norm.weight"]
    params = dict(model.named_parameters())
    return loss.detach(), {n: params[n].grad.clone() for n in names}


def test_packed_and_padded_give_same_loss_and_gradients(smollm2_model, smollm2_tokenizer, features):
    cfg = FGITConfig()
    smollm2_model.train()
    try:
        l1, g1 = _grads(smollm2_model, collate(features, smollm2_tokenizer, False), cfg)
        l2, g2 = _grads(smollm2_model, collate(features, smollm2_tokenizer, True), cfg)
    finally:
        smollm2_model.zero_grad()
        smollm2_model.eval()
    assert abs(l1.item() - l2.item()) < 1e-5
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-6, rtol=1e-4), name
        assert g1[name].abs().sum() > 0


def test_unrelated_sample_in_the_pack_changes_nothing(smollm2_model, smollm2_tokenizer, rows, features):
    strategy = FGITPromptStrategy(smollm2_tokenizer, FGITColumns(), sequence_len=2048)
    other = strategy.tokenize_prompt(make_row("Something else entirely.", "x = [i * i for i in range(10)]\n",
                                              "x = [i * i for i in range(11)]\n"))
    cfg = FGITConfig()
    with torch.no_grad():
        a = batch_loss(smollm2_model, collate([features[0], features[1]], smollm2_tokenizer, True), cfg)
        b = batch_loss(smollm2_model, collate([features[0], other], smollm2_tokenizer, True), cfg)
    assert abs(a.hc[0] - b.hc[0]) < 1e-6 and abs(a.ha[0] - b.ha[0]) < 1e-6
    assert abs(a.hc[1] - b.hc[1]) > 1e-4  # the changed sample itself did change


@pytest.mark.parametrize("detach", [False, True])
def test_gradient_reaches_incorrect_branch_iff_not_detached(smollm2_model, smollm2_tokenizer, features, detach):
    calls = []

    def keep(module, inputs, output) -> None:
        if output.requires_grad:
            output.retain_grad()
        calls.append((inputs[0], output))

    hook = smollm2_model.get_input_embeddings().register_forward_hook(keep)
    batch = collate(features, smollm2_tokenizer, True)
    smollm2_model.train()
    try:
        batch_loss(smollm2_model, batch, FGITConfig(detach_weights=detach)).loss.backward()
    finally:
        hook.remove()
        smollm2_model.zero_grad()
        smollm2_model.eval()
    side = batch["fgit_side"][batch["fgit_side"] > 0]
    if not detach:
        (ids, out), = calls  # one forward over both halves
        grad_incorrect = out.grad[0, side == 2].abs().sum()
        assert grad_incorrect > 0
    else:
        (ids_a, out_a), (ids_c, out_c) = calls  # no-grad incorrect pass, then the correct one
        assert not out_a.requires_grad and ids_a.shape[1] == int((side == 2).sum())
        assert out_c.requires_grad and ids_c.shape[1] == int((side == 1).sum())


def test_hand_computed_tiny_case():
    # Sample 0: correct tokens p = (0.5, 0.8, 0.9) with V = (2, 0, 1); incorrect p = (0.25, 0.5) with V = (1, 1).
    # Sample 1: correct p = (0.6,) with V = (0,) -> no sensitive tokens.
    logp_c = torch.log(torch.tensor([0.5, 0.8, 0.9, 0.6]))
    sample_c, v_c = torch.tensor([0, 0, 0, 1]), torch.tensor([2.0, 0.0, 1.0, 0.0])
    logp_a, sample_a, v_a = torch.log(torch.tensor([0.25, 0.5])), torch.tensor([0, 0]), torch.tensor([1.0, 1.0])
    hc = (2 * 0.5 + 1 * 0.9) / 3  # 0.6333
    ha = (0.25 + 0.5) / 2  # 0.375
    w = 2.0 + 1 - 2 * hc / (hc + ha)
    expect = (w * -math.log(0.5) + 1.0 * -math.log(0.8) + w * -math.log(0.9) + 1.0 * -math.log(0.6)) / 4
    parts = fgit_loss(logp_c, sample_c, v_c, logp_a, sample_a, v_a, 2, 4, 2.0, "dynamic", False, 1e-6)
    assert abs(parts.loss.item() - expect) < 1e-6
    assert abs(parts.hc[0].item() - hc) < 1e-6 and abs(parts.ha[0].item() - ha) < 1e-6
    assert parts.w_pair[1].item() == 1.0 and not parts.has_c[1]  # alpha - 1, unused
    h, has = strengths(torch.tensor([0.3]), torch.tensor([1.0]), torch.tensor([0]), 2)
    assert has.tolist() == [True, False]
    w_pure_insert = pair_weight(torch.tensor([0.7]), torch.tensor([0.0]), torch.tensor([True]),
                                torch.tensor([False]), 2.0, "dynamic", 1e-6)
    assert w_pure_insert.item() == 2.0
    assert token_weights(torch.tensor([2.5]), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), 2.0, "sft").tolist() == [1.0, 1.0]
    extremes = pair_weight(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([True, True]),
                           torch.tensor([True, True]), 2.0, "dynamic", 1e-6)
    assert extremes.tolist() == [1.0, 3.0]  # alpha-1 when it prefers correct, alpha+1 when wrong
