"""FGIT's log-probs equal ``log_softmax`` of each model's own logits, family by family.

Tiny random models (2 layers, hidden 64) of the causal-LM families code users fine-tune,
including those that transform logits after the head (Gemma-2/3 soft-capping, Granite's
``logits_scaling``, Cohere's ``logit_scale``) and a model whose forward has no
``logits_to_keep``. A model with a logit transform FGIT does not know is refused.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import LlamaForCausalLM

from axolotl_fgit.projection import FidelityError, Wanted, check_fidelity, forward_logprobs
from conftest import TINY

VOCAB = 512
COMMON = dict(**TINY, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.3)
# (initializer_range 0.3: large logits, so a missed transform shows)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "final_logit_softcapping": 2.0}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "final_logit_softcapping": 2.0}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0}),
    "cohere": ("CohereConfig", {"logit_scale": 0.25}),
    "hyperclovax": ("HyperCLOVAXConfig", {"logits_scaling": 0.5}),  # a multiplier here
    "falcon_h1": (  # small Mamba dimensions: the defaults cost 9 GB and a minute per forward
        "FalconH1Config",
        {
            "lm_head_multiplier": 0.25,
            "mamba_n_heads": 4,
            "mamba_d_head": 16,
            "mamba_d_ssm": 64,
            "mamba_d_state": 16,
            "mamba_chunk_size": 16,
        },
    ),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "starcoder2": ("Starcoder2Config", {}),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "olmo2": ("Olmo2Config", {}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
    ),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


# Mamba layers carry their state across the packed sequences of a row: refused.
REFUSED = {"falcon_h1": "state-space"}


class NoLogitsToKeep(LlamaForCausalLM):
    """An older-style forward without ``logits_to_keep`` (as remote code often has)."""

    def forward(
        self,
        input_ids=None,
        position_ids=None,
        attention_mask=None,
        use_cache=None,
        return_dict=None,
    ):
        return super().forward(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=use_cache,
        )


class RescalesLogits(LlamaForCausalLM):
    """A logit transform after the head that FGIT does not know about."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def build(config_cls: str, extra: dict, model_cls=None) -> torch.nn.Module:
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(0)
    if model_cls is None:
        try:
            model = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation="sdpa"
            )
        except ValueError as err:  # some transformers releases fetch a Hub kernel at init
            if "offline mode" not in str(err):
                raise
            pytest.skip(f"{config_cls} needs a Hub kernel this offline machine lacks: {err}")
    else:
        model = model_cls(config)
    return model.float().eval()


def packed_request() -> Wanted:
    """Two sequences packed in one row (positions restart), every next token wanted."""
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (1, 24))
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
    cols = torch.tensor([c for c in range(23) if c != 9])  # never across the boundary
    return Wanted(ids, pos, torch.zeros_like(cols), cols, ids[0, cols + 1])


def reference(model, want: Wanted) -> torch.Tensor:
    """log_softmax of the model's own logits, each sequence run on its own."""
    out = []
    for col, target in zip(want.col.tolist(), want.targets.tolist()):
        start = col - int(want.pos[0, col])
        ids = want.ids[:, start : col + 1]
        logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
        out.append(torch.log_softmax(logits, -1)[target])
    return torch.stack(out)


@pytest.mark.parametrize("family", [*FAMILIES, "no_logits_to_keep"])
def test_logprobs_equal_the_models_own(family):
    if family == "no_logits_to_keep":
        model = build("LlamaConfig", {}, NoLogitsToKeep)
    else:
        model = build(*FAMILIES[family])
    want = packed_request()
    if family in REFUSED:  # exact or refused: never a silently wrong loss
        with pytest.raises(FidelityError, match=REFUSED[family]):
            check_fidelity(model, want, chunk_size=7)
        return
    with torch.no_grad():
        ours = forward_logprobs(model, want, chunk_size=7)
        theirs = reference(model, want)
        assert check_fidelity(model, want, chunk_size=7) < 1e-5
    # The reference runs each position as its own forward, so its matmuls have other shapes
    # and round differently: a few float32 ulps of a log-prob near -10 (one ulp: 9.5e-7),
    # 1.1e-5 for mixtral on an AVX2-only CPU. A wrong projection is off by 1e-2 or more.
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=2e-6), (ours - theirs).abs().max()
    # The model's own transform is back in place after the call.
    with torch.no_grad():
        assert torch.allclose(reference(model, want), theirs)


def test_unknown_logit_transform_is_refused():
    model = build("LlamaConfig", {}, RescalesLogits)
    with pytest.raises(FidelityError, match="RescalesLogits"):
        check_fidelity(model, packed_request(), chunk_size=8)
