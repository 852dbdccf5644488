"""The dataset card (README.md) written beside every FGIT dataset, and Hub upload.

The card states what the data is, how it was made (command, teacher, selection, diff
scope), what was rejected and why, and what the teacher cost, so a pushed dataset explains
itself. It is always written locally; ``push_to_hub`` uploads the folder as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from axolotl_fgit.contract import FORMAT_VERSION


def render(report: dict[str, Any]) -> str:
    """Markdown card for a finished run's ``report.json`` contents."""
    params = report.get("params", {})
    teacher = report.get("teacher") or {}
    rejects = report.get("rejects_by_reason", {})
    lines = [
        "---",
        "tags: [fgit, code, axolotl]",
        "---",
        "# FGIT pairs",
        "",
        "Each row pairs a prompt with a `correct` and a similar-but-wrong `incorrect` response, "
        "plus character spans of their error-sensitive segments (changed lines and changed "
        "characters). Train on it with Axolotl: `plugins: [axolotl_fgit.FGITPlugin]` and "
        "`datasets: [{path: ..., type: axolotl_fgit.strategy}]`.",
        "",
        f"- data format version: {FORMAT_VERSION}",
        f"- rows: {report.get('rows_out')} kept of {report.get('rows_in')} read",
        f"- command: `fgit-preprocess {params.get('command', '?')}`",
        f"- diff scope: {params.get('diff_scope')}",
    ]
    if params.get("command") == "run":
        model = (params.get("teacher") or {}).get("model")
        lines += [
            f"- teacher: `{model}`, {(params.get('teacher') or {}).get('num_variants')} "
            "variants per row",
            f"- selection: {params.get('similarity')}"
            + (f" (`{params['embedder']}`)" if params.get("embedder") else ""),
            f"- teacher cost: {format_usd(teacher.get('cost_usd', 0.0))}",
        ]
    if "tests" in report:
        tests = {k: v for k, v in report["tests"].items() if k != "sandbox"}
        lines.append(f"- variants checked against tests: {json.dumps(tests)}")
        sandbox = report["tests"].get("sandbox") or {}
        lines.append(
            f"- tests ran in the sandbox: {sandbox.get('mode')} (namespaces: "
            f"{', '.join(sandbox.get('namespaces') or []) or 'none'}; user {sandbox.get('user')})"
        )
    lines += ["", "## Rejected rows", ""]
    lines += [f"- {reason}: {n}" for reason, n in rejects.items()] or ["- none"]
    if report.get("variant_rejects_by_reason"):
        lines += ["", "## Rejected teacher answers", ""]
        lines += [f"- {r}: {n}" for r, n in report["variant_rejects_by_reason"].items()]
    lines += ["", "## Parameters", "", "```json", json.dumps(params, indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


def format_usd(value: float) -> str:
    """Dollars with the digits that matter: $0.42, $0.0031, $4.5e-05."""
    if value == 0:
        return "$0"
    return f"${value:.4f}" if value >= 0.001 else f"${value:.2g}"


def push_to_hub(folder: Path, repo: str) -> str:
    """Upload a finished dataset folder (data, card, params, report) to a Hub dataset repo."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, repo_type="dataset", exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="dataset")
    return f"https://huggingface.co/datasets/{repo}"
