"""``fgit-preprocess run``: correct-only dataset → teacher variants → selection → masks.

Stages: normalise rows → ask the teacher (litellm, or the offline mutation teacher)
for K variants → filter each answer (``variants``) → keep the most similar valid one
(``select``) → error-sensitive spans (``pipeline``) → Arrow + report + rejects.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from axolotl_fgit.contract import DEFAULT_COLUMNS as COLS
from fgit_preprocess.cache import AnswerCache
from fgit_preprocess.diff import DiffScope, code_view
from fgit_preprocess.pipeline import (
    REJECT,
    REJECT_DETAIL,
    MaskFn,
    compute_masks,
    save,
    write_rejects,
)
from fgit_preprocess.selection import EmbeddingScorer, choose, levenshtein_scores
from fgit_preprocess.sources import (
    REPORT_FILE,
    Fields,
    RowError,
    normalise_row,
    rejects_path,
    write_json,
)
from fgit_preprocess.teacher import (
    Outcome,
    Teacher,
    TeacherSettings,
    build_requests,
    redact,
    supports_n,
)
from fgit_preprocess.variants import candidate

MUTATE = "mutate"
NO_VALID_VARIANT = "no-valid-variant"
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
    embed_batch_size: int = 64
    require_parse: bool = False
    diff_scope: DiffScope = "code"
    seed: int = 0
    num_proc: int = 1
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
    use_n = supports_n(opts.teacher.model, opts.teacher.api_base)
    requests = build_requests(prompts, opts.teacher, use_n)
    bar = tqdm(total=len(requests), desc="Teacher", unit="req")

    def progress(out: Outcome) -> None:
        bar.n = out.calls + out.cached + out.failed
        bar.set_postfix(
            cost=f"${out.cost_new + out.cost_cached:.4f}",
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
        "cost_usd": round(out.cost_new + out.cost_cached, 6),
        "cost_usd_this_run": round(out.cost_new, 6),
        "unsent": out.unsent,
    }
    return out, info


def _ask_mutate(rows: list[dict[str, Any]], opts: RunOptions) -> tuple[Outcome, dict[str, Any]]:
    from fgit_preprocess.mutate import mutate_response

    out = Outcome()
    for i, row in enumerate(tqdm(rows, desc="Mutating", unit="row")):
        out.texts[i] = mutate_response(row[COLS.correct], opts.teacher.num_variants, opts.seed)
    return out, {"requests": 0, "cost_usd": 0.0}


def generate(ds, fields: Fields, output: Path, opts: RunOptions) -> dict[str, Any]:
    """The whole ``run`` command after loading; returns the report it wrote."""
    rows, originals, rejects = [], [], []
    consumed = {c for c in (fields.prompt, fields.messages, fields.correct, fields.input) if c}
    for raw in tqdm(ds, desc="Reading rows", unit="row"):
        try:
            row = normalise_row(raw, fields)
        except RowError as err:
            rejects.append({**raw, REJECT: err.reason, REJECT_DETAIL: str(err)})
            continue
        rows.append(row)
        originals.append({k: v for k, v in raw.items() if k not in consumed})

    ask = _ask_mutate if opts.teacher.model == MUTATE else _ask_llm
    outcome, teacher_info = ask(rows, opts)
    if teacher_info.get("unsent"):
        report = {"status": "budget-reached", "teacher": teacher_info}
        output.mkdir(parents=True, exist_ok=True)
        write_json(output / REPORT_FILE, report)
        raise BudgetStop(
            f"--max-cost {opts.teacher.max_cost} reached after "
            f"${teacher_info['cost_usd']:.4f}; {teacher_info['unsent']} requests "
            "not sent. Every answer so far is cached: rerun the same command with "
            "a higher --max-cost to resume.",
            report,
        )

    variant_reasons: Counter = Counter()
    kept_rows, candidates = [], []
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
        detail = f"variant rejects {dict(reasons)}" if reasons else "teacher gave no answer"
        if i in outcome.errors:
            detail += f"; teacher error: {outcome.errors[i]}"
        rejects.append(
            {**originals[i], **row, REJECT: NO_VALID_VARIANT, REJECT_DETAIL: redact(detail)}
        )
    if not kept_rows:
        write_rejects(rejects_path(output), [], rejects)
        raise RuntimeError(
            f"no row has a valid variant ({dict(variant_reasons)}); see {rejects_path(output)}"
        )

    correct_code = [code_view(rows[i][COLS.correct]).text for i in kept_rows]
    cand_code = [[c.code for c in found] for found in candidates]
    if opts.similarity == "levenshtein":
        scores = levenshtein_scores(correct_code, cand_code)
    else:
        scores = EmbeddingScorer(opts.embedder, opts.embed_batch_size)(correct_code, cand_code)
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
        "require_parse": opts.require_parse,
        "diff_scope": opts.diff_scope,
        "seed": opts.seed,
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
