"""What an A/B run writes: results.json, Markdown tables and PNG plots.

Arms are compared with a reference arm seed by seed: arm seed s against reference seed s
(same data order), problem by problem. Each problem's difference is averaged over the
seeds, and the bootstrap resamples problems (a problem's seeds move together, so the
interval is not narrowed by treating seeds as new problems). Wins and losses count every
(seed, problem) where the two disagree; the exact McNemar test on greedy pass@1 treats
those as independent, which seeds of one problem are not quite: read its p-value beside
the interval, not instead of it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from fgit_bench.metrics import bootstrap_ci, mean_sd, sign_test

CURVES = ("loss", "fgit/Hc", "fgit/Ha", "fgit/pair_acc")

BASE = "base"  # the untrained model: one row, no seed, every seed's starting point
# The arms every other arm is compared with, problem by problem, when they are in the run:
# the base model (did training help at all?), plain SFT, and FGIT's default weighting.
REFERENCES = (BASE, "sft", "dynamic")
GREEDY = "pass@1"  # the metric the McNemar test is run on


def metric_names(k: int, sampled: bool = True) -> dict[str, str]:
    """Result key → column title, in table order (no sampled metrics under --samples 0)."""
    names = {"pair_acc": "pair_acc", "margin": "margin Hc−Ha", GREEDY: "pass@1 (greedy)"}
    if sampled:
        names["pass@1_sampled"] = "pass@1 (sampled)"
        names[f"pass@{k}_sampled"] = f"pass@{k} (sampled)"
    return names


def _by_arm(models: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_arm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for model in models:
        by_arm[model["arm"]].append(model)
    return by_arm


def _per_problem(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Each problem's value of ``key``, averaged over the arm's seeds."""
    values: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        for problem, value in run["per_problem"][key].items():
            values[problem].append(value)
    return {problem: sum(v) / len(v) for problem, v in values.items()}


def summarise(models: list[dict[str, Any]], names: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per arm: each metric's mean ± sd over seeds and a 95% bootstrap interval over
    problems (of the per-problem value averaged over seeds)."""
    out: dict[str, dict[str, Any]] = {}
    for arm, runs in _by_arm(models).items():
        out[arm] = {"seeds": len(runs)}
        for key in names:
            pooled = list(_per_problem(runs, key).values())
            mean, sd = mean_sd([run["metrics"][key] for run in runs])
            out[arm][key] = {"mean": mean, "sd": sd, "ci95": bootstrap_ci(pooled), "n": len(pooled)}
    return out


def differences(
    models: list[dict[str, Any]], names: dict[str, str], reference: str
) -> dict[str, dict[str, Any]]:
    """Per arm other than ``reference`` and the base model: arm − reference, paired by
    seed and problem (see the module docstring; the base model, which has no seed, is
    every seed's reference). An interval that excludes 0 is a difference the run
    resolved."""
    by_arm = _by_arm(models)
    if reference not in by_arm:
        return {}
    done = REFERENCES[: REFERENCES.index(reference)] if reference in REFERENCES else ()
    theirs = {run["seed"]: run["per_problem"] for run in by_arm[reference]}
    if None in theirs:  # the base model
        theirs = {run["seed"]: theirs[None] for runs in by_arm.values() for run in runs}
    out: dict[str, dict[str, Any]] = {}
    for arm, runs in by_arm.items():
        if arm in (reference, BASE, *done):  # done: already compared with this reference
            continue
        paired = [run for run in runs if run["seed"] in theirs]
        if not paired:
            continue
        out[arm] = {"seeds": len(paired)}
        for key in names:
            gaps: dict[str, list[float]] = defaultdict(list)
            for run in paired:
                ref = theirs[run["seed"]][key]
                for problem, value in run["per_problem"][key].items():
                    if problem in ref:
                        gaps[problem].append(value - ref[problem])
            means = [sum(g) / len(g) for g in gaps.values()]
            every = [d for g in gaps.values() for d in g]
            stat = {
                "mean": sum(means) / len(means) if means else math.nan,
                "ci95": bootstrap_ci(means),
                "n": len(means),
                "better": sum(d > 0 for d in every),
                "worse": sum(d < 0 for d in every),
            }
            if key == GREEDY:
                stat["mcnemar_p"] = sign_test(stat["better"], stat["worse"])
            out[arm][key] = stat
    return out


def _cell(stat: dict[str, Any], seeds: int, digits: int = 3) -> str:
    if math.isnan(stat["mean"]):
        return "n/a"
    lo, hi = stat["ci95"]
    spread = f" ± {stat['sd']:.{digits}f}" if seeds > 1 else ""
    return f"{stat['mean']:.{digits}f}{spread} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _digits(key: str) -> int:
    return 4 if key == "margin" else 3


def table(
    summary: dict[str, dict[str, Any]], names: dict[str, str], train_seconds: dict[str, float]
) -> str:
    """Per arm (the base model first): mean ± sd over seeds [95% interval over problems]."""
    head = ["model", "seeds", *names.values(), "train time (per seed)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, stats in summary.items():
        seconds = train_seconds.get(arm)
        when = f"{seconds / 60:.1f} min" if seconds else "—"
        cells = [_cell(stats[m], stats["seeds"], _digits(m)) for m in names]
        seeds = str(stats["seeds"]) if arm != BASE else "—"
        lines.append("| " + " | ".join([arm, seeds, *cells, when]) + " |")
    return "\n".join(lines)


def seed_table(models: list[dict[str, Any]], names: dict[str, str]) -> str:
    """Every trained model's own values, one row per arm and seed."""
    head = ["model", *names.values(), "steps", "train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in models:
        cells = [f"{model['metrics'][m]:.{_digits(m)}f}" for m in names]
        train = model.get("training") or {}
        when = f"{train['seconds'] / 60:.1f} min" if train.get("seconds") else "—"
        lines.append(
            "| " + " | ".join([model["name"], *cells, str(train.get("steps", "—")), when]) + " |"
        )
    return "\n".join(lines)


def difference_table(
    diffs: dict[str, dict[str, Any]], names: dict[str, str], reference: str
) -> str:
    """Markdown table of ``differences``: mean [95% CI] (better / worse), McNemar p."""
    head = [f"arm − {reference} (paired)", "seeds", *names.values(), "McNemar p (greedy)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, stats in diffs.items():
        cells = []
        for key in names:
            st, digits = stats[key], _digits(key)
            lo, hi = st["ci95"]
            cells.append(
                f"{st['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
                f" ({st['better']}/{st['worse']})"
            )
        p = f"{stats[GREEDY]['mcnemar_p']:.3f}"
        lines.append("| " + " | ".join([arm, str(stats["seeds"]), *cells, p]) + " |")
    return "\n".join(lines)


def timing_table(timings: dict[str, Any]) -> str:
    """Wall time of every phase, in the order they ran."""
    lines = ["| phase | wall time |", "|---|---|"]
    for phase, seconds in timings["phases"].items():
        lines.append(f"| {phase} | {seconds / 60:.1f} min |")
    return "\n".join(lines)


def plot(results: dict[str, Any], folder: Path) -> list[Path]:
    """``curves.png`` (training logs over steps) and ``metrics.png`` (held-out metrics
    with their 95% intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, name in zip(axes.flat, CURVES):
        for run, logs in results["histories"].items():
            points = [(e["step"], e[name]) for e in logs if name in e]
            if points:
                ax.plot(*zip(*points), label=run, marker=".")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Training logs per arm (training data)")
    fig.tight_layout()
    paths.append(folder / "curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    names = results["metric_names"]
    summary = results["summary"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.6))
    for ax, (key, title) in zip(axes, names.items()):
        arms = list(summary)
        means = [summary[a][key]["mean"] for a in arms]
        lows = [max(0.0, m - summary[a][key]["ci95"][0]) for a, m in zip(arms, means)]
        highs = [max(0.0, summary[a][key]["ci95"][1] - m) for a, m in zip(arms, means)]
        ax.bar(arms, means, yerr=[lows, highs], capsize=4, color="#6a9fd8")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Held-out problems: mean with 95% bootstrap interval")
    fig.tight_layout()
    paths.append(folder / "metrics.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def markdown(results: dict[str, Any]) -> str:
    """results.md: the summary, every seed, the paired differences and the timings."""
    names = results["metric_names"]
    parts = [
        table(results["summary"], names, results["timings"]["train_seconds_by_arm"]),
        "Mean ± sd over seeds [95% bootstrap interval over held-out problems, of each "
        "problem's mean over seeds].",
        seed_table(results["models"], names),
    ]
    for reference, diffs in results["differences"].items():
        parts += [
            difference_table(diffs, names, reference),
            f"Paired by seed and problem; (n/m) = (seed, problem) pairs where the arm scored "
            f"higher / lower than {reference}; McNemar: exact two-sided sign test on greedy "
            "pass@1 wins and losses.",
        ]
    parts.append(timing_table(results["timings"]))
    return "\n\n".join(parts) + "\n"


def write(results: dict[str, Any], folder: Path) -> list[Path]:
    """results.json, results.md and the plots; the paths written."""
    md = folder / "results.md"
    md.write_text(markdown(results), encoding="utf-8")
    out = folder / "results.json"
    out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return [out, md, *plot(results, folder)]
