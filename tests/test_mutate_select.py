"""The offline mutation teacher and variant selection (real sentence-transformers model)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from conftest import SAMPLE
from fgit_preprocess.diff import code_view, is_cosmetic
from fgit_preprocess.mutate import mutate_code, mutate_response
from fgit_preprocess.selection import EmbeddingScorer, choose, levenshtein_scores
from fgit_preprocess.variants import candidate

ROWS = [json.loads(line) for line in SAMPLE.open()]


def _fails_tests(code: str, tests: str) -> bool:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", f"{code}\n{tests}"], capture_output=True, timeout=5
        )
    except subprocess.TimeoutExpired:
        return True  # e.g. a dropped increment turns a loop infinite: the test fails too
    return proc.returncode != 0


def test_variants_parse_differ_and_are_deterministic():
    for row in ROWS:
        code = code_view(row["response"]).text
        variants = mutate_code(code, 4, seed=3)
        assert variants, row["instruction"]
        assert variants == mutate_code(code, 4, seed=3)
        assert len(set(variants)) == len(variants)
        for v in variants:
            ast.parse(v)
            assert v != code and not is_cosmetic(code, v, "python")
            changed = sum(a != b for a, b in zip(code.splitlines(), v.splitlines()))
            assert changed <= 2 or len(v.splitlines()) != len(code.splitlines())  # one site
    assert any(
        mutate_code(code_view(r["response"]).text, 4, seed=1)
        != mutate_code(code_view(r["response"]).text, 4, seed=3)
        for r in ROWS
    )


@pytest.mark.slow  # one Python process per variant
def test_nearly_every_variant_fails_the_unit_tests(capsys):
    killed = total = 0
    for row in ROWS:
        for v in mutate_code(code_view(row["response"]).text, 4, seed=0):
            total += 1
            killed += _fails_tests(v, row["tests"])
    rate = killed / total
    with capsys.disabled():
        print(
            f"\nmutation teacher: {killed}/{total} variants fail the bundled unit tests "
            f"({rate:.1%})"
        )
    assert all(not _fails_tests(code_view(r["response"]).text, r["tests"]) for r in ROWS)
    assert rate >= 0.9


def test_non_python_code_gets_token_level_faults():
    code = "int clamp(int x, int hi) {\n  if (x > hi && hi >= 0) return hi;\n  return x + 1;\n}\n"
    variants = mutate_code(code, 5, seed=0, language="c")
    assert len(variants) == 5 and all(v != code for v in variants)
    response = f"In C:\n```c\n{code}```\n"
    for v in mutate_response(response, 3):
        assert v.startswith("In C:\n```c\n") and v.endswith("```\n")


def test_candidate_substitutes_code_into_the_correct_response():
    correct = "Explanation first.\n\n```python\ndef f(x):\n    return x + 1\n```\nDone.\n"
    cand = candidate(correct, "Here you go:\n```python\ndef f(x):\n    return x - 1\n```\nok")
    assert cand.response == correct.replace("x + 1", "x - 1") and cand.reason is None
    assert candidate(correct, "```python\ndef f(x):\n    return x + 1\n```").reason == "identical"
    assert (
        candidate(correct, "```python\ndef f(x):\n    return x+1  # hm\n```").reason
        == "cosmetic-diff"
    )
    assert (
        candidate(correct, "```python\ndef f(x) return x\n```", require_parse=True).reason
        == "unparsable"
    )
    assert candidate(correct, "```python\ndef f(x) return x\n```").reason is None
    assert candidate(correct, "```python\n\n```").reason == "empty"
    assert candidate(correct, "").reason == "empty"
    assert candidate(correct, "I cannot help with that.").reason == "refusal"


@pytest.fixture(scope="module")
def scorer(minilm_dir):
    return EmbeddingScorer(str(minilm_dir), batch_size=8)


def test_selection_picks_the_closest_variant(scorer):
    correct = ["def area(w, h):\n    return w * h\n", "def greet(name):\n    return 'hi ' + name\n"]
    candidates = [
        ["import os\nprint(os.listdir('.'))\n", "def area(w, h):\n    return w + h\n"],
        ["def greet(name):\n    return 'hi' + name\n", "SELECT * FROM users;\n", "x = 1\n"],
    ]
    for scores in (
        scorer(correct, candidates, progress=False),
        levenshtein_scores(correct, candidates),
    ):
        picks = choose(scores)
        assert [p[0] for p in picks] == [1, 0]
        assert all(-1 <= s <= 1 for row in scores for s in row)
    assert choose([[]]) == [None]


def test_run_records_similarity_with_a_local_embedder(tmp_path, minilm_dir):
    import datasets

    from conftest import run_cli

    out = tmp_path / "o"
    run_cli(
        "run",
        "-i",
        SAMPLE,
        "-o",
        out,
        "--teacher",
        "mutate",
        "--embedder",
        minilm_dir,
        "--num-variants",
        "3",
    )
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == len(ROWS)
    assert all(0.5 < s <= 1.0 for s in ds["similarity"])
    assert all(1 <= n <= 3 for n in ds["num_valid_variants"])
    again = tmp_path / "again"
    run_cli(
        "run",
        "-i",
        SAMPLE,
        "-o",
        again,
        "--teacher",
        "mutate",
        "--embedder",
        minilm_dir,
        "--num-variants",
        "3",
    )
    assert datasets.load_from_disk(str(again))["incorrect"] == ds["incorrect"]  # deterministic
