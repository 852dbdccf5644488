"""Which kernel computes FGIT's per-token log-probs.

Users who turn on a fused linear-cross-entropy kernel for SFT (``cut_cross_entropy: true``
with Axolotl's CutCrossEntropyPlugin, or ``liger_fused_linear_cross_entropy: true`` with its
LigerPlugin) get FGIT's log-probs from that kernel (``reduction="none"``), so they keep its
memory saving; everyone else gets the chunked PyTorch projection. A kernel asked for whose
library is missing is a config error, never a silent fallback.
"""

from __future__ import annotations

import importlib
from enum import Enum
from typing import Any

import torch

from axolotl_fgit.args import setting


class Kernel(str, Enum):
    chunked = "chunked"
    cut_cross_entropy = "cut_cross_entropy"
    liger = "liger"


# kernel -> (config key, module to import, pip package, Axolotl plugin that owns the key)
REQUESTS = {
    Kernel.cut_cross_entropy: (
        "cut_cross_entropy",
        "cut_cross_entropy",
        "cut-cross-entropy",
        "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin",
    ),
    Kernel.liger: (
        "liger_fused_linear_cross_entropy",
        "liger_kernel.transformers",
        "liger-kernel",
        "axolotl.integrations.liger.LigerPlugin",
    ),
}


def requested_kernel(cfg: Any) -> Kernel:
    """The kernel the Axolotl config asks for (the first one, if both are on)."""
    return next((k for k, (key, *_) in REQUESTS.items() if setting(cfg, key)), Kernel.chunked)


def kernel_problems(cfg: Any) -> list[str]:
    """A config-error message for each kernel the config turns on but cannot use: its
    library does not import, or the plugin that owns its key is not listed (Axolotl would
    then drop the key without a word)."""
    problems = []
    for key, module, package, plugin in REQUESTS.values():
        if not setting(cfg, key):
            continue
        if plugin not in (setting(cfg, "plugins") or []):
            problems.append(
                f"{key}: true takes effect only with plugins: [{plugin}]; add it or remove {key}"
            )
        try:
            importlib.import_module(module)
        except ImportError as err:
            problems.append(
                f"{key}: true needs the {package} package, which cannot be imported ({err}); "
                f"pip install {package}, or set {key}: false"
            )
    return problems


def describe(kernel: Kernel, chunk_size: int) -> str:
    """What the training log says about the log-prob path."""
    if kernel == Kernel.chunked:
        return f"chunked PyTorch projection ({chunk_size} tokens per chunk)"
    return f"{REQUESTS[kernel][2]} fused linear cross-entropy (reduction='none')"


def fused_logprobs(
    kernel: Kernel,
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """``log p(targets)`` from ``softcap(scale · head(hidden))`` by a fused kernel.

    The scale is applied to the hidden states (``(s·h) Wᵀ = s·(h Wᵀ)``), so the vocabulary
    matrix is never copied.
    """
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ValueError(
            f"{REQUESTS[kernel][0]}: the fused kernel needs a plain bias-free linear output head; "
            f"this model's is {type(head).__name__}. Set {REQUESTS[kernel][0]}: false"
        )
    scaled = hidden * scale if scale != 1.0 else hidden
    if kernel == Kernel.cut_cross_entropy:
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if hidden.is_cuda else "torch_compile"  # the Triton kernel needs CUDA
        loss = linear_cross_entropy(
            scaled, head.weight, targets, softcap=softcap, reduction="none", impl=impl
        )
    else:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="none", softcap=softcap)(
            head.weight, scaled, targets
        )
    return -loss.float()
