"""One A/B run: preprocess the train split, train every arm, score every model held out.

Steps (each logged with its time): the problem set is split (train / held-out, fixed by
module, checked disjoint); ``fgit-preprocess run`` makes correct/incorrect pairs of both
splits with the chosen teacher, the variants proven wrong by the tests; ``axolotl train``
trains each arm and seed on the train pairs; the base model and every trained model are
scored on the held-out split: pair accuracy and margin (as ``fgit-eval``), and pass@1 /
pass@k of the functions they write, run against the tests in the sandbox.

A run is resumable: each finished step (a split's pairs, a training, a scoring) is
recorded under ``--out`` as it ends, and a rerun with the same ``--out`` skips it, so a
killed run loses only the step in progress and a long sweep can span several sittings.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fgit_bench import report
from fgit_bench.arms import (
    MATCHED_BASE,
    Arm,
    Training,
    arm_config,
    history,
    steps_logged,
    train,
    train_runtime,
)
from fgit_bench.generation import Sampling, judge, write_answers
from fgit_bench.problems import Problem, load
from fgit_preprocess.sandbox import Limits, SandboxMode, isolation

LOG = logging.getLogger("fgit.bench")


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


def check_split(split: dict[str, list[Problem]]) -> None:
    """No held-out problem, nor any function of a held-out module, among the train ones."""
    ids = {name: {p.id for p in problems} for name, problems in split.items()}
    modules = {name: {i.split(":")[0] for i in found} for name, found in ids.items()}
    shared = (ids["train"] & ids["held_out"]) | (modules["train"] & modules["held_out"])
    if shared:
        raise ValueError(f"train and held-out problems overlap: {sorted(shared)[:5]}")


def check_pairs(pairs: Path, problems: list[Problem], split: str) -> int:
    """The pairs' count, after checking each comes from a problem of ``split``."""
    import datasets

    rows = datasets.load_from_disk(str(pairs))
    stray = set(rows["id"]) - {p.id for p in problems}
    if stray:
        raise ValueError(f"{split} pairs {pairs} hold rows of other problems: {sorted(stray)[:5]}")
    return len(rows)


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
    """bfloat16 on a GPU; float32 on a CPU, whether or not it has bf16 units: greedy answers
    depend on the precision, and a run resumed on another CPU must write the same ones."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


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
    if settings.sampling.samples:
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


class Store:
    """The ``--out`` folder as a record of finished steps: one JSON file each, written
    whole (to a temporary name, then renamed) when the step ends."""

    MANIFEST = "run.json"

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, name: str) -> dict[str, Any] | None:
        path = self.root / name
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def put(self, name: str, value: dict[str, Any]) -> dict[str, Any]:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(value, indent=1), encoding="utf-8")
        os.replace(partial, path)
        return value

    def claim(self, settings: Settings) -> None:
        """Record the run's settings, or check a resumed run's against them: every
        setting but the arms and seeds must match, and an arm's label its definition."""
        fixed = _fingerprint(settings)
        arms = {a.label: _plain(asdict(a)) for a in settings.arms}
        before = self.get(self.MANIFEST)
        if before is not None:
            earlier = _portable(before["settings"], self.root)  # older runs: absolute paths
            changed = sorted(k for k in fixed.keys() | earlier.keys()
                             if fixed.get(k) != earlier.get(k))  # fmt: skip
            redefined = sorted(
                label for label, arm in arms.items() if before["arms"].get(label, arm) != arm
            )
            if changed or redefined:
                what = ", ".join([*changed, *(f"--arm {label}" for label in redefined)])
                raise ValueError(
                    f"--out {self.root} holds a run with other settings ({what}); resume it "
                    "with the same ones, or use another --out, or pass --overwrite"
                )
            arms = {**before["arms"], **arms}
        self.put(self.MANIFEST, {"settings": fixed, "arms": arms})


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (paths as strings, tuples as lists)."""
    return json.loads(json.dumps(value, default=str))


def _portable(value: Any, out: Path) -> Any:
    """``value`` with every path inside ``--out`` or the installed packages written from
    ``<out>`` or ``<site-packages>``: a run's records resume (and rebuild their report)
    wherever they are copied, by any clone's environment."""
    roots = [(str(out).rstrip(os.sep), "<out>"), (str(out.resolve()).rstrip(os.sep), "<out>"),
             (sysconfig.get_paths()["purelib"].rstrip(os.sep), "<site-packages>")]  # fmt: skip

    def rewrite(item: Any) -> Any:
        if isinstance(item, dict):
            return {key: rewrite(inner) for key, inner in item.items()}
        if isinstance(item, list):
            return [rewrite(inner) for inner in item]
        if isinstance(item, str):
            for root, name in roots:
                if item == root or item.startswith(root + os.sep):
                    return name + item[len(root) :]
        return item

    return rewrite(value)


def _fingerprint(settings: Settings) -> dict[str, Any]:
    """Every setting that makes one step's result differ (not the arms, seeds, launcher)."""
    return _portable(
        _plain(
            {
                "model": settings.model,
                "problems": settings.problems,
                "train_problems": settings.train_problems,
                "held_out_problems": settings.held_out_problems,
                "training": asdict(settings.training),
                "teacher": asdict(settings.teacher),
                "sampling": asdict(settings.sampling),
                "k": settings.k,
                "test_seconds": settings.test_seconds,
                "sandbox": settings.sandbox,
            }
        ),
        Path(settings.out),
    )


def matched_steps(max_steps: int, arm_seconds: float, sft_seconds: float) -> int:
    """The SFT steps that take the matched arm's training time (to the nearest step, at
    least one): ``max_steps`` scaled by the two arms' measured times."""
    return max(1, round(max_steps * arm_seconds / sft_seconds))


def _train_arm(
    arm: Arm, seed: int, pairs: Path, settings: Settings, trained: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Train one arm and seed (from scratch: a partial folder is cleared); what it took."""
    name = f"{arm.label}-s{seed}"
    folder = settings.out / "arms" / name
    steps = settings.training.max_steps
    if arm.kind == "matched":
        target, sft = trained[f"{arm.matched}-s{seed}"], trained[f"{MATCHED_BASE}-s{seed}"]
        steps = matched_steps(steps, target["runtime"], sft["runtime"])
        if steps == settings.training.max_steps:  # the same config as sft: its model
            LOG.info("%s: %s's time fits %d steps, as %s-s%d trained", name, arm.matched, steps,
                     MATCHED_BASE, seed)  # fmt: skip
            return {**sft, "same_as": f"{MATCHED_BASE}-s{seed}", "seconds": 0.0}
    shutil.rmtree(folder, ignore_errors=True)
    config = arm_config(arm, seed, settings.model, pairs, folder, settings.training, steps)
    LOG.info("training %s (%d steps)", name, steps)
    seconds = train(config, folder, settings.launcher)
    logs = history(folder)
    return {
        "steps": steps,
        "seconds": seconds,
        "runtime": train_runtime(folder),
        "model": str((folder / "model").relative_to(settings.out)),  # moves with --out
        "history": steps_logged(logs),
    }


def _order(arms: list[Arm]) -> list[Arm]:
    """Matched arms last: they need the time of the arms they match."""
    return [a for a in arms if a.kind != "matched"] + [a for a in arms if a.kind == "matched"]


def run(settings: Settings) -> dict[str, Any]:
    """The whole A/B, resuming what ``settings.out`` already holds; returns (and writes
    under ``settings.out``) the results."""
    start = time.monotonic()
    isolation(settings.sandbox)  # no sandbox here: stop before the first step
    out, store = settings.out, Store(settings.out)
    split = _split(settings)
    check_split(split)
    store.claim(settings)
    LOG.info("problems: %d train, %d held out", len(split["train"]), len(split["held_out"]))
    phases: dict[str, float] = {}
    pairs, pair_counts = {}, {}
    for name, problems in split.items():
        done = store.get(f"data/{name}/done.json")
        if done is None:
            t0 = time.monotonic()
            make_pairs(problems, out / "data" / name, settings)
            done = store.put(f"data/{name}/done.json", {"seconds": time.monotonic() - t0})
        pairs[name] = out / "data" / name / "pairs"
        pair_counts[name] = check_pairs(pairs[name], problems, name)
        phases[f"preprocess {name}"] = done["seconds"]

    def scored(name: str, path: str) -> dict[str, Any]:
        found = store.get(f"scores/{name}.json")
        if found is None:
            LOG.info("evaluating %s on %d held-out problems", name, len(split["held_out"]))
            found = store.put(
                f"scores/{name}.json",
                evaluate(path, split["held_out"], pairs["held_out"], settings),
            )
        phases[f"score {name}"] = found["seconds"]
        return found

    models = [{"name": report.BASE, "arm": report.BASE, "seed": None, "path": settings.model}]
    models[0].update(scored(report.BASE, settings.model))
    trained: dict[str, dict[str, Any]] = {}
    for seed in range(settings.seeds):
        for arm in _order(settings.arms):
            name = f"{arm.label}-s{seed}"
            record = store.get(f"arms/{name}/trained.json") or store.put(
                f"arms/{name}/trained.json",
                _train_arm(arm, seed, pairs["train"], settings, trained),
            )
            trained[name] = record
            phases[f"train {name}"] = record["seconds"]
            path = str(out / record["model"])  # older records hold it absolute
            model = {"name": name, "arm": arm.label, "seed": seed, "path": path}
            model["training"] = {k: v for k, v in record.items() if k != "history"}
            model.update(scored(record.get("same_as", name), path))
            models.append(model)
    names = report.metric_names(settings.k, sampled=settings.sampling.samples > 0)
    by_arm: dict[str, list[float]] = {}
    for name, record in trained.items():
        if "same_as" not in record:
            by_arm.setdefault(name.rsplit("-s", 1)[0], []).append(record["seconds"])
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
        "metric_names": names,
        "models": models,
        "summary": report.summarise(models, names),
        "differences": {
            ref: diffs
            for ref in report.REFERENCES
            if (diffs := report.differences(models, names, ref))
        },
        "histories": {name: record["history"] for name, record in trained.items()},
        "timings": {
            "phases": phases,
            "train_seconds_by_arm": {arm: statistics.fmean(s) for arm, s in by_arm.items()},
            "all_phases_seconds": sum(phases.values()),
            "this_sitting_seconds": time.monotonic() - start,
        },
    }
    results["files"] = [str(p) for p in report.write(results, out)]
    return results
