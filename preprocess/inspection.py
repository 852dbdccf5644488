"""Render an FGIT dataset as a page people can read: two responses side by side.

Changed lines are highlighted lightly, changed characters strongly (the two strengths
of the hybrid vector). The summary gives rows, rejects by reason and the share of
sensitive tokens (token columns, when the dataset has them, else characters).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from axolotl_fgit.contract import DEFAULT_COLUMNS as COLS
from axolotl_fgit.contract import Span
from fgit_preprocess.sources import REPORT_FILE

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table.pair{width:100%;border-collapse:collapse;table-layout:fixed;margin-bottom:2em}
table.pair td{vertical-align:top;border:1px solid #ccc;padding:.5em;width:50%}
pre{white-space:pre-wrap;word-break:break-all;margin:0;font-size:13px}
.line{background:#fff3b0}.edit{background:#ff9f80;font-weight:bold}
.summary td,.summary th{padding:.2em 1em;text-align:left}
.prompt{background:#f4f4f4;padding:.5em;white-space:pre-wrap}
"""


def highlight(text: str, line_spans: Sequence[Span], edit_spans: Sequence[Span]) -> str:
    """HTML for ``text`` with line spans in one colour and edit spans in a stronger one."""
    level = [0] * len(text)
    for spans, value in ((line_spans, 1), (edit_spans, 2)):
        for s, e in spans:
            for i in range(max(0, s), min(e, len(text))):
                level[i] = max(level[i], value)
    out, i = [], 0
    while i < len(text):
        j = i
        while j < len(text) and level[j] == level[i]:
            j += 1
        chunk = html.escape(text[i:j])
        cls = ("", "line", "edit")[level[i]]
        out.append(f'<span class="{cls}">{chunk}</span>' if cls else chunk)
        i = j
    return "".join(out)


def summary(ds, output: Path) -> dict[str, Any]:
    """Rows, rejects by reason and sensitive share for a dataset written by this tool."""
    report_file = output / REPORT_FILE
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    if "correct_hybrid" in ds.column_names:
        vectors = ds["correct_hybrid"]
        total = sum(len(v) for v in vectors)
        share, unit = sum(1 for v in vectors for x in v if x) / max(total, 1), "tokens"
    else:
        total = sum(len(t) for t in ds[COLS.correct])
        marked = sum(e - s for spans in ds[COLS.correct_line_spans] for s, e in spans)
        share, unit = marked / max(total, 1), "characters (no token columns)"
    return {
        "rows": len(ds),
        "rejected": report.get("rejected", 0),
        "rejects_by_reason": report.get("rejects_by_reason", {}),
        "sensitive_share": share,
        "sensitive_unit": unit,
    }


def _prompt_text(row: dict[str, Any]) -> str:
    if row.get(COLS.messages):
        return "\n\n".join(f"[{t['role']}] {t['content']}" for t in row[COLS.messages])
    return row.get(COLS.prompt, "")


def _side(row: dict[str, Any], text: str, lines: str, edits: str) -> str:
    return highlight(row[text], row[lines], row[edits])


def render(ds, rows: Sequence[int], stats: dict[str, Any], title: str) -> str:
    """The whole page: summary table, then each chosen row as a side-by-side pair."""
    reasons = (
        "".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{v}</td></tr>"
            for k, v in stats["rejects_by_reason"].items()
        )
        or "<tr><td>none</td></tr>"
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        "<table class='summary'>",
        f"<tr><th>rows</th><td>{stats['rows']}</td></tr>",
        f"<tr><th>rejected</th><td>{stats['rejected']}</td></tr>",
        f"<tr><th>sensitive share</th><td>{stats['sensitive_share']:.1%} of "
        f"{html.escape(stats['sensitive_unit'])}</td></tr></table>",
        f"<h3>Rejects by reason</h3><table class='summary'>{reasons}</table>",
        "<p><span class='line'>changed line</span> · <span class='edit'>changed "
        "characters</span></p>",
    ]
    for i in rows:
        row = ds[int(i)]
        extra = (
            f" — similarity {row['similarity']:.3f}" if row.get("similarity") is not None else ""
        )
        parts.append(
            f"<h2>Row {i}{extra}</h2><div class='prompt'>{html.escape(_prompt_text(row))}</div>"
            "<table class='pair'><tr><th>correct</th><th>incorrect</th></tr><tr>"
            f"<td><pre>{_side(row, COLS.correct, COLS.correct_line_spans, COLS.correct_edit_spans)}"
            "</pre></td><td><pre>"
            f"{_side(row, COLS.incorrect, COLS.incorrect_line_spans, COLS.incorrect_edit_spans)}"
            "</pre></td>"
            "</tr></table>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
