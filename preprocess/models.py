"""Local model folders: turn a GGUF checkpoint into a Hugging Face folder once.

Used by the demo and the tests, which must run offline from files a package ships.
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
