"""`fgit-preprocess run` against a real loopback OpenAI-compatible server, via litellm.

The CLI runs in a subprocess exactly as a user runs it; the server (in this process)
answers over real HTTP and injects the failures real providers produce.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest

from conftest import SAMPLE, run_cli, teacher_args
from fgit_preprocess.cache import AnswerCache
from fgit_preprocess.mutate import mutate_response
from fgit_preprocess.sources import rejects_path
from fgit_preprocess.teacher import Teacher, TeacherSettings, build_requests
from loopback_server import LoopbackServer, Reply, completion, error, last_user_text, request_json

SECRET = "sk-test-DO-NOT-LEAK-0123456789"
ENV = {"OPENAI_API_KEY": SECRET}


def solution_of(body: dict) -> str:
    """The reference solution the default prompt carries (everything after its header)."""
    return last_user_text(body).split("Reference solution:\n", 1)[1].rstrip("\n") + "\n"


def good_answers(body: dict) -> list[str]:
    """Deterministic near-miss answers, as a well-behaved teacher would give: as many as
    ``n`` asks (a server that honours ``n`` never returns fewer choices)."""
    n, solution = body.get("n", 1), solution_of(body)
    found = mutate_response(solution, n, seed=7)
    seed = 8
    while len(found) < n and seed < 40:
        found += [v for v in mutate_response(solution, n, seed=seed) if v not in found]
        seed += 1
    return (found + found[-1:] * n)[:n]


def ok(body: dict, index: int) -> Reply:
    return Reply(200, completion(good_answers(body)))


def one_choice(body: dict, index: int) -> Reply:
    """llama.cpp's server: one answer per call, whatever ``n`` asks; its own token counts."""
    return Reply(200, completion(good_answers({**body, "n": 1}), prompt_tokens=7 + index))


def write_rows(path: Path, n: int) -> Path:
    rows = [json.loads(line) for line in SAMPLE.open()][:n]
    path.write_text(
        "".join(
            json.dumps({**r, "instruction": f"[task {i}] {r['instruction']}"}) + "\n"
            for i, r in enumerate(rows)
        )
    )
    return path


def run_args(data: Path, out: Path, srv: LoopbackServer, *extra) -> list:
    return teacher_args(
        data,
        out,
        "openai/gpt-4o-mini",
        "--api-base",
        srv.url,
        "--similarity",
        "levenshtein",
        "--num-variants",
        "3",
        *extra,
    )


def task_of(body: dict) -> int:
    return int(last_user_text(body).split("[task ", 1)[1].split("]", 1)[0])


def test_run_end_to_end_with_cost_and_no_leaked_key(tmp_path):
    import litellm

    # Our own price, so the cost check does not follow litellm's price table.
    litellm.register_model(
        {
            "fgit-priced": {
                "input_cost_per_token": 1e-6,
                "output_cost_per_token": 2e-6,
                "litellm_provider": "openai",
                "mode": "chat",
            }
        }
    )
    data = write_rows(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out"

    def priced(body: dict, index: int) -> Reply:
        return Reply(200, completion(good_answers(body), model="fgit-priced"))

    with LoopbackServer(priced) as srv:
        args = run_args(data, out, srv)
        args[args.index("openai/gpt-4o-mini")] = "openai/fgit-priced"
        proc = run_cli(*args, env=ENV)
    assert len(srv.requests) == 6 and all(b["n"] == 3 for b in srv.requests)  # uses n
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == 6
    assert all(0 < s <= 1 for s in ds["similarity"]) and all(
        n >= 1 for n in ds["num_valid_variants"]
    )
    assert all("[task" in p for p in ds["prompt"]) and "tests" in ds.column_names
    report = json.loads((out / "report.json").read_text())
    # 6 calls x (100 prompt tokens x $1e-6 + 50 completion tokens x $2e-6)
    assert report["teacher"]["cost_usd"] == pytest.approx(6 * (100e-6 + 100e-6), rel=1e-6)
    assert "Problem:" in report["params"]["template"]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".sqlite" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), f"API key leaked into {path}"
    assert SECRET not in proc.stdout + proc.stderr


def test_faults_are_retried_and_every_row_is_accounted_for(tmp_path):
    data = write_rows(tmp_path / "in.jsonl", 8)
    seen: Counter = Counter()

    def flaky(body: dict, index: int) -> Reply:
        task = task_of(body)
        seen[task] += 1
        first = seen[task] == 1
        if task == 0 and first:
            return error(429, "rate limited", "rate_limit_error", **{"Retry-After": "0.5"})
        if task == 1 and seen[task] <= 2:
            return error(500, "internal error")
        if task == 2 and first:
            return Reply(200, completion(good_answers(body)), delay=3.0)  # slower than --timeout
        if task == 3 and first:
            return Reply(200, b'{"id": "chatcmpl-1", "choices": [{"index": 0, "mess')  # truncated
        if task == 4:
            return Reply(
                200, completion(["Sure! The answer is to loop over the list."] * body["n"])
            )
        if task == 5:
            return Reply(200, completion(["I'm sorry, I can't help write wrong code."] * body["n"]))
        if task == 6:
            return error(503, "overloaded")  # never recovers: retries run out
        return ok(body, index)

    out = tmp_path / "out"
    with LoopbackServer(flaky) as srv:
        run_cli(
            *run_args(data, out, srv, "--timeout", "1", "--max-retries", "2", "--concurrency", "4"),
            env=ENV,
        )
    assert seen[0] == 2 and seen[1] == 3 and seen[2] == 2 and seen[3] == 2  # retried, then OK
    assert seen[6] == 3  # 1 try + 2 retries
    report = json.loads((out / "report.json").read_text())
    assert report["rows_in"] == 8 and report["rows_out"] + report["rejected"] == 8
    assert report["rows_out"] == 5
    # Rows whose requests all failed are teacher errors (a rerun retries exactly those).
    assert report["rejects_by_reason"] == {"no-valid-variant": 2, "teacher-error": 1}
    # Row 7's code has one possible fault: the server repeats it to fill n = 3.
    assert report["variant_rejects_by_reason"] == {
        "duplicate": 2,
        "no-code-block": 3,
        "refusal": 3,
    }
    assert report["teacher"]["retries"] >= 6
    rejects = {
        json.loads(line)["prompt"][:8]: json.loads(line) for line in rejects_path(out).open()
    }
    assert "no-code-block" in rejects["[task 4]"]["detail"]
    assert "refusal" in rejects["[task 5]"]["detail"]
    assert "ServiceUnavailable" in rejects["[task 6]"]["detail"]


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_errors_and_unknown_models_stop_at_once(tmp_path, status):
    data = write_rows(tmp_path / "in.jsonl", 10)
    with LoopbackServer(
        lambda b, i: error(
            status,
            "Incorrect API key provided"
            if status != 404
            else "The model `gpt-4o-mini` does not exist",
        )
    ) as srv:
        proc = run_cli(
            *run_args(data, tmp_path / "out", srv, "--concurrency", "2"), ok=False, env=ENV
        )
    assert proc.returncode == 2 and "stopping at once" in proc.stderr
    assert len(srv.requests) <= 2, "a fatal error must not be retried or followed by more calls"
    assert not (tmp_path / "out").exists()
    assert SECRET not in proc.stderr


def test_template_missing_placeholder_fails_before_any_call(tmp_path):
    data = write_rows(tmp_path / "in.jsonl", 2)
    tpl = tmp_path / "tpl.txt"
    tpl.write_text("Break this: {solution}")
    with LoopbackServer(ok) as srv:
        proc = run_cli(
            *run_args(data, tmp_path / "o", srv, "--prompt-template", tpl), ok=False, env=ENV
        )
        assert proc.returncode == 2 and "['problem']" in proc.stderr
        assert srv.requests == []
        tpl.write_text("P: {problem}\nReference solution:\n{solution}")
        run_cli(*run_args(data, tmp_path / "o", srv, "--prompt-template", tpl), env=ENV)
    assert last_user_text(srv.requests[0]).startswith("P: [task")


@pytest.mark.slow  # a killed CLI process and a rerun
def test_sigkill_midway_then_resume_repeats_no_answered_request(tmp_path):
    data = write_rows(tmp_path / "in.jsonl", 10)
    reference = tmp_path / "reference"
    with LoopbackServer(ok) as srv:
        run_cli(*run_args(data, reference, srv), env=ENV)

    state: dict = {}

    def killer(body: dict, index: int) -> Reply:
        if index == 4:  # four answers delivered and persisted; die on the fifth request
            os.kill(state["pid"], signal.SIGKILL)
            return error(500, "client is gone")
        return ok(body, index)

    out = tmp_path / "out"
    with LoopbackServer(killer) as srv:
        args = [
            sys.executable,
            "-m",
            "fgit_preprocess",
            *map(str, run_args(data, out, srv, "--concurrency", "1")),
        ]
        proc = subprocess.Popen(
            args,
            env={**os.environ, **ENV, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        state["pid"] = proc.pid
        assert proc.wait(timeout=300) == -signal.SIGKILL
        first = list(srv.answered)
    assert len(first) == 4 and not (out / "state.json").exists()
    with LoopbackServer(ok) as srv:
        run_cli(*run_args(data, out, srv, "--concurrency", "1"), env=ENV)
        again = {request_json(b) for b in srv.requests}
    assert len(srv.requests) == 6
    assert not again & {request_json(b) for b in first}, "an answered request was sent again"
    got, want = datasets.load_from_disk(str(out)), datasets.load_from_disk(str(reference))
    assert got.to_list() == want.to_list()


def resume_command(stderr: str) -> list[str]:
    return shlex.split(stderr.split("To resume: ", 1)[1].strip())


@pytest.mark.slow  # three fresh CLI processes
def test_max_cost_stops_cleanly_and_resumes(tmp_path):
    data = write_rows(tmp_path / "in.jsonl", 8)
    out = tmp_path / "out"
    with LoopbackServer(ok) as srv:
        # A zero budget sends nothing, so there is no estimate: the advice drops the cap.
        proc = run_cli(
            *run_args(data, out, srv, "--max-cost", "0"), ok=False, env=ENV, fresh_process=True
        )
        assert proc.returncode == 3 and not srv.requests, proc.stderr
        assert "nothing has been paid yet" in proc.stderr
        assert "--max-cost" not in resume_command(proc.stderr)
        proc = run_cli(
            *run_args(data, out, srv, "--concurrency", "1", "--max-cost", "0.0001"),
            ok=False,
            env=ENV,
            fresh_process=True,  # the resume command it prints comes from its own argv
        )
        spent = len(srv.requests)
        assert proc.returncode == 3 and "--max-cost" in proc.stderr, proc.stderr
        assert 0 < spent < 8 and f"{8 - spent} requests not sent" in proc.stderr
        assert not out.exists()  # nothing that looks like a dataset
        command = resume_command(proc.stderr)
        assert command[0] == "fgit-preprocess"
        budget = float(command[command.index("--max-cost") + 1])
        assert budget > 8 / spent * 0.0001 * 0.9, budget  # covers what is left to do
        # The printed command, exactly as printed, finishes the run.
        resumed = subprocess.run(
            [str(Path(sys.executable).parent / "fgit-preprocess"), *command[1:]],
            capture_output=True,
            text=True,
            env={**os.environ, **ENV, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        )
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert len(srv.requests) == 8  # the answered requests were not sent again
    assert json.loads((out / "report.json").read_text())["rows_out"] == 8


def test_an_echoed_key_is_scrubbed_before_anything_is_stored(tmp_path):
    """A server that echoes the Authorization header into its answer: the key reaches
    neither the dataset, the rejects file, the report nor the answer cache."""

    def echo(body: dict, index: int) -> Reply:
        header = srv.headers[index]["Authorization"]
        answers = [
            a.replace("```python\n", f"```python\n# {header}\n", 1) for a in good_answers(body)
        ]
        return Reply(200, completion(answers))

    data = write_rows(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out"
    with LoopbackServer(echo) as srv:
        run_cli(*run_args(data, out, srv), env=ENV)
    assert SECRET in srv.headers[0]["Authorization"]  # the server did see it
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != data]
    assert any(p.suffix == ".sqlite" for p in written)
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    assert "***" in "".join(datasets.load_from_disk(str(out))["incorrect"])


def test_parallel_calls_when_n_is_unsupported(tmp_path):
    settings = TeacherSettings(model="openai/gpt-4o-mini", num_variants=3, concurrency=3)
    prompts = [
        [
            {
                "role": "user",
                "content": f"Problem:\nX{i}\n\nReference solution:\n"
                f"def f(x):\n    return x + {i}\n",
            }
        ]
        for i in range(2)
    ]
    requests = build_requests(prompts, settings, use_n=False)
    assert len(requests) == 6 and len({r.key for r in requests}) == 6
    with LoopbackServer(ok) as srv:
        teacher = Teacher(
            TeacherSettings(**{**settings.__dict__, "api_base": srv.url}),
            AnswerCache(tmp_path / "c.sqlite"),
        )
        os.environ.setdefault("OPENAI_API_KEY", SECRET)
        out = asyncio.run(teacher.run(requests))
    assert len(srv.requests) == 6 and all("n" not in b for b in srv.requests)
    assert [len(out.texts[i]) for i in range(2)] == [3, 3]


def test_a_server_that_ignores_n_is_topped_up_with_single_calls(tmp_path):
    """llama.cpp's server answers one choice whatever n asks: the rest come from parallel
    single-answer calls, every row still gets K variants, and the report counts them."""
    data = write_rows(tmp_path / "in.jsonl", 4)
    out = tmp_path / "out"
    with LoopbackServer(one_choice) as srv:
        run_cli(*run_args(data, out, srv), env=ENV)
    asked_n = [b for b in srv.requests if b.get("n") == 3]
    singles = [b for b in srv.requests if "n" not in b]
    assert len(asked_n) == 4 and len(singles) == 4 * 2  # 1 answer + 2 more per row
    teacher = json.loads((out / "report.json").read_text())["teacher"]
    assert teacher["calls"] == 4 and teacher["topped_up"] == 8
    assert teacher["prompt_tokens"] == sum(7 + i for i in range(12))  # the server's counts
    assert teacher["completion_tokens"] == 12 * 50
    assert all(n >= 1 for n in datasets.load_from_disk(str(out))["num_valid_variants"])


def test_bad_inputs_give_clear_errors_or_reasoned_rejects(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"task": "x", "response": "y"}) + "\n")
    proc = run_cli("run", "-i", path, "-o", tmp_path / "o", "--teacher", "mutate", ok=False)
    assert (
        proc.returncode == 2 and "--prompt-field" in proc.stderr and "task, response" in proc.stderr
    )
    path.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"prompt": "Add one.", "response": "```python\ndef f(x):\n    return x + 1\n```\n"},
                {"prompt": "Bad.", "response": 42},
                {"prompt": "No code to mutate.", "response": "```python\npass\n```\n"},
            ]
        )
    )
    out = tmp_path / "o"
    run_cli("run", "-i", path, "-o", out, "--teacher", "mutate", "--similarity", "levenshtein")
    report = json.loads((out / "report.json").read_text())
    assert report["rows_out"] == 1
    assert report["rejects_by_reason"] == {"bad-correct": 1, "no-valid-variant": 1}
    details = {json.loads(line)["reason"]: json.loads(line) for line in rejects_path(out).open()}
    assert "int, not a string" in details["bad-correct"]["detail"]
    assert details["bad-correct"]["fgit_input_line"] == 2
    details = {reason: row["detail"] for reason, row in details.items()}
    assert details["no-valid-variant"] == "teacher gave no answer"


def test_unknown_provider_is_rejected_before_any_call(tmp_path):
    data = write_rows(tmp_path / "in.jsonl", 1)
    proc = run_cli(
        "run", "-i", data, "-o", tmp_path / "o", "--teacher", "nosuchprovider/x", ok=False, env=ENV
    )
    assert proc.returncode == 2 and "provider/model" in proc.stderr


def test_teacher_seed_goes_with_every_call_and_depends_only_on_the_request(tmp_path):
    """llama.cpp's server (no n, so top-ups) under --teacher-seed: each call carries its own
    seed, made from what it asks, so two runs send the same seeds for the same questions
    whatever order they arrive in; another seed changes them."""

    def seeds(tag: str, seed: str) -> dict[int, list[int]]:
        out = tmp_path / tag
        with LoopbackServer(one_choice) as srv:
            run_cli(*run_args(data, out, srv, "--teacher-seed", seed, "--concurrency", "4"),
                    env=ENV)  # fmt: skip
        per_task: dict[int, list[int]] = {}
        for body in srv.requests:
            per_task.setdefault(task_of(body), []).append(body["seed"])
        return {task: sorted(s) for task, s in per_task.items()}

    data = write_rows(tmp_path / "in.jsonl", 4)
    first, again, other = seeds("a", "5"), seeds("b", "5"), seeds("c", "6")
    assert first == again and len(first) == 4
    assert all(len(set(s)) == 3 for s in first.values())  # the call and its two top-ups
    assert all(first[t] != other[t] for t in first)


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        ("anthropic/claude-3-5-haiku-latest", "--teacher-seed: litellm sends no seed"),
        ("mutate", "the mutation teacher's seed is --seed"),
    ],
)
def test_a_teacher_seed_that_cannot_be_honoured_is_refused(tmp_path, teacher, message):
    data = write_rows(tmp_path / "in.jsonl", 1)
    proc = run_cli(*teacher_args(data, tmp_path / "o", teacher, "--teacher-seed", "1"), ok=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "o").exists()
