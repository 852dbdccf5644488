"""The offline mutation teacher and variant selection (real sentence-transformers model)."""

from __future__ import annotations

import ast
import json

import pytest

from conftest import SAMPLE
from fgit_preprocess.diff import code_view, is_cosmetic
from fgit_preprocess.mutate import mutate_code, mutate_response
from fgit_preprocess.selection import (
    MAX_BATCH,
    EmbeddingScorer,
    choose,
    gpu_batch_size,
    levenshtein_scores,
)
from fgit_preprocess.variants import candidate

ROWS = [json.loads(line) for line in SAMPLE.open()]


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


def test_gpu_batches_grow_with_free_memory_within_bounds():
    unixcoder = {"seq_len": 512, "hidden": 768, "intermediate": 3072, "heads": 12}
    gb = 2**30
    sizes = [gpu_batch_size(free * gb, **unixcoder, itemsize=4) for free in (1, 8, 40, 80, 140)]
    assert sizes == sorted(sizes) and sizes[0] >= 1 and sizes[-1] == MAX_BATCH
    # An 8 GB card: half for activations, about 47 MB a 512-token row in float32.
    assert 60 <= sizes[1] <= 110
    assert gpu_batch_size(8 * gb, **unixcoder, itemsize=2) > sizes[1]  # half precision
    assert gpu_batch_size(0, **unixcoder, itemsize=4) == 1


def test_a_batch_that_runs_out_of_gpu_memory_is_halved_and_retried(minilm_dir, caplog):
    """No GPU here: the encoder raises torch's own OutOfMemoryError, as CUDA does, for
    batches over 4 rows, and encodes for real below that."""
    import torch

    scorer = EmbeddingScorer(str(minilm_dir))
    assert scorer.batch_size == 16  # no GPU: the CPU size
    real = scorer.model.encode

    def encode(texts, batch_size, **kw):
        if batch_size > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(texts, batch_size=batch_size, **kw)

    scorer.model.encode = encode
    correct = ["def f(x):\n    return x + 1\n"]
    candidates = [["def f(x):\n    return x - 1\n", "def f(x):\n    return x\n"]]
    with caplog.at_level("WARNING", logger="fgit.selection"):
        got = scorer(correct, candidates, progress=False)
    assert scorer.batch_size == 4 and "batches of 4 rows" in caplog.text
    reference = EmbeddingScorer(str(minilm_dir), batch_size=4)
    want = reference(correct, candidates, progress=False)
    assert got[0] == pytest.approx(want[0], abs=1e-6)

    scorer.model.encode = lambda texts, batch_size, **kw: encode(texts, 99, **kw)
    with pytest.raises(torch.OutOfMemoryError):  # a single row that does not fit: raised
        scorer(correct, candidates, progress=False)


def test_run_records_similarity_with_a_local_embedder(tmp_path, minilm_dir):
    import datasets

    from conftest import run_cli, teacher_args

    out, again = tmp_path / "o", tmp_path / "again"
    for target, procs in ((out, "1"), (again, "2")):  # two processes write the same pairs
        run_cli(
            *teacher_args(
                SAMPLE, target, "mutate", "--embedder", minilm_dir, "--num-variants", "3"
            ),
            "--num-proc",
            procs,
        )
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == len(ROWS)
    assert all(0.5 < s <= 1.0 for s in ds["similarity"])
    assert all(1 <= n <= 3 for n in ds["num_valid_variants"])
    assert datasets.load_from_disk(str(again)).to_list() == ds.to_list()  # deterministic
    # float32 by default: half precision can pick another near-identical variant
    assert json.loads((out / "fgit_params.json").read_text())["embed_dtype"] == "float32"
