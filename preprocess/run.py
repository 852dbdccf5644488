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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from axolotl_fgit.contract import DEFAULT_COLUMNS as COLS
from fgit_preprocess.cache import AnswerCache
from fgit_preprocess.card import format_usd
from fgit_preprocess.diff import DiffScope, code_view
from fgit_preprocess.pipeline import MaskFn, compute_masks, nothing_kept, save
from fgit_preprocess.sandbox import Limits, isolation, run_many
from fgit_preprocess.selection import EmbeddingScorer, choose, levenshtein_scores
from fgit_preprocess.sources import (
    REJECT,
    REJECT_DETAIL,
    Fields,
    RowError,
    normalise_row,
    rejects_path,
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
    embed_batch_size: int = 16
    embed_dtype: str = "float32"
    require_parse: bool = False
    diff_scope: DiffScope = "code"
    seed: int = 0
    num_proc: int = 1
    tests_field: str | None = None  # run variants against this column's tests
    sandbox: Limits = field(default_factory=Limits)
    extra_params: dict[str, Any] = field(default_factory=dict)


def _problem(row: dict[str, Any]) -> str:
    if COLS.messages in row:
        return "\n\n".join(f"[{t['role']}]\n{t['content']}" for t in row[COLS.messages])
    return row[COLS.prompt]


def _ask_llm(rows: list[dict[str, Any]], opts: RunOptions) -> tuple[Outcome, dict[str, Any]]:
    prompts = [
        [
            {
                "role": "user",
                "content": opts.template.format(problem=_problem(r), solution=r[COLS.correct]),
            }
        ]
        for r in rows
    ]
    use_n = preflight(opts.teacher)
    requests = build_requests(prompts, opts.teacher, use_n)
    bar = tqdm(total=len(requests), desc="Teacher", unit="req")

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
        out = asyncio.run(Teacher(opts.teacher, cache, progress).run(requests))
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
    }
    return out, info


def _ask_mutate(rows: list[dict[str, Any]], opts: RunOptions) -> tuple[Outcome, dict[str, Any]]:
    """The mutation teacher on every row, in ``opts.num_proc`` processes: each row's
    variants depend only on the row and the seed, so the output is the same for any count."""
    from fgit_preprocess.mutate import mutate_response

    work = partial(mutate_response, k=opts.teacher.num_variants, seed=opts.seed)
    responses = [row[COLS.correct] for row in rows]
    bar = partial(tqdm, total=len(rows), desc="Mutating", unit="row")
    out = Outcome()
    if opts.num_proc == 1:
        found = map(work, responses)
        out.texts = dict(enumerate(bar(found)))
    else:  # spawn: the parent has torch and its threads loaded; fork could deadlock
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(opts.num_proc, mp_context=context) as pool:
            found = pool.map(
                work, responses, chunksize=max(1, min(256, len(rows) // (8 * opts.num_proc)))
            )
            out.texts = dict(enumerate(bar(found)))
    return out, {"requests": 0, "cost_usd": 0.0}


def _read(ds, fields: Fields) -> tuple[list[dict], list[dict], list[dict]]:
    """Normalised rows, the columns each carries through, and reject records."""
    rows, originals, rejects = [], [], []
    consumed = fields.consumed()
    for raw in tqdm(ds, desc="Reading rows", unit="row"):
        try:
            row = normalise_row(raw, fields)
        except RowError as err:
            rejects.append({**raw, REJECT: err.reason, REJECT_DETAIL: str(err)})
            continue
        rows.append(row)
        originals.append({k: v for k, v in raw.items() if k not in consumed})
    return rows, originals, rejects


def _dominant(errors: dict[int, str]) -> str:
    """The most common teacher error, with a sample message: why the rows were lost."""
    kinds = Counter(message.split(":", 1)[0] for message in errors.values())
    kind, n = kinds.most_common(1)[0]
    sample = next(m for m in errors.values() if m.startswith(kind))
    return f"{n} of {len(errors)} failed rows: {sample[:300]}"


def _candidates(rows, originals, outcome: Outcome, opts: RunOptions):
    """Valid, distinct candidates per row; rows without one become rejects."""
    variant_reasons: Counter = Counter()
    kept_rows, candidates, rejects = [], [], []
    for i, row in enumerate(rows):
        found, reasons = [], Counter()
        for answer in outcome.texts.get(i, []):
            cand = candidate(row[COLS.correct], answer, opts.require_parse)
            if cand.reason:
                reasons[cand.reason] += 1
            elif cand.response in (c.response for c in found):
                reasons[DUPLICATE] += 1
            else:
                found.append(cand)
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


def generate(
    ds, fields: Fields, output: Path, opts: RunOptions, bad_lines: list[dict] = ()
) -> dict[str, Any]:
    """The whole ``run`` command after loading; returns the report it wrote."""
    rows, originals, rejects = _read(ds, fields)
    rejects = [*bad_lines, *rejects]
    ask = _ask_mutate if opts.teacher.model == MUTATE else _ask_llm
    if ask is _ask_llm:
        preflight(opts.teacher)  # a missing key or unknown model fails before the embedder
        AnswerCache(opts.cache).close()  # so does a --cache that is not one
    if opts.tests_field:
        isolation(opts.sandbox.mode)  # no sandbox here: stop before any teacher work
    # Load the embedder before the teacher runs, so a bad path costs nothing.
    scorer = (
        EmbeddingScorer(opts.embedder, opts.embed_batch_size, dtype=opts.embed_dtype)
        if opts.similarity == "embedding"
        else levenshtein_scores
    )
    outcome, teacher_info = ask(rows, opts)
    if teacher_info.get("unsent"):
        raise BudgetStop(
            f"--max-cost {opts.teacher.max_cost} reached after "
            f"{format_usd(teacher_info['cost_usd'])}; {teacher_info['unsent']} requests not "
            "sent and nothing was written. Every answer so far is cached and is not paid again.",
            {"status": "budget-reached", "teacher": teacher_info},
        )
    kept_rows, candidates, lost, variant_reasons = _candidates(rows, originals, outcome, opts)
    rejects += lost
    tests_report = None
    if opts.tests_field:
        kept_rows, candidates, lost, tests_report = _prove_wrong(
            rows, originals, kept_rows, candidates, opts
        )
        rejects += lost
        variant_reasons[EQUIVALENT] += tests_report["equivalent"]
    if not kept_rows:
        counts, note = nothing_kept(output, [], rejects)
        if outcome.errors:
            cause = f"the teacher failed: {_dominant(outcome.errors)}"
        elif not counts:
            cause = "the input has no rows"
        else:
            reason, _ = counts.most_common(1)[0]
            example = next(r[REJECT_DETAIL] for r in rejects if r[REJECT] == reason)
            cause = (
                f"rows rejected {dict(counts)}, variant rejects {dict(variant_reasons)}; "
                f"a {reason} row: {example[:300]}"
            )
        raise RuntimeError(
            f"no row has a valid variant; {cause}. Every row is in {rejects_path(output)}. {note}"
        )

    correct_code = [code_view(rows[i][COLS.correct]).text for i in kept_rows]
    cand_code = [[c.code for c in found] for found in candidates]
    scores = scorer(correct_code, cand_code)
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

    import datasets

    pair_fields = Fields(
        None if fields.messages else COLS.prompt,
        COLS.messages if fields.messages else None,
        COLS.correct,
        COLS.incorrect,
    )
    kept, rejected = compute_masks(
        datasets.Dataset.from_list(paired), MaskFn(pair_fields, opts.diff_scope), opts.num_proc
    )
    params = {
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
    params = _scrub(params)
    report = {
        "status": "complete",
        "teacher": teacher_info,
        "variant_rejects_by_reason": dict(sorted(variant_reasons.items())),
        "similarity_mean": (sum(p["similarity"] for p in paired) / len(paired)),
        "valid_variants": sum(p["num_valid_variants"] for p in paired),
        "valid_variants_mean": (sum(p["num_valid_variants"] for p in paired) / len(paired)),
        **({"tests": tests_report} if tests_report else {}),
    }
    return save(kept, rejected, output, params, report, rejects)


def _scrub(value: Any) -> Any:
    """Redact secrets from every string of a JSON-able structure."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value
