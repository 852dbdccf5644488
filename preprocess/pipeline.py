"""The mask stage shared by ``fgit-preprocess masks`` and ``run``: pairs → spans → Arrow.

Rows are processed with ``datasets.map`` (``--num-proc`` workers, progress bars); a row
that cannot be used is never dropped silently: it goes to ``<output>.rejects.jsonl``
with its reason and is counted in ``report.json``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from axolotl_fgit.contract import DEFAULT_COLUMNS as COLS
from axolotl_fgit.contract import PARAMS_FILE, params_record, project
from fgit_preprocess.card import render as render_card
from fgit_preprocess.diff import DiffScope, pair_spans
from fgit_preprocess.sources import (
    REJECT,
    REJECT_DETAIL,
    REPORT_FILE,
    Fields,
    RowError,
    normalise_row,
    rejects_path,
    write_json,
)

LOG = logging.getLogger("fgit.preprocess")
SPAN_COLUMNS = COLS.spans
HYBRID_COLUMNS = ("correct_hybrid", "incorrect_hybrid")  # optional, for inspection only


@dataclass
class MaskFn:
    """Picklable batch function for ``datasets.map`` (workers rebuild nothing heavy)."""

    fields: Fields
    scope: DiffScope
    tokenizer: Any = None

    def _hybrid(self, text: str, lines, edits) -> list[int]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return project(enc["offset_mapping"], lines, edits).hybrid.tolist()

    def row(self, row: dict[str, Any]) -> dict[str, Any]:
        try:
            out = normalise_row(row, self.fields)
        except RowError as err:  # keep what the row had, so the reject can be traced
            raw = {f: str(row.get(f))[:500] for f in sorted(self.fields.consumed()) if f in row}
            return {REJECT: err.reason, REJECT_DETAIL: f"{err}; row: {json.dumps(raw)}"}
        spans = pair_spans(out[COLS.correct], out[COLS.incorrect], self.scope)
        out.update(
            dict(
                zip(
                    SPAN_COLUMNS,
                    (
                        spans.correct_line,
                        spans.correct_edit,
                        spans.incorrect_line,
                        spans.incorrect_edit,
                    ),
                )
            )
        )
        out[REJECT], out[REJECT_DETAIL] = spans.reject or "", spans.reject or ""
        if self.tokenizer is not None and not spans.reject:
            out["correct_hybrid"] = self._hybrid(
                out[COLS.correct], spans.correct_line, spans.correct_edit
            )
            out["incorrect_hybrid"] = self._hybrid(
                out[COLS.incorrect], spans.incorrect_line, spans.incorrect_edit
            )
        return out

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(next(iter(batch.values())))
        rows = [self.row({k: v[i] for k, v in batch.items()}) for i in range(n)]
        keys = self.output_columns()
        return {k: [r.get(k, _EMPTY.get(k)) for r in rows] for k in keys}

    def output_columns(self) -> list[str]:
        c = COLS
        prompt = [c.messages] if self.fields.messages else [c.prompt]
        tokens = list(HYBRID_COLUMNS) if self.tokenizer is not None else []
        return [*prompt, c.correct, c.incorrect, *SPAN_COLUMNS, *tokens, REJECT, REJECT_DETAIL]


_EMPTY: dict[str, Any] = {c: [] for c in (*SPAN_COLUMNS, *HYBRID_COLUMNS)}


def compute_masks(ds, fn: MaskFn, num_proc: int = 1):
    """Map ``fn`` over ``ds``; return ``(kept, rejected)`` datasets.

    Input columns that FGIT does not consume are carried through; one whose name clashes
    with an output column is replaced, and that is logged.
    """
    outputs = fn.output_columns()
    consumed = fn.fields.consumed()
    clash = sorted((set(ds.column_names) - consumed) & set(outputs))
    if clash:
        LOG.warning("input columns %s are replaced by FGIT's columns of the same name", clash)
    mapped = ds.map(
        fn,
        batched=True,
        batch_size=500,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=sorted(consumed | set(clash)),
        desc="Computing error-sensitive segments",
    )
    reasons = mapped[REJECT]
    kept = [i for i, r in enumerate(reasons) if not r]
    dropped = [i for i, r in enumerate(reasons) if r]
    return (mapped.select(kept).remove_columns([REJECT, REJECT_DETAIL]), mapped.select(dropped))


def write_rejects(path: Path, rejected, extra: list[dict[str, Any]] = ()) -> Counter:
    """Write every rejected row with its reason as JSON lines; return counts by reason."""
    counts: Counter = Counter()
    with path.open("w") as fh:
        for row in [*extra, *rejected]:
            reason = row[REJECT]
            counts[reason] += 1
            clean = {
                k: v
                for k, v in row.items()
                if k not in (REJECT, REJECT_DETAIL) and v not in (None, [])
            }
            fh.write(
                json.dumps(
                    {"reason": reason, "detail": row.get(REJECT_DETAIL, ""), **clean}, default=str
                )
                + "\n"
            )
    return counts


class EmptyOutput(RuntimeError):
    """No row survived; nothing that looks like a dataset is written."""


class OutputBusy(RuntimeError):
    """Another process is writing the same output."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    return True


def _partials(output: Path) -> list[Path]:
    prefix = f".{output.name}.partial-"
    return [p for p in output.parent.iterdir() if p.name.startswith(prefix)]


def claim(output: Path) -> IO[str]:
    """Lock ``output`` until the returned file is closed, then remove the partial folders
    that killed runs left beside it: two runs never write one output, and a crash leaves
    nothing behind for good. The lock is ``.<output>.lock`` beside the output."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fh = (output.parent / f".{output.name}.lock").open("a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise OutputBusy(
            f"{output} is being written by another fgit-preprocess (pid {holder}); wait for "
            "it to finish or choose another --output"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    for partial in _partials(output):
        pid = partial.name.rsplit("-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid() or not _alive(int(pid)):
            LOG.info("removing %s, left by a run that was killed", partial)
            shutil.rmtree(partial, ignore_errors=True)
    return fh


def clear_output(output: Path) -> str:
    """Remove an old dataset at ``output`` (the run was asked to overwrite it) when a run
    keeps no row, so the folder never sits beside another run's rejects; say so."""
    if not output.exists():
        return f"Nothing was written to {output}"
    shutil.rmtree(output)
    return (
        f"Nothing was written, and the previous dataset in {output} was removed "
        "(--overwrite) so that it is not taken for this run's"
    )


def summary(
    rows_out: int, counts: Counter, output: Path, params: dict[str, Any], report: dict[str, Any]
) -> dict[str, Any]:
    """``report.json``: the row counts, the rejects by reason, the parameters, and the
    stages' own report."""
    return {
        "rows_in": rows_out + sum(counts.values()),
        "rows_out": rows_out,
        "rejected": sum(counts.values()),
        "rejects_by_reason": dict(sorted(counts.items())),
        "rejects_file": str(rejects_path(output)),
        "params": params,
        **report,
    }


def publish(output: Path, write_data: Callable[[Path], None], rows: int, full: dict) -> None:
    """Write the dataset (``write_data`` fills a folder), its parameters, card and
    ``report.json`` into a temporary folder beside ``output``, load it back as a check,
    and only then rename it onto ``output`` (replacing what was there): a crash never
    leaves a folder that looks complete."""
    import datasets

    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_data(staging)
        write_json(staging / PARAMS_FILE, params_record(**full["params"]))
        write_json(staging / REPORT_FILE, full)
        (staging / "README.md").write_text(render_card(full))
        if rows and len(datasets.load_from_disk(str(staging))) != rows:  # 0: an empty shard
            raise RuntimeError(f"{staging} did not load back with {rows} rows")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save(
    kept,
    output: Path,
    params: dict[str, Any],
    report: dict[str, Any],
    rejects: list[dict],
) -> dict:
    """Write one in-memory result (``kept`` rows and ``rejects`` records) as the output;
    an output with no row is refused (``EmptyOutput``), its rejects still written."""
    counts = write_rejects(rejects_path(output), [], rejects)
    if len(kept) == 0:
        raise EmptyOutput(
            f"no row survived ({sum(counts.values())} rejected: {dict(sorted(counts.items()))})"
            f"; see {rejects_path(output)}. {clear_output(output)}"
        )
    full = summary(len(kept), counts, output, params, report)
    publish(output, lambda staging: kept.save_to_disk(str(staging)), len(kept), full)
    return full
