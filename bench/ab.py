"""One A/B run: preprocess the train split, train every arm, score every model held out.

Steps (each logged with its time): the problem set is split (train / held-out, fixed by
module); ``fgit-preprocess run`` makes correct/incorrect pairs of both splits with the
chosen teacher, the variants proven wrong by the tests; ``axolotl train`` trains each arm
and seed on the train pairs; the base model and every trained model are then scored on
the held-out split: pair accuracy and margin (as ``fgit-eval``), and pass@1 / pass@k of
the functions they write, run against the tests in the sandbox.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fgit_bench import report
from fgit_bench.arms import Arm, Training, arm_config, history, train
from fgit_bench.generation import Sampling, judge, write_answers
from fgit_bench.problems import Problem, load
from fgit_preprocess.sandbox import Limits, SandboxMode, isolation

LOG = logging.getLogger("fgit.bench")
BASE = "base"


@dataclass(frozen=True, kw_only=True)
class Teacher:
    """How ``fgit-preprocess run`` makes the pairs."""

    name: str = "mutate"
    api_base: str | None = None
    num_variants: int = 4
    similarity: str = "embedding"
    embedder: str = "microsoft/unixcoder-base"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything one A/B run needs."""

    out: Path
    model: str
    arms: list[Arm]
    problems: Path | None = None  # None: the bundled set
    seeds: int = 1
    train_problems: int | None = None  # None: all
    held_out_problems: int | None = None
    training: Training = field(default_factory=Training)
    teacher: Teacher = field(default_factory=Teacher)
    sampling: Sampling = field(default_factory=Sampling)
    k: int = 2
    launcher: str = "python"
    test_seconds: int = 3  # CPU per sandboxed run; a doctest here takes milliseconds
    sandbox: SandboxMode = "bwrap"  # how generated code is contained (fgit-preprocess --sandbox)


def _split(settings: Settings) -> dict[str, list[Problem]]:
    problems = load(settings.problems)
    limits = {"train": settings.train_problems, "held_out": settings.held_out_problems}
    out = {}
    for name, limit in limits.items():
        chosen = [p for p in problems if p.split == name]
        out[name] = chosen[:limit] if limit else chosen
        if not out[name]:
            raise ValueError(f"the problem set has no {name} problems")
    return out


def make_pairs(problems: list[Problem], folder: Path, settings: Settings) -> Path:
    """``fgit-preprocess run`` on ``problems``: the pairs directory it wrote."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = folder / "problems.jsonl"
    rows.write_text("".join(json.dumps(p.row()) + "\n" for p in problems), encoding="utf-8")
    pairs = folder / "pairs"
    command = [
        sys.executable, "-m", "fgit_preprocess", "run",
        "-i", str(rows), "-o", str(pairs),
        "--teacher", settings.teacher.name,
        "--sandbox", settings.sandbox,
        "--num-variants", str(settings.teacher.num_variants),
        "--similarity", settings.teacher.similarity,
        "--embedder", settings.teacher.embedder,
        "--tests-field", "tests",
        "--test-seconds", str(settings.test_seconds),
        "--overwrite",
        *(["--api-base", settings.teacher.api_base] if settings.teacher.api_base else []),
    ]  # fmt: skip
    log = folder / "preprocess.log"
    with log.open("w", encoding="utf-8") as fh:
        done = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8").splitlines()[-20:])
        raise RuntimeError(f"fgit-preprocess failed on {rows} (log {log}):\n{tail}")
    return pairs


def _pair_metrics(model, tokenizer, pairs: Path, sequence_len: int) -> dict[str, dict[str, float]]:
    """Per held-out problem (that has a pair): pair accuracy (0/1) and margin Hc − Ha."""
    import datasets

    from axolotl_fgit.eval import pair_scores

    rows = datasets.load_from_disk(str(pairs))
    scores = pair_scores(model, tokenizer, rows, sequence_len=sequence_len)
    acc, margin = {}, {}
    for problem, score in zip(rows["id"], scores):
        if score is not None:
            acc[problem] = float(score[0] > score[1])
            margin[problem] = score[0] - score[1]
    if len(acc) < len(rows):
        LOG.warning(
            "%d of %d held-out pairs are not scored: a side has no error-sensitive token "
            "within sequence_len %d",
            len(rows) - len(acc),
            len(rows),
            sequence_len,
        )
    return {"pair_acc": acc, "margin": margin}


def _generation_dtype(device: Any) -> Any:
    """bfloat16 on a GPU or a CPU with native bf16 units (AMX/AVX512-BF16), else float32:
    sampling does not need float32, and it dominates the A/B's time."""
    import torch

    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if device.type == "cuda" or native else torch.float32


def evaluate(model_dir: str, problems: list[Problem], pairs: Path, settings: Settings) -> dict:
    """Held-out metrics of one model, per problem and averaged."""
    import torch

    from axolotl_fgit.eval import load_model, load_tokenizer

    start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model_dir)
    # Scores in the precision training logged them; generation in the fast one.
    exact = load_model(
        model_dir, torch.bfloat16 if device.type == "cuda" else torch.float32, device
    )
    per_problem = _pair_metrics(exact, tokenizer, pairs, settings.training.sequence_len)
    del exact
    fast = _generation_dtype(device)
    writer = load_model(model_dir, fast, device)
    answers = write_answers(writer, tokenizer, problems, settings.sampling)
    del writer
    seconds = settings.test_seconds
    limits = Limits(mode=settings.sandbox, cpu_seconds=seconds, wall_seconds=2 * seconds + 5)
    verdicts = judge(problems, answers, limits)
    k = settings.k
    per_problem["pass@1"] = {p.id: float(v.greedy) for p, v in zip(problems, verdicts)}
    per_problem["pass@1_sampled"] = {p.id: v.pass_at(1) for p, v in zip(problems, verdicts)}
    per_problem[f"pass@{k}_sampled"] = {p.id: v.pass_at(k) for p, v in zip(problems, verdicts)}
    metrics = {
        key: statistics.fmean(values.values()) if values else float("nan")
        for key, values in per_problem.items()
    }
    failures: dict[str, int] = {}
    for v in verdicts:
        for reason in v.reasons:
            failures[reason] = failures.get(reason, 0) + 1
    return {
        "metrics": metrics,
        "per_problem": per_problem,
        "answers": {p.id: a.greedy for p, a in zip(problems, answers)},
        "outcomes": failures,
        "generation_dtype": str(fast).removeprefix("torch."),
        "seconds": time.monotonic() - start,
    }


def run(settings: Settings) -> dict[str, Any]:
    """The whole A/B; returns (and writes under ``settings.out``) the results."""
    start = time.monotonic()
    isolation(settings.sandbox)  # no sandbox here: stop before the first step
    out = settings.out
    split = _split(settings)
    LOG.info("problems: %d train, %d held out", len(split["train"]), len(split["held_out"]))
    t0 = time.monotonic()
    pairs = {
        name: make_pairs(problems, out / "data" / name, settings)
        for name, problems in split.items()
    }
    preprocess_seconds = time.monotonic() - t0
    import datasets

    pair_counts = {name: len(datasets.load_from_disk(str(path))) for name, path in pairs.items()}
    models = [{"name": BASE, "arm": BASE, "seed": None, "path": settings.model}]
    train_seconds: dict[str, float] = {}
    histories: dict[str, list[dict[str, float]]] = {}
    for arm in settings.arms:
        for seed in range(settings.seeds):
            name = f"{arm.label}-s{seed}"
            folder = out / "arms" / name
            config = arm_config(
                arm, seed, settings.model, pairs["train"], folder, settings.training
            )
            LOG.info("training %s (%d steps)", name, settings.training.max_steps)
            train_seconds[name] = train(config, folder, settings.launcher)
            histories[name] = history(folder)
            models.append(
                {"name": name, "arm": arm.label, "seed": seed, "path": str(folder / "model")}
            )
    for model in models:
        LOG.info("evaluating %s on %d held-out problems", model["name"], len(split["held_out"]))
        model.update(evaluate(model["path"], split["held_out"], pairs["held_out"], settings))
    by_arm: dict[str, float] = {}
    for model in models[1:]:
        by_arm[model["arm"]] = (
            by_arm.get(model["arm"], 0.0) + train_seconds[model["name"]] / settings.seeds
        )
    results = {
        "settings": {
            "model": settings.model,
            "arms": [asdict(a) for a in settings.arms],
            "seeds": settings.seeds,
            "training": asdict(settings.training),
            "teacher": asdict(settings.teacher),
            "sampling": asdict(settings.sampling),
            "k": settings.k,
            "sandbox": asdict(isolation(settings.sandbox)),
            "problems": str(settings.problems or "bundled: algorithms 1.0.1 (MIT)"),
        },
        "data": {
            "train_problems": len(split["train"]),
            "held_out_problems": len(split["held_out"]),
            "train_pairs": pair_counts["train"],
            "held_out_pairs": pair_counts["held_out"],
        },
        "models": models,
        "summary": report.summarise(models, settings.k),
        "differences": report.differences(models, settings.k),
        "histories": histories,
        "timings": {
            "preprocess_seconds": preprocess_seconds,
            "train_seconds": train_seconds,
            "train_seconds_by_arm": by_arm,
            "eval_seconds": {m["name"]: m["seconds"] for m in models},
            "total_seconds": time.monotonic() - start,
        },
    }
    results["files"] = [str(p) for p in report.write(results, out)]
    return results
