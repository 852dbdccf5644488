"""fgit-preprocess as a careless or hostile user drives it: every bad input ends in a
counted reject traceable to its input line, or in a clear error before any work; exit 0
only with a complete, loadable, non-empty dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from conftest import SAMPLE, run_cli, teacher_args
from fgit_preprocess.card import format_usd
from fgit_preprocess.diff import TOO_LONG, code_view, pair_spans
from fgit_preprocess.sources import rejects_path
from loopback_server import LoopbackServer, Reply, error

PAIR = {
    "prompt": "Add.",
    "correct": "```python\ndef f(x):\n    return x + 1\n```\n",
    "incorrect": "```python\ndef f(x):\n    return x - 1\n```\n",
}


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in rejects_path(out).open()]


# 1. An output that looks complete but is not.
def test_all_rows_rejected_is_an_error_and_writes_no_dataset(tmp_path):
    data = jsonl(tmp_path / "in.jsonl", [{**PAIR, "incorrect": PAIR["correct"]}])
    out = tmp_path / "out"
    proc = run_cli("masks", "-i", data, "-o", out, ok=False)
    assert proc.returncode == 2 and "no row survived" in proc.stderr and "no-diff" in proc.stderr
    assert not out.exists()
    assert [r["reason"] for r in rejects(out)] == ["no-diff"]


# 2. CRLF text is fenced code like any other.
def test_crlf_responses_are_seen_as_fenced(tmp_path):
    crlf = {k: v.replace("\n", "\r\n") for k, v in PAIR.items()}
    crlf["incorrect"] = crlf["incorrect"].replace("```\r\n", "```\r\nProse that differs.\r\n")
    view = code_view(crlf["correct"])
    assert view.fenced and view.language == "python"
    spans = pair_spans(crlf["correct"], crlf["incorrect"])
    prose_at = crlf["incorrect"].index("Prose")
    assert all(e <= prose_at for _, e in spans.incorrect_line)  # prose is not "sensitive"
    row = {"prompt": "Add one.", "response": crlf["correct"]}
    out = tmp_path / "mut"
    run_cli(
        *teacher_args(jsonl(tmp_path / "in.jsonl", [row]), out, "mutate"),
        "--similarity",
        "levenshtein",
    )
    assert json.loads((out / "report.json").read_text())["rows_out"] == 1


# 3. One bad line never kills the run; each is a counted, traceable reject.
def test_bad_lines_are_rejected_with_their_line_numbers(tmp_path):
    path = tmp_path / "in.jsonl"
    with path.open("wb") as fh:
        fh.write((json.dumps(PAIR) + "\n").encode())
        fh.write(b'{"prompt": "broken", "correct": \n')
        fh.write(b'{"prompt": "\xff\xfe not utf-8"}\n')
        fh.write(b'{"prompt": "lone \\ud800 surrogate", "correct": "a", "incorrect": "b"}\n')
        fh.write(b'["not", "an", "object"]\n')
        fh.write((json.dumps(PAIR) + "\n").encode())
    out = tmp_path / "out"
    run_cli("masks", "-i", path, "-o", out)
    report = json.loads((out / "report.json").read_text())
    assert report["rows_in"] == 6 and report["rows_out"] == 2
    by_line = {r["fgit_input_line"]: r["reason"] for r in rejects(out)}
    assert by_line == {2: "bad-json", 3: "bad-encoding", 4: "bad-encoding", 5: "bad-json"}
    assert datasets.load_from_disk(str(out))["fgit_input_line"] == [1, 6]


@pytest.mark.parametrize("kind", ["empty-file", "blank-file", "empty-dir"])
def test_empty_inputs_are_clear_errors(tmp_path, kind):
    target = tmp_path / ("in.jsonl" if "file" in kind else "folder")
    if kind == "empty-dir":
        target.mkdir()
    else:
        target.write_text("" if kind == "empty-file" else "\n\n")
    proc = run_cli("masks", "-i", target, "-o", tmp_path / "out", ok=False)
    assert proc.returncode == 2 and (
        "no readable rows" in proc.stderr or "empty directory" in proc.stderr
    ), proc.stderr
    assert not (tmp_path / "out").exists()


# 4. Rejects say which row they were.
def test_rejected_rows_carry_their_line_and_prompt(tmp_path):
    data = jsonl(tmp_path / "in.jsonl", [PAIR, {**PAIR, "prompt": "   "}])
    out = tmp_path / "out"
    run_cli("masks", "-i", data, "-o", out)
    (reject,) = rejects(out)
    assert reject["reason"] == "bad-prompt" and reject["fgit_input_line"] == 2
    assert '"prompt": "   "' in reject["detail"]  # the row's own values, to find it


# 5. Bounded work per row.
def test_long_repetitive_files_diff_and_oversized_rows_are_rejected():
    lines = ["    x = x + 1\n", "\n"] * 10_000
    correct = "def f(x):\n" + "".join(lines) + "    return x\n"
    incorrect = correct.replace("x = x + 1", "x = x - 1", 3)
    spans = pair_spans(correct, incorrect, "response")
    assert len(spans.correct_line) == 3 and len(spans.correct_edit) == 3
    huge = "x = 1\n" * 200_000
    assert pair_spans(huge, huge + "y = 2\n").reject == TOO_LONG


# 6. Teacher failures explain themselves.
def openai_run(tmp_path: Path, api_base: str, *extra, key: bool = True):
    """``fgit-preprocess run`` on two bundled problems against an OpenAI-style endpoint."""
    data = jsonl(tmp_path / "in.jsonl", [json.loads(line) for line in SAMPLE.open()][:2])
    return run_cli(
        *teacher_args(data, tmp_path / "out", "openai/gpt-4o-mini"),
        "--api-base",
        api_base,
        "--similarity",
        "levenshtein",
        *extra,
        ok=False,
        env={"OPENAI_API_KEY": "sk-x"} if key else None,
    )


def test_unreachable_teacher_names_the_cause(tmp_path):
    proc = openai_run(tmp_path, "http://127.0.0.1:9/v1", "--max-retries", "1", "--timeout", "2")
    assert proc.returncode == 2 and "the teacher failed" in proc.stderr
    assert "Connection" in proc.stderr, proc.stderr
    assert {r["reason"] for r in rejects(tmp_path / "out")} == {"teacher-error"}


@pytest.mark.parametrize("reply", ["500", "garbage"])
def test_failing_teacher_reports_the_dominant_failure_and_retries(tmp_path, reply):
    def respond(body: dict, index: int) -> Reply:
        return error(500, "boom") if reply == "500" else Reply(200, b"not json at all")

    with LoopbackServer(respond) as srv:
        proc = openai_run(tmp_path, srv.url, "--max-retries", "2")
    assert proc.returncode == 2 and "the teacher failed: " in proc.stderr
    assert "2 of 2 failed rows" in proc.stderr
    assert len(srv.requests) == 2 * 3  # every request tried three times


def test_missing_api_key_stops_before_any_request(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with LoopbackServer(lambda body, i: error(500, "unused")) as srv:
        proc = openai_run(tmp_path, srv.url, key=False)
    assert proc.returncode == 2 and "OPENAI_API_KEY" in proc.stderr and not srv.requests


# 8. Late or raw errors come early and clean.
def test_bad_output_paths_fail_before_work(tmp_path):
    data = jsonl(tmp_path / "in.jsonl", [PAIR])
    a_file = tmp_path / "file"
    a_file.write_text("x")
    proc = run_cli("masks", "-i", data, "-o", a_file, ok=False)
    assert proc.returncode == 2 and "is a file" in proc.stderr
    proc = run_cli("masks", "-i", "/proc/self", "-o", "/proc/self/fgit", ok=False)
    assert proc.returncode == 2
    proc = run_cli("masks", "-i", data, "-o", "/proc/fgit-out", ok=False)
    assert proc.returncode == 2 and "error:" in proc.stderr


def test_output_equal_to_input_is_refused_and_the_input_untouched(tmp_path):
    src = tmp_path / "src"
    datasets.Dataset.from_list([PAIR]).save_to_disk(str(src))
    before = sorted(p.name for p in src.iterdir())
    proc = run_cli("masks", "-i", src, "-o", src, "--overwrite", ok=False)
    assert proc.returncode == 2 and "would overwrite --input" in proc.stderr
    out = tmp_path / "out"
    run_cli("masks", "-i", src, "-o", out)
    assert sorted(p.name for p in src.iterdir()) == before  # no cache-*.arrow left in the input


def test_inspect_refuses_foreign_data_and_a_directory_as_html(tmp_path):
    plain = tmp_path / "plain"
    datasets.Dataset.from_list([{"a": 1}]).save_to_disk(str(plain))
    proc = run_cli("inspect", "-i", plain, "--html", tmp_path / "p.html", ok=False)
    assert proc.returncode == 2 and "not FGIT data" in proc.stderr
    out = tmp_path / "out"
    run_cli("masks", "-i", jsonl(tmp_path / "in.jsonl", [PAIR]), "-o", out)
    proc = run_cli("inspect", "-i", out, "--html", tmp_path, ok=False)
    assert proc.returncode == 2 and "is a directory" in proc.stderr


def test_unloadable_embedder_or_tokenizer_fails_before_the_teacher(tmp_path):
    with LoopbackServer(lambda body, i: error(500, "unused")) as srv:
        # the later --similarity wins over openai_run's levenshtein
        proc = openai_run(
            tmp_path,
            srv.url,
            "--similarity",
            "embedding",
            "--embedder",
            str(tmp_path / "no-such-model"),
        )
    assert proc.returncode == 2 and "--embedder" in proc.stderr and not srv.requests
    proc = run_cli(
        "masks",
        "-i",
        jsonl(tmp_path / "p.jsonl", [PAIR]),
        "-o",
        tmp_path / "o2",
        "--tokenizer",
        str(tmp_path / "no-such-tokenizer"),
        ok=False,
    )
    assert proc.returncode == 2 and "--tokenizer" in proc.stderr


def test_overwrite_replaces_the_whole_folder(tmp_path):
    data = jsonl(tmp_path / "in.jsonl", [PAIR])
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    run_cli("masks", "-i", data, "-o", out, "--overwrite")
    assert not (out / "stale.txt").exists() and (out / "README.md").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_small_costs_keep_their_digits():
    assert format_usd(4.5e-05) == "$4.5e-05" and format_usd(0.4213) == "$0.4213"
    assert format_usd(0) == "$0"


# Beyond the eight: variants proven wrong, trial runs, the dataset card.
@pytest.mark.slow  # about 120 sandboxed runs
def test_tests_field_rejects_equivalent_variants_and_bad_references(tmp_path):
    rows = [json.loads(line) for line in SAMPLE.open()]
    broken = {
        **rows[0],
        "instruction": "[broken] " + rows[0]["instruction"],
        "tests": rows[0]["tests"] + "\nassert False, 'reference is wrong'\n",
    }
    looping = {
        **rows[1],
        "instruction": "[loops] " + rows[1]["instruction"],
        "tests": "while True:\n    pass\n",
    }
    data = jsonl(tmp_path / "in.jsonl", [*rows, broken, looping])
    out = tmp_path / "out"
    run_cli(
        *teacher_args(data, out, "mutate"),
        "--similarity",
        "levenshtein",
        "--tests-field",
        "tests",
        "--test-seconds",
        "1",
    )
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["test_seconds"] == 1
    tests = report["tests"]
    assert tests["rows_tested"] == len(rows) + 2 and tests["bad_reference"] == 2
    (loop_reject,) = [r for r in rejects(out) if "[loops]" in json.dumps(r)]
    assert loop_reject["reason"] == "bad-reference" and "(cpu-time)" in loop_reject["detail"]
    assert tests["variants_run"] > 50 and 0.9 <= tests["kill_rate"] < 1.0
    assert report["variant_rejects_by_reason"]["equivalent"] == tests["equivalent"] > 0
    assert report["rejects_by_reason"].get("bad-reference") == 2
    print(
        f"\nmutation teacher kill rate: {tests['variants_killed']}/{tests['variants_run']} "
        f"({tests['kill_rate']:.1%}); {tests['equivalent']} equivalent variants rejected"
    )


def test_limit_card_and_failed_push(tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        *teacher_args(SAMPLE, out, "mutate"),
        "--similarity",
        "levenshtein",
        "--limit",
        "3",
        "--push-to-hub",
        "someone/fgit-pairs",
        ok=False,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2 and "--push-to-hub someone/fgit-pairs failed" in proc.stderr
    assert "complete in" in proc.stderr  # the local dataset is whole
    report = json.loads((out / "report.json").read_text())
    assert report["rows_in"] == 3
    card = (out / "README.md").read_text()
    assert "fgit-preprocess run" in card and "teacher: `mutate`" in card
    assert f"rows: {report['rows_out']} kept of 3 read" in card
    assert os.path.getsize(out / "README.md") > 200


# Issue 19 (cases 7, 9-14, 17): nothing lost, nothing misleading.
def test_a_reference_that_times_out_is_named_as_the_cause(tmp_path):
    row = {**json.loads(SAMPLE.open().readline()), "tests": "while True:\n    pass\n"}
    out = tmp_path / "out"
    proc = run_cli(
        *teacher_args(jsonl(tmp_path / "in.jsonl", [row]), out, "mutate"),
        *("--similarity", "levenshtein", "--tests-field", "tests", "--test-seconds", "1"),
        ok=False,
    )
    assert proc.returncode == 2 and "rows rejected {'bad-reference': 1}" in proc.stderr
    assert "the correct response fails its tests (cpu-time)" in proc.stderr, proc.stderr


def test_no_output_file_may_be_the_input(tmp_path):
    out = tmp_path / "out"
    run_cli(
        "masks", "-i", jsonl(tmp_path / "in.jsonl", [PAIR, {**PAIR, "incorrect": "x"}]), "-o", out
    )
    rejected = rejects_path(out)
    before = rejected.read_bytes()
    proc = run_cli("masks", "-i", rejected, "-o", out, "--overwrite", ok=False)
    assert proc.returncode == 2 and "the rejects file" in proc.stderr
    assert "would overwrite --input" in proc.stderr
    assert rejected.read_bytes() == before and (out / "state.json").exists()
    data = jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "response": PAIR["correct"]}])
    before = data.read_bytes()
    proc = run_cli(*teacher_args(data, tmp_path / "o2", "mutate"), "--cache", data, ok=False)
    assert proc.returncode == 2 and f"--cache {data} would overwrite --input" in proc.stderr
    assert data.read_bytes() == before


def test_a_second_writer_of_one_output_is_refused(tmp_path):
    data = jsonl(tmp_path / "in.jsonl", [PAIR])
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, pathlib\nfrom fgit_preprocess.pipeline import claim\n"
            f"lock = claim(pathlib.Path({str(out)!r}))\nprint('held', flush=True)\ntime.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_cli("masks", "-i", data, "-o", out, ok=False)
        assert proc.returncode == 2
        assert f"being written by another fgit-preprocess (pid {holder.pid})" in proc.stderr
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    run_cli("masks", "-i", data, "-o", out)  # the lock died with its process


def test_overwrite_that_keeps_nothing_leaves_no_stale_dataset(tmp_path):
    out = tmp_path / "out"
    run_cli("masks", "-i", jsonl(tmp_path / "good.jsonl", [PAIR]), "-o", out)
    bad = jsonl(tmp_path / "bad.jsonl", [{**PAIR, "incorrect": PAIR["correct"]}])
    proc = run_cli("masks", "-i", bad, "-o", out, "--overwrite", ok=False)
    assert proc.returncode == 2 and "no row survived" in proc.stderr
    assert "previous dataset" in proc.stderr and "was removed" in proc.stderr
    assert not out.exists() and [r["reason"] for r in rejects(out)] == ["no-diff"]


def test_partial_folders_of_killed_runs_are_removed(tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / ".out.partial-4194303"  # above pid_max's default: no such process
    (dead / "data").mkdir(parents=True)
    with subprocess.Popen(["sleep", "30"]) as alive_process:
        alive = tmp_path / f".out.partial-{alive_process.pid}"
        alive.mkdir()
        run_cli("masks", "-i", jsonl(tmp_path / "in.jsonl", [PAIR]), "-o", out)
        alive_process.kill()
    assert not dead.exists() and alive.exists()  # a live writer's folder is not ours to take
    assert (out / "state.json").exists()


@pytest.mark.parametrize("target", ["folder", "empty-folder", "dangling"])
def test_a_symlinked_output_is_refused_before_work(tmp_path, target):
    real = tmp_path / "real"
    if target != "dangling":
        real.mkdir()
    if target == "folder":
        (real / "keep.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(real)
    data = jsonl(tmp_path / "in.jsonl", [PAIR])
    proc = run_cli("masks", "-i", data, "-o", link, "--overwrite", ok=False)
    assert proc.returncode == 2 and f"--output {link} is a symbolic link" in proc.stderr
    assert link.is_symlink() and not rejects_path(link).exists()
    assert target != "folder" or (real / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("scope", ["code", "response"])
def test_the_mutation_teacher_mutates_bare_code(tmp_path, scope):
    rows = [json.loads(line) for line in SAMPLE.open()][:4]
    bare = [{"prompt": r["instruction"], "response": code_view(r["response"]).text} for r in rows]
    assert not any("```" in r["response"] for r in bare)
    out = tmp_path / "out"
    run_cli(
        *teacher_args(jsonl(tmp_path / "in.jsonl", bare), out, "mutate"),
        *("--similarity", "levenshtein", "--diff-scope", scope),
    )
    report = json.loads((out / "report.json").read_text())
    assert report["rows_out"] == 4 and "no-code-block" not in report["variant_rejects_by_reason"]
    assert all("```" not in r for r in datasets.load_from_disk(str(out))["incorrect"])


def test_a_cache_that_is_not_a_cache_is_refused_untouched(tmp_path):
    notes = tmp_path / "notes.sqlite"
    notes.write_text("my notes, not a database\n" * 200)
    before = notes.read_bytes()
    with LoopbackServer(lambda body, i: error(500, "unused")) as srv:
        proc = openai_run(tmp_path, srv.url, "--cache", notes)
    assert proc.returncode == 2 and f"--cache {notes} is not an answer cache" in proc.stderr
    assert "Traceback" not in proc.stderr and not srv.requests
    assert notes.read_bytes() == before
