"""Run untrusted Python (generated code and its tests) in a contained child process.

Each run gets: a fresh empty working directory; a clean environment (no API keys, no
``PYTHONPATH``, a fixed string-hash seed so set order repeats from run to run); CPU-time,
address-space, file-size and process-count limits; a wall-clock timeout that kills its
whole process group; no network (a new network namespace, when the kernel lets this
process make one); and, when we run as root, the unprivileged user ``nobody``, so it can
neither signal us nor read our files. ``isolation()`` says which of these this machine
allows. A run that breaks a limit is a failure with its reason, never a crash of ours.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

NOBODY = 65534
# Not -I: it implies -E, which ignores PYTHONHASHSEED, so set and dict order of strings
# would change from run to run (and a reference's doctest pass or fail by chance). The
# child's environment is ours alone anyway; -s -S keep site-packages out.
_PYTHON_FLAGS = ("-s", "-S")


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one run may use."""

    cpu_seconds: int = 10
    wall_seconds: float = 20.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    processes: int = 64


@dataclass(frozen=True)
class Outcome:
    """How a run ended: ``passed`` only when it exited 0 within every limit."""

    passed: bool
    reason: str  # passed | failed | timeout | cpu-time | memory | file-size | killed:SIG...
    returncode: int | None
    seconds: float
    output: str  # the tail of stdout + stderr
    isolation: Isolation


# Runs first in the child, before the untrusted script: limits, namespace, user.
_BOOT = """
import ctypes, os, resource, runpy, sys
del sys.path[0]  # the working directory ('' for -c): what -I would have left off
cpu, mem, fsize, nproc, netns, nobody = map(int, sys.argv[1:7])
if netns:
    ctypes.CDLL(None).unshare(0x40000000)
for which, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, mem),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NPROC, nproc),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(which, (value, value))
if nobody:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
sys.argv = sys.argv[7:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class Isolation:
    """What this machine lets the sandbox do, found once by probing."""

    python: str  # the interpreter that runs untrusted code
    network: bool  # a fresh network namespace (no interfaces, so no network)
    nobody: bool  # runs as the unprivileged user ``nobody``


def _probe(python: str, netns: bool, nobody: bool) -> bool:
    flags = (1, 1 << 30, 1 << 20, 64, int(netns), int(nobody))
    try:
        probe = subprocess.run(
            [python, *_PYTHON_FLAGS, "-c", _BOOT, *map(str, flags), "/dev/null"],
            capture_output=True,
            timeout=30,
            cwd="/",
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@lru_cache(maxsize=1)
def isolation() -> Isolation:
    """The strongest isolation available: as root, ``nobody`` needs an interpreter it can
    read (a Python under /root is not), so a system Python is tried after our own."""
    candidates = [sys.executable, *filter(None, [shutil.which("python3", path="/usr/bin:/bin")])]
    netns = _probe(sys.executable, True, False)
    if os.geteuid() == 0:
        for python in candidates:
            if _probe(python, netns, True):
                return Isolation(python, netns, True)
    return Isolation(sys.executable, netns, False)


def _reason(returncode: int, output: str, limits: Limits) -> str:
    if returncode == 0:
        return "passed"
    if returncode < 0:
        sig = signal.Signals(-returncode)
        return {
            signal.SIGXCPU: "cpu-time",
            signal.SIGXFSZ: "file-size",
            signal.SIGKILL: "cpu-time",
        }.get(sig, f"killed:{sig.name}")
    if "MemoryError" in output:
        return "memory"
    if "File too large" in output:
        return "file-size"
    return "failed"


def run_python(code: str, limits: Limits = Limits()) -> Outcome:
    """Run ``code`` as a script in the sandbox and say how it ended."""
    iso = isolation()
    workdir = tempfile.mkdtemp(prefix="fgit-sandbox-")
    try:
        script = os.path.join(workdir, "main.py")
        with open(script, "w", encoding="utf-8") as fh:
            fh.write(code)
        if iso.nobody:
            os.chown(workdir, NOBODY, NOBODY)
            os.chown(script, NOBODY, NOBODY)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": workdir,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
        }
        start = time.monotonic()
        settings = (
            limits.cpu_seconds,
            limits.memory_bytes,
            limits.file_bytes,
            limits.processes,
            int(iso.network),
            int(iso.nobody),
        )
        proc = subprocess.Popen(
            [iso.python, *_PYTHON_FLAGS, "-c", _BOOT, *map(str, settings), script],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=limits.wall_seconds)
            reason = None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            reason = "timeout"
        with_group_killed(proc.pid)
        text = out.decode("utf-8", "replace")[-2000:]
        reason = reason or _reason(proc.returncode, text, limits)
        return Outcome(
            reason == "passed", reason, proc.returncode, time.monotonic() - start, text, iso
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def with_group_killed(pgid: int, attempts: int = 200) -> None:
    """Kill whatever the run left in its process group, until nothing is left: a fork bomb
    can fork a child while the first signal is being delivered."""
    for _ in range(attempts):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.01)


def run_tests(solution: str, tests: str, limits: Limits = Limits()) -> Outcome:
    """Run ``solution`` followed by its ``tests`` (asserts or a test harness)."""
    return run_python(f"{solution}\n\n{tests}\n", limits)


def run_many(
    jobs: list[tuple[str, str]],
    limits: Limits = Limits(),
    workers: int | None = None,
    desc: str | None = None,
) -> list[Outcome]:
    """``run_tests`` for each ``(solution, tests)``, several at a time, in order; with a
    progress bar when ``desc`` names the work."""
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        runs = pool.map(lambda job: run_tests(*job, limits), jobs)
        return list(tqdm(runs, total=len(jobs), desc=desc, unit="run", disable=desc is None))
