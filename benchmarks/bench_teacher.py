"""Teacher client throughput and selection throughput (issue: teacher generation).

1. Client: ``Teacher.run`` (litellm, retries, cache commits) against a zero-latency
   loopback OpenAI-compatible server in a separate process, at --concurrency.
2. Selection: rows/s for embedding similarity (K candidates per row) on this machine, and
   how often a precision picks the same candidate as float32.

    python benchmarks/bench_teacher.py [--requests 2000] [--concurrency 64]
        [--embedder PATH] [--rows 256] [--k 4]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fgit_preprocess.models import offline_embedder
from loopback_server import LoopbackServer, Reply, completion

ANSWER = "```python\ndef f(x):\n    return x - 1\n```\n"


def _serve(port_queue, stop_event) -> None:
    body = completion([ANSWER] * 4)
    with LoopbackServer(lambda b, i: Reply(200, body)) as srv:
        port_queue.put(srv.url)
        stop_event.wait()


def bench_client(n: int, concurrency: int) -> tuple[float, dict]:
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    from fgit_preprocess.cache import AnswerCache
    from fgit_preprocess.teacher import Teacher, TeacherSettings, build_requests

    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve, args=(q, stop), daemon=True)
    proc.start()
    url = q.get(timeout=60)
    try:
        settings = TeacherSettings(
            model="openai/gpt-4o-mini", num_variants=4, api_base=url, concurrency=concurrency
        )
        prompts = [[{"role": "user", "content": f"Problem {i}"}] for i in range(n)]
        requests = build_requests(prompts, settings, use_n=True)
        with tempfile.TemporaryDirectory() as tmp:
            teacher = Teacher(settings, AnswerCache(Path(tmp) / "c.sqlite"))
            asyncio.run(teacher.run(requests[: min(50, n)]))  # warm-up (imports, pools)
            t0 = time.perf_counter()
            out = asyncio.run(teacher.run(requests))
            dt = time.perf_counter() - t0
    finally:
        stop.set()
        proc.join(10)
    return dt, {"calls": out.calls, "cached": out.cached, "failed": out.failed}


def bench_selection(
    embedder: str, rows: int, k: int, dtype: str, batch_size: int
) -> tuple[float, list[int]]:
    """Rows/s of embedding selection and each row's pick (to compare precisions)."""
    from fgit_preprocess.mutate import mutate_code
    from fgit_preprocess.selection import EmbeddingScorer, choose

    sys.path.insert(0, str(Path(__file__).parent))
    import random

    from bench_masks import make_function

    rng = random.Random(0)
    correct = [make_function(rng, 20, i) for i in range(rows)]
    cands = [mutate_code(c, k) for c in correct]
    scorer = EmbeddingScorer(embedder, batch_size, dtype=dtype)
    scorer(correct[:4], cands[:4], progress=False)
    t0 = time.perf_counter()
    picks = choose(scorer(correct, cands, progress=False))
    return rows / (time.perf_counter() - t0), [p[0] if p else -1 for p in picks]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--embedder", default=None, help="default: the bundled all-MiniLM-L6-v2")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--k", type=int, default=4)
    args = ap.parse_args()
    dt, counts = bench_client(args.requests, args.concurrency)
    print(f"{'measure':<60}{'value':>10}")
    what = f"teacher client req/s (concurrency {args.concurrency})"
    print(f"{what:<46}{args.requests / dt:>14,.1f}")
    print(f"{'  requests / seconds':<46}{f'{args.requests} / {dt:.2f}':>14}  {counts}")
    embedder = args.embedder or offline_embedder()
    exact: list[int] = []
    for dtype, batch_size in (("float32", 64), ("float32", 16), ("bfloat16", 16)):
        rate, picks = bench_selection(embedder, args.rows, args.k, dtype, batch_size)
        exact = exact or picks
        agree = sum(a == b for a, b in zip(picks, exact)) / len(exact)
        what = f"selection rows/s (K={args.k}, {Path(embedder).name}, {dtype}, bs {batch_size})"
        print(f"{what:<60}{rate:>10,.1f}  picks as float32: {agree:.0%}")


if __name__ == "__main__":
    main()
