"""fgit-bench: the problem set, pass@k, intervals, arms, execution and the --quick A/B."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest

from conftest import run_cli
from fgit_bench.arms import ArmError, parse_arm
from fgit_bench.generation import Answers, answer_start, code_of, judge, prompt_text
from fgit_bench.metrics import bootstrap_ci, mean_sd, pass_at_k
from fgit_bench.problems import bundled_path, load

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (5, 2, 1, 2 / 5),  # pass@1 is the share of correct samples
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 1, 5, 1 - 126 / 252),  # 1 - C(9,5)/C(10,5)
        (10, 3, 4, 1 - 35 / 210),  # 1 - C(7,4)/C(10,4)
        (4, 0, 2, 0.0),
        (3, 3, 1, 1.0),
        (6, 4, 3, 1.0),  # fewer than k wrong samples: some draw must pass
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(3, 4, 1), (3, 1, 0), (3, 1, 4), (0, 0, 1)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(n, c, k)


def test_bootstrap_interval_brackets_the_mean_and_is_seeded():
    values = [0.0] * 30 + [1.0] * 10
    lo, hi = bootstrap_ci(values)
    assert lo < 0.25 < hi and 0.1 < lo and hi < 0.4
    assert bootstrap_ci(values) == (lo, hi)
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_sd([1.0]) == (1.0, 0.0)


def test_bundled_problem_set_is_large_split_by_module_and_licensed():
    problems = load()
    assert len(problems) >= 300
    assert len({p.id for p in problems}) == len(problems)
    splits = defaultdict(set)
    for p in problems:
        splits[p.split].add(p.id.split(":")[0])
        assert p.prompt.endswith('"""') and p.signature.lstrip().startswith(("def ", "@"))
        assert p.solution.startswith(p.imports + p.signature) and ">>>" in p.tests
    assert set(splits) == {"train", "held_out"} and not splits["train"] & splits["held_out"]
    held_out = sum(p.split == "held_out" for p in problems)
    assert 50 <= held_out <= len(problems) // 2
    licence = (bundled_path().parent / "LICENSE-algorithms").read_text()
    assert "MIT License" in licence and "Keon" in licence


def test_references_pass_and_wrong_or_hostile_answers_fail_in_the_sandbox():
    problems = [p for p in load() if p.split == "held_out"][:4]
    wrong = [f"{answer_start(p)}{p.signature}\n    return None\n" for p in problems]
    first = problems[0]
    hostile = (
        f"{answer_start(first)}{first.signature}\n    import os\n    os.kill(os.getppid(), 9)\n"
    )
    answers = [
        Answers(problems[0].solution, [wrong[0], hostile]),
        *(Answers(p.solution, [w]) for p, w in zip(problems[1:], wrong[1:])),
    ]
    verdicts = judge(problems, answers)
    assert all(v.greedy for v in verdicts), [v.reasons for v in verdicts]
    assert not any(any(v.sampled) for v in verdicts)
    assert verdicts[0].reasons[1:] == ["failed", "failed"]
    assert verdicts[0].pass_at(1) == 0.0


def test_answers_start_at_the_body_and_stop_at_the_fence(tokenizer):
    problem = load()[0]
    text = prompt_text(tokenizer, problem)
    assert text.endswith("```python\n" + answer_start(problem))
    assert problem.prompt in text and "<|im_start|>assistant" in text
    assert code_of("    return 1\n```\nSome prose") == "    return 1\n"
    assert code_of("    return 1\n") == "    return 1\n"


def test_arms_parse_presets_and_fgit_blocks_and_name_bad_keys():
    assert parse_arm("sft").fgit == {"weighting": "sft"}
    arm = parse_arm("a4-line:weighting=dynamic,alpha=4,granularity=line")
    assert arm.label == "a4-line" and arm.fgit == {
        "weighting": "dynamic",
        "alpha": 4,
        "granularity": "line",
    }
    with pytest.raises(ArmError, match="unknown preset"):
        parse_arm("fancy")
    with pytest.raises(ArmError, match=r"fgit\.alhpa"):
        parse_arm("x:alhpa=4")
    with pytest.raises(ArmError, match=r": fgit\.alpha must be a finite number >= 1"):
        parse_arm("x:alpha=0.5")  # a whole-block check's message, without pydantic's prefix
    with pytest.raises(ArmError, match="is not key=value"):
        parse_arm("x:alpha")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--samples", "2", "--k", "3"], "--k 3 is larger than --samples 2"),
        (["--arm", "sft", "--arm", "sft"], "labels must be unique"),
        (["--arm", "x:alpha=0"], "fgit.alpha must be a finite number"),
        (["--model", "./no-such-model"], "is not a model folder"),
    ],
)
def test_ab_refuses_bad_settings_before_any_work(tmp_path, args, message):
    proc = run_cli("ab", "-o", tmp_path / "out", *args, module="fgit_bench", ok=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "out").exists()


def test_ab_refuses_to_replace_existing_output(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = run_cli("ab", "-o", tmp_path, module="fgit_bench", ok=False)
    assert proc.returncode == 2 and "pass --overwrite" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_problem_set_rebuilds_byte_for_byte_from_the_installed_package(tmp_path):
    out = tmp_path / "problems.jsonl"
    proc = run_cli("problems", "-o", out, module="fgit_bench")
    assert "dropped" in proc.stdout
    assert out.read_bytes() == bundled_path().read_bytes()


@pytest.mark.slow
@pytest.mark.compat
def test_quick_ab_runs_end_to_end_through_axolotl_train(tmp_path, tiny_dir):
    out = tmp_path / "ab"
    proc = run_cli("ab", "--quick", "--model", tiny_dir, "-o", out, module="fgit_bench")
    assert "| dynamic |" in proc.stdout and "| sft |" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["base", "sft-s0", "dynamic-s0"]
    held_out = [p.id for p in load() if p.split == "held_out"][:6]
    for model in results["models"]:
        assert list(model["per_problem"]["pass@1"]) == held_out
        assert sum(model["outcomes"].values()) == 6 * 3  # greedy + 2 samples, each run
        for key in ("pair_acc", "pass@1", "pass@1_sampled", "pass@2_sampled"):
            assert 0.0 <= model["metrics"][key] <= 1.0
    assert results["data"]["train_pairs"] > 0 and results["data"]["held_out_pairs"] > 0
    for run in ("sft-s0", "dynamic-s0"):
        steps = [e["step"] for e in results["histories"][run]]
        assert steps == [1, 2]
        assert all("fgit/Hc" in e and "fgit/Ha" in e for e in results["histories"][run])
        config = (out / "arms" / run / "config.yml").read_text()
        assert "max_steps: 2" in config and "seed: 0" in config
    sft = (out / "arms/sft-s0/config.yml").read_text().replace("weighting: sft", "")
    dynamic = (out / "arms/dynamic-s0/config.yml").read_text().replace("weighting: dynamic", "")
    assert sft.replace("sft-s0", "X") == dynamic.replace("dynamic-s0", "X")  # only fgit differs
    for name in ("curves.png", "metrics.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert set(results["summary"]) == {"base", "sft", "dynamic"}
    md = (out / "results.md").read_text().splitlines()
    assert (
        len(md) == 11 and md[6].startswith("| arm − sft (paired)") and md[8].startswith("| dynamic")
    )
    assert set(results["differences"]) == {"dynamic"}


def test_report_keeps_greedy_pass_at_1_apart_from_sampled_when_k_is_1():
    from fgit_bench.report import summarise, table

    def model(arm, seed, greedy, sampled):
        per_problem = {
            "pair_acc": {"a": 1.0, "b": 0.0},
            "margin": {"a": 0.2, "b": -0.1},
            "pass@1": {"a": greedy, "b": 0.0},
            "pass@1_sampled": {"a": sampled, "b": 0.0},
        }
        metrics = {k: sum(v.values()) / 2 for k, v in per_problem.items()}
        return {"arm": arm, "seed": seed, "metrics": metrics, "per_problem": per_problem}

    models = [model("base", None, 1.0, 0.0), model("sft", 0, 0.0, 1.0), model("sft", 1, 0.0, 0.5)]
    summary = summarise(models, k=1)
    assert (
        summary["base"]["pass@1"]["mean"] == 0.5 and summary["base"]["pass@1_sampled"]["mean"] == 0
    )
    assert summary["sft"]["seeds"] == 2 and summary["sft"]["pass@1_sampled"]["mean"] == 0.375
    assert summary["sft"]["pass@1_sampled"]["sd"] == pytest.approx(0.1767767)
    lines = table(summary, 1, {"sft": 60.0}).splitlines()
    assert lines[0].count("pass@1") == 2 and len(lines) == 4
    assert lines[3].startswith("| sft | 0.500 ± 0.000") and lines[3].endswith("| 1.0 min |")


def test_differences_pair_each_problem_with_the_reference_arm():
    from fgit_bench.report import difference_table, differences

    def model(arm, seed, values):
        per_problem = {key: dict(zip("abcd", values)) for key in ("pair_acc", "margin", "pass@1")}
        per_problem["pass@1_sampled"] = per_problem["pass@1"]
        metrics = {k: sum(v.values()) / 4 for k, v in per_problem.items()}
        return {"arm": arm, "seed": seed, "metrics": metrics, "per_problem": per_problem}

    models = [
        model("base", None, [1, 1, 1, 1]),
        model("sft", 0, [0, 0, 1, 1]),
        model("dyn", 0, [1, 1, 1, 0]),
        model("dyn", 1, [1, 0, 1, 0]),  # seeds are averaged per problem first: 1, .5, 1, 0
    ]
    diffs = differences(models, k=1)
    assert set(diffs) == {"dyn"}  # neither the reference nor the base model
    stat = diffs["dyn"]["pass@1"]
    assert stat["mean"] == pytest.approx((1 + 0.5 + 0 - 1) / 4)
    assert (stat["better"], stat["worse"], stat["n"]) == (2, 1, 4)
    lo, hi = stat["ci95"]
    assert -1 <= lo < stat["mean"] < hi <= 1
    assert differences([m for m in models if m["arm"] != "sft"], k=1) == {}
    row = difference_table(diffs, 1).splitlines()[2]
    assert row.startswith("| dyn | +0.125 [") and row.endswith("(2/1) |")
