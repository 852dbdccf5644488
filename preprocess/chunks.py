"""Bounded memory: ``run`` and ``masks`` take the input ``--chunk-rows`` rows at a time.

Each chunk goes through every stage and is written as it ends (its kept rows as Arrow, its
rejects and its report) into a work folder beside the output, ``.<output>.chunks``; then
it is forgotten, so memory holds one chunk whatever the input's size. When the last chunk
is done, its Arrow files become the output's ``save_to_disk`` dataset (hard-linked, not
copied), the rejects files one rejects file and the reports one report. A killed run,
rerun with the same command, starts at the first unfinished chunk; a run with other
settings or another input starts over.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fgit_preprocess.pipeline import EmptyOutput, clear_output, publish, summary, write_rejects
from fgit_preprocess.sources import REPORT_FILE, SHARD_PARAM, rejects_path, write_json

LOG = logging.getLogger("fgit.preprocess")
CHUNK_ROWS = 10_000
STAMP_FILE = "stamp.json"
DATA, REJECTS = "data", "rejects.jsonl"
MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now; file pages are read back on use


def release_mapped_arrow() -> None:
    """Hand back the pages of memory-mapped Arrow files (the input, written chunks) that
    this process has read. They are the kernel's page cache, dropped whenever memory is
    short, but RSS counts them as ours until then, so without this a streamed run's RSS
    would grow with the input it has read. Nothing is lost: a page used again is read back
    from its file. Elsewhere than Linux, or on an older kernel, this does nothing."""
    if not sys.platform.startswith("linux"):
        return
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) == 6 and fields[5].endswith(".arrow") and "w" not in fields[1]:
                start, stop = (int(x, 16) for x in fields[0].split("-"))
                madvise(start, stop - start, MADV_PAGEOUT)


def join(values: list[Any]) -> Any:
    """Reports of parts as one: numbers add up, dicts join key by key, a value that every
    part shares is kept, and values that differ become the list of them."""
    if all(isinstance(v, dict) for v in values):
        keys = dict.fromkeys(k for v in values for k in v)
        return {k: join([v[k] for v in values if k in v]) for k in keys}
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sum(values)
    return values[0] if all(v == values[0] for v in values) else values


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from the reports of parts (chunks or shards): counts add up, means and
    rates are recomputed over all parts; the row counts are left to ``summary``."""
    merged = join(
        [{k: v for k, v in r.items() if k not in ("params", "rejects_file")} for r in reports]
    )
    if "status" in merged:
        merged["status"] = "complete"
    if merged.get("rows_paired"):  # means over the rows that got a variant
        paired = [(r["rows_paired"], r.get("similarity_mean")) for r in reports]
        merged["similarity_mean"] = sum(n * m for n, m in paired if n) / merged["rows_paired"]
        merged["valid_variants_mean"] = merged["valid_variants"] / merged["rows_paired"]
    tests = merged.get("tests")
    if tests and tests.get("variants_run"):
        tests["kill_rate"] = tests["variants_killed"] / tests["variants_run"]
    for name in ("rows_in", "rows_out", "rejected", "rejects_by_reason"):
        merged.pop(name, None)
    return merged


def _input_stamp(source: Any) -> list[Any] | None:
    """Size and modification time of a local input (every file of a folder): a resumed
    run must read the same input."""
    path = Path(str(source))
    if not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


@dataclass(frozen=True)
class Chunk:
    """Rows ``start`` to ``stop`` (positions in the input, after --limit and --shard)."""

    index: int
    start: int
    stop: int


class ChunkedOutput:
    """The work folder of one streamed run: which chunks are done, and their results."""

    def __init__(self, output: Path, settings: dict[str, Any], rows: int, chunk_rows: int):
        self.output = output
        self.work = output.with_name(f".{output.name}.chunks")
        starts = range(0, rows, chunk_rows) or range(1)
        self.chunks = [Chunk(i, a, min(a + chunk_rows, rows)) for i, a in enumerate(starts)]
        stamp = json.loads(
            json.dumps(
                {
                    "settings": settings,
                    "input": _input_stamp(settings.get("input")),
                    "rows": rows,
                    "chunk_rows": chunk_rows,
                },
                default=str,
            )
        )
        stamp_path = self.work / STAMP_FILE
        if self.work.exists():
            before = json.loads(stamp_path.read_text()) if stamp_path.exists() else None
            if before != stamp:
                LOG.info("%s holds a run with other settings or input: starting over", self.work)
                shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        write_json(stamp_path, stamp)

    def _folder(self, chunk: Chunk) -> Path:
        return self.work / f"chunk-{chunk.index:05d}"

    def report(self, chunk: Chunk) -> dict[str, Any] | None:
        """The chunk's report if it is finished, else None."""
        path = self._folder(chunk) / REPORT_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def pending(self) -> Iterator[Chunk]:
        """The chunks still to do, in input order (a resumed run says what it skips)."""
        done = [c for c in self.chunks if self.report(c) is not None]
        if done:
            LOG.info(
                "resuming: %d of %d chunks (%d rows) were finished by an earlier run",
                len(done),
                len(self.chunks),
                sum(c.stop - c.start for c in done),
            )
        yield from (c for c in self.chunks if c not in done)

    def finished(self) -> list[dict[str, Any]]:
        return [r for c in self.chunks if (r := self.report(c)) is not None]

    def write(self, chunk: Chunk, kept, rejected, extra: list[dict], report: dict) -> None:
        """Record one finished chunk: written whole under a temporary name, then renamed."""
        folder = self._folder(chunk)
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        if len(kept):
            kept.save_to_disk(str(partial / DATA))
        counts = write_rejects(partial / REJECTS, rejected, extra)
        write_json(
            partial / REPORT_FILE,
            {
                **report,
                "rows_out": len(kept),
                "rejected": sum(counts.values()),
                "rejects_by_reason": dict(counts),
            },
        )
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        release_mapped_arrow()

    def first_reject(self, keep: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        """The first reject record, in input order, that ``keep`` accepts (read lazily)."""
        for chunk in self.chunks:
            with (self._folder(chunk) / REJECTS).open(encoding="utf-8") as fh:
                for line in fh:
                    if keep(record := json.loads(line)):
                        return record
        return None

    def totals(self) -> tuple[int, Counter, dict[str, Any]]:
        """Rows kept, rejects by reason and the joined report of all chunks (all done)."""
        reports = self.finished()
        counts: Counter = Counter()
        for r in reports:
            counts.update(r["rejects_by_reason"])
        return sum(r["rows_out"] for r in reports), counts, merge_reports(reports)

    def finish(self, params: dict[str, Any]) -> dict[str, Any]:
        """Join the chunks into the output (dataset, rejects file, report, card) and remove
        the work folder; ``EmptyOutput`` (the rejects file still written) if none kept a row,
        unless this is one shard of many: that output has a report and no dataset."""
        rows_out, counts, report = self.totals()
        with rejects_path(self.output).open("wb") as out:
            for chunk in self.chunks:
                with (self._folder(chunk) / REJECTS).open("rb") as part:
                    shutil.copyfileobj(part, out)
        lost = f"{sum(counts.values())} rejected: {dict(sorted(counts.items()))}"
        if rows_out == 0 and not params.get(SHARD_PARAM):
            note = clear_output(self.output)
            raise EmptyOutput(f"no row survived ({lost}); see {rejects_path(self.output)}. {note}")
        if rows_out == 0:  # one shard of many may keep nothing; merge still needs its count
            LOG.warning(
                "shard %s kept no row (%s); its report and rejects are written, and merge takes it",
                params[SHARD_PARAM],
                lost,
            )
        full = summary(rows_out, counts, self.output, params, report)
        publish(self.output, self._link_dataset if rows_out else Path.mkdir, rows_out, full)
        shutil.rmtree(self.work)
        return full

    def _link_dataset(self, staging: Path) -> None:
        """Make ``staging`` one ``save_to_disk`` dataset of every chunk's Arrow files.

        A column that is all null in one chunk has another Arrow type there than in the
        rest; that chunk alone is rewritten with the common type (``datasets`` aligns
        them as ``concatenate_datasets`` does)."""
        import datasets
        from datasets.features.features import _align_features, _check_if_features_can_be_aligned

        folders = [f for c in self.chunks if (f := self._folder(c) / DATA).exists()]
        parts = [datasets.load_from_disk(str(f)) for f in folders]
        columns = {tuple(p.column_names) for p in parts}
        if len(columns) > 1:
            raise RuntimeError(f"the chunks in {self.work} have different columns: {columns}")
        features = [p.features for p in parts]
        try:
            _check_if_features_can_be_aligned(features)
        except ValueError as err:
            raise RuntimeError(
                f"the chunks' column types differ and cannot be joined: {err}"
            ) from None
        aligned = _align_features(features)[0]
        staging.mkdir()
        files: list[Path] = []
        for folder, part in zip(folders, parts):
            if part.features != aligned:
                folder = folder.with_name(DATA + ".aligned")
                shutil.rmtree(folder, ignore_errors=True)
                part.cast(aligned).save_to_disk(str(folder))
            state = json.loads((folder / "state.json").read_text())
            files += [folder / f["filename"] for f in state["_data_files"]]
        names = [f"data-{i:05d}-of-{len(files):05d}.arrow" for i in range(len(files))]
        for source, name in zip(files, names):
            try:
                os.link(source, staging / name)
            except OSError:  # a file system without hard links: copy
                shutil.copyfile(source, staging / name)
        state["_data_files"] = [{"filename": name} for name in names]
        write_json(staging / "state.json", state)
        info = parts[0].info.copy()
        info.features = aligned
        info.write_to_directory(str(staging))


def masks_in_chunks(
    ds,
    fn,
    output: Path,
    params: dict[str, Any],
    bad_lines: list[dict],
    num_proc: int,
    chunk_rows: int,
) -> dict[str, Any]:
    """``fgit-preprocess masks``: the mask stage over ``ds``, ``chunk_rows`` rows at a time."""
    from tqdm.auto import tqdm

    from fgit_preprocess.pipeline import compute_masks

    chunks = ChunkedOutput(output, params, len(ds), chunk_rows)
    for chunk in tqdm(
        list(chunks.pending()), desc="Chunks", unit="chunk", disable=len(chunks.chunks) == 1
    ):
        kept, rejected = compute_masks(ds.select(range(chunk.start, chunk.stop)), fn, num_proc)
        chunks.write(chunk, kept, rejected, list(bad_lines) if chunk.index == 0 else [], {})
    return chunks.finish(params)
