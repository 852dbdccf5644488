"""--shard I/N and merge: shards of one input, merged back, are the unsharded run."""

from __future__ import annotations

import json

import datasets
import pytest

from conftest import ROOT, run_cli
from fgit_preprocess.shards import Shard, ShardError


@pytest.mark.parametrize("spec", ["0/1", "2/3", "7/8"])
def test_shard_specs_parse(spec):
    assert str(Shard.parse(spec)) == spec


@pytest.mark.parametrize("spec", ["3/3", "1", "-1/3", "a/b", "1/0", "1/3/4", ""])
def test_bad_shard_specs_are_refused(spec):
    with pytest.raises(ShardError, match="--shard must be I/N with 0 <= I < N"):
        Shard.parse(spec)


def test_shards_cover_every_line_once():
    shards = [Shard(i, 4) for i in range(4)]
    for line in range(1, 50):
        assert sum(s.holds(line) for s in shards) == 1


RUN = ["--teacher", "mutate", "--similarity", "levenshtein", "--num-variants", "3"]


def _run(messy_input, out, *extra):
    return run_cli("run", "-i", messy_input, "-o", out, *RUN, *extra)


def _rejects(folder):
    rows = [json.loads(line) for line in (folder.parent / f"{folder.name}.rejects.jsonl").open()]
    return sorted((r["fgit_input_line"], r["reason"]) for r in rows)


@pytest.mark.slow  # four runs that execute every variant in the sandbox: about 40 s
def test_sharded_run_merged_back_is_the_unsharded_run(tmp_path, messy_input):
    whole = tmp_path / "whole"
    _run(messy_input, whole, "--tests-field", "tests")
    parts = [tmp_path / f"part-{i}" for i in range(3)]
    for i, part in reversed(list(enumerate(parts))):  # the order they finish in is free
        _run(messy_input, part, "--tests-field", "tests", "--shard", f"{i}/3")
        lines = datasets.load_from_disk(str(part))["fgit_input_line"]
        assert lines and all((n - 1) % 3 == i for n in lines)
    merged = tmp_path / "merged"
    proc = run_cli("merge", merged, *reversed(parts))
    assert "kill rate" in proc.stdout + proc.stderr  # the merged report, printed

    expect, got = datasets.load_from_disk(str(whole)), datasets.load_from_disk(str(merged))
    assert got.column_names == expect.column_names
    assert got.to_list() == expect.to_list()  # same rows, same values, input order
    assert _rejects(merged) == _rejects(whole)
    assert {(6, "bad-json"), (10, "bad-correct")} <= set(_rejects(whole))  # a shard each
    mine, theirs = (json.loads((f / "report.json").read_text()) for f in (merged, whole))
    for key in ("rows_in", "rows_out", "rejected", "rejects_by_reason", "valid_variants",
                "variant_rejects_by_reason", "teacher"):  # fmt: skip
        assert mine[key] == theirs[key], key
    assert mine["tests"]["kill_rate"] == pytest.approx(theirs["tests"]["kill_rate"])
    assert mine["tests"]["variants_run"] == theirs["tests"]["variants_run"]
    assert mine["similarity_mean"] == pytest.approx(theirs["similarity_mean"])
    assert mine["valid_variants_mean"] == pytest.approx(theirs["valid_variants_mean"])
    params = json.loads((merged / "fgit_params.json").read_text())
    assert params["shard"] is None and len(params["merged_shards"]) == 3
    assert (merged / "README.md").exists()


def test_merge_refuses_shards_that_do_not_make_one_job(tmp_path, messy_input):
    parts = [tmp_path / f"part-{i}" for i in range(2)]
    for i, part in enumerate(parts):
        _run(messy_input, part, "--shard", f"{i}/2")
    other = tmp_path / "other-1"
    _run(messy_input, other, "--shard", "1/2", "--seed", "3")
    whole = tmp_path / "whole"
    run_cli("masks", "-i", ROOT / "examples" / "data" / "sample_pairs.jsonl", "-o", whole)
    cases = {
        (parts[0],): "missing [1]",
        (parts[0], parts[1], parts[1]): "given more than once [1]",
        (parts[0], other): "other parameters than",
        (parts[0], whole): "was not made with --shard",
    }
    for shards, message in cases.items():
        proc = run_cli("merge", tmp_path / "out", *shards, ok=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists()
    proc = run_cli("merge", tmp_path / "out", parts[0], other, ok=False)
    assert "(seed)" in proc.stderr  # the setting that differs is named
    proc = run_cli("run", "-i", messy_input, "-o", tmp_path / "x", *RUN, "--shard", "2/2", ok=False)
    assert proc.returncode == 2 and "--shard must be I/N" in proc.stderr


def test_masks_takes_a_shard_too(tmp_path):
    source = ROOT / "examples" / "data" / "sample_pairs.jsonl"
    whole, parts = tmp_path / "whole", [tmp_path / f"p{i}" for i in range(2)]
    run_cli("masks", "-i", source, "-o", whole)
    for i, part in enumerate(parts):
        run_cli("masks", "-i", source, "-o", part, "--shard", f"{i}/2")
    run_cli("merge", tmp_path / "merged", *parts)
    got = datasets.load_from_disk(str(tmp_path / "merged")).to_list()
    assert got == datasets.load_from_disk(str(whole)).to_list()


@pytest.mark.slow  # five CLI runs
def test_a_shard_that_keeps_no_row_still_merges(tmp_path):
    """Shard 1/2 holds only rows the mutation teacher cannot fault: it writes its report
    and rejects (exit 0, a warning), and merge joins it; all-empty shards merge to the
    same refusal as the unsharded run."""
    from conftest import SAMPLE

    good = [json.loads(line) for line in SAMPLE.open()][:3]
    bare = {"instruction": "Do nothing.", "response": "```python\npass\n```\n"}
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for g in good for r in (g, bare)))
    whole, parts = tmp_path / "whole", [tmp_path / f"part-{i}" for i in range(2)]
    run_cli("run", "-i", data, "-o", whole, *RUN)
    _run(data, parts[0], "--shard", "0/2")
    proc = run_cli(
        "run", "-i", data, "-o", parts[1], *RUN, "--shard", "1/2", fresh_process=True
    )  # its own process: the warning goes through the CLI's own logging
    assert (
        "shard 1/2 kept no row" in proc.stdout + proc.stderr
        and not (parts[1] / "state.json").exists()
    )
    assert json.loads((parts[1] / "report.json").read_text())["rows_out"] == 0
    run_cli("merge", tmp_path / "merged", *parts)
    got = datasets.load_from_disk(str(tmp_path / "merged"))
    assert got.to_list() == datasets.load_from_disk(str(whole)).to_list() and len(got) == 3
    assert (
        _rejects(tmp_path / "merged")
        == _rejects(whole)
        == [(n, "no-valid-variant") for n in (2, 4, 6)]
    )

    data.write_text(json.dumps(bare) + "\n")  # one row: shard 1/2 gets none at all
    for i, part in enumerate(parts):
        _run(data, part, "--shard", f"{i}/2", "--overwrite")
    proc = run_cli("merge", tmp_path / "empty", *parts, ok=False)
    assert proc.returncode == 2 and "no row survived" in proc.stderr, proc.stderr
    proc = run_cli("run", "-i", data, "-o", tmp_path / "alone", *RUN, ok=False)
    assert proc.returncode == 2 and "no row" in proc.stderr


def test_reports_merge_counts_and_recompute_means_and_rates():
    from fgit_preprocess.chunks import merge_reports

    def report(paired, sim, valid, run, killed, calls):  # one pair lost to the mask stage
        return {
            "status": "complete",
            "rows_in": paired + 1,
            "rows_out": paired - 1,
            "rejected": 2,
            "rejects_by_reason": {"bad-json": 1, "identical": 1},
            "rows_paired": paired,
            "similarity_mean": sim,
            "valid_variants": valid,
            "valid_variants_mean": valid / paired,
            "variant_rejects_by_reason": {"refusal": calls},
            "teacher": {"requests": calls, "uses_n": True, "cost_usd": 0.5, "model": "m"},
            "tests": {"variants_run": run, "variants_killed": killed, "kill_rate": killed / run},
            "params": {"shard": "x"},
        }

    merged = merge_reports([report(2, 0.9, 4, 10, 5, 3), report(6, 0.5, 6, 30, 27, 1)])
    assert merged["similarity_mean"] == pytest.approx((2 * 0.9 + 6 * 0.5) / 8)  # over pairs
    assert merged["valid_variants"] == 10 and merged["valid_variants_mean"] == 10 / 8
    assert merged["tests"]["kill_rate"] == pytest.approx(32 / 40)
    assert merged["teacher"] == {"requests": 4, "uses_n": True, "cost_usd": 1.0, "model": "m"}
    assert merged["variant_rejects_by_reason"] == {"refusal": 4}
    assert merged["status"] == "complete" and "params" not in merged
    assert "rows_out" not in merged  # the merged dataset's own counts come when it is saved
