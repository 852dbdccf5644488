"""The truncated and shared-prefix layouts give today's two-half loss and gradients, exactly.

Tiny random fp32 models of every family in ``test_fidelity``, packed rows of several pairs
covering the shapes a diff takes (one site, several sites, a pure insertion, a pure
deletion, a difference at the first response token, a change on the last line only, and
pairs that differ from their very first token), in every granularity and weighting.
Tolerances are fp32 rounding: the loss within 1e-5 (relative, as these losses are about
15), each gradient within rtol 1e-4 plus 1e-4 of its tensor's largest entry (summing the
same terms in another order moves near-zero entries by ~1e-6).
"""

from __future__ import annotations

import copy
import difflib
import itertools

import pytest
import torch
from test_fidelity import FAMILIES, REFUSED, build
from transformers import LlamaForCausalLM

from axolotl_fgit.args import FGITConfig
from axolotl_fgit.collator import FGITDataCollator, FGITPackedDataCollator
from axolotl_fgit.contract import IGNORE_INDEX, Side
from axolotl_fgit.layout import Layout, plan
from axolotl_fgit.loss import flatten
from axolotl_fgit.trainer import batch_loss, check_sharing, sharing_blocker

NEWLINE = 10  # the "\n" token of these made-up responses
SEQUENCE_LEN = 512


def marks(tokens: list[int], changed: set[int]) -> tuple[list[int], list[int]]:
    """Line and edit vectors: edit marks the changed tokens, line their whole lines."""
    edit = [int(i in changed) for i in range(len(tokens))]
    line, start = [0] * len(tokens), 0
    for i, t in enumerate(tokens):
        if t == NEWLINE or i == len(tokens) - 1:
            if any(edit[start : i + 1]):
                line[start : i + 1] = [1] * (i + 1 - start)
            start = i + 1
    return line, edit


def pair(prompt: list[int], correct: list[int], incorrect: list[int], prompt_a=None) -> dict:
    """One sample as the prompt strategy lays it out, spans from a token-level diff."""
    ops = difflib.SequenceMatcher(a=incorrect, b=correct, autojunk=False).get_opcodes()
    in_c = {j for op, _, _, j1, j2 in ops if op in ("replace", "insert") for j in range(j1, j2)}
    in_a = {i for op, i1, i2, _, _ in ops if op in ("replace", "delete") for i in range(i1, i2)}
    prompt_a = prompt if prompt_a is None else prompt_a
    c_line, c_edit = marks(correct, in_c)
    a_line, a_edit = marks(incorrect, in_a)
    ids_c, ids_a = prompt + correct, prompt_a + incorrect
    return {
        "input_ids": ids_c + ids_a,
        "attention_mask": [1] * (len(ids_c) + len(ids_a)),
        "labels": [IGNORE_INDEX] * len(prompt) + correct + [IGNORE_INDEX] * len(ids_a),
        "fgit_side": [int(Side.CORRECT)] * len(ids_c) + [int(Side.INCORRECT)] * len(ids_a),
        "fgit_line": [0] * len(prompt) + c_line + [0] * len(prompt_a) + a_line,
        "fgit_edit": [0] * len(prompt) + c_edit + [0] * len(prompt_a) + a_edit,
    }


def pairs() -> list[dict]:
    g = torch.Generator().manual_seed(3)

    def words(n: int) -> list[int]:
        return torch.randint(11, 500, (n,), generator=g).tolist()

    prompt = words(7)
    lines = [words(5) + [NEWLINE] for _ in range(4)]
    code = sum(lines, [])

    def changed(*where: int) -> list[int]:
        out = list(code)
        for i in where:
            out[i] = 500 + i % 11
        return out

    return [
        pair(prompt, code, changed(9)),  # one site
        pair(prompt, code, changed(2, 15, 20)),  # several sites
        pair(prompt, code, sum(lines[:1] + lines[2:], [])),  # pure insertion
        pair(prompt, code, sum(lines[:2] + [words(4) + [NEWLINE]] + lines[2:], [])),  # deletion
        pair(prompt, code, changed(0)),  # the first response token
        pair(prompt, code, changed(len(code) - 3)),  # identical up to the last line
        pair(prompt, code, changed(4), prompt_a=words(7)),  # differs from the first token
    ]


def loss_and_grads(model, batch, cfg: FGITConfig, layout: Layout):
    model.zero_grad()
    loss = batch_loss(model, batch, cfg, layout=layout).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def assert_same(model, batch, cfg: FGITConfig, layouts=(Layout.truncated, Layout.shared)):
    loss, grads = loss_and_grads(model, batch, cfg, Layout.halves)
    assert grads and loss > 0
    for layout in layouts:
        other, other_grads = loss_and_grads(model, batch, cfg, layout)
        assert abs(float(other - loss)) <= 1e-5 * max(1.0, float(loss)), (layout, other, loss)
        assert other_grads.keys() == grads.keys()
        for name, g in grads.items():
            scale = float(g.abs().max())
            torch.testing.assert_close(other_grads[name], g, rtol=1e-4, atol=1e-4 * scale)


def collate(features, tokenizer, packed: bool):
    feats = copy.deepcopy(features)
    if packed:
        return FGITPackedDataCollator(tokenizer, return_tensors="pt")([feats])
    return FGITDataCollator(tokenizer, return_tensors="pt")(feats)


@pytest.fixture(scope="module")
def features():
    return pairs()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in REFUSED])
def test_every_family_gets_the_two_half_loss(family, features, tokenizer):
    model = build(*FAMILIES[family])
    assert sharing_blocker(model, SEQUENCE_LEN) is None
    assert_same(model, collate(features, tokenizer, packed=True), FGITConfig())


@pytest.mark.parametrize(
    "weighting,granularity",
    list(itertools.product(["dynamic", "static", "sft"], ["hybrid", "line", "token"])),
)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_every_mode_gets_the_two_half_loss(weighting, granularity, packed, features, tokenizer):
    model = build("LlamaConfig", {})
    cfg = FGITConfig(weighting=weighting, granularity=granularity)
    assert_same(model, collate(features, tokenizer, packed), cfg)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_training_paths_get_the_two_half_loss(attn, features, tokenizer):
    """Detached weights (a separate no-grad pass under the truncated layout) and eager
    attention (an additive mask) as well, in training mode."""
    model = build("LlamaConfig", {})
    model.config._attn_implementation = attn
    model.train()
    batch = collate(features, tokenizer, packed=True)
    assert_same(model, batch, FGITConfig(detach_weights=True))
    assert_same(model, batch, FGITConfig())


def test_shared_layout_runs_the_fewest_tokens(features, tokenizer):
    flat = flatten(collate(features, tokenizer, packed=True), "hybrid")
    runs = {layout: int(plan(flat, layout).run.sum()) for layout in Layout}
    assert runs[Layout.shared] < runs[Layout.truncated] < runs[Layout.halves]
    n_correct = int((flat.side == Side.CORRECT).sum())
    # one-site pair: the suffix is its changed line up to the changed token, no more
    one_site = plan(flatten(collate(features[:1], tokenizer, True), "hybrid"), Layout.shared)
    assert int(one_site.run.sum()) - int((flat.sample == 0).sum() // 2) <= 6
    assert runs[Layout.shared] - n_correct < 0.5 * (runs[Layout.halves] - n_correct)


def test_models_where_sharing_is_not_exact_are_named():
    model = build(*FAMILIES["falcon_h1"])
    assert "carry state along the sequence" in sharing_blocker(model, SEQUENCE_LEN)
    windowed = build("MistralConfig", {"sliding_window": 16})
    assert "sliding-window attention (window 16)" in sharing_blocker(windowed, SEQUENCE_LEN)
    assert sharing_blocker(windowed, 16) is None  # no sequence can cross a window that long
    flash = build("LlamaConfig", {})
    flash.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2 cannot take a tree mask" in sharing_blocker(flash, SEQUENCE_LEN)


class IgnoresMasks(LlamaForCausalLM):
    """A forward that drops the caller's attention mask (as some remote code does)."""

    def forward(self, *args, attention_mask=None, **kwargs):
        return super().forward(*args, **kwargs)


def test_the_shared_layout_check_flags_a_model_that_ignores_the_mask(features, tokenizer):
    batch = collate(features, tokenizer, packed=True)
    flat = flatten(batch, "hybrid")
    assert check_sharing(build("LlamaConfig", {}), flat, FGITConfig()) < 1e-5
    assert check_sharing(build("LlamaConfig", {}, IgnoresMasks), flat, FGITConfig()) > 1e-2


@pytest.mark.slow  # compiles FlexAttention (about 15 s)
def test_flex_attention_takes_the_tree_as_a_block_mask(features, tokenizer):
    """FlexAttention has no backward on CPU, so the forward is checked here: the shared
    layout's BlockMask gives SDPA's two-half log-probs."""
    from axolotl_fgit.trainer import pair_logprobs

    model = build("LlamaConfig", {})
    flat = flatten(collate(features, tokenizer, packed=True), "hybrid")
    with torch.no_grad():
        theirs = pair_logprobs(model, flat, FGITConfig(), False, layout=Layout.halves)
        model.config._attn_implementation = "flex_attention"
        ours = pair_logprobs(model, flat, FGITConfig(), False, layout=Layout.shared)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
