"""Run untrusted Python (generated code and its tests) in a contained child process.

The default mode, ``bwrap``, runs each script under bubblewrap: new PID, mount, network,
IPC, UTS and user namespaces; a private tmpfs working directory, ``/tmp`` and
``/dev/shm`` of bounded size; read-only binds of ``/usr`` and the interpreter's own
installation and nothing else (no ``/home``, ``/root``, ``/etc``, input data or project);
an unprivileged user (as root we first drop to ``nobody`` with ``setpriv``, so the code
never runs as root, not even inside a user namespace); ``--die-with-parent``; and the
CPU, memory, file-size and process-count limits below. ``kill(-1)``, ``setsid``, litter,
sibling runs and the host's sockets are then out of reach by construction, and a run's
processes all die with its PID namespace.

Where bubblewrap cannot run, the sandbox fails closed (``SandboxUnavailable``, naming the
fix). ``mode="rlimits"`` is the weaker isolation a user may ask for by name: limits, a
network namespace when the kernel allows one, a temporary directory, and the user
``nobody`` when we are root; it too refuses to run anything as root.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Literal

SandboxMode = Literal["bwrap", "rlimits"]
MODES: tuple[SandboxMode, ...] = ("bwrap", "rlimits")
NOBODY = 65534
WORKDIR = "/sandbox"  # the run's working directory inside the bwrap sandbox
# Not -I: it implies -E, which ignores PYTHONHASHSEED, so set and dict order of strings
# would change from run to run (and a reference's doctest pass or fail by chance). The
# child's environment is ours alone anyway; -s -S keep site-packages out.
_PYTHON_FLAGS = ("-s", "-S")
_OUTPUT_TAIL = 2000  # characters of stdout + stderr kept in an Outcome
_PROBE_SECONDS = 60


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot run here; the message names the fix."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """How one run is contained (``mode``) and what it may use."""

    mode: SandboxMode = "bwrap"
    cpu_seconds: int = 10
    wall_seconds: float = 20.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    scratch_bytes: int = 64 << 20  # each tmpfs: working directory, /tmp, /dev/shm
    processes: int = 64


@dataclass(frozen=True)
class Isolation:
    """What contains the untrusted code on this machine, as recorded in ``report.json``."""

    mode: SandboxMode
    python: str  # the interpreter that runs untrusted code
    user: str  # who the code runs as on this machine, e.g. "nobody (uid 65534)"
    namespaces: tuple[str, ...]  # new kernel namespaces of each run
    network: bool  # no network: a fresh network namespace has no interfaces


@dataclass(frozen=True)
class Outcome:
    """How a run ended: ``passed`` only when it exited 0 within every limit."""

    passed: bool
    reason: str  # passed | failed | timeout | cpu-time | memory | file-size | killed:SIG...
    returncode: int | None
    seconds: float
    output: str  # the tail of stdout + stderr
    isolation: Isolation


# Runs first in the child, before the untrusted script: limits, then (rlimits mode) the
# network namespace and the drop to nobody, which must succeed or the run stops.
_BOOT = """
import ctypes, os, resource, runpy, sys
del sys.path[0]  # the working directory ('' for -c): what -I would have left off
cpu, mem, fsize, nproc, netns, nobody = map(int, sys.argv[1:7])
if netns and ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:
    sys.exit("sandbox: no network namespace")
for which, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, mem),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NPROC, nproc),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(which, (value, value))
if nobody:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
if os.geteuid() == 0 and nobody:
    sys.exit("sandbox: still root")
sys.argv = sys.argv[7:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_BWRAP_FIX = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install "
    "bubblewrap) on a kernel that allows user namespaces, or pass --sandbox rlimits to "
    "accept weaker isolation (limits and a network namespace, no filesystem or PID "
    "isolation)"
)


@functools.cache
def _system_tool(name: str) -> str | None:
    """``name`` from the system's own folders (looked up once: runs come by the thousand)."""
    return shutil.which(name, path="/usr/bin:/bin")


def _bwrap_prefix(python: str, limits: Limits, script_fd: int) -> list[str]:
    """The command line that puts one run in its bubblewrap sandbox."""
    tools = {name: _system_tool(name) for name in ("bwrap", "setpriv")}
    prefix = []
    if os.geteuid() == 0:  # never root, not even root of a user namespace: nobody first
        prefix = [
            tools["setpriv"] or "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ]
    size = str(limits.scratch_bytes)
    binds = ["--ro-bind", "/usr", "/usr"]
    install = os.path.realpath(_install_root(python))
    if install != "/usr" and not install.startswith("/usr/"):
        binds += ["--ro-bind", install, install]
    for top in ("/bin", "/lib", "/lib32", "/lib64", "/sbin"):  # merged /usr or not
        if os.path.islink(top):
            binds += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            binds += ["--ro-bind", top, top]
    return [
        *prefix,
        tools["bwrap"] or "bwrap",
        "--unshare-user",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
        *binds,
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        size,
        "--tmpfs",
        "/dev/shm",
        "--size",
        size,
        "--tmpfs",
        "/tmp",
        "--size",
        size,
        "--tmpfs",
        WORKDIR,
        "--file",
        str(script_fd),
        f"{WORKDIR}/main.py",
        "--chdir",
        WORKDIR,
        "--",
    ]


def _install_root(python: str) -> str:
    """The folder holding an interpreter's binary and standard library (``bin/..``)."""
    return os.path.dirname(os.path.dirname(os.path.realpath(python)))


def _env(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }


def _user() -> str:
    uid = NOBODY if os.geteuid() == 0 else os.geteuid()
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


@dataclass(frozen=True)
class _Run:
    """A started child and where its output goes."""

    proc: subprocess.Popen
    tail: bytearray
    reader: threading.Thread


def _start(iso: Isolation, code: str, limits: Limits, workdir: str | None) -> _Run:
    """Start ``code`` under ``iso``; stdout + stderr are drained as they come, keeping only
    their tail, so a script that prints gigabytes costs us no memory."""
    netns = iso.mode == "rlimits" and iso.network
    nobody = iso.mode == "rlimits" and os.geteuid() == 0
    settings = (
        limits.cpu_seconds,
        limits.memory_bytes,
        limits.file_bytes,
        limits.processes,
        int(netns),
        int(nobody),
    )
    with tempfile.TemporaryFile() as script:
        script.write(code.encode())
        script.flush()
        script.seek(0)
        if iso.mode == "bwrap":
            prefix = _bwrap_prefix(iso.python, limits, script.fileno())
            target, cwd, fds = f"{WORKDIR}/main.py", "/", (script.fileno(),)
        else:
            target = os.path.join(workdir, "main.py")
            with open(target, "wb") as fh:
                shutil.copyfileobj(script, fh)
            if nobody:
                os.chown(workdir, NOBODY, NOBODY)
                os.chown(target, NOBODY, NOBODY)
            prefix, cwd, fds = [], workdir, ()
        proc = subprocess.Popen(
            [*prefix, iso.python, *_PYTHON_FLAGS, "-c", _BOOT, *map(str, settings), target],
            cwd=cwd,
            env=_env(WORKDIR if iso.mode == "bwrap" else workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=fds,
        )
    tail = bytearray()

    def drain() -> None:
        while chunk := proc.stdout.read1(1 << 16):
            tail.extend(chunk)
            del tail[: max(0, len(tail) - 4 * _OUTPUT_TAIL)]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    return _Run(proc, tail, reader)


def _probe(python: str, mode: SandboxMode, network: bool) -> str | None:
    """Run an empty script under the given isolation: ``None`` when it works, else why."""
    iso = Isolation(mode, python, _user(), (), network)
    workdir = tempfile.mkdtemp(prefix="fgit-probe-") if mode == "rlimits" else None
    try:
        run = _start(iso, "", Limits(mode=mode, cpu_seconds=5), workdir)
        try:
            rc = run.proc.wait(timeout=_PROBE_SECONDS)
        except subprocess.TimeoutExpired:
            _kill(run.proc.pid, run.proc)
            return f"the probe took over {_PROBE_SECONDS} s"
        run.reader.join()
        text = run.tail.decode("utf-8", "replace").strip()[-500:]
        return None if rc == 0 else f"exit {rc}: {text or 'no output'}"
    except OSError as err:
        return str(err)
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _interpreters() -> list[str]:
    """Our own Python first; as root a system Python too, since ``nobody`` cannot read an
    interpreter under /root."""
    system = shutil.which("python3", path="/usr/bin:/bin")
    return list(dict.fromkeys(filter(None, [sys.executable, system])))


@cache
def isolation(mode: SandboxMode = "bwrap") -> Isolation:
    """Probe ``mode`` once per process; raise ``SandboxUnavailable`` (never weaken it) when
    it cannot run here. Failures are not cached: the next call probes again."""
    if mode not in MODES:
        raise SandboxUnavailable(f"unknown sandbox mode {mode!r}; use one of {', '.join(MODES)}")
    failures = []
    if mode == "bwrap":
        missing = [t for t in ("bwrap", "setpriv") if not shutil.which(t, path="/usr/bin:/bin")]
        if missing:
            raise SandboxUnavailable(f"{' and '.join(missing)} not found; {_BWRAP_FIX}")
        spaces = ("user", "pid", "mount", "network", "ipc", "uts")
        for python in _interpreters():
            if (why := _probe(python, mode, True)) is None:
                return Isolation(mode, python, _user(), spaces, True)
            failures.append(f"{python}: {why}")
        raise SandboxUnavailable(
            f"bubblewrap cannot run here ({'; '.join(failures)}); {_BWRAP_FIX}"
        )
    for python in _interpreters() if os.geteuid() == 0 else [sys.executable]:
        for network in (True, False):
            if (why := _probe(python, mode, network)) is None:
                return Isolation(mode, python, _user(), ("network",) * network, network)
            failures.append(f"{python}: {why}")
    raise SandboxUnavailable(
        f"--sandbox rlimits cannot start a contained Python ({'; '.join(failures)}); "
        "untrusted code never runs as root, so as root it needs an interpreter that nobody "
        "can read (a system python3), or install bubblewrap"
    )


def _reason(returncode: int, output: str, mode: SandboxMode) -> str:
    if returncode == 0:
        return "passed"
    # bubblewrap reports a child killed by signal N as exit status 128 + N.
    signum = -returncode if returncode < 0 else returncode - 128 if mode == "bwrap" else 0
    if signum in set(signal.Signals):
        sig = signal.Signals(signum)
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


def _kill(pgid: int, leader: subprocess.Popen | None = None, attempts: int = 200) -> None:
    """Kill the run's process group and reap its leader, then kill what is left in the
    group until nothing is: a fork bomb can fork while the first signal is delivered.
    Under bubblewrap the leader's death ends the PID namespace and every process in it."""
    for _ in range(attempts):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if leader is not None:
            leader.wait()
            leader = None
        else:
            time.sleep(0.01)


def run_python(code: str, limits: Limits = Limits()) -> Outcome:
    """Run ``code`` as a script in the sandbox and say how it ended."""
    iso = isolation(limits.mode)
    workdir = tempfile.mkdtemp(prefix="fgit-sandbox-") if limits.mode == "rlimits" else None
    try:
        start = time.monotonic()
        run = _start(iso, code, limits, workdir)
        try:
            run.proc.wait(timeout=limits.wall_seconds)
            reason = None
        except subprocess.TimeoutExpired:
            reason = "timeout"
        _kill(run.proc.pid, run.proc)
        run.reader.join(timeout=5)  # rlimits mode: an escaped process may hold the pipe
        text = run.tail.decode("utf-8", "replace")[-_OUTPUT_TAIL:]
        reason = reason or _reason(run.proc.returncode, text, limits.mode)
        seconds = time.monotonic() - start
        return Outcome(reason == "passed", reason, run.proc.returncode, seconds, text, iso)
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


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
    progress bar when ``desc`` names the work. Raises ``SandboxUnavailable`` before any
    job runs when the isolation cannot be had."""
    from tqdm.auto import tqdm

    isolation(limits.mode)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        runs = pool.map(lambda job: run_tests(*job, limits), jobs)
        return list(tqdm(runs, total=len(jobs), desc=desc, unit="run", disable=desc is None))
