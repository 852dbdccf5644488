"""One preprocessing job on many machines: ``--shard I/N`` and ``merge``.

A shard is fixed by input line, not by row position after filtering: shard ``I`` of
``N`` keeps the lines numbered ``n`` with ``(n - 1) mod N == I`` (the JSONL line, or the
row number of other formats), so shards never overlap, together cover the input, and a
rerun picks the same rows. ``merge`` joins the shard outputs back into one dataset in
input order, with one report, one rejects file and one card; every row a shard kept or
rejected is in it once.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axolotl_fgit.contract import PARAMS_FILE
from fgit_preprocess.chunks import merge_reports
from fgit_preprocess.sources import (
    INPUT_LINE,
    REJECT,
    REJECT_DETAIL,
    REPORT_FILE,
    SHARD_PARAM,
    rejects_path,
)


class ShardError(ValueError):
    """A shard spec or a set of shard outputs that cannot make one dataset."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based, as Slurm's ``--array=0-(N-1)``)."""

    index: int
    count: int

    @classmethod
    def parse(cls, spec: str) -> Shard:
        index, slash, count = spec.partition("/")
        if not (slash and index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
            raise ShardError(f"--shard must be I/N with 0 <= I < N (e.g. 0/8), not {spec!r}")
        return cls(int(index), int(count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, line: int) -> bool:
        return (line - 1) % self.count == self.index


def take(ds, bad_lines: list[dict[str, Any]], shard: Shard | None):
    """This shard's rows of ``ds`` and its unreadable input lines (all of both if None)."""
    if shard is None:
        return ds, bad_lines
    mine = [i for i, line in enumerate(ds[INPUT_LINE]) if shard.holds(line)]
    return ds.select(mine), [b for b in bad_lines if shard.holds(b[INPUT_LINE])]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ShardError(f"{path.parent} is not a finished fgit-preprocess {what}: {err}") from None


def check_shards(folders: list[Path]) -> dict[str, Any]:
    """The parameters the shards share, after checking they are every shard of one job
    (each once) and were made with the same parameters; otherwise ``ShardError``."""
    params = [_read_json(f / PARAMS_FILE, "output") for f in folders]
    specs = []
    for folder, p in zip(folders, params):
        if not p.get(SHARD_PARAM):
            raise ShardError(f"{folder} was not made with --shard; merge joins shard outputs")
        specs.append(Shard.parse(p[SHARD_PARAM]))
    counts = {s.count for s in specs}
    if len(counts) > 1:
        raise ShardError(f"the shards split the input in different ways: {sorted(map(str, specs))}")
    seen = Counter(s.index for s in specs)
    missing = sorted(set(range(counts.pop())) - set(seen))
    twice = sorted(i for i, n in seen.items() if n > 1)
    wrong = []
    if missing:
        wrong.append(f"missing {missing}")
    if twice:
        wrong.append(f"given more than once {twice}")
    if wrong:
        raise ShardError(f"the shards must be every I/{specs[0].count} once: " + "; ".join(wrong))
    shared = {k: v for k, v in params[0].items() if k != SHARD_PARAM}
    for folder, p in zip(folders[1:], params[1:]):
        differ = sorted(
            k for k in shared.keys() | p.keys() - {SHARD_PARAM} if shared.get(k) != p.get(k)
        )
        if differ:
            raise ShardError(
                f"{folder} was made with other parameters than {folders[0]} "
                f"({', '.join(differ)}); rerun it with the same command and --shard"
            )
    return shared


def read_rejects(folder: Path) -> list[dict[str, Any]]:
    """A shard's rejects file, back as the reject records ``save`` writes."""
    records = []
    with rejects_path(folder).open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            records.append({REJECT: row.pop("reason"), REJECT_DETAIL: row.pop("detail"), **row})
    return records


def merge(folders: list[Path], output: Path) -> dict[str, Any]:
    """Join the shard outputs ``folders`` into ``output``; returns its report."""
    import datasets

    from fgit_preprocess.pipeline import save

    params = check_shards(folders)
    reports = [_read_json(f / REPORT_FILE, "output") for f in folders]
    if any(r.get("status", "complete") != "complete" for r in reports):
        raise ShardError("every shard must have finished (report.json status: complete)")
    parts = [datasets.load_from_disk(str(f)) for f, r in zip(folders, reports) if r["rows_out"]]
    kept = (
        datasets.concatenate_datasets(parts).sort(INPUT_LINE)
        if parts
        else datasets.Dataset.from_dict({})  # save refuses it, the rejects still written
    )
    rejects = sorted(
        (r for f in folders for r in read_rejects(f)), key=lambda r: r.get(INPUT_LINE, 0)
    )
    params = {**params, SHARD_PARAM: None, "merged_shards": [str(f) for f in folders]}
    return save(kept, output, params, merge_reports(reports), rejects)
