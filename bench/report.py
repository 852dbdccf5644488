"""What an A/B run writes: results.json, a Markdown table and PNG plots."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from fgit_bench.metrics import bootstrap_ci, mean_sd

CURVES = ("loss", "fgit/Hc", "fgit/Ha", "fgit/pair_acc")


# The arm every other arm is compared with, problem by problem.
REFERENCE = "sft"


def metric_names(k: int) -> dict[str, str]:
    """Result key → column title, in table order."""
    return {
        "pair_acc": "pair_acc",
        "margin": "margin Hc−Ha",
        "pass@1": "pass@1 (greedy)",
        "pass@1_sampled": "pass@1 (sampled)",
        f"pass@{k}_sampled": f"pass@{k} (sampled)",
    }


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


def summarise(models: list[dict[str, Any]], k: int) -> dict[str, dict[str, Any]]:
    """Per arm: each metric's mean ± sd over seeds and a 95% bootstrap interval over
    problems (of the per-problem value averaged over seeds)."""
    out: dict[str, dict[str, Any]] = {}
    for arm, runs in _by_arm(models).items():
        out[arm] = {"seeds": len(runs)}
        for key in metric_names(k):
            pooled = list(_per_problem(runs, key).values())
            mean, sd = mean_sd([run["metrics"][key] for run in runs])
            out[arm][key] = {"mean": mean, "sd": sd, "ci95": bootstrap_ci(pooled), "n": len(pooled)}
    return out


def differences(
    models: list[dict[str, Any]], k: int, reference: str = REFERENCE
) -> dict[str, dict[str, Any]]:
    """Per arm other than ``reference`` and the base model: the mean per-problem
    difference arm − reference and its paired 95% bootstrap interval. Both arms answer the
    same problems, so pairing removes the spread between problems that the per-arm
    intervals carry; an interval that excludes 0 is a difference the run resolved."""
    by_arm = _by_arm(models)
    if reference not in by_arm:
        return {}
    theirs = {key: _per_problem(by_arm[reference], key) for key in metric_names(k)}
    out: dict[str, dict[str, Any]] = {}
    for arm, runs in by_arm.items():
        if arm in (reference, "base"):
            continue
        out[arm] = {}
        for key in metric_names(k):
            mine = _per_problem(runs, key)
            diff = [mine[p] - theirs[key][p] for p in mine if p in theirs[key]]
            out[arm][key] = {
                "mean": sum(diff) / len(diff) if diff else math.nan,
                "ci95": bootstrap_ci(diff),
                "n": len(diff),
                "better": sum(d > 0 for d in diff),
                "worse": sum(d < 0 for d in diff),
            }
    return out


def _cell(stat: dict[str, Any], seeds: int, digits: int = 3) -> str:
    if math.isnan(stat["mean"]):
        return "n/a"
    lo, hi = stat["ci95"]
    spread = f" ± {stat['sd']:.{digits}f}" if seeds > 1 else ""
    return f"{stat['mean']:.{digits}f}{spread} [{lo:.{digits}f}, {hi:.{digits}f}]"


def table(summary: dict[str, dict[str, Any]], k: int, train_seconds: dict[str, float]) -> str:
    """The Markdown table of the summary, one row per arm (the base model first)."""
    names = metric_names(k)
    head = ["model", *names.values(), "train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, stats in summary.items():
        seconds = train_seconds.get(arm)
        when = f"{seconds / 60:.1f} min" if seconds else "—"
        cells = [_cell(stats[m], stats["seeds"], 4 if m == "margin" else 3) for m in names]
        lines.append("| " + " | ".join([arm, *cells, when]) + " |")
    return "\n".join(lines)


def difference_table(diffs: dict[str, dict[str, Any]], k: int, reference: str = REFERENCE) -> str:
    """Markdown table of ``differences``: mean [95% CI] (problems better / worse)."""
    names = metric_names(k)
    head = [f"arm − {reference} (paired)", *names.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, stats in diffs.items():
        cells = []
        for key in names:
            st, digits = stats[key], 4 if key == "margin" else 3
            lo, hi = st["ci95"]
            cells.append(
                f"{st['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
                f" ({st['better']}/{st['worse']})"
            )
        lines.append("| " + " | ".join([arm, *cells]) + " |")
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

    k = results["settings"]["k"]
    names = metric_names(k)
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


def write(results: dict[str, Any], folder: Path) -> list[Path]:
    """results.json, results.md and the plots; the paths written."""
    k = results["settings"]["k"]
    md = folder / "results.md"
    text = table(results["summary"], k, results["timings"]["train_seconds_by_arm"]) + "\n"
    if results.get("differences"):
        text += "\n" + difference_table(results["differences"], k) + "\n"
        text += (
            "\nPaired over the same held-out problems; (n/m) = problems where the arm "
            f"scored higher / lower than {REFERENCE}.\n"
        )
    md.write_text(text, encoding="utf-8")
    out = folder / "results.json"
    out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return [out, md, *plot(results, folder)]
