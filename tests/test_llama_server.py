"""`fgit-preprocess run` against a real OpenAI-compatible server: llama.cpp's, from PyPI
(``llama-cpp-python[server]``), serving the SmolLM2-135M-Instruct GGUF on 127.0.0.1.

A 135M model is a poor teacher: it answers without a fence, in prose, or copies the
reference back. That is the point: every answer must end as a kept variant or a counted
reject, never a crash, and the report must agree with what the server saw.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import SAMPLE, run_cli
from fgit_preprocess.models import smollm2_gguf
from fgit_preprocess.sources import rejects_path

pytestmark = pytest.mark.slow
ALIAS = "smollm2"
ROWS, K = 8, 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """``python -m llama_cpp.server`` on a free port; yields (base URL, its log file)."""
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as err:
        pytest.fail(
            f"llama-cpp-python[server] is not installed ({err}); bash scripts/test.sh installs it"
        )
    log = tmp_path_factory.mktemp("llama") / "server.log"
    port = _free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()),
               "--model_alias", ALIAS, "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", "4096", "--seed", "0",
               # llama-cpp-python 0.3.36 built on this AMX CPU segfaults in batched prompt
               # evaluation of this Q4_1 model (any n_batch > 1); one token at a time works.
               "--n_batch", "1"]  # fmt: skip
    with log.open("w") as fh:
        server = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as reply:
                if ALIAS in reply.read().decode():
                    break
        except OSError:
            pass
        assert server.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "llama.cpp server did not start in 180 s"
        time.sleep(1)
    yield f"{url}/v1", log
    server.terminate()
    server.wait(timeout=30)


def _served(log: Path) -> int:
    """Chat completions the server answered, from its own access log."""
    return len(re.findall(r'"POST /v1/chat/completions HTTP/1\.1" 200', log.read_text()))


def test_real_llama_cpp_server_end_to_end(tmp_path, llama_server):
    url, log = llama_server
    out = tmp_path / "pairs"
    args = ["run", "-i", SAMPLE, "-o", out, "--teacher", f"openai/{ALIAS}", "--api-base", url,
            "--num-variants", str(K), "--max-tokens", "200", "--similarity", "levenshtein",
            "--limit", str(ROWS), "--concurrency", "2", "--overwrite",
            # Per-request seeds: llama.cpp otherwise chains one seed through the requests
            # in arrival order, which two in flight make vary from run to run.
            "--teacher-seed", "0"]  # fmt: skip
    env = {"OPENAI_API_KEY": "sk-local-anything"}
    before = _served(log)
    proc = run_cli(*args, env=env, ok=False)
    assert proc.returncode in (0, 2), proc.stderr[-3000:]  # 2: no row kept, said so
    served = _served(log) - before
    rejects = [json.loads(line) for line in rejects_path(out).open()]
    assert all(r["reason"] and r["detail"] for r in rejects)
    if proc.returncode == 2:
        assert "no row has a valid variant" in proc.stderr and len(rejects) == ROWS
        pytest.fail(f"the tiny teacher kept no row; rejects: {[r['reason'] for r in rejects]}")
    report = json.loads((out / "report.json").read_text())
    assert report["rows_in"] == ROWS and report["rows_out"] + report["rejected"] == ROWS
    teacher = report["teacher"]
    # The server ignores n: one answer per call, the teacher asks again for the rest.
    assert teacher["requests"] == ROWS and teacher["failed"] == 0
    assert teacher["calls"] + teacher["topped_up"] == served
    assert teacher["topped_up"] == ROWS * (K - 1)
    assert teacher["prompt_tokens"] > 0 and teacher["completion_tokens"] > 0
    # Every answer is a kept variant or a counted reject: junk included.
    answers = ROWS * K
    variants = report["valid_variants"] + sum(report["variant_rejects_by_reason"].values())
    assert variants == answers, report
    assert report["variant_rejects_by_reason"], "a 135M teacher wrote no junk at all?"

    rerun = run_cli(*args, env=env)
    assert _served(log) - before == served  # the rerun sent nothing
    again = json.loads((out / "report.json").read_text())["teacher"]
    assert again["calls"] == 0 and again["cached"] == ROWS and again["prompt_tokens"] == 0
    assert rerun.returncode == 0
