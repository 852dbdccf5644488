"""Real problems with real tests: the functions of the ``algorithms`` package (PyPI, MIT).

Each module-level function whose docstring carries doctest examples becomes one problem:
``prompt`` (the module's imports, the signature and the docstring), ``solution`` (the
function as the package writes it) and ``tests`` (a script that runs those examples
against whatever function of that name is defined). A problem is kept only when the
package's own function passes its tests on its own, in the sandbox, so the set needs no
module context. The split is by module (a module's functions share code and idioms, so
splitting inside one would leak), fixed by a hash of the module path.
"""

from __future__ import annotations

import ast
import doctest
import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from fgit_preprocess.sandbox import Limits, run_many

SOURCE = "algorithms"
SOURCE_VERSION = "1.0.1"
LICENSE = "MIT (Copyright (c) 2017 Keon); see LICENSE-algorithms beside the data"
HELD_OUT_SHARE = 30  # percent of modules held out
INSTRUCTION = (
    "Complete this Python function. Reply with the whole function in one ```python code "
    "block.\n\n```python\n{prompt}\n```"
)
# Run after the candidate code: the reference's doctest examples against the function
# the candidate defined, exit 1 when any example fails.
_HARNESS = """
import doctest as _doctest, sys as _sys
_test = _doctest.DocTestParser().get_doctest({examples!r}, dict(globals()), {name!r}, None, 0)
_runner = _doctest.DocTestRunner(optionflags=_doctest.ELLIPSIS | _doctest.NORMALIZE_WHITESPACE)
_runner.run(_test)
_sys.exit(1 if _runner.failures or not _runner.tries else 0)
"""


@dataclass(frozen=True)
class Problem:
    """One function to write, with the tests that judge it."""

    id: str  # module path:function name
    split: str  # train | held_out
    imports: str  # the module's import lines, also put before a generated answer
    signature: str  # the def line(s), where a generated answer starts
    prompt: str  # imports + signature + docstring
    solution: str  # imports + the reference function, without its docstring
    tests: str  # doctest harness (see _HARNESS)
    source: str  # where it came from, with the licence

    @property
    def instruction(self) -> str:
        return INSTRUCTION.format(prompt=self.prompt)

    @property
    def response(self) -> str:
        return f"```python\n{self.solution}\n```"

    def row(self) -> dict[str, str]:
        """The instruction-dataset row ``fgit-preprocess run`` reads."""
        return {
            "id": self.id,
            "instruction": self.instruction,
            "response": self.response,
            "tests": self.tests,
        }


def split_of(module: str) -> str:
    digest = int(hashlib.sha256(module.encode()).hexdigest(), 16)
    return "held_out" if digest % 100 < HELD_OUT_SHARE else "train"


def _imports(tree: ast.Module, lines: list[str]) -> list[str]:
    """The module's top-level imports, except those of the package itself."""
    out = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.level or node.module.startswith(SOURCE)):
            continue
        if isinstance(node, ast.Import) and any(a.name.startswith(SOURCE) for a in node.names):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append("\n".join(lines[node.lineno - 1 : node.end_lineno]))
    return out


def _candidates(path: Path, module: str) -> list[Problem]:
    """Every function of one file with doctest examples (before the sandbox check)."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    lines = text.splitlines()
    head = "\n".join(_imports(tree, lines))
    head = f"{head}\n\n\n" if head else ""
    out = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or not doctest.DocTestParser().get_examples(doc):
            continue
        if len(node.body) < 2:  # a docstring only: nothing to write
            continue
        first = min([d.lineno for d in node.decorator_list] + [node.lineno])
        signature = lines[first - 1 : node.body[0].lineno - 1]
        signature_and_doc = "\n".join(lines[first - 1 : node.body[0].end_lineno])
        # The answer is the function without its docstring: the prompt already has it.
        body = "\n".join(signature + lines[node.body[1].lineno - 1 : node.end_lineno])
        out.append(
            Problem(
                id=f"{module}:{node.name}",
                split=split_of(module),
                imports=head,
                signature="\n".join(signature),
                prompt=head + signature_and_doc,
                solution=head + body,
                tests=_HARNESS.format(examples=doc, name=node.name),
                source=f"{SOURCE} {SOURCE_VERSION} ({LICENSE}): {module}",
            )
        )
    return out


def build(package_dir: Path, workers: int | None = None) -> tuple[list[Problem], Counter]:
    """All problems of an installed ``algorithms`` package whose reference passes its
    tests alone, in id order, and the count of functions dropped, by reason."""
    found: list[Problem] = []
    dropped: Counter = Counter()
    for path in sorted(package_dir.rglob("*.py")):
        module = path.relative_to(package_dir.parent).with_suffix("").as_posix()
        try:
            found += _candidates(path, module)
        except (SyntaxError, UnicodeDecodeError):
            dropped["unparsable-module"] += 1
    # The CPU limit bounds each run; the wall limit is generous so that a busy machine
    # does not drop a slow reference (the file must rebuild the same anywhere).
    outcomes = run_many([(p.solution, p.tests) for p in found], Limits(wall_seconds=120), workers)
    kept = []
    for problem, outcome in zip(found, outcomes):
        if outcome.passed:
            kept.append(problem)
        else:
            dropped[f"reference-fails-alone:{outcome.reason}"] += 1
    return sorted(kept, key=lambda p: p.id), dropped


def write(problems: list[Problem], path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for problem in problems:
            fh.write(json.dumps(asdict(problem), ensure_ascii=False) + "\n")


def bundled_path() -> Path:
    """The converted set shipped with this package."""
    return Path(str(resources.files("fgit_bench") / "data" / "algorithms-1.0.1.jsonl"))


def load(path: Path | None = None) -> list[Problem]:
    with (path or bundled_path()).open(encoding="utf-8") as fh:
        return [Problem(**json.loads(line)) for line in fh if line.strip()]
