"""Which kernel computes FGIT's log-probs: the fused one the config turned on, or the
chunked projection; a kernel asked for but unusable is a config error."""

from __future__ import annotations

import sys

import pytest
import torch

from axolotl_fgit.args import FGITArgs, FGITConfig
from axolotl_fgit.kernels import Kernel, kernel_problems, requested_kernel
from axolotl_fgit.trainer import batch_loss, verify_fidelity

CCE_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
FGIT = "axolotl_fgit.FGITPlugin"


@pytest.mark.parametrize(
    "cfg,kernel",
    [
        ({"cut_cross_entropy": True, "plugins": [FGIT, CCE_PLUGIN]}, Kernel.cut_cross_entropy),
        ({"liger_fused_linear_cross_entropy": True, "plugins": [FGIT, LIGER_PLUGIN]}, Kernel.liger),
        ({"plugins": [FGIT]}, Kernel.chunked),
        ({"cut_cross_entropy": False, "plugins": [FGIT, CCE_PLUGIN]}, Kernel.chunked),
    ],
    ids=["cce-used", "liger-used", "not-requested", "turned-off"],
)
def test_the_kernel_the_config_asks_for_is_used(cfg, kernel):
    assert requested_kernel(cfg) == kernel
    assert kernel_problems(cfg) == []


def test_a_kernel_whose_library_is_missing_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)  # as if not installed
    data = {"fgit": {}, "cut_cross_entropy": True, "plugins": [FGIT, CCE_PLUGIN]}
    with pytest.raises(ValueError, match="pip install cut-cross-entropy, or set cut_cross_entropy"):
        FGITArgs.model_validate(data)


def test_a_kernel_key_without_its_plugin_is_a_config_error():
    data = {"fgit": {}, "liger_fused_linear_cross_entropy": True, "plugins": [FGIT]}
    with pytest.raises(ValueError, match="only with plugins: \\[axolotl.integrations.liger"):
        FGITArgs.model_validate(data)


@pytest.mark.slow  # torch.compile of cut-cross-entropy's CPU implementation takes ~30 s
def test_cut_cross_entropy_on_cpu_matches_the_chunked_path(tiny_model, tokenizer):
    from test_loss import collate, make_row

    from axolotl_fgit.strategy import pair_strategy

    strategy = pair_strategy(tokenizer, 2048)
    rows = [
        make_row("Add.", "def f(a, b):\n    return a + b\n", "def f(a, b):\n    return a - b\n"),
        make_row("Max.", "def g(x):\n    return max(x)\n", "def g(x):\n    return min(x)\n"),
    ]
    batch = collate([strategy.tokenize_prompt(r) for r in rows], tokenizer, packed=True)
    cfg = FGITConfig()
    with torch.no_grad():
        chunked = batch_loss(tiny_model, batch, cfg)
        fused = batch_loss(tiny_model, batch, cfg, kernel=Kernel.cut_cross_entropy)
        assert verify_fidelity(tiny_model, batch, cfg, kernel=Kernel.cut_cross_entropy) < 1e-4
    assert abs(fused.loss.item() - chunked.loss.item()) < 1e-4
    assert torch.allclose(fused.h_correct.value, chunked.h_correct.value, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma2", "granite", "cohere"])
def test_cut_cross_entropy_applies_post_head_transforms(family):
    from test_fidelity import FAMILIES, build, packed_request, reference

    from axolotl_fgit.projection import forward_logprobs

    model = build(*FAMILIES[family])
    want = packed_request()
    with torch.no_grad():
        fused = forward_logprobs(model, want, 64, Kernel.cut_cross_entropy)
        assert torch.allclose(fused, reference(model, want), atol=1e-4, rtol=0)
