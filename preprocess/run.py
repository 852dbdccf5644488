"""``fgit-preprocess run``: correct-only dataset → teacher variants → selection → masks.

Stages: normalise rows → ask the teacher (litellm, or the offline mutation teacher)
for K variants → filter each answer (``variants``) → keep the most similar valid one
(``selection``; with ``--tests-field`` only variants that fail the row's tests, run in the
``sandbox``) → error-sensitive spans (``pipeline``) → Arrow + card + report + rejects.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from axolotl_fgit.contract import DEFAULT_COLUMNS as COLS
from fgit_preprocess.cache import AnswerCache
from fgit_preprocess.card import format_usd
from fgit_preprocess.chunks import CHUNK_ROWS, Chunk, ChunkedOutput
from fgit_preprocess.diff import DiffScope, code_view
from fgit_preprocess.pipeline import EmptyOutput, MaskFn, compute_masks
from fgit_preprocess.sandbox import Limits, isolation, run_many
from fgit_preprocess.selection import EmbeddingScorer, choose, levenshtein_scores
from fgit_preprocess.sources import (
    REJECT,
    REJECT_DETAIL,
    Fields,
    RowError,
    normalise_row,
)
from fgit_preprocess.teacher import (
    Outcome,
    Teacher,
    TeacherSettings,
    build_requests,
    preflight,
    redact,
)
from fgit_preprocess.variants import candidate

MUTATE = "mutate"
NO_VALID_VARIANT = "no-valid-variant"
TEACHER_ERROR = "teacher-error"  # every request for the row failed; a rerun retries it
BAD_REFERENCE = "bad-reference"  # the correct response fails its own tests
EQUIVALENT = "equivalent"  # a "wrong" variant that passes the tests
DUPLICATE = "duplicate"  # a valid variant equal to one already kept for the row


class BudgetStop(RuntimeError):
    """The teacher budget ran out; ``report`` says what is cached and what is left."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


@dataclass(kw_only=True)
class RunOptions:
    """Everything ``run`` needs besides the dataset (recorded in the output's params)."""

    teacher: TeacherSettings
    template: str
    cache: Path
    similarity: str = "embedding"  # embedding | levenshtein
    embedder: str = "microsoft/unixcoder-base"
    embed_batch_size: int | None = None  # None: sized to the GPU's memory
    embed_dtype: str = "float32"
    require_parse: bool = False
    diff_scope: DiffScope = "code"
    seed: int = 0
    num_proc: int = 1
    chunk_rows: int = CHUNK_ROWS
    tests_field: str | None = None  # run variants against this column's tests
    sandbox: Limits = field(default_factory=Limits)
    extra_params: dict[str, Any] = field(default_factory=dict)


def _problem(row: dict[str, Any]) -> str:
    if COLS.messages in row:
        return "\n\n".join(f"[{t['role']}]\n{t['content']}" for t in row[COLS.messages])
    return row[COLS.prompt]


Ask = Callable[[list[dict[str, Any]], TeacherSettings], tuple[Outcome, dict[str, Any]]]


def _ask_llm(
    rows: list[dict[str, Any]], teacher: TeacherSettings, opts: RunOptions, use_n: bool
) -> tuple[Outcome, dict[str, Any]]:
    """The LLM teacher on ``rows``, under ``teacher`` (the run's settings with what is left
    of its budget); ``use_n``: the backend takes ``n`` (``preflight``, run once)."""
    prompts = [
        [
            {
                "role": "user",
                "content": opts.template.format(problem=_problem(r), solution=r[COLS.correct]),
            }
        ]
        for r in rows
    ]
    requests = build_requests(prompts, teacher, use_n)
    bar = tqdm(total=len(requests), desc="Teacher", unit="req", leave=False)

    def progress(out: Outcome) -> None:
        bar.n = out.calls + out.cached + out.failed
        bar.set_postfix(
            cost=format_usd(out.cost_new + out.cost_cached),
            cached=out.cached,
            retries=out.retries,
            refresh=True,
        )

    cache = AnswerCache(opts.cache)
    try:
        out = asyncio.run(Teacher(teacher, cache, progress).run(requests))
    finally:
        cache.close()
        bar.close()
    info = {
        "requests": len(requests),
        "uses_n": use_n,
        "calls": out.calls,
        "cached": out.cached,
        "failed": out.failed,
        "retries": out.retries,
        "topped_up": out.topped_up,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "cost_usd": round(out.cost_new + out.cost_cached, 6),
        "cost_usd_this_run": round(out.cost_new, 6),
        "unsent": out.unsent,
        "failed_rows_by_error": dict(Counter(m.split(":", 1)[0] for m in out.errors.values())),
    }
    return out, info


Mapper = Callable[..., Iterator]  # map(fn, items), in this process or in worker processes


@contextmanager
def _workers(num_proc: int, chunk_rows: int) -> Iterator[Mapper]:
    """``map`` over ``num_proc`` worker processes, started once for every chunk (the
    builtin ``map`` for one). The work they get depends only on the row and the seed, so
    the output is the same for any count."""
    if num_proc == 1:
        yield map
        return
    context = multiprocessing.get_context("spawn")  # the parent has torch; fork could hang
    with ProcessPoolExecutor(num_proc, mp_context=context) as pool:
        yield partial(pool.map, chunksize=max(1, min(256, chunk_rows // (8 * num_proc))))


def _ask_mutate(
    rows: list[dict[str, Any]], teacher: TeacherSettings, opts: RunOptions, mapper: Mapper
) -> tuple[Outcome, dict[str, Any]]:
    """The offline mutation teacher on ``rows``."""
    from fgit_preprocess.mutate import mutate_response

    work = partial(mutate_response, k=teacher.num_variants, seed=opts.seed)
    found = mapper(work, [row[COLS.correct] for row in rows])
    bar = tqdm(found, total=len(rows), desc="Mutating", unit="row", leave=False)
    return Outcome(texts=dict(enumerate(bar))), {"requests": 0, "cost_usd": 0.0}


def _read(ds, fields: Fields) -> tuple[list[dict], list[dict], list[dict]]:
    """Normalised rows, the columns each carries through, and reject records."""
    rows, originals, rejects = [], [], []
    consumed = fields.consumed()
    for raw in tqdm(ds, desc="Reading rows", unit="row", leave=False):
        try:
            row = normalise_row(raw, fields)
        except RowError as err:
            rejects.append({**raw, REJECT: err.reason, REJECT_DETAIL: str(err)})
            continue
        rows.append(row)
        originals.append({k: v for k, v in raw.items() if k not in consumed})
    return rows, originals, rejects


def _row_candidates(pair: tuple[str, list[str]], require_parse: bool) -> tuple[list, Counter]:
    """One row's valid, distinct candidates from its answers, and why the others went."""
    correct, answers = pair
    found, reasons = [], Counter()
    for answer in answers:
        cand = candidate(correct, answer, require_parse)
        if cand.reason:
            reasons[cand.reason] += 1
        elif cand.response in (c.response for c in found):
            reasons[DUPLICATE] += 1
        else:
            found.append(cand)
    return found, reasons


def _candidates(rows, originals, outcome: Outcome, opts: RunOptions, mapper: Mapper):
    """Valid, distinct candidates per row; rows without one become rejects."""
    variant_reasons: Counter = Counter()
    kept_rows, candidates, rejects = [], [], []
    pairs = [(row[COLS.correct], outcome.texts.get(i, [])) for i, row in enumerate(rows)]
    work = partial(_row_candidates, require_parse=opts.require_parse)
    for i, (found, reasons) in enumerate(mapper(work, pairs)):
        row = rows[i]
        variant_reasons.update(reasons)
        if found:
            kept_rows.append(i)
            candidates.append(found)
            continue
        lost = i in outcome.errors and not outcome.texts.get(i)
        detail = f"variant rejects {dict(reasons)}" if reasons else "teacher gave no answer"
        if i in outcome.errors:
            detail += f"; teacher error: {outcome.errors[i]}"
        reason = TEACHER_ERROR if lost else NO_VALID_VARIANT
        rejects.append({**originals[i], **row, REJECT: reason, REJECT_DETAIL: redact(detail)})
    return kept_rows, candidates, rejects, variant_reasons


def _prove_wrong(rows, originals, kept_rows, candidates, opts: RunOptions):
    """Run the reference and every candidate against the row's tests in the sandbox.

    A reference that fails its own tests rejects the row (``bad-reference``); a candidate
    that passes them is not wrong (``equivalent``) and is dropped.
    """
    jobs, where = [], []
    for slot, i in enumerate(kept_rows):
        tests = originals[i].get(opts.tests_field)
        if not isinstance(tests, str) or not tests.strip():
            continue
        jobs.append((code_view(rows[i][COLS.correct]).text, tests))
        where.append((slot, None))
        jobs += [(cand.code, tests) for cand in candidates[slot]]
        where += [(slot, k) for k in range(len(candidates[slot]))]
    results = run_many(jobs, opts.sandbox, desc="Running tests") if jobs else []
    reference = {slot: out for (slot, k), out in zip(where, results) if k is None}
    passing = {(slot, k) for (slot, k), out in zip(where, results) if k is not None and out.passed}
    run_variants = [(slot, k) for slot, k in where if k is not None and reference[slot].passed]
    keep_rows, keep_cands, rejects = [], [], []
    for slot, i in enumerate(kept_rows):
        ref = reference.get(slot)
        if ref is not None and not ref.passed:
            detail = f"the correct response fails its tests ({ref.reason}): {ref.output[-300:]}"
            rejects.append(
                {**originals[i], **rows[i], REJECT: BAD_REFERENCE, REJECT_DETAIL: detail}
            )
            continue
        wrong = [c for k, c in enumerate(candidates[slot]) if (slot, k) not in passing]
        if not wrong:
            rejects.append(
                {
                    **originals[i],
                    **rows[i],
                    REJECT: NO_VALID_VARIANT,
                    REJECT_DETAIL: f"all {len(candidates[slot])} variants pass the tests",
                }
            )
            continue
        keep_rows.append(i)
        keep_cands.append(wrong)
    killed = sum((slot, k) not in passing for slot, k in run_variants)
    report = {
        "field": opts.tests_field,
        "rows_tested": len(reference),
        "rows_untested": len(kept_rows) - len(reference),
        "bad_reference": sum(not r.passed for r in reference.values()),
        "variants_run": len(run_variants),
        "variants_killed": killed,
        "equivalent": len(run_variants) - killed,
        "kill_rate": killed / len(run_variants) if run_variants else None,
        "sandbox": asdict(isolation(opts.sandbox.mode)),
    }
    return keep_rows, keep_cands, rejects, report


# Teacher settings that change how answers are fetched, not what they are: a resumed run
# may change them (a higher --max-cost above all) and keep its finished chunks.
FETCH_SETTINGS = ("max_cost", "concurrency", "timeout", "max_retries", "backoff", "max_backoff")


def generate(
    ds, fields: Fields, output: Path, opts: RunOptions, bad_lines: list[dict] = ()
) -> dict[str, Any]:
    """The whole ``run`` command after loading, ``opts.chunk_rows`` rows at a time
    (``chunks``); returns the report it wrote."""
    llm = opts.teacher.model != MUTATE
    if llm:
        use_n = preflight(opts.teacher)  # a missing key or unknown model: before the embedder
        AnswerCache(opts.cache).close()  # so does a --cache that is not one
    if opts.tests_field:
        isolation(opts.sandbox.mode)  # no sandbox here: stop before any teacher work
    # Load the embedder before the teacher runs, so a bad path costs nothing.
    scorer = (
        EmbeddingScorer(opts.embedder, opts.embed_batch_size, dtype=opts.embed_dtype)
        if opts.similarity == "embedding"
        else levenshtein_scores
    )
    params = _scrub(
        {
            "command": "run",
            "teacher": asdict(opts.teacher),
            "template": opts.template,
            "similarity": opts.similarity,
            "embedder": opts.embedder if opts.similarity == "embedding" else None,
            "embed_dtype": scorer.dtype if opts.similarity == "embedding" else None,
            "require_parse": opts.require_parse,
            "diff_scope": opts.diff_scope,
            "seed": opts.seed,
            "tests_field": opts.tests_field,
            "fields": asdict(fields),
            **opts.extra_params,
        }
    )
    same = {k: v for k, v in params["teacher"].items() if k not in FETCH_SETTINGS}
    chunks = ChunkedOutput(output, {**params, "teacher": same}, len(ds), opts.chunk_rows)
    with (
        tqdm(total=len(ds), desc="Rows", unit="row") as bar,
        _workers(opts.num_proc, opts.chunk_rows) as mapper,
    ):
        ask = (
            partial(_ask_llm, opts=opts, use_n=use_n)
            if llm
            else partial(_ask_mutate, opts=opts, mapper=mapper)
        )
        for chunk in chunks.pending():
            bar.n = chunk.start
            teacher = opts.teacher
            if teacher.max_cost is not None:
                spent = sum(r["teacher"]["cost_usd"] for r in chunks.finished())
                teacher = replace(teacher, max_cost=max(0.0, teacher.max_cost - spent))
            part = ds.select(range(chunk.start, chunk.stop))
            kept, rejected, rejects, report = _generate_chunk(
                part, fields, opts, ask, teacher, scorer, mapper
            )
            if report["teacher"].get("unsent"):
                _budget_stop(chunks, chunk, report["teacher"], len(ds), opts.teacher.max_cost)
            first = list(bad_lines) if chunk.index == 0 else []
            chunks.write(chunk, kept, rejected, [*first, *rejects], report)
            bar.update(chunk.stop - bar.n)
    try:
        return chunks.finish(params)
    except EmptyOutput as err:
        raise RuntimeError(f"no row has a valid variant; {_why_none(chunks)}. {err}") from None


def _generate_chunk(
    ds,
    fields: Fields,
    opts: RunOptions,
    ask: Ask,
    teacher: TeacherSettings,
    scorer: Callable,
    mapper: Mapper,
):
    """One chunk through teacher, filters, tests, selection and masks: ``(kept, rejected,
    rejects, report)``: two datasets, the earlier stages' reject records, the report."""
    import datasets

    rows, originals, rejects = _read(ds, fields)
    outcome, teacher_info = ask(rows, teacher)
    kept_rows, candidates, lost, variant_reasons = _candidates(
        rows, originals, outcome, opts, mapper
    )
    rejects += lost
    tests_report = None
    if opts.tests_field:
        kept_rows, candidates, lost, tests_report = _prove_wrong(
            rows, originals, kept_rows, candidates, opts
        )
        rejects += lost
        variant_reasons[EQUIVALENT] += tests_report["equivalent"]
    correct_code = [code_view(rows[i][COLS.correct]).text for i in kept_rows]
    cand_code = [[c.code for c in found] for found in candidates]
    scores = scorer(correct_code, cand_code) if kept_rows else []
    paired = []
    for i, found, pick in zip(kept_rows, candidates, choose(scores)):
        best, score = pick
        paired.append(
            {
                **originals[i],
                **rows[i],
                COLS.incorrect: found[best].response,
                "similarity": score,
                "num_valid_variants": len(found),
            }
        )
    report = {
        "status": "complete",
        "teacher": teacher_info,
        "variant_rejects_by_reason": dict(sorted(variant_reasons.items())),
        "rows_paired": len(paired),
        "valid_variants": sum(p["num_valid_variants"] for p in paired),
        **({"tests": tests_report} if tests_report else {}),
    }
    if not paired:
        return datasets.Dataset.from_dict({}), [], rejects, report
    report["similarity_mean"] = sum(p["similarity"] for p in paired) / len(paired)
    pair_fields = Fields(
        None if fields.messages else COLS.prompt,
        COLS.messages if fields.messages else None,
        COLS.correct,
        COLS.incorrect,
    )
    kept, rejected = compute_masks(
        datasets.Dataset.from_list(paired), MaskFn(pair_fields, opts.diff_scope), opts.num_proc
    )
    return kept, rejected, rejects, report


def _budget_stop(
    chunks: ChunkedOutput, chunk: Chunk, info: dict[str, Any], rows: int, budget: float
) -> None:
    """Stop at a spent budget: what the finished chunks and this one cost, and the
    requests left (this chunk's, and the later chunks' at this chunk's rate)."""
    done = chunks.finished()
    spent = [r["teacher"] for r in done]
    later = rows - chunk.stop
    per_row = info["requests"] / max(1, chunk.stop - chunk.start)
    unsent = info["unsent"] + round(later * per_row)
    teacher = {
        k: sum(t[k] for t in [*spent, info]) for k in ("calls", "cached", "cost_usd", "requests")
    }
    teacher["unsent"] = unsent
    kept = f"; the {len(done)} finished chunks are kept for it" if done else ""
    raise BudgetStop(
        f"--max-cost {budget} reached after {format_usd(teacher['cost_usd'])}; "
        f"{unsent} requests not sent and the output was not written{kept}. Every answer "
        "so far is cached and is not paid again.",
        {"status": "budget-reached", "teacher": teacher},
    )


def _why_none(chunks: ChunkedOutput) -> str:
    """Why a run kept no row: the teacher's dominant failure, else the commonest reject."""
    _, counts, report = chunks.totals()
    errors = Counter(report.get("teacher", {}).get("failed_rows_by_error") or {})
    if errors:
        kind, n = errors.most_common(1)[0]
        mark = f"teacher error: {kind}"
        found = chunks.first_reject(lambda r: mark in r.get("detail", ""))
        sample = found["detail"].split("teacher error: ", 1)[1] if found else kind
        return f"the teacher failed: {n} of {errors.total()} failed rows: {sample[:300]}"
    if not counts:
        return "the input has no rows"
    reason, _ = counts.most_common(1)[0]
    found = chunks.first_reject(lambda r: r["reason"] == reason)
    return (
        f"rows rejected {dict(counts)}, variant rejects "
        f"{report.get('variant_rejects_by_reason', {})}; a {reason} row: "
        f"{(found or {}).get('detail', '')[:300]}"
    )


def _scrub(value: Any) -> Any:
    """Redact secrets from every string of a JSON-able structure."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value
