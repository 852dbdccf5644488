"""``fgit-preprocess``: build FGIT's paired Arrow dataset (error-sensitive segments).

Heavy libraries (datasets, transformers, litellm, torch) are imported inside the
commands, so ``--help`` answers at once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shlex
import sys
from pathlib import Path

import click
import typer

from fgit_preprocess.chunks import CHUNK_ROWS

app = typer.Typer(
    help="Offline preprocessing for FGIT (fault-guided fine-tuning): pair each correct "
    "response with a similar-but-wrong one and mark the error-sensitive segments.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

InputOpt = typer.Option(
    ...,
    "--input",
    "-i",
    help="JSONL/JSON/Parquet/Arrow file, a save_to_disk directory, or a Hub dataset name.",
)
OutputOpt = typer.Option(
    ...,
    "--output",
    "-o",
    help="Directory for the Arrow dataset "
    "(datasets.save_to_disk) and report.json; rejected rows go to "
    "<output>.rejects.jsonl beside it.",
)
SplitOpt = typer.Option("train", help="Split to read from a Hub dataset or DatasetDict.")
PromptOpt = typer.Option(
    None,
    help="Plain-text prompt column (default: first of prompt, "
    "instruction, question, problem, query). An 'input' column is "
    "appended when present.",
)
MessagesOpt = typer.Option(
    None,
    help="Chat column of {role, content} turns (default: "
    "messages/conversations when no prompt column exists). Without "
    "--correct-field the last assistant turn is the correct answer.",
)
CorrectOpt = typer.Option(
    None,
    help="Correct-response column (default: first of correct, "
    "response, output, solution, completion, answer).",
)
ScopeOpt = typer.Option(
    "code",
    help="'code': diff only the fenced code blocks of markdown "
    "responses (whole text when there is no fence); 'response': diff "
    "the full texts.",
)
NumProcOpt = typer.Option(
    1,
    min=1,
    help="Worker processes for the mutate teacher, the variant filters and the mask stage "
    "(the output is the same for any count); set it to the machine's cores.",
)
TokenizerOpt = typer.Option(
    None,
    help="Also write token-level hybrid vectors "
    "(correct_hybrid, incorrect_hybrid) for this tokenizer (name or "
    "local path), for inspection.",
)
OverwriteOpt = typer.Option(
    False, "--overwrite", help="Replace an existing output directory (its old files go too)."
)
ChunkOpt = typer.Option(
    CHUNK_ROWS,
    min=1,
    help="Rows taken through every stage at once and then written to disk: memory holds "
    "one chunk, whatever the input's size. A killed run, rerun with the same command, "
    "resumes at its first unfinished chunk. The output is the same for any value.",
)
LimitOpt = typer.Option(None, min=1, help="Use only the first N rows: a cheap trial run.")
ShardOpt = typer.Option(
    None,
    help="Process only shard I of N (0 <= I < N): the input lines n with (n - 1) mod N == I, "
    "so N machines (e.g. a Slurm array, I = $SLURM_ARRAY_TASK_ID) split one input without "
    "overlap; join their outputs with 'fgit-preprocess merge'.",
)
PushOpt = typer.Option(
    None,
    "--push-to-hub",
    help="Also upload the finished dataset (data, README.md card, report) to this Hub "
    "dataset repo (needs HF_TOKEN). The card is always written locally.",
)


def _setup_logging() -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False)],
    )


def fail(message: str) -> None:
    """Say what is wrong and exit 2, the code Click gives bad usage; fgit-bench shares it."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _check_output(output: Path, overwrite: bool, input: str, *written: tuple[str, Path]) -> None:
    """Refuse, before any work, an output that cannot or must not be written, then lock it.

    Every file a run writes (the dataset folder, ``<output>.rejects.jsonl`` and the
    ``written`` extras such as the answer cache) is checked against the input: none may be
    it, hold it or lie inside it.
    """
    import datasets

    from fgit_preprocess.pipeline import OutputBusy, claim
    from fgit_preprocess.sources import rejects_path

    datasets.disable_caching()  # map() caches go to a temporary folder, never the input's
    if output.is_symlink():
        fail(
            f"--output {output} is a symbolic link (to {os.readlink(output)}); pass the "
            "folder it should be, not a link"
        )
    source = Path(input).resolve()
    for what, path in [("--output", output), ("the rejects file", rejects_path(output)), *written]:
        target = path.resolve()
        if target == source or source in target.parents or target in source.parents:
            fail(
                f"{what} {path} would overwrite --input {input} (it is the input, holds it or "
                "lies inside it); choose another --output"
            )
    if output.exists() and not output.is_dir():
        fail(f"--output {output} is a file; pass a directory path")
    parent = output.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        fail(f"--output {output}: {parent} is not writable")
    if output.exists() and any(output.iterdir()) and not overwrite:
        fail(f"{output} exists and is not empty; pass --overwrite to replace it")
    try:
        lock = claim(output)
    except OutputBusy as err:
        fail(str(err))
    except OSError as err:
        fail(f"--output {output} cannot be written: {err}")
    click.get_current_context().call_on_close(lock.close)  # held until the command ends


def _options(cls, values: dict, **given):
    """A keyword-only options dataclass from the command's parameters of the same names."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in values.items() if k in names}, **given})


def _limited(ds, limit: int | None):
    return ds.select(range(min(limit, len(ds)))) if limit else ds


def _shard(spec: str | None):
    """``--shard I/N`` parsed (None: the whole input), or a clear error before any work."""
    from fgit_preprocess.shards import Shard, ShardError

    try:
        return Shard.parse(spec) if spec is not None else None
    except ShardError as err:
        fail(str(err))


def _push(output: Path, repo: str | None) -> None:
    if repo:
        from fgit_preprocess.card import push_to_hub

        try:
            url = push_to_hub(output, repo)
        except Exception as err:  # the Hub client raises many types; the data is safe locally
            fail(
                f"--push-to-hub {repo} failed ({type(err).__name__}: {err}); the dataset is "
                f"complete in {output}, push it later with huggingface-cli upload"
            )
        typer.echo(f"pushed to {url}")


def resume_budget(teacher: dict) -> float | None:
    """A ``--max-cost`` that finishes a stopped run: what was spent (cached answers count)
    plus the unsent requests at the average cost so far, with a quarter for variance;
    None when nothing has been paid yet, so there is nothing to estimate from."""
    answered = teacher["calls"] + teacher["cached"]
    spent = teacher["cost_usd"]
    if not answered or spent <= 0:
        return None
    need = 1.25 * spent * (answered + teacher["unsent"]) / answered
    step = 10.0 ** (math.floor(math.log10(need)) - 1)  # rounded up to two digits
    return float(f"{math.ceil(need / step) * step:.2g}")


def _resume_command(budget: float | None) -> str:
    """This command line with ``--max-cost`` set to ``budget`` (dropped when None)."""
    args, out, skip = sys.argv[1:], [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg == "--max-cost" and i + 1 < len(args):
            out += ["--max-cost", f"{budget:g}"] if budget is not None else []
            skip = True
        elif arg.startswith("--max-cost="):
            out += [f"--max-cost={budget:g}"] if budget is not None else []
        else:
            out.append(arg)
    return shlex.join(["fgit-preprocess", *out])


def _load_tokenizer(name: str | None):
    if name is None:
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        fail(f"--tokenizer {name} cannot be loaded: {err}")
    if not tok.is_fast:
        fail(f"--tokenizer {name} has no fast tokenizer; offset mappings need one")
    return tok


@app.command()
def masks(
    input: str = InputOpt,
    output: Path = OutputOpt,
    split: str = SplitOpt,
    prompt_field: str | None = PromptOpt,
    messages_field: str | None = MessagesOpt,
    correct_field: str | None = CorrectOpt,
    incorrect_field: str | None = typer.Option(
        None, help="Incorrect-response column (default: incorrect or rejected)."
    ),
    diff_scope: str = ScopeOpt,
    tokenizer: str | None = TokenizerOpt,
    num_proc: int = NumProcOpt,
    chunk_rows: int = ChunkOpt,
    limit: int | None = LimitOpt,
    shard: str | None = ShardOpt,
    overwrite: bool = OverwriteOpt,
    push_to_hub: str | None = PushOpt,
) -> None:
    """Mark error-sensitive segments in a dataset that already pairs correct and incorrect
    responses; write the Arrow dataset, report.json and the rejects file."""
    _setup_logging()
    from fgit_preprocess.chunks import masks_in_chunks
    from fgit_preprocess.pipeline import EmptyOutput, MaskFn
    from fgit_preprocess.shards import take
    from fgit_preprocess.sources import SHARD_PARAM, InputError, load_rows, resolve_fields

    if diff_scope not in ("code", "response"):
        fail(f"--diff-scope must be 'code' or 'response', not {diff_scope!r}")
    part = _shard(shard)
    _check_output(output, overwrite, input)
    try:
        ds, bad_lines = load_rows(input, split)
        fields = resolve_fields(
            ds.column_names,
            prompt_field,
            correct_field,
            incorrect_field,
            messages_field,
            paired=True,
        )
    except InputError as err:
        fail(str(err))
    ds, bad_lines = take(_limited(ds, limit), bad_lines, part)
    fn = MaskFn(fields, diff_scope, _load_tokenizer(tokenizer))
    params = {
        "command": "masks",
        "input": input,
        "split": split,
        "diff_scope": diff_scope,
        "fields": vars(fields),
        "tokenizer": tokenizer,
        "limit": limit,
        SHARD_PARAM: shard and str(part),
    }
    try:
        report = masks_in_chunks(ds, fn, output, params, bad_lines, num_proc, chunk_rows)
    except (EmptyOutput, OSError) as err:
        fail(str(err))
    _print_report(report, output)
    _push(output, push_to_hub)


@app.command()
def run(
    input: str = InputOpt,
    output: Path = OutputOpt,
    teacher: str = typer.Option(
        ...,
        help="litellm model string (openai/gpt-4o-mini, "
        "anthropic/claude-3-5-haiku-latest, hosted_vllm/NAME or "
        "openai/NAME with --api-base, ollama/NAME), or 'mutate' for "
        "the built-in offline mutation teacher. Keys come from the "
        "environment as litellm expects (OPENAI_API_KEY, ...).",
    ),
    api_base: str | None = typer.Option(
        None, help="Endpoint of an OpenAI-compatible server (vLLM, llama.cpp, TGI, ...)."
    ),
    num_variants: int = typer.Option(
        4,
        min=1,
        help="Variants asked per row (K); uses the "
        "API's n where supported, parallel calls otherwise.",
    ),
    temperature: float = typer.Option(1.0, min=0.0, help="Teacher sampling temperature."),
    max_tokens: int = typer.Option(2048, min=1, help="Teacher answer length limit."),
    concurrency: int = typer.Option(16, min=1, help="Teacher requests in flight at once."),
    timeout: float = typer.Option(120.0, min=0.1, help="Per-request timeout in seconds."),
    max_retries: int = typer.Option(
        6,
        min=0,
        help="Retries per request on 429/5xx/"
        "timeouts/connection errors (exponential backoff with "
        "jitter, honouring Retry-After).",
    ),
    max_cost: float | None = typer.Option(
        None,
        min=0.0,
        help="Stop cleanly once the "
        "teacher has cost this many USD (cached answers "
        "count); rerun with a higher budget to resume.",
    ),
    prompt_template: Path | None = typer.Option(
        None, help="Prompt template file with the placeholders {problem} and {solution}."
    ),
    cache: Path | None = typer.Option(
        None, help="Answer cache (SQLite); default <output>.teacher-cache.sqlite. Reruns reuse it."
    ),
    similarity: str = typer.Option(
        "embedding",
        help="'embedding' (cosine of --embedder embeddings) or 'levenshtein' (no model).",
    ),
    embedder: str = typer.Option(
        "microsoft/unixcoder-base",
        help="sentence-transformers model name or local path for --similarity embedding.",
    ),
    embed_batch_size: int | None = typer.Option(
        None,
        min=1,
        help="Rows per embedding batch. Default: sized to the free GPU memory (up to 1024; "
        "halved if a batch still runs out), 16 on a CPU.",
    ),
    embed_dtype: str = typer.Option(
        "float32",
        help="Embedder precision: float32, bfloat16 or float16. Half precision is faster "
        "but can pick a different variant when a row's candidates are near-identical.",
    ),
    require_parse: bool = typer.Option(
        False, "--require-parse", help="Reject Python variants that do not parse."
    ),
    seed: int = typer.Option(0, help="Seed of the mutation teacher."),
    teacher_seed: int | None = typer.Option(
        None,
        help="An LLM teacher's seed: every request carries a sampling seed made from it "
        "and the request, so an answer does not depend on arrival order (OpenAI, vLLM, "
        "llama.cpp; refused for a backend that takes no seed).",
    ),
    split: str = SplitOpt,
    prompt_field: str | None = PromptOpt,
    messages_field: str | None = MessagesOpt,
    correct_field: str | None = CorrectOpt,
    diff_scope: str = ScopeOpt,
    num_proc: int = NumProcOpt,
    chunk_rows: int = ChunkOpt,
    tests_field: str | None = typer.Option(
        None,
        help="Column with each row's tests (Python asserts or a test harness). The correct "
        "response and every candidate variant run against them in a sandbox (see "
        "--sandbox): variants that pass are rejected as 'equivalent', rows whose correct "
        "response fails as 'bad-reference'; report.json gives the kill rate.",
    ),
    sandbox: str = typer.Option(
        "bwrap",
        help="How --tests-field code is contained. 'bwrap' (default): bubblewrap with new "
        "PID, mount, network, IPC, UTS and user namespaces, private tmpfs folders, only "
        "/usr and the interpreter visible, an unprivileged user, and limits; the run stops "
        "if bubblewrap cannot run here. 'rlimits': weaker, asked for by name: limits, a "
        "network namespace and the user nobody, but the host's files and processes stay "
        "visible. Untrusted code never runs as root in either.",
    ),
    test_seconds: int = typer.Option(
        10,
        min=1,
        help="CPU seconds each --tests-field run may use (its wall-clock limit is twice "
        "that plus 5 s); a run over it fails, so the variant counts as wrong.",
    ),
    limit: int | None = LimitOpt,
    shard: str | None = ShardOpt,
    overwrite: bool = OverwriteOpt,
    push_to_hub: str | None = PushOpt,
) -> None:
    """Generate similar-but-wrong variants with a teacher, keep the closest valid one per
    row, mark error-sensitive segments and write the Arrow dataset plus report.json."""
    _setup_logging()
    from fgit_preprocess.card import format_usd
    from fgit_preprocess.pipeline import EmptyOutput
    from fgit_preprocess.run import MUTATE, BudgetStop, RunOptions, generate
    from fgit_preprocess.sandbox import MODES as SANDBOX_MODES
    from fgit_preprocess.sandbox import Limits
    from fgit_preprocess.shards import take
    from fgit_preprocess.sources import SHARD_PARAM, InputError, load_rows, resolve_fields
    from fgit_preprocess.teacher import RedactFilter, TeacherFatal, TeacherSettings, load_template

    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactFilter())
    if embed_dtype not in ("float32", "bfloat16", "float16"):
        fail(f"--embed-dtype must be float32, bfloat16 or float16, not {embed_dtype!r}")
    if similarity not in ("embedding", "levenshtein"):
        fail(f"--similarity must be 'embedding' or 'levenshtein', not {similarity!r}")
    if diff_scope not in ("code", "response"):
        fail(f"--diff-scope must be 'code' or 'response', not {diff_scope!r}")
    if sandbox not in SANDBOX_MODES:
        fail(f"--sandbox must be one of {', '.join(SANDBOX_MODES)}, not {sandbox!r}")
    if teacher_seed is not None and teacher == MUTATE:
        fail("--teacher-seed is for an LLM teacher; the mutation teacher's seed is --seed")
    part = _shard(shard)
    cache = cache or output.with_name(output.name + ".teacher-cache.sqlite")
    _check_output(output, overwrite, input, ("--cache", cache))
    try:
        template = load_template(prompt_template)
        ds, bad_lines = load_rows(input, split)
        fields = resolve_fields(ds.column_names, prompt_field, correct_field, None, messages_field)
    except (InputError, ValueError, OSError) as err:
        fail(str(err))
    if tests_field and tests_field not in ds.column_names:
        fail(
            f"--tests-field {tests_field!r} is not a column; columns: {', '.join(ds.column_names)}"
        )
    ds, bad_lines = take(_limited(ds, limit), bad_lines, part)
    settings = _options(TeacherSettings, locals(), model=teacher, seed=teacher_seed)
    opts = _options(
        RunOptions,
        locals(),
        teacher=settings,
        template=template,
        cache=cache,
        sandbox=Limits(mode=sandbox, cpu_seconds=test_seconds, wall_seconds=2 * test_seconds + 5),
        extra_params={
            "input": input,
            "split": split,
            "limit": limit,
            "test_seconds": test_seconds if tests_field else None,
            SHARD_PARAM: shard and str(part),
        },
    )
    try:
        report = generate(ds, fields, output, opts, bad_lines)
    except TeacherFatal as err:
        fail(f"the teacher refused the run, stopping at once: {err}")
    except BudgetStop as err:
        budget = resume_budget(err.report["teacher"])
        advice = (
            f"the rest should cost about {format_usd(budget - err.report['teacher']['cost_usd'])}"
            if budget is not None
            else "nothing has been paid yet, so there is no estimate: set --max-cost above "
            "the expected cost, or drop it as below"
        )
        typer.secho(
            f"{err}\n{advice}. To resume: {_resume_command(budget)}",
            fg=typer.colors.YELLOW,
            err=True,
        )
        raise typer.Exit(3) from None
    except (EmptyOutput, RuntimeError, OSError) as err:
        fail(str(err))
    _print_report(report, output)
    _push(output, push_to_hub)


def _print_report(report: dict, output: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from fgit_preprocess.card import format_usd

    table = Table(title=f"fgit-preprocess → {output}")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("rows in", str(report["rows_in"]))
    table.add_row("rows out", str(report["rows_out"]))
    for reason, n in report["rejects_by_reason"].items():
        table.add_row(f"rejected: {reason}", str(n))
    for reason, n in report.get("variant_rejects_by_reason", {}).items():
        table.add_row(f"variant rejected: {reason}", str(n))
    if "teacher" in report:
        table.add_row("teacher retries", str(report["teacher"].get("retries", 0)))
        table.add_row("teacher cost", format_usd(report["teacher"].get("cost_usd", 0)))
    if "tests" in report:
        tests = report["tests"]
        rate = "n/a" if tests["kill_rate"] is None else f"{tests['kill_rate']:.1%}"
        table.add_row("variants failing their tests (kill rate)", rate)
    Console(stderr=True).print(table)


@app.command()
def merge(
    output: Path = typer.Argument(..., help="Directory for the merged dataset."),
    shards: list[Path] = typer.Argument(
        ..., help="The shard outputs (every I/N of one job, each once), in any order."
    ),
    overwrite: bool = OverwriteOpt,
    push_to_hub: str | None = PushOpt,
) -> None:
    """Join the outputs of 'run --shard I/N' (or 'masks --shard I/N') into one dataset in
    input order, with one report.json, one rejects file and one card. Refuses shards made
    with different parameters, a missing shard, or one given twice.

    OUTPUT is the merged dataset's directory; SHARDS are the shard output directories
    (every I/N of one job, each once, in any order)."""
    _setup_logging()
    from fgit_preprocess.pipeline import EmptyOutput
    from fgit_preprocess.shards import ShardError
    from fgit_preprocess.shards import merge as join

    target = output.resolve()
    for folder in shards:
        if not folder.is_dir():
            fail(f"shard {folder} is not a directory")
        if folder.resolve() == target or target in folder.resolve().parents:
            fail(f"the output {output} would overwrite shard {folder}; choose another output")
    _check_output(output, overwrite, str(shards[0]))
    try:
        report = join(shards, output)
    except (ShardError, EmptyOutput, OSError) as err:
        fail(str(err))
    _print_report(report, output)
    _push(output, push_to_hub)


@app.command()
def inspect(
    input: Path = typer.Option(..., "--input", "-i", help="Output directory of masks/run."),
    html: Path = typer.Option(..., "--html", help="Where to write the HTML page."),
    rows: str | None = typer.Option(
        None, help="Comma-separated row indices to show (default: a sample of --num rows)."
    ),
    num: int = typer.Option(20, min=1, help="How many rows to sample when --rows is not given."),
    seed: int = typer.Option(0, help="Seed for the row sample."),
) -> None:
    """Render chosen rows side by side with changed lines and characters highlighted,
    plus a summary (rows, rejects by reason, sensitive-token share)."""
    import random

    import datasets

    from axolotl_fgit.contract import DEFAULT_COLUMNS, ContractError, read_params
    from fgit_preprocess.inspection import render, summary

    if not (input / "state.json").exists():
        fail(f"{input} is not a dataset written by fgit-preprocess (no state.json)")
    if html.is_dir():
        fail(f"--html {html} is a directory; pass a file path such as {html / 'pairs.html'}")
    try:
        read_params(input)
        ds = datasets.load_from_disk(str(input))
    except (ContractError, OSError, ValueError) as err:
        fail(f"{input} cannot be read as FGIT data: {err}")
    if missing := DEFAULT_COLUMNS.missing(ds.column_names):
        fail(f"{input} is not FGIT data: it lacks {missing}; run fgit-preprocess on it")
    if rows:
        try:
            chosen = [int(x) for x in rows.split(",")]
        except ValueError:
            fail(f"--rows must be comma-separated integers, not {rows!r}")
        bad = [i for i in chosen if not 0 <= i < len(ds)]
        if bad:
            fail(f"--rows {bad} out of range; the dataset has {len(ds)} rows")
    else:
        chosen = sorted(random.Random(seed).sample(range(len(ds)), min(num, len(ds))))
    stats = summary(ds, input)
    html.write_text(render(ds, chosen, stats, f"FGIT pairs: {input}"))
    typer.echo(
        f"rows {stats['rows']}, rejected {stats['rejected']} "
        f"{stats['rejects_by_reason']}, sensitive share {stats['sensitive_share']:.1%} "
        f"of {stats['sensitive_unit']}; wrote {html}"
    )


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
