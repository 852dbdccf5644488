"""Throughput of the mask stage (issue: foundation).

Prints pairs/s for realistic pairs — ~40-line Python functions with 1–3 edits, and
400-line files — against the raw cost of the two diffs alone (difflib line matching +
Levenshtein opcodes), then times ``fgit-preprocess masks`` on N such pairs from JSONL to
Arrow with ``--num-proc``.

    python benchmarks/bench_masks.py [--pairs 100000] [--num-proc 2]
"""

from __future__ import annotations

import argparse
import difflib
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import Levenshtein

from fgit_preprocess.diff import pair_spans

OPS = [("<", "<="), ("+", "-"), ("== 0", "!= 0"), ("[i]", "[i + 1]"), ("1", "2"), ("and", "or")]


def make_function(rng: random.Random, n_lines: int, idx: int) -> str:
    """A plausible Python function of ``n_lines`` lines (loops, conditions, arithmetic)."""
    lines = [f"def process_{idx}(items, limit):", '    """Process the items."""', "    total = 0"]
    while len(lines) < n_lines - 1:
        k = rng.randint(0, 5)
        v = f"v{len(lines)}"
        lines += [
            [
                "    for i in range(len(items)):",
                f"        {v} = items[i] * {rng.randint(2, 9)}",
                f"        if {v} < limit and i % 2 == 0:",
                f"            total += {v}",
            ],
            [f"    {v} = sum(items[1:]) + {rng.randint(1, 99)}  # partial sum"],
            [f"    if total == 0 and limit > {rng.randint(0, 9)}:", "        total = limit - 1"],
            ["    while total > limit:", f"        total -= {rng.randint(1, 5)}"],
            [f"    {v} = [x + 1 for x in items if x != {rng.randint(0, 5)}]"],
            [f"    total = max(total, len(items) * {rng.randint(1, 4)})"],
        ][k]
    lines.append("    return total")
    return "\n".join(lines[:n_lines]) + "\n"


def mutate(rng: random.Random, code: str, n_edits: int) -> str:
    lines = code.splitlines(keepends=True)
    for _ in range(n_edits):
        for _ in range(50):
            i = rng.randrange(2, len(lines))
            old, new = rng.choice(OPS)
            if old in lines[i]:
                lines[i] = lines[i].replace(old, new, 1)
                break
    return "".join(lines)


def make_pairs(n: int, n_lines: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        code = make_function(rng, n_lines, i)
        wrong = mutate(rng, code, rng.randint(1, 3))
        pairs.append((f"```python\n{code}```\n", f"```python\n{wrong}```\n"))
    return pairs


def raw_diffs(pairs) -> None:
    for c, a in pairs:
        difflib.SequenceMatcher(
            None, a.splitlines(True), c.splitlines(True), autojunk=False
        ).get_opcodes()
        Levenshtein.opcodes(a, c)


def full(pairs) -> None:
    for c, a in pairs:
        pair_spans(c, a)


def rate(fn, pairs) -> float:
    t0 = time.perf_counter()
    fn(pairs)
    return len(pairs) / (time.perf_counter() - t0)


def repeated_pair(n_lines: int, changes: int = 10) -> tuple[str, str]:
    """A function of ``n_lines`` repeated, blank-separated lines with ``changes`` edits spread
    through it (so no common head or tail shortcut applies)."""
    lines = ["    x = x + 1\n", "\n"] * (n_lines // 2)
    wrong = list(lines)
    for k in range(0, n_lines, 2 * (n_lines // (2 * changes))):
        wrong[k] = "    x = x - 1\n"
    return (
        "def f(x):\n" + "".join(lines) + "    return x\n",
        "def f(x):\n" + "".join(wrong) + "    return x\n",
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", type=int, default=100_000, help="pairs for the JSONL→Arrow run")
    ap.add_argument("--num-proc", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for label, n, n_lines in (("40-line functions", 4000, 40), ("400-line files", 300, 400)):
        pairs = make_pairs(n, n_lines)
        rows.append((label, rate(raw_diffs, pairs), rate(full, pairs)))
    print(f"{'pairs':<20}{'raw diffs (pairs/s)':>22}{'pair_spans (pairs/s)':>24}{'ratio':>8}")
    for label, raw, end in rows:
        print(f"{label:<20}{raw:>22,.0f}{end:>24,.0f}{end / raw:>8.2f}")

    # Repeated and blank-separated lines: difflib alone is quadratic there (49.6 s per pair
    # at 20k lines before the bounded line diff).
    print(f"\n{'repeated-line pair':<20}{'changed lines':>14}{'pair_spans seconds':>22}")
    for n_lines in (5_000, 10_000, 20_000):
        correct, incorrect = repeated_pair(n_lines)
        t0 = time.perf_counter()
        spans = pair_spans(correct, incorrect, "response")
        dt = time.perf_counter() - t0
        print(f"{f'{n_lines:,} lines':<20}{len(spans.correct_line):>14}{dt:>22.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "pairs.jsonl"
        with src.open("w") as fh:
            for i, (c, a) in enumerate(make_pairs(args.pairs, 40, seed=1)):
                fh.write(json.dumps({"prompt": f"Task {i}", "correct": c, "incorrect": a}) + "\n")
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "fgit_preprocess",
                "masks",
                "-i",
                str(src),
                "-o",
                str(Path(tmp) / "out"),
                "--num-proc",
                str(args.num_proc),
            ],
            check=True,
            capture_output=True,
        )
        dt = time.perf_counter() - t0
        report = json.loads((Path(tmp) / "out" / "report.json").read_text())
    print(
        f"\nfgit-preprocess masks: {args.pairs:,} pairs JSONL→Arrow with --num-proc "
        f"{args.num_proc}: {dt:.1f} s ({args.pairs / dt:,.0f} pairs/s), "
        f"{report['rows_out']:,} kept, rejects {report['rejects_by_reason']}"
    )


if __name__ == "__main__":
    main()
