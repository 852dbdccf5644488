"""``fgit-preprocess run`` at scale: wall time, rows/s and peak memory against input size.

The input is the bundled problem set (the ``algorithms`` functions, with their doctest
harness as ``tests`` dropped: sandboxing a million runs measures the sandbox) repeated to
N rows, each row's prompt numbered so no two rows are the same. Each size runs
``fgit-preprocess run --teacher mutate --similarity levenshtein --num-variants 4`` in its
own process; peak RSS is the kernel's ``ru_maxrss`` of its largest process.

    python benchmarks/bench_preprocess.py [--rows 1000 20000] [--num-proc 1 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fgit_bench.problems import load


def write_input(path: Path, rows: int) -> None:
    """``rows`` instruction rows: the bundled problems, repeated and numbered."""
    problems = load()
    with path.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            p = problems[i % len(problems)]
            fh.write(json.dumps({"instruction": f"[{i}] {p.instruction}", "response": p.solution}))
            fh.write("\n")


def run_once(data: Path, out: Path, num_proc: int) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, rows written) of one ``fgit-preprocess run``."""
    command = [sys.executable, "-m", "fgit_preprocess", "run", "-i", str(data), "-o", str(out),
               "--teacher", "mutate", "--similarity", "levenshtein", "--num-variants", "4",
               "--num-proc", str(num_proc), "--overwrite"]  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"fgit-preprocess failed:\n{done.stderr[-3000:]}")
    # ru_maxrss over every process waited for so far (the largest one's peak, not a sum
    # over --num-proc workers): the runs go largest last, so it is this size's peak.
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    report = json.loads((out / "report.json").read_text())
    return wall, peak_mb, report["rows_out"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1])
    args = parser.parse_args()
    print("| rows | --num-proc | wall | rows/s | peak RSS | rows written |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in sorted(args.rows):
            data = Path(tmp) / f"in-{rows}.jsonl"
            write_input(data, rows)
            for procs in args.num_proc:
                wall, peak, kept = run_once(data, Path(tmp) / f"out-{rows}-{procs}", procs)
                print(f"| {rows:,} | {procs} | {wall:.1f} s | {rows / wall:,.0f} | "
                      f"{peak:,.0f} MB | {kept:,} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
