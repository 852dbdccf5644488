"""``fgit-preprocess run`` at scale: wall time, rows/s and peak memory against input size.

The input is the bundled problem set (the ``algorithms`` functions, with their doctest
harness as ``tests`` dropped: sandboxing a million runs measures the sandbox) repeated to
N rows, each row's prompt numbered so no two rows are the same. Each size runs
``fgit-preprocess run --teacher mutate --similarity levenshtein --num-variants 4`` in its
own process, ``--chunk-rows`` rows at a time. Memory is given two ways: peak RSS, the
kernel's ``ru_maxrss`` of the run's largest process, which also counts the pages of the
memory-mapped input and output the run has read (the kernel can drop those whenever it
needs the memory), and peak anonymous memory, sampled every 0.2 s over the run and its
worker processes together (proportional, so pages a fork shares with its parent count
once): what the run itself holds. Linux only (``/proc/PID/smaps_rollup``).

    python benchmarks/bench_preprocess.py [--rows 20000 200000 1000000] [--num-proc 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from fgit_bench.problems import load


def write_input(path: Path, rows: int) -> None:
    """``rows`` instruction rows: the bundled problems, repeated and numbered."""
    problems = load()
    with path.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            p = problems[i % len(problems)]
            fh.write(json.dumps({"instruction": f"[{i}] {p.instruction}", "response": p.solution}))
            fh.write("\n")


def anonymous_mb(root: psutil.Process) -> float:
    """Anonymous (not file-backed) resident memory of ``root`` and its descendants, in MB.

    Proportional (the kernel's ``Pss_Anon``): a page that a forked worker still shares
    with its parent counts once, split between them, not once per process."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:  # the run has just ended
        return 0.0
    total = 0
    for proc in procs:
        try:
            rollup = Path(f"/proc/{proc.pid}/smaps_rollup").read_text()
        except OSError:  # a worker that just ended
            continue
        total += next(
            int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss_Anon:")
        )
    return total / 2**10


def run_once(data: Path, out: Path, num_proc: int, chunk_rows: int) -> dict[str, float]:
    """Wall seconds, peak RSS and peak anonymous memory (MB), rows written, of one run."""
    command = [sys.executable, "-m", "fgit_preprocess", "run", "-i", str(data), "-o", str(out),
               "--teacher", "mutate", "--similarity", "levenshtein", "--num-variants", "4",
               "--num-proc", str(num_proc), "--chunk-rows", str(chunk_rows),
               "--overwrite"]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_anon, done = 0.0, threading.Event()

    def sample() -> None:
        nonlocal peak_anon
        root = psutil.Process(proc.pid)
        while not done.wait(0.2):
            peak_anon = max(peak_anon, anonymous_mb(root))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = proc.stderr.read()
    # wait4: this child's own resource use (ru_maxrss: its largest process, in KB).
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"fgit-preprocess failed:\n{stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"wall": wall, "rss": usage.ru_maxrss / 1024, "anon": peak_anon,
            "kept": report["rows_out"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1])
    parser.add_argument("--chunk-rows", type=int, default=10_000)
    args = parser.parse_args()
    print(f"--chunk-rows {args.chunk_rows}")
    print("| rows | --num-proc | wall | rows/s | peak RSS | peak anonymous | rows written |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in sorted(args.rows):
            data = Path(tmp) / f"in-{rows}.jsonl"
            write_input(data, rows)
            for procs in args.num_proc:
                out = Path(tmp) / f"out-{rows}-{procs}"
                got = run_once(data, out, procs, args.chunk_rows)
                print(f"| {rows:,} | {procs} | {got['wall']:.1f} s | {rows / got['wall']:,.0f} | "
                      f"{got['rss']:,.0f} MB | {got['anon']:,.0f} MB | {got['kept']:,} |",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
