"""``fgit-eval`` on the CPU: bf16 agrees with fp32, and bad inputs get clear errors."""

from __future__ import annotations

import json

import datasets
import pytest

from axolotl_fgit.contract import PARAMS_FILE
from conftest import SAMPLE_PAIRS, run_cli


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "pairs"
    run_cli("masks", "-i", SAMPLE_PAIRS, "-o", out)
    return out


def score(model, data, *extra) -> dict:
    proc = run_cli("--model", model, "--data", data, "--json", *extra, module="axolotl_fgit.eval")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bf16_on_cpu_agrees_with_fp32(tiny_dir, pairs):
    fp32 = score(tiny_dir, pairs, "--device", "cpu", "--dtype", "float32")
    bf16 = score(tiny_dir, pairs, "--device", "cpu", "--dtype", "bfloat16", "--batch-size", "3")
    assert fp32["dtype"] == "float32" and bf16["dtype"] == "bfloat16"
    assert fp32["pairs"] == bf16["pairs"] > 5 and fp32["pairs_per_s"] > 0
    for key in ("Hc_mean", "Ha_mean"):  # bf16 keeps about 3 significant digits
        assert bf16[key] == pytest.approx(fp32[key], rel=0.05), key
    assert abs(bf16["margin_mean"] - fp32["margin_mean"]) < 0.05 * fp32["Hc_mean"]


def test_auto_picks_float32_on_a_cpu_machine(tiny_dir, pairs):
    result = score(tiny_dir, pairs, "--limit", "2")
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["rows"] == 2


def test_bad_paths_and_foreign_data_are_named(tmp_path, tiny_dir, pairs):
    proc = run_cli(
        "--model", tmp_path / "nope", "--data", pairs, ok=False, module="axolotl_fgit.eval"
    )
    assert proc.returncode == 2 and "is not a model folder" in proc.stderr
    proc = run_cli(
        "--model", tiny_dir, "--data", tmp_path / "missing", ok=False, module="axolotl_fgit.eval"
    )
    assert proc.returncode == 2 and "not a dataset directory" in proc.stderr
    foreign = tmp_path / "plain"
    datasets.Dataset.from_dict({"instruction": ["x"], "output": ["y"]}).save_to_disk(foreign)
    proc = run_cli("--model", tiny_dir, "--data", foreign, ok=False, module="axolotl_fgit.eval")
    assert proc.returncode == 2 and "is not FGIT data" in proc.stderr
    proc = run_cli(
        "--model",
        tiny_dir,
        "--data",
        pairs,
        "--device",
        "cuda",
        ok=False,
        module="axolotl_fgit.eval",
    )
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def test_a_folder_that_is_not_a_model_says_what_it_lacks(tmp_path, tiny_dir, pairs):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    proc = run_cli("--model", empty, "--data", pairs, ok=False, module="axolotl_fgit.eval")
    assert proc.returncode == 2 and "it has no config.json" in proc.stderr, proc.stderr
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (no_weights / name).write_bytes((tiny_dir / name).read_bytes())
    proc = run_cli("--model", no_weights, "--data", pairs, ok=False, module="axolotl_fgit.eval")
    assert proc.returncode == 2 and "has config.json but no weights" in proc.stderr
    assert "sentencepiece" not in proc.stderr and "tiktoken" not in proc.stderr


def test_a_dataset_with_no_rows_is_named(tmp_path, tiny_dir, pairs):
    empty = tmp_path / "empty"
    datasets.load_from_disk(str(pairs)).select([]).save_to_disk(str(empty))
    (empty / PARAMS_FILE).write_bytes((pairs / PARAMS_FILE).read_bytes())
    proc = run_cli("--model", tiny_dir, "--data", empty, ok=False, module="axolotl_fgit.eval")
    assert proc.returncode == 2 and "has no rows" in proc.stderr, proc.stderr
    assert "IndexError" not in proc.stderr
