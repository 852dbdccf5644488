"""The real ``axolotl train`` CLI, in a subprocess, on SmolLM2-135M with the FGIT plugin.

Full fine-tune with sample packing, evaluation, checkpoints and resume; then LoRA; then
``fgit-eval`` before and after training shows the direction FGIT promises.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SAMPLE, pair_row, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.compat]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "pairs"
    run_cli("run", "-i", SAMPLE, "-o", out, "--teacher", "mutate", "--similarity", "levenshtein")
    return out


def config(tmp: Path, model: Path, data: Path, **overrides) -> Path:
    cfg = yaml.safe_load((ROOT / "examples" / "yaml" / "smollm2-135m-cpu.yml").read_text())
    cfg.update(
        base_model=str(model),
        datasets=[{"path": str(data), "type": "axolotl_fgit.strategy"}],
        dataset_prepared_path=str(tmp / "prepared"),
        output_dir=str(tmp / "out"),
        sequence_len=768,
        max_steps=4,
        save_steps=2,
        eval_steps=2,
        val_set_size=0.15,
        learning_rate=2e-4,
        warmup_steps=0,
    )
    cfg.update(overrides)
    path = tmp / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def axolotl_train(cfg: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.main", "train", str(cfg), "--launcher", "python"],
        capture_output=True,
        text=True,
        timeout=1200,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def history(checkpoint: Path) -> list[dict]:
    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]


def test_full_finetune_packed_with_eval_checkpoint_and_resume(tmp_path, smollm2_dir, pairs):
    cfg = config(tmp_path, smollm2_dir, pairs)
    axolotl_train(cfg)
    out = tmp_path / "out"
    logs = history(out / "checkpoint-4")
    train = [r for r in logs if "loss" in r]
    evals = [r for r in logs if "eval_loss" in r]
    assert len(train) == 4 and all(math.isfinite(r["loss"]) for r in train)
    for row in train:
        assert {"fgit/Hc", "fgit/Ha", "fgit/weight", "fgit/pair_acc", "fgit/sensitive_frac"} <= set(
            row
        )
        assert 1.0 <= row["fgit/weight"] <= 3.0 and 0 < row["fgit/Hc"] <= 1
    assert evals and all("eval_fgit/pair_acc" in r for r in evals)
    assert (out / "checkpoint-2" / "model.safetensors").exists()

    # Resume from the step-2 checkpoint and train on to step 6.
    resumed = config(
        tmp_path,
        smollm2_dir,
        pairs,
        max_steps=6,
        output_dir=str(tmp_path / "out"),
        resume_from_checkpoint=str(out / "checkpoint-2"),
    )
    proc = axolotl_train(resumed)
    logs = history(out / "checkpoint-6")
    steps = [r["step"] for r in logs if "loss" in r]
    assert steps[-1] == 6 and "fgit/Hc" in [r for r in logs if "loss" in r][-1]
    text = proc.stdout + proc.stderr
    assert "checkpoint-2" in text  # it did resume from the checkpoint

    before = json.loads(
        run_cli(
            "--model", smollm2_dir, "--data", pairs, "--json", module="axolotl_fgit.eval"
        ).stdout
    )
    after = json.loads(
        run_cli("--model", out, "--data", pairs, "--json", module="axolotl_fgit.eval").stdout
    )
    print(f"\nfgit-eval before: {before}\nfgit-eval after:  {after}")
    assert after["margin_mean"] > before["margin_mean"]
    assert after["pair_acc"] >= before["pair_acc"]


def test_lora_training_without_packing(tmp_path, smollm2_dir, pairs):
    cfg = config(
        tmp_path,
        smollm2_dir,
        pairs,
        adapter="lora",
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_linear=True,
        lora_mlp_kernel=False,
        lora_qkv_kernel=False,
        lora_o_kernel=False,
        sample_packing=False,
        micro_batch_size=2,
        max_steps=2,
        save_steps=2,
        eval_steps=2,
        gradient_checkpointing=True,
    )
    axolotl_train(cfg)
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").exists()
    logs = history(out / "checkpoint-2")
    assert all(math.isfinite(r["loss"]) and "fgit/Ha" in r for r in logs if "loss" in r)
    scored = json.loads(
        run_cli(
            "--model", out, "--data", pairs, "--json", "--limit", "4", module="axolotl_fgit.eval"
        ).stdout
    )
    assert scored["pairs"] >= 3 and 0 <= scored["pair_acc"] <= 1


@pytest.mark.parametrize("train_on_eos", ["turn", "last"])
def test_sft_weighting_matches_plain_chat_template_training(tmp_path, tiny_dir, train_on_eos):
    """Same rows, same model, one step: FGIT with weighting: sft trains the same label
    tokens and logs the same first-step loss as Axolotl's own type: chat_template."""
    import datasets

    from axolotl_fgit.contract import IGNORE_INDEX, Side

    system = {"role": "system", "content": "You write careful Python."}
    problems = [json.loads(line) for line in SAMPLE.open()][:6]
    chat_rows, pair_rows = [], []
    for i, p in enumerate(problems):
        turns = [system] * (i % 2) + [{"role": "user", "content": p["instruction"]}]
        correct = p["response"]
        incorrect = correct.replace("return", "return not", 1)
        chat_rows.append({"messages": [*turns, {"role": "assistant", "content": correct}]})
        pair_rows.append(pair_row(correct, incorrect, messages=turns, scope="code"))
    runs = {}
    for name, rows, extra in (
        ("sft", chat_rows, {"type": "chat_template"}),
        ("fgit", pair_rows, {"type": "axolotl_fgit.strategy"}),
    ):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        run_dir = tmp_path / name
        run_dir.mkdir()
        cfg = config(
            run_dir,
            tiny_dir,
            data,
            sample_packing=False,
            micro_batch_size=len(rows),
            gradient_accumulation_steps=1,
            max_steps=1,
            val_set_size=0,
            save_steps=1,
            eval_steps=None,
            learning_rate=1e-5,
            fgit={"weighting": "sft"},
            datasets=[{"path": str(data), "train_on_eos": train_on_eos, **extra}],
        )
        if name == "sft":
            text = yaml.safe_load(cfg.read_text())
            del text["plugins"], text["fgit"]
            cfg.write_text(yaml.safe_dump(text))
        axolotl_train(cfg)
        runs[name] = history(run_dir / "out" / "checkpoint-1")[0]["loss"], run_dir
    assert runs["fgit"][0] == pytest.approx(runs["sft"][0], abs=1e-4), runs

    def label_count(run_dir: Path) -> int:
        """Trained tokens of the correct responses in the dataset Axolotl prepared."""
        files = sorted((run_dir / "prepared").rglob("data-*.arrow"))
        table = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
        count = 0
        for row in table:
            sides = row.get("fgit_side") or [Side.CORRECT] * len(row["labels"])
            count += sum(
                lab != IGNORE_INDEX and s == Side.CORRECT for lab, s in zip(row["labels"], sides)
            )
        return count

    assert label_count(runs["fgit"][1]) == label_count(runs["sft"][1]) > 0


@pytest.mark.parametrize(
    "packing",
    [pytest.param(True, id="packed", marks=pytest.mark.pinned), pytest.param(False, id="unpacked")],
)
def test_shared_prefix_trains_exactly_as_two_halves(tmp_path, tiny_dir, pairs, packing):
    """Through the real ``axolotl train``: the shared layout logs the loss of two halves at
    the first step, and at the second (after an update through both branches of W)."""
    runs = {}
    for share in (True, False):
        run_dir = tmp_path / f"share-{share}"
        run_dir.mkdir()
        cfg = config(
            run_dir,
            tiny_dir,
            pairs,
            sample_packing=packing,
            micro_batch_size=1 if packing else 4,
            gradient_accumulation_steps=1,
            max_steps=2,
            val_set_size=0,
            save_steps=2,
            eval_steps=None,
            fgit={"share_prefix": share},
        )
        log = axolotl_train(cfg)
        said = "shared prefix" if share else "fgit.share_prefix: false"
        assert f"FGIT layout: {'' if share else 'two halves'}" in log.stdout + log.stderr
        assert said in log.stdout + log.stderr
        runs[share] = [r["loss"] for r in history(run_dir / "out" / "checkpoint-2") if "loss" in r]
    assert len(runs[True]) == 2
    assert runs[True] == pytest.approx(runs[False], rel=1e-5), runs
