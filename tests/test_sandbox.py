"""Hostile code in the sandbox: every case is contained and reported as a failure with
its reason, and the test process (its parent) survives all of them."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from fgit_preprocess.sandbox import Limits, isolation, run_many, run_python, run_tests

FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
LIMITS = Limits(
    cpu_seconds=2, wall_seconds=4, memory_bytes=512 << 20, file_bytes=1 << 20, processes=16
)


def test_isolation_is_as_strong_as_this_machine_allows():
    iso = isolation()
    assert iso.network, "a network namespace should be available here"
    if os.geteuid() == 0:
        assert iso.nobody, "as root the sandbox must drop to nobody"


def test_good_code_passes_and_a_failing_assert_fails():
    assert run_tests("def add(a, b):\n    return a + b", "assert add(2, 3) == 5", LIMITS).passed
    out = run_tests("def add(a, b):\n    return a - b", "assert add(2, 3) == 5", LIMITS)
    assert not out.passed and out.reason == "failed" and "AssertionError" in out.output


@pytest.mark.parametrize(
    "code,reason",
    [
        ("while True:\n    pass", "cpu-time"),
        ("import time\ntime.sleep(60)", "timeout"),
        ("x = bytearray(4 << 30)", "memory"),
        ("f = open('big', 'wb')\nwhile True:\n    f.write(b'0' * (1 << 20))", "file-size"),
        (FORK_BOMB, "timeout"),
    ],
    ids=["busy-loop", "sleep", "memory", "10GB-file", "fork-bomb"],
)
def test_resource_abuse_is_stopped_with_its_reason(code, reason):
    out = run_python(code, LIMITS)
    assert not out.passed and out.reason == reason, out
    assert out.seconds < LIMITS.wall_seconds + 3


@pytest.mark.slow  # waits out a fork bomb
def test_fork_bomb_leaves_no_process_behind():
    run_python(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        LIMITS,
    )
    import subprocess
    import time

    time.sleep(1)
    left = subprocess.run(["pgrep", "-u", "nobody"], capture_output=True, text=True).stdout
    assert not left.strip(), left


def test_it_cannot_kill_its_parent():
    out = run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", LIMITS)
    assert not out.passed and "Operation not permitted" in out.output


def test_it_cannot_read_our_files_or_environment(tmp_path, monkeypatch):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    secret.chmod(0o600)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    out = run_python(f"print(open({str(secret)!r}).read())", LIMITS)
    assert not out.passed and "Permission denied" in out.output
    assert "PRIVATE KEY" not in out.output
    out = run_python(
        "import os\nassert 'OPENAI_API_KEY' not in os.environ\n"
        "assert os.listdir('.') == ['main.py'], os.listdir('.')",
        LIMITS,
    )
    assert out.passed, out.output


def test_it_has_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True)
    thread.start()
    port = server.getsockname()[1]
    out = run_python(
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", LIMITS
    )
    server.close()
    assert not out.passed and "unreachable" in out.output.lower(), out.output
    assert not accepted


def test_many_runs_keep_their_order():
    jobs = [(f"x = {i}", f"assert x == {i}") for i in range(6)] + [("x = 0", "assert x == 1")]
    assert [o.passed for o in run_many(jobs, LIMITS, workers=2)] == [True] * 6 + [False]


def test_string_hashing_is_the_same_in_every_run():
    """A doctest that prints a set of strings must pass or fail the same way each time."""
    jobs = [("print(hash('fgit'), list({'0', '1', '2', '3'}))", "")] * 4
    outputs = {o.output for o in run_many(jobs, LIMITS, workers=2)}
    assert len(outputs) == 1, outputs
